//! MQTT 5.0 behaviour of the broker, end to end over TCP, checked against the OASIS MQTT
//! 5.0 standard.
//!
//! Most tests drive the broker with the raw client of `common::client`, built on the
//! crate's own codec, so that every packet, reason code and property sent and received is
//! explicit.
//! A request/response flow uses `rumqttc`'s v5 client, and a few tests run Debian's
//! `mosquitto_pub` / `mosquitto_sub` with `-V mqttv5`. Each test starts its own broker, so
//! tests run in parallel; every wait is bounded. What happens at a given time (keep-alive,
//! session expiry, will delay, message expiry) is tested on tokio's paused clock, in
//! tests/timing.rs.
//!
//! Waiting for "nothing more" is a ping round trip (`Client::ping`, `expect_quiet`,
//! `drain_publishes`); the module doc of `common::client` says why that is enough.
// A test reads best as one sequence of steps, however long.
#![allow(clippy::too_many_lines)]

mod common;

use bytes::{Bytes, BytesMut};
use common::client::{
    ack, connect_expiry, connect_v311, connect_v5, connect_with_will, eventually, expiry_session,
    filter, message, opts, plain, props_of, retained, sub_id, text, user_props, will_delay, Client,
    Event, WAIT,
};
use common::TestBroker;
use std::time::Duration;
use ternmq::protocol::{
    self, Ack, Auth, Connect, Disconnect, Packet, Properties, Protocol, Publish, QoS, ReasonCode,
    SubOptions, Subscribe,
};

// =======================================================================================
// CONNACK properties
// =======================================================================================

/// By default every optional feature is announced as available, with the default limits;
/// Maximum QoS (2) and Maximum Packet Size (none) are left out, which means exactly that.
#[tokio::test]
async fn connack_announces_default_capabilities() {
    let b = TestBroker::start().await;
    let (_c, ack) = Client::connect_with(b.addr, connect_v5("defaults")).await;
    assert_eq!(ack.code, ReasonCode::Success);
    assert!(!ack.session_present);
    let expected = Properties {
        receive_maximum: Some(20),
        topic_alias_maximum: Some(10),
        retain_available: Some(1),
        wildcard_subscription_available: Some(1),
        subscription_identifiers_available: Some(1),
        shared_subscription_available: Some(1),
        ..Properties::default()
    };
    assert_eq!(
        ack.properties, expected,
        "CONNACK properties with the defaults"
    );
}

/// Every limit and capability of the configuration is announced as configured.
#[tokio::test]
async fn connack_announces_configured_capabilities() {
    let b = TestBroker::with(|cfg| {
        cfg.mqtt.retain_available = false;
        cfg.mqtt.wildcard_subscription_available = false;
        cfg.mqtt.subscription_identifiers_available = false;
        cfg.mqtt.shared_subscription_available = false;
        cfg.mqtt.max_qos = QoS::AtLeastOnce;
        cfg.mqtt.max_packet_size = 1024;
        cfg.mqtt.topic_alias_maximum = 2;
        cfg.mqtt.receive_maximum = 5;
    })
    .await;
    let (_c, ack) = Client::accepted(b.addr, connect_v5("configured")).await;
    let expected = Properties {
        receive_maximum: Some(5),
        topic_alias_maximum: Some(2),
        maximum_qos: Some(1),
        maximum_packet_size: Some(1024),
        retain_available: Some(0),
        wildcard_subscription_available: Some(0),
        subscription_identifiers_available: Some(0),
        shared_subscription_available: Some(0),
        ..Properties::default()
    };
    assert_eq!(ack.properties, expected, "CONNACK properties as configured");
}

/// Retain Available 0: a retained PUBLISH is a 0x9A (Retain not supported) DISCONNECT
/// [MQTT-3.2.2-14], and nothing is stored.
#[tokio::test]
async fn retain_unavailable_refuses_retained_publish() {
    let b = TestBroker::with(|cfg| cfg.mqtt.retain_available = false).await;
    let mut c = Client::connect_v5(b.addr, "no-retain").await;
    c.publish_expect(
        plain("r/t", b"plain", QoS::AtLeastOnce),
        ReasonCode::NoMatchingSubscribers,
    )
    .await;
    c.send(Packet::Publish(retained("r/t", b"kept", QoS::AtMostOnce)))
        .await;
    c.expect_disconnect(ReasonCode::RetainNotSupported).await;
    assert_eq!(b.broker().router.retained_count(), 0, "nothing retained");

    // A will with Will Retain 1 is refused in the CONNACK [MQTT-3.2.2-13].
    let mut will = connect_with_will("no-retain-will", "r/w", "bye", Properties::default());
    if let Some(w) = will.will.as_mut() {
        w.retain = true;
    }
    let (mut c, ack) = Client::connect_with(b.addr, will).await;
    assert_eq!(
        ack.code,
        ReasonCode::RetainNotSupported,
        "CONNACK for a retained will"
    );
    c.expect_closed(WAIT).await;
}

/// Wildcard Subscription Available 0: wildcard filters get SUBACK 0xA2, the others are
/// granted.
#[tokio::test]
async fn wildcard_unavailable_refuses_wildcard_filters() {
    let b = TestBroker::with(|cfg| cfg.mqtt.wildcard_subscription_available = false).await;
    let mut c = Client::connect_v5(b.addr, "no-wildcards").await;
    let codes = c
        .subscribe_with(
            vec![
                filter("w/+", opts(QoS::AtLeastOnce)),
                filter("w/#", opts(QoS::AtLeastOnce)),
                filter("w/exact", opts(QoS::AtLeastOnce)),
            ],
            Properties::default(),
        )
        .await;
    assert_eq!(
        codes,
        [
            ReasonCode::WildcardSubscriptionsNotSupported,
            ReasonCode::WildcardSubscriptionsNotSupported,
            ReasonCode::GrantedQoS1
        ],
        "SUBACK reason codes"
    );
    assert_eq!(b.broker().router.subscription_count(), 1);
}

/// Shared Subscription Available 0: `$share/...` filters get SUBACK 0x9E.
#[tokio::test]
async fn shared_unavailable_refuses_shared_filters() {
    let b = TestBroker::with(|cfg| cfg.mqtt.shared_subscription_available = false).await;
    let mut c = Client::connect_v5(b.addr, "no-shared").await;
    let codes = c
        .subscribe_with(
            vec![
                filter("$share/g/s/t", opts(QoS::AtLeastOnce)),
                filter("s/t", opts(QoS::AtMostOnce)),
            ],
            Properties::default(),
        )
        .await;
    assert_eq!(
        codes,
        [
            ReasonCode::SharedSubscriptionsNotSupported,
            ReasonCode::Success
        ],
        "SUBACK reason codes"
    );
    assert_eq!(b.broker().router.subscription_count(), 1);
}

/// Subscription Identifiers Available 0: a SUBSCRIBE with one is a 0xA1 DISCONNECT.
#[tokio::test]
async fn subscription_identifiers_unavailable_disconnect() {
    let b = TestBroker::with(|cfg| cfg.mqtt.subscription_identifiers_available = false).await;
    let mut c = Client::connect_v5(b.addr, "no-sub-ids").await;
    c.subscribe("plain", QoS::AtMostOnce).await;
    c.send(Packet::Subscribe(Subscribe {
        pkid: 9,
        filters: vec![filter("with/id", opts(QoS::AtMostOnce))],
        properties: sub_id(5),
    }))
    .await;
    c.expect_disconnect(ReasonCode::SubscriptionIdentifiersNotSupported)
        .await;
}

/// Maximum QoS 1: announced, subscriptions are granted at most QoS 1, a QoS 2 PUBLISH is a
/// 0x9B DISCONNECT [MQTT-3.2.2-11], and a will at QoS 2 is refused in the CONNACK
/// [MQTT-3.2.2-12].
#[tokio::test]
async fn maximum_qos_1_is_announced_and_enforced() {
    let b = TestBroker::with(|cfg| cfg.mqtt.max_qos = QoS::AtLeastOnce).await;
    let (mut sub, ack) = Client::accepted(b.addr, connect_v5("mq-sub")).await;
    assert_eq!(ack.properties.maximum_qos, Some(1), "CONNACK Maximum QoS");
    let codes = sub
        .subscribe_with(
            vec![filter("mq/t", opts(QoS::ExactlyOnce))],
            Properties::default(),
        )
        .await;
    assert_eq!(
        codes,
        [ReasonCode::GrantedQoS1],
        "QoS 2 subscription granted QoS 1"
    );

    let mut publisher = Client::connect_v5(b.addr, "mq-pub").await;
    publisher
        .publish_expect(plain("mq/t", b"one", QoS::AtLeastOnce), ReasonCode::Success)
        .await;
    let p = sub.receive().await;
    assert_eq!((p.qos, text(&p.payload)), (QoS::AtLeastOnce, "one".into()));

    publisher
        .send(Packet::Publish(Publish {
            pkid: 77,
            ..plain("mq/t", b"two", QoS::ExactlyOnce)
        }))
        .await;
    publisher
        .expect_disconnect(ReasonCode::QoSNotSupported)
        .await;
    sub.expect_quiet("after the refused QoS 2 PUBLISH").await;

    let mut will = connect_with_will("mq-will", "mq/t", "bye", Properties::default());
    if let Some(w) = will.will.as_mut() {
        w.qos = QoS::ExactlyOnce;
    }
    let (mut c, ack) = Client::connect_with(b.addr, will).await;
    assert_eq!(
        ack.code,
        ReasonCode::QoSNotSupported,
        "CONNACK for a QoS 2 will"
    );
    c.expect_closed(WAIT).await;
}

/// Maximum Packet Size, when configured, is announced, and a larger packet is a 0x95
/// DISCONNECT.
#[tokio::test]
async fn maximum_packet_size_is_announced_and_enforced() {
    let b = TestBroker::with(|cfg| cfg.mqtt.max_packet_size = 128).await;
    let mut sub = Client::connect_v5(b.addr, "mps-sub").await;
    sub.subscribe("big/#", QoS::AtMostOnce).await;
    let (mut c, ack) = Client::accepted(b.addr, connect_v5("mps")).await;
    assert_eq!(
        ack.properties.maximum_packet_size,
        Some(128),
        "CONNACK Maximum Packet Size"
    );
    c.publish_expect(
        plain("big/small", &[b'x'; 64], QoS::AtLeastOnce),
        ReasonCode::Success,
    )
    .await;
    c.send(Packet::Publish(plain(
        "big/large",
        &[b'x'; 200],
        QoS::AtMostOnce,
    )))
    .await;
    c.expect_disconnect(ReasonCode::PacketTooLarge).await;
    let got = sub.drain_publishes().await;
    let topics: Vec<&str> = got.iter().map(|p| &*p.topic).collect();
    assert_eq!(
        topics,
        ["big/small"],
        "only the message within the limit is routed"
    );
}

/// Response Information (`response_information`, `{client_id}` replaced) is returned
/// only to a client that asks for it with Request Response Information = 1, and only
/// when configured.
#[tokio::test]
async fn response_information_is_returned_only_when_asked() {
    let b = TestBroker::with(|cfg| {
        cfg.mqtt.response_information = Some("response/{client_id}/".into());
    })
    .await;
    let asking = |id: &str, request: Option<u8>| Connect {
        properties: Properties {
            request_response_information: request,
            ..Properties::default()
        },
        ..connect_v5(id)
    };
    for (id, request, want) in [
        ("asker", Some(1), Some("response/asker/")),
        ("declines", Some(0), None),
        ("silent", None, None),
    ] {
        let (_c, ack) = Client::accepted(b.addr, asking(id, request)).await;
        assert_eq!(
            ack.properties.response_information.as_deref(),
            want,
            "{id}: Request Response Information {request:?}"
        );
    }
    let unset = TestBroker::start().await;
    let (_c, ack) = Client::accepted(unset.addr, asking("asker", Some(1))).await;
    assert_eq!(ack.properties.response_information, None, "not configured");
}

