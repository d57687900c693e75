//! Starlette's `CORSMiddleware` (`starlette/middleware/cors.py`).

use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, ACCESS_CONTROL_ALLOW_CREDENTIALS,
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_HEADERS,
    ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use hyper::{Method, StatusCode};
use regex::Regex;

use super::{add_vary, header_str, latin1, plain_text, CorsConfig, MiddlewareError, Pending, Step};
use crate::errors::HttpResponse;

const PREFLIGHT_VARY: &str = "Origin, Access-Control-Request-Method, \
                              Access-Control-Request-Headers, Access-Control-Request-Private-Network";
static ACCESS_CONTROL_REQUEST_PRIVATE_NETWORK: HeaderName =
    HeaderName::from_static("access-control-request-private-network");
static ACCESS_CONTROL_ALLOW_PRIVATE_NETWORK: HeaderName =
    HeaderName::from_static("access-control-allow-private-network");

#[derive(Debug)]
pub(super) struct Cors {
    allow_origins: Vec<String>,
    allow_origin_regex: Option<Regex>,
    allow_all_origins: bool,
    allow_all_headers: bool,
    allow_credentials: bool,
    allow_private_network: bool,
    preflight_explicit_allow_origin: bool,
    allow_methods: Vec<String>,
    /// Lower-cased, safelisted headers included.
    allow_headers: Vec<String>,
    simple_headers: Vec<(HeaderName, HeaderValue)>,
    preflight_headers: HeaderMap,
}

