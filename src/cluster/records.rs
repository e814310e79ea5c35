//! The sessions' state as JetStream records: which subject each `store::Op` writes or
//! removes, and the bytes of each record. No I/O here.
//!
//! One subject per record, under `<prefix>.state.<client>` (`names::token` of the client
//! id), in a stream that keeps the last message per subject:
//!
//! | subject suffix | record | value |
//! |---|---|---|
//! | `S` | session | `codec::session` |
//! | `B.<filter token>` | subscription | filter (u32 LE length, bytes), `codec::subscription` |
//! | `Q.<seq>` | queue entry | delivery (u32 LE length, `codec::delivery`), message (`codec::message`) |
//! | `F.<pkid>` | in-flight | entry (u32 LE length, `codec::inflight`), message if PUBLISH stage |
//! | `I.<pkid>` | incoming QoS 2 | empty |
//!
//! Unlike the disk store, a message is stored inline with each entry that names it (no
//! shared message table, so no reference counts to keep consistent across nodes).

use super::names::{token, Names};
use crate::protocol::ByteStr;
use crate::store::codec::{self, DeliveryRef};
use crate::store::{
    InflightEntry, InflightStage, Op, QueuedEntry, SessionSnapshot, StoredMessage,
    StoredSubscription,
};
use bytes::Bytes;
use std::sync::Arc;

/// What one op does to the state stream.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Write {
    /// Sets the record of `subject`.
    Put { subject: String, value: Bytes },
    /// Removes the record of `subject`.
    Remove { subject: String },
    /// Removes every record of one client (`<prefix>.state.<client>.>`).
    RemoveAll { filter: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed state record {subject}: {why}")]
pub(super) struct RecordError {
    pub subject: String,
    pub why: &'static str,
}

/// The write of a session op (retained ops are not session records: None).
pub(super) fn write(names: &Names, op: &Op) -> Option<Write> {
    let put = |client: &ByteStr, suffix: String, value: Vec<u8>| Write::Put {
        subject: format!("{}.{suffix}", names.state_of(client)),
        value: Bytes::from(value),
    };
    let remove = |client: &ByteStr, suffix: String| Write::Remove {
        subject: format!("{}.{suffix}", names.state_of(client)),
    };
    Some(match op {
        Op::SetRetained(_) | Op::ClearRetained { .. } => return None,
        Op::PutSession { client_id, session } => {
            // Only a will's properties can fail to encode, and the codec decoded them.
            put(client_id, "S".into(), codec::session(session).ok()?)
        }
        Op::DeleteSession { client_id } => Write::RemoveAll {
            filter: format!("{}.>", names.state_of(client_id)),
        },
        Op::Subscribe {
            client_id,
            filter,
            subscription,
        } => {
            let mut v = framed(filter.as_bytes());
            v.extend(codec::subscription(subscription));
            put(client_id, format!("B.{}", token(filter)), v)
        }
        Op::Unsubscribe { client_id, filter } => remove(client_id, format!("B.{}", token(filter))),
        Op::Enqueue {
            client_id,
            seq,
            delivery,
        } => {
            let mut v = framed(&codec::delivery(delivery));
            v.extend(codec::message(&delivery.message).ok()?);
            put(client_id, format!("Q.{seq}"), v)
        }
        Op::Dequeue { client_id, seq } => remove(client_id, format!("Q.{seq}")),
        Op::PutInflight { client_id, entry } => {
            let mut v = framed(&codec::inflight(entry));
            if let InflightStage::Publish(d) = &entry.stage {
                v.extend(codec::message(&d.message).ok()?);
            }
            put(client_id, format!("F.{}", entry.pkid), v)
        }
        Op::DeleteInflight { client_id, pkid } => remove(client_id, format!("F.{pkid}")),
        Op::PutIncoming { client_id, pkid } => put(client_id, format!("I.{pkid}"), Vec::new()),
        Op::DeleteIncoming { client_id, pkid } => remove(client_id, format!("I.{pkid}")),
    })
}

fn framed(bytes: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + bytes.len());
    v.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    v.extend_from_slice(bytes);
    v
}

fn unframe(value: &[u8]) -> Option<(&[u8], &[u8])> {
    let n = u32::from_le_bytes(value.get(..4)?.try_into().ok()?) as usize;
    let rest = &value[4..];
    (rest.len() >= n).then(|| rest.split_at(n))
}

