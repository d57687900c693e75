//! The HTTP proxy over real sockets: a hand-built snapshot (no controller),
//! real replica frame servers, and hyper's client speaking HTTP/1.1 and h2c.
// Test code: an unwrap is an assertion (clippy.toml allows it only in #[test] fns).
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serval_node::replica_server::EchoHandler;
use serval_node::test_util::{HoldHandler, ThreadedReplica};
use serval_protos::control::{Backend, BackendConfig, ClusterSnapshot, Endpoint};
use serval_protos::frame::Response;
use serval_proxy::metrics::MetricsHandle;
use serval_proxy::{Proxy, ProxyConfig};

type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

/// One recorder per test binary (the global one can be installed once).
fn recorder() -> MetricsHandle {
    static HANDLE: std::sync::OnceLock<MetricsHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            serval_proxy::metrics::install(serval_proxy::metrics::prometheus_builder()).unwrap()
        })
        .clone()
}

/// A replica frame server on its own runtime thread; dropping it stops it.
/// Answers every held request with 201 "done" and an `x-held` header.
fn release(hold: &HoldHandler) {
    hold.release_all_with(&Response {
        status: 201,
        headers: vec![("x-held".into(), "yes".into())],
        body: b"done".to_vec(),
    });
}

fn backend(name: &str, max_concurrent_queries: u32) -> Backend {
    Backend {
        name: name.into(),
        config: Some(BackendConfig {
            max_concurrent_queries,
            ..Default::default()
        }),
        state: "running".into(),
        ..Default::default()
    }
}

fn endpoint(name: &str, route: &str, methods: &[&str], backend: &str) -> Endpoint {
    Endpoint {
        name: name.into(),
        route: route.into(),
        methods: methods.iter().map(|m| m.to_string()).collect(),
        traffic: HashMap::from([(backend.to_string(), 1.0)]),
        shadow: HashMap::new(),
        ..Default::default()
    }
}

/// A proxy serving on a free port until `stop`.
struct Serving {
    addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
}

impl Serving {
    async fn start(proxy: Arc<Proxy>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serval_proxy::serve(listener, proxy, async move {
            let _ = stop_rx.await;
        }));
        Self { addr, stop, server }
    }

    /// Shuts the proxy down and waits for it to stop accepting.
    async fn stop(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(15), self.server)
            .await
            .expect("the proxy stops within 15 s")
            .unwrap();
    }
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

struct Reply_ {
    status: u16,
    headers: hyper::HeaderMap,
    body: String,
}

impl Reply_ {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Clone)]
struct Http {
    client: Client<hyper_util::client::legacy::connect::HttpConnector, BoxBody>,
    base: String,
}

impl Http {
    fn new(addr: std::net::SocketAddr, http2: bool) -> Self {
        let client = Client::builder(TokioExecutor::new())
            .http2_only(http2)
            .build_http();
        Self {
            client,
            base: format!("http://{addr}"),
        }
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: BoxBody,
    ) -> Reply_ {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self.client.request(req.body(body).unwrap()).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        Reply_ {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    async fn get(&self, path: &str) -> Reply_ {
        self.send("GET", path, &[], Empty::new().boxed()).await
    }
}

fn full(body: Vec<u8>) -> BoxBody {
    Full::new(Bytes::from(body)).boxed()
}

/// A body without Content-Length (sent chunked), in 100-byte frames.
fn chunked(len: usize) -> BoxBody {
    let frames = (0..len.div_ceil(100))
        .map(|_| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![b'x'; 100]))));
    StreamBody::new(futures::stream::iter(frames.collect::<Vec<_>>())).boxed()
}