impl Cors {
    pub(super) fn new(c: CorsConfig) -> Result<Self, MiddlewareError> {
        let compiled = c.compile()?;
        let allow_all_origins = c.allows_all_origins();
        let preflight_explicit_allow_origin = !allow_all_origins || c.allow_credentials;

        let mut simple_headers = Vec::new();
        if allow_all_origins {
            simple_headers.push((ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*")));
        }
        if c.allow_credentials {
            simple_headers.push((
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            ));
        }
        if let Some(expose) = compiled.expose_headers {
            simple_headers.push((ACCESS_CONTROL_EXPOSE_HEADERS, expose));
        }

        let mut preflight_headers = HeaderMap::new();
        preflight_headers.insert(VARY, HeaderValue::from_static(PREFLIGHT_VARY));
        if !preflight_explicit_allow_origin {
            preflight_headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
        }
        preflight_headers.insert(ACCESS_CONTROL_ALLOW_METHODS, compiled.allow_methods_value);
        preflight_headers.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from(c.max_age));
        if let Some(allow_headers) = compiled.allow_headers_value {
            preflight_headers.insert(ACCESS_CONTROL_ALLOW_HEADERS, allow_headers);
        }
        if c.allow_credentials {
            preflight_headers.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        Ok(Self {
            allow_all_headers: c.allows_all_headers(),
            allow_origins: c.allow_origins,
            allow_origin_regex: compiled.allow_origin_regex,
            allow_all_origins,
            allow_credentials: c.allow_credentials,
            allow_private_network: c.allow_private_network,
            preflight_explicit_allow_origin,
            allow_methods: compiled.allow_methods,
            allow_headers: compiled
                .allow_headers
                .iter()
                .map(|h| h.to_lowercase())
                .collect(),
            simple_headers,
            preflight_headers,
        })
    }

    fn is_allowed_origin(&self, origin: &str) -> bool {
        self.allow_all_origins
            || self
                .allow_origin_regex
                .as_ref()
                .is_some_and(|r| r.is_match(origin))
            || self.allow_origins.iter().any(|o| o == origin)
    }

    pub(super) fn on_request<B>(&self, req: &hyper::Request<B>) -> Step {
        let headers = req.headers();
        let origin = headers.get(ORIGIN);
        if origin.is_some()
            && req.method() == Method::OPTIONS
            && headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD)
        {
            return Step::Respond(self.preflight(headers));
        }
        Step::Continue(Pending::Cors {
            origin: origin.cloned(),
        })
    }

    fn preflight(&self, request: &HeaderMap) -> HttpResponse {
        let mut headers = self.preflight_headers.clone();
        let mut failures: Vec<&str> = Vec::new();
        let origin = request
            .get(ORIGIN)
            .cloned()
            .unwrap_or(HeaderValue::from_static(""));
        if self.is_allowed_origin(&latin1(&origin)) {
            if self.preflight_explicit_allow_origin {
                headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            }
        } else {
            failures.push("origin");
        }
        let method = header_str(request, &ACCESS_CONTROL_REQUEST_METHOD).unwrap_or_default();
        if !self.allow_methods.contains(&method) {
            failures.push("method");
        }
        if let Some(requested) = request.get(ACCESS_CONTROL_REQUEST_HEADERS) {
            if self.allow_all_headers {
                headers.insert(ACCESS_CONTROL_ALLOW_HEADERS, requested.clone());
            } else if latin1(requested)
                .to_lowercase()
                .split(',')
                .any(|h| !self.allow_headers.iter().any(|a| a == h.trim()))
            {
                failures.push("headers");
            }
        }
        if request.contains_key(&ACCESS_CONTROL_REQUEST_PRIVATE_NETWORK) {
            if self.allow_private_network {
                headers.insert(
                    ACCESS_CONTROL_ALLOW_PRIVATE_NETWORK.clone(),
                    HeaderValue::from_static("true"),
                );
            } else {
                failures.push("private-network");
            }
        }
        if failures.is_empty() {
            plain_text(StatusCode::OK, "OK", headers)
        } else {
            let text = format!("Disallowed CORS {}", failures.join(", "));
            plain_text(StatusCode::BAD_REQUEST, text, headers)
        }
    }

    pub(super) fn on_response(
        &self,
        origin: Option<HeaderValue>,
        mut response: HttpResponse,
    ) -> HttpResponse {
        let headers = response.headers_mut();
        let Some(origin) = origin else {
            add_vary(headers, "Origin");
            return response;
        };
        for (name, value) in &self.simple_headers {
            headers.insert(name.clone(), value.clone());
        }
        let explicit = if self.allow_all_origins {
            self.allow_credentials
        } else {
            self.is_allowed_origin(&latin1(&origin))
        };
        if explicit {
            headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        }
        add_vary(headers, "Origin");
        response
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{h, request, run, stack};
    use super::*;

    #[tokio::test]
    async fn cors_simple_requests() {
        let m = stack(
            r#"[{"name": "CORSMiddleware", "options": {"allow_origins": ["*"], "expose_headers": ["X-A", "X-B"]}}]"#,
        );
        let (r, called, _) = run(
            &m,
            request("GET", &[("origin", "https://a.com")]),
            b"hi".to_vec(),
            &[],
        )
        .await;
        assert!(called);
        assert_eq!(h(&r, "access-control-allow-origin"), Some("*"));
        assert_eq!(h(&r, "access-control-expose-headers"), Some("X-A, X-B"));
        assert_eq!(h(&r, "vary"), Some("Origin"));
        // No Origin: no CORS headers, but Vary: Origin joined to the app's Vary.
        let (r, _, _) = run(
            &m,
            request("GET", &[]),
            b"hi".to_vec(),
            &[("vary", "Accept")],
        )
        .await;
        assert_eq!(h(&r, "access-control-allow-origin"), None);
        assert_eq!(h(&r, "vary"), Some("Accept, Origin"));

        // Explicit origins are mirrored; others get nothing.
        let m = stack(
            r#"[{"name": "CORSMiddleware", "options": {"allow_origins": ["https://a.com"], "allow_origin_regex": "https://.*\\.b\\.com", "allow_credentials": true}}]"#,
        );
        let (r, _, _) = run(
            &m,
            request("GET", &[("origin", "https://a.com")]),
            vec![],
            &[],
        )
        .await;
        assert_eq!(h(&r, "access-control-allow-origin"), Some("https://a.com"));
        assert_eq!(h(&r, "access-control-allow-credentials"), Some("true"));
        let (r, _, _) = run(
            &m,
            request("GET", &[("origin", "https://x.b.com")]),
            vec![],
            &[],
        )
        .await;
        assert_eq!(
            h(&r, "access-control-allow-origin"),
            Some("https://x.b.com")
        );
        // fullmatch: a suffix does not make a match.
        let (r, _, _) = run(
            &m,
            request("GET", &[("origin", "https://x.b.com.evil")]),
            vec![],
            &[],
        )
        .await;
        assert_eq!(h(&r, "access-control-allow-origin"), None);
        assert_eq!(h(&r, "vary"), Some("Origin"));
        // "*" with credentials mirrors the origin.
        let m = stack(
            r#"[{"name": "CORSMiddleware", "options": {"allow_origins": ["*"], "allow_credentials": true}}]"#,
        );
        let (r, _, _) = run(
            &m,
            request("GET", &[("origin", "https://z.com")]),
            vec![],
            &[],
        )
        .await;
        assert_eq!(h(&r, "access-control-allow-origin"), Some("https://z.com"));
    }

    #[tokio::test]
    async fn cors_preflight() {
        let m = stack(
            r#"[{"name": "CORSMiddleware", "options": {"allow_origins": ["https://a.com"], "allow_methods": ["GET", "POST"], "allow_headers": ["X-Token"], "max_age": 60}}]"#,
        );
        let pre = |origin: &'static str, method: &'static str, hdrs: Option<&'static str>| {
            let mut v = vec![
                ("origin", origin),
                ("access-control-request-method", method),
            ];
            if let Some(x) = hdrs {
                v.push(("access-control-request-headers", x));
            }
            request("OPTIONS", &v)
        };
        let (r, called, body) = run(
            &m,
            pre("https://a.com", "POST", Some("x-token, content-type")),
            vec![],
            &[],
        )
        .await;
        assert!(!called, "a preflight never reaches the app");
        assert_eq!((r.status(), &body[..]), (StatusCode::OK, &b"OK"[..]));
        assert_eq!(h(&r, "access-control-allow-origin"), Some("https://a.com"));
        assert_eq!(h(&r, "access-control-allow-methods"), Some("GET, POST"));
        assert_eq!(
            h(&r, "access-control-allow-headers"),
            Some("Accept, Accept-Language, Content-Language, Content-Type, X-Token")
        );
        assert_eq!(h(&r, "access-control-max-age"), Some("60"));
        assert_eq!(h(&r, "vary"), Some(PREFLIGHT_VARY));
        assert_eq!(h(&r, "content-type"), Some("text/plain; charset=utf-8"));

        let (r, _, body) = run(
            &m,
            pre("https://evil.com", "DELETE", Some("x-other")),
            vec![],
            &[],
        )
        .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(&body[..], b"Disallowed CORS origin, method, headers");
        assert_eq!(h(&r, "access-control-allow-origin"), None);

        // OPTIONS without Access-Control-Request-Method is a simple request.
        let (_, called, _) = run(
            &m,
            request("OPTIONS", &[("origin", "https://a.com")]),
            vec![],
            &[],
        )
        .await;
        assert!(called);

        // allow_methods "*" and allow_headers "*": mirrored headers, all methods.
        let m = stack(
            r#"[{"name": "CORSMiddleware", "options": {"allow_origins": ["*"], "allow_methods": ["*"], "allow_headers": ["*"]}}]"#,
        );
        let (r, _, _) = run(
            &m,
            pre("https://q.com", "PATCH", Some("X-Anything")),
            vec![],
            &[],
        )
        .await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(h(&r, "access-control-allow-origin"), Some("*"));
        assert_eq!(h(&r, "access-control-allow-headers"), Some("X-Anything"));
        assert_eq!(
            h(&r, "access-control-allow-methods"),
            Some("DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT, QUERY")
        );
    }
}
