//! `/-/readyz`: whether this process can do its whole job now, for
//! orchestrators' readiness probes (Kubernetes takes a pod that is not
//! ready out of its Services). A proxy is ready once it holds a cluster
//! snapshot (what `/-/healthz` says); a head only while it can also commit
//! writes. The head sets that check here (`ReadinessSlot::set`): this crate
//! knows nothing of raft.

use std::sync::{Arc, OnceLock};

/// The path on the proxy's port and on `--metrics-port`.
pub const READYZ_PATH: &str = "/-/readyz";

/// `Ok` when ready, else the reason (said in the 503 body).
pub type ReadinessCheck = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// The process's readiness check, shared by its proxy and its metrics
/// listener; a process that sets none (a node) is ready as far as it goes.
#[derive(Clone, Default)]
pub struct ReadinessSlot(Arc<OnceLock<ReadinessCheck>>);

impl ReadinessSlot {
    /// Sets the check (once; later calls are ignored).
    pub fn set(&self, check: ReadinessCheck) {
        let _ = self.0.set(check);
    }

    pub fn check(&self) -> Result<(), String> {
        self.0.get().map_or(Ok(()), |check| check())
    }
}
