//! A listener's rules (from its `[[listeners]]` table) and its gauges, shared by its
//! connections and read by `/metrics` and the admin API.

use crate::config::Listener;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// What a listener allows, shared by its connections.
#[derive(Debug, Default)]
pub struct ListenerRules {
    /// Connections at once on this listener (0 = no limit of its own).
    pub max_connections: usize,
    /// Clients without credentials get in.
    pub allow_anonymous: bool,
    /// The client certificate's identity is the username (TLS listeners).
    pub identity_as_username: bool,
    /// Connections open now on this listener.
    open: AtomicUsize,
    /// Of those, the idle ones parked without a task (`transport::park`).
    pub parked: AtomicUsize,
    /// How `/metrics` names the listener (e.g. `mqtt://127.0.0.1:1883`).
    pub name: String,
    /// Connections accepted, and accept calls that failed, since the start.
    pub accepted: AtomicU64,
    pub accept_errors: AtomicU64,
    /// MQTT clients connected now (past CONNECT), by protocol version (3.1, 3.1.1, 5.0).
    pub clients: [AtomicUsize; 3],
}

impl ListenerRules {
    pub fn new(listener: &Listener) -> ListenerRules {
        ListenerRules {
            max_connections: listener.max_connections,
            allow_anonymous: listener.allow_anonymous,
            identity_as_username: listener
                .tls
                .as_ref()
                .is_some_and(|t| t.identity_as_username.is_some()),
            open: AtomicUsize::new(0),
            parked: AtomicUsize::new(0),
            name: String::new(),
            accepted: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
            clients: Default::default(),
        }
    }

    /// Connections open now on this listener (in the handshake or connected).
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Counts a connection opened here; returns the count with it.
    pub(crate) fn enter(&self) -> usize {
        self.open.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Counts a connection closed (`broker::Opened` dropped).
    pub(crate) fn leave(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// A listener with no limit of its own that lets anonymous clients in (tests, tools).
    pub fn open() -> ListenerRules {
        ListenerRules {
            allow_anonymous: true,
            ..ListenerRules::default()
        }
    }
}
