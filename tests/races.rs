//! Delivery guarantees in the seams between connections (issue 16): takeovers, session
//! expiry, shared subscriptions, the in-flight window on resume.
//!
//! The first part holds one deterministic regression test per race. Most run on the
//! in-memory broker (`TestBroker::in_memory`) under tokio's paused clock, so that an
//! expiry and a CONNECT meet at an exact virtual instant; where the interleaving is not
//! reachable through the protocol on one thread (two connections of one client id inside
//! the broker at once), the broker-level operations are tested directly, and a stress
//! loop over real sockets on a multi-threaded runtime looks for the race itself.
//!
//! The second part is the randomized multi-client test: seeded, on the paused clock, and
//! once over TCP in real time. `RACES_SEED=<n>` runs one seed (a failure prints its
//! seed; on the paused clock a seed replays exactly); `RACES_ITERATIONS=<n>` runs n times
//! the seeds, TCP rounds and stress attempts CI runs; `RACES_TRACE=<client name>` prints
//! what that client sends and receives.
// A test reads best as one sequence of steps, however long.
#![allow(clippy::too_many_lines)]

mod common;

use bytes::{Bytes, BytesMut};
use common::client::{encode, filter, opts, text, Client, Event, WAIT};
use common::TestBroker;
use std::sync::Arc;
use std::time::Duration;
use ternmq::message::Message;
use ternmq::protocol::{
    Ack, ByteStr, Connect, Packet, Properties, Protocol, Publish, QoS, ReasonCode, Subscribe,
};
use ternmq::session::{Link, NotOwner, Wire, NEVER_EXPIRE};
use tokio::time::Instant;

// ---------------------------------------------------------------------------------------
// Builders and small helpers
// ---------------------------------------------------------------------------------------

/// A 5.0 CONNECT (60 s keep-alive) with a Session Expiry Interval.
fn connect5(client_id: &str, clean_start: bool, expiry: u32) -> Connect {
    Connect {
        protocol: Protocol::V5,
        clean_start,
        keep_alive: 60,
        client_id: ByteStr::from(client_id),
        will: None,
        username: None,
        password: None,
        properties: Properties {
            session_expiry_interval: Some(expiry),
            ..Properties::default()
        },
    }
}

/// `connect5` announcing a Receive Maximum.
fn connect5_window(client_id: &str, clean_start: bool, expiry: u32, window: u16) -> Connect {
    let mut c = connect5(client_id, clean_start, expiry);
    c.properties.receive_maximum = Some(window);
    c
}

/// A 3.1.1 CONNECT: Clean Session 0 keeps the session until it is discarded.
fn connect311(client_id: &str, clean_session: bool) -> Connect {
    Connect {
        protocol: Protocol::V311,
        properties: Properties::default(),
        ..connect5(client_id, clean_session, 0)
    }
}

fn publish(topic: &str, payload: &str, qos: QoS) -> Publish {
    Publish {
        qos,
        topic: ByteStr::from(topic),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        ..Publish::default()
    }
}

fn subscribe_packet(pkid: u16, f: &str, qos: QoS) -> Packet {
    Packet::Subscribe(Subscribe {
        pkid,
        filters: vec![filter(f, opts(qos))],
        properties: Properties::default(),
    })
}

/// Everything the broker has sent the client before answering a PINGREQ, unacknowledged.
async fn publishes_before_ping(c: &mut Client) -> Vec<Publish> {
    c.ping()
        .await
        .into_iter()
        .map(|p| match p {
            Packet::Publish(p) => p,
            other => panic!("{}: expected only PUBLISH, got {other:?}", c.name),
        })
        .collect()
}

fn payloads(ps: &[Publish]) -> Vec<String> {
    ps.iter().map(|p| text(&p.payload)).collect()
}

/// Drops the client's end of the connection: no DISCONNECT, nothing acknowledged.
fn vanish(c: Client) {
    drop(c);
}

/// A number from the environment, or `default`.
fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

// =======================================================================================
// A. A SUBSCRIBE on the losing side of a takeover
// =======================================================================================

/// The connection that lost its session to a takeover can change neither the router nor
/// the session: its SUBSCRIBE and UNSUBSCRIBE (pipelined behind its CONNECT, handled
/// after the winner's CONNECT) fail as a whole, and the subscription the session had
/// stays exactly as it was. (Within one thread the protocol cannot put the loser's
/// SUBSCRIBE between the winner's takeover and the loser noticing it: this is what the
/// broker promises whatever the threads do.)
#[tokio::test(start_paused = true)]
async fn a_the_loser_of_a_takeover_changes_no_subscription() {
    let b = TestBroker::in_memory(|_| {});
    let broker = b.broker();
    let client_id = ByteStr::from("a-client");
    let topic = ByteStr::from("a/t");
    let link = |conn_id| Link::new(conn_id, Arc::new(Wire::default()));
    let now = ternmq::clock::now();
    let (loser, winner) = (broker.next_id(), broker.next_id());

    let (session, present) = broker.open_session(&client_id, false, NEVER_EXPIRE, link(loser), now);
    assert!(!present);
    let sub = opts(QoS::AtLeastOnce);
    assert_eq!(
        broker.subscribe(&session, loser, &topic, sub, None),
        Ok(false)
    );

    let (taken, present) = broker.open_session(&client_id, false, NEVER_EXPIRE, link(winner), now);
    assert!(
        present && Arc::ptr_eq(&session, &taken),
        "the session is resumed"
    );

    // The loser's packets, handled after the takeover.
    let downgrade = opts(QoS::AtMostOnce);
    assert_eq!(
        broker.subscribe(&session, loser, &topic, downgrade, None),
        Err(NotOwner)
    );
    assert_eq!(broker.unsubscribe(&session, loser, &topic), Err(NotOwner));

    // The subscription routes as before, at QoS 1, and the session still lists it.
    let m = Arc::new(Message::new(
        topic.clone(),
        Bytes::from_static(b"after the race"),
        QoS::AtLeastOnce,
        false,
        None,
        0,
        now,
    ));
    assert_eq!(broker.publish(&m), 1, "the subscription still routes");
    session.inspect(|s| {
        let kept = s.subscriptions().get(&topic).map(|sub| sub.options.qos);
        assert_eq!(kept, Some(QoS::AtLeastOnce), "the session keeps it");
        assert_eq!(s.queued(), 1);
        assert_eq!(s.queue().next().map(|d| d.qos), Some(QoS::AtLeastOnce));
    });
    assert_eq!(broker.router.subscription_count(), 1);

    // The winner owns both.
    assert_eq!(broker.unsubscribe(&session, winner, &topic), Ok(true));
    assert_eq!(broker.publish(&m), 0);
    assert!(session.inspect(|s| s.subscriptions().is_empty()));
}

/// The race as clients meet it, over real sockets and threads: two connections of one
/// client id CONNECT at once, one with a SUBSCRIBE right behind its CONNECT. Whoever
/// wins, the session keeps its subscription: a publisher is answered "success" (not
/// 0x10, no matching subscribers) and the winner gets the message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_racing_takeovers_with_a_pipelined_subscribe_keep_the_subscription() {
    let attempts = env_number("RACES_ITERATIONS", 1) * 2000;
    let b = TestBroker::start().await;
    let (mut c, _) = Client::accepted(b.target(), connect5("a-racer", true, NEVER_EXPIRE)).await;
    c.subscribe("a/race", QoS::AtLeastOnce).await;
    c.disconnect().await;
    let mut publisher = Client::connect_v5(b.target(), "a-publisher").await;
    let connect = encode(
        &Packet::Connect(Box::new(connect5("a-racer", false, NEVER_EXPIRE))),
        Protocol::V5,
    );
    let mut with_subscribe = connect.clone();
    with_subscribe.extend_from_slice(&encode(
        &subscribe_packet(1, "a/race", QoS::AtLeastOnce),
        Protocol::V5,
    ));
    for attempt in 0..attempts {
        let mut x = Client::open(b.target(), "a-racer(x)", Protocol::V5).await;
        let mut y = Client::open(b.target(), "a-racer(y)", Protocol::V5).await;
        // Both written at once; which goes first alternates.
        if attempt.is_multiple_of(2) {
            tokio::join!(x.send_raw(&connect), y.send_raw(&with_subscribe));
        } else {
            tokio::join!(y.send_raw(&with_subscribe), x.send_raw(&connect));
        }
        // The loser is closed (DISCONNECT 0x8E first); the winner stays.
        let mut winner = tokio::select! {
            _ = until_closed(&mut x) => y,
            _ = until_closed(&mut y) => x,
        };
        let payload = format!("attempt {attempt}");
        let code = publisher
            .publish(publish("a/race", &payload, QoS::AtLeastOnce))
            .await;
        assert_eq!(
            code,
            ReasonCode::Success,
            "attempt {attempt}: the subscription was lost in the takeover"
        );
        let p = winner
            .wait_for("the PUBLISH", |p| matches!(p, Packet::Publish(_)))
            .await;
        let Packet::Publish(p) = p else {
            unreachable!()
        };
        assert_eq!(text(&p.payload), payload, "attempt {attempt}");
        winner.acknowledge(&p).await;
        winner.ping().await; // the CONNACK and SUBACK it got are left unread
        winner.disconnect().await;
    }
}

/// Reads until the broker closes the connection (panics if it does not within `WAIT`).
async fn until_closed(c: &mut Client) {
    loop {
        match c.next_event(WAIT).await {
            Event::Packet(_) => {}
            Event::Closed(_) => return,
            Event::Timeout => panic!("{}: neither connection was closed", c.name),
        }
    }
}

// =======================================================================================
// B. A CONNECT at the instant the session expires
// =======================================================================================

