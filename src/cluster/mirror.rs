//! The buckets every node keeps a local copy of: the interest of the other nodes (into
//! the interest mirror) and the retained messages (into the broker's own retained tree,
//! so that subscribe-time walks stay local). Each is watched from its full history at
//! start, and the node serves clients only once both are read up to date. This node's
//! own interest changes are written to the bucket in order, by one task.

use super::interest::Change;
use super::names::untoken;
use super::{Cluster, ClusterError};
use crate::broker::Broker;
use crate::message::Message;
use crate::protocol::{ByteStr, QoS};
use crate::store::codec;
use async_nats::jetstream::kv::{self, Entry, Operation};
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How often a watch is checked against its bucket's last revision.
const STALL_CHECK: Duration = Duration::from_secs(2);

/// How long a node waits for a bucket to be read at start before it serves anyway.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// The watchers' signals that they have read their bucket up to date.
#[derive(Default)]
pub(super) struct Ready {
    waits: Mutex<Vec<oneshot::Receiver<()>>>,
}

impl Ready {
    fn register(&self) -> oneshot::Sender<()> {
        let (tx, rx) = oneshot::channel();
        self.waits.lock().push(rx);
        tx
    }

    pub(super) async fn wait(&self) {
        let waits = std::mem::take(&mut *self.waits.lock());
        for w in waits {
            if tokio::time::timeout(SYNC_TIMEOUT, w).await.is_err() {
                tracing::warn!("a cluster bucket was not read up to date in time; serving anyway");
            }
        }
    }
}

/// Writes this node's interest changes to the bucket, in order, retrying until NATS
/// takes them.
pub(super) fn spawn_interest_writer(
    broker: &Arc<Broker>,
    _cluster: &Arc<Cluster>,
    kv: kv::Store,
    mut changes: mpsc::UnboundedReceiver<Change>,
) {
    let shutdown = broker.shutdown.clone();
    broker.tasks.spawn(async move {
        loop {
            let change = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = changes.recv() => c,
            };
            let change = match change {
                None => return,
                Some(Change::Flush(done)) => {
                    let _ = done.send(());
                    continue;
                }
                Some(c) => c,
            };
            let mut delay = Duration::from_millis(100);
            loop {
                let result = match &change {
                    Change::Put { key, filter } => kv
                        .put(key, Bytes::copy_from_slice(filter.as_bytes()))
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string()),
                    Change::Delete { key } => kv.delete(key).await.map_err(|e| e.to_string()),
                    Change::Flush(_) => Ok(()),
                };
                match result {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(?change, "interest not written: {e}; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(delay) => {}
                        }
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                }
            }
        }
    });
}

/// Watches `kv` from its history on, calling `apply` with each entry; `ready` is told
/// once the history is read. A watch that breaks, or stalls (a NATS server lost: the
/// client's own recovery can take tens of seconds while streams elect leaders), starts
/// again after the last revision seen. Entries are applied idempotently, so one seen
/// twice across a new start does no harm.
async fn spawn_watch(
    broker: &Arc<Broker>,
    kv: kv::Store,
    ready: &Ready,
    apply: impl Fn(&Entry) + Send + 'static,
) -> Result<(), ClusterError> {
    let name = kv.name.clone();
    let nats = |e: &dyn std::fmt::Display| ClusterError::Nats(format!("watching {name}: {e}"));
    let empty = kv.status().await.map_err(|e| nats(&e))?.values() == 0;
    let mut watch = kv.watch_with_history(">").await.map_err(|e| nats(&e))?;
    let mut ready = Some(ready.register());
    if empty {
        ready.take().map(|r| r.send(()));
    }
    let shutdown = broker.shutdown.clone();
    broker.tasks.spawn(async move {
        let mut last = 0;
        let mut check = tokio::time::interval(STALL_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The bucket's last revision when this watch was last found behind it.
        let mut behind: Option<u64> = None;
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = watch.next() => next,
                _ = check.tick() => {
                    let Ok(Ok(info)) =
                        tokio::time::timeout(STALL_CHECK, kv.stream.get_info()).await
                    else {
                        continue;
                    };
                    let end = info.state.last_sequence;
                    if end <= last {
                        behind = None;
                        continue;
                    }
                    // Behind twice in a row with no entry between: stalled.
                    if behind.replace(end) != Some(end) {
                        continue;
                    }
                    tracing::warn!(bucket = %kv.name, last, end, "watch stalled; watching again");
                    behind = None;
                    None
                }
            };
            match next {
                Some(Ok(entry)) => {
                    last = entry.revision;
                    behind = None;
                    apply(&entry);
                    if entry.delta == 0 {
                        ready.take().map(|r| r.send(()));
                    }
                }
                other => {
                    if let Some(Err(e)) = other {
                        tracing::warn!(bucket = %kv.name, "watch failed: {e}; watching again");
                    }
                    // Until a new watch is made: the old one may be broken for good.
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        }
                        match kv.watch_all_from_revision(last + 1).await {
                            Ok(w) => break watch = w,
                            Err(e) => tracing::warn!(bucket = %kv.name, "cannot watch again: {e}"),
                        }
                    }
                }
            }
        }
    });
    Ok(())
}

pub(super) async fn spawn_interest_watch(
    broker: &Arc<Broker>,
    cluster: &Arc<Cluster>,
    kv: kv::Store,
    ready: &Ready,
) -> Result<(), ClusterError> {
    let cluster = Arc::downgrade(cluster);
    spawn_watch(broker, kv, ready, move |entry| {
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        match entry.operation {
            Operation::Put => match std::str::from_utf8(&entry.value) {
                Ok(filter) => cluster.interest.put(&entry.key, filter),
                Err(_) => tracing::warn!(key = %entry.key, "interest entry is not UTF-8; ignored"),
            },
            Operation::Delete | Operation::Purge => cluster.interest.delete(&entry.key),
        }
    })
    .await
}

pub(super) async fn spawn_retained_watch(
    broker: &Arc<Broker>,
    _cluster: &Arc<Cluster>,
    kv: kv::Store,
    ready: &Ready,
) -> Result<(), ClusterError> {
    let weak = Arc::downgrade(broker);
    // Topics of keys that cannot be read back (hashed), for their deletes.
    let hashed: Mutex<FxHashMap<String, ByteStr>> = Mutex::new(FxHashMap::default());
    spawn_watch(broker, kv, ready, move |entry| {
        let Some(broker) = weak.upgrade() else {
            return;
        };
        let now = crate::clock::now();
        match entry.operation {
            Operation::Put => {
                let Ok(stored) = codec::decode_message(&entry.value) else {
                    tracing::warn!(key = %entry.key, "malformed retained message; ignored");
                    return;
                };
                if entry.key.starts_with('=') {
                    hashed
                        .lock()
                        .insert(entry.key.clone(), stored.topic.clone());
                }
                let message = broker.journal().restore_message(&stored, now);
                broker.router.retain(&message);
            }
            Operation::Delete | Operation::Purge => {
                let topic = match untoken(&entry.key) {
                    Some(t) => ByteStr::from(t),
                    None => match hashed.lock().remove(&entry.key) {
                        Some(t) => t,
                        None => return,
                    },
                };
                let clear = Message::new(topic, Bytes::new(), QoS::AtMostOnce, true, None, 0, now);
                broker.router.retain(&clear);
            }
        }
    })
    .await
}
