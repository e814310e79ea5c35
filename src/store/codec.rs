//! The on-disk form of every record: keys that sort the way the store reads them, and values
//! that carry a format version and a checksum, so that a damaged record is detected and
//! skipped rather than trusted. No I/O here.
//!
//! Key: one tag byte naming the table, then the record's name within it. Client ids are
//! length-prefixed, so one client's keys are a prefix range that no other client shares.
//!
//! | tag | table | rest of the key | value |
//! |-----|-------|-----------------|-------|
//! | `V` | format version | — | version byte |
//! | `R` | retained | topic | message |
//! | `M` | messages | id (u64 BE) | message |
//! | `S` | sessions | client | session |
//! | `B` | subscriptions | client, filter | subscription |
//! | `Q` | queues | client, seq (u64 BE) | delivery |
//! | `F` | in-flight | client, pkid (u16 BE) | in-flight entry |
//! | `I` | incoming QoS 2 | client, pkid (u16 BE) | (empty) |
//!
//! Value: `[version: u8][crc32 of key and body: u32 LE][body]`. Integers in bodies are
//! little-endian; strings and byte strings are length-prefixed.

use bytes::{Bytes, BytesMut};

use super::{
    Delivery, InflightEntry, InflightStage, StoredMessage, StoredSession, StoredSubscription,
    StoredWill,
};
use crate::protocol::{ByteStr, Properties, QoS, SubOptions};

/// The record format this code writes and reads.
pub(crate) const FORMAT_VERSION: u8 = 1;

pub(super) const VERSION: u8 = b'V';
pub(super) const RETAINED: u8 = b'R';
pub(super) const MESSAGE: u8 = b'M';
pub(super) const SESSION: u8 = b'S';
pub(super) const SUBSCRIPTION: u8 = b'B';
pub(super) const QUEUE: u8 = b'Q';
pub(super) const INFLIGHT: u8 = b'F';
pub(super) const INCOMING: u8 = b'I';

/// The tables holding one client's records, each a prefix range of the client's keys.
pub(super) const CLIENT_TABLES: [u8; 5] = [SESSION, SUBSCRIPTION, QUEUE, INFLIGHT, INCOMING];

const HEADER: usize = 5;

/// Why a record could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecordError {
    Checksum,
    Version(u8),
    Malformed(&'static str),
}

// ---- keys ----

/// `tag`, then the client id with its length: the prefix of every key of that client.
pub(super) fn client_prefix(tag: u8, client_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + client_id.len() + 8);
    k.push(tag);
    // MQTT strings are at most 65,535 bytes: the client id always fits.
    k.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    k.extend_from_slice(client_id.as_bytes());
    k
}

pub(super) fn session_key(client_id: &str) -> Vec<u8> {
    client_prefix(SESSION, client_id)
}

pub(super) fn subscription_key(client_id: &str, filter: &str) -> Vec<u8> {
    let mut k = client_prefix(SUBSCRIPTION, client_id);
    k.extend_from_slice(filter.as_bytes());
    k
}

pub(super) fn queue_key(client_id: &str, seq: u64) -> Vec<u8> {
    let mut k = client_prefix(QUEUE, client_id);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub(super) fn inflight_key(client_id: &str, pkid: u16) -> Vec<u8> {
    let mut k = client_prefix(INFLIGHT, client_id);
    k.extend_from_slice(&pkid.to_be_bytes());
    k
}

pub(super) fn incoming_key(client_id: &str, pkid: u16) -> Vec<u8> {
    let mut k = client_prefix(INCOMING, client_id);
    k.extend_from_slice(&pkid.to_be_bytes());
    k
}

pub(super) fn message_key(id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(MESSAGE);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

pub(super) fn retained_key(topic: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + topic.len());
    k.push(RETAINED);
    k.extend_from_slice(topic.as_bytes());
    k
}

/// Splits a client table's key into the client id and what follows it.
pub(super) fn split_client_key(key: &[u8]) -> Result<(ByteStr, &[u8]), RecordError> {
    let bad = RecordError::Malformed("client key");
    let len = u16::from_be_bytes([*key.get(1).ok_or(bad)?, *key.get(2).ok_or(bad)?]) as usize;
    let id = key.get(3..3 + len).ok_or(bad)?;
    let id = ByteStr::try_from(Bytes::copy_from_slice(id)).map_err(|_| bad)?;
    Ok((id, &key[3 + len..]))
}

pub(super) fn key_u64(rest: &[u8]) -> Result<u64, RecordError> {
    rest.try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| RecordError::Malformed("key: u64"))
}

pub(super) fn key_u16(rest: &[u8]) -> Result<u16, RecordError> {
    rest.try_into()
        .map(u16::from_be_bytes)
        .map_err(|_| RecordError::Malformed("key: u16"))
}

