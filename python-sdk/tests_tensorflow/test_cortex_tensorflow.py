"""Seed 002, "Request handlers", for TensorFlow: ``handler.type:
tensorflow`` APIs deployed with `serve deploy` into a real cluster (run by
`make test-tensorflow`, which installs TensorFlow in its own venv).

The model is a SavedModel saved at test time: a tf.Module with the weights
of a scikit-learn LogisticRegression trained on the iris data scikit-learn
ships. Its ``serving_default`` signature takes "measurements" float
[None, 4] and gives "class_id" int64 [None] and "probabilities" float
[None, 3]; its ``labels`` signature gives "label", a string [None]."""

import hashlib
import io
import json
import os
import shutil
import tarfile
import zipfile

import pytest
import requests

from serval import serve
from serval.cortex.config import ConfigError, load_config
from test_cortex_async_task import submit_async, wait_workload
from test_cortex_batch import wait_ended
from test_cortex_batching import concurrently
from test_cortex_deploy import cli
from conftest import FileServer
from test_cortex_handler import replica_log, wait_for, write_project

tf = pytest.importorskip("tensorflow")
pytest.importorskip("sklearn")

TIMEOUT = 60
#: Long enough that a batch only closes by size while a test runs.
NEVER = 30.0
LABELS = ["iris-setosa", "iris-versicolor", "iris-virginica"]

# The seed's example, with `signature` the SignatureDef map.
SEED_HANDLER = '''import numpy as np

labels = ["iris-setosa", "iris-versicolor", "iris-virginica"]


def pre_inference(sample, signature, metadata):
    # Convert the request payload to a flattened list
    input_name = list(signature["serving_default"].inputs)[0]
    return {
        input_name: [
            sample["sepal_length"],
            sample["sepal_width"],
            sample["petal_length"],
            sample["petal_width"],
        ]
    }

def post_inference(prediction, signature, metadata):
    # Respond with a string label
    predicted_class_id = prediction["class_id"][0]
    return labels[predicted_class_id]
'''

SETOSA = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
VIRGINICA = {"sepal_length": 6.7, "sepal_width": 3.0, "petal_length": 5.2, "petal_width": 2.3}


class IrisModule(tf.Module):
    """Logistic regression as TensorFlow ops, with fixed weights."""

    def __init__(self, coef, intercept):
        super().__init__()
        self.w = tf.Variable(coef.T.astype("float32"))
        self.b = tf.Variable(intercept.astype("float32"))
        self.names = tf.constant(LABELS)

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="measurements")])
    def classify(self, measurements):
        probabilities = tf.nn.softmax(measurements @ self.w + self.b)
        return {"class_id": tf.argmax(probabilities, axis=1), "probabilities": probabilities}

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="measurements")])
    def label(self, measurements):
        return {"label": tf.gather(self.names, self.classify(measurements)["class_id"])}


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory):
    """Two SavedModels of the iris module: ``iris`` (serving_default and
    labels) and ``ambiguous`` (two signatures, neither the default)."""
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    fitted = LogisticRegression(max_iter=1000).fit(x, y)
    module = IrisModule(fitted.coef_, fitted.intercept_)
    root = tmp_path_factory.mktemp("saved_models")
    tf.saved_model.save(module, str(root / "iris"),
                        signatures={"serving_default": module.classify, "labels": module.label})
    tf.saved_model.save(module, str(root / "ambiguous"), signatures={"a": module.classify, "b": module.label})
    return root


def api_config(name="iris", model_path="model", path="handler.py", extra=""):
    """One tensorflow API's serve.yaml entry (no request handler when ``path`` is None)."""
    lines = [f"- name: {name}", "  kind: RealtimeAPI", "  handler:", "    type: tensorflow",
             f"    model_path: {model_path}"]
    if path:
        lines.append(f"    path: {path}")
    return "\n".join(lines) + "\n" + extra


