//! The clients connected now: what the admin API shows of an MQTT connection (address,
//! listener, protocol, keep-alive, username, since when), and how many there are.
//!
//! The record is made once the CONNECT is accepted and lives in the connection's
//! `session::Wire`, found through the sessions registry: a map of its own would cost
//! every idle connection another entry (docs/benchmarks.md). The client id is the
//! session's, the connection id its `Link`'s.

use crate::listener::ListenerRules;
use crate::protocol::Protocol;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// One connected MQTT client.
pub struct LiveClient {
    pub addr: SocketAddr,
    pub listener: Arc<ListenerRules>,
    pub protocol: Protocol,
    /// Seconds, as negotiated (0 = none).
    pub keep_alive: u16,
    pub username: Option<Box<str>>,
    /// When the CONNECT was accepted, Unix seconds.
    pub since: u64,
}

impl LiveClient {
    pub fn new(
        addr: SocketAddr,
        listener: Arc<ListenerRules>,
        protocol: Protocol,
        keep_alive: u16,
        username: Option<&str>,
    ) -> LiveClient {
        LiveClient {
            addr,
            listener,
            protocol,
            keep_alive,
            username: username.map(Box::from),
            since: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }
}

/// The index of a protocol version in per-version gauges: 3.1, 3.1.1, 5.0.
pub fn protocol_index(p: Protocol) -> usize {
    match p {
        Protocol::V31 => 0,
        Protocol::V311 => 1,
        Protocol::V5 => 2,
    }
}

/// How `/metrics` and the API name a protocol version.
pub fn protocol_name(p: Protocol) -> &'static str {
    ["3.1", "3.1.1", "5.0"][protocol_index(p)]
}

/// How many MQTT clients are connected (past CONNECT, until their connection closes).
#[derive(Default)]
pub struct Clients {
    online: AtomicUsize,
}

impl Clients {
    /// Counts the connection of `client`, just accepted.
    pub fn connected(&self, client: &LiveClient) {
        self.online.fetch_add(1, Relaxed);
        count(client, true);
    }

    /// The connection of `client` closed.
    pub fn disconnected(&self, client: &LiveClient) {
        self.online.fetch_sub(1, Relaxed);
        count(client, false);
    }

    pub fn len(&self) -> usize {
        self.online.load(Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Keeps the listener's per-version gauge of connected clients.
fn count(client: &LiveClient, up: bool) {
    let gauge = &client.listener.clients[protocol_index(client.protocol)];
    if up {
        gauge.fetch_add(1, Relaxed);
    } else {
        gauge.fetch_sub(1, Relaxed);
    }
}
