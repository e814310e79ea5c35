//! The connection task: the only async code of a connection. It owns the socket halves
//! and their buffers, runs the handshake, then feeds the `Connection` state machine with
//! bytes, wake-ups and the time, and writes what it produces.
//!
//! The task never blocks on the socket in one direction while the other has work: a
//! single `select!` waits for bytes to read, room to write, a wake-up from a publisher
//! and the keep-alive deadline. Its future lives as long as the connection, so it is kept
//! small: the handshake and the close, large and short-lived, are boxed.

use super::auth::{Exchange, Next};
use super::exit::{limit, Exit};
use super::handshake::{negotiate, Negotiated, Refusal};
use super::login::{self, Login};
use super::machine::{self, Connection, WRITE_HIGH_WATER};
use super::Peer;
use crate::broker::{Broker, Opened};
use crate::budget::{Budget, Level};
use crate::clock::now;
use crate::listener::ListenerRules;
use crate::metrics::{self, Counter};
use crate::observe::clients::LiveClient;
use crate::protocol::{self, ByteStr, ConnAck, Packet, Protocol, ReasonCode};
use crate::security::AuthResult;
use crate::session::outbox::Progress;
use crate::session::{Link, Wire};
use bytes::BytesMut;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep_until, timeout, Instant};
use tracing::{debug, info, Instrument};

/// Read buffers start small so that idle connections cost little, and grow under load.
const MIN_READ: usize = 64;
const MAX_READ: usize = 64 * 1024;
/// A read at least this large yields to the tasks it woke (see `run`).
const YIELD_AFTER_READ: usize = 4096;
/// How long a connection the server closes lingers: its last packets are flushed, the
/// write side shut, and what the client still sends is read and dropped, so that the
/// client reads the reason instead of a reset.
const LINGER: Duration = Duration::from_secs(1);

/// Serves one connection until it ends, or (if `parkable`) until it has nothing to do:
/// then it is handed back (`Idle`) for its transport to hold without a task. Never
/// fails: every problem closes this connection only, and is logged with its reason. The
/// peer is kept behind a pointer and freed after the handshake: the future lives as long
/// as the connection, and each byte of it (or held by it) counts per client.
pub fn serve<'a, R, W>(
    broker: &'a Arc<Broker>,
    reader: R,
    writer: W,
    peer: impl Into<Box<Peer>>,
    parkable: bool,
) -> impl Future<Output = Option<Idle>> + Send + 'a
where
    R: AsyncRead + Unpin + Send + 'a,
    W: AsyncWrite + Unpin + Send + 'a,
{
    let peer: Box<Peer> = peer.into();
    let span = tracing::info_span!("conn", peer = %peer.addr, client_id = tracing::field::Empty);
    let start = Start::Connect {
        broker,
        peer,
        parkable,
    };
    drive(Io::new(reader, writer), start).instrument(span)
}

/// Serves a parked connection again (its socket had bytes, a publisher woke it, or its
/// timer is due), until it ends or is idle again. `read` is what the transport already
/// read from the socket.
pub fn resume<'a, R, W>(
    reader: R,
    writer: W,
    read: BytesMut,
    idle: Idle,
    peer: Option<SocketAddr>,
    parkable: bool,
) -> impl Future<Output = Option<Idle>> + Send + 'a
where
    R: AsyncRead + Unpin + Send + 'a,
    W: AsyncWrite + Unpin + Send + 'a,
{
    let span = span_of(idle.0.conn.client_id(), peer);
    let mut io = Io::new(reader, writer);
    io.rbuf = read;
    drive(io, Start::Resume(idle, parkable)).instrument(span)
}

/// How long a connection that carries no messages keeps its task: it is parked after one
/// to two such periods (`QUIET_PERIODS`). Short enough that a client which pings or
/// publishes now and then is mostly parked; long enough that one which streams is never.
const PARK_AFTER: Duration = Duration::from_secs(2);

/// A connection is parked after this many timer periods (`PARK_AFTER`) without a
/// message either way (`run` counts them in an `Option<u8>`, None where it cannot park).
/// A connection new or resumed starts at it: it is parked as soon as it has nothing to
/// do, unless a message flows.
const QUIET_PERIODS: u8 = 2;

/// A connection with nothing to do, for its transport to hold without a task
/// (`transport::park`) until its socket has bytes, a publisher wakes it or its timer is
/// due: then `resume` serves it again. Boxed: the task that resumes it holds it only
/// until it is unpacked.
pub struct Idle(Box<Parts>);

