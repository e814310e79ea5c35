//! `POST /publish`: a request → the message to publish, or why not (no I/O). The body is
//! JSON (`{"topic", "payload", "encoding", "qos", "retain", "properties"}`) unless the
//! query names the topic (`?topic=...&qos=1&retain=true`): then the body is the payload,
//! byte for byte.

use super::reply::HttpError;
use super::request::param;
use crate::broker::NoRoom;
use crate::config::Config;
use crate::protocol::{topic, ByteStr, Properties, QoS};
use crate::router::within_levels;
use base64::Engine;
use bytes::Bytes;
use hyper::StatusCode;
use serde::Deserialize;
use std::collections::BTreeMap;

/// A message a request asks to publish, checked against the broker's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishRequest {
    pub topic: ByteStr,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: Option<Box<Properties>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonPublish {
    topic: String,
    #[serde(default)]
    payload: String,
    #[serde(default)]
    encoding: Option<String>,
    #[serde(default)]
    qos: Option<u8>,
    #[serde(default)]
    retain: bool,
    #[serde(default)]
    properties: Option<JsonProps>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonProps {
    content_type: Option<String>,
    response_topic: Option<String>,
    /// base64
    correlation_data: Option<String>,
    payload_format_indicator: Option<u8>,
    message_expiry_interval: Option<u32>,
    #[serde(default)]
    user_properties: BTreeMap<String, String>,
}

fn decode_base64(what: &str, s: &str) -> Result<Bytes, HttpError> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map(Bytes::from)
        .map_err(|_| HttpError::bad_request(format!("{what} is not valid base64")))
}

fn qos(q: u8) -> Result<QoS, HttpError> {
    QoS::from_u8(q).ok_or_else(|| HttpError::bad_request(format!("qos is 0, 1 or 2 (got {q})")))
}

impl PublishRequest {
    /// The JSON form of the body.
    pub fn from_json(body: &[u8]) -> Result<PublishRequest, HttpError> {
        let j: JsonPublish = serde_json::from_slice(body).map_err(|e| {
            HttpError::bad_request(format!("the body is not a publish request: {e}"))
        })?;
        let payload = match j.encoding.as_deref() {
            None | Some("utf8") => Bytes::from(j.payload),
            Some("base64") => decode_base64("payload", &j.payload)?,
            Some(other) => {
                return Err(HttpError::bad_request(format!(
                    "encoding is \"utf8\" or \"base64\" (got {other:?})"
                )))
            }
        };
        let properties = match j.properties {
            None => None,
            Some(p) => {
                let props = Properties {
                    content_type: p.content_type.map(ByteStr::from),
                    response_topic: p.response_topic.map(ByteStr::from),
                    correlation_data: p
                        .correlation_data
                        .map(|c| decode_base64("correlation_data", &c))
                        .transpose()?,
                    payload_format_indicator: p.payload_format_indicator,
                    message_expiry_interval: p.message_expiry_interval,
                    user_properties: p
                        .user_properties
                        .into_iter()
                        .map(|(k, v)| (ByteStr::from(k), ByteStr::from(v)))
                        .collect(),
                    ..Properties::default()
                };
                (props != Properties::default()).then(|| Box::new(props))
            }
        };
        Ok(PublishRequest {
            topic: ByteStr::from(j.topic),
            payload,
            qos: qos(j.qos.unwrap_or(0))?,
            retain: j.retain,
            properties,
        })
    }

    /// The raw form: topic, qos and retain in the query, the body as payload.
    pub fn from_query(
        query: &[(String, String)],
        body: Bytes,
    ) -> Result<PublishRequest, HttpError> {
        let topic = param(query, "topic").unwrap_or_default();
        let q = match param(query, "qos") {
            None => 0,
            Some(v) => v
                .parse::<u8>()
                .map_err(|_| HttpError::bad_request(format!("qos is 0, 1 or 2 (got {v:?})")))?,
        };
        let retain = match param(query, "retain") {
            None | Some("false") | Some("0") => false,
            Some("true") | Some("1") | Some("") => true,
            Some(v) => {
                return Err(HttpError::bad_request(format!(
                    "retain is true or false (got {v:?})"
                )))
            }
        };
        Ok(PublishRequest {
            topic: ByteStr::from(topic),
            payload: body,
            qos: qos(q)?,
            retain,
            properties: None,
        })
    }

