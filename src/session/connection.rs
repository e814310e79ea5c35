//! One client connection: the CONNECT handshake, then one task that reads and decodes
//! packets, acts on them, and writes what its session's queue holds.
//!
//! The task never blocks on the socket in one direction while the other has work: a
//! single `select!` waits for bytes to read, room to write, a wake-up from a publisher,
//! the keep-alive deadline and shutdown.

use crate::auth::AuthStep;
use crate::broker::Broker;
use crate::metrics;
use crate::protocol::{
    self, connack_v3, reason, topic, Ack, Auth, ByteStr, ConnAck, Connect, Disconnect, Packet,
    Protocol, Publish, QoS, SubAck, Subscribe, UnsubAck, Unsubscribe,
};
use crate::router::{
    is_shared, valid_subscription, within_levels, Delivery, DeliveryHeader, Message,
};
use crate::session::{Link, NotOwner, Session, SessionState, Stage, NEVER_EXPIRE};
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::time::{sleep_until, Instant};
use tracing::{debug, info, warn, Instrument};

/// Stop moving messages from the session queue into the write buffer past this: the
/// rest waits in the (bounded) queue until the socket drains.
const WRITE_HIGH_WATER: usize = 64 * 1024;
/// Messages taken from the session queue per lock.
const BATCH: usize = 64;
/// Read buffers start small so that idle connections cost little, and grow under load.
const MIN_READ: usize = 64;
const MAX_READ: usize = 64 * 1024;
/// A read at least this large yields to the tasks it woke (see `Conn::run`).
const YIELD_AFTER_READ: usize = 4096;
/// How long a closing connection may spend flushing its last packets.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

/// Serves one connection until it ends. Never fails: every problem closes this
/// connection only, and is logged with its reason.
///
/// The returned future is the connection task's state for its whole life, so it is
/// kept small: the handshake and the close, large and short-lived, are boxed.
pub fn serve<'a, R, W>(
    broker: &'a Arc<Broker>,
    reader: R,
    writer: W,
    peer: SocketAddr,
) -> impl Future<Output = ()> + Send + 'a
where
    R: AsyncRead + Unpin + Send + 'a,
    W: AsyncWrite + Unpin + Send + 'a,
{
    let span = tracing::info_span!("conn", %peer, client_id = tracing::field::Empty);
    let mut io = Io {
        reader,
        writer,
        rbuf: BytesMut::new(),
        wbuf: BytesMut::new(),
        read_size: MIN_READ,
    };
    async move {
        let _count = metrics::connection();
        let Some(connect) = Box::pin(read_connect(broker, &mut io)).await else {
            return;
        };
        let Some(mut conn) = Box::pin(Conn::accept(broker, connect, &mut io)).await else {
            return;
        };
        let exit = conn.run(&mut io).await;
        Box::pin(conn.close(exit, &mut io)).await;
    }
    .instrument(span)
}

/// Waits for the CONNECT (within the connect timeout); answers a bad one and returns None.
async fn read_connect<R, W>(broker: &Broker, io: &mut Io<R, W>) -> Option<Box<Connect>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let max = broker.config.mqtt.max_packet_size;
    let first = tokio::select! {
        _ = broker.shutdown.cancelled() => return None,
        r = tokio::time::timeout(broker.config.mqtt.connect_timeout(), io.read_packet(Protocol::V311, max)) => r,
    };
    match first {
        Err(_) => debug!("no CONNECT within the connect timeout; closing"),
        Ok(Ok(Some(Packet::Connect(c)))) => return Some(c),
        Ok(Ok(Some(_))) => warn!("first packet is not CONNECT; closing"),
        Ok(Ok(None)) => debug!("closed before CONNECT"),
        Ok(Err(e)) => {
            warn!("bad CONNECT: {e}");
            if let protocol::Error::UnsupportedProtocol { .. } = e {
                // Both 3.x and 5.0 clients understand a 3.1.1 CONNACK with code 1 here.
                let ack = ConnAck {
                    code: connack_v3::UNACCEPTABLE_PROTOCOL_VERSION,
                    ..ConnAck::default()
                };
                io.send_and_close(Packet::ConnAck(ack), Protocol::V311)
                    .await;
            }
        }
    }
    None
}

