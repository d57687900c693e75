//! Starlette's `CORSMiddleware`, `GZipMiddleware` and
//! `TrustedHostMiddleware`, run natively in the proxy with Starlette's
//! options and observable behaviour (Starlette 1.x sources:
//! `starlette/middleware/{cors,gzip,trustedhost}.py`).
//!
//! The configuration (`HttpOptions.middlewares_json`), its parsing and its
//! checks are `serval_protos::middleware`, which `serve start`, the Python
//! SDK and the controller call; a stack here is built through the same
//! steps, so what validates there builds here.
//!
//! Why not tower-http's `CorsLayer`/`CompressionLayer`: their observable
//! behaviour differs from Starlette's where users can see it. tower-http
//! answers every `OPTIONS` itself (Starlette only a preflight: `Origin` and
//! `Access-Control-Request-Method`), answers a refused preflight with 200
//! instead of 400 "Disallowed CORS ...", adds its own `Vary` list to every
//! response and refuses `allow_credentials` with `*`; its compression
//! negotiates q-values (and answers 406 when nothing is acceptable) where
//! Starlette looks for "gzip" in `Accept-Encoding`, and drops
//! `Content-Length`. Responses here are buffered (`Full<Bytes>`), so each
//! piece is a few lines over `flate2` and `regex`.
//!
//! Nesting is Starlette's: the request passes the middlewares in list
//! order; one may answer itself (a preflight, a bad host), and the answer
//! then passes back out through the middlewares before it only, in reverse
//! order, as does the routed response through all of them.

use std::future::Future;
use std::io::Write;
use std::sync::LazyLock;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, ACCEPT_ENCODING, ACCESS_CONTROL_ALLOW_CREDENTIALS,
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_HEADERS,
    ACCESS_CONTROL_REQUEST_METHOD, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, HOST, LOCATION,
    ORIGIN, VARY,
};
use hyper::{Method, StatusCode};
use regex::Regex;
pub use serval_protos::middleware::{
    parse_config, validate, CorsConfig, GZipConfig, MiddlewareConfig, MiddlewareError,
    TrustedHostConfig, DEFAULT_EXCLUDED_CONTENT_TYPES, SUPPORTED_MIDDLEWARES,
};

use crate::errors::HttpResponse;

/// The compiled middleware stack a proxy runs, outermost first.
#[derive(Debug, Default)]
pub struct Middlewares {
    /// The JSON this stack was built from (snapshots re-send it unchanged).
    source: String,
    layers: Vec<Layer>,
}

#[derive(Debug)]
enum Layer {
    Cors(Cors),
    GZip(GZip),
    TrustedHost(TrustedHost),
}

/// What a middleware remembers of the request for its response.
enum Pending {
    Cors { origin: Option<HeaderValue> },
    GZip { accepts_gzip: bool },
    Nothing,
}

enum Step {
    Continue(Pending),
    Respond(HttpResponse),
}

impl Middlewares {
    pub fn parse(json: &str) -> Result<Self, MiddlewareError> {
        let mut stack = Self::from_configs(parse_config(json)?)?;
        stack.source = json.to_owned();
        Ok(stack)
    }

