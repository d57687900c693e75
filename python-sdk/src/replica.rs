//! The Rust half of a Python replica (`python -m serval.replica`).
//!
//! [`ReplicaServer`] owns a tokio runtime with ONE worker thread that runs the
//! data-plane frame server (`serval_node::replica_server::serve`) on a Unix
//! socket and a TCP port. Its [`Handler`] does no Python work: it pushes each
//! `(request, reply)` into a crossbeam channel and, when the worker is not
//! already due to look, writes one byte to a wake socket.
//!
//! ONE dedicated Python thread runs an asyncio event loop (`serval._host`)
//! with `loop.add_reader(server.wake_fd, ...)`: the loop sleeps in `epoll`
//! with the GIL released until Rust queues work, then calls
//! [`ReplicaServer::drain`], which, holding the GIL once, hands every queued
//! request (up to `max_drain`, then it wakes the loop again) to the Python
//! dispatch callables. Sync user code runs inline, one call at a time;
//! `async def` code runs as tasks on that loop, and answers later through the
//! [`PyReply`] it was given (from any thread). The main thread only calls
//! [`ReplicaServer::wait`], which sleeps with the GIL released and wakes
//! every 100 ms to run Python signal handlers.
//!
//! Why a wake socket and not a timed poll: the loop wakes exactly when there
//! is work (no latency floor, no idle CPU), and the `pending` flag keeps it to
//! one `write` per burst of requests rather than one per request.
//!
//! Python-facing API (module `serval._native`):
//!
//! ```text
//! ReplicaServer(unix_path: str | None, tcp_host: str | None = "127.0.0.1",
//!               watch_stdin: bool = False, max_drain: int = 64,
//!               native: OnnxModel | None = None)
//!   (with `native`, HTTP POSTs are answered by that model in Rust and
//!   never reach the queue below; see `crate::onnx`)
//!   .unix_path -> str | None          bound Unix socket path
//!   .tcp_addr -> str | None           "host:port" of the TCP listener
//!   .tls -> bool                      it serves TLS only (SERVAL_TLS_CERT and
//!                                     SERVAL_TLS_KEY in the environment)
//!   .wake_fd -> int                   readable when work is queued or the
//!                                     server stops (for loop.add_reader)
//!   .stop_reason -> str | None        why the server stopped, None while running
//!   .reply_batch -> int (settable)    replies a drain gathers per connection
//!                                     before writing them (default 1)
//!   .drain(on_http, on_call, on_reconfigure, poll_us=0, ready=None,
//!          on_ws_open=None, on_ws_event=None) -> int
//!        runs up to max_drain queued requests (the number run); with
//!        poll_us and the loop's ready deque, polls that long for more once
//!        the queue and `ready` are empty:
//!        on_http(method_name: str | None, scope: dict, body: bytes, reply)
//!        on_call(method_name: str | None, args: bytes, http_method: str,
//!                headers: list[tuple[str, str]], reply)
//!        on_reconfigure(config_json: str, reply)
//!        on_ws_open(method_name: str | None, scope: dict, ws: WebSocket)
//!          a WebSocket session opened (scope type "websocket"); without
//!          it the session is denied 404
//!        on_ws_event(connection: int, id: int, kind: str, data)
//!          the client's "text" (str), "bytes" (bytes) or "close"
//!          ((code, reason)) for session ws.key == (connection, id); or
//!          "gone" (id 0, data None): that router connection ended
//!        each returns (status: int, headers: list[tuple[str, str]], body: bytes)
//!        to answer at once, or None when it answers later with
//!        reply.send(status, headers, body). Re-raises KeyboardInterrupt /
//!        SystemExit (after answering that request 500).
//!   .wait(timeout: float | None = None) -> str | None
//!        the stop reason ("stdin closed", "shutdown", ...) or None on timeout
//!   .stop(reason: str = "shutdown") -> None
//!        marks it stopping (stop_reason, wakes the loop): no new request
//!        runs, replies of those running still go out
//!   .shutdown(reason: str = "shutdown") -> None
//!        idempotent: wakes the worker loop, answers queued requests 503,
//!        shuts the runtime down (GIL released), removes the socket file.
//!
//! WebSocket (one per session)
//!   .key -> (int, int)   .open -> bool
//!   .accept(subprotocol=None, headers=[]) .text(str) .binary(bytes)
//!   .close(code=1000, reason="") .deny(status, headers, body)
//!   each sends at once (False once closed/denied or the router is gone);
//!   one dropped while open closes its session with 1011.
//!
//! Reply (one per request)
//!   .send(status, headers, body) -> bool   False if already answered
//!   .answered -> bool
//!   a Reply dropped unanswered answers 503, so no request is ever lost.
//! ```
//!
//! The ASGI scope handed to `on_http` is built here (type, asgi, http_version,
//! method, scheme, path, raw_path, root_path, query_string, headers with
//! lowercase names, client, server, path_params with int/float/str values), so
//! the Python side only wraps it in `starlette.requests.Request`.

use std::cell::RefCell;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use crossbeam_channel::{Receiver, Sender};
use pyo3::exceptions::{PyKeyboardInterrupt, PyOSError, PySystemExit, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};

use crate::onnx::OnnxModel;
use crate::poll::poll_until;
use crossbeam_channel::TrySendError;
use serval_node::replica_server::{self, Handler, Reply};
use serval_onnx::NativeHandler;
use serval_protos::frame::{
    CallRequest, GrpcCall, HttpRequest, PathValue, Payload, Request, Response, StreamFrame,
    WsFrame, ERROR_TYPE_HEADER, GRPC_MESSAGE_HEADER, GRPC_STATUS_HEADER, STREAM_HEADER,
};
use serval_protos::frame_socket::FrameSender;
use serval_protos::handshake::{self, Key, ReplicaKeys};

/// How long a blocked wait sleeps before looking at signals / shutdown again.
const POLL: Duration = Duration::from_millis(100);
/// How long `shutdown` lets the io runtime write out queued replies.
const FLUSH_GRACE: Duration = Duration::from_millis(50);

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ReplicaServer>()?;
    m.add_class::<PyReply>()?;
    m.add_class::<PyWebSocket>()?;
    Ok(())
}

