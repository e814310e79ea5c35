//! The http listener (docs/http.md): web pages and servers reach the broker's sessions,
//! topics and retained messages without an MQTT client.
//!
//! - `GET /sse`: a Server-Sent Events stream of the messages of some topic filters.
//! - `GET /poll`: long polling of the same, acknowledged by the next poll.
//! - `POST /publish`: a message onto a topic, answered once the broker took it.
//!
//! An SSE stream or a poll is a session in the broker's registry, like an MQTT client's:
//! same queue limits, memory budget, expiry, takeover, authentication and ACL. It drains
//! its session through `session::outbox`, which MQTT connections use too.
//!
//! The protocol decisions are made without I/O: `request` (endpoints and parameters),
//! `credentials`, `cors`, `event` (JSON and SSE framing), `publish` (a request → a
//! message or the error), `stream` (`Subscriber`: a session drained by a stream or a
//! poll). `service` is the async edge: authentication off the runtime, the SSE body,
//! the held poll. `transport::http` (the hyper connection, `Handler`, `Body`) and `reply`
//! (JSON answers and errors) are the reusable core of any HTTP listener.

pub mod cors;
pub mod credentials;
pub mod event;
pub mod publish;
pub mod reply;
pub mod request;
pub mod service;
pub mod stream;

pub use reply::{Body, HttpError};
pub use service::HttpService;
