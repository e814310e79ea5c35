//! CONNECT → the settings of the connection, or the refusal. Pure: the config, the packet
//! and the clock in, a decision out.

use crate::config::Config;
use crate::message::Message;
use crate::protocol::{
    topic, ByteStr, ConnAck, Connect, Protocol, ReasonCode, Will, MAX_REMAINING_LENGTH,
};
use crate::router::within_levels;
use crate::session::NEVER_EXPIRE;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Instant;

/// What a CONNECT settled, once checked against the config.
#[derive(Debug)]
pub struct Negotiated {
    pub protocol: Protocol,
    pub client_id: ByteStr,
    /// The client sent none and was given `client_id`.
    pub assigned_id: bool,
    pub clean_start: bool,
    /// Seconds; 0 = none.
    pub keep_alive: u16,
    /// 5.0: the keep-alive the client is told to use instead of its own.
    pub server_keep_alive: Option<u16>,
    /// The session expiry the client asked for, and what it gets.
    pub asked_expiry: u32,
    pub expiry: u32,
    pub will: Option<Arc<Message>>,
    /// 5.0 Will Delay Interval, seconds.
    pub will_delay: u32,
    /// 5.0: the client's Receive Maximum, Maximum Packet Size and Topic Alias Maximum.
    pub client_receive_maximum: Option<u16>,
    pub client_max_packet: Option<u32>,
    pub client_topic_alias_max: u16,
    /// 5.0: whether the client wants reason strings, and response information.
    pub problem_info: bool,
    pub response_info: bool,
    pub username: Option<ByteStr>,
    pub password: Option<Bytes>,
    /// 5.0 enhanced authentication: the method and the client's first data.
    pub auth_method: Option<ByteStr>,
    pub auth_data: Option<Bytes>,
}

/// A CONNECT that is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ReasonCode,
    pub why: &'static str,
    /// False when the standard wants the connection closed without a CONNACK.
    pub connack: bool,
}

impl Refusal {
    pub fn new(code: ReasonCode, why: &'static str) -> Refusal {
        Refusal {
            code,
            why,
            connack: true,
        }
    }
}

/// Checks a CONNECT against the config. `assign_id` names a client that sent no id.
pub fn negotiate(
    cfg: &Config,
    connect: Connect,
    assign_id: impl FnOnce() -> ByteStr,
    now: Instant,
) -> Result<Negotiated, Refusal> {
    let mqtt = &cfg.mqtt;
    let protocol = connect.protocol;
    let v5 = protocol.is_v5();
    let props = connect.properties;

    let mut client_id = connect.client_id;
    let assigned_id = client_id.is_empty();
    if assigned_id {
        // 3.1 requires an id; 3.1.1 allows an empty one only with clean session.
        let allowed = mqtt.allow_zero_length_clientid
            && protocol != Protocol::V31
            && (connect.clean_start || v5);
        if !allowed {
            return Err(Refusal::new(
                ReasonCode::ClientIdentifierNotValid,
                "empty client id",
            ));
        }
        client_id = assign_id();
    } else if protocol == Protocol::V31 && client_id.len() > 23 {
        return Err(Refusal::new(
            ReasonCode::ClientIdentifierNotValid,
            "MQTT 3.1 client id longer than 23 characters",
        ));
    } else if client_id.len() > cfg.limits.max_client_id_length {
        return Err(Refusal::new(
            ReasonCode::ClientIdentifierNotValid,
            "client id longer than max_client_id_length",
        ));
    }

    // 3.x clients cannot be told another keep-alive: one that asks for none or more
    // than the maximum is refused, as mosquitto (2.0.12+) does, so that an operator can
    // reap silent connections.
    let limited = mqtt.max_keepalive < u16::MAX;
    let mut keep_alive = connect.keep_alive;
    let too_long = keep_alive == 0 || keep_alive > mqtt.max_keepalive;
    if !v5 && limited && too_long {
        return Err(Refusal::new(
            ReasonCode::ClientIdentifierNotValid,
            "keep-alive 0 or above max_keepalive",
        ));
    }
    let server_keep_alive =
        (v5 && mqtt.max_keepalive > 0 && too_long).then_some(mqtt.max_keepalive);
    if let Some(k) = server_keep_alive {
        keep_alive = k;
    }

    let (will, will_delay) = match connect.will {
        Some(w) => will(cfg, w, v5, now)?,
        None => (None, 0),
    };

    // 3.x: clean session means the session ends with the connection; otherwise it lasts
    // `persistent_client_expiration` (0: until discarded). 5.0: the client says how long,
    // within our maximum.
    let asked_expiry = if v5 {
        props.session_expiry_interval.unwrap_or(0)
    } else if connect.clean_start {
        0
    } else if cfg.session.persistent_client_expiration > 0 {
        cfg.session.persistent_client_expiration
    } else {
        NEVER_EXPIRE
    };
    Ok(Negotiated {
        protocol,
        // Copied out of the read buffer: the session keeps its id for its whole life, and
        // a slice would keep the buffer that held the CONNECT, which a parked connection
        // has given up (40 bytes of shared header and 64 or more of buffer, for ~20).
        client_id: ByteStr::from(&*client_id),
        assigned_id,
        clean_start: connect.clean_start,
        keep_alive,
        server_keep_alive,
        asked_expiry,
        expiry: asked_expiry.min(mqtt.max_session_expiry_interval),
        will,
        will_delay,
        client_receive_maximum: props.receive_maximum,
        client_max_packet: props.maximum_packet_size,
        client_topic_alias_max: props.topic_alias_maximum.unwrap_or(0),
        problem_info: props.request_problem_information != Some(0),
        response_info: props.request_response_information == Some(1),
        username: connect.username,
        password: connect.password,
        auth_method: props.authentication_method,
        auth_data: props.authentication_data,
    })
}

