//! The HTTP server (hyper 1.x, HTTP/1.1 and HTTP/2 via hyper-util's auto
//! builder) and the request path, as named steps in this order:
//!
//! 1. `builtin`: `/-/routes`, `/-/healthz`, `/-/metrics`, first so user
//!    routes can never shadow health checks, and outside the middlewares
//!    (a TrustedHost or CORS setting never breaks health checks).
//! 2. `middleware`: the configured Starlette middlewares wrap every step
//!    below, outermost first; they may answer themselves (a CORS
//!    preflight, a bad Host) and see every response, errors included.
//! 3. route lookup: matchit (404 / 405 + `Allow`) before reading the body,
//!    so a request for no route costs no body buffering.
//! 4. `read_body`: Content-Length checked early, then a hard limit while
//!    reading (413), because chunked bodies declare no length.
//! 5. `forward`: build the frame request and call the router, which owns
//!    concurrency limits, queueing, backpressure and the deadline.
//! 6. `record`: metrics labelled by endpoint and status class, never by the
//!    full path (unbounded cardinality).
//!
//! A client that disconnects drops the request future; the router's guards
//! release its slot.
//!
//! gRPC requests (`content-type: application/grpc`) skip all of this and
//! go to [`crate::grpc`].

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONTENT_LENGTH};
use hyper::service::service_fn;
use hyper::StatusCode;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serval_protos::frame::{HttpRequest, Payload, Request};
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::builtin;
use crate::errors::{self, HttpResponse};
use crate::grpc;
use crate::proxy::Proxy;
use crate::route::{LookupError, RouteMatch};

/// Header that selects the method to call instead of `__call__`.
pub const CALL_METHOD_HEADER: &str = "x-serve-call-method";
pub const REQUESTS_TOTAL: &str = "serval_proxy_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "serval_proxy_request_duration_seconds";
/// Endpoint label of requests that matched no endpoint.
const NO_ENDPOINT_LABEL: &str = "-";
/// Pause after a failed accept (e.g. out of file descriptors) so the loop
/// does not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE_MS: u64 = 50;

/// Serves HTTP on `listener` until `shutdown` resolves, then stops accepting
/// and waits up to the configured grace period for open connections.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, shutdown: impl Future<Output = ()>) {
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, client)) => {
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                    }
                    let proxy = proxy.clone();
                    // Formatted once per connection, copied into each request.
                    let peer: Arc<str> = client.to_string().into();
                    let service = service_fn(move |req: hyper::Request<Incoming>| {
                        let proxy = proxy.clone();
                        let peer = peer.clone();
                        async move {
                            // gRPC streams through; HTTP answers are whole.
                            let response = if grpc::is_grpc(&req) {
                                grpc::handle(&proxy, req).await.map(ResponseBody::Grpc)
                            } else {
                                handle(&proxy, req, &peer).await.map(ResponseBody::Http)
                            };
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(%client, error = %e, "connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(ACCEPT_ERROR_PAUSE_MS)).await;
                }
            },
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!(
        open = graceful.count(),
        "proxy stopped accepting; draining connections"
    );
    if tokio::time::timeout(proxy.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?proxy.shutdown_grace, "connections still open after the grace period");
    }
}

/// What the server sends: a whole HTTP answer, or a gRPC stream.
enum ResponseBody {
    Http(Full<Bytes>),
    Grpc(grpc::GrpcBody),
}

impl hyper::body::Body for ResponseBody {
    type Data = Bytes;
    type Error = grpc::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ResponseBody::Http(b) => std::pin::Pin::new(b)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            ResponseBody::Grpc(b) => std::pin::Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Http(b) => b.is_end_stream(),
            ResponseBody::Grpc(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            ResponseBody::Http(b) => b.size_hint(),
            ResponseBody::Grpc(b) => b.size_hint(),
        }
    }
}

async fn handle(proxy: &Proxy, req: hyper::Request<Incoming>, client: &str) -> HttpResponse {
    let started = Instant::now();
    if let Some(response) = builtin::respond(proxy, req.uri().path()) {
        return response;
    }
    let middlewares = proxy.middlewares();
    if middlewares.is_empty() {
        return route_and_forward(proxy, req, client, started).await;
    }
    let mut routed = false;
    let response = middlewares
        .run(req, |req| {
            routed = true;
            route_and_forward(proxy, req, client, started)
        })
        .await;
    if !routed {
        // A middleware answered (a preflight, a refused host).
        record(proxy, NO_ENDPOINT_LABEL, response.status(), started);
    }
    response
}

