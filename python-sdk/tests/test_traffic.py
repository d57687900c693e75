"""Traffic policies (issue 4.3, 4.8): weighted splits, shadow copies whose
answers are dropped, and deletion rules, through HTTP and handles."""

import time

import pytest
import requests

import serval
from serval import serve


class Named:
    def __init__(self, name):
        self.name = name
        self.calls = 0

    def __call__(self, request):
        self.calls += 1
        return self.name

    def count(self):
        return self.calls


class Stuck:
    """A shadow that never answers in time: it must not hold up the primary."""

    def __call__(self, request):
        time.sleep(30)
        return "late"


def test_weights_split_requests_and_bad_weights_change_nothing(cluster):
    serve.create_backend("a", Named, "a")
    serve.create_backend("b", Named, "b")
    serve.create_endpoint("split", backend="a", route="/split")
    serve.set_traffic("split", {"a": 0.3, "b": 0.7})

    n = 400
    counts = {"a": 0, "b": 0}
    handle = serve.get_handle("split")
    for i in range(n):
        if i % 2:
            counts[requests.get(f"{cluster.url}/split", timeout=30).text] += 1
        else:
            counts[handle.remote().result()] += 1
    # Binomial(400, 0.3): mean 120, sd ~9.2; 5 sd either side.
    assert 74 <= counts["a"] <= 166, counts

    before = serve.list_endpoints()
    with pytest.raises(serval.ServeError, match="sum to"):
        serve.set_traffic("split", {"a": 0.5, "b": 0.6})
    with pytest.raises(serval.ServeError, match="backend 'nope' does not exist"):
        serve.set_traffic("split", {"a": 0.5, "nope": 0.5})
    assert serve.list_endpoints() == before


def test_shadow_copies_are_sent_dropped_and_never_delay_the_primary(cluster):
    serve.create_backend("primary", Named, "primary")
    serve.create_backend("mirror", Named, "mirror")
    serve.create_backend("stuck", Stuck)
    serve.create_endpoint("svc", backend="primary", route="/svc")
    # Handle-only endpoints to ask the shadows how many copies they saw.
    serve.create_endpoint("mirror_probe", backend="mirror", route=None)

    serve.shadow_traffic("svc", "mirror", 1.0)
    serve.shadow_traffic("svc", "stuck", 1.0)
    assert serve.list_endpoints()["svc"]["shadows"] == {"mirror": 1.0, "stuck": 1.0}
    for _ in range(20):
        # A stuck shadow would make these time out if it delayed the primary.
        assert requests.get(f"{cluster.url}/svc", timeout=10).text == "primary"
    mirror = serve.get_handle("mirror_probe").options(method_name="count")
    deadline_calls = 0
    while mirror.remote().result() < 20:
        deadline_calls += 1
        assert deadline_calls < 2000, "shadow copies did not arrive"

    serve.shadow_traffic("svc", "mirror", 0)
    assert serve.list_endpoints()["svc"]["shadows"] == {"stuck": 1.0}
    seen = mirror.remote().result()
    for _ in range(10):
        requests.get(f"{cluster.url}/svc", timeout=10)
    assert mirror.remote().result() == seen, "a removed shadow still got copies"


def test_delete_backend_refuses_while_used_unless_forced(cluster):
    serve.create_backend("a", Named, "a")
    serve.create_backend("b", Named, "b")
    serve.create_endpoint("ep", backend="a", route="/ep")
    serve.set_traffic("ep", {"a": 0.5, "b": 0.5})
    with pytest.raises(serval.ServeError, match="still used"):
        serve.delete_backend("b")
    serve.delete_backend("b", force=True)
    assert serve.list_endpoints()["ep"]["traffic"] == {"a": 1.0}
    assert all(requests.get(f"{cluster.url}/ep", timeout=30).text == "a" for _ in range(10))

    serve.delete_endpoint("ep")
    # Deleting the endpoint removes its route from the proxy.
    deadline = 0
    while requests.get(f"{cluster.url}/-/routes", timeout=10).json():
        deadline += 1
        assert deadline < 2000
    assert requests.get(f"{cluster.url}/ep", timeout=30).status_code == 404