/// The will of a CONNECT as a message to keep, and its delay.
fn will(
    cfg: &Config,
    w: Will,
    v5: bool,
    now: Instant,
) -> Result<(Option<Arc<Message>>, u32), Refusal> {
    let mqtt = &cfg.mqtt;
    if !(topic::valid_topic_name(&w.topic) && within_levels(&w.topic)) {
        // 3.x has no return code for it: a malformed CONNECT [MQTT-3.1.4-1].
        return Err(Refusal {
            code: ReasonCode::TopicNameInvalid,
            why: "invalid will topic",
            connack: v5,
        });
    }
    if w.retain && !mqtt.retain_available {
        return Err(Refusal::new(
            ReasonCode::RetainNotSupported,
            "will needs retain, which is not available",
        ));
    }
    if w.qos > mqtt.max_qos {
        return Err(Refusal::new(
            ReasonCode::QoSNotSupported,
            "will QoS above the server maximum",
        ));
    }
    let size_limit = cfg.limits.message_size_limit;
    if size_limit > 0 && w.payload.len() > size_limit {
        return Err(Refusal::new(
            ReasonCode::PacketTooLarge,
            "will payload larger than message_size_limit",
        ));
    }
    let mut wp = w.properties;
    let delay = wp.will_delay_interval.take().unwrap_or(0);
    let wp = (!wp.is_empty()).then(|| Box::new(wp));
    // A copy, so that the will does not pin the CONNECT's read buffer.
    let will = Message::new(w.topic, w.payload, w.qos, w.retain, wp, 0, now);
    Ok((Some(Arc::new(will.compacted())), delay))
}

impl Negotiated {
    /// The CONNACK accepting this connection, with what a 5.0 client must be told.
    pub fn connack(&self, cfg: &Config, session_present: bool) -> ConnAck {
        let mut ack = ConnAck {
            session_present,
            code: ReasonCode::Success,
            ..ConnAck::default()
        };
        if !self.protocol.is_v5() {
            return ack;
        }
        let mqtt = &cfg.mqtt;
        let p = &mut ack.properties;
        if self.assigned_id {
            p.assigned_client_identifier = Some(self.client_id.clone());
        }
        if self.expiry != self.asked_expiry {
            p.session_expiry_interval = Some(self.expiry);
        }
        p.server_keep_alive = self.server_keep_alive;
        p.receive_maximum = (mqtt.receive_maximum != u16::MAX).then_some(mqtt.receive_maximum);
        p.maximum_packet_size = (mqtt.max_packet_size < MAX_REMAINING_LENGTH + 5)
            .then_some(mqtt.max_packet_size as u32);
        p.topic_alias_maximum = (mqtt.topic_alias_maximum > 0).then_some(mqtt.topic_alias_maximum);
        p.maximum_qos =
            (mqtt.max_qos < crate::protocol::QoS::ExactlyOnce).then_some(mqtt.max_qos as u8);
        p.retain_available = Some(u8::from(mqtt.retain_available));
        p.wildcard_subscription_available = Some(u8::from(mqtt.wildcard_subscription_available));
        p.subscription_identifiers_available =
            Some(u8::from(mqtt.subscription_identifiers_available));
        p.shared_subscription_available = Some(u8::from(mqtt.shared_subscription_available));
        if self.response_info {
            p.response_information = mqtt
                .response_information
                .as_ref()
                .map(|prefix| ByteStr::from(prefix.replace("{client_id}", &self.client_id)));
        }
        ack
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Properties, QoS};

    fn connect(protocol: Protocol, client_id: &str) -> Connect {
        Connect {
            protocol,
            clean_start: true,
            keep_alive: 60,
            client_id: ByteStr::from(client_id),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        }
    }

    fn will(topic: &str) -> Option<Will> {
        Some(Will {
            topic: ByteStr::from(topic),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties::default(),
        })
    }

    fn run(cfg: &Config, c: Connect) -> Result<Negotiated, Refusal> {
        negotiate(cfg, c, || ByteStr::from("auto-1"), Instant::now())
    }

