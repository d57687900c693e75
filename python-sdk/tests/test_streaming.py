"""Streaming responses (issue 23, part 4) through Serval's public surfaces:
generator methods and Starlette ``StreamingResponse`` over HTTP (chunked,
server-sent events), ``handle.options(stream=True)`` generators (sync and
``async for`` inside a deployment), cancellation when the client goes away,
errors in the middle of a stream, and the replica slot a stream holds.

Progress is synchronised through files the generators wait for (never
through timing): a test reads a chunk, checks the generator is still
waiting for its gate, then opens the gate."""

import asyncio
import os
import subprocess
import sys
import tempfile
import time

import pytest
import requests
from starlette.responses import StreamingResponse

from conftest import Cluster, free_port, running_cluster
from test_metrics import samples, scrape, wait_for_metric
from serval import serve
from serval.handle import BackendError

CPU0 = {"num_cpus": 0}


@pytest.fixture(scope="module")
def shared():
    with pytest.MonkeyPatch.context() as mp:
        with running_cluster(mp) as c:
            yield c


def wait_file(path, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.01)


async def wait_gate(path):
    """In a replica: waits (up to a minute) for the test to create ``path``."""
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {path} never opened")
        await asyncio.sleep(0.01)


def touch(path):
    open(path, "w").close()


# -- deployments -------------------------------------------------------------

@serve.deployment(ray_actor_options=CPU0)
class Chat:
    """A fake token generator: HTTP streams, handle streams, errors."""

    async def __call__(self, request):
        gate = request.query_params["gate"]
        media = request.query_params.get("media", "text/plain")

        async def tokens():
            yield "data: hello\n\n" if media == "text/event-stream" else "hello "
            await wait_gate(gate)
            for word in ("streaming", "world"):
                yield f"data: {word}\n\n" if media == "text/event-stream" else word + " "

        return StreamingResponse(tokens(), media_type=media)

    async def tokens(self, n, gate=None):
        """A generator method, for handles."""
        for i in range(n):
            if gate is not None and i == 1:
                await wait_gate(gate)
            yield {"token": i}

    def sync_tokens(self, n):
        for i in range(n):
            yield f"t{i}"

    async def forever(self, marker):
        """Ticks until cancelled; says so in ``marker``."""
        try:
            yield "first"
            while True:
                await asyncio.sleep(0.02)
                yield "."
        finally:
            with open(marker, "w") as f:
                f.write("cancelled")

    async def broken(self, after):
        for i in range(after):
            yield f"ok{i}\n"
        raise ValueError("the model fell over")

    def plain(self):
        return "not a generator"

    async def counted(self, n):
        """Counts how far the generator was advanced."""
        for i in range(n):
            self.advanced = i + 1
            yield i

    def advanced_so_far(self):
        return getattr(self, "advanced", 0)


@serve.deployment(ray_actor_options=CPU0)
def words(request):
    """A plain (sync) generator function streams over HTTP, chunk by chunk."""
    gate = request.query_params["gate"]
    yield "one "
    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    yield "two"


@serve.deployment(ray_actor_options=CPU0)
class Relay:
    """Consumes another deployment's stream with ``async for``."""

    def __init__(self, chat):
        self.chat = chat

    async def __call__(self, request):
        n = int(request.query_params.get("n", "3"))
        out = []
        async for item in self.chat.options(stream=True).tokens.remote(n):
            out.append(item["token"])
        return {"tokens": out}

    async def relay(self, n):
        """Re-streams: a generator that yields what another one yields."""
        async for item in self.chat.options(stream=True).tokens.remote(n):
            yield item["token"] * 10


@serve.deployment(ray_actor_options=CPU0, max_ongoing_requests=1)
class Single:
    async def hold(self, gate):
        yield "open"
        await wait_gate(gate)
        yield "closed"

    def ping(self):
        return "pong"


@serve.deployment(ray_actor_options=CPU0)
class BatchedLLM:
    """@serve.batch on a generator: one list per step, an item per caller."""

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=60)
    async def generate(self, prompts):
        for step in range(3):
            yield [StopIteration if p == "short" and step == 1 else f"{p}{step}/{len(prompts)}" for p in prompts]


