//! Turns a group of submitted ops into the key changes to write: one change per key, messages
//! stored once and deleted with their last reference, and nothing at all for what was
//! created and removed again before it reached the disk (a message queued and sent, then
//! acknowledged, within one group commit). No I/O: stored records are read through [`Lookup`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::codec::{self, RecordError};
use super::{InflightStage, Op, StoreError, StoredMessage};

/// Read access to what is stored (the state before this batch).
pub(super) trait Lookup {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every key starting with `prefix`, in order.
    fn keys(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError>;
}

/// How many stored queue and in-flight entries reference each message, as stored. Rebuilt
/// at start-up; a message is written with its first reference and deleted with its last.
#[derive(Debug, Default)]
pub(super) struct Refs {
    counts: HashMap<u64, u32>,
    /// The highest message id ever stored (kept under the `N` key so ids never repeat).
    pub high_water: u64,
}

impl Refs {
    pub(super) fn add(&mut self, id: u64) {
        *self.counts.entry(id).or_default() += 1;
    }

    pub(super) fn count(&self, id: u64) -> u32 {
        self.counts.get(&id).copied().unwrap_or(0)
    }

    /// Messages stored.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.counts.len()
    }

    pub(super) fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.counts.keys().copied()
    }

    /// Drops the counts of messages that are gone.
    pub(super) fn forget(&mut self, ids: &std::collections::HashSet<u64>) {
        self.counts.retain(|id, _| !ids.contains(id));
    }
}

/// The key of the message-id high-water mark.
pub(super) const HIGH_WATER_KEY: &[u8] = b"N";

/// A key's state at the end of the batch.
struct Entry {
    /// `None`: delete.
    value: Option<Vec<u8>>,
    /// The key was not stored before this batch: removing it again needs no write.
    fresh: bool,
}

/// One key change: put `Some(value)` or delete.
pub(super) type Change = (Vec<u8>, Option<Vec<u8>>);

pub(super) struct Builder<'a, L: Lookup> {
    stored: &'a L,
    refs: &'a mut Refs,
    entries: BTreeMap<Vec<u8>, Entry>,
    /// Messages whose count changed: the count before the batch, and the message if it may
    /// have to be written.
    touched: HashMap<u64, (u32, Option<Arc<StoredMessage>>)>,
    /// Records that could not be encoded (properties the codec refuses): skipped.
    pub unencodable: u64,
}

impl<'a, L: Lookup> Builder<'a, L> {
    pub(super) fn new(stored: &'a L, refs: &'a mut Refs) -> Self {
        Builder {
            stored,
            refs,
            entries: BTreeMap::new(),
            touched: HashMap::new(),
            unencodable: 0,
        }
    }

    pub(super) fn apply(&mut self, op: Op) -> Result<(), StoreError> {
        match op {
            Op::SetRetained(m) => {
                let key = codec::retained_key(&m.topic);
                match codec::message(&m) {
                    Ok(body) => self.put(key, &body, false),
                    Err(_) => self.unencodable += 1,
                }
            }
            Op::ClearRetained { topic } => self.remove(codec::retained_key(&topic))?,
            Op::PutSession { client_id, session } => match codec::session(&session) {
                Ok(body) => self.put(codec::session_key(&client_id), &body, false),
                Err(_) => self.unencodable += 1,
            },
            Op::DeleteSession { client_id } => {
                for tag in codec::CLIENT_TABLES {
                    let prefix = codec::client_prefix(tag, &client_id);
                    let mut keys = self.stored.keys(&prefix)?;
                    keys.extend(
                        self.entries
                            .range(prefix.clone()..)
                            .take_while(|(k, _)| k.starts_with(&prefix))
                            .map(|(k, _)| k.clone()),
                    );
                    keys.sort_unstable();
                    keys.dedup();
                    for key in keys {
                        self.remove(key)?;
                    }
                }
            }
            Op::Subscribe {
                client_id,
                filter,
                subscription,
            } => self.put(
                codec::subscription_key(&client_id, &filter),
                &codec::subscription(&subscription),
                false,
            ),
            Op::Unsubscribe { client_id, filter } => {
                self.remove(codec::subscription_key(&client_id, &filter))?
            }
            Op::Enqueue {
                client_id,
                seq,
                delivery,
            } => {
                self.reference(&delivery.message);
                // Sequence numbers only grow (Op's contract): the key is new.
                self.put(
                    codec::queue_key(&client_id, seq),
                    &codec::delivery(&delivery),
                    true,
                );
            }
            Op::Dequeue { client_id, seq } => self.remove(codec::queue_key(&client_id, seq))?,
            Op::PutInflight { client_id, entry } => {
                let key = codec::inflight_key(&client_id, entry.pkid);
                let fresh = match self.entries.get(&key) {
                    Some(e) => e.fresh,
                    None => self.stored.get(&key)?.is_none(),
                };
                // The entry replaced (PUBREC turns a PUBLISH into a PUBREL) lets go of its message.
                self.remove(key.clone())?;
                if let InflightStage::Publish(d) = &entry.stage {
                    self.reference(&d.message);
                }
                self.put(key, &codec::inflight(&entry), fresh);
            }
            Op::DeleteInflight { client_id, pkid } => {
                self.remove(codec::inflight_key(&client_id, pkid))?
            }
            Op::PutIncoming { client_id, pkid } => {
                self.put(codec::incoming_key(&client_id, pkid), &[], false)
            }
            Op::DeleteIncoming { client_id, pkid } => {
                self.remove(codec::incoming_key(&client_id, pkid))?
            }
        }
        Ok(())
    }

