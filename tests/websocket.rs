//! MQTT over WebSocket: the upgrade policy (paths, subprotocols, origins, timeout), the
//! byte stream under the frames (splits, batches, fragments, text and close frames),
//! limits, and TCP and WebSocket clients sharing sessions and messages. The last test
//! drives mqtt.js in headless Chromium (tests/browser/).
//!
//! The clients here are raw: tokio-tungstenite (or a TCP socket) and the broker's own
//! codec, so each test says exactly which bytes and frames go over the wire.
// A test reads best as one sequence of steps, however long.
#![allow(clippy::too_many_lines)]

mod common;

use bytes::{Bytes, BytesMut};
use common::client::ack;
use common::TestBroker;
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::time::Duration;
use ternmq::protocol::{
    decode, encode, ByteStr, Connect, Disconnect, Packet, Properties, Protocol, Publish, QoS,
    ReasonCode, SubOptions, Subscribe, SubscribeFilter, Will,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Response;
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// How long any single wait of these tests may take.
const WAIT: Duration = Duration::from_secs(5);
const NO_LIMIT: usize = 268_435_460;

type Ws = WebSocketStream<TcpStream>;

/// Opens a WebSocket to `path`, offering `protocols` (none if empty), with an optional
/// `Origin`. Returns the socket and the server's answer, or the handshake error.
async fn ws_open(
    addr: SocketAddr,
    path: &str,
    protocols: &[&str],
    origin: Option<&str>,
) -> Result<(Ws, Response), WsError> {
    let tcp = TcpStream::connect(addr).await.expect("tcp connect");
    let mut req = format!("ws://{addr}{path}").into_client_request()?;
    let headers = req.headers_mut();
    if !protocols.is_empty() {
        let offer = HeaderValue::from_str(&protocols.join(", ")).unwrap();
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, offer);
    }
    if let Some(origin) = origin {
        headers.insert(header::ORIGIN, HeaderValue::from_str(origin).unwrap());
    }
    timeout(WAIT, tokio_tungstenite::client_async(req, tcp))
        .await
        .expect("handshake within the wait")
}

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

enum Link {
    Ws(Box<Ws>),
    Tcp(TcpStream),
}

/// A raw MQTT client over either transport.
struct Client {
    link: Link,
    rbuf: BytesMut,
    protocol: Protocol,
    next_pkid: u16,
}

impl Client {
    fn over_ws(ws: Ws, protocol: Protocol) -> Client {
        Client {
            link: Link::Ws(Box::new(ws)),
            rbuf: BytesMut::new(),
            protocol,
            next_pkid: 1,
        }
    }

    /// A WebSocket to `/mqtt` (subprotocol `mqtt`), not yet MQTT-connected.
    async fn ws(addr: SocketAddr, protocol: Protocol) -> Client {
        let (ws, _) = ws_open(addr, "/mqtt", &["mqtt"], None)
            .await
            .expect("upgrade");
        Client::over_ws(ws, protocol)
    }

    async fn tcp(addr: SocketAddr, protocol: Protocol) -> Client {
        Client {
            link: Link::Tcp(TcpStream::connect(addr).await.expect("tcp connect")),
            rbuf: BytesMut::new(),
            protocol,
            next_pkid: 1,
        }
    }

    fn ws_mut(&mut self) -> &mut Ws {
        match &mut self.link {
            Link::Ws(ws) => ws,
            Link::Tcp(_) => panic!("not a WebSocket client"),
        }
    }

    fn bytes(&self, packets: &[Packet]) -> Vec<u8> {
        let mut out = BytesMut::new();
        for p in packets {
            encode(p, self.protocol, &mut out).expect("encode");
        }
        out.to_vec()
    }

    /// Sends raw bytes: one binary message over WebSocket.
    async fn send_bytes(&mut self, bytes: Vec<u8>) {
        match &mut self.link {
            Link::Ws(ws) => ws
                .send(Message::Binary(bytes.into()))
                .await
                .expect("ws send"),
            Link::Tcp(tcp) => tcp.write_all(&bytes).await.expect("tcp send"),
        }
    }

    async fn send(&mut self, packet: Packet) {
        let bytes = self.bytes(&[packet]);
        self.send_bytes(bytes).await;
    }

    /// The next packet, or None once the connection is closed. Panics after `WAIT`.
    async fn recv(&mut self) -> Option<Packet> {
        timeout(WAIT, self.recv_unbounded())
            .await
            .expect("a packet (or the close) within the wait")
    }

