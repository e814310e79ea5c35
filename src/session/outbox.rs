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
    /// A retained walk goes on, but its last `EMPTY_STEPS` steps found nothing to send
    /// (a sparse filter over a large tree): let other tasks run, then call again, so that
    /// one walk never holds a worker thread for long.
    Yield,
}

/// Steps of a walk in a row that found nothing before `take` says `Progress::Yield`:
/// with `NODES_PER_STEP` nodes a step, about 16,000 tree nodes between yields.
const EMPTY_STEPS: u8 = 16;

/// The drain of one session by one connection.
#[derive(Debug, Default)]
pub struct Outbox {
    /// While a retained-message walk is under way, whether the queue (live messages) or
    /// the walk takes the window first next time: they take turns, so that neither
    /// starves the other.
    queue_first: bool,
    /// Walk steps in a row that found nothing (`EMPTY_STEPS`).
    empty_steps: u8,
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
        let taken_before = out.len();
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
        // Rounds that took the queue's turn leave the count as it is.
        if out.len() > taken_before || unreadable > 0 {
            self.empty_steps = 0;
        } else if walked {
            self.empty_steps += 1;
        }
        Ok(if refill {
            Progress::Refill
        } else if self.empty_steps >= EMPTY_STEPS {
            self.empty_steps = 0;
            Progress::Yield
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::Budget;
    use crate::message::Message;
    use crate::protocol::ByteStr;
    use crate::router::NODES_PER_STEP;
    use crate::session::{Env, Link, QueueLimits, Wire};
    use bytes::Bytes;
    use std::sync::Arc;

    const CONN: u64 = 7;

    fn setup(topics: impl Iterator<Item = String>) -> (Router<Session>, Session) {
        let router = Router::new(Arc::new(Budget::new(usize::MAX)));
        let now = Instant::now();
        for t in topics {
            let m = Message::new(
                ByteStr::from(t),
                Bytes::from_static(b"r"),
                QoS::AtMostOnce,
                true,
                None,
                0,
                now,
            );
            router.retain(&m);
        }
        let env = Env::new(QueueLimits {
            max_inflight: 10,
            max_queued: 1000,
            max_queued_bytes: 0,
            queue_qos0: true,
        });
        let session = Session::new(1, ByteStr::from("c"), Arc::new(env));
        session.attach_new(Link::new(CONN, Arc::new(Wire::new(None))), 0);
        (router, session)
    }

    /// Takes until nothing more is due: what each `take` said, with the topics it took.
    fn takes(router: &Router<Session>, session: &Session) -> Vec<(Progress, Vec<String>)> {
        let mut outbox = Outbox::default();
        let mut all = Vec::new();
        loop {
            let mut out = Vec::new();
            let now = Instant::now();
            let progress = outbox
                .take(router, session, CONN, 10, &|_| true, now, &mut out)
                .unwrap();
            if progress != Progress::More {
                assert!(out.is_empty(), "{progress:?} takes nothing");
            }
            let topics = out
                .iter()
                .map(|d| match d {
                    Due::Message { delivery, .. } => delivery.message.topic.to_string(),
                    Due::Release(_) => unreachable!(),
                })
                .collect();
            all.push((progress, topics));
            if progress == Progress::Idle {
                return all;
            }
        }
    }

    /// Takes until nothing more is due: the topics of each batch.
    fn drain(router: &Router<Session>, session: &Session) -> Vec<Vec<String>> {
        let all = takes(router, session).into_iter();
        all.filter(|(p, _)| *p == Progress::More)
            .map(|(_, topics)| topics)
            .collect()
    }

    /// The first `MAX_ACTIVE_WALKS` walks take turns a step of `BATCH` at a time; a later
    /// one starts when one of them is done. Every retained message once.
    #[test]
    fn walks_take_turns_and_later_ones_wait() {
        let sizes = [100, 150, 150, 150, 150, 150];
        let topics = sizes
            .iter()
            .enumerate()
            .flat_map(|(w, n)| (0..*n).map(move |i| format!("w{w}/{i}")));
        let (router, session) = setup(topics);
        session
            .with_state(CONN, |s| {
                for w in 0..sizes.len() {
                    s.start_walk(ByteStr::from(format!("w{w}/#")), QoS::AtMostOnce, None);
                }
            })
            .unwrap();
        let batches = drain(&router, &session);
        let steps: Vec<(&str, usize)> = batches
            .iter()
            .map(|b| (b[0].split('/').next().unwrap(), b.len()))
            .collect();
        assert!(batches
            .iter()
            .all(|b| b.iter().all(|t| t.starts_with(&b[0][..3]))));
        assert_eq!(
            steps,
            [
                ("w0", 64),
                ("w1", 64),
                ("w2", 64),
                ("w3", 64),
                ("w0", 36),
                // w0 is done: w4 joins the turns, w5 still waits.
                ("w1", 64),
                ("w2", 64),
                ("w3", 64),
                ("w4", 64),
                ("w1", 22),
                ("w2", 22),
                ("w3", 22),
                ("w4", 64),
                ("w5", 64),
                ("w4", 22),
                ("w5", 64),
                ("w5", 22),
            ]
        );
        let mut all: Vec<String> = batches.into_iter().flatten().collect();
        let sent = all.len();
        all.sort();
        all.dedup();
        assert_eq!((sent, all.len()), (850, 850));
    }

    /// A filter matching few of many retained topics goes in steps of bounded nodes, not
    /// of messages; the walk carries on through them to every match.
    #[test]
    fn a_sparse_walk_carries_on_through_steps_that_find_nothing() {
        // `s/+/7` visits `s`, its 3,072 children and 4 matches: four steps.
        let topics = (0..3 * NODES_PER_STEP).map(|i| format!("s/{i}/{}", i % 1000));
        let (router, session) = setup(topics);
        session
            .with_state(CONN, |s| {
                s.start_walk(ByteStr::from("s/+/7"), QoS::AtMostOnce, None)
            })
            .unwrap();
        let batches = drain(&router, &session);
        assert_eq!(batches.len(), 4);
        let got: Vec<String> = batches.into_iter().flatten().collect();
        // In walk order, level by level.
        assert_eq!(got, ["s/1007/7", "s/2007/7", "s/3007/7", "s/7/7"]);
    }

    /// A walk whose steps keep finding nothing says `Yield` after `EMPTY_STEPS` of them,
    /// then goes on where it stopped.
    #[test]
    fn a_walk_that_finds_nothing_for_long_yields_and_goes_on() {
        // Enough topics for more than `EMPTY_STEPS` steps.
        let n = 2 * (usize::from(EMPTY_STEPS) + 2) * NODES_PER_STEP;
        let topics = (0..n).map(|i| format!("y/{i}/{}", usize::from(i == n - 1)));
        let (router, session) = setup(topics);
        session
            .with_state(CONN, |s| {
                s.start_walk(ByteStr::from("y/+/1"), QoS::AtMostOnce, None)
            })
            .unwrap();
        let seen: Vec<Progress> = takes(&router, &session).into_iter().map(|t| t.0).collect();
        let first_yield = seen.iter().position(|p| *p == Progress::Yield);
        assert_eq!(first_yield, Some(usize::from(EMPTY_STEPS) - 1), "{seen:?}");
        assert_eq!(seen.last(), Some(&Progress::Idle));
    }
}
