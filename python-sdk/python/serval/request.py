"""`ServeRequest`: what a backend's ``__call__`` receives from a ServeHandle.

It mirrors the parts of ``starlette.requests.Request`` that Ray Serve 1.x
documents for handle calls:

==============================================  ============================
ServeHandle call                                read it with
==============================================  ============================
``handle.options(http_headers={...})``          ``request.headers``
``handle.options(http_method="POST")``          ``request.method``
``handle.remote({...})``                        ``await request.json()``
``handle.remote({...})``                        ``await request.form()``
``handle.remote(a="b")``                        ``request.query_params``
``handle.remote("long string")``                ``await request.body()``
``handle.remote(python_object)``                ``request.data``
==============================================  ============================

To tell the two apart, check ``isinstance(request, starlette.requests.Request)``
(an HTTP call) or ``isinstance(request, ServeRequest)`` (a handle call).
"""

from __future__ import annotations

import json as _json
from typing import Any, Iterable, Mapping

from starlette.datastructures import FormData, Headers

__all__ = ["ServeRequest", "WebRequestState"]


class ServeRequest:
    """A handle call seen through a Starlette-like request interface.

    ``args`` and ``kwargs`` are the call's arguments as passed to
    ``handle.remote(*args, **kwargs)``; ``.data`` is the single positional
    argument (None if there is none).
    """

    __slots__ = ("args", "kwargs", "_method", "_raw_headers", "_headers")

    def __init__(
        self,
        args: tuple = (),
        kwargs: Mapping[str, Any] | None = None,
        http_method: str | None = None,
        http_headers: Iterable[tuple[str, str]] | Mapping[str, str] | None = None,
    ) -> None:
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self._method = (http_method or "GET").upper()
        if isinstance(http_headers, Mapping):
            http_headers = list(http_headers.items())
        self._raw_headers = list(http_headers or ())
        self._headers: Headers | None = None

    @property
    def method(self) -> str:
        """``handle.options(http_method=...)``; "GET" by default."""
        return self._method

    @property
    def headers(self) -> Headers:
        """``handle.options(http_headers=...)`` as case-insensitive Headers."""
        if self._headers is None:
            self._headers = Headers(
                raw=[(str(k).lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in self._raw_headers]
            )
        return self._headers

    @property
    def query_params(self) -> dict:
        """The keyword arguments as passed (``handle.remote(a="b")``): the
        objects themselves, not strings, as Ray Serve 1.x passed them (a
        numpy array stays an array)."""
        return self.kwargs

    @property
    def path_params(self) -> dict:
        """Always empty: a handle call has no route."""
        return {}

    @property
    def data(self) -> Any:
        """The single positional argument, or None."""
        return self.args[0] if self.args else None

    async def json(self) -> Any:
        """A dict/list argument as-is; a str/bytes argument parsed as JSON."""
        data = self.data
        if isinstance(data, (str, bytes, bytearray)):
            return _json.loads(data)
        return data

    async def form(self) -> FormData:
        """A dict argument (or the keyword arguments) as Starlette FormData."""
        data = self.data
        if data is None:
            data = self.kwargs
        if isinstance(data, Mapping):
            return FormData(list(data.items()))
        raise TypeError(f"form() needs a dict argument, got {type(data).__name__}")

    async def body(self) -> bytes:
        """str as UTF-8, bytes as-is, anything else as JSON bytes."""
        data = self.data
        if isinstance(data, str):
            return data.encode("utf-8")
        if isinstance(data, (bytes, bytearray, memoryview)):
            return bytes(data)
        if data is None:
            return b""
        return _json.dumps(data).encode("utf-8")

    def __repr__(self) -> str:
        return f"ServeRequest(method={self._method!r}, args={self.args!r}, kwargs={self.kwargs!r})"


#: The parts of an ASGI scope a request keeps on its way through a handle;
#: the rest (app, router, state, extensions) belongs to the sending server.
_SCOPE_KEYS = (
    "type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "root_path",
    "query_string", "headers", "client", "server", "path_params",
)


class WebRequestState:
    """A ``starlette.requests.Request`` in transit through a ServeHandle: its
    scope's plain parts and its whole body. The replica turns it back into a
    Starlette Request, so ``handle.remote(starlette_request)`` is not wrapped
    in a ServeRequest (a Starlette Request itself does not pickle: its
    receive channel belongs to the server that got it)."""

    __slots__ = ("scope", "body")

    def __init__(self, scope: dict, body: bytes) -> None:
        self.scope = scope
        self.body = body

    def __reduce__(self):
        return (WebRequestState, (self.scope, self.body))

    @classmethod
    def from_request(cls, request: Any, body: bytes) -> "WebRequestState":
        src = request.scope
        scope = {k: src[k] for k in _SCOPE_KEYS if k in src}
        scope["headers"] = [(bytes(k), bytes(v)) for k, v in src.get("headers", ())]
        for key in ("client", "server"):
            if scope.get(key) is not None:
                scope[key] = tuple(scope[key])
        for key in ("asgi", "path_params"):
            if key in scope:
                scope[key] = dict(scope[key])
        return cls(scope, bytes(body))

    def to_request(self):
        from starlette.requests import Request

        body = self.body
        sent = False

        async def receive():
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        request = Request(dict(self.scope), receive)
        # The body is whole: body()/json()/form() share it in any order.
        request._body = body
        return request
