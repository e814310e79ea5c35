//! A delivered message as JSON, and the framing around it: one Server-Sent Event, or
//! one element of a poll's JSON array. No I/O.
//!
//! `{"topic", "payload", "encoding", "qos", "retain", "properties"}`: the payload is a
//! string when it is UTF-8 (`"encoding": "utf8"`), base64 otherwise (`"base64"`);
//! `properties` (MQTT 5: content type, response topic, correlation data in base64, user
//! properties as an object, the remaining message expiry) only when the message has any.

use crate::message::Delivery;
use crate::protocol::{ByteStr, Properties};
use base64::Engine;
use bytes::{BufMut, BytesMut};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use std::borrow::Cow;
use std::time::Instant;

#[derive(Serialize)]
struct Event<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    topic: &'a str,
    payload: Cow<'a, str>,
    encoding: &'static str,
    qos: u8,
    retain: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    properties: Option<Props<'a>>,
}

#[derive(Serialize)]
struct Props<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_topic: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    correlation_data: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_format_indicator: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message_expiry_interval: Option<u32>,
    #[serde(skip_serializing_if = "<[_]>::is_empty", serialize_with = "as_object")]
    user_properties: &'a [(ByteStr, ByteStr)],
}

/// User properties as a JSON object (a name given twice appears twice; JSON.parse keeps
/// the last).
fn as_object<S: Serializer>(pairs: &&[(ByteStr, ByteStr)], s: S) -> Result<S::Ok, S::Error> {
    let mut map = s.serialize_map(Some(pairs.len()))?;
    for (k, v) in pairs.iter() {
        map.serialize_entry(&**k, &**v)?;
    }
    map.end()
}

fn props(p: &Properties, expires_at: Option<Instant>, now: Instant) -> Option<Props<'_>> {
    let props = Props {
        content_type: p.content_type.as_deref(),
        response_topic: p.response_topic.as_deref(),
        correlation_data: p.correlation_data.as_ref().map(|c| base64(c)),
        payload_format_indicator: p.payload_format_indicator,
        // What is left of it, as MQTT 5 forwards it [MQTT-3.3.2-6].
        message_expiry_interval: expires_at.map(|t| {
            u32::try_from(t.saturating_duration_since(now).as_secs().max(1)).unwrap_or(u32::MAX)
        }),
        user_properties: &p.user_properties,
    };
    let empty = props.content_type.is_none()
        && props.response_topic.is_none()
        && props.correlation_data.is_none()
        && props.payload_format_indicator.is_none()
        && props.message_expiry_interval.is_none()
        && props.user_properties.is_empty();
    (!empty).then_some(props)
}

fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Appends `delivery` as a JSON object; `seq` is included when given (poll results).
pub fn write_json(d: &Delivery, seq: Option<u64>, now: Instant, out: &mut BytesMut) {
    let m = &d.message;
    let (payload, encoding) = match std::str::from_utf8(&m.payload) {
        Ok(s) => (Cow::Borrowed(s), "utf8"),
        Err(_) => (Cow::Owned(base64(&m.payload)), "base64"),
    };
    let event = Event {
        seq,
        topic: &m.topic,
        payload,
        encoding,
        qos: d.qos as u8,
        retain: d.retain,
        properties: m
            .properties
            .as_deref()
            .and_then(|p| props(p, m.expires_at, now)),
    };
    // Serializing these types into memory cannot fail.
    let _ = serde_json::to_writer(out.writer(), &event);
}

/// Appends one Server-Sent Event: `id:` (for messages that can be acknowledged),
/// `event: message`, and the JSON on one `data:` line (JSON strings escape line breaks).
pub fn write_sse(d: &Delivery, seq: Option<u64>, now: Instant, out: &mut BytesMut) {
    if let Some(seq) = seq {
        out.put_slice(b"id: ");
        out.put_slice(seq.to_string().as_bytes());
        out.put_u8(b'\n');
    }
    out.put_slice(b"event: message\ndata: ");
    write_json(d, None, now, out);
    out.put_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;
    use crate::protocol::QoS;
    use bytes::Bytes;
    use std::sync::Arc;
    use std::time::Duration;

    fn delivery(payload: &'static [u8], props: Option<Properties>, now: Instant) -> Delivery {
        let m = Message::new(
            ByteStr::from("a/\"b\""),
            Bytes::from_static(payload),
            QoS::AtLeastOnce,
            true,
            props.map(Box::new),
            0,
            now,
        );
        Delivery::new(Arc::new(m), QoS::AtLeastOnce, true)
    }

    #[test]
    fn json_of_a_delivery() {
        let now = Instant::now();
        let mut out = BytesMut::new();
        write_json(&delivery(b"hi\n", None, now), Some(4), now, &mut out);
        assert_eq!(
            &out[..],
            br#"{"seq":4,"topic":"a/\"b\"","payload":"hi\n","encoding":"utf8","qos":1,"retain":true}"#
        );
        out.clear();
        let props = Properties {
            content_type: Some("application/octet-stream".into()),
            correlation_data: Some(Bytes::from_static(b"\x01\x02")),
            message_expiry_interval: Some(60),
            user_properties: vec![("k".into(), "v".into()), ("k2".into(), "v2".into())],
            ..Properties::default()
        };
        let d = delivery(b"\xff\x00", Some(props), now);
        write_json(&d, None, now + Duration::from_secs(15), &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["payload"], "/wA=");
        assert_eq!(v["encoding"], "base64");
        assert_eq!(v["properties"]["content_type"], "application/octet-stream");
        assert_eq!(v["properties"]["correlation_data"], "AQI=");
        assert_eq!(v["properties"]["message_expiry_interval"], 45);
        assert_eq!(
            v["properties"]["user_properties"],
            serde_json::json!({"k": "v", "k2": "v2"})
        );
        assert!(v.get("seq").is_none());
    }

    #[test]
    fn sse_framing() {
        let now = Instant::now();
        let mut out = BytesMut::new();
        write_sse(
            &delivery(b"line1\nline2", None, now),
            Some(12),
            now,
            &mut out,
        );
        let text = std::str::from_utf8(&out).unwrap();
        assert!(
            text.starts_with("id: 12\nevent: message\ndata: {"),
            "{text}"
        );
        assert!(text.ends_with("}\n\n"));
        assert_eq!(
            text.matches('\n').count(),
            4,
            "the data stays on one line: {text}"
        );
        out.clear();
        write_sse(&delivery(b"x", None, now), None, now, &mut out);
        assert!(out.starts_with(b"event: message\n"));
    }
}
