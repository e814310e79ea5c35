//! MQTT 5.0 reason codes (section 2.4), and how a CONNACK refusal reads in 3.x.

/// A reason code. 0x00 is Success, Normal disconnection and Granted QoS 0 alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum ReasonCode {
    #[default]
    Success = 0x00,
    GrantedQoS1 = 0x01,
    GrantedQoS2 = 0x02,
    DisconnectWithWill = 0x04,
    NoMatchingSubscribers = 0x10,
    NoSubscriptionExisted = 0x11,
    ContinueAuthentication = 0x18,
    Reauthenticate = 0x19,
    UnspecifiedError = 0x80,
    MalformedPacket = 0x81,
    ProtocolError = 0x82,
    ImplementationSpecificError = 0x83,
    UnsupportedProtocolVersion = 0x84,
    ClientIdentifierNotValid = 0x85,
    BadUserNameOrPassword = 0x86,
    NotAuthorized = 0x87,
    ServerUnavailable = 0x88,
    ServerBusy = 0x89,
    Banned = 0x8A,
    ServerShuttingDown = 0x8B,
    BadAuthenticationMethod = 0x8C,
    KeepAliveTimeout = 0x8D,
    SessionTakenOver = 0x8E,
    TopicFilterInvalid = 0x8F,
    TopicNameInvalid = 0x90,
    PacketIdentifierInUse = 0x91,
    PacketIdentifierNotFound = 0x92,
    ReceiveMaximumExceeded = 0x93,
    TopicAliasInvalid = 0x94,
    PacketTooLarge = 0x95,
    MessageRateTooHigh = 0x96,
    QuotaExceeded = 0x97,
    AdministrativeAction = 0x98,
    PayloadFormatInvalid = 0x99,
    RetainNotSupported = 0x9A,
    QoSNotSupported = 0x9B,
    UseAnotherServer = 0x9C,
    ServerMoved = 0x9D,
    SharedSubscriptionsNotSupported = 0x9E,
    ConnectionRateExceeded = 0x9F,
    MaximumConnectTime = 0xA0,
    SubscriptionIdentifiersNotSupported = 0xA1,
    WildcardSubscriptionsNotSupported = 0xA2,
}

use ReasonCode as R;

const ALL: [ReasonCode; 43] = [
    R::Success,
    R::GrantedQoS1,
    R::GrantedQoS2,
    R::DisconnectWithWill,
    R::NoMatchingSubscribers,
    R::NoSubscriptionExisted,
    R::ContinueAuthentication,
    R::Reauthenticate,
    R::UnspecifiedError,
    R::MalformedPacket,
    R::ProtocolError,
    R::ImplementationSpecificError,
    R::UnsupportedProtocolVersion,
    R::ClientIdentifierNotValid,
    R::BadUserNameOrPassword,
    R::NotAuthorized,
    R::ServerUnavailable,
    R::ServerBusy,
    R::Banned,
    R::ServerShuttingDown,
    R::BadAuthenticationMethod,
    R::KeepAliveTimeout,
    R::SessionTakenOver,
    R::TopicFilterInvalid,
    R::TopicNameInvalid,
    R::PacketIdentifierInUse,
    R::PacketIdentifierNotFound,
    R::ReceiveMaximumExceeded,
    R::TopicAliasInvalid,
    R::PacketTooLarge,
    R::MessageRateTooHigh,
    R::QuotaExceeded,
    R::AdministrativeAction,
    R::PayloadFormatInvalid,
    R::RetainNotSupported,
    R::QoSNotSupported,
    R::UseAnotherServer,
    R::ServerMoved,
    R::SharedSubscriptionsNotSupported,
    R::ConnectionRateExceeded,
    R::MaximumConnectTime,
    R::SubscriptionIdentifiersNotSupported,
    R::WildcardSubscriptionsNotSupported,
];

impl ReasonCode {
    pub fn from_u8(code: u8) -> Option<ReasonCode> {
        ALL.iter().copied().find(|r| *r as u8 == code)
    }

    /// The granted-QoS code of a SUBACK.
    pub fn granted(qos: super::QoS) -> ReasonCode {
        match qos {
            super::QoS::AtMostOnce => R::Success,
            super::QoS::AtLeastOnce => R::GrantedQoS1,
            super::QoS::ExactlyOnce => R::GrantedQoS2,
        }
    }

    pub fn is_error(self) -> bool {
        self as u8 >= 0x80
    }

    /// The 3.x CONNACK return code for a CONNACK with this reason: 3.x knows only six,
    /// so refusals without their own code read as "not authorized" (what mosquitto
    /// answers for a will it cannot accept) or "server unavailable" (limits, errors).
    pub fn v3_connack(self) -> u8 {
        match self {
            R::Success => 0,
            R::UnsupportedProtocolVersion => 1,
            R::ClientIdentifierNotValid => 2,
            R::BadUserNameOrPassword => 4,
            R::NotAuthorized
            | R::Banned
            | R::BadAuthenticationMethod
            | R::RetainNotSupported
            | R::QoSNotSupported
            | R::TopicNameInvalid
            | R::PayloadFormatInvalid => 5,
            _ => 3,
        }
    }

    /// The reason a 3.x CONNACK return code stands for (the inverse of `v3_connack`).
    pub fn from_v3_connack(code: u8) -> Option<ReasonCode> {
        Some(match code {
            0 => R::Success,
            1 => R::UnsupportedProtocolVersion,
            2 => R::ClientIdentifierNotValid,
            3 => R::ServerUnavailable,
            4 => R::BadUserNameOrPassword,
            5 => R::NotAuthorized,
            _ => return None,
        })
    }
}

impl From<ReasonCode> for u8 {
    fn from(r: ReasonCode) -> u8 {
        r as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_and_unknown_ones_are_refused() {
        for r in ALL {
            assert_eq!(ReasonCode::from_u8(r as u8), Some(r));
        }
        let known = ALL.len();
        let decoded = (0..=255u8).filter_map(ReasonCode::from_u8).count();
        assert_eq!(decoded, known);
        assert_eq!(ReasonCode::from_u8(0x03), None);
    }

    #[test]
    fn v3_connack_mapping_round_trips_the_six_codes() {
        for code in 0..=5 {
            let r = ReasonCode::from_v3_connack(code).unwrap();
            assert_eq!(r.v3_connack(), code);
        }
        assert_eq!(ReasonCode::from_v3_connack(6), None);
        assert_eq!(ReasonCode::QuotaExceeded.v3_connack(), 3);
        assert_eq!(ReasonCode::RetainNotSupported.v3_connack(), 5);
    }
}
