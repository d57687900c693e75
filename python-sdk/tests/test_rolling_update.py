"""Rolling updates (issue 4.1): new code replaces replicas one at a time and,
under a steady load during the update, no request fails."""

import threading

import pytest
import requests

import serval
from serval import serve


class Version:
    def __init__(self, tag):
        self.tag = tag

    def __call__(self, request):
        return self.tag


class Broken:
    def __init__(self):
        raise RuntimeError("the new model does not load")


def test_new_code_rolls_out_under_load_without_failures(cluster):
    serve.create_backend("svc", Version, "v1", config={"num_replicas": 2})
    serve.create_endpoint("svc", backend="svc", route="/svc")
    pids_v1 = {r["pid"] for r in serve.status()["replicas"]}

    stop = threading.Event()
    seen, failures = {}, []

    def load():
        session = requests.Session()
        while not stop.is_set():
            try:
                r = session.get(f"{cluster.url}/svc", timeout=30)
            except requests.RequestException as e:
                failures.append(repr(e))
                continue
            if r.status_code != 200:
                failures.append(f"{r.status_code} {r.text}")
            else:
                seen[r.text] = seen.get(r.text, 0) + 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        serve.update_backend("svc", Version, "v2")
        # Keep the load on a little after the rollout finished.
        handle = serve.get_handle("svc")
        assert all(handle.remote().result() == "v2" for _ in range(20))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:5]
    assert seen.get("v1", 0) > 0 and seen.get("v2", 0) > 0, seen
    replicas = serve.status()["replicas"]
    assert len(replicas) == 2 and all(r["state"] == "running" for r in replicas)
    assert not pids_v1 & {r["pid"] for r in replicas}, "old replica processes still serve"


def test_a_new_version_that_fails_keeps_the_old_one_serving(cluster):
    serve.create_backend("svc", Version, "v1")
    serve.create_endpoint("svc", backend="svc", route="/svc")
    with pytest.raises(serval.ServeError, match="the new model does not load"):
        serve.update_backend("svc", Broken)
    assert requests.get(f"{cluster.url}/svc", timeout=30).text == "v1"
