//! Why a connection ended, and what follows from it: the will, the last DISCONNECT, how
//! it is logged, and whether the socket lingers so the client can read the reason.

use crate::protocol::ReasonCode;
use std::borrow::Cow;
use std::io;

#[derive(Debug)]
pub enum Exit {
    /// DISCONNECT from the client; `will` if it asked for its will anyway (5.0 0x04).
    Disconnect {
        will: bool,
    },
    /// The socket closed (None) or failed without a DISCONNECT.
    Closed(Option<io::Error>),
    /// A protocol violation by the client; answered in 5.0 with this reason code.
    Violation(ReasonCode, Cow<'static, str>),
    /// A limit of the broker closed it (docs/security.md); 5.0 gets this reason code.
    Limit(ReasonCode, Cow<'static, str>),
    KeepAliveTimeout,
    /// The token the client logged in with expired (`exp` + leeway).
    TokenExpired,
    TakenOver,
    /// An administrator closed it (the admin API).
    Administrative,
    Shutdown,
}

/// What to do about an exit.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub publish_will: bool,
    /// The reason sent in a 5.0 DISCONNECT, if the server sends one.
    pub disconnect: Option<ReasonCode>,
}

pub(super) fn violation(code: ReasonCode, why: impl Into<Cow<'static, str>>) -> Exit {
    Exit::Violation(code, why.into())
}

pub(super) fn limit(code: ReasonCode, why: impl Into<Cow<'static, str>>) -> Exit {
    Exit::Limit(code, why.into())
}

impl Exit {
    pub fn outcome(&self) -> Outcome {
        let (publish_will, disconnect) = match self {
            Exit::Disconnect { will } => (*will, None),
            Exit::Closed(_) => (true, None),
            Exit::Violation(code, _) | Exit::Limit(code, _) => (true, Some(*code)),
            Exit::KeepAliveTimeout => (true, Some(ReasonCode::KeepAliveTimeout)),
            // "Connected longer than allowed": the client may come back with a new token.
            Exit::TokenExpired => (true, Some(ReasonCode::MaximumConnectTime)),
            Exit::TakenOver => (true, Some(ReasonCode::SessionTakenOver)),
            // The server closes it without a DISCONNECT from the client: the will goes
            // out [MQTT-3.1.2-8].
            Exit::Administrative => (true, Some(ReasonCode::AdministrativeAction)),
            // Wills are for clients that vanish, not for a broker that stops.
            Exit::Shutdown => (false, Some(ReasonCode::ServerShuttingDown)),
        };
        Outcome {
            publish_will,
            disconnect,
        }
    }

    /// The reason string of the server's DISCONNECT.
    pub fn reason(&self) -> Cow<'static, str> {
        match self {
            Exit::Violation(_, why) | Exit::Limit(_, why) => why.clone(),
            Exit::KeepAliveTimeout => "keep-alive timeout".into(),
            Exit::TokenExpired => "token expired".into(),
            Exit::TakenOver => "session taken over".into(),
            Exit::Administrative => "disconnected by an administrator".into(),
            Exit::Shutdown => "server shutting down".into(),
            Exit::Disconnect { .. } | Exit::Closed(_) => "".into(),
        }
    }

    /// Logs the end of a connection: a client misbehaving is a warning, the rest news.
    pub fn log(&self) {
        match self {
            Exit::Disconnect { .. } => tracing::info!("disconnected"),
            Exit::Closed(None) => tracing::info!("connection closed without DISCONNECT"),
            Exit::Closed(Some(e)) => {
                tracing::info!("connection lost without DISCONNECT");
                tracing::debug!("socket error: {e}");
            }
            Exit::Violation(code, why) => {
                crate::warn_limited!(reason = *code as u8; "protocol violation: {why}; closing");
            }
            Exit::Limit(code, why) => crate::warn_limited!(reason = *code as u8; "{why}; closing"),
            Exit::KeepAliveTimeout => tracing::info!("keep-alive timeout; closing"),
            Exit::TokenExpired => tracing::info!("token expired; closing"),
            Exit::TakenOver => tracing::info!("session taken over by a new connection; closing"),
            Exit::Administrative => tracing::info!("disconnected by an administrator; closing"),
            Exit::Shutdown => tracing::debug!("closing for shutdown"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wills_follow_every_end_but_disconnect_and_shutdown() {
        let cases = [
            (Exit::Disconnect { will: false }, false, None),
            (Exit::Disconnect { will: true }, true, None),
            (Exit::Closed(None), true, None),
            (
                violation(ReasonCode::MalformedPacket, "bad"),
                true,
                Some(ReasonCode::MalformedPacket),
            ),
            (
                Exit::KeepAliveTimeout,
                true,
                Some(ReasonCode::KeepAliveTimeout),
            ),
            (
                Exit::TokenExpired,
                true,
                Some(ReasonCode::MaximumConnectTime),
            ),
            (Exit::TakenOver, true, Some(ReasonCode::SessionTakenOver)),
            (
                Exit::Administrative,
                true,
                Some(ReasonCode::AdministrativeAction),
            ),
            (Exit::Shutdown, false, Some(ReasonCode::ServerShuttingDown)),
        ];
        for (exit, publish_will, disconnect) in cases {
            assert_eq!(
                exit.outcome(),
                Outcome {
                    publish_will,
                    disconnect
                },
                "{exit:?}"
            );
        }
    }
}
