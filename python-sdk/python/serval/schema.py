"""What ``serve.status()`` returns, in Ray Serve 2.x's words
(``ray.serve.schema``): application, deployment, replica and proxy states
and the overviews that carry them.

The states are ``str`` enums, so ``status.applications["app"].status ==
"RUNNING"`` holds as it does with Ray. The statuses themselves are computed
by the Rust side (``serval_head::applications``), the same code that
``serve status`` prints from.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

__all__ = [
    "ApplicationStatus", "DeploymentStatus", "ReplicaState", "ProxyStatus", "DeploymentStatusOverview",
    "ApplicationStatusOverview", "ServeStatus",
]


class ApplicationStatus(str, enum.Enum):
    NOT_STARTED = "NOT_STARTED"
    DEPLOYING = "DEPLOYING"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    RUNNING = "RUNNING"
    UNHEALTHY = "UNHEALTHY"
    DELETING = "DELETING"

    def __str__(self) -> str:
        return self.value


class DeploymentStatus(str, enum.Enum):
    UPDATING = "UPDATING"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    UPSCALING = "UPSCALING"
    DOWNSCALING = "DOWNSCALING"

    def __str__(self) -> str:
        return self.value


class ReplicaState(str, enum.Enum):
    STARTING = "STARTING"
    UPDATING = "UPDATING"
    RECOVERING = "RECOVERING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    PENDING_MIGRATION = "PENDING_MIGRATION"

    def __str__(self) -> str:
        return self.value


class ProxyStatus(str, enum.Enum):
    STARTING = "STARTING"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DRAINING = "DRAINING"
    DRAINED = "DRAINED"

    def __str__(self) -> str:
        return self.value


@dataclass
class DeploymentStatusOverview:
    status: DeploymentStatus
    replica_states: Dict[ReplicaState, int] = field(default_factory=dict)
    message: str = ""


@dataclass
class ApplicationStatusOverview:
    status: ApplicationStatus
    message: str = ""
    last_deployed_time_s: float = 0.0
    deployments: Dict[str, DeploymentStatusOverview] = field(default_factory=dict)
    #: Serval additions: where the application is served, and its ingress.
    route_prefix: Optional[str] = None
    ingress: str = ""


class ServeStatus(dict):
    """Ray 2.x's ``ServeStatus`` (``proxies``, ``applications``,
    ``target_capacity``). It is also the controller's snapshot as a dict
    (heads, nodes, backends, endpoints, replicas), which is what Serval's
    ``serve.status()`` returned before the 2.x API, so code reading
    ``serve.status()["replicas"]`` keeps working."""

    def __init__(self, snapshot: Dict[str, Any], applications: list):
        super().__init__(snapshot)
        self.applications: Dict[str, ApplicationStatusOverview] = {
            a["name"]: _application(a) for a in applications}
        self.proxies: Dict[str, ProxyStatus] = {
            n["id"]: ProxyStatus.HEALTHY for n in snapshot.get("nodes", [])
            if n.get("alive") and n.get("http_address")}
        self.target_capacity: Optional[float] = None


def _application(a: Dict[str, Any]) -> ApplicationStatusOverview:
    """One entry of ``_native.application_statuses``."""
    deployments = {
        name: DeploymentStatusOverview(
            status=DeploymentStatus(d["status"]),
            replica_states={ReplicaState(k): v for k, v in d.get("replica_states", {}).items()},
            message=d.get("message", ""),
        )
        for name, d in a.get("deployments", [])
    }
    return ApplicationStatusOverview(
        status=ApplicationStatus(a["status"]), message=a.get("message", ""),
        last_deployed_time_s=a.get("last_deployed_time_s", 0.0), deployments=deployments,
        route_prefix=a.get("route_prefix"), ingress=a.get("ingress", ""))