/// An empty client id gets an Assigned Client Identifier, under which the session is
/// known [MQTT-3.2.2-16].
#[tokio::test]
async fn empty_client_id_gets_assigned_identifier() {
    let b = TestBroker::start().await;
    let (_c, ack) = Client::accepted(b.addr, connect_v5("")).await;
    let assigned = ack
        .properties
        .assigned_client_identifier
        .expect("CONNACK carries an Assigned Client Identifier");
    assert!(!assigned.is_empty(), "the assigned identifier is not empty");
    assert!(
        b.broker().session(&assigned).is_some(),
        "the session is known by the assigned identifier {assigned:?}"
    );
    let (_d, other) = Client::accepted(b.addr, connect_v5("")).await;
    assert_ne!(
        other.properties.assigned_client_identifier,
        Some(assigned),
        "each client gets its own identifier"
    );
}

/// With max_keepalive 5, a client asking for no keep-alive or a longer one is told 5 in
/// Server Keep Alive; a client within the limit keeps its own (no property).
#[tokio::test]
async fn server_keep_alive_caps_the_client_keep_alive() {
    let b = TestBroker::with(|cfg| cfg.mqtt.max_keepalive = 5).await;
    for (asked, told) in [(0, Some(5)), (60, Some(5)), (5, None), (3, None)] {
        let connect = Connect {
            keep_alive: asked,
            ..connect_v5(&format!("ka-{asked}"))
        };
        let (_c, ack) = Client::accepted(b.addr, connect).await;
        assert_eq!(
            ack.properties.server_keep_alive, told,
            "Server Keep Alive for a client keep-alive of {asked}"
        );
    }
}

// =======================================================================================
// Reason codes
// =======================================================================================

/// PUBACK / PUBREC 0x10 when nobody is subscribed, 0x00 otherwise.
#[tokio::test]
async fn ack_reports_no_matching_subscribers() {
    let b = TestBroker::start().await;
    let mut c = Client::connect_v5(b.addr, "nms").await;
    c.publish_expect(
        plain("nobody", b"x", QoS::AtLeastOnce),
        ReasonCode::NoMatchingSubscribers,
    )
    .await;
    c.publish_expect(
        plain("nobody", b"x", QoS::ExactlyOnce),
        ReasonCode::NoMatchingSubscribers,
    )
    .await;
    let mut sub = Client::connect_v5(b.addr, "nms-sub").await;
    sub.subscribe("somebody", QoS::AtMostOnce).await;
    c.publish_expect(
        plain("somebody", b"x", QoS::AtLeastOnce),
        ReasonCode::Success,
    )
    .await;
    c.publish_expect(
        plain("somebody", b"x", QoS::ExactlyOnce),
        ReasonCode::Success,
    )
    .await;
}

/// PUBREL for a packet id the broker does not know: PUBCOMP 0x92, with a reason string.
#[tokio::test]
async fn pubrel_for_unknown_packet_id_gets_pubcomp_0x92() {
    let b = TestBroker::start().await;
    let mut c = Client::connect_v5(b.addr, "pubrel").await;
    c.send(Packet::PubRel(ack(4242))).await;
    let comp = c.expect("PUBCOMP").await;
    let Packet::PubComp(comp) = comp else {
        panic!("expected PUBCOMP, got {comp:?}");
    };
    assert_eq!(
        (comp.pkid, comp.reason),
        (4242, ReasonCode::PacketIdentifierNotFound)
    );
    assert!(
        comp.properties.reason_string.is_some(),
        "a reason string, as Request Problem Information defaults to 1: {comp:?}"
    );
}

/// UNSUBACK: 0x00 for a subscription that existed, 0x11 for one that did not.
#[tokio::test]
async fn unsuback_reason_codes() {
    let b = TestBroker::start().await;
    let mut c = Client::connect_v5(b.addr, "unsub").await;
    c.subscribe("u/a", QoS::AtLeastOnce).await;
    c.subscribe("$share/g/u/s", QoS::AtLeastOnce).await;
    let codes = c.unsubscribe(&["u/a", "u/never", "$share/g/u/s"]).await;
    assert_eq!(
        codes,
        [
            ReasonCode::Success,
            ReasonCode::NoSubscriptionExisted,
            ReasonCode::Success
        ],
        "UNSUBACK reason codes"
    );
    assert_eq!(
        c.unsubscribe(&["u/a"]).await,
        [ReasonCode::NoSubscriptionExisted]
    );
    assert_eq!(b.broker().router.subscription_count(), 0);
}

/// An invalid filter is refused with 0x8F in its SUBACK slot; the other filters of the
/// same SUBSCRIBE are granted and work.
#[tokio::test]
async fn suback_refuses_only_the_invalid_filter() {
    let b = TestBroker::start().await;
    let mut c = Client::connect_v5(b.addr, "suback").await;
    let codes = c
        .subscribe_with(
            vec![
                filter("f/#/x", opts(QoS::AtLeastOnce)),
                filter("f/+", opts(QoS::AtLeastOnce)),
                filter("f/a+", opts(QoS::AtMostOnce)),
                filter("$share/g", opts(QoS::AtMostOnce)),
                filter("g/#", opts(QoS::ExactlyOnce)),
            ],
            Properties::default(),
        )
        .await;
    assert_eq!(
        codes,
        [
            ReasonCode::TopicFilterInvalid,
            ReasonCode::GrantedQoS1,
            ReasonCode::TopicFilterInvalid,
            ReasonCode::TopicFilterInvalid,
            ReasonCode::GrantedQoS2
        ],
        "SUBACK reason codes"
    );
    let mut publisher = Client::connect_v5(b.addr, "suback-pub").await;
    publisher
        .publish_expect(plain("f/1", b"x", QoS::AtLeastOnce), ReasonCode::Success)
        .await;
    let p = c.receive().await;
    assert_eq!(&*p.topic, "f/1");
}

/// A second connection with the same client id takes the session over: the first one
/// gets DISCONNECT 0x8E (Session taken over).
#[tokio::test]
async fn takeover_disconnects_the_old_connection_with_0x8e() {
    let b = TestBroker::start().await;
    let mut old = Client::connect_v5(b.addr, "twin").await;
    let (_new, ack) = Client::accepted(b.addr, connect_v5("twin")).await;
    assert!(!ack.session_present);
    old.expect_disconnect(ReasonCode::SessionTakenOver).await;

    // Resuming a persistent session that is still connected: the same, with the session.
    let (mut old, _) = Client::accepted(b.addr, connect_expiry("twin-kept", true, 60)).await;
    old.subscribe("twin/t", QoS::AtLeastOnce).await;
    let (_new, ack) = Client::accepted(b.addr, connect_expiry("twin-kept", false, 60)).await;
    assert!(
        ack.session_present,
        "the session is taken over, not discarded"
    );
    old.expect_disconnect(ReasonCode::SessionTakenOver).await;
    assert_eq!(
        b.broker().router.subscription_count(),
        1,
        "its subscription stays"
    );
}

/// The connection taken over is closed without DISCONNECT from its client, so its will
/// (without delay) is published [MQTT-3.1.4-3].
#[tokio::test]
async fn takeover_publishes_the_will_of_the_old_connection() {
    let b = TestBroker::start().await;
    let mut sub = Client::connect_v5(b.addr, "tw-sub").await;
    sub.subscribe("tw/t", QoS::AtLeastOnce).await;
    let (mut old, _) = Client::accepted(
        b.addr,
        connect_with_will("tw", "tw/t", "taken", Properties::default()),
    )
    .await;
    let (_new, _) = Client::accepted(b.addr, connect_v5("tw")).await;
    old.expect_disconnect(ReasonCode::SessionTakenOver).await;
    let p = sub.receive().await;
    assert_eq!(text(&p.payload), "taken");
}

/// Takeover with Clean Start 1 ends the old session, so a delayed will is published then:
/// a will waits for "the Will Delay Interval ... or the Session ends, whichever happens
/// first" (3.1.3.2.2), and the new connection is not to that session.
#[tokio::test]
async fn takeover_with_clean_start_publishes_the_delayed_will() {
    let b = TestBroker::start().await;
    let mut sub = Client::connect_v5(b.addr, "twd-sub").await;
    sub.subscribe("twd/t", QoS::AtLeastOnce).await;
    let mut connect = connect_with_will("twd", "twd/t", "ended", will_delay(30));
    connect.properties.session_expiry_interval = Some(60);
    let (mut old, _) = Client::accepted(b.addr, connect).await;
    let (_new, ack) = Client::accepted(b.addr, connect_v5("twd")).await;
    assert!(!ack.session_present, "Clean Start 1: a new session");
    old.expect_disconnect(ReasonCode::SessionTakenOver).await;
    match sub.recv(WAIT).await {
        Some(Packet::Publish(p)) => assert_eq!(text(&p.payload), "ended"),
        other => panic!("expected the will of the ended session, got {other:?}"),
    }
}

/// Takeover of a session with Session Expiry 0 (which ends with its connection) by a
/// CONNECT with Clean Start 0: the old session ended with the connection taken over, so
/// the new connection gets a fresh one (Session Present 0, no subscription), and the old
/// connection's will is published as for any end without DISCONNECT.
#[tokio::test]
async fn takeover_of_a_session_without_expiry_starts_afresh() {
    let b = TestBroker::start().await;
    let mut sub = Client::connect_v5(b.addr, "tn-sub").await;
    sub.subscribe("tn/will", QoS::AtLeastOnce).await;
    let (mut old, _) = Client::accepted(
        b.addr,
        connect_with_will("tn", "tn/will", "taken", Properties::default()),
    )
    .await;
    old.subscribe("tn/t", QoS::AtLeastOnce).await;
    let (mut new, ack) = Client::accepted(b.addr, connect_expiry("tn", false, 60)).await;
    assert!(
        !ack.session_present,
        "the old session ended with its connection"
    );
    old.expect_disconnect(ReasonCode::SessionTakenOver).await;
    assert_eq!(text(&sub.receive().await.payload), "taken");
    assert_eq!(
        b.broker().router.subscription_count(),
        1,
        "only the watcher's: the old session's subscription went with it"
    );
    new.expect_quiet("in a fresh session").await;
}

/// A will topic that is empty or holds a wildcard: CONNACK 0x90 (Topic Name Invalid),
/// then the connection is closed.
#[tokio::test]
async fn invalid_will_topic_gets_connack_0x90() {
    let b = TestBroker::start().await;
    for topic in ["", "will/+", "#"] {
        let connect = connect_with_will("bad-will", topic, "x", Properties::default());
        let (mut c, ack) = Client::connect_with(b.addr, connect).await;
        assert_eq!(
            ack.code,
            ReasonCode::TopicNameInvalid,
            "will topic {topic:?}"
        );
        c.expect_closed(WAIT).await;
    }
}

/// `levels` topic levels named `l`, or `+` for a filter.
fn deep(levels: usize, level: &str) -> String {
    vec![level; levels].join("/")
}

