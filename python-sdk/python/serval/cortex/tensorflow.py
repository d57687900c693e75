"""The replica side of a RealtimeAPI serving a TensorFlow SavedModel (seed
002, "Request handlers"): ``handler.type: tensorflow``.

``TensorFlowAPI(spec)`` works as ``OnnxAPI`` (serval.cortex.onnx), which it
extends: the same request handler (``pre_inference``/``post_inference``),
input conversion with 400s naming the input, responses and server-side
batching (inputs stacked along axis 0, outputs split back by rows). What
differs:

- ``handler.model_path`` is the SavedModel's directory: in the project, an
  absolute path on the node, or an http(s) URL of a .zip or .tar.gz of it,
  fetched and unpacked once per node in the node's cache;
- the model is loaded with ``tf.saved_model.load`` and one signature is
  served: ``handler.signature_key``, else ``serving_default``, else the only
  one there is;
- ``signature``, given to both functions of the request handler, is the
  SavedModel's SignatureDef map (signature key -> ``SignatureDef`` proto of
  tensorflow/core/protobuf/meta_graph.proto), as Cortex gave it: a handler
  reads ``signature["serving_default"].inputs`` for the input names;
- ``prediction`` is a dict of output name -> numpy array, as TensorFlow
  Serving gives; without post_inference the response maps the output names
  to lists (string tensors as text).

``TensorFlowHandlerAPI(spec)`` hosts Cortex 0.35's other shape,
``handler.models`` with a ``Handler(tensorflow_client, config)`` whose
methods call ``tensorflow_client.predict(payload, model_name,
model_version)`` (``TensorFlowClient``, on multi_model_reloading's model
resolution and cache); it is a RealtimeAPI otherwise. A BatchAPI's workers
and an AsyncAPI's replicas of ``type: tensorflow`` get the same client
(``tensorflow_client``) for their ``handle_batch``/``handle_async``.

TensorFlow is optional for the SDK: it is imported when a replica starts,
and its absence fails the replica with an error naming the package.
"""

from __future__ import annotations

import logging
import os
import tarfile
import zipfile
from typing import Any, Callable, Dict, List, Optional

from .downloads import build_once, extract
from .models import PythonClient
from .onnx import OnnxAPI, _Input, cpu_threads, download_limits, fetch_or_fail, import_model_runtime, is_url, to_jsonable
from .realtime import HandlerError, RealtimeAPI, setup_process

logger = logging.getLogger("serval.cortex")

#: numpy, imported with TensorFlow when a replica starts.
np: Any = None

DEFAULT_SIGNATURE = "serving_default"
SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")


def _import_tensorflow(name: str):
    """tensorflow (and numpy into this module), or a HandlerError naming
    the missing package."""
    global np
    tf = import_model_runtime(name, "tensorflow", "tensorflow",
                              "pip install tensorflow-cpu, or tensorflow for GPUs")
    import numpy
    np = numpy
    return tf


def limit_threads(name: str, tf, spec: dict) -> None:
    """As many threads as the replica declared CPUs (TensorFlow's default,
    every core for each of two pools, would oversubscribe a node shared by
    several replicas). Only possible before TensorFlow runs anything."""
    threads = cpu_threads(spec)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError as e:  # the requirements or python_path code already ran TensorFlow
        logger.warning("api %r: TensorFlow's thread pools are already set up: %s", name, e)


# -- the SavedModel directory ------------------------------------------------


def saved_model_dir(name: str, project: str, handler: dict) -> str:
    """The local directory of ``handler.model_path``: a project directory,
    an absolute path, or an http(s) URL of an archive unpacked in the
    node's cache."""
    model_path = handler.get("model_path") or ""
    if is_url(model_path):
        return find_saved_model(name, unpack_once(name, fetch_or_fail(name, handler), handler), model_path)
    path = os.path.join(project, model_path)  # an absolute model_path stays as it is
    if not os.path.isdir(path):
        raise HandlerError(f"api {name!r}: handler.model_path: no such directory: {path}")
    return find_saved_model(name, path, model_path)


