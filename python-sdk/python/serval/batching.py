"""``@serve.batch``: application-level batching (Ray Serve >= 1.2).

Decorates an ``async def`` function or method that takes lists and returns
a list with one result per element. Callers call it with single values
(``await self.handle_batch(request)``); calls arriving while a batch is
being collected join it, and each caller gets its own result (or the
batch's exception). Batches run one at a time per function (per instance
for a method): a batch goes out with ``max_batch_size`` calls, or
``batch_wait_timeout_s`` seconds after it started collecting; calls that
arrive while it runs wait for the next one, as in Ray Serve. Plain asyncio:
it works in a replica (concurrent HTTP requests and handle calls to an
async backend) and in any event loop.

Each parameter (besides ``self``) receives the list of the values the
callers passed for it, so ``async def f(self, a, b)`` called as ``f(1, b=2)``
and ``f(3, b=4)`` runs ``f([1, 3], [2, 4])``.

An async generator is batched too (Ray Serve 2.x): each list it yields
has one item per call, and each caller's generator yields its own item; a
``StopIteration`` in a caller's place ends that caller's stream early.
Each caller has a window of items; a caller that lags fills it and holds
the batch's generator back. A caller that stops listening is skipped, and
the batch's generator is closed once every caller stopped.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
from typing import Any, Callable, Optional

__all__ = ["batch"]


class BatchResultError(TypeError):
    """A batched function did not return one result per call in the batch."""


def _check_max_batch_size(value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"max_batch_size must be an integer >= 1, not {value!r}")
    if value < 1:
        raise ValueError(f"max_batch_size must be an integer >= 1, not {value}")
    return value


def _check_timeout(value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"batch_wait_timeout_s must be a number >= 0, not {value!r}")
    if value < 0:
        raise ValueError(f"batch_wait_timeout_s must be a number >= 0, not {value}")
    return float(value)


#: Items a streaming call of a batch may have unread before the batch waits.
STREAM_WINDOW = 16

_END = object()


class _Raised:
    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


class _Channel:
    """One call's items from a batched generator (its place in the batch's
    waiting deque, where plain calls have a future)."""

    def __init__(self):
        self.items: asyncio.Queue = asyncio.Queue(STREAM_WINDOW)
        self.gone = False
        self.ended = False

    def done(self) -> bool:
        return self.gone or self.ended

    async def put(self, item: Any) -> None:
        if item is _END or isinstance(item, _Raised):
            self.ended = True
        if not self.gone:
            await self.items.put(item)

    async def get(self) -> Any:
        """The caller's next item; StopAsyncIteration at its end. Here, not
        in the wrapper: a deployment's code is pickled by value, wrapper
        and all, and a copied ``_END`` is another object."""
        item = await self.items.get()
        if item is _END:
            raise StopAsyncIteration
        if isinstance(item, _Raised):
            raise item.error
        return item

    def leave(self) -> None:
        """The caller stopped listening: later items are dropped, and a
        batch waiting for room in its window goes on."""
        self.gone = True
        while not self.items.empty():
            self.items.get_nowait()


class _Queue:
    """The calls waiting for one batched function (of one instance), in one
    event loop, and the task running their batches (none while idle)."""

    def __init__(self, call: Callable, max_batch_size: int, timeout: float):
        self.call = call
        self.max_batch_size = max_batch_size
        self.timeout = timeout
        self.loop = asyncio.get_running_loop()
        self.waiting: collections.deque = collections.deque()
        self.arrived = asyncio.Event()
        self.worker: Optional[asyncio.Task] = None

    def put(self, arguments: tuple, stream: bool = False):
        """Queues one call's ``(positional values, keyword values)``: its
        future, or for a generator its :class:`_Channel`."""
        future = _Channel() if stream else self.loop.create_future()
        self.waiting.append((arguments, future))
        self.arrived.set()
        if self.worker is None or self.worker.done():
            self.worker = self.loop.create_task(self._run())
        return future

    async def _run(self) -> None:
        while self.waiting:
            deadline = self.loop.time() + self.timeout
            while len(self.waiting) < self.max_batch_size:
                remaining = deadline - self.loop.time()
                if remaining <= 0:
                    break
                self.arrived.clear()
                try:
                    await asyncio.wait_for(self.arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = [self.waiting.popleft() for _ in range(min(self.max_batch_size, len(self.waiting)))]
            batch = [(arguments, future) for arguments, future in batch if not future.done()]
            if batch:
                await self._execute(batch)

    async def _execute(self, batch: list) -> None:
        # One list per parameter: calls bound with defaults applied all
        # carry the same parameters.
        positional = [list(values) for values in zip(*(args for (args, _), _ in batch))]
        keywords = {name: [kwargs[name] for (_, kwargs), _ in batch] for name in batch[0][0][1]}
        if isinstance(batch[0][1], _Channel):
            await self._stream(batch, self.call(*positional, **keywords))
            return
        try:
            results = await self.call(*positional, **keywords)
            if not isinstance(results, (list, tuple)) or len(results) != len(batch):
                got = f"{len(results)} results" if isinstance(results, (list, tuple)) else \
                    f"a {type(results).__name__}"
                raise BatchResultError(
                    f"@serve.batch function {getattr(self.call, '__qualname__', self.call)!r} returned {got} "
                    f"for a batch of {len(batch)} calls; it must return a list with one result per call")
        except Exception as e:
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
            return
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)


    async def _stream(self, batch: list, generator: Any) -> None:
        """Hands each list the batch's generator yields out, item by item."""
        channels = [channel for _, channel in batch]
        try:
            async for results in generator:
                if not isinstance(results, (list, tuple)) or len(results) != len(batch):
                    got = f"{len(results)} items" if isinstance(results, (list, tuple)) else \
                        f"a {type(results).__name__}"
                    raise BatchResultError(
                        f"@serve.batch generator {getattr(self.call, '__qualname__', self.call)!r} yielded {got} "
                        f"for a batch of {len(batch)} calls; it must yield lists with one item per call")
                for channel, item in zip(channels, results):
                    if channel.done():
                        continue
                    await channel.put(_END if item is StopIteration or isinstance(item, StopIteration) else item)
                if all(channel.done() for channel in channels):
                    break
        except Exception as e:
            for channel in channels:
                if not channel.done():
                    await channel.put(_Raised(e))
        finally:
            await generator.aclose()
        for channel in channels:
            if not channel.done():
                await channel.put(_END)


