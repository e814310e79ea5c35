//! MQTT 3.1 and 3.1.1 behaviour of the broker, end to end over TCP.
//!
//! Most tests drive the broker with the raw client of `common::client`, built on the
//! crate's own codec, so that every packet sent and received is explicit; malformed input
//! is written as hand-made bytes. Its `_v311` publish flows assert that every ack is
//! exactly the 3.1.1 one. A few scripted flows use `rumqttc`. Each test starts its own
//! broker, so tests run in parallel. Keep-alive and the connect timeout are tested on
//! tokio's paused clock, in tests/timing.rs.
//!
//! Waiting for "nothing more" is a ping round trip (`Client::ping`, `expect_quiet`); the
//! module doc of `common::client` says why that is enough.
// A test reads best as one sequence of steps, however long.
#![allow(clippy::too_many_lines)]

mod common;

use bytes::{Bytes, BytesMut};
use common::client::{ack, connect_v311, publish_packet, text, Client, WAIT};
use common::TestBroker;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use ternmq::config::Config;
use ternmq::protocol::{
    self, ByteStr, Connect, Packet, Properties, Protocol, Publish, QoS, ReasonCode, SubOptions,
    Subscribe, SubscribeFilter, UnsubAck, Unsubscribe, Will,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const QOS: [QoS; 3] = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce];

// ---------------------------------------------------------------------------------------
// Packet builders (the shared ones, and the raw client, are in `common::client`)
// ---------------------------------------------------------------------------------------

fn persistent(client_id: &str) -> Connect {
    Connect {
        clean_start: false,
        ..connect_v311(client_id)
    }
}

fn with_will(client_id: &str, topic: &str, payload: &str, qos: QoS, retain: bool) -> Connect {
    Connect {
        will: Some(Will {
            topic: ByteStr::from(topic),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            qos,
            retain,
            properties: Properties::default(),
        }),
        ..connect_v311(client_id)
    }
}

/// A packet as 3.1.1 bytes.
fn encode(packet: &Packet) -> BytesMut {
    common::client::encode(packet, Protocol::V311)
}

/// Asserts the parts of a received PUBLISH that the tests choose.
#[track_caller]
fn assert_publish(p: &Publish, topic: &str, payload: &str, qos: QoS, retain: bool) {
    assert_eq!(
        (&*p.topic, text(&p.payload).as_str(), p.qos, p.retain),
        (topic, payload, qos, retain),
        "PUBLISH (topic, payload, qos, retain); full packet: {p:?}"
    );
    assert!(!p.dup, "first delivery has DUP 0: {p:?}");
    assert_eq!(
        p.pkid == 0,
        qos == QoS::AtMostOnce,
        "packet id only for QoS > 0: {p:?}"
    );
}

/// A client subscribed before another connection misbehaves, and checked afterwards.
struct Bystander(Client);

impl Bystander {
    async fn new(addr: SocketAddr) -> Bystander {
        let mut c = Client::connect_v311(addr, "bystander").await;
        c.subscribe_ok(&[("bystander/t", QoS::AtLeastOnce)]).await;
        Bystander(c)
    }

    /// A new client publishes to the bystander, which must receive it.
    async fn assert_still_served(&mut self, addr: SocketAddr) {
        let mut publisher = Client::connect_v311(addr, "bystander-check").await;
        publisher
            .publish_v311("bystander/t", b"still here", QoS::AtLeastOnce, false)
            .await;
        let p = self.0.receive_v311().await;
        assert_publish(&p, "bystander/t", "still here", QoS::AtLeastOnce, false);
    }
}

/// Connects a client, sends `bytes`, and asserts that the broker closes that connection
/// (sending nothing) while another client keeps being served.
async fn assert_closes_only_that_connection(bytes: &[u8], tweak: impl FnOnce(&mut Config)) {
    let broker = TestBroker::with(tweak).await;
    let mut bystander = Bystander::new(broker.addr).await;
    let mut bad = Client::connect_v311(broker.addr, "bad").await;
    bad.send_raw(bytes).await;
    bad.expect_closed(Duration::from_secs(2)).await;
    bystander.assert_still_served(broker.addr).await;
}

// ---------------------------------------------------------------------------------------
// CONNECT / CONNACK
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn connect_is_accepted_with_code_0_and_no_session_present() {
    let broker = TestBroker::start().await;
    let mut c = Client::open(broker.addr, "new", Protocol::V311).await;
    c.send(Packet::Connect(Box::new(connect_v311("new")))).await;
    c.expect_bytes(
        &[0x20, 0x02, 0x00, 0x00],
        "CONNACK accepted, session present 0",
    )
    .await;
    c.expect_quiet("after CONNACK").await;
    assert!(
        broker.broker().session("new").is_some(),
        "session registered"
    );
}

#[tokio::test]
async fn unsupported_protocol_level_gets_connack_1_then_close() {
    let broker = TestBroker::start().await;
    let mut c = Client::open(broker.addr, "level9", Protocol::V311).await;
    // "MQTT", level 9, clean session, keep-alive 60, client id "c".
    c.send_raw(&[
        0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 9, 0x02, 0, 60, 0, 1, b'c',
    ])
    .await;
    c.expect_bytes(
        &[0x20, 0x02, 0x00, 0x01],
        "CONNACK unacceptable protocol version",
    )
    .await;
    c.expect_closed(WAIT).await;
    assert_eq!(
        broker.broker().session_count(),
        0,
        "no session for a refused client"
    );
}

#[tokio::test]
async fn mqtt31_connect_is_accepted_and_works() {
    let broker = TestBroker::start().await;
    let mut c = Client::open(broker.addr, "v31", Protocol::V311).await;
    // MQIsdp, level 3, clean session, keep-alive 60, client id "v31": written by hand.
    let connect = [
        0x10, 17, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x02, 0, 60, 0, 3, b'v', b'3', b'1',
    ];
    assert_eq!(
        &encode(&Packet::Connect(Box::new(Connect {
            protocol: Protocol::V31,
            ..connect_v311("v31")
        })))[..],
        &connect[..],
        "the codec writes the same 3.1 CONNECT"
    );
    c.send_raw(&connect).await;
    c.expect_bytes(&[0x20, 0x02, 0x00, 0x00], "CONNACK accepted")
        .await;
    c.subscribe_ok(&[("v31/t", QoS::AtLeastOnce)]).await;
    c.publish_v311("v31/t", b"hello 3.1", QoS::AtLeastOnce, false)
        .await;
    let p = c.receive_v311().await;
    assert_publish(&p, "v31/t", "hello 3.1", QoS::AtLeastOnce, false);
}

#[tokio::test]
async fn mqtt31_empty_client_id_is_rejected_with_code_2() {
    let broker = TestBroker::start().await;
    let connect = Connect {
        protocol: Protocol::V31,
        ..connect_v311("")
    };
    let (mut c, ack) = Client::connect_with(broker.addr, connect).await;
    assert_eq!(
        (ack.code.v3_connack(), ack.session_present),
        (2, false),
        "CONNACK identifier rejected"
    );
    c.expect_closed(WAIT).await;
}

#[tokio::test]
async fn mqtt31_client_id_over_23_characters_is_rejected_with_code_2() {
    let broker = TestBroker::start().await;
    let id23 = "a".repeat(23);
    let (_ok, present) = Client::connect_accepted(
        broker.addr,
        Connect {
            protocol: Protocol::V31,
            ..connect_v311(&id23)
        },
    )
    .await;
    assert!(!present);
    let id24 = "b".repeat(24);
    let (mut c, ack) = Client::connect_with(
        broker.addr,
        Connect {
            protocol: Protocol::V31,
            ..connect_v311(&id24)
        },
    )
    .await;
    assert_eq!(
        ack.code.v3_connack(),
        2,
        "3.1 client id of 24 characters: identifier rejected"
    );
    c.expect_closed(WAIT).await;
    assert!(broker.broker().session(&id24).is_none());
}

#[tokio::test]
async fn empty_client_id_with_clean_session_gets_an_assigned_id() {
    let broker = TestBroker::start().await;
    let mut a = Client::connect_v311(broker.addr, "").await;
    let mut b = Client::connect_v311(broker.addr, "").await;
    assert_eq!(
        broker.broker().session_count(),
        2,
        "each empty-id client gets a session of its own"
    );
    a.subscribe_ok(&[("anon/t", QoS::AtLeastOnce)]).await;
    b.publish_v311("anon/t", b"to a", QoS::AtLeastOnce, false)
        .await;
    let p = a.receive_v311().await;
    assert_publish(&p, "anon/t", "to a", QoS::AtLeastOnce, false);
}

