//! The proxy's bounds on clients (issue 19), over real sockets with raw
//! HTTP/1.1 written by hand: slow heads, idle keep-alive, slow bodies, the
//! connection cap and the body budget. Each limit is set short or small.
// Test code: an unwrap is an assertion (clippy.toml allows it only in #[test] fns).
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serval_node::replica_server::EchoHandler;
use serval_node::test_util::{HoldHandler, ThreadedReplica};
use serval_protos::control::{Backend, BackendConfig, ClusterSnapshot, Endpoint};
use serval_protos::frame::Response;
use serval_proxy::metrics::MetricsHandle;
use serval_proxy::{Limits, Proxy, ProxyConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Generous: how long a limit of about a second may take to act on a busy
/// machine. Only ever waited for when the limit does not act.
const ACT_WITHIN: Duration = Duration::from_secs(15);

/// One recorder per test binary (the global one can be installed once).
fn recorder() -> MetricsHandle {
    static HANDLE: OnceLock<MetricsHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            serval_proxy::metrics::install(serval_proxy::metrics::prometheus_builder()).unwrap()
        })
        .clone()
}

/// A proxy with `limits` over an echo replica (`/echo`) and a holding one
/// (`/held`), serving on a free port until dropped.
struct Served {
    addr: SocketAddr,
    hold: Arc<HoldHandler>,
    _replicas: (ThreadedReplica, ThreadedReplica),
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn serve(max_body_bytes: usize, limits: Limits) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let echo = ThreadedReplica::start(dir.path(), "echo", Arc::new(EchoHandler));
    let hold = Arc::new(HoldHandler::default());
    let held = ThreadedReplica::start(dir.path(), "held", hold.clone());
    let config = ProxyConfig {
        token: serval_node::test_util::TEST_TOKEN.into(),
        max_body_bytes,
        limits,
        metrics: Some(recorder()),
        ..Default::default()
    };
    config.validate().unwrap();
    let proxy = Arc::new(Proxy::new(&config));
    let backend = |name: &str| Backend {
        name: name.into(),
        config: Some(BackendConfig {
            max_concurrent_queries: 8,
            ..Default::default()
        }),
        state: "running".into(),
        ..Default::default()
    };
    let endpoint = |name: &str| Endpoint {
        name: name.into(),
        route: format!("/{name}"),
        methods: vec![],
        traffic: HashMap::from([(name.to_string(), 1.0)]),
        ..Default::default()
    };
    proxy.apply_snapshot(&ClusterSnapshot {
        version: 1,
        backends: vec![backend("echo"), backend("held")],
        endpoints: vec![endpoint("echo"), endpoint("held")],
        replicas: vec![echo.record("echo"), held.record("held")],
        ..Default::default()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serval_proxy::serve(listener, proxy, async move {
        let _ = stop_rx.await;
    }));
    Served {
        addr,
        hold,
        _replicas: (echo, held),
        _dir: dir,
        _stop: stop,
    }
}

/// A response read off a raw connection: status, lower-cased head, body.
#[derive(Debug)]
struct Raw {
    status: u16,
    head: String,
    body: String,
}

/// Reads one response (Content-Length framed); `None` when the connection
/// closes first.
async fn read_response(conn: &mut TcpStream) -> Option<Raw> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap_or(0));
    while buf.len() < head_end + len {
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = String::from_utf8_lossy(&buf[head_end..head_end + len]).into_owned();
    Some(Raw { status, head, body })
}

async fn request(addr: SocketAddr, raw: &[u8]) -> Option<Raw> {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_all(raw).await.ok()?;
    read_response(&mut conn).await
}

