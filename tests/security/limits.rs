//! The per-client and per-broker limits of `[limits]` and `[session]`, each at its edge:
//! max_connections, message_size_limit, max_client_id_length, max_subscriptions,
//! publish_rate / publish_bytes_rate (on tokio's paused clock), max_queued_bytes and
//! persistent_client_expiration (paused clock).

use crate::common::client::{
    connect_expiry, connect_v311, connect_v5, encode, plain, publish_packet, Client, WAIT,
};
use crate::common::TestBroker;
use crate::support::*;
use bytes::{Bytes, BytesMut};
use std::time::Duration;
use ternmq::config::{Listener, ListenerKind};
use ternmq::protocol::{ByteStr, Connect, Packet, Properties, Protocol, QoS, ReasonCode, Will};
use tokio::time::Instant;

/// Over `max_connections` (global, or the listener's own), a CONNECT is answered at once
/// with 0x97 (5.0) or return code 3 (3.1.1), not left to the connect timeout; a place
/// freed is taken again.
#[tokio::test]
async fn max_connections_refuse_at_once_with_0x97_or_code_3() {
    let b = TestBroker::with(|c| {
        c.mqtt.connect_timeout = 600;
        c.limits.max_connections = 4;
        c.listeners.push(Listener {
            allow_anonymous: true,
            max_connections: 1,
            ..Listener::new(ListenerKind::Tcp, "127.0.0.1:0".parse().unwrap())
        });
    })
    .await;
    let second = b.server.as_ref().unwrap().local_addrs()[1].1;
    let c1 = Client::connect_v5(b.addr, "c1").await;
    let _c2 = Client::connect_v311(b.addr, "c2").await;
    let _c3 = Client::connect_v5(second, "c3").await;
    // The second listener holds its one connection.
    connect_expecting(second, connect_v5("c4"), ReasonCode::QuotaExceeded)
        .await
        .expect_closed(WAIT)
        .await;
    crate::wait_for("c4 to be gone", || b.broker().connection_count() == 3).await;
    let _c5 = Client::connect_v311(b.addr, "c5").await;
    // Four in all: the global limit.
    for (protocol, code) in [
        (Protocol::V5, ReasonCode::QuotaExceeded),
        // 3.1.1 return code 3, "server unavailable".
        (Protocol::V311, ReasonCode::ServerUnavailable),
    ] {
        let connect = Connect {
            protocol,
            ..connect_v5("one-too-many")
        };
        connect_expecting(b.addr, connect, code)
            .await
            .expect_closed(WAIT)
            .await;
    }
    crate::wait_for("the refused to be gone", || {
        b.broker().connection_count() == 4
    })
    .await;
    c1.disconnect().await;
    crate::wait_for("c1 to be gone", || b.broker().connection_count() == 3).await;
    Client::connect_v5(b.addr, "c6").await;
}

/// `message_size_limit`: a larger payload is dropped (QoS 0), refused with 0x97 (5.0 QoS
/// 1/2: 5.0 has no "too large" code for acknowledgements) or, in 3.1.1, which has no way
/// to refuse, the client is disconnected without an acknowledgement. A larger will
/// refuses the CONNECT.
#[tokio::test]
async fn message_size_limit_drops_refuses_or_disconnects() {
    const LIMIT: usize = 1000;
    let b = TestBroker::with(|c| c.limits.message_size_limit = LIMIT).await;
    let mut sub = Client::connect_v5(b.addr, "sub").await;
    sub.subscribe("big/#", QoS::ExactlyOnce).await;
    let over = vec![b'x'; LIMIT + 1];
    let at = vec![b'x'; LIMIT];

    let mut c5 = Client::connect_v5(b.addr, "pub-5").await;
    c5.publish_expect(plain("big/q0", &over, QoS::AtMostOnce), ReasonCode::Success)
        .await;
    c5.publish_expect(
        plain("big/q1", &over, QoS::AtLeastOnce),
        ReasonCode::QuotaExceeded,
    )
    .await;
    c5.publish_expect(
        plain("big/q2", &over, QoS::ExactlyOnce),
        ReasonCode::QuotaExceeded,
    )
    .await;
    c5.publish_expect(
        plain("big/at-limit", &at, QoS::AtLeastOnce),
        ReasonCode::Success,
    )
    .await;
    let got = sub.drain_publishes().await;
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].topic.as_ref(), got[0].payload.len()),
        ("big/at-limit", LIMIT)
    );

    // 3.1.1 QoS 1: closed, and no PUBACK comes first.
    let mut c3 = Client::connect_v311(b.addr, "pub-3").await;
    c3.send(Packet::Publish(publish_packet(
        "big/v3",
        &over,
        QoS::AtLeastOnce,
        false,
        1,
    )))
    .await;
    let (packets, _) = c3.read_to_end().await;
    assert!(packets.is_empty(), "nothing before the close: {packets:?}");
    sub.expect_quiet("after the refused messages").await;

    // A will over the limit: CONNACK 0x95 (5.0), 3 (3.1.1).
    for (protocol, code) in [
        (Protocol::V5, ReasonCode::PacketTooLarge),
        (Protocol::V311, ReasonCode::ServerUnavailable),
    ] {
        let connect = Connect {
            protocol,
            will: Some(Will {
                topic: ByteStr::from("big/will"),
                payload: Bytes::from(over.clone()),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: Properties::default(),
            }),
            ..connect_v5("big-will")
        };
        connect_expecting(b.addr, connect, code).await;
    }
}

