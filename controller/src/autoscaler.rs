//! Autoscaling on in-flight requests, with Cortex's knobs.
//!
//! Routers (proxies and Python handles) report each backend's load every
//! second: requests in flight on its replicas plus those waiting for a slot
//! or for any replica. Each tick the leader sums the newest report of every
//! router, averages the sums over `window`, and recommends
//! `ceil(load / target_replica_concurrency)` replicas, then:
//! - keeps the current count while the load per replica is within the
//!   tolerances around the target;
//! - moves at most by `max_upscale_factor` / `max_downscale_factor`;
//! - never scales above the lowest recommendation of the last
//!   `upscale_stabilization_period`, nor below the highest of the last
//!   `downscale_stabilization_period`;
//! - never scales below the count a backend had at its first decision on
//!   this leader within `downscale_stabilization_period` of it;
//! - clamps to `[min_replicas, max_replicas]`.
//!
//! A backend at zero replicas with any waiting request goes to one at once:
//! the proxy holds that request until the replica is ready.
//!
//! All of this lives in memory on the leader: load is a fast signal, not
//! state worth a raft entry; only the decisions are committed.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use serval_protos::control::AutoscalingConfig;

/// Reports older than this no longer count (the router went away).
const REPORT_TTL: Duration = Duration::from_secs(5);
/// The most (router, backend) reports kept at once. Every handle process is
/// a new router, so without a bound a cluster that autoscales nothing (and
/// so never prunes while deciding) kept one entry per router ever seen.
pub const MAX_REPORTS: usize = 10_000;

#[derive(Default)]
pub struct Autoscaler {
    /// (router, backend) -> (when, load).
    reports: HashMap<(String, String), (Instant, f64)>,
    /// backend -> summed load per tick, within the window.
    history: HashMap<String, VecDeque<(Instant, f64)>>,
    /// backend -> recommendations per tick, within the stabilization periods.
    recommendations: HashMap<String, VecDeque<(Instant, u32)>>,
    /// backend -> (first decision, the count it had then): a backend is not
    /// scaled below the count it started with (or had when this leader took
    /// over) within its downscale stabilization period, as if that count
    /// had been recommended then. So `initial_replicas` holds until the
    /// load says otherwise for that long (Ray's downscale_delay_s).
    first_seen: HashMap<String, (Instant, u32)>,
}

impl Autoscaler {
    pub fn report(
        &mut self,
        source: &str,
        now: Instant,
        load: impl IntoIterator<Item = (String, f64)>,
    ) {
        for (backend, value) in load {
            let key = (source.to_string(), backend);
            if self.reports.len() >= MAX_REPORTS && !self.reports.contains_key(&key) {
                self.prune(now);
                if self.reports.len() >= MAX_REPORTS {
                    tracing::warn!(
                        limit = MAX_REPORTS,
                        "load reports at their limit; one dropped"
                    );
                    continue;
                }
            }
            self.reports.insert(key, (now, value.max(0.0)));
        }
    }

    /// Drops reports that no longer count: with a bounded map, this runs
    /// on its own only when the map is full or a backend is decided.
    fn prune(&mut self, now: Instant) {
        self.reports
            .retain(|_, (at, _)| now.duration_since(*at) <= REPORT_TTL);
    }

    fn current_load(&mut self, backend: &str, now: Instant) -> f64 {
        self.prune(now);
        self.reports
            .iter()
            .filter(|((_, b), _)| b == backend)
            .map(|(_, (_, v))| v)
            .sum()
    }

    /// The replica count `backend` should have now, given its `current`
    /// count; `None` when it should stay as it is.
    pub fn decide(
        &mut self,
        backend: &str,
        config: &AutoscalingConfig,
        current: u32,
        now: Instant,
    ) -> Option<u32> {
        let load = self.current_load(backend, now);
        if current == 0 && load > 0.0 {
            return Some(1.max(config.min_replicas));
        }
        let window = Duration::from_secs_f64(config.window);
        let history = self.history.entry(backend.to_string()).or_default();
        history.push_back((now, load));
        while history
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > window)
        {
            history.pop_front();
        }
        let average = history.iter().map(|(_, v)| v).sum::<f64>() / history.len() as f64;
        let recommendation = recommend(config, current, average);

        let keep = Duration::from_secs_f64(
            config
                .upscale_stabilization_period
                .max(config.downscale_stabilization_period),
        );
        let recs = self.recommendations.entry(backend.to_string()).or_default();
        recs.push_back((now, recommendation));
        while recs
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > keep)
        {
            recs.pop_front();
        }
        let within = |period: f64| {
            let period = Duration::from_secs_f64(period);
            recs.iter()
                .filter(move |(at, _)| now.duration_since(*at) <= period)
                .map(|(_, r)| *r)
        };
        let (seen_at, seen_count) = *self
            .first_seen
            .entry(backend.to_string())
            .or_insert((now, current));
        let downscale_period = Duration::from_secs_f64(config.downscale_stabilization_period);
        let start_floor = (now.duration_since(seen_at) <= downscale_period).then_some(seen_count);
        let target = if recommendation > current {
            within(config.upscale_stabilization_period)
                .min()
                .unwrap_or(current)
                .max(current)
        } else if recommendation < current {
            within(config.downscale_stabilization_period)
                .chain(start_floor)
                .max()
                .unwrap_or(current)
                .min(current)
        } else {
            current
        };
        (target != current).then_some(target)
    }

    /// Forgets backends that no longer autoscale.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.history.retain(|b, _| keep(b));
        self.recommendations.retain(|b, _| keep(b));
        self.first_seen.retain(|b, _| keep(b));
    }
}