pub(super) fn key_str(rest: &[u8]) -> Result<ByteStr, RecordError> {
    ByteStr::try_from(Bytes::copy_from_slice(rest))
        .map_err(|_| RecordError::Malformed("key: utf-8"))
}

// ---- the record envelope ----

fn checksum(key: &[u8], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(key);
    h.update(body);
    h.finalize()
}

/// Wraps `body` in the record header for `key`.
pub(super) fn seal(key: &[u8], body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER + body.len());
    v.push(FORMAT_VERSION);
    v.extend_from_slice(&checksum(key, body).to_le_bytes());
    v.extend_from_slice(body);
    v
}

/// The body of a record, once its version and checksum are right.
pub(super) fn unseal<'a>(key: &[u8], value: &'a [u8]) -> Result<&'a [u8], RecordError> {
    if value.len() < HEADER {
        return Err(RecordError::Checksum);
    }
    let body = &value[HEADER..];
    let crc = u32::from_le_bytes([value[1], value[2], value[3], value[4]]);
    if crc != checksum(key, body) {
        return Err(RecordError::Checksum);
    }
    // Checked after the checksum: a wrong version byte in a damaged record is damage.
    if value[0] != FORMAT_VERSION {
        return Err(RecordError::Version(value[0]));
    }
    Ok(body)
}

// ---- bodies ----

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
        self
    }
    fn opt_u64(&mut self, v: Option<u64>) -> &mut Self {
        match v {
            Some(v) => self.u8(1).u64(v),
            None => self.u8(0),
        }
    }
}

struct Reader<'a>(&'a [u8]);

const SHORT: RecordError = RecordError::Malformed("record shorter than its content");

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if self.0.len() < n {
            return Err(SHORT);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, RecordError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().map_err(|_| SHORT)?,
        ))
    }
    fn u32(&mut self) -> Result<u32, RecordError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().map_err(|_| SHORT)?,
        ))
    }
    fn u64(&mut self) -> Result<u64, RecordError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().map_err(|_| SHORT)?,
        ))
    }
    fn bytes(&mut self) -> Result<&'a [u8], RecordError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<ByteStr, RecordError> {
        ByteStr::try_from(Bytes::copy_from_slice(self.bytes()?))
            .map_err(|_| RecordError::Malformed("string: utf-8"))
    }
    fn flag(&mut self) -> Result<bool, RecordError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(RecordError::Malformed("flag")),
        }
    }
    fn opt_u64(&mut self) -> Result<Option<u64>, RecordError> {
        Ok(if self.flag()? {
            Some(self.u64()?)
        } else {
            None
        })
    }
    fn qos(&mut self) -> Result<QoS, RecordError> {
        QoS::from_u8(self.u8()?).ok_or(RecordError::Malformed("qos"))
    }
    fn end(&self) -> Result<(), RecordError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(RecordError::Malformed("bytes after the record's content"))
        }
    }
}

/// A record's body, read to its end.
fn read_all<T>(
    body: &[u8],
    f: impl FnOnce(&mut Reader) -> Result<T, RecordError>,
) -> Result<T, RecordError> {
    let mut r = Reader(body);
    let v = f(&mut r)?;
    r.end()?;
    Ok(v)
}

fn write_message(w: &mut Writer, m: &StoredMessage) -> Result<(), RecordError> {
    let mut props = BytesMut::new();
    m.properties
        .encode_stored(&mut props)
        .map_err(|_| RecordError::Malformed("properties"))?;
    w.u64(m.id)
        .u8(m.qos as u8)
        .u8(u8::from(m.retain))
        .opt_u64(m.expires_at)
        .bytes(m.topic.as_bytes())
        .bytes(&m.payload)
        .bytes(&props);
    Ok(())
}

fn read_message(r: &mut Reader) -> Result<StoredMessage, RecordError> {
    let id = r.u64()?;
    let qos = r.qos()?;
    let retain = r.flag()?;
    let expires_at = r.opt_u64()?;
    let topic = r.string()?;
    let payload = Bytes::copy_from_slice(r.bytes()?);
    let properties = Properties::decode_stored(Bytes::copy_from_slice(r.bytes()?))
        .map_err(|_| RecordError::Malformed("properties"))?;
    Ok(StoredMessage {
        id,
        topic,
        payload,
        qos,
        retain,
        properties,
        expires_at,
    })
}

/// A message body (the `R` and `M` tables). Fails only for properties the codec cannot
/// encode, which the decoder never produces.
pub(crate) fn message(m: &StoredMessage) -> Result<Vec<u8>, RecordError> {
    let mut w = Writer(Vec::with_capacity(32 + m.topic.len() + m.payload.len()));
    write_message(&mut w, m)?;
    Ok(w.0)
}

