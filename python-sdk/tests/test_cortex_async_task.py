"""Cortex 0.35's ``kind: AsyncAPI`` and ``kind: TaskAPI``, deployed with
`serve deploy` from project folders shaped like Cortex's own test APIs
(``test/apis/async/iris-classifier``, ``test/apis/task/iris-classifier-training``,
with the model made locally), on the BatchAPI's replicated job queue."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from serval import _core, serve
from test_cortex_deploy import cli
from test_cortex_handler import wait_for, write_project

TIMEOUT = 60

# The iris classifier as Cortex's async test API has it, its model a
# nearest-centroid table in the project instead of a pickle on S3. A
# payload with "fail" raises; while the file config["gate"] is missing,
# handle_async waits (so a test sees a submission queued and in progress).
ASYNC_HANDLER = '''
import json, os, time

labels = ["setosa", "versicolor", "virginica"]


class Handler:
    def __init__(self, config):
        with open(config["model"]) as f:
            self.centroids = json.load(f)
        self.gate = config.get("gate")

    def handle_async(self, payload, request_id):
        while self.gate and not os.path.exists(self.gate):
            time.sleep(0.05)
        if "fail" in payload:
            raise ValueError("cannot classify " + str(payload["fail"]))
        measurements = [payload["sepal_length"], payload["sepal_width"], payload["petal_length"],
                        payload["petal_width"]]
        distances = [sum((a - b) ** 2 for a, b in zip(measurements, c)) for c in self.centroids]
        return {"label": labels[distances.index(min(distances))], "request_id": request_id}
'''

CENTROIDS = json.dumps([[5.0, 3.4, 1.5, 0.2], [5.9, 2.8, 4.3, 1.3], [6.6, 3.0, 5.6, 2.0]])
SAMPLE = {"sepal_length": 5.2, "sepal_width": 3.6, "petal_length": 1.5, "petal_width": 0.3}


def async_config(gate):
    return f"""- name: async-iris-classifier
  kind: AsyncAPI
  handler:
    type: python
    path: predictor.py
    config:
      model: model.json
      gate: {gate}
  compute:
    cpu: 0.2
    mem: 200M
  jobs:
    max_queued: 2
    retention: 2s
