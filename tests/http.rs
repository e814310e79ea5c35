// Test cases read best as one sequence of steps, however long.
#![allow(clippy::too_many_lines)]

//! The http listener (docs/http.md): Server-Sent Events, long polling and HTTP publish
//! over real sockets, with MQTT clients on the other side; authentication, ACL and CORS;
//! bounds (a reader that stops, 1,000 streams and 1,000 held polls); TLS with HTTP/2 and
//! MQTT over WebSocket on the same port; and real Chromium (tests/browser/http.js).

mod common;

use common::client::{eventually, message, plain, retained, user_props, Client};
use common::http::{enc, request, Sse};
use common::TestBroker;
use std::time::Duration;
use ternmq::metrics::Dropped;
use ternmq::protocol::{Properties, QoS};
use ternmq::router::Mailbox;

const WAIT: Duration = Duration::from_secs(10);

fn sse_path(topics: &[&str], extra: &str) -> String {
    let q: Vec<String> = topics.iter().map(|t| format!("topic={}", enc(t))).collect();
    format!("/sse?{}{extra}", q.join("&"))
}

fn poll_path(topics: &[&str], extra: &str) -> String {
    let q: Vec<String> = topics.iter().map(|t| format!("topic={}", enc(t))).collect();
    format!("/poll?{}{extra}", q.join("&"))
}

