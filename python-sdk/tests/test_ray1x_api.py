"""Ray Serve 1.x drop-in behaviours (issue 20, part A), as Ray's own 1.x
tests of early 2021 checked them, through Serval's public API: the config
objects, ``@serve.batch``, the error classes, custom methods through
handles, implicit connect, awaiting handle results, and the smaller
differences (``python_methods``, CORS on ``/-/routes``).

One cluster serves the whole module (each test uses its own names)."""

import asyncio
import concurrent.futures
import glob
import os
import subprocess
import sys
import textwrap
import time

import pytest
import requests
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

import serval
from conftest import running_cluster, wait_for
from serval import serve
from serval.handle import BackendError


@pytest.fixture(scope="module")
def shared(request):
    # CORS as in Ray's middleware test, so /-/routes can be checked too.
    cors = [Middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"])]
    with pytest.MonkeyPatch.context() as mp:
        with running_cluster(mp, http_options={"middlewares": cors}) as c:
            yield c


# -- config objects (no cluster) --------------------------------------------


def test_backend_config_validates_fields_and_assignments():
    with pytest.raises(ValueError, match="unknown_key"):
        serve.BackendConfig(unknown_key=-1)
    serve.BackendConfig(num_replicas=1)
    assert serve.BackendConfig().retry_idempotent is True
    with pytest.raises(TypeError, match="retry_idempotent"):
        serve.BackendConfig(retry_idempotent=1)
    # A wrong type is both (Ray 1.0's TypeError, pydantic's ValueError).
    with pytest.raises(TypeError, match="num_replicas"):
        serve.BackendConfig(num_replicas="hello")
    with pytest.raises(ValueError, match="num_replicas"):
        serve.BackendConfig(num_replicas="hello")
    with pytest.raises(ValueError, match="num_replicas"):
        serve.BackendConfig(num_replicas=-1)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_batch_size"):
            serve.BackendConfig(max_batch_size=bad)
    with pytest.raises(TypeError):
        serve.BackendConfig(max_batch_size="hello")
    with pytest.raises(ValueError, match="max_concurrent_queries"):
        serve.BackendConfig(max_concurrent_queries=0)
    with pytest.raises(ValueError, match="experimental_graceful_shutdown_timeout_s"):
        serve.BackendConfig(experimental_graceful_shutdown_timeout_s=-1)

    # Ray 1.x's dynamic default for a blocking backend.
    assert serve.BackendConfig().max_concurrent_queries == 8
    assert serve.BackendConfig(max_batch_size=7).max_concurrent_queries == 14

    b = serve.BackendConfig(num_replicas=1, max_batch_size=1)
    b.num_replicas = 2
    assert b.num_replicas == 2 and b.max_batch_size == 1
    with pytest.raises(ValueError):
        b.num_replicas = "Hello"
    with pytest.raises(ValueError):
        b.num_replicas = -1
    assert b.num_replicas == 2
    # Also read as the dicts Serval returned before.
    assert b["num_replicas"] == 2 and dict(b)["max_batch_size"] == 1


def test_http_options_and_deployment_mode():
    serve.HTTPOptions()
    serve.HTTPOptions(host="8.8.8.8", middlewares=[object()])
    assert serve.HTTPOptions(host=None).location == "NoServer"
    assert serve.HTTPOptions(location=None).location == "NoServer"
    assert serve.HTTPOptions(location=serve.DeploymentMode.EveryNode).location == "EveryNode"
    with pytest.raises(ValueError, match="location"):
        serve.HTTPOptions(location="Everywhere")


def test_an_unusable_http_host_is_a_value_error(monkeypatch, tmp_path):
    monkeypatch.setenv("SERVAL_DATA_DIR", str(tmp_path))
    # A documentation address (TEST-NET-1) no machine has: nothing can bind it.
    with pytest.raises(ValueError, match="192.0.2.1"):
        serve.start(http_options={"host": "192.0.2.1"})
    with pytest.raises(ValueError, match="192.0.2.1"):
        serve.start(http_options=serve.HTTPOptions(host="192.0.2.1"))
    assert not os.path.exists(tmp_path / "cluster.json")


# -- @serve.batch (no cluster) ----------------------------------------------


def test_batch_decorator_validation():
    @serve.batch
    async def bare(requests):
        return requests

    @serve.batch(max_batch_size=10, batch_wait_timeout_s=1.5)
    async def with_options(requests):
        return requests

    class Methods:
        @serve.batch
        async def bare(self, requests):
            return requests

        @serve.batch(max_batch_size=1.0, batch_wait_timeout_s=0)
        async def float_int_size(self, requests):
            return requests

    with pytest.raises(TypeError, match="async def"):
        @serve.batch
        def not_async(requests):
            return requests
    with pytest.raises(TypeError, match="async def"):
        class NotAsync:
            @serve.batch(max_batch_size=2)
            def method(self, requests):
                return requests
    with pytest.raises(ValueError):
        serve.batch(max_batch_size=0)
    with pytest.raises(TypeError):
        serve.batch(max_batch_size=1.1)
    with pytest.raises(ValueError):
        serve.batch(batch_wait_timeout_s=-0.1)
    with pytest.raises(TypeError):
        serve.batch(batch_wait_timeout_s="a")


@pytest.mark.parametrize("use_class", [True, False])
def test_batch_collects_until_full_and_every_caller_gets_its_result_or_the_error(use_class):
    @serve.batch(max_batch_size=3, batch_wait_timeout_s=1000)
    async def collect(requests):
        if "raise" in requests:
            raise ZeroDivisionError("in the batch")
        return [(r, len(requests)) for r in requests]

    class Collect:
        @serve.batch(max_batch_size=3, batch_wait_timeout_s=1000)
        async def collect(self, requests):
            return await collect.__wrapped__(requests)

    call = Collect().collect if use_class else collect

    async def main():
        first = [asyncio.ensure_future(call(f"hi{i}")) for i in (1, 2)]
        done, _ = await asyncio.wait(first, timeout=0.1)
        assert not done  # two of three: the batch waits (timeout 1000 s)
        third = asyncio.ensure_future(call("hi3"))
        assert await asyncio.wait_for(asyncio.gather(*first, third), 60) == [
            ("hi1", 3), ("hi2", 3), ("hi3", 3)]
        failing = [asyncio.ensure_future(call(x)) for x in ("a", "raise", "b")]
        results = await asyncio.wait_for(asyncio.gather(*failing, return_exceptions=True), 60)
        assert all(isinstance(r, ZeroDivisionError) for r in results)

    asyncio.run(main())


def test_batches_run_one_at_a_time_and_bind_args_and_kwargs():
    sizes = []

    class Model:
        def __init__(self):
            self.gate = None

        @serve.batch(max_batch_size=4, batch_wait_timeout_s=0)
        async def pairs(self, key1, key2):
            sizes.append(len(key1))
            await self.gate.wait()
            return list(zip(key1, key2))

    model = Model()

    async def main():
        model.gate = asyncio.Event()
        first = asyncio.ensure_future(model.pairs("a", "b"))
        while not sizes:  # the first batch (of one) is running
            await asyncio.sleep(0)
        second = asyncio.ensure_future(model.pairs("c", key2="d"))
        for _ in range(10):  # a timeout of 0 would have sent it alone by now
            await asyncio.sleep(0)
        third = asyncio.ensure_future(model.pairs(key2="f", key1="e"))
        await asyncio.sleep(0)
        model.gate.set()
        return await asyncio.wait_for(asyncio.gather(first, second, third), 60)

    assert asyncio.run(main()) == [("a", "b"), ("c", "d"), ("e", "f")]
    # The calls made while a batch ran went together in the next one.
    assert sizes == [1, 2]


def test_a_batch_result_of_the_wrong_length_fails_every_caller():
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
    async def count(requests):
        return len(requests)

    async def main():
        return await asyncio.wait_for(asyncio.gather(count(1), count(2), return_exceptions=True), 60)

    results = asyncio.run(main())
    assert all(isinstance(r, TypeError) and "one result per call" in str(r) for r in results)


# -- through a cluster ------------------------------------------------------


def nothing(request):
    return "nothing"


def test_refusals_are_value_errors_and_serve_errors(shared):
    serve.create_backend("dup", nothing)
    with pytest.raises(ValueError, match="already exists"):
        serve.create_backend("dup", nothing)
    serve.create_endpoint("dup", backend="dup", route="/dup")
    with pytest.raises(ValueError):
        serve.create_endpoint("dup", backend="dup", route="/dup-other")
    with pytest.raises(ValueError):
        serve.create_endpoint("dup-route", backend="dup", route="/dup")
    with pytest.raises(ValueError, match="nonexistent_backend"):
        serve.set_traffic("dup", {"nonexistent_backend": 1.0})
    with pytest.raises(ValueError):
        serve.set_traffic("nonexistent_endpoint", {"dup": 1.0})
    with pytest.raises(ValueError, match="still used"):
        serve.delete_backend("dup")
    # Still ServeErrors, as Serval code catches them.
    with pytest.raises(serval.ServeError):
        serve.delete_backend("dup")
    with pytest.raises(TypeError):
        serve.create_endpoint("no-backend")
    with pytest.raises(TypeError):
        serve.create_endpoint("no-backend", route="/hello")
    with pytest.raises(TypeError):
        serve.create_endpoint("no-backend", backend=2)
    serve.delete_endpoint("dup")
    serve.delete_backend("dup")


class Counter:
    def __init__(self):
        self.count = 10

    def __call__(self, request):
        return {"count": self.count, "pid": os.getpid()}

    def reconfigure(self, config):
        self.count = config["count"]


def test_backend_config_objects_create_list_and_update(shared):
    config = serve.BackendConfig(num_replicas=2, user_config={"count": 123},
                                 experimental_graceful_shutdown_timeout_s=5)
    serve.create_backend("conf", Counter, config=config)
    serve.create_endpoint("conf", backend="conf")
    listed = serve.list_backends()["conf"]
    assert isinstance(listed, serve.BackendConfig)
    assert (listed.num_replicas, listed.user_config) == (2, {"count": 123})
    assert listed["num_replicas"] == 2 and listed.max_concurrent_queries == 8
    assert listed.retry_idempotent is True
    assert serve.get_backend_config("conf").num_replicas == 2

    # Only the fields the update sets change.
    serve.update_backend_config("conf", serve.BackendConfig(user_config={"count": 456}))
    listed = serve.list_backends()["conf"]
    assert (listed.num_replicas, listed.user_config) == (2, {"count": 456})
    handle = serve.get_handle("conf")
    wait_for(lambda: all(handle.remote().result(timeout=60)["count"] == 456 for _ in range(10)),
             timeout=60, what="every replica reconfigured")
    # A dict works as before.
    serve.update_backend_config("conf", {"num_replicas": 1, "retry_idempotent": False})
    assert serve.get_backend_config("conf").num_replicas == 1
    assert serve.get_backend_config("conf").retry_idempotent is False
    serve.update_backend_config("conf", {"num_replicas": 1})
    assert serve.get_backend_config("conf").retry_idempotent is False, "kept by an update not setting it"
    serve.delete_endpoint("conf")
    serve.delete_backend("conf")


async def held_until_released(request):
    """Writes DIR/started, then answers once DIR/release exists (?gate=DIR)."""
    gate = request.query_params["gate"]
    open(os.path.join(gate, "started"), "w").close()
    deadline = time.monotonic() + 120
    while not os.path.exists(os.path.join(gate, "release")) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return "finished"


def test_a_stopping_replica_lets_requests_in_flight_finish(shared, tmp_path):
    # Ray 1.x: a replica being stopped waits for its ongoing requests, up to
    # experimental_graceful_shutdown_timeout_s.
    serve.create_backend("graceful", held_until_released,
                         config=serve.BackendConfig(experimental_graceful_shutdown_timeout_s=90))
    serve.create_endpoint("graceful", backend="graceful", route="/graceful")
    assert serve.get_backend_config("graceful").experimental_graceful_shutdown_timeout_s == 90
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        held = pool.submit(requests.get, f"{shared.url}/graceful", params={"gate": str(tmp_path)}, timeout=120)
        wait_for(lambda: (tmp_path / "started").exists(), timeout=60, what="the request to start")
        serve.delete_endpoint("graceful")
        serve.delete_backend("graceful")

        def stopping():
            logs = glob.glob(os.path.join(shared.data_dir, "replicas", "graceful*", "replica.log"))
            return any(" stopping: " in open(log, errors="replace").read() for log in logs)

        wait_for(stopping, timeout=60, what="the replica to begin stopping")
        (tmp_path / "release").touch()
        r = held.result(timeout=120)
    assert (r.status_code, r.text) == (200, "finished")


class Batching:
    """Answers each call with the size of the batch it ran in."""

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=60)
    async def sizes(self, requests):
        return [len(requests)] * len(requests)

    async def __call__(self, request):
        return {"batch": await self.sizes(request)}