/// Builds one session from its records (`(subject, value)`, last per subject), with at
/// most `queue_head` queued entries loaded. None without a session record.
pub(super) fn session(
    names: &Names,
    client_id: &ByteStr,
    records: &[(String, Bytes)],
    queue_head: usize,
) -> Result<Option<SessionSnapshot>, RecordError> {
    let base = names.state_of(client_id);
    let mut snapshot = SessionSnapshot {
        client_id: client_id.clone(),
        ..SessionSnapshot::default()
    };
    let mut found = false;
    let mut queue = Vec::new();
    for (subject, value) in records {
        let bad = |why| RecordError {
            subject: subject.clone(),
            why,
        };
        let Some(suffix) = subject
            .strip_prefix(base.as_str())
            .and_then(|s| s.strip_prefix('.'))
        else {
            continue;
        };
        let (kind, rest) = suffix.split_once('.').unwrap_or((suffix, ""));
        match kind {
            "S" => {
                snapshot.session = codec::decode_session(value).map_err(|_| bad("session"))?;
                found = true;
            }
            "B" => {
                let (filter, sub) = unframe(value).ok_or_else(|| bad("subscription"))?;
                let filter = std::str::from_utf8(filter).map_err(|_| bad("filter"))?;
                let sub: StoredSubscription =
                    codec::decode_subscription(sub).map_err(|_| bad("subscription"))?;
                snapshot.subscriptions.push((ByteStr::from(filter), sub));
            }
            "Q" => {
                let seq: u64 = rest.parse().map_err(|_| bad("queue seq"))?;
                queue.push((seq, delivery(value).ok_or_else(|| bad("queue entry"))?));
            }
            "F" => {
                let pkid: u16 = rest.parse().map_err(|_| bad("packet id"))?;
                let (entry, message) = unframe(value).ok_or_else(|| bad("in-flight"))?;
                let (order, d) = codec::decode_inflight(entry).map_err(|_| bad("in-flight"))?;
                let stage = match d {
                    None => InflightStage::PubRel,
                    Some(d) => {
                        InflightStage::Publish(resolve(d, message).ok_or_else(|| bad("message"))?)
                    }
                };
                snapshot.inflight.push(InflightEntry { pkid, order, stage });
            }
            "I" => snapshot
                .incoming
                .push(rest.parse().map_err(|_| bad("packet id"))?),
            _ => return Err(bad("unknown record kind")),
        }
    }
    if !found {
        return Ok(None);
    }
    queue.sort_unstable_by_key(|(seq, _)| *seq);
    snapshot.queued = queue.len() as u64;
    snapshot.last_seq = queue.last().map_or(0, |(seq, _)| *seq);
    snapshot.queue = queue
        .into_iter()
        .take(queue_head)
        .map(|(seq, delivery)| QueuedEntry { seq, delivery })
        .collect();
    snapshot.subscriptions.sort_by(|a, b| a.0.cmp(&b.0));
    snapshot.inflight.sort_unstable_by_key(|e| e.order);
    snapshot.incoming.sort_unstable();
    Ok(Some(snapshot))
}

/// The queued entries of one client's records, in order, above `after_seq`.
pub(super) fn queue(
    names: &Names,
    client_id: &ByteStr,
    records: &[(String, Bytes)],
    after_seq: u64,
    limit: usize,
) -> Vec<QueuedEntry> {
    let base = format!("{}.Q.", names.state_of(client_id));
    let mut entries: Vec<QueuedEntry> = records
        .iter()
        .filter_map(|(subject, value)| {
            let seq: u64 = subject.strip_prefix(base.as_str())?.parse().ok()?;
            (seq > after_seq).then_some(())?;
            Some(QueuedEntry {
                seq,
                delivery: delivery(value)?,
            })
        })
        .collect();
    entries.sort_unstable_by_key(|e| e.seq);
    entries.truncate(limit);
    entries
}

fn delivery(value: &[u8]) -> Option<crate::store::Delivery> {
    let (d, message) = unframe(value)?;
    resolve(codec::decode_delivery(d).ok()?, message)
}

