"""The web dashboard at ``/-/dashboard`` (issue 26): its JSON and event
API behind the cluster token, and the page itself in a real headless
Chromium driven over the DevTools protocol, on a cluster with traffic
running. Screenshots go to ``$SERVAL_ARTIFACTS_DIR`` (default: the test's
temp dir)."""

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import requests

from conftest import free_port, running_cluster, wait_for
from serval import serve
from test_cortex_batch import batch_api, submit, wait_ended  # noqa: F401 (a fixture)

LOG_MARKER = "dashboard-test-replica-started"


class Version:
    def __init__(self, tag, delay=0.0):
        print(f"{LOG_MARKER} {tag}", file=sys.stderr, flush=True)
        # A slow start keeps old and new replicas side by side in a rollout.
        time.sleep(delay)
        self.tag = tag

    def __call__(self, request):
        return self.tag


def cluster_token(cluster) -> str:
    with open(os.path.join(cluster.data_dir, "token")) as f:
        return f.read().strip()


def api(cluster, name, token, **kwargs):
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return requests.get(f"{cluster.url}/-/dashboard/api/{name}", headers=headers, timeout=30, **kwargs)


class Traffic:
    """GETs ``url`` from a thread until stopped (a context manager)."""

    def __init__(self, url):
        self.url, self.stop, self.answers = url, threading.Event(), 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        session = requests.Session()
        while not self.stop.is_set():
            try:
                session.get(self.url, timeout=10)
                self.answers += 1
            except requests.RequestException:
                pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=30)


@pytest.fixture
def debug_cluster(monkeypatch):
    """A cluster whose proxy logs at debug level, to check what it logs."""
    with running_cluster(monkeypatch, env={"SERVAL_LOG": "info,serval_proxy=debug"}) as c:
        yield c


