//! Behaviour in time, on tokio's paused clock: keep-alive, the connect timeout, session
//! expiry, will delay and message expiry, each asserted at its exact virtual instant.
//!
//! The broker reads tokio's clock (`ternmq::clock::now`), and these brokers have no
//! sockets (`TestBroker::in_memory`): clients reach them through in-memory pipes, so with
//! `start_paused = true` time moves only when every task waits for a timer, and then
//! straight to the next one. A test takes no wall time, and whatever the machine's load
//! a 2 s keep-alive closes at 3 s exactly, not "between 2.5 and 4".
//!
//! Two rules keep the instants exact and the tests deterministic:
//! - a client waits longer than the broker timer it expects (`LONG`), and a timeout of the
//!   client is never due at the instant of a broker timer: timers due at the same instant
//!   fire in no particular order;
//! - a check made at the instant of a broker timer first lets the tasks woken at that
//!   instant run (`at`).

mod common;

use common::client::{
    connect_expiry, connect_v311, connect_v5, connect_with_will, expiry_props, expiry_session,
    message, plain, props_of, text, will_delay, Client, Event,
};
use common::TestBroker;
use std::time::Duration;
use ternmq::protocol::{
    ByteStr, Connect, Packet, Properties, Protocol, Publish, QoS, ReasonCode, Will,
};
use tokio::time::Instant;

/// Longer than any broker timer of these tests: a client waiting for something the broker
/// does at a given instant never gives up first.
const LONG: Duration = Duration::from_secs(3600);

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// Sleeps until `t`, then lets the tasks woken at `t` (the broker's timers due then) run
/// before going on: `yield_now` puts this task behind every task already woken.
async fn at(t: Instant) {
    tokio::time::sleep_until(t).await;
    tokio::task::yield_now().await;
}

/// Waits for the end of the connection: the DISCONNECT with `code` (5.0), or none (3.x),
/// then the close. Returns when it came, since `t0`.
async fn closed_after(c: &mut Client, code: Option<ReasonCode>, t0: Instant) -> Duration {
    match code {
        Some(code) => {
            c.expect_disconnect_within(code, LONG).await;
        }
        None => {
            c.expect_closed(LONG).await;
        }
    }
    t0.elapsed()
}

// =======================================================================================
// Keep-alive and the connect timeout
// =======================================================================================

/// Keep-alive 2 s: the connection is closed 1.5 × 2 = 3 s after the last complete packet
/// [MQTT-3.1.2-22], with DISCONNECT 0x8D in 5.0 and without a word in 3.1.1.
#[tokio::test(start_paused = true)]
async fn keep_alive_closes_at_one_and_a_half_times_after_the_last_packet() {
    let b = TestBroker::in_memory(|_| {});
    for (protocol, code) in [
        (Protocol::V5, Some(ReasonCode::KeepAliveTimeout)),
        (Protocol::V311, None),
    ] {
        let connect = Connect {
            protocol,
            keep_alive: 2,
            ..connect_v5(&format!("sleepy-{protocol:?}"))
        };
        let t0 = Instant::now();
        let (mut c, _) = Client::accepted(b.target(), connect).await;
        // The last complete packet: a PINGREQ at 0.5 s.
        tokio::time::sleep_until(t0 + secs(0.5)).await;
        assert!(c.ping().await.is_empty());
        assert_eq!(
            closed_after(&mut c, code, t0).await,
            secs(3.5),
            "{protocol:?}"
        );
    }
}

/// PINGREQs within 1.5 × the keep-alive keep the connection, however long; when they stop,
/// it closes 1.5 × the keep-alive after the last one.
#[tokio::test(start_paused = true)]
async fn pingreq_keeps_the_connection_alive() {
    let b = TestBroker::in_memory(|_| {});
    let connect = Connect {
        keep_alive: 1,
        ..connect_v311("pinger")
    };
    let t0 = Instant::now();
    let (mut c, _) = Client::accepted(b.target(), connect).await;
    // Every 1.4 s for a minute: each PINGREQ comes 0.1 s before the deadline.
    let mut last = t0;
    while last.duration_since(t0) < secs(60.0) {
        last += secs(1.4);
        tokio::time::sleep_until(last).await;
        assert!(c.ping().await.is_empty(), "answered at {:?}", last - t0);
    }
    let closed = closed_after(&mut c, None, last).await;
    assert_eq!(closed, secs(1.5));
}

