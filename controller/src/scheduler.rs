//! Placement: which node a replica runs on, and which of its GPUs.
//! Deterministic (it runs inside the raft state machine): among live nodes
//! with room for the replica's declared CPUs and GPUs, the one with the
//! fewest replicas, ties broken by node id.
//!
//! GPUs: a node with `num_gpus = N` has GPUs `0..N`. A replica asking for a
//! fraction (`0 < g < 1`) shares one GPU with others while their fractions
//! fit in 1; a replica asking for `g >= 1` (a whole number) gets `g` GPUs of
//! its own.

use std::collections::BTreeMap;

use crate::state::{ClusterState, ReplicaState};

const EPS: f64 = 1e-9;

/// Where a replica goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub node_id: String,
    pub gpu_ids: Vec<u32>,
}

struct NodeLoad {
    /// CPUs the node offers.
    capacity: f64,
    cpus: f64,
    /// Fraction of each GPU already given out.
    gpus: Vec<f64>,
    replicas: usize,
}

/// What every live node has given out, computed once (one pass over the
/// replicas) and kept up to date as replicas are placed: placing `n`
/// replicas costs `n` times the number of nodes, not times the replicas.
pub struct Loads {
    /// Live nodes by id (ties are broken by id).
    nodes: BTreeMap<String, NodeLoad>,
}

/// The share of each of its GPUs a replica asking for `num_gpus` takes.
fn gpu_share(num_gpus: f64) -> f64 {
    if num_gpus < 1.0 {
        num_gpus
    } else {
        1.0
    }
}

impl Loads {
    pub fn new(state: &ClusterState) -> Self {
        let mut nodes: BTreeMap<String, NodeLoad> = state
            .nodes
            .values()
            .filter(|n| n.alive)
            .map(|n| {
                let load = NodeLoad {
                    capacity: n.num_cpus,
                    cpus: 0.0,
                    gpus: vec![0.0; n.num_gpus.floor().max(0.0) as usize],
                    replicas: 0,
                };
                (n.id.clone(), load)
            })
            .collect();
        for r in state
            .replicas
            .values()
            .filter(|r| r.state != ReplicaState::Pending)
        {
            let Some(load) = nodes.get_mut(&r.node_id) else {
                continue;
            };
            let Some(c) = state
                .backends
                .get(&r.backend)
                .and_then(|b| b.config.as_ref())
            else {
                continue;
            };
            load.add(c.num_cpus, c.num_gpus, &r.gpu_ids);
        }
        Self { nodes }
    }

    /// The node for a replica asking for `num_cpus` and `num_gpus`: among
    /// the nodes with room, the one with the fewest replicas.
    pub fn choose(&self, num_cpus: f64, num_gpus: f64) -> Option<Placement> {
        self.nodes
            .iter()
            .filter_map(|(id, load)| {
                if load.cpus + num_cpus > load.capacity + EPS {
                    return None;
                }
                let gpu_ids = pick_gpus(&load.gpus, num_gpus)?;
                Some((load.replicas, id, gpu_ids))
            })
            .min_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)))
            .map(|(_, node_id, gpu_ids)| Placement {
                node_id: node_id.clone(),
                gpu_ids,
            })
    }

    /// Counts a replica just placed at `placement`.
    pub fn place(&mut self, placement: &Placement, num_cpus: f64, num_gpus: f64) {
        if let Some(load) = self.nodes.get_mut(&placement.node_id) {
            load.add(num_cpus, num_gpus, &placement.gpu_ids);
        }
    }
}

impl NodeLoad {
    fn add(&mut self, num_cpus: f64, num_gpus: f64, gpu_ids: &[u32]) {
        self.cpus += num_cpus;
        let share = gpu_share(num_gpus);
        for id in gpu_ids {
            if let Some(g) = self.gpus.get_mut(*id as usize) {
                *g += share;
            }
        }
        self.replicas += 1;
    }
}

/// The GPUs a replica asking for `want` gets on a node with `used` GPUs.
fn pick_gpus(used: &[f64], want: f64) -> Option<Vec<u32>> {
    if want <= EPS {
        return Some(Vec::new());
    }
    if want < 1.0 {
        // Best fit: the fullest GPU that still has room, to keep whole GPUs free.
        return used
            .iter()
            .enumerate()
            .filter(|(_, u)| **u + want <= 1.0 + EPS)
            .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
            .map(|(i, _)| vec![i as u32]);
    }
    let free: Vec<u32> = used
        .iter()
        .enumerate()
        .filter(|(_, u)| **u <= EPS)
        .map(|(i, _)| i as u32)
        .collect();
    let n = want.round() as usize;
    (free.len() >= n).then(|| free[..n].to_vec())
}

#[cfg(test)]
mod tests {
    use super::pick_gpus;

    #[test]
    fn fractions_share_a_gpu_and_whole_gpus_are_exclusive() {
        assert_eq!(pick_gpus(&[0.0, 0.0], 0.0), Some(vec![]));
        assert_eq!(
            pick_gpus(&[0.5, 0.0], 0.5),
            Some(vec![0]),
            "fills the half-used GPU first"
        );
        assert_eq!(pick_gpus(&[1.0, 0.25], 0.5), Some(vec![1]));
        assert_eq!(pick_gpus(&[1.0, 0.75], 0.5), None);
        assert_eq!(pick_gpus(&[0.5, 0.0, 0.0], 2.0), Some(vec![1, 2]));
        assert_eq!(
            pick_gpus(&[0.5, 0.0], 2.0),
            None,
            "a shared GPU is not free"
        );
    }
}
