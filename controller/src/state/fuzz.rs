//! Property test: random sequences of commands, many of them malformed or
//! over the caps, never make `ClusterState::apply` panic, and a refused
//! command leaves the state exactly as it was.

use std::collections::BTreeMap;

use proptest::prelude::*;
use serval_protos::control::*;

use super::{ClusterState, Command};
use crate::store::log_store::encode;

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec!["a", "b", "c", "n1", "a#0", "b#1", ""]).prop_map(String::from),
        1 => Just("x".repeat(300)),
    ]
}

fn count() -> impl Strategy<Value = u32> {
    prop_oneof![6 => 0..4u32, 1 => Just(300_000u32), 1 => any::<u32>()]
}

fn amount() -> impl Strategy<Value = f64> {
    prop_oneof![
        6 => 0.0..3.0f64,
        1 => prop::sample::select(vec![f64::NAN, f64::INFINITY, -1.0, 1e13, 1025.0, 0.5])
    ]
}

fn config() -> impl Strategy<Value = BackendConfig> {
    (
        count(),
        count(),
        amount(),
        amount(),
        prop::sample::select(vec!["", "1", "25%", "x", "200%"]),
        prop::option::of((count(), count())),
    )
        .prop_map(
            |(num_replicas, mcq, num_cpus, num_gpus, surge, autoscaling)| BackendConfig {
                num_replicas,
                max_concurrent_queries: mcq,
                num_cpus,
                num_gpus,
                max_surge: surge.into(),
                autoscaling: autoscaling.map(|(min_replicas, max_replicas)| AutoscalingConfig {
                    min_replicas,
                    max_replicas,
                    target_replica_concurrency: 1.0,
                    window: 1.0,
                    max_upscale_factor: 2.0,
                    max_downscale_factor: 0.5,
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
}

fn traffic() -> impl Strategy<Value = BTreeMap<String, f64>> {
    prop::collection::btree_map(name(), amount(), 0..3)
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        (name(), amount(), amount(), any::<u32>()).prop_map(|(id, num_cpus, num_gpus, pid)| {
            Command::RegisterNode(Node {
                id,
                num_cpus,
                num_gpus,
                pid: pid % 3,
                ..Default::default()
            })
        }),
        name().prop_map(|node_id| Command::MarkNodeDead { node_id }),
        (
            name(),
            prop::sample::select(vec!["starting", "running", "failed", "bogus"])
        )
            .prop_map(|(replica_id, state)| Command::ReportReplica(ReplicaReport {
                replica_id,
                state: state.into(),
                ..Default::default()
            })),
        (name(), prop::option::of(config()), any::<bool>()).prop_map(|(name, config, code)| {
            Command::CreateBackend(Backend {
                name,
                config,
                code_digest: if code {
                    serval_protos::blob::digest(&[1])
                } else {
                    String::new()
                },
                ..Default::default()
            })
        }),
        (name(), config()).prop_map(|(name, config)| Command::UpdateBackendConfig { name, config }),
        (name(), count())
            .prop_map(|(name, num_replicas)| Command::Autoscale { name, num_replicas }),
        (name(), any::<bool>()).prop_map(|(name, code)| Command::UpdateBackendCode {
            name,
            code_digest: if code {
                serval_protos::blob::digest(&[2])
            } else {
                String::new()
            },
            blobs: Vec::new(),
        }),
        (name(), any::<bool>()).prop_map(|(name, force)| Command::DeleteBackend { name, force }),
        (
            name(),
            prop::sample::select(vec!["/a", "/b/{x}", "bad", "", "/a"]),
            traffic(),
            prop::collection::vec(prop::sample::select(vec!["GET", "post", "", "1"]), 0..20)
        )
            .prop_map(|(name, route, traffic, methods)| Command::CreateEndpoint(
                Endpoint {
                    name,
                    route: route.into(),
                    traffic: traffic.into_iter().collect(),
                    methods: methods.into_iter().map(String::from).collect(),
                    ..Default::default()
                }
            )),
        name().prop_map(|name| Command::DeleteEndpoint { name }),
        (name(), traffic())
            .prop_map(|(endpoint, traffic)| Command::SetTraffic { endpoint, traffic }),
        (name(), name(), amount()).prop_map(|(endpoint, backend, proportion)| {
            Command::SetShadow {
                endpoint,
                backend,
                proportion,
            }
        }),
        (name(), any::<u32>()).prop_map(|(host, port)| Command::SetHttpOptions(HttpOptions {
            host,
            port,
            ..Default::default()
        })),
        any::<bool>().prop_map(Command::SetShuttingDown),
        name().prop_map(|name| Command::PutApi(Api {
            name,
            ..Default::default()
        })),
        name().prop_map(|name| Command::DeleteApi { name }),
        name().prop_map(|digest| Command::PutBlob {
            digest,
            data: vec![0]
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn apply_never_panics_and_a_refusal_changes_nothing(
        cmds in prop::collection::vec(command(), 1..24),
    ) {
        let mut state = ClusterState::default();
        for cmd in cmds {
            let before = encode(&state).unwrap();
            let version = state.version;
            match state.apply(cmd) {
                Ok(()) => prop_assert_eq!(state.version, version + 1),
                Err(_) => prop_assert_eq!(encode(&state).unwrap(), before),
            }
            prop_assert!(state.nodes.len() <= crate::limits::MAX_NODES);
            let want: u64 = state
                .backends
                .values()
                .map(|b| b.config.as_ref().map_or(1, |c| u64::from(c.num_replicas)))
                .sum();
            prop_assert!(want <= crate::limits::MAX_REPLICAS_TOTAL);
        }
    }
}