/// A CONNECT (Clean Start 0) one tick before the expiry instant resumes the session with
/// everything in it; one tick after, it gets a new one; at the instant itself either, but
/// all or nothing: Session Present 1 comes with the queued message and a working
/// subscription, Session Present 0 with neither. The session the CONNACK announced is the
/// one the broker keeps: the next CONNECT resumes it. (On one thread, the expiry timer
/// runs before a CONNECT written at its instant; the randomized test meets that instant
/// often too.)
#[tokio::test(start_paused = true)]
async fn b_a_connect_racing_the_session_expiry_resumes_all_or_nothing() {
    let b = TestBroker::in_memory(|_| {});
    let mut publisher = Client::connect_v5(b.target(), "b-publisher").await;
    let tick = Duration::from_millis(1);
    let cases = [(-1, Some(true)), (0, None), (1, Some(false))];
    for (case, (offset, resumed)) in cases.into_iter().enumerate() {
        let id = format!("b-client-{case}");
        let topic = format!("b/{case}");
        let (mut c, _) = Client::accepted(b.target(), connect5(&id, true, 1)).await;
        c.subscribe(&topic, QoS::AtLeastOnce).await;
        c.disconnect().await;
        let left = Instant::now();
        publisher
            .publish_expect(
                publish(&topic, "queued", QoS::AtLeastOnce),
                ReasonCode::Success,
            )
            .await;

        let at = left + Duration::from_secs(1);
        let at = match offset {
            -1 => at - tick,
            0 => at,
            _ => at + tick,
        };
        tokio::time::sleep_until(at).await;
        let (mut c, ack) = Client::accepted(b.target(), connect5(&id, false, 10)).await;
        let present = ack.session_present;
        if let Some(resumed) = resumed {
            assert_eq!(present, resumed, "offset {offset} tick(s): Session Present");
        }
        let got = publishes_before_ping(&mut c).await;
        let routed = publisher
            .publish(publish(&topic, "after", QoS::AtLeastOnce))
            .await;
        if present {
            assert_eq!(
                payloads(&got),
                ["queued"],
                "offset {offset}: the queued message"
            );
            c.acknowledge(&got[0]).await;
            assert_eq!(
                routed,
                ReasonCode::Success,
                "offset {offset}: still subscribed"
            );
            assert_eq!(text(&c.receive().await.payload), "after");
        } else {
            assert!(
                got.is_empty(),
                "offset {offset}: a new session has nothing: {got:?}"
            );
            assert_eq!(routed, ReasonCode::NoMatchingSubscribers, "offset {offset}");
            c.subscribe(&topic, QoS::AtLeastOnce).await;
        }
        c.disconnect().await;
        let (mut c, ack) = Client::accepted(b.target(), connect5(&id, false, 10)).await;
        assert!(ack.session_present, "offset {offset}: the session is kept");
        publisher
            .publish_expect(
                publish(&topic, "kept", QoS::AtLeastOnce),
                ReasonCode::Success,
            )
            .await;
        assert_eq!(text(&c.receive().await.payload), "kept", "offset {offset}");
        c.disconnect().await;
    }
}

/// A session that has ended (expired, or ended with its connection) may still be in the
/// registry for a moment, until whoever ended it removes it. A CONNECT meeting it there
/// gets a new session (Session Present 0), never the ended one, whose queued message is
/// gone; and the new session is the one the broker keeps.
#[tokio::test(start_paused = true)]
async fn b_an_ended_session_still_registered_is_not_resumed() {
    let b = TestBroker::in_memory(|_| {});
    let (mut c, _) = Client::accepted(b.target(), connect5("b-ended", true, 60)).await;
    c.subscribe("b/ended", QoS::AtLeastOnce).await;
    c.disconnect().await;
    let mut publisher = Client::connect_v5(b.target(), "b-ended-publisher").await;
    publisher
        .publish_expect(
            publish("b/ended", "queued", QoS::AtLeastOnce),
            ReasonCode::Success,
        )
        .await;
    let ended = b
        .broker()
        .session("b-ended")
        .expect("the session is registered");
    let (link, _) = ended.discard();
    assert!(link.is_none());

    let (mut c, ack) = Client::accepted(b.target(), connect5("b-ended", false, 60)).await;
    assert!(!ack.session_present, "an ended session is not resumed");
    c.expect_quiet("in a new session").await;
    let current = b.broker().session("b-ended").expect("registered");
    assert!(!Arc::ptr_eq(&current, &ended), "a new session replaced it");
    c.subscribe("b/ended", QoS::AtLeastOnce).await;
    c.disconnect().await;

    let (mut c, ack) = Client::accepted(b.target(), connect5("b-ended", false, 60)).await;
    assert!(ack.session_present, "the new session is kept");
    publisher
        .publish_expect(
            publish("b/ended", "new", QoS::AtLeastOnce),
            ReasonCode::Success,
        )
        .await;
    assert_eq!(text(&c.receive().await.payload), "new");
}

/// The race as clients meet it, over real sockets and threads: 1,000 5.0 clients, each
/// with a Session Expiry of 1 s, a subscription and a queued QoS 1 message, reconnect
/// (Clean Start 0) from 8 ms before to 3 ms after the instant their session expires,
/// while other clients' expiry timers fire. Every time, all or nothing: Session Present 1
/// comes with the queued message and a subscription that routes; Session Present 0 with
/// neither; and either way the session the CONNACK announced is the one the broker keeps,
/// so the next CONNECT resumes it. (The bug: Session Present 1 on a session already gone,
/// its queued message never delivered, its subscription routing nothing, and the next
/// CONNECT answered Session Present 0. This loop also found a message delivered to a
/// resumed session just as its idle connection was parked left unsent.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_reconnects_racing_the_session_expiry_resume_all_or_nothing() {
    const CLIENTS: u64 = 1000;
    // Offsets from the expiry instant, in ms: -8 to 3 (a reconnect takes a few ms to
    // reach the broker).
    const OFFSETS: u64 = 12;
    const EARLIEST: u64 = 8;
    // Clients start this far apart, so that load does not blur their aim.
    const STAGGER: Duration = Duration::from_millis(2);
    let rounds = env_number("RACES_ITERATIONS", 1);
    let b = TestBroker::start().await;
    let mut outcomes = [[0; OFFSETS as usize]; 2];
    for round in 0..rounds {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..CLIENTS {
            let target = b.target();
            let broker = b.broker().clone();
            tasks.spawn(async move {
                tokio::time::sleep(STAGGER * i as u32).await;
                let offset = i % OFFSETS;
                let id = format!("b-expiring-{round}-{i}");
                let topic = format!("b/expiring/{round}/{i}");
                let (mut c, _) = Client::accepted(target.clone(), connect5(&id, true, 1)).await;
                c.subscribe(&topic, QoS::AtLeastOnce).await;
                let mut publisher = Client::connect_v5(target.clone(), &format!("{id}-pub")).await;
                c.disconnect().await;
                // Queued, unless a loaded machine took more than the second to get here
                // (then the session is gone, and the reconnect must get a new one).
                publisher
                    .publish(publish(&topic, "queued", QoS::AtLeastOnce))
                    .await;
                // Aimed at the broker's own expiry instant: 1 s after it saw the client go.
                let left = broker
                    .session(&id)
                    .and_then(|s| s.inspect(|s| s.offline_since));
                if let Some(left) = left {
                    let at = Instant::from_std(left) + Duration::from_secs(1)
                        - Duration::from_millis(EARLIEST)
                        + Duration::from_millis(offset);
                    tokio::time::sleep_until(at).await;
                }
                let (mut c, ack) = Client::accepted(target.clone(), connect5(&id, false, 10)).await;
                let present = ack.session_present;
                let got = publishes_before_ping(&mut c).await;
                let routed = publisher
                    .publish(publish(&topic, "after", QoS::AtLeastOnce))
                    .await;
                let what = format!("{id} (Session Present {})", u8::from(present));
                c.name = format!("{what}, reconnected");
                if present {
                    assert_eq!(payloads(&got), ["queued"], "{what}: the queued message");
                    c.acknowledge(&got[0]).await;
                    assert_eq!(routed, ReasonCode::Success, "{what}: still subscribed");
                    assert_eq!(text(&c.receive().await.payload), "after", "{what}");
                } else {
                    assert!(got.is_empty(), "{what}: a new session has nothing: {got:?}");
                    assert_eq!(routed, ReasonCode::NoMatchingSubscribers, "{what}");
                    c.subscribe(&topic, QoS::AtLeastOnce).await;
                }
                c.disconnect().await;
                let (mut c, ack) = Client::accepted(target, connect5(&id, false, 0)).await;
                assert!(ack.session_present, "{what}: the session is kept");
                c.name = format!("{what}, resumed again");
                let kept = publisher
                    .publish(publish(&topic, "kept", QoS::AtLeastOnce))
                    .await;
                assert_eq!(kept, ReasonCode::Success, "{what}: the session kept routes");
                assert_eq!(text(&c.receive().await.payload), "kept", "{what}");
                c.disconnect().await;
                publisher.disconnect().await;
                (offset, present)
            });
        }
        while let Some(outcome) = tasks.join_next().await {
            let (offset, present) = outcome.expect("a client's checks");
            outcomes[usize::from(present)][offset as usize] += 1;
        }
    }
    println!(
        "by offset from the expiry instant, -8 to 3 ms: resumed {:?}, new session {:?}",
        outcomes[1], outcomes[0]
    );
}

// =======================================================================================
// C. Shared subscriptions: what a member keeps, and what goes to another member
// =======================================================================================

/// Long enough for the broker to see a vanished client's connection end.
const NOTICE: Duration = Duration::from_millis(10);

/// A member whose session lasts keeps the shared messages it was sent and did not
/// acknowledge, and gets them again (DUP, same packet ids) when it comes back, as a plain
/// subscriber would; in 3.1.1 and 5.0. They are not lost, and do not go elsewhere.
#[tokio::test(start_paused = true)]
async fn c_a_persistent_member_gets_its_unacknowledged_shared_messages_back() {
    let b = TestBroker::in_memory(|_| {});
    let mut publisher = Client::connect_v5(b.target(), "c-publisher").await;
    let cases = [
        (
            connect311("c-member-311", false),
            connect311("c-member-311", false),
        ),
        (
            connect5("c-member-5", true, 60),
            connect5("c-member-5", false, 60),
        ),
    ];
    for (first, again) in cases {
        let id = first.client_id.to_string();
        let topic = format!("c/{id}");
        let (mut m, _) = Client::accepted(b.target(), first).await;
        m.subscribe(&format!("$share/g/{topic}"), QoS::AtLeastOnce)
            .await;
        let sent: Vec<String> = (0..5).map(|i| i.to_string()).collect();
        for p in &sent {
            publisher
                .publish_expect(publish(&topic, p, QoS::AtLeastOnce), ReasonCode::Success)
                .await;
        }
        let got = publishes_before_ping(&mut m).await;
        assert_eq!(payloads(&got), sent, "{id}");
        vanish(m);
        tokio::time::sleep(NOTICE).await;

        let (mut m, ack) = Client::accepted(b.target(), again).await;
        assert!(ack.session_present, "{id}: the session is kept");
        let resent = publishes_before_ping(&mut m).await;
        assert_eq!(payloads(&resent), sent, "{id}: resent on reconnect");
        for (before, now) in got.iter().zip(&resent) {
            assert!(now.dup, "{id}: a resend has DUP set");
            assert_eq!(now.pkid, before.pkid, "{id}: with its packet id");
            m.acknowledge(now).await;
        }
        m.expect_quiet("once acknowledged").await;
    }
}

