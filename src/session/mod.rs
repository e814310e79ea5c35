//! Sessions: the MQTT state of one client id, which outlives its connections.
//!
//! `SessionState` is plain data (subscriptions, queue, in-flight QoS state): no sockets,
//! no tasks. The live connection, if any, is a `Link` beside it: how publishers wake
//! the connection task that drains the queue.

pub mod connection;

use crate::protocol::{ByteStr, QoS, SubOptions};
use crate::router::{Delivery, Message};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use tokio::sync::Notify;

/// How many messages a session may hold, and which.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub max_inflight: usize,
    pub max_queued: usize,
    pub queue_qos0: bool,
}

pub struct Session {
    /// Unique for the broker's life; a new session for the same client id gets a new one.
    pub id: u64,
    pub client_id: ByteStr,
    limits: QueueLimits,
    inner: Mutex<Inner>,
}

struct Inner {
    state: SessionState,
    link: Option<Link>,
}

/// The connection currently serving a session.
#[derive(Clone)]
pub struct Link {
    pub conn_id: u64,
    pub wake: Arc<Notify>,
}

#[derive(Debug, Default)]
pub struct SessionState {
    /// Seconds the session outlives its connection: 0 = it ends with it (3.x clean
    /// session), `NEVER_EXPIRE` = kept until discarded (3.x persistent session).
    pub expiry: u32,
    /// The connection that last detached, so that a stale expiry timer does nothing.
    pub detached_by: Option<u64>,
    /// A 5.0 will waiting out its Will Delay Interval; cancelled if the session resumes.
    pub pending_will: Option<Arc<Message>>,
    pub subscriptions: HashMap<ByteStr, SubOptions>,
    /// Messages waiting for the in-flight window or for the client to come back.
    pub queue: VecDeque<Delivery>,
    /// Outbound QoS 1/2 messages sent and not yet fully acknowledged, in send order.
    pub inflight: VecDeque<Inflight>,
    /// Inbound QoS 2 packet ids received and not yet released by PUBREL.
    pub inbound_qos2: HashSet<u16>,
    pub next_pkid: u16,
    /// Messages refused because the queue was full.
    pub dropped: u64,
    /// Discarded or expired: no connection will ever resume it.
    pub ended: bool,
}

pub const NEVER_EXPIRE: u32 = u32::MAX;

/// What remains to do after a connection let go of its session.
pub struct Detached {
    /// The session ended with the connection: these subscriptions must be removed.
    pub ended: Option<Vec<ByteStr>>,
    /// The will handed to `detach`, when the session ended and so it cannot wait.
    pub will: Option<Arc<Message>>,
    /// Messages taken through shared subscriptions that the client never acknowledged,
    /// for another member of the group.
    pub orphans: Vec<Delivery>,
    pub expiry: u32,
}

/// What is left of a session that ended while offline.
pub struct Ended {
    pub filters: Vec<ByteStr>,
    pub will: Option<Arc<Message>>,
}

#[derive(Debug, Clone)]
pub struct Inflight {
    pub pkid: u16,
    pub stage: Stage,
}

#[derive(Debug, Clone)]
pub enum Stage {
    /// PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Publish(Delivery),
    /// PUBREL sent, waiting for PUBCOMP.
    Release,
}

/// The session changed hands: the connection asking is no longer its owner.
#[derive(Debug)]
pub struct NotOwner;

impl Session {
    pub fn new(id: u64, client_id: ByteStr, limits: QueueLimits) -> Session {
        Session {
            id,
            client_id,
            limits,
            inner: Mutex::new(Inner {
                state: SessionState {
                    next_pkid: 1,
                    ..SessionState::default()
                },
                link: None,
            }),
        }
    }

    /// Queues a message for the client and wakes its connection; false if refused
    /// (queue full, or QoS 0 for an offline client without `queue_qos0`).
    pub fn deliver(&self, delivery: Delivery) -> bool {
        let mut inner = self.inner.lock();
        let online = inner.link.is_some();
        if !online && delivery.qos == QoS::AtMostOnce && !self.limits.queue_qos0 {
            return false;
        }
        let state = &mut inner.state;
        if state.queue.len() >= self.limits.max_queued {
            state.dropped += 1;
            crate::metrics::dropped();
            return false;
        }
        let was_empty = state.queue.is_empty();
        state.queue.push_back(delivery);
        // A non-empty queue means the connection already knows there is work: it drains
        // until the queue is empty or it is blocked on acks or the socket.
        if was_empty {
            if let Some(link) = &inner.link {
                link.wake.notify_one();
            }
        }
        true
    }

    /// Attaches a new connection, returning the one it replaces (to be told it lost).
    /// A will still waiting out its delay is cancelled [MQTT-3.1.3-9].
    pub fn attach(&self, link: Link, expiry: u32) -> Option<Link> {
        let mut inner = self.inner.lock();
        inner.state.expiry = expiry;
        inner.state.pending_will = None;
        inner.state.detached_by = None;
        inner.link.replace(link)
    }

    pub fn set_expiry(&self, conn_id: u64, expiry: u32) {
        let _ = self.with_state(conn_id, |s| s.expiry = expiry);
    }