/// A topic or filter of 201 levels (200 `/`) is accepted; one more level is refused: the
/// filter with 0x8F in the SUBACK, the PUBLISH with DISCONNECT 0x90. mosquitto (2.0)
/// draws the line at the same depth.
#[tokio::test]
async fn topics_and_filters_of_up_to_201_levels_are_accepted() {
    let b = TestBroker::start().await;
    let mut c = Client::connect_v5(b.addr, "deep").await;
    let (topic, too_deep) = (deep(201, "l"), deep(202, "l"));
    let codes = c
        .subscribe_with(
            vec![
                filter(&topic, opts(QoS::AtLeastOnce)),
                filter(&too_deep, opts(QoS::AtLeastOnce)),
                filter(&deep(201, "+"), opts(QoS::AtLeastOnce)),
                filter(&deep(202, "+"), opts(QoS::AtLeastOnce)),
            ],
            Properties::default(),
        )
        .await;
    use ReasonCode::{GrantedQoS1, TopicFilterInvalid};
    assert_eq!(
        codes,
        [
            GrantedQoS1,
            TopicFilterInvalid,
            GrantedQoS1,
            TopicFilterInvalid
        ]
    );
    c.publish_expect(
        plain(&topic, b"deep", QoS::AtLeastOnce),
        ReasonCode::Success,
    )
    .await;
    assert_eq!(&*c.receive().await.topic, topic);
    c.send(Packet::Publish(plain(&too_deep, b"x", QoS::AtMostOnce)))
        .await;
    c.expect_disconnect(ReasonCode::TopicNameInvalid).await;
}

/// Bytes that break the packet format: DISCONNECT 0x81 (Malformed Packet).
#[tokio::test]
async fn malformed_packets_disconnect_with_0x81() {
    let b = TestBroker::start().await;
    let cases: [(&str, &[u8]); 3] = [
        (
            "PUBLISH with both QoS bits set",
            &[0x36, 0x06, 0, 1, b't', 0, 1, 0],
        ),
        (
            "topic name not UTF-8",
            &[0x30, 0x05, 0x00, 0x02, 0xC3, 0x28, 0x00],
        ),
        (
            "unknown property",
            &[0x30, 0x06, 0x00, 0x01, b't', 0x02, 0x7F, 0x00],
        ),
    ];
    for (what, bytes) in cases {
        let mut c = Client::connect_v5(b.addr, "malformed").await;
        c.send_raw(bytes).await;
        let d = c.expect_disconnect(ReasonCode::MalformedPacket).await;
        assert!(
            d.properties.reason_string.is_some(),
            "{what}: a reason string in {d:?}"
        );
    }
}

/// A second CONNECT on a connection: DISCONNECT 0x82 (Protocol Error) [MQTT-3.1.0-2].
#[tokio::test]
async fn second_connect_disconnects_with_0x82() {
    let b = TestBroker::start().await;
    let mut c = Client::connect_v5(b.addr, "again").await;
    c.send(Packet::Connect(Box::new(connect_v5("again")))).await;
    let d = c.expect_disconnect(ReasonCode::ProtocolError).await;
    assert!(
        d.properties.reason_string.is_some(),
        "a reason string by default: {d:?}"
    );
}

/// Request Problem Information 0: no reason string on acknowledgements [MQTT-3.1.2-29]
/// (a DISCONNECT may still carry one).
#[tokio::test]
async fn request_problem_information_0_suppresses_reason_strings() {
    let b = TestBroker::start().await;
    let connect = Connect {
        properties: Properties {
            request_problem_information: Some(0),
            ..Properties::default()
        },
        ..connect_v5("quiet")
    };
    let (mut c, _) = Client::accepted(b.addr, connect).await;
    c.send(Packet::PubRel(ack(9))).await;
    let comp = c.expect("PUBCOMP").await;
    let expected = Ack {
        pkid: 9,
        reason: ReasonCode::PacketIdentifierNotFound,
        properties: Properties::default(),
    };
    assert_eq!(
        comp,
        Packet::PubComp(expected),
        "PUBCOMP without a reason string"
    );

    let utf8 = Properties {
        payload_format_indicator: Some(1),
        ..Properties::default()
    };
    c.send(Packet::Publish(Publish {
        pkid: 10,
        ..message("rpi", &[0xFF, 0xFE], QoS::AtLeastOnce, utf8)
    }))
    .await;
    let puback = c.expect("PUBACK").await;
    let expected = Ack {
        pkid: 10,
        reason: ReasonCode::PayloadFormatInvalid,
        properties: Properties::default(),
    };
    assert_eq!(
        puback,
        Packet::PubAck(expected),
        "PUBACK without a reason string"
    );
}

// =======================================================================================
// Clean Start and Session Expiry Interval
// =======================================================================================

/// Session Expiry Interval 0 (absent): the session ends with the connection.
#[tokio::test]
async fn session_expiry_0_ends_session_at_disconnect() {
    let b = TestBroker::start().await;
    let (mut c, _) = Client::accepted(b.addr, connect_expiry("brief", false, 0)).await;
    c.subscribe("brief/t", QoS::AtLeastOnce).await;
    c.disconnect().await;
    let broker = b.broker();
    eventually("the session to end", Duration::from_secs(1), || {
        broker.session("brief").is_none()
    })
    .await;
    assert_eq!(
        broker.router.subscription_count(),
        0,
        "its subscription is gone"
    );

    // The same after an abrupt close, with the property left out.
    let (mut c, ack) = Client::accepted(
        b.addr,
        Connect {
            clean_start: false,
            ..connect_v5("brief")
        },
    )
    .await;
    assert!(!ack.session_present, "nothing was kept");
    c.subscribe("brief/t", QoS::AtLeastOnce).await;
    drop(c);
    eventually("the session to end", Duration::from_secs(1), || {
        broker.session("brief").is_none()
    })
    .await;
}

/// CONNECT with Session Expiry 0, then DISCONNECT setting a non-zero one: Protocol Error
/// (3.14.2.2.2), answered with DISCONNECT 0x82.
#[tokio::test]
async fn disconnect_cannot_set_expiry_after_connect_set_zero() {
    let b = TestBroker::start().await;
    let (mut c, _) = Client::accepted(b.addr, connect_expiry("late", true, 0)).await;
    c.send(Packet::Disconnect(Disconnect {
        reason: ReasonCode::Success,
        properties: expiry_session(60),
    }))
    .await;
    c.expect_disconnect(ReasonCode::ProtocolError).await;
    let broker = b.broker();
    eventually("the session to end", Duration::from_secs(1), || {
        broker.session("late").is_none()
    })
    .await;
}

/// The DISCONNECT rule is about the CONNECT packet's value: a client that asked for a
/// non-zero expiry (even if the broker capped it to 0) may set one in DISCONNECT without a
/// Protocol Error (MQTT 5.0, 3.14.2.2.2).
#[tokio::test]
async fn disconnect_expiry_is_checked_against_the_connect_value() {
    let b = TestBroker::with(|cfg| cfg.mqtt.max_session_expiry_interval = 0).await;
    let (mut c, ack) = Client::accepted(b.addr, connect_expiry("asked", true, 100)).await;
    assert_eq!(
        ack.properties.session_expiry_interval,
        Some(0),
        "capped to 0"
    );
    c.send(Packet::Disconnect(Disconnect {
        reason: ReasonCode::Success,
        properties: expiry_session(5),
    }))
    .await;
    // The broker closes the connection; a DISCONNECT 0x82 would be wrong here.
    match c.next_event(WAIT).await {
        Event::Closed(_) => {}
        Event::Packet(p) => panic!("expected a plain close, got {p:?}"),
        Event::Timeout => panic!("the broker did not close the connection"),
    }
}

// =======================================================================================
// Topic aliases (client to server)
// =======================================================================================

fn alias(n: u16) -> Properties {
    Properties {
        topic_alias: Some(n),
        ..Properties::default()
    }
}

/// A PUBLISH with a topic and an alias sets the alias; one with an empty topic uses it;
/// a new topic remaps it. Subscribers see the topic, never the alias.
#[tokio::test]
async fn topic_alias_sets_and_resolves_topics() {
    let b = TestBroker::start().await;
    let mut sub = Client::connect_v5(b.addr, "alias-sub").await;
    sub.subscribe("alias/#", QoS::AtLeastOnce).await;
    let mut publisher = Client::connect_v5(b.addr, "alias-pub").await;
    let with_user = Properties {
        topic_alias: Some(2),
        user_properties: user_props(&[("k", "v")]),
        ..Properties::default()
    };
    let sends = [
        message("alias/a", b"1", QoS::AtLeastOnce, alias(1)),
        message("", b"2", QoS::AtLeastOnce, alias(1)),
        message("alias/b", b"3", QoS::AtMostOnce, alias(1)),
        message("", b"4", QoS::AtLeastOnce, alias(1)),
        message("alias/c", b"5", QoS::AtLeastOnce, with_user.clone()),
        message("", b"6", QoS::ExactlyOnce, with_user),
    ];
    for p in sends {
        publisher.publish_expect(p, ReasonCode::Success).await;
    }
    let mut got = Vec::new();
    for _ in 0..6 {
        let p = sub.receive().await;
        assert_eq!(props_of(&p).topic_alias, None, "no alias forwarded: {p:?}");
        got.push((
            p.topic.to_string(),
            text(&p.payload),
            props_of(&p).user_properties,
        ));
    }
    let expected: Vec<(String, String, _)> = [
        ("alias/a", "1", user_props(&[])),
        ("alias/a", "2", user_props(&[])),
        ("alias/b", "3", user_props(&[])),
        ("alias/b", "4", user_props(&[])),
        ("alias/c", "5", user_props(&[("k", "v")])),
        ("alias/c", "6", user_props(&[("k", "v")])),
    ]
    .into_iter()
    .map(|(topic, payload, user)| (topic.to_string(), payload.to_string(), user))
    .collect();
    assert_eq!(got, expected, "topics resolved from the aliases");
}

/// An alias above the Topic Alias Maximum is a 0x94 DISCONNECT; with a maximum of 0 (not
/// announced) any alias is.
#[tokio::test]
async fn topic_alias_above_maximum_disconnects_with_0x94() {
    let b = TestBroker::with(|cfg| cfg.mqtt.topic_alias_maximum = 2).await;
    let (mut c, ack) = Client::accepted(b.addr, connect_v5("alias-max")).await;
    assert_eq!(ack.properties.topic_alias_maximum, Some(2));
    c.publish_expect(
        message("am/t", b"ok", QoS::AtLeastOnce, alias(2)),
        ReasonCode::NoMatchingSubscribers,
    )
    .await;
    c.send(Packet::Publish(message(
        "am/t",
        b"x",
        QoS::AtMostOnce,
        alias(3),
    )))
    .await;
    c.expect_disconnect(ReasonCode::TopicAliasInvalid).await;

    let b = TestBroker::with(|cfg| cfg.mqtt.topic_alias_maximum = 0).await;
    let (mut c, ack) = Client::accepted(b.addr, connect_v5("alias-none")).await;
    assert_eq!(
        ack.properties.topic_alias_maximum, None,
        "no aliases: property absent"
    );
    c.send(Packet::Publish(message(
        "am/t",
        b"x",
        QoS::AtMostOnce,
        alias(1),
    )))
    .await;
    c.expect_disconnect(ReasonCode::TopicAliasInvalid).await;
}

/// Topic Alias 0 is not permitted [MQTT-3.3.2-8]: the connection is closed with a
/// DISCONNECT. The standard names no code for this case: 0x94 (Topic Alias invalid) or
/// 0x82 (Protocol Error) both fit.
#[tokio::test]
async fn topic_alias_zero_disconnects() {
    let b = TestBroker::start().await;
    let mut c = Client::connect_v5(b.addr, "alias-zero").await;
    c.send(Packet::Publish(message(
        "az/t",
        b"x",
        QoS::AtMostOnce,
        alias(0),
    )))
    .await;
    let d = match c.expect("DISCONNECT").await {
        Packet::Disconnect(d) => d,
        other => panic!("expected DISCONNECT, got {other:?}"),
    };
    assert!(
        [ReasonCode::TopicAliasInvalid, ReasonCode::ProtocolError].contains(&d.reason),
        "DISCONNECT reason for Topic Alias 0: {:?}",
        d.reason
    );
    c.expect_closed(WAIT).await;
}

