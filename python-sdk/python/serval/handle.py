"""ServeHandle: calls an endpoint's replicas directly from Python.

A handle goes through the same Rust router as the HTTP proxy (traffic
policy, load balancing, backpressure), but sends pickled Python arguments
instead of an HTTP request. ``sync=True`` handles return a
:class:`ServeFuture` (the ``ObjectRef`` role: ``.result()`` or
``serval.get``); ``sync=False`` handles are awaited in asyncio code.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import sysconfig
import threading
from typing import Any, Dict, Optional

import cloudpickle
from starlette.requests import Request

from serval._native import ServeError
from serval.multiplex import MODEL_ID_HEADER
from serval.request import WebRequestState

PICKLE_CONTENT_TYPE = "application/x-python-pickle"
ERROR_TYPE_HEADER = "x-serval-error"
EXCEPTION_HEADER = "x-serval-exception"
#: Marks a handle call made with ``options(stream=True)`` (``_host.STREAM_CALL_HEADER``).
STREAM_CALL_HEADER = "x-serval-stream"


class BackendError(ServeError):
    """User code raised in a replica; the message carries its traceback.
    When the exception could be sent along, the error raised is also an
    instance of its class (``except ValueError`` catches a ValueError raised
    in a deployment, as with Ray's RayTaskError) and has its attributes;
    ``cause`` is the exception itself."""

    def __init__(self, exc_type: str, traceback_text: str):
        # Not super(): in a class combined with the user's exception class,
        # that would call its __init__ with this message.
        Exception.__init__(self, f"{exc_type} raised in the replica:\n{traceback_text}")
        self.exc_type = exc_type
        self.traceback = traceback_text
        self.cause: Optional[BaseException] = None


#: BackendError subclasses per user exception class (bounded: a class whose
#: combination cannot be made is not retried, others are few).
_AS_CAUSE: Dict[type, Optional[type]] = {}
_AS_CAUSE_MAX = 256


def _backend_error(exc_type: str, text: str, pickled: Optional[str]) -> BackendError:
    cause = None
    if pickled:
        try:
            import base64

            cause = cloudpickle.loads(base64.b64decode(pickled))
        except Exception:
            cause = None
    if not isinstance(cause, Exception) or isinstance(cause, BackendError):
        return BackendError(exc_type, text)
    cls = type(cause)
    if cls not in _AS_CAUSE and len(_AS_CAUSE) < _AS_CAUSE_MAX:
        try:
            _AS_CAUSE[cls] = type(f"BackendError({cls.__name__})", (BackendError, cls), {
                "__module__": __name__, "__reduce__": lambda self: (BackendError, (self.exc_type, self.traceback))})
        except TypeError:  # a class whose layout cannot be combined (OSError & co)
            _AS_CAUSE[cls] = None
    combined = _AS_CAUSE.get(cls)
    if combined is None:
        error = BackendError(exc_type, text)
    else:
        error = combined.__new__(combined)
        BackendError.__init__(error, exc_type, text)
        error.__dict__.update({k: v for k, v in getattr(cause, "__dict__", {}).items()
                               if k not in ("exc_type", "traceback", "cause")})
    error.cause = cause
    error.__cause__ = cause
    return error


def _header(headers, name: str) -> Optional[str]:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def decode_result(status: int, headers, body: bytes) -> Any:
    """Turns a replica's answer to a handle call into a value or an error."""
    if status == 200 and _header(headers, "content-type") == PICKLE_CONTENT_TYPE:
        return cloudpickle.loads(body)
    error_type = _header(headers, ERROR_TYPE_HEADER)
    text = bytes(body).decode("utf-8", "replace")
    if error_type == "MethodNotFound":
        try:
            text = json.loads(text)["error"]
        except (ValueError, KeyError, TypeError):
            pass
        raise ServeError(text)
    if error_type:
        raise _backend_error(error_type, text, _header(headers, EXCEPTION_HEADER))
    raise ServeError(f"replica answered {status}: {text}")


@functools.lru_cache(maxsize=1)
def _installed_paths():
    paths = sysconfig.get_paths()
    return tuple(os.path.realpath(paths[k]) + os.sep
                 for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths)


def _is_user_module(name: str) -> bool:
    """A module of the caller's own code, which replicas cannot import."""
    if not name or name == "__main__" or name.split(".")[0] in ("serval", "builtins") \
            or name.split(".")[0] in sys.stdlib_module_names:
        return False
    module = sys.modules.get(name)
    file = getattr(module, "__file__", None)
    return file is not None and not os.path.realpath(file).startswith(_installed_paths())


def _user_modules(values, depth: int = 0, found=None) -> set:
    """Modules of the arguments' classes (and one container level deeper)."""
    found = set() if found is None else found
    for v in values:
        name = getattr(type(v), "__module__", "") or ""
        if _is_user_module(name):
            found.add(name)
        if depth < 2 and isinstance(v, (list, tuple, set, frozenset)):
            _user_modules(v, depth + 1, found)
        elif depth < 2 and isinstance(v, dict):
            _user_modules(list(v.keys()) + list(v.values()), depth + 1, found)
    return found


_PICKLE_LOCK = threading.Lock()


def _portable(value: Any) -> Any:
    if isinstance(value, Request):
        body = getattr(value, "_body", None)
        if body is None:
            raise TypeError("this starlette Request's body has not been read: `await request.body()` "
                            "before passing it to a sync handle, or use serve.get_handle(..., sync=False)")
        return WebRequestState.from_request(value, body)
    return value


def dumps_call(args: tuple, kwargs: dict) -> bytes:
    """cloudpickle of ``(args, kwargs)``: Starlette requests travel as their
    scope and body, objects of the caller's own modules by value."""
    args = tuple(_portable(a) for a in args)
    kwargs = {k: _portable(v) for k, v in kwargs.items()}
    modules = _user_modules(list(args) + list(kwargs.values()))
    if not modules:
        return cloudpickle.dumps((args, kwargs))
    registered = getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", set())
    with _PICKLE_LOCK:
        added = []
        for name in sorted(modules):
            if name not in registered:
                cloudpickle.register_pickle_by_value(sys.modules[name])
                added.append(name)
        try:
            return cloudpickle.dumps((args, kwargs))
        finally:
            for name in added:
                cloudpickle.unregister_pickle_by_value(sys.modules[name])


async def _read_bodies(args: tuple, kwargs: dict) -> None:
    """An async caller may pass a request whose body is not read yet."""
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, Request) and getattr(v, "_body", None) is None:
            await v.body()