// The big variant is the common one: boxing it would cost an allocation
// per request.
#[allow(clippy::large_enum_variant)]
enum Job {
    Request {
        request: Request,
        reply: Reply,
    },
    /// A router connection ended: the WebSocket sessions and streams on it
    /// are over.
    Closed(u64),
}

impl Job {
    /// Refuses a queued request (a connection's end needs no answer). A
    /// WebSocket open is denied with `response`; a client message that
    /// cannot be queued ends its session with 1013 (try again later), since
    /// a session that lost a message cannot go on.
    fn refuse(self, response: &Response) {
        let Job::Request { reply, request } = self else {
            return;
        };
        match request.payload {
            Payload::WsOpen(_) => {
                reply.send_frame(&WsFrame::Deny(response.clone()));
            }
            Payload::Ws(WsFrame::Close { .. }) => {}
            // A stream's Credit or Cancel is never answered: dropped, the
            // stream waits for the connection's end, which also cancels it.
            Payload::Credit(_) | Payload::Cancel => {
                tracing::warn!("replica queue full: a stream credit or cancel was dropped")
            }
            // A client stream that lost a message cannot go on: it ends
            // (its Python side waits for the connection's end or its
            // deadline, as a stream whose cancel was dropped does).
            Payload::GrpcMessage(_) | Payload::GrpcHalfClose => {
                tracing::warn!("replica queue full: a gRPC client stream was ended");
                reply.send_frame(&StreamFrame::Error(response.clone()));
            }
            Payload::Ws(_) => {
                reply.send_frame(&WsFrame::Close {
                    code: 1013,
                    reason: "the replica is overloaded".into(),
                });
            }
            _ => reply.send(response),
        }
    }
}

/// Wakes the worker's event loop: a socket pair whose read end the loop
/// watches. `pending` is set by whoever writes and cleared by `drain` before
/// it looks at the queue, so a request queued after that is never missed,
/// and a burst of requests costs one write.
struct Wake {
    pending: AtomicBool,
    writer: UnixStream,
    reader: UnixStream,
}

impl Wake {
    fn new() -> std::io::Result<Self> {
        let (writer, reader) = UnixStream::pair()?;
        writer.set_nonblocking(true)?;
        reader.set_nonblocking(true)?;
        Ok(Self {
            pending: AtomicBool::new(false),
            writer,
            reader,
        })
    }

    /// Wakes the loop unless a wake is already pending.
    fn wake(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            self.force();
        }
    }

    /// Wakes the loop. A full socket buffer (WouldBlock) already means awake.
    fn force(&self) {
        self.pending.store(true, Ordering::Release);
        let _ = (&self.writer).write(&[1]);
    }

    /// Called by the worker before it drains the queue. The socket is
    /// emptied BEFORE `pending` is cleared: the other order could swallow
    /// the byte of a `wake` that came in between, leaving `pending` set with
    /// nothing to read, and the loop would never wake again. In this order a
    /// wake that sees `pending` still set has its request in the queue the
    /// caller is about to drain.
    fn clear(&self) {
        let mut buf = [0u8; 256];
        while let Ok(n) = (&self.reader).read(&mut buf) {
            if n < buf.len() {
                break;
            }
        }
        self.pending.store(false, Ordering::SeqCst);
    }
}

/// The replies a `drain` gathered for one router connection.
struct Pending {
    tx: FrameSender,
    frames: BytesMut,
    count: usize,
}

impl Pending {
    /// Writes the gathered replies, if any, and starts a new group.
    fn send(&mut self) {
        if !self.frames.is_empty() {
            let _ = self.tx.send(&self.frames);
            self.frames.clear();
            self.count = 0;
        }
    }
}

/// While a `drain` runs on the Python thread: the replies it produced,
/// gathered per router connection and sent `reply_batch` at a time (and the
/// rest when the drain ends), so a drain of N requests costs N / reply_batch
/// writes instead of N.
struct OutboxState {
    reply_batch: usize,
    pending: Vec<Pending>,
}

thread_local! {
    static OUTBOX: RefCell<Option<OutboxState>> = const { RefCell::new(None) };
}

/// Sends a reply now, or into the drain's outbox when one is open on this thread.
fn deliver(reply: Reply, response: &Response) {
    let (tx, bytes) = reply.into_frame(response);
    let direct = OUTBOX.with(|outbox| {
        let mut outbox = outbox.borrow_mut();
        let Some(state) = outbox.as_mut().filter(|s| s.reply_batch > 1) else {
            return Some((tx, bytes));
        };
        let i = match state.pending.iter().position(|p| p.tx.same_connection(&tx)) {
            Some(i) => i,
            None => {
                state.pending.push(Pending {
                    tx,
                    frames: BytesMut::new(),
                    count: 0,
                });
                state.pending.len() - 1
            }
        };
        let pending = &mut state.pending[i];
        pending.frames.extend_from_slice(&bytes);
        pending.count += 1;
        if pending.count >= state.reply_batch {
            pending.send();
        }
        None
    });
    if let Some((tx, bytes)) = direct {
        let _ = tx.send(&bytes);
    }
}

/// Opens the thread's outbox; dropping it (also on an error path) sends
/// what was gathered.
struct Outbox;

impl Outbox {
    fn open(reply_batch: usize) -> Self {
        OUTBOX.with(|outbox| {
            *outbox.borrow_mut() = Some(OutboxState {
                reply_batch,
                pending: Vec::new(),
            })
        });
        Outbox
    }

    /// Sends every partial group now (before the thread waits for more work).
    fn flush(&self) {
        OUTBOX.with(|outbox| {
            for pending in outbox.borrow_mut().iter_mut().flat_map(|s| &mut s.pending) {
                pending.send();
            }
        });
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.flush();
        OUTBOX.with(|outbox| outbox.borrow_mut().take());
    }
}

impl ReplicaServer {
    /// Polls the queue for up to `budget` with the GIL released (under load
    /// the next request is usually microseconds away: see `poll`); whether
    /// a job is queued. While it polls, `pending` is held so the I/O thread
    /// skips writing the wake socket.
    fn poll_for_job(&self, py: Python<'_>, budget: Duration) -> bool {
        self.wake.pending.store(true, Ordering::SeqCst);
        let (rx, stop) = (&self.rx, &self.stop);
        py.detach(|| poll_until(budget, || !rx.is_empty() || stop.is_stopped()));
        // Released before the last look: a job queued after it writes the
        // wake socket, so the loop cannot sleep through it.
        self.wake.pending.store(false, Ordering::SeqCst);
        !self.rx.is_empty()
    }
}

