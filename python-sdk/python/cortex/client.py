"""``cortex.client.Client``: Cortex 0.35's client methods over a Serval
cluster, answering Cortex's shapes.

* ``deploy(api_spec, project_dir, force=True, wait=False)`` deploys one API
  of a project folder (as ``serve deploy`` would, with ``api_spec`` as its
  config) and returns ``{"api": <get_api>, "message", "error"}``; with
  ``wait``, once the API is live, it returns ``get_api``'s answer.
* ``get_api(name)``: ``{"spec", "status": {"api_name", "api_id",
  "status_code", "replica_counts": {"updated": {...}, "stale": {...},
  "requested"}}, "endpoint"}``, plus ``grpc_ports`` (``{"insecure": port}``)
  for a gRPC API, whose ``endpoint`` is then the proxy's host (a client
  dials ``endpoint:grpc_ports["insecure"]``), and ``batch_job_statuses``
  for a BatchAPI (``task_job_statuses`` for a TaskAPI). ``list_apis()`` is a list of those.
* ``get_job``/``stop_job`` answer as the BatchAPI's endpoint does.
* ``stream_api_logs``/``stream_job_logs`` print the log lines to stdout as
  they come, until interrupted, as Cortex's did.

Deliberate differences: ``spec`` is the API's config as Serval validated it
(not Cortex's internal API spec); there is no ``metrics`` or
``dashboard_url`` (Serval's metrics are Prometheus series at ``/-/metrics``);
``force`` is accepted and changes nothing (a Serval deploy never waits on
one in progress); ``keep_cache`` is accepted and ignored.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, List, Optional
from urllib.parse import urlsplit

#: Serval's API status -> Cortex's status code.
_STATUS_CODES = {
    "live": "status_live",
    "updating": "status_updating",
    "error": "status_error",
    "compute unavailable": "status_stalled",
}
#: Serval's replica state -> the count it is in (Cortex's SubReplicaCounts).
_REPLICA_COUNTS = {"pending": "pending", "starting": "initializing", "running": "ready", "failed": "failed"}
_SUB_COUNTS = ("pending", "initializing", "ready", "err_image_pull", "terminating", "failed", "killed",
               "killed_oom", "stalled", "unknown")


class Client:
    """Deploys and manages the APIs of one Serval cluster, as Cortex 0.35's
    client did."""

    def __init__(self, env_name: str = "default", address: Optional[str] = None):
        from serval import serve

        self.env_name = env_name
        serve.connect(address)

    # -- APIs ---------------------------------------------------------------

    def deploy(self, api_spec: Dict[str, Any], project_dir: str, force: bool = True,
               wait: bool = False) -> Dict[str, Any]:
        """Deploys (creates or updates) the API ``api_spec`` defines, with
        the files of ``project_dir``."""
        from serval.cortex.deploy import deploy

        if not isinstance(api_spec, dict):
            raise ValueError("api_spec must be a dictionary defining one API")
        import yaml

        fd, path = tempfile.mkstemp(prefix="cortex-", suffix=".yaml")
        try:
            with os.fdopen(fd, "w") as f:
                yaml.safe_dump([api_spec], f)
            (result,) = deploy(project_dir, path, wait=wait)
        finally:
            os.unlink(path)
        api = self.get_api(result["name"])
        if wait:
            return api
        kind = result["kind"]
        message = {"created": f"creating {result['name']} ({kind})",
                   "updated": f"updating {result['name']} ({kind})"}.get(
            result["action"], f"{result['name']} ({kind}) is up to date")
        return {"api": api, "message": message, "error": ""}

    def get_api(self, api_name: str) -> Dict[str, Any]:
        """The API's spec, status and endpoint (KeyError when none has that
        name)."""
        from serval import serve

        snap = serve.status()
        record = next((a for a in snap.get("apis", []) if a["name"] == api_name), None)
        if record is None:
            raise KeyError(f'no API named "{api_name}" is deployed')
        return _api_response(record, snap)

    def list_apis(self) -> List[Dict[str, Any]]:
        from serval import serve

        snap = serve.status()
        return [_api_response(a, snap) for a in sorted(snap.get("apis", []), key=lambda a: a["name"])]

    def delete(self, api_name: str, keep_cache: bool = False) -> None:
        from serval.cortex.deploy import delete

        delete(api_name)

    # -- jobs -----------------------------------------------------------------

    def get_job(self, api_name: str, job_id: str) -> Dict[str, Any]:
        """``{"job_status": {...}, "endpoint", "api_spec"}``."""
        from serval.cortex.client import _job_request

        return _job_request("GET", api_name, {"jobID": job_id})

    def stop_job(self, api_name: str, job_id: str, keep_cache: bool = False) -> None:
        from serval.cortex.client import _job_request

        _job_request("DELETE", api_name, {"jobID": job_id})

    # -- logs -----------------------------------------------------------------

    def stream_api_logs(self, api_name: str) -> None:
        """Prints the API's log lines as they come, until interrupted."""
        from serval.cortex.logs import stream_api_logs

        _print_lines(stream_api_logs(api_name, follow=True))

    def stream_job_logs(self, api_name: str, job_id: str) -> None:
        """Prints the log lines of the job's workers as they come."""
        from serval.cortex.batch import worker_backend
        from serval.cortex.logs import stream_api_logs

        _print_lines(stream_api_logs(api_name, follow=True, backend=worker_backend(api_name, job_id)))


