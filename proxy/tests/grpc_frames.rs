//! gRPC calls the proxy terminates (by default): a hand-built
//! snapshot whose one replica is a native frame server with no gRPC server
//! at all (`grpc_addr` empty), so a call only succeeds as a
//! `Payload::Grpc` frame. Checks what the replica receives (path,
//! metadata, message bytes, deadline), the answers (a message and OK
//! trailers, a replica's status trailers-only), that a call holds its slot
//! until answered (a second one is RESOURCE_EXHAUSTED), and the deadline;
//! then server streams: the replica's stream frames become gRPC messages
//! and trailers, the stream holds the slot until it ends, and a client
//! that resets the stream (or its deadline) cancels it on the replica;
//! then client streams: messages as frames within the credited window,
//! the half-close, and the calls the proxy ends (a compressed message, an
//! idle client).
// Test code: an unwrap is an assertion (clippy.toml allows it only in #[test] fns).
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, Error as LegacyError};
use hyper_util::rt::TokioExecutor;
use prost::Message;
use serval_node::replica_server::{Handler, Reply};
use serval_node::test_util::ThreadedReplica;
use serval_protos::control::{Backend, BackendConfig, ClusterSnapshot, Endpoint};
use serval_protos::frame::{GrpcCall, Payload, Request, Response, StreamFrame, STREAM_HEADER};
use serval_proxy::{Proxy, ProxyConfig};

type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

/// Keeps every gRPC call it gets, unanswered, until the test answers it,
/// the ids of the streams the router cancelled, and the client streams'
/// request messages (None: a half-close) by id.
#[derive(Default)]
struct Calls(
    Mutex<Vec<(GrpcCall, Reply)>>,
    Mutex<Vec<u64>>,
    Mutex<Vec<(u64, Option<Vec<u8>>)>>,
);

