"""``serve deploy`` / ``get`` / ``delete`` for Cortex-style project folders.

A RealtimeAPI becomes a Serval backend and an endpoint, both named after the
API: the backend hosts ``RealtimeAPI(spec)`` (serval.cortex.realtime; for an
ONNX model ``OnnxAPI(spec)``, serval.cortex.onnx; for a TensorFlow SavedModel
``TensorFlowAPI(spec)``, serval.cortex.tensorflow), whose
spec carries the package digest, so replicas fetch the project from the
cluster's blob store on whatever node they land. A TrafficSplitter becomes an
endpoint whose traffic policy (and shadow) spans the backends of its APIs.
An AsyncAPI is deployed as a RealtimeAPI hosting ``AsyncAPI(spec)``
(serval.cortex.async_api) at a route prefix; a TaskAPI as a BatchAPI whose
gateway is ``TaskGateway`` (serval.cortex.task).
Each deployed API also has a record in the cluster (kind, spec, package,
fingerprint): a redeploy compares fingerprints, so an unchanged API is left
alone, changed code rolls the replicas and a changed config is applied in
place.

The project's ``.env`` values are secrets: they are neither in the API
record nor in anything else every Watch client receives. Deploy stores them
as a blob of their own (salted with a key derived from the cluster token, so
an unchanged ``.env`` is the same blob and its digest lets no one test a
guess); only the pickled code of the API's backend (which only node agents
receive) names that blob, and the API's replicas fetch it when they start
and keep the values in their environment only. The record carries
``dotenv_version``, a hash of the blob's digest, so a changed ``.env`` rolls
the replicas.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Dict, List, Optional

from .. import _core
from .config import ConfigError, _Checker, compile_proto, load_config, read_dotenv
from .package import build_package

#: Every verb a Handler may implement; the Handler answers 405 for the rest.
API_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

#: The kinds whose replicas run the project's code (a TrafficSplitter has none).
HOSTED_KINDS = ("RealtimeAPI", "AsyncAPI", "BatchAPI", "TaskAPI")
#: The kinds whose jobs run on worker backends ``<api>--job-<id>``.
JOB_KINDS = ("BatchAPI", "TaskAPI")

#: Keys of an API spec that change what replicas run (a rolling update);
#: the others (autoscaling, compute) change the backend's config in place.
_CODE_KEYS = ("handler", "dotenv_version", "package", "name", "kind")


def _serve():
    from serval import serve
    return serve


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _backend_config(api: dict) -> Dict[str, Any]:
    """The Serval backend config of a RealtimeAPI. A Cortex replica of
    ``processes_per_replica`` processes is that many Serval replicas (one
    process each), sharing its compute and its concurrency target."""
    a = api["autoscaling"]
    procs = api["handler"]["processes_per_replica"]
    autoscaling = {k: a[k] for k in (
        "window", "upscale_stabilization_period", "downscale_stabilization_period", "max_upscale_factor",
        "max_downscale_factor", "upscale_tolerance", "downscale_tolerance")}
    autoscaling.update(min_replicas=a["min_replicas"] * procs, max_replicas=a["max_replicas"] * procs,
                       target_replica_concurrency=a["target_replica_concurrency"] / procs)
    batching = api["handler"].get("server_side_batching") or {}
    return {
        "num_replicas": a["init_replicas"] * procs,
        # Cortex's in-flight limit per replica (beyond it, requests wait in
        # the proxy's bounded queue, then get 503); room for a full batch.
        "max_concurrent_queries": max(1, -(-a["max_replica_concurrency"] // procs),
                                      batching.get("max_batch_size", 0)),
        "autoscaling": autoscaling,
        "num_cpus": api["compute"]["cpu"] / procs,
        "num_gpus": float(api["compute"]["gpu"]) / procs,
        "max_surge": str(api["update_strategy"]["max_surge"]),
        "max_unavailable": str(api["update_strategy"]["max_unavailable"]),
    }


def _snapshot() -> Dict[str, Any]:
    return _serve().status()


def _check_pip_file(folder: str, api: dict) -> None:
    pip = api["handler"]["dependencies"]["pip"]
    if pip != "requirements.txt" and not os.path.isfile(os.path.join(folder, pip)):
        raise ConfigError(f'api "{api["name"]}": handler.dependencies.pip: no such file in the project folder: {pip}')


def _grpc(spec: dict) -> Optional[dict]:
    """``handler.grpc`` of a gRPC API's spec (None for an HTTP API)."""
    return (spec.get("handler") or {}).get("grpc") if spec.get("kind") == "RealtimeAPI" else None