/// The Server Keep Alive (here 1 s, for a client asking for 60) is the one enforced
/// [MQTT-3.2.2-21]: closed at 1.5 s.
#[tokio::test(start_paused = true)]
async fn server_keep_alive_is_enforced() {
    let b = TestBroker::in_memory(|cfg| cfg.mqtt.max_keepalive = 1);
    let t0 = Instant::now();
    let (mut c, ack) = Client::accepted(b.target(), connect_v5("ka-enforced")).await;
    assert_eq!(ack.properties.server_keep_alive, Some(1));
    let closed = closed_after(&mut c, Some(ReasonCode::KeepAliveTimeout), t0).await;
    assert_eq!(closed, secs(1.5));
}

/// The start of a PUBLISH declaring 268 MB, then one more byte every second: bytes of a
/// packet still incomplete do not keep a connection alive, only complete packets do
/// [MQTT-3.1.2-22]. With a keep-alive of 2 s and the last complete packet (a PINGREQ) at
/// 0.5 s, the connection is closed at 3.5 s, the trickle notwithstanding.
#[tokio::test(start_paused = true)]
async fn trickling_bytes_of_an_incomplete_packet_do_not_keep_a_connection_alive() {
    let b = TestBroker::in_memory(|_| {});
    for (protocol, code) in [
        (Protocol::V5, Some(ReasonCode::KeepAliveTimeout)),
        (Protocol::V311, None),
    ] {
        let connect = Connect {
            protocol,
            keep_alive: 2,
            ..connect_v5(&format!("trickler-{protocol:?}"))
        };
        let t0 = Instant::now();
        let (mut c, _) = Client::accepted(b.target(), connect).await;
        tokio::time::sleep_until(t0 + secs(0.5)).await;
        assert!(c.ping().await.is_empty());
        // PUBLISH QoS 0, Remaining Length 268,435,455 (the largest there is).
        tokio::time::sleep_until(t0 + secs(1.0)).await;
        c.send_raw(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F]).await;
        // Then a byte at 2 s, 3 s, 4 s, ... until the broker closes.
        let mut next_byte = t0 + secs(2.0);
        let end = loop {
            match c.next_event(next_byte - Instant::now()).await {
                Event::Timeout => {
                    // The broker may have closed its side meanwhile: the error is moot.
                    let _ = tokio::io::AsyncWriteExt::write_all(&mut c.stream, b"t").await;
                    next_byte += secs(1.0);
                }
                Event::Packet(Packet::Disconnect(d)) => break Some(d.reason),
                Event::Packet(p) => panic!("{protocol:?}: unexpected {p:?}"),
                Event::Closed(_) => break None,
            }
        };
        assert_eq!(end, code, "{protocol:?}: the end of the connection");
        assert_eq!(t0.elapsed(), secs(3.5), "{protocol:?}: closed at");
        if code.is_some() {
            c.expect_closed(LONG).await;
        }
    }
}

/// A connection that sends no CONNECT is closed `connect_timeout` (here 1 s) after it
/// opened.
#[tokio::test(start_paused = true)]
async fn no_connect_within_the_connect_timeout_closes_the_connection() {
    let b = TestBroker::in_memory(|cfg| cfg.mqtt.connect_timeout = 1);
    let t0 = Instant::now();
    let mut c = Client::open(b.target(), "silent", Protocol::V311).await;
    assert_eq!(closed_after(&mut c, None, t0).await, secs(1.0));
}