/// Whether the loop's ready queue is known and empty.
fn loop_is_idle(ready: Option<&Bound<'_, PyAny>>) -> PyResult<bool> {
    match ready {
        Some(ready) => Ok(ready.len()? == 0),
        None => Ok(false),
    }
}

/// Queues every request for the Python thread.
struct QueueHandler {
    tx: Sender<Job>,
    wake: Arc<Wake>,
}

impl Handler for QueueHandler {
    fn handle(&self, request: Request, reply: Reply) {
        match self.tx.try_send(Job::Request { request, reply }) {
            Ok(()) => self.wake.wake(),
            Err(TrySendError::Full(job)) => job.refuse(&queue_full()),
            Err(TrySendError::Disconnected(job)) => {
                job.refuse(&unavailable("replica is shutting down"))
            }
        }
    }

    fn closed(&self, conn: u64) {
        // Blocking send: the end of a connection must not be lost to a full
        // queue (its sessions and streams would wait forever); the Python
        // thread drains it.
        if self.tx.send(Job::Closed(conn)).is_ok() {
            self.wake.wake();
        }
    }
}

/// Requests the replica's I/O thread queues for its Python thread, and (in
/// `serval._host`) requests waiting there beyond `max_concurrent_queries`:
/// `SERVAL_REPLICA_MAX_QUEUED`, default [`DEFAULT_MAX_QUEUED`]. A router
/// sends one replica no more than its limit, but every proxy and handle
/// process is a router of its own, and a sync method can hold the Python
/// thread for long: without a bound the queue grew with them. Beyond it a
/// request gets 503 with `Retry-After` at once.
const DEFAULT_MAX_QUEUED: usize = 10_000;
const MAX_QUEUED_ENV: &str = "SERVAL_REPLICA_MAX_QUEUED";

fn max_queued() -> PyResult<usize> {
    match std::env::var(MAX_QUEUED_ENV) {
        Err(_) => Ok(DEFAULT_MAX_QUEUED),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(PyValueError::new_err(format!(
                "{MAX_QUEUED_ENV} must be a positive whole number, not {v:?}"
            ))),
        },
    }
}

fn queue_full() -> Response {
    let mut response = unavailable("the replica's request queue is full; retry later");
    response.headers.push(("retry-after".into(), "1".into()));
    response
}

/// Set once, when the server starts stopping; wakes `wait` and the worker loop.
struct StopSignal {
    reason: Mutex<Option<String>>,
    cond: Condvar,
    wake: Arc<Wake>,
}

impl StopSignal {
    fn new(wake: Arc<Wake>) -> Self {
        Self {
            reason: Mutex::new(None),
            cond: Condvar::new(),
            wake,
        }
    }

    fn stop(&self, reason: &str) {
        let mut r = self.reason.lock().unwrap();
        if r.is_none() {
            *r = Some(reason.to_string());
        }
        self.cond.notify_all();
        drop(r);
        self.wake.force();
    }

    fn reason(&self) -> Option<String> {
        self.reason.lock().unwrap().clone()
    }

    fn is_stopped(&self) -> bool {
        self.reason.lock().unwrap().is_some()
    }

    /// Waits up to `timeout` for a stop; returns the reason if stopped.
    fn wait(&self, timeout: Duration) -> Option<String> {
        let r = self.reason.lock().unwrap();
        let (r, _) = self
            .cond
            .wait_timeout_while(r, timeout, |r| r.is_none())
            .unwrap();
        r.clone()
    }
}

/// Answers one request, once, from any thread. Dropped unanswered (a task
/// that never finished, a bug) it answers 503, so the router never waits for
/// a response that will not come.
#[pyclass(frozen, name = "Reply", module = "serval._native")]
pub struct PyReply {
    inner: Mutex<Option<Reply>>,
    /// After `start_stream`: the reply its chunks go out on, until the
    /// stream ends. Dropped while still here, the stream ends with an error.
    stream: Mutex<Option<Reply>>,
    /// (connection, request id): what this request's Credit/Cancel frames
    /// name.
    key: (u64, u64),
}

impl PyReply {
    fn new(reply: Reply) -> Self {
        Self {
            key: (reply.connection(), reply.id()),
            inner: Mutex::new(Some(reply)),
            stream: Mutex::new(None),
        }
    }

    fn stream_frame(&self, frame: &StreamFrame, last: bool) -> bool {
        let mut stream = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        let sent = stream.as_ref().is_some_and(|r| r.send_frame(frame));
        if last {
            stream.take();
        }
        sent
    }

    /// Sends `response` unless already answered; true if this call answered.
    fn respond(&self, response: &Response) -> bool {
        let reply = self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
        match reply {
            Some(reply) => {
                deliver(reply, response);
                true
            }
            None => false,
        }
    }
}

#[pymethods]
impl PyReply {
    /// Answers the request; False (and nothing sent) if it was answered before.
    fn send(&self, status: u16, headers: Vec<(String, String)>, body: &[u8]) -> bool {
        self.respond(&Response {
            status,
            headers,
            body: body.to_vec(),
        })
    }

    #[getter]
    fn answered(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }

    /// (connection, request id), as `on_stream` names this request.
    #[getter]
    fn stream_key(&self) -> (u64, u64) {
        self.key
    }

    /// Answers with the head of a streamed reply (status and headers; the
    /// body follows with `send_chunk`, then `end_stream` or `fail_stream`).
    /// False when already answered or the router is gone.
    fn start_stream(&self, status: u16, mut headers: Vec<(String, String)>) -> bool {
        let reply = self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(reply) = reply else {
            return false;
        };
        headers.push((STREAM_HEADER.to_owned(), "1".to_owned()));
        let sent = reply.send_frame(&Response {
            status,
            headers,
            body: Vec::new(),
        });
        if sent {
            *self.stream.lock().unwrap_or_else(|p| p.into_inner()) = Some(reply);
        }
        sent
    }

    /// One chunk of the stream; False when the router is gone.
    fn send_chunk(&self, chunk: &[u8]) -> bool {
        self.stream_frame(&StreamFrame::Chunk(chunk.to_vec()), false)
    }

