//! `serve start`: a head (controller + proxy + node agent in one process) or
//! a node joining a head (node agent, plus a proxy when the cluster's HTTP
//! location is EveryNode). `--detach` runs the same command in the
//! background and returns once it is ready.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serval_node::{AgentConfig, NodeAgent};
use serval_protos::control::HttpOptions;

use crate::cluster_file::{self, ClusterInfo};
use crate::control_listener;
use crate::ClusterArgs;

#[derive(Args, Debug, Clone)]
pub struct StartArgs {
    /// Start a head: the controller, an HTTP proxy and a node agent.
    #[arg(long)]
    head: bool,
    /// With --head: join the heads at this control address (HOST:PORT)
    /// as another raft member instead of starting a new cluster.
    #[arg(long, env = "SERVAL_JOIN", requires = "head")]
    join: Option<String>,
    /// Run in the background; print the addresses once ready.
    #[arg(long)]
    detach: bool,
    /// Host the controller's gRPC service binds (a head; default
    /// 127.0.0.1). Replicas bind it too; on a node, which runs no
    /// controller, they bind its address on the route to the head unless
    /// this is given.
    #[arg(long, env = "SERVAL_CONTROL_HOST")]
    control_host: Option<String>,
    /// Port of the controller's gRPC service.
    #[arg(long, env = "SERVAL_CONTROL_PORT", default_value_t = serval_protos::DEFAULT_CONTROL_PORT)]
    control_port: u16,
    /// With --head: the control address (HOST:PORT) other heads use to reach
    /// this one, when it is not the address bound (a proxy, NAT, or a bind
    /// on 0.0.0.0). Recorded in the raft membership when the head first
    /// starts or joins. Default: the bound control address; bound to
    /// 0.0.0.0 (or ::), this machine's address on the route to the head
    /// it joins (the first head: on its default route).
    #[arg(long, env = "SERVAL_ADVERTISE_ADDRESS", requires = "head", value_parser = parse_host_port)]
    advertise_address: Option<String>,
    /// Host the HTTP proxy binds.
    #[arg(long, env = "SERVAL_HTTP_HOST", default_value = "127.0.0.1")]
    http_host: String,
    /// Port of the HTTP proxy.
    #[arg(long, env = "SERVAL_HTTP_PORT", default_value_t = serval_protos::DEFAULT_HTTP_PORT)]
    http_port: u16,
    /// Where proxies run: HeadOnly, EveryNode or NoServer.
    #[arg(long, env = "SERVAL_HTTP_LOCATION", default_value = "HeadOnly")]
    http_location: String,
    /// Starlette middlewares every proxy runs, outermost first, as JSON:
    /// `[{"name": "CORSMiddleware", "options": {"allow_origins": ["*"]}}]`
    /// (CORSMiddleware, GZipMiddleware, TrustedHostMiddleware).
    #[arg(long, env = "SERVAL_HTTP_MIDDLEWARES", default_value = "")]
    http_middlewares: String,
    /// Request bodies larger than this get 413 from this node's proxy.
    #[arg(long, env = "SERVAL_HTTP_MAX_BODY_BYTES",
          default_value_t = serval_proxy::DEFAULT_MAX_BODY_BYTES as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    http_max_body_bytes: u64,
    /// Requests this node's proxy lets wait per backend when every replica
    /// is at `max_concurrent_queries`; beyond that, 503 with `Retry-After`.
    #[arg(long, env = "SERVAL_HTTP_QUEUE_CAPACITY",
          default_value_t = serval_proxy::ProxyConfig::default().queue_capacity)]
    http_queue_capacity: usize,
    /// Seconds a client has to send a whole request head (HTTP/1.1),
    /// counted from when the connection starts waiting for one (so it also
    /// bounds an idle keep-alive connection); the connection is closed.
    #[arg(long, env = "SERVAL_HTTP_HEADER_READ_TIMEOUT_S", value_parser = parse_positive_secs,
          default_value_t = serval_proxy::Limits::default().header_read_timeout.as_secs_f64())]
    http_header_read_timeout_s: f64,
    /// Seconds a connection with no request in flight may move no byte
    /// before it is closed (HTTP/1.1 and HTTP/2).
    #[arg(long, env = "SERVAL_HTTP_KEEP_ALIVE_TIMEOUT_S", value_parser = parse_positive_secs,
          default_value_t = serval_proxy::Limits::default().keep_alive_timeout.as_secs_f64())]
    http_keep_alive_timeout_s: f64,
    /// Seconds a client has to send a whole request body; else 408 and
    /// `Connection: close`.
    #[arg(long, env = "SERVAL_HTTP_BODY_READ_TIMEOUT_S", value_parser = parse_positive_secs,
          default_value_t = serval_proxy::Limits::default().body_read_timeout.as_secs_f64())]
    http_body_read_timeout_s: f64,
    /// Open client connections this node's proxy accepts; a new one beyond
    /// it gets 503 with `Retry-After` and is closed.
    #[arg(long, env = "SERVAL_HTTP_MAX_CONNECTIONS",
          default_value_t = serval_proxy::Limits::default().max_connections,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    http_max_connections: usize,
    /// Bytes of request bodies this node's proxy buffers at once, across
    /// all requests; beyond it 503 with `Retry-After`. At least
    /// --http-max-body-bytes.
    #[arg(long, env = "SERVAL_HTTP_MAX_BUFFERED_BODY_BYTES",
          default_value_t = serval_proxy::Limits::default().max_buffered_body_bytes as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    http_max_buffered_body_bytes: u64,
    /// HTTP/2: streams one client connection may have open at once.
    #[arg(long, env = "SERVAL_HTTP2_MAX_CONCURRENT_STREAMS",
          default_value_t = serval_proxy::Limits::default().http2_max_concurrent_streams,
          value_parser = clap::value_parser!(u32).range(1..))]
    http2_max_concurrent_streams: u32,
    /// HTTP/2: bytes of one request's (decoded) header list.
    #[arg(long, env = "SERVAL_HTTP2_MAX_HEADER_LIST_SIZE",
          default_value_t = serval_proxy::Limits::default().http2_max_header_list_size,
          value_parser = clap::value_parser!(u32).range(1..))]
    http2_max_header_list_size: u32,
    /// HTTP/2: seconds between keep-alive pings to each client connection.
    #[arg(long, env = "SERVAL_HTTP2_KEEP_ALIVE_INTERVAL_S", value_parser = parse_positive_secs,
          default_value_t = serval_proxy::Limits::default().http2_keep_alive_interval.as_secs_f64())]
    http2_keep_alive_interval_s: f64,
    /// HTTP/2: seconds a ping may go unanswered before the connection is
    /// closed.
    #[arg(long, env = "SERVAL_HTTP2_KEEP_ALIVE_TIMEOUT_S", value_parser = parse_positive_secs,
          default_value_t = serval_proxy::Limits::default().http2_keep_alive_timeout.as_secs_f64())]
    http2_keep_alive_timeout_s: f64,
    /// HTTP/2: streams a client may reset before the proxy handled them,
    /// pending at once ("rapid reset"); beyond it the connection is closed.
    #[arg(long, env = "SERVAL_HTTP2_MAX_PENDING_RESET_STREAMS",
          default_value_t = serval_proxy::Limits::default().http2_max_pending_reset_streams,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    http2_max_pending_reset_streams: usize,
    /// CPUs this node offers to replicas (default: the machine's count),
    /// from 0 to 1024.
    #[arg(long, env = "SERVAL_NUM_CPUS")]
    num_cpus: Option<f64>,
    /// GPUs this node offers to replicas (default: those nvidia-smi lists),
    /// from 0 to 64.
    #[arg(long, env = "SERVAL_NUM_GPUS")]
    num_gpus: Option<f64>,
    /// Seconds without a heartbeat after which the head declares a node dead
    /// and places its replicas elsewhere.
    #[arg(long, env = "SERVAL_NODE_TIMEOUT_S", default_value_t = serval_controller::DEFAULT_NODE_TIMEOUT.as_secs_f64(),
          value_parser = parse_positive_secs)]
    node_timeout_s: f64,
    /// Bytes that blobs nothing deployed names (uploads not yet deployed,
    /// code a replica stored and never used) may hold on a head; a new
    /// upload beyond it is refused until they are named or collected.
    #[arg(long, env = "SERVAL_MAX_UNNAMED_BLOB_BYTES",
          default_value_t = serval_controller::DEFAULT_MAX_UNNAMED_BLOB_BYTES,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_unnamed_blob_bytes: u64,
    /// Python interpreter for replicas, with the `serval` package installed.
    /// Run from the SDK's `serve` console script, the default is that
    /// script's own interpreter (it sets SERVAL_PYTHON); from the binary,
    /// `python3` on PATH.
    #[arg(long, env = "SERVAL_PYTHON", default_value = "python3")]
    python: PathBuf,
    /// Also serve this process's Prometheus metrics on this port (any path,
    /// `/-/metrics` included). Proxies always serve them at `/-/metrics`;
    /// this is how a node running no proxy exposes its own. Default: off.
    #[arg(long, env = "SERVAL_METRICS_PORT",
          value_parser = clap::value_parser!(u16).range(1..))]
    metrics_port: Option<u16>,
    /// Host the `--metrics-port` listener binds.
    #[arg(long, env = "SERVAL_METRICS_HOST", default_value = "127.0.0.1")]
    metrics_host: String,
    /// Tokio worker threads of this process. Default: half the machine's
    /// cores, at least 1 (`serval_protos::default_worker_threads`).
    #[arg(long, env = "SERVAL_WORKERS")]
    workers: Option<usize>,
    /// This node's certificate chain (PEM): its replicas serve their TCP
    /// data plane (frames, and a gRPC API's server) over TLS only, and a
    /// head also serves its control listener (clients and other heads)
    /// with it. Needs --tls-key and --tls-ca (routers and agents verify
    /// replicas and heads with it). Unix sockets stay plaintext (local).
    #[arg(long, env = "SERVAL_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "SERVAL_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

