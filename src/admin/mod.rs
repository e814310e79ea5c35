//! What operators read: the admin listener (`[[listeners]] type = "admin"`, HTTP) with
//! `GET /metrics` (Prometheus), the JSON API under `/api/v1/` (`api`) and the web console
//! (`console`), and the `$SYS` topics (`sys`, published into the broker). Every request
//! but the console's own files must carry the listener's token as
//! `Authorization: Bearer <token>`. docs/observability.md documents
//! the endpoints with examples.
//!
//! This module is the HTTP side only: the token check, routing, and the few helpers the
//! handlers share (`Reply`, `Query`); `transport::http` serves its connections, like the
//! http listener's, with the same limits, timeouts and TLS. The handlers read the broker
//! and answer; none of them is on the MQTT hot path.

mod api;
mod console;
pub mod prometheus;
pub mod sys;

use crate::broker::Broker;
use crate::config::ListenerKind;
use crate::conn::Peer;
use crate::listener::ListenerRules;
use crate::transport::http::{Body, Handler};
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use std::net::SocketAddr;
use std::sync::Arc;

/// The largest request body read (`POST /api/v1/publish`).
const MAX_BODY: usize = 1 << 20;

/// What the admin handlers need: the broker, the token, and the MQTT listeners.
pub struct Admin {
    broker: Arc<Broker>,
    token: String,
    /// The MQTT listeners' counts, in the configuration's order.
    listeners: Vec<Arc<ListenerRules>>,
    /// Their kinds and bound addresses, in the same order.
    addrs: Vec<(ListenerKind, SocketAddr)>,
}

impl Admin {
    pub fn new(
        broker: Arc<Broker>,
        token: String,
        listeners: Vec<Arc<ListenerRules>>,
        addrs: Vec<(ListenerKind, SocketAddr)>,
    ) -> Admin {
        Admin {
            broker,
            token,
            listeners,
            addrs,
        }
    }

    /// Answers one request.
    async fn answer(&self, req: Request<Incoming>) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        if let Some(file) = console::file(&path) {
            return match method {
                Method::GET | Method::HEAD => file,
                _ => Reply::error(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
            }
            .into_response();
        }
        if !self.authorized(&req) {
            let mut r = Reply::error(
                StatusCode::UNAUTHORIZED,
                "this endpoint needs the admin token: Authorization: Bearer <token>",
            )
            .into_response();
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
        let query = Query::parse(req.uri().query());
        let body = if method == Method::POST {
            match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    return Reply::error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "the request body is over 1 MiB, or was cut off",
                    )
                    .into_response()
                }
            }
        } else {
            Bytes::new()
        };
        self.route(&method, &path, &query, &body).into_response()
    }

    /// Which handler answers `method path`.
    fn route(&self, method: &Method, path: &str, query: &Query, body: &[u8]) -> Reply {
        let segments: Vec<String> = path
            .trim_start_matches('/')
            .split('/')
            .map(|s| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            })
            .collect();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        let a = api::Api {
            broker: &self.broker,
            listeners: &self.listeners,
            addrs: &self.addrs,
        };
        match (method, &segments[..]) {
            (&Method::GET, ["metrics"]) => {
                Reply::metrics(prometheus::render(&self.broker, &self.listeners))
            }
            (&Method::GET, ["api", "v1", "summary"]) => a.summary(),
            (&Method::GET, ["api", "v1", "clients"]) => a.clients(query),
            (&Method::GET, ["api", "v1", "clients", id]) => a.client(id),
            (&Method::DELETE, ["api", "v1", "clients", id]) => a.disconnect(id),
            (&Method::GET, ["api", "v1", "subscriptions"]) => a.subscriptions(query),
            (&Method::GET, ["api", "v1", "retained"]) => a.retained(query),
            (&Method::DELETE, ["api", "v1", "retained"]) => a.delete_retained(query),
            (&Method::POST, ["api", "v1", "publish"]) => a.publish(body),
            (_, ["metrics"])
            | (
                _,
                ["api", "v1", "summary" | "clients" | "subscriptions" | "retained" | "publish"],
            )
            | (_, ["api", "v1", "clients", _]) => Reply::error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed here (docs/observability.md)",
            ),
            _ => Reply::error(StatusCode::NOT_FOUND, "no such endpoint"),
        }
    }

    /// `Authorization: Bearer <token>`, compared in constant time.
    fn authorized(&self, req: &Request<Incoming>) -> bool {
        use subtle::ConstantTimeEq;
        let Some(given) = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        !self.token.is_empty() && bool::from(given.trim().as_bytes().ct_eq(self.token.as_bytes()))
    }
}

impl Handler for Admin {
    async fn handle(self: Arc<Self>, req: Request<Incoming>, _peer: Peer) -> Response<Body> {
        self.answer(req).await
    }
}

/// An answer: a status, a content type and a body.
pub(crate) struct Reply {
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
}

impl Reply {
    pub(crate) fn json(status: StatusCode, value: &serde_json::Value) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body: Bytes::from(value.to_string()),
        }
    }

    pub(crate) fn ok(value: serde_json::Value) -> Reply {
        Reply::json(StatusCode::OK, &value)
    }

    pub(crate) fn error(status: StatusCode, why: &str) -> Reply {
        Reply::json(status, &serde_json::json!({ "error": why }))
    }

    fn metrics(text: String) -> Reply {
        Reply {
            status: StatusCode::OK,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: Bytes::from(text),
        }
    }

    fn static_file(content_type: &'static str, body: &'static str) -> Reply {
        Reply {
            status: StatusCode::OK,
            content_type,
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    fn into_response(self) -> Response<Body> {
        let mut r = Response::new(Body::full(self.body));
        *r.status_mut() = self.status;
        let headers = r.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        r
    }
}

/// The decoded query string of a request.
pub(crate) struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: Option<&str>) -> Query {
        Query(
            form_urlencoded::parse(query.unwrap_or("").as_bytes())
                .into_owned()
                .collect(),
        )
    }

    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A number parameter: its default when absent, an error naming it when not a number.
    pub(crate) fn number(&self, key: &str, default: usize) -> Result<usize, Reply> {
        match self.get(key) {
            None | Some("") => Ok(default),
            Some(v) => v.parse().map_err(|_| {
                Reply::error(
                    StatusCode::BAD_REQUEST,
                    &format!("`{key}` must be a non-negative integer (got {v:?})"),
                )
            }),
        }
    }
}
