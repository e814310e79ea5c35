//! Shared state of a running broker, and starting and stopping it.

use crate::auth::AuthMethod;
use crate::config::{Config, ListenerKind};
use crate::protocol::ByteStr;
use crate::router::{Message, Router};
use crate::session::{Detached, Link, QueueLimits, Session, NEVER_EXPIRE};
use crate::transport;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub struct Broker {
    pub config: Config,
    /// MQTT 5 enhanced authentication methods, by name.
    pub auth_methods: Vec<Arc<dyn AuthMethod>>,
    pub router: Router,
    /// Sessions by client id, connected or not.
    sessions: DashMap<ByteStr, Arc<Session>>,
    next_id: AtomicU64,
    /// Cancelled on shutdown (`begin_shutdown`): listeners stop accepting and
    /// connections close.
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
}

impl Broker {
    pub fn new(config: Config, auth_methods: Vec<Arc<dyn AuthMethod>>) -> Arc<Broker> {
        Arc::new(Broker {
            config,
            auth_methods,
            router: Router::default(),
            sessions: DashMap::new(),
            next_id: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        })
    }

    /// A fresh id for a connection or a session.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn queue_limits(&self) -> QueueLimits {
        let s = &self.config.session;
        QueueLimits {
            max_inflight: s.max_inflight_messages,
            max_queued: s.max_queued_messages,
            queue_qos0: s.queue_qos0_messages,
        }
    }

    /// Gives `client_id`'s session to a new connection. An existing session is resumed
    /// (unless `clean_start`, which discards it) and its connection, if any, is told it
    /// has been taken over. `expiry` is the session's new expiry interval (see
    /// `SessionState::expiry`). Returns the session and whether it was resumed.
    pub fn open_session(
        &self,
        client_id: &ByteStr,
        clean_start: bool,
        expiry: u32,
        link: Link,
    ) -> (Arc<Session>, bool) {
        let fresh = |broker: &Broker| {
            let s = Arc::new(Session::new(
                broker.next_id(),
                client_id.clone(),
                broker.queue_limits(),
            ));
            s.attach(link.clone(), expiry);
            s
        };
        match self.sessions.entry(client_id.clone()) {
            Entry::Occupied(mut entry) => {
                let old = entry.get().clone();
                if clean_start {
                    let (old_link, ended) = old.discard();
                    self.unsubscribe_all(&old, &ended.filters);
                    if let Some(will) = ended.will {
                        self.publish_will(&will);
                    }
                    wake(old_link);
                    let session = fresh(self);
                    entry.insert(session.clone());
                    (session, false)
                } else {
                    wake(old.attach(link, expiry));
                    (old, true)
                }
            }
            Entry::Vacant(entry) => {
                let session = fresh(self);
                entry.insert(session.clone());
                (session, false)
            }
        }
    }

    /// Finishes what a connection leaving its session started: shared-subscription
    /// messages go to other members; an ended session is removed; a lasting one gets
    /// timers for its delayed will and its expiry.
    pub fn session_detached(
        self: &Arc<Self>,
        session: &Arc<Session>,
        conn_id: u64,
        detached: Detached,
        will_delay: u32,
    ) {
        for orphan in detached.orphans {
            self.router.redeliver_shared(orphan, session.id);
        }
        if let Some(filters) = detached.ended {
            if let Some(will) = detached.will {
                self.publish_will(&will);
            }
            self.end_session(session, &filters);
            return;
        }
        let expiry = (detached.expiry != NEVER_EXPIRE)
            .then(|| Duration::from_secs(u64::from(detached.expiry)));
        let will_after = (will_delay > 0)
            .then(|| Duration::from_secs(u64::from(will_delay)))
            .filter(|w| expiry.is_none_or(|e| *w < e));
        if expiry.is_none() && will_after.is_none() {
            return;
        }
        let (broker, session) = (self.clone(), session.clone());
        let start = tokio::time::Instant::now();
        self.tasks.spawn(async move {
            let timers = async {
                if let Some(w) = will_after {
                    tokio::time::sleep_until(start + w).await;
                    if let Some(will) = session.take_pending_will(conn_id) {
                        broker.publish_will(&will);
                    }
                }
                if let Some(e) = expiry {
                    tokio::time::sleep_until(start + e).await;
                    if let Some(ended) = session.expire(conn_id) {
                        tracing::debug!(client_id = %session.client_id, "session expired");
                        if let Some(will) = ended.will {
                            broker.publish_will(&will);
                        }
                        broker.end_session(&session, &ended.filters);
                    }
                }
            };
            tokio::select! {
                _ = broker.shutdown.cancelled() => {}
                _ = timers => {}
            }
        });
    }

    /// Publishes a will, retaining it if asked. Its Message Expiry Interval counts from
    /// now, not from the CONNECT that carried it (MQTT 5.0, 3.1.3.2.4).
    pub fn publish_will(&self, will: &Message) {
        tracing::debug!(topic = %will.topic, "publishing will");
        let will = &Arc::new(Message::new(
            will.topic.clone(),
            will.payload.clone(),
            will.qos,
            will.retain,
            will.properties.clone(),
            will.origin,
        ));
        if will.retain {
            self.router.retain(will);
        }
        self.router.publish(will);
    }

    /// Removes a session that has ended: its subscriptions and, if it is still the
    /// registered one for its client id, its registry entry.
    pub fn end_session(&self, session: &Arc<Session>, filters: &[ByteStr]) {
        self.unsubscribe_all(session, filters);
        self.sessions
            .remove_if(&session.client_id, |_, s| Arc::ptr_eq(s, session));
    }

    fn unsubscribe_all(&self, session: &Session, filters: &[ByteStr]) {
        for f in filters {
            self.router.unsubscribe(f, session.id);
        }
    }

    /// Stops the listeners and tells every connection to close (5.0: DISCONNECT 0x8B).
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
        // Connections see the token when woken; sessions without one ignore the wake.
        for entry in self.sessions.iter() {
            entry.value().wake();
        }
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    pub fn session(&self, client_id: &str) -> Option<Arc<Session>> {
        self.sessions
            .get(&ByteStr::from(client_id))
            .map(|s| s.clone())
    }
}

/// Tells a connection that its session has been taken from it.
fn wake(link: Option<Link>) {
    if let Some(link) = link {
        link.wake.notify_one();
    }
}

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
            let addr = match listener.kind {
                ListenerKind::Tcp => transport::tcp::listen(&broker, listener.bind).await?,
                ListenerKind::Ws => transport::ws::listen(&broker, listener).await?,
            };
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
