"""Reads and validates a project's ``serve.yaml`` (or ``cortex.yaml``).

``load_config(folder)`` returns the config file's path and the list of APIs,
each a plain dict with every default filled in, or raises ``ConfigError``
naming the API and the field (``api "iris": handler.path: ...``). Every API
is checked before any is returned, so a deploy of a folder with one bad API
deploys nothing. The accepted keys and defaults are Cortex 0.35's (see
CORTEX.md); keys that only meant something on AWS (container images,
``dependencies.conda``, ``networking.api_gateway``, ...) are accepted with one
warning and ignored.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import urlparse

from .._durations import parse_duration as _duration

CONFIG_NAMES = ("serve.yaml", "cortex.yaml")

#: Cortex API names: lowercase letters, digits and dashes, starting with a letter.
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

KINDS = ("RealtimeAPI", "BatchAPI", "TaskAPI", "AsyncAPI", "TrafficSplitter")
#: Kinds this version deploys; the others are refused naming the field.
DEPLOYABLE_KINDS = KINDS
HANDLER_TYPES = ("python", "onnx", "tensorflow")
DEPLOYABLE_HANDLER_TYPES = ("python", "onnx", "tensorflow")
LOG_LEVELS = ("debug", "info", "warning", "error")

#: Keys accepted for compatibility and ignored (they configured AWS images).
IGNORED_HANDLER_KEYS = ("image", "tensorflow_serving_image", "shm_size")
IGNORED_NETWORKING_KEYS = ("api_gateway",)


class ConfigError(ValueError):
    """A config file that cannot be deployed; the message names the field."""


def _cpu(value: Any) -> float:
    """CPUs from ``200m``, ``1``, ``0.5`` (Kubernetes quantities)."""
    if isinstance(value, bool):
        raise ValueError("must be a CPU quantity such as 200m, 1 or 0.5")
    if isinstance(value, (int, float)):
        cpus = float(value)
    elif isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?m?", value.strip()):
        v = value.strip()
        cpus = float(v[:-1]) / 1000.0 if v.endswith("m") else float(v)
    else:
        raise ValueError(f"must be a CPU quantity such as 200m, 1 or 0.5, got {value!r}")
    if cpus < 0:
        raise ValueError("must not be negative")
    return cpus


_MEM_UNITS = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
              "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _mem(value: Any) -> int:
    """Bytes from ``1G``, ``512Mi``, ``2Gi`` or a number of bytes."""
    if isinstance(value, bool):
        raise ValueError("must be a memory quantity such as 1G or 512Mi")
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKMGT]i?)?", str(value).strip())
        if not m or (m.group(2) or "") not in _MEM_UNITS:
            raise ValueError(f"must be a memory quantity such as 1G or 512Mi, got {value!r}")
        n = int(float(m.group(1)) * _MEM_UNITS[m.group(2) or ""])
    if n <= 0:
        raise ValueError("must be positive")
    return n


def _int(minimum: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {value!r}")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        return value
    return check


def _float(minimum: float, maximum: Optional[float] = None) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, got {value!r}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            raise ValueError(f"must be {bound}, got {value}")
        return float(value)
    return check


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, got {value!r}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _one_of(choices) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return value
    return check


def _surge(value: Any) -> Any:
    """An integer or a percentage string such as ``25%``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and re.fullmatch(r"\d+%", value.strip()):
        return value.strip()
    raise ValueError(f"must be an integer or a percentage such as 25%, got {value!r}")


