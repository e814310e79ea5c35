//! Who a client is after its CONNECT, and what it may do: the decisions of
//! authentication, made on what the credentials check, a certificate or an enhanced
//! authentication exchange found. No I/O: the driver runs the checks.

use super::handshake::{Negotiated, Refusal};
use crate::protocol::{ByteStr, ReasonCode};
use crate::security::acl::{Access, Authorizer};
use crate::security::{AuthResult, Authenticator};
use bytes::Bytes;
use std::time::Duration;

/// A client let in.
#[derive(Debug)]
pub struct Login {
    /// The username the ACL applies to.
    pub username: Option<String>,
    pub authorizer: Authorizer,
    /// Logged in with a token, accepted this much longer: the connection closes then,
    /// and reloading the ACL file does not change its rules.
    pub token_valid_for: Option<Duration>,
    /// MQTT 5 enhanced authentication: the method and the data for the CONNACK.
    pub method: Option<ByteStr>,
    pub data: Option<Bytes>,
}

impl Login {
    /// A client known by a name that something other than a password proved (a
    /// certificate, an enhanced authentication exchange).
    pub fn named(security: &Authenticator, username: Option<String>, client_id: &str) -> Login {
        Login {
            authorizer: security.authorizer(username.as_deref(), client_id, None),
            username,
            token_valid_for: None,
            method: None,
            data: None,
        }
    }
}

/// The result of checking CONNECT's credentials, as the listener allows: verified
/// credentials get in, none get in only where anonymous clients are allowed, wrong ones
/// never (3.1.1 return code 4 / 5.0 0x86; a refused anonymous client 5 / 0x87).
pub(crate) fn decide(result: AuthResult, allow_anonymous: bool) -> Result<Login, Refusal> {
    let (identity, verified) = match result {
        AuthResult::Authenticated(identity) => (identity, true),
        AuthResult::Anonymous(identity) => (identity, false),
        AuthResult::Denied(_) => {
            return Err(Refusal::new(
                ReasonCode::BadUserNameOrPassword,
                "bad username, password or token",
            ))
        }
    };
    if !verified && !allow_anonymous {
        return Err(Refusal::new(
            ReasonCode::NotAuthorized,
            "anonymous clients are not allowed on this listener",
        ));
    }
    Ok(Login {
        token_valid_for: identity.valid_for,
        username: identity.username,
        authorizer: identity.authorizer,
        method: None,
        data: None,
    })
}

/// A will goes out under its client's name: the client must be allowed to publish it.
/// Refused at CONNECT, so that the client knows (mosquitto 2.0.11 accepts the CONNECT
/// and drops the will when it would be published).
pub(super) fn check_will(login: &Login, negotiated: &Negotiated) -> Result<(), Refusal> {
    match &negotiated.will {
        Some(will) if !login.authorizer.check(&will.topic, Access::Write) => Err(Refusal::new(
            ReasonCode::NotAuthorized,
            "the will's topic is not one this client may publish to",
        )),
        _ => Ok(()),
    }
}
