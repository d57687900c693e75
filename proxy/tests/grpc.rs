//! gRPC through the proxy over real sockets: a hand-built snapshot (no
//! controller) whose one replica's gRPC server is a raw hyper HTTP/2
//! server echoing each request message back as it arrives. Checks that
//! messages stream both ways through the proxy (an echo comes back before
//! the client sends the next message), that trailers arrive, that an open
//! stream holds its replica slot, that an idle client stream is ended, and
//! the proxy's own answers: unknown services, health checks and
//! `/-/grpc-services`.
// Test code: an unwrap is an assertion (clippy.toml allows it only in #[test] fns).
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serval_protos::control::{Backend, BackendConfig, ClusterSnapshot, Endpoint, Replica};
use serval_proxy::{Proxy, ProxyConfig};
use tokio::sync::mpsc;

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn grpc_frame(message: &[u8]) -> Bytes {
    let mut out = vec![0];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out.into()
}

/// The replica's gRPC server: echoes every data frame; `/echo.Echo/Fail`
/// answers trailers-only INTERNAL.
async fn echo_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let service = service_fn(|req: hyper::Request<Incoming>| async move {
                if req.uri().path() == "/echo.Echo/Fail" {
                    let response = hyper::Response::builder()
                        .header("content-type", "application/grpc")
                        .header("grpc-status", "13")
                        .header("grpc-message", "it failed")
                        .body(BoxBody::new(Full::new(Bytes::new())))
                        .unwrap();
                    return Ok::<_, Infallible>(response);
                }
                let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(8);
                tokio::spawn(async move {
                    let mut body = req.into_body();
                    while let Some(Ok(frame)) = body.frame().await {
                        if let Ok(data) = frame.into_data() {
                            if tx.send(Ok(Frame::data(data))).await.is_err() {
                                return;
                            }
                        }
                    }
                    let mut trailers = hyper::HeaderMap::new();
                    trailers.insert("grpc-status", "0".parse().unwrap());
                    let _ = tx.send(Ok(Frame::trailers(trailers))).await;
                });
                let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
                Ok(hyper::Response::builder()
                    .header("content-type", "application/grpc")
                    .body(BoxBody::new(body))
                    .unwrap())
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn snapshot(grpc_addr: &str) -> ClusterSnapshot {
    ClusterSnapshot {
        version: 1,
        backends: vec![Backend {
            name: "b".into(),
            config: Some(BackendConfig {
                max_concurrent_queries: 4,
                ..Default::default()
            }),
            state: "running".into(),
            ..Default::default()
        }],
        endpoints: vec![Endpoint {
            name: "echo-api".into(),
            traffic: HashMap::from([("b".to_string(), 1.0)]),
            grpc_service: "echo.Echo".into(),
            ..Default::default()
        }],
        replicas: vec![Replica {
            id: "b#1".into(),
            backend: "b".into(),
            state: "running".into(),
            grpc_addr: grpc_addr.into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Every test of this binary sets the same idle deadline before its proxy
/// forwards anything (the proxy reads it once), and tests the forwarding
/// path (`SERVAL_GRPC_FRAMES=0`; grpc_frames.rs tests the default one).
fn idle_deadline() {
    std::env::set_var(serval_proxy::grpc::STREAM_IDLE_ENV, "3");
    std::env::set_var(serval_proxy::grpc::FRAMES_ENV, "0");
}

fn grpc_status(headers: &hyper::HeaderMap) -> Option<&str> {
    headers.get("grpc-status").and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_stream_through_the_proxy() {
    idle_deadline();
    let upstream = echo_server().await;
    let proxy = Arc::new(Proxy::new(&ProxyConfig {
        token: serval_node::test_util::TEST_TOKEN.into(),
        ..Default::default()
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serval_proxy::serve(listener, proxy.clone(), async move {
        let _ = stop_rx.await;
    }));
    proxy.apply_snapshot(&snapshot(&upstream.to_string()));
    let client: Client<_, BoxBody> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let request = |path: &str, body: BoxBody| {
        hyper::Request::post(format!("http://{addr}{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)
            .unwrap()
    };

    // A bidirectional stream: each echo arrives before the next message
    // is sent, so neither direction is buffered whole by the proxy.
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(8);
    let body = BoxBody::new(StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    let response = client
        .request(request("/echo.Echo/Chat", body))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    for message in [&b"one"[..], b"two", b"three"] {
        tx.send(Ok(Frame::data(grpc_frame(message)))).await.unwrap();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), grpc_frame(message));
    }
    // The open stream holds its replica slot.
    assert_eq!(proxy.router().in_flight("b"), 1);
    drop(tx);
    let trailers = loop {
        let frame = body.frame().await.unwrap().unwrap();
        if let Ok(trailers) = frame.into_trailers() {
            break trailers;
        }
    };
    assert_eq!(grpc_status(&trailers), Some("0"));
    eventually("the slot to be released", || {
        proxy.router().in_flight("b") == 0
    })
    .await;

    // A replica's error status passes through unchanged.
    let response = client
        .request(request(
            "/echo.Echo/Fail",
            BoxBody::new(Full::new(grpc_frame(b"x"))),
        ))
        .await
        .unwrap();
    assert_eq!(grpc_status(response.headers()), Some("13"));
    assert_eq!(response.headers()["grpc-message"], "it failed");

    // A service no API serves: UNIMPLEMENTED, naming it.
    let response = client
        .request(request(
            "/other.Svc/Call",
            BoxBody::new(Full::new(grpc_frame(b""))),
        ))
        .await
        .unwrap();
    assert_eq!(grpc_status(response.headers()), Some("12"));
    let message = response.headers()["grpc-message"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("unknown service other.Svc"), "{message}");

    // Health checks: a deployed service with a running replica is SERVING
    // (1); an unknown one is NOT_FOUND (5).
    let check = |service: &str| {
        let mut message = vec![0x0a, service.len() as u8];
        message.extend_from_slice(service.as_bytes());
        request(
            "/grpc.health.v1.Health/Check",
            BoxBody::new(Full::new(grpc_frame(&message))),
        )
    };
    let response = client.request(check("echo.Echo")).await.unwrap();
    let collected = response.into_body().collect().await.unwrap();
    assert_eq!(grpc_status(collected.trailers().unwrap()), Some("0"));
    assert_eq!(collected.to_bytes(), grpc_frame(&[0x08, 0x01]));
    let response = client.request(check("nope.Nope")).await.unwrap();
    assert_eq!(grpc_status(response.headers()), Some("5"));

    // The listing `serve.create_endpoint` waits on.
    let http: Client<_, BoxBody> = Client::builder(TokioExecutor::new()).build_http();
    let response = http
        .request(
            hyper::Request::get(format!("http://{addr}/-/grpc-services"))
                .body(BoxBody::new(Full::new(Bytes::new())))
                .unwrap(),
        )
        .await
        .unwrap();
    let listing = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&listing[..], br#"{"echo.Echo":"echo-api"}"#);

    let _ = stop.send(());
    let _ = server.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_replica_refuses_more_grpc_calls_as_resource_exhausted() {
    idle_deadline();
    let upstream = echo_server().await;
    let config = ProxyConfig {
        token: serval_node::test_util::TEST_TOKEN.into(),
        queue_capacity: 0,
        ..Default::default()
    };
    let proxy = Arc::new(Proxy::new(&config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serval_proxy::serve(listener, proxy.clone(), async move {
        let _ = stop_rx.await;
    }));
    let mut snap = snapshot(&upstream.to_string());
    if let Some(c) = snap.backends[0].config.as_mut() {
        c.max_concurrent_queries = 1;
    }
    proxy.apply_snapshot(&snap);
    let client: Client<_, BoxBody> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let call = |body: BoxBody| {
        hyper::Request::post(format!("http://{addr}/echo.Echo/Chat"))
            .header("content-type", "application/grpc")
            .body(body)
            .unwrap()
    };

    // An open stream takes the replica's one slot...
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(8);
    let open = client
        .request(call(BoxBody::new(StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))))
        .await
        .unwrap();
    tx.send(Ok(Frame::data(grpc_frame(b"hold")))).await.unwrap();
    let mut open_body = open.into_body();
    assert!(open_body.frame().await.unwrap().unwrap().is_data());
    // ...so, with no queue, the next call is refused at once.
    let refused = client
        .request(call(BoxBody::new(Full::new(grpc_frame(b"x")))))
        .await
        .unwrap();
    assert_eq!(grpc_status(refused.headers()), Some("8"));

    // Once the stream ends, calls go through again.
    drop(tx);
    while open_body.frame().await.is_some() {}
    eventually("the slot to be released", || {
        proxy.router().in_flight("b") == 0
    })
    .await;
    let response = client
        .request(call(BoxBody::new(Full::new(grpc_frame(b"again")))))
        .await
        .unwrap();
    let collected = response.into_body().collect().await.unwrap();
    assert_eq!(grpc_status(collected.trailers().unwrap()), Some("0"));

    let _ = stop.send(());
    let _ = server.await;
}

/// Metric labels never come from what a client wrote: calls to made-up
/// services, and to made-up methods of a deployed one, are counted under
/// `unknown`, so a flood of them leaves `/-/metrics` the same size; a
/// method the API's descriptors declare keeps its name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_grpc_paths_do_not_grow_the_metrics() {
    idle_deadline();
    use prost::Message;
    let handle =
        serval_proxy::metrics::install(serval_proxy::metrics::prometheus_builder()).unwrap();
    let upstream = echo_server().await;
    let proxy = Arc::new(Proxy::new(&ProxyConfig {
        metrics: Some(handle),
        ..Default::default()
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serval_proxy::serve(listener, proxy.clone(), async move {
        let _ = stop_rx.await;
    }));
    let mut snap = snapshot(&upstream.to_string());
    snap.endpoints[0].grpc_descriptor = prost_types::FileDescriptorSet {
        file: vec![prost_types::FileDescriptorProto {
            name: Some("echo.proto".into()),
            package: Some("echo".into()),
            service: vec![prost_types::ServiceDescriptorProto {
                name: Some("Echo".into()),
                method: vec![prost_types::MethodDescriptorProto {
                    name: Some("Chat".into()),
                    input_type: Some(".google.protobuf.Empty".into()),
                    output_type: Some(".google.protobuf.Empty".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
    .encode_to_vec();
    proxy.apply_snapshot(&snap);
    let client: Client<_, BoxBody> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let call = |path: String| {
        let client = client.clone();
        async move {
            let request = hyper::Request::post(format!("http://{addr}{path}"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(BoxBody::new(Full::new(grpc_frame(b"x"))))
                .unwrap();
            let response = client.request(request).await.unwrap();
            let _ = response.into_body().collect().await;
        }
    };
    let metrics = || async {
        let http: Client<_, BoxBody> = Client::builder(TokioExecutor::new()).build_http();
        let response = http
            .request(
                hyper::Request::get(format!("http://{addr}/-/metrics"))
                    .body(BoxBody::new(Full::new(Bytes::new())))
                    .unwrap(),
            )
            .await
            .unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    };
    // One of each kind first, so every series that can exist does.
    call("/echo.Echo/Chat".into()).await;
    call("/echo.Echo/Made0".into()).await;
    call("/made0.Up/Call".into()).await;
    let before = metrics().await;
    assert!(
        before
            .contains(r#"serval_grpc_requests_total{service="echo.Echo",method="Chat",code="OK"}"#),
        "{before}"
    );
    for i in 1..100 {
        call(format!("/made{i}.Up/Call{i}")).await;
        call(format!("/echo.Echo/Made{i}")).await;
    }
    let after = metrics().await;
    // The other tests of this binary share the recorder and may add a few
    // series meanwhile; 200 made-up paths would add thousands of lines.
    assert!(
        after.lines().count() < before.lines().count() + 100,
        "the metrics grew from {} to {} lines:\n{after}",
        before.lines().count(),
        after.lines().count()
    );
    for line in after.lines().filter(|l| l.starts_with("serval_grpc_")) {
        let label = |name: &str| {
            line.split(&format!("{name}=\""))
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or("")
                .to_owned()
        };
        assert!(
            ["echo.Echo", "unknown", "grpc.health.v1.Health"].contains(&label("service").as_str()),
            "{line}"
        );
        assert!(
            ["Chat", "unknown", "Check"].contains(&label("method").as_str()),
            "{line}"
        );
    }
    assert!(!after.contains("made1"), "{after}");
    assert!(!after.contains("Made1"), "{after}");
    // All counted, under `unknown` (other tests may add a few calls).
    let count = |series: &str| -> u64 {
        after
            .lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let unknown_service = count(
        r#"serval_grpc_requests_total{service="unknown",method="unknown",code="UNIMPLEMENTED"}"#,
    );
    assert!(unknown_service >= 100, "{after}");
    let unknown_method =
        count(r#"serval_grpc_requests_total{service="echo.Echo",method="unknown",code="OK"}"#);
    assert!(unknown_method >= 100, "{after}");
    let _ = stop.send(());
    let _ = server.await;
}

/// A client stream that sends nothing for the idle deadline is ended with
/// DEADLINE_EXCEEDED and frees its replica slot: the echo server alone
/// would keep it open for as long as the client does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_client_stream_ends_with_deadline_exceeded() {
    idle_deadline();
    let upstream = echo_server().await;
    let proxy = Arc::new(Proxy::new(&ProxyConfig {
        token: serval_node::test_util::TEST_TOKEN.into(),
        ..Default::default()
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serval_proxy::serve(listener, proxy.clone(), async move {
        let _ = stop_rx.await;
    }));
    proxy.apply_snapshot(&snapshot(&upstream.to_string()));
    let client: Client<_, BoxBody> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(8);
    let body = BoxBody::new(StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    let request = hyper::Request::post(format!("http://{addr}/echo.Echo/Chat"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap();
    let open = client.request(request).await.unwrap();
    tx.send(Ok(Frame::data(grpc_frame(b"hello"))))
        .await
        .unwrap();
    let mut body = open.into_body();
    assert!(body.frame().await.unwrap().unwrap().is_data());
    assert_eq!(proxy.router().in_flight("b"), 1);

    // Then the client sends nothing, and keeps its stream open.
    let trailers = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(trailers) = frame.into_trailers() {
                return Some(trailers);
            }
        }
        None
    })
    .await
    .expect("the idle deadline ends the call")
    .expect("the call ends with trailers");
    assert_eq!(grpc_status(&trailers), Some("4"));
    eventually("the slot to be released", || {
        proxy.router().in_flight("b") == 0
    })
    .await;
    drop(tx);

    let _ = stop.send(());
    let _ = server.await;
}
