//! gRPC on the proxy's HTTP port (issue 8): a request with
//! `content-type: application/grpc...` (HTTP/2) comes here instead of the
//! HTTP routes and middlewares.
//!
//! * `/<package>.<Service>/<Method>` of a method the deployed descriptors
//!   declare: terminated here ([`frames`]): a slot on one of the API's
//!   replicas is reserved with the same router as HTTP (traffic draw,
//!   `max_concurrent_queries`, bounded queue), request messages go to the
//!   replica as frames on its multiplexed connection, reply messages come
//!   back as a reply or as stream frames; no grpcio server is involved.
//!   A method they do not declare is answered `UNIMPLEMENTED`.
//! * With `SERVAL_GRPC_FRAMES=0` in the proxy's environment (the path
//!   frames replace, kept for now), the reserved replica's HTTP/2 stream
//!   is instead forwarded unchanged to its grpcio server: message bytes,
//!   metadata, `grpc-timeout`, streaming in both directions and trailers.
//!   The slot is held until the response ends, so an open stream counts
//!   as in flight for backpressure and autoscaling. A client that goes
//!   away resets the upstream stream, which cancels the call on the replica.
//! * `grpc.health.v1.Health/Check` ([`health`]) and server reflection
//!   ([`reflection`], v1 and v1alpha) answered by the proxy itself.
//! * Anything else: `UNIMPLEMENTED` naming the service.
//!
//! Failures the proxy answers are trailers-only responses with a gRPC
//! status; `serval_grpc_requests_total{service,method,code}` counts every
//! call ([`body`]).

mod body;
mod frames;
mod health;
mod idle;
mod reflection;
mod table;
mod tls;

use std::sync::{LazyLock, OnceLock};

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serval_protos::handshake;
use tokio::time::Instant;

use crate::errors;
use crate::proxy::Proxy;
use crate::routing::RouterError;

pub(crate) use body::GrpcMetrics;
pub use body::GRPC_REQUESTS_TOTAL;
pub use idle::STREAM_IDLE_ENV;
pub(crate) use reflection::Reflection;
pub(crate) use table::GrpcServices;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type GrpcBody = UnsyncBoxBody<Bytes, BoxError>;
pub(crate) type GrpcResponse = hyper::Response<GrpcBody>;

/// `SERVAL_GRPC_FRAMES=0` in the proxy's environment: calls are forwarded
/// to the replicas' grpcio servers (which replicas then start) instead of
/// being terminated here and sent as frames ([`frames`], the default).
pub const FRAMES_ENV: &str = "SERVAL_GRPC_FRAMES";

static FRAMES: LazyLock<bool> =
    LazyLock::new(|| !std::env::var(FRAMES_ENV).is_ok_and(|v| v.trim() == "0"));

/// gRPC status codes the proxy answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Code {
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    ResourceExhausted = 8,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
}

/// Whether a request is gRPC (any `application/grpc` subtype).
pub(crate) fn is_grpc(req: &hyper::Request<Incoming>) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// `/package.Service/Method` -> (`package.Service`, `Method`).
fn split_path(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/'))
        .then_some((service, method))
}

pub(crate) async fn handle(proxy: &Proxy, req: hyper::Request<Incoming>) -> GrpcResponse {
    let started = Instant::now();
    let path = req.uri().path().to_owned();
    let Some((service, method)) = split_path(&path) else {
        return status_response(
            Code::Unimplemented,
            &format!("{path} is not a gRPC method path (/package.Service/Method)"),
        );
    };
    let services = proxy.grpc_services();
    // Labels come from the snapshot and the proxy's own services, never
    // from what a client wrote: made-up paths would grow the metrics
    // without bound (3,000 of them made 57,000 lines).
    let (service_label, method_label) = if service == health::SERVICE {
        (service, health::METHODS.contains(&method).then_some(method))
    } else if reflection::SERVICES.contains(&service) {
        (service, (method == reflection::METHOD).then_some(method))
    } else if services.endpoint(service).is_some() {
        (
            service,
            services.declares(service, method).then_some(method),
        )
    } else {
        (UNKNOWN_LABEL, None)
    };
    // Counts the call even when the client goes away before its answer
    // (this future is then dropped): as CANCELLED.
    let recorder = proxy.grpc_metrics.recorder(
        service_label,
        method_label.unwrap_or(UNKNOWN_LABEL),
        started,
    );
    let response = if service == health::SERVICE {
        health::handle(proxy, method, req).await
    } else if reflection::SERVICES.contains(&service) {
        proxy.reflection().handle(req).await
    } else {
        match services.endpoint(service) {
            Some(endpoint) if !*FRAMES => forward(proxy, endpoint, req).await,
            Some(endpoint) => match services.shape(service, method) {
                Some(shape) => frames::call(proxy, endpoint, &path, shape, req).await,
                None => status_response(
                    Code::Unimplemented,
                    &format!("service {service} declares no method {method}"),
                ),
            },
            None => status_response(
                Code::Unimplemented,
                &format!("unknown service {service}: no deployed API serves it"),
            ),
        }
    };
    body::counted(response, recorder)
}

/// The service or method label of a call to something not deployed.
const UNKNOWN_LABEL: &str = "unknown";

