//! The decoder: one packet from the front of a buffer, checked strictly against the
//! MQTT 3.1.1 and 5.0 standards, with every string and payload a slice of that buffer.

use bytes::{Buf, Bytes, BytesMut};

use super::properties::Context;
use super::{
    Ack, Auth, ByteStr, ConnAck, Connect, Disconnect, Error, Packet, Properties, Protocol, Publish,
    QoS, ReasonCode, SubAck, SubOptions, Subscribe, SubscribeFilter, UnsubAck, Unsubscribe, Will,
};

/// Decodes one packet from the front of `buf` and advances `buf` past it.
///
/// Returns `Ok(None)`, leaving `buf` untouched, while the packet is incomplete. For CONNECT
/// the protocol is read from the packet itself; for the others `protocol` selects the 3.x
/// or the 5.0 layout. `max_packet_size` bounds the whole packet (fixed header included) and
/// is enforced as soon as the fixed header is in, so an oversized packet is refused before
/// it is buffered. After an error the stream cannot be resynchronised: close it.
pub fn decode(
    buf: &mut BytesMut,
    protocol: Protocol,
    max_packet_size: usize,
) -> Result<Option<Packet>, Error> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    // The first byte alone can be garbage: refuse it without waiting for more.
    check_fixed_header_flags(byte1, protocol)?;
    let Some((remaining, len_len)) = parse_varint(&buf[1..])? else {
        return Ok(None);
    };
    let size = 1 + len_len + remaining as usize;
    if size > max_packet_size {
        return Err(Error::PacketTooLarge {
            size,
            max: max_packet_size,
        });
    }
    if buf.len() < size {
        return Ok(None);
    }
    let mut bytes = buf.split_to(size).freeze();
    bytes.advance(1 + len_len);
    let mut r = Reader(bytes);
    let v5 = protocol.is_v5();
    let flags = byte1 & 0x0F;
    let packet = match byte1 >> 4 {
        1 => Packet::Connect(Box::new(connect(&mut r)?)),
        2 => Packet::ConnAck(connack(&mut r, v5)?),
        3 => Packet::Publish(publish(&mut r, flags, v5)?),
        4 => Packet::PubAck(ack(&mut r, v5, PUBACK_CODES)?),
        5 => Packet::PubRec(ack(&mut r, v5, PUBACK_CODES)?),
        6 => Packet::PubRel(ack(&mut r, v5, PUBREL_CODES)?),
        7 => Packet::PubComp(ack(&mut r, v5, PUBREL_CODES)?),
        8 => Packet::Subscribe(subscribe(&mut r, v5)?),
        9 => Packet::SubAck(suback(&mut r, v5)?),
        10 => Packet::Unsubscribe(unsubscribe(&mut r, v5)?),
        11 => Packet::UnsubAck(unsuback(&mut r, v5)?),
        12 => Packet::PingReq,
        13 => Packet::PingResp,
        14 => Packet::Disconnect(disconnect(&mut r, v5)?),
        15 => Packet::Auth(auth(&mut r)?),
        _ => return Err(Error::Malformed("reserved packet type 0")),
    };
    r.end()?;
    Ok(Some(packet))
}

/// Checks the packet type and the flag bits of the first byte (section 2.1.3).
fn check_fixed_header_flags(byte1: u8, protocol: Protocol) -> Result<(), Error> {
    let flags = byte1 & 0x0F;
    let expected = match byte1 >> 4 {
        0 => return Err(Error::Malformed("reserved packet type 0")),
        15 if !protocol.is_v5() => return Err(Error::Malformed("AUTH packet in MQTT 3")),
        3 => {
            let qos = (flags >> 1) & 0b11;
            if qos == 3 {
                return Err(Error::Malformed("PUBLISH with QoS 3"));
            }
            // [MQTT-3.3.1-2], the same in 3.1.1 and 5.0.
            if qos == 0 && flags & 0b1000 != 0 {
                return Err(Error::Malformed("PUBLISH with QoS 0 and DUP set"));
            }
            return Ok(());
        }
        6 | 8 | 10 => 0b0010,
        _ => 0,
    };
    if flags != expected {
        return Err(Error::Malformed("invalid fixed header flags"));
    }
    Ok(())
}

/// Parses a Variable Byte Integer (section 1.5.5) at the start of `b`: its value and size,
/// or `None` if `b` ends first.
fn parse_varint(b: &[u8]) -> Result<Option<(u32, usize)>, Error> {
    let mut value = 0u32;
    for (i, &byte) in b.iter().take(4).enumerate() {
        value |= u32::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            // [MQTT-1.5.5-1]: the minimum number of bytes, so no trailing zero group.
            if i > 0 && byte == 0 {
                return Err(Error::Malformed(
                    "variable byte integer not minimally encoded",
                ));
            }
            return Ok(Some((value, i + 1)));
        }
    }
    if b.len() >= 4 {
        return Err(Error::Malformed(
            "variable byte integer longer than 4 bytes",
        ));
    }
    Ok(None)
}

/// A cursor over the body of one complete packet. Running out of bytes means the
/// remaining length was shorter than the content: a malformed packet.
pub(super) struct Reader(Bytes);

impl Reader {
    pub(super) fn new(bytes: Bytes) -> Reader {
        Reader(bytes)
    }

