//! Persistence through the broker (issue 11: nothing a client was promised is lost on
//! restart or crash), on the real store in a temporary data directory.
//!
//! Restarts run the broker in-process (`Server::shutdown`, which is what the binary does on
//! SIGTERM, then `Server::start` on the same directory); crashes and damaged stores run the
//! real binary, `kill -9`ed. Wall-clock time passes between two runs only in
//! `what_expired_while_the_broker_was_down_is_gone`, which sleeps once.
// A test reads best as one sequence of steps, however long.
#![allow(clippy::too_many_lines)]

mod common;

use common::rng::Rng;

use common::binary::BrokerProcess;
use common::client::*;
use common::damage::{newest_journal, zero};
use common::http::request;
use common::mosquitto::{self, clients_available};
use common::TestBroker;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use ternmq::config::{Config, SyncMode};
use ternmq::protocol::{
    Ack, ByteStr, Connect, Packet, Properties, Protocol, Publish, QoS, ReasonCode, SubOptions,
};

// ---------------------------------------------------------------------------------------
// In-process brokers on a data directory
// ---------------------------------------------------------------------------------------

fn persistent(config: &mut Config, dir: &Path, sync: SyncMode) {
    config.persistence.enabled = true;
    config.persistence.dir = dir.to_path_buf();
    config.persistence.sync = sync;
}

/// A broker keeping its state in `dir` (the default durability mode, `interval`).
async fn start(dir: &Path) -> TestBroker {
    TestBroker::with(|c| persistent(c, dir, SyncMode::Interval)).await
}

/// A 3.1.1 CONNECT with Clean Session 0: a persistent session.
fn persistent_v311(client_id: &str) -> Connect {
    Connect {
        clean_start: false,
        ..connect_v311(client_id)
    }
}

/// Connects with `connect`, asserts acceptance and the Session Present flag.
async fn connect(b: &TestBroker, connect: Connect, present: bool) -> Client {
    let id = connect.client_id.to_string();
    let (c, got) = Client::connect_accepted(b.addr, connect).await;
    assert_eq!(got, present, "{id}: Session Present");
    c
}

/// Everything the broker has for `c`, each PUBLISH acknowledged, until it has nothing more.
/// Several rounds: the in-flight window lets 20 through at a time, and the acknowledgements
/// of one round may reach the broker in the read of the next PINGREQ, whose PINGRESP then
/// comes before the messages they let through; so it takes two quiet rounds in a row.
async fn drain(c: &mut Client) -> Vec<Publish> {
    let mut all = Vec::new();
    let mut quiet = 0;
    while quiet < 2 {
        let got = c.drain_publishes().await;
        quiet = if got.is_empty() { quiet + 1 } else { 0 };
        all.extend(got);
    }
    all
}

fn payloads(ps: &[Publish]) -> Vec<String> {
    ps.iter().map(|p| text(&p.payload)).collect()
}

fn topics(ps: &[Publish]) -> BTreeSet<String> {
    ps.iter().map(|p| p.topic.to_string()).collect()
}

// ---------------------------------------------------------------------------------------
// Restart: retained messages and queues
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_restart_keeps_retained_messages_and_queues_v311() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(dir.path()).await;
    let mut sub = connect(&b, persistent_v311("sub"), false).await;
    sub.subscribe_ok(&[("q/#", QoS::ExactlyOnce)]).await;
    sub.disconnect().await;
    let mut publisher = Client::connect_v311(b.addr, "pub").await;
    publisher
        .publish_v311("r/1", b"retained one", QoS::AtLeastOnce, true)
        .await;
    publisher
        .publish_v311("r/2", b"retained two", QoS::ExactlyOnce, true)
        .await;
    let qos = |i: usize| [QoS::AtLeastOnce, QoS::ExactlyOnce][i % 2];
    for i in 0..6 {
        let payload = format!("m{i}");
        publisher
            .publish_v311("q/a", payload.as_bytes(), qos(i), false)
            .await;
    }
    publisher.disconnect().await;
    b.stop().await;

    // More queued after the first restart: their sequence numbers continue above the
    // stored ones, so none replaces one queued before.
    let b = start(dir.path()).await;
    let mut publisher = Client::connect_v311(b.addr, "pub").await;
    for i in 6..12 {
        let payload = format!("m{i}");
        publisher
            .publish_v311("q/a", payload.as_bytes(), qos(i), false)
            .await;
    }
    publisher.disconnect().await;
    b.stop().await;

    let b = start(dir.path()).await;
    let mut sub = connect(&b, persistent_v311("sub"), true).await;
    let got = drain(&mut sub).await;
    let wanted: Vec<String> = (0..12).map(|i| format!("m{i}")).collect();
    assert_eq!(payloads(&got), wanted, "the queue, in order, once");
    for (i, p) in got.iter().enumerate() {
        assert_eq!(p.qos, qos(i), "{}: QoS", text(&p.payload));
        assert!(!p.dup, "{}: never sent before", text(&p.payload));
    }
    sub.disconnect().await;
    let mut reader = Client::connect_v311(b.addr, "reader").await;
    reader.subscribe_ok(&[("r/#", QoS::ExactlyOnce)]).await;
    let mut retained = drain(&mut reader).await;
    retained.sort_by(|a, b| a.topic.cmp(&b.topic));
    assert_eq!(payloads(&retained), ["retained one", "retained two"]);
    assert!(retained.iter().all(|p| p.retain), "sent as retained");
    assert_eq!(retained[0].qos, QoS::AtLeastOnce);
    assert_eq!(retained[1].qos, QoS::ExactlyOnce);
    reader.disconnect().await;
    b.stop().await;

    // What was delivered and acknowledged is gone from the store too: QoS 2 exactly once.
    let b = start(dir.path()).await;
    let mut sub = connect(&b, persistent_v311("sub"), true).await;
    sub.expect_quiet("after its queue was delivered before the restart")
        .await;
    sub.disconnect().await;
    b.stop().await;
}

/// The PUBLISH properties a message keeps across a restart.
fn rich_properties() -> Properties {
    Properties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(3600),
        content_type: Some(ByteStr::from("text/plain")),
        response_topic: Some(ByteStr::from("replies/1")),
        correlation_data: Some(bytes::Bytes::from_static(b"\x00\x01\x02")),
        user_properties: user_props(&[("k", "v"), ("k", "again")]),
        ..Properties::default()
    }
}

/// The properties of a delivered message that came from `rich_properties`: everything kept,
/// the expiry no longer than it was.
fn assert_rich(p: &Publish) {
    let got = props_of(p);
    let want = rich_properties();
    assert_eq!(got.payload_format_indicator, want.payload_format_indicator);
    assert_eq!(got.content_type, want.content_type);
    assert_eq!(got.response_topic, want.response_topic);
    assert_eq!(got.correlation_data, want.correlation_data);
    assert_eq!(got.user_properties, want.user_properties);
    let left = got.message_expiry_interval.expect("the remaining expiry");
    assert!(left <= 3600 && left > 3000, "remaining expiry {left}");
}

