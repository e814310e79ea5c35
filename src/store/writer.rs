//! The store's own thread: group commit. Submitters append ops to a queue and go on (they
//! never wait for I/O); the thread takes everything queued while its previous write was in
//! progress, writes it as one batch with one fsync, and resolves every waiting `Durable` of
//! that batch together. Reads are queued the same way, so they see every earlier submit.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tokio::sync::oneshot;

use super::{Durable, Op, QueuedEntry, Snapshot, StoreError, SyncMode};
use crate::protocol::ByteStr;

/// Submitted bytes not yet written past which submitters wait for the write (backpressure)
/// and `has_room` says no.
pub(super) const MAX_PENDING_BYTES: u64 = 16 << 20;

/// How often the disk usage is measured for the disk budget.
const DISK_USAGE_EVERY: Duration = Duration::from_millis(500);

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// What the thread does with the data: the engine behind it.
pub(super) trait Backend: Send + 'static {
    /// Writes `ops` as one atomic batch; durable on return if `sync`.
    fn write(&mut self, ops: Vec<Op>, sync: bool) -> Result<(), StoreError>;
    /// Makes every earlier write durable.
    fn sync(&mut self) -> Result<(), StoreError>;
    fn read_queue(
        &mut self,
        client_id: &ByteStr,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<QueuedEntry>, StoreError>;
    fn load(&mut self, queue_head: usize) -> Result<Snapshot, StoreError>;
    fn disk_bytes(&self) -> u64;
    /// Makes everything durable before the process ends.
    fn close(&mut self) -> Result<(), StoreError>;
}

enum Request {
    ReadQueue {
        client_id: ByteStr,
        after_seq: u64,
        limit: usize,
        reply: Reply<Vec<QueuedEntry>>,
    },
    Load {
        queue_head: usize,
        reply: Reply<Snapshot>,
    },
}

#[derive(Default)]
struct Queue {
    ops: Vec<Op>,
    bytes: u64,
    waiting: Vec<Reply<()>>,
    requests: Vec<Request>,
    close: Vec<Reply<()>>,
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    pending_bytes: AtomicU64,
    /// Batches written: one per group commit.
    commits: AtomicU64,
    disk_bytes: AtomicU64,
    max_disk_bytes: u64,
    /// A write failed: the engine refuses further writes, and so does the store.
    failed: AtomicBool,
    sync: SyncMode,
    interval: Duration,
}