def find_saved_model(name: str, path: str, model_path: str) -> str:
    """``path``, or its one subdirectory, holding saved_model.pb: an archive
    of a SavedModel often holds the SavedModel's folder rather than its
    files."""
    if _has_saved_model(path):
        return path
    subdirs = [os.path.join(path, d) for d in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, d))]
    if len(subdirs) == 1 and _has_saved_model(subdirs[0]):
        return subdirs[0]
    raise HandlerError(f"api {name!r}: handler.model_path: {model_path} is not a SavedModel "
                       f"(no {' or '.join(SAVED_MODEL_FILES)} in it)")


def _has_saved_model(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in SAVED_MODEL_FILES)


def unpack_once(name: str, archive: str, handler: dict) -> str:
    """The directory ``archive`` (a fetched .zip or .tar.gz) unpacks to,
    once per node, beside it (serval.cortex.downloads: under a lock, renamed
    when complete, within the caps of ``download_limits``, only plain files
    and folders inside it). By content, not by the URL's suffix (a URL may
    have none)."""
    try:
        return build_once(archive + ".d", lambda partial: extract(archive, partial, download_limits(handler)))
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as e:
        raise HandlerError(f"api {name!r}: handler.model_path: unpacking {handler.get('model_path')} failed: {e} "
                           f"(a SavedModel at a URL must be a .zip or .tar.gz of its directory)") from None


# -- signatures ----------------------------------------------------------------


def read_meta_graph(name: str, path: str):
    """The SavedModel's MetaGraphDef that serves (tagged ``serve``, or the
    only one): the SignatureDef protos the seed promises handlers come from
    it, since ``tf.saved_model.load`` gives functions, not protos."""
    from google.protobuf import message, text_format
    from tensorflow.core.protobuf import saved_model_pb2

    model = saved_model_pb2.SavedModel()
    try:
        pb = os.path.join(path, "saved_model.pb")
        if os.path.isfile(pb):
            with open(pb, "rb") as f:
                model.ParseFromString(f.read())
        else:
            with open(os.path.join(path, "saved_model.pbtxt")) as f:
                text_format.Parse(f.read(), model)
    except (OSError, message.DecodeError, text_format.ParseError) as e:
        raise HandlerError(f"api {name!r}: reading the SavedModel {path} failed: {type(e).__name__}: {e}") from None
    graphs = list(model.meta_graphs)
    serving = [g for g in graphs if "serve" in g.meta_info_def.tags]
    if not (serving or len(graphs) == 1):
        raise HandlerError(f"api {name!r}: the SavedModel {path} has {len(graphs)} meta graphs and none is "
                           f"tagged 'serve'")
    return (serving or graphs)[0]


def pick_signature(name: str, keys: List[str], wanted: Optional[str]) -> str:
    """``handler.signature_key``, else ``serving_default``, else the only
    signature; an error listing the signatures otherwise."""
    found = ", ".join(keys) or "none"
    if wanted:
        if wanted not in keys:
            raise HandlerError(f"api {name!r}: handler.signature_key: the SavedModel has no signature {wanted!r} "
                               f"(its signatures: {found})")
        return wanted
    if DEFAULT_SIGNATURE in keys:
        return DEFAULT_SIGNATURE
    if len(keys) == 1:
        return keys[0]
    raise HandlerError(f"api {name!r}: handler.signature_key: the SavedModel has no {DEFAULT_SIGNATURE!r} "
                       f"signature; set signature_key to one of its signatures: {found}")


class _TensorInput(_Input):
    """One input of a SignatureDef (a TensorInfo): converted as an ONNX
    input is, with TensorFlow's dtype and shape (-1: any size)."""

    __slots__ = ()

    def __init__(self, name: str, info, tf):
        dtype = tf.dtypes.as_dtype(info.dtype)
        self.name = name
        self.type = dtype.name
        # None (resources, variants): passed as they are, as ONNX's non-tensors.
        self.dtype = np.dtype(dtype.as_numpy_dtype) if dtype.is_numpy_compatible else None
        shape = info.tensor_shape
        self.shape = None if shape.unknown_rank else [d.size if d.size >= 0 else None for d in shape.dim]
        self.batched = bool(self.shape) and self.shape[0] is None