struct Parts {
    conn: Connection,
    /// Counted against the limits for as long as the connection lives.
    opened: Opened,
}

impl Idle {
    pub fn broker(&self) -> &Arc<Broker> {
        self.0.conn.broker()
    }

    pub fn wire(&self) -> &Arc<Wire> {
        self.0.conn.wire()
    }

    pub fn listener(&self) -> &Arc<ListenerRules> {
        self.0.opened.listener()
    }

    /// When it must be served again even if nothing happens (keep-alive, token expiry).
    pub fn deadline(&self) -> Option<std::time::Instant> {
        self.0.conn.poll_timeout()
    }

    /// Ends a parked connection whose client is gone (`None`: it closed the connection)
    /// or whose socket failed: the will is published, as for any connection lost.
    pub fn end(self, error: Option<std::io::Error>, peer: Option<SocketAddr>) {
        let Parts { conn, opened: _ } = *self.0;
        let _enter = span_of(conn.client_id(), peer).entered();
        conn.close(&Exit::Closed(error), now(), &mut BytesMut::new());
    }
}

/// A resumed connection's span: as a new one's, once its client id is known.
fn span_of(client_id: &str, peer: Option<SocketAddr>) -> tracing::Span {
    match peer {
        Some(addr) => tracing::info_span!("conn", peer = %addr, client_id),
        None => tracing::info_span!("conn", client_id),
    }
}

/// Where `drive` starts: a new connection's handshake, or a parked connection.
enum Start<'a> {
    Connect {
        broker: &'a Arc<Broker>,
        peer: Box<Peer>,
        parkable: bool,
    },
    Resume(Idle, bool),
}

/// The connection's life in its task: the handshake (if new), then the event loop until
/// the connection ends, closing it, or until it is idle, returned as `Idle`. One future
/// for both starts: a future that moved its connection into another would hold both.
/// An `async` block rather than an `async fn`, whose arguments would be copied into it.
#[allow(clippy::manual_async_fn)]
fn drive<'a, R, W>(mut io: Io<R, W>, start: Start<'a>) -> impl Future<Output = Option<Idle>> + 'a
where
    R: AsyncRead + Unpin + 'a,
    W: AsyncWrite + Unpin + 'a,
{
    async move {
        let (mut conn, opened, park) = match start {
            Start::Connect {
                broker,
                peer,
                parkable,
            } => {
                let (opened, within_limits) = broker.open_connection(&peer.listener);
                let handshake = handshake(broker, &mut io, peer, within_limits);
                // `let else`, not `if let`: an `if let`'s scrutinee lives across the awaits
                // of its block, a second copy of the connection in every task.
                let Some(conn) = Box::pin(handshake).await else {
                    io.settle(&broker.buffers, true);
                    return None;
                };
                (conn, opened, parkable.then_some(QUIET_PERIODS))
            }
            Start::Resume(idle, parkable) => {
                let Parts { conn, opened } = *idle.0;
                (conn, opened, parkable.then_some(QUIET_PERIODS))
            }
        };
        let broker = conn.broker().clone();
        match run(&mut conn, &mut io, &broker, park).await {
            Ok(()) => {
                io.settle(&broker.buffers, true);
                conn.release();
                Some(Idle(Box::new(Parts { conn, opened })))
            }
            Err(exit) => {
                Box::pin(close(conn, exit, &mut io)).await;
                io.settle(&broker.buffers, true);
                None
            }
        }
    }
}

