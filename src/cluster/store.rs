//! The `Store` on JetStream: the sessions' state (records.rs) in the state stream, the
//! retained messages in the retained bucket, so that a session outlives its node and
//! every node sees every retained message.
//!
//! It also carries the QoS 1/2 messages this node sends to others (`forward`), through
//! the same writer: a barrier (`submit(vec![])`) resolves once everything submitted
//! before it, records and messages alike, is acknowledged by JetStream. That is how a
//! PUBACK/PUBREC waits for both, with the connection's existing wait for the store.
//!
//! Group commit, as the disk store: submitters queue and go on; one task takes what was
//! queued while its previous round was in flight, publishes it all (pipelined), waits
//! for every acknowledgement and resolves the round's `Durable`s together. Within a
//! round only the last change of a record is written, and a record that was never
//! written is not removed (an online subscriber that acknowledges fast costs nothing).

use super::js::last_per_subject;
use super::names::{token, Names};
use super::records::{self, Write};
use crate::protocol::ByteStr;
use crate::store::{
    codec, BoxFuture, Durable, Op, QueuedEntry, SessionSnapshot, Snapshot, Store, StoreError,
};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::Context;
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::future::join_all;
use parking_lot::Mutex;
use rustc_hash::{FxHashMap, FxHashSet};
use std::future::IntoFuture;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, Notify};

/// Messages for one node are sent in JetStream messages of at most this size (well below
/// NATS's default `max_payload` of 1 MiB; a larger single message goes alone).
const BATCH_BYTES: usize = 256 * 1024;

/// Queued bytes past which `has_room` says no (the broker then refuses new messages).
const MAX_PENDING_BYTES: u64 = 16 << 20;
/// A round that keeps failing is retried for this long (a stream whose leader was lost
/// has none for the election: 4 to 9 s with nats-server 2.9), then its `Durable`s fail:
/// the connections waiting on them close without acknowledging, and their clients
/// publish again.
const PATIENCE: Duration = Duration::from_secs(20);

pub(super) struct JsStore {
    shared: Arc<Shared>,
}

struct Shared {
    js: Context,
    names: Names,
    /// `<node>-<start time>-`: with a counter, the `Nats-Msg-Id` of each forwarded
    /// message, so that a publish retried after a lost acknowledgement is stored once.
    msg_id_prefix: String,
    next_msg_id: AtomicU64,
    queue: Mutex<Queue>,
    wake: Notify,
    pending_bytes: AtomicU64,
    /// Records this node wrote or loaded: only those are removed (no request for a
    /// record that never reached JetStream).
    written: Mutex<Written>,
    stopped: Notify,
}

#[derive(Default)]
struct Queue {
    items: Vec<Item>,
    bytes: u64,
    waiting: Vec<oneshot::Sender<Result<(), StoreError>>>,
    closed: bool,
    done: bool,
}

enum Item {
    Op(Op),
    /// A message for another node (or a shared group there): published to the messages
    /// stream, in order.
    Forward {
        subject: String,
        payload: Bytes,
    },
}

impl JsStore {
    /// A store on `js`, for the cluster `names`, written by `node`. Spawns its writer on
    /// the current runtime.
    pub(super) fn start(js: Context, names: Names, node: &str) -> JsStore {
        let shared = Arc::new(Shared {
            js,
            names,
            msg_id_prefix: format!("{node}-{}-", crate::store::now_millis()),
            next_msg_id: AtomicU64::new(0),
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            pending_bytes: AtomicU64::new(0),
            written: Mutex::new(Written::default()),
            stopped: Notify::new(),
        });
        tokio::spawn(run(shared.clone()));
        JsStore { shared }
    }

    /// Queues a QoS 1/2 message for another node; the next barrier covers it.
    pub(super) fn forward(&self, subject: String, payload: Bytes) {
        self.push(vec![Item::Forward { subject, payload }], None);
    }

    fn push(&self, items: Vec<Item>, reply: Option<oneshot::Sender<Result<(), StoreError>>>) {
        let bytes: u64 = items
            .iter()
            .map(|i| match i {
                Item::Op(op) => op.approx_bytes(),
                Item::Forward { payload, .. } => payload.len() as u64 + 64,
            })
            .sum();
        let mut q = self.shared.queue.lock();
        if q.closed {
            if let Some(reply) = reply {
                let _ = reply.send(Err(StoreError::Closed));
            }
            return;
        }
        q.items.extend(items);
        q.bytes += bytes;
        q.waiting.extend(reply);
        self.shared
            .pending_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        drop(q);
        self.shared.wake.notify_one();
    }

