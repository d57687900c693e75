"""Model multiplexing: one model cache per replica, shared by Ray Serve 2.x's
``@serve.multiplexed`` and Cortex's ``multi_model_reloading``.

A request names its model with the ``serve_multiplexed_model_id`` header
(over HTTP, or ``handle.options(multiplexed_model_id=...)``, which sends
the same header); ``serve.get_multiplexed_model_id()`` reads it inside the
request. A :class:`ModelCache` keeps at most ``capacity`` loaded models,
least recently used first out: evicting one drops the cache's reference
(and awaits the model's ``__del__`` first when that is a coroutine
function, which Python's collector would not). Concurrent requests for a
model being loaded wait for that one load.

The replica tells routers which models it holds, two ways: the controller
(at most once a second, when it changed: ``Replica.model_ids`` in every
snapshot, for every router), and a reply to a request that
named a model, or any reply of a replica that keeps a model cache, carries
``x-serval-models`` (a JSON list), which the router
takes off the response and uses to send later requests for a model to a
replica that holds it (``proxy/src/routing/router/models.rs``).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import inspect
import json
import logging
import os
import threading
import time
import weakref
from typing import Any, Awaitable, Callable, Optional

logger = logging.getLogger("serval.replica")

#: Ray Serve's request header naming the model.
MODEL_ID_HEADER = "serve_multiplexed_model_id"
_MODEL_ID_HEADER_BYTES = MODEL_ID_HEADER.encode()
#: Replica -> router: the models this replica holds (a JSON list).
MODELS_HEADER = "x-serval-models"
#: Ids longer than this are not reported (the router ignores them too).
MAX_MODEL_ID_BYTES = 256
#: The most ids one report lists (the router keeps no more).
MAX_REPORTED = 64

_model_id: contextvars.ContextVar[str] = contextvars.ContextVar("serval_multiplexed_model_id", default="")

#: Every cache of this process, for the report (weak: a cache goes with
#: the object that made it).
_CACHES: "weakref.WeakSet[ModelCache]" = weakref.WeakSet()


def get_multiplexed_model_id() -> str:
    """The model id the current request names ("" when none)."""
    return _model_id.get()


def model_id_from_scope(scope: dict) -> str:
    for name, value in scope.get("headers") or ():
        if name == _MODEL_ID_HEADER_BYTES:
            return value.decode("latin-1")
    return ""


def model_id_from_headers(headers) -> str:
    for name, value in headers or ():
        if name.lower() == MODEL_ID_HEADER:
            return value
    return ""


def set_model_id(model_id: str):
    """Makes ``model_id`` the current request's; returns the token to reset."""
    return _model_id.set(model_id)


def reset_model_id(token) -> None:
    _model_id.reset(token)


#: Set on every ``@serve.multiplexed`` loader (and pickled with it).
_LOADER_MARK = "_serval_multiplexed"


def uses_multiplexing(code: Any) -> bool:
    """Whether a replica's class (or function) has a multiplexed loader,
    or this process already keeps a model cache: only then do its requests
    pay for looking for a model id."""
    if has_caches() or getattr(code, _LOADER_MARK, False):
        return True
    return any(getattr(v, _LOADER_MARK, False) for klass in getattr(code, "__mro__", ()) for v in vars(klass).values())


def has_caches() -> bool:
    """Whether this process keeps a model cache (then every reply reports)."""
    return bool(_CACHES)


def held_ids() -> list:
    """The ids every cache of this process holds (bounded as routers keep them)."""
    ids: list = []
    for cache in list(_CACHES):
        for key in cache.reported_ids():
            if key and key not in ids and len(key.encode("utf-8", "replace")) <= MAX_MODEL_ID_BYTES:
                ids.append(key)
    return ids[-MAX_REPORTED:]


def held_report() -> Optional[str]:
    """The ``x-serval-models`` value: what every cache here holds; None
    when this process keeps no model cache."""
    if not _CACHES:
        return None
    return json.dumps(held_ids())