/// A QoS 2 shared message sent to a member that drops before PUBREC is completed with
/// that member when it comes back [MQTT-4.8.2-4]; no other member gets it, though one is
/// connected the whole time.
#[tokio::test(start_paused = true)]
async fn c_a_shared_qos2_message_in_flight_stays_with_its_member() {
    let b = TestBroker::in_memory(|_| {});
    let group = "$share/g/c2/t";
    let mut publisher = Client::connect_v5(b.target(), "c2-publisher").await;
    let (mut first, _) = Client::accepted(b.target(), connect5("c2-first", true, 60)).await;
    first.subscribe(group, QoS::ExactlyOnce).await;
    publisher
        .publish_expect(
            publish("c2/t", "in flight", QoS::ExactlyOnce),
            ReasonCode::Success,
        )
        .await;
    let sent = first.expect_publish().await;
    assert_eq!(text(&sent.payload), "in flight");
    let (mut other, _) = Client::accepted(b.target(), connect5("c2-other", true, 60)).await;
    other.subscribe(group, QoS::ExactlyOnce).await;
    vanish(first); // no PUBREC
    tokio::time::sleep(NOTICE).await;
    other.expect_quiet("while the first member is away").await;

    // New messages go to the member that is connected.
    publisher
        .publish_expect(
            publish("c2/t", "new", QoS::ExactlyOnce),
            ReasonCode::Success,
        )
        .await;
    assert_eq!(text(&other.receive().await.payload), "new");

    let (mut first, ack) = Client::accepted(b.target(), connect5("c2-first", false, 60)).await;
    assert!(ack.session_present);
    let resent = first.expect_publish().await;
    assert_eq!(text(&resent.payload), "in flight");
    assert!(resent.dup && resent.pkid == sent.pkid, "{resent:?}");
    first.acknowledge(&resent).await;
    first.expect_quiet("after the exchange").await;
    other
        .expect_quiet("the message went to one member only")
        .await;
}

/// When a member's session ends, what it held goes to another member: every message it
/// was never sent (any QoS), and a QoS 1 one it was sent and did not acknowledge. A QoS 2
/// one it was sent goes to no one [MQTT-4.8.2-5]: the member may have received it.
#[tokio::test(start_paused = true)]
async fn c_an_ending_member_hands_over_what_it_may_not_have_received() {
    let b = TestBroker::in_memory(|_| {});
    let group = "$share/g/c3/t";
    let mut publisher = Client::connect_v5(b.target(), "c3-publisher").await;
    // Session Expiry 0: the session ends with the connection. Two in flight at most.
    let (mut leaving, _) =
        Client::accepted(b.target(), connect5_window("c3-leaving", true, 0, 2)).await;
    leaving.subscribe(group, QoS::ExactlyOnce).await;
    let sent = [
        ("qos1 sent", QoS::AtLeastOnce),
        ("qos2 sent", QoS::ExactlyOnce),
        ("qos2 queued", QoS::ExactlyOnce),
        ("qos1 queued", QoS::AtLeastOnce),
    ];
    for (payload, qos) in sent {
        publisher
            .publish_expect(publish("c3/t", payload, qos), ReasonCode::Success)
            .await;
    }
    let got = publishes_before_ping(&mut leaving).await;
    assert_eq!(payloads(&got), ["qos1 sent", "qos2 sent"]);
    let (mut staying, _) = Client::accepted(b.target(), connect5("c3-staying", true, 0)).await;
    staying.subscribe(group, QoS::ExactlyOnce).await;
    vanish(leaving);
    tokio::time::sleep(NOTICE).await;

    let mut handed: Vec<(String, QoS)> = Vec::new();
    for p in staying.drain_publishes().await {
        assert!(!p.dup, "new to this member: {p:?}");
        handed.push((text(&p.payload), p.qos));
    }
    handed.sort();
    let want = [
        ("qos1 queued".to_string(), QoS::AtLeastOnce),
        ("qos1 sent".to_string(), QoS::AtLeastOnce),
        ("qos2 queued".to_string(), QoS::ExactlyOnce),
    ];
    assert_eq!(handed, want);
}

/// With no member left, the messages an ended member held wait in the group (as many as
/// `max_queued_messages`) for the next member to join.
#[tokio::test(start_paused = true)]
async fn c_with_no_member_left_shared_messages_wait_for_the_next() {
    let b = TestBroker::in_memory(|cfg| cfg.session.max_queued_messages = 3);
    let group = "$share/g/c4/t";
    let mut publisher = Client::connect_v5(b.target(), "c4-publisher").await;
    let (mut only, _) = Client::accepted(b.target(), connect5_window("c4-only", true, 0, 2)).await;
    only.subscribe(group, QoS::AtLeastOnce).await;
    let sent: Vec<String> = (0..5).map(|i| format!("m{i}")).collect();
    for p in &sent {
        publisher
            .publish_expect(publish("c4/t", p, QoS::AtLeastOnce), ReasonCode::Success)
            .await;
    }
    assert_eq!(publishes_before_ping(&mut only).await.len(), 2);
    vanish(only);
    tokio::time::sleep(NOTICE).await;
    // The group has no member: a new message has nobody to go to.
    publisher
        .publish_expect(
            publish("c4/t", "nobody", QoS::AtLeastOnce),
            ReasonCode::NoMatchingSubscribers,
        )
        .await;

    let (mut next, _) = Client::accepted(b.target(), connect5("c4-next", true, 0)).await;
    next.subscribe(group, QoS::AtLeastOnce).await;
    let mut got = payloads(&next.drain_publishes().await);
    got.sort();
    got.dedup();
    assert_eq!(got.len(), 3, "as many as the queue limit: {got:?}");
    assert!(got.iter().all(|p| sent.contains(p)), "{got:?}");
}

/// A member's session that expires hands its unacknowledged QoS 1 message over at the
/// expiry instant, not before.
#[tokio::test(start_paused = true)]
async fn c_a_member_session_expiring_hands_over_at_the_expiry() {
    let b = TestBroker::in_memory(|_| {});
    let group = "$share/g/c5/t";
    let mut publisher = Client::connect_v5(b.target(), "c5-publisher").await;
    let (mut away, _) = Client::accepted(b.target(), connect5("c5-away", true, 2)).await;
    away.subscribe(group, QoS::AtLeastOnce).await;
    publisher
        .publish_expect(
            publish("c5/t", "held", QoS::AtLeastOnce),
            ReasonCode::Success,
        )
        .await;
    assert_eq!(text(&away.expect_publish().await.payload), "held");
    let (mut other, _) = Client::accepted(b.target(), connect5("c5-other", true, 0)).await;
    other.subscribe(group, QoS::AtLeastOnce).await;
    vanish(away);
    let left = Instant::now();
    tokio::time::sleep_until(left + Duration::from_millis(1999)).await;
    other.expect_quiet("while the session lasts").await;
    tokio::time::sleep_until(left + Duration::from_millis(2001)).await;
    let p = other.receive().await;
    assert_eq!(text(&p.payload), "held");
    other.expect_quiet("once handed over").await;
}

// =======================================================================================
// D. The in-flight window on resume
// =======================================================================================

/// A session with 20 unacknowledged messages resumed by a client announcing Receive
/// Maximum 5 gets them again five at a time [MQTT-3.3.4-7], oldest first, each once.
#[tokio::test(start_paused = true)]
async fn d_a_resumed_window_is_resent_within_the_new_receive_maximum() {
    let b = TestBroker::in_memory(|_| {});
    let mut publisher = Client::connect_v5(b.target(), "d-publisher").await;
    let (mut c, _) = Client::accepted(b.target(), connect5("d-client", true, 60)).await;
    c.subscribe("d/t", QoS::AtLeastOnce).await;
    let sent: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    for p in &sent {
        publisher
            .publish_expect(publish("d/t", p, QoS::AtLeastOnce), ReasonCode::Success)
            .await;
    }
    let first = publishes_before_ping(&mut c).await;
    assert_eq!(payloads(&first), sent);
    vanish(c);
    tokio::time::sleep(NOTICE).await;

    let (mut c, ack) =
        Client::accepted(b.target(), connect5_window("d-client", false, 60, 5)).await;
    assert!(ack.session_present);
    let mut outstanding = publishes_before_ping(&mut c).await;
    assert_eq!(
        outstanding.len(),
        5,
        "no more than Receive Maximum before an ack"
    );
    let mut resent = Vec::new();
    while !outstanding.is_empty() {
        let oldest = outstanding.remove(0);
        c.acknowledge(&oldest).await;
        resent.push(oldest);
        outstanding.extend(publishes_before_ping(&mut c).await);
        assert!(
            outstanding.len() <= 5,
            "window exceeded: {}",
            outstanding.len()
        );
    }
    assert_eq!(payloads(&resent), sent, "each once, in order");
    assert!(resent.iter().all(|p| p.dup));
}

/// A takeover (the old connection still open) resends what was in flight on it, in 3.1.1
/// and 5.0 [MQTT-4.4.0-1]; the window is not left full of messages nobody will
/// acknowledge.
#[tokio::test(start_paused = true)]
async fn d_a_takeover_resends_what_was_in_flight() {
    let b = TestBroker::in_memory(|_| {});
    let mut publisher = Client::connect_v5(b.target(), "d2-publisher").await;
    let cases = [
        (connect311("d2-311", false), connect311("d2-311", false)),
        (connect5("d2-5", true, 60), connect5("d2-5", false, 60)),
    ];
    for (first, again) in cases {
        let id = first.client_id.to_string();
        let topic = format!("d2/{id}");
        let (mut old, _) = Client::accepted(b.target(), first).await;
        old.subscribe(&topic, QoS::AtLeastOnce).await;
        // A full window: 20 is the default max_inflight_messages.
        let sent: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
        for p in &sent {
            publisher
                .publish_expect(publish(&topic, p, QoS::AtLeastOnce), ReasonCode::Success)
                .await;
        }
        let got = publishes_before_ping(&mut old).await;
        assert_eq!(payloads(&got), sent, "{id}");

        let (mut new, ack) = Client::accepted(b.target(), again).await;
        assert!(ack.session_present, "{id}");
        let resent = new.drain_publishes().await;
        assert_eq!(
            payloads(&resent),
            sent,
            "{id}: resent to the new connection"
        );
        assert!(resent.iter().all(|p| p.dup), "{id}");
        publisher
            .publish_expect(
                publish(&topic, "next", QoS::AtLeastOnce),
                ReasonCode::Success,
            )
            .await;
        assert_eq!(text(&new.receive().await.payload), "next", "{id}");
        match old.next_event(WAIT).await {
            Event::Closed(_) | Event::Packet(Packet::Disconnect(_)) => {}
            Event::Packet(p) => panic!("{id}: the old connection got {p:?}"),
            Event::Timeout => panic!("{id}: the old connection was not closed"),
        }
    }
}

// =======================================================================================
// RANDOMIZED: publishers and churning subscribers, every delivery accounted for
// =======================================================================================
//
// Publishers tag each payload with the message's index, publisher and sequence number
// and record when they sent it and when the broker acknowledged it. Subscribers (3.1.1
// with Clean Session 0, 5.0 with a Session Expiry) connect, subscribe (some pipelining
// the SUBSCRIBE behind the CONNECT, as clients that re-subscribe on every connect do),
// stall their acknowledgements, vanish with unacknowledged tails, disconnect, change
// their session expiry, reconnect after 0-2 s (often at the very instant their session
// expires) and take their own sessions over, one connection or two at once. Each keeps
// the client side of its session as a client would (QoS 2 packet ids until PUBREL) and
// records what it received, in which session ("epoch": from a CONNACK with Session
// Present 0 to the next). At the end every subscriber drains its session and the log is
// checked (`check`). Times are a logical clock shared by all tasks (`Log::tick`), so
// that "sent before" and "acknowledged after" hold across tasks.

