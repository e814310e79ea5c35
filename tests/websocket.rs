//! MQTT over WebSocket: the upgrade policy (paths, subprotocols, origins, timeout), the
//! byte stream under the frames (splits, batches, fragments, text and close frames),
//! limits, and TCP and WebSocket clients sharing sessions and messages. The last test
//! drives mqtt.js in headless Chromium (tests/browser/).
//!
//! MQTT is spoken by the shared raw client of `common::client`, over the WebSocket's
//! bytes (`ternmq::transport::ws::WsBytes` on the client side too: one binary message per
//! write). The frame-level tests (split and empty messages, fragments, pings, text and
//! close frames) write frames on the tokio-tungstenite socket directly, then hand it to
//! the client for the MQTT that follows.
// A test reads best as one sequence of steps, however long.
#![allow(clippy::too_many_lines)]

mod common;

use bytes::Bytes;
use common::client::{connect_v311, encode, publish_packet, text, Client};
use common::ws::{open as ws_open, Ws};
use common::TestBroker;
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::time::Duration;
use ternmq::protocol::{
    ByteStr, Connect, Packet, Properties, Protocol, Publish, QoS, ReasonCode, SubOptions,
    Subscribe, SubscribeFilter, Will,
};
use ternmq::transport::ws::WsBytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::handshake::client::Response;
use tokio_tungstenite::tungstenite::http::{header, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// How long any single wait of these tests may take.
const WAIT: Duration = Duration::from_secs(5);

/// The HTTP status and body of a refused upgrade.
async fn ws_refused(
    addr: SocketAddr,
    path: &str,
    protocols: &[&str],
    origin: Option<&str>,
) -> (StatusCode, String) {
    match ws_open(addr, path, protocols, origin).await {
        Err(WsError::Http(resp)) => {
            let body = resp.body().as_deref().unwrap_or_default();
            (resp.status(), String::from_utf8_lossy(body).into_owned())
        }
        Err(e) => panic!("expected an HTTP refusal for {path}, got {e}"),
        Ok(_) => panic!("expected an HTTP refusal for {path}, got an upgrade"),
    }
}

fn subprotocol(resp: &Response) -> Option<&str> {
    resp.headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .map(|v| v.to_str().unwrap())
}

/// The shared MQTT client over an upgraded WebSocket.
fn over_ws(ws: Ws, name: &str, protocol: Protocol) -> Client {
    Client::over(Box::new(WsBytes::new(ws)), name, protocol)
}

/// Connects (3.1.1, clean session) an upgraded WebSocket and disconnects it again.
async fn connect_and_disconnect(ws: Ws, client_id: &str) {
    let mut c = over_ws(ws, client_id, Protocol::V311);
    let ack = c.handshake(connect_v311(client_id)).await;
    assert_eq!(ack.code, ReasonCode::Success, "CONNACK for {client_id}");
    c.disconnect().await;
}

/// A 3.1.1 CONNECT with clean session and, optionally, a QoS 1 will.
fn connect_will(client_id: &str, will: Option<(&str, &str)>) -> Connect {
    Connect {
        will: will.map(|(topic, payload)| Will {
            topic: ByteStr::from(topic),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties::default(),
        }),
        ..connect_v311(client_id)
    }
}

/// Sends `packets` (3.1.1) as one binary message, written on the frames directly.
async fn send_message(ws: &mut Ws, packets: &[Packet]) {
    let bytes = bytes_of(packets);
    ws.send(Message::Binary(bytes.into()))
        .await
        .expect("ws send");
}

fn bytes_of(packets: &[Packet]) -> Vec<u8> {
    packets
        .iter()
        .flat_map(|p| encode(p, Protocol::V311).to_vec())
        .collect()
}

/// The next WebSocket message other than a ping or pong.
async fn next_message(ws: &mut Ws) -> Option<Result<Message, WsError>> {
    loop {
        match timeout(WAIT, ws.next())
            .await
            .expect("a message within the wait")
        {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => return other,
        }
    }
}

/// CONNECT in one binary message on the frames directly, and its CONNACK (accepted).
async fn connect_frames(ws: &mut Ws, connect: Connect) {
    send_message(ws, &[Packet::Connect(Box::new(connect))]).await;
    match next_message(ws).await {
        Some(Ok(Message::Binary(data))) => assert_eq!(&data[..], [0x20, 2, 0, 0], "CONNACK"),
        other => panic!("expected the CONNACK in a binary message, got {other:?}"),
    }
}

/// A TCP client subscribed to `filter`, to watch what the broker publishes.
async fn tcp_watcher(broker: &TestBroker, id: &str, filter: &str) -> Client {
    let mut c = Client::connect_v311(broker.addr, id).await;
    c.subscribe_ok(&[(filter, QoS::AtLeastOnce)]).await;
    c
}

fn subscribe_packet(pkid: u16, filter: &str, qos: QoS) -> Packet {
    Packet::Subscribe(Subscribe {
        pkid,
        filters: vec![SubscribeFilter {
            filter: ByteStr::from(filter),
            options: SubOptions {
                qos,
                ..SubOptions::default()
            },
        }],
        ..Subscribe::default()
    })
}

/// SUBSCRIBE to `echo/#` and two PUBLISHes to it: a connected client sending them gets
/// SUBACK and its two messages back.
fn echo_packets() -> Vec<Packet> {
    vec![
        subscribe_packet(1, "echo/#", QoS::AtMostOnce),
        Packet::Publish(publish_packet(
            "echo/1",
            b"first",
            QoS::AtMostOnce,
            false,
            0,
        )),
        Packet::Publish(publish_packet(
            "echo/2",
            b"second",
            QoS::AtMostOnce,
            false,
            0,
        )),
    ]
}

async fn expect_echo(client: &mut Client) {
    let suback = client.expect("SUBACK").await;
    assert!(
        matches!(&suback, Packet::SubAck(a) if a.pkid == 1),
        "{suback:?}"
    );
    assert_eq!(text(&client.receive_v311().await.payload), "first");
    assert_eq!(text(&client.receive_v311().await.payload), "second");
}

// ---- the upgrade ----

#[tokio::test]
async fn subprotocol_mqtt_or_mqttv31_is_echoed() {
    let broker = TestBroker::with_ws(|_| {}).await;
    for (offer, chosen) in [
        (&["mqtt"][..], "mqtt"),
        (&["mqttv3.1"][..], "mqttv3.1"),
        (&["wamp", "mqttv3.1", "mqtt"][..], "mqttv3.1"),
    ] {
        let (ws, resp) = ws_open(broker.ws_addr(), "/mqtt", offer, None)
            .await
            .expect("upgrade");
        assert_eq!(subprotocol(&resp), Some(chosen), "offer {offer:?}");
        connect_and_disconnect(ws, "subprotocol").await;
    }
    broker.stop().await;
}

#[tokio::test]
async fn no_subprotocol_offered_none_answered() {
    let broker = TestBroker::with_ws(|_| {}).await;
    let (ws, resp) = ws_open(broker.ws_addr(), "/mqtt", &[], None)
        .await
        .expect("upgrade");
    assert_eq!(subprotocol(&resp), None);
    connect_and_disconnect(ws, "no-subprotocol").await;
    broker.stop().await;
}

#[tokio::test]
async fn only_unknown_subprotocols_are_refused_with_400() {
    let broker = TestBroker::with_ws(|_| {}).await;
    let (status, body) = ws_refused(broker.ws_addr(), "/mqtt", &["wamp", "soap"], None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body.contains("subprotocol") && body.contains("wamp, soap") && body.contains("mqtt"),
        "{body}"
    );
    broker.stop().await;
}

#[tokio::test]
async fn default_path_and_root_are_served_other_paths_get_404() {
    let broker = TestBroker::with_ws(|_| {}).await;
    let addr = broker.ws_addr();
    for path in ["/mqtt", "/", "/mqtt?token=x"] {
        let (ws, _) = ws_open(addr, path, &["mqtt"], None).await.expect(path);
        connect_and_disconnect(ws, "paths").await;
    }
    for path in ["/other", "/mqtt/", "/mqtt/x", "/MQTT"] {
        let (status, body) = ws_refused(addr, path, &["mqtt"], None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert!(body.contains(path) && body.contains("/mqtt"), "{body}");
    }
    broker.stop().await;
}

#[tokio::test]
async fn configured_path_replaces_mqtt() {
    let broker = TestBroker::with_ws(|c| c.listeners[1].path = Some("/ws".into())).await;
    let addr = broker.ws_addr();
    for path in ["/ws", "/"] {
        ws_open(addr, path, &["mqtt"], None).await.expect(path);
    }
    let (status, _) = ws_refused(addr, "/mqtt", &["mqtt"], None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    broker.stop().await;
}

#[tokio::test]
async fn origin_allow_list() {
    let broker = TestBroker::with_ws(|c| {
        c.listeners[1].allowed_origins = vec!["https://app.example.com".into()];
    })
    .await;
    let addr = broker.ws_addr();
    for origin in [
        Some("https://app.example.com"),
        Some("HTTPS://APP.example.com"),
        None,
    ] {
        let (ws, _) = ws_open(addr, "/mqtt", &["mqtt"], origin)
            .await
            .expect("allowed");
        connect_and_disconnect(ws, "origin").await;
    }
    for origin in [
        "https://evil.example.com",
        "null",
        "https://app.example.com:8443",
    ] {
        let (status, body) = ws_refused(addr, "/mqtt", &["mqtt"], Some(origin)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{origin}");
        assert!(body.contains(origin), "{body}");
    }
    broker.stop().await;

    // Without a list, any origin is welcome.
    let broker = TestBroker::with_ws(|_| {}).await;
    ws_open(
        broker.ws_addr(),
        "/mqtt",
        &["mqtt"],
        Some("https://evil.example.com"),
    )
    .await
    .expect("no allow-list");
    broker.stop().await;
}

#[tokio::test]
async fn upgrade_must_complete_within_the_connect_timeout() {
    let broker = TestBroker::with_ws(|c| c.mqtt.connect_timeout = 1).await;
    let mut tcp = TcpStream::connect(broker.ws_addr()).await.unwrap();
    // Half a request, then silence.
    tcp.write_all(b"GET /mqtt HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let closed = timeout(Duration::from_secs(4), tcp.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "not closed: {closed:?}"
    );
    broker.stop().await;
}

/// The same timers as over TCP (their exact times are tested on the paused clock, in
/// tests/timing.rs); here, that the ws transport is held to them.
#[tokio::test]
async fn connect_timeout_and_keep_alive_apply_over_ws() {
    let broker = TestBroker::with_ws(|c| c.mqtt.connect_timeout = 1).await;
    let target = broker.ws_target();
    let no_connect = async {
        // Upgraded, then no CONNECT.
        let mut c = Client::open(target.clone(), "silent", Protocol::V311).await;
        c.expect_closed(Duration::from_secs(4)).await;
    };
    let silent = async {
        // Connected with a 1 s keep-alive, then silence: closed after 1.5 s.
        let connect = Connect {
            keep_alive: 1,
            ..connect_v311("sleepy")
        };
        let (mut c, _) = Client::connect_accepted(target.clone(), connect).await;
        c.expect_closed(Duration::from_secs(4)).await;
    };
    tokio::join!(no_connect, silent);
    broker.stop().await;
}

// ---- frames and the byte stream ----

#[tokio::test]
async fn packets_split_over_many_messages() {
    let broker = TestBroker::with_ws(|_| {}).await;
    let (mut ws, _) = ws_open(broker.ws_addr(), "/mqtt", &["mqtt"], None)
        .await
        .expect("upgrade");
    // One byte per message, with empty messages in between (they must not read as the end).
    let connect = bytes_of(&[Packet::Connect(Box::new(connect_v311("split")))]);
    for bytes in [connect, bytes_of(&echo_packets())] {
        for b in bytes {
            ws.send(Message::Binary(vec![b].into())).await.unwrap();
            ws.send(Message::Binary(Bytes::new())).await.unwrap();
        }
    }
    let mut c = over_ws(ws, "split", Protocol::V311);
    let connack = c.expect("CONNACK").await;
    assert!(
        matches!(&connack, Packet::ConnAck(a) if a.code == ReasonCode::Success),
        "{connack:?}"
    );
    expect_echo(&mut c).await;
    c.disconnect().await;
    broker.stop().await;
}

#[tokio::test]
async fn many_packets_in_one_message() {
    let broker = TestBroker::with_ws(|_| {}).await;
    let mut c = Client::connect_v311(broker.ws_target(), "batched").await;
    // One write of the client's WsBytes is one binary message.
    c.send_raw(&bytes_of(&echo_packets())).await;
    expect_echo(&mut c).await;
    c.disconnect().await;
    broker.stop().await;
}

#[tokio::test]
async fn fragmented_message_with_continuation_frames() {
    let broker = TestBroker::with_ws(|_| {}).await;
    let (mut ws, _) = ws_open(broker.ws_addr(), "/mqtt", &["mqtt"], None)
        .await
        .expect("upgrade");
    connect_frames(&mut ws, connect_v311("fragments")).await;
    let bytes = bytes_of(&echo_packets());
    // Three fragments cutting through packets, with a ping between them (RFC 6455 allows
    // control frames inside a fragmented message).
    let (a, rest) = bytes.split_at(5);
    let (b, d) = rest.split_at(rest.len() / 2);
    let binary = OpCode::Data(Data::Binary);
    let continuation = OpCode::Data(Data::Continue);
    ws.send(Message::Frame(Frame::message(a.to_vec(), binary, false)))
        .await
        .unwrap();
    ws.send(Message::Ping(Bytes::from_static(b"between")))
        .await
        .unwrap();
    ws.send(Message::Frame(Frame::message(
        b.to_vec(),
        continuation,
        false,
    )))
    .await
    .unwrap();
    ws.send(Message::Frame(Frame::message(
        d.to_vec(),
        continuation,
        true,
    )))
    .await
    .unwrap();
    let mut c = over_ws(ws, "fragments", Protocol::V311);
    expect_echo(&mut c).await;
    c.disconnect().await;
    broker.stop().await;
}

#[tokio::test]
async fn ping_frames_are_answered() {
    let broker = TestBroker::with_ws(|_| {}).await;
    let (mut ws, _) = ws_open(broker.ws_addr(), "/mqtt", &["mqtt"], None)
        .await
        .expect("upgrade");
    connect_frames(&mut ws, connect_v311("pinger")).await;
    ws.send(Message::Ping(Bytes::from_static(b"hello")))
        .await
        .unwrap();
    let pong = timeout(WAIT, ws.next()).await.expect("pong in time");
    assert!(
        matches!(&pong, Some(Ok(Message::Pong(p))) if &p[..] == b"hello"),
        "{pong:?}"
    );
    // MQTT goes on.
    let mut c = over_ws(ws, "pinger", Protocol::V311);
    assert!(c.ping().await.is_empty());
    c.disconnect().await;
    broker.stop().await;
}

#[tokio::test]
async fn text_frame_closes_the_connection_and_publishes_the_will() {
    let broker = TestBroker::with_ws(|_| {}).await;
    let mut watcher = tcp_watcher(&broker, "watch-text", "will/#").await;
    let (mut ws, _) = ws_open(broker.ws_addr(), "/mqtt", &["mqtt"], None)
        .await
        .expect("upgrade");
    connect_frames(
        &mut ws,
        connect_will("texter", Some(("will/texter", "gone"))),
    )
    .await;
    ws.send(Message::Text("hello".into())).await.unwrap();
    // The broker says why in its close frame, then closes.
    match next_message(&mut ws).await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Unsupported),
        other => panic!("expected a close frame with code 1003, got {other:?}"),
    }
    let will = watcher.receive_v311().await;
    assert_eq!(
        (&*will.topic, text(&will.payload).as_str()),
        ("will/texter", "gone")
    );
    watcher.disconnect().await;
    broker.stop().await;
}

#[tokio::test]
async fn close_frame_without_disconnect_publishes_the_will() {
    let broker = TestBroker::with_ws(|_| {}).await;
    let mut watcher = tcp_watcher(&broker, "watch-close", "will/#").await;

    // DISCONNECT first: no will.
    let (polite, _) = Client::connect_accepted(
        broker.ws_target(),
        connect_will("polite", Some(("will/polite", "unexpected"))),
    )
    .await;
    polite.disconnect().await;

    // A close frame alone is a network close.
    let (mut ws, _) = ws_open(broker.ws_addr(), "/mqtt", &["mqtt"], None)
        .await
        .expect("upgrade");
    connect_frames(
        &mut ws,
        connect_will("closer", Some(("will/closer", "gone"))),
    )
    .await;
    ws.close(None).await.unwrap();
    match next_message(&mut ws).await {
        Some(Ok(Message::Close(_)) | Err(_)) | None => {}
        Some(Ok(other)) => panic!("expected the end, got {other:?}"),
    }

    let will = watcher.receive_v311().await;
    assert_eq!(
        (&*will.topic, text(&will.payload).as_str()),
        ("will/closer", "gone")
    );
    watcher.expect_quiet("after the close frame").await;
    watcher.disconnect().await;
    broker.stop().await;
}

#[tokio::test]
async fn oversized_packet_closes_the_connection() {
    let broker = TestBroker::with_ws(|c| c.mqtt.max_packet_size = 1024).await;
    let big = || publish_packet("big", &[b'x'; 2000], QoS::AtMostOnce, false, 0);

    // The MQTT limit: a 5.0 client is told why (DISCONNECT 0x95) before the close.
    let mut c = Client::connect_v5(broker.ws_target(), "big-v5").await;
    c.send(Packet::Publish(big())).await;
    c.expect_disconnect(ReasonCode::PacketTooLarge).await;

    // The same packet split over small messages is refused all the same.
    let mut c = Client::connect_v311(broker.ws_target(), "big-split").await;
    let bytes = encode(&Packet::Publish(big()), Protocol::V311);
    for chunk in bytes.chunks(100) {
        // One message per write; the broker may close before the last one.
        let _ = c.stream.write_all(chunk).await;
    }
    c.expect_closed(WAIT).await;

    // The WebSocket limit (never below 64 KiB) protects memory before any MQTT decoding.
    let mut c = Client::connect_v311(broker.ws_target(), "big-frame").await;
    let _ = c.stream.write_all(&vec![0u8; 100 * 1024]).await;
    c.expect_closed(WAIT).await;
    broker.stop().await;
}

/// Until its CONNECT is accepted, a WebSocket client's message may hold only
/// `max_connect_size` (+ 4 KiB); once it is in, `max_packet_size` applies.
#[tokio::test]
async fn the_connect_limit_holds_websocket_messages_until_the_client_is_in() {
    let broker = TestBroker::with_ws(|c| c.limits.max_connect_size = 1024).await;
    let big = vec![b'x'; 32 * 1024];

    // A CONNECT and 16 Ki PINGREQs behind it in one 32 KiB message: closed unanswered
    // (with the message taken whole, the CONNECT would be accepted and pings answered).
    let mut c = Client::open(broker.ws_target(), "early", Protocol::V311).await;
    let mut message = encode(
        &Packet::Connect(Box::new(connect_v311("early"))),
        Protocol::V311,
    )
    .to_vec();
    message.extend([0xC0, 0].repeat(16 * 1024));
    let _ = c.stream.write_all(&message).await;
    let (packets, _) = c.read_to_end().await;
    assert!(packets.is_empty(), "answered: {packets:?}");

    // After: the same size goes through, to and from the client.
    let mut c = Client::connect_v311(broker.ws_target(), "in").await;
    c.subscribe_ok(&[("big", QoS::AtMostOnce)]).await;
    c.send(Packet::Publish(publish_packet(
        "big",
        &big,
        QoS::AtMostOnce,
        false,
        0,
    )))
    .await;
    assert_eq!(c.expect_publish().await.payload.len(), big.len());
    broker.stop().await;
}

#[tokio::test]
async fn a_slow_ws_reader_gets_everything() {
    // Far more than the socket buffers hold: the broker's writes must wait for the reader
    // and resume on their own once it reads again, up to the very last byte.
    const COUNT: usize = 200;
    let broker = TestBroker::with_ws(|_| {}).await;
    let mut ws = Client::connect_v311(broker.ws_target(), "slow-reader").await;
    ws.subscribe_ok(&[("bulk", QoS::AtMostOnce)]).await;
    let mut tcp = Client::connect_v311(broker.addr, "bulk-sender").await;
    let body = vec![b'x'; 64 * 1024];
    for i in 0..COUNT {
        let mut payload = format!("{i:04}").into_bytes();
        payload.extend_from_slice(&body);
        tcp.send(Packet::Publish(publish_packet(
            "bulk",
            &payload,
            QoS::AtMostOnce,
            false,
            0,
        )))
        .await;
    }
    tcp.barrier().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..COUNT {
        let p = ws.receive_v311().await;
        assert_eq!(&p.payload[..4], format!("{i:04}").as_bytes());
        assert_eq!(p.payload.len(), 4 + body.len());
    }
    ws.disconnect().await;
    tcp.disconnect().await;
    broker.stop().await;
}

// ---- one broker for both transports ----

#[tokio::test]
async fn ws_and_tcp_clients_exchange_messages_at_every_qos() {
    let broker = TestBroker::with_ws(|_| {}).await;
    let mut ws = Client::connect_v311(broker.ws_target(), "browser").await;
    ws.subscribe_ok(&[("to-browser", QoS::ExactlyOnce)]).await;
    let mut tcp = Client::connect_v311(broker.addr, "device").await;
    tcp.subscribe_ok(&[("to-device", QoS::ExactlyOnce)]).await;

    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let sent = format!("from device at {qos:?}");
        tcp.publish_v311("to-browser", sent.as_bytes(), qos, false)
            .await;
        let got = ws.receive_v311().await;
        assert_eq!((text(&got.payload), got.qos), (sent, qos));

        let sent = format!("from browser at {qos:?}");
        ws.publish_v311("to-device", sent.as_bytes(), qos, false)
            .await;
        let got = tcp.receive_v311().await;
        assert_eq!((text(&got.payload), got.qos), (sent, qos));
    }
    ws.disconnect().await;
    tcp.disconnect().await;
    broker.stop().await;
}

fn plain(topic: &str, payload: &str, qos: QoS) -> Publish {
    publish_packet(topic, payload.as_bytes(), qos, false, 0)
}

#[tokio::test]
async fn mqtt5_over_ws() {
    let broker = TestBroker::with_ws(|_| {}).await;
    let mut ws = Client::connect_v5(broker.ws_target(), "browser-v5").await;
    ws.subscribe("v5/to-browser", QoS::AtLeastOnce).await;
    let mut tcp = Client::connect_v5(broker.addr, "device-v5").await;
    tcp.subscribe("v5/to-device", QoS::ExactlyOnce).await;

    tcp.publish_expect(
        plain("v5/to-browser", "hello browser", QoS::AtLeastOnce),
        ReasonCode::Success,
    )
    .await;
    assert_eq!(text(&ws.receive().await.payload), "hello browser");
    ws.publish_expect(
        plain("v5/to-device", "hello device", QoS::ExactlyOnce),
        ReasonCode::Success,
    )
    .await;
    assert_eq!(text(&tcp.receive().await.payload), "hello device");

    // 5.0 DISCONNECT with reason 0x04 asks for the will: over ws as over tcp.
    let connect = Connect {
        protocol: Protocol::V5,
        ..connect_will("will-v5", Some(("v5/to-device", "will v5")))
    };
    let (c, _) = Client::accepted(broker.ws_target(), connect).await;
    c.disconnect_with(ReasonCode::DisconnectWithWill, Properties::default())
        .await;
    assert_eq!(text(&tcp.receive().await.payload), "will v5");

    ws.disconnect().await;
    tcp.disconnect().await;
    broker.stop().await;
}

fn persistent(client_id: &str) -> Connect {
    Connect {
        clean_start: false,
        ..connect_v311(client_id)
    }
}

#[tokio::test]
async fn session_resumes_from_tcp_to_ws_and_back() {
    let broker = TestBroker::with_ws(|_| {}).await;
    let mut publisher = Client::connect_v311(broker.addr, "publisher").await;

    let (mut tcp, present) = Client::connect_accepted(broker.addr, persistent("roamer")).await;
    assert!(!present);
    tcp.subscribe_ok(&[("roam", QoS::AtLeastOnce)]).await;
    tcp.disconnect().await;

    publisher
        .publish_v311("roam", b"queued for ws", QoS::AtLeastOnce, false)
        .await;
    let (mut ws, present) =
        Client::connect_accepted(broker.ws_target(), persistent("roamer")).await;
    assert!(present, "session present over ws");
    let got = ws.receive_v311().await;
    assert_eq!(
        (text(&got.payload).as_str(), got.qos),
        ("queued for ws", QoS::AtLeastOnce)
    );
    ws.disconnect().await;

    publisher
        .publish_v311("roam", b"queued for tcp", QoS::AtLeastOnce, false)
        .await;
    let (mut tcp, present) = Client::connect_accepted(broker.addr, persistent("roamer")).await;
    assert!(present, "session present over tcp");
    let got = tcp.receive_v311().await;
    assert_eq!(
        (text(&got.payload).as_str(), got.qos),
        ("queued for tcp", QoS::AtLeastOnce)
    );
    tcp.disconnect().await;
    publisher.disconnect().await;
    broker.stop().await;
}

#[tokio::test]
async fn ws_connection_takes_over_a_tcp_one() {
    let broker = TestBroker::with_ws(|_| {}).await;
    let (mut tcp, _) = Client::connect_accepted(broker.addr, persistent("same-id")).await;
    let (ws, present) = Client::connect_accepted(broker.ws_target(), persistent("same-id")).await;
    assert!(present);
    tcp.expect_closed(WAIT).await;
    ws.disconnect().await;
    broker.stop().await;
}

// ---- a real browser ----

mod browser {
    use super::*;
    use common::browser::Browser;
    use std::path::Path;

    /// The whole browser run (Chromium start, 4 cases) is bounded by this; run.js has
    /// its own, shorter watchdog.
    const BROWSER_WAIT: Duration = Duration::from_secs(150);

    /// A wss listener for the browser (a certificate for `localhost`, made now) that lets
    /// in only clients with a JWT signed by `secret`: the TLS config, the base64 SHA-256
    /// of the server key's SubjectPublicKeyInfo (for Chromium to trust that key alone)
    /// and a token for user `web`, whose ACL claim allows the browser case's two topics.
    fn wss_with_jwt(dir: &Path, secret: &str) -> (ternmq::config::TlsConfig, String, String) {
        use base64::Engine;
        use rcgen::{CertificateParams, KeyPair, PublicKeyData};
        use sha2::Digest;
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (cert_file, key_file) = (dir.join("wss.crt"), dir.join("wss.key"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        let spki = sha2::Sha256::digest(key.subject_public_key_info());
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        let claims = serde_json::json!({
            "sub": "web",
            "exp": exp,
            "acl": {
                "sub": ["ternmq-test/v5-wss-jwt/to-browser"],
                "pub": ["ternmq-test/v5-wss-jwt/from-browser"],
            },
        });
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap();
        (
            ternmq::config::TlsConfig::new(cert_file, key_file),
            base64::engine::general_purpose::STANDARD.encode(spki),
            token,
        )
    }

    /// mqtt.js in headless Chromium talks to mosquitto_pub and mosquitto_sub through
    /// ternmq, over `ws://host:port/mqtt` and `ws://host:port`, in MQTT 3.1.1 and 5.0, and
    /// with a JWT over `wss://` (MQTT 5.0) to a listener that refuses anonymous clients.
    /// Screenshots land in target/browser-test/.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mqttjs_in_chromium_chats_with_mosquitto_clients() {
        let Some(browser) = Browser::prepare(
            "browser test",
            "browser-test",
            &["playwright-core/package.json", "mqtt/dist/mqtt.min.js"],
            &[
                ("mosquitto_pub", "mosquitto-clients"),
                ("mosquitto_sub", "mosquitto-clients"),
                ("stdbuf", "coreutils"),
            ],
        ) else {
            return;
        };

        let files = tempfile::tempdir().unwrap();
        let secret = "the app server's secret";
        let (tls, spki, token) = wss_with_jwt(files.path(), secret);
        let broker = TestBroker::with_ws(|c| {
            c.listeners.push(ternmq::config::Listener {
                tls: Some(tls),
                ..ternmq::config::Listener::new(
                    ternmq::config::ListenerKind::Ws,
                    "127.0.0.1:0".parse().unwrap(),
                )
            });
            c.auth.jwt = Some(ternmq::security::jwt::JwtConfig {
                secret: Some(secret.into()),
                ..Default::default()
            });
        })
        .await;
        let wss_port = broker.server.as_ref().unwrap().local_addrs()[2].1.port();
        let mut node = browser.node("run.js");
        node.arg(broker.ws_addr().port().to_string())
            .arg(broker.port().to_string())
            .arg(&browser.out)
            .env("TERNMQ_WSS_PORT", wss_port.to_string())
            .env("TERNMQ_WSS_TOKEN", token)
            .env("TERNMQ_WSS_SPKI", spki);
        browser.run(node, "run.log", BROWSER_WAIT).await;
        broker.stop().await;
        browser.assert_screenshots(&[
            "v3.1.1-path",
            "v3.1.1-root",
            "v5-path",
            "v5-root",
            "v5-wss-jwt",
        ]);
    }
}
