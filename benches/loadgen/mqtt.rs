//! A lean MQTT client codec: only the packets the load generator sends and reads, written
//! straight into a reused buffer. MQTT 3.1.1, and for subscribers that take topic
//! aliases from the broker (`--topic-aliases`), the few MQTT 5 packets they need. It is independent of the broker's codec on
//! purpose, so that a bug there cannot hide behind the same bug here (the tests check
//! both against each other).

pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const PUBREC: u8 = 5;
pub const PUBREL: u8 = 6;
pub const PUBCOMP: u8 = 7;
pub const SUBACK: u8 = 9;
pub const PINGRESP: u8 = 13;

/// The bytes do not form a packet this client understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed packet from the broker: {}", self.0)
    }
}

impl std::error::Error for Malformed {}

/// Appends the remaining-length varint.
fn put_len(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let byte = (n % 128) as u8;
        n /= 128;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    // Callers pass client ids and topics far below 64 KiB.
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// CONNECT, MQTT 3.1.1, clean session, no will, no credentials.
pub fn connect(out: &mut Vec<u8>, client_id: &str, keep_alive: u16) {
    connect_session(out, client_id, keep_alive, true, None);
}

/// CONNECT with Clean Session `clean`: false asks for a persistent session. With
/// `aliases`, an MQTT 5 CONNECT whose Topic Alias Maximum is that many (a persistent
/// session then asks for a Session Expiry Interval of an hour).
pub fn connect_session(
    out: &mut Vec<u8>,
    client_id: &str,
    keep_alive: u16,
    clean: bool,
    aliases: Option<u16>,
) {
    let mut props = Vec::new();
    if let Some(max) = aliases {
        props.push(0x22); // Topic Alias Maximum
        props.extend_from_slice(&max.to_be_bytes());
        if !clean {
            props.push(0x11); // Session Expiry Interval
            props.extend_from_slice(&3600u32.to_be_bytes());
        }
    }
    let props_len = if aliases.is_some() {
        1 + props.len()
    } else {
        0
    };
    out.push(0x10);
    put_len(out, 10 + props_len + 2 + client_id.len());
    put_str(out, b"MQTT");
    out.push(if aliases.is_some() { 5 } else { 4 }); // protocol level
    out.push(if clean { 0x02 } else { 0x00 });
    out.extend_from_slice(&keep_alive.to_be_bytes());
    if aliases.is_some() {
        put_len(out, props.len());
        out.extend_from_slice(&props);
    }
    put_str(out, client_id.as_bytes());
}

/// SUBSCRIBE to one filter (MQTT 5: with an empty property list).
pub fn subscribe(out: &mut Vec<u8>, pkid: u16, filter: &str, qos: u8, v5: bool) {
    out.push(0x82);
    put_len(out, 2 + usize::from(v5) + 2 + filter.len() + 1);
    out.extend_from_slice(&pkid.to_be_bytes());
    if v5 {
        out.push(0);
    }
    put_str(out, filter.as_bytes());
    out.push(qos);
}

/// PUBLISH whose payload is `head` followed by `tail` (the stamp, then filler).
pub fn publish(out: &mut Vec<u8>, topic: &str, qos: u8, pkid: u16, head: &[u8], tail: &[u8]) {
    out.push(0x30 | (qos << 1));
    let pkid_len = if qos > 0 { 2 } else { 0 };
    put_len(out, 2 + topic.len() + pkid_len + head.len() + tail.len());
    put_str(out, topic.as_bytes());
    if qos > 0 {
        out.extend_from_slice(&pkid.to_be_bytes());
    }
    out.extend_from_slice(head);
    out.extend_from_slice(tail);
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP.
pub fn ack(out: &mut Vec<u8>, kind: u8, pkid: u16) {
    // PUBREL's fixed header flags are 0b0010 [MQTT-3.6.1-1].
    let flags = if kind == PUBREL { 0x02 } else { 0 };
    out.push((kind << 4) | flags);
    out.push(2);
    out.extend_from_slice(&pkid.to_be_bytes());
}

pub fn disconnect(out: &mut Vec<u8>) {
    out.extend_from_slice(&[0xE0, 0x00]);
}

/// One packet as read: its type, fixed header flags and the bytes after the fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub kind: u8,
    pub flags: u8,
    pub body: &'a [u8],
}

/// The first complete packet of `buf` and its total size, or `None` while incomplete.
pub fn next_frame(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, Malformed> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut len = 0usize;
    let mut shift = 0;
    let mut i = 1;
    loop {
        let Some(&byte) = buf.get(i) else {
            return Ok(None);
        };
        len |= usize::from(byte & 0x7F) << shift;
        i += 1;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return Err(Malformed("remaining length longer than 4 bytes"));
        }
    }
    let total = i + len;
    if buf.len() < total {
        return Ok(None);
    }
    let frame = Frame {
        kind: first >> 4,
        flags: first & 0x0F,
        body: &buf[i..total],
    };
    Ok(Some((frame, total)))
}

/// An incoming PUBLISH, borrowed from the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish<'a> {
    pub qos: u8,
    pub pkid: u16,
    pub topic: &'a [u8],
    pub payload: &'a [u8],
}