    fn put(&mut self, key: Vec<u8>, body: &[u8], fresh: bool) {
        let value = Some(codec::seal(&key, body));
        match self.entries.get_mut(&key) {
            Some(e) => e.value = value,
            None => {
                self.entries.insert(key, Entry { value, fresh });
            }
        }
    }

    /// Deletes `key`, letting go of the message its current value references.
    fn remove(&mut self, key: Vec<u8>) -> Result<(), StoreError> {
        let old = match self.entries.get_mut(&key) {
            Some(e) if e.fresh => self.entries.remove(&key).and_then(|e| e.value),
            Some(e) => e.value.take(),
            None => {
                let old = self.stored.get(&key)?;
                if old.is_some() {
                    self.entries.insert(
                        key.clone(),
                        Entry {
                            value: None,
                            fresh: false,
                        },
                    );
                }
                old
            }
        };
        if let Some(id) = old.and_then(|v| referenced_message(&key, &v).ok().flatten()) {
            let count = self.refs.count(id);
            self.touched.entry(id).or_insert((count, None));
            match self.refs.counts.get_mut(&id) {
                Some(c) if *c > 1 => *c -= 1,
                Some(_) => {
                    self.refs.counts.remove(&id);
                }
                None => {}
            }
        }
        Ok(())
    }

    fn reference(&mut self, message: &Arc<StoredMessage>) {
        let id = message.id;
        let count = self.refs.count(id);
        let touched = self.touched.entry(id).or_insert((count, None));
        touched.1.get_or_insert_with(|| message.clone());
        self.refs.add(id);
    }

    /// The changes to write, in key order.
    pub(super) fn finish(self) -> Vec<Change> {
        let Builder {
            refs,
            mut entries,
            touched,
            mut unencodable,
            ..
        } = self;
        let mut high_water = refs.high_water;
        for (id, (before, message)) in touched {
            let after = refs.count(id);
            let key = codec::message_key(id);
            if before == 0 && after > 0 {
                // The first reference came with the message (`reference`).
                let body = message.as_deref().map(codec::message);
                match body {
                    Some(Ok(body)) => {
                        let value = Some(codec::seal(&key, &body));
                        entries.insert(key, Entry { value, fresh: true });
                    }
                    _ => unencodable += 1,
                }
                high_water = high_water.max(id);
            } else if before > 0 && after == 0 {
                entries.insert(
                    key,
                    Entry {
                        value: None,
                        fresh: false,
                    },
                );
            }
        }
        if high_water > refs.high_water {
            refs.high_water = high_water;
            let key = HIGH_WATER_KEY.to_vec();
            let value = Some(codec::seal(&key, &high_water.to_le_bytes()));
            entries.insert(
                key,
                Entry {
                    value,
                    fresh: false,
                },
            );
        }
        if unencodable > 0 {
            tracing::error!(
                unencodable,
                "store: records that could not be encoded were not stored"
            );
        }
        entries.into_iter().map(|(k, e)| (k, e.value)).collect()
    }
}

