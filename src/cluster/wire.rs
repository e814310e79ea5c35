//! A message on its way from one node to another, as bytes: the origin node, the shared
//! subscription group it is for (if any), then the message as the store records it
//! (topic, payload, QoS, retain, MQTT 5 properties through the codec, absolute expiry).
//! No I/O here.
//!
//! `[version: u8][origin: u8 length, bytes][shared: u8 0|1, then group and filter, each
//! u16 LE length and bytes][message: store::codec's message body]`

use crate::protocol::ByteStr;
use crate::store::codec;
use crate::store::StoredMessage;
use bytes::{BufMut, Bytes, BytesMut};

const VERSION: u8 = 1;

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
