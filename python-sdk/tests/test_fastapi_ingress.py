"""FastAPI ingress (issue 23, part 3): ``@serve.ingress(app)`` on a
deployment class, through a real cluster's proxy: path and query
parameters, pydantic bodies (422 on a bad one), dependencies, route methods
that use ``self``, FastAPI's ``/docs`` and ``/openapi.json`` under the
route prefix, two ingress apps side by side, and an ingress composing
another deployment through a ``DeploymentHandle``.

One cluster serves the module (each test uses its own application names
and route prefixes)."""

import contextlib
import os
from typing import Optional

import pytest
import requests
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from pydantic import BaseModel

from conftest import running_cluster, wait_for
from serval import serve

#: Replicas declare no CPU, so many fit on the 2-core test machine.
CPU0 = {"num_cpus": 0}


@pytest.fixture(scope="module")
def shared():
    with pytest.MonkeyPatch.context() as mp:
        with running_cluster(mp) as c:
            yield c


# -- an ingress app ------------------------------------------------------------

shop = FastAPI(title="shop")


class Item(BaseModel):
    name: str
    price: float
    tags: list[str] = []


def caller(x_user: Optional[str] = Header(default=None)) -> str:
    """A dependency: who is calling, from a header."""
    if x_user == "banned":
        raise HTTPException(status_code=403, detail="banned")
    return x_user or "anonymous"


@shop.get("/health")
def health():
    return {"ok": True}


@serve.deployment(ray_actor_options=CPU0)
@serve.ingress(shop)
class Shop:
    def __init__(self, currency: str):
        self.currency = currency
        self.items: dict = {}

    @shop.get("/items/{item_id}")
    def get_item(self, item_id: int, verbose: bool = False, q: Optional[str] = None):
        item = self.items.get(item_id)
        if item is None:
            raise HTTPException(status_code=404, detail=f"no item {item_id}")
        out = {"id": item_id, "name": item["name"], "currency": self.currency, "q": q}
        if verbose:
            out["item"] = item
        return out

    @shop.post("/items/{item_id}", status_code=201)
    async def put_item(self, item_id: int, item: Item, who: str = Depends(caller)):
        self.items[item_id] = item.model_dump()
        return {"stored": item_id, "by": who, "count": len(self.items)}

    @shop.get("/whoami")
    def whoami(self, who: str = Depends(caller)):
        return {"who": who}

    def count(self):
        """A plain method: still callable through a handle."""
        return len(self.items)


# -- a second ingress app, composing another deployment ----------------------

calc = FastAPI()


@serve.deployment(ray_actor_options=CPU0)
class Doubler:
    def __call__(self, x):
        return 2 * x


@serve.deployment(ray_actor_options=CPU0)
@serve.ingress(calc)
class Calc:
    def __init__(self, doubler):
        self.doubler = doubler

    @calc.get("/double/{x}")
    async def double(self, x: int):
        return {"result": await self.doubler.remote(x)}

    @calc.get("/items/{item_id}")
    def same_path_as_shop(self, item_id: str):
        return {"calc": item_id}