fn assert_json_error(r: &Reply_, status: u16, contains: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let msg = r.json()["error"].as_str().unwrap_or_default().to_owned();
    assert!(msg.contains(contains), "error {msg:?} lacks {contains:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_proxy_end_to_end() {
    let recorder = recorder();
    let dir = tempfile::tempdir().unwrap();
    let echo = ThreadedReplica::start(dir.path(), "echo", Arc::new(EchoHandler));
    let hold = Arc::new(HoldHandler::default());
    let held = ThreadedReplica::start(dir.path(), "held", hold.clone());

    let config = ProxyConfig {
        token: serval_node::test_util::TEST_TOKEN.into(),
        max_body_bytes: 1024,
        queue_capacity: 0,
        metrics: Some(recorder),
        ..Default::default()
    };
    let proxy = Arc::new(Proxy::new(&config));
    let serving = Serving::start(proxy.clone()).await;
    let addr = serving.addr;
    let http = Http::new(addr, false);

    // Not ready until a snapshot is applied.
    assert_eq!(http.get("/-/healthz").await.status, 503);

    proxy.apply_snapshot(&ClusterSnapshot {
        version: 1,
        backends: vec![backend("echo", 0), backend("held", 1)],
        endpoints: vec![
            endpoint("calc", "/api/{a:int}/{b:float}", &["GET"], "echo"),
            endpoint("echo", "/echo", &["GET", "POST"], "echo"),
            endpoint("held", "/held", &[], "held"),
        ],
        replicas: vec![echo.record("echo"), held.record("held")],
        ..Default::default()
    });
    let health = http.get("/-/healthz").await;
    assert_eq!((health.status, health.body.as_str()), (200, "ok"));

    // 200 JSON echo with typed path params and the raw query.
    let r = http.get("/api/123/3.14?x=1").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let j = r.json();
    assert_eq!(j["path"], "/api/123/3.14");
    assert_eq!(j["query"], "x=1");
    assert_eq!(
        j["path_params"],
        serde_json::json!(["a=Int(123)", "b=Float(3.14)"])
    );
    assert_eq!(j["call_method"], serde_json::Value::Null);

    // X-SERVE-CALL-METHOD reaches the replica; the body arrives whole.
    let r = http
        .send(
            "POST",
            "/echo",
            &[("X-SERVE-CALL-METHOD", "other_method")],
            full(vec![7; 1000]),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["call_method"], "other_method");
    assert_eq!(r.json()["body_len"], 1000);
    assert_eq!(r.json()["method"], "POST");

    // No route, a bad typed value, wrong method.
    assert_json_error(&http.get("/nope").await, 404, "no route for /nope");
    assert_json_error(&http.get("/api/abc/1.0").await, 404, "no route");
    let r = http
        .send("DELETE", "/echo", &[], Empty::new().boxed())
        .await;
    assert_json_error(&r, 405, "DELETE");
    assert_eq!(r.header("allow"), Some("GET, POST"));

    // Too large: declared by Content-Length, and streamed without one.
    assert_json_error(
        &http.send("POST", "/echo", &[], full(vec![0; 2000])).await,
        413,
        "1024",
    );
    // A streamed body cut off by the limit leaves the connection unusable:
    // the answer says so, so the client's pool does not reuse it.
    let r = http.send("POST", "/echo", &[], chunked(2000)).await;
    assert_json_error(&r, 413, "1024");
    assert_eq!(r.header("connection"), Some("close"));
    // A chunked body under the limit still passes.
    assert_eq!(
        http.send("POST", "/echo", &[], chunked(500)).await.json()["body_len"],
        500
    );

    // Backpressure: the one slot is taken and the queue holds nothing.
    let first = {
        let http = http.clone();
        tokio::spawn(async move { http.get("/held").await })
    };
    eventually("request held", || hold.held() == 1).await;
    let r = http.get("/held").await;
    assert_json_error(&r, 503, "overloaded");
    assert_eq!(r.header("retry-after"), Some("1"));
    release(&hold);
    let r = first.await.unwrap();
    assert_eq!(
        (r.status, r.body.as_str(), r.header("x-held")),
        (201, "done", Some("yes"))
    );
    assert_eq!(proxy.router().in_flight("held"), 0);

    // Built-ins.
    let routes = http.get("/-/routes").await;
    assert_eq!(routes.status, 200);
    assert_eq!(
        routes.json(),
        serde_json::json!({"/api/{a:int}/{b:float}": "calc", "/echo": "echo", "/held": "held"})
    );
    let metrics = http.get("/-/metrics").await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.body.contains("serval_proxy_requests_total"),
        "{}",
        metrics.body
    );
    assert!(
        metrics.body.contains(r#"endpoint="calc""#),
        "{}",
        metrics.body
    );
    assert!(
        !metrics.body.contains("/api/123"),
        "metrics must not be labelled by path"
    );

    // HTTP/2 (h2c prior knowledge) through the same listener.
    let h2 = Http::new(addr, true);
    let r = h2.get("/echo").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["path"], "/echo");

    // Shutdown: the server stops accepting.
    drop((http, h2));
    serving.stop().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn metrics_path_is_404_without_a_handle() {
    let proxy = Arc::new(Proxy::new(&ProxyConfig {
        token: serval_node::test_util::TEST_TOKEN.into(),
        ..Default::default()
    }));
    // A route whose endpoint has no traffic yet: the router answers.
    proxy.apply_snapshot(&ClusterSnapshot {
        endpoints: vec![Endpoint {
            name: "e".into(),
            route: "/e".into(),
            methods: vec![],
            traffic: HashMap::new(),
            shadow: HashMap::new(),
            ..Default::default()
        }],
        ..Default::default()
    });
    let serving = Serving::start(proxy.clone()).await;
    let addr = serving.addr;
    let http = Http::new(addr, false);
    assert_json_error(&http.get("/-/metrics").await, 404, "metrics");
    drop(http);
    serving.stop().await;
}

#[tokio::test]
async fn the_dashboard_api_answers_only_with_the_cluster_token() {
    let token = serval_node::test_util::TEST_TOKEN;
    let proxy = Arc::new(Proxy::new(&ProxyConfig {
        token: token.into(),
        ..Default::default()
    }));
    proxy.apply_snapshot(&ClusterSnapshot {
        backends: vec![backend("b", 4)],
        endpoints: vec![endpoint("e", "/e", &[], "b")],
        ..Default::default()
    });
    let serving = Serving::start(proxy.clone()).await;
    let http = Http::new(serving.addr, false);
    let page = http.get("/-/dashboard").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<title>Serval dashboard</title>"));
    assert!(!page.body.contains(token));
    let bearer = format!("Bearer {token}");
    let wrong = format!("Bearer {token}x");
    for api in ["state", "events", "logs?replica=b%230"] {
        let path = format!("/-/dashboard/api/{api}");
        for headers in [
            vec![],
            vec![("authorization", wrong.as_str())],
            vec![("authorization", token)],
        ] {
            let r = http
                .send("GET", &path, &headers, Empty::new().boxed())
                .await;
            assert_json_error(&r, 401, "cluster token");
            assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        }
    }
    let auth = [("authorization", bearer.as_str())];
    let state = http
        .send("GET", "/-/dashboard/api/state", &auth, Empty::new().boxed())
        .await;
    assert_eq!(state.status, 200, "{}", state.body);
    let state = state.json();
    assert_eq!(state["endpoints"][0]["name"], "e");
    assert_eq!(state["endpoints"][0]["traffic"]["b"], 1.0);
    assert_eq!(state["backends"][0]["name"], "b");
    assert!(state["series"].is_object());
    let unknown = http
        .send(
            "GET",
            "/-/dashboard/api/logs?replica=nope",
            &auth,
            Empty::new().boxed(),
        )
        .await;
    assert_json_error(&unknown, 404, "no such replica");
    let post = http
        .send(
            "POST",
            "/-/dashboard/api/state",
            &auth,
            Empty::new().boxed(),
        )
        .await;
    assert_json_error(&post, 405, "read-only");
    drop(http);
    serving.stop().await;
}

#[tokio::test]
async fn run_refuses_an_invalid_config_naming_the_field() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = ProxyConfig {
        token: serval_node::test_util::TEST_TOKEN.into(),
        max_body_bytes: 0,
        ..Default::default()
    };
    let err = serval_proxy::run(config, listener, std::future::pending())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("max_body_bytes"), "{err}");
}

