"""What happens inside a replica (issue 4, items 1, 2 and 4): async methods
run concurrently up to max_concurrent_queries while sync ones run one at a
time, Ray Serve 1.x defaults for max_concurrent_queries, @serve.accept_batch
batching, reconfigure(user_config) in place, and backpressure (503 with
Retry-After over HTTP, a clear error from handles) beyond capacity + queue."""

import asyncio
import os
import tempfile
import threading
import time

import pytest
import requests

from serval import BackendError, ServeError, ServeRequest, serve
from test_locations import wait_until


def _get(url, **params):
    return requests.get(url, params=params, timeout=60)


def _concurrently(calls):
    """Runs each zero-argument callable on its own thread; their results in order."""
    results = [None] * len(calls)

    def run(i, call):
        try:
            results[i] = call()
        except Exception as e:  # reported to the test, not lost in a thread
            results[i] = e

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a request never finished"
    return results


# -- concurrency ----------------------------------------------------------


class Peak:
    """Records how many requests run at once. Each request holds its slot
    until `limit` requests have been in together (or 5 s), then a little
    longer, so requests beyond the limit would pile in if let through."""

    def __init__(self, limit):
        self.limit = limit
        self.current = 0
        self.peak = 0

    async def __call__(self, request):
        self.current += 1
        self.peak = max(self.peak, self.current)
        try:
            deadline = time.monotonic() + 5
            while self.peak < self.limit and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)
        finally:
            self.current -= 1
        return "ok"

    def stats(self):
        return {"peak": self.peak}


