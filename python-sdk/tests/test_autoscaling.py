"""Autoscaling on in-flight requests with Cortex's knobs (issue 4.7): load
drives replicas up, idleness brings them down to zero, and the proxy holds
the first request to a backend at zero until a replica is ready."""

import threading
import time

import pytest
import requests

from serval import serve
from test_locations import wait_until


def slow(request):
    time.sleep(0.2)
    return "ok"


FAST_KNOBS = {
    "min_replicas": 0,
    "max_replicas": 3,
    "target_replica_concurrency": 1,
    "window": "2s",
    "upscale_stabilization_period": 0,
    "downscale_stabilization_period": "3s",
    "max_upscale_factor": 3,
    "max_downscale_factor": 0.5,
}


def replica_count(backend):
    return serve.get_backend_config(backend)["num_replicas"]


def running(backend):
    return sum(r["state"] == "running" for r in serve.status()["replicas"] if r["backend"] == backend)


def test_replicas_follow_load_up_and_down_to_zero_and_back(cluster):
    serve.create_backend("slow", slow, config={"autoscaling": FAST_KNOBS, "max_concurrent_queries": 2})
    serve.create_endpoint("slow", backend="slow", route="/slow")
    assert serve.get_backend_config("slow")["autoscaling"]["window"] == 2.0

    stop = threading.Event()
    failures = []

    def load():
        s = requests.Session()
        while not stop.is_set():
            r = s.get(f"{cluster.url}/slow", timeout=60)
            if r.status_code != 200:
                failures.append(r.status_code)

    threads = [threading.Thread(target=load) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        wait_until("scale up to max_replicas", lambda: replica_count("slow") == 3 and running("slow") == 3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:5]

    # Idle: down to zero after the window and the stabilization period.
    wait_until("scale down to zero", lambda: replica_count("slow") == 0 and running("slow") == 0)
    assert serve.status()["backends"][0]["state"] == "running"

    # The first request to a backend at zero waits for a replica and succeeds.
    r = requests.get(f"{cluster.url}/slow", timeout=60)
    assert r.status_code == 200 and r.text == "ok"
    assert replica_count("slow") >= 1


def test_bad_autoscaling_config_names_the_field(cluster):
    with pytest.raises(ValueError, match="autoscaling.window"):
        serve.create_backend("x", slow, config={"autoscaling": {"window": "soon"}})
    with pytest.raises(ValueError, match="no_such_knob"):
        serve.create_backend("x", slow, config={"autoscaling": {"no_such_knob": 1}})
    from serval import ServeError
    with pytest.raises(ServeError, match="autoscaling.min_replicas"):
        serve.create_backend("x", slow, config={"autoscaling": {"min_replicas": 5, "max_replicas": 2}})
    assert "x" not in serve.list_backends()
