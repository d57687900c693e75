//! The HTTP server (hyper 1.x, HTTP/1.1 and HTTP/2 via hyper-util's auto
//! builder) and the request path, as named steps in this order:
//!
//! 1. `builtin`: `/-/routes`, `/-/healthz`, `/-/metrics` (and
//!    [`crate::dashboard`]'s `/-/dashboard`), first so user
//!    routes can never shadow health checks, and outside the middlewares
//!    (a TrustedHost or CORS setting never breaks health checks), except
//!    that CORS covers `/-/routes`, as in Ray Serve.
//! 2. `middleware`: the configured Starlette middlewares wrap every step
//!    below, outermost first; they may answer themselves (a CORS
//!    preflight, a bad Host) and see every response, errors included.
//! 3. route lookup on the percent-decoded path (400 when it is not UTF-8
//!    or holds a NUL), the same path the app gets as ASGI `path`, the raw
//!    one as `raw_path`: matchit (404 / 405 + `Allow`) before reading the
//!    body, so a request for no route costs no body buffering.
//! 4. `read_body`: Content-Length checked early, then a hard limit while
//!    reading (413), because chunked bodies declare no length; the bytes
//!    held count against the proxy's body budget (503) and the whole body
//!    must arrive within `body_read_timeout` (408).
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
//!
//! Every connection is bounded before any of this (`serve_connections`,
//! [`crate::limits`]): a connection cap, idle and handshake deadlines,
//! hyper's header-read timeout and HTTP/2 limits.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONTENT_LENGTH};
use hyper::service::service_fn;
use hyper::StatusCode;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serval_protos::frame::{HttpRequest, Payload, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::builtin;
use crate::conn_streams::{self, ConnExecutor};
use crate::errors::{self, HttpResponse};
use crate::grpc;
use crate::limits::{ConnActivity, ConnIo, InFlight, Limits, Reservation};
use crate::metrics::{NO_ENDPOINT_LABEL, OPEN_CONNECTIONS, REFUSED_TOTAL};
use crate::proxy::Proxy;
use crate::route::{self, LookupError, RouteMatch};
use crate::routing::{ChunkStream, Reply, StreamError, MAX_SHARD_KEY_BYTES};

/// Header that selects the method to call instead of `__call__`.
pub const CALL_METHOD_HEADER: &str = "x-serve-call-method";
/// Header whose value picks the backend of a traffic split by its hash, so
/// one key always reaches the same backend (Ray Serve 1.x).
pub const SHARD_KEY_HEADER: &str = "x-serve-shard-key";
/// At most one refusal warning in the log per this many seconds.
const REFUSAL_LOG_EVERY_S: u64 = 10;
/// Pause after a failed accept (e.g. out of file descriptors) so the loop
/// does not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE_MS: u64 = 50;

/// Serves HTTP on `listener` until `shutdown` resolves, then stops accepting
/// and waits up to the configured grace period for open connections.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, shutdown: impl Future<Output = ()>) {
    let limits = proxy.limits.clone();
    let grace = proxy.shutdown_grace;
    let sampler = crate::dashboard::spawn_sampler(proxy.clone());
    let dashboard_of = proxy.clone();
    let shutdown = async move {
        shutdown.await;
        // Event streams never end by themselves: end them, or every open
        // page would hold its connection through the whole grace period.
        dashboard_of.dashboard.close_streams();
    };
    serve_connections(
        listener,
        "http",
        &limits,
        grace,
        shutdown,
        move |req, peer| {
            let proxy = proxy.clone();
            async move {
                // gRPC streams through; HTTP answers are whole.
                if grpc::is_grpc(&req) {
                    grpc::handle(&proxy, req).await.map(ResponseBody::Grpc)
                } else if crate::dashboard::is_dashboard(req.uri().path()) {
                    dashboard(&proxy, req).await
                } else {
                    http_body(handle(&proxy, req, &peer).await)
                }
            }
        },
    )
    .await;
    sampler.abort();
}

/// The dashboard's answer, whole or an event stream.
async fn dashboard(
    proxy: &Arc<Proxy>,
    req: hyper::Request<Incoming>,
) -> hyper::Response<ResponseBody> {
    match crate::dashboard::handle(proxy, req).await {
        (head, Some(events)) => head.map(|_| ResponseBody::Events(events)),
        (response, None) => response.map(ResponseBody::Http),
    }
}