/// The byte side of a connection: the socket halves and their buffers.
struct Io<R, W> {
    reader: R,
    writer: W,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// From `MIN_READ` to `MAX_READ`. It and `charged` are u32: this struct lives in
    /// every connection's future, and 8 bytes decide its allocation's size class.
    read_size: u32,
    /// What the buffers are charged in the broker's buffer budget.
    charged: u32,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Io<R, W> {
    fn new(reader: R, writer: W) -> Io<R, W> {
        Io {
            reader,
            writer,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            read_size: MIN_READ as u32,
            charged: 0,
        }
    }

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
                Ok(n) => metrics::add(Counter::BytesReceived, n as u64),
            }
        }
    }

    /// Makes room for the next read: a little when idle, more while data streams in.
    fn prepare_read(&mut self) {
        let size = self.read_size as usize;
        if self.rbuf.capacity() - self.rbuf.len() < size / 2 {
            self.rbuf.reserve(size);
        }
    }

    /// Adapts the read size to the last read: grow when it filled the buffer, and give
    /// the memory back when the connection goes quiet.
    fn after_read(&mut self, n: usize, spare: usize) {
        if n == spare {
            self.read_size = (self.read_size * 2).min(MAX_READ as u32);
        } else if n < MIN_READ && self.rbuf.is_empty() && self.rbuf.capacity() > 4 * MIN_READ {
            self.rbuf = BytesMut::new();
            self.read_size = MIN_READ as u32;
        }
    }

    fn after_write(&mut self) {
        if self.wbuf.is_empty() && self.wbuf.capacity() > 16 * 1024 {
            self.wbuf = BytesMut::new();
        }
    }

    /// Brings the buffers' charge in `budget` up to date (to nothing once `closed`).
    /// Returns what this connection holds.
    fn settle(&mut self, budget: &Budget, closed: bool) -> usize {
        let held = if closed {
            0
        } else {
            self.rbuf.capacity() + self.wbuf.capacity()
        };
        // Buffers stay far below 4 GiB (the high-water mark, max_packet_size).
        let held = u32::try_from(held).unwrap_or(u32::MAX);
        budget.adjust(held as isize - self.charged as isize);
        self.charged = held;
        held as usize
    }

    /// Writes what is pending and closes, lingering (see `LINGER`). Bounded in time, and
    /// in memory by the read buffer already held.
    async fn linger_close(&mut self) {
        let deadline = Instant::now() + LINGER;
        let pending = self.wbuf.len() as u64;
        let flush = async {
            self.writer.write_all_buf(&mut self.wbuf).await?;
            metrics::add(Counter::BytesSent, pending);
            self.writer.shutdown().await
        };
        if tokio::time::timeout_at(deadline, flush).await.is_err() {
            return;
        }
        // What the client still sends is dropped: a small buffer does, and the one a
        // flood may have grown (up to its share of max_buffered_memory) goes back now.
        self.rbuf = BytesMut::with_capacity(16 * MIN_READ);
        let drain = async {
            loop {
                self.rbuf.clear();
                match self.reader.read_buf(&mut self.rbuf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        let _ = tokio::time::timeout_at(deadline, drain).await;
    }

    /// Writes what is pending and shuts the write side; the client is already gone or
    /// going.
    async fn close(&mut self) {
        let pending = self.wbuf.len() as u64;
        let flush = async {
            self.writer.write_all_buf(&mut self.wbuf).await?;
            metrics::add(Counter::BytesSent, pending);
            self.writer.shutdown().await
        };
        let _ = timeout(LINGER, flush).await;
    }
}

/// Reads and checks the CONNECT, authenticates, opens the session and queues the
/// CONNACK. On refusal, answers and closes; returns None.
async fn handshake<R, W>(
    broker: &Arc<Broker>,
    io: &mut Io<R, W>,
    peer: Box<Peer>,
    within_limits: bool,
) -> Option<Connection>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let connect = read_connect(broker, io).await?;
    let protocol = connect.protocol;
    let negotiated = negotiate(&broker.config, connect, || assign_client_id(broker), now())
        .and_then(|n| match within_limits {
            true => Ok(n),
            false => Err(Refusal::new(
                ReasonCode::QuotaExceeded,
                "too many connections (max_connections)",
            )),
        });
    let negotiated = match negotiated {
        Ok(n) => n,
        Err(refusal) => {
            refuse(io, refusal, protocol).await;
            return None;
        }
    };
    tracing::Span::current().record("client_id", &*negotiated.client_id);
    let login = login(broker, &negotiated, io, &peer)
        .await
        .and_then(|login| login::check_will(&login, &negotiated).map(|()| login));
    let mut login = match login {
        Ok(login) => login,
        Err(refusal) => {
            refuse(io, refusal, protocol).await;
            return None;
        }
    };

    // In a cluster, the client id is made this node's first: the node that had the
    // session gives it up, and it is loaded here (held until the session is open).
    let _claimed = match broker.claim(&negotiated.client_id).await {
        Ok(claimed) => claimed,
        Err(why) => {
            crate::warn_limited!("cannot take the session: {why}");
            let refusal = Refusal::new(ReasonCode::ServerUnavailable, "session unavailable");
            refuse(io, refusal, protocol).await;
            return None;
        }
    };
    let conn_id = broker.next_id();
    let client = LiveClient::new(
        peer.addr,
        peer.listener.clone(),
        protocol,
        negotiated.keep_alive,
        login.username.as_deref(),
    );
    broker.clients.connected(&client);
    let wire = Arc::new(Wire::new(Some(client)));
    let link = Link::new(conn_id, wire.clone());
    let now = now();
    let (session, present) = broker.open_session(
        &negotiated.client_id,
        negotiated.clean_start,
        negotiated.expiry,
        link,
        now,
    );
    info!(
        protocol = protocol.level(),
        clean = negotiated.clean_start,
        keep_alive = negotiated.keep_alive,
        resumed = present,
        "connected"
    );
    let mut ack = negotiated.connack(&broker.config, present);
    ack.properties.authentication_method = login.method.clone();
    ack.properties.authentication_data = login.data.take();
    let conn = Connection::new(
        broker.clone(),
        &negotiated,
        login,
        session,
        conn_id,
        wire,
        now,
    );
    conn.send(&mut io.wbuf, Packet::ConnAck(ack));
    peer.admit();
    Some(conn)
}

/// Waits for the CONNECT (within the connect timeout); answers a bad one and returns None.
async fn read_connect<R, W>(broker: &Broker, io: &mut Io<R, W>) -> Option<protocol::Connect>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Nothing larger is buffered from a peer that has not authenticated.
    let max = connect_size(&broker.config);
    let first = tokio::select! {
        _ = broker.shutdown.cancelled() => return None,
        r = timeout(broker.config.mqtt.connect_timeout(), io.read_packet(Protocol::V311, max)) => r,
    };
    match first {
        Err(_) => debug!("no CONNECT within the connect timeout; closing"),
        Ok(Ok(Some(Packet::Connect(c)))) => {
            metrics::add(Counter::Connects, 1);
            metrics::add(Counter::PacketsReceived, 1);
            return Some(*c);
        }
        Ok(Ok(Some(_))) => crate::warn_limited!("first packet is not CONNECT; closing"),
        Ok(Ok(None)) => debug!("closed before CONNECT"),
        Ok(Err(e)) => {
            crate::warn_limited!(reason = e.reason_code() as u8; "bad CONNECT: {e}");
            if let protocol::Error::UnsupportedProtocol { .. } = e {
                // Both 3.x and 5.0 clients understand a 3.1.1 CONNACK with code 1 here.
                let refusal = Refusal::new(e.reason_code(), "unsupported protocol version");
                refuse(io, refusal, Protocol::V311).await;
            }
        }
    }
    None
}

