//! Metric names and the Prometheus exporter settings shared by every
//! process that serves `/-/metrics` (heads, nodes), plus the router's cached
//! metric handles.
//!
//! The README's "Metrics" section lists every name, type and label; keep it
//! in step with the constants here (and `serval_node::metrics`,
//! `serval_controller::reconciler`).
//!
//! Hot path: the router registers its handles once per backend, replica and
//! (endpoint, backend, outcome) and keeps them, so a request costs a few
//! atomic updates and no label building. Labels never hold a request path.
//!
//! Those handles are also what keeps their series: the families labelled by
//! a backend, replica or endpoint live in [`series`] and leave `/-/metrics`
//! when the last handle goes (see there why not the exporter's idle
//! timeout), so a rolling cluster does not accumulate series.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use serval_protos::frame::Response;

use crate::router::RouterError;

mod series;

pub use series::ENTITY_FAMILIES;
use series::{is_entity_family, EntitySeries};

use crate::dashboard::history::Tally;

pub const ROUTER_REQUESTS_TOTAL: &str = "serval_router_requests_total";
pub const ROUTER_REQUEST_DURATION_SECONDS: &str = "serval_router_request_duration_seconds";
pub const ROUTER_QUEUE_LENGTH: &str = "serval_router_queue_length";
pub const REPLICA_IN_FLIGHT: &str = "serval_replica_in_flight";
pub const BATCH_SIZE: &str = "serval_batch_size";
pub const WEBSOCKET_SESSIONS_TOTAL: &str = "serval_websocket_sessions_total";
/// Dashboard event streams open on this proxy (at most 16).
pub const DASHBOARD_STREAMS: &str = "serval_dashboard_streams";
pub const ROUTER_RETRIES_TOTAL: &str = "serval_router_retries_total";

/// Response header a replica sets on a request served in a batch: the size
/// of that batch. The router records it and removes it from the response.
pub const BATCH_SIZE_HEADER: &str = "x-serval-batch-size";

/// Latency buckets (seconds) of every `*_seconds` histogram.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Buckets of `serval_batch_size`.
pub const BATCH_SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// The exporter every Serval process installs: real Prometheus histograms
/// (buckets, so they aggregate across proxies) instead of the exporter's
/// default summaries.
pub fn prometheus_builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), BATCH_SIZE_BUCKETS)
        })
        .expect("bucket lists are not empty")
}

/// How often a process folds its histograms' recorded samples into their
/// buckets. The exporter keeps every sample until it is drained, and only a
/// scrape or this upkeep drains it: without it, a process nobody scrapes
/// grew by about 40 bytes per request, without bound (issue 18).
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Why [`install`] installed nothing.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot start the metrics upkeep thread: {0}")]
    Upkeep(#[from] std::io::Error),
    #[error("cannot install the metrics recorder: {0}")]
    Recorder(String),
}

/// The recorder every Serval process installs: the entity families
/// ([`ENTITY_FAMILIES`]) in series that end with their last handle, every
/// other family in the exporter built from the given builder.
pub struct Recorder {
    exporter: PrometheusRecorder,
    entities: Arc<EntitySeries>,
}

impl Recorder {
    /// A recorder and the handle that renders what it records.
    pub fn new(builder: PrometheusBuilder) -> (Self, MetricsHandle) {
        let exporter = builder.build_recorder();
        let entities = Arc::new(EntitySeries::default());
        let handle = MetricsHandle {
            exporter: exporter.handle(),
            entities: entities.clone(),
        };
        (Self { exporter, entities }, handle)
    }
}

impl metrics::Recorder for Recorder {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        if is_entity_family(key.as_str()) {
            self.entities.describe(key.as_str(), unit, description);
        } else {
            self.exporter.describe_counter(key, unit, description);
        }
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        if is_entity_family(key.as_str()) {
            self.entities.describe(key.as_str(), unit, description);
        } else {
            self.exporter.describe_gauge(key, unit, description);
        }
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        if is_entity_family(key.as_str()) {
            self.entities.describe(key.as_str(), unit, description);
        } else {
            self.exporter.describe_histogram(key, unit, description);
        }
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        if is_entity_family(key.name()) {
            self.entities.counter(key)
        } else {
            self.exporter.register_counter(key, metadata)
        }
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        if is_entity_family(key.name()) {
            self.entities.gauge(key)
        } else {
            self.exporter.register_gauge(key, metadata)
        }
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        if is_entity_family(key.name()) {
            self.entities.histogram(key)
        } else {
            self.exporter.register_histogram(key, metadata)
        }
    }
}

