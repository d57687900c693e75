"""``bench/run grpc``: the gRPC unary no-op and a 100-message server
stream on both paths and on a bare grpcio server, and the HTTP no-op and
streaming no-op, in one run, with the release build bench/run made.

Two clusters one after the other, each started by the harness's Serval
driver with one no-op replica (one handler thread): the first with
``SERVAL_GRPC_FRAMES=0``, the proxy forwarding gRPC to the replica's grpcio
server, the second on the default path (the proxy terminates every call
and sends it as frames). Then the same no-op Handler in a bare grpcio
Python server (bench/grpc_noop.py: ``grpc.server(ThreadPoolExecutor(N))``,
N = ``BENCH_GRPC_BARE_THREADS``, default 1 like the replica's one handler
thread), no Serval process running, measured the same way. Each measures the HTTP GET no-op with wrk,
the gRPC unary no-op and the server stream of 100 empty messages (a sync
generator) with ``serval-bench grpc-load`` at c=1, 16 and 64; the frames
run also measures the same stream from an async generator and the HTTP
streaming no-op (100 one-byte chunks, bench/apps.py) with wrk.
The tables go to bench/GRPC_RESULTS.md (``BENCH_OUT`` to write elsewhere).
"""

import datetime
import os
import platform
import socket
import subprocess
import tempfile
import time

import harness as H

OUT = os.environ.get("BENCH_OUT", os.path.join(H.BENCH, "GRPC_RESULTS.md"))
#: Each path's cluster environment.
PATHS = (("grpcio", {"SERVAL_GRPC_FRAMES": "0"}), ("frames", {}))
STREAM_MESSAGES = 100
BARE_THREADS = int(os.environ.get("BENCH_GRPC_BARE_THREADS", "1"))


def check_streams(label: str, streams: dict, messages: int) -> None:
    """Every call of a stream cell carried the stream's messages."""
    for c, r in streams.items():
        per_call = r["messages_per_s"] / r["rps"] if r["rps"] else 0
        if round(per_call) != messages:
            raise RuntimeError(f"{label} stream c={c}: {per_call:.1f} messages a call, expected {messages}")


def measure(path: str, env: dict) -> dict:
    env = {
        "BENCH_HTTP_PORT": str(H.free_port()),
        "SERVAL_CONTROL_PORT": str(H.free_port()),
        "BENCH_DATA_DIR": tempfile.mkdtemp(prefix="serval-bench-data-"),
        "SERVAL_NUM_CPUS": "4",
        **env,
    }
    drv = H.Driver(f"serval-{path}", H.SERVAL_PY, "serval_driver.py", env)
    try:
        started = drv.call("start")
        out = {"http": {c: H.wrk(started["url"], c, label=f"{path} run: HTTP GET") for c in H.CONCURRENCIES}}
        grpc = drv.call("deploy_grpc")
        out["grpc"] = {c: H.grpc_load(grpc["address"], grpc["method"], c) for c in H.CONCURRENCIES}
        out["grpc_stream"] = {c: H.grpc_load(grpc["address"], grpc["stream_method"], c) for c in H.CONCURRENCIES}
        check_streams(path, out["grpc_stream"], grpc["stream_messages"])
        if path == "frames":
            out["grpc_async_stream"] = {c: H.grpc_load(grpc["address"], grpc["async_stream_method"], c)
                                        for c in H.CONCURRENCIES}
            check_streams("frames async", out["grpc_async_stream"], grpc["stream_messages"])
            got = drv.call("deploy_v2", app="stream")
            out["chunks"] = got["chunks"]
            out["http_stream"] = {c: H.wrk(got["url"], c, label=f"{path} run: HTTP stream")
                                  for c in H.CONCURRENCIES}
        drv.call("shutdown", timeout=120)
        return out
    finally:
        drv.close()