#[tokio::test]
async fn a_restart_keeps_retained_messages_and_queues_v5() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(dir.path()).await;
    let mut sub = connect(&b, connect_expiry("sub5", true, 3600), false).await;
    sub.subscribe_opts("q/#", opts(QoS::ExactlyOnce), sub_id(42))
        .await;
    sub.disconnect().await;
    let mut publisher = Client::connect_v5(b.addr, "pub5").await;
    let mut retained = message("r/rich", b"state", QoS::AtLeastOnce, rich_properties());
    retained.retain = true;
    publisher
        .publish_expect(retained, ReasonCode::NoMatchingSubscribers)
        .await;
    for i in 0..10 {
        let qos = [QoS::AtLeastOnce, QoS::ExactlyOnce][i % 2];
        let payload = format!("m{i}");
        let m = message("q/a", payload.as_bytes(), qos, rich_properties());
        publisher.publish_expect(m, ReasonCode::Success).await;
    }
    publisher.disconnect().await;
    b.stop().await;

    let b = start(dir.path()).await;
    let mut sub = connect(&b, connect_expiry("sub5", false, 3600), true).await;
    let got = drain(&mut sub).await;
    let wanted: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    assert_eq!(payloads(&got), wanted, "the queue, in order, once");
    for p in &got {
        assert_rich(p);
        assert_eq!(props_of(p).subscription_identifiers, [42]);
    }
    sub.disconnect().await;
    let mut reader = Client::connect_v5(b.addr, "reader5").await;
    reader.subscribe("r/#", QoS::AtLeastOnce).await;
    let got = drain(&mut reader).await;
    assert_eq!(payloads(&got), ["state"]);
    assert!(got[0].retain);
    assert_rich(&got[0]);
    reader.disconnect().await;
    b.stop().await;

    let b = start(dir.path()).await;
    let mut sub = connect(&b, connect_expiry("sub5", false, 3600), true).await;
    sub.expect_quiet("after its queue was delivered before the restart")
        .await;
    sub.disconnect().await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------
// Restart: what is in flight
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn messages_in_flight_are_resent_with_dup_after_a_restart_and_pubrel_kept() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(dir.path()).await;
    let mut sub = connect(&b, connect_expiry("inflight", true, 3600), false).await;
    sub.subscribe("f/#", QoS::ExactlyOnce).await;
    let mut publisher = Client::connect_v5(b.addr, "pub").await;
    publisher
        .publish_expect(plain("f/1", b"one", QoS::AtLeastOnce), ReasonCode::Success)
        .await;
    publisher
        .publish_expect(plain("f/2", b"two", QoS::ExactlyOnce), ReasonCode::Success)
        .await;
    publisher
        .publish_expect(
            plain("f/3", b"three", QoS::ExactlyOnce),
            ReasonCode::Success,
        )
        .await;
    publisher.disconnect().await;
    // The subscriber receives all three and completes none: PUBLISH unacknowledged (QoS 1),
    // PUBREC sent and PUBREL received but no PUBCOMP (QoS 2), nothing (QoS 2).
    let p1 = sub.expect_publish().await;
    let p2 = sub.expect_publish().await;
    let p3 = sub.expect_publish().await;
    assert_eq!(
        payloads(&[p1.clone(), p2.clone(), p3.clone()]),
        ["one", "two", "three"]
    );
    sub.send(Packet::PubRec(ack(p2.pkid))).await;
    sub.wait_for(
        "PUBREL",
        |p| matches!(p, Packet::PubRel(a) if a.pkid == p2.pkid),
    )
    .await;
    drop(sub); // the connection breaks
    b.stop().await;

    let b = start(dir.path()).await;
    let mut sub = connect(&b, connect_expiry("inflight", false, 3600), true).await;
    // Resent in their order: the PUBLISHes with DUP and their packet ids, the PUBREL.
    match sub.expect("the QoS 1 PUBLISH again").await {
        Packet::Publish(p) => {
            assert!(p.dup, "resent with DUP");
            assert_eq!(
                (p.pkid, p.qos, text(&p.payload)),
                (p1.pkid, QoS::AtLeastOnce, "one".into())
            );
        }
        other => panic!("expected the QoS 1 PUBLISH again, got {other:?}"),
    }
    match sub.expect("the PUBREL again").await {
        Packet::PubRel(a) => assert_eq!(a.pkid, p2.pkid),
        other => panic!("expected the PUBREL of {} again, got {other:?}", p2.pkid),
    }
    match sub.expect("the QoS 2 PUBLISH again").await {
        Packet::Publish(p) => {
            assert!(p.dup, "resent with DUP");
            assert_eq!(
                (p.pkid, p.qos, text(&p.payload)),
                (p3.pkid, QoS::ExactlyOnce, "three".into())
            );
        }
        other => panic!("expected the QoS 2 PUBLISH again, got {other:?}"),
    }
    sub.send(Packet::PubAck(ack(p1.pkid))).await;
    sub.send(Packet::PubComp(ack(p2.pkid))).await;
    sub.acknowledge(&p3).await;
    sub.expect_quiet("once everything is acknowledged").await;
    sub.disconnect().await;
    b.stop().await;

    // The acknowledgements reached the store: nothing is resent after another restart.
    let b = start(dir.path()).await;
    let mut sub = connect(&b, connect_expiry("inflight", false, 3600), true).await;
    sub.expect_quiet("after everything was acknowledged").await;
    sub.disconnect().await;
    b.stop().await;
}

