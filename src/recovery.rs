//! Start-up from a store: the retained messages and the persistent sessions of the last
//! run back in the broker, as they were when it stopped (or crashed), less what expired
//! meanwhile.
//!
//! Sessions come back offline (as after a disconnect at the moment the broker stopped):
//! their in-flight messages are resent, with DUP, when their client returns; their
//! expiry and delayed will count from when they went offline, in wall-clock time.
//!
//! Wills due at start and the timers of the sessions go only once every session is back,
//! so that a will reaches every restored subscriber, whatever order the store gave.

use crate::broker::Broker;
use crate::message::{Delivery, Message};
use crate::protocol::ByteStr;
use crate::session::journal::WallClock;
use crate::session::{Restored, Session, SessionState, Stage, Subscription, NEVER_EXPIRE};
use crate::store::{self, InflightStage, Op, SessionSnapshot, Snapshot, StoredMessage};
use rustc_hash::FxHashMap;
use std::sync::Arc;
use std::time::Instant;

/// What a start-up brought back.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    pub retained: usize,
    pub sessions: usize,
    pub queued: usize,
    pub inflight: usize,
    /// Sessions, retained messages and queued messages that expired while the broker was
    /// down.
    pub expired: usize,
}

/// Puts `snapshot` into `broker`, which must be new (no connection yet), or, in a
/// cluster, one session taken from another node, before its client's connection opens it.
pub fn restore(broker: &Arc<Broker>, snapshot: Snapshot, now: Instant) -> Recovered {
    let journal = broker.journal();
    let mut r = Restorer {
        broker,
        clock: *journal.clock(),
        now,
        now_ms: journal.clock().to_unix(now),
        messages: FxHashMap::default(),
        done: Recovered::default(),
        fixes: Vec::new(),
        wills: Vec::new(),
        timers: Vec::new(),
    };
    for m in &snapshot.retained {
        r.retained(m);
    }
    for s in snapshot.sessions {
        r.session(s);
    }
    journal.submit(r.fixes);
    for will in &r.wills {
        broker.publish_will(will, now);
    }
    for (session, expires_at, will_at) in &r.timers {
        broker.schedule(session, 0, *expires_at, *will_at);
    }
    r.done
}

struct Restorer<'a> {
    broker: &'a Arc<Broker>,
    clock: WallClock,
    now: Instant,
    now_ms: u64,
    /// One live message for each stored one, however many sessions hold it. Keyed by the
    /// stored message's address, not its id: the disk store hands every holder of one
    /// message the same `Arc`, while in a cluster ids are per node, so records written
    /// by different nodes can carry one id for different messages.
    messages: FxHashMap<usize, Arc<Message>>,
    done: Recovered,
    /// What expired while the broker was down, to remove from the store, and sessions
    /// that were online when it crashed, to record as offline since the restart.
    fixes: Vec<Op>,
    /// Wills of sessions that ended while the broker was down.
    wills: Vec<Arc<Message>>,
    /// Each restored session's end and delayed will.
    timers: Vec<Timers>,
}

type Timers = (Arc<Session>, Option<Instant>, Option<Instant>);

