//! The router's cached metric handles (the names are in [`crate::metrics`]).
//!
//! Hot path: the router registers its handles once per backend, replica and
//! (endpoint, backend, outcome) and keeps them, so a request costs a few
//! atomic updates and no label building. Labels never hold a request path.
//! Dropping the handles (a backend or replica gone) ends their series.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};
use serval_protos::frame::Response;

use super::RouterError;
use crate::metrics::{
    by_endpoint, retain, Outcome, RequestCounters, BATCH_SIZE, BATCH_SIZE_HEADER,
    REPLICA_IN_FLIGHT, ROUTER_QUEUE_LENGTH, ROUTER_REQUESTS_TOTAL, ROUTER_REQUEST_DURATION_SECONDS,
    ROUTER_RETRIES_TOTAL, WEBSOCKET_SESSIONS_TOTAL,
};

/// What became of one routed call: the replica's status class, or the
/// router error that ended it.
pub(crate) fn outcome_of(result: &Result<Response, RouterError>) -> Outcome {
    match result {
        Ok(r) => Outcome::of_status(r.status),
        Err(RouterError::Backpressure { .. }) => Outcome::Backpressure,
        Err(RouterError::Timeout { .. }) => Outcome::Timeout,
        Err(RouterError::ReplicaDied { .. }) => Outcome::ReplicaDied,
        // An unknown endpoint has no backend and is never recorded here.
        Err(RouterError::NoReplica { .. } | RouterError::UnknownEndpoint(_)) => Outcome::NoReplica,
        Err(RouterError::Protocol { .. }) => Outcome::ProtocolError,
    }
}

/// A backend's metric handles, kept in the router's per-backend state.
pub(crate) struct BackendMetrics {
    backend: String,
    queue_length: Gauge,
    latency: Histogram,
    batch_size: Histogram,
    /// The last batch size a replica reported (the dashboard shows it).
    last_batch_size: std::sync::atomic::AtomicU32,
    /// WebSocket sessions opened; registered at the first one.
    websocket_sessions: OnceLock<Counter>,
    /// Requests retried after a lost replica; registered at the first one.
    retries: OnceLock<Counter>,
    /// By endpoint; endpoints come from snapshots, so this stays small.
    requests: RwLock<HashMap<String, Arc<RequestCounters>>>,
}

impl BackendMetrics {
    pub(crate) fn new(backend: &str) -> Self {
        Self {
            backend: backend.to_owned(),
            queue_length: metrics::gauge!(ROUTER_QUEUE_LENGTH, "backend" => backend.to_owned()),
            latency: metrics::histogram!(ROUTER_REQUEST_DURATION_SECONDS, "backend" => backend.to_owned()),
            batch_size: metrics::histogram!(BATCH_SIZE, "backend" => backend.to_owned()),
            requests: RwLock::default(),
            last_batch_size: Default::default(),
            websocket_sessions: OnceLock::new(),
            retries: OnceLock::new(),
        }
    }

    /// Counts one WebSocket session the app accepted on this backend.
    pub(crate) fn websocket_opened(&self) {
        self.websocket_sessions
            .get_or_init(
                || metrics::counter!(WEBSOCKET_SESSIONS_TOTAL, "backend" => self.backend.clone()),
            )
            .increment(1);
    }

    /// Counts one request sent again after its replica was lost.
    pub(crate) fn retried(&self) {
        self.retries
            .get_or_init(
                || metrics::counter!(ROUTER_RETRIES_TOTAL, "backend" => self.backend.clone()),
            )
            .increment(1);
    }

    pub(crate) fn queue_joined(&self) {
        self.queue_length.increment(1.0);
    }

    pub(crate) fn queue_left(&self) {
        self.queue_length.decrement(1.0);
    }

    /// Records one finished call of `endpoint` on this backend.
    pub(crate) fn record(&self, endpoint: &str, outcome: Outcome, elapsed: Duration) {
        self.latency.record(elapsed.as_secs_f64());
        self.counters(endpoint)[outcome as usize]
            .get_or_init(|| {
                metrics::counter!(
                    ROUTER_REQUESTS_TOTAL,
                    "endpoint" => endpoint.to_owned(),
                    "backend" => self.backend.clone(),
                    "outcome" => outcome.label(),
                )
            })
            .increment(1);
    }

    /// Drops the counters of endpoints that are gone, and their series.
    pub(crate) fn retain_endpoints(&self, live: impl Fn(&str) -> bool) {
        retain(&self.requests, live);
    }

    fn counters(&self, endpoint: &str) -> Arc<RequestCounters> {
        by_endpoint(&self.requests, endpoint, Default::default)
    }

