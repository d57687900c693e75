"""Model multiplexing (issue 23 part 7) and Cortex's multi_model_reloading
(issue 21), one replica model cache under both, on a real cluster:
``@serve.multiplexed``, ``serve.get_multiplexed_model_id()``, the
``serve_multiplexed_model_id`` header and handle option, LRU eviction
running the model's ``__del__``, one load for concurrent requests, and the
router sending a model's requests to the replica that holds it; then a
Cortex project whose handler gets versioned models through
``python_client.get_model``."""

import asyncio
import os
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import running_cluster
from serval import serve

CPU0 = {"num_cpus": 0}
HEADER = "serve_multiplexed_model_id"


@pytest.fixture(scope="module")
def shared():
    with pytest.MonkeyPatch.context() as mp:
        with running_cluster(mp) as c:
            yield c


class Model:
    """A loaded model; unloading leaves a marker file."""

    def __init__(self, model_id, marks):
        self.model_id = model_id
        self.marks = marks

    def __del__(self):
        open(os.path.join(self.marks, f"del-{self.model_id}"), "w").close()


class AsyncModel:
    def __init__(self, model_id, marks):
        self.model_id = model_id
        self.marks = marks

    async def __del__(self):
        await asyncio.sleep(0)
        open(os.path.join(self.marks, f"adel-{self.model_id}"), "w").close()


@serve.deployment(ray_actor_options=CPU0, max_ongoing_requests=32)
class Models:
    def __init__(self, marks, expected_waiters):
        self.marks = marks
        self.loads = {}
        self.waiting = 0
        self.expected_waiters = expected_waiters

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id):
        self.loads[model_id] = self.loads.get(model_id, 0) + 1
        if model_id.startswith("slow"):
            # Held until every concurrent request for it is waiting here.
            deadline = time.monotonic() + 60
            while self.waiting < self.expected_waiters and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        cls = AsyncModel if model_id.startswith("async") else Model
        return cls(model_id, self.marks)

    async def __call__(self, request=None):
        model_id = serve.get_multiplexed_model_id()
        if not model_id:
            return {"model_id": "", "pid": os.getpid()}
        self.waiting += 1
        try:
            model = await self.get_model(model_id)
        finally:
            self.waiting -= 1
        return {"model_id": model.model_id, "pid": os.getpid(), "loads": self.loads[model_id]}

    def sync_id(self):
        return serve.get_multiplexed_model_id()


def get(shared, prefix, model_id):
    headers = {HEADER: model_id} if model_id else {}
    r = requests.get(f"{shared.url}{prefix}", headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    # The replica's report of what it holds is for the router only.
    assert "x-serval-models" not in r.headers
    return r.json()


def test_model_id_in_the_request_and_lru_eviction_runs_del(shared, tmp_path):
    marks = str(tmp_path)
    handle = serve.run(Models.bind(marks, 1), name="mux-lru", route_prefix="/mux-lru")
    assert get(shared, "/mux-lru", "")["model_id"] == ""
    assert get(shared, "/mux-lru", "a")["model_id"] == "a"
    assert handle.options(multiplexed_model_id="b").remote().result()["model_id"] == "b"
    # Sync methods see it too; options compose.
    assert handle.options(multiplexed_model_id="b").sync_id.remote().result() == "b"
    assert handle.sync_id.options(multiplexed_model_id="q").remote().result() == "q"
    # "a" used after "b": loading "c" evicts "b", the least recently used.
    assert get(shared, "/mux-lru", "a")["loads"] == 1
    assert not os.path.exists(os.path.join(marks, "del-b"))
    assert get(shared, "/mux-lru", "c")["loads"] == 1
    assert os.path.exists(os.path.join(marks, "del-b"))
    assert not os.path.exists(os.path.join(marks, "del-a"))
    # "b" again is a new load, and evicts "a".
    assert get(shared, "/mux-lru", "b")["loads"] == 2
    assert os.path.exists(os.path.join(marks, "del-a"))
    # An async __del__ is awaited when its model is evicted.
    get(shared, "/mux-lru", "async-x")
    get(shared, "/mux-lru", "d")
    get(shared, "/mux-lru", "e")
    assert os.path.exists(os.path.join(marks, "adel-async-x"))
    serve.delete("mux-lru")


def test_concurrent_requests_for_one_model_load_it_once(shared, tmp_path):
    n = 8
    handle = serve.run(Models.bind(str(tmp_path), n), name="mux-once", route_prefix="/mux-once")
    slow = handle.options(multiplexed_model_id="slow-1")
    responses = [slow.remote() for _ in range(n)]
    results = [r.result(timeout_s=90) for r in responses]
    assert [r["loads"] for r in results] == [1] * n
    with ThreadPoolExecutor(n) as pool:
        over_http = list(pool.map(lambda _: get(shared, "/mux-once", "slow-2"), range(n)))
    assert {r["loads"] for r in over_http} == {1}
    serve.delete("mux-once")


def test_requests_for_a_model_go_to_the_replica_holding_it(shared, tmp_path):
    handle = serve.run(Models.options(num_replicas=2).bind(str(tmp_path), 1), name="mux-affinity",
                       route_prefix="/mux-affinity")
    # Both replicas serve: requests naming no model spread over them.
    pids = set()
    deadline = time.monotonic() + 60
    while len(pids) < 2 and time.monotonic() < deadline:
        pids.add(get(shared, "/mux-affinity", "")["pid"])
    assert len(pids) == 2
    # Over HTTP (the proxy's router): the replica that loaded "m1" gets
    # every later request for it, and loads it only once.
    first = get(shared, "/mux-affinity", "m1")
    for _ in range(12):
        again = get(shared, "/mux-affinity", "m1")
        assert again["pid"] == first["pid"] and again["loads"] == 1
    # Through a handle (the driver's router): the same for "m2".
    m2 = handle.options(multiplexed_model_id="m2")
    first = m2.remote().result()
    for _ in range(12):
        again = m2.remote().result()
        assert again["pid"] == first["pid"] and again["loads"] == 1
    serve.delete("mux-affinity")


def test_multiplexed_arguments_are_checked():
    with pytest.raises(ValueError, match="max_num_models_per_replica"):
        serve.multiplexed(max_num_models_per_replica=0)
    with pytest.raises(TypeError, match="multiplexed_model_id"):
        serve.DeploymentHandle("D", "app").options(multiplexed_model_id=3)
