//! MQTT 5 properties (section 2.2.2): one field per property, decoded with the checks of
//! the standard and encoded in a fixed order.

use bytes::Bytes;

use super::decode::Reader;
use super::encode::{put_binary, put_string, put_varint, Count, Sink};
use super::{ByteStr, Error, MAX_REMAINING_LENGTH};

/// The properties of one packet (or of a will). Absent properties are `None` or empty.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Properties {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<ByteStr>,
    pub response_topic: Option<ByteStr>,
    pub correlation_data: Option<Bytes>,
    /// Several in a PUBLISH (one per matching subscription), at most one in a SUBSCRIBE.
    pub subscription_identifiers: Vec<u32>,
    pub session_expiry_interval: Option<u32>,
    pub assigned_client_identifier: Option<ByteStr>,
    pub server_keep_alive: Option<u16>,
    pub authentication_method: Option<ByteStr>,
    pub authentication_data: Option<Bytes>,
    pub request_problem_information: Option<u8>,
    pub will_delay_interval: Option<u32>,
    pub request_response_information: Option<u8>,
    pub response_information: Option<ByteStr>,
    pub server_reference: Option<ByteStr>,
    pub reason_string: Option<ByteStr>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub topic_alias: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    /// In the order received; names may repeat.
    pub user_properties: Vec<(ByteStr, ByteStr)>,
    pub maximum_packet_size: Option<u32>,
    pub wildcard_subscription_available: Option<u8>,
    pub subscription_identifiers_available: Option<u8>,
    pub shared_subscription_available: Option<u8>,
}

/// Where a property list sits, which decides the properties it may hold (table 2-4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub(super) enum Context {
    Connect = 1 << 0,
    Will = 1 << 1,
    ConnAck = 1 << 2,
    Publish = 1 << 3,
    /// PUBACK, PUBREC, PUBREL and PUBCOMP.
    Ack = 1 << 4,
    Subscribe = 1 << 5,
    SubAck = 1 << 6,
    Unsubscribe = 1 << 7,
    UnsubAck = 1 << 8,
    Disconnect = 1 << 9,
    Auth = 1 << 10,
    /// A message kept by the store (src/store): the properties of a PUBLISH or of a will.
    Stored = (1 << 1) | (1 << 3),
}

/// The contexts in which property `id` is allowed; 0 for an unknown property.
fn allowed_in(id: u8) -> u16 {
    use Context::*;
    let contexts: &[Context] = match id {
        0x01 | 0x02 | 0x03 | 0x08 | 0x09 => &[Publish, Will],
        0x0B => &[Publish, Subscribe],
        0x11 => &[Connect, ConnAck, Disconnect],
        0x12 | 0x13 | 0x1A | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => &[ConnAck],
        0x15 | 0x16 => &[Connect, ConnAck, Auth],
        0x17 | 0x19 => &[Connect],
        0x18 => &[Will],
        0x1C => &[ConnAck, Disconnect],
        0x1F => &[ConnAck, Ack, SubAck, UnsubAck, Disconnect, Auth],
        0x21 | 0x22 | 0x27 => &[Connect, ConnAck],
        0x23 => &[Publish],
        0x26 => return u16::MAX,
        _ => &[],
    };
    contexts.iter().fold(0, |mask, &c| mask | c as u16)
}

fn set_once<T>(slot: &mut Option<T>, value: T) -> Result<(), Error> {
    if slot.is_some() {
        return Err(Error::Protocol("property included more than once"));
    }
    *slot = Some(value);
    Ok(())
}

fn zero_or_one(v: u8) -> Result<u8, Error> {
    if v > 1 {
        return Err(Error::Protocol("property value must be 0 or 1"));
    }
    Ok(v)
}

fn non_zero<T: Default + PartialEq>(v: T) -> Result<T, Error> {
    if v == T::default() {
        return Err(Error::Protocol("property value must not be 0"));
    }
    Ok(v)
}

