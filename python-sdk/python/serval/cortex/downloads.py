"""What replicas fetch and unpack into the node's cache, bounded.

* ``build_once(target, make)``: a cache entry (a file or a directory) made
  once per node: under a lock, into ``<target>.partial``, renamed when
  complete. A partial entry left by a process that died while making it is
  removed by the next process that takes the lock, and ``sweep`` removes
  every such leftover of a cache folder whose lock nobody holds.
* ``download(url, path, limits)``: an http(s) download with a size cap, an
  overall deadline (not only a socket timeout) and an optional sha256.
* ``extract(archive, target, limits)``: a tar or zip unpacked only when
  every member is a plain file or folder inside ``target``, the members
  are at most ``max_entries``, their total size at most ``max_bytes`` and
  the archive expands at most ``max_ratio`` times.

Errors are ``FetchError`` (an ``OSError``: callers name the config field).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import shutil
import stat
import tarfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from typing import Callable, Optional, Union

#: The suffix of an entry being made, and of its lock file.
PARTIAL = ".partial"
LOCK = ".lock"


class FetchError(OSError):
    """A download or an archive refused (over a cap, a digest mismatch, a
    member outside the target); the message says which and why."""


@dataclass(frozen=True)
class Limits:
    """Caps on one download and on what an archive unpacks to."""

    #: Bytes a download may have, and an archive's members together.
    max_bytes: int = 4 << 30
    #: Seconds a whole download may take.
    timeout_s: float = 1800.0
    #: Members an archive may hold.
    max_entries: int = 10_000
    #: How many times its own size an archive may unpack to.
    max_ratio: float = 200.0


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def build_once(target: str, make: Callable[[str], None]) -> str:
    """``target``, made by ``make(partial_path)`` if this node has none yet
    (see the module docs); processes asking together wait for the first."""
    if os.path.exists(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target + LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(target):
            return target
        partial = target + PARTIAL
        _remove(partial)  # a process that died while making it left it
        try:
            make(partial)
            os.rename(partial, target)
        finally:
            _remove(partial)
    return target


def sweep(folder: str) -> None:
    """Removes the partial entries of ``folder`` whose lock nobody holds:
    what processes killed while downloading or unpacking left behind."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if not name.endswith(PARTIAL):
            continue
        target = os.path.join(folder, name[: -len(PARTIAL)])
        try:
            with open(target + LOCK, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                _remove(target + PARTIAL)
        except BlockingIOError:
            pass  # being made right now
        except OSError:
            pass


def download(url: str, path: str, limits: Limits, sha256: Optional[str] = None) -> None:
    """Writes the body at ``url`` to ``path`` (see the module docs)."""
    deadline = time.monotonic() + limits.timeout_s
    digest = hashlib.sha256()
    size = 0
    # The socket timeout bounds each read; the deadline bounds them all.
    with urllib.request.urlopen(url, timeout=min(60.0, limits.timeout_s)) as response, open(path, "wb") as f:
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limits.max_bytes:
            raise FetchError(f"{url} is {int(declared)} bytes, over the limit of {limits.max_bytes} bytes")
        while True:
            chunk = response.read(1 << 20)
            if not chunk:
                break
            size += len(chunk)
            if size > limits.max_bytes:
                raise FetchError(f"{url} is over the limit of {limits.max_bytes} bytes")
            if time.monotonic() > deadline:
                raise FetchError(f"downloading {url} took over {limits.timeout_s:g} s")
            digest.update(chunk)
            f.write(chunk)
    if sha256 and digest.hexdigest() != sha256.lower():
        raise FetchError(f"{url} has sha256 {digest.hexdigest()}, not the {sha256.lower()} the config names")


def _inside(name: str) -> bool:
    """Whether a member name stays inside the folder it is unpacked in."""
    norm = os.path.normpath(name.replace("\\", "/"))
    return bool(name) and not os.path.isabs(norm) and norm != ".." and not norm.startswith("../")


def _check(kind: str, archive_size: int, names_sizes, limits: Limits) -> None:
    total = entries = 0
    for name, size in names_sizes:
        entries += 1
        if entries > limits.max_entries:
            raise FetchError(f"the {kind} has over {limits.max_entries} members")
        if not _inside(name):
            raise FetchError(f"the {kind} member {name!r} is outside the folder it unpacks to")
        total += size
        if total > limits.max_bytes:
            raise FetchError(f"the {kind} unpacks to over {limits.max_bytes} bytes")
        if total > limits.max_ratio * max(archive_size, 1):
            raise FetchError(f"the {kind} unpacks to over {limits.max_ratio:g} times its own "
                             f"{archive_size} bytes")


def extract(archive: Union[str, bytes], target: str, limits: Limits, zip_allowed: bool = True) -> None:
    """Unpacks the tar (compressed or not) or zip ``archive`` (a path, or
    the archive's bytes) into the new folder ``target`` (see the module
    docs); anything else is refused."""
    if isinstance(archive, bytes):
        archive_size = len(archive)
        data = archive

        def source():
            return io.BytesIO(data)
    else:
        archive_size = os.path.getsize(archive)
        path = archive

        def source():
            return path
    # A tar first: a tar holding a zip (a wheel in a package) near its end
    # passes zipfile.is_zipfile.
    if _is_tar(source()):
        with _open_tar(source()) as t:
            members = []

            def scan():
                # One header at a time: a bomb stops at the first cap it
                # passes, before the rest of it is decompressed.
                for m in t:
                    if not (m.isreg() or m.isdir()) or m.issparse():
                        raise FetchError(f"the tar member {m.name!r} is not a plain file or folder")
                    members.append(m)
                    yield m.name, m.size

            _check("tar", archive_size, scan(), limits)
            os.makedirs(target)
            t.extractall(target, members=members, filter="data")
        return
    if zip_allowed and _is_zip(source()):
        with zipfile.ZipFile(source()) as z:
            members = z.infolist()
            for m in members:
                # Unix file type bits, when the zip has them (writers that
                # do not leave them 0): a symlink is refused.
                kind = stat.S_IFMT(m.external_attr >> 16)
                if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                    raise FetchError(f"the zip member {m.filename!r} is not a plain file or folder")
            _check("zip", archive_size, ((m.filename, m.file_size) for m in members), limits)
            os.makedirs(target)
            z.extractall(target)
        return
    raise FetchError("neither a zip nor a tar archive" if zip_allowed else "not a tar archive")


def _open_tar(source) -> tarfile.TarFile:
    return tarfile.open(fileobj=source) if isinstance(source, io.BytesIO) else tarfile.open(source)


def _is_zip(source) -> bool:
    """A zip from its first bytes (a local file header, or an empty zip's
    end record), and readable as one."""
    if isinstance(source, io.BytesIO):
        head = source.read(4)
        source.seek(0)
    else:
        with open(source, "rb") as f:
            head = f.read(4)
    return head in (b"PK\x03\x04", b"PK\x05\x06") and zipfile.is_zipfile(source)


def _is_tar(source) -> bool:
    try:
        with _open_tar(source):
            return True
    except (tarfile.TarError, OSError):
        return False
