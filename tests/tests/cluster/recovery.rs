//! Whole-cluster behaviour with real processes: a head restarted on the same
//! data dir brings its deployments back, and the data plane keeps serving
//! from its cached routing table while the controller is down, and a GET
//! whose replica is SIGKILLed mid-request is served by another.

use std::time::Duration;

use serval_tests::*;

const DEPLOY_COUNTER: &str = r#"
import os
from serval import serve
serve.connect(os.environ["ADDR"], token=os.environ["TOKEN"])

class Counter:
    def __init__(self):
        self.count = 0
    def __call__(self, request):
        self.count += 1
        return {"count": self.count, "pid": os.getpid()}

serve.create_backend("counter", Counter)
serve.create_endpoint("counter", backend="counter", route="/counter")
print("deployed")
"#;

fn body_count(body: &str) -> i64 {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    v["count"]
        .as_i64()
        .unwrap_or_else(|| panic!("no count in {body}"))
}

#[test]
fn a_restarted_head_brings_back_endpoints_backends_and_replicas() {
    let tmp = tempfile::Builder::new()
        .prefix("sv-")
        .tempdir_in("/tmp")
        .unwrap();
    let (control, http) = (free_port(), free_port());
    let mut head = ServeProcess::start(tmp.path(), control, http, &["--head", "--num-cpus", "4"]);
    head.wait_log("http proxy listening");
    let envs = [("ADDR", head.control_address()), ("TOKEN", head.token())];
    assert!(run_python(DEPLOY_COUNTER, &envs).contains("deployed"));
    let (status, body) = http_get(http, "/counter").unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body_count(&body), 1);

    // Stop the head (SIGTERM: a clean stop, as `serve shutdown` would not
    // keep the cluster), then start it again on the same data dir.
    let pid = head.guard.pid().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    head.wait_exit(Duration::from_secs(60));
    drop(head);

    let mut head = ServeProcess::start(tmp.path(), control, http, &["--head", "--num-cpus", "4"]);
    head.wait_log("http proxy listening");
    // No redeploy: the backend's replica starts again from the raft store.
    let body = wait_for(
        "the route to answer after restart",
        Duration::from_secs(120),
        || {
            http_get(http, "/counter")
                .ok()
                .filter(|(s, _)| *s == 200)
                .map(|(_, b)| b)
        },
    );
    assert_eq!(
        body_count(&body),
        1,
        "a fresh replica counts from 1: {body}"
    );
    let status_out = std::process::Command::new(serve_bin())
        .args(["--data-dir", tmp.path().to_str().unwrap(), "status"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status_out.stdout);
    assert!(text.contains("/counter"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("counter") && l.contains("running")),
        "{text}"
    );
}

#[test]
fn the_route_and_handles_answer_while_the_controller_is_down() {
    let tmp = tempfile::Builder::new()
        .prefix("sv-")
        .tempdir_in("/tmp")
        .unwrap();
    let head_dir = tmp.path().join("head");
    let node_dir = tmp.path().join("node");
    let (control, head_http) = (free_port(), free_port());
    // The head offers no CPUs, so the replica lands on the second node, whose
    // own proxy (EveryNode) serves it.
    let mut head = ServeProcess::start(
        &head_dir,
        control,
        head_http,
        &["--head", "--num-cpus", "0", "--http-location", "EveryNode"],
    );
    head.wait_log("http proxy listening");
    let node_http = free_port();
    let mut node = ServeProcess::start(
        &node_dir,
        free_port(),
        node_http,
        &[
            "--address",
            &head.control_address(),
            "--token",
            &head.token(),
            "--num-cpus",
            "4",
        ],
    );
    node.wait_log("joined the head");
    let envs = [("ADDR", head.control_address()), ("TOKEN", head.token())];
    run_python(DEPLOY_COUNTER, &envs);
    let (status, body) = wait_for(
        "node proxy to serve /counter",
        Duration::from_secs(60),
        || {
            http_get(node_http, "/counter")
                .ok()
                .filter(|(s, _)| *s == 200)
        },
    );
    assert_eq!(status, 200, "{body}");

    // A Python handle that will keep calling after the controller is gone.
    let mut handle_script = std::process::Command::new(venv_python());
    handle_script
        .arg("-c")
        .arg(
            r#"
import os, sys
from serval import serve
serve.connect(os.environ["ADDR"], token=os.environ["TOKEN"])
h = serve.get_handle("counter")
print("first", h.remote().result()["count"], flush=True)
sys.stdin.readline()
print("second", h.remote().result()["count"], flush=True)
"#,
        )
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut handle = ProcessGuard::spawn(handle_script);
    let mut out = std::io::BufReader::new(handle.child.stdout.take().unwrap());
    let mut line = String::new();
    use std::io::BufRead;
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("first"), "{line}");

    // Kill the head: controller, its proxy and its (empty) node agent.
    drop(head);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", control)).is_err(),
        "controller still listening"
    );

    for _ in 0..5 {
        let (status, body) = http_get(node_http, "/counter").unwrap();
        assert_eq!(
            status, 200,
            "node proxy stopped serving without the controller: {body}"
        );
    }
    use std::io::Write;
    writeln!(handle.child.stdin.as_mut().unwrap()).unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert!(
        line.starts_with("second"),
        "the handle failed without the controller: {line:?}"
    );
}

/// Issue 24: a GET whose replica is SIGKILLed before it answered is sent
/// once more, to another replica: a loop of GETs sees no failure. A POST
/// (never idempotent), on a backend with `retry_idempotent=False`, may
/// fail, as a 502 (replica lost) or 503 (none routable).
#[test]
fn gets_survive_a_replica_sigkilled_under_load_and_posts_fail_as_502_or_503() {
    let tmp = tempfile::Builder::new()
        .prefix("sv-")
        .tempdir_in("/tmp")
        .unwrap();
    let (control, http) = (free_port(), free_port());
    let mut head = ServeProcess::start(
        &tmp.path().join("head"),
        control,
        http,
        &["--head", "--num-cpus", "4"],
    );
    head.wait_log("http proxy listening");
    let envs = [("ADDR", head.control_address()), ("TOKEN", head.token())];
    let out = run_python(DEPLOY_SLOW_GETS_AND_POSTS, &envs);
    assert!(out.contains("deployed"), "{out}");

    let (ok, failed) = load_while_a_replica_is_killed("127.0.0.1", http, "GET", "/gets");
    eprintln!(
        "FIGURES: GETs with a replica SIGKILLed: {ok} served, {} failed",
        failed.len()
    );
    assert!(failed.is_empty(), "failed GETs: {failed:?}");
    let metrics = http_get(http, "/-/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with(r#"serval_router_retries_total{backend="gets"}"#)),
        "no retry counted: {metrics}"
    );

    let (ok, failed) = load_while_a_replica_is_killed("127.0.0.1", http, "POST", "/posts");
    eprintln!(
        "FIGURES: POSTs with a replica SIGKILLed: {ok} served, {} failed",
        failed.len()
    );
    for f in &failed {
        assert!(
            f.starts_with("502") || f.starts_with("503"),
            "a POST failed otherwise: {f}"
        );
    }
}