/// Serves this process's Prometheus text on every path of `listener`
/// (`serve start --metrics-port`) but `/-/readyz` (`readiness`) and
/// `/-/dashboard`, which is the dashboard of this process's proxy
/// (`dashboard`; 404 in a process that runs none), under the same
/// connection limits as the proxy, until `shutdown` resolves.
pub async fn serve_metrics(
    listener: TcpListener,
    handle: crate::metrics::MetricsHandle,
    dashboard_of: crate::dashboard::DashboardSlot,
    readiness: crate::readiness::ReadinessSlot,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let handle = Arc::new(handle);
    let grace = Duration::from_secs(1);
    serve_connections(
        listener,
        "metrics",
        &limits,
        grace,
        shutdown,
        move |req: hyper::Request<Incoming>, _peer| {
            let handle = handle.clone();
            let dashboard_of = dashboard_of.clone();
            let readiness = readiness.clone();
            async move {
                if req.uri().path() == crate::readiness::READYZ_PATH {
                    // Up before the head joins or finds a leader, so it
                    // says why a starting head is not ready.
                    return builtin::readiness_text(readiness.check()).map(ResponseBody::Http);
                }
                if !crate::dashboard::is_dashboard(req.uri().path()) {
                    return builtin::metrics_text(&handle).map(ResponseBody::Http);
                }
                match dashboard_of.get() {
                    Some(proxy) => dashboard(proxy, req).await,
                    None => errors::json_error(
                        StatusCode::NOT_FOUND,
                        "this process runs no HTTP proxy, so no dashboard: open it on a head's HTTP port",
                    )
                    .map(ResponseBody::Http),
                }
            }
        },
    )
    .await
}