    fn refusal(cfg: &Config, c: Connect) -> (ReasonCode, bool) {
        let r = run(cfg, c).unwrap_err();
        (r.code, r.connack)
    }

    #[test]
    fn client_ids() {
        let cfg = Config::default();
        let n = run(&cfg, connect(Protocol::V311, "")).unwrap();
        assert_eq!((&*n.client_id, n.assigned_id), ("auto-1", true));
        let mut c = connect(Protocol::V311, "");
        c.clean_start = false;
        assert_eq!(
            refusal(&cfg, c),
            (ReasonCode::ClientIdentifierNotValid, true)
        );
        let mut c = connect(Protocol::V5, "");
        c.clean_start = false;
        assert!(run(&cfg, c).is_ok(), "5.0 may resume an assigned id");
        assert_eq!(
            refusal(&cfg, connect(Protocol::V31, &"x".repeat(24))),
            (ReasonCode::ClientIdentifierNotValid, true)
        );
        let mut cfg = Config::default();
        cfg.mqtt.allow_zero_length_clientid = false;
        assert!(run(&cfg, connect(Protocol::V5, "")).is_err());
    }

    #[test]
    fn invalid_will_topic_closes_3x_without_connack() {
        let cfg = Config::default();
        for t in ["", "a/+", "#"] {
            let mut c = connect(Protocol::V311, "c");
            c.will = will(t);
            assert_eq!(
                refusal(&cfg, c),
                (ReasonCode::TopicNameInvalid, false),
                "{t:?}"
            );
            let mut c = connect(Protocol::V5, "c");
            c.will = will(t);
            assert_eq!(
                refusal(&cfg, c),
                (ReasonCode::TopicNameInvalid, true),
                "{t:?}"
            );
        }
    }

    #[test]
    fn will_needing_what_the_server_does_not_offer_is_refused() {
        let mut cfg = Config::default();
        cfg.mqtt.max_qos = QoS::AtMostOnce;
        let mut c = connect(Protocol::V5, "c");
        c.will = will("w");
        assert_eq!(refusal(&cfg, c.clone()).0, ReasonCode::QoSNotSupported);
        cfg.mqtt.max_qos = QoS::ExactlyOnce;
        cfg.mqtt.retain_available = false;
        if let Some(w) = &mut c.will {
            w.retain = true;
        }
        assert_eq!(refusal(&cfg, c).0, ReasonCode::RetainNotSupported);
    }

    #[test]
    fn keep_alive_limit() {
        let mut cfg = Config::default();
        // Without a limit, anything goes, 0 included.
        let mut c = connect(Protocol::V311, "c");
        c.keep_alive = 0;
        assert_eq!(run(&cfg, c.clone()).unwrap().keep_alive, 0);
        cfg.mqtt.max_keepalive = 120;
        assert_eq!(
            refusal(&cfg, c.clone()),
            (ReasonCode::ClientIdentifierNotValid, true)
        );
        c.keep_alive = 121;
        assert!(run(&cfg, c.clone()).is_err());
        c.keep_alive = 120;
        assert_eq!(run(&cfg, c).unwrap().keep_alive, 120);
        // 5.0 is told the limit instead.
        let mut c = connect(Protocol::V5, "c");
        c.keep_alive = 0;
        let n = run(&cfg, c).unwrap();
        assert_eq!((n.keep_alive, n.server_keep_alive), (120, Some(120)));
    }

    #[test]
    fn session_expiry_and_connack() {
        let mut cfg = Config::default();
        cfg.mqtt.max_session_expiry_interval = 100;
        cfg.mqtt.response_information = Some("resp/{client_id}/".into());
        let mut c = connect(Protocol::V5, "dev");
        c.properties.session_expiry_interval = Some(3600);
        c.properties.request_response_information = Some(1);
        let n = run(&cfg, c).unwrap();
        assert_eq!((n.asked_expiry, n.expiry), (3600, 100));
        let ack = n.connack(&cfg, true);
        assert!(ack.session_present);
        assert_eq!(ack.properties.session_expiry_interval, Some(100));
        assert_eq!(
            ack.properties.response_information.as_deref(),
            Some("resp/dev/")
        );
        let mut c = connect(Protocol::V311, "dev");
        c.clean_start = false;
        let n = run(&cfg, c).unwrap();
        assert_eq!(n.expiry, 100, "3.x persistent sessions are capped too");
        assert_eq!(n.connack(&cfg, false), ConnAck::default());
    }

    #[test]
    fn persistent_3x_sessions_expire_after_persistent_client_expiration() {
        let mut cfg = Config::default();
        let mut c = connect(Protocol::V311, "dev");
        c.clean_start = false;
        assert_eq!(
            run(&cfg, c.clone()).unwrap().expiry,
            7 * 24 * 3600,
            "a week by default"
        );
        cfg.session.persistent_client_expiration = 0;
        assert_eq!(run(&cfg, c).unwrap().expiry, NEVER_EXPIRE, "0: never");
    }
}
