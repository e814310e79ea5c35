//! Transports: each turns an accepted socket into the byte streams of an MQTT connection
//! and hands them to `conn::serve`, which is the same for every transport.

pub mod tcp;
pub mod ws;
