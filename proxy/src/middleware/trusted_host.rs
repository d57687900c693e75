//! Starlette's `TrustedHostMiddleware` (`starlette/middleware/trustedhost.py`).

use std::sync::LazyLock;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderMap, HeaderValue, HOST, LOCATION};
use hyper::StatusCode;
use regex::Regex;

use super::{header_str, plain_text, MiddlewareError, Pending, Step, TrustedHostConfig};
use crate::errors::HttpResponse;

/// Starlette's `_HOST_RE` (`starlette/_utils.py`).
static HOST_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)^(?P<host>[a-z0-9._~%!$&'()*+,;=-]+|\[(?:(?P<ipv6>[a-f0-9]*:[a-f0-9.:]+)|(?-i:v)[a-f0-9]+\.[a-z0-9._~!$&'()*+,;=:-]+)\])(?::(?P<port>[0-9]+))?$",
    )
    .expect("host regex")
});

/// Starlette's `parse_host_header`: (host, authority) or `None` if invalid.
fn parse_host(header: &str) -> Option<(String, String)> {
    let caps = HOST_RE.captures(header)?;
    if let Some(ipv6) = caps.name("ipv6") {
        ipv6.as_str().parse::<std::net::Ipv6Addr>().ok()?;
    }
    Some((caps["host"].to_string(), header.to_string()))
}

/// Python's `urllib.parse.quote(url, safe=":/%#?=@[]!$&'()*+,;")`, as
/// Starlette's `RedirectResponse` quotes its location.
fn quote_location(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    for b in url.bytes() {
        if b.is_ascii_alphanumeric() || b"_.-~:/%#?=@[]!$&'()*+,;".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Debug)]
pub(super) struct TrustedHost {
    allowed_hosts: Vec<String>,
    allow_any: bool,
    www_redirect: bool,
}

impl TrustedHost {
    pub(super) fn new(c: TrustedHostConfig) -> Result<Self, MiddlewareError> {
        let hosts = c.hosts()?;
        Ok(Self {
            allow_any: hosts.iter().any(|h| h == "*"),
            allowed_hosts: hosts.iter().map(|h| h.to_lowercase()).collect(),
            www_redirect: c.www_redirect,
        })
    }

    pub(super) fn on_request<B>(&self, req: &hyper::Request<B>) -> Step {
        if self.allow_any {
            return Step::Continue(Pending::Nothing);
        }
        // HTTP/2 carries the host in `:authority`.
        let header = header_str(req.headers(), &HOST)
            .or_else(|| req.uri().authority().map(|a| a.as_str().to_owned()));
        let Some((host, authority)) = header.as_deref().and_then(parse_host) else {
            return Step::Respond(Self::invalid_host());
        };
        let host = host.to_lowercase();
        let mut found_www_redirect = false;
        for pattern in &self.allowed_hosts {
            if host == *pattern || (pattern.starts_with('*') && host.ends_with(&pattern[1..])) {
                return Step::Continue(Pending::Nothing);
            }
            if format!("www.{host}") == *pattern {
                found_www_redirect = true;
            }
        }
        if found_www_redirect && self.www_redirect {
            let path_and_query = req.uri().path_and_query().map_or("/", |p| p.as_str());
            let location = quote_location(&format!("http://www.{authority}{path_and_query}"));
            let mut response = hyper::Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::TEMPORARY_REDIRECT;
            if let Ok(value) = HeaderValue::from_str(&location) {
                response.headers_mut().insert(LOCATION, value);
            }
            return Step::Respond(response);
        }
        Step::Respond(Self::invalid_host())
    }

    fn invalid_host() -> HttpResponse {
        plain_text(
            StatusCode::BAD_REQUEST,
            "Invalid host header",
            HeaderMap::new(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{h, request, run, stack};
    use super::*;

    #[tokio::test]
    async fn trusted_host() {
        let m = stack(
            r#"[{"name": "TrustedHostMiddleware", "options": {"allowed_hosts": ["example.com", "*.example.org", "www.redirect.com"]}}]"#,
        );
        for good in [
            "example.com",
            "EXAMPLE.com:8000",
            "a.example.org",
            "b.c.example.org:1",
        ] {
            let (r, called, _) =
                run(&m, request("GET", &[("host", good)]), b"x".to_vec(), &[]).await;
            assert!(called && r.status() == StatusCode::OK, "{good}");
        }
        for bad in [
            "evil.com",
            "example.org",
            "example.com.evil",
            "exa mple.com",
            "a/b",
        ] {
            let (r, called, body) = run(&m, request("GET", &[("host", bad)]), vec![], &[]).await;
            assert!(!called, "{bad}");
            assert_eq!(
                (r.status(), &body[..]),
                (StatusCode::BAD_REQUEST, &b"Invalid host header"[..]),
                "{bad}"
            );
        }
        let (r, _, _) = run(&m, request("GET", &[]), vec![], &[]).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let (r, called, _) = run(
            &m,
            request("GET", &[("host", "redirect.com:8000")]),
            vec![],
            &[],
        )
        .await;
        assert!(!called);
        assert_eq!(r.status(), StatusCode::TEMPORARY_REDIRECT);
        assert_eq!(
            h(&r, "location"),
            Some("http://www.redirect.com:8000/app?x=1")
        );
        let m = stack(
            r#"[{"name": "TrustedHostMiddleware", "options": {"allowed_hosts": ["www.redirect.com"], "www_redirect": false}}]"#,
        );
        let (r, _, _) = run(&m, request("GET", &[("host", "redirect.com")]), vec![], &[]).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        // Default: every host.
        let m = stack(r#"[{"name": "TrustedHostMiddleware"}]"#);
        let (_, called, _) = run(&m, request("GET", &[]), vec![], &[]).await;
        assert!(called);
    }
}
