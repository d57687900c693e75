"""Ray Serve 2.x applications over Serval's backends and endpoints:
``serve.run``, ``serve.delete``, ``serve.status``, ``serve.get_app_handle``,
``serve.get_deployment_handle``.

An application is a graph of bound deployments with one ingress (the node
given to ``serve.run``). It compiles to what the 1.x API builds, so both
APIs share one cluster:

- deployment ``D`` of application ``A`` is backend ``A#D`` (its replicas
  ``A#D#<n>``), with an endpoint of the same name, handle-only except the
  ingress's, which holds the application's route prefix (served as a
  prefix: the path and everything below it);
- a record (``Api`` of kind ``Application``, named ``A``) names the route
  prefix, the ingress, the deployments in the order they deploy, what each
  was deployed with, and how far the last deploy got (``phase``), from
  which ``serval_head::applications`` computes the statuses.

Deploying goes dependencies first, each deployment waiting for its replicas
before the deployments that take its handle start, and the ingress's route
last. Deploying an application again changes what differs: new options in
place (``user_config`` reaches ``reconfigure`` without a restart), new code
by a rolling update (as ``update_backend``), deployments no longer in the
graph removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import cloudpickle

from serval import _core, _native
from serval._host import replica_context, wrap_deployment_code
from serval._native import AlreadyExists, DeployFailedError, InvalidArgument, NotFound, ServeError
from serval.deployment import Application, Deployment, _check_name
from serval.handle import DeploymentHandle
from serval.schema import ServeStatus

__all__ = ["run", "delete", "status", "get_app_handle", "get_deployment_handle", "get_replica_context",
           "DeployFailedError", "DEFAULT_APP_NAME", "deploy_application", "plan", "RECORD_KIND"]

DEFAULT_APP_NAME = "default"
#: The kind of an application's record (``serval_head::applications::KIND``).
RECORD_KIND = "Application"
#: Containers searched for bound deployments in ``bind()`` arguments, and how deep.
_MAX_ARG_DEPTH = 32


def _serve():
    from serval import serve

    return serve


def backend_name(app_name: str, deployment_name: str) -> str:
    return f"{app_name}#{deployment_name}"


def check_route_prefix(route_prefix: Any) -> Optional[str]:
    """None (no HTTP), "/" or "/a/b": no trailing '/', no '{}' parameters."""
    if route_prefix is None:
        return None
    if not isinstance(route_prefix, str):
        raise TypeError(f"route_prefix must be a str or None, not {type(route_prefix).__name__}")
    if not route_prefix.startswith("/") or (route_prefix != "/" and route_prefix.endswith("/")) or \
            "{" in route_prefix or "}" in route_prefix:
        raise ValueError(f"route_prefix {route_prefix!r} must start with '/', not end with '/' (unless it is "
                         f"'/') and hold no '{{' or '}}'")
    return route_prefix


# -- the graph -------------------------------------------------------------

@dataclass
class Planned:
    """One deployment of an application, ready to store."""

    name: str
    deployment: Deployment
    #: The replica's code file (``_host.wrap_deployment_code``).
    code: bytes
    #: Equal for the same code, arguments and replica options.
    code_version: str
    #: The backend's config.
    config: Dict[str, Any]


def _code_version(inner: bytes, options: Dict[str, Any]) -> str:
    """A digest of pickled code that is the same for the same code in any
    process: cloudpickle marks each class it pickles by value with a
    random per-process id, which is blanked here."""
    trackers = getattr(getattr(cloudpickle, "cloudpickle", None), "_DYNAMIC_CLASS_TRACKER_BY_CLASS", None)
    normalized = inner
    for tracker_id in list(trackers.values()) if trackers is not None else []:
        raw = str(tracker_id).encode()
        if raw and raw in normalized:
            normalized = normalized.replace(raw, b"0" * len(raw))
    digest = hashlib.sha256(normalized)
    digest.update(json.dumps(options, sort_keys=True).encode())
    return digest.hexdigest()


def _replace_bound(value: Any, visit: Callable[[Application], str], app_name: str, depth: int = 0) -> Any:
    """``value`` with every Application in it (and in its lists, tuples,
    sets and dicts) replaced by a DeploymentHandle."""
    if isinstance(value, Application):
        return DeploymentHandle(visit(value), app_name)
    if depth >= _MAX_ARG_DEPTH:
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_replace_bound(v, visit, app_name, depth + 1) for v in value]
        return items if isinstance(value, list) else type(value)(items)
    if isinstance(value, dict):
        return {k: _replace_bound(v, visit, app_name, depth + 1) for k, v in value.items()}
    return value


def plan(app_name: str, target: Any, *, env_vars: Optional[Dict[str, str]] = None,
         overrides: Optional[Dict[str, Dict[str, Any]]] = None) -> Tuple[List[Planned], str]:
    """The deployments of the graph under ``target``, dependencies first,
    and the ingress's name. A deployment bound more than once gets names
    ``D``, ``D_1``, ``D_2``... ``overrides`` (a config file's
    ``deployments``) change options by deployment name."""
    if isinstance(target, Deployment):
        raise TypeError(f"deployment {target.name!r} is not bound: pass {target.name}.bind(...) to serve.run")
    if not isinstance(target, Application):
        raise TypeError(f"serve.run takes a bound deployment (an Application from .bind()), not "
                        f"{type(target).__name__}")
    names: Dict[int, str] = {}
    keep: List[Application] = []  # holds the nodes so their ids stay unique
    order: List[Tuple[str, Deployment, tuple, dict]] = []

    def visit(node: Application) -> str:
        if id(node) in names:
            return names[id(node)]
        args = _replace_bound(node._args, visit, app_name)
        kwargs = _replace_bound(node._kwargs, visit, app_name)
        name, n = node.deployment.name, 0
        while name in names.values():
            n += 1
            name = f"{node.deployment.name}_{n}"
        names[id(node)] = name
        keep.append(node)
        order.append((name, node.deployment, args, kwargs))
        return name

    ingress = visit(target)
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - {name for name, *_ in order})
    if unknown:
        raise ValueError(f"application {app_name!r} has no deployment(s) {unknown}; its deployments: "
                         f"{[name for name, *_ in order]}")
    planned = []
    for name, dep, args, kwargs in order:
        if name in overrides:
            dep = dep.options(**overrides[name])
        inner = _core.pickle_code(dep.func_or_class, args, kwargs)
        options = dep.replica_options(env_vars)
        planned.append(Planned(name, dep, wrap_deployment_code(inner, options), _code_version(inner, options),
                               dep.backend_config()))
    return planned, ingress


# -- the record --------------------------------------------------------------

def _records() -> Dict[str, Dict[str, Any]]:
    return {a["name"]: a for a in _core.snapshot().get("apis", [])}


def _spec(record: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    if not record:
        return {}
    try:
        spec = json.loads(record.get("spec_json") or "{}")
    except ValueError:
        return {}
    return spec if isinstance(spec, dict) else {}


def _put_record(client, app_name: str, spec: Dict[str, Any]) -> None:
    text = json.dumps(spec, sort_keys=True)
    client.put_api(app_name, RECORD_KIND, text, "", hashlib.sha256(text.encode()).hexdigest(), time.time())


def _application_records() -> Dict[str, Dict[str, Any]]:
    return {name: r for name, r in _records().items() if r.get("kind") == RECORD_KIND}


# -- deploying ------------------------------------------------------------------

def _ensure_connected():
    """The client; with no cluster found, a head started for this process
    (shut down when it exits), as Ray's serve.run starts a local instance."""
    serve = _serve()
    if _core.current() is None:
        try:
            serve.connect()
        except ServeError:
            # A cluster named by address is not replaced by a local one.
            if replica_context() is not None or os.environ.get("SERVAL_ADDRESS"):
                raise
            serve.start()
    return _core.get_client()