def test_the_api_needs_the_token_and_shows_the_cluster_its_traffic_and_logs(debug_cluster):
    cluster = debug_cluster
    token = cluster_token(cluster)
    serve.create_backend("svc", Version, "v1", config={"num_replicas": 2})
    serve.create_endpoint("svc", backend="svc", route="/svc")

    page = requests.get(f"{cluster.url}/-/dashboard", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert token not in page.text
    for bad in (None, "", token[:-1] + ("x" if token[-1] != "x" else "y"), token + "x"):
        for name in ("state", "events", "logs?replica=x"):
            r = api(cluster, name, bad)
            assert r.status_code == 401, (name, bad, r.status_code)
            assert token not in r.text

    with Traffic(f"{cluster.url}/svc"):
        def svc_state():
            s = api(cluster, "state", token).json()
            e = next((e for e in s["endpoints"] if e["name"] == "svc"), None)
            samples = s.get("series", {}).get("svc", [])
            return s if e and e["latest"] and any(p["rps"] > 0 for p in samples) else None

        s = wait_for(svc_state, timeout=60, what="a sampled rate for svc")
    assert [h["role"] for h in s["heads"]] == ["leader"] and s["heads"][0]["term"] >= 1
    assert s["nodes"] and s["nodes"][0]["state"] == "alive" and s["nodes"][0]["cpus"] > 0
    endpoint = next(e for e in s["endpoints"] if e["name"] == "svc")
    assert endpoint["route"] == "/svc" and endpoint["traffic"] == {"svc": 1.0}
    sample = endpoint["latest"]
    assert sample["p99_ms"] >= sample["p50_ms"] >= 0 and sample["error_rate"] == 0
    backend = next(b for b in s["backends"] if b["name"] == "svc")
    assert backend["target"] == 2 and backend["running"] == 2
    assert {r["shown"] for r in backend["replicas"]} == {"running"}

    # A replica's log tail, read through the replica as `serve logs` does.
    replica = backend["replicas"][0]["id"]
    logs = api(cluster, "logs", token, params={"replica": replica})
    assert logs.status_code == 200 and f"{LOG_MARKER} v1" in logs.text
    assert api(cluster, "logs", token, params={"replica": "nope"}).status_code == 404

    # The event stream: the whole state with series first, then updates.
    with api(cluster, "events", token, stream=True) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
        lines = r.iter_lines(decode_unicode=True)
        events = []
        for line in lines:
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
            if len(events) == 2:
                break
    assert "series" in events[0] and "svc" in events[0]["series"]
    assert "series" not in events[1] and events[1]["backends"]

    # Neither the refused tokens nor the right one reached the head's log.
    with open(os.path.join(cluster.data_dir, "logs", "serve.log")) as f:
        log = f.read()
    assert "serval_proxy" in log or "DEBUG" in log, "the proxy logged nothing at debug level"
    assert token not in log and token[:-1] not in log


@serve.deployment(ray_actor_options={"num_cpus": 0})
def echo(value):
    return {"echo": value}


def test_ray_applications_show_as_serve_status_shows_them(cluster):
    token = cluster_token(cluster)
    serve.run(echo.bind(), name="app", route_prefix="/app")
    s = wait_for(lambda: (lambda s: s if s["applications"] else None)(api(cluster, "state", token).json()),
                 what="the application in the dashboard")
    (app,) = s["applications"]
    assert (app["name"], app["status"], app["route_prefix"]) == ("app", "RUNNING", "/app")
    assert [(d, st["status"]) for d, st in app["deployments"]] == [("echo", "HEALTHY")]
    assert not [a for a in s["apis"] if a["name"] == "app"], "an application is no Cortex API"


def test_cortex_apis_and_batch_jobs_with_their_dead_letters(batch_api, cluster, tmp_path):
    token = cluster_token(cluster)
    r = submit(batch_api, {"workers": 1, "max_receive_count": 1,
                           "config": {"out": str(tmp_path / "out"), "fail_on": 13},
                           "item_list": {"items": list(range(30)), "batch_size": 10}})
    job_id = r.json()["job_id"]
    wait_ended(batch_api, job_id)

    def job():
        s = api(cluster, "state", token).json()
        j = next((j for j in s["jobs"] if j["id"] == job_id), None)
        return (s, j) if j and j["status"] == "completed with failures" else None

    s, j = wait_for(job, timeout=30, what="the ended job in the dashboard")
    assert (j["api"], j["total"], j["succeeded"], j["failed"], j["in_queue"]) == ("summer", 3, 2, 1, 0)
    (summer,) = [a for a in s["apis"] if a["name"] == "summer"]
    assert (summer["kind"], summer["status"]) == ("BatchAPI", "live")


def test_the_metrics_port_serves_the_same_dashboard(monkeypatch):
    port = free_port()
    with running_cluster(monkeypatch, env={"SERVAL_METRICS_PORT": str(port)}) as cluster:
        token = cluster_token(cluster)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: requests.get(f"{url}/-/metrics", timeout=10).status_code == 200, what="the metrics port")
        assert requests.get(f"{url}/-/dashboard", timeout=10).headers["content-type"].startswith("text/html")
        assert requests.get(f"{url}/-/dashboard/api/state", timeout=10).status_code == 401
        state = wait_for(lambda: requests.get(f"{url}/-/dashboard/api/state", timeout=10,
                                              headers={"Authorization": f"Bearer {token}"}).json()["heads"] or None,
                         what="the dashboard's state on the metrics port")
        assert state[0]["role"] == "leader"
        assert "serval_" in requests.get(f"{url}/-/metrics", timeout=10).text


def test_event_streams_are_capped(cluster):
    token = cluster_token(cluster)
    wait_for(lambda: api(cluster, "state", token).json()["nodes"], what="a snapshot")
    streams = []
    try:
        while True:
            r = api(cluster, "events", token, stream=True)
            streams.append(r)
            if r.status_code != 200:
                break
            assert len(streams) <= 64, "no cap on event streams"
        assert r.status_code == 503 and r.headers.get("retry-after")
        assert len(streams) == 17
        assert open_streams(cluster) == 16
    finally:
        for r in streams:
            r.close()
    # Closed streams give their places back.
    wait_for(lambda: open_streams(cluster) == 0, what="the streams to be counted closed")
    with api(cluster, "events", token, stream=True) as r:
        assert r.status_code == 200


def open_streams(cluster):
    """``serval_dashboard_streams`` on the head's ``/-/metrics``."""
    text = requests.get(f"{cluster.url}/-/metrics", timeout=30).text
    lines = [line for line in text.splitlines() if line.startswith("serval_dashboard_streams ")]
    return float(lines[0].split()[1]) if lines else None


# ---------------------------------------------------------------- browser


