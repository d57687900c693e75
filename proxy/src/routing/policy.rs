//! Replica-choice policies: which replica of a backend gets the next request.
//!
//! A policy only chooses among the replicas the router offers; the router
//! owns admission. It offers each replica's in-flight count, or `None` when
//! the replica cannot take the request (out of rotation after a broken
//! connection, or already at `max_concurrent_queries`). When the policy
//! returns `None` every routable replica is full and the router queues the
//! request in its bounded per-backend queue; when that queue is full the
//! caller gets [`RouterError::Backpressure`](super::RouterError::Backpressure) (HTTP 503 with
//! `Retry-After`). Policies therefore never block and never over-admit.

mod pow2;

pub use pow2::PowerOfTwoChoices;

/// Chooses one replica for a request.
pub trait ReplicaChoice: Send + Sync + 'static {
    /// `loads[i]` is replica `i`'s in-flight count, or `None` when it cannot
    /// take a request now. Returns the chosen index, or `None` when no
    /// replica can take it.
    fn choose(&self, loads: &[Option<usize>]) -> Option<usize>;
}