class _ControllerReport:
    """Tells the controller which models this replica holds, when that
    changed and at most once every ``REPORT_EVERY_S`` (a raft write each,
    and a snapshot to every watcher): every router, not only those this
    replica answered, then prefers it for them. One daemon thread per
    replica process, started by the first change."""

    REPORT_EVERY_S = 1.0

    def __init__(self):
        self._changed = threading.Event()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def changed(self) -> None:
        replica_id = os.environ.get("SERVAL_REPLICA_ID")
        if not replica_id or not os.environ.get("SERVAL_ADDRESS"):
            return  # not a replica of a cluster
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, args=(replica_id,), daemon=True,
                                                name="serval-model-report")
                self._thread.start()
        self._changed.set()

    def _run(self, replica_id: str) -> None:
        from . import _core

        last: Optional[list] = None
        while True:
            self._changed.wait()
            self._changed.clear()
            ids = held_ids()
            if ids != last:
                try:
                    _core.get_client().report_replica_models(replica_id, ids)
                    last = ids
                except Exception as e:  # the controller may be away: try again later
                    logger.debug("model report failed: %s", e)
                    self._changed.set()
            time.sleep(self.REPORT_EVERY_S)


_REPORT = _ControllerReport()


def with_report(response: tuple) -> tuple:
    """``(status, headers, body)`` with the models report added."""
    report = held_report()
    if report is None:
        return response
    status, headers, body = response
    return status, list(headers) + [(MODELS_HEADER, report)], body


class ReportingReply:
    """Wraps a replica's ``reply``: whatever it sends carries the report
    of the models held when the answer leaves."""

    __slots__ = ("_reply",)

    def __init__(self, reply):
        self._reply = reply

    def send(self, status, headers, body):
        self._reply.send(*with_report((status, headers, body)))

    def start_stream(self, status, headers):
        """A streamed answer carries the report on its head."""
        return self._reply.start_stream(status, with_report((status, headers, b""))[1])

    def __getattr__(self, name):
        # The rest of the reply (stream_key, send_chunk, end_stream, ...).
        return getattr(self._reply, name)


class _Entry:
    __slots__ = ("model", "report_id")

    def __init__(self, model: Any, report_id: str):
        self.model = model
        self.report_id = report_id


class ModelCache:
    """At most ``capacity`` models by key, least recently used evicted.

    ``get_async`` (Ray: the event loop's requests) and ``get_sync``
    (Cortex's ``get_model``, possibly from several handler threads) share
    the entries; a key being loaded is loaded once, by whoever came first.
    ``report_id`` is the name a key is reported to routers under (Ray: the
    model id; Cortex: the model's name, whatever its version).
    """

    def __init__(self, capacity: int):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"the model cache size must be a positive int, got {capacity!r}")
        self.capacity = capacity
        self._entries: "collections.OrderedDict[Any, _Entry]" = collections.OrderedDict()
        self._lock = threading.Lock()
        #: key -> asyncio.Future (async loads) or threading.Event (sync loads).
        self._loading: dict = {}
        _CACHES.add(self)

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list:
        with self._lock:
            return list(self._entries)

    def reported_ids(self) -> list:
        with self._lock:
            return [e.report_id for e in self._entries.values()]

    def _hit(self, key) -> Optional[_Entry]:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def _make_room(self) -> list:
        """Takes out least recently used entries until one more fits."""
        evicted = []
        while len(self._entries) >= self.capacity:
            _, entry = self._entries.popitem(last=False)
            evicted.append(entry)
        return evicted

    # -- asyncio ---------------------------------------------------------

    async def get_async(self, key, load: Callable[[], Any], report_id: Optional[str] = None) -> Any:
        while True:
            with self._lock:
                entry = self._hit(key)
                if entry is not None:
                    return entry.model
                pending = self._loading.get(key)
                if pending is None:
                    future = asyncio.get_running_loop().create_future()
                    self._loading[key] = future
                    evicted = self._make_room()
                    break
            if isinstance(pending, threading.Event):
                await asyncio.get_running_loop().run_in_executor(None, pending.wait)
            else:
                # A failed load fails its waiters too (one load per burst).
                await asyncio.shield(pending)
        try:
            await _unload_all(evicted)
            model = load()
            if inspect.isawaitable(model):
                model = await model
        except BaseException as e:
            with self._lock:
                del self._loading[key]
            _REPORT.changed()  # what was evicted for it is gone
            future.set_exception(e)
            future.exception()  # marked retrieved: no "never retrieved" log when none waits
            raise
        with self._lock:
            # Room was made before the load; another load may have filled it since.
            extra = self._make_room()
            self._entries[key] = _Entry(model, str(key if report_id is None else report_id))
            del self._loading[key]
        _REPORT.changed()
        future.set_result(None)
        await _unload_all(extra)
        return model

    # -- threads ---------------------------------------------------------

    def get_sync(self, key, load: Callable[[], Any], report_id: Optional[str] = None) -> Any:
        while True:
            with self._lock:
                entry = self._hit(key)
                if entry is not None:
                    return entry.model
                pending = self._loading.get(key)
                if pending is None:
                    done = threading.Event()
                    self._loading[key] = done
                    evicted = self._make_room()
                    break
            if isinstance(pending, threading.Event):
                pending.wait()
            else:
                raise RuntimeError("the model is being loaded by an async request; get it with get_async")
        try:
            _unload_all_sync(evicted)
            model = load()
        except BaseException:
            with self._lock:
                del self._loading[key]
            _REPORT.changed()
            done.set()
            raise
        with self._lock:
            extra = self._make_room()
            self._entries[key] = _Entry(model, str(key if report_id is None else report_id))
            del self._loading[key]
        _REPORT.changed()
        done.set()
        _unload_all_sync(extra)
        return model