pub fn run(
    cluster: ClusterArgs,
    args: StartArgs,
    argv: &[String],
    relaunch: &[String],
) -> anyhow::Result<()> {
    let location = normalise_location(&args.http_location)?;
    if args.http_max_buffered_body_bytes < args.http_max_body_bytes {
        bail!(
            "--http-max-buffered-body-bytes ({}) must be at least --http-max-body-bytes ({})",
            args.http_max_buffered_body_bytes,
            args.http_max_body_bytes
        );
    }
    serval_protos::middleware::validate(&args.http_middlewares)
        .map_err(|e| anyhow::anyhow!("invalid --http-middlewares: {e}"))?;
    check_resources(&args)?;
    if !args.head && cluster.address.is_none() {
        bail!("`serve start` needs --head to start a head, or --address HOST:PORT to join one");
    }
    // A bad token fails here, before anything starts or detaches.
    cluster.given_token()?;
    let data_dir = cluster_file::absolute(&cluster.data_dir);
    cluster_file::create_data_dir(&data_dir)?;
    if args.detach {
        return detach(&data_dir, argv, relaunch);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(
            args.workers
                .unwrap_or_else(serval_protos::default_worker_threads)
                .max(1),
        )
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    raise_open_file_limit();
    let result = runtime.block_on(async move {
        if args.head {
            run_head(cluster, args, data_dir, location).await
        } else {
            run_node(cluster, args, data_dir).await
        }
    });
    // Dropping a runtime waits for its blocking tasks without end; a
    // stopping process gives them a moment, no more.
    runtime.shutdown_timeout(Duration::from_secs(2));
    result
}

/// Raises this process's open-file soft limit to its hard limit: every
/// client connection, replica connection and socket is a file, and the
/// usual soft limit (1024) is far below `--http-max-connections`.
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let before = limit.current;
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(error = %e, ?before, "cannot raise the open-file limit");
            return;
        }
    }
    let fmt = |v: Option<u64>| v.map_or("unlimited".to_owned(), |n| n.to_string());
    tracing::info!(open_files = %fmt(limit.current), "open-file limit");
}

