"""The Ray Serve 1.x API over a Serval cluster: ``from serval import serve``,
with the 2.x API's names beside it (``deployment``, ``run``, ``delete``,
``status``, the handles; they live in ``deployment.py``, ``application.py``
and ``handle.py``).

Control calls (backends, endpoints, traffic) go to the controller over
gRPC; handles call replicas directly through the Rust router. The cluster
is found through ``address``/``SERVAL_ADDRESS`` or the head's data dir
(``data_dir``/``SERVAL_DATA_DIR``, default ``.serval``), which also holds
the cluster token.
"""

from __future__ import annotations

import atexit
import inspect
import json
import logging
import os
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Union

from serval import _core, _native
from serval._native import (AlreadyExists, BackPressureError, ControlUnavailable, DeployFailedError,
                            InvalidArgument, NotFound, ServeError, ServeValueError)
from serval.batching import batch
from serval.cli import OWNER_PID_ENV
from serval.config import BackendConfig, DeploymentMode, HTTPOptions
from serval.handle import (AsyncServeHandle, DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator,
                           ServeHandle)
from serval.deployment import Application, Deployment, deployment
from serval.ingress import ingress
from serval.application import (delete, get_app_handle, get_deployment_handle,
                                get_replica_context, run)
from serval.schema import ServeStatus
from serval.multiplex import get_multiplexed_model_id, multiplexed
from serval._host import accept_batch

__all__ = [
    "start", "connect", "shutdown", "create_backend", "update_backend", "update_backend_config",
    "get_backend_config", "delete_backend", "list_backends", "create_endpoint",
    "delete_endpoint", "list_endpoints", "set_traffic", "shadow_traffic", "get_handle", "status",
    "accept_batch", "batch", "BackendConfig", "HTTPOptions", "DeploymentMode", "ServeError", "ServeValueError",
    # Ray Serve 2.x
    "deployment", "ingress", "Deployment", "Application", "run", "delete", "get_app_handle", "get_deployment_handle",
    "get_replica_context", "DeploymentHandle", "DeploymentResponse", "DeploymentResponseGenerator",
    "BackPressureError", "DeployFailedError",
    # Serval's named control-plane errors (all ServeErrors)
    "NotFound", "AlreadyExists", "InvalidArgument", "ControlUnavailable",
    "multiplexed", "get_multiplexed_model_id",
]

_logger = logging.getLogger("serval.serve")

_HTTP_OPTION_FIELDS = {"location", "host", "port", "middlewares", "max_body_bytes"}


def connect(address: Optional[str] = None, *, data_dir: Optional[str] = None,
            token: Optional[str] = None, token_file: Optional[str] = None) -> _native.Client:
    """Connects to a running cluster. The token is ``token`` or the content
    of ``token_file``, else SERVAL_TOKEN or SERVAL_TOKEN_FILE, else the one
    in the data dir; one shorter than 16 characters is refused."""
    return _core.connect(address, data_dir=data_dir, token=token, token_file=token_file)


#: The Starlette middlewares the Rust proxy runs natively, by class, with
#: the options it supports (all of Starlette's; ``thread_minimum_size`` only
#: picks a thread there and changes nothing visible).
_MIDDLEWARES = {
    "starlette.middleware.cors.CORSMiddleware": (
        "CORSMiddleware",
        ("allow_origins", "allow_methods", "allow_headers", "allow_credentials", "allow_origin_regex",
         "allow_private_network", "expose_headers", "max_age"),
    ),
    "starlette.middleware.gzip.GZipMiddleware": (
        "GZipMiddleware", ("minimum_size", "compresslevel", "thread_minimum_size", "exclude_content_types"),
    ),
    "starlette.middleware.trustedhost.TrustedHostMiddleware": (
        "TrustedHostMiddleware", ("allowed_hosts", "www_redirect"),
    ),
}


def _unpack_middleware(m: Any):
    """(cls, args, kwargs) of a ``starlette.middleware.Middleware`` (newer
    Starlette stores ``args``/``kwargs``, older ``options``)."""
    cls = getattr(m, "cls", None)
    if cls is None:
        raise ValueError(f"http_options.middlewares: {m!r} is not a starlette.middleware.Middleware")
    args = tuple(getattr(m, "args", ()) or ())
    kwargs = getattr(m, "kwargs", None)
    if kwargs is None:
        kwargs = getattr(m, "options", None) or {}
    return cls, args, dict(kwargs)


