//! Who an HTTP request says it is: `Authorization: Bearer <token>`, `Authorization:
//! Basic` (a user of the password file), or `?access_token=` for EventSource, which
//! cannot set headers. The broker's `Authenticator` checks them, as for MQTT.

use super::reply::HttpError;
use base64::Engine;
use hyper::StatusCode;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    None,
    /// A username and password (the password file; a JWT as password works too).
    Basic {
        username: String,
        password: Vec<u8>,
    },
    /// A token (a JWT checked by `[auth.jwt]`).
    Token(String),
}

impl Credentials {
    /// What the `Authenticator` is asked: (username, password).
    pub fn as_login(&self) -> (Option<&str>, Option<&[u8]>) {
        match self {
            Credentials::None => (None, None),
            Credentials::Basic { username, password } => (Some(username), Some(password)),
            Credentials::Token(t) => (None, Some(t.as_bytes())),
        }
    }
}

fn unauthorized(message: &str) -> HttpError {
    HttpError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

/// The credentials of a request: its `Authorization` header, else `access_token`.
pub fn from_request(
    authorization: Option<&[u8]>,
    access_token: Option<&str>,
) -> Result<Credentials, HttpError> {
    let Some(header) = authorization else {
        return Ok(match access_token {
            Some(t) if !t.is_empty() => Credentials::Token(t.to_owned()),
            _ => Credentials::None,
        });
    };
    let header = std::str::from_utf8(header)
        .map_err(|_| unauthorized("the Authorization header is not UTF-8"))?
        .trim();
    let (scheme, value) = header.split_once(' ').unwrap_or((header, ""));
    let value = value.trim();
    if scheme.eq_ignore_ascii_case("bearer") && !value.is_empty() {
        return Ok(Credentials::Token(value.to_owned()));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(value)
            .map_err(|_| unauthorized("Basic credentials are not base64"))?;
        let colon = decoded
            .iter()
            .position(|b| *b == b':')
            .ok_or_else(|| unauthorized("Basic credentials are not user:password"))?;
        let username = String::from_utf8(decoded[..colon].to_vec())
            .map_err(|_| unauthorized("the Basic username is not UTF-8"))?;
        return Ok(Credentials::Basic {
            username,
            password: decoded[colon + 1..].to_vec(),
        });
    }
    Err(unauthorized(
        "the Authorization header must be `Bearer <token>` or `Basic <base64 user:password>`",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes() {
        assert_eq!(from_request(None, None).unwrap(), Credentials::None);
        assert_eq!(from_request(None, Some("")).unwrap(), Credentials::None);
        assert_eq!(
            from_request(None, Some("t.o.k")).unwrap(),
            Credentials::Token("t.o.k".into())
        );
        assert_eq!(
            from_request(Some(b"bearer  abc "), Some("ignored")).unwrap(),
            Credentials::Token("abc".into())
        );
        // "alice:pa:ss"
        assert_eq!(
            from_request(Some(b"Basic YWxpY2U6cGE6c3M="), None).unwrap(),
            Credentials::Basic {
                username: "alice".into(),
                password: b"pa:ss".to_vec()
            }
        );
        for bad in [
            &b"Basic !!"[..],
            b"Basic YWxpY2U=",
            b"Digest x",
            b"Bearer",
            b"\xff",
        ] {
            let e = from_request(Some(bad), None).unwrap_err();
            assert_eq!(e.status, StatusCode::UNAUTHORIZED, "{bad:?}");
        }
    }
}
