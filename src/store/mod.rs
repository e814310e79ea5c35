//! Persistence: what the broker must not forget across a restart or a crash (retained
//! messages, persistent sessions and their queues), behind one small trait.
//!
//! The broker describes every change as an [`Op`] and submits them in batches; a store applies
//! them in order and says through [`Durable`] when a batch is as safe as its durability mode
//! promises. Nothing in the trait assumes a local file, so that a networked store can stand
//! behind it later. [`MemStore`] keeps everything in memory: the model the disk store is
//! tested against. [`DiskStore`] is the crash-safe embedded store (fjall; docs/persistence.md).
//! With persistence off the broker has no store at all (`session::journal::Journal::off`).
//!
//! The types here are plain data, independent of the broker's live types: the session code
//! converts. Times are wall-clock unix milliseconds, since an `Instant` means nothing after a
//! restart.

mod batch;
pub(crate) mod codec;
mod disk;
mod mem;
mod writer;

pub use crate::config::{OnCorruption, PersistenceConfig, SyncMode};
pub use disk::{allocated_bytes, DiskStore};
pub use mem::MemStore;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;

use crate::protocol::{ByteStr, Properties, QoS, SubOptions};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A store of the broker's persistent state. Used as `Arc<dyn Store>`.
pub trait Store: Send + Sync {
    /// Everything stored, read at start-up (recovery). Each session's queue is returned up to
    /// `queue_head` entries; the rest stays stored and is read with [`Store::read_queue`].
    fn load(&self, queue_head: usize) -> BoxFuture<'_, Result<Snapshot, StoreError>>;

    /// Applies `batch` in order, after every batch submitted before it. Never blocks on I/O.
    /// The returned [`Durable`] resolves when the batch is as durable as the store's mode
    /// promises: once on disk for `always`, at once for `interval` and `never`, except while the
    /// store is behind by more than its memory bound (then once written, which slows the
    /// submitters down).
    fn submit(&self, batch: Vec<Op>) -> Durable;

    /// One session as [`Store::load`] would return it (None if it is not stored), read
    /// when a node of a cluster takes the session over from another. The default reads
    /// everything and keeps one: right for the local stores, which load every session at
    /// start anyway; a shared store (src/cluster) reads that session's records only.
    fn load_session<'a>(
        &'a self,
        client_id: &'a ByteStr,
        queue_head: usize,
    ) -> BoxFuture<'a, Result<Option<SessionSnapshot>, StoreError>> {
        Box::pin(async move {
            let snapshot = self.load(queue_head).await?;
            Ok(snapshot
                .sessions
                .into_iter()
                .find(|s| s.client_id == *client_id))
        })
    }

    /// Up to `limit` queued entries of a session with a sequence number above `after_seq`,
    /// in order, as they stand after every batch submitted before this call.
    fn read_queue(
        &self,
        client_id: &ByteStr,
        after_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<QueuedEntry>, StoreError>>;

    /// Bytes submitted and not yet written.
    fn pending_bytes(&self) -> u64;

    /// Whether more messages can be taken: false while the store is behind by more than its
    /// memory bound, or past its disk budget (`max_disk_bytes`). The broker checks it before
    /// accepting a QoS 1/2 message it would have to store, and refuses the PUBLISH (5.0:
    /// reason 0x97 Quota exceeded) rather than acknowledge what it may not keep.
    fn has_room(&self) -> bool;

    /// Whether the store is behind by more than its memory bound, so that the [`Durable`]
    /// of a submit made now resolves only once written, whatever the mode. The broker then
    /// makes acknowledgements wait for the store (its clients slow down to the disk's pace)
    /// instead of refusing their messages.
    fn is_behind(&self) -> bool {
        false
    }

    /// Writes everything submitted, makes it durable, and stops. Later submits fail.
    fn close(&self) -> BoxFuture<'_, Result<(), StoreError>>;
}