/// Reserves a replica of `endpoint` and forwards the call to its gRPC server.
async fn forward(proxy: &Proxy, endpoint: &str, req: hyper::Request<Incoming>) -> GrpcResponse {
    let reservation = match proxy.router().reserve(endpoint).await {
        Ok(r) => r,
        Err(e) => {
            return status_response(code_of(&e), &errors::message(&e, proxy.debug_errors));
        }
    };
    if reservation.grpc_addr().is_empty() {
        let detail = format!(
            "replica {} of endpoint {endpoint} has no gRPC server (not a gRPC API, or an older replica)",
            reservation.replica_id()
        );
        return internal_failure(
            proxy,
            Code::Unavailable,
            "the replica has no gRPC server",
            detail,
        );
    }
    let (mut parts, body) = req.into_parts();
    // The replica's grpcio server takes calls only from the cluster; a
    // client's own copy of the header is replaced, never passed on.
    parts.headers.remove(handshake::GRPC_AUTH_HEADER);
    if let Some(key) = &proxy.router().config().data_key {
        if let Ok(value) = HeaderValue::from_str(&handshake::grpc_forward_credential(key)) {
            parts.headers.insert(handshake::GRPC_AUTH_HEADER, value);
        }
    }
    let target = format!(
        "{}://{}{}",
        if reservation.tls() { "https" } else { "http" },
        reservation.grpc_addr(),
        parts.uri.path_and_query().map_or("/", |p| p.as_str())
    );
    parts.uri = match target.parse() {
        Ok(uri) => uri,
        Err(e) => {
            let detail = format!("bad replica address {target}: {e}");
            return internal_failure(
                proxy,
                Code::Internal,
                "the replica's address is invalid",
                detail,
            );
        }
    };
    let (body, idled) = idle::IdleBody::new(body);
    let request = hyper::Request::from_parts(parts, body);
    let sent = if reservation.tls() {
        tls::client().request(request).await
    } else {
        client().request(request).await
    };
    match sent {
        Ok(response) => body::hold_until_end(
            response.map(|b| b.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync()),
            reservation,
            idled,
        ),
        Err(_) if idle::idled(&idled) => status_response(Code::DeadlineExceeded, IDLE_MESSAGE),
        Err(e) => {
            let detail = format!(
                "replica {} of endpoint {endpoint} could not be reached: {e}",
                reservation.replica_id()
            );
            internal_failure(
                proxy,
                Code::Unavailable,
                "the replica could not be reached",
                detail,
            )
        }
    }
}

/// A failure whose `detail` names internals (replica ids, addresses): it is
/// logged, and sent to the client only with `SERVAL_DEBUG`.
fn internal_failure(proxy: &Proxy, code: Code, public: &str, detail: String) -> GrpcResponse {
    tracing::warn!(%detail, "gRPC call failed");
    status_response(code, if proxy.debug_errors { &detail } else { public })
}

/// The details of a call ended by its client stream's idle deadline.
const IDLE_MESSAGE: &str = "the client stream sent nothing for too long";

/// One HTTP/2 (h2c) client for every replica: it keeps a connection per
/// replica and multiplexes calls on it.
fn client() -> &'static Client<HttpConnector, idle::IdleBody> {
    static CLIENT: OnceLock<Client<HttpConnector, idle::IdleBody>> = OnceLock::new();
    CLIENT.get_or_init(|| {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(connector)
    })
}

fn code_of(e: &RouterError) -> Code {
    match e {
        RouterError::UnknownEndpoint(_) => Code::Unimplemented,
        RouterError::Backpressure { .. } => Code::ResourceExhausted,
        RouterError::Timeout { .. } => Code::DeadlineExceeded,
        RouterError::NoReplica { .. } | RouterError::ReplicaDied { .. } => Code::Unavailable,
        RouterError::Protocol { .. } => Code::Internal,
    }
}

/// A trailers-only response: HTTP 200 with the status in the headers, as
/// gRPC servers answer a call that fails before any message.
pub(crate) fn status_response(code: Code, message: &str) -> GrpcResponse {
    status_response_code(code as u16, message)
}

/// [`status_response`] with any code (a replica's).
fn status_response_code(code: u16, message: &str) -> GrpcResponse {
    let mut response = hyper::Response::new(empty());
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    add_status(headers, code, message);
    response
}

/// Adds `grpc-status` and (when there is one) `grpc-message` to headers
/// or trailers.
fn add_status(headers: &mut hyper::HeaderMap, code: u16, message: &str) {
    headers.insert("grpc-status", HeaderValue::from(code));
    if message.is_empty() {
        return;
    }
    if let Ok(value) = HeaderValue::from_str(&percent_encode(message)) {
        headers.insert("grpc-message", value);
    }
}

pub(crate) fn empty() -> GrpcBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// grpc-message is percent-encoded (the gRPC HTTP/2 spec): bytes outside
/// printable ASCII, and '%' itself.
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A gRPC message frame: uncompressed flag, big-endian length, bytes.
pub(crate) fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.extend_from_slice(message);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_paths_split_into_service_and_method() {
        assert_eq!(split_path("/pkg.Svc/Predict"), Some(("pkg.Svc", "Predict")));
        assert_eq!(split_path("/Svc/M"), Some(("Svc", "M")));
        assert_eq!(split_path("/pkg.Svc/"), None);
        assert_eq!(split_path("/pkg.Svc/a/b"), None);
        assert_eq!(split_path("/"), None);
    }

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(percent_encode("a b"), "a b");
        assert_eq!(percent_encode("100%\né"), "100%25%0A%C3%A9");
    }
}
