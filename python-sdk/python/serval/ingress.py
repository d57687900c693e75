"""``@serve.ingress(app)``: a deployment class whose HTTP traffic (and
WebSocket sessions) an ASGI app such as FastAPI serves, as in Ray Serve 2.x.

The app's routes answer under the application's route prefix: the proxy
routes the whole prefix to the ingress deployment and sets the scope's
``root_path`` to the prefix, so FastAPI's routing, its ``/docs`` page and
``/openapi.json`` work below it.

Routes declared with the app's decorators on the class's own methods (the
class-based-view pattern) get the replica's instance as ``self``: each such
route is rebuilt with ``self`` as a FastAPI dependency that yields the
instance serving the request. Other routes of the app stay as they are.

In the replica the ingress's ``__call__`` runs the request as one ASGI call
into the app and returns the collected response (status, headers, body);
``_serval_asgi`` is the raw ASGI entry that WebSocket sessions use
(``serval.websocket``). The host runs the app's lifespan (``Lifespan``)
around the replica's life.
"""

from __future__ import annotations

import asyncio
import contextvars
import copyreg
import functools
import inspect
import logging
import typing
from typing import Any, Optional

from starlette.datastructures import State
from starlette.requests import Request
from starlette.responses import Response

__all__ = ["ingress"]

#: The ingress instance serving the current request (set per ASGI call, so
#: tasks and FastAPI's thread pool for sync endpoints inherit it).
_INSTANCE: contextvars.ContextVar = contextvars.ContextVar("serval_ingress_instance")


def _state_reduce(state: State):
    return State, (dict(state._state),)


# The app travels to the replicas pickled, its `app.state` with it; a
# State's __getattr__ recurses when unpickled attribute by attribute.
copyreg.pickle(State, _state_reduce)


def _current_instance() -> Any:
    return _INSTANCE.get()


def ingress(app: Any):
    """Serves the decorated deployment class's HTTP requests with ``app``
    (an ASGI app: FastAPI, Starlette or any ASGI callable)."""
    if not callable(app):
        raise TypeError(f"serve.ingress expects an ASGI app such as a FastAPI app, got {type(app).__name__}")

    def decorator(cls):
        if not inspect.isclass(cls):
            raise TypeError("@serve.ingress decorates a class; a function deployment has no ingress app")
        _bind_class_routes(app, cls)

        # Module-level functions, pickled by reference: the class travels by
        # value to the replicas, and the context variable cannot.
        members = {"__call__": _http_call, "_serval_asgi": _asgi_call, "_serval_asgi_app": app,
                   "__module__": cls.__module__, "__doc__": cls.__doc__}
        wrapped = type(cls.__name__, (cls,), members)
        wrapped.__qualname__ = f"{cls.__qualname__}.<serve.ingress>"
        return wrapped

    return decorator


async def _asgi_call(self, scope, receive, send) -> None:
    """The ingress's raw ASGI entry (WebSocket sessions)."""
    token = _INSTANCE.set(self)
    try:
        await self._serval_asgi_app(scope, receive, send)
    finally:
        _INSTANCE.reset(token)


async def _http_call(self, request: Request) -> Response:
    """The ingress's ``__call__``: one HTTP request through the app."""
    return await run_http(self._serval_asgi, request)


async def run_http(app: Any, request: Request) -> Response:
    """Runs one HTTP request through the ASGI callable ``app``; its whole
    response."""
    body = await request.body()
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        # The response is collected whole before it leaves: the client
        # cannot be seen to go away mid-response here.
        await asyncio.Event().wait()

    status = 500
    headers: list = []
    chunks: list = []

    async def send(message):
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status = message["status"]
            headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
        elif message["type"] == "http.response.body":
            chunks.append(bytes(message.get("body", b"")))

    await app(dict(request.scope), receive, send)
    response = Response(b"".join(chunks), status_code=status)
    response.raw_headers = headers
    return response


