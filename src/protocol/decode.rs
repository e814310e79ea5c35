//! The decoder: one packet from the front of a buffer, checked strictly against the
//! MQTT 3.1.1 and 5.0 standards, with every string and payload a slice of that buffer.

use bytes::{Buf, Bytes, BytesMut};

use super::properties::Context;
use super::{
    Ack, Auth, ByteStr, ConnAck, Connect, Disconnect, Error, Packet, Properties, Protocol,
    Publish, QoS, SubAck, SubOptions, Subscribe, SubscribeFilter, UnsubAck, Unsubscribe, Will,
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
        _ => Packet::Auth(auth(&mut r)?),
    };
    r.end()?;
    Ok(Some(packet))
}

/// Checks the packet type and the flag bits of the first byte (section 2.1.3).
fn check_fixed_header_flags(byte1: u8, protocol: Protocol) -> Result<(), Error> {
    let flags = byte1 & 0x0F;
    let expected = match byte1 >> 4 {
        0 => return Err(Error::Malformed("reserved packet type 0")),
        15 if !protocol.is_v5() => return Err(Error::Malformed("AUTH packet before MQTT 5")),
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
                return Err(Error::Malformed("variable byte integer not minimally encoded"));
            }
            return Ok(Some((value, i + 1)));
        }
    }
    if b.len() >= 4 {
        return Err(Error::Malformed("variable byte integer longer than 4 bytes"));
    }
    Ok(None)
}

/// A cursor over the body of one complete packet. Running out of bytes means the
/// remaining length was shorter than the content: a malformed packet.
pub(super) struct Reader(Bytes);

impl Reader {
    fn need(&self, n: usize) -> Result<(), Error> {
        if self.0.len() < n {
            return Err(Error::Malformed("remaining length shorter than the content"));
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
        let (value, len) = parse_varint(&self.0)?
            .ok_or(Error::Malformed("remaining length shorter than the content"))?;
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
        ByteStr::from_utf8(bytes).map_err(|_| Error::Malformed("string is not valid UTF-8"))
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
    check_code(code, if v5 { CONNACK_CODES } else { CONNACK_V3_CODES })?;
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
    let properties = v5_properties(r, v5, Context::Publish)?;
    if topic.is_empty() && properties.topic_alias.is_none() {
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
        properties: (!properties.is_empty()).then(|| Box::new(properties)),
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
        ack.reason = r.u8()?;
        check_code(ack.reason, codes)?;
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
fn reason_codes(r: &mut Reader, valid: &[u8]) -> Result<Vec<u8>, Error> {
    let codes = r.rest();
    if codes.is_empty() {
        return Err(Error::Protocol("acknowledgement without a reason code"));
    }
    for &code in codes.iter() {
        check_code(code, valid)?;
    }
    Ok(codes.to_vec())
}

/// In 5.0 a remaining length of 0 means success, and of 1 no properties (3.14.2.2.1).
fn disconnect(r: &mut Reader, v5: bool) -> Result<Disconnect, Error> {
    let mut disconnect = Disconnect::default();
    if v5 && !r.is_empty() {
        disconnect.reason = r.u8()?;
        check_code(disconnect.reason, DISCONNECT_CODES)?;
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
        auth.reason = r.u8()?;
        check_code(auth.reason, AUTH_CODES)?;
        auth.properties = Properties::decode(r, Context::Auth)?;
    }
    Ok(auth)
}

fn check_code(code: u8, valid: &[u8]) -> Result<(), Error> {
    if !valid.contains(&code) {
        return Err(Error::Protocol("invalid reason code"));
    }
    Ok(())
}

// The reason codes each packet may carry (section 2.4 and the packet sections).
const CONNACK_V3_CODES: &[u8] = &[0, 1, 2, 3, 4, 5];
const CONNACK_CODES: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95,
    0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
];
const PUBACK_CODES: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
const PUBREL_CODES: &[u8] = &[0x00, 0x92];
const SUBACK_V3_CODES: &[u8] = &[0x00, 0x01, 0x02, 0x80];
const SUBACK_CODES: &[u8] = &[
    0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
];
const UNSUBACK_CODES: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
const DISCONNECT_CODES: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94,
    0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
];
const AUTH_CODES: &[u8] = &[0x00, 0x18, 0x19];
