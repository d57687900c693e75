//! One supervisor per replica, owning the replica's process: start it, read
//! its one status line, report to the controller, restart it with backoff
//! when it exits, apply config changes in place, and stop it when told. It is
//! an actor in the plain sense: a task that owns its state and changes only
//! on the messages it gets (stop, a new backend config) and the events of its
//! child process.
//!
//! A config change that keeps the backend version (`user_config`,
//! `max_concurrent_queries`, batching) does not restart the replica: the
//! supervisor sends a `Reconfigure` frame over the replica's Unix socket, the
//! replica calls `reconfigure(user_config)` in the same process, and a
//! failure is reported with the replica's traceback (the replica keeps
//! serving). A replica restarted later starts with the latest config.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serval_protos::client::Client;
use serval_protos::control::{Backend, BackendConfig, Replica, ReplicaReport};
use serval_protos::frame::{self, FrameReader, Payload, ReconfigureRequest, Request, Response};
use serval_protos::handshake::{self, Credential, Key, Role};
use serval_protos::states::ReplicaState;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch};

use crate::code_cache::CodeCache;
use crate::metrics as node_metrics;

/// How long a replica may take to import and construct user code.
const START_TIMEOUT: Duration = Duration::from_secs(300);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A replica that closes its stdin pipe gets this long to exit on its own.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long user code's `reconfigure` (queued behind running requests) may take.
const RECONFIGURE_TIMEOUT: Duration = Duration::from_secs(120);

/// What a supervisor needs to start its replica.
#[derive(Clone)]
pub struct ReplicaSpec {
    pub replica: Replica,
    pub backend: Backend,
    pub python: PathBuf,
    pub work_dir: PathBuf,
    pub socket_path: PathBuf,
    pub tcp_host: String,
    /// The controller and token, so user code can `serve.connect()`/
    /// `serve.get_handle(...)` (model composition): SERVAL_ADDRESS/SERVAL_TOKEN.
    pub control_addr: String,
    pub token: String,
    /// Where the node's replicas unpack project packages, shared by all of
    /// them so each package is unpacked once per node: SERVAL_CACHE_DIR.
    pub cache_dir: PathBuf,
    /// HOST:PORT of the nearest HTTP proxy (empty: none), for user code
    /// that calls other endpoints over HTTP: SERVAL_PROXY_URL.
    pub proxy_address: String,
    /// The node's `--tls-cert/--tls-key`: the replica serves TLS on TCP.
    pub data_tls: Option<serval_protos::tls::DataPlaneIdentity>,
    /// Where the backend's code (`backend.code_digest`) is fetched and kept.
    pub code: Arc<CodeCache>,
}

/// The running supervisor; dropping it does not stop the replica, `stop` does.
pub struct SupervisorHandle {
    pub backend_version: u64,
    /// The code the replica runs (kept in the node's code cache).
    pub code_digest: String,
    stop: Option<oneshot::Sender<()>>,
    /// The backend config the replica should run with; the supervisor
    /// applies changes in place (see the module docs).
    config: watch::Sender<WantedConfig>,
    task: tokio::task::JoinHandle<()>,
}

impl SupervisorHandle {
    /// Hands the supervisor the backend config of the latest snapshot: a
    /// change of what the replica applies at run time goes to the replica,
    /// and a new `config_version` is reported once in place.
    pub fn update_config(&self, backend: &Backend) {
        let config = WantedConfig::of(backend);
        self.config.send_if_modified(|current| {
            if *current == config {
                return false;
            }
            *current = config;
            true
        });
    }

    /// Stops the replica and waits until its process is gone.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = self.task.await;
    }
}

/// A backend's config and its `config_version`, which the replica reports
/// once it runs with it.
#[derive(Clone, Default, PartialEq)]
struct WantedConfig {
    config: BackendConfig,
    version: u64,
}

impl WantedConfig {
    fn of(backend: &Backend) -> Self {
        WantedConfig {
            config: backend.config.clone().unwrap_or_default(),
            version: backend.config_version,
        }
    }
}

pub fn spawn(spec: ReplicaSpec, client: Client) -> SupervisorHandle {
    let (tx, rx) = oneshot::channel();
    let (config_tx, config_rx) = watch::channel(WantedConfig::of(&spec.backend));
    let backend_version = spec.replica.backend_version;
    let code_digest = spec.backend.code_digest.clone();
    let task = tokio::spawn(supervise(spec, client, rx, config_rx));
    SupervisorHandle {
        backend_version,
        code_digest,
        stop: Some(tx),
        config: config_tx,
        task,
    }
}

