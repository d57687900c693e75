"""Batch APIs (seed 001): jobs of batches run by workers started per job.

A BatchAPI deploys one small backend, the job gateway ``BatchGateway``, at
the API's endpoint:

* ``POST /<endpoint>`` submits a job (``workers``, ``timeout``, ``config``,
  ``max_receive_count`` and one of ``item_list``, ``file_path_lister``,
  ``delimited_files``; ``?dryRun=true`` lists the targets only). The job is
  created in the controller's replicated store and answered at once; its
  batches are then written to the store in chunks (status ``enqueuing``),
  after which a backend of ``workers`` replicas (``BatchWorker``) starts.
* ``GET /<endpoint>?jobID=ID`` is the job's status, as Cortex 0.35 answered
  it: ``{"job_status": {...}, "endpoint": ..., "api_spec": ...}`` with
  Cortex's status codes (serval.cortex.job_status; ``&deadLetters=true``:
  the batches that failed ``max_receive_count`` times); without ``jobID``,
  the API's jobs (a list of ``job_status`` objects).
  ``DELETE /<endpoint>?jobID=ID`` stops it: ``{"message": "stopped job
  ID"}``. A submission answers Cortex's job spec (``job_id``, ``api_name``,
  ``kind``, ``workers``, ``config``, ``timeout``, ...).

Workers lease batches from the store with a visibility timeout, call
``handle_batch(payload, batch_id)`` and acknowledge; a failed batch goes
back to the queue, or to the dead letters after ``max_receive_count``
receipts. The store tells one worker, once every batch is finished, to
run ``on_job_complete`` (again if that worker's reply was lost; another
worker only if it died first). A batch runs at least once and is counted
once.

Every gateway process looks after all the API's jobs (not only those it
took): it starts a job's workers once its batches are stored, gives a dead
worker's leases back at once, ends a job past its ``timeout``, a job whose
enqueuing gateway died ("failed while enqueuing"), and removes the workers
of ended jobs. So a gateway restarted on another node, after its node or a
head died, picks up where the old one was. Workers retry control calls
while no head answers; the queue hands a worker the batches of a lease
whose reply it lost again, so nothing waits out a visibility timeout.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import os
import threading
import time
import urllib.parse
import urllib.request
import uuid
from datetime import datetime, timezone
from typing import Any, Dict, Iterator, List, Optional, Tuple

from starlette.requests import Request

from .. import _core
from . import job_status
from .job_status import ENDED
from .realtime import (HandlerError, RealtimeAPI, accepted_args, cluster_client, error_response, resolve_project_dir,
                       setup_process)

logger = logging.getLogger("serval.cortex")

#: Cortex's limits: a batch under 256 KiB, an item_list request under 10 MiB.
MAX_BATCH_BYTES = 256 * 1024
MAX_ITEM_LIST_REQUEST_BYTES = 10 * 1024 * 1024
#: Batches written to the store per call.
ENQUEUE_CHUNK_BYTES = 2 * 1024 * 1024
#: How long a leased batch stays hidden from other workers. A dead worker's
#: leases come back sooner: the gateway releases them when it sees it die.
VISIBILITY_S = 600.0
#: Batches a worker leases per call, at most: more means fewer store writes
#: per batch; fewer keeps small jobs spread over every worker.
LEASE_MAX = 50
#: How often a gateway looks at its API's jobs.
WATCH_INTERVAL_S = 0.25
#: How long a worker retries a control call while no head answers (an
#: election takes seconds); past it the worker process exits, so its
#: supervisor restarts it.
CONTROL_RETRY_S = 120.0
#: Restarts of one worker after which the job ends as "worker error".
MAX_WORKER_RESTARTS = 3
#: How often a worker with ``compute.mem`` looks at its resident memory.
MEMORY_CHECK_INTERVAL_S = 0.05
#: A dry run or a submission stops listing folders past this many files or
#: seconds (a 400 asks for narrower paths).
MAX_LISTED = 100_000
LIST_TIMEOUT_S = 30.0
#: The longest a gateway reads one URL of a delimited_files job.
URL_READ_TIMEOUT_S = 600.0


class JobError(ValueError):
    """A job request that cannot run (answered 400 with the message)."""


def _jobs():
    return cluster_client().jobs()


def worker_backend(api: str, job_id: str) -> str:
    return f"{api}--job-{job_id}"


def _process_id() -> str:
    """This process as the queue knows it: "<replica id>/<pid>" (a restarted
    replica keeps its id, not its pid)."""
    return f"{os.environ.get('SERVAL_REPLICA_ID') or uuid.uuid4()}/{os.getpid()}"


def _retrying(call, *args):
    """``call(*args)``, retried with backoff while no head answers (see
    ``ControlUnavailable``), for up to ``CONTROL_RETRY_S``."""
    from serval import ControlUnavailable

    deadline = time.monotonic() + CONTROL_RETRY_S
    delay = 0.05
    while True:
        try:
            return call(*args)
        except ControlUnavailable as e:
            if time.monotonic() > deadline:
                raise
            logger.warning("control call %s failed (%s); retrying", getattr(call, "__name__", call), e)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def _iso(ms: int) -> Optional[str]:
    """Unix milliseconds as Cortex's (Go's) JSON times: RFC 3339 in UTC;
    None for 0 (not yet)."""
    if not ms:
        return None
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- a job request ------------------------------------------------------------


def parse_job(body: bytes) -> dict:
    """The job request, validated; JobError names the field."""
    if len(body) > MAX_ITEM_LIST_REQUEST_BYTES:
        raise JobError(f"the request is {len(body)} bytes; the limit is {MAX_ITEM_LIST_REQUEST_BYTES} (10 MiB)")
    try:
        job = json.loads(body)
    except ValueError as e:
        raise JobError(f"the body is not valid JSON: {e}") from None
    if not isinstance(job, dict):
        raise JobError("the body must be a JSON object")
    workers = job.get("workers")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise JobError(f"workers: required, an integer of at least 1 (got {workers!r})")
    timeout = job.get("timeout")
    if timeout is not None and (not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0):
        raise JobError(f"timeout: a number of seconds above 0 (got {timeout!r})")
    config = job.get("config") or {}
    if not isinstance(config, dict):
        raise JobError(f"config: must be an object (got {type(config).__name__})")
    mrc = job.get("max_receive_count", (job.get("sqs_dead_letter_queue") or {}).get("max_receive_count", 1))
    if not isinstance(mrc, int) or isinstance(mrc, bool) or mrc < 1:
        raise JobError(f"max_receive_count: an integer of at least 1 (got {mrc!r})")
    sources = [k for k in ("item_list", "file_path_lister", "delimited_files") if k in job]
    if len(sources) != 1:
        raise JobError("exactly one of item_list, file_path_lister, delimited_files is required"
                       + (f" (got {', '.join(sources)})" if sources else ""))
    source = job[sources[0]]
    if not isinstance(source, dict):
        raise JobError(f"{sources[0]}: must be an object")
    size = source.get("batch_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise JobError(f"{sources[0]}.batch_size: required, an integer of at least 1 (got {size!r})")
    if sources[0] == "item_list":
        if not isinstance(source.get("items"), list):
            raise JobError("item_list.items: required, a list")
    elif not isinstance(source.get("paths"), list) or not all(isinstance(p, str) for p in source["paths"]):
        raise JobError(f"{sources[0]}.paths: required, a list of paths or URLs")
    for key in ("includes", "excludes"):
        if key in source and (not isinstance(source[key], list) or not all(isinstance(g, str) for g in source[key])):
            raise JobError(f"{sources[0]}.{key}: a list of glob patterns")
    return {"workers": workers, "timeout": timeout, "config": config, "max_receive_count": mrc,
            "source": sources[0], "spec": source}


def _is_url(path: str) -> bool:
    return path.lower().startswith(("http://", "https://"))


class Sources:
    """What a job may read: the API's ``jobs`` config (serval.cortex.config:
    ``allowed_sources``, ``max_batches``, ``max_bytes``). Clients are
    anonymous, so a path or URL is read only when it starts with an allowed
    prefix: a local path (relative ones are in the project folder, the
    gateway's working directory) with every link resolved, at a folder
    boundary; a URL as written, and again at each redirect."""

    def __init__(self, jobs: Optional[dict]):
        jobs = jobs or {}
        prefixes = jobs.get("allowed_sources") or []
        self.shown = ", ".join(prefixes)
        self.urls = [p for p in prefixes if _is_url(p)]
        self.paths = [os.path.realpath(p) for p in prefixes if not _is_url(p)]
        self.max_batches = int(jobs.get("max_batches") or 100_000)
        self.max_bytes = int(jobs.get("max_bytes") or 1 << 30)
        self.retention = float(jobs.get("retention") or 0)  # 0: the controller's default

    def allows(self, source: str) -> bool:
        if _is_url(source):
            return ".." not in source.split("?")[0].split("/") and any(source.startswith(p) for p in self.urls)
        real = os.path.realpath(source)
        return any(real == p or real.startswith(p.rstrip("/") + "/") for p in self.paths)

    def check(self, field: str, source: str) -> None:
        if self.allows(source):
            return
        if not self.urls and not self.paths:
            raise JobError(f"{field}: {source!r}: this API reads no files or URLs for jobs (only item_list); "
                           f"its config lists those it may read in jobs.allowed_sources")
        raise JobError(f"{field}: {source!r} is not under the API's jobs.allowed_sources ({self.shown})")

    def open_url(self, url: str, timeout: float):
        """``urlopen``, following only redirects to allowed URLs."""
        sources = self

        class Redirects(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, req, fp, code, msg, headers, newurl):
                sources.check("delimited_files.paths", newurl)
                return super().redirect_request(req, fp, code, msg, headers, newurl)

        return urllib.request.build_opener(Redirects).open(url, timeout=timeout)


def check_job(job: dict, sources: Sources) -> None:
    """A job's paths against the allowed sources, and an item_list's batch
    count against ``jobs.max_batches``; a JobError names the field."""
    spec = job["spec"]
    if job["source"] == "item_list":
        count = -(-len(spec["items"]) // spec["batch_size"])
        if count > sources.max_batches:
            raise JobError(f"item_list: {count} batches; the API's jobs.max_batches is {sources.max_batches}")
        return
    for path in spec["paths"]:
        sources.check(f"{job['source']}.paths", path)


def list_targets(spec: dict, sources: Sources, field: str = "paths") -> List[str]:
    """The files (or URLs) of a file_path_lister/delimited_files: each path,
    or the files under a directory, filtered by includes/excludes globs.
    Bounded: MAX_LISTED files, LIST_TIMEOUT_S seconds, and every file (links
    resolved) under an allowed source."""
    deadline = time.monotonic() + LIST_TIMEOUT_S
    targets: List[str] = []

    def add(target: str) -> None:
        if len(targets) >= MAX_LISTED or time.monotonic() > deadline:
            raise JobError(f"{field}: listing stopped at {len(targets)} files (the limit is {MAX_LISTED} files "
                           f"and {LIST_TIMEOUT_S:g} s): name narrower paths")
        sources.check(field, target)
        targets.append(target)

    for path in spec["paths"]:
        sources.check(field, path)
        if _is_url(path):
            add(path)
        elif os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for f in sorted(files):
                    add(os.path.join(root, f))
        elif os.path.exists(path):
            add(path)
        else:
            raise JobError(f"{field}: no such file or directory: {path}")
    includes, excludes = spec.get("includes") or [], spec.get("excludes") or []
    return [t for t in targets
            if (not includes or any(fnmatch.fnmatch(t, g) for g in includes))
            and not any(fnmatch.fnmatch(t, g) for g in excludes)]


def probe_urls(targets: List[str], sources: Sources, field: str) -> None:
    """A dry run's check that each URL target answers (as a dry run over
    S3 lists what is there): opened, its status read, closed unread; a URL
    that fails is the client's 400, naming it. Within LIST_TIMEOUT_S in
    all."""
    deadline = time.monotonic() + LIST_TIMEOUT_S
    for target in targets:
        if not _is_url(target):
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            raise JobError(f"{field}: checking the URLs took over {LIST_TIMEOUT_S:g} s: name fewer")
        try:
            sources.open_url(target, timeout=left).close()
        except JobError:
            raise
        except Exception as e:  # HTTPError, URLError, timeouts: the client's URL
            raise JobError(f"{field}: {target}: {e}") from None


def _lines(target: str, sources: Sources, budget: List[int]) -> Iterator[bytes]:
    """The lines of a file or URL, each under a batch's size, all of them
    within ``budget[0]`` bytes (what is left of the job's max_bytes) and a
    URL within URL_READ_TIMEOUT_S."""
    deadline = time.monotonic() + URL_READ_TIMEOUT_S
    if _is_url(target):
        stream = sources.open_url(target, timeout=60)
    else:
        sources.check("delimited_files.paths", target)  # a link swapped in since listing
        stream = open(target, "rb")
    with stream:
        while True:
            line = stream.readline(MAX_BATCH_BYTES + 1)
            if not line:
                return
            budget[0] -= len(line)
            if budget[0] < 0:
                raise JobError(f"delimited_files: the files are over the API's jobs.max_bytes "
                               f"({sources.max_bytes} bytes)")
            if len(line) > MAX_BATCH_BYTES:
                raise JobError(f"delimited_files: {target} has a line over {MAX_BATCH_BYTES} bytes (256 KiB)")
            if _is_url(target) and time.monotonic() > deadline:
                raise JobError(f"delimited_files: reading {target} took over {URL_READ_TIMEOUT_S:g} s")
            yield line


def batches(job: dict, sources: Sources) -> Iterator[List[Any]]:
    """The job's batches, in order, as lists of items."""
    spec, size = job["spec"], job["spec"]["batch_size"]
    if job["source"] == "item_list":
        items = spec["items"]
        for i in range(0, len(items), size):
            yield items[i:i + size]
        return
    targets = list_targets(spec, sources, f"{job['source']}.paths")
    if job["source"] == "file_path_lister":
        for i in range(0, len(targets), size):
            yield targets[i:i + size]
        return
    batch: List[Any] = []
    budget = [sources.max_bytes]
    for target in targets:
        for n, line in enumerate(_lines(target, sources, budget), 1):
            if not line.strip():
                continue
            try:
                batch.append(json.loads(line))
            except ValueError as e:
                raise JobError(f"delimited_files: {target} line {n} is not JSON: {e}") from None
            if len(batch) == size:
                yield batch
                batch = []
    if batch:
        yield batch


def encoded_batches(job: dict, sources: Sources) -> Iterator[bytes]:
    """The job's batches as stored: each under MAX_BATCH_BYTES, at most
    ``jobs.max_batches`` of them and ``jobs.max_bytes`` in all."""
    total = 0
    for i, batch in enumerate(batches(job, sources)):
        if i >= sources.max_batches:
            raise JobError(f"the job has over {sources.max_batches} batches, the API's jobs.max_batches")
        data = json.dumps(batch).encode()
        if len(data) > MAX_BATCH_BYTES:
            raise JobError(f"batch {i} is {len(data)} bytes; a batch must be under {MAX_BATCH_BYTES} bytes "
                           f"(256 KiB): lower batch_size")
        total += len(data)
        if total > sources.max_bytes:
            raise JobError(f"the job's batches are over {sources.max_bytes} bytes, the API's jobs.max_bytes")
        yield data


# -- the gateway ----------------------------------------------------------------


class BatchGateway:
    """The HTTP face of a BatchAPI (see the module docs). ``spec`` is the
    validated API; the workers get it too."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.name = spec["name"]
        if any(not _is_url(p) and not os.path.isabs(p) for p in (spec.get("jobs") or {}).get("allowed_sources", [])):
            # Relative sources are files of the project: resolved in its folder.
            os.chdir(resolve_project_dir(spec, None))
        self.sources = Sources(spec.get("jobs"))
        # What a job's answers show of its API (Cortex's ``api_spec`` and
        # ``api_id``): the config as deployed, without the digest of the
        # ``.env`` blob (a secret), and the fingerprint `serve deploy` gave it.
        from .deploy import _fingerprint

        self.api_spec = {k: v for k, v in spec.items() if k != "dotenv_blob"}
        self.api_id = _fingerprint(self.api_spec)
        self.me = _process_id()
        # job id -> worker replica id -> (node, restarts, failed) last seen.
        self._workers_seen: Dict[str, Dict[str, Tuple[str, int, bool]]] = {}
        threading.Thread(target=self._look_after_jobs, name=f"jobs-{self.name}", daemon=True).start()

    async def __call__(self, request: Request):
        # Off the replica's event loop: listing folders and control calls
        # block, and must not stall the other requests.
        body = await request.body() if request.method == "POST" else b""
        # The URL the client called, for the ``endpoint`` of a job's status.
        url = getattr(request, "url", None)
        endpoint = str(url.replace(query="")) if url is not None else self.spec.get("endpoint") or ""
        return await asyncio.get_running_loop().run_in_executor(
            None, self.answer, request.method, body, request.query_params, endpoint)

    def answer(self, method: str, body: bytes, query, endpoint: str = "") -> Any:
        try:
            if method == "POST":
                return self.submit(body, query)
            if method == "GET":
                job_id = query.get("jobID")
                if not job_id:
                    return [self.status(j) for j in json.loads(_jobs().list(self.name))]
                if query.get("deadLetters", "").lower() == "true":
                    return self.dead_letters(job_id)
                # Cortex's BatchJobResponse.
                return {"job_status": self.status(self._job(job_id)), "api_spec": self.api_spec,
                        "endpoint": f"{endpoint}?{urllib.parse.urlencode({'jobID': job_id})}"}
            if method == "DELETE":
                job_id = query.get("jobID")
                if not job_id:
                    return error_response(400, "jobID: required (DELETE /<api>?jobID=<id>)")
                self._job(job_id)
                _jobs().stop(job_id)
                self._remove_workers(job_id)
                return {"message": f"stopped job {job_id}"}
        except JobError as e:
            return error_response(400, str(e))
        except LookupError as e:
            return error_response(404, str(e))
        return error_response(405, f"api '{self.name}' takes POST (submit), GET (status) and DELETE (stop)",
                              {"Allow": "POST, GET, DELETE"})

    def _job(self, job_id: str) -> dict:
        from serval import NotFound

        try:
            job = json.loads(_jobs().get(job_id))
        except NotFound as e:
            raise LookupError(f"job {job_id}: {e}") from None
        if job["spec"]["api"] != self.name:
            raise LookupError(f"job {job_id} is not a job of api {self.name}")
        return job

    def submit(self, body: bytes, query) -> Any:
        job = parse_job(body)
        check_job(job, self.sources)
        if query.get("dryRun", "").lower() == "true":
            if job["source"] == "item_list":
                return {"dry_run": True, "batches": sum(1 for _ in encoded_batches(job, self.sources))}
            field = f"{job['source']}.paths"
            targets = list_targets(job["spec"], self.sources, field)
            probe_urls(targets, self.sources, field)
            return {"dry_run": True, "targets": targets}
        if job["source"] != "item_list":
            # A missing or refused path is the client's 400, now.
            list_targets(job["spec"], self.sources, f"{job['source']}.paths")
        created = self._create(job)
        threading.Thread(target=self._enqueue_job, args=(created["id"], job), name=f"job-{created['id']}",
                         daemon=True).start()
        return self._job_spec(created)

    def _job_spec(self, job: dict) -> dict:
        """Cortex's BatchJob (a submission's answer, and the start of a
        job's status). Serval keeps a job's queue and dead letters in the
        controller's store, not SQS: ``sqs_url`` is null and
        ``sqs_dead_letter_queue`` has no ``arn``, only the
        ``max_receive_count`` that applies."""
        spec = job["spec"]
        timeout = spec.get("timeout_s") or None
        return {"job_id": job["id"], "api_name": self.name, "kind": "BatchAPI", "workers": spec["workers"],
                "sqs_dead_letter_queue": {"arn": "", "max_receive_count": spec.get("max_receive_count") or 1},
                "config": json.loads(spec.get("config_json") or "{}"),
                "timeout": int(timeout) if timeout and timeout == int(timeout) else timeout,
                "api_id": self.api_id, "sqs_url": None, "created_time": _iso(job.get("created_ms", 0))}

    # -- a job's life -----------------------------------------------------

    def _create(self, job: dict) -> dict:
        """The job's record; a job the controller refuses (over a cap such
        as ``workers``: its message names the field and the cap) is the
        client's 400."""
        from serval import ServeValueError

        try:
            return json.loads(_jobs().create(self.name, job["workers"], float(job["timeout"] or 0),
                                             json.dumps(job["config"]), job["max_receive_count"], self.me,
                                             self.sources.retention))
        except ServeValueError as e:
            raise JobError(str(e)) from None

    def _enqueue_job(self, job_id: str, job: dict) -> None:
        """Stores the job's batches; the gateways' look-after loop starts
        its workers once it is running."""
        jobs = _jobs()
        try:
            total = self._enqueue(jobs, job_id, job)
        except Exception as e:  # the job's own failure: recorded, not raised
            logger.error("api %r: job %s: enqueuing failed: %s", self.name, job_id, e)
            _retrying(jobs.finish_enqueue, job_id, 0,
                      f"{type(e).__name__}: {e}" if not isinstance(e, JobError) else str(e))
            return
        _retrying(jobs.finish_enqueue, job_id, total)

    def _enqueue(self, jobs, job_id: str, job: dict) -> int:
        chunk: List[bytes] = []
        size = first = total = 0
        for data in encoded_batches(job, self.sources):
            chunk.append(data)
            size += len(data)
            total += 1
            if size >= ENQUEUE_CHUNK_BYTES or len(chunk) >= 5000:
                jobs.enqueue(job_id, first, chunk)
                first, chunk, size = total, [], 0
        if chunk:
            jobs.enqueue(job_id, first, chunk)
        return total

    def _look_after_jobs(self) -> None:
        while True:
            try:
                self._look_after_jobs_once()
            except Exception as e:  # a head failing over, say: look again next round
                logger.warning("api %r: looking after jobs: %s: %s", self.name, type(e).__name__, e)
            time.sleep(WATCH_INTERVAL_S)

    def _look_after_jobs_once(self) -> None:
        from serval import serve

        jobs = _jobs()
        snap = serve.status()
        backends = {b["name"] for b in snap.get("backends", [])}
        replicas = snap.get("replicas", [])
        for job in json.loads(jobs.list(self.name)):
            job_id = job["id"]
            backend = worker_backend(self.name, job_id)
            if job["status"] in ENDED:
                self._workers_seen.pop(job_id, None)
                if backend in backends:
                    self._remove_workers(job_id)
            elif job["status"] == job_status.ENQUEUING:
                enqueuer = job["spec"].get("enqueuer") or ""
                if enqueuer != self.me and not _process_alive(enqueuer, replicas):
                    logger.error("api %r: job %s: its enqueuer %s is gone", self.name, job_id, enqueuer)
                    try:
                        jobs.finish_enqueue(job_id, 0, "the gateway enqueuing the job stopped before it "
                                                       "stored every batch; submit the job again")
                    except Exception:
                        pass  # another gateway ended it first
            elif backend not in backends:
                self._start_workers(job_id, job["spec"]["workers"])
            else:
                self._watch(jobs, job, [r for r in replicas if r["backend"] == backend])

    def _start_workers(self, job_id: str, workers: int) -> None:
        from serval import AlreadyExists

        compute = self.spec.get("compute") or {}
        options = {"num_cpus": float(compute.get("cpu") or 0.2), "num_gpus": float(compute.get("gpu") or 0)}
        try:
            # Not waiting for the workers: this loop watches them.
            _core.submit_backend(worker_backend(self.name, job_id), self.worker_class(), (self.spec, job_id),
                                  options, {"num_replicas": workers})
        except AlreadyExists:
            pass  # another gateway started them first

    def _watch(self, jobs, job: dict, workers: List[dict]) -> None:
        """One look at a running job: gives a dead or moved worker's leases
        back, ends the job when a worker keeps dying or its timeout passed."""
        job_id = job["id"]
        timeout = job["spec"].get("timeout_s") or 0
        if timeout and job.get("start_ms") and time.time() * 1000 > job["start_ms"] + timeout * 1000:
            jobs.stop(job_id, job_status.TIMED_OUT, f"the job ran past its timeout of {timeout:g} s")
            return
        seen = self._workers_seen.setdefault(job_id, {})
        for r in workers:
            restarts = r.get("restarts", 0)
            now, before = (r.get("node_id") or "", restarts, r["state"] == "failed"), seen.get(r["id"])
            seen[r["id"]] = now
            if now == before or (before is None and not restarts and r["state"] != "failed"):
                continue
            # Its process died, or its node did and it moved: the batches it
            # held go to the other workers now (it re-leases them itself if
            # it asks first).
            jobs.release_worker(job_id, r["id"])
            if restarts >= MAX_WORKER_RESTARTS:
                error = (r.get("error") or "").strip().splitlines()
                jobs.stop(job_id, job_status.WORKER_OOM if any("MemoryError" in l for l in error)
                          else job_status.WORKER_ERROR, f"worker {r['id']}: {error[-1] if error else 'died'}")
                return

    def worker_class(self) -> type:
        """What a job's worker replicas host (a TaskAPI's gateway: its Task)."""
        return BatchWorker

    def _remove_workers(self, job_id: str) -> None:
        from serval import ServeError, serve

        try:
            serve.delete_backend(worker_backend(self.name, job_id), force=True)
        except ServeError:
            pass  # never started, or already gone

    # -- answers ------------------------------------------------------------

    def status(self, job: dict) -> dict:
        """Cortex's BatchJobStatus: the job's spec, its status code (see
        serval.cortex.job_status), counts and times. ``worker_counts`` is
        null once the job has ended, as in Cortex. ``error`` (why the job
        ended, null when it did not fail) is Serval's own: Cortex left that
        to the job's logs."""
        return {**self._job_spec(job), "total_batch_count": job.get("total_batches", 0),
                "start_time": _iso(job.get("start_ms", 0)), "end_time": _iso(job.get("end_ms", 0)),
                "status": job_status.code(job["status"]), "batches_in_queue": job.get("batches_in_queue", 0),
                "batch_metrics": {"succeeded": job.get("succeeded", 0), "failed": job.get("failed", 0),
                                  "avg_time_per_batch": job.get("avg_time_per_batch_s") or None},
                "worker_counts": self._worker_counts(job), "error": job.get("error") or None}

    def _worker_counts(self, job: dict) -> Optional[dict]:
        """Cortex's worker_counts of a job: its workers by state; null once
        it ended."""
        from serval import serve

        if job["status"] in ENDED:
            return None
        counts = {k: 0 for k in ("pending", "initializing", "running", "succeeded", "failed", "stalled", "unknown")}
        backend = worker_backend(self.name, job["id"])
        for r in serve.status().get("replicas", []):
            if r["backend"] == backend:
                key = {"pending": "pending", "starting": "initializing", "running": "running",
                       "failed": "failed"}.get(r["state"], "stalled")
                counts[key] += 1
        return counts

    def dead_letters(self, job_id: str) -> list:
        self._job(job_id)
        return [{"batch_id": batch_id, "payload": json.loads(payload), "receive_count": count, "error": error}
                for _, batch_id, payload, count, error in _jobs().dead_letters(job_id)]


