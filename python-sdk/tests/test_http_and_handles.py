"""Seed 003, "Calling Endpoints via HTTP and ServeHandle", through the public
Python API: variable routes, responses, ServeHandle (sync and async, every
row of the request table, model composition), custom methods, integrating
with an existing web server, the proxy's own paths and bad input."""

import asyncio
import contextlib
import glob
import hashlib
import hmac
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
import requests
import starlette.requests
from starlette.background import BackgroundTask, BackgroundTasks
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

import serval
from serval import ServeRequest, serve

from conftest import free_port, running_cluster, wait_for

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples")


def own_cluster(monkeypatch, http_options=None, env=None):
    """Like conftest's ``cluster`` fixture, with extra http_options/env."""
    return running_cluster(monkeypatch, http_options=http_options, env=env)


def replica_logs(data_dir, backend):
    text = ""
    for path in glob.glob(os.path.join(data_dir, "replicas", f"{backend}_*", "replica.log")):
        with open(path, errors="replace") as f:
            text += f.read()
    return text


# -- 1. Variable routes -----------------------------------------------------


def typed_params(request):
    """Every path parameter with the name of its Python type."""
    return {k: [type(v).__name__, v if isinstance(v, (int, float, str)) else str(v)]
            for k, v in request.path_params.items()}


def seed_f(request):
    # The seed: /api/123/3.14 -> {"user_id": 123, "number": 3.14}, int and float.
    p = request.path_params
    return {
        "equal": p == {"user_id": 123, "number": 3.14},
        "types": [type(p["user_id"]).__name__, type(p["number"]).__name__],
        "params": p,
    }


def test_variable_routes_with_starlette_converters(cluster):
    serve.create_backend("f", seed_f)
    serve.create_endpoint("complex", backend="f", route="/api/{user_id:int}/{number:float}")
    serve.create_backend("typed", typed_params)
    routes = {
        "plain": "/users/{username}",
        "str": "/s/{name:str}",
        "path": "/files/{rest:path}",
        "uuid": "/items/{id:uuid}",
        "multi": "/m/{a}/{b:int}/x/{c:float}/{d:path}",
    }
    for name, route in routes.items():
        serve.create_endpoint(name, backend="typed", route=route)

    r = requests.get(f"{cluster.url}/api/123/3.14", timeout=30)
    assert r.status_code == 200, r.text
    assert r.json() == {"equal": True, "types": ["int", "float"], "params": {"user_id": 123, "number": 3.14}}

    def get(path):
        r = requests.get(f"{cluster.url}{path}", timeout=30)
        assert r.status_code == 200, (path, r.status_code, r.text)
        return r.json()

    assert get("/users/alice") == {"username": ["str", "alice"]}
    assert get("/s/bob") == {"name": ["str", "bob"]}
    assert get("/files/a/b/c.txt") == {"rest": ["str", "a/b/c.txt"]}
    u = uuid.uuid4()
    assert get(f"/items/{str(u).upper()}") == {"id": ["UUID", str(u)]}
    assert get("/m/one/2/x/3.5/deep/er") == {
        "a": ["str", "one"], "b": ["int", 2], "c": ["float", 3.5], "d": ["str", "deep/er"]}
    # A value that fits no converter is a 404.
    for path in ("/api/abc/3.14", "/api/123/pi", "/items/not-a-uuid", "/m/one/two/x/3.5/d"):
        r = requests.get(f"{cluster.url}{path}", timeout=30)
        assert r.status_code == 404, (path, r.status_code, r.text)
        assert "error" in r.json()


def who(name):
    def backend(request):
        return {"endpoint": name, "params": request.path_params}
    return backend