/// The proxy's bounds on clients from the `--http-*` flags (also those of
/// the `--metrics-port` listener).
fn proxy_limits(args: &StartArgs) -> serval_proxy::Limits {
    serval_proxy::Limits {
        header_read_timeout: Duration::from_secs_f64(args.http_header_read_timeout_s),
        keep_alive_timeout: Duration::from_secs_f64(args.http_keep_alive_timeout_s),
        body_read_timeout: Duration::from_secs_f64(args.http_body_read_timeout_s),
        max_connections: args.http_max_connections,
        max_buffered_body_bytes: usize::try_from(args.http_max_buffered_body_bytes)
            .unwrap_or(usize::MAX),
        http2_max_concurrent_streams: args.http2_max_concurrent_streams,
        http2_max_header_list_size: args.http2_max_header_list_size,
        http2_keep_alive_interval: Duration::from_secs_f64(args.http2_keep_alive_interval_s),
        http2_keep_alive_timeout: Duration::from_secs_f64(args.http2_keep_alive_timeout_s),
        http2_max_pending_reset_streams: args.http2_max_pending_reset_streams,
    }
}

/// `SERVAL_DEBUG` (1, true, yes, on), as the Python replicas read it:
/// error bodies then carry internal detail.
fn debug_errors() -> bool {
    std::env::var("SERVAL_DEBUG").is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

/// `--num-cpus`/`--num-gpus` within the controller's caps
/// ([`serval_controller::limits`]), which refuses a node registering more.
fn check_resources(args: &StartArgs) -> anyhow::Result<()> {
    use serval_controller::limits::{MAX_NODE_CPUS, MAX_NODE_GPUS};
    for (flag, value, cap) in [
        ("--num-cpus", args.num_cpus, MAX_NODE_CPUS),
        ("--num-gpus", args.num_gpus, MAX_NODE_GPUS),
    ] {
        if let Some(v) = value {
            if !(v.is_finite() && (0.0..=cap).contains(&v)) {
                bail!("invalid {flag} {v}: a node offers from 0 to {cap}");
            }
        }
    }
    Ok(())
}

fn parse_positive_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("'{s}' is not a positive number of seconds")),
    }
}