pub(crate) fn decode_message(body: &[u8]) -> Result<StoredMessage, RecordError> {
    read_all(body, read_message)
}

/// A delivery as a queue or in-flight entry stores it: the message by id.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DeliveryRef {
    pub message_id: u64,
    pub qos: QoS,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
}

impl DeliveryRef {
    pub(crate) fn resolve(self, message: std::sync::Arc<StoredMessage>) -> Delivery {
        Delivery {
            message,
            qos: self.qos,
            retain: self.retain,
            subscription_ids: self.subscription_ids,
        }
    }
}

fn write_delivery(w: &mut Writer, d: &Delivery) {
    w.u64(d.message.id)
        .u8(d.qos as u8)
        .u8(u8::from(d.retain))
        .u16(d.subscription_ids.len().min(u16::MAX as usize) as u16);
    for &id in d.subscription_ids.iter().take(u16::MAX as usize) {
        w.u32(id);
    }
}

fn read_delivery(r: &mut Reader) -> Result<DeliveryRef, RecordError> {
    let message_id = r.u64()?;
    let qos = r.qos()?;
    let retain = r.flag()?;
    let n = r.u16()?;
    let subscription_ids = (0..n).map(|_| r.u32()).collect::<Result<_, _>>()?;
    Ok(DeliveryRef {
        message_id,
        qos,
        retain,
        subscription_ids,
    })
}

pub(crate) fn delivery(d: &Delivery) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(16 + 4 * d.subscription_ids.len()));
    write_delivery(&mut w, d);
    w.0
}

pub(crate) fn decode_delivery(body: &[u8]) -> Result<DeliveryRef, RecordError> {
    read_all(body, read_delivery)
}

const STAGE_PUBLISH: u8 = 0;
const STAGE_PUBREL: u8 = 1;

pub(crate) fn inflight(e: &InflightEntry) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(32));
    w.u64(e.order);
    match &e.stage {
        InflightStage::Publish(d) => {
            w.u8(STAGE_PUBLISH);
            write_delivery(&mut w, d);
        }
        InflightStage::PubRel => {
            w.u8(STAGE_PUBREL);
        }
    }
    w.0
}

/// An in-flight entry: its order and, while the PUBLISH is unacknowledged, its delivery.
pub(crate) fn decode_inflight(body: &[u8]) -> Result<(u64, Option<DeliveryRef>), RecordError> {
    read_all(body, |r| {
        let order = r.u64()?;
        let stage = match r.u8()? {
            STAGE_PUBLISH => Some(read_delivery(r)?),
            STAGE_PUBREL => None,
            _ => return Err(RecordError::Malformed("in-flight stage")),
        };
        Ok((order, stage))
    })
}

pub(crate) fn session(s: &StoredSession) -> Result<Vec<u8>, RecordError> {
    let mut w = Writer(Vec::with_capacity(16));
    w.u32(s.expiry_interval).opt_u64(s.offline_since);
    match &s.will {
        Some(will) => {
            w.u8(1).u64(will.publish_at);
            write_message(&mut w, &will.message)?;
        }
        None => {
            w.u8(0);
        }
    }
    Ok(w.0)
}

pub(crate) fn decode_session(body: &[u8]) -> Result<StoredSession, RecordError> {
    read_all(body, |r| {
        let expiry_interval = r.u32()?;
        let offline_since = r.opt_u64()?;
        let will = if r.flag()? {
            let publish_at = r.u64()?;
            Some(StoredWill {
                message: std::sync::Arc::new(read_message(r)?),
                publish_at,
            })
        } else {
            None
        };
        Ok(StoredSession {
            expiry_interval,
            offline_since,
            will,
        })
    })
}

pub(crate) fn subscription(s: &StoredSubscription) -> Vec<u8> {
    let o = s.options;
    let options = o.qos as u8
        | u8::from(o.no_local) << 2
        | u8::from(o.retain_as_published) << 3
        | (o.retain_handling & 0b11) << 4;
    let mut w = Writer(Vec::with_capacity(6));
    w.u8(options);
    match s.identifier {
        Some(id) => w.u8(1).u32(id),
        None => w.u8(0),
    };
    w.0
}

