"""Ray Serve 2.x deployments: ``@serve.deployment``, ``.options()`` and
``.bind()``.

A :class:`Deployment` is a class or function with its options; ``bind``
makes an :class:`Application` node: the deployment with the arguments its
constructor will get, which may hold other bound deployments (they arrive
in the replica as ``DeploymentHandle``s). ``serval.application`` turns such a
graph into backends and endpoints.

Options are checked when they are given (a bad one raises ValueError or
TypeError naming it) and compiled here to what the store holds: the
backend's config (``backend_config``) and the replica's own options
(``replica_options``: environment variables and health checks, which travel
with the code; see ``_host.load_code``).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional, Union

from serval.config import ConfigTypeError, _int_at_least, _is_int, _json_value, _number_at_least

__all__ = ["Deployment", "Application", "deployment", "DEFAULT_MAX_ONGOING_REQUESTS"]

#: Ray Serve 2.x defaults (since 2.32): the ones a deployment gets when it
#: sets nothing.
DEFAULT_MAX_ONGOING_REQUESTS = 5
DEFAULT_HEALTH_CHECK_PERIOD_S = 10.0
DEFAULT_HEALTH_CHECK_TIMEOUT_S = 30.0
DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S = 20.0
#: What ``num_replicas="auto"`` autoscales with, under any autoscaling_config given.
AUTO_AUTOSCALING = {"min_replicas": 1, "max_replicas": 100, "target_ongoing_requests": 2}
#: Ray's autoscaling_config defaults for fields left out.
_AUTOSCALING_DEFAULTS = {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 2.0,
                         "look_back_period_s": 30.0, "upscale_delay_s": 30.0, "downscale_delay_s": 600.0}
#: Ray's autoscaling fields Serval maps (Ray name -> Serval's autoscaler knob).
_AUTOSCALING_MAPPED = {
    "min_replicas": "min_replicas", "max_replicas": "max_replicas",
    "target_ongoing_requests": "target_replica_concurrency", "look_back_period_s": "window",
    "upscale_delay_s": "upscale_stabilization_period", "downscale_delay_s": "downscale_stabilization_period",
}
#: Accepted, checked and not used: Serval's autoscaler reads routers' load
#: every second and moves by its own factors (see README, "Ray Serve 2.x API").
_AUTOSCALING_IGNORED = {
    "metrics_interval_s", "smoothing_factor", "upscale_smoothing_factor", "downscale_smoothing_factor",
    "upscaling_factor", "downscaling_factor", "downscale_to_zero_delay_s", "aggregation_function",
}
_AUTOSCALING_ALIASES = {"target_num_ongoing_requests_per_replica": "target_ongoing_requests"}

_ACTOR_OPTIONS = {"num_cpus", "num_gpus", "runtime_env"}
_RUNTIME_ENV = {"env_vars"}

#: Every option of ``@serve.deployment`` / ``.options()`` (besides ``name``).
_OPTIONS = (
    "num_replicas", "max_ongoing_requests", "max_queued_requests", "ray_actor_options", "autoscaling_config",
    "user_config", "health_check_period_s", "health_check_timeout_s", "graceful_shutdown_wait_loop_s",
    "graceful_shutdown_timeout_s", "logging_config", "max_replicas_per_node", "placement_group_bundles",
    "placement_group_strategy", "version",
    # Serval's: False when the deployment's GET/HEAD handlers are not
    # idempotent (then a GET lost with its replica is not sent again).
    "retry_idempotent",
)
#: Options Serval cannot honour: giving one raises.
_UNSUPPORTED = {"max_replicas_per_node", "placement_group_bundles", "placement_group_strategy"}


def _check_name(what: str, name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"{what} must be a non-empty str, not {name!r}")
    if "#" in name:
        raise ValueError(f"{what} {name!r} must not contain '#' (Serval names a deployment's backend "
                         f"'<application>#<deployment>')")
    if len(name.encode()) > 120:
        raise ValueError(f"{what} {name!r} is longer than 120 bytes")
    return name


def _positive_number(field: str, value: Any) -> float:
    return _number_at_least(field, value, 0, strict=True)


def _autoscaling(value: Any) -> Dict[str, Any]:
    """Ray's autoscaling_config (a dict, or an object with the fields), checked."""
    if value is not None and not isinstance(value, dict):
        as_dict = getattr(value, "dict", None) or getattr(value, "model_dump", None)
        value = as_dict() if callable(as_dict) else None
    if not isinstance(value, dict):
        raise ConfigTypeError(f"autoscaling_config must be a dict, not {type(value).__name__}")
    out = {}
    for key, v in value.items():
        key = _AUTOSCALING_ALIASES.get(key, key)
        if key not in _AUTOSCALING_MAPPED and key not in _AUTOSCALING_IGNORED and key != "initial_replicas":
            known = sorted(set(_AUTOSCALING_MAPPED) | _AUTOSCALING_IGNORED | {"initial_replicas"})
            raise ValueError(f"autoscaling_config: unknown field {key!r}; known: {known}")
        field = f"autoscaling_config.{key}"
        if v is None and key in ("initial_replicas", "downscale_to_zero_delay_s", "aggregation_function"):
            continue
        if key in ("min_replicas", "max_replicas", "initial_replicas"):
            out[key] = _int_at_least(field, v, 1 if key == "max_replicas" else 0)
        elif key == "aggregation_function":
            out[key] = v
        elif key in ("target_ongoing_requests", "look_back_period_s", "metrics_interval_s"):
            out[key] = _positive_number(field, v)
        else:
            out[key] = _number_at_least(field, v, 0)
    merged = {**_AUTOSCALING_DEFAULTS, **out}
    if merged["min_replicas"] > merged["max_replicas"]:
        raise ValueError(f"autoscaling_config: min_replicas ({merged['min_replicas']}) must not exceed "
                         f"max_replicas ({merged['max_replicas']})")
    initial = out.get("initial_replicas")
    if initial is not None and not merged["min_replicas"] <= initial <= merged["max_replicas"]:
        raise ValueError(f"autoscaling_config: initial_replicas ({initial}) must be between min_replicas and "
                         f"max_replicas")
    return out