class _Checker:
    """Walks one API's dict, collecting the normalised result."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, message: str):
        raise ConfigError(f"{self.where}: {field}: {message}")

    def section(self, api: dict, key: str, allowed, ignored=()) -> dict:
        value = api.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(key, f"must be a mapping, got {type(value).__name__}")
        for k in value:
            if k in ignored:
                warnings.warn(f"{self.where}: {key}.{k} has no meaning in Serval and is ignored", stacklevel=4)
            elif k not in allowed:
                self.fail(f"{key}.{k}", f"unknown key (expected one of: {', '.join(allowed)})")
        return value

    def mapping(self, section: dict, prefix: str, key: str) -> dict:
        """An optional mapping field, ``{}`` when absent."""
        value = section.get(key) or {}
        if not isinstance(value, dict):
            self.fail(f"{prefix}{key}", f"must be a mapping, got {type(value).__name__}")
        return value

    def field(self, section: dict, prefix: str, key: str, check, default=None, required=False):
        if key not in section or section[key] is None:
            if required:
                self.fail(f"{prefix}{key}", "required field is missing")
            return default
        try:
            return check(section[key])
        except ValueError as e:
            self.fail(f"{prefix}{key}", str(e))


def _file_in_project(folder: str, checker: _Checker, field: str, rel: str, want_dir: bool = False) -> str:
    norm = os.path.normpath(rel)
    if os.path.isabs(norm) or norm.startswith(".."):
        checker.fail(field, f"must be a path inside the project folder, got {rel!r}")
    full = os.path.join(folder, norm)
    if want_dir and not os.path.isdir(full):
        checker.fail(field, f"no such directory in the project folder: {rel}")
    if not want_dir and not os.path.isfile(full):
        checker.fail(field, f"no such file in the project folder: {rel}")
    return norm


#: Keys every deployable handler type takes.
_COMMON_HANDLER_KEYS = ("type", "path", "python_path", "env", "log_level", "dependencies", "server_side_batching",
                        "processes_per_replica", "threads_per_process")
HANDLER_KEYS = ("type", "path", "protobuf_path", "config", "python_path", "env", "log_level",
                "dependencies", "server_side_batching", "processes_per_replica", "threads_per_process",
                "multi_model_reloading")
#: ``handler.multi_model_reloading`` of a python handler (Cortex 0.35): one
#: of ``path``/``paths``/``dir``, and the caches' sizes.
MULTI_MODEL_KEYS = ("path", "paths", "dir", "cache_size", "disk_cache_size")
#: The most models ``paths`` may list.
MAX_MODEL_PATHS = 1000
#: An exported model (seed 002): the runtime runs it, an optional request
#: handler (``path``) defines pre_inference/post_inference, given ``metadata``.
ONNX_HANDLER_KEYS = _COMMON_HANDLER_KEYS + ("model_path", "metadata", "runtime", "model_sha256", "model_max_size",
                                            "model_download_timeout")
#: The caps on a model fetched from a URL (and on the archive of a
#: SavedModel unpacked): bytes, and seconds for the whole download.
DEFAULT_MODEL_MAX_SIZE = 4 << 30
DEFAULT_MODEL_DOWNLOAD_TIMEOUT = 1800.0
#: Where an ONNX model runs: onnxruntime in the replica's Python, or
#: ``native``: tract inside the Rust replica, without Python on the path.
ONNX_RUNTIMES = ("onnxruntime", "native")
#: A TensorFlow SavedModel (seed 002) as an ONNX model, with the served
#: signature chosen by ``signature_key`` (``runtime`` is ONNX's alone).
TENSORFLOW_HANDLER_KEYS = tuple(k for k in ONNX_HANDLER_KEYS if k != "runtime") + ("signature_key", "models",
                                                                                     "config")
HANDLER_KEYS_BY_TYPE = {"python": HANDLER_KEYS, "onnx": ONNX_HANDLER_KEYS, "tensorflow": TENSORFLOW_HANDLER_KEYS}
REALTIME_KEYS = ("name", "kind", "handler", "compute", "autoscaling", "update_strategy", "networking")
#: A BatchAPI (seed 001) runs jobs on workers started per job: no
#: autoscaling or update strategy.
BATCH_KEYS = ("name", "kind", "handler", "compute", "networking", "jobs")
#: What a BatchAPI's job gateway accepts from clients: the sources jobs may
#: read (none by default: only item_list), and the size of one job.
JOBS_KEYS = ("allowed_sources", "max_batches", "max_bytes", "retention")
DEFAULT_JOB_MAX_BATCHES = 100_000
DEFAULT_JOB_MAX_BYTES = 1 << 30
#: How long an ended job's status and dead letters are kept; at most the
#: controller's cap (30 days: they stay on every head's disk).
DEFAULT_JOB_RETENTION = 24 * 3600.0
MAX_JOB_RETENTION = 30 * 24 * 3600.0
SPLITTER_KEYS = ("name", "kind", "networking", "apis")
#: An AsyncAPI takes a RealtimeAPI's keys (a python or tensorflow Handler
#: with handle_async), and ``jobs`` (``retention`` of its results, ``max_queued``).
ASYNC_KEYS = REALTIME_KEYS + ("jobs",)
#: A TaskAPI (Cortex 0.35): a ``definition`` (a Task class) run by a job's workers.
TASK_KEYS = ("name", "kind", "definition", "compute", "networking", "jobs")
DEFINITION_KEYS = ("path", "config", "python_path", "env", "log_level", "dependencies")
AUTOSCALING_KEYS = ("min_replicas", "max_replicas", "init_replicas", "max_replica_concurrency",
                    "target_replica_concurrency", "window", "downscale_stabilization_period",
                    "upscale_stabilization_period", "max_downscale_factor", "max_upscale_factor",
                    "downscale_tolerance", "upscale_tolerance")


def _handler_type(c: _Checker, api: dict) -> str:
    """``handler.type``, read first: it decides which keys the handler takes."""
    raw = api.get("handler")
    htype = c.field(raw, "handler.", "type", _one_of(HANDLER_TYPES), default="python") \
        if isinstance(raw, dict) else "python"
    if htype not in DEPLOYABLE_HANDLER_TYPES:
        c.fail("handler.type", f"{htype} handlers are not supported yet "
                               f"(deployable: {', '.join(DEPLOYABLE_HANDLER_TYPES)})")
    return htype


def _python_handler(c: _Checker, h: dict, folder: str) -> Dict[str, Any]:
    """A Handler class (seed 000): ``path`` required, ``config`` for it."""
    out: Dict[str, Any] = {}
    out["path"] = _file_in_project(folder, c, "handler.path", c.field(h, "handler.", "path", _str, required=True))
    config = c.mapping(h, "handler.", "config")
    out["config"] = config
    protobuf_path = c.field(h, "handler.", "protobuf_path", _str)
    if protobuf_path is not None:
        # A gRPC API: these two keys exist only then, so the specs (and
        # fingerprints) of HTTP APIs are what they were.
        out["protobuf_path"] = _file_in_project(folder, c, "handler.protobuf_path", protobuf_path)
        if not out["protobuf_path"].endswith(".proto"):
            c.fail("handler.protobuf_path", f"must be a .proto file, got {protobuf_path!r}")
        out["grpc"] = compile_proto(folder, out["protobuf_path"], c).spec
    if h.get("multi_model_reloading") is not None:
        # Only then: the specs (and fingerprints) of other APIs stay as they were.
        out["multi_model_reloading"] = _multi_model_reloading(c, h, folder)
    return out


def _model_dir(c: _Checker, folder: str, field: str, value: str) -> str:
    """A model directory: absolute on the nodes (read live, so new versions
    are picked up) or a directory of the project (shipped with it)."""
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", value):
        c.fail(field, f"models are read from a directory the nodes see (an absolute path, or one in the "
                      f"project folder), not fetched: got {value!r}")
    if os.path.isabs(value):
        return os.path.normpath(value)
    return _file_in_project(folder, c, field, value, want_dir=True)


def _multi_model_reloading(c: _Checker, h: dict, folder: str, key: str = "multi_model_reloading",
                           extra: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """Cortex 0.35's ``handler.multi_model_reloading``: ``path`` (one model),
    ``paths`` (``name``/``path`` pairs) or ``dir`` (one model per
    subdirectory), each model's versions its numbered subdirectories;
    ``cache_size`` models kept loaded per replica (LRU), ``disk_cache_size``
    (at least ``cache_size``) checked as Cortex did. The TensorFlow
    handler's ``handler.models`` (``key``) is the same with string fields
    ``extra`` (``signature_key``) for all models and each of ``paths``."""
    prefix = f"handler.{key}."
    m = c.section(h, key, MULTI_MODEL_KEYS + extra)
    given = [k for k in ("path", "paths", "dir") if m.get(k) is not None]
    if len(given) != 1:
        c.fail(f"handler.{key}", "exactly one of path, paths or dir is required"
               + (f" (got {', '.join(given)})" if given else ""))
    out: Dict[str, Any] = {}
    if "path" in given:
        out["path"] = _model_dir(c, folder, prefix + "path", c.field(m, prefix, "path", _str))
    elif "dir" in given:
        out["dir"] = _model_dir(c, folder, prefix + "dir", c.field(m, prefix, "dir", _str))
    else:
        paths = m["paths"]
        if not isinstance(paths, list) or not paths:
            c.fail(prefix + "paths", "must be a non-empty list of {name, path}")
        if len(paths) > MAX_MODEL_PATHS:
            c.fail(prefix + "paths", f"lists {len(paths)} models, at most {MAX_MODEL_PATHS} are allowed")
        out["paths"] = []
        for i, entry in enumerate(paths):
            field = f"{prefix}paths[{i}]"
            if not isinstance(entry, dict):
                c.fail(field, f"must be a mapping with name and path, got {type(entry).__name__}")
            for k in entry:
                if k not in ("name", "path") + extra:
                    c.fail(f"{field}.{k}", f"unknown key (expected one of: {', '.join(('name', 'path') + extra)})")
            name = c.field(entry, field + ".", "name", _str, required=True)
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name):
                c.fail(field + ".name", f"must be letters, digits, '.', '_' or '-' (at most 128), got {name!r}")
            if any(p["name"] == name for p in out["paths"]):
                c.fail(field + ".name", f"{name!r} is listed twice")
            path = _model_dir(c, folder, field + ".path", c.field(entry, field + ".", "path", _str, required=True))
            out["paths"].append({"name": name, "path": path,
                                 **{k: c.field(entry, field + ".", k, _str) for k in extra if k in entry}})
    for k in extra:
        if m.get(k) is not None:
            out[k] = c.field(m, prefix, k, _str)
    out["cache_size"] = c.field(m, prefix, "cache_size", _int(1))
    out["disk_cache_size"] = c.field(m, prefix, "disk_cache_size", _int(1))
    if (out["cache_size"] is None) != (out["disk_cache_size"] is None):
        c.fail(f"handler.{key}", "cache_size and disk_cache_size go together: set both or neither")
    if out["cache_size"] is not None and out["disk_cache_size"] < out["cache_size"]:
        c.fail(prefix + "disk_cache_size", f"must be at least cache_size ({out['cache_size']}), "
                                           f"got {out['disk_cache_size']}")
    return out


# -- gRPC (handler.protobuf_path) ----------------------------------------------

#: Where a gRPC API's generated modules go in the package (a dot-folder, so
#: no file of the project can collide with it): ``.serval/grpc/<api name>/``.
GRPC_PACKAGE_DIR = ".serval/grpc"
#: The serialized FileDescriptorSet (imports included) in that folder.
DESCRIPTOR_SET_NAME = "descriptor_set.pb"


@dataclass
class CompiledProto:
    """``handler.protobuf_path`` compiled by grpcio-tools' protoc.

    ``spec``: what the API's spec records (``handler.grpc``): ``service``
    (full name, ``package.Service``), ``methods`` (``name``,
    ``client_streaming``, ``server_streaming``, ``input_type``,
    ``output_type``), ``module`` (the generated module of the proto,
    ``<stem>_pb2``), ``proto_file`` (its name in the descriptor set) and
    ``descriptor_sha256``; validate_api adds ``package_dir``, where
    ``files`` go in the package. ``descriptor_set``: the serialized
    FileDescriptorSet (``--include_imports``). ``files``: the generated
    ``*_pb2.py`` of the proto and of the project protos it imports, by path
    relative to the generated folder (the descriptor set included)."""

    spec: Dict[str, Any]
    descriptor_set: bytes
    files: Dict[str, bytes] = field(default_factory=dict)


def _protoc(args: List[str], cwd: str) -> subprocess.CompletedProcess:
    """grpcio-tools' protoc in a subprocess (its messages on stderr; the
    bundled well-known protos are on its include path)."""
    return subprocess.run([sys.executable, "-m", "grpc_tools.protoc", *args], capture_output=True, text=True,
                          cwd=cwd)


def _protoc_message(proc: subprocess.CompletedProcess, *dirs: str) -> str:
    """protoc's error output, with file names relative to the project."""
    message = (proc.stderr or proc.stdout).strip() or f"protoc exited with status {proc.returncode}"
    for d in dirs:
        message = message.replace(d.rstrip(os.sep) + os.sep, "")
    return message


