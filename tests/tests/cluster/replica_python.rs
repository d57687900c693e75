//! A real `python -m serval.replica` process hosting cloudpickled user code,
//! driven over the data-plane frame protocol (Unix socket and TCP).
//!
//! Needs the extension built into `.venv` first:
//! `maturin develop -m python-sdk/Cargo.toml` (see python-sdk/).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serval_protos::frame::{
    decode, encode, CallRequest, FrameReader, HttpRequest, PathValue, Payload, ReconfigureRequest,
    Request, Response, ERROR_TYPE_HEADER, PICKLE_CONTENT_TYPE,
};
use serval_protos::handshake::{self, Credential, Key, Role};
use serval_tests::{venv_python, ProcessGuard};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::pki;

const TIMEOUT: Duration = Duration::from_secs(20);

/// Test backends, defined in `__main__` so cloudpickle ships them by value.
const BACKENDS: &str = r#"
import asyncio, json, sys
import cloudpickle
from starlette.requests import Request
from starlette.responses import Response
from serval.request import ServeRequest

class Model:
    def __init__(self, greeting, suffix="!"):
        self.greeting = greeting + suffix
        self.count = 1
        self.config = None

    def reconfigure(self, config):
        if config == "bad":
            raise ValueError("bad config")
        self.config = config

    def __call__(self, request):
        if isinstance(request, ServeRequest):
            return {
                "kind": "handle",
                "method": request.method,
                "header": request.headers.get("X-Custom"),
                "query": dict(request.query_params),
                "data": request.data,
                "json": asyncio.new_event_loop().run_until_complete(request.json()),
            }
        path = request.url.path
        if path == "/boom":
            raise ValueError("kaboom")
        if path == "/resp":
            return Response("Hello, world!", status_code=123, media_type="text/plain")
        if path == "/text":
            return "plain text"
        if path == "/stream":
            from starlette.responses import StreamingResponse
            return StreamingResponse(iter([b"a", b"b", b"c"]), status_code=201, media_type="text/csv")
        if path == "/object":
            return object()
        return {
            "greeting": self.greeting,
            "config": self.config,
            "method": request.method,
            "path_params": request.path_params,
            "types": {k: type(v).__name__ for k, v in request.path_params.items()},
            "query": dict(request.query_params),
            "header": request.headers.get("x-custom"),
        }

    def other_method(self, inc):
        self.count += inc
        return True

    def current(self, request=None):
        return {"current": self.count}

    def fail(self, *args):
        raise KeyError("nope")

    def exit_now(self):
        sys.exit(3)

class PostModel:
    async def __call__(self, request):
        await asyncio.sleep(0)
        if request.url.path == "/form":
            form = await request.form()
            return {"form": dict(form), "body": (await request.body()).decode()}
        if request.method == "POST":
            return {"echo": await request.json(), "len": len(await request.body())}
        return {"i": int(request.query_params["i"])}

class Rendezvous:
    """Each request waits (up to 2 s) until 3 requests have arrived: all 3
    succeed only when 3 run at once."""
    def __init__(self):
        self.arrived = 0
        self.all_in = asyncio.Event()

    async def __call__(self, request):
        self.arrived += 1
        if self.arrived >= 3:
            self.all_in.set()
        await asyncio.wait_for(self.all_in.wait(), 2.0)
        return {"arrived": self.arrived}

class BadInit:
    def __init__(self):
        raise RuntimeError("init exploded")

def hello(request):
    return "hello " + request.query_params.get("name", "nobody")

which = sys.argv[1]
code = {
    "model": (Model, ("hi",), {"suffix": "?"}),
    "post": (PostModel, (), {}),
    "rendezvous": (Rendezvous, (), {}),
    "badinit": (BadInit, (), {}),
    "function": (hello, (), {}),
}[which]
with open(sys.argv[2], "wb") as f:
    cloudpickle.dump(code, f)
"#;

struct Replica {
    guard: ProcessGuard,
    status: serde_json::Value,
    _dir: tempfile::TempDir,
    log: std::path::PathBuf,
}