/// Renders the metrics of a [`Recorder`] (`/-/metrics`, `--metrics-port`).
#[derive(Clone)]
pub struct MetricsHandle {
    exporter: PrometheusHandle,
    entities: Arc<EntitySeries>,
}

impl MetricsHandle {
    /// The Prometheus text of every live series.
    pub fn render(&self) -> String {
        let mut text = self.exporter.render();
        self.entities.render_into(&mut text);
        text
    }

    /// Drains the exporter's histogram samples into their buckets and
    /// forgets the entity series whose handles are all gone.
    pub fn run_upkeep(&self) {
        self.exporter.run_upkeep();
        self.entities.prune();
    }
}

/// Epoch pins per upkeep: garbage is freed two epochs after it was retired.
const EPOCH_ADVANCES: usize = 3;

/// Installs a [`Recorder`] over `builder` as this process's global
/// recorder with its upkeep (a thread running
/// [`MetricsHandle::run_upkeep`] every [`UPKEEP_INTERVAL`] for the rest of
/// the process, needing no runtime), so memory stays flat whether or not
/// anyone scrapes. Every Serval process that records metrics installs
/// through here. `Err` when a recorder is already installed.
pub fn install(builder: PrometheusBuilder) -> Result<MetricsHandle, InstallError> {
    let (recorder, handle) = Recorder::new(builder);
    let upkeep = handle.clone();
    // Started before the recorder is installed: no recorder ever runs
    // without its upkeep.
    std::thread::Builder::new()
        .name("serval-metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            upkeep.run_upkeep();
            // The drained sample blocks are freed through crossbeam-epoch,
            // only once its epoch has advanced; with nothing else recording
            // (a burst, then quiet) that could take minutes, so the upkeep
            // advances it itself.
            for _ in 0..EPOCH_ADVANCES {
                crossbeam_epoch::pin().flush();
            }
        })?;
    metrics::set_global_recorder(recorder).map_err(|e| InstallError::Recorder(e.to_string()))?;
    Ok(handle)
}

/// Help texts of the proxy's and router's metrics (call once a recorder is
/// installed).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        crate::http::REQUESTS_TOTAL,
        "HTTP requests answered by this proxy, by endpoint and status class"
    );
    describe_histogram!(
        crate::http::REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "HTTP request latency at the proxy, by endpoint"
    );
    describe_gauge!(
        crate::http::OPEN_CONNECTIONS,
        "Client connections open, by listener (http, metrics)"
    );
    describe_counter!(
        crate::http::REFUSED_TOTAL,
        "Connections and requests refused by a limit, by reason"
    );
    describe_counter!(
        ROUTER_REQUESTS_TOTAL,
        "Requests routed to a backend, by endpoint, backend and outcome (status class or router error)"
    );
    describe_histogram!(
        ROUTER_REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Router latency per backend, queueing included"
    );
    describe_gauge!(
        ROUTER_QUEUE_LENGTH,
        "Requests waiting in the router's queue for a replica slot"
    );
    describe_gauge!(
        REPLICA_IN_FLIGHT,
        "Requests this router has in flight on a replica"
    );
    describe_counter!(
        WEBSOCKET_SESSIONS_TOTAL,
        "WebSocket sessions the app accepted, by backend"
    );
    describe_gauge!(
        DASHBOARD_STREAMS,
        "Dashboard event streams open on this proxy (one per open page)"
    );
    describe_counter!(
        ROUTER_RETRIES_TOTAL,
        "Requests sent again to another replica after theirs was lost before answering, by backend"
    );
    describe_histogram!(
        BATCH_SIZE,
        "Size of the batch each request was served in (one observation per request)"
    );
}

/// What became of one routed request: the replica's status class, or the
/// router error that ended it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Informational,
    Success,
    Redirect,
    ClientError,
    ServerError,
    Backpressure,
    Timeout,
    ReplicaDied,
    NoReplica,
    ProtocolError,
}

const OUTCOMES: usize = 10;

