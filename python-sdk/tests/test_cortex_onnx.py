"""Seed 002, "Request handlers", for ONNX models: ``handler.type: onnx``
APIs deployed with `serve deploy` into a real cluster. The model is a
scikit-learn classifier trained on the iris data scikit-learn ships,
converted with skl2onnx (input "input" float [None, 4]; outputs
"output_label" int64 [None] and "output_probability", a list of dicts)."""

import functools
import hashlib
import os

import pytest
import requests

from serval import serve
from serval.cortex.config import ConfigError, load_config
from test_cortex_batching import concurrently
from test_cortex_deploy import cli
from conftest import FileServer
from test_cortex_handler import replica_log, wait_for, write_project

pytest.importorskip("onnxruntime")
pytest.importorskip("skl2onnx")

TIMEOUT = 60
#: Long enough that a batch only closes by size while a test runs.
NEVER = 30.0

# The seed's example, character for character.
SEED_HANDLER = '''import numpy as np

labels = ["iris-setosa", "iris-versicolor", "iris-virginica"]


def pre_inference(sample, signature, metadata):
    # Convert the request payload to a flattened list
    return {
        signature[0].name: [
            sample["sepal_length"],
            sample["sepal_width"],
            sample["petal_length"],
            sample["petal_width"],
        ]
    }

def post_inference(prediction, signature, metadata):
    # Respond with a string label
    predicted_class_id = prediction[0][0]
    return labels[predicted_class_id]
'''

SETOSA = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
VIRGINICA = {"sepal_length": 6.7, "sepal_width": 3.0, "petal_length": 5.2, "petal_width": 2.3}


@functools.lru_cache(maxsize=None)  # trained once per test session
def iris_model() -> bytes:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=1000).fit(x, y)
    onx = convert_sklearn(model, initial_types=[("input", FloatTensorType([None, 4]))])
    return onx.SerializeToString()


def api_config(name="iris", model_path="model.onnx", path="handler.py", extra=""):
    """One onnx API's serve.yaml entry (no request handler when ``path`` is None)."""
    lines = [f"- name: {name}", "  kind: RealtimeAPI", "  handler:", "    type: onnx",
             f"    model_path: {model_path}"]
    if path:
        lines.append(f"    path: {path}")
    return "\n".join(lines) + "\n" + extra


def deploy(cluster, folder, config: str, files=None):
    """Writes the project (the iris model, the seed's handler, ``files``)
    and deploys it with `serve deploy`, as a user does."""
    write_project(folder, {"model.onnx": iris_model(), "handler.py": SEED_HANDLER.encode(),
                           "serve.yaml": config, **(files or {})})
    out = cli(cluster, "deploy", str(folder))
    assert out.returncode == 0, out.stdout + out.stderr
    return out


# -- the seed's example ------------------------------------------------------


