"""``serve run``, ``serve build`` and ``serve deploy CONFIG.yaml``: Ray
Serve 2.x's commands. ``serve deploy`` of anything that is not a Ray Serve
config file (a Cortex project folder or its yaml) stays Cortex's. They take
the global options (``--data-dir``, ``--address``, ``--token-file``, ...)
before the command, and exit 1 with a one-line error."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import List, Optional

from serval.cortex import cli as cortex_cli

COMMANDS = ("run", "build", "deploy")


def handles(argv: List[str]) -> bool:
    """``run`` and ``build``, and ``deploy`` of a Ray Serve config file."""
    i = cortex_cli.command_index(argv, COMMANDS)
    if i is None:
        return False
    if argv[i] != "deploy":
        return True
    from serval.app_config import is_config_file

    return any(is_config_file(a) for a in argv[i + 1:] if not a.startswith("-"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve", description="Ray Serve 2.x applications on a Serval cluster")
    cortex_cli.add_global_options(p)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run an application (module:app) or a config file's applications in the "
                                   "foreground; Ctrl-C removes them")
    r.add_argument("target", help="module:app (an application or an application builder), or a config file")
    r.add_argument("args", nargs="*", help="key=value arguments of an application builder")
    r.add_argument("--name", default=None, help="the application's name (default: 'default')")
    r.add_argument("--route-prefix", default="/", help="where HTTP reaches it (default: /)")
    r.add_argument("--app-dir", default=None, help="directory to import from (default: the working directory)")
    b = sub.add_parser("build", help="write the config file of applications (module:app ...)")
    b.add_argument("import_paths", nargs="+")
    b.add_argument("-o", "--output-path", default=None, help="file to write (default: print it)")
    b.add_argument("--app-dir", default=None)
    d = sub.add_parser("deploy", help="deploy a Ray Serve config file's applications")
    d.add_argument("config")
    d.add_argument("--app-dir", default=None)
    return p


def _builder_args(pairs: List[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"application builder arguments are key=value, not {pair!r}")
        out[key] = value
    return out


def _connect_or_start(args, http_options: Optional[dict], proxy_location: Optional[str]) -> bool:
    """Connects with the global options; with no cluster found (and no
    --address), starts a head for this command. True when it started one."""
    from serval import serve

    try:
        cortex_cli.connect(args)
        return False
    except serve.ServeError:
        if args.address:
            raise
    options = {k: v for k, v in (http_options or {}).items() if k in ("host", "port")}
    serve.start(detached=False, http_options=options or None, proxy_location=proxy_location,
                data_dir=args.data_dir, token=args.token, token_file=args.token_file)
    return True


def _http_url(route_prefix: Optional[str]) -> str:
    from serval import _core

    if route_prefix is None:
        return "(handles only)"
    nodes = [n for n in _core.snapshot().get("nodes", []) if n.get("alive") and n.get("http_address")]
    head = next((n for n in nodes if n.get("is_head")), nodes[0] if nodes else None)
    return f"http://{head['http_address']}{route_prefix}" if head else f"(no HTTP proxy) {route_prefix}"


def _run(args) -> int:
    from serval import app_config, application, serve

    config = app_config.read(args.target) if app_config.is_config_file(args.target) else None
    started = _connect_or_start(args, (config or {}).get("http_options"), (config or {}).get("proxy_location"))

    def stop(signum, frame):
        raise KeyboardInterrupt

    # SIGTERM ends it as Ctrl-C does.
    signal.signal(signal.SIGTERM, stop)
    names: List[str] = []
    try:
        if config is not None:
            names = app_config.deploy(config, app_dir=args.app_dir, remove_others=False)
            prefixes = {a["name"]: a["route_prefix"] for a in config["applications"]}
        else:
            name = args.name or application.DEFAULT_APP_NAME
            prefix = None if args.route_prefix in ("", "none", "None") else args.route_prefix
            target = application.build_target(application.import_attribute(args.target, args.app_dir),
                                              _builder_args(args.args), args.target)
            names = [name]
            application.deploy_application(name, target, prefix, import_path=args.target)
            prefixes = {name: prefix}
        for name in names:
            print(f"application {name!r} is running at {_http_url(prefixes[name])}", flush=True)
        print("Ctrl-C removes it", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        # Deployed (or partly deployed) applications go with the command.
        for name in names:
            try:
                application.delete(name)
            except serve.ServeError as e:
                print(f"error: removing application {name!r}: {e}", file=sys.stderr)
        if started:
            serve.shutdown()
    print("stopped", flush=True)
    return 0


def main(argv: List[str]) -> int:
    from serval import app_config, serve

    args = _parser().parse_args(argv)
    try:
        if args.command == "build":
            text = app_config.dump(app_config.build(args.import_paths, app_dir=args.app_dir))
            if args.output_path:
                with open(args.output_path, "w") as f:
                    f.write(text)
                print(f"wrote {args.output_path}")
            else:
                print(text, end="")
            return 0
        if args.command == "run":
            return _run(args)
        config = app_config.read(args.config)
        cortex_cli.connect(args)
        for name in app_config.deploy(config, app_dir=args.app_dir):
            status = serve.status().applications[name]
            print(f"{name}: {status.status} at {_http_url(status.route_prefix)}")
        return 0
    except (serve.ServeError, ValueError, TypeError, OSError, ImportError, SyntaxError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
