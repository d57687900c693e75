"""Seed 001, Batch APIs: ``kind: BatchAPI`` deployed with `serve deploy`;
jobs submitted over HTTP (and the CLI), their batches kept in the cluster's
replicated store, run by worker replicas started per job."""

import http.server
import json
import os
import signal
import threading
import time

import pytest
import requests

from serval import serve
from test_cortex_deploy import cli
from test_cortex_handler import wait_for, write_project

TIMEOUT = 60

# Each batch writes its sum to <out>/<batch_id>.json; on_job_complete adds
# them up (once: it appends a line to complete.log).
HANDLER = '''
import json, os, time

class Handler:
    def __init__(self, config, job_spec):
        self.out = config["out"]
        self.config = config
        os.makedirs(self.out, exist_ok=True)
        with open(os.path.join(self.out, f"spec-{os.getpid()}.json"), "w") as f:
            json.dump({"config": config, "job_spec": job_spec}, f)

    def handle_batch(self, payload, batch_id):
        while self.config.get("gate") and not os.path.exists(self.config["gate"]):
            time.sleep(0.05)  # until the test opens the gate
        if self.config.get("fail_on") in payload:
            raise ValueError(f"cannot take {self.config['fail_on']}")
        if self.config.get("block_on") in payload:
            first = os.path.join(self.out, "first-attempt")
            if not os.path.exists(first):
                print(f"blocking on {batch_id}", flush=True)
                with open(first, "w") as f:
                    f.write(str(os.getpid()))
                while True:  # until the test kills this worker
                    time.sleep(0.05)
        total = sum(x if isinstance(x, int) else x["n"] for x in payload)
        with open(os.path.join(self.out, f"{batch_id}.json"), "w") as f:
            json.dump({"sum": total, "n": len(payload)}, f)

    def on_job_complete(self):
        sums = []
        for name in os.listdir(self.out):
            if name.endswith(".json") and not name.startswith(("spec-", "total")):
                with open(os.path.join(self.out, name)) as f:
                    sums.append(json.load(f)["sum"])
        with open(os.path.join(self.out, "total.json"), "w") as f:
            json.dump({"sum": sum(sums), "batches": len(sums)}, f)
        with open(os.path.join(self.out, "complete.log"), "a") as f:
            f.write("done\\n")
'''

CONFIG = """- name: summer
  kind: BatchAPI
  handler:
    path: handler.py
    config: {a: 1, b: 1}
"""


@pytest.fixture
def batch_api(cluster, tmp_path):
    # The test's own folder and loopback servers: what its jobs read.
    allowed = f'  jobs: {{allowed_sources: ["{tmp_path.resolve()}/", "http://127.0.0.1:"]}}\n'
    write_project(tmp_path / "project", {"handler.py": HANDLER, "serve.yaml": CONFIG + allowed})
    out = cli(cluster, "deploy", str(tmp_path / "project"))
    assert out.returncode == 0, out.stdout + out.stderr
    return f"{cluster.url}/summer"


def submit(url, body, **params):
    return requests.post(url, json=body, params=params, timeout=TIMEOUT)


#: The fields of Cortex 0.35's answers: a submission (its BatchJob spec) and
#: a job's status (BatchJobStatus, which Serval adds "error" to).
JOB_SPEC_FIELDS = {"job_id", "api_name", "kind", "workers", "sqs_dead_letter_queue", "config", "timeout", "api_id",
                   "sqs_url", "created_time"}
JOB_STATUS_FIELDS = JOB_SPEC_FIELDS | {"total_batch_count", "start_time", "end_time", "status", "batches_in_queue",
                                       "batch_metrics", "worker_counts", "error"}


