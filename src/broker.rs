//! The shared state of a running broker (config, router, session registry) and the life
//! of sessions across connections: open (new, resumed, discarded, taken over), subscribe
//! and unsubscribe as their owner, detach, expire.
//!
//! Every change that touches both the router and a session is made here, under the
//! session's `control` lock (see `session`), so that it cannot interleave with a takeover
//! or an expiry. Ending a session and removing it from the registry is one decision,
//! taken under the registry entry's lock, which opening a session takes too.

use crate::budget::{Budget, Level};
use crate::clock::now;
use crate::config::Config;
use crate::listener::ListenerRules;
use crate::message::Message;
use crate::observe::clients::Clients;
use crate::protocol::{ByteStr, QoS, SubOptions};
use crate::router::Router;
use crate::security::backoff::{Backoff, BackoffConfig};
use crate::security::enhanced::{AuthMethod, Scram};
use crate::security::{Authenticator, SecurityError};
use crate::session::journal::Journal;
use crate::session::{Detached, Ended, Env, Link, NotOwner, QueueLimits, Session, NEVER_EXPIRE};
use crate::store::{BoxFuture, Op};
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub struct Broker {
    pub config: Config,
    /// Password file, tokens and ACL (`[auth]`), reloadable.
    pub security: Arc<Authenticator>,
    /// Bumped by every reload of `security`, so that connections rebuild their ACL.
    security_generation: AtomicU64,
    /// Slows down addresses that keep failing to authenticate.
    pub backoff: Backoff,
    /// Password checks running at once (`password_check`): each holds the memory of
    /// its hash (19 MiB for argon2id), so their number must not follow the clients'.
    password_checks: tokio::sync::Semaphore,
    /// MQTT 5 enhanced authentication methods, by name (SCRAM-SHA-256 built in).
    pub auth_methods: Vec<Arc<dyn AuthMethod>>,
    pub router: Router<Session>,
    /// Sessions by client id, connected or not.
    sessions: DashMap<ByteStr, Arc<Session>>,
    /// Messages held for clients (queued, in flight) and the retained store
    /// (`limits.max_queued_memory`).
    pub memory: Arc<Budget>,
    /// What sessions share: their limits, the memory budget, the journal to the store.
    env: Arc<Env>,
    /// Partly received packets and write buffers (`limits.max_buffered_memory`).
    pub buffers: Budget,
    /// Client connections open now, all listeners together.
    connections: AtomicUsize,
    next_id: AtomicU64,
    /// Cancelled on shutdown (`begin_shutdown`): listeners stop accepting and
    /// connections close.
    pub shutdown: CancellationToken,
    /// Every task of the broker (accept loops, connections, timers), for shutdown.
    pub tasks: TaskTracker,
    /// The clients connected now (for the admin API and `/metrics`).
    pub clients: Clients,
    /// When the broker started, on its clock (`now()`) and on the wall clock.
    pub started: Instant,
    pub started_at: SystemTime,
    /// The other nodes, when this broker is one node of a cluster (src/cluster).
    peers: OnceLock<Arc<dyn Peers>>,
}

/// The other nodes of a cluster, as the broker sees them; `cluster::Cluster` is the one
/// implementation. The broker tells them what its sessions subscribe to and publish,
/// and asks them for a client id before it opens that client's session.
pub trait Peers: Send + Sync {
    /// A message published on this node: routed to this node's sessions (their plain
    /// subscriptions), sent to the other nodes whose sessions want it, and to one member
    /// of each matching shared subscription, wherever it is. Returns how many sessions,
    /// nodes and groups took it.
    fn publish(&self, message: &Arc<Message>) -> usize;
    /// A session of this node subscribed to `filter` (as written, `$share/..` included).
    fn subscribed(&self, filter: &str);
    /// A session of this node let go of `filter`.
    fn unsubscribed(&self, filter: &str);
    /// Makes this node the owner of `client_id` in the cluster, before its session is
    /// opened: the node that had it gives it up (its connection is taken over) and its
    /// stored state is loaded here. Resolves to a guard to hold until the session is
    /// open; an error refuses the CONNECT.
    fn claim<'a>(&'a self, client_id: &'a ByteStr) -> BoxFuture<'a, Result<Claimed, String>>;
    /// The session of `client_id` ended on this node: its claim on the id goes.
    fn session_ended(&self, client_id: &ByteStr);
}