/// One change to the stored state.
///
/// Contract with the session code (the store relies on it to skip work):
/// - a session's records are kept only while the session itself is stored: submit
///   [`Op::PutSession`] before (or in the same batch as) anything else for that client id;
/// - queue sequence numbers of a session only grow (continue from [`SessionSnapshot::last_seq`]
///   after a restart), so an [`Op::Enqueue`] never replaces an entry;
/// - a message id names one message for ever (continue above [`Snapshot::max_message_id`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Sets the retained message of `message.topic` (replacing any).
    SetRetained(Arc<StoredMessage>),
    ClearRetained {
        topic: ByteStr,
    },
    /// Creates or updates a persistent session's own record.
    PutSession {
        client_id: ByteStr,
        session: StoredSession,
    },
    /// Removes a session and everything of it (subscriptions, queue, in-flight, incoming).
    DeleteSession {
        client_id: ByteStr,
    },
    /// Adds or replaces the subscription of `filter`.
    Subscribe {
        client_id: ByteStr,
        filter: ByteStr,
        subscription: StoredSubscription,
    },
    Unsubscribe {
        client_id: ByteStr,
        filter: ByteStr,
    },
    /// Appends a delivery to the session's queue. The message is stored once however many
    /// sessions queue it, and deleted with its last reference.
    Enqueue {
        client_id: ByteStr,
        seq: u64,
        delivery: Delivery,
    },
    /// Removes a queued entry (sent, expired or dropped).
    Dequeue {
        client_id: ByteStr,
        seq: u64,
    },
    /// Records (or replaces: PUBREC moves it to `PubRel`) an outgoing in-flight entry.
    PutInflight {
        client_id: ByteStr,
        entry: InflightEntry,
    },
    /// The exchange of `pkid` is complete (PUBACK or PUBCOMP received).
    DeleteInflight {
        client_id: ByteStr,
        pkid: u16,
    },
    /// An incoming QoS 2 PUBLISH was received (PUBREC sent); waiting for its PUBREL.
    PutIncoming {
        client_id: ByteStr,
        pkid: u16,
    },
    /// The PUBREL of `pkid` arrived (PUBCOMP sent).
    DeleteIncoming {
        client_id: ByteStr,
        pkid: u16,
    },
}

impl Op {
    /// A rough size in memory, for the store's memory bound.
    pub fn approx_bytes(&self) -> u64 {
        let message = |m: &StoredMessage| (m.topic.len() + m.payload.len() + 64) as u64;
        48 + match self {
            Op::SetRetained(m) => message(m),
            Op::Enqueue { delivery, .. } => message(&delivery.message),
            Op::PutInflight {
                entry:
                    InflightEntry {
                        stage: InflightStage::Publish(d),
                        ..
                    },
                ..
            } => message(&d.message),
            Op::PutSession { session, .. } => {
                session.will.as_ref().map_or(0, |w| message(&w.message))
            }
            _ => 0,
        }
    }
}

/// A message as stored: what a PUBLISH carried, with an absolute expiry.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct StoredMessage {
    /// Assigned by the broker; names the message for every session that queues it. Unused
    /// (0) for retained messages and wills, which are stored by topic and by session.
    pub id: u64,
    pub topic: ByteStr,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// The PUBLISH (or will) properties, as received.
    pub properties: Properties,
    /// When the message expires (Message Expiry Interval), unix milliseconds.
    pub expires_at: Option<u64>,
}

/// A session's own record.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct StoredSession {
    /// Session Expiry Interval, seconds; `u32::MAX` never expires.
    pub expiry_interval: u32,
    /// When the client went offline, unix milliseconds; `None` while it is connected (after a
    /// crash, treat `None` as offline since the restart).
    pub offline_since: Option<u64>,
    /// A will waiting for its Will Delay Interval.
    pub will: Option<StoredWill>,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct StoredWill {
    pub message: Arc<StoredMessage>,
    /// When to publish it, unix milliseconds.
    pub publish_at: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct StoredSubscription {
    pub options: SubOptions,
    /// 5.0 Subscription Identifier.
    pub identifier: Option<u32>,
}

/// A message on its way to one session.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivery {
    pub message: Arc<StoredMessage>,
    /// QoS of the delivery (the lower of the message's and the subscription's).
    pub qos: QoS,
    /// The RETAIN flag to send.
    pub retain: bool,
    /// 5.0 Subscription Identifiers of the matching subscriptions.
    pub subscription_ids: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct QueuedEntry {
    pub seq: u64,
    pub delivery: Delivery,
}

#[derive(Clone, Debug, PartialEq)]
pub struct InflightEntry {
    pub pkid: u16,
    /// Sending order, to resend in the same order after a restart.
    pub order: u64,
    pub stage: InflightStage,
}

#[derive(Clone, Debug, PartialEq)]
pub enum InflightStage {
    /// PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2): resent with DUP.
    Publish(Delivery),
    /// PUBREL sent, waiting for PUBCOMP: the PUBREL is resent.
    PubRel,
}

/// Everything stored, as [`Store::load`] returns it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// By topic.
    pub retained: Vec<StoredMessage>,
    /// By client id.
    pub sessions: Vec<SessionSnapshot>,
    /// The highest message id ever stored: the broker's next ids must be above it.
    pub max_message_id: u64,
    /// What recovery found (all zero for a store in good order).
    pub recovery: RecoveryReport,
}