def _shown_endpoint(spec: dict) -> Optional[str]:
    """Where an API is called: its route, or a gRPC API's service."""
    grpc = _grpc(spec)
    return grpc["service"] if grpc else spec.get("endpoint")


def _check_splitters(apis: List[dict], snap: Dict[str, Any]) -> None:
    realtime = {a["name"]: a for a in apis if a["kind"] == "RealtimeAPI"}
    for a in snap.get("apis", []):
        if a.get("kind") == "RealtimeAPI" and a["name"] not in realtime:
            realtime[a["name"]] = json.loads(a.get("spec_json") or "{}")
    for a in apis:
        if a["kind"] != "TrafficSplitter":
            continue
        for e in a["apis"]:
            if e["name"] not in realtime:
                raise ConfigError(f'api "{a["name"]}": apis: "{e["name"]}" is not a RealtimeAPI of this config '
                                  f"or of the cluster")
            if _grpc(realtime[e["name"]]):
                raise ConfigError(f'api "{a["name"]}": apis: "{e["name"]}" is a gRPC API; a TrafficSplitter '
                                  f"splits HTTP traffic only")


def deploy(folder: str = ".", config_path: Optional[str] = None, *, wait: bool = True,
           timeout: float = 300.0) -> List[Dict[str, Any]]:
    """Validates every API of the folder's config, stores the package in the
    cluster and creates or updates the APIs. Returns one ``{"name", "kind",
    "endpoint", "action"}`` per API (action: created, updated, unchanged).
    With ``wait``, returns once every RealtimeAPI is live (raises on error)."""
    serve = _serve()
    folder = os.path.abspath(folder)
    path, apis = load_config(folder, config_path)
    for api in apis:
        if api["kind"] in ("RealtimeAPI", "AsyncAPI"):
            _check_pip_file(folder, api)
    dotenv = read_dotenv(folder)
    # gRPC APIs: the generated modules of their .proto go in the package (the
    # replicas need only grpcio and protobuf), the descriptor set to the
    # endpoint (the proxies' reflection).
    descriptors: Dict[str, bytes] = {}
    generated: Dict[str, bytes] = {}
    for api in apis:
        grpc = api["kind"] == "RealtimeAPI" and api["handler"].get("grpc")
        if grpc:
            compiled = compile_proto(folder, api["handler"]["protobuf_path"],
                                     _Checker(f'api "{api["name"]}"'))
            if compiled.spec["descriptor_sha256"] != grpc["descriptor_sha256"]:
                raise ConfigError(f'api "{api["name"]}": handler.protobuf_path: changed while deploying')
            descriptors[api["name"]] = compiled.descriptor_set
            for rel, data in compiled.files.items():
                generated[f'{grpc["package_dir"]}/{rel}'] = data
    package = build_package(folder, path, generated)
    client = _core.get_client()
    snap = _snapshot()
    _check_splitters(apis, snap)
    existing = {a["name"]: a for a in snap.get("apis", [])}
    hosted = any(a["kind"] in HOSTED_KINDS for a in apis)
    digest = client.put_blob(package.data) if hosted else ""
    secrets = _store_dotenv(client, dotenv) if hosted else {}
    results = []
    # Splitters after the APIs they route to.
    for api in sorted(apis, key=lambda a: a["kind"] == "TrafficSplitter"):
        if api["kind"] in ("RealtimeAPI", "AsyncAPI"):
            spec = dict(api, dotenv_version=secrets.get("dotenv_version", ""), package=digest)
            action = _deploy_realtime(serve, client, spec, secrets, existing.get(api["name"]),
                                      descriptors.get(api["name"]))
        elif api["kind"] in ("BatchAPI", "TaskAPI"):
            spec = dict(api, dotenv_version=secrets.get("dotenv_version", ""), package=digest)
            action = _deploy_batch(serve, client, spec, secrets, existing.get(api["name"]))
        else:
            spec = dict(api)
            action = _deploy_splitter(serve, client, spec, existing.get(api["name"]))
        results.append({"name": api["name"], "kind": api["kind"], "endpoint": _shown_endpoint(api),
                        "action": action})
    if wait:
        wait_live([r["name"] for r in results if r["kind"] in HOSTED_KINDS], timeout)
    return results


def _store_dotenv(client, dotenv: Dict[str, str]) -> Dict[str, str]:
    """The ``.env`` values stored as their own blob (see the module docs):
    ``{"dotenv_blob": digest, "dotenv_version": hash of it}``, or ``{}``."""
    if not dotenv:
        return {}
    data = json.dumps({"salt": client.dotenv_salt(), "values": dotenv}, sort_keys=True).encode()
    digest = client.put_blob(data)
    return {"dotenv_blob": digest, "dotenv_version": hashlib.sha256(digest.encode()).hexdigest()}