#[tokio::test]
async fn an_incoming_qos2_id_awaiting_pubrel_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(dir.path()).await;
    let mut watcher = connect(&b, persistent_v311("watcher"), false).await;
    watcher.subscribe_ok(&[("in/#", QoS::AtLeastOnce)]).await;
    let mut publisher = connect(&b, connect_expiry("qos2-pub", true, 3600), false).await;
    let mut first = plain("in/x", b"once", QoS::ExactlyOnce);
    first.pkid = 7;
    publisher.send(Packet::Publish(first.clone())).await;
    publisher
        .wait_for("PUBREC", |p| matches!(p, Packet::PubRec(a) if a.pkid == 7))
        .await;
    let got = watcher.receive_v311().await;
    assert_eq!(text(&got.payload), "once");
    drop(publisher); // before its PUBREL
    watcher.disconnect().await;
    b.stop().await;

    let b = start(dir.path()).await;
    let mut publisher = connect(&b, connect_expiry("qos2-pub", false, 3600), true).await;
    // The client resends the PUBLISH (same id, DUP): acknowledged, not delivered again.
    publisher
        .send(Packet::Publish(Publish {
            dup: true,
            ..first.clone()
        }))
        .await;
    match publisher
        .wait_for("PUBREC", |p| matches!(p, Packet::PubRec(_)))
        .await
    {
        Packet::PubRec(a) => assert_eq!((a.pkid, a.reason), (7, ReasonCode::Success)),
        _ => unreachable!(),
    }
    publisher.send(Packet::PubRel(ack(7))).await;
    match publisher
        .wait_for("PUBCOMP", |p| matches!(p, Packet::PubComp(_)))
        .await
    {
        Packet::PubComp(a) => assert_eq!(
            (a.pkid, a.reason),
            (7, ReasonCode::Success),
            "the id was known: it waited for this PUBREL"
        ),
        _ => unreachable!(),
    }
    let mut watcher = connect(&b, persistent_v311("watcher"), true).await;
    watcher
        .expect_quiet("after the resent QoS 2 PUBLISH: delivered once only")
        .await;
    watcher.disconnect().await;
    b.stop().await;

    // The PUBREL released the id in the store too: a new message with it is delivered.
    let b = start(dir.path()).await;
    let mut publisher = connect(&b, connect_expiry("qos2-pub", false, 3600), true).await;
    let mut watcher = connect(&b, persistent_v311("watcher"), true).await;
    let mut second = plain("in/y", b"new", QoS::ExactlyOnce);
    second.pkid = 7;
    publisher.send(Packet::Publish(second)).await;
    publisher
        .wait_for("PUBREC", |p| matches!(p, Packet::PubRec(a) if a.pkid == 7))
        .await;
    publisher.send(Packet::PubRel(ack(7))).await;
    publisher
        .wait_for(
            "PUBCOMP",
            |p| matches!(p, Packet::PubComp(a) if a.pkid == 7),
        )
        .await;
    let got = watcher.receive_v311().await;
    assert_eq!(text(&got.payload), "new");
    watcher.disconnect().await;
    publisher.disconnect().await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------
// Restart: subscriptions, and what clients removed
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn subscriptions_keep_their_options_and_identifiers_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(dir.path()).await;
    let mut c = connect(&b, connect_expiry("opts", true, 3600), false).await;
    let no_local = SubOptions {
        no_local: true,
        ..opts(QoS::AtLeastOnce)
    };
    c.subscribe_opts("a/+", no_local, sub_id(5)).await;
    let rap = SubOptions {
        retain_as_published: true,
        ..opts(QoS::ExactlyOnce)
    };
    c.subscribe_opts("b/#", rap, sub_id(9)).await;
    c.subscribe("c/#", QoS::AtLeastOnce).await;
    c.subscribe("$share/g/s", QoS::AtLeastOnce).await;
    assert_eq!(c.unsubscribe(&["c/#"]).await, [ReasonCode::Success]);
    c.disconnect().await;
    b.stop().await;

    let b = start(dir.path()).await;
    let mut c = connect(&b, connect_expiry("opts", false, 3600), true).await;
    // No Local: its own message is not sent back to it.
    c.publish_expect(
        plain("a/x", b"mine", QoS::AtLeastOnce),
        ReasonCode::NoMatchingSubscribers,
    )
    .await;
    let mut other = Client::connect_v5(b.addr, "other").await;
    other
        .publish_expect(
            plain("a/x", b"granted 1", QoS::ExactlyOnce),
            ReasonCode::Success,
        )
        .await;
    other
        .publish_expect(
            retained("b/y", b"as published", QoS::ExactlyOnce),
            ReasonCode::Success,
        )
        .await;
    other
        .publish_expect(
            plain("c/z", b"unsubscribed", QoS::AtLeastOnce),
            ReasonCode::NoMatchingSubscribers,
        )
        .await;
    other
        .publish_expect(plain("s", b"shared", QoS::AtLeastOnce), ReasonCode::Success)
        .await;
    let got = drain(&mut c).await;
    assert_eq!(payloads(&got), ["granted 1", "as published", "shared"]);
    assert_eq!(got[0].qos, QoS::AtLeastOnce, "at the subscription's QoS");
    assert_eq!(props_of(&got[0]).subscription_identifiers, [5]);
    assert!(got[1].retain, "Retain As Published");
    assert_eq!(got[1].qos, QoS::ExactlyOnce);
    assert_eq!(props_of(&got[1]).subscription_identifiers, [9]);
    assert!(props_of(&got[2]).subscription_identifiers.is_empty());
    other.disconnect().await;
    c.disconnect().await;
    b.stop().await;
}

#[tokio::test]
async fn what_clients_removed_stays_removed_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(dir.path()).await;
    let mut taken = connect(&b, persistent_v311("taken"), false).await;
    taken.subscribe_ok(&[("t/#", QoS::AtLeastOnce)]).await;
    taken.disconnect().await;
    let mut publisher = Client::connect_v311(b.addr, "pub").await;
    publisher
        .publish_v311("t/1", b"queued", QoS::AtLeastOnce, false)
        .await;
    publisher
        .publish_v311("gone/1", b"set", QoS::AtLeastOnce, true)
        .await;
    publisher
        .publish_v311("gone/1", b"", QoS::AtLeastOnce, true)
        .await;
    publisher
        .publish_v311("kept/1", b"kept", QoS::AtLeastOnce, true)
        .await;
    publisher.disconnect().await;
    // A 5.0 session whose expiry the DISCONNECT changes to 0 ends with it.
    let mut ending = connect(&b, connect_expiry("ending", true, 3600), false).await;
    ending.subscribe("t/#", QoS::AtLeastOnce).await;
    ending
        .disconnect_with(ReasonCode::Success, expiry_session(0))
        .await;
    b.stop().await;

    // The stored session is discarded by a clean start after the restart.
    let b = start(dir.path()).await;
    let taken = connect(&b, connect_v311("taken"), false).await;
    taken.disconnect().await;
    b.stop().await;

    let b = start(dir.path()).await;
    let mut taken = connect(&b, persistent_v311("taken"), false).await;
    taken.expect_quiet("in a new session").await;
    taken
        .subscribe_ok(&[("gone/#", QoS::AtLeastOnce), ("kept/#", QoS::AtLeastOnce)])
        .await;
    let got = drain(&mut taken).await;
    assert_eq!(
        payloads(&got),
        ["kept"],
        "the cleared retained message stays cleared"
    );
    taken.disconnect().await;
    let ending = connect(&b, connect_expiry("ending", false, 3600), false).await;
    ending.disconnect().await;
    b.stop().await;
}