def _process_alive(process: str, replicas: List[dict]) -> bool:
    """Whether the process "<replica id>/<pid>" still runs, by the snapshot."""
    replica_id, _, pid = process.rpartition("/")
    return any(r["id"] == replica_id and str(r.get("pid")) == pid and r["state"] in ("running", "starting")
               for r in replicas)


# -- the workers ------------------------------------------------------------------


class BatchWorker(RealtimeAPI):
    """One worker of one job: builds ``Handler(config, job_spec)`` (with
    ``tensorflow_client`` for ``handler.type: tensorflow``, as a
    RealtimeAPI's: serval.cortex.tensorflow) and, on a thread, leases
    batches until the job is done."""

    def __init__(self, spec: dict, job_id: str, project_dir: Optional[str] = None):
        self.name = spec.get("name") or "api"
        handler = spec.get("handler") or {}
        project = setup_process(self.name, spec, project_dir)
        os.environ["SERVAL_API_KIND"] = "BatchAPI"
        os.environ["SERVAL_JOB_ID"] = job_id
        self.job_id = job_id
        self.worker_id = os.environ.get("SERVAL_REPLICA_ID") or f"worker-{uuid.uuid4()}"
        self.jobs = _jobs()
        job = json.loads(_retrying(self.jobs.get, job_id))
        job_config = json.loads(job["spec"].get("config_json") or "{}")
        config = {**(handler.get("config") or {}), **job_config}
        job_spec = {"job_id": job_id, "api_name": self.name, "config": job_config,
                    "workers": job["spec"]["workers"], "total_batch_count": job.get("total_batches", 0),
                    "start_time": _iso(job.get("start_ms", 0))}
        available = {"config": config, "job_spec": job_spec}
        if handler.get("type") == "tensorflow":  # Handler(tensorflow_client, config, job_spec)
            from .tensorflow import tensorflow_client
            available["tensorflow_client"] = tensorflow_client(self.name, spec, project)
        handler_class = self._load_handler_class(project, handler.get("path") or "handler.py")
        self.handler = self._build(handler_class, available)
        # About a quarter of a worker's share per lease: a big job's queue
        # sees few writes per batch, a small one still spreads out.
        share = job.get("total_batches", 0) // max(1, job["spec"]["workers"])
        self.lease_max = max(1, min(LEASE_MAX, share // 4))
        handle_batch = getattr(self.handler, "handle_batch", None)
        if not callable(handle_batch):
            raise HandlerError(f"api {self.name!r}: Handler defines no handle_batch(payload, batch_id)")
        self._handle_args = accepted_args(handle_batch, ("payload", "batch_id"),
                                          f"api {self.name!r}: Handler.handle_batch")
        self._methods = {}
        self._allow = ""
        mem = (spec.get("compute") or {}).get("mem")
        if mem:
            threading.Thread(target=self._enforce_memory, args=(int(mem),), name=f"memory-{job_id}",
                             daemon=True).start()
        self._thread = threading.Thread(target=self._work, name=f"worker-{job_id}", daemon=True)
        self._thread.start()

    def _enforce_memory(self, limit: int) -> None:
        """``compute.mem`` for a worker: past it, the job ends "out of
        memory" (as Cortex's OOM-killed workers did) and this process is
        killed, so its batch is not half-done by a process about to die."""
        page = os.sysconf("SC_PAGE_SIZE")
        while True:
            try:
                with open("/proc/self/statm") as f:
                    rss = int(f.read().split()[1]) * page
            except (OSError, ValueError, IndexError):
                return  # no /proc: not enforced
            if rss > limit:
                message = (f"worker {self.worker_id} used {rss / 2**20:.0f} MiB of memory, over its "
                           f"compute.mem of {limit / 2**20:.0f} MiB")
                logger.error("job %s: %s", self.job_id, message)
                try:
                    self.jobs.stop(self.job_id, job_status.WORKER_OOM, message)
                finally:
                    os.kill(os.getpid(), 9)
            time.sleep(MEMORY_CHECK_INTERVAL_S)

    async def __call__(self, request: Request):
        return error_response(404, f"worker of job {self.job_id}: no HTTP requests")

    def _work(self) -> None:
        try:
            while True:
                status, done, run_on_complete, leased = _retrying(
                    self.jobs.lease, self.job_id, self.worker_id, self.lease_max, VISIBILITY_S)
                if run_on_complete:
                    self._complete()
                    return
                if done or status in ENDED:
                    logger.info("job %s: no batches left (%s)", self.job_id, status)
                    return
                if not leased:
                    time.sleep(0.05)  # others hold the last batches: wait for them to finish or come back
                    continue
                # An ack counts once, from the lease holder: a retried one is harmless.
                _retrying(self.jobs.ack, self.job_id, self.worker_id, [self._run(*b) for b in leased])
        except Exception:
            # Never a worker that looks alive and does nothing: exit, so the
            # supervisor restarts it and the gateway returns its leases.
            logger.exception("job %s: worker %s stopped", self.job_id, self.worker_id)
            os._exit(1)

    def _run(self, index: int, batch_id: str, payload: bytes, receive_count: int) -> Tuple[int, bool, float, str]:
        started = time.monotonic()
        available = {"payload": json.loads(payload), "batch_id": batch_id}
        try:
            self.handler.handle_batch(**{n: available[n] for n in self._handle_args})
        except Exception as e:
            logger.error("job %s: batch %s failed (receipt %d): %s: %s", self.job_id, batch_id, receive_count,
                         type(e).__name__, e, exc_info=e)
            return index, False, time.monotonic() - started, f"{type(e).__name__}: {e}"
        return index, True, time.monotonic() - started, ""

    def _complete(self) -> None:
        on_complete = getattr(self.handler, "on_job_complete", None)
        error = ""
        if callable(on_complete):
            try:
                on_complete()
            except Exception as e:
                logger.exception("job %s: on_job_complete failed", self.job_id)
                error = f"on_job_complete: {type(e).__name__}: {e}"
        try:
            _retrying(self.jobs.complete, self.job_id, self.worker_id, error)
        except Exception as e:
            # A retried completion that had gone through is refused: fine if the job ended.
            if json.loads(_retrying(self.jobs.get, self.job_id))["status"] not in ENDED:
                raise
            logger.info("job %s: completion answered %s; the job has ended", self.job_id, e)
        logger.info("job %s: complete", self.job_id)