/// An empty topic with an alias that was never set: Protocol Error, DISCONNECT 0x82.
#[tokio::test]
async fn unknown_topic_alias_disconnects_with_0x82() {
    let b = TestBroker::start().await;
    let mut c = Client::connect_v5(b.addr, "alias-unknown").await;
    c.publish_expect(
        message("au/t", b"x", QoS::AtLeastOnce, alias(1)),
        ReasonCode::NoMatchingSubscribers,
    )
    .await;
    c.send(Packet::Publish(message(
        "",
        b"x",
        QoS::AtMostOnce,
        alias(2),
    )))
    .await;
    c.expect_disconnect(ReasonCode::ProtocolError).await;

    // Aliases do not outlive their connection [MQTT-3.3.2-7].
    let (mut c, _) = Client::accepted(b.addr, connect_v5("alias-unknown")).await;
    c.send(Packet::Publish(message(
        "",
        b"x",
        QoS::AtMostOnce,
        alias(1),
    )))
    .await;
    c.expect_disconnect(ReasonCode::ProtocolError).await;
}

// =======================================================================================
// Topic aliases (server to client)
// =======================================================================================

/// A 5.0 CONNECT with a Topic Alias Maximum.
fn connect_aliases(client_id: &str, max: Option<u16>) -> Connect {
    Connect {
        properties: Properties {
            topic_alias_maximum: max,
            ..Properties::default()
        },
        ..connect_v5(client_id)
    }
}

const LONG_A: &str = "plant/building-7/floor-3/line-2/temperature";
const LONG_B: &str = "plant/building-7/floor-3/line-2/pressure";
const LONG_C: &str = "plant/building-7/floor-3/line-2/vibration";

/// The order of publications of `server_sets_topic_aliases_*`: the topic published, the
/// topic on the wire ("" once the alias stands for it) and the alias, for a client taking
/// 2 aliases.
const ALIAS_SCRIPT: [(&str, &str, u16); 7] = [
    (LONG_A, LONG_A, 1),
    (LONG_B, LONG_B, 2),
    (LONG_A, "", 1),
    // No alias left: the least recently used one (B's) now stands for C.
    (LONG_C, LONG_C, 2),
    // B again: A's alias is now the least recently used.
    (LONG_B, LONG_B, 1),
    (LONG_C, "", 2),
    (LONG_B, "", 1),
];

/// A client announcing Topic Alias Maximum 2 gets topic aliases from the broker on the
/// topics it receives: the first PUBLISH of a topic carries topic and alias, the next
/// ones the alias and an empty topic; with a third topic the least recently used alias is
/// replaced. A topic of 3 bytes or less, no longer than the alias, is sent whole.
#[tokio::test]
async fn server_sets_topic_aliases_for_a_client_that_accepts_them() {
    let b = TestBroker::start().await;
    let (mut sub, _) = Client::accepted(b.addr, connect_aliases("aliased", Some(2))).await;
    sub.subscribe("#", QoS::AtLeastOnce).await;
    let mut publisher = Client::connect_v5(b.addr, "alias-pub").await;
    for (i, (topic, wire, alias)) in ALIAS_SCRIPT.into_iter().enumerate() {
        let payload = format!("m{i}");
        publisher
            .publish_expect(
                plain(topic, payload.as_bytes(), QoS::AtLeastOnce),
                ReasonCode::Success,
            )
            .await;
        let p = sub.receive().await;
        assert_eq!(
            (&*p.topic, props_of(&p).topic_alias, text(&p.payload)),
            (wire, Some(alias), payload),
            "publication {i}, to {topic}"
        );
    }
    for _ in 0..2 {
        publisher
            .publish_expect(
                plain("a/b", b"short", QoS::AtLeastOnce),
                ReasonCode::Success,
            )
            .await;
        let p = sub.receive().await;
        assert_eq!((&*p.topic, props_of(&p).topic_alias), ("a/b", None));
    }
}

/// No alias for a client that takes none (Topic Alias Maximum 0 or absent), nor for any
/// client with `max_outgoing_topic_aliases = 0`.
#[tokio::test]
async fn no_topic_aliases_for_clients_that_take_none_or_when_switched_off() {
    let on = TestBroker::start().await;
    let off = TestBroker::with(|cfg| cfg.mqtt.max_outgoing_topic_aliases = 0).await;
    for (b, id, max) in [
        (&on, "zero", Some(0)),
        (&on, "absent", None),
        (&off, "switched-off", Some(10)),
    ] {
        let (mut sub, _) = Client::accepted(b.addr, connect_aliases(id, max)).await;
        sub.subscribe("#", QoS::AtLeastOnce).await;
        let mut publisher = Client::connect_v5(b.addr, &format!("{id}-pub")).await;
        for _ in 0..3 {
            publisher
                .publish_expect(plain(LONG_A, b"x", QoS::AtLeastOnce), ReasonCode::Success)
                .await;
            let p = sub.receive().await;
            assert_eq!(
                (&*p.topic, props_of(&p).topic_alias),
                (LONG_A, None),
                "{id}"
            );
        }
    }
}

/// rumqttc's v5 client, announcing Topic Alias Maximum 2, takes the broker's aliases: it
/// stays connected through the script (an alias it could not resolve would be a protocol
/// error on its side) and its events show the same aliases on the wire.
#[tokio::test]
async fn rumqttc_decodes_server_topic_aliases() {
    use rumqttc::v5::mqttbytes::v5::Packet as RPacket;
    use rumqttc::v5::mqttbytes::QoS as RQoS;

    let b = TestBroker::start().await;
    let (client, mut rx) = rumqttc_client_with(&b, "rumqttc-aliases", |o| {
        o.set_topic_alias_max(Some(2));
    })
    .await;
    client
        .subscribe("plant/#", RQoS::AtLeastOnce)
        .await
        .unwrap();
    expect_rumqttc(&mut rx, "SUBACK", |p| matches!(p, RPacket::SubAck(_))).await;
    let mut publisher = Client::connect_v5(b.addr, "rumqttc-alias-pub").await;
    let mut resolved = std::collections::HashMap::new();
    for (i, (topic, wire, alias)) in ALIAS_SCRIPT.into_iter().enumerate() {
        let payload = format!("m{i}");
        publisher
            .publish_expect(
                plain(topic, payload.as_bytes(), QoS::AtLeastOnce),
                ReasonCode::Success,
            )
            .await;
        let p = match expect_rumqttc(&mut rx, "PUBLISH", |p| matches!(p, RPacket::Publish(_))).await
        {
            RPacket::Publish(p) => p,
            _ => unreachable!(),
        };
        let got_alias = p.properties.as_ref().and_then(|props| props.topic_alias);
        assert_eq!(
            (&p.topic[..], got_alias),
            (wire.as_bytes(), Some(alias)),
            "publication {i}"
        );
        if !p.topic.is_empty() {
            resolved.insert(alias, p.topic.clone());
        }
        assert_eq!(&resolved[&alias][..], topic.as_bytes(), "publication {i}");
        assert_eq!(&p.payload[..], payload.as_bytes());
    }
    // Still connected: a last message arrives.
    publisher
        .publish_expect(
            plain("plant/end", b"end", QoS::AtLeastOnce),
            ReasonCode::Success,
        )
        .await;
    expect_rumqttc(
        &mut rx,
        "the last PUBLISH",
        |p| matches!(p, RPacket::Publish(p) if &p.payload[..] == b"end"),
    )
    .await;
}

// =======================================================================================
// Retained messages
// =======================================================================================

/// Retains `ret/1` to `ret/{n}` at QoS 1, in one burst.
async fn publish_retained(b: &TestBroker, publisher: &mut Client, n: u16) {
    let mut burst = BytesMut::new();
    for pkid in 1..=n {
        let p = Publish {
            pkid,
            ..retained(&format!("ret/{pkid}"), b"r", QoS::AtLeastOnce)
        };
        protocol::encode(&Packet::Publish(p), Protocol::V5, &mut burst).unwrap();
    }
    publisher.send_raw(&burst).await;
    let acks = publisher.ping().await;
    assert_eq!(
        acks.len(),
        usize::from(n),
        "every retained PUBLISH acknowledged"
    );
    assert_eq!(b.broker().router.retained_count(), usize::from(n));
}

/// Every retained message reaches a new subscription, however many: here 20,000, far past
/// the session queue's 1,000, each exactly once and at QoS 1, paced by the client's
/// Receive Maximum of 5. Live messages on another subscription keep arriving during the
/// walk, none lost: the walk and the session queue take turns at the in-flight window.
#[tokio::test]
async fn twenty_thousand_retained_messages_reach_a_new_subscription() {
    const RETAINED: u16 = 20_000;
    const LIVE: usize = 10;
    let b = TestBroker::start().await;
    let mut publisher = Client::connect_v5(b.addr, "ret-pub").await;
    publish_retained(&b, &mut publisher, RETAINED).await;

    let connect = Connect {
        properties: Properties {
            receive_maximum: Some(5),
            ..Properties::default()
        },
        ..connect_v5("ret-sub")
    };
    let (mut sub, _) = Client::accepted(b.addr, connect).await;
    sub.subscribe("live/t", QoS::AtLeastOnce).await;
    sub.subscribe("ret/#", QoS::AtLeastOnce).await;
    let mut seen = std::collections::HashSet::new();
    let mut live = Vec::new();
    let mut received = 0;
    while seen.len() < usize::from(RETAINED) || live.len() < LIVE {
        let p = sub.receive().await;
        received += 1;
        assert_eq!(p.qos, QoS::AtLeastOnce, "{p:?}");
        if &*p.topic == "live/t" {
            assert!(!p.retain);
            live.push((text(&p.payload), seen.len()));
            continue;
        }
        assert!(p.retain, "{p:?}");
        assert!(seen.insert(p.topic.to_string()), "{} twice", p.topic);
        if seen.len() == 100 {
            for i in 0..LIVE {
                let m = plain("live/t", format!("live {i}").as_bytes(), QoS::AtLeastOnce);
                publisher.publish_expect(m, ReasonCode::Success).await;
            }
        }
    }
    let payloads: Vec<&str> = live.iter().map(|(p, _)| p.as_str()).collect();
    let want: Vec<String> = (0..LIVE).map(|i| format!("live {i}")).collect();
    assert_eq!(payloads, want, "live messages in order, none lost");
    // Published after the 100th retained message: they take turns with the walk at the
    // window, rather than wait for the 19,900 retained messages still to come.
    assert!(
        live.iter()
            .all(|(_, retained_before)| *retained_before < 1_000),
        "live messages held back by the walk: (payload, retained messages before) {live:?}"
    );
    assert_eq!(received, usize::from(RETAINED) + LIVE, "nothing twice");
    sub.expect_quiet("after every retained message").await;
}

/// At QoS 0 too, every retained message reaches a new subscription, past the session
/// queue's 1,000 (`max_queued_messages`): none is dropped for want of room.
#[tokio::test]
async fn more_retained_messages_than_the_queue_holds_reach_a_qos_0_subscription() {
    const RETAINED: u16 = 1_500;
    let b = TestBroker::start().await;
    assert_eq!(b.broker().config.session.max_queued_messages, 1_000);
    let mut publisher = Client::connect_v5(b.addr, "ret0-pub").await;
    publish_retained(&b, &mut publisher, RETAINED).await;
    let mut sub = Client::connect_v5(b.addr, "ret0-sub").await;
    sub.subscribe("ret/#", QoS::AtMostOnce).await;
    let mut seen = std::collections::HashSet::new();
    while seen.len() < usize::from(RETAINED) {
        let p = sub.receive().await;
        assert_eq!((p.qos, p.retain), (QoS::AtMostOnce, true), "{p:?}");
        assert!(seen.insert(p.topic.to_string()), "{} twice", p.topic);
    }
    sub.expect_quiet("after every retained message").await;
}