def test_fastapi_routes_bodies_dependencies_and_self(shared):
    handle = serve.run(Shop.bind("EUR"), name="shop", route_prefix="/shop")
    url = f"{shared.url}/shop"

    # A route of the app that is not a method.
    assert requests.get(f"{url}/health", timeout=60).json() == {"ok": True}

    # A pydantic body, a path param, a dependency; `self` is the replica's instance.
    r = requests.post(f"{url}/items/7", json={"name": "pen", "price": 1.5}, headers={"x-user": "ann"}, timeout=60)
    assert r.status_code == 201, r.text
    assert r.json() == {"stored": 7, "by": "ann", "count": 1}
    # Path (converted to int) and query params (bool, optional str), state from __init__ and the POST.
    r = requests.get(f"{url}/items/7", params={"verbose": "true", "q": "blue"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json() == {"id": 7, "name": "pen", "currency": "EUR", "q": "blue",
                        "item": {"name": "pen", "price": 1.5, "tags": []}}
    assert requests.get(f"{url}/items/8", timeout=60).status_code == 404

    # Validation errors are FastAPI's 422s.
    bad = requests.post(f"{url}/items/7", json={"name": "pen"}, timeout=60)
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["body", "price"]
    assert requests.get(f"{url}/items/notanint", timeout=60).status_code == 422
    # The dependency refuses; and its default.
    assert requests.get(f"{url}/whoami", headers={"x-user": "banned"}, timeout=60).status_code == 403
    assert requests.get(f"{url}/whoami", timeout=60).json() == {"who": "anonymous"}
    # Unknown paths under the prefix are the app's own 404/405.
    assert requests.get(f"{url}/nope", timeout=60).status_code == 404
    assert requests.delete(f"{url}/items/7", timeout=60).status_code == 405

    # The class's other methods still answer handles.
    assert handle.count.remote().result(timeout_s=60) == 1

    # FastAPI's OpenAPI schema and docs page under the prefix.
    schema = requests.get(f"{url}/openapi.json", timeout=60)
    assert schema.status_code == 200, schema.text
    spec = schema.json()
    assert spec["info"]["title"] == "shop"
    assert {"/items/{item_id}", "/whoami", "/health"} <= set(spec["paths"])
    params = {p["name"] for p in spec["paths"]["/items/{item_id}"]["get"]["parameters"]}
    assert params == {"item_id", "verbose", "q"}  # `self` is no parameter
    assert spec["servers"] == [{"url": "/shop"}]
    docs = requests.get(f"{url}/docs", timeout=60)
    assert docs.status_code == 200 and "text/html" in docs.headers["content-type"]
    assert "/shop/openapi.json" in docs.text
    serve.delete("shop")


def test_two_ingress_apps_side_by_side_and_composition(shared):
    serve.run(Shop.bind("USD"), name="shop2", route_prefix="/a")
    serve.run(Calc.bind(Doubler.bind()), name="calc", route_prefix="/b")
    # The same app path under two prefixes reaches two different apps.
    requests.post(f"{shared.url}/a/items/1", json={"name": "cup", "price": 3}, timeout=60).raise_for_status()
    assert requests.get(f"{shared.url}/a/items/1", timeout=60).json()["currency"] == "USD"
    assert requests.get(f"{shared.url}/b/items/1", timeout=60).json() == {"calc": "1"}
    # The ingress composes another deployment through its handle.
    assert requests.get(f"{shared.url}/b/double/21", timeout=60).json() == {"result": 42}
    # Each app's schema says where it is served.
    assert requests.get(f"{shared.url}/b/openapi.json", timeout=60).json()["servers"] == [{"url": "/b"}]
    assert "/a/openapi.json" in requests.get(f"{shared.url}/a/docs", timeout=60).text
    serve.delete("calc")
    serve.delete("shop2")


@contextlib.asynccontextmanager
async def lifespan(app):
    app.state.loaded = "model-v1"
    yield
    with open(os.environ["LIFESPAN_FILE"], "w") as f:
        f.write("shut down")


life = FastAPI(lifespan=lifespan)


@serve.deployment
@serve.ingress(life)
class Lifed:
    @life.get("/state")
    def state(self, request: Request):
        return {"loaded": request.app.state.loaded}


def test_the_apps_lifespan_runs_around_the_replica(shared, tmp_path):
    done = tmp_path / "shutdown"
    app = Lifed.options(ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": {"LIFESPAN_FILE": str(done)}}})
    serve.run(app.bind(), name="life", route_prefix="/life")
    # Startup ran before the replica served.
    assert requests.get(f"{shared.url}/life/state", timeout=60).json() == {"loaded": "model-v1"}
    assert not done.exists()
    # Shutdown runs when the replica stops.
    serve.delete("life")
    wait_for(done.exists, 60, "the lifespan shutdown")
    assert done.read_text() == "shut down"


def test_ingress_needs_a_class_and_an_app():
    with pytest.raises(TypeError, match="ASGI app"):
        serve.ingress(42)
    with pytest.raises(TypeError, match="decorates a class"):
        serve.ingress(FastAPI())(lambda request: None)
