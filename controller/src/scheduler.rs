//! Placement: which node a replica runs on. Deterministic (it runs inside the
//! raft state machine): among live nodes with room for the replica's declared
//! CPUs and GPUs, the one with the fewest replicas, ties broken by node id.

use crate::state::{replica_state, ClusterState};

/// Resources a node has committed to the replicas placed on it.
fn used(state: &ClusterState, node_id: &str) -> (f64, f64, usize) {
    let mut cpus = 0.0;
    let mut gpus = 0.0;
    let mut count = 0;
    for r in state
        .replicas
        .values()
        .filter(|r| r.node_id == node_id && r.state != replica_state::PENDING)
    {
        if let Some(c) = state
            .backends
            .get(&r.backend)
            .and_then(|b| b.config.as_ref())
        {
            cpus += c.num_cpus;
            gpus += c.num_gpus;
        }
        count += 1;
    }
    (cpus, gpus, count)
}

pub fn choose_node(state: &ClusterState, num_cpus: f64, num_gpus: f64) -> Option<String> {
    const EPS: f64 = 1e-9;
    state
        .nodes
        .values()
        .filter(|n| n.alive)
        .filter_map(|n| {
            let (cpus, gpus, count) = used(state, &n.id);
            let fits = cpus + num_cpus <= n.num_cpus + EPS && gpus + num_gpus <= n.num_gpus + EPS;
            fits.then_some((count, n.id.clone()))
        })
        .min()
        .map(|(_, id)| id)
}
