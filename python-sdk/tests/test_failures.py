"""Failures (issue 4.5): a node agent that dies is declared dead after its
heartbeat timeout and its replicas are placed on the other nodes, while the
cluster keeps serving."""

import os
import signal

import pytest
import requests


from serval import _core, serve
from test_locations import alive_nodes, kill_group, start_node, wait_until


def where(request):
    return os.environ.get("SERVAL_TEST_NODE", "?")


@pytest.fixture
def short_heartbeat(monkeypatch):
    # The head reads these at start: nodes silent for 2 s are dead, and the
    # head itself offers no CPU, so replicas live on the extra nodes.
    monkeypatch.setenv("SERVAL_NODE_TIMEOUT_S", "2")
    monkeypatch.setenv("SERVAL_NUM_CPUS", "0")


def test_replicas_of_a_dead_node_move_to_the_others(short_heartbeat, cluster, monkeypatch):
    # The head offers no CPU: replicas go to the two extra nodes.
    nodes = []
    try:
        for name in ("a", "b"):
            monkeypatch.setenv("SERVAL_TEST_NODE", name)
            nodes.append(start_node(cluster, 0))
            wait_until(f"node {name} to join", lambda n=len(nodes): len(alive_nodes()) == n + 1)
        # Two 1-CPU replicas on two 2-CPU nodes: one on each (the emptiest wins).
        serve.create_backend("where", where, config={"num_replicas": 2}, ray_actor_options={"num_cpus": 1})
        serve.create_endpoint("where", backend="where", route="/where")

        def running_homes():
            homes = [r["node_id"] for r in serve.status()["replicas"] if r["state"] == "running"]
            return set(homes) if len(homes) == 2 else None

        homes = wait_until("both replicas to run", running_homes)
        assert len(homes) == 2

        # Kill node a (its agent and its replicas, as a machine loss would).
        victim = next(n for n in serve.status()["nodes"] if n["id"] in homes and not n["is_head"])
        proc = next(p for p in nodes if p.pid == victim["pid"])
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

        def moved():
            s = serve.status()
            dead = next(n for n in s["nodes"] if n["id"] == victim["id"])
            running = [r for r in s["replicas"] if r["state"] == "running"]
            return not dead["alive"] and len(running) == 2 and all(r["node_id"] != victim["id"] for r in running)

        wait_until("the replicas to leave the dead node", moved, timeout=120)
        for _ in range(10):
            assert requests.get(f"{cluster.url}/where", timeout=30).status_code == 200
    finally:
        for proc in nodes:
            kill_group(proc)


class Fragile:
    def __call__(self, request):
        return os.getpid()

    def die(self):
        os._exit(1)


def test_a_dying_replica_fails_only_its_requests_and_comes_back(cluster):
    serve.create_backend("fragile", Fragile, config={"num_replicas": 2})
    serve.create_endpoint("fragile", backend="fragile", route="/fragile")
    wait_until("both replicas", lambda: sum(r["state"] == "running" for r in serve.status()["replicas"]) == 2)
    handle = serve.get_handle("fragile")
    from serval import ServeError

    with pytest.raises(ServeError, match="died|closed|503|502"):
        handle.options(method_name="die").remote().result()
    # The other replica keeps serving while the dead one restarts.
    for _ in range(20):
        r = requests.get(f"{cluster.url}/fragile", timeout=30)
        assert r.status_code in (200, 502, 503), r.text
    wait_until("the dead replica to restart", lambda: all(
        r["state"] == "running" for r in serve.status()["replicas"]) and any(
        r["restarts"] >= 1 for r in serve.status()["replicas"]))
    assert all(requests.get(f"{cluster.url}/fragile", timeout=30).status_code == 200 for _ in range(10))


class CrashLoop:
    def __init__(self):
        import threading
        threading.Timer(0.3, lambda: os._exit(3)).start()

    def __call__(self, request):
        return "briefly alive"