/// splitmix64: small and seedable; enough to choose actions.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }

    fn fork(&mut self) -> Rng {
        Rng(self.next())
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// In memory, on tokio's paused clock: deterministic per seed, times exact.
    Paused,
    /// Over TCP on a multi-threaded runtime, in real time.
    Tcp,
}

/// One run: how long subscribers churn, how long publishers publish.
#[derive(Clone, Copy)]
struct Setup {
    mode: Mode,
    seed: u64,
    churn: Duration,
    publish: Duration,
}

impl Setup {
    /// How far from a session's expiry instant a reconnect must be for Session Present
    /// to be certain: exact on the paused clock; in real time, leave the threads slack.
    fn margin(&self) -> Duration {
        match self.mode {
            Mode::Paused => Duration::ZERO,
            Mode::Tcp => Duration::from_millis(1500),
        }
    }
}

const PLAIN_TOPICS: [&str; 3] = ["p/0", "p/1", "p/2"];
const PLAIN_FILTERS: [&str; 5] = ["p/0", "p/1", "p/2", "p/+", "p/#"];
const SHARED_TOPICS: [&str; 2] = ["s/0", "s/1"];
/// (group, filter) of the shared subscriptions; two members each.
const GROUPS: [(&str, &str); 2] = [("g0", "s/+"), ("g1", "s/1")];
const PUBLISHERS: usize = 3;
const PLAIN_SUBSCRIBERS: usize = 4;
const MEMBERS: usize = 4;

struct Msg {
    topic: String,
    qos: QoS,
    expiry: Option<u32>,
    sent: u64,
    sent_at: Instant,
    /// When the broker acknowledged it (PUBACK, PUBREC; for QoS 0 the PINGRESP after
    /// it): it was routed between `sent` and `acked`.
    acked: Option<u64>,
    /// Sent again after a publisher reconnected: a QoS 1 one may be routed twice, and
    /// its expiry may count from then.
    resent: Option<Instant>,
}

struct SubRec {
    filter: String,
    qos: QoS,
    sent: u64,
    acked: Option<u64>,
    unsub_sent: Option<u64>,
    unsub_acked: Option<u64>,
}

struct Receipt {
    msg: usize,
    qos: QoS,
    dup: bool,
    /// New to the application (a QoS 2 resend with a held packet id is not).
    fresh: bool,
    at: u64,
    at_time: Instant,
}

/// One session of a subscriber, as its CONNACKs tell it.
#[derive(Default)]
struct Epoch {
    subs: Vec<SubRec>,
    receipts: Vec<Receipt>,
    /// When the CONNACK that began the next session arrived.
    superseded: Option<u64>,
}

struct ClientLog {
    name: String,
    /// (group, filter) for a shared-subscription member.
    group: Option<(&'static str, &'static str)>,
    epochs: Vec<Epoch>,
    /// The session drained at the end.
    last: Option<usize>,
}

#[derive(Default, Debug)]
struct Stats {
    connects: u64,
    pairs: u64,
    takeovers: u64,
    pipelined: u64,
    vanished: u64,
    disconnects: u64,
    resumed: u64,
    new_sessions: u64,
    at_expiry_instant: u64,
    stalls: u64,
    publisher_drops: u64,
    receipts: u64,
}

#[derive(Default)]
struct Log {
    clock: u64,
    messages: Vec<Msg>,
    clients: Vec<ClientLog>,
    violations: Vec<String>,
    stats: Stats,
}

impl Log {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn violation(&mut self, what: String) {
        if self.violations.len() < 1000 {
            self.violations.push(what);
        }
    }
}

type SharedLog = Arc<std::sync::Mutex<Log>>;

fn lock(log: &SharedLog) -> std::sync::MutexGuard<'_, Log> {
    log.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether `topic` matches the (plain) topic filter `filter`.
fn matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// What every task of a run shares.
#[derive(Clone)]
struct Env {
    setup: Setup,
    target: common::client::Target,
    log: SharedLog,
    /// How many publishers are done.
    done: tokio::sync::watch::Receiver<usize>,
    /// How many subscribers have made their last connection: once all have, no session
    /// can end any more, so no shared message can move to another member.
    settled: Arc<std::sync::atomic::AtomicUsize>,
    started: Instant,
}

// ---------------------------------------------------------------------------------------
// Publishers
// ---------------------------------------------------------------------------------------

/// Publishes until `setup.publish` has passed, each message's flow completed before the
/// next; now and then vanishes mid-flow and, after reconnecting, resends what was
/// unacknowledged (PUBLISH with DUP, or PUBREL), as its persistent session allows.
async fn publisher(
    env: Env,
    no: usize,
    mut rng: Rng,
    done: Arc<tokio::sync::watch::Sender<usize>>,
) {
    let v5 = no.is_multiple_of(2);
    let name = format!("pub-{no}");
    let connect = |clean| {
        if v5 {
            connect5(&name, clean, 600)
        } else {
            connect311(&name, false)
        }
    };
    let (mut c, ack) = Client::accepted(env.target.clone(), connect(true)).await;
    assert!(!ack.session_present, "{name}: a new session");
    let end = env.started + env.setup.publish;
    let mut pkid: u16 = 0;
    let mut seq = 0u32;
    while Instant::now() < end {
        tokio::time::sleep(rng.millis(0, 120)).await;
        seq += 1;
        let all: Vec<&str> = PLAIN_TOPICS.iter().chain(&SHARED_TOPICS).copied().collect();
        let topic = rng.pick(&all);
        let qos = rng.pick(&[
            QoS::AtMostOnce,
            QoS::AtLeastOnce,
            QoS::AtLeastOnce,
            QoS::ExactlyOnce,
            QoS::ExactlyOnce,
        ]);
        let expiry = (v5 && rng.chance(15)).then(|| 1 + rng.below(3) as u32);
        let idx = {
            let mut log = lock(&env.log);
            let sent = log.tick();
            log.messages.push(Msg {
                topic: topic.to_string(),
                qos,
                expiry,
                sent,
                sent_at: Instant::now(),
                acked: None,
                resent: None,
            });
            log.messages.len() - 1
        };
        if qos != QoS::AtMostOnce {
            pkid = pkid.checked_add(1).unwrap_or(1);
        }
        let mut p = publish(topic, &format!("{idx}:{no}:{seq}"), qos);
        p.pkid = if qos == QoS::AtMostOnce { 0 } else { pkid };
        p.properties = expiry.map(|e| {
            Box::new(Properties {
                message_expiry_interval: Some(e),
                ..Properties::default()
            })
        });
        if std::env::var("RACES_TRACE").is_ok_and(|n| n == name) {
            let t = Instant::now() - env.started;
            eprintln!(
                "{:>8.3} {name} -> {}",
                t.as_secs_f64(),
                brief(&Packet::Publish(p.clone()))
            );
        }
        c.send(Packet::Publish(p.clone())).await;
        let acked = |log: &SharedLog| {
            let mut log = lock(log);
            let at = log.tick();
            log.messages[idx].acked.get_or_insert(at);
        };
        match qos {
            QoS::AtMostOnce => {
                c.ping().await;
                acked(&env.log);
            }
            QoS::AtLeastOnce => {
                if rng.chance(4) {
                    c = reconnect(&env, c, connect(false), &mut rng).await;
                    p.dup = true;
                    lock(&env.log).messages[idx].resent = Some(Instant::now());
                    c.send(Packet::Publish(p.clone())).await;
                }
                let a = wait_ack(&mut c, pkid, |p| matches!(p, Packet::PubAck(_))).await;
                check_publish_ack(&env.log, &name, a);
                acked(&env.log);
            }
            QoS::ExactlyOnce => {
                if rng.chance(4) {
                    c = reconnect(&env, c, connect(false), &mut rng).await;
                    p.dup = true;
                    lock(&env.log).messages[idx].resent = Some(Instant::now());
                    c.send(Packet::Publish(p.clone())).await;
                }
                let a = wait_ack(&mut c, pkid, |p| matches!(p, Packet::PubRec(_))).await;
                check_publish_ack(&env.log, &name, a);
                acked(&env.log);
                c.send(Packet::PubRel(common::client::ack(pkid))).await;
                if rng.chance(4) {
                    c = reconnect(&env, c, connect(false), &mut rng).await;
                    c.send(Packet::PubRel(common::client::ack(pkid))).await;
                }
                wait_ack(&mut c, pkid, |p| matches!(p, Packet::PubComp(_))).await;
            }
        }
    }
    c.disconnect().await;
    done.send_modify(|n| *n += 1);
}

/// Vanishes and comes back to the same session after 0-300 ms.
async fn reconnect(env: &Env, c: Client, connect: Connect, rng: &mut Rng) -> Client {
    let name = c.name.clone();
    vanish(c);
    lock(&env.log).stats.publisher_drops += 1;
    tokio::time::sleep(rng.millis(0, 300)).await;
    let (c, ack) = Client::accepted(env.target.clone(), connect).await;
    if !ack.session_present {
        lock(&env.log).violation(format!("{name}: its session was not kept"));
    }
    c
}

async fn wait_ack(c: &mut Client, pkid: u16, kind: impl Fn(&Packet) -> bool) -> Ack {
    let p = c
        .wait_for("the acknowledgement", |p| {
            kind(p)
                && matches!(p, Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubComp(a) if a.pkid == pkid)
        })
        .await;
    match p {
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubComp(a) => a,
        _ => unreachable!(),
    }
}

/// A publisher's PUBACK or PUBREC: success, or (5.0) nobody subscribed.
fn check_publish_ack(log: &SharedLog, name: &str, a: Ack) {
    if !matches!(
        a.reason,
        ReasonCode::Success | ReasonCode::NoMatchingSubscribers
    ) {
        lock(log).violation(format!("{name}: acknowledgement {a:?}"));
    }
}

// ---------------------------------------------------------------------------------------
// Subscribers
// ---------------------------------------------------------------------------------------

/// What a connection's reader task reports. Short-lived, so a packet inline is fine.
#[allow(clippy::large_enum_variant)]
enum Input {
    Packet(u64, Packet),
    Closed(u64),
}

type Writer = tokio::io::WriteHalf<Box<dyn common::client::Duplex>>;
/// Topic filters and their QoS, as subscribed.
type Filters = Vec<(String, QoS)>;

/// One connection of a subscriber.
struct Conn {
    writer: Option<Writer>,
    reader: tokio::task::JoinHandle<()>,
    /// Session Present of its CONNACK.
    connack: Option<bool>,
    connack_at: u64,
    /// The session (index into the client's epochs) it serves.
    epoch: Option<usize>,
    closed: bool,
    /// The client ended it (DISCONNECT or vanished).
    ours: bool,
    /// min(its Receive Maximum, the broker's max_inflight_messages).
    window: usize,
    /// QoS 1/2 PUBLISHes received on it whose PUBACK / PUBCOMP was not sent yet.
    outstanding: std::collections::BTreeSet<u16>,
    pings: u64,
    pongs: u64,
    /// SUBSCRIBEs sent on it before its epoch was known: (pkid, filters, sent).
    early_subs: Vec<(u16, Filters, u64)>,
}

