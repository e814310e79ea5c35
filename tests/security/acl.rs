//! The ACL on every path a message takes, one test per path, each with a mosquitto-format
//! acl_file; and the same file in a real mosquitto, which must decide the same.
//!
//! Clients log in by username alone: without a password file, mosquitto and ternmq both
//! let a client that allow_anonymous admits keep the username it gives, for the ACL.

use crate::common::client::{
    connect_expiry, connect_v311, connect_v5, connect_with_will, filter, opts, plain, retained,
    text, Client, Target,
};
use crate::common::mosquitto::{mosquitto_broker_available, MosquittoBroker};
use crate::common::TestBroker;
use crate::support::*;
use bytes::Bytes;
use std::sync::Arc;
use ternmq::message::Message;
use ternmq::protocol::{ByteStr, Connect, Packet, Properties, Protocol, QoS, ReasonCode};

/// The acl_file of the delivery-path tests.
const ACL: &str = "\
# anonymous clients
topic read public/#

user reader
topic read allowed/#

# mallory may read only the open part of what reader reads
user mallory
topic read allowed/open/#

user writer
topic write #

user everything
topic read #

user sysreader
topic read $SYS/#
";

async fn with_acl(acl: &str) -> (TestBroker, Files) {
    let files = Files::new();
    let path = files.write("acl", acl);
    let b = TestBroker::with(move |c| c.auth.acl_file = Some(path)).await;
    (b, files)
}

fn as_user(connect: Connect, user: &str) -> Connect {
    Connect {
        username: Some(ByteStr::from(user)),
        ..connect
    }
}

async fn v5(b: &TestBroker, id: &str, user: &str) -> Client {
    Client::accepted(b.addr, as_user(connect_v5(id), user))
        .await
        .0
}

fn topics(c: &[ternmq::protocol::Publish]) -> Vec<String> {
    c.iter().map(|p| p.topic.to_string()).collect()
}

/// Live routing: a message the subscriber may not read is not sent, whatever its
/// subscription (mosquitto grants any SUBSCRIBE and filters delivery).
#[tokio::test]
async fn live_messages_are_checked_for_read() {
    let (b, _f) = with_acl(ACL).await;
    let mut reader = v5(&b, "reader", "reader").await;
    reader.subscribe("#", QoS::AtLeastOnce).await;
    let mut writer = v5(&b, "writer", "writer").await;
    for topic in ["allowed/1", "denied/1", "allowed/2"] {
        writer
            .publish_expect(plain(topic, b"x", QoS::AtLeastOnce), ReasonCode::Success)
            .await;
    }
    assert_eq!(
        topics(&reader.drain_publishes().await),
        ["allowed/1", "allowed/2"]
    );
}

/// Retained messages sent on subscribe go through the same check.
#[tokio::test]
async fn retained_messages_on_subscribe_are_checked_for_read() {
    let (b, _f) = with_acl(ACL).await;
    let mut writer = v5(&b, "writer", "writer").await;
    for topic in ["allowed/r1", "denied/r", "allowed/r2"] {
        writer
            .publish(retained(topic, b"kept", QoS::AtLeastOnce))
            .await;
    }
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
        let mut reader = v5(&b, &format!("reader-{qos:?}"), "reader").await;
        reader.subscribe("#", qos).await;
        let got = reader.drain_publishes().await;
        assert_eq!(topics(&got), ["allowed/r1", "allowed/r2"], "at {qos:?}");
        assert!(got.iter().all(|p| p.retain));
        reader.disconnect().await;
    }
}

/// A resumed session replays what was in flight and what was queued: each message is
/// checked for whoever resumes it. Here mallory resumes a session reader left (nothing in
/// mosquitto's acl_file ties a client id to a user): she gets only what she may read.
#[tokio::test]
async fn queued_and_in_flight_messages_of_a_resumed_session_are_checked_for_read() {
    let (b, _f) = with_acl(ACL).await;
    let mut writer = v5(&b, "writer", "writer").await;
    // `resumer` resumes the session of the device `id` after it left with one message in
    // flight and two queued; returns what the resumed session sends.
    async fn replay(b: &TestBroker, writer: &mut Client, id: &str, resumer: &str) -> Vec<String> {
        let (mut device, _) =
            Client::accepted(b.addr, as_user(connect_expiry(id, true, 600), "reader")).await;
        device.subscribe("allowed/#", QoS::AtLeastOnce).await;
        writer
            .publish(plain("allowed/secret/1", b"x", QoS::AtLeastOnce))
            .await;
        // Received and not acknowledged: in flight when the device goes.
        assert_eq!(device.expect_publish().await.topic, "allowed/secret/1");
        device.disconnect().await;
        writer
            .publish(plain("allowed/secret/2", b"x", QoS::AtLeastOnce))
            .await;
        writer
            .publish(plain("allowed/open/3", b"x", QoS::AtLeastOnce))
            .await;
        let (mut c, ack) =
            Client::accepted(b.addr, as_user(connect_expiry(id, false, 600), resumer)).await;
        assert!(ack.session_present);
        topics(&c.drain_publishes().await)
    }
    // The device itself gets all three back.
    assert_eq!(
        replay(&b, &mut writer, "dev-1", "reader").await,
        ["allowed/secret/1", "allowed/secret/2", "allowed/open/3"]
    );
    assert_eq!(
        replay(&b, &mut writer, "dev-2", "mallory").await,
        ["allowed/open/3"]
    );
}