/// A PUBLISH; MQTT 5's properties are skipped (a topic alias is not resolved: the load
/// generator tells messages apart by their payload's stamp).
pub fn parse_publish<'a>(frame: &Frame<'a>, v5: bool) -> Result<Publish<'a>, Malformed> {
    let qos = (frame.flags >> 1) & 0x03;
    if qos == 3 {
        return Err(Malformed("PUBLISH with QoS 3"));
    }
    let body = frame.body;
    let topic_len = usize::from(u16_at(body, 0)?);
    let topic = body
        .get(2..2 + topic_len)
        .ok_or(Malformed("PUBLISH topic past the packet"))?;
    let mut at = 2 + topic_len;
    let mut pkid = 0;
    if qos > 0 {
        pkid = u16_at(body, at)?;
        at += 2;
    }
    if v5 {
        let (len, used) = varint(body.get(at..).unwrap_or_default())?;
        at += used + len;
        if at > body.len() {
            return Err(Malformed("PUBLISH properties past the packet"));
        }
    }
    Ok(Publish {
        qos,
        pkid,
        topic,
        payload: &body[at..],
    })
}

/// The packet identifier of PUBACK, PUBREC, PUBREL, PUBCOMP or SUBACK.
pub fn pkid(frame: &Frame<'_>) -> Result<u16, Malformed> {
    u16_at(frame.body, 0)
}

/// CONNACK's return code (0 = accepted).
pub fn connack_code(frame: &Frame<'_>) -> Result<u8, Malformed> {
    frame.body.get(1).copied().ok_or(Malformed("short CONNACK"))
}

/// SUBACK's first return code (granted QoS, or 0x80 and up for failure).
pub fn suback_code(frame: &Frame<'_>, v5: bool) -> Result<u8, Malformed> {
    let mut at = 2;
    if v5 {
        let (len, used) = varint(frame.body.get(at..).unwrap_or_default())?;
        at += used + len;
    }
    frame.body.get(at).copied().ok_or(Malformed("short SUBACK"))
}