/// A connection logged in with a token ends when the token expires (`exp` + the 5 s
/// leeway), keep-alive or not: 5.0 gets DISCONNECT 0xA0, 3.1.1 is closed; the will goes
/// out, as for any end the client did not ask for.
#[tokio::test(start_paused = true)]
async fn a_token_login_ends_when_the_token_expires() {
    use jsonwebtoken::{encode, EncodingKey, Header};
    use std::time::{SystemTime, UNIX_EPOCH};
    let b = TestBroker::in_memory(|c| {
        c.listeners[0].allow_anonymous = false;
        c.auth.jwt = Some(ternmq::security::jwt::JwtConfig {
            secret: Some("k3y".into()),
            ..Default::default()
        });
    });
    let mut w = watcher(&b, "watcher", "will/#").await;
    for (protocol, code) in [
        (Protocol::V5, Some(ReasonCode::MaximumConnectTime)),
        (Protocol::V311, None),
    ] {
        // The token is checked on the wall clock, the connection's time on the paused one:
        // the broker reads the wall clock a little later (up to a second on a busy
        // machine), so its deadline may come that much before `valid`.
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let exp = wall.as_secs() + 30;
        let claims = serde_json::json!({"sub": "device", "exp": exp});
        let token = encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(b"k3y"),
        )
        .unwrap();
        let id = format!("device-{protocol:?}");
        let will = format!("will/{id}");
        let connect = Connect {
            protocol,
            username: Some(ByteStr::from("device")),
            password: Some(token.into_bytes().into()),
            ..connect_with_will(&id, &will, "gone", Properties::default())
        };
        let t0 = Instant::now();
        let (mut c, _) = Client::accepted(b.target(), connect).await;
        let valid = secs((exp + 5) as f64 - wall.as_secs_f64());
        at(t0 + valid - secs(2.0)).await;
        assert!(c.ping().await.is_empty(), "{protocol:?}: still in before");
        let closed = closed_after(&mut c, code, t0).await;
        // (Up to a millisecond late: tokio's timers round up to whole milliseconds.)
        assert!(
            closed <= valid + secs(0.001) && closed + secs(1.0) >= valid,
            "{protocol:?}: closed after {closed:?}, the token valid for {valid:?}"
        );
        assert_eq!(w.expect_publish().await.topic, will.as_str());
    }
}

// =======================================================================================
// Wills on keep-alive timeout and after a delay
// =======================================================================================

/// A subscriber to `topic` (5.0, QoS 1), without keep-alive so that it may wait any time.
async fn watcher(b: &TestBroker, id: &str, topic: &str) -> Client {
    let connect = Connect {
        keep_alive: 0,
        ..connect_v5(id)
    };
    let (mut sub, _) = Client::accepted(b.target(), connect).await;
    sub.subscribe(topic, QoS::AtLeastOnce).await;
    sub
}

/// The next PUBLISH, however long it takes; returns it with its arrival since `t0`.
async fn next_publish(c: &mut Client, t0: Instant) -> (Publish, Duration) {
    match c.recv(LONG).await {
        Some(Packet::Publish(p)) => {
            c.acknowledge(&p).await;
            (p, t0.elapsed())
        }
        other => panic!("{}: expected a PUBLISH, got {other:?}", c.name),
    }
}

/// A 3.1.1 client silent past its keep-alive (1 s) loses its connection at 1.5 s, and
/// its will is published then.
#[tokio::test(start_paused = true)]
async fn will_is_published_on_keep_alive_timeout() {
    let b = TestBroker::in_memory(|_| {});
    let mut sub = watcher(&b, "watcher", "will/#").await;
    let connect = Connect {
        keep_alive: 1,
        will: Some(Will {
            topic: ByteStr::from("will/w"),
            payload: "timed out".into(),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties::default(),
        }),
        ..connect_v311("w")
    };
    let t0 = Instant::now();
    let (mut c, _) = Client::accepted(b.target(), connect).await;
    let (will, when) = next_publish(&mut sub, t0).await;
    assert_eq!(
        (&*will.topic, text(&will.payload).as_str()),
        ("will/w", "timed out")
    );
    assert_eq!(when, secs(1.5));
    c.expect_closed(LONG).await;
}