def _actor_options(value: Any) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigTypeError(f"ray_actor_options must be a dict, not {type(value).__name__}")
    unknown = sorted(set(value) - _ACTOR_OPTIONS)
    if unknown:
        raise ValueError(f"ray_actor_options: Serval does not support {unknown}; supported: "
                         f"{sorted(_ACTOR_OPTIONS)}")
    out = {}
    for key in ("num_cpus", "num_gpus"):
        if key in value and value[key] is not None:
            out[key] = _number_at_least(f"ray_actor_options.{key}", value[key], 0)
    env = value.get("runtime_env")
    if env is not None:
        if not isinstance(env, dict):
            raise ConfigTypeError(f"ray_actor_options.runtime_env must be a dict, not {type(env).__name__}")
        out["runtime_env"] = {"env_vars": _env_vars("ray_actor_options.runtime_env", env)}
    return out


def _env_vars(where: str, runtime_env: Dict[str, Any]) -> Dict[str, str]:
    """The ``env_vars`` of a runtime_env, checked; any other key raises."""
    unknown = sorted(k for k, v in runtime_env.items() if k not in _RUNTIME_ENV and v not in (None, {}, []))
    if unknown:
        raise ValueError(f"{where}: Serval supports only env_vars in a runtime_env, not {unknown} (install "
                         f"packages on the nodes, or use a Cortex project for packaged code)")
    env = runtime_env.get("env_vars") or {}
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ConfigTypeError(f"{where}.env_vars must map str to str, not {env!r}")
    return dict(env)