impl Replica {
    fn unix_path(&self) -> String {
        self.status["unix_path"]
            .as_str()
            .expect("unix_path")
            .to_string()
    }
    fn tcp_addr(&self) -> String {
        self.status["tcp_addr"]
            .as_str()
            .expect("tcp_addr")
            .to_string()
    }
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn write_code(dir: &Path, which: &str) -> std::path::PathBuf {
    let script = dir.join("backends.py");
    std::fs::write(&script, BACKENDS).unwrap();
    let code = dir.join(format!("{which}.pkl"));
    let out = Command::new(venv_python())
        .arg(&script)
        .arg(which)
        .arg(&code)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pickling {which} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    code
}

/// cloudpickle of a Python expression, made by the venv Python.
fn pickle_of(expr: &str) -> Vec<u8> {
    let script =
        format!("import sys, cloudpickle; sys.stdout.buffer.write(cloudpickle.dumps({expr}))");
    let out = Command::new(venv_python())
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Starts a replica and reads its one status line.
fn start(which: &str, config: &str) -> Replica {
    start_with_env(which, config, &[])
}

fn start_with_env(which: &str, config: &str, env: &[(&str, &str)]) -> Replica {
    let dir = tempfile::tempdir().unwrap();
    let code = write_code(dir.path(), which);
    let log = dir.path().join("replica.log");
    let mut cmd = Command::new(venv_python());
    cmd.args([
        "-m",
        "serval.replica",
        "--replica-id",
        "r-1",
        "--backend",
        which,
        "--code-file",
    ])
    .arg(&code)
    .args(["--config-json", config, "--unix-path"])
    .arg(dir.path().join("replica.sock"))
    .args(["--tcp-host", "127.0.0.1"])
    .env(handshake::DATA_KEY_ENV, Key::data_plane(TOKEN).to_hex())
    .env(handshake::AGENT_KEY_ENV, agent_key().to_hex())
    .envs(env.iter().copied())
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(std::fs::File::create(&log).unwrap());
    let mut guard = ProcessGuard::spawn(cmd);
    let stdout = guard.child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let mut reader = BufReader::new(stdout);
        let _ = reader.read_line(&mut line);
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut reader, &mut rest);
        let _ = tx.send((line, rest));
    });
    let (line, rest) = rx.recv_timeout(TIMEOUT).unwrap_or_else(|_| {
        panic!(
            "no status line; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    assert!(
        rest.is_empty(),
        "more than one line on the status fd: {rest:?}"
    );
    let status: serde_json::Value = serde_json::from_str(line.trim())
        .unwrap_or_else(|e| panic!("bad status line {line:?}: {e}"));
    Replica {
        guard,
        status,
        _dir: dir,
        log,
    }
}

/// The cluster token of these replicas: the tests' clients prove keys
/// derived from it, as the proxy and the node agent do.
const TOKEN: &str = "replica-python-test-token";
const REPLICA_ID: &str = "r-1";

fn agent_key() -> Key {
    Key::replica_agent(&Key::agents(TOKEN), REPLICA_ID)
}

fn router() -> Credential {
    Credential {
        role: Role::Router,
        key: Key::data_plane(TOKEN),
    }
}

fn agent() -> Credential {
    Credential {
        role: Role::Agent,
        key: agent_key(),
    }
}

/// A minimal frame client: many requests in flight on one connection.
struct Client<S> {
    write: tokio::io::WriteHalf<S>,
    reader: FrameReader<tokio::io::ReadHalf<S>>,
    next_id: u64,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// Passes the handshake with `credential`, as a router or an agent.
    async fn new(mut stream: S, credential: Credential) -> Self {
        handshake::connect(&mut stream, &credential)
            .await
            .expect("handshake");
        let (read, write) = tokio::io::split(stream);
        Self {
            write,
            reader: FrameReader::new(read),
            next_id: 1,
        }
    }

    async fn send_all(&mut self, requests: &[Request]) -> HashMap<u64, Response> {
        let mut buf = Vec::new();
        let first = self.next_id;
        for r in requests {
            buf.extend_from_slice(&encode(self.next_id, r).unwrap());
            self.next_id += 1;
        }
        self.write.write_all(&buf).await.unwrap();
        let mut out = HashMap::new();
        while out.len() < requests.len() {
            let (id, body) = tokio::time::timeout(TIMEOUT, self.reader.next())
                .await
                .expect("response timed out")
                .unwrap()
                .expect("connection closed early");
            assert!(id >= first && id < self.next_id, "unexpected id {id}");
            assert!(
                out.insert(id - first, decode::<Response>(&body).unwrap())
                    .is_none(),
                "duplicate id {id}"
            );
        }
        out
    }

    async fn send(&mut self, request: Request) -> Response {
        self.send_all(&[request]).await.remove(&0).unwrap()
    }

    /// The body of the streamed reply whose head `send` just returned: its
    /// chunks, up to its end frame.
    async fn stream_rest(&mut self) -> Vec<Vec<u8>> {
        let mut chunks = Vec::new();
        loop {
            let (id, body) = tokio::time::timeout(TIMEOUT, self.reader.next())
                .await
                .expect("stream frame timed out")
                .unwrap()
                .expect("connection closed early");
            assert_eq!(id, self.next_id - 1, "a frame of another request");
            match decode::<serval_protos::frame::StreamFrame>(&body).unwrap() {
                serval_protos::frame::StreamFrame::Chunk(c) => chunks.push(c),
                serval_protos::frame::StreamFrame::End => return chunks,
                other => panic!("unexpected stream frame {other:?}"),
            }
        }
    }
}

async fn unix_client(replica: &Replica) -> Client<tokio::net::UnixStream> {
    unix_client_as(replica, router()).await
}

async fn unix_client_as(
    replica: &Replica,
    credential: Credential,
) -> Client<tokio::net::UnixStream> {
    Client::new(
        tokio::net::UnixStream::connect(replica.unix_path())
            .await
            .unwrap(),
        credential,
    )
    .await
}

fn http(method: &str, path: &str, query: &str, body: &[u8]) -> HttpRequest {
    HttpRequest {
        method: method.into(),
        path: path.into(),
        query: query.into(),
        headers: vec![
            ("Content-Type".into(), "application/json".into()),
            ("X-Custom".into(), "abc".into()),
        ],
        body: body.to_vec(),
        path_params: Vec::new(),
        client: "127.0.0.1:5555".into(),
        raw_path: path.as_bytes().to_vec(),
        root_path: String::new(),
    }
}

fn req(method_name: Option<&str>, payload: Payload) -> Request {
    Request {
        method_name: method_name.map(String::from),
        payload,
    }
}

fn json_body(r: &Response) -> serde_json::Value {
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&r.body)))
}