/// Will Delay Interval 2 s: the will is published 2 s after the connection is lost
/// [MQTT-3.1.3-9], without the Will Delay property.
#[tokio::test(start_paused = true)]
async fn delayed_will_is_published_after_the_delay() {
    let b = TestBroker::in_memory(|_| {});
    let mut sub = watcher(&b, "wd-sub", "wd/t").await;
    let mut connect = connect_with_will("wd-victim", "wd/t", "gone", will_delay(2));
    connect.properties.session_expiry_interval = Some(10);
    let (victim, _) = Client::accepted(b.target(), connect).await;
    let t0 = Instant::now();
    drop(victim);
    let (p, when) = next_publish(&mut sub, t0).await;
    assert_eq!((&*p.topic, text(&p.payload).as_str()), ("wd/t", "gone"));
    assert_eq!(when, secs(2.0));
    assert_eq!(
        props_of(&p),
        Properties::default(),
        "no Will Delay forwarded"
    );
}

/// A session resumed within the Will Delay Interval (at 1.999 s of 2 s) cancels the will.
#[tokio::test(start_paused = true)]
async fn delayed_will_is_cancelled_when_the_session_resumes() {
    let b = TestBroker::in_memory(|_| {});
    let mut sub = watcher(&b, "wc-sub", "wc/t").await;
    let mut connect = connect_with_will("wc-victim", "wc/t", "gone", will_delay(2));
    connect.properties.session_expiry_interval = Some(10);
    let (victim, _) = Client::accepted(b.target(), connect).await;
    let t0 = Instant::now();
    drop(victim);
    at(t0 + secs(1.999)).await;
    let (_back, ack) = Client::accepted(b.target(), connect_expiry("wc-victim", false, 10)).await;
    assert!(ack.session_present, "resumed within the delay");
    tokio::time::sleep_until(t0 + secs(60.0)).await;
    sub.expect_quiet("a minute after the will delay of a resumed session")
        .await;
}

/// Takeover with Clean Start 0 resumes the session before its Will Delay Interval ends:
/// the will of the connection taken over is not published [MQTT-3.1.3-9].
#[tokio::test(start_paused = true)]
async fn takeover_resuming_the_session_cancels_the_delayed_will() {
    let b = TestBroker::in_memory(|_| {});
    let mut sub = watcher(&b, "twr-sub", "twr/t").await;
    let mut connect = connect_with_will("twr", "twr/t", "resumed", will_delay(1));
    connect.properties.session_expiry_interval = Some(60);
    let (mut old, _) = Client::accepted(b.target(), connect).await;
    let t0 = Instant::now();
    let (_new, ack) = Client::accepted(b.target(), connect_expiry("twr", false, 60)).await;
    assert!(ack.session_present);
    old.expect_disconnect(ReasonCode::SessionTakenOver).await;
    tokio::time::sleep_until(t0 + secs(120.0)).await;
    sub.expect_quiet("past the will delay of a session taken over")
        .await;
}

/// A Will Delay (30 s) longer than the Session Expiry Interval (1 s): the will is
/// published when the session ends, at 1 s [MQTT-3.1.3-9].
#[tokio::test(start_paused = true)]
async fn will_is_published_when_the_session_ends_first() {
    let b = TestBroker::in_memory(|_| {});
    let mut sub = watcher(&b, "we-sub", "we/t").await;
    let mut connect = connect_with_will("we-victim", "we/t", "gone", will_delay(30));
    connect.properties.session_expiry_interval = Some(1);
    let (victim, _) = Client::accepted(b.target(), connect).await;
    let t0 = Instant::now();
    drop(victim);
    let (p, when) = next_publish(&mut sub, t0).await;
    assert_eq!(text(&p.payload), "gone");
    assert_eq!(when, secs(1.0));
    assert!(
        b.broker().session("we-victim").is_none(),
        "the session ended"
    );
}

/// The will's Message Expiry Interval is its lifetime once published ("sent as the
/// Publication Expiry Interval when the Server publishes the Will Message", 3.1.3.2.4): a
/// will with 2 s, published 10 s after the CONNECT, arrives with 2 s.
#[tokio::test(start_paused = true)]
async fn will_message_expiry_counts_from_publication() {
    let b = TestBroker::in_memory(|_| {});
    let mut sub = watcher(&b, "wx-sub", "wx/t").await;
    let connect = connect_with_will("wx-victim", "wx/t", "gone", expiry_props(2));
    let (victim, _) = Client::accepted(b.target(), connect).await;
    tokio::time::sleep(secs(10.0)).await;
    let t0 = Instant::now();
    drop(victim);
    let (p, when) = next_publish(&mut sub, t0).await;
    assert_eq!((text(&p.payload).as_str(), when), ("gone", Duration::ZERO));
    assert_eq!(props_of(&p).message_expiry_interval, Some(2));
}