def _text_strings(value: Any) -> Any:
    """A string tensor's bytes as text, so that it can be answered as JSON."""
    if isinstance(value, np.ndarray) and value.dtype == object:
        return np.vectorize(lambda v: v.decode("utf-8", "replace") if isinstance(v, bytes) else v,
                            otypes=[object])(value) if value.size else value
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


# -- the API -----------------------------------------------------------------


class TensorFlowAPI(OnnxAPI):
    """Serves one signature of a TensorFlow SavedModel (see the module
    docs); requests and batching are OnnxAPI's."""

    def __init__(self, spec: dict, project_dir: Optional[str] = None):
        self.name = spec.get("name") or "api"
        handler = spec.get("handler") or {}
        project = setup_process(self.name, spec, project_dir)
        # The model first: a model that cannot be had fails the same with or
        # without TensorFlow installed.
        path = saved_model_dir(self.name, project, handler)
        self.tf = _import_tensorflow(self.name)
        limit_threads(self.name, self.tf, spec)
        graph = read_meta_graph(self.name, path)
        self.model = self._load(path, list(graph.meta_info_def.tags), handler.get("model_path"))
        served = list(self.model.signatures.keys())
        self.signature_key = pick_signature(self.name, served, handler.get("signature_key"))
        self.function = self.model.signatures[self.signature_key]
        # The handlers' ``signature``: the map, as Cortex gave it (the init op's entry left out).
        self.signatures = {k: graph.signature_def[k] for k in served if k in graph.signature_def}
        self.input_signature = self.output_signature = self.signatures
        signature_def = self.signatures[self.signature_key]
        self.inputs = [_TensorInput(k, signature_def.inputs[k], self.tf) for k in sorted(signature_def.inputs)]
        self.output_names = sorted(signature_def.outputs)
        self._serve(project, handler)
        logger.info("api %r: serving signature %r of %s", self.name, self.signature_key, handler.get("model_path"))

    def _load(self, path: str, tags: List[str], model_path: Optional[str]):
        try:
            return self.tf.saved_model.load(path, tags=tags or None)
        except Exception as e:
            raise HandlerError(f"api {self.name!r}: loading the SavedModel {model_path} failed: "
                               f"{type(e).__name__}: {e}") from e

    def run_model(self, inputs: Dict[str, Any]) -> Dict[str, Any]:
        """The signature's outputs by name, as numpy arrays."""
        outputs = self.function(**{k: self.tf.constant(v) for k, v in inputs.items()})
        return {k: v.numpy() for k, v in outputs.items()}

    def respond(self, prediction: Dict[str, Any]) -> Any:
        """post_inference's result, or output names -> values, made JSON-able."""
        if self.post_inference is None:
            return {k: to_jsonable(_text_strings(prediction[k])) for k in self.output_names if k in prediction}
        return to_jsonable(self.post_inference(prediction, self.output_signature, self.metadata))


# -- Cortex 0.35's TensorFlow handler (handler.models) --------------------------


class _Servable:
    """One version of one model: its served signature, inputs and outputs
    (``model`` keeps the signature's variables alive)."""

    def __init__(self, model, function, inputs: List[_TensorInput], outputs: List[str]):
        self.model, self.function, self.inputs, self.outputs = model, function, inputs, outputs


class _SavedModels(PythonClient):
    """multi_model_reloading's models, loaded by name (a ``paths`` entry's
    ``signature_key`` is its own)."""

    def __init__(self, models: dict, project: str, load: Callable[[str, str], Any]):
        super().__init__(models, project, lambda path: None)
        self._load_named = load

    def _load(self, name: str, path: str) -> Any:
        return self._load_named(name, path)


