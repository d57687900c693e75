"""Issue 10.6: ``handler.runtime: native``, an ONNX model run by tract inside
the Rust replica. The same iris model (converted without skl2onnx's ZipMap,
which tract lacks) is deployed twice, natively and with onnxruntime; both
must give the same answers and the same 400s, the native one without its
POSTs entering Python."""

import functools
import glob
import os

import pytest
import requests

from serval import serve
from serval.cortex.config import ConfigError
from test_cortex_batching import concurrently
from test_cortex_deploy import cli
from test_cortex_handler import replica_log, wait_for, write_project
from test_cortex_onnx import NEVER, SETOSA, TIMEOUT, VIRGINICA, _load, api_config, iris_model

pytest.importorskip("onnxruntime")
pytest.importorskip("skl2onnx")

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]


@functools.lru_cache(maxsize=None)
def plain_iris_model() -> bytes:
    """The iris classifier with plain tensor outputs: label int64 [N] and
    probabilities float [N, 3]."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=1000).fit(x, y)
    onx = convert_sklearn(model, initial_types=[("input", FloatTensorType([None, 4]))],
                          options={id(model): {"zipmap": False}})
    return onx.SerializeToString()


def native_config(name, extra=""):
    return api_config(name=name, path=None, extra="    runtime: native\n" + extra)


def deploy(cluster, folder, config, model=None):
    write_project(folder, {"model.onnx": model or plain_iris_model(), "serve.yaml": config})
    return cli(cluster, "deploy", str(folder))


def replica_pids(backend):
    return [int(os.path.basename(p)) for p in glob.glob("/proc/[0-9]*")
            if f" --backend {backend} " in _cmdline(p) and "serval.replica" in _cmdline(p)]


def _cmdline(proc_dir):
    try:
        with open(os.path.join(proc_dir, "cmdline"), "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def thread_names(pid):
    names = []
    for comm in glob.glob(f"/proc/{pid}/task/*/comm"):
        try:
            with open(comm) as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return names


def test_native_and_onnxruntime_give_the_same_answers(cluster, tmp_path):
    config = native_config("native") + api_config(name="ort", path=None)
    out = deploy(cluster, tmp_path / "both", config)
    assert out.returncode == 0, out.stdout + out.stderr
    native, ort = f"{cluster.url}/native", f"{cluster.url}/ort"

    got = requests.post(native, json={"input": ROWS}, timeout=TIMEOUT)
    assert got.status_code == 200 and got.headers["content-type"] == "application/json", got.text
    want = requests.post(ort, json={"input": ROWS}, timeout=TIMEOUT).json()
    body = got.json()
    assert sorted(body) == ["label", "probabilities"] == sorted(want)
    assert body["label"] == want["label"] == [0, 2]
    for got_row, want_row in zip(body["probabilities"], want["probabilities"]):
        assert got_row == pytest.approx(want_row, abs=1e-5)
    # One row without its batch axis gets one, as with onnxruntime.
    assert requests.post(native, json={"input": ROWS[0]}, timeout=TIMEOUT).json()["label"] == [0]

    # The same 400s, word for word.
    for sample in [{"input": [[5.1, 3.5, 1.4]]}, {"input": [["abc", 3.5, 1.4, 0.2]]}, {"petals": [[1, 2, 3, 4]]},
                   {}, [1, 2]]:
        a = requests.post(native, json=sample, timeout=TIMEOUT)
        b = requests.post(ort, json=sample, timeout=TIMEOUT)
        assert a.status_code == b.status_code == 400, (sample, a.text, b.text)
        assert a.json()["error"].split(":")[0] == b.json()["error"].split(":")[0], (a.text, b.text)
    r = requests.post(native, data=b"{not json", headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"], r.text

    # Handle calls run the same model (through the replica's Python side).
    handle = serve.get_handle("native").options(http_method="POST")
    assert handle.remote({"input": ROWS}).result()["label"] == [0, 2]
    # Other methods are the Python side's: a model API answers POST only.
    r = requests.get(native, timeout=TIMEOUT)
    assert r.status_code == 405 and r.headers["Allow"] == "POST"

    # The POSTs were answered by the model's Rust thread: the replica runs
    # one, and onnxruntime was never needed for it.
    (pid,) = replica_pids("native")
    assert "serval-onnx-0" in thread_names(pid)
    assert "onnxruntime" not in open(f"/proc/{pid}/maps").read()


def test_native_batches_stack_requests_into_one_model_run(cluster, tmp_path):
    extra = f"    log_level: debug\n    server_side_batching: {{max_batch_size: 8, batch_interval: {NEVER}}}\n"
    out = deploy(cluster, tmp_path / "batched", native_config("batched", extra))
    assert out.returncode == 0, out.stdout + out.stderr
    url = f"{cluster.url}/batched"

    # 8 concurrent requests, one bad: one batch, closed by its size.
    samples = [{"input": [r]} for r in ROWS] * 3 + [{"input": [ROWS[0]]}, {"input": [["wide", 1, 2, 3]]}]
    responses = concurrently(lambda s: requests.post(url, json=s, timeout=TIMEOUT), samples)
    assert [r.json()["label"] for r in responses[:7]] == [[0], [2]] * 3 + [[0]]
    assert responses[7].status_code == 400 and "input 'input'" in responses[7].json()["error"]
    wait_for(lambda: "one model run for a batch requests=7 rows=7" in replica_log(cluster, "batched"),
             what="the batch's log line")


def test_native_config_and_model_errors_are_named(cluster, tmp_path):
    # A request handler needs Python: refused with the field named.
    with pytest.raises(ConfigError, match=r'api "iris": handler.runtime: .*no request handler'):
        _load(tmp_path / "a", api_config(extra="    runtime: native\n"))
    with pytest.raises(ConfigError, match=r'api "iris": handler.runtime: .*CPUs only'):
        _load(tmp_path / "b", native_config("iris", "  compute: {gpu: 1}\n"))
    with pytest.raises(ConfigError, match=r'api "iris": handler.runtime: must be one of'):
        _load(tmp_path / "c", api_config(path=None, extra="    runtime: tensorrt\n"))

    # skl2onnx's default ZipMap output is an operator tract lacks: the
    # deploy fails and says so.
    out = deploy(cluster, tmp_path / "zipmap", native_config("zipmap"), model=iris_model())
    assert out.returncode != 0
    assert "native" in out.stderr and "ZipMap" in out.stderr, out.stderr
