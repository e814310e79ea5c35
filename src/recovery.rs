//! Start-up from a store: the retained messages and the persistent sessions of the last
//! run back in the broker, as they were when it stopped (or crashed), less what expired
//! meanwhile.
//!
//! Sessions come back offline (as after a disconnect at the moment the broker stopped):
//! their in-flight messages are resent, with DUP, when their client returns; their
//! expiry and delayed will count from when they went offline, in wall-clock time.

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
    /// Sessions and retained messages that expired while the broker was down.
    pub expired: usize,
}

/// Puts `snapshot` into `broker`, which must be new (no connection yet).
pub fn restore(broker: &Arc<Broker>, snapshot: Snapshot, now: Instant) -> Recovered {
    let journal = broker.journal();
    let mut r = Restorer {
        broker,
        clock: *journal.clock(),
        now,
        now_ms: journal.clock().to_unix(now),
        messages: FxHashMap::default(),
        done: Recovered::default(),
        forgotten: Vec::new(),
    };
    for m in &snapshot.retained {
        r.retained(m);
    }
    for s in snapshot.sessions {
        r.session(s);
    }
    journal.submit(r.forgotten);
    r.done
}

struct Restorer<'a> {
    broker: &'a Arc<Broker>,
    clock: WallClock,
    now: Instant,
    now_ms: u64,
    /// One live message for each stored one, however many sessions hold it.
    messages: FxHashMap<u64, Arc<Message>>,
    done: Recovered,
    /// What expired while the broker was down, to remove from the store.
    forgotten: Vec<Op>,
}

impl Restorer<'_> {
    fn retained(&mut self, m: &StoredMessage) {
        if m.expires_at.is_some_and(|at| at <= self.now_ms) {
            self.forgotten.push(Op::ClearRetained {
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
            .entry(m.id)
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
            if let Some((will, _)) = &will {
                broker.publish_will(will, self.now);
            }
            self.forgotten.push(Op::DeleteSession {
                client_id: s.client_id,
            });
            self.done.expired += 1;
            return;
        }
        self.done.queued += s.queue.len();
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
        let queue = s
            .queue
            .iter()
            .map(|q| (q.seq, self.delivery(&q.delivery)))
            .collect();
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
        let state = SessionState::restore(Restored {
            expiry,
            offline_since: self.clock.to_instant(offline_ms),
            will,
            subscriptions: subscriptions.clone(),
            queue,
            next_seq: s.last_seq + 1,
            spilled: (s.queued as usize).saturating_sub(s.queue.len()),
            inflight,
            incoming: s.incoming,
        });
        let env = broker.session_env();
        let session = Arc::new(Session::with(broker.next_id(), s.client_id, env, state));
        for (filter, sub) in &subscriptions {
            broker
                .router
                .subscribe(filter, &session, sub.options, sub.id);
        }
        broker.adopt(session.clone());
        let expires_at = ends_ms.map(|end| self.clock.to_instant(end));
        broker.schedule(&session, 0, expires_at, will_at);
        self.done.sessions += 1;
    }
}
