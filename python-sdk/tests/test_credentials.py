"""How the SDK finds the cluster token: ``token=`` / ``token_file=``, else
SERVAL_TOKEN / SERVAL_TOKEN_FILE, else the data dir's; an empty or short
token is refused before anything is sent, naming where it came from."""

import os
import warnings

import pytest

from serval import ServeError, serve


def test_token_file_and_env_var_and_short_tokens(cluster, tmp_path, monkeypatch):
    address = f"127.0.0.1:{cluster.control_port}"
    with open(os.path.join(cluster.data_dir, "token")) as f:
        token = f.read().strip()
    elsewhere = str(tmp_path / "no-data-dir")
    token_file = tmp_path / "cluster-token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a private file is not warned about
        serve.connect(address, data_dir=elsewhere, token_file=str(token_file))
    assert serve.status()["nodes"]

    monkeypatch.setenv("SERVAL_TOKEN_FILE", str(token_file))
    serve.connect(address, data_dir=elsewhere)
    assert serve.status()["nodes"]

    token_file.chmod(0o644)
    with pytest.warns(UserWarning, match="readable by other users"):
        serve.connect(address, data_dir=elsewhere)
    monkeypatch.delenv("SERVAL_TOKEN_FILE")

    for given, why in (("", "empty"), ("short", "at least 16")):
        with pytest.raises(ServeError, match=f"token: .*{why}"):
            serve.connect(address, data_dir=elsewhere, token=given)
    monkeypatch.setenv("SERVAL_TOKEN", "")
    with pytest.raises(ServeError, match="SERVAL_TOKEN: .*empty"):
        serve.connect(address, data_dir=elsewhere)
    monkeypatch.delenv("SERVAL_TOKEN")
    with pytest.raises(ServeError, match="no cluster token"):
        serve.connect(address, data_dir=elsewhere)
    # A wrong token of the right length reaches the head, which refuses it.
    with pytest.raises(ServeError, match="wrong cluster token"):
        serve.connect(address, data_dir=elsewhere, token="x" * 32)
        serve.status()
    serve.connect(address, data_dir=cluster.data_dir)
