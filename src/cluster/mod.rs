//! Several brokers as one, on NATS JetStream (docs/cluster.md). Runs only with a
//! `[cluster]` section; without it no code here runs and no NATS is needed.
//!
//! - `names`: subjects, streams, buckets, key tokens.
//! - `wire`: a message between nodes as bytes.
//! - `interest`: which node wants which topic (the interest bucket, mirrored in a router).
//! - `records`, `store`: the `Store` on JetStream (sessions' state, retained messages),
//!   which also carries QoS 1/2 messages to other nodes.
//! - `inbox`: taking the messages sent to this node into its sessions.
//! - `mirror`: keeping the interest and retained buckets and their local copies in step.
//! - `ownership`: one owner per client id (claim, hand-over).
//! - `handover`: what reaches a session that moved lately, and through which node.
//! - `liveness`: heartbeats, and adopting the sessions and messages of a dead node.
//! - `js`: JetStream set-up and reads.
//!
//! The broker knows the cluster only through `broker::Peers`.

mod handover;
mod inbox;
mod interest;
mod js;
mod liveness;
mod mirror;
pub mod names;
mod ownership;
mod records;
mod store;
pub mod wire;

use crate::broker::{Broker, Claimed, Peers};
use crate::config::ClusterConfig;
use crate::message::{Delivery, Message};
use crate::metrics::Dropped;
use crate::protocol::ByteStr;
use crate::session::journal::Journal;
use crate::store::{BoxFuture, Store};
use async_nats::jetstream::{self, kv, Context};
use bytes::Bytes;
use handover::Went;
use interest::Interest;
use names::Names;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;
use store::JsStore;
use tokio::sync::mpsc;

/// Why a node could not join its cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot connect to NATS ({urls}): {error}")]
    Connect { urls: String, error: String },
    #[error("NATS: {0}")]
    Nats(String),
    #[error("cannot read the NATS credentials file {path}: {error}")]
    Credentials { path: String, error: String },
    #[error("node {0} is already running in this cluster (its heartbeat is fresh)")]
    NodeInUse(String),
    #[error(
        "NATS ({0}) refused this node's credentials: check [cluster] user, password, creds_file"
    )]
    Refused(String),
}

/// QoS 0 messages waiting to be sent to other nodes; past this they are dropped (and
/// counted), as a slow subscriber's queue drops them.
const LIVE_QUEUE: usize = 64 * 1024;
/// QoS 0 messages for one node go in NATS messages of at most this size.
const LIVE_BATCH_BYTES: usize = 256 * 1024;

/// A NATS connection with the cluster's streams and buckets in place, before the broker
/// exists (its store is needed to make the broker).
pub struct Connected {
    config: ClusterConfig,
    client: async_nats::Client,
    js: Context,
    names: Names,
    store: Arc<JsStore>,
}

impl Connected {
    /// The journal of a node: every change goes to JetStream, and acknowledgements wait
    /// for it (as `sync = "always"` does for the disk store).
    pub fn journal(&self) -> Journal {
        let store: Arc<dyn Store> = self.store.clone();
        Journal::new(Some(store), true, crate::clock::now(), 0)
    }
}

