use super::*;
use serval_protos::control::ReplicaReport;

fn node(id: &str, cpus: f64) -> Node {
    Node {
        id: id.into(),
        hostname: "h".into(),
        num_cpus: cpus,
        pid: 1,
        ..Default::default()
    }
}

fn backend(name: &str, replicas: u32) -> Backend {
    Backend {
        name: name.into(),
        code_digest: serval_protos::blob::digest(&[1, 2, 3]),
        config: Some(BackendConfig {
            num_replicas: replicas,
            num_cpus: 1.0,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn endpoint(name: &str, backend: &str, route: &str) -> Endpoint {
    Endpoint {
        name: name.into(),
        route: route.into(),
        traffic: [(backend.to_string(), 1.0)].into_iter().collect(),
        ..Default::default()
    }
}

fn cluster() -> ClusterState {
    let mut s = ClusterState::default();
    s.apply(Command::RegisterNode(node("n1", 2.0))).unwrap();
    s.apply(Command::CreateBackend(backend("b", 1))).unwrap();
    s
}

#[test]
fn backend_replicas_are_placed_on_a_node_with_room() {
    let mut s = cluster();
    s.apply(Command::UpdateBackendConfig {
        name: "b".into(),
        config: BackendConfig {
            num_replicas: 3,
            num_cpus: 1.0,
            ..Default::default()
        },
    })
    .unwrap();
    let placed: Vec<_> = s.replicas.values().filter(|r| r.node_id == "n1").collect();
    assert_eq!(placed.len(), 2, "a 2-CPU node holds two 1-CPU replicas");
    let pending: Vec<_> = s
        .replicas
        .values()
        .filter(|r| r.state == ReplicaState::Pending)
        .collect();
    assert_eq!(pending.len(), 1);
    assert!(pending[0].error.contains("CPU"), "{}", pending[0].error);
    // A second node takes the pending one.
    s.apply(Command::RegisterNode(node("n2", 2.0))).unwrap();
    assert!(s.replicas.values().all(|r| !r.node_id.is_empty()));
}

#[test]
fn route_prefixes_are_checked_and_taken_once_beside_routes() {
    let mut s = cluster();
    let prefix = |name: &str, route: &str| Endpoint {
        route_is_prefix: true,
        ..endpoint(name, "b", route)
    };
    s.apply(Command::CreateEndpoint(endpoint("e", "b", "/api")))
        .unwrap();
    // A prefix may equal a route: the route is tried first.
    s.apply(Command::CreateEndpoint(prefix("app", "/api")))
        .unwrap();
    s.apply(Command::CreateEndpoint(prefix("root", "/")))
        .unwrap();
    let taken = s
        .apply(Command::CreateEndpoint(prefix("other", "/api")))
        .unwrap_err()
        .to_string();
    assert!(taken.contains("collides"), "{taken}");
    for bad in ["/api/", "api", "/a/{x}", ""] {
        let e = s
            .apply(Command::CreateEndpoint(prefix("bad", bad)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("route prefix"), "{bad}: {e}");
    }
}

#[test]
fn refused_commands_leave_the_state_unchanged() {
    let mut s = cluster();
    s.apply(Command::CreateEndpoint(endpoint("e", "b", "/e")))
        .unwrap();
    let before = format!("{s:?}");
    let cases = [
        (
            Command::CreateEndpoint(endpoint("x", "missing", "/x")),
            "does not exist",
        ),
        (
            Command::CreateEndpoint(endpoint("e", "b", "/other")),
            "already exists",
        ),
        (
            Command::CreateEndpoint(endpoint("y", "b", "no-slash")),
            "invalid",
        ),
        (
            Command::CreateEndpoint(endpoint("z", "b", "/e")),
            "collides",
        ),
        (Command::CreateBackend(backend("b", 1)), "already exists"),
        (Command::CreateBackend(backend("c", 0)), "num_replicas"),
        (
            Command::DeleteBackend {
                name: "b".into(),
                force: false,
            },
            "still used",
        ),
        (
            Command::SetShadow {
                endpoint: "e".into(),
                backend: "nope".into(),
                proportion: 0.5,
            },
            "does not exist",
        ),
        (
            Command::SetShadow {
                endpoint: "e".into(),
                backend: "b".into(),
                proportion: 1.5,
            },
            "proportion",
        ),
        (
            Command::DeleteEndpoint {
                name: "nope".into(),
            },
            "does not exist",
        ),
        (
            Command::SetTraffic {
                endpoint: "e".into(),
                traffic: [("b".to_string(), 0.5)].into_iter().collect(),
            },
            "sum to",
        ),
    ];
    for (cmd, expect) in cases {
        let err = s
            .apply(cmd.clone())
            .expect_err(&format!("{cmd:?} must be refused"));
        assert!(err.to_string().contains(expect), "{cmd:?}: {err}");
        assert_eq!(format!("{s:?}"), before, "{cmd:?} changed the state");
    }
}

#[test]
fn endpoint_methods_default_to_get_and_are_normalised() {
    let mut s = cluster();
    s.apply(Command::CreateEndpoint(endpoint("e", "b", "/e")))
        .unwrap();
    assert_eq!(s.endpoint("e").unwrap().methods, vec!["GET"]);
    let mut e2 = endpoint("e2", "b", "/e2");
    e2.methods = vec!["post".into(), "GET".into(), "POST".into()];
    s.apply(Command::CreateEndpoint(e2)).unwrap();
    assert_eq!(s.endpoint("e2").unwrap().methods, vec!["POST", "GET"]);
}

#[test]
fn replica_reports_drive_the_backend_state() {
    let mut s = cluster();
    let id = s.replicas.keys().next().unwrap().clone();
    assert_eq!(s.backends["b"].state, BackendState::Deploying);
    s.apply(Command::ReportReplica(ReplicaReport {
        replica_id: id.clone(),
        state: ReplicaState::Failed.into(),
        error: "Traceback: boom".into(),
        ..Default::default()
    }))
    .unwrap();
    assert_eq!(s.backends["b"].state, BackendState::Failed);
    assert_eq!(s.backends["b"].error, "Traceback: boom");
    s.apply(Command::ReportReplica(ReplicaReport {
        replica_id: id,
        state: ReplicaState::Running.into(),
        ..Default::default()
    }))
    .unwrap();
    assert_eq!(s.backends["b"].state, BackendState::Running);
}

#[test]
fn a_config_update_gets_a_new_config_version_that_replicas_report() {
    let mut s = cluster();
    let id = s.replicas.keys().next().unwrap().clone();
    assert_eq!(s.backends["b"].config_version, 0);
    let mut config = s.backends["b"].config.clone().unwrap();
    config.user_config_json = r#"{"v": 2}"#.into();
    s.apply(Command::UpdateBackendConfig {
        name: "b".into(),
        config,
    })
    .unwrap();
    assert_eq!(s.backends["b"].config_version, 1);
    assert_eq!(
        s.backends["b"].version, 1,
        "a config change keeps the code version"
    );
    // The autoscaler's count is not a change a client waits for.
    s.backends
        .get_mut("b")
        .unwrap()
        .config
        .as_mut()
        .unwrap()
        .autoscaling = Some(serval_protos::control::AutoscalingConfig {
        min_replicas: 1,
        max_replicas: 2,
        ..Default::default()
    });
    s.apply(Command::Autoscale {
        name: "b".into(),
        num_replicas: 1,
    })
    .unwrap();
    assert_eq!(s.backends["b"].config_version, 1);
    s.apply(Command::ReportReplica(ReplicaReport {
        replica_id: id.clone(),
        state: ReplicaState::Running.into(),
        config_version: 1,
        ..Default::default()
    }))
    .unwrap();
    assert_eq!(s.replicas[&id].config_version, 1);
}

#[test]
fn a_dead_node_gives_its_replicas_back_and_a_restarted_agent_restarts_them() {
    let mut s = cluster();
    let id = s.replicas.keys().next().unwrap().clone();
    s.apply(Command::ReportReplica(ReplicaReport {
        replica_id: id.clone(),
        state: ReplicaState::Running.into(),
        tcp_addr: "127.0.0.1:1".into(),
        tls: true,
        ..Default::default()
    }))
    .unwrap();
    assert!(s.replicas[&id].tls, "the record carries the reported TLS");
    let mut again = node("n1", 2.0);
    again.pid = 2;
    s.apply(Command::RegisterNode(again)).unwrap();
    assert_eq!(s.replicas[&id].state, ReplicaState::Starting);
    assert!(s.replicas[&id].tcp_addr.is_empty());
    assert!(!s.replicas[&id].tls);
    s.apply(Command::MarkNodeDead {
        node_id: "n1".into(),
    })
    .unwrap();
    assert_eq!(s.replicas[&id].state, ReplicaState::Pending);
    assert!(s.replicas[&id].node_id.is_empty());
}

#[test]
fn gpu_replicas_get_their_own_gpus_and_fractions_share() {
    let mut s = ClusterState::default();
    let mut n = node("gpu", 8.0);
    n.num_gpus = 2.0;
    s.apply(Command::RegisterNode(n)).unwrap();
    let mut whole = backend("whole", 2);
    whole.config.as_mut().unwrap().num_gpus = 1.0;
    s.apply(Command::CreateBackend(whole)).unwrap();
    let mut ids: Vec<Vec<u32>> = s.replicas.values().map(|r| r.gpu_ids.clone()).collect();
    ids.sort();
    assert_eq!(ids, vec![vec![0], vec![1]]);
    // No GPU is left for a third whole-GPU replica, nor for a fraction.
    let mut half = backend("half", 1);
    half.config.as_mut().unwrap().num_gpus = 0.5;
    s.apply(Command::CreateBackend(half)).unwrap();
    let pending = s.replicas.values().find(|r| r.backend == "half").unwrap();
    assert_eq!(pending.state, ReplicaState::Pending);
    assert!(pending.error.contains("GPU"), "{}", pending.error);
    // Scale the whole-GPU backend down: the halves share the freed GPU.
    s.apply(Command::UpdateBackendConfig {
        name: "whole".into(),
        config: BackendConfig {
            num_replicas: 1,
            num_cpus: 1.0,
            num_gpus: 1.0,
            ..Default::default()
        },
    })
    .unwrap();
    s.apply(Command::UpdateBackendConfig {
        name: "half".into(),
        config: BackendConfig {
            num_replicas: 2,
            num_cpus: 1.0,
            num_gpus: 0.5,
            ..Default::default()
        },
    })
    .unwrap();
    let halves: Vec<&Replica> = s
        .replicas
        .values()
        .filter(|r| r.backend == "half")
        .collect();
    assert!(
        halves.iter().all(|r| r.state == ReplicaState::Starting),
        "{halves:?}"
    );
    assert_eq!(
        halves[0].gpu_ids, halves[1].gpu_ids,
        "two halves share one GPU"
    );
    let err = s
        .apply(Command::UpdateBackendConfig {
            name: "half".into(),
            config: BackendConfig {
                num_replicas: 1,
                num_gpus: 1.5,
                ..Default::default()
            },
        })
        .unwrap_err();
    assert!(err.to_string().contains("num_gpus"), "{err}");
}

#[test]
fn shadows_are_set_and_removed_and_force_delete_leaves_endpoints_consistent() {
    let mut s = cluster();
    s.apply(Command::CreateBackend(backend("c", 1))).unwrap();
    s.apply(Command::CreateBackend(backend("d", 1))).unwrap();
    s.apply(Command::CreateEndpoint(endpoint("e", "b", "/e")))
        .unwrap();
    s.apply(Command::SetTraffic {
        endpoint: "e".into(),
        traffic: [("b".to_string(), 0.5), ("c".to_string(), 0.5)]
            .into_iter()
            .collect(),
    })
    .unwrap();
    s.apply(Command::SetShadow {
        endpoint: "e".into(),
        backend: "d".into(),
        proportion: 0.25,
    })
    .unwrap();
    assert_eq!(s.endpoint("e").unwrap().shadow.get("d"), Some(&0.25));
    let err = s
        .apply(Command::DeleteBackend {
            name: "d".into(),
            force: false,
        })
        .unwrap_err();
    assert!(err.to_string().contains("still used"), "{err}");
    s.apply(Command::SetShadow {
        endpoint: "e".into(),
        backend: "d".into(),
        proportion: 0.0,
    })
    .unwrap();
    assert!(s.endpoint("e").unwrap().shadow.is_empty());
    s.apply(Command::DeleteBackend {
        name: "d".into(),
        force: false,
    })
    .unwrap();
    s.apply(Command::DeleteBackend {
        name: "c".into(),
        force: true,
    })
    .unwrap();
    let traffic = &s.endpoint("e").unwrap().traffic;
    assert_eq!(traffic.len(), 1);
    assert_eq!(
        traffic.get("b"),
        Some(&1.0),
        "the remaining weight is rescaled to 1"
    );
}

fn report(s: &mut ClusterState, id: &str, state: ReplicaState) {
    s.apply(Command::ReportReplica(ReplicaReport {
        replica_id: id.into(),
        state: state.into(),
        ..Default::default()
    }))
    .unwrap();
}

fn by_version(s: &ClusterState, backend: &str) -> (Vec<String>, Vec<String>) {
    let version = s.backends[backend].version;
    let (new, old): (Vec<&Replica>, Vec<&Replica>) = s
        .replicas
        .values()
        .filter(|r| r.backend == backend)
        .partition(|r| r.backend_version == version);
    (
        new.iter().map(|r| r.id.clone()).collect(),
        old.iter().map(|r| r.id.clone()).collect(),
    )
}

#[test]
fn new_code_rolls_one_replica_at_a_time_without_losing_capacity() {
    let mut s = ClusterState::default();
    s.apply(Command::RegisterNode(node("n1", 16.0))).unwrap();
    s.apply(Command::CreateBackend(backend("b", 3))).unwrap();
    let first: Vec<String> = s.replicas.keys().cloned().collect();
    for id in &first {
        report(&mut s, id, ReplicaState::Running);
    }
    s.apply(Command::UpdateBackendCode {
        name: "b".into(),
        code_digest: serval_protos::blob::digest(&[9]),
        blobs: vec![],
    })
    .unwrap();
    assert_eq!(s.backends["b"].version, 2);
    for step in 0..3 {
        let (new, old) = by_version(&s, "b");
        assert_eq!(new.len(), step + 1, "one new replica at a time");
        assert_eq!(
            old.len(),
            3 - step,
            "no old replica leaves before its successor runs"
        );
        let running = s
            .replicas
            .values()
            .filter(|r| r.state == ReplicaState::Running)
            .count();
        assert!(running >= 3, "capacity dropped to {running} at step {step}");
        let starting = new
            .iter()
            .find(|id| s.replicas[*id].state != ReplicaState::Running)
            .unwrap()
            .clone();
        report(&mut s, &starting, ReplicaState::Running);
    }
    let (new, old) = by_version(&s, "b");
    assert_eq!((new.len(), old.len()), (3, 0));
    assert!(first.iter().all(|id| !s.replicas.contains_key(id)));
}

/// Runs a rolling update of 4 replicas to the end, checking Kubernetes'
/// bounds at every step; returns the most replicas seen at once.
fn roll(max_surge: &str, max_unavailable: &str) -> (usize, usize) {
    let mut s = ClusterState::default();
    s.apply(Command::RegisterNode(node("n1", 64.0))).unwrap();
    let mut b = backend("b", 4);
    if let Some(c) = b.config.as_mut() {
        c.max_surge = max_surge.into();
        c.max_unavailable = max_unavailable.into();
    }
    s.apply(Command::CreateBackend(b)).unwrap();
    let ids: Vec<String> = s.replicas.keys().cloned().collect();
    for id in &ids {
        report(&mut s, id, ReplicaState::Running);
    }
    s.apply(Command::UpdateBackendCode {
        name: "b".into(),
        code_digest: serval_protos::blob::digest(&[9]),
        blobs: vec![],
    })
    .unwrap();
    let (mut most, mut fewest_running) = (0, usize::MAX);
    for _ in 0..20 {
        let (new, old) = by_version(&s, "b");
        most = most.max(new.len() + old.len());
        let running = s
            .replicas
            .values()
            .filter(|r| r.state == ReplicaState::Running)
            .count();
        fewest_running = fewest_running.min(running);
        if old.is_empty()
            && new
                .iter()
                .all(|id| s.replicas[id].state == ReplicaState::Running)
        {
            assert_eq!(new.len(), 4);
            return (most, fewest_running);
        }
        // Every starting replica comes up, then the state moves on.
        for id in new {
            if s.replicas[&id].state != ReplicaState::Running {
                report(&mut s, &id, ReplicaState::Running);
            }
        }
    }
    panic!("the update with surge {max_surge:?}, unavailable {max_unavailable:?} did not finish");
}

#[test]
fn rolling_updates_keep_to_max_surge_and_max_unavailable() {
    // Default: one extra replica, never below 4 running.
    assert_eq!(roll("", ""), (5, 4));
    // Cortex's default 25%/25% of 4: one extra, one may be down.
    let (most, fewest) = roll("25%", "25%");
    assert!(most <= 5 && fewest >= 3, "{most} {fewest}");
    // Surge 2, none down: up to 6 at once, 4 always running.
    assert_eq!(roll("2", "0"), (6, 4));
    // No surge, 50% down: never more than 4, at least 2 running.
    let (most, fewest) = roll("0", "50%");
    assert!(most <= 4 && fewest >= 2, "{most} {fewest}");
}

#[test]
fn malformed_rollout_bounds_are_refused_naming_the_field() {
    let mut s = cluster();
    let mut b = backend("c", 1);
    if let Some(c) = b.config.as_mut() {
        c.max_surge = "lots".into();
    }
    let err = s.apply(Command::CreateBackend(b)).unwrap_err().to_string();
    assert!(err.contains("max_surge"), "{err}");
}

#[test]
fn a_new_version_that_cannot_start_leaves_the_old_replicas_serving() {
    let mut s = cluster();
    let old_id = s.replicas.keys().next().unwrap().clone();
    report(&mut s, &old_id, ReplicaState::Running);
    s.apply(Command::UpdateBackendCode {
        name: "b".into(),
        code_digest: serval_protos::blob::digest(&[7]),
        blobs: vec![],
    })
    .unwrap();
    let (new, _) = by_version(&s, "b");
    report(&mut s, &new[0], ReplicaState::Failed);
    assert_eq!(s.replicas[&old_id].state, ReplicaState::Running);
    assert_eq!(s.backends["b"].state, BackendState::Running);
}

fn api(name: &str, fingerprint: &str) -> Api {
    Api {
        name: name.into(),
        kind: "RealtimeAPI".into(),
        spec_json: r#"{"predictor": {"type": "python"}}"#.into(),
        package_digest: "ab".repeat(32),
        fingerprint: fingerprint.into(),
        deployed_at: 1_700_000_000.5,
    }
}

#[test]
fn apis_are_created_replaced_and_deleted_by_name() {
    let mut s = cluster();
    s.apply(Command::PutApi(api("a", "v1"))).unwrap();
    s.apply(Command::PutApi(api("b", "v1"))).unwrap();
    s.apply(Command::PutApi(api("a", "v2"))).unwrap();
    assert_eq!(s.apis.len(), 2);
    assert_eq!(s.apis["a"], api("a", "v2"), "a put replaces the record");
    s.apply(Command::DeleteApi { name: "a".into() }).unwrap();
    assert_eq!(s.apis.keys().collect::<Vec<_>>(), ["b"]);

    let before = format!("{s:?}");
    let refused = [
        (Command::PutApi(api("", "v1")), "api name"),
        (Command::DeleteApi { name: "a".into() }, "does not exist"),
        // Blobs belong to the raft store, never to this state.
        (
            Command::PutBlob {
                digest: serval_protos::blob::digest(b"x"),
                data: b"x".to_vec(),
            },
            "raft store",
        ),
    ];
    for (cmd, expect) in refused {
        let err = s.apply(cmd.clone()).expect_err("must be refused");
        assert!(err.to_string().contains(expect), "{cmd:?}: {err}");
        assert_eq!(format!("{s:?}"), before, "{cmd:?} changed the state");
    }
}

#[test]
fn commands_over_the_caps_are_refused_without_building_anything() {
    use crate::limits;
    let mut s = cluster();
    let before = s.clone();
    let refused = |s: &mut ClusterState, cmd: Command, field: &str| match s.apply(cmd) {
        Err(StateError::InvalidConfig { field: f, reason }) => {
            assert!(f.contains(field), "{f}: {reason}");
            assert!(reason.contains("cap"), "the reason names the cap: {reason}");
        }
        other => panic!("expected a refusal naming {field}, got {other:?}"),
    };
    refused(
        &mut s,
        Command::CreateBackend(backend("huge", 300_000)),
        "num_replicas",
    );
    refused(
        &mut s,
        Command::UpdateBackendConfig {
            name: "b".into(),
            config: BackendConfig {
                num_replicas: limits::MAX_REPLICAS_PER_BACKEND + 1,
                ..Default::default()
            },
        },
        "num_replicas",
    );
    let mut gpus = node("gpu", 4.0);
    gpus.num_gpus = 1e13;
    refused(&mut s, Command::RegisterNode(gpus), "num_gpus");
    let mut nan = node("nan", f64::NAN);
    nan.num_gpus = 0.0;
    refused(&mut s, Command::RegisterNode(nan), "num_cpus");
    let mut long = backend("x", 1);
    long.name = "n".repeat(limits::MAX_NAME_BYTES + 1);
    refused(&mut s, Command::CreateBackend(long), "backend name");
    let mut ep = endpoint("e", "b", "/e");
    ep.methods = (0..100).map(|i| format!("M{i}")).collect();
    refused(&mut s, Command::CreateEndpoint(ep), "methods");
    assert_eq!(s.version, before.version);
    assert_eq!(s.replicas.len(), before.replicas.len());
    assert_eq!(s.nodes.len(), before.nodes.len());
    assert_eq!(s.backends.len(), before.backends.len());
}

#[test]
fn the_replicas_of_all_backends_together_are_capped() {
    use crate::limits;
    let mut s = ClusterState::default();
    let per = limits::MAX_REPLICAS_PER_BACKEND;
    let full = (limits::MAX_REPLICAS_TOTAL / u64::from(per)) as usize;
    for i in 0..full {
        let mut b = backend(&format!("b{i}"), per);
        // No node: the replicas stay pending, which is cheap to build.
        b.config.as_mut().unwrap().num_cpus = 0.5;
        s.apply(Command::CreateBackend(b)).unwrap();
    }
    assert_eq!(s.replicas.len() as u64, limits::MAX_REPLICAS_TOTAL);
    let err = s
        .apply(Command::CreateBackend(backend("one-more", 1)))
        .unwrap_err();
    assert!(err.to_string().contains("the cap is"), "{err}");
    assert_eq!(s.replicas.len() as u64, limits::MAX_REPLICAS_TOTAL);
}

#[test]
fn at_the_node_cap_a_new_node_replaces_a_dead_one() {
    use crate::limits;
    let mut s = ClusterState::default();
    for i in 0..limits::MAX_NODES {
        s.apply(Command::RegisterNode(node(&format!("n{i:04}"), 1.0)))
            .unwrap();
    }
    let err = s
        .apply(Command::RegisterNode(node("late", 1.0)))
        .unwrap_err();
    assert!(err.to_string().contains("nodes"), "{err}");
    s.apply(Command::MarkNodeDead {
        node_id: "n0007".into(),
    })
    .unwrap();
    s.apply(Command::RegisterNode(node("late", 1.0))).unwrap();
    assert_eq!(s.nodes.len(), limits::MAX_NODES);
    assert!(!s.nodes.contains_key("n0007") && s.nodes.contains_key("late"));
}

#[test]
fn replica_models_are_set_bounded_and_cleared_with_a_new_process() {
    let mut s = cluster();
    let id = s.replicas.keys().next().unwrap().clone();
    let running = |pid| {
        Command::ReportReplica(ReplicaReport {
            replica_id: id.clone(),
            state: ReplicaState::Running.into(),
            pid,
            ..Default::default()
        })
    };
    s.apply(running(10)).unwrap();
    let set = |ids: Vec<String>| Command::SetReplicaModels {
        replica_id: id.clone(),
        model_ids: ids,
    };
    s.apply(set(vec!["a".into(), "b".into()])).unwrap();
    assert_eq!(s.replicas[&id].model_ids, vec!["a", "b"]);
    // The same process reporting again (a config change) keeps them.
    s.apply(running(10)).unwrap();
    assert_eq!(s.replicas[&id].model_ids, vec!["a", "b"]);
    // A restarted process holds none.
    s.apply(running(11)).unwrap();
    assert!(s.replicas[&id].model_ids.is_empty());
    assert!(s
        .apply(Command::SetReplicaModels {
            replica_id: "nope".into(),
            model_ids: vec![],
        })
        .is_err());
    let too_many = (0..=crate::limits::MAX_REPLICA_MODELS)
        .map(|i| format!("m{i}"))
        .collect();
    assert!(crate::limits::check(&set(too_many)).is_err());
    let too_long = vec!["m".repeat(crate::limits::MAX_MODEL_ID_BYTES + 1)];
    assert!(crate::limits::check(&set(too_long)).is_err());
    assert!(crate::limits::check(&set(vec!["ok".into()])).is_ok());
}
