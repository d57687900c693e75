"""serve.yaml validation and project packaging (no cluster needed)."""

import io
import os
import tarfile

import pytest

from serval.cortex.config import ConfigError, load_config, read_dotenv
from serval.cortex.package import MAX_PACKAGE_BYTES, build_package, ensure_unpacked

HANDLER = "class Handler:\n    def __init__(self, config):\n        pass\n"


def project(tmp_path, config: str, files=None, name="serve.yaml"):
    (tmp_path / "handler.py").write_text(HANDLER)
    for rel, content in (files or {}).items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
    (tmp_path / name).write_text(config)
    return str(tmp_path)


MINIMAL = """
- name: iris
  kind: RealtimeAPI
  handler:
    type: python
    path: handler.py
"""


def test_a_minimal_api_gets_cortex_defaults(tmp_path):
    path, apis = load_config(project(tmp_path, MINIMAL))
    assert os.path.basename(path) == "serve.yaml"
    (api,) = apis
    assert api["name"] == "iris" and api["endpoint"] == "/iris"
    assert api["compute"] == {"cpu": 0.2, "gpu": 0, "mem": None}
    a = api["autoscaling"]
    assert (a["min_replicas"], a["max_replicas"], a["init_replicas"]) == (1, 100, 1)
    assert a["max_replica_concurrency"] == 1024
    assert a["target_replica_concurrency"] == 1.0
    assert (a["window"], a["downscale_stabilization_period"], a["upscale_stabilization_period"]) == (60, 300, 60)
    assert api["handler"]["dependencies"] == {"pip": "requirements.txt"}
    assert api["update_strategy"] == {"max_surge": "25%", "max_unavailable": "25%"}


def test_target_concurrency_defaults_to_processes_times_threads(tmp_path):
    cfg = MINIMAL + "    processes_per_replica: 2\n    threads_per_process: 3\n"
    (api,) = load_config(project(tmp_path, cfg))[1]
    assert api["autoscaling"]["target_replica_concurrency"] == 6.0


def test_quantities_and_durations_are_parsed(tmp_path):
    cfg = MINIMAL + """  compute: {cpu: 500m, gpu: 1, mem: 512Mi}
  autoscaling: {window: 1m30s, min_replicas: 2, max_replicas: 4}
  networking: {endpoint: /v1/iris}
"""
    (api,) = load_config(project(tmp_path, cfg))[1]
    assert api["compute"] == {"cpu": 0.5, "gpu": 1, "mem": 512 * 2**20}
    assert api["autoscaling"]["window"] == 90.0
    assert api["autoscaling"]["init_replicas"] == 2
    assert api["endpoint"] == "/v1/iris"


@pytest.mark.parametrize("extra, field", [
    ("  colour: blue\n", "colour"),
    ("  compute: {cpu: lots}\n", "compute.cpu"),
    ("  autoscaling: {min_replicas: two}\n", "autoscaling.min_replicas"),
    ("  autoscaling: {window: soon}\n", "autoscaling.window"),
    ("  autoscaling: {min_replicas: 5, max_replicas: 2}\n", "autoscaling.min_replicas"),
    ("  compute: {mem: 1X}\n", "compute.mem"),
    ("  compute: {inf: 1}\n", "compute.inf"),  # no Inferentia chips
    ("  update_strategy: {max_surge: lots}\n", "update_strategy.max_surge"),
    ("  networking: {endpoint: 'has space'}\n", "networking.endpoint"),
])
def test_bad_fields_are_named(tmp_path, extra, field):
    with pytest.raises(ConfigError) as e:
        load_config(project(tmp_path, MINIMAL + extra))
    assert 'api "iris"' in str(e.value) and f"{field}:" in str(e.value), str(e.value)


def test_a_missing_handler_path_is_an_error(tmp_path):
    cfg = "- name: iris\n  kind: RealtimeAPI\n  handler:\n    type: python\n"
    with pytest.raises(ConfigError, match=r'api "iris": handler.path: required'):
        load_config(project(tmp_path, cfg))


def test_a_handler_path_outside_the_folder_or_absent_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"handler.path: no such file"):
        load_config(project(tmp_path, MINIMAL.replace("handler.py", "nope.py")))
    with pytest.raises(ConfigError, match=r"handler.path: must be a path inside"):
        load_config(project(tmp_path, MINIMAL.replace("handler.py", "../handler.py")))


def test_one_bad_api_fails_the_whole_file(tmp_path):
    cfg = MINIMAL + "- name: Bad_Name\n  kind: RealtimeAPI\n  handler: {path: handler.py}\n"
    with pytest.raises(ConfigError, match=r"api \"Bad_Name\": name:"):
        load_config(project(tmp_path, cfg))


def test_unknown_kind_and_duplicate_names(tmp_path):
    with pytest.raises(ConfigError, match=r"kind: must be one of"):
        load_config(project(tmp_path, MINIMAL.replace("RealtimeAPI", "FastAPI")))
    with pytest.raises(ConfigError, match=r'api "iris": name: defined more than once'):
        load_config(project(tmp_path, MINIMAL + MINIMAL.lstrip("\n").replace("/iris", "/other")))


