//! MQTT 5 enhanced authentication: the CONNECT / AUTH challenge-response exchange, and
//! re-authentication (AUTH 0x19) on a live connection.
//!
//! A method is known by name: SCRAM-SHA-256 is built in (credentials from the password
//! file's SCRAM lines, `ternmq passwd --scram`), others can be registered with
//! `Server::start_with`. A CONNECT naming an Authentication Method starts an exchange
//! with it; each AUTH packet from the client is one more step, until the method accepts
//! (CONNACK 0x00) or refuses (CONNACK 0x87). An unknown method gets CONNACK 0x8C.

use super::scram::{ScramServer, METHOD as SCRAM_METHOD};
use super::Authenticator;
use bytes::Bytes;
use std::sync::Arc;

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
    /// Authenticated: the data, if any, goes into the CONNACK (or the last AUTH); the
    /// username, if the method names one, is the client's for the ACL.
    Success {
        data: Option<Bytes>,
        username: Option<String>,
    },
    /// Not authenticated: CONNACK 0x87 (Not authorized).
    Failure,
}

/// SCRAM-SHA-256 (RFC 5802, RFC 7677) over the CONNECT / AUTH exchange.
pub struct Scram {
    pub authenticator: Arc<Authenticator>,
}

impl AuthMethod for Scram {
    fn name(&self) -> &str {
        SCRAM_METHOD
    }

    fn begin(&self, _client_id: &str) -> Box<dyn AuthExchange> {
        Box::new(ScramExchange {
            authenticator: self.authenticator.clone(),
            server: None,
        })
    }
}

struct ScramExchange {
    authenticator: Arc<Authenticator>,
    /// After the client-first message.
    server: Option<ScramServer>,
}

impl AuthExchange for ScramExchange {
    fn step(&mut self, data: Option<&[u8]>) -> AuthStep {
        let Some(data) = data else {
            return AuthStep::Failure;
        };
        let failed = |e: super::scram::ScramError| {
            tracing::info!("SCRAM authentication failed: {e}");
            AuthStep::Failure
        };
        match self.server.take() {
            None => {
                let Some(file) = self.authenticator.password_file() else {
                    tracing::info!("SCRAM authentication needs a password_file");
                    return AuthStep::Failure;
                };
                match ScramServer::start(&file, data) {
                    Ok((server, first)) => {
                        self.server = Some(server);
                        AuthStep::Continue(Bytes::from(first))
                    }
                    Err(e) => failed(e),
                }
            }
            Some(server) => match server.finish(data) {
                Ok((last, username)) => AuthStep::Success {
                    data: Some(Bytes::from(last)),
                    username: Some(username),
                },
                Err(e) => failed(e),
            },
        }
    }
}
