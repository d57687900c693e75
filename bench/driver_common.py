"""What bench/serval_driver.py and bench/ray_driver.py share: the command
loop the harness talks to (one JSON object a line on stdin; answers on
stdout as lines starting with ``@@BENCH ``, so library chatter on stdout is
ignored), first-200 polling and the ServeHandle timings.
"""

import json
import sys
import time
import traceback
import urllib.error
import urllib.request

PREFIX = "@@BENCH "


def reply(obj):
    sys.stdout.write(PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve_commands(handlers):
    """Runs ``handlers[cmd](**args)`` for each command line until stdin
    closes or the command is ``exit``."""
    reply({"ok": True, "ready": True, "t": time.monotonic()})
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        msg = json.loads(line)
        cmd = msg.pop("cmd")
        if cmd == "exit":
            reply({"ok": True})
            return
        try:
            out = handlers[cmd](**msg) or {}
            out["ok"] = True
        except BaseException as e:  # report everything, the harness decides
            out = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        reply(out)


def wait_for_200(url, timeout=300.0, interval=0.01):
    """Polls ``url`` until it answers 200; returns the monotonic time of
    that answer."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    r.read()
                    return time.monotonic()
                last = r.status
        except urllib.error.HTTPError as e:
            last = e.code
        except (OSError, urllib.error.URLError) as e:
            last = repr(e)
        time.sleep(interval)
    raise TimeoutError(f"{url} did not answer 200 within {timeout} s (last: {last})")


def percentile(sorted_values, p):
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, int(round(p / 100.0 * (len(sorted_values) - 1)))))
    return sorted_values[k]


def latency_stats(samples_s):
    s = sorted(samples_s)
    n = len(s)
    if n == 0:
        return {"n": 0, "mean_ms": None, "p50_ms": None, "p99_ms": None}
    return {
        "n": n,
        "mean_ms": 1000.0 * sum(s) / n,
        "p50_ms": 1000.0 * percentile(s, 50),
        "p99_ms": 1000.0 * percentile(s, 99),
    }


WARM_UP_S = 0.5


def time_sequential(call, n, expect, budget_s=120.0):
    """``n`` calls one after the other: latency per call. ``call(timeout_s)``
    returns the result. Bounded in time: stops after ``budget_s``."""
    t0 = time.perf_counter()
    # Warm-up: at least 50 calls and half a second. Right after the HTTP
    # load of the scenario before, the first ~0.2 s of calls run measurably
    # slower on this kind of VM while the machine settles (no process of
    # either system uses CPU then), which is not the handle's latency.
    warm = 0
    while warm < min(50, n) or time.perf_counter() - t0 < WARM_UP_S:
        call(budget_s)
        warm += 1
    samples = []
    errors = 0
    timed_out = False
    for _ in range(n):
        left = budget_s - (time.perf_counter() - t0)
        if left <= 0:
            timed_out = True
            break
        t = time.perf_counter()
        try:
            ok = call(left) == expect
        except Exception:
            ok = False
        samples.append(time.perf_counter() - t)
        errors += 0 if ok else 1
    out = latency_stats(samples)
    out.update({"errors": errors + (n - len(samples)), "calls_per_s": len(samples) / sum(samples) if samples else 0.0,
                "completed": len(samples), "timed_out": timed_out, "budget_s": budget_s})
    return out


def time_concurrent(submit, wait, cancel, n, expect, budget_s=120.0):
    """``n`` calls submitted at once, then all waited for: throughput.
    ``wait(pending, timeout_s)`` returns the result. Bounded in time: calls
    not done ``budget_s`` after the start count as not completed and are
    cancelled (``cancel(pending)``), so they do not load the next scenario."""
    t = time.perf_counter()
    pending = [submit() for _ in range(n)]
    submitted = time.perf_counter() - t
    errors = 0
    done = 0
    timed_out = False
    for p in pending:
        left = budget_s - (time.perf_counter() - t)
        if left <= 0:
            timed_out = True
            break
        try:
            ok = wait(p, left) == expect
            done += 1
            errors += 0 if ok else 1
        except Exception:
            if budget_s - (time.perf_counter() - t) <= 0:
                timed_out = True
                break
            done += 1
            errors += 1
    total = time.perf_counter() - t
    if timed_out:
        for p in pending[done:]:
            try:
                cancel(p)
            except Exception:
                pass
    return {"n": n, "completed": done, "seconds": total, "calls_per_s": done / total, "submit_s": submitted,
            "errors": errors + (n - done), "timed_out": timed_out, "budget_s": budget_s}


#: max_ongoing_requests of every deployment of the Ray Serve 2.x scenarios
#: (both systems; Ray's default is 5): a c=64 load fits in one replica.
V2_LIMIT = 100


def deploy_v2(serve, base, app):
    """Runs one Ray Serve 2.x application of bench/apps.py with ``serve``
    (``ray.serve`` or ``serval.serve``: the same code) under ``/<app>``:
    ``plain`` (the no-op), ``stream`` (the streaming no-op), ``compose``
    (an ingress calling a model through a DeploymentHandle) or ``ws`` (a
    FastAPI ingress with a WebSocket echo at ``/ws/echo``). Every
    deployment takes no CPU, so all fit beside the 1.x no-op."""
    import apps

    def deployment(cls):
        return serve.deployment(cls).options(max_ongoing_requests=V2_LIMIT, ray_actor_options={"num_cpus": 0})

    bound = {
        "plain": lambda: deployment(apps.Noop).bind(),
        "stream": lambda: deployment(apps.NoopStream).bind(),
        "compose": lambda: deployment(apps.Ingress).bind(deployment(apps.Model).bind()),
        "ws": lambda: deployment(serve.ingress(apps.WS_APP)(apps.WebSocketEcho)).bind(),
    }[app]()
    serve.run(bound, name=app, route_prefix=f"/{app}")
    wait_for_200(f"{base}/{app}" + ("/openapi.json" if app == "ws" else ""))
    return {"url": f"{base}/{app}" + ("/echo" if app == "ws" else ""), "chunks": apps.CHUNKS}


def delete_v2(serve, app):
    serve.delete(app)
    return {}