class ServeFuture:
    """A call in flight; ``result()`` waits for it (like ``ray.get``), and
    async code may ``await`` it instead (an ObjectRef could be awaited)."""

    __slots__ = ("_native",)

    def __init__(self, native_future):
        self._native = native_future

    def result(self, timeout: Optional[float] = None) -> Any:
        return decode_result(*self._native.result(timeout))

    def __await__(self):
        return self._result_async().__await__()

    async def _result_async(self) -> Any:
        return decode_result(*await self._native.result_async())


class _Resolved:
    """A handle result that is also its own reference: seed 003's
    ``ref = await handle.remote()`` is followed by ``await ref`` or
    ``serval.get(ref)``, while Serval code uses the first await's value
    directly. Results of the common types are returned as these subclasses
    of their type (equal to, and used as, the value; pickled as the plain
    value), so both hold."""

    __slots__ = ()

    def __await__(self):
        # `await ref` is the value itself, at once.
        if False:  # pragma: no cover - makes this a generator
            yield
        return self

    def __reduce__(self):
        base = _RESOLVED_BASE[type(self)]
        return base, (base(self),)


class _ResolvedDict(_Resolved, dict):
    __slots__ = ()


class _ResolvedList(_Resolved, list):
    __slots__ = ()


class _ResolvedTuple(_Resolved, tuple):
    __slots__ = ()


class _ResolvedStr(_Resolved, str):
    __slots__ = ()


class _ResolvedBytes(_Resolved, bytes):
    __slots__ = ()


class _ResolvedInt(_Resolved, int):
    __slots__ = ()


class _ResolvedFloat(_Resolved, float):
    __slots__ = ()


_RESOLVED = {dict: _ResolvedDict, list: _ResolvedList, tuple: _ResolvedTuple, str: _ResolvedStr,
             bytes: _ResolvedBytes, int: _ResolvedInt, float: _ResolvedFloat}
_RESOLVED_BASE = {v: k for k, v in _RESOLVED.items()}


