//! Sessions: the MQTT state of one client id, which outlives its connections.
//!
//! `SessionState` (state.rs) is plain data. A `Session` guards it with a mutex, next to
//! the `Link` to its live connection, if any: how publishers wake the connection task
//! that drains the queue.
//!
//! Ownership: the connection whose link is attached owns the session; state changes are
//! made through `with_state(conn_id, ..)`, which fails once another connection has taken
//! the session over. A change that touches both the router and the session state
//! (subscribe, unsubscribe, ending the session) is made while holding `control()`, which
//! a change of owner (takeover, discard, release) also takes, so the two are atomic with
//! respect to each other. Expiry is decided without it, under the registry entry and
//! `inner` (`Broker::expire`): only an offline session expires, and one without an owner
//! has no subscription change under way. Lock order: registry entry → `control` →
//! router trie → `inner`.

pub mod journal;
pub mod link;
pub mod outbox;
pub mod state;

use crate::budget::{Budget, Level};
use crate::message::{Delivery, Message};
use crate::metrics::Dropped;
use crate::protocol::{ByteStr, QoS};
use crate::router::Mailbox;
use crate::store::{
    InflightEntry, InflightStage, Op, StoredSession, StoredSubscription, StoredWill,
};
use journal::Journal;
pub use link::{Link, Wire};
use parking_lot::{Mutex, MutexGuard};
use state::Change;
pub use state::{
    Ended, Inflight, Restored, RetainedWalk, SessionState, Stage, Subscription, MAX_ACTIVE_WALKS,
    NEVER_EXPIRE,
};
use std::sync::Arc;
use std::time::Instant;
use tokio::task::AbortHandle;

/// How many messages a session may hold, and which.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub max_inflight: usize,
    pub max_queued: usize,
    /// 0 = no limit besides `max_queued`.
    pub max_queued_bytes: usize,
    pub queue_qos0: bool,
}

pub struct Session {
    /// Unique for the broker's life; a new session for the same client id gets a new one.
    pub id: u64,
    pub client_id: ByteStr,
    env: Arc<Env>,
    control: Mutex<()>,
    inner: Mutex<Inner>,
}

/// What every session of a broker shares.
pub struct Env {
    pub limits: QueueLimits,
    /// The broker's budget for messages held for clients, charged with what each
    /// session holds.
    pub budget: Arc<Budget>,
    /// Where stored sessions record their changes.
    pub journal: Arc<Journal>,
}

impl Env {
    /// Sessions that are not stored, within `limits`, charged to an unlimited budget
    /// (tests, tools).
    pub fn new(limits: QueueLimits) -> Env {
        Env {
            limits,
            budget: Arc::new(Budget::new(usize::MAX)),
            journal: Arc::new(Journal::off()),
        }
    }
}

struct Inner {
    state: SessionState,
    link: Option<Link>,
    /// What this session is charged in `budget` (its state's `held_bytes` as of the
    /// last change).
    charged: usize,
    /// The task of its expiry and will-delay timers, while it is offline.
    timer: Option<AbortHandle>,
}

impl Inner {
    /// After a change: brings the session's charge in the broker's budget up to date,
    /// and hands what changed to the store.
    fn settle(&mut self, env: &Env, client_id: &ByteStr) {
        let held = self.state.held_bytes();
        if held != self.charged {
            env.budget.adjust(held as isize - self.charged as isize);
            self.charged = held;
        }
        if self.state.is_persisted() {
            let changes = self.state.take_changes();
            if !changes.is_empty() {
                let ops = changes
                    .into_iter()
                    .map(|c| record(&env.journal, client_id, &self.state, c))
                    .collect();
                env.journal.submit(ops);
            }
        }
    }
}

/// The store's record of one change of a session.
fn record(journal: &Journal, client_id: &ByteStr, state: &SessionState, change: Change) -> Op {
    let client_id = client_id.clone();
    match change {
        Change::Record => {
            let clock = journal.clock();
            let will = state.pending_will().map(|w| StoredWill {
                message: journal.message(w),
                publish_at: state.will_at().map_or(0, |t| clock.to_unix(t)),
            });
            Op::PutSession {
                client_id,
                session: StoredSession {
                    expiry_interval: state.expiry,
                    offline_since: state.offline_since.map(|t| clock.to_unix(t)),
                    will,
                },
            }
        }
        Change::Subscribed(filter, sub) => Op::Subscribe {
            client_id,
            filter,
            subscription: StoredSubscription {
                options: sub.options,
                identifier: sub.id,
            },
        },
        Change::Unsubscribed(filter) => Op::Unsubscribe { client_id, filter },
        Change::Enqueued(seq, d) => Op::Enqueue {
            client_id,
            seq,
            delivery: journal.delivery(&d),
        },
        Change::Dequeued(seq) => Op::Dequeue { client_id, seq },
        Change::Sent {
            pkid,
            order,
            delivery,
        } => Op::PutInflight {
            client_id,
            entry: InflightEntry {
                pkid,
                order,
                stage: InflightStage::Publish(journal.delivery(&delivery)),
            },
        },
        Change::Released { pkid, order } => Op::PutInflight {
            client_id,
            entry: InflightEntry {
                pkid,
                order,
                stage: InflightStage::PubRel,
            },
        },
        Change::Completed(pkid) => Op::DeleteInflight { client_id, pkid },
        Change::Received(pkid) => Op::PutIncoming { client_id, pkid },
        Change::ReleasedIncoming(pkid) => Op::DeleteIncoming { client_id, pkid },
        Change::Ended => Op::DeleteSession { client_id },
    }
}

