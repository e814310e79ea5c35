//! The async edge of the http listener: each request is routed, checked against the
//! CORS allow-list, authenticated (password hashing off the runtime, with the same
//! backoff as MQTT logins), then served: an SSE body that waits for the session's
//! wake-ups, a poll held until something is due, or a publish routed into the broker.

use super::cors;
use super::credentials::{self, Credentials};
use super::publish::{self, PublishRequest};
use super::reply::{json, Body, HttpError};
use super::request::{param, parse_query, route, Endpoint, StreamParams};
use super::stream::{Format, Gone, Subscriber};
use crate::broker::Broker;
use crate::clock::now;
use crate::config::{HttpSettings, Listener};
use crate::conn::login::{self, Login};
use crate::conn::{assign_client_id, Peer};
use crate::message::Message;
use crate::metrics::{self, Dropped, Tally};
use crate::protocol::{ByteStr, QoS};
use crate::security::acl::Access;
use crate::security::AuthResult;
use crate::throttle::Throttle;
use crate::transport::http::Handler;
use crate::transport::ws;
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::Stream;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// An SSE chunk or a poll answer stops growing past this (more follows in the next
/// chunk, or the next poll): with hyper's write buffer of the same size, what a slow
/// reader costs beyond its session queue.
pub const HIGH_WATER: usize = 64 * 1024;
/// Seconds a poll is held when it names no `timeout`.
const DEFAULT_POLL_TIMEOUT: u64 = 30;
/// Publish rate limits remembered at most (by username, or address when anonymous).
const MAX_THROTTLED: usize = 10_000;

/// The http listener's request handler.
pub struct HttpService {
    broker: Arc<Broker>,
    settings: HttpSettings,
    ws_path: String,
    ws: ws::Policy,
    throttles: Mutex<FxHashMap<String, Throttle>>,
}

impl Handler for HttpService {
    async fn handle(self: Arc<Self>, req: Request<Incoming>, peer: Peer) -> Response<Body> {
        self.dispatch(req, peer).await
    }
}

impl HttpService {
    pub fn new(broker: &Arc<Broker>, listener: &Listener) -> HttpService {
        HttpService {
            broker: broker.clone(),
            settings: listener.http.clone(),
            ws_path: listener.ws_path().to_owned(),
            ws: ws::Policy::new(listener),
            throttles: Mutex::new(FxHashMap::default()),
        }
    }

