"""``serve deploy|get|delete|logs|jobs``: the Cortex-style commands of the ``serve``
console script (the others are the Rust CLI's). They take the same global
options (``--data-dir``, ``--address``, ``--token-file``, ``--token``, ``--tls-ca``,
``--tls-domain``) before the command, and exit 1 with a one-line error."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

COMMANDS = ("deploy", "get", "delete", "logs", "jobs")


def handles(argv: List[str]) -> bool:
    """Whether ``argv`` (without the program name) is one of these commands."""
    return command_index(argv) is not None


def command_index(argv: List[str], commands=COMMANDS) -> Optional[int]:
    """Where the command (one of ``commands``) is in ``argv``, after the
    global options; None when the command is another."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in commands:
            return i
        if a.startswith("--") and "=" not in a and a in ("--data-dir", "--address", "--token", "--token-file", "--tls-ca",
                                                         "--tls-domain"):
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        return None
    return None


def add_global_options(p: argparse.ArgumentParser) -> None:
    """The options every `serve` command takes before its name."""
    p.add_argument("--data-dir", default=os.environ.get("SERVAL_DATA_DIR"))
    p.add_argument("--address", default=os.environ.get("SERVAL_ADDRESS"))
    p.add_argument("--token", default=None, help="the cluster token (prefer --token-file)")
    p.add_argument("--token-file", default=None,
                   help="file holding the cluster token (default: SERVAL_TOKEN_FILE, else the data dir's)")
    p.add_argument("--tls-ca", default=None)
    p.add_argument("--tls-domain", default=None)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve", description="Cortex-style APIs on a Serval cluster")
    add_global_options(p)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("deploy", help="deploy the APIs of a project folder's serve.yaml (or cortex.yaml)")
    d.add_argument("folder", nargs="?", default=".")
    d.add_argument("--config", default=None, help="config file (default: serve.yaml, else cortex.yaml)")
    d.add_argument("--no-wait", action="store_true", help="return without waiting for the APIs to be live")
    d.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the APIs to be live")
    g = sub.add_parser("get", help="status of every API, or of one")
    g.add_argument("name", nargs="?")
    g.add_argument("--json", action="store_true", help="print JSON")
    x = sub.add_parser("delete", help="remove an API")
    x.add_argument("name")
    lg = sub.add_parser("logs", help="print the log lines of an API's replicas as they come")
    lg.add_argument("name")
    lg.add_argument("--no-follow", action="store_true", help="print what is logged so far and exit")
    j = sub.add_parser("jobs", help="jobs of a BatchAPI or a TaskAPI").add_subparsers(dest="jobs_command", required=True)
    js = j.add_parser("submit", help="submit a job: its JSON request from a file ('-': stdin)")
    js.add_argument("api")
    js.add_argument("file")
    js.add_argument("--dry-run", action="store_true", help="list the job's targets without running it")
    for verb, what in (("get", "a job's status"), ("stop", "stop a job"), ("logs", "follow a job's worker logs")):
        jp = j.add_parser(verb, help=what)
        jp.add_argument("api")
        jp.add_argument("job_id")
        if verb == "logs":
            jp.add_argument("--no-follow", action="store_true")
    jl = j.add_parser("list", help="the jobs of a BatchAPI or a TaskAPI")
    jl.add_argument("api")
    return p


def connect(args) -> None:
    """Connects with the global options (TLS ones set for the process)."""
    from serval import serve

    if args.tls_ca:
        os.environ["SERVAL_TLS_CA"] = args.tls_ca
    if args.tls_domain:
        os.environ["SERVAL_TLS_DOMAIN"] = args.tls_domain
    serve.connect(args.address, data_dir=args.data_dir, token=args.token, token_file=args.token_file)


def _age(ts: Optional[float]) -> str:
    if not ts:
        return "-"
    s = max(0, int(time.time() - ts))
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit}"
    return f"{s}s"


def _table(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _replicas(st: dict) -> str:
    counts = st.get("replicas") or {}
    running = counts.get("running", 0)
    requested = st.get("requested")
    other = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()) if k != "running")
    text = f"{running}/{requested}" if requested is not None else str(running)
    return f"{text} ({other})" if other else text


def _print_get(apis: List[dict], one: bool) -> None:
    if not apis:
        print("no APIs are deployed")
        return
    rows = [["name", "kind", "status", "replicas", "endpoint", "age"]]
    for st in apis:
        rows.append([st["name"], st.get("kind") or "?", st.get("status", "?"),
                     _replicas(st) if st.get("kind") == "RealtimeAPI" else "-",
                     st.get("endpoint") or "-", _age(st.get("deployed_at"))])
    print(_table(rows))
    for st in apis:
        if st.get("kind") == "TrafficSplitter" and one:
            for e in st.get("apis", []):
                print(f"  {e['name']}: weight {e['weight']}{' (shadow)' if e.get('shadow') else ''}")
        if st.get("last_error") and (one or st.get("status") == "error"):
            print(f"\nlast error of {st['name']}:\n{st['last_error'].rstrip()}")


def _print_logs(name: str, follow: bool) -> int:
    """``<replica id> | <line>`` per line, each flushed so a pipe sees it at
    once. Ctrl-C (the usual way out of following) and a closed pipe end
    it quietly."""
    from .logs import stream_api_logs

    try:
        for rid, line in stream_api_logs(name, follow=follow):
            print(f"{rid} | {line}", flush=True)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        # The reader left (`serve logs x | head`); don't let the interpreter
        # complain about flushing a closed stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _jobs(args) -> int:
    """``serve jobs ...``: through the BatchAPI's (or TaskAPI's) HTTP endpoint, as a user's
    client would; answers are printed as JSON."""
    from .client import Client

    client = Client.__new__(Client)  # already connected by connect
    if args.jobs_command == "submit":
        with (sys.stdin if args.file == "-" else open(args.file)) as f:
            body = json.load(f)
        out = client.submit_job(args.api, body, dry_run=args.dry_run)
    elif args.jobs_command == "get":
        out = client.get_job(args.api, args.job_id)
    elif args.jobs_command == "list":
        out = client.list_jobs(args.api)
    elif args.jobs_command == "stop":
        out = client.stop_job(args.api, args.job_id)
    else:
        try:
            for wid, line in client.stream_job_logs(args.api, args.job_id, follow=not args.no_follow):
                print(f"{wid} | {line}", flush=True)
        except KeyboardInterrupt:
            pass
        return 0
    print(json.dumps(out, indent=2))
    return 0


def main(argv: List[str]) -> int:
    from serval import serve

    from . import deploy as api
    from .config import ConfigError

    args = _parser().parse_args(argv)
    try:
        connect(args)
        if args.command == "deploy":
            results = api.deploy(args.folder, args.config, wait=not args.no_wait, timeout=args.timeout)
            for r in results:
                print(f"{r['name']}: {r['action']} ({r['kind']} at {r['endpoint']})")
        elif args.command == "get":
            apis = [api.get_api(args.name)] if args.name else api.list_apis()
            if args.json:
                print(json.dumps(apis[0] if args.name else apis, indent=2))
            else:
                _print_get(apis, bool(args.name))
        elif args.command == "delete":
            api.delete(args.name)
            print(f"deleted {args.name}")
        elif args.command == "logs":
            return _print_logs(args.name, follow=not args.no_follow)
        elif args.command == "jobs":
            return _jobs(args)
        return 0
    except (ConfigError, serve.ServeError, KeyError, OSError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 1
