"""The ``serve`` console script: the Rust command line, run in this
interpreter through the extension module, plus the commands that live in
Python: Ray Serve 2.x's (``run``, ``build``, ``deploy`` of a config file)
and the Cortex-style ones (``deploy``, ``get``, ``delete``, ``logs``,
``jobs``)."""

import os
import sys


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

    relaunch = [sys.executable, "-m", "serval.cli"]
    sys.exit(_native.cli_main(["serve", *argv], relaunch))


if __name__ == "__main__":
    main()
