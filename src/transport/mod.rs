//! Listeners: each accepts connections of one kind and hands their byte streams to
//! `session::connection::serve`, which is the same for every transport.

pub mod tcp;
pub mod ws;