def test_routes_of_one_shape_are_tried_in_registration_order(cluster):
    serve.create_backend("by_id", who("by_id"))
    serve.create_backend("by_name", who("by_name"))
    serve.create_endpoint("by_id", backend="by_id", route="/api/{id:int}")
    serve.create_endpoint("by_name", backend="by_name", route="/api/{name}")
    # The other order: the str route first takes every value.
    serve.create_endpoint("first_name", backend="by_name", route="/rev/{name}")
    serve.create_endpoint("then_id", backend="by_id", route="/rev/{id:int}")

    assert requests.get(f"{cluster.url}/api/42", timeout=30).json() == {"endpoint": "by_id", "params": {"id": 42}}
    assert requests.get(f"{cluster.url}/api/bob", timeout=30).json() == {
        "endpoint": "by_name", "params": {"name": "bob"}}
    assert requests.get(f"{cluster.url}/rev/42", timeout=30).json() == {
        "endpoint": "by_name", "params": {"name": "42"}}


def test_methods_restrict_and_405_names_allowed(cluster):
    serve.create_backend("m", lambda request: request.method)
    serve.create_endpoint("post_only", backend="m", route="/post", methods=["POST"])
    serve.create_endpoint("default", backend="m", route="/default")
    serve.create_endpoint("both", backend="m", route="/both", methods=["GET", "PUT"])

    assert requests.post(f"{cluster.url}/post", timeout=30).text == "POST"
    r = requests.get(f"{cluster.url}/post", timeout=30)
    assert r.status_code == 405
    assert r.headers["allow"] == "POST"
    assert requests.get(f"{cluster.url}/default", timeout=30).text == "GET"
    r = requests.post(f"{cluster.url}/default", timeout=30)
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    assert requests.put(f"{cluster.url}/both", timeout=30).text == "PUT"
    r = requests.delete(f"{cluster.url}/both", timeout=30)
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "PUT"}


def test_colliding_route_raises_with_both_endpoint_names(cluster):
    serve.create_backend("c", lambda request: "c")
    serve.create_endpoint("first_ep", backend="c", route="/c/{id}")
    with pytest.raises(serval.ServeError) as info:
        serve.create_endpoint("second_ep", backend="c", route="/c/{name:str}")
    assert "first_ep" in str(info.value) and "second_ep" in str(info.value)
    assert "second_ep" not in serve.list_endpoints()
    assert requests.get(f"{cluster.url}/c/x", timeout=30).text == "c"


def test_route_none_is_handle_only(cluster):
    serve.create_backend("h", lambda request: {"data": request.data})
    serve.create_endpoint("handle_only", backend="h", route=None)
    serve.create_endpoint("with_route", backend="h", route="/with")
    routes = requests.get(f"{cluster.url}/-/routes", timeout=30).json()
    assert routes == {"/with": "with_route"}
    assert serve.list_endpoints()["handle_only"]["route"] is None
    assert serve.get_handle("handle_only").remote(7).result() == {"data": 7}


def test_create_endpoint_returns_once_the_proxy_serves_the_route(cluster):
    serve.create_backend("fresh", lambda request: request.url.path)
    for i in range(6):
        serve.create_endpoint(f"fresh{i}", backend="fresh", route=f"/fresh/{i}/{{x}}")
        r = requests.get(f"{cluster.url}/fresh/{i}/y", timeout=30)
        assert r.status_code == 200, (i, r.status_code, r.text)
        assert r.text == f"/fresh/{i}/y"


def paths_seen(request):
    return {"url_path": request.url.path, "path": request.scope["path"],
            "raw_path": request.scope["raw_path"].decode("latin-1"), "params": request.path_params}


