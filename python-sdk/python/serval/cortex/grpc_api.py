"""The replica side of a Cortex gRPC API (seed 000, "gRPC"): a RealtimeAPI
whose ``handler.protobuf_path`` names a .proto file. The proxies terminate
its calls and send them on the replica's frame connection (below); with
``SERVAL_GRPC_FRAMES=0`` in the cluster's environment they forward them to
a grpcio server in the replica instead, which only then starts.

At deploy, ``serval.cortex.config.compile_proto`` compiled the proto; its
generated ``<stem>_pb2`` module (and those of the project protos it imports)
and the FileDescriptorSet travel in the package under
``handler.grpc.package_dir``, so replicas need protobuf only (and grpcio
on the forwarding path), not grpcio-tools. ``GrpcAPI(spec)`` sets the
process up as ``RealtimeAPI`` does, imports that module, builds
``Handler(config, proto_module_pb2)`` (each by name, as the Handler's
``__init__`` takes them; ``module_proto_pb2`` is the same module under the
other name Cortex's documentation uses) and, on the forwarding path,
starts a grpcio server on ``$SERVAL_REPLICA_HOST:0`` (the replica's TCP
host, set by ``serval.replica``; 127.0.0.1 by default) with a generic handler for the
proto's one service. ``serval_grpc_address`` ("host:port") is what the
replica reports as ``grpc_addr``; the proxies forward the HTTP/2 streams of
``/<package>.<Service>/<Method>`` calls to it unchanged. When the node has
``--tls-cert/--tls-key`` (``SERVAL_TLS_CERT``/``SERVAL_TLS_KEY`` in the
replica's environment) the server serves TLS only, with that certificate,
as the replica's frame port does; proxies verify it with ``--tls-ca``.

Each RPC calls the Handler's method of the same name with any subset of
``payload`` and ``context`` (by name):

* ``payload``: the request message; for client streaming (``stream`` input)
  an iterator of request messages.
* ``context``: a :class:`Context` with what a Handler uses of grpcio's
  ``ServicerContext`` (on the forwarding path grpcio's own): ``set_code``,
  ``set_details``, ``abort``, ``invocation_metadata``, ``time_remaining``,
  ``is_active``... The call ends at the client's deadline
  (``grpc-timeout``), after which ``context.is_active()`` is False.
* Unary output: the method returns the response message. Server streaming
  (``stream`` output): the method yields responses (or returns an iterable
  of them); each reaches the client as it is yielded.

The method's errors: an exception becomes status INTERNAL with details
``"<ExceptionType>: <message>"`` (the traceback goes to the replica's log);
a method that set a status itself (``context.abort``, ``context.set_code``)
keeps it. A result that is not the RPC's output message is INTERNAL too,
naming both types. An RPC of the service that the Handler lacks answers
UNIMPLEMENTED naming the method; it does not stop the API from starting.

By default calls reach the replica without grpcio: the proxy terminates
gRPC itself and sends each call as a ``Payload::Grpc`` frame on its
replica connection; the replica's ``serval_grpc_call`` decodes the
message with the generated class, calls the Handler with a :class:`Context` (grpcio's
``ServicerContext`` methods a Handler uses) and answers the status and the
reply message's bytes. The statuses, details and deadlines are those of the
grpcio path. Unary calls run on a pool of ``threads_per_process`` threads
when it is above 1, and inline on the replica's worker thread, one at a
time, with 1 (as a RealtimeAPI's HTTP requests do). A server-streaming call
is answered with an async generator of reply message bytes that the
replica's host streams as it does an HTTP generator (the messages yielded
in a burst, without the loop turning in between, gathered length-prefixed
into one chunk frame, the first at once; paced by the proxy's credits,
closed when the client goes away: the Handler's generator is closed where
it stands and ``is_active()`` turns False); a sync generator is advanced
on that pool (inline with 1, each reply leaving before the next ``next()``).
A client-streaming or bidirectional call's request messages follow as
frames: the Handler, on that pool (on a pool of one thread with 1, since
it waits for messages the replica's worker thread delivers), iterates
them as they come (:class:`_Requests`, credited back to the proxy as it
takes them), and its replies go back as a server stream's do.

Sync methods run on a pool of ``handler.threads_per_process`` threads (at
least 1), so that many calls run at once; ``async def`` methods (and async
generators) run to completion on an event loop of the calling thread.
HTTP requests to the replica are answered 404: a gRPC API has no route.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import importlib
import inspect
import logging
import os
import queue
import sys
import time
import traceback
import types
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional

from .._host import SendNow, _call_blocking, _grpc_message
from .config import DESCRIPTOR_SET_NAME
from .realtime import HandlerError, RealtimeAPI, accepted_args, error_response, setup_process

logger = logging.getLogger("serval.cortex")

#: What a gRPC method of the Handler may take, by name.
RPC_ARGS = ("payload", "context")
#: The replica's host, set by serval.replica from ``--tcp-host``.
HOST_ENV = "SERVAL_REPLICA_HOST"
#: The node's certificate chain and key (PEM), set by its agent when it has
#: ``--tls-cert/--tls-key``.
TLS_CERT_ENV, TLS_KEY_ENV = "SERVAL_TLS_CERT", "SERVAL_TLS_KEY"
#: ``SERVAL_GRPC_FRAMES=0`` in the cluster's environment (the proxies'
#: and, inherited through the node agents, the replicas'): the proxies
#: forward calls to a grpcio server in each replica instead of terminating
#: them; only then does the replica start one.
FRAMES_ENV = "SERVAL_GRPC_FRAMES"


def forwarding() -> bool:
    """Whether the proxies forward gRPC calls to a grpcio server here."""
    return os.environ.get(FRAMES_ENV, "").strip() == "0"


#: Seconds in-flight calls get to finish when the replica stops (its node
#: agent kills it 5 s after asking it to stop).
STOP_GRACE_S = 3.0


def _server_credentials():
    """TLS credentials from the node's certificate and key, or None."""
    import grpc

    cert, key = os.environ.get(TLS_CERT_ENV), os.environ.get(TLS_KEY_ENV)
    if not cert:
        return None
    try:
        with open(cert, "rb") as f:
            chain = f.read()
        with open(key or "", "rb") as f:
            private_key = f.read()
    except OSError as e:
        raise HandlerError(f"cannot read the node's TLS certificate or key ({TLS_CERT_ENV}/{TLS_KEY_ENV}): {e}")
    return grpc.ssl_server_credentials([(private_key, chain)])


