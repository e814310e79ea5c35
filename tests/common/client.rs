//! The raw MQTT test client shared by `mqtt3.rs` and `mqtt5.rs`, with the packet builders
//! and waiting helpers both use.
//!
//! The client is built on the crate's own codec, so that every packet, reason code and
//! property sent and received is explicit; malformed input is written as hand-made bytes
//! with `send_raw`. It encodes and decodes with the protocol given to `open` (for the
//! `connect*` constructors, the one of the CONNECT).
//!
//! Waiting for "nothing more": a client sends PINGREQ and collects what arrives before the
//! PINGRESP (`Client::ping`). The broker handles one connection's packets in order and
//! writes what its session queue holds before it reads the next bytes, so when the
//! messages in question were routed before the PINGREQ was sent (the publisher got its
//! PUBACK, or the subscriber's own earlier packet was answered), anything the broker
//! would send arrives before the PINGRESP.
//!
//! Two flavours of the publish flows, kept apart because the tests rely on each:
//! - the `_v311` methods (`publish_v311`, `acknowledge_v311`, `receive_v311`) take the first
//!   ack of the kind they wait for and assert that it is exactly the bare 3.1.1 ack of the
//!   packet id (no reason code, no properties);
//! - `publish`, `acknowledge` and `receive` wait for the ack with the right packet id and
//!   return (or ignore) its 5.0 reason code.

use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;
use ternmq::protocol::{
    self, Ack, ByteStr, ConnAck, Connect, Disconnect, Packet, Properties, Protocol, Publish, QoS,
    ReasonCode, SubOptions, Subscribe, SubscribeFilter, Unsubscribe, Will,
};
use ternmq::transport::ws::WsBytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long to wait for something that should happen.
pub const WAIT: Duration = Duration::from_secs(3);
/// Accept whatever size the broker sends.
pub const ANY_SIZE: usize = protocol::MAX_REMAINING_LENGTH + 5;
/// How often `eventually` checks.
pub const POLL: Duration = Duration::from_millis(10);

// ---------------------------------------------------------------------------------------
// Packet builders
// ---------------------------------------------------------------------------------------

/// A 5.0 CONNECT with Clean Start, a 60 s keep-alive, no will and no properties (so a
/// Session Expiry Interval of 0).
pub fn connect_v5(client_id: &str) -> Connect {
    Connect {
        protocol: Protocol::V5,
        clean_start: true,
        keep_alive: 60,
        client_id: ByteStr::from(client_id),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    }
}

/// A 3.1.1 CONNECT with clean session, a 60 s keep-alive and no will.
pub fn connect_v311(client_id: &str) -> Connect {
    Connect {
        protocol: Protocol::V311,
        ..connect_v5(client_id)
    }
}

/// A PUBLISH without properties.
pub fn publish_packet(topic: &str, payload: &[u8], qos: QoS, retain: bool, pkid: u16) -> Publish {
    Publish {
        dup: false,
        qos,
        retain,
        topic: ByteStr::from(topic),
        pkid,
        payload: Bytes::copy_from_slice(payload),
        properties: None,
    }
}

pub fn opts(qos: QoS) -> SubOptions {
    SubOptions {
        qos,
        ..SubOptions::default()
    }
}

pub fn filter(f: &str, options: SubOptions) -> SubscribeFilter {
    SubscribeFilter {
        filter: ByteStr::from(f),
        options,
    }
}

pub fn ack(pkid: u16) -> Ack {
    Ack {
        pkid,
        ..Ack::default()
    }
}

pub fn encode(packet: &Packet, protocol: Protocol) -> BytesMut {
    let mut buf = BytesMut::new();
    protocol::encode(packet, protocol, &mut buf).expect("test packet encodes");
    buf
}

pub fn text(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload).into_owned()
}