// =======================================================================================
// Session expiry
// =======================================================================================

/// Session Expiry Interval 5 s: a CONNECT (Clean Start 0) 4.999 s after the connection
/// ended resumes the session, with what was queued for it; one 5 s after the next end finds
/// it gone (Session Present 0, its subscription removed).
#[tokio::test(start_paused = true)]
async fn session_expires_exactly_at_its_interval() {
    let b = TestBroker::in_memory(|_| {});
    let (mut c, ack) = Client::accepted(b.target(), connect_expiry("lasting", true, 5)).await;
    assert_eq!(ack.properties.session_expiry_interval, None, "as asked");
    c.subscribe("lasting/t", QoS::AtLeastOnce).await;
    c.disconnect().await;
    let t0 = Instant::now();

    let mut publisher = Client::connect_v5(b.target(), "lasting-pub").await;
    for payload in ["m1", "m2"] {
        let p = plain("lasting/t", payload.as_bytes(), QoS::AtLeastOnce);
        publisher.publish_expect(p, ReasonCode::Success).await;
    }
    at(t0 + secs(4.999)).await;
    let (mut c, ack) = Client::accepted(b.target(), connect_expiry("lasting", false, 5)).await;
    assert!(ack.session_present, "resumed at 4.999 s");
    let payloads: Vec<String> = [c.receive().await, c.receive().await]
        .iter()
        .map(|p| text(&p.payload))
        .collect();
    assert_eq!(payloads, ["m1", "m2"], "queued messages delivered in order");
    c.disconnect().await;
    let t1 = Instant::now();

    at(t1 + secs(5.0)).await;
    let (_c, ack) = Client::accepted(b.target(), connect_expiry("lasting", false, 5)).await;
    assert!(!ack.session_present, "expired at 5 s");
    let p = plain("lasting/t", b"m3", QoS::AtLeastOnce);
    publisher
        .publish_expect(p, ReasonCode::NoMatchingSubscribers)
        .await;
}

/// A session that comes and goes (a flaky device, a long poll) keeps one expiry timer,
/// not one per disconnect: the broker's tasks do not pile up while it waits to expire.
#[tokio::test(start_paused = true)]
async fn a_session_that_comes_and_goes_keeps_one_timer() {
    let b = TestBroker::in_memory(|_| {});
    let tasks = || b.broker().tasks.len();
    let before = tasks();
    for _ in 0..50 {
        let (c, _) = Client::accepted(b.target(), connect_expiry("flaky", false, 3600)).await;
        c.disconnect().await;
        tokio::task::yield_now().await;
    }
    // The last connection's task may still be finishing; 50 timers would be obvious.
    assert!(
        tasks() <= before + 2,
        "{} tasks after 50 disconnects (from {before})",
        tasks()
    );
    at(Instant::now() + secs(3600.0)).await;
    assert!(
        b.broker().session("flaky").is_none(),
        "the one timer still expires it"
    );
}

/// The end of a session, seen in the registry: present at `interval` - 1 ms, gone at
/// `interval` exactly.
async fn assert_expires_at(b: &TestBroker, client_id: &str, t0: Instant, interval: Duration) {
    at(t0 + interval - Duration::from_millis(1)).await;
    assert!(
        b.broker().session(client_id).is_some(),
        "{client_id}: still kept"
    );
    at(t0 + interval).await;
    assert!(
        b.broker().session(client_id).is_none(),
        "{client_id}: gone at {interval:?}"
    );
}

/// The Session Expiry Interval of the DISCONNECT replaces the CONNECT's (300 s → 1 s).
#[tokio::test(start_paused = true)]
async fn disconnect_changes_session_expiry() {
    let b = TestBroker::in_memory(|_| {});
    let (c, _) = Client::accepted(b.target(), connect_expiry("shorter", true, 300)).await;
    c.disconnect_with(ReasonCode::Success, expiry_session(1))
        .await;
    assert_expires_at(&b, "shorter", Instant::now(), secs(1.0)).await;
}