def test_a_crash_loop_shows_in_status_with_the_reason(cluster):
    serve.create_backend("loop", CrashLoop)

    def looping():
        (r,) = [r for r in serve.status()["replicas"] if r["backend"] == "loop"]
        return r["restarts"] >= 2 and "exit status: 3" in r["error"] and r

    replica = wait_until("restarts to pile up", looping, timeout=120)
    assert replica["restarts"] >= 2
    import subprocess
    import sys

    def table_shows_reason():
        out = subprocess.run([sys.executable, "-m", "serval.cli", "--data-dir", cluster.data_dir, "status"],
                             capture_output=True, text=True, timeout=60).stdout
        return any(l.startswith("  loop#") and "exit status: 3" in l for l in out.splitlines())

    # Between crashes the replica runs briefly; the reason shows otherwise.
    wait_until("`serve status` to show the crash reason", table_shows_reason)


# -- replicas' Python, and replicas that die before they report ---------------


def python_without_serval(folder) -> str:
    """A real interpreter that lacks the serval package: a bare venv."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=300)
    return os.path.join(str(folder), "bin", "python")


@pytest.fixture
def console_script_head(monkeypatch, tmp_path):
    """Starts heads as a user of the venv does: its ``serve`` console script
    (SERVAL_PYTHON unset), with a ``python3`` first on PATH that lacks
    serval. Yields ``start(*flags) -> data dir``; kills every head after."""
    import shutil
    import subprocess
    import sys
    import tempfile

    from conftest import free_port

    bare = python_without_serval(tmp_path / "bare")
    shims = tmp_path / "shims"
    shims.mkdir()
    os.symlink(bare, shims / "python3")
    for var in ("SERVAL_PYTHON", "SERVAL_ADDRESS", "SERVAL_TOKEN", "SERVAL_TOKEN_FILE", "SERVAL_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SERVAL_NUM_CPUS", "4")
    env = dict(os.environ, PATH=f"{shims}:{os.environ['PATH']}")
    serve_script = os.path.join(os.path.dirname(sys.executable), "serve")
    started = []

    def start(*flags):
        data_dir = tempfile.mkdtemp(prefix="sv-", dir="/tmp")
        started.append(data_dir)
        out = subprocess.run([serve_script, "--data-dir", data_dir, "start", "--head", "--detach",
                              "--http-port", str(free_port()), "--control-port", str(free_port()), *flags],
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        serve.connect(data_dir=data_dir)
        return data_dir

    start.bare = bare
    try:
        yield start
    finally:
        from conftest import Cluster

        for data_dir in started:
            Cluster(data_dir, 0, 0).kill()
            shutil.rmtree(data_dir, ignore_errors=True)
        _core.disconnect()


def echo(request):
    return "echo"


def test_the_venv_console_script_starts_replicas_with_its_own_python(console_script_head, tmp_path):
    import subprocess
    import sys

    data_dir = console_script_head()
    # The replica runs: its Python is the console script's, which has serval.
    serve.create_backend("echo", echo)
    (replica,) = [r for r in serve.status()["replicas"] if r["backend"] == "echo"]
    assert replica["state"] == "running", replica

    # A Cortex handler whose module ends the process at import: the deploy's
    # error and `serve get` show what it wrote to stderr.
    project = tmp_path / "dies"
    project.mkdir()
    (project / "handler.py").write_text(
        "import os, sys\nprint('cannot reach the model store at s3://models', file=sys.stderr, flush=True)\n"
        "os._exit(4)\n")
    (project / "cortex.yaml").write_text("- name: dies\n  kind: RealtimeAPI\n  handler: {type: python, path: handler.py}\n")
    cli = [sys.executable, "-m", "serval.cli", "--data-dir", data_dir]
    out = subprocess.run([*cli, "deploy", str(project), "--timeout", "120"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1 and "cannot reach the model store at s3://models" in out.stderr, out.stderr
    out = subprocess.run([*cli, "get", "dies"], capture_output=True, text=True, timeout=60)
    assert "cannot reach the model store at s3://models" in out.stdout, out.stdout


def test_a_replica_whose_python_lacks_serval_shows_why(console_script_head):
    import subprocess
    import sys

    data_dir = console_script_head("--python", console_script_head.bare)
    with pytest.raises(serve.ServeError) as e:
        serve.create_backend("echo", echo)
    assert "No module named 'serval'" in str(e.value), e.value

    def table_shows_reason():
        out = subprocess.run([sys.executable, "-m", "serval.cli", "--data-dir", data_dir, "status"],
                             capture_output=True, text=True, timeout=60).stdout
        return any(l.startswith("  echo#") and "No module named 'serval'" in l for l in out.splitlines())

    wait_until("`serve status` to show the missing module", table_shows_reason)
