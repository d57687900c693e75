//! The HTTP server's metric handles by endpoint label (the names are in
//! [`crate::metrics`]), and the per-second tallies the dashboard reads.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use metrics::Histogram;

use crate::dashboard::history::Tally;
use crate::metrics::{
    by_endpoint, retain, Outcome, RequestCounters, NO_ENDPOINT_LABEL, REQUESTS_TOTAL,
    REQUEST_DURATION_SECONDS,
};

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
                REQUEST_DURATION_SECONDS,
                "endpoint" => endpoint.to_owned()
            ),
            tally: Arc::default(),
        });
        let class = Outcome::of_status(status);
        m.by_class[class as usize]
            .get_or_init(|| {
                metrics::counter!(
                    REQUESTS_TOTAL,
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
            .filter(|(e, _)| e.as_str() != NO_ENDPOINT_LABEL)
            .map(|(e, m)| (e.clone(), m.tally.clone()))
            .collect()
    }
}
