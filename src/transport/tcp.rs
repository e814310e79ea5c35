//! Plain MQTT over TCP.

use crate::broker::Broker;
use crate::session::connection;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Binds `addr` and spawns the accept loop; returns the bound address.
pub async fn listen(broker: &Arc<Broker>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let broker = broker.clone();
    broker.tasks.clone().spawn(accept_loop(broker, listener));
    Ok(local)
}

async fn accept_loop(broker: Arc<Broker>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            _ = broker.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((mut stream, peer)) => {
                // MQTT packets are small and latency matters more than segment count.
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(%peer, "set_nodelay: {e}");
                }
                let broker = broker.clone();
                broker.tasks.clone().spawn(async move {
                    let (reader, writer) = stream.split();
                    connection::serve(&broker, reader, writer, peer).await;
                });
            }
            Err(e) => {
                // Usually EMFILE: back off instead of spinning on the error.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
