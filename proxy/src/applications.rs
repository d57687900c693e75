//! Ray Serve 2.x applications, as `serve status` and `serve.status()`
//! report them.
//!
//! An application is stored as what the 1.x API builds, plus a record: each
//! deployment `D` of application `A` is backend `A#D` with a handle-only
//! endpoint of the same name, the ingress's endpoint holds the route prefix,
//! and an `Api` record of kind [`KIND`] (written by the SDK's
//! `serval.application`) names the deployments and the deploy's phase. The
//! statuses are computed here from the record, the backends and their
//! replicas, in Ray's words (`RUNNING`, `DEPLOYING`, `HEALTHY`, ...), so
//! the CLI and the SDK report the same thing.

use std::collections::BTreeMap;

use serval_protos::control::{Api, Backend, ClusterSnapshot, Replica};
use serval_protos::states::{BackendState, ReplicaState};

/// The `Api.kind` of an application's record.
pub const KIND: &str = "Application";

/// What the SDK stores in the record's `spec_json` (the fields read here).
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct Spec {
    route_prefix: Option<String>,
    ingress: String,
    deployments: Vec<String>,
    /// "deploying", "running" or "deploy_failed": where the last
    /// `serve.run`/`serve deploy` of the application got to.
    phase: String,
    /// Why the last deploy failed.
    message: String,
}

#[derive(serde::Serialize, Debug, Clone, PartialEq)]
pub struct DeploymentStatus {
    /// HEALTHY, UPDATING, UPSCALING, DOWNSCALING, UNHEALTHY or DEPLOY_FAILED.
    pub status: &'static str,
    /// Ray's replica states (STARTING, RUNNING, RECOVERING, STOPPING) -> count.
    pub replica_states: BTreeMap<&'static str, u32>,
    pub message: String,
}

#[derive(serde::Serialize, Debug, Clone, PartialEq)]
pub struct ApplicationStatus {
    pub name: String,
    /// RUNNING, DEPLOYING, DEPLOY_FAILED or UNHEALTHY.
    pub status: &'static str,
    pub message: String,
    pub last_deployed_time_s: f64,
    pub route_prefix: Option<String>,
    pub ingress: String,
    /// In the order the application deploys them (dependencies first).
    pub deployments: Vec<(String, DeploymentStatus)>,
}

/// The backend of deployment `deployment` of application `app`.
pub fn backend_name(app: &str, deployment: &str) -> String {
    format!("{app}#{deployment}")
}

/// Every application's status, by name.
pub fn statuses(s: &ClusterSnapshot) -> Vec<ApplicationStatus> {
    let mut apps: Vec<ApplicationStatus> = s
        .apis
        .iter()
        .filter(|a| a.kind == KIND)
        .map(|a| application(s, a))
        .collect();
    apps.sort_by(|a, b| a.name.cmp(&b.name));
    apps
}

fn application(s: &ClusterSnapshot, record: &Api) -> ApplicationStatus {
    let spec: Spec = serde_json::from_str(&record.spec_json).unwrap_or_default();
    let running_phase = spec.phase == "running";
    let deployments: Vec<(String, DeploymentStatus)> = spec
        .deployments
        .iter()
        .map(|d| {
            let name = backend_name(&record.name, d);
            let backend = s.backends.iter().find(|b| b.name == name);
            let replicas: Vec<&Replica> = s.replicas.iter().filter(|r| r.backend == name).collect();
            (d.clone(), deployment(backend, &replicas, running_phase))
        })
        .collect();
    let with = |status: &str| deployments.iter().find(|(_, d)| d.status == status);
    let (status, message) = if spec.phase == "deploy_failed" {
        ("DEPLOY_FAILED", spec.message.clone())
    } else if let Some((name, d)) = with("DEPLOY_FAILED") {
        (
            "DEPLOY_FAILED",
            format!("deployment '{name}' failed to start: {}", d.message),
        )
    } else if !running_phase {
        ("DEPLOYING", String::new())
    } else if let Some((name, d)) = with("UNHEALTHY") {
        (
            "UNHEALTHY",
            format!("deployment '{name}' is unhealthy: {}", d.message),
        )
    } else {
        ("RUNNING", String::new())
    };
    ApplicationStatus {
        name: record.name.clone(),
        status,
        message,
        last_deployed_time_s: record.deployed_at,
        route_prefix: spec.route_prefix,
        ingress: spec.ingress,
        deployments,
    }
}

