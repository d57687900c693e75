"""Request/response glue of a Python replica: hosts one user object.

``Host`` loads a backend (a class instantiated with its init args, or a plain
function) and runs the worker thread's asyncio event loop (``Host.serve``).
The Rust frame server wakes that loop through ``ReplicaServer.wake_fd`` and
``ReplicaServer.drain`` hands it every queued request:

- ``on_http(method_name, scope, body, reply)``: an HTTP request as an ASGI
  scope (built in Rust) and its body. User code gets a
  ``starlette.requests.Request``.
- ``on_call(method_name, args, http_method, headers, reply)``: a ServeHandle
  call, ``args`` being cloudpickle of ``(args, kwargs)``. ``__call__`` (and
  any ``@serve.accept_batch`` method) gets a ``ServeRequest`` (or a Starlette
  request passed through the handle as-is); any other method gets
  ``method(*args, **kwargs)``, or the ``ServeRequest`` when it is called
  with no positional argument and takes one (Ray 1.x). A Ray Serve 2.x
  deployment (its code file made by ``wrap_deployment_code``) gets the
  arguments as they were given, whatever the method.
- ``on_reconfigure(config_json, reply)``: a config change applied in place:
  new limits, and ``reconfigure(user_config)`` when that changed.
- WebSocket sessions (``serval.websocket``): opened, fed the client's
  messages, ended.

Each returns ``(status, [(name, value)], body_bytes)`` when the answer is
ready, or None when it answers later through ``reply.send(...)``; they never
raise for a user error: HTTP errors become 500 JSON ``{"error": "Type:
message"}``, handle errors 500 with ``x-serval-error: Type`` and the traceback
as the body, an unknown method 404 with ``x-serval-error: MethodNotFound``.
A ``starlette.responses.Response`` returned over HTTP has its ``background``
run after its reply was sent (sync callables inline on the loop's thread,
async ones awaited in a task); its errors are logged, never sent.

Concurrency (Ray Serve 1.x): sync methods run on the loop's thread one at a
time; ``async def`` methods run as tasks, so many interleave. At most
``max_concurrent_queries`` requests run (or wait in a batch) at once; the rest
wait here in arrival order (routers already keep to that limit each, but a
replica may be called by several routers). ``@serve.accept_batch`` methods get
a list of up to ``max_batch_size`` requests, collected for at most
``batch_wait_timeout`` seconds after the first, and return one result per
request. Sync user code runs with no running loop set, so it may itself use
``asyncio.run`` as it would on a plain thread.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import json
import logging
import os
import struct
import traceback
import types
from typing import Any, Callable, Optional

import cloudpickle
from starlette.background import BackgroundTask, BackgroundTasks
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from . import _native, multiplex
from .ingress import Lifespan, asgi_entry, run_http
from .request import ServeRequest, WebRequestState
from .websocket import Sessions as WebSocketSessions

logger = logging.getLogger("serval.replica")

PICKLE_CONTENT_TYPE = "application/x-python-pickle"
ERROR_TYPE_HEADER = "x-serval-error"
#: Set on every response to a request served in a batch: the batch's size.
#: The router records it (``serval_batch_size``) and removes it.
BATCH_SIZE_HEADER = "x-serval-batch-size"

#: A handle call's exception, cloudpickled and base64-encoded (when it
#: pickles within EXCEPTION_MAX_BYTES): the caller raises an error that is
#: also an instance of its class.
EXCEPTION_HEADER = "x-serval-exception"
EXCEPTION_MAX_BYTES = 16 * 1024

_JSON = [("content-type", "application/json")]
_TEXT = [("content-type", "text/plain; charset=utf-8")]
_OCTET = [("content-type", "application/octet-stream")]
_PICKLE = [("content-type", PICKLE_CONTENT_TYPE)]

#: Chunks a stream may have in flight beyond those its router took (the
#: frame protocol's STREAM_WINDOW): the generator is not advanced while
#: they are all out.
STREAM_WINDOW = 16


#: Bytes a stream gathers into one chunk frame at most (HTTP body bytes, or
#: a gRPC stream's length-prefixed reply messages). A stream's first chunk
#: leaves at once (the time to first byte is what a client
#: waits on); after it, chunks a generator yields without suspending in
#: between (a burst) leave as one frame when the loop next turns, and a
#: burst past this size leaves in frames of about this size, each under the
#: stream's window.
STREAM_COALESCE_BYTES = 64 * 1024


class SendNow:
    """Yielded (the class itself) by a stream's async generator to have the
    bytes gathered so far sent now, before it blocks the loop
    (``serval.cortex.grpc_api``'s inline sync generators): a send, not a
    loop turn. A class, not an ``object()``: code that travels by value
    (``_core.pickle_code``) still refers to this one."""


class _Stream:
    """One streamed reply: the credit its router granted, the waiter for
    more, the task producing it (cancelled when the router cancels), and
    the HTTP body bytes yielded since the loop last turned (``pending``),
    sent by a flush scheduled on the loop (``flush_scheduled``)."""

    __slots__ = ("credit", "waiter", "task", "reply", "pending", "pending_size", "flush_scheduled", "gone", "first")

    def __init__(self, reply):
        self.credit = STREAM_WINDOW
        self.waiter = None
        self.task = None
        self.reply = reply
        self.pending = []
        self.pending_size = 0
        self.flush_scheduled = False
        self.gone = False
        self.first = True  # no body byte sent yet

    def gather(self, chunk: bytes) -> bool:
        """Adds ``chunk`` to a burst already due to leave when the loop
        turns, if that is all ``Host._send_gathered`` would do with it (the
        common case, without a coroutine); False: it must go through there."""
        if self.flush_scheduled and not self.gone and chunk and \
                self.pending_size + len(chunk) < STREAM_COALESCE_BYTES:
            self.pending.append(chunk)
            self.pending_size += len(chunk)
            return True
        return False

    def send_pending(self) -> None:
        """Sends what is pending as one chunk frame (the caller took its
        credit); a router gone marks the stream ``gone``."""
        body = self.pending[0] if len(self.pending) == 1 else b"".join(self.pending)
        self.pending = []
        self.pending_size = 0
        if not self.reply.send_chunk(body):
            self.gone = True


class _StreamGone(OSError):
    """The router connection of a stream closed while it was produced (an
    OSError: what ASGI 2.4's ``send`` raises when the client is gone)."""

#: SERVAL_DEBUG=1 (in the environment of `serve start`, inherited by its
#: replicas) adds the traceback to the 500 body of a failed HTTP request; it
#: is always in the replica's log.
DEBUG = os.environ.get("SERVAL_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")

#: What an ingress app's lifespan shutdown may take when the replica stops.
LIFESPAN_SHUTDOWN_S = 5.0

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class MethodNotFound(Exception):
    """The request named a method the backend does not have."""


class BatchResultError(ValueError):
    """An ``@serve.accept_batch`` method did not return one result per request."""


#: Ray Serve 1.0-1.2 defaults for ``max_concurrent_queries`` when the user sets none
#: (an async backend's is the controller's and the routers' default).
DEFAULT_MAX_CONCURRENT_QUERIES_BLOCKING = 8
DEFAULT_MAX_CONCURRENT_QUERIES_ASYNC = _native.DEFAULT_MAX_CONCURRENT_QUERIES

_HTTP = 0
_CALL = 1
#: A handle call made with ``options(stream=True)``: a generator's items
#: stream back (a plain call to a generator method is refused, as in Ray).
_STREAM_CALL = 2
#: A server-streaming gRPC call the proxy terminated (``on_grpc``): its
#: items are reply messages already length-prefixed (gRPC's framing,
#: ``_grpc_message``, done by serval.cortex.grpc_api), gathered per burst as
#: an HTTP stream's body bytes are: a chunk frame carries one or more whole
#: messages.
_GRPC = 3
#: The head of a streamed reply, by kind.
_STREAM_HEADS = {_HTTP: _TEXT, _GRPC: [("content-type", "application/grpc")]}
#: The call header a streaming handle call carries.
STREAM_CALL_HEADER = "x-serval-stream"

_get_running_loop = asyncio.events._get_running_loop
_set_running_loop = asyncio.events._set_running_loop


def accept_batch(f):
    """Marks a method (or function) that takes a LIST of requests and returns
    a list of results of the same length (Ray Serve 1.x ``serve.accept_batch``).
    The backend must set ``max_batch_size``."""
    f._serve_accept_batch = True
    return f


def _accepts_batch(fn: Any) -> bool:
    return getattr(fn, "_serve_accept_batch", False) is True


def batch_methods(func_or_class: Any) -> list:
    """Names of the ``@serve.accept_batch`` methods of a class (``__call__``
    and public methods), or ``["__call__"]`` for a batching function."""
    if not inspect.isclass(func_or_class):
        return ["__call__"] if _accepts_batch(func_or_class) or \
            _accepts_batch(getattr(type(func_or_class), "__call__", None)) else []
    names = []
    for name in dir(func_or_class):
        if name.startswith("_") and name != "__call__":
            continue
        try:
            attr = getattr(func_or_class, name)
        except Exception:
            continue
        if _accepts_batch(attr):
            names.append(name)
    return names


def is_async_backend(func_or_class: Any) -> bool:
    """Whether the called ``__call__`` (or function) is a coroutine function."""
    if inspect.isclass(func_or_class):
        return inspect.iscoroutinefunction(getattr(func_or_class, "__call__", None))
    return inspect.iscoroutinefunction(func_or_class) or \
        inspect.iscoroutinefunction(getattr(type(func_or_class), "__call__", None))


def check_batch_config(func_or_class: Any, max_batch_size: Optional[int], backend: str = "") -> None:
    """Raises ValueError when batching is configured but nothing accepts
    batches, or a method accepts batches but no ``max_batch_size`` is set."""
    what = f"backend '{backend}'" if backend else "the backend"
    names = batch_methods(func_or_class)
    if max_batch_size and not names:
        raise ValueError(
            f"max_batch_size is set in the config of {what}, but its function or method does not accept "
            "batches: mark the function or method that takes a list of requests with @serve.accept_batch")
    if names and not max_batch_size:
        raise ValueError(
            f"{what} accepts batches (@serve.accept_batch on {', '.join(names)}) but its config sets no "
            "max_batch_size: pass config={'max_batch_size': N}")


#: How long a replica's worker polls for the next request before it sleeps
#: (``SERVAL_REPLICA_POLL_US``; 0 turns polling off).
DEFAULT_REPLICA_POLL_US = 100


def replica_poll_us() -> int:
    """``SERVAL_REPLICA_POLL_US`` from the environment, else the default."""
    value = os.environ.get("SERVAL_REPLICA_POLL_US", "")
    try:
        return max(0, int(value)) if value.strip() else DEFAULT_REPLICA_POLL_US
    except ValueError:
        raise ValueError(f"SERVAL_REPLICA_POLL_US must be a whole number of microseconds, not {value!r}")


def default_max_concurrent_queries(func_or_class: Any, max_batch_size: Optional[int]) -> int:
    """Ray Serve 1.0-1.2: 2 x max_batch_size with batching, 100 for an async
    backend, 8 for a blocking one."""
    if max_batch_size:
        return 2 * int(max_batch_size)
    if is_async_backend(func_or_class):
        return DEFAULT_MAX_CONCURRENT_QUERIES_ASYNC
    return DEFAULT_MAX_CONCURRENT_QUERIES_BLOCKING


def _call_blocking(fn, args, kwargs):
    """Calls sync user code with no running loop set: it runs as on a plain
    thread (``asyncio.run`` inside it works), while the host's loop waits."""
    running = _get_running_loop()
    _set_running_loop(None)
    try:
        return fn(*args, **kwargs) if kwargs else fn(*args)
    finally:
        _set_running_loop(running)


#: The key of a Ray Serve 2.x deployment's code file (``wrap_deployment_code``).
DEPLOYMENT_CODE_KEY = "serval_deployment"


def wrap_deployment_code(code: bytes, options: dict) -> bytes:
    """A deployment's code file: its options (environment variables, health
    checks) next to the cloudpickle of ``(func_or_class, init_args,
    init_kwargs)``, which is unpickled only after the environment is set,
    so code that reads it while it loads sees it."""
    return cloudpickle.dumps({DEPLOYMENT_CODE_KEY: 1, "options": dict(options), "code": code})


def load_code(path: str) -> tuple[Any, tuple, dict, Optional[dict]]:
    """Reads cloudpickle of ``(func_or_class, init_args, init_kwargs)``, or a
    deployment's code file: then its environment variables are set first,
    and its options are returned last (else None)."""
    with open(path, "rb") as f:
        loaded = cloudpickle.load(f)
    options = None
    if isinstance(loaded, dict) and loaded.get(DEPLOYMENT_CODE_KEY) == 1:
        options = dict(loaded.get("options") or {})
        os.environ.update({str(k): str(v) for k, v in (options.get("env_vars") or {}).items()})
        loaded = cloudpickle.loads(loaded["code"])
    if not isinstance(loaded, tuple) or len(loaded) not in (1, 2, 3):
        raise TypeError(f"code file must hold (func_or_class, init_args, init_kwargs), got {type(loaded).__name__}")
    func_or_class = loaded[0]
    init_args = tuple(loaded[1]) if len(loaded) > 1 and loaded[1] is not None else ()
    init_kwargs = dict(loaded[2]) if len(loaded) > 2 and loaded[2] is not None else {}
    return func_or_class, init_args, init_kwargs, options


class _Target:
    """A resolved method: how to call it."""

    __slots__ = ("name", "fn", "is_async", "batched")

    def __init__(self, name: str, fn: Any, batched: bool):
        self.name = name
        self.fn = fn
        self.is_async = inspect.iscoroutinefunction(fn) or \
            inspect.iscoroutinefunction(getattr(type(fn), "__call__", None))
        self.batched = batched


class _Item:
    """One admitted request waiting in a batch."""

    __slots__ = ("kind", "request", "scope", "reply")

    def __init__(self, kind: int, request: Any, scope: Optional[dict], reply: Any):
        self.kind = kind
        self.request = request
        self.scope = scope
        self.reply = reply


class Batcher:
    """Gathers the calls of one batched method into batches: a batch goes
    out, to ``on_batch(items)`` on the loop's thread, when it holds
    ``max_size`` items or ``wait_s`` seconds after its first item arrived.
    The one batcher of replicas: ``@serve.accept_batch`` methods (``Host``)
    and Cortex's ``server_side_batching`` (``cortex/realtime.py``) both
    batch with it. ``max_size`` and ``wait_s`` may change (a reconfigured
    backend); the next batch follows them."""

    __slots__ = ("max_size", "wait_s", "on_batch", "loop", "items", "timer")

    def __init__(self, max_size: int, wait_s: float, on_batch: Callable[[list], None],
                 loop: Optional[asyncio.AbstractEventLoop] = None):
        self.max_size = max_size
        self.wait_s = wait_s
        self.on_batch = on_batch
        #: None: the loop running when the first item arrives.
        self.loop = loop
        self.items: list = []
        self.timer: Optional[asyncio.TimerHandle] = None

    def add(self, item: Any) -> None:
        self.items.append(item)
        if len(self.items) >= max(1, self.max_size):
            self.flush()
        elif self.timer is None:
            self._arm()

    def _arm(self) -> None:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        # With a wait of 0 this still runs after the current drain, so
        # items that arrived together go out together.
        self.timer = self.loop.call_later(max(0.0, self.wait_s), self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        self.flush()

    def flush(self) -> None:
        """Sends the open batch (``max_size`` items at most; the rest start
        the next one)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        size = max(1, self.max_size)
        batch = self.items[:size]
        del self.items[:size]
        if self.items:
            self._arm()
        if batch:
            self.on_batch(batch)

    def cancel(self) -> list:
        """Stops gathering and returns the items not sent (to refuse them)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        items, self.items = self.items, []
        return items


_UNAVAILABLE = (503, _JSON + [(ERROR_TYPE_HEADER, "ReplicaUnavailable")],
                _dumps({"error": "replica is shutting down"}).encode())
_QUEUE_FULL = (503, _JSON + [(ERROR_TYPE_HEADER, "ReplicaUnavailable"), ("retry-after", "1")],
               _dumps({"error": "the replica's request queue is full; retry later"}).encode())

class Host:
    """One user object, its event loop and the dispatch functions."""

    def __init__(self, backend: str, func_or_class: Any, init_args=(), init_kwargs=None, config=None,
                 deployment_options: Optional[dict] = None):
        self.backend = backend
        self.config = dict(config or {})
        #: A Ray Serve 2.x deployment: handle calls get their arguments as
        #: given, and ``check_health`` runs every health_check_period_s.
        self.deployment_options = deployment_options
        #: Why a failed health check stopped the replica.
        self.unhealthy: Optional[str] = None
        if deployment_options is not None:
            _set_replica_context(backend, func_or_class)
        # Owned by the worker thread (it calls set_event_loop on start);
        # __init__/reconfigure run before that thread exists.
        self.loop = asyncio.new_event_loop()
        if inspect.isclass(func_or_class):
            self.is_function = False
            self.obj = func_or_class(*init_args, **(init_kwargs or {}))
        elif callable(func_or_class):
            self.is_function = True
            self.obj = func_or_class
        else:
            raise TypeError(f"backend {backend!r}: expected a function or a class, got {type(func_or_class).__name__}")
        self._code = type(self.obj) if not self.is_function else self.obj
        if deployment_options is not None:
            _REPLICA_CONTEXT["servable_object"] = self.obj
        #: Whether requests are looked at for a model id (serval.multiplex).
        self._multiplexed = multiplex.uses_multiplexing(self._code)
        self._targets: dict = {}
        self._batchers: dict = {}
        #: Requests admitted and not answered yet (running, or in a batch).
        self._in_flight = 0
        #: Requests beyond max_concurrent_queries, in arrival order.
        self._waiting: collections.deque = collections.deque()
        self._admit_scheduled = False
        #: True while a drain runs with the running loop already cleared.
        self._loop_cleared = False
        #: While a drain runs: where in the loop's ready queue the next new
        #: request's first step goes (see ``_go_first``); None otherwise.
        self._front: Optional[int] = None
        #: The loop's ready queue (CPython's ``_ready``), set by ``serve``.
        self._ready = None
        #: Runs the queued requests now (``serve``'s wake callback).
        self._intake: Optional[Callable[[], None]] = None
        #: Read here, so a bad value fails the replica's start, not its worker.
        self._poll_us = replica_poll_us()
        #: Requests that may wait here beyond max_concurrent_queries: the
        #: server's bound (SERVAL_REPLICA_MAX_QUEUED), set by serve().
        self._max_waiting = 0
        self._tasks: set = set()
        #: Open streams by (connection, request id), as on_stream names them.
        self._streams: dict = {}
        self._user_config = None
        #: The ReplicaServer while ``serve`` runs.
        self._server = None
        #: Open WebSocket sessions (``serval.websocket``).
        self._websockets = WebSocketSessions(self)
        #: A plain HTTP request to a ``__call__`` that is an ASGI app (not
        #: an ingress, whose __call__ takes the request) runs through it.
        self._asgi_http = None
        if not hasattr(self.obj, "_serval_asgi"):
            app = asgi_entry(self.obj, self.is_function)
            if app is not None:
                self._asgi_http = _Target("__call__", functools.partial(run_http, app), False)
        #: A gRPC API's entry for the calls the proxy terminated
        #: (``serval.cortex.grpc_api.GrpcAPI.serval_grpc_call``), or None.
        self._grpc = getattr(self.obj, "serval_grpc_call", None)
        #: Where a client stream's request messages go (``serval_grpc_message``).
        self._grpc_message = getattr(self.obj, "serval_grpc_message", None)
        #: An ingress app's lifespan (startup now, shutdown at stop).
        self._lifespan = None
        ingress_app = getattr(self.obj, "_serval_asgi_app", None)
        if ingress_app is not None:
            self._lifespan = Lifespan(ingress_app, self.loop)
            self._lifespan.start()
        self._apply_limits(self.config)
        user_config = self.config.get("user_config")
        if user_config is not None:
            self.reconfigure(user_config)

    @classmethod
    def from_code_file(cls, backend: str, path: str, config=None) -> "Host":
        func_or_class, init_args, init_kwargs, options = load_code(path)
        return cls(backend, func_or_class, init_args, init_kwargs, config, options)

    def _apply_limits(self, config: dict) -> None:
        max_batch_size = int(config.get("max_batch_size") or 0)
        check_batch_config(self._code, max_batch_size, self.backend)
        timeout = float(config.get("batch_wait_timeout") or 0.0)
        if timeout < 0:
            raise ValueError(f"batch_wait_timeout must be non-negative, not {timeout}")
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout = timeout
        for batcher in self._batchers.values():
            batcher.max_size, batcher.wait_s = max_batch_size, timeout
        self.max_concurrent_queries = int(config.get("max_concurrent_queries") or 0) or \
            default_max_concurrent_queries(self._code, max_batch_size)
        if self._server is not None:
            self._server.reply_batch = self._reply_batch()
        if self._waiting:
            self._schedule_admit()

    def _reconfigure_method(self):
        method = None if self.is_function else getattr(self.obj, "reconfigure", None)
        if method is None and not self.is_function:
            logger.warning("backend %r has user_config but no reconfigure() method", self.backend)
        return method

    def reconfigure(self, user_config: Any) -> None:
        """At start (before the loop runs): calls ``obj.reconfigure(user_config)``
        when the class defines it."""
        method = self._reconfigure_method()
        if method is not None:
            result = method(user_config)
            if inspect.isawaitable(result):
                self.loop.run_until_complete(_as_coro(result))
        self._user_config = user_config

    def close(self) -> None:
        try:
            if not self.loop.is_closed() and not self.loop.is_running():
                self.loop.close()
        except Exception:  # pragma: no cover - best effort at exit
            pass

    # -- the worker loop -------------------------------------------------

    def _reply_batch(self) -> int:
        """Replies a drain sends together: an eighth of max_concurrent_queries.
        A router keeps at most that many requests here, so replies held back
        shrink its window; with 8 (the blocking default) each reply goes at
        once, with 64 they go in eights. Against whole-drain batches, with
        wrk on a no-op: +15 % req/s at 8, as fast or faster at 64."""
        return max(1, self.max_concurrent_queries // 8)

    def serve(self, server) -> None:
        """Runs the event loop on the calling thread until ``server`` stops.
        KeyboardInterrupt/SystemExit from user code propagate (after that
        request was answered)."""
        self._server = server
        self._max_waiting = server.max_queued
        server.reply_batch = self._reply_batch()
        loop = self.loop
        fd = server.wake_fd
        stopped = self._stopped = loop.create_future()
        finishing: list = []
        drain = server.drain
        # After a drain, with nothing ready on the loop, the worker polls
        # for the next request this long before it sleeps in epoll (see
        # ReplicaServer.drain): under load it comes within microseconds,
        # and a sleep and wake-up cost more than a no-op request.
        poll_us = self._poll_us
        ready = getattr(loop, "_ready", None)
        on_http, on_call, on_reconfigure, on_stream = self.on_http, self.on_call, self.on_reconfigure, self.on_stream
        on_ws_open, on_ws_event = self._websockets.on_open, self._websockets.on_event
        on_grpc, on_grpc_message = self.on_grpc, self.on_grpc_message

        def on_wake():
            # Sync user code runs with no running loop set (see
            # _call_blocking); clearing it once around the whole drain saves
            # two loop swaps (each a getpid() in CPython) per request.
            _set_running_loop(None)
            self._loop_cleared = True
            self._front = 0
            try:
                drain(on_http, on_call, on_reconfigure, poll_us, ready, on_ws_open, on_ws_event, on_stream,
                      on_grpc, on_grpc_message)
            finally:
                self._front = None
                self._loop_cleared = False
                _set_running_loop(loop)
            if server.stop_reason is not None and not finishing:
                finishing.append(loop.create_task(self._finish_in_flight(stopped)))

        self._ready, self._intake = ready, on_wake
        loop.add_reader(fd, on_wake)
        check_health = self._health_check_method()
        if check_health is not None:
            self._spawn(self._check_health_every(check_health, server))
        try:
            loop.run_until_complete(stopped)
        finally:
            try:
                loop.remove_reader(fd)
            except Exception:  # pragma: no cover - the loop is closing
                pass
            self._abandon()

    def _health_check_method(self):
        if self.deployment_options is None or self.is_function:
            return None
        method = getattr(self.obj, "check_health", None)
        return method if callable(method) else None

    async def _check_health_every(self, check_health, server) -> None:
        """Ray Serve 2.x health checks: ``check_health()`` every
        ``health_check_period_s``; when it raises or takes longer than
        ``health_check_timeout_s`` the replica stops (exit status 1) and its
        node agent starts a new one."""
        period = float(self.deployment_options.get("health_check_period_s") or 10.0)
        timeout = float(self.deployment_options.get("health_check_timeout_s") or 30.0)
        while True:
            await asyncio.sleep(period)
            try:
                if inspect.iscoroutinefunction(check_health):
                    await asyncio.wait_for(check_health(), timeout)
                else:
                    result = _call_blocking(check_health, (), None)
                    if inspect.isawaitable(result):
                        await asyncio.wait_for(_as_coro(result), timeout)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                reason = ("check_health() did not answer within health_check_timeout_s "
                          f"({timeout} s)" if isinstance(e, asyncio.TimeoutError) else
                          f"check_health() raised {type(e).__name__}: {e}")
                logger.error("backend %r: the health check failed, the replica stops: %s", self.backend, reason,
                             exc_info=not isinstance(e, asyncio.TimeoutError))
                self.unhealthy = reason
                server.shutdown(f"health check failed: {reason}")
                if not self._stopped.done():
                    self._stopped.set_result(None)
                return

    async def _finish_in_flight(self, stopped) -> None:
        """On stop: gives the requests this replica took (running, batched
        or waiting for a slot) the backend's graceful shutdown timeout to
        finish, then ends ``serve``; ``_abandon`` answers the rest 503.
        Nothing new arrives meanwhile: routers dropped this replica before
        its agent stopped it, and the server runs no new request once
        stopped (``shutdown`` answers those 503)."""
        timeout = float(self.config.get("graceful_shutdown_timeout_s") or 0.0)
        deadline = self.loop.time() + timeout
        try:
            while self._in_flight or self._waiting:
                left = deadline - self.loop.time()
                if left <= 0:
                    logger.warning("backend %r: %d request(s) still in flight after the graceful shutdown "
                                   "timeout of %ss", self.backend, self._in_flight + len(self._waiting), timeout)
                    break
                tasks = [t for t in self._tasks if not t.done()]
                if tasks:
                    await asyncio.wait(tasks, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                else:  # a batch waiting for its timer
                    await asyncio.sleep(min(left, 0.01))
        finally:
            if not stopped.done():
                stopped.set_result(None)

    def _abandon(self) -> None:
        """On stop: answers 503 to what waits here and cancels running tasks."""
        pending = list(self._waiting)
        self._waiting.clear()
        for item in pending:
            item[5].send(*_UNAVAILABLE)
        for batcher in self._batchers.values():
            for item in batcher.cancel():
                item.reply.send(*_UNAVAILABLE)
        if self._lifespan is not None and not self.loop.is_running() and not self.loop.is_closed():
            self._lifespan.stop(LIFESPAN_SHUTDOWN_S)
        tasks = [t for t in self._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks and not self.loop.is_running() and not self.loop.is_closed():
            try:
                self.loop.run_until_complete(asyncio.wait(tasks, timeout=1.0))
            except BaseException:  # pragma: no cover - best effort at exit
                pass

    # -- helpers ---------------------------------------------------------

    def _target(self, method_name: Optional[str]) -> _Target:
        key = method_name or "__call__"
        target = self._targets.get(key)
        if target is None:
            target = self._targets[key] = self._resolve(key)
        return target

    def _resolve(self, name: str) -> _Target:
        if name == "__call__":
            if self.is_function:
                fn = self.obj
            elif callable(self.obj):
                fn = self.obj.__call__
            else:
                raise MethodNotFound("__call__")
            return _Target(name, fn, _accepts_batch(fn) or _accepts_batch(getattr(type(fn), "__call__", None)))
        # Private names (and anything on a plain function) are never callable
        # from the outside: X-SERVE-CALL-METHOD must not reach __init__ & co.
        if self.is_function or name.startswith("_"):
            raise MethodNotFound(name)
        fn = getattr(self.obj, name, None)
        if fn is None or not callable(fn):
            raise MethodNotFound(name)
        return _Target(name, fn, _accepts_batch(fn))

    def _not_found(self, name: str):
        body = _dumps({"error": f"backend '{self.backend}' has no method '{name}'"}).encode()
        return 404, [("content-type", "application/json"), (ERROR_TYPE_HEADER, "MethodNotFound")], body

    def _spawn(self, coro) -> asyncio.Task:
        """Runs ``coro`` as a task of this host's (kept until it ends), a new
        request's going first while a drain runs (``_go_first``)."""
        task = self.loop.create_task(coro)
        self._go_first()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _go_first(self) -> None:
        """Moves the task step just scheduled (``create_task`` appends it to
        the loop's ready queue) ahead of the steps that were waiting there
        before this drain, after the other new ones: a new request starts
        before the streams already running take their next step (a stream
        that never suspends runs its whole body in one). New work cannot
        starve them: it is bounded by the free slots, which only the
        streams' ends free."""
        front = self._front
        if front is not None and self._ready:
            self._ready.insert(front, self._ready.pop())
            self._front = front + 1

    async def _step_aside(self) -> None:
        """Called by a stream once its first chunk is out: when other steps
        wait on the loop or requests in the queue, the rest of its body
        goes behind them (one loop turn), and the requests that came
        meanwhile start first (``_intake``), so a new stream's first byte
        waits for at most one body, not for every stream ahead of it."""
        server = self._server
        if self._ready or (server is not None and server.queued):
            await asyncio.sleep(0)
            if server is not None and server.queued and self._intake is not None:
                self._intake()

    def _done(self) -> None:
        self._in_flight -= 1
        if self._waiting:
            self._schedule_admit()

    def _schedule_admit(self) -> None:
        if not self._admit_scheduled:
            self._admit_scheduled = True
            self.loop.call_soon(self._admit)

    def _admit(self) -> None:
        """Starts waiting requests while there is room (FIFO)."""
        self._admit_scheduled = False
        while self._waiting and self._in_flight < self.max_concurrent_queries:
            item = self._waiting.popleft()
            response = self._start(*item)
            if response is not None:
                item[5].send(*response)

    def _submit(self, target: _Target, kind: int, args: tuple, kwargs, scope, reply, model_id: str = ""):
        if self._in_flight >= self.max_concurrent_queries or self._waiting:
            if len(self._waiting) >= self._max_waiting:
                return _QUEUE_FULL
            self._waiting.append((target, kind, args, kwargs, scope, reply, model_id))
            return None
        return self._start(target, kind, args, kwargs, scope, reply, model_id)

    def _submit_for_model(self, model_id: str, target: _Target, kind: int, args: tuple, kwargs, scope, reply):
        """A request naming a model (``serve_multiplexed_model_id``), or any
        request to a replica keeping a model cache (a Cortex request names
        its model in its query, read by user code): its code sees the id
        (``serve.get_multiplexed_model_id()``) and its answer tells the
        router which models this replica holds."""
        response = self._submit(target, kind, args, kwargs, scope, multiplex.ReportingReply(reply), model_id)
        return None if response is None else multiplex.with_report(response)

    def _start(self, target: _Target, kind: int, args: tuple, kwargs, scope, reply, model_id: str = ""):
        """Runs one admitted request: the response now, or None when a task
        or a batch answers it later."""
        if not model_id:
            return self._start_now(target, kind, args, kwargs, scope, reply)
        # Tasks copy the context when created: an async method keeps the id.
        token = multiplex.set_model_id(model_id)
        try:
            return self._start_now(target, kind, args, kwargs, scope, reply)
        finally:
            multiplex.reset_model_id(token)

    def _start_now(self, target: _Target, kind: int, args: tuple, kwargs, scope, reply):
        self._in_flight += 1
        if target.batched:
            batcher = self._batchers.get(target.name)
            if batcher is None:
                batcher = self._batchers[target.name] = Batcher(
                    self.max_batch_size, self.batch_wait_timeout, functools.partial(self._run_batch, target),
                    self.loop)
            batcher.add(_Item(kind, args[0], scope, reply))
            return None
        try:
            if target.is_async or self._loop_cleared:
                result = target.fn(*args, **kwargs) if kwargs else target.fn(*args)
            else:
                result = _call_blocking(target.fn, args, kwargs)
            if inspect.isawaitable(result):
                self._spawn(self._finish_async(result, kind, scope, reply))
                return None
            if isinstance(result, _MAY_STREAM) and _streams(kind, result):
                self._start_stream(kind, result, scope, reply)
                return None
            response = self._respond(kind, result, scope)
        except (KeyboardInterrupt, SystemExit) as e:
            self._done()
            reply.send(*_fatal_response(e))
            raise
        except Exception as e:
            self._done()
            return self._error(kind, e, scope, target.name)
        if type(response) is not tuple:
            self._spawn(self._send_later(response, reply))
            return None
        self._done()
        return response

    async def _finish_async(self, awaitable, kind: int, scope, reply) -> None:
        try:
            result = await awaitable
            if isinstance(result, _MAY_STREAM) and _streams(kind, result):
                # The stream's task answers and frees the slot.
                self._start_stream(kind, result, scope, reply)
                return
            response = self._respond(kind, result, scope)
            if type(response) is not tuple:
                response = await response
        except asyncio.CancelledError:
            self._done()
            reply.send(*_UNAVAILABLE)
            raise
        except (KeyboardInterrupt, SystemExit) as e:
            self._done()
            reply.send(*_fatal_response(e))
            raise
        except Exception as e:
            response = self._error(kind, e, scope, None)
        reply.send(*response)
        self._done()

    async def _send_later(self, awaitable, reply) -> None:
        """A response whose body is produced asynchronously (streaming)."""
        try:
            response = await awaitable
        except asyncio.CancelledError:
            self._done()
            reply.send(*_UNAVAILABLE)
            raise
        except Exception as e:
            response = self._error(_HTTP, e, None, None)
        reply.send(*response)
        self._done()

    def _respond(self, kind: int, result: Any, scope):
        if kind == _HTTP:
            return self._to_http(result, scope)
        return 200, _PICKLE, cloudpickle.dumps(result)

    def _error(self, kind: int, e: BaseException, scope, method_name: Optional[str]):
        if kind == _GRPC:
            # serval.cortex.grpc_api ends a stream's failures with the
            # status to send (its _StreamStatus); anything else is INTERNAL.
            answer = getattr(e, "grpc_answer", None)
            if answer is not None:
                return answer
            logger.error("backend %r: a gRPC stream failed", self.backend, exc_info=e)
            return 200, [("grpc-status", "13"), ("grpc-message", f"{type(e).__name__}: {e}")], b""
        if kind == _HTTP:
            logger.error("backend %r: %s %s failed", self.backend, (scope or {}).get("method"),
                         (scope or {}).get("path"), exc_info=e)
            error = {"error": f"{type(e).__name__}: {e}"}
            if DEBUG:
                error["traceback"] = "".join(traceback.format_exception(e))
            return 500, _JSON, _dumps(error).encode()
        logger.error("backend %r: handle call to %s failed", self.backend, method_name or "a method", exc_info=e)
        headers = [("content-type", "text/plain; charset=utf-8"), (ERROR_TYPE_HEADER, type(e).__name__)]
        body = "".join(traceback.format_exception(e)).encode("utf-8", "replace")
        pickled = _pickled_exception(e)
        if pickled is not None:
            headers.append((EXCEPTION_HEADER, pickled))
        return 500, headers, body

    # -- streams ---------------------------------------------------------

    def _start_stream(self, kind: int, source: Any, scope, reply) -> None:
        """Answers with a stream of what ``source`` (a generator, an async
        generator, or a Response whose body is produced by running it)
        yields, chunk by chunk, on a task that holds the request's slot until
        the stream ends."""
        stream = _Stream(reply)
        key = reply.stream_key
        self._streams[key] = stream
        stream.task = self._spawn(self._run_stream(kind, source, scope, reply, stream, key))

    def on_stream(self, conn: int, request_id: Optional[int], credit: int) -> None:
        """A router's signal for a stream: ``credit`` more chunks may go,
        or (-1) its consumer went away; ``request_id`` None: the connection
        closed, every stream on it is cancelled."""
        if request_id is None:
            for key, stream in list(self._streams.items()):
                if key[0] == conn:
                    stream.task.cancel()
            return
        stream = self._streams.get((conn, request_id))
        if stream is None:
            return
        if credit < 0:
            stream.task.cancel()
            return
        stream.credit += credit
        waiter = stream.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        elif stream.pending and not stream.flush_scheduled:
            # Bytes held for want of credit while the generator is suspended.
            self._schedule_flush(stream)

    async def _take_credit(self, stream: _Stream) -> None:
        """Waits until the window has room for one more chunk."""
        while stream.credit <= 0:
            stream.waiter = self.loop.create_future()
            try:
                await stream.waiter
            finally:
                stream.waiter = None
        stream.credit -= 1

    async def _send_gathered(self, stream: _Stream, chunk: bytes) -> None:
        """Queues one chunk of an HTTP or gRPC stream: the first leaves now, later
        ones when the loop next turns (with the rest of their burst) or,
        past STREAM_COALESCE_BYTES, now, waiting for credit (the
        backpressure on the generator)."""
        if stream.gone:
            raise _StreamGone()
        if not chunk:
            return
        stream.pending.append(chunk)
        stream.pending_size += len(chunk)
        if stream.first:
            stream.first = False
            await self._flush(stream)
            await self._step_aside()
        elif stream.pending_size >= STREAM_COALESCE_BYTES:
            await self._flush(stream)
        elif not stream.flush_scheduled:
            self._schedule_flush(stream)

    async def _flush(self, stream: _Stream) -> None:
        """Sends the pending bytes under one credit, waiting for it."""
        if stream.pending:
            await self._take_credit(stream)
            if stream.pending:
                stream.send_pending()
            else:  # a scheduled flush sent them while this one waited
                stream.credit += 1
        if stream.gone:
            raise _StreamGone()

    def _schedule_flush(self, stream: _Stream) -> None:
        stream.flush_scheduled = True
        self.loop.call_soon(self._flush_soon, stream)

    def _flush_soon(self, stream: _Stream) -> None:
        """The loop turned: the burst's bytes go, if the window has room
        (else on_stream schedules this again when credit comes)."""
        stream.flush_scheduled = False
        if stream.pending and stream.credit > 0 and not stream.gone:
            stream.credit -= 1
            stream.send_pending()

    async def _run_stream(self, kind: int, source: Any, scope, reply, stream: _Stream, key) -> None:
        try:
            if isinstance(source, Response):
                await self._stream_asgi(source, scope, reply, stream)
            elif reply.start_stream(200, _STREAM_HEADS.get(kind, _PICKLE)):
                await self._stream_items(kind, source, reply, stream)
        except (asyncio.CancelledError, _StreamGone, ClientDisconnect):
            # The client went away (or the replica stops): the generator was
            # closed where it stood. (Starlette turns ASGI 2.4's OSError from
            # send into ClientDisconnect.)
            _end_stream_with(reply, _UNAVAILABLE)
        except (KeyboardInterrupt, SystemExit) as e:
            _end_stream_with(reply, _fatal_response(e))
            raise
        except Exception as e:
            if stream.pending and not stream.gone:
                stream.send_pending()  # what was yielded before the error
            _end_stream_with(reply, self._error(kind, e, scope, None))
        finally:
            self._streams.pop(key, None)
            self._done()

    async def _stream_items(self, kind: int, source: Any, reply, stream: _Stream) -> None:
        """Streams a generator's items: over HTTP as body bytes gathered per
        burst (``_send_gathered``, which holds the generator once a
        window and a burst are out), a gRPC stream's reply messages the same
        way; else one item per frame, the generator not advanced while the
        window is out. (A sync generator's ``next`` blocks the loop, which
        would hold a burst back for as long: its items go one by one. A
        gRPC stream's source is always an async generator, which gives the
        loop its turns: ``serval.cortex.grpc_api``.)"""
        if kind in (_HTTP, _GRPC) and inspect.isasyncgen(source):
            # gRPC's items come framed (serval.cortex.grpc_api).
            to_bytes = _http_chunk if kind == _HTTP else None
            try:
                async for item in source:
                    if item is SendNow:
                        await self._flush(stream)
                        continue
                    chunk = item if to_bytes is None else to_bytes(item)
                    # Most chunks of a burst only join it: no coroutine for them.
                    if not stream.gather(chunk):
                        await self._send_gathered(stream, chunk)
            finally:
                await source.aclose()
        else:
            encode = _http_chunk if kind == _HTTP else cloudpickle.dumps

            async def put(item):
                if not reply.send_chunk(encode(item)):
                    raise _StreamGone()
            if inspect.isasyncgen(source):
                try:
                    while True:
                        await self._take_credit(stream)
                        try:
                            item = await source.__anext__()
                        except StopAsyncIteration:
                            break
                        await put(item)
                finally:
                    await source.aclose()
            else:
                try:
                    while True:
                        await self._take_credit(stream)
                        try:
                            item = _call_blocking(next, (source,), None)
                        except StopIteration:
                            break
                        await put(item)
                finally:
                    source.close()
        await self._flush(stream)
        reply.end_stream()

    async def _stream_asgi(self, response: Response, scope: dict, reply, stream: _Stream) -> None:
        """Runs a Response whose body is produced (StreamingResponse,
        FileResponse) as an ASGI app, each body message a chunk."""
        background, response.background = response.background, None

        async def send(message):
            if message["type"] == "http.response.start":
                headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
                if not reply.start_stream(message["status"], headers):
                    raise _StreamGone()
            elif message["type"] == "http.response.body":
                await self._send_gathered(stream, bytes(message.get("body", b"")))

        async def receive():  # a disconnect cancels this task instead
            await asyncio.Event().wait()

        await response(scope, receive, send)
        if reply.answered:
            await self._flush(stream)
            reply.end_stream()
        else:
            raise RuntimeError("the response ended without starting (no http.response.start)")
        if background is not None:
            self._after_send(background)

    # -- batches ---------------------------------------------------------

    def _run_batch(self, target: _Target, batch: list) -> None:
        requests = [item.request for item in batch]
        try:
            if target.is_async:
                result = target.fn(requests)
            else:
                result = _call_blocking(target.fn, (requests,), None)
            if inspect.isawaitable(result):
                self._spawn(self._finish_batch_async(result, target, batch))
                return
        except (KeyboardInterrupt, SystemExit) as e:
            for item in batch:
                item.reply.send(*_fatal_response(e))
                self._done()
            raise
        except Exception as e:
            self._fail_batch(target, batch, e)
            return
        self._split(target, batch, result)

    async def _finish_batch_async(self, awaitable, target: _Target, batch: list) -> None:
        try:
            result = await awaitable
        except asyncio.CancelledError:
            for item in batch:
                item.reply.send(*_UNAVAILABLE)
                self._done()
            raise
        except (KeyboardInterrupt, SystemExit) as e:
            for item in batch:
                item.reply.send(*_fatal_response(e))
                self._done()
            raise
        except Exception as e:
            self._fail_batch(target, batch, e)
            return
        self._split(target, batch, result)

    def _fail_batch(self, target: _Target, batch: list, e: Exception) -> None:
        for item in batch:
            item.reply.send(*_with_batch_size(self._error(item.kind, e, item.scope, target.name), len(batch)))
            self._done()

    def _split(self, target: _Target, batch: list, results: Any) -> None:
        """One result per request, in order; anything else fails every caller."""
        if not isinstance(results, (list, tuple)) or len(results) != len(batch):
            got = (f"{len(results)} results" if isinstance(results, (list, tuple))
                   else f"a {type(results).__name__}")
            error = BatchResultError(
                f"@serve.accept_batch method '{target.name}' of backend '{self.backend}' returned {got} for a "
                f"batch of {len(batch)} requests; it must return a list with one result per request")
            self._fail_batch(target, batch, error)
            return
        for item, result in zip(batch, results):
            try:
                response = self._respond(item.kind, result, item.scope)
            except Exception as e:
                response = self._error(item.kind, e, item.scope, target.name)
            if type(response) is not tuple:
                self._spawn(self._send_later(response, item.reply))
                continue
            item.reply.send(*_with_batch_size(response, len(batch)))
            self._done()

    # -- reconfigure -----------------------------------------------------

    def on_grpc(self, path: str, message: bytes, metadata: tuple, timeout: Optional[float], reply):
        """A gRPC call the proxy terminated: the object's
        ``serval_grpc_call`` answers it (now, or later through ``reply``)
        with ``(200, [("grpc-status", code), ("grpc-message", details)],
        reply message bytes)``, or, for a server-streaming call, with an
        async generator of the reply messages' bytes, streamed here as HTTP
        generators are (credits, cancel) on a task that holds the call until
        the stream ends. An object without one answers UNIMPLEMENTED."""
        if self._grpc is None:
            return 200, [("grpc-status", "12"), ("grpc-message", f"backend '{self.backend}' serves no gRPC "
                                                                  f"method {path}")], b""
        result = self._grpc(path, message, metadata, timeout, reply)
        if inspect.isasyncgen(result):
            self._in_flight += 1  # the stream's task ends it (_done)
            self._start_stream(_GRPC, result, None, reply)
            return None
        return result

    def on_grpc_message(self, conn: int, request_id: int, message: Optional[bytes]) -> None:
        """A client stream's next request message (None: the client
        half-closed), for the call ``(conn, request_id)`` names."""
        if self._grpc_message is not None:
            self._grpc_message((conn, request_id), message)

    def on_reconfigure(self, config_json: str, reply):
        """A config change from the node agent: new limits now, and
        ``reconfigure(user_config)`` when the user config changed."""
        try:
            config = json.loads(config_json)
            if not isinstance(config, dict):
                raise TypeError(f"the new config must be a JSON object, got {type(config).__name__}")
            self._apply_limits(config)
            self.config.update(config)
            user_config = config.get("user_config")
            if user_config is None or user_config == self._user_config:
                return 200, _JSON, b'{"reconfigured":false}'
            method = self._reconfigure_method()
            if method is None:
                self._user_config = user_config
                return 200, _JSON, b'{"reconfigured":false}'
            logger.info("backend %r: reconfigure(%r)", self.backend, user_config)
            if inspect.iscoroutinefunction(method):
                result = method(user_config)
            else:
                result = _call_blocking(method, (user_config,), None)
            if inspect.isawaitable(result):
                self._spawn(self._finish_reconfigure(result, user_config, reply))
                return None
            self._user_config = user_config
            return 200, _JSON, b'{"reconfigured":true}'
        except (KeyboardInterrupt, SystemExit) as e:
            reply.send(*_fatal_response(e))
            raise
        except Exception as e:
            return self._reconfigure_failed(e)

    async def _finish_reconfigure(self, awaitable, user_config, reply) -> None:
        try:
            await awaitable
        except asyncio.CancelledError:
            reply.send(*_UNAVAILABLE)
            raise
        except (KeyboardInterrupt, SystemExit) as e:
            reply.send(*_fatal_response(e))
            raise
        except Exception as e:
            reply.send(*self._reconfigure_failed(e))
            return
        self._user_config = user_config
        reply.send(200, _JSON, b'{"reconfigured":true}')

    def _reconfigure_failed(self, e: BaseException):
        logger.error("backend %r: reconfigure failed", self.backend, exc_info=e)
        return 500, [("content-type", "text/plain; charset=utf-8"), (ERROR_TYPE_HEADER, type(e).__name__)], \
            "".join(traceback.format_exception(e)).encode("utf-8", "replace")

    # -- HTTP ------------------------------------------------------------

    def on_http(self, method_name: Optional[str], scope: dict, body: bytes, reply):
        try:
            target = self._asgi_http if method_name is None and self._asgi_http is not None \
                else self._target(method_name)
        except MethodNotFound as e:
            return self._not_found(str(e))
        request = Request(scope, _Receive(body))
        # The body is already whole: let body()/json()/form() share it in
        # any order (Starlette reads `_body` before touching receive).
        request._body = body
        if self._multiplexed or multiplex.has_caches():
            model_id = multiplex.model_id_from_scope(scope)
            return self._submit_for_model(model_id, target, _HTTP, (request,), None, scope, reply)
        return self._submit(target, _HTTP, (request,), None, scope, reply)

    def _to_http(self, result: Any, scope: dict):
        """(status, headers, body), or an awaitable of it for a Response
        whose body is produced by running it (streaming, files). A Response's
        ``background`` runs after the reply was sent (``_after_send``)."""
        if isinstance(result, Response):
            body = getattr(result, "body", None)
            if isinstance(body, (bytes, bytearray, memoryview)):
                if result.background is not None:
                    self._after_send(result.background)
                headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in result.raw_headers]
                return result.status_code, headers, bytes(body)
            return self._run_asgi_response(result, scope)
        return result_to_http(result, self.backend)

    def _after_send(self, background: BackgroundTask) -> None:
        """Runs a Response's background once its reply is on its way: the
        task's first step runs on a later loop iteration, i.e. after the
        current drain wrote its buffered replies, or after the task that
        produced the response sent it (it sends without yielding)."""
        self._spawn(self._run_background(background))

    async def _run_background(self, background: BackgroundTask) -> None:
        # BackgroundTasks runs its tasks in order and stops at the first
        # error, as Starlette does. Sync callables run inline on this thread
        # like sync user code (Starlette would use its thread pool); anything
        # else (a nested BackgroundTasks) is awaited as Starlette would.
        tasks = background.tasks if isinstance(background, BackgroundTasks) else (background,)
        try:
            for task in tasks:
                if getattr(task, "is_async", True):
                    await task()
                else:
                    _call_blocking(task.func, task.args, task.kwargs)
        except Exception as e:
            logger.error("backend %r: background task of a response failed", self.backend, exc_info=e)

    async def _run_asgi_response(self, response: Response, scope: dict):
        """Streaming/file responses: run them as an ASGI app and collect the body."""
        # Starlette would run the background inside the call, before our
        # caller sends the reply: take it and run it after the send instead.
        background, response.background = response.background, None
        status = 200
        headers: list[tuple[str, str]] = []
        chunks: list[bytes] = []

        async def send(message):
            nonlocal status, headers
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
            elif message["type"] == "http.response.body":
                chunks.append(bytes(message.get("body", b"")))

        async def receive():  # the client never disconnects mid-response here
            await asyncio.Event().wait()

        await response(scope, receive, send)
        if background is not None:
            self._after_send(background)
        return status, headers, b"".join(chunks)

    # -- ServeHandle -----------------------------------------------------

    def on_call(self, method_name: Optional[str], args: bytes, http_method: str, headers: list, reply):
        try:
            target = self._target(method_name)
        except MethodNotFound as e:
            return self._not_found(str(e))
        try:
            call_args, call_kwargs = cloudpickle.loads(args)
            # A Starlette request passed to the handle arrives as itself.
            call_args = tuple(a.to_request() if isinstance(a, WebRequestState) else a for a in call_args)
            call_kwargs = {k: v.to_request() if isinstance(v, WebRequestState) else v
                           for k, v in call_kwargs.items()}
            if self.deployment_options is not None:
                # Ray Serve 2.x: the arguments as the caller gave them.
                pass
            elif target.name == "__call__" or target.batched:
                if len(call_args) == 1 and not call_kwargs and isinstance(call_args[0], Request):
                    request = call_args[0]
                else:
                    request = ServeRequest(call_args, call_kwargs, http_method, headers)
                call_args, call_kwargs = (request,), None
            elif not call_args and _needs_request(target.fn, call_kwargs):
                # Ray 1.x: `handle.options(method_name="m").remote()` gives
                # `def m(self, request)` the request; `other_method(self,
                # inc)` with `.remote(5)` still gets 5 (seed 003).
                call_args, call_kwargs = (ServeRequest((), call_kwargs, http_method, headers),), None
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            return self._error(_CALL, e, None, target.name)
        kind = _STREAM_CALL if any(k == STREAM_CALL_HEADER for k, _ in headers) else _CALL
        if self._multiplexed or multiplex.has_caches():
            model_id = multiplex.model_id_from_headers(headers) if headers else ""
            return self._submit_for_model(model_id, target, kind, call_args, call_kwargs, None, reply)
        return self._submit(target, kind, call_args, call_kwargs, None, reply)


#: ``serve.get_replica_context()`` in a deployment's replica.
_REPLICA_CONTEXT: dict = {}


def _set_replica_context(backend: str, func_or_class: Any) -> None:
    app, _, deployment = backend.partition("#")
    _REPLICA_CONTEXT.update(app_name=app, deployment=deployment or backend,
                            replica_id=os.environ.get("SERVAL_REPLICA_ID", ""), servable_object=None)


def replica_context() -> Optional[dict]:
    """The running deployment replica's names, or None outside one."""
    return dict(_REPLICA_CONTEXT) if _REPLICA_CONTEXT else None


def _needs_request(fn: Any, kwargs: dict) -> bool:
    """Whether ``fn`` cannot be called with just ``kwargs`` but can with one
    positional argument more: the request object it expects."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    try:
        signature.bind(**kwargs)
        return False
    except TypeError:
        pass
    try:
        signature.bind(None, **kwargs)
        return True
    except TypeError:
        return False


def _pickled_exception(e: BaseException) -> Optional[str]:
    if not isinstance(e, Exception):
        return None
    # The traceback stays out of the pickle (the body carries it as text);
    # with_traceback changes the exception itself, so it is put back.
    tb = e.__traceback__
    try:
        data = cloudpickle.dumps(e.with_traceback(None))
    except Exception:
        return None
    finally:
        e.with_traceback(tb)
    if len(data) > EXCEPTION_MAX_BYTES:
        return None
    import base64

    return base64.b64encode(data).decode("ascii")


def result_to_http(result: Any, backend: str):
    """(status, headers, body) for a result that is not a Response: None,
    dict, list, bool and numbers as JSON, str as text, bytes as
    application/octet-stream, anything else as JSON when it serializes, else
    a 500 that says why."""
    if result is None or isinstance(result, (dict, list, bool, int, float)):
        return 200, _JSON, _dumps(result).encode()
    if isinstance(result, str):
        return 200, _TEXT, result.encode("utf-8")
    if isinstance(result, (bytes, bytearray, memoryview)):
        return 200, _OCTET, bytes(result)
    try:
        encoded = _dumps(result).encode()
    except (TypeError, ValueError) as e:
        logger.error("backend %r returned an unserializable %s: %s", backend, type(result).__name__, e)
        message = (
            f"backend '{backend}' returned a {type(result).__name__}, which is not JSON serializable; "
            "return a dict, list, str, bytes or a starlette Response"
        )
        return 500, _JSON, _dumps({"error": message}).encode()
    return 200, _JSON, encoded


#: What a result that may stream is (one isinstance on the hot path).
_MAY_STREAM = (types.GeneratorType, types.AsyncGeneratorType, Response)


def _streams(kind: int, result: Any) -> bool:
    """Whether ``result`` is answered as a stream: a generator or async
    generator, or (HTTP) a Response whose body is produced by running it."""
    if inspect.isgenerator(result) or inspect.isasyncgen(result):
        if kind == _CALL:
            if inspect.isgenerator(result):
                result.close()
            raise TypeError("the method is a generator: call it with handle.options(stream=True)")
        return True
    return kind == _HTTP and isinstance(result, Response) and \
        not isinstance(getattr(result, "body", None), (bytes, bytearray, memoryview))


def _http_chunk(item: Any) -> bytes:
    """One yielded item as HTTP body bytes: str as UTF-8, bytes as they
    are, anything else as JSON."""
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    return _dumps(item).encode()


_GRPC_PREFIX = struct.Struct(">BI").pack


def _grpc_message(message: bytes) -> bytes:
    """One reply message in gRPC's framing (uncompressed, its length in 4
    big-endian bytes), as the proxy passes it on to the client."""
    return _GRPC_PREFIX(0, len(message)) + message


def _end_stream_with(reply, response) -> None:
    """Ends a stream with an error: as the whole answer when its head has
    not gone out yet, else as its error frame."""
    if not reply.answered:
        reply.send(*response)
    else:
        reply.fail_stream(*response)


def _with_batch_size(response, size: int):
    """The response with the batch-size header added (headers copied: they
    may be shared constants)."""
    status, headers, body = response
    return status, list(headers) + [(BATCH_SIZE_HEADER, str(size))], body


def _fatal_response(e: BaseException):
    """KeyboardInterrupt/SystemExit in user code: answered, then the replica stops."""
    kind = type(e).__name__
    body = _dumps({"error": f"replica stopped: {kind}: {e}"}).encode()
    return 500, _JSON + [(ERROR_TYPE_HEADER, kind)], body


class _Receive:
    """ASGI receive: the whole body once, then a disconnect."""

    __slots__ = ("body",)

    def __init__(self, body: bytes):
        self.body = body

    async def __call__(self):
        body = self.body
        if body is None:
            return {"type": "http.disconnect"}
        self.body = None
        return {"type": "http.request", "body": body, "more_body": False}


async def _as_coro(awaitable):
    return await awaitable