/// Clients are anonymous: a failed replica's id and socket path are in
/// the error body only when the proxy runs with `SERVAL_DEBUG`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_bodies_name_internals_only_with_debug() {
    for debug in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let hold = Arc::new(HoldHandler::default());
        let mut replica = ThreadedReplica::start(dir.path(), "replica-7f3a", hold.clone());
        let proxy = Arc::new(Proxy::new(&ProxyConfig {
            token: serval_node::test_util::TEST_TOKEN.into(),
            debug_errors: debug,
            ..Default::default()
        }));
        proxy.apply_snapshot(&ClusterSnapshot {
            version: 1,
            // The retry of a lost GET is off: this test reads the 502 body
            // of a request whose replica died with it.
            backends: vec![Backend {
                config: Some(BackendConfig {
                    max_concurrent_queries: 1,
                    no_idempotent_retry: true,
                    ..Default::default()
                }),
                ..backend("b", 1)
            }],
            endpoints: vec![endpoint("held", "/held", &[], "b")],
            replicas: vec![replica.record("b")],
            ..Default::default()
        });
        let serving = Serving::start(proxy.clone()).await;
        let addr = serving.addr;
        let http = Http::new(addr, false);
        let pending = {
            let http = http.clone();
            tokio::spawn(async move { http.get("/held").await })
        };
        eventually("request held", || hold.held() == 1).await;
        // The replica dies with the request on it.
        replica.kill();
        let r = pending.await.unwrap();
        assert_eq!(r.status, 502, "{}", r.body);
        let dir_text = dir.path().to_string_lossy().into_owned();
        if debug {
            assert!(r.body.contains("replica-7f3a"), "{}", r.body);
        } else {
            assert!(!r.body.contains("7f3a"), "{}", r.body);
            assert!(!r.body.contains(&dir_text), "{}", r.body);
            assert_json_error(&r, 502, "the replica serving the request failed");
        }
        drop(http);
        serving.stop().await;
    }
}

