"""A real Serval cluster per test: a head started by `serve.start()` on free
ports in a temp data dir, shut down afterwards, with every process it
started killed even when the test fails."""

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=30.0, what="condition"):
    """Polls ``predicate`` until it returns a truthy value (returned) or the
    deadline passes (AssertionError naming ``what``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class FileServer:
    """Serves ``data`` at ``/models/<name>`` over HTTP from a thread, counting
    downloads (any other path is 404). A context manager."""

    def __init__(self, data: bytes, name: str):
        import http.server
        import threading

        downloads = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                downloads.append(self.path)
                if self.path != f"/models/{name}":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.downloads = downloads
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/models/{name}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


class Cluster:
    def __init__(self, data_dir: str, http_port: int, control_port: int):
        self.data_dir = data_dir
        self.http_port = http_port
        self.control_port = control_port
        self.url = f"http://127.0.0.1:{http_port}"

    def kill(self):
        """Kills the head's process group (replicas included), if it runs."""
        pid = self.head_pid()
        if pid:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def head_pid(self):
        try:
            with open(os.path.join(self.data_dir, "cluster.json")) as f:
                return json.load(f)["pid"]
        except (OSError, ValueError, KeyError):
            return None


@contextlib.contextmanager
def running_cluster(monkeypatch, http_options=None, env=None):
    """A head started by ``serve.start()`` on free ports in a temp data dir,
    with extra ``http_options`` and environment (read by ``serve start``),
    shut down afterwards with every process it started killed, even when
    the test fails."""
    from serval import _core, serve

    # Short paths: replica Unix sockets live under the data dir.
    data_dir = tempfile.mkdtemp(prefix="sv-", dir="/tmp")
    http_port, control_port = free_port(), free_port()
    monkeypatch.setenv("SERVAL_CONTROL_PORT", str(control_port))
    monkeypatch.setenv("SERVAL_DATA_DIR", data_dir)
    monkeypatch.setenv("SERVAL_PYTHON", sys.executable)
    # Room for several 1-CPU replicas on a 2-core machine.
    if "SERVAL_NUM_CPUS" not in os.environ:
        monkeypatch.setenv("SERVAL_NUM_CPUS", "16")
    for var in ("SERVAL_ADDRESS", "SERVAL_TOKEN", "SERVAL_TOKEN_FILE", "SERVAL_HTTP_MIDDLEWARES"):
        monkeypatch.delenv(var, raising=False)
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    c = Cluster(data_dir, http_port, control_port)
    try:
        serve.start(detached=True, data_dir=data_dir, http_options={"port": http_port, **(http_options or {})})
        yield c
    finally:
        try:
            if _core.current() is not None:
                serve.shutdown(timeout=30)
        except Exception:
            pass
        # The detached head leads its own process group, replicas included.
        c.kill()
        _core.disconnect()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def cluster(monkeypatch):
    with running_cluster(monkeypatch) as c:
        yield c
