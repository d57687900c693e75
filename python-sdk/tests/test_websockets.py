"""WebSockets through the Serval proxy (issue 23, part 5), with a real
client (the ``websockets`` package): ``@app.websocket`` routes of a FastAPI
ingress and a plain Starlette ``WebSocketRoute`` app (whose ASGI
``__call__`` also serves plain HTTP), text and binary echo,
close codes both ways, the replica slot a session holds, the message-size
and idle bounds, refusals, and the sessions metric.

One cluster serves the module, with a 64 KiB message limit and a 5 s idle
timeout (``SERVAL_WS_*`` in the proxy's environment)."""

import threading

import pytest
import requests
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from conftest import running_cluster, wait_for
from serval import serve

CPU0 = {"num_cpus": 0}
MAX_MESSAGE = 64 * 1024


@pytest.fixture(scope="module")
def shared():
    env = {"SERVAL_WS_MAX_MESSAGE_BYTES": str(MAX_MESSAGE), "SERVAL_WS_IDLE_TIMEOUT_S": "5"}
    with pytest.MonkeyPatch.context() as mp:
        with running_cluster(mp, env=env) as c:
            c.ws = c.url.replace("http://", "ws://")
            yield c


chat = FastAPI()


@serve.deployment(ray_actor_options=CPU0, max_ongoing_requests=1)
@serve.ingress(chat)
class Chat:
    def __init__(self, greeting):
        self.greeting = greeting
        self.closes = []

    @chat.websocket("/echo")
    async def echo(self, ws: WebSocket):
        await ws.accept()
        await ws.send_text(self.greeting)
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    self.closes.append(message.get("code"))
                    return
                if message.get("text") is not None:
                    await ws.send_text(message["text"].upper())
                else:
                    await ws.send_bytes(message["bytes"][::-1])
        except WebSocketDisconnect as e:
            self.closes.append(e.code)

    @chat.websocket("/kick")
    async def kick(self, ws: WebSocket):
        await ws.accept(subprotocol="kick.v1" if "kick.v1" in ws.scope["subprotocols"] else None)
        await ws.receive_text()
        await ws.close(code=4001, reason="kicked")

    @chat.websocket("/refuse")
    async def refuse(self, ws: WebSocket):
        await ws.close()

    @chat.websocket("/teapot")
    async def teapot(self, ws: WebSocket):
        await ws.send_denial_response(PlainTextResponse("short and stout", status_code=418))

    @chat.get("/closes")
    def seen_closes(self):
        return self.closes


async def raw_echo(websocket):
    await websocket.accept()
    async for text in websocket.iter_text():
        await websocket.send_text(f"raw:{text}")


@serve.deployment(ray_actor_options=CPU0)
class RawApp:
    """A deployment whose __call__ is a Starlette app (no FastAPI)."""

    def __init__(self):
        # Routes below the route prefix (the scope's root_path), as in Ray.
        self.app = Starlette(routes=[
            WebSocketRoute("/ws", raw_echo),
            Route("/hello/{name}", lambda request: PlainTextResponse(f"hi {request.path_params['name']}")),
        ])

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)


@serve.deployment(ray_actor_options=CPU0)
class Plain:
    def __call__(self, request):
        return "plain"