impl Properties {
    pub fn is_empty(&self) -> bool {
        // Field by field rather than against a `Properties::default()`, which is large to
        // build, compare and drop: this runs for every PUBLISH decoded. Destructured, so
        // that a new field cannot be forgotten here.
        let Properties {
            payload_format_indicator,
            message_expiry_interval,
            content_type,
            response_topic,
            correlation_data,
            subscription_identifiers,
            session_expiry_interval,
            assigned_client_identifier,
            server_keep_alive,
            authentication_method,
            authentication_data,
            request_problem_information,
            will_delay_interval,
            request_response_information,
            response_information,
            server_reference,
            reason_string,
            receive_maximum,
            topic_alias_maximum,
            topic_alias,
            maximum_qos,
            retain_available,
            user_properties,
            maximum_packet_size,
            wildcard_subscription_available,
            subscription_identifiers_available,
            shared_subscription_available,
        } = self;
        payload_format_indicator.is_none()
            && message_expiry_interval.is_none()
            && content_type.is_none()
            && response_topic.is_none()
            && correlation_data.is_none()
            && subscription_identifiers.is_empty()
            && session_expiry_interval.is_none()
            && assigned_client_identifier.is_none()
            && server_keep_alive.is_none()
            && authentication_method.is_none()
            && authentication_data.is_none()
            && request_problem_information.is_none()
            && will_delay_interval.is_none()
            && request_response_information.is_none()
            && response_information.is_none()
            && server_reference.is_none()
            && reason_string.is_none()
            && receive_maximum.is_none()
            && topic_alias_maximum.is_none()
            && topic_alias.is_none()
            && maximum_qos.is_none()
            && retain_available.is_none()
            && user_properties.is_empty()
            && maximum_packet_size.is_none()
            && wildcard_subscription_available.is_none()
            && subscription_identifiers_available.is_none()
            && shared_subscription_available.is_none()
    }

    /// Reads a property length and the properties it covers, checking each one against
    /// `context` and the value ranges of the standard.
    pub(super) fn decode(r: &mut Reader, context: Context) -> Result<Properties, Error> {
        let len = r.varint()? as usize;
        let mut r = r.take(len)?;
        let mut p = Properties::default();
        while !r.is_empty() {
            let id = r.u8()?;
            let allowed = allowed_in(id);
            if allowed == 0 {
                return Err(Error::Malformed("unknown property"));
            }
            // 2.2.2.2: an identifier not valid for the packet type makes it malformed.
            if allowed & context as u16 == 0 {
                return Err(Error::Malformed("property not allowed in this packet"));
            }
            match id {
                0x01 => set_once(&mut p.payload_format_indicator, zero_or_one(r.u8()?)?)?,
                0x02 => set_once(&mut p.message_expiry_interval, r.u32()?)?,
                0x03 => set_once(&mut p.content_type, r.string()?)?,
                0x08 => set_once(&mut p.response_topic, r.string()?)?,
                0x09 => set_once(&mut p.correlation_data, r.binary()?)?,
                0x0B => {
                    if context == Context::Subscribe && !p.subscription_identifiers.is_empty() {
                        return Err(Error::Protocol("property included more than once"));
                    }
                    let id = non_zero(r.varint()?)?;
                    p.subscription_identifiers.push(id);
                }
                0x11 => set_once(&mut p.session_expiry_interval, r.u32()?)?,
                0x12 => set_once(&mut p.assigned_client_identifier, r.string()?)?,
                0x13 => set_once(&mut p.server_keep_alive, r.u16()?)?,
                0x15 => set_once(&mut p.authentication_method, r.string()?)?,
                0x16 => set_once(&mut p.authentication_data, r.binary()?)?,
                0x17 => set_once(&mut p.request_problem_information, zero_or_one(r.u8()?)?)?,
                0x18 => set_once(&mut p.will_delay_interval, r.u32()?)?,
                0x19 => set_once(&mut p.request_response_information, zero_or_one(r.u8()?)?)?,
                0x1A => set_once(&mut p.response_information, r.string()?)?,
                0x1C => set_once(&mut p.server_reference, r.string()?)?,
                0x1F => set_once(&mut p.reason_string, r.string()?)?,
                0x21 => set_once(&mut p.receive_maximum, non_zero(r.u16()?)?)?,
                0x22 => set_once(&mut p.topic_alias_maximum, r.u16()?)?,
                0x23 => set_once(&mut p.topic_alias, non_zero(r.u16()?)?)?,
                0x24 => set_once(&mut p.maximum_qos, zero_or_one(r.u8()?)?)?,
                0x25 => set_once(&mut p.retain_available, zero_or_one(r.u8()?)?)?,
                0x26 => p.user_properties.push((r.string()?, r.string()?)),
                0x27 => set_once(&mut p.maximum_packet_size, non_zero(r.u32()?)?)?,
                0x28 => set_once(
                    &mut p.wildcard_subscription_available,
                    zero_or_one(r.u8()?)?,
                )?,
                0x29 => set_once(
                    &mut p.subscription_identifiers_available,
                    zero_or_one(r.u8()?)?,
                )?,
                0x2A => set_once(&mut p.shared_subscription_available, zero_or_one(r.u8()?)?)?,
                _ => return Err(Error::Malformed("unknown property")),
            }
        }
        Ok(p)
    }

