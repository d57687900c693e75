"""bench/run's orchestrator (standard library only): runs the same scenarios
against Serval and Ray Serve, one after the other, on 127.0.0.1, with wrk as
the load generator, then writes BENCHMARKS.md and prints it.

Each system is driven by a driver process in its own venv
(bench/serval_driver.py in bench/.venv, bench/ray_driver.py in
bench/.peer-venv) through a line-based command protocol; this process runs
wrk, reads /proc for memory and makes sure no process is left behind.

Environment knobs: BENCH_DURATION (s per wrk run, default 8), BENCH_WARMUP
(s, default 2), BENCH_SEQ_CALLS (2000), BENCH_CONC_CALLS (10000),
BENCH_ONLY (serval|ray|native|scale: run only that part; v2: only the Ray Serve
2.x scenarios, on both systems), BENCH_SCALE
(endpoint counts of the scale scenario, default 1,10,100), BENCH_OUT (BENCHMARKS.md),
PEER_UNAVAILABLE (why Ray Serve could not be installed: its column is n/a).

The Ray Serve 2.x scenarios (streaming, WebSockets) time with
bench/aio_load.py, which needs the ``websockets`` package (bench/.venv).
"""

import datetime
import json
import os
import platform
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
SERVAL_PY = os.environ.get("BENCH_SERVAL_PY", os.path.join(BENCH, ".venv", "bin", "python"))
PEER_PY = os.path.join(BENCH, ".peer-venv", "bin", "python")
NATIVE_BIN = os.environ.get("BENCH_NATIVE_BIN", os.path.join(ROOT, "target", "release", "serval-bench"))

DURATION = int(os.environ.get("BENCH_DURATION", "8"))
WARMUP = int(os.environ.get("BENCH_WARMUP", "2"))
SEQ_CALLS = int(os.environ.get("BENCH_SEQ_CALLS", "2000"))
CONC_CALLS = int(os.environ.get("BENCH_CONC_CALLS", "10000"))
CONCURRENCIES = [1, 16, 64]
#: max_concurrent_queries (Ray: max_ongoing_requests) of the last GET
#: scenario: the default of an async backend, against 8 for a blocking one.
WIDE_LIMIT = 100
POST_CONCURRENCY = 16
POST_BYTES = 10 * 1024
COMMAND_TIMEOUT = 600
ONLY = os.environ.get("BENCH_ONLY", "")
SCALE_STEPS = [int(x) for x in os.environ.get("BENCH_SCALE", "1,10,100").split(",") if x.strip()]
SCALE_CONCURRENCY = 16
#: Concurrencies of the streaming and WebSocket scenarios; the composition
#: runs at the last.
V2_CONCURRENCIES = [1, 64]
OUT = os.environ.get("BENCH_OUT", os.path.join(ROOT, "BENCHMARKS.md"))

LOG_DIR = tempfile.mkdtemp(prefix="serval-bench-")


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- processes

def _read(path, mode="r"):
    try:
        with open(path, mode) as f:
            return f.read()
    except OSError:
        return None


def all_pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def ppid_of(pid):
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return int(fields[1]) if fields[0] != "Z" else None


def descendants(root):
    children = {}
    for pid in all_pids():
        pp = ppid_of(pid)
        if pp is not None:
            children.setdefault(pp, []).append(pid)
    out, stack = [], [root]
    while stack:
        for c in children.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


def marked(marker):
    """Live processes whose environment carries BENCH_MARK=marker (the
    driver's own and everything that inherited it)."""
    needle = f"BENCH_MARK={marker}".encode()
    out = []
    for pid in all_pids():
        env = _read(f"/proc/{pid}/environ", "rb")
        if env and needle in env.split(b"\0") and ppid_of(pid) is not None:
            out.append(pid)
    return out


def describe(pid):
    cmd = (_read(f"/proc/{pid}/cmdline", "rb") or b"").replace(b"\0", b" ").decode(errors="replace").strip()
    comm = (_read(f"/proc/{pid}/comm") or "?").strip()
    return comm, cmd


def short_name(pid):
    comm, cmd = describe(pid)
    if "serval.replica" in cmd:
        return "serval replica (python)"
    if "serval.cli" in cmd or comm == "serve":
        return "serval head (controller+proxy+agent)"
    if cmd.startswith("ray::"):
        return cmd.split()[0]
    if comm.startswith("ray::") or comm.startswith("ray-"):
        return comm
    for key in ("gcs_server", "raylet", "dashboard.py", "agent.py", "log_monitor.py", "monitor.py",
                "runtime_env", "default_worker.py", "setup_worker", "haproxy"):
        if key in cmd:
            return {"dashboard.py": "ray dashboard", "agent.py": "ray dashboard agent",
                    "log_monitor.py": "ray log monitor", "monitor.py": "ray monitor",
                    "default_worker.py": "ray worker (idle)", "runtime_env": "ray runtime env agent"
                    }.get(key, key)
    scripts = [a for a in cmd.split() if a.endswith(".py")]
    if scripts:
        return f"{comm} {'/'.join(scripts[0].split('/')[-2:])}"
    return comm