def check_option(key: str, value: Any) -> Any:
    """One deployment option, checked (ValueError/TypeError naming it)."""
    if key in _UNSUPPORTED:
        if value in (None, [], {}, "PACK"):
            return value
        raise ValueError(f"{key} is not supported by Serval (replicas are placed by their CPUs and GPUs)")
    if key == "num_replicas":
        if value == "auto" or value is None:
            return value
        return _int_at_least("num_replicas", value, 1)
    if key == "max_ongoing_requests":
        return _int_at_least(key, value, 1)
    if key == "retry_idempotent":
        if not isinstance(value, bool):
            raise TypeError(f"retry_idempotent must be True or False, not {value!r}")
        return value
    if key == "max_queued_requests":
        if _is_int(value) and (value == -1 or value >= 1):
            return value
        raise ValueError(f"max_queued_requests must be -1 (no limit) or a positive integer, not {value!r}")
    if key == "ray_actor_options":
        return None if value is None else _actor_options(value)
    if key == "autoscaling_config":
        return None if value is None else _autoscaling(value)
    if key == "user_config":
        return _json_value(key, value)
    if key in ("health_check_period_s", "health_check_timeout_s"):
        return _positive_number(key, value)
    if key in ("graceful_shutdown_wait_loop_s", "graceful_shutdown_timeout_s"):
        return _number_at_least(key, value, 0)
    if key in ("logging_config", "version"):
        # Accepted as Ray takes them; replicas log as Serval's do.
        return value
    raise TypeError(f"unknown deployment option {key!r}")