    async fn dispatch(&self, req: Request<Incoming>, peer: Peer) -> Response<Body> {
        let upgrade = req
            .headers()
            .get(header::UPGRADE)
            .is_some_and(|u| u.as_bytes().eq_ignore_ascii_case(b"websocket"));
        let path = req.uri().path();
        let endpoint = route(req.method(), path, &self.ws_path, upgrade);
        if endpoint == Endpoint::Upgrade {
            return ws::upgrade(self.broker.clone(), req, peer, &self.ws);
        }
        let origin = match cors::check(
            req.headers().get(header::ORIGIN),
            &self.settings.cors_origins,
        ) {
            Ok(origin) => origin,
            Err(e) => {
                info!(peer = %peer.addr, "HTTP request refused: {}", e.message);
                return e.into_response();
            }
        };
        let result = match endpoint {
            Endpoint::Preflight => {
                let methods = if path == "/publish" {
                    "POST, OPTIONS"
                } else {
                    "GET, OPTIONS"
                };
                return cors::preflight(&origin, methods);
            }
            Endpoint::Sse => self.sse(&req, &peer).await,
            Endpoint::Poll => self.poll(&req, &peer).await,
            Endpoint::Publish => self.publish(req, &peer).await,
            Endpoint::MethodNotAllowed(allowed) => Err(HttpError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("use {allowed}"),
            )),
            Endpoint::NotFound | Endpoint::Upgrade => Err(HttpError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "no endpoint at {path}: /sse, /poll, /publish, or {} (MQTT over WebSocket)",
                    self.ws_path
                ),
            )),
        };
        let mut resp = result.unwrap_or_else(|e| {
            debug!(peer = %peer.addr, status = e.status.as_u16(), "HTTP request refused: {}", e.message);
            e.into_response()
        });
        if let Endpoint::MethodNotAllowed(allowed) = endpoint {
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allowed));
        }
        cors::apply(&origin, resp.headers_mut());
        resp
    }

    /// Who the request is, and what it may do: its credentials checked as an MQTT
    /// CONNECT's are (a certificate on a listener that takes it as username).
    async fn login(
        &self,
        headers: &HeaderMap,
        query: &[(String, String)],
        client_id: &str,
        peer: &Peer,
    ) -> Result<Login, HttpError> {
        let unauthorized =
            |why: &str| HttpError::new(StatusCode::UNAUTHORIZED, "unauthorized", why);
        if peer.listener.identity_as_username {
            return match &peer.tls_identity {
                Some(name) => Ok(Login::named(
                    &self.broker.security,
                    Some(name.clone()),
                    client_id,
                )),
                None => Err(unauthorized("no identity in the client certificate")),
            };
        }
        let creds = credentials::from_request(
            headers
                .get(header::AUTHORIZATION)
                .map(HeaderValue::as_bytes),
            param(query, "access_token"),
        )?;
        let broker = &self.broker;
        let ip = peer.addr.ip();
        if let Some(delay) = broker.backoff.delay_for(ip, now()) {
            tokio::time::sleep(delay).await;
        }
        let result = if creds == Credentials::None {
            broker.security.authenticate(None, None, client_id)
        } else {
            let (security, creds, id) =
                (broker.security.clone(), creds.clone(), client_id.to_owned());
            let check = move || {
                let (user, password) = creds.as_login();
                security.authenticate(user, password, &id)
            };
            broker.password_check(check).await.ok_or_else(|| {
                HttpError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "authentication failed to run",
                )
            })?
        };
        match &result {
            AuthResult::Denied(why) => {
                info!(peer = %peer.addr, "HTTP authentication failed: {why}");
                metrics::auth_failure();
                broker.backoff.failure(ip, now());
            }
            AuthResult::Authenticated(_) => broker.backoff.success(ip),
            // A token nobody can check is not a login (MQTT would take it as a password
            // without username, i.e. anonymous; an HTTP client asked to be someone).
            AuthResult::Anonymous(_) if matches!(creds, Credentials::Token(_)) => {
                return Err(unauthorized("the token is not valid here"));
            }
            AuthResult::Anonymous(_) => {}
        }
        login::decide(result, peer.listener.allow_anonymous).map_err(|r| unauthorized(r.why))
    }

    /// Opens the subscriber of a stream or poll: its session, acknowledgement and
    /// subscriptions.
    async fn subscriber(
        &self,
        req: &Request<Incoming>,
        peer: &Peer,
        poll: bool,
    ) -> Result<(Subscriber, StreamParams), HttpError> {
        let broker = &self.broker;
        let query = parse_query(req.uri().query())?;
        let last_event_id = match poll {
            true => None,
            false => req
                .headers()
                .get("last-event-id")
                .and_then(|v| v.to_str().ok()),
        };
        let params = StreamParams::parse(
            &query,
            last_event_id,
            broker.config.limits.max_client_id_length,
        )?;
        if poll && params.client_id.is_none() {
            return Err(HttpError::bad_request(
                "`client_id` is needed: a poll's session lives between polls",
            ));
        }
        let client_id: ByteStr = match &params.client_id {
            Some(id) => id.clone(),
            None => assign_client_id(broker),
        };
        let login = self.login(req.headers(), &query, &client_id, peer).await?;
        let s = &self.settings;
        let persistent = params.client_id.is_some() && s.session_expiry > 0;
        let expiry = s
            .session_expiry
            .min(broker.config.mqtt.max_session_expiry_interval);
        // In a cluster, the session is made this node's first (as for MQTT).
        let _claimed = broker.claim(&client_id).await.map_err(|why| {
            crate::warn_limited!("cannot take the session: {why}");
            HttpError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "session unavailable",
            )
            .retry_after(1)
        })?;
        let mut sub = Subscriber::open(
            broker,
            login,
            &client_id,
            persistent,
            expiry,
            s.max_unacked,
            now(),
        );
        let taken = |_: Gone| taken_over();
        if let (Some(seq), true) = (params.ack, sub.resumed()) {
            sub.acknowledge(seq).map_err(taken)?;
        }
        sub.subscribe(&params.topics, params.qos).map_err(taken)??;
        Ok((sub, params))
    }

    async fn sse(&self, req: &Request<Incoming>, peer: &Peer) -> Result<Response<Body>, HttpError> {
        let (sub, _) = self.subscriber(req, peer, false).await?;
        info!(peer = %peer.addr, client_id = %sub.client_id(), resumed = sub.resumed(), "SSE stream");
        let head = Bytes::from(format!("retry: {}\n\n", self.settings.retry));
        let heartbeat = Duration::from_secs(self.settings.heartbeat);
        let body = sse_body(sub, head, heartbeat, self.broker.shutdown.clone());
        let mut resp = Response::new(Body::stream(body));
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        // nginx and the like would otherwise hold events back in their buffers.
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
        Ok(resp)
    }

    async fn poll(
        &self,
        req: &Request<Incoming>,
        peer: &Peer,
    ) -> Result<Response<Body>, HttpError> {
        let (mut sub, params) = self.subscriber(req, peer, true).await?;
        let timeout = params
            .timeout
            .unwrap_or(DEFAULT_POLL_TIMEOUT)
            .min(self.settings.max_poll_timeout);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let wire = sub.wire().clone();
        let shutdown = &self.broker.shutdown;
        let mut out = BytesMut::from(&b"["[..]);
        loop {
            let written = sub
                .fill(Format::Poll, now(), &mut out, HIGH_WATER)
                .map_err(|_| taken_over())?;
            if sub.take_refill() {
                refill(&sub).await?;
                continue;
            }
            if sub.take_yield() {
                tokio::task::yield_now().await;
                continue;
            }
            if written > 0 || tokio::time::Instant::now() >= deadline || shutdown.is_cancelled() {
                break;
            }
            tokio::select! {
                biased;
                _ = wire.woken() => {}
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
        out.put_u8(b']');
        Ok(json(StatusCode::OK, out.freeze()))
    }

    async fn publish(
        &self,
        req: Request<Incoming>,
        peer: &Peer,
    ) -> Result<Response<Body>, HttpError> {
        let broker = &self.broker;
        let config = &broker.config;
        let (parts, body) = req.into_parts();
        let query = parse_query(parts.uri.query())?;
        let client_id = param(&query, "client_id").unwrap_or("");
        let login = self.login(&parts.headers, &query, client_id, peer).await?;
        let key = login
            .username
            .clone()
            .unwrap_or_else(|| peer.addr.ip().to_string());
        self.throttled(&key, now())?;

        let raw = param(&query, "topic").is_some();
        let size_limit = match config.limits.message_size_limit {
            0 => config.mqtt.max_packet_size,
            n => n,
        };
        // The JSON form may carry the payload in base64.
        let body_limit = match raw {
            true => size_limit,
            false => size_limit.saturating_mul(4) / 3 + 64 * 1024,
        };
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > body_limit as u64) {
            return Err(publish::too_large(size_limit));
        }
        let bytes = match Limited::new(body, body_limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(publish::too_large(size_limit))
            }
            Err(e) => return Err(HttpError::bad_request(format!("cannot read the body: {e}"))),
        };
        let request = match raw {
            true => PublishRequest::from_query(&query, bytes)?,
            false => PublishRequest::from_json(&bytes)?,
        };
        request.check(config)?;
        if !login.authorizer.check(&request.topic, Access::Write) {
            metrics::dropped(Dropped::NotAuthorized);
            return Err(HttpError::new(
                StatusCode::FORBIDDEN,
                "not_authorized",
                format!("publishing to {:?} is not allowed", &*request.topic),
            ));
        }
        if let Some(full) = broker.no_room(request.qos, request.retain) {
            metrics::dropped(Dropped::Memory);
            return Err(publish::no_room(full));
        }
        let kept = request.qos != QoS::AtMostOnce || request.retain;
        let now = now();
        self.spend(&key, request.payload.len(), now);
        let mut tally = Tally::default();
        tally.publish(request.qos, request.payload.len());
        tally.received();
        let message = Arc::new(Message::new(
            request.topic,
            request.payload,
            request.qos,
            request.retain,
            request.properties,
            0,
            now,
        ));
        let receivers = broker.publish(&message);
        // As an MQTT PUBACK does (`conn::driver::await_disk`): under `sync = "always"` the
        // 200 promises the message is on disk. If the store failed it was routed but is not
        // promised: the client may send it again (at least once).
        if kept && broker.journal().acks_wait() {
            broker.journal().barrier().await.map_err(|e| {
                tracing::error!("the store failed: {e}");
                HttpError::new(StatusCode::SERVICE_UNAVAILABLE, "store", "the store failed")
            })?;
        }
        Ok(json(
            StatusCode::OK,
            format!("{{\"ok\":true,\"receivers\":{receivers}}}"),
        ))
    }

    /// 429 while `key` is over the publish rate (`limits.publish_rate`,
    /// `publish_bytes_rate`), with the seconds until it is not.
    fn throttled(&self, key: &str, now: Instant) -> Result<(), HttpError> {
        let mut map = self.throttles.lock();
        let Some(t) = map.get_mut(key) else {
            return Ok(());
        };
        match t.paused_until {
            Some(until) if now < until => {
                let secs = until.saturating_duration_since(now).as_secs_f64().ceil() as u64;
                Err(HttpError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    "over the publish rate (limits.publish_rate / publish_bytes_rate)",
                )
                .retry_after(secs.max(1)))
            }
            _ => {
                t.resume();
                Ok(())
            }
        }
    }

    fn spend(&self, key: &str, bytes: usize, now: Instant) {
        let mut map = self.throttles.lock();
        if !map.contains_key(key) {
            let Some(t) = Throttle::new(&self.broker.config.limits, now) else {
                return;
            };
            // Bounded: forgetting everyone errs on the side of letting clients publish.
            if map.len() >= MAX_THROTTLED {
                map.clear();
            }
            map.insert(key.to_owned(), t);
        }
        if let Some(t) = map.get_mut(key) {
            t.spend(bytes, now);
        }
    }
}

