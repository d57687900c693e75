//! The node agent: registers this node with the controller, heartbeats, and
//! keeps one supervisor per replica the controller placed here, following
//! the Watch stream; a supervisor whose backend config changed without a new
//! version applies it to its running replica in place. When the cluster
//! shuts down it stops every replica and returns.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serval_protos::client::{self, Client};
use serval_protos::control::{ClusterSnapshot, HeartbeatRequest, RegisterNodeRequest};
use serval_protos::ids::ReplicaId;
use serval_protos::states::ReplicaState;

use crate::code_cache::CodeCache;
use crate::supervisor::{self, ReplicaSpec, SupervisorHandle};

const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// How long one heartbeat (and the re-registration it may lead to) may take.
const HEARTBEAT_DEADLINE: Duration = Duration::from_secs(5);
/// How long a replica that left the routing table keeps serving what
/// routers already sent it.
const DRAIN_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Connect(#[from] client::ConnectError),
    #[error("registering with the controller at {addr}: {message}")]
    Register { addr: String, message: String },
    #[error("i/o on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub control_addr: String,
    pub token: String,
    /// Holds the node id (so a restarted agent keeps it), replica sockets,
    /// backends' code by digest (`code/`), logs and the package cache
    /// (`cache/`).
    pub data_dir: PathBuf,
    /// The interpreter replicas run on (with the `serval` package installed).
    pub python: PathBuf,
    pub num_cpus: f64,
    pub num_gpus: f64,
    pub is_head: bool,
    /// This node's proxy address, empty if it runs none.
    pub http_address: String,
    /// Address replicas bind for routers on other nodes.
    pub tcp_host: String,
    /// `--tls-cert/--tls-key`: this node's replicas serve TLS on TCP.
    pub data_tls: Option<serval_protos::tls::DataPlaneIdentity>,
}

pub struct NodeAgent {
    config: AgentConfig,
    client: Client,
    /// The head addresses `client` balances over.
    known_heads: String,
    node_id: String,
    supervisors: HashMap<String, SupervisorHandle>,
    /// Replicas removed from this node, stopping after their drain grace.
    draining: Vec<tokio::task::JoinHandle<()>>,
    /// The code of the backends placed here, fetched once per node.
    code: Arc<CodeCache>,
}

