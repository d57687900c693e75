"""Task APIs (Cortex 0.35's ``kind: TaskAPI``): a job runs a ``Task``
class's ``__call__(config)`` on workers started for it.

A TaskAPI is a BatchAPI whose batches are its workers' runs (the same
gateway, queue and look-after loop, serval.cortex.batch): ``POST
/<endpoint>`` with ``{"workers": N, "config": {...}, "timeout": S}`` (all
optional; one worker by default) stores one batch per worker in the
replicated queue and answers Cortex's TaskJob spec; ``workers`` replicas of
``TaskWorker`` start, each leases one run, builds ``Task()`` and calls it
with the API's ``definition.config`` updated with the job's ``config``. A
Task that raises ends the job "worker error" (``status_worker_error``) at
once; once every run succeeded, one worker completes the job
("succeeded"). ``GET ?jobID=`` answers ``{"job_status", "endpoint",
"api_spec"}``, ``DELETE ?jobID=`` stops the job (its workers are removed),
and a job past its ``timeout`` ends ``status_timed_out``: all as a
BatchAPI's.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import threading
import time
import traceback
import uuid
from typing import Any, Optional

from . import job_status
from .batch import VISIBILITY_S, BatchGateway, BatchWorker, JobError, _iso, _jobs, _retrying
from .job_status import ENDED
from .realtime import HandlerError, import_file, setup_process

logger = logging.getLogger("serval.cortex")

#: A task job request's size, at most.
MAX_REQUEST_BYTES = 1024 * 1024


def parse_task_job(body: bytes) -> dict:
    """A task job request, validated; JobError names the field."""
    if len(body) > MAX_REQUEST_BYTES:
        raise JobError(f"the request is {len(body)} bytes; the limit is {MAX_REQUEST_BYTES} (1 MiB)")
    try:
        job = json.loads(body) if body.strip() else {}
    except ValueError as e:
        raise JobError(f"the body is not valid JSON: {e}") from None
    if not isinstance(job, dict):
        raise JobError("the body must be a JSON object")
    workers = job.get("workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise JobError(f"workers: an integer of at least 1 (got {workers!r})")
    timeout = job.get("timeout")
    if timeout is not None and (not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0):
        raise JobError(f"timeout: a number of seconds above 0 (got {timeout!r})")
    config = job.get("config") or {}
    if not isinstance(config, dict):
        raise JobError(f"config: must be an object (got {type(config).__name__})")
    return {"workers": workers, "timeout": timeout, "config": config, "max_receive_count": 1}


class TaskGateway(BatchGateway):
    """The HTTP face of a TaskAPI: a BatchAPI gateway whose jobs hold one
    batch per worker and whose workers run the Task."""

    def submit(self, body: bytes, query) -> Any:
        job = parse_task_job(body)
        created = self._create(job)
        jobs = _jobs()
        try:
            jobs.enqueue(created["id"], 0, [b"{}"] * job["workers"])
        except Exception as e:
            _retrying(jobs.finish_enqueue, created["id"], 0, f"storing the job failed: {e}")
            raise
        # Running once stored; the look-after loop starts its workers.
        _retrying(jobs.finish_enqueue, created["id"], job["workers"])
        return self._job_spec(created)

    def worker_class(self) -> type:
        return TaskWorker

    def _job_spec(self, job: dict) -> dict:
        """Cortex's TaskJob: a submission's answer, and the start of a job's
        status."""
        spec = job["spec"]
        timeout = spec.get("timeout_s") or None
        return {"job_id": job["id"], "api_name": self.name, "kind": "TaskAPI", "workers": spec["workers"],
                "config": json.loads(spec.get("config_json") or "{}"),
                "timeout": int(timeout) if timeout and timeout == int(timeout) else timeout,
                "api_id": self.api_id, "created_time": _iso(job.get("created_ms", 0))}

    def status(self, job: dict) -> dict:
        """Cortex's TaskJobStatus (Serval adds ``error``: why it failed)."""
        return {**self._job_spec(job), "start_time": _iso(job.get("start_ms", 0)),
                "end_time": _iso(job.get("end_ms", 0)), "status": job_status.code(job["status"]),
                "worker_counts": self._worker_counts(job), "error": job.get("error") or None}

    def dead_letters(self, job_id: str) -> list:
        raise JobError("a TaskAPI's jobs have no dead letters")