fn call(args: Vec<u8>) -> CallRequest {
    CallRequest {
        args,
        http_method: "GET".into(),
        http_headers: Vec::new(),
    }
}

#[tokio::test]
async fn http_requests_reach_a_starlette_request() {
    let replica = start(
        "model",
        r#"{"num_replicas":1,"max_concurrent_queries":100,"user_config":{"threshold":0.5},"max_batch_size":0,"batch_wait_timeout":0.0}"#,
    );
    assert_eq!(replica.status["state"], "running", "{}", replica.log());
    assert_eq!(
        replica.status["pid"].as_u64(),
        Some(replica.guard.pid() as u64)
    );
    let mut c = unix_client(&replica).await;

    // JSON result, typed path params, query params, headers, init args, user_config.
    let mut h = http("GET", "/api/123/2.5/bob", "a=b&c=1", b"");
    h.path_params = vec![
        ("user_id".into(), PathValue::Int(123)),
        ("number".into(), PathValue::Float(2.5)),
        ("name".into(), PathValue::Str("bob".into())),
    ];
    let r = c.send(req(None, Payload::Http(h))).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        json_body(&r),
        serde_json::json!({
            "greeting": "hi?",
            "config": {"threshold": 0.5},
            "method": "GET",
            "path_params": {"user_id": 123, "number": 2.5, "name": "bob"},
            "types": {"user_id": "int", "number": "float", "name": "str"},
            "query": {"a": "b", "c": "1"},
            "header": "abc",
        })
    );
    // Compact JSON, as json.dumps(separators=(",", ":")).
    assert!(!String::from_utf8_lossy(&r.body).contains(": "));

    // A starlette Response is kept exactly.
    let r = c
        .send(req(None, Payload::Http(http("GET", "/resp", "", b""))))
        .await;
    assert_eq!(r.status, 123);
    assert_eq!(r.body, b"Hello, world!");
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    // Starlette adds no content-length for a 1xx status; the proxy frames the body.

    // str -> text/plain.
    let r = c
        .send(req(None, Payload::Http(http("GET", "/text", "", b""))))
        .await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"plain text"[..]));
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));

    // A StreamingResponse streams: a head frame, a frame per chunk, the end.
    let r = c
        .send(req(None, Payload::Http(http("GET", "/stream", "", b""))))
        .await;
    assert_eq!((r.status, r.body.as_slice()), (201, &b""[..]));
    assert_eq!(r.header(serval_protos::frame::STREAM_HEADER), Some("1"));
    assert_eq!(r.header("content-type"), Some("text/csv; charset=utf-8"));
    assert_eq!(c.stream_rest().await, [b"a", b"b", b"c"]);

    // A result that is not JSON serializable -> 500 with a clear error.
    let r = c
        .send(req(None, Payload::Http(http("GET", "/object", "", b""))))
        .await;
    assert_eq!(r.status, 500);
    assert!(
        json_body(&r)["error"]
            .as_str()
            .unwrap()
            .contains("not JSON serializable"),
        "{:?}",
        json_body(&r)
    );

    // A user exception -> 500 JSON naming the type, no traceback in the body.
    let r = c
        .send(req(None, Payload::Http(http("GET", "/boom", "", b""))))
        .await;
    assert_eq!(r.status, 500);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        json_body(&r),
        serde_json::json!({"error": "ValueError: kaboom"})
    );
    assert!(
        replica.log().contains("Traceback"),
        "traceback not logged:\n{}",
        replica.log()
    );

    // X-SERVE-CALL-METHOD: another method, and an unknown one.
    let r = c
        .send(req(
            Some("current"),
            Payload::Http(http("GET", "/x", "", b"")),
        ))
        .await;
    assert_eq!(
        (r.status, json_body(&r)),
        (200, serde_json::json!({"current": 1}))
    );
    for name in ["nope", "__init__"] {
        let r = c
            .send(req(Some(name), Payload::Http(http("GET", "/x", "", b""))))
            .await;
        assert_eq!(r.status, 404);
        assert_eq!(r.header(ERROR_TYPE_HEADER), Some("MethodNotFound"));
        assert_eq!(
            json_body(&r),
            serde_json::json!({"error": format!("backend 'model' has no method '{name}'")})
        );
    }

    // Ping never reaches user code.
    let r = c.send(req(None, Payload::Ping)).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn handle_calls_are_pickled_both_ways() {
    let replica = start("model", r#"{"user_config":null}"#);
    assert_eq!(replica.status["state"], "running", "{}", replica.log());
    let mut c = unix_client(&replica).await;

    // handle.options(method_name="other_method").remote(5) -> other_method(5) -> True.
    let r = c
        .send(req(
            Some("other_method"),
            Payload::Call(call(pickle_of("((5,), {})"))),
        ))
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("content-type"), Some(PICKLE_CONTENT_TYPE));
    assert_eq!(r.body, pickle_of("True"));
    // The state changed: current() sees 1 + 5.
    let r = c
        .send(req(
            Some("current"),
            Payload::Call(call(pickle_of("((), {})"))),
        ))
        .await;
    assert_eq!(r.body, pickle_of("{'current': 6}"));

    // __call__ gets a ServeRequest with method, headers, query params, data, json().
    let mut cr = call(pickle_of("(({'x': [1, 2]},), {'a': 'b'})"));
    cr.http_method = "POST".into();
    cr.http_headers = vec![("x-custom".into(), "hdr".into())];
    let r = c.send(req(None, Payload::Call(cr))).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // `data` and `json()` are the same object, so the pickle shares it.
    let expected = pickle_of(
        "(lambda d: {'kind': 'handle', 'method': 'POST', 'header': 'hdr', 'query': {'a': 'b'}, \
         'data': d, 'json': d})({'x': [1, 2]})",
    );
    assert_eq!(r.body, expected);

    // A user exception: 500, the type in x-serval-error, the traceback as body.
    let r = c
        .send(req(
            Some("fail"),
            Payload::Call(call(pickle_of("((), {})"))),
        ))
        .await;
    assert_eq!(r.status, 500);
    assert_eq!(r.header(ERROR_TYPE_HEADER), Some("KeyError"));
    let text = String::from_utf8(r.body.clone()).unwrap();
    assert!(
        text.contains("Traceback") && text.contains("KeyError: 'nope'"),
        "{text}"
    );

    // Unknown method.
    let r = c
        .send(req(
            Some("missing"),
            Payload::Call(call(pickle_of("((), {})"))),
        ))
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.header(ERROR_TYPE_HEADER), Some("MethodNotFound"));
    assert_eq!(
        json_body(&r),
        serde_json::json!({"error": "backend 'model' has no method 'missing'"})
    );

    // Garbage instead of a pickle is a 500, not a dead worker.
    let r = c
        .send(req(None, Payload::Call(call(b"not a pickle".to_vec()))))
        .await;
    assert_eq!(r.status, 500);
    let r = c
        .send(req(
            Some("current"),
            Payload::Call(call(pickle_of("((), {})"))),
        ))
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn async_call_post_json_and_pipelining_over_tcp() {
    let replica = start("post", "{}");
    assert_eq!(replica.status["state"], "running", "{}", replica.log());

    // await request.json() / body() on a POST, over the Unix socket.
    let mut c = unix_client(&replica).await;
    let body = br#"{"name":"serval","n":[1,2,3]}"#;
    let r = c
        .send(req(None, Payload::Http(http("POST", "/", "", body))))
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        json_body(&r),
        serde_json::json!({"echo": {"name": "serval", "n": [1, 2, 3]}, "len": body.len()})
    );

    // await request.form() (Starlette needs python-multipart for any form).
    let has_multipart = Command::new(venv_python())
        .args(["-c", "import multipart"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if has_multipart {
        let mut h = http("POST", "/form", "", b"a=1&b=two");
        h.headers = vec![(
            "content-type".into(),
            "application/x-www-form-urlencoded".into(),
        )];
        let r = c.send(req(None, Payload::Http(h))).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(
            json_body(&r),
            serde_json::json!({"form": {"a": "1", "b": "two"}, "body": "a=1&b=two"})
        );
    } else {
        eprintln!("python-multipart not installed in .venv: form check skipped");
    }

    // 500 requests pipelined on one TCP connection, each answered with its own value.
    let stream = tokio::net::TcpStream::connect(replica.tcp_addr())
        .await
        .unwrap();
    let mut tcp = Client::new(stream, router()).await;
    let requests: Vec<Request> = (0..500)
        .map(|i| {
            req(
                None,
                Payload::Http(http("GET", "/", &format!("i={i}"), b"")),
            )
        })
        .collect();
    let started = Instant::now();
    let responses = tcp.send_all(&requests).await;
    assert_eq!(responses.len(), 500);
    for (i, r) in &responses {
        assert_eq!(r.status, 200);
        assert_eq!(json_body(r), serde_json::json!({"i": i}));
    }
    eprintln!("500 pipelined async requests in {:?}", started.elapsed());
}

#[tokio::test]
async fn function_backend() {
    let replica = start("function", "{}");
    assert_eq!(replica.status["state"], "running", "{}", replica.log());
    let mut c = unix_client(&replica).await;
    let r = c
        .send(req(
            None,
            Payload::Http(http("GET", "/hello", "name=ann", b"")),
        ))
        .await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"hello ann"[..]));
    let r = c
        .send(req(
            Some("__call__"),
            Payload::Http(http("GET", "/hello", "", b"")),
        ))
        .await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"hello nobody"[..]));
    let r = c
        .send(req(
            Some("other"),
            Payload::Http(http("GET", "/hello", "", b"")),
        ))
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.header(ERROR_TYPE_HEADER), Some("MethodNotFound"));
    // A handle call with kwargs reaches the function as a ServeRequest.
    let r = c
        .send(req(
            None,
            Payload::Call(call(pickle_of("((), {'name': 'bo'})"))),
        ))
        .await;
    assert_eq!(r.body, pickle_of("'hello bo'"));
}

