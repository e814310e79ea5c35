//! The client side of a WebSocket upgrade, for the ws listener's tests.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Response;
use tokio_tungstenite::tungstenite::http::{header, HeaderValue};
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::WebSocketStream;

pub type Ws = WebSocketStream<TcpStream>;

/// Bound of the TCP connect and of the upgrade.
const WAIT: Duration = Duration::from_secs(5);

/// Opens a WebSocket to `path`, offering `protocols` (none if empty), with an optional
/// `Origin`. Returns the socket and the server's answer, or the handshake error.
pub async fn open(
    addr: SocketAddr,
    path: &str,
    protocols: &[&str],
    origin: Option<&str>,
) -> Result<(Ws, Response), WsError> {
    let tcp = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("tcp connect within the wait")
        .expect("tcp connect");
    tcp.set_nodelay(true).expect("set_nodelay");
    let mut req = format!("ws://{addr}{path}").into_client_request()?;
    let headers = req.headers_mut();
    if !protocols.is_empty() {
        let offer = HeaderValue::from_str(&protocols.join(", ")).expect("header value");
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, offer);
    }
    if let Some(origin) = origin {
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_str(origin).expect("origin"),
        );
    }
    tokio::time::timeout(WAIT, tokio_tungstenite::client_async(req, tcp))
        .await
        .expect("handshake within the wait")
}
