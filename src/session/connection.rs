//! One client connection: the CONNECT handshake, then one task that reads and decodes
//! packets, acts on them, and writes what its session's queue holds.
//!
//! The task never blocks on the socket in one direction while the other has work: a
//! single `select!` waits for bytes to read, room to write, a wake-up from a publisher,
//! the keep-alive deadline and shutdown.

use crate::broker::Broker;
use crate::metrics;
use crate::protocol::{
    self, connack_v3, reason, topic, Ack, ByteStr, ConnAck, Connect, Disconnect, Packet,
    Protocol, Publish, QoS, SubAck, Subscribe, UnsubAck, Unsubscribe,
};
use crate::router::{Delivery, DeliveryHeader, Message, MAX_TOPIC_LEVELS};
use crate::session::{Link, NotOwner, Session, Stage};
use bytes::{Bytes, BytesMut};
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
const MIN_READ: usize = 256;
const MAX_READ: usize = 64 * 1024;
/// How long a closing connection may spend flushing its last packets.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

/// Serves one connection until it ends. Never fails: every problem closes this
/// connection only, and is logged with its reason.
pub async fn serve<R, W>(broker: &Arc<Broker>, reader: R, writer: W, peer: SocketAddr)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let span = tracing::info_span!("conn", %peer, client_id = tracing::field::Empty);
    let _count = metrics::connection();
    let mut io = Io {
        reader,
        writer,
        rbuf: BytesMut::new(),
        wbuf: BytesMut::new(),
        read_size: MIN_READ,
    };
    async {
        let connect = tokio::select! {
            _ = broker.shutdown.cancelled() => return,
            r = tokio::time::timeout(broker.config.mqtt.connect_timeout(), io.read_connect(broker)) => r,
        };
        let connect = match connect {
            Err(_) => return debug!("no CONNECT within the connect timeout; closing"),
            Ok(Ok(Some(c))) => c,
            Ok(Ok(None)) => return debug!("closed before CONNECT"),
            Ok(Err(e)) => {
                warn!("bad CONNECT: {e}");
                if let protocol::Error::UnsupportedProtocol { .. } = e {
                    // Both 3.x and 5.0 clients understand a 3.1.1 CONNACK with code 1 here.
                    let ack = ConnAck {
                        code: connack_v3::UNACCEPTABLE_PROTOCOL_VERSION,
                        ..ConnAck::default()
                    };
                    io.send_and_close(Packet::ConnAck(ack), Protocol::V311).await;
                }
                return;
            }
        };
        if let Some(mut conn) = Conn::accept(broker, *connect, &mut io).await {
            let exit = conn.run(&mut io).await;
            conn.close(exit, &mut io).await;
        }
    }
    .instrument(span)
    .await
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
    /// Reads until the first packet is complete; it must be CONNECT.
    async fn read_connect(&mut self, broker: &Broker) -> Result<Option<Box<Connect>>, protocol::Error> {
        let max = broker.config.mqtt.max_packet_size;
        loop {
            match protocol::decode(&mut self.rbuf, Protocol::V311, max)? {
                Some(Packet::Connect(c)) => return Ok(Some(c)),
                Some(_) => return Err(protocol::Error::Protocol("first packet is not CONNECT")),
                None => {}
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
    Disconnect { will: bool },
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
    will: Option<Message>,
    wake: Arc<Notify>,
    /// Reused between drains of the session queue.
    batch: Vec<(Delivery, u16)>,
}

impl<'a> Conn<'a> {
    /// Validates the CONNECT, opens the session and queues the CONNACK. On refusal,
    /// answers with the CONNACK code and returns None.
    async fn accept<R, W>(broker: &'a Arc<Broker>, connect: Connect, io: &mut Io<R, W>) -> Option<Conn<'a>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let protocol = connect.protocol;
        let v5 = protocol.is_v5();
        let refuse = |v3: u8, v5code: u8| {
            Packet::ConnAck(ConnAck {
                code: if v5 { v5code } else { v3 },
                ..ConnAck::default()
            })
        };

        let mut client_id = ByteStr::from(connect.client_id.as_str());
        let refused = if client_id.is_empty() {
            // 3.1 requires an id; 3.1.1 allows an empty one only with clean session.
            let allowed = broker.config.mqtt.allow_zero_length_clientid
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
            let ack = refuse(connack_v3::IDENTIFIER_REJECTED, reason::CLIENT_IDENTIFIER_NOT_VALID);
            io.send_and_close(ack, protocol).await;
            return None;
        }
        tracing::Span::current().record("client_id", client_id.as_str());

        if v5 && connect.properties.authentication_method.is_some() {
            info!("refused: no enhanced authentication method is supported");
            let ack = refuse(connack_v3::NOT_AUTHORIZED, reason::BAD_AUTHENTICATION_METHOD);
            io.send_and_close(ack, protocol).await;
            return None;
        }

        let will = match connect.will {
            None => None,
            Some(w) if topic::valid_topic_name(&w.topic) && levels_ok(&w.topic) => Some(Message::new(
                ByteStr::from(w.topic.as_str()),
                Bytes::copy_from_slice(&w.payload),
                w.qos,
                w.retain,
                None,
                0,
            )),
            Some(_) => {
                info!("refused: invalid will topic");
                let ack = refuse(connack_v3::NOT_AUTHORIZED, reason::TOPIC_NAME_INVALID);
                io.send_and_close(ack, protocol).await;
                return None;
            }
        };
        if will.as_ref().is_some_and(|w| w.retain) && !broker.config.mqtt.retain_available {
            let ack = refuse(connack_v3::NOT_AUTHORIZED, reason::RETAIN_NOT_SUPPORTED);
            io.send_and_close(ack, protocol).await;
            return None;
        }

        let conn_id = broker.next_id();
        let wake = Arc::new(Notify::new());
        let link = Link {
            conn_id,
            wake: wake.clone(),
        };
        let (session, present) = broker.open_session(&client_id, connect.clean_start, protocol, link);
        info!(
            protocol = protocol.level(),
            clean = connect.clean_start,
            keep_alive = connect.keep_alive,
            resumed = present,
            "connected"
        );

        let mut conn = Conn {
            broker,
            session,
            conn_id,
            protocol,
            keep_alive: (connect.keep_alive > 0)
                .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500)),
            will,
            wake,
            batch: Vec::new(),
        };
        let mut ack = ConnAck {
            session_present: present,
            code: 0,
            ..ConnAck::default()
        };
        if v5 && connect.client_id.is_empty() {
            ack.properties.assigned_client_identifier = Some(client_id);
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
        loop {
            if io.wbuf.len() < WRITE_HIGH_WATER && self.pull(&mut io.wbuf).is_err() {
                return Exit::TakenOver;
            }
            io.prepare_read();
            let spare = io.rbuf.capacity() - io.rbuf.len();
            tokio::select! {
                biased;
                _ = broker.shutdown.cancelled() => return Exit::Shutdown,
                _ = wake.notified() => {}
                written = io.writer.write_buf(&mut io.wbuf), if !io.wbuf.is_empty() => {
                    match written {
                        Ok(0) | Err(_) => return Exit::Closed,
                        Ok(_) => io.after_write(),
                    }
                }
                read = io.reader.read_buf(&mut io.rbuf) => {
                    let n = match read {
                        Ok(0) | Err(_) => return Exit::Closed,
                        Ok(n) => n,
                    };
                    last_packet = Instant::now();
                    if let Some(exit) = self.on_bytes(io) {
                        return exit;
                    }
                    io.after_read(n, spare);
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
            Packet::Disconnect(d) => Err(Exit::Disconnect {
                will: d.reason == reason::DISCONNECT_WITH_WILL,
            }),
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

    fn on_publish(&mut self, p: Publish, out: &mut BytesMut) -> Result<(), Exit> {
        metrics::received();
        if !levels_ok(&p.topic) {
            return Err(violation(reason::TOPIC_NAME_INVALID, "topic has too many levels"));
        }
        if p.retain && !self.broker.config.mqtt.retain_available {
            return Err(violation(reason::RETAIN_NOT_SUPPORTED, "retain is not available"));
        }
        if p.qos == QoS::ExactlyOnce {
            // A resent QoS 2 PUBLISH (same id, before PUBREL) is acknowledged, not routed
            // again: this is what makes it exactly once.
            let first = self.owned(|s| s.inbound_qos2.insert(p.pkid))?;
            if !first {
                self.send(out, Packet::PubRec(self.ack(p.pkid, true)));
                return Ok(());
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

    fn on_subscribe(&mut self, s: Subscribe, out: &mut BytesMut) -> Result<(), Exit> {
        let router = &self.broker.router;
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut accepted = Vec::new();
        for f in &s.filters {
            if !topic::valid_filter(&f.filter) || !levels_ok(&f.filter) {
                debug!(filter = %f.filter, "refused invalid topic filter");
                codes.push(if self.protocol.is_v5() {
                    reason::TOPIC_FILTER_INVALID
                } else {
                    0x80
                });
                continue;
            }
            let existed = router.subscribe(&f.filter, &self.session, f.options);
            // Record it in the session, or undo it if the session was taken meanwhile.
            let filter = f.filter.clone();
            let options = f.options;
            if self
                .owned(|st| st.subscriptions.insert(filter, options))
                .is_err()
            {
                router.unsubscribe(&f.filter, self.session.id);
                return Err(Exit::TakenOver);
            }
            debug!(filter = %f.filter, qos = ?f.options.qos, "subscribed");
            codes.push(f.options.qos as u8);
            accepted.push((f, existed));
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
        for (f, existed) in accepted {
            let wanted = match f.options.retain_handling {
                0 => true,
                1 => !existed,
                _ => false,
            };
            if !wanted {
                continue;
            }
            for message in router.retained_matching(&f.filter) {
                let qos = message.qos.min(f.options.qos);
                self.session.deliver(Delivery {
                    message,
                    qos,
                    retain: true,
                });
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

    /// Moves what the in-flight window allows from the session queue into `out`.
    fn pull(&mut self, out: &mut BytesMut) -> Result<(), NotOwner> {
        let max_inflight = self.session.limits().max_inflight;
        loop {
            let mut batch = std::mem::take(&mut self.batch);
            self.session
                .with_state(self.conn_id, |s| s.take_sendable(max_inflight, BATCH, &mut batch))?;
            let n = batch.len();
            for (d, pkid) in batch.drain(..) {
                let header = DeliveryHeader {
                    dup: false,
                    qos: d.qos,
                    retain: d.retain,
                    pkid,
                };
                if let Err(e) = d.message.encode(out, self.protocol, &header) {
                    warn!(topic = %d.message.topic, "cannot encode PUBLISH: {e}");
                }
            }
            self.batch = batch;
            metrics::sent(n as u64);
            if n < BATCH || out.len() >= WRITE_HIGH_WATER {
                return Ok(());
            }
        }
    }

    fn resend_inflight(&mut self, out: &mut BytesMut) -> Result<(), NotOwner> {
        let inflight = self.owned_inflight()?;
        for f in inflight {
            match f.stage {
                Stage::Publish(d) => {
                    let header = DeliveryHeader {
                        dup: true,
                        qos: d.qos,
                        retain: d.retain,
                        pkid: f.pkid,
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

    fn owned_inflight(&self) -> Result<Vec<crate::session::Inflight>, NotOwner> {
        self.session
            .with_state(self.conn_id, |s| s.inflight.iter().cloned().collect())
    }

    /// Runs `f` on the session state, or ends the connection if the session was taken.
    fn owned<T>(&self, f: impl FnOnce(&mut crate::session::SessionState) -> T) -> Result<T, Exit> {
        self.session
            .with_state(self.conn_id, f)
            .map_err(|NotOwner| Exit::TakenOver)
    }

    /// An acknowledgement; in 5.0 an unknown packet id is reported as such.
    fn ack(&self, pkid: u16, known: bool) -> Ack {
        Ack {
            pkid,
            reason: if known || !self.protocol.is_v5() {
                reason::SUCCESS
            } else {
                reason::PACKET_IDENTIFIER_NOT_FOUND
            },
            ..Ack::default()
        }
    }

    fn send(&self, out: &mut BytesMut, packet: Packet) {
        if let Err(e) = protocol::encode(&packet, self.protocol, out) {
            warn!("cannot encode {}: {e}", packet.name());
        }
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
                (true, Some(*code))
            }
            Exit::KeepAliveTimeout => {
                info!("keep-alive timeout; closing");
                (true, Some(reason::KEEP_ALIVE_TIMEOUT))
            }
            Exit::TakenOver => {
                info!("session taken over by a new connection; closing");
                (true, Some(reason::SESSION_TAKEN_OVER))
            }
            Exit::Shutdown => (false, Some(reason::SERVER_SHUTTING_DOWN)),
        };
        if publish_will {
            if let Some(will) = self.will.take() {
                debug!(topic = %will.topic, "publishing will");
                let will = Arc::new(will);
                if will.retain {
                    self.broker.router.retain(&will);
                }
                self.broker.router.publish(&will);
            }
        }
        if let Some(filters) = self.session.detach(self.conn_id) {
            self.broker.end_session(&self.session, &filters);
        }
        let dropped = self.session.dropped();
        if dropped > 0 {
            info!(dropped, "messages dropped for this session because its queue was full");
        }
        match disconnect {
            Some(code) if self.protocol.is_v5() => {
                let packet = Packet::Disconnect(Disconnect {
                    reason: code,
                    ..Disconnect::default()
                });
                io.send_and_close(packet, self.protocol).await;
            }
            _ => {
                let _ = tokio::time::timeout(CLOSE_FLUSH, io.writer.shutdown()).await;
            }
        }
    }
}

fn violation(code: u8, why: impl Into<String>) -> Exit {
    Exit::Violation(code, why.into())
}

fn levels_ok(topic: &str) -> bool {
    topic.split('/').nth(MAX_TOPIC_LEVELS).is_none()
}

/// An id for a client that sent none, in mosquitto's style ("auto-" and random hex).
fn assign_client_id(broker: &Broker) -> ByteStr {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(broker.next_id());
    ByteStr::from(format!("auto-{:016x}", h.finish()))
}