    /// The session of `client_id` went to another node: what this node knew of its
    /// records is forgotten (that node loads them).
    pub(super) fn forget(&self, names: &Names, client_id: &str) {
        self.shared
            .written
            .lock()
            .forget(&names.state_of(client_id));
    }

    /// Resolves once everything submitted before is written.
    async fn barrier(&self) -> Result<(), StoreError> {
        self.submit(Vec::new()).await
    }

    /// Whether the session record of `client_id` is stored (its other records are kept
    /// only with it).
    async fn has_session(&self, client_id: &ByteStr) -> Result<bool, StoreError> {
        self.barrier().await?;
        let s = &self.shared;
        let engine = |e: &dyn std::fmt::Display| StoreError::Engine(e.to_string());
        let stream =
            s.js.get_stream_no_info(s.names.state_stream())
                .await
                .map_err(|e| engine(&e))?;
        let subject = format!("{}.S", s.names.state_of(client_id));
        match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(false),
            Err(e) => Err(engine(&e)),
        }
    }

    async fn records_of(&self, client_id: &ByteStr) -> Result<Vec<(String, Bytes)>, StoreError> {
        self.barrier().await?;
        let s = &self.shared;
        let filter = format!("{}.>", s.names.state_of(client_id));
        last_per_subject(&s.js, &s.names.state_stream(), &filter)
            .await
            .map_err(|e| StoreError::Engine(e.to_string()))
    }
}

impl Store for JsStore {
    /// Nothing: a node of a cluster loads a session only when it takes it
    /// (`load_session`), and mirrors the retained messages from their bucket.
    fn load(&self, _queue_head: usize) -> BoxFuture<'_, Result<Snapshot, StoreError>> {
        Box::pin(async { Ok(Snapshot::default()) })
    }

    fn submit(&self, batch: Vec<Op>) -> Durable {
        let (tx, rx) = oneshot::channel();
        self.push(batch.into_iter().map(Item::Op).collect(), Some(tx));
        Durable::waiting(rx)
    }

    fn load_session<'a>(
        &'a self,
        client_id: &'a ByteStr,
        queue_head: usize,
    ) -> BoxFuture<'a, Result<Option<SessionSnapshot>, StoreError>> {
        Box::pin(async move {
            // Most CONNECTs find no stored session: one read of its record says so,
            // without the consumer that reading all of its records takes.
            if !self.has_session(client_id).await? {
                return Ok(None);
            }
            let records = self.records_of(client_id).await?;
            let snapshot = records::session(&self.shared.names, client_id, &records, queue_head)
                .map_err(|e| StoreError::Engine(e.to_string()))?;
            if snapshot.is_some() {
                let mut written = self.shared.written.lock();
                for (subject, _) in records {
                    written.insert(subject);
                }
            }
            Ok(snapshot)
        })
    }

    fn read_queue(
        &self,
        client_id: &ByteStr,
        after_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<QueuedEntry>, StoreError>> {
        let client_id = client_id.clone();
        Box::pin(async move {
            let records = self.records_of(&client_id).await?;
            Ok(records::queue(
                &self.shared.names,
                &client_id,
                &records,
                after_seq,
                limit,
            ))
        })
    }

    fn pending_bytes(&self) -> u64 {
        self.shared.pending_bytes.load(Ordering::Relaxed)
    }

    fn has_room(&self) -> bool {
        self.pending_bytes() <= MAX_PENDING_BYTES
    }

    fn close(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let done = {
                let mut q = self.shared.queue.lock();
                q.closed = true;
                q.done
            };
            if !done {
                let stopped = self.shared.stopped.notified();
                self.shared.wake.notify_one();
                stopped.await;
            }
            Ok(())
        })
    }
}

/// What one round writes, in the order it must happen.
#[derive(Default)]
struct Round {
    /// Every record of these clients goes first (sessions deleted in this round).
    remove_all: Vec<String>,
    /// Records set and retained messages set or cleared: at most one per subject, in
    /// any order; then messages to other nodes, in order.
    publishes: Vec<(String, Option<HeaderMap>, Bytes)>,
    /// Records removed (never one published in this round).
    removes: Vec<String>,
}

