//! The `Link` between a session and the connection (or HTTP stream) serving it, and the
//! `Wire` they share: how publishers wake the connection's task, an administrator's
//! request to close it, and what the admin API shows of an MQTT connection.
//!
//! One allocation per connection, found through the sessions registry: every idle
//! connection pays for each byte here (docs/benchmarks.md), so the admin API's record
//! is not kept in a map of its own.

use crate::observe::clients::LiveClient;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use tokio::sync::Notify;

/// The connection currently serving a session.
#[derive(Clone)]
pub struct Link {
    pub conn_id: u64,
    pub wire: Arc<Wire>,
}

impl Link {
    pub fn new(conn_id: u64, wire: Arc<Wire>) -> Link {
        Link { conn_id, wire }
    }
}

/// What a session, its connection and the admin API share about that connection.
pub struct Wire {
    wake: Notify,
    /// An administrator asked for this connection to close.
    kicked: AtomicBool,
    /// What the admin API shows of an MQTT connection (None: an HTTP stream).
    client: Option<LiveClient>,
}

impl Wire {
    pub fn new(client: Option<LiveClient>) -> Wire {
        Wire {
            wake: Notify::new(),
            kicked: AtomicBool::new(false),
            client,
        }
    }

    /// Wakes the connection's task; a wake-up before it waits is kept for its next wait.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Completes once woken (at once if woken since the last wait completed).
    pub fn woken(&self) -> impl std::future::Future<Output = ()> + '_ {
        self.wake.notified()
    }

    pub fn client(&self) -> Option<&LiveClient> {
        self.client.as_ref()
    }

    /// Asks the MQTT connection to close (5.0: DISCONNECT 0x98 Administrative action).
    /// False for an HTTP stream, which the admin API does not close.
    pub fn kick(&self) -> bool {
        if self.client.is_none() {
            return false;
        }
        self.kicked.store(true, Relaxed);
        self.wake();
        true
    }

    /// Whether an administrator asked for this connection to close.
    pub fn is_kicked(&self) -> bool {
        self.kicked.load(Relaxed)
    }
}

impl Default for Wire {
    /// A wire without a client record (HTTP streams, tests, tools).
    fn default() -> Wire {
        Wire::new(None)
    }
}