def compile_proto(folder: str, rel: str, checker: Optional[_Checker] = None) -> CompiledProto:
    """Compiles the project's ``rel`` (a .proto file) and checks it defines
    exactly one service; a ConfigError naming ``handler.protobuf_path``
    (through ``checker``) when it cannot be served."""
    c = checker or _Checker("handler")
    fieldname = "handler.protobuf_path"
    if importlib.util.find_spec("grpc_tools") is None:
        c.fail(fieldname, "compiling a .proto file needs grpcio-tools on the machine that deploys "
                          "(pip install grpcio-tools)")
    from google.protobuf import descriptor_pb2

    folder = os.path.abspath(folder)
    proto = os.path.join(folder, rel)
    proto_dir = os.path.dirname(proto)
    # The proto's own folder first (its module is then ``<stem>_pb2``, as in
    # Cortex), then the project folder, for imports of other project protos.
    includes = [f"-I{proto_dir}"] + ([f"-I{folder}"] if proto_dir != folder else [])
    with tempfile.TemporaryDirectory(prefix="serval-protoc-") as tmp:
        set_path = os.path.join(tmp, DESCRIPTOR_SET_NAME)
        proc = _protoc(includes + [f"--descriptor_set_out={set_path}", "--include_imports",
                              os.path.basename(proto)], proto_dir)
        if proc.returncode != 0:
            c.fail(fieldname, f"{rel} does not compile:\n{_protoc_message(proc, proto_dir, folder)}")
        with open(set_path, "rb") as f:
            descriptor_set = f.read()
        fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set)
        main_name = os.path.basename(rel)
        main = next((f for f in fds.file if f.name == main_name), fds.file[-1])
        services = list(main.service)
        if len(services) != 1:
            found = (f"defines {len(services)} services ({', '.join(s.name for s in services)})"
                     if services else "defines no service")
            c.fail(fieldname, f"{rel} {found}; a gRPC API serves exactly one service")
        service = services[0]
        prefix = f"{main.package}." if main.package else ""
        # The protos of the project (the main one and those it imports); the
        # well-known ones (google/protobuf/*) come with the protobuf runtime.
        own = [f.name for f in fds.file if any(os.path.isfile(os.path.join(d, f.name)) for d in
                                               dict.fromkeys((proto_dir, folder)))]
        if main.name not in own:
            own.append(main.name)
        out_dir = os.path.join(tmp, "py")
        os.makedirs(out_dir)
        proc = _protoc(includes + [f"--python_out={out_dir}", *own], proto_dir)
        if proc.returncode != 0:
            c.fail(fieldname, f"{rel}: generating its Python module failed:\n"
                              f"{_protoc_message(proc, proto_dir, folder)}")
        files: Dict[str, bytes] = {DESCRIPTOR_SET_NAME: descriptor_set}
        for root, _, names in os.walk(out_dir):
            for name in names:
                full = os.path.join(root, name)
                with open(full, "rb") as f:
                    files[os.path.relpath(full, out_dir).replace(os.sep, "/")] = f.read()

    def type_name(t: str) -> str:
        return t[1:] if t.startswith(".") else t

    spec = {
        "service": prefix + service.name,
        "methods": [{"name": m.name, "client_streaming": bool(m.client_streaming),
                     "server_streaming": bool(m.server_streaming), "input_type": type_name(m.input_type),
                     "output_type": type_name(m.output_type)} for m in service.method],
        "module": os.path.splitext(main.name)[0].replace("/", ".").replace("-", "_") + "_pb2",
        "proto_file": main.name,
        "descriptor_sha256": hashlib.sha256(descriptor_set).hexdigest(),
    }
    return CompiledProto(spec=spec, descriptor_set=descriptor_set, files=files)