def write(folder, saved_models, config: str, files=None, model="iris"):
    """The project: the SavedModel as ``model/``, the seed's handler, ``files``."""
    shutil.copytree(saved_models / model, folder / "model")
    write_project(folder, {"handler.py": SEED_HANDLER, "serve.yaml": config, **(files or {})})


def deploy(cluster, folder, saved_models, config: str, files=None, model="iris"):
    """Writes the project and deploys it with `serve deploy`, as a user does."""
    write(folder, saved_models, config, files, model)
    out = cli(cluster, "deploy", str(folder))
    assert out.returncode == 0, out.stdout + out.stderr
    return out


# -- the seed's example ------------------------------------------------------


def test_the_seed_style_handler_over_http_and_through_a_handle(cluster, tmp_path, saved_models):
    deploy(cluster, tmp_path / "iris", saved_models, api_config())
    url = f"{cluster.url}/iris"

    r = requests.post(url, json=SETOSA, timeout=TIMEOUT)
    assert (r.status_code, r.text) == (200, "iris-setosa")
    assert requests.post(url, json=VIRGINICA, timeout=TIMEOUT).text == "iris-virginica"
    handle = serve.get_handle("iris").options(http_method="POST")
    assert handle.remote(SETOSA).result() == "iris-setosa"
    assert handle.remote(VIRGINICA).result() == "iris-virginica"

    # A value the model's float input cannot take: 400 naming the input.
    r = requests.post(url, json=dict(SETOSA, sepal_length="abc"), timeout=TIMEOUT)
    assert r.status_code == 400 and "input 'measurements'" in r.json()["error"], r.text
    assert "float32" in r.json()["error"], r.text
    # A model API answers POST only.
    r = requests.get(url, timeout=TIMEOUT)
    assert r.status_code == 405 and r.headers["Allow"] == "POST"
    # The replica still serves after the refusals.
    assert requests.post(url, json=SETOSA, timeout=TIMEOUT).text == "iris-setosa"


def test_without_a_request_handler_inputs_and_outputs_are_named(cluster, tmp_path, saved_models):
    deploy(cluster, tmp_path / "raw", saved_models, api_config(name="raw", path=None))
    url = f"{cluster.url}/raw"

    rows = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
    r = requests.post(url, json={"measurements": rows}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert sorted(body) == ["class_id", "probabilities"]
    assert body["class_id"] == [0, 2]
    assert [len(p) for p in body["probabilities"]] == [3, 3]
    assert all(abs(sum(p) - 1) < 1e-5 for p in body["probabilities"]), body
    # One row without its batch axis gets one.
    r = requests.post(url, json={"measurements": rows[0]}, timeout=TIMEOUT)
    assert r.json()["class_id"] == [0], r.text

    for sample, words in [
        ({"measurements": [[5.1, 3.5, 1.4]]}, ["input 'measurements'", "[None, 4]", "[1, 3]"]),
        ({"measurements": [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]]}, ["input 'measurements'", "[2, 5]"]),
        ({"measurements": [["abc", 3.5, 1.4, 0.2]]}, ["input 'measurements'", "float32"]),
        ({"petals": [[1, 2, 3, 4]]}, ["input 'petals'", "no such input"]),
        ({}, ["input 'measurements'", "missing"]),
        ([1, 2], ["JSON object"]),
    ]:
        r = requests.post(url, json=sample, timeout=TIMEOUT)
        assert r.status_code == 400, (sample, r.text)
        assert all(w in r.json()["error"] for w in words), (words, r.text)


# -- signatures ----------------------------------------------------------------


def test_signature_key_picks_the_signature_served(cluster, tmp_path, saved_models):
    # The labels signature: a string output, answered as text.
    config = api_config(name="labels", path=None, extra="    signature_key: labels\n")
    deploy(cluster, tmp_path / "labels", saved_models, config)
    r = requests.post(f"{cluster.url}/labels", json={"measurements": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]},
                      timeout=TIMEOUT)
    assert (r.status_code, r.json()) == (200, {"label": ["iris-setosa", "iris-virginica"]}), r.text

    # Two signatures, neither serving_default, and no signature_key: the
    # replica fails to start and the deploy lists the signatures.
    write(tmp_path / "ambiguous", saved_models, api_config(name="ambiguous", path=None), model="ambiguous")
    out = cli(cluster, "deploy", str(tmp_path / "ambiguous"))
    assert out.returncode != 0
    assert "handler.signature_key" in out.stderr and "a, b" in out.stderr, out.stderr


