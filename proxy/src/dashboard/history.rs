//! Per-endpoint request history for the dashboard's charts: each endpoint's
//! [`Tally`] is updated with atomics on the request path (next to its
//! Prometheus handles in `http_metrics::HttpMetrics`), and a sampler turns the
//! tallies into one [`Sample`] per endpoint per second, kept for 15 minutes.
//!
//! Bounded: endpoints come from the routing table only (the tallies are
//! dropped with the endpoint's handles when a snapshot removes it, and the
//! sampler drops their series), and each series holds at most
//! [`HISTORY_SECONDS`] samples.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

/// How far back the charts go: one sample a second.
pub(crate) const HISTORY_SECONDS: usize = 15 * 60;

/// Upper bounds of the latency buckets, in milliseconds; a last bucket
/// takes everything slower.
const BUCKET_BOUNDS_MS: [f64; 16] = [
    0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
    10000.0, 30000.0,
];
const BUCKETS: usize = BUCKET_BOUNDS_MS.len() + 1;

/// One endpoint's cumulative counts since its first request.
#[derive(Default)]
pub(crate) struct Tally {
    requests: AtomicU64,
    /// Answers of 500 and above.
    errors: AtomicU64,
    latency: [AtomicU64; BUCKETS],
}

impl Tally {
    /// Counts one answered request.
    pub(crate) fn record(&self, status: u16, elapsed: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let ms = elapsed.as_secs_f64() * 1000.0;
        let bucket = BUCKET_BOUNDS_MS
            .iter()
            .position(|bound| ms <= *bound)
            .unwrap_or(BUCKETS - 1);
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
    }

    fn read(&self) -> Counts {
        Counts {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            latency: std::array::from_fn(|i| self.latency[i].load(Ordering::Relaxed)),
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Counts {
    requests: u64,
    errors: u64,
    latency: [u64; BUCKETS],
}

/// One second of one endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub(crate) struct Sample {
    /// Unix time in seconds.
    pub t: u64,
    pub rps: f64,
    /// Share of answers that were 5xx, 0 to 1 (0 without requests).
    pub error_rate: f64,
    /// Latency percentiles in milliseconds (0 without requests).
    pub p50_ms: f64,
    pub p99_ms: f64,
}

struct Series {
    last: Counts,
    last_at: std::time::Instant,
    samples: VecDeque<Sample>,
}

/// The sampled series of every endpoint.
#[derive(Default)]
pub(crate) struct History {
    series: Mutex<HashMap<String, Series>>,
}

impl History {
    /// Takes one sample of each tally at Unix second `t`; endpoints with no
    /// tally any more lose their series.
    pub(crate) fn sample(&self, t: u64, tallies: &[(String, Arc<Tally>)]) {
        let now = std::time::Instant::now();
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        series.retain(|endpoint, _| tallies.iter().any(|(e, _)| e == endpoint));
        for (endpoint, tally) in tallies {
            let counts = tally.read();
            let Some(s) = series.get_mut(endpoint) else {
                // The first look only sets the baseline.
                series.insert(
                    endpoint.clone(),
                    Series {
                        last: counts,
                        last_at: now,
                        samples: VecDeque::with_capacity(HISTORY_SECONDS),
                    },
                );
                continue;
            };
            let seconds = now.duration_since(s.last_at).as_secs_f64().max(0.001);
            let sample = delta(t, &s.last, &counts, seconds);
            s.last = counts;
            s.last_at = now;
            if s.samples.len() == HISTORY_SECONDS {
                s.samples.pop_front();
            }
            s.samples.push_back(sample);
        }
    }

    /// Every endpoint's whole series.
    pub(crate) fn all(&self) -> HashMap<String, Vec<Sample>> {
        let series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        series
            .iter()
            .map(|(e, s)| (e.clone(), s.samples.iter().copied().collect()))
            .collect()
    }

    /// Every endpoint's latest sample.
    pub(crate) fn latest(&self) -> HashMap<String, Sample> {
        let series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        series
            .iter()
            .filter_map(|(e, s)| Some((e.clone(), *s.samples.back()?)))
            .collect()
    }
}

/// The sample between two readings `seconds` apart.
fn delta(t: u64, before: &Counts, after: &Counts, seconds: f64) -> Sample {
    let requests = after.requests.saturating_sub(before.requests);
    let errors = after.errors.saturating_sub(before.errors);
    let buckets: [u64; BUCKETS] =
        std::array::from_fn(|i| after.latency[i].saturating_sub(before.latency[i]));
    Sample {
        t,
        rps: requests as f64 / seconds,
        error_rate: if requests == 0 {
            0.0
        } else {
            errors as f64 / requests as f64
        },
        p50_ms: percentile(&buckets, 0.50),
        p99_ms: percentile(&buckets, 0.99),
    }
}

/// The `q` quantile of bucketed counts, interpolated inside its bucket.
fn percentile(buckets: &[u64; BUCKETS], q: f64) -> f64 {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let rank = q * total as f64;
    let mut seen = 0u64;
    for (i, &n) in buckets.iter().enumerate() {
        if n == 0 {
            continue;
        }
        if (seen + n) as f64 >= rank {
            let lower = if i == 0 { 0.0 } else { BUCKET_BOUNDS_MS[i - 1] };
            // The open last bucket reports its lower bound.
            let Some(&upper) = BUCKET_BOUNDS_MS.get(i) else {
                return lower;
            };
            let within = (rank - seen as f64) / n as f64;
            return lower + (upper - lower) * within.clamp(0.0, 1.0);
        }
        seen += n;
    }
    BUCKET_BOUNDS_MS[BUCKETS - 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_rates_and_percentiles_of_the_last_second() {
        let history = History::default();
        let tally = Arc::new(Tally::default());
        let tallies = vec![("e".to_string(), tally.clone())];
        history.sample(1, &tallies);
        assert!(history.latest().is_empty(), "the first look is a baseline");
        for _ in 0..98 {
            tally.record(200, Duration::from_micros(1500));
        }
        tally.record(503, Duration::from_millis(400));
        tally.record(500, Duration::from_millis(400));
        history.sample(2, &tallies);
        let s = history.latest()["e"];
        assert_eq!(s.t, 2);
        assert!(s.rps > 0.0);
        assert!((s.error_rate - 0.02).abs() < 1e-9, "{s:?}");
        assert!(s.p50_ms > 1.0 && s.p50_ms <= 2.0, "{s:?}");
        assert!(s.p99_ms > 200.0 && s.p99_ms <= 500.0, "{s:?}");
        // Nothing new: a zero sample, not the same one again.
        history.sample(3, &tallies);
        let s = history.latest()["e"];
        assert_eq!((s.t, s.rps, s.p99_ms), (3, 0.0, 0.0));
    }

    #[test]
    fn series_are_bounded_and_follow_the_endpoints() {
        let history = History::default();
        let tally = Arc::new(Tally::default());
        let tallies = vec![("e".to_string(), tally)];
        for t in 0..(HISTORY_SECONDS as u64 + 10) {
            history.sample(t, &tallies);
        }
        assert_eq!(history.all()["e"].len(), HISTORY_SECONDS);
        history.sample(10_000, &[]);
        assert!(history.all().is_empty());
    }
}
