//! Metric names, label values and the Prometheus exporter settings shared
//! by every process that serves `/-/metrics` (heads, nodes), plus the
//! per-endpoint handle maps the router's and the HTTP server's handles use.
//!
//! The README's "Metrics" section lists every name, type and label; keep it
//! in step with the constants here (and `serval_node::metrics`,
//! `serval_controller::reconciler`).
//!
//! This module depends on no other module of the crate: both the routing
//! core (`routing::router_metrics`, the router's cached handles) and the
//! HTTP ingress (`http_metrics`) depend on it, never it on them.
//!
//! Hot path: the handles are registered once per backend, replica and
//! (endpoint, backend, outcome) and kept, so a request costs a few atomic
//! updates and no label building. Labels never hold a request path.
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

mod series;

pub use series::ENTITY_FAMILIES;
use series::{is_entity_family, EntitySeries};

/// HTTP requests the proxy answered, by endpoint and status class.
pub const REQUESTS_TOTAL: &str = "serval_proxy_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "serval_proxy_request_duration_seconds";
/// Open client connections of a listener.
pub const OPEN_CONNECTIONS: &str = "serval_proxy_open_connections";
/// Requests and connections refused by a limit, by `reason`.
pub const REFUSED_TOTAL: &str = "serval_proxy_refused_total";
/// Endpoint label of requests that matched no endpoint.
pub(crate) const NO_ENDPOINT_LABEL: &str = "-";

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
        REQUESTS_TOTAL,
        "HTTP requests answered by this proxy, by endpoint and status class"
    );
    describe_histogram!(
        REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "HTTP request latency at the proxy, by endpoint"
    );
    describe_gauge!(
        OPEN_CONNECTIONS,
        "Client connections open, by listener (http, metrics)"
    );
    describe_counter!(
        REFUSED_TOTAL,
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
}

/// One (endpoint, backend) pair's request counters by [`Outcome`], each
/// registered on first use (no zero series for outcomes that never happened).
pub(crate) type RequestCounters = [OnceLock<Counter>; OUTCOMES];

/// The handles kept for one key of a per-endpoint map, made on first use.
/// Endpoints come from snapshots (and one label for "no endpoint"), so
/// these maps stay small.
pub(crate) fn by_endpoint<V>(
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
pub(crate) fn retain<V>(map: &RwLock<HashMap<String, Arc<V>>>, live: impl Fn(&str) -> bool) {
    map.write()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|endpoint, _| live(endpoint));
}