#[tokio::test]
async fn sys_topics_are_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::with(|c| {
        persistent(c, dir.path(), SyncMode::Always);
        c.sys_interval = 1;
    })
    .await;
    let mut watcher = Client::connect_v311(b.addr, "watcher").await;
    watcher
        .subscribe_ok(&[("$SYS/broker/version", QoS::AtMostOnce)])
        .await;
    assert!(watcher.receive_v311().await.retain, "$SYS is retained");
    watcher.disconnect().await;
    b.stop().await;

    // Without $SYS publishing after the restart, nothing of the last run's is there.
    let b = start(dir.path()).await;
    let mut watcher = Client::connect_v311(b.addr, "watcher").await;
    watcher.subscribe_ok(&[("$SYS/#", QoS::AtMostOnce)]).await;
    watcher.expect_quiet("from $SYS of the last run").await;
    watcher.disconnect().await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------
// Restart: wills and expiry deadlines (wall-clock time passes while the broker is down)
// ---------------------------------------------------------------------------------------

/// A 5.0 CONNECT with a Session Expiry Interval and a will on `will/<id>` delayed by
/// `delay` seconds.
fn with_will(client_id: &str, expiry: u32, delay: u32) -> Connect {
    Connect {
        properties: expiry_session(expiry),
        ..connect_with_will(
            client_id,
            &format!("will/{client_id}"),
            client_id,
            will_delay(delay),
        )
    }
}

/// Waits until the broker holds `client_id`'s session offline (its connection gone).
async fn wait_offline(b: &TestBroker, client_id: &str) {
    let broker = b.broker().clone();
    let id = client_id.to_owned();
    eventually(&format!("{client_id} offline"), WAIT, move || {
        broker
            .session(&id)
            .is_some_and(|s| s.inspect(|s| s.offline_since.is_some()))
    })
    .await;
}