/// A variable byte integer at the start of `bytes`: its value and its length.
fn varint(bytes: &[u8]) -> Result<(usize, usize), Malformed> {
    let mut value = 0;
    for (i, b) in bytes.iter().take(4).enumerate() {
        value |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    Err(Malformed("bad variable byte integer"))
}

fn u16_at(body: &[u8], at: usize) -> Result<u16, Malformed> {
    match body.get(at..at + 2) {
        Some(b) => Ok(u16::from_be_bytes([b[0], b[1]])),
        None => Err(Malformed("packet too short")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use ternmq::protocol::{self, Packet, Protocol, PublishHeader, QoS};

    fn theirs(bytes: &[u8]) -> Packet {
        let mut buf = BytesMut::from(bytes);
        let packet = protocol::decode(&mut buf, Protocol::V311, usize::MAX)
            .expect("valid packet")
            .expect("complete packet");
        assert!(buf.is_empty(), "decoder consumed the whole packet");
        packet
    }

    #[test]
    fn connect_is_valid_mqtt_311() {
        let mut out = Vec::new();
        connect(&mut out, "lg-sub-7", 300);
        let Packet::Connect(c) = theirs(&out) else {
            panic!("not a CONNECT");
        };
        assert_eq!(c.protocol, Protocol::V311);
        assert!(c.clean_start);
        assert_eq!(c.keep_alive, 300);
        assert_eq!(&*c.client_id, "lg-sub-7");
        assert!(c.will.is_none() && c.username.is_none());
    }

    #[test]
    fn subscribe_is_valid() {
        let mut out = Vec::new();
        subscribe(&mut out, 9, "bench/in/+", 2, false);
        let Packet::Subscribe(s) = theirs(&out) else {
            panic!("not a SUBSCRIBE");
        };
        assert_eq!(s.pkid, 9);
        assert_eq!(s.filters.len(), 1);
        assert_eq!(&*s.filters[0].filter, "bench/in/+");
        assert_eq!(s.filters[0].options.qos, QoS::ExactlyOnce);
    }

    #[test]
    fn publish_round_trips_with_the_broker_codec() {
        // Sizes around the varint boundaries of the remaining length.
        for (qos, size) in [
            (0u8, 0usize),
            (1, 100),
            (2, 16_370),
            (1, 16_380),
            (0, 70_000),
        ] {
            let payload: Vec<u8> = (0..size).map(|i| i as u8).collect();
            let (head, tail) = payload.split_at(size.min(20));
            let mut out = Vec::new();
            publish(&mut out, "a/b", qos, 513, head, tail);
            let Packet::Publish(p) = theirs(&out) else {
                panic!("not a PUBLISH");
            };
            assert_eq!(p.qos as u8, qos);
            assert_eq!(&*p.topic, "a/b");
            assert_eq!(p.pkid, if qos > 0 { 513 } else { 0 });
            assert_eq!(&p.payload[..], &payload[..]);

            // And the other way: the broker's encoding, read by ours.
            let mut theirs = BytesMut::new();
            let header = PublishHeader {
                dup: false,
                qos: QoS::from_u8(qos).expect("qos"),
                retain: false,
                topic: "a/b",
                pkid: if qos > 0 { 513 } else { 0 },
            };
            protocol::encode_publish(&mut theirs, Protocol::V311, &header, None, &payload)
                .expect("encodes");
            assert_eq!(&theirs[..], &out[..], "both encoders agree byte for byte");
            let (frame, used) = next_frame(&theirs).expect("ok").expect("complete");
            assert_eq!(used, theirs.len());
            let p = parse_publish(&frame, false).expect("parses");
            assert_eq!(
                (p.qos, p.topic, p.payload),
                (qos, &b"a/b"[..], &payload[..])
            );
        }
    }

    /// The MQTT 5 subscriber: CONNECT with Topic Alias Maximum, SUBSCRIBE, and a PUBLISH
    /// that the broker sent with an alias and no topic, read past its properties.
    #[test]
    fn mqtt5_subscriber_packets_agree_with_the_broker_codec() {
        let decode5 = |bytes: &[u8]| {
            let mut buf = BytesMut::from(bytes);
            protocol::decode(&mut buf, Protocol::V5, usize::MAX)
                .expect("valid packet")
                .expect("complete packet")
        };
        let mut out = Vec::new();
        connect_session(&mut out, "lg-sub-5", 60, false, Some(10));
        let Packet::Connect(c) = decode5(&out) else {
            panic!("not a CONNECT");
        };
        assert_eq!(c.protocol, Protocol::V5);
        assert_eq!(c.properties.topic_alias_maximum, Some(10));
        assert_eq!(c.properties.session_expiry_interval, Some(3600));
        assert!(!c.clean_start);
        let mut out = Vec::new();
        subscribe(&mut out, 3, "bench/#", 1, true);
        let Packet::Subscribe(s) = decode5(&out) else {
            panic!("not a SUBSCRIBE");
        };
        assert_eq!((s.pkid, &*s.filters[0].filter), (3, "bench/#"));

        let mut theirs = BytesMut::new();
        let header = PublishHeader {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "",
            pkid: 7,
        };
        let properties = protocol::Properties {
            topic_alias: Some(4),
            ..Default::default()
        };
        protocol::encode_publish(
            &mut theirs,
            Protocol::V5,
            &header,
            Some(&properties),
            b"stamp",
        )
        .expect("encodes");
        let (frame, _) = next_frame(&theirs).expect("ok").expect("complete");
        let p = parse_publish(&frame, true).expect("parses");
        assert_eq!(
            (p.qos, p.pkid, p.topic, p.payload),
            (1, 7, &b""[..], &b"stamp"[..])
        );
        // SUBACK 5.0: packet id, properties (here a reason string), then the codes.
        let suback = Frame {
            kind: SUBACK,
            flags: 0,
            body: &[0, 3, 4, 0x1F, 0, 1, b'x', 0x01],
        };
        assert_eq!(suback_code(&suback, true), Ok(1));
    }

    #[test]
    fn acks_decode_as_the_right_packets() {
        for (kind, name) in [
            (PUBACK, "PUBACK"),
            (PUBREC, "PUBREC"),
            (PUBREL, "PUBREL"),
            (PUBCOMP, "PUBCOMP"),
        ] {
            let mut out = Vec::new();
            ack(&mut out, kind, 65535);
            let packet = theirs(&out);
            assert_eq!(packet.name(), name);
            let (frame, _) = next_frame(&out).expect("ok").expect("complete");
            assert_eq!(pkid(&frame), Ok(65535));
        }
        let mut out = Vec::new();
        disconnect(&mut out);
        assert_eq!(theirs(&out).name(), "DISCONNECT");
    }

    #[test]
    fn incomplete_frames_wait_for_more_bytes() {
        let mut out = Vec::new();
        publish(&mut out, "t", 1, 1, &[7; 200], &[]);
        for cut in 0..out.len() {
            assert_eq!(next_frame(&out[..cut]), Ok(None), "cut at {cut}");
        }
        // Two packets back to back come out one at a time.
        ack(&mut out, PUBACK, 4);
        let (first, used) = next_frame(&out).expect("ok").expect("complete");
        assert_eq!(first.kind, PUBLISH);
        let (second, rest) = next_frame(&out[used..]).expect("ok").expect("complete");
        assert_eq!((second.kind, rest), (PUBACK, 4));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(next_frame(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]).is_err());
        let short = Frame {
            kind: PUBLISH,
            flags: 0x02,
            body: &[0, 5, b'a'],
        };
        assert!(parse_publish(&short, false).is_err());
        assert!(parse_publish(&short, true).is_err());
        let qos3 = Frame {
            kind: PUBLISH,
            flags: 0x06,
            body: &[0, 0, 0, 1],
        };
        assert!(parse_publish(&qos3, false).is_err());
        let empty = Frame {
            kind: PUBACK,
            flags: 0,
            body: &[],
        };
        assert!(pkid(&empty).is_err());
        assert!(connack_code(&empty).is_err());
        assert!(suback_code(&empty, false).is_err());
        assert!(suback_code(&empty, true).is_err());
    }
}
