"""Ray Serve 2.x config files: what ``serve build`` writes and ``serve
deploy`` / ``serve run`` read (Ray's ``ServeDeploySchema``)::

    proxy_location: HeadOnly
    http_options: {host: 127.0.0.1, port: 8000}
    applications:
      - name: app1
        route_prefix: /
        import_path: module:app
        runtime_env: {env_vars: {KEY: value}}
        args: {...}                  # for an application builder function
        deployments:
          - name: Model
            num_replicas: 2          # any @serve.deployment option

A file with ``import_path`` at the top (Ray's single-application schema) is
one application named ``default``. The applications are imported here, in
the process running the command (the working directory, or ``app_dir``,
first on sys.path), and deployed from it; ``http_options``,
``proxy_location`` and ``grpc_options`` matter only to ``serve run`` when
it starts a head. Errors name the file and the field.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import yaml

from serval.application import (DEFAULT_APP_NAME, build_target, check_route_prefix, deploy_application,
                                import_attribute, plan)

__all__ = ["is_config_file", "read", "deploy", "build", "dump", "ConfigFileError"]

_TOP_LEVEL = {"proxy_location", "http_options", "grpc_options", "logging_config", "applications",
              "target_capacity"}
_APPLICATION = {"name", "route_prefix", "import_path", "runtime_env", "deployments", "args", "logging_config",
                "external_scaler_enabled"}
#: Ray's single-application schema's own fields (the others are _APPLICATION's).
_SINGLE = {"host", "port"}
#: Config files bigger than this are refused before they are parsed.
MAX_CONFIG_BYTES = 1024 * 1024


class ConfigFileError(ValueError):
    """A config file that cannot be deployed; the message names the field."""


def _load_yaml(path: str) -> Any:
    try:
        if os.path.getsize(path) > MAX_CONFIG_BYTES:
            raise ConfigFileError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
        with open(path) as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigFileError(f"{path}: not valid YAML: {e}") from None


def is_config_file(path: str) -> bool:
    """Whether ``path`` is a Ray Serve config file (a YAML mapping with
    ``applications`` or ``import_path``), not a Cortex project's."""
    if not os.path.isfile(path) or not path.endswith((".yaml", ".yml", ".json")):
        return False
    try:
        doc = _load_yaml(path)
    except (OSError, ConfigFileError):
        return False
    return isinstance(doc, dict) and ("applications" in doc or "import_path" in doc)


def read(path: str) -> Dict[str, Any]:
    """The file's content checked: ``applications`` a list of dicts with
    ``name``, ``route_prefix``, ``import_path``, ``env_vars``, ``args`` and
    ``overrides`` (deployment name -> options)."""
    doc = _load_yaml(path)
    if not isinstance(doc, dict):
        raise ConfigFileError(f"{path}: must be a mapping with 'applications'")
    if "import_path" in doc and "applications" not in doc:
        single = {k: v for k, v in doc.items() if k not in _SINGLE}
        doc = {"http_options": {k: doc[k] for k in _SINGLE if k in doc}, "applications": [single]}
    unknown = sorted(set(doc) - _TOP_LEVEL)
    if unknown:
        raise ConfigFileError(f"{path}: unknown field(s) {unknown}; known: {sorted(_TOP_LEVEL)}")
    apps = doc.get("applications")
    if not isinstance(apps, list) or not apps:
        raise ConfigFileError(f"{path}: applications must be a non-empty list")
    http = doc.get("http_options") or {}
    if not isinstance(http, dict):
        raise ConfigFileError(f"{path}: http_options must be a mapping")
    out = {"proxy_location": doc.get("proxy_location"), "http_options": http,
           "applications": [_application(path, i, a, len(apps)) for i, a in enumerate(apps)]}
    for field in ("name", "route_prefix"):
        seen: Dict[Any, int] = {}
        for i, a in enumerate(out["applications"]):
            if a[field] is not None and a[field] in seen:
                raise ConfigFileError(f"{path}: applications[{i}].{field}: {a[field]!r} is also "
                                      f"applications[{seen[a[field]]}]'s")
            seen[a[field]] = i
    return out