    /// Detaches `conn_id` if it still owns the session. Queued QoS 0 messages are dropped
    /// unless configured to be kept; messages from shared subscriptions not yet
    /// acknowledged are handed back for another member.
    pub fn detach(&self, conn_id: u64, will: Option<Arc<Message>>) -> Option<Detached> {
        let mut inner = self.inner.lock();
        if inner.link.as_ref().map(|l| l.conn_id) != Some(conn_id) {
            return None;
        }
        inner.link = None;
        let state = &mut inner.state;
        state.detached_by = Some(conn_id);
        let mut orphans = Vec::new();
        let queued = std::mem::take(&mut state.queue);
        for d in queued {
            if d.shared.is_some() {
                orphans.push(d);
            } else if state.expiry > 0 && (d.qos != QoS::AtMostOnce || self.limits.queue_qos0) {
                state.queue.push_back(d);
            }
        }
        state.inflight.retain(|f| match &f.stage {
            Stage::Publish(d) if d.shared.is_some() => {
                orphans.push(d.clone());
                false
            }
            _ => true,
        });
        let (ended, will) = if state.expiry == 0 {
            (Some(take_subscriptions(state)), will)
        } else {
            state.pending_will = will;
            (None, None)
        };
        Some(Detached {
            ended,
            will,
            orphans,
            expiry: state.expiry,
        })
    }

    /// Ends the session for good: detaches whoever owns it. Returns the link (to be
    /// told), the subscriptions (to be removed from the router) and a pending will
    /// (published now: its session is over).
    pub fn discard(&self) -> (Option<Link>, Ended) {
        let mut inner = self.inner.lock();
        let link = inner.link.take();
        (link, end(&mut inner.state))
    }

    /// Ends the session if it is still offline since `conn_id` left it.
    pub fn expire(&self, conn_id: u64) -> Option<Ended> {
        let mut inner = self.inner.lock();
        if inner.link.is_some() || inner.state.detached_by != Some(conn_id) {
            return None;
        }
        Some(end(&mut inner.state))
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

    pub fn is_online(&self) -> bool {
        self.inner.lock().link.is_some()
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
        Ok(f(&mut inner.state))
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

fn take_subscriptions(state: &mut SessionState) -> Vec<ByteStr> {
    state.subscriptions.drain().map(|(f, _)| f).collect()
}

fn end(state: &mut SessionState) -> Ended {
    state.ended = true;
    state.queue.clear();
    state.inflight.clear();
    state.inbound_qos2.clear();
    state.detached_by = None;
    Ended {
        filters: take_subscriptions(state),
        will: state.pending_will.take(),
    }
}

impl SessionState {
    /// The next packet id not in use by an in-flight message.
    pub fn allocate_pkid(&mut self) -> u16 {
        loop {
            let id = self.next_pkid;
            self.next_pkid = if id == u16::MAX { 1 } else { id + 1 };
            if !self.inflight.iter().any(|f| f.pkid == id) {
                return id;
            }
        }
    }

    /// Moves queued messages into `out` for sending, as far as the in-flight window
    /// allows: QoS 1/2 ones get a packet id and are recorded as in flight.
    pub fn take_sendable(
        &mut self,
        max_inflight: usize,
        limit: usize,
        out: &mut Vec<(Delivery, u16)>,
    ) {
        while out.len() < limit {
            let Some(front) = self.queue.front() else {
                break;
            };
            if front.qos != QoS::AtMostOnce && self.inflight.len() >= max_inflight {
                break;
            }
            let Some(delivery) = self.queue.pop_front() else {
                break;
            };
            if delivery.message.is_expired() {
                continue;
            }
            let pkid = if delivery.qos == QoS::AtMostOnce {
                0
            } else {
                let pkid = self.allocate_pkid();
                self.inflight.push_back(Inflight {
                    pkid,
                    stage: Stage::Publish(delivery.clone()),
                });
                pkid
            };
            out.push((delivery, pkid));
        }
    }

    /// PUBACK (QoS 1) or PUBCOMP: the exchange for `pkid` is over.
    pub fn complete(&mut self, pkid: u16, released: bool) -> bool {
        let pos = self.inflight.iter().position(|f| {
            f.pkid == pkid
                && match &f.stage {
                    Stage::Publish(d) => !released && d.qos == QoS::AtLeastOnce,
                    Stage::Release => released,
                }
        });
        pos.and_then(|p| self.inflight.remove(p)).is_some()
    }

    /// Drops `pkid` from the in-flight messages, as if acknowledged.
    pub fn forget(&mut self, pkid: u16) {
        self.inflight.retain(|f| f.pkid != pkid);
    }

    /// PUBREC: the QoS 2 message is received; the exchange moves on to PUBREL.
    pub fn received(&mut self, pkid: u16) -> bool {
        for f in self.inflight.iter_mut() {
            if f.pkid == pkid {
                if let Stage::Publish(d) = &f.stage {
                    if d.qos == QoS::ExactlyOnce {
                        f.stage = Stage::Release;
                        return true;
                    }
                }
                // Already released: a repeated PUBREC is answered with PUBREL again.
                return matches!(f.stage, Stage::Release);
            }
        }
        false
    }
}
