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
//! One file per middleware (`cors`, `gzip`, `trusted_host`); this module
//! holds the stack that chains them ([`Middlewares`]), the steps a layer
//! takes on the way in and out, and the header helpers they share.
//!
//! Nesting is Starlette's: the request passes the middlewares in list
//! order; one may answer itself (a preflight, a bad host), and the answer
//! then passes back out through the middlewares before it only, in reverse
//! order, as does the routed response through all of them.

use std::future::Future;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, VARY};
use hyper::StatusCode;
pub use serval_protos::middleware::{
    parse_config, validate, CorsConfig, GZipConfig, MiddlewareConfig, MiddlewareError,
    TrustedHostConfig, DEFAULT_EXCLUDED_CONTENT_TYPES, SUPPORTED_MIDDLEWARES,
};

use crate::errors::HttpResponse;

mod cors;
mod gzip;
#[cfg(test)]
mod tests;
mod trusted_host;

use cors::Cors;
use gzip::GZip;
use trusted_host::TrustedHost;

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

// ------------------------------------------- helpers the middlewares share

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