def load_proto_module(project: str, grpc_spec: dict) -> types.ModuleType:
    """The generated module of the API's proto (``grpc_spec["module"]``),
    from the package's generated folder (put first on ``sys.path``, so that
    the Handler can also ``import <stem>_pb2`` itself). A protobuf runtime
    older than the grpcio-tools that generated it refuses the generated code
    (VersionError): the module is then built from the descriptor set."""
    gen_dir = os.path.join(project, grpc_spec["package_dir"])
    if not os.path.isdir(gen_dir):
        raise HandlerError(f"the package has no generated gRPC modules ({grpc_spec['package_dir']}); "
                           "deploy the project again")
    if gen_dir not in sys.path:
        sys.path.insert(0, gen_dir)
    from google.protobuf.runtime_version import VersionError

    try:
        return importlib.import_module(grpc_spec["module"])
    except VersionError as e:
        logger.warning("the generated %s does not load with this protobuf runtime (%s); building it from the "
                       "descriptor set", grpc_spec["module"], e)
        with open(os.path.join(gen_dir, DESCRIPTOR_SET_NAME), "rb") as f:
            return module_from_descriptor_set(f.read(), grpc_spec["proto_file"], grpc_spec["module"])


def module_from_descriptor_set(data: bytes, proto_file: str, module_name: str) -> types.ModuleType:
    """A module with what a generated ``_pb2`` module offers (``DESCRIPTOR``,
    the message classes, enums and enum values of ``proto_file``), built
    from a serialized FileDescriptorSet by this protobuf runtime; registered
    as ``module_name`` in ``sys.modules``."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from google.protobuf.internal import enum_type_wrapper

    pool = descriptor_pool.Default()
    for file in descriptor_pb2.FileDescriptorSet.FromString(data).file:  # dependencies first
        try:
            pool.FindFileByName(file.name)
        except KeyError:
            pool.AddSerializedFile(file.SerializeToString())
    fd = pool.FindFileByName(proto_file)
    module = types.ModuleType(module_name)
    module.DESCRIPTOR = fd
    for name, md in fd.message_types_by_name.items():
        setattr(module, name, message_factory.GetMessageClass(md))
    for name, ed in fd.enum_types_by_name.items():
        setattr(module, name, enum_type_wrapper.EnumTypeWrapper(ed))
        for value in ed.values:
            setattr(module, value.name, value.number)
    sys.modules[module_name] = module
    return module


#: gRPC status codes by name, numbered as grpcio's ``StatusCode``.
STATUS_CODES = {name: n for n, name in enumerate((
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"))}


def status_number(code) -> int:
    """A status as its number: grpcio's ``StatusCode`` (whose value is
    ``(number, name)``), a number, or a name."""
    value = getattr(code, "value", code)
    if isinstance(value, tuple):
        value = value[0]
    if isinstance(value, str):
        return STATUS_CODES.get(value.upper(), STATUS_CODES["UNKNOWN"])
    return int(value)


def _status_reply(code: int, details: str, body: bytes = b"") -> tuple:
    """The answer to a ``Payload::Grpc`` call (see ``serval_protos::frame``)."""
    return 200, [("grpc-status", str(code)), ("grpc-message", details)], body


class _Aborted(Exception):
    """Raised by :meth:`Context.abort`: the call ends with the status set."""


class _StreamStatus(Exception):
    """Ends a streamed call with a status other than a plain OK: the
    replica's host sends ``grpc_answer`` as the stream's error frame, whose
    status and details the proxy puts in the trailers."""

    def __init__(self, answer: tuple):
        super().__init__(dict(answer[1]).get("grpc-message", ""))
        self.grpc_answer = answer


#: What ``next`` returns at the end of a Handler's sync iterator (a
#: StopIteration cannot cross a future).
_END = object()
#: The frame protocol's STREAM_WINDOW: request messages a client stream
#: may have queued here beyond those credited back to the proxy.
STREAM_WINDOW = 16


class _Requests:
    """A client stream's request messages, as the Handler iterates them (on
    a pool thread): fed by the replica's loop as their frames come, at most
    STREAM_WINDOW waiting (the proxy sends no more than credited), each one
    taken credited back to the proxy in half windows. Ends at the client's
    half-close, or when the call is cancelled (the Handler then sees
    ``is_active()`` False)."""

    def __init__(self, decode, reply, context: Context):
        self._decode = decode
        self._reply = reply
        self._context = context
        self._queue = queue.SimpleQueue()
        self._taken = 0
        self._ended = False

    def feed(self, message: Optional[bytes]) -> bool:
        """Queues a message (None: the end); False beyond the window."""
        if self._queue.qsize() > STREAM_WINDOW:
            return False
        self._queue.put(_END if message is None else message)
        return True

    def cancel(self) -> None:
        self._queue.put(_END)

    def __iter__(self):
        return self

    def __next__(self):
        while not self._ended:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                if self._context.is_active():
                    continue
                item = _END  # the deadline passed
            if item is _END:
                self._ended = True
                break
            self._taken += 1
            if self._taken >= STREAM_WINDOW // 2:
                self._reply.grant_requests(self._taken)
                self._taken = 0
            return self._decode(item)
        raise StopIteration


class Context:
    """A Handler's ``context`` on a call the proxy terminated: the methods
    of grpcio's ``ServicerContext`` a Handler uses. The call is active until
    the client's deadline passes."""

    def __init__(self, metadata: tuple, timeout: Optional[float]):
        self._metadata = metadata
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._code = None
        self._details = ""
        self._trailing: tuple = ()
        self._cancelled = False

    def cancel(self) -> None:
        """The client went away (a stream it reset): the call is inactive."""
        self._cancelled = True

    def invocation_metadata(self) -> tuple:
        return self._metadata

    def time_remaining(self) -> Optional[float]:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def expired(self) -> bool:
        """The client's deadline has passed."""
        return self._deadline is not None and time.monotonic() >= self._deadline

    def is_active(self) -> bool:
        return not self._cancelled and not self.expired()

    def set_code(self, code) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self):
        return self._code

    def details(self) -> str:
        return self._details

    def abort(self, code, details: str = ""):
        self._code, self._details = code, details
        raise _Aborted(details)

    def abort_with_status(self, status):
        self.abort(status.code, status.details)

    def set_trailing_metadata(self, metadata) -> None:
        # Kept for the Handler to read back; not sent (see ARCHITECTURE.md).
        self._trailing = tuple(metadata)

    def trailing_metadata(self) -> tuple:
        return self._trailing

    def peer(self) -> str:
        return ""


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class _Rpc:
    """One method of the service: the Handler's method and how to call it."""

    def __init__(self, api: "GrpcAPI", method, fn: Optional[Callable]):
        from google.protobuf import message_factory

        self.api = api
        self.name = method.name
        self.path = f"/{method.containing_service.full_name}/{method.name}"
        self.client_streaming = bool(method.client_streaming)
        self.server_streaming = bool(method.server_streaming)
        self.input_class = message_factory.GetMessageClass(method.input_type)
        self.output_class = message_factory.GetMessageClass(method.output_type)
        self.fn = fn
        self.args = frozenset(accepted_args(fn, RPC_ARGS, f"api {api.name!r}: Handler.{method.name}")) \
            if fn is not None else frozenset()

    def handler(self):
        """The grpcio RpcMethodHandler of this method."""
        import grpc

        shape = {(False, False): grpc.unary_unary_rpc_method_handler,
                 (False, True): grpc.unary_stream_rpc_method_handler,
                 (True, False): grpc.stream_unary_rpc_method_handler,
                 (True, True): grpc.stream_stream_rpc_method_handler}[(self.client_streaming, self.server_streaming)]
        if self.fn is None:
            behaviour = self.unimplemented
        elif self.server_streaming:
            behaviour = self.call_streaming
        else:
            behaviour = self.call_unary
        return shape(behaviour, request_deserializer=self.input_class.FromString,
                     response_serializer=self.output_class.SerializeToString)

    # -- behaviours (on grpcio's worker threads) -------------------------

    def unimplemented(self, request, context):
        import grpc

        context.abort(grpc.StatusCode.UNIMPLEMENTED, self._unimplemented_details())

    def _invoke(self, request, context) -> Any:
        kwargs = {}
        if "payload" in self.args:
            kwargs["payload"] = request
        if "context" in self.args:
            kwargs["context"] = context
        result = self.fn(**kwargs)
        if inspect.isawaitable(result):
            result = asyncio.run(_as_coroutine(result))
        return result

    def call_unary(self, request, context):
        try:
            result = self._invoke(request, context)
        except Exception as e:
            self._fail(e, context)
        return self._check(result, context)

    def call_streaming(self, request, context):
        try:
            result = self._invoke(request, context)
            iterator = _sync_iterator(result) if hasattr(result, "__anext__") else iter(result)
        except Exception as e:
            self._fail(e, context)
        return self._responses(iterator, context)

    def _responses(self, iterator: Iterator, context) -> Iterator:
        """The handler's responses, checked, each passed on as it comes."""
        try:
            while True:
                try:
                    item = next(iterator)
                except StopIteration:
                    return
                except Exception as e:
                    self._fail(e, context)
                yield self._check(item, context)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    logger.exception("api %r: closing the responses of %s failed", self.api.name, self.path)

    def call_frame(self, message: bytes, metadata: tuple, timeout: Optional[float], reply) -> None:
        """One unary call the proxy terminated, on a pool thread: answered
        through ``reply`` with the status and the reply message's bytes."""
        reply.send(*self.run_frame(message, Context(metadata, timeout)))

    def run_frame(self, message: bytes, context: Context) -> tuple:
        """The answer to one unary call the proxy terminated."""
        result, failed = self._call(message, context)
        return failed if failed is not None else self._answer(result, context)

    def _answer(self, result: Any, context: Context) -> tuple:
        """The answer for the reply message a Handler returned. Past the
        call's deadline it is DEADLINE_EXCEEDED, as a grpcio server answers
        (the reply would reach a client that stopped waiting, or win a race
        with its deadline)."""
        if context.expired():
            return _status_reply(STATUS_CODES["DEADLINE_EXCEEDED"], "Deadline Exceeded")
        if not isinstance(result, self.output_class):
            return _status_reply(STATUS_CODES["INTERNAL"], self._wrong_type(result))
        code = STATUS_CODES["OK"] if context.code() is None else status_number(context.code())
        return _status_reply(code, context.details() or "", result.SerializeToString() if code == 0 else b"")

    def _call(self, message: bytes, context: Context) -> tuple:
        """Decodes the request and calls the Handler with it: ``(result,
        None)``, or ``(None, answer)`` when there is no Handler method, the
        request does not decode, or the Handler raised."""
        if self.fn is None:
            return None, _status_reply(STATUS_CODES["UNIMPLEMENTED"], self._unimplemented_details())
        try:
            request = self.input_class.FromString(message)
        except Exception as e:
            return None, _status_reply(STATUS_CODES["INTERNAL"], f"cannot decode the request as "
                                                                 f"{self.input_class.DESCRIPTOR.full_name}: {e}")
        try:
            return self._invoke(request, context), None
        except Exception as e:
            return None, self._failed_reply(e, context)

    def _failed_reply(self, e: Exception, context: Context) -> tuple:
        """The answer for an exception of the Handler: its own status when it
        set one (abort, set_code), else INTERNAL naming the exception."""
        if context.code() is not None:
            return _status_reply(status_number(context.code()), context.details() or "")
        logger.error("api %r: %s failed:\n%s", self.api.name, self.path,
                     "".join(traceback.format_exception(e)).rstrip())
        return _status_reply(STATUS_CODES["INTERNAL"], f"{type(e).__name__}: {e}")

    def open_stream(self, message: bytes, context: Context):
        """One server-streaming call the proxy terminated: its answer when it
        fails before its first reply (trailers-only, as from grpcio), else an
        async generator of the reply messages' bytes for the host to stream."""
        result, failed = self._call(message, context)
        if failed is not None:
            return failed
        try:
            iterator = result if hasattr(result, "__anext__") else iter(result)
        except Exception as e:
            return self._failed_reply(e, context)
        return self._messages(iterator, context, self.api._pool)

    async def _messages(self, iterator, context: Context, pool: Optional[ThreadPoolExecutor]):
        """The Handler's replies as framed messages (gRPC's length prefix,
        as the proxy passes them on), each checked as it comes. A failure,
        a wrong reply type or a status the Handler set ends the stream with
        :class:`_StreamStatus`. Closed early (the client went away, the
        replica stops), the Handler's iterator is closed too. A sync
        iterator advances on ``pool``, inline without one (then each
        ``next()`` comes after a ``SendNow``: the replies so far leave
        before the loop blocks)."""
        running = None  # next() on the pool, while it runs
        output = self.output_class
        try:
            if hasattr(iterator, "__anext__"):
                # The common shape of a streaming Handler, in one loop of
                # its own: this runs once per reply message.
                try:
                    async for item in iterator:
                        if not isinstance(item, output):
                            raise _StreamStatus(_status_reply(STATUS_CODES["INTERNAL"], self._wrong_type(item)))
                        yield _grpc_message(item.SerializeToString())
                except _StreamStatus:
                    raise
                except Exception as e:
                    raise _StreamStatus(self._failed_reply(e, context)) from None
            else:
                while True:
                    try:
                        if pool is None:
                            # Inline, next() blocks the loop for as long as
                            # the generator takes (a model's next token):
                            # the reply before it leaves first, as it was
                            # yielded.
                            yield SendNow
                            item = _call_blocking(next, (iterator, _END), None)
                        else:
                            running = pool.submit(next, iterator, _END)
                            item = await asyncio.wrap_future(running)
                            running = None
                    except Exception as e:
                        raise _StreamStatus(self._failed_reply(e, context)) from None
                    if item is _END:
                        break
                    if not isinstance(item, output):
                        raise _StreamStatus(_status_reply(STATUS_CODES["INTERNAL"], self._wrong_type(item)))
                    yield _grpc_message(item.SerializeToString())
        except (asyncio.CancelledError, GeneratorExit):
            context.cancel()
            raise
        finally:
            await self._close(iterator, running)
        code = context.code()
        if code is not None and (status_number(code) != 0 or context.details()):
            raise _StreamStatus(_status_reply(status_number(code), context.details() or ""))

    def open_client_stream(self, context: Context, reply):
        """One client-streaming or bidirectional call the proxy terminated:
        an async generator of its reply messages' bytes, the Handler running
        on the stream pool with an iterator of the request messages that
        :meth:`GrpcAPI.serval_grpc_message` feeds."""
        if self.fn is None:
            return _status_reply(STATUS_CODES["UNIMPLEMENTED"], self._unimplemented_details())
        requests = _Requests(self.input_class.FromString, reply, context)
        return self._client_stream_replies(requests, context, reply.stream_key)

    async def _client_stream_replies(self, requests: "_Requests", context: Context, key: tuple):
        pool = self.api._stream_pool
        # Registered once the host's stream task starts this generator,
        # which it does right after sending the head, in the same step: the
        # proxy sends request messages only once it has the head, so none
        # comes before; a stream that never starts leaves nothing behind.
        self.api._client_streams[key] = requests
        try:
            try:
                result = await asyncio.wrap_future(pool.submit(self._invoke, requests, context))
                if self.server_streaming:
                    # Not on the replica's loop: it would wait there for
                    # request messages that only that loop delivers.
                    iterator = _sync_iterator(result) if hasattr(result, "__anext__") else iter(result)
            except Exception as e:
                raise _StreamStatus(self._failed_reply(e, context)) from None
            if self.server_streaming:
                replies = self._messages(iterator, context, pool)
                try:
                    async for message in replies:
                        yield message
                finally:
                    await replies.aclose()
                return
            answer = self._answer(result, context)
            if dict(answer[1])["grpc-status"] != "0":
                raise _StreamStatus(answer)
            yield _grpc_message(answer[2])
        except (asyncio.CancelledError, GeneratorExit):
            context.cancel()
            raise
        finally:
            requests.cancel()  # a Handler still reading them stops
            self.api._client_streams.pop(key, None)

    async def _close(self, iterator, running) -> None:
        """Closes a Handler's iterator, once its ``next`` on the pool (if one
        runs) returned: a generator cannot be closed while it runs."""
        if running is not None and not running.done():
            await asyncio.wait([asyncio.wrap_future(running)], timeout=STOP_GRACE_S)
            if not running.done():
                logger.warning("api %r: %s still runs %ss after its call ended; it is left to finish",
                               self.api.name, self.path, STOP_GRACE_S)
                return
        try:
            if hasattr(iterator, "aclose"):
                await iterator.aclose()
            elif hasattr(iterator, "close"):
                _call_blocking(iterator.close, (), None)
        except Exception:
            logger.exception("api %r: closing the responses of %s failed", self.api.name, self.path)

    def _unimplemented_details(self) -> str:
        return f"api '{self.api.name}': the Handler has no method {self.name} (rpc {self.path})"

    def _wrong_type(self, result: Any) -> str:
        what = "yielded" if self.server_streaming else "returned"
        return (f"api '{self.api.name}': Handler.{self.name} {what} {type(result).__name__}, expected "
                f"{self.output_class.DESCRIPTOR.full_name}")

    def _fail(self, e: Exception, context):
        """Ends the call for an exception of the handler: its own status when
        it set one (abort, set_code), else INTERNAL naming the exception."""
        import grpc

        if context.code() is not None:
            raise e
        logger.error("api %r: %s failed:\n%s", self.api.name, self.path,
                     "".join(traceback.format_exception(e)).rstrip())
        context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

    def _check(self, result: Any, context) -> Any:
        import grpc

        if isinstance(result, self.output_class):
            return result
        context.abort(grpc.StatusCode.INTERNAL, self._wrong_type(result))