"""


@pytest.fixture
def async_api(cluster, tmp_path):
    gate = tmp_path / "gate"
    write_project(tmp_path / "async", {"predictor.py": ASYNC_HANDLER, "model.json": CENTROIDS,
                                       "cortex.yaml": async_config(gate)})
    out = cli(cluster, "deploy", str(tmp_path / "async"))
    assert out.returncode == 0, out.stdout + out.stderr
    return f"{cluster.url}/async-iris-classifier", gate


def workload(url, request_id):
    r = requests.get(f"{url}/{request_id}", timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()


def wait_workload(url, request_id, status, timeout=TIMEOUT):
    return wait_for(lambda: (lambda w: w if w["status"] == status else None)(workload(url, request_id)),
                    timeout=timeout, what=f"submission {request_id} to be {status}")


def submit_async(url, body=None, **kw):
    r = requests.post(url, json=body if body is not None else SAMPLE, timeout=TIMEOUT, **kw)
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"id"}, r.json()
    return r.json()["id"]


def test_async_submissions_are_queued_run_and_fetched_by_id(async_api):
    url, gate = async_api
    # The gate is shut: the one replica runs the first, the second waits.
    first = submit_async(url)
    wait_workload(url, first, "in_progress")
    second = submit_async(url)
    assert workload(url, second) == {"id": second, "status": "in_queue"}
    # jobs.max_queued (2) are queued or running: the next one waits.
    full = requests.post(url, json=SAMPLE, timeout=TIMEOUT)
    assert full.status_code == 503 and full.headers["Retry-After"], full.text
    gate.touch()
    done = wait_workload(url, first, "completed")
    assert set(done) == {"id", "status", "result", "timestamp"}, done
    assert done["result"] == {"label": "setosa", "request_id": first}
    assert done["timestamp"].endswith("Z")
    assert wait_workload(url, second, "completed")["result"]["label"] == "setosa"

    # A handler that raises: failed, with why.
    failing = submit_async(url, {"fail": "this"})
    failed = wait_workload(url, failing, "failed")
    assert "result" not in failed and "cannot classify this" in failed["error"], failed

    # Kept for jobs.retention (2 s) once ended, as jobs are: removed when
    # a later submission is stored.
    deadline = time.monotonic() + TIMEOUT
    while requests.get(f"{url}/{failing}", timeout=TIMEOUT).status_code != 404:
        assert time.monotonic() < deadline, "the failed submission was never removed"
        wait_workload(url, submit_async(url), "completed")
        time.sleep(0.5)  # a retry's pace, not a wait for an event

    # Unknown ids, other methods, and a payload over the queue's batch size.
    assert requests.get(f"{url}/0123456789abcdef", timeout=TIMEOUT).status_code == 404
    assert requests.get(f"{url}/{'z' * 5000}", timeout=TIMEOUT).status_code == 404
    assert requests.put(url, data=b"x", timeout=TIMEOUT).status_code == 405
    big = requests.post(url, data=b"x" * (300 * 1024), headers={"Content-Type": "application/octet-stream"},
                        timeout=TIMEOUT)
    assert big.status_code == 413, big.text


def replica_of(backend):
    return wait_for(lambda: next((r for r in serve.status()["replicas"]
                                  if r["backend"] == backend and r["state"] == "running"), None),
                    timeout=TIMEOUT, what=f"a running replica of {backend}")


def test_a_queued_async_submission_survives_its_replica_and_the_head(async_api, cluster, monkeypatch):
    url, gate = async_api
    running = submit_async(url)
    wait_workload(url, running, "in_progress")
    queued = submit_async(url)
    # The replica dies (the one running a submission): its restarted
    # process takes its lease back and the queue keeps the other.
    old = replica_of("async-iris-classifier")
    os.kill(old["pid"], signal.SIGKILL)
    wait_for(lambda: replica_of("async-iris-classifier")["pid"] != old["pid"], timeout=TIMEOUT,
             what="the replica to restart")
    assert workload(url, queued)["status"] in ("in_queue", "in_progress")
    # The whole head goes (its replicas with it) and starts again on its data dir.
    cluster.kill()
    wait_for(lambda: not _alive(old["pid"]), what="the old processes to go")
    _core.disconnect()
    flags = serve._head_flags(serve._given_http_options({"port": cluster.http_port}))
    out = subprocess.run([sys.executable, "-m", "serval.cli", "--data-dir", cluster.data_dir, "start", "--head",
                          "--detach", *flags], capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stdout + out.stderr
    serve.connect(data_dir=cluster.data_dir)
    gate.touch()
    assert wait_workload(url, queued, "completed", timeout=120)["result"]["label"] == "setosa"
    assert wait_workload(url, running, "completed", timeout=120)["result"]["label"] == "setosa"


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- TaskAPI ----------------------------------------------------------------------

# Cortex's trainer task, training a nearest-centroid "model" on a few iris
# rows and writing it to config["dest_dir"]; config["fail"] raises,
# config["block"] runs until the job is stopped, config["hog"] holds 400 MiB.
TASK = '''
import json, os, time


class Task:
    def __call__(self, config):
        if config.get("fail"):
            raise RuntimeError("training failed: " + config["fail"])
        if config.get("hog"):
            hog = b"x" * (400 * 1024 * 1024)  # written, so resident
            while True:
                time.sleep(0.05)
        os.makedirs(config["dest_dir"], exist_ok=True)
        if config.get("block"):
            open(os.path.join(config["dest_dir"], "started-%d" % os.getpid()), "w").close()
            while True:
                time.sleep(0.05)
        rows = {"setosa": [[5.1, 3.5, 1.4, 0.2], [4.9, 3.0, 1.4, 0.2]],
                "virginica": [[6.3, 3.3, 6.0, 2.5], [5.8, 2.7, 5.1, 1.9]]}
        model = {label: [sum(c) / len(c) for c in zip(*xs)] for label, xs in rows.items()}
        with open(os.path.join(config["dest_dir"], "model-%d.json" % os.getpid()), "w") as f:
            json.dump({"model": model, "config": config}, f)
'''

TASK_CONFIG = """- name: trainer
  kind: TaskAPI
  definition:
    path: task.py
    config: {from_api: 1}
  compute:
    cpu: 200m
    mem: 500Mi