/// How many refused connections may be getting their 503 at once; beyond
/// it they are closed without one (a flood must not cost a task each).
const MAX_REFUSALS_AT_ONCE: usize = 64;
/// How long a refused connection is kept to read the client's request
/// before closing (closing with unread bytes resets the connection, and
/// the client could lose the 503).
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 59\r\n\r\n{\"error\":\"too many open connections to this proxy; retry\"}\n";

/// The accept loop every listener of this crate runs: connection cap,
/// idle/handshake bounds ([`ConnIo`]), hyper's header and HTTP/2 limits,
/// then `handler` per request, with graceful shutdown.
/// `name` labels its connection metrics (`listener="http"` or `"metrics"`).
async fn serve_connections<H, Fut>(
    listener: TcpListener,
    name: &'static str,
    limits: &Limits,
    grace: Duration,
    shutdown: impl Future<Output = ()>,
    handler: H,
) where
    H: Fn(hyper::Request<Incoming>, Arc<str>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = hyper::Response<ResponseBody>> + Send + 'static,
{
    // hyper-util's GracefulShutdown cannot watch a connection that may
    // upgrade (WebSockets): each connection task watches `stopping` and
    // holds a clone of `open_tx`, so `open_rx` ends when the last one did.
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let (open_tx, mut open_rx) = tokio::sync::mpsc::channel::<()>(1);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS_AT_ONCE));
    let open = metrics::gauge!(OPEN_CONNECTIONS, "listener" => name);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, client)) => {
                    let Ok(permit) = connections.clone().try_acquire_owned() else {
                        refuse(stream, name, &refusals, limits.max_connections);
                        continue;
                    };
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                    }
                    let activity = Arc::new(ConnActivity::default());
                    let io = ConnIo::new(
                        stream,
                        activity.clone(),
                        limits.keep_alive_timeout,
                        limits.header_read_timeout,
                    );
                    // Formatted once per connection, copied into each request.
                    let peer: Arc<str> = client.to_string().into();
                    let handler = handler.clone();
                    let service = service_fn(move |mut req: hyper::Request<Incoming>| {
                        // Held by the response body until it ends (a gRPC
                        // stream), so a busy connection is never idle.
                        let in_flight = activity.start();
                        if req.headers().contains_key(hyper::header::UPGRADE) {
                            // A WebSocket session marks the connection busy itself.
                            req.extensions_mut().insert(activity.clone());
                        }
                        // Boxed: hyper moves the service's future into a
                        // task per HTTP/2 stream, and this one is big (the
                        // ingress's whole state machine): a memcpy of it per
                        // call was a third of the proxy's time on gRPC.
                        let response = Box::pin(handler(req, peer.clone()));
                        async move {
                            let response = response.await;
                            Ok::<_, Infallible>(response.map(|body| ConnBody { body, _in_flight: in_flight }))
                        }
                    });
                    // This connection's streams run in its task (see conn_streams).
                    let executor = ConnExecutor::default();
                    let conn = server_builder(limits, executor.clone())
                        .serve_connection_with_upgrades(TokioIo::new(io), service)
                        .into_owned();
                    let mut conn = conn_streams::Driven::new(conn, &executor);
                    let open = open.clone();
                    open.increment(1.0);
                    let (mut stopping, counted) = (stopping.clone(), open_tx.clone());
                    tokio::spawn(async move {
                        let result = tokio::select! {
                            result = &mut conn => result,
                            _ = async { stopping.wait_for(|s| *s).await.is_ok() } => {
                                conn.conn().graceful_shutdown();
                                conn.await
                            }
                        };
                        drop(counted);
                        if let Err(e) = result {
                            tracing::debug!(%client, error = %e, "connection ended with an error");
                        }
                        open.decrement(1.0);
                        drop(permit);
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
    tracing::info!("stopped accepting; draining connections");
    let _ = stopping_tx.send(true);
    drop(open_tx);
    if tokio::time::timeout(grace, open_rx.recv()).await.is_err() {
        tracing::warn!(?grace, "connections still open after the grace period");
    }
}

/// hyper's server settings from `limits`.
fn server_builder(limits: &Limits, executor: ConnExecutor) -> auto::Builder<ConnExecutor> {
    let mut builder = auto::Builder::new(executor);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_header_list_size(limits.http2_max_header_list_size)
        .keep_alive_interval(limits.http2_keep_alive_interval)
        .keep_alive_timeout(limits.http2_keep_alive_timeout)
        .max_pending_accept_reset_streams(limits.http2_max_pending_reset_streams);
    builder
}

/// Answers a connection over `max_connections` with a 503 (HTTP/1.1; an
/// HTTP/2 client sees the connection close) and closes it, counted in
/// `serval_proxy_refused_total{reason="max_connections",listener}`.
fn refuse(
    stream: TcpStream,
    listener: &'static str,
    refusals: &Arc<Semaphore>,
    max_connections: usize,
) {
    metrics::counter!(REFUSED_TOTAL, "reason" => "max_connections", "listener" => listener)
        .increment(1);
    log_refusal(max_connections);
    let Ok(permit) = refusals.clone().try_acquire_owned() else {
        return; // dropped: closed at once
    };
    tokio::spawn(async move {
        let _permit = permit;
        let mut stream = stream;
        let _ = tokio::time::timeout(REFUSAL_LINGER, async {
            stream.write_all(REFUSAL).await?;
            stream.shutdown().await?;
            // Read (and drop) the request until the client closes.
            let mut buf = [0u8; 4096];
            while stream.read(&mut buf).await? > 0 {}
            Ok::<_, std::io::Error>(())
        })
        .await;
    });
}

/// A warning at most every few seconds: a flood must not flood the log.
fn log_refusal(max_connections: usize) {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST.load(Ordering::Relaxed);
    if now >= last + REFUSAL_LOG_EVERY_S
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(
            max_connections,
            "refusing connections: this proxy has --http-max-connections open (see serval_proxy_refused_total)"
        );
    }
}

/// A response body and the in-flight mark of its request.
struct ConnBody {
    body: ResponseBody,
    _in_flight: InFlight,
}