#[tokio::test]
async fn sse_sends_retained_messages_first_then_live_ones_with_ids() {
    let b = TestBroker::with_http(|c| {
        c.listeners[1].http.retry = 1500;
        c.listeners[1].http.heartbeat = 1;
    })
    .await;
    let mut publisher = Client::connect_v5(b.target(), "pub").await;
    publisher
        .publish(retained("chat/old", b"from before", QoS::AtLeastOnce))
        .await;

    let mut sse = Sse::connect(b.http_addr(), &sse_path(&["chat/#"], ""), &[]).await;
    let head = sse.next_block(WAIT).await.unwrap();
    assert_eq!(head.retry, Some(1500), "retry: is advertised first");
    let first = sse.next_event().await.unwrap();
    let j = first.json();
    assert_eq!(
        (
            j["topic"].as_str(),
            j["payload"].as_str(),
            j["retain"].as_bool()
        ),
        (Some("chat/old"), Some("from before"), Some(true))
    );
    assert_eq!(first.event, "message");

    let props = Properties {
        content_type: Some("text/plain".into()),
        user_properties: user_props(&[("from", "pub")]),
        ..Properties::default()
    };
    publisher
        .publish(message("chat/new", b"live", QoS::AtLeastOnce, props))
        .await;
    publisher
        .publish(plain("chat/bin", b"\xff\x01", QoS::AtLeastOnce))
        .await;
    publisher
        .publish(plain("chat/q0", b"zero", QoS::AtMostOnce))
        .await;
    publisher
        .publish(plain("other", b"not for us", QoS::AtLeastOnce))
        .await;
    let events = sse.events(3).await;
    let live = events[0].json();
    assert_eq!(
        (
            live["payload"].as_str(),
            live["retain"].as_bool(),
            live["qos"].as_u64()
        ),
        (Some("live"), Some(false), Some(1))
    );
    assert_eq!(live["properties"]["content_type"], "text/plain");
    assert_eq!(live["properties"]["user_properties"]["from"], "pub");
    let bin = events[1].json();
    assert_eq!(
        (bin["payload"].as_str(), bin["encoding"].as_str()),
        (Some("/wE="), Some("base64"))
    );
    let ids: Vec<u64> = [&first, &events[0], &events[1]]
        .iter()
        .map(|e| e.id.as_deref().unwrap().parse().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids grow: {ids:?}");
    assert_eq!(
        events[2].id, None,
        "a QoS 0 event cannot be acknowledged: no id"
    );
    assert_eq!(events[2].json()["qos"], 0);
    let ping = sse.next_block(WAIT).await.unwrap();
    assert!(
        ping.comment,
        "a quiet stream gets a heartbeat comment: {ping:?}"
    );

    // The stream's session is a session like any other; it ends with the stream.
    assert_eq!(b.broker().session_count(), 2);
    drop(sse);
    publisher
        .publish(plain("chat/x", b"wakes the stream", QoS::AtLeastOnce))
        .await;
    let broker = b.broker().clone();
    eventually("the stream's session ends", WAIT, || {
        broker.session_count() == 1
    })
    .await;

    // Shutdown ends open streams.
    let mut sse = Sse::connect(b.http_addr(), &sse_path(&["chat/#"], ""), &[]).await;
    sse.next_block(WAIT).await;
    b.stop().await;
    while sse.next_block(WAIT).await.is_some() {}
}

#[tokio::test]
async fn sse_resumes_with_last_event_id_without_duplicates() {
    let b = TestBroker::with_http(|_| {}).await;
    let mut publisher = Client::connect_v5(b.target(), "pub").await;
    let path = sse_path(&["inbox/#"], "&client_id=page-1");
    let mut sse = Sse::connect(b.http_addr(), &path, &[]).await;
    sse.next_block(WAIT).await;
    for i in 1..=2 {
        publisher
            .publish(plain(
                "inbox/a",
                format!("m{i}").as_bytes(),
                QoS::AtLeastOnce,
            ))
            .await;
    }
    let got = sse.events(2).await;
    let last = got[1].id.clone().unwrap();
    drop(sse);
    let broker = b.broker().clone();
    eventually("the stream leaves its session", WAIT, || {
        broker.session("page-1").is_some_and(|s| !s.is_online())
    })
    .await;

    // Published while the page was away: queued in its session.
    for i in 3..=4 {
        publisher
            .publish(plain(
                "inbox/a",
                format!("m{i}").as_bytes(),
                QoS::AtLeastOnce,
            ))
            .await;
    }
    let mut sse = Sse::connect(b.http_addr(), &path, &[("Last-Event-ID", &last)]).await;
    let got: Vec<String> = sse
        .events(2)
        .await
        .iter()
        .map(|e| e.json()["payload"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got, ["m3", "m4"], "what was acknowledged is not sent again");
    drop(sse);

    // Without an acknowledgement, what was sent comes again, with the same ids.
    eventually("left again", WAIT, || {
        broker.session("page-1").is_some_and(|s| !s.is_online())
    })
    .await;
    let mut sse = Sse::connect(b.http_addr(), &format!("{path}&last_event_id={last}"), &[]).await;
    let again = sse.events(2).await;
    let payloads: Vec<&str> = again.iter().map(|e| e.data.as_str()).collect();
    assert!(
        payloads[0].contains("m3") && payloads[1].contains("m4"),
        "{payloads:?}"
    );
    let id3 = again[0].id.clone().unwrap();
    publisher
        .publish(plain("inbox/a", b"m5", QoS::AtLeastOnce))
        .await;
    let next = sse.next_event().await.unwrap();
    assert!(next.data.contains("m5"));
    assert!(next.id.unwrap().parse::<u64>().unwrap() > id3.parse::<u64>().unwrap());
}

#[tokio::test]
async fn a_second_stream_with_the_same_client_id_takes_the_session_over() {
    let b = TestBroker::with_http(|_| {}).await;
    let path = sse_path(&["t"], "&client_id=tab");
    let mut one = Sse::connect(b.http_addr(), &path, &[]).await;
    one.next_block(WAIT).await;
    let mut two = Sse::connect(b.http_addr(), &path, &[]).await;
    two.next_block(WAIT).await;
    let last = one.next_event().await.expect("a last event");
    assert_eq!(last.event, "taken_over");
    assert!(one.next_event().await.is_none(), "the old stream ends");

    // An MQTT client with that id takes it too (Clean Start: the stream's session ends).
    let mqtt = Client::connect_v5(b.target(), "tab").await;
    assert_eq!(two.next_event().await.unwrap().event, "taken_over");
    drop(mqtt);
}

#[tokio::test]
async fn long_poll_answers_at_once_holds_and_redelivers_until_acknowledged() {
    let b = TestBroker::with_http(|_| {}).await;
    let addr = b.http_addr();
    let mut publisher = Client::connect_v5(b.target(), "pub").await;
    let p = |extra: &str| poll_path(&["news/#"], &format!("&client_id=poller{extra}"));

    // Short poll: nothing yet, answered at once; the session stays between polls.
    let r = request(addr, "GET", &p("&timeout=0"), &[], b"").await;
    assert_eq!((r.status, r.json()), (200, serde_json::json!([])));
    assert!(b.broker().session("poller").is_some());
    publisher
        .publish(plain("news/1", b"while away", QoS::AtLeastOnce))
        .await;
    let r = request(addr, "GET", &p("&timeout=5"), &[], b"").await;
    let got = r.json();
    assert_eq!(got[0]["payload"], "while away");
    let seq = got[0]["seq"].as_u64().unwrap();

    // Not acknowledged: sent again, with the same seq.
    let again = request(addr, "GET", &p("&timeout=0"), &[], b"")
        .await
        .json();
    assert_eq!(
        (again[0]["payload"].as_str(), again[0]["seq"].as_u64()),
        (Some("while away"), Some(seq))
    );

    // A held poll answers when a message comes.
    let held = tokio::spawn(request(
        addr,
        "GET",
        p(&format!("&timeout=20&ack={seq}")).leak(),
        &[],
        b"",
    ));
    let broker = b.broker().clone();
    eventually("the poll is held", WAIT, || {
        broker.session("poller").is_some_and(|s| s.is_online())
    })
    .await;
    publisher
        .publish(plain("news/2", b"fresh", QoS::AtLeastOnce))
        .await;
    let r = held.await.unwrap();
    let got = r.json();
    assert_eq!(
        got.as_array().unwrap().len(),
        1,
        "the acknowledged one is gone: {got}"
    );
    assert_eq!(got[0]["payload"], "fresh");
    let seq2 = got[0]["seq"].as_u64().unwrap();
    assert!(seq2 > seq);

    // Acknowledged and nothing new: an empty answer once the timeout passes.
    let r = request(addr, "GET", &p(&format!("&timeout=1&ack={seq2}")), &[], b"").await;
    assert_eq!(r.json(), serde_json::json!([]));

    // A held poll whose session another takes is answered 409.
    let held = tokio::spawn(request(addr, "GET", p("&timeout=20").leak(), &[], b""));
    eventually("the poll is held again", WAIT, || {
        broker.session("poller").is_some_and(|s| s.is_online())
    })
    .await;
    let mut sse = Sse::connect(addr, &sse_path(&["news/#"], "&client_id=poller"), &[]).await;
    let r = held.await.unwrap();
    assert_eq!((r.status, r.error().as_str()), (409, "taken_over"));
    sse.next_block(WAIT).await;

    // Errors.
    let r = request(addr, "GET", &poll_path(&["news/#"], ""), &[], b"").await;
    assert_eq!(
        (r.status, r.error().as_str()),
        (400, "bad_request"),
        "client_id is needed"
    );
    let r = request(
        addr,
        "GET",
        &poll_path(&["a/#/b"], "&client_id=x"),
        &[],
        b"",
    )
    .await;
    assert_eq!((r.status, r.error().as_str()), (400, "bad_topic"));
    let r = request(addr, "GET", "/poll?client_id=x", &[], b"").await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn publish_json_and_raw_reach_mqtt_subscribers() {
    let b = TestBroker::with_http(|_| {}).await;
    let addr = b.http_addr();
    let mut sub = Client::connect_v5(b.target(), "sub").await;
    sub.subscribe("app/#", QoS::AtLeastOnce).await;

    let body = br#"{"topic":"app/json","payload":"aGk=","encoding":"base64","qos":1,
        "properties":{"content_type":"text/plain","user_properties":{"k":"v"}}}"#;
    let r = request(
        addr,
        "POST",
        "/publish",
        &[("Content-Type", "application/json")],
        body,
    )
    .await;
    assert_eq!((r.status, r.json()["receivers"].as_u64()), (200, Some(1)));
    let p = sub.receive().await;
    assert_eq!(
        (&*p.topic, &p.payload[..], p.qos),
        ("app/json", &b"hi"[..], QoS::AtLeastOnce)
    );
    let props = p.properties.unwrap();
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    assert_eq!(props.user_properties, user_props(&[("k", "v")]));

    let r = request(
        addr,
        "POST",
        "/publish?topic=app%2Fraw&qos=1&retain=true",
        &[],
        b"\x00raw\xff",
    )
    .await;
    assert_eq!(r.status, 200);
    let p = sub.receive().await;
    assert_eq!(
        (&*p.topic, &p.payload[..]),
        ("app/raw", &b"\x00raw\xff"[..])
    );
    assert_eq!(
        b.broker().router.retained_count(),
        1,
        "retained through Broker::publish"
    );

    for (path, body, status, code) in [
        (
            "/publish",
            &br#"{"topic":"a/+","payload":"x"}"#[..],
            400,
            "bad_topic",
        ),
        ("/publish?topic=", b"x", 400, "bad_topic"),
        ("/publish", b"{not json", 400, "bad_request"),
        ("/publish", br#"{"topic":"t","qos":7}"#, 400, "bad_request"),
        (
            "/publish",
            br#"{"topic":"$SYS/x","payload":"x"}"#,
            403,
            "not_authorized",
        ),
    ] {
        let r = request(addr, "POST", path, &[], body).await;
        assert_eq!(
            (r.status, r.error().as_str()),
            (status, code),
            "{path} {}",
            String::from_utf8_lossy(body)
        );
    }
    let r = request(addr, "GET", "/publish", &[], b"").await;
    assert_eq!((r.status, r.header("allow")), (405, Some("POST, OPTIONS")));
    let r = request(addr, "GET", "/nowhere", &[], b"").await;
    assert_eq!((r.status, r.error().as_str()), (404, "not_found"));
}

#[tokio::test]
async fn publish_limits_answer_413_429_and_503() {
    let b = TestBroker::with_http(|c| {
        c.limits.message_size_limit = 200_000;
        c.limits.publish_rate = 1;
        c.limits.max_queued_memory = 1 << 20;
    })
    .await;
    let addr = b.http_addr();
    let big = vec![b'x'; 200_001];
    let r = request(addr, "POST", "/publish?topic=big", &[], &big).await;
    assert_eq!((r.status, r.error().as_str()), (413, "too_large"));

    // One message a second, a burst of one second's worth: that one goes (as an MQTT
    // client's would be read), the next one at once is refused with a wait.
    let r = request(addr, "POST", "/publish?topic=t", &[], b"1").await;
    assert_eq!(r.status, 200);
    let r = request(addr, "POST", "/publish?topic=t", &[], b"2").await;
    assert_eq!((r.status, r.error().as_str()), (429, "rate_limited"));
    assert!(r
        .header("retry-after")
        .is_some_and(|s| s.parse::<u64>().unwrap() >= 1));

    // Retained messages fill the message memory (1 MiB); then what must be held is
    // refused. (Anonymous requests share their address's rate, so these come as
    // different users of an open listener: each username is its own client.)
    let mut refused = None;
    for i in 0..12 {
        let auth = format!("Basic {}", base64_of(&format!("u{i}:")));
        let r = request(
            addr,
            "POST",
            &format!("/publish?topic=fill/{i}&retain=1&qos=1"),
            &[("Authorization", &auth)],
            &[b'r'; 150_000],
        )
        .await;
        if r.status != 200 {
            refused = Some(r);
            break;
        }
    }
    let r = refused.expect("the memory budget refuses at last");
    assert_eq!((r.status, r.error().as_str()), (503, "memory_exhausted"));
    assert_eq!(r.header("retry-after"), Some("1"));
}

fn base64_of(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

mod auth {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use ternmq::security::jwt::JwtConfig;
    use ternmq::security::password::{NewHash, PasswordFile};

    fn token(sub: &str, acl: serde_json::Value) -> String {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 300;
        let claims = serde_json::json!({"sub": sub, "exp": exp, "acl": acl});
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(b"k3y"),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn credentials_and_acl_apply_as_for_mqtt() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = PasswordFile::empty().unwrap();
        file.set("alice", b"secret", NewHash::ScramSha256).unwrap();
        file.save(&dir.path().join("passwd")).unwrap();
        // Anonymous MQTT clients (the test's publisher) may write anything.
        std::fs::write(
            dir.path().join("acl"),
            "topic write #\nuser alice\ntopic readwrite alice/#\n",
        )
        .unwrap();
        let b = TestBroker::with_http(|c| {
            c.auth.password_file = Some(dir.path().join("passwd"));
            c.auth.acl_file = Some(dir.path().join("acl"));
            c.auth.jwt = Some(JwtConfig {
                secret: Some("k3y".into()),
                ..JwtConfig::default()
            });
            c.listeners[1].allow_anonymous = false;
        })
        .await;
        let addr = b.http_addr();
        let alice = format!("Basic {}", base64_of("alice:secret"));
        let wrong = format!("Basic {}", base64_of("alice:nope"));

        let r = request(addr, "GET", &sse_path(&["alice/#"], ""), &[], b"").await;
        assert_eq!(
            (r.status, r.error().as_str()),
            (401, "unauthorized"),
            "anonymous is not allowed here"
        );
        assert!(r
            .header("www-authenticate")
            .is_some_and(|h| h.starts_with("Bearer")));
        let r = request(
            addr,
            "GET",
            &sse_path(&["alice/#"], ""),
            &[("Authorization", &wrong)],
            b"",
        )
        .await;
        assert_eq!(r.status, 401);
        let r = request(
            addr,
            "GET",
            &sse_path(&["alice/#"], "&access_token=not-a-jwt"),
            &[],
            b"",
        )
        .await;
        assert_eq!(r.status, 401, "a token that does not verify");

        // Basic: the password file; reading is checked on every delivery, retained
        // messages too.
        let mut mqtt = Client::connect_v5(b.target(), "x").await;
        mqtt.publish(retained(
            "elsewhere/r",
            b"not hers either",
            QoS::AtLeastOnce,
        ))
        .await;
        let mut sse = Sse::connect(addr, &sse_path(&["#"], ""), &[("Authorization", &alice)]).await;
        mqtt.publish(plain("elsewhere/1", b"not hers", QoS::AtLeastOnce))
            .await;
        mqtt.publish(plain("alice/1", b"hers", QoS::AtLeastOnce))
            .await;
        assert_eq!(sse.next_event().await.unwrap().json()["payload"], "hers");

        // Publishing: write is checked.
        let r = request(
            addr,
            "POST",
            "/publish?topic=alice/2",
            &[("Authorization", &alice)],
            b"ok",
        )
        .await;
        assert_eq!(r.status, 200);
        let r = request(
            addr,
            "POST",
            "/publish?topic=bob/2",
            &[("Authorization", &alice)],
            b"no",
        )
        .await;
        assert_eq!((r.status, r.error().as_str()), (403, "not_authorized"));

        // A JWT, as Bearer or (EventSource) access_token; its ACL claim checks subscribe.
        let bob = token("bob", serde_json::json!({"sub": ["user/%u/#"]}));
        let bearer = format!("Bearer {bob}");
        let r = request(
            addr,
            "GET",
            &sse_path(&["user/carol/#"], ""),
            &[("Authorization", &bearer)],
            b"",
        )
        .await;
        assert_eq!((r.status, r.error().as_str()), (403, "not_authorized"));
        let mut sse = Sse::connect(
            addr,
            &sse_path(&["user/bob/#"], &format!("&access_token={bob}")),
            &[],
        )
        .await;
        mqtt.publish(plain("user/bob/notify", b"liked", QoS::AtLeastOnce))
            .await;
        assert_eq!(sse.next_event().await.unwrap().json()["payload"], "liked");
        let r = request(
            addr,
            "POST",
            "/publish?topic=user/bob/x",
            &[("Authorization", &bearer)],
            b"",
        )
        .await;
        assert_eq!(r.status, 403, "the claim gives bob no write");
    }

    /// A stream opened with a token ends when the token expires, with an event that tells
    /// the page to fetch a new one (reconnecting with the old one would get a 401).
    #[tokio::test]
    async fn a_stream_ends_when_its_token_expires() {
        let b = TestBroker::with_http(|c| {
            c.auth.jwt = Some(JwtConfig {
                secret: Some("k3y".into()),
                leeway: Some(0),
                ..JwtConfig::default()
            });
            c.listeners[1].allow_anonymous = false;
        })
        .await;
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 2;
        let claims = serde_json::json!({"sub": "bob", "exp": exp, "acl": {"sub": ["t"]}});
        let bob = encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(b"k3y"),
        )
        .unwrap();
        let path = sse_path(&["t"], &format!("&access_token={bob}"));
        let mut sse = Sse::connect(b.http_addr(), &path, &[]).await;
        let mut mqtt = Client::connect_v5(b.target(), "x").await;
        mqtt.publish(plain("t", b"before", QoS::AtLeastOnce)).await;
        assert_eq!(sse.next_event().await.unwrap().json()["payload"], "before");
        let last = sse.next_event().await.expect("a last event");
        assert_eq!(last.event, "token_expired");
        assert!(sse.next_event().await.is_none(), "the stream ends");
        let r = request(b.http_addr(), "GET", &path, &[], b"").await;
        assert_eq!(r.status, 401, "the same token again");
    }

    #[tokio::test]
    async fn cors_allow_list() {
        let b = TestBroker::with_http(|c| {
            c.listeners[1].http.cors_origins = vec!["http://app.test".into()];
        })
        .await;
        let addr = b.http_addr();
        let r = request(
            addr,
            "POST",
            "/publish?topic=t",
            &[("Origin", "http://evil.test")],
            b"x",
        )
        .await;
        assert_eq!((r.status, r.error().as_str()), (403, "origin_not_allowed"));
        let r = request(
            addr,
            "POST",
            "/publish?topic=t",
            &[("Origin", "http://app.test")],
            b"x",
        )
        .await;
        assert_eq!(
            (r.status, r.header("access-control-allow-origin")),
            (200, Some("http://app.test"))
        );
        let r = request(
            addr,
            "OPTIONS",
            "/publish",
            &[
                ("Origin", "http://app.test"),
                ("Access-Control-Request-Method", "POST"),
            ],
            b"",
        )
        .await;
        assert_eq!(
            (r.status, r.header("access-control-allow-methods")),
            (204, Some("POST, OPTIONS"))
        );
        assert!(r
            .header("access-control-allow-headers")
            .unwrap()
            .contains("Authorization"));
        let r = request(
            addr,
            "OPTIONS",
            "/sse",
            &[("Origin", "http://evil.test")],
            b"",
        )
        .await;
        assert_eq!(r.status, 403);
        // Requests without Origin (servers, curl) are served.
        assert_eq!(
            request(addr, "POST", "/publish?topic=t", &[], b"x")
                .await
                .status,
            200
        );
    }
}

#[tokio::test]
async fn an_sse_reader_that_stops_reading_is_bounded() {
    const QUEUE: usize = 100;
    const PAYLOAD: usize = 4096;
    let b = TestBroker::with_http(|c| c.session.max_queued_messages = QUEUE).await;
    let addr = b.http_addr();
    // A stream without client id: its events are done once written, so only the
    // socket side (hyper's 64 KiB buffer, the kernel's) and the queue hold them.
    let mut sse = Sse::connect(addr, "/sse?topic=flood", &[]).await;
    sse.next_block(WAIT).await;
    let dropped_before = ternmq::metrics::snapshot().dropped(Dropped::QueueFull);
    // 16 MiB, far more than the queue, hyper's buffer and the kernel's socket buffers
    // hold; the publisher gets every acknowledgement (it is never held up).
    let mut publisher = Client::connect_v5(b.target(), "pub").await;
    let payload = vec![b'p'; PAYLOAD];
    for _ in 0..4000 {
        publisher
            .publish(plain("flood", &payload, QoS::AtLeastOnce))
            .await;
    }
    assert!(
        ternmq::metrics::snapshot().dropped(Dropped::QueueFull) > dropped_before,
        "the full queue drops"
    );
    let held = b.broker().memory.used();
    // The queue bound at ~4.2 KB a message: what this reader can cost in messages,
    // however long it stays.
    let bound = QUEUE * (PAYLOAD + 256);
    assert!(held <= bound, "held {held} bytes, bound {bound}");
    // Reading again, the stream goes on.
    let e = sse.next_event().await.unwrap();
    assert_eq!(e.json()["topic"], "flood");
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap()
}

/// 1,000 SSE streams and 1,000 held polls on one broker; one message reaches them all.
/// Prints the memory per stream (the test process's RSS, clients included: an upper
/// bound; docs/http.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_streams_and_a_thousand_held_polls() {
    const N: usize = 1000;
    let b = TestBroker::with_http(|_| {}).await;
    let addr = b.http_addr();
    let before = rss_kib();
    let mut streams = Vec::with_capacity(N);
    for _ in 0..N {
        let mut s = Sse::connect(addr, "/sse?topic=fan", &[]).await;
        s.next_block(WAIT).await;
        streams.push(s);
    }
    let after_streams = rss_kib();
    let polls: Vec<_> = (0..N)
        .map(|i| {
            let path = format!("/poll?topic=fan&client_id=p{i}&timeout=30");
            tokio::spawn(async move { request(addr, "GET", &path, &[], b"").await })
        })
        .collect();
    let broker = b.broker().clone();
    eventually("every poll is held", Duration::from_secs(30), || {
        (0..N).all(|i| {
            broker
                .session(&format!("p{i}"))
                .is_some_and(|s| s.is_online())
        })
    })
    .await;
    let after_polls = rss_kib();
    let per_stream = (after_streams - before) * 1024 / N as u64;
    let per_poll = (after_polls - after_streams) * 1024 / N as u64;
    eprintln!("memory per SSE stream: {per_stream} B; per held poll: {per_poll} B (RSS of the test process, clients included)");
    assert_eq!(b.broker().session_count(), 2 * N);

    let mut publisher = Client::connect_v5(b.target(), "pub").await;
    publisher
        .publish(plain("fan", b"to everyone", QoS::AtLeastOnce))
        .await;
    for s in &mut streams {
        assert_eq!(
            s.next_event().await.unwrap().json()["payload"],
            "to everyone"
        );
    }
    for p in polls {
        let r = p.await.unwrap();
        assert_eq!(r.json()[0]["payload"], "to everyone");
    }
    assert!(
        per_stream < 64 * 1024 && per_poll < 64 * 1024,
        "{per_stream} / {per_poll}"
    );
}

#[tokio::test]
async fn mqtt_over_websocket_shares_the_http_port() {
    let b = TestBroker::with_http(|_| {}).await;
    let (ws, resp) = common::ws::open(b.http_addr(), "/mqtt", &["mqtt"], None)
        .await
        .unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "mqtt");
    let stream = Box::new(ternmq::transport::ws::WsBytes::new(ws));
    let mut c = Client::over(stream, "ws-on-http", ternmq::protocol::Protocol::V5);
    c.handshake(common::client::connect_v5("ws-on-http")).await;
    c.subscribe("both/#", QoS::AtLeastOnce).await;
    let r = request(
        b.http_addr(),
        "POST",
        "/publish?topic=both/ways&qos=1",
        &[],
        b"hi",
    )
    .await;
    assert_eq!(r.json()["receivers"], 1);
    assert_eq!(&c.receive().await.payload[..], b"hi");
    // Elsewhere than the path, an upgrade is not served.
    assert!(common::ws::open(b.http_addr(), "/other", &["mqtt"], None)
        .await
        .is_err());
}

mod tools {
    use super::*;
    use common::mosquitto::{self, on_path, Proc};
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType,
    };
    use std::process::Command;

    fn curl_available() -> bool {
        if on_path("curl") {
            return true;
        }
        assert!(!mosquitto::in_ci(), "CI=true and curl is not installed");
        eprintln!("note: skipping: curl not found");
        false
    }

    fn curl(args: &[&str]) -> Proc {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "10"]).args(args);
        Proc::spawn(cmd, None)
    }

    /// The README's example: `curl -N` prints what mosquitto_pub sends.
    #[tokio::test]
    async fn curl_receives_what_mosquitto_pub_sends() {
        if !curl_available() || !mosquitto::clients_available() {
            return;
        }
        let b = TestBroker::with_http(|_| {}).await;
        let url = format!("http://{}/sse?topic=chat/%23", b.http_addr());
        let mut sse = curl(&["-N", &url]);
        let broker = b.broker().clone();
        mosquitto::wait_until(
            "curl's stream is open",
            || broker.session_count() == 1,
            &mut [&mut sse],
        )
        .await;
        mosquitto::publish(
            &b,
            &[
                "-t",
                "chat/room1",
                "-m",
                "hello from mosquitto_pub",
                "-q",
                "1",
            ],
        )
        .await;
        mosquitto::wait_until(
            "curl prints the event",
            || {
                sse.lines()
                    .iter()
                    .any(|l| l.starts_with("data: ") && l.contains("hello from mosquitto_pub"))
            },
            &mut [],
        )
        .await;
        let lines = sse.lines();
        assert!(lines.iter().any(|l| l == "event: message"), "{lines:?}");
        assert!(lines.iter().any(|l| l.starts_with("id: ")), "{lines:?}");
    }

    /// TLS on the http and admin listeners: HTTP/2 through ALPN for clients that offer
    /// it, HTTP/1.1 for the others; SSE over both.
    #[tokio::test]
    async fn tls_serves_http2_and_http1() {
        if !curl_available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::DnsName("localhost".try_into().unwrap())];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        let path = |n: &str| dir.path().join(n);
        std::fs::write(path("ca.pem"), ca.pem()).unwrap();
        std::fs::write(path("server.pem"), cert.pem()).unwrap();
        std::fs::write(path("server.key"), key.serialize_pem()).unwrap();
        let tls = ternmq::config::TlsConfig::new(path("server.pem"), path("server.key"));
        let b = TestBroker::with_http(|c| {
            c.listeners[1].tls = Some(tls.clone());
            // The admin listener is served the same way, TLS included.
            c.listeners.push(ternmq::config::Listener {
                token: Some("admin-token-0123456789".into()),
                tls: Some(tls),
                ..ternmq::config::Listener::new(
                    ternmq::config::ListenerKind::Admin,
                    "127.0.0.1:0".parse().unwrap(),
                )
            });
        })
        .await;
        let admin_port = b
            .server
            .as_ref()
            .and_then(|s| s.local_addr(ternmq::config::ListenerKind::Admin))
            .unwrap()
            .port();
        let port = b.http_addr().port();
        let resolve = format!("localhost:{port}:127.0.0.1");
        let ca_file = path("ca.pem").display().to_string();
        let base = format!("https://localhost:{port}");
        for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
            let out = curl(&[
                flag,
                "--resolve",
                &resolve,
                "--cacert",
                &ca_file,
                "-o",
                "/dev/null",
                "-w",
                "%{http_version} %{http_code}",
                "-X",
                "POST",
                &format!("{base}/publish?topic=t"),
                "-d",
                "x",
            ])
            .output()
            .await;
            assert_eq!(out, [format!("{version} 200")], "{flag}");
            let out = curl(&[
                flag,
                "--resolve",
                &format!("localhost:{admin_port}:127.0.0.1"),
                "--cacert",
                &ca_file,
                "-H",
                "Authorization: Bearer admin-token-0123456789",
                &format!("https://localhost:{admin_port}/metrics"),
                "-w",
                "%{http_version} %{http_code}",
            ])
            .output()
            .await;
            assert!(
                out.iter().any(|l| l.starts_with("ternmq_"))
                    && out.last() == Some(&format!("{version} 200")),
                "admin over TLS, {flag}: {out:?}"
            );
        }
        let mut sse = curl(&[
            "--http2",
            "-N",
            "--resolve",
            &resolve,
            "--cacert",
            &ca_file,
            &format!("{base}/sse?topic=tls"),
        ]);
        let broker = b.broker().clone();
        mosquitto::wait_until(
            "the h2 stream is open",
            || broker.session_count() == 1,
            &mut [&mut sse],
        )
        .await;
        let mut publisher = Client::connect_v5(b.target(), "pub").await;
        publisher
            .publish(plain("tls", b"over h2", QoS::AtLeastOnce))
            .await;
        mosquitto::wait_until(
            "the event arrives over HTTP/2",
            || sse.lines().iter().any(|l| l.contains("over h2")),
            &mut [],
        )
        .await;
    }
}