    /// What the broker refuses before the ACL: a topic that is not a topic name, a
    /// feature switched off, a payload too large or not the UTF-8 it claims to be.
    pub fn check(&self, config: &Config) -> Result<(), HttpError> {
        let t = &*self.topic;
        if t.is_empty() || !topic::valid_topic_name(t) || !within_levels(t) {
            return Err(HttpError::new(
                StatusCode::BAD_REQUEST,
                "bad_topic",
                format!("{t:?} is not a topic name (not empty, no + or #, at most 200 '/')"),
            ));
        }
        if self.qos > config.mqtt.max_qos {
            return Err(HttpError::bad_request(
                "qos above the server maximum (mqtt.max_qos)",
            ));
        }
        if self.retain && !config.mqtt.retain_available {
            return Err(HttpError::bad_request("retain is not available"));
        }
        let limit = config.limits.message_size_limit;
        if limit > 0 && self.payload.len() > limit {
            return Err(too_large(limit));
        }
        let utf8 = self
            .properties
            .as_ref()
            .is_some_and(|p| p.payload_format_indicator == Some(1));
        if utf8 && std::str::from_utf8(&self.payload).is_err() {
            return Err(HttpError::bad_request(
                "payload_format_indicator says UTF-8 and the payload is not",
            ));
        }
        Ok(())
    }
}

pub fn too_large(limit: usize) -> HttpError {
    HttpError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!("the payload is larger than message_size_limit ({limit} bytes)"),
    )
}

/// A publish the broker has no room to keep (`Broker::no_room`), refused before it is
/// routed, as MQTT publishers get 0x97.
pub fn no_room(full: NoRoom) -> HttpError {
    match full {
        NoRoom::Memory => HttpError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "memory_exhausted",
            full.why(),
        )
        .retry_after(1),
        // No Retry-After: the disk budget frees only as stored queues are delivered.
        NoRoom::Store => HttpError::new(StatusCode::SERVICE_UNAVAILABLE, "store", full.why()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Vec<(String, String)> {
        super::super::request::parse_query(Some(s)).unwrap()
    }

    #[test]
    fn json_and_raw_forms() {
        let r = PublishRequest::from_json(
            br#"{"topic":"a/b","payload":"AAE=","encoding":"base64","qos":1,"retain":true,
                 "properties":{"content_type":"x","user_properties":{"k":"v"}}}"#,
        )
        .unwrap();
        assert_eq!(
            (&*r.topic, &r.payload[..], r.qos, r.retain),
            ("a/b", &[0u8, 1][..], QoS::AtLeastOnce, true)
        );
        let p = r.properties.unwrap();
        assert_eq!(p.content_type.as_deref(), Some("x"));
        assert_eq!(p.user_properties, [("k".into(), "v".into())]);
        let r = PublishRequest::from_json(br#"{"topic":"t","payload":"hi"}"#).unwrap();
        assert_eq!(
            (&r.payload[..], r.qos, r.retain, r.properties),
            (&b"hi"[..], QoS::AtMostOnce, false, None)
        );
        for bad in [
            &br#"{"payload":"x"}"#[..],
            br#"{"topic":"t","qos":3}"#,
            br#"{"topic":"t","encoding":"hex"}"#,
            br#"{"topic":"t","payload":"!","encoding":"base64"}"#,
            br#"{"topic":"t","extra":1}"#,
            b"not json",
        ] {
            assert_eq!(
                PublishRequest::from_json(bad).unwrap_err().status,
                StatusCode::BAD_REQUEST
            );
        }
        let r = PublishRequest::from_query(
            &q("topic=a%2Fb&qos=1&retain=true"),
            Bytes::from_static(b"\xff"),
        )
        .unwrap();
        assert_eq!(
            (&*r.topic, r.qos, r.retain, &r.payload[..]),
            ("a/b", QoS::AtLeastOnce, true, &b"\xff"[..])
        );
        assert!(PublishRequest::from_query(&q("topic=a&retain=maybe"), Bytes::new()).is_err());
    }

    #[test]
    fn checks() {
        let mut config = Config::default();
        config.limits.message_size_limit = 4;
        let req = |t: &str, p: &'static [u8]| PublishRequest {
            topic: t.into(),
            payload: Bytes::from_static(p),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: None,
        };
        assert!(req("a/b", b"1234").check(&config).is_ok());
        for t in ["", "a/+", "a/#"] {
            assert_eq!(req(t, b"x").check(&config).unwrap_err().code, "bad_topic");
        }
        assert_eq!(
            req("a", b"12345").check(&config).unwrap_err().status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        config.mqtt.max_qos = QoS::AtMostOnce;
        assert_eq!(
            req("a", b"1").check(&config).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
        let full = no_room(NoRoom::Memory);
        assert_eq!((full.code, full.retry_after), ("memory_exhausted", Some(1)));
        let full = no_room(NoRoom::Store);
        assert_eq!(
            (full.status, full.code),
            (StatusCode::SERVICE_UNAVAILABLE, "store")
        );
    }
}
