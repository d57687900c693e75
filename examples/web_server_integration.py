"""Integrating Serval with an existing web server.

An existing Starlette app (run by uvicorn) keeps its own routes and calls a
Serval endpoint for the heavy work through an asyncio ServeHandle
(``serve.get_handle(..., sync=False)``): no extra HTTP hop through Serval's
proxy, the same traffic policy and load balancing.

Run it next to a running cluster (``serve start --head``, or ``make demo``
style ``serve.start()``), with an endpoint to call::

    .venv/bin/python examples/web_server_integration.py --deploy-demo --port 8080
    curl 'http://127.0.0.1:8080/summarize?text=scale+your+app'

``SERVAL_ENDPOINT`` names the endpoint to call (default ``summarize``); the
cluster is found as ``serve.connect()`` finds it (``SERVAL_ADDRESS`` or the
data dir in ``SERVAL_DATA_DIR``, default ``.serval``).
"""

import argparse
import contextlib
import os

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from serval import serve

ENDPOINT = os.environ.get("SERVAL_ENDPOINT", "summarize")


@contextlib.asynccontextmanager
async def lifespan(app):
    serve.connect()
    # An asyncio handle: `await handle.remote(...)` in the app's event loop.
    app.state.handle = serve.get_handle(ENDPOINT, sync=False)
    yield


async def summarize(request: Request):
    # A Python value through the handle: the backend gets a ServeRequest
    # whose `.data` is this string.
    text = request.query_params.get("text", "")
    return JSONResponse(await request.app.state.handle.remote(text))


async def forward(request: Request):
    # The web request itself: the backend gets it as a Starlette Request.
    return JSONResponse(await request.app.state.handle.remote(request))


async def healthz(request: Request):
    return PlainTextResponse("ok")


app = Starlette(
    routes=[
        Route("/summarize", summarize),
        Route("/forward", forward, methods=["GET", "POST"]),
        Route("/healthz", healthz),
    ],
    lifespan=lifespan,
)


def demo_summarize(request):
    """The demo backend: counts words of a Python string or of ?text=."""
    from serval import ServeRequest

    text = request.data if isinstance(request, ServeRequest) else request.query_params.get("text", "")
    words = text.split()
    return {"words": len(words), "first": words[0] if words else None}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--deploy-demo", action="store_true",
                   help=f"start/connect a cluster and deploy a demo backend as endpoint '{ENDPOINT}'")
    args = p.parse_args()
    if args.deploy_demo:
        serve.start(detached=True)
        if ENDPOINT not in serve.list_endpoints():
            serve.create_backend(ENDPOINT, demo_summarize)
            serve.create_endpoint(ENDPOINT, backend=ENDPOINT, route=None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
