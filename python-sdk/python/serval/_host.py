"""Request/response glue of a Python replica: hosts one user object.

``Host`` loads a backend (a class instantiated with its init args, or a plain
function), and answers the two kinds of request the Rust frame server hands
to its worker thread (see ``serval._native.ReplicaServer.run_worker``):

- ``on_http(method_name, scope, body)``: an HTTP request as an ASGI scope
  (built in Rust) and its body. User code gets a ``starlette.requests.Request``.
- ``on_call(method_name, args, http_method, headers)``: a ServeHandle call,
  ``args`` being cloudpickle of ``(args, kwargs)``. ``__call__`` gets a
  ``ServeRequest`` (or a Starlette request passed through the handle as-is);
  any other method gets ``method(*args, **kwargs)``.

Both return ``(status, [(name, value)], body_bytes)`` and never raise for a
user error: HTTP errors become 500 JSON ``{"error": "Type: message"}``, handle
errors 500 with ``x-serval-error: Type`` and the traceback as the body, an
unknown method 404 with ``x-serval-error: MethodNotFound``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import traceback
from typing import Any

import cloudpickle
from starlette.requests import Request
from starlette.responses import Response

from .request import ServeRequest, WebRequestState

logger = logging.getLogger("serval.replica")

PICKLE_CONTENT_TYPE = "application/x-python-pickle"
ERROR_TYPE_HEADER = "x-serval-error"

_JSON = [("content-type", "application/json")]
_TEXT = [("content-type", "text/plain; charset=utf-8")]
_OCTET = [("content-type", "application/octet-stream")]
_PICKLE = [("content-type", PICKLE_CONTENT_TYPE)]

#: SERVAL_DEBUG=1 (in the environment of `serve start`, inherited by its
#: replicas) adds the traceback to the 500 body of a failed HTTP request; it
#: is always in the replica's log.
DEBUG = os.environ.get("SERVAL_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class MethodNotFound(Exception):
    """The request named a method the backend does not have."""


def load_code(path: str) -> tuple[Any, tuple, dict]:
    """Reads cloudpickle of ``(func_or_class, init_args, init_kwargs)``."""
    with open(path, "rb") as f:
        loaded = cloudpickle.load(f)
    if not isinstance(loaded, tuple) or len(loaded) not in (1, 2, 3):
        raise TypeError(f"code file must hold (func_or_class, init_args, init_kwargs), got {type(loaded).__name__}")
    func_or_class = loaded[0]
    init_args = tuple(loaded[1]) if len(loaded) > 1 and loaded[1] is not None else ()
    init_kwargs = dict(loaded[2]) if len(loaded) > 2 and loaded[2] is not None else {}
    return func_or_class, init_args, init_kwargs


class Host:
    """One user object and the dispatch functions for the worker thread."""

    def __init__(self, backend: str, func_or_class: Any, init_args=(), init_kwargs=None, config=None):
        self.backend = backend
        self.config = dict(config or {})
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
        user_config = self.config.get("user_config")
        if user_config is not None:
            self.reconfigure(user_config)

    @classmethod
    def from_code_file(cls, backend: str, path: str, config=None) -> "Host":
        func_or_class, init_args, init_kwargs = load_code(path)
        return cls(backend, func_or_class, init_args, init_kwargs, config)

    def reconfigure(self, user_config: Any) -> None:
        """Calls ``obj.reconfigure(user_config)`` when the class defines it."""
        method = None if self.is_function else getattr(self.obj, "reconfigure", None)
        if method is None:
            if not self.is_function:
                logger.warning("backend %r has user_config but no reconfigure() method", self.backend)
            return
        self._await(method(user_config))

    def close(self) -> None:
        try:
            if not self.loop.is_closed() and not self.loop.is_running():
                self.loop.close()
        except Exception:  # pragma: no cover - best effort at exit
            pass

    # -- helpers ---------------------------------------------------------

    def _await(self, result: Any) -> Any:
        if inspect.isawaitable(result):
            return self.loop.run_until_complete(_as_coro(result))
        return result

    def _method(self, method_name: str | None):
        if method_name is None or method_name == "__call__":
            if self.is_function:
                return self.obj
            if not callable(self.obj):
                raise MethodNotFound("__call__")
            return self.obj.__call__
        # Private names (and anything on a plain function) are never callable
        # from the outside: X-SERVE-CALL-METHOD must not reach __init__ & co.
        if self.is_function or method_name.startswith("_"):
            raise MethodNotFound(method_name)
        method = getattr(self.obj, method_name, None)
        if method is None or not callable(method):
            raise MethodNotFound(method_name)
        return method

    def _not_found(self, name: str):
        body = _dumps({"error": f"backend '{self.backend}' has no method '{name}'"}).encode()
        return 404, [("content-type", "application/json"), (ERROR_TYPE_HEADER, "MethodNotFound")], body

    # -- HTTP ------------------------------------------------------------

    def on_http(self, method_name: str | None, scope: dict, body: bytes):
        try:
            method = self._method(method_name)
        except MethodNotFound as e:
            return self._not_found(str(e))
        try:
            request = Request(scope, _Receive(body))
            # The body is already whole: let body()/json()/form() share it in
            # any order (Starlette reads `_body` before touching receive).
            request._body = body
            result = self._await(method(request))
            return self._to_http(result, scope)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            logger.exception("backend %r: %s %s failed", self.backend, scope.get("method"), scope.get("path"))
            error = {"error": f"{type(e).__name__}: {e}"}
            if DEBUG:
                error["traceback"] = traceback.format_exc()
            return 500, _JSON, _dumps(error).encode()

    def _to_http(self, result: Any, scope: dict):
        if isinstance(result, Response):
            body = getattr(result, "body", None)
            if isinstance(body, (bytes, bytearray, memoryview)):
                headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in result.raw_headers]
                return result.status_code, headers, bytes(body)
            return self._run_asgi_response(result, scope)
        if result is None or isinstance(result, (dict, list, bool, int, float)):
            return 200, _JSON, _dumps(result).encode()
        if isinstance(result, str):
            return 200, _TEXT, result.encode("utf-8")
        if isinstance(result, (bytes, bytearray, memoryview)):
            return 200, _OCTET, bytes(result)
        try:
            encoded = _dumps(result).encode()
        except (TypeError, ValueError) as e:
            logger.error("backend %r returned an unserializable %s: %s", self.backend, type(result).__name__, e)
            message = (
                f"backend '{self.backend}' returned a {type(result).__name__}, which is not JSON serializable; "
                "return a dict, list, str, bytes or a starlette Response"
            )
            return 500, _JSON, _dumps({"error": message}).encode()
        return 200, _JSON, encoded

    def _run_asgi_response(self, response: Response, scope: dict):
        """Streaming/file responses: run them as an ASGI app and collect the body."""
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

        self.loop.run_until_complete(response(scope, receive, send))
        return status, headers, b"".join(chunks)

    # -- ServeHandle -----------------------------------------------------

    def on_call(self, method_name: str | None, args: bytes, http_method: str, headers: list):
        try:
            method = self._method(method_name)
        except MethodNotFound as e:
            return self._not_found(str(e))
        try:
            call_args, call_kwargs = cloudpickle.loads(args)
            # A Starlette request passed to the handle arrives as itself.
            call_args = tuple(a.to_request() if isinstance(a, WebRequestState) else a for a in call_args)
            call_kwargs = {k: v.to_request() if isinstance(v, WebRequestState) else v
                           for k, v in call_kwargs.items()}
            if method_name is None or method_name == "__call__":
                if len(call_args) == 1 and not call_kwargs and isinstance(call_args[0], Request):
                    request = call_args[0]
                else:
                    request = ServeRequest(call_args, call_kwargs, http_method, headers)
                result = self._await(method(request))
            else:
                result = self._await(method(*call_args, **call_kwargs))
            return 200, _PICKLE, cloudpickle.dumps(result)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            logger.exception("backend %r: handle call to %s failed", self.backend, method_name or "__call__")
            error_type = type(e).__name__
            return 500, [("content-type", "text/plain; charset=utf-8"), (ERROR_TYPE_HEADER, error_type)], \
                traceback.format_exc().encode("utf-8", "replace")


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
