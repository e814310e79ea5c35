//! Starting and stopping a broker: binds the listeners, runs their accept loop, and
//! wires shutdown. The only module that knows the transports.

use crate::admin::Admin;
use crate::broker::Broker;
use crate::cluster::{self, Cluster, ClusterError};
use crate::config::{Config, Listener, ListenerKind};
use crate::conn::Peer;
use crate::http::HttpService;
use crate::listener::ListenerRules;
use crate::metrics::{self, Counter};
use crate::recovery;
use crate::security::enhanced::AuthMethod;
use crate::security::SecurityError;
use crate::session::journal::Journal;
use crate::store::{
    DiskStore, PersistenceConfig, RecoveryReport, Snapshot, Store, StoreError, SyncMode,
};
use crate::transport::{self, park::Lot, tls, tls::TlsAcceptor, tls::TlsError};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// A running broker: its listeners' addresses and the handle to stop it.
pub struct Server {
    broker: Arc<Broker>,
    addrs: Vec<(ListenerKind, SocketAddr)>,
    /// The TLS listeners' acceptors, for reloading their certificates.
    tls: Vec<TlsAcceptor>,
    /// The MQTT listeners' rules and counts, for `/metrics`.
    rules: Vec<Arc<ListenerRules>>,
    /// This node's part in its cluster (`[cluster]`).
    cluster: Option<Arc<Cluster>>,
    /// Where plain TCP listeners park idle connections (made with the first of them).
    lot: Option<Arc<Lot>>,
}