/// The byte side of a connection: the socket halves and their buffers.
struct Io<R, W> {
    reader: R,
    writer: W,
    rbuf: BytesMut,
    wbuf: BytesMut,
    read_size: usize,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Io<R, W> {
    /// Reads one whole packet (None if the peer closed), for the handshake phase.
    async fn read_packet(
        &mut self,
        protocol: Protocol,
        max: usize,
    ) -> Result<Option<Packet>, protocol::Error> {
        loop {
            if let Some(packet) = protocol::decode(&mut self.rbuf, protocol, max)? {
                return Ok(Some(packet));
            }
            self.rbuf.reserve(MIN_READ);
            match self.reader.read_buf(&mut self.rbuf).await {
                Ok(0) | Err(_) => return Ok(None),
                Ok(_) => {}
            }
        }
    }

    /// Makes room for the next read: a little when idle, more while data streams in.
    fn prepare_read(&mut self) {
        if self.rbuf.capacity() - self.rbuf.len() < self.read_size / 2 {
            self.rbuf.reserve(self.read_size);
        }
    }

    /// Adapts the read size to the last read: grow when it filled the buffer, and give
    /// the memory back when the connection goes quiet.
    fn after_read(&mut self, n: usize, spare: usize) {
        if n == spare {
            self.read_size = (self.read_size * 2).min(MAX_READ);
        } else if n < MIN_READ && self.rbuf.is_empty() && self.rbuf.capacity() > 4 * MIN_READ {
            self.rbuf = BytesMut::new();
            self.read_size = MIN_READ;
        }
    }

    fn after_write(&mut self) {
        if self.wbuf.is_empty() && self.wbuf.capacity() > 16 * 1024 {
            self.wbuf = BytesMut::new();
        }
    }

    /// Best effort: queue `packet` behind what is pending, flush, and let the caller close.
    async fn send_and_close(&mut self, packet: Packet, protocol: Protocol) {
        if let Err(e) = protocol::encode(&packet, protocol, &mut self.wbuf) {
            warn!("cannot encode {}: {e}", packet.name());
        }
        self.flush_and_close().await;
    }

    /// Best effort: flush what is pending and shut the write side down.
    async fn flush_and_close(&mut self) {
        let flush = async {
            self.writer.write_all_buf(&mut self.wbuf).await?;
            self.writer.shutdown().await
        };
        let _ = tokio::time::timeout(CLOSE_FLUSH, flush).await;
    }
}

/// Why a connection ended.
#[derive(Debug)]
enum Exit {
    /// DISCONNECT from the client; `true` if it asked for its will anyway (5.0 0x04).
    Disconnect {
        will: bool,
    },
    /// The socket closed or failed without a DISCONNECT.
    Closed,
    /// A protocol violation by the client; answered in 5.0 with this reason code.
    Violation(u8, String),
    KeepAliveTimeout,
    TakenOver,
    Shutdown,
}

/// A connection after a successful CONNECT.
struct Conn<'a> {
    broker: &'a Arc<Broker>,
    session: Arc<Session>,
    conn_id: u64,
    protocol: Protocol,
    keep_alive: Option<Duration>,
    /// Kept behind a pointer: most connections have none, and this struct lives as long.
    will: Option<Arc<Message>>,
    /// 5.0 Will Delay Interval, seconds.
    will_delay: u32,
    /// The session expiry asked for at CONNECT (a DISCONNECT may not raise it from 0).
    connect_expiry: u32,
    /// Outbound window: our limit, lowered to the client's Receive Maximum (5.0).
    max_inflight: usize,
    /// The client's Maximum Packet Size (5.0): larger messages are not sent to it.
    client_max_packet: usize,
    /// Inbound topic aliases set by the client on this connection (5.0).
    aliases: HashMap<u16, ByteStr>,
    /// The client wants reason strings (5.0 Request Problem Information).
    problem_info: bool,
    wake: Arc<Notify>,
    /// Reused between drains of the session queue.
    batch: Vec<(Delivery, u16)>,
}

impl<'a> Conn<'a> {
    /// Validates the CONNECT, opens the session and queues the CONNACK. On refusal,
    /// answers with the CONNACK code and returns None.
    async fn accept<R, W>(
        broker: &'a Arc<Broker>,
        connect: Box<Connect>,
        io: &mut Io<R, W>,
    ) -> Option<Conn<'a>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        // Unboxed here, inside this short-lived future: the box must not outlive accept.
        let connect = *connect;
        let cfg = &broker.config.mqtt;
        let protocol = connect.protocol;
        let v5 = protocol.is_v5();
        let props = &connect.properties;
        let refuse = |v3: u8, v5code: u8| {
            Packet::ConnAck(ConnAck {
                code: if v5 { v5code } else { v3 },
                ..ConnAck::default()
            })
        };

        let mut client_id = ByteStr::from(connect.client_id.as_str());
        let refused = if client_id.is_empty() {
            // 3.1 requires an id; 3.1.1 allows an empty one only with clean session.
            let allowed = cfg.allow_zero_length_clientid
                && protocol != Protocol::V31
                && (connect.clean_start || v5);
            if allowed {
                client_id = assign_client_id(broker);
                None
            } else {
                Some("empty client id")
            }
        } else if protocol == Protocol::V31 && client_id.len() > 23 {
            Some("MQTT 3.1 client id longer than 23 characters")
        } else {
            None
        };
        if let Some(why) = refused {
            info!("refused: {why}");
            let ack = refuse(
                connack_v3::IDENTIFIER_REJECTED,
                reason::CLIENT_IDENTIFIER_NOT_VALID,
            );
            io.send_and_close(ack, protocol).await;
            return None;
        }
        tracing::Span::current().record("client_id", client_id.as_str());

