//! Unary gRPC calls the proxy terminates (`SERVAL_GRPC_FRAMES=1`): a
//! hand-built snapshot whose one replica is a native frame server with no
//! gRPC server at all (`grpc_addr` empty), so a call only succeeds as a
//! `Payload::Grpc` frame. Checks what the replica receives (path,
//! metadata, message bytes, deadline), the answers (a message and OK
//! trailers, a replica's status trailers-only), that a call holds its slot
//! until answered (a second one is RESOURCE_EXHAUSTED), and the deadline.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prost::Message;
use serval_node::replica_server::{Handler, Reply};
use serval_node::test_util::ThreadedReplica;
use serval_protos::control::{Backend, BackendConfig, ClusterSnapshot, Endpoint};
use serval_protos::frame::{GrpcCall, Payload, Request, Response};
use serval_proxy::{Proxy, ProxyConfig};

type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

/// Keeps every gRPC call it gets, unanswered, until the test answers it.
#[derive(Default)]
struct Calls(Mutex<Vec<(GrpcCall, Reply)>>);

impl Handler for Calls {
    fn handle(&self, request: Request, reply: Reply) {
        if let Payload::Grpc(call) = request.payload {
            self.0.lock().unwrap().push((call, reply));
        }
    }
}

impl Calls {
    fn take(&self) -> Vec<(GrpcCall, Reply)> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }

    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

fn grpc_frame(message: &[u8]) -> Bytes {
    let mut out = vec![0];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out.into()
}

/// A descriptor set declaring `echo.Echo` with the unary method `Say`.
fn descriptor() -> Vec<u8> {
    use prost_types::{
        FileDescriptorProto, FileDescriptorSet, MethodDescriptorProto, ServiceDescriptorProto,
    };
    FileDescriptorSet {
        file: vec![FileDescriptorProto {
            name: Some("echo.proto".into()),
            package: Some("echo".into()),
            service: vec![ServiceDescriptorProto {
                name: Some("Echo".into()),
                method: vec![MethodDescriptorProto {
                    name: Some("Say".into()),
                    input_type: Some(".echo.Msg".into()),
                    output_type: Some(".echo.Msg".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn status(headers: &hyper::HeaderMap) -> Option<&str> {
    headers.get("grpc-status").and_then(|v| v.to_str().ok())
}

fn answer(code: &str, message: &str, body: &[u8]) -> Response {
    Response {
        status: 200,
        headers: vec![
            ("grpc-status".into(), code.into()),
            ("grpc-message".into(), message.into()),
        ],
        body: body.to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_calls_reach_a_replica_as_frames() {
    // Read once by the proxy, before its first call; this binary's only test.
    std::env::set_var("SERVAL_GRPC_FRAMES", "1");
    let dir = tempfile::tempdir().unwrap();
    let calls = Arc::new(Calls::default());
    let replica = ThreadedReplica::start(dir.path(), "g1", calls.clone());
    let proxy = Arc::new(Proxy::new(&ProxyConfig {
        token: serval_node::test_util::TEST_TOKEN.into(),
        queue_capacity: 0,
        ..Default::default()
    }));
    proxy.apply_snapshot(&ClusterSnapshot {
        version: 1,
        backends: vec![Backend {
            name: "b".into(),
            config: Some(BackendConfig {
                max_concurrent_queries: 1,
                ..Default::default()
            }),
            state: "running".into(),
            ..Default::default()
        }],
        endpoints: vec![Endpoint {
            name: "echo-api".into(),
            traffic: HashMap::from([("b".to_string(), 1.0)]),
            grpc_service: "echo.Echo".into(),
            grpc_descriptor: descriptor(),
            ..Default::default()
        }],
        replicas: vec![replica.record("b")],
        ..Default::default()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serval_proxy::serve(listener, proxy.clone(), async move {
        let _ = stop_rx.await;
    }));
    let client: Client<_, BoxBody> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let call = move |message: &[u8], headers: &[(&str, &str)]| {
        let mut req = hyper::Request::post(format!("http://{addr}/echo.Echo/Say"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        client.request(
            req.body(BoxBody::new(Full::new(grpc_frame(message))))
                .unwrap(),
        )
    };

    // A call reaches the replica with its metadata (not the protocol's
    // headers, not a client's copy of the proxy credential) and its bytes.
    let first = tokio::spawn(call(
        b"\x0a\x02hi",
        &[
            ("x-user", "alice"),
            ("x-serval-data-auth", "forged"),
            ("grpc-timeout", "30S"),
        ],
    ));
    eventually("the call to reach the replica", || calls.count() == 1).await;
    // It holds the replica's one slot: with no queue, the next is refused.
    let refused = call(b"", &[]).await.unwrap();
    assert_eq!(status(refused.headers()), Some("8"));

    let (got, reply) = calls.take().pop().unwrap();
    assert_eq!(got.path, "/echo.Echo/Say");
    assert_eq!(got.message, b"\x0a\x02hi");
    assert_eq!(
        got.metadata,
        vec![("x-user".to_owned(), "alice".to_owned())]
    );
    assert!(
        got.timeout_ms > 0 && got.timeout_ms <= 30_000,
        "{}",
        got.timeout_ms
    );
    reply.send(&answer("0", "", b"\x0a\x02ho"));
    let response = first.await.unwrap().unwrap();
    assert_eq!(
        response.headers().get("content-type").unwrap(),
        "application/grpc"
    );
    let collected = response.into_body().collect().await.unwrap();
    assert_eq!(status(collected.trailers().unwrap()), Some("0"));
    assert_eq!(collected.to_bytes(), grpc_frame(b"\x0a\x02ho"));

    // The replica's status comes back trailers-only, its message encoded.
    let second = tokio::spawn(call(b"", &[]));
    eventually("the second call", || calls.count() == 1).await;
    let (got, reply) = calls.take().pop().unwrap();
    assert_eq!(got.timeout_ms, 0, "no grpc-timeout: no deadline");
    reply.send(&answer("5", "nothing 100%", b""));
    let response = second.await.unwrap().unwrap();
    assert_eq!(status(response.headers()), Some("5"));
    assert_eq!(
        response.headers().get("grpc-message").unwrap(),
        "nothing 100%25"
    );

    // The client's deadline ends an unanswered call, and frees the slot.
    let late = call(b"", &[("grpc-timeout", "200m")]).await.unwrap();
    assert_eq!(status(late.headers()), Some("4"));
    eventually("the slot to be released", || {
        proxy.router().in_flight("b") == 0
    })
    .await;
    drop(calls.take());

    let _ = stop.send(());
    let _ = server.await;
}