/// max_session_expiry_interval (1 s) caps the interval asked for (100 s, and 0xFFFFFFFF),
/// and the CONNACK's Session Expiry Interval tells the client the value in use
/// (3.2.2.3.2).
#[tokio::test(start_paused = true)]
async fn max_session_expiry_interval_caps_the_interval() {
    let b = TestBroker::in_memory(|cfg| cfg.mqtt.max_session_expiry_interval = 1);
    for (client_id, asked) in [("capped", 100), ("never", u32::MAX)] {
        let (c, ack) = Client::accepted(b.target(), connect_expiry(client_id, true, asked)).await;
        assert_eq!(
            ack.properties.session_expiry_interval,
            Some(1),
            "{client_id}"
        );
        c.disconnect().await;
        assert_expires_at(&b, client_id, Instant::now(), secs(1.0)).await;
    }
    let (_c, ack) = Client::accepted(b.target(), connect_expiry("within", true, 1)).await;
    assert_eq!(
        ack.properties.session_expiry_interval, None,
        "within the cap: as asked"
    );
}

/// A 5.0 Session Expiry Interval of 0xFFFFFFFF and, with `persistent_client_expiration
/// = 0`, a 3.1.1 persistent session never expire: a year later both are resumed, with
/// their subscriptions. (By default a 3.x session ends after a week: security::limits.)
#[tokio::test(start_paused = true)]
async fn sessions_without_expiry_are_kept() {
    let b = TestBroker::in_memory(|c| c.session.persistent_client_expiration = 0);
    let (mut c, _) = Client::accepted(b.target(), connect_expiry("forever", true, u32::MAX)).await;
    c.subscribe("forever/t", QoS::AtLeastOnce).await;
    c.disconnect().await;
    let persistent = Connect {
        clean_start: false,
        ..connect_v311("persistent")
    };
    let (mut c, _) = Client::accepted(b.target(), persistent.clone()).await;
    c.subscribe_ok(&[("persistent/t", QoS::AtLeastOnce)]).await;
    c.disconnect().await;

    tokio::time::sleep(Duration::from_secs(365 * 24 * 3600)).await;
    let (_c, ack) = Client::accepted(b.target(), connect_expiry("forever", false, u32::MAX)).await;
    assert!(ack.session_present, "5.0 0xFFFFFFFF resumed");
    let (_c, ack) = Client::accepted(b.target(), persistent).await;
    assert!(ack.session_present, "3.1.1 persistent session resumed");
    assert_eq!(
        b.broker().router.subscription_count(),
        2,
        "with their subscriptions"
    );
}

// =======================================================================================
// Message Expiry Interval
// =======================================================================================

/// Subscribes `client_id` with a 5.0 session kept for an hour, and disconnects.
async fn offline_subscriber(b: &TestBroker, client_id: &str, topic: &str) {
    let (mut c, _) = Client::accepted(b.target(), connect_expiry(client_id, true, 3600)).await;
    c.subscribe(topic, QoS::AtLeastOnce).await;
    c.disconnect().await;
}

/// A message with a Message Expiry Interval of 60 s, queued for offline sessions: still
/// delivered at 59.999 s (with 1 s left: the interval sent is never 0), not at 60 s; one
/// without expiry always is [MQTT-3.3.2-5].
#[tokio::test(start_paused = true)]
async fn queued_message_expires_at_its_interval() {
    let b = TestBroker::in_memory(|_| {});
    for id in ["early", "on-time", "late"] {
        offline_subscriber(&b, id, "exp/t").await;
    }
    let mut publisher = Client::connect_v5(b.target(), "exp-pub").await;
    let t0 = Instant::now();
    let short = message("exp/t", b"short-lived", QoS::AtLeastOnce, expiry_props(60));
    publisher.publish_expect(short, ReasonCode::Success).await;
    let durable = plain("exp/t", b"durable", QoS::AtLeastOnce);
    publisher.publish_expect(durable, ReasonCode::Success).await;

    for (id, when, want) in [
        ("early", 59.999, &["short-lived", "durable"][..]),
        ("on-time", 60.0, &["durable"][..]),
        ("late", 61.0, &["durable"][..]),
    ] {
        tokio::time::sleep_until(t0 + secs(when)).await;
        let (mut c, ack) = Client::accepted(b.target(), connect_expiry(id, false, 3600)).await;
        assert!(ack.session_present);
        let got = c.drain_publishes().await;
        let payloads: Vec<String> = got.iter().map(|p| text(&p.payload)).collect();
        assert_eq!(payloads, want, "{id}: reconnected at {when} s");
        if id == "early" {
            assert_eq!(props_of(&got[0]).message_expiry_interval, Some(1));
        }
    }
}

