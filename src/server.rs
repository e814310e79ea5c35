//! Starting and stopping a broker: binds the listeners, runs their accept loop, and
//! wires shutdown. The only module that knows the transports.

use crate::auth::AuthMethod;
use crate::broker::Broker;
use crate::config::{Config, ListenerKind};
use crate::transport;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// A running broker: its listeners' addresses and the handle to stop it.
pub struct Server {
    broker: Arc<Broker>,
    addrs: Vec<(ListenerKind, SocketAddr)>,
}

impl Server {
    /// Binds every configured listener and starts accepting connections.
    pub async fn start(config: Config) -> std::io::Result<Server> {
        Server::start_with(config, Vec::new()).await
    }

    /// `start`, with MQTT 5 enhanced authentication methods.
    pub async fn start_with(
        config: Config,
        auth_methods: Vec<Arc<dyn AuthMethod>>,
    ) -> std::io::Result<Server> {
        let broker = Broker::new(config, auth_methods);
        let mut addrs = Vec::new();
        for listener in &broker.config.listeners {
            let socket = TcpListener::bind(listener.bind).await?;
            let addr = socket.local_addr()?;
            match listener.kind {
                ListenerKind::Tcp => spawn_accept(&broker, socket, transport::tcp::serve),
                ListenerKind::Ws => {
                    let policy = Arc::new(transport::ws::Policy::new(listener));
                    spawn_accept(&broker, socket, move |broker, stream, peer| {
                        transport::ws::serve(broker, stream, peer, policy.clone())
                    })
                }
            }
            tracing::info!(%addr, kind = ?listener.kind, "listening");
            addrs.push((listener.kind, addr));
        }
        Ok(Server { broker, addrs })
    }

    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// The bound address of the first listener of `kind` (useful with port 0).
    pub fn local_addr(&self, kind: ListenerKind) -> Option<SocketAddr> {
        self.addrs.iter().find(|(k, _)| *k == kind).map(|(_, a)| *a)
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

/// Accepts connections on `listener` until shutdown, each served by `serve` in its own
/// task.
fn spawn_accept<F, Fut>(broker: &Arc<Broker>, listener: TcpListener, serve: F)
where
    F: Fn(Arc<Broker>, TcpStream, SocketAddr) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let broker = broker.clone();
    let tasks = broker.tasks.clone();
    tasks.spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = broker.shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    // MQTT packets are small and latency matters more than segment count.
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(%peer, "set_nodelay: {e}");
                    }
                    broker.tasks.spawn(serve(broker.clone(), stream, peer));
                }
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning on the error.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
}
