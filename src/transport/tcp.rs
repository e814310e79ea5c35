//! Plain MQTT over TCP (or over TLS on TCP): the stream's two halves are the
//! connection's byte streams.

use crate::broker::Broker;
use crate::conn::{self, Peer};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

pub async fn serve(broker: Arc<Broker>, mut stream: TcpStream, peer: Peer) {
    // Borrowed halves: no lock between reading and writing.
    let (reader, writer) = stream.split();
    conn::serve(&broker, reader, writer, peer).await;
}

/// `serve` over any stream, e.g. TLS.
pub async fn serve_stream<S>(broker: Arc<Broker>, stream: S, peer: Peer)
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    let (reader, writer) = tokio::io::split(stream);
    conn::serve(&broker, reader, writer, peer).await;
}