class Lifespan:
    """An ingress app's ASGI lifespan around the replica's life: startup
    runs before the replica serves (a failed startup fails the replica's
    start), shutdown when it stops. An app that does not speak the protocol
    (it raises at once) runs without, as uvicorn's ``lifespan="auto"``."""

    def __init__(self, app: Any, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.messages: asyncio.Queue = asyncio.Queue()
        self.started = loop.create_future()
        self.stopped = loop.create_future()
        self.task = loop.create_task(self._run(app))

    async def _run(self, app: Any) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        try:
            await app(scope, self.messages.get, self._send)
        except Exception as e:
            if not self.started.done():
                self.started.set_result(None)  # no lifespan support
            elif not self.stopped.done():
                self.stopped.set_exception(e)
        for future in (self.started, self.stopped):
            if not future.done():
                future.set_result(None)

    async def _send(self, message: dict) -> None:
        kind = message["type"]
        if kind == "lifespan.startup.complete":
            self.started.set_result(None)
        elif kind == "lifespan.startup.failed":
            self.started.set_exception(RuntimeError(f"the app's startup failed: {message.get('message', '')}"))
        elif kind == "lifespan.shutdown.complete":
            self.stopped.set_result(None)
        elif kind == "lifespan.shutdown.failed":
            self.stopped.set_exception(RuntimeError(f"the app's shutdown failed: {message.get('message', '')}"))

    def start(self) -> None:
        """Runs startup to its end (the loop is not running yet)."""
        self.messages.put_nowait({"type": "lifespan.startup"})
        self.loop.run_until_complete(self.started)

    def stop(self, timeout: float) -> None:
        """Runs shutdown, for at most ``timeout`` (the loop no longer runs)."""
        if self.task.done():
            return
        self.messages.put_nowait({"type": "lifespan.shutdown"})
        try:
            self.loop.run_until_complete(asyncio.wait_for(asyncio.shield(self.stopped), timeout))
        except Exception as e:
            logging.getLogger("serval.replica").error("ingress app shutdown: %s", e)
        if not self.task.done():
            self.task.cancel()


def asgi_entry(obj: Any, is_function: bool) -> Optional[Any]:
    """A deployment's ASGI callable, or None: an ingress's app, or a
    ``__call__`` that is itself an ASGI app (async, taking exactly
    ``scope, receive, send``: a Starlette subclass, a raw ASGI class)."""
    entry = getattr(obj, "_serval_asgi", None)
    if entry is not None:
        return entry
    fn = obj if is_function else getattr(obj, "__call__", None)
    if fn is None or not (inspect.iscoroutinefunction(fn)
                          or inspect.iscoroutinefunction(getattr(type(fn), "__call__", None))):
        return None
    try:
        signature = inspect.signature(fn)
        signature.bind(None, None, None)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(None)
        return None  # it also takes a request alone: a plain __call__
    except TypeError:
        return fn


def _bind_class_routes(app: Any, cls: type) -> None:
    """Rebuilds the app's routes whose endpoint is one of ``cls``'s own
    functions so that ``self`` is the serving instance (a dependency)."""
    router = getattr(app, "router", None)
    routes = getattr(router, "routes", None)
    if routes is None:
        return
    own = {id(f): f for f in vars(cls).values() if inspect.isfunction(f)}
    for i, route in enumerate(list(routes)):
        endpoint = getattr(route, "endpoint", None)
        if endpoint is None or id(endpoint) not in own:
            continue
        routes[i] = _rebuilt(route, _with_instance(endpoint), app)


def _with_instance(fn):
    """``fn`` with its first parameter (``self``) given by a dependency."""
    from fastapi import Depends

    signature = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:
        hints = {}
    params = list(signature.parameters.values())
    if not params:
        return fn
    rest = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in params[1:]]
    first = params[0].replace(annotation=inspect.Parameter.empty, default=Depends(_current_instance),
                              kind=inspect.Parameter.POSITIONAL_OR_KEYWORD)
    # Keyword-only after `self`, so a defaulted `self` may precede required ones.
    rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.POSITIONAL_ONLY) else p
            for p in rest]
    new_signature = signature.replace(parameters=[first] + rest,
                                      return_annotation=hints.get("return", signature.return_annotation))

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def endpoint(*args, **kwargs):
            return await fn(*args, **kwargs)
    elif inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def endpoint(*args, **kwargs):
            async for item in fn(*args, **kwargs):
                yield item
    elif inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def endpoint(*args, **kwargs):
            yield from fn(*args, **kwargs)
    else:
        @functools.wraps(fn)
        def endpoint(*args, **kwargs):
            return fn(*args, **kwargs)
    del endpoint.__wrapped__  # FastAPI must read the new signature, not fn's
    endpoint.__signature__ = new_signature
    endpoint.__annotations__ = {p.name: p.annotation for p in rest if p.annotation is not inspect.Parameter.empty}
    return endpoint


def _rebuilt(route: Any, endpoint: Any, app: Any) -> Any:
    """A route of the same class with the same settings and a new endpoint:
    every constructor argument the route keeps as an attribute is passed on."""
    kind = type(route)
    kwargs = {}
    for name, param in inspect.signature(kind.__init__).parameters.items():
        if name in ("self", "path", "endpoint") or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if hasattr(route, name):
            kwargs[name] = getattr(route, name)
        elif name == "dependency_overrides_provider":
            kwargs[name] = app
    return kind(route.path, endpoint, **kwargs)