/// The proxy routes on the percent-decoded path, the one the app reads, and
/// refuses a path whose decoding no app could read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_route_decoded_and_undecodable_ones_are_400() {
    let dir = tempfile::tempdir().unwrap();
    let echo = ThreadedReplica::start(dir.path(), "echo", Arc::new(EchoHandler));
    let proxy = Arc::new(Proxy::new(&ProxyConfig {
        token: serval_node::test_util::TEST_TOKEN.into(),
        ..Default::default()
    }));
    proxy.apply_snapshot(&ClusterSnapshot {
        version: 1,
        backends: vec![backend("echo", 0)],
        endpoints: vec![
            endpoint("admin", "/admin", &[], "echo"),
            endpoint("files", "/files/{rest:path}", &[], "echo"),
            endpoint("one", "/one/{name}", &[], "echo"),
        ],
        replicas: vec![echo.record("echo")],
        ..Default::default()
    });
    let serving = Serving::start(proxy.clone()).await;
    let addr = serving.addr;
    let http = Http::new(addr, false);

    // The replica gets the decoded path it was routed on.
    let r = http.get("/%61dmin").await;
    assert_eq!((r.status, r.json()["path"].as_str()), (200, Some("/admin")));
    // %2F is a '/', as in Starlette: a path segment, never inside {name}.
    let r = http.get("/files/a%2Fb").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["path"], "/files/a/b");
    assert_eq!(
        r.json()["path_params"],
        serde_json::json!(["rest=Str(\"a/b\")"])
    );
    assert_json_error(&http.get("/one/a%2Fb").await, 404, "no route");

    // Not UTF-8 once decoded, or a NUL: 400, whichever route it looks like.
    for path in ["/%FFadmin", "/admin%C3", "/one/%E2%82"] {
        assert_json_error(&http.get(path).await, 400, "not valid UTF-8");
    }
    for path in ["/admin%00", "/one/a%00b"] {
        assert_json_error(&http.get(path).await, 400, "NUL");
    }
    // The proxy still serves after them.
    assert_eq!(http.get("/admin").await.status, 200);

    drop(http);
    serving.stop().await;
}