def resolved(value: Any) -> Any:
    """``value`` as its awaitable subclass when its type is exactly one of
    the common ones (bool, None and other objects are returned as they are)."""
    cls = _RESOLVED.get(type(value))
    return value if cls is None else cls(value)


class _HandleBase:
    def __init__(self, native, endpoint_name: str, method_name: Optional[str] = None,
                 http_method: str = "GET", http_headers: Optional[Dict[str, str]] = None,
                 shard_key: Optional[str] = None):
        self._native = native
        self.endpoint_name = endpoint_name
        self.method_name = method_name
        self.http_method = http_method
        self.http_headers = dict(http_headers or {})
        self.shard_key = shard_key

    def options(self, method_name: Optional[str] = None, http_method: Optional[str] = None,
                http_headers: Optional[Dict[str, str]] = None, shard_key: Optional[str] = None):
        """A copy of this handle that calls ``method_name`` and/or carries
        the given HTTP method and headers to the replica. ``shard_key``
        picks the backend of a traffic split by its hash, so calls with the
        same key reach the same backend (as the ``X-SERVE-SHARD-KEY`` header
        does over HTTP)."""
        if shard_key is not None and not isinstance(shard_key, str):
            raise TypeError(f"shard_key must be a str, not {type(shard_key).__name__}")
        return type(self)(
            self._native,
            self.endpoint_name,
            method_name if method_name is not None else self.method_name,
            http_method if http_method is not None else self.http_method,
            {**self.http_headers, **(http_headers or {})},
            shard_key if shard_key is not None else self.shard_key,
        )

    def _call_args(self, args, kwargs):
        return (
            self.method_name,
            dumps_call(args, kwargs),
            self.http_method,
            [(str(k), str(v)) for k, v in self.http_headers.items()],
            self.shard_key,
        )

    def __repr__(self):
        return f"{type(self).__name__}(endpoint={self.endpoint_name!r})"


class ServeHandle(_HandleBase):
    """Synchronous handle: ``handle.remote(...)`` returns a :class:`ServeFuture`."""

    def remote(self, *args, **kwargs) -> ServeFuture:
        return ServeFuture(self._native.call(*self._call_args(args, kwargs)))


class AsyncServeHandle(_HandleBase):
    """asyncio handle: ``await handle.remote(...)`` returns the result,
    which (for dicts, lists, tuples, strings, bytes and numbers) is also its
    own reference: ``await`` it again or pass it to ``serval.get`` as seed
    003 does with the ObjectRef it describes."""

    async def remote(self, *args, **kwargs) -> Any:
        await _read_bodies(args, kwargs)
        status, headers, body = await self._native.call_async(*self._call_args(args, kwargs))
        return resolved(decode_result(status, headers, body))


# -- Ray Serve 2.x: DeploymentHandle and DeploymentResponse -----------------

#: The native handles of this process, by endpoint, for the client that made
#: them (a new serve.connect() makes new ones).
_NATIVE_HANDLES: Dict[str, Any] = {}
_NATIVE_LOCK = threading.Lock()
#: How long a handle's first call waits for its router to know the endpoint.
_ENDPOINT_WAIT_S = 30.0


def _native_handle(endpoint: str):
    from serval import _core  # lazily: _core imports this module

    client = _core.get_client()
    with _NATIVE_LOCK:
        cached = _NATIVE_HANDLES.get(endpoint)
        if cached is not None and cached[0] is client:
            return cached[1]
    # A deployment's own replicas may start before this process's router
    # has seen the endpoint's snapshot: wait for it once.
    client.wait_endpoint(endpoint, _ENDPOINT_WAIT_S)
    native = client.handle(endpoint)
    with _NATIVE_LOCK:
        _NATIVE_HANDLES[endpoint] = (client, native)
    return native


def _in_event_loop() -> bool:
    try:
        import asyncio

        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


_HELPER = {"loop": None}
_HELPER_LOCK = threading.Lock()


def _helper_loop():
    """An event loop on a daemon thread of its own, where calls that take
    other calls' responses as arguments wait for them before they are sent,
    without blocking their caller."""
    import asyncio

    with _HELPER_LOCK:
        if _HELPER["loop"] is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="serval-handle-chain", daemon=True)
            thread.start()
            _HELPER["loop"] = loop
        return _HELPER["loop"]


