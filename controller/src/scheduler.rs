//! Placement: which node a replica runs on, and which of its GPUs.
//! Deterministic (it runs inside the raft state machine): among live nodes
//! with room for the replica's declared CPUs and GPUs, the one with the
//! fewest replicas, ties broken by node id.
//!
//! GPUs: a node with `num_gpus = N` has GPUs `0..N`. A replica asking for a
//! fraction (`0 < g < 1`) shares one GPU with others while their fractions
//! fit in 1; a replica asking for `g >= 1` (a whole number) gets `g` GPUs of
//! its own.

use crate::state::{replica_state, ClusterState};

const EPS: f64 = 1e-9;

/// Where a replica goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub node_id: String,
    pub gpu_ids: Vec<u32>,
}

struct NodeLoad {
    cpus: f64,
    /// Fraction of each GPU already given out.
    gpus: Vec<f64>,
    replicas: usize,
}

fn load(state: &ClusterState, node_id: &str, num_gpus: usize) -> NodeLoad {
    let mut load = NodeLoad {
        cpus: 0.0,
        gpus: vec![0.0; num_gpus],
        replicas: 0,
    };
    for r in state
        .replicas
        .values()
        .filter(|r| r.node_id == node_id && r.state != replica_state::PENDING)
    {
        let Some(c) = state
            .backends
            .get(&r.backend)
            .and_then(|b| b.config.as_ref())
        else {
            continue;
        };
        load.cpus += c.num_cpus;
        let share = if c.num_gpus < 1.0 { c.num_gpus } else { 1.0 };
        for id in &r.gpu_ids {
            if let Some(g) = load.gpus.get_mut(*id as usize) {
                *g += share;
            }
        }
        load.replicas += 1;
    }
    load
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

pub fn choose_node(state: &ClusterState, num_cpus: f64, num_gpus: f64) -> Option<Placement> {
    state
        .nodes
        .values()
        .filter(|n| n.alive)
        .filter_map(|n| {
            let load = load(state, &n.id, n.num_gpus.floor().max(0.0) as usize);
            if load.cpus + num_cpus > n.num_cpus + EPS {
                return None;
            }
            let gpu_ids = pick_gpus(&load.gpus, num_gpus)?;
            Some((load.replicas, n.id.clone(), gpu_ids))
        })
        .min_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)))
        .map(|(_, node_id, gpu_ids)| Placement { node_id, gpu_ids })
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
