"""The Ray Serve 2.x API (issue 23, parts 1, 2 and 8) through Serval's
public surfaces: ``@serve.deployment``, ``.options()``, ``.bind()``,
``serve.run``, applications side by side, ``serve.delete``,
``serve.status``, the handles and responses of composition, the 1.x API
on the same cluster, a Ray 2.x script with only its import changed, and
``serve build|deploy|run|status``.

One cluster serves the module (each test uses its own application names
and route prefixes)."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests
import yaml

from starlette.requests import Request

from conftest import free_port, running_cluster, wait_for
from serval import serve
from serval.handle import BackendError
from serval.schema import ApplicationStatus, DeploymentStatus

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVE_BIN = os.path.join(ROOT, "target", "debug", "serve")
#: Replicas declare no CPU, so many fit on the 2-core test machine.
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


def replica_pids(backend):
    return sorted(r["pid"] for r in serve.status()["replicas"] if r["backend"] == backend and r["state"] == "running")


# -- deployments used below --------------------------------------------------

class QuotaError(Exception):
    def __init__(self, left):
        super().__init__(f"{left} left")
        self.left = left


@serve.deployment(ray_actor_options=CPU0)
class Multiplier:
    def __init__(self, factor):
        self.factor = factor

    def __call__(self, x):
        return x * self.factor

    def add(self, a, b=0):
        return a + b

    def whoami(self):
        ctx = serve.get_replica_context()
        return [ctx.app_name, ctx.deployment, ctx.replica_id.startswith(f"{ctx.app_name}#{ctx.deployment}#")]

    def fail(self, kind):
        if kind == "quota":
            raise QuotaError(3)
        raise KeyError(kind)

    def slow(self, gate):
        wait_file(gate)
        return "late"


@serve.deployment(ray_actor_options=CPU0)
def echo(value):
    return {"echo": value}


@serve.deployment(ray_actor_options=CPU0)
class AsyncIngress:
    """Composition in async code: handles awaited, responses chained."""

    def __init__(self, model, helpers):
        self.model = model
        self.first, self.second = helpers["pair"]
        self.echo = helpers["echo"]

    async def __call__(self, request):
        x = int(request.query_params.get("x", "1"))
        doubled = self.model.remote(x)
        # A response passed on unresolved: the call is sent once it is done.
        total = await self.model.add.remote(doubled, b=await self.first.remote(1))
        other = await self.second.options(method_name="add").remote(total, 1)
        return {"total": total, "other": other, "echo": await self.echo.remote(request.url.path)}

    async def blocking_result(self):
        # Not allowed inside an event loop, as in Ray.
        return self.model.remote(1).result()


@serve.deployment(ray_actor_options=CPU0)
class SyncIngress:
    """Composition in sync code: .result() on the replica's worker thread."""

    def __init__(self, model):
        self.model = model

    def __call__(self, request):
        x = int(request.query_params.get("x", "1"))
        return {"value": self.model.add.remote(self.model.remote(x), 100).result(timeout_s=30)}


# -- options (no cluster) ---------------------------------------------------


