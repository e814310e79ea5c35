//! HTTP connections on hyper: HTTP/1.1 with keep-alive and chunked streaming, and HTTP/2
//! (after ALPN "h2" on TLS, or with prior knowledge), for any `Handler`. The http
//! listener's `HttpService` is one; an admin or metrics listener can be another, with the
//! same connection limits, timeouts, shutdown and TLS.

use crate::broker::Broker;
use crate::conn::Peer;
use bytes::Bytes;
use futures_util::Stream;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

/// hyper's buffers, read and write, stop at this: a response body is not polled for
/// more while this much of it waits for the socket (a slow reader's bound), and request
/// heads larger than this are refused (431).
const MAX_BUF: usize = 64 * 1024;
/// How long open requests get to finish when the broker shuts down.
const GRACE: Duration = Duration::from_secs(1);

/// A response body: whole, or a stream of chunks (sent chunked, or as HTTP/2 DATA).
pub struct Body {
    kind: Kind,
}

enum Kind {
    Full(Option<Bytes>),
    Stream(Pin<Box<dyn Stream<Item = Bytes> + Send>>),
}

impl Body {
    pub fn empty() -> Body {
        Body {
            kind: Kind::Full(None),
        }
    }

    pub fn full(bytes: impl Into<Bytes>) -> Body {
        let bytes = bytes.into();
        Body {
            kind: Kind::Full((!bytes.is_empty()).then_some(bytes)),
        }
    }

    /// A body whose chunks `stream` yields; the response ends with the stream. The stream
    /// is polled only as the connection takes what it gave before (backpressure).
    pub fn stream(stream: impl Stream<Item = Bytes> + Send + 'static) -> Body {
        Body {
            kind: Kind::Stream(Box::pin(stream)),
        }
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match &mut self.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Stream(s) => s
                .as_mut()
                .poll_next(cx)
                .map(|c| c.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.kind, Kind::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Stream(_) => SizeHint::default(),
        }
    }
}

/// Answers the requests of one listener.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: Peer,
    ) -> impl Future<Output = Response<Body>> + Send;
}

/// Serves one accepted connection until the client closes it, it fails, or the broker
/// shuts down. It counts against the listener's and the broker's `max_connections`: one
/// too many is closed at once.
pub async fn serve<S, H>(broker: Arc<Broker>, stream: S, peer: Peer, handler: Arc<H>)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    H: Handler,
{
    let (_opened, within_limits) = broker.open_connection(&peer.listener);
    if !within_limits {
        debug!(peer = %peer.addr, "too many connections (max_connections); closing");
        return;
    }
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // A client that connects and sends nothing does not hold the socket.
        .header_read_timeout(broker.config.mqtt.connect_timeout())
        .max_buf_size(MAX_BUF)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let service = service_fn(move |req| {
        let (handler, peer) = (handler.clone(), peer.clone());
        async move { Ok::<_, Infallible>(handler.handle(req, peer).await) }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        done = conn.as_mut() => {
            if let Err(e) = done {
                debug!("HTTP connection ended: {e}");
            }
        }
        _ = broker.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(GRACE, conn).await;
        }
    }
}
