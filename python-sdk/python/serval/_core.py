"""The SDK's shared core: what ``serve.py`` (the Ray Serve 1.x API),
``application.py`` (2.x), ``handle.py`` and ``cortex/`` all build on. Private:
the public names are in ``serve``.

- this process's control client: found (``address``/``SERVAL_ADDRESS``, else
  the data dir's ``cluster.json``) and authenticated (the cluster token) by
  ``connect``, made on first use by ``client``;
- the cluster's snapshot;
- backends: their code pickled, submitted, waited for, rolled;
- endpoints: created and waited for until every proxy serves their route.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import cloudpickle

from serval import _native
from serval._host import check_batch_config, default_max_concurrent_queries
from serval._native import NotFound, ServeError
from serval.config import BackendConfig
from serval.handle import _PICKLE_LOCK, _user_modules

#: Seconds create_backend waits for a replica to start.
BACKEND_START_TIMEOUT_S = float(os.environ.get("SERVAL_BACKEND_START_TIMEOUT", "300"))
#: Seconds create_endpoint waits for the proxies and the local router to know a route.
ROUTE_PROPAGATION_TIMEOUT_S = 30.0
#: How often create_backend(wait_for_resources=True) logs why it still waits.
_PLACEMENT_LOG_INTERVAL_S = 30.0

_logger = logging.getLogger("serval.serve")

_ACTOR_OPTION_FIELDS = {"num_cpus", "num_gpus"}

_client: Optional[_native.Client] = None


def data_dir_path(data_dir: Optional[str]) -> str:
    """The head's data dir: ``data_dir``, else SERVAL_DATA_DIR, else ``.serval``."""
    return os.path.abspath(data_dir or os.environ.get("SERVAL_DATA_DIR", ".serval"))


def _discover(address: Optional[str], data_dir: Optional[str]) -> Optional[str]:
    address = address or os.environ.get("SERVAL_ADDRESS")
    if address is None:
        try:
            with open(os.path.join(data_dir_path(data_dir), "cluster.json")) as f:
                address = json.load(f)["control_address"]
        except (OSError, ValueError, KeyError):
            address = None
    return address


def _read_token_file(path: str, source: str) -> Tuple[str, str]:
    source = f"{source} {path}"
    try:
        with open(path) as f:
            token = f.read().strip()
        if os.stat(path).st_mode & 0o077:
            warnings.warn(f"the token file {path} is readable by other users; restrict it: chmod 600 {path}",
                          stacklevel=5)
    except OSError as e:
        raise ServeError(f"{source}: cannot read the cluster token: {e}") from None
    return token, source


def _token(data_dir: Optional[str], token: Optional[str], token_file: Optional[str]) -> Tuple[str, str]:
    """The cluster token and where it came from: the ``token`` or
    ``token_file`` argument, else SERVAL_TOKEN or SERVAL_TOKEN_FILE (as the
    CLI's --token and --token-file, never both), else the data dir's."""
    if token is not None and token_file is not None:
        raise ServeError("pass token or token_file, not both")
    if token is not None:
        return token, "token"
    if token_file is not None:
        return _read_token_file(token_file, "token_file")
    env_token, env_file = os.environ.get("SERVAL_TOKEN"), os.environ.get("SERVAL_TOKEN_FILE")
    if env_token is not None and env_file is not None:
        raise ServeError("SERVAL_TOKEN and SERVAL_TOKEN_FILE are both set; set one")
    if env_token is not None:
        return env_token, "SERVAL_TOKEN"
    if env_file is not None:
        return _read_token_file(env_file, "SERVAL_TOKEN_FILE")
    path = os.path.join(data_dir_path(data_dir), "token")
    if not os.path.exists(path):
        raise ServeError(f"no cluster token: pass token_file= (or set SERVAL_TOKEN_FILE) with a copy of the "
                         f"head's <data-dir>/token, or run where the head's data dir ({data_dir_path(data_dir)}) is")
    return _read_token_file(path, "the token file")


def get_client() -> _native.Client:
    """The connected client; connects first when this process has none
    (Ray 1.x: a script beside a running instance, or code in a replica,
    where the node agent sets SERVAL_ADDRESS and SERVAL_TOKEN)."""
    if _client is None:
        try:
            connect()
        except ServeError as e:
            # The same class (ControlUnavailable: a head that does not answer).
            raise type(e)(f"not connected to a Serval cluster and none found: {e}; "
                          f"call serve.start() or serve.connect()") from None
    return _client


def connect(address: Optional[str] = None, *, data_dir: Optional[str] = None,
            token: Optional[str] = None, token_file: Optional[str] = None) -> _native.Client:
    """``serve.connect``: this process's client, to the cluster found."""
    global _client
    addr = _discover(address, data_dir)
    if addr is None:
        raise ServeError(
            f"no running Serval cluster found (no address given and no cluster file in {data_dir_path(data_dir)})")
    tok, source = _token(data_dir, token, token_file)
    _client = _native.Client(addr, tok, source)
    return _client