    fn need(&self, n: usize) -> Result<(), Error> {
        if self.0.len() < n {
            return Err(Error::Malformed(
                "remaining length shorter than the content",
            ));
        }
        Ok(())
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(super) fn u8(&mut self) -> Result<u8, Error> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }

    pub(super) fn u16(&mut self) -> Result<u16, Error> {
        self.need(2)?;
        Ok(self.0.get_u16())
    }

    pub(super) fn u32(&mut self) -> Result<u32, Error> {
        self.need(4)?;
        Ok(self.0.get_u32())
    }

    pub(super) fn varint(&mut self) -> Result<u32, Error> {
        let (value, len) = parse_varint(&self.0)?.ok_or(Error::Malformed(
            "remaining length shorter than the content",
        ))?;
        self.0.advance(len);
        Ok(value)
    }

    /// The next `n` bytes as a reader of their own.
    pub(super) fn take(&mut self, n: usize) -> Result<Reader, Error> {
        self.need(n)?;
        Ok(Reader(self.0.split_to(n)))
    }

    /// Binary Data (section 1.5.6): a two-byte length and that many bytes.
    pub(super) fn binary(&mut self) -> Result<Bytes, Error> {
        let len = self.u16()? as usize;
        self.need(len)?;
        Ok(self.0.split_to(len))
    }

    /// UTF-8 Encoded String (section 1.5.4): valid UTF-8 without U+0000.
    pub(super) fn string(&mut self) -> Result<ByteStr, Error> {
        let bytes = self.binary()?;
        if bytes.contains(&0) {
            return Err(Error::Malformed("string contains U+0000"));
        }
        ByteStr::try_from(bytes).map_err(|_| Error::Malformed("string is not valid UTF-8"))
    }

    fn packet_id(&mut self) -> Result<u16, Error> {
        match self.u16()? {
            0 => Err(Error::Protocol("packet identifier 0")),
            id => Ok(id),
        }
    }

    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.0)
    }

    /// The content must fill the remaining length exactly.
    fn end(&self) -> Result<(), Error> {
        if !self.0.is_empty() {
            return Err(Error::Malformed("remaining length longer than the content"));
        }
        Ok(())
    }
}