        let mut auth_done = None;
        if let Some(method) = &props.authentication_method {
            let data = props.authentication_data.clone();
            match authenticate(broker, method, &client_id, data, io).await {
                Ok(data) => auth_done = Some((method.clone(), data)),
                Err(code) => {
                    info!(method = %method, code, "refused: enhanced authentication");
                    io.send_and_close(refuse(connack_v3::NOT_AUTHORIZED, code), protocol)
                        .await;
                    return None;
                }
            }
        }

        let mut will_delay = 0;
        let will = match connect.will {
            None => None,
            Some(w) if topic::valid_topic_name(&w.topic) && within_levels(&w.topic) => {
                will_delay = w.properties.will_delay_interval.unwrap_or(0);
                let mut wp = w.properties;
                wp.will_delay_interval = None;
                let wp = (!wp.is_empty()).then(|| Box::new(wp));
                Some(Arc::new(Message::new(
                    ByteStr::from(w.topic.as_str()),
                    Bytes::copy_from_slice(&w.payload),
                    w.qos,
                    w.retain,
                    wp,
                    0,
                )))
            }
            Some(_) => {
                info!("refused: invalid will topic");
                let ack = refuse(connack_v3::NOT_AUTHORIZED, reason::TOPIC_NAME_INVALID);
                io.send_and_close(ack, protocol).await;
                return None;
            }
        };
        if let Some(w) = &will {
            let code = if w.retain && !cfg.retain_available {
                Some(reason::RETAIN_NOT_SUPPORTED)
            } else if w.qos as u8 > cfg.max_qos {
                Some(reason::QOS_NOT_SUPPORTED)
            } else {
                None
            };
            if let Some(code) = code {
                info!("refused: will needs retain or a QoS the server does not offer");
                io.send_and_close(refuse(connack_v3::NOT_AUTHORIZED, code), protocol)
                    .await;
                return None;
            }
        }

        // 3.x: clean session means the session ends with the connection; otherwise it
        // lasts until discarded. 5.0: the client says how long, within our maximum.
        let asked_expiry = if v5 {
            props.session_expiry_interval.unwrap_or(0)
        } else if connect.clean_start {
            0
        } else {
            NEVER_EXPIRE
        };
        let expiry = asked_expiry.min(cfg.max_session_expiry_interval);
        let mut keep_alive = connect.keep_alive;
        let server_keep_alive =
            (v5 && cfg.max_keepalive > 0 && (keep_alive == 0 || keep_alive > cfg.max_keepalive))
                .then_some(cfg.max_keepalive);
        if let Some(k) = server_keep_alive {
            keep_alive = k;
        }

        let conn_id = broker.next_id();
        let wake = Arc::new(Notify::new());
        let link = Link {
            conn_id,
            wake: wake.clone(),
        };
        let (session, present) = broker.open_session(&client_id, connect.clean_start, expiry, link);
        info!(
            protocol = protocol.level(),
            clean = connect.clean_start,
            keep_alive,
            resumed = present,
            "connected"
        );

