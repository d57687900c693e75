//! A batch job (issue 9) run by real Python workers of a BatchAPI deployed
//! with `serve deploy`, on two nodes of a three-head cluster: the leader
//! head is SIGKILLed while the job runs. The gateway and the workers (on
//! the nodes) fail over to the surviving heads, the job ends "status_succeeded"
//! with every batch counted once, `on_job_complete` runs once, and the
//! workers are removed. And the queue itself, driven over its RPCs by
//! worker threads while leaders are killed: every batch is counted once
//! or dead-lettered, one worker runs the completion, and a deserted lease
//! comes back by the leader's clock.

use std::collections::{BTreeMap, BTreeSet, HashSet};
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

/// A control call retried while it fails in a way that does not say
/// whether it took effect (no head answers, a head died under it, a
/// timeout); an answer or a refusal ends it.
async fn retrying<T, F, Fut>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = match tokio::time::timeout(Duration::from_secs(5), call()).await {
            Ok(Ok(r)) => return Ok(r.into_inner()),
            Ok(Err(s)) => s,
            Err(_) => tonic::Status::deadline_exceeded("no answer in 5 s"),
        };
        let unknown = matches!(
            status.code(),
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unknown
                | tonic::Code::Internal
                | tonic::Code::Cancelled
        );
        if !unknown || std::time::Instant::now() > deadline {
            return Err(status);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What one worker thread did: the batches it ran (index, receipt) and
/// whether it ran the job's completion.
#[derive(Default)]
struct WorkerLog {
    ran: Vec<(u64, u32)>,
    completions: usize,
}

/// A worker as `serval.cortex.batch.BatchWorker` is one: lease, run, ack,
/// complete when told; batches whose index is in `poison` fail every time.
fn queue_worker(
    addrs: String,
    token: String,
    job: String,
    worker: String,
    poison: BTreeSet<u64>,
    acked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> WorkerLog {
    use serval_protos::control::*;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let c = {
        let _in_runtime = rt.enter();
        serval_protos::client::connect_lazy(&addrs, &token).unwrap()
    };
    let mut log = WorkerLog::default();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    rt.block_on(async {
        loop {
            assert!(
                std::time::Instant::now() < deadline,
                "{worker}: the job did not end in 90 s"
            );
            let request = LeaseRequest {
                job_id: job.clone(),
                worker_id: worker.clone(),
                max: 5,
                visibility_s: 2.0,
            };
            let reply = retrying(|| {
                let (mut c, r) = (c.clone(), request.clone());
                async move { c.lease_batches(r).await }
            })
            .await
            .unwrap_or_else(|e| panic!("{worker}: lease: {e}"));
            if reply.run_on_complete {
                log.completions += 1;
                let request = CompleteJobRequest {
                    job_id: job.clone(),
                    worker_id: worker.clone(),
                    error: String::new(),
                };
                let answer = retrying(|| {
                    let (mut c, r) = (c.clone(), request.clone());
                    async move { c.complete_job(r).await }
                })
                .await;
                // A retried completion that had gone through is refused.
                if let Err(e) = answer {
                    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{worker}: {e}");
                }
                return;
            }
            if reply.done {
                return;
            }
            if reply.batches.is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            // The batches' work.
            tokio::time::sleep(Duration::from_millis(10) * reply.batches.len() as u32).await;
            let results: Vec<BatchResult> = reply
                .batches
                .iter()
                .map(|b| {
                    log.ran.push((b.index, b.receive_count));
                    let ok = !poison.contains(&b.index);
                    BatchResult {
                        index: b.index,
                        ok,
                        seconds: 0.001,
                        error: if ok { String::new() } else { "poison".into() },
                    }
                })
                .collect();
            let request = AckRequest {
                job_id: job.clone(),
                worker_id: worker.clone(),
                results,
            };
            retrying(|| {
                let (mut c, r) = (c.clone(), request.clone());
                async move { c.ack_batches(r).await }
            })
            .await
            .unwrap_or_else(|e| panic!("{worker}: ack: {e}"));
            acked.fetch_add(reply.batches.len(), std::sync::atomic::Ordering::Relaxed);
        }
    });
    log
}

/// The durable queue across leader kills, over its RPCs: worker threads
/// lease and ack through whichever head answers while the leader is
/// SIGKILLed twice (the first one restarted). A deserter leases batches
/// and never acks: its leases come back by the leader's clock (a new leader
/// gives them a full visibility timeout again). Every batch ends counted
/// once or dead-lettered, and exactly one worker runs the completion.
#[test]
fn queue_batches_end_once_or_dead_lettered_across_leader_kills() {
    use serval_protos::control::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    const BATCHES: u64 = 300;
    const MAX_RECEIVE_COUNT: u32 = 2;
    let tmp = tempfile::Builder::new()
        .prefix("sv-")
        .tempdir_in("/tmp")
        .unwrap();
    let (mut heads, leader_ix) = three_heads_without_replicas(tmp.path());
    let token = heads[0].token();
    let addrs: Vec<String> = heads.iter().map(|h| h.control_address()).collect();
    let all = addrs.join(",");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let poison: BTreeSet<u64> = (0..BATCHES).filter(|i| i % 10 == 3).collect();
    let (job, deserted) = rt.block_on(async {
        let mut c = serval_protos::client::connect(&all, &token).await.unwrap();
        let spec = JobSpec {
            api: "queue".into(),
            workers: 3,
            config_json: "{}".into(),
            max_receive_count: MAX_RECEIVE_COUNT,
            ..Default::default()
        };
        let job = c.create_job(spec).await.unwrap().into_inner().id;
        let batches: Vec<Vec<u8>> = (0..BATCHES)
            .map(|i| format!("[{i}]").into_bytes())
            .collect();
        c.enqueue_batches(EnqueueRequest {
            job_id: job.clone(),
            first_index: 0,
            batches,
        })
        .await
        .unwrap();
        c.finish_enqueue(FinishEnqueueRequest {
            job_id: job.clone(),
            total: BATCHES,
            error: String::new(),
        })
        .await
        .unwrap();
        // The deserter: leases and is never heard of again.
        let lease = c
            .lease_batches(LeaseRequest {
                job_id: job.clone(),
                worker_id: "deserter".into(),
                max: 5,
                visibility_s: 1.0,
            })
            .await
            .unwrap()
            .into_inner();
        let deserted: BTreeSet<u64> = lease.batches.iter().map(|b| b.index).collect();
        (job, deserted)
    });
    assert_eq!(deserted.len(), 5);

    let acked = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..3)
        .map(|i| {
            let (all, token, job, poison, acked) = (
                all.clone(),
                token.clone(),
                job.clone(),
                poison.clone(),
                acked.clone(),
            );
            std::thread::spawn(move || {
                queue_worker(all, token, job, format!("w{i}"), poison, acked)
            })
        })
        .collect();
    let acked_at_least = |what: &str, n: usize| {
        wait_for(what, Duration::from_secs(90), || {
            (acked.load(Ordering::Relaxed) >= n).then_some(())
        })
    };

    // The first leader dies a quarter of the way, and comes back.
    acked_at_least("a quarter of the batches", BATCHES as usize / 4);
    let acked_at_kills = [acked.load(Ordering::Relaxed), 0];
    let (killed, second) = kill_leader(&mut heads, leader_ix);
    heads.insert(leader_ix, killed.restart());
    // The second leader dies half way, and stays dead.
    acked_at_least("half of the batches", BATCHES as usize / 2);
    let second_ix = addrs.iter().position(|a| *a == second).unwrap();
    drop(heads.remove(second_ix));
    let acked_at_kills = [acked_at_kills[0], acked.load(Ordering::Relaxed)];

    let logs: Vec<WorkerLog> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    let survivor = &heads[0];
    let (ended, dead) = rt.block_on(async {
        let mut c = serval_protos::client::connect(&survivor.control_address(), &token)
            .await
            .unwrap();
        let request = JobRequest {
            job_id: job.clone(),
        };
        let ended = c.get_job(request.clone()).await.unwrap().into_inner();
        let dead = c.get_dead_letters(request).await.unwrap().into_inner();
        (ended, dead)
    });
    // Counted once or dead-lettered: the store's counts and dead letters.
    let dead: BTreeSet<u64> = dead.batches.iter().map(|b| b.index).collect();
    assert_eq!(dead, poison, "dead letters");
    assert_eq!(
        (ended.status.as_str(), ended.succeeded, ended.failed),
        (
            "completed with failures",
            BATCHES - poison.len() as u64,
            poison.len() as u64
        ),
        "{ended:?}"
    );
    let completions: usize = logs.iter().map(|l| l.completions).sum();
    assert_eq!(completions, 1, "the completion runs once");
    // Every batch ran; the deserted ones again after their leases expired.
    let mut receipts: BTreeMap<u64, u32> = BTreeMap::new();
    for (index, receipt) in logs.iter().flat_map(|l| l.ran.iter()) {
        let max = receipts.entry(*index).or_default();
        *max = (*max).max(*receipt);
    }
    assert_eq!(receipts.len() as u64, BATCHES, "every batch ran");
    for index in &deserted {
        assert!(
            receipts[index] >= 2,
            "deserted batch {index} ran as receipt {}",
            receipts[index]
        );
    }
    let runs: usize = logs.iter().map(|l| l.ran.len()).sum();
    eprintln!(
        "FIGURES: batch queue: {BATCHES} batches, leaders killed after {acked_at_kills:?} acks, {runs} batch runs, {} succeeded once, {} dead-lettered, {completions} completion",
        ended.succeeded,
        dead.len()
    );
}