/// `max_client_id_length`: a longer id is refused as not valid (0x85 / code 2).
#[tokio::test]
async fn max_client_id_length_refuses_longer_ids() {
    let b = TestBroker::with(|c| c.limits.max_client_id_length = 8).await;
    Client::connect_v5(b.addr, "12345678").await;
    Client::connect_v311(b.addr, "abcdefgh").await;
    for protocol in [Protocol::V5, Protocol::V311] {
        let connect = Connect {
            protocol,
            ..connect_v5("123456789")
        };
        connect_expecting(b.addr, connect, ReasonCode::ClientIdentifierNotValid).await;
    }
}

/// `max_subscriptions`: past it a filter gets 0x97 (5.0) / 0x80 (3.1.1); subscribing
/// again to a filter the client has only replaces it, and unsubscribing frees a place.
#[tokio::test]
async fn max_subscriptions_per_client() {
    let b = TestBroker::with(|c| c.limits.max_subscriptions = 2).await;
    let mut c5 = Client::connect_v5(b.addr, "c5").await;
    assert_eq!(
        c5.subscribe_qos(&[
            ("a", QoS::AtLeastOnce),
            ("b", QoS::AtLeastOnce),
            ("c", QoS::AtLeastOnce)
        ])
        .await,
        [1, 1, 0x97]
    );
    assert_eq!(c5.subscribe_qos(&[("a", QoS::ExactlyOnce)]).await, [2]);
    c5.unsubscribe(&["b"]).await;
    assert_eq!(
        c5.subscribe_qos(&[("c", QoS::AtLeastOnce), ("d", QoS::AtMostOnce)])
            .await,
        [1, 0x97]
    );
    let mut c3 = Client::connect_v311(b.addr, "c3").await;
    assert_eq!(
        c3.subscribe_qos(&[
            ("a", QoS::AtLeastOnce),
            ("b", QoS::AtLeastOnce),
            ("c", QoS::AtLeastOnce)
        ])
        .await,
        [1, 1, 0x80]
    );
}

