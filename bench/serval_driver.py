"""Serval side of bench/run, run with bench/.venv's python (the release
build of the SDK). Driven by bench/harness.py through driver_common's
command loop; deploys with Serval's Ray Serve 1.x API (the 2.x scenarios:
driver_common.deploy_v2, the same code as on Ray).

Environment (set by the harness): BENCH_HTTP_PORT, BENCH_CONTROL_PORT,
BENCH_DATA_DIR, SERVAL_NUM_CPUS.
"""

import os
import time

import driver_common as common
from apps import Echo, Noop
from grpc_noop import NOOP_GRPC_HANDLER, NOOP_PROTO

import serval
from serval import serve

HTTP_PORT = int(os.environ["BENCH_HTTP_PORT"])
DATA_DIR = os.environ["BENCH_DATA_DIR"]
BASE = f"http://127.0.0.1:{HTTP_PORT}"

state = {}


def _pids():
    snap = serve.status()
    nodes = [n.get("pid") for n in snap.get("nodes", []) if n.get("alive") and n.get("pid")]
    replicas = [r.get("pid") for r in snap.get("replicas", []) if r.get("pid") and r.get("state") == "running"]
    return {"pids": nodes + replicas}


def start():
    """Starts a head (controller, proxy, node agent) and deploys the no-op
    with one replica; times the deploy and the first 200."""
    t0 = time.monotonic()
    serve.start(http_options={"port": HTTP_PORT}, data_dir=DATA_DIR)
    t_started = time.monotonic()
    serve.create_backend("noop", Noop)
    serve.create_endpoint("noop", backend="noop", route="/noop")
    t_first = common.wait_for_200(f"{BASE}/noop")
    out = {
        "cluster_start_s": t_started - t0,
        "deploy_to_200_s": t_first - t_started,
        "t_first_200": t_first,
        "url": f"{BASE}/noop",
        "version": getattr(serval, "__version__", None) or _version(),
    }
    out.update(_pids())
    return out


def _version():
    try:
        from importlib.metadata import version
        return version("serval")
    except Exception:
        return "?"


def pids():
    return _pids()


def handle(seq, conc):
    h = serve.get_handle("noop")
    other = h.options(method_name="other")
    out = {}
    out["sequential"] = common.time_sequential(lambda t: h.remote().result(timeout=t), seq, "ok")
    out["method"] = common.time_sequential(lambda t: serval.get(other.remote(1), timeout=t), seq, 1)
    # No cancel on a ServeFuture: calls left over run out on their own deadline.
    out["concurrent"] = common.time_concurrent(h.remote, lambda f, t: f.result(timeout=t), lambda f: None,
                                               conc, "ok")
    return out


def deploy_echo():
    serve.create_backend("echo", Echo)
    serve.create_endpoint("echo", backend="echo", route="/echo", methods=["POST"])
    return {"url": f"{BASE}/echo"}


def deploy_grpc():
    """A Cortex gRPC API whose unary method returns an empty message (the
    gRPC counterpart of the HTTP no-op) and whose server-streaming methods
    yield 100 of them (of the streaming no-op), one a sync generator, one
    an async generator; one replica, one thread."""
    import tempfile

    from serval.cortex.deploy import deploy

    folder = tempfile.mkdtemp(prefix="grpc-noop-")
    for name, text in (("noop.proto", NOOP_PROTO), ("handler.py", NOOP_GRPC_HANDLER),
                       ("serve.yaml", "- name: grpc-noop\n  kind: RealtimeAPI\n  handler:\n"
                                      "    path: handler.py\n    protobuf_path: noop.proto\n"
                                      "  autoscaling: {min_replicas: 1, max_replicas: 1}\n")):
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    deploy(folder)
    return {"address": f"127.0.0.1:{HTTP_PORT}", "method": "/bench.Noop/Call", "stream_method": "/bench.Noop/Stream",
            "async_stream_method": "/bench.Noop/AsyncStream", "stream_messages": 100}


def delete_echo():
    serve.delete_endpoint("echo")
    serve.delete_backend("echo")
    deadline = time.monotonic() + 60
    while any(r.get("backend") == "echo" for r in serve.status().get("replicas", [])):
        if time.monotonic() > deadline:
            raise TimeoutError("echo replicas still listed after 60 s")
        time.sleep(0.1)
    return {}


def scale(n, limit=None):
    """n replicas of the no-op; `limit` sets max_concurrent_queries."""
    config = {"num_replicas": n}
    if limit:
        config["max_concurrent_queries"] = limit
    serve.update_backend_config("noop", config)
    deadline = time.monotonic() + 120
    while True:
        running = [r for r in serve.status().get("replicas", [])
                   if r.get("backend") == "noop" and r.get("state") == "running"]
        if len(running) == n:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"noop has {len(running)} running replicas, not {n}, after 120 s")
        time.sleep(0.1)
    time.sleep(1.0)  # proxies follow the snapshot stream
    common.wait_for_200(f"{BASE}/noop")
    return _pids()


def scale_start():
    """A cluster for the scale scenario: no backend yet."""
    serve.start(http_options={"port": HTTP_PORT}, data_dir=DATA_DIR)
    return {}


def scale_grow(total, parallel=4):
    """Grows the scale cluster to ``total`` endpoints, each with its own
    one-replica backend (/tiny/<i>), and waits until every one answers."""
    from concurrent.futures import ThreadPoolExecutor

    have = state.get("tiny", 0)
    t0 = time.monotonic()

    def deploy(i):
        serve.create_backend(f"tiny{i}", Noop)
        serve.create_endpoint(f"tiny{i}", backend=f"tiny{i}", route=f"/tiny/{i}")

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(deploy, range(have, total)))
    for i in range(total):
        common.wait_for_200(f"{BASE}/tiny/{i}")
    state["tiny"] = total
    snap = serve.status()
    head = [n.get("pid") for n in snap.get("nodes", []) if n.get("alive") and n.get("pid")]
    out = {"deploy_s": time.monotonic() - t0, "added": total - have, "head_pids": head,
           "base": BASE}
    out.update(_pids())
    return out


def shutdown():
    serve.shutdown()
    return {}


if __name__ == "__main__":
    common.serve_commands({
        "start": start, "pids": pids, "handle": handle, "deploy_echo": deploy_echo, "deploy_grpc": deploy_grpc,
        "delete_echo": delete_echo,
        "deploy_v2": lambda app: common.deploy_v2(serve, BASE, app),
        "delete_v2": lambda app: common.delete_v2(serve, app),
        "scale": scale, "shutdown": shutdown,
        "scale_start": scale_start, "scale_grow": scale_grow,
    })
