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
use std::time::Instant;

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

    /// The autoscaler, with the load reports it decides from.
    pub fn autoscaler(&self) -> MutexGuard<'_, Autoscaler> {
        lock(&self.autoscaler)
    }
}

/// A panic while one was held leaves plain data, still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