/// Shared subscriptions: the member a message goes to must be allowed to read it.
#[tokio::test]
async fn shared_subscription_messages_are_checked_for_read() {
    let (b, _f) = with_acl(ACL).await;
    let mut reader = v5(&b, "reader", "reader").await;
    reader
        .subscribe("$share/r/allowed/#", QoS::AtLeastOnce)
        .await;
    let mut mallory = v5(&b, "mallory", "mallory").await;
    mallory
        .subscribe("$share/m/allowed/#", QoS::AtLeastOnce)
        .await;
    let mut writer = v5(&b, "writer", "writer").await;
    for topic in ["allowed/secret/1", "allowed/open/2"] {
        writer.publish(plain(topic, b"x", QoS::AtLeastOnce)).await;
    }
    assert_eq!(
        topics(&reader.drain_publishes().await),
        ["allowed/secret/1", "allowed/open/2"]
    );
    assert_eq!(topics(&mallory.drain_publishes().await), ["allowed/open/2"]);
}

/// Wills: a client may only leave a will it may publish (CONNACK 0x87 / 5 otherwise);
/// one it may publish reaches only who may read it.
#[tokio::test]
async fn wills_are_checked_for_write_at_connect_and_for_read_on_delivery() {
    let (b, _f) = with_acl(ACL).await;
    for protocol in [Protocol::V5, Protocol::V311] {
        let connect = Connect {
            protocol,
            ..as_user(
                connect_with_will("r", "allowed/will", "gone", Properties::default()),
                "reader",
            )
        };
        connect_expecting(b.addr, connect, ReasonCode::NotAuthorized).await;
    }
    let mut reader = v5(&b, "reader", "reader").await;
    reader.subscribe("#", QoS::AtLeastOnce).await;
    let mut all = v5(&b, "everything", "everything").await;
    all.subscribe("#", QoS::AtLeastOnce).await;
    for topic in ["allowed/will", "denied/will"] {
        let connect = as_user(
            connect_with_will(topic, topic, "gone", Properties::default()),
            "writer",
        );
        let (mut w, _) = Client::accepted(b.addr, connect).await;
        // Ends without DISCONNECT: the will goes out.
        w.send(Packet::PingReq).await;
        w.expect("PINGRESP").await;
        drop(w);
        assert_eq!(text(&all.expect_publish().await.payload), "gone");
    }
    assert_eq!(topics(&reader.drain_publishes().await), ["allowed/will"]);
}

/// PUBLISH without write access: QoS 0 dropped, QoS 1/2 answered 0x87 in 5.0 and
/// acknowledged as usual in 3.1.1 (which has no way to say no); nothing is routed and the
/// client stays connected.
#[tokio::test]
async fn publish_without_write_access_is_not_routed() {
    let (b, _f) = with_acl(ACL).await;
    let mut all = v5(&b, "everything", "everything").await;
    all.subscribe("#", QoS::ExactlyOnce).await;

    let mut c5 = v5(&b, "reader-5", "reader").await;
    c5.publish_expect(
        plain("allowed/q0", b"x", QoS::AtMostOnce),
        ReasonCode::Success,
    )
    .await;
    c5.publish_expect(
        plain("allowed/q1", b"x", QoS::AtLeastOnce),
        ReasonCode::NotAuthorized,
    )
    .await;
    c5.publish_expect(
        plain("allowed/q2", b"x", QoS::ExactlyOnce),
        ReasonCode::NotAuthorized,
    )
    .await;

    let mut c3 = Client::connect_accepted(b.addr, as_user(connect_v311("reader-3"), "reader"))
        .await
        .0;
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        // Asserts the bare 3.1.1 PUBACK, or PUBREC / PUBREL / PUBCOMP.
        c3.publish_v311(&format!("allowed/v3/{qos:?}"), b"x", qos, false)
            .await;
    }
    c5.expect_quiet("after its refused publishes").await;
    all.expect_quiet("nothing unauthorized was routed").await;
    // A control: what the writer publishes does arrive.
    let mut writer = v5(&b, "writer", "writer").await;
    writer
        .publish(plain("allowed/ok", b"x", QoS::AtLeastOnce))
        .await;
    assert_eq!(topics(&all.drain_publishes().await), ["allowed/ok"]);
}

