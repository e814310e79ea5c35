//! The encoder. Each packet layout is written once, against a [`Sink`]: a first pass only
//! counts bytes, so that the output buffer is reserved once and nothing is written when a
//! packet cannot be encoded; a second pass writes. PUBLISH, the hot path, is hand-sized.

use bytes::{BufMut, BytesMut};

use super::properties::PublishExtra;
use super::{
    Ack, Connect, Error, Packet, Properties, Protocol, QoS, ReasonCode, Subscribe,
    MAX_REMAINING_LENGTH,
};

/// Where encoded bytes go.
pub(super) trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

/// A sink that only counts.
pub(super) struct Count(pub usize);

impl Sink for Count {
    fn put(&mut self, bytes: &[u8]) {
        self.0 += bytes.len();
    }
}

impl Sink for BytesMut {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Variable Byte Integer (section 1.5.5).
pub(super) fn put_varint<S: Sink + ?Sized>(s: &mut S, mut value: usize) -> Result<(), Error> {
    if value > MAX_REMAINING_LENGTH {
        return Err(Error::Malformed(
            "value too large for a variable byte integer",
        ));
    }
    let mut buf = [0u8; 4];
    let mut len = 0;
    loop {
        buf[len] = (value & 0x7F) as u8;
        value >>= 7;
        if value > 0 {
            buf[len] |= 0x80;
        }
        len += 1;
        if value == 0 {
            break;
        }
    }
    s.put(&buf[..len]);
    Ok(())
}

fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Binary Data (section 1.5.6).
pub(super) fn put_binary<S: Sink + ?Sized>(s: &mut S, bytes: &[u8]) -> Result<(), Error> {
    let len = u16::try_from(bytes.len()).map_err(|_| TOO_LONG)?;
    s.put(&len.to_be_bytes());
    s.put(bytes);
    Ok(())
}

/// UTF-8 Encoded String (section 1.5.4). `str` is UTF-8 already; a U+0000 in it is the
/// caller's bug and is not searched for.
pub(super) fn put_string<S: Sink + ?Sized>(s: &mut S, string: &str) -> Result<(), Error> {
    put_binary(s, string.as_bytes())
}

const TOO_LONG: Error = Error::Malformed("string or binary data longer than 65535 bytes");

fn put_packet_id(s: &mut dyn Sink, pkid: u16) -> Result<(), Error> {
    if pkid == 0 {
        return Err(Error::Malformed("packet identifier 0"));
    }
    s.put(&pkid.to_be_bytes());
    Ok(())
}

/// Reserves room for the whole packet and writes its fixed header.
fn fixed_header(out: &mut BytesMut, byte1: u8, remaining: usize) -> Result<(), Error> {
    if remaining > MAX_REMAINING_LENGTH {
        return Err(Error::Malformed("packet too large to encode"));
    }
    out.reserve(1 + varint_len(remaining) + remaining);
    out.put_u8(byte1);
    put_varint(out, remaining)
}

/// Sizes `body`, then writes the fixed header and `body`.
fn frame(
    out: &mut BytesMut,
    byte1: u8,
    body: impl Fn(&mut dyn Sink) -> Result<(), Error>,
) -> Result<(), Error> {
    let mut count = Count(0);
    body(&mut count)?;
    fixed_header(out, byte1, count.0)?;
    body(out)
}

/// Appends `packet` to `out`, in the 3.x layout (5.0-only fields left out) or the 5.0 one.
/// A CONNECT is always encoded for its own `protocol` field, `MQIsdp`/3 for 3.1.
///
/// Fails, leaving `out` untouched, on what the decoder would refuse in structure (zero packet
/// identifiers, empty SUBSCRIBE/UNSUBSCRIBE/acknowledgement lists, a 3.x password without a
/// username, AUTH in 3.x) and on what cannot be represented (strings over 65535 bytes,
/// packets over the maximum remaining length). Property values and reason codes are
/// written as given.
pub fn encode(packet: &Packet, protocol: Protocol, out: &mut BytesMut) -> Result<(), Error> {
    let v5 = protocol.is_v5();
    match packet {
        Packet::Connect(c) => frame(out, 0x10, |s| connect(s, c)),
        Packet::ConnAck(c) => frame(out, 0x20, |s| {
            let code = if v5 {
                c.code as u8
            } else {
                c.code.v3_connack()
            };
            s.put(&[u8::from(c.session_present), code]);
            if v5 {
                c.properties.encode(s)?;
            }
            Ok(())
        }),
        Packet::Publish(p) => {
            let header = PublishHeader {
                dup: p.dup,
                qos: p.qos,
                retain: p.retain,
                topic: &p.topic,
                pkid: p.pkid,
            };
            encode_publish(out, protocol, &header, p.properties.as_deref(), &p.payload)
        }
        Packet::PubAck(a) => frame(out, 0x40, |s| ack(s, a, v5)),
        Packet::PubRec(a) => frame(out, 0x50, |s| ack(s, a, v5)),
        Packet::PubRel(a) => frame(out, 0x62, |s| ack(s, a, v5)),
        Packet::PubComp(a) => frame(out, 0x70, |s| ack(s, a, v5)),
        Packet::Subscribe(sub) => frame(out, 0x82, |s| subscribe(s, sub, v5)),
        Packet::SubAck(a) => frame(out, 0x90, |s| {
            put_packet_id(s, a.pkid)?;
            if v5 {
                a.properties.encode(s)?;
            }
            reason_codes(s, &a.codes)
        }),
        Packet::Unsubscribe(u) => frame(out, 0xA2, |s| {
            put_packet_id(s, u.pkid)?;
            if v5 {
                u.properties.encode(s)?;
            }
            if u.filters.is_empty() {
                return Err(Error::Malformed("UNSUBSCRIBE without a topic filter"));
            }
            u.filters.iter().try_for_each(|f| put_string(s, f))
        }),
        Packet::UnsubAck(a) => frame(out, 0xB0, |s| {
            put_packet_id(s, a.pkid)?;
            if v5 {
                a.properties.encode(s)?;
                reason_codes(s, &a.codes)?;
            }
            Ok(())
        }),
        Packet::PingReq => frame(out, 0xC0, |_| Ok(())),
        Packet::PingResp => frame(out, 0xD0, |_| Ok(())),
        Packet::Disconnect(d) => frame(out, 0xE0, |s| {
            if v5 {
                reason_and_properties(s, d.reason, &d.properties, true)?;
            }
            Ok(())
        }),
        Packet::Auth(_) if !v5 => Err(Error::Malformed("AUTH requires MQTT 5")),
        Packet::Auth(a) => frame(out, 0xF0, |s| {
            reason_and_properties(s, a.reason, &a.properties, false)
        }),
    }
}

fn connect(s: &mut dyn Sink, c: &Connect) -> Result<(), Error> {
    let v5 = c.protocol.is_v5();
    if !v5 && c.password.is_some() && c.username.is_none() {
        return Err(Error::Malformed("password without a username"));
    }
    let name: &[u8] = if c.protocol == Protocol::V31 {
        b"MQIsdp"
    } else {
        b"MQTT"
    };
    put_binary(s, name)?;
    let mut flags = u8::from(c.clean_start) << 1;
    if let Some(will) = &c.will {
        flags |= 0x04 | (will.qos as u8) << 3 | u8::from(will.retain) << 5;
    }
    if c.username.is_some() {
        flags |= 0x80;
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    s.put(&[c.protocol.level(), flags]);
    s.put(&c.keep_alive.to_be_bytes());
    if v5 {
        c.properties.encode(s)?;
    }
    put_string(s, &c.client_id)?;
    if let Some(will) = &c.will {
        if v5 {
            will.properties.encode(s)?;
        }
        put_string(s, &will.topic)?;
        put_binary(s, &will.payload)?;
    }
    if let Some(username) = &c.username {
        put_string(s, username)?;
    }
    if let Some(password) = &c.password {
        put_binary(s, password)?;
    }
    Ok(())
}

fn ack(s: &mut dyn Sink, a: &Ack, v5: bool) -> Result<(), Error> {
    put_packet_id(s, a.pkid)?;
    if v5 {
        reason_and_properties(s, a.reason, &a.properties, true)?;
    }
    Ok(())
}

/// The 5.0 tail of acks, DISCONNECT and AUTH: nothing for a success without properties,
/// and, except in AUTH, the reason code alone when there are no properties.
fn reason_and_properties(
    s: &mut dyn Sink,
    reason: ReasonCode,
    properties: &Properties,
    may_omit_properties: bool,
) -> Result<(), Error> {
    let no_properties = properties.is_empty();
    if reason == ReasonCode::Success && no_properties {
        return Ok(());
    }
    s.put(&[reason as u8]);
    if !(no_properties && may_omit_properties) {
        properties.encode(s)?;
    }
    Ok(())
}

fn reason_codes(s: &mut dyn Sink, codes: &[ReasonCode]) -> Result<(), Error> {
    if codes.is_empty() {
        return Err(Error::Malformed("acknowledgement without a reason code"));
    }
    codes.iter().for_each(|c| s.put(&[*c as u8]));
    Ok(())
}

fn subscribe(s: &mut dyn Sink, sub: &Subscribe, v5: bool) -> Result<(), Error> {
    put_packet_id(s, sub.pkid)?;
    if v5 {
        sub.properties.encode(s)?;
    }
    if sub.filters.is_empty() {
        return Err(Error::Malformed("SUBSCRIBE without a topic filter"));
    }
    for f in &sub.filters {
        put_string(s, &f.filter)?;
        let o = &f.options;
        let mut options = o.qos as u8;
        if v5 {
            if o.retain_handling > 2 {
                return Err(Error::Malformed("retain handling over 2"));
            }
            options |= u8::from(o.no_local) << 2
                | u8::from(o.retain_as_published) << 3
                | o.retain_handling << 4;
        }
        s.put(&[options]);
    }
    Ok(())
}

/// The fixed and variable header fields of a PUBLISH, borrowed from wherever the broker
/// keeps them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublishHeader<'a> {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    pub topic: &'a str,
    /// Ignored for QoS 0; must not be 0 otherwise.
    pub pkid: u16,
}

/// Appends a PUBLISH made of parts to `out`, allocating nothing but `out`'s growth.
/// `properties` are written only for 5.0; `None` means none.
pub fn encode_publish(
    out: &mut BytesMut,
    protocol: Protocol,
    header: &PublishHeader<'_>,
    properties: Option<&Properties>,
    payload: &[u8],
) -> Result<(), Error> {
    encode_publish_with(
        out,
        protocol,
        header,
        properties,
        &PublishExtra::default(),
        payload,
    )
}

/// `encode_publish` with the receiver's own properties (5.0) next to the message's.
pub fn encode_publish_with(
    out: &mut BytesMut,
    protocol: Protocol,
    header: &PublishHeader<'_>,
    properties: Option<&Properties>,
    extra: &PublishExtra<'_>,
    payload: &[u8],
) -> Result<(), Error> {
    let topic_len = u16::try_from(header.topic.len()).map_err(|_| TOO_LONG)?;
    let has_pkid = header.qos != QoS::AtMostOnce;
    if has_pkid && header.pkid == 0 {
        return Err(Error::Malformed("packet identifier 0"));
    }
    let v5 = protocol.is_v5();
    let properties = properties.filter(|_| v5);
    let properties_len = match (v5, extra.is_empty(), properties) {
        (false, _, _) => 0,
        (true, true, Some(p)) => p.encoded_len()?,
        (true, true, None) => 0,
        (true, false, p) => extra.encoded_len(p)?,
    };
    let mut remaining = 2 + header.topic.len() + payload.len();
    if has_pkid {
        remaining += 2;
    }
    if v5 {
        remaining += varint_len(properties_len) + properties_len;
    }
    let byte1 =
        0x30 | u8::from(header.dup) << 3 | (header.qos as u8) << 1 | u8::from(header.retain);
    fixed_header(out, byte1, remaining)?;
    out.put_u16(topic_len);
    out.put_slice(header.topic.as_bytes());
    if has_pkid {
        out.put_u16(header.pkid);
    }
    if v5 {
        put_varint(out, properties_len)?;
        if !extra.is_empty() {
            extra.write(properties, out)?;
        } else if let Some(p) = properties {
            p.write(out)?;
        }
    }
    out.put_slice(payload);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{
        decode, Auth, ConnAck, Disconnect, Publish, SubAck, SubOptions, SubscribeFilter, UnsubAck,
        Unsubscribe, Will,
    };
    use bytes::Bytes;
    use Protocol::{V31, V311, V5};

    fn bytes(packet: &Packet, protocol: Protocol) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode(packet, protocol, &mut out).unwrap();
        out.to_vec()
    }