def _blobs(spec: dict, secrets: Dict[str, str]) -> List[str]:
    """The blobs the API's replicas fetch, which their replica token may
    read (and no other API's): the package and the ``.env``. A job's
    workers read their API's."""
    return [d for d in (spec.get("package"), secrets.get("dotenv_blob")) if d]


def _code_spec(spec: dict, secrets: Dict[str, str]) -> dict:
    """What the API's replicas are built with: the record's spec and the
    digest of its ``.env`` blob."""
    return dict(spec, dotenv_blob=secrets["dotenv_blob"]) if secrets else spec


def _record(client, spec: dict, fingerprint: str) -> None:
    client.put_api(spec["name"], spec["kind"], json.dumps(spec, sort_keys=True), spec.get("package") or "",
                   fingerprint, time.time())


def _backend_class(spec: dict) -> type:
    """What a RealtimeAPI's replicas host: a model API for an exported model
    (seed 002), else the Handler class host; an AsyncAPI's: its queue
    consumer (serval.cortex.async_api)."""
    if spec["kind"] == "AsyncAPI":
        from .async_api import AsyncAPI
        return AsyncAPI
    if spec["handler"]["type"] == "onnx":
        from .onnx import OnnxAPI
        return OnnxAPI
    if spec["handler"]["type"] == "tensorflow":
        from .tensorflow import TensorFlowAPI, TensorFlowHandlerAPI
        return TensorFlowHandlerAPI if spec["handler"].get("models") else TensorFlowAPI
    if spec["handler"].get("grpc"):
        from .grpc_api import GrpcAPI
        return GrpcAPI
    from .realtime import RealtimeAPI
    return RealtimeAPI


def _create_endpoint(serve, spec: dict, descriptor: Optional[bytes]) -> None:
    """The endpoint of a RealtimeAPI: its HTTP route, or for a gRPC API its
    service (no route) and descriptor set."""
    grpc = _grpc(spec)
    if grpc:
        if descriptor is None:
            raise ConfigError(f'api "{spec["name"]}": handler.protobuf_path: no compiled descriptor set')
        serve.create_endpoint(spec["name"], backend=spec["name"], route=None, methods=["POST"],
                              grpc_service=grpc["service"], grpc_descriptor=descriptor)
    elif spec["kind"] == "AsyncAPI":
        # POST /<endpoint> and GET /<endpoint>/<id>: the route and below it.
        _core.create_endpoint(spec["name"], spec["name"], spec["endpoint"], [], route_is_prefix=True)
    else:
        serve.create_endpoint(spec["name"], backend=spec["name"], route=spec["endpoint"], methods=API_METHODS)


def _endpoint_key(spec: dict) -> tuple:
    """What the endpoint of a RealtimeAPI depends on (a change re-creates it)."""
    grpc = _grpc(spec)
    if grpc:
        return ("grpc", grpc.get("service"), grpc.get("descriptor_sha256"))
    return ("http", spec.get("endpoint"), spec.get("kind"))


def _deploy_realtime(serve, client, spec: dict, secrets: Dict[str, str], old: Optional[dict],
                     descriptor: Optional[bytes] = None) -> str:
    name = spec["name"]
    fingerprint = _fingerprint(spec)
    if old is not None and old.get("fingerprint") == fingerprint:
        return "unchanged"
    if old is not None and old.get("kind") != spec["kind"]:
        raise ConfigError(f'api "{name}": kind: the cluster has a {old.get("kind")} with this name; delete it first')
    code = _core.pickle_code(_backend_class(spec), (_code_spec(spec, secrets),))
    config = json.dumps(_backend_config(spec))
    backends = {b["name"] for b in _snapshot().get("backends", [])}
    if old is None or name not in backends:
        if old is None and name in backends:
            raise ConfigError(f'api "{name}": name: a backend with this name exists (not deployed from a '
                              f"project folder)")
        client.create_backend(name, code, config, _blobs(spec, secrets))
        _create_endpoint(serve, spec, descriptor)
        _record(client, spec, fingerprint)
        return "created"
    old_spec = json.loads(old.get("spec_json") or "{}")
    if {k: old_spec.get(k) for k in _CODE_KEYS} != {k: spec.get(k) for k in _CODE_KEYS}:
        client.update_backend_code(name, code, _blobs(spec, secrets))
    if not old_spec.get("autoscaling") or _backend_config(old_spec) != _backend_config(spec):
        client.update_backend_config(name, config)
    if _endpoint_key(old_spec) != _endpoint_key(spec):
        serve.delete_endpoint(name)
        _create_endpoint(serve, spec, descriptor)
    _record(client, spec, fingerprint)
    return "updated"


