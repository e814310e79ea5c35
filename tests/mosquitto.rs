//! Interoperability with Debian's mosquitto clients: `mosquitto_pub` and `mosquitto_sub`
//! run as subprocesses against an in-process broker.
//!
//! Every wait is bounded: `mosquitto_sub` gets `-C <count>` and `-W <seconds>`, and the
//! test waits for a client's effect on the broker (its subscription, its session ending)
//! before going on, instead of sleeping. Each child process is owned by a `Proc`, which
//! kills it (by PID) when dropped, so a failing test leaves nothing behind.
//!
//! Without the clients, the tests are skipped with a note, except under `CI=true`,
//! where they fail: `tests/run.sh` installs them.
// A test reads best as one sequence of steps, however long.
#![allow(clippy::too_many_lines)]

mod common;

use common::client::{encode, publish_packet, Client};
use common::mosquitto::*;
use common::TestBroker;
use std::collections::HashSet;
use ternmq::protocol::{Packet, Protocol, QoS};

/// Returns from the test if the clients are missing (outside CI).
macro_rules! require_clients {
    () => {
        if !clients_available() {
            return;
        }
    };
}

/// `mosquitto_sub -t '#' -v` sees, in order, what `mosquitto_pub` sends at `qos`.
async fn round_trip(qos: &str) {
    let broker = TestBroker::start().await;
    let mut sub = mosquitto_sub(&broker, &["-t", "#", "-v", "-q", qos, "-C", "3"]);
    wait_subscriptions(&broker, 1, &mut sub).await;
    let topic = format!("qos{qos}/test");
    publish_lines(
        &broker,
        &["-q", qos, "-t", &topic],
        &["hello world", "ünïcödé", "three"],
    )
    .await;
    assert_eq!(
        sub.output().await,
        [
            format!("{topic} hello world"),
            format!("{topic} ünïcödé"),
            format!("{topic} three"),
        ]
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_round_trip() {
    require_clients!();
    round_trip("0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_round_trip() {
    require_clients!();
    round_trip("1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_round_trip() {
    require_clients!();
    round_trip("2").await;
}

/// A message is delivered at the lower of its QoS and the subscription's (`%q`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_qos_is_capped_by_the_subscription() {
    require_clients!();
    let broker = TestBroker::start().await;
    let format = ["-F", "%q %t %p", "-C", "2"];
    let mut at0 = mosquitto_sub(
        &broker,
        &[&["-q", "0", "-t", "cap/#"][..], &format].concat(),
    );
    wait_subscriptions(&broker, 1, &mut at0).await;
    let mut at1 = mosquitto_sub(
        &broker,
        &[&["-q", "1", "-t", "cap/#"][..], &format].concat(),
    );
    wait_subscriptions(&broker, 2, &mut at1).await;
    publish(&broker, &["-q", "2", "-t", "cap/two", "-m", "x"]).await;
    publish(&broker, &["-q", "1", "-t", "cap/one", "-m", "y"]).await;
    assert_eq!(at0.output().await, ["0 cap/two x", "0 cap/one y"]);
    assert_eq!(at1.output().await, ["1 cap/two x", "1 cap/one y"]);
    broker.stop().await;
}

/// Subscriber and publishers all use protocol `version`, publishing at QoS 2, 1, 0.
async fn pub_sub_with_version(version: &str) {
    let broker = TestBroker::start().await;
    let mut sub = mosquitto_sub(
        &broker,
        &["-V", version, "-q", "2", "-t", "v/#", "-v", "-C", "3"],
    );
    wait_subscriptions(&broker, 1, &mut sub).await;
    // QoS 2 and 1 first: their publisher exits only once the broker has routed the
    // message, so the three arrive in this order.
    publish(
        &broker,
        &["-V", version, "-q", "2", "-t", "v/two", "-m", "2"],
    )
    .await;
    publish(
        &broker,
        &["-V", version, "-q", "1", "-t", "v/one", "-m", "1"],
    )
    .await;
    publish(
        &broker,
        &["-V", version, "-q", "0", "-t", "v/zero", "-m", "0"],
    )
    .await;
    assert_eq!(
        sub.output().await,
        ["v/two 2", "v/one 1", "v/zero 0"],
        "protocol {version}"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqttv31_pub_sub() {
    require_clients!();
    pub_sub_with_version("mqttv31").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqttv311_pub_sub() {
    require_clients!();
    pub_sub_with_version("mqttv311").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqttv5_pub_sub() {
    require_clients!();
    pub_sub_with_version("mqttv5").await;
}

/// Clients of different protocol versions exchange messages through the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_protocol_versions_interoperate() {
    require_clients!();
    let broker = TestBroker::start().await;
    let mut subs = Vec::new();
    for (n, version) in ["mqttv31", "mqttv311", "mqttv5"].into_iter().enumerate() {
        let mut sub = mosquitto_sub(
            &broker,
            &["-V", version, "-q", "1", "-t", "mix/#", "-v", "-C", "3"],
        );
        wait_subscriptions(&broker, n + 1, &mut sub).await;
        subs.push((version, sub));
    }
    for version in ["mqttv5", "mqttv311", "mqttv31"] {
        let topic = format!("mix/{version}");
        publish(
            &broker,
            &["-V", version, "-q", "1", "-t", &topic, "-m", "hi"],
        )
        .await;
    }
    for (version, sub) in subs {
        assert_eq!(
            sub.output().await,
            ["mix/mqttv5 hi", "mix/mqttv311 hi", "mix/mqttv31 hi"],
            "subscriber using {version}"
        );
    }
    broker.stop().await;
}

/// `-r` stores a message for later subscribers, with the retain flag set (`%r`); a live
/// subscriber gets it without the flag; `-r -n` clears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_message_reaches_later_subscribers_and_can_be_cleared() {
    require_clients!();
    let broker = TestBroker::start().await;
    let router = &broker.broker().router;
    let format = ["-F", "%r %t %p", "-C", "1"];

    let mut live = mosquitto_sub(&broker, &[&["-t", "ret/#"][..], &format].concat());
    wait_subscriptions(&broker, 1, &mut live).await;
    publish(&broker, &["-r", "-q", "1", "-t", "ret/a", "-m", "kept"]).await;
    assert_eq!(live.output().await, ["0 ret/a kept"], "live subscriber");
    wait_no_connections(&broker).await;
    assert_eq!(router.retained_count(), 1, "the message is retained");

    // Retained messages are sent on subscription: no publish needed.
    let later = mosquitto_sub(&broker, &[&["-t", "ret/#"][..], &format].concat());
    assert_eq!(later.output().await, ["1 ret/a kept"], "later subscriber");
    wait_no_connections(&broker).await;

    publish(&broker, &["-r", "-n", "-q", "1", "-t", "ret/a"]).await;
    assert_eq!(router.retained_count(), 0, "`-r -n` clears the message");
    let mut after_clear = mosquitto_sub(&broker, &["-t", "ret/#", "-v", "-C", "1"]);
    wait_subscriptions(&broker, 1, &mut after_clear).await;
    publish(&broker, &["-q", "1", "-t", "ret/probe", "-m", "probe"]).await;
    assert_eq!(
        after_clear.output().await,
        ["ret/probe probe"],
        "a subscriber after the clear gets no retained message, only the probe"
    );
    broker.stop().await;
}

/// A client with a will is killed (no DISCONNECT): the will reaches a subscriber.
async fn will_on_kill(version: &str) {
    let broker = TestBroker::start().await;
    let mut watcher = mosquitto_sub(&broker, &["-t", "will/#", "-v", "-C", "1"]);
    wait_subscriptions(&broker, 1, &mut watcher).await;
    let mut client = mosquitto_sub(
        &broker,
        &[
            "-V",
            version,
            "-i",
            "willer",
            "--will-topic",
            "will/willer",
            "--will-payload",
            "gone",
            "--will-qos",
            "1",
            "-t",
            "idle/topic",
        ],
    );
    // Subscribed means connected, and the will is registered.
    wait_subscriptions(&broker, 2, &mut client).await;
    client.kill().await;
    assert_eq!(
        watcher.output().await,
        ["will/willer gone"],
        "will of a killed {version} client"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_published_when_client_is_killed() {
    require_clients!();
    will_on_kill("mqttv311").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_published_when_mqttv31_client_is_killed() {
    require_clients!();
    will_on_kill("mqttv31").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_published_when_mqttv5_client_is_killed() {
    require_clients!();
    will_on_kill("mqttv5").await;
}

/// A client that disconnects cleanly (`-E`: exit once subscribed) leaves no will.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_not_published_after_clean_disconnect() {
    require_clients!();
    let broker = TestBroker::start().await;
    let mut watcher = mosquitto_sub(&broker, &["-t", "will/#", "-v", "-C", "1"]);
    wait_subscriptions(&broker, 1, &mut watcher).await;
    let client = mosquitto_sub(
        &broker,
        &[
            "-i",
            "polite",
            "--will-topic",
            "will/polite",
            "--will-payload",
            "gone",
            "-t",
            "idle/topic",
            "-E",
        ],
    );
    client.output().await;
    // The clean session ends only after its connection has decided about the will: had
    // the will been published, the watcher would have it queued before the probe.
    let b = broker.broker();
    wait_until(
        "the client's session to end",
        || b.session("polite").is_none(),
        &mut [&mut watcher],
    )
    .await;
    publish(&broker, &["-q", "1", "-t", "will/probe", "-m", "probe"]).await;
    assert_eq!(
        watcher.output().await,
        ["will/probe probe"],
        "no will after a clean disconnect, only the probe"
    );
    broker.stop().await;
}

/// `-c -i id`: QoS 1 messages published while the client is away are queued and arrive
/// in order when it comes back; a QoS 0 one is not queued (queue_qos0_messages = false).
/// `kill` stops the first connection with SIGKILL instead of a clean disconnect.
async fn persistent_session(version: &str, kill: bool) {
    let broker = TestBroker::start().await;
    let id = format!("persist-{version}");
    let session = ["-V", version, "-c", "-i", &id, "-q", "1", "-t", "queue/t"];
    let mut first = if kill {
        mosquitto_sub(&broker, &session)
    } else {
        mosquitto_sub(&broker, &[&session[..], &["-E"]].concat())
    };
    wait_subscriptions(&broker, 1, &mut first).await;
    if kill {
        first.kill().await;
    } else {
        first.output().await;
    }
    wait_no_connections(&broker).await;
    assert!(
        broker.broker().session(&id).is_some(),
        "the session outlives its connection"
    );
    assert_eq!(
        broker.broker().router.subscription_count(),
        1,
        "the offline session keeps its subscription"
    );

    publish_lines(&broker, &["-q", "1", "-t", "queue/t"], &["m1", "m2", "m3"]).await;
    publish(
        &broker,
        &["-q", "0", "-t", "queue/t", "-m", "qos0-not-queued"],
    )
    .await;
    publish(&broker, &["-q", "1", "-t", "queue/t", "-m", "m4"]).await;

    let back = mosquitto_sub(&broker, &[&session[..], &["-v", "-C", "4"]].concat());
    assert_eq!(
        back.output().await,
        ["queue/t m1", "queue/t m2", "queue/t m3", "queue/t m4"],
        "queued messages on reconnection ({version})"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_receives_messages_queued_while_offline() {
    require_clients!();
    persistent_session("mqttv311", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_survives_a_killed_client() {
    require_clients!();
    persistent_session("mqttv311", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqttv5_persistent_session_receives_messages_queued_while_offline() {
    require_clients!();
    persistent_session("mqttv5", false).await;
}

/// `+`, `#` and exact filters, several `-t` on one subscriber; overlapping filters
/// deliver one copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_subscriptions() {
    require_clients!();
    let broker = TestBroker::start().await;
    let filters = ["a/+/c", "x/#", "exact", "o/#", "o/+"];
    let mut args = vec!["-q", "1", "-v", "-C", "6"];
    for f in &filters {
        args.extend(["-t", f]);
    }
    let mut sub = mosquitto_sub(&broker, &args);
    wait_subscriptions(&broker, filters.len(), &mut sub).await;
    let topics = [
        ("a/b/c", true),
        ("a/b/d", false),
        ("a/c", false),
        ("a/b/c/d", false),
        ("x", true), // `x/#` matches its parent level too
        ("x/y/z", true),
        ("exact", true),
        ("exactly", false),
        ("o/x", true),   // matches `o/#` and `o/+`: one copy
        ("o/p/q", true), // `o/#` only: after the one above, shows there was no second copy
    ];
    for (n, (topic, _)) in topics.iter().enumerate() {
        publish(&broker, &["-q", "1", "-t", topic, "-m", &n.to_string()]).await;
    }
    let expected: Vec<String> = topics
        .iter()
        .enumerate()
        .filter(|(_, (_, matches))| *matches)
        .map(|(n, (topic, _))| format!("{topic} {n}"))
        .collect();
    assert_eq!(sub.output().await, expected, "filters {filters:?}");
    broker.stop().await;
}

/// A payload far bigger than one read: `%l` prints the received payload's length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_payload_round_trip() {
    require_clients!();
    let broker = TestBroker::start().await;
    let mut sub = mosquitto_sub(&broker, &["-q", "1", "-t", "big", "-F", "%t %l", "-C", "1"]);
    wait_subscriptions(&broker, 1, &mut sub).await;
    let payload: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    mosquitto_pub_with_input(&broker, &["-q", "1", "-t", "big", "-s"], Some(payload))
        .output()
        .await;
    assert_eq!(sub.output().await, ["big 300000"]);
    broker.stop().await;
}

/// 1,500 retained messages, more than a session queue holds (1,000): a new `r/#`
/// subscriber at QoS 1 receives every one of them (they are walked from the retained
/// store as the client acknowledges, not pushed into the queue at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_retained_message_reaches_a_new_subscriber() {
    require_clients!();
    const RETAINED: u16 = 1_500;
    let broker = TestBroker::start().await;
    // Published fast: one write, then the PUBACKs.
    let mut publisher = Client::connect_v311(broker.addr, "retainer").await;
    let mut burst = Vec::new();
    for pkid in 1..=RETAINED {
        let p = publish_packet(&format!("r/{pkid}"), b"kept", QoS::AtLeastOnce, true, pkid);
        burst.extend_from_slice(&encode(&Packet::Publish(p), Protocol::V311));
    }
    publisher.send_raw(&burst).await;
    assert_eq!(
        publisher.ping().await.len(),
        usize::from(RETAINED),
        "PUBACKs"
    );

    let count = RETAINED.to_string();
    let sub = mosquitto_sub(
        &broker,
        &["-q", "1", "-t", "r/#", "-F", "%r %q %t", "-C", &count],
    );
    let lines = sub.output().await;
    assert_eq!(lines.len(), usize::from(RETAINED));
    let topics: HashSet<&str> = lines
        .iter()
        .map(|l| {
            l.strip_prefix("1 1 ")
                .unwrap_or_else(|| panic!("retained, QoS 1: {l}"))
        })
        .collect();
    let want: HashSet<String> = (1..=RETAINED).map(|i| format!("r/{i}")).collect();
    assert_eq!(
        topics,
        want.iter().map(String::as_str).collect(),
        "each one once"
    );
    broker.stop().await;
}

/// With `max_keepalive = 60`, mosquitto_sub asking for a keep-alive of 61 s is refused
/// ("identifier rejected", 3.1.1 has no other way to say it); 60 s is accepted.
/// (mosquitto_sub itself refuses `-k 0`; keep-alive 0 is tested with the raw client in
/// tests/mqtt3.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_keepalive_refuses_mosquitto_sub_asking_for_more() {
    require_clients!();
    let broker = TestBroker::with(|cfg| cfg.mqtt.max_keepalive = 60).await;
    let mut refused = mosquitto_sub(&broker, &["-k", "61", "-t", "ka/t", "-C", "1"]);
    let status = refused.wait().await;
    assert!(!status.success(), "{}", refused.describe());
    assert!(
        refused.stderr().contains("identifier rejected"),
        "{}",
        refused.describe()
    );

    let mut accepted = mosquitto_sub(&broker, &["-k", "60", "-t", "ka/t", "-C", "1"]);
    wait_subscriptions(&broker, 1, &mut accepted).await;
    publish(&broker, &["-q", "1", "-t", "ka/t", "-m", "welcome"]).await;
    assert_eq!(accepted.output().await, ["welcome"]);
    broker.stop().await;
}
