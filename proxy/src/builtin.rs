//! The proxy's own paths, answered before any user route:
//! `/-/routes` (route -> endpoint, as Ray's proxy answers),
//! `/-/healthz` (200 once a snapshot is applied), `/-/readyz` (that, and
//! what the process's `ReadinessSlot` says: a head, that it can commit
//! writes), `/-/metrics` and
//! `/-/grpc-services` (gRPC service -> endpoint).

use crate::metrics::MetricsHandle;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::StatusCode;

use crate::errors::{json_error, HttpResponse};
use crate::proxy::Proxy;

pub(crate) const ROUTES_PATH: &str = "/-/routes";
pub(crate) const HEALTHZ_PATH: &str = "/-/healthz";
pub(crate) const METRICS_PATH: &str = "/-/metrics";
pub(crate) const GRPC_SERVICES_PATH: &str = "/-/grpc-services";

/// The built-in answer for `path`, or `None` for user routes.
pub(crate) fn respond(proxy: &Proxy, path: &str) -> Option<HttpResponse> {
    Some(match path {
        ROUTES_PATH => {
            let mut routes = serde_json::Map::new();
            for (route, endpoint) in proxy.routes().routes() {
                // First registration wins, as in lookup.
                routes
                    .entry(route.to_owned())
                    .or_insert_with(|| endpoint.into());
            }
            text(
                StatusCode::OK,
                "application/json",
                serde_json::Value::Object(routes).to_string(),
            )
        }
        GRPC_SERVICES_PATH => {
            let services: serde_json::Map<String, serde_json::Value> = proxy
                .grpc_services()
                .services()
                .map(|(service, endpoint)| (service.to_owned(), endpoint.into()))
                .collect();
            text(
                StatusCode::OK,
                "application/json",
                serde_json::Value::Object(services).to_string(),
            )
        }
        HEALTHZ_PATH => readiness_text(match proxy.ready_for_traffic() {
            (true, _) => Ok(()),
            (false, reason) => Err(reason.to_string()),
        }),
        crate::readiness::READYZ_PATH => readiness_text(match proxy.ready_for_traffic() {
            (true, _) => proxy.readiness.check(),
            (false, reason) => Err(reason.to_string()),
        }),
        METRICS_PATH => match &proxy.metrics {
            Some(handle) => metrics_text(handle),
            None => json_error(
                StatusCode::NOT_FOUND,
                "metrics are not enabled on this proxy",
            ),
        },
        _ => return None,
    })
}

/// 200 "ok", or 503 "not ready: REASON".
pub(crate) fn readiness_text(ready: Result<(), String>) -> HttpResponse {
    match ready {
        Ok(()) => text(StatusCode::OK, "text/plain", "ok".into()),
        Err(reason) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("not ready: {reason}"),
        ),
    }
}

/// The Prometheus text exposition of `handle`.
pub(crate) fn metrics_text(handle: &MetricsHandle) -> HttpResponse {
    text(StatusCode::OK, "text/plain; version=0.0.4", handle.render())
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> HttpResponse {
    let mut response = hyper::Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
