"""Ray Serve side of bench/run, run with bench/.peer-venv's python (the
latest ``ray[serve]``). Same commands and user code as serval_driver.py,
deployed with the current Ray Serve API (``@serve.deployment``,
``serve.run``, ``DeploymentHandle``).

Environment (set by the harness): BENCH_HTTP_PORT, BENCH_NUM_CPUS.
"""

import os
import time

import driver_common as common
from apps import Echo, Noop

HTTP_PORT = int(os.environ["BENCH_HTTP_PORT"])
NUM_CPUS = int(os.environ.get("BENCH_NUM_CPUS", "2"))
BASE = f"http://127.0.0.1:{HTTP_PORT}"

ray = None
serve = None


def _pids():
    """Every process of the local Ray cluster: the descendants of this
    driver (ray.init starts GCS, raylet, dashboard, ... and the raylet the
    workers, Serve's controller, proxy and replicas among them)."""
    return {"pids": [], "descendants_of": os.getpid()}


def start():
    global ray, serve
    t0 = time.monotonic()
    import ray as _ray
    from ray import serve as _serve
    ray, serve = _ray, _serve
    ray.init(num_cpus=NUM_CPUS, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": HTTP_PORT})
    t_started = time.monotonic()
    serve.run(serve.deployment(Noop).bind(), name="noop", route_prefix="/noop")
    t_first = common.wait_for_200(f"{BASE}/noop")
    out = {
        "cluster_start_s": t_started - t0,
        "deploy_to_200_s": t_first - t_started,
        "t_first_200": t_first,
        "url": f"{BASE}/noop",
        "version": ray.__version__,
    }
    out.update(_pids())
    return out


def pids():
    return _pids()


def handle(seq, conc):
    h = serve.get_app_handle("noop")
    other = h.options(method_name="other")
    out = {}
    out["sequential"] = common.time_sequential(lambda t: h.remote().result(timeout_s=t), seq, "ok")
    out["method"] = common.time_sequential(lambda t: other.remote(1).result(timeout_s=t), seq, 1)
    out["concurrent"] = common.time_concurrent(h.remote, lambda r, t: r.result(timeout_s=t), lambda r: r.cancel(),
                                               conc, "ok")
    return out


def deploy_echo():
    serve.run(serve.deployment(Echo).bind(), name="echo", route_prefix="/echo")
    return {"url": f"{BASE}/echo"}


def delete_echo():
    serve.delete("echo")
    return {}


def scale(n, limit=None):
    """n replicas of the no-op; `limit` sets max_ongoing_requests (Serve's
    max_concurrent_queries)."""
    options = {"num_replicas": n}
    if limit:
        options["max_ongoing_requests"] = limit
    serve.run(serve.deployment(Noop).options(**options).bind(), name="noop", route_prefix="/noop")
    time.sleep(1.0)
    common.wait_for_200(f"{BASE}/noop")
    return _pids()


def shutdown():
    serve.shutdown()
    ray.shutdown()
    return {}


if __name__ == "__main__":
    common.serve_commands({
        "start": start, "pids": pids, "handle": handle, "deploy_echo": deploy_echo,
        "delete_echo": delete_echo,
        "deploy_v2": lambda app: common.deploy_v2(serve, BASE, app),
        "delete_v2": lambda app: common.delete_v2(serve, app),
        "scale": scale, "shutdown": shutdown,
    })