#: The header a proxy adds to every call it forwards, and its value: an
#: HMAC-SHA256 of a fixed label under the cluster's data-plane key (the
#: proxy's ``serval_protos::handshake::grpc_forward_credential``).
AUTH_HEADER = "x-serval-data-auth"
DATA_KEY_ENV = "SERVAL_DATA_KEY"


def _forward_credential() -> bytes:
    key = os.environ.get(DATA_KEY_ENV, "")
    try:
        raw = bytes.fromhex(key)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise HandlerError(f"{DATA_KEY_ENV} is missing or malformed: a gRPC API replica is started by a node agent")
    return hmac.new(raw, b"serval grpc forward v1", hashlib.sha256).hexdigest().encode()


def _cluster_only():
    """A server interceptor that refuses every call lacking the proxy's
    credential, before its message is decoded or any Handler code runs: the
    replica's port is on the node's network, and only the cluster's proxies
    may call it. (Built here: grpcio is imported only where it is used.)"""
    import grpc

    expected = _forward_credential()

    def deny(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "calls reach this server only through a Serval proxy")

    denied = grpc.unary_unary_rpc_method_handler(deny)

    class ClusterOnly(grpc.ServerInterceptor):
        def intercept_service(self, continuation, handler_call_details):
            got = b""
            for key, value in handler_call_details.invocation_metadata or ():
                if key == AUTH_HEADER:
                    got = value.encode() if isinstance(value, str) else bytes(value)
                    break
            if hmac.compare_digest(got, expected):
                return continuation(handler_call_details)
            return denied

    return ClusterOnly()


