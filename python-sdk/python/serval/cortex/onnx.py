"""The replica side of a RealtimeAPI serving an ONNX model (seed 002,
"Request handlers"): ``handler.type: onnx``.

``OnnxAPI(spec)`` sets the replica up as ``RealtimeAPI`` does (project,
environment, python_path, requirements, log level), loads
``handler.model_path`` with onnxruntime and imports the optional request
handler ``handler.path``. Each POST with a JSON body is one sample:

1. ``pre_inference(sample, signature, metadata)`` when the request handler
   defines it (``signature``: ``session.get_inputs()``); its result, or the
   sample itself without one, is a dict of input name -> list or ndarray, or
   a single list/ndarray when the model has one input;
2. each value becomes an ndarray of the dtype the model declares, with a
   batch axis of 1 added when the model declares a leading batch dimension
   and the value lacks it (a 400 naming the input when it cannot be done);
3. ``prediction = session.run(None, inputs)``, the list of outputs;
4. ``post_inference(prediction, signature, metadata)`` (``signature``:
   ``session.get_outputs()``) gives the response; without it the response
   maps output names to values.

The response goes through the same mapping as a Handler's result (dict/list
-> JSON, str -> text, ...). The module globals of the request handler are
safe: with ``threads_per_process: 1`` one request runs at a time.

With ``server_side_batching`` concurrent requests are gathered by
RealtimeAPI's batcher (``serval._host.Batcher``); their inputs (after
pre_inference) are stacked along the batch axis, the model runs once, and
every output is split back by the rows each request contributed before
post_inference runs per request.
Where stacking cannot work (no batch dimension, shapes that differ, an
output that is not per row) each request of the batch runs on its own.

With ``handler.runtime: native`` (no request handler allowed) the model is
loaded by tract in Rust (crate serval-onnx, ``serval._native.OnnxModel``)
and the replica answers HTTP POSTs with it on Rust threads, never entering
Python; the request and response JSON and the 400 messages are the same.
Handle calls still come through ``predict_native`` here. onnxruntime is not
needed for it.

onnxruntime and numpy are optional for the SDK: they are imported when a
replica starts, and their absence fails the replica with an error naming
the package.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import logging
import math
import os
from typing import Any, Dict, List, Optional, Tuple

from starlette.datastructures import FormData

from .downloads import Limits, build_once, download, sweep
from .package import cache_dir
from .realtime import (HandlerError, PayloadError, RealtimeAPI, _Method, error_response, import_file, parse_json,
                       setup_process)

logger = logging.getLogger("serval.cortex")

#: numpy, imported by ``_import_runtime`` when a replica starts (the SDK
#: itself does not need it: deploy only pickles this class by reference).
np: Any = None

#: onnxruntime's tensor element types -> numpy dtype names.
ONNX_DTYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(int8)": "int8", "tensor(int16)": "int16", "tensor(int32)": "int32", "tensor(int64)": "int64",
    "tensor(uint8)": "uint8", "tensor(uint16)": "uint16", "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64", "tensor(bool)": "bool", "tensor(string)": "object",
}


class InputError(ValueError):
    """A model input that cannot be built from the request (answered 400)."""


def _import_runtime(name: str):
    """onnxruntime (and numpy into this module), or a HandlerError naming
    the missing package."""
    return import_model_runtime(name, "onnx", "onnxruntime", "pip install onnxruntime, or onnxruntime-gpu for GPUs")


def import_model_runtime(name: str, handler_type: str, module: str, install: str):
    """``module`` (and numpy into this module), or a HandlerError naming the
    missing package: the runtimes are optional for the SDK, so their absence
    is found when a replica starts (shared with serval.cortex.tensorflow)."""
    global np
    try:
        import numpy
        runtime = importlib.import_module(module)
    except ImportError as e:
        raise HandlerError(
            f"api {name!r}: handler.type {handler_type} needs the {e.name or module} package in the replicas' "
            f"Python ({install}; or list it in the API's requirements.txt): {e}") from None
    np = numpy
    return runtime


# -- the model file ----------------------------------------------------------


def model_file(name: str, project: str, handler: dict) -> str:
    """The local file of ``handler.model_path``: a project file, an absolute
    path, or an http(s) URL fetched into the node's cache."""
    model_path = handler.get("model_path") or ""
    if is_url(model_path):
        return fetch_or_fail(name, handler)
    path = os.path.join(project, model_path)  # an absolute model_path stays as it is
    if not os.path.isfile(path):
        raise HandlerError(f"api {name!r}: handler.model_path: no such file: {path}")
    return path


