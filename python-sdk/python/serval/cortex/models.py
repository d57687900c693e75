"""Cortex 0.35's ``handler.multi_model_reloading`` for python handlers: the
``model_client`` (also given as ``python_client``, its earlier name) a
Handler gets, whose ``get_model(model_name, model_version)`` returns what
the Handler's ``load_model(model_path)`` made of that model's directory.

Models live in directories the replicas read where they are (an absolute
path on the nodes, or a directory of the project): ``path`` is one model,
``paths`` names several, ``dir`` holds one model per subdirectory (read at
each call, so a model added there is served at once). A model's versions
are its subdirectories named by integers; "latest" (or no version) is the
highest at the time of the call, so a version directory added while
serving is loaded by the next ``get_model`` of the latest version. A model
with no version directories is version 1.

Loaded models are kept in the replica's model cache
(``serval.multiplex.ModelCache``, the one behind ``@serve.multiplexed``):
at most ``cache_size`` (model, version) pairs, least recently used out,
reported to routers by model name, so a request naming its model with
``?model=NAME`` (or the ``serve_multiplexed_model_id`` header) goes to a
replica that has it loaded. Without ``cache_size`` every model loaded
stays loaded (as Cortex, which then loaded them all at start; Serval loads
each at its first use).
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Dict, Optional

from ..multiplex import ModelCache

#: The model name of ``multi_model_reloading.path`` (a single model).
SINGLE_MODEL_NAME = "_cortex_default"
#: A cache with no ``cache_size`` keeps every model; this bounds it anyway.
UNBOUNDED_CACHE = 1 << 20
_VERSION = re.compile(r"[0-9]{1,18}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ModelNotFound(LookupError):
    """The named model or version does not exist: the request gets 404."""


class PythonClient:
    """``model_client`` (or ``python_client``): ``get_model(model_name=None, model_version="latest")``."""

    def __init__(self, spec: dict, project: str, load_model: Callable[[str], Any]):
        self._load_model = load_model
        self._dir: Optional[str] = None
        self._paths: Dict[str, str] = {}
        if spec.get("path"):
            self._paths[SINGLE_MODEL_NAME] = os.path.join(project, spec["path"])
        elif spec.get("dir"):
            self._dir = os.path.join(project, spec["dir"])
        else:
            self._paths = {p["name"]: os.path.join(project, p["path"]) for p in spec.get("paths") or ()}
        self.cache = ModelCache(spec.get("cache_size") or UNBOUNDED_CACHE)

    def _root(self, model_name: Optional[str]) -> tuple:
        if model_name is None or model_name == "":
            if len(self._paths) == 1 and self._dir is None:
                return next(iter(self._paths.items()))
            raise ModelNotFound("model_name is required: this API serves several models")
        if not isinstance(model_name, str):
            raise ModelNotFound(f"model_name must be a str, got {type(model_name).__name__}")
        if self._dir is not None:
            # A name from the request picks a subdirectory: no '..', no '/'.
            root = os.path.join(self._dir, model_name)
            if _NAME.fullmatch(model_name) and os.path.isdir(root):
                return model_name, root
        elif model_name in self._paths:
            return model_name, self._paths[model_name]
        elif SINGLE_MODEL_NAME in self._paths:
            raise ModelNotFound(f"model {model_name!r}: this API serves one model (multi_model_reloading.path), "
                                "got with get_model() and no name")
        raise ModelNotFound(f"model {model_name!r} is not served by this API")

    def _version(self, name: str, root: str, model_version: Any) -> tuple:
        try:
            versions = sorted(int(e.name) for e in os.scandir(root) if e.is_dir() and _VERSION.fullmatch(e.name))
        except OSError as e:
            raise ModelNotFound(f"model {name!r}: its directory cannot be read: {e.strerror}") from None
        if model_version is None or str(model_version) in ("", "latest"):
            if not versions:
                return 1, root
            return versions[-1], os.path.join(root, str(versions[-1]))
        wanted = str(model_version)
        if not _VERSION.fullmatch(wanted):
            raise ModelNotFound(f"model {name!r}: version must be an integer or 'latest', got {wanted!r}")
        if not versions and int(wanted) == 1:
            return 1, root
        if int(wanted) not in versions:
            raise ModelNotFound(f"model {name!r} has no version {wanted}")
        return int(wanted), os.path.join(root, str(int(wanted)))

    def get_model(self, model_name: Optional[str] = None, model_version: Any = "latest") -> Any:
        name, root = self._root(model_name)
        version, path = self._version(name, root, model_version)
        report = "" if name == SINGLE_MODEL_NAME else name
        return self.cache.get_sync((name, version), lambda: self._load(name, path), report_id=report)

    def _load(self, name: str, path: str) -> Any:
        """What the cache keeps of model ``name``'s version at ``path`` (the
        TensorFlow handler's client loads by name: serval.cortex.tensorflow)."""
        return self._load_model(path)
