//! Backend code by digest, through the Python API against a real cluster:
//! 20 backends of 30 MB of pickled code each leave the Watch snapshot, a
//! small write's apply and the node agent's memory where the first ones
//! left them, the head's memory bounded, and the node holds each backend's code once, verified.

use prost::Message;
use serval_protos::control::WatchRequest;
use serval_tests::*;

const BACKENDS: usize = 20;
/// The first deploys, measured against the last ones.
const FIRST: usize = 3;
const CODE_MB: usize = 30;

/// Deploys backends `big<FROM>`..`big<TO>`, each a class holding its own
/// 30 MB bytes constant (`big0` with two replicas), with `serve.create_backend` (which waits until
/// the replica runs the code), and after each one times a small write (a
/// config change of `big0`): one line per deploy.
const DEPLOY: &str = r#"
import os, time
from serval import serve
serve.connect(os.environ["ADDR"], token=os.environ["TOKEN"])
for i in range(int(os.environ["FROM"]), int(os.environ["TO"])):
    class Big:
        BLOB = os.urandom(int(os.environ["CODE_MB"]) << 20)
        def __call__(self, request):
            return len(self.BLOB)
    started = time.monotonic()
    # big0's two replicas share one fetch of its code.
    config = {"num_replicas": 2 if i == 0 else 1}
    serve.create_backend(f"big{i}", Big, ray_actor_options={"num_cpus": 1}, config=config)
    deployed = time.monotonic() - started
    started = time.monotonic()
    serve.update_backend_config("big0", {"max_concurrent_queries": 100 + i})
    write = time.monotonic() - started
    print(f"deploy {i} {deployed:.3f} {write:.4f}", flush=True)
"#;

/// The snapshot a node agent's Watch receives (with code, where a state
/// still carries it), encoded.
fn snapshot_bytes(rt: &tokio::runtime::Runtime, head: &ServeProcess) -> usize {
    rt.block_on(async {
        let mut c = head.client().await;
        let request = WatchRequest { include_code: true };
        c.get_snapshot(request)
            .await
            .unwrap()
            .into_inner()
            .encoded_len()
    })
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// The most resident memory process `pid` has had, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/PID/status"))
}

/// Seconds of the small write after each deploy, from the script's lines.
fn writes(out: &str) -> Vec<f64> {
    out.lines()
        .filter_map(|l| l.strip_prefix("deploy "))
        .map(|l| l.split(' ').nth(2).unwrap().parse().unwrap())
        .collect()
}

#[test]
fn twenty_backends_of_30_mb_keep_snapshot_apply_and_agent_memory_flat() {
    let _alone = machine::alone();
    let tmp = tempfile::Builder::new()
        .prefix("sv-")
        .tempdir_in("/tmp")
        .unwrap();
    let head = start_head_without_replicas(tmp.path(), "head", None);
    let token = head.token();
    // The replicas run on a node of their own, so its process is the agent
    // alone (no controller, no proxy's state beside it).
    let node_dir = tmp.path().join("node");
    let cpus = (BACKENDS + 1).to_string();
    let mut node = ServeProcess::start(
        &node_dir,
        free_port(),
        free_port(),
        &[
            "--address",
            &head.control_address(),
            "--token",
            &token,
            "--num-cpus",
            &cpus,
        ],
    );
    node.wait_log("joined the head");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let deploy = |from: usize, to: usize| {
        let env = [
            ("ADDR", head.control_address()),
            ("TOKEN", token.clone()),
            ("FROM", from.to_string()),
            ("TO", to.to_string()),
            ("CODE_MB", CODE_MB.to_string()),
        ];
        run_python(DEPLOY, &env)
    };
    let started = std::time::Instant::now();
    let first = deploy(0, FIRST);
    let (snapshot_first, rss_first) = (snapshot_bytes(&rt, &head), rss_kib(node.guard.pid()));
    let head_first = rss_kib(head.guard.pid());
    let last = deploy(FIRST, BACKENDS);
    let (snapshot_last, rss_last) = (snapshot_bytes(&rt, &head), rss_kib(node.guard.pid()));
    let head_last = rss_kib(head.guard.pid());
    let head_peak = peak_rss_kib(head.guard.pid());
    let (first, last) = (writes(&first), writes(&last));
    assert_eq!(first.len() + last.len(), BACKENDS, "{first:?} {last:?}");
    println!(
        "FIGURES code_by_digest: {BACKENDS} backends x {CODE_MB} MB in {:.1} s; \
         Watch snapshot {snapshot_first} B after {FIRST}, {snapshot_last} B after {BACKENDS}; \
         small write after each deploy: first {first:?} s, last {:?} s; \
         node agent RSS {} MiB after {FIRST}, {} MiB after {BACKENDS}; \
         head RSS {} MiB after {FIRST}, {} MiB after {BACKENDS}, at most {} MiB",
        started.elapsed().as_secs_f64(),
        &last[last.len() - FIRST..],
        rss_first / 1024,
        rss_last / 1024,
        head_first / 1024,
        head_last / 1024,
        head_peak / 1024,
    );
    // The snapshot names code by digest: a few hundred bytes per backend,
    // where it carried 30 MB each.
    assert!(
        snapshot_last < 64 * 1024,
        "the Watch snapshot carries code: {snapshot_last} bytes"
    );
    assert!(
        snapshot_last - snapshot_first < 16 * 1024,
        "{snapshot_first} -> {snapshot_last}"
    );
    // The agent keeps no code in memory: 17 more backends (510 MB of code)
    // grow it by far less than one backend's code.
    assert!(
        rss_last < rss_first + 25 * 1024,
        "node agent RSS grew from {rss_first} KiB to {rss_last} KiB"
    );
    // Nor does the head, which stores the 600 MB of code: redb's page cache
    // is bounded (its default is 1 GiB), and a raft snapshot (one every
    // 500 entries, and the 600 parts are more) writes the blobs it carries
    // to a file one by one, where it held them all in memory twice.
    assert!(
        head_peak < 400 * 1024,
        "head RSS peaked at {head_peak} KiB (now {head_last} KiB)"
    );
    // Each backend's code is on the node once, as its digest names it.
    let code_dir = node_dir.join("code");
    let files: Vec<_> = std::fs::read_dir(&code_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), BACKENDS, "{files:?}");
    for f in &files {
        let digest = f.file_stem().unwrap().to_str().unwrap();
        let data = std::fs::read(f).unwrap();
        assert!(data.len() > CODE_MB << 20);
        assert_eq!(serval_protos::blob::digest(&data), digest);
    }
    assert_eq!(
        node.log().matches("fetched backend code").count(),
        BACKENDS,
        "one fetch per backend's code on this node"
    );
}