def is_url(model_path: str) -> bool:
    return model_path.lower().startswith(("http://", "https://"))


def download_limits(handler: dict) -> Limits:
    """``handler.model_max_size`` and ``model_download_timeout`` (defaults
    in the config) as the caps of a model's download and unpacking."""
    defaults = Limits()
    return Limits(max_bytes=int(handler.get("model_max_size") or defaults.max_bytes),
                  timeout_s=float(handler.get("model_download_timeout") or defaults.timeout_s))


def fetch_or_fail(name: str, handler: dict) -> str:
    """``fetch_model`` of ``handler.model_path``, or a HandlerError naming
    the field: the replica's failure then says which URL could not be had
    and why."""
    url = handler["model_path"]
    try:
        return fetch_model(url, download_limits(handler), handler.get("model_sha256"))
    except OSError as e:
        field = "handler.model_sha256" if "sha256" in str(e) else "handler.model_path"
        raise HandlerError(f"api {name!r}: {field}: fetching {url} failed: {e}") from None


def fetch_model(url: str, limits: Limits, sha256: Optional[str] = None, base: Optional[str] = None) -> str:
    """The model at ``url``, downloaded once per node into the node's cache
    (serval.cortex.downloads), named by the URL's sha256 (and the expected
    content's, when the config gives one). Replicas starting together wait
    for the first one's download rather than each fetching a model that may
    be gigabytes. (A new model needs a new URL or sha256: the cache is keyed
    by them, not by what the URL serves now.)"""
    base = os.path.join(base or cache_dir(), "models")
    key = url if not sha256 else f"{url}#sha256={sha256.lower()}"
    sweep(base)
    return build_once(os.path.join(base, hashlib.sha256(key.encode()).hexdigest()),
                      lambda partial: download(url, partial, limits, sha256))


