//! A message on its way from one node to another, as bytes: the origin node, the shared
//! subscription group it is for (if any), the nodes it was sent to, the one session it is
//! forwarded to (if any: src/cluster/handover.rs), then the message as the store records
//! it (topic, payload, QoS, retain, MQTT 5 properties through the codec, absolute expiry).
//! No I/O here.
//!
//! `[version: u8][origin: u8 length, bytes][shared: u8 0|1, then group and filter, each
//! u16 LE length and bytes][via: u8 count, each node u8 length and bytes][to: u8 0|1,
//! then the client id, u16 LE length and bytes, and its hop, u64 LE][message:
//! store::codec's message body]`
//!
//! QoS 1/2 messages for one node travel in batches, one JetStream message each:
//! `[BATCH: u8][count: u32 LE]` then each message as `[length: u32 LE][message]`.

use crate::protocol::ByteStr;
use crate::store::codec;
use crate::store::StoredMessage;
use bytes::{BufMut, Bytes, BytesMut};

const VERSION: u8 = 2;
/// The first byte of a batch (never a message's version).
const BATCH: u8 = 0xB1;

/// A message received from another node.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// The node it was published on.
    pub origin: String,
    /// `(group, filter)` when sent to one member of a shared subscription.
    pub shared: Option<(ByteStr, ByteStr)>,
    /// The other nodes the origin sent it to (not this one, nor the origin).
    pub via: Vec<String>,
    /// The client whose session it is forwarded to by a node that session left, and the
    /// hop of its moves it is for (handover.rs).
    pub to: Option<(ByteStr, u64)>,
    pub message: StoredMessage,
}

/// What `frame` puts before the message.
#[derive(Debug, Clone, Copy, Default)]
pub struct Header<'a> {
    pub origin: &'a str,
    pub shared: Option<(&'a str, &'a str)>,
    pub via: &'a [&'a str],
    pub to: Option<(&'a str, u64)>,
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
pub fn frame(header: Header<'_>, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(16 + 33 * header.via.len() + body.len());
    out.put_u8(VERSION);
    // Node names are at most 32 bytes (config).
    let short = |out: &mut BytesMut, s: &str| {
        out.put_u8(s.len().min(255) as u8);
        out.put_slice(&s.as_bytes()[..s.len().min(255)]);
    };
    // MQTT strings are at most 65535 bytes.
    let long = |out: &mut BytesMut, s: &str| {
        let n = s.len().min(u16::MAX as usize);
        out.put_u16_le(n as u16);
        out.put_slice(&s.as_bytes()[..n]);
    };
    short(&mut out, header.origin);
    match header.shared {
        None => out.put_u8(0),
        Some((group, filter)) => {
            out.put_u8(1);
            long(&mut out, group);
            long(&mut out, filter);
        }
    }
    let via = &header.via[..header.via.len().min(255)];
    out.put_u8(via.len() as u8);
    for node in via {
        short(&mut out, node);
    }
    match header.to {
        None => out.put_u8(0),
        Some((client, hop)) => {
            out.put_u8(1);
            long(&mut out, client);
            out.put_u64_le(hop);
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
    let origin = short(&mut r)?;
    let shared = match take(&mut r, 1)?[0] {
        0 => None,
        1 => Some((string(&mut r)?, string(&mut r)?)),
        _ => return Err(WireError::Malformed("shared flag")),
    };
    let n = take(&mut r, 1)?[0];
    let via = (0..n).map(|_| short(&mut r)).collect::<Result<_, _>>()?;
    let to = match take(&mut r, 1)?[0] {
        0 => None,
        1 => {
            let client = string(&mut r)?;
            let hop = take(&mut r, 8)?;
            Some((
                client,
                u64::from_le_bytes(hop.try_into().unwrap_or_default()),
            ))
        }
        _ => return Err(WireError::Malformed("forward flag")),
    };
    let message = codec::decode_message(r).map_err(|_| WireError::Malformed("message"))?;
    Ok(Envelope {
        origin,
        shared,
        via,
        to,
        message,
    })
}

/// A node name: u8 length, bytes.
fn short(r: &mut &[u8]) -> Result<String, WireError> {
    let n = take(r, 1)?[0] as usize;
    std::str::from_utf8(take(r, n)?)
        .map(str::to_owned)
        .map_err(|_| WireError::Malformed("node name"))
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
        let header = Header {
            origin: "node-a",
            via: &["b", "c"],
            ..Header::default()
        };
        let plain = decode(&frame(header, &body)).unwrap();
        assert_eq!(
            plain,
            Envelope {
                origin: "node-a".into(),
                shared: None,
                via: vec!["b".into(), "c".into()],
                to: None,
                message: m.clone()
            }
        );
        let header = Header {
            origin: "b",
            shared: Some(("g", "s/+")),
            to: Some(("client 1", 3)),
            ..Header::default()
        };
        let shared = decode(&frame(header, &body)).unwrap();
        assert_eq!(shared.shared, Some(("g".into(), "s/+".into())));
        assert_eq!(shared.to, Some(("client 1".into(), 3)));
        assert!(shared.via.is_empty());
        assert_eq!(shared.message, m);
    }

    #[test]
    fn batches_keep_order_and_size() {
        let header = Header {
            origin: "n",
            ..Header::default()
        };
        let frames: Vec<Bytes> = (0..10u8).map(|i| frame(header, &[i; 100])).collect();
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
        let header = Header {
            origin: "n",
            shared: Some(("g", "f")),
            via: &["a", "b"],
            to: Some(("c", 1)),
        };
        let full = frame(header, &body(&message()).unwrap());
        for cut in 0..full.len() {
            assert!(decode(&full[..cut]).is_err(), "cut at {cut}");
        }
        let mut other = full.to_vec();
        other[0] = 9;
        assert_eq!(decode(&other), Err(WireError::Version(9)));
    }
}