fn connect(r: &mut Reader) -> Result<Connect, Error> {
    let name = r.binary()?;
    let level = r.u8()?;
    let protocol = match (&name[..], level) {
        (b"MQIsdp", 3) => Protocol::V31,
        (b"MQTT", 4) => Protocol::V311,
        (b"MQTT", 5) => Protocol::V5,
        _ => {
            return Err(Error::UnsupportedProtocol {
                name: String::from_utf8_lossy(&name).into_owned(),
                level,
            })
        }
    };
    let v5 = protocol.is_v5();
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(Error::Malformed("reserved CONNECT flag set"));
    }
    let keep_alive = r.u16()?;
    let properties = v5_properties(r, v5, Context::Connect)?;
    if properties.authentication_data.is_some() && properties.authentication_method.is_none() {
        return Err(Error::Protocol("authentication data without a method"));
    }
    let client_id = r.string()?;

    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0x20 != 0;
    let will = if flags & 0x04 != 0 {
        let qos = QoS::from_u8(will_qos).ok_or(Error::Malformed("will QoS 3"))?;
        let properties = v5_properties(r, v5, Context::Will)?;
        Some(Will {
            topic: r.string()?,
            payload: r.binary()?,
            qos,
            retain: will_retain,
            properties,
        })
    } else if will_qos != 0 || will_retain {
        return Err(Error::Malformed("will QoS or retain without a will"));
    } else {
        None
    };

    let has_username = flags & 0x80 != 0;
    let has_password = flags & 0x40 != 0;
    // [MQTT-3.1.2-22]; MQTT 5 allows a password alone.
    if has_password && !has_username && !v5 {
        return Err(Error::Malformed("password without a username"));
    }
    let username = has_username.then(|| r.string()).transpose()?;
    let password = has_password.then(|| r.binary()).transpose()?;
    Ok(Connect {
        protocol,
        clean_start: flags & 0x02 != 0,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

/// MQTT 5 properties, or none at all for 3.x.
fn v5_properties(r: &mut Reader, v5: bool, context: Context) -> Result<Properties, Error> {
    if v5 {
        Properties::decode(r, context)
    } else {
        Ok(Properties::default())
    }
}

fn connack(r: &mut Reader, v5: bool) -> Result<ConnAck, Error> {
    let flags = r.u8()?;
    if flags & 0xFE != 0 {
        return Err(Error::Malformed("reserved CONNACK flags set"));
    }
    let code = r.u8()?;
    let code = if v5 {
        check_code(code, CONNACK_CODES)?
    } else {
        ReasonCode::from_v3_connack(code).ok_or(Error::Protocol("invalid return code"))?
    };
    Ok(ConnAck {
        session_present: flags == 1,
        code,
        properties: v5_properties(r, v5, Context::ConnAck)?,
    })
}

fn publish(r: &mut Reader, flags: u8, v5: bool) -> Result<Publish, Error> {
    // The flags were checked with the fixed header: QoS is 0, 1 or 2.
    let qos = QoS::from_u8((flags >> 1) & 0b11).unwrap_or_default();
    let topic = r.string()?;
    let pkid = if qos == QoS::AtMostOnce {
        0
    } else {
        r.packet_id()?
    };
    // 3.x PUBLISHes have no properties: none built to be found empty.
    let properties = match v5 {
        true => Some(Properties::decode(r, Context::Publish)?),
        false => None,
    };
    if topic.is_empty() && properties.as_ref().and_then(|p| p.topic_alias).is_none() {
        return Err(Error::Protocol("empty topic name"));
    }
    if topic.bytes().any(|b| b == b'+' || b == b'#') {
        return Err(Error::Protocol("topic name contains a wildcard"));
    }
    Ok(Publish {
        dup: flags & 0b1000 != 0,
        qos,
        retain: flags & 0b0001 != 0,
        topic,
        pkid,
        payload: r.rest(),
        properties: properties.filter(|p| !p.is_empty()).map(Box::new),
    })
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP. In 5.0 the reason code and the properties may be
/// left out (3.4.2.1): remaining length 2 means success, 3 means no properties.
fn ack(r: &mut Reader, v5: bool, codes: &[u8]) -> Result<Ack, Error> {
    let mut ack = Ack {
        pkid: r.packet_id()?,
        ..Ack::default()
    };
    if v5 && !r.is_empty() {
        ack.reason = check_code(r.u8()?, codes)?;
        if !r.is_empty() {
            ack.properties = Properties::decode(r, Context::Ack)?;
        }
    }
    Ok(ack)
}

fn subscribe(r: &mut Reader, v5: bool) -> Result<Subscribe, Error> {
    let pkid = r.packet_id()?;
    let properties = v5_properties(r, v5, Context::Subscribe)?;
    let reserved = if v5 { 0b1100_0000 } else { 0b1111_1100 };
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.string()?;
        let options = r.u8()?;
        if options & reserved != 0 {
            return Err(Error::Malformed("reserved subscription option bits set"));
        }
        let qos = QoS::from_u8(options & 0b11).ok_or(if v5 {
            Error::Protocol("subscription with QoS 3")
        } else {
            Error::Malformed("subscription with QoS 3")
        })?;
        let retain_handling = (options >> 4) & 0b11;
        if retain_handling == 3 {
            return Err(Error::Protocol("retain handling 3"));
        }
        let no_local = options & 0b0100 != 0;
        if no_local && filter.starts_with("$share/") {
            return Err(Error::Protocol("no local on a shared subscription"));
        }
        filters.push(SubscribeFilter {
            filter,
            options: SubOptions {
                qos,
                no_local,
                retain_as_published: options & 0b1000 != 0,
                retain_handling,
            },
        });
    }
    if filters.is_empty() {
        return Err(Error::Protocol("SUBSCRIBE without a topic filter"));
    }
    Ok(Subscribe {
        pkid,
        filters,
        properties,
    })
}

fn suback(r: &mut Reader, v5: bool) -> Result<SubAck, Error> {
    let pkid = r.packet_id()?;
    let properties = v5_properties(r, v5, Context::SubAck)?;
    let codes = reason_codes(r, if v5 { SUBACK_CODES } else { SUBACK_V3_CODES })?;
    Ok(SubAck {
        pkid,
        codes,
        properties,
    })
}

fn unsubscribe(r: &mut Reader, v5: bool) -> Result<Unsubscribe, Error> {
    let pkid = r.packet_id()?;
    let properties = v5_properties(r, v5, Context::Unsubscribe)?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(r.string()?);
    }
    if filters.is_empty() {
        return Err(Error::Protocol("UNSUBSCRIBE without a topic filter"));
    }
    Ok(Unsubscribe {
        pkid,
        filters,
        properties,
    })
}

fn unsuback(r: &mut Reader, v5: bool) -> Result<UnsubAck, Error> {
    let pkid = r.packet_id()?;
    if !v5 {
        return Ok(UnsubAck {
            pkid,
            ..UnsubAck::default()
        });
    }
    let properties = Properties::decode(r, Context::UnsubAck)?;
    Ok(UnsubAck {
        pkid,
        codes: reason_codes(r, UNSUBACK_CODES)?,
        properties,
    })
}

/// The rest of the packet as one reason code per topic filter: at least one.
fn reason_codes(r: &mut Reader, valid: &[u8]) -> Result<Vec<ReasonCode>, Error> {
    let codes = r.rest();
    if codes.is_empty() {
        return Err(Error::Protocol("acknowledgement without a reason code"));
    }
    codes.iter().map(|&code| check_code(code, valid)).collect()
}

/// In 5.0 a remaining length of 0 means success, and of 1 no properties (3.14.2.2.1).
fn disconnect(r: &mut Reader, v5: bool) -> Result<Disconnect, Error> {
    let mut disconnect = Disconnect::default();
    if v5 && !r.is_empty() {
        disconnect.reason = check_code(r.u8()?, DISCONNECT_CODES)?;
        if !r.is_empty() {
            disconnect.properties = Properties::decode(r, Context::Disconnect)?;
        }
    }
    Ok(disconnect)
}

/// Only a remaining length of 0 may leave out the reason code and the properties
/// (3.15.2.1), so a reason code alone is malformed.
fn auth(r: &mut Reader) -> Result<Auth, Error> {
    let mut auth = Auth::default();
    if !r.is_empty() {
        auth.reason = check_code(r.u8()?, AUTH_CODES)?;
        auth.properties = Properties::decode(r, Context::Auth)?;
    }
    Ok(auth)
}

fn check_code(code: u8, valid: &[u8]) -> Result<ReasonCode, Error> {
    if !valid.contains(&code) {
        return Err(Error::Protocol("invalid reason code"));
    }
    ReasonCode::from_u8(code).ok_or(Error::Protocol("invalid reason code"))
}

/// The reason codes each packet may carry (section 2.4 and the packet sections).
pub const CONNACK_CODES: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97,
    0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
];
pub const PUBACK_CODES: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
pub const PUBREL_CODES: &[u8] = &[0x00, 0x92];
pub const SUBACK_V3_CODES: &[u8] = &[0x00, 0x01, 0x02, 0x80];
pub const SUBACK_CODES: &[u8] = &[
    0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
];
pub const UNSUBACK_CODES: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
pub const DISCONNECT_CODES: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95,
    0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
];
pub const AUTH_CODES: &[u8] = &[0x00, 0x18, 0x19];