_UNSET = object()


class DeploymentResponse:
    """The result of ``DeploymentHandle.remote()`` (Ray Serve 2.x): ``await``
    it in async code, ``.result(timeout_s=...)`` elsewhere, or pass it to
    another ``.remote()`` call: that call is sent once this one finished,
    with its result in its place, without the caller waiting."""

    __slots__ = ("_call", "_chained", "_value")

    def __init__(self, call: Optional[ServeFuture] = None, chained=None):
        self._call = call
        #: A concurrent.futures.Future of the value, for a chained call.
        self._chained = chained
        self._value = _UNSET

    def result(self, *, timeout_s: Optional[float] = None, _skip_asyncio_check: bool = False) -> Any:
        """Waits for the result (up to ``timeout_s`` seconds: TimeoutError,
        the call keeps running). Inside an event loop, ``await`` instead:
        a blocking wait there would stop the loop."""
        if self._value is not _UNSET:
            return self._value
        if not _skip_asyncio_check and _in_event_loop():
            raise RuntimeError("DeploymentResponse.result() blocks: it cannot be called from within an asyncio "
                               "event loop; use `await response` instead")
        if self._call is not None:
            value = self._call.result(timeout_s)
        else:
            import concurrent.futures

            try:
                value = self._chained.result(timeout_s)
            except concurrent.futures.TimeoutError:
                raise TimeoutError("the call did not finish in time") from None
        self._value = value
        return value

    def __await__(self):
        return self._result_async().__await__()

    async def _result_async(self) -> Any:
        if self._value is not _UNSET:
            return self._value
        if self._call is not None:
            value = await self._call
        else:
            import asyncio

            value = await asyncio.wrap_future(self._chained)
        self._value = value
        return value

    def __reduce__(self):
        raise TypeError("a DeploymentResponse can be passed to another .remote() call as an argument (not inside "
                        "a container), or awaited / .result() first")

    def __repr__(self) -> str:
        return f"DeploymentResponse(done={self._value is not _UNSET})"


def _holds_response(args: tuple, kwargs: dict) -> bool:
    return any(isinstance(a, DeploymentResponse) for a in args) or \
        any(isinstance(v, DeploymentResponse) for v in kwargs.values())


async def _resolve(value: Any) -> Any:
    return await value if isinstance(value, DeploymentResponse) else value