# -- model_path over HTTP ----------------------------------------------------


def archive(folder, fmt: str) -> bytes:
    """The SavedModel ``folder`` as a .tar.gz holding its folder, or as a
    .zip holding its files (both forms are accepted)."""
    buf = io.BytesIO()
    if fmt == "tar.gz":
        with tarfile.open(fileobj=buf, mode="w:gz") as t:
            t.add(str(folder), arcname="iris")
        return buf.getvalue()
    with zipfile.ZipFile(buf, "w") as z:
        for root, _, files in os.walk(folder):
            for f in files:
                path = os.path.join(root, f)
                z.write(path, os.path.relpath(path, folder))
    return buf.getvalue()


def _ArchiveServer(data: bytes, name: str) -> FileServer:
    """Serves one archive over HTTP, counting downloads."""
    return FileServer(data, name)


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_an_archive_over_http_is_fetched_and_unpacked_once_per_node(cluster, tmp_path, saved_models, fmt):
    with _ArchiveServer(archive(saved_models / "iris", fmt), f"iris.{fmt}") as server:
        config = api_config(model_path=server.url, extra="  autoscaling: {min_replicas: 2}\n")
        # The project's own model/ is another model: the one served must come over HTTP.
        deploy(cluster, tmp_path / "remote", saved_models, config, model="ambiguous")
        assert requests.post(f"{cluster.url}/iris", json=VIRGINICA, timeout=TIMEOUT).text == "iris-virginica"
        # Two replicas on this one node, one download, one unpacked copy.
        assert len([r for r in serve.status()["replicas"] if r["state"] == "running"]) == 2
        assert server.downloads == [f"/models/iris.{fmt}"]
    cached = os.path.join(cluster.data_dir, "cache", "models", hashlib.sha256(server.url.encode()).hexdigest())
    found = [root for root, _, files in os.walk(cached + ".d") if "saved_model.pb" in files]
    assert len(found) == 1, found


# -- server-side batching ----------------------------------------------------

# Counts pre_inference calls: in a batch every pre_inference runs before the
# first post_inference, so each answer sees the whole batch counted.
COUNTING_HANDLER = '''
labels = ["iris-setosa", "iris-versicolor", "iris-virginica"]
calls = 0


def pre_inference(sample, signature, metadata):
    global calls
    calls += 1
    # The signature has one input: a single list does.
    return [sample["sepal_length"], sample["sepal_width"], sample["petal_length"], sample["petal_width"]]


def post_inference(prediction, signature, metadata):
    served = signature[metadata["key"]]
    return {"label": labels[prediction["class_id"][0]], "rows": len(prediction["probabilities"]),
            "calls": calls, "outputs": sorted(served.outputs), "type": type(served).__name__,
            "signatures": sorted(signature)}
'''


def test_batched_requests_run_as_one_model_call_and_are_split_back(cluster, tmp_path, saved_models):
    extra = (f"    metadata: {{key: serving_default}}\n    log_level: debug\n"
             f"    server_side_batching: {{max_batch_size: 8, batch_interval: {NEVER}}}\n")
    deploy(cluster, tmp_path / "batched", saved_models, api_config(path="counting.py", extra=extra),
           files={"counting.py": COUNTING_HANDLER})
    url = f"{cluster.url}/iris"

    # 8 concurrent requests, one of them bad: one batch, closed by its size.
    samples = [SETOSA, VIRGINICA] * 3 + [SETOSA, dict(SETOSA, petal_width="wide")]
    responses = concurrently(lambda s: requests.post(url, json=s, timeout=TIMEOUT), samples)
    good = [r.json() for r in responses[:7]]
    assert [g["label"] for g in good] == ["iris-setosa", "iris-virginica"] * 3 + ["iris-setosa"]
    assert all(g["rows"] == 1 and g["calls"] == 8 for g in good), good
    # `signature` is the SignatureDef map, without the init op's entry.
    assert (good[0]["outputs"], good[0]["type"], good[0]["signatures"]) == \
        (["class_id", "probabilities"], "SignatureDef", ["labels", "serving_default"])
    assert responses[7].status_code == 400 and "input 'measurements'" in responses[7].json()["error"]
    # The 7 good ones went through the model together.
    wait_for(lambda: "7 requests in one model call" in replica_log(cluster, "iris"), what="the batch's log line")


