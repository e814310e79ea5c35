//! A client connection: the CONNECT handshake (`handshake`, `auth`), the state machine of
//! an accepted connection (`machine`), how it ends (`exit`), and the task that drives it
//! over a byte stream (`driver`, the only async part).

mod aliases;
mod auth;
mod driver;
mod exit;
mod handshake;
pub(crate) mod login;
mod machine;
pub mod subscribe;

pub(crate) use driver::{assign_client_id, connect_size};
pub use driver::{resume, serve, Idle};
pub use exit::{Exit, Outcome};
pub use handshake::{negotiate, Negotiated, Refusal};
pub use login::Login;
pub use machine::Connection;

use crate::listener::ListenerRules;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Where a connection comes from: the client's address, the rules of the listener that
/// accepted it, and what its TLS handshake proved.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub listener: Arc<ListenerRules>,
    /// The identity of a client certificate, when the listener takes it as username.
    pub tls_identity: Option<String>,
    /// Set once the CONNECT is accepted, for a transport that buffers more than the
    /// packet it is asked for (WebSocket): it holds an unauthenticated peer to
    /// `limits.max_connect_size` until then.
    pub admitted: Option<Arc<AtomicBool>>,
}

impl Peer {
    /// A peer at `addr` on a listener without rules of its own, which lets anonymous
    /// clients in (tests, tools).
    pub fn new(addr: SocketAddr) -> Peer {
        Peer {
            addr,
            listener: Arc::new(ListenerRules::open()),
            tls_identity: None,
            admitted: None,
        }
    }

    /// The CONNECT is accepted: the transport may take packets up to `max_packet_size`.
    pub(crate) fn admit(&self) {
        if let Some(admitted) = &self.admitted {
            admitted.store(true, Ordering::Release);
        }
    }
}