def _check_prefix_free(snapshot: Dict[str, Any], app_name: str, route_prefix: Optional[str]) -> None:
    if route_prefix is None:
        return
    for e in snapshot.get("endpoints", []):
        if e.get("route_is_prefix") and e.get("route") == route_prefix and \
                not e["name"].startswith(f"{app_name}#"):
            owner = e["name"].split("#", 1)[0]
            raise AlreadyExists(f"route_prefix {route_prefix!r} is already used by application {owner!r}; "
                                f"application {app_name!r} needs another one")


def _ensure_endpoint(serve, client, name: str, endpoints: Dict[str, Dict[str, Any]],
                     route_prefix: Optional[str]) -> None:
    """Endpoint ``name`` of its backend, serving ``route_prefix`` (None:
    handle-only); one with another route is replaced."""
    existing = endpoints.get(name)
    if existing is not None:
        same = (existing.get("route") or None) == route_prefix and \
            bool(existing.get("route_is_prefix")) == (route_prefix is not None)
        if same:
            return
        serve.delete_endpoint(name)
    _core.create_endpoint(name, name, route_prefix, [], route_is_prefix=route_prefix is not None)


def _deploy_backend(serve, client, bname: str, p: Planned, backends: Dict[str, Any],
                    previous: Optional[Dict[str, Any]]) -> None:
    """Creates the backend, or changes what differs from ``previous``
    (options in place, code by a rolling update); returns once it runs."""
    if bname not in backends:
        client.create_backend(bname, p.code, json.dumps(p.config))
    else:
        previous = previous or {}
        new_code = previous.get("code") != p.code_version
        if previous.get("config") != p.config:
            config = dict(p.config)
            if config.get("autoscaling") is not None:
                # The autoscaler's current count stays (Ray keeps it too).
                config["num_replicas"] = (backends[bname].get("config") or {}).get("num_replicas",
                                                                                   config["num_replicas"])
            if new_code:
                # The new code's replicas start with it (the rollout below
                # waits for them); the old ones are on their way out.
                client.update_backend_config(bname, json.dumps(config))
            else:
                # The snapshot this deploy started from holds its record.
                error = _core.update_config(client, backends[bname], json.dumps(config))
                if error:
                    raise DeployFailedError(f"deployment {p.name!r} failed to apply its new config:\n{error}")
        if new_code:
            _core.roll_code(client, bname, p.code)
            return
    state, error = _core.wait_backend_started(client, bname, True)
    if state == "failed":
        raise DeployFailedError(f"deployment {p.name!r} failed to start:\n{error}")


