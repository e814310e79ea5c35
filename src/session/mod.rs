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
//! a change of ownership (attach, discard, expiry) also takes, so the two are atomic with
//! respect to each other. Lock order: registry entry → `control` → router trie → `inner`.

pub mod state;

use crate::budget::{Budget, Level};
use crate::message::{Delivery, Message};
use crate::metrics::Dropped;
use crate::protocol::{ByteStr, QoS};
use crate::router::Mailbox;
use parking_lot::{Mutex, MutexGuard};
pub use state::{
    Ended, Inflight, RetainedWalk, SessionState, Stage, Subscription, MAX_ACTIVE_WALKS,
    NEVER_EXPIRE,
};
use std::sync::Arc;
use tokio::sync::Notify;

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
    limits: QueueLimits,
    /// The broker's budget for messages held for clients, charged with what this
    /// session holds.
    budget: Arc<Budget>,
    control: Mutex<()>,
    inner: Mutex<Inner>,
}

struct Inner {
    state: SessionState,
    link: Option<Link>,
    /// What this session is charged in `budget` (its state's `held_bytes` as of the
    /// last change).
    charged: usize,
}

impl Inner {
    /// Brings the session's charge in the broker's budget up to date after a change.
    fn settle(&mut self, budget: &Budget) {
        let held = self.state.held_bytes();
        if held != self.charged {
            budget.adjust(held as isize - self.charged as isize);
            self.charged = held;
        }
    }
}

/// The connection currently serving a session.
#[derive(Clone)]
pub struct Link {
    pub conn_id: u64,
    pub wake: Arc<Notify>,
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
    pub fn new(id: u64, client_id: ByteStr, limits: QueueLimits, budget: Arc<Budget>) -> Session {
        Session {
            id,
            client_id,
            limits,
            budget,
            control: Mutex::new(()),
            inner: Mutex::new(Inner {
                state: SessionState::new(),
                link: None,
                charged: 0,
            }),
        }
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
        state.pending_will = None;
        state.detached_by = None;
        Some(inner.link.replace(link))
    }

    /// Attaches the first connection of a new session.
    pub fn attach_new(&self, link: Link, expiry: u32) {
        let mut inner = self.inner.lock();
        inner.state.expiry = expiry;
        inner.link = Some(link);
    }

    pub fn set_expiry(&self, conn_id: u64, expiry: u32) {
        let _ = self.with_state(conn_id, |s| s.expiry = expiry);
    }

    /// Detaches `conn_id` if it still owns the session (None otherwise). With an expiry
    /// the session stays, holding `will` if it has a delay; without, it ends.
    pub fn detach(&self, conn_id: u64, will: Option<Arc<Message>>) -> Option<Detached> {
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
            state.pending_will = will;
            state.park(self.limits.queue_qos0);
            Detached::Kept {
                expiry: state.expiry,
            }
        };
        inner.settle(&self.budget);
        Some(detached)
    }

    /// Ends the session for good, whoever owns it: returns the link (to be told) and
    /// what the session left.
    pub fn discard(&self) -> (Option<Link>, Ended) {
        let mut inner = self.inner.lock();
        let link = inner.link.take();
        let ended = inner.state.end();
        inner.settle(&self.budget);
        (link, ended)
    }

    /// Ends the session if it is still offline since `conn_id` left it.
    pub fn expire(&self, conn_id: u64) -> Option<Ended> {
        let mut inner = self.inner.lock();
        if inner.link.is_some() || inner.state.detached_by != Some(conn_id) {
            return None;
        }
        let ended = inner.state.end();
        inner.settle(&self.budget);
        Some(ended)
    }

    /// Takes the delayed will if the session is still offline since `conn_id` left it.
    pub fn take_pending_will(&self, conn_id: u64) -> Option<Arc<Message>> {
        let mut inner = self.inner.lock();
        if inner.link.is_some() || inner.state.detached_by != Some(conn_id) {
            return None;
        }
        inner.state.pending_will.take()
    }

    /// Wakes the connection serving this session, if any.
    pub fn wake(&self) {
        if let Some(link) = &self.inner.lock().link {
            link.wake.notify_one();
        }
    }

    pub fn has_ended(&self) -> bool {
        self.inner.lock().state.ended
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
        inner.settle(&self.budget);
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
        self.limits
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
        if inner.state.ended || (!online && qos0 && !self.limits.queue_qos0) {
            return false;
        }
        let state = &mut inner.state;
        let max_bytes = self.limits.max_queued_bytes;
        let full = if state.queued() >= self.limits.max_queued
            || (max_bytes > 0 && state.queued_bytes() + delivery.size() > max_bytes)
        {
            Some(Dropped::QueueFull)
        } else {
            (qos0 && self.budget.level() >= Level::High).then_some(Dropped::Memory)
        };
        if let Some(why) = full {
            state.dropped += 1;
            crate::metrics::dropped(why);
            return false;
        }
        let was_empty = state.queued() == 0;
        state.push(delivery);
        inner.settle(&self.budget);
        // A non-empty queue means the connection already knows there is work: it drains
        // until the queue is empty or it is blocked on acks or the socket.
        if was_empty {
            if let Some(link) = &inner.link {
                link.wake.notify_one();
            }
        }
        true
    }

    fn is_online(&self) -> bool {
        self.inner.lock().link.is_some()
    }
}
