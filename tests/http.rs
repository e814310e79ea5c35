//! The http listener (docs/http.md): Server-Sent Events, long polling and HTTP publish
//! over real sockets, with MQTT clients on the other side; authentication, ACL and CORS;
//! bounds (a reader that stops, 1,000 streams and 1,000 held polls); TLS with HTTP/2 and
//! MQTT over WebSocket on the same port; and real Chromium (tests/browser/http.js).

mod common;

use common::client::{eventually, message, plain, retained, user_props, Client};
use common::http::{enc, request, Sse};
use common::TestBroker;
use std::time::Duration;
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
    let b = TestBroker::with_http(|c| c.listeners[1].http.retry = 1500).await;
    let mut publisher = Client::connect_v5(b.target(), "pub").await;
    publisher.publish(retained("chat/old", b"from before", QoS::AtLeastOnce)).await;

    let mut sse = Sse::connect(b.http_addr(), &sse_path(&["chat/#"], ""), &[]).await;
    let head = sse.next_block(WAIT).await.unwrap();
    assert_eq!(head.retry, Some(1500), "retry: is advertised first");
    let first = sse.next_event().await.unwrap();
    let j = first.json();
    assert_eq!((j["topic"].as_str(), j["payload"].as_str(), j["retain"].as_bool()), (Some("chat/old"), Some("from before"), Some(true)));
    assert_eq!(first.event, "message");

    let props = Properties {
        content_type: Some("text/plain".into()),
        user_properties: user_props(&[("from", "pub")]),
        ..Properties::default()
    };
    publisher.publish(message("chat/new", b"live", QoS::AtLeastOnce, props)).await;
    publisher.publish(plain("chat/bin", b"\xff\x01", QoS::AtLeastOnce)).await;
    publisher.publish(plain("chat/q0", b"zero", QoS::AtMostOnce)).await;
    publisher.publish(plain("other", b"not for us", QoS::AtLeastOnce)).await;
    let events = sse.events(3).await;
    let live = events[0].json();
    assert_eq!((live["payload"].as_str(), live["retain"].as_bool(), live["qos"].as_u64()), (Some("live"), Some(false), Some(1)));
    assert_eq!(live["properties"]["content_type"], "text/plain");
    assert_eq!(live["properties"]["user_properties"]["from"], "pub");
    let bin = events[1].json();
    assert_eq!((bin["payload"].as_str(), bin["encoding"].as_str()), (Some("/wE="), Some("base64")));
    let ids: Vec<u64> = [&first, &events[0], &events[1]]
        .iter()
        .map(|e| e.id.as_deref().unwrap().parse().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids grow: {ids:?}");
    assert_eq!(events[2].id, None, "a QoS 0 event cannot be acknowledged: no id");
    assert_eq!(events[2].json()["qos"], 0);

    // The stream's session is a session like any other; it ends with the stream.
    assert_eq!(b.broker().session_count(), 2);
    drop(sse);
    publisher.publish(plain("chat/x", b"wakes the stream", QoS::AtLeastOnce)).await;
    let broker = b.broker().clone();
    eventually("the stream's session ends", WAIT, || broker.session_count() == 1).await;
}