/// What start-up found wrong with the store, and what it did about it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Records read back.
    pub recovered: u64,
    /// Records that failed their checksum or could not be decoded, and entries that named a
    /// message or a session that was lost: skipped (and removed).
    pub skipped: u64,
    /// Bytes the engine cut from the journals while opening them: a torn write after a
    /// crash, damage after a clean shutdown (or hidden by a crash).
    pub discarded_tail_bytes: u64,
    /// Where the damaged store was moved, when it had to be (its records that could be read
    /// were copied into a fresh store and are counted in `recovered`).
    pub moved_aside: Option<PathBuf>,
    /// Where the journals were kept as they were before the engine cut them (see
    /// `discarded_tail_bytes`).
    pub journals_kept: Option<PathBuf>,
}

impl RecoveryReport {
    pub fn is_clean(&self) -> bool {
        self.skipped == 0 && self.discarded_tail_bytes == 0 && self.moved_aside.is_none()
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct SessionSnapshot {
    pub client_id: ByteStr,
    pub session: StoredSession,
    /// By filter.
    pub subscriptions: Vec<(ByteStr, StoredSubscription)>,
    /// The first queued entries, in order (at most the `queue_head` given to `load`).
    pub queue: Vec<QueuedEntry>,
    /// All queued entries, loaded or not.
    pub queued: u64,
    /// The highest queue sequence number stored (0 if none): continue above it.
    pub last_seq: u64,
    /// By `order`.
    pub inflight: Vec<InflightEntry>,
    /// Incoming QoS 2 packet ids waiting for PUBREL, ascending.
    pub incoming: Vec<u16>,
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot use the data directory {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: Arc<std::io::Error>,
    },
    #[error("the data directory {} is in use by another process (it holds {})", dir.display(), lock.display())]
    Locked { dir: PathBuf, lock: PathBuf },
    #[error("the store {} is damaged: {detail}. on_corruption = \"stop\" leaves it as it was; with \"recover\" the broker starts with what can be read from it (docs/persistence.md says what is kept aside)", path.display())]
    Corrupt { path: PathBuf, detail: String },
    #[error("the store {} has format version {found}; this ternmq reads version {supported} (written by a newer ternmq?)", path.display())]
    UnsupportedVersion {
        path: PathBuf,
        found: u8,
        supported: u8,
    },
    #[error("storage engine: {0}")]
    Engine(String),
    #[error("the store is closed")]
    Closed,
}

/// Resolves when a submitted batch is durable (see [`Store::submit`]).
#[must_use = "a batch is durable only once its Durable resolves"]
pub struct Durable(DurableState);

enum DurableState {
    Ready(Option<Result<(), StoreError>>),
    Waiting(tokio::sync::oneshot::Receiver<Result<(), StoreError>>),
}

impl Durable {
    /// Already resolved.
    pub fn ready(result: Result<(), StoreError>) -> Durable {
        Durable(DurableState::Ready(Some(result)))
    }

    /// Resolves with what is sent on `rx` (a dropped sender means the store closed).
    pub fn waiting(rx: tokio::sync::oneshot::Receiver<Result<(), StoreError>>) -> Durable {
        Durable(DurableState::Waiting(rx))
    }
}

impl Future for Durable {
    type Output = Result<(), StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            DurableState::Ready(result) => Poll::Ready(result.take().unwrap_or(Ok(()))),
            DurableState::Waiting(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(StoreError::Closed))),
        }
    }
}

/// Now, as the store keeps time: unix milliseconds.
pub fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
