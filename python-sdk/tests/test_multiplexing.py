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

from conftest import running_cluster, wait_for
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


@serve.deployment(ray_actor_options=CPU0, num_replicas=2)
class Spread:
    def __init__(self):
        self.loads = {}

    @serve.multiplexed(max_num_models_per_replica=8)
    async def get_model(self, model_id):
        self.loads[model_id] = self.loads.get(model_id, 0) + 1
        return model_id

    async def __call__(self, request=None):
        model_id = await self.get_model(serve.get_multiplexed_model_id())
        return {"pid": os.getpid(), "loads": self.loads[model_id]}


@serve.deployment(ray_actor_options=CPU0)
def marker():
    return "ok"


def test_every_router_learns_a_replicas_models_through_the_controller(shared):
    serve.run(Spread.bind(), name="mux-snap", route_prefix="/mux-snap")
    models = [f"s{i}" for i in range(6)]
    # Loaded through the proxy's router only.
    holder = {m: get(shared, "/mux-snap", m)["pid"] for m in models}

    def reported():
        held = {}
        for r in serve.status()["replicas"]:
            if r["backend"] == "mux-snap#Spread" and r["state"] == "running":
                for m in r.get("model_ids") or ():
                    held[m] = r["pid"]
        return held

    wait_for(lambda: all(m in reported() for m in models), timeout=60, what="the replicas' model reports")
    assert reported() == holder
    # serve.run returns once this process's router knows the new endpoint,
    # so it has the snapshot with the models too.
    serve.run(marker.bind(), name="mux-snap-sync", route_prefix=None)
    # This process's router never had a reply for these models: the first
    # call for each goes to its holder all the same.
    handle = serve.get_app_handle("mux-snap")
    for m in models:
        answer = handle.options(multiplexed_model_id=m).remote().result(timeout_s=60)
        assert answer == {"pid": holder[m], "loads": 1}, m
    serve.delete("mux-snap-sync")
    serve.delete("mux-snap")


def test_multiplexed_arguments_are_checked():
    with pytest.raises(ValueError, match="max_num_models_per_replica"):
        serve.multiplexed(max_num_models_per_replica=0)
    with pytest.raises(TypeError, match="multiplexed_model_id"):
        serve.DeploymentHandle("D", "app").options(multiplexed_model_id=3)


# -- Cortex 0.35: handler.multi_model_reloading -------------------------------

# Shaped like Cortex 0.35's multi-model python test APIs: Handler(config,
# python_client), load_model(model_path), get_model(name, version) with the
# model and version from the query.
CORTEX_HANDLER = """
import json
import os


class Model:
    def __init__(self, path, marks):
        with open(os.path.join(path, "model.json")) as f:
            self.spec = json.load(f)
        self.marks = marks

    def predict(self, x):
        return self.spec["labels"][x]

    def __del__(self):
        open(os.path.join(self.marks, f"del-{self.spec['name']}-{self.spec['version']}"), "w").close()


class Handler:
    def __init__(self, config, python_client):
        self.client = python_client
        self.marks = config["marks"]
        self.loads = {}

    def load_model(self, model_path):
        model = Model(model_path, self.marks)
        key = f"{model.spec['name']}:{model.spec['version']}"
        self.loads[key] = self.loads.get(key, 0) + 1
        return model

    def handle_post(self, payload, query_params):
        model_name = query_params.get("model")
        model_version = query_params.get("version", "latest")
        model = self.client.get_model(model_name, model_version)
        key = f"{model.spec['name']}:{model.spec['version']}"
        return {"label": model.predict(payload["x"]), "version": model.spec["version"],
                "loads": self.loads[key], "pid": os.getpid()}
"""


def make_model(root, name, version, labels, versioned=True):
    """A model 'trained' here: its labels, in a version subdirectory."""
    import json

    folder = os.path.join(root, name, str(version)) if versioned else os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "model.json"), "w") as f:
        json.dump({"name": name, "version": version, "labels": labels}, f)


