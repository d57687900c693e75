"""``from cortex_internal.lib.log import logger as cortex_logger``: Serval's
structured logger (serval.log), which writes Cortex's JSON lines."""

from serval.log import logger

__all__ = ["logger"]
