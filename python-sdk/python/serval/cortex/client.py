"""``serval.client()``: the Cortex Python client, for scripts and for
handlers. Inside a replica the node agent sets SERVAL_ADDRESS and
SERVAL_TOKEN (the replica's scoped token: it reads and runs batch jobs, it
does not deploy), so ``serval.client()`` with no arguments points at the
cluster the handler runs in."""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple


class Client:
    """Deploys, lists and deletes the APIs of one cluster."""

    def __init__(self, address: Optional[str] = None, *, data_dir: Optional[str] = None,
                 token: Optional[str] = None, token_file: Optional[str] = None):
        from serval import serve

        serve.connect(address, data_dir=data_dir, token=token, token_file=token_file)

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

    def stream_api_logs(self, name: str, follow: bool = True) -> Iterator[Tuple[str, str]]:
        """``(replica id, line)`` for the log lines of every running replica
        of API ``name`` (see ``serve logs``); without ``follow``, one pass."""
        from .logs import stream_api_logs
        return stream_api_logs(name, follow=follow)

    def api_url(self, name: str) -> str:
        """The URL of API ``name`` through the nearest proxy (see
        :func:`api_url`)."""
        return api_url(name)

    # -- batch jobs (BatchAPI, seed 001), through the API's HTTP endpoint --

    def submit_job(self, api: str, body: Dict[str, Any], dry_run: bool = False) -> Dict[str, Any]:
        """Submits a job (``workers``, ``item_list`` / ``file_path_lister`` /
        ``delimited_files``, ...); returns ``job_id`` and the job's settings."""
        return _job_request("POST", api, {"dryRun": "true"} if dry_run else {}, body)

    def get_job(self, api: str, job_id: str) -> Dict[str, Any]:
        """Cortex's answer: ``{"job_status": {...}, "endpoint", "api_spec"}``
        (``job_status["status"]`` is a code such as ``status_succeeded``)."""
        return _job_request("GET", api, {"jobID": job_id})

    def list_jobs(self, api: str) -> List[Dict[str, Any]]:
        return _job_request("GET", api, {})

    def stop_job(self, api: str, job_id: str) -> Dict[str, Any]:
        return _job_request("DELETE", api, {"jobID": job_id})

    def get_dead_letters(self, api: str, job_id: str) -> List[Dict[str, Any]]:
        return _job_request("GET", api, {"jobID": job_id, "deadLetters": "true"})

    def stream_job_logs(self, api: str, job_id: str, follow: bool = True) -> Iterator[Tuple[str, str]]:
        """``(worker id, line)`` for the log lines of the job's workers."""
        from .batch import worker_backend
        from .logs import stream_api_logs
        return stream_api_logs(api, follow=follow, backend=worker_backend(api, job_id))


def _job_request(method: str, api: str, query: Dict[str, str], body: Any = None) -> Any:
    """A request to a BatchAPI's endpoint; ServeError with its message
    when it is not answered 200."""
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    from serval import ServeError

    url = api_url(api) + ("?" + urllib.parse.urlencode(query) if query else "")
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            text = json.loads(text).get("error", text)
        except (ValueError, AttributeError):
            pass
        raise ServeError(f"{method} {url}: {e.code}: {text}") from None


def proxy_url() -> str:
    """The nearest HTTP proxy: ``SERVAL_PROXY_URL`` (the node agent sets it
    for every replica: its own node's proxy, else a head's), else, outside a
    replica, a head's proxy. Cortex handlers reached other APIs at
    ``http://api-<name>:8888/``; Serval handlers use this."""
    import os

    from serval import _core, serve

    url = os.environ.get("SERVAL_PROXY_URL")
    if url:
        return url.rstrip("/")
    if _core.current() is None:
        serve.connect()
    nodes = [n for n in serve.status().get("nodes", []) if n.get("alive") and n.get("http_address")]
    if not nodes:
        raise serve.ServeError("no node of the cluster runs an HTTP proxy (http_options.location is NoServer)")
    own = os.environ.get("SERVAL_NODE_ID")
    nodes.sort(key=lambda n: (n.get("id") != own, not n.get("is_head"), n.get("id", "")))
    return f"http://{nodes[0]['http_address']}"


def api_url(name: str) -> str:
    """``<nearest proxy><endpoint of API name>``, e.g. for
    ``requests.post(serval.api_url("text-generator"), json=...)``."""
    from .deploy import get_api

    return proxy_url() + get_api(name)["endpoint"]


def client(address: Optional[str] = None, *, data_dir: Optional[str] = None,
           token: Optional[str] = None, token_file: Optional[str] = None) -> Client:
    """A client of the cluster at ``address`` (default: SERVAL_ADDRESS, else
    the cluster recorded in the data dir); the token as for
    ``serve.connect``. Inside a replica it is the replica's scoped token:
    reads and batch jobs, no deploys (see README, Security)."""
    return Client(address, data_dir=data_dir, token=token, token_file=token_file)
