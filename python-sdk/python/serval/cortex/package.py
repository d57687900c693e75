"""A project folder as a package: what is shipped, its bytes, its digest.

``build_package(folder, config_path)`` walks the folder and keeps every file
except the config file, dotfiles and dot-folders (at any depth), ``*.pyc``,
``*.pyo``, ``*.pyd``, ``__pycache__`` and what ``.cortexignore`` (gitignore
syntax) excludes, as Cortex did. The files go into a deterministic tar
(sorted names, zero mtimes and owners), so the same folder always gives the
same sha256 digest: the package's name in the cluster's blob store, and the
reason a redeploy of an unchanged folder changes nothing.

``ensure_unpacked(digest, fetch)`` is the replica side: one unpacked copy per
digest under the node's cache directory, made atomically (unpacked beside,
then renamed), so replicas starting together on a node share it.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from .config import ConfigError
from .downloads import FetchError, Limits, build_once, extract, sweep

#: Cortex's limit on a project folder.
MAX_PACKAGE_BYTES = 32 * 1024 * 1024
EXCLUDED_SUFFIXES = (".pyc", ".pyo", ".pyd")
IGNORE_FILE = ".cortexignore"
#: What a replica unpacks a package to at most: a package built by deploy
#: holds at most MAX_PACKAGE_BYTES of files (and is an uncompressed tar).
UNPACK_LIMITS = Limits(max_bytes=MAX_PACKAGE_BYTES, max_entries=100_000, max_ratio=2.0)


@dataclass
class Package:
    data: bytes
    digest: str
    files: List[str]
    size: int


def _ignore_spec(folder: str):
    path = os.path.join(folder, IGNORE_FILE)
    if not os.path.isfile(path):
        return None
    import pathspec

    with open(path) as f:
        return pathspec.GitIgnoreSpec.from_lines(f)


def list_files(folder: str, config_path: Optional[str]) -> List[Tuple[str, int]]:
    """``(relative path, size)`` of every file shipped, sorted."""
    folder = os.path.abspath(folder)
    config = os.path.abspath(config_path) if config_path else None
    spec = _ignore_spec(folder)
    out = []
    for root, dirs, files in os.walk(folder):
        rel_root = os.path.relpath(root, folder)
        keep_dirs = []
        for d in dirs:
            rel = os.path.normpath(os.path.join(rel_root, d))
            if d.startswith(".") or d == "__pycache__":
                continue
            if spec is not None and spec.match_file(rel + "/"):
                continue
            keep_dirs.append(d)
        dirs[:] = sorted(keep_dirs)
        for name in files:
            full = os.path.join(root, name)
            rel = os.path.normpath(os.path.join(rel_root, name))
            if name.startswith(".") or name.endswith(EXCLUDED_SUFFIXES):
                continue
            if config is not None and os.path.abspath(full) == config:
                continue
            if spec is not None and spec.match_file(rel):
                continue
            if os.path.islink(full) and not os.path.exists(full):
                continue
            out.append((rel, os.path.getsize(full)))
    out.sort()
    return out


def build_package(folder: str, config_path: Optional[str], extra_files: Optional[Dict[str, bytes]] = None) -> Package:
    """The folder's package, or ConfigError when it is over 32 MB (naming
    the largest files). ``extra_files`` (``{path in the package: bytes}``)
    are added to it: what deploy generated for the replicas (the Python
    modules of a gRPC API's .proto, under a dot-folder no project file can
    occupy); they replace a project file of the same path."""
    folder = os.path.abspath(folder)
    extra = {os.path.normpath(rel): data for rel, data in (extra_files or {}).items()}
    files = [(rel, size) for rel, size in list_files(folder, config_path) if rel not in extra]
    files = sorted(files + [(rel, len(data)) for rel, data in extra.items()])
    total = sum(size for _, size in files)
    if total > MAX_PACKAGE_BYTES:
        largest = sorted(files, key=lambda f: -f[1])[:5]
        names = ", ".join(f"{rel} ({size / 2**20:.1f} MiB)" for rel, size in largest)
        raise ConfigError(
            f"the project folder is {total / 2**20:.1f} MiB, over the {MAX_PACKAGE_BYTES // 2**20} MiB limit; "
            f"largest files: {names}. Exclude what replicas do not need with {IGNORE_FILE}")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel, _ in files:
            full = os.path.join(folder, rel)
            info = tarfile.TarInfo(rel)
            if rel in extra:
                data, executable = extra[rel], False
            else:
                with open(full, "rb") as f:
                    data = f.read()
                executable = os.access(full, os.X_OK)
            info.size = len(data)
            info.mode = 0o755 if executable else 0o644
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    return Package(data=data, digest=hashlib.sha256(data).hexdigest(), files=[rel for rel, _ in files], size=total)


def cache_dir() -> str:
    """Where a node keeps unpacked packages: ``SERVAL_CACHE_DIR`` (set by the
    node agent for its replicas), else a per-user temp directory."""
    return os.environ.get("SERVAL_CACHE_DIR") or os.path.join(tempfile.gettempdir(), f"serval-cache-{os.getuid()}")


def ensure_unpacked(digest: str, fetch: Callable[[str], bytes], base: Optional[str] = None) -> str:
    """The directory holding package ``digest`` unpacked; fetches and
    unpacks it (checking the digest, and within ``UNPACK_LIMITS``: plain
    files and folders only) when this node has none yet."""
    base = os.path.join(base or cache_dir(), "packages")
    target = os.path.join(base, digest)
    if os.path.isdir(target):
        return target
    sweep(base)

    def make(partial: str) -> None:
        data = fetch(digest)
        got = hashlib.sha256(data).hexdigest()
        if got != digest:
            raise RuntimeError(f"package {digest}: fetched bytes have digest {got}")
        try:
            extract(data, partial, UNPACK_LIMITS, zip_allowed=False)
        except FetchError as e:
            raise RuntimeError(f"package {digest}: {e}") from None

    return build_once(target, make)


def ensure_requirements(project_dir: str, pip_file: str, base: Optional[str] = None) -> Optional[str]:
    """Installs the API's ``requirements.txt`` (``dependencies.pip``) into a
    directory of its own, shared by every API on this node whose file has
    the same content, and returns it (to put on sys.path); None when the
    project has no such file. pip runs in the project folder, so relative
    paths in the file (local wheels, source folders) work."""
    import subprocess
    import sys

    path = os.path.join(project_dir, pip_file)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        content = f.read()
    if not any(line.strip() and not line.strip().startswith(b"#") for line in content.splitlines()):
        return None
    key = hashlib.sha256(content + b"\0" + sys.version.encode()).hexdigest()
    base = os.path.join(base or cache_dir(), "pydeps")
    target = os.path.join(base, key)
    if os.path.isdir(target):
        return target
    sweep(base)

    def make(partial: str) -> None:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input",
             "--target", partial, "-r", path],
            cwd=project_dir, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pip install -r {pip_file} failed:\n{(proc.stderr or proc.stdout).strip()}")

    return build_once(target, make)