    async fn recv_unbounded(&mut self) -> Option<Packet> {
        loop {
            if let Some(p) = decode(&mut self.rbuf, self.protocol, NO_LIMIT).expect("decode") {
                return Some(p);
            }
            match &mut self.link {
                Link::Ws(ws) => match ws.next().await {
                    Some(Ok(Message::Binary(data))) => self.rbuf.extend_from_slice(&data),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return None,
                    Some(Ok(other)) => panic!("unexpected message from the broker: {other:?}"),
                },
                Link::Tcp(tcp) => match tcp.read_buf(&mut self.rbuf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                },
            }
        }
    }

    async fn expect(&mut self) -> Packet {
        self.recv()
            .await
            .expect("a packet, not the end of the connection")
    }

    /// Reads until the connection ends, ignoring packets (a 5.0 DISCONNECT, say).
    async fn expect_closed(&mut self) {
        while let Some(p) = self.recv().await {
            assert!(
                matches!(p, Packet::Disconnect(_)),
                "expected the end, got {p:?}"
            );
        }
    }

    /// CONNECT and CONNACK (accepted); returns session present.
    async fn connect(&mut self, id: &str, clean: bool, will: Option<(&str, &str)>) -> bool {
        self.send(connect_packet(self.protocol, id, clean, will))
            .await;
        match self.expect().await {
            Packet::ConnAck(ack) => {
                assert_eq!(ack.code.v3_connack(), 0, "CONNACK for {id}");
                ack.session_present
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
        self.next_pkid
    }

    async fn subscribe(&mut self, filter: &str, qos: QoS) {
        let pkid = self.pkid();
        self.send(subscribe_packet(pkid, filter, qos)).await;
        match self.expect().await {
            Packet::SubAck(ack) => {
                assert_eq!(ack.pkid, pkid);
                assert_eq!(ack.codes, [ReasonCode::granted(qos)], "SUBACK for {filter}");
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// Publishes and completes the QoS handshake.
    async fn publish(&mut self, topic: &str, payload: &str, qos: QoS) {
        let pkid = if qos == QoS::AtMostOnce {
            0
        } else {
            self.pkid()
        };
        self.send(publish_packet(topic, payload, qos, pkid)).await;
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                assert!(matches!(self.expect().await, Packet::PubAck(a) if a.pkid == pkid))
            }
            QoS::ExactlyOnce => {
                assert!(matches!(self.expect().await, Packet::PubRec(a) if a.pkid == pkid));
                self.send(Packet::PubRel(ack(pkid))).await;
                assert!(matches!(self.expect().await, Packet::PubComp(a) if a.pkid == pkid));
            }
        }
    }

    /// Receives one PUBLISH and acknowledges it as its QoS asks.
    async fn receive(&mut self) -> Publish {
        let p = match self.expect().await {
            Packet::Publish(p) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        };
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.send(Packet::PubAck(ack(p.pkid))).await,
            QoS::ExactlyOnce => {
                self.send(Packet::PubRec(ack(p.pkid))).await;
                assert!(matches!(self.expect().await, Packet::PubRel(a) if a.pkid == p.pkid));
                self.send(Packet::PubComp(ack(p.pkid))).await;
            }
        }
        p
    }

    async fn disconnect(mut self) {
        self.send(Packet::Disconnect(Disconnect::default())).await;
        self.expect_closed().await;
    }
}

fn connect_packet(protocol: Protocol, id: &str, clean: bool, will: Option<(&str, &str)>) -> Packet {
    Packet::Connect(Box::new(Connect {
        protocol,
        clean_start: clean,
        keep_alive: 30,
        client_id: ByteStr::from(id),
        will: will.map(|(topic, payload)| Will {
            topic: ByteStr::from(topic),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties::default(),
        }),
        username: None,
        password: None,
        properties: Properties::default(),
    }))
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

fn publish_packet(topic: &str, payload: &str, qos: QoS, pkid: u16) -> Packet {
    Packet::Publish(Publish {
        qos,
        topic: ByteStr::from(topic),
        pkid,
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        ..Publish::default()
    })
}

fn payload(p: &Publish) -> &str {
    std::str::from_utf8(&p.payload).unwrap()
}

/// A TCP client subscribed to `filter`, to watch what the broker publishes.
async fn tcp_watcher(broker: &TestBroker, id: &str, filter: &str) -> Client {
    let mut c = Client::tcp(broker.addr, Protocol::V311).await;
    c.connect(id, true, None).await;
    c.subscribe(filter, QoS::AtLeastOnce).await;
    c
}

/// SUBSCRIBE to `echo/#` and two PUBLISHes to it, as bytes: a connected client sending
/// them gets SUBACK and its two messages back.
fn echo_packets(client: &Client) -> Vec<u8> {
    client.bytes(&[
        subscribe_packet(1, "echo/#", QoS::AtMostOnce),
        publish_packet("echo/1", "first", QoS::AtMostOnce, 0),
        publish_packet("echo/2", "second", QoS::AtMostOnce, 0),
    ])
}

async fn expect_echo(client: &mut Client) {
    assert!(matches!(client.expect().await, Packet::SubAck(a) if a.pkid == 1));
    assert_eq!(payload(&client.receive().await), "first");
    assert_eq!(payload(&client.receive().await), "second");
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
        let mut c = Client::over_ws(ws, Protocol::V311);
        c.connect("subprotocol", true, None).await;
        c.disconnect().await;
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
    let mut c = Client::over_ws(ws, Protocol::V311);
    c.connect("no-subprotocol", true, None).await;
    c.disconnect().await;
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
        let mut c = Client::over_ws(ws, Protocol::V311);
        c.connect("paths", true, None).await;
        c.disconnect().await;
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
        let mut c = Client::over_ws(ws, Protocol::V311);
        c.connect("origin", true, None).await;
        c.disconnect().await;
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

#[tokio::test]
async fn connect_timeout_and_keep_alive_apply_over_ws() {
    let broker = TestBroker::with_ws(|c| c.mqtt.connect_timeout = 1).await;
    // Upgraded, then no CONNECT.
    let mut c = Client::ws(broker.ws_addr(), Protocol::V311).await;
    c.expect_closed().await;

    // Connected with a 1 s keep-alive, then silence: closed after 1.5 s.
    let mut c = Client::ws(broker.ws_addr(), Protocol::V311).await;
    let mut connect = connect_packet(Protocol::V311, "sleepy", true, None);
    if let Packet::Connect(c) = &mut connect {
        c.keep_alive = 1;
    }
    c.send(connect).await;
    assert!(matches!(c.expect().await, Packet::ConnAck(a) if a.code.v3_connack() == 0));
    c.expect_closed().await;
    broker.stop().await;
}

// ---- frames and the byte stream ----

#[tokio::test]
async fn packets_split_over_many_messages() {
    let broker = TestBroker::with_ws(|_| {}).await;
    let mut c = Client::ws(broker.ws_addr(), Protocol::V311).await;
    // One byte per message, with empty messages in between (they must not read as the end).
    let connect = c.bytes(&[connect_packet(Protocol::V311, "split", true, None)]);
    for bytes in [connect, echo_packets(&c)] {
        for b in bytes {
            c.send_bytes(vec![b]).await;
            c.send_bytes(Vec::new()).await;
        }
    }
    assert!(matches!(c.expect().await, Packet::ConnAck(a) if a.code.v3_connack() == 0));
    expect_echo(&mut c).await;
    c.disconnect().await;
    broker.stop().await;
}

#[tokio::test]
async fn many_packets_in_one_message() {
    let broker = TestBroker::with_ws(|_| {}).await;
    let mut c = Client::ws(broker.ws_addr(), Protocol::V311).await;
    c.connect("batched", true, None).await;
    c.send_bytes(echo_packets(&c)).await;
    expect_echo(&mut c).await;
    c.disconnect().await;
    broker.stop().await;
}

#[tokio::test]
async fn fragmented_message_with_continuation_frames() {
    let broker = TestBroker::with_ws(|_| {}).await;
    let mut c = Client::ws(broker.ws_addr(), Protocol::V311).await;
    c.connect("fragments", true, None).await;
    let bytes = echo_packets(&c);
    // Three fragments cutting through packets, with a ping between them (RFC 6455 allows
    // control frames inside a fragmented message).
    let (a, rest) = bytes.split_at(5);
    let (b, d) = rest.split_at(rest.len() / 2);
    let ws = c.ws_mut();
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
    expect_echo(&mut c).await;
    c.disconnect().await;
    broker.stop().await;
}

#[tokio::test]
async fn ping_frames_are_answered() {
    let broker = TestBroker::with_ws(|_| {}).await;
    let mut c = Client::ws(broker.ws_addr(), Protocol::V311).await;
    c.connect("pinger", true, None).await;
    let ws = c.ws_mut();
    ws.send(Message::Ping(Bytes::from_static(b"hello")))
        .await
        .unwrap();
    let pong = timeout(WAIT, ws.next()).await.expect("pong in time");
    assert!(
        matches!(&pong, Some(Ok(Message::Pong(p))) if &p[..] == b"hello"),
        "{pong:?}"
    );
    // MQTT goes on.
    c.send(Packet::PingReq).await;
    assert_eq!(c.expect().await, Packet::PingResp);
    c.disconnect().await;
    broker.stop().await;
}

#[tokio::test]
async fn text_frame_closes_the_connection_and_publishes_the_will() {
    let broker = TestBroker::with_ws(|_| {}).await;
    let mut watcher = tcp_watcher(&broker, "watch-text", "will/#").await;
    let mut c = Client::ws(broker.ws_addr(), Protocol::V311).await;
    c.connect("texter", true, Some(("will/texter", "gone")))
        .await;
    let ws = c.ws_mut();
    ws.send(Message::Text("hello".into())).await.unwrap();
    // The broker says why in its close frame, then closes.
    let close = timeout(WAIT, ws.next()).await.expect("close in time");
    match close {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Unsupported),
        other => panic!("expected a close frame with code 1003, got {other:?}"),
    }
    let will = watcher.receive().await;
    assert_eq!((&*will.topic, payload(&will)), ("will/texter", "gone"));
    watcher.disconnect().await;
    broker.stop().await;
}

#[tokio::test]
async fn close_frame_without_disconnect_publishes_the_will() {
    let broker = TestBroker::with_ws(|_| {}).await;
    let mut watcher = tcp_watcher(&broker, "watch-close", "will/#").await;

    // DISCONNECT first: no will.
    let mut polite = Client::ws(broker.ws_addr(), Protocol::V311).await;
    polite
        .connect("polite", true, Some(("will/polite", "unexpected")))
        .await;
    polite.disconnect().await;

    // A close frame alone is a network close.
    let mut c = Client::ws(broker.ws_addr(), Protocol::V311).await;
    c.connect("closer", true, Some(("will/closer", "gone")))
        .await;
    c.ws_mut().close(None).await.unwrap();
    c.expect_closed().await;

    let will = watcher.receive().await;
    assert_eq!((&*will.topic, payload(&will)), ("will/closer", "gone"));
    watcher.disconnect().await;
    broker.stop().await;
}

#[tokio::test]
async fn oversized_packet_closes_the_connection() {
    let broker = TestBroker::with_ws(|c| c.mqtt.max_packet_size = 1024).await;

    // The MQTT limit: a 5.0 client is told why (DISCONNECT 0x95) before the close.
    let mut c = Client::ws(broker.ws_addr(), Protocol::V5).await;
    c.connect("big-v5", true, None).await;
    c.send(publish_packet("big", &"x".repeat(2000), QoS::AtMostOnce, 0))
        .await;
    match c.recv().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::PacketTooLarge),
        other => panic!("expected DISCONNECT 0x95, got {other:?}"),
    }
    c.expect_closed().await;

    // The same packet split over small messages is refused all the same.
    let mut c = Client::ws(broker.ws_addr(), Protocol::V311).await;
    c.connect("big-split", true, None).await;
    let bytes = c.bytes(&[publish_packet("big", &"x".repeat(2000), QoS::AtMostOnce, 0)]);
    for chunk in bytes.chunks(100) {
        // The broker may close before the last chunk: ignore send errors.
        let _ = c
            .ws_mut()
            .send(Message::Binary(chunk.to_vec().into()))
            .await;
    }
    c.expect_closed().await;

    // The WebSocket limit (never below 64 KiB) protects memory before any MQTT decoding.
    let mut c = Client::ws(broker.ws_addr(), Protocol::V311).await;
    c.connect("big-frame", true, None).await;
    let _ = c
        .ws_mut()
        .send(Message::Binary(vec![0u8; 100 * 1024].into()))
        .await;
    c.expect_closed().await;
    broker.stop().await;
}

#[tokio::test]
async fn a_slow_ws_reader_gets_everything() {
    // Far more than the socket buffers hold: the broker's writes must wait for the reader
    // and resume on their own once it reads again, up to the very last byte.
    const COUNT: usize = 200;
    let broker = TestBroker::with_ws(|_| {}).await;
    let mut ws = Client::ws(broker.ws_addr(), Protocol::V311).await;
    ws.connect("slow-reader", true, None).await;
    ws.subscribe("bulk", QoS::AtMostOnce).await;
    let mut tcp = Client::tcp(broker.addr, Protocol::V311).await;
    tcp.connect("bulk-sender", true, None).await;
    let body = "x".repeat(64 * 1024);
    for i in 0..COUNT {
        tcp.publish("bulk", &format!("{i:04}{body}"), QoS::AtMostOnce)
            .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..COUNT {
        let p = ws.receive().await;
        assert_eq!(&payload(&p)[..4], format!("{i:04}"));
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
    let mut ws = Client::ws(broker.ws_addr(), Protocol::V311).await;
    ws.connect("browser", true, None).await;
    ws.subscribe("to-browser", QoS::ExactlyOnce).await;
    let mut tcp = Client::tcp(broker.addr, Protocol::V311).await;
    tcp.connect("device", true, None).await;
    tcp.subscribe("to-device", QoS::ExactlyOnce).await;

    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let text = format!("from device at {qos:?}");
        tcp.publish("to-browser", &text, qos).await;
        let got = ws.receive().await;
        assert_eq!((payload(&got), got.qos), (text.as_str(), qos));

        let text = format!("from browser at {qos:?}");
        ws.publish("to-device", &text, qos).await;
        let got = tcp.receive().await;
        assert_eq!((payload(&got), got.qos), (text.as_str(), qos));
    }
    ws.disconnect().await;
    tcp.disconnect().await;
    broker.stop().await;
}

#[tokio::test]
async fn mqtt5_over_ws() {
    let broker = TestBroker::with_ws(|_| {}).await;
    let mut ws = Client::ws(broker.ws_addr(), Protocol::V5).await;
    ws.connect("browser-v5", true, None).await;
    ws.subscribe("v5/to-browser", QoS::AtLeastOnce).await;
    let mut tcp = Client::tcp(broker.addr, Protocol::V5).await;
    tcp.connect("device-v5", true, None).await;
    tcp.subscribe("v5/to-device", QoS::ExactlyOnce).await;

    tcp.publish("v5/to-browser", "hello browser", QoS::AtLeastOnce)
        .await;
    assert_eq!(payload(&ws.receive().await), "hello browser");
    ws.publish("v5/to-device", "hello device", QoS::ExactlyOnce)
        .await;
    assert_eq!(payload(&tcp.receive().await), "hello device");

    // 5.0 DISCONNECT with reason 0x04 asks for the will: over ws as over tcp.
    let mut c = Client::ws(broker.ws_addr(), Protocol::V5).await;
    c.connect("will-v5", true, Some(("v5/to-device", "will v5")))
        .await;
    c.send(Packet::Disconnect(Disconnect {
        reason: ReasonCode::DisconnectWithWill,
        ..Disconnect::default()
    }))
    .await;
    c.expect_closed().await;
    assert_eq!(payload(&tcp.receive().await), "will v5");

    ws.disconnect().await;
    tcp.disconnect().await;
    broker.stop().await;
}

#[tokio::test]
async fn session_resumes_from_tcp_to_ws_and_back() {
    let broker = TestBroker::with_ws(|_| {}).await;
    let mut publisher = Client::tcp(broker.addr, Protocol::V311).await;
    publisher.connect("publisher", true, None).await;

    let mut tcp = Client::tcp(broker.addr, Protocol::V311).await;
    assert!(!tcp.connect("roamer", false, None).await);
    tcp.subscribe("roam", QoS::AtLeastOnce).await;
    tcp.disconnect().await;

    publisher
        .publish("roam", "queued for ws", QoS::AtLeastOnce)
        .await;
    let mut ws = Client::ws(broker.ws_addr(), Protocol::V311).await;
    assert!(
        ws.connect("roamer", false, None).await,
        "session present over ws"
    );
    let got = ws.receive().await;
    assert_eq!(
        (payload(&got), got.qos),
        ("queued for ws", QoS::AtLeastOnce)
    );
    ws.disconnect().await;

    publisher
        .publish("roam", "queued for tcp", QoS::AtLeastOnce)
        .await;
    let mut tcp = Client::tcp(broker.addr, Protocol::V311).await;
    assert!(
        tcp.connect("roamer", false, None).await,
        "session present over tcp"
    );
    let got = tcp.receive().await;
    assert_eq!(
        (payload(&got), got.qos),
        ("queued for tcp", QoS::AtLeastOnce)
    );
    tcp.disconnect().await;
    publisher.disconnect().await;
    broker.stop().await;
}

#[tokio::test]
async fn ws_connection_takes_over_a_tcp_one() {
    let broker = TestBroker::with_ws(|_| {}).await;
    let mut tcp = Client::tcp(broker.addr, Protocol::V311).await;
    tcp.connect("same-id", false, None).await;
    let mut ws = Client::ws(broker.ws_addr(), Protocol::V311).await;
    assert!(ws.connect("same-id", false, None).await);
    tcp.expect_closed().await;
    ws.disconnect().await;
    broker.stop().await;
}

// ---- a real browser ----

mod browser {
    use super::*;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::time::Instant;

    /// The whole browser run (Chromium start, 4 cases) is bounded by this; run.js has
    /// its own, shorter watchdog.
    const BROWSER_WAIT: Duration = Duration::from_secs(150);

    fn in_ci() -> bool {
        std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
    }

    fn on_path(command: &str) -> bool {
        std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(command).is_file()))
    }