fn parse_host_port(s: &str) -> Result<String, String> {
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(s.to_string())
        }
        _ => Err(format!("'{s}' is not HOST:PORT")),
    }
}

fn normalise_location(s: &str) -> anyhow::Result<String> {
    match s.to_ascii_lowercase().as_str() {
        "headonly" => Ok("HeadOnly".into()),
        "everynode" => Ok("EveryNode".into()),
        "noserver" | "none" | "" => Ok("NoServer".into()),
        _ => bail!("invalid --http-location '{s}': use HeadOnly, EveryNode or NoServer"),
    }
}

/// Re-runs this command without `--detach`, logging to the data dir, and
/// waits until the new head has written its cluster file.
fn detach(data_dir: &std::path::Path, argv: &[String], relaunch: &[String]) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let logs = data_dir.join("logs");
    serval_protos::private_files::private_dir(&logs)
        .with_context(|| format!("creating {}", logs.display()))?;
    let log_path = logs.join("serve.log");
    let log = serval_protos::private_files::append_private(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let Some((program, prefix)) = relaunch.split_first() else {
        bail!("no command to relaunch serve with")
    };
    let args: Vec<String> = argv
        .iter()
        .skip(1)
        .filter(|a| *a != "--detach")
        .cloned()
        .collect();
    cluster_file::remove(data_dir);
    let mut child = std::process::Command::new(program)
        .args(prefix)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        // Its own process group: the terminal's Ctrl-C does not reach it.
        .process_group(0)
        .spawn()
        .context("starting the background process")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(info) = cluster_file::read(data_dir) {
            if info.pid == child.id() {
                print_ready(&info, data_dir);
                println!("logs: {}", log_path.display());
                return Ok(());
            }
        }
        if let Some(status) = child.try_wait()? {
            let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "serve exited during start-up ({status}):\n{}",
                tail.join("\n")
            );
        }
        if Instant::now() > deadline {
            bail!(
                "serve did not become ready within 120 s; see {}",
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn print_ready(info: &ClusterInfo, data_dir: &std::path::Path) {
    println!("controller listening on {}", info.control_address);
    if info.http_address.is_empty() {
        println!("http proxy: none (NoServer)");
    } else {
        println!("http proxy listening on {}", info.http_address);
    }
    println!("data dir: {}", data_dir.display());
    println!("pid: {}", info.pid);
}

/// How long a starting agent retries registering with its controller.
const REGISTER_DEADLINE: Duration = Duration::from_secs(30);

/// The data plane's TLS identity of this node, from `--tls-cert/--tls-key`
/// (read now, so a wrong file fails the start); the CA must be set too.
fn data_tls(args: &StartArgs) -> anyhow::Result<Option<serval_protos::tls::DataPlaneIdentity>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    if serval_protos::tls::tls().is_none() {
        bail!("--tls-cert needs --tls-ca (SERVAL_TLS_CA) too: routers and node agents verify replicas and heads with it, and this node's own connections to the cluster use it");
    }
    Ok(Some(serval_protos::tls::DataPlaneIdentity::load(
        cert, key,
    )?))
}

fn agent_config(
    args: &StartArgs,
    control_addr: &str,
    token: &str,
    data_dir: &std::path::Path,
    is_head: bool,
    http_address: &str,
    data_tls: Option<serval_protos::tls::DataPlaneIdentity>,
) -> AgentConfig {
    AgentConfig {
        control_addr: control_addr.to_string(),
        token: token.to_string(),
        data_dir: data_dir.to_path_buf(),
        python: args.python.clone(),
        // What the machine has, within the controller's caps.
        num_cpus: args
            .num_cpus
            .unwrap_or_else(|| default_cpus().min(serval_controller::limits::MAX_NODE_CPUS)),
        num_gpus: args.num_gpus.unwrap_or_else(|| {
            serval_node::agent::detect_gpus().min(serval_controller::limits::MAX_NODE_GPUS)
        }),
        is_head,
        http_address: http_address.to_string(),
        tcp_host: replica_bind_host(args, is_head),
        data_tls,
    }
}

/// The control address other heads and nodes dial: `--advertise-address`,
/// else the bound one, except that a controller bound to every interface
/// (0.0.0.0, ::) is announced at this machine's address on the route to
/// the head it joins (the first head: on its default route). Announced
/// literally, 0.0.0.0:6390 made the head being joined dial itself as the
/// new member, and its raft core panicked (tests/tests/cluster/multihost.rs).
fn advertised_address(args: &StartArgs, bound: &str) -> anyhow::Result<String> {
    if let Some(addr) = &args.advertise_address {
        return Ok(addr.clone());
    }
    let Ok(addr) = bound.parse::<std::net::SocketAddr>() else {
        return Ok(bound.to_string());
    };
    if !addr.ip().is_unspecified() {
        return Ok(bound.to_string());
    }
    // A documentation address (nothing is sent): the default route.
    let default_route = if addr.is_ipv4() {
        "192.0.2.1:9"
    } else {
        "[2001:db8::1]:9"
    };
    let target = match &args.join {
        Some(join) => serval_protos::client::heads(join)
            .first()
            .map(|h| h.to_string())
            .unwrap_or_default(),
        None => default_route.to_string(),
    };
    match serval_node::agent::routed_ip(&target) {
        Some(ip) => {
            let advertised = std::net::SocketAddr::new(ip, addr.port()).to_string();
            tracing::info!(%advertised, "the controller binds every interface; other heads and nodes are told this address");
            Ok(advertised)
        }
        None => bail!(
            "--control-host {} binds every interface, and with no route to {target} this head cannot tell \
             which of its addresses others reach: give --advertise-address HOST:PORT",
            addr.ip()
        ),
    }
}

/// The host a head's controller binds.
fn control_host(args: &StartArgs) -> &str {
    args.control_host.as_deref().unwrap_or("127.0.0.1")
}

/// The host this node's replicas bind: the control host, except that a head
/// bound to the unspecified address with an `--advertise-address` uses the
/// advertised host, and a node without `--control-host` the unspecified
/// address, for which the agent finds its address on the route to the
/// head (127.0.0.1 for a head on this machine). Before, such a node bound
/// its replicas to 127.0.0.1, where routers on other machines cannot reach
/// them (tests/tests/cluster/multihost.rs).
fn replica_bind_host(args: &StartArgs, is_head: bool) -> String {
    if !is_head && args.control_host.is_none() {
        return "0.0.0.0".into();
    }
    let host = control_host(args).to_string();
    let unspecified = host
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_unspecified());
    match &args.advertise_address {
        Some(addr) if unspecified => addr
            .rsplit_once(':')
            .map(|(host, _)| {
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string()
            })
            .unwrap_or(host),
        _ => host,
    }
}