/// How a subscriber connects this time.
#[derive(Clone, Copy, Debug)]
struct Plan {
    clean: bool,
    expiry: u32,
    window: Option<u16>,
    /// Which connection (of one or two) pipelines a SUBSCRIBE behind its CONNECT.
    pipelined: Option<usize>,
    pair: bool,
    /// The pair's second connection writes first.
    reversed: bool,
}

/// The client side of one subscriber: its connections, the client half of its session,
/// and the model of what the broker must answer.
struct Subscriber {
    env: Env,
    no: usize,
    name: String,
    protocol: Protocol,
    group: Option<(&'static str, &'static str)>,
    rng: Rng,
    tx: tokio::sync::mpsc::UnboundedSender<Input>,
    rx: tokio::sync::mpsc::UnboundedReceiver<Input>,
    conns: std::collections::BTreeMap<u64, Conn>,
    next_conn: u64,
    /// The connection whose packets the client acts on; the others are stale.
    current: Option<u64>,
    /// The connection that won the last connect.
    winner: Option<u64>,
    /// The current session (epoch index), once there is one.
    epoch: Option<usize>,
    /// The epoch `unacked`, `unreleased` and `confirmed` belong to.
    state_epoch: usize,
    /// The subscriptions this client wants, and the epoch that has all of them.
    subs: Vec<(String, QoS)>,
    subscribed: Option<usize>,
    /// The client half of the session: QoS 1 packet ids not acknowledged, QoS 2 ones
    /// not released (message, connection, DUP), messages whose PUBREC the broker is known
    /// to have (connection, when), and PUBRECs not yet known to have arrived
    /// (connection, pings sent before, packet id, message).
    unacked: std::collections::BTreeMap<u16, (usize, u64, bool)>,
    unreleased: std::collections::BTreeMap<u16, (usize, u64, bool)>,
    confirmed: std::collections::BTreeMap<usize, (u64, u64)>,
    pubrecs: Vec<(u64, u64, u16, usize)>,
    /// SUBSCRIBE / UNSUBSCRIBE awaiting their ack: (conn, pkid) → (epoch, filters).
    pending_sub: std::collections::BTreeMap<(u64, u16), (usize, Vec<String>)>,
    pending_unsub: std::collections::BTreeMap<(u64, u16), (usize, String)>,
    next_pkid: u16,
    stalled: bool,
    /// The session expiry in force, and when the last connection ended (None while one
    /// is open).
    expiry: u32,
    left_at: Option<Instant>,
}

impl Subscriber {
    fn new(env: Env, no: usize, group: Option<(&'static str, &'static str)>, rng: Rng) -> Self {
        let protocol = if no.is_multiple_of(2) {
            Protocol::V5
        } else {
            Protocol::V311
        };
        let name = match group {
            Some((g, _)) => format!("member-{no}-{g}"),
            None => format!("sub-{no}"),
        };
        lock(&env.log).clients.push(ClientLog {
            name: name.clone(),
            group,
            epochs: Vec::new(),
            last: None,
        });
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        Subscriber {
            env,
            no,
            name,
            protocol,
            group,
            rng,
            tx,
            rx,
            conns: Default::default(),
            next_conn: 0,
            current: None,
            winner: None,
            epoch: None,
            state_epoch: 0,
            subs: Vec::new(),
            subscribed: None,
            unacked: Default::default(),
            unreleased: Default::default(),
            confirmed: Default::default(),
            pubrecs: Vec::new(),
            pending_sub: Default::default(),
            pending_unsub: Default::default(),
            next_pkid: 0,
            stalled: false,
            expiry: 0,
            left_at: None,
        }
    }

    fn violation(&self, what: String) {
        self.trace(|| format!("VIOLATION {what}"));
        lock(&self.env.log).violation(format!("{}: {what}", self.name));
    }

    /// `RACES_TRACE=<client name>` prints what that client does and gets.
    fn trace(&self, what: impl FnOnce() -> String) {
        if std::env::var("RACES_TRACE").is_ok_and(|n| n == self.name) {
            let t = Instant::now() - self.env.started;
            eprintln!("{:>8.3} {} {}", t.as_secs_f64(), self.name, what());
        }
    }

    fn tick(&self) -> u64 {
        lock(&self.env.log).tick()
    }

    fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        self.next_pkid
    }

    /// A new set of subscriptions, chosen when the client starts a clean session.
    fn choose_subs(&mut self) {
        self.subs = match self.group {
            Some((g, f)) => {
                let qos = self.rng.pick(&[QoS::AtLeastOnce, QoS::ExactlyOnce]);
                vec![(format!("$share/{g}/{f}"), qos)]
            }
            None => {
                let mut subs: Vec<(String, QoS)> = Vec::new();
                for _ in 0..1 + self.rng.below(2) {
                    let f = self.rng.pick(&PLAIN_FILTERS).to_string();
                    let qos = self.rng.pick(&[
                        QoS::AtMostOnce,
                        QoS::AtLeastOnce,
                        QoS::AtLeastOnce,
                        QoS::ExactlyOnce,
                        QoS::ExactlyOnce,
                    ]);
                    if !subs.iter().any(|(s, _)| *s == f) {
                        subs.push((f, qos));
                    }
                }
                subs
            }
        };
    }

    async fn write(&mut self, conn: u64, packet: &Packet) {
        self.trace(|| format!("conn {conn} -> {}", brief(packet)));
        let bytes = encode(packet, self.protocol);
        self.write_raw(conn, &bytes).await;
    }

    async fn write_raw(&mut self, conn: u64, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if let Some(w) = c.writer.as_mut() {
            // The broker may have closed it already: what is lost is lost.
            if w.write_all(bytes).await.is_err() {
                c.writer = None;
            }
        }
    }

    /// Opens a connection and starts its reader task.
    async fn open(&mut self, window: usize) -> u64 {
        use tokio::io::AsyncReadExt;
        let c = Client::open(self.env.target.clone(), &self.name, self.protocol).await;
        let (mut reader, writer) = tokio::io::split(c.stream);
        let no = self.next_conn;
        self.next_conn += 1;
        let (tx, protocol) = (self.tx.clone(), self.protocol);
        let reader = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            loop {
                loop {
                    match ternmq::protocol::decode(&mut buf, protocol, common::client::ANY_SIZE) {
                        Ok(Some(p)) => {
                            if tx.send(Input::Packet(no, p)).is_err() {
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => panic!("conn {no}: the broker sent undecodable bytes: {e}"),
                    }
                }
                buf.reserve(4096);
                match reader.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(Input::Closed(no));
                        return;
                    }
                    Ok(_) => {}
                }
            }
        });
        self.conns.insert(
            no,
            Conn {
                writer: Some(writer),
                reader,
                connack: None,
                connack_at: 0,
                epoch: None,
                closed: false,
                ours: false,
                window,
                outstanding: Default::default(),
                pings: 0,
                pongs: 0,
                early_subs: Vec::new(),
            },
        );
        no
    }

    /// The next input, or None at `deadline`.
    async fn next_input(&mut self, deadline: Instant) -> Option<(Input, u64, Instant)> {
        match tokio::time::timeout_at(deadline, self.rx.recv()).await {
            Ok(Some(input)) => Some((input, self.tick(), Instant::now())),
            Ok(None) => unreachable!("the subscriber holds a sender"),
            Err(_) => None,
        }
    }

    /// Acts on what arrives until `deadline`.
    async fn pump_until(&mut self, deadline: Instant) {
        while let Some((input, at, at_time)) = self.next_input(deadline).await {
            self.handle(input, at, at_time).await;
        }
    }

    async fn handle(&mut self, input: Input, at: u64, at_time: Instant) {
        self.trace(|| match &input {
            Input::Closed(c) => format!("conn {c} closed"),
            Input::Packet(c, p) => format!("conn {c} <- {}", brief(p)),
        });
        match input {
            Input::Closed(conn) => self.on_closed(conn),
            Input::Packet(conn, packet) => self.on_packet(conn, packet, at, at_time).await,
        }
    }

    fn on_closed(&mut self, conn: u64) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.closed = true;
        c.writer = None;
        if !c.ours && self.current == Some(conn) {
            self.violation(format!("conn {conn} closed by the broker while current"));
        }
    }

    async fn on_packet(&mut self, conn: u64, packet: Packet, at: u64, at_time: Instant) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        if c.ours {
            return; // closed by the client: what still arrives is not read
        }
        if self.current != Some(conn) {
            // Taken over by a newer connection of this client: what the broker had
            // written to it before is resent on the new one.
            match packet {
                Packet::Disconnect(d) if d.reason == ReasonCode::SessionTakenOver => {}
                Packet::Publish(_) | Packet::PubRel(_) | Packet::PingResp => {}
                Packet::SubAck(_) | Packet::UnsubAck(_) => {}
                other => self.violation(format!("stale conn {conn} got {other:?}")),
            }
            return;
        }
        match packet {
            Packet::Publish(p) => self.on_publish(conn, p, at, at_time).await,
            Packet::PubRel(a) => self.on_pubrel(conn, a.pkid, at).await,
            Packet::PingResp => {
                let c = self.conns.get_mut(&conn).expect("known");
                c.pongs += 1;
                let pongs = c.pongs;
                let mut confirmed = Vec::new();
                self.pubrecs.retain(|&(k, pings, _, msg)| {
                    let done = k == conn && pings < pongs;
                    if done {
                        confirmed.push(msg);
                    }
                    !done
                });
                for msg in confirmed {
                    self.confirmed.entry(msg).or_insert((conn, at));
                }
            }
            Packet::SubAck(a) => {
                let Some((epoch, filters)) = self.pending_sub.remove(&(conn, a.pkid)) else {
                    self.violation(format!("SUBACK for no SUBSCRIBE: {a:?}"));
                    return;
                };
                if a.codes.iter().any(|c| c.is_error()) {
                    self.violation(format!("SUBSCRIBE refused: {a:?}"));
                }
                let mut log = lock(&self.env.log);
                let e = &mut log.clients[self.no].epochs[epoch];
                for s in e.subs.iter_mut().filter(|s| filters.contains(&s.filter)) {
                    if s.acked.is_none() {
                        s.acked = Some(at);
                    }
                }
                drop(log);
                if filters.len() == self.subs.len() && Some(epoch) == self.epoch {
                    self.subscribed = Some(epoch);
                }
            }
            Packet::UnsubAck(a) => {
                if let Some((epoch, f)) = self.pending_unsub.remove(&(conn, a.pkid)) {
                    let mut log = lock(&self.env.log);
                    let e = &mut log.clients[self.no].epochs[epoch];
                    for s in e.subs.iter_mut().filter(|s| s.filter == f) {
                        if s.unsub_sent.is_some() && s.unsub_acked.is_none() {
                            s.unsub_acked = Some(at);
                        }
                    }
                }
            }
            // The loser of a pair, replayed after the CONNACKs.
            Packet::Disconnect(d)
                if d.reason == ReasonCode::SessionTakenOver && self.winner != Some(conn) => {}
            other => self.violation(format!("conn {conn} got {other:?}")),
        }
    }

    /// The client half of the session belongs to one epoch: a new one starts empty.
    fn state_for(&mut self, epoch: usize) {
        if epoch != self.state_epoch {
            self.state_epoch = epoch;
            self.unacked.clear();
            self.unreleased.clear();
            self.confirmed.clear();
            self.pubrecs.clear();
        }
    }

    async fn on_publish(&mut self, conn: u64, p: Publish, at: u64, at_time: Instant) {
        let tag = text(&p.payload);
        let msg: Option<usize> = tag.split(':').next().and_then(|i| i.parse().ok());
        let Some(msg) = msg.filter(|m| *m < lock(&self.env.log).messages.len()) else {
            self.violation(format!("a PUBLISH no publisher sent: {p:?}"));
            return;
        };
        let (epoch, connack_at, window) = {
            let c = &self.conns[&conn];
            (c.epoch.expect("connected"), c.connack_at, c.window)
        };
        self.state_for(epoch);
        let mut fresh = true;
        let held = match p.qos {
            QoS::AtMostOnce => None,
            QoS::AtLeastOnce => self.unacked.insert(p.pkid, (msg, conn, p.dup)),
            QoS::ExactlyOnce => {
                let held = self.unreleased.get(&p.pkid).copied();
                if held.is_none() {
                    self.unreleased.insert(p.pkid, (msg, conn, p.dup));
                }
                fresh = held.is_none();
                held
            }
        };
        if let Some((held_msg, held_conn, held_dup)) = held {
            if held_msg != msg {
                self.violation(format!(
                    "packet id {} reused for message {msg} while message {held_msg} holds it",
                    p.pkid
                ));
            } else if held_conn == conn {
                self.violation(format!("message {msg} sent twice on conn {conn}"));
            } else if !p.dup && !held_dup {
                self.violation(format!("message {msg} resent without DUP"));
            }
        }
        if let Some(&(k, when)) = self.confirmed.get(&msg) {
            if k == conn || connack_at > when {
                self.violation(format!(
                    "message {msg} ({tag}) sent again after the broker had its PUBREC"
                ));
            }
        }
        if p.qos != QoS::AtMostOnce {
            let c = self.conns.get_mut(&conn).expect("known");
            c.outstanding.insert(p.pkid);
            if c.outstanding.len() > window {
                let n = c.outstanding.len();
                self.violation(format!(
                    "{n} unacknowledged on conn {conn}, window {window}"
                ));
            }
        }
        {
            let mut log = lock(&self.env.log);
            log.stats.receipts += 1;
            log.clients[self.no].epochs[epoch].receipts.push(Receipt {
                msg,
                qos: p.qos,
                dup: p.dup,
                fresh,
                at,
                at_time,
            });
        }
        if self.stalled {
            return;
        }
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                self.unacked.remove(&p.pkid);
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.outstanding.remove(&p.pkid);
                }
                self.write(conn, &Packet::PubAck(common::client::ack(p.pkid)))
                    .await;
            }
            QoS::ExactlyOnce => {
                let pings = self.conns[&conn].pings;
                self.pubrecs.push((conn, pings, p.pkid, msg));
                self.write(conn, &Packet::PubRec(common::client::ack(p.pkid)))
                    .await;
            }
        }
    }

    async fn on_pubrel(&mut self, conn: u64, pkid: u16, at: u64) {
        let epoch = self.conns[&conn].epoch.expect("connected");
        self.state_for(epoch);
        if let Some((msg, ..)) = self.unreleased.remove(&pkid) {
            self.confirmed.entry(msg).or_insert((conn, at));
        }
        self.pubrecs.retain(|&(_, _, p, _)| p != pkid);
        if self.stalled {
            return;
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.outstanding.remove(&pkid);
        }
        self.write(conn, &Packet::PubComp(common::client::ack(pkid)))
            .await;
    }

    /// Subscribes `filters` on `conn`, whose epoch is known.
    async fn subscribe(&mut self, conn: u64, filters: Vec<(String, QoS)>) {
        let epoch = self.conns[&conn].epoch.expect("connected");
        let pkid = self.pkid();
        {
            let mut log = lock(&self.env.log);
            let sent = log.tick();
            let e = &mut log.clients[self.no].epochs[epoch];
            for (f, qos) in &filters {
                e.subs.push(SubRec {
                    filter: f.clone(),
                    qos: *qos,
                    sent,
                    acked: None,
                    unsub_sent: None,
                    unsub_acked: None,
                });
            }
        }
        let names = filters.iter().map(|(f, _)| f.clone()).collect();
        self.pending_sub.insert((conn, pkid), (epoch, names));
        self.write(conn, &subscribe_many(pkid, &filters)).await;
    }

    /// The model: what Session Present a CONNECT must get now (None: either).
    fn expected_present(&self, clean: bool) -> Option<bool> {
        if clean || self.epoch.is_none() || self.expiry == 0 {
            return Some(false);
        }
        let Some(left) = self.left_at else {
            return Some(true); // the last connection is still open: a takeover
        };
        if self.expiry == NEVER_EXPIRE {
            return Some(true);
        }
        let away = Instant::now() - left;
        let expiry = Duration::from_secs(u64::from(self.expiry));
        let margin = self.env.setup.margin();
        if away + margin < expiry {
            Some(true)
        } else if away > expiry + margin {
            Some(false)
        } else {
            None
        }
    }

    fn choose_plan(&mut self, first: bool) -> Plan {
        let v5 = self.protocol.is_v5();
        let clean = (first && v5) || self.rng.chance(4);
        let expiry = if v5 {
            self.rng.pick(&[0, 1, 1, 2, 2, 2, 60, 60, NEVER_EXPIRE])
        } else if clean {
            0 // 3.1.1 Clean Session 1: a new session, ending with the connection
        } else {
            NEVER_EXPIRE
        };
        let window = if self.protocol.is_v5() {
            self.rng.pick(&[None, Some(2), Some(5), Some(100)])
        } else {
            None
        };
        let pair = self.rng.chance(12);
        let pipelined = if self.rng.chance(50) {
            Some(if pair { self.rng.below(2) as usize } else { 0 })
        } else {
            None
        };
        Plan {
            clean,
            expiry,
            window,
            pipelined,
            pair,
            reversed: self.rng.chance(50),
        }
    }

    fn connect_packet(&self, plan: &Plan) -> Connect {
        let mut c = if self.protocol.is_v5() {
            connect5(&self.name, plan.clean, plan.expiry)
        } else {
            connect311(&self.name, plan.clean)
        };
        c.properties.receive_maximum = plan.window;
        c
    }

    /// One connect: one connection, or two at once (the first the broker handles loses
    /// the session to the second). Returns the connection that holds the session.
    async fn connect(&mut self, plan: Plan) -> u64 {
        let expected = self.expected_present(plan.clean);
        if expected.is_none() {
            lock(&self.env.log).stats.at_expiry_instant += 1;
        }
        if plan.clean || self.subs.is_empty() {
            self.choose_subs();
        }
        // A connection still open is being taken over: the client is done with it.
        self.current = None;
        let window = plan.window.map_or(20, |w| usize::from(w).min(20));
        let n = if plan.pair { 2 } else { 1 };
        let mut batch = Vec::new();
        for _ in 0..n {
            batch.push(self.open(window).await);
        }
        let connect = encode(
            &Packet::Connect(Box::new(self.connect_packet(&plan))),
            self.protocol,
        );
        let mut writes = Vec::new();
        for (i, &conn) in batch.iter().enumerate() {
            let mut bytes = connect.clone();
            if plan.pipelined == Some(i) {
                let pkid = self.pkid();
                let sent = self.tick();
                bytes.extend_from_slice(&encode(&subscribe_many(pkid, &self.subs), self.protocol));
                let subs = self.subs.clone();
                self.conns
                    .get_mut(&conn)
                    .expect("opened")
                    .early_subs
                    .push((pkid, subs, sent));
            }
            writes.push((conn, bytes));
        }
        if plan.reversed {
            writes.reverse();
        }
        for (conn, bytes) in &writes {
            self.write_raw(*conn, bytes).await;
        }
        {
            let mut log = lock(&self.env.log);
            log.stats.connects += n as u64;
            log.stats.pairs += u64::from(plan.pair);
            log.stats.takeovers += u64::from(self.left_at.is_none() && self.epoch.is_some());
            log.stats.pipelined += u64::from(plan.pipelined.is_some());
        }
        // Until every new connection has its CONNACK and, for two, one has lost; what
        // else arrives on them waits until it is known which session each serves.
        let mut held: Vec<(u64, Packet, u64, Instant)> = Vec::new();
        let deadline = Instant::now() + WAIT;
        loop {
            let acked = batch.iter().all(|c| self.conns[c].connack.is_some());
            let lost = batch.iter().filter(|c| self.conns[c].closed).count();
            if acked && lost == n - 1 {
                break;
            }
            let Some((input, at, at_time)) = self.next_input(deadline).await else {
                panic!(
                    "{}: connect {plan:?} unresolved after {WAIT:?} (seed {})",
                    self.name, self.env.setup.seed
                );
            };
            match input {
                Input::Packet(conn, Packet::ConnAck(ack)) if batch.contains(&conn) => {
                    if ack.code != ReasonCode::Success {
                        panic!("{}: CONNACK {ack:?}", self.name);
                    }
                    let c = self.conns.get_mut(&conn).expect("opened");
                    c.connack = Some(ack.session_present);
                    c.connack_at = at;
                }
                Input::Packet(conn, p) if batch.contains(&conn) => {
                    held.push((conn, p, at, at_time))
                }
                Input::Closed(conn) if batch.contains(&conn) => {
                    let c = self.conns.get_mut(&conn).expect("opened");
                    c.closed = true;
                    c.writer = None;
                }
                other => self.handle(other, at, at_time).await,
            }
        }
        // The broker handled the loser's CONNECT first.
        let order: Vec<u64> = if plan.pair {
            let (lost, won): (Vec<u64>, Vec<u64>) =
                batch.iter().partition(|c| self.conns[c].closed);
            lost.into_iter().chain(won).collect()
        } else {
            batch.clone()
        };
        for (i, &conn) in order.iter().enumerate() {
            let present = self.conns[&conn].connack.expect("acknowledged");
            let want = if i == 0 {
                expected
            } else {
                Some(!plan.clean && plan.expiry > 0)
            };
            if want.is_some_and(|w| w != present) {
                self.violation(format!(
                    "conn {conn}: Session Present {present}, expected {want:?} ({plan:?}, expiry was {}, away {:?})",
                    self.expiry,
                    self.left_at.map(|l| Instant::now() - l)
                ));
            }
            self.trace(|| {
                format!("conn {conn} CONNACK present {present} (expected {want:?}) {plan:?}")
            });
            let at = self.conns[&conn].connack_at;
            if !present || self.epoch.is_none() {
                let mut log = lock(&self.env.log);
                let epochs = &mut log.clients[self.no].epochs;
                if let Some(last) = epochs.last_mut() {
                    last.superseded = Some(at);
                }
                epochs.push(Epoch::default());
                self.epoch = Some(epochs.len() - 1);
                log.stats.new_sessions += 1;
            } else {
                lock(&self.env.log).stats.resumed += 1;
            }
            let epoch = self.epoch.expect("set");
            let c = self.conns.get_mut(&conn).expect("opened");
            c.epoch = Some(epoch);
            let early = std::mem::take(&mut c.early_subs);
            let mut log = lock(&self.env.log);
            for (pkid, filters, sent) in early {
                let e = &mut log.clients[self.no].epochs[epoch];
                for (f, qos) in &filters {
                    e.subs.push(SubRec {
                        filter: f.clone(),
                        qos: *qos,
                        sent,
                        acked: None,
                        unsub_sent: None,
                        unsub_acked: None,
                    });
                }
                let names = filters.into_iter().map(|(f, _)| f).collect();
                self.pending_sub.insert((conn, pkid), (epoch, names));
            }
        }
        self.expiry = plan.expiry;
        self.left_at = None;
        // The loser's packets first: the broker sent them first.
        self.winner = order.last().copied();
        for &conn in &order {
            self.current = Some(conn);
            let mine: Vec<_> = held.iter().filter(|h| h.0 == conn).cloned().collect();
            for (conn, p, at, at_time) in mine {
                self.trace(|| format!("conn {conn} <- (held) {}", brief(&p)));
                self.on_packet(conn, p, at, at_time).await;
            }
        }
        let winner = *order.last().expect("one connection");
        self.current = Some(winner);
        if self.subscribed != self.epoch {
            let subs = self.subs.clone();
            self.subscribe(winner, subs).await;
        }
        winner
    }
}