// =======================================================================================
// Flow control
// =======================================================================================

/// Receive Maximum 2 from the client: never more than 2 unacknowledged QoS 1 PUBLISHes
/// to it [MQTT-3.3.4-9]; each PUBACK lets one more go.
#[tokio::test]
async fn client_receive_maximum_limits_unacknowledged_publishes() {
    let b = TestBroker::start().await;
    let connect = Connect {
        properties: Properties {
            receive_maximum: Some(2),
            ..Properties::default()
        },
        ..connect_v5("rm-sub")
    };
    let (mut sub, _) = Client::accepted(b.addr, connect).await;
    sub.subscribe("rm/t", QoS::AtLeastOnce).await;
    let mut publisher = Client::connect_v5(b.addr, "rm-pub").await;
    for i in 0..5 {
        publisher
            .publish_expect(
                plain("rm/t", format!("m{i}").as_bytes(), QoS::AtLeastOnce),
                ReasonCode::Success,
            )
            .await;
    }
    // The window is full once two are out: a ping round trip shows nothing more comes.
    let first = [sub.expect_publish().await, sub.expect_publish().await];
    sub.expect_quiet("with 2 PUBLISHes unacknowledged").await;
    // Each PUBACK frees one slot: exactly one more PUBLISH, then the window is full again.
    let mut next = Vec::new();
    for acked in [&first[0], &first[1]] {
        sub.send(Packet::PubAck(ack(acked.pkid))).await;
        next.push(sub.expect_publish().await);
        sub.expect_quiet("after one PUBACK and one more PUBLISH")
            .await;
    }
    for acked in &next {
        sub.send(Packet::PubAck(ack(acked.pkid))).await;
    }
    let last = sub.expect_publish().await;
    sub.send(Packet::PubAck(ack(last.pkid))).await;
    sub.expect_quiet("after the last PUBLISH").await;
    let payloads: Vec<String> = first
        .iter()
        .chain(&next)
        .chain([&last])
        .map(|p| text(&p.payload))
        .collect();
    assert_eq!(
        payloads,
        ["m0", "m1", "m2", "m3", "m4"],
        "all delivered, in order"
    );
}

/// The broker's Receive Maximum (2): a third unreleased QoS 2 PUBLISH is a 0x93
/// DISCONNECT (3.2.2.3.3); released ones free their slot.
#[tokio::test]
async fn broker_receive_maximum_exceeded_disconnects_with_0x93() {
    let b = TestBroker::with(|cfg| cfg.mqtt.receive_maximum = 2).await;
    let (mut c, ack_) = Client::accepted(b.addr, connect_v5("rm-in")).await;
    assert_eq!(
        ack_.properties.receive_maximum,
        Some(2),
        "CONNACK Receive Maximum"
    );
    let qos2 = |pkid| Publish {
        pkid,
        ..plain("rmi/t", b"x", QoS::ExactlyOnce)
    };
    for pkid in [1, 2] {
        c.send(Packet::Publish(qos2(pkid))).await;
        let rec = c.expect("PUBREC").await;
        assert!(
            matches!(&rec, Packet::PubRec(a) if a.pkid == pkid),
            "PUBREC {pkid}: {rec:?}"
        );
    }
    c.send(Packet::PubRel(ack(1))).await;
    assert_eq!(
        c.expect("PUBCOMP").await,
        Packet::PubComp(ack(1)),
        "PUBCOMP 1"
    );
    c.send(Packet::Publish(qos2(3))).await;
    let rec = c.expect("PUBREC").await;
    assert!(
        matches!(&rec, Packet::PubRec(a) if a.pkid == 3),
        "PUBREC 3: {rec:?}"
    );
    c.send(Packet::Publish(qos2(4))).await;
    c.expect_disconnect(ReasonCode::ReceiveMaximumExceeded)
        .await;
}

/// A client pipelining QoS 2 publishes far past Receive Maximum, in one write and without
/// reading, then still sending after it was answered: its writes go through, and it reads
/// the PUBRECs, DISCONNECT 0x93 and the end of the stream, not a reset. The broker shuts
/// its side and reads (and drops) what still comes for a while before it closes: a
/// lingering close.
#[tokio::test]
async fn receive_maximum_exceeded_by_a_pipelining_client_is_read_not_reset() {
    let b = TestBroker::with(|cfg| cfg.mqtt.receive_maximum = 2).await;
    let (mut c, _) = Client::accepted(b.addr, connect_v5("pipeliner")).await;
    let mut burst = BytesMut::new();
    for pkid in 1..=2000 {
        let p = Publish {
            pkid,
            ..plain("pipe/t", &[b'x'; 100], QoS::ExactlyOnce)
        };
        protocol::encode(&Packet::Publish(p), Protocol::V5, &mut burst).unwrap();
    }
    c.send_raw(&burst).await;
    let packets = c
        .lingering_close(
            "DISCONNECT",
            |p| matches!(p, Packet::Disconnect(_)),
            &burst[..1000],
        )
        .await;
    match &packets[..] {
        [Packet::PubRec(a), Packet::PubRec(b), Packet::Disconnect(d)] => {
            assert_eq!((a.pkid, b.pkid), (1, 2));
            assert_eq!(d.reason, ReasonCode::ReceiveMaximumExceeded);
        }
        other => panic!("expected PUBREC 1, PUBREC 2, DISCONNECT 0x93; got {other:?}"),
    }
}

/// The same after a refused CONNECT (here an unknown authentication method, 0x8C) with
/// more packets behind it: the client reads the CONNACK with its reason code, then the
/// end of the stream.
#[tokio::test]
async fn refused_connect_followed_by_more_bytes_is_read_not_reset() {
    let b = TestBroker::start().await;
    let mut c = Client::open(b.addr, "refused", Protocol::V5).await;
    let connect = Connect {
        properties: Properties {
            authentication_method: Some("NO-SUCH-METHOD".into()),
            ..Properties::default()
        },
        ..connect_v5("refused")
    };
    let mut publishes = BytesMut::new();
    for _ in 0..2000 {
        let p = plain("after/refusal", &[b'x'; 100], QoS::AtMostOnce);
        protocol::encode(&Packet::Publish(p), Protocol::V5, &mut publishes).unwrap();
    }
    c.send(Packet::Connect(Box::new(connect))).await;
    c.send_raw(&publishes).await;
    let packets = c
        .lingering_close(
            "CONNACK",
            |p| matches!(p, Packet::ConnAck(_)),
            &publishes[..1000],
        )
        .await;
    match &packets[..] {
        [Packet::ConnAck(ack)] => assert_eq!(ack.code, ReasonCode::BadAuthenticationMethod),
        other => panic!("expected the CONNACK alone, got {other:?}"),
    }
}

/// Maximum Packet Size from the client: a larger message is not sent to it
/// [MQTT-3.1.2-24] (others still get it), and it keeps its connection and later messages.
#[tokio::test]
async fn client_maximum_packet_size_skips_larger_messages() {
    let b = TestBroker::start().await;
    let connect = Connect {
        properties: Properties {
            maximum_packet_size: Some(64),
            ..Properties::default()
        },
        ..connect_v5("small")
    };
    let (mut small, _) = Client::accepted(b.addr, connect).await;
    small.subscribe("mpc/t", QoS::AtLeastOnce).await;
    let mut big = Client::connect_v5(b.addr, "big").await;
    big.subscribe("mpc/t", QoS::AtLeastOnce).await;

    let mut publisher = Client::connect_v5(b.addr, "mpc-pub").await;
    let large = vec![b'L'; 200];
    publisher
        .publish_expect(
            plain("mpc/t", &large, QoS::AtLeastOnce),
            ReasonCode::Success,
        )
        .await;
    publisher
        .publish_expect(
            plain("mpc/t", b"fits", QoS::AtMostOnce),
            ReasonCode::Success,
        )
        .await;

    let got = small.drain_publishes().await;
    let payloads: Vec<String> = got.iter().map(|p| text(&p.payload)).collect();
    assert_eq!(payloads, ["fits"], "the small client gets only what fits");
    let got = big.drain_publishes().await;
    assert_eq!(got.len(), 2, "the other client gets both");
    assert_eq!(got[0].payload.len(), 200);

    publisher
        .publish_expect(
            plain("mpc/t", b"later", QoS::AtLeastOnce),
            ReasonCode::Success,
        )
        .await;
    let p = small.receive().await;
    assert_eq!(text(&p.payload), "later", "the small client still receives");
}

/// A reason string that would make a packet larger than the client's Maximum Packet Size
/// is left out [MQTT-3.7.2-2]: the client gets the PUBCOMP 0x92, within its limit.
#[tokio::test]
async fn reason_string_is_left_out_beyond_client_maximum_packet_size() {
    const MAX: usize = 24;
    let b = TestBroker::start().await;
    let connect = Connect {
        properties: Properties {
            maximum_packet_size: Some(MAX as u32),
            ..Properties::default()
        },
        ..connect_v5("tiny")
    };
    let (mut c, connack) = Client::accepted(b.addr, connect).await;
    assert!(
        encoded_len(&Packet::ConnAck(connack)) <= MAX,
        "the CONNACK fits in {MAX} bytes"
    );
    c.send(Packet::PubRel(ack(5))).await;
    let comp = c.expect("PUBCOMP").await;
    assert!(
        matches!(&comp, Packet::PubComp(a) if a.pkid == 5 && a.reason == ReasonCode::PacketIdentifierNotFound),
        "PUBCOMP 0x92: {comp:?}"
    );
    let size = encoded_len(&comp);
    assert!(
        size <= MAX,
        "a {size}-byte PUBCOMP sent to a client accepting {MAX}: {comp:?}"
    );
}

/// The size of `packet` as the broker would have sent it (5.0).
fn encoded_len(packet: &Packet) -> usize {
    let mut buf = BytesMut::new();
    protocol::encode(packet, Protocol::V5, &mut buf).expect("encodes");
    buf.len()
}

// =======================================================================================
// Shared subscriptions
// =======================================================================================

/// Messages on `$share/g/t` are spread over the members: each gets some, none twice,
/// none lost.
#[tokio::test]
async fn shared_subscription_spreads_messages_over_members() {
    let b = TestBroker::start().await;
    let mut m1 = Client::connect_v5(b.addr, "member-1").await;
    m1.subscribe("$share/g/rr/t", QoS::AtLeastOnce).await;
    let mut m2 = Client::connect_v5(b.addr, "member-2").await;
    m2.subscribe("$share/g/rr/t", QoS::AtLeastOnce).await;
    let mut publisher = Client::connect_v5(b.addr, "rr-pub").await;
    for i in 0..10 {
        publisher
            .publish_expect(
                plain("rr/t", format!("{i}").as_bytes(), QoS::AtLeastOnce),
                ReasonCode::Success,
            )
            .await;
    }
    let got1: Vec<u32> = m1
        .drain_publishes()
        .await
        .iter()
        .map(|p| text(&p.payload).parse().unwrap())
        .collect();
    let got2: Vec<u32> = m2
        .drain_publishes()
        .await
        .iter()
        .map(|p| text(&p.payload).parse().unwrap())
        .collect();
    assert!(
        !got1.is_empty() && !got2.is_empty(),
        "both members get messages: {got1:?} {got2:?}"
    );
    let mut all: Vec<u32> = got1.iter().chain(&got2).copied().collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (0..10).collect::<Vec<_>>(),
        "each message exactly once: {got1:?} {got2:?}"
    );
}