fn default_cpus() -> f64 {
    std::thread::available_parallelism()
        .map(|n| n.get() as f64)
        .unwrap_or(1.0)
}

/// Resolves when the process gets SIGINT or SIGTERM.
async fn signalled() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn bind_http(host: &str, port: u16) -> anyhow::Result<(tokio::net::TcpListener, String)> {
    let listener = tokio::net::TcpListener::bind((host, port))
        .await
        .with_context(|| format!("binding the HTTP proxy on {host}:{port}"))?;
    let addr = listener.local_addr()?.to_string();
    Ok((listener, addr))
}

fn start_proxy(
    listener: tokio::net::TcpListener,
    control_addr: String,
    token: String,
    metrics: Metrics,
    args: &StartArgs,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let config = serval_proxy::ProxyConfig {
        control_addr,
        token,
        metrics: metrics.handle,
        dashboard: Some(metrics.dashboard),
        readiness: metrics.readiness,
        max_body_bytes: usize::try_from(args.http_max_body_bytes).unwrap_or(usize::MAX),
        queue_capacity: args.http_queue_capacity,
        limits: proxy_limits(args),
        debug_errors: debug_errors(),
        ..serval_proxy::ProxyConfig::default()
    };
    tokio::spawn(async move {
        let mut stop = stop;
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = serval_proxy::run(config, listener, shutdown).await {
            tracing::error!(error = %e, "http proxy stopped");
        }
    })
}