def job_status(url, job_id):
    """``GET ?jobID=``'s ``job_status``, checking the answer's shape."""
    r = requests.get(url, params={"jobID": job_id}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert set(answer) == {"job_status", "endpoint", "api_spec"}, answer
    assert set(answer["job_status"]) == JOB_STATUS_FIELDS, answer
    return answer["job_status"]


def wait_ended(url, job_id, timeout=120):
    return wait_for(lambda: (lambda s: s if s["status"] not in ("status_enqueuing", "status_running") else None)(
        job_status(url, job_id)), timeout=timeout, what=f"job {job_id} to end")


def workers_of(job_id):
    return [r for r in serve.status()["replicas"] if r["backend"] == f"summer--job-{job_id}"]


def test_a_job_runs_every_batch_once_then_on_job_complete(batch_api, cluster, tmp_path):
    out_dir = str(tmp_path / "out")
    r = submit(batch_api, {"workers": 2, "config": {"out": out_dir, "b": 2},
                           "item_list": {"items": list(range(100)), "batch_size": 10}})
    assert r.status_code == 200, r.text
    # Cortex 0.35's answer: the job's spec, field by field.
    answer = r.json()
    assert set(answer) == JOB_SPEC_FIELDS, answer
    assert answer["api_name"] == "summer" and answer["kind"] == "BatchAPI" and answer["workers"] == 2
    assert answer["config"] == {"out": out_dir, "b": 2} and answer["timeout"] is None
    assert answer["sqs_dead_letter_queue"] == {"arn": "", "max_receive_count": 1} and answer["sqs_url"] is None
    assert answer["created_time"].endswith("Z") and answer["job_id"] and answer["api_id"]
    job_id = answer["job_id"]

    # Cortex's end-to-end check, as it reads the status.
    wait_for(lambda: requests.get(batch_api, params={"jobID": job_id}, timeout=TIMEOUT).json()
             ["job_status"]["status"] == "status_succeeded", timeout=120, what="the job to succeed")
    got = requests.get(batch_api, params={"jobID": job_id}, timeout=TIMEOUT).json()
    assert got["endpoint"] == f"{batch_api}?jobID={job_id}", got
    assert got["api_spec"]["name"] == "summer" and got["api_spec"]["kind"] == "BatchAPI", got
    assert "dotenv_blob" not in got["api_spec"]
    st = got["job_status"]
    assert {k: st[k] for k in JOB_SPEC_FIELDS} == answer, st
    assert st["worker_counts"] is None and st["error"] is None, st  # ended: no workers, no failure
    assert st["batch_metrics"]["succeeded"] == 10 and st["batch_metrics"]["failed"] == 0, st
    assert st["batches_in_queue"] == 0 and st["total_batch_count"] == 10
    assert st["start_time"] and st["end_time"]
    total = json.load(open(os.path.join(out_dir, "total.json")))
    assert total == {"sum": sum(range(100)), "batches": 10}
    assert open(os.path.join(out_dir, "complete.log")).read() == "done\n"
    # Handler(config, job_spec): the job's config over the API's.
    specs = [json.load(open(os.path.join(out_dir, f))) for f in os.listdir(out_dir) if f.startswith("spec-")]
    assert specs and all(s["config"] == {"a": 1, "b": 2, "out": out_dir} for s in specs)
    spec = specs[0]["job_spec"]
    assert (spec["job_id"], spec["api_name"], spec["workers"], spec["total_batch_count"]) == \
        (job_id, "summer", 2, 10)
    assert spec["config"] == {"out": out_dir, "b": 2} and spec["start_time"]
    # The workers are gone once the job ended.
    wait_for(lambda: not workers_of(job_id), what="the workers to be removed")
    # The job is listed: its job_status.
    listed = requests.get(batch_api, timeout=TIMEOUT).json()
    assert [j["job_id"] for j in listed] == [job_id] and set(listed[0]) == JOB_STATUS_FIELDS, listed


def test_a_failing_batch_ends_in_the_dead_letters(batch_api, cluster, tmp_path):
    out_dir = str(tmp_path / "out")
    r = submit(batch_api, {"workers": 1, "max_receive_count": 2, "config": {"out": out_dir, "fail_on": 13},
                           "item_list": {"items": list(range(30)), "batch_size": 10}})
    job_id = r.json()["job_id"]
    st = wait_ended(batch_api, job_id)
    assert st["status"] == "status_completed_with_failures", st
    assert (st["batch_metrics"]["succeeded"], st["batch_metrics"]["failed"]) == (2, 1)
    r = requests.get(batch_api, params={"jobID": job_id, "deadLetters": "true"}, timeout=TIMEOUT)
    (letter,) = r.json()
    assert letter["payload"] == list(range(10, 20)) and letter["receive_count"] == 2
    assert "cannot take 13" in letter["error"]
    # on_job_complete still ran once, over the batches that succeeded.
    assert json.load(open(os.path.join(out_dir, "total.json")))["batches"] == 2


def test_a_killed_worker_s_batch_runs_again_and_counts_once(batch_api, cluster, tmp_path):
    out_dir = str(tmp_path / "out")
    r = submit(batch_api, {"workers": 2, "config": {"out": out_dir, "block_on": 42},
                           "item_list": {"items": list(range(100)), "batch_size": 10}})
    job_id = r.json()["job_id"]
    first = os.path.join(out_dir, "first-attempt")
    wait_for(lambda: os.path.exists(first) and open(first).read(), what="a worker to take the blocking batch")
    os.kill(int(open(first).read()), signal.SIGKILL)
    st = wait_ended(batch_api, job_id)
    assert st["status"] == "status_succeeded", st
    assert st["batch_metrics"]["succeeded"] == 10 and st["batch_metrics"]["failed"] == 0
    assert json.load(open(os.path.join(out_dir, "total.json"))) == {"sum": sum(range(100)), "batches": 10}


def test_stopping_a_job_and_the_cli(batch_api, cluster, tmp_path):
    out_dir = str(tmp_path / "out")
    lines = tmp_path / "data" / "part-1.jsonl"
    lines.parent.mkdir()
    lines.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(25)))
    body = tmp_path / "job.json"
    body.write_text(json.dumps({"workers": 1, "config": {"out": out_dir},
                                "delimited_files": {"paths": [str(lines.parent)], "includes": ["*.jsonl"],
                                                    "batch_size": 10}}))
    out = cli(cluster, "jobs", "submit", "summer", str(body))
    assert out.returncode == 0, out.stderr
    job_id = json.loads(out.stdout)["job_id"]
    out = cli(cluster, "jobs", "get", "summer", job_id)
    assert out.returncode == 0 and json.loads(out.stdout)["job_status"]["job_id"] == job_id
    st = wait_ended(batch_api, job_id)
    assert st["status"] == "status_succeeded" and st["batch_metrics"]["succeeded"] == 3
    assert json.load(open(os.path.join(out_dir, "total.json")))["sum"] == sum(range(25))
    # A dry run lists the files.
    out = cli(cluster, "jobs", "submit", "summer", str(body), "--dry-run")
    assert json.loads(out.stdout)["targets"] == [str(lines)]

    # A job that blocks forever, stopped.
    r = submit(batch_api, {"workers": 1, "config": {"out": str(tmp_path / "out2"), "block_on": 1},
                           "item_list": {"items": [1], "batch_size": 1}})
    job_id = r.json()["job_id"]
    wait_for(lambda: os.path.exists(tmp_path / "out2" / "first-attempt"), what="the blocking batch")
    # The job's worker logs, through the CLI.
    wait_for(lambda: f"blocking on {job_id}-0" in cli(cluster, "jobs", "logs", "summer", job_id,
                                                      "--no-follow").stdout, what="the worker's log line")
    out = cli(cluster, "jobs", "stop", "summer", job_id)
    assert out.returncode == 0 and json.loads(out.stdout) == {"message": f"stopped job {job_id}"}
    assert job_status(batch_api, job_id)["status"] == "status_stopped"
    wait_for(lambda: not workers_of(job_id), what="the stopped job's workers to go")
    out = cli(cluster, "jobs", "list", "summer")
    assert {j["status"] for j in json.loads(out.stdout)} == {"status_succeeded", "status_stopped"}