def test_async_methods_run_concurrently_up_to_max_concurrent_queries(cluster):
    limit = 4
    serve.create_backend("peak", Peak, limit, config={"max_concurrent_queries": limit})
    serve.create_endpoint("peak", backend="peak", route="/peak")
    handle = serve.get_handle("peak")
    # Two routers (the proxy and this handle) each send up to `limit`: only
    # the replica itself can keep the total at `limit`.
    n = 6 * limit
    calls = [lambda: _get(f"{cluster.url}/peak").text for _ in range(n // 2)]
    calls += [lambda: handle.remote().result(timeout=60) for _ in range(n // 2)]
    results = _concurrently(calls)
    assert [r for r in results if r != "ok"] == [], results
    peak = handle.options(method_name="stats").remote().result(timeout=30)["peak"]
    assert 1 < peak <= limit, peak


class Blocking:
    def __init__(self):
        self.current = 0
        self.peak = 0
        self.calls = 0

    def __call__(self, request):
        self.current += 1
        self.peak = max(self.peak, self.current)
        self.calls += 1
        time.sleep(0.01)  # a blocking backend: slow, and never re-entered
        self.current -= 1
        return "ok"

    def stats(self):
        return {"peak": self.peak, "calls": self.calls}


def test_sync_methods_never_run_two_at_once(cluster):
    serve.create_backend("blocking", Blocking)
    serve.create_endpoint("blocking", backend="blocking", route="/blocking")
    assert serve.get_backend_config("blocking")["max_concurrent_queries"] == 8
    handle = serve.get_handle("blocking")
    calls = [lambda: _get(f"{cluster.url}/blocking").text for _ in range(12)]
    calls += [lambda: handle.remote().result(timeout=60) for _ in range(12)]
    results = _concurrently(calls)
    assert results == ["ok"] * 24, results
    stats = handle.options(method_name="stats").remote().result(timeout=30)
    assert stats == {"peak": 1, "calls": 24}


# -- defaults ---------------------------------------------------------------


def blocking_function(request):
    return "blocking"


async def async_function(request):
    return "async"


class AsyncModel:
    async def __call__(self, request):
        return "async"


class BatchModel:
    @serve.accept_batch
    def __call__(self, requests):
        return ["batch"] * len(requests)


def test_max_concurrent_queries_defaults_as_in_ray_serve_1(cluster):
    serve.create_backend("blocking-fn", blocking_function)
    serve.create_backend("async-fn", async_function)
    serve.create_backend("async-class", AsyncModel)
    serve.create_backend("batched", BatchModel, config={"max_batch_size": 5})
    serve.create_backend("explicit", AsyncModel, config={"max_concurrent_queries": 3})
    assert serve.get_backend_config("blocking-fn")["max_concurrent_queries"] == 8
    assert serve.get_backend_config("async-fn")["max_concurrent_queries"] == 100
    assert serve.get_backend_config("async-class")["max_concurrent_queries"] == 100
    assert serve.get_backend_config("batched")["max_concurrent_queries"] == 10
    assert serve.get_backend_config("explicit")["max_concurrent_queries"] == 3
    listed = serve.list_backends()
    assert {name: c["max_concurrent_queries"] for name, c in listed.items()} == {
        "blocking-fn": 8, "async-fn": 100, "async-class": 100, "batched": 10, "explicit": 3,
    }
    assert listed["batched"]["max_batch_size"] == 5


# -- batching ---------------------------------------------------------------


def _answer(request):
    """What a batch method answers for one request: its number times 10."""
    if isinstance(request, ServeRequest):
        i = request.data
    else:
        i = int(request.query_params["i"])
    return {"i": i * 10}


class SyncBatcher:
    def __init__(self):
        self.sizes = []

    @serve.accept_batch
    def __call__(self, requests):
        self.sizes.append(len(requests))
        return [dict(_answer(r), batch=len(requests)) for r in requests]

    def batch_sizes(self):
        return self.sizes


class AsyncBatcher:
    def __init__(self):
        self.sizes = []

    @serve.accept_batch
    async def __call__(self, requests):
        self.sizes.append(len(requests))
        await asyncio.sleep(0)
        return [dict(_answer(r), batch=len(requests)) for r in requests]

    def batch_sizes(self):
        return self.sizes


@pytest.mark.parametrize("model", [SyncBatcher, AsyncBatcher], ids=["sync", "async"])
def test_batches_under_concurrent_load(cluster, model):
    size = 4
    serve.create_backend("batcher", model, config={"max_batch_size": size, "batch_wait_timeout": 1.0})
    serve.create_endpoint("batcher", backend="batcher", route="/batcher")
    handle = serve.get_handle("batcher")
    calls = [lambda i=i: _get(f"{cluster.url}/batcher", i=i).json() for i in range(12)]
    calls += [lambda i=i: handle.remote(i).result(timeout=60) for i in range(12, 24)]
    results = _concurrently(calls)
    # Every caller gets its own answer.
    assert [r["i"] for r in results] == [i * 10 for i in range(24)], results
    sizes = handle.options(method_name="batch_sizes").remote().result(timeout=30)
    assert sum(sizes) == 24, sizes
    assert max(sizes) > 1, f"no batching happened: {sizes}"
    assert all(1 <= s <= size for s in sizes), sizes


@pytest.mark.parametrize("model", [SyncBatcher, AsyncBatcher], ids=["sync", "async"])
def test_a_lone_request_goes_out_as_a_batch_of_one_after_the_wait(cluster, model):
    wait = 0.3
    serve.create_backend("trickle", model, config={"max_batch_size": 8, "batch_wait_timeout": wait})
    serve.create_endpoint("trickle", backend="trickle", route="/trickle")
    handle = serve.get_handle("trickle")
    for i in range(3):
        started = time.monotonic()
        assert handle.remote(i).result(timeout=30) == {"i": i * 10, "batch": 1}
        # It waited for company (the timer cannot fire early), then went alone.
        assert time.monotonic() - started >= wait * 0.8
    assert _get(f"{cluster.url}/trickle", i=7).json() == {"i": 70, "batch": 1}
    assert handle.options(method_name="batch_sizes").remote().result(timeout=30) == [1, 1, 1, 1]


class ReconfiguredBatcher(SyncBatcher):
    def __init__(self):
        super().__init__()
        self.version = None

    def reconfigure(self, user_config):
        self.version = user_config["version"]

    def current_version(self):
        return self.version


def test_a_new_max_batch_size_reaches_the_running_batcher(cluster):
    # A long wait: a batch goes out when it is full, never on the timer.
    serve.create_backend("grow", ReconfiguredBatcher, config={
        "max_batch_size": 2, "batch_wait_timeout": 60.0, "max_concurrent_queries": 16,
        "user_config": {"version": 1}})
    serve.create_endpoint("grow", backend="grow")
    handle = serve.get_handle("grow")
    assert [f.result(timeout=60)["batch"] for f in [handle.remote(i) for i in range(2)]] == [2, 2]
    # Applied in place (no new replica): limits first, then reconfigure().
    serve.update_backend_config("grow", {"max_batch_size": 4, "user_config": {"version": 2}})
    wait_until("the replica to apply the new config",
               lambda: handle.options(method_name="current_version").remote().result(timeout=30) == 2)
    assert [f.result(timeout=60)["batch"] for f in [handle.remote(i) for i in range(4)]] == [4, 4, 4, 4]
    assert handle.options(method_name="batch_sizes").remote().result(timeout=30) == [2, 4]


class WrongLength:
    @serve.accept_batch
    def __call__(self, requests):
        return [0] * (len(requests) + 1)


def test_a_batch_result_of_the_wrong_length_fails_every_caller(cluster):
    serve.create_backend("wrong", WrongLength, config={"max_batch_size": 2, "batch_wait_timeout": 0.5})
    serve.create_endpoint("wrong", backend="wrong", route="/wrong")
    handle = serve.get_handle("wrong")
    futures = [handle.remote(i) for i in range(2)]
    for f in futures:
        with pytest.raises(BackendError, match="must return a list with one result per request") as e:
            f.result(timeout=30)
        assert "accept_batch method '__call__' of backend 'wrong' returned" in str(e.value)
    r = _get(f"{cluster.url}/wrong", i=1)
    assert r.status_code == 500
    assert "returned 2 results for a batch of 1 requests" in r.json()["error"]


class Undecorated:
    def __call__(self, requests):
        return requests


def test_batching_config_and_decorator_must_agree(cluster):
    with pytest.raises(ValueError, match="accept_batch"):
        serve.create_backend("undecorated", Undecorated, config={"max_batch_size": 4})
    with pytest.raises(ValueError, match="max_batch_size"):
        serve.create_backend("no-size", SyncBatcher)
    assert serve.list_backends() == {}


# -- reconfigure ------------------------------------------------------------


class Configurable:
    def __init__(self):
        self.config = None
        self.reconfigures = 0

    def reconfigure(self, config):
        if config == "bad":
            raise ValueError("bad config rejected")
        # A slow reconfigure: update_backend_config still returns once it is done.
        time.sleep(config.get("takes_s", 0))
        self.config = config
        self.reconfigures += 1

    def __call__(self, request):
        return {"pid": os.getpid(), "config": self.config, "reconfigures": self.reconfigures}


def _running_pids(backend):
    return sorted(r["pid"] for r in serve.status()["replicas"]
                  if r["backend"] == backend and r["state"] == "running")


def test_update_backend_config_reconfigures_every_replica_in_place(cluster):
    serve.create_backend("conf", Configurable, config={"num_replicas": 2, "user_config": {"v": 1}})
    serve.create_endpoint("conf", backend="conf", route="/conf")
    pids = wait_until("both replicas", lambda: (lambda p: p if len(p) == 2 else None)(_running_pids("conf")))
    handle = serve.get_handle("conf")

    v2 = {"v": 2, "takes_s": 1}
    serve.update_backend_config("conf", {"user_config": v2})
    assert serve.get_backend_config("conf")["user_config"] == v2
    # Done when the call returns: no replica answers with v1 any more.
    seen = {}

    def every_replica_has_v2():
        for _ in range(10):
            answer = handle.remote().result(timeout=30)
            assert answer["config"] == v2, answer
            seen[answer["pid"]] = answer
        return sorted(seen) == pids

    wait_until("every replica to run with user_config v2", every_replica_has_v2, timeout=60)
    # In place: the same processes, reconfigured once at start and once now.
    assert _running_pids("conf") == pids
    assert all(a["reconfigures"] == 2 for a in seen.values()), seen

    # A reconfigure that raises is reported with its error; the replicas
    # keep serving with the config they had. The call returns once every
    # replica has tried it.
    serve.update_backend_config("conf", {"user_config": "bad"})
    replicas = [r for r in serve.status()["replicas"] if r["backend"] == "conf"]
    assert all("bad config rejected" in r.get("error", "") for r in replicas), replicas
    assert _running_pids("conf") == pids
    assert handle.remote().result(timeout=30)["config"] == v2


# -- backpressure -----------------------------------------------------------


class Gate:
    """Holds every request until the gate file exists (a deadline keeps a
    failing test from hanging)."""

    def __init__(self, path):
        self.path = path

    async def __call__(self, request):
        deadline = time.monotonic() + 60
        while not os.path.exists(self.path) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return "done"


@pytest.fixture
def small_http_queue(monkeypatch):
    # The head reads it at start: its proxy queues 2 requests per backend.
    monkeypatch.setenv("SERVAL_HTTP_QUEUE_CAPACITY", "2")


def test_http_requests_beyond_capacity_and_queue_get_503_with_retry_after(small_http_queue, cluster):
    gate = os.path.join(tempfile.mkdtemp(prefix="sv-gate-"), "open")
    serve.create_backend("gate", Gate, gate, config={"max_concurrent_queries": 1})
    serve.create_endpoint("gate", backend="gate", route="/gate")
    responses = []
    lock = threading.Lock()

    def call():
        r = requests.get(f"{cluster.url}/gate", timeout=120)
        with lock:
            responses.append(r)

    threads = [threading.Thread(target=call) for _ in range(6)]
    try:
        for t in threads:
            t.start()
        # 1 in flight + 2 queued are held at the gate; the other 3 are refused at once.
        wait_until("the refused requests", lambda: len(responses) >= 3, timeout=60)
        with lock:
            refused = list(responses)
        assert [r.status_code for r in refused] == [503] * 3, [r.text for r in refused]
        assert all(r.headers.get("Retry-After") for r in refused)
        assert all("overloaded" in r.json()["error"] for r in refused)
    finally:
        open(gate, "w").close()
        for t in threads:
            t.join(120)
    assert sorted(r.status_code for r in responses) == [200] * 3 + [503] * 3


@pytest.fixture
def small_handle_queue(monkeypatch):
    # Read when the driver's client is created: its handles queue 5 calls per backend.
    monkeypatch.setenv("SERVAL_HANDLE_QUEUE_CAPACITY", "5")


def test_handle_calls_beyond_capacity_and_queue_raise_a_clear_error(small_handle_queue, cluster):
    gate = os.path.join(tempfile.mkdtemp(prefix="sv-gate-"), "open")
    serve.create_backend("gate", Gate, gate, config={"max_concurrent_queries": 1})
    serve.create_endpoint("gate", backend="gate")
    handle = serve.get_handle("gate", sync=False)
    capacity = 1 + 5
    extra = 3

    async def load():
        tasks = [asyncio.ensure_future(handle.remote()) for _ in range(capacity + extra)]
        try:
            deadline = time.monotonic() + 60
            while sum(t.done() for t in tasks) < extra:
                assert time.monotonic() < deadline, "no call was refused"
                await asyncio.sleep(0.02)
            refused = [t for t in tasks if t.done()]
            assert len(refused) == extra
            for t in refused:
                with pytest.raises(ServeError, match="overloaded"):
                    t.result()
        finally:
            open(gate, "w").close()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 120)
        return results

    results = asyncio.run(load())
    assert sum(r == "done" for r in results) == capacity


class Noop:
    def __call__(self, request):
        return "ok"


def test_a_burst_of_handle_calls_far_beyond_capacity_waits_and_completes(cluster):
    # One call runs at a time on the replica; the other 2,999 wait in the
    # handle's queue (as in Ray Serve) instead of failing as overloaded.
    serve.create_backend("one_at_a_time", Noop, config={"max_concurrent_queries": 1})
    serve.create_endpoint("one_at_a_time", backend="one_at_a_time")
    handle = serve.get_handle("one_at_a_time")
    futures = [handle.remote() for _ in range(3000)]
    assert [f.result(timeout=120) for f in futures] == ["ok"] * 3000


def test_a_sync_replica_keeps_answering_under_concurrent_load(cluster):
    """Many requests at once, repeatedly: a lost wake-up would leave the
    replica's loop asleep and every later request hanging."""
    import concurrent.futures

    import requests as http

    serve.create_backend("noop", Noop)
    serve.create_endpoint("noop", backend="noop", route="/noop")
    handle = serve.get_handle("noop")
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        for _ in range(30):
            futures = [pool.submit(http.get, f"{cluster.url}/noop", timeout=30) for _ in range(16)]
            assert [f.result().text for f in futures] == ["ok"] * 16
            refs = [handle.remote() for _ in range(16)]
            assert [r.result(timeout=30) for r in refs] == ["ok"] * 16


class Echo:
    def __call__(self, request):
        return {"i": int(request.query_params["i"])}

    def other(self, i):
        return i


def test_every_caller_gets_its_own_reply_whatever_the_reply_batch(cluster):
    """A drain sends replies in groups of max_concurrent_queries // 8: at 64
    in eights, so a group can hold replies of different callers and a last
    group stays partly filled until the drain ends. Each caller must still
    get its own answer, over HTTP and through a handle, at 64 and, after a
    reconfigure, at 8 (each reply on its own)."""
    import concurrent.futures

    import requests as http

    serve.create_backend("echo", Echo, config={"max_concurrent_queries": 64})
    serve.create_endpoint("echo", backend="echo", route="/echo")
    handle = serve.get_handle("echo").options(method_name="other")
    with concurrent.futures.ThreadPoolExecutor(max_workers=24) as pool:
        for limit in (64, 8):
            serve.update_backend_config("echo", {"max_concurrent_queries": limit})
            for round_ in range(5):
                ids = range(round_ * 100, round_ * 100 + 48)
                futures = [pool.submit(http.get, f"{cluster.url}/echo", params={"i": i}, timeout=30) for i in ids]
                refs = [handle.remote(i) for i in ids]
                assert [f.result().json()["i"] for f in futures] == list(ids)
                assert [r.result(timeout=30) for r in refs] == list(ids)
            # A lone request: its group is never full, the drain's end sends it.
            assert http.get(f"{cluster.url}/echo", params={"i": 7}, timeout=30).json() == {"i": 7}


@pytest.fixture
def long_poll(monkeypatch):
    # Replicas poll for the next request up to a minute after each drain,
    # so whatever waited for a poll to end would miss its 30 s timeout.
    monkeypatch.setenv("SERVAL_REPLICA_POLL_US", "60000000")


async def answer_from_a_task(request):
    """Answers with what another task on the replica's loop returns."""
    return await asyncio.get_running_loop().create_task(asyncio.sleep(0, result="from a task"))


def test_a_polling_worker_holds_back_no_reply_and_no_task(long_poll, cluster):
    """After a drain the worker polls for the next request before it sleeps;
    replies of a part-filled group go out first, and it does not poll while
    tasks are ready on its loop."""
    serve.create_backend("echo", Echo, config={"max_concurrent_queries": 64})
    serve.create_endpoint("echo", backend="echo", route="/echo")
    serve.create_backend("tasks", answer_from_a_task)
    serve.create_endpoint("tasks", backend="tasks", route="/tasks")
    handle = serve.get_handle("tasks")
    for i in range(3):
        assert requests.get(f"{cluster.url}/echo", params={"i": i}, timeout=30).json() == {"i": i}
        r = requests.get(f"{cluster.url}/tasks", timeout=30)
        assert (r.status_code, r.text) == (200, "from a task")
        assert handle.remote().result(timeout=30) == "from a task"


@pytest.fixture
def bad_poll(monkeypatch):
    monkeypatch.setenv("SERVAL_REPLICA_POLL_US", "a while")


def test_a_bad_poll_setting_fails_the_deploy_naming_the_variable(bad_poll, cluster):
    with pytest.raises(ServeError, match="SERVAL_REPLICA_POLL_US must be a whole number of microseconds"):
        serve.create_backend("echo", Echo)
