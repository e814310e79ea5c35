//! ternmq: a lightweight, fast MQTT broker (3.1, 3.1.1 and 5.0).
//!
//! Data flows one way: bytes (`transport`) -> packets (`protocol`) -> the connection's
//! state machine (`conn`) -> the router (`router`) -> the subscribers' sessions
//! (`session`) -> bytes. `broker` holds the shared state and the life of sessions;
//! `server` binds the listeners.
#![warn(unreachable_pub)]

pub mod admin;
pub mod broker;
pub mod budget;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod fuzz;
pub mod http;
pub mod listener;
pub mod message;
pub mod metrics;
pub mod observe;
pub mod protocol;
pub mod recovery;
pub mod router;
pub mod security;
pub mod server;
pub mod session;
pub mod store;
pub mod throttle;
pub mod transport;

pub use broker::Broker;
pub use config::Config;
pub use server::Server;
