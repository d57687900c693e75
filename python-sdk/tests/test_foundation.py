"""The foundation slice through the public Python API: deploy, call over
HTTP and through a handle, bad input, failures, shutdown."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import requests
import starlette.requests

import serval
from serval import serve


class Counter:
    def __init__(self):
        self.count = 0

    def __call__(self, request):
        self.count += 1
        return {"count": self.count}

    def other_method(self, inc):
        self.count += inc
        return True


def test_counter_over_http_and_handle(cluster):
    serve.create_backend("counter", Counter)
    serve.create_endpoint("counter", backend="counter", route="/counter")

    r = requests.get(f"{cluster.url}/counter", timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"count": 1}

    handle = serve.get_handle("counter")
    assert handle.remote().result() == {"count": 2}
    assert serval.get(handle.options(method_name="other_method").remote(5)) is True
    # Two calls in flight at once may run in either order.
    both = serval.get([handle.remote(), handle.remote()])
    assert sorted(r["count"] for r in both) == [8, 9]

    assert "counter" in serve.list_backends()
    assert serve.list_backends()["counter"]["num_replicas"] == 1
    endpoints = serve.list_endpoints()
    assert endpoints["counter"]["route"] == "/counter"
    assert endpoints["counter"]["methods"] == ["GET"]
    assert endpoints["counter"]["traffic"] == {"counter": 1.0}

    serve.delete_endpoint("counter")
    assert "counter" not in serve.list_endpoints()
    serve.delete_backend("counter")
    assert "counter" not in serve.list_backends()


def test_function_backend_gets_a_starlette_request(cluster):
    def echo(request):
        assert isinstance(request, starlette.requests.Request)
        return {"path": request.url.path, "name": request.query_params.get("name"), "pid": os.getpid()}

    serve.create_backend("echo", echo)
    serve.create_endpoint("echo", backend="echo", route="/echo")
    body = requests.get(f"{cluster.url}/echo?name=serval", timeout=30).json()
    assert body["path"] == "/echo"
    assert body["name"] == "serval"
    # The replica is its own process, not the head and not this one.
    assert body["pid"] not in (os.getpid(), cluster.head_pid())
    with open(f"/proc/{body['pid']}/cmdline", "rb") as f:
        assert b"serval.replica" in f.read()


def test_strings_and_bytes_map_to_content_types(cluster):
    serve.create_backend("text", lambda request: "plain text")
    serve.create_endpoint("text", backend="text", route="/text")
    r = requests.get(f"{cluster.url}/text", timeout=30)
    assert r.text == "plain text"
    assert r.headers["content-type"].startswith("text/plain")


def test_unknown_path_is_a_json_404(cluster):
    r = requests.get(f"{cluster.url}/no/such/route", timeout=30)
    assert r.status_code == 404
    assert "error" in r.json()


def test_bad_input_raises_and_changes_nothing(cluster):
    serve.create_backend("counter", Counter)
    serve.create_endpoint("counter", backend="counter", route="/counter")
    before = (serve.list_backends(), serve.list_endpoints())

    with pytest.raises(serval.ServeError, match="backend 'missing' does not exist"):
        serve.create_endpoint("x", backend="missing", route="/x")
    with pytest.raises(serval.ServeError, match="endpoint 'counter' already exists"):
        serve.create_endpoint("counter", backend="counter", route="/other")
    with pytest.raises(serval.ServeError, match="route 'no-slash' is invalid"):
        serve.create_endpoint("y", backend="counter", route="no-slash")
    with pytest.raises(serval.ServeError, match="route 'no-slash' is invalid"):
        serve.create_endpoint("y", backend="counter", route="no-slash")
    with pytest.raises(serval.ServeError, match="backend 'counter' already exists"):
        serve.create_backend("counter", Counter)
    with pytest.raises(ValueError, match="num_replicas"):
        serve.create_backend("bad", Counter, config={"num_replicas": -1})
    with pytest.raises(ValueError, match="no_such_field"):
        serve.create_backend("bad", Counter, config={"no_such_field": 1})
    with pytest.raises(serval.ServeError, match="still used by endpoint"):
        serve.delete_backend("counter")

    assert (serve.list_backends(), serve.list_endpoints()) == before
    assert requests.get(f"{cluster.url}/counter", timeout=30).json() == {"count": 1}


class Broken:
    def __init__(self):
        raise RuntimeError("model weights are missing")

    def __call__(self, request):
        return "never"


def test_failing_init_raises_with_traceback_and_shows_in_status(cluster):
    with pytest.raises(serval.ServeError) as info:
        serve.create_backend("broken", Broken)
    message = str(info.value)
    assert "model weights are missing" in message
    assert "Traceback" in message

    out = subprocess.run(
        [sys.executable, "-m", "serval.cli", "--data-dir", cluster.data_dir, "status"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if l.strip().startswith("broken"))
    assert "failed" in line and "model weights are missing" in line


def test_user_exception_reaches_the_handle_caller(cluster):
    def boom(request):
        raise ValueError("bad input value")

    serve.create_backend("boom", boom)
    serve.create_endpoint("boom", backend="boom", route="/boom")
    with pytest.raises(serval.BackendError, match="bad input value"):
        serve.get_handle("boom").remote().result()
    r = requests.get(f"{cluster.url}/boom", timeout=30)
    assert r.status_code == 500
    assert "ValueError" in r.json()["error"]


def test_shutdown_leaves_no_process(cluster):
    def pid(request):
        return os.getpid()

    serve.create_backend("pid", pid, config={"num_replicas": 2}, ray_actor_options={"num_cpus": 0})
    serve.create_endpoint("pid", backend="pid", route="/pid")
    handle = serve.get_handle("pid")
    replica_pids = {handle.remote().result() for _ in range(20)}
    head = cluster.head_pid()
    serve.shutdown()
    for p in [head, *replica_pids]:
        assert not os.path.exists(f"/proc/{p}") or open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"


def test_a_crashed_replica_is_restarted_and_serving_resumes(cluster):
    def pid(request):
        return os.getpid()

    serve.create_backend("pid", pid)
    serve.create_endpoint("pid", backend="pid", route="/pid")
    first = requests.get(f"{cluster.url}/pid", timeout=30).json()
    os.kill(first, 9)
    deadline = time.monotonic() + 60
    while True:
        r = requests.get(f"{cluster.url}/pid", timeout=30)
        if r.status_code == 200 and r.json() != first:
            break
        # While it restarts, the proxy answers 502/503, never hangs.
        assert r.status_code in (200, 502, 503), r.text
        assert time.monotonic() < deadline, "replica was not restarted"
        time.sleep(0.05)
    status = serve.status()
    replica = next(r for r in status["replicas"] if r["backend"] == "pid")
    assert replica["restarts"] >= 1
    assert replica["state"] == "running"


def test_quickstart_example_runs():
    # The example starts its own cluster: give it fresh ports and a data dir.
    import tempfile
    from conftest import Cluster, free_port

    env = dict(os.environ)
    data_dir = tempfile.mkdtemp(prefix="sv-", dir="/tmp")
    env["SERVAL_DATA_DIR"] = data_dir
    env["SERVAL_HTTP_PORT"] = str(free_port())
    env["SERVAL_CONTROL_PORT"] = str(free_port())
    env["SERVAL_PYTHON"] = sys.executable
    example = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "quickstart.py")
    try:
        out = subprocess.run([sys.executable, example], env=env, capture_output=True, text=True, timeout=300)
    finally:
        Cluster(data_dir, 0, 0).kill()
    assert out.returncode == 0, out.stderr
    assert 'GET /counter -> 200 application/json {"count":1}' in out.stdout
    assert "other_method(5) -> True" in out.stdout
    assert "handle.remote() -> {'count': 8}" in out.stdout
    assert "cluster shut down" in out.stdout


_DRIVER = r'''
import json, os, sys
from serval import serve

def pid(request):
    return os.getpid()

serve.start(data_dir=sys.argv[1], http_options={"port": int(sys.argv[2])})
serve.create_backend("pid", pid, ray_actor_options={"num_cpus": 0})
serve.create_endpoint("pid", backend="pid")
replica = serve.get_handle("pid").remote().result(timeout=120)
print(json.dumps({"replica": replica}), flush=True)
sys.stdin.read()
'''


def test_a_driver_killed_takes_its_head_along(monkeypatch):
    """serve.start(detached=False), as Ray 1.x's start() without detached:
    the cluster lives as long as the driver. atexit covers a normal exit; a
    driver killed by a signal (no atexit) must not leave its head and
    replicas running: the head watches the driver and stops."""
    from conftest import Cluster, free_port

    data_dir = tempfile.mkdtemp(prefix="sv-", dir="/tmp")
    for var in ("SERVAL_ADDRESS", "SERVAL_TOKEN", "SERVAL_TOKEN_FILE", "SERVAL_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SERVAL_CONTROL_PORT", str(free_port()))
    monkeypatch.setenv("SERVAL_PYTHON", sys.executable)
    c = Cluster(data_dir, free_port(), None)
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, data_dir, str(c.http_port)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = driver.stdout.readline()
        assert line, "the driver did not start its cluster"
        replica, head = json.loads(line)["replica"], c.head_pid()
        assert head is not None and os.path.exists(f"/proc/{head}")
        driver.kill()
        driver.wait(timeout=30)

        def alive(p):
            try:
                with open(f"/proc/{p}/stat") as f:
                    return f.read().rsplit(")", 1)[1].split()[0] != "Z"
            except OSError:
                return False

        deadline = time.monotonic() + 60
        while alive(head) or alive(replica):
            assert time.monotonic() < deadline, "the head or its replica outlived the killed driver by 60 s"
            time.sleep(0.1)
    finally:
        if driver.poll() is None:
            driver.kill()
        c.kill()
        shutil.rmtree(data_dir, ignore_errors=True)
