"""Seed 003, "Enabling CORS and other HTTP middlewares": Starlette
middlewares given to ``serve.start(http_options={"middlewares": [...]})``
run natively in the Rust proxy; one Serval cannot run is refused at
``serve.start``, naming it, before anything starts."""

import gzip
import os
import tempfile

import pytest
import requests
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.middleware.httpsredirect import HTTPSRedirectMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware

from conftest import free_port, running_cluster
from test_locations import kill_group, start_node, wait_until
from serval import _core, serve

BIG = "x" * 5000


def middleware_cluster(monkeypatch, middlewares, **http_options):
    """Like conftest's ``cluster`` fixture, with ``middlewares`` in http_options."""
    return running_cluster(monkeypatch, http_options={"middlewares": middlewares, **http_options})


def hello(request):
    return "hello"


def big(request):
    return BIG


def test_seed_cors_example_and_gzip(monkeypatch):
    middlewares = [
        # The seed's example, as written there.
        Middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"]),
        Middleware(GZipMiddleware, minimum_size=1000),
    ]
    with middleware_cluster(monkeypatch, middlewares) as c:
        serve.create_backend("hello", hello)
        serve.create_endpoint("hello", backend="hello", route="/hello")
        serve.create_backend("big", big)
        serve.create_endpoint("big", backend="big", route="/big")

        # A simple cross-origin request.
        r = requests.get(f"{c.url}/hello", headers={"Origin": "https://web.example"}, timeout=10)
        assert r.status_code == 200 and r.text == "hello"
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        # Without Origin: no CORS headers.
        r = requests.get(f"{c.url}/hello", timeout=10)
        assert r.status_code == 200 and "Access-Control-Allow-Origin" not in r.headers

        # A preflight, on a GET-only route, for any method ("*").
        r = requests.options(f"{c.url}/hello", timeout=10, headers={
            "Origin": "https://web.example",
            "Access-Control-Request-Method": "PUT",
        })
        assert (r.status_code, r.text) == (200, "OK")
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        assert "PUT" in [m.strip() for m in r.headers["Access-Control-Allow-Methods"].split(",")]
        assert r.headers["Access-Control-Max-Age"] == "600"
        # A header outside the safelist is refused with Starlette's 400.
        r = requests.options(f"{c.url}/hello", timeout=10, headers={
            "Origin": "https://web.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "X-Custom",
        })
        assert (r.status_code, r.text) == (400, "Disallowed CORS headers")

        # GZip above minimum_size when the client accepts it.
        r = requests.get(f"{c.url}/big", headers={"Accept-Encoding": "gzip"}, timeout=10, stream=True)
        raw = r.raw.read(decode_content=False)
        assert r.headers["Content-Encoding"] == "gzip"
        assert int(r.headers["Content-Length"]) == len(raw) < len(BIG)
        assert gzip.decompress(raw).decode() == BIG
        # Not accepted, or below minimum_size: sent as is.
        r = requests.get(f"{c.url}/big", headers={"Accept-Encoding": "identity"}, timeout=10)
        assert "Content-Encoding" not in r.headers and r.text == BIG
        r = requests.get(f"{c.url}/hello", headers={"Accept-Encoding": "gzip"}, timeout=10)
        assert "Content-Encoding" not in r.headers and r.text == "hello"

        # The proxy's own paths stay outside the middlewares.
        assert requests.get(f"{c.url}/-/healthz", timeout=10).status_code == 200


def tokens(request):
    for i in range(3):
        yield f"token{i} "


def test_a_streamed_reply_passes_the_middlewares_by_its_head(monkeypatch):
    middlewares = [
        Middleware(CORSMiddleware, allow_origins=["*"]),
        Middleware(GZipMiddleware, minimum_size=0),
    ]
    with middleware_cluster(monkeypatch, middlewares) as c:
        serve.create_backend("tokens", tokens)
        serve.create_endpoint("tokens", backend="tokens", route="/tokens")
        r = requests.get(f"{c.url}/tokens", headers={"Origin": "https://web.example", "Accept-Encoding": "gzip"},
                         timeout=10, stream=True)
        # CORS headers on the head; the body streams as it is, not gzipped.
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        assert "Content-Encoding" not in r.headers and r.headers["Transfer-Encoding"] == "chunked"
        assert r.raw.read(decode_content=False) == b"token0 token1 token2 "


def test_every_node_proxy_runs_the_middlewares(monkeypatch):
    middlewares = [
        Middleware(CORSMiddleware, allow_origins=["https://web.example"]),
        Middleware(TrustedHostMiddleware, allowed_hosts=["good.example", "*.good.example"]),
    ]
    with middleware_cluster(monkeypatch, middlewares, location="EveryNode") as head:
        port = free_port()
        node = start_node(head, port)
        try:
            wait_until("the node to join",
                       lambda: len([n for n in serve.status()["nodes"] if n["alive"]]) == 2)
            # Returns once every proxy, the node's included, lists the route.
            serve.create_backend("hello", hello)
            serve.create_endpoint("hello", backend="hello", route="/hello")
            for p in (head.http_port, port):
                url = f"http://127.0.0.1:{p}/hello"
                r = requests.get(url, headers={"Host": "api.good.example", "Origin": "https://web.example"},
                                 timeout=10)
                assert (r.status_code, r.text) == (200, "hello"), p
                assert r.headers["Access-Control-Allow-Origin"] == "https://web.example", p
                r = requests.get(url, headers={"Host": "evil.example"}, timeout=10)
                assert (r.status_code, r.text) == (400, "Invalid host header"), p
        finally:
            kill_group(node)


class MyMiddleware:
    def __init__(self, app, **kwargs):
        self.app = app

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)


@pytest.mark.parametrize("middleware, names", [
    (Middleware(HTTPSRedirectMiddleware), ["HTTPSRedirectMiddleware"]),
    (Middleware(MyMiddleware, flag=True), ["MyMiddleware"]),
    (Middleware(CORSMiddleware, allow_origin=["*"]), ["CORSMiddleware", "allow_origin"]),
    (Middleware(GZipMiddleware, compresslevel=42), ["GZipMiddleware", "compresslevel"]),
])
def test_unsupported_middleware_raises_and_starts_nothing(monkeypatch, middleware, names):
    data_dir = tempfile.mkdtemp(prefix="sv-", dir="/tmp")
    monkeypatch.setenv("SERVAL_DATA_DIR", data_dir)
    monkeypatch.delenv("SERVAL_ADDRESS", raising=False)
    monkeypatch.setattr(_core, "_client", None)
    with pytest.raises(ValueError) as e:
        serve.start(detached=True, data_dir=data_dir,
                    http_options={"middlewares": [middleware], "port": free_port()})
    for name in names:
        assert name in str(e.value)
    assert _core.current() is None
    assert not os.path.exists(os.path.join(data_dir, "cluster.json"))
    assert os.listdir(data_dir) == []