class TensorFlowClient:
    """Cortex 0.35's ``tensorflow_client``, given to ``Handler.__init__``:
    ``predict(model_input, model_name=None, model_version="latest")`` runs
    the model's signature in this process (Cortex called a TensorFlow
    Serving container) and answers output name -> flat list of values, as
    Cortex's parse of TensorFlow Serving's response did.

    Which model and version a call means, and the loaded ones kept, are
    ``multi_model_reloading``'s (serval.cortex.models.PythonClient over the
    replica's model cache): ``handler.models`` ``path``, ``paths`` or
    ``dir``, versions as numbered folders ("latest": the highest, read at
    each call), ``cache_size``; an unknown model or version is a 404. A
    model (version) folder holds a SavedModel, loaded at its first use."""

    def __init__(self, api: str, project: str, models: dict, tf):
        self.api, self.tf = api, tf
        self._default_key = models.get("signature_key")
        self._keys = {p["name"]: p["signature_key"] for p in models.get("paths") or () if p.get("signature_key")}
        self.models = _SavedModels(models, project, self._load)

    def _load(self, name: str, path: str) -> _Servable:
        wanted = self._keys.get(name) or self._default_key
        if not _has_saved_model(path):
            raise HandlerError(f"api {self.api!r}: handler.models: {path} holds no SavedModel "
                               f"(no {' or '.join(SAVED_MODEL_FILES)})")
        graph = read_meta_graph(self.api, path)
        try:
            model = self.tf.saved_model.load(path, tags=list(graph.meta_info_def.tags) or None)
        except Exception as e:
            raise HandlerError(f"api {self.api!r}: loading the SavedModel {path} failed: "
                               f"{type(e).__name__}: {e}") from e
        key = pick_signature(self.api, list(model.signatures.keys()), wanted)
        signature_def = graph.signature_def[key]
        return _Servable(model, model.signatures[key],
                         [_TensorInput(k, signature_def.inputs[k], self.tf) for k in sorted(signature_def.inputs)],
                         sorted(signature_def.outputs))

    def predict(self, model_input: Dict[str, Any], model_name: Optional[str] = None,
                model_version: Any = "latest") -> Dict[str, Any]:
        servable = self.models.get_model(model_name, model_version)
        shown = model_name or "default"
        if not isinstance(model_input, dict):
            raise ValueError(f"model '{shown}': model_input must be a dict of input name -> value, "
                             f"got {type(model_input).__name__}")
        missing = [i.name for i in servable.inputs if i.name not in model_input]
        if missing:
            raise ValueError(f"missing key '{missing[0]}' for model '{shown}'")
        outputs = servable.function(**{i.name: self.tf.constant(i.convert(model_input[i.name]))
                                       for i in servable.inputs})
        return {k: to_jsonable(_text_strings(outputs[k].numpy().ravel())) for k in servable.outputs if k in outputs}


def tensorflow_client(name: str, spec: dict, project: str) -> TensorFlowClient:
    """The ``tensorflow_client`` a Handler of ``handler.models`` is built
    with: a RealtimeAPI's replica, an AsyncAPI's, a BatchAPI's job worker
    (after ``setup_process``; TensorFlow's threads limited to the
    replica's CPUs)."""
    tf = _import_tensorflow(name)
    limit_threads(name, tf, spec)
    return TensorFlowClient(name, project, spec["handler"]["models"], tf)


class TensorFlowHandlerAPI(RealtimeAPI):
    """Hosts Cortex 0.35's TensorFlow handler: ``Handler(tensorflow_client,
    config)`` (the arguments it names) with the methods of a python
    Handler (``handle_post`` and the other verbs, batching, threads)."""

    def __init__(self, spec: dict, project_dir: Optional[str] = None):
        self.name = spec.get("name") or "api"
        handler = spec.get("handler") or {}
        project = setup_process(self.name, spec, project_dir)
        self.tensorflow_client = tensorflow_client(self.name, spec, project)
        handler_class = self._load_handler_class(project, handler.get("path") or "handler.py")
        self.handler = self._build(handler_class, {"config": handler.get("config") or {},
                                                   "tensorflow_client": self.tensorflow_client})
        self._methods = self._http_methods()
        self._configure_methods(handler)