def deploy_application(app_name: str, target: Any, route_prefix: Optional[str] = "/", *,
                       import_path: Optional[str] = None, source: str = "run",
                       env_vars: Optional[Dict[str, str]] = None,
                       overrides: Optional[Dict[str, Dict[str, Any]]] = None) -> DeploymentHandle:
    """Deploys (or updates) application ``app_name`` and returns its
    ingress's handle once every deployment runs and the proxies serve its
    route prefix. ``source`` ("run" or "config") tells ``serve deploy``
    which applications a config file owns."""
    _check_name("application name", app_name)
    route_prefix = check_route_prefix(route_prefix)
    planned, ingress = plan(app_name, target, env_vars=env_vars, overrides=overrides)
    serve = _serve()
    client = _ensure_connected()
    snapshot = _core.snapshot()
    record = next((a for a in snapshot.get("apis", []) if a["name"] == app_name), None)
    if record is not None and record.get("kind") != RECORD_KIND:
        raise AlreadyExists(f"{app_name!r} is the name of a {record.get('kind')} deployed with `serve deploy`; "
                            f"delete it or give the application another name")
    _check_prefix_free(snapshot, app_name, route_prefix)
    previous = _spec(record)
    spec = {
        "route_prefix": route_prefix, "ingress": ingress, "deployments": [p.name for p in planned],
        "phase": "deploying", "message": "", "import_path": import_path, "source": source,
        "versions": {p.name: {"code": p.code_version, "config": p.config} for p in planned},
    }
    _put_record(client, app_name, spec)
    backends = {b["name"]: b for b in snapshot.get("backends", [])}
    endpoints = {e["name"]: e for e in snapshot.get("endpoints", []) if e["name"].startswith(f"{app_name}#")}
    kept = {backend_name(app_name, p.name) for p in planned}
    try:
        for p in planned:
            bname = backend_name(app_name, p.name)
            _deploy_backend(serve, client, bname, p, backends, (previous.get("versions") or {}).get(p.name))
            if p.name == ingress:
                # A former ingress that left the graph gives up the route.
                for name in [e for e, spec in endpoints.items() if e not in kept and spec.get("route")]:
                    serve.delete_endpoint(name)
                    endpoints.pop(name)
            _ensure_endpoint(serve, client, bname, endpoints, route_prefix if p.name == ingress else None)
        # Deployments the graph no longer has.
        for name in [e for e in endpoints if e not in kept]:
            serve.delete_endpoint(name)
        for name in [b for b in backends if b.startswith(f"{app_name}#") and b not in kept]:
            serve.delete_backend(name, force=True)
    except BaseException as e:
        spec.update(phase="deploy_failed", message=str(e)[-4000:] or type(e).__name__)
        try:
            _put_record(client, app_name, spec)
        except ServeError:
            pass
        if isinstance(e, (ServeError, ValueError, TypeError)) and not isinstance(e, DeployFailedError):
            raise DeployFailedError(f"deploying application {app_name!r} failed: {e}") from e
        raise
    spec["phase"] = "running"
    _put_record(client, app_name, spec)
    return DeploymentHandle(ingress, app_name)


