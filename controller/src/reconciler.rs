//! The leader's reconcile loop. Each tick runs its managers in turn:
//! - nodes: agents that stopped heartbeating are declared dead, which hands
//!   their replicas back to the scheduler;
//! - autoscaling: backends with an autoscaling config get the replica count
//!   the [`crate::autoscaler`] recommends;
//! - leases: batch leases whose visibility timeout ran out on this
//!   leader's monotonic clock ([`LeaseClock`]) go back to their job's queue;
//! - blobs: while some blob is unnamed (just put, or code no backend
//!   names any more), a `CollectCodeBlobs`
//!   with this leader's wall clock every [`COLLECT_EVERY`]
//!   (`store::blobs` stamps and removes them).
//!
//! A failed step is logged and retried on the next tick; each step's
//! duration is a metric, and so are each backend's desired and running
//! replica counts (`serval_backend_desired_replicas`,
//! `serval_backend_running_replicas`, and `serval_backend_replicas` of
//! autoscaled backends), reported by the leader only, for live backends
//! only.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::soft_state::SoftState;
use crate::state::{ClusterState, ReplicaState};
use crate::store::jobs::{self, JobCommand, LeaseGrant};
use crate::store::Command;
use crate::store::{self, state_machine::StateMachineStore, Raft};

/// By default a node that sent no heartbeat for this long is dead.
pub const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_secs(10);
const TICK: Duration = Duration::from_secs(1);
/// How often the leader proposes `CollectCodeBlobs` while there are unnamed
/// blobs (the grace is `store::blobs::CODE_BLOB_GRACE_MS`).
pub const COLLECT_EVERY: Duration = Duration::from_secs(10);
pub const BACKEND_DESIRED_REPLICAS: &str = "serval_backend_desired_replicas";
pub const BACKEND_RUNNING_REPLICAS: &str = "serval_backend_running_replicas";
pub const BACKEND_AUTOSCALED_REPLICAS: &str = "serval_backend_replicas";

pub(crate) struct Reconciler {
    pub raft: Raft,
    pub sm: StateMachineStore,
    /// Heartbeats and load, as this head's service records them.
    pub soft: SoftState,
    pub node_timeout: Duration,
}

impl Reconciler {
    pub async fn run(self) {
        // Agents get a full timeout after this head becomes the leader to
        // reach it (a new leader has seen no heartbeats yet).
        let mut leader_since = None;
        let mut tick = tokio::time::interval(TICK);
        // The replica-count gauges of each live backend (leader only).
        let mut gauges = HashMap::new();
        let mut leases = LeaseClock::default();
        let mut collected: Option<Instant> = None;
        loop {
            tick.tick().await;
            let is_leader = {
                let m = self.raft.metrics().borrow().clone();
                m.current_leader == Some(m.id)
            };
            if !is_leader {
                leader_since = None;
                // A later term here starts every lease's timeout afresh.
                leases.clear();
                // The new leader reports them: two heads' series of one
                // backend would disagree.
                gauges.clear();
                continue;
            }
            let started = *leader_since.get_or_insert_with(Instant::now);
            let state = self.sm.current();
            record_replica_counts(&state, &mut gauges);
            self.step("nodes", self.dead_nodes(&state, started)).await;
            self.step("autoscaling", self.autoscale(&state)).await;
            self.step("leases", self.expired_leases(&mut leases)).await;
            if collected.is_none_or(|at| at.elapsed() >= COLLECT_EVERY) {
                collected = Some(Instant::now());
                self.step("blobs", self.collect_code_blobs()).await;
            }
        }
    }

    fn collect_code_blobs(&self) -> Vec<Command> {
        match self.sm.has_orphan_blobs() {
            Ok(true) => {
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                vec![Command::CollectCodeBlobs { now_ms }]
            }
            Ok(false) => Vec::new(),
            Err(e) => {
                tracing::warn!(error = %e, "reading unnamed code blobs failed");
                Vec::new()
            }
        }
    }

