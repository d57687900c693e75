"""The ``serve`` console script: the Rust command line, run in this
interpreter through the extension module, plus the Cortex-style commands
(``deploy``, ``get``, ``delete``) that live in Python."""

import sys


def main() -> None:
    argv = sys.argv[1:]
    from serval.cortex import cli as cortex_cli

    if cortex_cli.handles(argv):
        sys.exit(cortex_cli.main(argv))
    from serval import _native

    relaunch = [sys.executable, "-m", "serval.cli"]
    sys.exit(_native.cli_main(["serve", *argv], relaunch))


if __name__ == "__main__":
    main()
