//! Series that end with the cluster entity they describe.
//!
//! metrics-exporter-prometheus keeps every series it was given until the
//! process ends: it has no per-series delete. Its idle timeout is no way
//! out: it drops any series not updated for a while, so a live but idle
//! backend's cached handles would then count into nothing (counters and
//! gauges could be kept alive by touching them, but a histogram cannot be
//! touched without recording a sample, and a dropped one loses its
//! buckets). And a rolling cluster creates replicas, each with its own
//! `serval_replica_in_flight` series, without end.
//!
//! So the recorder Serval installs ([`super::install`]) keeps the families
//! labelled by a backend, replica or endpoint ([`ENTITY_FAMILIES`]) itself:
//! a series is plain atomics shared by the handles to it, and exists exactly
//! as long as one handle is held. Whoever records such a family holds its
//! handles for the entity's life (the router per backend, replica and
//! (endpoint, backend); the proxy per endpoint; the node agent per
//! supervised replica) and drops them when the entity leaves the snapshot:
//! its series leave `/-/metrics` at the next scrape, and nothing is ever
//! removed under a live handle. Every other family goes to the exporter as
//! before (process-wide series, recorded through short-lived handles).

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use metrics::{CounterFn, GaugeFn, HistogramFn, Key, SharedString, Unit};
use metrics_exporter_prometheus::formatting::{
    sanitize_description, sanitize_label_key, sanitize_label_value,
};

use super::{BATCH_SIZE, BATCH_SIZE_BUCKETS, LATENCY_BUCKETS};

/// The families whose series end with their entity. Each is recorded only
/// through handles held for the entity's life (a handle made and dropped at
/// once would record into a series that vanishes with it).
pub const ENTITY_FAMILIES: &[&str] = &[
    super::REPLICA_IN_FLIGHT,
    super::ROUTER_QUEUE_LENGTH,
    super::ROUTER_REQUEST_DURATION_SECONDS,
    super::ROUTER_REQUESTS_TOTAL,
    BATCH_SIZE,
    super::WEBSOCKET_SESSIONS_TOTAL,
    super::ROUTER_RETRIES_TOTAL,
    super::REQUESTS_TOTAL,
    super::REQUEST_DURATION_SECONDS,
    // `serval_node::metrics` (the node agent; this crate cannot name it).
    "serval_node_replicas",
    "serval_replica_restarts_total",
    // `serval_controller::reconciler` (the leader's replica counts).
    "serval_backend_desired_replicas",
    "serval_backend_running_replicas",
    "serval_backend_replicas",
];

pub(crate) fn is_entity_family(name: &str) -> bool {
    ENTITY_FAMILIES.contains(&name)
}

/// The live series of one metric kind, by key; dead entries are pruned on
/// every render and upkeep, so the map is bounded by the live handles.
struct Family<T>(Mutex<HashMap<Key, Weak<T>>>);

impl<T> Default for Family<T> {
    fn default() -> Self {
        Self(Mutex::default())
    }
}

impl<T> Family<T> {
    fn get_or_insert(&self, key: &Key, make: impl FnOnce() -> T) -> Arc<T> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(live) = map.get(key).and_then(Weak::upgrade) {
            return live;
        }
        let series = Arc::new(make());
        map.insert(key.clone(), Arc::downgrade(&series));
        series
    }

    /// The live series sorted by name and labels; forgets the dead ones.
    fn live(&self) -> Vec<(Key, Arc<T>)> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, w| w.strong_count() > 0);
        let mut out: Vec<(Key, Arc<T>)> = map
            .iter()
            .filter_map(|(k, w)| w.upgrade().map(|s| (k.clone(), s)))
            .collect();
        drop(map);
        out.sort_by(|a, b| (a.0.name(), labels_text(&a.0)).cmp(&(b.0.name(), labels_text(&b.0))));
        out
    }

    fn prune(&self) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, w| w.strong_count() > 0);
    }
}

#[derive(Default)]
struct AtomicCounter(AtomicU64);

impl CounterFn for AtomicCounter {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }

    fn absolute(&self, value: u64) {
        self.0.fetch_max(value, Ordering::Relaxed);
    }
}

/// An `f64` in an `AtomicU64`, as the exporter's own gauges.
#[derive(Default)]
struct AtomicF64(AtomicU64);

impl AtomicF64 {
    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }

    fn update(&self, f: impl Fn(f64) -> f64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some(f(f64::from_bits(bits)).to_bits())
            });
    }
}

impl GaugeFn for AtomicF64 {
    fn increment(&self, value: f64) {
        self.update(|v| v + value);
    }

    fn decrement(&self, value: f64) {
        self.update(|v| v - value);
    }

    fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::Relaxed);
    }
}

/// A Prometheus histogram with fixed buckets, counted as it is recorded:
/// no samples are buffered, so it needs no upkeep.
struct BucketHistogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative), the last one `+Inf`.
    buckets: Vec<AtomicU64>,
    sum: AtomicF64,
}

impl BucketHistogram {
    fn new(name: &str) -> Self {
        let bounds = if name == BATCH_SIZE {
            BATCH_SIZE_BUCKETS
        } else {
            LATENCY_BUCKETS
        };
        Self {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicF64::default(),
        }
    }
}

impl HistogramFn for BucketHistogram {
    fn record(&self, value: f64) {
        let i = self.bounds.partition_point(|b| *b < value);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum.update(|s| s + value);
    }
}

