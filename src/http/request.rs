//! The endpoints of the http listener and their parameters, decided from the request
//! line and headers alone (no I/O).

use super::reply::HttpError;
use crate::protocol::{ByteStr, QoS};
use hyper::Method;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Sse,
    Poll,
    Publish,
    /// MQTT over WebSocket at the listener's `path`.
    Upgrade,
    /// A CORS preflight (OPTIONS) of one of the endpoints.
    Preflight,
    NotFound,
    /// A known path with another method; the methods it takes.
    MethodNotAllowed(&'static str),
}

/// Routes a request by method and path. `upgrade`: it asks for a WebSocket.
pub fn route(method: &Method, path: &str, ws_path: &str, upgrade: bool) -> Endpoint {
    let (allowed, endpoint) = match path {
        "/sse" => ("GET, OPTIONS", Endpoint::Sse),
        "/poll" => ("GET, OPTIONS", Endpoint::Poll),
        "/publish" => ("POST, OPTIONS", Endpoint::Publish),
        p if p == ws_path && upgrade && method == Method::GET => return Endpoint::Upgrade,
        _ => return Endpoint::NotFound,
    };
    let get = endpoint != Endpoint::Publish;
    match *method {
        Method::OPTIONS => Endpoint::Preflight,
        Method::GET if get => endpoint,
        Method::POST if !get => endpoint,
        _ => Endpoint::MethodNotAllowed(allowed),
    }
}

/// The query string as decoded `name=value` pairs, in order (names may repeat).
pub fn parse_query(query: Option<&str>) -> Result<Vec<(String, String)>, HttpError> {
    let Some(query) = query else {
        return Ok(Vec::new());
    };
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode(name)?, decode(value)?))
        })
        .collect()
}

/// Percent-decoding of one query component (`+` is a space, as in forms).
fn decode(s: &str) -> Result<String, HttpError> {
    let bad = || HttpError::bad_request(format!("bad percent-encoding in the query: {s:?}"));
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = [bytes.next().ok_or_else(bad)?, bytes.next().ok_or_else(bad)?];
                let hex = std::str::from_utf8(&hex).map_err(|_| bad())?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            }
            b => out.push(b),
        }
    }
    String::from_utf8(out).map_err(|_| HttpError::bad_request("the query is not UTF-8"))
}

/// The first value of `name`.
pub fn param<'a>(query: &'a [(String, String)], name: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

fn number(query: &[(String, String)], name: &str) -> Result<Option<u64>, HttpError> {
    param(query, name)
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                HttpError::bad_request(format!("`{name}` must be a whole number (got {v:?})"))
            })
        })
        .transpose()
}

/// The parameters of `GET /sse` and `GET /poll`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamParams {
    /// Topic filters (`topic`, repeated).
    pub topics: Vec<ByteStr>,
    /// The subscriptions' QoS: 0, or 1 (asked 2 is served as 1: events are acknowledged
    /// in bulk, at least once).
    pub qos: QoS,
    /// Resume this session (or start it); none: a session that ends with the request.
    pub client_id: Option<ByteStr>,
    /// SSE: the last event the client has (the `Last-Event-ID` header wins);
    /// poll: `ack`.
    pub ack: Option<u64>,
    /// Poll: seconds to hold the request when nothing is due.
    pub timeout: Option<u64>,
}

