//! A proxy that nobody scrapes must not keep what it records (issue 18):
//! the Prometheus exporter holds every histogram sample until something
//! drains it, and before `serval_proxy::metrics::install` ran an upkeep,
//! only a scrape did; a head grew ~40 bytes per request, without bound.
//!
//! Its own test binary because it counts the process's live heap bytes
//! with a global allocator: other tests running beside it would blur the
//! count.
// Test code: an unwrap is an assertion (clippy.toml allows it only in #[test] fns).
#![allow(clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serval_node::replica_server::EchoHandler;
use serval_node::test_util::ThreadedReplica;
use serval_protos::control::{Backend, BackendConfig, ClusterSnapshot, Endpoint};
use serval_proxy::{Proxy, ProxyConfig};

/// The system allocator, counting the bytes currently allocated.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// A global allocator is unsafe by definition; this one only forwards to
// `System` and counts.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Requests per round, and the client tasks sending them.
const ROUND: usize = 20_000;
const CLIENTS: usize = 8;

async fn round(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    url: &str,
) {
    let per_client = ROUND / CLIENTS;
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let client = client.clone();
            let uri: hyper::Uri = url.parse().unwrap();
            tokio::spawn(async move {
                for _ in 0..per_client {
                    let response = client.get(uri.clone()).await.expect("request");
                    assert_eq!(response.status(), 200);
                    response.into_body().collect().await.expect("body");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

/// What may stay live after a round, once drained: a round's 40,000
/// samples held 325 kB without the upkeep; with it, what stayed live
/// varied by -100..+30 kB over runs. The bound sits between.
const BOUND: isize = 160 * 1024;

/// Waits (30 s at most) until live bytes are within [`BOUND`] of `before`.
async fn settles_below(before: isize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let grown = live() - before;
        if grown < BOUND {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} left {grown} bytes live (bound {BOUND}): nothing drains the samples"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of the series line starting with `prefix` in `text`.
fn series(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_samples_are_drained_without_a_scrape() {
    let handle = serval_proxy::metrics::install(serval_proxy::metrics::prometheus_builder())
        .expect("install the recorder");
    let dir = tempfile::tempdir().unwrap();
    let echo = ThreadedReplica::start(dir.path(), "echo", Arc::new(EchoHandler));
    let proxy = Arc::new(Proxy::new(&ProxyConfig {
        token: serval_node::test_util::TEST_TOKEN.into(),
        metrics: Some(handle.clone()),
        ..Default::default()
    }));
    proxy.apply_snapshot(&ClusterSnapshot {
        version: 1,
        backends: vec![Backend {
            name: "echo".into(),
            config: Some(BackendConfig {
                max_concurrent_queries: 100,
                ..Default::default()
            }),
            state: "running".into(),
            ..Default::default()
        }],
        endpoints: vec![Endpoint {
            name: "echo".into(),
            route: "/echo".into(),
            methods: vec!["GET".into()],
            traffic: [("echo".to_string(), 1.0)].into(),
            ..Default::default()
        }],
        replicas: vec![echo.record("echo")],
        ..Default::default()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/echo", listener.local_addr().unwrap());
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serval_proxy::serve(listener, proxy, async move {
        let _ = stop_rx.await;
    }));
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();

    // Warm-up: connections, pools, metric handles and the histograms'
    // bucket tables exist after it; its samples are drained here by hand
    // (a scrape would do the same), so the count starts clean.
    round(&client, &url).await;
    handle.run_upkeep();
    let before = live();

    // Two samples per request (the proxy's and the router's latency).
    round(&client, &url).await;
    settles_below(before, &format!("{ROUND} requests with no scrape")).await;

    // Drained, not lost: the scrape still counts every request.
    let text = handle.render();
    let count = series(
        &text,
        r#"serval_proxy_request_duration_seconds_count{endpoint="echo"} "#,
    );
    assert_eq!(count, Some((2 * ROUND) as f64), "{text}");

    // The families still kept by the exporter (the controller's, gRPC
    // calls') hold each sample until drained: recorded here with no scrape,
    // the upkeep `install` started must drain them on its own.
    handle.run_upkeep();
    let before = live();
    const SAMPLES: usize = 100_000;
    let step = metrics::histogram!("serval_controller_reconcile_step_seconds", "step" => "test");
    for i in 0..SAMPLES {
        step.record(i as f64 * 1e-6);
    }
    settles_below(
        before,
        &format!("{SAMPLES} exporter samples with no scrape"),
    )
    .await;
    let text = handle.render();
    let count = series(
        &text,
        r#"serval_controller_reconcile_step_seconds_count{step="test"} "#,
    );
    assert_eq!(count, Some(SAMPLES as f64), "{text}");

    let _ = stop.send(());
    server.await.unwrap();
    drop(echo);
}