/// Why a broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// A file of `[auth]` cannot be used.
    #[error(transparent)]
    Security(#[from] SecurityError),
    #[error("listener {addr}: {source}")]
    Tls { addr: SocketAddr, source: TlsError },
    /// The store cannot be opened or read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The node cannot join its cluster (NATS unreachable, refused, ...).
    #[error("cluster: {0}")]
    Cluster(#[from] ClusterError),
    /// The parking lot's epoll set cannot be made.
    #[error("cannot watch idle connections: {0}")]
    Lot(std::io::Error),
}

impl StartError {
    /// Whether the configuration is at fault (rather than the machine, e.g. a port in use).
    pub fn is_config(&self) -> bool {
        matches!(self, StartError::Security(_) | StartError::Tls { .. })
    }
}

impl Server {
    /// Binds every configured listener and starts accepting connections.
    pub async fn start(config: Config) -> Result<Server, StartError> {
        Server::start_with(config, Vec::new()).await
    }

    /// `start`, with more MQTT 5 enhanced authentication methods.
    pub async fn start_with(
        config: Config,
        auth_methods: Vec<Arc<dyn AuthMethod>>,
    ) -> Result<Server, StartError> {
        let started = std::time::Instant::now();
        let queue_head = config.session.max_queued_messages;
        let (journal, snapshot, connected) = match &config.cluster {
            // A node of a cluster keeps its state in JetStream (src/cluster).
            Some(c) => {
                let connected = cluster::connect(c).await?;
                (connected.journal(), None, Some(connected))
            }
            None => {
                let (journal, snapshot) = open_store(&config.persistence, queue_head).await?;
                (journal, snapshot, None)
            }
        };
        let broker = Broker::with_journal(config, auth_methods, journal)?;
        let cluster = match connected {
            Some(c) => match cluster::start(&broker, c).await {
                Ok(cluster) => Some(cluster),
                Err(e) => {
                    // Stops the cluster tasks already started.
                    broker.begin_shutdown();
                    return Err(e.into());
                }
            },
            None => None,
        };
        if let Some(snapshot) = snapshot {
            let read_ms = started.elapsed().as_millis() as u64;
            report(&snapshot.recovery);
            let records = snapshot.recovery.recovered;
            let recovered = recovery::restore(&broker, snapshot, crate::clock::now());
            tracing::info!(
                retained = recovered.retained,
                sessions = recovered.sessions,
                queued = recovered.queued,
                in_flight = recovered.inflight,
                expired = recovered.expired,
                records,
                read_ms,
                total_ms = started.elapsed().as_millis() as u64,
                "state restored from the store"
            );
        }
        let mut server = Server {
            broker: broker.clone(),
            addrs: Vec::new(),
            tls: Vec::new(),
            rules: Vec::new(),
            cluster,
            lot: None,
        };
        // The admin listeners last: they report on the others.
        let (admins, others): (Vec<&Listener>, Vec<&Listener>) = broker
            .config
            .listeners
            .iter()
            .partition(|l| l.kind == ListenerKind::Admin);
        for listener in others {
            let proto = match listener.kind {
                ListenerKind::Ws => Proto::Ws(Arc::new(transport::ws::Policy::new(listener))),
                ListenerKind::Http => Proto::Http(Arc::new(HttpService::new(&broker, listener))),
                ListenerKind::Tcp | ListenerKind::Admin => Proto::Mqtt,
            };
            server.listen(listener, proto).await?;
        }
        let (reported, addrs) = (server.rules.clone(), server.addrs.clone());
        for listener in admins {
            if !listener.bind.ip().is_loopback() && listener.tls.is_none() {
                // The token would cross the network in the clear.
                tracing::warn!(
                    bind = %listener.bind,
                    "the admin listener is reachable from the network without TLS: \
                     bind it to 127.0.0.1 or give it a `tls` table (docs/observability.md)"
                );
            }
            let token = listener.token.clone().unwrap_or_default();
            let admin = Admin::new(broker.clone(), token, reported.clone(), addrs.clone());
            server
                .listen(listener, Proto::Admin(Arc::new(admin)))
                .await?;
        }
        crate::admin::sys::spawn(&broker);
        Ok(server)
    }

    /// Binds one listener and starts its accept loop, serving `proto`.
    async fn listen(&mut self, listener: &Listener, proto: Proto) -> Result<(), StartError> {
        let (socket, addr) = bind(listener).await?;
        let mut rules = ListenerRules::new(listener);
        let secure = listener.tls.is_some();
        let scheme = match listener.kind {
            ListenerKind::Tcp => ["mqtt", "mqtts"],
            ListenerKind::Ws => ["ws", "wss"],
            ListenerKind::Http | ListenerKind::Admin => ["http", "https"],
        };
        rules.name = format!("{}://{addr}", scheme[usize::from(secure)]);
        let rules = Arc::new(rules);
        if listener.kind != ListenerKind::Admin {
            self.rules.push(rules.clone());
        }
        tracing::info!(%addr, kind = ?listener.kind, tls = secure, "listening");
        self.addrs.push((listener.kind, addr));
        let broker = &self.broker;
        let tls = match &listener.tls {
            None => None,
            Some(cfg) => {
                let alpn: &[&[u8]] = match listener.kind {
                    ListenerKind::Ws => &[tls::ALPN_HTTP1],
                    ListenerKind::Http | ListenerKind::Admin => &[tls::ALPN_H2, tls::ALPN_HTTP1],
                    _ => &[tls::ALPN_MQTT],
                };
                let timeout = broker.config.mqtt.connect_timeout();
                let acceptor = TlsAcceptor::new(cfg.clone(), alpn, timeout)
                    .map_err(|source| StartError::Tls { addr, source })?;
                self.tls.push(acceptor.clone());
                Some(acceptor)
            }
        };
        match (tls, proto) {
            (None, Proto::Mqtt) => {
                let lot = match &self.lot {
                    Some(lot) => lot.clone(),
                    None => Lot::start(broker).map_err(StartError::Lot)?,
                };
                self.lot = Some(lot.clone());
                spawn_accept(broker, socket, rules, move |b, stream, peer| {
                    transport::tcp::serve(b, stream, peer, lot.clone())
                })
            }
            (None, Proto::Ws(policy)) => {
                spawn_accept(broker, socket, rules, move |b, stream, peer| {
                    transport::ws::serve(b, stream, peer, policy.clone())
                })
            }
            (None, Proto::Http(service)) => {
                spawn_accept(broker, socket, rules, move |b, stream, peer| {
                    transport::http::serve(b, stream, peer, service.clone())
                })
            }
            (None, Proto::Admin(admin)) => {
                spawn_accept(broker, socket, rules, move |b, stream, peer| {
                    transport::http::serve(b, stream, peer, admin.clone())
                })
            }
            (Some(tls), proto) => spawn_accept(broker, socket, rules, move |b, stream, peer| {
                serve_tls(b, stream, peer, tls.clone(), proto.clone())
            }),
        }
        Ok(())
    }

    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// This node's part in its cluster, with `[cluster]`.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// The bound address of the first listener of `kind` (useful with port 0).
    pub fn local_addr(&self, kind: ListenerKind) -> Option<SocketAddr> {
        self.addrs.iter().find(|(k, _)| *k == kind).map(|(_, a)| *a)
    }

    /// The bound addresses of every listener, in the order of the configuration.
    pub fn local_addrs(&self) -> &[(ListenerKind, SocketAddr)] {
        &self.addrs
    }

    /// Reads the password file, ACL, token keys and TLS certificates again (SIGHUP).
    /// What fails to load keeps its old version; the errors are returned for the log.
    /// Connections stay up.
    pub fn reload(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if let Err(e) = self.broker.reload_security() {
            errors.push(e.to_string());
        }
        for acceptor in &self.tls {
            if let Err(e) = acceptor.reload() {
                errors.push(e.to_string());
            }
        }
        errors
    }

    /// Resolves when shutdown has been requested (e.g. by `shutdown` from another task).
    pub async fn stopped(&self) {
        self.broker.shutdown.cancelled().await
    }

    /// Stops accepting, closes every connection, waits up to `grace` for them, then
    /// writes and closes the store. Returns false if some task was still running when the
    /// grace period ended.
    pub async fn shutdown(self, grace: Duration) -> bool {
        self.broker.begin_shutdown();
        self.broker.tasks.close();
        let all_closed = tokio::time::timeout(grace, self.broker.tasks.wait())
            .await
            .is_ok();
        if let Some(store) = self.broker.journal().store() {
            if let Err(e) = store.close().await {
                tracing::error!("closing the store: {e}");
            }
        }
        all_closed
    }
}

/// The journal to the configured store, and what the store holds, each session's queue
/// up to `queue_head` messages (None without persistence). Opening takes up to a second
/// on a large store: off the runtime.
async fn open_store(
    config: &PersistenceConfig,
    queue_head: usize,
) -> Result<(Journal, Option<Snapshot>), StartError> {
    if !config.enabled {
        return Ok((Journal::off(), None));
    }
    let cfg = config.clone();
    let store = tokio::task::spawn_blocking(move || DiskStore::open(&cfg))
        .await
        .map_err(|e| StoreError::Engine(e.to_string()))??;
    let store: Arc<dyn Store> = Arc::new(store);
    // Longer queues stay on disk until their sessions' connections read them back.
    let snapshot = store.load(queue_head).await?;
    let always = config.sync == SyncMode::Always;
    let now = crate::clock::now();
    let journal = Journal::new(Some(store), always, now, snapshot.max_message_id);
    Ok((journal, Some(snapshot)))
}

/// Logs what recovery found wrong with the store: never a silent partial start.
fn report(recovery: &RecoveryReport) {
    if recovery.is_clean() {
        return;
    }
    metrics::add(Counter::StoreRecordsSkipped, recovery.skipped);
    metrics::add(Counter::StoreBytesCut, recovery.discarded_tail_bytes);
    metrics::add(
        Counter::StoresMovedAside,
        u64::from(recovery.moved_aside.is_some()),
    );
    tracing::error!(
        recovered = recovery.recovered,
        skipped = recovery.skipped,
        discarded_tail_bytes = recovery.discarded_tail_bytes,
        moved_aside = ?recovery.moved_aside,
        journals_kept = ?recovery.journals_kept,
        "the store was damaged: started with what could be recovered"
    );
}

/// What a listener speaks over its sockets.
#[derive(Clone)]
enum Proto {
    Mqtt,
    Ws(Arc<transport::ws::Policy>),
    Http(Arc<HttpService>),
    Admin(Arc<Admin>),
}

/// Binds the socket of `listener`; returns it with its address.
async fn bind(listener: &Listener) -> Result<(TcpListener, SocketAddr), StartError> {
    let bind = |source| StartError::Bind {
        addr: listener.bind,
        source,
    };
    let socket = TcpListener::bind(listener.bind).await.map_err(bind)?;
    let addr = socket.local_addr().map_err(bind)?;
    if let Err(e) = defer_accept(&socket) {
        tracing::warn!(%addr, "TCP_DEFER_ACCEPT not set: {e}");
    }
    Ok((socket, addr))
}

/// Asks Linux to hand over a connection only once its first bytes (a CONNECT, a TLS
/// ClientHello, an HTTP request) have arrived: every client of every listener speaks
/// first. The connection's first read (tokio takes a new socket as readable) then finds
/// the request instead of waking the task twice, and a connection that never speaks
/// holds no descriptor or task of ours until the kernel stops waiting
/// (`DEFER_ACCEPT_SECS`), when `connect_timeout` takes over.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // no safe wrapper: std's is unstable, socket2 and rustix lack it
fn defer_accept(socket: &TcpListener) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let secs: libc::c_int = DEFER_ACCEPT_SECS;
    // SAFETY: the descriptor is open for as long as `socket` is borrowed, and the value
    // is a c_int passed with its size, as tcp(7) defines TCP_DEFER_ACCEPT.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&raw const secs).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    match rc {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

#[cfg(not(target_os = "linux"))]
fn defer_accept(_: &TcpListener) -> std::io::Result<()> {
    Ok(())
}

/// How long a connection may stay silent before Linux hands it over anyway.
#[cfg(target_os = "linux")]
const DEFER_ACCEPT_SECS: libc::c_int = 5;

/// The TLS handshake, then MQTT, the WebSocket upgrade or HTTP over the encrypted stream.
async fn serve_tls(
    broker: Arc<Broker>,
    stream: TcpStream,
    mut peer: Peer,
    tls: TlsAcceptor,
    proto: Proto,
) {
    let (stream, proved) = match tls.accept(stream).await {
        Ok(accepted) => accepted,
        Err(e) => return tracing::debug!(peer = %peer.addr, "TLS handshake failed: {e}"),
    };
    peer.tls_identity = proved.identity;
    match proto {
        Proto::Ws(policy) => transport::ws::serve(broker, stream, peer, policy).await,
        Proto::Http(service) => transport::http::serve(broker, stream, peer, service).await,
        Proto::Admin(admin) => transport::http::serve(broker, stream, peer, admin).await,
        Proto::Mqtt => transport::tcp::serve_stream(broker, stream, peer).await,
    }
}

/// Accepts connections on `listener` until shutdown, each served by `serve` in its own
/// task.
fn spawn_accept<F, Fut>(
    broker: &Arc<Broker>,
    listener: TcpListener,
    rules: Arc<ListenerRules>,
    serve: F,
) where
    F: Fn(Arc<Broker>, TcpStream, Peer) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let broker = broker.clone();
    let tasks = broker.tasks.clone();
    tasks.spawn(async move {
        let mut exhausted = Exhausted::new();
        loop {
            let accepted = tokio::select! {
                _ = broker.shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, addr)) => {
                    rules.accepted.fetch_add(1, Ordering::Relaxed);
                    crate::metrics::add(crate::metrics::Counter::SocketsAccepted, 1);
                    // MQTT packets are small and latency matters more than segment count.
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(%addr, "set_nodelay: {e}");
                    }
                    let peer = Peer {
                        addr,
                        listener: rules.clone(),
                        tls_identity: None,
                        admitted: None,
                    };
                    broker.tasks.spawn(serve(broker.clone(), stream, peer));
                }
                Err(e) if is_out_of_descriptors(&e) => {
                    rules.accept_errors.fetch_add(1, Ordering::Relaxed);
                    exhausted.refuse_one(&listener).await
                }
                Err(e) => {
                    rules.accept_errors.fetch_add(1, Ordering::Relaxed);
                    crate::warn_limited!(listener = %rules.name, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
}

fn is_out_of_descriptors(e: &std::io::Error) -> bool {
    // EMFILE (the process's limit) and ENFILE (the system's).
    matches!(e.raw_os_error(), Some(24) | Some(23))
}

/// What the accept loop does when the process runs out of file descriptors: a spare one
/// is kept open, so that a waiting client can be accepted and told "server unavailable"
/// (a 3.1.1 CONNACK 3) instead of hanging in the listen queue; the log line says how many
/// were refused, at most every 10 s.
struct Exhausted {
    spare: Option<std::fs::File>,
    refused: u64,
    logged: Option<tokio::time::Instant>,
}

impl Exhausted {
    fn new() -> Exhausted {
        Exhausted {
            spare: std::fs::File::open("/dev/null").ok(),
            refused: 0,
            logged: None,
        }
    }

    async fn refuse_one(&mut self, listener: &TcpListener) {
        const SERVER_UNAVAILABLE: [u8; 4] = [0x20, 0x02, 0x00, 0x03];
        if self.spare.is_none() {
            // Lost last time (another task took the descriptor first): try again, or the
            // spare would be gone for good.
            self.spare = std::fs::File::open("/dev/null").ok();
        }
        if self.spare.take().is_some() {
            let accept = tokio::time::timeout(Duration::from_millis(100), listener.accept());
            if let Ok(Ok((stream, _))) = accept.await {
                let _ = stream.try_write(&SERVER_UNAVAILABLE);
                self.refused += 1;
            }
            self.spare = std::fs::File::open("/dev/null").ok();
        }
        let now = tokio::time::Instant::now();
        if self
            .logged
            .is_none_or(|t| now >= t + Duration::from_secs(10))
        {
            tracing::warn!(
                refused = self.refused,
                "out of file descriptors: refusing new connections (raise the process's open-file limit, or set limits.max_connections below it)"
            );
            self.logged = Some(now);
            self.refused = 0;
        }
        if self.spare.is_none() {
            // Not even the spare could be reopened: wait for descriptors to come back
            // instead of spinning on the error.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
