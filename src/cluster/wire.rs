//! A message on its way from one node to another, as bytes: the origin node, the shared
//! subscription group it is for (if any), then the message as the store records it
//! (topic, payload, QoS, retain, MQTT 5 properties through the codec, absolute expiry).
//! No I/O here.
//!
//! `[version: u8][origin: u8 length, bytes][shared: u8 0|1, then group and filter, each
//! u16 LE length and bytes][message: store::codec's message body]`
//!
//! QoS 1/2 messages for one node travel in batches, one JetStream message each:
//! `[BATCH: u8][count: u32 LE]` then each message as `[length: u32 LE][message]`.

use crate::protocol::ByteStr;
use crate::store::codec;
use crate::store::StoredMessage;
use bytes::{BufMut, Bytes, BytesMut};

const VERSION: u8 = 1;
/// The first byte of a batch (never a message's version).
const BATCH: u8 = 0xB1;

/// A message received from another node.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// The node it was published on.
    pub origin: String,
    /// `(group, filter)` when sent to one member of a shared subscription.
    pub shared: Option<(ByteStr, ByteStr)>,
    pub message: StoredMessage,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("message of another format version ({0})")]
    Version(u8),
    #[error("malformed message: {0}")]
    Malformed(&'static str),
}

/// The part of the bytes shared by every node a message goes to.
pub fn body(message: &StoredMessage) -> Result<Bytes, WireError> {
    codec::message(message)
        .map(Bytes::from)
        .map_err(|_| WireError::Malformed("properties"))
}

/// The whole message for one node: its header, then `body`.
pub fn frame(origin: &str, shared: Option<(&str, &str)>, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(8 + origin.len() + body.len());
    out.put_u8(VERSION);
    // Node names are at most 32 bytes (config).
    out.put_u8(origin.len().min(255) as u8);
    out.put_slice(&origin.as_bytes()[..origin.len().min(255)]);
    match shared {
        None => out.put_u8(0),
        Some((group, filter)) => {
            out.put_u8(1);
            for s in [group, filter] {
                // Topic filters are at most 65535 bytes (MQTT strings).
                let n = s.len().min(u16::MAX as usize);
                out.put_u16_le(n as u16);
                out.put_slice(&s.as_bytes()[..n]);
            }
        }
    }
    out.put_slice(body);
    out.freeze()
}

pub fn decode(bytes: &[u8]) -> Result<Envelope, WireError> {
    let mut r = bytes;
    let version = take(&mut r, 1)?[0];
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let n = take(&mut r, 1)?[0] as usize;
    let origin = std::str::from_utf8(take(&mut r, n)?)
        .map_err(|_| WireError::Malformed("origin"))?
        .to_owned();
    let shared = match take(&mut r, 1)?[0] {
        0 => None,
        1 => Some((string(&mut r)?, string(&mut r)?)),
        _ => return Err(WireError::Malformed("shared flag")),
    };
    let message = codec::decode_message(r).map_err(|_| WireError::Malformed("message"))?;
    Ok(Envelope {
        origin,
        shared,
        message,
    })
}

/// The messages in `frames` (from `frame`) as batches of about `max_bytes` each, in order.
pub fn batches(frames: &[Bytes], max_bytes: usize) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut rest = frames;
    while !rest.is_empty() {
        let mut n = 0;
        let mut size = 5;
        while n < rest.len() && (n == 0 || size + 4 + rest[n].len() <= max_bytes) {
            size += 4 + rest[n].len();
            n += 1;
        }
        let mut b = BytesMut::with_capacity(size);
        b.put_u8(BATCH);
        b.put_u32_le(n as u32);
        for f in &rest[..n] {
            b.put_u32_le(f.len() as u32);
            b.put_slice(f);
        }
        out.push(b.freeze());
        rest = &rest[n..];
    }
    out
}

/// The messages of what one JetStream or NATS message carried: a batch, or one message.
pub fn split(bytes: &[u8]) -> Result<Vec<&[u8]>, WireError> {
    let mut r = bytes;
    if r.first() != Some(&BATCH) {
        return Ok(vec![bytes]);
    }
    take(&mut r, 1)?;
    let count = take(&mut r, 4)?;
    let count = u32::from_le_bytes([count[0], count[1], count[2], count[3]]) as usize;
    let mut out = Vec::with_capacity(count.min(r.len() / 4));
    for _ in 0..count {
        let len = take(&mut r, 4)?;
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        out.push(take(&mut r, len)?);
    }
    if !r.is_empty() {
        return Err(WireError::Malformed("bytes after the batch"));
    }
    Ok(out)
}

fn take<'a>(r: &mut &'a [u8], n: usize) -> Result<&'a [u8], WireError> {
    if r.len() < n {
        return Err(WireError::Malformed("shorter than its content"));
    }
    let (head, rest) = r.split_at(n);
    *r = rest;
    Ok(head)
}

fn string(r: &mut &[u8]) -> Result<ByteStr, WireError> {
    let len = take(r, 2)?;
    let n = u16::from_le_bytes([len[0], len[1]]) as usize;
    let s = std::str::from_utf8(take(r, n)?).map_err(|_| WireError::Malformed("string"))?;
    Ok(ByteStr::from(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Properties, QoS};

    fn message() -> StoredMessage {
        StoredMessage {
            id: 0,
            topic: ByteStr::from("a/b c.d"),
            payload: Bytes::from_static(b"payload"),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties: Properties {
                content_type: Some(ByteStr::from("text/plain")),
                user_properties: vec![(ByteStr::from("k"), ByteStr::from("v"))],
                ..Properties::default()
            },
            expires_at: Some(1_700_000_000_000),
        }
    }

    #[test]
    fn round_trips_plain_and_shared() {
        let m = message();
        let body = body(&m).unwrap();
        let plain = decode(&frame("node-a", None, &body)).unwrap();
        assert_eq!(
            plain,
            Envelope {
                origin: "node-a".into(),
                shared: None,
                message: m.clone()
            }
        );
        let shared = decode(&frame("b", Some(("g", "s/+")), &body)).unwrap();
        assert_eq!(shared.shared, Some(("g".into(), "s/+".into())));
        assert_eq!(shared.message, m);
    }

    #[test]
    fn batches_keep_order_and_size() {
        let frames: Vec<Bytes> = (0..10u8).map(|i| frame("n", None, &[i; 100])).collect();
        let sent = batches(&frames, 350);
        assert!(sent.len() > 1 && sent.iter().all(|b| b.len() <= 350));
        let back: Vec<&[u8]> = sent.iter().flat_map(|b| split(b).unwrap()).collect();
        assert_eq!(back, frames.iter().map(|f| &f[..]).collect::<Vec<_>>());
        // A message larger than the size goes alone; a single message is not a batch.
        assert_eq!(batches(&frames[..1], 10).len(), 1);
        assert_eq!(split(&frames[0]).unwrap(), vec![&frames[0][..]]);
        let whole = &sent[0];
        for cut in 1..whole.len() {
            assert!(split(&whole[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn bad_bytes_are_errors_not_panics() {
        let full = frame("n", Some(("g", "f")), &body(&message()).unwrap());
        for cut in 0..full.len() {
            assert!(decode(&full[..cut]).is_err(), "cut at {cut}");
        }
        let mut other = full.to_vec();
        other[0] = 9;
        assert_eq!(decode(&other), Err(WireError::Version(9)));
    }
}
