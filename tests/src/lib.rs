//! Shared helpers for the cluster tests: locating the built `serve` binary and
//! the project's `.venv` Python, free ports, polling with a deadline, and a
//! guard that kills a process tree on drop so a failing test leaves nothing.
// Fixtures of the tests: an unwrap is a failed test, as in the tests themselves.
#![allow(clippy::unwrap_used)]

pub mod linearizability;
pub mod machine;
pub mod netns;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The workspace root (this crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The `.venv` interpreter with the `serval` SDK installed (`make venv`).
pub fn venv_python() -> PathBuf {
    let p = repo_root().join(".venv/bin/python");
    assert!(p.exists(), "{} missing: run `make venv` first", p.display());
    p
}

/// The `serve` binary cargo built for this test run.
pub fn serve_bin() -> PathBuf {
    // Integration tests of another crate cannot use CARGO_BIN_EXE_serve, so
    // find it next to the test executable: target/debug/deps/.. -> target/debug.
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("serve");
    assert!(
        bin.exists(),
        "{} missing: build with `cargo build -p serval-head` first",
        bin.display()
    );
    bin
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    poll_for(timeout, f).unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// Calls `f` every 50 ms until it returns a value; `None` once `timeout`
/// has passed without one.
pub fn poll_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills the child (and its process group) when dropped.
pub struct ProcessGuard {
    pub child: Child,
    /// Released after the kill (fields drop after `drop`).
    _share: machine::Share,
}

impl ProcessGuard {
    /// Spawns `cmd` in its own process group so the whole tree can be
    /// killed, once the machine is not another test's alone.
    pub fn spawn(mut cmd: Command) -> Self {
        use std::os::unix::process::CommandExt;
        let share = machine::share();
        cmd.process_group(0);
        let child = cmd.spawn().expect("spawn child process");
        Self {
            child,
            _share: share,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        let pgid = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &pgid]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `serve start` process (head or node) on free ports in `data_dir`.
pub struct ServeProcess {
    pub guard: ProcessGuard,
    /// The address its ports are on (127.0.0.1 but on the netns test bed).
    pub host: String,
    /// What its commands run under (`ip netns exec NS` on the test bed).
    wrapper: Vec<String>,
    pub data_dir: PathBuf,
    pub control_port: u16,
    pub http_port: u16,
}

impl ServeProcess {
    /// Starts `serve start` with `args` and waits until it prints `ready_line`.
    pub fn start(data_dir: &Path, control_port: u16, http_port: u16, args: &[&str]) -> Self {
        Self::start_with_env(data_dir, control_port, http_port, args, &[])
    }

    /// [`ServeProcess::start`] with extra environment variables.
    pub fn start_with_env(
        data_dir: &Path,
        control_port: u16,
        http_port: u16,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        Self::start_on(
            "127.0.0.1",
            &[],
            data_dir,
            control_port,
            http_port,
            args,
            env,
        )
    }

    /// [`ServeProcess::start_with_env`] for a process reached at `host`,
    /// run under `wrapper` (e.g. `ip netns exec NS`; empty: none).
    pub fn start_on(
        host: &str,
        wrapper: &[&str],
        data_dir: &Path,
        control_port: u16,
        http_port: u16,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        std::fs::create_dir_all(data_dir).expect("data dir");
        let log = std::fs::File::create(data_dir.join("test-serve.log")).expect("log file");
        let wrapper: Vec<String> = wrapper.iter().map(|s| s.to_string()).collect();
        let mut cmd = wrapped(&wrapper, serve_bin());
        cmd.arg("--data-dir")
            .arg(data_dir)
            .arg("start")
            .args([
                "--control-port",
                &control_port.to_string(),
                "--http-port",
                &http_port.to_string(),
            ])
            .args(args)
            .env("SERVAL_PYTHON", venv_python())
            .env_remove("SERVAL_ADDRESS")
            .env_remove("SERVAL_TOKEN")
            .env_remove("SERVAL_TOKEN_FILE")
            .envs(env.iter().copied())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let guard = ProcessGuard::spawn(cmd);
        Self {
            guard,
            host: host.to_string(),
            wrapper,
            data_dir: data_dir.to_path_buf(),
            control_port,
            http_port,
        }
    }

    /// `serve status --json` through this head; Null when it fails (the
    /// reason on stderr), so a caller polling it keeps polling.
    pub fn status_json(&self) -> serde_json::Value {
        let out = wrapped(&self.wrapper, serve_bin())
            .args([
                "--address",
                &self.control_address(),
                "--token",
                &self.token(),
                "status",
                "--json",
            ])
            .output()
            .expect("run serve status");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            eprintln!(
                "status failed ({e}): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::Value::Null
        })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("test-serve.log")).unwrap_or_default()
    }

    /// Waits until the log contains `needle` (the process prints its
    /// addresses once it serves).
    pub fn wait_log(&mut self, needle: &str) {
        let found = poll_for(Duration::from_secs(120), || {
            if let Ok(Some(status)) = self.guard.child.try_wait() {
                panic!("serve exited ({status}) before '{needle}':\n{}", self.log());
            }
            self.log().contains(needle).then_some(())
        });
        if found.is_none() {
            panic!(
                "no '{needle}' in the serve log after 120 s; its end:\n{}",
                self.log_tail(40)
            );
        }
    }

    /// The last `n` lines of the serve log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let tail: Vec<&str> = log.lines().rev().take(n).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Waits until the process exits (after a signal), or panics with the
    /// end of its log after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let child = &mut self.guard.child;
        poll_for(timeout, || child.try_wait().ok().flatten()).unwrap_or_else(|| {
            panic!(
                "serve did not exit within {timeout:?}; its log ends:\n{}",
                self.log_tail(60)
            )
        })
    }

    pub fn control_address(&self) -> String {
        format!("{}:{}", self.host, self.control_port)
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("token"))
            .map(|t| t.trim().to_string())
            .unwrap_or_default()
    }

    /// A control-plane client of this head.
    pub async fn client(&self) -> serval_protos::client::Client {
        serval_protos::client::connect(&self.control_address(), &self.token())
            .await
            .expect("connect to head")
    }

    /// This head's raft id (its data dir's `raft_id`).
    pub fn raft_id(&self) -> u64 {
        std::fs::read_to_string(self.data_dir.join("raft_id"))
            .expect("raft_id file")
            .trim()
            .parse()
            .expect("raft_id is a number")
    }
}

