"""Structured logging for handlers, as Cortex's ``cortex_internal.lib.log``:

    from serval.log import logger
    logger.info("received payload", extra={"payload": payload})

prints one JSON line on stderr (a replica's log)::

    {"asctime": "2021-01-19 15:14:05,291", "levelname": "INFO", "message": "received payload",
     "process": 235, "labels": {"apiName": "iris", ...}, "payload": "this movie is awesome"}

The keys of ``extra`` are flattened one level into the line. The reserved
keys (asctime, levelname, message, labels, process) cannot be overridden:
an ``extra`` key with one of those names (or another LogRecord attribute)
is dropped and named in the line's ``dropped_extra_keys``, instead of
raising inside the handler as ``logging`` would. A line over 5 MB is not written; a
warning saying so is written instead. The labels come from the replica's
environment (SERVAL_API_NAME, SERVAL_API_KIND, SERVAL_REPLICA_ID,
SERVAL_JOB_ID).
"""

from __future__ import annotations

import json
import logging
import os
import sys

RESERVED = ("asctime", "levelname", "message", "labels", "process")
MAX_LINE_BYTES = 5 * 1024 * 1024

_LABEL_ENV = (("apiName", "SERVAL_API_NAME"), ("apiKind", "SERVAL_API_KIND"),
              ("replicaID", "SERVAL_REPLICA_ID"), ("jobID", "SERVAL_JOB_ID"))
#: Attributes every LogRecord has; the others came from ``extra``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def labels() -> dict:
    return {key: os.environ[env] for key, env in _LABEL_ENV if os.environ.get(env)}


class JSONFormatter(logging.Formatter):
    """One JSON object per record, ``extra`` flattened one level."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "asctime": self.formatTime(record),
            "levelname": record.levelname,
            "message": record.getMessage(),
            "process": record.process,
            "labels": labels(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in line:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class JSONLinesHandler(logging.StreamHandler):
    """Writes formatted lines, dropping (with a warning) those over 5 MB."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if len(text.encode("utf-8", "replace")) > MAX_LINE_BYTES:
                warning = logging.LogRecord(record.name, logging.WARNING, record.pathname, record.lineno,
                                            "a log line of %d bytes was dropped: over the %d-byte limit",
                                            (len(text.encode("utf-8", "replace")), MAX_LINE_BYTES), None)
                text = self.format(warning)
            stream = self.stream
            stream.write(text + self.terminator)
            self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


class _Logger(logging.Logger):
    def makeRecord(self, name, level, fn, lno, msg, args, exc_info, func=None, extra=None, sinfo=None):
        dropped = []
        if extra:
            dropped = [k for k in extra if k in RESERVED or k in _STANDARD]
            if dropped:
                extra = {k: v for k, v in extra.items() if k not in dropped}
        record = super().makeRecord(name, level, fn, lno, msg, args, exc_info, func, extra, sinfo)
        if dropped:
            record.dropped_extra_keys = sorted(dropped)
        return record


def _make_logger() -> logging.Logger:
    log = _Logger("serval.user")
    log.setLevel(os.environ.get("SERVAL_LOG_LEVEL", "INFO").upper())
    handler = JSONLinesHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    log.addHandler(handler)
    log.propagate = False
    return log


logger = _make_logger()
