//! The dashboard's JSON: the proxy's last snapshot, shaped as the pages
//! show it, with the router's live numbers and the endpoints' history.

use serde_json::{json, Value};
use serval_protos::control::{Api, ClusterSnapshot, Replica};
use serval_protos::states::{BackendState, ReplicaState};

use crate::proxy::Proxy;

/// The whole state; `with_series` adds each endpoint's last 15 minutes
/// (a stream's first event), otherwise each carries its latest sample.
pub(crate) fn build(proxy: &Proxy, with_series: bool) -> Value {
    let s = proxy.snapshot();
    let stats = proxy.router().backend_stats();
    let latest = proxy.dashboard.history.latest();
    let mut out = json!({
        "version": s.version,
        "shutting_down": s.shutting_down,
        "heads": s.heads.iter().map(|h| json!({
            "raft_id": h.raft_id, "address": h.address, "role": h.role,
            "term": h.term, "last_log": h.last_applied,
        })).collect::<Vec<_>>(),
        "nodes": s.nodes.iter().map(|n| json!({
            "id": n.id, "hostname": n.hostname, "cpus": n.num_cpus, "gpus": n.num_gpus,
            "state": if n.alive { "alive" } else { "dead" }, "is_head": n.is_head,
            "http": n.http_address,
        })).collect::<Vec<_>>(),
        "endpoints": s.endpoints.iter().map(|e| json!({
            "name": e.name, "route": e.route, "methods": e.methods,
            "prefix": e.route_is_prefix, "traffic": e.traffic, "shadow": e.shadow,
            "latest": latest.get(&e.name),
        })).collect::<Vec<_>>(),
        "backends": s.backends.iter().map(|b| {
            let config = b.config.clone().unwrap_or_default();
            let stats = stats.get(&b.name);
            let replicas: Vec<Value> = s.replicas.iter().filter(|r| r.backend == b.name).map(|r| json!({
                "id": r.id, "version": r.backend_version, "node": r.node_id,
                "state": r.state, "shown": shown_state(r), "restarts": r.restarts,
                "error": last_line(&r.error),
                "in_flight": stats.and_then(|st| st.in_flight.get(&r.id)).copied().unwrap_or(0),
            })).collect();
            json!({
                "name": b.name, "version": b.version, "state": b.state,
                "error": last_line(&b.error),
                "target": config.num_replicas,
                "autoscaling": config.autoscaling.map(|a| json!({"min": a.min_replicas, "max": a.max_replicas})),
                "running": s.replicas.iter().filter(|r| r.backend == b.name && r.state == ReplicaState::Running).count(),
                "queued": stats.map_or(0, |st| st.queued),
                "last_batch_size": stats.map_or(0, |st| st.last_batch_size),
                "max_batch_size": config.max_batch_size,
                "replicas": replicas,
            })
        }).collect::<Vec<_>>(),
        "apis": s.apis.iter().filter(|a| a.kind != crate::applications::KIND)
            .map(|a| api_status(a, &s)).collect::<Vec<_>>(),
        "applications": crate::applications::statuses(&s),
        "jobs": proxy.dashboard.jobs().iter().rev().map(|j| json!({
            "id": j.id, "api": j.spec.as_ref().map_or("", |s| s.api.as_str()),
            "status": j.status, "total": j.total_batches, "enqueued": j.enqueued,
            "succeeded": j.succeeded, "failed": j.failed, "in_queue": j.batches_in_queue,
            "leased": j.leased, "created_ms": j.created_ms, "end_ms": j.end_ms,
            "error": last_line(&j.error),
        })).collect::<Vec<_>>(),
    });
    if with_series {
        out["series"] = json!(proxy.dashboard.history.all());
    }
    out
}

/// A replica's state as the table shows it: one that failed and is being
/// started again by its supervisor (it has an error) is "restarting".
fn shown_state(r: &Replica) -> &str {
    match r.state.parse() {
        Ok(ReplicaState::Failed | ReplicaState::Starting) if !r.error.is_empty() => "restarting",
        _ => &r.state,
    }
}

/// The last line of an error (tracebacks end with the exception).
fn last_line(error: &str) -> &str {
    error.trim().lines().last().unwrap_or("").trim()
}

/// A Cortex API's status as `serve get` shows it (the rules of
/// `serval.cortex.deploy.api_status`).
fn api_status(api: &Api, s: &ClusterSnapshot) -> Value {
    if api.kind == "TrafficSplitter" {
        return json!({"name": api.name, "kind": api.kind, "status": "live"});
    }
    let backend = s.backends.iter().find(|b| b.name == api.name);
    let replicas: Vec<&Replica> = s
        .replicas
        .iter()
        .filter(|r| r.backend == api.name)
        .collect();
    let version = backend.map_or(0, |b| b.version);
    let current = |r: &&&Replica| r.backend_version == version;
    let running_now = replicas
        .iter()
        .filter(current)
        .filter(|r| r.state == ReplicaState::Running)
        .count();
    let unplaced = replicas
        .iter()
        .any(|r| r.state == ReplicaState::Pending && r.node_id.is_empty());
    let stale = replicas.iter().any(|r| r.backend_version != version);
    let status = match backend {
        None => "error",
        Some(_) if unplaced && running_now == 0 => "compute unavailable",
        Some(b)
            if running_now == 0
                && (b.state == BackendState::Failed
                    || replicas.iter().filter(current).any(|r| r.restarts > 0)) =>
        {
            "error"
        }
        Some(_) if stale || running_now < replicas.iter().filter(current).count() => "updating",
        Some(_) if running_now > 0 => "live",
        Some(_) => "updating",
    };
    let last_error = backend
        .map(|b| b.error.as_str())
        .filter(|e| !e.is_empty())
        .or_else(|| {
            replicas
                .iter()
                .rev()
                .find(|r| r.state == ReplicaState::Failed && !r.error.is_empty())
                .map(|r| r.error.as_str())
        })
        .map(last_line);
    json!({
        "name": api.name, "kind": api.kind, "status": status,
        "running": running_now,
        "requested": backend.and_then(|b| b.config.as_ref()).map(|c| c.num_replicas),
        "last_error": last_error,
        "deployed_at": api.deployed_at,
    })
}