#[cfg(test)]
mod tests {
    use super::*;
    use Protocol::{V31, V311, V5};

    fn rc(code: u8) -> ReasonCode {
        ReasonCode::from_u8(code).unwrap()
    }

    /// A packet with a one-byte remaining length.
    fn packet(byte1: u8, body: &[u8]) -> Vec<u8> {
        assert!(body.len() < 128);
        let mut p = vec![byte1, body.len() as u8];
        p.extend_from_slice(body);
        p
    }

    fn dec(bytes: &[u8], protocol: Protocol) -> Result<Option<Packet>, Error> {
        decode(&mut BytesMut::from(bytes), protocol, 1 << 20)
    }

    fn ok(bytes: &[u8], protocol: Protocol) -> Packet {
        let mut buf = BytesMut::from(bytes);
        let packet = decode(&mut buf, protocol, 1 << 20).unwrap().unwrap();
        assert!(buf.is_empty(), "decode must consume the whole packet");
        packet
    }

    fn err(bytes: &[u8], protocol: Protocol) -> Error {
        dec(bytes, protocol).unwrap_err()
    }

    fn is_malformed(e: Error) -> bool {
        matches!(e, Error::Malformed(_))
    }

    fn is_protocol(e: Error) -> bool {
        matches!(e, Error::Protocol(_))
    }

    /// A CONNECT with the given flags and payload after the client id "c".
    fn connect(name: &[u8], level: u8, flags: u8, tail: &[u8]) -> Vec<u8> {
        let mut body = vec![0, name.len() as u8];
        body.extend_from_slice(name);
        body.extend_from_slice(&[level, flags, 0, 60]);
        if level == 5 {
            body.push(0);
        }
        body.extend_from_slice(&[0, 1, b'c']);
        body.extend_from_slice(tail);
        packet(0x10, &body)
    }

    #[test]
    fn incomplete_input_leaves_the_buffer_alone() {
        let full = packet(0x30, &[0, 1, b'a', b'x', b'y']);
        for n in 0..full.len() {
            let mut buf = BytesMut::from(&full[..n]);
            assert_eq!(decode(&mut buf, V311, 1024), Ok(None));
            assert_eq!(&buf[..], &full[..n]);
        }
        // A remaining length still being received.
        assert_eq!(dec(&[0x30, 0x80], V311), Ok(None));
        assert_eq!(dec(&[0x30, 0x80, 0x80, 0x80], V311), Ok(None));
    }

    #[test]
    fn decodes_packets_one_after_another() {
        let mut bytes = packet(0xC0, &[]);
        bytes.extend(packet(0x40, &[0, 7]));
        bytes.extend(packet(0x30, &[0, 1, b'a']));
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(decode(&mut buf, V311, 100), Ok(Some(Packet::PingReq)));
        let ack = Ack {
            pkid: 7,
            ..Ack::default()
        };
        assert_eq!(decode(&mut buf, V311, 100), Ok(Some(Packet::PubAck(ack))));
        assert!(matches!(
            decode(&mut buf, V311, 100),
            Ok(Some(Packet::Publish(_)))
        ));
        assert_eq!(decode(&mut buf, V311, 100), Ok(None));
    }

