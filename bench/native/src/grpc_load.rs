//! `serval-bench grpc-load ADDR /package.Service/Method CONCURRENCY SECONDS`:
//! a small gRPC load generator (no ghz on the machine): CONCURRENCY tasks
//! call one method over a single HTTP/2 connection, each sending an empty
//! message (a proto3 message with no fields set) and reading the whole
//! answer (one message, or a server stream's), for SECONDS. Prints one
//! JSON line: calls/s, reply messages/s, p50/p99 latency of a whole call
//! in ms, errors (a non-OK grpc-status counts as one).

use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;

/// An empty gRPC message: uncompressed, length 0.
const EMPTY_MESSAGE: [u8; 5] = [0, 0, 0, 0, 0];

/// One call on the connection: the request's HEADERS and its one DATA
/// frame, then the whole answer (messages, then trailers). The h2 crate
/// itself, not hyper's client: hyper's spawns a task and crosses a channel
/// per request, which on this machine's two cores took CPU the server
/// under test needed (like wrk for HTTP, the load should cost little).
async fn call(mut h2: SendRequest<Bytes>, uri: hyper::Uri) -> Result<u64, String> {
    let request = hyper::Request::post(uri)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .map_err(|e| e.to_string())?;
    h2 = h2.ready().await.map_err(|e| e.to_string())?;
    let (response, mut body) = h2.send_request(request, false).map_err(|e| e.to_string())?;
    body.send_data(Bytes::from_static(&EMPTY_MESSAGE), true)
        .map_err(|e| e.to_string())?;
    let response = response.await.map_err(|e| e.to_string())?;
    let early = response.headers().get("grpc-status").cloned();
    let mut body = response.into_body();
    let mut replies = Messages::default();
    while let Some(data) = body.data().await {
        let data = data.map_err(|e| e.to_string())?;
        // Credit the bytes back, or a long stream stalls at the window.
        let _ = body.flow_control().release_capacity(data.len());
        replies.read(&data);
    }
    let trailers = body.trailers().await.map_err(|e| e.to_string())?;
    let status = early.or_else(|| trailers.and_then(|t| t.get("grpc-status").cloned()));
    match status.as_ref().and_then(|s| s.to_str().ok()) {
        Some("0") if replies.whole() => Ok(replies.count),
        Some("0") => Err("the body ended inside a message".to_string()),
        other => Err(format!("grpc-status {other:?}")),
    }
}

/// Counts the gRPC messages of a response body as its DATA frames come
/// (each message a 5-byte prefix, flag and big-endian length, then that
/// many bytes), keeping no body bytes: a message may span frames.
#[derive(Default)]
struct Messages {
    count: u64,
    /// The prefix bytes of the next message seen so far.
    prefix: Vec<u8>,
    /// Bytes of the current message's payload still to skip.
    skip: usize,
}

impl Messages {
    fn read(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.prefix.len()).min(data.len());
            self.prefix.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.prefix.len() == 5 {
                let p = &self.prefix;
                self.skip = u32::from_be_bytes([p[1], p[2], p[3], p[4]]) as usize;
                self.prefix.clear();
                self.count += 1;
            }
        }
    }

    /// No message is cut short.
    fn whole(&self) -> bool {
        self.skip == 0 && self.prefix.is_empty()
    }
}

pub async fn run(addr: &str, method: &str, concurrency: usize, seconds: u64) {
    let uri: hyper::Uri = match format!("http://{addr}{method}").parse() {
        Ok(uri) => uri,
        Err(e) => {
            eprintln!("bad address or method: {e}");
            std::process::exit(2)
        }
    };
    let tcp = match tokio::net::TcpStream::connect(addr).await {
        Ok(tcp) => tcp,
        Err(e) => {
            eprintln!("cannot connect to {addr}: {e}");
            std::process::exit(2)
        }
    };
    // TCP_NODELAY as gRPC clients set it: without it Nagle holds a call's
    // DATA frame behind its HEADERS until the peer's delayed ACK (~40 ms).
    let _ = tcp.set_nodelay(true);
    let client = match h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(1 << 24)
        .handshake::<_, Bytes>(tcp)
        .await
    {
        Ok((client, connection)) => {
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    eprintln!("the connection ended: {e}");
                }
            });
            client
        }
        Err(e) => {
            eprintln!("HTTP/2 handshake with {addr} failed: {e}");
            std::process::exit(2)
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