/// A packet in a trace line.
fn brief(p: &Packet) -> String {
    match p {
        Packet::Publish(p) => format!(
            "PUBLISH {} q{} pkid {} dup {} {}",
            p.topic,
            p.qos as u8,
            p.pkid,
            p.dup,
            text(&p.payload)
        ),
        Packet::PubAck(a) => format!("PUBACK {}", a.pkid),
        Packet::PubRec(a) => format!("PUBREC {}", a.pkid),
        Packet::PubRel(a) => format!("PUBREL {}", a.pkid),
        Packet::PubComp(a) => format!("PUBCOMP {}", a.pkid),
        Packet::Connect(c) => format!("CONNECT clean {}", c.clean_start),
        Packet::Subscribe(s) => format!(
            "SUBSCRIBE {} {:?}",
            s.pkid,
            s.filters
                .iter()
                .map(|f| (f.filter.to_string(), f.options.qos as u8))
                .collect::<Vec<_>>()
        ),
        Packet::SubAck(a) => format!("SUBACK {} {:?}", a.pkid, a.codes),
        other => format!("{other:?}"),
    }
}

/// One SUBSCRIBE for several filters.
fn subscribe_many(pkid: u16, filters: &[(String, QoS)]) -> Packet {
    Packet::Subscribe(Subscribe {
        pkid,
        filters: filters.iter().map(|(f, q)| filter(f, opts(*q))).collect(),
        properties: Properties::default(),
    })
}

impl Subscriber {
    /// The subscriber's life: connections until `setup.churn` has passed, then one that
    /// stays until the publishers are done, and drains the session.
    async fn run(mut self) {
        let churn_end = self.env.started + self.env.setup.churn;
        let mut first = true;
        while Instant::now() < churn_end {
            let plan = self.choose_plan(first);
            first = false;
            let conn = self.connect(plan).await;
            let until = Instant::now() + self.rng.millis(50, 2500);
            self.live(conn, until).await;
            self.end_connection(conn).await;
        }
        // The last connection: no churn, everything acknowledged.
        let plan = Plan {
            clean: false,
            expiry: if self.protocol.is_v5() {
                600
            } else {
                NEVER_EXPIRE
            },
            window: None,
            pipelined: None,
            pair: false,
            reversed: false,
        };
        let conn = self.connect(plan).await;
        self.stalled = false;
        let settled = &self.env.settled;
        settled.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let subscribers = PLAIN_SUBSCRIBERS + MEMBERS;
        while *self.env.done.borrow() < PUBLISHERS
            || self.env.settled.load(std::sync::atomic::Ordering::SeqCst) < subscribers
        {
            let next = Instant::now() + Duration::from_millis(200);
            self.pump_until(next).await;
            self.ping(conn).await;
        }
        self.drain(conn).await;
        lock(&self.env.log).clients[self.no].last = self.epoch;
        self.write(
            conn,
            &Packet::Disconnect(ternmq::protocol::Disconnect::default()),
        )
        .await;
        if let Some(c) = self.conns.get_mut(&conn) {
            c.ours = true;
        }
        let open: Vec<String> = self
            .conns
            .iter()
            .filter(|(k, c)| **k != conn && !c.closed && !c.ours)
            .map(|(k, _)| k.to_string())
            .collect();
        if !open.is_empty() {
            self.violation(format!("conns taken over but never closed: {open:?}"));
        }
        for c in self.conns.values() {
            c.reader.abort();
        }
    }

    async fn ping(&mut self, conn: u64) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.pings += 1;
        }
        self.write(conn, &Packet::PingReq).await;
    }

    /// Acts on what arrives on `conn` until `until`: acknowledges (unless it stalls),
    /// pings, and (plain subscribers) unsubscribes and subscribes again now and then.
    async fn live(&mut self, conn: u64, until: Instant) {
        self.stalled = false;
        let span = until.saturating_duration_since(Instant::now()).as_millis() as u64;
        let stall_at = self
            .rng
            .chance(30)
            .then(|| Instant::now() + Duration::from_millis(self.rng.below(span + 1)));
        let unsub_at = (self.group.is_none() && self.subs.len() > 1 && self.rng.chance(20))
            .then(|| Instant::now() + Duration::from_millis(self.rng.below(span + 1)));
        let mut unsubscribed: Option<(String, QoS)> = None;
        let mut resub_at = None;
        let mut next_ping = Instant::now() + self.rng.millis(50, 400);
        loop {
            let now = Instant::now();
            if now >= until {
                return;
            }
            if stall_at.is_some_and(|t| now >= t) && !self.stalled {
                self.stalled = true;
                lock(&self.env.log).stats.stalls += 1;
            }
            if unsub_at.is_some_and(|t| now >= t) && unsubscribed.is_none() && resub_at.is_none() {
                let i = self.rng.below(self.subs.len() as u64) as usize;
                let (f, qos) = self.subs.remove(i);
                self.unsubscribe(conn, &f).await;
                if self.rng.chance(60) {
                    resub_at = Some(now + self.rng.millis(0, 500));
                }
                unsubscribed = Some((f, qos));
            }
            if resub_at.is_some_and(|t| now >= t) {
                resub_at = None;
                if let Some((f, qos)) = unsubscribed.clone() {
                    self.subs.push((f.clone(), qos));
                    self.subscribe(conn, vec![(f, qos)]).await;
                }
            }
            if now >= next_ping {
                self.ping(conn).await;
                next_ping = now + self.rng.millis(100, 500);
            }
            let mut wake = until.min(next_ping);
            for t in [stall_at, unsub_at, resub_at].into_iter().flatten() {
                if t > now {
                    wake = wake.min(t);
                }
            }
            self.pump_until(wake).await;
        }
    }

    async fn unsubscribe(&mut self, conn: u64, f: &str) {
        let epoch = self.conns[&conn].epoch.expect("connected");
        let pkid = self.pkid();
        {
            let mut log = lock(&self.env.log);
            let sent = log.tick();
            let e = &mut log.clients[self.no].epochs[epoch];
            for s in e
                .subs
                .iter_mut()
                .filter(|s| s.filter == f && s.unsub_sent.is_none())
            {
                s.unsub_sent = Some(sent);
            }
        }
        self.pending_unsub
            .insert((conn, pkid), (epoch, f.to_string()));
        let packet = Packet::Unsubscribe(ternmq::protocol::Unsubscribe {
            pkid,
            filters: vec![ByteStr::from(f)],
            properties: Properties::default(),
        });
        self.write(conn, &packet).await;
    }

    /// Ends a connection: DISCONNECT (5.0: sometimes with a new session expiry), vanish,
    /// or leave it open for the next connect to take over; then stays away a while,
    /// often until exactly the instant the session expires.
    async fn end_connection(&mut self, conn: u64) {
        let roll = self.rng.below(100);
        self.trace(|| {
            format!(
                "conn {conn} ends: {}",
                if roll < 20 {
                    "left for a takeover"
                } else if roll < 55 {
                    "DISCONNECT"
                } else {
                    "vanish"
                }
            )
        });
        if roll < 20 {
            let pause = Instant::now() + self.rng.millis(0, 100);
            self.pump_until(pause).await;
            return; // the next connect takes it over
        }
        if roll < 55 {
            let mut d = ternmq::protocol::Disconnect::default();
            if self.protocol.is_v5() && self.expiry != 0 && self.rng.chance(25) {
                let expiry = self.rng.pick(&[1, 2, 60]);
                d.properties.session_expiry_interval = Some(expiry);
                self.expiry = expiry;
            }
            self.write(conn, &Packet::Disconnect(d)).await;
            self.left_at = Some(Instant::now());
            lock(&self.env.log).stats.disconnects += 1;
            // The broker closes it; whatever it sent before is dropped unread.
            if let Some(c) = self.conns.get_mut(&conn) {
                c.ours = true;
                c.writer = None;
            }
        } else {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.ours = true;
                c.writer = None;
                c.reader.abort();
            }
            self.left_at = Some(Instant::now());
            lock(&self.env.log).stats.vanished += 1;
        }
        self.current = None;
        let left = self.left_at.expect("set");
        let expiry_ms = u64::from(self.expiry).saturating_mul(1000);
        let away = if (1000..=2000).contains(&expiry_ms) && self.rng.chance(35) {
            // At the expiry instant, or one tick either side.
            Duration::from_millis(expiry_ms - 1 + self.rng.below(3))
        } else {
            self.rng.millis(0, 2000)
        };
        self.pump_until(left + away).await;
    }

    /// Everything the session holds: pings until two rounds in a row bring nothing.
    async fn drain(&mut self, conn: u64) {
        if let Some(epoch) = self.epoch {
            self.state_for(epoch);
        }
        let mut quiet = 0;
        for _ in 0..500 {
            let before = lock(&self.env.log).clients[self.no]
                .epochs
                .iter()
                .map(|e| e.receipts.len())
                .sum::<usize>();
            let pongs = self.conns[&conn].pongs;
            self.ping(conn).await;
            let deadline = Instant::now() + WAIT;
            while self.conns[&conn].pongs == pongs {
                let Some((input, at, at_time)) = self.next_input(deadline).await else {
                    panic!(
                        "{}: no PINGRESP while draining (seed {})",
                        self.name, self.env.setup.seed
                    );
                };
                self.handle(input, at, at_time).await;
            }
            let after = lock(&self.env.log).clients[self.no]
                .epochs
                .iter()
                .map(|e| e.receipts.len())
                .sum::<usize>();
            let releases_due = !self.unreleased.is_empty();
            quiet = if after == before && !releases_due {
                quiet + 1
            } else {
                0
            };
            if quiet == 2 {
                return;
            }
        }
        self.violation(format!(
            "the session never drained (unreleased {:?}, stalled {})",
            self.unreleased, self.stalled
        ));
    }
}