/// The status line a replica writes when it is serving or has failed.
#[derive(serde::Deserialize)]
struct StatusLine {
    state: String,
    #[serde(default)]
    error: String,
    #[serde(default)]
    unix_path: String,
    #[serde(default)]
    tcp_addr: String,
    #[serde(default)]
    grpc_addr: String,
    /// Its TCP listener serves TLS only.
    #[serde(default)]
    tls: bool,
    #[serde(default)]
    pid: u32,
}

async fn report(client: &Client, report: ReplicaReport) {
    let id = report.replica_id.clone();
    if let Err(status) = client.clone().report_replica(report).await {
        // The controller may be down or electing; the next report (or the
        // next restart) carries the state again.
        tracing::warn!(replica = %id, error = %status.message(), "could not report replica state");
    }
}

async fn supervise(
    spec: ReplicaSpec,
    client: Client,
    mut stop: oneshot::Receiver<()>,
    mut config: watch::Receiver<WantedConfig>,
) {
    let id = spec.replica.id.clone();
    let agent = Credential {
        role: Role::Agent,
        key: agent_key(&spec.token, &id),
    };
    let mut restarts = spec.replica.restarts;
    let mut backoff = BACKOFF_MIN;
    // Why the last run ended: shown while the replica starts again, so a
    // crash loop keeps its reason in `serve status`.
    let mut last_error = String::new();
    // This replica's state in `serval_node_replicas`; gone with this task.
    let mut state_gauge = node_metrics::ReplicaStateGauge::new(&spec.backend.name);
    let restarted = metrics::counter!(node_metrics::REPLICA_RESTARTS_TOTAL, "backend" => spec.backend.name.clone());
    loop {
        state_gauge.set(ReplicaState::Starting);
        let base = ReplicaReport {
            replica_id: id.clone(),
            restarts,
            ..Default::default()
        };
        report(
            &client,
            ReplicaReport {
                state: ReplicaState::Starting.into(),
                error: last_error.clone(),
                ..base.clone()
            },
        )
        .await;
        let started = tokio::time::Instant::now();
        // A restarted replica starts with the latest config.
        let start_config = config.borrow_and_update().clone();
        let outcome = match start(&spec, &client, &start_config.config).await {
            Ok((mut child, log_start)) => {
                // Held here, not in `child`: tokio's `Child::wait` closes a
                // stdin it still owns, which would cut the lifeline.
                let lifeline = child.stdin.take();
                let log = spec.work_dir.join(LOG_FILE);
                let result = tokio::select! {
                    r = read_status(&mut child, &log, log_start) => r,
                    _ = &mut stop => { drop(lifeline); terminate(&mut child, &config).await; return; }
                };
                let outcome = match result {
                    Ok(status) if status.state == ReplicaState::Running => {
                        let running = ReplicaReport {
                            state: ReplicaState::Running.into(),
                            unix_path: status.unix_path,
                            tcp_addr: status.tcp_addr,
                            grpc_addr: status.grpc_addr,
                            tls: status.tls,
                            pid: status.pid,
                            config_version: start_config.version,
                            ..base.clone()
                        };
                        report(&client, running.clone()).await;
                        state_gauge.set(ReplicaState::Running);
                        // What the replica runs with; changes go in place.
                        let mut applied = runtime_config(&start_config.config);
                        let mut running = running;
                        let mut config_open = true;
                        let mut log_check = tokio::time::interval(LOG_CHECK_INTERVAL);
                        loop {
                            tokio::select! {
                                exit = child.wait() => break format!("replica process exited ({})", exit.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())),
                                _ = log_check.tick() => {
                                    let log = spec.work_dir.join(LOG_FILE);
                                    let rotated = tokio::task::spawn_blocking(move || rotate_log(&log, log_max_bytes())).await;
                                    match rotated {
                                        Ok(Ok(true)) => tracing::info!(replica = %id, "replica log rotated"),
                                        Ok(Ok(false)) => {}
                                        Ok(Err(e)) => tracing::warn!(replica = %id, error = %e, "cannot rotate the replica log"),
                                        Err(e) => tracing::warn!(replica = %id, error = %e, "the log rotation task failed"),
                                    }
                                }
                                _ = &mut stop => { drop(lifeline); terminate(&mut child, &config).await; return; }
                                changed = config.changed(), if config_open => {
                                    if changed.is_err() {
                                        config_open = false;
                                        continue;
                                    }
                                    let (wanted, version) = {
                                        let w = config.borrow_and_update();
                                        (runtime_config(&w.config), w.version)
                                    };
                                    if wanted == applied {
                                        // Nothing for the replica to apply (a new
                                        // num_replicas, say); a client waiting for the
                                        // change still learns it is in place.
                                        if version != running.config_version {
                                            running.config_version = version;
                                            report(&client, running.clone()).await;
                                        }
                                        continue;
                                    }
                                    tracing::info!(replica = %id, config = %wanted, "reconfiguring replica in place");
                                    let result = tokio::select! {
                                        r = reconfigure(&running.unix_path, agent, wanted.clone()) => r,
                                        _ = &mut stop => { drop(lifeline); terminate(&mut child, &config).await; return; }
                                    };
                                    applied = wanted;
                                    let error = match result {
                                        Ok(()) => String::new(),
                                        Err(e) => {
                                            tracing::warn!(replica = %id, error = %e, "reconfigure failed; the replica keeps serving");
                                            e
                                        }
                                    };
                                    running.config_version = version;
                                    report(&client, ReplicaReport { error, ..running.clone() }).await;
                                }
                            }
                        }
                    }
                    Ok(status) => {
                        let _ = child.wait().await;
                        if status.error.is_empty() {
                            format!("replica reported state '{}'", status.state)
                        } else {
                            status.error
                        }
                    }
                    Err(e) => {
                        let _ = child.kill().await;
                        e
                    }
                };
                drop(lifeline);
                outcome
            }
            Err(e) => e,
        };
        tracing::warn!(replica = %id, reason = %outcome, "replica stopped; restarting after backoff");
        state_gauge.set(ReplicaState::Failed);
        report(
            &client,
            ReplicaReport {
                state: ReplicaState::Failed.into(),
                error: outcome.clone(),
                ..base
            },
        )
        .await;
        last_error = outcome;
        // A replica that served for a while starts again quickly.
        if started.elapsed() > BACKOFF_MAX {
            backoff = BACKOFF_MIN;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = &mut stop => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
        restarts += 1;
        restarted.increment(1);
    }
}

