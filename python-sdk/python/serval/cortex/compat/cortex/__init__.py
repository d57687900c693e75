"""``import cortex`` in a handler: ``cortex.client()`` is ``serval.client()``,
pointing at the cluster the handler runs in."""

from serval.cortex.client import Client, client

__all__ = ["Client", "client"]