/// Held while a claimed session is being opened (see `Peers::claim`).
pub type Claimed = Box<dyn Send>;

/// Why the broker cannot take one more message it would keep (`Broker::no_room`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoom {
    /// The broker's message memory (`limits.max_queued_memory`) is used up.
    Memory,
    /// The store is past `persistence.max_disk_bytes`, or a write failed.
    Store,
}

impl NoRoom {
    pub fn why(self) -> &'static str {
        match self {
            NoRoom::Memory => "the broker's message memory (max_queued_memory) is used up",
            NoRoom::Store => "the store cannot take more (max_disk_bytes, or it is failing)",
        }
    }
}

/// Password checks at once: one per core, at most 4 (4 × 19 MiB of argon2id memory);
/// more clients wait their turn, holding no more than their CONNECT.
fn password_checks() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

impl Broker {
    /// A broker with `config` that keeps its state in memory only; fails if a file of
    /// `[auth]` cannot be used.
    pub fn new(
        config: Config,
        auth_methods: Vec<Arc<dyn AuthMethod>>,
    ) -> Result<Arc<Broker>, SecurityError> {
        Broker::with_journal(config, auth_methods, Journal::off())
    }

    /// A broker that records its persistent state in `journal`'s store.
    pub fn with_journal(
        config: Config,
        mut auth_methods: Vec<Arc<dyn AuthMethod>>,
        journal: Journal,
    ) -> Result<Arc<Broker>, SecurityError> {
        let security = Arc::new(Authenticator::load(config.auth.clone())?);
        auth_methods.push(Arc::new(Scram {
            authenticator: security.clone(),
        }));
        let memory = Arc::new(Budget::new(config.limits.max_queued_memory));
        let s = &config.session;
        let env = Arc::new(Env {
            limits: QueueLimits {
                max_inflight: s.max_inflight_messages,
                max_queued: s.max_queued_messages,
                max_queued_bytes: s.max_queued_bytes,
                queue_qos0: s.queue_qos0_messages,
            },
            budget: memory.clone(),
            journal: Arc::new(journal),
        });
        Ok(Arc::new(Broker {
            env,
            security,
            security_generation: AtomicU64::new(0),
            backoff: Backoff::new(BackoffConfig::default()),
            password_checks: tokio::sync::Semaphore::new(password_checks()),
            buffers: Budget::new(config.limits.max_buffered_memory),
            router: Router::new(memory.clone()),
            memory,
            connections: AtomicUsize::new(0),
            config,
            auth_methods,
            sessions: DashMap::new(),
            next_id: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            clients: Clients::default(),
            started: now(),
            started_at: SystemTime::now(),
            peers: OnceLock::new(),
        }))
    }

    /// Reads the password file, the ACL and the token keys again; on error the old ones
    /// stay. Connected clients get the new ACL from their next delivery on.
    pub fn reload_security(&self) -> Result<(), SecurityError> {
        self.security.reload()?;
        self.security_generation.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Changes with every reload of the security files.
    pub fn security_generation(&self) -> u64 {
        self.security_generation.load(Ordering::Relaxed)
    }

    /// Runs a credentials check (`Authenticator::authenticate`) off the runtime, once one
    /// of the few password-check slots is free: a crowd of clients with passwords waits
    /// its turn, holding only its request, instead of making the broker hold one hash's
    /// memory per client. None if the check could not run (shutdown, a panic).
    pub async fn password_check<T: Send + 'static>(
        &self,
        check: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let _slot = self.password_checks.acquire().await.ok()?;
        tokio::task::spawn_blocking(check).await.ok()
    }

    /// A fresh id for a connection or a session.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Where persistent state is recorded.
    pub fn journal(&self) -> &Journal {
        &self.env.journal
    }

    /// What every session shares.
    pub fn session_env(&self) -> Arc<Env> {
        self.env.clone()
    }

    /// Registers a restored session (start-up, or loaded in a cluster before a connection
    /// resumes it).
    pub(crate) fn adopt(&self, session: Arc<Session>) {
        self.sessions.insert(session.client_id.clone(), session);
    }

    /// Makes this broker one node of a cluster (once, before it serves clients).
    pub fn join(&self, peers: Arc<dyn Peers>) {
        let _ = self.peers.set(peers);
    }

    pub fn peers(&self) -> Option<&Arc<dyn Peers>> {
        self.peers.get()
    }