def test_deployment_options_are_checked_and_compiled_to_backend_config():
    with pytest.raises(ValueError, match="num_replicas"):
        serve.deployment(num_replicas=0)
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        serve.deployment(max_ongoing_requests=0)
    with pytest.raises(ValueError, match="max_queued_requests"):
        serve.deployment(max_queued_requests=0)
    with pytest.raises(ValueError, match="user_config"):
        serve.deployment(user_config={"f": object()})
    with pytest.raises(ValueError, match="health_check_period_s"):
        serve.deployment(health_check_period_s=0)
    with pytest.raises(ValueError, match="memory"):
        serve.deployment(ray_actor_options={"memory": 10})
    with pytest.raises(ValueError, match="pip"):
        serve.deployment(ray_actor_options={"runtime_env": {"pip": ["torch"]}})
    with pytest.raises(ValueError, match="autoscaling_config: unknown field 'bogus'"):
        serve.deployment(autoscaling_config={"bogus": 1})
    with pytest.raises(ValueError, match="min_replicas"):
        serve.deployment(autoscaling_config={"min_replicas": 3, "max_replicas": 2})
    with pytest.raises(ValueError, match="placement_group_bundles"):
        serve.deployment(placement_group_bundles=[{"CPU": 1}])
    with pytest.raises(TypeError):
        serve.deployment(no_such_option=1)
    with pytest.raises(TypeError, match="retry_idempotent"):
        serve.deployment(retry_idempotent="no")
    # Serval's retry_idempotent: only turning it off reaches the config.
    assert Multiplier.options(retry_idempotent=False).backend_config()["retry_idempotent"] is False
    assert "retry_idempotent" not in Multiplier.options(retry_idempotent=True).backend_config()
    with pytest.raises(ValueError, match="'#'"):
        Multiplier.options(name="a#b")
    with pytest.raises(ValueError, match="num_replicas cannot be set with autoscaling_config"):
        Multiplier.options(num_replicas=2, autoscaling_config={"max_replicas": 3})
    with pytest.raises(TypeError, match="bind"):
        serve.run(Multiplier)
    with pytest.raises(RuntimeError, match="cannot be called directly"):
        Multiplier(2)

    assert Multiplier.name == "Multiplier" and echo.name == "echo"
    renamed = Multiplier.options(name="Triple", num_replicas=3, max_ongoing_requests=7, max_queued_requests=4,
                                 user_config={"k": 1}, graceful_shutdown_timeout_s=5,
                                 ray_actor_options={"num_cpus": 0.5, "num_gpus": 0,
                                                    "runtime_env": {"env_vars": {"A": "1"}}})
    assert (renamed.name, renamed.num_replicas, renamed.max_ongoing_requests) == ("Triple", 3, 7)
    assert Multiplier.num_replicas == 1 and Multiplier.max_ongoing_requests == 5  # Ray 2.x's default
    assert renamed.backend_config() == {
        "num_replicas": 3, "max_concurrent_queries": 7, "max_queued_requests": 4, "user_config": {"k": 1},
        "num_cpus": 0.5, "num_gpus": 0.0, "experimental_graceful_shutdown_timeout_s": 5}
    assert renamed.replica_options({"B": "2"})["env_vars"] == {"A": "1", "B": "2"}

    # "auto" autoscales as Ray's defaults say; an autoscaling_config maps to Serval's knobs.
    auto = Multiplier.options(num_replicas="auto").backend_config()
    assert auto["num_replicas"] == 1
    assert auto["autoscaling"] == {"min_replicas": 1, "max_replicas": 100, "target_replica_concurrency": 2,
                                   "window": 30.0, "upscale_stabilization_period": 30.0,
                                   "downscale_stabilization_period": 600.0}
    scaled = Multiplier.options(autoscaling_config={
        "min_replicas": 1, "initial_replicas": 2, "max_replicas": 4, "target_ongoing_requests": 3,
        "upscale_delay_s": 5, "downscale_delay_s": 60, "metrics_interval_s": 2}).backend_config()
    assert scaled["num_replicas"] == 2
    assert scaled["autoscaling"]["max_replicas"] == 4 and scaled["autoscaling"]["target_replica_concurrency"] == 3
    assert scaled["autoscaling"]["upscale_stabilization_period"] == 5

    # stream=True stays with a handle, through attributes and pickling
    # (test_streaming.py streams with it); it must be a bool.
    import pickle

    streaming = pickle.loads(pickle.dumps(serve.DeploymentHandle("D", "app").options(stream=True).method))
    assert streaming._stream is True and streaming._method_name == "method"
    with pytest.raises(TypeError, match="stream must be a bool"):
        serve.DeploymentHandle("D", "app").options(stream="yes")


# -- composition -------------------------------------------------------------