def fastapi_chat():
    """A FastAPI ingress that streams (built in a function: the test module
    must import without FastAPI routes at module level)."""
    from fastapi import FastAPI

    api = FastAPI()

    @serve.deployment(ray_actor_options=CPU0)
    @serve.ingress(api)
    class ApiChat:
        @api.get("/stream")
        async def stream(self, gate: str, marker: str = ""):
            async def tokens():
                try:
                    yield "data: one\n\n"
                    await wait_gate(gate)
                    yield "data: two\n\n"
                finally:
                    if marker:
                        touch(marker)

            return StreamingResponse(tokens(), media_type="text/event-stream")

        @api.get("/whole")
        def whole(self):
            return {"whole": True}

    return ApiChat


# -- tests -------------------------------------------------------------------

def test_http_chunks_arrive_as_the_generator_yields_them(shared, tmp_path):
    serve.run(Chat.bind(), name="chat", route_prefix="/chat")
    serve.run(words.bind(), name="words", route_prefix="/words")

    gate = str(tmp_path / "gate")
    with requests.get(f"{shared.url}/chat", params={"gate": gate}, stream=True, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        assert r.headers.get("transfer-encoding") == "chunked"
        chunks = r.iter_content(chunk_size=None)
        # The first chunk comes while the generator still waits for the gate.
        assert next(chunks) == b"hello "
        assert not os.path.exists(gate)
        touch(gate)
        assert b"".join(chunks) == b"streaming world "

    # Server-sent events keep their media type and framing. The stream
    # counts as one request in the proxy's metrics once it ends.
    def served():
        return sum(samples(scrape(shared.url), "serval_proxy_requests_total", endpoint="chat#Chat"))

    before = served()
    gate = str(tmp_path / "sse-gate")
    with requests.get(f"{shared.url}/chat", params={"gate": gate, "media": "text/event-stream"},
                      stream=True, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        assert next(lines) == b"data: hello"
        assert served() == before
        touch(gate)
        events = [line for line in lines if line]
        assert events == [b"data: streaming", b"data: world"]
    wait_for_metric(shared.url, "the stream's count",
                    lambda text: sum(samples(text, "serval_proxy_requests_total", endpoint="chat#Chat")) == before + 1)

    # A plain sync generator function streams too.
    gate = str(tmp_path / "words-gate")
    with requests.get(f"{shared.url}/words", params={"gate": gate}, stream=True, timeout=60) as r:
        chunks = r.iter_content(chunk_size=None)
        assert next(chunks) == b"one "
        touch(gate)
        assert b"".join(chunks) == b"two"
    serve.delete("words")


@serve.deployment(ray_actor_options=CPU0)
def burst(request):
    """Yields ``n`` chunks of ``size`` bytes without suspending in between
    (one task step), as a StreamingResponse or as a generator ``__call__``."""
    n = int(request.query_params["n"])
    size = int(request.query_params["size"])

    async def chunks():
        for i in range(n):
            yield bytes([ord("a") + i % 26]) * size

    if request.query_params.get("as") == "generator":
        return chunks()
    return StreamingResponse(chunks(), media_type="text/plain")


def raw_chunks(url, path):
    """GETs ``path`` over a raw HTTP/1.1 connection and returns the chunks of
    its chunked body as they were framed on the wire."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=60) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            got = s.recv(1 << 16)
            if not got:
                break
            data += got
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"transfer-encoding: chunked" in head.lower(), head
    chunks = []
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return chunks
        chunks.append(body[:size])
        body = body[size + 2:]


def test_a_burst_of_chunks_leaves_in_few_frames(shared):
    """A stream's first chunk leaves at once; the chunks a generator yields
    after it without suspending leave together when the replica's loop
    turns (the gate test above shows a chunk before a suspension leaves at
    once); a burst past the frame size still arrives whole, under the
    stream's window."""
    serve.run(burst.bind(), name="burst", route_prefix="/burst")
    for kind in ("response", "generator"):
        chunks = raw_chunks(shared.url, f"/burst?n=100&size=1&as={kind}")
        assert b"".join(chunks) == bytes(ord("a") + i % 26 for i in range(100))
        assert chunks[0] == b"a", f"{kind}: the first chunk waited for its burst ({chunks[0]!r})"
        assert len(chunks) < 10, f"{kind}: 100 one-byte chunks of one burst came as {len(chunks)} frames"

        # 40 chunks of 100 kB: 4 MB in one burst, more than the window's
        # frames could hold at one chunk per frame.
        chunks = raw_chunks(shared.url, f"/burst?n=40&size=100000&as={kind}")
        assert b"".join(chunks) == b"".join(bytes([ord("a") + i % 26]) * 100000 for i in range(40))
    serve.delete("burst")


@serve.deployment(ray_actor_options=CPU0)
class Hogs:
    """Streams whose bodies never suspend after their first chunk: each
    blocks the replica's loop until its gate opens (as a generator that
    yields without awaiting holds it for its whole body). The first two
    streams start together: the second arrival releases the first. A
    request without a gate is a plain one."""

    def __init__(self):
        self.arrived = 0
        self.both = asyncio.Event()

    def __call__(self, request):
        gate = request.query_params.get("gate")
        if gate is None:
            return "plain"

        async def body():
            self.arrived += 1
            if self.arrived == 2:
                self.both.set()
            await self.both.wait()
            yield b"first "
            while not os.path.exists(gate):
                time.sleep(0.005)
            yield b"rest"

        return StreamingResponse(body(), media_type="text/plain")


def test_new_requests_go_before_the_bodies_of_running_streams(shared, tmp_path):
    """A stream's first chunk does not wait for the whole body of every
    stream ahead of it, and a request that comes while a body runs is
    taken before the next body starts: a new request waits for at most one
    body (the time to first byte under many streams)."""
    from concurrent.futures import ThreadPoolExecutor

    serve.run(Hogs.bind(), name="hogs", route_prefix="/hogs")
    url = f"{shared.url}/hogs"
    gates = [str(tmp_path / "gate1"), str(tmp_path / "gate2")]
    # Headers come before the body starts: the first stream has arrived
    # (and waits for the second) when the second is sent.
    streams = [requests.get(url, params={"gate": g}, stream=True, timeout=60) for g in gates]
    chunks = [r.iter_content(chunk_size=None) for r in streams]
    try:
        # The second's body now blocks the loop until gate2; without the
        # stepping aside after a first chunk, the first's "first " would
        # wait for it.
        assert next(chunks[0]) == b"first "
        assert next(chunks[1]) == b"first "
        with ThreadPoolExecutor(1) as pool:
            plain = pool.submit(requests.get, url, timeout=60)
            wait_for_metric(shared.url, "the plain request at the replica", lambda text: sum(
                samples(text, "serval_replica_in_flight", backend="hogs#Hogs")) == 3)
            touch(gates[1])
            # The first stream's body is next; the plain request goes before it.
            answer = plain.result(timeout=60)
            assert (answer.status_code, answer.text) == (200, "plain")
        touch(gates[0])
        assert b"".join(chunks[0]) == b"rest"
        assert b"".join(chunks[1]) == b"rest"
    finally:
        for g in gates:
            touch(g)
        for r in streams:
            r.close()
        serve.delete("hogs")


def test_handle_streams_sync_and_async(shared, tmp_path):
    serve.run(Chat.bind(), name="chat", route_prefix="/chat")
    chat = serve.get_deployment_handle("Chat", "chat")

    gen = chat.options(stream=True).tokens.remote(3, str(tmp_path / "gate"))
    assert isinstance(gen, serve.DeploymentResponseGenerator)
    # The first item arrives before the generator got past its gate.
    assert next(gen) == {"token": 0}
    assert not os.path.exists(tmp_path / "gate")
    touch(tmp_path / "gate")
    assert list(gen) == [{"token": 1}, {"token": 2}]

    # Attribute access keeps the option; sync generator methods stream too.
    assert list(chat.options(stream=True).sync_tokens.remote(4)) == ["t0", "t1", "t2", "t3"]
    # A method that does not stream, called with stream=True.
    with pytest.raises(TypeError, match="not a generator"):
        list(chat.options(stream=True).plain.remote())
    # And a generator called without it, as Ray refuses it.
    with pytest.raises(TypeError, match="stream=True"):
        chat.tokens.remote(3).result(timeout_s=60)

    # From the driver's event loop: async for.
    async def consume():
        return [x["token"] async for x in chat.options(stream=True).tokens.remote(5)]

    assert asyncio.run(consume()) == [0, 1, 2, 3, 4]

    # Inside a deployment: one consumes another's stream with async for,
    # and re-streams it through its own generator.
    serve.run(Relay.bind(Chat.bind()), name="relay", route_prefix="/relay")
    assert requests.get(f"{shared.url}/relay?n=4", timeout=60).json() == {"tokens": [0, 1, 2, 3]}
    relay = serve.get_deployment_handle("Relay", "relay")
    assert list(relay.options(stream=True).relay.remote(3)) == [0, 10, 20]
    serve.delete("relay")


def test_a_slow_consumer_holds_the_generator_back(shared):
    """Backpressure: the replica runs at most a window of chunks ahead of
    what the consumer took, whatever the generator could produce."""
    from serval._host import STREAM_WINDOW

    serve.run(Chat.bind(), name="chat", route_prefix="/chat")
    chat = serve.get_deployment_handle("Chat", "chat")
    gen = chat.options(stream=True).counted.remote(1000)
    assert next(gen) == 0
    deadline = time.monotonic() + 60
    while chat.advanced_so_far.remote().result() < STREAM_WINDOW:
        assert time.monotonic() < deadline, "the generator never filled its window"
        time.sleep(0.01)
    # Filled, and held there: one item taken, a window in flight.
    assert chat.advanced_so_far.remote().result() == STREAM_WINDOW
    assert list(gen) == list(range(1, 1000))
    assert chat.advanced_so_far.remote().result() == 1000


def test_a_client_that_goes_away_cancels_the_generator(shared, tmp_path):
    serve.run(Chat.bind(), name="chat", route_prefix="/chat")
    chat = serve.get_deployment_handle("Chat", "chat")

    # A handle generator closed before its end.
    marker = str(tmp_path / "handle-cancelled")
    gen = chat.options(stream=True).forever.remote(marker)
    assert next(gen) == "first"
    gen.close()
    wait_file(marker)

    # A handle generator dropped (garbage-collected) before its end.
    marker = str(tmp_path / "dropped")
    gen = chat.options(stream=True).forever.remote(marker)
    assert next(gen) == "first"
    del gen
    wait_file(marker)

    # An HTTP client that disconnects mid-stream.
    serve.run(Ticker.bind(), name="ticker", route_prefix="/ticker")
    marker = str(tmp_path / "http-cancelled")
    r = requests.get(f"{shared.url}/ticker", params={"marker": marker}, stream=True, timeout=60)
    assert next(r.iter_content(chunk_size=None)).startswith(b"first")
    r.close()
    wait_file(marker)
    serve.delete("ticker")


@serve.deployment(ray_actor_options=CPU0)
class Ticker:
    async def __call__(self, request):
        marker = request.query_params["marker"]

        async def ticks():
            try:
                yield "first"
                # Quiet from here on: the proxy notices the disconnect
                # without a write failing.
                await asyncio.Event().wait()
            finally:
                with open(marker, "w") as f:
                    f.write("cancelled")

        return StreamingResponse(ticks(), media_type="text/plain")


def test_an_error_mid_stream_reaches_the_client(shared):
    serve.run(Chat.bind(), name="chat", route_prefix="/chat")
    chat = serve.get_deployment_handle("Chat", "chat")

    gen = chat.options(stream=True).broken.remote(2)
    assert next(gen) == "ok0\n"
    assert next(gen) == "ok1\n"
    with pytest.raises(ValueError, match="fell over") as e:
        next(gen)
    assert isinstance(e.value, BackendError)

    # Over HTTP the chunked body is cut short: no terminating chunk.
    serve.run(Breaker.bind(), name="breaker", route_prefix="/breaker")
    with requests.get(f"{shared.url}/breaker", stream=True, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines) == b"ok0"
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            list(lines)
    serve.delete("breaker")


@serve.deployment(ray_actor_options=CPU0)
def Breaker(request):
    yield "ok0\n"
    raise ValueError("the model fell over")


def test_an_open_stream_holds_its_replica_slot(shared, tmp_path):
    serve.run(Single.bind(), name="single", route_prefix="/single")
    single = serve.get_deployment_handle("Single", "single")
    gate = str(tmp_path / "gate")
    gen = single.options(stream=True).hold.remote(gate)
    assert next(gen) == "open"
    # max_ongoing_requests=1: a second call waits while the stream is open.
    ping = single.ping.remote()
    with pytest.raises(TimeoutError):
        ping.result(timeout_s=1)
    touch(gate)
    assert list(gen) == ["closed"]
    assert ping.result(timeout_s=60) == "pong"
    serve.delete("single")


def test_serve_batch_batches_streaming_generators(shared):
    serve.run(BatchedLLM.bind(), name="batched", route_prefix=None)
    llm = serve.get_deployment_handle("BatchedLLM", "batched").options(stream=True)
    # Both calls are sent before either is read: they make one batch of 2
    # (the batch waits up to a minute for its second call).
    long, short = llm.generate.remote("a"), llm.generate.remote("short")
    assert list(long) == ["a0/2", "a1/2", "a2/2"]
    # StopIteration in a caller's place ended that caller's stream.
    assert list(short) == ["short0/2"]
    serve.delete("batched")


def test_the_streaming_chat_example_runs():
    env = dict(os.environ)
    for var in ("SERVAL_ADDRESS", "SERVAL_TOKEN", "SERVAL_TOKEN_FILE"):
        env.pop(var, None)
    data_dir = tempfile.mkdtemp(prefix="sv-", dir="/tmp")
    env.update(SERVAL_DATA_DIR=data_dir, SERVAL_HTTP_PORT=str(free_port()), SERVAL_CONTROL_PORT=str(free_port()),
               SERVAL_PYTHON=sys.executable)
    example = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "streaming_chat.py")
    try:
        out = subprocess.run([sys.executable, example], env=env, capture_output=True, text=True, timeout=300)
    finally:
        Cluster(data_dir, 0, 0).kill()
    assert out.returncode == 0, out.stderr
    assert "GET /chat -> 200 text/plain" in out.stdout
    assert out.stdout.count("s '") >= 12  # one line per token as it arrived
    assert "data: [DONE]" in out.stdout and "GET /chat (SSE) -> text/event-stream" in out.stdout
    handle_line = [line for line in out.stdout.splitlines() if line.startswith("handle: ")]
    assert len(handle_line) == 1 and len(handle_line[0].split()) == 6, out.stdout


def test_a_fastapi_ingress_streams_its_streaming_responses(shared, tmp_path):
    serve.run(fastapi_chat().bind(), name="api-chat", route_prefix="/api-chat")
    gate = str(tmp_path / "gate")
    with requests.get(f"{shared.url}/api-chat/stream", params={"gate": gate}, stream=True, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        assert next(lines) == b"data: one"
        assert not os.path.exists(gate)
        touch(gate)
        assert [line for line in lines if line] == [b"data: two"]
    # A whole response keeps its Content-Length.
    r = requests.get(f"{shared.url}/api-chat/whole", timeout=60)
    assert r.json() == {"whole": True} and r.headers["content-length"] == str(len(r.content))
    # A client that leaves cancels the app's generator.
    marker = str(tmp_path / "left")
    r = requests.get(f"{shared.url}/api-chat/stream", params={"gate": str(tmp_path / "never"), "marker": marker},
                     stream=True, timeout=60)
    assert next(r.iter_lines()) == b"data: one"
    r.close()
    wait_file(marker)
    serve.delete("api-chat")
