"""Cortex 0.35's job statuses: the one table of them.

The controller stores a job's status as Cortex's message for it (``"timed
out"``: what Cortex's CLI printed, and what ``serve status`` and the logs
show); a job's answers over HTTP, through the client and the CLI carry
Cortex's code for it (``"status_timed_out"``, what Cortex's API answered
and what its end-to-end tests compare), taken from this table. A message
this table does not know is ``status_unknown``.
"""

from __future__ import annotations

from typing import Dict, Tuple

#: (code in answers, message stored and shown), in Cortex's order.
JOB_STATUSES: Tuple[Tuple[str, str], ...] = (
    ("status_unknown", "unknown"),
    ("status_enqueuing", "enqueuing"),
    ("status_running", "running"),
    ("status_enqueue_failed", "failed while enqueuing"),
    ("status_completed_with_failures", "completed with failures"),
    ("status_succeeded", "succeeded"),
    ("status_unexpected_error", "unexpected error"),
    ("status_worker_error", "worker error"),
    ("status_worker_oom", "out of memory"),
    ("status_timed_out", "timed out"),
    ("status_stopped", "stopped"),
)

_CODES: Dict[str, str] = {message: code for code, message in JOB_STATUSES}
_MESSAGES: Dict[str, str] = {code: message for code, message in JOB_STATUSES}

ENQUEUING = _MESSAGES["status_enqueuing"]
RUNNING = _MESSAGES["status_running"]
WORKER_ERROR = _MESSAGES["status_worker_error"]
WORKER_OOM = _MESSAGES["status_worker_oom"]
TIMED_OUT = _MESSAGES["status_timed_out"]

#: The messages of a job that has ended (every status but unknown,
#: enqueuing and running): the controller's ENDED list, and "unexpected
#: error", which nothing writes.
ENDED: Tuple[str, ...] = tuple(m for c, m in JOB_STATUSES
                               if c not in ("status_unknown", "status_enqueuing", "status_running"))


def code(message: str) -> str:
    """The Cortex code of a stored status message."""
    return _CODES.get(message, "status_unknown")


def message(code_: str) -> str:
    """The message of a Cortex code (``unknown`` for an unknown one)."""
    return _MESSAGES.get(code_, "unknown")
