//! MQTT 5 enhanced authentication as a step machine: the method's challenges out as AUTH
//! packets, the client's AUTH packets in, until the method accepts or refuses. No I/O:
//! the driver carries the packets.

use crate::protocol::{Auth, ByteStr, Packet, ReasonCode};
use crate::security::enhanced::{AuthExchange, AuthMethod, AuthStep};
use bytes::Bytes;
use std::sync::Arc;

pub(super) struct Exchange {
    method: ByteStr,
    inner: Box<dyn AuthExchange>,
}

/// What the exchange wants next.
#[derive(Debug, PartialEq)]
pub(super) enum Next {
    /// Send this AUTH (Continue authentication) and feed the client's answer back.
    Challenge(Box<Auth>),
    /// Authenticated; the data goes into the CONNACK (or the final AUTH, on
    /// re-authentication), the username, if the method names one, is the client's.
    Done {
        data: Option<Bytes>,
        username: Option<String>,
    },
    /// Refused with this reason.
    Refuse(ReasonCode),
}

impl Exchange {
    /// Starts the exchange for `method` with the client's first data.
    pub(super) fn start(
        methods: &[Arc<dyn AuthMethod>],
        method: &ByteStr,
        client_id: &str,
        data: Option<Bytes>,
    ) -> (Option<Exchange>, Next) {
        let Some(m) = methods.iter().find(|m| m.name() == &**method) else {
            return (None, Next::Refuse(ReasonCode::BadAuthenticationMethod));
        };
        let mut exchange = Exchange {
            method: method.clone(),
            inner: m.begin(client_id),
        };
        let next = exchange.step(data.as_deref());
        (Some(exchange), next)
    }

    /// The client's answer to a challenge.
    pub(super) fn on_packet(&mut self, packet: Packet) -> Next {
        match packet {
            Packet::Auth(a)
                if a.reason == ReasonCode::ContinueAuthentication
                    && a.properties.authentication_method.as_ref() == Some(&self.method) =>
            {
                self.step(a.properties.authentication_data.as_deref())
            }
            _ => Next::Refuse(ReasonCode::ProtocolError),
        }
    }

    fn step(&mut self, data: Option<&[u8]>) -> Next {
        match self.inner.step(data) {
            AuthStep::Success { data, username } => Next::Done { data, username },
            AuthStep::Failure => Next::Refuse(ReasonCode::NotAuthorized),
            AuthStep::Continue(challenge) => {
                let mut auth = Auth {
                    reason: ReasonCode::ContinueAuthentication,
                    ..Auth::default()
                };
                auth.properties.authentication_method = Some(self.method.clone());
                auth.properties.authentication_data = Some(challenge);
                Next::Challenge(Box::new(auth))
            }
        }
    }
}
