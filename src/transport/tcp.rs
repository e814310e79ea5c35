//! Plain MQTT over TCP (or over TLS on TCP): the stream's two halves are the
//! connection's byte streams. A plain TCP connection with nothing to do is parked
//! (`park`): its task ends, and `resume` serves it again in a new one.

use super::park::Lot;
use crate::broker::Broker;
use crate::conn::{self, Idle, Peer};
use bytes::BytesMut;
use std::future::Future;
use std::io::Read;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

pub fn serve(
    broker: Arc<Broker>,
    mut stream: TcpStream,
    peer: Peer,
    lot: Arc<Lot>,
) -> impl Future<Output = ()> {
    // Boxed before the future captures it: what the future holds, it holds for the
    // connection's whole life.
    let peer = Box::new(peer);
    async move {
        // Borrowed halves: no lock between reading and writing.
        let (reader, writer) = stream.split();
        let idle = conn::serve(&broker, reader, writer, peer, true).await;
        if let Some(idle) = idle {
            lot.park(stream, idle);
        }
    }
}

/// Serves a parked connection again, in a new task.
pub async fn resume(lot: Arc<Lot>, stream: std::net::TcpStream, idle: Idle) {
    // Read before tokio takes the socket: tokio learns that a socket it takes is
    // readable only from its next poll of the reactor, which the connection would
    // otherwise wait for (or not: having nothing to do, it would be parked again).
    let peer = stream.peer_addr().ok();
    let read = match read_now(&stream) {
        Ok(read) => read,
        Err(gone) => return idle.end(gone, peer),
    };
    let mut stream = match TcpStream::from_std(stream) {
        Ok(stream) => stream,
        Err(e) => {
            crate::warn_limited!("a parked connection cannot be resumed: {e}");
            return idle.end(Some(e), peer);
        }
    };
    let (reader, writer) = stream.split();
    // Where the lot failed, the connection keeps this task to its end.
    let parkable = lot.is_open();
    let idle = conn::resume(reader, writer, read, idle, peer, parkable).await;
    if let Some(idle) = idle {
        lot.park(stream, idle);
    }
}

/// What the (non-blocking) socket has for us now, if anything; Err if the client is
/// gone (None: it closed the connection).
fn read_now(mut stream: &std::net::TcpStream) -> Result<BytesMut, Option<std::io::Error>> {
    let mut buf = [0; READ_NOW];
    match stream.read(&mut buf) {
        Ok(0) => Err(None),
        Ok(n) => Ok(BytesMut::from(&buf[..n])),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(BytesMut::new()),
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(BytesMut::new()),
        Err(e) => Err(Some(e)),
    }
}

/// What `read_now` reads at most: a parked connection's next packet is most often a
/// PINGREQ or a small PUBLISH.
const READ_NOW: usize = 256;

/// `serve` over any stream, e.g. TLS.
pub async fn serve_stream<S>(broker: Arc<Broker>, stream: S, peer: Peer)
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    let (reader, writer) = tokio::io::split(stream);
    conn::serve(&broker, reader, writer, peer, false).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use tokio::net::TcpListener;

    /// What a TCP connection's task holds, around `conn::serve` (bounded on its own in
    /// `conn::driver`): the socket, the broker, the boxed peer and the parking lot.
    /// Measured in the test profile (rustc 1.95): 712 bytes, and 720 for a resumed
    /// connection's task (`resume`). tokio's task cell around it is the future, 8 bytes of task
    /// tracker and 96 of tokio's own, rounded up to 128: 896 bytes up to a 792-byte
    /// future. Only active connections have a task (idle ones are parked), but a new
    /// connection's first page faults are counted in this size (docs/benchmarks.md):
    /// growing it should be a decision.
    const MAX_TASK_FUTURE: usize = 792;

    fn future_size<A, B, C, F>(_: fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[tokio::test]
    async fn the_connection_task_stays_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = TcpStream::connect(addr).await.unwrap();
        let broker = Broker::new(Config::default(), Vec::new()).unwrap();
        let lot = Lot::start(&broker).unwrap();
        let future = serve(broker, stream, Peer::new(addr), lot);
        let sizes = [
            ("serve", std::mem::size_of_val(&future)),
            ("resume", future_size(resume)),
        ];
        for (name, size) in sizes {
            assert!(
                size <= MAX_TASK_FUTURE,
                "transport::tcp::{name}'s future is {size} bytes, over the {MAX_TASK_FUTURE} allowed"
            );
        }
    }
}