@pytest.mark.parametrize("body, words", [
    ({"item_list": {"items": [1], "batch_size": 1}}, "workers: required"),
    ({"workers": 1}, "exactly one of item_list"),
    ({"workers": 1, "item_list": {"items": [1]}, "file_path_lister": {"paths": ["/"], "batch_size": 1}},
     "exactly one of item_list"),
    ({"workers": 1, "item_list": {"items": [1]}}, "item_list.batch_size"),
    ({"workers": 1, "item_list": {"items": ["x" * 300_000], "batch_size": 1}}, "256 KiB"),
    ({"workers": 1, "max_receive_count": 0, "item_list": {"items": [1], "batch_size": 1}}, "max_receive_count"),
    ({"workers": 1, "file_path_lister": {"paths": ["/no/such/dir"], "batch_size": 1}},
     "file_path_lister.paths: '/no/such/dir' is not under the API's jobs.allowed_sources"),
])
def test_bad_job_requests_are_400s_that_name_the_field(batch_api, body, words):
    r = submit(batch_api, body)
    if r.status_code == 200:  # the batch-size check runs while enqueuing
        st = wait_ended(batch_api, r.json()["job_id"])
        assert st["status"] == "status_enqueue_failed" and words in st["error"], st
        return
    assert r.status_code == 400 and words in r.json()["error"], r.text