/// The value of the series `line` (name and labels) in a scrape.
fn series_value(text: &str, line: &str) -> Option<f64> {
    let prefix = format!("{line} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse().ok())
}

/// A backend, endpoint and replica removed from the snapshot leave the
/// proxy's `/-/metrics` (a rolling cluster must not accumulate series),
/// while those of a live backend that sits idle stay and keep counting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_of_removed_backends_replicas_and_endpoints_leave_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let gone = ThreadedReplica::start(dir.path(), "rm-gone-1", Arc::new(EchoHandler));
    let stays = ThreadedReplica::start(dir.path(), "rm-stays-1", Arc::new(EchoHandler));
    let proxy = Arc::new(Proxy::new(&ProxyConfig {
        token: serval_node::test_util::TEST_TOKEN.into(),
        metrics: Some(recorder()),
        ..Default::default()
    }));
    let snapshot = |version, with_gone: bool| {
        let mut s = ClusterSnapshot {
            version,
            backends: vec![backend("rm-stays", 0)],
            endpoints: vec![endpoint("rm-stays", "/stays", &[], "rm-stays")],
            replicas: vec![stays.record("rm-stays")],
            ..Default::default()
        };
        if with_gone {
            s.backends.push(backend("rm-gone", 0));
            s.endpoints
                .push(endpoint("rm-gone", "/gone", &[], "rm-gone"));
            s.replicas.push(gone.record("rm-gone"));
        }
        s
    };
    proxy.apply_snapshot(&snapshot(1, true));
    let serving = Serving::start(proxy.clone()).await;
    let addr = serving.addr;
    let http = Http::new(addr, false);
    for path in ["/gone", "/gone", "/stays"] {
        assert_eq!(http.get(path).await.status, 200);
    }
    let stays_lines = [
        (
            r#"serval_proxy_requests_total{endpoint="rm-stays",status="2xx"}"#,
            1.0,
        ),
        (
            r#"serval_router_requests_total{endpoint="rm-stays",backend="rm-stays",outcome="2xx"}"#,
            1.0,
        ),
        (
            r#"serval_router_request_duration_seconds_count{backend="rm-stays"}"#,
            1.0,
        ),
        (
            r#"serval_replica_in_flight{backend="rm-stays",replica="rm-stays-1"}"#,
            0.0,
        ),
        (r#"serval_router_queue_length{backend="rm-stays"}"#, 0.0),
    ];
    let text = http.get("/-/metrics").await.body;
    for (line, value) in stays_lines {
        assert_eq!(series_value(&text, line), Some(value), "{line} in {text}");
    }
    for line in [
        r#"serval_proxy_requests_total{endpoint="rm-gone",status="2xx"}"#,
        r#"serval_router_requests_total{endpoint="rm-gone",backend="rm-gone",outcome="2xx"}"#,
        r#"serval_router_request_duration_seconds_count{backend="rm-gone"}"#,
    ] {
        assert_eq!(series_value(&text, line), Some(2.0), "{line} in {text}");
    }
    assert!(text.contains(r#"replica="rm-gone-1""#), "{text}");
    assert!(
        text.contains(r#"serval_batch_size_count{backend="rm-gone"} 0"#),
        "{text}"
    );

    proxy.apply_snapshot(&snapshot(2, false));
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = http.get("/-/metrics").await.body;
        if !text.contains("rm-gone") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "series of the removed backend stayed: {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The live, idle backend's series stay as they were...
    for (line, value) in stays_lines {
        assert_eq!(series_value(&text, line), Some(value), "{line} in {text}");
    }
    // ...and keep counting into what the scrape shows.
    assert_eq!(http.get("/stays").await.status, 200);
    let text = http.get("/-/metrics").await.body;
    for (line, value) in [
        (
            r#"serval_proxy_requests_total{endpoint="rm-stays",status="2xx"}"#,
            2.0,
        ),
        (
            r#"serval_router_requests_total{endpoint="rm-stays",backend="rm-stays",outcome="2xx"}"#,
            2.0,
        ),
        (
            r#"serval_router_request_duration_seconds_count{backend="rm-stays"}"#,
            2.0,
        ),
    ] {
        assert_eq!(series_value(&text, line), Some(value), "{line} in {text}");
    }
    assert_eq!(
        text.matches("# TYPE serval_router_queue_length ").count(),
        1
    );

    drop(http);
    serving.stop().await;
}

/// Answers every request with its tag.
struct Tag(&'static str);

impl serval_node::replica_server::Handler for Tag {
    fn handle(
        &self,
        _request: serval_protos::frame::Request,
        reply: serval_node::replica_server::Reply,
    ) {
        reply.send(&Response {
            status: 200,
            headers: vec![],
            body: self.0.as_bytes().to_vec(),
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_key_header_pins_one_backend_of_a_split_and_is_bounded() {
    const TAGS: [&str; 4] = ["t0", "t1", "t2", "t3"];
    let dir = tempfile::tempdir().unwrap();
    let replicas: Vec<ThreadedReplica> = TAGS
        .iter()
        .map(|t| ThreadedReplica::start(dir.path(), t, Arc::new(Tag(t))))
        .collect();
    let proxy = Arc::new(Proxy::new(&ProxyConfig {
        token: serval_node::test_util::TEST_TOKEN.into(),
        ..Default::default()
    }));
    let mut split = endpoint("split", "/split", &[], "t0");
    split.traffic = TAGS.iter().map(|t| (t.to_string(), 0.25)).collect();
    proxy.apply_snapshot(&ClusterSnapshot {
        version: 1,
        backends: TAGS.iter().map(|t| backend(t, 0)).collect(),
        endpoints: vec![split],
        replicas: replicas
            .iter()
            .zip(TAGS)
            .map(|(r, t)| r.record(t))
            .collect(),
        ..Default::default()
    });
    let serving = Serving::start(proxy.clone()).await;
    let http = Http::new(serving.addr, false);
    let get = |key: String| {
        let http = http.clone();
        async move {
            let r = http
                .send(
                    "GET",
                    "/split",
                    &[("X-SERVE-SHARD-KEY", &key)],
                    Empty::new().boxed(),
                )
                .await;
            assert_eq!(r.status, 200, "{}", r.body);
            r.body
        }
    };
    let mut reached = std::collections::HashSet::new();
    for k in 0..30 {
        let first = get(format!("user-{k}")).await;
        for _ in 0..3 {
            assert_eq!(get(format!("user-{k}")).await, first, "user-{k} moved");
        }
        reached.insert(first);
    }
    // SHA-256 spreads 30 keys over four equal weights (the same on every run).
    assert!(reached.len() >= 3, "30 keys reached only {reached:?}");

    // The key is client input: bounded, refused before any replica sees it.
    let limit = serval_proxy::routing::MAX_SHARD_KEY_BYTES;
    get("k".repeat(limit)).await;
    let long = "k".repeat(limit + 1);
    let r = http
        .send(
            "GET",
            "/split",
            &[("X-SERVE-SHARD-KEY", &long)],
            Empty::new().boxed(),
        )
        .await;
    assert_json_error(&r, 400, "X-SERVE-SHARD-KEY");

    drop(http);
    serving.stop().await;
}