# -- config --------------------------------------------------------------------


def _load(tmp_path, saved_models, config: str):
    write(tmp_path, saved_models, config, files={"empty/README": "not a SavedModel\n"})
    return load_config(str(tmp_path))[1]


def test_a_tensorflow_api_config_is_normalised(tmp_path, saved_models):
    (api,) = _load(tmp_path, saved_models, api_config(extra="    metadata: {threshold: 0.5}\n"
                                                            "    signature_key: labels\n"))
    h = api["handler"]
    assert (h["type"], h["model_path"], h["path"], h["metadata"], h["signature_key"]) == \
        ("tensorflow", "model", "handler.py", {"threshold": 0.5}, "labels")
    assert "runtime" not in h and "config" not in h
    for model_path in ("https://example.com/iris.tar.gz", "/models/iris"):
        shutil.rmtree(tmp_path / "model")
        (api,) = _load(tmp_path, saved_models, api_config(path=None, model_path=model_path))
        assert (api["handler"]["model_path"], api["handler"]["signature_key"]) == (model_path, None)


@pytest.mark.parametrize("config, field, words", [
    (api_config().replace("    model_path: model\n", ""), "handler.model_path", "required"),
    (api_config(model_path="nope"), "handler.model_path", "no such directory"),
    (api_config(model_path="handler.py"), "handler.model_path", "no such directory"),
    (api_config(model_path="empty"), "handler.model_path", "not a SavedModel directory"),
    (api_config(model_path="../model"), "handler.model_path", "inside the project"),
    (api_config(model_path="s3://bucket/model"), "handler.model_path", "http(s) URL"),
    (api_config(path="nope.py"), "handler.path", "no such file"),
    (api_config(extra="    signature_key: [a]\n"), "handler.signature_key", "non-empty string"),
    (api_config(extra="    runtime: native\n"), "handler.runtime", "unknown key"),
    (api_config(extra="    metadata: [1, 2]\n"), "handler.metadata", "mapping"),
])
def test_bad_tensorflow_fields_are_named(tmp_path, saved_models, config, field, words):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, saved_models, config)
    assert f'api "iris": {field}:' in str(e.value) and words in str(e.value), str(e.value)


# -- Cortex 0.35's TensorFlow handler: handler.models, Handler(tensorflow_client, config) --

# Cortex's tensorflow iris-classifier test API: the payload holds the
# model's inputs; predict answers output name -> flat list of values.
CLIENT_HANDLER = '''labels = ["iris-setosa", "iris-versicolor", "iris-virginica"]


class Handler:
    def __init__(self, tensorflow_client, config):
        self.client = tensorflow_client
        self.config = config

    def handle_post(self, payload, query_params):
        if "model" not in query_params:
            prediction = self.client.predict(payload)
            return {"label": labels[int(prediction["class_id"][0])], "config": self.config}
        return self.client.predict(payload, query_params["model"], query_params.get("version", "latest"))
'''

MEASURE_SETOSA = {"measurements": [5.1, 3.5, 1.4, 0.2]}
MEASURE_VIRGINICA = {"measurements": [6.7, 3.0, 5.2, 2.3]}


def client_config(models: str, extra: str = "") -> str:
    return ("- name: iris\n  kind: RealtimeAPI\n  handler:\n    type: tensorflow\n    path: handler.py\n"
            f"    config: {{greeting: hi}}\n    models:\n{models}" + extra)