def cortex_project(folder, api, models_section, replicas=1):
    from test_cortex_dropin import write

    marks = os.path.join(str(folder), "marks")
    os.makedirs(marks, exist_ok=True)
    section = textwrap.indent(textwrap.dedent(models_section).strip(), " " * 6)
    write(folder, {"handler.py": CORTEX_HANDLER})
    with open(os.path.join(str(folder), "cortex.yaml"), "w") as f:
        f.write(f"""- name: {api}
  kind: RealtimeAPI
  handler:
    type: python
    path: handler.py
    config: {{marks: "{marks}"}}
    multi_model_reloading:
{section}
  autoscaling: {{min_replicas: {replicas}, max_replicas: {replicas}, init_replicas: {replicas}}}
""")
    return str(folder), marks


def predict(shared, api, query, x=0):
    r = requests.post(f"{shared.url}/{api}?{query}", json={"x": x}, timeout=60)
    return r


def test_cortex_models_versions_picked_up_and_lru_cache(shared, tmp_path):
    from test_cortex_deploy import cli

    models = str(tmp_path / "models")
    make_model(models, "iris", 1, ["setosa", "versicolor"])
    make_model(models, "wine", 1, ["red", "white"])
    make_model(models, "digits", 3, ["zero", "one"])
    folder, marks = cortex_project(tmp_path / "project", "multi-model", f"""
        paths:
          - name: iris
            path: {models}/iris
          - name: wine
            path: {models}/wine
          - name: digits
            path: {models}/digits
        cache_size: 2
        disk_cache_size: 3
        """)
    out = cli(shared, "deploy", folder)
    assert out.returncode == 0, out.stdout + out.stderr

    r = predict(shared, "multi-model", "model=iris", 1)
    assert r.status_code == 200, r.text
    assert r.json()["label"] == "versicolor" and r.json()["version"] == 1 and r.json()["loads"] == 1
    assert "x-serval-models" not in r.headers
    # A new version directory appears while serving: the latest is it.
    make_model(models, "iris", 2, ["SETOSA", "VERSICOLOR"])
    r = predict(shared, "multi-model", "model=iris", 1)
    assert r.json()["label"] == "VERSICOLOR" and r.json()["version"] == 2, r.text
    # An explicit version is still served (and still cached).
    r = predict(shared, "multi-model", "model=iris&version=1")
    assert r.json() == {"label": "setosa", "version": 1, "loads": 1, "pid": r.json()["pid"]}
    # cache_size 2 holds iris:2 and iris:1; wine evicts iris:2, the least recently used.
    assert not os.path.exists(os.path.join(marks, "del-iris-2"))
    assert predict(shared, "multi-model", "model=wine", 1).json()["label"] == "white"
    assert os.path.exists(os.path.join(marks, "del-iris-2"))
    assert not os.path.exists(os.path.join(marks, "del-iris-1"))
    r = predict(shared, "multi-model", "model=iris")
    assert r.json()["version"] == 2 and r.json()["loads"] == 2
    assert predict(shared, "multi-model", "model=digits", 1).json() == {
        "label": "one", "version": 3, "loads": 1, "pid": r.json()["pid"]}
    # Unknown models and versions are 404s naming them.
    r = predict(shared, "multi-model", "model=nope")
    assert r.status_code == 404 and "nope" in r.text
    r = predict(shared, "multi-model", "model=iris&version=7")
    assert r.status_code == 404 and "version 7" in r.text
    assert cli(shared, "delete", "multi-model").returncode == 0


def test_cortex_models_dir_and_routing_by_model_name(shared, tmp_path):
    from test_cortex_deploy import cli

    models = str(tmp_path / "models")
    make_model(models, "alpha", 1, ["a0", "a1"], versioned=False)
    make_model(models, "beta", 1, ["b0", "b1"])
    folder, _ = cortex_project(tmp_path / "project", "models-dir", f"dir: {models}", replicas=2)
    out = cli(shared, "deploy", folder)
    assert out.returncode == 0, out.stdout + out.stderr
    # A model added to the directory while serving is served.
    make_model(models, "gamma", 5, ["g0", "g1"])
    for name, label in (("alpha", "a1"), ("beta", "b1"), ("gamma", "g1")):
        first = predict(shared, "models-dir", f"model={name}", 1)
        assert first.status_code == 200 and first.json()["label"] == label, first.text
        # The router sends a model's later requests to the replica that holds it.
        for _ in range(8):
            again = predict(shared, "models-dir", f"model={name}", 1).json()
            assert again["pid"] == first.json()["pid"] and again["loads"] == 1, (name, again)
    # Names are subdirectories of the models directory, never paths out of it.
    assert predict(shared, "models-dir", "model=..").status_code == 404
    assert predict(shared, "models-dir", "model=%2Fetc").status_code == 404
    assert cli(shared, "delete", "models-dir").returncode == 0

    # `path`: one model, got with no name; its latest version by default.
    folder, _ = cortex_project(tmp_path / "single", "single-model", f"path: {models}/beta")
    out = cli(shared, "deploy", folder)
    assert out.returncode == 0, out.stdout + out.stderr
    make_model(models, "beta", 2, ["B0", "B1"])
    r = predict(shared, "single-model", "", 0)
    assert r.status_code == 200 and r.json()["label"] == "B0" and r.json()["version"] == 2, r.text
    assert predict(shared, "single-model", "version=1", 0).json()["label"] == "b0"
    assert cli(shared, "delete", "single-model").returncode == 0