#[tokio::test]
async fn what_expired_while_the_broker_was_down_is_gone() {
    const DOWN: Duration = Duration::from_millis(1500);
    const LATE_WILL_DELAY: u32 = 3;
    let dir = tempfile::tempdir().unwrap();
    let b = start(dir.path()).await;
    let mut watchers = Vec::new();
    for i in 0..3 {
        let mut w = connect(&b, connect_expiry(&format!("watch-{i}"), true, 3600), false).await;
        w.subscribe("will/#", QoS::AtLeastOnce).await;
        w.disconnect().await;
        watchers.push(format!("watch-{i}"));
    }
    let mut short = connect(&b, connect_expiry("short", true, 1), false).await;
    short.subscribe("m/#", QoS::AtLeastOnce).await;
    short.disconnect().await;
    let mut shrunk = connect(&b, connect_expiry("shrunk", true, 3600), false).await;
    shrunk.subscribe("m/#", QoS::AtLeastOnce).await;
    shrunk
        .disconnect_with(ReasonCode::Success, expiry_session(1))
        .await;
    let mut long = connect(&b, connect_expiry("long", true, 3600), false).await;
    long.subscribe("m/#", QoS::AtLeastOnce).await;
    long.disconnect().await;
    let mut publisher = Client::connect_v5(b.addr, "pub").await;
    for (topic, payload, expiry, retain) in [
        ("m/1", "expires", Some(1), false),
        ("m/2", "stays", None, false),
        ("ret/short", "expires", Some(1), true),
        ("ret/long", "stays", Some(100), true),
    ] {
        let props = expiry.map_or_else(Properties::default, expiry_props);
        let mut m = message(topic, payload.as_bytes(), QoS::AtLeastOnce, props);
        m.retain = retain;
        publisher.publish(m).await;
    }
    publisher.disconnect().await;
    // Wills: (a) its session ends while the broker is down, before its delay: it goes at
    // the end of the session; (b) its delay ends while the broker is down; (c) its delay
    // ends after the restart; (d) its client comes back first, which cancels it.
    let mut dropped = None;
    for (id, expiry, delay) in [
        ("a", 1, 60),
        ("b", 3600, 1),
        ("c", 3600, LATE_WILL_DELAY),
        ("d", 3600, 3600),
    ] {
        let (c, _) = Client::accepted(b.addr, with_will(id, expiry, delay)).await;
        if id == "c" {
            dropped = Some(Instant::now());
        }
        drop(c); // no DISCONNECT: the will stands
        wait_offline(&b, id).await;
    }
    let dropped = dropped.unwrap();
    b.stop().await;
    std::thread::sleep(DOWN);

    let b = start(dir.path()).await;
    for id in ["short", "shrunk"] {
        let mut c = connect(&b, connect_expiry(id, false, 3600), false).await;
        c.expect_quiet("in a new session: the old one expired")
            .await;
        c.disconnect().await;
    }
    let restored = b.broker().session("long").expect("long's session is back");
    assert_eq!(
        restored.inspect(|s| s.queued()),
        1,
        "the expired message left the queue at start"
    );
    let mut long = connect(&b, connect_expiry("long", false, 3600), true).await;
    let got = drain(&mut long).await;
    assert_eq!(
        payloads(&got),
        ["stays"],
        "the expired message is not delivered"
    );
    long.disconnect().await;
    let mut reader = Client::connect_v5(b.addr, "reader").await;
    reader.subscribe("ret/#", QoS::AtLeastOnce).await;
    let got = drain(&mut reader).await;
    assert_eq!(topics(&got), BTreeSet::from(["ret/long".to_owned()]));
    let left = props_of(&got[0]).message_expiry_interval.unwrap();
    assert!(
        left < 100,
        "the retained message's expiry counted on: {left} s left"
    );
    reader.disconnect().await;
    let back = Connect {
        clean_start: false,
        ..with_will("d", 3600, 3600)
    };
    let d = connect(&b, back, true).await;
    // Every watcher, however the restart ordered the sessions, gets the wills due at
    // start, and the late one at its time, not before; d's was cancelled.
    let mut clients = Vec::new();
    for id in &watchers {
        let mut w = connect(&b, connect_expiry(id, false, 3600), true).await;
        let mut got = Vec::new();
        for _ in 0..3 {
            let will = w.receive().await;
            if will.topic == "will/c" {
                assert!(
                    dropped.elapsed() >= Duration::from_secs(LATE_WILL_DELAY.into()),
                    "{id}: will/c came {:?} after its client left, before its delay",
                    dropped.elapsed()
                );
            }
            got.push(will);
        }
        let wanted = ["will/a", "will/b", "will/c"].map(str::to_owned);
        assert_eq!(topics(&got), BTreeSet::from(wanted), "{id}: the wills");
        w.expect_quiet("after the wills: d's was cancelled").await;
        clients.push(w);
    }
    for w in clients {
        w.disconnect().await;
    }
    d.disconnect().await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------
// sync = "always"
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn under_sync_always_every_acknowledgement_comes() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::with(|c| persistent(c, dir.path(), SyncMode::Always)).await;
    // Nothing of these is stored (no retained message, no persistent subscriber): the
    // acknowledgements wait for the store all the same, and must not wait for ever.
    let mut clean = Client::connect_v5(b.addr, "clean").await;
    clean.subscribe("x/#", QoS::ExactlyOnce).await;
    let mut publisher = Client::connect_v5(b.addr, "pub").await;
    for qos in [QoS::AtLeastOnce, QoS::ExactlyOnce] {
        publisher
            .publish_expect(plain("x/1", b"x", qos), ReasonCode::Success)
            .await;
        publisher
            .publish_expect(
                plain("nobody", b"x", qos),
                ReasonCode::NoMatchingSubscribers,
            )
            .await;
    }
    assert_eq!(drain(&mut clean).await.len(), 2);
    clean.disconnect().await;
    publisher.disconnect().await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------
// mosquitto's clients
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn mosquitto_sub_resumes_its_session_after_a_restart() {
    if !clients_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let b = start(dir.path()).await;
    let args = ["-c", "-i", "mosq-resume", "-q", "1", "-t", "inbox/#", "-v"];
    let mut first = args.to_vec();
    first.push("-E"); // subscribe, then disconnect
    mosquitto::mosquitto_sub(&b, &first).output().await;
    mosquitto::publish_lines(&b, &["-q", "1", "-t", "inbox/a"], &["one", "two", "three"]).await;
    b.stop().await;

    let b = start(dir.path()).await;
    let mut again = args.to_vec();
    again.extend(["-C", "3"]);
    let lines = mosquitto::mosquitto_sub(&b, &again).output().await;
    assert_eq!(lines, ["inbox/a one", "inbox/a two", "inbox/a three"]);
    b.stop().await;
}

// ---------------------------------------------------------------------------------------
// The binary: crashes and damaged stores
// ---------------------------------------------------------------------------------------

/// Bound of every wait on the binary.
const BINARY_WAIT: Duration = Duration::from_secs(15);

/// A configuration for the binary: a TCP listener on a free port, the store in `data`.
fn binary_config(data: &Path, sync: &str, on_corruption: &str) -> String {
    format!(
        "log_level = \"info\"\n\
         [[listeners]]\ntype = \"tcp\"\nbind = \"127.0.0.1:0\"\nallow_anonymous = true\n\
         [session]\nmax_queued_messages = 1000000\n\
         [persistence]\nenabled = true\ndir = {data:?}\nsync = \"{sync}\"\non_corruption = \"{on_corruption}\"\n",
    )
}

/// Publishes numbered QoS 1 or 2 messages (`first`, `first + 1`, ...) to `topic`, a
/// window of them unacknowledged at a time, until the connection breaks; returns the
/// numbers the broker acknowledged (PUBACK, or PUBREC for QoS 2, which is then released),
/// and the highest number sent.
async fn publish_until_broken(
    addr: SocketAddr,
    topic: &str,
    qos: QoS,
    first: u64,
    flowing: Arc<AtomicBool>,
) -> (Vec<u64>, u64) {
    // Below ternmq's Receive Maximum (20) for QoS 2, whose exchanges last until PUBCOMP.
    let window = if qos == QoS::ExactlyOnce { 16 } else { 32 };
    let (mut c, _) = Client::accepted(addr, connect_v5("numbered")).await;
    let mut next = first;
    let mut waiting = std::collections::HashMap::new();
    let mut acked = Vec::new();
    use tokio::io::AsyncWriteExt;
    loop {
        while waiting.len() < window {
            let pkid = c.pkid();
            let payload = next.to_string();
            let mut p = plain(topic, payload.as_bytes(), qos);
            p.pkid = pkid;
            let encoded = encode(&Packet::Publish(p), Protocol::V5);
            if c.stream.write_all(&encoded).await.is_err() {
                return (acked, next - 1);
            }
            waiting.insert(pkid, Some(next));
            next += 1;
        }
        match c.next_event(BINARY_WAIT).await {
            Event::Packet(Packet::PubAck(Ack { pkid, reason, .. })) => {
                assert!(!reason.is_error(), "PUBACK {reason:?}");
                acked.extend(waiting.remove(&pkid).flatten());
                flowing.store(true, Ordering::Relaxed);
            }
            Event::Packet(Packet::PubRec(Ack { pkid, reason, .. })) => {
                assert!(!reason.is_error(), "PUBREC {reason:?}");
                // Acknowledged; the exchange holds its place until PUBCOMP.
                acked.extend(waiting.get_mut(&pkid).and_then(Option::take));
                flowing.store(true, Ordering::Relaxed);
                let pubrel = encode(&Packet::PubRel(ack(pkid)), Protocol::V5);
                if c.stream.write_all(&pubrel).await.is_err() {
                    return (acked, next - 1);
                }
            }
            Event::Packet(Packet::PubComp(Ack { pkid, .. })) => {
                waiting.remove(&pkid);
            }
            Event::Packet(other) => panic!("publisher: unexpected {other:?}"),
            Event::Closed(_) => return (acked, next - 1),
            Event::Timeout => panic!("publisher: no acknowledgement within {BINARY_WAIT:?}"),
        }
    }
}

#[tokio::test]
async fn kill_9_under_sync_always_loses_no_acknowledged_message() {
    const ROUNDS: usize = 4;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
        | 1;
    println!("seed {seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let config = binary_config(&dir.path().join("data"), "always", "recover");
    let mut broker = BrokerProcess::start(&config);
    let addr = broker.addr;
    let mut sub = connect_at(addr, persistent_v311("offline"), false).await;
    sub.subscribe_ok(&[("n", QoS::AtLeastOnce)]).await;
    sub.disconnect().await;
    let mut addr = addr;
    let mut first = 1;
    for round in 0..ROUNDS {
        let flowing = Arc::new(AtomicBool::new(false));
        // QoS 1 and QoS 2 rounds in turn: a PUBREC, like a PUBACK, waits for the disk.
        let qos = [QoS::AtLeastOnce, QoS::ExactlyOnce][round % 2];
        let publisher = tokio::spawn(publish_until_broken(addr, "n", qos, first, flowing.clone()));
        // Kill at a random moment once messages flow.
        eventually("the first PUBACK", BINARY_WAIT, || {
            flowing.load(Ordering::Relaxed)
        })
        .await;
        let kill_after = Duration::from_millis(rng.below(400));
        tokio::time::sleep(kill_after).await;
        broker.kill_9();
        let (acked, last_sent) = publisher.await.unwrap();
        assert!(
            !acked.is_empty(),
            "round {round}: nothing acknowledged in {kill_after:?}"
        );

        broker = BrokerProcess::start(&config);
        addr = broker.addr;
        let mut sub = connect_at(addr, persistent_v311("offline"), true).await;
        let got: BTreeSet<u64> = drain(&mut sub)
            .await
            .iter()
            .map(|p| text(&p.payload).parse().unwrap())
            .collect();
        sub.disconnect().await;
        let lost: Vec<u64> = acked.iter().copied().filter(|n| !got.contains(n)).collect();
        assert!(
            lost.is_empty(),
            "round {round} ({qos:?}, seed {seed}, killed after {kill_after:?}): {} of {} \
             acknowledged messages lost, e.g. {:?}\n{}",
            lost.len(),
            acked.len(),
            &lost[..lost.len().min(10)],
            broker.log()
        );
        assert!(
            got.iter().all(|n| (first..=last_sent).contains(n)),
            "round {round}: only what was sent is delivered"
        );
        first = last_sent + 1;
    }
    broker.terminate();
}

/// `connect`, to an address.
async fn connect_at(addr: SocketAddr, connect: Connect, present: bool) -> Client {
    let id = connect.client_id.to_string();
    let (c, got) = Client::connect_accepted(addr, connect).await;
    assert_eq!(got, present, "{id}: Session Present");
    c
}

/// Queues `count` numbered messages for the offline persistent client "victim", one
/// acknowledged PUBLISH (so one commit, under `always`) at a time.
async fn queue_numbered(addr: SocketAddr, count: u64) {
    let mut sub = connect_at(addr, persistent_v311("victim"), false).await;
    sub.subscribe_ok(&[("v", QoS::AtLeastOnce)]).await;
    sub.disconnect().await;
    let mut publisher = Client::connect_v311(addr, "pub").await;
    for n in 1..=count {
        publisher
            .publish_v311("v", n.to_string().as_bytes(), QoS::AtLeastOnce, false)
            .await;
    }
    publisher.disconnect().await;
}

/// The numbers queued for "victim" (connecting resumes its session, if there is one).
async fn queued_numbers(addr: SocketAddr) -> Vec<u64> {
    let (mut sub, _) = Client::connect_accepted(addr, persistent_v311("victim")).await;
    let got = drain(&mut sub).await;
    sub.disconnect().await;
    got.iter()
        .map(|p| text(&p.payload).parse().unwrap())
        .collect()
}

/// The value of `key=` in the log line containing `line`.
fn logged(log: &str, line: &str, key: &str) -> Option<u64> {
    log.lines().filter(|l| l.contains(line)).find_map(|l| {
        l.split(&format!("{key}="))
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

#[tokio::test]
async fn a_store_cut_mid_record_after_a_crash_starts_with_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // "stop" too: a torn tail is what a crash leaves, not damage.
    let config = binary_config(&data, "always", "stop");
    let mut broker = BrokerProcess::start(&config);
    let addr = broker.addr;
    queue_numbered(addr, 40).await;
    broker.kill_9();
    let (journal, end) = newest_journal(&data);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&journal)
        .unwrap();
    f.set_len(end - 20).unwrap();
    drop(f);

    // With an admin listener this time: the cut is counted in /metrics too.
    let token = "persistence-test-token-0123";
    let with_admin = format!(
        "{config}[[listeners]]\ntype = \"admin\"\nbind = \"127.0.0.1:0\"\ntoken = \"{token}\"\n"
    );
    let mut broker = BrokerProcess::start(&with_admin);
    let addr = broker.addr;
    let log = broker.wait_for_log("the recovery report", |log| {
        log.lines()
            .any(|l| l.contains("state restored from the store"))
            .then(|| log.to_owned())
    });
    let cut = logged(&log, "the store was damaged", "discarded_tail_bytes");
    assert!(cut.is_some_and(|n| n > 0), "the cut is reported:\n{log}");
    let admin = broker.addrs(ternmq::config::ListenerKind::Admin)[0];
    let auth = format!("Bearer {token}");
    let metrics = request(admin, "GET", "/metrics", &[("Authorization", &auth)], b"").await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    let line = cut.map(|n| format!("ternmq_store_bytes_cut_total {n}"));
    assert!(
        line.is_some_and(|l| text.lines().any(|t| t == l)),
        "counted in /metrics:\n{text}"
    );
    assert_eq!(
        logged(&log, "state restored from the store", "sessions"),
        Some(1),
        "{log}"
    );
    let got = queued_numbers(addr).await;
    assert_eq!(got, (1..=39).collect::<Vec<_>>(), "all but the last commit");
    broker.terminate();
}

#[tokio::test]
async fn zeros_in_the_store_stop_the_broker_or_leave_it_with_what_could_be_read() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let recover = binary_config(&data, "always", "recover");
    let mut broker = BrokerProcess::start(&recover);
    let addr = broker.addr;
    queue_numbered(addr, 60).await;
    broker.terminate();
    let (journal, end) = newest_journal(&data);
    zero(&journal, end / 2, 4096);
    let damaged = std::fs::read(&journal).unwrap();

    let stop = binary_config(&data, "always", "stop");
    let (status, log) = BrokerProcess::run_to_exit(&stop);
    assert_eq!(status.code(), Some(1), "refuses to start:\n{log}");
    assert!(
        log.contains("is damaged") && log.contains(&data.join("db").display().to_string()),
        "a clear error naming the store:\n{log}"
    );
    assert!(log.contains("on_corruption"), "says what to do:\n{log}");
    assert!(
        std::fs::read(&journal).unwrap() == damaged,
        "the journal is left as it was (fjall cut it while opening)"
    );

    let mut broker = BrokerProcess::start(&recover);
    let addr = broker.addr;
    let log = broker.wait_for_log("the recovery report", |log| {
        log.lines()
            .any(|l| l.contains("state restored from the store"))
            .then(|| log.to_owned())
    });
    assert!(
        log.contains("the store was damaged"),
        "reported as an error:\n{log}"
    );
    assert_kept(&data, &journal, &damaged[..end as usize], &log);
    let got = queued_numbers(addr).await;
    assert!(
        !got.is_empty() && got.len() < 60,
        "what was before the damage: {got:?}\n{log}"
    );
    assert_eq!(
        got,
        (1..=got.len() as u64).collect::<Vec<_>>(),
        "a prefix, in order"
    );
    broker.terminate();
}

/// Asserts that `data` holds one `journal.cut-<time>` directory, named in `log`, with a copy
/// of `journal` holding `bytes`.
fn assert_kept(data: &Path, journal: &Path, bytes: &[u8], log: &str) {
    let kept: Vec<_> = std::fs::read_dir(data)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("journal.cut-"))
        })
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}\n{log}");
    assert!(
        log.contains(&kept[0].display().to_string()),
        "the log says where:\n{log}"
    );
    let copy = std::fs::read(kept[0].join(journal.file_name().unwrap())).unwrap();
    assert!(copy == bytes, "the journal's bytes as they were, kept");
}

