"""`serve logs NAME` and Client.stream_api_logs against a real cluster: the
replica's stderr file is read through the replica (Logs frames), JSON lines
of serval.log and plain prints alike, and `serve logs` keeps following."""

import json
import queue
import subprocess
import sys
import threading
import time

import requests

import serval

from test_cortex_deploy import CONFIG, cli, write_project

LOGGING_HANDLER = '''
from serval.log import logger


class Handler:
    def __init__(self, config):
        pass

    def handle_post(self, payload):
        logger.info("got payload", extra={"payload": payload})
        print("printed", payload["value"])
        return {"ok": payload["value"]}
'''

DEADLINE_S = 60


def deploy_logging_api(cluster, tmp_path):
    folder = write_project(tmp_path / "logs", config=CONFIG, files={"handler.py": LOGGING_HANDLER})
    out = cli(cluster, "deploy", folder)
    assert out.returncode == 0, out.stderr


def post(cluster, value):
    r = requests.post(f"{cluster.url}/iris", json={"value": value}, timeout=30)
    assert r.status_code == 200 and r.json() == {"ok": value}, r.text


def logged_payload(line):
    """The payload of the handler's JSON line, or None for any other line."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("message") != "got payload":
        return None
    assert record["labels"]["apiName"] == "iris", record
    assert record["levelname"] == "INFO", record
    return record["payload"]


def test_stream_api_logs_reads_every_replica(cluster, tmp_path):
    deploy_logging_api(cluster, tmp_path)
    post(cluster, "first")
    client = serval.client(data_dir=cluster.data_dir)
    (replica,) = [r["id"] for r in serval.serve.status()["replicas"] if r["backend"] == "iris"]
    # Replicas write their logs on their own time: poll until both lines are in.
    deadline = time.monotonic() + DEADLINE_S
    while True:
        lines = list(client.stream_api_logs("iris", follow=False))
        assert {rid for rid, _ in lines} <= {replica}, lines
        texts = [line for _, line in lines]
        if {"value": "first"} in map(logged_payload, texts) and "printed first" in texts:
            break
        assert time.monotonic() < deadline, f"the handler's lines never arrived: {texts}"
        time.sleep(0.1)


def read_lines(proc, into):
    for line in proc.stdout:
        into.put(line.rstrip("\n"))
    into.put(None)


def wait_for_lines(lines, wants, seen):
    """Reads `serve logs` lines until each of `wants` matched one."""
    wants = list(wants)
    deadline = time.monotonic() + DEADLINE_S
    while wants:
        left = deadline - time.monotonic()
        assert left > 0, f"some lines never came; got: {seen}"
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            continue
        assert line is not None, f"serve logs ended early after: {seen}"
        seen.append(line)
        wants = [w for w in wants if not w(line)]


def test_serve_logs_follows_new_lines(cluster, tmp_path):
    deploy_logging_api(cluster, tmp_path)
    (replica,) = [r["id"] for r in serval.serve.status()["replicas"] if r["backend"] == "iris"]
    post(cluster, "before")
    proc = subprocess.Popen([sys.executable, "-m", "serval.cli", "--data-dir", cluster.data_dir, "logs", "iris"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = queue.Queue()
        threading.Thread(target=read_lines, args=(proc, lines), daemon=True).start()
        seen = []

        def logged(value):
            def match(line):
                rid, _, text = line.partition(" | ")
                return rid == replica and logged_payload(text) == {"value": value}
            return match

        wait_for_lines(lines, [logged("before"), f"{replica} | printed before".__eq__], seen)
        # Lines written after `serve logs` caught up arrive too: it follows.
        post(cluster, "after")
        wait_for_lines(lines, [logged("after"), f"{replica} | printed after".__eq__], seen)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.poll() is not None


def test_serve_logs_of_an_unknown_api_fails(cluster):
    out = cli(cluster, "logs", "nosuch")
    assert out.returncode == 1
    assert 'no API named "nosuch"' in out.stderr, out.stderr
    out = cli(cluster, "logs", "--no-follow", "nosuch")
    assert out.returncode == 1 and "nosuch" in out.stderr, out.stderr


def test_a_log_without_newlines_is_not_held_whole():
    """A follower holds at most MAX_LINE_BYTES of an unfinished line: a
    replica that prints megabytes without a newline gets its output cut
    into lines of that size, and nothing is lost."""
    from serval.cortex.logs import MAX_LINE_BYTES, _Tail

    tail = _Tail()
    chunk = b"x" * (MAX_LINE_BYTES // 4)
    out = []
    for _ in range(10):
        out += tail.lines(chunk)
        assert len(tail.partial) < MAX_LINE_BYTES
    out += tail.lines(b"y\nnext")
    assert [len(line) for line in out] == [MAX_LINE_BYTES, MAX_LINE_BYTES, MAX_LINE_BYTES // 2 + 1]
    assert "".join(out) == "x" * (10 * MAX_LINE_BYTES // 4) + "y"
    assert tail.partial == b"next"


class Chatty:
    def __call__(self, request):
        n = int(request.query_params["n"])
        sys.stderr.write(("chatter " * 16 + "\n") * n)
        sys.stderr.flush()
        return "said"


def test_a_replica_log_past_its_bound_is_rotated(monkeypatch):
    """SERVAL_REPLICA_LOG_MAX_BYTES (here 64 KiB): the node agent copies a
    replica's log to replica.log.1 and truncates it, so a chatty replica
    cannot fill the disk; the log keeps growing from zero after it."""
    import glob
    import os

    from conftest import running_cluster, wait_for
    from serval import serve

    bound = 64 * 1024
    with running_cluster(monkeypatch, env={"SERVAL_REPLICA_LOG_MAX_BYTES": str(bound)}) as c:
        serve.create_backend("chatty", Chatty)
        serve.create_endpoint("chatty", backend="chatty", route="/chatty")
        # About 260 kB: four times the bound.
        r = requests.get(f"{c.url}/chatty", params={"n": 2000}, timeout=60)
        assert r.status_code == 200, r.text
        (log,) = glob.glob(os.path.join(c.data_dir, "replicas", "*", "replica.log"))
        rotated = log + ".1"
        wait_for(lambda: os.path.exists(rotated) and os.path.getsize(log) < bound, timeout=60,
                 what="the replica log to rotate")
        assert os.path.getsize(rotated) > bound
        # Later lines land in the truncated log.
        requests.get(f"{c.url}/chatty", params={"n": 1}, timeout=60)
        wait_for(lambda: b"chatter" in open(log, "rb").read(), timeout=60, what="a line after the rotation")
