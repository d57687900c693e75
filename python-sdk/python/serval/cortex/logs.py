"""``serve logs NAME``: the log lines of every running replica of an API.

Each replica's stderr (Python logging, ``print``, ``serval.log``'s JSON
lines) is a file on its node, which may be another machine; it is read
through the replica itself, a chunk at a time (``Logs`` frames, see
``Client.replica_logs``). One offset per replica id; lines are yielded once
complete, so a line still being written waits for its newline.
"""

from __future__ import annotations

import logging
import time
from typing import Dict, Iterator, List, Optional, Set, Tuple

from .. import _core

#: Bytes asked per request; a replica answers at most 1 MiB anyway.
CHUNK_BYTES = 256 * 1024
#: Requests per replica per pass: a replica writing without pause must not
#: starve the others of their turn.
MAX_CHUNKS_PER_PASS = 16

_log = logging.getLogger("serval.cortex.logs")


#: The longest line a follower holds while it waits for the newline.
MAX_LINE_BYTES = 1024 * 1024


class _Tail:
    """Where the reader stands in one replica's log."""

    def __init__(self, offset: int = 0):
        self.offset = offset
        self.partial = b""

    def restart(self) -> None:
        self.offset = 0
        self.partial = b""

    def lines(self, data: bytes) -> List[str]:
        """The complete lines ``data`` finishes; keeps the rest for later,
        up to ``MAX_LINE_BYTES``: a replica that writes without newlines
        has its output cut into lines of that size rather than held."""
        *complete, self.partial = (self.partial + data).split(b"\n")
        out = [_text(line) for line in complete]
        while len(self.partial) >= MAX_LINE_BYTES:
            out.append(_text(self.partial[:MAX_LINE_BYTES]))
            self.partial = self.partial[MAX_LINE_BYTES:]
        return out

    def flush(self) -> List[str]:
        rest, self.partial = self.partial, b""
        return [_text(rest)] if rest else []


def _text(line: bytes) -> str:
    return line.decode("utf-8", "replace").rstrip("\r")


def _running_replicas(backend: str) -> List[dict]:
    from serval import serve

    replicas = [r for r in serve.status().get("replicas", [])
                if r.get("backend") == backend and r.get("state") == "running"]
    return sorted(replicas, key=lambda r: r.get("id", ""))


def _read(client, replica: dict, tail: _Tail) -> Iterator[str]:
    """The new complete lines of one replica, from ``tail.offset`` on."""
    rid = replica.get("id") or ""
    unix_path, tcp_addr = replica.get("unix_path") or "", replica.get("tcp_addr") or ""
    for _ in range(MAX_CHUNKS_PER_PASS):
        data, size = client.replica_logs(rid, unix_path, tcp_addr, tail.offset, CHUNK_BYTES,
                                         tls=bool(replica.get("tls")))
        if size < tail.offset:
            # Truncated or replaced (a restarted replica): its log starts over.
            tail.restart()
            continue
        tail.offset += len(data)
        yield from tail.lines(data)
        if not data or tail.offset >= size:
            return


def stream_api_logs(name: str, follow: bool = True, poll: float = 0.5,
                    from_start: bool = True, backend: Optional[str] = None) -> Iterator[Tuple[str, str]]:
    """``(replica id, line)`` for each log line of every running replica of
    API ``name``. With ``follow``, keeps polling every ``poll`` seconds,
    picking up replicas that start later; without it, stops after one pass
    (and yields unfinished last lines as they are). ``from_start=False``
    skips what the replicas running now have already written; replicas that
    start later are read from their beginning either way. Raises KeyError
    for an API that is not deployed. ``backend``: read the replicas of that
    backend instead of the API's own (a batch job's workers)."""
    from serval import serve

    from .deploy import get_api

    get_api(name)
    client = _core.get_client()
    tails: Dict[str, _Tail] = {}
    warned: Set[Tuple[str, str]] = set()
    first = True
    while True:
        for replica in _running_replicas(backend or name):
            rid = replica.get("id", "?")
            tail = tails.get(rid)
            try:
                if tail is None:
                    tail = tails[rid] = _Tail()
                    if first and not from_start:
                        _, tail.offset = client.replica_logs(rid, replica.get("unix_path") or "",
                                                             replica.get("tcp_addr") or "", 0, 0,
                                                             tls=bool(replica.get("tls")))
                for line in _read(client, replica, tail):
                    yield rid, line
            except serve.ServeError as e:
                # A replica that stops between the snapshot and the read, or
                # whose stderr is no file: its lines wait for the next pass.
                if (rid, str(e)) not in warned:
                    warned.add((rid, str(e)))
                    _log.warning("replica %s: %s", rid, e)
        first = False
        if not follow:
            for rid, tail in sorted(tails.items()):
                for line in tail.flush():
                    yield rid, line
            return
        time.sleep(poll)