fn taken_over() -> HttpError {
    HttpError::new(
        StatusCode::CONFLICT,
        "taken_over",
        "another stream, poll or MQTT connection took this client id's session",
    )
}

/// What a stream tells its page when another took its session: EventSource would
/// otherwise reconnect and take it back.
const TAKEN_OVER: &[u8] = b"event: taken_over\ndata: {}\n\n";
/// Sent before a persistent stream ends because its window is full: the browser
/// reconnects at once, acknowledging with `Last-Event-ID`.
/// What a stream tells its page when the token it was opened with expires: reconnecting
/// with the same URL would be refused (401), the page needs a new token.
const TOKEN_EXPIRED: &[u8] = b"event: token_expired\ndata: {}\n\n";
const RECONNECT_NOW: &[u8] = b"retry: 0\n\n";
const PING: &[u8] = b": ping\n\n";

/// The body of an SSE response: `head` (the `retry:` field), then events as they come,
/// a ping after each `heartbeat` without any.
fn sse_body(
    sub: Subscriber,
    head: Bytes,
    heartbeat: Duration,
    shutdown: CancellationToken,
) -> impl Stream<Item = Bytes> + Send {
    let state = SseState {
        sub,
        head: Some(head),
        heartbeat,
        shutdown,
        ended: false,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        let chunk = st.next().await?;
        Some((chunk, st))
    })
}