impl Outcome {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Outcome::Informational => "1xx",
            Outcome::Success => "2xx",
            Outcome::Redirect => "3xx",
            Outcome::ClientError => "4xx",
            Outcome::ServerError => "5xx",
            Outcome::Backpressure => "backpressure",
            Outcome::Timeout => "timeout",
            Outcome::ReplicaDied => "replica_died",
            Outcome::NoReplica => "no_replica",
            Outcome::ProtocolError => "protocol_error",
        }
    }

    /// The class of an HTTP status, 1xx to 5xx (anything else counts as 5xx).
    pub(crate) fn of_status(status: u16) -> Self {
        match status / 100 {
            1 => Outcome::Informational,
            2 => Outcome::Success,
            3 => Outcome::Redirect,
            4 => Outcome::ClientError,
            _ => Outcome::ServerError,
        }
    }

    pub(crate) fn of(result: &Result<Response, RouterError>) -> Self {
        match result {
            Ok(r) => Outcome::of_status(r.status),
            Err(RouterError::Backpressure { .. }) => Outcome::Backpressure,
            Err(RouterError::Timeout { .. }) => Outcome::Timeout,
            Err(RouterError::ReplicaDied { .. }) => Outcome::ReplicaDied,
            // An unknown endpoint has no backend and is never recorded here.
            Err(RouterError::NoReplica { .. } | RouterError::UnknownEndpoint(_)) => {
                Outcome::NoReplica
            }
            Err(RouterError::Protocol { .. }) => Outcome::ProtocolError,
        }
    }
}

/// One (endpoint, backend) pair's request counters by [`Outcome`], each
/// registered on first use (no zero series for outcomes that never happened).
type RequestCounters = [OnceLock<Counter>; OUTCOMES];

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

/// The handles kept for one key of a per-endpoint map, made on first use.
/// Endpoints come from snapshots (and one label for "no endpoint"), so
/// these maps stay small.
fn by_endpoint<V>(
    map: &RwLock<HashMap<String, Arc<V>>>,
    endpoint: &str,
    make: impl FnOnce() -> V,
) -> Arc<V> {
    if let Some(v) = map.read().unwrap_or_else(|p| p.into_inner()).get(endpoint) {
        return v.clone();
    }
    map.write()
        .unwrap_or_else(|p| p.into_inner())
        .entry(endpoint.to_owned())
        .or_insert_with(|| Arc::new(make()))
        .clone()
}

/// Keeps the entries of `map` whose endpoint is `live`.
fn retain<V>(map: &RwLock<HashMap<String, Arc<V>>>, live: impl Fn(&str) -> bool) {
    map.write()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|endpoint, _| live(endpoint));
}

/// One endpoint's HTTP request counters by status class (the 1xx to 5xx
/// outcomes, each registered on first use) and its duration histogram.
struct EndpointHttpMetrics {
    by_class: RequestCounters,
    duration: Histogram,
    /// The dashboard's per-second history reads this.
    tally: Arc<Tally>,
}

/// The HTTP server's metric handles by endpoint label, kept by the proxy so
/// a request costs atomic updates instead of a registry lookup with labels.
#[derive(Default)]
pub(crate) struct HttpMetrics {
    endpoints: RwLock<HashMap<String, Arc<EndpointHttpMetrics>>>,
}

impl HttpMetrics {
    /// Drops the handles of endpoints that are gone, and their series.
    pub(crate) fn retain_endpoints(&self, live: impl Fn(&str) -> bool) {
        retain(&self.endpoints, live);
    }

    /// Records one answered HTTP request of `endpoint`.
    pub(crate) fn record(&self, endpoint: &str, status: u16, elapsed: Duration) {
        let m = by_endpoint(&self.endpoints, endpoint, || EndpointHttpMetrics {
            by_class: Default::default(),
            duration: metrics::histogram!(
                crate::http::REQUEST_DURATION_SECONDS,
                "endpoint" => endpoint.to_owned()
            ),
            tally: Arc::default(),
        });
        let class = Outcome::of_status(status);
        m.by_class[class as usize]
            .get_or_init(|| {
                metrics::counter!(
                    crate::http::REQUESTS_TOTAL,
                    "endpoint" => endpoint.to_owned(),
                    "status" => class.label(),
                )
            })
            .increment(1);
        m.duration.record(elapsed.as_secs_f64());
        m.tally.record(status, elapsed);
    }

    /// The dashboard's tallies of the routed endpoints.
    pub(crate) fn tallies(&self) -> Vec<(String, Arc<Tally>)> {
        self.endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(e, _)| e.as_str() != crate::http::NO_ENDPOINT_LABEL)
            .map(|(e, m)| (e.clone(), m.tally.clone()))
            .collect()
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
        assert_eq!(Outcome::of(&ok(200)).label(), "2xx");
        assert_eq!(Outcome::of(&ok(404)).label(), "4xx");
        assert_eq!(Outcome::of(&ok(500)).label(), "5xx");
        let err = Err(RouterError::Backpressure {
            backend: "b".into(),
            queued: 3,
        });
        assert_eq!(Outcome::of(&err).label(), "backpressure");
        let err = Err(RouterError::Timeout {
            after: Duration::from_secs(1),
        });
        assert_eq!(Outcome::of(&err).label(), "timeout");
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