pub(crate) fn decode_subscription(body: &[u8]) -> Result<StoredSubscription, RecordError> {
    read_all(body, |r| {
        let o = r.u8()?;
        let options = SubOptions {
            qos: QoS::from_u8(o & 0b11).ok_or(RecordError::Malformed("qos"))?,
            no_local: o & 0b100 != 0,
            retain_as_published: o & 0b1000 != 0,
            retain_handling: (o >> 4) & 0b11,
        };
        let identifier = if r.flag()? { Some(r.u32()?) } else { None };
        Ok(StoredSubscription {
            options,
            identifier,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn sample_message() -> StoredMessage {
        StoredMessage {
            id: 42,
            topic: "a/b".into(),
            payload: Bytes::from_static(b"\x00hello\xff"),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties: Properties {
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(60),
                content_type: Some("text/plain".into()),
                response_topic: Some("r".into()),
                correlation_data: Some(Bytes::from_static(b"\x01\x02")),
                will_delay_interval: Some(5),
                user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
                ..Properties::default()
            },
            expires_at: Some(1_700_000_000_123),
        }
    }

    #[test]
    fn every_record_round_trips() {
        let m = sample_message();
        assert_eq!(decode_message(&message(&m).unwrap()).unwrap(), m);

        let d = Delivery {
            message: Arc::new(m.clone()),
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: vec![1, 268_435_455],
        };
        let r = decode_delivery(&delivery(&d)).unwrap();
        assert_eq!(r.message_id, 42);
        assert_eq!(r.clone().resolve(d.message.clone()), d);

        let e = InflightEntry {
            pkid: 7,
            order: 9,
            stage: InflightStage::Publish(d.clone()),
        };
        assert_eq!(decode_inflight(&inflight(&e)).unwrap(), (9, Some(r)));
        let e = InflightEntry {
            stage: InflightStage::PubRel,
            ..e
        };
        assert_eq!(decode_inflight(&inflight(&e)).unwrap(), (9, None));

        for s in [
            StoredSession::default(),
            StoredSession {
                expiry_interval: u32::MAX,
                offline_since: Some(5),
                will: Some(StoredWill {
                    message: Arc::new(m),
                    publish_at: 77,
                }),
            },
        ] {
            assert_eq!(decode_session(&session(&s).unwrap()).unwrap(), s);
        }

        for s in [
            StoredSubscription::default(),
            StoredSubscription {
                options: SubOptions {
                    qos: QoS::ExactlyOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: 2,
                },
                identifier: Some(3),
            },
        ] {
            assert_eq!(decode_subscription(&subscription(&s)).unwrap(), s);
        }
    }

    #[test]
    fn damage_is_detected() {
        let key = message_key(42);
        let value = seal(&key, &message(&sample_message()).unwrap());
        assert!(unseal(&key, &value).is_ok());
        // Every single flipped bit, a truncation, zeros, and the record under another key.
        for i in 0..value.len() * 8 {
            let mut v = value.clone();
            v[i / 8] ^= 1 << (i % 8);
            assert!(unseal(&key, &v).is_err(), "bit {i}");
        }
        assert_eq!(
            unseal(&key, &value[..value.len() - 1]),
            Err(RecordError::Checksum)
        );
        assert_eq!(unseal(&key, &value[..3]), Err(RecordError::Checksum));
        assert!(unseal(&key, &vec![0; value.len()]).is_err());
        assert!(unseal(&message_key(43), &value).is_err());
    }

    #[test]
    fn a_newer_version_is_named() {
        let key = session_key("c");
        let mut value = seal(&key, &session(&StoredSession::default()).unwrap());
        value[0] = FORMAT_VERSION + 1;
        // Re-seal the body under the new version byte: a well-formed record of a newer format.
        let crc = checksum(&key, &value[HEADER..]).to_le_bytes();
        value[1..5].copy_from_slice(&crc);
        assert_eq!(
            unseal(&key, &value),
            Err(RecordError::Version(FORMAT_VERSION + 1))
        );
    }

    #[test]
    fn garbage_bodies_are_errors_not_panics() {
        let bodies: [&[u8]; 6] = [&[], &[0], &[0xFF; 3], &[1; 40], &[0; 64], &[0xFF; 64]];
        for b in bodies {
            let _ = decode_message(b);
            let _ = decode_delivery(b);
            let _ = decode_inflight(b);
            let _ = decode_session(b);
            let _ = decode_subscription(b);
        }
        assert!(decode_message(&[0; 64]).is_err());
        // A huge length prefix is refused, not allocated.
        let huge = [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF];
        assert_eq!(decode_message(&huge), Err(SHORT));
    }

    #[test]
    fn client_keys_keep_clients_apart() {
        let key = queue_key("ab", 7);
        let (id, rest) = split_client_key(&key).unwrap();
        assert_eq!((&*id, key_u64(rest).unwrap()), ("ab", 7));
        // "a" is a prefix of "ab" but its key range holds none of "ab"'s keys.
        assert!(!queue_key("ab", 0).starts_with(&client_prefix(QUEUE, "a")));
        // Sequence numbers sort numerically.
        assert!(queue_key("a", 255) < queue_key("a", 256));
        assert!(split_client_key(&[QUEUE, 0, 9, b'x']).is_err());
    }
}