/// Connects to NATS and makes (or finds) the cluster's streams and buckets.
pub async fn connect(config: &ClusterConfig) -> Result<Connected, ClusterError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(format!("ternmq {}/{}", config.name, config.node))
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(5)))
        // Reconnects for ever: the cluster of NATS servers comes back, this node waits.
        .max_reconnects(None)
        // A node started with its NATS servers waits for them (see `js::patiently`).
        .retry_on_initial_connect()
        // Soon: a node that stays away longer than the node timeout is taken for dead.
        .reconnect_delay_callback(|attempts| Duration::from_millis(50 * attempts.min(20) as u64));
    if let (Some(user), Some(password)) = (&config.user, &config.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(path) = &config.creds_file {
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| ClusterError::Credentials {
                path: path.display().to_string(),
                error: e.to_string(),
            })?;
    }
    if let Some(ca) = &config.tls_ca_file {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    let urls = config.nats.join(", ");
    let addrs: Vec<async_nats::ServerAddr> = config
        .nats
        .iter()
        .map(|u| u.parse())
        .collect::<Result<_, _>>()
        .map_err(|e: std::io::Error| ClusterError::Connect {
            urls: urls.clone(),
            error: e.to_string(),
        })?;
    // The client keeps retrying a server that refuses it: noted, so that the start fails
    // at once with the reason instead of timing out.
    let refused = Arc::new(AtomicBool::new(false));
    let seen = refused.clone();
    options = options.event_callback(move |event| {
        use async_nats::{ClientError, ConnectErrorKind, Event, ServerError};
        let refusal = ConnectErrorKind::AuthorizationViolation.to_string();
        match event {
            // A failed connection attempt comes as its error kind, in words.
            Event::ClientError(ClientError::Other(why)) if why == refusal => {
                seen.store(true, Ordering::Relaxed)
            }
            Event::ServerError(ServerError::AuthorizationViolation) => {
                seen.store(true, Ordering::Relaxed)
            }
            Event::Connected => seen.store(false, Ordering::Relaxed),
            _ => {}
        }
        async {}
    });
    let client = options
        .connect(addrs)
        .await
        .map_err(|e| ClusterError::Connect {
            urls: urls.clone(),
            error: e.to_string(),
        })?;
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .max_ack_inflight(16 * 1024)
        .build(client.clone());
    let names = Names::new(&config.name);
    js::patiently(|| async {
        match js::set_up(&js, &names, config.replicas).await {
            Err(_) if refused.load(Ordering::Relaxed) => Err(ClusterError::Refused(urls.clone())),
            other => other,
        }
    })
    .await?;
    let store = Arc::new(JsStore::start(js.clone(), names.clone(), &config.node));
    Ok(Connected {
        config: config.clone(),
        client,
        js,
        names,
        store,
    })
}

/// This node's part in the cluster: what `broker::Peers` asks of it, and its tasks.
pub struct Cluster {
    node: String,
    config: ClusterConfig,
    names: Names,
    client: async_nats::Client,
    js: Context,
    store: Arc<JsStore>,
    interest: Interest,
    owners: kv::Store,
    nodes: kv::Store,
    live: mpsc::Sender<(String, Bytes)>,
    /// NATS's largest message (the servers' `max_payload`, 1 MiB by default).
    max_payload: usize,
    claims: ownership::Claims,
    handover: handover::Handover,
    liveness: liveness::Liveness,
    broker: OnceLock<Weak<Broker>>,
    /// This node itself, for the tasks it starts.
    this: OnceLock<Weak<Cluster>>,
}