def test_composition_through_http_and_handles(shared, tmp_path):
    helpers = {"pair": [Multiplier.bind(10), Multiplier.bind(100)], "echo": echo.bind()}
    handle = serve.run(AsyncIngress.bind(Multiplier.bind(2), helpers), name="compose", route_prefix="/compose")
    assert isinstance(handle, serve.DeploymentHandle) and handle.deployment_name == "AsyncIngress"
    # One deployment bound three times: three deployments, named apart.
    app = serve.status().applications["compose"]
    assert list(app.deployments) == ["Multiplier", "Multiplier_1", "Multiplier_2", "echo", "AsyncIngress"]
    assert app.status == ApplicationStatus.RUNNING == "RUNNING"
    assert all(d.status == DeploymentStatus.HEALTHY for d in app.deployments.values())

    # HTTP reaches the ingress at its route prefix and every path below it.
    for path in ("/compose", "/compose/deeper/path"):
        r = requests.get(f"{shared.url}{path}?x=3", timeout=60)
        assert r.status_code == 200, r.text
        assert r.json() == {"total": 16, "other": 17, "echo": {"echo": path}}
    assert requests.get(f"{shared.url}/composed", timeout=60).status_code == 404

    # Handles from outside: methods by attribute or options, responses chained.
    model = serve.get_deployment_handle("Multiplier", "compose")
    assert model.remote(21).result() == 42
    assert model.add.remote(model.remote(5), b=model.remote(1)).result(timeout_s=30) == 12
    assert model.options(method_name="add").remote(1, 2).result() == 3
    assert model.whoami.remote().result() == ["compose", "Multiplier", True]
    response = model.remote(4)
    # Many waiters of one response, from several threads at once.
    results = []
    threads = [threading.Thread(target=lambda: results.append(response.result())) for _ in range(4)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert results == [8] * 4
    with pytest.raises(BackendError, match="RuntimeError"):
        serve.get_app_handle("compose").blocking_result.remote().result()
    # A deployment's exception reaches the caller as its own class too.
    with pytest.raises(QuotaError) as e:
        model.fail.remote("quota").result()
    assert isinstance(e.value, BackendError) and e.value.left == 3 and "QuotaError: 3 left" in str(e.value)
    with pytest.raises(KeyError, match="nothing"):
        model.fail.remote("nothing").result()
    with pytest.raises(serve.ServeValueError):
        serve.get_deployment_handle("Nope", "compose")
    with pytest.raises(serve.ServeValueError):
        serve.get_app_handle("no-such-app")

    # A timeout leaves the call running; a later result() gets it.
    gate = str(tmp_path / "gate")
    slow = model.slow.remote(gate)
    with pytest.raises(TimeoutError):
        slow.result(timeout_s=0.2)
    open(gate, "w").close()
    assert slow.result(timeout_s=60) == "late"

    # Await from the driver's own event loop.
    async def gather():
        import asyncio

        return await asyncio.gather(model.remote(1), model.add.remote(model.remote(2), 3))

    import asyncio

    assert asyncio.run(gather()) == [2, 7]

    # Sync deployment code uses .result() on a chained call.
    serve.run(SyncIngress.bind(Multiplier.bind(3)), name="compose-sync", route_prefix="/compose-sync")
    assert requests.get(f"{shared.url}/compose-sync?x=2", timeout=60).json() == {"value": 106}
    serve.delete("compose-sync")
    serve.delete("compose")


# -- applications side by side ---------------------------------------------


@serve.deployment(ray_actor_options=CPU0)
class Named:
    def __init__(self, label):
        self.label = label

    def __call__(self, request=None):
        return self.label


def test_applications_side_by_side_then_deleted(shared):
    serve.run(Named.bind("a"), name="side-a", route_prefix="/side/a")
    serve.run(Named.bind("b"), name="side-b", route_prefix="/side")
    serve.run(Named.bind("c"), name="side-c", route_prefix=None)
    # The same deployment name in three applications: three backends.
    backends = {b["name"] for b in serve.status()["backends"]}
    assert {"side-a#Named", "side-b#Named", "side-c#Named"} <= backends
    # The longest prefix wins.
    assert requests.get(f"{shared.url}/side/a/x", timeout=60).text == "a"
    assert requests.get(f"{shared.url}/side/ab", timeout=60).text == "b"
    assert requests.get(f"{shared.url}/side", timeout=60).text == "b"
    assert serve.get_app_handle("side-c").remote().result() == "c"
    with pytest.raises(serve.ServeValueError, match="already used by application 'side-b'"):
        serve.run(Named.bind("d"), name="side-d", route_prefix="/side")
    assert "side-d" not in serve.status().applications
    with pytest.raises(ValueError, match="route_prefix"):
        serve.run(Named.bind("d"), name="side-d", route_prefix="/trailing/")

    apps = serve.status().applications
    assert {a: apps[a].status for a in ("side-a", "side-b", "side-c")} == {
        "side-a": "RUNNING", "side-b": "RUNNING", "side-c": "RUNNING"}
    assert apps["side-a"].route_prefix == "/side/a" and apps["side-c"].route_prefix is None

    serve.delete("side-b")
    assert requests.get(f"{shared.url}/side/a", timeout=60).text == "a"
    assert requests.get(f"{shared.url}/side", timeout=60).status_code == 404
    assert "side-b" not in serve.status().applications
    assert not [b for b in serve.status()["backends"] if b["name"].startswith("side-b#")]
    serve.delete("side-b")  # an unknown name does nothing
    serve.delete("side-a")
    serve.delete("side-c")


# -- redeploying -------------------------------------------------------------


@serve.deployment(ray_actor_options=CPU0, user_config={"greeting": "hello"})
class Greeter:
    def __init__(self):
        self.greeting = None
        self.version = "v1"

    def reconfigure(self, config):
        if config.get("reject"):
            raise ValueError("greeting rejected")
        # A slow reconfigure: serve.run must still return only once it is done.
        time.sleep(config.get("takes_s", 0))
        self.greeting = config["greeting"]

    def __call__(self, request=None):
        return f"{self.version} {self.greeting}"


@serve.deployment(ray_actor_options=CPU0)
class Front:
    def __init__(self, greeter):
        self.greeter = greeter

    async def __call__(self, request):
        return await self.greeter.remote()


class GreeterV2(Greeter.func_or_class):
    def __init__(self):
        super().__init__()
        self.version = "v2"

    def reconfigure(self, config):
        # Takes the config the old code rejects.
        self.greeting = config["greeting"]


def test_redeploy_changes_options_in_place_and_rolls_new_code(shared):
    url = f"{shared.url}/greet"
    serve.run(Front.bind(Greeter.bind()), name="greet", route_prefix="/greet")
    assert requests.get(url, timeout=60).text == "v1 hello"
    pids = replica_pids("greet#Greeter")

    # Same code, new user_config: reconfigure() in the running replica,
    # done when serve.run returns.
    serve.run(Front.bind(Greeter.options(user_config={"greeting": "hi", "takes_s": 2}).bind()), name="greet",
              route_prefix="/greet")
    assert requests.get(url, timeout=60).text == "v1 hi"
    assert replica_pids("greet#Greeter") == pids

    # A reconfigure() that raises fails the deploy; the replica keeps serving.
    with pytest.raises(serve.DeployFailedError, match="greeting rejected"):
        serve.run(Front.bind(Greeter.options(user_config={"greeting": "no", "reject": True}).bind()),
                  name="greet", route_prefix="/greet")
    assert serve.status().applications["greet"].status == "DEPLOY_FAILED"
    assert requests.get(url, timeout=60).text == "v1 hi"
    assert replica_pids("greet#Greeter") == pids

    # New code: a rolling update, every request answered meanwhile.
    failures, answered, stop = [], [], threading.Event()

    def hammer():
        while not stop.is_set():
            try:
                r = requests.get(url, timeout=60)
                (answered if r.status_code == 200 else failures).append(r.status_code)
            except requests.RequestException as e:
                failures.append(repr(e))

    t = threading.Thread(target=hammer)
    t.start()
    try:
        # With a config only the new code takes: the new replicas start with it.
        serve.run(Front.bind(Greeter.options(func_or_class=GreeterV2,
                                             user_config={"greeting": "hi", "reject": True}).bind()),
                  name="greet", route_prefix="/greet")
    finally:
        stop.set()
        t.join(60)
    assert failures == [] and answered
    assert requests.get(url, timeout=60).text == "v2 hi"
    assert not set(replica_pids("greet#Greeter")) & set(pids)

    # A graph without Front: it goes, and the route moves to Greeter.
    serve.run(Greeter.options(func_or_class=GreeterV2, user_config={"greeting": "hi"}).bind(), name="greet",
              route_prefix="/greet")
    assert requests.get(url, timeout=60).text == "v2 hi"
    assert "greet#Front" not in {b["name"] for b in serve.status()["backends"]}
    assert list(serve.status().applications["greet"].deployments) == ["Greeter"]
    serve.delete("greet")


# -- failures and health ---------------------------------------------------------


@serve.deployment(ray_actor_options=CPU0)
class Broken:
    def __init__(self):
        raise ValueError("no weights here")


@serve.deployment(ray_actor_options=CPU0, health_check_period_s=0.2, health_check_timeout_s=5)
class Fragile:
    def __init__(self, flag):
        self.flag = flag

    def check_health(self):
        if os.path.exists(self.flag):
            raise RuntimeError("flag raised")

    def __call__(self, request=None):
        return os.getpid()


def test_deploy_failed_and_unhealthy_are_reported(shared, tmp_path):
    with pytest.raises(serve.DeployFailedError, match="no weights here") as e:
        serve.run(Broken.bind(), name="broken", route_prefix="/broken")
    assert isinstance(e.value, RuntimeError)
    app = serve.status().applications["broken"]
    assert app.status == "DEPLOY_FAILED" and "no weights here" in app.message
    serve.delete("broken")
    assert "broken" not in serve.status().applications

    flag = str(tmp_path / "unhealthy")
    handle = serve.run(Fragile.bind(flag), name="fragile", route_prefix=None)
    first = handle.remote().result()
    open(flag, "w").close()
    # The failing check stops the replica; its node agent restarts it,
    # and the status says so meanwhile.
    wait_for(lambda: serve.status().applications["fragile"].status == "UNHEALTHY", timeout=60,
             what="fragile UNHEALTHY")
    assert serve.status().applications["fragile"].deployments["Fragile"].status == "UNHEALTHY"
    os.remove(flag)
    wait_for(lambda: serve.status().applications["fragile"].deployments["Fragile"].status == "HEALTHY",
             timeout=90, what="Fragile HEALTHY again")
    assert serve.status().applications["fragile"].status == "RUNNING"
    assert handle.remote().result(timeout_s=60) != first
    serve.delete("fragile")


# -- environment, limits, autoscaling ------------------------------------------


@serve.deployment(ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": {"MODEL_KIND": "tiny"}}},
                  max_ongoing_requests=1, max_queued_requests=1)
class Gated:
    def __init__(self):
        self.kind_at_start = os.environ.get("MODEL_KIND")

    def __call__(self, gate=None):
        if isinstance(gate, Request):
            gate = gate.query_params.get("gate")
        if gate:
            wait_file(gate)
        return self.kind_at_start


def test_env_vars_and_queue_limits(shared, tmp_path):
    handle = serve.run(Gated.bind(), name="gated", route_prefix="/gated")
    assert handle.remote().result() == "tiny"

    # One call runs, one waits; the next is refused at once (Ray's BackPressureError).
    gate = str(tmp_path / "gate")
    admitted, refused = [], None
    for _ in range(10):
        call = handle.remote(gate)
        try:
            call.result(timeout_s=0.2)
        except serve.BackPressureError as e:
            refused = e
            break
        except TimeoutError:
            admitted.append(call)
    assert refused is not None and len(admitted) == 2, (refused, admitted)
    open(gate, "w").close()
    assert [c.result(timeout_s=60) for c in admitted] == ["tiny", "tiny"]

    # Over HTTP (the proxy is another router with the same bound): one
    # request at the replica, one queued in the proxy, the third 503.
    gate = str(tmp_path / "http-gate")
    statuses = []

    def get():
        statuses.append(requests.get(f"{shared.url}/gated", params={"gate": gate}, timeout=60).status_code)

    threads = [threading.Thread(target=get) for _ in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: 503 in statuses, timeout=30, what="a 503")
    open(gate, "w").close()
    for t in threads:
        t.join(60)
    assert sorted(statuses) == [200, 200, 503]
    serve.delete("gated")


def test_autoscaling_options_reach_the_backend(shared):
    serve.run(Named.options(autoscaling_config={"min_replicas": 1, "initial_replicas": 2, "max_replicas": 3,
                                                "target_ongoing_requests": 4}).bind("s"),
              name="scaled", route_prefix=None)
    (backend,) = [b for b in serve.status()["backends"] if b["name"] == "scaled#Named"]
    assert backend["config"]["num_replicas"] == 2
    assert backend["config"]["autoscaling"]["max_replicas"] == 3
    assert backend["config"]["autoscaling"]["target_replica_concurrency"] == 4
    assert len(replica_pids("scaled#Named")) == 2
    serve.delete("scaled")


# -- both APIs on one cluster ---------------------------------------------------


def legacy_backend(request):
    """A 1.x backend calling a 2.x application through its app handle."""
    return {"legacy": serve.get_app_handle("mixed").remote(None).result()}


@serve.deployment(ray_actor_options=CPU0)
class CallsLegacy:
    async def __call__(self, request):
        if isinstance(request, Request) and request.url.path.endswith("/legacy"):
            return {"via-1x": await serve.get_handle("legacy-ep", sync=False).remote(value=1)}
        return "two"


def test_ray1x_and_ray2x_apis_share_a_cluster(shared):
    serve.create_backend("legacy", legacy_backend, ray_actor_options=CPU0)
    serve.create_endpoint("legacy-ep", backend="legacy", route="/legacy-route")
    serve.run(CallsLegacy.bind(), name="mixed", route_prefix="/")
    try:
        # An exact 1.x route is tried before the application's "/" prefix.
        assert requests.get(f"{shared.url}/legacy-route", timeout=60).json() == {"legacy": "two"}
        assert requests.get(f"{shared.url}/anything/else", timeout=60).text == "two"
        assert requests.get(f"{shared.url}/x/legacy", timeout=60).json() == {"via-1x": {"legacy": "two"}}
        assert "mixed#CallsLegacy" in serve.list_backends()
        assert serve.list_endpoints()["legacy-ep"]["route"] == "/legacy-route"
        # A 1.x handle reaches a 2.x deployment's endpoint as well.
        assert serve.get_handle("mixed#CallsLegacy").remote(None).result() == "two"
    finally:
        serve.delete("mixed")
        serve.delete_endpoint("legacy-ep")
        serve.delete_backend("legacy")
    assert requests.get(f"{shared.url}/anything/else", timeout=60).status_code == 404


# -- a Ray 2.x script with only the import changed --------------------------------

RAY_SCRIPT = '''
import requests
from serval import serve          # was: from ray import serve
from starlette.requests import Request


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0})
class Adder:
    def __init__(self, increment: int):
        self.increment = increment

    def add(self, value: int) -> int:
        return value + self.increment


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Pipeline:
    def __init__(self, adder, doubler):
        self.adder = adder
        self.doubler = doubler

    async def __call__(self, request: Request) -> dict:
        value = int((await request.json())["value"])
        doubled = self.doubler.remote(value)
        result = await self.adder.add.remote(doubled)
        return {"result": result}


@serve.deployment(ray_actor_options={"num_cpus": 0})
def doubler(value: int) -> int:
    return value * 2


app = Pipeline.bind(Adder.bind(increment=5), doubler.bind())

if __name__ == "__main__":
    handle = serve.run(app, name="pipeline", route_prefix="/pipeline")
    response = requests.post("http://127.0.0.1:8000/pipeline", json={"value": 10})
    print("http", response.json()["result"])
    status = serve.status()
    print("status", status.applications["pipeline"].status)
    for name, deployment in status.applications["pipeline"].deployments.items():
        print("deployment", name, deployment.status)
    serve.delete("pipeline")
    print("apps", sorted(serve.status().applications))
'''


def test_a_ray_2x_script_runs_with_only_the_import_changed(tmp_path):
    script = tmp_path / "ray_app.py"
    # The script talks to Ray's default port; here that port is a free one.
    port = free_port()
    script.write_text(RAY_SCRIPT.replace("127.0.0.1:8000", f"127.0.0.1:{port}"))
    data_dir = str(tmp_path / "data")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVAL_")}
    # No cluster runs: serve.run starts a head for the script, gone when it exits.
    env.update(SERVAL_DATA_DIR=data_dir, SERVAL_HTTP_PORT=str(port), SERVAL_CONTROL_PORT=str(free_port()),
               SERVAL_PYTHON=sys.executable, SERVAL_NUM_CPUS="4")
    proc = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert "http 25" in lines, proc.stdout
    assert "status RUNNING" in lines
    assert {"deployment Adder HEALTHY", "deployment doubler HEALTHY", "deployment Pipeline HEALTHY"} <= set(lines)
    assert "apps []" in lines
    # Its head and replicas (their command lines name the data dir) are gone.
    wait_for(lambda: not _processes_naming(data_dir), what="the script's cluster gone")


def _processes_naming(text):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


# -- the command line ---------------------------------------------------------

APP_MODULE = '''
import os
from serval import serve


@serve.deployment(ray_actor_options={"num_cpus": 0}, user_config={"greeting": "hello"})
class Greeter:
    def reconfigure(self, config):
        self.greeting = config["greeting"]

    def __call__(self, name):
        return f"{self.greeting} {name} from {os.environ.get('REGION', 'nowhere')}"


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Front:
    def __init__(self, greeter):
        self.greeter = greeter

    async def __call__(self, request):
        return await self.greeter.remote(request.query_params.get("name", "you"))


app = Front.bind(Greeter.bind())


def builder(args):
    return Front.bind(Greeter.options(user_config={"greeting": args.get("greeting", "hey")}).bind())
'''


def cli(cluster, *args, cwd, binary=True, timeout=300):
    command = [SERVE_BIN] if binary and os.path.exists(SERVE_BIN) else [sys.executable, "-m", "serval.cli"]
    return subprocess.run([*command, "--data-dir", cluster.data_dir, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def test_serve_build_deploy_and_status(shared, tmp_path):
    (tmp_path / "greetings.py").write_text(APP_MODULE)
    out = cli(shared, "build", "greetings:app", "-o", "config.yaml", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "greetings:app" and app["route_prefix"] == "/"
    assert app["deployments"] == [
        {"name": "Greeter", "ray_actor_options": {"num_cpus": 0.0}, "user_config": {"greeting": "hello"}},
        {"name": "Front", "ray_actor_options": {"num_cpus": 0.0}}]

    # Edited as Ray's docs show: a name, a prefix, env vars, an override.
    app.update(name="greetings", route_prefix="/greetings", runtime_env={"env_vars": {"REGION": "eu"}})
    app["deployments"][0].update(num_replicas=2, user_config={"greeting": "bonjour"})
    builder_app = {"name": "built", "route_prefix": "/built", "import_path": "greetings:builder",
                   "args": {"greeting": "salut"}}
    config["applications"].append(builder_app)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out = cli(shared, "deploy", "config.yaml", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "greetings: RUNNING" in out.stdout and "built: RUNNING" in out.stdout
    assert requests.get(f"{shared.url}/greetings?name=ann", timeout=60).text == "bonjour ann from eu"
    assert requests.get(f"{shared.url}/built", timeout=60).text == "salut you from nowhere"
    pids = replica_pids("greetings#Greeter")
    assert len(pids) == 2

    out = cli(shared, "status", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if l.strip().startswith("greetings "))
    assert "RUNNING" in line and "/greetings" in line and "Greeter=HEALTHY 2/2" in line, out.stdout

    # Deploying a config without "built" removes it (config-deployed
    # applications only; serve.run's stay).
    serve.run(Named.bind("kept"), name="by-run", route_prefix="/by-run")
    config["applications"] = [app]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out = cli(shared, "deploy", "config.yaml", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(a for a in serve.status().applications if a in ("built", "greetings", "by-run")) == [
        "by-run", "greetings"]
    # Deployed again from another process, unchanged code keeps its replicas.
    assert replica_pids("greetings#Greeter") == pids
    serve.delete("by-run")
    serve.delete("greetings")

    # A bad file: one line naming the field, nothing deployed.
    for bad, says in (({"applications": [{"import_path": "greetings:app", "route_prefix": "x"}]}, "route_prefix"),
                      ({"applications": [{"import_path": "greetings:app", "deployments": [
                          {"name": "Greeter", "num_replicas": -1}]}]}, "num_replicas"),
                      ({"applications": [{"import_path": "greetings:app", "deployments": [
                          {"name": "Nope"}]}]}, "Nope"),
                      ({"applications": [], "bogus": 1}, "bogus")):
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
        out = cli(shared, "deploy", "bad.yaml", cwd=tmp_path)
        assert out.returncode == 1 and says in out.stderr, (bad, out.stdout, out.stderr)
    assert not [a for a in serve.status().applications if a.startswith("greetings")]


def run_in_foreground(cluster, cwd, *args, url, expect, stop_with):
    """`serve run ARGS` until it serves ``expect`` at ``url``, then stopped
    with the signal ``stop_with``; returns its stdout."""
    command = [SERVE_BIN] if os.path.exists(SERVE_BIN) else [sys.executable, "-m", "serval.cli"]
    proc = subprocess.Popen([*command, "--data-dir", cluster.data_dir, "run", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "is running at http://" in line, line + proc.stderr.read()
        assert requests.get(url, timeout=60).text == expect
        proc.send_signal(stop_with)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    return line + out


def test_serve_run_in_the_foreground_until_interrupted(shared, tmp_path):
    (tmp_path / "greetings.py").write_text(APP_MODULE)
    out = run_in_foreground(shared, tmp_path, "greetings:builder", "greeting=ahoy", "--name", "foreground",
                            "--route-prefix", "/fg", url=f"{shared.url}/fg?name=bo",
                            expect="ahoy bo from nowhere", stop_with=signal.SIGINT)
    assert "application 'foreground' is running" in out and "stopped" in out
    assert "foreground" not in serve.status().applications
    assert requests.get(f"{shared.url}/fg", timeout=60).status_code == 404

    # A config file, stopped by SIGTERM.
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"applications": [{
        "name": "from-file", "route_prefix": "/from-file", "import_path": "greetings:app",
        "runtime_env": {"env_vars": {"REGION": "file"}}}]}))
    out = run_in_foreground(shared, tmp_path, "run.yaml", url=f"{shared.url}/from-file?name=al",
                            expect="hello al from file", stop_with=signal.SIGTERM)
    assert "application 'from-file' is running" in out and "stopped" in out
    assert "from-file" not in serve.status().applications