    fn chromium() -> PathBuf {
        std::env::var_os("CHROMIUM")
            .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
    }

    /// What the browser test needs and is missing, with how to get it.
    fn missing(dir: &Path) -> Vec<String> {
        let mut missing = Vec::new();
        for (command, package) in [
            ("node", "nodejs"),
            ("mosquitto_pub", "mosquitto-clients"),
            ("mosquitto_sub", "mosquitto-clients"),
            ("stdbuf", "coreutils"),
        ] {
            if !on_path(command) {
                missing.push(format!("{command} (apt-get install {package})"));
            }
        }
        if !chromium().is_file() {
            missing.push(format!(
                "{} (apt-get install chromium)",
                chromium().display()
            ));
        }
        for module in ["playwright-core/package.json", "mqtt/dist/mqtt.min.js"] {
            if !dir.join("node_modules").join(module).is_file() {
                missing.push(format!(
                    "node_modules/{module} (cd tests/browser && npm ci)"
                ));
            }
        }
        missing
    }

    /// mqtt.js in headless Chromium talks to mosquitto_pub and mosquitto_sub through
    /// ternmq, over `ws://host:port/mqtt` and `ws://host:port`, in MQTT 3.1.1 and 5.0.
    /// Screenshots land in target/browser-test/.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mqttjs_in_chromium_chats_with_mosquitto_clients() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
        let missing = missing(&dir);
        if !missing.is_empty() {
            let what = format!("missing for the browser test: {}", missing.join(", "));
            assert!(!in_ci(), "CI=true and {what}");
            eprintln!("note: skipping the browser test: {what}");
            return;
        }
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../browser-test");
        std::fs::create_dir_all(&out).unwrap();
        let out = out.canonicalize().unwrap();
        let log_path = out.join("run.log");
        let log = std::fs::File::create(&log_path).unwrap();

        let broker = TestBroker::with_ws(|_| {}).await;
        let mut node = Command::new("node")
            .arg("run.js")
            .arg(broker.ws_addr().port().to_string())
            .arg(broker.port().to_string())
            .arg(&out)
            .env("CHROMIUM", chromium())
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("run node");
        let deadline = Instant::now() + BROWSER_WAIT;
        let status = loop {
            if let Some(status) = node.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() > deadline {
                // Only our own child, by its handle; its watchdog should have fired first.
                let _ = node.kill();
                let _ = node.wait();
                break None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let output = std::fs::read_to_string(&log_path).unwrap_or_default();
        println!("{output}");
        broker.stop().await;
        match status {
            Some(s) => assert!(
                s.success(),
                "browser test failed ({s}); log in {}",
                log_path.display()
            ),
            None => panic!("browser test still running after {BROWSER_WAIT:?}; killed"),
        }
        for case in ["v3.1.1-path", "v3.1.1-root", "v5-path", "v5-root"] {
            let shot = out.join(format!("{case}.png"));
            assert!(shot.is_file(), "no screenshot {}", shot.display());
        }
    }
}
