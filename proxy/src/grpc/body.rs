//! Response bodies of forwarded calls: they hold the replica slot until
//! the stream ends, and count the call by its final gRPC status.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use hyper::HeaderMap;
use metrics::{Counter, Histogram};
use tokio::time::Instant;

use super::idle::{idled, Idled};
use super::table::GrpcServices;
use super::{BoxError, Code, GrpcBody, GrpcResponse, IDLE_MESSAGE};
use crate::metrics::{by_endpoint, retain};
use crate::routing::Reservation;

/// Calls by `service`, `method` and final `code` (OK, UNAVAILABLE, ...,
/// or CANCELLED when the client went away first).
pub const GRPC_REQUESTS_TOTAL: &str = "serval_grpc_requests_total";
pub const GRPC_REQUEST_DURATION_SECONDS: &str = "serval_grpc_request_duration_seconds";

const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The index of UNKNOWN in [`CODE_NAMES`].
const UNKNOWN: usize = 2;

fn code_name(headers: &HeaderMap) -> Option<&'static str> {
    let code: usize = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    Some(CODE_NAMES.get(code).copied().unwrap_or("UNKNOWN"))
}

/// One method's handles: its call counters by code (each registered on
/// first use) and its duration histogram.
struct MethodMetrics {
    by_code: [OnceLock<Counter>; CODE_NAMES.len()],
    duration: Histogram,
    service: String,
    method: String,
}

/// `package.Service` -> method -> handles.
type ServiceMetrics = RwLock<HashMap<String, Arc<MethodMetrics>>>;

/// The gRPC metric handles by service and method label, kept by the proxy
/// so a call costs atomic updates instead of two registry lookups with
/// three labels each. The labels are the deployed services' declared
/// methods and the proxy's own (never what a client wrote), and services
/// that are no longer deployed are dropped: a bounded map.
#[derive(Default)]
pub(crate) struct GrpcMetrics {
    services: RwLock<HashMap<String, Arc<ServiceMetrics>>>,
}

impl GrpcMetrics {
    /// A recorder for one call of `method` of `service` (labels).
    pub(super) fn recorder(&self, service: &str, method: &str, started: Instant) -> Recorder {
        let methods = by_endpoint(&self.services, service, ServiceMetrics::default);
        let metrics = by_endpoint(&methods, method, || MethodMetrics {
            by_code: Default::default(),
            duration: metrics::histogram!(GRPC_REQUEST_DURATION_SECONDS,
                "service" => service.to_owned(), "method" => method.to_owned()),
            service: service.to_owned(),
            method: method.to_owned(),
        });
        Recorder {
            metrics,
            started,
            done: false,
        }
    }

    /// Drops the handles of services `services` no longer deploys (the
    /// proxy's own services and the "unknown" label stay).
    pub(crate) fn retain_deployed(&self, services: &GrpcServices) {
        retain(&self.services, |service| {
            services.endpoint(service).is_some()
                || service == super::health::SERVICE
                || super::reflection::SERVICES.contains(&service)
                || service == super::UNKNOWN_LABEL
        });
    }
}

/// Records one call once: at its status, or as CANCELLED when dropped
/// before one was seen.
pub(super) struct Recorder {
    metrics: Arc<MethodMetrics>,
    started: Instant,
    done: bool,
}

impl Recorder {
    fn finish(&mut self, code: &'static str) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let m = &*self.metrics;
        let i = CODE_NAMES
            .iter()
            .position(|c| *c == code)
            .unwrap_or(UNKNOWN);
        m.by_code[i]
            .get_or_init(|| {
                metrics::counter!(GRPC_REQUESTS_TOTAL, "service" => m.service.clone(),
                    "method" => m.method.clone(), "code" => CODE_NAMES[i])
            })
            .increment(1);
        m.duration.record(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.finish("CANCELLED");
    }
}

struct Tracked {
    inner: GrpcBody,
    recorder: Option<Recorder>,
    /// The replica slot: freed when the stream ends or the body is dropped.
    reservation: Option<Reservation>,
    /// Set when the client stream went idle ([`super::idle`]): the
    /// upstream error that follows ends the call with DEADLINE_EXCEEDED.
    idled: Option<Idled>,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(trailers), Some(r)) = (frame.trailers_ref(), this.recorder.as_mut()) {
                    r.finish(code_name(trailers).unwrap_or("UNKNOWN"));
                }
            }
            Poll::Ready(Some(Err(_))) => {
                this.reservation = None;
                if this.idled.as_ref().is_some_and(idled) {
                    this.idled = None;
                    if let Some(r) = this.recorder.as_mut() {
                        r.finish("DEADLINE_EXCEEDED");
                    }
                    let mut trailers = HeaderMap::new();
                    trailers.insert("grpc-status", (Code::DeadlineExceeded as u16).into());
                    trailers.insert(
                        "grpc-message",
                        hyper::header::HeaderValue::from_static(IDLE_MESSAGE),
                    );
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                if let Some(r) = this.recorder.as_mut() {
                    r.finish("UNAVAILABLE");
                }
            }
            Poll::Ready(None) => {
                if let Some(r) = this.recorder.as_mut() {
                    r.finish("UNKNOWN");
                }
                this.reservation = None;
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The replica's response, keeping `reservation` until its body ends, and
/// ending with DEADLINE_EXCEEDED when `idled` is set.
pub(super) fn hold_until_end(
    response: GrpcResponse,
    reservation: Reservation,
    idled: Idled,
) -> GrpcResponse {
    response.map(|inner| {
        Tracked {
            inner,
            recorder: None,
            reservation: Some(reservation),
            idled: Some(idled),
        }
        .boxed_unsync()
    })
}

/// Counts the call: now for a trailers-only response (its status is in the
/// headers), else when the body's trailers arrive.
pub(super) fn counted(response: GrpcResponse, mut recorder: Recorder) -> GrpcResponse {
    if let Some(code) = code_name(response.headers()) {
        recorder.finish(code);
        return response;
    }
    response.map(|inner| {
        Tracked {
            inner,
            recorder: Some(recorder),
            reservation: None,
            idled: None,
        }
        .boxed_unsync()
    })
}