def providers(ort, gpus: float) -> List[str]:
    """CUDA first when the replica was given GPUs (the node agent sets
    CUDA_VISIBLE_DEVICES to them) and onnxruntime-gpu offers it; CPU always
    (onnxruntime falls back to it for the operators CUDA lacks)."""
    given = gpus > 0 and os.environ.get("CUDA_VISIBLE_DEVICES", "") not in ("", "-1")
    if given and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def load_session(ort, path: str, spec: dict):
    """An InferenceSession of ``path``, using as many intra-op threads as
    the replica declared CPUs (onnxruntime's default, every core, would
    oversubscribe a node shared by several replicas)."""
    compute = spec.get("compute") or {}
    procs = int((spec.get("handler") or {}).get("processes_per_replica") or 1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = cpu_threads(spec)
    gpus = float(compute.get("gpu") or 0) / procs
    return ort.InferenceSession(path, sess_options=options, providers=providers(ort, gpus))


def cpu_threads(spec: dict) -> int:
    """The CPUs one replica process declared (``compute.cpu`` shared by its
    ``processes_per_replica``), at least 1: the threads a model runtime may
    use without oversubscribing a node shared by several replicas."""
    compute = spec.get("compute") or {}
    procs = int((spec.get("handler") or {}).get("processes_per_replica") or 1)
    return max(1, math.ceil(float(compute.get("cpu") or 1) / procs))


# -- inputs and outputs ------------------------------------------------------


class _Input:
    """One model input (an onnxruntime NodeArg): how a value becomes the
    array the model takes."""

    __slots__ = ("name", "type", "dtype", "shape", "batched")

    def __init__(self, arg):
        self.name = arg.name
        self.type = arg.type
        self.dtype = ONNX_DTYPES.get(arg.type)  # None: not a tensor, passed as it is
        self.shape = list(arg.shape) if arg.shape is not None else None
        # A dynamic leading dimension (None or a symbol) is a batch axis.
        self.batched = bool(self.shape) and not isinstance(self.shape[0], int)

    def convert(self, value: Any):
        if self.dtype is None:
            return value
        try:
            array = np.asarray(value, dtype=self.dtype)
        except (ValueError, TypeError, OverflowError) as e:
            raise InputError(f"input '{self.name}': cannot be converted to {self.type}: {e}") from None
        if self.shape is None:
            return array
        if array.ndim == len(self.shape) - 1 and (self.batched or self.shape[0] == 1):
            array = array[np.newaxis]
        if array.ndim != len(self.shape) or any(
                isinstance(want, int) and want >= 0 and want != got for want, got in zip(self.shape, array.shape)):
            raise InputError(f"input '{self.name}': the model takes shape {self._shape_text()}, "
                             f"got shape {list(array.shape)}")
        return array

    def _shape_text(self) -> str:
        return "[" + ", ".join("None" if d is None else str(d) for d in self.shape) + "]"


def to_jsonable(value: Any) -> Any:
    """ndarrays and numpy scalars (at any depth of dicts and lists) as the
    Python lists and numbers JSON takes; everything else as it is."""
    if np is not None and isinstance(value, np.ndarray):
        return value.tolist()
    if np is not None and isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def _rows(value: Any) -> Optional[int]:
    """The length of an output's first axis (None for a scalar)."""
    if np is not None and isinstance(value, np.ndarray):
        return value.shape[0] if value.ndim else None
    return len(value) if isinstance(value, (list, tuple)) else None


def _is_input_error(e: Exception) -> bool:
    """The runtime's own refusal of the inputs (a wrong shape it checked):
    onnxruntime's InvalidArgument, TensorFlow's InvalidArgumentError."""
    return isinstance(e, InputError) or type(e).__name__ in ("InvalidArgument", "InvalidArgumentError")


def _output_values(prediction: Any) -> list:
    """The outputs of a prediction: onnxruntime's list, or the values of
    TensorFlow's dict by output name."""
    return list(prediction.values()) if isinstance(prediction, dict) else list(prediction)


def _slice_rows(prediction: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of every output, in the prediction's own form."""
    if isinstance(prediction, dict):
        return {name: out[start:stop] for name, out in prediction.items()}
    return [out[start:stop] for out in prediction]


# -- the API -----------------------------------------------------------------


class OnnxAPI(RealtimeAPI):
    """Serves one ONNX model (see the module docs); requests, threads and
    batching go through RealtimeAPI's machinery, with ``POST`` as the one
    method (the others answer 405)."""

    #: With ``handler.runtime: native``: the model run by tract in Rust
    #: (``serval._native.OnnxModel``). The replica host hands it to its
    #: ReplicaServer, which then answers POSTs without Python.
    serval_native_model: Any = None

    def __init__(self, spec: dict, project_dir: Optional[str] = None):
        self.name = spec.get("name") or "api"
        handler = spec.get("handler") or {}
        project = setup_process(self.name, spec, project_dir)
        path = model_file(self.name, project, handler)
        if handler.get("runtime") == "native":
            self._load_native(path, handler)
            return
        ort = _import_runtime(self.name)
        try:
            self.session = load_session(ort, path, spec)
        except Exception as e:
            raise HandlerError(f"api {self.name!r}: loading the ONNX model {handler.get('model_path')} failed: "
                               f"{type(e).__name__}: {e}") from e
        self.input_signature = self.session.get_inputs()
        self.output_signature = self.session.get_outputs()
        self.inputs = [_Input(arg) for arg in self.input_signature]
        self.output_names = [arg.name for arg in self.output_signature]
        self._serve(project, handler)
        logger.info("api %r: serving %s on %s", self.name, handler.get("model_path"),
                    ", ".join(self.session.get_providers()))

    def _serve(self, project: str, handler: dict) -> None:
        """What every model API does once ``self.inputs`` are known: the
        request handler, batching and the one POST method (shared with
        serval.cortex.tensorflow)."""
        self.input_names = frozenset(i.name for i in self.inputs)
        self.metadata = handler.get("metadata") or {}
        self.pre_inference, self.post_inference = self._load_request_handler(project, handler.get("path"))
        # Stacking needs every input to have a batch axis to stack along.
        self.stackable = bool(self.inputs) and all(i.batched for i in self.inputs)
        predict = self.predict_batch if handler.get("server_side_batching") else self.predict
        self._methods = {"POST": _Method(predict, f"api {self.name!r}: predict")}
        self._configure_methods(handler)

    def _load_native(self, path: str, handler: dict) -> None:
        """The model in Rust (serval-onnx): no onnxruntime, no request
        handler (the config refuses one). HTTP POSTs never reach Python;
        handle calls come here and run the same model."""
        # The Rust side logs through tracing, set up when the replica's
        # server starts (after this): give it the API's log level.
        level = {"warning": "warn"}.get(handler.get("log_level") or "info", handler.get("log_level") or "info")
        os.environ.setdefault("SERVAL_LOG", f"warn,serval_onnx={level}")
        from serval._native import OnnxModel

        batching = handler.get("server_side_batching") or {}
        try:
            self.serval_native_model = OnnxModel(
                path, threads=int(handler.get("threads_per_process") or 1),
                max_batch_size=int(batching.get("max_batch_size") or 1),
                batch_interval=float(batching.get("batch_interval") or 0.0))
        except ValueError as e:
            raise HandlerError(f"api {self.name!r}: handler.runtime native: loading the ONNX model "
                               f"{handler.get('model_path')} failed: {e}") from None
        self._methods = {"POST": _Method(self.predict_native, f"api {self.name!r}: predict")}
        # Batching happens in Rust, for HTTP; a handle call runs on its own.
        self._configure_methods({**handler, "server_side_batching": None})
        logger.info("api %r: serving %s with the native runtime (inputs: %s)", self.name,
                    handler.get("model_path"), ", ".join(f"{n} {t} {s}" for n, t, s in
                                                         self.serval_native_model.inputs))

    def predict_native(self, payload: Any) -> Any:
        """A handle call to a native model: the JSON of ``payload`` through
        the same Rust code as an HTTP request."""
        body = payload if isinstance(payload, (bytes, bytearray)) else json.dumps(payload).encode()
        status, response = self.serval_native_model.predict(bytes(body))
        result = json.loads(response)
        return result if status == 200 else error_response(status, result.get("error", ""))

    def _load_request_handler(self, project: str, path: Optional[str]) -> Tuple[Any, Any]:
        """``(pre_inference, post_inference)`` of the request handler file,
        either None when it does not define it (or there is no file)."""
        if not path:
            return None, None
        try:
            module = import_file(os.path.join(project, path))
        except Exception as e:
            raise HandlerError(f"api {self.name!r}: importing {path} failed: {type(e).__name__}: {e}") from e
        functions = tuple(getattr(module, n, None) for n in ("pre_inference", "post_inference"))
        if not any(callable(f) for f in functions):
            raise HandlerError(f"api {self.name!r}: {path} defines neither pre_inference nor post_inference")
        for fn in functions:
            if callable(fn):
                self._check_arity(fn, path)
        return tuple(fn if callable(fn) else None for fn in functions)

    def _check_arity(self, fn, path: str) -> None:
        # Found at start rather than as a 500 on every request.
        try:
            inspect.signature(fn).bind(None, None, None)
        except TypeError:
            raise HandlerError(f"api {self.name!r}: {path}: {fn.__name__} must take three arguments "
                               f"({'sample' if fn.__name__ == 'pre_inference' else 'prediction'}, signature, "
                               f"metadata)") from None
        except ValueError:  # no signature to inspect (a builtin): let it be
            pass

    # -- one request ------------------------------------------------------

    def predict(self, payload: Any) -> Any:
        """One request: its response, or a 400 for a bad sample."""
        try:
            inputs = self.model_inputs(payload)
            prediction = self.run_model(inputs)
        except Exception as e:
            if _is_input_error(e):
                return error_response(400, str(e))
            raise
        return self.respond(prediction)

    def model_inputs(self, payload: Any) -> Dict[str, Any]:
        """The sample -> pre_inference -> converted arrays by input name."""
        sample = self.sample(payload)
        if self.pre_inference is None:
            return self.convert(sample, "the request is", single=False)
        value = self.pre_inference(sample, self.input_signature, self.metadata)
        return self.convert(value, "pre_inference returned", single=True)

    def sample(self, payload: Any) -> Any:
        """The request's parsed JSON. RealtimeAPI's payload rules parse it for
        ``application/json`` (400 when malformed); a body sent with another
        type is read as JSON too, since a model API only takes JSON."""
        if isinstance(payload, (bytes, bytearray)):
            try:
                return parse_json(bytes(payload))
            except PayloadError as e:
                raise InputError(str(e).replace(" (Content-Type: application/json)", "")) from None
        if isinstance(payload, FormData):
            raise InputError("a model API takes a JSON body (Content-Type: application/json), not a form")
        return payload

    def convert(self, value: Any, what: str, single: bool) -> Dict[str, Any]:
        """``{input name: array}`` from a dict of input names, or (``single``:
        from pre_inference, as the seed allows) one list/array for a model
        with one input."""
        if not isinstance(value, dict):
            if not single or len(self.inputs) != 1 or not isinstance(value, (list, tuple)) and not _is_array(value):
                raise InputError(f"{what} a {type(value).__name__}; expected a JSON object mapping the model's "
                                 f"inputs ({', '.join(i.name for i in self.inputs)}) to values")
            value = {self.inputs[0].name: value}
        unknown = [k for k in value if k not in self.input_names]
        if unknown:
            raise InputError(f"input '{unknown[0]}': the model has no such input "
                             f"(its inputs: {', '.join(i.name for i in self.inputs)})")
        missing = [i.name for i in self.inputs if i.name not in value]
        if missing:
            raise InputError(f"input '{missing[0]}': missing ({what} an object without it)")
        return {i.name: i.convert(value[i.name]) for i in self.inputs}

    def run_model(self, inputs: Dict[str, Any]) -> list:
        return self.session.run(None, inputs)

    def respond(self, prediction: list) -> Any:
        """post_inference's result, or output names -> values, made JSON-able."""
        if self.post_inference is None:
            return {name: to_jsonable(value) for name, value in zip(self.output_names, prediction)}
        return to_jsonable(self.post_inference(prediction, self.output_signature, self.metadata))

    # -- a batch of requests ---------------------------------------------

    def predict_batch(self, payload: list) -> list:
        """Server-side batching: one response per request, in order. A request
        that fails gets its own 400/500; the others are answered."""
        results: List[Any] = [None] * len(payload)
        prepared = []  # (index, inputs)
        for i, sample in enumerate(payload):
            try:
                prepared.append((i, self.model_inputs(sample)))
            except Exception as e:
                results[i] = self._failure(e, "pre_inference")
        for i, prediction in self._predictions(prepared):
            if isinstance(prediction, Exception):
                results[i] = self._failure(prediction, "the model")
                continue
            try:
                results[i] = self.respond(prediction)
            except Exception as e:
                results[i] = self._failure(e, "post_inference")
        return results

    def _predictions(self, prepared: list) -> List[Tuple[int, Any]]:
        """``(index, prediction or the exception)`` per request: one stacked
        model call when it can be made, else one call each."""
        if len(prepared) > 1 and self.stackable:
            stacked = self._run_stacked([inputs for _, inputs in prepared])
            if stacked is not None:
                return [(i, prediction) for (i, _), prediction in zip(prepared, stacked)]
        return [(i, self._run_one(inputs)) for i, inputs in prepared]

    def _run_stacked(self, batch: List[Dict[str, Any]]) -> Optional[List[list]]:
        """The predictions of ``batch`` from one model call on its inputs
        concatenated along axis 0; None when that cannot be done (shapes
        that differ, an output that is not per row, a request the model
        refuses): the caller then runs each request on its own."""
        names = [i.name for i in self.inputs]
        counts = []
        for inputs in batch:
            rows = {inputs[n].shape[0] for n in names}
            if len(rows) != 1:
                return None
            counts.append(rows.pop())
        try:
            outputs = self.run_model({n: np.concatenate([inputs[n] for inputs in batch]) for n in names})
        except Exception as e:
            logger.debug("api %r: a stacked batch failed, running its requests one by one: %s", self.name, e)
            return None
        total = sum(counts)
        if any(_rows(out) != total for out in _output_values(outputs)):
            return None
        logger.debug("api %r: %d requests in one model call (%d rows)", self.name, len(batch), total)
        offsets = [0]
        for n in counts:
            offsets.append(offsets[-1] + n)
        return [_slice_rows(outputs, a, b) for a, b in zip(offsets, offsets[1:])]

    def _run_one(self, inputs: Dict[str, Any]) -> Any:
        try:
            return self.run_model(inputs)
        except Exception as e:
            return e

    def _failure(self, e: Exception, where: str):
        """The response of one request of a batch that failed."""
        if _is_input_error(e):
            return error_response(400, str(e))
        logger.error("api %r: %s failed for a request of a batch", self.name, where, exc_info=e)
        return error_response(500, f"{type(e).__name__}: {e}")


def _is_array(value: Any) -> bool:
    return np is not None and isinstance(value, np.ndarray)