/// With `subscribe` rules in the file, SUBSCRIBE filters are checked: 0x87 (5.0) or 0x80
/// (3.1.1) per refused filter, the others granted. Without, every filter is granted
/// (mosquitto's behaviour) and delivery is filtered.
#[tokio::test]
async fn subscribe_rules_refuse_filters_with_0x87_or_0x80() {
    let rules = "user sub\ntopic subscribe allowed/#\ntopic read allowed/#\n";
    let (b, _f) = with_acl(rules).await;
    let filters = |c: &[&str]| {
        c.iter()
            .map(|f| filter(f, opts(QoS::AtLeastOnce)))
            .collect::<Vec<_>>()
    };
    let wanted = ["allowed/#", "allowed/+/x", "denied/#", "#", "+/x"];
    let mut c5 = v5(&b, "sub-5", "sub").await;
    assert_eq!(
        c5.subscribe_with(filters(&wanted), Properties::default())
            .await,
        [
            ReasonCode::GrantedQoS1,
            ReasonCode::GrantedQoS1,
            ReasonCode::NotAuthorized,
            ReasonCode::NotAuthorized,
            ReasonCode::NotAuthorized,
        ]
    );
    let mut c3 = Client::connect_accepted(b.addr, as_user(connect_v311("sub-3"), "sub"))
        .await
        .0;
    assert_eq!(
        c3.subscribe_qos(&wanted.map(|f| (f, QoS::AtLeastOnce)))
            .await,
        [1, 1, 0x80, 0x80, 0x80]
    );

    let (b, _f) = with_acl(ACL).await;
    let mut c5 = v5(&b, "reader", "reader").await;
    assert_eq!(
        c5.subscribe_with(filters(&wanted), Properties::default())
            .await,
        [ReasonCode::GrantedQoS1; 5]
    );
}

/// `$SYS` topics: `#` matches none of them, in a subscription or in a `read` rule; only a
/// rule that names `$SYS` lets them through.
#[tokio::test]
async fn sys_topics_are_not_readable_through_hash() {
    let files = Files::new();
    let acl = files.write("acl", ACL);
    let b = TestBroker::with(move |c| {
        c.auth.acl_file = Some(acl);
        c.sys_interval = 10;
    })
    .await;
    // The broker's own $SYS topics, retained (`$SYS/broker/version` from the start).
    let broker = b.broker().clone();
    crate::wait_for("the $SYS topics", || broker.router.retained_count() > 0).await;
    let mut all = v5(&b, "everything", "everything").await;
    all.subscribe_ok(&[("#", QoS::AtLeastOnce), ("$SYS/#", QoS::AtLeastOnce)])
        .await;
    let mut admin = v5(&b, "sysreader", "sysreader").await;
    // At QoS 0, all of them at once (at QoS 1 they would come 20 at a time, the window).
    admin.subscribe("$SYS/#", QoS::AtMostOnce).await;
    let retained = topics(&admin.drain_publishes().await);
    assert!(
        retained.iter().any(|t| t == "$SYS/broker/version")
            && retained.iter().all(|t| t.starts_with("$SYS/")),
        "{retained:?}"
    );
    // And one published live, as the $SYS task does.
    let live = Arc::new(Message::new(
        ByteStr::from("$SYS/broker/clients/connected"),
        Bytes::from_static(b"42"),
        QoS::AtLeastOnce,
        true,
        None,
        0,
        ternmq::clock::now(),
    ));
    b.broker().publish(&live);
    assert_eq!(
        topics(&admin.drain_publishes().await),
        ["$SYS/broker/clients/connected"]
    );
    all.expect_quiet("for `topic read #`").await;
    // Nobody writes $SYS, whatever the rules (mosquitto's rule too).
    let mut writer = v5(&b, "writer", "writer").await;
    writer
        .publish_expect(
            plain("$SYS/broker/fake", b"x", QoS::AtLeastOnce),
            ReasonCode::NotAuthorized,
        )
        .await;
    admin.expect_quiet("after a refused $SYS publish").await;
}

// ---------------------------------------------------------------------------------------
// The same acl_file in mosquitto
// ---------------------------------------------------------------------------------------

