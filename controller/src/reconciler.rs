//! The leader's reconcile loop. Each tick runs its managers in turn:
//! - nodes: agents that stopped heartbeating are declared dead, which hands
//!   their replicas back to the scheduler;
//! - autoscaling: backends with an autoscaling config get the replica count
//!   the [`crate::autoscaler`] recommends.
//!
//! A failed step is logged and retried on the next tick; each step's
//! duration is a metric.

use std::time::{Duration, Instant};

use crate::service::{Heartbeats, SharedAutoscaler};
use crate::state::{ClusterState, Command};
use crate::store::{self, state_machine::StateMachineStore, Raft};

/// By default a node that sent no heartbeat for this long is dead.
pub const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_secs(10);
const TICK: Duration = Duration::from_secs(1);

pub struct Reconciler {
    pub raft: Raft,
    pub sm: StateMachineStore,
    pub heartbeats: Heartbeats,
    pub autoscaler: SharedAutoscaler,
    pub node_timeout: Duration,
}

impl Reconciler {
    pub async fn run(self) {
        // Agents get a full timeout after this controller starts to reconnect.
        let started = Instant::now();
        let mut tick = tokio::time::interval(TICK);
        loop {
            tick.tick().await;
            let is_leader = {
                let m = self.raft.metrics().borrow().clone();
                m.current_leader == Some(m.id)
            };
            if !is_leader {
                continue;
            }
            let state = self.sm.current();
            self.step("nodes", self.dead_nodes(&state, started)).await;
            self.step("autoscaling", self.autoscale(&state)).await;
        }
    }

    async fn step(&self, name: &'static str, commands: Vec<Command>) {
        let start = Instant::now();
        for cmd in commands {
            if let Err(e) = store::propose(&self.raft, cmd.clone()).await {
                tracing::warn!(step = name, error = %e, command = ?short(&cmd), "reconcile step failed");
            }
        }
        metrics::histogram!("serval_controller_reconcile_step_seconds", "step" => name)
            .record(start.elapsed().as_secs_f64());
    }

    fn dead_nodes(&self, state: &ClusterState, started: Instant) -> Vec<Command> {
        let now = Instant::now();
        let beats = self.heartbeats.lock().unwrap_or_else(|p| p.into_inner());
        state
            .nodes
            .values()
            .filter(|n| n.alive)
            .filter(|n| {
                now.duration_since(beats.get(&n.id).copied().unwrap_or(started)) > self.node_timeout
            })
            .map(|n| {
                tracing::warn!(node_id = %n.id, "node missed its heartbeats; declaring it dead");
                Command::MarkNodeDead {
                    node_id: n.id.clone(),
                }
            })
            .collect()
    }

    fn autoscale(&self, state: &ClusterState) -> Vec<Command> {
        let now = Instant::now();
        let mut autoscaler = self.autoscaler.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for b in state.backends.values() {
            let Some(config) = &b.config else { continue };
            let Some(auto) = &config.autoscaling else {
                continue;
            };
            metrics::gauge!("serval_backend_replicas", "backend" => b.name.clone())
                .set(config.num_replicas as f64);
            if let Some(n) = autoscaler.decide(&b.name, auto, config.num_replicas, now) {
                tracing::info!(backend = %b.name, from = config.num_replicas, to = n, "autoscaling");
                out.push(Command::Autoscale {
                    name: b.name.clone(),
                    num_replicas: n,
                });
            }
        }
        autoscaler.retain(|name| {
            state
                .backends
                .get(name)
                .and_then(|b| b.config.as_ref())
                .is_some_and(|c| c.autoscaling.is_some())
        });
        out
    }
}

/// A command without its payload bytes, for logs.
fn short(cmd: &Command) -> String {
    let text = format!("{cmd:?}");
    text.chars().take(120).collect()
}