    /// In a cluster, makes this node the owner of `client_id` before its session is
    /// opened (see `Peers::claim`): the guard is held until it is. Alone, nothing to do.
    pub async fn claim(&self, client_id: &ByteStr) -> Result<Option<Claimed>, String> {
        match self.peers.get() {
            None => Ok(None),
            Some(peers) => peers.claim(client_id).await.map(Some),
        }
    }

    /// Subscribes `session` in the router, and tells the other nodes of a filter it did
    /// not hold. Returns whether it had that subscription.
    pub(crate) fn route(
        &self,
        filter: &str,
        session: &Arc<Session>,
        options: SubOptions,
        id: Option<u32>,
    ) -> bool {
        let existed = self.router.subscribe(filter, session, options, id);
        if let (false, Some(peers)) = (existed, self.peers.get()) {
            peers.subscribed(filter);
        }
        existed
    }

    /// The reverse of `route`.
    fn unroute(&self, filter: &str, session: u64) -> bool {
        let existed = self.router.unsubscribe(filter, session);
        if let (true, Some(peers)) = (existed, self.peers.get()) {
            peers.unsubscribed(filter);
        }
        existed
    }

    /// Gives the session of `client_id` to another node of the cluster: its connection,
    /// if any, ends as taken over (5.0 DISCONNECT 0x8E), and the session leaves this node
    /// (registry, router, timers) as it is: not ended, its stored state left for the node
    /// that takes it. Returns whether there was one.
    pub fn release(&self, client_id: &ByteStr) -> bool {
        let Some((_, session)) = self.sessions.remove(client_id) else {
            return false;
        };
        let control = session.control();
        let (link, filters) = session.release();
        for f in &filters {
            self.unroute(f, session.id);
        }
        drop(control);
        wake(link);
        true
    }

    /// Every session of this node, connected or not.
    pub fn sessions(&self) -> Vec<Arc<Session>> {
        self.sessions.iter().map(|e| e.value().clone()).collect()
    }

    /// Gives `client_id`'s session to a new connection. A stored session is resumed
    /// unless `clean_start` or it cannot be (it was to end with its connection, or has
    /// ended): then it is discarded and a new one made. A connection that loses the
    /// session is woken to find out. `expiry` is the session's new expiry interval (see
    /// `SessionState::expiry`). Returns the session and whether it was resumed.
    pub fn open_session(
        &self,
        client_id: &ByteStr,
        clean_start: bool,
        expiry: u32,
        link: Link,
        now: Instant,
    ) -> (Arc<Session>, bool) {
        let mut entry = match self.sessions.entry(client_id.clone()) {
            Entry::Occupied(entry) => entry,
            Entry::Vacant(entry) => {
                let session = self.new_session(client_id, link, expiry);
                entry.insert(session.clone());
                return (session, false);
            }
        };
        let old = entry.get().clone();
        let control = old.control();
        if !clean_start {
            if let Some(previous) = old.resume(link.clone(), expiry) {
                drop(control);
                wake(previous);
                return (old, true);
            }
        }
        let (previous, ended) = old.discard();
        self.clean_up(&old, ended, now);
        drop(control);
        wake(previous);
        let session = self.new_session(client_id, link, expiry);
        entry.insert(session.clone());
        (session, false)
    }

    fn new_session(&self, client_id: &ByteStr, link: Link, expiry: u32) -> Arc<Session> {
        let s = Session::new(self.next_id(), client_id.clone(), self.env.clone());
        s.attach_new(link, expiry);
        Arc::new(s)
    }

    /// Subscribes the session its connection `conn_id` owns to `filter`, in the router
    /// and in the session state together. Returns whether it had that subscription.
    pub fn subscribe(
        &self,
        session: &Arc<Session>,
        conn_id: u64,
        filter: &ByteStr,
        options: SubOptions,
        id: Option<u32>,
    ) -> Result<bool, NotOwner> {
        let _control = session.control();
        if !session.is_owned_by(conn_id) {
            return Err(NotOwner);
        }
        let existed = self.route(filter, session, options, id);
        let sub = crate::session::Subscription { options, id };
        let recorded = session.with_state(conn_id, |s| s.subscribe(filter.clone(), sub));
        // Cannot fail: under `control` the owner checked above stays the owner (takeover,
        // discard and release take `control`; expiry ends only offline sessions; the
        // owner's own detach never overlaps its subscribe), so the route just added
        // never needs undoing, which could remove a subscription the session had.
        debug_assert!(recorded.is_ok(), "lost ownership under `control`");
        recorded?;
        Ok(existed)
    }

