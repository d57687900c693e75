"""Import shims for handlers written for Cortex, put at the END of sys.path
in a RealtimeAPI replica (so real packages of those names win): ``import
cortex`` / ``cortex.client()`` and ``from cortex_internal.lib.log import
logger`` work unchanged. This folder itself is not a package users import."""