"""

TASK_SPEC_FIELDS = {"job_id", "api_name", "kind", "workers", "config", "timeout", "api_id", "created_time"}
TASK_STATUS_FIELDS = TASK_SPEC_FIELDS | {"start_time", "end_time", "status", "worker_counts", "error"}


@pytest.fixture
def task_api(cluster, tmp_path):
    write_project(tmp_path / "task", {"task.py": TASK, "cortex.yaml": TASK_CONFIG})
    out = cli(cluster, "deploy", str(tmp_path / "task"))
    assert out.returncode == 0, out.stdout + out.stderr
    return f"{cluster.url}/trainer"


def submit_task(url, body):
    r = requests.post(url, json=body, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    spec = r.json()
    assert set(spec) == TASK_SPEC_FIELDS and spec["kind"] == "TaskAPI", spec
    return spec


def task_status(url, job_id):
    r = requests.get(url, params={"jobID": job_id}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert set(answer) == {"job_status", "endpoint", "api_spec"}, answer
    assert set(answer["job_status"]) == TASK_STATUS_FIELDS, answer
    return answer["job_status"]


def wait_task(url, job_id, status, timeout=TIMEOUT):
    return wait_for(lambda: (lambda s: s if s["status"] == status else None)(task_status(url, job_id)),
                    timeout=timeout, what=f"task job {job_id} to be {status}")


def task_workers(job_id):
    return [r for r in serve.status()["replicas"] if r["backend"] == f"trainer--job-{job_id}"]


def test_a_task_job_runs_the_task_once_per_worker_and_succeeds(task_api, cluster, tmp_path):
    dest = str(tmp_path / "models")
    spec = submit_task(task_api, {"workers": 2, "config": {"dest_dir": dest}, "timeout": 300})
    assert (spec["workers"], spec["config"], spec["timeout"], spec["api_name"]) == \
        (2, {"dest_dir": dest}, 300, "trainer")
    st = wait_task(task_api, spec["job_id"], "status_succeeded", timeout=120)
    assert st["end_time"] and st["worker_counts"] is None, st
    models = [json.load(open(os.path.join(dest, f))) for f in os.listdir(dest)]
    # Each worker ran it once, with the API's config under the job's.
    assert len(models) == 2, os.listdir(dest)
    assert models[0]["config"] == {"from_api": 1, "dest_dir": dest}
    assert models[0]["model"]["setosa"] == [5.0, 3.25, 1.4, 0.2]
    wait_for(lambda: not task_workers(spec["job_id"]), timeout=TIMEOUT, what="the workers to go")
    # Cortex's Python client shows the API's jobs and reads one.
    import cortex

    cx = cortex.client()
    assert [j["job_id"] for j in cx.get_api("trainer")["task_job_statuses"]] == [spec["job_id"]]
    assert cx.get_job("trainer", spec["job_id"])["job_status"]["status"] == "status_succeeded"
    # And `serve jobs`, as a BatchAPI's.
    out = cli(cluster, "jobs", "get", "trainer", spec["job_id"])
    assert out.returncode == 0 and json.loads(out.stdout)["job_status"]["status"] == "status_succeeded", out.stderr


def test_a_failing_task_is_a_worker_error_and_a_stopped_one_stops(task_api, tmp_path):
    failing = submit_task(task_api, {"config": {"fail": "no data"}})
    assert failing["workers"] == 1
    st = wait_task(task_api, failing["job_id"], "status_worker_error", timeout=120)
    assert "training failed: no data" in st["error"], st

    dest = tmp_path / "blocked"
    blocked = submit_task(task_api, {"config": {"dest_dir": str(dest), "block": True}})
    wait_for(lambda: dest.is_dir() and any(f.startswith("started-") for f in os.listdir(dest)), timeout=120,
             what="the task to start")
    assert task_status(task_api, blocked["job_id"])["status"] == "status_running"
    r = requests.delete(task_api, params={"jobID": blocked["job_id"]}, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json() == {"message": f"stopped job {blocked['job_id']}"}, r.text
    assert task_status(task_api, blocked["job_id"])["status"] == "status_stopped"
    wait_for(lambda: not task_workers(blocked["job_id"]), timeout=TIMEOUT, what="the workers to go")

    # Past its timeout: timed out, its workers removed.
    timed = submit_task(task_api, {"config": {"dest_dir": str(dest), "block": True}, "timeout": 1})
    st = wait_task(task_api, timed["job_id"], "status_timed_out", timeout=120)
    assert "timeout" in st["error"], st
    wait_for(lambda: not task_workers(timed["job_id"]), timeout=TIMEOUT, what="the workers to go")

    bad = requests.post(task_api, json={"workers": 0}, timeout=TIMEOUT)
    assert bad.status_code == 400 and "workers" in bad.json()["error"], bad.text


def test_a_task_over_compute_mem_ends_the_job_out_of_memory(cluster, tmp_path):
    config = TASK_CONFIG.replace("name: trainer", "name: hungry").replace("mem: 500Mi", "mem: 300Mi")
    write_project(tmp_path / "hungry", {"task.py": TASK, "cortex.yaml": config})
    out = cli(cluster, "deploy", str(tmp_path / "hungry"))
    assert out.returncode == 0, out.stdout + out.stderr
    url = f"{cluster.url}/hungry"
    job = submit_task(url, {"config": {"hog": True}})
    st = wait_task(url, job["job_id"], "status_worker_oom", timeout=120)
    assert "compute.mem of 300 MiB" in st["error"], st


@pytest.mark.parametrize("yaml_text, words", [
    ("- name: t\n  kind: TaskAPI\n  definition: {config: {}}\n", "definition.path: required"),
    ("- name: t\n  kind: TaskAPI\n  definition: {path: task.py}\n  handler: {path: task.py}\n",
     "handler: unknown key for a TaskAPI"),
    ("- name: a\n  kind: AsyncAPI\n  handler: {path: task.py, server_side_batching: "
     "{max_batch_size: 2, batch_interval: 1s}}\n", "handler.server_side_batching"),
    # A tensorflow Handler runs there on handler.models (tests_tensorflow);
    # the RealtimeAPI's exported-model shapes do not.
    ("- name: a\n  kind: AsyncAPI\n  handler: {type: tensorflow, path: task.py, model_path: .}\n",
     "handler.models: required: with handler.type tensorflow, an AsyncAPI runs a Handler"),
    ("- name: b\n  kind: BatchAPI\n  handler: {type: tensorflow, path: task.py}\n",
     "handler.models: required: with handler.type tensorflow, a BatchAPI runs a Handler"),
    ("- name: b\n  kind: BatchAPI\n  handler: {type: onnx, model_path: task.py}\n",
     "handler.type: a BatchAPI runs a python or tensorflow Handler"),
    ("- name: a\n  kind: AsyncAPI\n  handler: {type: onnx, model_path: task.py}\n",
     "handler.type: an AsyncAPI runs a python or tensorflow Handler"),
])
def test_async_and_task_configs_are_checked(tmp_path, yaml_text, words):
    from serval.cortex.config import ConfigError, load_config

    write_project(tmp_path, {"task.py": TASK, "cortex.yaml": yaml_text})
    with pytest.raises(ConfigError, match=words):
        load_config(str(tmp_path))


def test_a_tensorflow_handler_is_a_batch_or_async_api_s_handler(tmp_path):
    # Cortex's batch/tensorflow and async/tensorflow shapes (served by
    # tests_tensorflow/test_cortex_tensorflow.py, which has TensorFlow).
    from serval.cortex.config import load_config

    handler = "  handler: {type: tensorflow, path: task.py, config: {k: v}, models: {path: model}}\n"
    write_project(tmp_path, {"task.py": TASK, "model/saved_model.pb": "",
                             "cortex.yaml": f"- name: a\n  kind: AsyncAPI\n{handler}"
                                            f"- name: b\n  kind: BatchAPI\n{handler}"})
    apis = load_config(str(tmp_path))[1]
    assert [(a["kind"], a["handler"]["type"], a["handler"]["path"], a["handler"]["config"]) for a in apis] == \
        [("AsyncAPI", "tensorflow", "task.py", {"k": "v"}), ("BatchAPI", "tensorflow", "task.py", {"k": "v"})]
    assert all(a["handler"]["models"] for a in apis), apis
