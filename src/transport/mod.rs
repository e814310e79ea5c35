//! Listeners: each accepts connections of one kind and hands their byte streams to
//! `session::connection::serve`, which is the same for every transport. `tls` wraps either kind's sockets in TLS when
//! the listener has a `tls` table.

pub mod tcp;
pub mod tls;
pub mod ws;
