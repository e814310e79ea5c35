//! The clients connected now, by client id: what the admin API shows of a connection
//! (address, listener, protocol, keep-alive, since when) and the handle that lets an
//! administrator close it.
//!
//! A record is made once the CONNECT is accepted and removed when the connection closes,
//! so it costs nothing per message; it lives here rather than in the connection's
//! future, whose size is what every idle connection pays (docs/architecture.md). It is
//! kept small for the same reason (about 170 bytes per connection with the map's share,
//! measured with 10,000 idle clients): the client id is only the map's key, and the
//! session is looked up by it when needed.

use crate::broker::ListenerRules;
use crate::protocol::{ByteStr, Protocol};
use dashmap::DashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

/// One connected client (its client id is the registry's key).
pub struct LiveClient {
    pub conn_id: u64,
    pub addr: SocketAddr,
    pub listener: Arc<ListenerRules>,
    pub protocol: Protocol,
    /// Seconds, as negotiated (0 = none).
    pub keep_alive: u16,
    pub username: Option<Box<str>>,
    /// When the CONNECT was accepted, Unix seconds.
    pub since: u64,
    /// Wakes the connection's task.
    wake: Arc<Notify>,
    /// An administrator asked for this connection to close.
    kicked: AtomicBool,
}

impl LiveClient {
    pub fn new(
        conn_id: u64,
        addr: SocketAddr,
        listener: Arc<ListenerRules>,
        protocol: Protocol,
        keep_alive: u16,
        username: Option<&str>,
        wake: Arc<Notify>,
    ) -> LiveClient {
        LiveClient {
            conn_id,
            addr,
            listener,
            protocol,
            keep_alive,
            username: username.map(Box::from),
            since: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            wake,
            kicked: AtomicBool::new(false),
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

#[derive(Default)]
pub struct Clients {
    live: DashMap<ByteStr, Arc<LiveClient>>,
    /// Kicked connections that have not closed yet: while 0, a wake-up costs no lookup.
    kicks: AtomicUsize,
}

impl Clients {
    /// Records the connection of `client_id` that was just accepted; a connection it
    /// took the session from is replaced (and removes nothing when it closes).
    pub fn register(&self, client_id: ByteStr, client: LiveClient) {
        let client = Arc::new(client);
        count(&client, true);
        if let Some(old) = self.live.insert(client_id, client) {
            self.forget(&old);
        }
    }

    /// Removes the record of connection `conn_id`, if it is still the client's.
    pub fn remove(&self, client_id: &ByteStr, conn_id: u64) {
        if let Some((_, old)) = self.live.remove_if(client_id, |_, c| c.conn_id == conn_id) {
            self.forget(&old);
        }
    }

    fn forget(&self, old: &LiveClient) {
        count(old, false);
        if old.kicked.load(Relaxed) {
            self.kicks.fetch_sub(1, Relaxed);
        }
    }

    pub fn get(&self, client_id: &str) -> Option<Arc<LiveClient>> {
        self.live.get(&ByteStr::from(client_id)).map(|c| c.clone())
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Asks the connection of `client_id` to close (5.0: DISCONNECT 0x98 Administrative
    /// action). False if the client is not connected.
    pub fn kick(&self, client_id: &str) -> bool {
        let Some(client) = self.get(client_id) else {
            return false;
        };
        if !client.kicked.swap(true, Relaxed) {
            self.kicks.fetch_add(1, Relaxed);
        }
        client.wake.notify_one();
        true
    }

    /// Whether an administrator asked connection `conn_id` of `client_id` to close;
    /// called after every wake-up, so it does nothing while no kick is pending.
    pub fn is_kicked(&self, client_id: &ByteStr, conn_id: u64) -> bool {
        self.kicks.load(Relaxed) > 0
            && self
                .live
                .get(client_id)
                .is_some_and(|c| c.conn_id == conn_id && c.kicked.load(Relaxed))
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