/// Joins `broker` (made with `connected.journal()`) to its cluster: mirrors the other
/// nodes' interest and the retained messages, takes back this node's own sessions, and
/// starts taking messages, hand-over requests and heartbeats. Returns once the node is
/// ready to serve clients.
pub async fn start(
    broker: &Arc<Broker>,
    connected: Connected,
) -> Result<Arc<Cluster>, ClusterError> {
    let Connected {
        config,
        client,
        js,
        names,
        store,
    } = connected;
    // Bucket calls give up sooner than bulk writes: a claim or a heartbeat tries again
    // at once, which finds a stream's new leader sooner after a NATS server is lost.
    let quick = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(client.clone());
    let bucket = |name: String| {
        let js = quick.clone();
        js::patiently(move || {
            let (js, name) = (js.clone(), name.clone());
            async move {
                js.get_key_value(&name)
                    .await
                    .map_err(|err| ClusterError::Nats(format!("bucket {name}: {err}")))
            }
        })
    };
    let owners = bucket(names.owners_bucket()).await?;
    let nodes = bucket(names.nodes_bucket()).await?;
    let interest_kv = bucket(names.interest_bucket()).await?;
    let retained_kv = bucket(names.retained_bucket()).await?;
    let (interest, changes) = Interest::new(&config.node);
    let (live, live_rx) = mpsc::channel(LIVE_QUEUE);
    let max_payload = match client.server_info().max_payload {
        0 => 1 << 20,
        n => n,
    };
    let cluster = Arc::new(Cluster {
        node: config.node.clone(),
        liveness: liveness::Liveness::new(&config),
        config,
        names,
        client,
        js,
        store,
        interest,
        owners,
        nodes,
        live,
        max_payload,
        claims: ownership::Claims::default(),
        handover: handover::Handover::default(),
        broker: OnceLock::new(),
        this: OnceLock::new(),
    });
    let _ = cluster.broker.set(Arc::downgrade(broker));
    let _ = cluster.this.set(Arc::downgrade(&cluster));
    broker.join(cluster.clone());

    js::patiently(|| cluster.liveness.announce(&cluster)).await?;
    let ready = mirror::Ready::default();
    mirror::spawn_interest_writer(broker, &cluster, interest_kv.clone(), changes);
    js::patiently(|| mirror::spawn_interest_watch(broker, &cluster, interest_kv.clone(), &ready))
        .await?;
    js::patiently(|| mirror::spawn_retained_watch(broker, &cluster, retained_kv.clone(), &ready))
        .await?;
    ready.wait().await;
    let restored = js::patiently(|| liveness::take_back_own_sessions(&cluster, broker)).await?;
    js::patiently(|| inbox::spawn(broker, &cluster)).await?;
    js::patiently(|| ownership::spawn_responder(broker, &cluster)).await?;
    liveness::spawn(broker, &cluster);
    spawn_sweeper(broker, &cluster);
    spawn_live_sender(broker, cluster.client.clone(), live_rx);
    tracing::info!(
        cluster = %cluster.config.name,
        node = %cluster.node,
        sessions = restored,
        filters = cluster.interest.local_count(),
        mirrored_interest = cluster.interest.mirrored(),
        "joined the cluster"
    );
    Ok(cluster)
}

impl Cluster {
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Filters of other nodes (and shared ones of this node) this node knows of: for
    /// tests, which wait for a subscription to be seen cluster-wide.
    pub fn mirrored_interest(&self) -> usize {
        self.interest.mirrored()
    }

    /// Whether some node's `filter` (as subscribed) is known here.
    pub fn knows(&self, node: &str, filter: &str) -> bool {
        self.interest.knows(&names::interest_key(node, filter))
    }

    fn store_dyn(&self) -> &dyn Store {
        &*self.store
    }

    fn broker(&self) -> Option<Arc<Broker>> {
        self.broker.get().and_then(Weak::upgrade)
    }

    fn this(&self) -> Option<Arc<Cluster>> {
        self.this.get().and_then(Weak::upgrade)
    }

    /// Routes `message`, which `went` to some nodes (this one among them), into this
    /// node's sessions, but for those that made a hop on one of these nodes lately (it
    /// reaches them through there), and forwards it to the sessions that left this node
    /// lately and want it (handover.rs).
    fn route_here(&self, broker: &Broker, message: &Arc<Message>, went: Went<'_>) -> usize {
        let handover = &self.handover;
        let _routing = handover.routing();
        // The clock is read only when a session moved lately.
        let now = std::cell::OnceCell::new();
        let now = || *now.get_or_init(crate::clock::now);
        let topic = &*message.topic;
        let here = broker.router.publish_plain_if(message, |s| {
            !(handover.has_arrivals() && handover.skips(&s.client_id, went, topic, now()))
        });
        if !handover.has_departures() {
            return here;
        }
        let forwards = handover.forwards(message, went, now());
        here + self.forward_each(broker, message, forwards)
    }