        let limits = session.limits();
        let mut conn = Conn {
            broker,
            session,
            conn_id,
            protocol,
            keep_alive: (keep_alive > 0)
                .then(|| Duration::from_millis(u64::from(keep_alive) * 1500)),
            will,
            will_delay,
            connect_expiry: asked_expiry,
            max_inflight: props.receive_maximum.map_or(limits.max_inflight, |r| {
                limits.max_inflight.min(usize::from(r))
            }),
            client_max_packet: props.maximum_packet_size.map_or(usize::MAX, |m| m as usize),
            aliases: HashMap::new(),
            problem_info: props.request_problem_information != Some(0),
            wake,
            batch: Vec::new(),
        };
        let mut ack = ConnAck {
            session_present: present,
            code: 0,
            ..ConnAck::default()
        };
        if v5 {
            let p = &mut ack.properties;
            if connect.client_id.is_empty() {
                p.assigned_client_identifier = Some(client_id);
            }
            if expiry != asked_expiry {
                p.session_expiry_interval = Some(expiry);
            }
            p.server_keep_alive = server_keep_alive;
            p.receive_maximum = (cfg.receive_maximum != u16::MAX).then_some(cfg.receive_maximum);
            p.maximum_packet_size = (cfg.max_packet_size < protocol::MAX_REMAINING_LENGTH + 5)
                .then_some(cfg.max_packet_size as u32);
            p.topic_alias_maximum =
                (cfg.topic_alias_maximum > 0).then_some(cfg.topic_alias_maximum);
            p.maximum_qos = (cfg.max_qos < 2).then_some(cfg.max_qos);
            p.retain_available = Some(u8::from(cfg.retain_available));
            p.wildcard_subscription_available = Some(u8::from(cfg.wildcard_subscription_available));
            p.subscription_identifiers_available =
                Some(u8::from(cfg.subscription_identifiers_available));
            p.shared_subscription_available = Some(u8::from(cfg.shared_subscription_available));
            if let Some((method, data)) = auth_done {
                p.authentication_method = Some(method);
                p.authentication_data = data;
            }
        }
        conn.send(&mut io.wbuf, Packet::ConnAck(ack));
        if present {
            // Resend what was in flight when the last connection ended [MQTT-4.4.0-1].
            if conn.resend_inflight(&mut io.wbuf).is_err() {
                return None;
            }
        }
        Some(conn)
    }

    /// The connection's event loop; returns why it ended.
    async fn run<R, W>(&mut self, io: &mut Io<R, W>) -> Exit
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let broker = self.broker;
        let keep_alive = self.keep_alive;
        let mut last_packet = Instant::now();
        let far_future = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        let deadline = sleep_until(keep_alive.map_or(far_future, |k| last_packet + k));
        tokio::pin!(deadline);
        let wake = self.wake.clone();
        // Clients may send packets right behind CONNECT, before the CONNACK: they are
        // in the buffer already.
        if let Some(exit) = self.on_bytes(io) {
            return exit;
        }
        loop {
            // Shutdown wakes every connection (`Broker::begin_shutdown`) rather than
            // being one more future in the select: this future lives as long as the
            // connection, and each byte of it counts per idle client.
            if broker.shutdown.is_cancelled() {
                return Exit::Shutdown;
            }
            if io.wbuf.len() < WRITE_HIGH_WATER && self.pull(&mut io.wbuf).is_err() {
                return Exit::TakenOver;
            }
            io.prepare_read();
            let spare = io.rbuf.capacity() - io.rbuf.len();
            // A client that does not read what it asks for (acks, PINGRESPs) is not read
            // either until its answers drain: TCP backpressure instead of a growing buffer.
            let can_read = io.wbuf.len() < WRITE_HIGH_WATER;
            // Reading comes before writing: acknowledgements already waiting free more of
            // the in-flight window first, so the next write carries a larger batch (fewer
            // system calls for the broker and the client alike).
            tokio::select! {
                biased;
                _ = wake.notified() => {
                    // Checked here too: with a full write buffer `pull` is not called.
                    if !self.session.is_owned_by(self.conn_id) {
                        return Exit::TakenOver;
                    }
                }
                read = io.reader.read_buf(&mut io.rbuf), if can_read => {
                    let n = match read {
                        Ok(0) | Err(_) => return Exit::Closed,
                        Ok(n) => n,
                    };
                    last_packet = Instant::now();
                    if let Some(exit) = self.on_bytes(io) {
                        return exit;
                    }
                    io.after_read(n, spare);
                    // After a large read, the subscribers just woken may sit in this
                    // worker's run queue (tokio's LIFO slot cannot be stolen): let them
                    // drain their queues before this publisher routes its next read, or a
                    // burst overflows even fast subscribers' queues. A small read needs
                    // no yield: the task is about to wait for the socket anyway.
                    if n >= YIELD_AFTER_READ {
                        tokio::task::yield_now().await;
                    }
                }
                written = io.writer.write_buf(&mut io.wbuf), if !io.wbuf.is_empty() => {
                    match written {
                        Ok(0) | Err(_) => return Exit::Closed,
                        Ok(_) => io.after_write(),
                    }
                }
                _ = &mut deadline => {
                    let Some(k) = keep_alive else { continue };
                    if Instant::now() >= last_packet + k {
                        return Exit::KeepAliveTimeout;
                    }
                    // Moved lazily: resetting the timer on every packet would cost more.
                    deadline.as_mut().reset(last_packet + k);
                }
            }
        }
    }

    /// Decodes and handles every complete packet in the read buffer.
    fn on_bytes<R, W>(&mut self, io: &mut Io<R, W>) -> Option<Exit> {
        let max = self.broker.config.mqtt.max_packet_size;
        loop {
            match protocol::decode(&mut io.rbuf, self.protocol, max) {
                Ok(Some(packet)) => {
                    if let Err(exit) = self.handle(packet, &mut io.wbuf) {
                        return Some(exit);
                    }
                }
                Ok(None) => return None,
                Err(e) => return Some(Exit::Violation(e.reason_code(), e.to_string())),
            }
        }
    }

    fn handle(&mut self, packet: Packet, out: &mut BytesMut) -> Result<(), Exit> {
        match packet {
            Packet::Publish(p) => self.on_publish(p, out),
            Packet::PubAck(a) => self.owned(|s| s.complete(a.pkid, false)).map(|_| ()),
            Packet::PubRec(a) => {
                let known = self.owned(|s| s.received(a.pkid))?;
                self.send(out, Packet::PubRel(self.ack(a.pkid, known)));
                Ok(())
            }
            Packet::PubRel(a) => {
                let known = self.owned(|s| s.inbound_qos2.remove(&a.pkid))?;
                self.send(out, Packet::PubComp(self.ack(a.pkid, known)));
                Ok(())
            }
            Packet::PubComp(a) => self.owned(|s| s.complete(a.pkid, true)).map(|_| ()),
            Packet::Subscribe(s) => self.on_subscribe(s, out),
            Packet::Unsubscribe(u) => self.on_unsubscribe(u, out),
            Packet::PingReq => {
                self.send(out, Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect(d) => self.on_disconnect(d),
            Packet::Connect(_) => Err(violation(reason::PROTOCOL_ERROR, "second CONNECT")),
            Packet::Auth(_) => Err(violation(
                reason::PROTOCOL_ERROR,
                "AUTH without an authentication method",
            )),
            other => Err(violation(
                reason::PROTOCOL_ERROR,
                format!("{} is not sent by clients", other.name()),
            )),
        }
    }

    fn on_publish(&mut self, mut p: Publish, out: &mut BytesMut) -> Result<(), Exit> {
        metrics::received();
        let cfg = &self.broker.config.mqtt;
        if let Some(props) = p.properties.as_deref_mut() {
            self.resolve_alias(&mut p.topic, props)?;
            if !props.subscription_identifiers.is_empty() {
                return Err(violation(
                    reason::PROTOCOL_ERROR,
                    "PUBLISH from a client carries a subscription identifier",
                ));
            }
        }
        if p.properties.as_ref().is_some_and(|props| props.is_empty()) {
            p.properties = None;
        }
        if p.topic.is_empty() {
            return Err(violation(reason::PROTOCOL_ERROR, "PUBLISH without a topic"));
        }
        if !within_levels(&p.topic) {
            return Err(violation(
                reason::TOPIC_NAME_INVALID,
                "topic has too many levels",
            ));
        }
        if p.retain && !cfg.retain_available {
            return Err(violation(
                reason::RETAIN_NOT_SUPPORTED,
                "retain is not available",
            ));
        }
        if p.qos as u8 > cfg.max_qos {
            return Err(violation(
                reason::QOS_NOT_SUPPORTED,
                "QoS above the server maximum",
            ));
        }
        let utf8_claimed = p
            .properties
            .as_ref()
            .is_some_and(|props| props.payload_format_indicator == Some(1));
        if utf8_claimed && std::str::from_utf8(&p.payload).is_err() {
            // The standard lets the server refuse it [MQTT-3.3.2-4]: 0x99 in the ack, or
            // a DISCONNECT for QoS 0 which has no ack.
            if p.qos == QoS::AtMostOnce {
                return Err(violation(
                    reason::PAYLOAD_FORMAT_INVALID,
                    "payload is not UTF-8",
                ));
            }
            let ack = self.ack_with(
                p.pkid,
                reason::PAYLOAD_FORMAT_INVALID,
                "payload is not UTF-8",
            );
            let packet = if p.qos == QoS::AtLeastOnce {
                Packet::PubAck(ack)
            } else {
                Packet::PubRec(ack)
            };
            self.send(out, packet);
            return Ok(());
        }
        if p.qos == QoS::ExactlyOnce {
            // A resent QoS 2 PUBLISH (same id, before PUBREL) is acknowledged, not routed
            // again: this is what makes it exactly once.
            // Receive Maximum is announced to 5.0 clients only; a 3.x client cannot know
            // it, and its unreleased ids are bounded by the packet id space anyway.
            let receive_max = if self.protocol.is_v5() {
                usize::from(cfg.receive_maximum)
            } else {
                usize::MAX
            };
            let first = self.owned(|s| {
                if s.inbound_qos2.contains(&p.pkid) {
                    Ok(false)
                } else if s.inbound_qos2.len() >= receive_max {
                    Err(())
                } else {
                    s.inbound_qos2.insert(p.pkid);
                    Ok(true)
                }
            })?;
            match first {
                Ok(true) => {}
                Ok(false) => {
                    self.send(out, Packet::PubRec(self.ack(p.pkid, true)));
                    return Ok(());
                }
                Err(()) => {
                    return Err(violation(
                        reason::RECEIVE_MAXIMUM_EXCEEDED,
                        "more unreleased QoS 2 publishes than Receive Maximum",
                    ))
                }
            }
        }
        let (qos, pkid) = (p.qos, p.pkid);
        let message = Arc::new(Message::new(
            p.topic,
            p.payload,
            p.qos,
            p.retain,
            p.properties,
            self.session.id,
        ));
        if message.retain {
            self.broker.router.retain(&message);
        }
        let receivers = self.broker.router.publish(&message);
        let code = if receivers == 0 && self.protocol.is_v5() {
            reason::NO_MATCHING_SUBSCRIBERS
        } else {
            reason::SUCCESS
        };
        let ack = Ack {
            pkid,
            reason: code,
            ..Ack::default()
        };
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.send(out, Packet::PubAck(ack)),
            QoS::ExactlyOnce => self.send(out, Packet::PubRec(ack)),
        }
        Ok(())
    }

    /// 5.0 Topic Alias: a PUBLISH with a topic and an alias sets it; one with an empty
    /// topic uses it. The alias itself never leaves this connection.
    fn resolve_alias(
        &mut self,
        topic: &mut ByteStr,
        props: &mut protocol::Properties,
    ) -> Result<(), Exit> {
        let Some(alias) = props.topic_alias.take() else {
            return Ok(());
        };
        if alias == 0 || alias > self.broker.config.mqtt.topic_alias_maximum {
            return Err(violation(
                reason::TOPIC_ALIAS_INVALID,
                "topic alias out of range",
            ));
        }
        if topic.is_empty() {
            match self.aliases.get(&alias) {
                Some(t) => *topic = t.clone(),
                None => return Err(violation(reason::PROTOCOL_ERROR, "unknown topic alias")),
            }
        } else {
            // A copy, so the alias does not pin this packet's read buffer.
            self.aliases.insert(alias, ByteStr::from(topic.as_str()));
        }
        Ok(())
    }

    fn on_subscribe(&mut self, s: Subscribe, out: &mut BytesMut) -> Result<(), Exit> {
        let cfg = &self.broker.config.mqtt;
        let v5 = self.protocol.is_v5();
        let router = &self.broker.router;
        let sub_id = s.properties.subscription_identifiers.first().copied();
        if sub_id.is_some() && !cfg.subscription_identifiers_available {
            return Err(violation(
                reason::SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED,
                "subscription identifiers are not available",
            ));
        }
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut accepted = Vec::new();
        for f in &s.filters {
            let shared = is_shared(&f.filter);
            let refusal = if !valid_subscription(&f.filter) {
                Some(reason::TOPIC_FILTER_INVALID)
            } else if shared && !cfg.shared_subscription_available {
                Some(reason::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED)
            } else if !cfg.wildcard_subscription_available && f.filter.contains(['+', '#']) {
                Some(reason::WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED)
            } else {
                None
            };
            if let Some(code) = refusal {
                debug!(filter = %f.filter, "refused topic filter");
                codes.push(if v5 { code } else { 0x80 });
                continue;
            }
            if shared && f.options.no_local {
                return Err(violation(
                    reason::PROTOCOL_ERROR,
                    "No Local on a shared subscription",
                ));
            }
            let mut options = f.options;
            options.qos = options
                .qos
                .min(QoS::from_u8(cfg.max_qos).unwrap_or_default());
            let existed = router.subscribe(&f.filter, &self.session, options, sub_id);
            // Record it in the session, or undo it if the session was taken meanwhile.
            let filter = f.filter.clone();
            if self
                .owned(|st| st.subscriptions.insert(filter, options))
                .is_err()
            {
                router.unsubscribe(&f.filter, self.session.id);
                return Err(Exit::TakenOver);
            }
            debug!(filter = %f.filter, qos = ?options.qos, "subscribed");
            codes.push(options.qos as u8);
            // Retained messages are not sent for shared subscriptions (MQTT 5.0, 4.8.2).
            if !shared {
                accepted.push((&f.filter, options, existed));
            }
        }
        self.send(
            out,
            Packet::SubAck(SubAck {
                pkid: s.pkid,
                codes,
                ..SubAck::default()
            }),
        );
        // Retained messages follow the SUBACK: they go through the session queue, which is
        // written after it.
        for (filter, options, existed) in accepted {
            let wanted = match options.retain_handling {
                0 => true,
                1 => !existed,
                _ => false,
            };
            if !wanted {
                continue;
            }
            for message in router.retained_matching(filter) {
                let mut d = Delivery::new(message.clone(), message.qos.min(options.qos), true);
                d.sub_ids.extend(sub_id);
                self.session.deliver(d);
            }
        }
        Ok(())
    }

    fn on_unsubscribe(&mut self, u: Unsubscribe, out: &mut BytesMut) -> Result<(), Exit> {
        let mut codes = Vec::with_capacity(u.filters.len());
        for f in &u.filters {
            let existed = self.broker.router.unsubscribe(f, self.session.id);
            self.owned(|st| st.subscriptions.remove(f))?;
            codes.push(if existed {
                reason::SUCCESS
            } else {
                reason::NO_SUBSCRIPTION_EXISTED
            });
        }
        if !self.protocol.is_v5() {
            codes.clear();
        }
        self.send(
            out,
            Packet::UnsubAck(UnsubAck {
                pkid: u.pkid,
                codes,
                ..UnsubAck::default()
            }),
        );
        Ok(())
    }

    fn on_disconnect(&mut self, d: Disconnect) -> Result<(), Exit> {
        if let Some(expiry) = d.properties.session_expiry_interval {
            // A session that was to end with the connection cannot be kept now [MQTT-3.14.2-2].
            if self.connect_expiry == 0 && expiry != 0 {
                return Err(violation(
                    reason::PROTOCOL_ERROR,
                    "DISCONNECT sets a session expiry after CONNECT set none",
                ));
            }
            let expiry = expiry.min(self.broker.config.mqtt.max_session_expiry_interval);
            self.session.set_expiry(self.conn_id, expiry);
        }
        Err(Exit::Disconnect {
            will: d.reason == reason::DISCONNECT_WITH_WILL,
        })
    }

    /// Moves what the in-flight window allows from the session queue into `out`.
    fn pull(&mut self, out: &mut BytesMut) -> Result<(), NotOwner> {
        let max_inflight = self.max_inflight;
        loop {
            let mut batch = std::mem::take(&mut self.batch);
            self.session.with_state(self.conn_id, |s| {
                s.take_sendable(max_inflight, BATCH, &mut batch)
            })?;
            let n = batch.len();
            let mut too_large = Vec::new();
            for (d, pkid) in batch.drain(..) {
                let before = out.len();
                let header = DeliveryHeader {
                    dup: false,
                    qos: d.qos,
                    retain: d.retain,
                    pkid,
                    sub_ids: &d.sub_ids,
                };
                if let Err(e) = d.message.encode(out, self.protocol, &header) {
                    warn!(topic = %d.message.topic, "cannot encode PUBLISH: {e}");
                }
                if out.len() - before > self.client_max_packet {
                    // Larger than the client accepts: dropped as if delivered [MQTT-3.1.2-25].
                    out.truncate(before);
                    too_large.push(pkid);
                }
            }
            self.batch = batch;
            if !too_large.is_empty() {
                debug!(
                    count = too_large.len(),
                    "messages larger than the client's maximum packet size not sent"
                );
                self.session.with_state(self.conn_id, |s| {
                    for pkid in too_large.iter().filter(|p| **p != 0) {
                        s.forget(*pkid);
                    }
                })?;
            }
            metrics::sent(n as u64);
            if n < BATCH || out.len() >= WRITE_HIGH_WATER {
                return Ok(());
            }
        }
    }

    fn resend_inflight(&mut self, out: &mut BytesMut) -> Result<(), NotOwner> {
        let inflight = self.session.with_state(self.conn_id, |s| {
            s.inflight.iter().cloned().collect::<Vec<_>>()
        })?;
        for f in inflight {
            match f.stage {
                Stage::Publish(d) => {
                    let header = DeliveryHeader {
                        dup: true,
                        qos: d.qos,
                        retain: d.retain,
                        pkid: f.pkid,
                        sub_ids: &d.sub_ids,
                    };
                    if let Err(e) = d.message.encode(out, self.protocol, &header) {
                        warn!("cannot encode PUBLISH: {e}");
                    }
                }
                Stage::Release => self.send(out, Packet::PubRel(self.ack(f.pkid, true))),
            }
        }
        Ok(())
    }

    /// Runs `f` on the session state, or ends the connection if the session was taken.
    fn owned<T>(&self, f: impl FnOnce(&mut SessionState) -> T) -> Result<T, Exit> {
        self.session
            .with_state(self.conn_id, f)
            .map_err(|NotOwner| Exit::TakenOver)
    }

    /// An acknowledgement; in 5.0 an unknown packet id is reported as such.
    fn ack(&self, pkid: u16, known: bool) -> Ack {
        if known || !self.protocol.is_v5() {
            Ack {
                pkid,
                ..Ack::default()
            }
        } else {
            self.ack_with(
                pkid,
                reason::PACKET_IDENTIFIER_NOT_FOUND,
                "unknown packet identifier",
            )
        }
    }

    /// A 5.0 acknowledgement with a reason code, and a reason string if the client wants
    /// them.
    fn ack_with(&self, pkid: u16, code: u8, why: &'static str) -> Ack {
        let mut ack = Ack {
            pkid,
            reason: code,
            ..Ack::default()
        };
        if self.problem_info {
            ack.properties.reason_string = Some(ByteStr::from_static(why));
        }
        ack
    }

    /// Appends `packet` to `out`. A packet over the client's Maximum Packet Size loses
    /// its reason string and user properties [MQTT-3.4.2-2 and alike]; if it is still
    /// too large, it is not sent [MQTT-3.1.2-24].
    fn send(&self, out: &mut BytesMut, mut packet: Packet) {
        let before = out.len();
        if let Err(e) = protocol::encode(&packet, self.protocol, out) {
            warn!("cannot encode {}: {e}", packet.name());
            return;
        }
        if out.len() - before <= self.client_max_packet {
            return;
        }
        out.truncate(before);
        if let Some(props) = properties_mut(&mut packet) {
            props.reason_string = None;
            props.user_properties.clear();
            if protocol::encode(&packet, self.protocol, out).is_ok()
                && out.len() - before <= self.client_max_packet
            {
                return;
            }
            out.truncate(before);
        }
        debug!(
            "{} larger than the client's maximum packet size; not sent",
            packet.name()
        );
    }

    /// Ends the connection: will, session bookkeeping, a last DISCONNECT in 5.0.
    async fn close<R, W>(mut self, exit: Exit, io: &mut Io<R, W>)
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let (publish_will, disconnect) = match &exit {
            Exit::Disconnect { will } => {
                info!("disconnected");
                (*will, None)
            }
            Exit::Closed => {
                info!("connection closed without DISCONNECT");
                (true, None)
            }
            Exit::Violation(code, why) => {
                warn!("protocol violation: {why}; closing");
                (true, Some((*code, why.clone())))
            }
            Exit::KeepAliveTimeout => {
                info!("keep-alive timeout; closing");
                (
                    true,
                    Some((reason::KEEP_ALIVE_TIMEOUT, "keep-alive timeout".into())),
                )
            }
            Exit::TakenOver => {
                info!("session taken over by a new connection; closing");
                (
                    true,
                    Some((reason::SESSION_TAKEN_OVER, "session taken over".into())),
                )
            }
            Exit::Shutdown => (
                false,
                Some((reason::SERVER_SHUTTING_DOWN, "server shutting down".into())),
            ),
        };
        let will = self.will.take().filter(|_| publish_will);
        // A delayed will waits in the session; it is cancelled if the session resumes.
        let (will_now, will_later) = if self.will_delay > 0 {
            (None, will)
        } else {
            (will, None)
        };
        if let Some(will) = &will_now {
            self.broker.publish_will(will);
        }
        match self.session.detach(self.conn_id, will_later.clone()) {
            Some(detached) => {
                self.broker
                    .session_detached(&self.session, self.conn_id, detached, self.will_delay)
            }
            // Taken over. If the session ended with it (Clean Start), so does the delay
            // of the will; if it was resumed, the will is cancelled [MQTT-3.1.3-9].
            None if self.session.has_ended() => {
                if let Some(will) = &will_later {
                    self.broker.publish_will(will);
                }
            }
            None => {}
        }
        let dropped = self.session.dropped();
        if dropped > 0 {
            info!(
                dropped,
                "messages dropped for this session because its queue was full"
            );
        }
        match disconnect {
            Some((code, why)) if self.protocol.is_v5() => {
                let mut d = Disconnect {
                    reason: code,
                    ..Disconnect::default()
                };
                if self.problem_info {
                    d.properties.reason_string = Some(ByteStr::from(why));
                }
                self.send(&mut io.wbuf, Packet::Disconnect(d));
                io.flush_and_close().await;
            }
            _ => {
                let _ = tokio::time::timeout(CLOSE_FLUSH, io.writer.shutdown()).await;
            }
        }
    }
}