def _application(path: str, i: int, a: Any, count: int) -> Dict[str, Any]:
    where = f"{path}: applications[{i}]"
    if not isinstance(a, dict):
        raise ConfigFileError(f"{where} must be a mapping")
    unknown = sorted(set(a) - _APPLICATION)
    if unknown:
        raise ConfigFileError(f"{where}: unknown field(s) {unknown}; known: {sorted(_APPLICATION)}")
    import_path = a.get("import_path")
    if not isinstance(import_path, str) or not import_path:
        raise ConfigFileError(f"{where}.import_path is required ('module:app')")
    name = a.get("name")
    if name is None and count == 1:
        name = DEFAULT_APP_NAME
    if not isinstance(name, str) or not name:
        raise ConfigFileError(f"{where}.name is required when the file has several applications")
    try:
        route_prefix = check_route_prefix(a.get("route_prefix", "/"))
    except (TypeError, ValueError) as e:
        raise ConfigFileError(f"{where}.route_prefix: {e}") from None
    runtime_env = a.get("runtime_env") or {}
    if not isinstance(runtime_env, dict):
        raise ConfigFileError(f"{where}.runtime_env must be a mapping")
    from serval.deployment import _env_vars

    try:
        env_vars = _env_vars(f"{where}.runtime_env", runtime_env)
    except (TypeError, ValueError) as e:
        raise ConfigFileError(str(e)) from None
    args = a.get("args") or {}
    if not isinstance(args, dict):
        raise ConfigFileError(f"{where}.args must be a mapping")
    overrides: Dict[str, Dict[str, Any]] = {}
    deployments = a.get("deployments") or []
    if not isinstance(deployments, list):
        raise ConfigFileError(f"{where}.deployments must be a list")
    for j, d in enumerate(deployments):
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise ConfigFileError(f"{where}.deployments[{j}] must be a mapping with a name")
        options = {k: v for k, v in d.items() if k != "name"}
        from serval.deployment import check_option

        for key, value in options.items():
            try:
                check_option(key, value)
            except (TypeError, ValueError) as e:
                raise ConfigFileError(f"{where}.deployments[{j}] ({d['name']}).{key}: {e}") from None
        overrides[d["name"]] = options
    return {"name": name, "route_prefix": route_prefix, "import_path": import_path, "env_vars": env_vars,
            "args": args, "overrides": overrides}


def deploy(config: Dict[str, Any], *, app_dir: Optional[str] = None, remove_others: bool = True) -> List[str]:
    """Deploys every application of a read config, in order; then, with
    ``remove_others``, removes the applications an earlier config file
    deployed that this one no longer has (those ``serve.run`` deployed
    stay). Returns the application names."""
    from serval import application

    names = []
    for a in config["applications"]:
        target = build_target(import_attribute(a["import_path"], app_dir), a["args"], a["import_path"])
        deploy_application(a["name"], target, a["route_prefix"], import_path=a["import_path"], source="config",
                           env_vars=a["env_vars"], overrides=a["overrides"])
        names.append(a["name"])
    if remove_others:
        for name, record in application._application_records().items():
            if name not in names and application._spec(record).get("source") == "config":
                application.delete(name)
    return names


def build(import_paths: List[str], *, app_dir: Optional[str] = None) -> Dict[str, Any]:
    """The config file of the applications at ``import_paths``: one named
    ``app1`` at ``/``, or several ``app1``, ``app2``... at ``/app1``,
    ``/app2``..., each deployment with the options its code sets."""
    apps = []
    for i, import_path in enumerate(import_paths, 1):
        name = f"app{i}"
        target = build_target(import_attribute(import_path, app_dir), None, import_path)
        planned, _ = plan(name, target)
        deployments = []
        for p in planned:
            entry: Dict[str, Any] = {"name": p.name}
            entry.update(_plain(p.deployment.given_options()))
            deployments.append(entry)
        apps.append({"name": name, "route_prefix": "/" if len(import_paths) == 1 else f"/{name}",
                     "import_path": import_path, "runtime_env": {}, "deployments": deployments})
    return {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": 8000},
            "applications": apps}


def _plain(options: Dict[str, Any]) -> Dict[str, Any]:
    """Options as YAML can hold them (no None for unset Ray fields)."""
    return {k: v for k, v in options.items() if v is not None and k not in ("logging_config", "version")}


def dump(config: Dict[str, Any]) -> str:
    header = "# Written by `serve build` (Serval): Ray Serve's config file schema.\n"
    return header + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
