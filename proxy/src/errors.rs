//! Every error the proxy answers itself, as HTTP: JSON `{"error": "..."}`
//! bodies with `content-type: application/json`, one mapping for
//! [`RouterError`] so the HTTP meaning of each failure is decided here only.
//!
//! Clients are anonymous: an error body never names a replica, a socket
//! path, a node or an address unless the proxy runs with `SERVAL_DEBUG`
//! ([`message`]); the detail goes to the log instead.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use hyper::StatusCode;

use crate::routing::RouterError;

pub(crate) type HttpResponse = hyper::Response<Full<Bytes>>;

/// Overload clears quickly: retry soon.
const BACKPRESSURE_RETRY_AFTER_S: &str = "1";
/// Replicas are starting (or the backend is scaling from zero).
const NO_REPLICA_RETRY_AFTER_S: &str = "5";

pub(crate) fn json_error(status: StatusCode, message: &str) -> HttpResponse {
    let body = serde_json::json!({ "error": message }).to_string();
    let mut response = hyper::Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

pub(crate) fn not_found(path: &str) -> HttpResponse {
    json_error(StatusCode::NOT_FOUND, &format!("no route for {path}"))
}

pub(crate) fn method_not_allowed(method: &str, path: &str, allow: &[String]) -> HttpResponse {
    let mut response = json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!(
            "method {method} not allowed for {path}; allowed: {}",
            allow.join(", ")
        ),
    );
    if let Ok(value) = HeaderValue::from_str(&allow.join(", ")) {
        response.headers_mut().insert(ALLOW, value);
    }
    response
}

/// `body_read`: whether the whole body was read (and dropped). When it was
/// not, the connection cannot carry another request, so the answer says
/// `Connection: close`: a client that reused it would find it closed while
/// it writes its next request.
pub(crate) fn body_too_large(limit: usize, body_read: bool) -> HttpResponse {
    let mut response = json_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("request body exceeds the {limit} byte limit"),
    );
    if !body_read {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// The proxy's body budget is taken by other requests' bodies.
pub(crate) fn body_budget_exhausted() -> HttpResponse {
    let mut response = json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the proxy is buffering too many request bodies; retry",
    );
    let headers = response.headers_mut();
    headers.insert(
        RETRY_AFTER,
        HeaderValue::from_static(BACKPRESSURE_RETRY_AFTER_S),
    );
    // The body was not read: the connection cannot carry another request.
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The body did not arrive within `--http-body-read-timeout-s`.
pub(crate) fn body_timeout(after: std::time::Duration) -> HttpResponse {
    let mut response = json_error(
        StatusCode::REQUEST_TIMEOUT,
        &format!(
            "the request body did not arrive within {} s",
            after.as_secs_f64()
        ),
    );
    response
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

/// What a client is told about `error`: the whole detail with `debug`
/// (`SERVAL_DEBUG`), else a message naming nothing internal. The detail is
/// logged either way (at debug for the overload answers, which come in
/// floods and are counted in metrics; at warn for a failed replica).
pub(crate) fn message(error: &RouterError, debug: bool) -> String {
    match error {
        RouterError::ReplicaDied { .. } | RouterError::Protocol { .. } => {
            tracing::warn!(%error, "request failed")
        }
        _ => tracing::debug!(%error, "request failed"),
    }
    if debug {
        return error.to_string();
    }
    match error {
        RouterError::UnknownEndpoint(_) => "the endpoint of this route is not deployed".into(),
        RouterError::NoReplica { .. } => "no replica of this endpoint is running yet; retry".into(),
        RouterError::Backpressure { .. } => {
            "the service is overloaded: every replica is at its limit and the queue is full; retry"
                .into()
        }
        RouterError::ReplicaDied { .. } => "the replica serving the request failed".into(),
        RouterError::Timeout { .. } => error.to_string(),
        RouterError::Protocol { .. } => "the replica's answer could not be read".into(),
    }
}

pub(crate) fn from_router_error(error: &RouterError, debug: bool) -> HttpResponse {
    let (status, retry_after) = match error {
        RouterError::UnknownEndpoint(_) => (StatusCode::NOT_FOUND, None),
        RouterError::Backpressure { .. } => (
            StatusCode::SERVICE_UNAVAILABLE,
            Some(BACKPRESSURE_RETRY_AFTER_S),
        ),
        RouterError::NoReplica { .. } => (
            StatusCode::SERVICE_UNAVAILABLE,
            Some(NO_REPLICA_RETRY_AFTER_S),
        ),
        RouterError::ReplicaDied { .. } | RouterError::Protocol { .. } => {
            (StatusCode::BAD_GATEWAY, None)
        }
        RouterError::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, None),
    };
    let mut response = json_error(status, &message(error, debug));
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static(seconds));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn router_errors_map_to_statuses() {
        let cases = [
            (RouterError::UnknownEndpoint("e".into()), 404, None),
            (
                RouterError::Backpressure {
                    backend: "b".into(),
                    queued: 3,
                },
                503,
                Some("1"),
            ),
            (
                RouterError::NoReplica {
                    endpoint: "e".into(),
                },
                503,
                Some("5"),
            ),
            (
                RouterError::ReplicaDied {
                    replica: "r".into(),
                    reason: "eof".into(),
                },
                502,
                None,
            ),
            (
                RouterError::Timeout {
                    after: Duration::from_secs(1),
                },
                504,
                None,
            ),
        ];
        for (error, status, retry) in cases {
            let r = from_router_error(&error, false);
            assert_eq!(r.status().as_u16(), status, "{error}");
            assert_eq!(
                r.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()),
                retry,
                "{error}"
            );
            assert_eq!(r.headers()[CONTENT_TYPE], "application/json");
        }
    }

    #[test]
    fn internal_detail_only_with_debug() {
        let error = RouterError::ReplicaDied {
            replica: "replica-7f3a".into(),
            reason: "connection to /tmp/x/replica-7f3a.sock closed".into(),
        };
        assert!(!message(&error, false).contains("7f3a"));
        assert!(message(&error, true).contains("replica-7f3a.sock"));
    }
}