/// Runs an MQTT 5 enhanced authentication exchange during CONNECT. Returns the data
/// for the CONNACK, or the CONNACK reason code of the refusal.
async fn authenticate<R, W>(
    broker: &Broker,
    method: &ByteStr,
    client_id: &str,
    mut data: Option<Bytes>,
    io: &mut Io<R, W>,
) -> Result<Option<Bytes>, u8>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Some(m) = broker
        .auth_methods
        .iter()
        .find(|m| m.name() == method.as_str())
    else {
        return Err(reason::BAD_AUTHENTICATION_METHOD);
    };
    let mut exchange = m.begin(client_id);
    loop {
        let challenge = match exchange.step(data.as_deref()) {
            AuthStep::Success(data) => return Ok(data),
            AuthStep::Failure => return Err(reason::NOT_AUTHORIZED),
            AuthStep::Continue(challenge) => challenge,
        };
        let mut auth = Auth {
            reason: reason::CONTINUE_AUTHENTICATION,
            ..Auth::default()
        };
        auth.properties.authentication_method = Some(method.clone());
        auth.properties.authentication_data = Some(challenge);
        if protocol::encode(&Packet::Auth(auth), Protocol::V5, &mut io.wbuf).is_err()
            || io.writer.write_all_buf(&mut io.wbuf).await.is_err()
        {
            return Err(reason::UNSPECIFIED_ERROR);
        }
        let max = broker.config.mqtt.max_packet_size;
        let answer = tokio::time::timeout(
            broker.config.mqtt.connect_timeout(),
            io.read_packet(Protocol::V5, max),
        )
        .await;
        match answer {
            Ok(Ok(Some(Packet::Auth(a))))
                if a.reason == reason::CONTINUE_AUTHENTICATION
                    && a.properties.authentication_method.as_ref() == Some(method) =>
            {
                data = a.properties.authentication_data;
            }
            _ => return Err(reason::PROTOCOL_ERROR),
        }
    }
}

/// The properties of a packet the server sends with a reason code.
fn properties_mut(packet: &mut Packet) -> Option<&mut protocol::Properties> {
    match packet {
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            Some(&mut a.properties)
        }
        Packet::SubAck(a) => Some(&mut a.properties),
        Packet::UnsubAck(a) => Some(&mut a.properties),
        Packet::Disconnect(d) => Some(&mut d.properties),
        _ => None,
    }
}

fn violation(code: u8, why: impl Into<String>) -> Exit {
    Exit::Violation(code, why.into())
}

/// An id for a client that sent none, in mosquitto's style ("auto-" and random hex).
fn assign_client_id(broker: &Broker) -> ByteStr {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(broker.next_id());
    ByteStr::from(format!("auto-{:016x}", h.finish()))
}