fn resolve(d: DeliveryRef, message: &[u8]) -> Option<crate::store::Delivery> {
    let message: StoredMessage = codec::decode_message(message).ok()?;
    Some(d.resolve(Arc::new(message)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{QoS, SubOptions};
    use crate::store::{Delivery, StoredSession};

    fn delivery(id: u64, topic: &str) -> Delivery {
        Delivery {
            message: Arc::new(StoredMessage {
                id,
                topic: topic.into(),
                payload: Bytes::from_static(b"p"),
                qos: QoS::AtLeastOnce,
                ..StoredMessage::default()
            }),
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: vec![7],
        }
    }

    /// Applies writes the way the stream keeps them: last value per subject.
    fn apply(records: &mut Vec<(String, Bytes)>, w: Write) {
        match w {
            Write::Put { subject, value } => {
                records.retain(|(s, _)| *s != subject);
                records.push((subject, value));
            }
            Write::Remove { subject } => records.retain(|(s, _)| *s != subject),
            Write::RemoveAll { filter } => {
                let prefix = filter.trim_end_matches('>');
                records.retain(|(s, _)| !s.starts_with(prefix));
            }
        }
    }

    #[test]
    #[allow(clippy::too_many_lines)] // one op of each kind, then every field checked
    fn a_session_round_trips_through_its_records() {
        let names = Names::new("c");
        let c: ByteStr = "client.with *dots*".into();
        let other: ByteStr = "client".into();
        let ops = vec![
            Op::PutSession {
                client_id: c.clone(),
                session: StoredSession {
                    expiry_interval: 60,
                    offline_since: Some(5),
                    will: None,
                },
            },
            Op::Subscribe {
                client_id: c.clone(),
                filter: "a/+/#".into(),
                subscription: StoredSubscription {
                    options: SubOptions {
                        qos: QoS::ExactlyOnce,
                        ..SubOptions::default()
                    },
                    identifier: Some(3),
                },
            },
            Op::Enqueue {
                client_id: c.clone(),
                seq: 2,
                delivery: delivery(1, "a/b"),
            },
            Op::Enqueue {
                client_id: c.clone(),
                seq: 10,
                delivery: delivery(2, "a/c"),
            },
            Op::Enqueue {
                client_id: c.clone(),
                seq: 11,
                delivery: delivery(3, "a/d"),
            },
            Op::Dequeue {
                client_id: c.clone(),
                seq: 2,
            },
            Op::PutInflight {
                client_id: c.clone(),
                entry: InflightEntry {
                    pkid: 4,
                    order: 1,
                    stage: InflightStage::Publish(delivery(4, "a/e")),
                },
            },
            Op::PutInflight {
                client_id: c.clone(),
                entry: InflightEntry {
                    pkid: 5,
                    order: 2,
                    stage: InflightStage::PubRel,
                },
            },
            Op::PutIncoming {
                client_id: c.clone(),
                pkid: 9,
            },
            // A client whose name is a prefix of the other's: kept apart.
            Op::PutSession {
                client_id: other.clone(),
                session: StoredSession::default(),
            },
        ];
        let mut records = Vec::new();
        for op in &ops {
            apply(&mut records, write(&names, op).unwrap());
        }
        let s = session(&names, &c, &records, 1).unwrap().unwrap();
        assert_eq!(s.session.expiry_interval, 60);
        assert_eq!(s.subscriptions.len(), 1);
        assert_eq!(&*s.subscriptions[0].0, "a/+/#");
        assert_eq!(s.subscriptions[0].1.identifier, Some(3));
        assert_eq!((s.queued, s.last_seq), (2, 11));
        assert_eq!(s.queue.len(), 1, "queue head");
        assert_eq!(&*s.queue[0].delivery.message.topic, "a/c");
        assert_eq!(s.queue[0].delivery.subscription_ids, vec![7]);
        assert_eq!(s.inflight.len(), 2);
        assert!(
            matches!(&s.inflight[0].stage, InflightStage::Publish(d) if &*d.message.topic == "a/e")
        );
        assert_eq!(s.inflight[1].stage, InflightStage::PubRel);
        assert_eq!(s.incoming, vec![9]);
        let q = queue(&names, &c, &records, 10, 5);
        assert_eq!(q.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![11]);

        apply(
            &mut records,
            write(
                &names,
                &Op::DeleteSession {
                    client_id: c.clone(),
                },
            )
            .unwrap(),
        );
        assert_eq!(session(&names, &c, &records, 10).unwrap(), None);
        assert!(session(&names, &other, &records, 10).unwrap().is_some());
    }

    #[test]
    fn damaged_records_are_errors() {
        let names = Names::new("c");
        let c: ByteStr = "c".into();
        let s = format!("{}.S", names.state_of(&c));
        let q = format!("{}.Q.1", names.state_of(&c));
        let records = vec![
            (s, Bytes::from_static(&[0, 0])),
            (q, Bytes::from_static(&[9, 9, 9])),
        ];
        assert!(session(&names, &c, &records, 10).is_err());
    }
}