/// Polls `ready` until it holds; panics after `timeout`. Returns how long it took.
pub async fn eventually(
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Duration {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
    start.elapsed()
}

// ---------------------------------------------------------------------------------------
// MQTT 5.0 packet builders
// ---------------------------------------------------------------------------------------

/// A 5.0 CONNECT asking for a Session Expiry Interval of `expiry` seconds.
pub fn connect_expiry(client_id: &str, clean_start: bool, expiry: u32) -> Connect {
    Connect {
        clean_start,
        properties: Properties {
            session_expiry_interval: Some(expiry),
            ..Properties::default()
        },
        ..connect_v5(client_id)
    }
}

/// A 5.0 CONNECT with a will on `topic`.
pub fn connect_with_will(
    client_id: &str,
    topic: &str,
    payload: &str,
    will_props: Properties,
) -> Connect {
    Connect {
        will: Some(Will {
            topic: ByteStr::from(topic),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: will_props,
        }),
        ..connect_v5(client_id)
    }
}

/// An application message; the client gives it a packet id when it sends it.
pub fn message(topic: &str, payload: &[u8], qos: QoS, properties: Properties) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: ByteStr::from(topic),
        pkid: 0,
        payload: Bytes::copy_from_slice(payload),
        properties: (!properties.is_empty()).then(|| Box::new(properties)),
    }
}

/// An application message without properties.
pub fn plain(topic: &str, payload: &[u8], qos: QoS) -> Publish {
    message(topic, payload, qos, Properties::default())
}

/// A retained application message without properties.
pub fn retained(topic: &str, payload: &[u8], qos: QoS) -> Publish {
    Publish {
        retain: true,
        ..plain(topic, payload, qos)
    }
}

/// SUBSCRIBE properties with a Subscription Identifier.
pub fn sub_id(id: u32) -> Properties {
    Properties {
        subscription_identifiers: vec![id],
        ..Properties::default()
    }
}

/// PUBLISH properties with a Message Expiry Interval.
pub fn expiry_props(secs: u32) -> Properties {
    Properties {
        message_expiry_interval: Some(secs),
        ..Properties::default()
    }
}

pub fn user_props(pairs: &[(&str, &str)]) -> Vec<(ByteStr, ByteStr)> {
    pairs
        .iter()
        .map(|(k, v)| (ByteStr::from(*k), ByteStr::from(*v)))
        .collect()
}

/// The properties of a received PUBLISH (default when it has none).
pub fn props_of(p: &Publish) -> Properties {
    p.properties.as_deref().cloned().unwrap_or_default()
}

/// Will properties with a Will Delay Interval.
pub fn will_delay(secs: u32) -> Properties {
    Properties {
        will_delay_interval: Some(secs),
        ..Properties::default()
    }
}

/// CONNECT or DISCONNECT properties with a Session Expiry Interval.
pub fn expiry_session(secs: u32) -> Properties {
    Properties {
        session_expiry_interval: Some(secs),
        ..Properties::default()
    }
}

// ---------------------------------------------------------------------------------------
// The raw client
// ---------------------------------------------------------------------------------------

/// What a read brought. Short-lived, so the size of a packet inline does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Event {
    Packet(Packet),
    Timeout,
    /// EOF or a socket error (a reset counts: the broker closed with unread input).
    Closed(String),
}

/// A byte stream to a broker: TCP, the bytes of a WebSocket, or an in-memory pipe.
pub trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Duplex for T {}

/// Where a client connects: a listener, or a broker without sockets.
#[derive(Clone)]
pub enum Target {
    Tcp(SocketAddr),
    /// A ws listener: upgraded on `/mqtt` with subprotocol `mqtt`, then MQTT in binary
    /// messages (`ternmq::transport::ws::WsBytes` on the client's side too).
    Ws(SocketAddr),
    Memory(std::sync::Arc<ternmq::Broker>),
}

impl From<SocketAddr> for Target {
    fn from(addr: SocketAddr) -> Target {
        Target::Tcp(addr)
    }
}

/// A test client on a raw socket: sends packets or bytes, decodes what comes back.
pub struct Client {
    pub name: String,
    protocol: Protocol,
    pub stream: Box<dyn Duplex>,
    rbuf: BytesMut,
    /// Packets read while waiting for another one, returned first by the next reads.
    pending: VecDeque<Packet>,
    next_pkid: u16,
}

impl Client {
    /// Opens a connection and sends nothing; `protocol` encodes and decodes packets.
    pub async fn open(target: impl Into<Target>, name: &str, protocol: Protocol) -> Client {
        let stream: Box<dyn Duplex> = match target.into() {
            Target::Tcp(addr) => {
                let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
                    .await
                    .unwrap_or_else(|_| panic!("{name}: TCP connect timed out"))
                    .unwrap_or_else(|e| panic!("{name}: TCP connect failed: {e}"));
                stream.set_nodelay(true).expect("set_nodelay");
                Box::new(stream)
            }
            Target::Ws(addr) => {
                let (ws, _) = super::ws::open(addr, "/mqtt", &["mqtt"], None)
                    .await
                    .unwrap_or_else(|e| panic!("{name}: WebSocket upgrade failed: {e}"));
                Box::new(WsBytes::new(ws))
            }
            Target::Memory(broker) => Box::new(super::connect_in_memory(&broker)),
        };
        Client::over(stream, name, protocol)
    }

