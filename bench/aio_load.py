"""Load that wrk cannot time, for bench/harness.py: streamed HTTP bodies
(time to first byte and chunks per second) and WebSocket round trips.

Both drive the server from one asyncio client in the harness's process:
N keep-alive connections (one per concurrent stream or session), each doing
one request or round trip after the other for ``warmup + duration`` seconds;
only those that start after the warm-up count. The client is Python: at
c=64 it, not the server, may be the limit, and it shares the cores with the
server; compare figures of the same run only.

``stream_load`` reads the HTTP/1.1 responses itself (chunked or with a
Content-Length), so the first body byte is timed when it arrives.
``websocket_load`` uses the ``websockets`` package (bench/.venv).
"""

import asyncio
import time

#: Seconds one response or round trip may take before its connection
#: counts as failed (and stops).
TIMEOUT_S = 30.0


async def _read_response(reader):
    """Reads one HTTP/1.1 response; returns (seconds to the first body
    byte from now, body bytes). The streaming no-op yields one byte per
    chunk, so its body bytes count the chunks the replica yielded, however
    the proxy's HTTP chunks grouped them on the wire."""
    start = time.perf_counter()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if status != 200:
        raise RuntimeError(f"status {status}")
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
            chunks += size
    else:
        length = int(headers.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        await reader.readexactly(length)
        first = time.perf_counter() - start
        chunks = length
    return first, chunks


def _summary(samples, counted, units, elapsed, errors):
    samples.sort()
    n = len(samples)
    return {
        "p50_ms": samples[n // 2] * 1e3 if n else None,
        "p99_ms": samples[min(n - 1, int(n * 0.99))] * 1e3 if n else None,
        "per_s": counted / elapsed,
        "units_per_s": units / elapsed,
        "count": counted,
        "errors": errors[0],
        "error": errors[1],
    }


async def _run(worker, concurrency, warmup, duration):
    samples, totals, errors = [], [0, 0], [0, None]
    t0 = time.perf_counter()
    warm_until, until = t0 + warmup, t0 + warmup + duration

    async def guarded():
        try:
            await worker(until, warm_until, samples, totals)
        except Exception as e:  # a failed connection stops; the others go on
            errors[0] += 1
            errors[1] = errors[1] or f"{type(e).__name__}: {e}"[:200]

    await asyncio.gather(*(guarded() for _ in range(concurrency)))
    return _summary(samples, totals[0], totals[1], max(1e-9, time.perf_counter() - warm_until), errors)


def stream_load(port, path, concurrency, warmup, duration):
    """GET ``path`` on 127.0.0.1:``port`` over ``concurrency`` connections:
    first-byte p50/p99 (ms), responses/s (``per_s``) and body bytes/s
    (``units_per_s``)."""
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()

    async def worker(until, warm_until, ttfb, totals):
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT_S)
        try:
            while (now := time.perf_counter()) < until:
                writer.write(request)
                first, chunks = await asyncio.wait_for(_read_response(reader), TIMEOUT_S)
                if now >= warm_until:
                    ttfb.append(first)
                    totals[0] += 1
                    totals[1] += chunks
        finally:
            writer.close()

    return asyncio.run(_run(worker, concurrency, warmup, duration))


def websocket_load(url, concurrency, warmup, duration, message="x"):
    """``concurrency`` WebSocket sessions to ``url`` (an echo), each sending
    ``message`` and awaiting its echo, one after the other: round trips/s
    (``per_s``) and round-trip p50/p99 (ms)."""
    from websockets.asyncio.client import connect

    async def worker(until, warm_until, rtts, totals):
        async with connect(url, open_timeout=TIMEOUT_S, close_timeout=5, compression=None) as ws:
            while (now := time.perf_counter()) < until:
                await ws.send(message)
                reply = await asyncio.wait_for(ws.recv(), TIMEOUT_S)
                if reply != message:
                    raise RuntimeError(f"echo {reply!r}, not {message!r}")
                if now >= warm_until:
                    rtts.append(time.perf_counter() - now)
                    totals[0] += 1
                    totals[1] += 1

    return asyncio.run(_run(worker, concurrency, warmup, duration))