    /// Sends `message` on to each departed session of `forwards` (its bytes made once).
    fn forward_each(
        &self,
        broker: &Broker,
        message: &Arc<Message>,
        forwards: Vec<handover::Forward>,
    ) -> usize {
        if forwards.is_empty() {
            return 0;
        }
        let Some(body) = self.body(broker, message) else {
            return 0;
        };
        let sent = forwards.iter().filter(|f| {
            let to = (&*f.client_id, f.hop);
            self.ship_to_session(message, &body, &f.to, to, None)
        });
        sent.count()
    }

    /// Sends `message` to `node` for one session there, `(client id, hop)` (a member of
    /// the group `shared`, if given): that session left this node for `node`.
    fn forward(
        &self,
        broker: &Broker,
        message: &Arc<Message>,
        node: &str,
        to: (&str, u64),
        shared: Option<(&str, &str)>,
    ) -> bool {
        self.body(broker, message)
            .is_some_and(|body| self.ship_to_session(message, &body, node, to, shared))
    }

    /// `forward` with the message's bytes (`body`) already made.
    fn ship_to_session(
        &self,
        message: &Message,
        body: &[u8],
        node: &str,
        to: (&str, u64),
        shared: Option<(&str, &str)>,
    ) -> bool {
        let header = wire::Header {
            origin: &self.node,
            shared,
            via: &[],
            to: Some(to),
        };
        self.ship(node, message, wire::frame(header, body))
    }

    /// Hands a message taken for a shared group to one local member (the group's pick
    /// was this node); with none here but one that left lately, forwards it there.
    /// False if no member took it.
    fn deliver_shared_here(
        &self,
        broker: &Broker,
        message: &Arc<Message>,
        key: Arc<crate::message::SharedKey>,
    ) -> bool {
        if !broker.router.has_shared_members(&key) {
            if let Some((client_id, node, hop)) = self.handover.departed_member(&key) {
                let shared = Some((&*key.group, &*key.filter));
                return self.forward(broker, message, &node, (&client_id, hop), shared);
            }
        }
        let delivery = Delivery {
            shared: Some(key),
            ..Delivery::new(message.clone(), message.qos, message.retain)
        };
        let max = broker.config.session.max_queued_messages;
        broker.router.redeliver_shared(delivery, 0, max)
    }

    /// The bytes of `message` every node it goes to shares.
    fn body(&self, broker: &Broker, message: &Arc<Message>) -> Option<Bytes> {
        let stored = broker.journal().message(message);
        wire::body(&stored)
            .inspect_err(
                |e| tracing::warn!(topic = %message.topic, "cannot send to other nodes: {e}"),
            )
            .ok()
    }

    /// Sends `frame` (of `message`) to `node`: QoS 0 over core NATS, QoS 1/2 through the
    /// store's writer into the messages stream. False if it could not go.
    fn ship(&self, node: &str, message: &Message, frame: Bytes) -> bool {
        if frame.len() > self.max_payload {
            tracing::warn!(
                topic = %message.topic,
                size = frame.len(),
                "message larger than NATS's max_payload: not sent to other nodes"
            );
            crate::metrics::dropped(Dropped::TooLarge);
            return false;
        }
        if message.qos == crate::protocol::QoS::AtMostOnce {
            if self
                .live
                .try_send((self.names.live_subject(node), frame))
                .is_err()
            {
                crate::metrics::dropped(Dropped::QueueFull);
                return false;
            }
        } else {
            self.store.forward(self.names.node_subject(node), frame);
        }
        true
    }

