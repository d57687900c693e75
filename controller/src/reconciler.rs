//! The leader's reconcile loop. Today it has one manager: nodes whose agent
//! stopped heartbeating are declared dead, which hands their replicas back
//! to the scheduler. A failed step is logged and retried on the next tick.

use std::time::{Duration, Instant};

use crate::service::Heartbeats;
use crate::state::Command;
use crate::store::{self, state_machine::StateMachineStore, Raft};

/// By default a node that sent no heartbeat for this long is dead.
pub const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_secs(10);
const TICK: Duration = Duration::from_secs(1);

pub async fn run(raft: Raft, sm: StateMachineStore, heartbeats: Heartbeats, node_timeout: Duration) {
    // Agents get a full timeout after this controller starts to reconnect.
    let started = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    loop {
        tick.tick().await;
        let is_leader = raft.metrics().borrow().current_leader == Some(raft.metrics().borrow().id);
        if !is_leader {
            continue;
        }
        let state = sm.current();
        let now = Instant::now();
        let dead: Vec<String> = {
            let beats = heartbeats.lock().unwrap_or_else(|p| p.into_inner());
            state
                .nodes
                .values()
                .filter(|n| n.alive)
                .filter(|n| {
                    let last = beats.get(&n.id).copied().unwrap_or(started);
                    now.duration_since(last) > node_timeout
                })
                .map(|n| n.id.clone())
                .collect()
        };
        for node_id in dead {
            tracing::warn!(%node_id, "node missed its heartbeats; declaring it dead");
            let step = Instant::now();
            if let Err(e) = store::propose(
                &raft,
                Command::MarkNodeDead {
                    node_id: node_id.clone(),
                },
            )
            .await
            {
                tracing::warn!(%node_id, error = %e, "could not declare node dead");
            }
            metrics::histogram!("serval_controller_reconcile_step_seconds", "step" => "nodes")
                .record(step.elapsed().as_secs_f64());
        }
    }
}