fn replica_state(state: &str) -> &'static str {
    match state.parse() {
        Ok(ReplicaState::Running) => "RUNNING",
        // Waiting for its supervisor to start it again.
        Ok(ReplicaState::Failed) => "RECOVERING",
        Ok(ReplicaState::Stopped) => "STOPPING",
        _ => "STARTING",
    }
}

/// Last line of an error (a traceback's exception), bounded.
fn last_line(error: &str) -> String {
    let line = error.trim().lines().last().unwrap_or("").trim();
    line.chars().take(300).collect()
}

/// A deployment's status; `running_phase`: its application finished
/// deploying, so a failure now is UNHEALTHY rather than DEPLOY_FAILED.
fn deployment(
    backend: Option<&Backend>,
    replicas: &[&Replica],
    running_phase: bool,
) -> DeploymentStatus {
    let mut replica_states = BTreeMap::new();
    for r in replicas {
        *replica_states.entry(replica_state(&r.state)).or_insert(0) += 1;
    }
    let status = |status, message: String| DeploymentStatus {
        status,
        replica_states: replica_states.clone(),
        message,
    };
    let Some(b) = backend else {
        return status("UPDATING", "its backend is not created yet".into());
    };
    let config = b.config.clone().unwrap_or_default();
    let target = config.num_replicas as usize;
    let current = |r: &&Replica| r.backend_version == b.version;
    let running = replicas
        .iter()
        .filter(|r| current(r) && r.state == ReplicaState::Running)
        .count();
    let failed: Vec<&&Replica> = replicas
        .iter()
        .filter(|r| r.state == ReplicaState::Failed)
        .collect();
    if b.state == BackendState::Failed {
        let failure = if running_phase {
            "UNHEALTHY"
        } else {
            "DEPLOY_FAILED"
        };
        return status(failure, last_line(&b.error));
    }
    if let Some(r) = failed.first() {
        let message = format!(
            "{} replica(s) failed: {}",
            failed.len(),
            last_line(&r.error)
        );
        return status(
            if running_phase {
                "UNHEALTHY"
            } else {
                "UPDATING"
            },
            message,
        );
    }
    let all_current = replicas.iter().all(current);
    if !all_current {
        return status("UPDATING", "replicas are moving to a new version".into());
    }
    let scaling = |message: &str| {
        if config.autoscaling.is_some() {
            if running < target {
                status("UPSCALING", message.into())
            } else {
                status("DOWNSCALING", message.into())
            }
        } else {
            status("UPDATING", message.into())
        }
    };
    if running < target {
        return scaling(&format!("{running} of {target} replicas are running"));
    }
    if replicas.len() > target {
        return scaling(&format!("{} replicas, {target} wanted", replicas.len()));
    }
    status("HEALTHY", String::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serval_protos::control::BackendConfig;

    fn record(phase: &str) -> Api {
        Api {
            name: "shop".into(),
            kind: KIND.into(),
            spec_json: serde_json::json!({
                "route_prefix": "/shop", "ingress": "Front",
                "deployments": ["Model", "Front"], "phase": phase,
            })
            .to_string(),
            deployed_at: 12.5,
            ..Default::default()
        }
    }

    fn backend(name: &str, state: &str, version: u64, replicas: u32) -> Backend {
        Backend {
            name: name.into(),
            state: state.into(),
            version,
            error: if state == "failed" {
                "Traceback ...\nRuntimeError: no weights".into()
            } else {
                String::new()
            },
            config: Some(BackendConfig {
                num_replicas: replicas,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn replica(backend: &str, seq: u32, version: u64, state: &str) -> Replica {
        Replica {
            id: format!("{backend}#{seq}"),
            backend: backend.into(),
            backend_version: version,
            state: state.into(),
            error: if state == "failed" {
                "Traceback ...\nValueError: bad".into()
            } else {
                String::new()
            },
            ..Default::default()
        }
    }

    fn snapshot(phase: &str, backends: Vec<Backend>, replicas: Vec<Replica>) -> ClusterSnapshot {
        ClusterSnapshot {
            apis: vec![
                record(phase),
                Api {
                    name: "cortex-api".into(),
                    kind: "RealtimeAPI".into(),
                    ..Default::default()
                },
            ],
            backends,
            replicas,
            ..Default::default()
        }
    }

    fn statuses_of(s: &ClusterSnapshot) -> (&'static str, Vec<(String, &'static str)>, String) {
        let apps = statuses(s);
        assert_eq!(apps.len(), 1, "only applications are listed");
        let app = &apps[0];
        (
            app.status,
            app.deployments
                .iter()
                .map(|(n, d)| (n.clone(), d.status))
                .collect(),
            app.message.clone(),
        )
    }

    #[test]
    fn healthy_deployments_make_a_running_application() {
        let s = snapshot(
            "running",
            vec![
                backend("shop#Model", "running", 1, 2),
                backend("shop#Front", "running", 1, 1),
            ],
            vec![
                replica("shop#Model", 0, 1, "running"),
                replica("shop#Model", 1, 1, "running"),
                replica("shop#Front", 2, 1, "running"),
            ],
        );
        let (status, deployments, _) = statuses_of(&s);
        assert_eq!(status, "RUNNING");
        assert_eq!(
            deployments,
            vec![("Model".into(), "HEALTHY"), ("Front".into(), "HEALTHY")]
        );
        let app = &statuses(&s)[0];
        assert_eq!(app.route_prefix.as_deref(), Some("/shop"));
        assert_eq!(app.deployments[0].1.replica_states.get("RUNNING"), Some(&2));
        assert_eq!(app.last_deployed_time_s, 12.5);
    }

    #[test]
    fn deploying_updating_failed_and_unhealthy_are_told_apart() {
        // Still deploying: one deployment not created, one starting.
        let s = snapshot(
            "deploying",
            vec![backend("shop#Model", "deploying", 1, 1)],
            vec![replica("shop#Model", 0, 1, "starting")],
        );
        let (status, deployments, _) = statuses_of(&s);
        assert_eq!(status, "DEPLOYING");
        assert_eq!(
            deployments,
            vec![("Model".into(), "UPDATING"), ("Front".into(), "UPDATING")]
        );

        // A deployment whose replicas fail while deploying.
        let s = snapshot(
            "deploying",
            vec![backend("shop#Model", "failed", 1, 1)],
            vec![replica("shop#Model", 0, 1, "failed")],
        );
        let (status, deployments, message) = statuses_of(&s);
        assert_eq!(status, "DEPLOY_FAILED");
        assert_eq!(deployments[0].1, "DEPLOY_FAILED");
        assert!(message.contains("no weights"), "{message}");

        // The same after the application ran: unhealthy.
        let s = snapshot(
            "running",
            vec![
                backend("shop#Model", "running", 1, 2),
                backend("shop#Front", "running", 1, 1),
            ],
            vec![
                replica("shop#Model", 0, 1, "running"),
                replica("shop#Model", 1, 1, "failed"),
                replica("shop#Front", 2, 1, "running"),
            ],
        );
        let (status, deployments, message) = statuses_of(&s);
        assert_eq!(status, "UNHEALTHY");
        assert_eq!(deployments[0].1, "UNHEALTHY");
        assert!(message.contains("ValueError: bad"), "{message}");

        // A rolling update in a running application.
        let s = snapshot(
            "running",
            vec![
                backend("shop#Model", "running", 2, 1),
                backend("shop#Front", "running", 1, 1),
            ],
            vec![
                replica("shop#Model", 0, 1, "running"),
                replica("shop#Model", 1, 2, "starting"),
                replica("shop#Front", 2, 1, "running"),
            ],
        );
        let (status, deployments, _) = statuses_of(&s);
        assert_eq!(status, "RUNNING");
        assert_eq!(deployments[0].1, "UPDATING");

        // The deploy itself failed (the SDK recorded why).
        let mut s = snapshot("deploy_failed", vec![], vec![]);
        s.apis[0].spec_json = serde_json::json!({
            "ingress": "Front", "deployments": ["Front"], "phase": "deploy_failed",
            "message": "boom",
        })
        .to_string();
        let (status, _, message) = statuses_of(&s);
        assert_eq!((status, message.as_str()), ("DEPLOY_FAILED", "boom"));
    }
}