struct SseState {
    sub: Subscriber,
    head: Option<Bytes>,
    heartbeat: Duration,
    shutdown: CancellationToken,
    ended: bool,
}

impl SseState {
    /// The next chunk, waiting as long as nothing is due; None ends the stream (and the
    /// subscriber with it).
    async fn next(&mut self) -> Option<Bytes> {
        if let Some(head) = self.head.take() {
            return Some(head);
        }
        if self.ended {
            return None;
        }
        let wire = self.sub.wire().clone();
        let token_deadline = self.sub.token_deadline();
        loop {
            if self.shutdown.is_cancelled() {
                return None;
            }
            if token_deadline.is_some_and(|d| now() >= d) {
                self.ended = true;
                return Some(Bytes::from_static(TOKEN_EXPIRED));
            }
            let mut out = BytesMut::new();
            let full = self
                .sub
                .fill(Format::Sse, now(), &mut out, HIGH_WATER)
                .and_then(|_| self.sub.window_full());
            if self.sub.take_refill() && refill(&self.sub).await.is_err() {
                self.ended = true;
                return None;
            }
            if self.sub.take_yield() && out.is_empty() {
                tokio::task::yield_now().await;
                continue;
            }
            match full {
                Err(Gone) => {
                    self.ended = true;
                    return Some(Bytes::from_static(TAKEN_OVER));
                }
                _ if !out.is_empty() => return Some(out.freeze()),
                Ok(true) => {
                    self.ended = true;
                    return Some(Bytes::from_static(RECONNECT_NOW));
                }
                Ok(false) => {}
            }
            tokio::select! {
                biased;
                _ = wire.woken() => {}
                _ = self.shutdown.cancelled() => return None,
                _ = until(token_deadline) => {}
                _ = tokio::time::sleep(self.heartbeat) => return Some(Bytes::from_static(PING)),
            }
        }
    }
}

/// Sleeps until `deadline`, for ever without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Reads a subscriber's queued messages back from the store, where they were spilled
/// while memory ran high.
async fn refill(sub: &Subscriber) -> Result<(), HttpError> {
    let (session, conn_id) = sub.session();
    sub.broker()
        .journal()
        .refill(session, conn_id, now())
        .await
        .map_err(|e| {
            tracing::error!("reading the queue back from the store: {e}");
            HttpError::new(StatusCode::SERVICE_UNAVAILABLE, "store", "the store failed")
        })
}