def current() -> Optional[_native.Client]:
    """This process's client, None when it is not connected."""
    return _client


def disconnect() -> Optional[_native.Client]:
    """Forgets this process's client (``serve.shutdown``) and returns it."""
    global _client
    client, _client = _client, None
    return client


def snapshot() -> Dict[str, Any]:
    return json.loads(get_client().snapshot_json())


def config_payload(config: Union[BackendConfig, Dict[str, Any], None],
                    actor_options: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The fields the caller set (a BackendConfig or a dict of its fields,
    validated alike) and the actor options, as the controller takes them."""
    if config is None:
        config = BackendConfig()
    elif not isinstance(config, BackendConfig):
        if not isinstance(config, dict):
            raise TypeError(f"config must be a serve.BackendConfig or a dict, not {type(config).__name__}")
        config = BackendConfig(**config)
    actor_options = dict(actor_options or {})
    unknown = set(actor_options) - _ACTOR_OPTION_FIELDS
    if unknown:
        raise ValueError(f"unsupported ray_actor_options field(s) {sorted(unknown)}; known: {sorted(_ACTOR_OPTION_FIELDS)}")
    payload = {k: v for k, v in config.given().items() if k not in BackendConfig.NOT_STORED}
    payload.update(actor_options)
    return payload


def _installed_paths() -> List[str]:
    paths = sysconfig.get_paths()
    return [os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths]


def pickle_code(func_or_class, init_args, init_kwargs=None) -> bytes:
    """cloudpickles the backend. Code from the user's own modules (not an
    installed package) travels by value, since replicas cannot import it:
    the class's or function's module, and those of the init arguments."""
    names = {getattr(func_or_class, "__module__", "") or ""} | _user_modules(
        list(init_args) + list((init_kwargs or {}).values()))
    modules = []
    for name in sorted(names):
        module = sys.modules.get(name)
        file = getattr(module, "__file__", None)
        if module is not None and module.__name__ != "__main__" and file is not None \
                and not any(os.path.realpath(file).startswith(p + os.sep) for p in _installed_paths()) \
                and name not in getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", ()):
            modules.append(module)
    with _PICKLE_LOCK:
        for module in modules:
            cloudpickle.register_pickle_by_value(module)
        try:
            return cloudpickle.dumps((func_or_class, tuple(init_args), dict(init_kwargs or {})))
        finally:
            for module in modules:
                cloudpickle.unregister_pickle_by_value(module)


def submit_backend(backend_tag: str, func_or_class: Union[Callable, type], actor_init_args: Tuple[Any, ...],
                    ray_actor_options: Optional[Dict[str, Any]],
                    config: Union[BackendConfig, Dict[str, Any], None]) -> _native.Client:
    """Checks and stores a new backend, without waiting for its replicas
    (what ``create_backend`` then does). The BatchAPI gateway starts a
    job's workers this way: its own loop watches them, and workers the
    cluster cannot place yet wait for room, as Cortex's pending pods did."""
    if not callable(func_or_class):
        raise TypeError("create_backend needs a function or a class")
    if not inspect.isclass(func_or_class) and actor_init_args:
        raise ValueError("init args only make sense for a class backend")
    payload = config_payload(config, ray_actor_options)
    # Ray Serve 1.x: batching needs both @serve.accept_batch and max_batch_size;
    # max_concurrent_queries defaults to 2 x max_batch_size with batching, 100
    # for an async backend and 8 for a blocking one, sent explicitly.
    check_batch_config(func_or_class, payload.get("max_batch_size"), backend_tag)
    if not payload.get("max_concurrent_queries"):
        payload["max_concurrent_queries"] = default_max_concurrent_queries(
            func_or_class, payload.get("max_batch_size"))
    code = pickle_code(func_or_class, actor_init_args)
    client = get_client()
    client.create_backend(backend_tag, code, json.dumps(payload))
    return client


def _unplaced_reason(backend_tag: str) -> Optional[str]:
    """Why a replica of the backend waits for a node, if one does."""
    for r in snapshot().get("replicas", []):
        if r.get("backend") == backend_tag and r.get("state") == "pending":
            return r.get("error") or "no node has room for it yet"
    return None