pub(super) struct Writer {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Writer {
    pub(super) fn start(
        backend: impl Backend,
        sync: SyncMode,
        interval: Duration,
        max_disk_bytes: u64,
    ) -> Result<Writer, StoreError> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            pending_bytes: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            disk_bytes: AtomicU64::new(backend.disk_bytes()),
            max_disk_bytes,
            failed: AtomicBool::new(false),
            sync,
            interval,
        });
        let thread = std::thread::Builder::new()
            .name("ternmq-store".into())
            .spawn({
                let shared = shared.clone();
                move || run(&shared, backend)
            })
            .map_err(|e| StoreError::Engine(format!("cannot start the store thread: {e}")))?;
        Ok(Writer {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub(super) fn submit(&self, batch: Vec<Op>) -> Durable {
        if self.shared.failed.load(Ordering::Relaxed) {
            return Durable::ready(Err(failed()));
        }
        let bytes: u64 = batch.iter().map(Op::approx_bytes).sum();
        let mut q = self.shared.queue.lock();
        if q.closed {
            return Durable::ready(Err(StoreError::Closed));
        }
        q.ops.extend(batch);
        q.bytes += bytes;
        let pending = self
            .shared
            .pending_bytes
            .fetch_add(bytes, Ordering::Relaxed)
            + bytes;
        let durable = if self.shared.sync == SyncMode::Always || pending > MAX_PENDING_BYTES {
            let (tx, rx) = oneshot::channel();
            q.waiting.push(tx);
            Durable::waiting(rx)
        } else {
            Durable::ready(Ok(()))
        };
        drop(q);
        self.shared.wake.notify_one();
        durable
    }

    pub(super) async fn read_queue(
        &self,
        client_id: ByteStr,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<QueuedEntry>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.request(Request::ReadQueue {
            client_id,
            after_seq,
            limit,
            reply,
        })?;
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    pub(super) async fn load(&self, queue_head: usize) -> Result<Snapshot, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.request(Request::Load { queue_head, reply })?;
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    fn request(&self, request: Request) -> Result<(), StoreError> {
        let mut q = self.shared.queue.lock();
        if q.closed {
            return Err(StoreError::Closed);
        }
        q.requests.push(request);
        drop(q);
        self.shared.wake.notify_one();
        Ok(())
    }

    pub(super) fn pending_bytes(&self) -> u64 {
        self.shared.pending_bytes.load(Ordering::Relaxed)
    }

    pub(super) fn commits(&self) -> u64 {
        self.shared.commits.load(Ordering::Relaxed)
    }

    /// Past the memory bound: submits wait for the write (see `submit`).
    pub(super) fn is_behind(&self) -> bool {
        self.pending_bytes() > MAX_PENDING_BYTES
    }

    pub(super) fn has_room(&self) -> bool {
        !self.shared.failed.load(Ordering::Relaxed)
            && self.pending_bytes() <= MAX_PENDING_BYTES
            && self.shared.disk_bytes.load(Ordering::Relaxed) < self.shared.max_disk_bytes
    }

    /// Asks the thread to write what is queued, make it durable and stop.
    pub(super) async fn close(&self) -> Result<(), StoreError> {
        let rx = {
            let mut q = self.shared.queue.lock();
            if q.closed && q.close.is_empty() && self.thread.lock().is_none() {
                return Ok(());
            }
            q.closed = true;
            let (tx, rx) = oneshot::channel();
            q.close.push(tx);
            rx
        };
        self.shared.wake.notify_one();
        let result = rx.await.unwrap_or(Ok(()));
        self.join();
        result
    }

    fn join(&self) {
        if let Some(thread) = self.thread.lock().take() {
            if thread.join().is_err() {
                tracing::error!("store: the store thread panicked");
            }
        }
    }
}

impl Drop for Writer {
    /// A store dropped without `close` still writes what it was given before the thread ends.
    fn drop(&mut self) {
        self.shared.queue.lock().closed = true;
        self.shared.wake.notify_one();
        self.join();
    }
}

fn failed() -> StoreError {
    StoreError::Engine("an earlier write failed; the store takes no more writes".into())
}

/// One turn's work, taken from the queue at once.
struct Work {
    ops: Vec<Op>,
    bytes: u64,
    waiting: Vec<Reply<()>>,
    requests: Vec<Request>,
    close: Option<Vec<Reply<()>>>,
}

#[allow(clippy::too_many_lines)] // the writer thread's loop: collect, coalesce, write, sync, notify
fn run(shared: &Shared, mut backend: impl Backend) {
    let mut unsynced = false;
    let mut last_sync = Instant::now();
    let mut last_usage = Instant::now();
    let mut usage_stale = false;
    loop {
        let work = {
            let mut q = shared.queue.lock();
            loop {
                // A waiter alone is a barrier (an empty submit): it is answered on this
                // turn, once everything taken before it is as durable as the mode says.
                if !q.ops.is_empty() || !q.waiting.is_empty() || !q.requests.is_empty() || q.closed
                {
                    break;
                }
                // Idle: wake for the next fsync (interval) or disk usage measurement due.
                let sync_due = unsynced.then(|| last_sync + shared.interval);
                let usage_due = usage_stale.then(|| last_usage + DISK_USAGE_EVERY);
                match sync_due.into_iter().chain(usage_due).min() {
                    Some(due) => {
                        if Instant::now() >= due || shared.wake.wait_until(&mut q, due).timed_out()
                        {
                            break;
                        }
                    }
                    None => shared.wake.wait(&mut q),
                }
            }
            Work {
                ops: std::mem::take(&mut q.ops),
                bytes: std::mem::take(&mut q.bytes),
                waiting: std::mem::take(&mut q.waiting),
                requests: std::mem::take(&mut q.requests),
                close: q.closed.then(|| std::mem::take(&mut q.close)),
            }
        };

        if !work.ops.is_empty() {
            let result = if shared.failed.load(Ordering::Relaxed) {
                Err(failed())
            } else {
                backend.write(work.ops, shared.sync == SyncMode::Always)
            };
            shared.commits.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = &result {
                if !shared.failed.swap(true, Ordering::Relaxed) {
                    tracing::error!("store: write failed, no more writes are taken: {e}");
                }
            }
            unsynced |= shared.sync == SyncMode::Interval;
            usage_stale = true;
            shared
                .pending_bytes
                .fetch_sub(work.bytes, Ordering::Relaxed);
            for tx in work.waiting {
                let _ = tx.send(result.clone());
            }
        } else {
            for tx in work.waiting {
                let _ = tx.send(Ok(()));
            }
        }
        if unsynced && last_sync.elapsed() >= shared.interval {
            sync(shared, &mut backend);
            unsynced = false;
            last_sync = Instant::now();
        }
        for request in work.requests {
            match request {
                Request::ReadQueue {
                    client_id,
                    after_seq,
                    limit,
                    reply,
                } => {
                    let _ = reply.send(backend.read_queue(&client_id, after_seq, limit));
                }
                Request::Load { queue_head, reply } => {
                    let _ = reply.send(backend.load(queue_head));
                }
            }
        }
        if usage_stale && last_usage.elapsed() >= DISK_USAGE_EVERY {
            shared
                .disk_bytes
                .store(backend.disk_bytes(), Ordering::Relaxed);
            last_usage = Instant::now();
            usage_stale = false;
        }
        if let Some(close) = work.close {
            let result = backend.close();
            if let Err(e) = &result {
                tracing::error!("store: closing failed: {e}");
            }
            for tx in close {
                let _ = tx.send(result.clone());
            }
            // Requests that raced with close.
            let mut q = shared.queue.lock();
            for tx in q.waiting.drain(..) {
                let _ = tx.send(Err(StoreError::Closed));
            }
            q.requests.clear();
            return;
        }
    }
}

fn sync(shared: &Shared, backend: &mut impl Backend) {
    if shared.failed.load(Ordering::Relaxed) {
        return;
    }
    if let Err(e) = backend.sync() {
        shared.failed.store(true, Ordering::Relaxed);
        tracing::error!("store: fsync failed, no more writes are taken: {e}");
    }
}