/// Binds and starts this process's HTTP proxy when `run`; returns its task
/// and address (empty when none runs).
async fn proxy_if(
    run: bool,
    args: &StartArgs,
    control_addr: &str,
    token: &str,
    metrics: Metrics,
    stop_rx: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(Option<tokio::task::JoinHandle<()>>, String)> {
    if !run {
        return Ok((None, String::new()));
    }
    let (listener, addr) = bind_http(&args.http_host, args.http_port).await?;
    let task = start_proxy(
        listener,
        control_addr.to_string(),
        token.to_string(),
        metrics,
        args,
        stop_rx,
    );
    Ok((Some(task), addr))
}

/// This process's metrics recorder, the slot through which its
/// `--metrics-port` listener reaches the proxy's dashboard, and its
/// readiness check (`/-/readyz` on both listeners; a head sets it).
struct Metrics {
    handle: Option<serval_proxy::metrics::MetricsHandle>,
    dashboard: serval_proxy::DashboardSlot,
    readiness: serval_proxy::ReadinessSlot,
}

/// Installs this process's metrics recorder (the handle serves the proxy's
/// `/-/metrics`) and, with `--metrics-port`, an HTTP listener serving the
/// same text on every path but `/-/dashboard` (the proxy's dashboard, once
/// it runs). Runs inside the tokio runtime.
fn install_metrics(args: &StartArgs) -> anyhow::Result<Metrics> {
    let dashboard = serval_proxy::DashboardSlot::default();
    let readiness = serval_proxy::ReadinessSlot::default();
    let handle = serval_proxy::metrics::install(serval_proxy::metrics::prometheus_builder())
        .context("installing the metrics recorder")?;
    if let Some(port) = args.metrics_port {
        let host = args.metrics_host.as_str();
        let listener = std::net::TcpListener::bind((host, port))
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(tokio::net::TcpListener::from_std)
            .with_context(|| format!("binding --metrics-port on {host}:{port}"))?;
        let addr = listener.local_addr()?;
        // Our own server, under the proxy's connection limits; it serves
        // until the process ends.
        tokio::spawn(serval_proxy::http::serve_metrics(
            listener,
            handle.clone(),
            dashboard.clone(),
            readiness.clone(),
            proxy_limits(args),
            std::future::pending(),
        ));
        println!("metrics listening on http://{addr}/-/metrics");
    }
    serval_proxy::metrics::describe();
    serval_node::metrics::describe();
    serval_controller::describe_metrics();
    Ok(Metrics {
        handle: Some(handle),
        dashboard,
        readiness,
    })
}

async fn run_head(
    cluster: ClusterArgs,
    mut args: StartArgs,
    data_dir: PathBuf,
    location: String,
) -> anyhow::Result<()> {
    let data_tls = data_tls(&args)?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(serval_protos::tls::server_config(cert, key)?),
        _ => None,
    };
    let metrics = install_metrics(&args)?;
    // A given token (a joining head) is kept in the data dir too, so
    // commands on this machine find it as they do on the first head.
    let given = cluster.given_token()?;
    if args.join.is_some() && given.is_none() {
        bail!("--join needs the cluster's token: --token-file PATH (SERVAL_TOKEN_FILE) with a copy of the first head's <data-dir>/token");
    }
    let token = match given {
        Some(t) => {
            cluster_file::store_token(&data_dir, &t)?;
            t
        }
        None => cluster_file::load_or_create_token(&data_dir)?,
    };
    let control_listener = tokio::net::TcpListener::bind((control_host(&args), args.control_port))
        .await
        .with_context(|| {
            format!(
                "binding the controller on {}:{}",
                control_host(&args),
                args.control_port
            )
        })?;
    let control_addr = control_listener.local_addr()?.to_string();
    // What peers dial (raft, forwarded writes); local clients use control_addr.
    let advertised = advertised_address(&args, &control_addr)?;
    // Replicas bind the advertised host when the controller binds every
    // interface (replica_bind_host).
    args.advertise_address = Some(advertised.clone());

    // A head is ready (`/-/readyz`) only while it can commit writes.
    let write_check = serval_controller::WriteCheck::default();
    let check = write_check.clone();
    metrics.readiness.set(Box::new(move || check.check()));
    let config = serval_controller::ControllerConfig {
        raft_dir: data_dir.join("raft"),
        raft_id: cluster_file::load_or_create_raft_id(&data_dir)?,
        advertised_address: advertised,
        token: token.clone(),
        join: args.join.clone(),
        http_options: HttpOptions {
            location: location.clone(),
            host: args.http_host.clone(),
            port: args.http_port as u32,
            middlewares_json: args.http_middlewares.clone(),
        },
        tls,
        node_timeout: Duration::from_secs_f64(args.node_timeout_s),
        write_check,
        unnamed_blob_limit: serval_controller::UnnamedBlobLimit {
            bytes: args.max_unnamed_blob_bytes,
            ..Default::default()
        },
    };
    let controller =
        serval_controller::start(config, control_listener::incoming(control_listener)).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    let (proxy, http_addr) = proxy_if(
        location != "NoServer",
        &args,
        &control_addr,
        &token,
        metrics,
        stop_rx.clone(),
    )
    .await?;

    let agent = NodeAgent::register(
        agent_config(
            &args,
            &control_addr,
            &token,
            &data_dir,
            true,
            &http_addr,
            data_tls,
        ),
        REGISTER_DEADLINE,
    )
    .await?;
    let info = ClusterInfo {
        control_address: control_addr,
        http_address: http_addr,
        pid: std::process::id(),
    };
    cluster_file::write(&data_dir, &info)?;
    print_ready(&info, &data_dir);
    println!("node id: {}", agent.node_id());

    // A head whose raft storage failed (a full disk) cannot commit: its
    // controller stops on that, and so does the head, exiting non-zero so
    // its supervisor restarts it, rather than serving reads and refusing
    // every write.
    let mut stopped = stop_rx.clone();
    let controller = controller.serve(async move {
        let _ = stopped.wait_for(|s| *s).await;
    });
    tokio::pin!(controller);
    let raft_failure = tokio::select! {
        _ = agent.run(signalled()) => None,
        result = &mut controller => Some(result),
    };
    tracing::info!("stopping");
    cluster_file::remove(&data_dir);
    let _ = stop_tx.send(true);
    if let Some(p) = proxy {
        let _ = tokio::time::timeout(Duration::from_secs(5), p).await;
    }
    // Its own waits are bounded.
    let result = match raft_failure {
        Some(result) => result,
        None => controller.await,
    };
    Ok(result?)
}