impl StreamParams {
    /// `last_event_id`: the `Last-Event-ID` header, if any (an id that is not a number
    /// came from somewhere else and is ignored).
    pub fn parse(
        query: &[(String, String)],
        last_event_id: Option<&str>,
        max_client_id_length: usize,
    ) -> Result<StreamParams, HttpError> {
        let topics: Vec<ByteStr> = query
            .iter()
            .filter(|(n, _)| n == "topic")
            .map(|(_, v)| ByteStr::from(v.as_str()))
            .collect();
        if topics.is_empty() {
            return Err(HttpError::bad_request(
                "at least one `topic` (a topic filter) is needed",
            ));
        }
        let qos = match number(query, "qos")? {
            None | Some(1) | Some(2) => QoS::AtLeastOnce,
            Some(0) => QoS::AtMostOnce,
            Some(q) => {
                return Err(HttpError::bad_request(format!(
                    "`qos` is 0, 1 or 2 (got {q})"
                )))
            }
        };
        let client_id = match param(query, "client_id") {
            None => None,
            Some("") => return Err(HttpError::bad_request("`client_id` is empty")),
            Some(id) if id.len() > max_client_id_length => {
                return Err(HttpError::bad_request(format!(
                    "`client_id` is longer than {max_client_id_length} bytes"
                )))
            }
            Some(id) => Some(ByteStr::from(id)),
        };
        let header = last_event_id.and_then(|h| h.trim().parse::<u64>().ok());
        let ack = match header {
            Some(id) => Some(id),
            None => match number(query, "ack")? {
                Some(a) => Some(a),
                None => number(query, "last_event_id")?,
            },
        };
        Ok(StreamParams {
            topics,
            qos,
            client_id,
            ack,
            timeout: number(query, "timeout")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Vec<(String, String)> {
        parse_query(Some(s)).unwrap()
    }

    #[test]
    fn routes() {
        let r = |m: Method, p: &str, up: bool| route(&m, p, "/mqtt", up);
        assert_eq!(r(Method::GET, "/sse", false), Endpoint::Sse);
        assert_eq!(r(Method::GET, "/poll", false), Endpoint::Poll);
        assert_eq!(r(Method::POST, "/publish", false), Endpoint::Publish);
        assert_eq!(r(Method::OPTIONS, "/publish", false), Endpoint::Preflight);
        assert_eq!(r(Method::GET, "/mqtt", true), Endpoint::Upgrade);
        assert_eq!(r(Method::GET, "/mqtt", false), Endpoint::NotFound);
        assert_eq!(r(Method::GET, "/", false), Endpoint::NotFound);
        assert_eq!(
            r(Method::GET, "/publish", false),
            Endpoint::MethodNotAllowed("POST, OPTIONS")
        );
        assert_eq!(
            r(Method::POST, "/sse", false),
            Endpoint::MethodNotAllowed("GET, OPTIONS")
        );
    }

    #[test]
    fn query_decoding() {
        assert_eq!(
            q("topic=chat%2F%23&topic=a+b&x"),
            [
                ("topic".into(), "chat/#".into()),
                ("topic".into(), "a b".into()),
                ("x".into(), String::new())
            ]
        );
        assert!(parse_query(Some("topic=%2")).is_err());
        assert!(parse_query(Some("topic=%zz")).is_err());
        assert!(parse_query(Some("topic=%ff")).is_err(), "not UTF-8");
    }

    #[test]
    fn stream_params() {
        let p =
            StreamParams::parse(&q("topic=a/%23&topic=b&client_id=c1&ack=7"), None, 23).unwrap();
        assert_eq!(p.topics, ["a/#", "b"]);
        assert_eq!(
            (p.qos, p.client_id.as_deref(), p.ack),
            (QoS::AtLeastOnce, Some("c1"), Some(7))
        );
        // The header wins over the query (EventSource sends the newer one on reconnect).
        let p = StreamParams::parse(&q("topic=a&last_event_id=3&qos=0"), Some("9"), 23).unwrap();
        assert_eq!((p.ack, p.qos), (Some(9), QoS::AtMostOnce));
        let p = StreamParams::parse(&q("topic=a&last_event_id=3"), Some("x-1"), 23).unwrap();
        assert_eq!(p.ack, Some(3));
        for bad in [
            "",
            "qos=1",
            "topic=a&qos=3",
            "topic=a&client_id=",
            "topic=a&ack=-1",
            "topic=a&timeout=x",
        ] {
            assert!(StreamParams::parse(&q(bad), None, 23).is_err(), "{bad}");
        }
        let long = format!("topic=a&client_id={}", "c".repeat(24));
        assert!(StreamParams::parse(&q(&long), None, 23).is_err());
    }
}