/// The message a queue or in-flight record references, if it is one that does.
pub(super) fn referenced_message(key: &[u8], value: &[u8]) -> Result<Option<u64>, RecordError> {
    match key.first() {
        Some(&codec::QUEUE) => {
            let body = codec::unseal(key, value)?;
            Ok(Some(codec::decode_delivery(body)?.message_id))
        }
        Some(&codec::INFLIGHT) => {
            let body = codec::unseal(key, value)?;
            Ok(codec::decode_inflight(body)?.1.map(|d| d.message_id))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ByteStr, QoS};
    use crate::store::{Delivery, InflightEntry, StoredSession};
    use std::cell::RefCell;

    /// A stored state in a map, counting the reads the builder makes.
    #[derive(Default)]
    struct Map {
        data: BTreeMap<Vec<u8>, Vec<u8>>,
        reads: RefCell<u32>,
    }

    impl Lookup for Map {
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            *self.reads.borrow_mut() += 1;
            Ok(self.data.get(key).cloned())
        }
        fn keys(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
            Ok(self
                .data
                .range(prefix.to_vec()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, _)| k.clone())
                .collect())
        }
    }

    impl Map {
        fn write(&mut self, changes: Vec<Change>) {
            for (k, v) in changes {
                match v {
                    Some(v) => self.data.insert(k, v),
                    None => self.data.remove(&k),
                };
            }
        }

        fn run(&mut self, refs: &mut Refs, ops: Vec<Op>) -> Vec<Change> {
            let mut b = Builder::new(&*self, refs);
            for op in ops {
                b.apply(op).unwrap();
            }
            let changes = b.finish();
            self.write(changes.clone());
            changes
        }

        fn tags(&self) -> Vec<u8> {
            self.data.keys().map(|k| k[0]).collect()
        }
    }

    fn message(id: u64) -> Arc<StoredMessage> {
        Arc::new(StoredMessage {
            id,
            topic: "t".into(),
            payload: bytes::Bytes::from_static(b"payload"),
            qos: QoS::AtLeastOnce,
            ..StoredMessage::default()
        })
    }

    fn enqueue(client: &str, seq: u64, m: &Arc<StoredMessage>) -> Op {
        Op::Enqueue {
            client_id: client.into(),
            seq,
            delivery: Delivery {
                message: m.clone(),
                qos: QoS::AtLeastOnce,
                retain: false,
                subscription_ids: vec![],
            },
        }
    }

    fn dequeue(client: &str, seq: u64) -> Op {
        Op::Dequeue {
            client_id: client.into(),
            seq,
        }
    }

    fn session(client: &str) -> Op {
        Op::PutSession {
            client_id: ByteStr::from(client),
            session: StoredSession::default(),
        }
    }

    #[test]
    fn a_message_is_stored_once_and_deleted_with_its_last_reference() {
        let (mut map, mut refs) = (Map::default(), Refs::default());
        let m = message(7);
        map.run(
            &mut refs,
            vec![
                session("a"),
                session("b"),
                enqueue("a", 1, &m),
                enqueue("b", 1, &m),
            ],
        );
        let messages = map.data.keys().filter(|k| k[0] == codec::MESSAGE).count();
        assert_eq!(messages, 1);
        assert_eq!(refs.count(7), 2);
        assert_eq!(refs.high_water, 7);

        map.run(&mut refs, vec![dequeue("a", 1)]);
        assert!(map.data.contains_key(&codec::message_key(7)));
        map.run(&mut refs, vec![dequeue("b", 1)]);
        assert!(!map.data.contains_key(&codec::message_key(7)));
        assert_eq!(refs.len(), 0);
        // The high-water mark stays.
        assert!(map.data.contains_key(HIGH_WATER_KEY));
    }

    #[test]
    fn what_is_created_and_removed_in_one_batch_is_not_written() {
        let (mut map, mut refs) = (Map::default(), Refs::default());
        map.run(&mut refs, vec![session("a")]);
        let m = message(1);
        let inflight = |stage| Op::PutInflight {
            client_id: "a".into(),
            entry: InflightEntry {
                pkid: 3,
                order: 1,
                stage,
            },
        };
        let d = Delivery {
            message: m.clone(),
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: vec![],
        };
        // Queued, moved in flight, acknowledged: nothing is written (not even the id's
        // high-water mark: an id that never reached the disk may be used again).
        let changes = map.run(
            &mut refs,
            vec![
                enqueue("a", 1, &m),
                dequeue("a", 1),
                inflight(InflightStage::Publish(d)),
                Op::DeleteInflight {
                    client_id: "a".into(),
                    pkid: 3,
                },
            ],
        );
        assert!(changes.is_empty(), "{changes:?}");
        assert_eq!(refs.len(), 0);

        // Dequeuing what is not stored writes nothing either.
        assert!(map.run(&mut refs, vec![dequeue("a", 99)]).is_empty());
    }

    #[test]
    fn pubrec_lets_go_of_the_message() {
        let (mut map, mut refs) = (Map::default(), Refs::default());
        let m = message(4);
        let d = Delivery {
            message: m.clone(),
            qos: QoS::ExactlyOnce,
            retain: false,
            subscription_ids: vec![],
        };
        let put = |stage| Op::PutInflight {
            client_id: "a".into(),
            entry: InflightEntry {
                pkid: 1,
                order: 1,
                stage,
            },
        };
        map.run(
            &mut refs,
            vec![session("a"), put(InflightStage::Publish(d))],
        );
        assert!(map.data.contains_key(&codec::message_key(4)));
        map.run(&mut refs, vec![put(InflightStage::PubRel)]);
        assert!(!map.data.contains_key(&codec::message_key(4)));
        assert!(map.data.contains_key(&codec::inflight_key("a", 1)));
    }

    #[test]
    fn delete_session_removes_every_record_and_reference() {
        let (mut map, mut refs) = (Map::default(), Refs::default());
        let (m1, m2) = (message(1), message(2));
        map.run(
            &mut refs,
            vec![
                session("a"),
                session("ab"),
                enqueue("a", 1, &m1),
                enqueue("ab", 1, &m1),
                Op::PutIncoming {
                    client_id: "a".into(),
                    pkid: 9,
                },
            ],
        );
        // Stored and pending records of "a" go; "ab" (whose id starts with "a") stays.
        map.run(
            &mut refs,
            vec![
                enqueue("a", 2, &m2),
                Op::DeleteSession {
                    client_id: "a".into(),
                },
            ],
        );
        assert_eq!(refs.count(1), 1);
        assert_eq!(refs.count(2), 0);
        let mut tags = map.tags();
        tags.sort_unstable();
        assert_eq!(tags, vec![b'M', b'N', b'Q', b'S']);
        assert!(map.data.contains_key(&codec::queue_key("ab", 1)));
    }
}