enum Last {
    Put(Option<HeaderMap>, Bytes),
    Remove,
}

impl Shared {
    /// Only the last change of each subject, the forwards in order behind them.
    fn plan(&self, items: Vec<Item>) -> Round {
        let mut round = Round::default();
        let mut last: FxHashMap<String, Last> = FxHashMap::default();
        let mut order: Vec<String> = Vec::new();
        let mut forwards: Vec<(String, Vec<Bytes>)> = Vec::new();
        let retained = format!("$KV.{}.", self.names.retained_bucket());
        let mut set = |last: &mut FxHashMap<String, Last>, subject: String, v: Last| {
            if last.insert(subject.clone(), v).is_none() {
                order.push(subject);
            }
        };
        for item in items {
            let op = match item {
                Item::Forward { subject, payload } => {
                    match forwards.iter_mut().find(|(s, _)| *s == subject) {
                        Some((_, frames)) => frames.push(payload),
                        None => forwards.push((subject, vec![payload])),
                    }
                    continue;
                }
                Item::Op(op) => op,
            };
            match &op {
                Op::SetRetained(m) => {
                    if let Ok(value) = codec::message(m) {
                        let subject = format!("{retained}{}", token(&m.topic));
                        set(&mut last, subject, Last::Put(None, Bytes::from(value)));
                    }
                    continue;
                }
                Op::ClearRetained { topic } => {
                    // A KV delete: the watchers on every node see it.
                    let mut headers = HeaderMap::new();
                    headers.insert("KV-Operation", "DEL");
                    let subject = format!("{retained}{}", token(topic));
                    set(&mut last, subject, Last::Put(Some(headers), Bytes::new()));
                    continue;
                }
                _ => {}
            }
            match records::write(&self.names, &op) {
                None => {}
                Some(Write::Put { subject, value }) => {
                    set(&mut last, subject, Last::Put(None, value))
                }
                Some(Write::Remove { subject }) => set(&mut last, subject, Last::Remove),
                Some(Write::RemoveAll { filter }) => {
                    let prefix = filter.trim_end_matches('>');
                    last.retain(|s, _| !s.starts_with(prefix));
                    round.remove_all.push(filter);
                }
            }
        }
        let written = self.written.lock();
        for subject in order {
            match last.remove(&subject) {
                Some(Last::Put(headers, value)) => round.publishes.push((subject, headers, value)),
                Some(Last::Remove) if written.contains(&subject) => round.removes.push(subject),
                _ => {}
            }
        }
        // One JetStream message per node and round, of every message for that node in
        // order: the stream's cost is per message, so this is what lets a busy node send
        // thousands of messages a second to another.
        for (subject, frames) in forwards {
            for batch in super::wire::batches(&frames, BATCH_BYTES) {
                let id = self.next_msg_id.fetch_add(1, Ordering::Relaxed);
                let mut headers = HeaderMap::new();
                headers.insert("Nats-Msg-Id", format!("{}{id}", self.msg_id_prefix));
                round
                    .publishes
                    .push((subject.clone(), Some(headers), batch));
            }
        }
        round
    }

