//! The Rust half of a Python replica (`python -m serval.replica`).
//!
//! [`ReplicaServer`] owns a tokio runtime with ONE worker thread that runs the
//! data-plane frame server (`serval_node::replica_server::serve`) on a Unix
//! socket and a TCP port. Its `Handler` (`queue::QueueHandler`) does no
//! Python work: it pushes each `(request, reply)` into a crossbeam channel
//! and, when the worker is not already due to look, writes one byte to a
//! wake socket.
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
//!   .queued -> bool                   requests wait for a drain
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
//! The parts:
//! - `server`: `ReplicaServer`, its runtime and the Python-facing calls.
//! - `queue`: the bounded queue from the I/O thread to the Python thread.
//! - `wake`: the wake socket and the stop signal.
//! - `dispatch`: a drain's hand-over of each request to Python.
//! - `asgi`: the ASGI scope of an HTTP request or WebSocket session.
//! - `websocket`: WebSocket events and `WebSocket`.
//! - `reply`: `Reply`, a request's answer, and the replica's own answers.
//! - `outbox`: replies gathered per router connection during a drain.

use pyo3::prelude::*;

mod asgi;
mod dispatch;
mod outbox;
mod queue;
mod reply;
mod server;
mod wake;
mod websocket;

use reply::PyReply;
use server::ReplicaServer;
use websocket::PyWebSocket;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ReplicaServer>()?;
    m.add_class::<PyReply>()?;
    m.add_class::<PyWebSocket>()?;
    Ok(())
}