#[tokio::test]
async fn sse_resumes_with_last_event_id_without_duplicates() {
    let b = TestBroker::with_http(|_| {}).await;
    let mut publisher = Client::connect_v5(b.target(), "pub").await;
    let path = sse_path(&["inbox/#"], "&client_id=page-1");
    let mut sse = Sse::connect(b.http_addr(), &path, &[]).await;
    sse.next_block(WAIT).await;
    for i in 1..=2 {
        publisher.publish(plain("inbox/a", format!("m{i}").as_bytes(), QoS::AtLeastOnce)).await;
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
        publisher.publish(plain("inbox/a", format!("m{i}").as_bytes(), QoS::AtLeastOnce)).await;
    }
    let mut sse = Sse::connect(b.http_addr(), &path, &[("Last-Event-ID", &last)]).await;
    let got: Vec<String> = sse.events(2).await.iter().map(|e| e.json()["payload"].as_str().unwrap().to_owned()).collect();
    assert_eq!(got, ["m3", "m4"], "what was acknowledged is not sent again");
    drop(sse);

    // Without an acknowledgement, what was sent comes again, with the same ids.
    eventually("left again", WAIT, || broker.session("page-1").is_some_and(|s| !s.is_online())).await;
    let mut sse = Sse::connect(b.http_addr(), &format!("{path}&last_event_id={last}"), &[]).await;
    let again = sse.events(2).await;
    let payloads: Vec<&str> = again.iter().map(|e| e.data.as_str()).collect();
    assert!(payloads[0].contains("m3") && payloads[1].contains("m4"), "{payloads:?}");
    let id3 = again[0].id.clone().unwrap();
    publisher.publish(plain("inbox/a", b"m5", QoS::AtLeastOnce)).await;
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
    publisher.publish(plain("news/1", b"while away", QoS::AtLeastOnce)).await;
    let r = request(addr, "GET", &p("&timeout=5"), &[], b"").await;
    let got = r.json();
    assert_eq!(got[0]["payload"], "while away");
    let seq = got[0]["seq"].as_u64().unwrap();

    // Not acknowledged: sent again, with the same seq.
    let again = request(addr, "GET", &p("&timeout=0"), &[], b"").await.json();
    assert_eq!((again[0]["payload"].as_str(), again[0]["seq"].as_u64()), (Some("while away"), Some(seq)));

    // A held poll answers when a message comes.
    let held = tokio::spawn(request(addr, "GET", p(&format!("&timeout=20&ack={seq}")).leak(), &[], b""));
    let broker = b.broker().clone();
    eventually("the poll is held", WAIT, || broker.session("poller").is_some_and(|s| s.is_online())).await;
    publisher.publish(plain("news/2", b"fresh", QoS::AtLeastOnce)).await;
    let r = held.await.unwrap();
    let got = r.json();
    assert_eq!(got.as_array().unwrap().len(), 1, "the acknowledged one is gone: {got}");
    assert_eq!(got[0]["payload"], "fresh");
    let seq2 = got[0]["seq"].as_u64().unwrap();
    assert!(seq2 > seq);

    // Acknowledged and nothing new: an empty answer once the timeout passes.
    let r = request(addr, "GET", &p(&format!("&timeout=1&ack={seq2}")), &[], b"").await;
    assert_eq!(r.json(), serde_json::json!([]));

    // Errors.
    let r = request(addr, "GET", &poll_path(&["news/#"], ""), &[], b"").await;
    assert_eq!((r.status, r.error().as_str()), (400, "bad_request"), "client_id is needed");
    let r = request(addr, "GET", &poll_path(&["a/#/b"], "&client_id=x"), &[], b"").await;
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
    let r = request(addr, "POST", "/publish", &[("Content-Type", "application/json")], body).await;
    assert_eq!((r.status, r.json()["receivers"].as_u64()), (200, Some(1)));
    let p = sub.receive().await;
    assert_eq!((&*p.topic, &p.payload[..], p.qos), ("app/json", &b"hi"[..], QoS::AtLeastOnce));
    let props = p.properties.unwrap();
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    assert_eq!(props.user_properties, user_props(&[("k", "v")]));

    let r = request(addr, "POST", "/publish?topic=app%2Fraw&qos=1&retain=true", &[], b"\x00raw\xff").await;
    assert_eq!(r.status, 200);
    let p = sub.receive().await;
    assert_eq!((&*p.topic, &p.payload[..]), ("app/raw", &b"\x00raw\xff"[..]));
    assert_eq!(b.broker().router.retained_count(), 1, "retained through Broker::publish");

    for (path, body, status, code) in [
        ("/publish", &br#"{"topic":"a/+","payload":"x"}"#[..], 400, "bad_topic"),
        ("/publish?topic=", b"x", 400, "bad_topic"),
        ("/publish", b"{not json", 400, "bad_request"),
        ("/publish", br#"{"topic":"t","qos":7}"#, 400, "bad_request"),
        ("/publish", br#"{"topic":"$SYS/x","payload":"x"}"#, 403, "not_authorized"),
    ] {
        let r = request(addr, "POST", path, &[], body).await;
        assert_eq!((r.status, r.error().as_str()), (status, code), "{path} {}", String::from_utf8_lossy(body));
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

    // One message a second, a burst of one second's worth: the message that overdraws
    // goes (as an MQTT client's would), the next one at once is refused with a wait.
    for m in [b"1", b"2"] {
        let r = request(addr, "POST", "/publish?topic=t", &[], m).await;
        assert_eq!(r.status, 200);
    }
    let r = request(addr, "POST", "/publish?topic=t", &[], b"3").await;
    assert_eq!((r.status, r.error().as_str()), (429, "rate_limited"));
    assert!(r.header("retry-after").is_some_and(|s| s.parse::<u64>().unwrap() >= 1));

    // Retained messages fill the message memory (1 MiB); then what must be held is
    // refused. (Anonymous requests share their address's rate, so these come as
    // different users of an open listener: each username is its own client.)
    let mut refused = None;
    for i in 0..12 {
        let auth = format!("Basic {}", base64_of(&format!("u{i}:")));
        let r = request(addr, "POST", &format!("/publish?topic=fill/{i}&retain=1&qos=1"), &[("Authorization", &auth)], &[b'r'; 150_000]).await;
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