/// After a crash a cut journal is taken for a torn write; if it was damage instead (here:
/// zeros in its middle), what the engine cut is kept all the same.
#[tokio::test]
async fn zeros_in_the_journal_after_a_crash_are_kept_aside() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = binary_config(&data, "always", "recover");
    let mut broker = BrokerProcess::start(&config);
    queue_numbered(broker.addr, 60).await;
    broker.kill_9();
    let (journal, end) = newest_journal(&data);
    zero(&journal, end / 2, 4096);
    let damaged = std::fs::read(&journal).unwrap();

    let mut broker = BrokerProcess::start(&config);
    let log = broker.wait_for_log("the recovery report", |log| {
        log.lines()
            .any(|l| l.contains("state restored from the store"))
            .then(|| log.to_owned())
    });
    assert!(
        logged(&log, "the store was damaged", "discarded_tail_bytes").is_some_and(|n| n > 0),
        "the cut is reported:\n{log}"
    );
    assert_kept(&data, &journal, &damaged[..end as usize], &log);
    let got = queued_numbers(broker.addr).await;
    assert_eq!(got, (1..=got.len() as u64).collect::<Vec<_>>(), "a prefix");
    assert!(got.len() < 60, "{got:?}");
    broker.terminate();
}

#[tokio::test]
async fn a_sigterm_as_soon_as_the_broker_listens_closes_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = binary_config(&data, "interval", "stop");
    let mut broker = BrokerProcess::start(&config);
    broker.terminate();
    assert!(
        data.join("clean-shutdown").exists(),
        "a clean shutdown, not the signal's default action:\n{}",
        broker.log()
    );
}