    /// The reverse of `subscribe`. Returns whether the subscription existed.
    pub fn unsubscribe(
        &self,
        session: &Arc<Session>,
        conn_id: u64,
        filter: &str,
    ) -> Result<bool, NotOwner> {
        let _control = session.control();
        if !session.is_owned_by(conn_id) {
            return Err(NotOwner);
        }
        session.with_state(conn_id, |s| s.unsubscribe(filter))?;
        Ok(self.unroute(filter, session.id))
    }

    /// Whether a publish of `qos`/`retain` must be refused before it is acknowledged (MQTT
    /// and HTTP publishers alike): a message the broker keeps (QoS 1/2 or retained) while
    /// its message memory or the store is full. QoS 0 is taken: it may be dropped anyway.
    pub fn no_room(&self, qos: QoS, retain: bool) -> Option<NoRoom> {
        if qos == QoS::AtMostOnce && !retain {
            None
        } else if self.memory.level() == Level::Exhausted {
            Some(NoRoom::Memory)
        } else if !self.env.journal.has_room() {
            Some(NoRoom::Store)
        } else {
            None
        }
    }

    /// Routes a message from a client (or a will): stored if retained, then handed to
    /// the subscribers. Returns how many took it.
    pub fn publish(&self, message: &Arc<Message>) -> usize {
        if message.retain {
            self.router.retain(message);
            let journal = &self.env.journal;
            // $SYS values are the running broker's own: made afresh after a restart,
            // never read back from the store (as mosquitto).
            if journal.is_on() && !message.topic.starts_with("$SYS/") {
                let op = if message.payload.is_empty() {
                    Op::ClearRetained {
                        topic: message.topic.clone(),
                    }
                } else {
                    Op::SetRetained(journal.message(message))
                };
                journal.submit(vec![op]);
            }
        }
        match self.peers.get() {
            // Shared subscriptions are served cluster-wide: the peers pick the member.
            // $SYS topics are each node's own, never sent to the others.
            Some(peers) if !message.topic.starts_with("$SYS/") => peers.publish(message),
            _ => self.router.publish(message),
        }
    }

    /// Publishes a will. Its Message Expiry Interval counts from now, not from the
    /// CONNECT that carried it (MQTT 5.0, 3.1.3.2.4).
    pub fn publish_will(&self, will: &Message, now: Instant) {
        tracing::debug!(topic = %will.topic, "publishing will");
        self.publish(&Arc::new(Message::new(
            will.topic.clone(),
            will.payload.clone(),
            will.qos,
            will.retain,
            will.properties.clone(),
            will.origin,
            now,
        )));
    }

    /// Finishes what a connection leaving its session started. An ended session is
    /// removed; a lasting one gets timers for its delayed will and its expiry.
    pub fn detached(
        self: &Arc<Self>,
        session: &Arc<Session>,
        conn_id: u64,
        detached: Detached,
        will_delay: u32,
        now: Instant,
    ) {
        let expiry = match detached {
            Detached::Ended(ended) => {
                let removed = self
                    .sessions
                    .remove_if(&session.client_id, |_, s| Arc::ptr_eq(s, session));
                let control = session.control();
                self.clean_up(session, ended, now);
                drop(control);
                if let (Some(_), Some(peers)) = (removed, self.peers.get()) {
                    peers.session_ended(&session.client_id);
                }
                return;
            }
            Detached::Kept { expiry } => expiry,
        };
        let expiry = (expiry != NEVER_EXPIRE).then(|| now + Duration::from_secs(u64::from(expiry)));
        let will_at = (will_delay > 0).then(|| now + Duration::from_secs(u64::from(will_delay)));
        self.schedule(session, conn_id, expiry, will_at);
    }

