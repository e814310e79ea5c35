//! MQTT over WebSocket, for browsers (mqtt.js, Paho JavaScript and the like).
//!
//! The HTTP upgrade is checked against the listener's policy (path, `Origin`, subprotocol),
//! then the WebSocket is turned back into the byte stream MQTT expects: the payloads of
//! binary messages, in order, with no alignment assumed between messages and packets.
//! From there on it is the same `conn::serve` as TCP, so sessions, limits and
//! timeouts are shared. See docs/websocket.md.

use crate::broker::Broker;
use crate::config::Listener;
use crate::conn::{self, Peer};
use bytes::Bytes;
use futures_util::{ready, Sink, Stream};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::handshake::server::{
    Callback, ErrorResponse, Request, Response, ServerHandshake,
};
use tokio_tungstenite::tungstenite::handshake::HandshakeError;
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, WebSocket};
use tracing::{debug, info};

/// The subprotocols MQTT clients offer: `mqtt` (MQTT 3.1.1 and 5.0 standards) and
/// `mqttv3.1` (older clients). We answer with the first of them the client offered.
pub const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// A WebSocket message may carry several packets, so its limit never goes below this even
/// when `max_packet_size` is tiny.
const MIN_MESSAGE_LIMIT: usize = 64 * 1024;

/// Before the CONNECT is accepted a message holds at most `max_connect_size` and this:
/// room for packets a client sends in the same message right behind its CONNECT.
const CONNECT_SLACK: usize = 4 * 1024;

/// Browser connections are many and mostly idle: a small read buffer keeps them cheap
/// (tungstenite's default is 128 KiB, allocated up front).
const READ_BUFFER: usize = 8 * 1024;

/// Does the HTTP upgrade (bounded by the CONNECT timeout, so a silent or slow client
/// cannot hold the socket), then serves MQTT over the WebSocket.
#[allow(clippy::result_large_err)] // `check`'s result type is tungstenite's `Callback`.
pub async fn serve<S>(broker: Arc<Broker>, stream: S, mut peer: Peer, policy: Arc<Policy>)
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    let limits = Limits::new(&broker, &mut peer);
    let addr = peer.addr;
    let check = |req: &Request, resp: Response| policy.check(req, resp, addr);
    let upgrade = accept(stream, check, limits.before_connect());
    let ws = tokio::select! {
        _ = broker.shutdown.cancelled() => return,
        r = tokio::time::timeout(broker.config.mqtt.connect_timeout(), upgrade) => r,
    };
    let ws = match ws {
        Err(_) => return debug!(%addr, "no WebSocket upgrade within the connect timeout; closing"),
        // Refusals by the policy were logged by `check`; the rest are not WebSocket requests.
        Ok(Err(e)) => return debug!(%addr, "WebSocket upgrade failed: {e}"),
        Ok(Ok(ws)) => ws,
    };
    let (reader, writer) = tokio::io::split(WsBytes::new(Socket::new(ws, limits)));
    conn::serve(&broker, reader, writer, peer, false).await;
}

/// Answers a WebSocket upgrade that came to an http listener (through hyper) with the
/// ws listener's checks, then serves MQTT over the upgraded connection in a task of its
/// own (docs/http.md: MQTT over WebSocket shares the http listener's port).
pub fn upgrade(
    broker: Arc<Broker>,
    req: hyper::Request<hyper::body::Incoming>,
    mut peer: Peer,
    policy: &Policy,
) -> hyper::Response<super::http::Body> {
    use super::http::Body;
    let bad = |why: &str| {
        let mut resp = hyper::Response::new(Body::full(format!("{why}\n")));
        *resp.status_mut() = StatusCode::BAD_REQUEST;
        resp
    };
    let headers = req.headers();
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return bad("no Sec-WebSocket-Key");
    };
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return bad("Sec-WebSocket-Version must be 13");
    }
    let mut head = Request::new(());
    *head.method_mut() = req.method().clone();
    *head.uri_mut() = req.uri().clone();
    *head.headers_mut() = headers.clone();
    let accepted = match policy.check(&head, Response::new(()), peer.addr) {
        Ok(accepted) => accepted,
        Err(refused) => {
            let (parts, body) = refused.into_parts();
            return hyper::Response::from_parts(parts, Body::full(body.unwrap_or_default()));
        }
    };
    let mut resp = hyper::Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *resp.headers_mut() = accepted.headers().clone();
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    let limits = Limits::new(&broker, &mut peer);
    let tasks = broker.tasks.clone();
    tasks.spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                let io = SyncIo::new(hyper_util::rt::TokioIo::new(upgraded));
                let config = limits.before_connect();
                let ws = WebSocket::from_raw_socket(io, Role::Server, Some(config));
                let (reader, writer) = tokio::io::split(WsBytes::new(Socket::new(ws, limits)));
                conn::serve(&broker, reader, writer, peer, false).await;
            }
            Err(e) => debug!("WebSocket upgrade failed: {e}"),
        }
    });
    resp
}