fn post(path: &str, body: &[u8]) -> Vec<u8> {
    let mut raw = format!(
        "POST {path} HTTP/1.1\r\nhost: t\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(body);
    raw
}

const GET_ECHO: &[u8] = b"GET /echo HTTP/1.1\r\nhost: t\r\n\r\n";

/// Whether the server closed `conn` (EOF or reset) within [`ACT_WITHIN`],
/// writing `trickle` every 200 ms meanwhile (when given).
async fn closed_by_server(conn: &mut TcpStream, trickle: Option<&[u8]>) -> bool {
    let deadline = Instant::now() + ACT_WITHIN;
    let mut chunk = [0u8; 1024];
    while Instant::now() < deadline {
        if let Some(bytes) = trickle {
            if conn.write_all(bytes).await.is_err() {
                return true;
            }
        }
        match tokio::time::timeout(Duration::from_millis(200), conn.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // A 408 or similar answer before the close is fine.
            Ok(Ok(_)) => {}
            Err(_) => {}
        }
    }
    false
}

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_trickled_one_line_at_a_time_is_cut_by_the_header_timeout() {
    let served = serve(
        1024,
        Limits {
            header_read_timeout: Duration::from_secs(1),
            ..Default::default()
        },
    )
    .await;
    let mut conn = TcpStream::connect(served.addr).await.unwrap();
    conn.write_all(b"GET /echo HTTP/1.1\r\nhost: t\r\n")
        .await
        .unwrap();
    // Bytes keep coming, so only a deadline on the whole head ends it.
    assert!(
        closed_by_server(&mut conn, Some(b"x-slow: 1\r\n")).await,
        "a head still arriving after {ACT_WITHIN:?} was not cut"
    );
    // Others are still served.
    assert_eq!(request(served.addr, GET_ECHO).await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed() {
    let served = serve(
        1024,
        Limits {
            keep_alive_timeout: Duration::from_secs(1),
            // Longer than the test: only the keep-alive timeout can act.
            header_read_timeout: Duration::from_secs(600),
            ..Default::default()
        },
    )
    .await;
    let mut conn = TcpStream::connect(served.addr).await.unwrap();
    conn.write_all(GET_ECHO).await.unwrap();
    assert_eq!(read_response(&mut conn).await.unwrap().status, 200);
    assert!(
        closed_by_server(&mut conn, None).await,
        "an idle connection was still open after {ACT_WITHIN:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_silent_before_its_first_request_is_closed() {
    let served = serve(
        1024,
        Limits {
            header_read_timeout: Duration::from_secs(1),
            keep_alive_timeout: Duration::from_secs(600),
            ..Default::default()
        },
    )
    .await;
    // The HTTP/2 preface but its last byte, one byte every 100 ms: until
    // it is whole, hyper cannot tell the version, so none of its own
    // timeouts runs, and the bytes keep the connection from being idle.
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r";
    let mut conn = TcpStream::connect(served.addr).await.unwrap();
    let mut chunk = [0u8; 64];
    let deadline = Instant::now() + ACT_WITHIN;
    let mut sent = 0;
    let closed = loop {
        if Instant::now() > deadline {
            break false;
        }
        if sent < preface.len() {
            if conn.write_all(&preface[sent..sent + 1]).await.is_err() {
                break true;
            }
            sent += 1;
        }
        match tokio::time::timeout(Duration::from_millis(100), conn.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            _ => {}
        }
    };
    assert!(
        closed,
        "a connection trickling its preface was still open after {ACT_WITHIN:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_gets_408_and_connection_close() {
    let served = serve(
        1024,
        Limits {
            body_read_timeout: Duration::from_secs(1),
            ..Default::default()
        },
    )
    .await;
    let mut conn = TcpStream::connect(served.addr).await.unwrap();
    conn.write_all(b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 500\r\n\r\nabc")
        .await
        .unwrap();
    let response = tokio::time::timeout(ACT_WITHIN, async {
        let (mut rd, mut wr) = conn.into_split();
        let trickle = async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if wr.write_all(b"d").await.is_err() {
                    return std::future::pending::<Option<Raw>>().await;
                }
            }
        };
        tokio::select! {
            r = read_split(&mut rd) => r,
            r = trickle => r,
        }
    })
    .await
    .expect("no answer to a slow body")
    .expect("the connection closed without an answer");
    assert_eq!(response.status, 408, "{response:?}");
    assert!(response.head.contains("connection: close"), "{response:?}");
    assert!(response.body.contains("did not arrive"), "{response:?}");
}

/// [`read_response`] on a read half.
async fn read_split(rd: &mut tokio::net::tcp::OwnedReadHalf) -> Option<Raw> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match rd.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap_or(0));
            if body.len() >= len {
                let status = head.split(' ').nth(1)?.parse().ok()?;
                return Some(Raw {
                    status,
                    head: head.to_owned(),
                    body: body.to_owned(),
                });
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_connection_cap_a_client_gets_503_until_one_closes() {
    let served = serve(
        1024,
        Limits {
            max_connections: 3,
            ..Default::default()
        },
    )
    .await;
    let refused = |text: &str| {
        metric(
            text,
            r#"serval_proxy_refused_total{reason="max_connections",listener="http"} "#,
        )
    };
    // Three open (and proven accepted: each answered a request).
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut conn = TcpStream::connect(served.addr).await.unwrap();
        conn.write_all(GET_ECHO).await.unwrap();
        assert_eq!(read_response(&mut conn).await.unwrap().status, 200);
        open.push(conn);
    }
    let mut metrics_conn = open.pop().unwrap();
    metrics_conn
        .write_all(b"GET /-/metrics HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    let before = refused(&read_response(&mut metrics_conn).await.unwrap().body);

    let answer = request(served.addr, GET_ECHO)
        .await
        .expect("a refused connection gets an answer");
    assert_eq!(answer.status, 503, "{answer:?}");
    assert!(answer.head.contains("retry-after: 1"), "{answer:?}");
    assert!(answer.head.contains("connection: close"), "{answer:?}");
    assert!(
        answer.body.contains("too many open connections"),
        "{answer:?}"
    );

    metrics_conn
        .write_all(b"GET /-/metrics HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    let after = refused(&read_response(&mut metrics_conn).await.unwrap().body);
    assert!(after > before, "refusal not counted ({before} -> {after})");

    // One closes: a new connection is served again once the proxy saw it.
    drop(open.pop());
    let deadline = Instant::now() + ACT_WITHIN;
    loop {
        let r = request(served.addr, GET_ECHO).await.unwrap();
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "still refused: {r:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_body_budget_a_request_gets_503_and_later_ones_pass() {
    let served = serve(
        1000,
        Limits {
            max_buffered_body_bytes: 1000,
            ..Default::default()
        },
    )
    .await;
    // 800 bytes held by a request the replica does not answer yet.
    let mut first = TcpStream::connect(served.addr).await.unwrap();
    first.write_all(&post("/held", &[b'a'; 800])).await.unwrap();
    let deadline = Instant::now() + ACT_WITHIN;
    while served.hold.held() == 0 {
        assert!(Instant::now() < deadline, "the first request never arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // 300 more would be 1100 buffered.
    let refused = request(served.addr, &post("/echo", &[b'b'; 300]))
        .await
        .unwrap();
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(refused.head.contains("retry-after: 1"), "{refused:?}");
    assert!(
        refused.body.contains("too many request bodies"),
        "{refused:?}"
    );
    // A chunked body (no length declared) is counted as it arrives.
    let chunked = b"POST /echo HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n12c\r\n";
    let mut raw = chunked.to_vec();
    raw.extend_from_slice(&[b'c'; 300]);
    raw.extend_from_slice(b"\r\n0\r\n\r\n");
    assert_eq!(request(served.addr, &raw).await.unwrap().status, 503);
    // Under the budget: passes.
    assert_eq!(
        request(served.addr, &post("/echo", &[b'b'; 100]))
            .await
            .unwrap()
            .status,
        200
    );

    served.hold.release_all_with(&Response {
        status: 201,
        headers: vec![],
        body: b"done".to_vec(),
    });
    assert_eq!(read_response(&mut first).await.unwrap().status, 201);
    // Its bytes are given back: the same 300 pass now.
    assert_eq!(
        request(served.addr, &post("/echo", &[b'b'; 300]))
            .await
            .unwrap()
            .status,
        200
    );
}

/// Bytes a hostile client might send: random bytes, or a request line,
/// headers and body each possibly malformed (odd methods and targets,
/// escapes, bytes beyond ASCII, bad or lying lengths, broken chunking).
fn hostile_request() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    let bytes = |n| proptest::collection::vec(any::<u8>(), 0..n);
    let token = prop_oneof![
        3 => Just("GET".to_string()),
        2 => Just("POST".to_string()),
        1 => "[A-Z]{0,8}",
        1 => "[ -~]{0,8}",
    ];
    let target = prop_oneof![
        1 => Just("/echo".to_string()),
        2 => "/echo[?#/%a-zA-Z0-9.]{0,16}",
        6 => "/(%[0-9A-Fa-f]{0,2}|%[0-7][0-9A-F]|[a-z./]){0,12}",
        1 => "(/|%|[0-9A-Fa-f]|\\.|[a-z]){0,24}",
        1 => "[ -~]{0,24}",
        1 => "http://[a-z]{1,5}(:[0-9]{1,6})?/echo",
        1 => Just("*".to_string()),
    ];
    // Now and then a byte beyond ASCII, which no URI may hold.
    let target = (target, proptest::option::weighted(0.2, 0x80u8..)).prop_map(|(t, high)| {
        let mut t = t.into_bytes();
        t.extend(high);
        t
    });
    let version = prop_oneof![
        4 => Just(b"HTTP/1.1".to_vec()),
        1 => Just(b"HTTP/1.0".to_vec()),
        1 => Just(b"HTTP/2.0".to_vec()),
        1 => bytes(10),
    ];
    let header = prop_oneof![
        8 => ("[a-z-]{1,12}", "[ -~]{0,20}").prop_map(|(k, v)| format!("{k}: {v}").into_bytes()),
        1 => "content-length: ([0-9]{1,20}|-1|1, 2| 5 |0x10)".prop_map(String::into_bytes),
        1 => Just(b"transfer-encoding: chunked".to_vec()),
        1 => Just(b"transfer-encoding: gzip, chunked".to_vec()),
        1 => Just(b"expect: 100-continue".to_vec()),
        1 => Just(b"connection: upgrade\r\nupgrade: h2c".to_vec()),
        1 => "x-serve-call-method: [ -~]{0,12}".prop_map(String::into_bytes),
        1 => bytes(24),
    ];
    let body = prop_oneof![
        bytes(64),
        "([0-9a-fA-F]{1,4}(;x=y)?\r\n[a-z]{0,8}\r\n){0,3}(0\r\n\r\n)?".prop_map(String::into_bytes),
    ];
    let structured = (
        token,
        target,
        version,
        proptest::collection::vec(header, 0..4),
        any::<bool>(),
        body,
    )
        .prop_map(|(method, target, version, headers, host, body)| {
            let mut raw = method.into_bytes();
            raw.push(b' ');
            raw.extend(target);
            raw.push(b' ');
            raw.extend(version);
            raw.extend(b"\r\n");
            if host {
                raw.extend(b"host: t\r\n");
            }
            for h in headers {
                raw.extend(h);
                raw.extend(b"\r\n");
            }
            raw.extend(b"\r\n");
            raw.extend(body);
            raw
        });
    prop_oneof![1 => bytes(512), 4 => structured]
}

/// Random requests written to a real proxy socket: the proxy answers or
/// closes every one (the client closes its side after writing, so nothing
/// may stay waiting), never panics, and still serves a valid request.
#[test]
fn hostile_requests_never_panic_or_hang_the_proxy() {
    use proptest::test_runner::{Config, TestCaseError, TestRunner};
    static PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        previous(info);
    }));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let served = rt.block_on(serve(
        1024,
        Limits {
            header_read_timeout: Duration::from_secs(2),
            body_read_timeout: Duration::from_secs(2),
            ..Default::default()
        },
    ));
    let addr = served.addr;
    let mut runner = TestRunner::new(Config {
        cases: 256,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&hostile_request(), |raw| {
        rt.block_on(async {
            let mut conn = TcpStream::connect(addr).await.unwrap();
            // The proxy may close before reading it all: not a failure.
            let _ = conn.write_all(&raw).await;
            let _ = conn.shutdown().await;
            let mut answer = Vec::new();
            let read = tokio::time::timeout(ACT_WITHIN, async {
                let mut chunk = [0u8; 4096];
                loop {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => answer.extend_from_slice(&chunk[..n]),
                    }
                }
            })
            .await;
            if read.is_err() {
                return Err(TestCaseError::fail(format!(
                    "no answer nor close within {ACT_WITHIN:?} for {:?}",
                    String::from_utf8_lossy(&raw)
                )));
            }
            if !answer.is_empty() {
                let head = String::from_utf8_lossy(&answer);
                let status: Option<u16> = head
                    .strip_prefix("HTTP/1.")
                    .and_then(|h| h.get(2..5))
                    .and_then(|s| s.parse().ok());
                if !status.is_some_and(|s| (100..600).contains(&s)) {
                    return Err(TestCaseError::fail(format!(
                        "not an HTTP answer: {head:?} for {:?}",
                        String::from_utf8_lossy(&raw)
                    )));
                }
            }
            match request(addr, GET_ECHO).await {
                Some(r) if r.status == 200 => Ok(()),
                other => Err(TestCaseError::fail(format!(
                    "a valid request after {:?} got {other:?}",
                    String::from_utf8_lossy(&raw)
                ))),
            }
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    assert_eq!(
        PANICS.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "something panicked while serving hostile requests"
    );
    drop(served);
}
