//! Start-up from a store: the retained messages and the persistent sessions of the last
//! run back in the broker, as they were when it stopped (or crashed), less what expired
//! meanwhile.
//!
//! Sessions come back offline (as after a disconnect at the moment the broker stopped):
//! their in-flight messages are resent, with DUP, when their client returns; their
//! expiry and delayed will count from when they went offline, in wall-clock time.

use crate::broker::Broker;
use crate::message::{Delivery, Message};
use crate::session::{Restored, Session, Stage, Subscription, NEVER_EXPIRE};
use crate::store::{self, InflightStage, Op, Snapshot, StoredMessage};
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
    let clock = *journal.clock();
    let now_ms = clock.to_unix(now);
    let mut done = Recovered::default();
    let mut forgotten = Vec::new();
    for m in &snapshot.retained {
        if m.expires_at.is_some_and(|at| at <= now_ms) {
            forgotten.push(Op::ClearRetained {
                topic: m.topic.clone(),
            });
            done.expired += 1;
            continue;
        }
        broker.router.retain(&journal.restore_message(m, now));
        done.retained += 1;
    }
    // One live message for each stored one, however many sessions hold it.
    let mut messages: FxHashMap<u64, Arc<Message>> = FxHashMap::default();
    let mut message = |m: &Arc<StoredMessage>| {
        messages
            .entry(m.id)
            .or_insert_with(|| Arc::new(journal.restore_message(m, now)))
            .clone()
    };
    let mut delivery = |d: &store::Delivery| Delivery {
        message: message(&d.message),
        qos: d.qos,
        retain: d.retain,
        sub_ids: d.subscription_ids.clone(),
        shared: None,
    };
    for s in snapshot.sessions {
        // A session online when the broker crashed went offline then.
        let offline_ms = s.session.offline_since.unwrap_or(now_ms);
        let expiry = s.session.expiry_interval;
        let ends_ms = (expiry != NEVER_EXPIRE).then(|| offline_ms + u64::from(expiry) * 1000);
        let will = s.session.will.as_ref().map(|w| {
            let message = Arc::new(journal.restore_message(&w.message, now));
            (message, clock.to_instant(w.publish_at))
        });
        if ends_ms.is_some_and(|end| end <= now_ms) {
            // Ended while the broker was down: its will is due now.
            if let Some((will, _)) = &will {
                broker.publish_will(will, now);
            }
            forgotten.push(Op::DeleteSession {
                client_id: s.client_id,
            });
            done.expired += 1;
            continue;
        }
        done.queued += s.queue.len();
        done.inflight += s.inflight.len();
        let restored = Restored {
            expiry,
            offline_since: clock.to_instant(offline_ms),
            will,
            subscriptions: s
                .subscriptions
                .iter()
                .map(|(f, sub)| {
                    let sub = Subscription {
                        options: sub.options,
                        id: sub.identifier,
                    };
                    (f.clone(), sub)
                })
                .collect(),
            queue: s
                .queue
                .iter()
                .map(|q| (q.seq, delivery(&q.delivery)))
                .collect(),
            next_seq: s.last_seq + 1,
            inflight: s
                .inflight
                .iter()
                .map(|e| {
                    let stage = match &e.stage {
                        InflightStage::Publish(d) => Stage::Publish(delivery(d)),
                        InflightStage::PubRel => Stage::Release,
                    };
                    (e.pkid, e.order, stage)
                })
                .collect(),
            incoming: s.incoming,
        };
        let will_at = restored.will.as_ref().map(|(_, at)| *at);
        let subscriptions = restored.subscriptions.clone();
        let session = Arc::new(Session::with(
            broker.next_id(),
            s.client_id,
            broker.session_env(),
            crate::session::SessionState::restore(restored),
        ));
        for (filter, sub) in &subscriptions {
            broker
                .router
                .subscribe(filter, &session, sub.options, sub.id);
        }
        let expires_at = ends_ms.map(|end| clock.to_instant(end));
        broker.adopt(session.clone());
        broker.schedule(&session, 0, expires_at, will_at);
        done.sessions += 1;
    }
    journal.submit(forgotten);
    done
}