def batch(_func: Optional[Callable] = None, max_batch_size: int = 10, batch_wait_timeout_s: float = 0.0):
    """Batches calls to an ``async def`` function or method: used bare
    (``@serve.batch``) or with options (``@serve.batch(max_batch_size=8,
    batch_wait_timeout_s=0.1)``). TypeError for a function that is not
    ``async def`` or an option of the wrong type, ValueError for
    ``max_batch_size < 1`` or a negative timeout."""
    if _func is not None and not callable(_func):
        raise TypeError("@serve.batch decorates functions and methods; pass its options by keyword")
    max_batch_size = _check_max_batch_size(max_batch_size)
    timeout = _check_timeout(batch_wait_timeout_s)

    def decorate(func: Callable) -> Callable:
        streaming = inspect.isasyncgenfunction(func)
        if not inspect.iscoroutinefunction(func) and not streaming:
            raise TypeError(f"functions decorated with @serve.batch must be 'async def' ({func.__qualname__} is not)")
        signature = inspect.signature(func)
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()):
            raise TypeError(f"@serve.batch cannot batch {func.__qualname__}: *args and **kwargs have no per-call "
                            "value to collect into a list")
        attribute = f"_serve_batch_queue_{func.__name__}"
        # One queue per loop for a function; per instance (and loop) for a method.
        function_queue: list = [None]

        def queue_for(instance: Any) -> _Queue:
            loop = asyncio.get_running_loop()
            queue = function_queue[0] if instance is None else instance.__dict__.get(attribute)
            if queue is None or queue.loop is not loop:
                call = func if instance is None else functools.partial(func, instance)
                queue = _Queue(call, max_batch_size, timeout)
                if instance is None:
                    function_queue[0] = queue
                else:
                    instance.__dict__[attribute] = queue
            return queue

        def arguments(args: tuple, kwargs: dict, instance: Any) -> tuple:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            positional, keywords = [], {}
            for index, (name, value) in enumerate(bound.arguments.items()):
                if index == 0 and instance is not None:
                    continue
                if signature.parameters[name].kind is inspect.Parameter.KEYWORD_ONLY:
                    keywords[name] = value
                else:
                    positional.append(value)
            return positional, keywords

        if streaming:
            @functools.wraps(func)
            async def stream_wrapper(*args: Any, **kwargs: Any) -> Any:
                instance = _instance_of(args, stream_wrapper)
                channel = queue_for(instance).put(arguments(args, kwargs, instance), stream=True)
                try:
                    while True:
                        try:
                            item = await channel.get()
                        except StopAsyncIteration:
                            return
                        yield item
                finally:
                    channel.leave()

            return stream_wrapper

        @functools.wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            instance = _instance_of(args, wrapper)
            return await queue_for(instance).put(arguments(args, kwargs, instance))

        return wrapper

    return decorate(_func) if _func is not None else decorate


def _instance_of(args: tuple, wrapper: Callable) -> Any:
    """``self`` when the wrapper was called as a method, else None."""
    if args:
        bound = getattr(args[0], wrapper.__name__, None)
        if getattr(bound, "__func__", None) is wrapper:
            return args[0]
    return None