def _json_option(value: Any) -> Any:
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_json_option(v) for v in value]
    return value


def _middlewares_json(middlewares: Any) -> str:
    """``[Middleware(cls, **options), ...]`` as the JSON the proxies run:
    ``[{"name": ..., "options": {...}}]``; anything Serval cannot run raises
    ValueError naming the middleware or option."""
    specs = []
    for m in middlewares:
        cls, args, kwargs = _unpack_middleware(m)
        name = getattr(cls, "__name__", repr(cls))
        known = _MIDDLEWARES.get(f"{getattr(cls, '__module__', '')}.{getattr(cls, '__qualname__', name)}")
        if known is None:
            supported = ", ".join(n for n, _ in _MIDDLEWARES.values())
            raise ValueError(f"http_options.middlewares: unsupported middleware {name} "
                             f"({getattr(cls, '__module__', '?')}); the Serval proxy runs {supported}")
        name, option_names = known
        if args:
            try:
                bound = inspect.signature(cls).bind_partial(None, *args)
            except TypeError as e:
                raise ValueError(f"http_options.middlewares: {name}: {e}") from None
            positional = {k: v for k, v in list(bound.arguments.items())[1:]}
            both = set(positional) & set(kwargs)
            if both:
                raise ValueError(f"http_options.middlewares: {name}: option(s) {sorted(both)} given twice")
            kwargs = {**positional, **kwargs}
        unknown = sorted(set(kwargs) - set(option_names))
        if unknown:
            raise ValueError(f"http_options.middlewares: {name}: unsupported option(s) {unknown}; "
                             f"supported: {list(option_names)}")
        options = {k: _json_option(v) for k, v in kwargs.items()}
        try:
            json.dumps(options)
        except (TypeError, ValueError) as e:
            raise ValueError(f"http_options.middlewares: {name}: options must be JSON values: {e}") from None
        specs.append({"name": name, "options": options})
    encoded = json.dumps(specs)
    # The proxies' own parser: bad values (a regex, a host pattern) fail here.
    try:
        _native.validate_middlewares(encoded)
    except ValueError as e:
        raise ValueError(f"http_options.middlewares: {e}") from None
    return encoded


def _usable_host(host: str) -> str:
    """``host`` when this machine can bind it; else ValueError (Ray 1.x
    failed loudly on an HTTP host it could not serve on)."""
    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind(address)
    except (OSError, UnicodeError) as e:
        raise ValueError(f"http_options.host: cannot serve HTTP on {host!r}: {e}") from None
    return host


def _given_http_options(http_options: Union[HTTPOptions, Dict[str, Any]]) -> Dict[str, Any]:
    """The fields ``http_options`` sets, validated as HTTPOptions are
    (``location`` as its name; ``host=None`` as location NoServer)."""
    if isinstance(http_options, HTTPOptions):
        http_options = http_options.given()
    elif not isinstance(http_options, dict):
        raise TypeError(f"http_options must be a serve.HTTPOptions or a dict, not {type(http_options).__name__}")
    unknown = set(http_options) - _HTTP_OPTION_FIELDS
    if unknown:
        raise ValueError(f"unknown http_options field(s) {sorted(unknown)}; known: {sorted(_HTTP_OPTION_FIELDS)}")
    return HTTPOptions(**http_options).given()


def _head_flags(http_options: Dict[str, Any]) -> List[str]:
    """The ``serve start`` flags of validated http_options."""
    flags = []
    if http_options.get("middlewares"):
        flags += ["--http-middlewares", _middlewares_json(http_options["middlewares"])]
    if "location" in http_options:
        flags += ["--http-location", http_options["location"]]
    if "host" in http_options:
        flags += ["--http-host", _usable_host(http_options["host"])]
    if "port" in http_options:
        flags += ["--http-port", str(http_options["port"])]
    if "max_body_bytes" in http_options:
        flags += ["--http-max-body-bytes", str(http_options["max_body_bytes"])]
    return flags


#: Ray Serve 2.x ``proxy_location`` values -> ``http_options.location``.
_PROXY_LOCATIONS = {"EveryNode": "EveryNode", "HeadOnly": "HeadOnly", "Disabled": "NoServer",
                    "NoServer": "NoServer"}