def wait_backend_started(client: _native.Client, backend_tag: str, wait_for_resources: bool) -> Tuple[str, str]:
    """(state, error) once the backend's replicas have started or failed;
    an unplaceable replica raises (the backend removed) unless
    ``wait_for_resources``, where the reason is logged while waiting."""
    deadline = time.monotonic() + BACKEND_START_TIMEOUT_S
    stop_unplaceable = True
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            reason = _unplaced_reason(backend_tag)
            raise ServeError(f"backend '{backend_tag}' has not started all its replicas after "
                             f"{BACKEND_START_TIMEOUT_S} s" + (f": {reason}" if reason else " (see `serve status`)"))
        outcome = client.wait_backend(backend_tag, min(remaining, _PLACEMENT_LOG_INTERVAL_S), stop_unplaceable)
        if outcome is None:
            reason = _unplaced_reason(backend_tag) if wait_for_resources else None
            if reason:
                _logger.warning("backend %r is still waiting for the cluster to grow: %s", backend_tag, reason)
            continue
        state, error = outcome
        if state != "unplaceable":
            return state, error
        if not wait_for_resources:
            try:
                client.delete_backend(backend_tag, False)
            except ServeError:
                pass
            raise ServeError(f"backend '{backend_tag}' cannot be placed: {error}; it was removed (add nodes or "
                             f"free resources, or pass wait_for_resources=True to wait for them)")
        _logger.warning("backend %r is waiting for the cluster to grow: %s", backend_tag, error)
        stop_unplaceable = False


def stored_backend(backend_tag: str) -> Dict[str, Any]:
    """The backend's record in a fresh snapshot."""
    for b in snapshot().get("backends", []):
        if b["name"] == backend_tag:
            return b
    raise NotFound(f"backend '{backend_tag}' does not exist")


def roll_code(client: _native.Client, backend_tag: str, code: bytes) -> None:
    """Replaces a backend's code file by a rolling update and waits for it."""
    current = stored_backend(backend_tag)
    client.update_backend_code(backend_tag, code)
    outcome = client.wait_rollout(backend_tag, current.get("version", 0) + 1, BACKEND_START_TIMEOUT_S)
    if outcome is None:
        raise ServeError(f"the update of backend '{backend_tag}' did not finish in {BACKEND_START_TIMEOUT_S} s")
    state, error = outcome
    if state == "failed":
        raise ServeError(f"the new version of backend '{backend_tag}' failed to start:\n{error}")


def update_config(client: _native.Client, current: Dict[str, Any], config_json: str) -> str:
    """Stores the new config of backend ``current`` (its record, as
    ``stored_backend`` returns it) and waits until every running replica
    runs with it (``reconfigure`` called where ``user_config`` changed);
    returns the traceback of a replica whose ``reconfigure`` raised, else
    "". The replicas keep serving either way."""
    backend_tag = current["name"]
    client.update_backend_config(backend_tag, config_json)
    outcome = client.wait_config(backend_tag, current.get("config_version", 0) + 1, BACKEND_START_TIMEOUT_S)
    if outcome is None:
        raise ServeError(f"the replicas of backend '{backend_tag}' did not apply the new config in "
                         f"{BACKEND_START_TIMEOUT_S} s")
    state, error = outcome
    return error if state == "failed" else ""


def wait_for_proxies(route: str, deadline: float, listing: str = "/-/routes", present: bool = True) -> None:
    """Returns once every live proxy lists ``route`` in ``listing``
    (``/-/routes``, or ``/-/grpc-services`` for a gRPC service), or, with
    ``present=False``, no longer lists it."""
    proxies = [n["http_address"] for n in snapshot().get("nodes", []) if n.get("alive") and n.get("http_address")]
    for address in proxies:
        while True:
            try:
                with urllib.request.urlopen(f"http://{address}{listing}", timeout=2) as r:
                    if (route in json.loads(r.read())) == present:
                        break
            except (OSError, ValueError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise ServeError(f"proxy {address} did not {'pick up' if present else 'drop'} route {route} in time")
            time.sleep(0.02)


def create_endpoint(endpoint_name: str, backend: str, route: Optional[str], methods: List[str],
                     grpc_service: Optional[str] = None, grpc_descriptor: Optional[bytes] = None, *,
                     route_is_prefix: bool = False) -> None:
    """Creates the endpoint and returns once this process's router and every
    proxy know it. ``route_is_prefix``: ``route`` is a Ray Serve 2.x route
    prefix."""
    client = get_client()
    client.create_endpoint(endpoint_name, backend, route, methods, grpc_service, grpc_descriptor,
                           route_is_prefix)
    deadline = time.monotonic() + ROUTE_PROPAGATION_TIMEOUT_S
    if not client.wait_endpoint(endpoint_name, ROUTE_PROPAGATION_TIMEOUT_S):
        raise ServeError(f"endpoint '{endpoint_name}' did not reach the router in time")
    if route:
        wait_for_proxies(route, deadline)
    if grpc_service:
        wait_for_proxies(grpc_service, deadline, listing="/-/grpc-services")