/// Answers a refused CONNECT (with a CONNACK unless the standard says to just close)
/// and closes.
async fn refuse<R, W>(io: &mut Io<R, W>, refusal: Refusal, protocol: Protocol)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    info!(code = ?refusal.code, "refused: {}", refusal.why);
    if refusal.connack {
        let ack = ConnAck {
            code: refusal.code,
            ..ConnAck::default()
        };
        machine::send(&mut io.wbuf, Packet::ConnAck(ack), protocol, usize::MAX);
    }
    io.linger_close().await;
}

/// Finds out who the client is: by an enhanced authentication exchange if the CONNECT
/// names a method, by its certificate if the listener takes that as the username, else
/// by its username and password (or token), checked off the runtime: hashing takes
/// milliseconds. An address that keeps failing waits longer each time.
async fn login<R, W>(
    broker: &Broker,
    negotiated: &Negotiated,
    io: &mut Io<R, W>,
    peer: &Peer,
) -> Result<Login, Refusal>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let client_id = &negotiated.client_id;
    let ip = peer.addr.ip();
    if let Some(method) = &negotiated.auth_method {
        slow_down(broker, ip).await;
        return exchange(broker, negotiated, method, io, ip).await;
    }
    if peer.listener.identity_as_username {
        return match &peer.tls_identity {
            Some(name) => Ok(Login::named(
                &broker.security,
                Some(name.clone()),
                client_id,
            )),
            None => Err(Refusal::new(
                ReasonCode::BadUserNameOrPassword,
                "no identity in the client certificate",
            )),
        };
    }
    slow_down(broker, ip).await;
    let username = negotiated.username.as_ref().map(|u| u.to_string());
    let password = negotiated.password.clone();
    let result = if password.is_none() {
        // Nothing to hash: no need for the blocking pool.
        broker
            .security
            .authenticate(username.as_deref(), None, client_id)
    } else {
        let (security, client_id) = (broker.security.clone(), client_id.to_string());
        let check =
            move || security.authenticate(username.as_deref(), password.as_deref(), &client_id);
        broker.password_check(check).await.ok_or_else(|| {
            Refusal::new(ReasonCode::UnspecifiedError, "authentication failed to run")
        })?
    };
    match &result {
        AuthResult::Denied(why) => {
            crate::warn_limited!("authentication failed: {why}");
            metrics::auth_failure();
            broker.backoff.failure(ip, now());
        }
        AuthResult::Authenticated(_) => broker.backoff.success(ip),
        AuthResult::Anonymous(_) => {}
    }
    login::decide(result, peer.listener.allow_anonymous)
}