async def _unload_all(entries: list) -> None:
    """Drops evicted models; an async ``__del__`` is awaited here (the
    collector would only make its coroutine and warn)."""
    for entry in entries:
        # Held only in this list, so clearing it drops the cache's reference.
        held, entry.model = [entry.model], None
        if _has_async_del(held[0]):
            try:
                await type(held[0]).__del__(held[0])
            except Exception as e:
                logger.warning("unloading a model failed: %s", e, exc_info=e)
        _drop(held)


def _unload_all_sync(entries: list) -> None:
    for entry in entries:
        held, entry.model = [entry.model], None
        if _has_async_del(held[0]):
            try:
                asyncio.run(type(held[0]).__del__(held[0]))
            except Exception as e:
                logger.warning("unloading a model failed: %s", e, exc_info=e)
        _drop(held)


def _has_async_del(model: Any) -> bool:
    return inspect.iscoroutinefunction(getattr(type(model), "__del__", None))


def _drop(held: list) -> None:
    """Drops the model in ``held``: a sync ``__del__`` runs now (unless user
    code still holds it). An async one already ran: the collector calls it
    once more and drops the coroutine that makes; that is not worth a
    warning."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)
        held.clear()


_CACHE_ATTR = "_serval_model_caches"


def multiplexed(func: Optional[Callable] = None, *, max_num_models_per_replica: int = 3):
    """``@serve.multiplexed(max_num_models_per_replica=N)`` on a model
    loader ``(self, model_id)`` (async or not; the decorated method is
    async either way, as in Ray): ``await self.get_model(model_id)`` loads
    the model at most once per replica while it stays among the N most
    recently used, which are what this replica reports to routers."""
    if isinstance(max_num_models_per_replica, bool) or not isinstance(max_num_models_per_replica, int) or \
            not (max_num_models_per_replica == -1 or max_num_models_per_replica >= 1):
        raise ValueError("max_num_models_per_replica must be a positive int (or -1 for no limit), got "
                         f"{max_num_models_per_replica!r}")
    capacity = 1 << 30 if max_num_models_per_replica == -1 else max_num_models_per_replica

    def decorate(load: Callable) -> Callable[..., Awaitable[Any]]:
        if not callable(load):
            raise TypeError(f"@serve.multiplexed decorates a function or method, not {type(load).__name__}")
        params = list(inspect.signature(load).parameters)
        is_method = bool(params) and params[0] == "self"

        if is_method:
            @functools.wraps(load)
            async def loader(self, model_id: str):
                caches = self.__dict__.setdefault(_CACHE_ATTR, {})
                cache = caches.get(load)
                if cache is None:
                    cache = caches[load] = ModelCache(capacity)
                return await cache.get_async(_check_id(model_id), lambda: load(self, model_id))
        else:
            shared: list = []

            @functools.wraps(load)
            async def loader(model_id: str):
                if not shared:
                    shared.append(ModelCache(capacity))
                return await shared[0].get_async(_check_id(model_id), lambda: load(model_id))
        setattr(loader, _LOADER_MARK, True)
        return loader

    if func is not None:
        return decorate(func)
    return decorate


def _check_id(model_id: Any) -> str:
    if not isinstance(model_id, str) or not model_id:
        raise ValueError(f"the model id must be a non-empty str, got {model_id!r}")
    return model_id