/// The session changed hands: the connection asking is no longer its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotOwner;

/// What became of a session when its connection let go of it.
pub enum Detached {
    /// It stays, for `expiry` seconds (`NEVER_EXPIRE`: until discarded).
    Kept { expiry: u32 },
    /// It ended with the connection.
    Ended(Ended),
}

impl Session {
    pub fn new(id: u64, client_id: ByteStr, env: Arc<Env>) -> Session {
        Session::with(id, client_id, env, SessionState::new())
    }

    /// A session with `state` (restored from the store), offline.
    pub fn with(id: u64, client_id: ByteStr, env: Arc<Env>, state: SessionState) -> Session {
        let session = Session {
            id,
            client_id,
            env,
            control: Mutex::new(()),
            inner: Mutex::new(Inner {
                state,
                link: None,
                charged: 0,
                timer: None,
            }),
        };
        session.lock().settle(&session.env, &session.client_id);
        session
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    /// Held while the owner changes router and session state together, and while the
    /// ownership itself changes (see the module documentation).
    pub fn control(&self) -> MutexGuard<'_, ()> {
        self.control.lock()
    }

    /// Attaches a new connection, returning the one it replaces (to be told it lost). A
    /// will still waiting out its delay is cancelled [MQTT-3.1.3-9]. Refused (None) if the
    /// session cannot be resumed: it has ended, or it was to end with its connection.
    pub fn resume(&self, link: Link, expiry: u32) -> Option<Option<Link>> {
        let mut inner = self.inner.lock();
        if inner.state.ended || inner.state.expiry == 0 {
            return None;
        }
        let state = &mut inner.state;
        state.expiry = expiry;
        state.set_will(None, None);
        state.detached_by = None;
        state.offline_since = None;
        if let Some(timer) = inner.timer.take() {
            timer.abort();
        }
        let state = &mut inner.state;
        // What is in flight is resent on the new connection [MQTT-4.4.0-1]. A connection
        // that detached has marked it so already; one taken over never detaches.
        state.inflight.mark_unsent();
        state.touch();
        let previous = inner.link.replace(link);
        inner.settle(&self.env, &self.client_id);
        Some(previous)
    }

    /// Attaches the first connection of a new session; a session that outlives its
    /// connection is stored from now on.
    pub fn attach_new(&self, link: Link, expiry: u32) {
        let mut inner = self.inner.lock();
        inner.state.expiry = expiry;
        if expiry > 0 && self.env.journal.is_on() {
            inner.state.persist();
        }
        inner.link = Some(link);
        inner.settle(&self.env, &self.client_id);
    }

    pub fn set_expiry(&self, conn_id: u64, expiry: u32) {
        let _ = self.with_state(conn_id, |s| {
            s.expiry = expiry;
            s.touch();
        });
    }

    /// Detaches `conn_id` if it still owns the session (None otherwise). With an expiry
    /// the session stays, holding `will` (due at `will_at`) if it has a delay; without,
    /// it ends.
    pub fn detach(
        &self,
        conn_id: u64,
        will: Option<Arc<Message>>,
        will_at: Option<Instant>,
        now: Instant,
    ) -> Option<Detached> {
        let mut inner = self.inner.lock();
        if inner.link.as_ref().map(|l| l.conn_id) != Some(conn_id) {
            return None;
        }
        inner.link = None;
        let state = &mut inner.state;
        let detached = if state.expiry == 0 {
            let mut ended = state.end();
            ended.will = will;
            Detached::Ended(ended)
        } else {
            state.detached_by = Some(conn_id);
            state.offline_since = Some(now);
            state.set_will(will, will_at);
            state.park(self.env.limits.queue_qos0);
            state.touch();
            Detached::Kept {
                expiry: state.expiry,
            }
        };
        inner.settle(&self.env, &self.client_id);
        Some(detached)
    }

    /// Ends the session for good, whoever owns it: returns the link (to be told) and
    /// what the session left.
    pub fn discard(&self) -> (Option<Link>, Ended) {
        let mut inner = self.inner.lock();
        let link = inner.link.take();
        let ended = inner.state.end();
        inner.settle(&self.env, &self.client_id);
        (link, ended)
    }

