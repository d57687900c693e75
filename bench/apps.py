"""The user code both systems serve in bench/run: the same classes, the
same answers. Imported by bench/serval_driver.py and bench/ray_driver.py.
"""

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from starlette.responses import Response, StreamingResponse


class Noop:
    """No-op: "ok" over HTTP (a GET) and through a handle."""

    def __call__(self, request=None):
        return "ok"

    def other(self, x):
        return x


class Echo:
    """POST a JSON body, get the same bytes back as JSON."""

    async def __call__(self, request):
        body = await request.body()
        return Response(body, media_type="application/json")


# The Ray Serve 2.x scenarios (driver_common.deploy_v2 binds and runs them
# with either system's `serve`).

#: Chunks of the streaming no-op.
CHUNKS = 100


async def _chunks():
    for _ in range(CHUNKS):
        yield b"x"


class NoopStream:
    """A no-op generator of CHUNKS one-byte chunks, streamed over HTTP as
    a StreamingResponse (how Ray Serve streams HTTP; Serval also streams a
    generator __call__ itself)."""

    def __call__(self, request=None):
        return StreamingResponse(_chunks(), media_type="text/plain")


class Model:
    """The model of the composition: answers its argument."""

    def __call__(self, x):
        return x


class Ingress:
    """The ingress of the composition: each HTTP request is a call to the
    model through a DeploymentHandle."""

    def __init__(self, model):
        self.model = model

    async def __call__(self, request):
        return await self.model.remote("ok")


#: A FastAPI app with a WebSocket echo route, `@serve.ingress`'d onto
#: WebSocketEcho by each system's serve.
WS_APP = FastAPI()


@WS_APP.websocket("/echo")
async def ws_echo(ws: WebSocket):
    await ws.accept()
    try:
        while True:
            await ws.send_text(await ws.receive_text())
    except WebSocketDisconnect:
        pass


class WebSocketEcho:
    """The deployment serving WS_APP."""