    /// Records the batch size a replica reported and removes its header, so
    /// neither HTTP clients nor handles see it.
    pub(crate) fn take_batch_size(&self, response: &mut Response) {
        if let Some(size) = take_batch_size_header(response) {
            self.batch_size.record(size as f64);
            self.last_batch_size
                .store(size, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The last batch size a replica of this backend reported; 0: none yet.
    pub(crate) fn last_batch_size(&self) -> u32 {
        self.last_batch_size
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Removes every `x-serval-batch-size` header; the size is the first valid
/// one (a positive integer).
fn take_batch_size_header(response: &mut Response) -> Option<u32> {
    let mut size = None;
    // Most responses carry none: look before touching the vector.
    while let Some(i) = response
        .headers
        .iter()
        .position(|(k, _)| k.eq_ignore_ascii_case(BATCH_SIZE_HEADER))
    {
        // `remove`, not `swap_remove`: the order of repeated headers stays.
        let (_, value) = response.headers.remove(i);
        if size.is_none() {
            size = value.trim().parse::<u32>().ok().filter(|n| *n > 0);
        }
    }
    size
}

/// The in-flight gauge of one replica, kept in the router's replica state.
pub(crate) fn replica_in_flight(backend: &str, replica: &str) -> Gauge {
    metrics::gauge!(REPLICA_IN_FLIGHT, "backend" => backend.to_owned(), "replica" => replica.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::prometheus_builder;

    fn response(headers: &[(&str, &str)]) -> Response {
        Response {
            status: 200,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: vec![],
        }
    }

    #[test]
    fn the_batch_size_header_is_read_and_removed_keeping_the_others_in_order() {
        let mut r = response(&[
            ("set-cookie", "a=1"),
            ("X-Serval-Batch-Size", "4"),
            ("set-cookie", "b=2"),
            ("content-type", "text/plain"),
        ]);
        assert_eq!(take_batch_size_header(&mut r), Some(4));
        let names: Vec<(&str, &str)> = r
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("set-cookie", "a=1"),
                ("set-cookie", "b=2"),
                ("content-type", "text/plain")
            ]
        );
        let mut none = response(&[("content-type", "text/plain")]);
        assert_eq!(take_batch_size_header(&mut none), None);
        assert_eq!(none.headers.len(), 1);
        let mut bad = response(&[
            ("x-serval-batch-size", "zero"),
            ("x-serval-batch-size", "0"),
        ]);
        assert_eq!(take_batch_size_header(&mut bad), None);
        assert!(bad.headers.is_empty(), "invalid values are removed too");
    }

    #[test]
    fn outcomes_are_status_classes_or_router_errors() {
        let ok = |status| {
            Ok(Response {
                status,
                headers: vec![],
                body: vec![],
            })
        };
        assert_eq!(outcome_of(&ok(200)).label(), "2xx");
        assert_eq!(outcome_of(&ok(404)).label(), "4xx");
        assert_eq!(outcome_of(&ok(500)).label(), "5xx");
        let err = Err(RouterError::Backpressure {
            backend: "b".into(),
            queued: 3,
        });
        assert_eq!(outcome_of(&err).label(), "backpressure");
        let err = Err(RouterError::Timeout {
            after: Duration::from_secs(1),
        });
        assert_eq!(outcome_of(&err).label(), "timeout");
    }

    #[test]
    fn histograms_are_rendered_with_buckets() {
        let recorder = prometheus_builder().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let m = BackendMetrics::new("b");
            m.record("ep", Outcome::Success, Duration::from_millis(3));
            m.record("ep", Outcome::Success, Duration::from_millis(3));
            m.record("ep", Outcome::ServerError, Duration::from_millis(3));
            let mut r = response(&[("x-serval-batch-size", "3")]);
            m.take_batch_size(&mut r);
        });
        let text = handle.render();
        assert!(
            text.contains(
                r#"serval_router_requests_total{endpoint="ep",backend="b",outcome="2xx"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"serval_router_requests_total{endpoint="ep",backend="b",outcome="5xx"} 1"#
            ),
            "{text}"
        );
        assert!(
            !text.contains(r#"outcome="4xx""#),
            "no series for outcomes that never happened: {text}"
        );
        assert!(
            text.contains(
                r#"serval_router_request_duration_seconds_bucket{backend="b",le="0.005"} 3"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"serval_batch_size_bucket{backend="b",le="4"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"serval_batch_size_bucket{backend="b",le="2"} 0"#),
            "{text}"
        );
    }
}