impl Handler for Calls {
    fn handle(&self, request: Request, reply: Reply) {
        match request.payload {
            Payload::Grpc(call) => self.0.lock().unwrap().push((call, reply)),
            Payload::Cancel => self.1.lock().unwrap().push(reply.id()),
            Payload::GrpcMessage(m) => self.2.lock().unwrap().push((reply.id(), Some(m))),
            Payload::GrpcHalfClose => self.2.lock().unwrap().push((reply.id(), None)),
            _ => {}
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

    fn cancelled(&self, id: u64) -> bool {
        self.1.lock().unwrap().contains(&id)
    }

    /// The request messages of call `id` so far, and whether it half-closed.
    fn requests(&self, id: u64) -> (Vec<Vec<u8>>, bool) {
        let all = self.2.lock().unwrap();
        let mine: Vec<_> = all.iter().filter(|(i, _)| *i == id).collect();
        let half_closed = mine.iter().any(|(_, m)| m.is_none());
        (
            mine.into_iter().filter_map(|(_, m)| m.clone()).collect(),
            half_closed,
        )
    }
}

/// A request body that never sends anything, nor ends.
struct Silent;

impl hyper::body::Body for Silent {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Pending
    }
}

/// The head of a streamed reply.
fn stream_head() -> Response {
    Response {
        status: 200,
        headers: vec![(STREAM_HEADER.into(), "1".into())],
        body: Vec::new(),
    }
}

fn grpc_frame(message: &[u8]) -> Bytes {
    let mut out = vec![0];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out.into()
}

/// A stream chunk carrying `messages`, each length-prefixed.
fn chunk(messages: &[&[u8]]) -> StreamFrame {
    StreamFrame::Chunk(messages.iter().flat_map(|m| grpc_frame(m)).collect())
}

/// A descriptor set declaring `echo.Echo` with the unary method `Say`, the
/// server-streaming `Count` and the client-streaming `Upload`.
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
                method: vec![
                    MethodDescriptorProto {
                        name: Some("Say".into()),
                        input_type: Some(".echo.Msg".into()),
                        output_type: Some(".echo.Msg".into()),
                        ..Default::default()
                    },
                    MethodDescriptorProto {
                        name: Some("Count".into()),
                        input_type: Some(".echo.Msg".into()),
                        output_type: Some(".echo.Msg".into()),
                        server_streaming: Some(true),
                        ..Default::default()
                    },
                    MethodDescriptorProto {
                        name: Some("Upload".into()),
                        input_type: Some(".echo.Msg".into()),
                        output_type: Some(".echo.Msg".into()),
                        client_streaming: Some(true),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

/// Opens the stream of the call `response` awaits (answering its head on
/// the replica), checks that the proxy ends it with status `code` and
/// cancels it on the replica; its id there.
async fn ended_by_the_proxy(
    calls: &Calls,
    response: impl Future<Output = Result<hyper::Response<hyper::body::Incoming>, LegacyError>>
        + Send
        + 'static,
    code: &str,
) -> u64 {
    let response = tokio::spawn(response);
    eventually("the stream's call", || calls.count() == 1).await;
    let (_, reply) = calls.take().pop().unwrap();
    reply.send_frame(&stream_head());
    let body = response.await.unwrap().unwrap().into_body();
    let collected = body.collect().await.unwrap();
    assert_eq!(status(collected.trailers().unwrap()), Some(code));
    eventually("the stream to be cancelled", || calls.cancelled(reply.id())).await;
    reply.id()
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
    // The default path, whatever the environment says (read once by the
    // proxy, before its first call; this binary's only test).
    std::env::remove_var(serval_proxy::grpc::FRAMES_ENV);
    std::env::set_var(serval_proxy::grpc::STREAM_IDLE_ENV, "1");
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
    let upload_client = client.clone();
    let silent_client = client.clone();
    let call_method = move |method: &str, message: &[u8], headers: &[(&str, &str)]| {
        let mut req = hyper::Request::post(format!("http://{addr}/echo.Echo/{method}"))
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
    let call = |message: &[u8], headers: &[(&str, &str)]| call_method("Say", message, headers);
    let count = |headers: &[(&str, &str)]| call_method("Count", b"", headers);
    // A client stream's body: these messages, already framed.
    let upload = |body: Vec<u8>| {
        let req = hyper::Request::post(format!("http://{addr}/echo.Echo/Upload"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        upload_client.request(
            req.body(BoxBody::new(Full::new(Bytes::from(body))))
                .unwrap(),
        )
    };

    // A method the descriptors do not declare is answered by the proxy.
    let undeclared = call_method("Nope", b"", &[]).await.unwrap();
    assert_eq!(status(undeclared.headers()), Some("12"));
    assert_eq!(calls.count(), 0, "not sent to the replica");

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

    // A server stream: each chunk frame (one or more length-prefixed
    // messages) reaches the client as it comes, the end as OK trailers; the
    // stream holds the slot.
    let streaming = tokio::spawn(count(&[]));
    eventually("the stream's call", || calls.count() == 1).await;
    let (got, reply) = calls.take().pop().unwrap();
    assert_eq!(got.path, "/echo.Echo/Count");
    assert!(reply.send_frame(&stream_head()));
    let mut body = streaming.await.unwrap().unwrap().into_body();
    assert!(reply.send_frame(&chunk(&[b"one"])));
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, grpc_frame(b"one"), "a message leaves as it comes");
    let refused = call(b"", &[]).await.unwrap();
    assert_eq!(
        status(refused.headers()),
        Some("8"),
        "the open stream holds the slot"
    );
    assert!(reply.send_frame(&chunk(&[b"two", b"", b"three"])));
    assert!(reply.send_frame(&StreamFrame::End));
    let rest = body.collect().await.unwrap();
    assert_eq!(status(rest.trailers().unwrap()), Some("0"));
    assert_eq!(
        rest.to_bytes(),
        [grpc_frame(b"two"), grpc_frame(b""), grpc_frame(b"three")].concat(),
        "a chunk's messages pass through whole, in order"
    );
    eventually("the stream's slot to be released", || {
        proxy.router().in_flight("b") == 0
    })
    .await;
    assert!(
        !calls.cancelled(reply.id()),
        "a complete stream is not cancelled"
    );

    // The replica's error frame ends the stream with its status.
    let failing = tokio::spawn(count(&[]));
    eventually("the failing stream's call", || calls.count() == 1).await;
    let (_, reply) = calls.take().pop().unwrap();
    reply.send_frame(&stream_head());
    reply.send_frame(&chunk(&[b"one"]));
    reply.send_frame(&StreamFrame::Error(answer("7", "denied 100%", b"")));
    let collected = failing
        .await
        .unwrap()
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    let trailers = collected.trailers().unwrap().clone();
    assert_eq!(status(&trailers), Some("7"));
    assert_eq!(trailers.get("grpc-message").unwrap(), "denied 100%25");
    assert_eq!(collected.to_bytes(), grpc_frame(b"one"));

    // A chunk that is not whole messages ends the stream UNAVAILABLE after
    // the messages before it, cancelled on the replica.
    let broken = tokio::spawn(count(&[]));
    eventually("the broken stream's call", || calls.count() == 1).await;
    let (_, reply) = calls.take().pop().unwrap();
    reply.send_frame(&stream_head());
    reply.send_frame(&chunk(&[b"one"]));
    let mut cut = grpc_frame(b"two").to_vec();
    cut.pop();
    reply.send_frame(&StreamFrame::Chunk(cut));
    let body = broken.await.unwrap().unwrap().into_body();
    let collected = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .expect("the stream ends at the broken chunk")
        .unwrap();
    assert_eq!(status(collected.trailers().unwrap()), Some("14"));
    assert_eq!(collected.to_bytes(), grpc_frame(b"one"));
    eventually("the broken stream to be cancelled", || {
        calls.cancelled(reply.id())
    })
    .await;

    // A client that resets the stream cancels it on the replica, and the
    // slot is freed.
    let dropped = tokio::spawn(count(&[]));
    eventually("the reset stream's call", || calls.count() == 1).await;
    let (_, reply) = calls.take().pop().unwrap();
    reply.send_frame(&stream_head());
    drop(dropped.await.unwrap().unwrap());
    eventually("the replica to get the cancel", || {
        calls.cancelled(reply.id())
    })
    .await;
    eventually("the reset stream's slot to be released", || {
        proxy.router().in_flight("b") == 0
    })
    .await;

    // The client's deadline ends an open stream, cancelling it too.
    ended_by_the_proxy(&calls, count(&[("grpc-timeout", "300m")]), "4").await;

    // A client stream: the replica answers a head at once; the client's
    // messages follow as GrpcMessage frames, at most the window (16) before
    // the replica credits more, then the half-close; the reply's chunk and
    // end are the call's message and OK trailers.
    let messages: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; i as usize]).collect();
    let body: Vec<u8> = messages
        .iter()
        .flat_map(|m| grpc_frame(m).to_vec())
        .collect();
    let uploading = tokio::spawn(upload(body));
    eventually("the upload's call", || calls.count() == 1).await;
    let (got, reply) = calls.take().pop().unwrap();
    assert_eq!(
        (got.path.as_str(), got.message.len()),
        ("/echo.Echo/Upload", 0)
    );
    let id = reply.id();
    assert!(reply.send_frame(&stream_head()));
    eventually("a window of messages", || calls.requests(id).0.len() >= 16).await;
    let (sent, half_closed) = calls.requests(id);
    assert_eq!(
        (sent.len(), half_closed),
        (16, false),
        "no more than the window before a credit"
    );
    assert!(reply.send_frame(&StreamFrame::Credit(8)));
    eventually("the rest and the half-close", || calls.requests(id).1).await;
    assert_eq!(
        calls.requests(id).0,
        messages,
        "every message, in order, untouched"
    );
    assert!(reply.send_frame(&chunk(&[b"got 20"])));
    assert!(reply.send_frame(&StreamFrame::End));
    let collected = uploading
        .await
        .unwrap()
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    assert_eq!(status(collected.trailers().unwrap()), Some("0"));
    assert_eq!(collected.to_bytes(), grpc_frame(b"got 20"));

    // A compressed request message ends the call, cancelling it on the
    // replica.
    let id = ended_by_the_proxy(&calls, upload(vec![1, 0, 0, 0, 1, b'x']), "12").await;
    assert!(calls.requests(id).0.is_empty());

    // A client stream that sends nothing for the idle deadline (1 s here)
    // ends with DEADLINE_EXCEEDED, cancelled on the replica.
    let silent = hyper::Request::post(format!("http://{addr}/echo.Echo/Upload"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(BoxBody::new(Silent))
        .unwrap();
    ended_by_the_proxy(&calls, silent_client.request(silent), "4").await;

    let _ = stop.send(());
    let _ = server.await;
}