def test_a_job_over_the_workers_cap_is_a_400_and_creates_nothing(batch_api):
    r = submit(batch_api, {"workers": 300_000, "item_list": {"items": [1], "batch_size": 1}})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "workers" in error and "300000" in error and "cap of 256" in error, error
    jobs = requests.get(batch_api, timeout=TIMEOUT).json()
    assert not [j for j in jobs if j["workers"] == 300_000], jobs
    assert not [r for r in serve.status()["replicas"] if r["backend"].startswith("summer--job-")
                and r["state"] == "pending"]


def test_malformed_and_unknown(batch_api):
    r = requests.post(batch_api, data=b"{nope", timeout=TIMEOUT)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = requests.get(batch_api, params={"jobID": "no-such-job"}, timeout=TIMEOUT)
    assert r.status_code == 404 and "no-such-job" in r.json()["error"]
    r = requests.put(batch_api, timeout=TIMEOUT)
    assert r.status_code == 405


def test_a_batch_api_config_is_checked(tmp_path):
    from serval.cortex.config import ConfigError, load_config

    write_project(tmp_path, {"handler.py": HANDLER,
                             "serve.yaml": CONFIG + "  autoscaling: {min_replicas: 2}\n"})
    with pytest.raises(ConfigError, match=r'api "summer": autoscaling: unknown key for a BatchAPI'):
        load_config(str(tmp_path))
    write_project(tmp_path, {"handler.py": HANDLER, "serve.yaml": CONFIG.replace("path: handler.py",
                                                                                  "path: nope.py")})
    with pytest.raises(ConfigError, match=r'api "summer": handler.path'):
        load_config(str(tmp_path))



def test_a_job_past_its_timeout_ends_timed_out(batch_api, tmp_path):
    r = submit(batch_api, {"workers": 1, "timeout": 1, "config": {"out": str(tmp_path / "out"), "block_on": 1},
                           "item_list": {"items": [1, 2], "batch_size": 1}})
    job_id = r.json()["job_id"]
    st = wait_ended(batch_api, job_id)
    assert st["status"] == "status_timed_out" and "timeout of 1 s" in st["error"], st
    wait_for(lambda: not workers_of(job_id), what="the timed-out job's workers to go")


def test_the_example_counts_words(cluster, tmp_path):
    example = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "batch")
    out = cli(cluster, "deploy", example)
    assert out.returncode == 0, out.stdout + out.stderr
    url = f"{cluster.url}/word-count"
    body = {"workers": 2, "config": {"out": str(tmp_path / "wc")},
            "delimited_files": {"paths": ["data"], "includes": ["*.jsonl"], "batch_size": 50}}
    job_id = submit(url, body).json()["job_id"]
    st = wait_ended(url, job_id)
    assert st["status"] == "status_succeeded" and st["batch_metrics"]["succeeded"] == 4, st
    totals = json.load(open(tmp_path / "wc" / "totals.json"))
    assert totals["job_id"] == job_id
    assert dict(totals["top"])["the"] == 150  # 3 of every 4 records, 200 records: 50 x 2 + 50 x 1


