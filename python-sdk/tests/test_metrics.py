"""Metrics (issue 4, item 9): Prometheus text at `/-/metrics` on proxies, and
on nodes without a proxy through `--metrics-port`. Counters by endpoint,
backend and status, latency histograms, queue and in-flight gauges, replica
counts and restarts, batch sizes. Names and labels: the README's "Metrics"."""

import os
import re
import signal
import threading
import time

import requests

from conftest import free_port
from serval import serve
from test_locations import kill_group, start_node

_SERIES = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(url):
    r = requests.get(f"{url}/-/metrics", timeout=10)
    assert r.status_code == 200, r.text
    return r.text


def samples(text, name, **labels):
    """Values of every `name` series whose labels include `labels`."""
    out = []
    for line in text.splitlines():
        m = _SERIES.match(line)
        if not m or m.group(1) != name:
            continue
        have = dict(_LABEL.findall(m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            out.append(float(m.group(3)))
    return out


def value(text, name, **labels):
    """The one series `name{labels...}`, or None when there is none."""
    found = samples(text, name, **labels)
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} series"
    return found[0] if found else None


def wait_for_metric(url, what, predicate, timeout=60.0):
    """Scrapes until `predicate(text)` holds; returns that text."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = scrape(url)
        except requests.RequestException:
            text = ""
        if text and predicate(text):
            return text
        assert time.monotonic() < deadline, f"timed out waiting for {what}; last scrape:\n{text}"
        time.sleep(0.1)


def echo(request):
    return {"ok": True}


def boom(request):
    raise RuntimeError("boom")


@serve.accept_batch
def batched(requests_):
    return [{"batch": len(requests_)} for _ in requests_]


def replicas_of(backend):
    return [r for r in serve.status()["replicas"] if r["backend"] == backend]


def test_proxy_metrics_count_requests_and_track_replicas(cluster):
    serve.create_backend("echo", echo)
    serve.create_endpoint("echo", backend="echo", route="/echo")
    serve.create_backend("boom", boom)
    serve.create_endpoint("boom", backend="boom", route="/boom")

    for _ in range(3):
        assert requests.get(f"{cluster.url}/echo", timeout=30).status_code == 200
    # A method the backend lacks: the replica answers 404.
    r = requests.get(f"{cluster.url}/echo", headers={"X-SERVE-CALL-METHOD": "nope"}, timeout=30)
    assert r.status_code == 404
    for path in ["/nowhere/1", "/nowhere/2"]:
        assert requests.get(f"{cluster.url}{path}", timeout=30).status_code == 404
    for _ in range(2):
        assert requests.get(f"{cluster.url}/boom", timeout=30).status_code == 500

    text = scrape(cluster.url)
    # The proxy: by endpoint and status class ("-": no endpoint matched).
    assert value(text, "serval_proxy_requests_total", endpoint="echo", status="2xx") == 3
    assert value(text, "serval_proxy_requests_total", endpoint="echo", status="4xx") == 1
    assert value(text, "serval_proxy_requests_total", endpoint="-", status="4xx") == 2
    assert value(text, "serval_proxy_requests_total", endpoint="boom", status="5xx") == 2
    assert value(text, "serval_proxy_request_duration_seconds_bucket", endpoint="echo", le="+Inf") == 4
    # The router: by endpoint, backend and outcome.
    assert value(text, "serval_router_requests_total", endpoint="echo", backend="echo", outcome="2xx") == 3
    assert value(text, "serval_router_requests_total", endpoint="echo", backend="echo", outcome="4xx") == 1
    assert value(text, "serval_router_requests_total", endpoint="boom", backend="boom", outcome="5xx") == 2
    assert value(text, "serval_router_requests_total", endpoint="boom", backend="boom", outcome="2xx") is None
    # A latency histogram per backend, with buckets.
    assert value(text, "serval_router_request_duration_seconds_count", backend="echo") == 4
    assert value(text, "serval_router_request_duration_seconds_bucket", backend="echo", le="+Inf") == 4
    assert value(text, "serval_router_request_duration_seconds_bucket", backend="boom", le="60") == 2
    # Never labelled by path.
    assert "/nowhere" not in text and "/echo" not in text

    # Gauges: nothing in flight or queued now; one replica running each.
    (replica,) = replicas_of("echo")
    assert value(text, "serval_replica_in_flight", backend="echo", replica=replica["id"]) == 0
    assert value(text, "serval_router_queue_length", backend="echo") == 0
    assert value(text, "serval_node_replicas", backend="echo", state="running") == 1
    text = wait_for_metric(
        cluster.url, "the controller's replica counts",
        lambda t: value(t, "serval_backend_running_replicas", backend="echo") == 1
        and value(t, "serval_backend_desired_replicas", backend="echo") == 1)
    assert value(text, "serval_replica_restarts_total", backend="echo") in (None, 0)

    # A killed replica process is restarted and counted.
    os.kill(replica["pid"], signal.SIGKILL)
    text = wait_for_metric(
        cluster.url, "the restart to be counted and the replica running again",
        lambda t: value(t, "serval_replica_restarts_total", backend="echo") == 1
        and value(t, "serval_node_replicas", backend="echo", state="running") == 1)
    assert value(text, "serval_node_replicas", backend="echo", state="failed") == 0
    deadline = time.monotonic() + 60
    while requests.get(f"{cluster.url}/echo", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "the restarted replica never answered"
        time.sleep(0.1)

    # A deleted backend's series leave /-/metrics (a batch job makes a
    # backend per job: kept series would grow without end).
    serve.delete_endpoint("boom")
    serve.delete_backend("boom")
    wait_for_metric(
        cluster.url, "the deleted backend's series to go",
        lambda t: 'backend="boom"' not in t and 'endpoint="boom"' not in t)


def test_batch_sizes_are_recorded_and_the_header_never_reaches_clients(cluster):
    # Four concurrent requests fill one batch of four long before the timeout.
    serve.create_backend("batched", batched, config={"max_batch_size": 4, "batch_wait_timeout": 2})
    serve.create_endpoint("batched", backend="batched", route="/batched")
    responses = []

    def call():
        responses.append(requests.get(f"{cluster.url}/batched", timeout=60))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert len(responses) == 4
    for r in responses:
        assert r.status_code == 200, r.text
        assert r.json() == {"batch": 4}
        assert "x-serval-batch-size" not in r.headers
    text = scrape(cluster.url)
    assert value(text, "serval_batch_size_count", backend="batched") == 4
    assert value(text, "serval_batch_size_sum", backend="batched") == 16
    assert value(text, "serval_batch_size_bucket", backend="batched", le="2") == 0
    assert value(text, "serval_batch_size_bucket", backend="batched", le="4") == 4

    # Handle calls go through the same router, which strips the header.
    assert serve.get_handle("batched").remote().result() == {"batch": 1}
    # The handle's router lives in this process, which has no exporter: the
    # proxy's count is unchanged.
    assert value(scrape(cluster.url), "serval_batch_size_count", backend="batched") == 4

    # Unbatched backends report no batch size.
    serve.create_backend("echo", echo)
    serve.create_endpoint("echo", backend="echo", route="/echo")
    assert requests.get(f"{cluster.url}/echo", timeout=30).status_code == 200
    assert value(scrape(cluster.url), "serval_batch_size_count", backend="echo") in (None, 0)


def test_a_node_without_a_proxy_serves_its_metrics_on_metrics_port(monkeypatch, request):
    # The head offers no GPU, the node one: the GPU replica lands on the node.
    monkeypatch.setenv("SERVAL_NUM_GPUS", "0")
    head = request.getfixturevalue("cluster")
    metrics_port = free_port()
    node = start_node(head, free_port(), ["--num-gpus", "1", "--metrics-port", str(metrics_port)])
    node_url = f"http://127.0.0.1:{metrics_port}"
    try:
        deadline = time.monotonic() + 60
        while len([n for n in serve.status()["nodes"] if n["alive"]]) < 2:
            assert time.monotonic() < deadline, "the node never joined"
            time.sleep(0.1)
        node_info = next(n for n in serve.status()["nodes"] if n["alive"] and not n["is_head"])
        assert node_info["http_address"] == "", "a HeadOnly cluster's node runs no proxy"

        serve.create_backend("ongpu", echo, ray_actor_options={"num_gpus": 1})
        serve.create_endpoint("ongpu", backend="ongpu", route="/ongpu")
        (replica,) = replicas_of("ongpu")
        assert replica["node_id"] == node_info["id"]
        assert requests.get(f"{head.url}/ongpu", timeout=30).status_code == 200

        text = wait_for_metric(
            node_url, "the node's replica gauge",
            lambda t: value(t, "serval_node_replicas", backend="ongpu", state="running") == 1)
        assert "# TYPE serval_node_replicas gauge" in text
        # No proxy on this node, so no dashboard on its metrics port: it says so.
        r = requests.get(f"{node_url}/-/dashboard", timeout=30)
        assert r.status_code == 404 and "runs no HTTP proxy" in r.json()["error"]
        # Per process: the head's scrape does not count the node's replica.
        assert value(scrape(head.url), "serval_node_replicas", backend="ongpu", state="running") is None

        os.kill(replica["pid"], signal.SIGKILL)
        wait_for_metric(
            node_url, "the node to count the restart",
            lambda t: value(t, "serval_replica_restarts_total", backend="ongpu") == 1)
    finally:
        kill_group(node)