def test_the_app_reads_the_decoded_path_it_was_routed_on_and_the_raw_one(cluster):
    serve.create_backend("paths", paths_seen)
    serve.create_endpoint("admin", backend="paths", route="/admin")
    serve.create_endpoint("files", backend="paths", route="/files/{rest:path}")
    serve.create_endpoint("one", backend="paths", route="/one/{name}")

    def get(path):
        line, status, _, body = raw_http(
            cluster.http_port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        return status, json.loads(body)

    # As under uvicorn + Starlette: `path` decoded (what routing matched),
    # `raw_path` the bytes the client sent.
    assert get("/%61dmin") == (200, {"url_path": "/admin", "path": "/admin", "raw_path": "/%61dmin", "params": {}})
    status, seen = get("/files/a%2Fb%20c")
    assert status == 200, seen
    assert (seen["path"], seen["raw_path"], seen["params"]) == (
        "/files/a/b c", "/files/a%2Fb%20c", {"rest": "a/b c"})
    # %2F is a '/': it never lands inside a {name} segment.
    assert get("/one/a%2Fb")[0] == 404
    # A path no app could read is refused before any backend sees it.
    for path in ("/admin%00", "/%FFadmin"):
        status, body = get(path)
        assert status == 400 and "error" in body, (path, status, body)


# -- 2. Responses -----------------------------------------------------------


def responder(request):
    kind = request.data if isinstance(request, ServeRequest) else request.path_params["kind"]
    if kind == "seed":
        return Response('Hello, world!', status_code=123, media_type='text/plain')
    if kind == "teapot":
        return Response("short and stout", status_code=418, media_type="text/plain")
    if kind == "json":
        return JSONResponse({"a": [1, 2]}, status_code=201)
    if kind == "plain":
        return PlainTextResponse("plain", headers={"X-Custom": "yes", "Cache-Control": "no-store"})
    if kind == "dict":
        return {"k": "v"}
    if kind == "list":
        return [1, "two"]
    if kind == "str":
        return "some text"
    if kind == "bytes":
        return b"\x00\x01raw"
    raise ValueError(kind)


def raw_http(port, request_bytes, timeout=30):
    """Sends raw bytes, returns (status, {header: value}, body) of the response
    (read until the server closes or Content-Length is satisfied)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request_bytes)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, f"connection closed before the response head: {data!r}"
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        return lines[0], status, headers, body


def test_responses(cluster):
    serve.create_backend("responder", responder)
    serve.create_endpoint("responder", backend="responder", route="/r/{kind}")

    # The seed's example uses status 123. A 1xx status is interim in HTTP
    # (RFC 9110 15.2): it cannot end a response, clients read no body after
    # it and hyper refuses to send it (uvicorn+h11, Ray's server, answers a
    # bare 500). The proxy answers a 502 that says why, never a hang.
    line, status, headers, body = raw_http(
        cluster.http_port, b"GET /r/seed HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 502, line
    assert headers["content-type"] == "application/json"
    assert "status 123" in json.loads(body)["error"]
    # Through a handle the seed's Response arrives as it was returned.
    seed = serve.get_handle("responder").remote("seed").result()
    assert (seed.status_code, seed.body, seed.media_type) == (123, b"Hello, world!", "text/plain")

    r = requests.get(f"{cluster.url}/r/teapot", timeout=30)
    assert (r.status_code, r.text, r.headers["content-type"]) == (418, "short and stout", "text/plain; charset=utf-8")
    r = requests.get(f"{cluster.url}/r/json", timeout=30)
    assert (r.status_code, r.json(), r.headers["content-type"]) == (201, {"a": [1, 2]}, "application/json")
    r = requests.get(f"{cluster.url}/r/plain", timeout=30)
    assert r.text == "plain" and r.headers["x-custom"] == "yes" and r.headers["cache-control"] == "no-store"
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    r = requests.get(f"{cluster.url}/r/dict", timeout=30)
    assert (r.json(), r.headers["content-type"]) == ({"k": "v"}, "application/json")
    r = requests.get(f"{cluster.url}/r/list", timeout=30)
    assert (r.json(), r.headers["content-type"]) == ([1, "two"], "application/json")
    r = requests.get(f"{cluster.url}/r/str", timeout=30)
    assert r.text == "some text" and r.headers["content-type"].startswith("text/plain")
    r = requests.get(f"{cluster.url}/r/bytes", timeout=30)
    assert (r.content, r.headers["content-type"]) == (b"\x00\x01raw", "application/octet-stream")


def wait_for_file(path, timeout=60.0):
    """Replica side: polls for ``path`` (a gate the test opens)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.path.exists(path)


def write_file(path, text):
    with open(path, "w") as f:
        f.write(text)


async def wait_then_write(gate, marker):
    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    write_file(marker, "after gate" if os.path.exists(gate) else "timed out")


def wait_sync_then_write(gate, marker):
    write_file(marker, "after gate" if wait_for_file(gate) else "timed out")


def fail_in_background():
    raise RuntimeError("background exploded")


def with_background(request):
    """Responses whose background waits for a gate the test opens only once it
    holds the response, then writes a marker."""
    q = request.query_params
    kind = request.path_params["kind"]
    if kind == "stream":
        return StreamingResponse(iter([b"a", b"b"]), media_type="text/plain",
                                 background=BackgroundTask(wait_then_write, q["gate"], q["marker"]))
    if kind == "tasks":
        tasks = BackgroundTasks()
        tasks.add_task(wait_sync_then_write, q["gate"], q["marker"] + ".1")
        tasks.add_task(write_file, q["marker"] + ".2", "second")
        return PlainTextResponse("plain", background=tasks)
    return PlainTextResponse("still ok", background=BackgroundTask(fail_in_background))


def test_response_background_runs_after_the_reply_was_sent(cluster, tmp_path):
    serve.create_backend("bg", with_background)
    serve.create_endpoint("bg", backend="bg", route="/bg/{kind}")

    # A streaming response with an async task; a plain one with sync tasks in order.
    for kind, body, markers in [("stream", "ab", ["m-stream"]), ("tasks", "plain", ["m-tasks.1", "m-tasks.2"])]:
        gate, marker = tmp_path / f"gate-{kind}", tmp_path / f"m-{kind}"
        r = requests.get(f"{cluster.url}/bg/{kind}", params={"gate": str(gate), "marker": str(marker)}, timeout=30)
        assert (r.status_code, r.text) == (200, body)
        assert not any((tmp_path / m).exists() for m in markers)
        gate.touch()
        wait_for(lambda: (tmp_path / markers[-1]).exists(), timeout=60, what=f"the {kind} background")
        assert (tmp_path / markers[0]).read_text() == "after gate"

    # A failing background task is logged; the client got its answer.
    for _ in range(2):
        r = requests.get(f"{cluster.url}/bg/fail", timeout=30)
        assert (r.status_code, r.text) == (200, "still ok")
    log = wait_for(lambda: (lambda t: t.count("RuntimeError: background exploded") == 2 and t)(
        replica_logs(cluster.data_dir, "bg")), what="the background errors in the replica log")
    assert "background task of a response failed" in log


# -- 3. ServeHandle ----------------------------------------------------------


class Point:
    """A plain Python object of the caller's own module (not importable by
    the replica): it travels by value."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def norm2(self):
        return self.x * self.x + self.y * self.y


async def table_backend(request):
    """Answers the seed's request table for whichever row ``what`` asks."""
    kind = ("web" if isinstance(request, starlette.requests.Request)
            else "python" if isinstance(request, ServeRequest) else "other")
    what = request.headers.get("x-what", "")
    out = {"kind": kind}
    if what == "headers":
        out["value"] = request.headers.get("x-token")
    elif what == "method":
        out["value"] = request.method
    elif what == "json":
        out["value"] = await request.json()
    elif what == "form":
        form = await request.form()
        out["value"] = dict(form)
    elif what == "query":
        out["value"] = dict(request.query_params)
    elif what == "body":
        out["value"] = (await request.body()).decode()
    elif what == "data":
        data = request.data
        out["value"] = [type(data).__name__, data.norm2()]
        out["object"] = data
    return out


def test_sync_handle_rows_of_the_seed_table(cluster):
    serve.create_backend("table", table_backend)
    serve.create_endpoint("table", backend="table", route="/table", methods=["GET", "POST"])
    handle = serve.get_handle("table", sync=True)

    def row(what, *args, method=None, headers=None, **kwargs):
        h = handle.options(http_headers={"X-What": what, **(headers or {})}, http_method=method)
        return h.remote(*args, **kwargs)

    # .result() and serval.get both wait on the future.
    assert row("headers", headers={"X-Token": "abc"}).result() == {"kind": "python", "value": "abc"}
    assert serval.get(row("method", method="POST")) == {"kind": "python", "value": "POST"}
    assert serval.get(row("method")) == {"kind": "python", "value": "GET"}
    assert serval.get(row("json", {"a": 1, "b": [2]})) == {"kind": "python", "value": {"a": 1, "b": [2]}}
    assert serval.get(row("form", {"f": "v", "g": "w"})) == {"kind": "python", "value": {"f": "v", "g": "w"}}
    assert serval.get(row("query", a="b")) == {"kind": "python", "value": {"a": "b"}}
    assert serval.get(row("body", "long string")) == {"kind": "python", "value": "long string"}
    out = serval.get(row("data", Point(3, 4)))
    assert out["kind"] == "python" and out["value"] == ["Point", 25]
    assert isinstance(out["object"], Point) and (out["object"].x, out["object"].y) == (3, 4)
    # Several futures at once.
    futures = [row("query", i=str(i)) for i in range(5)]
    assert serval.get(futures) == [{"kind": "python", "value": {"i": str(i)}} for i in range(5)]

    # The same rows over HTTP arrive as a Starlette request.
    def http(what, method="GET", **kw):
        r = requests.request(method, f"{cluster.url}/table", headers={"X-What": what, **kw.pop("headers", {})},
                             timeout=30, **kw)
        assert r.status_code == 200, r.text
        return r.json()

    assert http("headers", headers={"X-Token": "abc"}) == {"kind": "web", "value": "abc"}
    assert http("method", method="POST") == {"kind": "web", "value": "POST"}
    assert http("json", json={"a": 1}) == {"kind": "web", "value": {"a": 1}}
    assert http("form", method="POST", data={"f": "v"}) == {"kind": "web", "value": {"f": "v"}}
    assert http("query", params={"a": "b"}) == {"kind": "web", "value": {"a": "b"}}
    assert http("body", data="long string") == {"kind": "web", "value": "long string"}


def answer_once_gate_opens(request):
    """Answers whether the gate file named by the call's argument opened."""
    return wait_for_file(request.data)


def test_result_timeout_leaves_the_call_running_for_a_later_result(cluster, tmp_path):
    serve.create_backend("gate", answer_once_gate_opens)
    serve.create_endpoint("gate", backend="gate")
    handle = serve.get_handle("gate", sync=True)
    gate = str(tmp_path / "open")
    future = handle.remote(gate)
    # The replica waits for the file, so the call cannot finish before it exists.
    with pytest.raises(TimeoutError):
        future.result(timeout=0.05)
    with pytest.raises(TimeoutError):
        future.result(timeout=0)
    open(gate, "w").close()
    # The same future still yields the answer; an infinite timeout waits.
    assert future.result(timeout=float("inf")) is True
    assert future.result() is True


def test_async_handle_in_asyncio(cluster):
    serve.create_backend("table", table_backend)
    serve.create_endpoint("table", backend="table", route=None)

    async def main():
        handle = serve.get_handle("table", sync=False)
        assert isinstance(handle, serval.AsyncServeHandle)
        h = handle.options(http_headers={"X-What": "query"})
        one = await h.remote(a="b")
        many = await asyncio.gather(*[h.remote(i=str(i)) for i in range(5)])
        body = await handle.options(http_headers={"X-What": "body"}).remote("long string")
        return one, many, body

    one, many, body = asyncio.run(main())
    assert one == {"kind": "python", "value": {"a": "b"}}
    assert many == [{"kind": "python", "value": {"i": str(i)}} for i in range(5)]
    assert body == {"kind": "python", "value": "long string"}


async def inner(request):
    return {
        "kind": "web" if isinstance(request, starlette.requests.Request)
        else "python" if isinstance(request, ServeRequest) else "other",
        "type": type(request).__name__,
        "method": request.method,
        "path": request.url.path if isinstance(request, starlette.requests.Request) else None,
        "query": dict(request.query_params),
        "header": request.headers.get("x-forwarded-by"),
        "body": (await request.body()).decode(),
    }


def outer_sync(request):
    # Model composition inside a replica: no serve.connect() here, the
    # replica knows its cluster.
    if request.query_params.get("env"):
        return {"address": os.environ.get("SERVAL_ADDRESS"), "token": os.environ.get("SERVAL_TOKEN")}
    return serve.get_handle("inner").remote(request).result()


async def outer_async(request):
    handle = serve.get_handle("inner", sync=False)
    passed = await handle.remote(request)
    wrapped = await handle.remote("from python")
    return {"passed": passed, "wrapped": wrapped}


def test_web_request_passed_to_a_handle_is_not_wrapped(cluster):
    # Three replicas on a 2-CPU machine: they declare no CPU.
    cpu0 = {"num_cpus": 0}
    serve.create_backend("inner", inner, ray_actor_options=cpu0)
    serve.create_endpoint("inner", backend="inner", route=None)
    serve.create_backend("outer_sync", outer_sync, ray_actor_options=cpu0)
    serve.create_endpoint("outer_sync", backend="outer_sync", route="/outer_sync", methods=["POST"])
    serve.create_backend("outer_async", outer_async, ray_actor_options=cpu0)
    serve.create_endpoint("outer_async", backend="outer_async", route="/outer_async", methods=["PUT"])

    expected = {"kind": "web", "type": "Request", "method": "POST", "path": "/outer_sync",
                "query": {"x": "1"}, "header": "me", "body": "payload"}
    r = requests.post(f"{cluster.url}/outer_sync?x=1", data="payload", headers={"X-Forwarded-By": "me"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json() == expected

    # The node agent told the replica where its cluster is, with its
    # backend's token (r1.<MAC of the backend name under a key derived from
    # the cluster token>.<backend name as hex>), never the cluster token.
    with open(os.path.join(cluster.data_dir, "cluster.json")) as f:
        control_address = json.load(f)["control_address"]
    with open(os.path.join(cluster.data_dir, "token")) as f:
        token = f.read().strip()
    key = hmac.new(token.encode(), b"serval replica v1", hashlib.sha256).digest()
    mac = hmac.new(key, b"outer_sync", hashlib.sha256).hexdigest()
    scoped = f"r1.{mac}.{b'outer_sync'.hex()}"
    r = requests.post(f"{cluster.url}/outer_sync?env=1", timeout=60)
    assert r.json() == {"address": control_address, "token": scoped}

    r = requests.put(f"{cluster.url}/outer_async?y=2", data="more", timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["passed"] == {"kind": "web", "type": "Request", "method": "PUT", "path": "/outer_async",
                                  "query": {"y": "2"}, "header": None, "body": "more"}
    assert r.json()["wrapped"]["kind"] == "python" and r.json()["wrapped"]["body"] == "from python"

    # A Starlette request built here, passed through a handle, also arrives as is.
    scope = {"type": "http", "method": "PATCH", "path": "/made/here", "query_string": b"q=z",
             "headers": [(b"x-forwarded-by", b"test")], "app": object()}
    req = starlette.requests.Request(scope)
    req._body = b"local body"
    got = serve.get_handle("inner").remote(req).result()
    assert got == {"kind": "web", "type": "Request", "method": "PATCH", "path": "/made/here",
                   "query": {"q": "z"}, "header": "test", "body": "local body"}


# -- 4. Custom methods -------------------------------------------------------


class StatefulProcessor:
    def __init__(self):
        self.count = 1

    def __call__(self, request):
        return {"current": self.count}

    def other_method(self, inc):
        if isinstance(inc, starlette.requests.Request):  # called over HTTP
            inc = int(inc.query_params["inc"])
        self.count += inc
        return True


def test_custom_methods_over_http_and_handle(cluster):
    serve.create_backend("stateful", StatefulProcessor)
    serve.create_endpoint("endpoint_name", backend="stateful", route="/stateful")
    handle = serve.get_handle("endpoint_name")
    assert handle.options(method_name="other_method").remote(5).result() is True
    assert handle.remote().result() == {"current": 6}
    r = requests.get(f"{cluster.url}/stateful?inc=10", headers={"X-SERVE-CALL-METHOD": "other_method"}, timeout=30)
    assert r.status_code == 200 and r.json() is True
    assert requests.get(f"{cluster.url}/stateful", timeout=30).json() == {"current": 16}

    r = requests.get(f"{cluster.url}/stateful", headers={"X-SERVE-CALL-METHOD": "no_such_method"}, timeout=30)
    assert 400 <= r.status_code < 500
    assert "no_such_method" in r.json()["error"]
    with pytest.raises(serval.ServeError, match="no_such_method"):
        handle.options(method_name="no_such_method").remote(1).result()
    # Nothing changed on the way.
    assert handle.remote().result() == {"current": 16}


# -- 5. Integrating with an existing web server ------------------------------


def summarize(request):
    text = request.data if isinstance(request, ServeRequest) else request.query_params.get("text", "")
    words = text.split()
    return {"words": len(words), "first": words[0] if words else None,
            "kind": "web" if isinstance(request, starlette.requests.Request) else "python"}


def test_existing_web_server_calls_serval_through_an_async_handle(cluster):
    serve.create_backend("summarize", summarize)
    serve.create_endpoint("summarize", backend="summarize", route=None)
    port = free_port()
    env = dict(os.environ, SERVAL_ENDPOINT="summarize")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(EXAMPLES, "web_server_integration.py"), "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        def up():
            if proc.poll() is not None:
                raise AssertionError(f"the app exited: {proc.stdout.read().decode(errors='replace')}")
            try:
                return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_for(up, 60, "the web app to listen")
        r = requests.get(f"http://127.0.0.1:{port}/summarize", params={"text": "ray serve starlette"}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json() == {"words": 3, "first": "ray", "kind": "python"}
        r = requests.get(f"http://127.0.0.1:{port}/forward", params={"text": "a b"}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json() == {"words": 2, "first": "a", "kind": "web"}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()


# -- 6. The proxy's own paths ------------------------------------------------


def test_routes_and_healthz(cluster):
    assert requests.get(f"{cluster.url}/-/healthz", timeout=30).status_code == 200
    serve.create_backend("b", lambda request: "b")
    serve.create_endpoint("one", backend="b", route="/one")
    serve.create_endpoint("two", backend="b", route="/two/{x:int}")
    serve.create_endpoint("hidden", backend="b", route=None)
    r = requests.get(f"{cluster.url}/-/routes", timeout=30)
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"/one": "one", "/two/{x:int}": "two"}
    serve.delete_endpoint("one")
    wait_for(lambda: requests.get(f"{cluster.url}/-/routes", timeout=30).json() == {"/two/{x:int}": "two"},
             what="/-/routes to drop the deleted endpoint")


# -- 7. Bad input -------------------------------------------------------------


async def parse_json(request):
    return {"got": await request.json()}


def test_malformed_json_is_a_500_without_traceback_unless_debug(cluster):
    serve.create_backend("parse", parse_json)
    serve.create_endpoint("parse", backend="parse", route="/parse", methods=["POST"])
    assert requests.post(f"{cluster.url}/parse", json={"a": 1}, timeout=30).json() == {"got": {"a": 1}}
    r = requests.post(f"{cluster.url}/parse", data="{not json", timeout=30)
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert "JSONDecodeError" in body["error"]
    assert "Traceback" not in r.text and "traceback" not in body
    # The traceback is in the replica's log.
    wait_for(lambda: "JSONDecodeError" in replica_logs(cluster.data_dir, "parse")
             and "Traceback" in replica_logs(cluster.data_dir, "parse"), what="the traceback in the replica log")


def test_body_limit_and_debug_tracebacks(monkeypatch):
    with own_cluster(monkeypatch, http_options={"max_body_bytes": 1024}, env={"SERVAL_DEBUG": "1"}) as c:
        serve.create_backend("parse", parse_json)
        serve.create_endpoint("parse", backend="parse", route="/parse", methods=["POST"])
        serve.create_backend("size", lambda request: len(request._body))
        serve.create_endpoint("size", backend="size", route="/size", methods=["POST"])

        assert requests.post(f"{c.url}/size", data=b"x" * 1024, timeout=30).json() == 1024
        r = requests.post(f"{c.url}/size", data=b"x" * 1025, timeout=30)
        assert r.status_code == 413 and "1024" in r.json()["error"]
        # A chunked body declares no length: the limit holds while reading.
        r = requests.post(f"{c.url}/size", data=iter([b"y" * 600, b"y" * 600]), timeout=30)
        assert r.status_code == 413
        assert requests.post(f"{c.url}/size", data=iter([b"y" * 500, b"y" * 500]), timeout=30).json() == 1000

        r = requests.post(f"{c.url}/parse", data="{not json", timeout=30)
        assert r.status_code == 500
        body = r.json()
        assert "JSONDecodeError" in body["error"]
        assert "Traceback (most recent call last)" in body["traceback"]
        assert "parse_json" in body["traceback"]


def test_max_body_bytes_option_becomes_a_head_flag():
    given = serve._given_http_options({"max_body_bytes": 2048})
    assert serve._head_flags(given) == ["--http-max-body-bytes", "2048"]
    with pytest.raises(ValueError, match="max_body_bytes"):
        serve._given_http_options({"max_body_bytes": 0})


def gated(request):
    """Slow on ?gate=DIR: marks that it started, then waits for DIR/release."""
    gate = request.query_params.get("gate")
    if gate:
        open(os.path.join(gate, f"started-{request.query_params['n']}"), "w").close()
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(gate, "release")) and time.monotonic() < deadline:
            time.sleep(0.01)
    return "ok"


def test_client_disconnect_does_not_leak_a_replica_slot(cluster):
    serve.create_backend("gated", gated, config={"max_concurrent_queries": 1})
    serve.create_endpoint("gated", backend="gated", route="/gated")
    gate = tempfile.mkdtemp(prefix="gate-", dir="/tmp")
    try:
        check_disconnects_free_slots(cluster, gate)
    finally:
        shutil.rmtree(gate, ignore_errors=True)


def check_disconnects_free_slots(cluster, gate):
    for n in range(3):
        s = socket.create_connection(("127.0.0.1", cluster.http_port), timeout=30)
        s.sendall(f"GET /gated?gate={gate}&n={n} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        wait_for(lambda: os.path.exists(os.path.join(gate, f"started-{n}")), what=f"slow request {n} to start")
        # Abort: RST instead of FIN.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        open(os.path.join(gate, "release"), "w").close()
        r = requests.get(f"{cluster.url}/gated", timeout=30)
        assert (r.status_code, r.text) == (200, "ok")
        os.remove(os.path.join(gate, "release"))
    # Every slot is free again: a burst is served, not 503ed.
    for _ in range(5):
        r = requests.get(f"{cluster.url}/gated", timeout=30)
        assert (r.status_code, r.text) == (200, "ok")