#[tokio::test]
async fn empty_client_id_without_clean_session_is_rejected_with_code_2() {
    let broker = TestBroker::start().await;
    let (mut c, ack) = Client::connect_with(broker.addr, persistent("")).await;
    assert_eq!(
        (ack.code.v3_connack(), ack.session_present),
        (2, false),
        "CONNACK identifier rejected"
    );
    c.expect_closed(WAIT).await;
    assert_eq!(broker.broker().session_count(), 0);
}

#[tokio::test]
async fn empty_client_id_is_rejected_when_the_config_forbids_it() {
    let broker = TestBroker::with(|cfg| cfg.mqtt.allow_zero_length_clientid = false).await;
    let (mut c, ack) = Client::connect_with(broker.addr, connect_v311("")).await;
    assert_eq!(ack.code.v3_connack(), 2, "CONNACK identifier rejected");
    c.expect_closed(WAIT).await;
    assert_eq!(broker.broker().session_count(), 0);
}

#[tokio::test]
async fn session_present_is_set_when_resuming_a_persistent_session() {
    let broker = TestBroker::start().await;
    let (mut c, present) = Client::connect_accepted(broker.addr, persistent("p")).await;
    assert!(!present, "a new persistent session: session present 0");
    c.subscribe_ok(&[("p/t", QoS::AtLeastOnce)]).await;
    c.disconnect().await;
    assert!(broker.broker().session("p").is_some(), "kept while offline");

    let (mut c, present) = Client::connect_accepted(broker.addr, persistent("p")).await;
    assert!(present, "resumed session: session present 1");
    // The subscription came back with the session.
    c.publish_v311("p/t", b"mine", QoS::AtLeastOnce, false)
        .await;
    let p = c.receive_v311().await;
    assert_publish(&p, "p/t", "mine", QoS::AtLeastOnce, false);
}

#[tokio::test]
async fn clean_session_discards_the_previous_session() {
    let broker = TestBroker::start().await;
    let (mut c, _) = Client::connect_accepted(broker.addr, persistent("p")).await;
    c.subscribe_ok(&[("p/t", QoS::AtLeastOnce)]).await;
    c.disconnect().await;
    let mut publisher = Client::connect_v311(broker.addr, "pub").await;
    publisher
        .publish_v311("p/t", b"queued", QoS::AtLeastOnce, false)
        .await;

    let (mut c, present) = Client::connect_accepted(broker.addr, connect_v311("p")).await;
    assert!(
        !present,
        "clean session: session present 0 even though one existed"
    );
    c.expect_quiet("from the discarded session (queued message)")
        .await;
    assert_eq!(
        broker.broker().router.subscription_count(),
        0,
        "the old session's subscriptions are gone"
    );
    publisher
        .publish_v311("p/t", b"after", QoS::AtLeastOnce, false)
        .await;
    c.expect_quiet("for a subscription of the discarded session")
        .await;
}

// ---------------------------------------------------------------------------------------
// The first packet, and takeover
// ---------------------------------------------------------------------------------------

/// A refused CONNECT with more packets behind it, sent before reading, and more sent
/// after the refusal: the client's writes go through, and it reads the CONNACK with its
/// return code, then the end of the stream, not a reset. The broker shuts its side and
/// reads (and drops) what still comes for a while before it closes: a lingering close.
#[tokio::test]
async fn refused_connect_followed_by_more_bytes_is_read_not_reset() {
    let broker = TestBroker::start().await;
    let mut c = Client::open(broker.addr, "refused", Protocol::V311).await;
    let mut publishes = BytesMut::new();
    for _ in 0..2000 {
        let p = publish_packet("after/refusal", &[b'x'; 100], QoS::AtMostOnce, false, 0);
        publishes.extend_from_slice(&encode(&Packet::Publish(p)));
    }
    // An empty client id without clean session: return code 2.
    c.send(Packet::Connect(Box::new(persistent("")))).await;
    c.send_raw(&publishes).await;
    let packets = c
        .lingering_close(
            "CONNACK",
            |p| matches!(p, Packet::ConnAck(_)),
            &publishes[..1000],
        )
        .await;
    match &packets[..] {
        [Packet::ConnAck(ack)] => assert_eq!(ack.code, ReasonCode::ClientIdentifierNotValid),
        other => panic!("expected the CONNACK alone, got {other:?}"),
    }
}

#[tokio::test]
async fn first_packet_other_than_connect_closes_the_connection() {
    let broker = TestBroker::start().await;
    let mut c = Client::open(broker.addr, "pinger", Protocol::V311).await;
    c.send(Packet::PingReq).await;
    c.expect_closed(WAIT).await;
}

#[tokio::test]
async fn second_connect_closes_the_connection() {
    let broker = TestBroker::start().await;
    let mut bystander = Bystander::new(broker.addr).await;
    let mut c = Client::connect_v311(broker.addr, "twice").await;
    c.send(Packet::Connect(Box::new(connect_v311("twice"))))
        .await;
    c.expect_closed(WAIT).await;
    bystander.assert_still_served(broker.addr).await;
}

#[tokio::test]
async fn takeover_closes_the_first_connection_and_publishes_its_will() {
    let broker = TestBroker::start().await;
    let mut watcher = Client::connect_v311(broker.addr, "watcher").await;
    watcher
        .subscribe_ok(&[("will/twin", QoS::AtLeastOnce)])
        .await;
    let (mut first, _) = Client::connect_accepted(
        broker.addr,
        with_will("twin", "will/twin", "first gone", QoS::AtLeastOnce, false),
    )
    .await;

    let mut second = Client::connect_v311(broker.addr, "twin").await;
    first.expect_closed(WAIT).await;
    let will = watcher.receive_v311().await;
    assert_publish(&will, "will/twin", "first gone", QoS::AtLeastOnce, false);

    second.subscribe_ok(&[("twin/t", QoS::AtLeastOnce)]).await;
    second
        .publish_v311("twin/t", b"second", QoS::AtLeastOnce, false)
        .await;
    let p = second.receive_v311().await;
    assert_publish(&p, "twin/t", "second", QoS::AtLeastOnce, false);
    assert_eq!(broker.broker().session_count(), 2, "watcher and twin");
}

#[tokio::test]
async fn takeover_of_a_persistent_session_keeps_its_subscriptions() {
    let broker = TestBroker::start().await;
    let (mut first, _) = Client::connect_accepted(broker.addr, persistent("twin")).await;
    first.subscribe_ok(&[("twin/t", QoS::AtLeastOnce)]).await;
    let (mut second, present) = Client::connect_accepted(broker.addr, persistent("twin")).await;
    assert!(present, "the live session is resumed: session present 1");
    first.expect_closed(WAIT).await;
    let mut publisher = Client::connect_v311(broker.addr, "pub").await;
    publisher
        .publish_v311("twin/t", b"to the new one", QoS::AtLeastOnce, false)
        .await;
    let p = second.receive_v311().await;
    assert_publish(&p, "twin/t", "to the new one", QoS::AtLeastOnce, false);
}

/// Takeover of a clean session (which ends with its connection) by a CONNECT with clean
/// session 0: the old session ended with the connection taken over, so the new one starts
/// afresh (session present 0, no subscription), and the old connection's will is
/// published as for any end without DISCONNECT.
#[tokio::test]
async fn takeover_of_a_clean_session_without_clean_session_starts_afresh() {
    let broker = TestBroker::start().await;
    let mut watcher = will_watcher(broker.addr).await;
    let (mut first, _) = Client::connect_accepted(
        broker.addr,
        with_will("twin", "will/twin", "first gone", QoS::AtLeastOnce, false),
    )
    .await;
    first.subscribe_ok(&[("twin/t", QoS::AtLeastOnce)]).await;

    let (mut second, present) = Client::connect_accepted(broker.addr, persistent("twin")).await;
    assert!(!present, "the clean session ended with its connection");
    first.expect_closed(WAIT).await;
    let will = watcher.receive_v311().await;
    assert_publish(&will, "will/twin", "first gone", QoS::AtLeastOnce, false);
    assert_eq!(
        broker.broker().router.subscription_count(),
        1,
        "only the watcher's subscription: the old session's went with it"
    );
    second.expect_quiet("in a fresh session").await;
}

/// A will topic that is empty or holds a wildcard makes the CONNECT malformed, and 3.1.1
/// has no return code for that: the connection is closed without a CONNACK
/// [MQTT-3.1.4-1] (not return code 5, which sends the client looking for a credentials
/// problem).
#[tokio::test]
async fn connect_with_an_invalid_will_topic_is_closed_without_connack() {
    let broker = TestBroker::start().await;
    for topic in ["", "will/+", "#"] {
        let mut c = Client::open(broker.addr, "bad-will", Protocol::V311).await;
        c.send(Packet::Connect(Box::new(with_will(
            "bad-will",
            topic,
            "x",
            QoS::AtMostOnce,
            false,
        ))))
        .await;
        c.expect_closed(WAIT).await;
    }
    assert_eq!(broker.broker().session_count(), 0);
}