def metric(url, name, **labels):
    text = requests.get(f"{url}/-/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}}"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_echo_close_codes_and_bounds(shared):
    serve.run(Chat.bind("hello"), name="chat", route_prefix="/chat")
    url = f"{shared.ws}/chat"

    # Text and binary echo, both ways, through the proxy; `self` state in the route.
    with connect(f"{url}/echo", open_timeout=60) as ws:
        assert ws.recv(timeout=30) == "hello"
        ws.send("abc")
        assert ws.recv(timeout=30) == "ABC"
        ws.send(b"\x00\x01\x02")
        assert ws.recv(timeout=30) == b"\x02\x01\x00"
        # A message just under the limit passes.
        ws.send("x" * (MAX_MESSAGE - 1))
        assert ws.recv(timeout=30) == "X" * (MAX_MESSAGE - 1)
        # The client's close code reaches the app as websocket.disconnect.
        ws.close(code=4002, reason="done")
    wait_for(lambda: 4002 in requests.get(f"{shared.url}/chat/closes", timeout=30).json(), 60, "the app saw 4002")

    # The app's close code (and the subprotocol it chose) reach the client.
    with connect(f"{url}/kick", subprotocols=["kick.v1"], open_timeout=60) as ws:
        assert ws.subprotocol == "kick.v1"
        ws.send("anything")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
    assert closed.value.rcvd.code == 4001 and closed.value.rcvd.reason == "kicked"

    # An oversize message: 1009 to the client, and the app hears of it.
    with connect(f"{url}/echo", open_timeout=60, max_size=None) as ws:
        assert ws.recv(timeout=30) == "hello"
        ws.send("y" * (MAX_MESSAGE + 1))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
    assert closed.value.rcvd.code == 1009
    wait_for(lambda: 1009 in requests.get(f"{shared.url}/chat/closes", timeout=30).json(), 60, "the app saw 1009")

    # A session with no message either way for the idle timeout: 1001.
    with connect(f"{url}/echo", open_timeout=60) as ws:
        assert ws.recv(timeout=30) == "hello"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=60)
    assert closed.value.rcvd.code == 1001

    # An app that closes before accepting refuses the upgrade with 403.
    with pytest.raises(InvalidStatus) as refused:
        connect(f"{url}/refuse", open_timeout=60)
    assert refused.value.response.status_code == 403
    # ... or answers the HTTP response it chose (ASGI's denial response).
    with pytest.raises(InvalidStatus) as refused:
        connect(f"{url}/teapot", open_timeout=60)
    assert refused.value.response.status_code == 418
    assert refused.value.response.body == b"short and stout"
    # An unknown WebSocket path is the app's own refusal, not a 101.
    with pytest.raises(InvalidStatus):
        connect(f"{url}/nowhere", open_timeout=60)

    assert metric(shared.url, "serval_websocket_sessions_total", backend="chat#Chat") >= 4
    serve.delete("chat")


def test_a_session_holds_its_replica_slot(shared):
    # max_ongoing_requests=1: while a socket is open, a second upgrade is
    # refused at once and a plain request waits for the slot.
    serve.run(Chat.bind("slot"), name="slot", route_prefix="/slot")
    with connect(f"{shared.ws}/slot/echo", open_timeout=60) as ws:
        assert ws.recv(timeout=30) == "slot"
        replica = next(r["id"] for r in serve.status()["replicas"] if r["backend"] == "slot#Chat")
        assert metric(shared.url, "serval_replica_in_flight", backend="slot#Chat", replica=replica) == 1
        with pytest.raises(InvalidStatus) as refused:
            connect(f"{shared.ws}/slot/echo", open_timeout=60)
        assert refused.value.response.status_code == 503
        assert refused.value.response.headers["retry-after"]
        answered = []
        waiting = threading.Thread(
            target=lambda: answered.append(requests.get(f"{shared.url}/slot/closes", timeout=60).status_code))
        waiting.start()
        # Still served: the socket works while the request waits.
        ws.send("still")
        assert ws.recv(timeout=30) == "STILL"
    waiting.join(60)
    assert answered == [200]
    wait_for(lambda: metric(shared.url, "serval_replica_in_flight", backend="slot#Chat", replica=replica) == 0,
             30, "the slot freed")
    serve.delete("slot")


def test_plain_starlette_websocket_route_and_non_websocket_backends(shared):
    serve.run(RawApp.bind(), name="raw", route_prefix="/raw")
    with connect(f"{shared.ws}/raw/ws", open_timeout=60) as ws:
        for i in range(3):
            ws.send(f"m{i}")
            assert ws.recv(timeout=30) == f"raw:m{i}"
    # The same ASGI __call__ serves plain HTTP too.
    assert requests.get(f"{shared.url}/raw/hello/ann", timeout=60).text == "hi ann"
    assert requests.get(f"{shared.url}/raw/nope", timeout=60).status_code == 404
    # A deployment with no ASGI entry refuses an upgrade; HTTP still works.
    serve.run(Plain.bind(), name="plain", route_prefix="/plain")
    with pytest.raises(InvalidStatus) as refused:
        connect(f"{shared.ws}/plain", open_timeout=60)
    assert refused.value.response.status_code == 404
    assert requests.get(f"{shared.url}/plain", timeout=60).text == "plain"
    # An upgrade to no route is the proxy's 404.
    with pytest.raises(InvalidStatus) as refused:
        connect(f"{shared.ws}/no-such-app", open_timeout=60)
    assert refused.value.response.status_code == 404
    serve.delete("raw")
    serve.delete("plain")
