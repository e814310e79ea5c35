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

pub(crate) use driver::assign_client_id;
pub use driver::{resume, serve, Idle};
pub use exit::{Exit, Outcome};
pub use handshake::{negotiate, Negotiated, Refusal};
pub use login::Login;
pub use machine::Connection;

use crate::listener::ListenerRules;
use std::net::SocketAddr;
use std::sync::Arc;

/// Where a connection comes from: the client's address, the rules of the listener that
/// accepted it, and what its TLS handshake proved.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub listener: Arc<ListenerRules>,
    /// The identity of a client certificate, when the listener takes it as username.
    pub tls_identity: Option<String>,
}

impl Peer {
    /// A peer at `addr` on a listener without rules of its own, which lets anonymous
    /// clients in (tests, tools).
    pub fn new(addr: SocketAddr) -> Peer {
        Peer {
            addr,
            listener: Arc::new(ListenerRules::open()),
            tls_identity: None,
        }
    }
}
