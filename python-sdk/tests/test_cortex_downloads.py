"""Models fetched from URLs and archives unpacked by replicas, bounded
(serval.cortex.downloads): a size cap, an expected sha256, no partial file
left behind, and archives refused when they are bombs or reach outside the
folder they unpack to. Real clusters, `serve deploy`, and an HTTP server on
loopback standing in for the model host."""

import hashlib
import io
import os
import tarfile
import zipfile

import pytest
import requests

from conftest import FileServer
from test_cortex_deploy import cli
from test_cortex_handler import write_project
from test_cortex_onnx import SEED_HANDLER, SETOSA, TIMEOUT, api_config, iris_model

pytest.importorskip("onnxruntime")
pytest.importorskip("skl2onnx")


def deploy_out(cluster, folder, config: str):
    write_project(folder, {"handler.py": SEED_HANDLER, "serve.yaml": config})
    return cli(cluster, "deploy", str(folder))


def cache_entries(cluster, kind="models"):
    folder = os.path.join(cluster.data_dir, "cache", kind)
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_a_model_over_its_size_cap_fails_the_deploy_and_leaves_no_partial_file(cluster, tmp_path):
    big = os.urandom(3 << 20)
    with FileServer(big, "big.onnx") as server:
        out = deploy_out(cluster, tmp_path / "big",
                         api_config(name="big", model_path=server.url) + "    model_max_size: 1Mi\n")
    assert out.returncode != 0
    assert "handler.model_path" in out.stderr and "over the limit of 1048576 bytes" in out.stderr, out.stderr
    # Only the lock file: neither the model nor a partial download is kept.
    assert not [e for e in cache_entries(cluster) if not e.endswith(".lock")], cache_entries(cluster)


def test_a_model_whose_sha256_differs_fails_the_deploy(cluster, tmp_path):
    model = iris_model()
    with FileServer(model, "iris.onnx") as server:
        wrong = hashlib.sha256(b"another model").hexdigest()
        out = deploy_out(cluster, tmp_path / "wrong",
                         api_config(name="wrong", model_path=server.url) + f"    model_sha256: {wrong}\n")
        assert out.returncode != 0
        assert "handler.model_sha256" in out.stderr and f"not the {wrong}" in out.stderr, out.stderr
        assert not [e for e in cache_entries(cluster) if not e.endswith(".lock")]
        # The right digest serves.
        right = hashlib.sha256(model).hexdigest()
        out = deploy_out(cluster, tmp_path / "right",
                         api_config(name="right", model_path=server.url) + f"    model_sha256: {right}\n")
        assert out.returncode == 0, out.stderr
        assert requests.post(f"{cluster.url}/right", json=SETOSA, timeout=TIMEOUT).text == "iris-setosa"


def test_a_partial_download_left_by_a_killed_replica_is_removed(cluster, tmp_path):
    # What a replica killed mid-download leaves: the partial file, its lock free.
    models = os.path.join(cluster.data_dir, "cache", "models")
    os.makedirs(models)
    leftover = os.path.join(models, "0" * 64 + ".partial")
    with open(leftover, "wb") as f:
        f.write(b"half a model")
    with FileServer(iris_model(), "iris.onnx") as server:
        out = deploy_out(cluster, tmp_path / "next", api_config(name="next", model_path=server.url))
    assert out.returncode == 0, out.stderr
    assert not os.path.exists(leftover)


def tar_gz(members) -> bytes:
    """A .tar.gz of ``members``: (TarInfo, bytes or None)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def saved_model_file(name="model/saved_model.pb", data=b"not really a model"):
    return tarfile.TarInfo(name), data


def link(name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def zip_of(entries, compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in entries:
            z.writestr(name, data)
    return buf.getvalue()


def zip_symlink() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("model/saved_model.pb", b"x")
        info = zipfile.ZipInfo("model/variables")
        info.external_attr = (0o120777 << 16)  # a symlink, as Info-ZIP stores one
        z.writestr(info, "/etc")
    return buf.getvalue()


def many_entries():
    return [(tarfile.TarInfo(f"model/f{i}"), b"") for i in range(10_001)]


ARCHIVES = [
    ("ratio-zip", lambda: zip_of([("model/saved_model.pb", b"\0" * (40 << 20))]), "times its own"),
    ("ratio-tar", lambda: tar_gz([(tarfile.TarInfo("model/saved_model.pb"), b"\0" * (40 << 20))]), "times its own"),
    ("entries-tar", lambda: tar_gz(many_entries()), "over 10000 members"),
    ("dotdot-tar", lambda: tar_gz([saved_model_file(), saved_model_file("../escaped")]), "outside the folder"),
    ("dotdot-zip", lambda: zip_of([("model/saved_model.pb", b"x"), ("../../escaped", b"x")]), "outside the folder"),
    ("symlink-tar", lambda: tar_gz([saved_model_file(), link("model/variables", "/etc")]),
     "not a plain file or folder"),
    ("symlink-zip", zip_symlink, "not a plain file or folder"),
    ("hardlink-tar", lambda: tar_gz([saved_model_file(), link("model/passwd", "/etc/passwd", tarfile.LNKTYPE)]),
     "not a plain file or folder"),
]


@pytest.mark.parametrize("name, archive, words", ARCHIVES, ids=[a[0] for a in ARCHIVES])
def test_hostile_savedmodel_archives_are_refused(cluster, tmp_path, name, archive, words):
    with FileServer(archive(), "model.tar.gz") as server:
        config = (f"- name: {name}\n  kind: RealtimeAPI\n  handler:\n    type: tensorflow\n"
                  f"    model_path: {server.url}\n")
        out = deploy_out(cluster, tmp_path / name, config)
    assert out.returncode != 0
    assert "handler.model_path: unpacking" in out.stderr and words in out.stderr, out.stderr
    unpacked = [e for e in cache_entries(cluster) if e.endswith((".d", ".partial"))]
    assert not unpacked, unpacked
    cache = os.path.join(cluster.data_dir, "cache")
    assert not os.path.exists(os.path.join(cache, "escaped"))
    assert not os.path.exists(os.path.join(cache, "models", "escaped"))