HUNGRY = '''
import time

class Handler:
    def __init__(self, config, job_spec):
        pass

    def handle_batch(self, payload):
        hog = b"x" * (400 * 1024 * 1024)  # written, so resident
        while True:
            time.sleep(0.05)
'''


def test_a_worker_over_compute_mem_ends_the_job_out_of_memory(cluster, tmp_path):
    config = "- name: hungry\n  kind: BatchAPI\n  handler: {path: handler.py}\n  compute: {mem: 300Mi}\n"
    write_project(tmp_path / "hungry", {"handler.py": HUNGRY, "serve.yaml": config})
    out = cli(cluster, "deploy", str(tmp_path / "hungry"))
    assert out.returncode == 0, out.stdout + out.stderr
    url = f"{cluster.url}/hungry"
    job_id = submit(url, {"workers": 1, "item_list": {"items": [1], "batch_size": 1}}).json()["job_id"]
    st = wait_ended(url, job_id)
    assert st["status"] == "status_worker_oom" and "compute.mem of 300 MiB" in st["error"], st
    wait_for(lambda: not [r for r in serve.status()["replicas"] if r["backend"] == f"hungry--job-{job_id}"],
             what="the workers to go")


def gateway():
    """The BatchAPI's gateway replica (backend "summer"), once it runs."""
    return wait_for(lambda: next((r for r in serve.status()["replicas"]
                                  if r["backend"] == "summer" and r["state"] == "running"), None),
                    timeout=TIMEOUT, what="the gateway to run")


def kill_gateway():
    """SIGKILLs the gateway and returns once its restarted process runs."""
    old = gateway()
    os.kill(old["pid"], signal.SIGKILL)
    wait_for(lambda: gateway()["pid"] != old["pid"], timeout=TIMEOUT, what="the gateway to restart")


def test_a_restarted_gateway_looks_after_a_running_job(batch_api, cluster, tmp_path):
    out_dir, gate = str(tmp_path / "out"), tmp_path / "gate"
    job_id = submit(batch_api, {"workers": 2, "config": {"out": out_dir, "gate": str(gate)},
                                "item_list": {"items": list(range(40)), "batch_size": 4}}).json()["job_id"]
    wait_for(lambda: job_status(batch_api, job_id)["status"] == "status_running", what="the job to run")
    kill_gateway()
    gate.touch()
    st = wait_ended(batch_api, job_id)
    assert st["status"] == "status_succeeded" and st["batch_metrics"]["succeeded"] == 10, st
    assert json.load(open(os.path.join(out_dir, "total.json"))) == {"sum": sum(range(40)), "batches": 10}
    # The old gateway's watch died with it: the new one removes the workers.
    wait_for(lambda: not workers_of(job_id), what="the job's workers to go")


def test_a_job_whose_gateway_dies_while_enqueuing_fails_while_enqueuing(batch_api, cluster, tmp_path):
    release = threading.Event()

    class Stalling(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # two records, then nothing until the test ends
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"n": 1}\n{"n": 2}\n')
            self.wfile.flush()
            release.wait(TIMEOUT)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stalling)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/records.jsonl"
        job_id = submit(batch_api, {"workers": 1, "config": {"out": str(tmp_path / "out")},
                                    "delimited_files": {"paths": [url], "batch_size": 1}}).json()["job_id"]
        assert job_status(batch_api, job_id)["status"] == "status_enqueuing"
        kill_gateway()
        st = wait_ended(batch_api, job_id)
        assert st["status"] == "status_enqueue_failed", st
        assert "submit the job again" in st["error"], st
        assert not workers_of(job_id)
    finally:
        release.set()
        server.shutdown()


