"""HTTP server locations (seed 003, "Configuring HTTP Server Locations"):
HeadOnly (default), EveryNode (a proxy per node) and NoServer (handles only),
on a head plus extra nodes started on this machine."""

import json
import os
import signal
import subprocess
import sys
import tempfile

import pytest
import requests

from conftest import Cluster, free_port, running_cluster, wait_for
from serval import serve


def start_node(head: Cluster, http_port: int, extra_args=()):
    """`serve start --address HEAD` in its own process group; returns the Popen.
    ``extra_args`` go after the others (e.g. ``["--metrics-port", "9100"]``)."""
    data_dir = tempfile.mkdtemp(prefix="svn-", dir="/tmp")
    with open(os.path.join(head.data_dir, "token")) as f:
        token = f.read().strip()
    cmd = [
        sys.executable, "-m", "serval.cli", "--data-dir", data_dir, "start",
        "--address", f"127.0.0.1:{head.control_port}", "--token", token,
        "--http-port", str(http_port), "--num-cpus", "2", *extra_args,
    ]
    log = open(os.path.join(data_dir, "node.log"), "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_until(what, predicate, timeout=60.0):
    """`wait_for` with the description first, as these cluster tests read."""
    return wait_for(predicate, timeout=timeout, what=what)


def alive_nodes():
    return [n for n in serve.status()["nodes"] if n["alive"]]


def answers(port, path):
    try:
        r = requests.get(f"http://127.0.0.1:{port}{path}", timeout=10)
        return r.status_code == 200 and r.json()
    except (requests.RequestException, ValueError):
        return None


@pytest.fixture
def location_cluster(monkeypatch, request):
    """A head with the http location given by the test's parameter."""
    with running_cluster(monkeypatch, http_options={"location": request.param}) as c:
        yield c


def hello(request):
    # Handle calls carry a ServeRequest, which has no URL.
    path = request.url.path if hasattr(request, "url") else "python"
    return {"hello": path, "pid": os.getpid()}


@pytest.mark.parametrize("location_cluster", ["EveryNode"], indirect=True)
def test_every_node_runs_a_proxy_that_serves_every_route(location_cluster):
    head = location_cluster
    ports = [free_port(), free_port()]
    nodes = [start_node(head, p) for p in ports]
    try:
        wait_until("both nodes to join", lambda: len(alive_nodes()) == 3)
        proxies = sorted(n["http_address"] for n in alive_nodes())
        assert proxies == sorted(f"127.0.0.1:{p}" for p in [head.http_port, *ports])

        serve.create_backend("hello", hello, config={"num_replicas": 3})
        serve.create_endpoint("first", backend="hello", route="/first")
        for port in [head.http_port, *ports]:
            assert answers(port, "/first")["hello"] == "/first", port

        # A route added later reaches every proxy before create_endpoint returns.
        serve.create_endpoint("later", backend="hello", route="/later")
        for port in [head.http_port, *ports]:
            assert answers(port, "/later")["hello"] == "/later", port
            assert json.loads(requests.get(f"http://127.0.0.1:{port}/-/routes", timeout=10).text) == {
                "/first": "first", "/later": "later"}

        # Replicas were spread over the nodes (one CPU each, three nodes).
        running = wait_until("three running replicas", lambda: [
            r for r in serve.status()["replicas"] if r["state"] == "running"] if sum(
            r["state"] == "running" for r in serve.status()["replicas"]) == 3 else None)
        assert len({r["node_id"] for r in running}) >= 2

        # Shutdown stops the joined nodes too.
        serve.shutdown(timeout=60)
        for proc in nodes:
            assert proc.wait(timeout=60) == 0
    finally:
        for proc in nodes:
            kill_group(proc)


@pytest.mark.parametrize("location_cluster", ["HeadOnly"], indirect=True)
def test_head_only_nodes_run_no_proxy(location_cluster):
    head = location_cluster
    port = free_port()
    node = start_node(head, port)
    try:
        wait_until("the node to join", lambda: len(alive_nodes()) == 2)
        node_info = next(n for n in alive_nodes() if not n["is_head"])
        assert node_info["http_address"] == ""
        serve.create_backend("hello", hello)
        serve.create_endpoint("hello", backend="hello", route="/hello")
        assert answers(head.http_port, "/hello")
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/hello", timeout=5)
    finally:
        kill_group(node)


@pytest.mark.parametrize("location_cluster", ["NoServer"], indirect=True)
def test_no_server_starts_no_proxy_and_handles_still_work(location_cluster):
    head = location_cluster
    assert all(n["http_address"] == "" for n in alive_nodes())
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{head.http_port}/-/healthz", timeout=5)
    serve.create_backend("hello", hello)
    serve.create_endpoint("hello", backend="hello", route="/hello")
    assert serve.get_handle("hello").remote().result()["hello"] == "python"


def test_a_bad_location_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="location"):
        serve.start(http_options={"location": "Everywhere"})