/// Waits as long as the backoff says for `ip`: repeated authentication failures from
/// one address are slowed down, whatever the method (the connection waits, not a worker).
async fn slow_down(broker: &Broker, ip: IpAddr) {
    if let Some(delay) = broker.backoff.delay_for(ip, now()) {
        debug!(?delay, "slowing down repeated authentication failures");
        tokio::time::sleep(delay).await;
    }
}

/// Runs an MQTT 5 enhanced authentication exchange (CONNECT, AUTH, AUTH, ...); its
/// outcome counts in the backoff of `ip` as a password's would.
async fn exchange<R, W>(
    broker: &Broker,
    negotiated: &Negotiated,
    method: &ByteStr,
    io: &mut Io<R, W>,
    ip: IpAddr,
) -> Result<Login, Refusal>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (mut exchange, mut next) = Exchange::start(
        &broker.auth_methods,
        method,
        &negotiated.client_id,
        negotiated.auth_data.clone(),
    );
    loop {
        let challenge = match next {
            Next::Done { data, username } => {
                let mut login = Login::named(&broker.security, username, &negotiated.client_id);
                login.method = Some(method.clone());
                login.data = data;
                broker.backoff.success(ip);
                return Ok(login);
            }
            Next::Refuse(code) => {
                crate::warn_limited!("enhanced authentication ({method}) failed: {code:?}");
                metrics::auth_failure();
                broker.backoff.failure(ip, now());
                return Err(Refusal::new(code, "enhanced authentication"));
            }
            Next::Challenge(auth) => *auth,
        };
        let failed = || Refusal::new(ReasonCode::ProtocolError, "AUTH exchange");
        machine::send(
            &mut io.wbuf,
            Packet::Auth(challenge),
            Protocol::V5,
            usize::MAX,
        );
        if io.writer.write_all_buf(&mut io.wbuf).await.is_err() {
            return Err(failed());
        }
        let answer = timeout(
            broker.config.mqtt.connect_timeout(),
            io.read_packet(Protocol::V5, connect_size(&broker.config)),
        )
        .await;
        next = match (answer, exchange.as_mut()) {
            (Ok(Ok(Some(packet))), Some(exchange)) => {
                metrics::add(Counter::PacketsReceived, 1);
                exchange.on_packet(packet)
            }
            _ => return Err(failed()),
        };
    }
}

/// The largest packet read before a client is in: `limits.max_connect_size`.
pub(crate) fn connect_size(cfg: &crate::config::Config) -> usize {
    cfg.mqtt.max_packet_size.min(cfg.limits.max_connect_size)
}