    /// Sends `message` to the nodes and groups `targets` name; each frame names the other
    /// nodes it went to (handover.rs).
    fn send(&self, broker: &Broker, message: &Arc<Message>, targets: &[interest::Target]) -> usize {
        let Some(body) = self.body(broker, message) else {
            return 0;
        };
        let mut nodes: Vec<&str> = Vec::new();
        if targets.len() > 1 {
            for (node, _) in targets {
                if **node != *self.node && !nodes.contains(&&**node) {
                    nodes.push(node);
                }
            }
        }
        let mut via: Vec<&str> = Vec::with_capacity(nodes.len());
        let mut taken = 0;
        for (node, shared) in targets {
            if **node == *self.node {
                if let Some(key) = shared {
                    if self.deliver_shared_here(broker, message, key.clone()) {
                        taken += 1;
                    } else {
                        crate::metrics::dropped(Dropped::QueueFull);
                    }
                }
                continue;
            }
            via.clear();
            via.extend(nodes.iter().filter(|n| ***n != **node));
            let header = wire::Header {
                origin: &self.node,
                shared: shared.as_ref().map(|k| (&*k.group, &*k.filter)),
                via: &via,
                to: None,
            };
            if self.ship(node, message, wire::frame(header, &body)) {
                taken += 1;
            }
        }
        taken
    }
}

impl Peers for Cluster {
    fn publish(&self, message: &Arc<Message>) -> usize {
        let Some(broker) = self.broker() else {
            return 0;
        };
        let targets = self.interest.targets(message);
        let went = |n: &str| n == &*self.node || targets.iter().any(|(t, _)| **t == *n);
        let here = self.route_here(&broker, message, &went);
        if targets.is_empty() {
            return here;
        }
        here + self.send(&broker, message, &targets)
    }

    fn subscribed(&self, filter: &str) {
        self.interest.subscribed(filter);
    }

    fn unsubscribed(&self, filter: &str) {
        self.interest.unsubscribed(filter);
    }

    fn claim<'a>(&'a self, client_id: &'a ByteStr) -> BoxFuture<'a, Result<Claimed, String>> {
        Box::pin(ownership::claim(self, client_id))
    }

    fn session_ended(&self, client_id: &ByteStr) {
        ownership::session_ended(self, client_id);
    }
}

/// Lets go of hand-over entries past their time (handover.rs).
fn spawn_sweeper(broker: &Arc<Broker>, cluster: &Arc<Cluster>) {
    let (shutdown, cluster) = (broker.shutdown.clone(), Arc::downgrade(cluster));
    broker.tasks.spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            let Some(c) = cluster.upgrade() else { return };
            c.handover.sweep(&c.interest, crate::clock::now());
        }
    });
}

/// Sends QoS 0 messages to other nodes over core NATS (no JetStream, no wait).
fn spawn_live_sender(
    broker: &Arc<Broker>,
    client: async_nats::Client,
    mut rx: mpsc::Receiver<(String, Bytes)>,
) {
    /// Messages taken from the queue at once: what queued while the last ones were sent
    /// goes in one NATS message per node (the per-message cost of NATS is most of the
    /// cost of a QoS 0 message between nodes).
    const TAKE: usize = 1024;
    let shutdown = broker.shutdown.clone();
    broker.tasks.spawn(async move {
        let mut taken = Vec::with_capacity(TAKE);
        loop {
            let n = tokio::select! {
                _ = shutdown.cancelled() => return,
                n = rx.recv_many(&mut taken, TAKE) => n,
            };
            if n == 0 {
                return;
            }
            let mut by_node: Vec<(String, Vec<Bytes>)> = Vec::new();
            for (subject, frame) in taken.drain(..) {
                match by_node.iter_mut().find(|(s, _)| *s == subject) {
                    Some((_, frames)) => frames.push(frame),
                    None => by_node.push((subject, vec![frame])),
                }
            }
            for (subject, frames) in by_node {
                for batch in wire::batches(&frames, LIVE_BATCH_BYTES) {
                    if let Err(e) = client.publish(subject.clone(), batch).await {
                        // The NATS connection is closed: its outgoing queue takes nothing.
                        tracing::debug!("QoS 0 messages to another node not sent: {e}");
                        crate::metrics::dropped(Dropped::QueueFull);
                    }
                }
            }
        }
    });
}