def test_cortex_multi_model_reloading_is_validated(tmp_path):
    from serval.cortex.config import ConfigError, load_config

    models = str(tmp_path / "models")
    make_model(models, "iris", 1, ["a"])
    cases = [
        ("cache_size: 1\n", "exactly one of path, paths or dir"),
        (f"path: {models}/iris\ndir: {models}\n", "exactly one of path, paths or dir"),
        (f"path: {models}/iris\ncache_size: 2\n", "cache_size and disk_cache_size go together"),
        (f"path: {models}/iris\ncache_size: 2\ndisk_cache_size: 1\n", "disk_cache_size: must be at least"),
        (f"dir: s3://bucket/models\n", "multi_model_reloading.dir: models are read from a directory"),
        ("paths: [{name: '../x', path: models}]\n", r"paths\[0\].name"),
        (f"path: {models}/iris\nsize: 1\n", "multi_model_reloading.size: unknown key"),
    ]
    for i, (section, message) in enumerate(cases):
        folder, _ = cortex_project(tmp_path / f"p{i}", "bad", section)
        with pytest.raises(ConfigError, match=message):
            load_config(folder)


def test_the_multiplexed_example_runs():
    # The example starts its own cluster: fresh ports and data dir.
    import re
    import subprocess
    import sys
    import tempfile

    from conftest import Cluster, free_port

    env = dict(os.environ)
    data_dir = tempfile.mkdtemp(prefix="sv-", dir="/tmp")
    env.update(SERVAL_DATA_DIR=data_dir, SERVAL_HTTP_PORT=str(free_port()), SERVAL_CONTROL_PORT=str(free_port()),
               SERVAL_PYTHON=sys.executable)
    example = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "multiplexed.py")
    try:
        out = subprocess.run([sys.executable, example], env=env, capture_output=True, text=True, timeout=300)
    finally:
        Cluster(data_dir, 0, 0).kill()
        import shutil

        shutil.rmtree(data_dir, ignore_errors=True)
    assert out.returncode == 0, out.stderr
    served = re.findall(r"(HTTP|handle) +(\w+) +-> replica (\d+): (\w+) says", out.stdout)
    assert len(served) == 8, out.stdout
    by_model = {}
    for _, model, pid, said in served:
        assert said == model
        by_model.setdefault(model, set()).add(pid)
    assert sorted(by_model) == ["dutch", "french", "german"]
    assert all(len(pids) == 1 for pids in by_model.values()), out.stdout
    assert "cluster shut down" in out.stdout


def test_the_model_cache_loads_once_for_threads_and_evicts_lru():
    # Cortex's get_model runs on handler threads (threads_per_process > 1).
    import threading

    from serval.multiplex import ModelCache

    cache = ModelCache(2)
    arrived, loads = [], []

    def load():
        loads.append(1)
        deadline = time.monotonic() + 30
        while len(arrived) < 8 and time.monotonic() < deadline:
            time.sleep(0.001)
        return object()

    got = []

    def get():
        arrived.append(1)
        got.append(cache.get_sync("k", load))

    threads = [threading.Thread(target=get) for _ in range(8)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert len(loads) == 1 and len(got) == 8 and all(g is got[0] for g in got)
    cache.get_sync("a", object)
    cache.get_sync("k", object)  # "a" is now the least recently used
    cache.get_sync("b", object)
    assert cache.keys() == ["k", "b"]
    with pytest.raises(ValueError):
        ModelCache(0)