    #[test]
    fn remaining_length_limits() {
        // A fifth byte of remaining length.
        assert!(is_malformed(err(
            &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
            V311
        )));
        assert!(is_malformed(err(&[0x30, 0x80, 0x80, 0x80, 0x80], V311)));
        // Not the shortest encoding.
        assert!(is_malformed(err(&[0xC0, 0x80, 0x00], V311)));
        assert!(is_malformed(err(&[0x30, 0x81, 0x80, 0x00], V311)));
        // The largest value is fine (and incomplete).
        let mut buf = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F][..]);
        assert_eq!(decode(&mut buf, V311, usize::MAX), Ok(None));
    }

    #[test]
    fn packet_too_large_is_refused_before_the_body_arrives() {
        let mut buf = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F][..]);
        let e = decode(&mut buf, V311, 1 << 20).unwrap_err();
        assert_eq!(
            e,
            Error::PacketTooLarge {
                size: 5 + 268_435_455,
                max: 1 << 20
            }
        );
        // The limit counts the fixed header: 2 + 3 bytes.
        let p = packet(0x30, &[0, 1, b'a']);
        assert!(decode(&mut BytesMut::from(&p[..]), V311, 5)
            .unwrap()
            .is_some());
        let e = decode(&mut BytesMut::from(&p[..2]), V311, 4).unwrap_err();
        assert_eq!(e, Error::PacketTooLarge { size: 5, max: 4 });
    }

    #[test]
    fn packet_types_and_flags() {
        assert!(is_malformed(err(&[0x00, 0x00], V5)));
        assert!(is_malformed(err(&[0x00], V5)));
        for p in [V31, V311] {
            assert!(is_malformed(err(&[0xF0, 0x00], p)));
        }
        assert_eq!(ok(&[0xF0, 0x00], V5), Packet::Auth(Auth::default()));
        // Reserved flags, caught from the first byte alone.
        for byte1 in [
            0x11, 0x21, 0x41, 0x52, 0x60, 0x63, 0x72, 0x80, 0x83, 0x92, 0xA0, 0xB2,
        ] {
            assert!(is_malformed(err(&[byte1], V5)), "{byte1:#x}");
        }
        for byte1 in [0xC1, 0xD8, 0xE2, 0xF1] {
            assert!(is_malformed(err(&[byte1, 0], V5)), "{byte1:#x}");
        }
        // PUBLISH QoS 3, and DUP with QoS 0 ([MQTT-3.3.1-2]).
        for p in [V311, V5] {
            assert!(is_malformed(err(&[0x36], p)));
            assert!(is_malformed(err(&[0x38], p)));
            assert!(is_malformed(err(&[0x39], p)));
        }
    }

    #[test]
    fn remaining_length_must_match_the_content() {
        // Too long: bytes left over.
        let cases: [(&[u8], Protocol); 8] = [
            (&packet(0xC0, &[0]), V311),
            (&packet(0xD0, &[0]), V5),
            (&packet(0x40, &[0, 1, 0]), V311),
            (&packet(0x20, &[0, 0, 0]), V311),
            (&packet(0xE0, &[0]), V311),
            (&packet(0xB0, &[0, 1, 0]), V311),
            (&packet(0x40, &[0, 1, 0, 0, 9]), V5),
            (&connect(b"MQTT", 4, 0x02, &[9]), V311),
        ];
        for (bytes, p) in cases {
            assert!(is_malformed(err(bytes, p)), "{bytes:?}");
        }
        // Too short: the content runs past the end.
        let cases: [(&[u8], Protocol); 8] = [
            (&packet(0x40, &[0]), V311),
            (&packet(0x20, &[0]), V311),
            (&packet(0x20, &[0, 0]), V5),
            (&packet(0x30, &[0, 5, b'a']), V311),
            (&packet(0x32, &[0, 1, b'a', 0]), V311),
            (&packet(0x82, &[0, 1, 0, 1, b'a']), V311),
            (&packet(0x40, &[0, 1, 0, 5, 0x1F]), V5),
            (&connect(b"MQTT", 4, 0xC2, &[0, 1, b'u']), V311),
        ];
        for (bytes, p) in cases {
            assert!(is_malformed(err(bytes, p)), "{bytes:?}");
        }
    }

    #[test]
    fn connect_protocols() {
        for (name, level, protocol) in [
            (&b"MQIsdp"[..], 3, V31),
            (b"MQTT", 4, V311),
            (b"MQTT", 5, V5),
        ] {
            // The protocol argument is ignored for CONNECT.
            let Packet::Connect(c) = ok(&connect(name, level, 0x02, &[]), V311) else {
                panic!("not a CONNECT");
            };
            assert_eq!(c.protocol, protocol);
            assert!(c.clean_start);
            assert_eq!(c.keep_alive, 60);
            assert_eq!(c.client_id, "c");
        }
        for (name, level) in [
            (&b"MQTT"[..], 3),
            (b"MQIsdp", 4),
            (b"MQTT", 6),
            (b"MQTT", 0),
            (b"HTTP", 4),
            (b"\xFF", 4),
        ] {
            assert_eq!(
                err(&connect(name, level, 0x02, &[]), V311),
                Error::UnsupportedProtocol {
                    name: String::from_utf8_lossy(name).into_owned(),
                    level
                }
            );
        }
        // A name or level cut short by the remaining length is malformed, not unsupported.
        assert!(is_malformed(err(
            &packet(0x10, &[0, 4, b'M', b'Q', b'T']),
            V311
        )));
        assert!(is_malformed(err(
            &packet(0x10, &[0, 4, b'H', b'T', b'T', b'P']),
            V311
        )));
    }

    #[test]
    fn connect_flags() {
        // Reserved bit 0.
        assert!(is_malformed(err(&connect(b"MQTT", 4, 0x03, &[]), V311)));
        assert!(is_malformed(err(&connect(b"MQTT", 5, 0x01, &[]), V311)));
        // Will QoS or retain without the will flag, will QoS 3.
        let will = [0, 1, b't', 0, 1, b'p'];
        for flags in [0x08, 0x10, 0x20, 0x18] {
            assert!(is_malformed(err(&connect(b"MQTT", 4, flags, &will), V311)));
        }
        assert!(is_malformed(err(&connect(b"MQTT", 4, 0x1C, &will), V311)));
        let Packet::Connect(c) = ok(&connect(b"MQTT", 4, 0x34, &will), V311) else {
            panic!("not a CONNECT");
        };
        let w = c.will.unwrap();
        assert_eq!(
            (&*w.topic, &w.payload[..], w.qos, w.retain),
            ("t", &b"p"[..], QoS::ExactlyOnce, true)
        );
        // Password without username: malformed in 3.x, fine in 5.0.
        let pass = [0, 2, 0xFF, 0x00];
        assert!(is_malformed(err(&connect(b"MQTT", 4, 0x40, &pass), V311)));
        assert!(is_malformed(err(&connect(b"MQIsdp", 3, 0x40, &pass), V311)));
        let Packet::Connect(c) = ok(&connect(b"MQTT", 5, 0x40, &pass), V311) else {
            panic!("not a CONNECT");
        };
        assert_eq!(
            (c.username, c.password.as_deref()),
            (None, Some(&[0xFF, 0][..]))
        );
        let Packet::Connect(c) = ok(&connect(b"MQTT", 4, 0xC0, &[0, 1, b'u', 0, 0]), V311) else {
            panic!("not a CONNECT");
        };
        assert_eq!(
            (c.username.unwrap(), c.password.unwrap().len()),
            ("u".into(), 0)
        );
    }

    #[test]
    fn connect_v5_properties() {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x06, 0, 0];
        body.extend_from_slice(&[5, 0x11, 0, 0, 0, 9]); // session expiry 9
        body.extend_from_slice(&[0, 0]); // client id ""
        body.extend_from_slice(&[5, 0x18, 0, 0, 0, 3]); // will delay 3
        body.extend_from_slice(&[0, 1, b't', 0, 0]);
        let Packet::Connect(c) = ok(&packet(0x10, &body), V311) else {
            panic!("not a CONNECT");
        };
        assert_eq!(c.properties.session_expiry_interval, Some(9));
        assert_eq!(c.will.unwrap().properties.will_delay_interval, Some(3));
        // A will delay among the CONNECT properties, a session expiry among the will's.
        let mut wrong = body.clone();
        wrong[11] = 0x18;
        assert!(is_malformed(err(&packet(0x10, &wrong), V311)));
        let mut wrong = body.clone();
        wrong[19] = 0x11;
        assert!(is_malformed(err(&packet(0x10, &wrong), V311)));
        // Authentication data without a method.
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 0];
        body.extend_from_slice(&[4, 0x16, 0, 1, 7, 0, 0]);
        assert!(is_protocol(err(&packet(0x10, &body), V311)));
    }

    #[test]
    fn strings_must_be_utf8_without_nul() {
        for client_id in [&[0xC3, 0x28][..], &[0xED, 0xA0, 0x80], &[b'a', 0], &[0xFF]] {
            let mut body = vec![
                0,
                4,
                b'M',
                b'Q',
                b'T',
                b'T',
                4,
                0x02,
                0,
                0,
                0,
                client_id.len() as u8,
            ];
            body.extend_from_slice(client_id);
            assert!(
                is_malformed(err(&packet(0x10, &body), V311)),
                "{client_id:?}"
            );
        }
        assert!(is_malformed(err(&packet(0x30, &[0, 2, b'a', 0]), V311)));
        assert!(is_malformed(err(&packet(0x30, &[0, 1, 0x80]), V311)));
        assert!(is_malformed(err(&packet(0x82, &[0, 1, 0, 1, 0, 0]), V311)));
        assert!(is_malformed(err(&packet(0xA2, &[0, 1, 0, 1, 0xC0]), V311)));
    }

    #[test]
    fn publish() {
        let bytes = packet(0x3B, &[0, 3, b'a', b'/', b'b', 0, 9, b'h', b'i']);
        let buf = BytesMut::from(&bytes[..]);
        let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
        let mut buf = buf;
        let Some(Packet::Publish(p)) = decode(&mut buf, V311, 100).unwrap() else {
            panic!("not a PUBLISH");
        };
        assert_eq!(
            (p.dup, p.qos, p.retain, &*p.topic, p.pkid, &p.payload[..]),
            (true, QoS::AtLeastOnce, true, "a/b", 9, &b"hi"[..])
        );
        assert_eq!(p.properties, None);
        // Zero-copy: topic and payload point into the received buffer.
        assert!(range.contains(&(p.topic.as_ptr() as usize)));
        assert!(range.contains(&(p.payload.as_ptr() as usize)));

        for p in [V311, V5] {
            let tail: &[u8] = if p == V5 { &[0] } else { &[] };
            let with = |body: &[u8]| [body, tail].concat();
            assert!(is_protocol(err(&packet(0x30, &with(&[0, 1, b'+'])), p)));
            assert!(is_protocol(err(
                &packet(0x30, &with(&[0, 3, b'a', b'/', b'#'])),
                p
            )));
            assert!(is_protocol(err(&packet(0x30, &with(&[0, 0])), p)));
            assert!(is_protocol(err(
                &packet(0x32, &with(&[0, 1, b'a', 0, 0])),
                p
            )));
            assert!(is_protocol(err(
                &packet(0x34, &with(&[0, 1, b'a', 0, 0])),
                p
            )));
        }
        // 5.0: an empty topic with a topic alias, and a topic alias of 0.
        let Packet::Publish(p) = ok(&packet(0x30, &[0, 0, 3, 0x23, 0, 4, b'x']), V5) else {
            panic!("not a PUBLISH");
        };
        assert_eq!(
            (&*p.topic, p.properties.unwrap().topic_alias),
            ("", Some(4))
        );
        assert!(is_protocol(err(&packet(0x30, &[0, 0, 3, 0x23, 0, 0]), V5)));
        // QoS 0 has no packet identifier: everything after the topic is payload.
        let Packet::Publish(p) = ok(&packet(0x30, &[0, 1, b'a', 0, 0]), V311) else {
            panic!("not a PUBLISH");
        };
        assert_eq!((p.pkid, &p.payload[..]), (0, &[0, 0][..]));
    }

    #[test]
    fn acks() {
        for byte1 in [0x40, 0x50, 0x62, 0x70] {
            for p in [V311, V5] {
                assert!(is_protocol(err(&packet(byte1, &[0, 0]), p)));
                assert!(is_malformed(err(&packet(byte1, &[0]), p)));
            }
            assert!(is_malformed(err(&packet(byte1, &[0, 1, 0]), V311)));
            let (Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a)) =
                ok(&packet(byte1, &[0, 1]), V5)
            else {
                panic!("not an ack");
            };
            assert_eq!(
                a,
                Ack {
                    pkid: 1,
                    ..Ack::default()
                }
            );
        }
        let Packet::PubAck(a) = ok(&packet(0x40, &[1, 0, 0x10]), V5) else {
            panic!("not a PUBACK");
        };
        assert_eq!((a.pkid, a.reason), (256, rc(0x10)));
        let Packet::PubRec(a) = ok(&packet(0x50, &[0, 1, 0x80, 3, 0x1F, 0, 0]), V5) else {
            panic!("not a PUBREC");
        };
        assert_eq!(
            (a.reason, a.properties.reason_string),
            (rc(0x80), Some("".into()))
        );
        // Reason codes of another packet.
        assert!(is_protocol(err(&packet(0x40, &[0, 1, 0x92]), V5)));
        assert!(is_protocol(err(&packet(0x62, &[0, 1, 0x10]), V5)));
        assert!(is_protocol(err(&packet(0x70, &[0, 1, 0x01]), V5)));
    }

    #[test]
    fn subscribe() {
        let Packet::Subscribe(s) = ok(&packet(0x82, &[0, 5, 0, 3, b'a', b'/', b'#', 2]), V311)
        else {
            panic!("not a SUBSCRIBE");
        };
        assert_eq!((s.pkid, s.filters.len()), (5, 1));
        assert_eq!(s.filters[0].filter, "a/#");
        assert_eq!(s.filters[0].options.qos, QoS::ExactlyOnce);
        // Filter syntax is the broker's business.
        assert!(ok(&packet(0x82, &[0, 5, 0, 3, b'#', b'/', b'a', 0]), V311) != Packet::PingReq);
        assert!(ok(&packet(0x82, &[0, 5, 0, 0, 0]), V311) != Packet::PingReq);

        assert!(is_protocol(err(&packet(0x82, &[0, 5]), V311)));
        assert!(is_protocol(err(&packet(0x82, &[0, 5, 0]), V5)));
        assert!(is_protocol(err(
            &packet(0x82, &[0, 0, 0, 1, b'a', 0]),
            V311
        )));
        for options in [3, 4, 0x80, 0x40] {
            let e = err(&packet(0x82, &[0, 5, 0, 1, b'a', options]), V311);
            assert!(is_malformed(e), "{options:#x}");
        }
        let sub = |options| packet(0x82, &[0, 5, 0, 0, 1, b'a', options]);
        assert!(is_malformed(err(&sub(0x40), V5)));
        assert!(is_malformed(err(&sub(0x80), V5)));
        assert!(is_protocol(err(&sub(0x03), V5)));
        assert!(is_protocol(err(&sub(0x30), V5)));
        let Packet::Subscribe(s) = ok(&sub(0x2D), V5) else {
            panic!("not a SUBSCRIBE");
        };
        let o = s.filters[0].options;
        assert_eq!(
            (o.qos, o.no_local, o.retain_as_published, o.retain_handling),
            (QoS::AtLeastOnce, true, true, 2)
        );
        // No Local on a shared subscription.
        let mut body = vec![0, 5, 0, 0, 11];
        body.extend_from_slice(b"$share/g/ab");
        body.push(0x04);
        assert!(is_protocol(err(&packet(0x82, &body), V5)));
        // One subscription identifier at most, and not 0.
        let Packet::Subscribe(s) = ok(&packet(0x82, &[0, 5, 2, 0x0B, 0x7F, 0, 1, b'a', 0]), V5)
        else {
            panic!("not a SUBSCRIBE");
        };
        assert_eq!(s.properties.subscription_identifiers, [127]);
        let twice = [0, 5, 4, 0x0B, 1, 0x0B, 2, 0, 1, b'a', 0];
        assert!(is_protocol(err(&packet(0x82, &twice), V5)));
        assert!(is_protocol(err(
            &packet(0x82, &[0, 5, 2, 0x0B, 0, 0, 1, b'a', 0]),
            V5
        )));
    }

    #[test]
    fn suback_unsubscribe_unsuback() {
        let Packet::SubAck(s) = ok(&packet(0x90, &[0, 5, 0, 1, 2, 0x80]), V311) else {
            panic!("not a SUBACK");
        };
        assert_eq!(s.codes, [rc(0), rc(1), rc(2), rc(0x80)]);
        assert!(is_protocol(err(&packet(0x90, &[0, 5]), V311)));
        assert!(is_protocol(err(&packet(0x90, &[0, 5, 3]), V311)));
        assert!(is_protocol(err(&packet(0x90, &[0, 5, 0x8F]), V311)));
        assert!(is_protocol(err(&packet(0x90, &[0, 5, 0]), V5)));
        assert!(is_protocol(err(&packet(0x90, &[0, 5, 0, 0x84]), V5)));
        assert!(is_protocol(err(&packet(0x90, &[0, 0, 0, 0]), V5)));
        let Packet::SubAck(s) = ok(&packet(0x90, &[0, 5, 0, 0x8F, 0xA2]), V5) else {
            panic!("not a SUBACK");
        };
        assert_eq!(s.codes, [rc(0x8F), rc(0xA2)]);

        let Packet::Unsubscribe(u) = ok(&packet(0xA2, &[0, 5, 0, 1, b'a', 0, 0]), V311) else {
            panic!("not an UNSUBSCRIBE");
        };
        assert_eq!(u.filters, ["a", ""]);
        assert!(is_protocol(err(&packet(0xA2, &[0, 5]), V311)));
        assert!(is_protocol(err(&packet(0xA2, &[0, 5, 0]), V5)));
        assert!(is_protocol(err(&packet(0xA2, &[0, 0, 0, 1, b'a']), V311)));

        assert_eq!(
            ok(&packet(0xB0, &[0, 5]), V311),
            Packet::UnsubAck(UnsubAck {
                pkid: 5,
                ..UnsubAck::default()
            })
        );
        assert!(is_protocol(err(&packet(0xB0, &[0, 0]), V311)));
        assert!(is_malformed(err(&packet(0xB0, &[0, 5]), V5)));
        assert!(is_protocol(err(&packet(0xB0, &[0, 5, 0]), V5)));
        assert!(is_protocol(err(&packet(0xB0, &[0, 5, 0, 0x10]), V5)));
        let Packet::UnsubAck(u) = ok(&packet(0xB0, &[0, 5, 0, 0x11, 0]), V5) else {
            panic!("not an UNSUBACK");
        };
        assert_eq!(u.codes, [rc(0x11), rc(0)]);
    }

    #[test]
    fn connack() {
        assert_eq!(
            ok(&packet(0x20, &[1, 5]), V311),
            Packet::ConnAck(ConnAck {
                session_present: true,
                code: rc(0x87),
                ..ConnAck::default()
            })
        );
        assert!(is_malformed(err(&packet(0x20, &[2, 0]), V311)));
        assert!(is_malformed(err(&packet(0x20, &[0x80, 0, 0]), V5)));
        assert!(is_protocol(err(&packet(0x20, &[0, 6]), V311)));
        assert!(is_protocol(err(&packet(0x20, &[0, 1, 0]), V5)));
        let Packet::ConnAck(c) = ok(&packet(0x20, &[0, 0x84, 3, 0x21, 0, 10]), V5) else {
            panic!("not a CONNACK");
        };
        assert_eq!((c.code, c.properties.receive_maximum), (rc(0x84), Some(10)));
    }

    #[test]
    fn ping_disconnect_auth() {
        assert_eq!(ok(&[0xC0, 0], V311), Packet::PingReq);
        assert_eq!(ok(&[0xD0, 0], V5), Packet::PingResp);
        assert_eq!(
            ok(&[0xE0, 0], V311),
            Packet::Disconnect(Disconnect::default())
        );
        assert_eq!(
            ok(&[0xE0, 0], V5),
            Packet::Disconnect(Disconnect::default())
        );
        let Packet::Disconnect(d) = ok(&packet(0xE0, &[0x04]), V5) else {
            panic!("not a DISCONNECT");
        };
        assert_eq!(d.reason, rc(0x04));
        let Packet::Disconnect(d) = ok(&packet(0xE0, &[0x8E, 5, 0x11, 0, 0, 0, 1]), V5) else {
            panic!("not a DISCONNECT");
        };
        assert_eq!(
            (d.reason, d.properties.session_expiry_interval),
            (rc(0x8E), Some(1))
        );
        assert!(is_protocol(err(&packet(0xE0, &[0x01]), V5)));
        assert!(is_malformed(err(&packet(0xE0, &[0x00, 0]), V311)));

        let Packet::Auth(a) = ok(&packet(0xF0, &[0x18, 4, 0x15, 0, 1, b'm']), V5) else {
            panic!("not an AUTH");
        };
        assert_eq!(a.reason, rc(0x18));
        // A reason code alone is malformed in AUTH; reason codes are checked.
        assert!(is_malformed(err(&packet(0xF0, &[0x18]), V5)));
        assert!(is_protocol(err(&packet(0xF0, &[0x04, 0]), V5)));
        assert!(is_malformed(err(&packet(0xF0, &[0x18, 2, 0x11, 0]), V5)));
    }
}