class Deployment:
    """A class or function with its deployment options (Ray Serve 2.x
    ``serve.Deployment``). Made by ``@serve.deployment``; ``.options()``
    returns a copy with some options changed, ``.bind()`` an
    :class:`Application`."""

    def __init__(self, func_or_class: Union[Callable, type], name: str, options: Dict[str, Any]):
        self._func_or_class = func_or_class
        self._name = _check_name("deployment name", name)
        #: Only the options given (checked); serve build writes these.
        self._options = dict(options)
        if self._options.get("autoscaling_config") is not None and self._options.get("num_replicas") not in (
                None, "auto"):
            raise ValueError("num_replicas cannot be set with autoscaling_config (use num_replicas='auto' or "
                             "autoscaling_config.initial_replicas)")

    @property
    def name(self) -> str:
        return self._name

    @property
    def func_or_class(self) -> Union[Callable, type]:
        return self._func_or_class

    @property
    def num_replicas(self) -> Union[int, str]:
        return self._options.get("num_replicas", 1) or 1

    @property
    def max_ongoing_requests(self) -> int:
        return self._options.get("max_ongoing_requests", DEFAULT_MAX_ONGOING_REQUESTS)

    @property
    def max_queued_requests(self) -> int:
        return self._options.get("max_queued_requests", -1)

    @property
    def user_config(self) -> Any:
        return self._options.get("user_config")

    @property
    def ray_actor_options(self) -> Optional[Dict[str, Any]]:
        return self._options.get("ray_actor_options")

    @property
    def autoscaling_config(self) -> Optional[Dict[str, Any]]:
        return self._options.get("autoscaling_config")

    def given_options(self) -> Dict[str, Any]:
        """The options set on this deployment (checked), for ``serve build``."""
        return dict(self._options)

    def options(self, func_or_class: Any = None, *, name: Optional[str] = None, **options: Any) -> "Deployment":
        """A copy with the given options changed (and the code, with
        ``func_or_class``); the others are kept."""
        merged = dict(self._options)
        for key, value in options.items():
            merged[key] = check_option(key, value)
        if "autoscaling_config" in options and options["autoscaling_config"] is not None and \
                "num_replicas" not in options and merged.get("num_replicas") not in (None, "auto"):
            merged.pop("num_replicas", None)
        return Deployment(func_or_class or self._func_or_class, name or self._name, merged)

    def bind(self, *args: Any, **kwargs: Any) -> "Application":
        if not inspect.isclass(self._func_or_class) and (args or kwargs):
            raise TypeError(f"deployment {self._name!r} is a function: bind() takes no arguments for it")
        return Application(self, args, kwargs)

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"deployment {self._name!r} cannot be called directly: use .bind() and serve.run(), "
                           f"then call it through its DeploymentHandle")

    def __repr__(self) -> str:
        return f"Deployment(name={self._name!r})"

    # -- what the store holds -------------------------------------------

    def backend_config(self) -> Dict[str, Any]:
        """The backend's config as ``_native.Client.create_backend`` takes it."""
        o = self._options
        actor = o.get("ray_actor_options") or {}
        config: Dict[str, Any] = {
            "max_concurrent_queries": o.get("max_ongoing_requests", DEFAULT_MAX_ONGOING_REQUESTS),
            "user_config": o.get("user_config"),
            "num_cpus": actor.get("num_cpus", 1.0),
            "num_gpus": actor.get("num_gpus", 0.0),
            # The backend's graceful shutdown timeout (Ray 2.x's default).
            "experimental_graceful_shutdown_timeout_s": o.get("graceful_shutdown_timeout_s",
                                                              DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S),
        }
        if o.get("retry_idempotent") is False:
            config["retry_idempotent"] = False
        queued = o.get("max_queued_requests", -1)
        if queued != -1:
            config["max_queued_requests"] = queued
        autoscaling = o.get("autoscaling_config")
        if o.get("num_replicas") == "auto":
            autoscaling = {**AUTO_AUTOSCALING, **(autoscaling or {})}
        if autoscaling is not None:
            ray = {**_AUTOSCALING_DEFAULTS, **autoscaling}
            config["autoscaling"] = {serval: ray[name] for name, serval in _AUTOSCALING_MAPPED.items()}
            initial = autoscaling.get("initial_replicas")
            config["num_replicas"] = ray["min_replicas"] if initial is None else initial
        else:
            config["num_replicas"] = o.get("num_replicas") or 1
        return config

    def replica_options(self, env_vars: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
        """What the replica applies itself: environment variables (the
        application's ``runtime_env`` under the deployment's) and health
        checks."""
        actor = self._options.get("ray_actor_options") or {}
        env = {**(env_vars or {}), **((actor.get("runtime_env") or {}).get("env_vars") or {})}
        return {
            "env_vars": env,
            "health_check_period_s": self._options.get("health_check_period_s", DEFAULT_HEALTH_CHECK_PERIOD_S),
            "health_check_timeout_s": self._options.get("health_check_timeout_s", DEFAULT_HEALTH_CHECK_TIMEOUT_S),
        }


class Application:
    """A bound deployment (what ``Deployment.bind()`` returns): the
    deployment and its constructor's arguments, which may hold other
    Applications. ``serve.run`` deploys the graph."""

    __slots__ = ("_deployment", "_args", "_kwargs")

    def __init__(self, deployment_: Deployment, args: tuple, kwargs: dict):
        self._deployment = deployment_
        self._args = args
        self._kwargs = kwargs

    @property
    def deployment(self) -> Deployment:
        return self._deployment

    def __reduce__(self):
        raise TypeError(
            f"a bound deployment ({self._deployment.name}) can be passed to .bind() as an argument, or inside "
            f"a list, tuple, set or dict argument; anywhere else it cannot become a DeploymentHandle")

    def __repr__(self) -> str:
        return f"Application({self._deployment.name})"


def deployment(_func_or_class: Optional[Union[Callable, type]] = None, *, name: Optional[str] = None,
               **options: Any):
    """``@serve.deployment`` or ``@serve.deployment(num_replicas=2, ...)``
    on a class or a function: a :class:`Deployment`."""
    checked = {key: check_option(key, value) for key, value in options.items()}

    def wrap(func_or_class):
        if not callable(func_or_class):
            raise TypeError(f"@serve.deployment goes on a class or a function, not {type(func_or_class).__name__}")
        return Deployment(func_or_class, name or getattr(func_or_class, "__name__", None) or "", checked)

    return wrap(_func_or_class) if _func_or_class is not None else wrap
