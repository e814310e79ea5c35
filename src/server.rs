//! Starting and stopping a broker: binds the listeners, runs their accept loop, and
//! wires shutdown. The only module that knows the transports.

use crate::broker::{Broker, ListenerRules};
use crate::config::{Config, Listener, ListenerKind};
use crate::conn::Peer;
use crate::security::enhanced::AuthMethod;
use crate::security::SecurityError;
use crate::transport::{self, tls, tls::TlsAcceptor, tls::TlsError};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// A running broker: its listeners' addresses and the handle to stop it.
pub struct Server {
    broker: Arc<Broker>,
    addrs: Vec<(ListenerKind, SocketAddr)>,
    /// The TLS listeners' acceptors, for reloading their certificates.
    tls: Vec<TlsAcceptor>,
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
}

impl StartError {
    /// Whether the configuration is at fault (rather than the machine, e.g. a port in use).
    pub fn is_config(&self) -> bool {
        !matches!(self, StartError::Bind { .. })
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
        let broker = Broker::new(config, auth_methods)?;
        let mut server = Server {
            broker: broker.clone(),
            addrs: Vec::new(),
            tls: Vec::new(),
        };
        for listener in &broker.config.listeners {
            let addr = server.listen(listener).await?;
            tracing::info!(%addr, kind = ?listener.kind, tls = listener.tls.is_some(), "listening");
            server.addrs.push((listener.kind, addr));
        }
        Ok(server)
    }

    /// Binds one listener and starts its accept loop; returns its address.
    async fn listen(&mut self, listener: &Listener) -> Result<SocketAddr, StartError> {
        let bind = |source| StartError::Bind {
            addr: listener.bind,
            source,
        };
        let socket = TcpListener::bind(listener.bind).await.map_err(bind)?;
        let addr = socket.local_addr().map_err(bind)?;
        let rules = Arc::new(ListenerRules::new(listener));
        let broker = &self.broker;
        let tls = match &listener.tls {
            None => None,
            Some(cfg) => {
                let alpn: &[&[u8]] = match listener.kind {
                    ListenerKind::Tcp => &[tls::ALPN_MQTT],
                    ListenerKind::Ws => &[tls::ALPN_HTTP1],
                };
                let timeout = broker.config.mqtt.connect_timeout();
                let acceptor = TlsAcceptor::new(cfg.clone(), alpn, timeout)
                    .map_err(|source| StartError::Tls { addr, source })?;
                self.tls.push(acceptor.clone());
                Some(acceptor)
            }
        };
        let ws = (listener.kind == ListenerKind::Ws)
            .then(|| Arc::new(transport::ws::Policy::new(listener)));
        match (tls, ws) {
            (None, None) => spawn_accept(broker, socket, rules, transport::tcp::serve),
            (None, Some(policy)) => spawn_accept(broker, socket, rules, move |b, stream, peer| {
                transport::ws::serve(b, stream, peer, policy.clone())
            }),
            (Some(tls), ws) => spawn_accept(broker, socket, rules, move |b, stream, peer| {
                serve_tls(b, stream, peer, tls.clone(), ws.clone())
            }),
        }
        Ok(addr)
    }

    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
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

    /// Stops accepting, closes every connection, and waits up to `grace` for them.
    /// Returns false if some task was still running when the grace period ended.
    pub async fn shutdown(self, grace: Duration) -> bool {
        self.broker.begin_shutdown();
        self.broker.tasks.close();
        tokio::time::timeout(grace, self.broker.tasks.wait())
            .await
            .is_ok()
    }
}

/// The TLS handshake, then MQTT (or the WebSocket upgrade) over the encrypted stream.
async fn serve_tls(
    broker: Arc<Broker>,
    stream: TcpStream,
    mut peer: Peer,
    tls: TlsAcceptor,
    ws: Option<Arc<transport::ws::Policy>>,
) {
    let (stream, proved) = match tls.accept(stream).await {
        Ok(accepted) => accepted,
        Err(e) => return tracing::debug!(peer = %peer.addr, "TLS handshake failed: {e}"),
    };
    peer.tls_identity = proved.identity;
    match ws {
        Some(policy) => transport::ws::serve(broker, stream, peer, policy).await,
        None => transport::tcp::serve_stream(broker, stream, peer).await,
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
                    // MQTT packets are small and latency matters more than segment count.
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(%addr, "set_nodelay: {e}");
                    }
                    let peer = Peer {
                        addr,
                        listener: rules.clone(),
                        tls_identity: None,
                    };
                    broker.tasks.spawn(serve(broker.clone(), stream, peer));
                }
                Err(e) if is_out_of_descriptors(&e) => exhausted.refuse_one(&listener).await,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
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
