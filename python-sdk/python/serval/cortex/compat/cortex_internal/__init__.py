"""Shim of Cortex's internal package, for ``cortex_internal.lib.log``."""
