"""Ray Serve 1.x's config objects: ``serve.BackendConfig``,
``serve.HTTPOptions`` and ``serve.DeploymentMode``.

Both classes validate on construction and on every assignment, as Ray's
(pydantic) ones did: a value of the wrong type raises ``ConfigTypeError``,
which is a TypeError (Ray 1.0/1.1) and a ValueError (pydantic's
ValidationError, Ray 1.2+) at once; a bad value raises ValueError naming the
field. Each object remembers which fields were given, so
``update_backend_config`` changes only those and ``serve.start`` passes on
only the HTTP options the caller set. Both are also read-only mappings
(``config["num_replicas"]``, ``dict(config)``), as Serval's dicts were.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from typing import Any, Dict, Iterator

from serval import _native
from serval._durations import parse_duration

__all__ = ["BackendConfig", "HTTPOptions", "DeploymentMode", "ConfigTypeError"]


class ConfigTypeError(TypeError, ValueError):
    """A config field got a value of the wrong type."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_at_least(field: str, value: Any, minimum: int, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if not _is_int(value):
        raise ConfigTypeError(f"{field} must be an integer, not {value!r}")
    if value < minimum:
        raise ValueError(f"{field} must be >= {minimum}, not {value}")
    return value


def _number_at_least(field: str, value: Any, minimum: float, strict: bool = False) -> float:
    if not _is_number(value):
        raise ConfigTypeError(f"{field} must be a number, not {value!r}")
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"{field} must be {'>' if strict else '>='} {minimum}, not {value}")
    return float(value)


# -- autoscaling (Cortex's knobs; a Serval addition) -------------------------

_AUTOSCALING_COUNTS = {"min_replicas", "max_replicas"}
_AUTOSCALING_NUMBERS = {
    "target_replica_concurrency", "max_upscale_factor", "max_downscale_factor", "upscale_tolerance",
    "downscale_tolerance",
}
#: These take seconds or "30s"/"5m"/"1h".
_AUTOSCALING_DURATIONS = {"window", "upscale_stabilization_period", "downscale_stabilization_period"}


def autoscaling_payload(autoscaling: Any) -> Dict[str, Any]:
    """The autoscaling dict with durations in seconds; ValueError naming the knob."""
    if not isinstance(autoscaling, dict):
        raise ValueError(f"autoscaling must be a dict, not {type(autoscaling).__name__}")
    known = _AUTOSCALING_COUNTS | _AUTOSCALING_NUMBERS | _AUTOSCALING_DURATIONS
    unknown = set(autoscaling) - known
    if unknown:
        raise ValueError(f"unknown autoscaling field(s) {sorted(unknown)}; known: {sorted(known)}")
    out = {}
    for key, value in autoscaling.items():
        if key in _AUTOSCALING_COUNTS:
            if not _is_int(value) or value < 0:
                raise ValueError(f"autoscaling.{key} must be a non-negative int, not {value!r}")
            out[key] = value
        elif key in _AUTOSCALING_DURATIONS:
            try:
                out[key] = parse_duration(value)
            except ValueError:
                raise ValueError(
                    f"autoscaling.{key} must be seconds or a duration like '30s', '5m', not {value!r}") from None
        else:
            if not _is_number(value):
                raise ValueError(f"autoscaling.{key} must be a number, not {value!r}")
            out[key] = float(value)
    return out


def _json_value(field: str, value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{field} must be JSON-serialisable: {e}") from None
    return value


def _bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigTypeError(f"{field} must be True or False, not {value!r}")
    return value


def _rollout_bound(field: str, value: Any) -> Any:
    # A count or a percentage ("25%"), as Kubernetes writes them.
    if value is None:
        return None
    if not (_is_int(value) or isinstance(value, str)):
        raise ConfigTypeError(f"{field} must be a count or a percentage such as '25%', not {value!r}")
    return str(value)


class _Validated(Mapping):
    """Fields with defaults and validators; assignment validates; remembers
    which fields were set."""

    #: name -> (default, validator(label, value) -> stored value)
    _FIELDS: Dict[str, Any] = {}
    #: How errors name a field.
    _LABEL = "{}"

    def __init__(self, **fields: Any) -> None:
        object.__setattr__(self, "_values", {})
        object.__setattr__(self, "_given", [])
        unknown = sorted(set(fields) - set(self._FIELDS))
        if unknown:
            raise ValueError(f"unknown {type(self).__name__} field(s) {unknown}; known: {list(self._FIELDS)}")
        for name, value in fields.items():
            setattr(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._FIELDS:
            raise ValueError(f"{type(self).__name__} has no field {name!r}; fields: {list(self._FIELDS)}")
        self._values[name] = self._FIELDS[name][1](self._LABEL.format(name), value)
        if name not in self._given:
            self._given.append(name)

    def __getattr__(self, name: str) -> Any:
        # Called only for names not found the usual way: the fields.
        fields = type(self)._FIELDS
        if name in fields:
            values = object.__getattribute__(self, "_values")
            return values[name] if name in values else self._default(name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def _default(self, name: str) -> Any:
        return self._FIELDS[name][0]

    def given(self) -> Dict[str, Any]:
        """The fields set by the caller, with their (validated) values."""
        return {name: self._values[name] for name in self._given}

    # Mapping: read like the dicts Serval returned before these classes.
    def __getitem__(self, key: str) -> Any:
        if key not in self._FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._FIELDS)

    def __len__(self) -> int:
        return len(self._FIELDS)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.items())})"


