"""Property: whatever a config file holds, validating it either gives the
API or raises ConfigError naming the field; never another exception
(hypothesis draws YAML-ish values over the keys Cortex configs use)."""

import copy
import warnings

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serval.cortex import config
from serval.cortex.config import ConfigError, load_config, validate_api

KEYS = sorted(set(config.REALTIME_KEYS + config.BATCH_KEYS + config.SPLITTER_KEYS + config.AUTOSCALING_KEYS
                  + config.ONNX_HANDLER_KEYS + config.TENSORFLOW_HANDLER_KEYS + config.HANDLER_KEYS
                  + config.JOBS_KEYS + ("cpu", "gpu", "mem", "inf", "max_surge", "max_unavailable", "endpoint",
                                        "weight", "shadow", "pip", "conda", "max_batch_size", "batch_interval")))
#: Values that mean something to some field: kinds, handler types, files of
#: the project, quantities, durations, URLs, paths.
WORDS = list(config.KINDS + config.HANDLER_TYPES + config.LOG_LEVELS + config.ONNX_RUNTIMES) + [
    "handler.py", "model.onnx", "model", "missing.py", "200m", "1Gi", "-1", "5m", "1m30s", "25%",
    "https://host/model.onnx", "http://", "s3://bucket/", "/abs/path", "../up", "data/", "0" * 64, "iris"]

scalars = (st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats(allow_nan=True)
           | st.sampled_from(WORDS) | st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=5),
                      max_leaves=25)
#: Valid APIs of each kind: the fuzzed ones are these with a few fields
#: replaced, so validation gets past the first checks to every field.
BASES = [
    {"name": "a", "kind": "RealtimeAPI", "handler": {"type": "python", "path": "handler.py", "config": {}},
     "compute": {"cpu": "200m", "mem": "1Gi"}, "autoscaling": {"min_replicas": 1, "max_replicas": 3},
     "update_strategy": {"max_surge": "25%"}, "networking": {"endpoint": "/a"}},
    {"name": "b", "kind": "BatchAPI", "handler": {"path": "handler.py"},
     "jobs": {"allowed_sources": ["data/", "https://host/in/"], "max_batches": 10, "max_bytes": "1Mi"}},
    {"name": "c", "kind": "RealtimeAPI", "handler": {"type": "onnx", "model_path": "https://host/m.onnx",
                                                     "model_sha256": "0" * 64, "model_max_size": "1Gi",
                                                     "server_side_batching": {"max_batch_size": 4,
                                                                              "batch_interval": "10ms"}}},
    {"name": "d", "kind": "RealtimeAPI", "handler": {"type": "tensorflow", "model_path": "model",
                                                     "signature_key": "serving_default"}},
    {"name": "e", "kind": "TrafficSplitter", "apis": [{"name": "a", "weight": 100}]},
]


def paths(node, prefix=()):
    """The path of every value inside ``node`` (dict keys, list indexes)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield prefix + (key,)
        yield from paths(child, prefix + (key,))


def put(api: dict, path: tuple, value) -> None:
    node = api
    for key in path[:-1]:
        child = node[key] if isinstance(node, list) else node.get(key)
        if not isinstance(child, (dict, list)):
            child = {}
            node[key] = child
        node = child
    if isinstance(node, list) and not isinstance(path[-1], int):
        return
    if isinstance(node, dict) or path[-1] < len(node):
        node[path[-1]] = value


@st.composite
def fuzzed_apis(draw) -> dict:
    """A valid API with one to three values replaced or added anywhere."""
    api = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(paths(api))))
        if draw(st.booleans()):
            path = path + (draw(st.sampled_from(KEYS) | st.text(max_size=4)),)
        put(api, path, draw(values))
    return api


apis = fuzzed_apis() | st.dictionaries(st.sampled_from(KEYS), values, max_size=8)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "handler.py").write_text("class Handler:\n    pass\n")
    (folder / "model.onnx").write_bytes(b"")
    (folder / "model").mkdir()
    (folder / "model" / "saved_model.pb").write_bytes(b"")
    return str(folder)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=apis)
def test_validation_raises_only_config_errors(project, raw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            validate_api(raw, 0, project)
        except ConfigError:
            pass


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.lists(apis, max_size=3) | values)
def test_a_config_file_raises_only_config_errors(project, raw):
    path = f"{project}/serve.yaml"
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            load_config(project)
        except ConfigError:
            pass