/// Queues spill to disk rather than fill the memory budget: an offline persistent
/// subscriber is sent three times the broker's message memory at QoS 1; every publish is
/// accepted, the memory in use stays under the budget, and the subscriber gets every
/// message, in order, when it comes back, after a restart too (which reads only the head
/// of the queue back into memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_past_the_memory_budget_spill_to_disk() {
    const BUDGET: usize = 1 << 20;
    const MESSAGES: usize = 3 * 1024;
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = |cfg: &mut Config| {
        persistent(cfg, dir.path(), SyncMode::Interval);
        cfg.limits.max_queued_memory = BUDGET;
        cfg.session.max_queued_messages = 10 * MESSAGES;
    };
    let b = TestBroker::with(config).await;
    let (mut sub, _) = Client::accepted(b.addr, connect_expiry("away", true, 3600)).await;
    sub.subscribe("spill/t", QoS::AtLeastOnce).await;
    sub.disconnect_with(ReasonCode::Success, Default::default())
        .await;

    let mut publisher = Client::connect_v5(b.addr, "pub").await;
    let payload = vec![0xA5u8; 1024];
    let mut peak = 0;
    for i in 0..MESSAGES {
        let mut p = payload.clone();
        p[..8].copy_from_slice(&(i as u64).to_be_bytes());
        let code = publisher
            .publish(plain("spill/t", &p, QoS::AtLeastOnce))
            .await;
        assert_eq!(code, ReasonCode::Success, "publish #{i}");
        peak = peak.max(b.broker().memory.used());
    }
    assert!(
        peak < BUDGET,
        "message memory reached {peak} bytes of a {BUDGET} budget"
    );
    let spilled = b
        .broker()
        .session("away")
        .expect("stored session")
        .inspect(|s| s.spilled());
    assert!(spilled > MESSAGES / 2, "only {spilled} messages spilled");
    publisher.disconnect().await;
    b.stop().await;

    let b = TestBroker::with(config).await;
    let held = b.broker().memory.used();
    assert!(held < BUDGET, "{held} bytes restored into memory");
    let (mut sub, ack) = Client::accepted(b.addr, connect_expiry("away", false, 3600)).await;
    assert!(ack.session_present);
    for i in 0..MESSAGES {
        let p = sub.receive().await;
        let n = u64::from_be_bytes(p.payload[..8].try_into().expect("8 bytes"));
        assert_eq!(n, i as u64, "every message, in order");
    }
    sub.expect_quiet("after every message").await;
    let left = b
        .broker()
        .session("away")
        .expect("session")
        .inspect(|s| (s.queued(), s.spilled()));
    assert_eq!(left, (0, 0));
    b.stop().await;
}

// ---------------------------------------------------------------------------------------
// The disk budget (max_disk_bytes) and HTTP publishers
// ---------------------------------------------------------------------------------------

/// The smallest disk budget the configuration takes.
const SMALL_DISK: u64 = 1 << 20;

/// `len` bytes no compression shrinks, so that they take their size on disk.
fn noise(rng: &mut Rng, len: usize) -> Vec<u8> {
    (0..len).map(|_| rng.below(256) as u8).collect()
}

fn seeded() -> Rng {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.subsec_nanos() as u64)
        | 1;
    println!("seed {seed}");
    Rng(seed)
}