    /// The stored form of a message's properties (src/store): the property block of a
    /// PUBLISH, length first, so that the store reuses the codec's checks.
    pub(crate) fn encode_stored(&self, out: &mut bytes::BytesMut) -> Result<(), Error> {
        self.encode(out)
    }

    /// Reads what [`Properties::encode_stored`] wrote: the properties of a PUBLISH or a will.
    pub(crate) fn decode_stored(bytes: Bytes) -> Result<Properties, Error> {
        let mut r = Reader::new(bytes);
        let p = Properties::decode(&mut r, Context::Stored)?;
        if !r.is_empty() {
            return Err(Error::Malformed("bytes after the stored properties"));
        }
        Ok(p)
    }

    /// The encoded size of the properties, without the property length in front.
    pub(super) fn encoded_len(&self) -> Result<usize, Error> {
        let mut count = Count(0);
        self.write(&mut count)?;
        Ok(count.0)
    }

    /// Writes the property length and the properties.
    pub(super) fn encode<S: Sink + ?Sized>(&self, s: &mut S) -> Result<(), Error> {
        put_varint(s, self.encoded_len()?)?;
        self.write(s)
    }

    /// Writes the properties (no length). Values are written as given: the encoder does
    /// not police which properties a packet may carry.
    pub(super) fn write<S: Sink + ?Sized>(&self, s: &mut S) -> Result<(), Error> {
        self.write_fields(s, false)
    }

