"""Streaming chat: a fake token generator served with the Ray Serve 2.x API,
its tokens streamed to HTTP clients (plain text and server-sent events) and
to handles as they are produced.

Run with `.venv/bin/python examples/streaming_chat.py` (it starts a local
head with its HTTP proxy on 127.0.0.1:8000, or SERVAL_HTTP_PORT, and stops
it at the end). With a cluster already running (SERVAL_ADDRESS set), it
deploys there and leaves the application running.

Try it by hand while it runs with `--keep`:

    curl -N 'http://127.0.0.1:8000/chat?prompt=tell+me+a+story'
    curl -N -H 'Accept: text/event-stream' 'http://127.0.0.1:8000/chat?prompt=hi'
"""

import asyncio
import os
import sys
import tempfile
import time
import urllib.request

from starlette.requests import Request
from starlette.responses import StreamingResponse

from serval import serve

WORDS = "the quick brown fox jumps over the lazy dog while serval streams every token".split()


@serve.deployment(ray_actor_options={"num_cpus": 0})
class FakeLLM:
    """Stands in for a language model: yields one token at a time."""

    async def generate(self, prompt: str, max_tokens: int = 12):
        for i in range(max_tokens):
            # A real model would compute here; the sleep stands for it.
            await asyncio.sleep(0.05)
            yield WORDS[(len(prompt) + i) % len(WORDS)]


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Chat:
    """The HTTP ingress: streams the model's tokens to the client as they
    come, as server-sent events when the client asks for them."""

    def __init__(self, llm):
        self.llm = llm

    async def __call__(self, request: Request) -> StreamingResponse:
        prompt = request.query_params.get("prompt", "hello")
        tokens = self.llm.options(stream=True).generate.remote(prompt)
        if "text/event-stream" in request.headers.get("accept", ""):
            async def events():
                async for token in tokens:
                    yield f"data: {token}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        async def text():
            async for token in tokens:
                yield token + " "

        return StreamingResponse(text(), media_type="text/plain")


app = Chat.bind(FakeLLM.bind())


def main():
    keep = "--keep" in sys.argv
    port = int(os.environ.get("SERVAL_HTTP_PORT", "8000"))
    started = False
    if not os.environ.get("SERVAL_ADDRESS"):
        data_dir = os.environ.get("SERVAL_DATA_DIR") or tempfile.mkdtemp(prefix="serval-chat-")
        serve.start(http_options={"port": port}, data_dir=data_dir)
        started = True
    try:
        serve.run(app, name="chat", route_prefix="/chat")
        url = f"http://127.0.0.1:{port}/chat?prompt=tell+me+a+story"

        # Over HTTP: each token is printed when it arrives, not at the end.
        t0 = time.monotonic()
        with urllib.request.urlopen(url) as r:
            print(f"GET /chat -> {r.status} {r.headers['content-type']}")
            while chunk := r.read1(1024):
                print(f"  +{time.monotonic() - t0:5.2f}s {chunk.decode()!r}")

        # Server-sent events.
        request = urllib.request.Request(url, headers={"Accept": "text/event-stream"})
        with urllib.request.urlopen(request) as r:
            print(f"GET /chat (SSE) -> {r.headers['content-type']}")
            for line in r:
                if line.strip():
                    print("  ", line.decode().strip())

        # Through a handle, from this driver.
        llm = serve.get_deployment_handle("FakeLLM", "chat")
        print("handle:", " ".join(llm.options(stream=True).generate.remote("hi", max_tokens=5)))

        if keep:
            print("serving on", url, "- Ctrl-C to stop")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if started:
            serve.shutdown()


if __name__ == "__main__":
    main()
