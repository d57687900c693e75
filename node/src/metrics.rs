//! The node agent's metrics (listed in the README's "Metrics" section):
//! replicas by backend and state, and restarts.

pub const NODE_REPLICAS: &str = "serval_node_replicas";
pub const REPLICA_RESTARTS_TOTAL: &str = "serval_replica_restarts_total";

use serval_protos::states::ReplicaState;

/// Help texts (call once a recorder is installed).
pub fn describe() {
    metrics::describe_gauge!(
        NODE_REPLICAS,
        "Replicas supervised by this node agent, by backend and state (starting, running, failed)"
    );
    metrics::describe_counter!(
        REPLICA_RESTARTS_TOTAL,
        "Replica processes this node agent restarted after they exited or failed to start"
    );
}

/// The replica states counted in [`NODE_REPLICAS`], in the order a
/// [`ReplicaStateGauge`] holds their gauges: a supervisor's replica is
/// starting (process up, user code loading), running, or failed (waiting
/// out its backoff before the next start).
const STATES: [ReplicaState; 3] = [
    ReplicaState::Starting,
    ReplicaState::Running,
    ReplicaState::Failed,
];

/// One replica's place in [`NODE_REPLICAS`]: counted in exactly one state
/// at a time, and in none once dropped (the supervisor stopped).
///
/// It holds its backend's gauge of every state for the replica's life: in
/// the process's recorder (`serval_proxy::metrics::install`) this family's
/// series end with their last handle, so a backend's series (0 in the
/// states none of its replicas is in) stay while it has a replica on this
/// node and leave `/-/metrics` with the last one.
pub(crate) struct ReplicaStateGauge {
    gauges: [metrics::Gauge; 3],
    current: Option<usize>,
}

impl ReplicaStateGauge {
    pub(crate) fn new(backend: &str) -> Self {
        Self {
            gauges: STATES.map(|state| {
                metrics::gauge!(NODE_REPLICAS, "backend" => backend.to_owned(), "state" => state.as_str())
            }),
            current: None,
        }
    }

    pub(crate) fn set(&mut self, state: ReplicaState) {
        let Some(i) = STATES.iter().position(|s| *s == state) else {
            debug_assert!(false, "unknown replica state {state}");
            return;
        };
        if self.current == Some(i) {
            return;
        }
        if let Some(old) = self.current.replace(i) {
            self.gauges[old].decrement(1.0);
        }
        self.gauges[i].increment(1.0);
    }
}

impl Drop for ReplicaStateGauge {
    fn drop(&mut self) {
        if let Some(i) = self.current.take() {
            self.gauges[i].decrement(1.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_counts_in_one_state_at_a_time_and_in_none_once_stopped() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let line = |state: ReplicaState| {
            let text = handle.render();
            let prefix = format!(r#"serval_node_replicas{{backend="b",state="{state}"}} "#);
            text.lines()
                .find_map(|l| l.strip_prefix(prefix.as_str()).map(str::to_owned))
                .unwrap_or_else(|| panic!("no {state} series in {text}"))
        };
        metrics::with_local_recorder(&recorder, || {
            let mut one = ReplicaStateGauge::new("b");
            let mut two = ReplicaStateGauge::new("b");
            one.set(ReplicaState::Starting);
            two.set(ReplicaState::Starting);
            assert_eq!(line(ReplicaState::Starting), "2");
            one.set(ReplicaState::Running);
            one.set(ReplicaState::Running);
            assert_eq!(
                (
                    line(ReplicaState::Starting).as_str(),
                    line(ReplicaState::Running).as_str()
                ),
                ("1", "1")
            );
            two.set(ReplicaState::Failed);
            assert_eq!(
                (
                    line(ReplicaState::Starting).as_str(),
                    line(ReplicaState::Failed).as_str()
                ),
                ("0", "1")
            );
            drop(one);
            drop(two);
            assert_eq!(
                (
                    line(ReplicaState::Running).as_str(),
                    line(ReplicaState::Failed).as_str()
                ),
                ("0", "0")
            );
        });
    }
}