def test_a_dry_run_waiting_on_a_url_does_not_hold_up_the_gateway(batch_api):
    # The dry run checks that its URL answers; the server holds that
    # request until the test has seen the gateway answer another one.
    asked, release = threading.Event(), threading.Event()

    class Holding(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked.set()
            release.wait(TIMEOUT)
            self.send_response(404 if self.path == "/missing" else 200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Holding)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    dry = {}
    try:
        body = {"workers": 1, "delimited_files": {"paths": [f"{base}/records.jsonl"], "batch_size": 1}}
        runner = threading.Thread(target=lambda: dry.update(r=submit(batch_api, body, dryRun="true")))
        runner.start()
        assert asked.wait(TIMEOUT), "the dry run never asked for its URL"
        # The gateway's one replica answers while its dry run waits.
        r = requests.get(batch_api, timeout=TIMEOUT)
        assert r.status_code == 200 and isinstance(r.json(), list), r.text
        assert not dry, f"the gateway answered only once the dry run had ended: {dry}"
        release.set()
        runner.join(TIMEOUT)
        assert dry["r"].status_code == 200 and dry["r"].json()["targets"] == [f"{base}/records.jsonl"], dry
        # A URL that does not answer 200 is the dry run's 400, naming it.
        r = submit(batch_api, {"workers": 1, "delimited_files": {"paths": [f"{base}/missing"], "batch_size": 1}},
                   dryRun="true")
        assert r.status_code == 400 and f"{base}/missing" in r.json()["error"] and "404" in r.json()["error"], r.text
    finally:
        release.set()
        server.shutdown()
        server.server_close()


# -- what a job may read ---------------------------------------------------------

TWO_APIS = """- name: closed
  kind: BatchAPI
  handler: {path: handler.py}
- name: open
  kind: BatchAPI
  handler: {path: handler.py}
  jobs:
    allowed_sources: ["ALLOWED/", "URL/ok/"]
    max_batches: 3
"""


class Recording(http.server.BaseHTTPRequestHandler):
    """Serves a JSON line at /ok/..., redirects /ok/redirect to /other/x,
    and records every path asked for."""
    paths = []

    def do_GET(self):
        Recording.paths.append(self.path)
        if self.path == "/ok/redirect":
            self.send_response(302)
            self.send_header("Location", "/other/x")
            self.end_headers()
            return
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'{"n": 1}\n')

    def log_message(self, *args):
        pass


def test_jobs_read_only_the_sources_the_api_allows(cluster, tmp_path):
    secret, allowed = tmp_path / "secret", tmp_path / "allowed"
    secret.mkdir()
    allowed.mkdir()
    (secret / "key.jsonl").write_text('{"n": 41}\n')
    (allowed / "a.jsonl").write_text('{"n": 1}\n')
    Recording.paths = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recording)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        write_project(tmp_path / "project", {"handler.py": HANDLER, "serve.yaml": TWO_APIS.replace(
            "ALLOWED", str(allowed.resolve())).replace("URL", base)})
        out = cli(cluster, "deploy", str(tmp_path / "project"))
        assert out.returncode == 0, out.stdout + out.stderr
        closed, opened = f"{cluster.url}/closed", f"{cluster.url}/open"

        # No jobs.allowed_sources: no file, folder or URL, dry run or not.
        for params in ({}, {"dryRun": "true"}):
            r = submit(closed, {"workers": 1, "file_path_lister": {"paths": [str(secret)], "batch_size": 1}},
                       **params)
            assert r.status_code == 400, r.text
            assert ("file_path_lister.paths" in r.json()["error"] and str(secret) in r.json()["error"]
                    and "jobs.allowed_sources" in r.json()["error"]), r.text
            r = submit(closed, {"workers": 1, "delimited_files": {"paths": [f"{base}/ok/a"], "batch_size": 1}},
                       **params)
            assert r.status_code == 400 and "delimited_files.paths" in r.json()["error"], r.text
        assert Recording.paths == []

        # Allowed: the folder listed; outside it, by .. or by a link, refused.
        r = submit(opened, {"workers": 1, "file_path_lister": {"paths": [str(allowed)], "batch_size": 1}},
                   dryRun="true")
        assert r.status_code == 200 and r.json()["targets"] == [str(allowed / "a.jsonl")], r.text
        r = submit(opened, {"workers": 1, "file_path_lister": {"paths": [str(allowed / ".." / "secret")],
                                                               "batch_size": 1}}, dryRun="true")
        assert r.status_code == 400 and "not under the API's jobs.allowed_sources" in r.json()["error"], r.text
        os.symlink(secret / "key.jsonl", allowed / "link.jsonl")
        r = submit(opened, {"workers": 1, "delimited_files": {"paths": [str(allowed)], "batch_size": 1}},
                   dryRun="true")
        assert r.status_code == 400 and str(allowed / "link.jsonl") in r.json()["error"], r.text
        os.unlink(allowed / "link.jsonl")
        r = submit(opened, {"workers": 1, "delimited_files": {"paths": [f"{base}/other/x"], "batch_size": 1}})
        assert r.status_code == 400 and f"{base}/other/x" in r.json()["error"], r.text
        # A redirect out of the allowed URLs is not followed.
        r = submit(opened, {"workers": 1, "delimited_files": {"paths": [f"{base}/ok/redirect"], "batch_size": 1}})
        assert r.status_code == 200, r.text
        st = wait_ended(opened, r.json()["job_id"])
        assert st["status"] == "status_enqueue_failed" and f"{base}/other/x" in st["error"], st
        assert Recording.paths == ["/ok/redirect"]
        # jobs.max_batches bounds a job.
        r = submit(opened, {"workers": 1, "item_list": {"items": [1, 2, 3, 4], "batch_size": 1}})
        assert r.status_code == 400 and "jobs.max_batches is 3" in r.json()["error"], r.text
    finally:
        server.shutdown()
        server.server_close()


