//! ternmq: a lightweight, fast MQTT broker (3.1, 3.1.1 and 5.0).
//!
//! Data flows one way: bytes (`transport`) -> packets (`protocol`) -> the client's
//! connection and session (`session`) -> subscribers (`router`) -> their sessions' queues
//! -> bytes. `broker` holds the shared state and starts the listeners.

pub mod auth;
pub mod broker;
pub mod config;
pub mod metrics;
pub mod protocol;
pub mod router;
pub mod session;
pub mod store;
pub mod transport;

pub use broker::{Broker, Server};
pub use config::Config;
