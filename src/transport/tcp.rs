//! Plain MQTT over TCP: the socket's two halves are the connection's byte streams.

use crate::broker::Broker;
use crate::conn::{self, Peer};
use std::sync::Arc;
use tokio::net::TcpStream;

pub async fn serve(broker: Arc<Broker>, mut stream: TcpStream, peer: Peer) {
    let (reader, writer) = stream.split();
    conn::serve(&broker, reader, writer, peer).await;
}