# -- the public API ---------------------------------------------------------

def run(target: Any, blocking: bool = False, name: str = DEFAULT_APP_NAME, route_prefix: Optional[str] = "/",
        logging_config: Any = None, _local_testing_mode: bool = False) -> DeploymentHandle:
    """Deploys the application whose ingress is ``target`` (a bound
    deployment) as ``name``, served over HTTP at ``route_prefix`` (None:
    through handles only), and returns the ingress's DeploymentHandle once
    every deployment runs. Deploying a name again updates that application.
    With no cluster found, starts a head for this process. ``blocking``
    then waits until interrupted."""
    if _local_testing_mode:
        raise NotImplementedError("serve.run(_local_testing_mode=True) is not supported by Serval; run the "
                                  "application on a cluster (serve.run starts one when none is found)")
    handle = deploy_application(name, target, route_prefix)
    if blocking:
        while True:
            time.sleep(3600)
    return handle


def delete(name: str, _blocking: bool = True) -> None:
    """Removes application ``name``: its deployments' endpoints and backends,
    then its record. An unknown name does nothing."""
    serve = _serve()
    snapshot = _core.snapshot()
    record = next((a for a in snapshot.get("apis", []) if a["name"] == name), None)
    if record is not None and record.get("kind") != RECORD_KIND:
        raise InvalidArgument(f"{name!r} is a {record.get('kind')}, not an application: remove it with "
                              f"`serve delete {name}`")
    prefix = f"{name}#"
    # The ingress first, so HTTP stops before its dependencies go.
    ingress = backend_name(name, _spec(record).get("ingress") or "")
    endpoints = sorted((e["name"] for e in snapshot.get("endpoints", []) if e["name"].startswith(prefix)),
                       key=lambda e: e != ingress)
    routes = {e["name"]: e.get("route") for e in snapshot.get("endpoints", [])}
    for e in endpoints:
        serve.delete_endpoint(e)
    # Returns once no proxy serves the route prefix (Ray's delete blocks too).
    deadline = time.monotonic() + _core.ROUTE_PROPAGATION_TIMEOUT_S
    for e in endpoints:
        shared_route = any(r == routes.get(e) for name, r in routes.items() if name not in endpoints)
        if routes.get(e) and _blocking and not shared_route:
            _core.wait_for_proxies(routes[e], deadline, present=False)
    for b in snapshot.get("backends", []):
        if b["name"].startswith(prefix):
            serve.delete_backend(b["name"], force=True)
    if record is not None:
        _core.get_client().delete_api(name)


