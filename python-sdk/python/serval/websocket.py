"""WebSocket sessions in a replica: the ASGI ``websocket`` protocol driven
over the frames a router relays (``serval._native.WebSocket`` sends the
app's side back).

A session runs the deployment's ASGI entry: an ``@serve.ingress`` app
(FastAPI's ``@app.websocket`` routes, Starlette's ``WebSocketRoute``), or a
``__call__(scope, receive, send)`` that is itself an ASGI app (a Starlette
subclass, a raw ASGI class). Anything else is refused with 404 before the
upgrade. The app gets ``websocket.connect`` first, then the client's
messages and finally ``websocket.disconnect`` with the client's close code
(1006 when the client or its router connection vanished). The app's
``websocket.accept`` turns into the proxy's 101; a ``websocket.close``
before that, or an app that returns without accepting, refuses the upgrade
with 403, and the denial-response extension answers any HTTP response;
after it, the close code reaches the client. An app that returns while open
closes with 1000, one that raises with 1011.

A session holds one of the replica's ``max_ongoing_requests`` while it is
open, as the proxy holds one router slot. A client more than
``MAX_QUEUED_MESSAGES`` messages ahead of the app is closed with 1013.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from typing import Any, Optional

from .ingress import asgi_entry

logger = logging.getLogger("serval.replica")

#: Client messages a session holds for an app that has not received them.
MAX_QUEUED_MESSAGES = 1024

_CONNECTING, _OPEN, _CLOSED = 0, 1, 2


class ClientDisconnected(OSError):
    """The app sent on a WebSocket whose client has gone (as uvicorn's)."""


class Sessions:
    """The open sessions of one replica, by ``(connection, id)``."""

    def __init__(self, host: Any):
        self.host = host
        self.open: dict = {}

    def on_open(self, method_name: Optional[str], scope: dict, ws: Any) -> None:
        host = self.host
        app = asgi_entry(host.obj, host.is_function)
        if app is None:
            body = json.dumps({"error": f"backend '{host.backend}' serves no WebSocket: "
                                        "use @serve.ingress or an ASGI __call__(scope, receive, send)"}).encode()
            ws.deny(404, [("content-type", "application/json")], body)
            return
        session = _Session(ws, scope)
        self.open[ws.key] = session
        host._in_flight += 1
        host._spawn(self._run(session, app))

    def on_event(self, conn: int, request_id: int, kind: str, data: Any) -> None:
        if kind == "gone":
            # The router connection ended: every session on it lost its client.
            for key in [k for k in self.open if k[0] == conn]:
                self.open[key].client_closed(1006, "")
            return
        session = self.open.get((conn, request_id))
        if session is None:
            return
        if kind == "close":
            code, reason = data
            session.client_closed(code, reason)
        elif kind == "text":
            session.deliver({"type": "websocket.receive", "text": data, "bytes": None})
        else:
            session.deliver({"type": "websocket.receive", "text": None, "bytes": data})

    async def _run(self, session: "_Session", app: Any) -> None:
        try:
            await session.run(app)
        finally:
            self.open.pop(session.ws.key, None)
            self.host._done()


class _Session:
    __slots__ = ("ws", "scope", "state", "connected", "incoming", "waiter", "client_gone", "denial")

    def __init__(self, ws: Any, scope: dict):
        self.ws = ws
        self.scope = scope
        self.state = _CONNECTING
        self.connected = False  # websocket.connect handed to the app
        self.incoming: collections.deque = collections.deque()
        self.waiter: Optional[asyncio.Future] = None
        self.client_gone = False
        self.denial: Optional[list] = None

    # -- from the client -------------------------------------------------

    def deliver(self, message: dict) -> None:
        if self.client_gone:
            return
        if len(self.incoming) >= MAX_QUEUED_MESSAGES:
            logger.warning("websocket client %s is %d messages ahead of the app; closing",
                           self.scope.get("client"), MAX_QUEUED_MESSAGES)
            self.ws.close(1013, "too many unread messages")
            self.state = _CLOSED
            self.client_closed(1013, "too many unread messages")
            return
        self.incoming.append(message)
        self._wake()

    def client_closed(self, code: int, reason: str) -> None:
        if self.client_gone:
            return
        self.client_gone = True
        self.incoming.append({"type": "websocket.disconnect", "code": code, "reason": reason})
        self._wake()

    def _wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the ASGI app's side ---------------------------------------------

    async def receive(self) -> dict:
        if not self.connected:
            self.connected = True
            return {"type": "websocket.connect"}
        while not self.incoming:
            if self.state == _CLOSED and not self.client_gone:
                # The app closed: nothing more comes from the client.
                return {"type": "websocket.disconnect", "code": 1000, "reason": ""}
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return self.incoming.popleft()

    async def send(self, message: dict) -> None:
        kind = message["type"]
        if kind == "websocket.accept":
            if self.state != _CONNECTING:
                raise RuntimeError("websocket.accept after the session was accepted or closed")
            headers = [(_text(k), _text(v)) for k, v in message.get("headers") or []]
            self.ws.accept(message.get("subprotocol"), headers)
            self.state = _OPEN
        elif kind == "websocket.send":
            if self.state == _CONNECTING:
                raise RuntimeError("websocket.send before websocket.accept")
            if self.client_gone or self.state == _CLOSED:
                raise ClientDisconnected("the WebSocket is closed")
            text = message.get("text")
            if text is not None:
                self.ws.text(text)
            else:
                self.ws.binary(bytes(message.get("bytes") or b""))
        elif kind == "websocket.close":
            if self.state == _CONNECTING:
                self.ws.deny(403, [("content-type", "text/plain; charset=utf-8")], b"WebSocket refused")
            elif self.state == _OPEN and not self.client_gone:
                self.ws.close(int(message.get("code") or 1000), message.get("reason") or "")
            self.state = _CLOSED
        elif kind == "websocket.http.response.start":
            if self.state != _CONNECTING:
                raise RuntimeError("a denial response after websocket.accept")
            headers = [(_text(k), _text(v)) for k, v in message.get("headers") or []]
            self.denial = [int(message["status"]), headers, []]
        elif kind == "websocket.http.response.body":
            if self.denial is None:
                raise RuntimeError("websocket.http.response.body before its start")
            self.denial[2].append(bytes(message.get("body") or b""))
            if not message.get("more_body"):
                status, headers, chunks = self.denial
                self.ws.deny(status, headers, b"".join(chunks))
                self.state = _CLOSED
        else:
            raise RuntimeError(f"unknown ASGI websocket message type {kind!r}")

    async def run(self, app: Any) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        except asyncio.CancelledError:
            self._end(1001, "the replica is stopping", 503)
            raise
        except Exception as e:
            logger.error("websocket %s failed", self.scope.get("path"), exc_info=e)
            self._end(1011, "", 500)
            return
        self._end(1000, "", 403)

    def _end(self, code: int, reason: str, status: int) -> None:
        if self.state == _CONNECTING:
            self.ws.deny(status, [("content-type", "text/plain; charset=utf-8")], b"WebSocket refused")
        elif self.state == _OPEN and not self.client_gone:
            self.ws.close(code, reason)
        self.state = _CLOSED


def _text(value: Any) -> str:
    return value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else str(value)
