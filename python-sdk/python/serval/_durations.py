"""Durations as Cortex and Kubernetes write them: ``60s``, ``5m``, ``1h``,
``500ms``, ``1m30s``, or a plain number of seconds."""

import re
from typing import Any

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_SCALE = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float:
    """Seconds, or ValueError saying what a duration looks like."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 60s or 5m")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    text = value.strip() if isinstance(value, str) else ""
    parts = _PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"must be a duration such as 60s or 5m, got {value!r}")
    return sum(float(n) * _SCALE[u] for n, u in parts)