class BackendConfig(_Validated):
    """A backend's config (Ray Serve 1.x ``serve.BackendConfig``), passed to
    ``create_backend(config=...)`` and ``update_backend_config``, returned by
    ``list_backends()``. ``autoscaling``, ``max_surge`` and
    ``max_unavailable`` are Serval additions. ``max_concurrent_queries``
    left unset is chosen from the backend when it is created (Ray 1.x: 2 x
    ``max_batch_size`` with batching, 100 for an async backend, else 8);
    read from a config that does not know its backend, it is 2 x
    ``max_batch_size`` or 8."""

    _LABEL = "backend config field {}"
    _FIELDS = {
        "num_replicas": (1, lambda f, v: _int_at_least(f, v, 0)),
        "max_batch_size": (None, lambda f, v: _int_at_least(f, v, 1, optional=True)),
        "batch_wait_timeout": (0.0, lambda f, v: _number_at_least(f, v, 0)),
        "max_concurrent_queries": (None, lambda f, v: _int_at_least(f, v, 1, optional=True)),
        "user_config": (None, _json_value),
        "experimental_graceful_shutdown_wait_loop_s": (2.0, lambda f, v: _number_at_least(f, v, 0, strict=True)),
        "experimental_graceful_shutdown_timeout_s": (_native.DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S,
                                                     lambda f, v: _number_at_least(f, v, 0)),
        "autoscaling": (None, lambda f, v: None if v is None else autoscaling_payload(v)),
        "max_surge": (None, _rollout_bound),
        "max_unavailable": (None, _rollout_bound),
        "retry_idempotent": (True, _bool),
    }

    #: Fields Serval takes but does not store: a stopping replica waits for
    #: its requests in flight to finish instead of polling for them (see
    #: README, "Ray Serve 1.x compatibility").
    NOT_STORED = ("experimental_graceful_shutdown_wait_loop_s",)

    def _default(self, name: str) -> Any:
        if name == "max_concurrent_queries":
            size = self._values.get("max_batch_size")
            return 2 * size if size else 8
        return super()._default(name)

    @classmethod
    def from_stored(cls, stored: Mapping) -> "BackendConfig":
        """A config as the cluster holds it: every field set, plus the
        read-only ``num_cpus``/``num_gpus`` of its replicas."""
        config = cls(**{k: v for k, v in stored.items() if k in cls._FIELDS and v is not None})
        object.__setattr__(config, "_resources", {k: stored[k] for k in ("num_cpus", "num_gpus") if k in stored})
        return config

    def __getattr__(self, name: str) -> Any:
        resources = self.__dict__.get("_resources") or {}
        if name in resources:
            return resources[name]
        return super().__getattr__(name)

    def __getitem__(self, key: str) -> Any:
        resources = self.__dict__.get("_resources") or {}
        if key in resources:
            return resources[key]
        return super().__getitem__(key)

    def __iter__(self) -> Iterator[str]:
        yield from self._FIELDS
        yield from self.__dict__.get("_resources") or {}

    def __len__(self) -> int:
        return len(self._FIELDS) + len(self.__dict__.get("_resources") or {})


class DeploymentMode(str, enum.Enum):
    """Where HTTP proxies run (``HTTPOptions.location``)."""

    NoServer = "NoServer"
    HeadOnly = "HeadOnly"
    EveryNode = "EveryNode"


def _location(field: str, value: Any) -> DeploymentMode:
    if value is None:
        return DeploymentMode.NoServer
    try:
        return DeploymentMode(value)
    except ValueError:
        raise ValueError(f"{field} must be HeadOnly, EveryNode, NoServer or None, not {value!r}") from None


def _host(field: str, value: Any) -> Any:
    if value is not None and not isinstance(value, str):
        raise ConfigTypeError(f"{field} must be a host name or address, not {value!r}")
    return value


def _middlewares(field: str, value: Any) -> list:
    if not isinstance(value, (list, tuple)):
        raise ConfigTypeError(f"{field} must be a list of starlette Middleware, not {value!r}")
    return list(value)


class HTTPOptions(_Validated):
    """``serve.start(http_options=HTTPOptions(...))`` (or the same as a
    dict). ``host=None`` or ``location=None`` means no HTTP proxy
    (``NoServer``). ``max_body_bytes`` is a Serval addition."""

    _LABEL = "http_options.{}"
    _FIELDS = {
        "host": ("127.0.0.1", _host),
        "port": (8000, lambda f, v: _int_at_least(f, v, 0)),
        "middlewares": ([], _middlewares),
        "location": (DeploymentMode.HeadOnly, _location),
        "max_body_bytes": (None, lambda f, v: _int_at_least(f, v, 1, optional=True)),
    }

    def __getattr__(self, name: str) -> Any:
        if name == "location" and "host" in self.__dict__["_values"] and self.__dict__["_values"]["host"] is None:
            return DeploymentMode.NoServer
        return super().__getattr__(name)

    def given(self) -> Dict[str, Any]:
        given = super().given()
        if given.get("host", "") is None:
            given.pop("host")
            given["location"] = DeploymentMode.NoServer
        if "location" in given:
            given["location"] = given["location"].value
        return given