async fn run_node(cluster: ClusterArgs, args: StartArgs, data_dir: PathBuf) -> anyhow::Result<()> {
    let data_tls = data_tls(&args)?;
    let metrics = install_metrics(&args)?;
    let control_addr = cluster.address.clone().unwrap_or_default();
    let token = cluster.token(&data_dir)?;
    let mut client = serval_protos::client::connect(&control_addr, &token).await?;
    let snapshot = client
        .get_snapshot(serval_protos::control::WatchRequest {
            include_code: false,
        })
        .await
        .map_err(|s| anyhow::anyhow!("asking the head at {control_addr}: {}", s.message()))?
        .into_inner();
    let every_node = snapshot
        .http_options
        .as_ref()
        .is_some_and(|o| o.location == "EveryNode");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (proxy, http_addr) =
        proxy_if(every_node, &args, &control_addr, &token, metrics, stop_rx).await?;
    let agent = NodeAgent::register(
        agent_config(
            &args,
            &control_addr,
            &token,
            &data_dir,
            false,
            &http_addr,
            data_tls,
        ),
        REGISTER_DEADLINE,
    )
    .await?;
    println!("node {} joined the head at {control_addr}", agent.node_id());
    if !http_addr.is_empty() {
        println!("http proxy listening on {http_addr}");
    }
    agent.run(signalled()).await;
    let _ = stop_tx.send(true);
    if let Some(p) = proxy {
        let _ = tokio::time::timeout(Duration::from_secs(5), p).await;
    }
    Ok(())
}