def test_serve_batch_collects_http_requests_and_handle_calls_together(shared):
    serve.create_backend("batching", Batching)
    serve.create_endpoint("batching", backend="batching", route="/batching")
    handle = serve.get_handle("batching")
    # The batch waits (60 s) until it holds four calls: two of each kind.
    futures = [handle.remote(temp=1), handle.remote(temp=2)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        http = [pool.submit(requests.get, f"{shared.url}/batching", timeout=120) for _ in range(2)]
        answers = [f.result() for f in http]
    assert [r.json() for r in answers] == [{"batch": 4}] * 2
    assert [f.result(timeout=120) for f in futures] == [{"batch": 4}] * 2
    serve.delete_endpoint("batching")
    serve.delete_backend("batching")


class CallMethod:
    def __init__(self):
        self.count = 1

    def method(self, request):
        return {"kind": type(request).__name__, "method": request.method}

    def other_method(self, inc):
        self.count += inc
        return self.count


def test_a_custom_method_called_without_arguments_gets_the_request(shared):
    serve.create_backend("call-method", CallMethod)
    serve.create_endpoint("call-method", backend="call-method", route="/call-method")
    r = requests.get(f"{shared.url}/call-method", headers={"X-SERVE-CALL-METHOD": "method"}, timeout=60)
    assert r.json() == {"kind": "Request", "method": "GET"}
    handle = serve.get_handle("call-method")
    assert serval.get(handle.options(method_name="method").remote()) == {"kind": "ServeRequest", "method": "GET"}
    posted = handle.options(method_name="method", http_method="POST").remote()
    assert posted.result(timeout=60) == {"kind": "ServeRequest", "method": "POST"}
    # Seed 003: a positional argument still reaches the method as itself.
    assert serval.get(handle.options(method_name="other_method").remote(5)) == 6
    assert serval.get(handle.options(method_name="other_method").remote(inc=2)) == 8
    serve.delete_endpoint("call-method")
    serve.delete_backend("call-method")


def lists_backends(request):
    # No serve.connect() here: the replica finds its cluster itself.
    return sorted(serve.list_backends())


def test_implicit_connect_in_a_script_and_in_a_replica(shared):
    script = textwrap.dedent("""
        from serval import serve
        serve.shutdown()  # not connected: does nothing
        serve.create_backend("from-script", lambda request: "scripted")
        serve.create_endpoint("from-script", backend="from-script", route="/from-script")
        print(sorted(serve.list_backends()))
    """)
    # The script finds the cluster as the CLI does (here, SERVAL_DATA_DIR).
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "from-script" in out.stdout
    assert requests.get(f"{shared.url}/from-script", timeout=60).text == "scripted"

    serve.create_backend("lister", lists_backends)
    serve.create_endpoint("lister", backend="lister")
    assert "lister" in serve.get_handle("lister").remote().result(timeout=60)
    for name in ("from-script", "lister"):
        serve.delete_endpoint(name)
        serve.delete_backend(name)


def double(request):
    return {"doubled": request.data * 2, "n_plus_one": request.query_params["n"] + 1,
            "n_type": type(request.query_params["n"]).__name__}


async def awaits_a_sync_handle(request):
    # A sync handle's result awaited inside an async backend.
    return await serve.get_handle("double").remote(21, n=4)


def test_handle_results_can_be_awaited_and_kwargs_stay_objects(shared):
    serve.create_backend("double", double)
    serve.create_endpoint("double", backend="double")
    serve.create_backend("awaiter", awaits_a_sync_handle)
    serve.create_endpoint("awaiter", backend="awaiter", route="/awaiter")
    expected = {"doubled": 42, "n_plus_one": 5, "n_type": "int"}
    assert requests.get(f"{shared.url}/awaiter", timeout=60).json() == expected

    async def main():
        handle = serve.get_handle("double", sync=False)
        # Seed 003: `await handle.remote()` gives a reference, then awaited
        # or passed to serval.get; the first await's value is the result too.
        ref = await handle.remote(21, n=4)
        assert ref == expected
        assert await ref == expected
        assert serval.get(ref) == expected
        # A sync handle's future awaited in a running loop.
        return await serve.get_handle("double").remote(1, n=0)

    assert asyncio.run(main()) == {"doubled": 2, "n_plus_one": 1, "n_type": "int"}
    for name in ("awaiter", "double"):
        serve.delete_endpoint(name)
        serve.delete_backend(name)


def test_list_endpoints_entries_and_cors_on_routes(shared):
    for name in ("le1", "le2", "le3"):
        serve.create_backend(name, nothing)
    serve.create_endpoint("le-endpoint", backend="le1", route="/le", methods=["GET", "POST"])
    serve.create_endpoint("le-endpoint2", backend="le2", methods=["POST"])
    serve.shadow_traffic("le-endpoint", "le3", 0.5)
    endpoints = serve.list_endpoints()
    assert endpoints["le-endpoint"] == {
        "route": "/le", "methods": ["GET", "POST"], "traffic": {"le1": 1.0}, "shadows": {"le3": 0.5},
        "python_methods": [],
    }
    assert endpoints["le-endpoint2"]["python_methods"] == []

    headers = {"Origin": "https://example.org", "Access-Control-Request-Method": "GET"}
    assert requests.options(shared.url, headers=headers, timeout=10).headers["access-control-allow-origin"] == "*"
    routes = requests.get(f"{shared.url}/-/routes", headers=headers, timeout=10)
    assert routes.json()["/le"] == "le-endpoint"
    assert routes.headers["access-control-allow-origin"] == "*"
    for name in ("le-endpoint", "le-endpoint2"):
        serve.delete_endpoint(name)
    for name in ("le1", "le2", "le3"):
        serve.delete_backend(name)


def test_a_backend_error_still_reaches_an_awaiting_caller(shared):
    def fails(request):
        raise KeyError("nope")

    serve.create_backend("fails", fails)
    serve.create_endpoint("fails", backend="fails")

    async def main():
        with pytest.raises(BackendError, match="KeyError"):
            await serve.get_handle("fails").remote()

    asyncio.run(main())
    serve.delete_endpoint("fails")
    serve.delete_backend("fails")