    /// A client on an open byte stream (a WebSocket's bytes, say).
    pub fn over(stream: Box<dyn Duplex>, name: &str, protocol: Protocol) -> Client {
        Client {
            name: name.to_string(),
            protocol,
            stream,
            rbuf: BytesMut::new(),
            pending: VecDeque::new(),
            next_pkid: 1,
        }
    }

    /// Sends `connect` and returns the CONNACK, whatever its code.
    pub async fn connect_with(addr: impl Into<Target>, connect: Connect) -> (Client, ConnAck) {
        let name = connect.client_id.to_string();
        let mut c = Client::open(addr, &name, connect.protocol).await;
        let ack = c.handshake(connect).await;
        (c, ack)
    }

    /// Sends `connect` on this open stream and returns the CONNACK, whatever its code.
    pub async fn handshake(&mut self, connect: Connect) -> ConnAck {
        self.send(Packet::Connect(Box::new(connect))).await;
        match self.expect("CONNACK").await {
            Packet::ConnAck(ack) => ack,
            other => panic!("{}: expected CONNACK, got {other:?}", self.name),
        }
    }

    /// Connects and asserts success (reason code 0x00); returns the CONNACK too.
    pub async fn accepted(addr: impl Into<Target>, connect: Connect) -> (Client, ConnAck) {
        let (c, ack) = Client::connect_with(addr, connect).await;
        assert_eq!(
            ack.code,
            ReasonCode::Success,
            "{}: CONNACK reason code",
            c.name
        );
        (c, ack)
    }

    /// Connects and asserts acceptance (return code 0); returns the session present flag.
    pub async fn connect_accepted(addr: impl Into<Target>, connect: Connect) -> (Client, bool) {
        let (c, ack) = Client::connect_with(addr, connect).await;
        assert_eq!(
            ack.code,
            ReasonCode::Success,
            "{}: CONNACK return code",
            c.name
        );
        (c, ack.session_present)
    }

    /// A 3.1.1 clean-session client, accepted with session present 0.
    pub async fn connect_v311(addr: impl Into<Target>, client_id: &str) -> Client {
        let (c, present) = Client::connect_accepted(addr, connect_v311(client_id)).await;
        assert!(
            !present,
            "{client_id}: a clean session has no session present"
        );
        c
    }

    /// A 5.0 client with Clean Start and no session expiry, accepted.
    pub async fn connect_v5(addr: impl Into<Target>, client_id: &str) -> Client {
        let (c, ack) = Client::accepted(addr, connect_v5(client_id)).await;
        assert!(
            !ack.session_present,
            "{client_id}: Clean Start gives session present 0"
        );
        c
    }

    pub fn pkid(&mut self) -> u16 {
        let id = self.next_pkid;
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        id
    }

    pub async fn send(&mut self, packet: Packet) {
        let buf = encode(&packet, self.protocol);
        self.send_raw(&buf).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        if let Err(e) = self.stream.write_all(bytes).await {
            panic!("{}: write failed: {e}", self.name);
        }
    }

