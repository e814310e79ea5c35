//! Which nodes are alive, and what happens to the sessions and messages of one that is
//! not.
//!
//! Each node keeps its entry in the nodes bucket fresh (`alive <instance>`, every third of
//! `node_timeout`), by compare and set on its own last revision: if another node has
//! written it meanwhile (declared this one dead and adopted it), the CAS fails and this
//! node stops serving rather than run on beside the adopter.
//!
//! Every node watches the bucket. A node whose entry is older than `node_timeout` is
//! adopted by the first live node that sets its entry to `adopting <node>` (CAS): the
//! adopter takes every session the owners bucket gives the dead node (owner set by CAS,
//! state loaded from the store), deletes the dead node's interest entries (after its own
//! for the adopted sessions, in order), then takes what is left in the dead node's
//! durable consumer into those sessions, and at last marks the entry `adopted <node>`.
//! Clients of the dead node that reconnect anywhere then take their session over from
//! the adopter, as from any live node.

use super::inbox;
use super::ownership::{self, owner_value, parse_owner};
use super::{Cluster, ClusterError};
use crate::broker::Broker;
use crate::config::ClusterConfig;
use crate::protocol::ByteStr;
use crate::session::Session;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::kv::{Entry, Operation};
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use rustc_hash::{FxHashMap, FxHashSet};
use std::sync::Arc;
use std::time::Duration;

/// A dead node's consumer is read until no message came for this long.
const DRAIN_IDLE: Duration = Duration::from_millis(500);

/// How long a node waits for another's adoption of a dead node to finish.
const ADOPTION_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Alive(String),
    Adopting(String),
    /// By that node; its messages taken until then (unix ms, `Drain::tail`).
    Adopted(String, u64),
}

fn parse(value: &[u8]) -> Option<State> {
    let text = std::str::from_utf8(value).ok()?;
    let (kind, rest) = text.split_once(' ')?;
    Some(match kind {
        "alive" => State::Alive(rest.into()),
        "adopting" => State::Adopting(rest.into()),
        "adopted" => {
            let (node, until) = rest.split_once(' ').unwrap_or((rest, "0"));
            State::Adopted(node.into(), until.parse().unwrap_or(0))
        }
        _ => return None,
    })
}

fn encode(state: &State) -> Bytes {
    Bytes::from(match state {
        State::Alive(i) => format!("alive {i}"),
        State::Adopting(n) => format!("adopting {n}"),
        State::Adopted(n, until) => format!("adopted {n} {until}"),
    })
}

#[derive(Debug, Clone)]
struct Seen {
    state: State,
    revision: u64,
    /// When this entry was written, unix milliseconds.
    at_ms: u64,
    /// This node's own heartbeats written when the entry was seen.
    beats: u64,
}

/// Own heartbeats a node must have written since another's last one before it calls the
/// other dead: while the bucket is unavailable to all (a NATS server lost, its streams
/// electing leaders) nobody writes, and nobody is called dead.
const BEATS_BEFORE_DEAD: u64 = 3;

pub(super) struct Liveness {
    instance: String,
    timeout: Duration,
    nodes: Mutex<FxHashMap<String, Seen>>,
    /// This node's own last revision, for its CAS.
    revision: Mutex<u64>,
    /// This node's heartbeats written so far.
    beats: std::sync::atomic::AtomicU64,
}

fn now_ms() -> u64 {
    crate::store::now_millis()
}

