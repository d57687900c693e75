"""Resources (issue 4.6): replicas declare CPUs and GPUs; GPU replicas land on
nodes with room and see only their GPUs through CUDA_VISIBLE_DEVICES. The
head fakes a GPU node with `--num-gpus`, as users do on machines without one."""

import os
import subprocess
import sys

import pytest

from conftest import running_cluster, wait_for
from serval import serve


@pytest.fixture
def gpu_cluster(monkeypatch):
    with running_cluster(monkeypatch, env={"SERVAL_NUM_CPUS": "8", "SERVAL_NUM_GPUS": "2"}) as c:
        yield c


def visible_devices(request):
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def replicas_of(backend):
    return [r for r in serve.status()["replicas"] if r["backend"] == backend]


def test_gpu_replicas_get_their_own_devices(gpu_cluster):
    serve.create_backend("cpu", visible_devices)
    serve.create_backend("whole", visible_devices, ray_actor_options={"num_gpus": 1},
                         config={"num_replicas": 2})
    seen = set()
    handle_backends = {"cpu": None, "whole": None}
    serve.create_endpoint("cpu", backend="cpu", route=None)
    serve.create_endpoint("whole", backend="whole", route=None)
    assert serve.get_handle("cpu").remote().result() is None
    # create_backend returns once both replicas run; the status says so too.
    wait_for(lambda: sum(r["state"] == "running" for r in replicas_of("whole")) == 2,
             what="both GPU replicas running")
    h = serve.get_handle("whole")

    def both_seen():
        seen.add(h.remote().result())
        return len(seen) >= 2

    wait_for(both_seen, what="calls reaching both GPU replicas")
    assert seen == {"0", "1"}
    assert sorted(tuple(r["gpu_ids"]) for r in replicas_of("whole")) == [(0,), (1,)]
    del handle_backends


def test_a_backend_that_fits_nowhere_stays_pending_with_the_reason(gpu_cluster):
    serve.create_backend("two", visible_devices, ray_actor_options={"num_gpus": 2})
    # Both GPUs are taken: the next GPU backend cannot start and says why.
    from serval import ServeError
    import serval._core as s

    # At once, with the reason, and the backend is not kept.
    with pytest.raises(ServeError, match="no live node has 1 CPU and 0.5 GPU free"):
        serve.create_backend("more", visible_devices, ray_actor_options={"num_gpus": 0.5})
    assert "more" not in serve.list_backends()
    # A caller that waits for room keeps it pending, with the reason.
    old = s.BACKEND_START_TIMEOUT_S
    s.BACKEND_START_TIMEOUT_S = 2
    try:
        with pytest.raises(ServeError, match="not started all its replicas after 2 s: no live node"):
            serve.create_backend("more", visible_devices, ray_actor_options={"num_gpus": 0.5},
                                 wait_for_resources=True)
    finally:
        s.BACKEND_START_TIMEOUT_S = old
    (pending,) = replicas_of("more")
    assert pending["state"] == "pending"
    assert "GPU" in pending["error"]
    status = subprocess.run([sys.executable, "-m", "serval.cli", "--data-dir", gpu_cluster.data_dir, "status"],
                            capture_output=True, text=True, timeout=60).stdout
    assert any(l.strip().startswith("more") and "GPU" in l for l in status.splitlines()), status

    # Freeing the GPUs lets it start.
    serve.delete_backend("two")
    assert serve.get_handle("more", missing_ok=True)  # handle creation does not need the endpoint
    serve.create_endpoint("more", backend="more", route=None)
    assert serve.get_handle("more").remote().result() in ("0", "1")


def test_bad_resource_requests_name_the_field(gpu_cluster):
    from serval import ServeError

    with pytest.raises(ServeError, match="num_gpus"):
        serve.create_backend("odd", visible_devices, ray_actor_options={"num_gpus": 1.5})
    with pytest.raises(ValueError, match="memory_gb"):
        serve.create_backend("odd", visible_devices, ray_actor_options={"memory_gb": 1})
    assert "odd" not in serve.list_backends()
