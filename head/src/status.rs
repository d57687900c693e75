//! `serve status`: one table per kind of thing the controller holds.

use anyhow::Context;
use serval_protos::control::{ClusterSnapshot, WatchRequest};
use serval_protos::states::ReplicaState;

use crate::ClusterArgs;

/// The controller address and token for `cluster`, from flags, the
/// environment or the head's data dir.
pub fn resolve(cluster: &ClusterArgs) -> anyhow::Result<(String, String)> {
    let data_dir = crate::cluster_file::absolute(&cluster.data_dir);
    let address = cluster
        .address
        .clone()
        .or_else(|| crate::cluster_file::read(&data_dir).map(|i| i.control_address))
        .unwrap_or_else(|| format!("127.0.0.1:{}", serval_protos::DEFAULT_CONTROL_PORT));
    Ok((address, cluster.token(&data_dir)?))
}

pub async fn fetch(cluster: &ClusterArgs) -> anyhow::Result<ClusterSnapshot> {
    let (address, token) = resolve(cluster)?;
    let mut client = serval_protos::client::connect(&address, &token)
        .await
        .with_context(|| {
            format!(
                "is a head running? (`serve start --head`, data dir {})",
                cluster.data_dir.display()
            )
        })?;
    let snapshot = client
        .get_snapshot(WatchRequest {
            include_code: false,
        })
        .await
        .map_err(|s| anyhow::anyhow!("controller at {address}: {}", s.message()))?;
    Ok(snapshot.into_inner())
}

pub fn run(cluster: ClusterArgs, json: bool) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let snapshot = runtime.block_on(fetch(&cluster))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&snapshot)?);
    } else {
        print!("{}", render(&snapshot));
    }
    Ok(())
}

fn table(title: &str, header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| -> String {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        format!("  {}\n", padded.join("  ").trim_end())
    };
    let mut out = format!("{title}\n");
    out += &line(header.iter().map(|h| h.to_string()).collect());
    if rows.is_empty() {
        out += "  (none)\n";
    }
    for row in rows {
        out += &line(row);
    }
    out
}

/// Last line of an error, so tracebacks do not break the table: an
/// exception's message, or the last line a replica wrote to stderr before it
/// died (long enough for Python's "Error while finding module specification
/// for 'serval.replica' (ModuleNotFoundError: ...)" with its path).
fn short(error: &str) -> String {
    let last = error.trim().lines().last().unwrap_or("").trim();
    if last.chars().count() > 240 {
        format!("{}...", last.chars().take(240).collect::<String>())
    } else {
        last.to_string()
    }
}

pub fn render(s: &ClusterSnapshot) -> String {
    let mut out = String::new();
    out += &table(
        "HEADS",
        &["RAFT_ID", "ADDRESS", "ROLE", "TERM", "LAST_LOG"],
        s.heads
            .iter()
            .map(|h| {
                vec![
                    h.raft_id.to_string(),
                    h.address.clone(),
                    h.role.clone(),
                    h.term.to_string(),
                    h.last_applied.to_string(),
                ]
            })
            .collect(),
    );
    out += &table(
        "NODES",
        &["ID", "HOST", "CPUS", "GPUS", "STATE", "HTTP"],
        s.nodes
            .iter()
            .map(|n| {
                vec![
                    format!("{}{}", n.id, if n.is_head { " (head)" } else { "" }),
                    n.hostname.clone(),
                    n.num_cpus.to_string(),
                    n.num_gpus.to_string(),
                    if n.alive {
                        "alive".into()
                    } else {
                        "dead".into()
                    },
                    if n.http_address.is_empty() {
                        "-".into()
                    } else {
                        n.http_address.clone()
                    },
                ]
            })
            .collect(),
    );
    out += &table(
        "APPLICATIONS",
        &["NAME", "STATUS", "ROUTE_PREFIX", "DEPLOYMENTS", "MESSAGE"],
        crate::applications::statuses(s)
            .into_iter()
            .map(|a| {
                let deployments: Vec<String> = a
                    .deployments
                    .iter()
                    .map(|(name, d)| {
                        let running = d.replica_states.get("RUNNING").copied().unwrap_or(0);
                        let total: u32 = d.replica_states.values().sum();
                        format!("{name}={} {running}/{total}", d.status)
                    })
                    .collect();
                vec![
                    a.name,
                    a.status.into(),
                    a.route_prefix.unwrap_or_else(|| "-".into()),
                    deployments.join(", "),
                    short(&a.message),
                ]
            })
            .collect(),
    );
    out += &table(
        "ENDPOINTS",
        &["NAME", "ROUTE", "METHODS", "TRAFFIC"],
        s.endpoints
            .iter()
            .map(|e| {
                let mut traffic: Vec<String> =
                    e.traffic.iter().map(|(b, w)| format!("{b}={w}")).collect();
                traffic.sort();
                vec![
                    e.name.clone(),
                    if e.route.is_empty() {
                        "(handle only)".into()
                    } else if e.route_is_prefix {
                        format!("{} (prefix)", e.route)
                    } else {
                        e.route.clone()
                    },
                    if e.methods.is_empty() {
                        "any".into()
                    } else {
                        e.methods.join(",")
                    },
                    traffic.join(","),
                ]
            })
            .collect(),
    );
    out += &table(
        "BACKENDS",
        &["NAME", "STATE", "REPLICAS", "ERROR"],
        s.backends
            .iter()
            .map(|b| {
                let total = s.replicas.iter().filter(|r| r.backend == b.name).count();
                let running = s
                    .replicas
                    .iter()
                    .filter(|r| r.backend == b.name && r.state == ReplicaState::Running)
                    .count();
                vec![
                    b.name.clone(),
                    b.state.clone(),
                    format!("{running}/{total}"),
                    short(&b.error),
                ]
            })
            .collect(),
    );
    out += &table(
        "REPLICAS",
        &["ID", "BACKEND", "NODE", "STATE", "PID", "RESTARTS", "ERROR"],
        s.replicas
            .iter()
            .map(|r| {
                vec![
                    r.id.clone(),
                    r.backend.clone(),
                    if r.node_id.is_empty() {
                        "-".into()
                    } else {
                        r.node_id.clone()
                    },
                    r.state.clone(),
                    if r.pid == 0 {
                        "-".into()
                    } else {
                        r.pid.to_string()
                    },
                    r.restarts.to_string(),
                    short(&r.error),
                ]
            })
            .collect(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serval_protos::control::{Backend, Endpoint, Replica};

    #[test]
    fn failed_backends_show_the_last_line_of_their_traceback() {
        let snapshot = ClusterSnapshot {
            backends: vec![Backend {
                name: "broken".into(),
                state: "failed".into(),
                error:
                    "Traceback (most recent call last):\n  File \"x.py\"\nRuntimeError: no weights"
                        .into(),
                ..Default::default()
            }],
            endpoints: vec![Endpoint {
                name: "h".into(),
                methods: vec!["GET".into()],
                ..Default::default()
            }],
            replicas: vec![Replica {
                id: "broken#0".into(),
                backend: "broken".into(),
                state: "failed".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = render(&snapshot);
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with("broken "))
            .unwrap();
        assert!(
            line.contains("failed")
                && line.contains("0/1")
                && line.contains("RuntimeError: no weights"),
            "{text}"
        );
        assert!(text.contains("(handle only)"), "{text}");
        assert!(
            text.contains("HEADS\n  RAFT_ID  ADDRESS  ROLE  TERM  LAST_LOG\n  (none)"),
            "{text}"
        );
    }
}