def start(detached: bool = False, http_options: Union[HTTPOptions, Dict[str, Any], None] = None, *,
          proxy_location: Optional[str] = None, address: Optional[str] = None, data_dir: Optional[str] = None,
          token: Optional[str] = None, token_file: Optional[str] = None, **ray_options: Any) -> _native.Client:
    """Connects to the cluster if one runs, else starts a head in the
    background. A head started here with ``detached=False`` is shut down
    when this Python process exits, or is killed. Against a running cluster,
    ``http_options`` middlewares replace the cluster's, and any other
    option that differs from the running cluster's raises ServeError naming
    it (they are fixed when the head starts). ``proxy_location`` (Ray
    Serve 2.x: EveryNode, HeadOnly, Disabled) is ``http_options``'s
    location; Ray 2.x's ``grpc_options`` and ``logging_config`` are taken
    and not used."""
    unknown = sorted(set(ray_options) - {"grpc_options", "logging_config"})
    if unknown:
        raise TypeError(f"serve.start() got unexpected keyword argument(s) {unknown}")
    if proxy_location is not None:
        location = _PROXY_LOCATIONS.get(str(getattr(proxy_location, "value", proxy_location)))
        if location is None:
            raise ValueError(f"proxy_location must be one of {sorted(_PROXY_LOCATIONS)}, not {proxy_location!r}")
        http_options = {**(http_options.given() if isinstance(http_options, HTTPOptions) else (http_options or {})),
                        "location": location}
    given = _given_http_options(http_options or {})
    flags = _head_flags(given)
    if token is not None and token_file is not None:
        raise ServeError("pass token or token_file, not both")
    if token is not None:
        _native.Client.check_token(token, "token")
    try:
        client = connect(address, data_dir=data_dir, token=token, token_file=token_file)
    except ServeError:
        if address is not None:
            raise
    else:
        _apply_to_running_cluster(client, given)
        return client
    dd = _core.data_dir_path(data_dir)
    env = dict(os.environ)
    env.setdefault("SERVAL_PYTHON", sys.executable)
    if token is not None:
        env.pop("SERVAL_TOKEN_FILE", None)
        env["SERVAL_TOKEN"] = token
    if token_file is not None:
        env.pop("SERVAL_TOKEN", None)
        env["SERVAL_TOKEN_FILE"] = token_file
    env.pop(OWNER_PID_ENV, None)
    if not detached:
        # atexit does not run when this process is killed: the head also
        # watches it, and stops when it is gone (serval.cli).
        env[OWNER_PID_ENV] = str(os.getpid())
    cmd = [sys.executable, "-m", "serval.cli", "--data-dir", dd, "start", "--head", "--detach", *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ServeError(f"could not start a Serval head:\n{proc.stderr or proc.stdout}")
    client = connect(data_dir=dd, token=token, token_file=token_file)
    if not detached:
        atexit.register(_shutdown_quietly)
    return client


def _apply_to_running_cluster(client: _native.Client, http_options: Dict[str, Any]) -> None:
    """``http_options`` (validated) given to ``start`` when a cluster already runs: its
    middlewares are set on the cluster (every proxy runs them); a location,
    host or port other than the running cluster's, or a body limit (a flag
    of each proxy process), raises naming the field, since none can change
    without restarting the proxies."""
    if not http_options:
        return
    snapshot = json.loads(client.snapshot_json())
    running = snapshot.get("http_options") or {}
    differs = []
    if "location" in http_options:
        want, have = http_options["location"], running.get("location") or "HeadOnly"
        if want != have:
            differs.append(f"location is {have!r}, not {want!r}")
    if "host" in http_options and str(http_options["host"]) != running.get("host"):
        differs.append(f"host is {running.get('host')!r}, not {str(http_options['host'])!r}")
    if "port" in http_options:
        port = int(http_options["port"])
        ports = {running.get("port")} | {
            int(n["http_address"].rsplit(":", 1)[1]) for n in snapshot.get("nodes", [])
            if n.get("alive") and n.get("http_address", "").rpartition(":")[2].isdigit()}
        if port not in ports:
            differs.append(f"HTTP port is {running.get('port')}, not {port}")
    if "max_body_bytes" in http_options:
        differs.append("max_body_bytes is each proxy's --http-max-body-bytes, set when it starts")
    if differs:
        raise ServeError("http_options differ from the running cluster's: " + "; ".join(differs)
                         + " (serve.shutdown() and serve.start() again to change them)")
    if "middlewares" in http_options:
        wanted = _middlewares_json(http_options["middlewares"]) if http_options["middlewares"] else ""
        current = running.get("middlewares_json") or ""
        if json.loads(wanted or "[]") != json.loads(current or "[]"):
            if not client.set_http_middlewares(wanted, _core.ROUTE_PROPAGATION_TIMEOUT_S):
                raise ServeError("http_options.middlewares were set but did not reach this client in time")
            _logger.info("http_options.middlewares set on the running cluster")


def _shutdown_quietly() -> None:
    try:
        shutdown()
    except ServeError:
        pass


def shutdown(timeout: float = 60.0) -> None:
    """Stops every process of the cluster, replicas included. Does nothing
    when this process is not connected (as in Ray 1.x)."""
    client = _core.current()
    if client is None:
        return
    nodes = [n for n in json.loads(client.snapshot_json()).get("nodes", []) if n.get("alive")]
    client.shutdown()
    _core.disconnect()
    deadline = time.monotonic() + timeout
    for pid in [n.get("pid") for n in nodes if n.get("pid")]:
        while _pid_alive(pid):
            if time.monotonic() > deadline:
                raise ServeError(f"process {pid} of the cluster did not exit within {timeout} s")
            time.sleep(0.05)


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def create_backend(backend_tag: str, func_or_class: Union[Callable, type], *actor_init_args: Any,
                   ray_actor_options: Optional[Dict[str, Any]] = None,
                   config: Union[BackendConfig, Dict[str, Any], None] = None,
                   wait_for_resources: bool = False) -> None:
    """Deploys ``func_or_class`` as a backend and waits until its replicas
    run. Raises ServeError with the replica's traceback if it cannot start,
    and at once with the controller's reason when no live node has room for
    a replica (the backend is then removed), unless ``wait_for_resources``:
    then it waits (up to SERVAL_BACKEND_START_TIMEOUT seconds) for nodes to
    join or resources to free, logging the reason."""
    client = _core.submit_backend(backend_tag, func_or_class, actor_init_args, ray_actor_options, config)
    state, error = _core.wait_backend_started(client, backend_tag, wait_for_resources)
    if state == "failed":
        raise ServeError(f"backend '{backend_tag}' failed to start:\n{error}")


def update_backend(backend_tag: str, func_or_class: Union[Callable, type], *actor_init_args: Any) -> None:
    """Replaces a backend's code or init args by a rolling update: one new
    replica at a time, an old one leaving only when its successor runs, so
    the backend keeps serving throughout. Returns when every replica runs the
    new code; raises with the traceback if a new replica fails to start (the
    old replicas keep serving). A Serval addition to the Ray Serve 1.x API."""
    if not callable(func_or_class):
        raise TypeError("update_backend needs a function or a class")
    _core.roll_code(_core.get_client(), backend_tag, _core.pickle_code(func_or_class, actor_init_args))


def update_backend_config(backend_tag: str, config_options: Union[BackendConfig, Dict[str, Any]]) -> None:
    """Changes the fields ``config_options`` sets (a BackendConfig or a
    dict); the others keep their values."""
    backend = _core.stored_backend(backend_tag)
    config = _backend_config_dict(backend)
    config.update(_core.config_payload(config_options, None))
    error = _core.update_config(_core.get_client(), backend, json.dumps(config))
    if error:
        # As in Ray 1.x the update stands and the replicas keep serving.
        _logger.warning("backend %r: reconfigure() raised; the replicas keep their config:\n%s",
                        backend_tag, error)


def _backend_config_dict(backend: Dict[str, Any]) -> Dict[str, Any]:
    c = backend.get("config") or {}
    user_config = c.get("user_config_json") or ""
    return {
        "num_replicas": c.get("num_replicas", 1),
        "max_concurrent_queries": c.get("max_concurrent_queries", _native.DEFAULT_MAX_CONCURRENT_QUERIES),
        "user_config": json.loads(user_config) if user_config else None,
        "max_batch_size": c.get("max_batch_size") or None,
        "batch_wait_timeout": c.get("batch_wait_timeout", 0.0),
        "num_cpus": c.get("num_cpus", 1.0),
        "num_gpus": c.get("num_gpus", 0.0),
        "autoscaling": c.get("autoscaling"),
        "max_surge": c.get("max_surge") or None,
        "max_unavailable": c.get("max_unavailable") or None,
        "retry_idempotent": not c.get("no_idempotent_retry", False),
        "experimental_graceful_shutdown_timeout_s": c.get("graceful_shutdown_timeout_s", 0.0),
    }


def get_backend_config(backend_tag: str) -> BackendConfig:
    """The backend's config (also readable as a dict: ``config["num_replicas"]``)."""
    return BackendConfig.from_stored(_backend_config_dict(_core.stored_backend(backend_tag)))


def list_backends() -> Dict[str, BackendConfig]:
    """Backend name -> its config."""
    return {b["name"]: BackendConfig.from_stored(_backend_config_dict(b)) for b in _core.snapshot().get("backends", [])}


def delete_backend(backend_tag: str, force: bool = False) -> None:
    """Deletes a backend and its replicas. Refused while an endpoint's traffic
    or shadow policy uses it, unless ``force`` (then it leaves those policies
    and the remaining traffic weights are rescaled)."""
    _core.get_client().delete_backend(backend_tag, force)


def create_endpoint(endpoint_name: str, *, backend: Optional[str] = None, route: Optional[str] = None,
                    methods: List[str] = ["GET"], grpc_service: Optional[str] = None,
                    grpc_descriptor: Optional[bytes] = None) -> None:
    """Creates an endpoint serving ``backend`` at ``route`` (None: handle
    only). Returns once every proxy serves the route.

    ``grpc_service`` ("package.Service") makes it a gRPC endpoint: the
    proxies route "/package.Service/Method" calls to its replicas' gRPC
    servers; ``grpc_descriptor`` (a serialized FileDescriptorSet) feeds
    their server reflection."""
    if backend is None:
        raise TypeError("create_endpoint needs backend=...")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a backend's name (a str), not {type(backend).__name__}")
    if isinstance(methods, str):
        methods = [methods]
    _core.create_endpoint(endpoint_name, backend, route, [str(m) for m in methods], grpc_service, grpc_descriptor)


def delete_endpoint(endpoint: str) -> None:
    _core.get_client().delete_endpoint(endpoint)


def list_endpoints() -> Dict[str, Dict[str, Any]]:
    """Endpoint name -> route, methods and traffic, as Ray Serve 1.x lists
    them (``python_methods`` is empty, as Ray's for endpoints made by
    ``create_endpoint``)."""
    return {
        e["name"]: {
            "route": e.get("route") or None,
            "methods": list(e.get("methods", [])),
            "traffic": dict(e.get("traffic", {})),
            "shadows": dict(e.get("shadow", {})),
            "python_methods": [],
        }
        for e in _core.snapshot().get("endpoints", [])
    }


def set_traffic(endpoint_name: str, traffic_policy_dictionary: Dict[str, float]) -> None:
    _core.get_client().set_traffic(endpoint_name, {str(k): float(v) for k, v in traffic_policy_dictionary.items()})


def shadow_traffic(endpoint_name: str, backend_tag: str, proportion: float) -> None:
    """Copies ``proportion`` of the endpoint's requests to ``backend_tag``;
    the copies' answers are dropped. Proportion 0 removes the shadow."""
    _core.get_client().set_shadow(endpoint_name, backend_tag, float(proportion))


def get_handle(endpoint_name: str, missing_ok: bool = False, sync: bool = True):
    """A handle calling ``endpoint_name``'s replicas directly. Connects
    first when needed (inside a replica the node agent sets SERVAL_ADDRESS
    and SERVAL_TOKEN, so backends can call other endpoints)."""
    client = _core.get_client()
    if not missing_ok and endpoint_name not in list_endpoints():
        raise NotFound(f"endpoint '{endpoint_name}' does not exist")
    if not missing_ok:
        client.wait_endpoint(endpoint_name, _core.ROUTE_PROPAGATION_TIMEOUT_S)
    native = client.handle(endpoint_name)
    return ServeHandle(native, endpoint_name) if sync else AsyncServeHandle(native, endpoint_name)


def status() -> ServeStatus:
    """Ray Serve 2.x's ServeStatus (``.applications``, ``.proxies``), which
    is also the controller's snapshot as a dict: heads, nodes, backends,
    endpoints, replicas (what Serval's serve.status() returned before)."""
    from serval import application

    return application.status()