/// The acl_file of the comparison, with patterns.
const SHARED_ACL: &str = "\
topic read public/#

user alice
topic readwrite alice/#
topic deny alice/secret
topic write public/#

user bob
topic read alice/#
topic read devices/+/status

pattern readwrite devices/%c/#
pattern read inbox/%u/#
";

/// What a broker decided, step by step, in words that both brokers' answers map to.
async fn acl_scenario(target: Target) -> Vec<String> {
    let mut log = Vec::new();
    let user = |id: &str, user: Option<&str>, protocol: Protocol| Connect {
        protocol,
        username: user.map(ByteStr::from),
        ..connect_v5(id)
    };
    let connect = |c: Connect| {
        let target = target.clone();
        async move {
            let (client, ack) = Client::connect_with(target, c).await;
            assert_eq!(ack.code, ReasonCode::Success, "{}", client.name);
            client
        }
    };
    let mut bob = connect(user("bob-1", Some("bob"), Protocol::V5)).await;
    let codes = bob
        .subscribe_with(
            vec![
                filter("#", opts(QoS::AtLeastOnce)),
                filter("inbox/bob/#", opts(QoS::AtLeastOnce)),
            ],
            Properties::default(),
        )
        .await;
    log.push(format!("bob SUBSCRIBE # inbox/bob/#: {codes:?}"));
    let mut anon = connect(user("anon-1", None, Protocol::V311)).await;
    log.push(format!(
        "anonymous SUBSCRIBE #: {:?}",
        anon.subscribe_qos(&[("#", QoS::AtLeastOnce)]).await
    ));

    let mut alice = connect(user("alice-1", Some("alice"), Protocol::V5)).await;
    for topic in [
        "alice/1",
        "alice/secret",
        "public/news",
        "bob/1",
        "inbox/bob/hi",
        "devices/alice-1/status",
    ] {
        let code = alice.publish(plain(topic, b"a", QoS::AtLeastOnce)).await;
        log.push(format!("alice 5.0 PUBLISH {topic}: {code:?}"));
    }
    let mut device = connect(user("dev-7", None, Protocol::V311)).await;
    for topic in ["devices/dev-7/status", "devices/dev-8/status"] {
        device
            .publish_v311(topic, b"d", QoS::AtLeastOnce, false)
            .await;
        log.push(format!("dev-7 3.1.1 PUBLISH {topic}: acknowledged"));
    }
    let mut alice3 = connect(user("alice-3", Some("alice"), Protocol::V311)).await;
    alice3
        .publish_v311("alice/secret", b"a", QoS::AtLeastOnce, false)
        .await;
    log.push("alice 3.1.1 PUBLISH alice/secret: acknowledged".into());
    alice
        .publish(retained("alice/kept", b"r", QoS::AtLeastOnce))
        .await;

    for (name, c) in [("bob", &mut bob), ("anonymous", &mut anon)] {
        let got: Vec<String> = c
            .drain_publishes()
            .await
            .iter()
            .map(|p| p.topic.to_string())
            .collect();
        log.push(format!("{name} received {got:?}"));
    }
    let mut late = connect(user("bob-2", Some("bob"), Protocol::V5)).await;
    late.subscribe("alice/#", QoS::AtLeastOnce).await;
    let got: Vec<String> = late
        .drain_publishes()
        .await
        .iter()
        .map(|p| p.topic.to_string())
        .collect();
    log.push(format!("bob's new subscription got retained {got:?}"));
    // Clear the retained message (mosquitto has no persistence here, ternmq runs fresh).
    alice
        .publish(retained("alice/kept", b"", QoS::AtLeastOnce))
        .await;
    log
}

#[tokio::test]
async fn mosquitto_and_ternmq_decide_the_same_with_one_acl_file() {
    if !mosquitto_broker_available() {
        return;
    }
    let files = Files::new();
    let acl = files.write("acl", SHARED_ACL);
    let mosquitto = MosquittoBroker::start(&format!(
        "allow_anonymous true\nacl_file {}\n",
        acl.display()
    ))
    .await;
    let expected = acl_scenario(Target::Tcp(mosquitto.addr)).await;
    let path = acl.clone();
    let b = TestBroker::with(move |c| c.auth.acl_file = Some(path)).await;
    let got = acl_scenario(b.target()).await;
    assert_eq!(
        got,
        expected,
        "ternmq (left) and mosquitto (right)\n{}",
        mosquitto.process.describe()
    );
    // The scenario shows the ACL at work, not a broker that allows everything.
    assert!(
        expected.iter().any(|l| l.contains("NotAuthorized")),
        "{expected:#?}"
    );
}
