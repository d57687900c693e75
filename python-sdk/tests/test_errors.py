"""The named exceptions of ``serval``: each raised where the control plane
refuses or cannot answer, told apart by class (never by message), and each
still the ServeError / ValueError / KeyError that callers caught before."""

import pickle

import pytest

import serval
from serval import serve

from conftest import free_port

NAMED = (serval.NotFound, serval.AlreadyExists, serval.InvalidArgument, serval.ControlUnavailable,
         serval.BackPressureError, serval.DeployFailedError, serval.BackendError)


def test_hierarchy_and_pickling():
    for cls in NAMED:
        assert issubclass(cls, serval.ServeError), cls
        assert cls.__name__ in serval.__all__ and getattr(serval, cls.__name__) is cls
    for cls in (serval.NotFound, serval.AlreadyExists, serval.InvalidArgument):
        assert issubclass(cls, serval.ServeValueError) and issubclass(cls, ValueError)
    # get_handle of an unknown endpoint raised KeyError (Ray Serve 1.x).
    assert issubclass(serval.NotFound, KeyError)
    assert issubclass(serval.DeployFailedError, RuntimeError)
    assert not issubclass(serval.ControlUnavailable, ValueError)
    # A replica's error crosses processes pickled: the class comes back.
    error = pickle.loads(pickle.dumps(serval.NotFound("backend 'x' does not exist")))
    assert type(error) is serval.NotFound and str(error) == "backend 'x' does not exist"


def _one(exc, call, *args, **kwargs):
    """The exception ``call`` raises, which must be ``exc`` and no sibling
    of it (a NotFound is no AlreadyExists)."""
    with pytest.raises(exc) as e:
        call(*args, **kwargs)
    others = [c for c in (serval.NotFound, serval.AlreadyExists, serval.InvalidArgument,
                          serval.ControlUnavailable) if c is not exc]
    assert not isinstance(e.value, tuple(others)), (type(e.value), e.value)
    return e.value


def test_named_errors_of_control_calls(cluster):
    # Unknown names: the controller's NOT_FOUND and the SDK's own look-ups.
    _one(serval.NotFound, serve.delete_backend, "nope")
    _one(serval.NotFound, serve.delete_endpoint, "nope")
    _one(serval.NotFound, serve.get_backend_config, "nope")
    _one(serval.NotFound, serve.update_backend, "nope", lambda request: "x")
    _one(serval.NotFound, serve.create_endpoint, "e", backend="nope", route="/e")
    _one(serval.NotFound, serve.get_app_handle, "nope")
    with pytest.raises(KeyError, match="endpoint 'nope' does not exist"):
        serve.get_handle("nope")
    _one(serval.NotFound, serve.get_handle, "nope")
    _one(serval.NotFound, serve.connect().get_blob, "0" * 64)

    # Taken names and routes.
    serve.create_backend("b", lambda request: "hi")
    _one(serval.AlreadyExists, serve.create_backend, "b", lambda request: "hi")
    serve.create_endpoint("e", backend="b", route="/e")
    _one(serval.AlreadyExists, serve.create_endpoint, "e", backend="b", route="/other")
    _one(serval.AlreadyExists, serve.create_endpoint, "e2", backend="b", route="/e")

    # Values the controller refuses.
    _one(serval.InvalidArgument, serve.create_endpoint, "e3", backend="b", route="no-slash")
    _one(serval.InvalidArgument, serve.set_traffic, "e", {"b": 0.0})

    # A refusal of another kind stays a ServeValueError, none of the named.
    in_use = _one(serval.ServeValueError, serve.delete_backend, "b")
    assert "still used" in str(in_use)


def test_control_unavailable_when_no_head_answers(cluster):
    client = serve.connect()
    cluster.kill()
    _one(serval.ControlUnavailable, client.delete_backend, "b", False)
    # A client that cannot reach any head is told the same way.
    _one(serval.ControlUnavailable, serve.connect, f"127.0.0.1:{free_port()}", token="t" * 32)
    _one(serval.InvalidArgument, serve.connect, "not an address", token="t" * 32)
