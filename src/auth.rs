//! MQTT 5 enhanced authentication: the CONNECT / AUTH challenge-response exchange.
//!
//! A method is registered by name (`Server::start_with`); a CONNECT naming an
//! Authentication Method starts an exchange with it, and each AUTH packet from the
//! client is one more step, until the method accepts (CONNACK 0x00) or refuses (CONNACK
//! 0x87). A method nobody registered gets CONNACK 0x8C. None is registered by default.

use bytes::Bytes;

pub trait AuthMethod: Send + Sync {
    /// The Authentication Method name clients put in CONNECT, e.g. "SCRAM-SHA-256".
    fn name(&self) -> &str;
    /// Starts one client's exchange.
    fn begin(&self, client_id: &str) -> Box<dyn AuthExchange>;
}

/// The state of one client's authentication, fed with each Authentication Data.
pub trait AuthExchange: Send {
    fn step(&mut self, data: Option<&[u8]>) -> AuthStep;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthStep {
    /// Send this challenge in an AUTH packet (reason 0x18) and wait for the answer.
    Continue(Bytes),
    /// Authenticated; the data, if any, goes into the CONNACK.
    Success(Option<Bytes>),
    /// Not authenticated: CONNACK 0x87 (Not authorized).
    Failure,
}
