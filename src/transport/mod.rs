//! Transports: each turns an accepted socket into the byte streams of an MQTT connection
//! and hands them to `conn::serve`, which is the same for every transport. `tls` wraps
//! either kind's sockets in TLS when the listener has a `tls` table.

pub mod http;
pub mod park;
pub mod tcp;
pub mod tls;
pub mod ws;
