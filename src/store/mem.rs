//! The in-memory store: the model the disk store is tested against (with persistence off
//! the broker has no store at all). Ops apply at once under a lock; nothing survives the
//! process.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{
    BoxFuture, Delivery, Durable, InflightEntry, InflightStage, Op, QueuedEntry, SessionSnapshot,
    Snapshot, Store, StoreError, StoredMessage, StoredSession, StoredSubscription,
};
use crate::protocol::ByteStr;

#[derive(Default)]
pub struct MemStore {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    retained: BTreeMap<ByteStr, Arc<StoredMessage>>,
    sessions: BTreeMap<ByteStr, Session>,
    max_message_id: u64,
    closed: bool,
}

/// A client's records. Those of a client without a session record are kept as the disk
/// store keeps them, and dropped from `load` as it drops them (see [`Op`]'s contract).
#[derive(Default)]
struct Session {
    record: Option<StoredSession>,
    subscriptions: BTreeMap<ByteStr, StoredSubscription>,
    queue: BTreeMap<u64, Delivery>,
    inflight: BTreeMap<u16, InflightEntry>,
    incoming: BTreeSet<u16>,
}

impl MemStore {
    pub fn new() -> MemStore {
        MemStore::default()
    }
}

impl State {
    fn session(&mut self, client_id: &ByteStr) -> &mut Session {
        self.sessions.entry(client_id.clone()).or_default()
    }

    fn saw(&mut self, message: &StoredMessage) {
        self.max_message_id = self.max_message_id.max(message.id);
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::SetRetained(m) => {
                self.saw(&m);
                self.retained.insert(m.topic.clone(), m);
            }
            Op::ClearRetained { topic } => {
                self.retained.remove(&topic);
            }
            Op::PutSession { client_id, session } => {
                self.session(&client_id).record = Some(session);
            }
            Op::DeleteSession { client_id } => {
                self.sessions.remove(&client_id);
            }
            Op::Subscribe {
                client_id,
                filter,
                subscription,
            } => {
                self.session(&client_id)
                    .subscriptions
                    .insert(filter, subscription);
            }
            Op::Unsubscribe { client_id, filter } => {
                self.session(&client_id).subscriptions.remove(&filter);
            }
            Op::Enqueue {
                client_id,
                seq,
                delivery,
            } => {
                self.saw(&delivery.message);
                self.session(&client_id).queue.insert(seq, delivery);
            }
            Op::Dequeue { client_id, seq } => {
                self.session(&client_id).queue.remove(&seq);
            }
            Op::PutInflight { client_id, entry } => {
                if let InflightStage::Publish(d) = &entry.stage {
                    self.saw(&d.message);
                }
                self.session(&client_id).inflight.insert(entry.pkid, entry);
            }
            Op::DeleteInflight { client_id, pkid } => {
                self.session(&client_id).inflight.remove(&pkid);
            }
            Op::PutIncoming { client_id, pkid } => {
                self.session(&client_id).incoming.insert(pkid);
            }
            Op::DeleteIncoming { client_id, pkid } => {
                self.session(&client_id).incoming.remove(&pkid);
            }
        }
    }

    fn snapshot(&self, queue_head: usize) -> Snapshot {
        let sessions = self
            .sessions
            .iter()
            .filter_map(|(client_id, s)| {
                let mut inflight: Vec<InflightEntry> = s.inflight.values().cloned().collect();
                inflight.sort_by_key(|e| e.order);
                Some(SessionSnapshot {
                    client_id: client_id.clone(),
                    session: s.record.clone()?,
                    subscriptions: s
                        .subscriptions
                        .iter()
                        .map(|(f, sub)| (f.clone(), *sub))
                        .collect(),
                    queue: entries(&s.queue, 0, queue_head),
                    queued: s.queue.len() as u64,
                    last_seq: s.queue.keys().next_back().copied().unwrap_or(0),
                    inflight,
                    incoming: s.incoming.iter().copied().collect(),
                })
            })
            .collect();
        Snapshot {
            retained: self.retained.values().map(|m| (**m).clone()).collect(),
            sessions,
            max_message_id: self.max_message_id,
            recovery: Default::default(),
        }
    }
}

fn entries(queue: &BTreeMap<u64, Delivery>, after_seq: u64, limit: usize) -> Vec<QueuedEntry> {
    queue
        .range(after_seq.saturating_add(1)..)
        .take(limit)
        .map(|(&seq, d)| QueuedEntry {
            seq,
            delivery: d.clone(),
        })
        .collect()
}

impl Store for MemStore {
    fn load(&self, queue_head: usize) -> BoxFuture<'_, Result<Snapshot, StoreError>> {
        let snapshot = self.state.lock().snapshot(queue_head);
        Box::pin(async move { Ok(snapshot) })
    }

    fn submit(&self, batch: Vec<Op>) -> Durable {
        let mut state = self.state.lock();
        if state.closed {
            return Durable::ready(Err(StoreError::Closed));
        }
        for op in batch {
            state.apply(op);
        }
        Durable::ready(Ok(()))
    }

    fn read_queue(
        &self,
        client_id: &ByteStr,
        after_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<QueuedEntry>, StoreError>> {
        let state = self.state.lock();
        let found = state
            .sessions
            .get(client_id)
            .map_or_else(Vec::new, |s| entries(&s.queue, after_seq, limit));
        Box::pin(async move { Ok(found) })
    }

    fn pending_bytes(&self) -> u64 {
        0
    }

    fn has_room(&self) -> bool {
        true
    }

    fn close(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        self.state.lock().closed = true;
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::QoS;

    fn delivery(id: u64) -> Delivery {
        Delivery {
            message: Arc::new(StoredMessage {
                id,
                topic: "t".into(),
                ..StoredMessage::default()
            }),
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: vec![],
        }
    }

    #[tokio::test]
    async fn applies_ops_in_order() {
        let store = MemStore::new();
        let c: ByteStr = "c".into();
        let orphan: ByteStr = "no-session".into();
        store
            .submit(vec![
                Op::PutSession {
                    client_id: c.clone(),
                    session: StoredSession::default(),
                },
                Op::Enqueue {
                    client_id: c.clone(),
                    seq: 1,
                    delivery: delivery(5),
                },
                Op::Enqueue {
                    client_id: c.clone(),
                    seq: 2,
                    delivery: delivery(6),
                },
                Op::Dequeue {
                    client_id: c.clone(),
                    seq: 1,
                },
                Op::Enqueue {
                    client_id: orphan.clone(),
                    seq: 1,
                    delivery: delivery(9),
                },
            ])
            .await
            .unwrap();
        let snap = store.load(10).await.unwrap();
        assert_eq!(
            snap.sessions.len(),
            1,
            "a client without a session record is not loaded"
        );
        assert_eq!(snap.max_message_id, 9);
        let s = &snap.sessions[0];
        assert_eq!((s.queued, s.last_seq), (1, 2));
        assert_eq!(s.queue[0].delivery.message.id, 6);
        let one = store.load_session(&c, 10).await.unwrap();
        assert_eq!(one.as_ref(), Some(s), "one session, as load gives it");
        assert_eq!(store.load_session(&orphan, 10).await.unwrap(), None);
        assert_eq!(store.read_queue(&c, 2, 10).await.unwrap(), vec![]);
        assert_eq!(store.read_queue(&c, 0, 10).await.unwrap().len(), 1);
        store.close().await.unwrap();
        assert!(matches!(
            store.submit(vec![]).await,
            Err(StoreError::Closed)
        ));
    }
}
