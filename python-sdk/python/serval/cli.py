"""The ``serve`` console script: the Rust command line, run in this
interpreter through the extension module, plus the commands that live in
Python: Ray Serve 2.x's (``run``, ``build``, ``deploy`` of a config file)
and the Cortex-style ones (``deploy``, ``get``, ``delete``, ``logs``,
``jobs``)."""

import sys


def main() -> None:
    argv = sys.argv[1:]
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