/// Past `max_disk_bytes` the broker refuses what it would store, before acknowledging it:
/// 5.0 publishers get 0x97 in the PUBACK / PUBREC, a 3.1.1 publisher (which cannot be told)
/// is disconnected, QoS 0 is still taken. Every message that was acknowledged reaches the
/// persistent subscriber it was queued for; none that was refused does.
#[tokio::test]
async fn past_the_disk_budget_kept_messages_are_refused_before_acknowledgement() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let b = TestBroker::with(|c| {
        persistent(c, dir.path(), SyncMode::Interval);
        c.persistence.max_disk_bytes = SMALL_DISK;
    })
    .await;
    let (mut away, _) = Client::accepted(b.addr, connect_expiry("away", true, 3600)).await;
    away.subscribe("q/#", QoS::AtLeastOnce).await;
    away.disconnect().await;

    // Numbered, incompressible 16 KiB messages queued for "away" until the store is full
    // (its size is measured twice a second: a pause per message lets it catch up).
    let mut rng = seeded();
    let mut publisher = Client::connect_v5(b.addr, "pub").await;
    let mut acked = Vec::new();
    for n in 0u64..1000 {
        let mut payload = noise(&mut rng, 16 << 10);
        payload[..8].copy_from_slice(&n.to_be_bytes());
        match publisher
            .publish(plain("q/n", &payload, QoS::AtLeastOnce))
            .await
        {
            ReasonCode::Success => acked.push(n),
            ReasonCode::QuotaExceeded => break,
            other => panic!("message {n}: PUBACK {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        acked.len() < 1000,
        "never refused: {} messages of 16 KiB taken under a 1 MiB disk budget",
        acked.len()
    );
    assert!(acked.len() >= 32, "refused early: {} taken", acked.len());
    publisher
        .publish_expect(
            plain("q/2", b"x", QoS::ExactlyOnce),
            ReasonCode::QuotaExceeded,
        )
        .await;
    publisher
        .publish_expect(retained("r", b"x", QoS::AtMostOnce), ReasonCode::Success)
        .await;
    assert_eq!(
        b.broker().router.retained_count(),
        0,
        "a retained QoS 0 message is dropped"
    );
    publisher
        .publish_expect(plain("q/0", b"x", QoS::AtMostOnce), ReasonCode::Success)
        .await;
    publisher.disconnect().await;

    let mut old = Client::connect_v311(b.addr, "old").await;
    let pkid = old.pkid();
    old.send(Packet::Publish(publish_packet(
        "q/n",
        b"x",
        QoS::AtLeastOnce,
        false,
        pkid,
    )))
    .await;
    match old.next_event(Duration::from_secs(10)).await {
        Event::Closed(_) => {}
        Event::Packet(p) => panic!("3.1.1 publisher: {p:?} instead of being disconnected"),
        Event::Timeout => panic!("3.1.1 publisher: neither acknowledged nor disconnected"),
    }

    let (mut away, _) = Client::accepted(b.addr, connect_expiry("away", false, 3600)).await;
    let got: Vec<u64> = drain(&mut away)
        .await
        .iter()
        .map(|p| {
            let n: [u8; 8] = p.payload[..8].try_into().expect("numbered");
            u64::from_be_bytes(n)
        })
        .collect();
    assert_eq!(
        got, acked,
        "every acknowledged message, and nothing refused"
    );
    away.disconnect().await;
    b.stop().await;
}

/// HTTP publish obeys the store as MQTT publishers do: past the disk budget a message the
/// broker would keep (retained, QoS 1/2) is refused with 503 `store` and not routed.
#[tokio::test]
async fn past_the_disk_budget_http_publish_answers_503_and_routes_nothing() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let b = TestBroker::with_http(|c| {
        persistent(c, dir.path(), SyncMode::Interval);
        c.persistence.max_disk_bytes = SMALL_DISK;
    })
    .await;
    let http = b.http_addr();
    let mut sub = Client::connect_v5(b.addr, "sub").await;
    sub.subscribe("fill/#", QoS::AtLeastOnce).await;

    let mut rng = seeded();
    let mut taken = 0;
    let mut refused = None;
    for i in 0..1000 {
        let path = format!("/publish?topic=fill/{i}&retain=1&qos=1");
        let r = request(http, "POST", &path, &[], &noise(&mut rng, 16 << 10)).await;
        if r.status != 200 {
            refused = Some(r);
            break;
        }
        taken += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = refused.expect("the disk budget refuses at last");
    assert_eq!(
        (r.status, r.error().as_str()),
        (503, "store"),
        "{:?}",
        r.json()
    );
    let r = request(http, "POST", "/publish?topic=fill/q1&qos=1", &[], b"x").await;
    assert_eq!((r.status, r.error().as_str()), (503, "store"));
    // QoS 0 is taken (and may be dropped), as from MQTT publishers.
    let r = request(http, "POST", "/publish?topic=fill/q0", &[], b"x").await;
    assert_eq!(r.status, 200);

    let got = drain(&mut sub).await;
    assert_eq!(got.len(), taken + 1, "the taken ones and the QoS 0 one");
    assert_eq!(got.last().map(|p| &*p.topic), Some("fill/q0"));
    assert_eq!(b.broker().router.retained_count(), taken);
    sub.disconnect().await;
    b.stop().await;
}

/// POSTs `body` to `path` on a connection of its own: the status, or None if the broker
/// went away first.
async fn try_post(addr: SocketAddr, path: &str, body: &[u8]) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.ok()?;
    s.write_all(body).await.ok()?;
    let mut answer = Vec::new();
    tokio::time::timeout(BINARY_WAIT, s.read_to_end(&mut answer))
        .await
        .ok()?
        .ok()?;
    String::from_utf8_lossy(&answer)
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

/// Under `sync = "always"` an HTTP publish's 200 comes after the message is on disk, as an
/// MQTT PUBACK does: publishers on 8 connections at once, the broker `kill -9`ed at a random
/// moment, every number that got its 200 is delivered after the restart.
#[tokio::test]
async fn kill_9_under_sync_always_loses_no_http_publish_answered_200() {
    const ROUNDS: u64 = 3;
    const PUBLISHERS: u64 = 8;
    let mut rng = seeded();
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = binary_config(&dir.path().join("data"), "always", "recover")
        + "[[listeners]]\ntype = \"http\"\nbind = \"127.0.0.1:0\"\nallow_anonymous = true\n";
    let mut broker = BrokerProcess::start(&config);
    let mut sub = connect_at(broker.addr, persistent_v311("offline"), false).await;
    sub.subscribe_ok(&[("h", QoS::AtLeastOnce)]).await;
    sub.disconnect().await;
    for round in 0..ROUNDS {
        let http = broker.addrs(ternmq::config::ListenerKind::Http)[0];
        let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let publishers: Vec<_> = (0..PUBLISHERS)
            .map(|p| {
                let answered = answered.clone();
                tokio::spawn(async move {
                    let mut acked = Vec::new();
                    // Numbers of this round and publisher: round * 1e9 + p + k * PUBLISHERS.
                    for n in (round * 1_000_000_000 + p..).step_by(PUBLISHERS as usize) {
                        match try_post(http, "/publish?topic=h&qos=1", n.to_string().as_bytes())
                            .await
                        {
                            Some(200) => acked.push(n),
                            Some(status) => panic!("publish {n}: {status}"),
                            None => return acked,
                        }
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    acked
                })
            })
            .collect();
        eventually("the first answers", BINARY_WAIT, || {
            answered.load(Ordering::Relaxed) >= 16
        })
        .await;
        let kill_after = Duration::from_millis(rng.below(300));
        tokio::time::sleep(kill_after).await;
        broker.kill_9();
        let mut acked = Vec::new();
        for p in publishers {
            acked.extend(p.await.expect("publisher"));
        }

        broker = BrokerProcess::start(&config);
        let mut sub = connect_at(broker.addr, persistent_v311("offline"), true).await;
        let got: BTreeSet<u64> = drain(&mut sub)
            .await
            .iter()
            .filter_map(|p| text(&p.payload).parse().ok())
            .collect();
        sub.disconnect().await;
        let lost: Vec<u64> = acked.iter().copied().filter(|n| !got.contains(n)).collect();
        assert!(
            lost.is_empty(),
            "round {round} (killed after {kill_after:?}): {} of {} publishes answered 200 \
             lost, e.g. {:?}\n{}",
            lost.len(),
            acked.len(),
            &lost[..lost.len().min(10)],
            broker.log()
        );
    }
    broker.terminate();
}