/// A QoS 1 message in flight to a member that goes away without acknowledging it is
/// given to another member (MQTT 5.0, 4.8.2).
#[tokio::test]
async fn shared_message_unacknowledged_by_a_leaving_member_goes_to_another() {
    let b = TestBroker::start().await;
    let mut first = Client::connect_v5(b.addr, "leaver").await;
    first.subscribe("$share/g/rd/t", QoS::AtLeastOnce).await;
    let mut publisher = Client::connect_v5(b.addr, "rd-pub").await;
    publisher
        .publish_expect(
            plain("rd/t", b"orphan", QoS::AtLeastOnce),
            ReasonCode::Success,
        )
        .await;
    let p = first.expect_publish().await;
    assert_eq!(text(&p.payload), "orphan");

    let mut second = Client::connect_v5(b.addr, "stayer").await;
    second.subscribe("$share/g/rd/t", QoS::AtLeastOnce).await;
    drop(first); // no PUBACK, no DISCONNECT
    let p = second.receive().await;
    assert_eq!(
        text(&p.payload),
        "orphan",
        "redelivered to the remaining member"
    );
    assert_eq!(p.qos, QoS::AtLeastOnce);
    second.expect_quiet("after the redelivery").await;
}

/// A client with a shared and a plain subscription matching a topic has two
/// subscriptions, and gets a copy for each, with its own Subscription Identifier.
#[tokio::test]
async fn shared_and_plain_subscriptions_each_deliver() {
    let b = TestBroker::start().await;
    let mut c = Client::connect_v5(b.addr, "both").await;
    c.subscribe_opts("$share/g/sp/t", opts(QoS::AtLeastOnce), sub_id(1))
        .await;
    c.subscribe_opts("sp/t", opts(QoS::AtLeastOnce), sub_id(2))
        .await;
    let mut publisher = Client::connect_v5(b.addr, "sp-pub").await;
    publisher
        .publish_expect(plain("sp/t", b"x", QoS::AtLeastOnce), ReasonCode::Success)
        .await;
    let got = c.drain_publishes().await;
    let mut ids: Vec<Vec<u32>> = got
        .iter()
        .map(|p| props_of(p).subscription_identifiers)
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        [vec![1], vec![2]],
        "one copy per subscription: {got:?}"
    );
}

/// Retained messages are not sent for a shared subscription (MQTT 5.0, 4.8.2); a plain
/// one gets them.
#[tokio::test]
async fn retained_messages_are_not_sent_on_shared_subscriptions() {
    let b = TestBroker::start().await;
    let mut publisher = Client::connect_v5(b.addr, "rs-pub").await;
    publisher
        .publish_expect(
            retained("rs/t", b"kept", QoS::AtLeastOnce),
            ReasonCode::NoMatchingSubscribers,
        )
        .await;
    let mut c = Client::connect_v5(b.addr, "rs-sub").await;
    c.subscribe("$share/g/rs/t", QoS::AtLeastOnce).await;
    c.expect_quiet("after a shared subscription").await;
    c.subscribe("rs/t", QoS::AtLeastOnce).await;
    let p = c.receive().await;
    assert_eq!((text(&p.payload), p.retain), ("kept".into(), true));
}

// =======================================================================================
// Subscription options and identifiers
// =======================================================================================

/// The Subscription Identifier comes back with each matching delivery, live or retained
/// [MQTT-3.3.4-3]; a subscription without one gives none.
#[tokio::test]
async fn subscription_identifier_returned_on_delivery() {
    let b = TestBroker::start().await;
    let mut publisher = Client::connect_v5(b.addr, "sid-pub").await;
    publisher
        .publish_expect(
            retained("sid/r", b"old", QoS::AtLeastOnce),
            ReasonCode::NoMatchingSubscribers,
        )
        .await;
    let mut c = Client::connect_v5(b.addr, "sid-sub").await;
    c.subscribe_opts("sid/+", opts(QoS::AtLeastOnce), sub_id(7))
        .await;
    let p = c.receive().await;
    assert_eq!(
        (text(&p.payload), props_of(&p).subscription_identifiers),
        ("old".into(), vec![7])
    );
    c.subscribe("plain/t", QoS::AtLeastOnce).await;
    for (topic, want) in [("sid/a", vec![7]), ("sid/b", vec![7]), ("plain/t", vec![])] {
        publisher
            .publish_expect(plain(topic, b"x", QoS::AtLeastOnce), ReasonCode::Success)
            .await;
        let p = c.receive().await;
        assert_eq!(&*p.topic, topic);
        assert_eq!(
            props_of(&p).subscription_identifiers,
            want,
            "identifiers on {topic}"
        );
    }
    // The identifier belongs to the subscription as last (re)made: a new one replaces
    // it, none removes it (3.8.2.1.2).
    for (id, want) in [(Some(8), vec![8]), (None, vec![])] {
        let props = id.map_or_else(Properties::default, sub_id);
        c.subscribe_opts("sid/+", opts(QoS::AtLeastOnce), props)
            .await;
        let retained = c.receive().await;
        assert_eq!(
            props_of(&retained).subscription_identifiers,
            want,
            "retained, id {id:?}"
        );
        publisher
            .publish_expect(plain("sid/c", b"x", QoS::AtLeastOnce), ReasonCode::Success)
            .await;
        let p = c.receive().await;
        assert_eq!(
            props_of(&p).subscription_identifiers,
            want,
            "after re-subscribing with {id:?}"
        );
    }
}

/// Two overlapping subscriptions of one client (ids 1 and 2): one delivery carrying both
/// identifiers [MQTT-3.3.4-4], at the higher QoS.
#[tokio::test]
async fn overlapping_subscriptions_give_one_delivery_with_both_identifiers() {
    let b = TestBroker::start().await;
    let mut c = Client::connect_v5(b.addr, "overlap").await;
    c.subscribe_opts("ov/+", opts(QoS::AtMostOnce), sub_id(1))
        .await;
    c.subscribe_opts("ov/#", opts(QoS::AtLeastOnce), sub_id(2))
        .await;
    let mut publisher = Client::connect_v5(b.addr, "ov-pub").await;
    publisher
        .publish_expect(plain("ov/x", b"x", QoS::AtLeastOnce), ReasonCode::Success)
        .await;
    let got = c.drain_publishes().await;
    assert_eq!(got.len(), 1, "one copy: {got:?}");
    let mut ids = props_of(&got[0]).subscription_identifiers;
    ids.sort_unstable();
    assert_eq!(ids, [1, 2], "both identifiers");
    assert_eq!(got[0].qos, QoS::AtLeastOnce, "the higher subscription QoS");
}

/// No Local: a client's own publications do not come back on that subscription
/// [MQTT-3.8.3-3]; other clients' do.
#[tokio::test]
async fn no_local_suppresses_own_publications() {
    let b = TestBroker::start().await;
    let mut c = Client::connect_v5(b.addr, "nolocal").await;
    let no_local = SubOptions {
        no_local: true,
        ..opts(QoS::AtLeastOnce)
    };
    c.subscribe_opts("nl/t", no_local, Properties::default())
        .await;
    let mut other = Client::connect_v5(b.addr, "nl-other").await;
    other.subscribe("nl/t", QoS::AtLeastOnce).await;

    c.publish_expect(
        plain("nl/t", b"mine", QoS::AtLeastOnce),
        ReasonCode::Success,
    )
    .await;
    c.expect_quiet("after its own PUBLISH").await;
    assert_eq!(text(&other.receive().await.payload), "mine");

    other
        .publish_expect(
            plain("nl/t", b"theirs", QoS::AtLeastOnce),
            ReasonCode::Success,
        )
        .await;
    assert_eq!(text(&c.receive().await.payload), "theirs");

    // No Local on a shared subscription is a Protocol Error [MQTT-3.8.3-4].
    c.send(Packet::Subscribe(Subscribe {
        pkid: 99,
        filters: vec![filter("$share/g/nl/t", no_local)],
        properties: Properties::default(),
    }))
    .await;
    c.expect_disconnect(ReasonCode::ProtocolError).await;
}

/// Retain As Published keeps the RETAIN flag on normal delivery; without it the flag is
/// cleared [MQTT-3.3.1-12, -13].
#[tokio::test]
async fn retain_as_published_keeps_the_retain_flag() {
    let b = TestBroker::start().await;
    let mut rap = Client::connect_v5(b.addr, "rap").await;
    let keep = SubOptions {
        retain_as_published: true,
        ..opts(QoS::AtLeastOnce)
    };
    rap.subscribe_opts("rap/t", keep, Properties::default())
        .await;
    let mut cleared = Client::connect_v5(b.addr, "rap-plain").await;
    cleared.subscribe("rap/t", QoS::AtLeastOnce).await;
    let mut publisher = Client::connect_v5(b.addr, "rap-pub").await;
    publisher
        .publish_expect(
            retained("rap/t", b"r", QoS::AtLeastOnce),
            ReasonCode::Success,
        )
        .await;
    publisher
        .publish_expect(plain("rap/t", b"n", QoS::AtLeastOnce), ReasonCode::Success)
        .await;
    let flags = |got: Vec<Publish>| -> Vec<(String, bool)> {
        got.iter().map(|p| (text(&p.payload), p.retain)).collect()
    };
    assert_eq!(
        flags(rap.drain_publishes().await),
        [("r".to_string(), true), ("n".to_string(), false)],
        "Retain As Published"
    );
    assert_eq!(
        flags(cleared.drain_publishes().await),
        [("r".to_string(), false), ("n".to_string(), false)],
        "without Retain As Published"
    );
}

/// Retain Handling 0: retained messages on every SUBSCRIBE; 1: only when the subscription
/// is new; 2: never [MQTT-3.3.1-9, -10, -11].
#[tokio::test]
async fn retain_handling_options() {
    let b = TestBroker::start().await;
    let mut publisher = Client::connect_v5(b.addr, "rh-pub").await;
    publisher
        .publish_expect(
            retained("rh/t", b"kept", QoS::AtLeastOnce),
            ReasonCode::NoMatchingSubscribers,
        )
        .await;
    for (handling, expected) in [(0u8, [1, 1]), (1, [1, 0]), (2, [0, 0])] {
        let mut c = Client::connect_v5(b.addr, &format!("rh-{handling}")).await;
        let options = SubOptions {
            retain_handling: handling,
            ..opts(QoS::AtLeastOnce)
        };
        for (round, want) in expected.into_iter().enumerate() {
            c.subscribe_opts("rh/t", options, Properties::default())
                .await;
            let got = c.drain_publishes().await;
            assert_eq!(
                got.len(),
                want,
                "Retain Handling {handling}, SUBSCRIBE #{}: {got:?}",
                round + 1
            );
            assert!(got.iter().all(|p| p.retain && text(&p.payload) == "kept"));
        }
        publisher
            .publish_expect(
                plain("rh/t", b"live", QoS::AtLeastOnce),
                ReasonCode::Success,
            )
            .await;
        let p = c.receive().await;
        assert_eq!(
            text(&p.payload),
            "live",
            "Retain Handling {handling}: live messages flow"
        );
    }
}

// =======================================================================================
// Request/response and application properties
// =======================================================================================

/// Response Topic, Correlation Data, User Properties (in order, repeated names), Payload
/// Format Indicator and Content Type reach the subscriber unchanged [MQTT-3.3.2-4, -15,
/// -16, -17, -18, -20].
#[tokio::test]
async fn application_properties_pass_through_unchanged() {
    let b = TestBroker::start().await;
    let mut sub = Client::connect_v5(b.addr, "app-sub").await;
    sub.subscribe("app/req", QoS::AtLeastOnce).await;
    let mut publisher = Client::connect_v5(b.addr, "app-pub").await;
    let props = Properties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        response_topic: Some("app/reply/42".into()),
        correlation_data: Some(Bytes::from_static(&[0, 1, 0xFF, b'c'])),
        user_properties: user_props(&[("k", "1"), ("k", "2"), ("a", "b"), ("k", "1")]),
        ..Properties::default()
    };
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        publisher
            .publish_expect(
                message("app/req", br#"{"x":1}"#, qos, props.clone()),
                ReasonCode::Success,
            )
            .await;
        let p = sub.receive().await;
        assert_eq!(text(&p.payload), r#"{"x":1}"#);
        assert_eq!(props_of(&p), props, "properties at {qos:?}");
    }
}