impl NodeAgent {
    /// Connects and registers, retrying until `deadline` (the controller may
    /// still be starting).
    pub async fn register(mut config: AgentConfig, deadline: Duration) -> Result<Self, AgentError> {
        serval_protos::private_files::private_dir(&config.data_dir).map_err(|source| {
            AgentError::Io {
                path: config.data_dir.display().to_string(),
                source,
            }
        })?;
        // Replica sockets: in a directory only this user may enter, checked
        // now so a squatted one fails the start instead of each replica.
        let sockets = socket_dir(&config.data_dir);
        serval_protos::private_files::private_dir(&sockets).map_err(|source| AgentError::Io {
            path: sockets.display().to_string(),
            source,
        })?;
        config.tcp_host = replica_host(&config.tcp_host, &config.control_addr);
        config.http_address = proxy_address(&config.http_address, &config.tcp_host);
        let client = client::connect_lazy(&config.control_addr, &config.token)?;
        let id_file = config.data_dir.join("node_id");
        let known_id = std::fs::read_to_string(&id_file)
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let known_heads = config.control_addr.clone();
        let code = Arc::new(CodeCache::new(config.data_dir.join("code")));
        let mut agent = Self {
            code,
            config,
            client,
            known_heads,
            node_id: known_id,
            supervisors: HashMap::new(),
            draining: Vec::new(),
        };
        let until = tokio::time::Instant::now() + deadline;
        loop {
            match agent.register_once().await {
                Ok(()) => break,
                Err(e) if tokio::time::Instant::now() < until => {
                    tracing::debug!(error = %e, "controller not ready; retrying registration");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        }
        // Atomic: a crash while writing never leaves a torn id, which
        // would register this node as a new one.
        serval_protos::private_files::write_private(&id_file, agent.node_id.as_bytes()).map_err(
            |source| AgentError::Io {
                path: id_file.display().to_string(),
                source,
            },
        )?;
        tracing::info!(node_id = %agent.node_id, "node registered");
        Ok(agent)
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    async fn register_once(&mut self) -> Result<(), AgentError> {
        let reply = self
            .client
            .register_node(RegisterNodeRequest {
                node_id: self.node_id.clone(),
                hostname: hostname(),
                num_cpus: self.config.num_cpus,
                num_gpus: self.config.num_gpus,
                http_address: self.config.http_address.clone(),
                is_head: self.config.is_head,
                pid: std::process::id(),
            })
            .await
            .map_err(|s| AgentError::Register {
                addr: self.config.control_addr.clone(),
                message: s.message().into(),
            })?;
        self.node_id = reply.into_inner().node_id;
        Ok(())
    }

    /// Runs until the cluster shuts down or `stop` resolves; every replica is
    /// stopped before it returns. `stop` wins at any point, a heartbeat in
    /// flight included (one to heads that lost their quorum may not answer).
    pub async fn run(mut self, stop: impl std::future::Future<Output = ()>) {
        tokio::select! {
            _ = stop => {}
            _ = self.follow() => {}
        }
        self.stop_all().await;
    }

    /// Heartbeats and follows the Watch stream until the cluster shuts down
    /// or the stream ends.
    async fn follow(&mut self) {
        let mut watching = self.known_heads.clone();
        let mut snapshots = client::spawn_watch(watching.clone(), self.config.token.clone());
        let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
        loop {
            tokio::select! {
                _ = heartbeat.tick() => {
                    // Bounded, so a head that does not answer cannot hold
                    // back the snapshots below.
                    if tokio::time::timeout(HEARTBEAT_DEADLINE, self.heartbeat()).await.is_err() {
                        tracing::debug!("heartbeat timed out");
                    }
                }
                changed = snapshots.changed() => {
                    if changed.is_err() { return; }
                    let snapshot = snapshots.borrow_and_update().clone();
                    if let Some(snapshot) = snapshot {
                        if snapshot.shutting_down {
                            tracing::info!("cluster is shutting down");
                            return;
                        }
                        self.reconcile(&snapshot);
                        if self.known_heads != watching {
                            // Watch through every head the cluster names, so
                            // the watch outlives the head this agent was given.
                            watching = self.known_heads.clone();
                            snapshots = client::spawn_watch(
                                watching.clone(),
                                self.config.token.clone(),
                            );
                        }
                    }
                }
            }
        }
    }

    async fn heartbeat(&mut self) {
        let req = HeartbeatRequest {
            node_id: self.node_id.clone(),
        };
        if let Err(status) = self.client.heartbeat(req).await {
            match status.code() {
                // The controller forgot or buried this node: join again.
                tonic::Code::NotFound | tonic::Code::FailedPrecondition => {
                    if let Err(e) = self.register_once().await {
                        tracing::warn!(error = %e, "re-registration failed");
                    }
                }
                _ => tracing::debug!(error = %status.message(), "heartbeat failed"),
            }
        }
    }

    /// Starts supervisors for replicas placed here and stops the others.
    /// Adds the heads a snapshot names to this agent's control client, so
    /// an agent given one head fails over to the others (supervisors started
    /// from now on get the new client too).
    fn learn_heads(&mut self, snapshot: &ClusterSnapshot) {
        let mut heads: Vec<String> = client::heads(&self.config.control_addr)
            .into_iter()
            .map(String::from)
            .collect();
        for h in &snapshot.heads {
            if !h.address.is_empty() && !heads.contains(&h.address) {
                heads.push(h.address.clone());
            }
        }
        let joined = heads.join(",");
        if joined == self.known_heads {
            return;
        }
        match client::connect_lazy(&joined, &self.config.token) {
            Ok(c) => {
                tracing::info!(heads = %joined, "control client follows the cluster's heads");
                self.client = c;
                self.known_heads = joined;
            }
            Err(e) => tracing::warn!(error = %e, "cannot use the heads the cluster names"),
        }
    }

    fn reconcile(&mut self, snapshot: &ClusterSnapshot) {
        self.learn_heads(snapshot);
        let backends: HashMap<&str, _> = snapshot
            .backends
            .iter()
            .map(|b| (b.name.as_str(), b))
            .collect();
        let wanted: HashMap<&str, _> = snapshot
            .replicas
            .iter()
            .filter(|r| r.node_id == self.node_id && r.state != ReplicaState::Pending)
            .filter(|r| backends.contains_key(r.backend.as_str()))
            .map(|r| (r.id.as_str(), r))
            .collect();
        let stale: Vec<String> = self
            .supervisors
            .iter()
            .filter(|(id, h)| {
                wanted
                    .get(id.as_str())
                    .is_none_or(|r| r.backend_version != h.backend_version)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            if let Some(handle) = self.supervisors.remove(&id) {
                tracing::info!(replica = %id, "draining replica");
                // Routers drop the replica from the same snapshot; give them
                // a moment to stop sending before its process goes away.
                self.draining.push(tokio::spawn(async move {
                    tokio::time::sleep(DRAIN_GRACE).await;
                    handle.stop().await;
                }));
            }
        }
        self.draining.retain(|t| !t.is_finished());
        for (id, replica) in wanted {
            let Some(backend) = backends.get(replica.backend.as_str()) else {
                continue;
            };
            if let Some(running) = self.supervisors.get(id) {
                // Same version: a config change is applied in place.
                running.update_config(backend);
                continue;
            }
            let seq = match id.parse::<ReplicaId>() {
                Ok(id) => id.seq(),
                Err(e) => {
                    tracing::warn!(error = %e, "not starting a replica with a malformed id");
                    continue;
                }
            };
            let spec = ReplicaSpec {
                replica: replica.clone(),
                backend: (*backend).clone(),
                python: self.config.python.clone(),
                work_dir: self.config.data_dir.join("replicas").join(sanitize(id)),
                socket_path: socket_dir(&self.config.data_dir).join(format!("r{seq}.sock")),
                tcp_host: self.config.tcp_host.clone(),
                // Every head known so far, so a replica's own control
                // client (handles, batch workers) outlives its first head.
                control_addr: self.known_heads.clone(),
                token: self.config.token.clone(),
                cache_dir: self.config.data_dir.join("cache"),
                proxy_address: nearest_proxy(&self.config.http_address, snapshot),
                data_tls: self.config.data_tls.clone(),
                code: self.code.clone(),
            };
            tracing::info!(replica = %id, backend = %backend.name, "starting replica");
            self.supervisors
                .insert(id.to_string(), supervisor::spawn(spec, self.client.clone()));
        }
        // Code that no replica here runs any more leaves the node (a
        // draining replica was started, so its process no longer reads it).
        let running: HashSet<&str> = self
            .supervisors
            .values()
            .map(|h| h.code_digest.as_str())
            .collect();
        self.code.retain(&running);
    }

    async fn stop_all(&mut self) {
        let all: Vec<_> = self.supervisors.drain().map(|(_, h)| h.stop()).collect();
        futures::future::join_all(all).await;
        // Replicas still draining are stopped too before the agent exits.
        futures::future::join_all(self.draining.drain(..)).await;
    }
}

/// This node's proxy, else a head's, else any live node's; empty when the
/// cluster runs no proxy (`NoServer`). Replicas reach other APIs through it.
fn nearest_proxy(own: &str, snapshot: &ClusterSnapshot) -> String {
    if !own.is_empty() {
        return own.to_string();
    }
    snapshot
        .nodes
        .iter()
        .filter(|n| n.alive && !n.http_address.is_empty())
        .min_by_key(|n| (!n.is_head, n.id.clone()))
        .map(|n| n.http_address.clone())
        .unwrap_or_default()
}

/// The host replicas bind (and so advertise) for routers on other nodes:
/// the configured one, unless it is the unspecified address (0.0.0.0, ::),
/// which no other machine can dial; then this machine's address on its
/// route to the controller.
fn replica_host(configured: &str, control_addr: &str) -> String {
    match configured.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.is_unspecified() => {}
        _ => return configured.to_string(),
    }
    let head = control_addr.split(',').next().unwrap_or_default().trim();
    let routed = routed_ip(head);
    match routed {
        Some(ip) => {
            tracing::info!(%ip, "replicas bind this node's address on its route to the controller");
            ip.to_string()
        }
        None => {
            tracing::warn!(controller = %head, "no route to the controller found; replicas bind 127.0.0.1 (this machine only)");
            "127.0.0.1".to_string()
        }
    }
}

/// This machine's address on its route to `target` (HOST:PORT), if it has
/// one: what a process bound to the unspecified address tells others.
pub fn routed_ip(target: &str) -> Option<std::net::IpAddr> {
    use std::net::ToSocketAddrs;
    let target = target.to_socket_addrs().ok()?.next()?;
    let any = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    // Connecting a UDP socket sends nothing; it only picks the route.
    let probe = std::net::UdpSocket::bind(any).ok()?;
    probe.connect(target).ok()?;
    let local = probe.local_addr().ok()?.ip();
    (!local.is_unspecified()).then_some(local)
}

/// The address this node's proxy is announced at: the bound one, except
/// that a proxy bound to the unspecified address (0.0.0.0, ::) is announced
/// at `host`, this node's replica address, which other machines dial.
/// Announced literally, 0.0.0.0:8000 made clients on other machines (the
/// SDK waiting for every proxy to pick up a route, handles finding their
/// nearest proxy) dial themselves (tests/tests/cluster/multihost.rs).
fn proxy_address(bound: &str, host: &str) -> String {
    let Ok(addr) = bound.parse::<std::net::SocketAddr>() else {
        return bound.to_string();
    };
    if !addr.ip().is_unspecified() {
        return bound.to_string();
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => std::net::SocketAddr::new(ip, addr.port()).to_string(),
        Err(_) => format!("{host}:{}", addr.port()),
    }
}

/// Where replica sockets live: under the data dir, unless that path is too
/// long for a Unix socket address (108 bytes on Linux), then in a short
/// directory under the temp dir named after the data dir (predictable, so
/// checked by [`serval_protos::private_files::private_dir`] before use).
fn socket_dir(data_dir: &std::path::Path) -> PathBuf {
    const MAX_DIR_LEN: usize = 80;
    let dir = data_dir.join("sockets");
    if dir.as_os_str().len() <= MAX_DIR_LEN {
        return dir;
    }
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data_dir.hash(&mut h);
    std::env::temp_dir().join(format!("serval-{:016x}", h.finish()))
}

fn sanitize(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// GPUs `nvidia-smi` lists on this machine; 0 when it is missing or fails.
pub fn detect_gpus() -> f64 {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=index", "--format=csv,noheader"])
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count() as f64,
        _ => 0.0,
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn replicas_never_bind_the_unspecified_address() {
        assert_eq!(super::replica_host("10.1.2.3", "10.0.0.1:6390"), "10.1.2.3");
        assert_eq!(super::replica_host("node-a", "10.0.0.1:6390"), "node-a");
        // A head on this machine: the route to it is the loopback.
        assert_eq!(
            super::replica_host("0.0.0.0", "127.0.0.1:6390"),
            "127.0.0.1"
        );
        assert_eq!(super::replica_host("::", "[::1]:6390,h2:1"), "::1");
        // No route: this machine only, never the unspecified address.
        assert_eq!(
            super::replica_host("0.0.0.0", "not an address"),
            "127.0.0.1"
        );
    }

    #[test]
    fn a_proxy_on_the_unspecified_address_is_announced_at_the_node_address() {
        use super::proxy_address;
        assert_eq!(proxy_address("0.0.0.0:8000", "10.1.2.3"), "10.1.2.3:8000");
        assert_eq!(proxy_address("[::]:8000", "fd00::2"), "[fd00::2]:8000");
        assert_eq!(proxy_address("0.0.0.0:8000", "node-a"), "node-a:8000");
        assert_eq!(proxy_address("10.0.0.9:8000", "10.1.2.3"), "10.0.0.9:8000");
        assert_eq!(proxy_address("", "10.1.2.3"), "");
    }

    #[test]
    fn socket_paths_stay_short_enough_for_unix_sockets() {
        let short = std::path::Path::new("/tmp/sv-abc");
        assert_eq!(super::socket_dir(short), short.join("sockets"));
        let long = std::path::PathBuf::from(format!("/home/{}/.serval", "x".repeat(120)));
        let dir = super::socket_dir(&long);
        assert!(
            dir.join("r123456.sock").as_os_str().len() < 100,
            "{}",
            dir.display()
        );
        assert_eq!(
            dir,
            super::socket_dir(&long),
            "the same data dir maps to the same directory"
        );
    }

    #[test]
    fn replica_ids_become_safe_directory_names() {
        assert_eq!(super::sanitize("counter#3"), "counter_3");
        assert_eq!(super::sanitize("../etc/passwd#1"), "___etc_passwd_1");
    }
}