def test_yaml_errors_and_cortex_yaml_fallback(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(project(tmp_path, "- name: [unclosed\n"))
    os.remove(tmp_path / "serve.yaml")
    path, apis = load_config(project(tmp_path, MINIMAL, name="cortex.yaml"))
    assert os.path.basename(path) == "cortex.yaml" and apis[0]["name"] == "iris"


def test_traffic_splitter_weights(tmp_path):
    base = MINIMAL + MINIMAL.lstrip("\n").replace("name: iris", "name: iris-b")
    ok = base + """- name: split
  kind: TrafficSplitter
  apis:
    - {name: iris, weight: 30}
    - {name: iris-b, weight: 70}
"""
    apis = load_config(project(tmp_path, ok))[1]
    assert apis[2]["apis"] == [{"name": "iris", "weight": 30, "shadow": False},
                               {"name": "iris-b", "weight": 70, "shadow": False}]
    with pytest.raises(ConfigError, match=r'api "split": apis: the weights .* sum to 100, got 90'):
        load_config(project(tmp_path, ok.replace("weight: 70", "weight: 60")))
    two_shadows = ok + "    - {name: iris, weight: 10, shadow: true}\n    - {name: iris-b, weight: 10, shadow: true}\n"
    with pytest.raises(ConfigError, match=r"at most one API may be a shadow"):
        load_config(project(tmp_path, two_shadows))


def test_ignored_aws_keys_warn(tmp_path):
    cfg = MINIMAL + "    image: quay.io/whatever\n"
    with pytest.warns(UserWarning, match="handler.image has no meaning"):
        load_config(project(tmp_path, cfg))


def test_dotenv(tmp_path):
    (tmp_path / ".env").write_text("# comment\nA=1\nexport B='two words'\n\nC=\"x=y\"\n")
    assert read_dotenv(str(tmp_path)) == {"A": "1", "B": "two words", "C": "x=y"}
    (tmp_path / ".env").write_text("not a pair\n")
    with pytest.raises(ConfigError, match=".env line 1"):
        read_dotenv(str(tmp_path))


def test_the_package_leaves_out_what_cortex_leaves_out(tmp_path):
    folder = project(tmp_path, MINIMAL, files={
        "values.json": "{}", ".env": "A=1", ".hidden/x.txt": "x", "pkg/__pycache__/m.cpython-311.pyc": b"\0",
        "pkg/m.py": "X = 1", "pkg/old.pyc": b"\0", "data/big.bin": b"\1" * 10, "data/keep.txt": "k",
        "notes/draft.md": "d", ".cortexignore": "data/*.bin\nnotes/\n",
    })
    pkg = build_package(folder, os.path.join(folder, "serve.yaml"))
    assert pkg.files == ["data/keep.txt", "handler.py", "pkg/m.py", "values.json"]
    with tarfile.open(fileobj=io.BytesIO(pkg.data)) as tar:
        assert sorted(tar.getnames()) == pkg.files
    # Deterministic: the same folder, the same digest; a change, another.
    assert build_package(folder, os.path.join(folder, "serve.yaml")).digest == pkg.digest
    (tmp_path / "values.json").write_text('{"a": 1}')
    assert build_package(folder, os.path.join(folder, "serve.yaml")).digest != pkg.digest


def test_a_package_over_32_mb_is_refused_naming_the_largest_files(tmp_path):
    folder = project(tmp_path, MINIMAL)
    with open(tmp_path / "weights.bin", "wb") as f:  # sparse: no disk used
        f.truncate(MAX_PACKAGE_BYTES + 1)
    (tmp_path / "small.txt").write_text("s")
    with pytest.raises(ConfigError, match=r"over the 32 MiB limit; largest files: weights.bin \(32.0 MiB\)"):
        build_package(folder, os.path.join(folder, "serve.yaml"))


def test_a_package_unpacks_once_per_digest(tmp_path):
    (tmp_path / "src").mkdir()
    folder = project(tmp_path / "src", MINIMAL, files={"values.json": '{"k": 1}'})
    pkg = build_package(folder, os.path.join(folder, "serve.yaml"))
    fetched = []

    def fetch(digest):
        fetched.append(digest)
        return pkg.data

    cache = str(tmp_path / "cache")
    where = ensure_unpacked(pkg.digest, fetch, base=cache)
    assert open(os.path.join(where, "values.json")).read() == '{"k": 1}'
    assert ensure_unpacked(pkg.digest, fetch, base=cache) == where
    assert fetched == [pkg.digest]
    with pytest.raises(RuntimeError, match="digest"):
        ensure_unpacked("0" * 64, lambda d: pkg.data, base=cache)


def make_wheel(folder, name="greetlib", version="1.0", source="def hello():\n    return 'hi'\n"):
    """A minimal pure-Python wheel, so pip installs it with no index."""
    import base64
    import hashlib
    import zipfile

    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": source,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: serval-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    path = os.path.join(str(folder), f"{name}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        for p, text in files.items():
            z.writestr(p, text)
    return os.path.basename(path)


def test_requirements_install_once_per_content(tmp_path):
    from serval.cortex.package import ensure_requirements

    proj = tmp_path / "proj"
    proj.mkdir()
    wheel = make_wheel(proj)
    (proj / "requirements.txt").write_text(f"./{wheel}\n")
    cache = str(tmp_path / "cache")
    site = ensure_requirements(str(proj), "requirements.txt", base=cache)
    assert os.path.isfile(os.path.join(site, "greetlib.py"))
    assert ensure_requirements(str(proj), "requirements.txt", base=cache) == site
    (proj / "requirements.txt").write_text("# nothing\n")
    assert ensure_requirements(str(proj), "requirements.txt", base=cache) is None
    (proj / "requirements.txt").write_text("./missing-1.0-py3-none-any.whl\n")
    with pytest.raises(RuntimeError, match="pip install -r requirements.txt failed"):
        ensure_requirements(str(proj), "requirements.txt", base=cache)
