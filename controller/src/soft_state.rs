//! The controller's soft state: what the leader's reconciler reads but raft
//! does not hold, because it changes every second and only the leader's
//! view matters. Node agents' heartbeats (the reconciler declares a silent
//! node dead) and routers' load reports (the autoscaler's window). The
//! `Control` service writes it ([`crate::service`], forwarding to the
//! leader when another head leads), the reconciler reads it
//! ([`crate::reconciler`]). Lost on restart and on a change of leader, by
//! design: a new leader gives every node a full timeout and starts a new
//! window.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::autoscaler::Autoscaler;

/// Shared by the service and the reconciler of one head; clones share it.
#[derive(Clone, Default)]
pub struct SoftState {
    /// When each node agent last sent a heartbeat to this head.
    heartbeats: Arc<Mutex<HashMap<String, Instant>>>,
    /// Routers' load reports, read by the reconciler's autoscaling step.
    autoscaler: Arc<Mutex<Autoscaler>>,
}

impl SoftState {
    /// Records that `node_id` is alive at `now`.
    pub fn heartbeat(&self, node_id: String, now: Instant) {
        lock(&self.heartbeats).insert(node_id, now);
    }

    /// When each node last sent a heartbeat.
    pub fn heartbeats(&self) -> MutexGuard<'_, HashMap<String, Instant>> {
        lock(&self.heartbeats)
    }

    /// Forgets the heartbeats of nodes that are not `alive` (dead, or gone
    /// from the state) once they are older than `max_age`, so the map holds
    /// no more than the live nodes and those of the last `max_age`. A fresh
    /// one stays: a node's first heartbeat may come before its registration
    /// is applied where the caller looked.
    pub fn forget_heartbeats(&self, alive: impl Fn(&str) -> bool, now: Instant, max_age: Duration) {
        lock(&self.heartbeats)
            .retain(|node, at| alive(node) || now.saturating_duration_since(*at) <= max_age);
    }

    /// The autoscaler, with the load reports it decides from.
    pub fn autoscaler(&self) -> MutexGuard<'_, Autoscaler> {
        lock(&self.autoscaler)
    }
}

/// A panic while one was held leaves plain data, still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_of_nodes_no_longer_alive_are_forgotten_once_old() {
        let soft = SoftState::default();
        let t0 = Instant::now();
        let timeout = Duration::from_secs(10);
        soft.heartbeat("alive".into(), t0);
        soft.heartbeat("dead".into(), t0);
        soft.heartbeat("removed".into(), t0);
        let alive = |node: &str| node == "alive";
        // Within the timeout nothing goes (a registration may be in flight).
        soft.forget_heartbeats(alive, t0 + timeout, timeout);
        assert_eq!(soft.heartbeats().len(), 3);
        soft.heartbeat("new".into(), t0 + timeout);
        soft.forget_heartbeats(alive, t0 + timeout + Duration::from_millis(1), timeout);
        let mut left: Vec<_> = soft.heartbeats().keys().cloned().collect();
        left.sort();
        assert_eq!(left, ["alive", "new"]);
    }
}