class DeploymentHandle:
    """Calls a deployment of an application (Ray Serve 2.x): ``remote()``
    calls ``__call__``, ``handle.method.remote()`` or
    ``handle.options(method_name="method").remote()`` another method. The
    arguments arrive as they were given (Starlette requests as themselves,
    responses of other calls as their results). Pickles as its names, so it
    can be passed to a replica, where it connects on first use."""

    def __init__(self, deployment_name: str, app_name: str, *, method_name: Optional[str] = None,
                 multiplexed_model_id: str = "", stream: bool = False):
        self._deployment_name = deployment_name
        self._app_name = app_name
        self._method_name = method_name
        #: Sent as the ``serve_multiplexed_model_id`` header (``serval.multiplex``).
        self._model_id = multiplexed_model_id
        self._stream = stream

    @property
    def deployment_name(self) -> str:
        return self._deployment_name

    @property
    def app_name(self) -> str:
        return self._app_name

    @property
    def _endpoint(self) -> str:
        return f"{self._app_name}#{self._deployment_name}"

    def options(self, *, method_name: Any = _UNSET, multiplexed_model_id: Any = _UNSET, stream: Any = _UNSET,
                use_new_handle_api: Any = _UNSET, _prefer_local_routing: Any = _UNSET) -> "DeploymentHandle":
        """A copy that calls ``method_name``, for the model
        ``multiplexed_model_id`` (routed to a replica holding it when one
        has room); with ``stream=True`` its ``remote()`` returns a
        :class:`DeploymentResponseGenerator` of what a generator method
        yields."""
        if stream is not _UNSET and not isinstance(stream, bool):
            raise TypeError(f"stream must be a bool, not {stream!r}")
        streaming = self._stream if stream is _UNSET else stream
        model_id = self._model_id
        if multiplexed_model_id is not _UNSET:
            if not isinstance(multiplexed_model_id, str):
                raise TypeError(f"multiplexed_model_id must be a str, not {type(multiplexed_model_id).__name__}")
            model_id = multiplexed_model_id
        method = self._method_name
        if method_name is not _UNSET:
            if not isinstance(method_name, str) or not method_name:
                raise TypeError(f"method_name must be a non-empty str, not {method_name!r}")
            method = None if method_name == "__call__" else method_name
        return DeploymentHandle(self._deployment_name, self._app_name, method_name=method,
                                multiplexed_model_id=model_id, stream=streaming)

    def __getattr__(self, name: str) -> "DeploymentHandle":
        # `handle.predict.remote(...)`; private names stay attributes.
        if name.startswith("_"):
            raise AttributeError(name)
        return self.options(method_name=name)

    def remote(self, *args: Any, **kwargs: Any) -> DeploymentResponse:
        if self._stream:
            if _holds_response(args, kwargs):
                raise TypeError("a streaming call takes no DeploymentResponse arguments: await them first")
            native = _native_handle(self._endpoint)
            return DeploymentResponseGenerator(native.stream(self._method_name, dumps_call(args, kwargs), "GET",
                                                             self._headers() + [(STREAM_CALL_HEADER, "1")], None))
        if _holds_response(args, kwargs):
            import asyncio

            future = asyncio.run_coroutine_threadsafe(self._remote_when_resolved(args, kwargs), _helper_loop())
            return DeploymentResponse(chained=future)
        native = _native_handle(self._endpoint)
        call = native.call(self._method_name, dumps_call(args, kwargs), "GET", self._headers(), None)
        return DeploymentResponse(ServeFuture(call))

    async def _remote_when_resolved(self, args: tuple, kwargs: dict) -> Any:
        args = tuple([await _resolve(a) for a in args])
        kwargs = {k: await _resolve(v) for k, v in kwargs.items()}
        native = _native_handle(self._endpoint)
        status, headers, body = await native.call_async(self._method_name, dumps_call(args, kwargs), "GET",
                                                        self._headers(), None)
        return decode_result(status, headers, body)

    def _headers(self) -> list:
        return [(MODEL_ID_HEADER, self._model_id)] if self._model_id else []

    def __reduce__(self):
        return _rebuild_handle, (self._deployment_name, self._app_name, self._method_name, self._model_id,
                                 self._stream)

    def __repr__(self) -> str:
        method = f", method={self._method_name!r}" if self._method_name else ""
        return f"DeploymentHandle(deployment={self._deployment_name!r}, app={self._app_name!r}{method})"


def _rebuild_handle(deployment_name: str, app_name: str, method_name: Optional[str],
                    model_id: str = "", stream: bool = False) -> DeploymentHandle:
    return DeploymentHandle(deployment_name, app_name, method_name=method_name, multiplexed_model_id=model_id,
                            stream=stream)


class DeploymentResponseGenerator:
    """The result of ``handle.options(stream=True).remote()`` (Ray Serve
    2.x): iterate it (``for`` outside a deployment, ``async for`` inside
    one) for the items the generator method yields, each as the replica
    yields it. An exception the generator raised is raised from the
    iteration. Closing it (``close()``, or dropping it) before the end
    cancels the generator in the replica."""

    __slots__ = ("_native", "_done")

    def __init__(self, native_stream):
        self._native = native_stream
        self._done = False

    def _item(self, step):
        kind, data = step
        if kind == "chunk":
            return cloudpickle.loads(data)
        self._done = True
        if kind == "end":
            raise StopIteration
        status, headers, body = data
        value = decode_result(status, headers, body)  # raises the replica's error
        raise TypeError(f"the method called with stream=True is not a generator (it returned {type(value).__name__}); "
                        "call it without stream=True")

    def __iter__(self):
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        if _in_event_loop():
            raise RuntimeError("iterating a DeploymentResponseGenerator with `for` blocks: inside an asyncio event "
                               "loop use `async for` instead")
        return self._item(self._native.next())

    def __aiter__(self):
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        step = await self._native.next_async()
        try:
            return self._item(step)
        except StopIteration:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Stops the stream; the replica's generator is cancelled."""
        self._done = True
        self._native.close()

    def __repr__(self) -> str:
        return f"DeploymentResponseGenerator(done={self._done})"