impl hyper::body::Body for ConnBody {
    type Data = Bytes;
    type Error = grpc::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// What the server sends: a whole HTTP answer, a streamed one (each chunk
/// written as the replica yields it), or a gRPC stream.
enum ResponseBody {
    Http(Full<Bytes>),
    Stream(StreamBody),
    Grpc(grpc::GrpcBody),
    /// The dashboard's server-sent events.
    Events(crate::dashboard::EventStream),
}

/// A streamed reply's body. A failed stream ends with an error, which
/// makes hyper cut the connection (no terminating chunk): that is how an
/// HTTP client learns the body is incomplete. The error is held back one
/// turn, so hyper first flushes the chunks before it.
struct StreamBody {
    stream: ChunkStream,
    failed: Option<StreamError>,
}

impl StreamBody {
    fn poll_chunk(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, grpc::BoxError>>> {
        use std::task::Poll;
        if let Some(e) = self.failed.take() {
            tracing::debug!(error = %e, "a streamed reply ended with an error");
            return Poll::Ready(Some(Err(e.into())));
        }
        match self.stream.poll_next(cx) {
            Poll::Ready(Some(Err(e))) => {
                self.failed = Some(e);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(Some(Ok(chunk))) => Poll::Ready(Some(Ok(hyper::body::Frame::data(chunk)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A streamed reply travels from `forward` to the connection in the
/// response's extensions, past the middlewares (which see its head only).
#[derive(Clone)]
struct StreamedBody(Arc<std::sync::Mutex<Option<ChunkStream>>>);

impl StreamedBody {
    fn take(&self) -> Option<ChunkStream> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Whether `response` is the head of a streamed reply.
pub(crate) fn is_streamed(response: &HttpResponse) -> bool {
    response.extensions().get::<StreamedBody>().is_some()
}

/// The body to send for `response`: its stream when it carries one.
fn http_body(mut response: HttpResponse) -> hyper::Response<ResponseBody> {
    let stream = response
        .extensions_mut()
        .remove::<StreamedBody>()
        .and_then(|s| s.take());
    match stream {
        Some(stream) => response.map(|_| {
            ResponseBody::Stream(StreamBody {
                stream,
                failed: None,
            })
        }),
        None => response.map(ResponseBody::Http),
    }
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
            ResponseBody::Stream(s) => s.poll_chunk(cx),
            ResponseBody::Grpc(b) => std::pin::Pin::new(b).poll_frame(cx),
            ResponseBody::Events(e) => e
                .poll_event(cx)
                .map(|event| event.map(|b| Ok(hyper::body::Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Http(b) => b.is_end_stream(),
            ResponseBody::Stream(_) => false,
            ResponseBody::Grpc(b) => b.is_end_stream(),
            ResponseBody::Events(_) => false,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            ResponseBody::Http(b) => b.size_hint(),
            ResponseBody::Stream(_) => hyper::body::SizeHint::default(),
            ResponseBody::Grpc(b) => b.size_hint(),
            ResponseBody::Events(_) => hyper::body::SizeHint::default(),
        }
    }
}

async fn handle(proxy: &Proxy, req: hyper::Request<Incoming>, client: &str) -> HttpResponse {
    let started = Instant::now();
    let middlewares = proxy.middlewares();
    if let Some(response) = builtin::respond(proxy, req.uri().path()) {
        if req.uri().path() == builtin::ROUTES_PATH {
            // Ray Serve's CORS middleware covered `/-/routes`, so a browser
            // app may list the routes; the other middlewares stay off the
            // built-ins (a TrustedHost setting never breaks health checks).
            return middlewares.run_cors(req, |_| async { response }).await;
        }
        return response;
    }
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
    // Routed on the same decoded path the app reads, never on another.
    let path = match route::decode_path(req.uri().path()) {
        Ok(path) => path.into_owned(),
        Err(e) => {
            let response = errors::json_error(StatusCode::BAD_REQUEST, &e.to_string());
            record(proxy, NO_ENDPOINT_LABEL, response.status(), started);
            return response;
        }
    };
    let matched = match proxy.routes().lookup(&path, req.method().as_str()) {
        Ok(m) => m,
        Err(e) => {
            let response = lookup_error(&req, e);
            record(proxy, NO_ENDPOINT_LABEL, response.status(), started);
            return response;
        }
    };
    if crate::websocket::is_upgrade(&req) {
        let response = crate::websocket::serve(proxy, &matched, req, path, client).await;
        record(proxy, &matched.endpoint, response.status(), started);
        return response;
    }
    let response = match read_body(proxy, req).await {
        Ok((parts, body, _reservation)) => {
            forward(proxy, &matched, parts, path, body, client).await
        }
        Err(response) => response,
    };
    let streamed = response.extensions().get::<StreamedBody>().cloned();
    let mut guard = streamed
        .as_ref()
        .map(|s| s.0.lock().unwrap_or_else(|p| p.into_inner()));
    match guard.as_mut().and_then(|g| g.as_mut()) {
        // A stream counts as one request when it ends.
        Some(stream) => {
            let metrics = proxy.http_metrics.clone();
            let (endpoint, status) = (matched.endpoint.clone(), response.status());
            stream.on_end(move |completed| {
                let status = if completed {
                    status
                } else {
                    StatusCode::INTERNAL_SERVER_ERROR
                };
                metrics.record(&endpoint, status.as_u16(), started.elapsed());
            });
        }
        None => record(proxy, &matched.endpoint, response.status(), started),
    }
    drop(guard);
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

/// Reads the whole body under the proxy's bounds: `max_body_bytes` (413),
/// the shared body budget (503), `body_read_timeout` (408). The
/// reservation holds the body's bytes in the budget until dropped.
pub(crate) async fn read_body(
    proxy: &Proxy,
    req: hyper::Request<Incoming>,
) -> Result<(hyper::http::request::Parts, Bytes, Reservation), HttpResponse> {
    let limit = proxy.max_body_bytes;
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|&n| n > limit as u64) {
        let body_read = n <= OVERSIZE_DRAIN_BYTES && discard(req.into_body()).await;
        return Err(errors::body_too_large(limit, body_read));
    }
    let mut reservation = proxy.body_budget.reservation();
    // Declared: taken whole before reading, so a body never fails half-way.
    if let Some(n) = declared {
        if !reservation.cover(n as usize) {
            return Err(body_budget_refused(proxy));
        }
    }
    let (parts, body) = req.into_parts();
    let timeout = proxy.limits.body_read_timeout;
    match tokio::time::timeout(timeout, collect(proxy, body, &mut reservation)).await {
        Ok(Ok(body)) => Ok((parts, body, reservation)),
        Ok(Err(response)) => Err(response),
        Err(_) => {
            metrics::counter!(REFUSED_TOTAL, "reason" => "body_read_timeout").increment(1);
            Err(errors::body_timeout(timeout))
        }
    }
}

fn body_budget_refused(proxy: &Proxy) -> HttpResponse {
    metrics::counter!(REFUSED_TOTAL, "reason" => "body_budget").increment(1);
    tracing::debug!(
        budget = proxy.limits.max_buffered_body_bytes,
        "request body refused: the proxy's body budget is in use"
    );
    errors::body_budget_exhausted()
}

/// The body's chunks up to `max_body_bytes`, each covered by `reservation`.
async fn collect(
    proxy: &Proxy,
    mut body: Incoming,
    reservation: &mut Reservation,
) -> Result<Bytes, HttpResponse> {
    let limit = proxy.max_body_bytes;
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            errors::json_error(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the request body: {e}"),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        total += data.len();
        // The limit stopped the reading: the rest of the stream is unread.
        if total > limit {
            return Err(errors::body_too_large(limit, false));
        }
        if !reservation.cover(total) {
            return Err(body_budget_refused(proxy));
        }
        chunks.push(data);
    }
    Ok(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => {
            let mut out = BytesMut::with_capacity(total);
            for c in chunks {
                out.extend_from_slice(&c);
            }
            out.freeze()
        }
    })
}

async fn forward(
    proxy: &Proxy,
    matched: &RouteMatch,
    parts: hyper::http::request::Parts,
    path: String,
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
    let shard_key = parts
        .headers
        .get(SHARD_KEY_HEADER)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    if shard_key
        .as_ref()
        .is_some_and(|k| k.len() > MAX_SHARD_KEY_BYTES)
    {
        return errors::json_error(
            StatusCode::BAD_REQUEST,
            &format!("X-SERVE-SHARD-KEY is longer than {MAX_SHARD_KEY_BYTES} bytes"),
        );
    }
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
            path,
            raw_path: parts.uri.path().as_bytes().to_vec(),
            query: parts.uri.query().unwrap_or("").to_owned(),
            headers,
            body: body.into(),
            path_params: matched.path_params.clone(),
            client: client.to_owned(),
            root_path: matched.root_path.clone(),
        }),
    };
    match proxy
        .router()
        .call_streaming(&matched.endpoint, shard_key.as_deref(), request)
        .await
    {
        Ok(Reply { response, stream }) => {
            // A head `to_http` refuses (a bad status) drops the stream,
            // which cancels it.
            let head_ok =
                StatusCode::from_u16(response.status).is_ok_and(|s| !s.is_informational());
            let mut out = to_http(response);
            if let Some(stream) = stream.filter(|_| head_ok) {
                out.extensions_mut()
                    .insert(StreamedBody(Arc::new(std::sync::Mutex::new(Some(stream)))));
            }
            out
        }
        Err(e) => errors::from_router_error(&e, proxy.debug_errors),
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

pub(crate) fn to_http(response: serval_protos::frame::Response) -> HttpResponse {
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