/// The WebSocket message limits of one connection. tungstenite holds a message whole
/// (and reserves a frame's declared length at its header) before MQTT sees a byte of
/// it, so the limit is what an unauthenticated peer could make the broker hold: until
/// the CONNECT is accepted (`admitted`, set by the connection), the CONNECT's own
/// limit; then `max_packet_size`'s.
struct Limits {
    admitted: Arc<AtomicBool>,
    before: usize,
    after: usize,
}

impl Limits {
    /// Limits for `peer`, which is given the flag to raise them with.
    fn new(broker: &Broker, peer: &mut Peer) -> Limits {
        let admitted = Arc::new(AtomicBool::new(false));
        peer.admitted = Some(admitted.clone());
        let after = broker.config.mqtt.max_packet_size.max(MIN_MESSAGE_LIMIT);
        Limits {
            admitted,
            before: (conn::connect_size(&broker.config) + CONNECT_SLACK).min(after),
            after,
        }
    }

    fn before_connect(&self) -> WebSocketConfig {
        ws_config(self.before)
    }
}

fn ws_config(limit: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        // Each write is sent at once; `WsBytes` does the batching (one message per write).
        .write_buffer_size(0)
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit))
}

/// The server's WebSocket: tungstenite's, driven here rather than through
/// tokio-tungstenite's `WebSocketStream`, whose limits are fixed when it is made; this
/// one raises them once the client is in (`Limits`). Its `Stream` and `Sink` behave as
/// tokio-tungstenite's.
struct Socket<S> {
    ws: WebSocket<SyncIo<S>>,
    /// None once the limits are raised.
    limits: Option<Limits>,
    /// Closed, or failed: no more messages.
    ended: bool,
    /// A close frame is queued: `poll_close` only flushes.
    closing: bool,
    /// False while a message sent waits in tungstenite's buffer.
    ready: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Socket<S> {
    fn new(ws: WebSocket<SyncIo<S>>, limits: Limits) -> Socket<S> {
        Socket {
            ws,
            limits: Some(limits),
            ended: false,
            closing: false,
            ready: true,
        }
    }

    /// Runs `f` on the socket with the task's waker: tungstenite's `WouldBlock` means
    /// the socket was not ready and will wake the task.
    fn with<T>(
        &mut self,
        cx: &mut Context<'_>,
        f: impl FnOnce(&mut WebSocket<SyncIo<S>>) -> Result<T, WsError>,
    ) -> Poll<Result<T, WsError>> {
        self.ws.get_mut().set_waker(cx.waker());
        match f(&mut self.ws) {
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
            r => Poll::Ready(r),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Stream for Socket<S> {
    type Item = Result<Message, WsError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        if let Some(limits) = &this.limits {
            if limits.admitted.load(Ordering::Acquire) {
                let after = limits.after;
                this.ws.set_config(|c| {
                    c.max_message_size = Some(after);
                    c.max_frame_size = Some(after);
                });
                this.limits = None;
            }
        }
        match ready!(this.with(cx, WebSocket::read)) {
            Ok(message) => Poll::Ready(Some(Ok(message))),
            Err(e) => {
                this.ended = true;
                match e {
                    WsError::AlreadyClosed | WsError::ConnectionClosed => Poll::Ready(None),
                    WsError::Capacity(e) if this.limits.is_some() => {
                        crate::warn_limited!(
                            "WebSocket message over limits.max_connect_size before the CONNECT is accepted ({e}); closing"
                        );
                        Poll::Ready(Some(Err(WsError::Capacity(e))))
                    }
                    e => Poll::Ready(Some(Err(e))),
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Sink<Message> for Socket<S> {
    type Error = WsError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        if self.ready {
            return Poll::Ready(Ok(()));
        }
        let flushed = ready!(self.with(cx, WebSocket::flush));
        self.ready = true;
        Poll::Ready(flushed)
    }

    fn start_send(mut self: Pin<&mut Self>, message: Message) -> Result<(), WsError> {
        self.ready = true;
        match self.ws.write(message) {
            // Queued; `poll_ready` and `poll_flush` send it.
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                self.ready = false;
                Ok(())
            }
            r => r,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let flushed = ready!(self.with(cx, WebSocket::flush));
        self.ready = true;
        match flushed {
            // The close handshake just completed: nothing left to flush.
            Err(WsError::ConnectionClosed) => Poll::Ready(Ok(())),
            r => Poll::Ready(r),
        }
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        self.ready = true;
        let closing = self.closing;
        self.closing = true;
        let closed = match closing {
            true => self.with(cx, WebSocket::flush),
            false => self.with(cx, |ws| ws.close(None)),
        };
        match ready!(closed) {
            Ok(()) | Err(WsError::ConnectionClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

/// A socket as tungstenite's blocking `Read` and `Write` want it: what would wait
/// returns `WouldBlock` instead, having registered the waker of the task that last
/// polled the `Socket` (one task serves a connection, both directions).
struct SyncIo<S> {
    io: S,
    waker: Waker,
}

impl<S: Unpin> SyncIo<S> {
    fn new(io: S) -> SyncIo<S> {
        SyncIo {
            io,
            waker: Waker::noop().clone(),
        }
    }

    fn set_waker(&mut self, waker: &Waker) {
        if !self.waker.will_wake(waker) {
            self.waker = waker.clone();
        }
    }

    fn poll<T>(
        &mut self,
        f: impl FnOnce(Pin<&mut S>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> io::Result<T> {
        let mut cx = Context::from_waker(&self.waker);
        match f(Pin::new(&mut self.io), &mut cx) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl<S: AsyncRead + Unpin> Read for SyncIo<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut buf = ReadBuf::new(buf);
        self.poll(|io, cx| io.poll_read(cx, &mut buf))?;
        Ok(buf.filled().len())
    }
}

impl<S: AsyncWrite + Unpin> Write for SyncIo<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.poll(|io, cx| io.poll_write(cx, buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.poll(|io, cx| io.poll_flush(cx))
    }
}

/// The server side of the HTTP upgrade over `stream`, with tungstenite's handshake
/// driven by the task's waker.
async fn accept<S, C>(
    stream: S,
    check: C,
    config: WebSocketConfig,
) -> Result<WebSocket<SyncIo<S>>, WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    C: Callback + Unpin,
{
    let mut mid = Some(ServerHandshake::start(
        SyncIo::new(stream),
        check,
        Some(config),
    ));
    std::future::poll_fn(move |cx| {
        let Some(mut m) = mid.take() else {
            return Poll::Ready(Err(WsError::AlreadyClosed));
        };
        m.get_mut().get_mut().set_waker(cx.waker());
        match m.handshake() {
            Ok(ws) => Poll::Ready(Ok(ws)),
            Err(HandshakeError::Interrupted(m)) => {
                mid = Some(m);
                Poll::Pending
            }
            Err(HandshakeError::Failure(e)) => Poll::Ready(Err(e)),
        }
    })
    .await
}

/// What a listener accepts at the HTTP upgrade.
pub struct Policy {
    /// Served besides `/`.
    path: String,
    /// Empty: any origin.
    allowed_origins: Vec<String>,
}

impl Policy {
    pub fn new(listener: &Listener) -> Policy {
        Policy {
            path: listener.ws_path().to_owned(),
            allowed_origins: listener.allowed_origins.clone(),
        }
    }

    /// Accepts the upgrade (echoing the chosen subprotocol) or answers with an HTTP error
    /// whose body says why. The signature is tungstenite's `Callback`.
    #[allow(clippy::result_large_err)]
    pub(crate) fn check(
        &self,
        req: &Request,
        mut resp: Response,
        peer: SocketAddr,
    ) -> Result<Response, ErrorResponse> {
        let path = req.uri().path();
        // mqtt.js sends exactly the URL's path: `ws://host:8083` asks for `/`.
        if path != self.path && path != "/" {
            let why = format!("no MQTT endpoint at {path}; use {} (or /)", self.path);
            return Err(refuse(StatusCode::NOT_FOUND, why, peer));
        }
        // Browsers always send Origin; other clients usually do not and could forge it
        // anyway, so a missing Origin is not refused.
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            let allowed = self.allowed_origins.is_empty()
                || origin.to_str().is_ok_and(|o| {
                    self.allowed_origins
                        .iter()
                        .any(|a| a.eq_ignore_ascii_case(o))
                });
            if !allowed {
                let why = format!("origin {origin:?} is not allowed");
                return Err(refuse(StatusCode::FORBIDDEN, why, peer));
            }
        }
        match choose_subprotocol(req) {
            // RFC 6455: no subprotocol offered, none in the answer.
            Ok(None) => {}
            Ok(Some(chosen)) => {
                resp.headers_mut().insert(
                    header::SEC_WEBSOCKET_PROTOCOL,
                    HeaderValue::from_static(chosen),
                );
            }
            Err(offered) => {
                let why = format!(
                    "unsupported WebSocket subprotocol {offered:?}: this broker speaks {}",
                    SUBPROTOCOLS.join(", ")
                );
                return Err(refuse(StatusCode::BAD_REQUEST, why, peer));
            }
        }
        Ok(resp)
    }
}

/// The subprotocol to answer with: `Ok(None)` if the client offered none, `Err` with
/// the offer if it offered only ones we do not speak.
fn choose_subprotocol(req: &Request) -> Result<Option<&'static str>, String> {
    let offered: Vec<&str> = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if offered.is_empty() {
        return Ok(None);
    }
    // The client's order is its preference.
    offered
        .iter()
        .find_map(|p| SUBPROTOCOLS.iter().find(|s| *s == p).copied())
        .map(Some)
        .ok_or_else(|| offered.join(", "))
}

fn refuse(status: StatusCode, why: String, peer: SocketAddr) -> ErrorResponse {
    info!(%peer, status = status.as_u16(), "WebSocket upgrade refused: {why}");
    let body = format!("{why}\n");
    let mut resp = ErrorResponse::new(None);
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    *resp.body_mut() = Some(body);
    resp
}

/// A WebSocket seen as a byte stream: reads return the payloads of binary messages in
/// order, each write is sent as one binary message. Over the server's `Socket`, or over
/// any other WebSocket (tests use tokio-tungstenite's on the client side).
///
/// Writes go to the socket at once, but what it cannot take yet stays in tungstenite's
/// buffer. A write first waits for that buffer to empty (which is the backpressure the
/// connection relies on), and every read pushes it on too: `conn::serve` always has
/// a read pending and flushes only when it closes, so without this the last message
/// before a pause could wait in the buffer for the next write.
pub struct WsBytes<W> {
    ws: W,
    /// The unread rest of the current binary message.
    unread: Bytes,
}

impl<W> WsBytes<W> {
    pub fn new(ws: W) -> WsBytes<W> {
        WsBytes {
            ws,
            unread: Bytes::new(),
        }
    }
}

impl<W: WsSocket> AsyncRead for WsBytes<W> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // Pending means the socket is full; the waker is registered for when it drains.
        if let Poll::Ready(Err(e)) = Pin::new(&mut this.ws).poll_flush(cx) {
            return Poll::Ready(Err(into_io(e)));
        }
        // An empty read means end of stream to the caller: skip empty messages.
        while this.unread.is_empty() {
            // tungstenite reassembles fragmented messages and answers pings and closes.
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => this.unread = data,
                Some(Ok(Message::Text(_))) => {
                    // Tell the client why (close code 1003) and end as on a network error,
                    // so the will is published. Sent when the connection closes the writer.
                    let close = CloseFrame {
                        code: CloseCode::Unsupported,
                        reason: "MQTT needs binary frames".into(),
                    };
                    let _ = Pin::new(&mut this.ws).start_send(Message::Close(Some(close)));
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text frame on an MQTT WebSocket",
                    )));
                }
                // A close frame ends the stream like a TCP close: no DISCONNECT, so the will is sent.
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Err(e)) => return Poll::Ready(Err(into_io(e))),
            }
        }
        let n = this.unread.len().min(buf.remaining());
        buf.put_slice(&this.unread.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl<W: WsSocket> AsyncWrite for WsBytes<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut ws = Pin::new(&mut self.ws);
        // At most one message waits in tungstenite's buffer.
        ready!(ws.as_mut().poll_flush(cx)).map_err(into_io)?;
        ready!(ws.as_mut().poll_ready(cx)).map_err(into_io)?;
        ws.as_mut()
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(into_io)?;
        // Start sending now; what the socket does not take is flushed by the next read or write.
        if let Poll::Ready(Err(e)) = ws.poll_flush(cx) {
            return Poll::Ready(Err(into_io(e)));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(into_io)
    }

    /// Sends a close frame (if none was sent yet) and flushes.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_close(cx).map_err(into_io)
    }
}

/// What `WsBytes` needs of a WebSocket: its messages in, and out.
pub trait WsSocket:
    Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin
{
}

impl<W> WsSocket for W where
    W: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin
{
}

fn into_io(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        e => io::Error::new(io::ErrorKind::InvalidData, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(protocols: &[&str]) -> Request {
        let mut req = Request::new(());
        for p in protocols {
            req.headers_mut().append(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_str(p).unwrap(),
            );
        }
        req
    }

    #[test]
    fn subprotocol_is_the_first_known_one_offered() {
        assert_eq!(choose_subprotocol(&request(&[])), Ok(None));
        assert_eq!(choose_subprotocol(&request(&["mqtt"])), Ok(Some("mqtt")));
        assert_eq!(
            choose_subprotocol(&request(&["mqttv3.1"])),
            Ok(Some("mqttv3.1"))
        );
        assert_eq!(
            choose_subprotocol(&request(&["wamp, mqttv3.1 , mqtt"])),
            Ok(Some("mqttv3.1"))
        );
        assert_eq!(
            choose_subprotocol(&request(&["wamp", "mqtt"])),
            Ok(Some("mqtt"))
        );
        assert_eq!(
            choose_subprotocol(&request(&["wamp, soap"])),
            Err("wamp, soap".into())
        );
    }
}
