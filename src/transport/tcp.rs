//! Plain MQTT over TCP (or over TLS on TCP): the stream's two halves are the
//! connection's byte streams.

use crate::broker::Broker;
use crate::conn::{self, Peer};
use std::future::Future;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

pub fn serve(broker: Arc<Broker>, mut stream: TcpStream, peer: Peer) -> impl Future<Output = ()> {
    // Boxed before the future captures it: what the future holds, it holds for the
    // connection's whole life.
    let peer = Box::new(peer);
    async move {
        // Borrowed halves: no lock between reading and writing.
        let (reader, writer) = stream.split();
        conn::serve(&broker, reader, writer, peer).await;
    }
}

/// `serve` over any stream, e.g. TLS.
pub async fn serve_stream<S>(broker: Arc<Broker>, stream: S, peer: Peer)
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    let (reader, writer) = tokio::io::split(stream);
    conn::serve(&broker, reader, writer, peer).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use tokio::net::TcpListener;

    /// What a TCP connection's task holds for the connection's whole life, around
    /// `conn::serve` (bounded on its own in `conn::driver`): the socket, the broker and
    /// the boxed peer. Measured in the test profile (rustc 1.95): 656 bytes (the release
    /// build's is no larger). tokio's task cell around it is the future, 8 bytes of task
    /// tracker and 96 of tokio's own, rounded up to 128: 768 bytes up to a 664-byte future,
    /// 896 past it, a cost every idle connection pays. Growing it should be a decision.
    const MAX_TASK_FUTURE: usize = 664;

    #[tokio::test]
    async fn the_connection_task_stays_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = TcpStream::connect(addr).await.unwrap();
        let broker = Broker::new(Config::default(), Vec::new()).unwrap();
        let future = serve(broker, stream, Peer::new(addr));
        let size = std::mem::size_of_val(&future);
        assert!(
            size <= MAX_TASK_FUTURE,
            "transport::tcp::serve's future is {size} bytes, over the {MAX_TASK_FUTURE} allowed"
        );
    }
}
