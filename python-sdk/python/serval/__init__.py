"""Serval: serve Python models on a cluster, with the Ray Serve 1.x and
2.x APIs.

    from serval import serve
    serve.start()
    serve.create_backend("hello", lambda request: "hi")
    serve.create_endpoint("hello", backend="hello", route="/hello")

    @serve.deployment
    def greet(request):
        return "hi"
    serve.run(greet.bind(), name="greet", route_prefix="/greet")
"""

from serval._native import (AlreadyExists, BackPressureError, ControlUnavailable, DeployFailedError,
                            InvalidArgument, NotFound, ServeError, ServeValueError, __version__)
from serval.handle import AsyncServeHandle, BackendError, ServeFuture, ServeHandle, _Resolved
from serval.request import ServeRequest
from serval.cortex.client import api_url, client


def get(refs, timeout=None):
    """``ray.get`` for handle results: a ServeFuture, what an async handle's
    ``await handle.remote()`` returned, or a list of them."""
    if isinstance(refs, _Resolved):
        return refs
    if isinstance(refs, (list, tuple)):
        return [get(r, timeout) for r in refs]
    if isinstance(refs, ServeFuture):
        return refs.result(timeout)
    raise TypeError(f"serval.get expects a ServeFuture or a list of them, not {type(refs).__name__}")


__all__ = [
    "ServeError", "ServeValueError", "NotFound", "AlreadyExists", "InvalidArgument", "ControlUnavailable",
    "BackPressureError", "DeployFailedError", "BackendError", "ServeRequest", "ServeHandle", "AsyncServeHandle", "ServeFuture",
    "get", "client", "api_url", "__version__",
]
