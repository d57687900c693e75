"""Cortex 0.35's Python client, on Serval: ``import cortex; cx =
cortex.client(); cx.deploy(api_spec, project_dir=...)``, ``get_api``,
``list_apis``, ``delete``, ``get_job``, ``stop_job``, ``stream_api_logs``,
``stream_job_logs``, with Cortex's signatures and return shapes (see
``cortex.client.Client``). Inside a handler, ``cortex.client()`` is the
cluster the handler runs in, with the replica's scoped token.

Serval has no Cortex environments: ``client(env_name)`` accepts any name
and connects to the cluster ``serve`` would (``SERVAL_ADDRESS``, else the
one recorded in the data dir); a name that is a head's ``HOST:PORT`` (a
comma-separated list for several heads) connects there. ``new_client(env_name,
operator_endpoint)`` connects to the heads at ``operator_endpoint``.
"""

from typing import Optional

from cortex.client import Client

__all__ = ["Client", "client", "new_client"]


def client(env_name: Optional[str] = None) -> Client:
    """A client of the default cluster (or of the heads ``env_name`` names,
    when it is an address)."""
    address = env_name if env_name and ":" in env_name else None
    return Client(env_name or "default", address)


def new_client(env_name: str, operator_endpoint: str) -> Client:
    """A client of the heads at ``operator_endpoint`` (``HOST:PORT``, or
    ``http://HOST:PORT``; a comma-separated list for several heads)."""
    address = ",".join(a.strip().split("://", 1)[-1].rstrip("/") for a in operator_endpoint.split(","))
    return Client(env_name, address)