def test_the_seed_iris_example_over_http_and_through_a_handle(cluster, tmp_path):
    deploy(cluster, tmp_path / "iris", api_config())
    url = f"{cluster.url}/iris"

    r = requests.post(url, json=SETOSA, timeout=TIMEOUT)
    assert (r.status_code, r.text) == (200, "iris-setosa")
    assert requests.post(url, json=VIRGINICA, timeout=TIMEOUT).text == "iris-virginica"
    handle = serve.get_handle("iris").options(http_method="POST")
    assert handle.remote(SETOSA).result() == "iris-setosa"

    # A value the model's float input cannot take: 400 naming the input.
    r = requests.post(url, json=dict(SETOSA, sepal_length="abc"), timeout=TIMEOUT)
    assert r.status_code == 400 and "input 'input'" in r.json()["error"], r.text
    r = requests.post(url, data=b"{not json", headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"], r.text
    # A model API answers POST only.
    r = requests.get(url, timeout=TIMEOUT)
    assert r.status_code == 405 and r.headers["Allow"] == "POST"
    # The replica still serves after the refusals.
    assert requests.post(url, json=SETOSA, timeout=TIMEOUT).text == "iris-setosa"


def test_without_a_request_handler_inputs_and_outputs_are_named(cluster, tmp_path):
    deploy(cluster, tmp_path / "raw", api_config(name="raw", path=None))
    url = f"{cluster.url}/raw"

    r = requests.post(url, json={"input": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert sorted(body) == ["output_label", "output_probability"]
    assert body["output_label"] == [0, 2]
    # The zipmap output: one {class: probability} per row.
    assert [max(p, key=p.get) for p in body["output_probability"]] == ["0", "2"]
    # One row without its batch axis gets one.
    assert requests.post(url, json={"input": [5.1, 3.5, 1.4, 0.2]}, timeout=TIMEOUT).json()["output_label"] == [0]

    for sample, words in [
        ({"input": [[5.1, 3.5, 1.4]]}, ["input 'input'", "[None, 4]", "[1, 3]"]),
        ({"input": [["abc", 3.5, 1.4, 0.2]]}, ["input 'input'", "tensor(float)"]),
        ({"petals": [[1, 2, 3, 4]]}, ["input 'petals'", "no such input"]),
        ({}, ["input 'input'", "missing"]),
        ([1, 2], ["JSON object"]),
    ]:
        r = requests.post(url, json=sample, timeout=TIMEOUT)
        assert r.status_code == 400, (sample, r.text)
        assert all(w in r.json()["error"] for w in words), (words, r.text)


# -- model_path over HTTP ----------------------------------------------------


def _ModelServer() -> FileServer:
    """Serves the iris model over HTTP, counting downloads."""
    return FileServer(iris_model(), "iris.onnx")


def test_a_model_over_http_is_fetched_once_per_node(cluster, tmp_path):
    with _ModelServer() as server:
        config = api_config(model_path=server.url, extra="  autoscaling: {min_replicas: 2}\n")
        # The project's own model.onnx is empty: the model must come over HTTP.
        deploy(cluster, tmp_path / "remote", config, files={"model.onnx": b""})
        assert requests.post(f"{cluster.url}/iris", json=SETOSA, timeout=TIMEOUT).text == "iris-setosa"
        # Two replicas on this one node, one download into the node's cache.
        assert len([r for r in serve.status()["replicas"] if r["state"] == "running"]) == 2
        assert server.downloads == ["/models/iris.onnx"]
        cached = os.path.join(cluster.data_dir, "cache", "models", hashlib.sha256(server.url.encode()).hexdigest())
        assert open(cached, "rb").read() == iris_model()


def test_deploy_errors_name_the_model_path(cluster, tmp_path):
    # A URL that answers 404: the replica fails to start, the deploy says why.
    with _ModelServer() as server:
        missing = server.url.replace("iris.onnx", "gone.onnx")
        write_project(tmp_path / "gone", {"handler.py": SEED_HANDLER, "serve.yaml": api_config(model_path=missing)})
        out = cli(cluster, "deploy", str(tmp_path / "gone"))
    assert out.returncode != 0
    assert "handler.model_path" in out.stderr and "404" in out.stderr, out.stderr
    # No model_path at all: refused before anything is deployed.
    write_project(tmp_path / "none", {"handler.py": SEED_HANDLER,
                                      "serve.yaml": api_config(name="other").replace("    model_path: model.onnx\n", "")})
    out = cli(cluster, "deploy", str(tmp_path / "none"))
    assert out.returncode == 1
    assert 'api "other": handler.model_path: required field is missing' in out.stderr, out.stderr
    assert "other" not in {b["name"] for b in serve.status()["backends"]}


# -- server-side batching ----------------------------------------------------

# Counts pre_inference calls: in a batch every pre_inference runs before the
# first post_inference, so each answer sees the whole batch counted.
COUNTING_HANDLER = '''
labels = ["iris-setosa", "iris-versicolor", "iris-virginica"]
calls = 0


def pre_inference(sample, signature, metadata):
    global calls
    calls += 1
    # The model has one input: a single list does.
    return [sample["sepal_length"], sample["sepal_width"], sample["petal_length"], sample["petal_width"]]


def post_inference(prediction, signature, metadata):
    return {"label": labels[prediction[0][0]], "rows": len(prediction[0]), "calls": calls,
            "tag": metadata["tag"], "outputs": [s.name for s in signature]}
'''


def test_batched_requests_run_as_one_model_call_and_are_split_back(cluster, tmp_path):
    extra = (f"    metadata: {{tag: batched}}\n    log_level: debug\n"
             f"    server_side_batching: {{max_batch_size: 8, batch_interval: {NEVER}}}\n")
    deploy(cluster, tmp_path / "batched", api_config(path="counting.py", extra=extra),
           files={"counting.py": COUNTING_HANDLER})
    url = f"{cluster.url}/iris"

    # 8 concurrent requests, one of them bad: one batch, closed by its size.
    samples = [SETOSA, VIRGINICA] * 3 + [SETOSA, dict(SETOSA, petal_width="wide")]
    responses = concurrently(lambda s: requests.post(url, json=s, timeout=TIMEOUT), samples)
    good = [r.json() for r in responses[:7]]
    assert [g["label"] for g in good] == ["iris-setosa", "iris-virginica"] * 3 + ["iris-setosa"]
    assert all(g["rows"] == 1 and g["calls"] == 8 and g["tag"] == "batched" for g in good), good
    assert good[0]["outputs"] == ["output_label", "output_probability"]
    assert responses[7].status_code == 400 and "input 'input'" in responses[7].json()["error"]
    # The 7 good ones went through the model together.
    wait_for(lambda: "7 requests in one model call" in replica_log(cluster, "iris"), what="the batch's log line")


# -- Cortex 0.35's onnx/iris-classifier and traffic-splitter test APIs --------

# Shaped like Cortex 0.35's onnx/iris-classifier: a python handler (0.35 had
# no onnx type) built with ``model_client`` (0.35's name), whose load_model
# opens the one file of the model's version folder with onnxruntime.
MODEL_CLIENT_HANDLER = """
import os

import numpy as np
import onnxruntime

names = ["setosa", "versicolor", "virginica"]
FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")


class Handler:
    def __init__(self, model_client, config):
        self.models = model_client

    def handle_post(self, payload):
        session = self.models.get_model()
        row = np.array([[payload[k] for k in FEATURES]], dtype="float32")
        (labels,) = session.run(["output_label"], {"input": row})
        return names[int(labels[0])]

    def load_model(self, model_path):
        (file,) = os.listdir(model_path)
        return onnxruntime.InferenceSession(os.path.join(model_path, file))
"""


def test_cortex_035_onnx_iris_and_traffic_splitter_projects(cluster, tmp_path):
    from test_cortex_deploy import RECORDER

    shadow_log = str(tmp_path / "shadow.log")
    # As Cortex's traffic-splitter test API: two iris classifiers 30/70 and
    # a request recorder as the shadow, in one cortex.yaml.
    config = f"""
- name: iris-classifier-onnx
  kind: RealtimeAPI
  handler:
    type: python
    path: onnx_handler.py
    multi_model_reloading:
      path: models/iris
- name: iris-classifier-seed
  kind: RealtimeAPI
  handler: {{type: onnx, path: handler.py, model_path: models/iris/1/iris.onnx}}
- name: request-recorder
  kind: RealtimeAPI
  handler: {{type: python, path: recorder.py, config: {{record: {shadow_log}}}}}
- name: iris-classifier
  kind: TrafficSplitter
  apis:
    - name: iris-classifier-onnx
      weight: 30
    - name: iris-classifier-seed
      weight: 70
    - name: request-recorder
      shadow: true
      weight: 100
"""
    folder = write_project(tmp_path / "split", {
        "models/iris/1/iris.onnx": iris_model(), "handler.py": SEED_HANDLER, "onnx_handler.py": MODEL_CLIENT_HANDLER,
        "recorder.py": RECORDER, "cortex.yaml": config})
    out = cli(cluster, "deploy", folder)
    assert out.returncode == 0, out.stdout + out.stderr

    url = f"{cluster.url}/iris-classifier-onnx"
    r = requests.post(url, json=SETOSA, timeout=TIMEOUT)
    assert (r.status_code, r.text) == (200, "setosa")
    assert requests.post(url, json=VIRGINICA, timeout=TIMEOUT).text == "virginica"
    # The splitter's clients get both classifiers' answers, never the shadow's.
    answers = [requests.post(f"{cluster.url}/iris-classifier", json=SETOSA, timeout=TIMEOUT).text
               for _ in range(40)]
    assert set(answers) == {"setosa", "iris-setosa"}, answers
    wait_for(lambda: os.path.exists(shadow_log) and len(open(shadow_log).read().splitlines()) == 40,
             timeout=TIMEOUT, what="a copy of every request at the shadow")


# -- config --------------------------------------------------------------------


def _load(tmp_path, config: str):
    write_project(tmp_path, {"model.onnx": b"\0", "handler.py": SEED_HANDLER, "serve.yaml": config})
    return load_config(str(tmp_path))[1]


def test_an_onnx_api_config_is_normalised(tmp_path):
    (api,) = _load(tmp_path, api_config(extra="    metadata: {threshold: 0.5}\n"))
    h = api["handler"]
    assert (h["type"], h["model_path"], h["path"], h["metadata"]) == ("onnx", "model.onnx", "handler.py",
                                                                      {"threshold": 0.5})
    assert "config" not in h
    (api,) = _load(tmp_path, api_config(path=None, model_path="https://example.com/m.onnx"))
    assert (api["handler"]["path"], api["handler"]["model_path"], api["handler"]["metadata"]) == \
        (None, "https://example.com/m.onnx", {})
    (api,) = _load(tmp_path, api_config(model_path="/models/iris.onnx"))
    assert api["handler"]["model_path"] == "/models/iris.onnx"


@pytest.mark.parametrize("config, field, words", [
    (api_config().replace("    model_path: model.onnx\n", ""), "handler.model_path", "required"),
    (api_config(model_path="nope.onnx"), "handler.model_path", "no such file"),
    (api_config(model_path="../model.onnx"), "handler.model_path", "inside the project"),
    (api_config(model_path="s3://bucket/model.onnx"), "handler.model_path", "http(s) URL"),
    (api_config(path="nope.py"), "handler.path", "no such file"),
    (api_config(extra="    metadata: [1, 2]\n"), "handler.metadata", "mapping"),
    (api_config(extra="    config: {a: 1}\n"), "handler.config", "unknown key"),
    (api_config(extra="    model_pth: x.onnx\n"), "handler.model_pth", "unknown key"),
    (api_config().replace("type: onnx", "type: tensorflow"), "handler.model_path", "no such directory"),
])
def test_bad_onnx_fields_are_named(tmp_path, config, field, words):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, config)
    assert f'api "iris": {field}:' in str(e.value) and words in str(e.value), str(e.value)


def test_python_handlers_take_no_model_path(tmp_path):
    config = "- name: iris\n  kind: RealtimeAPI\n  handler:\n    path: handler.py\n    model_path: model.onnx\n"
    with pytest.raises(ConfigError, match=r'api "iris": handler.model_path: unknown key'):
        _load(tmp_path, config)
