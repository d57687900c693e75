"""The replica side of a Cortex RealtimeAPI: a Serval backend hosting a
user's ``Handler`` class (seed 000, "Handler", HTTP part).

``serve.create_backend(name, RealtimeAPI, spec, project_dir)`` runs, in each
replica, ``RealtimeAPI(spec, project_dir)``, which sets the process up as
Cortex did (working directory = the project, ``.env`` then ``handler.env`` in
``os.environ``, ``handler.python_path`` on ``sys.path``, the log level),
imports ``handler.path`` and builds ``Handler(config)``. Each HTTP request
then goes to ``handle_<verb>``, which takes any subset of ``payload``,
``query_params`` and ``headers`` by name; the payload is read according to
the request's Content-Type (``read_payload``). What the method returns is
mapped by Serval's host (``serval._host``): JSON, text, bytes or a Starlette
``Response`` as is; a ``(result, callable)`` pair sends ``result`` and runs
the callable after the response was sent (a Starlette background task).

With ``handler.threads_per_process: 1`` (the default) sync handler methods
run inline on the replica's one worker thread, one at a time; with N > 1 they
run on a pool of N threads, so up to N requests run at once (the Handler's
thread safety is the user's business, as in Cortex). ``async def`` methods
interleave on the replica's event loop either way.

``handler.server_side_batching`` (``max_batch_size``, ``batch_interval`` in
seconds) gathers concurrent POST requests into one ``handle_post`` call
(``serval._host.Batcher``): ``payload``, ``query_params`` and ``headers`` are then lists,
one element per request in arrival order, and ``handle_post`` returns a list
of as many results, element i answering request i.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import inspect
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any, Optional

from python_multipart.multipart import parse_options_header
from starlette.background import BackgroundTask, BackgroundTasks
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import _core
from .._host import Batcher, _call_blocking, result_to_http
from ..request import ServeRequest
from .models import ModelNotFound, PythonClient

logger = logging.getLogger("serval.cortex")

#: HTTP verb -> Handler method, in the order ``Allow`` lists them.
HTTP_METHODS = {
    "POST": "handle_post",
    "GET": "handle_get",
    "PUT": "handle_put",
    "PATCH": "handle_patch",
    "DELETE": "handle_delete",
}
#: What a ``handle_<verb>`` method may take, by name: any subset, any order.
REQUEST_ARGS = ("payload", "query_params", "headers")
#: What ``Handler.__init__`` may take, by name. gRPC APIs add
#: ``proto_module_pb2`` or ``module_proto_pb2`` (the compiled
#: ``handler.protobuf_path``; see serval.cortex.grpc_api).
INIT_ARGS = ("config",)

_FORM_TYPES = (b"multipart/form-data", b"application/x-www-form-urlencoded")


class HandlerError(RuntimeError):
    """The project's Handler cannot be loaded or built; the message says
    which API and why (the replica reports it as its failure)."""


class PayloadError(ValueError):
    """A body that cannot be read as its Content-Type says (answered 400)."""


class BatchResultError(ValueError):
    """A batched ``handle_post`` did not return one result per request."""


class _Method:
    """A ``handle_<verb>`` method and what it takes, inspected once at start;
    ``inline``: a sync method run on the loop's thread (no pool, no batching),
    ``batcher``: the Batcher that gathers its requests."""

    __slots__ = ("fn", "args", "is_async", "inline", "batcher")

    def __init__(self, fn, what: str):
        self.fn = fn
        self.args = frozenset(accepted_args(fn, REQUEST_ARGS, what))
        self.is_async = inspect.iscoroutinefunction(fn)
        self.inline = not self.is_async
        self.batcher: Optional[Batcher] = None


class RealtimeAPI:
    """Hosts one Cortex Handler (see the module docs). ``spec`` is a
    validated API (``serval.cortex.config``); keys it does not use are
    ignored. ``project_dir`` defaults to the unpacked ``spec["package"]``."""

    def __init__(self, spec: dict, project_dir: Optional[str] = None):
        self.name = spec.get("name") or "api"
        handler = spec.get("handler") or {}
        project = setup_process(self.name, spec, project_dir)
        handler_class = self._load_handler_class(project, handler.get("path") or "handler.py")
        available = {"config": handler.get("config") or {}}
        models = handler.get("multi_model_reloading")
        if models:
            # Cortex 0.35: Handler(config, model_client), models from load_model;
            # its test APIs and earlier releases name the client python_client.
            if not callable(getattr(handler_class, "load_model", None)):
                raise HandlerError(f"api {self.name!r}: handler.multi_model_reloading is set, so the Handler "
                                   "must define load_model(self, model_path)")
            client = PythonClient(models, project, lambda path: self.handler.load_model(path))
            available["model_client"] = available["python_client"] = client
        self.handler = self._build(handler_class, available)
        self._methods = self._http_methods()
        self._configure_methods(handler)

    def _configure_methods(self, handler: dict) -> None:
        """Threads and server-side batching for the methods of
        ``self._methods`` (shared with the model APIs, serval.cortex.onnx)."""
        self._allow = ", ".join(self._methods)
        threads = int(handler.get("threads_per_process") or 1)
        #: Runs the sync handler methods when threads_per_process > 1.
        self._executor = ThreadPoolExecutor(threads, f"{self.name}-handler") if threads > 1 else None
        #: The batches running (strong references to their tasks).
        self._batches: set = set()
        batching = handler.get("server_side_batching")
        if batching:
            post = self._methods.get("POST")
            if post is None:
                logger.warning("api %r: server_side_batching applies to handle_post, which the Handler lacks",
                               self.name)
            else:
                post.batcher = Batcher(int(batching["max_batch_size"]), float(batching["batch_interval"]),
                                       functools.partial(self._start_batch, post))
        for method in self._methods.values():
            method.inline = not method.is_async and method.batcher is None and self._executor is None

    # -- start -----------------------------------------------------------

    def _load_handler_class(self, project: str, path: str) -> type:
        file = os.path.join(project, path)
        if not os.path.isfile(file):
            raise HandlerError(f"api {self.name!r}: handler.path {path!r} is not a file of the project {project}")
        try:
            module = import_file(file)
        except Exception as e:
            raise HandlerError(f"api {self.name!r}: importing {path} failed: {type(e).__name__}: {e}") from e
        handler_class = getattr(module, "Handler", None)
        if not inspect.isclass(handler_class):
            raise HandlerError(f"api {self.name!r}: {path} defines no class named Handler")
        return handler_class

    def _build(self, handler_class: type, available: dict) -> Any:
        """``Handler(**args)`` with the constructor arguments it names."""
        names = accepted_args(handler_class, tuple(available), f"api {self.name!r}: Handler.__init__")
        try:
            return handler_class(**{n: available[n] for n in names})
        except Exception as e:
            raise HandlerError(f"api {self.name!r}: Handler.__init__ failed: {type(e).__name__}: {e}") from e

    def _http_methods(self) -> dict:
        """Verb -> _Method for each ``handle_<verb>`` the Handler defines."""
        methods = {}
        for verb, attr in HTTP_METHODS.items():
            fn = getattr(self.handler, attr, None)
            if callable(fn):
                methods[verb] = _Method(fn, f"api {self.name!r}: Handler.{attr}")
        if not methods:
            raise HandlerError(f"api {self.name!r}: Handler defines none of {', '.join(HTTP_METHODS.values())}")
        return methods

    # -- requests --------------------------------------------------------

    async def __call__(self, request: Request):
        method = self._methods.get(request.method)
        if method is None:
            return error_response(405, f"api '{self.name}' does not handle {request.method} requests "
                                       f"(it handles {self._allow})", {"Allow": self._allow})
        kwargs = {}
        if "query_params" in method.args:
            kwargs["query_params"] = dict(request.query_params)
        if "headers" in method.args:
            kwargs["headers"] = dict(request.headers)
        if "payload" in method.args:
            try:
                kwargs["payload"] = await read_payload(request)
            except PayloadError as e:
                return error_response(400, str(e))
        try:
            if method.inline:  # the fast path
                result = _call_blocking(method.fn, (), kwargs)
            elif method.batcher is not None:
                result = await self._batched(method, kwargs)
            else:
                result = await self._run(method, kwargs)
        except ModelNotFound as e:
            return error_response(404, str(e))
        finally:
            # Uploaded files stay open while the handler runs, no longer.
            payload = kwargs.get("payload")
            if isinstance(payload, FormData):
                await payload.close()
        if isinstance(result, tuple) and len(result) == 2 and callable(result[1]):
            return self._with_callback(*result)
        return result

    async def _run(self, method: _Method, kwargs: dict) -> Any:
        """Calls a handler method: awaited when async, on the thread pool
        when there is one, else inline."""
        if method.is_async:
            return await method.fn(**kwargs)
        if self._executor is None:
            return _call_blocking(method.fn, (), kwargs)
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(method.fn, **kwargs))

    # -- server-side batching ------------------------------------------

    def _batched(self, method: _Method, kwargs: dict) -> asyncio.Future:
        """Adds one request to the method's open batch; its future gets its
        element of the batch's result (or the error response of a failed
        batch)."""
        future = asyncio.get_running_loop().create_future()
        method.batcher.add((kwargs, future))
        return future

    def _start_batch(self, method: _Method, batch: list) -> None:
        task = asyncio.get_running_loop().create_task(self._run_batch(method, batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _run_batch(self, method: _Method, batch: list) -> None:
        # Requests already given up (their replica is stopping) are left out.
        batch = [(kwargs, future) for kwargs, future in batch if not future.done()]
        if not batch:
            return
        n = len(batch)
        lists = {name: [kwargs[name] for kwargs, _ in batch] for name in method.args}
        try:
            results = await self._run(method, lists)
            if not isinstance(results, (list, tuple)) or len(results) != n:
                got = f"{len(results)} results" if isinstance(results, (list, tuple)) \
                    else f"a {type(results).__name__}"
                raise BatchResultError(f"handle_post returned {got} for a batch of {n} requests; with "
                                       f"server_side_batching it must return a list of {n} results, one per request")
        except Exception as e:
            logger.error("api %r: handle_post failed for a batch of %d requests", self.name, n, exc_info=e)
            results = [error_response(500, f"{type(e).__name__}: {e}") for _ in range(n)]
        except BaseException as e:  # cancelled, or the replica stops (SystemExit & co.)
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
            raise
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)

    def _with_callback(self, result: Any, callback) -> Response:
        """``result`` as a Response that runs ``callback`` once it was sent.
        A result that cannot be sent (not JSON serializable) answers its 500
        without the callback, as Cortex failed before reaching it."""
        if isinstance(result, Response):
            response = result
        else:
            status, headers, body = result_to_http(result, self.name)
            response = Response(body, status, headers=dict(headers))
            if status != 200:
                return response
        task = BackgroundTask(run_callback, callback, self._executor)
        response.background = task if response.background is None else BackgroundTasks([response.background, task])
        return response


# -- the process -------------------------------------------------------------


def setup_process(name: str, spec: dict, project_dir: Optional[str]) -> str:
    """Sets this replica process up as Cortex set up its API containers and
    returns the project directory: working directory, ``.env`` and
    ``handler.env``, ``handler.python_path``, the API's pip requirements,
    the log level."""
    handler = spec.get("handler") or {}
    project = resolve_project_dir(spec, project_dir)
    # Handler code opens project files by relative path.
    os.chdir(project)
    set_environment(dotenv_values(spec), handler.get("env"))
    # The labels of serval.log's lines.
    os.environ["SERVAL_API_NAME"] = name
    os.environ["SERVAL_API_KIND"] = spec.get("kind") or "RealtimeAPI"
    set_python_path(project, handler.get("python_path"))
    # Cortex handlers `import cortex_internal.lib.log` (and `import cortex`:
    # the SDK's top-level package).
    sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "compat"))
    install_requirements(name, project, (handler.get("dependencies") or {}).get("pip"))
    set_log_level(handler.get("log_level"))
    return project


def resolve_project_dir(spec: dict, project_dir: Optional[str]) -> str:
    """``project_dir``, else the package ``spec["package"]`` unpacked on this
    node (fetched from the cluster's blob store once per node)."""
    if project_dir:
        return os.path.abspath(project_dir)
    digest = spec.get("package")
    if not digest:
        raise HandlerError(f"api {spec.get('name')!r}: no project folder: give project_dir or spec['package']")
    from .package import ensure_unpacked

    return ensure_unpacked(digest, fetch_blob)


def fetch_blob(digest: str, timeout: float = 30.0) -> bytes:
    """The package's bytes from the cluster's store. A head that has not yet
    applied a just-committed upload answers NOT_FOUND for a moment: retry."""
    from serval import NotFound

    deadline = time.monotonic() + timeout
    while True:
        try:
            return cluster_client().get_blob(digest)
        except NotFound:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def cluster_client():
    """The control client of the cluster this replica runs in (the node
    agent gives replicas SERVAL_ADDRESS and SERVAL_TOKEN)."""
    return _core.current() or _core.connect()


def dotenv_values(spec: dict) -> Optional[dict]:
    """The project's ``.env`` values: from their blob (``serve deploy`` keeps
    them out of the spec every watcher sees; serval.cortex.deploy), or a
    spec's own ``dotenv`` (a spec built in code). Never written to disk."""
    digest = spec.get("dotenv_blob")
    if not digest:
        return spec.get("dotenv")
    try:
        return json.loads(fetch_blob(digest))["values"]
    except (ValueError, KeyError, TypeError) as e:
        raise HandlerError(f"api {spec.get('name')!r}: the .env blob {digest} cannot be read: {e}") from None


def set_environment(dotenv: Optional[dict], env: Optional[dict]) -> None:
    # .env first, then handler.env: the API's own config wins.
    for source in (dotenv or {}, env or {}):
        for key, value in source.items():
            os.environ[str(key)] = str(value)


def set_python_path(project: str, python_path: Optional[str]) -> None:
    """``handler.python_path`` (relative to the project) then the project
    itself, ahead of everything else on ``sys.path``."""
    paths = [os.path.normpath(os.path.join(project, python_path or ".")), project]
    sys.path[:0] = list(dict.fromkeys(paths))


def install_requirements(name: str, project: str, pip_file: Optional[str]) -> None:
    """Puts the API's ``dependencies.pip`` packages (installed once per node
    and content) first on sys.path."""
    from .package import ensure_requirements

    try:
        site = ensure_requirements(project, pip_file or "requirements.txt")
    except RuntimeError as e:
        raise HandlerError(f"api {name!r}: {e}") from None
    if site:
        sys.path.insert(0, site)


def set_log_level(level: Optional[str]) -> None:
    logging.getLogger().setLevel((level or "info").upper())


def import_file(path: str) -> ModuleType:
    """Imports a source file as the module named after its stem, registered
    in ``sys.modules`` first so that pickle and imports of it by name work."""
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not a Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def accepted_args(fn, allowed: tuple, what: str) -> tuple:
    """The names among ``allowed`` that ``fn`` (a function or a class) takes
    by keyword; a HandlerError when it requires anything else."""
    names = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in allowed and p.kind != p.POSITIONAL_ONLY:
            names.append(p.name)
        elif p.default is p.empty:
            raise HandlerError(f"{what} requires an argument '{p.name}'; it may take {', '.join(allowed)} "
                               "(by name)")
    return tuple(names)


# -- requests ----------------------------------------------------------------


async def read_payload(request: Request) -> Any:
    """The body as Cortex gave it to ``payload``, by Content-Type (media type
    case-insensitive; of the parameters only ``charset`` counts):
    application/json: parsed JSON; multipart/form-data and
    application/x-www-form-urlencoded: a FormData (the caller closes it);
    text/plain: str in its charset (utf-8 by default); else raw bytes.
    A handle call (``handle.options(http_method="POST").remote(obj)``) with
    no Content-Type gets its Python argument itself."""
    if isinstance(request, ServeRequest) and "content-type" not in request.headers:
        return request.data
    media_type, params = parse_options_header(request.headers.get("content-type"))
    if media_type == b"application/json":
        return parse_json(await request.body())
    if media_type in _FORM_TYPES:
        try:
            return await request.form()
        except MultiPartException as e:
            raise PayloadError(f"the body is not valid {media_type.decode()}: {e.message}") from e
    if media_type == b"text/plain":
        charset = params.get(b"charset")
        return decode_text(await request.body(), charset.decode("latin-1") if charset else "utf-8")
    return await request.body()


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError as e:
        raise PayloadError(f"the body is not valid JSON (Content-Type: application/json): {e}") from e


def decode_text(body: bytes, charset: str) -> str:
    try:
        return body.decode(charset)
    except LookupError as e:
        raise PayloadError(f"unknown charset {charset!r} in Content-Type") from e
    except UnicodeDecodeError as e:
        raise PayloadError(f"the body is not valid {charset} text: {e}") from e


def error_response(status: int, message: str, headers: Optional[dict] = None) -> Response:
    """A JSON error in the shape Serval's host answers errors with."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def run_callback(callback, executor: Optional[ThreadPoolExecutor] = None) -> None:
    """Runs a handler's callback after its response was sent (sync ones as
    sync handler methods run: inline, or on ``executor``; async ones
    awaited); its errors are logged only."""
    try:
        if executor is None or inspect.iscoroutinefunction(callback):
            result = _call_blocking(callback, (), None)
        else:
            result = await asyncio.get_running_loop().run_in_executor(executor, callback)
        if inspect.isawaitable(result):
            await result
    except Exception:
        logger.exception("a callback returned by a handler method failed")
