"""Streaming responses (issue 23, part 4): time to first byte and chunks per
second of a no-op async generator of 100 chunks over HTTP, at c=1 and
c=64, beside a plain (unary) request's latency on the same cluster. Not
run by the tests; Ray Serve is not run here.

Starts a Serval head on free ports in a temp data dir, deploys both with
the Ray Serve 2.x API, and drives them from one asyncio client over
keep-alive HTTP/1.1 connections (one per concurrent stream), reading the
chunked bodies itself so the first byte is timed when it arrives. The
client is Python: at c=64 it, not the server, may be the limit; compare
runs on the same machine only.

    python bench/streaming.py [--chunks 100] [--duration 8] [--concurrency 1,64]

Run it with a release build (`bench/run stream` builds one into bench/.venv).
"""

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from onnx_batching import free_port, start_cluster, stop_cluster  # noqa: E402  (bench/ is not a package)

WARMUP_S = 2.0


def deploy(chunks: int) -> None:
    from serval import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100)
    class NoopStream:
        async def __call__(self, request):
            for _ in range(chunks):
                yield b"x"

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100)
    class Noop:
        async def __call__(self, request):
            return b"x"

    serve.run(NoopStream.bind(), name="stream", route_prefix="/stream")
    serve.run(Noop.bind(), name="plain", route_prefix="/plain")


async def read_response(reader):
    """Reads one HTTP/1.1 response; returns (seconds to the first body
    byte from now, body chunks seen). Chunked or Content-Length bodies."""
    start = time.perf_counter()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if status != 200:
        raise RuntimeError(f"status {status}: {head!r}")
    headers = head.lower()
    first = None
    chunks = 0
    if b"transfer-encoding: chunked" in headers:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            await reader.readexactly(size + 2)
            if first is None:
                first = time.perf_counter() - start
            chunks += 1
    else:
        length = int(headers.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        await reader.readexactly(length)
        first = time.perf_counter() - start
        chunks = 1
    return first, chunks


async def worker(port: int, path: str, until: float, warm_until: float, ttfb: list, totals: list):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    try:
        while True:
            now = time.perf_counter()
            if now >= until:
                return
            writer.write(request)
            first, chunks = await read_response(reader)
            if now >= warm_until:
                ttfb.append(first)
                totals[0] += 1
                totals[1] += chunks
    finally:
        writer.close()


async def measure(port: int, path: str, concurrency: int, duration: float):
    ttfb: list = []
    totals = [0, 0]
    t0 = time.perf_counter()
    warm_until, until = t0 + WARMUP_S, t0 + WARMUP_S + duration
    await asyncio.gather(*(worker(port, path, until, warm_until, ttfb, totals) for _ in range(concurrency)))
    elapsed = time.perf_counter() - warm_until
    ttfb.sort()
    return {
        "p50_ms": statistics.median(ttfb) * 1e3,
        "p99_ms": ttfb[min(len(ttfb) - 1, int(len(ttfb) * 0.99))] * 1e3,
        "per_s": totals[0] / elapsed,
        "chunks_per_s": totals[1] / elapsed,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, default=100)
    p.add_argument("--duration", type=float, default=8.0, help="seconds per measurement (after a 2 s warm-up)")
    p.add_argument("--concurrency", default="1,64")
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]

    data_dir = tempfile.mkdtemp(prefix="sv-", dir="/tmp")
    http_port = free_port()
    rows = []
    try:
        start_cluster(data_dir, http_port)
        deploy(args.chunks)
        for c in levels:
            plain = asyncio.run(measure(http_port, "/plain", c, args.duration))
            stream = asyncio.run(measure(http_port, "/stream", c, args.duration))
            rows.append((c, plain, stream))
    finally:
        stop_cluster(data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)

    print(f"\nStreaming: a no-op async generator of {args.chunks} chunks over HTTP, {os.cpu_count()} cores\n")
    print("| c | plain p50 | stream first byte p50 | first byte p99 | streams/s | chunks/s |")
    print("|---|---|---|---|---|---|")
    for c, plain, stream in rows:
        print(f"| {c} | {plain['p50_ms']:.3f} ms | {stream['p50_ms']:.3f} ms | {stream['p99_ms']:.3f} ms "
              f"| {stream['per_s']:,.0f} | {stream['chunks_per_s']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