/// The connection's event loop; returns why it ended, or Ok once it is idle: `quiet`
/// counts the timer periods without messages (`QUIET_PERIODS` of them park it).
async fn run<R, W>(
    conn: &mut Connection,
    io: &mut Io<R, W>,
    broker: &Broker,
    mut quiet: Option<u8>,
) -> Result<(), Exit>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let deadline = sleep_until(next_timer(conn, quiet.is_some()));
    tokio::pin!(deadline);
    // Clients may send packets right behind CONNECT, before the CONNACK: they are in
    // the buffer already.
    conn.handle_bytes(&mut io.rbuf, now(), &mut io.wbuf)?;
    if conn.take_awaits_disk() {
        Box::pin(await_disk(io, broker)).await?;
    }
    loop {
        // Shutdown wakes every connection (`Broker::begin_shutdown`) rather than being
        // one more future in the select: this future lives as long as the connection,
        // and each byte of it counts per idle client.
        if broker.shutdown.is_cancelled() {
            return Err(Exit::Shutdown);
        }
        // The wake-up flag is cleared before the session is looked at for the last time
        // before parking, never after: a message delivered after the clear sets it again
        // (and parking sees it, `Wire::watch`); one delivered before is taken below.
        // Cleared after, a message delivered in between would wait, parked, unsent.
        let parking = quiet_enough(conn, io, &mut quiet);
        if parking {
            conn.wire().clear_woken();
        }
        if io.wbuf.len() < WRITE_HIGH_WATER {
            let progress = conn.poll_transmit(now(), &mut io.wbuf)?;
            if before_more(conn, broker, progress).await? {
                continue;
            }
        }
        if parking && io.wbuf.is_empty() {
            // What would wake it again at once is done first: a wake-up seen (a
            // takeover, a kick: the error) and a timer due.
            conn.check_owner()?;
            conn.handle_timeout(now())?;
            return Ok(());
        }
        io.prepare_read();
        check_buffers(io, broker)?;
        let spare = io.rbuf.capacity() - io.rbuf.len();
        // A client that does not read what it asks for (acks, PINGRESPs) is not read
        // either until its answers drain: TCP backpressure instead of a growing buffer.
        // Nor is one publishing faster than its rate limit, until the pause ends.
        let can_read = match conn.paused_until().map(Instant::from_std) {
            Some(p) => {
                if p < deadline.deadline() {
                    deadline.as_mut().reset(p);
                }
                false
            }
            None => io.wbuf.len() < WRITE_HIGH_WATER,
        };
        // Reading comes before writing: acknowledgements already waiting free more of the
        // in-flight window first, so the next write carries a larger batch (fewer system
        // calls for the broker and the client alike).
        tokio::select! {
            biased;
            _ = conn.woken() => conn.check_owner()?,
            read = io.reader.read_buf(&mut io.rbuf), if can_read => {
                let n = match read {
                    Ok(0) => return Err(Exit::Closed(None)),
                    Err(e) => return Err(Exit::Closed(Some(e))),
                    Ok(n) => n,
                };
                metrics::add(Counter::BytesReceived, n as u64);
                conn.handle_bytes(&mut io.rbuf, now(), &mut io.wbuf)?;
                if conn.take_awaits_disk() {
                    Box::pin(await_disk(io, broker)).await?;
                }
                io.after_read(n, spare);
                // After a large read, the subscribers just woken may sit in this worker's
                // run queue (tokio's LIFO slot cannot be stolen): let them drain their
                // queues before this publisher routes its next read, or a burst overflows
                // even fast subscribers' queues. A small read needs no yield: the task is
                // about to wait for the socket anyway.
                if n >= YIELD_AFTER_READ {
                    tokio::task::yield_now().await;
                }
            }
            written = io.writer.write_buf(&mut io.wbuf), if !io.wbuf.is_empty() => {
                match written {
                    Ok(0) => return Err(Exit::Closed(None)),
                    Err(e) => return Err(Exit::Closed(Some(e))),
                    Ok(n) => {
                        metrics::add(Counter::BytesSent, n as u64);
                        io.after_write();
                    }
                }
            }
            _ = &mut deadline => {
                conn.handle_timeout(now())?;
                // Packets that waited out a publish-rate pause are already here.
                conn.handle_bytes(&mut io.rbuf, now(), &mut io.wbuf)?;
                if let Some(q) = quiet.as_mut() {
                    *q = q.saturating_add(1);
                }
                // Moved lazily: resetting the timer on every packet would cost more.
                deadline.as_mut().reset(next_timer(conn, quiet.is_some()));
            }
        }
    }
}

/// Whether the connection may be parked once its session has nothing more to send (see
/// `QUIET_PERIODS`): nothing to write, nothing half read, no pause, no message for long
/// enough.
fn quiet_enough<R, W>(conn: &mut Connection, io: &Io<R, W>, quiet: &mut Option<u8>) -> bool {
    let Some(q) = quiet.as_mut() else {
        return false;
    };
    if conn.take_busy() {
        *q = 0;
    }
    *q >= QUIET_PERIODS && io.wbuf.is_empty() && io.rbuf.is_empty() && conn.paused_until().is_none()
}

/// When the connection's timer must fire next: its own deadline, or the end of the
/// period that may park it. Not a closure over a local of `run`: that local would live
/// in every connection's future.
fn next_timer(conn: &Connection, parkable: bool) -> Instant {
    let period = match parkable {
        true => PARK_AFTER,
        // Far away: the connection has no deadline.
        false => Duration::from_secs(365 * 24 * 3600),
    };
    let end = Instant::now() + period;
    conn.poll_timeout()
        .map_or(end, |t| Instant::from_std(t).min(end))
}

