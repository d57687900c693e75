"""Async APIs (Cortex 0.35's ``kind: AsyncAPI``): a submission answers an
id at once, the Handler's ``handle_async`` runs it later from a durable
queue, and the result is fetched by id.

The queue is the BatchAPI's (serval.cortex.batch): each submission is a job
of one batch in the controller's raft-replicated store, so a submission
survives the loss of the replica that took it, of the replica running it,
and of a head. The API's backend replicas (autoscaled as a RealtimeAPI's)
each serve the HTTP side and run one consumer thread:

* ``POST /<endpoint>``: the body (with its Content-Type) becomes the job's
  one batch; answers ``{"id": <job id>}``. A body over ``MAX_PAYLOAD_BYTES``
  is a 413; with ``jobs.max_queued`` submissions not yet finished (1,000
  by default), a 503 with ``Retry-After``.
* ``GET /<endpoint>/<id>``: ``{"id", "status"}`` with Cortex's statuses
  (``in_queue``, ``in_progress``, ``completed``, ``failed``), plus
  ``result`` and ``timestamp`` once completed (Serval adds ``error`` to a
  failed one); 404 for an unknown id.
* The consumer leases the oldest queued submission of its API, parses the
  payload as a RealtimeAPI's (JSON, text, else bytes), calls
  ``handle_async(payload, request_id)`` (the arguments it names; a
  ``handler.type: tensorflow`` Handler is built with the RealtimeAPI's
  ``tensorflow_client``, serval.cortex.tensorflow) and ends
  the job with ``FinishJob``: "succeeded" with the JSON result kept in the
  store, or "worker error" with the exception. A replica that dies while
  running a submission leaves its lease to expire (``VISIBILITY_S``); a
  restarted process of the same replica takes its leases back at once.

Results are kept as ended jobs are: ``jobs.retention`` (24 h by default),
at most the cluster's 1,000 most recent ended jobs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
import traceback
import uuid
from typing import Any, Optional

from python_multipart.multipart import parse_options_header
from starlette.requests import Request
from starlette.responses import JSONResponse

from . import job_status
from .batch import _iso, _jobs, _process_id, _retrying
from .realtime import (HandlerError, PayloadError, RealtimeAPI, accepted_args, decode_text, error_response,
                       parse_json, setup_process)

logger = logging.getLogger("serval.cortex")

#: A submission's stored batch: its Content-Type, a newline, the body; the
#: queue's cap on one batch (256 KiB) bounds it.
MAX_BATCH_BYTES = 256 * 1024
MAX_CONTENT_TYPE_BYTES = 1024
MAX_PAYLOAD_BYTES = MAX_BATCH_BYTES - MAX_CONTENT_TYPE_BYTES - 1
#: The queue's cap on a result (FinishJob).
MAX_RESULT_BYTES = 1024 * 1024
#: How long a leased submission stays hidden from other replicas: a
#: replica that died running it gives it back after this long.
VISIBILITY_S = 3600.0
#: How often a consumer looks at an empty queue: at first, then at most
#: (doubling while it stays empty, so an idle API costs its head little).
IDLE_POLL_MIN_S = 0.05
IDLE_POLL_MAX_S = 0.5
#: What a job id (a submission's id) looks like.
JOB_ID = re.compile(r"[0-9a-f]{1,64}")
#: A submission still being stored after this long lost its submitter.
ENQUEUE_DEADLINE_S = 60.0


def handle_async_args(handler: Any, name: str) -> tuple:
    fn = getattr(handler, "handle_async", None)
    if not callable(fn):
        raise HandlerError(f"api {name!r}: Handler defines no handle_async(payload, request_id)")
    return accepted_args(fn, ("payload", "request_id"), f"api {name!r}: Handler.handle_async")


def encode_submission(content_type: str, body: bytes) -> bytes:
    return content_type.encode("latin-1", "replace") + b"\n" + body


def decode_payload(data: bytes) -> Any:
    """A stored submission as Cortex gave it to ``payload``: parsed JSON for
    application/json, str for text/plain (its charset), else the bytes."""
    header, _, body = data.partition(b"\n")
    media_type, params = parse_options_header(header.decode("latin-1"))
    if media_type == b"application/json":
        return parse_json(body)
    if media_type == b"text/plain":
        charset = params.get(b"charset")
        return decode_text(body, charset.decode("latin-1") if charset else "utf-8")
    return body


def workload_status(job: dict) -> str:
    """Cortex's workload status of a submission's job."""
    status = job["status"]
    if status == "succeeded":
        return "completed"
    if status in job_status.ENDED:
        return "failed"
    return "in_progress" if job.get("leased") else "in_queue"


class AsyncAPI(RealtimeAPI):
    """One replica of an AsyncAPI (see the module docs)."""

    def __init__(self, spec: dict, project_dir: Optional[str] = None):
        self.name = spec.get("name") or "api"
        self.endpoint = "/" + (spec.get("endpoint") or self.name).strip("/")
        handler = spec.get("handler") or {}
        project = setup_process(self.name, spec, project_dir)
        available = {"config": handler.get("config") or {}}
        if handler.get("type") == "tensorflow":  # Handler(tensorflow_client, config)
            from .tensorflow import tensorflow_client
            available["tensorflow_client"] = tensorflow_client(self.name, spec, project)
        handler_class = self._load_handler_class(project, handler.get("path") or "handler.py")
        self.handler = self._build(handler_class, available)
        self._args = handle_async_args(self.handler, self.name)
        jobs = spec.get("jobs") or {}
        self._retention = float(jobs.get("retention") or 0)
        self._max_queued = int(jobs.get("max_queued") or 1000)
        self.me = _process_id()
        self.worker_id = os.environ.get("SERVAL_REPLICA_ID") or f"async-{uuid.uuid4()}"
        self._methods, self._allow = {}, "GET, POST"
        threading.Thread(target=self._consume, name=f"async-{self.name}", daemon=True).start()

    # -- HTTP ---------------------------------------------------------------

    async def __call__(self, request: Request):
        path = request.url.path.rstrip("/")
        rest = path[len(self.endpoint):] if path.startswith(self.endpoint) else path
        rest = rest.strip("/")
        if request.method == "POST" and not rest:
            body = await request.body()
            return await self._off_loop(self.submit, request.headers.get("content-type") or "", body)
        if request.method == "GET" and rest and "/" not in rest:
            return await self._off_loop(self.workload, rest)
        return error_response(405 if not rest or "/" not in rest else 404,
                              f"api '{self.name}' takes POST {self.endpoint} (submit) and "
                              f"GET {self.endpoint}/<id> (a submission's status)", {"Allow": self._allow})

    @staticmethod
    async def _off_loop(fn, *args):
        """``fn(*args)`` off the replica's event loop (control calls block);
        no head answering is the client's 503, to retry."""
        from serval import ControlUnavailable

        try:
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        except ControlUnavailable as e:
            return error_response(503, f"the cluster's queue does not answer now: {e}", {"Retry-After": "1"})

    def submit(self, content_type: str, body: bytes):
        from serval import ServeError

        if len(content_type) > MAX_CONTENT_TYPE_BYTES:
            return error_response(400, f"the Content-Type is over {MAX_CONTENT_TYPE_BYTES} bytes")
        if len(body) > MAX_PAYLOAD_BYTES:
            return error_response(413, f"the payload is {len(body)} bytes; an AsyncAPI takes at most "
                                       f"{MAX_PAYLOAD_BYTES} bytes")
        jobs = _jobs()
        queued = sum(1 for j in json.loads(jobs.list(self.name)) if j["status"] not in job_status.ENDED)
        if queued >= self._max_queued:
            return error_response(503, f"api '{self.name}' has {queued} submissions queued or running, its "
                                       f"limit; retry later", {"Retry-After": "1"})
        try:
            job = json.loads(jobs.create(self.name, 1, 0.0, "{}", 1, self.me, self._retention))
        except ServeError as e:
            return error_response(503, f"the submission could not be stored: {e}", {"Retry-After": "1"})
        try:
            jobs.enqueue(job["id"], 0, [encode_submission(content_type, body)])
            _retrying(jobs.finish_enqueue, job["id"], 1)
        except Exception as e:
            logger.error("api %r: storing submission %s failed: %s", self.name, job["id"], e)
            try:
                jobs.finish_enqueue(job["id"], 0, f"storing the payload failed: {e}")
            except Exception:
                pass  # the consumers end it past ENQUEUE_DEADLINE_S
            return error_response(503, f"the submission could not be stored: {e}", {"Retry-After": "1"})
        return {"id": job["id"]}

    def workload(self, request_id: str):
        from serval import ServeError

        job = None
        if JOB_ID.fullmatch(request_id):  # anything else is no id of the queue's: not asked
            try:
                job = json.loads(_jobs().get(request_id))
            except ServeError:
                pass
        if job is None or job["spec"]["api"] != self.name:
            return error_response(404, f"no submission {request_id} in api '{self.name}'")
        status = workload_status(job)
        out: dict = {"id": request_id, "status": status}
        if status == "completed":
            out["result"] = json.loads(job.get("result") or "null")
            out["timestamp"] = _iso(job.get("end_ms", 0))
        elif status == "failed":
            out["error"] = job.get("error") or job["status"]
        return JSONResponse(out)

    # -- the consumer -------------------------------------------------------

    def _consume(self) -> None:
        first, idle = True, IDLE_POLL_MIN_S
        while True:
            try:
                ran = self._consume_once(first)
                first = False
            except Exception as e:  # a head failing over, say: look again
                logger.warning("api %r: reading the queue: %s: %s", self.name, type(e).__name__, e)
                ran = False
            if ran:
                idle = IDLE_POLL_MIN_S
            else:
                time.sleep(idle)
                idle = min(idle * 2, IDLE_POLL_MAX_S)

    def _consume_once(self, first: bool) -> bool:
        """Runs the oldest submission this replica can lease; whether it
        ran one. On its first round a replica also tries the leased ones:
        a restarted process gets its own back."""
        jobs = _jobs()
        now_ms = time.time() * 1000
        for job in json.loads(jobs.list(self.name)):
            if job["status"] == job_status.ENQUEUING:
                if now_ms - job.get("created_ms", now_ms) > ENQUEUE_DEADLINE_S * 1000:
                    try:
                        jobs.finish_enqueue(job["id"], 0, "the replica storing the submission stopped")
                    except Exception:
                        pass  # another replica ended it first
                continue
            if job["status"] != job_status.RUNNING or (job.get("leased") and not first):
                continue
            _, _, _, leased = _retrying(jobs.lease, job["id"], self.worker_id, 1, VISIBILITY_S)
            if leased:
                self._run(jobs, job["id"], *leased[0][:3])
                return True
        return False

    def _run(self, jobs, job_id: str, index: int, _batch_id: str, data: bytes) -> None:
        started = time.monotonic()
        result, error = "", ""
        try:
            available = {"payload": decode_payload(data), "request_id": job_id}
            out = self.handler.handle_async(**{n: available[n] for n in self._args})
            result = json.dumps(out)
            if len(result) > MAX_RESULT_BYTES:
                raise ValueError(f"the result is {len(result)} bytes of JSON; an AsyncAPI keeps at most "
                                 f"{MAX_RESULT_BYTES}")
        except PayloadError as e:
            error = str(e)
        except Exception as e:
            logger.error("api %r: submission %s failed:\n%s", self.name, job_id, traceback.format_exc())
            error = f"{type(e).__name__}: {e}"
        from serval import ServeError

        try:
            _retrying(jobs.finish_job, job_id, self.worker_id, index, "" if error else result, error,
                      time.monotonic() - started)
        except ServeError as e:  # its lease expired, or the job was ended meanwhile
            logger.warning("api %r: submission %s: its answer was refused: %s", self.name, job_id, e)
