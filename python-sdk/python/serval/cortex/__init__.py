"""Cortex-style APIs on Serval: project folders with a ``serve.yaml`` (or
``cortex.yaml``), Handler classes and the ``serve deploy|get|delete``
commands. ``config`` validates, ``package`` ships the folder, ``deploy``
turns APIs into backends and endpoints, ``realtime`` hosts a Handler in a
replica, ``cli`` is the command line."""