/// The entity families' series and help texts.
#[derive(Default)]
pub(crate) struct EntitySeries {
    counters: Family<AtomicCounter>,
    gauges: Family<AtomicF64>,
    histograms: Family<BucketHistogram>,
    help: Mutex<HashMap<String, String>>,
}

impl EntitySeries {
    pub(crate) fn describe(&self, name: &str, unit: Option<Unit>, help: SharedString) {
        let _ = unit; // names carry their unit (`_seconds`)
        self.help
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), help.into_owned());
    }

    pub(crate) fn counter(&self, key: &Key) -> metrics::Counter {
        metrics::Counter::from_arc(self.counters.get_or_insert(key, Default::default))
    }

    pub(crate) fn gauge(&self, key: &Key) -> metrics::Gauge {
        metrics::Gauge::from_arc(self.gauges.get_or_insert(key, Default::default))
    }

    pub(crate) fn histogram(&self, key: &Key) -> metrics::Histogram {
        metrics::Histogram::from_arc(
            self.histograms
                .get_or_insert(key, || BucketHistogram::new(key.name())),
        )
    }

    /// Forgets series whose handles are all gone.
    pub(crate) fn prune(&self) {
        self.counters.prune();
        self.gauges.prune();
        self.histograms.prune();
    }

    /// Appends the live series in the Prometheus text format, one block
    /// per family as the exporter writes its own.
    pub(crate) fn render_into(&self, out: &mut String) {
        let help = self.help.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut current = String::new();
        let mut header = |out: &mut String, name: &str, kind: &str| {
            if current != name {
                if !current.is_empty() {
                    out.push('\n');
                }
                if let Some(h) = help.get(name) {
                    let _ = writeln!(out, "# HELP {name} {}", sanitize_description(h));
                }
                let _ = writeln!(out, "# TYPE {name} {kind}");
                current = name.to_owned();
            }
        };
        for (key, c) in self.counters.live() {
            header(out, key.name(), "counter");
            let v = c.0.load(Ordering::Relaxed);
            let _ = writeln!(out, "{}{} {v}", key.name(), braces(&labels_text(&key)));
        }
        for (key, g) in self.gauges.live() {
            header(out, key.name(), "gauge");
            let v = g.get();
            let _ = writeln!(out, "{}{} {v}", key.name(), braces(&labels_text(&key)));
        }
        for (key, h) in self.histograms.live() {
            header(out, key.name(), "histogram");
            let labels = labels_text(&key);
            let name = key.name();
            let mut count = 0u64;
            for (i, bucket) in h.buckets.iter().enumerate() {
                count += bucket.load(Ordering::Relaxed);
                let le = h
                    .bounds
                    .get(i)
                    .map_or_else(|| "+Inf".to_owned(), f64::to_string);
                let _ = writeln!(
                    out,
                    "{name}_bucket{} {count}",
                    braces(&join(&labels, &format!("le=\"{le}\"")))
                );
            }
            let _ = writeln!(out, "{name}_sum{} {}", braces(&labels), h.sum.get());
            let _ = writeln!(out, "{name}_count{} {count}", braces(&labels));
        }
        if !current.is_empty() {
            out.push('\n');
        }
    }
}

/// `k="v",...` in the key's label order, escaped as the exporter does.
fn labels_text(key: &Key) -> String {
    let mut out = String::new();
    for label in key.labels() {
        if !out.is_empty() {
            out.push(',');
        }
        let _ = write!(
            out,
            "{}=\"{}\"",
            sanitize_label_key(label.key()),
            sanitize_label_value(label.value())
        );
    }
    out
}

fn join(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_owned(),
        (_, true) => a.to_owned(),
        _ => format!("{a},{b}"),
    }
}

fn braces(labels: &str) -> String {
    if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_series_lives_while_a_handle_to_it_is_held() {
        let series = EntitySeries::default();
        let key = Key::from_parts(crate::metrics::REPLICA_IN_FLIGHT, &[("replica", "r1")]);
        let a = series.gauge(&key);
        let b = series.gauge(&key);
        a.increment(2.0);
        b.decrement(1.0);
        let render = || {
            let mut s = String::new();
            series.render_into(&mut s);
            s
        };
        assert!(
            render().contains("serval_replica_in_flight{replica=\"r1\"} 1\n"),
            "{}",
            render()
        );
        drop(a);
        assert!(render().contains("{replica=\"r1\"} 1\n"), "one handle left");
        drop(b);
        assert_eq!(render(), "");
    }

    #[test]
    fn histograms_render_cumulative_buckets_sum_and_count() {
        let series = EntitySeries::default();
        let key = Key::from_parts(BATCH_SIZE, &[("backend", "b\"x")]);
        let h = series.histogram(&key);
        for v in [1.0, 3.0, 4.0, 1000.0] {
            h.record(v);
        }
        let mut text = String::new();
        series.render_into(&mut text);
        for line in [
            "# TYPE serval_batch_size histogram",
            r#"serval_batch_size_bucket{backend="b\"x",le="1"} 1"#,
            r#"serval_batch_size_bucket{backend="b\"x",le="2"} 1"#,
            r#"serval_batch_size_bucket{backend="b\"x",le="4"} 3"#,
            r#"serval_batch_size_bucket{backend="b\"x",le="512"} 3"#,
            r#"serval_batch_size_bucket{backend="b\"x",le="+Inf"} 4"#,
            r#"serval_batch_size_sum{backend="b\"x"} 1008"#,
            r#"serval_batch_size_count{backend="b\"x"} 4"#,
        ] {
            assert!(text.contains(&format!("{line}\n")), "{line} not in {text}");
        }
    }
}