// ---------------------------------------------------------------------------------------
// The run and the checks
// ---------------------------------------------------------------------------------------

/// Runs the clients of one seed against the broker at `target`; returns the log.
async fn run_clients(setup: Setup, target: common::client::Target) -> Log {
    let log: SharedLog = Arc::default();
    let (done_tx, done) = tokio::sync::watch::channel(0usize);
    let done_tx = Arc::new(done_tx);
    let env = Env {
        setup,
        target,
        log: log.clone(),
        done,
        settled: Arc::default(),
        started: Instant::now(),
    };
    let mut rng = Rng(setup.seed);
    let mut tasks = tokio::task::JoinSet::new();
    for no in 0..PUBLISHERS {
        tasks.spawn(publisher(env.clone(), no, rng.fork(), done_tx.clone()));
    }
    for no in 0..PLAIN_SUBSCRIBERS + MEMBERS {
        let group = (no >= PLAIN_SUBSCRIBERS).then(|| GROUPS[(no - PLAIN_SUBSCRIBERS) % 2]);
        let s = Subscriber::new(env.clone(), no, group, rng.fork());
        tasks.spawn(s.run());
    }
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            std::panic::resume_unwind(e.into_panic());
        }
    }
    drop(env);
    let taken = std::mem::take(&mut *lock(&log));
    taken
}

/// The invariants, over the whole log.
fn check(log: &Log, mode: Mode) -> Vec<String> {
    let mut v = Vec::new();
    let never = u64::MAX;
    for client in &log.clients {
        let name = &client.name;
        for (ei, e) in client.epochs.iter().enumerate() {
            let mut new_copies = std::collections::BTreeMap::<usize, (u32, u32)>::new();
            for r in &e.receipts {
                let m = &log.messages[r.msg];
                let acked = m.acked.unwrap_or(never);
                if r.qos > m.qos {
                    v.push(format!(
                        "{name}: message {} at QoS {:?}, published at {:?}",
                        r.msg, r.qos, m.qos
                    ));
                }
                let subscribed = match client.group {
                    None => e.subs.iter().any(|s| {
                        matches(&s.filter, &m.topic)
                            && s.sent < acked
                            && s.unsub_acked.is_none_or(|u| m.sent < u)
                            && r.qos <= s.qos
                    }),
                    // A member may get a message published before it joined: one an
                    // ended member left, that waited in the group or was handed over.
                    Some((g, f)) => {
                        let full = format!("$share/{g}/{f}");
                        matches(f, &m.topic)
                            && e.subs.iter().any(|s| s.filter == full && s.sent < r.at)
                            && log.clients.iter().any(|c| {
                                c.epochs.iter().any(|e| {
                                    e.subs.iter().any(|s| s.filter == full && s.sent < acked)
                                })
                            })
                    }
                };
                if !subscribed {
                    v.push(format!(
                        "{name} (session {ei}): message {} on {} outside any subscription",
                        r.msg, m.topic
                    ));
                }
                if let (Mode::Paused, Some(secs), false) = (mode, m.expiry, r.dup) {
                    let from = m.resent.unwrap_or(m.sent_at);
                    if r.at_time >= from + Duration::from_secs(u64::from(secs)) {
                        v.push(format!(
                            "{name}: message {} delivered {:?} after publication, its expiry {secs} s",
                            r.msg,
                            r.at_time - m.sent_at
                        ));
                    }
                }
                let copies = new_copies.entry(r.msg).or_default();
                copies.0 += u32::from(!r.dup);
                copies.1 += u32::from(r.fresh && r.qos == QoS::ExactlyOnce);
            }
            for (msg, (new, fresh2)) in new_copies {
                let m = &log.messages[msg];
                // Routed once (a QoS 1 publish resent by its publisher may be routed twice).
                if new > 1 && !(m.resent.is_some() && m.qos == QoS::AtLeastOnce) {
                    v.push(format!(
                        "{name} (session {ei}): message {msg} sent {new} times as new"
                    ));
                }
                if fresh2 > 1 {
                    v.push(format!(
                        "{name} (session {ei}): QoS 2 message {msg} delivered {fresh2} times"
                    ));
                }
            }
        }
        // At least once: in the session drained at the end, every QoS 1/2 message
        // published while it was subscribed.
        let Some(last) = client.last else {
            v.push(format!("{name}: never drained"));
            continue;
        };
        let e = &client.epochs[last];
        if client.group.is_some() {
            continue;
        }
        for (mi, m) in log.messages.iter().enumerate() {
            let Some(acked) = m.acked else { continue };
            if m.expiry.is_some() || m.qos == QoS::AtMostOnce {
                continue;
            }
            let qos = e
                .subs
                .iter()
                .filter(|s| {
                    matches(&s.filter, &m.topic)
                        && s.acked.is_some_and(|a| a < m.sent)
                        && s.unsub_sent.is_none_or(|u| acked < u)
                })
                .map(|s| s.qos.min(m.qos))
                .max();
            let Some(qos) = qos.filter(|q| *q != QoS::AtMostOnce) else {
                continue;
            };
            let got: Vec<&Receipt> = e.receipts.iter().filter(|r| r.msg == mi).collect();
            if got.is_empty() {
                v.push(format!(
                    "{name} (session {last}): QoS {qos:?} message {mi} on {} lost",
                    m.topic
                ));
            } else if qos == QoS::ExactlyOnce
                && got
                    .iter()
                    .filter(|r| r.fresh && r.qos == QoS::ExactlyOnce)
                    .count()
                    != 1
            {
                v.push(format!(
                    "{name} (session {last}): QoS 2 message {mi} not delivered exactly once"
                ));
            }
        }
    }
    // Shared subscriptions: to one member (QoS 2: exactly one; QoS 1: at least one).
    for (g, f) in GROUPS {
        let full = format!("$share/{g}/{f}");
        let members: Vec<&ClientLog> = log
            .clients
            .iter()
            .filter(|c| c.group == Some((g, f)))
            .collect();
        for (mi, m) in log.messages.iter().enumerate() {
            if !matches(f, &m.topic) {
                continue;
            }
            let Some(acked) = m.acked else { continue };
            let mut receivers = std::collections::BTreeSet::new();
            let (mut qos2, mut new) = (false, 0);
            for c in &members {
                for (ei, e) in c.epochs.iter().enumerate() {
                    for r in e.receipts.iter().filter(|r| r.msg == mi) {
                        receivers.insert((c.name.as_str(), ei));
                        qos2 |= r.qos == QoS::ExactlyOnce;
                        new += u32::from(!r.dup);
                    }
                }
            }
            if qos2 && receivers.len() > 1 {
                v.push(format!(
                    "{full}: QoS 2 message {mi} to {} members: {receivers:?}",
                    receivers.len()
                ));
            }
            if m.qos == QoS::AtMostOnce && new > 1 {
                v.push(format!("{full}: QoS 0 message {mi} sent {new} times"));
            }
            if m.qos == QoS::AtMostOnce || m.expiry.is_some() || !receivers.is_empty() {
                continue;
            }
            // Due: a member subscribed before it was published kept its session to the
            // end. For QoS 2, only if no member's session that could have held it ended
            // (a QoS 2 message sent to a member goes to no other [MQTT-4.8.2-5]).
            let kept = members.iter().any(|c| {
                c.last.is_some_and(|l| {
                    c.epochs[l]
                        .subs
                        .iter()
                        .any(|s| s.filter == full && s.acked.is_some_and(|a| a < m.sent))
                })
            });
            let ended = members.iter().any(|c| {
                c.epochs.iter().enumerate().any(|(ei, e)| {
                    Some(ei) != c.last
                        && e.superseded.is_some_and(|s| s > m.sent)
                        && e.subs.iter().any(|s| s.filter == full && s.sent < acked)
                })
            });
            if kept && (m.qos == QoS::AtLeastOnce || !ended) {
                v.push(format!(
                    "{full}: QoS {:?} message {mi} reached no member",
                    m.qos
                ));
            }
        }
    }
    v.extend(log.violations.iter().cloned());
    v
}

/// Panics with the violations, the seed and how to run it again.
fn report(test: &str, setup: Setup, log: &Log) {
    let violations = check(log, setup.mode);
    let qos: [usize; 3] = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
        .map(|q| log.messages.iter().filter(|m| m.qos == q).count());
    eprintln!(
        "{test} seed {}: {} messages (QoS 0/1/2: {qos:?}), {:?}",
        setup.seed,
        log.messages.len(),
        log.stats
    );
    if !violations.is_empty() {
        let shown: Vec<&String> = violations.iter().take(25).collect();
        panic!(
            "{} violation(s) with seed {}; run it again with\n  RACES_SEED={} cargo test --test races {test}\n{shown:#?}",
            violations.len(),
            setup.seed,
            setup.seed
        );
    }
}

/// The seeds to run: `RACES_SEED`, or `count` × `RACES_ITERATIONS` of them.
fn seeds(count: u64) -> Vec<u64> {
    if let Ok(seed) = std::env::var("RACES_SEED") {
        return vec![seed.parse().expect("RACES_SEED is a number")];
    }
    (0..count * env_number("RACES_ITERATIONS", 1)).collect()
}

/// Many seeds on the paused clock, in memory: exact and reproducible.
#[test]
fn randomized_clients_keep_every_delivery_promise() {
    for seed in seeds(64) {
        let setup = Setup {
            mode: Mode::Paused,
            seed,
            churn: Duration::from_secs(10),
            publish: Duration::from_secs(12),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime");
        let log = rt.block_on(async {
            let b = TestBroker::in_memory(|_| {});
            run_clients(setup, b.target()).await
        });
        report(
            "randomized_clients_keep_every_delivery_promise",
            setup,
            &log,
        );
    }
}

/// One run over TCP on several threads, in real time: the races the paused clock cannot
/// produce (two connections of a client inside the broker at once).
#[test]
fn randomized_clients_over_tcp_keep_every_delivery_promise() {
    let seed = match std::env::var("RACES_SEED") {
        Ok(s) => s.parse().expect("RACES_SEED is a number"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let rounds = env_number("RACES_ITERATIONS", 1);
    for round in 0..rounds {
        let setup = Setup {
            mode: Mode::Tcp,
            seed: seed + round,
            churn: Duration::from_secs(6),
            publish: Duration::from_secs(8),
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .expect("runtime");
        let log = rt.block_on(async {
            let b = TestBroker::start().await;
            let log = run_clients(setup, b.target()).await;
            b.stop().await;
            log
        });
        report(
            "randomized_clients_over_tcp_keep_every_delivery_promise",
            setup,
            &log,
        );
    }
}