/// Payload Format Indicator 1 with a payload that is not UTF-8: refused with 0x99 in the
/// PUBACK / PUBREC, and not delivered.
#[tokio::test]
async fn invalid_utf8_payload_is_refused_with_0x99() {
    let b = TestBroker::start().await;
    let mut sub = Client::connect_v5(b.addr, "pfi-sub").await;
    sub.subscribe("pfi/t", QoS::AtLeastOnce).await;
    let mut publisher = Client::connect_v5(b.addr, "pfi-pub").await;
    let utf8 = Properties {
        payload_format_indicator: Some(1),
        ..Properties::default()
    };
    let bad = [0xC3, 0x28, 0xFF];
    publisher
        .publish_expect(
            message("pfi/t", &bad, QoS::AtLeastOnce, utf8.clone()),
            ReasonCode::PayloadFormatInvalid,
        )
        .await;
    publisher
        .publish_expect(
            message("pfi/t", &bad, QoS::ExactlyOnce, utf8.clone()),
            ReasonCode::PayloadFormatInvalid,
        )
        .await;
    sub.expect_quiet("after refused payloads").await;
    // Unspecified bytes (indicator 0) are fine.
    let bytes = Properties {
        payload_format_indicator: Some(0),
        ..Properties::default()
    };
    publisher
        .publish_expect(
            message("pfi/t", &bad, QoS::AtLeastOnce, bytes),
            ReasonCode::Success,
        )
        .await;
    let p = sub.receive().await;
    assert_eq!(&p.payload[..], &bad[..]);
}

/// A request/response exchange between two rumqttc v5 clients through the broker.
#[tokio::test]
async fn rumqttc_request_response() {
    use rumqttc::v5::mqttbytes::v5::{Packet as RPacket, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS as RQoS;

    let b = TestBroker::start().await;
    let (responder, mut responder_rx) = rumqttc_client(&b, "responder").await;
    responder
        .subscribe("svc/echo", RQoS::AtLeastOnce)
        .await
        .unwrap();
    expect_rumqttc(&mut responder_rx, "SUBACK", |p| {
        matches!(p, RPacket::SubAck(_))
    })
    .await;
    let (requester, mut requester_rx) = rumqttc_client(&b, "requester").await;
    requester
        .subscribe("svc/reply/requester", RQoS::AtLeastOnce)
        .await
        .unwrap();
    expect_rumqttc(&mut requester_rx, "SUBACK", |p| {
        matches!(p, RPacket::SubAck(_))
    })
    .await;

    let request_props = PublishProperties {
        response_topic: Some("svc/reply/requester".into()),
        correlation_data: Some(Bytes::from_static(b"req-1")),
        user_properties: vec![("trace".into(), "t1".into())],
        content_type: Some("text/plain".into()),
        ..PublishProperties::default()
    };
    requester
        .publish_with_properties("svc/echo", RQoS::AtLeastOnce, false, "ping", request_props)
        .await
        .unwrap();
    let request = match expect_rumqttc(&mut responder_rx, "request", |p| {
        matches!(p, RPacket::Publish(_))
    })
    .await
    {
        RPacket::Publish(p) => p,
        _ => unreachable!(),
    };
    let props = request.properties.clone().expect("request properties");
    assert_eq!(props.response_topic.as_deref(), Some("svc/reply/requester"));
    assert_eq!(props.correlation_data.as_deref(), Some(&b"req-1"[..]));
    assert_eq!(
        props.user_properties,
        [("trace".to_string(), "t1".to_string())]
    );
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));

    let reply_props = PublishProperties {
        correlation_data: props.correlation_data.clone(),
        ..PublishProperties::default()
    };
    let reply_topic = props.response_topic.clone().unwrap();
    responder
        .publish_with_properties(reply_topic, RQoS::AtLeastOnce, false, "pong", reply_props)
        .await
        .unwrap();
    let reply = match expect_rumqttc(&mut requester_rx, "reply", |p| {
        matches!(p, RPacket::Publish(_))
    })
    .await
    {
        RPacket::Publish(p) => p,
        _ => unreachable!(),
    };
    assert_eq!(&reply.topic[..], b"svc/reply/requester");
    assert_eq!(&reply.payload[..], b"pong");
    let props = reply.properties.expect("reply properties");
    assert_eq!(
        props.correlation_data.as_deref(),
        Some(&b"req-1"[..]),
        "correlation data"
    );
}

/// A rumqttc v5 client whose incoming packets are forwarded to the returned channel;
/// returns once connected.
async fn rumqttc_client(
    b: &TestBroker,
    id: &str,
) -> (
    rumqttc::v5::AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Packet>,
) {
    rumqttc_client_with(b, id, |_| {}).await
}

/// `rumqttc_client`, with `tweak` changing the client's options.
async fn rumqttc_client_with(
    b: &TestBroker,
    id: &str,
    tweak: impl FnOnce(&mut rumqttc::v5::MqttOptions),
) -> (
    rumqttc::v5::AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Packet>,
) {
    use rumqttc::v5::mqttbytes::v5::Packet as RPacket;
    use rumqttc::v5::{AsyncClient, Event as REvent, MqttOptions};

    let mut options = MqttOptions::new(id, "127.0.0.1", b.port());
    options.set_keep_alive(Duration::from_secs(30));
    tweak(&mut options);
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let REvent::Incoming(packet) = event {
                if tx.send(packet).is_err() {
                    break;
                }
            }
        }
    });
    expect_rumqttc(&mut rx, "CONNACK", |p| matches!(p, RPacket::ConnAck(_))).await;
    (client, rx)
}

/// The next packet of a rumqttc client matching `wanted` (others are skipped).
async fn expect_rumqttc(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Packet>,
    what: &str,
    wanted: impl Fn(&rumqttc::v5::mqttbytes::v5::Packet) -> bool,
) -> rumqttc::v5::mqttbytes::v5::Packet {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(p)) if wanted(&p) => return p,
            Ok(Some(_)) => {}
            Ok(None) => panic!("rumqttc: the event loop ended while waiting for {what}"),
            Err(_) => panic!("rumqttc: no {what} within {WAIT:?}"),
        }
    }
}

// =======================================================================================
// Will messages
// =======================================================================================

/// Will properties (Content Type, User Properties, Response Topic, Correlation Data,
/// Payload Format Indicator) are forwarded with the will (3.1.3.2).
#[tokio::test]
async fn will_properties_are_forwarded() {
    let b = TestBroker::start().await;
    let mut sub = Client::connect_v5(b.addr, "wp-sub").await;
    sub.subscribe("wp/t", QoS::AtLeastOnce).await;
    let props = Properties {
        payload_format_indicator: Some(1),
        content_type: Some("text/plain".into()),
        response_topic: Some("wp/reply".into()),
        correlation_data: Some(Bytes::from_static(b"cd")),
        user_properties: user_props(&[("who", "victim"), ("n", "1"), ("who", "again")]),
        ..Properties::default()
    };
    let (victim, _) = Client::accepted(
        b.addr,
        connect_with_will("wp-victim", "wp/t", "gone", props.clone()),
    )
    .await;
    drop(victim);
    let p = sub.receive().await;
    assert_eq!(text(&p.payload), "gone");
    assert_eq!(props_of(&p), props, "will properties forwarded unchanged");
}

/// DISCONNECT 0x04 (Disconnect with Will Message) publishes the will; a normal DISCONNECT
/// discards it [MQTT-3.14.4-3].
#[tokio::test]
async fn disconnect_with_will_message_publishes_the_will() {
    let b = TestBroker::start().await;
    let mut sub = Client::connect_v5(b.addr, "dw-sub").await;
    sub.subscribe("dw/+", QoS::AtLeastOnce).await;

    let (normal, _) = Client::accepted(
        b.addr,
        connect_with_will("dw-normal", "dw/normal", "no", Properties::default()),
    )
    .await;
    normal.disconnect().await;
    let (with_will, _) = Client::accepted(
        b.addr,
        connect_with_will("dw-will", "dw/will", "yes", Properties::default()),
    )
    .await;
    with_will
        .disconnect_with(ReasonCode::DisconnectWithWill, Properties::default())
        .await;

    let p = sub.receive().await;
    assert_eq!((&*p.topic, text(&p.payload)), ("dw/will", "yes".into()));
    sub.expect_quiet("after a normal DISCONNECT").await;
}

// =======================================================================================
// Enhanced authentication
// =======================================================================================

/// CONNECT with an Authentication Method the broker does not support: CONNACK 0x8C
/// [MQTT-4.12.0-1], then the connection is closed.
#[tokio::test]
async fn unsupported_authentication_method_gets_connack_0x8c() {
    let b = TestBroker::start().await;
    let connect = Connect {
        properties: Properties {
            authentication_method: Some("GS2-KRB5".into()),
            authentication_data: Some(Bytes::from_static(b"client-first")),
            ..Properties::default()
        },
        ..connect_v5("kerberos")
    };
    let (mut c, ack) = Client::connect_with(b.addr, connect).await;
    assert_eq!(
        ack.code,
        ReasonCode::BadAuthenticationMethod,
        "CONNACK reason code"
    );
    assert!(!ack.session_present);
    c.expect_closed(WAIT).await;
    assert!(
        b.broker().session("scram").is_none(),
        "no session was created"
    );
}

/// A toy challenge-response method: the client must answer the challenge "nonce-1"
/// with "answer:nonce-1". Enough to drive the CONNECT/AUTH exchange of 4.12.
struct EchoChallenge;

struct EchoExchange {
    challenged: bool,
}

impl ternmq::security::enhanced::AuthMethod for EchoChallenge {
    fn name(&self) -> &str {
        "ECHO-CHALLENGE"
    }
    fn begin(&self, _client_id: &str) -> Box<dyn ternmq::security::enhanced::AuthExchange> {
        Box::new(EchoExchange { challenged: false })
    }
}

impl ternmq::security::enhanced::AuthExchange for EchoExchange {
    fn step(&mut self, data: Option<&[u8]>) -> ternmq::security::enhanced::AuthStep {
        use ternmq::security::enhanced::AuthStep;
        if !self.challenged {
            self.challenged = true;
            return AuthStep::Continue(Bytes::from_static(b"nonce-1"));
        }
        match data {
            Some(b"answer:nonce-1") => AuthStep::Success {
                data: Some(Bytes::from_static(b"welcome")),
                username: None,
            },
            _ => AuthStep::Failure,
        }
    }
}

fn auth_props(data: &'static [u8]) -> Properties {
    Properties {
        authentication_method: Some("ECHO-CHALLENGE".into()),
        authentication_data: Some(Bytes::from_static(data)),
        ..Properties::default()
    }
}