def status() -> ServeStatus:
    """Ray 2.x's ServeStatus: ``.applications`` (each with its status,
    message and deployments) and ``.proxies``; also the controller's
    snapshot as a dict (Serval's serve.status() before the 2.x API)."""
    text = _core.get_client().snapshot_json()
    return ServeStatus(json.loads(text), json.loads(_native.application_statuses(text)))


def get_app_handle(name: str) -> DeploymentHandle:
    """The handle of application ``name``'s ingress."""
    record = _application_records().get(name)
    if record is None:
        raise NotFound(f"application {name!r} does not exist")
    return DeploymentHandle(_spec(record)["ingress"], name)


def get_deployment_handle(deployment_name: str, app_name: Optional[str] = None) -> DeploymentHandle:
    """The handle of a deployment; ``app_name`` defaults to the application
    of the replica calling it, else ``"default"``."""
    if app_name is None:
        context = replica_context()
        app_name = context["app_name"] if context else DEFAULT_APP_NAME
    bname = backend_name(app_name, deployment_name)
    if not any(b["name"] == bname for b in _core.snapshot().get("backends", [])):
        raise NotFound(f"deployment {deployment_name!r} of application {app_name!r} does not exist")
    return DeploymentHandle(deployment_name, app_name)


@dataclass
class ReplicaContext:
    """``serve.get_replica_context()``: where the calling replica belongs."""

    app_name: str
    deployment: str
    replica_id: str
    servable_object: Any

    @property
    def replica_tag(self) -> str:
        return self.replica_id


def get_replica_context() -> ReplicaContext:
    """The calling deployment replica's application, deployment and id;
    RuntimeError outside a replica (as Ray)."""
    context = replica_context()
    if context is None:
        raise RuntimeError("serve.get_replica_context() is only available inside a deployment's replica")
    return ReplicaContext(**context)


def import_attribute(import_path: str, app_dir: Optional[str] = None) -> Any:
    """``module.sub:attribute`` (or ``module.sub.attribute``), imported with
    ``app_dir`` (default: the working directory) first on sys.path."""
    import importlib

    if ":" in import_path:
        module_name, _, attribute = import_path.partition(":")
    else:
        module_name, _, attribute = import_path.rpartition(".")
    if not module_name or not attribute:
        raise ValueError(f"import_path {import_path!r} must be 'module:attribute' (or 'module.attribute')")
    directory = os.path.abspath(app_dir or os.getcwd())
    if directory not in sys.path:
        sys.path.insert(0, directory)
    module = importlib.import_module(module_name)
    value = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise ValueError(f"import_path {import_path!r}: module {module_name!r} has no {attribute!r}") from None
    return value


def build_target(value: Any, args: Optional[Dict[str, Any]] = None, import_path: str = "") -> Application:
    """An Application from what an import path names: the Application
    itself, or an application builder (a function taking the ``args`` dict)."""
    if isinstance(value, Application):
        if args:
            raise ValueError(f"{import_path}: args are given, but it names an application, not an application "
                             f"builder function")
        return value
    if isinstance(value, Deployment):
        raise TypeError(f"{import_path} names deployment {value.name!r}, not an application: bind it "
                        f"({value.name}.bind())")
    if callable(value):
        built = value(dict(args or {}))
        if not isinstance(built, Application):
            raise TypeError(f"{import_path}: the application builder returned a {type(built).__name__}, not an "
                            f"Application")
        return built
    raise TypeError(f"{import_path} names a {type(value).__name__}, not an application")
