"""Cortex 0.35's ``handler.server_side_batching`` and
``handler.threads_per_process`` in ``serval.cortex.realtime.RealtimeAPI``,
in a real cluster over real HTTP. Concurrent clients are threads sending
with ``requests``; batches are closed by size (with a batch_interval far
longer than the test) wherever the test counts what a batch held."""

from concurrent.futures import ThreadPoolExecutor

import requests

from serval import serve
from serval.cortex.realtime import RealtimeAPI
from conftest import wait_for
from test_cortex_handler import api_spec, replica_log, write_project

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
#: Long enough that a batch only closes by size while a test runs.
NEVER = 30.0
TIMEOUT = 90


def deploy(cluster, tmp_path, name: str, handler_code: str, **handler) -> str:
    """Deploys handler.py as the API ``name`` at /name, with ``handler``
    keys over the defaults and room for many requests in the replica (as
    the deploy code gives it from the API's config); returns its URL."""
    project = write_project(tmp_path / name, {"handler.py": handler_code})
    spec = api_spec(**handler)
    spec["name"], spec["endpoint"] = name, f"/{name}"
    serve.create_backend(name, RealtimeAPI, spec, project, config={"max_concurrent_queries": 64})
    serve.create_endpoint(name, backend=name, route=f"/{name}", methods=METHODS)
    return f"{cluster.url}/{name}"


def concurrently(fn, args: list) -> list:
    """``[fn(a) for a in args]``, all at once, one thread each."""
    with ThreadPoolExecutor(len(args)) as pool:
        return list(pool.map(fn, args))


# -- batches -----------------------------------------------------------------

DOUBLING_HANDLER = """
    class Handler:
        def __init__(self, config):
            self.sizes = []

        def handle_post(self, payload):
            self.sizes.append(len(payload))
            return [p * 2 for p in payload]

        def handle_get(self):
            return self.sizes
"""


def test_batches_close_by_size_or_by_interval(cluster, tmp_path):
    by_size = deploy(cluster, tmp_path, "bysize", DOUBLING_HANDLER,
                     server_side_batching={"max_batch_size": 4, "batch_interval": NEVER})
    by_interval = deploy(cluster, tmp_path, "byinterval", DOUBLING_HANDLER,
                         server_side_batching={"max_batch_size": 100, "batch_interval": 0.2})

    # 8 concurrent requests, batches of 4 that only close when full.
    responses = concurrently(lambda n: requests.post(by_size, json=n, timeout=TIMEOUT), list(range(1, 9)))
    assert [(r.status_code, r.json()) for r in responses] == [(200, 2 * n) for n in range(1, 9)]
    assert requests.get(by_size, timeout=TIMEOUT).json() == [4, 4]

    # Batches of up to 100: the interval closes them.
    responses = concurrently(lambda n: requests.post(by_interval, json=n, timeout=TIMEOUT), [10, 20, 30])
    assert [(r.status_code, r.json()) for r in responses] == [(200, 20), (200, 40), (200, 60)]
    sizes = requests.get(by_interval, timeout=TIMEOUT).json()
    assert sum(sizes) == 3 and all(1 <= s <= 3 for s in sizes), sizes


def test_lists_aligned_results_mapped_and_batches_on_the_thread_pool(cluster, tmp_path):
    url = deploy(cluster, tmp_path, "lists", """
        import threading

        from starlette.responses import JSONResponse

        class Handler:
            def __init__(self, config):
                pass

            def handle_post(self, headers, payload, query_params):
                types = [type(x).__name__ for x in (payload, query_params, headers)]
                thread = threading.current_thread().name
                results = []
                for p, q, h in zip(payload, query_params, headers):
                    if p["kind"] == "dict":
                        results.append({"payload": p, "q": q, "h": h["x-id"], "types": types,
                                        "n": len(payload), "thread": thread})
                    elif p["kind"] == "str":
                        results.append(f"text {q['i']} {h['x-id']}")
                    elif p["kind"] == "bytes":
                        results.append(bytes([int(q["i"])]) * 3)
                    else:
                        results.append(JSONResponse({"created": q["i"]}, status_code=201))
                return tuple(results)  # a tuple does as well as a list
    """, threads_per_process=2, server_side_batching={"max_batch_size": 4, "batch_interval": NEVER})

    def post(i):
        kind = ["dict", "str", "bytes", "response"][i]
        return requests.post(url, json={"kind": kind, "i": i}, params={"i": str(i)},
                             headers={"X-Id": f"id{i}"}, timeout=TIMEOUT)

    r0, r1, r2, r3 = concurrently(post, [0, 1, 2, 3])
    assert r0.status_code == 200 and r0.headers["content-type"] == "application/json"
    body = r0.json()
    assert body.pop("thread").startswith("lists-handler"), body
    assert body == {"payload": {"kind": "dict", "i": 0}, "q": {"i": "0"}, "h": "id0",
                    "types": ["list", "list", "list"], "n": 4}
    assert (r1.status_code, r1.headers["content-type"], r1.text) == (200, "text/plain; charset=utf-8", "text 1 id1")
    assert (r2.status_code, r2.headers["content-type"], r2.content) == (200, "application/octet-stream", b"\x02" * 3)
    assert (r3.status_code, r3.json()) == (201, {"created": "3"})