    pub fn from_configs(configs: Vec<MiddlewareConfig>) -> Result<Self, MiddlewareError> {
        let layers = configs
            .into_iter()
            .map(|c| {
                Ok(match c {
                    MiddlewareConfig::Cors(c) => Layer::Cors(Cors::new(c)?),
                    MiddlewareConfig::GZip(c) => Layer::GZip(GZip::new(c)?),
                    MiddlewareConfig::TrustedHost(c) => Layer::TrustedHost(TrustedHost::new(c)?),
                })
            })
            .collect::<Result<_, MiddlewareError>>()?;
        Ok(Self {
            source: String::new(),
            layers,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Runs `req` through the stack around `inner` (routing and forwarding).
    pub(crate) async fn run<B, F, Fut>(&self, req: hyper::Request<B>, inner: F) -> HttpResponse
    where
        F: FnOnce(hyper::Request<B>) -> Fut,
        Fut: Future<Output = HttpResponse>,
    {
        self.run_layers(req, inner, |_| true).await
    }

    /// Runs `req` through the CORS layers alone around `inner`.
    pub(crate) async fn run_cors<B, F, Fut>(&self, req: hyper::Request<B>, inner: F) -> HttpResponse
    where
        F: FnOnce(hyper::Request<B>) -> Fut,
        Fut: Future<Output = HttpResponse>,
    {
        self.run_layers(req, inner, |layer| matches!(layer, Layer::Cors(_)))
            .await
    }

    async fn run_layers<B, F, Fut>(
        &self,
        req: hyper::Request<B>,
        inner: F,
        include: impl Fn(&Layer) -> bool,
    ) -> HttpResponse
    where
        F: FnOnce(hyper::Request<B>) -> Fut,
        Fut: Future<Output = HttpResponse>,
    {
        let mut entered = Vec::with_capacity(self.layers.len());
        let mut answer = None;
        for layer in self.layers.iter().filter(|layer| include(layer)) {
            match layer.on_request(&req) {
                Step::Continue(pending) => entered.push((layer, pending)),
                Step::Respond(response) => {
                    answer = Some(response);
                    break;
                }
            }
        }
        let mut response = match answer {
            Some(response) => response,
            None => inner(req).await,
        };
        for (layer, pending) in entered.into_iter().rev() {
            response = layer.on_response(pending, response).await;
        }
        response
    }
}

impl Layer {
    fn on_request<B>(&self, req: &hyper::Request<B>) -> Step {
        match self {
            Layer::Cors(c) => c.on_request(req),
            Layer::GZip(g) => Step::Continue(Pending::GZip {
                accepts_gzip: g.accepts_gzip(req.headers()),
            }),
            Layer::TrustedHost(t) => t.on_request(req),
        }
    }

    async fn on_response(&self, pending: Pending, response: HttpResponse) -> HttpResponse {
        match (self, pending) {
            (Layer::Cors(c), Pending::Cors { origin }) => c.on_response(origin, response),
            (Layer::GZip(g), Pending::GZip { accepts_gzip }) => {
                g.on_response(accepts_gzip, response).await
            }
            _ => response,
        }
    }
}

// ---------------------------------------------------------------- helpers

/// A header value as Starlette reads it (latin-1).
fn latin1(value: &HeaderValue) -> String {
    value.as_bytes().iter().map(|&b| b as char).collect()
}

fn header_str(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    headers.get(name).map(latin1)
}

/// Starlette's `PlainTextResponse`.
fn plain_text(status: StatusCode, body: impl Into<Bytes>, headers: HeaderMap) -> HttpResponse {
    let mut response = hyper::Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Starlette's `headers["Vary"] = ", ".join([*headers.getlist("Vary"), value])`.
fn add_vary(headers: &mut HeaderMap, value: &'static str) {
    let mut joined: Vec<u8> = Vec::new();
    for v in headers.get_all(VARY) {
        joined.extend_from_slice(v.as_bytes());
        joined.extend_from_slice(b", ");
    }
    joined.extend_from_slice(value.as_bytes());
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(VARY, v);
    }
}

// ------------------------------------------------------------------- CORS

const PREFLIGHT_VARY: &str = "Origin, Access-Control-Request-Method, \
                              Access-Control-Request-Headers, Access-Control-Request-Private-Network";
static ACCESS_CONTROL_REQUEST_PRIVATE_NETWORK: HeaderName =
    HeaderName::from_static("access-control-request-private-network");
static ACCESS_CONTROL_ALLOW_PRIVATE_NETWORK: HeaderName =
    HeaderName::from_static("access-control-allow-private-network");

#[derive(Debug)]
struct Cors {
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
    fn new(c: CorsConfig) -> Result<Self, MiddlewareError> {
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

    fn on_request<B>(&self, req: &hyper::Request<B>) -> Step {
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

    fn on_response(&self, origin: Option<HeaderValue>, mut response: HttpResponse) -> HttpResponse {
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

// ------------------------------------------------------------------- GZip

#[derive(Debug)]
struct GZip {
    minimum_size: i64,
    level: flate2::Compression,
    exclude_content_types: Vec<String>,
}

/// `content_type.partition(";")[0].strip().lower()`.
fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_lowercase()
}

impl GZip {
    fn new(c: GZipConfig) -> Result<Self, MiddlewareError> {
        let level = c
            .level()?
            .map_or_else(flate2::Compression::default, flate2::Compression::new);
        Ok(Self {
            minimum_size: c.minimum_size,
            level,
            exclude_content_types: c
                .exclude_content_types
                .iter()
                .map(|t| media_type(t))
                .collect(),
        })
    }

    fn accepts_gzip(&self, headers: &HeaderMap) -> bool {
        header_str(headers, &ACCEPT_ENCODING).is_some_and(|v| v.contains("gzip"))
    }

    fn passes_unchanged(&self, response: &HttpResponse) -> bool {
        let headers = response.headers();
        // A streamed reply's body is not here to compress (it goes out
        // chunk by chunk as the replica yields it): it passes as it is.
        if headers.contains_key(CONTENT_ENCODING)
            || response.status() == StatusCode::PARTIAL_CONTENT
            || crate::http::is_streamed(response)
        {
            return true;
        }
        let media_type = media_type(&header_str(headers, &CONTENT_TYPE).unwrap_or_default());
        let major = format!("{}/*", media_type.split('/').next().unwrap_or(""));
        let grpc = media_type.starts_with("application/grpc+");
        self.exclude_content_types
            .iter()
            .any(|t| *t == media_type || *t == major || (grpc && t == "application/grpc"))
    }

    async fn on_response(&self, accepts_gzip: bool, response: HttpResponse) -> HttpResponse {
        if self.passes_unchanged(&response) {
            return response;
        }
        let (mut parts, body) = response.into_parts();
        let body = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(never) => match never {},
        };
        if (body.len() as i64) < self.minimum_size {
            return hyper::Response::from_parts(parts, Full::new(body));
        }
        add_vary(&mut parts.headers, "Accept-Encoding");
        if !accepts_gzip {
            return hyper::Response::from_parts(parts, Full::new(body));
        }
        let mut encoder =
            flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 2), self.level);
        let compressed = match encoder.write_all(&body).and_then(|()| encoder.finish()) {
            Ok(c) => c,
            Err(error) => {
                tracing::warn!(%error, "gzip failed; response sent uncompressed");
                return hyper::Response::from_parts(parts, Full::new(body));
            }
        };
        parts
            .headers
            .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        // hyper frames the new body and sets its Content-Length.
        parts.headers.remove(CONTENT_LENGTH);
        hyper::Response::from_parts(parts, Full::new(Bytes::from(compressed)))
    }
}

// ------------------------------------------------------------ TrustedHost

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
struct TrustedHost {
    allowed_hosts: Vec<String>,
    allow_any: bool,
    www_redirect: bool,
}

impl TrustedHost {
    fn new(c: TrustedHostConfig) -> Result<Self, MiddlewareError> {
        let hosts = c.hosts()?;
        Ok(Self {
            allow_any: hosts.iter().any(|h| h == "*"),
            allowed_hosts: hosts.iter().map(|h| h.to_lowercase()).collect(),
            www_redirect: c.www_redirect,
        })
    }

    fn on_request<B>(&self, req: &hyper::Request<B>) -> Step {
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
    use super::*;

    fn stack(json: &str) -> Middlewares {
        Middlewares::parse(json).unwrap_or_else(|e| panic!("{e}"))
    }

    fn request(method: &str, headers: &[(&str, &str)]) -> hyper::Request<()> {
        let mut b = hyper::Request::builder().method(method).uri("/app?x=1");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn app_response(body: Vec<u8>, headers: &[(&str, &str)]) -> HttpResponse {
        let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
        for (k, v) in headers {
            r.headers_mut().append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        r
    }

    /// Runs a request; the app answers `body` with `headers` and counts calls.
    async fn run(
        m: &Middlewares,
        req: hyper::Request<()>,
        body: Vec<u8>,
        headers: &[(&str, &str)],
    ) -> (HttpResponse, bool, Bytes) {
        let mut called = false;
        let response = m
            .run(req, |_| {
                called = true;
                std::future::ready(app_response(body, headers))
            })
            .await;
        let (parts, b) = response.into_parts();
        let bytes = b.collect().await.unwrap().to_bytes();
        (
            hyper::Response::from_parts(parts, Full::new(bytes.clone())),
            called,
            bytes,
        )
    }

    fn h<'a>(r: &'a HttpResponse, name: &str) -> Option<&'a str> {
        r.headers().get(name).map(|v| v.to_str().unwrap())
    }

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

    #[tokio::test]
    async fn gzip() {
        let m = stack(
            r#"[{"name": "GZipMiddleware", "options": {"minimum_size": 100, "compresslevel": 1}}]"#,
        );
        let big = vec![b'a'; 1000];
        let (r, _, body) = run(
            &m,
            request("GET", &[("accept-encoding", "br, gzip")]),
            big.clone(),
            &[("content-type", "text/plain")],
        )
        .await;
        assert_eq!(h(&r, "content-encoding"), Some("gzip"));
        assert_eq!(h(&r, "vary"), Some("Accept-Encoding"));
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&body[..]), &mut out).unwrap();
        assert_eq!(out, big);
        // Below the minimum: untouched, no Vary.
        let (r, _, body) = run(
            &m,
            request("GET", &[("accept-encoding", "gzip")]),
            vec![b'a'; 99],
            &[],
        )
        .await;
        assert_eq!(
            (h(&r, "content-encoding"), h(&r, "vary"), body.len()),
            (None, None, 99)
        );
        // Not accepted: untouched but Vary (Starlette's IdentityResponder).
        let (r, _, body) = run(&m, request("GET", &[]), big.clone(), &[]).await;
        assert_eq!(
            (h(&r, "content-encoding"), h(&r, "vary"), body.len()),
            (None, Some("Accept-Encoding"), 1000)
        );
        // Already encoded, or an excluded type: untouched.
        let (r, _, body) = run(
            &m,
            request("GET", &[("accept-encoding", "gzip")]),
            big.clone(),
            &[("content-encoding", "br")],
        )
        .await;
        assert_eq!((h(&r, "content-encoding"), body.len()), (Some("br"), 1000));
        let (r, _, body) = run(
            &m,
            request("GET", &[("accept-encoding", "gzip")]),
            big.clone(),
            &[("content-type", "image/png")],
        )
        .await;
        assert_eq!((h(&r, "content-encoding"), body.len()), (None, 1000));
        let (r, _, _) = run(
            &m,
            request("GET", &[("accept-encoding", "gzip")]),
            big,
            &[("content-type", "video/mp4; x=1")],
        )
        .await;
        assert_eq!(h(&r, "content-encoding"), None);
    }

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

    #[tokio::test]
    async fn order_is_outermost_first() {
        // CORS outside TrustedHost: the 400 gets CORS headers.
        let m = stack(
            r#"[{"name": "CORSMiddleware", "options": {"allow_origins": ["*"]}}, {"name": "TrustedHostMiddleware", "options": {"allowed_hosts": ["ok.com"]}}]"#,
        );
        let (r, _, _) = run(
            &m,
            request("GET", &[("host", "bad.com"), ("origin", "https://a.com")]),
            vec![],
            &[],
        )
        .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(h(&r, "access-control-allow-origin"), Some("*"));
        // TrustedHost outside CORS: the 400 comes first, without them.
        let m = stack(
            r#"[{"name": "TrustedHostMiddleware", "options": {"allowed_hosts": ["ok.com"]}}, {"name": "CORSMiddleware", "options": {"allow_origins": ["*"]}}]"#,
        );
        let (r, _, _) = run(
            &m,
            request("GET", &[("host", "bad.com"), ("origin", "https://a.com")]),
            vec![],
            &[],
        )
        .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(h(&r, "access-control-allow-origin"), None);
        // GZip outside CORS: the app's Vary gets Origin, then Accept-Encoding.
        let m = stack(
            r#"[{"name": "GZipMiddleware"}, {"name": "CORSMiddleware", "options": {"allow_origins": ["*"]}}]"#,
        );
        let (r, _, _) = run(
            &m,
            request("GET", &[("accept-encoding", "gzip")]),
            vec![b'z'; 600],
            &[],
        )
        .await;
        assert_eq!(h(&r, "vary"), Some("Origin, Accept-Encoding"));
        assert_eq!(h(&r, "content-encoding"), Some("gzip"));
    }
}
