//! `http_options.middlewares` over real sockets: a hand-built snapshot
//! carrying the middleware JSON (as the controller sends it), a native
//! replica, and hyper's client.
// Test code: an unwrap is an assertion (clippy.toml allows it only in #[test] fns).
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serval_node::replica_server::{Handler, Reply};
use serval_node::test_util::ThreadedReplica;
use serval_protos::control::{
    Backend, BackendConfig, ClusterSnapshot, Endpoint, HttpOptions, Replica,
};
use serval_protos::frame::{Payload, Request, Response};
use serval_proxy::{Proxy, ProxyConfig};

/// Answers `n` (from the query, `n=...`) bytes of text.
struct SizedHandler;

impl Handler for SizedHandler {
    fn handle(&self, request: Request, reply: Reply) {
        let n = match &request.payload {
            Payload::Http(http) => http
                .query
                .split('&')
                .find_map(|kv| kv.strip_prefix("n="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(2),
            _ => 2,
        };
        reply.send(&Response {
            status: 200,
            headers: vec![("content-type".into(), "text/plain".into())],
            body: vec![b'a'; n],
        });
    }
}

/// The cluster as the controller would send it, with `middlewares_json`.
fn snapshot(version: u64, replica: &ThreadedReplica, middlewares_json: &str) -> ClusterSnapshot {
    ClusterSnapshot {
        version,
        backends: vec![Backend {
            name: "b".into(),
            config: Some(BackendConfig {
                max_concurrent_queries: 100,
                ..Default::default()
            }),
            state: "running".into(),
            ..Default::default()
        }],
        endpoints: vec![Endpoint {
            name: "e".into(),
            route: "/app".into(),
            methods: vec!["GET".into()],
            traffic: HashMap::from([("b".to_string(), 1.0)]),
            shadow: HashMap::new(),
            ..Default::default()
        }],
        replicas: vec![Replica {
            id: "r1".into(),
            backend: "b".into(),
            state: "running".into(),
            unix_path: replica.unix_path.clone(),
            ..Default::default()
        }],
        http_options: Some(HttpOptions {
            location: "HeadOnly".into(),
            middlewares_json: middlewares_json.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

struct Answer {
    status: u16,
    headers: hyper::HeaderMap,
    body: Bytes,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

struct Server {
    proxy: Arc<Proxy>,
    base: String,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    async fn start() -> Self {
        let proxy = Arc::new(Proxy::new(&ProxyConfig {
            token: serval_node::test_util::TEST_TOKEN.into(),
            ..Default::default()
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serval_proxy::serve(listener, proxy.clone(), async move {
            let _ = stop_rx.await;
        }));
        Self {
            proxy,
            base: format!("http://{addr}"),
            client: Client::builder(TokioExecutor::new()).build_http(),
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn send(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self
            .client
            .request(req.body(Empty::new()).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            headers,
            body,
        }
    }

    async fn stop(mut self) {
        drop(self.client);
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(15), self.task.take().unwrap())
            .await
            .unwrap()
            .unwrap();
    }
}

const CORS: &str = r#"[{"name": "CORSMiddleware", "options": {
    "allow_origins": ["https://ok.example"], "allow_methods": ["GET", "POST"],
    "allow_headers": ["X-Token"], "expose_headers": ["X-Trace"], "max_age": 42}}]"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_simple_and_preflight() {
    let dir = tempfile::tempdir().unwrap();
    let replica = ThreadedReplica::start(dir.path(), "r", Arc::new(SizedHandler));
    let server = Server::start().await;
    server.proxy.apply_snapshot(&snapshot(1, &replica, CORS));

    // Simple request from an allowed origin: mirrored, exposed headers, Vary.
    let r = server
        .send("GET", "/app", &[("Origin", "https://ok.example")])
        .await;
    assert_eq!((r.status, r.text().as_str()), (200, "aa"));
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://ok.example")
    );
    assert_eq!(r.header("access-control-expose-headers"), Some("X-Trace"));
    assert_eq!(r.header("vary"), Some("Origin"));
    // From another origin: answered, without Allow-Origin.
    let r = server
        .send("GET", "/app", &[("Origin", "https://evil.example")])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), None);
    assert_eq!(r.header("vary"), Some("Origin"));
    // The proxy's own errors pass through the middleware too.
    let r = server
        .send("GET", "/nope", &[("Origin", "https://ok.example")])
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://ok.example")
    );

    // Preflight on a GET-only route: the middleware answers before routing.
    let r = server
        .send(
            "OPTIONS",
            "/app",
            &[
                ("Origin", "https://ok.example"),
                ("Access-Control-Request-Method", "POST"),
                ("Access-Control-Request-Headers", "X-Token"),
            ],
        )
        .await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "OK"),
        "{:?}",
        r.headers
    );
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://ok.example")
    );
    assert_eq!(r.header("access-control-allow-methods"), Some("GET, POST"));
    assert_eq!(
        r.header("access-control-allow-headers"),
        Some("Accept, Accept-Language, Content-Language, Content-Type, X-Token")
    );
    assert_eq!(r.header("access-control-max-age"), Some("42"));

    // Refused preflights: 400 naming what was refused.
    let r = server
        .send(
            "OPTIONS",
            "/app",
            &[
                ("Origin", "https://evil.example"),
                ("Access-Control-Request-Method", "GET"),
            ],
        )
        .await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (400, "Disallowed CORS origin")
    );
    assert_eq!(r.header("access-control-allow-origin"), None);
    let r = server
        .send(
            "OPTIONS",
            "/app",
            &[
                ("Origin", "https://ok.example"),
                ("Access-Control-Request-Method", "DELETE"),
                ("Access-Control-Request-Headers", "X-Other"),
            ],
        )
        .await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (400, "Disallowed CORS method, headers")
    );

    // A snapshot without middlewares (a head restarted without them) drops them.
    server.proxy.apply_snapshot(&snapshot(2, &replica, ""));
    let r = server
        .send("GET", "/app", &[("Origin", "https://ok.example")])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), None);
    assert_eq!(r.header("vary"), None);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_above_minimum_size_when_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let replica = ThreadedReplica::start(dir.path(), "r", Arc::new(SizedHandler));
    let server = Server::start().await;
    server.proxy.apply_snapshot(&snapshot(
        1,
        &replica,
        r#"[{"name": "GZipMiddleware", "options": {"minimum_size": 1000, "compresslevel": 6}}]"#,
    ));

    let r = server
        .send(
            "GET",
            "/app?n=5000",
            &[("Accept-Encoding", "gzip, deflate")],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    assert_eq!(r.header("vary"), Some("Accept-Encoding"));
    assert_eq!(
        r.header("content-length"),
        Some(r.body.len().to_string().as_str())
    );
    assert!(r.body.len() < 5000, "{} bytes", r.body.len());
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(&r.body[..])
        .read_to_end(&mut plain)
        .unwrap();
    assert_eq!(plain, vec![b'a'; 5000]);

    // Below minimum_size: as the replica sent it.
    let r = server
        .send("GET", "/app?n=999", &[("Accept-Encoding", "gzip")])
        .await;
    assert_eq!((r.header("content-encoding"), r.body.len()), (None, 999));
    // The client does not accept gzip: uncompressed.
    let r = server.send("GET", "/app?n=5000", &[]).await;
    assert_eq!((r.header("content-encoding"), r.body.len()), (None, 5000));
    let r = server
        .send("GET", "/app?n=5000", &[("Accept-Encoding", "br")])
        .await;
    assert_eq!((r.header("content-encoding"), r.body.len()), (None, 5000));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_host() {
    let dir = tempfile::tempdir().unwrap();
    let replica = ThreadedReplica::start(dir.path(), "r", Arc::new(SizedHandler));
    let server = Server::start().await;
    server.proxy.apply_snapshot(&snapshot(
        1,
        &replica,
        r#"[{"name": "TrustedHostMiddleware", "options": {"allowed_hosts": ["example.com", "*.example.org"]}}]"#,
    ));

    for host in [
        "example.com",
        "example.com:8000",
        "api.example.org",
        "a.b.example.org:1",
    ] {
        let r = server.send("GET", "/app", &[("Host", host)]).await;
        assert_eq!((r.status, r.text().as_str()), (200, "aa"), "{host}");
    }
    for host in ["evil.com", "example.org", "example.com.evil.net"] {
        let r = server.send("GET", "/app", &[("Host", host)]).await;
        assert_eq!(
            (r.status, r.text().as_str()),
            (400, "Invalid host header"),
            "{host}"
        );
    }
    // Built-in paths stay outside the middlewares.
    let r = server
        .send("GET", "/-/healthz", &[("Host", "evil.com")])
        .await;
    assert_eq!(r.status, 200);
    server.stop().await;
}