    /// Ends the stream: complete.
    fn end_stream(&self) -> bool {
        self.stream_frame(&StreamFrame::End, true)
    }

    /// Lets the router send `n` more of a client stream's request messages
    /// (the Handler took that many); False when the router is gone.
    fn grant_requests(&self, n: u32) -> bool {
        self.stream_frame(&StreamFrame::Credit(n), false)
    }

    /// Ends the stream with an error, the response a failed call would get.
    fn fail_stream(&self, status: u16, headers: Vec<(String, String)>, body: &[u8]) -> bool {
        let error = Response {
            status,
            headers,
            body: body.to_vec(),
        };
        self.stream_frame(&StreamFrame::Error(error), true)
    }
}

impl Drop for PyReply {
    fn drop(&mut self) {
        if let Some(reply) = self
            .stream
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            reply.send_frame(&StreamFrame::Error(unavailable(
                "the replica dropped the stream before its end",
            )));
        }
        if let Some(reply) = self
            .inner
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            reply.send(&unavailable(
                "the replica dropped the request without answering",
            ));
        }
    }
}

/// The keys this replica's frame server checks peers with, from the
/// environment its node agent set. There is no way to serve without them:
/// a replica port that takes frames from anyone runs anyone's pickles.
/// `agent_key`: the agent key as hex when the caller already took it out of
/// the environment (so that user code loaded before cannot read it).
fn replica_keys(agent_key: Option<String>) -> PyResult<ReplicaKeys> {
    let key = |name: &str, given: Option<String>| {
        let text = match given {
            Some(text) => text,
            None => std::env::var(name).map_err(|_| {
                PyValueError::new_err(format!(
                    "{name} is not set: a replica needs the data-plane keys its node agent gives it"
                ))
            })?,
        };
        Key::from_hex(&text)
            .ok_or_else(|| PyValueError::new_err(format!("{name} must be 64 hex digits")))
    };
    Ok(ReplicaKeys {
        data: key(handshake::DATA_KEY_ENV, None)?,
        agent: key(handshake::AGENT_KEY_ENV, agent_key)?,
    })
}

/// The frame server of one Python replica. See the module docs for the API.
#[pyclass(frozen, module = "serval._native")]
pub struct ReplicaServer {
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    serve_stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    rx: Receiver<Job>,
    wake: Arc<Wake>,
    stop: Arc<StopSignal>,
    unix_path: Option<PathBuf>,
    tcp_addr: Option<String>,
    /// The TCP listener serves TLS (`SERVAL_TLS_CERT`/`SERVAL_TLS_KEY`).
    tls: bool,
    max_drain: usize,
    /// Replies a drain gathers per connection before it sends them.
    reply_batch: AtomicUsize,
    max_queued: usize,
}

#[pymethods]
impl ReplicaServer {
    #[new]
    #[pyo3(signature = (unix_path, tcp_host = Some("127.0.0.1".to_string()), watch_stdin = false, max_drain = 64, native = None, agent_key = None))]
    fn new(
        py: Python<'_>,
        unix_path: Option<PathBuf>,
        tcp_host: Option<String>,
        watch_stdin: bool,
        max_drain: usize,
        native: Option<PyRef<'_, OnnxModel>>,
        agent_key: Option<String>,
    ) -> PyResult<Self> {
        if unix_path.is_none() && tcp_host.is_none() {
            return Err(PyValueError::new_err(
                "ReplicaServer needs a unix_path or a tcp_host",
            ));
        }
        init_tracing();
        let keys = replica_keys(agent_key)?;
        // The node's data-plane identity, when it has one: TCP is TLS only.
        let tls = serval_protos::tls::DataPlaneIdentity::from_env()
            .map_err(|e| PyValueError::new_err(e.to_string()))?
            .map(|identity| identity.acceptor().clone());
        let serves_tls = tls.is_some() && tcp_host.is_some();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("serval-replica-io")
            .enable_all()
            .build()
            .map_err(|e| PyOSError::new_err(format!("cannot start the replica runtime: {e}")))?;
        let (unix, tcp, tcp_addr) = {
            let _enter = runtime.enter();
            let unix = match &unix_path {
                Some(p) => Some(replica_server::bind_unix(p).map_err(|e| {
                    PyOSError::new_err(format!("cannot bind unix socket {}: {e}", p.display()))
                })?),
                None => None,
            };
            let (tcp, tcp_addr) = match &tcp_host {
                Some(host) => {
                    let std_listener = std::net::TcpListener::bind((host.as_str(), 0))
                        .and_then(|l| l.set_nonblocking(true).map(|_| l))
                        .map_err(|e| {
                            PyOSError::new_err(format!("cannot bind tcp {host}:0: {e}"))
                        })?;
                    let addr = std_listener
                        .local_addr()
                        .map_err(|e| PyOSError::new_err(e.to_string()))?;
                    let listener = tokio::net::TcpListener::from_std(std_listener)
                        .map_err(|e| PyOSError::new_err(e.to_string()))?;
                    (Some(listener), Some(addr.to_string()))
                }
                None => (None, None),
            };
            (unix, tcp, tcp_addr)
        };
        let wake = Arc::new(
            Wake::new()
                .map_err(|e| PyOSError::new_err(format!("cannot create the wake socket: {e}")))?,
        );
        let max_queued = max_queued()?;
        let (tx, rx) = crossbeam_channel::bounded::<Job>(max_queued);
        let (serve_tx, serve_rx) = tokio::sync::oneshot::channel::<()>();
        let mut handler: Arc<dyn Handler> = Arc::new(QueueHandler {
            tx,
            wake: wake.clone(),
        });
        if let Some(model) = native {
            // POSTs are answered by the model in Rust; the rest goes on to Python.
            handler = Arc::new(
                NativeHandler::start(model.model.clone(), model.config.clone(), handler).map_err(
                    |e| PyOSError::new_err(format!("cannot start the model threads: {e}")),
                )?,
            );
        }
        runtime.spawn(replica_server::serve(
            unix,
            tcp,
            tls,
            keys,
            handler,
            async move {
                let _ = serve_rx.await;
            },
        ));
        let stop = Arc::new(StopSignal::new(wake.clone()));
        if watch_stdin {
            let stop = stop.clone();
            // Detached: blocked in read(0) until EOF, which means the agent died.
            std::thread::Builder::new()
                .name("serval-stdin-watch".into())
                .spawn(move || {
                    let mut stdin = std::io::stdin();
                    let mut buf = [0u8; 512];
                    loop {
                        match stdin.read(&mut buf) {
                            Ok(0) => break,
                            Ok(_) => continue,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                            Err(_) => break,
                        }
                    }
                    stop.stop("stdin closed");
                })
                .map_err(|e| PyOSError::new_err(e.to_string()))?;
        }
        let _ = py;
        Ok(Self {
            runtime: Mutex::new(Some(runtime)),
            serve_stop: Mutex::new(Some(serve_tx)),
            rx,
            wake,
            stop,
            unix_path,
            tcp_addr,
            tls: serves_tls,
            max_drain: max_drain.max(1),
            reply_batch: AtomicUsize::new(1),
            max_queued,
        })
    }