/// One tick's recommendation, before stabilization.
fn recommend(c: &AutoscalingConfig, current: u32, load: f64) -> u32 {
    let raw = (load / c.target_replica_concurrency).ceil().max(0.0) as u32;
    let mut r = raw;
    if current > 0 {
        let per_replica = load / (current as f64 * c.target_replica_concurrency);
        if per_replica >= 1.0 - c.downscale_tolerance && per_replica <= 1.0 + c.upscale_tolerance {
            r = current;
        }
        let up_cap = (current as f64 * c.max_upscale_factor).ceil() as u32;
        let down_floor = (current as f64 * c.max_downscale_factor).floor() as u32;
        r = r.clamp(down_floor.min(current), up_cap.max(current));
    }
    r.clamp(c.min_replicas, c.max_replicas)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AutoscalingConfig {
        AutoscalingConfig {
            min_replicas: 0,
            max_replicas: 10,
            target_replica_concurrency: 2.0,
            window: 3.0,
            upscale_stabilization_period: 0.0,
            downscale_stabilization_period: 5.0,
            max_upscale_factor: 2.0,
            max_downscale_factor: 0.5,
            upscale_tolerance: 0.1,
            downscale_tolerance: 0.1,
        }
    }

    #[test]
    fn recommendations_follow_load_within_the_caps_and_tolerances() {
        let c = config();
        assert_eq!(recommend(&c, 2, 4.0), 2, "exactly on target");
        assert_eq!(recommend(&c, 2, 4.3), 2, "inside the upscale tolerance");
        assert_eq!(recommend(&c, 2, 20.0), 4, "capped by max_upscale_factor");
        assert_eq!(recommend(&c, 4, 0.0), 2, "capped by max_downscale_factor");
        assert_eq!(recommend(&c, 1, 100.0), 2);
        assert_eq!(recommend(&c, 8, 100.0), 10, "clamped to max_replicas");
        assert_eq!(recommend(&c, 0, 0.0), 0);
    }

    #[test]
    fn scales_up_from_zero_at_once_and_down_only_after_stabilization() {
        let c = config();
        let mut a = Autoscaler::default();
        let t0 = Instant::now();
        a.report("proxy", t0, [("b".to_string(), 1.0)]);
        assert_eq!(
            a.decide("b", &c, 0, t0),
            Some(1),
            "a waiting request wakes a backend at zero"
        );

        a.report("proxy", t0, [("b".to_string(), 8.0)]);
        a.report("handle", t0, [("b".to_string(), 4.0)]);
        assert_eq!(
            a.decide("b", &c, 1, t0),
            Some(2),
            "12 in flight, target 2: up, capped at 2x"
        );

        // Load stops: the window still remembers it, and the downscale
        // stabilization period holds the count up for 5 s.
        let mut current = 2;
        let mut went_down_at = None;
        for s in 1..=30 {
            let now = t0 + Duration::from_secs(s);
            a.report("proxy", now, [("b".to_string(), 0.0)]);
            a.report("handle", now, [("b".to_string(), 0.0)]);
            if let Some(n) = a.decide("b", &c, current, now) {
                // The window still averages in the earlier load for a while.
                if n < current {
                    went_down_at.get_or_insert(s);
                }
                current = n;
            }
        }
        assert_eq!(current, 0, "scaled to zero in the end");
        assert!(
            went_down_at.unwrap() >= 5,
            "scaled down before the stabilization period: {went_down_at:?}"
        );
    }

    #[test]
    fn a_new_backend_keeps_its_starting_count_for_the_downscale_period() {
        let c = config();
        let mut a = Autoscaler::default();
        let t0 = Instant::now();
        // Started at 4 (Ray's initial_replicas), no load at all.
        let mut current = 4;
        let mut went_down_at = None;
        for s in 0..=12 {
            let now = t0 + Duration::from_secs(s);
            a.report("proxy", now, [("b".to_string(), 0.0)]);
            if let Some(n) = a.decide("b", &c, current, now) {
                went_down_at.get_or_insert(s);
                current = n;
            }
        }
        assert_eq!(went_down_at, Some(6), "held for the 5 s period, then down");
        assert!(current < 4);
    }

    #[test]
    fn reports_of_routers_long_gone_are_not_kept_without_bound() {
        let mut a = Autoscaler::default();
        let t0 = Instant::now();
        // More short-lived handle processes than the bound, and no backend
        // that autoscales (nothing decides, so nothing else prunes).
        for i in 0..(MAX_REPORTS + 5_000) {
            a.report(&format!("handle-{i}"), t0, [("b".to_string(), 1.0)]);
        }
        assert_eq!(a.reports.len(), MAX_REPORTS);
        // Later, the old ones are stale: room again, and the new one counts.
        let later = t0 + REPORT_TTL + Duration::from_secs(1);
        a.report("handle-new", later, [("b".to_string(), 2.0)]);
        assert_eq!(a.reports.len(), 1);
        assert_eq!(a.current_load("b", later), 2.0);
    }

    #[test]
    fn stale_reports_stop_counting() {
        let c = AutoscalingConfig {
            min_replicas: 1,
            ..config()
        };
        let mut a = Autoscaler::default();
        let t0 = Instant::now();
        a.report("gone", t0, [("b".to_string(), 50.0)]);
        let later = t0 + REPORT_TTL + Duration::from_secs(1);
        assert_eq!(a.current_load("b", later), 0.0);
        assert_eq!(a.decide("b", &c, 1, later), None);
    }
}
