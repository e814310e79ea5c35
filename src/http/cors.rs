//! Cross-origin requests: an allow-list of origins (`cors_origins`), nothing open by
//! default. A request from a page of another origin is refused outright (403), not only
//! hidden from the page: SSE and poll open sessions and publish has effects, so a page
//! the list does not name must not cause them (a form POST needs no preflight).

use super::reply::{Body, HttpError};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};

/// The origin side of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// No `Origin` header: not from a browser page (curl, a server), or same-origin GET.
    Absent,
    /// From a page of a listed origin: the answer names it.
    Allowed(HeaderValue),
}

/// Checks the request's `Origin` against the allow-list.
pub fn check(origin: Option<&HeaderValue>, allowed: &[String]) -> Result<Origin, HttpError> {
    let Some(origin) = origin else {
        return Ok(Origin::Absent);
    };
    let listed = origin
        .to_str()
        .is_ok_and(|o| allowed.iter().any(|a| a.eq_ignore_ascii_case(o)));
    if listed {
        Ok(Origin::Allowed(origin.clone()))
    } else {
        Err(HttpError::new(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            format!("origin {origin:?} is not in this listener's cors_origins"),
        ))
    }
}

/// Adds the CORS headers of an answer to an allowed origin.
pub fn apply(origin: &Origin, headers: &mut HeaderMap) {
    if let Origin::Allowed(o) = origin {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o.clone());
        headers.insert(header::VARY, HeaderValue::from_static("Origin"));
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("Retry-After"),
        );
    }
}

/// The answer to a preflight (OPTIONS) from an allowed origin (`Absent`: not a CORS
/// request, answered with the methods only).
pub fn preflight(origin: &Origin, methods: &'static str) -> Response<Body> {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let h = resp.headers_mut();
    h.insert(header::ALLOW, HeaderValue::from_static(methods));
    if let Origin::Allowed(_) = origin {
        apply(origin, h);
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(methods),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("Authorization, Content-Type, Last-Event-ID"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list() {
        let list = vec!["http://app.example".to_string()];
        assert_eq!(check(None, &list).unwrap(), Origin::Absent);
        let ok = HeaderValue::from_static("http://APP.example");
        assert_eq!(
            check(Some(&ok), &list).unwrap(),
            Origin::Allowed(ok.clone())
        );
        let other = HeaderValue::from_static("http://evil.example");
        assert_eq!(
            check(Some(&other), &list).unwrap_err().status,
            StatusCode::FORBIDDEN
        );
        assert!(check(Some(&ok), &[]).is_err(), "nothing is open by default");
        let resp = preflight(&Origin::Allowed(ok.clone()), "GET, OPTIONS");
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        assert_eq!(resp.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN], ok);
        assert!(resp.headers()[header::ACCESS_CONTROL_ALLOW_HEADERS]
            .to_str()
            .unwrap()
            .contains("Last-Event-ID"));
    }
}
