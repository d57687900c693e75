//! `serval-bench grpc-load ADDR /package.Service/Method CONCURRENCY SECONDS`:
//! a small gRPC load generator (no ghz on the machine): CONCURRENCY tasks
//! call one method over a single HTTP/2 connection, each sending an empty
//! message (a proto3 message with no fields set) and reading the whole
//! answer (one message, or a server stream's), for SECONDS. Prints one
//! JSON line: calls/s, reply messages/s, p50/p99 latency of a whole call
//! in ms, errors (a non-OK grpc-status counts as one).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// An empty gRPC message: uncompressed, length 0.
const EMPTY_MESSAGE: [u8; 5] = [0, 0, 0, 0, 0];

pub async fn run(addr: &str, method: &str, concurrency: usize, seconds: u64) {
    // TCP_NODELAY as gRPC clients set it: without it Nagle holds a call's
    // DATA frame behind its HEADERS until the peer's delayed ACK (~40 ms).
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(connector);
    let uri: hyper::Uri = match format!("http://{addr}{method}").parse() {
        Ok(uri) => uri,
        Err(e) => {
            eprintln!("bad address or method: {e}");
            std::process::exit(2)
        }
    };
    let call = |client: Client<_, Full<Bytes>>, uri: hyper::Uri| async move {
        let request = hyper::Request::post(uri)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(&EMPTY_MESSAGE)))
            .map_err(|e| e.to_string())?;
        let response = client.request(request).await.map_err(|e| e.to_string())?;
        let early = response.headers().get("grpc-status").cloned();
        let collected = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        let status = early.or_else(|| {
            collected
                .trailers()
                .and_then(|t| t.get("grpc-status").cloned())
        });
        match status.as_ref().and_then(|s| s.to_str().ok()) {
            Some("0") => Ok(messages(&collected.to_bytes())),
            other => Err(format!("grpc-status {other:?}")),
        }
    };
    // Warm-up: the connection, and the replica's first call.
    for _ in 0..20 {
        if let Err(e) = call(client.clone(), uri.clone()).await {
            eprintln!("warm-up call failed: {e}");
        }
    }
    let end = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (client, uri) = (client.clone(), uri.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let (mut errors, mut replies) = (0u64, 0u64);
                while Instant::now() < end {
                    let t0 = Instant::now();
                    match call(client.clone(), uri.clone()).await {
                        Ok(n) => {
                            latencies.push(t0.elapsed());
                            replies += n;
                        }
                        Err(_) => errors += 1,
                    }
                }
                (latencies, errors, replies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let (mut errors, mut replies) = (0, 0);
    for task in tasks {
        if let Ok((l, e, n)) = task.await {
            latencies.extend(l);
            errors += e;
            replies += n;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let pick = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "{{\"rps\": {:.1}, \"messages_per_s\": {:.1}, \"p50_ms\": {:.3}, \"p99_ms\": {:.3}, \"errors\": {}, \"requests\": {}}}",
        latencies.len() as f64 / elapsed,
        replies as f64 / elapsed,
        pick(0.5),
        pick(0.99),
        errors,
        latencies.len()
    );
}

/// The gRPC messages in a response body: each is a 5-byte prefix (flag,
/// big-endian length) and that many bytes.
fn messages(body: &[u8]) -> u64 {
    let (mut at, mut n) = (0, 0);
    while body.len() >= at + 5 {
        let len = u32::from_be_bytes([body[at + 1], body[at + 2], body[at + 3], body[at + 4]]);
        at += 5 + len as usize;
        n += 1;
    }
    n
}
