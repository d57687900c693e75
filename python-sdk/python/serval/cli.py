"""The ``serve`` console script: the Rust command line, run in this
interpreter through the extension module, plus the commands that live in
Python: Ray Serve 2.x's (``run``, ``build``, ``deploy`` of a config file)
and the Cortex-style ones (``deploy``, ``get``, ``delete``, ``logs``,
``jobs``)."""

import os
import sys

#: The driver whose end a head started by ``serve.start(detached=False)``
#: follows (``_stop_with_owner``).
OWNER_PID_ENV = "SERVAL_OWNER_PID"


def main() -> None:
    argv = sys.argv[1:]
    # Replicas (and the Python commands the Rust side hands back) run with
    # SERVAL_PYTHON: by default this script's own interpreter, the one that
    # has serval, not whatever `python3` comes first on PATH.
    os.environ.setdefault("SERVAL_PYTHON", sys.executable)
    from serval import app_cli
    from serval.cortex import cli as cortex_cli

    if app_cli.handles(argv):
        sys.exit(app_cli.main(argv))
    if cortex_cli.handles(argv):
        sys.exit(cortex_cli.main(argv))
    from serval import _native

    owner = os.environ.get(OWNER_PID_ENV)
    if owner is not None and "start" in argv and "--detach" not in argv:
        _stop_with_owner(owner)
    relaunch = [sys.executable, "-m", "serval.cli"]
    sys.exit(_native.cli_main(["serve", *argv], relaunch))


def _stop_with_owner(owner: str) -> None:
    """A head started by ``serve.start(detached=False)`` (the detached
    process ``start --detach`` relaunches, with ``OWNER_PID_ENV`` in its
    environment): when that driver process is gone, however it ended, this
    one stops as on SIGTERM (replicas included). A pidfd names the process
    itself, not a pid that may be reused."""
    import select
    import signal
    import threading

    os.environ.pop(OWNER_PID_ENV, None)  # not for the replicas
    try:
        fd = os.pidfd_open(int(owner))
    except (ValueError, OSError):
        # Gone already (or not a pid): nobody is left to stop this head.
        os.kill(os.getpid(), signal.SIGTERM)
        return

    def watch() -> None:
        select.select([fd], [], [])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="serval-owner-watch", daemon=True).start()


if __name__ == "__main__":
    main()