def _model_path(c: _Checker, folder: str, value: str, want_dir: bool = False) -> str:
    """A file (``want_dir``: a directory) of the project, an absolute path on
    the nodes (checked by the replicas, which may see a filesystem this
    machine does not), or an http(s) URL (fetched once per node)."""
    if re.match(r"https?://", value, re.IGNORECASE):
        if not urlparse(value).netloc:
            c.fail("handler.model_path", f"not a valid URL: {value!r}")
        return value
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", value):
        c.fail("handler.model_path", f"must be a project file, an absolute path or an http(s) URL, got {value!r}")
    if os.path.isabs(value):
        return os.path.normpath(value)
    return _file_in_project(folder, c, "handler.model_path", value, want_dir=want_dir)


def _sha256(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise ValueError(f"must be a sha256 digest (64 hex digits), got {value!r}")
    return value.lower()


def _model_download(c: _Checker, h: dict, out: Dict[str, Any]) -> None:
    """The caps and the expected digest of a model at a URL."""
    out["model_sha256"] = c.field(h, "handler.", "model_sha256", _sha256)
    if out["model_sha256"] and not re.match(r"https?://", out["model_path"], re.I):
        c.fail("handler.model_sha256", "checks a model fetched from an http(s) model_path; this model_path "
                                       "is a file")
    out["model_max_size"] = c.field(h, "handler.", "model_max_size", _mem, default=DEFAULT_MODEL_MAX_SIZE)
    out["model_download_timeout"] = c.field(h, "handler.", "model_download_timeout", _duration,
                                            default=DEFAULT_MODEL_DOWNLOAD_TIMEOUT)
    if out["model_download_timeout"] <= 0:
        c.fail("handler.model_download_timeout", "must be above 0")


def _onnx_handler(c: _Checker, h: dict, folder: str) -> Dict[str, Any]:
    """An ONNX model (seed 002): ``model_path`` required, the request
    handler ``path`` optional, ``metadata`` passed to its functions."""
    out: Dict[str, Any] = {}
    out["model_path"] = _model_path(c, folder, c.field(h, "handler.", "model_path", _str, required=True))
    _model_download(c, h, out)
    path = c.field(h, "handler.", "path", _str)
    out["path"] = _file_in_project(folder, c, "handler.path", path) if path else None
    metadata = c.mapping(h, "handler.", "metadata")
    out["metadata"] = metadata
    out["runtime"] = c.field(h, "handler.", "runtime", _one_of(ONNX_RUNTIMES), default="onnxruntime")
    if out["runtime"] == "native" and out["path"]:
        c.fail("handler.runtime", "native runs the model without Python, so it takes no request handler "
                                  "(remove handler.path, or use runtime: onnxruntime)")
    return out


def _tensorflow_models_handler(c: _Checker, h: dict, folder: str) -> Dict[str, Any]:
    """Cortex 0.35's TensorFlow handler: ``path`` (a Handler built as
    ``Handler(tensorflow_client, config)``), ``config``, and ``models``:
    ``multi_model_reloading``'s keys and model folders (holding a
    SavedModel, or numbered version folders of them), with
    ``signature_key`` for all models and for each of ``paths``."""
    for key in ("model_path", "metadata", "signature_key", "model_sha256"):
        if key in h:
            c.fail(f"handler.{key}", "belongs to the request-handler shape (handler.model_path); with "
                                     "handler.models, give signature_key in handler.models")
    out: Dict[str, Any] = {"path": _file_in_project(folder, c, "handler.path",
                                                    c.field(h, "handler.", "path", _str, required=True))}
    out["config"] = c.mapping(h, "handler.", "config")
    out["models"] = _multi_model_reloading(c, h, folder, "models", ("signature_key",))
    return out


def _tensorflow_handler(c: _Checker, h: dict, folder: str) -> Dict[str, Any]:
    """A TensorFlow SavedModel (seed 002): as an ONNX model, but
    ``model_path`` is the SavedModel's directory (or a .zip/.tar.gz of it at
    a URL), and ``signature_key`` picks the signature served (checked by the
    replicas, which read the model)."""
    if "models" in h:
        return _tensorflow_models_handler(c, h, folder)
    if "config" in h:
        c.fail("handler.config", "is for a Handler(tensorflow_client, config), which needs handler.models; "
                                 "with handler.model_path, a request handler takes handler.metadata")
    out: Dict[str, Any] = {}
    out["model_path"] = _model_path(c, folder, c.field(h, "handler.", "model_path", _str, required=True),
                                    want_dir=True)
    in_project = not os.path.isabs(out["model_path"]) and not re.match(r"https?://", out["model_path"], re.I)
    if in_project and not any(os.path.isfile(os.path.join(folder, out["model_path"], f))
                              for f in ("saved_model.pb", "saved_model.pbtxt")):
        c.fail("handler.model_path", f"not a SavedModel directory (no saved_model.pb in it): {out['model_path']}")
    _model_download(c, h, out)
    path = c.field(h, "handler.", "path", _str)
    out["path"] = _file_in_project(folder, c, "handler.path", path) if path else None
    out["metadata"] = c.mapping(h, "handler.", "metadata")
    out["signature_key"] = c.field(h, "handler.", "signature_key", _str)
    return out


#: How each model handler type reads its own keys (python: _python_handler).
_MODEL_HANDLERS = {"onnx": _onnx_handler, "tensorflow": _tensorflow_handler}


def _handler(c: _Checker, api: dict, folder: str) -> dict:
    htype = _handler_type(c, api)
    h = c.section(api, "handler", HANDLER_KEYS_BY_TYPE[htype], IGNORED_HANDLER_KEYS)
    if not h:
        c.fail("handler", "required field is missing")
    out: Dict[str, Any] = {"type": htype}
    out.update(_MODEL_HANDLERS.get(htype, _python_handler)(c, h, folder))
    python_path = c.field(h, "handler.", "python_path", _str)
    out["python_path"] = _file_in_project(folder, c, "handler.python_path", python_path, want_dir=True) \
        if python_path else "."
    env = c.mapping(h, "handler.", "env")
    for k, v in env.items():
        if not isinstance(k, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            c.fail("handler.env", f"invalid variable name {k!r}")
        if isinstance(v, (dict, list)) or v is None:
            c.fail(f"handler.env.{k}", "must be a string, number or boolean")
    out["env"] = {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in env.items()}
    out["log_level"] = c.field(h, "handler.", "log_level", _one_of(LOG_LEVELS), default="info")
    deps = c.mapping(h, "handler.", "dependencies")
    for k in deps:
        if k not in ("pip", "conda", "shell"):
            c.fail(f"handler.dependencies.{k}", "unknown key (expected one of: pip, conda, shell)")
    for k in ("conda", "shell"):
        if k in deps:
            warnings.warn(f"{c.where}: handler.dependencies.{k} has no meaning in Serval and is ignored",
                          stacklevel=3)
    pip = c.field(deps, "handler.dependencies.", "pip", _str, default="requirements.txt")
    out["dependencies"] = {"pip": os.path.normpath(pip)}
    ssb = h.get("server_side_batching")
    if ssb is not None:
        if not isinstance(ssb, dict):
            c.fail("handler.server_side_batching", f"must be a mapping, got {type(ssb).__name__}")
        for k in ssb:
            if k not in ("max_batch_size", "batch_interval"):
                c.fail(f"handler.server_side_batching.{k}",
                       "unknown key (expected one of: max_batch_size, batch_interval)")
        out["server_side_batching"] = {
            "max_batch_size": c.field(ssb, "handler.server_side_batching.", "max_batch_size", _int(1),
                                      required=True),
            "batch_interval": c.field(ssb, "handler.server_side_batching.", "batch_interval", _duration,
                                      required=True),
        }
    else:
        out["server_side_batching"] = None
    if out["server_side_batching"] and "grpc" in out:
        c.fail("handler.server_side_batching", "gathers HTTP POST requests; a gRPC API "
                                               "(handler.protobuf_path) cannot use it")
    out["processes_per_replica"] = c.field(h, "handler.", "processes_per_replica", _int(1), default=1)
    out["threads_per_process"] = c.field(h, "handler.", "threads_per_process", _int(1), default=1)
    return out


def _compute(c: _Checker, api: dict) -> dict:
    comp = c.section(api, "compute", ("cpu", "gpu", "mem", "inf"))
    out = {
        "cpu": c.field(comp, "compute.", "cpu", _cpu, default=0.2),
        "gpu": c.field(comp, "compute.", "gpu", _int(0), default=0),
        "mem": c.field(comp, "compute.", "mem", _mem, default=None),
    }
    if c.field(comp, "compute.", "inf", _int(0), default=0):
        c.fail("compute.inf", "Inferentia chips are not available in Serval (use 0)")
    return out


def _autoscaling(c: _Checker, api: dict, handler: dict) -> dict:
    a = c.section(api, "autoscaling", AUTOSCALING_KEYS)
    p = "autoscaling."
    out = {
        "min_replicas": c.field(a, p, "min_replicas", _int(0), default=1),
        "max_replicas": c.field(a, p, "max_replicas", _int(1), default=100),
        "max_replica_concurrency": c.field(a, p, "max_replica_concurrency", _int(1), default=1024),
        "target_replica_concurrency": c.field(
            a, p, "target_replica_concurrency", _float(0.001),
            default=float(handler["processes_per_replica"] * handler["threads_per_process"])),
        "window": c.field(a, p, "window", _duration, default=60.0),
        "downscale_stabilization_period": c.field(a, p, "downscale_stabilization_period", _duration,
                                                  default=300.0),
        "upscale_stabilization_period": c.field(a, p, "upscale_stabilization_period", _duration, default=60.0),
        "max_downscale_factor": c.field(a, p, "max_downscale_factor", _float(0.0, 1.0), default=0.75),
        "max_upscale_factor": c.field(a, p, "max_upscale_factor", _float(1.0), default=1.5),
        "downscale_tolerance": c.field(a, p, "downscale_tolerance", _float(0.0), default=0.05),
        "upscale_tolerance": c.field(a, p, "upscale_tolerance", _float(0.0), default=0.05),
    }
    out["init_replicas"] = c.field(a, p, "init_replicas", _int(0), default=out["min_replicas"])
    if out["min_replicas"] > out["max_replicas"]:
        c.fail("autoscaling.min_replicas", f"must not exceed max_replicas ({out['max_replicas']})")
    if not out["min_replicas"] <= out["init_replicas"] <= out["max_replicas"]:
        c.fail("autoscaling.init_replicas", "must be between min_replicas and max_replicas")
    return out


def _update_strategy(c: _Checker, api: dict) -> dict:
    u = c.section(api, "update_strategy", ("max_surge", "max_unavailable"))
    out = {
        "max_surge": c.field(u, "update_strategy.", "max_surge", _surge, default="25%"),
        "max_unavailable": c.field(u, "update_strategy.", "max_unavailable", _surge, default="25%"),
    }
    if out["max_surge"] in (0, "0%") and out["max_unavailable"] in (0, "0%"):
        c.fail("update_strategy", "max_surge and max_unavailable cannot both be 0")
    return out


def _endpoint(c: _Checker, api: dict, name: str) -> str:
    n = c.section(api, "networking", ("endpoint",), IGNORED_NETWORKING_KEYS)
    endpoint = c.field(n, "networking.", "endpoint", _str, default=name)
    endpoint = "/" + endpoint.strip("/")
    if not re.fullmatch(r"/[A-Za-z0-9._~\-/]*", endpoint):
        c.fail("networking.endpoint", f"must be a URL path, got {endpoint!r}")
    return endpoint


def _splitter(c: _Checker, api: dict) -> List[dict]:
    apis = api.get("apis")
    if not isinstance(apis, list) or not apis:
        c.fail("apis", "must be a non-empty list of {name, weight[, shadow]}")
    out, total, shadows = [], 0, 0
    for i, entry in enumerate(apis):
        f = f"apis[{i}]"
        if not isinstance(entry, dict):
            c.fail(f, "must be a mapping with name and weight")
        for k in entry:
            if k not in ("name", "weight", "shadow"):
                c.fail(f"{f}.{k}", "unknown key (expected one of: name, weight, shadow)")
        name = c.field(entry, f + ".", "name", _str, required=True)
        weight = c.field(entry, f + ".", "weight", _int(0), required=True)
        if weight > 100:
            c.fail(f"{f}.weight", f"must be at most 100, got {weight}")
        shadow = c.field(entry, f + ".", "shadow", _bool, default=False)
        if shadow:
            shadows += 1
        else:
            total += weight
        out.append({"name": name, "weight": weight, "shadow": shadow})
    if shadows > 1:
        c.fail("apis", "at most one API may be a shadow")
    if total != 100:
        c.fail("apis", f"the weights of the non-shadow APIs must sum to 100, got {total}")
    names = [e["name"] for e in out]
    if len(set(names)) != len(names):
        c.fail("apis", "an API may appear only once")
    return out


def validate_api(raw: Any, index: int, folder: str) -> dict:
    """One API's normalised dict, or ConfigError naming it and the field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"api #{index + 1}: must be a mapping, got {type(raw).__name__}")
    name = raw.get("name")
    where = f'api "{name}"' if isinstance(name, str) and name else f"api #{index + 1}"
    c = _Checker(where)
    name = c.field(raw, "", "name", _str, required=True)
    if not NAME_RE.match(name):
        c.fail("name", "must be lowercase letters, digits and dashes, starting with a letter")
    kind = c.field(raw, "", "kind", _one_of(KINDS), required=True)
    if kind not in DEPLOYABLE_KINDS:
        c.fail("kind", f"{kind} is not supported yet (deployable kinds: {', '.join(DEPLOYABLE_KINDS)})")
    if kind == "TrafficSplitter":
        for k in raw:
            if k not in SPLITTER_KEYS:
                c.fail(k, f"unknown key for a TrafficSplitter (expected one of: {', '.join(SPLITTER_KEYS)})")
        return {"name": name, "kind": kind, "endpoint": _endpoint(c, raw, name), "apis": _splitter(c, raw)}
    if kind == "BatchAPI":
        return _batch_api(c, raw, name, folder)
    if kind == "TaskAPI":
        return _task_api(c, raw, name, folder)
    keys = ASYNC_KEYS if kind == "AsyncAPI" else REALTIME_KEYS
    for k in raw:
        if k not in keys:
            c.fail(k, f"unknown key for a {kind} (expected one of: {', '.join(keys)})")
    handler = _queued_handler(c, raw, folder, "an AsyncAPI", "handle_async") if kind == "AsyncAPI" \
        else _handler(c, raw, folder)
    if kind == "AsyncAPI":
        for key, why in (("grpc", "an AsyncAPI is not a gRPC API"),
                         ("server_side_batching", "an AsyncAPI runs one submission at a time")):
            if handler.get(key):
                c.fail("handler.protobuf_path" if key == "grpc" else f"handler.{key}", why)
    if "grpc" in handler:
        handler["grpc"]["package_dir"] = f"{GRPC_PACKAGE_DIR}/{name}"
    compute = _compute(c, raw)
    if handler.get("runtime") == "native" and compute["gpu"]:
        c.fail("handler.runtime", "native runs models on CPUs only; use runtime: onnxruntime for GPUs")
    return {
        "name": name,
        "kind": kind,
        "handler": handler,
        "compute": compute,
        "autoscaling": _autoscaling(c, raw, handler),
        "update_strategy": _update_strategy(c, raw),
        "endpoint": _endpoint(c, raw, name),
        **({"jobs": _async_jobs(c, raw)} if kind == "AsyncAPI" else {}),
    }


def _queued_handler(c: _Checker, raw: dict, folder: str, kind: str, method: str) -> dict:
    """The handler of an AsyncAPI or a BatchAPI: a Handler class defining
    ``method``, of type python, or tensorflow with ``handler.models`` (the
    models its ``tensorflow_client`` serves); an exported model without a
    Handler class cannot be one."""
    h = raw.get("handler")
    if isinstance(h, dict) and h.get("type") == "tensorflow" and "models" not in h:
        c.fail("handler.models", f"required: with handler.type tensorflow, {kind} runs a "
                                 f"Handler(tensorflow_client, config) with {method} on handler.models "
                                 f"(handler.model_path is a RealtimeAPI's)")
    handler = _handler(c, raw, folder)
    if handler["type"] not in ("python", "tensorflow"):
        c.fail("handler.type", f"{kind} runs a python or tensorflow Handler ({method}), "
                               f"not an exported {handler['type']} model")
    return handler


def _retention_only(c: _Checker, raw: dict) -> dict:
    """``jobs`` of an API that takes only ``jobs.retention`` (how long an
    ended job or submission is kept)."""
    j = c.section(raw, "jobs", ("retention",))
    return {"retention": c.field(j, "jobs.", "retention", _retention, default=DEFAULT_JOB_RETENTION)}


#: Submissions of an AsyncAPI queued or running, at most (``jobs.max_queued``).
DEFAULT_ASYNC_MAX_QUEUED = 1000


def _async_jobs(c: _Checker, raw: dict) -> dict:
    """An AsyncAPI's ``jobs``: how long results are kept, and how many
    submissions may wait (beyond it a POST gets 503)."""
    j = c.section(raw, "jobs", ("retention", "max_queued"))
    return {"retention": c.field(j, "jobs.", "retention", _retention, default=DEFAULT_JOB_RETENTION),
            "max_queued": c.field(j, "jobs.", "max_queued", _int(1), default=DEFAULT_ASYNC_MAX_QUEUED)}


class _DefinitionChecker(_Checker):
    """A TaskAPI's ``definition`` checked as a handler: errors name it."""

    def fail(self, field: str, message: str):
        super().fail("definition" + field[len("handler"):] if field.startswith("handler") else field, message)


def _task_api(c: _Checker, raw: dict, name: str, folder: str) -> dict:
    """A TaskAPI: ``definition.path`` names the file with the Task class; its
    other keys are a python handler's."""
    for k in raw:
        if k not in TASK_KEYS:
            c.fail(k, f"unknown key for a TaskAPI (expected one of: {', '.join(TASK_KEYS)})")
    d = c.section(raw, "definition", DEFINITION_KEYS, IGNORED_HANDLER_KEYS)
    if not d:
        c.fail("definition", "required field is missing")
    definition = _handler(_DefinitionChecker(c.where), {"handler": dict(d, type="python")}, folder)
    for key in ("type", "server_side_batching", "processes_per_replica", "threads_per_process"):
        definition.pop(key, None)
    return {"name": name, "kind": "TaskAPI", "definition": definition, "compute": _compute(c, raw),
            "endpoint": _endpoint(c, raw, name), "jobs": _retention_only(c, raw)}


def _batch_api(c: _Checker, raw: dict, name: str, folder: str) -> dict:
    """A BatchAPI: a python or tensorflow Handler with ``handle_batch`` run
    by a job's workers; the other handler keys are a RealtimeAPI's."""
    for k in raw:
        if k not in BATCH_KEYS:
            c.fail(k, f"unknown key for a BatchAPI (expected one of: {', '.join(BATCH_KEYS)})")
    handler = _queued_handler(c, raw, folder, "a BatchAPI", "handle_batch")
    for key, why in (("grpc", "a BatchAPI is not a gRPC API"),
                     ("server_side_batching", "a BatchAPI's batches are its jobs' batches")):
        if handler.get(key):
            c.fail("handler.protobuf_path" if key == "grpc" else f"handler.{key}", why)
    return {"name": name, "kind": "BatchAPI", "handler": handler, "compute": _compute(c, raw),
            "endpoint": _endpoint(c, raw, name), "jobs": _jobs(c, raw)}


def _source_prefix(value: Any) -> str:
    """One ``jobs.allowed_sources`` entry: an http(s) URL prefix whose host
    is complete (followed by ``/`` or ``:``), an absolute path, or a path in
    the project folder."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, got {value!r}")
    if re.match(r"https?://", value, re.I):
        if not re.match(r"https?://[^/:?#@\\]+[:/]", value, re.I):
            raise ValueError(f"a URL prefix must name its whole host, ending with / or :port "
                             f"(https://host/ or https://host:8443/), got {value!r}")
        if ".." in value.split("/"):
            raise ValueError(f"must not contain '..', got {value!r}")
        return value
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", value):
        raise ValueError(f"must be an http(s) URL prefix, an absolute path or a path in the project folder, "
                         f"got {value!r}")
    norm = os.path.normpath(value)
    if not os.path.isabs(norm) and (norm == ".." or norm.startswith("../")):
        raise ValueError(f"a relative path must stay inside the project folder, got {value!r}")
    return norm


def _jobs(c: _Checker, raw: dict) -> dict:
    j = c.section(raw, "jobs", JOBS_KEYS)
    sources = j.get("allowed_sources")
    if sources is None:
        sources = []
    if not isinstance(sources, list):
        c.fail("jobs.allowed_sources", f"must be a list of path or URL prefixes, got {type(sources).__name__}")
    prefixes = []
    for i, source in enumerate(sources):
        try:
            prefixes.append(_source_prefix(source))
        except ValueError as e:
            c.fail(f"jobs.allowed_sources[{i}]", str(e))
    return {"allowed_sources": prefixes,
            "max_batches": c.field(j, "jobs.", "max_batches", _int(1), default=DEFAULT_JOB_MAX_BATCHES),
            "max_bytes": c.field(j, "jobs.", "max_bytes", _mem, default=DEFAULT_JOB_MAX_BYTES),
            "retention": c.field(j, "jobs.", "retention", _retention, default=DEFAULT_JOB_RETENTION)}


def _retention(value: Any) -> float:
    seconds = _duration(value)
    if not 1.0 <= seconds <= MAX_JOB_RETENTION:
        raise ValueError(f"must be from 1s to {MAX_JOB_RETENTION / 3600:g}h (30 days), got {value!r}")
    return seconds


def find_config(folder: str) -> str:
    """``serve.yaml``, else ``cortex.yaml``, in ``folder``."""
    for name in CONFIG_NAMES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise ConfigError(f"{folder}: no {' or '.join(CONFIG_NAMES)} in the project folder")


def load_config(folder: str, config_path: Optional[str] = None) -> Tuple[str, List[dict]]:
    """The config file used and its validated APIs (see the module docs)."""
    import yaml

    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise ConfigError(f"{folder}: not a directory")
    path = os.path.abspath(config_path) if config_path else find_config(folder)
    fname = os.path.basename(path)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{fname}: not valid YAML: {e}") from None
    if raw is None:
        raise ConfigError(f"{fname}: the file is empty (expected a list of APIs)")
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        raise ConfigError(f"{fname}: expected a list of APIs, got {type(raw).__name__}")
    apis = []
    for i, item in enumerate(raw):
        try:
            apis.append(validate_api(item, i, folder))
        except ConfigError as e:
            raise ConfigError(f"{fname}: {e}") from None
    names = [a["name"] for a in apis]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{fname}: api \"{dup[0]}\": name: defined more than once")
    services = {}
    for a in apis:
        service = ((a.get("handler") or {}).get("grpc") or {}).get("service")
        if service in services:
            raise ConfigError(f'{fname}: api "{a["name"]}": handler.protobuf_path: the gRPC service {service} '
                              f'is also served by api "{services[service]}"')
        if service:
            services[service] = a["name"]
    endpoints = [a["endpoint"] for a in apis]
    dup = sorted({e for e in endpoints if endpoints.count(e) > 1})
    if dup:
        raise ConfigError(f"{fname}: networking.endpoint: {dup[0]} is used by more than one API")
    return path, apis


def read_dotenv(folder: str) -> Dict[str, str]:
    """``VARIABLE=value`` lines of the project's ``.env`` (comments and blank
    lines skipped, optional surrounding quotes removed)."""
    path = os.path.join(folder, ".env")
    out: Dict[str, str] = {}
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("export "):
                line = line[len("export "):].lstrip()
            key, sep, value = line.partition("=")
            key = key.strip()
            if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ConfigError(f".env line {n}: expected VARIABLE=value, got {line!r}")
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            out[key] = value
    return out