class TaskWorker(BatchWorker):
    """One worker of one task job: builds ``Task()`` and, on a thread, runs
    it once with the job's config (see the module docs). A BatchWorker for
    ``compute.mem``: past it, the job ends "out of memory"."""

    def __init__(self, spec: dict, job_id: str, project_dir: Optional[str] = None):
        self.name = spec.get("name") or "api"
        definition = spec.get("definition") or {}
        # The definition takes the keys a handler does (env, python_path, ...).
        project = setup_process(self.name, dict(spec, handler=definition), project_dir)
        os.environ["SERVAL_API_KIND"] = "TaskAPI"
        os.environ["SERVAL_JOB_ID"] = job_id
        self.job_id = job_id
        self.worker_id = os.environ.get("SERVAL_REPLICA_ID") or f"worker-{uuid.uuid4()}"
        self.jobs = _jobs()
        job = json.loads(_retrying(self.jobs.get, job_id))
        self.config = {**(definition.get("config") or {}), **json.loads(job["spec"].get("config_json") or "{}")}
        path = definition.get("path") or "task.py"
        try:
            module = import_file(os.path.join(project, path))
        except Exception as e:
            raise HandlerError(f"api {self.name!r}: importing {path} failed: {type(e).__name__}: {e}") from e
        task_class = getattr(module, "Task", None)
        if not inspect.isclass(task_class):
            raise HandlerError(f"api {self.name!r}: {path} defines no class named Task")
        try:
            self.task = task_class()
        except Exception as e:
            raise HandlerError(f"api {self.name!r}: Task() failed: {type(e).__name__}: {e}") from e
        if not callable(self.task):
            raise HandlerError(f"api {self.name!r}: Task defines no __call__(self, config)")
        self._methods, self._allow = {}, ""
        mem = (spec.get("compute") or {}).get("mem")
        if mem:
            threading.Thread(target=self._enforce_memory, args=(int(mem),), name=f"memory-{job_id}",
                             daemon=True).start()
        threading.Thread(target=self._work, name=f"task-{job_id}", daemon=True).start()

    def _work(self) -> None:
        try:
            while True:
                status, done, run_on_complete, leased = _retrying(
                    self.jobs.lease, self.job_id, self.worker_id, 1, VISIBILITY_S)
                if run_on_complete:
                    _retrying(self.jobs.complete, self.job_id, self.worker_id, "")
                    logger.info("job %s: complete", self.job_id)
                    return
                if done or status in ENDED:
                    return
                if leased:
                    if not self._run(leased[0][0]):
                        return
                    self._wait_for_the_others()
                else:
                    time.sleep(0.1)  # another worker runs the last task
        except Exception:
            # Exit, so the supervisor restarts this worker and the gateway
            # gives its lease back.
            logger.exception("job %s: worker %s stopped", self.job_id, self.worker_id)
            os._exit(1)

    def _run(self, index: int) -> bool:
        """Runs the Task once; whether it succeeded (else the job ended)."""
        started = time.monotonic()
        try:
            self.task(self.config)
        except Exception as e:
            logger.error("job %s: the Task failed:\n%s", self.job_id, traceback.format_exc())
            try:
                self.jobs.stop(self.job_id, job_status.WORKER_ERROR, f"Task: {type(e).__name__}: {e}")
            except Exception as stop_error:  # stopped or timed out meanwhile
                logger.info("job %s: ending it answered %s", self.job_id, stop_error)
            return False
        _retrying(self.jobs.ack, self.job_id, self.worker_id, [(index, True, time.monotonic() - started, "")])
        return True

    def _wait_for_the_others(self) -> None:
        """Leases nothing more until every run has finished (so no worker
        runs twice while another has not started; a dead worker's run waits
        for its restarted process); then one more lease completes the job."""
        while True:
            job = json.loads(_retrying(self.jobs.get, self.job_id))
            if job["status"] in ENDED or job.get("batches_in_queue", 0) == 0:
                return
            time.sleep(0.1)
