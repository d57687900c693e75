//! Benchmark servers used by `bench/run` (not part of Serval itself).
//!
//! * `serval-bench hyper PORT [WORKERS]`: a bare hyper HTTP/1.1 server
//!   answering "ok" to everything: the machine's ceiling for an HTTP front door.
//! * `serval-bench native PORT REPLICAS [LIMIT] [WORKERS]`: the Serval proxy
//!   (`serval_proxy::Proxy` + `serval_proxy::serve`, metrics recorder
//!   installed as in a head) routing `/noop` to REPLICAS native Rust replicas
//!   (`serval_node::replica_server::serve`, each on its own one-thread
//!   runtime, over a Unix socket like a same-node replica) whose handler
//!   answers "ok", with `max_concurrent_queries` LIMIT (default 100). The
//!   snapshot is built by hand: no controller.
//!
//! * `serval-bench grpc-load ADDR /pkg.Service/Method CONCURRENCY SECONDS`:
//!   a gRPC load generator for a unary no-op method (see `grpc_load`).
//!
//! The servers print `ready` on stdout once listening and run until killed.
#![forbid(unsafe_code)]

mod grpc_load;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serval_node::replica_server::{bind_unix, serve as serve_replica, Handler, Reply};
use serval_protos::control::{Backend, BackendConfig, ClusterSnapshot, Endpoint, Replica};
use serval_protos::frame::{Request, Response};
use serval_protos::handshake::{Key, ReplicaKeys};
use serval_proxy::{Proxy, ProxyConfig};

fn usage() -> ! {
    eprintln!(
        "usage: serval-bench hyper PORT [WORKERS] | serval-bench native PORT REPLICAS [LIMIT] [WORKERS] | serval-bench grpc-load ADDR METHOD CONCURRENCY SECONDS"
    );
    std::process::exit(2)
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: Option<T>) -> T {
    match args.get(i) {
        Some(s) => s.parse().unwrap_or_else(|_| usage()),
        None => default.unwrap_or_else(|| usage()),
    }
}

fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The allocator of Serval's own binaries, for the proxy and the bare hyper
/// ceiling alike.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("hyper") => {
            let port: u16 = arg(&args, 2, None);
            let workers: usize = arg(&args, 3, Some(2));
            runtime(workers).block_on(bare_hyper(port));
        }
        Some("native") => {
            let port: u16 = arg(&args, 2, None);
            let replicas: usize = arg(&args, 3, Some(1));
            // max_concurrent_queries per replica: 100, the async default.
            let limit: u32 = arg(&args, 4, Some(100));
            // As `serve start` does.
            let workers: usize = arg(&args, 5, Some(serval_protos::default_worker_threads()));
            native(port, replicas, workers, limit);
        }
        Some("grpc-load") => {
            let addr: String = arg(&args, 2, None);
            let method: String = arg(&args, 3, None);
            let concurrency: usize = arg(&args, 4, Some(16));
            let seconds: u64 = arg(&args, 5, Some(5));
            // One thread: the calls share one HTTP/2 connection, whose
            // state two threads would contend for (a lock per frame).
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(grpc_load::run(&addr, &method, concurrency, seconds));
        }
        _ => usage(),
    }
}

async fn bare_hyper(port: u16) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind");
    println!("ready");
    let builder = hyper::server::conn::http1::Builder::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            service_fn(|_req| async {
                Ok::<_, Infallible>(
                    hyper::Response::builder()
                        .header("content-type", "text/plain")
                        .body(Full::new(Bytes::from_static(b"ok")))
                        .expect("a constant response is valid"),
                )
            }),
        );
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

/// The native replica's user code: "ok" for every request.
struct OkHandler;

impl Handler for OkHandler {
    fn handle(&self, _request: Request, reply: Reply) {
        reply.send(&Response {
            status: 200,
            headers: vec![("content-type".into(), "text/plain; charset=utf-8".into())],
            body: b"ok".to_vec(),
        });
    }
}

/// The cluster token of the benchmark's proxy and replicas: the data
/// plane's handshake runs as in a real cluster.
const TOKEN: &str = "serval-bench-cluster-token";

fn native(port: u16, replicas: usize, workers: usize, limit: u32) {
    let dir = std::env::temp_dir().join(format!("serval-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut pbs = Vec::new();
    for i in 0..replicas.max(1) {
        let path = dir.join(format!("r{i}.sock"));
        let unix_path = path.to_string_lossy().into_owned();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("replica runtime");
            rt.block_on(async move {
                let unix = bind_unix(&path).expect("bind replica socket");
                ready_tx.send(()).expect("the spawner waits for ready");
                let keys = ReplicaKeys {
                    data: Key::data_plane(TOKEN),
                    agent: Key::replica_agent(&Key::agents(TOKEN), &format!("r{i}")),
                };
                serve_replica(
                    Some(unix),
                    None,
                    None,
                    keys,
                    Arc::new(OkHandler),
                    std::future::pending(),
                )
                .await;
            });
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("replica ready");
        pbs.push(Replica {
            id: format!("r{i}"),
            backend: "noop".into(),
            state: serval_protos::states::ReplicaState::Running.into(),
            unix_path,
            ..Default::default()
        });
    }

    runtime(workers).block_on(async move {
        let recorder =
            serval_proxy::metrics::install(serval_proxy::metrics::prometheus_builder()).ok();
        serval_proxy::metrics::describe();
        let config = ProxyConfig {
            token: TOKEN.into(),
            metrics: recorder,
            ..Default::default()
        };
        let proxy = Arc::new(Proxy::new(&config));
        proxy.apply_snapshot(&ClusterSnapshot {
            version: 1,
            backends: vec![Backend {
                name: "noop".into(),
                config: Some(BackendConfig {
                    num_replicas: pbs.len() as u32,
                    max_concurrent_queries: limit,
                    ..Default::default()
                }),
                state: serval_protos::states::ReplicaState::Running.into(),
                ..Default::default()
            }],
            endpoints: vec![Endpoint {
                name: "noop".into(),
                route: "/noop".into(),
                methods: vec!["GET".into(), "POST".into()],
                traffic: HashMap::from([("noop".to_string(), 1.0)]),
                shadow: HashMap::new(),
                ..Default::default()
            }],
            replicas: pbs,
            ..Default::default()
        });
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind");
        println!("ready");
        serval_proxy::serve(listener, proxy, std::future::pending()).await;
    });
    let _ = std::fs::remove_dir_all(&dir);
}
