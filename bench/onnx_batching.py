"""Throughput of an ONNX model API: with and without server-side batching
(issue 10, part 4), and with onnxruntime against the native tract runtime
(part 6). Not run by the tests.

Starts a Serval head on free ports in a temp data dir, deploys an iris
model (a scikit-learn LogisticRegression converted with skl2onnx, or with
``--model mlp`` a 3x1024 MLP of about 8 MB with the same inputs and outputs)
with `serve deploy`, loads each API over HTTP at the given concurrency, one
after the other, and prints a table. The load generator is wrk when
installed (POST with a JSON body, from a Lua script), else a threaded Python
client. Everything it started is stopped at the end.

``--runtime onnxruntime`` (the default): the seed's pre_inference /
post_inference handler, APIs "iris" and "iris-batched". ``--runtime both``:
no request handler (the native runtime takes none; requests name the input),
four APIs: onnxruntime and native, each without and with batching, on the
model converted without ZipMap (which tract lacks).

Run it with a release build of Serval: `bench/run onnx [options]` builds one
into bench/.venv and runs this script there.

    python bench/onnx_batching.py [--concurrency 32] [--duration 8]
        [--max-batch-size 32] [--batch-interval 0.01] [--model iris|mlp]
        [--runtime onnxruntime|both]
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import parse_wrk  # noqa: E402  (bench/ is not a package)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python-sdk", "tests"))

SETOSA = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: A request to a model API without a request handler: the input by name.
RAW_SAMPLE = {"input": [[SETOSA["sepal_length"], SETOSA["sepal_width"], SETOSA["petal_length"],
                         SETOSA["petal_width"]]]}


def mlp_model(width: int = 1024, layers: int = 3, zipmap: bool = True) -> bytes:
    """An MLP classifier on the iris data, large enough (about 8 MB with
    the defaults) that running the model, not serving the request,
    dominates; same inputs and outputs as the iris model."""
    import warnings

    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_iris
    from sklearn.neural_network import MLPClassifier

    x, y = load_iris(return_X_y=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # not trained to convergence: only its size matters here
        model = MLPClassifier(hidden_layer_sizes=(width,) * layers, max_iter=20, random_state=0).fit(x, y)
    options = {id(model): {"zipmap": False}} if not zipmap else None
    return convert_sklearn(model, initial_types=[("input", FloatTensorType([None, 4]))],
                           options=options).SerializeToString()


def apis(runtime: str) -> list:
    """``(name, runtime, batched)`` of the APIs to deploy and load."""
    if runtime == "onnxruntime":
        return [("iris", "onnxruntime", False), ("iris-batched", "onnxruntime", True)]
    return [(f"{rt}{'-batched' if batched else ''}", rt, batched)
            for rt in ("onnxruntime", "native") for batched in (False, True)]


def write_project(folder: str, model: str, runtime: str, max_batch_size: int, batch_interval: float) -> None:
    # The test suite's models and the seed's handler, so the bench measures
    # exactly what the tests check.
    from test_cortex_onnx import SEED_HANDLER, iris_model
    from test_cortex_onnx_native import plain_iris_model

    seed = runtime == "onnxruntime"
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "model.onnx"), "wb") as f:
        if model == "iris":
            f.write(iris_model() if seed else plain_iris_model())
        else:
            f.write(mlp_model(zipmap=seed))
    with open(os.path.join(folder, "handler.py"), "w") as f:
        f.write(SEED_HANDLER)
    config = ""
    for name, rt, batched in apis(runtime):
        config += (f"- name: {name}\n  kind: RealtimeAPI\n  handler:\n    type: onnx\n    model_path: model.onnx\n"
                   f"    runtime: {rt}\n")
        if seed:
            config += "    path: handler.py\n"
        if batched:
            config += (f"    server_side_batching: {{max_batch_size: {max_batch_size}, "
                       f"batch_interval: {batch_interval}}}\n")
    with open(os.path.join(folder, "serve.yaml"), "w") as f:
        f.write(config)


# -- load generators -----------------------------------------------------------


def run_wrk(url: str, sample: dict, concurrency: int, duration: int, workdir: str) -> dict:
    script = os.path.join(workdir, "post.lua")
    with open(script, "w") as f:
        f.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(json.dumps(sample))}\n'
                f'wrk.headers["Content-Type"] = "application/json"\n')
    base = ["wrk", f"-t{min(2, concurrency)}", f"-c{concurrency}", "--timeout", "10s", "--latency", "-s", script]
    subprocess.run(base + ["-d2s", url], capture_output=True, timeout=120)  # warm-up
    out = subprocess.run(base + [f"-d{duration}s", url], capture_output=True, text=True,
                         timeout=duration + 120).stdout
    return parse_wrk(out)


def run_threads(url: str, sample: dict, concurrency: int, duration: int, workdir: str) -> dict:
    """The same load from ``concurrency`` Python threads (keep-alive)."""
    import requests

    latencies, errors, lock = [], [0], threading.Lock()
    deadline = time.monotonic() + duration

    def worker():
        session, mine, bad = requests.Session(), [], 0
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            r = session.post(url, json=sample, timeout=10)
            mine.append(time.perf_counter() - t0)
            bad += r.status_code != 200
        with lock:
            latencies.extend(mine)
            errors[0] += bad

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    latencies.sort()
    pick = lambda p: 1000.0 * latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else None
    return {"rps": len(latencies) / elapsed, "p50_ms": pick(0.5), "p99_ms": pick(0.99), "errors": errors[0]}


# -- the run -------------------------------------------------------------------


def start_cluster(data_dir: str, http_port: int):
    from serval import serve

    os.environ.update(SERVAL_CONTROL_PORT=str(free_port()), SERVAL_DATA_DIR=data_dir, SERVAL_PYTHON=sys.executable)
    for var in ("SERVAL_ADDRESS", "SERVAL_TOKEN"):
        os.environ.pop(var, None)
    serve.start(detached=True, data_dir=data_dir, http_options={"port": http_port})


def stop_cluster(data_dir: str) -> None:
    """serve shutdown, then the head's process group (replicas included)."""
    from serval import serve

    try:
        serve.shutdown(timeout=30)
    except Exception as e:
        print(f"shutdown: {e}", file=sys.stderr)
    try:
        with open(os.path.join(data_dir, "cluster.json")) as f:
            os.killpg(json.load(f)["pid"], signal.SIGKILL)
    except (OSError, ValueError, KeyError):
        pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=int, default=8, help="seconds per measurement (after a 2 s warm-up)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-interval", type=float, default=0.01, help="seconds")
    p.add_argument("--client", choices=("auto", "wrk", "threads"), default="auto")
    p.add_argument("--model", choices=("iris", "mlp"), default="iris",
                   help="iris: the seed's LogisticRegression; mlp: a 3x1024 MLP (about 8 MB)")
    p.add_argument("--runtime", choices=("onnxruntime", "both"), default="onnxruntime",
                   help="onnxruntime: the seed's handler; both: onnxruntime and native, no handler")
    args = p.parse_args()

    import requests

    from serval.cortex.deploy import deploy

    load = run_wrk if args.client == "wrk" or (args.client == "auto" and shutil.which("wrk")) else run_threads
    workdir = tempfile.mkdtemp(prefix="onnx-bench-")
    data_dir = tempfile.mkdtemp(prefix="sv-", dir="/tmp")  # short: replica sockets live there
    http_port = free_port()
    sample = SETOSA if args.runtime == "onnxruntime" else RAW_SAMPLE
    batching_text = f"max {args.max_batch_size}, {args.batch_interval * 1000:g} ms"
    rows = []
    try:
        start_cluster(data_dir, http_port)
        folder = os.path.join(workdir, "iris")
        write_project(folder, args.model, args.runtime, args.max_batch_size, args.batch_interval)
        deploy(folder)
        for name, runtime, batched in apis(args.runtime):
            url = f"http://127.0.0.1:{http_port}/{name}"
            r = requests.post(url, json=sample, timeout=30)
            assert r.status_code == 200, r.text
            res = load(url, sample, args.concurrency, args.duration, workdir)
            rows.append((name, runtime, batching_text if batched else "off", res))
            print(f"{name}: {res}", file=sys.stderr, flush=True)
    finally:
        stop_cluster(data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)

    fmt = lambda v, d=1: "n/a" if v is None else f"{v:,.{d}f}"
    model = "iris LogisticRegression" if args.model == "iris" else "3x1024 MLP"
    handler = "seed 002 handler" if args.runtime == "onnxruntime" else "no request handler"
    print(f"\nONNX {model} model ({handler}), 1 replica, concurrency {args.concurrency}, "
          f"{args.duration} s, client: {load.__name__.replace('run_', '')}, {os.cpu_count()} cores\n")
    print("| API | runtime | server-side batching | requests/s | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for name, runtime, batching, r in rows:
        print(f"| {name} | {runtime} | {batching} | {fmt(r['rps'], 0)} | {fmt(r['p50_ms'], 2)} "
              f"| {fmt(r['p99_ms'], 2)} | {r['errors']} |")
    by_name = {name: r["rps"] for name, _, _, r in rows}
    print()
    for a, b, what in (("iris-batched", "iris", "batched / unbatched"),
                       ("native", "onnxruntime", "native / onnxruntime, unbatched"),
                       ("native-batched", "onnxruntime-batched", "native / onnxruntime, batched")):
        if by_name.get(a) and by_name.get(b):
            print(f"{what}: {by_name[a] / by_name[b]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
