"""The ``serve`` console script: the Rust command line, run in this
interpreter through the extension module, plus the Cortex-style commands
(``deploy``, ``get``, ``delete``) that live in Python."""

import os
import sys


def main() -> None:
    argv = sys.argv[1:]
    # Replicas (and the Python commands the Rust side hands back) run with
    # SERVAL_PYTHON: by default this script's own interpreter, the one that
    # has serval, not whatever `python3` comes first on PATH.
    os.environ.setdefault("SERVAL_PYTHON", sys.executable)
    from serval.cortex import cli as cortex_cli

    if cortex_cli.handles(argv):
        sys.exit(cortex_cli.main(argv))
    from serval import _native

    relaunch = [sys.executable, "-m", "serval.cli"]
    sys.exit(_native.cli_main(["serve", *argv], relaunch))


if __name__ == "__main__":
    main()
