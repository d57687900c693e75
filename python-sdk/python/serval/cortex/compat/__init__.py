"""Import shims for handlers written for Cortex, put at the END of sys.path
in a RealtimeAPI replica (so real packages of those names win): ``from
cortex_internal.lib.log import logger`` works unchanged. (``import cortex``
is the top-level ``cortex`` package the SDK installs: Cortex's client.) This
folder itself is not a package users import."""