    /// Encoding fails and writes nothing.
    fn fails(packet: &Packet, protocol: Protocol) {
        let mut out = BytesMut::from(&b"xy"[..]);
        assert!(matches!(
            encode(packet, protocol, &mut out),
            Err(Error::Malformed(_))
        ));
        assert_eq!(&out[..], b"xy");
    }

    fn connect(protocol: Protocol) -> Connect {
        Connect {
            protocol,
            clean_start: true,
            keep_alive: 10,
            client_id: "id".into(),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        }
    }

    #[test]
    fn varints() {
        for (value, expected) in [
            (0, &[0x00][..]),
            (127, &[0x7F]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xFF, 0x7F]),
            (16_384, &[0x80, 0x80, 0x01]),
            (2_097_151, &[0xFF, 0xFF, 0x7F]),
            (2_097_152, &[0x80, 0x80, 0x80, 0x01]),
            (268_435_455, &[0xFF, 0xFF, 0xFF, 0x7F]),
        ] {
            let mut out = BytesMut::new();
            put_varint(&mut out, value).unwrap();
            assert_eq!(&out[..], expected);
            assert_eq!(varint_len(value), expected.len());
        }
        assert!(put_varint(&mut BytesMut::new(), 268_435_456).is_err());
    }

    #[test]
    #[allow(clippy::too_many_lines)] // one table of packets and their bytes
    fn known_bytes() {
        let connect31 = Packet::Connect(Box::new(connect(V31)));
        let expected = b"\x10\x10\x00\x06MQIsdp\x03\x02\x00\x0a\x00\x02id";
        // The CONNECT's own protocol wins over the argument.
        assert_eq!(bytes(&connect31, V5), expected);
        let mut c = connect(V311);
        c.will = Some(Will {
            topic: "w".into(),
            payload: Bytes::from_static(b"p"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: Properties::default(),
        });
        c.username = Some("u".into());
        c.password = Some(Bytes::from_static(b"\x00"));
        let expected = b"\x10\x1a\x00\x04MQTT\x04\xee\x00\x0a\x00\x02id\x00\x01w\x00\x01p\x00\x01u\x00\x01\x00";
        assert_eq!(bytes(&Packet::Connect(Box::new(c)), V311), expected);

        let publish = Packet::Publish(Publish {
            dup: true,
            qos: QoS::ExactlyOnce,
            retain: true,
            topic: "a/b".into(),
            pkid: 10,
            payload: Bytes::from_static(b"hi"),
            properties: None,
        });
        assert_eq!(bytes(&publish, V311), b"\x3d\x09\x00\x03a/b\x00\x0ahi");
        assert_eq!(bytes(&publish, V5), b"\x3d\x0a\x00\x03a/b\x00\x0a\x00hi");

        let ack = Ack {
            pkid: 1,
            reason: ReasonCode::Success,
            properties: Properties::default(),
        };
        assert_eq!(bytes(&Packet::PubRel(ack.clone()), V5), [0x62, 2, 0, 1]);
        let with_reason = Ack {
            reason: ReasonCode::PacketIdentifierNotFound,
            ..ack.clone()
        };
        assert_eq!(
            bytes(&Packet::PubComp(with_reason.clone()), V5),
            [0x70, 3, 0, 1, 0x92]
        );
        assert_eq!(bytes(&Packet::PubComp(with_reason), V311), [0x70, 2, 0, 1]);
        let with_properties = Ack {
            properties: Properties {
                reason_string: Some("r".into()),
                ..Properties::default()
            },
            ..ack
        };
        assert_eq!(
            bytes(&Packet::PubAck(with_properties), V5),
            [0x40, 8, 0, 1, 0, 4, 0x1F, 0, 1, b'r']
        );

        let disconnect = Disconnect::default();
        assert_eq!(
            bytes(&Packet::Disconnect(disconnect.clone()), V5),
            [0xE0, 0]
        );
        let d = Disconnect {
            reason: ReasonCode::SessionTakenOver,
            ..disconnect
        };
        assert_eq!(bytes(&Packet::Disconnect(d.clone()), V5), [0xE0, 1, 0x8E]);
        assert_eq!(bytes(&Packet::Disconnect(d), V311), [0xE0, 0]);
        assert_eq!(bytes(&Packet::Auth(Auth::default()), V5), [0xF0, 0]);
        let auth = Auth {
            reason: ReasonCode::ContinueAuthentication,
            properties: Properties::default(),
        };
        assert_eq!(bytes(&Packet::Auth(auth), V5), [0xF0, 2, 0x18, 0]);
        assert_eq!(bytes(&Packet::PingReq, V311), [0xC0, 0]);
        assert_eq!(bytes(&Packet::PingResp, V311), [0xD0, 0]);
        let connack = ConnAck {
            session_present: true,
            code: ReasonCode::Success,
            properties: Properties::default(),
        };
        assert_eq!(
            bytes(&Packet::ConnAck(connack.clone()), V311),
            [0x20, 2, 1, 0]
        );
        assert_eq!(bytes(&Packet::ConnAck(connack), V5), [0x20, 3, 1, 0, 0]);
        let unsuback = UnsubAck {
            pkid: 2,
            codes: vec![ReasonCode::NoSubscriptionExisted],
            properties: Properties::default(),
        };
        assert_eq!(
            bytes(&Packet::UnsubAck(unsuback.clone()), V311),
            [0xB0, 2, 0, 2]
        );
        assert_eq!(
            bytes(&Packet::UnsubAck(unsuback), V5),
            [0xB0, 4, 0, 2, 0, 0x11]
        );
    }

    #[test]
    fn subscribe_options() {
        let sub = Packet::Subscribe(Subscribe {
            pkid: 3,
            filters: vec![SubscribeFilter {
                filter: "f".into(),
                options: SubOptions {
                    qos: QoS::AtLeastOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: 2,
                },
            }],
            properties: Properties::default(),
        });
        assert_eq!(bytes(&sub, V5), [0x82, 7, 0, 3, 0, 0, 1, b'f', 0x2D]);
        // 3.x has the QoS only.
        assert_eq!(bytes(&sub, V311), [0x82, 6, 0, 3, 0, 1, b'f', 0x01]);
    }

    #[test]
    fn unencodable_packets() {
        let long: String = "x".repeat(65_536);
        let publish = |topic: &str, qos, pkid| {
            Packet::Publish(Publish {
                topic: topic.into(),
                qos,
                pkid,
                ..Publish::default()
            })
        };
        fails(&publish(&long, QoS::AtMostOnce, 0), V311);
        fails(&publish("t", QoS::AtLeastOnce, 0), V311);
        fails(&publish("t", QoS::ExactlyOnce, 0), V5);
        let mut c = connect(V5);
        c.client_id = long.as_str().into();
        fails(&Packet::Connect(Box::new(c)), V5);
        for protocol in [V31, V311] {
            let mut c = connect(protocol);
            c.password = Some(Bytes::new());
            fails(&Packet::Connect(Box::new(c)), protocol);
        }
        fails(&Packet::Auth(Auth::default()), V311);
        fails(&Packet::Subscribe(Subscribe::default()), V5);
        fails(
            &Packet::Unsubscribe(Unsubscribe {
                pkid: 1,
                ..Unsubscribe::default()
            }),
            V311,
        );
        fails(
            &Packet::SubAck(SubAck {
                pkid: 1,
                ..SubAck::default()
            }),
            V311,
        );
        fails(
            &Packet::UnsubAck(UnsubAck {
                pkid: 1,
                ..UnsubAck::default()
            }),
            V5,
        );
        fails(&Packet::PubAck(Ack::default()), V311);
        let bad_rh = Subscribe {
            pkid: 1,
            filters: vec![SubscribeFilter {
                filter: "f".into(),
                options: SubOptions {
                    retain_handling: 3,
                    ..SubOptions::default()
                },
            }],
            properties: Properties::default(),
        };
        fails(&Packet::Subscribe(bad_rh), V5);

        // Over the largest remaining length: refused before anything is reserved.
        let payload = vec![0u8; MAX_REMAINING_LENGTH - 2];
        let header = PublishHeader {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: "t",
            pkid: 0,
        };
        let mut out = BytesMut::new();
        assert!(encode_publish(&mut out, V311, &header, None, &payload).is_err());
        assert_eq!(out.capacity(), 0);
    }

    #[test]
    fn encode_publish_matches_encode() {
        let properties = Properties {
            topic_alias: Some(2),
            subscription_identifiers: vec![1, 300],
            user_properties: vec![("a".into(), "b".into())],
            ..Properties::default()
        };
        let p = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "t/1".into(),
            pkid: 77,
            payload: Bytes::from_static(b"payload"),
            properties: Some(Box::new(properties.clone())),
        };
        for protocol in [V31, V311, V5] {
            let header = PublishHeader {
                dup: p.dup,
                qos: p.qos,
                retain: p.retain,
                topic: &p.topic,
                pkid: p.pkid,
            };
            let mut out = BytesMut::new();
            encode_publish(&mut out, protocol, &header, Some(&properties), &p.payload).unwrap();
            assert_eq!(&out[..], bytes(&Packet::Publish(p.clone()), protocol));
            let decoded = decode(&mut out, protocol, 1024).unwrap().unwrap();
            let expected = Publish {
                properties: p.properties.clone().filter(|_| protocol.is_v5()),
                ..p.clone()
            };
            assert_eq!(decoded, Packet::Publish(expected));
        }
    }
}
