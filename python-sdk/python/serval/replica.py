"""``python -m serval.replica``: one replica process hosting a user's Python code.

A node agent starts it with stdin a pipe (EOF on stdin = the agent died: exit
at once), stdout a pipe it reads, and stderr appended to a log file. The
replica keeps a private dup of fd 1 for its status, points fd 1 at fd 2 so
user prints land in the log, and writes exactly one JSON line on the status
fd before closing it::

    {"state": "running", "unix_path": "...", "tcp_addr": "127.0.0.1:PORT", "tls": false, "pid": N}
    ("tls": true when SERVAL_TLS_CERT/SERVAL_TLS_KEY are set: TCP then serves TLS only)
    (plus "grpc_addr": "HOST:PORT" when the backend serves gRPC: a Cortex gRPC API)
    {"state": "failed", "error": "<traceback>"}        (then exit status 1)

Threads: the Rust frame server runs on its own one-worker tokio runtime; ONE
Python thread ("serval-worker") runs user code on an asyncio event loop
(``Host.serve``), woken by the Rust side through ``ReplicaServer.wake_fd``;
the main thread only waits (signals, stdin EOF).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import sys
import threading
import traceback

logger = logging.getLogger("serval.replica")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m serval.replica",
        description="Serve one Serval backend replica (started by a node agent).",
    )
    p.add_argument("--replica-id", required=True, help="this replica's id, used in log lines")
    p.add_argument("--backend", required=True, help="the backend name")
    p.add_argument("--code-file", required=True,
                   help="cloudpickle of (func_or_class, init_args, init_kwargs)")
    p.add_argument("--config-json", default="{}",
                   help='backend config as JSON, e.g. {"num_replicas":1,"user_config":null}')
    p.add_argument("--unix-path", default=None, help="Unix socket to serve data-plane frames on")
    p.add_argument("--tcp-host", default="127.0.0.1", help="host to bind the TCP frame listener on (port 0)")
    p.add_argument("--max-drain", type=int, default=64, help="requests handed to Python per wake-up, at most")
    p.add_argument("--no-stdin-watch", action="store_true",
                   help="do not exit when stdin reaches EOF (for running by hand)")
    return p.parse_args(argv)


def setup_logging(replica_id: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)s replica={replica_id} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("SERVAL_PY_LOG", "INFO").upper())


class _Status:
    """The private dup of fd 1: one JSON line, then closed."""

    def __init__(self):
        self.fd = os.dup(1)
        os.dup2(2, 1)  # user prints go to the log from now on

    def write(self, obj: dict) -> None:
        if self.fd < 0:
            return
        data = (json.dumps(obj) + "\n").encode()
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError as e:  # the agent went away; stdin EOF will stop us
            logger.warning("cannot write status line: %s", e)
        finally:
            os.close(self.fd)
            self.fd = -1


def _on_sigterm(signum, frame):
    raise SystemExit(0)


def main(argv=None) -> int:
    args = parse_args(argv)
    status = _Status()
    try:
        sys.stdout.reconfigure(line_buffering=True)
    except Exception:
        pass
    setup_logging(args.replica_id)
    # The labels of serval.log's JSON lines.
    os.environ["SERVAL_REPLICA_ID"] = args.replica_id
    # This replica's agent key proves its node agent to it: taken out of the
    # environment before user code is loaded, so user code cannot read it
    # (nor pass it to its subprocesses).
    agent_key = os.environ.pop("SERVAL_AGENT_KEY", None)
    signal.signal(signal.SIGTERM, _on_sigterm)

    try:
        config = json.loads(args.config_json) if args.config_json else {}
        if not isinstance(config, dict):
            raise TypeError(f"--config-json must be a JSON object, got {type(config).__name__}")
        from ._host import Host
        from ._native import ReplicaServer

        # Where servers of the user's object listen (a gRPC API's grpcio server).
        os.environ["SERVAL_REPLICA_HOST"] = args.tcp_host or "127.0.0.1"
        host = Host.from_code_file(args.backend, args.code_file, config)
        # A model API run natively answers its POSTs in Rust (serval.cortex.onnx).
        native = getattr(host.obj, "serval_native_model", None)
        server = ReplicaServer(args.unix_path, args.tcp_host,
                               watch_stdin=not args.no_stdin_watch, max_drain=args.max_drain, native=native,
                               agent_key=agent_key)
    except BaseException:
        error = traceback.format_exc()
        logger.error("replica %s of backend %r failed to start:\n%s", args.replica_id, args.backend, error)
        status.write({"state": "failed", "error": error})
        return 1

    # Start-up leaves reference cycles behind (the argument parser, import
    # machinery, the unpickled code's scaffolding): collect them now, so a
    # replica serves its first request with no cyclic garbage pending.
    # User code that inspects gc (Ray's memory-growth check counts
    # gc.garbage under DEBUG_SAVEALL) sees only what requests leave.
    gc.collect()
    exit_code = {"code": 0}

    def worker() -> None:
        asyncio.set_event_loop(host.loop)
        try:
            host.serve(server)
        except BaseException as e:  # SystemExit/KeyboardInterrupt from user code, or a bug
            code = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1
            exit_code["code"] = code
            logger.error("worker thread stopped: %s", "".join(traceback.format_exception(e)).rstrip())
            server.shutdown(f"worker stopped: {type(e).__name__}")

    thread = threading.Thread(target=worker, name="serval-worker", daemon=True)
    thread.start()
    running = {"state": "running", "unix_path": server.unix_path, "tcp_addr": server.tcp_addr,
               "tls": server.tls, "pid": os.getpid()}
    # A gRPC API (serval.cortex.grpc_api) also serves gRPC, on an address of its own.
    grpc_addr = getattr(host.obj, "serval_grpc_address", None)
    if grpc_addr:
        running["grpc_addr"] = grpc_addr
    status.write(running)
    logger.info("replica %s of backend %r serving on %s and %s%s", args.replica_id, args.backend,
                server.unix_path, server.tcp_addr, f" (gRPC on {grpc_addr})" if grpc_addr else "")

    reason = "interrupted"
    try:
        reason = server.wait()
    except KeyboardInterrupt:
        reason = "SIGINT"
    except SystemExit as e:
        reason = "SIGTERM" if e.code == 0 else f"exit {e.code}"
    finally:
        logger.info("replica %s stopping: %s", args.replica_id, reason)
        # The worker first lets the requests in flight finish (the backend's
        # graceful shutdown timeout); sync user code runs on it, so waiting
        # for it covers those too.
        server.stop(reason or "shutdown")
        thread.join(timeout=float(host.config.get("graceful_shutdown_timeout_s") or 0.0) + 1.0)
        server.shutdown(reason or "shutdown")
        stop = getattr(host.obj, "serval_stop", None)
        if callable(stop):  # a gRPC API's server: calls in flight may finish
            try:
                stop()
            except Exception:
                logger.exception("stopping the replica's gRPC server failed")
        if host.unhealthy is not None:
            # A failed health check: the agent restarts the replica.
            exit_code["code"] = exit_code["code"] or 1
        thread.join(timeout=5.0)
        if thread.is_alive():
            # User code is stuck: do not let it keep the process alive.
            logging.shutdown()
            sys.stderr.flush()
            os._exit(exit_code["code"] or 1)
        host.close()
    return exit_code["code"]


if __name__ == "__main__":
    sys.exit(main())