class Browser:
    """Headless Chromium on ``url``, driven over the DevTools protocol."""

    def __init__(self, url):
        from websockets.sync.client import connect

        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            pytest.skip("chromium is not installed (`make browser-deps` installs Debian's)")
        self.stack = contextlib.ExitStack()
        self.profile = tempfile.mkdtemp(prefix="sv-chromium-")
        self.proc = subprocess.Popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
             f"--user-data-dir={self.profile}", "--window-size=1280,1000", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            port_file = os.path.join(self.profile, "DevToolsActivePort")
            wait_for(lambda: os.path.exists(port_file) and open(port_file).read().split("\n")[0],
                     timeout=60, what="chromium's DevTools port")
            port = open(port_file).read().split("\n")[0]

            def page_target():
                targets = requests.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
                return next((t for t in targets if t["type"] == "page"), None)

            target = wait_for(page_target, timeout=30, what="chromium's page")
            self.ws = self.stack.enter_context(
                connect(target["webSocketDebuggerUrl"], max_size=64 << 20, open_timeout=30))
            self.next_id = 0
        except BaseException:
            self.close()
            raise

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message["result"]

    def eval(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self):
        self.stack.close()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        shutil.rmtree(self.profile, ignore_errors=True)


def replica_rows_js(backend):
    return (f"Array.from(document.querySelectorAll('table[data-backend=\"{backend}\"] tr[data-replica]'))"
            ".map(r => ({id: r.dataset.replica, version: r.dataset.version,"
            " state: r.querySelector('td.state').textContent}))")


def test_the_page_in_a_browser_charts_traffic_crashes_and_rollouts(cluster, tmp_path):
    artifacts = os.environ.get("SERVAL_ARTIFACTS_DIR") or str(tmp_path)
    os.makedirs(artifacts, exist_ok=True)
    token = cluster_token(cluster)
    serve.create_backend("svc", Version, "v1", config={"num_replicas": 2})
    serve.create_endpoint("svc", backend="svc", route="/svc")

    with Traffic(f"{cluster.url}/svc"):
        browser = Browser(f"{cluster.url}/-/dashboard#token={token}")
        try:
            # Signed in from the fragment, which the page then drops.
            wait_for(lambda: browser.eval("(document.getElementById('app') || {style: {}}).style.display")
                     == "block",
                     timeout=60, what="the dashboard to sign in")
            assert browser.eval("location.hash") == ""
            assert browser.eval("document.body.innerText").find(token) < 0

            # The requests/s chart draws a non-empty series.
            def drawn():
                d = browser.eval("(document.querySelector('path[data-endpoint=\"svc\"][data-metric=\"rps0\"]')"
                                 " || {getAttribute: () => ''}).getAttribute('d')")
                return d if d and d.count("L") >= 3 else None

            wait_for(drawn, timeout=60, what="a drawn requests/s series")
            assert float(browser.eval("document.querySelector('table[data-endpoint=\"svc\"] td.rps')"
                                      ".textContent")) > 0
            browser.screenshot(os.path.join(artifacts, "dashboard-traffic.png"))

            # The log tail is one click from a replica's row.
            browser.eval("document.querySelector('table[data-backend=\"svc\"] button.logs').click()")
            wait_for(lambda: LOG_MARKER in browser.eval("document.getElementById('logs-text').textContent"),
                     timeout=30, what="the replica's log in the page")
            browser.eval("document.getElementById('logs-close').click()")

            # A crashed replica shows as restarting within 5 s.
            victim = serve.status()["replicas"][0]
            os.kill(victim["pid"], signal.SIGKILL)
            wait_for(lambda: any(r["id"] == victim["id"] and r["state"] == "restarting"
                                 for r in browser.eval(replica_rows_js("svc"))),
                     timeout=5, what="the killed replica shown as restarting")
            wait_for(lambda: all(r["state"] == "running" for r in browser.eval(replica_rows_js("svc")))
                     and len(browser.eval(replica_rows_js("svc"))) == 2,
                     timeout=120, what="both replicas running again")

            # A rollout shows old and new versions side by side.
            rollout_error = []

            def roll():
                try:
                    serve.update_backend("svc", Version, "v2", 3.0)
                except Exception as e:  # reported below
                    rollout_error.append(e)

            rollout = threading.Thread(target=roll)
            rollout.start()
            try:
                wait_for(lambda: len({r["version"] for r in browser.eval(replica_rows_js("svc"))}) == 2,
                         timeout=120, what="old and new versions side by side")
                assert "(old)" in browser.eval("document.querySelector('table[data-backend=\"svc\"]').innerText")
                # The README's picture (docs/dashboard.png) is this one.
                browser.screenshot(os.path.join(artifacts, "dashboard.png"))
            finally:
                rollout.join(timeout=300)
            assert not rollout_error, rollout_error
        finally:
            browser.close()