def measure_bare() -> dict:
    """The no-op Handler in a bare grpcio server (bench/grpc_noop.py), the
    same load."""
    port = H.free_port()
    log = open(os.path.join(H.LOG_DIR, "grpc-bare.log"), "w")
    proc = subprocess.Popen([H.SERVAL_PY, os.path.join(H.BENCH, "grpc_noop.py"), str(port), str(BARE_THREADS)],
                            cwd=H.BENCH, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the bare grpcio server exited ({proc.returncode}): see {log.name}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the bare grpcio server did not listen within 60 s")
                time.sleep(0.1)
        address = f"127.0.0.1:{port}"
        out = {"grpc": {c: H.grpc_load(address, "/bench.Noop/Call", c) for c in H.CONCURRENCIES},
               "grpc_stream": {c: H.grpc_load(address, "/bench.Noop/Stream", c) for c in H.CONCURRENCIES}}
        check_streams("bare grpcio", out["grpc_stream"], STREAM_MESSAGES)
        return out
    finally:
        proc.kill()
        proc.wait(timeout=30)
        log.close()


def cell(r: dict) -> str:
    return f"{r['rps']:,.0f} / {H.fmt(r['p50_ms'], 3)} / {H.fmt(r['p99_ms'], 3)}"


def stream_cell(r: dict) -> str:
    return f"{r['messages_per_s']:,.0f} / {H.fmt(r['p50_ms'], 3)} / {H.fmt(r['p99_ms'], 3)}"


def main():
    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    res = {path: measure(path, env) for path, env in PATHS}
    res["bare"] = measure_bare()
    load_after = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    md = ["# gRPC unary no-op and server stream through Serval", "",
          f"`bench/run grpc` (release build), {os.cpu_count()}-CPU {platform.machine()} machine, "
          f"{datetime.date.today().isoformat()}; load average {load_before} before, {load_after} after. "
          "One replica, one handler thread. Two clusters in one run: the proxy forwarding gRPC to the "
          "replica's grpcio server (grpcio, `SERVAL_GRPC_FRAMES=0`), then the default path, the proxy "
          "terminating every call and sending it on the replica's frame connection (frames); then the "
          "same no-op Handler in a bare grpcio Python server, no Serval running (bare: "
          f"`grpc.server(ThreadPoolExecutor({BARE_THREADS}))`, bench/grpc_noop.py). gRPC: `serval-bench "
          "grpc-load`, one HTTP/2 connection (through the proxy's HTTP port, or to the bare server); "
          "HTTP: wrk on the GET no-op "
          f"of the same cluster. {H.DURATION} s per cell after {H.WARMUP} s of warm-up (HTTP).", "",
          "| requests/s / p50 ms / p99 ms | HTTP GET (frames run) | gRPC bare grpcio | gRPC grpcio "
          "| gRPC frames | frames / HTTP | frames / grpcio | frames / bare |",
          "|---|---|---|---|---|---|---|---|"]
    for c in H.CONCURRENCIES:
        http, old, new = res["frames"]["http"][c], res["grpcio"]["grpc"][c], res["frames"]["grpc"][c]
        bare = res["bare"]["grpc"][c]
        md.append(f"| c={c} | {cell(http)} | {cell(bare)} | {cell(old)} | {cell(new)} | "
                  f"{new['rps'] / http['rps']:.2f}× | {new['rps'] / old['rps']:.2f}× "
                  f"| {new['rps'] / bare['rps']:.2f}× |")
    md += ["", "HTTP GET in the grpcio run, for comparison: " + ", ".join(
        f"c={c} {res['grpcio']['http'][c]['rps']:,.0f} req/s" for c in H.CONCURRENCIES) + ".", ""]
    chunks = res["frames"]["chunks"]
    md += ["## Server stream of 100 messages", "",
           f"The same clusters: `Stream` yields 100 empty messages (a sync generator); the HTTP streaming no-op "
           f"yields {chunks} one-byte chunks (an async generator in a StreamingResponse, wrk reading each "
           "body whole, in the frames run). Messages (chunks) per second, then p50 / p99 ms of a whole stream.", "",
           "| | HTTP stream chunks/s | gRPC bare grpcio messages/s | gRPC grpcio messages/s "
           "| gRPC frames messages/s | frames / HTTP | frames / grpcio | frames / bare |",
           "|---|---|---|---|---|---|---|---|"]
    for c in H.CONCURRENCIES:
        http = res["frames"]["http_stream"][c]
        old, new = res["grpcio"]["grpc_stream"][c], res["frames"]["grpc_stream"][c]
        bare = res["bare"]["grpc_stream"][c]
        http_chunks = http["rps"] * chunks
        md.append(f"| c={c} | {http_chunks:,.0f} / {H.fmt(http['p50_ms'], 3)} / {H.fmt(http['p99_ms'], 3)} "
                  f"| {stream_cell(bare)} | {stream_cell(old)} | {stream_cell(new)} "
                  f"| {new['messages_per_s'] / http_chunks:.2f}× "
                  f"| {new['messages_per_s'] / old['messages_per_s']:.2f}× "
                  f"| {new['messages_per_s'] / bare['messages_per_s']:.2f}× |")
    md += ["", "The same stream from an `async def` generator Handler method (`AsyncStream`; the replies it "
           "yields without suspending leave gathered, as the HTTP streaming no-op's chunks do), on frames only "
           "(a grpcio sync server runs no async generators):", "",
           "| | HTTP stream chunks/s | gRPC frames messages/s (async generator) | frames / HTTP |",
           "|---|---|---|---|"]
    for c in H.CONCURRENCIES:
        http = res["frames"]["http_stream"][c]
        new = res["frames"]["grpc_async_stream"][c]
        http_chunks = http["rps"] * chunks
        md.append(f"| c={c} | {http_chunks:,.0f} / {H.fmt(http['p50_ms'], 3)} / {H.fmt(http['p99_ms'], 3)} "
                  f"| {stream_cell(new)} | {new['messages_per_s'] / http_chunks:.2f}× |")
    md.append("")
    with open(OUT, "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