fn created_ms(entry: &Entry) -> u64 {
    u64::try_from(entry.created.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

impl Liveness {
    pub(super) fn new(config: &ClusterConfig) -> Liveness {
        let mut r = [0u8; 8];
        let _ = getrandom::fill(&mut r);
        Liveness {
            instance: format!("{}-{:x}", now_ms(), u64::from_le_bytes(r)),
            timeout: config.node_timeout(),
            nodes: Mutex::new(FxHashMap::default()),
            revision: Mutex::new(0),
            beats: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Puts this node's heartbeat, after waiting out a fresh one of an earlier instance
    /// (a quick restart after a crash) or an adoption of this node under way (with its
    /// tail). Fails if another instance keeps it fresh.
    pub(super) async fn announce(&self, cluster: &Cluster) -> Result<(), ClusterError> {
        let nats = |e: &dyn std::fmt::Display| ClusterError::Nats(format!("nodes bucket: {e}"));
        let started = std::time::Instant::now();
        let limit = self.timeout * 3 + ADOPTION_WAIT;
        let mut seen_revision = None;
        loop {
            let entry = cluster
                .nodes
                .entry(cluster.node.clone())
                .await
                .map_err(|e| nats(&e))?;
            let Some(entry) = entry.filter(|e| e.operation == Operation::Put) else {
                break;
            };
            let age = Duration::from_millis(now_ms().saturating_sub(created_ms(&entry)));
            let busy = match parse(&entry.value) {
                Some(State::Alive(_)) => age < self.timeout,
                Some(State::Adopting(_)) => age < ADOPTION_WAIT,
                // Its adopter still takes what lagging senders send it (`Drain::tail`).
                Some(State::Adopted(_, until)) => now_ms() < until,
                _ => false,
            };
            if !busy {
                break;
            }
            if matches!(parse(&entry.value), Some(State::Alive(_)))
                && seen_revision.is_some_and(|r| r != entry.revision)
            {
                return Err(ClusterError::NodeInUse(cluster.node.clone()));
            }
            seen_revision = Some(entry.revision);
            if started.elapsed() > limit {
                return Err(ClusterError::NodeInUse(cluster.node.clone()));
            }
            tracing::info!(node = %cluster.node, "waiting for the previous run of this node to time out");
            tokio::time::sleep(self.timeout / 3).await;
        }
        let revision = cluster
            .nodes
            .put(
                cluster.node.clone(),
                encode(&State::Alive(self.instance.clone())),
            )
            .await
            .map_err(|e| nats(&e))?;
        *self.revision.lock() = revision;
        Ok(())
    }

    fn saw(&self, entry: &Entry, live: bool) {
        if entry.operation != Operation::Put {
            self.nodes.lock().remove(&entry.key);
            return;
        }
        let Some(state) = parse(&entry.value) else {
            return;
        };
        // History is dated by the server; live updates by their arrival (no clock skew).
        let at_ms = if live { now_ms() } else { created_ms(entry) };
        let beats = self.beats.load(std::sync::atomic::Ordering::Relaxed);
        self.nodes.lock().insert(
            entry.key.clone(),
            Seen {
                state,
                revision: entry.revision,
                at_ms,
                beats,
            },
        );
    }

    /// Nodes whose heartbeat is older than the timeout while this node kept writing its
    /// own, with the revision of their entry.
    fn dead(&self, me: &str) -> Vec<(String, u64)> {
        let now = now_ms();
        let timeout = self.timeout.as_millis() as u64;
        let beats = self.beats.load(std::sync::atomic::Ordering::Relaxed);
        self.nodes
            .lock()
            .iter()
            .filter(|(name, seen)| {
                let age = now.saturating_sub(seen.at_ms);
                // An adoption that never finished (its adopter died too) is taken up again.
                let stale = match seen.state {
                    State::Alive(_) => age > timeout,
                    State::Adopting(_) => age > ADOPTION_WAIT.as_millis() as u64,
                    State::Adopted(..) => false,
                };
                name.as_str() != me
                    && stale
                    && beats.saturating_sub(seen.beats) >= BEATS_BEFORE_DEAD
            })
            .map(|(name, seen)| (name.clone(), seen.revision))
            .collect()
    }

    /// Returns once `node`, which does not answer, has been adopted (by this node or
    /// another). Fails if it is alive after all, or the adoption does not finish.
    pub(super) async fn wait_gone(&self, cluster: &Cluster, node: &str) -> Result<(), String> {
        let deadline = std::time::Instant::now() + self.timeout * 2 + ADOPTION_WAIT;
        loop {
            let entry = cluster
                .nodes
                .entry(node.to_owned())
                .await
                .map_err(|e| format!("reading the nodes bucket: {e}"))?;
            let Some(entry) = entry.filter(|e| e.operation == Operation::Put) else {
                return Ok(());
            };
            let age = Duration::from_millis(now_ms().saturating_sub(created_ms(&entry)));
            match parse(&entry.value) {
                Some(State::Adopted(..)) | None => return Ok(()),
                Some(State::Alive(_)) if age > self.timeout => {
                    if let Some(broker) = cluster.broker() {
                        adopt(cluster, &broker, node, entry.revision).await;
                    }
                }
                Some(State::Adopting(_)) if age > ADOPTION_WAIT => {
                    if let Some(broker) = cluster.broker() {
                        adopt(cluster, &broker, node, entry.revision).await;
                    }
                }
                Some(State::Alive(_)) if std::time::Instant::now() > deadline => {
                    return Err("its heartbeat is fresh".into())
                }
                _ if std::time::Instant::now() > deadline => {
                    return Err("its adoption does not finish".into())
                }
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Heartbeats and the watch for dead nodes.
pub(super) fn spawn(broker: &Arc<Broker>, cluster: &Arc<Cluster>) {
    let (b, c) = (broker.clone(), cluster.clone());
    broker.tasks.spawn(async move {
        let every = c.liveness.timeout / 3;
        loop {
            tokio::select! {
                _ = b.shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let revision = *c.liveness.revision.lock();
            let alive = encode(&State::Alive(c.liveness.instance.clone()));
            match c.nodes.update(c.node.clone(), alive, revision).await {
                Ok(r) => {
                    *c.liveness.revision.lock() = r;
                    c.liveness.beats.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) if e.kind() == async_nats::jetstream::kv::UpdateErrorKind::WrongLastRevision => {
                    tracing::error!(node = %c.node, "another node declared this one dead and adopted its sessions; stopping");
                    b.begin_shutdown();
                    return;
                }
                Err(e) => tracing::warn!("heartbeat not written: {e}"),
            }
            for (node, revision) in c.liveness.dead(&c.node) {
                adopt(&c, &b, &node, revision).await;
            }
        }
    });
    let (b, c) = (broker.clone(), cluster.clone());
    broker.tasks.spawn(async move {
        let mut watch = match c.nodes.watch_with_history(">").await {
            Ok(w) => w,
            Err(e) => return tracing::error!("cannot watch the nodes bucket: {e}"),
        };
        let mut history = true;
        loop {
            let next = tokio::select! {
                _ = b.shutdown.cancelled() => return,
                next = watch.next() => next,
            };
            match next {
                Some(Ok(entry)) => {
                    c.liveness.saw(&entry, !history);
                    if entry.delta == 0 {
                        history = false;
                    }
                }
                _ => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    if let Ok(w) = c.nodes.watch(">").await {
                        watch = w;
                        history = false;
                    }
                }
            }
        }
    });
}

/// The client ids the owners bucket gives `node`.
async fn owned_by(cluster: &Cluster, node: &str) -> Result<Vec<ByteStr>, ClusterError> {
    let bucket = cluster.names.owners_bucket();
    let entries = super::js::last_per_subject(
        &cluster.js,
        &format!("KV_{bucket}"),
        &format!("$KV.{bucket}.>"),
    )
    .await?;
    Ok(entries
        .iter()
        .filter_map(|(_, value)| parse_owner(value))
        .filter(|(n, _)| *n == node)
        .map(|(_, client)| ByteStr::from(client))
        .collect())
}

/// At start: the sessions this node owned when it stopped, loaded from the store.
pub(super) async fn take_back_own_sessions(
    cluster: &Arc<Cluster>,
    broker: &Arc<Broker>,
) -> Result<usize, ClusterError> {
    let mine = owned_by(cluster, &cluster.node).await?;
    for client_id in &mine {
        ownership::load(cluster, broker, client_id, Vec::new())
            .await
            .map_err(ClusterError::Nats)?;
    }
    Ok(mine.len())
}

/// Adopts `dead` if this node is the first to claim it (CAS on its entry at `revision`).
async fn adopt(cluster: &Cluster, broker: &Arc<Broker>, dead: &str, revision: u64) {
    let claim = encode(&State::Adopting(cluster.node.clone()));
    let Ok(claimed) = cluster.nodes.update(dead.to_owned(), claim, revision).await else {
        return;
    };
    tracing::warn!(
        node = dead,
        "node is gone: adopting its sessions and messages"
    );
    let until = std::time::Instant::now() + super::handover::GRACE;
    match adopt_claimed(cluster, broker, dead, until).await {
        Ok(drain) => {
            let tail_ms = now_ms() + super::handover::GRACE.as_millis() as u64;
            let done = encode(&State::Adopted(cluster.node.clone(), tail_ms));
            if let Err(e) = cluster.nodes.put(dead.to_owned(), done).await {
                tracing::error!(node = dead, "adoption done but not recorded: {e}");
            }
            tracing::warn!(node = dead, sessions = drain.adopted.len(), "node adopted");
            // Its clients can take their sessions back now; messages that other nodes'
            // lagging mirrors still send it keep being taken for a while.
            if let Some(cluster) = cluster.this() {
                let broker = broker.clone();
                broker.clone().tasks.spawn(async move {
                    drain.tail(&cluster, &broker, until).await;
                });
            }
        }
        Err(e) => {
            tracing::error!(node = dead, "adoption failed: {e}; another node will try");
            // Back to a heartbeat nobody keeps fresh: taken for dead again after the
            // timeout, by whichever node is first then.
            let unclaimed = encode(&State::Alive("unadopted".into()));
            let _ = cluster
                .nodes
                .update(dead.to_owned(), unclaimed, claimed)
                .await;
        }
    }
}

async fn adopt_claimed(
    cluster: &Cluster,
    broker: &Arc<Broker>,
    dead: &str,
    until: std::time::Instant,
) -> Result<Drain, ClusterError> {
    let adopted = adopt_sessions(cluster, broker, dead, until).await?;
    forget_interest(cluster, dead).await?;
    cluster.interest.flush().await;
    let drain = Drain {
        dead: Arc::from(dead),
        adopted: adopted.iter().map(|s| s.client_id.clone()).collect(),
        consumer: inbox::fresh_consumer(cluster, dead, true).await?,
    };
    drain.run(cluster, broker).await;
    Ok(drain)
}

/// Adoption, first: the dead node's sessions, each by CAS on its owner entry, loaded here.
async fn adopt_sessions(
    cluster: &Cluster,
    broker: &Arc<Broker>,
    dead: &str,
    until: std::time::Instant,
) -> Result<Vec<Arc<Session>>, ClusterError> {
    // Adopted sessions get what was sent to the dead node through its stream only
    // (an arrived entry from it: handover.rs).
    let mut adopted: Vec<Arc<Session>> = Vec::new();
    for client_id in owned_by(cluster, dead).await? {
        let key = super::names::token(&client_id);
        let Ok(Some(entry)) = cluster.owners.entry(key.clone()).await else {
            continue;
        };
        if parse_owner(&entry.value).is_none_or(|(n, _)| n != dead) {
            continue;
        }
        let value = owner_value(&cluster.node, &client_id);
        let Ok(revision) = cluster.owners.update(&key, value, entry.revision).await else {
            continue;
        };
        // Its messages come from the dead node's stream, as if forwarded from hop 0 there.
        let hop = super::handover::Link {
            node: Arc::from(dead),
            hop: 0,
            until,
        };
        ownership::load(cluster, broker, &client_id, vec![hop])
            .await
            .map_err(ClusterError::Nats)?;
        match broker.session(&client_id) {
            Some(session) => adopted.push(session),
            // A session that ended with its connection: nothing to keep an owner for.
            None => {
                let _ = cluster
                    .owners
                    .delete_expect_revision(&key, Some(revision))
                    .await;
            }
        }
    }
    Ok(adopted)
}

/// Adoption, second: its interest, deleted after this node's own for the adopted sessions (same writer).
async fn forget_interest(cluster: &Cluster, dead: &str) -> Result<(), ClusterError> {
    let bucket = cluster.names.interest_bucket();
    let entries = super::js::last_per_subject(
        &cluster.js,
        &format!("KV_{bucket}"),
        &format!("$KV.{bucket}.{dead}.>"),
    )
    .await?;
    let prefix = format!("$KV.{bucket}.");
    for (subject, value) in entries {
        if value.is_empty() {
            continue;
        }
        if let Some(key) = subject.strip_prefix(&prefix) {
            cluster.interest.delete_foreign(key.to_owned());
        }
    }
    Ok(())
}

/// Adoption, last: what is left in the dead node's consumer, into the adopted sessions
/// only (they were its sessions; the others had their copy), or on to where they went
/// since. Once the deletes above are written, the other nodes stop sending to it within
/// the time their watchers take: the consumer is read until nothing came for a moment
/// (`run`), the node is marked adopted, and the consumer is read on until the adopted
/// sessions' arrived entries end (`tail`: a lagging mirror's messages), then deleted.
struct Drain {
    dead: Arc<str>,
    adopted: FxHashSet<ByteStr>,
    consumer: PullConsumer,
}

impl Drain {
    async fn run(&self, cluster: &Cluster, broker: &Arc<Broker>) {
        let deliver = |envelope| self.deliver(cluster, broker, envelope);
        inbox::consume(broker, self.consumer.clone(), &deliver, Some(DRAIN_IDLE)).await;
    }

    async fn tail(self, cluster: &Cluster, broker: &Arc<Broker>, until: std::time::Instant) {
        while std::time::Instant::now() < until && !broker.shutdown.is_cancelled() {
            self.run(cluster, broker).await;
        }
        let _ = broker.journal().barrier().await;
        if let Ok(stream) = cluster
            .js
            .get_stream_no_info(cluster.names.messages_stream())
            .await
        {
            let _ = stream
                .delete_consumer(&cluster.names.consumer(&self.dead))
                .await;
        }
    }

    fn deliver(&self, cluster: &Cluster, broker: &Arc<Broker>, envelope: super::wire::Envelope) {
        let message = Arc::new(
            broker
                .journal()
                .restore_message(&envelope.message, crate::clock::now()),
        );
        match envelope.shared {
            // For a shared group: that group's member picked again, among the members
            // there are now (the other groups had their copy).
            Some((group, filter)) => {
                let same = |k: &Option<Arc<crate::message::SharedKey>>| {
                    k.as_ref()
                        .is_some_and(|k| *k.group == *group && *k.filter == *filter)
                };
                let targets = cluster.interest.targets(&message);
                let shared: Vec<_> = targets.into_iter().filter(|(_, k)| same(k)).collect();
                cluster.send(broker, &message, &shared);
            }
            None => {
                let _routing = cluster.handover.routing();
                let adopted = &self.adopted;
                broker
                    .router
                    .publish_plain_if(&message, |s| adopted.contains(&s.client_id));
                // Those that moved on since: as forwarded from hop 0 on the dead node.
                let (dead, now) = (&*self.dead, crate::clock::now());
                let mut forwards = cluster.handover.forwards(&message, &|_| false, now);
                forwards.retain(|f| f.chain.first().is_some_and(|l| *l.node == *dead));
                cluster.forward_each(broker, &message, forwards);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip() {
        for state in [
            State::Alive("1-ab".into()),
            State::Adopting("b".into()),
            State::Adopted("b".into(), 1_700_000_000_000),
        ] {
            assert_eq!(parse(&encode(&state)), Some(state));
        }
        // As an earlier version wrote it: no tail to wait for.
        assert_eq!(parse(b"adopted b"), Some(State::Adopted("b".into(), 0)));
        assert_eq!(parse(b"gone b"), None);
    }
}