    fn expired_leases(&self, clock: &mut LeaseClock) -> Vec<Command> {
        let held = match jobs::leases(self.sm.database()) {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(error = %e, "reading batch leases failed");
                return Vec::new();
            }
        };
        let mut by_job: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
        for g in clock.due(&held, Instant::now()) {
            by_job.entry(g.job).or_default().push((g.index, g.grant));
        }
        let chunk = crate::limits::MAX_LEASE_BATCHES as usize;
        by_job
            .into_iter()
            .flat_map(|(id, leases)| {
                tracing::info!(job = %id, leases = leases.len(), "batch leases expired");
                leases
                    .chunks(chunk)
                    .map(|c| {
                        Command::Job(JobCommand::Expire {
                            id: id.clone(),
                            leases: c.to_vec(),
                        })
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
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
        // Nodes that died or left keep no entry: the map stays bounded.
        self.soft.forget_heartbeats(
            |node| state.nodes.get(node).is_some_and(|n| n.alive),
            now,
            self.node_timeout,
        );
        let beats = self.soft.heartbeats();
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
        let mut autoscaler = self.soft.autoscaler();
        let mut out = Vec::new();
        for b in state.backends.values() {
            let Some(config) = &b.config else { continue };
            let Some(auto) = &config.autoscaling else {
                continue;
            };
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

/// When each batch lease held now runs out, on this leader's monotonic
/// clock: a lease's visibility timeout counts from the first time this
/// leader saw it (at most a tick after it was granted here, or when this
/// head became the leader), never from a wall clock, so no head's clock can
/// end a lease early; after a failover every lease gets its full timeout.
#[derive(Debug, Default)]
pub struct LeaseClock {
    deadlines: HashMap<LeaseGrant, Instant>,
}

impl LeaseClock {
    /// The grants of `held` whose timeout has run out by `now`; grants no
    /// longer held are forgotten.
    pub fn due(&mut self, held: &[LeaseGrant], now: Instant) -> Vec<LeaseGrant> {
        let mut deadlines = HashMap::with_capacity(held.len());
        let mut due = Vec::new();
        for g in held {
            let visibility = Duration::from_millis(g.visibility_ms.max(0) as u64);
            let deadline = self
                .deadlines
                .get(g)
                .copied()
                .unwrap_or_else(|| now + visibility);
            if deadline <= now {
                due.push(g.clone());
            }
            deadlines.insert(g.clone(), deadline);
        }
        self.deadlines = deadlines;
        due
    }

    pub fn clear(&mut self) {
        self.deadlines.clear();
    }
}

/// One backend's replica-count gauges, held for as long as it exists: in
/// the recorder every process installs (the proxy crate's `metrics::install`)
/// these families end with their last handle, so a deleted backend's
/// series leave `/-/metrics` (a cluster that runs batch jobs creates a
/// backend per job, without end).
struct BackendGauges {
    desired: metrics::Gauge,
    running: metrics::Gauge,
    /// Autoscaled backends only.
    autoscaled: Option<metrics::Gauge>,
}

/// Sets each backend's desired (`num_replicas`) and running replica gauges;
/// the series of backends deleted since the last call go.
fn record_replica_counts(state: &ClusterState, gauges: &mut HashMap<String, BackendGauges>) {
    let mut running: HashMap<&str, usize> = HashMap::new();
    for r in state
        .replicas
        .values()
        .filter(|r| r.state == ReplicaState::Running)
    {
        *running.entry(r.backend.as_str()).or_default() += 1;
    }
    gauges.retain(|name, _| state.backends.contains_key(name));
    for b in state.backends.values() {
        let g = gauges
            .entry(b.name.clone())
            .or_insert_with(|| BackendGauges {
                desired: metrics::gauge!(BACKEND_DESIRED_REPLICAS, "backend" => b.name.clone()),
                running: metrics::gauge!(BACKEND_RUNNING_REPLICAS, "backend" => b.name.clone()),
                autoscaled: None,
            });
        let desired = b.config.as_ref().map_or(0, |c| c.num_replicas);
        g.desired.set(desired as f64);
        let up = running.get(b.name.as_str()).copied().unwrap_or(0);
        g.running.set(up as f64);
        let autoscaled = b.config.as_ref().is_some_and(|c| c.autoscaling.is_some());
        if autoscaled != g.autoscaled.is_some() {
            g.autoscaled = autoscaled
                .then(|| metrics::gauge!(BACKEND_AUTOSCALED_REPLICAS, "backend" => b.name.clone()));
        }
        if let Some(gauge) = &g.autoscaled {
            gauge.set(desired as f64);
        }
    }
}

/// Help texts of the controller's metrics (call once a recorder is installed).
pub fn describe_metrics() {
    metrics::describe_histogram!(
        "serval_controller_reconcile_step_seconds",
        metrics::Unit::Seconds,
        "Duration of one reconcile step on the leader, by step"
    );
    metrics::describe_gauge!(
        BACKEND_AUTOSCALED_REPLICAS,
        "Replica count the autoscaler works from, for autoscaled backends"
    );
    metrics::describe_gauge!(
        BACKEND_DESIRED_REPLICAS,
        "Replicas a backend is configured to run (num_replicas)"
    );
    metrics::describe_gauge!(
        BACKEND_RUNNING_REPLICAS,
        "Replicas of a backend reported running"
    );
}

/// A command without its payload bytes, for logs.
fn short(cmd: &Command) -> String {
    let text = format!("{cmd:?}");
    text.chars().take(120).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(index: u64, grant: u64, visibility_ms: i64) -> LeaseGrant {
        LeaseGrant {
            job: "job".into(),
            index,
            grant,
            visibility_ms,
        }
    }

    #[test]
    fn a_lease_runs_out_a_full_visibility_after_this_leader_first_saw_it() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut clock = LeaseClock::default();
        let a = grant(0, 1, 1000);
        assert!(clock.due(std::slice::from_ref(&a), t0).is_empty());
        // b was granted later, and seen later.
        let b = grant(1, 2, 1000);
        assert!(clock.due(&[a.clone(), b.clone()], ms(500)).is_empty());
        assert!(clock.due(&[a.clone(), b.clone()], ms(999)).is_empty());
        assert_eq!(
            clock.due(&[a.clone(), b.clone()], ms(1000)),
            vec![a.clone()]
        );
        // Batch 0 leased again (a new grant): timed afresh.
        let a2 = grant(0, 3, 1000);
        assert_eq!(
            clock.due(&[a2.clone(), b.clone()], ms(1500)),
            vec![b.clone()]
        );
        assert!(clock.due(std::slice::from_ref(&a2), ms(2499)).is_empty());
        assert_eq!(
            clock.due(std::slice::from_ref(&a2), ms(2500)),
            vec![a2.clone()]
        );
    }

    #[test]
    fn a_new_leader_gives_every_lease_its_full_timeout_again() {
        let t0 = Instant::now();
        let mut clock = LeaseClock::default();
        let a = grant(0, 1, 1000);
        assert!(clock.due(std::slice::from_ref(&a), t0).is_empty());
        // Leadership lost and won back 900 ms later: the lease that had
        // 100 ms left gets 1000 ms from now.
        clock.clear();
        let later = t0 + Duration::from_millis(900);
        assert!(clock.due(std::slice::from_ref(&a), later).is_empty());
        assert!(clock
            .due(std::slice::from_ref(&a), later + Duration::from_millis(999))
            .is_empty());
        assert_eq!(
            clock.due(
                std::slice::from_ref(&a),
                later + Duration::from_millis(1000)
            ),
            vec![a]
        );
    }
}