async fn route_and_forward(
    proxy: &Proxy,
    req: hyper::Request<Incoming>,
    client: &str,
    started: Instant,
) -> HttpResponse {
    let matched = match proxy
        .routes()
        .lookup(req.uri().path(), req.method().as_str())
    {
        Ok(m) => m,
        Err(e) => {
            let response = lookup_error(&req, e);
            record(proxy, NO_ENDPOINT_LABEL, response.status(), started);
            return response;
        }
    };
    let response = match read_body(req, proxy.max_body_bytes).await {
        Ok((parts, body)) => forward(proxy, &matched, parts, body, client).await,
        Err(response) => response,
    };
    record(proxy, &matched.endpoint, response.status(), started);
    response
}

fn lookup_error(req: &hyper::Request<Incoming>, error: LookupError) -> HttpResponse {
    let path = req.uri().path();
    match error {
        LookupError::NotFound => errors::not_found(path),
        LookupError::MethodNotAllowed { allow } => {
            errors::method_not_allowed(req.method().as_str(), path, &allow)
        }
    }
}

/// A body declared too large but no larger than this is read and dropped
/// before the 413 goes out: a client still sending it would otherwise find
/// the connection reset and never see the answer.
const OVERSIZE_DRAIN_BYTES: u64 = 1 << 20;
/// How long that reading may take at most.
const OVERSIZE_DRAIN_TIME: Duration = Duration::from_secs(1);

/// Reads and drops `body`; whether it reached its end in time.
async fn discard(mut body: Incoming) -> bool {
    tokio::time::timeout(OVERSIZE_DRAIN_TIME, async {
        loop {
            match body.frame().await {
                Some(Ok(_)) => {}
                Some(Err(_)) => return false,
                None => return true,
            }
        }
    })
    .await
    .unwrap_or(false)
}

async fn read_body(
    req: hyper::Request<Incoming>,
    limit: usize,
) -> Result<(hyper::http::request::Parts, Bytes), HttpResponse> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|&n| n > limit as u64) {
        let body_read = n <= OVERSIZE_DRAIN_BYTES && discard(req.into_body()).await;
        return Err(errors::body_too_large(limit, body_read));
    }
    let (parts, body) = req.into_parts();
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok((parts, collected.to_bytes())),
        // The limit stopped the reading: the rest of the stream is unread.
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(errors::body_too_large(limit, false))
        }
        Err(e) => Err(errors::json_error(
            StatusCode::BAD_REQUEST,
            &format!("cannot read the request body: {e}"),
        )),
    }
}

async fn forward(
    proxy: &Proxy,
    matched: &RouteMatch,
    parts: hyper::http::request::Parts,
    body: Bytes,
    client: &str,
) -> HttpResponse {
    let method_name = parts
        .headers
        .get(CALL_METHOD_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned);
    let headers = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let request = Request {
        method_name,
        payload: Payload::Http(HttpRequest {
            method: parts.method.as_str().to_owned(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().unwrap_or("").to_owned(),
            headers,
            body: body.into(),
            path_params: matched.path_params.clone(),
            client: client.to_owned(),
        }),
    };
    match proxy.router().call(&matched.endpoint, request).await {
        Ok(response) => to_http(response),
        Err(e) => {
            tracing::debug!(endpoint = %matched.endpoint, error = %e, "request failed");
            errors::from_router_error(&e)
        }
    }
}

/// Headers describing the replica's framing, not the content: hyper frames
/// our response itself.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "content-length"
            | "upgrade"
            | "proxy-connection"
            | "te"
            | "trailer"
    )
}

fn to_http(response: serval_protos::frame::Response) -> HttpResponse {
    let Ok(status) = StatusCode::from_u16(response.status) else {
        return errors::json_error(
            StatusCode::BAD_GATEWAY,
            &format!("replica answered with invalid status {}", response.status),
        );
    };
    // hyper (and HTTP itself) cannot end a response with a 1xx: say so
    // instead of hyper's bare 500.
    if status.is_informational() {
        return errors::json_error(
            StatusCode::BAD_GATEWAY,
            &format!(
                "the backend answered status {}, an interim (1xx) status that cannot end an HTTP response; use 2xx-5xx",
                response.status
            ),
        );
    }
    let mut out = hyper::Response::new(Full::new(Bytes::from(response.body)));
    *out.status_mut() = status;
    for (name, value) in response.headers {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            (Ok(name), Ok(value)) if !is_hop_by_hop(&name) => {
                out.headers_mut().append(name, value);
            }
            (Ok(_), Ok(_)) => {}
            _ => tracing::debug!(header = %name, "replica sent an invalid header; dropped"),
        }
    }
    out
}

fn record(proxy: &Proxy, endpoint: &str, status: StatusCode, started: Instant) {
    proxy
        .http_metrics
        .record(endpoint, status.as_u16(), started.elapsed());
}