    /// Replies a drain gathers per router connection before it writes them
    /// (at least 1; the rest go when the drain ends). Fewer writes, but a
    /// router waits on held replies before it may send this replica more
    /// (`max_concurrent_queries`), so the host sets it from that limit.
    #[getter]
    fn reply_batch(&self) -> usize {
        self.reply_batch.load(Ordering::Relaxed)
    }

    #[setter]
    fn set_reply_batch(&self, n: usize) {
        self.reply_batch.store(n.max(1), Ordering::Relaxed);
    }

    /// What may queue for the Python thread, and so also wait in the host
    /// beyond `max_concurrent_queries` (`SERVAL_REPLICA_MAX_QUEUED`).
    #[getter]
    fn max_queued(&self) -> usize {
        self.max_queued
    }

    #[getter]
    fn unix_path(&self) -> Option<String> {
        self.unix_path.as_ref().map(|p| p.display().to_string())
    }

    #[getter]
    fn tcp_addr(&self) -> Option<String> {
        self.tcp_addr.clone()
    }

    /// Whether `tcp_addr` serves TLS only.
    #[getter]
    fn tls(&self) -> bool {
        self.tls
    }

    #[getter]
    fn wake_fd(&self) -> i32 {
        self.wake.reader.as_raw_fd()
    }

    #[getter]
    fn stop_reason(&self) -> Option<String> {
        self.stop.reason()
    }

    /// Hands up to `max_drain` queued requests to the dispatch callables
    /// (see the module docs); returns how many. Call it when `wake_fd` is
    /// readable: it consumes the wake, and wakes the loop again itself when
    /// it leaves requests queued. With `poll_us` and `ready` (the loop's
    /// queue of ready callbacks), once the queue is empty and nothing is
    /// ready on the loop, it polls for more requests that long (GIL
    /// released) and runs what arrived: see [`ReplicaServer::poll_for_job`].
    #[pyo3(signature = (on_http, on_call, on_reconfigure, poll_us = 0, ready = None, on_ws_open = None, on_ws_event = None, on_stream = None, on_grpc = None, on_grpc_message = None))]
    #[allow(clippy::too_many_arguments)]
    fn drain(
        &self,
        py: Python<'_>,
        on_http: Bound<'_, PyAny>,
        on_call: Bound<'_, PyAny>,
        on_reconfigure: Bound<'_, PyAny>,
        poll_us: u64,
        ready: Option<Bound<'_, PyAny>>,
        on_ws_open: Option<Bound<'_, PyAny>>,
        on_ws_event: Option<Bound<'_, PyAny>>,
        on_stream: Option<Bound<'_, PyAny>>,
        on_grpc: Option<Bound<'_, PyAny>>,
        on_grpc_message: Option<Bound<'_, PyAny>>,
    ) -> PyResult<usize> {
        self.wake.clear();
        if self.stop.is_stopped() {
            // `shutdown` answers whatever is still queued.
            return Ok(0);
        }
        let outbox = Outbox::open(self.reply_batch.load(Ordering::Relaxed));
        let mut ran = 0;
        // Once per drain, so the loop gets its turn after each batch.
        let mut poll = Duration::from_micros(poll_us);
        while ran < self.max_drain {
            let Ok(job) = self.rx.try_recv() else {
                // Tasks the requests started (async methods, background
                // tasks) run on the loop: never keep them waiting. Asked
                // only while the poll is still to come.
                if poll.is_zero() || !loop_is_idle(ready.as_ref())? {
                    return Ok(ran);
                }
                outbox.flush();
                if !self.poll_for_job(py, std::mem::take(&mut poll)) {
                    return Ok(ran);
                }
                continue;
            };
            ran += 1;
            let dispatch = Dispatch {
                on_http: &on_http,
                on_call: &on_call,
                on_reconfigure: &on_reconfigure,
                ws: (on_ws_open.as_ref(), on_ws_event.as_ref()),
                on_stream: on_stream.as_ref(),
                on_grpc: on_grpc.as_ref(),
                on_grpc_message: on_grpc_message.as_ref(),
            };
            run_job(py, job, &dispatch)?;
        }
        if !self.rx.is_empty() {
            // Let the loop run ready tasks before the next round.
            self.wake.force();
        }
        Ok(ran)
    }