def test_the_0_35_tensorflow_handler_predicts_through_its_client(cluster, tmp_path, saved_models):
    # One model (models.path), as Cortex's iris-classifier.
    one = tmp_path / "one"
    write(one, saved_models, client_config("      path: model\n"), files={"handler.py": CLIENT_HANDLER})
    out = cli(cluster, "deploy", str(one))
    assert out.returncode == 0, out.stdout + out.stderr
    r = requests.post(f"{cluster.url}/iris", json=MEASURE_SETOSA, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json() == {"label": "iris-setosa", "config": {"greeting": "hi"}}, r.text

    # Several, by name (models.paths, one with its own signature) and by
    # folder with numbered versions (models.dir).
    many = tmp_path / "many"
    models = ("      paths:\n        - {name: classifier, path: model}\n"
              "        - {name: labeller, path: model, signature_key: labels}\n")
    write(many, saved_models, client_config(models).replace("name: iris", "name: iris-many"),
          files={"handler.py": CLIENT_HANDLER})
    # An absolute dir, read where it is: versions added later are served.
    live = tmp_path / "live"
    shutil.copytree(saved_models / "iris", live / "iris" / "3")
    shutil.copytree(saved_models / "iris", live / "iris" / "12")
    write_project(many, {"dir.yaml": client_config(f"      dir: {live}\n", "  networking: {endpoint: by-dir}\n")
                  .replace("name: iris", "name: iris-dir")})
    for extra in ([], ["--config", str(many / "dir.yaml")]):
        out = cli(cluster, "deploy", str(many), *extra)
        assert out.returncode == 0, out.stdout + out.stderr
    url = f"{cluster.url}/iris-many"
    labelled = requests.post(url, params={"model": "labeller"}, json=MEASURE_VIRGINICA, timeout=TIMEOUT)
    assert labelled.status_code == 200 and labelled.json() == {"label": ["iris-virginica"]}, labelled.text
    classified = requests.post(url, params={"model": "classifier"}, json=MEASURE_SETOSA, timeout=TIMEOUT).json()
    assert classified["class_id"] == [0] and len(classified["probabilities"]) == 3, classified
    for version in ("3", "12", "latest"):  # the models load at first use
        r = requests.post(f"{cluster.url}/by-dir", params={"model": "iris", "version": version},
                          json=MEASURE_VIRGINICA, timeout=TIMEOUT)
        assert r.status_code == 200 and r.json()["class_id"] == [2], r.text
    # A version or a model it does not have: 404, naming it.
    r = requests.post(f"{cluster.url}/by-dir", params={"model": "iris", "version": "13"}, json=MEASURE_SETOSA,
                      timeout=TIMEOUT)
    assert r.status_code == 404 and "no version 13" in r.text, r.text
    r = requests.post(url, params={"model": "nope"}, json=MEASURE_SETOSA, timeout=TIMEOUT)
    assert r.status_code == 404 and "'nope'" in r.text, r.text
    # A version folder added while serving is served at the next call.
    shutil.copytree(saved_models / "iris", live / "iris" / "13")
    r = requests.post(f"{cluster.url}/by-dir", params={"model": "iris", "version": "13"}, json=MEASURE_VIRGINICA,
                      timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["class_id"] == [2], r.text


@pytest.mark.parametrize("models, field, words", [
    ("      path: model\n      cache_size: 2\n", "handler.models", "go together"),
    ("      signature_key: labels\n", "handler.models", "exactly one of path, paths or dir"),
    ("      path: nope\n", "handler.models.path", "no such directory"),
    ("      paths: [{name: a, path: model}, {name: a, path: model}]\n", "handler.models.paths[1].name", "twice"),
    ("      paths: [{name: a, path: model, version: 1}]\n", "handler.models.paths[0].version", "unknown key"),
    ("      dir: s3://bucket/models\n", "handler.models.dir", "not fetched"),
])
def test_bad_0_35_tensorflow_models_are_named(tmp_path, saved_models, models, field, words):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, saved_models, client_config(models))
    assert f'api "iris": {field}:' in str(e.value) and words in str(e.value), str(e.value)


# -- handler.type: tensorflow in a BatchAPI and an AsyncAPI ---------------------

# Cortex's batch/tensorflow and async/tensorflow test APIs, the model a
# SavedModel folder of the project (Cortex's were on S3):
# Handler(tensorflow_client, config, job_spec) with handle_batch and
# on_job_complete, and Handler(config, tensorflow_client) with handle_async.
BATCH_CLIENT_HANDLER = '''import json, os

labels = ["iris-setosa", "iris-versicolor", "iris-virginica"]


class Handler:
    def __init__(self, tensorflow_client, config, job_spec):
        self.client = tensorflow_client
        self.out = config["out"]
        self.job_id = job_spec["job_id"]

    def handle_batch(self, payload, batch_id):
        classes = self.client.predict({"measurements": payload})["class_id"]
        with open(os.path.join(self.out, batch_id + ".json"), "w") as f:
            json.dump([labels[int(c)] for c in classes], f)

    def on_job_complete(self):
        with open(os.path.join(self.out, "complete-" + self.job_id), "w") as f:
            f.write("done")
'''

ASYNC_CLIENT_HANDLER = '''labels = ["iris-setosa", "iris-versicolor", "iris-virginica"]


class Handler:
    def __init__(self, config, tensorflow_client):
        self.client = tensorflow_client
        self.config = config

    def handle_async(self, payload, request_id):
        prediction = self.client.predict(payload)
        return {"label": labels[int(prediction["class_id"][0])], "request_id": request_id, "config": self.config}
'''

QUEUED_CONFIG = """- name: iris-batch
  kind: BatchAPI
  handler:
    type: tensorflow
    path: batch.py
    models:
      path: model
- name: iris-async
  kind: AsyncAPI
  handler:
    type: tensorflow
    path: async.py
    config: {greeting: hi}
    models:
      path: model
"""


def test_the_0_35_tensorflow_handler_runs_batch_jobs_and_async_submissions(cluster, tmp_path, saved_models):
    project = tmp_path / "project"
    write(project, saved_models, QUEUED_CONFIG,
          files={"batch.py": BATCH_CLIENT_HANDLER, "async.py": ASYNC_CLIENT_HANDLER})
    out = cli(cluster, "deploy", str(project))
    assert out.returncode == 0, out.stdout + out.stderr

    # A job of three batches of two: each batch is one predict call.
    results = tmp_path / "results"
    results.mkdir()
    items = [MEASURE_SETOSA["measurements"], MEASURE_VIRGINICA["measurements"]] * 3
    r = requests.post(f"{cluster.url}/iris-batch", timeout=TIMEOUT,
                      json={"workers": 1, "config": {"out": str(results)},
                            "item_list": {"items": items, "batch_size": 2}})
    assert r.status_code == 200, r.text
    job_id = r.json()["job_id"]
    st = wait_ended(f"{cluster.url}/iris-batch", job_id, timeout=240)
    assert st["status"] == "status_succeeded" and st["batch_metrics"]["succeeded"] == 3, st
    written = sorted(f for f in os.listdir(results) if f.endswith(".json"))
    assert len(written) == 3, written
    for name in written:
        assert json.loads((results / name).read_text()) == ["iris-setosa", "iris-virginica"], name
    assert (results / f"complete-{job_id}").read_text() == "done"

    # A submission, and one whose payload lacks the model's input: failed,
    # naming it (the client's ValueError, as Cortex's).
    url = f"{cluster.url}/iris-async"
    request_id = submit_async(url, MEASURE_VIRGINICA)
    done = wait_workload(url, request_id, "completed", timeout=240)
    assert done["result"] == {"label": "iris-virginica", "request_id": request_id, "config": {"greeting": "hi"}}, done
    failed = wait_workload(url, submit_async(url, {"petals": [1, 2]}), "failed")
    assert "missing key 'measurements'" in failed["error"], failed