#: The job gateway of a BatchAPI answers these (serval.cortex.batch).
BATCH_METHODS = ["GET", "POST", "DELETE"]


def _deploy_batch(serve, client, spec: dict, secrets: Dict[str, str], old: Optional[dict]) -> str:
    """A BatchAPI or a TaskAPI: its job gateway backend at the endpoint.
    Jobs started before a redeploy keep the workers (and code) they started
    with."""
    from .batch import BatchGateway
    from .task import TaskGateway

    name = spec["name"]
    fingerprint = _fingerprint(spec)
    if old is not None and old.get("fingerprint") == fingerprint:
        return "unchanged"
    if old is not None and old.get("kind") != spec["kind"]:
        raise ConfigError(f'api "{name}": kind: the cluster has a {old.get("kind")} with this name; delete it first')
    gateway = TaskGateway if spec["kind"] == "TaskAPI" else BatchGateway
    code = _core.pickle_code(gateway, (_code_spec(spec, secrets),))
    backends = {b["name"] for b in _snapshot().get("backends", [])}
    if name not in backends:
        client.create_backend(name, code, json.dumps({"num_replicas": 1}), _blobs(spec, secrets))
    else:
        client.update_backend_code(name, code, _blobs(spec, secrets))
    endpoints = {e["name"]: e for e in _snapshot().get("endpoints", [])}
    if name in endpoints and (endpoints[name].get("route") or "") != spec["endpoint"]:
        serve.delete_endpoint(name)
        endpoints.pop(name)
    if name not in endpoints:
        serve.create_endpoint(name, backend=name, route=spec["endpoint"], methods=BATCH_METHODS)
    _record(client, spec, fingerprint)
    return "created" if old is None else "updated"


def _deploy_splitter(serve, client, spec: dict, old: Optional[dict]) -> str:
    name = spec["name"]
    if old is not None and old.get("kind") != "TrafficSplitter":
        raise ConfigError(f'api "{name}": kind: the cluster has a {old.get("kind")} with this name; delete it first')
    fingerprint = _fingerprint(spec)
    if old is not None and old.get("fingerprint") == fingerprint:
        return "unchanged"
    live = [e for e in spec["apis"] if not e["shadow"]]
    shadow = next((e for e in spec["apis"] if e["shadow"]), None)
    endpoints = {e["name"]: e for e in _snapshot().get("endpoints", [])}
    first = next(e["name"] for e in live if e["weight"] > 0)
    if name not in endpoints:
        serve.create_endpoint(name, backend=first, route=spec["endpoint"], methods=API_METHODS)
    elif (endpoints[name].get("route") or "") != spec["endpoint"]:
        serve.delete_endpoint(name)
        serve.create_endpoint(name, backend=first, route=spec["endpoint"], methods=API_METHODS)
    serve.set_traffic(name, {e["name"]: e["weight"] / 100.0 for e in live if e["weight"] > 0})
    current = dict(endpoints.get(name, {}).get("shadow", {}))
    for backend in current:
        if shadow is None or backend != shadow["name"]:
            serve.shadow_traffic(name, backend, 0.0)
    if shadow is not None:
        serve.shadow_traffic(name, shadow["name"], shadow["weight"] / 100.0)
    _record(client, spec, fingerprint)
    return "created" if old is None else "updated"


# ------------------------------------------------------------------ status