/// Sends `count` QoS 1 PUBLISHes of `payload` bytes in one write, and returns when each
/// PUBACK came, since the write.
async fn pipelined_acks(c: &mut Client, count: u16, payload: usize) -> Vec<Duration> {
    let mut bytes = BytesMut::new();
    for pkid in 1..=count {
        let p = publish_packet(
            "rate/x",
            &vec![b'p'; payload],
            QoS::AtLeastOnce,
            false,
            pkid,
        );
        bytes.extend_from_slice(&encode(&Packet::Publish(p), Protocol::V5));
    }
    let t0 = Instant::now();
    c.send_raw(&bytes).await;
    let mut times = Vec::new();
    for pkid in 1..=count {
        c.wait_for(
            "PUBACK",
            |p| matches!(p, Packet::PubAck(a) if a.pkid == pkid),
        )
        .await;
        times.push(t0.elapsed());
    }
    times
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// `publish_rate`: R messages a second after a burst of `publish_burst` seconds' worth;
/// a client that sends faster (here: 50 at once) is read at that pace (its PUBACKs show
/// when each was read), so N messages take (N − R × burst) / R seconds.
#[tokio::test(start_paused = true)]
async fn publish_rate_reads_a_pipelined_burst_at_the_rate() {
    let b = TestBroker::in_memory(|c| {
        c.limits.publish_rate = 10;
        c.limits.publish_burst = 2;
        c.limits.message_size_limit = 100;
    });
    let paced = |times: &[Duration]| {
        // 20 at once (the burst), then one every 100 ms: the N-th at (N − 20) / 10 s.
        let expected: Vec<u128> = (1..=times.len() as u128)
            .map(|n| n.saturating_sub(20) * 100)
            .collect();
        assert_eq!(times.iter().map(|t| ms(*t)).collect::<Vec<_>>(), expected);
    };
    let mut c = Client::accepted(b.target(), connect_v5("fast")).await.0;
    paced(&pipelined_acks(&mut c, 50, 10).await);
    // The pause is not counted against the keep-alive: the client is still connected.
    c.expect_quiet("after the burst").await;
    // Refused PUBLISHes (here over message_size_limit: PUBACK 0x97) count too.
    let mut c = Client::accepted(b.target(), connect_v5("refused")).await.0;
    paced(&pipelined_acks(&mut c, 25, 200).await);
}

/// `publish_bytes_rate`: a message is read while the client's byte allowance is not
/// overdrawn; its size is known only once read, so the N-th message is read once the
/// first N − 1 are paid for beyond the burst: ((N − 1) × size − rate × burst) / rate.
#[tokio::test(start_paused = true)]
async fn publish_bytes_rate_paces_by_payload_bytes() {
    let b = TestBroker::in_memory(|c| {
        c.limits.publish_bytes_rate = 1000;
        c.limits.publish_burst = 1;
    });
    let mut c = Client::accepted(b.target(), connect_v5("bulky")).await.0;
    let times = pipelined_acks(&mut c, 12, 250).await;
    let expected: Vec<u128> = (1..=12u128)
        .map(|n| ((n - 1) * 250).saturating_sub(1000))
        .collect();
    assert_eq!(times.iter().map(|t| ms(*t)).collect::<Vec<_>>(), expected);

    // Large messages: 2000 bytes at 1000 bytes/s pause the client for 1 s, then 2 s;
    // its keep-alive (1.5 s) does not run while its packets wait on the broker.
    let connect = Connect {
        keep_alive: 1,
        ..connect_v5("slow")
    };
    let mut c = Client::accepted(b.target(), connect).await.0;
    let times = pipelined_acks(&mut c, 3, 2000).await;
    assert_eq!(
        times.iter().map(|t| ms(*t)).collect::<Vec<_>>(),
        [0, 1000, 3000]
    );
    c.expect_quiet("still connected").await;
}

/// `max_queued_bytes`: an offline session holds at most that many bytes of messages (each
/// counted as topic + payload + 128); later ones are dropped, as over max_queued_messages.
#[tokio::test]
async fn max_queued_bytes_bounds_an_offline_session() {
    let b = TestBroker::with(|c| c.session.max_queued_bytes = 3000).await;
    let (mut dev, _) = Client::accepted(b.addr, connect_expiry("dev", true, 600)).await;
    dev.subscribe("q/#", QoS::AtLeastOnce).await;
    dev.disconnect().await;
    let mut publisher = Client::connect_v5(b.addr, "pub").await;
    for i in 0..5 {
        // 3 + 1000 + 128 = 1131 bytes each: two fit in 3000. The others are dropped for
        // that session, not refused to the publisher (a 5.0 one learns that no session
        // took them: 0x10).
        let topic = format!("q/{i}");
        let code = publisher
            .publish(plain(&topic, &[b'x'; 1000], QoS::AtLeastOnce))
            .await;
        assert!(!code.is_error(), "{topic}: {code:?}");
    }
    let (mut dev, ack) = Client::accepted(b.addr, connect_expiry("dev", false, 600)).await;
    assert!(ack.session_present);
    let got: Vec<String> = dev
        .drain_publishes()
        .await
        .iter()
        .map(|p| p.topic.to_string())
        .collect();
    assert_eq!(got, ["q/0", "q/1"]);
}

/// `persistent_client_expiration`: a 3.x persistent session (Clean Session 0) is kept
/// offline for that long, then ends; 5.0 sessions keep the expiry they asked for.
#[tokio::test(start_paused = true)]
async fn persistent_client_expiration_ends_abandoned_3x_sessions() {
    let b = TestBroker::in_memory(|c| c.session.persistent_client_expiration = 60);
    let v3 = |clean: bool| Connect {
        clean_start: clean,
        ..connect_v311("v3-device")
    };
    let (mut c, present) = Client::connect_accepted(b.target(), v3(false)).await;
    assert!(!present);
    c.subscribe("x", QoS::AtLeastOnce).await;
    c.disconnect().await;
    let (mut c5, _) = Client::accepted(b.target(), connect_expiry("v5-device", false, 600)).await;
    c5.subscribe("x", QoS::AtLeastOnce).await;
    c5.disconnect().await;
    let t0 = Instant::now();

    crate::at(t0 + Duration::from_secs(59)).await;
    let (c, present) = Client::connect_accepted(b.target(), v3(false)).await;
    assert!(present, "kept for 59 s");
    c.disconnect().await;
    let t1 = Instant::now();
    crate::at(t1 + Duration::from_secs(61)).await;
    let (_, present) = Client::connect_accepted(b.target(), v3(false)).await;
    assert!(!present, "ended 60 s after its client left");
    let (_, ack) = Client::accepted(b.target(), connect_expiry("v5-device", false, 600)).await;
    assert!(
        ack.session_present,
        "a 5.0 session keeps its own expiry ({:?} after)",
        t0.elapsed()
    );
}