    /// Blocks (GIL released) until the server stops or `timeout` passes;
    /// runs signal handlers every 100 ms, so SIGINT/SIGTERM handlers raise here.
    #[pyo3(signature = (timeout = None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<String>> {
        let deadline = timeout.map(|t| Instant::now() + Duration::from_secs_f64(t.max(0.0)));
        loop {
            let step = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(self.stop.reason());
                    }
                    left.min(POLL)
                }
                None => POLL,
            };
            let stop = &self.stop;
            if let Some(reason) = py.detach(|| stop.wait(step)) {
                return Ok(Some(reason));
            }
            py.check_signals()?;
        }
    }

    /// Marks the server stopping and wakes the worker loop, which then
    /// runs no new request; replies still go out until `shutdown`.
    #[pyo3(signature = (reason = "shutdown"))]
    fn stop(&self, reason: &str) {
        self.stop.stop(reason);
    }

    /// Stops serving. Safe to call more than once and from any thread.
    #[pyo3(signature = (reason = "shutdown"))]
    fn shutdown(&self, py: Python<'_>, reason: &str) {
        self.stop.stop(reason);
        if let Some(tx) = self.serve_stop.lock().unwrap().take() {
            let _ = tx.send(());
        }
        while let Ok(job) = self.rx.try_recv() {
            job.refuse(&unavailable("replica is shutting down"));
        }
        let runtime = self.runtime.lock().unwrap().take();
        if let Some(rt) = runtime {
            py.detach(move || {
                // Let the connection writers flush replies already queued
                // (e.g. the 500 for a request whose user code called sys.exit).
                rt.block_on(async { tokio::time::sleep(FLUSH_GRACE).await });
                rt.shutdown_timeout(Duration::from_secs(2))
            });
        }
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for ReplicaServer {
    fn drop(&mut self) {
        // Normally `shutdown()` already took the runtime; never block here,
        // the GIL may be held (interpreter finalization).
        if let Some(rt) = self.runtime.get_mut().ok().and_then(|r| r.take()) {
            rt.shutdown_background();
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SERVAL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn plain(status: u16, error_type: Option<&str>, message: &str) -> Response {
    let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
    if let Some(t) = error_type {
        headers.push((ERROR_TYPE_HEADER.to_string(), t.to_string()));
    }
    Response {
        status,
        headers,
        body: serde_json::json!({ "error": message })
            .to_string()
            .into_bytes(),
    }
}

fn unavailable(message: &str) -> Response {
    plain(503, Some("ReplicaUnavailable"), message)
}

/// The host's callables one drain hands requests to.
struct Dispatch<'a, 'py> {
    on_http: &'a Bound<'py, PyAny>,
    on_call: &'a Bound<'py, PyAny>,
    on_reconfigure: &'a Bound<'py, PyAny>,
    ws: WsDispatch<'a, 'py>,
    on_stream: Option<&'a Bound<'py, PyAny>>,
    on_grpc: Option<&'a Bound<'py, PyAny>>,
    on_grpc_message: Option<&'a Bound<'py, PyAny>>,
}

/// Hands one request to Python. The request is always answered: by the
/// returned tuple, later through its `Reply`, or here with a 500 when the
/// dispatch itself raised. `Err` only for KeyboardInterrupt / SystemExit:
/// those end the worker.
fn run_job(py: Python<'_>, job: Job, d: &Dispatch<'_, '_>) -> PyResult<()> {
    let (request, reply) = match job {
        Job::Request { request, reply } => (request, reply),
        Job::Closed(conn) => {
            stream_signal(py, d.on_stream, (conn, None, -1));
            return run_ws(py, d.ws, WsJob::Closed(conn));
        }
    };
    let request = match request.payload {
        Payload::WsOpen(http) => {
            return run_ws(py, d.ws, WsJob::Open(request.method_name, http, reply))
        }
        Payload::Ws(frame) => return run_ws(py, d.ws, WsJob::Frame(reply, frame)),
        // Stream signals, never answered.
        Payload::Credit(n) => {
            let key = (reply.connection(), Some(reply.id()), i64::from(n));
            stream_signal(py, d.on_stream, key);
            return Ok(());
        }
        Payload::Cancel => {
            stream_signal(py, d.on_stream, (reply.connection(), Some(reply.id()), -1));
            return Ok(());
        }
        // A client stream's next request message, or its end (None).
        Payload::GrpcMessage(message) => {
            let message = PyBytes::new(py, &message);
            grpc_message(
                py,
                d.on_grpc_message,
                (reply.connection(), reply.id(), Some(message)),
            );
            return Ok(());
        }
        Payload::GrpcHalfClose => {
            grpc_message(
                py,
                d.on_grpc_message,
                (reply.connection(), reply.id(), None),
            );
            return Ok(());
        }
        payload => Request {
            method_name: request.method_name,
            payload,
        },
    };
    let method_name = request.method_name;
    if let Payload::Ping = request.payload {
        deliver(
            reply,
            &Response {
                status: 200,
                headers: Vec::new(),
                body: b"pong".to_vec(),
            },
        );
        return Ok(());
    }
    let reply = Bound::new(py, PyReply::new(reply))?;
    let result = match request.payload {
        Payload::Http(http) => http_args(py, http)
            .and_then(|(scope, body)| d.on_http.call1((method_name, scope, body, &reply))),
        Payload::Call(call) => call_args(py, call).and_then(|(args, method, headers)| {
            d.on_call
                .call1((method_name, args, method, headers, &reply))
        }),
        Payload::Reconfigure(r) => d.on_reconfigure.call1((r.config_json, &reply)),
        Payload::Grpc(call) => match d.on_grpc {
            Some(on_grpc) => grpc_args(py, call).and_then(|(path, message, metadata, timeout)| {
                on_grpc.call1((path, message, metadata, timeout, &reply))
            }),
            None => Ok(grpc_unimplemented(py, &call.path)?.into_any()),
        },
        // The frame server answers these itself; they never reach Python.
        Payload::Ping | Payload::Logs(_) => unreachable!("answered by the frame server"),
        Payload::WsOpen(_) | Payload::Ws(_) => unreachable!("dispatched by run_ws"),
        Payload::Credit(_) | Payload::Cancel | Payload::GrpcMessage(_) | Payload::GrpcHalfClose => {
            unreachable!("taken as stream signals above")
        }
    };
    let result = result.and_then(|r| {
        if r.is_none() {
            Ok(None)
        } else {
            to_response(&r).map(Some)
        }
    });
    match result {
        Ok(Some(response)) => {
            reply.get().respond(&response);
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(err) => {
            let fatal = err.is_instance_of::<PyKeyboardInterrupt>(py)
                || err.is_instance_of::<PySystemExit>(py);
            let kind = err
                .get_type(py)
                .name()
                .map(|n| n.to_string())
                .unwrap_or_else(|_| "Exception".into());
            let message = format!("replica dispatch failed: {kind}: {}", err.value(py));
            reply.get().respond(&plain(500, Some(&kind), &message));
            if fatal {
                return Err(err);
            }
            tracing::error!("{message}");
            err.display(py);
            Ok(())
        }
    }
}

/// The host's WebSocket callables, when it has them: `on_ws_open(method_name,
/// scope, ws)` and `on_ws_event(connection, id, kind, data)`.
type WsDispatch<'a, 'py> = (Option<&'a Bound<'py, PyAny>>, Option<&'a Bound<'py, PyAny>>);

enum WsJob {
    Open(Option<String>, HttpRequest, Reply),
    Frame(Reply, WsFrame),
    Closed(u64),
}

/// Hands one WebSocket event to Python: a session opened (with its
/// [`PyWebSocket`]), a client's message or close, or the end of a router
/// connection (kind "gone": its sessions are over). A session the host
/// cannot take is denied 404; a callable that raised is logged (an open
/// then answers 500). `Err` only for KeyboardInterrupt / SystemExit.
fn run_ws(py: Python<'_>, (on_open, on_event): WsDispatch<'_, '_>, job: WsJob) -> PyResult<()> {
    let result = match job {
        WsJob::Open(method_name, http, reply) => {
            let Some(on_open) = on_open else {
                reply.send_frame(&WsFrame::Deny(plain(
                    404,
                    None,
                    "this replica serves no WebSocket",
                )));
                return Ok(());
            };
            let ws = Bound::new(py, PyWebSocket::new(reply))?;
            let called = websocket_scope(py, http)
                .and_then(|scope| on_open.call1((method_name, scope, &ws)));
            if called.is_err() {
                ws.get().finish(WsFrame::Deny(plain(
                    500,
                    None,
                    "the replica could not open the WebSocket",
                )));
            }
            called.map(|_| ())
        }
        WsJob::Frame(reply, frame) => {
            let Some(on_event) = on_event else {
                return Ok(());
            };
            let (conn, id) = (reply.connection(), reply.id());
            match frame {
                WsFrame::Text(text) => on_event.call1((conn, id, intern!(py, "text"), text)),
                WsFrame::Binary(data) => {
                    on_event.call1((conn, id, intern!(py, "bytes"), PyBytes::new(py, &data)))
                }
                WsFrame::Close { code, reason } => {
                    on_event.call1((conn, id, intern!(py, "close"), (code, reason)))
                }
                // Only a replica sends these.
                WsFrame::Accept { .. } | WsFrame::Deny(_) => return Ok(()),
            }
            .map(|_| ())
        }
        WsJob::Closed(conn) => match on_event {
            Some(on_event) => on_event
                .call1((conn, 0u64, intern!(py, "gone"), py.None()))
                .map(|_| ()),
            None => Ok(()),
        },
    };
    match result {
        Ok(()) => Ok(()),
        Err(err)
            if err.is_instance_of::<PyKeyboardInterrupt>(py)
                || err.is_instance_of::<PySystemExit>(py) =>
        {
            Err(err)
        }
        Err(err) => {
            tracing::error!("websocket dispatch failed: {}", err.value(py));
            err.display(py);
            Ok(())
        }
    }
}

/// One WebSocket session's way back to its router: the app's accept,
/// messages and close (or the HTTP answer that refuses it), each sent at
/// once. After a close or a deny it sends nothing more.
#[pyclass(frozen, name = "WebSocket", module = "serval._native")]
pub struct PyWebSocket {
    reply: Mutex<Option<Reply>>,
    /// `(connection, id)`: the key the host keeps the session under.
    key: (u64, u64),
}

impl PyWebSocket {
    fn new(reply: Reply) -> Self {
        Self {
            key: (reply.connection(), reply.id()),
            reply: Mutex::new(Some(reply)),
        }
    }

    fn send(&self, frame: &WsFrame) -> bool {
        let reply = self.reply.lock().unwrap_or_else(|p| p.into_inner());
        reply.as_ref().is_some_and(|r| r.send_frame(frame))
    }

    /// Sends the last frame of the session.
    fn finish(&self, frame: WsFrame) -> bool {
        let reply = self.reply.lock().unwrap_or_else(|p| p.into_inner()).take();
        reply.is_some_and(|r| r.send_frame(&frame))
    }
}

#[pymethods]
impl PyWebSocket {
    #[getter]
    fn key(&self) -> (u64, u64) {
        self.key
    }

    /// Whether the session still sends (no close or deny yet).
    #[getter]
    fn open(&self) -> bool {
        self.reply
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    #[pyo3(signature = (subprotocol = None, headers = Vec::new()))]
    fn accept(&self, subprotocol: Option<String>, headers: Vec<(String, String)>) -> bool {
        self.send(&WsFrame::Accept {
            subprotocol,
            headers,
        })
    }

    fn text(&self, text: String) -> bool {
        self.send(&WsFrame::Text(text))
    }

    fn binary(&self, data: &[u8]) -> bool {
        self.send(&WsFrame::Binary(data.to_vec()))
    }

    #[pyo3(signature = (code = 1000, reason = String::new()))]
    fn close(&self, code: u16, reason: String) -> bool {
        self.finish(WsFrame::Close { code, reason })
    }

    /// Refuses the session before it was accepted with this HTTP answer.
    fn deny(&self, status: u16, headers: Vec<(String, String)>, body: &[u8]) -> bool {
        self.finish(WsFrame::Deny(Response {
            status,
            headers,
            body: body.to_vec(),
        }))
    }
}

impl Drop for PyWebSocket {
    fn drop(&mut self) {
        // A session dropped by the host without an end still ends.
        if let Some(reply) = self
            .reply
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            reply.send_frame(&WsFrame::Close {
                code: 1011,
                reason: "the replica dropped the session".into(),
            });
        }
    }
}

/// The ASGI scope of a WebSocket session: the HTTP scope of its upgrade
/// request, typed `websocket`, with the subprotocols the client offered and
/// the denial-response extension.
fn websocket_scope(py: Python<'_>, http: HttpRequest) -> PyResult<Bound<'_, PyDict>> {
    let subprotocols: Vec<String> = http
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("sec-websocket-protocol"))
        .flat_map(|(_, v)| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect();
    let (scope, _) = http_args(py, http)?;
    scope.set_item(intern!(py, "type"), intern!(py, "websocket"))?;
    scope.set_item(intern!(py, "scheme"), intern!(py, "ws"))?;
    scope.del_item(intern!(py, "method"))?;
    scope.set_item(intern!(py, "subprotocols"), subprotocols)?;
    let extensions = PyDict::new(py);
    extensions.set_item(intern!(py, "websocket.http.response"), PyDict::new(py))?;
    scope.set_item(intern!(py, "extensions"), extensions)?;
    Ok(scope)
}

/// A router's signal for a stream: `on_stream(conn, id, credit)`, credit
/// -1 to cancel, id None for every stream of a closed connection.
fn stream_signal(
    py: Python<'_>,
    on_stream: Option<&Bound<'_, PyAny>>,
    signal: (u64, Option<u64>, i64),
) {
    if let Some(on_stream) = on_stream {
        if let Err(err) = on_stream.call1(signal) {
            tracing::error!("stream signal failed: {}", err.value(py));
        }
    }
}

/// A client stream's request message (or its end, None) for
/// `on_grpc_message(conn, id, message)`.
fn grpc_message(
    py: Python<'_>,
    on_grpc_message: Option<&Bound<'_, PyAny>>,
    message: (u64, u64, Option<Bound<'_, PyBytes>>),
) {
    if let Some(on_grpc_message) = on_grpc_message {
        if let Err(err) = on_grpc_message.call1(message) {
            tracing::error!(
                "a gRPC request message could not be delivered: {}",
                err.value(py)
            );
        }
    }
}

fn to_response(result: &Bound<'_, PyAny>) -> PyResult<Response> {
    let (status, headers, body): (u16, Vec<(String, String)>, Bound<'_, PyBytes>) =
        result.extract()?;
    Ok(Response {
        status,
        headers,
        body: body.as_bytes().to_vec(),
    })
}

/// `(scope, body)` for `on_http`.
fn http_args(
    py: Python<'_>,
    http: HttpRequest,
) -> PyResult<(Bound<'_, PyDict>, Bound<'_, PyBytes>)> {
    let scope = PyDict::new(py);
    scope.set_item(intern!(py, "type"), intern!(py, "http"))?;
    scope.set_item(intern!(py, "asgi"), asgi_version(py)?)?;
    scope.set_item(intern!(py, "http_version"), intern!(py, "1.1"))?;
    scope.set_item(intern!(py, "method"), method_str(py, &http.method))?;
    scope.set_item(intern!(py, "scheme"), intern!(py, "http"))?;
    scope.set_item(intern!(py, "path"), PyString::new(py, &http.path))?;
    // The decoded path the proxy routed on, and the bytes the client sent.
    scope.set_item(intern!(py, "raw_path"), PyBytes::new(py, &http.raw_path))?;
    scope.set_item(intern!(py, "root_path"), PyString::new(py, &http.root_path))?;
    scope.set_item(
        intern!(py, "query_string"),
        PyBytes::new(py, http.query.as_bytes()),
    )?;
    let headers = PyList::empty(py);
    for (name, value) in &http.headers {
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            PyBytes::new(py, name.to_ascii_lowercase().as_bytes())
        } else {
            PyBytes::new(py, name.as_bytes())
        };
        headers.append(PyTuple::new(
            py,
            [name, PyBytes::new(py, value.as_bytes())],
        )?)?;
    }
    scope.set_item(intern!(py, "headers"), headers)?;
    match split_host_port(&http.client) {
        Some((host, port)) => scope.set_item(intern!(py, "client"), (host, port))?,
        None => scope.set_item(intern!(py, "client"), py.None())?,
    }
    scope.set_item(intern!(py, "server"), py.None())?;
    let params = PyDict::new(py);
    for (name, value) in &http.path_params {
        match value {
            PathValue::Str(s) => params.set_item(name, s)?,
            PathValue::Int(i) => params.set_item(name, *i)?,
            PathValue::Float(f) => params.set_item(name, *f)?,
            PathValue::Uuid(s) => params.set_item(
                name,
                py.import(intern!(py, "uuid"))?
                    .getattr(intern!(py, "UUID"))?
                    .call1((s,))?,
            )?,
        }
    }
    scope.set_item(intern!(py, "path_params"), params)?;
    Ok((scope, PyBytes::new(py, &http.body)))
}

/// `(path, message, metadata, timeout)` for `on_grpc`: the message's
/// bytes as they came, metadata as `(key, value)` tuples (grpcio's
/// `invocation_metadata`), the seconds left of the client's deadline or None.
#[allow(clippy::type_complexity)]
fn grpc_args(
    py: Python<'_>,
    call: GrpcCall,
) -> PyResult<(
    Bound<'_, PyString>,
    Bound<'_, PyBytes>,
    Bound<'_, PyTuple>,
    Option<f64>,
)> {
    let metadata = PyTuple::new(
        py,
        call.metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    )?;
    let timeout = (call.timeout_ms > 0).then(|| call.timeout_ms as f64 / 1000.0);
    Ok((
        PyString::new(py, &call.path),
        PyBytes::new(py, &call.message),
        metadata,
        timeout,
    ))
}

/// The answer of a gRPC call to a replica whose object serves no gRPC.
fn grpc_unimplemented<'py>(py: Python<'py>, path: &str) -> PyResult<Bound<'py, PyTuple>> {
    let headers = vec![
        (GRPC_STATUS_HEADER.to_owned(), "12".to_owned()),
        (
            GRPC_MESSAGE_HEADER.to_owned(),
            format!("this replica serves no gRPC method {path}"),
        ),
    ];
    (200u16, headers, PyBytes::new(py, b"")).into_pyobject(py)
}

/// `(args, http_method, headers)` for `on_call`.
fn call_args(
    py: Python<'_>,
    call: CallRequest,
) -> PyResult<(Bound<'_, PyBytes>, Bound<'_, PyString>, Bound<'_, PyList>)> {
    let method = if call.http_method.is_empty() {
        "GET"
    } else {
        call.http_method.as_str()
    };
    let headers = PyList::empty(py);
    for (k, v) in &call.http_headers {
        headers.append((k.as_str(), v.as_str()))?;
    }
    Ok((
        PyBytes::new(py, &call.args),
        method_str(py, method),
        headers,
    ))
}

fn method_str<'py>(py: Python<'py>, method: &str) -> Bound<'py, PyString> {
    match method {
        "GET" => intern!(py, "GET").clone(),
        "POST" => intern!(py, "POST").clone(),
        "PUT" => intern!(py, "PUT").clone(),
        "DELETE" => intern!(py, "DELETE").clone(),
        other => PyString::new(py, other),
    }
}

fn asgi_version(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item(intern!(py, "version"), intern!(py, "3.0"))?;
    d.set_item(intern!(py, "spec_version"), intern!(py, "2.4"))?;
    Ok(d)
}

/// "host:port" or "[v6]:port" -> (host, port).
fn split_host_port(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Some((host, port))
}