    /// The timers of an offline session (left by `conn_id`): its delayed will at
    /// `will_at`, its end at `expires_at`. Each acts only if the session is still offline
    /// since that same connection; a will due after the session's end goes with the end.
    pub(crate) fn schedule(
        self: &Arc<Self>,
        session: &Arc<Session>,
        conn_id: u64,
        expires_at: Option<Instant>,
        will_at: Option<Instant>,
    ) {
        let will_at = will_at.filter(|w| expires_at.is_none_or(|e| *w < e));
        if expires_at.is_none() && will_at.is_none() {
            return;
        }
        let (broker, owner) = (self.clone(), session.clone());
        let session = owner.clone();
        let timer = self.tasks.spawn(async move {
            let timers = async {
                if let Some(w) = will_at {
                    tokio::time::sleep_until(w.into()).await;
                    if let Some(will) = session.take_pending_will(conn_id) {
                        broker.publish_will(&will, now());
                    }
                }
                if let Some(e) = expires_at {
                    tokio::time::sleep_until(e.into()).await;
                    broker.expire(&session, conn_id, now());
                }
            };
            tokio::select! {
                _ = broker.shutdown.cancelled() => {}
                _ = timers => {}
            }
        });
        // One timer per session: a session that comes and goes (a long poll, a flaky
        // device) does not pile up sleeping tasks until its expiry.
        owner.set_timer(timer.abort_handle());
    }

    /// Ends `session` if it is still offline since `conn_id` left it: decided and
    /// removed from the registry in one step, so that a CONNECT racing the expiry either
    /// resumes the session before or gets a new one after, never the dying one.
    fn expire(&self, session: &Arc<Session>, conn_id: u64, now: Instant) {
        let mut ended = None;
        self.sessions.remove_if(&session.client_id, |_, s| {
            if !Arc::ptr_eq(s, session) {
                return false;
            }
            ended = session.expire(conn_id);
            ended.is_some()
        });
        if let Some(ended) = ended {
            tracing::debug!(client_id = %session.client_id, "session expired");
            crate::metrics::add(crate::metrics::Counter::SessionsExpired, 1);
            let control = session.control();
            self.clean_up(session, ended, now);
            drop(control);
            if let Some(peers) = self.peers.get() {
                peers.session_ended(&session.client_id);
            }
        }
    }

    /// What an ended session leaves to do: its delayed will goes out, its subscriptions
    /// leave the router, and shared-subscription messages it never received go to other
    /// members. Called with the session's control lock held.
    fn clean_up(&self, session: &Session, ended: Ended, now: Instant) {
        if let Some(will) = &ended.will {
            self.publish_will(will, now);
        }
        for f in &ended.filters {
            self.unroute(f, session.id);
        }
        let max_waiting = self.config.session.max_queued_messages;
        for orphan in ended.orphans {
            if !self
                .router
                .redeliver_shared(orphan, session.id, max_waiting)
            {
                crate::metrics::dropped(crate::metrics::Dropped::QueueFull);
            }
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

    /// Counts a new connection on `listener` for as long as the guard lives, and tells
    /// whether it is within the limits (one too many is refused at its CONNECT). The guard
    /// holds the listener itself, so that the connection need not keep its `Peer`.
    pub fn open_connection(self: &Arc<Self>, listener: &Arc<ListenerRules>) -> (Opened, bool) {
        let all = self.connections.fetch_add(1, Ordering::Relaxed) + 1;
        let here = listener.enter();
        let over = |n: usize, max: usize| max > 0 && n > max;
        let within_limits =
            !over(all, self.config.limits.max_connections) && !over(here, listener.max_connections);
        let opened = Opened {
            broker: self.clone(),
            listener: listener.clone(),
        };
        (opened, within_limits)
    }

    /// Client connections open now.
    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    pub fn session(&self, client_id: &str) -> Option<Arc<Session>> {
        self.sessions
            .get(&ByteStr::from(client_id))
            .map(|s| s.clone())
    }

    /// Every session, connected or not, in no particular order (for the admin API and
    /// `$SYS`; holds each registry shard's read lock while it copies it).
    pub fn all_sessions(&self) -> Vec<Arc<Session>> {
        self.sessions.iter().map(|s| s.value().clone()).collect()
    }
}

/// A connection counted against the limits, until dropped. It lives as long as the
/// connection (in its task, or parked): the verdict on the limits is not kept in it.
pub struct Opened {
    broker: Arc<Broker>,
    listener: Arc<ListenerRules>,
}

impl Opened {
    pub fn listener(&self) -> &Arc<ListenerRules> {
        &self.listener
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        self.broker.connections.fetch_sub(1, Ordering::Relaxed);
        self.listener.leave();
    }
}

/// Tells a connection that its session has been taken from it.
fn wake(link: Option<Link>) {
    if let Some(link) = link {
        link.wire.wake();
    }
}