/// Does what `poll_transmit` asked for before it is called again (`Progress::Refill`,
/// `Progress::Yield`); true if it asked for something.
async fn before_more(
    conn: &mut Connection,
    broker: &Broker,
    progress: Progress,
) -> Result<bool, Exit> {
    match progress {
        Progress::Refill => Box::pin(refill(conn, broker)).await?,
        Progress::Yield => tokio::task::yield_now().await,
        Progress::Idle | Progress::More => return Ok(false),
    }
    Ok(true)
}

/// Reads the next messages of the session's queue back from the store, where they were
/// spilled while memory ran high (a disk read: only under memory pressure, so it is
/// boxed rather than sized into every connection's future).
async fn refill(conn: &mut Connection, broker: &Broker) -> Result<(), Exit> {
    let (session, conn_id) = conn.session();
    broker
        .journal()
        .refill(session, conn_id, now())
        .await
        .map_err(|e| {
            tracing::error!("reading the queue back from the store: {e}");
            limit(ReasonCode::UnspecifiedError, "the store failed")
        })
}

/// Under `sync = "always"`, the acknowledgements just written wait until what they
/// promise is on disk: one fsync for everything this read routed (and, by group commit,
/// for what other connections submitted meanwhile). If the store failed they are never
/// sent: the connection closes, and the client sends its messages again elsewhere.
/// Called (boxed) only when the connection asks for it (`take_awaits_disk`): the wait
/// would otherwise sit in every connection's future.
async fn await_disk<R, W>(io: &mut Io<R, W>, broker: &Broker) -> Result<(), Exit> {
    broker.journal().barrier().await.map_err(|e| {
        tracing::error!("the store failed: {e}");
        io.wbuf.clear();
        limit(ReasonCode::UnspecifiedError, "the store failed")
    })
}

/// Charges the buffers to the broker's budget; while it is exceeded, a connection that
/// holds more than its share (the budget over the open connections) is closed.
fn check_buffers<R, W>(io: &mut Io<R, W>, broker: &Broker) -> Result<(), Exit>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let held = io.settle(&broker.buffers, false);
    let budget = &broker.buffers;
    if budget.level() == Level::Exhausted {
        let share = budget.limit() / broker.connection_count().max(1);
        if held > share {
            return Err(limit(
                ReasonCode::QuotaExceeded,
                format!("buffers of {held} bytes, over this connection's share ({share}) of max_buffered_memory"),
            ));
        }
    }
    Ok(())
}

/// Ends the connection: the machine's bookkeeping and last packet, then the socket.
async fn close<R, W>(conn: Connection, exit: Exit, io: &mut Io<R, W>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    conn.close(&exit, now(), &mut io.wbuf);
    match exit {
        // The client ended it: nothing more for it to read.
        Exit::Disconnect { .. } | Exit::Closed(_) => io.close().await,
        _ => io.linger_close().await,
    }
}

/// An id for a client that sent none, in mosquitto's style ("auto-" and random hex).
pub(crate) fn assign_client_id(broker: &Broker) -> ByteStr {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(broker.next_id());
    ByteStr::from(format!("auto-{:016x}", h.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use tokio::net::{TcpListener, TcpStream};

    /// The future of one connection over TCP halves: 640 bytes when measured (test
    /// profile, rustc 1.95). It is allocated for as long as the connection is active
    /// (docs/architecture.md, "Bounded memory"); this bound makes growing it a decision,
    /// not an accident (see also `transport::tcp`'s bound on the task around it).
    const MAX_SERVE_FUTURE: usize = 648;

    #[tokio::test]
    async fn the_connection_future_stays_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let broker = Broker::new(Config::default(), Vec::new()).unwrap();
        let (reader, writer) = stream.split();
        // Measured before it is first polled: a future's size is fixed at compile time.
        let future = serve(&broker, reader, writer, Peer::new(addr), true);
        let size = std::mem::size_of_val(&future);
        assert!(
            size <= MAX_SERVE_FUTURE,
            "conn::serve's future over TCP halves is {size} bytes, over the {MAX_SERVE_FUTURE} \
             allowed: if that is wanted, raise the bound and docs/architecture.md with it"
        );
    }
}