async def _as_coroutine(awaitable):
    return await awaitable


def _sync_iterator(agen) -> Iterator:
    """An async generator's items, on an event loop of the calling thread."""
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        try:
            loop.run_until_complete(agen.aclose())
        finally:
            loop.close()


class GrpcAPI(RealtimeAPI):
    """Hosts one Cortex gRPC Handler (see the module docs). ``spec`` is a
    validated API with ``handler.grpc`` (``serval.cortex.config``)."""

    def __init__(self, spec: dict, project_dir: Optional[str] = None):
        self.name = spec.get("name") or "api"
        handler = spec.get("handler") or {}
        grpc_spec = handler.get("grpc") or {}
        if not grpc_spec.get("service"):
            raise HandlerError(f"api {self.name!r}: the spec has no handler.grpc (deploy the project again)")
        project = setup_process(self.name, spec, project_dir)
        try:
            module = load_proto_module(project, grpc_spec)
        except HandlerError as e:
            raise HandlerError(f"api {self.name!r}: {e}") from None
        except Exception as e:
            raise HandlerError(f"api {self.name!r}: importing {grpc_spec['module']} (the module of "
                               f"{handler.get('protobuf_path')}) failed: {type(e).__name__}: {e}") from e
        self.module_proto_pb2 = module
        handler_class = self._load_handler_class(project, handler.get("path") or "handler.py")
        # Cortex 0.35's runtime (and its examples) pass the module as
        # ``proto_module_pb2``; its documentation also spells it
        # ``module_proto_pb2``. Either name, as the Handler asks.
        self.handler = self._build(handler_class, {"config": handler.get("config") or {},
                                                   "proto_module_pb2": module, "module_proto_pb2": module})
        self._methods = {}
        self._allow = ""
        self.service = grpc_spec["service"]
        service = next((s for s in module.DESCRIPTOR.services_by_name.values() if s.full_name == self.service),
                       None)
        if service is None:
            raise HandlerError(f"api {self.name!r}: {grpc_spec['module']} defines no service {self.service}")
        self._rpcs = {}
        for method in service.methods:
            fn = getattr(self.handler, method.name, None)
            if not callable(fn):
                fn = None
                logger.warning("api %r: the Handler has no method %s: calls of /%s/%s answer UNIMPLEMENTED",
                               self.name, method.name, self.service, method.name)
            self._rpcs[method.name] = _Rpc(self, method, fn)
        self._by_path = {rpc.path: rpc for rpc in self._rpcs.values()}
        threads = max(1, int(handler.get("threads_per_process") or 1))
        #: Runs the unary calls the proxy terminated (``serval_grpc_call``)
        #: when threads_per_process > 1; with 1 they run inline on the
        #: replica's worker thread, one at a time, as a RealtimeAPI's do.
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=f"{self.name}-grpc-frames") \
            if threads > 1 else None
        #: Runs the Handlers of client streams the proxy terminated: they
        #: wait for request messages, which the replica's worker thread
        #: delivers, so never on that thread.
        self._stream_pool = self._pool or ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-grpc-streams")
        #: Their request messages' queues, by (connection, request id).
        self._client_streams: dict = {}
        self._server = None
        if forwarding():
            self._serve_grpcio(threads)

    def _serve_grpcio(self, threads: int) -> None:
        """Starts the grpcio server the proxies forward calls to when they
        run with ``SERVAL_GRPC_FRAMES=0``."""
        import grpc

        self._server = grpc.server(ThreadPoolExecutor(threads, thread_name_prefix=f"{self.name}-grpc"),
                                   interceptors=(_cluster_only(),))
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            self.service, {name: rpc.handler() for name, rpc in self._rpcs.items()}),))
        host = os.environ.get(HOST_ENV) or "127.0.0.1"
        address, credentials = _address(host, 0), _server_credentials()
        port = (self._server.add_secure_port(address, credentials) if credentials
                else self._server.add_insecure_port(address))
        if not port:
            raise HandlerError(f"api {self.name!r}: cannot listen for gRPC on {host}")
        self._server.start()
        #: Where this replica serves the service (reported as grpc_addr).
        self.serval_grpc_address = _address(host, port)
        logger.info("api %r: serving gRPC service %s on %s", self.name, self.service, self.serval_grpc_address)

    async def __call__(self, request):
        return error_response(404, f"api '{self.name}' is a gRPC API (service {self.service}): call it over "
                                   "gRPC")

    def serval_grpc_call(self, path: str, message: bytes, metadata: tuple, timeout: Optional[float], reply):
        """A call the proxy terminated (``serval._host.Host.on_grpc``): a
        unary one answered now (inline), or on the pool through ``reply``; a
        streaming one answered with an async generator of the reply
        messages' bytes (or its status when it fails at once), a client
        stream's request messages following through
        :meth:`serval_grpc_message`. A path that is not a method of the
        service answers UNIMPLEMENTED."""
        rpc = self._by_path.get(path)
        if rpc is None:
            return _status_reply(STATUS_CODES["UNIMPLEMENTED"], f"api '{self.name}': {path} is not a method of "
                                                                f"{self.service}")
        if rpc.client_streaming:
            return rpc.open_client_stream(Context(metadata, timeout), reply)
        if rpc.server_streaming:
            return rpc.open_stream(message, Context(metadata, timeout))
        if self._pool is None:
            return rpc.run_frame(message, Context(metadata, timeout))
        self._pool.submit(rpc.call_frame, message, metadata, timeout, reply)
        return None

    def serval_grpc_message(self, key: tuple, message: Optional[bytes]) -> None:
        """A client stream's next request message (None: its half-close),
        for the call ``key`` (its reply's ``stream_key``) names; dropped when
        that call has ended."""
        requests = self._client_streams.get(key)
        if requests is not None and not requests.feed(message):
            logger.warning("api %r: a client stream overran its window; the call ends", self.name)
            requests.cancel()

    def serval_stop(self, grace: float = STOP_GRACE_S) -> None:
        """Stops the grpcio server, if one runs: new calls are refused,
        calls in flight get ``grace`` seconds to finish, then are cancelled.
        Client streams the proxy terminated end; calls not started yet are
        dropped."""
        server = getattr(self, "_server", None)
        if server is not None:
            server.stop(grace).wait(grace + 1.0)
        for requests in list(getattr(self, "_client_streams", {}).values()):
            requests.cancel()
        for pool in {getattr(self, "_pool", None), getattr(self, "_stream_pool", None)} - {None}:
            # Calls not started are dropped: their replies answer 503.
            pool.shutdown(wait=False, cancel_futures=True)