def api_status(api: dict, snap: Dict[str, Any]) -> Dict[str, Any]:
    spec = json.loads(api.get("spec_json") or "{}")
    out = {"name": api["name"], "kind": api.get("kind"), "endpoint": _shown_endpoint(spec),
           "deployed_at": api.get("deployed_at"), "package": api.get("package_digest") or None}
    if api.get("kind") == "TrafficSplitter":
        out.update(status="live", apis=spec.get("apis", []))
        return out
    backend = next((b for b in snap.get("backends", []) if b["name"] == api["name"]), None)
    replicas = [r for r in snap.get("replicas", []) if r.get("backend") == api["name"]]
    version = (backend or {}).get("version", 0)
    counts: Dict[str, int] = {}
    for r in replicas:
        counts[r.get("state", "?")] = counts.get(r.get("state", "?"), 0) + 1
    running_now = [r for r in replicas if r.get("state") == "running" and r.get("backend_version") == version]
    errors = [r.get("error") for r in replicas if r.get("state") == "failed" and r.get("error")]
    unplaced = [r for r in replicas if r.get("state") == "pending" and not r.get("node_id")]
    stale = [r for r in replicas if r.get("backend_version") != version]
    if backend is None:
        status = "error"
        errors.append("its backend is missing")
    elif unplaced and not running_now:
        # The scheduler found no node with room (the replica's error says why).
        status = "compute unavailable"
    elif not running_now and (backend.get("state") == "failed" or any(
            r.get("restarts") and r.get("backend_version") == version for r in replicas)):
        # Failed, or crash-looping (its supervisor restarts it between reports).
        status = "error"
    elif stale or (len(running_now) < len([r for r in replicas if r.get("backend_version") == version])):
        status = "updating"
    elif running_now:
        status = "live"
    else:
        status = "updating"
    last_error = (backend or {}).get("error") or (errors[-1] if errors else None)
    procs = (spec.get("handler") or {}).get("processes_per_replica") or 1
    requested = (backend or {}).get("config", {}).get("num_replicas")
    # Counted in Cortex replicas; a replica is `processes_per_replica` processes.
    out.update(status=status, replicas={k: -(-n // procs) for k, n in counts.items()},
               requested=None if requested is None else requested // procs,
               processes_per_replica=procs, last_error=last_error or None)
    return out


#: Records that are not Cortex APIs: Ray Serve 2.x applications (`serve status` shows them).
_OTHER_KINDS = ("Application",)


def _cortex_records(snap: Dict[str, Any]) -> List[Dict[str, Any]]:
    return [a for a in snap.get("apis", []) if a.get("kind") not in _OTHER_KINDS]


def list_apis() -> List[Dict[str, Any]]:
    snap = _snapshot()
    return [api_status(a, snap) for a in sorted(_cortex_records(snap), key=lambda a: a["name"])]


def get_api(name: str) -> Dict[str, Any]:
    snap = _snapshot()
    for a in _cortex_records(snap):
        if a["name"] == name:
            return api_status(a, snap)
    raise KeyError(f'no API named "{name}" is deployed')


def wait_live(names: List[str], timeout: float = 300.0) -> None:
    """Returns once every API in ``names`` is live; raises with the last
    error when one fails, or after ``timeout``."""
    serve = _serve()
    deadline = time.monotonic() + timeout
    pending = list(names)
    while pending:
        snap = _snapshot()
        records = {a["name"]: a for a in snap.get("apis", [])}
        still = []
        for name in pending:
            st = api_status(records[name], snap) if name in records else {"status": "updating"}
            if st["status"] == "error":
                raise serve.ServeError(f'api "{name}" failed to start:\n{st.get("last_error") or "(no error text)"}')
            if st["status"] != "live":
                still.append(name)
        pending = still
        if pending and time.monotonic() > deadline:
            raise serve.ServeError(f"api(s) {', '.join(pending)} not live after {timeout:.0f} s "
                                   f"(see `serve get`)")
        if pending:
            time.sleep(0.05)


def delete(name: str) -> None:
    """Removes an API: its endpoint, its backend and its record. A
    RealtimeAPI that a TrafficSplitter routes to is refused."""
    serve = _serve()
    snap = _snapshot()
    record = next((a for a in snap.get("apis", []) if a["name"] == name), None)
    if record is None:
        raise KeyError(f'no API named "{name}" is deployed')
    if record.get("kind") in _OTHER_KINDS:
        raise ConfigError(f'"{name}" is a Ray Serve application, not an API: remove it with serve.delete("{name}")')
    users = [a["name"] for a in snap.get("apis", []) if a.get("kind") == "TrafficSplitter"
             and any(e.get("name") == name for e in json.loads(a.get("spec_json") or "{}").get("apis", []))]
    if users:
        raise ConfigError(f'api "{name}" is used by the TrafficSplitter(s) {", ".join(users)}: delete those first')
    endpoints = {e["name"] for e in snap.get("endpoints", [])}
    if name in endpoints:
        serve.delete_endpoint(name)
    backends = {b["name"] for b in snap.get("backends", [])}
    if record.get("kind") in HOSTED_KINDS and name in backends:
        serve.delete_backend(name, force=True)
    if record.get("kind") in JOB_KINDS:
        # The workers of its jobs still running.
        for backend in backends:
            if backend.startswith(f"{name}--job-"):
                serve.delete_backend(backend, force=True)
    _core.get_client().delete_api(name)