/// The Message Expiry Interval forwarded is what is left of it [MQTT-3.3.2-6], in whole
/// seconds: 10 at once, 6 after 4 s in a queue, 5 after 4.5 s.
#[tokio::test(start_paused = true)]
async fn delivered_message_carries_the_remaining_expiry() {
    let b = TestBroker::in_memory(|_| {});
    let mut online = watcher(&b, "exp-online", "rem/t").await;
    offline_subscriber(&b, "after-4", "rem/t").await;
    offline_subscriber(&b, "after-4.5", "rem/t").await;
    let mut publisher = Client::connect_v5(b.target(), "rem-pub").await;
    let t0 = Instant::now();
    let m = message("rem/t", b"x", QoS::AtLeastOnce, expiry_props(10));
    publisher.publish_expect(m, ReasonCode::Success).await;
    let left = |p: &Publish| props_of(p).message_expiry_interval;
    assert_eq!(left(&online.receive().await), Some(10));
    for (id, after, want) in [("after-4", 4.0, 6), ("after-4.5", 4.5, 5)] {
        tokio::time::sleep_until(t0 + secs(after)).await;
        let (mut c, _) = Client::accepted(b.target(), connect_expiry(id, false, 3600)).await;
        assert_eq!(left(&c.receive().await), Some(want), "{id}");
    }
}

/// A retained message with a Message Expiry Interval of 2 s goes to new subscribers with
/// what is left of it until 2 s; from then on it is neither sent nor stored.
#[tokio::test(start_paused = true)]
async fn retained_message_expires() {
    let b = TestBroker::in_memory(|_| {});
    let mut publisher = Client::connect_v5(b.target(), "ret-exp-pub").await;
    let t0 = Instant::now();
    let short = Publish {
        retain: true,
        ..message("rx/short", b"short", QoS::AtLeastOnce, expiry_props(2))
    };
    publisher
        .publish_expect(short, ReasonCode::NoMatchingSubscribers)
        .await;
    let long = Publish {
        retain: true,
        ..plain("rx/long", b"long", QoS::AtLeastOnce)
    };
    publisher
        .publish_expect(long, ReasonCode::NoMatchingSubscribers)
        .await;

    for (id, when, want) in [
        ("at-0", 0.0, Some(2)),
        ("at-1", 1.0, Some(1)),
        ("at-1.999", 1.999, Some(1)),
        ("at-2", 2.0, None),
    ] {
        tokio::time::sleep_until(t0 + secs(when)).await;
        let mut c = Client::connect_v5(b.target(), id).await;
        c.subscribe("rx/#", QoS::AtLeastOnce).await;
        let got = c.drain_publishes().await;
        let short: Vec<&Publish> = got.iter().filter(|p| &*p.topic == "rx/short").collect();
        match want {
            Some(left) => {
                assert_eq!(short.len(), 1, "{id}: {got:?}");
                assert!(short[0].retain, "{id}: sent as retained");
                assert_eq!(
                    props_of(short[0]).message_expiry_interval,
                    Some(left),
                    "{id}"
                );
            }
            None => assert!(short.is_empty(), "{id}: expired, yet sent: {got:?}"),
        }
        assert!(got.iter().any(|p| &*p.topic == "rx/long"), "{id}: {got:?}");
    }
    assert_eq!(
        b.broker().router.retained_count(),
        1,
        "the expired one is removed"
    );
}