    /// `write`, leaving out the Message Expiry Interval when `skip_expiry`.
    pub(super) fn write_fields<S: Sink + ?Sized>(
        &self,
        s: &mut S,
        skip_expiry: bool,
    ) -> Result<(), Error> {
        fn byte<S: Sink + ?Sized>(s: &mut S, id: u8, v: Option<u8>) {
            if let Some(v) = v {
                s.put(&[id, v]);
            }
        }
        fn two<S: Sink + ?Sized>(s: &mut S, id: u8, v: Option<u16>) {
            if let Some(v) = v {
                s.put(&[id]);
                s.put(&v.to_be_bytes());
            }
        }
        fn four<S: Sink + ?Sized>(s: &mut S, id: u8, v: Option<u32>) {
            if let Some(v) = v {
                s.put(&[id]);
                s.put(&v.to_be_bytes());
            }
        }
        fn string<S: Sink + ?Sized>(s: &mut S, id: u8, v: &Option<ByteStr>) -> Result<(), Error> {
            if let Some(v) = v {
                s.put(&[id]);
                put_string(s, v)?;
            }
            Ok(())
        }
        fn binary<S: Sink + ?Sized>(s: &mut S, id: u8, v: &Option<Bytes>) -> Result<(), Error> {
            if let Some(v) = v {
                s.put(&[id]);
                put_binary(s, v)?;
            }
            Ok(())
        }

        byte(s, 0x01, self.payload_format_indicator);
        if !skip_expiry {
            four(s, 0x02, self.message_expiry_interval);
        }
        string(s, 0x03, &self.content_type)?;
        string(s, 0x08, &self.response_topic)?;
        binary(s, 0x09, &self.correlation_data)?;
        put_subscription_identifiers(s, &self.subscription_identifiers)?;
        four(s, 0x11, self.session_expiry_interval);
        string(s, 0x12, &self.assigned_client_identifier)?;
        two(s, 0x13, self.server_keep_alive);
        string(s, 0x15, &self.authentication_method)?;
        binary(s, 0x16, &self.authentication_data)?;
        byte(s, 0x17, self.request_problem_information);
        four(s, 0x18, self.will_delay_interval);
        byte(s, 0x19, self.request_response_information);
        string(s, 0x1A, &self.response_information)?;
        string(s, 0x1C, &self.server_reference)?;
        string(s, 0x1F, &self.reason_string)?;
        two(s, 0x21, self.receive_maximum);
        two(s, 0x22, self.topic_alias_maximum);
        two(s, 0x23, self.topic_alias);
        byte(s, 0x24, self.maximum_qos);
        byte(s, 0x25, self.retain_available);
        for (name, value) in &self.user_properties {
            s.put(&[0x26]);
            put_string(s, name)?;
            put_string(s, value)?;
        }
        four(s, 0x27, self.maximum_packet_size);
        byte(s, 0x28, self.wildcard_subscription_available);
        byte(s, 0x29, self.subscription_identifiers_available);
        byte(s, 0x2A, self.shared_subscription_available);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{decode, encode, ConnAck, Packet, Protocol};
    use bytes::BytesMut;

    /// Decodes `props` as the properties of a 5.0 CONNACK or of a PUBLISH.
    fn props(byte1: u8, props: &[u8]) -> Result<Properties, Error> {
        let head: &[u8] = if byte1 == 0x20 {
            &[0, 0]
        } else {
            &[0, 1, b't']
        };
        let mut body = head.to_vec();
        body.push(props.len() as u8);
        body.extend_from_slice(props);
        let mut bytes = vec![byte1, body.len() as u8];
        bytes.extend(body);
        match decode(&mut BytesMut::from(&bytes[..]), Protocol::V5, 1024)? {
            Some(Packet::ConnAck(c)) => Ok(c.properties),
            Some(Packet::Publish(p)) => Ok(p.properties.map(|p| *p).unwrap_or_default()),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn connack(p: &[u8]) -> Result<Properties, Error> {
        props(0x20, p)
    }

    fn publish(p: &[u8]) -> Result<Properties, Error> {
        props(0x30, p)
    }

    #[test]
    fn decodes_every_connack_property() {
        let bytes = [
            &[0x11, 0, 0, 1, 0][..],
            &[0x12, 0, 1, b'c'],
            &[0x13, 0, 30],
            &[0x15, 0, 1, b'm'],
            &[0x16, 0, 2, 0, 0xFF],
            &[0x1A, 0, 1, b'i'],
            &[0x1C, 0, 1, b's'],
            &[0x1F, 0, 1, b'r'],
            &[0x21, 0, 5],
            &[0x22, 0, 0],
            &[0x24, 1],
            &[0x25, 0],
            &[0x26, 0, 1, b'k', 0, 1, b'2'],
            &[0x26, 0, 1, b'k', 0, 1, b'1'],
            &[0x27, 0, 0, 1, 0],
            &[0x28, 1],
            &[0x29, 0],
            &[0x2A, 1],
        ]
        .concat();
        let p = connack(&bytes).unwrap();
        let expected = Properties {
            session_expiry_interval: Some(256),
            assigned_client_identifier: Some("c".into()),
            server_keep_alive: Some(30),
            authentication_method: Some("m".into()),
            authentication_data: Some(Bytes::from_static(&[0, 0xFF])),
            response_information: Some("i".into()),
            server_reference: Some("s".into()),
            reason_string: Some("r".into()),
            receive_maximum: Some(5),
            topic_alias_maximum: Some(0),
            maximum_qos: Some(1),
            retain_available: Some(0),
            user_properties: vec![("k".into(), "2".into()), ("k".into(), "1".into())],
            maximum_packet_size: Some(256),
            wildcard_subscription_available: Some(1),
            subscription_identifiers_available: Some(0),
            shared_subscription_available: Some(1),
            ..Properties::default()
        };
        assert_eq!(p, expected);
        // And back: the encoder writes the same properties (in its own order).
        let mut out = BytesMut::new();
        let packet = Packet::ConnAck(ConnAck {
            properties: expected.clone(),
            ..ConnAck::default()
        });
        encode(&packet, Protocol::V5, &mut out).unwrap();
        assert_eq!(decode(&mut out, Protocol::V5, 1024), Ok(Some(packet)));
    }

    #[test]
    fn decodes_every_publish_property() {
        let bytes = [
            &[0x01, 1][..],
            &[0x02, 0, 0, 0, 60],
            &[0x03, 0, 1, b'j'],
            &[0x08, 0, 1, b'r'],
            &[0x09, 0, 1, 0],
            &[0x0B, 0x80, 0x01],
            &[0x0B, 0xFF, 0xFF, 0xFF, 0x7F],
            &[0x23, 0, 3],
        ]
        .concat();
        let p = publish(&bytes).unwrap();
        assert_eq!(p.payload_format_indicator, Some(1));
        assert_eq!(p.message_expiry_interval, Some(60));
        assert_eq!(p.content_type, Some("j".into()));
        assert_eq!(p.response_topic, Some("r".into()));
        assert_eq!(p.correlation_data.as_deref(), Some(&[0][..]));
        assert_eq!(p.subscription_identifiers, [128, 268_435_455]);
        assert_eq!(p.topic_alias, Some(3));
    }

    #[test]
    fn unknown_and_misplaced_properties_are_malformed() {
        for id in [
            0x00, 0x04, 0x0A, 0x10, 0x14, 0x1B, 0x20, 0x2B, 0x7F, 0x80, 0xFF,
        ] {
            assert!(
                matches!(connack(&[id, 0]), Err(Error::Malformed(_))),
                "{id:#x}"
            );
        }
        // Valid properties in the wrong packet.
        for p in [
            &[0x23, 0, 1][..],
            &[0x01, 0],
            &[0x0B, 1],
            &[0x17, 0],
            &[0x18, 0, 0, 0, 0],
        ] {
            assert!(matches!(connack(p), Err(Error::Malformed(_))), "{p:?}");
        }
        for p in [
            &[0x1F, 0, 0][..],
            &[0x11, 0, 0, 0, 0],
            &[0x21, 0, 1],
            &[0x26, 0, 0, 0, 0],
        ] {
            let result = publish(p);
            if p[0] == 0x26 {
                assert!(result.is_ok());
            } else {
                assert!(matches!(result, Err(Error::Malformed(_))), "{p:?}");
            }
        }
    }

    #[test]
    fn repeated_properties_are_protocol_errors() {
        let singles: [&[u8]; 16] = [
            &[0x11, 0, 0, 0, 0],
            &[0x12, 0, 0],
            &[0x13, 0, 0],
            &[0x15, 0, 0],
            &[0x16, 0, 0],
            &[0x1A, 0, 0],
            &[0x1C, 0, 0],
            &[0x1F, 0, 0],
            &[0x21, 0, 1],
            &[0x22, 0, 0],
            &[0x24, 0],
            &[0x25, 0],
            &[0x27, 0, 0, 0, 1],
            &[0x28, 0],
            &[0x29, 0],
            &[0x2A, 0],
        ];
        for p in singles {
            assert!(connack(p).is_ok(), "{p:?}");
            assert!(
                matches!(connack(&[p, p].concat()), Err(Error::Protocol(_))),
                "{p:?}"
            );
        }
        let singles: [&[u8]; 6] = [
            &[0x01, 0],
            &[0x02, 0, 0, 0, 0],
            &[0x03, 0, 0],
            &[0x08, 0, 0],
            &[0x09, 0, 0],
            &[0x23, 0, 1],
        ];
        for p in singles {
            assert!(publish(p).is_ok(), "{p:?}");
            assert!(
                matches!(publish(&[p, p].concat()), Err(Error::Protocol(_))),
                "{p:?}"
            );
        }
        // These two may repeat.
        assert!(publish(&[0x0B, 1, 0x0B, 1]).is_ok());
        assert!(connack(&[0x26, 0, 0, 0, 0, 0x26, 0, 0, 0, 0]).is_ok());
    }

    #[test]
    fn values_out_of_range_are_protocol_errors() {
        let connack_cases: [&[u8]; 9] = [
            &[0x21, 0, 0],
            &[0x27, 0, 0, 0, 0],
            &[0x24, 2],
            &[0x25, 2],
            &[0x28, 2],
            &[0x29, 2],
            &[0x2A, 2],
            &[0x2A, 0xFF],
            &[0x24, 0x80],
        ];
        for p in connack_cases {
            assert!(matches!(connack(p), Err(Error::Protocol(_))), "{p:?}");
        }
        for p in [&[0x01, 2][..], &[0x0B, 0], &[0x23, 0, 0]] {
            assert!(matches!(publish(p), Err(Error::Protocol(_))), "{p:?}");
        }
        // request_* are CONNECT properties.
        for id in [0x17, 0x19] {
            let mut bytes = vec![0x10, 15, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 0];
            bytes.extend_from_slice(&[2, id, 2, 0, 0]);
            let e = decode(&mut BytesMut::from(&bytes[..]), Protocol::V5, 1024);
            assert!(matches!(e, Err(Error::Protocol(_))), "{id:#x}");
            bytes[14] = 1;
            assert!(decode(&mut BytesMut::from(&bytes[..]), Protocol::V5, 1024).is_ok());
        }
    }

    #[test]
    fn truncated_properties_are_malformed() {
        let cases: [&[u8]; 7] = [
            &[0x21, 0],
            &[0x11, 0, 0, 0],
            &[0x1F, 0, 5, b'a'],
            &[0x26, 0, 1, b'k'],
            &[0x1F, 0, 1, 0xFF],
            &[0x1F, 0, 1, 0],
            &[0x16, 0],
        ];
        for p in cases {
            assert!(matches!(connack(p), Err(Error::Malformed(_))), "{p:?}");
        }
        for p in [
            &[0x0B][..],
            &[0x0B, 0x80],
            &[0x0B, 0x80, 0x00],
            &[0x0B, 0x80, 0x80, 0x80, 0x80, 1],
        ] {
            assert!(matches!(publish(p), Err(Error::Malformed(_))), "{p:?}");
        }
        // A property length past the end of the packet.
        let bytes = [0x20, 3, 0, 0, 5];
        let e = decode(&mut BytesMut::from(&bytes[..]), Protocol::V5, 1024);
        assert!(matches!(e, Err(Error::Malformed(_))));
        // A property value running past the property length into what follows.
        let bytes = [0x30, 8, 0, 1, b't', 2, 0x23, 0, 1, b'x'];
        let e = decode(&mut BytesMut::from(&bytes[..]), Protocol::V5, 1024);
        assert!(matches!(e, Err(Error::Malformed(_))));
    }

    #[test]
    fn emptiness() {
        assert!(Properties::default().is_empty());
        for p in [
            Properties {
                topic_alias: Some(1),
                ..Properties::default()
            },
            Properties {
                subscription_identifiers: vec![1],
                ..Properties::default()
            },
            Properties {
                user_properties: vec![("".into(), "".into())],
                ..Properties::default()
            },
        ] {
            assert!(!p.is_empty());
        }
    }

    #[test]
    fn encoding_errors() {
        let long: ByteStr = "x".repeat(65_536).into();
        for p in [
            Properties {
                subscription_identifiers: vec![0],
                ..Properties::default()
            },
            Properties {
                subscription_identifiers: vec![268_435_456],
                ..Properties::default()
            },
            Properties {
                reason_string: Some(long.clone()),
                ..Properties::default()
            },
            Properties {
                user_properties: vec![("k".into(), long.clone())],
                ..Properties::default()
            },
            Properties {
                correlation_data: Some(long.clone().into_bytes()),
                ..Properties::default()
            },
        ] {
            assert!(matches!(p.encoded_len(), Err(Error::Malformed(_))));
        }
        let max: ByteStr = "x".repeat(65_535).into();
        let p = Properties {
            reason_string: Some(max),
            ..Properties::default()
        };
        assert_eq!(p.encoded_len(), Ok(1 + 2 + 65_535));
    }
}

fn put_subscription_identifiers<S: Sink + ?Sized>(s: &mut S, ids: &[u32]) -> Result<(), Error> {
    for &id in ids {
        if id == 0 || id as usize > MAX_REMAINING_LENGTH {
            return Err(Error::Malformed("subscription identifier out of range"));
        }
        s.put(&[0x0B]);
        put_varint(s, id as usize)?;
    }
    Ok(())
}

/// The properties of an outgoing PUBLISH that belong to one receiver, written next to the
/// message's own properties so that these need no copy per receiver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PublishExtra<'a> {
    /// Replaces the message's Message Expiry Interval (what is left of it).
    pub message_expiry: Option<u32>,
    pub topic_alias: Option<u16>,
    pub subscription_identifiers: &'a [u32],
}

impl PublishExtra<'_> {
    pub(super) fn is_empty(&self) -> bool {
        *self == PublishExtra::default()
    }

    /// Writes these and then `props` (no length).
    pub(super) fn write<S: Sink + ?Sized>(
        &self,
        props: Option<&Properties>,
        s: &mut S,
    ) -> Result<(), Error> {
        if let Some(e) = self.message_expiry {
            s.put(&[0x02]);
            s.put(&e.to_be_bytes());
        }
        if let Some(a) = self.topic_alias {
            s.put(&[0x23]);
            s.put(&a.to_be_bytes());
        }
        put_subscription_identifiers(s, self.subscription_identifiers)?;
        match props {
            Some(p) => p.write_fields(s, self.message_expiry.is_some()),
            None => Ok(()),
        }
    }

    pub(super) fn encoded_len(&self, props: Option<&Properties>) -> Result<usize, Error> {
        let mut count = Count(0);
        self.write(props, &mut count)?;
        Ok(count.0)
    }
}
