"""``serval.client()``: the Cortex Python client, for scripts and for
handlers. Inside a replica the node agent sets SERVAL_ADDRESS and
SERVAL_TOKEN, so ``serval.client()`` with no arguments points at the cluster
the handler runs in."""

from __future__ import annotations

from typing import Any, Dict, List, Optional


class Client:
    """Deploys, lists and deletes the APIs of one cluster."""

    def __init__(self, address: Optional[str] = None, *, data_dir: Optional[str] = None,
                 token: Optional[str] = None):
        from serval import serve

        serve.connect(address, data_dir=data_dir, token=token)

    def deploy(self, folder: str = ".", config_path: Optional[str] = None, *, wait: bool = True,
               timeout: float = 300.0) -> List[Dict[str, Any]]:
        """Deploys a project folder (see ``serve deploy``)."""
        from .deploy import deploy
        return deploy(folder, config_path, wait=wait, timeout=timeout)

    def get_api(self, name: str) -> Dict[str, Any]:
        """One API's status: kind, status, replicas, endpoint, last_error."""
        from .deploy import get_api
        return get_api(name)

    def list_apis(self) -> List[Dict[str, Any]]:
        from .deploy import list_apis
        return list_apis()

    def delete(self, name: str) -> None:
        from .deploy import delete
        delete(name)


def client(address: Optional[str] = None, *, data_dir: Optional[str] = None,
           token: Optional[str] = None) -> Client:
    """A client of the cluster at ``address`` (default: SERVAL_ADDRESS, else
    the cluster recorded in the data dir)."""
    return Client(address, data_dir=data_dir, token=token)
