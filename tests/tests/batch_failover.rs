//! A batch job (issue 9) run by real Python workers of a BatchAPI deployed
//! with `serve deploy`, on two nodes of a three-head cluster: the leader
//! head is SIGKILLed while the job runs. The gateway and the workers (on
//! the nodes) fail over to the surviving heads, the job ends "status_succeeded"
//! with every batch counted once, `on_job_complete` runs once, and the
//! workers are removed.

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use serval_tests::*;

const HANDLER: &str = r#"
import os
import time

class Handler:
    def __init__(self, config, job_spec):
        self.out = config["out"]

    def handle_batch(self, payload, batch_id):
        time.sleep(0.05)
        # One file per run of a batch: a batch run twice leaves two.
        open(os.path.join(self.out, f"{batch_id}.{os.getpid()}.{time.monotonic_ns()}"), "w").close()

    def on_job_complete(self):
        open(os.path.join(self.out, f"complete.{os.getpid()}"), "w").close()
"#;

const CONFIG: &str =
    "- name: counted\n  kind: BatchAPI\n  handler: {path: handler.py}\n  compute: {cpu: 0.5}\n";
const BATCHES: usize = 120;

fn job_status(port: u16, job_id: &str) -> Option<serde_json::Value> {
    let (code, body) = http_get(port, &format!("/counted?jobID={job_id}")).ok()?;
    let answer: serde_json::Value = (code == 200).then(|| serde_json::from_str(&body).ok())??;
    // Cortex 0.35's shape: the status object under `job_status`.
    Some(answer["job_status"].clone())
}

fn worker_backends(head: &ServeProcess) -> Option<Vec<String>> {
    let s = head.status_json();
    Some(
        s["backends"]
            .as_array()?
            .iter()
            .filter_map(|b| b["name"].as_str())
            .filter(|n| n.starts_with("counted--job-"))
            .map(String::from)
            .collect(),
    )
}

/// The node's log, then each of its replicas' logs.
fn replica_logs(node: &ServeProcess) -> String {
    let mut text = node.log();
    if let Ok(dirs) = std::fs::read_dir(node.data_dir.join("replicas")) {
        for dir in dirs.flatten() {
            let log = std::fs::read_to_string(dir.path().join("replica.log")).unwrap_or_default();
            text += &format!("\n== {}\n{log}", dir.file_name().to_string_lossy());
        }
    }
    text
}

#[test]
fn a_python_batch_job_finishes_after_the_leader_head_is_killed() {
    let tmp = tempfile::Builder::new()
        .prefix("sv-")
        .tempdir_in("/tmp")
        .unwrap();
    let (mut heads, leader_ix) = three_heads_without_replicas(tmp.path());
    let token = heads[0].token();
    // The replicas run on two nodes told only the leader's address: they
    // learn the other heads from the cluster, and so do their replicas.
    let leader_addr = heads[leader_ix].control_address();
    let nodes: Vec<ServeProcess> = ["n1", "n2"]
        .iter()
        .map(|name| {
            let mut node = ServeProcess::start(
                &tmp.path().join(name),
                free_port(),
                free_port(),
                &[
                    "--address",
                    &leader_addr,
                    "--token",
                    &token,
                    "--num-cpus",
                    "2",
                ],
            );
            node.wait_log("joined the head");
            node
        })
        .collect();

    let project = tmp.path().join("project");
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&project).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(project.join("handler.py"), HANDLER).unwrap();
    std::fs::write(project.join("serve.yaml"), CONFIG).unwrap();
    let follower = &heads[(leader_ix + 1) % 3];
    let deploy = Command::new(venv_python())
        .args(["-m", "serval.cli", "--address"])
        .arg(follower.control_address())
        .args(["--token", &token, "deploy"])
        .arg(&project)
        .output()
        .unwrap();
    assert!(
        deploy.status.success(),
        "deploy failed: {}{}",
        String::from_utf8_lossy(&deploy.stdout),
        String::from_utf8_lossy(&deploy.stderr)
    );

    let http = follower.http_port;
    let items: Vec<usize> = (0..BATCHES).collect();
    let job = serde_json::json!({
        "workers": 2,
        "config": {"out": out},
        "item_list": {"items": items, "batch_size": 1},
    });
    let (code, body) = http_request(http, "POST", "/counted", &job.to_string()).unwrap();
    assert_eq!(code, 200, "{body}");
    let job_id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string();

    // Some batches done, then the leader head dies.
    let before = wait_for("the first batches", Duration::from_secs(180), || {
        job_status(http, &job_id).filter(|s| s["batch_metrics"]["succeeded"].as_u64() >= Some(10))
    });
    drop(heads.remove(leader_ix));
    assert_eq!(before["status"], "status_running", "{before:#}");
    let done_before = before["batch_metrics"]["succeeded"].as_u64().unwrap_or(0);
    assert!(done_before < BATCHES as u64 / 2, "{before:#}");

    let survivor = heads
        .iter()
        .find(|h| h.http_port == http)
        .expect("the follower survives");
    // On a timeout the panic shows the job and the nodes' logs.
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    let ended = loop {
        let status = job_status(http, &job_id);
        if let Some(s) = status
            .as_ref()
            .filter(|s| s["status"] != "status_running" && s["status"] != "status_enqueuing")
        {
            break s.clone();
        }
        if std::time::Instant::now() > deadline {
            let logs: Vec<String> = nodes.iter().map(replica_logs).collect();
            panic!(
                "the job never ended: {status:#?}\nnode logs:\n{}",
                logs.join("\n----\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(ended["status"], "status_succeeded", "{ended:#}");
    assert_eq!(
        ended["batch_metrics"]["succeeded"].as_u64(),
        Some(BATCHES as u64),
        "each batch counted once: {ended:#}"
    );
    assert_eq!(ended["batch_metrics"]["failed"].as_u64(), Some(0));

    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let completions = names.iter().filter(|n| n.starts_with("complete.")).count();
    assert_eq!(completions, 1, "on_job_complete runs once: {names:?}");
    let ran: HashSet<&str> = names
        .iter()
        .filter(|n| !n.starts_with("complete."))
        .filter_map(|n| n.split('.').next())
        .collect();
    let expected: HashSet<String> = (0..BATCHES).map(|i| format!("{job_id}-{i}")).collect();
    assert_eq!(
        ran,
        expected.iter().map(String::as_str).collect(),
        "every batch ran"
    );
    eprintln!(
        "FIGURES: leader killed after {done_before} of {BATCHES} batches; {} batch runs in all (at least once)",
        names.len() - 1
    );
    wait_for(
        "the job's workers to be removed",
        Duration::from_secs(60),
        || worker_backends(survivor).filter(|b| b.is_empty()),
    );
    drop(nodes);
}