    /// Lets the session go to another node of the cluster, whoever owns it here: returns
    /// the link (to be told it lost the session) and the session's filters (to leave the
    /// router). Its stored state stays as it is, for the node that takes it.
    pub fn release(&self) -> (Option<Link>, Vec<ByteStr>) {
        let mut inner = self.inner.lock();
        let link = inner.link.take();
        let filters = inner.state.release();
        inner.settle(&self.env, &self.client_id);
        (link, filters)
    }

    /// Ends the session if it is still offline since `conn_id` left it.
    pub fn expire(&self, conn_id: u64) -> Option<Ended> {
        let mut inner = self.inner.lock();
        if inner.link.is_some() || inner.state.detached_by != Some(conn_id) {
            return None;
        }
        let ended = inner.state.end();
        inner.settle(&self.env, &self.client_id);
        Some(ended)
    }

    /// Takes the delayed will if the session is still offline since `conn_id` left it.
    pub fn take_pending_will(&self, conn_id: u64) -> Option<Arc<Message>> {
        let mut inner = self.inner.lock();
        if inner.link.is_some() || inner.state.detached_by != Some(conn_id) {
            return None;
        }
        let will = inner.state.take_will();
        inner.state.touch();
        inner.settle(&self.env, &self.client_id);
        will
    }

    /// The task of the session's timers (replacing and stopping an earlier one).
    pub fn set_timer(&self, timer: AbortHandle) {
        if let Some(old) = self.inner.lock().timer.replace(timer) {
            old.abort();
        }
    }

    /// Wakes the connection serving this session, if any.
    pub fn wake(&self) {
        if let Some(link) = &self.inner.lock().link {
            link.wire.wake();
        }
    }

    /// The wire of the connection serving this session, if any (for the admin API).
    pub fn wire(&self) -> Option<Arc<Wire>> {
        self.lock().link.as_ref().map(|l| l.wire.clone())
    }

    /// Discarded or expired (a session that moved to another node has not ended).
    pub fn has_ended(&self) -> bool {
        let inner = self.inner.lock();
        inner.state.ended && !inner.state.moved
    }

    /// Runs `f` on the state if `conn_id` still owns the session.
    pub fn with_state<R>(
        &self,
        conn_id: u64,
        f: impl FnOnce(&mut SessionState) -> R,
    ) -> Result<R, NotOwner> {
        let mut inner = self.inner.lock();
        if inner.link.as_ref().map(|l| l.conn_id) != Some(conn_id) {
            return Err(NotOwner);
        }
        let r = f(&mut inner.state);
        inner.settle(&self.env, &self.client_id);
        Ok(r)
    }

    /// Runs `f` on the state, whoever owns the session (for inspection and tests).
    pub fn inspect<R>(&self, f: impl FnOnce(&SessionState) -> R) -> R {
        f(&self.inner.lock().state)
    }

    pub fn is_owned_by(&self, conn_id: u64) -> bool {
        self.inner.lock().link.as_ref().map(|l| l.conn_id) == Some(conn_id)
    }

    pub fn limits(&self) -> QueueLimits {
        self.env.limits
    }

    pub fn dropped(&self) -> u64 {
        self.inner.lock().state.dropped
    }
}

impl Mailbox for Session {
    fn id(&self) -> u64 {
        self.id
    }

    /// Queues a message for the client and wakes its connection; false if refused
    /// (queue full, session over, or QoS 0 for an offline client without `queue_qos0`
    /// or while the broker's memory budget is nearly used up).
    fn deliver(&self, delivery: Delivery) -> bool {
        let mut inner = self.inner.lock();
        let online = inner.link.is_some();
        let qos0 = delivery.qos == QoS::AtMostOnce;
        let limits = &self.env.limits;
        if inner.state.ended || (!online && qos0 && !limits.queue_qos0) {
            return false;
        }
        let state = &mut inner.state;
        let max_bytes = limits.max_queued_bytes;
        let memory_high = self.env.budget.level() >= Level::High;
        let full = if state.queued() + state.spilled() >= limits.max_queued
            || (max_bytes > 0 && state.queued_bytes() + delivery.size() > max_bytes)
        {
            Some(Dropped::QueueFull)
        } else {
            (qos0 && memory_high).then_some(Dropped::Memory)
        };
        if let Some(why) = full {
            state.dropped += 1;
            crate::metrics::dropped(why);
            return false;
        }
        let was_empty = state.queued() == 0 && state.spilled() == 0;
        // A stored session's messages go to the disk only, rather than fill the memory
        // budget, once it runs high (and keep going there while earlier ones wait on it,
        // to stay in order); the connection reads them back as its queue drains.
        let spill = !qos0 && (memory_high || state.spilled() > 0) && self.env.journal.has_room();
        if spill && state.is_persisted() {
            state.spill(delivery);
        } else {
            state.push(delivery);
        }
        inner.settle(&self.env, &self.client_id);
        // A non-empty queue means the connection already knows there is work: it drains
        // until the queue is empty or it is blocked on acks or the socket.
        if was_empty {
            if let Some(link) = &inner.link {
                link.wire.wake();
            }
        }
        true
    }

    fn is_online(&self) -> bool {
        self.inner.lock().link.is_some()
    }
}
