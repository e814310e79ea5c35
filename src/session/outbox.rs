//! What a session has due for its client, in the order it goes out: in-flight messages
//! not yet (re)sent on this connection, the next retained messages of new subscriptions,
//! then the queue; as far as the in-flight window allows, and without what the client
//! may not read. Shared by every kind of subscriber: MQTT's `conn::Connection` and the
//! HTTP streams (`http`) differ only in how they write what is due.
//!
//! No I/O and no clock: the caller passes `now`, then writes what `take` returned.

use super::{NotOwner, RetainedWalk, Session};
use crate::message::Delivery;
use crate::metrics::{self, Counter};
use crate::protocol::QoS;
use crate::router::Router;
use std::time::Instant;

/// Messages taken from the session queue (or a retained walk) per lock.
pub const BATCH: usize = 64;

/// One thing to send, in order.
#[derive(Debug)]
pub enum Due {
    /// A message with its packet id (0 for QoS 0); `dup` for a resend.
    Message {
        delivery: Delivery,
        pkid: u16,
        dup: bool,
    },
    /// A QoS 2 exchange past PUBREC, resent on a new connection: its PUBREL.
    Release(u16),
}

/// Whether more is due after a `take`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// More may be due at once: write what was taken, then call again.
    More,
    /// Nothing more for now (the window is full or the session has nothing).
    Idle,
    /// The queue is empty in memory while messages wait on disk: read them back
    /// (`Journal::refill`), then call again.
    Refill,
}

/// The drain of one session by one connection.
#[derive(Debug, Default)]
pub struct Outbox {
    /// While a retained-message walk is under way, whether the queue (live messages) or
    /// the walk takes the window first next time: they take turns, so that neither
    /// starves the other.
    queue_first: bool,
    /// Reused between batches.
    batch: Vec<(Delivery, u16)>,
    /// What `take` returned, for callers that keep their outbox boxed (an idle MQTT
    /// connection's size counts) and reuse it between batches.
    pub due: Vec<Due>,
}

impl Outbox {
    /// Gives back the memory reused between batches (a connection being parked).
    pub fn release(&mut self) {
        self.batch = Vec::new();
        self.due = Vec::new();
    }

    /// Appends the next batch of what is due to `out`: resends first, then, in turns,
    /// a step of the first retained walks and up to `BATCH` queued messages, within
    /// `window` messages in flight. `readable` says what the client may read; the rest
    /// is dropped on the way. Returns whether more is due (see `Progress`).
    #[allow(clippy::too_many_arguments)]
    pub fn take(
        &mut self,
        router: &Router<Session>,
        session: &Session,
        conn_id: u64,
        window: usize,
        readable: &dyn Fn(&Delivery) -> bool,
        now: Instant,
        out: &mut Vec<Due>,
    ) -> Result<Progress, NotOwner> {
        let queue_first = self.queue_first;
        let mut refill = false;
        let mut batch = std::mem::take(&mut self.batch);
        let mut resend = Vec::new();
        let mut unreadable = 0;
        let walk = session.with_state(conn_id, |s| {
            let room = window.saturating_sub(s.inflight.outstanding());
            s.inflight.resend(room, &mut resend);
            // After a resume, whoever resumed the session may not read all that was in
            // flight (another user with the same client id, a reloaded ACL): checked like
            // any other delivery, and dropped from the window when not readable.
            resend.retain(|(pkid, d)| match d {
                Some(d) if !readable(d) => {
                    s.forget(*pkid);
                    unreadable += 1;
                    false
                }
                _ => true,
            });
            let walk = s.walks().front().cloned();
            // The hot path: one lock per batch when no walk is under way. During a
            // walk, the queue and the walk take turns at the window: live messages must
            // not wait (and overflow the queue) behind a long walk, nor retained ones
            // behind a steady stream of live ones.
            if walk.is_none() || queue_first {
                unreadable += s.take_sendable(window, BATCH, now, readable, &mut batch);
            }
            refill = s.wants_refill();
            walk.map(|w| (w, window.saturating_sub(s.inflight.outstanding())))
        })?;
        let resent = !resend.is_empty();
        out.extend(resend.into_iter().map(|(pkid, d)| match d {
            Some(delivery) => Due::Message {
                delivery,
                pkid,
                dup: true,
            },
            None => Due::Release(pkid),
        }));
        let mut walked = false;
        if let Some((walk, room)) = walk {
            let step = walk_step(router, session, conn_id, walk, room, readable, now, out)?;
            walked = step.moved;
            unreadable += step.unreadable;
            if !queue_first {
                unreadable += session.with_state(conn_id, |s| {
                    s.take_sendable(window, BATCH, now, readable, &mut batch)
                })?;
            }
            self.queue_first = !queue_first;
        }
        if unreadable > 0 {
            tracing::debug!(
                count = unreadable,
                "messages the client may not read not sent"
            );
            metrics::add(Counter::DroppedNotAuthorized, unreadable as u64);
        }
        let n = batch.len();
        out.extend(batch.drain(..).map(|(delivery, pkid)| Due::Message {
            delivery,
            pkid,
            dup: false,
        }));
        self.batch = batch;
        Ok(if refill {
            Progress::Refill
        } else if n + unreadable >= BATCH || walked || resent {
            Progress::More
        } else {
            Progress::Idle
        })
    }
}

/// What one step of a retained walk did.
struct Step {
    /// The walk moved on (it may have more).
    moved: bool,
    unreadable: usize,
}

/// Takes the next retained messages of `walk`, as many as `room` in the window allows
/// (any number at QoS 0), recording QoS 1/2 ones as in flight.
#[allow(clippy::too_many_arguments)]
fn walk_step(
    router: &Router<Session>,
    session: &Session,
    conn_id: u64,
    walk: RetainedWalk,
    room: usize,
    readable: &dyn Fn(&Delivery) -> bool,
    now: Instant,
    out: &mut Vec<Due>,
) -> Result<Step, NotOwner> {
    let limit = if walk.qos == QoS::AtMostOnce {
        BATCH
    } else {
        room.min(BATCH)
    };
    if limit == 0 {
        return Ok(Step {
            moved: false,
            unreadable: 0,
        });
    }
    let mut found = Vec::new();
    let next = router.retained_step(&walk.filter, walk.after.as_deref(), limit, now, &mut found);
    let mut unreadable = 0;
    session.with_state(conn_id, |s| {
        s.walk_stepped(next);
        for m in found {
            let mut d = Delivery::new(m, QoS::AtMostOnce, true);
            d.qos = d.message.qos.min(walk.qos);
            d.sub_ids.extend(walk.sub_id);
            // Retained messages are read too: the ACL decides each one.
            if !readable(&d) {
                unreadable += 1;
                continue;
            }
            let pkid = s.send_direct(&d);
            out.push(Due::Message {
                delivery: d,
                pkid,
                dup: false,
            });
        }
    })?;
    Ok(Step {
        moved: true,
        unreadable,
    })
}