def _print_lines(lines) -> None:
    try:
        for _, line in lines:
            print(line, flush=True)
    except KeyboardInterrupt:
        pass


def _api_response(record: dict, snap: Dict[str, Any]) -> Dict[str, Any]:
    """Cortex's APIResponse of one API record (see the module docs)."""
    from serval.cortex.client import _job_request, proxy_url
    from serval.cortex.deploy import _fingerprint, api_status

    spec = json.loads(record.get("spec_json") or "{}")
    name, kind = record["name"], record.get("kind")
    shown = api_status(record, snap)
    backend = next((b for b in snap.get("backends", []) if b["name"] == name), None)
    version = (backend or {}).get("version", 0)
    procs = shown.get("processes_per_replica") or 1
    counts = {"updated": dict.fromkeys(_SUB_COUNTS, 0), "stale": dict.fromkeys(_SUB_COUNTS, 0)}
    for r in snap.get("replicas", []):
        if r.get("backend") == name:
            state = _REPLICA_COUNTS.get(r.get("state"), "unknown")
            if state == "pending" and not r.get("node_id"):
                state = "stalled"  # no node has room for it
            counts["updated" if r.get("backend_version") == version else "stale"][state] += 1
    # A Cortex replica is processes_per_replica Serval replicas.
    replica_counts = {k: {s: -(-n // procs) for s, n in c.items()} for k, c in counts.items()}
    replica_counts["requested"] = shown.get("requested") or 0
    response: Dict[str, Any] = {
        "spec": spec,
        "status": {"api_name": name, "api_id": record.get("fingerprint") or _fingerprint(spec),
                   "status_code": _STATUS_CODES.get(shown.get("status"), "status_unknown"),
                   "replica_counts": replica_counts},
    }
    base = proxy_url()
    grpc = (spec.get("handler") or {}).get("grpc") if kind == "RealtimeAPI" else None
    if grpc:
        parts = urlsplit(base)
        response["endpoint"] = parts.hostname
        response["grpc_ports"] = {"insecure": parts.port or 80}
    else:
        response["endpoint"] = base + (spec.get("endpoint") or f"/{name}")
    if kind in ("BatchAPI", "TaskAPI"):
        key = "batch_job_statuses" if kind == "BatchAPI" else "task_job_statuses"
        try:
            response[key] = _job_request("GET", name, {})
        except Exception:  # the gateway not up yet: no jobs to show
            response[key] = []
    return response