    /// The next packet from the socket (not from `pending`), a timeout, or the end.
    async fn read_event(&mut self, timeout: Duration) -> Event {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match protocol::decode(&mut self.rbuf, self.protocol, ANY_SIZE) {
                Ok(Some(p)) => return Event::Packet(p),
                Ok(None) => {}
                Err(e) => panic!("{}: the broker sent undecodable bytes: {e}", self.name),
            }
            self.rbuf.reserve(16 * 1024);
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.rbuf)).await {
                Err(_) => return Event::Timeout,
                Ok(Ok(0)) if self.rbuf.is_empty() => return Event::Closed("EOF".into()),
                Ok(Ok(0)) => {
                    return Event::Closed(format!("EOF inside a packet: {:?}", &self.rbuf[..]))
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Event::Closed(e.to_string()),
            }
        }
    }

    /// The next packet (a pending one first), a timeout, or the end.
    pub async fn next_event(&mut self, timeout: Duration) -> Event {
        match self.pending.pop_front() {
            Some(p) => Event::Packet(p),
            None => self.read_event(timeout).await,
        }
    }

    /// The next packet, or None if none arrives within `timeout`. Panics if the broker
    /// closes the connection.
    pub async fn recv(&mut self, timeout: Duration) -> Option<Packet> {
        match self.next_event(timeout).await {
            Event::Packet(p) => Some(p),
            Event::Timeout => None,
            Event::Closed(why) => panic!("{}: connection closed unexpectedly ({why})", self.name),
        }
    }

    pub async fn expect(&mut self, what: &str) -> Packet {
        match self.recv(WAIT).await {
            Some(p) => p,
            None => panic!(
                "{}: expected {what} within {WAIT:?}, got nothing",
                self.name
            ),
        }
    }

    pub async fn expect_publish(&mut self) -> Publish {
        match self.expect("PUBLISH").await {
            Packet::Publish(p) => p,
            other => panic!("{}: expected PUBLISH, got {other:?}", self.name),
        }
    }

    /// Reads exactly `expected.len()` bytes and compares them.
    pub async fn expect_bytes(&mut self, expected: &[u8], what: &str) {
        assert!(self.pending.is_empty(), "{}: packets pending", self.name);
        while self.rbuf.len() < expected.len() {
            self.rbuf.reserve(1024);
            match tokio::time::timeout(WAIT, self.stream.read_buf(&mut self.rbuf)).await {
                Ok(Ok(n)) if n > 0 => {}
                other => panic!(
                    "{}: expected the bytes of {what}, got {:?} then {other:?}",
                    self.name,
                    &self.rbuf[..]
                ),
            }
        }
        let got = self.rbuf.split_to(expected.len());
        assert_eq!(&got[..], expected, "{}: bytes of {what}", self.name);
    }

    /// Waits for a packet matching `wanted`, keeping the others for later reads.
    pub async fn wait_for(&mut self, what: &str, wanted: impl Fn(&Packet) -> bool) -> Packet {
        if let Some(i) = self.pending.iter().position(&wanted) {
            return self.pending.remove(i).expect("index is valid");
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_event(left).await {
                Event::Packet(p) if wanted(&p) => return p,
                Event::Packet(p) => self.pending.push_back(p),
                Event::Timeout => panic!(
                    "{}: expected {what} within {WAIT:?}; got only {:?}",
                    self.name, self.pending
                ),
                Event::Closed(why) => {
                    panic!("{}: closed ({why}) while waiting for {what}", self.name)
                }
            }
        }
    }

    /// Asserts that the broker closes the connection within `timeout` and sends nothing
    /// before; returns how long it took.
    pub async fn expect_closed(&mut self, timeout: Duration) -> Duration {
        let start = Instant::now();
        match self.next_event(timeout).await {
            Event::Closed(_) => start.elapsed(),
            Event::Timeout => panic!(
                "{}: the broker did not close the connection within {timeout:?}",
                self.name
            ),
            Event::Packet(p) => panic!("{}: expected the connection closed, got {p:?}", self.name),
        }
    }

    /// Every packet up to the first one matching `last`, included.
    pub async fn read_until(&mut self, what: &str, last: impl Fn(&Packet) -> bool) -> Vec<Packet> {
        let mut packets: Vec<Packet> = Vec::new();
        loop {
            match self.next_event(WAIT).await {
                Event::Packet(p) if last(&p) => {
                    packets.push(p);
                    return packets;
                }
                Event::Packet(p) => packets.push(p),
                Event::Timeout => panic!("{}: no {what} within {WAIT:?}: {packets:?}", self.name),
                Event::Closed(how) => {
                    panic!("{}: closed ({how}) before {what}: {packets:?}", self.name)
                }
            }
        }
    }

    /// For a client still sending when the broker closes the connection (with
    /// `last_packet`, the reason): the broker's packets up to that one, then `more` bytes
    /// from the client, which go through (the broker still reads, it does not reset the
    /// connection), then the clean end of the stream.
    pub async fn lingering_close(
        &mut self,
        last_packet: &str,
        last: impl Fn(&Packet) -> bool,
        more: &[u8],
    ) -> Vec<Packet> {
        let packets = self.read_until(last_packet, last).await;
        if let Err(e) = self.stream.write_all(more).await {
            panic!("{}: writing after {last_packet} failed: {e}", self.name);
        }
        let (rest, end) = self.read_to_end().await;
        assert!(
            rest.is_empty(),
            "{}: after {last_packet}: {rest:?}",
            self.name
        );
        assert_eq!(
            end, "EOF",
            "{}: the end of the stream after {last_packet}",
            self.name
        );
        packets
    }

    /// Every packet until the broker closes the connection, and how it closed: "EOF" for a
    /// clean end of the stream, else the error (a reset, say).
    pub async fn read_to_end(&mut self) -> (Vec<Packet>, String) {
        let mut packets: Vec<Packet> = self.pending.drain(..).collect();
        loop {
            match self.read_event(WAIT).await {
                Event::Packet(p) => packets.push(p),
                Event::Closed(how) => return (packets, how),
                Event::Timeout => panic!(
                    "{}: still open after {WAIT:?}, having sent {packets:?}",
                    self.name
                ),
            }
        }
    }

    /// Asserts that the broker sends DISCONNECT with reason `code` (within `timeout`) and
    /// then closes the connection; returns the DISCONNECT.
    pub async fn expect_disconnect_within(
        &mut self,
        code: ReasonCode,
        timeout: Duration,
    ) -> Disconnect {
        let d = match self.next_event(timeout).await {
            Event::Packet(Packet::Disconnect(d)) => d,
            Event::Packet(p) => panic!("{}: expected DISCONNECT {code:?}, got {p:?}", self.name),
            Event::Timeout => panic!(
                "{}: expected DISCONNECT {code:?} within {timeout:?}, got nothing",
                self.name
            ),
            Event::Closed(why) => panic!(
                "{}: expected DISCONNECT {code:?}, the connection closed without one ({why})",
                self.name
            ),
        };
        assert_eq!(
            d.reason, code,
            "{}: DISCONNECT reason code (got {d:?})",
            self.name
        );
        self.expect_closed(WAIT).await;
        d
    }

    pub async fn expect_disconnect(&mut self, code: ReasonCode) -> Disconnect {
        self.expect_disconnect_within(code, WAIT).await
    }

    /// PINGREQ, and everything the broker sends before the PINGRESP.
    pub async fn ping(&mut self) -> Vec<Packet> {
        let mut before: Vec<Packet> = self.pending.drain(..).collect();
        self.send(Packet::PingReq).await;
        loop {
            match self.read_event(WAIT).await {
                Event::Packet(Packet::PingResp) => return before,
                Event::Packet(p) => before.push(p),
                Event::Timeout => panic!("{}: no PINGRESP within {WAIT:?}", self.name),
                Event::Closed(why) => panic!("{}: closed ({why}) waiting for PINGRESP", self.name),
            }
        }
    }

    /// Asserts that the broker has nothing (more) to send to this client.
    pub async fn expect_quiet(&mut self, context: &str) {
        let extra = self.ping().await;
        assert!(
            extra.is_empty(),
            "{}: expected nothing more {context}, got {extra:?}",
            self.name
        );
    }

    /// A ping round trip: the broker has handled everything sent before. What arrived
    /// meanwhile is kept for the next reads.
    pub async fn barrier(&mut self) {
        let got = self.ping().await;
        self.pending.extend(got);
    }

    // -----------------------------------------------------------------------------------
    // SUBSCRIBE / UNSUBSCRIBE
    // -----------------------------------------------------------------------------------

    /// SUBSCRIBE; returns the SUBACK's reason codes.
    pub async fn subscribe_with(
        &mut self,
        filters: Vec<SubscribeFilter>,
        properties: Properties,
    ) -> Vec<ReasonCode> {
        let pkid = self.pkid();
        self.send(Packet::Subscribe(Subscribe {
            pkid,
            filters,
            properties,
        }))
        .await;
        match self
            .wait_for(
                "SUBACK",
                |p| matches!(p, Packet::SubAck(a) if a.pkid == pkid),
            )
            .await
        {
            Packet::SubAck(a) => a.codes,
            _ => unreachable!(),
        }
    }

    /// SUBSCRIBE to each filter at its QoS (default options, no properties); returns the
    /// SUBACK's return codes.
    pub async fn subscribe_qos(&mut self, filters: &[(&str, QoS)]) -> Vec<u8> {
        let filters = filters.iter().map(|&(f, q)| filter(f, opts(q))).collect();
        let codes = self.subscribe_with(filters, Properties::default()).await;
        codes.into_iter().map(u8::from).collect()
    }

    /// Subscribes and asserts that every filter is granted the QoS asked for.
    pub async fn subscribe_ok(&mut self, filters: &[(&str, QoS)]) {
        let codes = self.subscribe_qos(filters).await;
        let wanted: Vec<u8> = filters.iter().map(|(_, q)| *q as u8).collect();
        assert_eq!(codes, wanted, "{}: SUBACK codes for {filters:?}", self.name);
    }

    /// Subscribes to one filter and asserts that it is granted the QoS asked for.
    pub async fn subscribe_opts(&mut self, f: &str, options: SubOptions, properties: Properties) {
        let codes = self
            .subscribe_with(vec![filter(f, options)], properties)
            .await;
        assert_eq!(
            codes,
            [ReasonCode::granted(options.qos)],
            "{}: SUBACK reason code for {f}",
            self.name
        );
    }

    pub async fn subscribe(&mut self, f: &str, qos: QoS) {
        self.subscribe_opts(f, opts(qos), Properties::default())
            .await;
    }

    pub async fn unsubscribe(&mut self, filters: &[&str]) -> Vec<ReasonCode> {
        let pkid = self.pkid();
        self.send(Packet::Unsubscribe(Unsubscribe {
            pkid,
            filters: filters.iter().map(|f| ByteStr::from(*f)).collect(),
            properties: Properties::default(),
        }))
        .await;
        match self
            .wait_for(
                "UNSUBACK",
                |p| matches!(p, Packet::UnsubAck(a) if a.pkid == pkid),
            )
            .await
        {
            Packet::UnsubAck(a) => a.codes,
            _ => unreachable!(),
        }
    }

    // -----------------------------------------------------------------------------------
    // PUBLISH flows, 3.1.1 flavour: the first ack of its kind, exactly the bare one
    // -----------------------------------------------------------------------------------

    /// Publishes and completes the QoS flow (for QoS 0, a ping round trip, so that the
    /// broker has routed the message when this returns). Asserts that each ack is exactly
    /// the 3.1.1 ack of the packet id.
    pub async fn publish_v311(&mut self, topic: &str, payload: &[u8], qos: QoS, retain: bool) {
        let pkid = if qos == QoS::AtMostOnce {
            0
        } else {
            self.pkid()
        };
        let packet = publish_packet(topic, payload, qos, retain, pkid);
        self.send(Packet::Publish(packet)).await;
        match qos {
            QoS::AtMostOnce => self.barrier().await,
            QoS::AtLeastOnce => {
                let puback = self
                    .wait_for("PUBACK", |p| matches!(p, Packet::PubAck(_)))
                    .await;
                assert_eq!(puback, Packet::PubAck(ack(pkid)), "{}: PUBACK", self.name);
            }
            QoS::ExactlyOnce => {
                let pubrec = self
                    .wait_for("PUBREC", |p| matches!(p, Packet::PubRec(_)))
                    .await;
                assert_eq!(pubrec, Packet::PubRec(ack(pkid)), "{}: PUBREC", self.name);
                self.send(Packet::PubRel(ack(pkid))).await;
                let pubcomp = self
                    .wait_for("PUBCOMP", |p| matches!(p, Packet::PubComp(_)))
                    .await;
                assert_eq!(
                    pubcomp,
                    Packet::PubComp(ack(pkid)),
                    "{}: PUBCOMP",
                    self.name
                );
            }
        }
    }

    /// Acknowledges a received PUBLISH, completing the QoS 2 flow; asserts that a QoS 0
    /// message has no packet id and that the PUBREL is exactly the 3.1.1 one.
    pub async fn acknowledge_v311(&mut self, p: &Publish) {
        match p.qos {
            QoS::AtMostOnce => assert_eq!(p.pkid, 0, "{}: QoS 0 has no packet id", self.name),
            QoS::AtLeastOnce => self.send(Packet::PubAck(ack(p.pkid))).await,
            QoS::ExactlyOnce => {
                self.send(Packet::PubRec(ack(p.pkid))).await;
                let pubrel = self
                    .wait_for("PUBREL", |p| matches!(p, Packet::PubRel(_)))
                    .await;
                assert_eq!(pubrel, Packet::PubRel(ack(p.pkid)), "{}: PUBREL", self.name);
                self.send(Packet::PubComp(ack(p.pkid))).await;
            }
        }
    }

    /// The next PUBLISH, acknowledged with `acknowledge_v311`.
    pub async fn receive_v311(&mut self) -> Publish {
        let p = self.expect_publish().await;
        self.acknowledge_v311(&p).await;
        p
    }

    // -----------------------------------------------------------------------------------
    // PUBLISH flows, 5.0 flavour: acks matched by packet id, reason codes returned
    // -----------------------------------------------------------------------------------

    /// Sends `p` (with a fresh packet id for QoS 1 and 2) and completes its flow. Returns
    /// the reason code of the PUBACK or PUBREC (0 for QoS 0, after a ping round trip so
    /// that the broker has routed the message when this returns).
    pub async fn publish(&mut self, mut p: Publish) -> ReasonCode {
        if p.qos != QoS::AtMostOnce {
            p.pkid = self.pkid();
        }
        let (qos, pkid) = (p.qos, p.pkid);
        self.send(Packet::Publish(p)).await;
        match qos {
            QoS::AtMostOnce => {
                self.barrier().await;
                ReasonCode::Success
            }
            QoS::AtLeastOnce => {
                match self
                    .wait_for(
                        "PUBACK",
                        |p| matches!(p, Packet::PubAck(a) if a.pkid == pkid),
                    )
                    .await
                {
                    Packet::PubAck(a) => a.reason,
                    _ => unreachable!(),
                }
            }
            QoS::ExactlyOnce => {
                let code = match self
                    .wait_for(
                        "PUBREC",
                        |p| matches!(p, Packet::PubRec(a) if a.pkid == pkid),
                    )
                    .await
                {
                    Packet::PubRec(a) => a.reason,
                    _ => unreachable!(),
                };
                if !code.is_error() {
                    self.send(Packet::PubRel(ack(pkid))).await;
                    let comp = self
                        .wait_for(
                            "PUBCOMP",
                            |p| matches!(p, Packet::PubComp(a) if a.pkid == pkid),
                        )
                        .await;
                    assert_eq!(comp, Packet::PubComp(ack(pkid)), "{}: PUBCOMP", self.name);
                }
                code
            }
        }
    }

    /// Publishes and asserts the ack's reason code.
    pub async fn publish_expect(&mut self, p: Publish, code: ReasonCode) {
        let topic = p.topic.to_string();
        let got = self.publish(p).await;
        assert_eq!(
            got, code,
            "{}: ack reason code for a PUBLISH to {topic}",
            self.name
        );
    }

    /// Acknowledges a received PUBLISH, completing the QoS 2 flow (the PUBREL with its
    /// packet id, whatever its reason code).
    pub async fn acknowledge(&mut self, p: &Publish) {
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.send(Packet::PubAck(ack(p.pkid))).await,
            QoS::ExactlyOnce => {
                self.send(Packet::PubRec(ack(p.pkid))).await;
                let pkid = p.pkid;
                self.wait_for(
                    "PUBREL",
                    |p| matches!(p, Packet::PubRel(a) if a.pkid == pkid),
                )
                .await;
                self.send(Packet::PubComp(ack(p.pkid))).await;
            }
        }
    }

    /// The next PUBLISH, acknowledged with `acknowledge`.
    pub async fn receive(&mut self) -> Publish {
        let p = self.expect_publish().await;
        self.acknowledge(&p).await;
        p
    }

    /// Everything the broker has for this client now (see the module doc), each PUBLISH
    /// acknowledged with `acknowledge`; panics on anything but PUBLISH.
    pub async fn drain_publishes(&mut self) -> Vec<Publish> {
        let mut out = Vec::new();
        for packet in self.ping().await {
            match packet {
                Packet::Publish(p) => {
                    self.acknowledge(&p).await;
                    out.push(p);
                }
                other => panic!("{}: expected only PUBLISH, got {other:?}", self.name),
            }
        }
        out
    }

    // -----------------------------------------------------------------------------------
    // DISCONNECT
    // -----------------------------------------------------------------------------------

    /// DISCONNECT with `reason` and `properties`; waits for the broker to close.
    pub async fn disconnect_with(mut self, reason: ReasonCode, properties: Properties) {
        self.send(Packet::Disconnect(Disconnect { reason, properties }))
            .await;
        self.expect_closed(WAIT).await;
    }

    /// A normal DISCONNECT (0x00, no properties: the 3.1.1 one too); waits for the broker
    /// to close.
    pub async fn disconnect(self) {
        self.disconnect_with(ReasonCode::Success, Properties::default())
            .await;
    }
}