def test_ended_jobs_are_removed_after_the_api_s_retention(cluster, tmp_path):
    config = CONFIG.replace("summer", "brief") + "  jobs: {retention: 1s}\n"
    write_project(tmp_path / "project", {"handler.py": HANDLER, "serve.yaml": config})
    out = cli(cluster, "deploy", str(tmp_path / "project"))
    assert out.returncode == 0, out.stdout + out.stderr
    url = f"{cluster.url}/brief"

    def stopped_job():
        r = submit(url, {"workers": 1, "item_list": {"items": [1], "batch_size": 1}})
        assert r.status_code == 200, r.text
        job_id = r.json()["job_id"]
        assert requests.delete(url, params={"jobID": job_id}, timeout=TIMEOUT).status_code == 200
        return job_id

    first = stopped_job()
    assert job_status(url, first)["status"] == "status_stopped"
    # Ended jobs go when a job is created past their retention (1 s here;
    # 24 h by default, which keeps every other test's jobs).
    def removed():
        time.sleep(0.25)  # pacing: each try creates a job
        return stopped_job() and requests.get(url, params={"jobID": first}, timeout=TIMEOUT).status_code == 404

    wait_for(removed, timeout=60, what=f"job {first} to be removed")
    cli(cluster, "delete", "brief")


@pytest.mark.parametrize("jobs, field", [
    ("{allowed_sources: [https://host]}", "jobs.allowed_sources[0]: a URL prefix must name its whole host"),
    ("{allowed_sources: [/data/, s3://bucket/]}", "jobs.allowed_sources[1]: must be an http(s) URL prefix"),
    ("{allowed_sources: [../outside]}", "jobs.allowed_sources[0]: a relative path must stay inside"),
    ("{allowed_sources: /data/}", "jobs.allowed_sources: must be a list"),
    ("{max_batches: 0}", "jobs.max_batches: must be at least 1"),
    ("{max_bytes: lots}", "jobs.max_bytes: must be a memory quantity"),
    ("{sources: []}", "jobs.sources: unknown key"),
    ("{retention: 0s}", "jobs.retention: must be from 1s to 720h"),
    ("{retention: 721h}", "jobs.retention: must be from 1s to 720h"),
])
def test_bad_jobs_config_is_named(tmp_path, jobs, field):
    from serval.cortex.config import ConfigError, load_config

    write_project(tmp_path, {"handler.py": HANDLER, "serve.yaml": CONFIG + f"  jobs: {jobs}\n"})
    with pytest.raises(ConfigError) as e:
        load_config(str(tmp_path))
    assert f'api "summer": {field}' in str(e.value)