def test_a_failed_batch_answers_500_to_each_request_and_the_replica_keeps_serving(cluster, tmp_path):
    url = deploy(cluster, tmp_path, "failing", """
        class Handler:
            def __init__(self, config):
                self.sizes = []

            def handle_post(self, payload):
                self.sizes.append(len(payload))
                modes = {p["mode"] for p in payload}
                if "raise" in modes:
                    raise ValueError("cannot classify this batch")
                if "short" in modes:
                    return [p["n"] for p in payload][:-1]
                if "dict" in modes:
                    return {"n": 1}
                return [p["n"] + 1 for p in payload]

            def handle_get(self):
                return self.sizes
    """, server_side_batching={"max_batch_size": 2, "batch_interval": NEVER})

    def pair(mode):
        return concurrently(lambda n: requests.post(url, json={"mode": mode, "n": n}, timeout=TIMEOUT), [1, 2])

    # A malformed payload is answered 400 and never enters a batch.
    r = requests.post(url, data="{nope", headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]

    for mode, words in [
        ("short", "handle_post returned 1 results for a batch of 2 requests"),
        ("dict", "handle_post returned a dict for a batch of 2 requests"),
        ("raise", "ValueError: cannot classify this batch"),
    ]:
        for r in pair(mode):
            assert r.status_code == 500, (mode, r.text)
            assert r.headers["content-type"] == "application/json"
            assert words in r.json()["error"], (mode, r.json())
        if mode != "raise":
            assert "a list of 2 results" in r.json()["error"]

    assert [(r.status_code, r.json()) for r in pair("ok")] == [(200, 2), (200, 3)]
    assert requests.get(url, timeout=TIMEOUT).json() == [2, 2, 2, 2]
    log = wait_for(lambda: (lambda t: "cannot classify this batch" in t and t)(replica_log(cluster, "failing")),
                   what="the batch's error in the replica log")
    assert "handle_post failed for a batch of 2 requests" in log


# -- threads_per_process -----------------------------------------------------

THREADS_HANDLER = """
    import threading

    class Handler:
        def __init__(self, config):
            # Passed only by 4 requests running at the same time.
            self.barrier = threading.Barrier(4, timeout=60)
            self.callback_thread = None

        def handle_post(self, payload):
            self.barrier.wait()
            return {"n": payload, "thread": threading.current_thread().name}

        def handle_get(self):
            return {"thread": threading.current_thread().name, "callback_thread": self.callback_thread}

        async def handle_put(self):
            return {"thread": threading.current_thread().name}

        def handle_patch(self):
            def callback():
                self.callback_thread = threading.current_thread().name
            return "ok", callback
"""


def test_threads_per_process_runs_sync_methods_on_a_pool(cluster, tmp_path):
    pooled = deploy(cluster, tmp_path, "pooled", THREADS_HANDLER, threads_per_process=4)
    inline = deploy(cluster, tmp_path, "inline", THREADS_HANDLER)

    responses = concurrently(lambda n: requests.post(pooled, json=n, timeout=TIMEOUT), [1, 2, 3, 4])
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    assert [r.json()["n"] for r in responses] == [1, 2, 3, 4]
    threads = {r.json()["thread"] for r in responses}
    assert len(threads) == 4 and all(t.startswith("pooled-handler") for t in threads), threads

    # Sync methods on the pool, async ones on the event loop's thread,
    # callbacks as sync methods run.
    assert requests.get(pooled, timeout=TIMEOUT).json()["thread"].startswith("pooled-handler")
    assert not requests.put(pooled, timeout=TIMEOUT).json()["thread"].startswith("pooled-handler")
    assert requests.patch(pooled, timeout=TIMEOUT).text == "ok"
    callback_thread = wait_for(lambda: requests.get(pooled, timeout=TIMEOUT).json()["callback_thread"],
                               what="the callback's thread")
    assert callback_thread.startswith("pooled-handler"), callback_thread

    # threads_per_process 1 (the default): sync methods inline, on the same
    # thread as the async ones.
    r = requests.get(inline, timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.json() == {"thread": requests.put(inline, timeout=TIMEOUT).json()["thread"], "callback_thread": None}
    assert requests.patch(inline, timeout=TIMEOUT).text == "ok"
    assert wait_for(lambda: requests.get(inline, timeout=TIMEOUT).json()["callback_thread"],
                    what="the callback's thread") == r.json()["thread"]