/// `max_keepalive` below 65535 applies to 3.x clients too, which cannot be told another
/// value: a keep-alive of 0 or above the maximum gets return code 2 (identifier
/// rejected) and the connection is closed, as mosquitto (2.0.12+) does; the maximum
/// itself is accepted.
#[tokio::test]
async fn max_keepalive_refuses_3x_clients_asking_for_none_or_more() {
    let broker = TestBroker::with(|cfg| cfg.mqtt.max_keepalive = 60).await;
    for (protocol, keep_alive, code) in [
        (Protocol::V311, 0, ReasonCode::ClientIdentifierNotValid),
        (Protocol::V311, 61, ReasonCode::ClientIdentifierNotValid),
        (Protocol::V31, 0, ReasonCode::ClientIdentifierNotValid),
        (Protocol::V311, 60, ReasonCode::Success),
        (Protocol::V311, 1, ReasonCode::Success),
    ] {
        let connect = Connect {
            protocol,
            keep_alive,
            ..connect_v311(&format!("ka{keep_alive}"))
        };
        let (mut c, ack) = Client::connect_with(broker.addr, connect).await;
        assert_eq!(ack.code, code, "{protocol:?} keep-alive {keep_alive}");
        if code == ReasonCode::Success {
            assert!(c.ping().await.is_empty());
        } else {
            c.expect_closed(WAIT).await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Inbound PUBLISH
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn qos0_publish_is_delivered_and_not_acknowledged() {
    let broker = TestBroker::start().await;
    let mut sub = Client::connect_v311(broker.addr, "sub").await;
    sub.subscribe_ok(&[("t", QoS::ExactlyOnce)]).await;
    let mut publisher = Client::connect_v311(broker.addr, "pub").await;
    publisher
        .send(Packet::Publish(publish_packet(
            "t",
            b"zero",
            QoS::AtMostOnce,
            false,
            0,
        )))
        .await;
    publisher.expect_quiet("after a QoS 0 PUBLISH").await;
    let p = sub.expect_publish().await;
    assert_publish(&p, "t", "zero", QoS::AtMostOnce, false);
}

#[tokio::test]
async fn qos1_publish_is_acknowledged_with_its_packet_id() {
    let broker = TestBroker::start().await;
    let mut sub = Client::connect_v311(broker.addr, "sub").await;
    sub.subscribe_ok(&[("t", QoS::AtLeastOnce)]).await;
    let mut publisher = Client::connect_v311(broker.addr, "pub").await;
    publisher
        .send(Packet::Publish(publish_packet(
            "t",
            b"one",
            QoS::AtLeastOnce,
            false,
            0x1234,
        )))
        .await;
    publisher
        .expect_bytes(&[0x40, 0x02, 0x12, 0x34], "PUBACK 0x1234")
        .await;
    publisher.expect_quiet("after the PUBACK").await;
    let p = sub.receive_v311().await;
    assert_publish(&p, "t", "one", QoS::AtLeastOnce, false);
}

#[tokio::test]
async fn qos2_publish_flow_is_pubrec_pubrel_pubcomp() {
    let broker = TestBroker::start().await;
    let mut sub = Client::connect_v311(broker.addr, "sub").await;
    sub.subscribe_ok(&[("t", QoS::ExactlyOnce)]).await;
    let mut publisher = Client::connect_v311(broker.addr, "pub").await;
    publisher
        .send(Packet::Publish(publish_packet(
            "t",
            b"two",
            QoS::ExactlyOnce,
            false,
            77,
        )))
        .await;
    publisher
        .expect_bytes(&[0x50, 0x02, 0x00, 77], "PUBREC 77")
        .await;
    publisher.send(Packet::PubRel(ack(77))).await;
    publisher
        .expect_bytes(&[0x70, 0x02, 0x00, 77], "PUBCOMP 77")
        .await;
    publisher.expect_quiet("after the PUBCOMP").await;
    let p = sub.receive_v311().await;
    assert_publish(&p, "t", "two", QoS::ExactlyOnce, false);
}

#[tokio::test]
async fn a_client_that_does_not_read_its_answers_is_not_read_either() {
    // PINGREQs sent without ever reading the PINGRESPs: once the answers back up, the
    // broker must stop reading (TCP backpressure) rather than buffer answers forever.
    let broker = TestBroker::start().await;
    let mut c = Client::connect_v311(broker.addr, "deaf").await;
    let chunk = [0xC0u8, 0x00].repeat(32 * 1024);
    let limit = 256 * 1024 * 1024;
    let mut sent = 0;
    let stalled = loop {
        if sent >= limit {
            break false;
        }
        let write = tokio::io::AsyncWriteExt::write_all(&mut c.stream, &chunk);
        match tokio::time::timeout(Duration::from_millis(500), write).await {
            Ok(Ok(())) => sent += chunk.len(),
            Ok(Err(e)) => panic!("broker closed the connection after {sent} bytes: {e}"),
            Err(_) => break true,
        }
    };
    assert!(
        stalled,
        "the broker kept reading {limit} bytes of PINGREQs whose answers nobody read"
    );
    // The broker is still fine for others.
    let mut other = Client::connect_v311(broker.addr, "other").await;
    other.subscribe_ok(&[("t", QoS::AtMostOnce)]).await;
}

#[tokio::test]
async fn many_unreleased_qos2_publishes_are_fine_in_3_1_1() {
    // Receive Maximum (20 by default) is an MQTT 5 limit announced in CONNACK: a 3.1.1
    // client cannot know it, so it must not be held to it.
    let broker = TestBroker::start().await;
    let mut publisher = Client::connect_v311(broker.addr, "pub").await;
    for pkid in 1..=30u16 {
        let p = publish_packet("t", b"x", QoS::ExactlyOnce, false, pkid);
        publisher.send(Packet::Publish(p)).await;
        assert_eq!(
            publisher.expect("PUBREC").await,
            Packet::PubRec(ack(pkid)),
            "unreleased QoS 2 publish {pkid} is received"
        );
    }
    for pkid in 1..=30u16 {
        publisher.send(Packet::PubRel(ack(pkid))).await;
        assert_eq!(
            publisher.expect("PUBCOMP").await,
            Packet::PubComp(ack(pkid))
        );
    }
}

#[tokio::test]
async fn qos2_publish_resent_before_pubrel_is_delivered_once() {
    let broker = TestBroker::start().await;
    let mut sub = Client::connect_v311(broker.addr, "sub").await;
    sub.subscribe_ok(&[("t", QoS::ExactlyOnce)]).await;
    let mut publisher = Client::connect_v311(broker.addr, "pub").await;
    let mut packet = publish_packet("t", b"once", QoS::ExactlyOnce, false, 9);
    publisher.send(Packet::Publish(packet.clone())).await;
    assert_eq!(publisher.expect("PUBREC").await, Packet::PubRec(ack(9)));
    packet.dup = true;
    publisher.send(Packet::Publish(packet.clone())).await;
    assert_eq!(
        publisher.expect("PUBREC").await,
        Packet::PubRec(ack(9)),
        "the resent PUBLISH is acknowledged again"
    );
    publisher.send(Packet::PubRel(ack(9))).await;
    assert_eq!(publisher.expect("PUBCOMP").await, Packet::PubComp(ack(9)));

    let p = sub.receive_v311().await;
    assert_publish(&p, "t", "once", QoS::ExactlyOnce, false);
    sub.expect_quiet("after the one copy of a resent QoS 2 message")
        .await;

    // After PUBCOMP the packet id is free: the same id is a new message.
    packet.dup = false;
    packet.payload = Bytes::from_static(b"again");
    publisher.send(Packet::Publish(packet)).await;
    assert_eq!(publisher.expect("PUBREC").await, Packet::PubRec(ack(9)));
    publisher.send(Packet::PubRel(ack(9))).await;
    assert_eq!(publisher.expect("PUBCOMP").await, Packet::PubComp(ack(9)));
    let p = sub.receive_v311().await;
    assert_publish(&p, "t", "again", QoS::ExactlyOnce, false);
}

#[tokio::test]
async fn pubrel_for_an_unknown_packet_id_gets_pubcomp() {
    let broker = TestBroker::start().await;
    let mut c = Client::connect_v311(broker.addr, "c").await;
    c.send(Packet::PubRel(ack(0x1092))).await;
    c.expect_bytes(&[0x70, 0x02, 0x10, 0x92], "PUBCOMP 0x1092")
        .await;
    c.expect_quiet("after the PUBCOMP").await;
}

// ---------------------------------------------------------------------------------------
// Outbound flows
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn outbound_qos1_has_a_packet_id_and_ends_with_puback() {
    let broker = TestBroker::start().await;
    let mut sub = Client::connect_v311(broker.addr, "sub").await;
    sub.subscribe_ok(&[("t", QoS::AtLeastOnce)]).await;
    let mut publisher = Client::connect_v311(broker.addr, "pub").await;
    publisher
        .publish_v311("t", b"m", QoS::AtLeastOnce, false)
        .await;
    let p = sub.expect_publish().await;
    assert_publish(&p, "t", "m", QoS::AtLeastOnce, false);
    sub.send(Packet::PubAck(ack(p.pkid))).await;
    sub.expect_quiet("after the PUBACK").await;
}

#[tokio::test]
async fn outbound_qos2_flow_is_publish_pubrec_pubrel_pubcomp() {
    let broker = TestBroker::start().await;
    let mut sub = Client::connect_v311(broker.addr, "sub").await;
    sub.subscribe_ok(&[("t", QoS::ExactlyOnce)]).await;
    let mut publisher = Client::connect_v311(broker.addr, "pub").await;
    publisher
        .publish_v311("t", b"m", QoS::ExactlyOnce, false)
        .await;
    let p = sub.expect_publish().await;
    assert_publish(&p, "t", "m", QoS::ExactlyOnce, false);
    sub.expect_quiet("before PUBREC (no resend on a live connection)")
        .await;
    sub.send(Packet::PubRec(ack(p.pkid))).await;
    assert_eq!(
        sub.expect("PUBREL").await,
        Packet::PubRel(ack(p.pkid)),
        "PUBREL with the PUBLISH's id"
    );
    sub.send(Packet::PubComp(ack(p.pkid))).await;
    sub.expect_quiet("after the PUBCOMP").await;
}

#[tokio::test]
async fn delivered_qos_is_the_minimum_of_publish_and_subscription_qos() {
    let broker = TestBroker::start().await;
    let mut sub = Client::connect_v311(broker.addr, "sub").await;
    sub.subscribe_ok(&[
        ("qos/0", QoS::AtMostOnce),
        ("qos/1", QoS::AtLeastOnce),
        ("qos/2", QoS::ExactlyOnce),
    ])
    .await;
    let mut publisher = Client::connect_v311(broker.addr, "pub").await;
    for sub_qos in QOS {
        for pub_qos in QOS {
            let topic = format!("qos/{}", sub_qos as u8);
            let payload = format!("published at {pub_qos:?}");
            publisher
                .publish_v311(&topic, payload.as_bytes(), pub_qos, false)
                .await;
            let p = sub.receive_v311().await;
            assert_publish(&p, &topic, &payload, pub_qos.min(sub_qos), false);
        }
    }
    sub.expect_quiet("after the 9 messages").await;
}

#[tokio::test]
async fn inflight_window_holds_back_unacknowledged_qos1_messages() {
    let broker = TestBroker::with(|cfg| cfg.session.max_inflight_messages = 2).await;
    let mut sub = Client::connect_v311(broker.addr, "sub").await;
    sub.subscribe_ok(&[("t", QoS::AtLeastOnce)]).await;
    let mut publisher = Client::connect_v311(broker.addr, "pub").await;
    for i in 0..5 {
        publisher
            .publish_v311("t", format!("m{i}").as_bytes(), QoS::AtLeastOnce, false)
            .await;
    }
    let mut inflight = VecDeque::new();
    for i in 0..2 {
        let p = sub.expect_publish().await;
        assert_publish(&p, "t", &format!("m{i}"), QoS::AtLeastOnce, false);
        inflight.push_back(p.pkid);
    }
    sub.expect_quiet("while 2 messages are unacknowledged")
        .await;
    for i in 2..5 {
        let pkid = inflight.pop_front().expect("one in flight");
        sub.send(Packet::PubAck(ack(pkid))).await;
        let p = sub.expect_publish().await;
        assert_publish(&p, "t", &format!("m{i}"), QoS::AtLeastOnce, false);
        inflight.push_back(p.pkid);
        sub.expect_quiet("until the next PUBACK").await;
    }
    for pkid in inflight {
        sub.send(Packet::PubAck(ack(pkid))).await;
    }
    sub.expect_quiet("after all PUBACKs").await;
}

#[tokio::test]
async fn unacknowledged_qos1_message_is_resent_with_dup_after_reconnect() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = Client::connect_accepted(broker.addr, persistent("sub")).await;
    sub.subscribe_ok(&[("t", QoS::AtLeastOnce)]).await;
    let mut publisher = Client::connect_v311(broker.addr, "pub").await;
    publisher
        .publish_v311("t", b"first", QoS::AtLeastOnce, false)
        .await;
    let first = sub.expect_publish().await;
    assert_publish(&first, "t", "first", QoS::AtLeastOnce, false);
    sub.disconnect().await; // without PUBACK

    publisher
        .publish_v311("t", b"second", QoS::AtLeastOnce, false)
        .await;
    let (mut sub, present) = Client::connect_accepted(broker.addr, persistent("sub")).await;
    assert!(present, "session present 1");
    let again = sub.expect_publish().await;
    assert_eq!(
        again,
        Publish {
            dup: true,
            ..first.clone()
        },
        "the unacknowledged message again, DUP 1, same packet id, first"
    );
    sub.acknowledge_v311(&again).await;
    let second = sub.receive_v311().await;
    assert_publish(&second, "t", "second", QoS::AtLeastOnce, false);
    assert_ne!(
        second.pkid, first.pkid,
        "a new packet id for the queued message"
    );
    sub.expect_quiet("after both messages").await;
}

#[tokio::test]
async fn qos2_message_in_pubrel_stage_gets_pubrel_resent_after_reconnect() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = Client::connect_accepted(broker.addr, persistent("sub")).await;
    sub.subscribe_ok(&[("t", QoS::ExactlyOnce)]).await;
    let mut publisher = Client::connect_v311(broker.addr, "pub").await;
    publisher
        .publish_v311("t", b"two", QoS::ExactlyOnce, false)
        .await;
    let p = sub.expect_publish().await;
    assert_publish(&p, "t", "two", QoS::ExactlyOnce, false);
    sub.send(Packet::PubRec(ack(p.pkid))).await;
    assert_eq!(sub.expect("PUBREL").await, Packet::PubRel(ack(p.pkid)));
    sub.disconnect().await; // without PUBCOMP

    let (mut sub, present) = Client::connect_accepted(broker.addr, persistent("sub")).await;
    assert!(present, "session present 1");
    assert_eq!(
        sub.expect("PUBREL").await,
        Packet::PubRel(ack(p.pkid)),
        "PUBREL resent (not the PUBLISH)"
    );
    sub.send(Packet::PubComp(ack(p.pkid))).await;
    sub.expect_quiet("after the PUBCOMP").await;
}

// ---------------------------------------------------------------------------------------
// Persistent sessions while offline
// ---------------------------------------------------------------------------------------

/// Creates a persistent session subscribed to `t` at `qos` and leaves it offline.
async fn offline_subscriber(addr: SocketAddr, qos: QoS) {
    let (mut sub, _) = Client::connect_accepted(addr, persistent("sub")).await;
    sub.subscribe_ok(&[("t", qos)]).await;
    sub.disconnect().await;
}

#[tokio::test]
async fn offline_qos1_and_qos2_messages_are_queued_up_to_the_limit() {
    let broker = TestBroker::with(|cfg| cfg.session.max_queued_messages = 3).await;
    offline_subscriber(broker.addr, QoS::ExactlyOnce).await;
    assert_eq!(
        broker.broker().router.subscription_count(),
        1,
        "kept offline"
    );
    let mut publisher = Client::connect_v311(broker.addr, "pub").await;
    for i in 0..5 {
        let qos = if i % 2 == 0 {
            QoS::AtLeastOnce
        } else {
            QoS::ExactlyOnce
        };
        publisher
            .publish_v311("t", format!("m{i}").as_bytes(), qos, false)
            .await;
    }
    let (mut sub, present) = Client::connect_accepted(broker.addr, persistent("sub")).await;
    assert!(present);
    for (i, qos) in [QoS::AtLeastOnce, QoS::ExactlyOnce, QoS::AtLeastOnce]
        .into_iter()
        .enumerate()
    {
        let p = sub.receive_v311().await;
        assert_publish(&p, "t", &format!("m{i}"), qos, false);
    }
    sub.expect_quiet("beyond max_queued_messages = 3").await;
    let session = broker.broker().session("sub").expect("session");
    assert_eq!(
        session.dropped(),
        2,
        "two messages dropped for a full queue"
    );
}

#[tokio::test]
async fn offline_qos0_messages_are_not_queued_by_default() {
    let broker = TestBroker::start().await;
    offline_subscriber(broker.addr, QoS::AtLeastOnce).await;
    let mut publisher = Client::connect_v311(broker.addr, "pub").await;
    publisher
        .publish_v311("t", b"zero", QoS::AtMostOnce, false)
        .await;
    publisher
        .publish_v311("t", b"one", QoS::AtLeastOnce, false)
        .await;
    let (mut sub, present) = Client::connect_accepted(broker.addr, persistent("sub")).await;
    assert!(present);
    let p = sub.receive_v311().await;
    assert_publish(&p, "t", "one", QoS::AtLeastOnce, false);
    sub.expect_quiet("(the QoS 0 message is not queued offline)")
        .await;
}

#[tokio::test]
async fn offline_qos0_messages_are_queued_when_configured() {
    let broker = TestBroker::with(|cfg| cfg.session.queue_qos0_messages = true).await;
    offline_subscriber(broker.addr, QoS::AtLeastOnce).await;
    let mut publisher = Client::connect_v311(broker.addr, "pub").await;
    publisher
        .publish_v311("t", b"zero", QoS::AtMostOnce, false)
        .await;
    publisher
        .publish_v311("t", b"one", QoS::AtLeastOnce, false)
        .await;
    let (mut sub, present) = Client::connect_accepted(broker.addr, persistent("sub")).await;
    assert!(present);
    let p = sub.receive_v311().await;
    assert_publish(&p, "t", "zero", QoS::AtMostOnce, false);
    let p = sub.receive_v311().await;
    assert_publish(&p, "t", "one", QoS::AtLeastOnce, false);
    sub.expect_quiet("after the two queued messages").await;
}

// ---------------------------------------------------------------------------------------
// SUBSCRIBE / UNSUBSCRIBE and matching
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn suback_grants_each_filter_its_qos_in_order() {
    let broker = TestBroker::start().await;
    let mut c = Client::connect_v311(broker.addr, "c").await;
    let packet = Packet::Subscribe(Subscribe {
        pkid: 0x0102,
        filters: [
            ("a", QoS::ExactlyOnce),
            ("b", QoS::AtMostOnce),
            ("c", QoS::AtLeastOnce),
        ]
        .into_iter()
        .map(|(f, qos)| SubscribeFilter {
            filter: ByteStr::from(f),
            options: SubOptions {
                qos,
                ..SubOptions::default()
            },
        })
        .collect(),
        properties: Properties::default(),
    });
    c.send(packet).await;
    c.expect_bytes(&[0x90, 0x05, 0x01, 0x02, 2, 0, 1], "SUBACK")
        .await;
    assert_eq!(broker.broker().router.subscription_count(), 3);
}

#[tokio::test]
async fn invalid_filters_get_0x80_while_the_others_are_granted() {
    let broker = TestBroker::start().await;
    let mut c = Client::connect_v311(broker.addr, "c").await;
    let codes = c
        .subscribe_qos(&[
            ("ok/1", QoS::AtLeastOnce),
            ("a/#/b", QoS::AtMostOnce),
            ("ok/+", QoS::ExactlyOnce),
            ("a+", QoS::AtLeastOnce),
            ("#x", QoS::AtMostOnce),
            ("ok/#", QoS::AtMostOnce),
        ])
        .await;
    assert_eq!(codes, [1, 0x80, 2, 0x80, 0x80, 0], "SUBACK return codes");
    assert_eq!(broker.broker().router.subscription_count(), 3);
    c.publish_v311("ok/1", b"x", QoS::ExactlyOnce, false).await;
    // `ok/1` (QoS 1), `ok/+` (QoS 2) and `ok/#` (QoS 0) all match: one copy at QoS 2.
    let p = c.receive_v311().await;
    assert_publish(&p, "ok/1", "x", QoS::ExactlyOnce, false);
    c.expect_quiet("after the one copy").await;
}

/// `levels` topic levels named `l`, or `+` for a filter.
fn deep(levels: usize, level: &str) -> String {
    vec![level; levels].join("/")
}

/// A topic or filter of 201 levels (200 `/`) is accepted; one more level is refused: the
/// filter gets 0x80, the PUBLISH closes the connection. mosquitto (2.0) accepts and
/// refuses at the same depth (it closes the connection on the filter too).
#[tokio::test]
async fn topics_and_filters_of_up_to_201_levels_are_accepted() {
    let broker = TestBroker::start().await;
    let mut c = Client::connect_v311(broker.addr, "deep").await;
    let (topic, too_deep) = (deep(201, "l"), deep(202, "l"));
    let (plus, too_many_plus) = (deep(201, "+"), deep(202, "+"));
    let hash = format!("{}/#", deep(200, "l"));
    let codes = c
        .subscribe_qos(&[
            (&topic, QoS::AtLeastOnce),
            (&too_deep, QoS::AtLeastOnce),
            (&plus, QoS::AtLeastOnce),
            (&too_many_plus, QoS::AtLeastOnce),
            (&hash, QoS::AtLeastOnce),
        ])
        .await;
    assert_eq!(codes, [1, 0x80, 1, 0x80, 1], "SUBACK return codes");
    c.publish_v311(&topic, b"deep", QoS::AtLeastOnce, false)
        .await;
    let p = c.receive_v311().await;
    assert_publish(&p, &topic, "deep", QoS::AtLeastOnce, false);
    c.expect_quiet("after the one copy").await;
    let packet = publish_packet(&too_deep, b"x", QoS::AtMostOnce, false, 0);
    c.send(Packet::Publish(packet)).await;
    c.expect_closed(WAIT).await;
}

#[tokio::test]
async fn unsubscribe_is_acknowledged_and_stops_delivery() {
    let broker = TestBroker::start().await;
    let mut sub = Client::connect_v311(broker.addr, "sub").await;
    sub.subscribe_ok(&[("t", QoS::AtLeastOnce), ("keep", QoS::AtLeastOnce)])
        .await;
    sub.send(Packet::Unsubscribe(Unsubscribe {
        pkid: 0x0A0B,
        filters: vec![ByteStr::from("t")],
        properties: Properties::default(),
    }))
    .await;
    assert_eq!(
        sub.expect("UNSUBACK").await,
        Packet::UnsubAck(UnsubAck {
            pkid: 0x0A0B,
            ..UnsubAck::default()
        })
    );
    assert_eq!(broker.broker().router.subscription_count(), 1);
    let mut publisher = Client::connect_v311(broker.addr, "pub").await;
    publisher
        .publish_v311("t", b"gone", QoS::AtLeastOnce, false)
        .await;
    publisher
        .publish_v311("keep", b"kept", QoS::AtLeastOnce, false)
        .await;
    let p = sub.receive_v311().await;
    assert_publish(&p, "keep", "kept", QoS::AtLeastOnce, false);
    sub.expect_quiet("for the unsubscribed topic").await;

    // Unsubscribing from a filter never subscribed is acknowledged too.
    sub.send(Packet::Unsubscribe(Unsubscribe {
        pkid: 7,
        filters: vec![ByteStr::from("never")],
        properties: Properties::default(),
    }))
    .await;
    sub.expect_bytes(&[0xB0, 0x02, 0x00, 0x07], "UNSUBACK 7")
        .await;
}

/// Which of `topics` a new subscription to `filter` receives, in publication order.
async fn topics_matched(broker: &TestBroker, filter: &str, topics: &[&str]) -> Vec<String> {
    let mut sub = Client::connect_v311(broker.addr, "matcher").await;
    sub.subscribe_ok(&[(filter, QoS::AtMostOnce)]).await;
    let mut publisher = Client::connect_v311(broker.addr, "matcher-pub").await;
    for topic in topics {
        publisher
            .publish_v311(topic, b"x", QoS::AtLeastOnce, false)
            .await;
    }
    let got = sub
        .ping()
        .await
        .into_iter()
        .map(|p| match p {
            Packet::Publish(p) => p.topic.to_string(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    sub.disconnect().await;
    publisher.disconnect().await;
    got
}

#[tokio::test]
async fn wildcards_match_as_specified() {
    let broker = TestBroker::start().await;
    let cases: &[(&str, &[&str], &[&str])] = &[
        (
            "a/#",
            &["a", "a/b", "a/b/c", "b", "ab", "b/a"],
            &["a", "a/b", "a/b/c"],
        ),
        (
            "a/+/c",
            &["a/b/c", "a//c", "a/b/d", "a/c", "a/b/c/d"],
            &["a/b/c", "a//c"],
        ),
        ("+/b", &["/b", "a/b", "a/b/c", "b"], &["/b", "a/b"]),
        ("a/+", &["a/", "a/x", "a", "a/x/y"], &["a/", "a/x"]),
        ("+", &["a", "/a", "a/b"], &["a"]),
        ("#", &["a", "/", "a/b/c"], &["a", "/", "a/b/c"]),
        ("a/b", &["a/b", "a/B", "a/b/", "a"], &["a/b"]),
    ];
    for (filter, topics, expected) in cases {
        assert_eq!(
            topics_matched(&broker, filter, topics).await,
            *expected,
            "topics matched by {filter}"
        );
    }
}

#[tokio::test]
async fn dollar_topics_are_not_matched_by_leading_wildcards() {
    let broker = TestBroker::start().await;
    let cases: &[(&str, &[&str], &[&str])] = &[
        ("#", &["$foo/bar", "foo/bar"], &["foo/bar"]),
        ("+/bar", &["$foo/bar", "x/bar"], &["x/bar"]),
        (
            "$foo/#",
            &["$foo/bar", "$foo", "foo/bar"],
            &["$foo/bar", "$foo"],
        ),
        ("$foo/+", &["$foo/bar", "$foo/bar/baz"], &["$foo/bar"]),
    ];
    for (filter, topics, expected) in cases {
        assert_eq!(
            topics_matched(&broker, filter, topics).await,
            *expected,
            "topics matched by {filter}"
        );
    }
}

#[tokio::test]
async fn overlapping_subscriptions_deliver_one_copy_at_the_highest_qos() {
    let broker = TestBroker::start().await;
    let mut sub = Client::connect_v311(broker.addr, "sub").await;
    sub.subscribe_ok(&[("a/#", QoS::AtMostOnce), ("a/b", QoS::ExactlyOnce)])
        .await;
    let mut publisher = Client::connect_v311(broker.addr, "pub").await;
    publisher
        .publish_v311("a/b", b"both", QoS::ExactlyOnce, false)
        .await;
    let p = sub.receive_v311().await;
    assert_publish(&p, "a/b", "both", QoS::ExactlyOnce, false);
    sub.expect_quiet("after the one copy").await;
    publisher
        .publish_v311("a/c", b"one", QoS::ExactlyOnce, false)
        .await;
    let p = sub.receive_v311().await;
    assert_publish(&p, "a/c", "one", QoS::AtMostOnce, false);
    sub.expect_quiet("after the one copy").await;
}

// ---------------------------------------------------------------------------------------
// Retained messages
// ---------------------------------------------------------------------------------------

/// Subscribes a new client to `filter` and returns the retained messages it gets.
async fn retained_for(addr: SocketAddr, id: &str, filter: &str, qos: QoS) -> Vec<Publish> {
    let mut sub = Client::connect_v311(addr, id).await;
    sub.subscribe_ok(&[(filter, qos)]).await;
    let mut got = Vec::new();
    for p in sub.ping().await {
        match p {
            Packet::Publish(p) => {
                sub.acknowledge_v311(&p).await;
                got.push(p);
            }
            other => panic!("{id}: unexpected {other:?}"),
        }
    }
    sub.expect_quiet("after the retained messages").await;
    got.sort_by(|a, b| a.topic.cmp(&b.topic));
    got
}

#[tokio::test]
async fn retained_message_goes_to_new_subscribers_with_retain_1() {
    let broker = TestBroker::start().await;
    let mut existing = Client::connect_v311(broker.addr, "existing").await;
    existing.subscribe_ok(&[("r/#", QoS::AtLeastOnce)]).await;
    let mut publisher = Client::connect_v311(broker.addr, "pub").await;
    publisher
        .publish_v311("r/1", b"one", QoS::AtLeastOnce, true)
        .await;
    publisher
        .publish_v311("r/2", b"two", QoS::AtLeastOnce, true)
        .await;
    assert_eq!(broker.broker().router.retained_count(), 2);

    for i in ["1", "2"] {
        let p = existing.receive_v311().await;
        let payload = if i == "1" { "one" } else { "two" };
        assert_publish(&p, &format!("r/{i}"), payload, QoS::AtLeastOnce, false);
    }

    let exact = retained_for(broker.addr, "exact", "r/1", QoS::AtLeastOnce).await;
    assert_eq!(exact.len(), 1, "one retained message for r/1: {exact:?}");
    assert_publish(&exact[0], "r/1", "one", QoS::AtLeastOnce, true);

    let wild = retained_for(broker.addr, "wild", "r/+", QoS::AtLeastOnce).await;
    assert_eq!(wild.len(), 2, "two retained messages for r/+: {wild:?}");
    assert_publish(&wild[0], "r/1", "one", QoS::AtLeastOnce, true);
    assert_publish(&wild[1], "r/2", "two", QoS::AtLeastOnce, true);

    let none = retained_for(broker.addr, "none", "q/+", QoS::AtLeastOnce).await;
    assert!(none.is_empty(), "no retained message for q/+: {none:?}");
}

#[tokio::test]
async fn retained_message_is_replaced_by_a_newer_one() {
    let broker = TestBroker::start().await;
    let mut publisher = Client::connect_v311(broker.addr, "pub").await;
    publisher
        .publish_v311("r", b"old", QoS::AtLeastOnce, true)
        .await;
    publisher
        .publish_v311("r", b"new", QoS::AtLeastOnce, true)
        .await;
    // A non-retained message leaves the retained one alone.
    publisher
        .publish_v311("r", b"live", QoS::AtLeastOnce, false)
        .await;
    assert_eq!(broker.broker().router.retained_count(), 1);
    let got = retained_for(broker.addr, "sub", "r", QoS::AtLeastOnce).await;
    assert_eq!(got.len(), 1, "only the newest retained message: {got:?}");
    assert_publish(&got[0], "r", "new", QoS::AtLeastOnce, true);
}

#[tokio::test]
async fn empty_retained_message_clears_the_topic() {
    let broker = TestBroker::start().await;
    let mut existing = Client::connect_v311(broker.addr, "existing").await;
    existing.subscribe_ok(&[("r", QoS::AtMostOnce)]).await;
    let mut publisher = Client::connect_v311(broker.addr, "pub").await;
    publisher
        .publish_v311("r", b"kept", QoS::AtLeastOnce, true)
        .await;
    publisher
        .publish_v311("r", b"", QoS::AtLeastOnce, true)
        .await;
    assert_eq!(broker.broker().router.retained_count(), 0);

    // Existing subscribers get both as normal messages.
    let p = existing.receive_v311().await;
    assert_publish(&p, "r", "kept", QoS::AtMostOnce, false);
    let p = existing.receive_v311().await;
    assert_publish(&p, "r", "", QoS::AtMostOnce, false);

    let got = retained_for(broker.addr, "sub", "r", QoS::AtLeastOnce).await;
    assert!(
        got.is_empty(),
        "nothing retained after an empty retained message: {got:?}"
    );
}

#[tokio::test]
async fn retained_message_is_delivered_at_the_lower_qos() {
    let broker = TestBroker::start().await;
    let mut publisher = Client::connect_v311(broker.addr, "pub").await;
    publisher
        .publish_v311("m/2", b"two", QoS::ExactlyOnce, true)
        .await;
    publisher
        .publish_v311("m/1", b"one", QoS::AtLeastOnce, true)
        .await;
    for (filter, sub_qos, topic, payload, delivered) in [
        ("m/2", QoS::AtLeastOnce, "m/2", "two", QoS::AtLeastOnce),
        ("m/2", QoS::AtMostOnce, "m/2", "two", QoS::AtMostOnce),
        ("m/2", QoS::ExactlyOnce, "m/2", "two", QoS::ExactlyOnce),
        ("m/1", QoS::ExactlyOnce, "m/1", "one", QoS::AtLeastOnce),
    ] {
        let got = retained_for(broker.addr, "sub", filter, sub_qos).await;
        assert_eq!(got.len(), 1, "{filter} at {sub_qos:?}: {got:?}");
        assert_publish(&got[0], topic, payload, delivered, true);
    }
}

// ---------------------------------------------------------------------------------------
// Will
// ---------------------------------------------------------------------------------------

/// A client subscribed to `will/#` at QoS 2.
async fn will_watcher(addr: SocketAddr) -> Client {
    let mut watcher = Client::connect_v311(addr, "watcher").await;
    watcher.subscribe_ok(&[("will/#", QoS::ExactlyOnce)]).await;
    watcher
}

#[tokio::test]
async fn will_is_published_when_the_socket_closes_without_disconnect() {
    let broker = TestBroker::start().await;
    let mut watcher = will_watcher(broker.addr).await;
    let (c, _) = Client::connect_accepted(
        broker.addr,
        with_will("w", "will/w", "lost", QoS::AtLeastOnce, false),
    )
    .await;
    drop(c);
    let will = watcher.receive_v311().await;
    assert_publish(&will, "will/w", "lost", QoS::AtLeastOnce, false);
}

#[tokio::test]
async fn will_is_published_on_a_protocol_violation() {
    let broker = TestBroker::start().await;
    let mut watcher = will_watcher(broker.addr).await;
    let (mut c, _) = Client::connect_accepted(
        broker.addr,
        with_will("w", "will/w", "violated", QoS::AtMostOnce, false),
    )
    .await;
    c.send_raw(&[0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01])
        .await; // PUBLISH QoS 3
    c.expect_closed(WAIT).await;
    let will = watcher.receive_v311().await;
    assert_publish(&will, "will/w", "violated", QoS::AtMostOnce, false);
}

#[tokio::test]
async fn will_is_not_published_after_disconnect() {
    let broker = TestBroker::start().await;
    let mut watcher = will_watcher(broker.addr).await;
    let (c, _) = Client::connect_accepted(
        broker.addr,
        with_will("w", "will/w", "unwanted", QoS::AtLeastOnce, true),
    )
    .await;
    c.disconnect().await;
    watcher.expect_quiet("after a DISCONNECT (no will)").await;
    assert_eq!(
        broker.broker().router.retained_count(),
        0,
        "no retained will"
    );
}

#[tokio::test]
async fn will_qos_and_retain_are_honoured() {
    let broker = TestBroker::start().await;
    let mut watcher = will_watcher(broker.addr).await;
    let (c, _) = Client::connect_accepted(
        broker.addr,
        with_will("w", "will/r", "retained will", QoS::ExactlyOnce, true),
    )
    .await;
    drop(c);
    let will = watcher.receive_v311().await;
    assert_publish(&will, "will/r", "retained will", QoS::ExactlyOnce, false);
    assert_eq!(broker.broker().router.retained_count(), 1);

    let later = retained_for(broker.addr, "later", "will/+", QoS::AtLeastOnce).await;
    assert_eq!(later.len(), 1, "the retained will: {later:?}");
    assert_publish(&later[0], "will/r", "retained will", QoS::AtLeastOnce, true);
}

// ---------------------------------------------------------------------------------------
// Malformed input and protocol violations
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn subscribe_with_flags_0_closes_the_connection() {
    // SUBSCRIBE must have flags 0b0010.
    assert_closes_only_that_connection(&[0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00], |_| {})
        .await;
}

#[tokio::test]
async fn publish_with_qos_3_closes_the_connection() {
    assert_closes_only_that_connection(&[0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01], |_| {}).await;
}

#[tokio::test]
async fn remaining_length_of_5_bytes_closes_the_connection() {
    assert_closes_only_that_connection(&[0x30, 0x80, 0x80, 0x80, 0x80, 0x01], |_| {}).await;
}

#[tokio::test]
async fn invalid_utf8_in_a_topic_closes_the_connection() {
    assert_closes_only_that_connection(&[0x30, 0x05, 0x00, 0x02, 0xC3, 0x28, b'x'], |_| {}).await;
}

#[tokio::test]
async fn nul_character_in_a_topic_closes_the_connection() {
    assert_closes_only_that_connection(&[0x30, 0x05, 0x00, 0x02, b'a', 0x00, b'x'], |_| {}).await;
}

#[tokio::test]
async fn wildcard_in_a_publish_topic_closes_the_connection() {
    assert_closes_only_that_connection(&[0x30, 0x06, 0x00, 0x03, b'a', b'/', b'+', b'x'], |_| {})
        .await;
    assert_closes_only_that_connection(&[0x30, 0x06, 0x00, 0x03, b'a', b'/', b'#', b'x'], |_| {})
        .await;
}

#[tokio::test]
async fn packet_id_0_on_a_qos1_publish_closes_the_connection() {
    assert_closes_only_that_connection(&[0x32, 0x06, 0x00, 0x01, b'a', 0x00, 0x00, b'x'], |_| {})
        .await;
}

#[tokio::test]
async fn oversized_packet_is_refused_from_its_fixed_header() {
    // PUBLISH announcing 10,000 bytes (remaining length 0x90 0x4E); the body never comes.
    assert_closes_only_that_connection(&[0x30, 0x90, 0x4E], |cfg| cfg.mqtt.max_packet_size = 1024)
        .await;
}

#[tokio::test]
async fn max_packet_size_counts_the_whole_packet() {
    let broker = TestBroker::with(|cfg| cfg.mqtt.max_packet_size = 1024).await;
    let mut sub = Client::connect_v311(broker.addr, "sub").await;
    sub.subscribe_ok(&[("big", QoS::AtMostOnce)]).await;
    let mut publisher = Client::connect_v311(broker.addr, "pub").await;
    // 1 + 2 (remaining length) + 2 + 3 ("big") + payload.
    let payload = vec![b'x'; 1024 - 8];
    let packet = Packet::Publish(publish_packet("big", &payload, QoS::AtMostOnce, false, 0));
    assert_eq!(encode(&packet).len(), 1024);
    publisher.send(packet).await;
    let p = sub.expect_publish().await;
    assert_eq!(
        p.payload.len(),
        payload.len(),
        "a 1024-byte packet is accepted"
    );

    let payload = vec![b'x'; 1024 - 7];
    publisher
        .send(Packet::Publish(publish_packet(
            "big",
            &payload,
            QoS::AtMostOnce,
            false,
            0,
        )))
        .await;
    publisher.expect_closed(WAIT).await;
    sub.expect_quiet("after a refused 1025-byte packet").await;
}

#[tokio::test]
async fn client_sending_connack_is_disconnected() {
    assert_closes_only_that_connection(&[0x20, 0x02, 0x00, 0x00], |_| {}).await;
}

#[tokio::test]
async fn client_sending_suback_is_disconnected() {
    assert_closes_only_that_connection(&[0x90, 0x03, 0x00, 0x01, 0x00], |_| {}).await;
}

/// xorshift64*: reproducible noise without a dependency.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// What one garbage connection sends: noise, sometimes after a valid start.
fn garbage(i: u64) -> Vec<u8> {
    let mut noise = Noise(0x9E37_79B9_7F4A_7C15 ^ (i + 1).wrapping_mul(0xFF51_AFD7_ED55_8CCD));
    let len = 1 + (noise.next() % 300) as usize;
    let mut out = match i % 4 {
        0 => Vec::new(),
        // A valid CONNECT first, so the noise reaches the connected state.
        1 => encode(&Packet::Connect(Box::new(connect_v311(&format!("g{i}"))))).to_vec(),
        // A plausible packet type with random flags and length.
        2 => vec![((1 + noise.next() % 14) << 4) as u8 | (noise.next() % 16) as u8],
        _ => {
            let mut v = encode(&Packet::Connect(Box::new(persistent(&format!("g{i}"))))).to_vec();
            v.extend_from_slice(&encode(&Packet::Subscribe(Subscribe {
                pkid: 1,
                filters: vec![SubscribeFilter {
                    filter: ByteStr::from("#"),
                    options: SubOptions::default(),
                }],
                properties: Properties::default(),
            })));
            v
        }
    };
    out.extend(noise.bytes(len));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_garbage_connections_do_not_disturb_others() {
    let broker = TestBroker::with(|cfg| cfg.mqtt.connect_timeout = 1).await;
    let addr = broker.addr;
    let mut sub = Client::connect_v311(addr, "live-sub").await;
    sub.subscribe_ok(&[("live/t", QoS::AtLeastOnce)]).await;
    let mut publisher = Client::connect_v311(addr, "live-pub").await;

    let attackers: Vec<_> = (0..200u64)
        .map(|i| {
            tokio::spawn(async move {
                let Ok(mut stream) = TcpStream::connect(addr).await else {
                    panic!("garbage connection {i} refused");
                };
                let _ = stream.write_all(&garbage(i)).await;
                // Read whatever comes until the broker closes, or give up and drop.
                let mut sink = [0u8; 1024];
                let until = tokio::time::Instant::now() + Duration::from_millis(1500);
                while let Ok(Ok(n)) = tokio::time::timeout_at(until, stream.read(&mut sink)).await {
                    if n == 0 {
                        break;
                    }
                }
            })
        })
        .collect();

    for i in 0..50 {
        let payload = format!("live {i}");
        publisher
            .publish_v311("live/t", payload.as_bytes(), QoS::AtLeastOnce, false)
            .await;
        let p = sub.receive_v311().await;
        assert_publish(&p, "live/t", &payload, QoS::AtLeastOnce, false);
    }
    for a in attackers {
        a.await.expect("garbage connection task");
    }

    let mut newcomer = Client::connect_v311(addr, "newcomer").await;
    newcomer
        .publish_v311("live/t", b"after", QoS::AtLeastOnce, false)
        .await;
    let p = sub.receive_v311().await;
    assert_publish(&p, "live/t", "after", QoS::AtLeastOnce, false);
    sub.expect_quiet("after the garbage").await;

    // The clean sessions of the closed garbage connections end; the 50 persistent ones
    // (every fourth connection made one before its noise) stay, beside the 3 live ones.
    let deadline = Instant::now() + WAIT;
    loop {
        let sessions = broker.broker().session_count();
        if sessions == 3 + 50 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{sessions} sessions left after the garbage connections closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Slow subscriber
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_qos0_subscriber_does_not_block_the_publisher_or_fast_subscribers() {
    const MESSAGES: usize = 20_000;
    const SIZE: usize = 1024;
    let broker = TestBroker::start().await;
    let addr = broker.addr;

    let mut slow = Client::connect_v311(addr, "slow").await;
    slow.subscribe_ok(&[("flood", QoS::AtMostOnce)]).await;
    // `slow` is never read again.

    let mut fast = Client::connect_v311(addr, "fast").await;
    fast.subscribe_ok(&[("flood", QoS::AtMostOnce)]).await;
    // How far the fast subscriber got: the publisher stays at most one chunk ahead of it,
    // so that the fast one's own queue never overflows however busy the machine is, while
    // the slow one, which never reads, falls behind without holding anyone up.
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = progress.clone();
    // Reads until the last message or until the stream dries up; returns how many
    // arrived and the first gap in the sequence, if any.
    let fast_reader = tokio::spawn(async move {
        let mut received = 0;
        let mut first_gap = None;
        let mut next = 0;
        while let Some(packet) = fast.recv(Duration::from_secs(3)).await {
            let Packet::Publish(p) = packet else {
                panic!("fast subscriber: unexpected {packet:?}");
            };
            assert_eq!(p.payload.len(), SIZE, "payload size");
            let index = u64::from_be_bytes(p.payload[..8].try_into().expect("8 bytes"));
            if index != next && first_gap.is_none() {
                first_gap = Some((next, index));
            }
            received += 1;
            seen.store(received, std::sync::atomic::Ordering::Relaxed);
            next = index + 1;
            if index == MESSAGES as u64 - 1 {
                break;
            }
        }
        (received, first_gap, fast)
    });

    const CHUNK: usize = 500;
    let mut publisher = Client::connect_v311(addr, "pub").await;
    let mut payload = vec![0u8; SIZE];
    let start = Instant::now();
    for chunk in 0..MESSAGES / CHUNK {
        let mut flood = BytesMut::new();
        for i in chunk * CHUNK..(chunk + 1) * CHUNK {
            payload[..8].copy_from_slice(&(i as u64).to_be_bytes());
            let packet = publish_packet("flood", &payload, QoS::AtMostOnce, false, 0);
            protocol::encode(&Packet::Publish(packet), Protocol::V311, &mut flood).unwrap();
        }
        let behind = (chunk * CHUNK).saturating_sub(CHUNK);
        while progress.load(std::sync::atomic::Ordering::Relaxed) < behind {
            tokio::time::sleep(Duration::from_millis(1)).await;
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the fast subscriber stalled"
            );
        }
        publisher.send_raw(&flood).await;
    }
    publisher.barrier().await;
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "the publisher was held up for {took:?} by a slow subscriber"
    );

    let (received, first_gap, mut fast) =
        tokio::time::timeout(Duration::from_secs(20), fast_reader)
            .await
            .expect("fast subscriber finished in time")
            .expect("fast subscriber task");
    let b = broker.broker();
    let slow_session = b.session("slow").expect("slow session");
    let fast_session = b.session("fast").expect("fast session");
    let gap = first_gap.map_or(String::new(), |(expected, got)| {
        format!(" (first gap: #{got} after #{})", expected.wrapping_sub(1))
    });
    assert!(
        received == MESSAGES && first_gap.is_none(),
        "the fast subscriber received {received} of {MESSAGES} messages{gap}; the broker \
         dropped {} for it ({} for the slow one) while the publisher's burst took {took:?}",
        fast_session.dropped(),
        slow_session.dropped()
    );
    fast.expect_quiet("after all messages").await;
    assert!(
        slow_session.dropped() > 0,
        "the slow subscriber's queue overflowed"
    );
    drop(slow);
}

// ---------------------------------------------------------------------------------------
// Scripted flows with rumqttc (MQTT 3.1.1)
// ---------------------------------------------------------------------------------------

/// A rumqttc client whose event loop runs in a task, forwarding incoming packets.
struct Rumqtt {
    client: rumqttc::AsyncClient,
    incoming: tokio::sync::mpsc::UnboundedReceiver<rumqttc::Packet>,
    task: tokio::task::JoinHandle<()>,
}

impl Rumqtt {
    async fn connect(port: u16, id: &str, tweak: impl FnOnce(&mut rumqttc::MqttOptions)) -> Rumqtt {
        let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(5));
        tweak(&mut options);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 100);
        let (tx, mut incoming) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            // No reconnection: the first error ends the client.
            while let Ok(event) = eventloop.poll().await {
                if let rumqttc::Event::Incoming(packet) = event {
                    if tx.send(packet).is_err() {
                        return;
                    }
                }
            }
        });
        match tokio::time::timeout(WAIT, incoming.recv()).await {
            Ok(Some(rumqttc::Packet::ConnAck(ack))) => {
                assert_eq!(
                    ack.code,
                    rumqttc::ConnectReturnCode::Success,
                    "{id}: CONNACK"
                )
            }
            other => panic!("{id}: expected CONNACK, got {other:?}"),
        }
        Rumqtt {
            client,
            incoming,
            task,
        }
    }

    async fn next(&mut self, what: &str) -> rumqttc::Packet {
        match tokio::time::timeout(WAIT, self.incoming.recv()).await {
            Ok(Some(p)) => p,
            other => panic!("expected {what}, got {other:?}"),
        }
    }

    async fn subscribe(&mut self, filter: &str, qos: rumqttc::QoS) {
        self.client.subscribe(filter, qos).await.expect("subscribe");
        match self.next("SUBACK").await {
            rumqttc::Packet::SubAck(a) => assert_eq!(
                a.return_codes,
                [rumqttc::SubscribeReasonCode::Success(qos)],
                "SUBACK"
            ),
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    async fn next_publish(&mut self) -> rumqttc::Publish {
        loop {
            match self.next("PUBLISH").await {
                rumqttc::Packet::Publish(p) => return p,
                rumqttc::Packet::PingResp => {}
                other => panic!("expected PUBLISH, got {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn rumqttc_qos1_and_qos2_messages_arrive_in_order() {
    let broker = TestBroker::start().await;
    let mut sub = Rumqtt::connect(broker.port(), "rsub", |_| {}).await;
    sub.subscribe("rq/#", rumqttc::QoS::ExactlyOnce).await;
    let publisher = Rumqtt::connect(broker.port(), "rpub", |_| {}).await;
    for i in 0..20 {
        let qos = if i % 2 == 0 {
            rumqttc::QoS::AtLeastOnce
        } else {
            rumqttc::QoS::ExactlyOnce
        };
        publisher
            .client
            .publish(format!("rq/{}", i % 2), qos, false, format!("m{i}"))
            .await
            .expect("publish");
    }
    let mut seen = [Vec::new(), Vec::new()];
    for _ in 0..20 {
        let p = sub.next_publish().await;
        let i: usize = text(&p.payload)[1..].parse().expect("payload m<i>");
        assert_eq!(p.topic, format!("rq/{}", i % 2));
        let expected_qos = if i.is_multiple_of(2) {
            rumqttc::QoS::AtLeastOnce
        } else {
            rumqttc::QoS::ExactlyOnce
        };
        assert_eq!(
            (p.qos, p.retain, p.dup),
            (expected_qos, false, false),
            "{p:?}"
        );
        seen[i % 2].push(i);
    }
    assert_eq!(
        seen[0],
        (0..20).step_by(2).collect::<Vec<_>>(),
        "QoS 1 order"
    );
    assert_eq!(
        seen[1],
        (1..20).step_by(2).collect::<Vec<_>>(),
        "QoS 2 order"
    );
    publisher.task.abort();
    sub.task.abort();
}

#[tokio::test]
async fn rumqttc_last_will_is_published_when_a_client_vanishes() {
    let broker = TestBroker::start().await;
    let mut watcher = Rumqtt::connect(broker.port(), "rwatch", |_| {}).await;
    watcher
        .subscribe("rwill/#", rumqttc::QoS::AtLeastOnce)
        .await;
    let doomed = Rumqtt::connect(broker.port(), "rdoomed", |o| {
        o.set_last_will(rumqttc::LastWill::new(
            "rwill/doomed",
            "vanished",
            rumqttc::QoS::AtLeastOnce,
            false,
        ));
    })
    .await;
    // Dropping the event loop drops the socket without a DISCONNECT.
    doomed.task.abort();
    let will = watcher.next_publish().await;
    assert_eq!(
        (
            &*will.topic,
            text(&will.payload).as_str(),
            will.qos,
            will.retain
        ),
        ("rwill/doomed", "vanished", rumqttc::QoS::AtLeastOnce, false)
    );
    watcher.task.abort();
}