// ---- a real browser ----

mod browser {
    use super::*;
    use common::browser::Browser;

    /// The whole browser run is bounded by this; http.js has its own, shorter watchdog.
    const BROWSER_WAIT: Duration = Duration::from_secs(180);
    const SECRET: &str = "browser-test-secret";

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// EventSource and long-polling pages receive what mosquitto_pub sends, and after a
    /// reload what came while they were away, each message once; the friend-circle
    /// example end to end, SSE in one browser context and mqtt.js in another.
    /// Screenshots land in target/browser-test/http-*.png.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn push_pages_and_the_friend_circle_in_chromium() {
        let Some(browser) = Browser::prepare(
            "browser test",
            "browser-test",
            &["playwright-core/package.json", "mqtt/dist/mqtt.min.js"],
            &[("mosquitto_pub", "mosquitto-clients")],
        ) else {
            return;
        };
        let (page_port, app_port) = (free_port(), free_port());

        let broker = TestBroker::with_http(|c| {
            let h = &mut c.listeners[1].http;
            h.cors_origins = vec![
                format!("http://127.0.0.1:{page_port}"),
                format!("http://127.0.0.1:{app_port}"),
            ];
            // Small, so that SSE streams end and EventSource reconnects by itself.
            h.max_unacked = 2;
            c.auth.jwt = Some(ternmq::security::jwt::JwtConfig {
                secret: Some(SECRET.into()),
                ..Default::default()
            });
        })
        .await;
        let mut node = browser.node("http.js");
        node.arg(broker.http_addr().port().to_string())
            .arg(broker.port().to_string())
            .arg(&browser.out)
            .arg(page_port.to_string())
            .arg(app_port.to_string())
            .arg(SECRET);
        browser.run(node, "http.log", BROWSER_WAIT).await;
        broker.stop().await;
        browser.assert_screenshots(&[
            "http-sse",
            "http-poll",
            "http-friend-circle-alice-sse",
            "http-friend-circle-bob-mqtt",
            "http-friend-circle-alice-back",
        ]);
    }
}
