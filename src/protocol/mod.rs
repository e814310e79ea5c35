//! MQTT 3.1, 3.1.1 and 5.0 packets: types, a strict decoder and an encoder.
//!
//! Sans-IO: bytes in, packets out. Nothing here knows about sockets or tokio, so the
//! same code serves the broker, the tests and the load generator. Topics and payloads
//! are slices of the read buffer (`Bytes`), never copied.

mod decode;
mod encode;
mod properties;
mod reason;
pub mod topic;

pub use decode::decode;

/// The MQTT 5 reason codes each packet type may carry (checked by `decode`).
pub mod reason_codes {
    pub use super::decode::{
        AUTH_CODES, CONNACK_CODES, DISCONNECT_CODES, PUBACK_CODES, PUBREL_CODES, SUBACK_CODES,
        SUBACK_V3_CODES, UNSUBACK_CODES,
    };
}
pub use encode::{encode, encode_publish, encode_publish_with, PublishHeader};
pub use properties::{Properties, PublishExtra};
pub use reason::ReasonCode;

/// A UTF-8 string that is a slice of a received buffer: decoding a topic costs a
/// reference count, not an allocation.
pub type ByteStr = bytestring::ByteString;

use bytes::Bytes;

/// The largest remaining length a fixed header can express (4 varint bytes).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// Protocol version, from the CONNECT packet's name and level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// MQTT 3.1 (`MQIsdp`, level 3).
    V31,
    /// MQTT 3.1.1 (`MQTT`, level 4).
    V311,
    /// MQTT 5.0 (`MQTT`, level 5).
    V5,
}

impl Protocol {
    pub fn level(self) -> u8 {
        match self {
            Protocol::V31 => 3,
            Protocol::V311 => 4,
            Protocol::V5 => 5,
        }
    }

    pub fn is_v5(self) -> bool {
        self == Protocol::V5
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum QoS {
    #[default]
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// Every packet of MQTT 3.1, 3.1.1 and 5.0, in both directions.
///
/// Fields that exist only in MQTT 5 (properties, reason codes of acks) are ignored when
/// encoding for 3.x and take their defaults when decoding 3.x.
#[derive(Clone, Debug, PartialEq)]
pub enum Packet {
    Connect(Box<Connect>),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(Ack),
    PubRec(Ack),
    PubRel(Ack),
    PubComp(Ack),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Auth),
}

impl Packet {
    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "CONNECT",
            Packet::ConnAck(_) => "CONNACK",
            Packet::Publish(_) => "PUBLISH",
            Packet::PubAck(_) => "PUBACK",
            Packet::PubRec(_) => "PUBREC",
            Packet::PubRel(_) => "PUBREL",
            Packet::PubComp(_) => "PUBCOMP",
            Packet::Subscribe(_) => "SUBSCRIBE",
            Packet::SubAck(_) => "SUBACK",
            Packet::Unsubscribe(_) => "UNSUBSCRIBE",
            Packet::UnsubAck(_) => "UNSUBACK",
            Packet::PingReq => "PINGREQ",
            Packet::PingResp => "PINGRESP",
            Packet::Disconnect(_) => "DISCONNECT",
            Packet::Auth(_) => "AUTH",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Connect {
    pub protocol: Protocol,
    /// Clean Session (3.x) or Clean Start (5.0).
    pub clean_start: bool,
    pub keep_alive: u16,
    /// May be empty: the server then assigns one (or refuses, see the standard).
    pub client_id: ByteStr,
    pub will: Option<Will>,
    pub username: Option<ByteStr>,
    pub password: Option<Bytes>,
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Will {
    pub topic: ByteStr,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Will properties (5.0 only).
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct ConnAck {
    pub session_present: bool,
    /// The 5.0 reason code; in 3.x it travels as its return code (`v3_connack`).
    pub code: ReasonCode,
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// Validated topic name (no wildcards). Empty only in 5.0 with a Topic Alias.
    pub topic: ByteStr,
    /// 0 for QoS 0.
    pub pkid: u16,
    pub payload: Bytes,
    /// 5.0 properties; `None` when there are none (always for 3.x), so that the common
    /// case costs no allocation.
    pub properties: Option<Box<Properties>>,
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP share one shape.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Ack {
    pub pkid: u16,
    /// 5.0 reason code; Success for 3.x.
    pub reason: ReasonCode,
    pub properties: Properties,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SubOptions {
    pub qos: QoS,
    /// 5.0 options; false/false/0 for 3.x.
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SubscribeFilter {
    /// UTF-8 checked; wildcard syntax is checked by the broker (see `topic::valid_filter`),
    /// so that one bad filter is refused in the SUBACK without losing the others.
    pub filter: ByteStr,
    pub options: SubOptions,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Subscribe {
    pub pkid: u16,
    pub filters: Vec<SubscribeFilter>,
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct SubAck {
    pub pkid: u16,
    /// Granted QoS (`ReasonCode::granted`) or failure (0x80, or a 5.0 reason code), one
    /// per filter.
    pub codes: Vec<ReasonCode>,
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Unsubscribe {
    pub pkid: u16,
    pub filters: Vec<ByteStr>,
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct UnsubAck {
    pub pkid: u16,
    /// 5.0 reason codes, one per filter; empty for 3.x.
    pub codes: Vec<ReasonCode>,
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Disconnect {
    /// 5.0 reason code; Success for 3.x.
    pub reason: ReasonCode,
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Auth {
    pub reason: ReasonCode,
    pub properties: Properties,
}

/// Why bytes could not be decoded (or a packet encoded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("packet of {size} bytes exceeds the maximum packet size of {max}")]
    PacketTooLarge { size: usize, max: usize },
    /// CONNECT with a protocol name/level we do not speak: answered with CONNACK 0x01
    /// (3.x) or 0x84 (5.0) before closing.
    #[error("unsupported protocol name {name:?} level {level}")]
    UnsupportedProtocol { name: String, level: u8 },
}

impl Error {
    /// The MQTT 5 reason code for a DISCONNECT (or CONNACK) caused by this error.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            Error::Malformed(_) => ReasonCode::MalformedPacket,
            Error::Protocol(_) => ReasonCode::ProtocolError,
            Error::PacketTooLarge { .. } => ReasonCode::PacketTooLarge,
            Error::UnsupportedProtocol { .. } => ReasonCode::UnsupportedProtocolVersion,
        }
    }
}