#[test]
fn failing_init_reports_failed_with_traceback() {
    let mut replica = start("badinit", "{}");
    assert_eq!(replica.status["state"], "failed");
    let error = replica.status["error"].as_str().unwrap();
    assert!(
        error.contains("Traceback") && error.contains("RuntimeError: init exploded"),
        "{error}"
    );
    let deadline = Instant::now() + TIMEOUT;
    let code = loop {
        if let Some(s) = replica.guard.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "replica did not exit after failing"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code.code(), Some(1));
}

#[test]
fn closing_stdin_stops_the_replica() {
    let mut replica = start("model", "{}");
    assert_eq!(replica.status["state"], "running", "{}", replica.log());
    let sock = replica.unix_path();
    assert!(Path::new(&sock).exists());
    drop(replica.guard.child.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(5);
    let code = loop {
        if let Some(s) = replica.guard.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "replica still alive 5s after stdin closed:\n{}",
            replica.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code.code(), Some(0), "{}", replica.log());
    assert!(!Path::new(&sock).exists(), "socket file left behind");
}

#[test]
fn sigterm_stops_the_replica() {
    let mut replica = start("model", "{}");
    assert_eq!(replica.status["state"], "running", "{}", replica.log());
    let pid = replica.guard.pid().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if replica.guard.child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replica ignored SIGTERM:\n{}",
            replica.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn sys_exit_in_user_code_ends_the_replica_after_answering() {
    let mut replica = start("model", "{}");
    assert_eq!(replica.status["state"], "running", "{}", replica.log());
    let mut c = unix_client(&replica).await;
    let r = c
        .send(req(
            Some("exit_now"),
            Payload::Call(call(pickle_of("((), {})"))),
        ))
        .await;
    assert_eq!(r.status, 500);
    assert_eq!(r.header(ERROR_TYPE_HEADER), Some("SystemExit"));
    let deadline = Instant::now() + Duration::from_secs(5);
    let code = loop {
        if let Some(s) = replica.guard.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "replica survived sys.exit:\n{}",
            replica.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(code.code(), Some(3), "{}", replica.log());
}

#[tokio::test]
async fn async_requests_run_concurrently_up_to_max_concurrent_queries() {
    // Three at once: every request meets the other two.
    let replica = start("rendezvous", r#"{"max_concurrent_queries":3}"#);
    assert_eq!(replica.status["state"], "running", "{}", replica.log());
    let mut c = unix_client(&replica).await;
    let three: Vec<Request> = (0..3)
        .map(|_| req(None, Payload::Http(http("GET", "/", "", b""))))
        .collect();
    let responses = c.send_all(&three).await;
    for r in responses.values() {
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }

    // At most two at once (the replica enforces it even when a router sends
    // more): the first two give up waiting, then the third runs alone.
    let replica = start("rendezvous", r#"{"max_concurrent_queries":2}"#);
    let mut c = unix_client(&replica).await;
    let responses = c.send_all(&three).await;
    let mut statuses: Vec<u16> = responses.values().map(|r| r.status).collect();
    statuses.sort();
    assert_eq!(statuses, vec![200, 500, 500], "{}", replica.log());
    assert_eq!(responses[&2].status, 200);
}

/// Requests beyond what a replica may queue (`SERVAL_REPLICA_MAX_QUEUED`,
/// here 1 waiting in Python and 1 between the threads, behind the one
/// running) get 503 at once instead of growing its memory.
#[tokio::test]
async fn requests_beyond_the_queue_bound_get_503_at_once() {
    let replica = start_with_env(
        "rendezvous",
        r#"{"max_concurrent_queries":1}"#,
        &[("SERVAL_REPLICA_MAX_QUEUED", "1")],
    );
    assert_eq!(replica.status["state"], "running", "{}", replica.log());
    let mut c = unix_client(&replica).await;
    let eight: Vec<Request> = (0..8)
        .map(|_| req(None, Payload::Http(http("GET", "/", "", b""))))
        .collect();
    let responses = c.send_all(&eight).await;
    let full: Vec<&Response> = responses.values().filter(|r| r.status == 503).collect();
    // At most one running, one waiting in Python and one between the
    // threads were taken; every other request was refused, not queued.
    assert!(full.len() >= 5, "{} refused: {:?}", full.len(), responses);
    for r in full {
        assert!(
            String::from_utf8_lossy(&r.body).contains("queue is full"),
            "{}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.header("retry-after"), Some("1"));
    }
}

#[tokio::test]
async fn reconfigure_frame_applies_user_config_in_place() {
    let mut replica = start(
        "model",
        r#"{"max_concurrent_queries":8,"user_config":{"threshold":0.5}}"#,
    );
    assert_eq!(replica.status["state"], "running", "{}", replica.log());
    let mut c = unix_client_as(&replica, agent()).await;
    let get = || req(None, Payload::Http(http("GET", "/", "", b"")));
    assert_eq!(json_body(&c.send(get()).await)["config"]["threshold"], 0.5);

    let reconfigure = |config: &str| {
        req(
            None,
            Payload::Reconfigure(ReconfigureRequest {
                config_json: config.to_string(),
            }),
        )
    };
    let r = c
        .send(reconfigure(
            r#"{"max_concurrent_queries":8,"user_config":{"threshold":0.9}}"#,
        ))
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(json_body(&c.send(get()).await)["config"]["threshold"], 0.9);

    // A reconfigure that raises: 500 with the traceback; the replica keeps
    // serving with the config it had.
    let r = c
        .send(reconfigure(
            r#"{"max_concurrent_queries":8,"user_config":"bad"}"#,
        ))
        .await;
    assert_eq!(r.status, 500);
    let body = String::from_utf8_lossy(&r.body);
    assert!(body.contains("ValueError: bad config"), "{body}");
    assert_eq!(json_body(&c.send(get()).await)["config"]["threshold"], 0.9);
    assert!(
        replica.guard.child.try_wait().unwrap().is_none(),
        "the replica process kept running"
    );
    // A router (a proxy, a handle, another replica) may not reconfigure it.
    let mut router = unix_client(&replica).await;
    let r = router
        .send(reconfigure(
            r#"{"max_concurrent_queries":8,"user_config":{"threshold":0.1}}"#,
        ))
        .await;
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(json_body(&c.send(get()).await)["config"]["threshold"], 0.9);
}

/// The hole found on main: one `Call` frame whose arguments were a pickle of
/// `os.system(...)`, sent to a replica's TCP port by any peer, ran the
/// command. Now nothing is decoded before the peer proves the cluster's key.
#[tokio::test]
async fn a_pickled_frame_from_a_peer_without_the_key_runs_nothing() {
    let replica = start("model", "{}");
    assert_eq!(replica.status["state"], "running", "{}", replica.log());
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pwned");
    let exploit = pickle_of(&format!(
        "type('X', (), {{'__reduce__': lambda self: (__import__('os').system, ('touch {}',))}})()",
        marker.display()
    ));
    let attack = encode(
        1,
        &req(
            None,
            Payload::Call(CallRequest {
                args: exploit,
                ..Default::default()
            }),
        ),
    )
    .unwrap();
    use tokio::io::AsyncReadExt;
    // Straight to the TCP port and the Unix socket, no handshake: the
    // replica sends its challenge, reads a proof's length, and closes.
    let tcp = tokio::net::TcpStream::connect(replica.tcp_addr())
        .await
        .unwrap();
    let unix = tokio::net::UnixStream::connect(replica.unix_path())
        .await
        .unwrap();
    let streams: Vec<Box<dyn Stream>> = vec![Box::new(tcp), Box::new(unix)];
    for mut stream in streams {
        let _ = stream.write_all(&attack).await;
        let mut got = Vec::new();
        tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut got))
            .await
            .expect("the replica closes the connection")
            .ok();
        assert!(got.len() <= 37, "the replica answered: {got:?}");
    }
    // With another cluster's key: refused at the handshake.
    let mut stream = tokio::net::TcpStream::connect(replica.tcp_addr())
        .await
        .unwrap();
    let stranger = Credential {
        role: Role::Router,
        key: Key::data_plane("another-cluster-token"),
    };
    let refused = handshake::connect(&mut stream, &stranger).await;
    assert!(
        matches!(refused, Err(handshake::HandshakeError::Refused)),
        "{refused:?}"
    );
    // The replica still serves its cluster, and never ran the pickle: a
    // call through the handshake completes after the attacks, on the same
    // worker thread that would have unpickled them first.
    let mut c = unix_client(&replica).await;
    let r = c
        .send(req(None, Payload::Http(http("GET", "/", "", b""))))
        .await;
    assert_eq!(r.status, 200);
    assert!(!marker.exists(), "the pickled command ran");
    // The control: the same frame from a member of the cluster is decoded
    // (members are trusted with code: they deploy it), so the pickle above
    // was a live one.
    let mut member = Client::new(
        tokio::net::TcpStream::connect(replica.tcp_addr())
            .await
            .unwrap(),
        router(),
    )
    .await;
    member.write.write_all(&attack).await.unwrap();
    let (_, body) = tokio::time::timeout(TIMEOUT, member.reader.next())
        .await
        .expect("an answer")
        .unwrap()
        .expect("a frame");
    decode::<Response>(&body).unwrap();
    assert!(marker.exists(), "the control pickle did not run");
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Copies bytes both ways between one accepted connection and `to`,
/// keeping what passed from the client to the replica and back.
async fn recording_relay(to: String) -> (String, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let server = tokio::net::TcpStream::connect(to).await.unwrap();
        let (mut client_read, mut client_write) = client.into_split();
        let (mut server_read, mut server_write) = server.into_split();
        let up_record = record.clone();
        let up = async move {
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n @ 1..) = client_read.read(&mut buf).await {
                up_record.lock().unwrap().extend_from_slice(&buf[..n]);
                if server_write.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        };
        let down = async move {
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n @ 1..) = server_read.read(&mut buf).await {
                record.lock().unwrap().extend_from_slice(&buf[..n]);
                if client_write.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        };
        tokio::join!(up, down);
    });
    (addr, seen)
}

/// Issue 19: a replica given its node's certificate and key serves TLS only
/// on TCP. A plaintext peer, even one holding the cluster's key, gets no
/// challenge and has nothing decoded; a TLS client trusting another CA
/// fails; one trusting the cluster's CA passes the handshake inside TLS and
/// gets answers, and what crosses the wire is not the plaintext.
#[tokio::test]
async fn a_replica_with_a_certificate_serves_tls_only_on_tcp() {
    use serval_protos::tls::{connect_replica, DataTlsError, TlsSettings};
    use tokio::io::AsyncReadExt;
    let certs = tempfile::tempdir().unwrap();
    let pki = pki::make_pki(certs.path());
    let other_dir = certs.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other = pki::make_pki(&other_dir);
    let replica = start_with_env(
        "model",
        "{}",
        &[
            ("SERVAL_TLS_CERT", pki.cert.to_str().unwrap()),
            ("SERVAL_TLS_KEY", pki.key.to_str().unwrap()),
        ],
    );
    assert_eq!(replica.status["state"], "running", "{}", replica.log());
    assert_eq!(replica.status["tls"], true, "{}", replica.status);
    let marker = certs.path().join("pwned");
    let exploit = encode(
        1,
        &req(
            None,
            Payload::Call(CallRequest {
                args: pickle_of(&format!(
                    "type('X', (), {{'__reduce__': lambda self: (__import__('os').system, ('touch {}',))}})()",
                    marker.display()
                )),
                ..Default::default()
            }),
        ),
    )
    .unwrap();

    // A plaintext peer with the cluster's key: the replica sends no
    // challenge (it waits for a TLS hello), so the handshake fails.
    let mut plain = tokio::net::TcpStream::connect(replica.tcp_addr())
        .await
        .unwrap();
    let refused = handshake::connect(&mut plain, &router()).await;
    assert!(refused.is_err(), "a plaintext handshake passed");
    // A plaintext peer that sends a frame at once: closed, with no
    // challenge sent and nothing decoded.
    let mut plain = tokio::net::TcpStream::connect(replica.tcp_addr())
        .await
        .unwrap();
    let _ = plain.write_all(&exploit).await;
    let mut got = Vec::new();
    tokio::time::timeout(TIMEOUT, plain.read_to_end(&mut got))
        .await
        .expect("the replica closes the connection")
        .ok();
    assert!(
        !got.windows(4).any(|w| w == b"SRVL"),
        "a plaintext peer got the challenge: {got:?}"
    );

    // A TLS client trusting another CA refuses the replica's certificate.
    let wrong = TlsSettings::load(&other.ca, None).unwrap();
    let stream = tokio::net::TcpStream::connect(replica.tcp_addr())
        .await
        .unwrap();
    let err = connect_replica(Some(&wrong), stream, &replica.tcp_addr())
        .await
        .unwrap_err();
    assert!(
        matches!(err, DataTlsError::Handshake { .. }) && err.to_string().contains("certificate"),
        "{err}"
    );
    // No CA at all: the error says which flag is missing.
    let stream = tokio::net::TcpStream::connect(replica.tcp_addr())
        .await
        .unwrap();
    let err = connect_replica(None, stream, &replica.tcp_addr())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--tls-ca"), "{err}");

    // The cluster's CA, through a relay that records the wire: answers.
    let ca = TlsSettings::load(&pki.ca, None).unwrap();
    let (relay, wire) = recording_relay(replica.tcp_addr()).await;
    let stream = tokio::net::TcpStream::connect(&relay).await.unwrap();
    let tls = connect_replica(Some(&ca), stream, &relay).await.unwrap();
    let mut c = Client::new(tls, router()).await;
    let secret = "a-query-value-only-tls-should-carry";
    let r = c
        .send(req(
            None,
            Payload::Http(http("GET", "/", &format!("q={secret}"), b"")),
        ))
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(json_body(&r)["query"]["q"], secret);
    let wire = wire.lock().unwrap().clone();
    assert!(wire.len() > secret.len(), "the relay saw nothing");
    for plaintext in [secret.as_bytes(), b"SRVL", b"greeting"] {
        assert!(
            !wire.windows(plaintext.len()).any(|w| w == plaintext),
            "{} crossed the wire in plaintext",
            String::from_utf8_lossy(plaintext)
        );
    }
    // The plaintext attempts ran nothing; the same frame from a member
    // over TLS is decoded (so the pickle was a live one).
    assert!(!marker.exists(), "a plaintext peer's pickle ran");
    c.write.write_all(&exploit).await.unwrap();
    let (_, body) = tokio::time::timeout(TIMEOUT, c.reader.next())
        .await
        .expect("an answer")
        .unwrap()
        .expect("a frame");
    decode::<Response>(&body).unwrap();
    assert!(marker.exists(), "the control pickle did not run");
    // The Unix socket (local, in a 0700 directory) stays plaintext.
    let mut local = unix_client(&replica).await;
    let r = local
        .send(req(None, Payload::Http(http("GET", "/", "", b""))))
        .await;
    assert_eq!(r.status, 200);
}