/// The replica's `--config-json`.
fn start_config_json(c: &BackendConfig) -> String {
    let mut v = runtime_config_value(c);
    v["num_replicas"] = c.num_replicas.into();
    v.to_string()
}

/// A replica's log in its work dir, and the one copy kept when it rotates.
const LOG_FILE: &str = "replica.log";
const ROTATED_LOG_FILE: &str = "replica.log.1";
/// How often a running replica's log size is checked.
const LOG_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// The size past which a replica's log rotates: `SERVAL_REPLICA_LOG_MAX_BYTES`
/// in the node's environment, default 64 MiB. A replica writes its stderr
/// there for as long as it runs; without a bound a chatty one filled the
/// disk.
const DEFAULT_LOG_MAX_BYTES: u64 = 64 * 1024 * 1024;

fn log_max_bytes() -> u64 {
    std::env::var("SERVAL_REPLICA_LOG_MAX_BYTES")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_LOG_MAX_BYTES)
}

/// When `log` is over `max` bytes: copies it to `replica.log.1` (replacing
/// the older copy) and truncates it. The replica keeps writing to the same
/// file (its stderr is opened for appending, so it writes at the new end);
/// lines written between the copy and the truncation are lost, as with
/// logrotate's copytruncate. `serve logs` sees the size drop and starts over.
/// Blocking: run it off the runtime's workers.
fn rotate_log(log: &std::path::Path, max: u64) -> std::io::Result<bool> {
    let size = match std::fs::metadata(log) {
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if size <= max {
        return Ok(false);
    }
    let rotated = log.with_file_name(ROTATED_LOG_FILE);
    let mut from = std::fs::File::open(log)?;
    serval_protos::private_files::ensure_private_file(&rotated)?;
    let mut to = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&rotated)?;
    std::io::copy(&mut from, &mut to)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(log)?
        .set_len(0)?;
    Ok(true)
}

/// What a running replica applies (sent in a `Reconfigure` frame when it
/// changes); scaling and resources are not part of it.
fn runtime_config(c: &BackendConfig) -> String {
    runtime_config_value(c).to_string()
}