impl Restorer<'_> {
    fn retained(&mut self, m: &StoredMessage) {
        if m.expires_at.is_some_and(|at| at <= self.now_ms) {
            self.fixes.push(Op::ClearRetained {
                topic: m.topic.clone(),
            });
            self.done.expired += 1;
            return;
        }
        let message = self.broker.journal().restore_message(m, self.now);
        self.broker.router.retain(&message);
        self.done.retained += 1;
    }

    fn message(&mut self, m: &Arc<StoredMessage>) -> Arc<Message> {
        let (journal, now) = (self.broker.journal(), self.now);
        self.messages
            .entry(Arc::as_ptr(m) as usize)
            .or_insert_with(|| Arc::new(journal.restore_message(m, now)))
            .clone()
    }

    fn delivery(&mut self, d: &store::Delivery) -> Delivery {
        Delivery {
            message: self.message(&d.message),
            qos: d.qos,
            retain: d.retain,
            sub_ids: d.subscription_ids.clone(),
            shared: None,
        }
    }

    /// A session's queue, less what expired while the broker was down: a queued message
    /// past its expiry is not sent, and goes (one in flight is resent, its delivery having
    /// begun). Only as much as the message memory takes below its high mark comes into
    /// memory; the rest stays on disk, read back as the queue drains. Returns the queue
    /// and how many of the loaded entries stay on disk.
    fn queue(&mut self, s: &SessionSnapshot) -> (Vec<(u64, Delivery)>, usize) {
        let budget = &self.broker.memory;
        let mut room = (budget.limit() / 10 * 9).saturating_sub(budget.used());
        let mut queue = Vec::with_capacity(s.queue.len());
        let mut left = 0;
        for q in &s.queue {
            if left > 0 {
                left += 1;
            } else if q
                .delivery
                .message
                .expires_at
                .is_some_and(|at| at <= self.now_ms)
            {
                self.fixes.push(Op::Dequeue {
                    client_id: s.client_id.clone(),
                    seq: q.seq,
                });
                self.done.expired += 1;
            } else {
                let delivery = self.delivery(&q.delivery);
                match room.checked_sub(delivery.size()) {
                    Some(rest) => {
                        room = rest;
                        queue.push((q.seq, delivery));
                    }
                    None => left = 1,
                }
            }
        }
        self.done.queued += queue.len();
        (queue, left)
    }

    fn session(&mut self, s: SessionSnapshot) {
        let broker = self.broker;
        // A session online when the broker crashed went offline then.
        let offline_ms = s.session.offline_since.unwrap_or(self.now_ms);
        let expiry = s.session.expiry_interval;
        let ends_ms = (expiry != NEVER_EXPIRE).then(|| offline_ms + u64::from(expiry) * 1000);
        let will = s.session.will.as_ref().map(|w| {
            let message = broker.journal().restore_message(&w.message, self.now);
            (Arc::new(message), self.clock.to_instant(w.publish_at))
        });
        if ends_ms.is_some_and(|end| end <= self.now_ms) {
            // Ended while the broker was down: its will is due now.
            self.wills.extend(will.map(|(will, _)| will));
            self.fixes.push(Op::DeleteSession {
                client_id: s.client_id,
            });
            self.done.expired += 1;
            return;
        }
        self.done.inflight += s.inflight.len();
        let subscriptions: Vec<(ByteStr, Subscription)> = s
            .subscriptions
            .iter()
            .map(|(f, sub)| {
                let sub = Subscription {
                    options: sub.options,
                    id: sub.identifier,
                };
                (f.clone(), sub)
            })
            .collect();
        let (queue, left_on_disk) = self.queue(&s);
        let inflight = s
            .inflight
            .iter()
            .map(|e| {
                let stage = match &e.stage {
                    InflightStage::Publish(d) => Stage::Publish(self.delivery(d)),
                    InflightStage::PubRel => Stage::Release,
                };
                (e.pkid, e.order, stage)
            })
            .collect();
        let will_at = will.as_ref().map(|(_, at)| *at);
        if s.session.offline_since.is_none() {
            // Online when the broker crashed: offline since now, also for the next start.
            let mut record = s.session.clone();
            record.offline_since = Some(offline_ms);
            self.fixes.push(Op::PutSession {
                client_id: s.client_id.clone(),
                session: record,
            });
        }
        let state = SessionState::restore(Restored {
            expiry,
            offline_since: self.clock.to_instant(offline_ms),
            will,
            subscriptions: subscriptions.clone(),
            queue,
            next_seq: s.last_seq + 1,
            spilled: (s.queued as usize).saturating_sub(s.queue.len()) + left_on_disk,
            inflight,
            incoming: s.incoming,
        });
        let env = broker.session_env();
        let session = Arc::new(Session::with(broker.next_id(), s.client_id, env, state));
        for (filter, sub) in &subscriptions {
            broker.route(filter, &session, sub.options, sub.id);
        }
        broker.adopt(session.clone());
        let expires_at = ends_ms.map(|end| self.clock.to_instant(end));
        self.timers.push((session, expires_at, will_at));
        self.done.sessions += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::protocol::QoS;
    use crate::store::{QueuedEntry, StoredSession};
    use bytes::Bytes;

    fn delivery(id: u64, topic: &str) -> store::Delivery {
        store::Delivery {
            message: Arc::new(StoredMessage {
                id,
                topic: topic.into(),
                payload: Bytes::from_static(b"x"),
                qos: QoS::AtLeastOnce,
                ..StoredMessage::default()
            }),
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: Vec::new(),
        }
    }

    /// In a cluster each node numbers its messages, so a session that moved between
    /// nodes holds records of different messages under one id: each keeps its own.
    #[tokio::test]
    async fn messages_with_one_id_from_different_writers_stay_apart() {
        let broker = Broker::new(Config::default(), Vec::new()).unwrap();
        let snapshot = Snapshot {
            sessions: vec![SessionSnapshot {
                client_id: "c".into(),
                session: StoredSession {
                    expiry_interval: 600,
                    ..StoredSession::default()
                },
                queue: vec![
                    QueuedEntry {
                        seq: 1,
                        delivery: delivery(7, "from/a"),
                    },
                    QueuedEntry {
                        seq: 2,
                        delivery: delivery(7, "from/b"),
                    },
                ],
                queued: 2,
                last_seq: 2,
                ..SessionSnapshot::default()
            }],
            ..Snapshot::default()
        };
        restore(&broker, snapshot, crate::clock::now());
        let session = broker.session("c").unwrap();
        let topics: Vec<String> =
            session.inspect(|s| s.queue().map(|d| d.message.topic.to_string()).collect());
        assert_eq!(topics, ["from/a", "from/b"]);
    }
}
