"""``bench/run grpc``: the gRPC unary no-op and a 100-message server
stream on both paths, and the HTTP no-op and streaming no-op, in one run,
with the release build bench/run made.

Two clusters one after the other, each started by the harness's Serval
driver with one no-op replica (one handler thread): the first with the
proxy forwarding gRPC to the replica's grpcio server, the second with
``SERVAL_GRPC_FRAMES=1`` (the proxy terminates unary and server-streaming
calls and sends them as frames). Each measures the HTTP GET no-op with wrk,
the gRPC unary no-op and the server stream of 100 empty messages with
``serval-bench grpc-load`` at c=1, 16 and 64; the frames run also measures
the HTTP streaming no-op (100 one-byte chunks, bench/apps.py) with wrk.
The tables go to bench/GRPC_RESULTS.md (``BENCH_OUT`` to write elsewhere).
"""

import datetime
import os
import platform
import tempfile

import harness as H

OUT = os.environ.get("BENCH_OUT", os.path.join(H.BENCH, "GRPC_RESULTS.md"))
PATHS = (("grpcio", "0"), ("frames", "1"))


def measure(path: str, frames: str) -> dict:
    env = {
        "BENCH_HTTP_PORT": str(H.free_port()),
        "SERVAL_CONTROL_PORT": str(H.free_port()),
        "BENCH_DATA_DIR": tempfile.mkdtemp(prefix="serval-bench-data-"),
        "SERVAL_NUM_CPUS": "4",
        "SERVAL_GRPC_FRAMES": frames,
    }
    drv = H.Driver(f"serval-{path}", H.SERVAL_PY, "serval_driver.py", env)
    try:
        started = drv.call("start")
        out = {"http": {c: H.wrk(started["url"], c, label=f"{path} run: HTTP GET") for c in H.CONCURRENCIES}}
        grpc = drv.call("deploy_grpc")
        out["grpc"] = {c: H.grpc_load(grpc["address"], grpc["method"], c) for c in H.CONCURRENCIES}
        out["grpc_stream"] = {c: H.grpc_load(grpc["address"], grpc["stream_method"], c) for c in H.CONCURRENCIES}
        for c, r in out["grpc_stream"].items():
            per_call = r["messages_per_s"] / r["rps"] if r["rps"] else 0
            if round(per_call) != grpc["stream_messages"]:
                raise RuntimeError(f"{path} stream c={c}: {per_call:.1f} messages a call, expected "
                                   f"{grpc['stream_messages']}")
        if path == "frames":
            got = drv.call("deploy_v2", app="stream")
            out["chunks"] = got["chunks"]
            out["http_stream"] = {c: H.wrk(got["url"], c, label=f"{path} run: HTTP stream")
                                  for c in H.CONCURRENCIES}
        drv.call("shutdown", timeout=120)
        return out
    finally:
        drv.close()


def cell(r: dict) -> str:
    return f"{r['rps']:,.0f} / {H.fmt(r['p50_ms'], 3)} / {H.fmt(r['p99_ms'], 3)}"


def stream_cell(r: dict) -> str:
    return f"{r['messages_per_s']:,.0f} / {H.fmt(r['p50_ms'], 3)} / {H.fmt(r['p99_ms'], 3)}"


def main():
    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    res = {path: measure(path, frames) for path, frames in PATHS}
    load_after = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    md = ["# gRPC unary no-op and server stream through Serval", "",
          f"`bench/run grpc` (release build), {os.cpu_count()}-CPU {platform.machine()} machine, "
          f"{datetime.date.today().isoformat()}; load average {load_before} before, {load_after} after. "
          "One replica, one handler thread. Two clusters in one run: the proxy forwarding gRPC to the "
          "replica's grpcio server (grpcio), then `SERVAL_GRPC_FRAMES=1`, the proxy terminating every "
          "call and sending it on the replica's frame connection (frames). gRPC: `serval-bench "
          "grpc-load`, one HTTP/2 connection through the proxy's HTTP port; HTTP: wrk on the GET no-op "
          f"of the same cluster. {H.DURATION} s per cell after {H.WARMUP} s of warm-up (HTTP).", "",
          "| requests/s / p50 ms / p99 ms | HTTP GET (frames run) | gRPC grpcio | gRPC frames "
          "| frames / HTTP | frames / grpcio |",
          "|---|---|---|---|---|---|"]
    for c in H.CONCURRENCIES:
        http, old, new = res["frames"]["http"][c], res["grpcio"]["grpc"][c], res["frames"]["grpc"][c]
        md.append(f"| c={c} | {cell(http)} | {cell(old)} | {cell(new)} | "
                  f"{new['rps'] / http['rps']:.2f}× | {new['rps'] / old['rps']:.2f}× |")
    md += ["", "HTTP GET in the grpcio run, for comparison: " + ", ".join(
        f"c={c} {res['grpcio']['http'][c]['rps']:,.0f} req/s" for c in H.CONCURRENCIES) + ".", ""]
    chunks = res["frames"]["chunks"]
    md += ["## Server stream of 100 messages", "",
           f"The same clusters: `Stream` yields 100 empty messages (a sync generator); the HTTP streaming no-op "
           f"yields {chunks} one-byte chunks (an async generator in a StreamingResponse, wrk reading each "
           "body whole, in the frames run). Messages (chunks) per second, then p50 / p99 ms of a whole stream.", "",
           "| | HTTP stream chunks/s | gRPC grpcio messages/s | gRPC frames messages/s | frames / HTTP "
           "| frames / grpcio |",
           "|---|---|---|---|---|---|"]
    for c in H.CONCURRENCIES:
        http = res["frames"]["http_stream"][c]
        old, new = res["grpcio"]["grpc_stream"][c], res["frames"]["grpc_stream"][c]
        http_chunks = http["rps"] * chunks
        md.append(f"| c={c} | {http_chunks:,.0f} / {H.fmt(http['p50_ms'], 3)} / {H.fmt(http['p99_ms'], 3)} "
                  f"| {stream_cell(old)} | {stream_cell(new)} | {new['messages_per_s'] / http_chunks:.2f}× "
                  f"| {new['messages_per_s'] / old['messages_per_s']:.2f}× |")
    md.append("")
    with open(OUT, "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