fn runtime_config_value(c: &BackendConfig) -> serde_json::Value {
    let user_config = if c.user_config_json.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&c.user_config_json).unwrap_or(serde_json::Value::Null)
    };
    serde_json::json!({
        "max_concurrent_queries": c.max_concurrent_queries,
        "user_config": user_config,
        "max_batch_size": c.max_batch_size,
        "batch_wait_timeout": c.batch_wait_timeout,
        "graceful_shutdown_timeout_s": c.graceful_shutdown_timeout_s,
    })
}

/// The key with which this node's agent speaks to replica `replica_id`.
fn agent_key(token: &str, replica_id: &str) -> Key {
    Key::replica_agent(&Key::agents(token), replica_id)
}

/// Sends one `Reconfigure` frame over the replica's Unix socket, as its
/// agent, and waits for its answer: Ok on 200, else the replica's error
/// (its traceback).
async fn reconfigure(
    unix_path: &str,
    credential: Credential,
    config_json: String,
) -> Result<(), String> {
    let exchange = async {
        let mut stream = tokio::net::UnixStream::connect(unix_path)
            .await
            .map_err(|e| format!("cannot connect to the replica at {unix_path}: {e}"))?;
        handshake::connect(&mut stream, &credential)
            .await
            .map_err(|e| format!("replica at {unix_path}: {e}"))?;
        let (read, mut write) = stream.into_split();
        let request = Request {
            method_name: None,
            payload: Payload::Reconfigure(ReconfigureRequest { config_json }),
        };
        let bytes = frame::encode(1, &request).map_err(|e| e.to_string())?;
        write
            .write_all(&bytes)
            .await
            .map_err(|e| format!("sending the new config to the replica: {e}"))?;
        let mut reader = FrameReader::new(read);
        let body = match reader.next().await {
            Ok(Some((_, body))) => body,
            Ok(None) => {
                return Err("the replica closed the connection before answering".to_string())
            }
            Err(e) => return Err(format!("reading the replica's answer: {e}")),
        };
        let response: Response = frame::decode(&body).map_err(|e| e.to_string())?;
        if response.status == 200 {
            Ok(())
        } else {
            Err(format!(
                "reconfigure failed ({}): {}",
                response.status,
                String::from_utf8_lossy(&response.body)
            ))
        }
    };
    match tokio::time::timeout(RECONFIGURE_TIMEOUT, exchange).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "reconfigure did not finish within {RECONFIGURE_TIMEOUT:?}"
        )),
    }
}