/// Runs CONNECT → AUTH (challenge) → AUTH (answer) and returns the client and the
/// broker's last packet.
async fn authenticate(b: &TestBroker, client_id: &str, answer: &'static [u8]) -> (Client, Packet) {
    let mut c = Client::open(b.addr, client_id, Protocol::V5).await;
    let connect = Connect {
        properties: auth_props(b"hello"),
        ..connect_v5(client_id)
    };
    c.send(Packet::Connect(Box::new(connect))).await;
    let Packet::Auth(challenge) = c.expect("AUTH challenge").await else {
        panic!("{client_id}: expected an AUTH challenge");
    };
    assert_eq!(challenge.reason, ReasonCode::ContinueAuthentication);
    assert_eq!(
        challenge.properties.authentication_method,
        Some("ECHO-CHALLENGE".into())
    );
    assert_eq!(
        challenge.properties.authentication_data.as_deref(),
        Some(&b"nonce-1"[..])
    );
    c.send(Packet::Auth(Auth {
        reason: ReasonCode::ContinueAuthentication,
        properties: auth_props(answer),
    }))
    .await;
    let last = c.expect("CONNACK").await;
    (c, last)
}

/// Enhanced authentication with a registered method: challenge, answer, CONNACK 0x00
/// carrying the method and the final data (4.12); the connection then works.
#[tokio::test]
async fn enhanced_authentication_exchange_succeeds() {
    let b = TestBroker::with_auth(|_| {}, vec![std::sync::Arc::new(EchoChallenge)]).await;
    let (mut c, last) = authenticate(&b, "authed", b"answer:nonce-1").await;
    let Packet::ConnAck(ack) = last else {
        panic!("expected CONNACK, got {last:?}");
    };
    assert_eq!(ack.code, ReasonCode::Success);
    assert_eq!(
        ack.properties.authentication_method,
        Some("ECHO-CHALLENGE".into())
    );
    assert_eq!(
        ack.properties.authentication_data.as_deref(),
        Some(&b"welcome"[..])
    );
    c.subscribe("t", QoS::AtLeastOnce).await;
    c.publish(plain("t", b"after auth", QoS::AtLeastOnce)).await;
    assert_eq!(c.receive().await.payload, Bytes::from_static(b"after auth"));
}

/// Re-authentication (4.12.1): AUTH 0x19 on a live connection runs the exchange again
/// (AUTH 0x18 both ways) and ends with AUTH 0x00; the session goes on undisturbed. A
/// wrong answer ends the connection with DISCONNECT 0x87.
#[tokio::test]
async fn re_authentication_runs_the_exchange_again() {
    let b = TestBroker::with_auth(|_| {}, vec![std::sync::Arc::new(EchoChallenge)]).await;
    let (mut c, last) = authenticate(&b, "reauth", b"answer:nonce-1").await;
    assert!(matches!(last, Packet::ConnAck(ref a) if a.code == ReasonCode::Success));
    c.subscribe("ra/t", QoS::AtLeastOnce).await;
    for (answer, accepted) in [
        (&b"answer:nonce-1"[..], true),
        (&b"answer:guess"[..], false),
    ] {
        c.send(Packet::Auth(Auth {
            reason: ReasonCode::Reauthenticate,
            properties: auth_props(b"again"),
        }))
        .await;
        let Packet::Auth(challenge) = c.expect("AUTH challenge").await else {
            panic!("expected an AUTH challenge");
        };
        assert_eq!(challenge.reason, ReasonCode::ContinueAuthentication);
        let mut props = auth_props(b"");
        props.authentication_data = Some(Bytes::copy_from_slice(answer));
        c.send(Packet::Auth(Auth {
            reason: ReasonCode::ContinueAuthentication,
            properties: props,
        }))
        .await;
        if !accepted {
            c.expect_disconnect(ReasonCode::NotAuthorized).await;
            break;
        }
        let Packet::Auth(done) = c.expect("AUTH success").await else {
            panic!("expected AUTH 0x00");
        };
        assert_eq!(done.reason, ReasonCode::Success);
        assert_eq!(
            done.properties.authentication_data.as_deref(),
            Some(&b"welcome"[..])
        );
        c.publish(plain("ra/t", b"still here", QoS::AtLeastOnce))
            .await;
        assert_eq!(c.receive().await.payload, Bytes::from_static(b"still here"));
    }
}

/// A wrong answer is refused with CONNACK 0x87 and no session is created.
#[tokio::test]
async fn enhanced_authentication_wrong_answer_is_not_authorized() {
    let b = TestBroker::with_auth(|_| {}, vec![std::sync::Arc::new(EchoChallenge)]).await;
    let (mut c, last) = authenticate(&b, "intruder", b"answer:guess").await;
    let Packet::ConnAck(ack) = last else {
        panic!("expected CONNACK, got {last:?}");
    };
    assert_eq!(ack.code, ReasonCode::NotAuthorized);
    c.expect_closed(WAIT).await;
    assert!(
        b.broker().session("intruder").is_none(),
        "no session was created"
    );
}

/// AUTH on a connection whose CONNECT had no Authentication Method: Protocol Error,
/// DISCONNECT 0x82 (4.12).
#[tokio::test]
async fn auth_without_authentication_method_is_a_protocol_error() {
    let b = TestBroker::start().await;
    let mut c = Client::connect_v5(b.addr, "auth").await;
    c.send(Packet::Auth(Auth {
        reason: ReasonCode::Reauthenticate,
        properties: Properties {
            authentication_method: Some("SCRAM-SHA-256".into()),
            ..Properties::default()
        },
    }))
    .await;
    c.expect_disconnect(ReasonCode::ProtocolError).await;
}

// =======================================================================================
// Protocol versions mixed
// =======================================================================================

/// A 5.0 publisher with properties to a 3.1.1 subscriber, at QoS 1: topic and payload
/// arrive (a 3.1.1 PUBLISH has no properties).
#[tokio::test]
async fn v5_publisher_to_v311_subscriber() {
    let b = TestBroker::start().await;
    let (mut old, _) = Client::accepted(b.addr, connect_v311("v311-sub")).await;
    old.subscribe_with(
        vec![filter("mix/t", opts(QoS::AtLeastOnce))],
        Properties::default(),
    )
    .await;
    let mut publisher = Client::connect_v5(b.addr, "v5-pub").await;
    let props = Properties {
        content_type: Some("text/plain".into()),
        message_expiry_interval: Some(60),
        user_properties: user_props(&[("k", "v")]),
        ..Properties::default()
    };
    publisher
        .publish_expect(
            message("mix/t", b"from v5", QoS::AtLeastOnce, props),
            ReasonCode::Success,
        )
        .await;
    let p = old.receive().await;
    assert_eq!(
        (&*p.topic, text(&p.payload), p.qos, p.properties),
        ("mix/t", "from v5".into(), QoS::AtLeastOnce, None)
    );
    old.expect_quiet("after one message").await;
}

/// A 3.1.1 publisher to a 5.0 subscriber, at QoS 1.
#[tokio::test]
async fn v311_publisher_to_v5_subscriber() {
    let b = TestBroker::start().await;
    let mut sub = Client::connect_v5(b.addr, "v5-sub").await;
    sub.subscribe_opts("mix/+", opts(QoS::AtLeastOnce), sub_id(3))
        .await;
    let (mut old, _) = Client::accepted(b.addr, connect_v311("v311-pub")).await;
    old.publish_expect(
        plain("mix/t", b"from 3.1.1", QoS::AtLeastOnce),
        ReasonCode::Success,
    )
    .await;
    let p = sub.receive().await;
    assert_eq!(
        (&*p.topic, text(&p.payload), p.qos),
        ("mix/t", "from 3.1.1".into(), QoS::AtLeastOnce)
    );
    let expected = Properties {
        subscription_identifiers: vec![3],
        ..Properties::default()
    };
    assert_eq!(
        props_of(&p),
        expected,
        "only the subscriber's own identifier"
    );
}

// =======================================================================================
// mosquitto_pub / mosquitto_sub -V mqttv5
// =======================================================================================

mod mosquitto {
    pub use crate::common::mosquitto::{
        clients_available, mosquitto_sub as sub, publish, wait_subscriptions as wait_subscribed,
    };

    /// `-D command name value...` for each property: `properties("publish",
    /// &[&["content-type", "text/plain"]])`.
    pub fn properties<'a>(command: &'a str, props: &[&[&'a str]]) -> Vec<&'a str> {
        props
            .iter()
            .flat_map(|p| ["-D", command].into_iter().chain(p.iter().copied()))
            .collect()
    }
}

macro_rules! require_mosquitto {
    () => {
        if !mosquitto::clients_available() {
            return;
        }
    };
}

/// `mosquitto_pub -V mqttv5 -D publish ...` to `mosquitto_sub -V mqttv5 -F ...`: user
/// properties, message expiry, response topic, correlation data, content type and payload
/// format indicator round-trip through the broker.
#[tokio::test]
async fn mosquitto_v5_properties_round_trip() {
    require_mosquitto!();
    let b = TestBroker::start().await;
    let format = "%t|%p|%P|%E|%R|%D|%C|%F";
    let mut sub = mosquitto::sub(
        &b,
        &[
            "-V", "mqttv5", "-q", "1", "-t", "mq/props", "-C", "1", "-F", format,
        ],
    );
    mosquitto::wait_subscribed(&b, 1, &mut sub).await;
    let mut args = vec!["-V", "mqttv5", "-q", "1", "-t", "mq/props", "-m", "hello"];
    args.extend(mosquitto::properties(
        "publish",
        &[
            &["user-property", "k", "v1"],
            &["user-property", "k", "v2"],
            &["message-expiry-interval", "60"],
            &["response-topic", "mq/reply"],
            &["correlation-data", "corr-7"],
            &["content-type", "text/plain"],
            &["payload-format-indicator", "1"],
        ],
    ));
    mosquitto::publish(&b, &args).await;
    let lines = sub.output().await;
    assert_eq!(lines.len(), 1, "one message: {lines:?}");
    let fields: Vec<&str> = lines[0].split('|').collect();
    assert_eq!(fields.len(), 8, "all fields printed: {lines:?}");
    assert_eq!(
        fields[..3],
        ["mq/props", "hello", "k:v1 k:v2"],
        "topic, payload, user properties"
    );
    let expiry: u32 = fields[3]
        .parse()
        .unwrap_or_else(|_| panic!("expiry in {lines:?}"));
    assert!((58..=60).contains(&expiry), "message expiry {expiry} of 60");
    assert_eq!(
        fields[4..],
        ["mq/reply", "corr-7", "text/plain", "1"],
        "response topic, correlation data, content type, format"
    );
}

/// A raw 5.0 publisher's properties and the Subscription Identifier as `mosquitto_sub`
/// sees them, and a `mosquitto_sub -V mqttv311` receiving the same message.
#[tokio::test]
async fn mosquitto_sub_sees_identifiers_and_v311_gets_plain_messages() {
    require_mosquitto!();
    let b = TestBroker::start().await;
    let mut args = vec!["-V", "mqttv5", "-q", "1", "-t", "ms/#", "-C", "1"];
    args.extend(["-F", "%t|%p|%S|%P|%C"]);
    args.extend(mosquitto::properties(
        "subscribe",
        &[&["subscription-identifier", "42"]],
    ));
    let mut v5 = mosquitto::sub(&b, &args);
    mosquitto::wait_subscribed(&b, 1, &mut v5).await;
    let mut v311 = mosquitto::sub(
        &b,
        &["-V", "mqttv311", "-q", "1", "-t", "ms/#", "-C", "1", "-v"],
    );
    mosquitto::wait_subscribed(&b, 2, &mut v311).await;

    let mut publisher = Client::connect_v5(b.addr, "ms-pub").await;
    let props = Properties {
        content_type: Some("text/plain".into()),
        user_properties: user_props(&[("a", "1"), ("b", "2")]),
        ..Properties::default()
    };
    publisher
        .publish_expect(
            message("ms/t", b"hi there", QoS::AtLeastOnce, props),
            ReasonCode::Success,
        )
        .await;
    assert_eq!(v5.output().await, ["ms/t|hi there|42|a:1 b:2|text/plain"]);
    assert_eq!(v311.output().await, ["ms/t hi there"]);
}
