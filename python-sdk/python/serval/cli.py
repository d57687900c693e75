"""The ``serve`` console script: the same command line as the Rust binary,
run in this interpreter through the extension module."""

import sys


def main() -> None:
    from serval import _native

    relaunch = [sys.executable, "-m", "serval.cli"]
    sys.exit(_native.cli_main(["serve", *sys.argv[1:]], relaunch))


if __name__ == "__main__":
    main()