/// Starts the replica process; also returns where its stderr starts in its
/// log (the file keeps the runs before), for `read_status`.
async fn start(
    spec: &ReplicaSpec,
    client: &Client,
    config: &BackendConfig,
) -> Result<(Child, u64), String> {
    for dir in [&spec.work_dir, &spec.cache_dir] {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let dir = &spec.work_dir;
    // Shared with the node's other replicas of this code, read-only to them.
    let code_file = spec
        .code
        .get(client, &spec.backend.code_digest)
        .await
        .map_err(|e| e.to_string())?;
    let log_path = dir.join(LOG_FILE);
    let log = serval_protos::private_files::append_private(&log_path)
        .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let mut cmd = Command::new(&spec.python);
    cmd.arg("-m")
        .arg("serval.replica")
        .arg("--replica-id")
        .arg(&spec.replica.id)
        .arg("--backend")
        .arg(&spec.backend.name)
        .arg("--code-file")
        .arg(&code_file)
        .arg("--config-json")
        .arg(start_config_json(config))
        .arg("--unix-path")
        .arg(&spec.socket_path)
        .arg("--tcp-host")
        .arg(&spec.tcp_host)
        // stdin is the lifeline: when this agent dies the pipe closes and
        // the replica exits, so no replica outlives its node agent.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .env("SERVAL_ADDRESS", &spec.control_addr)
        // Chaining: user code finds the proxy of its own node by this id.
        .env("SERVAL_NODE_ID", &spec.replica.node_id)
        .env(
            "SERVAL_TOKEN",
            serval_protos::auth::replica_token(&spec.token, &spec.replica.backend),
        )
        .env(
            handshake::DATA_KEY_ENV,
            Key::data_plane(&spec.token).to_hex(),
        )
        .env(
            handshake::AGENT_KEY_ENV,
            agent_key(&spec.token, &spec.replica.id).to_hex(),
        )
        .env("SERVAL_CACHE_DIR", &spec.cache_dir)
        .kill_on_drop(true);
    if !spec.proxy_address.is_empty() {
        cmd.env("SERVAL_PROXY_URL", format!("http://{}", spec.proxy_address));
    }
    // A GPU replica sees only the GPUs the scheduler gave it; a CPU replica
    // keeps the node's environment.
    if !spec.replica.gpu_ids.is_empty() {
        let ids: Vec<String> = spec.replica.gpu_ids.iter().map(|i| i.to_string()).collect();
        cmd.env("CUDA_VISIBLE_DEVICES", ids.join(","));
    }
    // Handles inside the replica (model composition) connect the way this
    // agent does: with TLS when it has a CA.
    if let Some(tls) = serval_protos::tls::tls() {
        cmd.envs(tls.env());
    }
    // The replica serves TLS on TCP exactly when its node has a
    // certificate: never from one the node's environment happens to hold.
    match &spec.data_tls {
        Some(identity) => {
            cmd.envs(identity.env());
        }
        None => {
            cmd.env_remove(serval_protos::tls::ENV_TLS_CERT)
                .env_remove(serval_protos::tls::ENV_TLS_KEY);
        }
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", spec.python.display()))?;
    Ok((child, log_start))
}

/// How much of a replica's stderr an error shows when it died before
/// reporting its state: its last lines, within this many bytes.
const STDERR_TAIL_LINES: usize = 20;
const STDERR_TAIL_BYTES: u64 = 4096;

/// The last lines the replica wrote to its log from byte `from` on (its
/// own run): at most STDERR_TAIL_LINES lines and STDERR_TAIL_BYTES bytes,
/// without a line cut at the front. Empty when there are none or the log
/// cannot be read.
async fn stderr_tail(log: &std::path::Path, from: u64) -> String {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let Ok(mut file) = tokio::fs::File::open(log).await else {
        return String::new();
    };
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    // A log rotated since the start holds only this run's lines.
    let from = if from > len { 0 } else { from };
    let start = from.max(len.saturating_sub(STDERR_TAIL_BYTES));
    if file.seek(std::io::SeekFrom::Start(start)).await.is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    if file
        .take(STDERR_TAIL_BYTES)
        .read_to_end(&mut bytes)
        .await
        .is_err()
    {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<&str> = text.lines().collect();
    if start > from && lines.len() > 1 {
        lines.remove(0); // begins mid-line
    }
    let lines: Vec<&str> = lines.into_iter().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(STDERR_TAIL_LINES)..].join("\n")
}

/// Reads the replica's status line. `log` and `log_start`: its stderr, for
/// the error of a replica that exits without one.
async fn read_status(
    child: &mut Child,
    log: &std::path::Path,
    log_start: u64,
) -> Result<StatusLine, String> {
    let Some(stdout) = child.stdout.take() else {
        return Err("replica stdout not captured".into());
    };
    let mut lines = BufReader::new(stdout).lines();
    match tokio::time::timeout(START_TIMEOUT, lines.next_line()).await {
        Err(_) => Err(format!("replica did not start within {START_TIMEOUT:?}")),
        Ok(Err(e)) => Err(format!("reading replica status: {e}")),
        Ok(Ok(None)) => {
            let status = child
                .wait()
                .await
                .map(|s| s.to_string())
                .unwrap_or_default();
            // Its stderr says why (an interpreter without serval, an
            // import that kills the process): its last lines end the error,
            // so `serve status` (which shows an error's last line) shows it.
            let tail = stderr_tail(log, log_start).await;
            if tail.is_empty() {
                Err(format!(
                    "replica exited before reporting its state ({status}); its stderr is empty"
                ))
            } else {
                Err(format!(
                    "replica exited before reporting its state ({status}); the end of its stderr:\n{tail}"
                ))
            }
        }
        Ok(Ok(Some(line))) => serde_json::from_str(&line)
            .map_err(|e| format!("replica status line '{line}' is not valid: {e}")),
    }
}

/// Waits for a clean exit (the caller closed the lifeline), then kills:
/// the replica first gives its requests in flight the backend's graceful
/// shutdown timeout, then needs up to `STOP_GRACE` to close.
async fn terminate(child: &mut Child, config: &watch::Receiver<WantedConfig>) {
    let timeout = config.borrow().config.graceful_shutdown_timeout_s;
    let grace = STOP_GRACE + Duration::try_from_secs_f64(timeout).unwrap_or_default();
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_over_its_bound_is_copied_once_and_truncated() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join(LOG_FILE);
        // The replica's stderr: opened for appending, kept open throughout.
        let mut stderr = serval_protos::private_files::append_private(&log).unwrap();
        stderr.write_all(&[b'a'; 100]).unwrap();
        assert!(!rotate_log(&log, 100).unwrap(), "at the bound: left alone");
        stderr.write_all(b"b").unwrap();
        assert!(rotate_log(&log, 100).unwrap());
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        let rotated = dir.path().join(ROTATED_LOG_FILE);
        assert_eq!(std::fs::read(&rotated).unwrap().len(), 101);
        // The writer goes on at the new end, not at its old offset.
        stderr.write_all(b"after").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"after");
        // A second rotation replaces the older copy: two files at most.
        stderr.write_all(&[b'c'; 200]).unwrap();
        assert!(rotate_log(&log, 100).unwrap());
        assert_eq!(std::fs::read(&rotated).unwrap().len(), 205);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&rotated).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!rotate_log(&dir.path().join("gone.log"), 1).unwrap());
    }
    use serval_protos::control::BackendConfig;

    #[test]
    fn replica_config_carries_user_config_as_json() {
        let backend = Backend {
            name: "b".into(),
            config: Some(BackendConfig {
                num_replicas: 2,
                max_concurrent_queries: 7,
                user_config_json: r#"{"threshold": 0.5}"#.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let config_json = |b: &Backend| start_config_json(&b.config.clone().unwrap_or_default());
        let v: serde_json::Value = serde_json::from_str(&config_json(&backend)).unwrap();
        assert_eq!(v["num_replicas"], 2);
        assert_eq!(v["max_concurrent_queries"], 7);
        assert_eq!(v["user_config"]["threshold"], 0.5);
        let none = Backend {
            config: Some(BackendConfig::default()),
            ..backend
        };
        let v: serde_json::Value = serde_json::from_str(&config_json(&none)).unwrap();
        assert!(v["user_config"].is_null());
    }

    #[test]
    fn scaling_is_not_a_reconfigure_but_user_config_is() {
        let base = BackendConfig {
            num_replicas: 1,
            max_concurrent_queries: 8,
            user_config_json: r#"{"v": 1}"#.into(),
            ..Default::default()
        };
        let scaled = BackendConfig {
            num_replicas: 3,
            ..base.clone()
        };
        assert_eq!(runtime_config(&base), runtime_config(&scaled));
        let changed = BackendConfig {
            user_config_json: r#"{"v": 2}"#.into(),
            ..base.clone()
        };
        assert_ne!(runtime_config(&base), runtime_config(&changed));
        let v: serde_json::Value = serde_json::from_str(&runtime_config(&changed)).unwrap();
        assert_eq!(v["user_config"]["v"], 2);
        assert!(v.get("num_replicas").is_none());
    }

    #[tokio::test]
    async fn a_replica_that_dies_before_its_status_line_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join(LOG_FILE);
        // An earlier run's lines stay out of the error.
        std::fs::write(&log, "earlier run\n").unwrap();
        let from = std::fs::metadata(&log).unwrap().len();
        let stderr = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        let mut child = Command::new("sh")
            .args([
                "-c",
                "for i in $(seq 1 30); do echo line $i >&2; done; \
                 echo \"ModuleNotFoundError: No module named 'serval'\" >&2; exit 3",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap();
        let err = read_status(&mut child, &log, from)
            .await
            .err()
            .expect("no status line must be an error");
        assert!(err.contains("exited before reporting"), "{err}");
        assert!(
            err.ends_with("ModuleNotFoundError: No module named 'serval'"),
            "{err}"
        );
        // The last 20 lines only, and nothing of the earlier run.
        assert!(err.contains("line 30") && err.contains("line 12"), "{err}");
        assert!(
            !err.contains("line 11\n") && !err.contains("earlier run"),
            "{err}"
        );
        // Bounded in bytes too, without a cut line at the front.
        std::fs::write(&log, format!("{}\nlast\n", "x".repeat(10_000))).unwrap();
        assert_eq!(stderr_tail(&log, 0).await, "last");
        // Nothing written: said so.
        let mut child = Command::new("sh")
            .args(["-c", "exit 3"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let len = std::fs::metadata(&log).unwrap().len();
        let err = read_status(&mut child, &log, len).await.err().unwrap();
        assert!(err.contains("its stderr is empty"), "{err}");
        let mut child = Command::new("sh")
            .args(["-c", "echo not-json"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let err = read_status(&mut child, &log, 0)
            .await
            .err()
            .expect("garbage must be an error");
        assert!(err.contains("not-json"), "{err}");
    }
}