/// What a finished command wrote to stderr.
pub fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `program` under `wrapper` (its first word runs, the rest are arguments).
fn wrapped(wrapper: &[String], program: PathBuf) -> Command {
    match wrapper.split_first() {
        None => Command::new(program),
        Some((first, rest)) => {
            let mut cmd = Command::new(first);
            cmd.args(rest).arg(program);
            cmd
        }
    }
}

/// Runs a Python script with the venv interpreter and returns its stdout;
/// panics with its stderr when it fails.
pub fn run_python(script: &str, envs: &[(&str, String)]) -> String {
    let out = Command::new(venv_python())
        .arg("-c")
        .arg(script)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "python failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A blocking HTTP/1.1 GET on loopback: (status, body). No client library:
/// the tests should see exactly what the proxy sends.
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    http_request(port, "GET", path, "")
}

/// [`http_get`] with any method and a JSON body (none when empty).
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    json: &str,
) -> std::io::Result<(u16, String)> {
    http_request_to("127.0.0.1", port, method, path, json)
}

/// [`http_request`] to `host` (an address of another network namespace on
/// the netns test bed); connecting gives up after 10 s.
pub fn http_request_to(
    host: &str,
    port: u16,
    method: &str,
    path: &str,
    json: &str,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = format!("{host}:{port}")
        .parse()
        .map_err(std::io::Error::other)?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body_headers = if json.is_empty() {
        String::new()
    } else {
        format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            json.len()
        )
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{body_headers}Connection: close\r\n\r\n{json}"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {text}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Two backends of two replicas each answering `{"pid": ...}` after 0.1 s:
/// `gets` (GET, `retry_idempotent` on as by default) and `posts` (POST,
/// `retry_idempotent=False`). Connects to `ADDR` with `TOKEN`.
pub const DEPLOY_SLOW_GETS_AND_POSTS: &str = r#"
import os, time
from serval import serve
serve.connect(os.environ["ADDR"], token=os.environ["TOKEN"])

def slow(request):
    # Long enough that every replica always has requests in flight.
    time.sleep(0.1)
    return {"pid": os.getpid()}

serve.create_backend("gets", slow, config={"num_replicas": 2})
serve.create_endpoint("gets", backend="gets", route="/gets")
serve.create_backend("posts", slow, config={"num_replicas": 2, "retry_idempotent": False})
serve.create_endpoint("posts", backend="posts", route="/posts", methods=["POST"])
print("deployed")
"#;

/// What a load of `method` requests to `path` through the proxy at
/// `host:port` saw while one replica of the backend was SIGKILLed (the
/// backend answers `{"pid": ...}` slowly enough that every replica always
/// has requests in flight): (successes, failures with their status or error).
pub fn load_while_a_replica_is_killed(
    host: &str,
    port: u16,
    method: &str,
    path: &str,
) -> (usize, Vec<String>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    let stop = AtomicBool::new(false);
    let pids = Mutex::new(std::collections::BTreeSet::new());
    let ok = std::sync::atomic::AtomicUsize::new(0);
    let failed = Mutex::new(Vec::new());
    let body = if method == "POST" { "{}" } else { "" };
    wait_for(
        &format!("{method} {path} answered"),
        Duration::from_secs(60),
        || {
            matches!(
                http_request_to(host, port, method, path, body),
                Ok((200, _))
            )
            .then_some(())
        },
    );
    /// Stops the clients however the scope ends (a failed wait panics).
    struct Stop<'a>(&'a AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    std::thread::scope(|s| {
        let _stop = Stop(&stop);
        // Four clients for two replicas: both always have requests in flight.
        for _ in 0..4 {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    match http_request_to(host, port, method, path, body) {
                        Ok((200, answer)) => {
                            let v: serde_json::Value =
                                serde_json::from_str(&answer).unwrap_or_default();
                            if let Some(pid) = v["pid"].as_i64() {
                                pids.lock().unwrap().insert(pid);
                            }
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok((status, body)) => {
                            failed.lock().unwrap().push(format!("{status} {body}"))
                        }
                        Err(e) => failed.lock().unwrap().push(e.to_string()),
                    }
                }
            });
        }
        let victim = wait_for("both replicas answering", Duration::from_secs(60), || {
            let p = pids.lock().unwrap();
            (p.len() >= 2).then(|| *p.iter().next().unwrap())
        });
        let status = std::process::Command::new("kill")
            .args(["-KILL", &victim.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {victim}");
        // Load goes on until the backend has served plenty after the kill
        // (the survivor, and the replica the node agent starts again).
        let after = ok.load(Ordering::Relaxed) + 40;
        wait_for(
            "requests served after the kill",
            Duration::from_secs(60),
            || (ok.load(Ordering::Relaxed) >= after).then_some(()),
        );
        stop.store(true, Ordering::Relaxed);
    });
    (ok.into_inner(), failed.into_inner().unwrap())
}

/// A head (directory `root/name`) whose node agent has no CPUs, so it
/// starts no replicas: for tests of the control plane alone. `join`:
/// (address, token) of a head of the cluster to join.
pub fn start_head_without_replicas(
    root: &Path,
    name: &str,
    join: Option<(&str, &str)>,
) -> ServeProcess {
    // No CPUs: the heads' node agents start no replicas.
    let mut args = vec!["--head", "--num-cpus", "0"];
    let join_args;
    if let Some((addr, token)) = join {
        join_args = [addr.to_string(), token.to_string()];
        args.extend(["--join", &join_args[0], "--token", &join_args[1]]);
    }
    let mut head = ServeProcess::start(&root.join(name), free_port(), free_port(), &args);
    head.wait_log("http proxy listening");
    head
}

/// Three heads without replicas (h1, then h2 and h3 joining it) under
/// `root`, once all three vote and one leads; returns them and the index
/// of the leader.
pub fn three_heads_without_replicas(root: &Path) -> (Vec<ServeProcess>, usize) {
    let first = start_head_without_replicas(root, "h1", None);
    let (addr, token) = (first.control_address(), first.token());
    let mut heads = vec![first];
    for name in ["h2", "h3"] {
        heads.push(start_head_without_replicas(
            root,
            name,
            Some((&addr, &token)),
        ));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let leader = wait_for("three voters and a leader", Duration::from_secs(60), || {
        let s = rt.block_on(async {
            let mut c = serval_protos::client::connect(&addr, &token).await.ok()?;
            c.get_snapshot(serval_protos::control::WatchRequest::default())
                .await
                .ok()
                .map(|r| r.into_inner())
        })?;
        let voters = s.heads.iter().filter(|h| h.role != "learner").count();
        let leader = s.heads.iter().find(|h| h.leader)?;
        (voters == 3).then_some(leader.address.clone())
    });
    let leader_ix = heads
        .iter()
        .position(|h| h.control_address() == leader)
        .expect("the leader is one of the three");
    (heads, leader_ix)
}

/// The code of backends whose code never runs: stored with
/// [`put_placeholder_code`] before a backend names it.
pub const PLACEHOLDER_CODE: &[u8] = &[1];

pub fn placeholder_code_digest() -> String {
    serval_protos::blob::digest(PLACEHOLDER_CODE)
}

/// Stores [`PLACEHOLDER_CODE`]: a backend names its code by the digest of
/// a stored blob.
pub async fn put_placeholder_code(
    c: &mut serval_protos::client::Client,
) -> Result<(), tonic::Status> {
    c.put_blob(serval_protos::control::PutBlobRequest {
        digest: placeholder_code_digest(),
        data: PLACEHOLDER_CODE.to_vec(),
    })
    .await
    .map(|_| ())
}

/// A backend of one replica needing a CPU: pending (its code is never
/// run) on heads that offer none. Its code is [`PLACEHOLDER_CODE`].
pub fn pending_backend(name: &str) -> serval_protos::control::Backend {
    serval_protos::control::Backend {
        name: name.to_string(),
        code_digest: placeholder_code_digest(),
        config: Some(serval_protos::control::BackendConfig {
            num_replicas: 1,
            num_cpus: 1.0,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The leader's raft id in a head's `serve status --json`.
pub fn leader_id(status: &serde_json::Value) -> Option<u64> {
    status["heads"]
        .as_array()?
        .iter()
        .find(|h| h["role"] == "leader")
        .and_then(|h| h["raft_id"].as_u64())
}

/// The leader's control address as `head` sees it (`serve status`).
pub fn leader_address(head: &ServeProcess) -> Option<String> {
    let s = head.status_json();
    s["heads"]
        .as_array()?
        .iter()
        .find(|h| h["leader"] == true)
        .and_then(|h| h["address"].as_str().map(String::from))
}

/// A head of [`three_heads_without_replicas`] that was SIGKILLed: what it
/// needs to come back as the member it was.
pub struct KilledHead {
    data_dir: PathBuf,
    control_port: u16,
    http_port: u16,
}

impl KilledHead {
    /// Starts it again on its data dir and ports, once it listens.
    pub fn restart(&self) -> ServeProcess {
        let mut head = ServeProcess::start(
            &self.data_dir,
            self.control_port,
            self.http_port,
            &["--head", "--num-cpus", "0"],
        );
        head.wait_log("http proxy listening");
        head
    }
}

/// SIGKILLs the leader `heads[ix]` (taking it out of `heads`) and waits
/// until the others elect another; returns the new leader's address.
pub fn kill_leader(heads: &mut Vec<ServeProcess>, ix: usize) -> (KilledHead, String) {
    let killed = heads.remove(ix);
    let gone = KilledHead {
        data_dir: killed.data_dir.clone(),
        control_port: killed.control_port,
        http_port: killed.http_port,
    };
    let killed_addr = killed.control_address();
    drop(killed);
    let leader = wait_for("a new leader", Duration::from_secs(60), || {
        leader_address(&heads[0]).filter(|a| *a != killed_addr)
    });
    (gone, leader)
}