    /// Writes a round, retrying what failed (records are idempotent, forwards carry a
    /// message id the stream deduplicates).
    async fn write(&self, round: &Round) -> Result<(), StoreError> {
        let stream = self.names.state_stream();
        let purge = |filter: String| {
            let js = self.js.clone();
            let stream = stream.clone();
            async move {
                let s = js
                    .get_stream_no_info(&stream)
                    .await
                    .map_err(|e| e.to_string())?;
                s.purge()
                    .filter(filter)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
        };
        retry(|| async {
            let results = join_all(round.remove_all.iter().cloned().map(purge)).await;
            results.into_iter().collect::<Result<(), String>>()
        })
        .await?;
        retry(|| async {
            let mut acks = Vec::with_capacity(round.publishes.len());
            for (subject, headers, payload) in &round.publishes {
                let mut message = PublishMessage::build().payload(payload.clone());
                if let Some(h) = headers {
                    message = message.headers(h.clone());
                }
                let ack = match self.js.send_publish(subject.clone(), message).await {
                    Ok(ack) => ack,
                    // Trying again would not help, nor hold up everything else.
                    Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                        tracing::error!(
                            subject,
                            "not stored in JetStream: {e} (raise max_payload in nats-server, or lower limits.message_size_limit)"
                        );
                        continue;
                    }
                    Err(e) => return Err(format!("publishing to {subject}: {e}")),
                };
                acks.push(ack.into_future());
            }
            let purges = join_all(round.removes.iter().cloned().map(purge));
            let (acks, purges) = tokio::join!(join_all(acks), purges);
            for a in acks {
                a.map_err(|e| format!("JetStream did not take a message: {e}"))?;
            }
            purges.into_iter().collect::<Result<(), String>>()
        })
        .await?;
        let mut written = self.written.lock();
        for filter in &round.remove_all {
            written.forget(filter.trim_end_matches(".>"));
        }
        for s in &round.removes {
            written.remove(s);
        }
        let state = self.names.state_prefix();
        for (subject, _, _) in &round.publishes {
            if subject.starts_with(&state) {
                written.insert(subject.clone());
            }
        }
        Ok(())
    }
}

/// The records known to be in the stream, by client (`<prefix>.state.<client>`).
#[derive(Default)]
struct Written(FxHashMap<String, FxHashSet<String>>);

impl Written {
    /// The client part of a record's subject: its first four tokens.
    fn client_of(subject: &str) -> &str {
        subject
            .match_indices('.')
            .nth(3)
            .map_or(subject, |(i, _)| &subject[..i])
    }

    fn insert(&mut self, subject: String) {
        let client = Written::client_of(&subject).to_owned();
        self.0.entry(client).or_default().insert(subject);
    }

    fn contains(&self, subject: &str) -> bool {
        self.0
            .get(Written::client_of(subject))
            .is_some_and(|s| s.contains(subject))
    }

    fn remove(&mut self, subject: &str) {
        let client = Written::client_of(subject);
        if let Some(set) = self.0.get_mut(client) {
            set.remove(subject);
            if set.is_empty() {
                self.0.remove(client);
            }
        }
    }

    fn forget(&mut self, client: &str) {
        self.0.remove(client);
    }
}

async fn retry<F, Fut>(mut attempt: F) -> Result<(), StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let mut delay = Duration::from_millis(100);
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        match attempt().await {
            Ok(()) => return Ok(()),
            Err(e) if std::time::Instant::now() >= deadline => {
                tracing::error!("cluster store: {e}; giving up");
                return Err(StoreError::Engine(e));
            }
            Err(e) => {
                tracing::warn!("cluster store: {e}; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}

async fn run(shared: Arc<Shared>) {
    loop {
        let woken = shared.wake.notified();
        let (items, bytes, waiting, closed) = {
            let mut q = shared.queue.lock();
            let bytes = std::mem::take(&mut q.bytes);
            (
                std::mem::take(&mut q.items),
                bytes,
                std::mem::take(&mut q.waiting),
                q.closed,
            )
        };
        if items.is_empty() && waiting.is_empty() {
            if closed {
                shared.queue.lock().done = true;
                shared.stopped.notify_waiters();
                return;
            }
            woken.await;
            continue;
        }
        let round = shared.plan(items);
        let result = shared.write(&round).await;
        shared.pending_bytes.fetch_sub(bytes, Ordering::Relaxed);
        for w in waiting {
            let _ = w.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_records_are_kept_by_client() {
        let names = Names::new("c");
        let (a, b) = (names.state_of("a.b"), names.state_of("a"));
        let mut w = Written::default();
        w.insert(format!("{a}.S"));
        w.insert(format!("{a}.Q.1"));
        w.insert(format!("{b}.S"));
        assert_eq!(Written::client_of(&format!("{a}.Q.1")), a);
        assert!(w.contains(&format!("{a}.Q.1")) && !w.contains(&format!("{a}.Q.2")));
        w.remove(&format!("{a}.Q.1"));
        assert!(!w.contains(&format!("{a}.Q.1")) && w.contains(&format!("{a}.S")));
        w.forget(&a);
        assert!(!w.contains(&format!("{a}.S")) && w.contains(&format!("{b}.S")));
    }
}