def memory_of(pids):
    procs = []
    for pid in sorted(set(pids)):
        status = _read(f"/proc/{pid}/status")
        if not status:
            continue
        rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        rollup = _read(f"/proc/{pid}/smaps_rollup") or ""
        pss = next((int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:")), 0)
        procs.append({"pid": pid, "name": short_name(pid), "rss_kb": rss, "pss_kb": pss})
    return {
        "count": len(procs),
        "rss_mb": sum(p["rss_kb"] for p in procs) / 1024.0,
        "pss_mb": sum(p["pss_kb"] for p in procs) / 1024.0,
        "procs": procs,
    }


def kill_pids(pids, why):
    pids = [p for p in set(pids) if p != os.getpid() and ppid_of(p) is not None]
    if not pids:
        return []
    log(f"{why}: terminating {len(pids)} leftover process(es): "
        + ", ".join(f"{p} ({short_name(p)})" for p in pids))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(ppid_of(p) is not None for p in pids):
            time.sleep(0.1)
        pids = [p for p in pids if ppid_of(p) is not None]
        if not pids:
            break
    return pids


# -------------------------------------------------------------------- drivers

class DriverError(RuntimeError):
    pass


class Driver:
    """A driver process and its command loop (see driver_common.py)."""

    def __init__(self, name, python, script, env):
        self.name = name
        self.marker = uuid.uuid4().hex
        self.log_path = os.path.join(LOG_DIR, f"{name}-driver.log")
        full_env = dict(os.environ)
        for k in list(full_env):
            if k.startswith(("SERVAL_", "RAY_", "VIRTUAL_ENV", "PYTHONHOME")):
                full_env.pop(k)
        full_env.update(env)
        full_env["BENCH_MARK"] = self.marker
        full_env["PYTHONPATH"] = BENCH
        full_env["PYTHONUNBUFFERED"] = "1"
        self.logf = open(self.log_path, "w")
        self.t_spawn = time.monotonic()
        self.proc = subprocess.Popen([python, "-u", os.path.join(BENCH, script)], cwd=BENCH, env=full_env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.logf,
                                     text=True, start_new_session=True)
        self.lines = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self._wait("ready", 120)

    def _pump(self):
        for line in self.proc.stdout:
            if line.startswith("@@BENCH "):
                self.lines.put(json.loads(line[len("@@BENCH "):]))
            else:
                self.logf.write(line)
                self.logf.flush()
        self.lines.put(None)

    def _wait(self, what, timeout):
        try:
            msg = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise DriverError(f"{self.name} driver: no answer to {what} within {timeout} s (log: {self.log_path})")
        if msg is None:
            raise DriverError(f"{self.name} driver exited during {what} (log: {self.log_path}):\n{self.tail()}")
        if not msg.get("ok"):
            raise DriverError(f"{self.name} driver: {what} failed: {msg.get('error')}\n{msg.get('traceback', '')}")
        return msg

    def tail(self, n=30):
        text = _read(self.log_path) or ""
        return "\n".join(text.splitlines()[-n:])

    def call(self, cmd, timeout=COMMAND_TIMEOUT, **args):
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        return self._wait(cmd, timeout)

    def cluster_pids(self, reported=None):
        pids = set(marked(self.marker)) | set(descendants(self.proc.pid))
        if reported:
            pids |= {p for p in reported.get("pids", []) if ppid_of(p) is not None}
        pids.discard(self.proc.pid)
        return sorted(pids)

    def close(self):
        """Ends the driver and anything of its cluster still running."""
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            pass
        if self.proc.poll() is None:
            kill_pids([self.proc.pid], f"{self.name} driver")
        left = kill_pids(marked(self.marker), f"{self.name} cluster")
        self.logf.close()
        return left


def close_driver(drv, res):
    """Ends a driver (if it started) and records any process left behind."""
    if drv is not None:
        left = drv.close()
        if left:
            res["errors"].append(f"processes still alive after cleanup: {left}")


# ------------------------------------------------------------------------ wrk

POST_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"data":"' .. string.rep("x", %d) .. '"}'
"""


def _seconds(text):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text.strip())
    if not m:
        return None
    v, unit = float(m.group(1)), m.group(2)
    return v * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def parse_wrk(out):
    res = {"rps": None, "p50_ms": None, "p99_ms": None, "errors": 0, "requests": None}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m:
        res["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in", out)
    if m:
        res["requests"] = int(m.group(1))
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", out, re.M)
        if m and _seconds(m.group(1)) is not None:
            res[key] = 1000.0 * _seconds(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m:
        res["errors"] += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res["errors"] += sum(int(x) for x in m.groups())
    return res


def wrk(url, conc, script=None, label=""):
    threads = 1 if conc == 1 else 2
    base = ["wrk", f"-t{threads}", f"-c{conc}", "--timeout", "10s", "--latency"]
    if script:
        base += ["-s", script]
    if WARMUP > 0:
        subprocess.run(base + [f"-d{WARMUP}s", url], capture_output=True, text=True, timeout=WARMUP + 60)
    p = subprocess.run(base + [f"-d{DURATION}s", url], capture_output=True, text=True, timeout=DURATION + 60)
    res = parse_wrk(p.stdout)
    with open(os.path.join(LOG_DIR, "wrk.log"), "a") as f:
        f.write(f"### {label} {' '.join(base)} {url}\n{p.stdout}{p.stderr}\n")
    if res["rps"] is None:
        res["error"] = (p.stderr or p.stdout).strip()[-300:]
    elif not res["requests"]:
        res["error"] = f"no response at all in {DURATION} s (server wedged?)"
        res["rps"] = 0.0
        res["p50_ms"] = res["p99_ms"] = None
    log(f"  {label} c={conc}: {fmt(res['rps'], 0)} req/s, p50 {fmt(res['p50_ms'], 2)} ms, "
        f"p99 {fmt(res['p99_ms'], 2)} ms, errors {res['errors']}")
    return res


def fmt(v, digits=2):
    if v is None:
        return "n/a"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.{digits}f}"


# ------------------------------------------------------------------ scenarios

def run_system(name, python, script, env):
    """The scenarios against one system; returns its results. A step that
    fails is recorded (with the driver log's tail) and the next one runs: a
    wedged replica shows up as errors, not as a missing report."""
    res = {"errors": []}
    log(f"{name}: starting the driver and the cluster")
    drv = None

    def step(what, fn):
        try:
            return fn()
        except Exception as e:
            first = str(e).splitlines()[0][:400] if str(e) else type(e).__name__
            log(f"{name}: {what} FAILED: {e}")
            res["errors"].append(f"{what}: {first}")
            if drv is not None:
                log(f"{name}: driver log tail ({drv.log_path}):\n{drv.tail(15)}")
            return None

    def http(key, url, script=None, label="", concurrencies=CONCURRENCIES):
        out = {c: wrk(url, c, script=script, label=label) for c in ([POST_CONCURRENCY] if script else concurrencies)}
        for c, r in out.items():
            if r.get("error"):
                res["errors"].append(f"{label} c={c}: {r['error']}")
        res[key] = out[POST_CONCURRENCY] if script else out

    try:
        drv = step("driver start", lambda: Driver(name, python, script, env))
        if drv is None:
            return res
        started = step("cluster start and deploy", lambda: drv.call("start"))
        if started is None:
            return res
        res["version"] = started.get("version")
        res["startup"] = {
            "cluster_start_s": started["cluster_start_s"],
            "deploy_to_200_s": started["deploy_to_200_s"],
            "process_to_200_s": started["t_first_200"] - drv.t_spawn,
        }
        log(f"{name}: first 200 {res['startup']['process_to_200_s']:.2f} s after process start, "
            f"{res['startup']['deploy_to_200_s']:.2f} s after the deploy call")
        url = started["url"]
        if ONLY == "v2":
            run_v2(name, drv, res, step, http)
            step("shutdown", lambda: drv.call("shutdown", timeout=120))
            return res
        time.sleep(3)
        res["mem_idle"] = memory_of(drv.cluster_pids(step("pids", lambda: drv.call("pids"))))
        log(f"{name}: idle, 1 replica: {res['mem_idle']['count']} processes, "
            f"RSS {res['mem_idle']['rss_mb']:.0f} MB, PSS {res['mem_idle']['pss_mb']:.0f} MB")

        step("GET, 1 replica", lambda: http("get1", url, label=f"{name} GET 1 replica"))
        log(f"{name}: ServeHandle calls")
        res["handle"] = step("ServeHandle calls",
                             lambda: drv.call("handle", seq=SEQ_CALLS, conc=CONC_CALLS)) or {}
        for k in ("sequential", "method"):
            h = res["handle"].get(k)
            if h:
                log(f"  handle {k}: p50 {fmt(h['p50_ms'], 3)} ms, p99 {fmt(h['p99_ms'], 3)} ms, "
                    f"{h['completed']} of {SEQ_CALLS} done, "
                    f"errors {h['errors']}")
                if h.get("timed_out"):
                    res["errors"].append(f"ServeHandle {k} calls: only {h['completed']} of {SEQ_CALLS} "
                                         f"completed within {h['budget_s']:.0f} s")
        h = res["handle"].get("concurrent")
        if h:
            log(f"  handle concurrent: {h['calls_per_s']:.0f} calls/s, {h['completed']} of {h['n']} completed "
                f"in {h['seconds']:.1f} s, errors {h['errors']}")
            if h["timed_out"]:
                res["errors"].append(f"ServeHandle concurrent calls: only {h['completed']} of {h['n']} "
                                     f"completed within {h['budget_s']:.0f} s")
        res["mem_loaded"] = memory_of(drv.cluster_pids(step("pids", lambda: drv.call("pids"))))
        log(f"{name}: after the load: {res['mem_loaded']['count']} processes, "
            f"RSS {res['mem_loaded']['rss_mb']:.0f} MB, PSS {res['mem_loaded']['pss_mb']:.0f} MB")

        echo = step("deploy echo", lambda: drv.call("deploy_echo"))
        if echo:
            lua = os.path.join(LOG_DIR, "post.lua")
            with open(lua, "w") as f:
                f.write(POST_LUA % (POST_BYTES - len('{"data":""}')))
            step("POST echo", lambda: http("post", echo["url"], script=lua, label=f"{name} POST 10 KiB echo"))
            step("delete echo", lambda: drv.call("delete_echo"))

        if name == "serval":
            grpc = step("deploy gRPC no-op", lambda: drv.call("deploy_grpc"))
            if grpc:
                step("gRPC unary no-op", lambda: res.update(grpc={
                    c: grpc_load(grpc["address"], grpc["method"], c) for c in CONCURRENCIES}))

        if step("scale to 2 replicas", lambda: drv.call("scale", n=2)) is not None:
            step("GET, 2 replicas", lambda: http("get2", url, label=f"{name} GET 2 replicas"))
        if step(f"1 replica, limit {WIDE_LIMIT}", lambda: drv.call("scale", n=1, limit=WIDE_LIMIT)) is not None:
            step(f"GET, 1 replica, limit {WIDE_LIMIT}",
                 lambda: http("get1_wide", url, label=f"{name} GET 1 replica, limit {WIDE_LIMIT}"))
        run_v2(name, drv, res, step, http)
        step("shutdown", lambda: drv.call("shutdown", timeout=120))
    finally:
        close_driver(drv, res)
    return res


def run_v2(name, drv, res, step, http):
    """The Ray Serve 2.x scenarios (driver_common.deploy_v2 deploys the
    same code on both systems), each application deleted after its load:
    a plain no-op and the streaming no-op with the same client (first byte,
    chunks/s), WebSocket echo round trips, and an ingress calling a model
    through a DeploymentHandle under wrk."""
    import aio_load

    def load(key, fn):
        for c in V2_CONCURRENCIES:
            r = fn(c)
            res.setdefault(key, {})[c] = r
            log(f"  {name} {key} c={c}: {fmt(r['per_s'], 0)}/s, {fmt(r['units_per_s'], 0)} units/s, "
                f"p50 {fmt(r['p50_ms'], 3)} ms, p99 {fmt(r['p99_ms'], 3)} ms, errors {r['errors']}")
            if r["errors"]:
                res["errors"].append(f"{key} c={c}: {r['errors']} connections failed: {r['error']}")

    def port_path(url):
        m = re.match(r"http://127\.0\.0\.1:(\d+)(/.*)$", url)
        return int(m.group(1)), m.group(2)

    for app, key in (("plain", "stream_plain"), ("stream", "stream")):
        got = step(f"deploy {app}", lambda: drv.call("deploy_v2", app=app))
        if got:
            step(f"{app} load", lambda: load(key, lambda c: aio_load.stream_load(
                *port_path(got["url"]), c, WARMUP, DURATION)))
            if app == "stream":
                # Throughput by wrk (C, reads the chunked bodies whole), as
                # everywhere else: the Python client's own cost per chunk
                # would cap it.
                res["chunks"] = got["chunks"]
                step("stream wrk", lambda: http("stream_wrk", got["url"], label=f"{name} stream",
                                                concurrencies=V2_CONCURRENCIES))
            step(f"delete {app}", lambda: drv.call("delete_v2", app=app))
    got = step("deploy ws", lambda: drv.call("deploy_v2", app="ws"))
    if got:
        ws_url = got["url"].replace("http://", "ws://", 1)
        step("WebSocket echo", lambda: load("ws", lambda c: aio_load.websocket_load(ws_url, c, WARMUP, DURATION)))
        step("delete ws", lambda: drv.call("delete_v2", app="ws"))
    got = step("deploy compose", lambda: drv.call("deploy_v2", app="compose"))
    if got:
        c = V2_CONCURRENCIES[-1]
        step("composition", lambda: res.update(compose=wrk(got["url"], c, label=f"{name} composition")))
        if get(res, "compose", "error"):
            res["errors"].append(f"composition c={c}: {res['compose']['error']}")
        step("delete compose", lambda: drv.call("delete_v2", app="compose"))


SPREAD_LUA = """
local n = %d
local i = 0
request = function()
  i = (i + 1) %% n
  return wrk.format("GET", "/tiny/" .. i)
end
"""


def run_scale():
    """Serval only: 1, 10 and 100 endpoints, each with its own one-replica
    backend, on one machine. At each size: the latency of one endpoint at
    c=1 (does routing slow down as the table grows?), requests/s spread over
    every endpoint, and the memory of the head process (controller, proxy
    and agent) and of the whole cluster."""
    res = {"errors": [], "steps": {}}
    drv = None
    try:
        drv = Driver("serval-scale", SERVAL_PY, "serval_driver.py", {
            "BENCH_HTTP_PORT": str(free_port()),
            "SERVAL_CONTROL_PORT": str(free_port()),
            "BENCH_DATA_DIR": tempfile.mkdtemp(prefix="serval-bench-scale-"),
            # 100 one-CPU replicas on a 2-core machine: the issue's
            # `--num-cpus` escape hatch.
            "SERVAL_NUM_CPUS": str(max(SCALE_STEPS) + 8),
        })
        drv.call("scale_start")
        for n in SCALE_STEPS:
            log(f"scale: growing to {n} endpoints")
            g = drv.call("scale_grow", total=n, timeout=1200)
            time.sleep(2)
            step = {"deploy_s": g["deploy_s"], "added": g["added"],
                    "mem_head": memory_of(g["head_pids"]),
                    "mem_all": memory_of(drv.cluster_pids(g))}
            step["one_c1"] = wrk(f"{g['base']}/tiny/0", 1, label=f"scale {n} endpoints, /tiny/0")
            lua = os.path.join(LOG_DIR, f"spread{n}.lua")
            with open(lua, "w") as f:
                f.write(SPREAD_LUA % n)
            step["spread"] = wrk(f"{g['base']}/tiny/0", SCALE_CONCURRENCY, script=lua,
                                 label=f"scale {n} endpoints, spread")
            step["mem_head_after"] = memory_of(g["head_pids"])
            log(f"scale: {n} endpoints: head PSS {step['mem_head']['pss_mb']:.1f} MB, "
                f"cluster {step['mem_all']['count']} processes / PSS {step['mem_all']['pss_mb']:.0f} MB")
            for k in ("one_c1", "spread"):
                if step[k].get("error") or step[k].get("errors"):
                    res["errors"].append(f"scale {n} endpoints, {k}: {step[k].get('error') or step[k]['errors']}")
            res["steps"][n] = step
        drv.call("shutdown", timeout=300)
    except Exception as e:
        log(f"scale: FAILED: {e}")
        res["errors"].append(str(e).splitlines()[0][:500] if str(e) else type(e).__name__)
    finally:
        close_driver(drv, res)
    return res


class Server:
    """A serval-bench server process (bare hyper or proxy + native replicas)."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([NATIVE_BIN, *map(str, args)], stdout=subprocess.PIPE,
                                     stderr=open(os.path.join(LOG_DIR, "native.log"), "a"),
                                     text=True, start_new_session=True)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.close()
            raise RuntimeError(f"serval-bench {args} did not start: {line!r}")

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def grpc_load(address, method, conc):
    """``serval-bench grpc-load``: unary calls at ``conc`` over one HTTP/2
    connection for DURATION seconds (no ghz here)."""
    out = subprocess.run([NATIVE_BIN, "grpc-load", address, method, str(conc), str(DURATION)],
                         capture_output=True, text=True, timeout=DURATION + 120)
    if out.returncode != 0:
        raise RuntimeError(f"grpc-load failed: {out.stderr.strip()[-300:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    log(f"  gRPC c={conc}: {result['rps']:.0f} req/s, p50 {fmt(result['p50_ms'], 3)} ms, "
        f"p99 {fmt(result['p99_ms'], 3)} ms, errors {result['errors']}")
    if result["errors"]:
        raise RuntimeError(f"grpc-load c={conc}: {result['errors']} calls failed")
    return result


def run_native():
    res = {"errors": []}
    try:
        port = free_port()
        s = Server("hyper", port)
        try:
            res["hyper"] = {c: wrk(f"http://127.0.0.1:{port}/", c, label="bare hyper") for c in CONCURRENCIES}
            res["mem_hyper"] = memory_of([s.proc.pid])
        finally:
            s.close()
        # The last: one replica at the limit of 8 that sync Python backends
        # get by default, the ceiling for the Python no-op at that limit.
        for key, n, limit in (("native1", 1, 100), ("native2", 2, 100), ("native1_limit8", 1, 8)):
            port = free_port()
            s = Server("native", port, n, limit)
            try:
                res[key] = {c: wrk(f"http://127.0.0.1:{port}/noop", c, label=f"proxy -> native x{n}, limit {limit}")
                            for c in CONCURRENCIES}
                res[f"mem_{key}"] = memory_of([s.proc.pid])
            finally:
                s.close()
    except Exception as e:
        log(f"native: FAILED: {e}")
        res["errors"].append(str(e)[:500])
    return res


# --------------------------------------------------------------------- report

def cmd_out(args):
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def machine_facts(serval_res, ray_res):
    meminfo = _read("/proc/meminfo") or ""
    total = next((int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemTotal:")), 0)
    cpu = next((line.split(":", 1)[1].strip() for line in (_read("/proc/cpuinfo") or "").splitlines()
                if line.startswith("model name")), "?")
    wrk_v = cmd_out(["sh", "-c", "wrk -v 2>&1 | head -1"])
    return [
        ("Date", datetime.datetime.now().strftime("%Y-%m-%d %H:%M %Z").strip()),
        ("CPU", f"{os.cpu_count()} cores ({cpu})"),
        ("Memory", f"{total / 1024 / 1024:.1f} GiB"),
        ("Kernel", f"{platform.system()} {platform.release()}"),
        ("Rust", cmd_out(["rustc", "--version"])),
        ("Python", cmd_out([SERVAL_PY, "--version"])),
        ("Serval", f"{serval_res.get('version') or '?'} (git {cmd_out(['git', '-C', ROOT, 'rev-parse', '--short', 'HEAD'])}), "
                   f"release build"),
        ("Ray", ray_res.get("version") or f"n/a ({PEER_UNAVAILABLE or 'not run'})"),
        ("Load generator", f"{wrk_v.split(' [')[0]}, keep-alive, {DURATION} s per run after a {WARMUP} s warm-up; "
                           f"1 thread at c=1, 2 otherwise"),
    ]


PEER_UNAVAILABLE = os.environ.get("PEER_UNAVAILABLE", "")


def ratio(s, r):
    if s is None or r is None or r == 0:
        return "n/a"
    x = s / r
    if x >= 10:
        return f"{x:,.0f}×"
    if x >= 1 or x == 0:
        return f"{x:.2f}×"
    return f"{x:.2g}×"


def get(d, *path):
    for p in path:
        if d is None:
            return None
        if isinstance(d, dict):
            d = d.get(p, d.get(str(p)) if not isinstance(p, str) else None)
        else:
            return None
    return d


def table(rows, header=("", "Serval", "Ray Serve", "Serval / Ray")):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def wrk_rows(s, r):
    rows = []
    for key, label, digits in (("rps", "requests/s", 0), ("p50_ms", "p50 latency (ms)", 3),
                               ("p99_ms", "p99 latency (ms)", 3)):
        sv, rv = get(s, key), get(r, key)
        rows.append((label, fmt(sv, digits), fmt(rv, digits), ratio(sv, rv)))
    def errs(x):
        if x and x.get("error"):
            return f"{fmt(x.get('errors'))}; {x['error']}"
        return fmt(get(x, "errors"))
    rows.append(("errors (non-2xx + socket)", errs(s), errs(r), ""))
    return rows


def _completed(c):
    if not c:
        return "n/a"
    text = f"{c.get('completed', c.get('n')):,} of {c.get('n'):,}"
    if c.get("timed_out"):
        text += f" (stopped after {c.get('budget_s'):.0f} s)"
    return text


def report(S, R, N, t_total, load_before, load_after):
    md = []
    md.append("# Benchmarks: Serval vs Ray Serve\n")
    md.append(f"Generated by `make bench` (`bench/run`) on {datetime.date.today().isoformat()} in "
              f"{t_total / 60:.1f} min. Both systems run on this one machine, one after the other, on "
              f"127.0.0.1, with the load generator on the same cores; the same Python classes "
              f"(`bench/apps.py`) serve both. **Serval / Ray** is Serval's figure divided by Ray Serve's: "
              f"above 1 is better for requests/s and calls/s, below 1 is better for latency, time and memory.\n")
    md.append(f"Load average (1, 5, 15 min) before the run: {load_before}; after: {load_after}. "
              f"The machine is shared with other builds and tests: figures taken while it was busy are noisy "
              f"and a quiet run will refresh them.\n")
    if PEER_UNAVAILABLE:
        md.append(f"**Ray Serve could not be installed** ({PEER_UNAVAILABLE}): its column is n/a.\n")
    for who, res in (("Serval", S), ("Ray Serve", R), ("Native", N)):
        for e in res.get("errors", []):
            md.append(f"**{who} error:** `{e}`\n")

    md.append("## Machine\n")
    md.append(table(machine_facts(S, R), header=("", "")) + "\n")
    md.append("Configuration: Serval head with `SERVAL_NUM_CPUS=4` and its defaults (tokio workers: half the cores, at least 1; "
              "sync backends get `max_concurrent_queries` 8, as in Ray Serve 1.0 to 1.2, whose API Serval follows (Ray gave every backend 100 once it dropped batching from the backend config, April 2021); the \"limit 100\" scenario sets it "
              "to 100, the async default, and Ray's `max_ongoing_requests` likewise); Ray with `ray.init(num_cpus=2)` and Serve's "
              "defaults (`max_ongoing_requests` 5 in current Ray) except `RAY_worker_niceness=0` (Ray starts its "
              "workers, Serve's replicas among them, at nice 15: on a machine shared with other work that "
              "starves them; Serval's replicas run at nice 0). Memory counts every process of the "
              "cluster, not the driver: Serval's head (controller, proxy and node agent in one process) "
              "and its replica processes; Ray's GCS, raylet, dashboard and agents, Serve controller, "
              "proxy and replicas, and idle workers.\n")

    md.append("## Summary\n")
    rows = []
    for c in CONCURRENCIES:
        rows.append((f"GET no-op, 1 replica, c={c}: requests/s", fmt(get(S, "get1", c, "rps"), 0),
                     fmt(get(R, "get1", c, "rps"), 0), ratio(get(S, "get1", c, "rps"), get(R, "get1", c, "rps"))))
    for c in CONCURRENCIES:
        rows.append((f"GET no-op, 2 replicas, c={c}: requests/s", fmt(get(S, "get2", c, "rps"), 0),
                     fmt(get(R, "get2", c, "rps"), 0), ratio(get(S, "get2", c, "rps"), get(R, "get2", c, "rps"))))
    for c in CONCURRENCIES:
        rows.append((f"GET no-op, 1 replica, limit {WIDE_LIMIT}, c={c}: requests/s",
                     fmt(get(S, "get1_wide", c, "rps"), 0), fmt(get(R, "get1_wide", c, "rps"), 0),
                     ratio(get(S, "get1_wide", c, "rps"), get(R, "get1_wide", c, "rps"))))
    rows.append(("POST 10 KiB echo, c=16: requests/s", fmt(get(S, "post", "rps"), 0), fmt(get(R, "post", "rps"), 0),
                 ratio(get(S, "post", "rps"), get(R, "post", "rps"))))
    rows.append(("ServeHandle sequential call: p50 ms", fmt(get(S, "handle", "sequential", "p50_ms"), 3),
                 fmt(get(R, "handle", "sequential", "p50_ms"), 3),
                 ratio(get(S, "handle", "sequential", "p50_ms"), get(R, "handle", "sequential", "p50_ms"))))
    rows.append(("ServeHandle concurrent calls/s", fmt(get(S, "handle", "concurrent", "calls_per_s"), 0),
                 fmt(get(R, "handle", "concurrent", "calls_per_s"), 0),
                 ratio(get(S, "handle", "concurrent", "calls_per_s"), get(R, "handle", "concurrent", "calls_per_s"))))
    rows.append(("Deploy call → first 200 (s)", fmt(get(S, "startup", "deploy_to_200_s")),
                 fmt(get(R, "startup", "deploy_to_200_s")),
                 ratio(get(S, "startup", "deploy_to_200_s"), get(R, "startup", "deploy_to_200_s"))))
    rows.append(("Process start → first 200 (s)", fmt(get(S, "startup", "process_to_200_s")),
                 fmt(get(R, "startup", "process_to_200_s")),
                 ratio(get(S, "startup", "process_to_200_s"), get(R, "startup", "process_to_200_s"))))
    rows.append(("Idle cluster, 1 replica: PSS (MB)", fmt(get(S, "mem_idle", "pss_mb"), 0),
                 fmt(get(R, "mem_idle", "pss_mb"), 0),
                 ratio(get(S, "mem_idle", "pss_mb"), get(R, "mem_idle", "pss_mb"))))
    c1, cn = V2_CONCURRENCIES[0], V2_CONCURRENCIES[-1]
    for c in V2_CONCURRENCIES:
        sv, rv = chunks_per_s(S, c), chunks_per_s(R, c)
        rows.append((f"Streaming 100 chunks, c={c}: chunks/s", fmt(sv, 0), fmt(rv, 0), ratio(sv, rv)))
    rows.append((f"Streaming, c={c1}: time to first byte p50 (ms)", fmt(get(S, "stream", c1, "p50_ms"), 3),
                 fmt(get(R, "stream", c1, "p50_ms"), 3),
                 ratio(get(S, "stream", c1, "p50_ms"), get(R, "stream", c1, "p50_ms"))))
    rows.append((f"WebSocket echo, {cn} sessions: round trips/s", fmt(get(S, "ws", cn, "per_s"), 0),
                 fmt(get(R, "ws", cn, "per_s"), 0), ratio(get(S, "ws", cn, "per_s"), get(R, "ws", cn, "per_s"))))
    rows.append((f"Composition (ingress → model handle), c={cn}: requests/s", fmt(get(S, "compose", "rps"), 0),
                 fmt(get(R, "compose", "rps"), 0), ratio(get(S, "compose", "rps"), get(R, "compose", "rps"))))
    md.append(table(rows) + "\n")

    for n, key in ((1, "get1"), (2, "get2")):
        for c in CONCURRENCIES:
            md.append(f"## HTTP GET no-op (Python class answering \"ok\"), {n} replica{'s' if n > 1 else ''}, "
                      f"concurrency {c}\n")
            md.append(table(wrk_rows(get(S, key, c), get(R, key, c))) + "\n")
    for c in CONCURRENCIES:
        md.append(f"## HTTP GET no-op, 1 replica, max_concurrent_queries {WIDE_LIMIT} "
                  f"(Ray: max_ongoing_requests {WIDE_LIMIT}), concurrency {c}\n")
        md.append(table(wrk_rows(get(S, "get1_wide", c), get(R, "get1_wide", c))) + "\n")

    md.append(f"## HTTP POST of a 10 KiB JSON body, echoed back, concurrency {POST_CONCURRENCY}\n")
    md.append(table(wrk_rows(get(S, "post"), get(R, "post"))) + "\n")

    md.append(f"## ServeHandle from a Python driver ({SEQ_CALLS:,} sequential calls; {CONC_CALLS:,} concurrent)\n")
    md.append("Each sequential series follows a warm-up of at least 50 calls and half a second, so it does not "
              "start while the machine still settles from the HTTP load before it.\n")
    rows = []
    for k, label in (("sequential", "`handle.remote().result()`"),
                     ("method", "`handle.options(method_name=\"other\").remote(1)`")):
        for m, ml, d in (("p50_ms", "p50 (ms)", 3), ("p99_ms", "p99 (ms)", 3), ("mean_ms", "mean (ms)", 3)):
            sv, rv = get(S, "handle", k, m), get(R, "handle", k, m)
            rows.append((f"{label}, sequential: {ml}", fmt(sv, d), fmt(rv, d), ratio(sv, rv)))
        rows.append((f"{label}, sequential: errors", fmt(get(S, "handle", k, "errors")),
                     fmt(get(R, "handle", k, "errors")), ""))
    sv, rv = get(S, "handle", "concurrent", "calls_per_s"), get(R, "handle", "concurrent", "calls_per_s")
    rows.append((f"{CONC_CALLS:,} calls submitted at once, then awaited: calls/s", fmt(sv, 0), fmt(rv, 0), ratio(sv, rv)))
    sv, rv = get(S, "handle", "concurrent", "seconds"), get(R, "handle", "concurrent", "seconds")
    rows.append(("… total time (s)", fmt(sv), fmt(rv), ratio(sv, rv)))
    rows.append(("… completed (within the time budget)", _completed(get(S, "handle", "concurrent")),
                 _completed(get(R, "handle", "concurrent")), ""))
    rows.append(("… errors (not completed included)", fmt(get(S, "handle", "concurrent", "errors")),
                 fmt(get(R, "handle", "concurrent", "errors")), ""))
    md.append(table(rows) + "\n")

    md.append("## Startup\n")
    rows = []
    for k, label in (("cluster_start_s", "Cluster start (`serve.start` / `ray.init` + `serve.start`)"),
                     ("deploy_to_200_s", "Deploy call → first 200 over HTTP"),
                     ("process_to_200_s", "Driver process start → first 200 (imports, cluster, deploy)")):
        sv, rv = get(S, "startup", k), get(R, "startup", k)
        rows.append((label + " (s)", fmt(sv), fmt(rv), ratio(sv, rv)))
    md.append(table(rows) + "\n")

    md.append("## Memory of the cluster's processes\n")
    rows = []
    for k, label in (("mem_idle", "idle, 1 replica"), ("mem_loaded", "after the load above, 1 replica")):
        for m, ml, d in (("count", "processes", 0), ("rss_mb", "RSS sum (MB)", 0), ("pss_mb", "PSS sum (MB)", 0)):
            sv, rv = get(S, k, m), get(R, k, m)
            rows.append((f"{label}: {ml}", fmt(sv, d), fmt(rv, d), ratio(sv, rv)))
    md.append(table(rows) + "\n")
    for who, res in (("Serval", S), ("Ray Serve", R)):
        procs = get(res, "mem_loaded", "procs") or get(res, "mem_idle", "procs")
        if procs:
            md.append(f"{who}, after the load, per process:\n")
            md.append(table([(p["name"], p["pid"], f"{p['rss_kb'] / 1024:.0f}", f"{p['pss_kb'] / 1024:.0f}")
                             for p in sorted(procs, key=lambda p: -p["pss_kb"])],
                            header=("process", "pid", "RSS (MB)", "PSS (MB)")) + "\n")

    md.append("## Serval only: the HTTP front door without Python\n")
    md.append("The same no-op through the Serval proxy in front of native Rust replicas "
              "(`bench/native`: `serval_proxy::Proxy` with a hand-built snapshot, replicas on the frame "
              "protocol over Unix sockets, one tokio thread each; the proxy with the head's default of half "
              "the cores in tokio workers), and a bare hyper hello-world server "
              "(2 tokio workers) as this machine's ceiling for an HTTP front door. The native replicas "
              "take up to 100 requests at a time (`max_concurrent_queries`, the async default), except in "
              "the \"limit 8\" column: 8 is what a sync Python backend gets by default, so that column is "
              "the ceiling for the Python column beside it, a replica whose every request costs nothing "
              "behind the same window of 8.\n")
    native_keys = ("hyper", "native1", "native2", "native1_limit8")
    rows = []
    for c in CONCURRENCIES:
        cols = []
        for key in native_keys:
            v = get(N, key, c)
            cols.append(f"{fmt(get(v, 'rps'), 0)} / {fmt(get(v, 'p50_ms'), 3)} / {fmt(get(v, 'p99_ms'), 3)}")
        v = get(S, "get1", c)
        cols.append(f"{fmt(get(v, 'rps'), 0)} / {fmt(get(v, 'p50_ms'), 3)} / {fmt(get(v, 'p99_ms'), 3)}")
        rows.append((f"c={c}", *cols))
    md.append(table(rows, header=("requests/s / p50 ms / p99 ms", "bare hyper", "Serval proxy → native ×1",
                                  "Serval proxy → native ×2", "Serval proxy → native ×1, limit 8",
                                  "Serval proxy → Python ×1, limit 8")) + "\n")
    errs = [(k, c, get(N, k, c, "errors")) for k in native_keys for c in CONCURRENCIES
            if get(N, k, c, "errors")]
    if errs:
        md.append(f"Errors: {errs}\n")
    rows = [(k, fmt(get(N, f"mem_{k}", "rss_mb"), 1), fmt(get(N, f"mem_{k}", "pss_mb"), 1))
            for k in native_keys]
    md.append(table(rows, header=("process after the load", "RSS (MB)", "PSS (MB)")) + "\n")
    md.extend(v2_report(S, R))
    md.extend(grpc_report(S))
    md.extend(scale_report(get(N, "scale") or {}))
    md.extend(kept_sections())
    return "\n".join(md)


#: Figures of runs this harness does not make (`bench/run soak`, `bench/ab.py`,
#: profiling while the hot path was built), carried into every BENCHMARKS.md
#: it writes.
KEPT = [os.path.join(ROOT, "bench", name) for name in ("SOAK_RESULTS.md", "PERFORMANCE_NOTES.md")]


def kept_sections():
    out = []
    for path in KEPT:
        try:
            with open(path) as f:
                out.append(f.read())
        except OSError:
            pass
    return out


def chunks_per_s(res, c):
    """Chunks/s of the streaming no-op under wrk: its streams/s times the
    chunks of each."""
    rps = get(res, "stream_wrk", c, "rps")
    return None if rps is None or not res.get("chunks") else rps * res["chunks"]


def v2_report(S, R):
    if not any(k in res for res in (S, R) for k in ("stream", "ws", "compose")):
        return []
    c1, cn = V2_CONCURRENCIES[0], V2_CONCURRENCIES[-1]
    md = ["## Ray Serve 2.x API: streaming, WebSockets, composition\n",
          "The same code on both systems (`bench/apps.py`, deployed by `driver_common.deploy_v2` with "
          "`serve.deployment(...).options(...).bind()` and `serve.run`; Serval's `from serval import serve` "
          "runs it unchanged), every deployment with `max_ongoing_requests` 100 and `num_cpus` 0, one "
          "replica each. Streaming: a no-op whose `__call__` returns a `StreamingResponse` of 100 one-byte "
          "chunks, and a plain no-op beside it (the `Noop` class above, deployed the same way), both timed by "
          "the same asyncio HTTP/1.1 client (`bench/aio_load.py`: keep-alive connections, one per concurrent "
          "stream, chunked bodies read by hand so the first body byte is timed when it arrives); chunks/s "
          "from wrk's streams/s (wrk reads each chunked body whole), since the Python client's own cost per "
          "chunk caps its figure (shown too). WebSockets: "
          "a FastAPI app with an echo route, `@serve.ingress`'d on both, driven by the `websockets` package "
          "(each session sends a one-character text message and awaits its echo, one after the other). "
          "Composition: an ingress deployment whose `__call__` awaits `self.model.remote(\"ok\")` on a "
          f"DeploymentHandle to a model deployment, under wrk at c={cn}. The asyncio client is one Python "
          "process on the same cores: at c=64 it, not the server, may be the limit of its figures "
          "(first byte, WebSocket round trips) for both columns.\n"]
    rows = []
    for c in V2_CONCURRENCIES:
        for key, m, label, d in (("stream_plain", "p50_ms", "plain no-op: p50 (ms)", 3),
                                 ("stream", "p50_ms", "stream: time to first byte p50 (ms)", 3),
                                 ("stream", "p99_ms", "stream: time to first byte p99 (ms)", 3),
                                 ("stream_wrk", "rps", "streams/s (wrk)", 0),
                                 ("chunks", None, "chunks/s (wrk: streams/s × 100)", 0),
                                 ("stream", "units_per_s", "chunks/s (the Python client: body bytes, one per yielded chunk)", 0)):
            if key == "chunks":
                sv, rv = chunks_per_s(S, c), chunks_per_s(R, c)
            else:
                sv, rv = get(S, key, c, m), get(R, key, c, m)
            rows.append((f"c={c}, {label}", fmt(sv, d), fmt(rv, d), ratio(sv, rv)))
        gap = [None if get(X, "stream", c, "p50_ms") is None or get(X, "stream_plain", c, "p50_ms") is None
               else get(X, "stream", c, "p50_ms") - get(X, "stream_plain", c, "p50_ms") for X in (S, R)]
        rows.append((f"c={c}, first byte p50 − plain p50 (ms)", fmt(gap[0], 3), fmt(gap[1], 3), ""))
        rows.append((f"c={c}, errors (failed connections; wrk's non-2xx + socket)",
                     fmt(sum(get(S, k, c, "errors") or 0 for k in ("stream_plain", "stream", "stream_wrk"))),
                     fmt(sum(get(R, k, c, "errors") or 0 for k in ("stream_plain", "stream", "stream_wrk"))), ""))
    md.append("### Streaming no-op, 100 chunks\n")
    md.append(table(rows) + "\n")
    rows = []
    for c in V2_CONCURRENCIES:
        for m, label, d in (("per_s", "round trips/s", 0), ("p50_ms", "round trip p50 (ms)", 3),
                            ("p99_ms", "round trip p99 (ms)", 3)):
            sv, rv = get(S, "ws", c, m), get(R, "ws", c, m)
            rows.append((f"{c} session{'s' if c > 1 else ''}: {label}", fmt(sv, d), fmt(rv, d), ratio(sv, rv)))
        rows.append((f"{c} session{'s' if c > 1 else ''}: errors (failed sessions)",
                     fmt(get(S, "ws", c, "errors")), fmt(get(R, "ws", c, "errors")), ""))
    md.append("### WebSocket echo (FastAPI ingress)\n")
    md.append(table(rows) + "\n")
    md.append(f"### Composition: ingress → model through a DeploymentHandle, HTTP GET, concurrency {cn}\n")
    md.append(table(wrk_rows(get(S, "compose"), get(R, "compose"))) + "\n")

    def verdict(ok):
        return "n/a" if ok is None else ("met" if ok else "not met")

    goals = []
    for c in V2_CONCURRENCIES:
        gap = None if get(S, "stream", c, "p50_ms") is None or get(S, "stream_plain", c, "p50_ms") is None \
            else get(S, "stream", c, "p50_ms") - get(S, "stream_plain", c, "p50_ms")
        goals.append(f"first byte within 0.2 ms of a plain request's p50 at c={c}: "
                     f"{verdict(None if gap is None else gap <= 0.2)} ({fmt(gap, 3)} ms)")
    for c in V2_CONCURRENCIES:
        sv, rv = chunks_per_s(S, c), chunks_per_s(R, c)
        goals.append(f"streaming chunks/s ≥ 20× Ray's at c={c}: {verdict(None if not rv or sv is None else sv / rv >= 20)} "
                     f"({ratio(sv, rv)})")
    sv, rv = get(S, "compose", "rps"), get(R, "compose", "rps")
    goals.append(f"composition ≥ 20× Ray's at c={cn}: {verdict(None if not rv or sv is None else sv / rv >= 20)} "
                 f"({ratio(sv, rv)})")
    md.append("Issue 23's goals: " + "; ".join(goals) + ".\n")
    return md


def grpc_report(S):
    if not S.get("grpc"):
        return []
    md = ["## Serval only: gRPC unary no-op beside the HTTP GET no-op\n",
          "A Cortex gRPC API (`handler.protobuf_path`; one replica, one thread) whose method returns an "
          "empty message, called through the proxy's HTTP port over one HTTP/2 connection by "
          "`serval-bench grpc-load` (a small Rust driver: no ghz here), beside the HTTP GET no-op above "
          "(wrk, HTTP/1.1 keep-alive). The proxy terminates gRPC and sends each call to the replica "
          "as frames on the connection HTTP requests take (issue 25); `bench/run grpc` compares it with "
          "the grpcio forwarding path and a bare grpcio server (bench/GRPC_RESULTS.md).\n"]
    rows = []
    for c in CONCURRENCIES:
        g, h = get(S, "grpc", c) or {}, get(S, "get1", c) or {}
        rows.append((f"c={c}", f"{fmt(g.get('rps'), 0)} / {fmt(g.get('p50_ms'), 3)} / {fmt(g.get('p99_ms'), 3)}",
                     f"{fmt(h.get('rps'), 0)} / {fmt(h.get('p50_ms'), 3)} / {fmt(h.get('p99_ms'), 3)}",
                     ratio(g.get("rps"), h.get("rps"))))
    md.append(table(rows, header=("requests/s / p50 ms / p99 ms", "gRPC unary", "HTTP GET", "gRPC / HTTP"))
              + "\n")
    return md


def scale_report(sc):
    steps = sc.get("steps") or {}
    if not steps and not sc.get("errors"):
        return []
    sizes = sorted(steps, key=int)
    md = [f"## Serval only: {', '.join(map(str, sizes)) or 'several'} endpoints on one machine\n",
          "Each endpoint has its own backend with one Python replica (the same no-op), so 100 endpoints "
          "are 100 replica processes (`SERVAL_NUM_CPUS` raised to allow it). At each size: one endpoint "
          "at concurrency 1 (the proxy's routing latency as the route table grows), requests spread "
          f"round-robin over every endpoint at concurrency {SCALE_CONCURRENCY}, and the memory of the head "
          "process, which holds the controller, the proxy and the node agent.\n"]
    for e in sc.get("errors", []):
        md.append(f"**Scale error:** `{e}`\n")
    rows = []
    for n in sizes:
        st = steps[n]
        one, spread = st.get("one_c1") or {}, st.get("spread") or {}
        rows.append((str(n), fmt(st.get("deploy_s"), 1),
                     f"{fmt(one.get('p50_ms'), 3)} / {fmt(one.get('p99_ms'), 3)}",
                     fmt(spread.get("rps"), 0),
                     f"{fmt(spread.get('p50_ms'), 2)} / {fmt(spread.get('p99_ms'), 2)}",
                     f"{fmt(get(st, 'mem_head', 'rss_mb'), 1)} / {fmt(get(st, 'mem_head', 'pss_mb'), 1)}",
                     fmt(get(st, 'mem_head_after', 'pss_mb'), 1),
                     f"{fmt(get(st, 'mem_all', 'count'))} / {fmt(get(st, 'mem_all', 'pss_mb'), 0)}"))
    md.append(table(rows, header=("endpoints", "deploy of the new ones (s)", "one endpoint, c=1: p50 / p99 ms",
                                  f"spread over all, c={SCALE_CONCURRENCY}: req/s", "… p50 / p99 ms",
                                  "head RSS / PSS (MB)", "head PSS after the load (MB)",
                                  "cluster processes / PSS (MB)")) + "\n")
    return md


def main():
    t0 = time.monotonic()
    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    log(f"logs in {LOG_DIR}")
    S, R, N = {"errors": []}, {"errors": []}, {"errors": []}
    try:
        if ONLY in ("", "serval", "v2"):
            S = run_system("serval", SERVAL_PY, "serval_driver.py", {
                "BENCH_HTTP_PORT": str(free_port()),
                "SERVAL_CONTROL_PORT": str(free_port()),
                "BENCH_DATA_DIR": tempfile.mkdtemp(prefix="serval-bench-data-"),
                "SERVAL_NUM_CPUS": "4",
            })
        if ONLY in ("", "ray", "v2"):
            if PEER_UNAVAILABLE:
                log(f"ray: skipped: {PEER_UNAVAILABLE}")
            else:
                R = run_system("ray", PEER_PY, "ray_driver.py", {
                    "BENCH_HTTP_PORT": str(free_port()),
                    "BENCH_NUM_CPUS": "2",
                    # Ray starts its workers (Serve's replicas, proxy and
                    # controller) at nice 15; on a machine shared with
                    # builds that starves them, so run them at nice 0 like
                    # Serval's replicas.
                    "RAY_worker_niceness": "0",
                })
        if ONLY in ("", "native"):
            log("native: bare hyper and the proxy in front of native replicas")
            N = run_native()
        if ONLY in ("", "scale"):
            log(f"scale: Serval with {', '.join(map(str, SCALE_STEPS))} endpoints")
            N["scale"] = run_scale()
    except KeyboardInterrupt:
        log(f"interrupted: not writing {OUT}")
        return 130
    load_after = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    md = report(S, R, N, time.monotonic() - t0, load_before, load_after)
    raw = {"serval": S, "ray": R, "native": N, "meta": {"seconds": time.monotonic() - t0,
           "load_before": load_before, "load_after": load_after, "peer_unavailable": PEER_UNAVAILABLE}}
    with open(os.path.join(LOG_DIR, "results.json"), "w") as f:
        json.dump(raw, f, indent=1, default=str)
    if ONLY == "":
        with open(OUT, "w") as f:
            f.write(md)
        log(f"wrote {OUT}")
    else:
        log(f"BENCH_ONLY={ONLY}: not writing {OUT}")
    print(md)
    log(f"raw results and logs: {LOG_DIR}")
    # Serval's own failures fail the run; the peer's are reported only.
    failed = any(res.get("errors") for res in (S, N, N.get("scale", {})))
    return 1 if failed else 0


def rerender(path):
    """``harness.py --report results.json``: writes the report of an earlier
    run again (e.g. after a change to the report's layout)."""
    global PEER_UNAVAILABLE
    with open(path) as f:
        raw = json.load(f)
    meta = raw.get("meta", {})
    PEER_UNAVAILABLE = meta.get("peer_unavailable", PEER_UNAVAILABLE)
    md = report(raw["serval"], raw["ray"], raw["native"], meta.get("seconds", 0),
                meta.get("load_before", "?"), meta.get("load_after", "?"))
    with open(OUT, "w") as f:
        f.write(md)
    print(md)
    log(f"wrote {OUT} from {path}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--report":
        sys.exit(rerender(sys.argv[2]))

    def _term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _term)
    sys.exit(main())
