"""``tfemb serve``: a local model server speaking TF Serving's REST and gRPC APIs over the same SavedModels.

TF Serving's ``tensorflow_model_server`` is not on PyPI, so machines without it (laptops, CI) serve tfemb
exports with this module instead. Clients cannot tell the difference for the parts of the API tfemb uses:

- REST (``tensorflow_serving/model_servers/http_rest_api_handler.cc``, ``http_rest_api_util.cc``)::

      POST /v1/models/<name>[/versions/<v>|/labels/<l>]:predict    {"instances": ...} | {"inputs": ...}
      GET  /v1/models/<name>[/versions/<v>|/labels/<l>]            GetModelStatusResponse as JSON
      GET  /v1/models/<name>[/versions/<v>|/labels/<l>]/metadata   {"model_spec": ..., "metadata": {...}}

  JSON ↔ tensor conversion and its error messages follow ``tensorflow_serving/util/json_tensor.cc``; errors
  are ``{"error": "<message>"}`` with the HTTP status of ``http_server.cc``'s ``ToHTTPStatusCode``
  (INVALID_ARGUMENT/FAILED_PRECONDITION → 400, NOT_FOUND → 404, UNAVAILABLE → 503, ...).
- gRPC: ``tensorflow.serving.PredictionService`` (``Predict``, ``GetModelMetadata``) and
  ``tensorflow.serving.ModelService`` (``GetModelStatus``) from tensorflow-serving-api, with TF Serving's
  status codes and messages (``predict_util.cc``, ``get_model_metadata_impl.cc``, ``get_model_status_impl.cc``).

Models and versions (:class:`ModelRegistry`) follow TF Serving's file-system source: a model's base path holds
integer version directories; the newest complete one is served (or what a ``models.config``
``model_version_policy`` asks for); a poll thread loads new versions and swaps them in only once loaded, so
requests never wait for or fail on a load. Directories that are hidden, not integers, lack
``saved_model.pb``, or are still changing between two polls are ignored. As ``tensorflow_model_server``
(``server_core.cc``, ``server.cc``), :class:`LocalServer` opens its ports only once every model has a version.
"""

import base64
import binascii
import json
import logging
import math
import os
import re
import signal
import threading
import time
import urllib.parse
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

log = logging.getLogger("tfemb.serving")

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_SIGNATURE = "serving_default"
PROMETHEUS_PATH = "/monitoring/prometheus/metrics"
# TF Serving reads at most this many warmup records (saved_model_warmup.md).
MAX_WARMUP_RECORDS = 1000

# tensorflow_serving/model_servers/http_server.cc: ToHTTPStatusCode. RESOURCE_EXHAUSTED is 429 there; a body
# over the size limit is answered 413 separately (see _RestHandler).
HTTP_STATUS = {
    "OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400, "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501, "INTERNAL": 500,
    "UNAVAILABLE": 503, "DATA_LOSS": 500, "UNAUTHENTICATED": 401,
}

# http_rest_api_util.cc: kPredictionApiGegex / kModelStatusApiRegex.
_PREDICT_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)", re.I)
_STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?", re.I)
_V1_PATH = re.compile(r"/v1/.*", re.I)


class ServingStatus(Exception):
    """A request failed with a canonical status code (``"NOT_FOUND"``, ``"INVALID_ARGUMENT"``, ...)."""

    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def http_status(self):
        return HTTP_STATUS.get(self.code, 500)


def _invalid(message):
    return ServingStatus("INVALID_ARGUMENT", message)


def _request_name(name, version):
    # ServableRequest::DebugString (tensorflow_serving/core/manager.h).
    return f"Specific({name}, {version})" if version is not None else f"Latest({name})"


# --------------------------------------------------------------------------------------------------------------
# Models and versions
# --------------------------------------------------------------------------------------------------------------

# tf.DType.name → TF's DataTypeString, which TF Serving's messages use ("float", not "float32").
_DTYPE_STRING = {
    "float32": "float", "float64": "double", "float16": "half", "bfloat16": "bfloat16", "int8": "int8",
    "int16": "int16", "int32": "int32", "int64": "int64", "uint8": "uint8", "uint16": "uint16",
    "uint32": "uint32", "uint64": "uint64", "string": "string", "bool": "bool",
}


def _dtype_string(dtype):
    return _DTYPE_STRING.get(dtype.name, dtype.name)


def _shape_string(shape):
    dims = getattr(shape, "as_list", lambda: list(shape))() if shape is not None else None
    if dims is None:
        return "[?]"
    return "[" + ",".join("?" if d is None or d < 0 else str(d) for d in dims) + "]"


class _Signature:
    """One callable signature of a loaded version: its function, input specs and output names."""

    def __init__(self, name, fn):
        self.name = name
        self.fn = fn
        _, kwargs = fn.structured_input_signature
        self.inputs = dict(sorted(kwargs.items()))  # name → tf.TensorSpec
        self.outputs = sorted(fn.structured_outputs)

    def __call__(self, tensors):
        import tensorflow as tf

        try:
            outputs = self.fn(**tensors)
        except tf.errors.OpError as exc:
            raise ServingStatus(_TF_CODE_NAMES.get(exc.error_code, "INTERNAL"), exc.message) from None
        except (TypeError, ValueError) as exc:
            raise _invalid(f"signature '{self.name}' could not be called with the given inputs: {exc}") from exc
        return {name: value.numpy() for name, value in outputs.items()}


_TF_CODE_NAMES = {
    1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND",
    6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION", 10: "ABORTED",
    11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED", 13: "INTERNAL", 14: "UNAVAILABLE", 15: "DATA_LOSS",
    16: "UNAUTHENTICATED",
}


class Servable:
    """One loaded version of a model. Immutable once built; requests hold a reference while they run."""

    def __init__(self, name, version, path):
        import tensorflow as tf

        self.name = name
        self.version = version
        self.path = path
        self.loaded = tf.saved_model.load(path, tags=["serve"])
        self.signatures = {key: _Signature(key, fn) for key, fn in self.loaded.signatures.items()}
        self.signature_defs = _read_signature_defs(path)
        self._metadata_json = None

    def signature(self, name, rest=True):
        key = name or DEFAULT_SIGNATURE
        sig = self.signatures.get(key)
        if sig is None:
            if rest:  # http_rest_api_handler.cc: GetInfoMap
                raise _invalid(f'Serving signature name: "{key}" not found in signature def')
            # predict_util.cc: RunPredict
            raise ServingStatus("FAILED_PRECONDITION", f'Serving signature key "{key}" not found.')
        return sig

    def metadata_proto(self):
        from tensorflow_serving.apis import get_model_metadata_pb2

        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = self.name
        response.model_spec.version.value = self.version
        sigmap = get_model_metadata_pb2.SignatureDefMap()
        for key, sigdef in self.signature_defs.items():
            sigmap.signature_def[key].CopyFrom(sigdef)
        response.metadata["signature_def"].Pack(sigmap)
        return response

    def metadata_json(self):
        # http_rest_api_util.cc: ToJsonString(GetModelMetadataResponse): proto field names, defaults printed.
        if self._metadata_json is None:
            from google.protobuf import json_format
            from tensorflow_serving.apis import get_model_metadata_pb2, model_pb2

            spec = model_pb2.ModelSpec(name=self.name)
            spec.version.value = self.version
            sigmap = get_model_metadata_pb2.SignatureDefMap()
            for key, sigdef in self.signature_defs.items():
                sigmap.signature_def[key].CopyFrom(sigdef)
            opts = {"preserving_proto_field_name": True, "always_print_fields_with_no_presence": True}
            body = {"model_spec": json_format.MessageToDict(spec, **opts),
                    "metadata": {"signature_def": json_format.MessageToDict(sigmap, **opts)}}
            self._metadata_json = json.dumps(body, indent=1).encode()
        return self._metadata_json


def _read_signature_defs(path):
    """SignatureDefs of the ``serve`` MetaGraph, read from saved_model.pb (what TF Serving's metadata returns)."""
    from google.protobuf import text_format
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    pb = os.path.join(path, "saved_model.pb")
    if os.path.exists(pb):
        with open(pb, "rb") as fh:
            sm.ParseFromString(fh.read())
    else:
        with open(os.path.join(path, "saved_model.pbtxt")) as fh:
            text_format.Parse(fh.read(), sm)
    for meta_graph in sm.meta_graphs:
        if "serve" in meta_graph.meta_info_def.tags:
            return dict(meta_graph.signature_def)
    return {}


def _is_version_dir(entry):
    # TF Serving's file-system source: a version is a directory whose name parses as an integer. Hidden and
    # temporary directories (".tmp-3", "3.tmp", "3-partial") are skipped; so is one without a SavedModel yet.
    name = entry.name
    if not (name.isascii() and name.isdigit()) or not entry.is_dir():
        return False
    return any(os.path.exists(os.path.join(entry.path, f)) for f in ("saved_model.pb", "saved_model.pbtxt"))


def scan_versions(base_path):
    """``{version: path}`` of the version directories under ``base_path`` that hold a SavedModel."""
    try:
        entries = list(os.scandir(base_path))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {int(e.name): e.path for e in entries if _is_version_dir(e)}


def _fingerprint(path):
    """Sizes and mtimes of every file under ``path``: equal on two polls means the copy has finished."""
    items = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for f in sorted(files):
            try:
                st = os.stat(os.path.join(root, f))
            except FileNotFoundError:
                continue
            items.append((os.path.relpath(os.path.join(root, f), path), st.st_size, st.st_mtime_ns))
    return tuple(items)


class _Model:
    """One served model: its base path, version policy, labels, and the versions currently served."""

    def __init__(self, name, base_path, policy=("latest", 1), labels=None):
        self.name = name
        self.base_path = base_path
        self.policy = policy
        self.labels = dict(labels or {})
        self.served = {}  # version → Servable; replaced (never mutated) so readers need no lock
        self.states = {}  # version → (state, error_code, error_message), as GetModelStatus reports
        self.seen = {}  # version → fingerprint at the previous poll
        self.failed = {}  # version → fingerprint that failed to load (retried when the files change)

    def aspired(self, complete):
        """Versions to try, in order. ``latest`` lists every complete version, newest first, and the poll
        stops after ``num_versions`` loaded: a newest version that fails to load leaves the previous one served
        (availability first)."""
        kind = self.policy[0]
        versions = sorted(complete, reverse=True)
        if kind == "specific":
            return [v for v in versions if v in self.policy[1]]
        return versions


def _policy_from_proto(config):
    which = config.model_version_policy.WhichOneof("policy_choice")
    if which == "specific":
        return ("specific", frozenset(config.model_version_policy.specific.versions))
    if which == "all":
        return ("all",)
    if which == "latest":
        return ("latest", max(1, config.model_version_policy.latest.num_versions))
    return ("latest", 1)


def _platform(cfg):
    """A ModelConfig's platform, or the ``ValueError`` TF Serving refuses the config with (``server_core.cc``:
    ``GetPlatform``, called for every model when a config is loaded: no platform at all stops the server)."""
    if cfg.model_type:  # the deprecated ModelType enum
        if cfg.model_platform:
            return ValueError("Illegal setting both ModelServerConfig::model_type (deprecated) and "
                              "ModelServerConfig::model_platform.")
        if cfg.model_type == 1:  # ModelType.TENSORFLOW
            return "tensorflow"
        return ValueError(f"ModelServerConfig::model_type choice {cfg.model_type} not supported.")
    if not cfg.model_platform:
        return ValueError("Illegal setting neither ModelServerConfig::model_type (deprecated) nor "
                          "ModelServerConfig::model_platform. Add model_platform: \"tensorflow\"")
    return cfg.model_platform


def _check_base_path(path):
    """``ValueError`` when ``path`` cannot be a model's base path and the server would wait forever for versions
    that never come: a saved Keras model (a ``.keras`` file, or a ``tfemb train`` run directory with no SavedModel
    version in it), a file, or one SavedModel version directory (``saved_model.pb`` inside: serve its parent). A
    base path that does not exist yet is allowed (TF Serving waits for it too) and logged as a warning."""
    keras_file = path if path.endswith(".keras") else os.path.join(path, "model.keras")
    if os.path.isfile(keras_file) and not (os.path.isdir(path) and scan_versions(path)):
        raise ValueError(
            f"{path} holds a trained Keras model ({os.path.basename(keras_file)}), not SavedModel versions: "
            f"export it first, e.g. `tfemb export {path} exports/<name>`, then serve exports/<name>")
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        parent = os.path.dirname(path.rstrip(os.sep))
        raise ValueError(
            f"{path} is one SavedModel version (saved_model.pb inside), not a model's base path: serve the "
            f"directory of its versions, {parent}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path} is a file, not a model's base path (a directory of integer version folders)")
    if not os.path.exists(path):
        log.warning(
            "%s does not exist (yet): the model is served once a version directory appears in it", path)


class ModelRegistry:
    """The models a server answers for, and a thread that keeps their versions up to date.

    Args:
        export_dir: a model's base path (integer version subdirectories: one model), or a directory of such
            base paths (one model per subdirectory). With ``model_config``, relative ``base_path`` values are
            resolved against it.
        model_name: the name of the single model (default: the base name of ``export_dir``).
        model_config: path of a TF Serving ``models.config`` (``ModelServerConfig`` text proto): names, base
            paths, ``model_version_policy`` and ``version_labels``.
        poll_seconds: how often the file system is checked for new versions (TF Serving's
            ``--file_system_poll_wait_seconds``, default 1).
        warmup: replay ``assets.extra/tf_serving_warmup_requests`` before a version is served (a failing
            record fails the load, as in TF Serving).
        allow_version_labels_for_unavailable_models: TF Serving's flag of that name. A config's
            ``version_labels`` are assigned before any version loads (``server_core.cc``: ``ReloadConfig`` calls
            ``UpdateModelVersionLabelMap`` first), when no version is available: without the flag
            :meth:`start` refuses them with TF Serving's ``FAILED_PRECONDITION`` error, as
            ``tensorflow_model_server`` refuses to start. With it, a label may name a version not loaded (yet);
            requests by it are answered NOT_FOUND until that version is served.

    The set of models is fixed when the registry is made; their versions are re-read every poll.
    """

    def __init__(self, export_dir, model_name=None, model_config=None, poll_seconds=1.0, warmup=True,
                 allow_version_labels_for_unavailable_models=False):
        self.export_dir = os.path.abspath(export_dir)
        self.poll_seconds = float(poll_seconds)
        self.warmup = warmup
        self.allow_version_labels_for_unavailable_models = bool(allow_version_labels_for_unavailable_models)
        self._models = {}
        self._lock = threading.Lock()  # one poll at a time
        self._stop = threading.Event()
        self._thread = None
        if not model_config:
            _check_base_path(self.export_dir)
        subdir_models = {} if model_config or model_name else self._subdir_models()
        if model_config:
            self._models_from_config(model_config)
        elif subdir_models and not scan_versions(self.export_dir):
            for name, path in subdir_models.items():
                self._models[name] = _Model(name, path)
        else:
            name = model_name or os.path.basename(self.export_dir.rstrip(os.sep)) or "default"
            self._models[name] = _Model(name, self.export_dir)

    def _subdir_models(self):
        if not os.path.isdir(self.export_dir):
            return {}
        return {e.name: e.path for e in sorted(os.scandir(self.export_dir), key=lambda e: e.name)
                if e.is_dir() and not e.name.startswith(".") and scan_versions(e.path)}

    def _models_from_config(self, path):
        from google.protobuf import text_format
        from tensorflow_serving.config import model_server_config_pb2

        config = model_server_config_pb2.ModelServerConfig()
        with open(path) as fh:
            try:
                text_format.Parse(fh.read(), config)
            except text_format.ParseError as exc:
                raise ValueError(f"{path} is not a ModelServerConfig text proto: {exc}") from exc
        if config.WhichOneof("config") != "model_config_list":
            raise ValueError(f"{path}: only model_config_list is supported")
        for cfg in config.model_config_list.config:
            platform = _platform(cfg)
            if isinstance(platform, ValueError):
                raise ValueError(f"{path}: model {cfg.name!r}: {platform}")
            if platform != "tensorflow":
                raise ValueError(f"{path}: model {cfg.name!r} has model_platform {cfg.model_platform!r}; "
                                 "only 'tensorflow' is served")
            if not cfg.name or cfg.name in self._models:
                raise ValueError(f"{path}: model names must be non-empty and unique. Received: {cfg.name!r}")
            base = cfg.base_path if os.path.isabs(cfg.base_path) else os.path.join(self.export_dir, cfg.base_path)
            self._models[cfg.name] = _Model(cfg.name, base, _policy_from_proto(cfg), dict(cfg.version_labels))

    @property
    def model_names(self):
        return list(self._models)

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self):
        """Load what is there now, then poll in a background thread."""
        if self._thread is not None:
            return self
        self._check_labels()
        self.poll_once(initial=True)
        if self.poll_seconds > 0:
            self._thread = threading.Thread(target=self._run, name="tfemb-serve-poll", daemon=True)
            self._thread.start()
        return self

    def _check_labels(self):
        """server_core.cc ``UpdateModelVersionLabelMap``: a label must name an AVAILABLE version, unless
        ``--allow_version_labels_for_unavailable_models`` (then any label not yet pointing elsewhere; the labels are
        read once, at start, so none is). Checked before the first load, as TF Serving does."""
        if self.allow_version_labels_for_unavailable_models:
            return
        for model in self._models.values():
            for label, version in sorted(model.labels.items()):  # a proto map has no order: the first by name
                if version not in model.served:
                    raise ValueError(
                        f"FAILED_PRECONDITION: Request to assign label to version {version} of model {model.name}, "
                        f"which is not currently available for inference (version_labels {{ key: {label!r} value: "
                        f"{version} }}: labels are assigned before any version loads; tensorflow_model_server "
                        "needs --allow_version_labels_for_unavailable_models=true to start with them, and so does "
                        "tfemb serve)")

    def missing_models(self):
        """Names of the models with no version served (yet)."""
        return [name for name, model in self._models.items() if not model.served]

    def wait_until_available(self, cancel=None, log_every=10.0):
        """Block until every model has a served version (``True``), or ``cancel`` (a ``threading.Event``) is set
        (``False``). TF Serving's ``ServerCore::Create`` does the same before the server opens its ports
        (``server_core.cc``: ``ConnectAdaptersToManagerAndAwaitModelLoads``). Each model still missing a version is
        logged at once and every ``log_every`` seconds, with ``file_system_storage_path_source.cc``'s words."""
        cancel = cancel or threading.Event()
        next_log = 0.0
        while True:
            missing = self.missing_models()
            if not missing:
                return True
            now = time.monotonic()
            if now >= next_log:
                for name in missing:
                    log.warning("%s", self._missing_message(self._models[name]))
                next_log = now + log_every
            if self._thread is None:  # no poll thread (poll_seconds <= 0): poll here while waiting
                if cancel.wait(0.5):
                    return False
                self.poll_once()
            elif cancel.wait(min(0.5, max(self.poll_seconds, 0.05))):
                return False

    @staticmethod
    def _missing_message(model):
        failed = {v: st for v, st in model.states.items() if st[0] == "END" and st[1] != "OK"}
        if failed:
            version = max(failed)
            why = f"version {version} failed to load ({failed[version][2]}); a new version or changed files are retried"
        elif not os.path.isdir(model.base_path):
            why = f"Could not find base path {model.base_path} for servable {model.name}"
        else:  # file_system_storage_path_source.cc: PollFileSystemForServable
            why = (f"No versions of servable {model.name} found under base path {model.base_path}. Did you forget to "
                   "name your leaf directory as a number (eg. '/1/')?")
            there = sorted(scan_versions(model.base_path))
            if there and model.policy[0] == "specific":
                why += (f" (model_version_policy specific {{ versions: {sorted(model.policy[1])} }} names none of the "
                        f"versions there: {there})")
        return (f"{why} [model {model.name!r} has no version loaded: the REST and gRPC ports open once every "
                "configured model has one, as tensorflow_model_server's do]")

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self):
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll_once()
            except Exception:  # never let the poller die: the next poll tries again
                log.exception("polling for new model versions failed")

    def poll_once(self, initial=False):
        """Check every model's base path once; load aspired versions; swap them in when loaded."""
        with self._lock:
            for model in self._models.values():
                self._poll_model(model, initial)

    def _poll_model(self, model, initial):
        found = scan_versions(model.base_path)
        complete = {}
        for version, path in found.items():
            fp = _fingerprint(path)
            # A version is complete once its files stop changing between two polls (a non-atomic copy may
            # still be writing variables/). At start-up and for versions already served, no wait.
            if initial or version in model.served or model.seen.get(version) == fp:
                complete[version] = (path, fp)
            model.seen[version] = fp
        for version in list(model.seen):
            if version not in found:
                del model.seen[version]

        served = {}
        want = model.policy[1] if model.policy[0] == "latest" else len(complete)
        for version in model.aspired(complete):
            if len(served) >= want:
                break
            if version in model.served:
                served[version] = model.served[version]
                continue
            path, fp = complete[version]
            if model.failed.get(version) == fp:
                continue
            model.states[version] = ("LOADING", "OK", "")
            try:
                servable = Servable(model.name, version, path)
                if self.warmup:
                    _run_warmup(servable)
            except Exception as exc:  # a broken export must not take the server down
                log.error("loading %s version %d from %s failed: %s", model.name, version, path, exc)
                model.failed[version] = fp
                model.states[version] = ("END", "UNKNOWN", f"loading {path} failed: {exc}")
                continue
            model.failed.pop(version, None)
            served[version] = servable
            model.states[version] = ("AVAILABLE", "OK", "")
            log.info("loaded %s version %d from %s", model.name, version, path)

        if served.keys() != model.served.keys():
            for version in model.served.keys() - served.keys():
                model.states[version] = ("END", "OK", "")
                log.info("unloaded %s version %d", model.name, version)
            model.served = served  # atomic swap: in-flight requests keep their reference to the old one

    # -- look-ups ----------------------------------------------------------------------------------------------

    def resolve(self, name, version=None, label=None):
        """The servable for a request, or a ``ServingStatus`` as TF Serving's ``GetServableHandle`` raises."""
        if version is not None and label is not None:  # http_rest_api_util.cc
            raise _invalid(f"Both model version ({version}) and model version label ({label}) cannot be supplied.")
        if not name:  # server_core.cc: ServableRequestFromModelSpec (gRPC; a REST path always has a name)
            raise _invalid("ModelSpec has no name specified.")
        model = self._models.get(name)
        if label is not None:
            if model is None or label not in model.labels:  # server_core.cc: GetModelVersionForLabel
                raise _invalid(f"Unrecognized servable version label: {label}")
            version = model.labels[label]
        if model is None:
            raise ServingStatus("NOT_FOUND", f"Servable not found for request: {_request_name(name, version)}")
        served = model.served
        if version is None:
            if served:
                return served[max(served)]
        elif version in served:
            return served[version]
        raise ServingStatus("NOT_FOUND", f"Servable not found for request: {_request_name(name, version)}")

    def status_proto(self, name, version=None, label=None):
        """``GetModelStatusResponse`` (get_model_status_impl.cc): every known version, newest first. A version
        label is ignored there (only ``model_spec.version`` is read): by label, every version is answered."""
        from tensorflow_serving.apis import get_model_status_pb2

        model = self._models.get(name)
        states = dict(model.states) if model is not None else {}
        if version is not None:
            if version not in states:
                raise ServingStatus("NOT_FOUND", f"Could not find version {version} of model {name}")
            states = {version: states[version]}
        elif not states:
            raise ServingStatus("NOT_FOUND", f"Could not find any versions of model {name}")
        response = get_model_status_pb2.GetModelStatusResponse()
        for v in sorted(states, reverse=True):
            state, code, message = states[v]
            entry = response.model_version_status.add()
            entry.version = v
            entry.state = get_model_status_pb2.ModelVersionStatus.State.Value(state)
            entry.status.error_code = _error_code_value(code)
            entry.status.error_message = message
        return response


def _error_code_value(name):
    from tensorflow_serving.apis import status_pb2

    enum = status_pb2.StatusProto.DESCRIPTOR.fields_by_name["error_code"].enum_type
    return enum.values_by_name[name].number


# --------------------------------------------------------------------------------------------------------------
# JSON ↔ tensors (tensorflow_serving/util/json_tensor.cc)
# --------------------------------------------------------------------------------------------------------------


def _json_type(val):
    if val is None:
        return "Null"
    if val is True:
        return "True"
    if val is False:
        return "False"
    if isinstance(val, dict):
        return "Object"
    if isinstance(val, list):
        return "Array"
    if isinstance(val, str):
        return "String"
    return "Number"


def _json_str(val, limit=200):
    text = json.dumps(val, separators=(",", ":"))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_b64(val):
    return isinstance(val, dict) and len(val) == 1 and isinstance(val.get("b64"), str)


_FLOAT32_MAX = float(np.finfo(np.float32).max)
_INT_RANGES = {
    "int8": (-(2 ** 7), 2 ** 7 - 1), "int16": (-(2 ** 15), 2 ** 15 - 1), "int32": (-(2 ** 31), 2 ** 31 - 1),
    "int64": (-(2 ** 63), 2 ** 63 - 1), "uint8": (0, 2 ** 8 - 1), "uint16": (0, 2 ** 16 - 1),
    "uint32": (0, 2 ** 32 - 1), "uint64": (0, 2 ** 64 - 1),
}


def _type_error(val, dtype):
    return _invalid(f"JSON Value: {_json_str(val)} Type: {_json_type(val)} is not of expected type: {dtype}")


def _scalar(val, dtype):
    """One JSON leaf → a Python value for a tensor of ``dtype`` (a DataTypeString), as AddValueToTensor."""
    kind = type(val)
    if dtype in ("float", "double", "half", "bfloat16"):
        if kind is float or kind is int:
            if dtype != "double":
                # IsLosslessDecimal<float>: integers beyond 2^24 and finite values beyond float's range.
                if (kind is int and abs(val) > (1 << 24) - 1) or (
                        kind is float and math.isfinite(val) and abs(val) > _FLOAT32_MAX):
                    raise _invalid(f"Cannot convert JSON value: {_json_str(val)} to float without loss of precision.")
            return val
        raise _type_error(val, dtype)
    if dtype == "string":
        if kind is str:
            try:
                return val.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate ("\\ud800"): not a string TF Serving's parser accepts
                raise _invalid(f"JSON Value: {_json_str(val)} is not a valid UTF-8 string") from None
        if _is_b64(val):
            try:
                return base64.b64decode(val["b64"], validate=True)
            except (binascii.Error, ValueError):
                raise _invalid("Unable to base64 decode") from None
        if isinstance(val, dict):
            raise _invalid(f"JSON Value: {_json_str(val)} not formatted correctly for base64 data")
        raise _type_error(val, dtype)
    if dtype in _INT_RANGES:
        lo, hi = _INT_RANGES[dtype]
        if kind is int and lo <= val <= hi:
            return val
        raise _type_error(val, dtype)
    if dtype == "bool":
        if kind is bool:
            return val
        raise _type_error(val, dtype)
    raise ServingStatus("UNIMPLEMENTED", f"Conversion of JSON Value: {_json_str(val)} to type: {dtype}")


def _dense_shape(val):
    shape = []
    while isinstance(val, list):
        shape.append(len(val))
        if not val:
            break
        val = val[0]
    return shape


def _fill(val, level, shape, dtype, out):
    # FillTensorProto: every leaf sits at depth == rank; every list at a depth has that depth's size.
    rank = len(shape)
    if not isinstance(val, list):
        if level != rank:
            raise _invalid(f"JSON Value: {_json_str(val)} found at incorrect level: {level + 1} in the JSON DOM. "
                           f"Expected at level: {rank}")
        out.append(_scalar(val, dtype))
        return
    if level >= rank:
        raise _invalid(f"Encountered list at unexpected level: {level} expected < {rank}")
    if len(val) != shape[level]:
        raise _invalid(f"Encountered list at unexpected size: {len(val)} at level: {level} "
                       f"expected size: {shape[level]}")
    if level == rank - 1:
        for v in val:
            if isinstance(v, list):
                raise _invalid(f"Encountered list at unexpected level: {level + 1} expected < {rank}")
            out.append(_scalar(v, dtype))
        return
    for v in val:
        _fill(v, level + 1, shape, dtype, out)


_NP_DTYPES = {
    "float": np.float32, "double": np.float64, "half": np.float16, "int8": np.int8, "int16": np.int16,
    "int32": np.int32, "int64": np.int64, "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32,
    "uint64": np.uint64, "bool": np.bool_, "string": object,
}


def _json_to_array(val, dtype):
    """A JSON value (scalar or nested list) → ``(flat values, shape)`` checked against ``dtype``."""
    shape = _dense_shape(val)
    flat = []
    _fill(val, 0, shape, dtype, flat)
    return flat, shape


def _to_numpy(flat, shape, dtype):
    if dtype == "string":
        arr = np.empty(len(flat), dtype=object)
        arr[:] = flat
        return arr.reshape(shape)
    if dtype == "bfloat16":
        return np.asarray(flat, dtype=np.float32).reshape(shape)
    return np.asarray(flat, dtype=_NP_DTYPES[dtype]).reshape(shape)


def _parse_json(body):
    if not body:
        raise _invalid("JSON Parse error: The document is empty")
    try:
        doc = json.loads(body)
    except json.JSONDecodeError as exc:
        raise _invalid(f"JSON Parse error: {exc.msg} at offset: {exc.pos}") from None
    except (UnicodeDecodeError, RecursionError) as exc:
        raise _invalid(f"JSON Parse error: {exc}") from None
    if not isinstance(doc, dict):
        raise _invalid(f"JSON Value: {_json_str(doc)} Is not object")
    return doc


def _input_dtype(sig, name):
    return _dtype_string(sig.inputs[name].dtype)


def _tensors_from_instances(instances, sig):
    """Row format (FillTensorMapFromInstancesList): one object per example, or plain values for one input."""
    names = list(sig.inputs)
    first = instances[0]
    is_obj = lambda v: isinstance(v, dict) and not _is_b64(v)  # noqa: E731
    if not isinstance(first, dict) and len(names) > 1:
        raise _invalid("instances is a plain list, but expecting list of objects as multiple input tensors "
                       "required as per tensorinfo_map")
    objects = is_obj(first)
    flats = {n: [] for n in names}
    shapes = {}
    for i, elem in enumerate(instances):
        if objects:
            if not is_obj(elem):
                raise _invalid(f"Expecting object but got list at item {i} of input list")
            for key, value in elem.items():
                try:
                    if key not in sig.inputs:
                        raise _invalid(f"JSON object: does not have named input: {key}")
                    _add_item(value, key, _input_dtype(sig, key), flats, shapes)
                except ServingStatus as exc:
                    raise _invalid(f"Failed to process element: {i} key: {key} of 'instances' list. "
                                   f"Error: {exc.code}: {exc.message}") from None
            if set(elem) != set(names):
                raise _invalid(f"Failed to process element: {i} of 'instances' list. JSON object: "
                               f"{_json_str(elem)} keys must be equal to: {','.join(sorted(names))}")
        else:
            if is_obj(elem):
                raise _invalid(f"Expecting value/list but got object at item {i} of input list")
            try:
                _add_item(elem, names[0], _input_dtype(sig, names[0]), flats, shapes)
            except ServingStatus as exc:
                raise _invalid(f"Failed to process element: {i} of 'instances' list. "
                               f"Error: {exc.code}: {exc.message}") from None
    n = len(instances)
    return {name: _to_numpy(flats[name], [n] + shapes[name], _input_dtype(sig, name)) for name in shapes}


def _add_item(value, name, dtype, flats, shapes):
    flat, shape = _json_to_array(value, dtype)
    if name not in shapes:
        shapes[name] = shape
    elif int(np.prod(shapes[name])) != len(flat):
        raise _invalid(f"Expecting tensor size: {int(np.prod(shapes[name]))} but got: {len(flat)}")
    elif shapes[name] != shape:
        raise _invalid(f"Expecting shape [{','.join(map(str, shapes[name]))}] but got: "
                       f"[{','.join(map(str, shape))}]")
    flats[name].extend(flat)


def _tensors_from_inputs(inputs, sig):
    """Columnar format (FillTensorMapFromInputsMap): a value for the one input, or an object of named inputs."""
    names = list(sig.inputs)
    if not isinstance(inputs, dict) or _is_b64(inputs):
        if len(names) > 1:
            raise _invalid("inputs is a plain value/list, but expecting an object as multiple input tensors "
                           "required as per tensorinfo_map")
        inputs = {names[0]: inputs}
    tensors = {}
    for name in names:
        if name not in inputs:
            raise _invalid(f"Missing named input: {name} in 'inputs' object.")
        dtype = _input_dtype(sig, name)
        try:
            flat, shape = _json_to_array(inputs[name], dtype)
        except ServingStatus as exc:
            # TF Serving's message does not say which input failed; tfemb's does.
            raise ServingStatus(exc.code, f"Failed to process input: {name} of 'inputs' object. "
                                          f"Error: {exc.message}") from None
        tensors[name] = _to_numpy(flat, shape, dtype)
    return tensors


def _check_shapes(tensors, sig):
    """Rank and fixed dimensions against the signature, with the input named (TF would say much less)."""
    for name, arr in tensors.items():
        spec = sig.inputs[name]
        dims = spec.shape.as_list() if spec.shape.rank is not None else None
        if dims is None:
            continue
        ok = len(dims) == arr.ndim and all(d is None or d == s for d, s in zip(dims, arr.shape))
        if not ok:
            raise _invalid(f"input '{name}' of signature '{sig.name}' expects shape {_shape_string(spec.shape)} "
                           f"(dtype {_dtype_string(spec.dtype)}); got shape [{','.join(map(str, arr.shape))}]")


def _json_values(name, arr):
    """An output array → nested lists for JSON (AddTensorValues): float32 printed in its shortest form."""
    kind = arr.dtype.kind
    if arr.dtype == np.float32 or arr.dtype == np.float16:
        # The shortest decimal that round-trips the float32 (TF Serving's WriteDecimal), not the float64 noise.
        return arr.astype(np.float32).astype(str).astype(np.float64).tolist()
    if kind in "fiub":
        return arr.tolist()
    if kind in "OSU":
        as_bytes = name.endswith("_bytes")

        def encode(v):
            if isinstance(v, bytes):
                if not as_bytes:
                    try:
                        return v.decode("utf-8")
                    except UnicodeDecodeError:
                        pass
                return {"b64": base64.b64encode(v).decode("ascii")}
            return str(v)

        return np.vectorize(encode, otypes=[object])(arr).tolist() if arr.size else arr.tolist()
    raise _invalid(f"Failed to write JSON value for tensor type: {arr.dtype}")


def _predict_response_json(outputs, row):
    if not outputs:
        raise _invalid("Cannot convert empty tensor map to JSON")
    names = sorted(outputs)
    if not row:  # MakeColumnarFormatJsonFromTensors
        if len(names) == 1:
            return {"outputs": _json_values(names[0], outputs[names[0]])}
        return {"outputs": {n: _json_values(n, outputs[n]) for n in names}}
    batch = None  # MakeRowFormatJsonFromTensors
    for n in names:
        if outputs[n].ndim == 0:
            raise _invalid(f"Tensor name: {n} has no shape information ")
        if batch is not None and outputs[n].shape[0] != batch:
            raise _invalid(f"Tensor name: {n} has inconsistent batch size: {outputs[n].shape[0]} "
                           f"expecting: {batch}")
        batch = outputs[n].shape[0]
    values = {n: _json_values(n, outputs[n]) for n in names}
    if len(names) == 1:
        return {"predictions": values[names[0]]}
    return {"predictions": [{n: values[n][i] for n in names} for i in range(batch)]}


# --------------------------------------------------------------------------------------------------------------
# The service: REST and gRPC share it
# --------------------------------------------------------------------------------------------------------------


class _Metrics:
    """Request counters in Prometheus text format (a small subset of TF Serving's)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = {}

    def count(self, entrypoint, model, api, code):
        key = (entrypoint, model or "", api, code)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1

    def render(self, registry):
        lines = ["# TYPE :tensorflow:serving:request_count counter"]
        with self._lock:
            items = sorted(self._counts.items())
        for (entrypoint, model, api, code), n in items:
            lines.append(f':tensorflow:serving:request_count{{API="{api}",entrypoint="{entrypoint}",'
                         f'model_name="{model}",status="{code}"}} {n}')
        lines.append("# TYPE :tfemb:serving:available_versions gauge")
        for name in registry.model_names:
            lines.append(f':tfemb:serving:available_versions{{model_name="{name}"}} '
                         f'{len(registry._models[name].served)}')
        return ("\n".join(lines) + "\n").encode()


def _check_batch_size(tensors, limit):
    """TF Serving with batching (``--enable_batching``) refuses a request larger than ``max_batch_size``
    (``shared_batch_scheduler.h``: a task larger than the largest batch), with the same words."""
    if limit is None:
        return
    size = max((int(arr.shape[0]) if arr.ndim else 1 for arr in tensors.values()), default=0)
    if size > limit:
        raise _invalid(f"Task size {size} is larger than maximum input batch size {limit}")


class _Service:
    def __init__(self, registry, max_batch_size=None):
        self.registry = registry
        self.max_batch_size = max_batch_size
        self.metrics = _Metrics()

    # -- REST --------------------------------------------------------------------------------------------------

    def rest(self, method, path, body):
        """``(http_status, content_type, body_bytes, close)`` for one REST request; ``close``: answer with
        ``Connection: close``."""
        path = urllib.parse.urlsplit(path).path
        if path == PROMETHEUS_PATH:  # http_server.cc: ProcessPrometheusRequest, whatever the method
            return 200, "text/plain", self.metrics.render(self.registry), False
        if not _V1_PATH.fullmatch(path):
            # http_server.cc: the REST dispatcher takes only (?i)/v1/.*; for any other path no handler is found
            # and libevent answers its own 404 page, closing the connection (evhttp_server.cc: evhttp_send_error).
            return 404, "text/html", _EVHTTP_NOT_FOUND, True
        return self._rest_v1(method, path, body) + (False,)

    def _rest_v1(self, method, path, body):
        model_name, api = None, "unknown"
        try:
            m = _PREDICT_PATH.fullmatch(path) if method == "POST" else None
            if m:
                model_name, version, label = _decode(m.group(1)), _version(m.group(2)), _decode(m.group(3))
                api = m.group(4)
                if api not in ("classify", "regress", "predict"):  # the regex is (?i), the comparison is not
                    raise _invalid(f"Malformed request: {method} {path}")
                if api != "predict":
                    raise ServingStatus("UNIMPLEMENTED", f"{api} is not served by tfemb serve; use :predict "
                                                         "(tfemb exports have no classify/regress signatures)")
                out = self.predict_json(model_name, version, label, body)
                result = json.dumps(out, separators=(",", ":")).encode()
            else:
                m = _STATUS_PATH.fullmatch(path) if method == "GET" else None
                if not m:
                    raise _invalid(f"Malformed request: {method} {path}")
                model_name, version, label = _decode(m.group(1)), _version(m.group(2)), _decode(m.group(3))
                if not model_name:
                    raise _invalid("Missing model name in request.")
                if m.group(4) == "metadata":  # "METADATA" matches the (?i) regex, and is a status request
                    api = "metadata"
                    result = self.registry.resolve(model_name, version, label).metadata_json()
                else:
                    api = "status"
                    result = _status_json(self.registry.status_proto(model_name, version, label))
            self.metrics.count("REST", model_name, api, "OK")
            return 200, "application/json", result
        except ServingStatus as exc:
            self.metrics.count("REST", model_name, api, exc.code)
            return exc.http_status, "application/json", _error_json(exc.message)
        except Exception as exc:  # a bug here must still answer in TF Serving's shape
            log.exception("REST %s %s failed", method, path)
            self.metrics.count("REST", model_name, api, "INTERNAL")
            return 500, "application/json", _error_json(f"Internal error: {type(exc).__name__}: {exc}")

    def predict_json(self, name, version, label, body):
        doc = _parse_json(body)
        sig_name = doc.get("signature_name", "")
        if not isinstance(sig_name, str):
            raise _invalid(f"JSON Value: {_json_str(doc)} not formatted correctly. 'signature_name' key must be "
                           "a string value.")
        servable = self.registry.resolve(name, version, label)
        sig = servable.signature(sig_name, rest=True)
        if not sig.inputs:
            raise _invalid(f"Failed to get input map for signature: {sig_name or 'DEFAULT'}")
        has_instances, has_inputs = "instances" in doc, "inputs" in doc
        if has_instances and has_inputs:
            raise _invalid(f"JSON Value: {_json_str(doc)} Not formatted correctly expecting only one of 'inputs' "
                           "or 'instances' keys to exist ")
        if has_instances:
            instances = doc["instances"]
            if not isinstance(instances, list):
                raise _invalid(f"JSON Value: {_json_str(doc)} Excepting 'instances' to be an list/array")
            if not instances:
                raise _invalid(f"JSON Value: {_json_str(doc)} No values in 'instances' array")
            tensors = _tensors_from_instances(instances, sig)
        elif has_inputs:
            tensors = _tensors_from_inputs(doc["inputs"], sig)
        else:
            raise _invalid("Missing 'inputs' or 'instances' key")
        _check_shapes(tensors, sig)
        _check_batch_size(tensors, self.max_batch_size)
        outputs = sig(_as_tf(tensors, sig))
        return _predict_response_json(outputs, row=has_instances)

    # -- gRPC --------------------------------------------------------------------------------------------------

    def predict_proto(self, request, servable=None):
        """``PredictRequest`` → ``PredictResponse`` (predict_util.cc: RunPredict / PreProcessPrediction)."""
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        spec = request.model_spec
        if servable is None:
            if not request.HasField("model_spec"):  # predict_impl.cc: TensorflowPredictor::Predict
                raise _invalid("Missing ModelSpec")
            servable = self.registry.resolve(spec.name, *_spec_version(spec))
        sig = servable.signature(spec.signature_name, rest=False)
        req_names, sig_names = set(request.inputs), set(sig.inputs)
        if len(req_names) != len(sig_names):
            raise _invalid(
                f"input size does not match signature: {len(req_names)}!={len(sig_names)} "
                f"len({{{','.join(sorted(req_names))}}}) != len({{{','.join(sorted(sig_names))}}}). "
                f"Sent extra: {{{','.join(sorted(req_names - sig_names))}}}. "
                f"Missing but required: {{{','.join(sorted(sig_names - req_names))}}}.")
        tensors = {}
        for alias, proto in request.inputs.items():
            if alias not in sig.inputs:
                raise _invalid(f"input tensor alias not found in signature: {alias}. Inputs expected to be in the "
                               f"set {{{','.join(sorted(sig_names))}}}.")
            expected = sig.inputs[alias].dtype
            if proto.dtype != expected.as_datatype_enum:
                got = _dtype_string(tf.dtypes.as_dtype(proto.dtype)) if proto.dtype else "DT_INVALID"
                raise _invalid(f"input '{alias}' of signature '{sig.name}' expects dtype "
                               f"{_dtype_string(expected)} but got {got}")
            try:
                tensors[alias] = tf.make_ndarray(proto)
            except Exception as exc:
                raise _invalid(f"tensor parsing error: {alias} ({exc})") from None
        _check_shapes(tensors, sig)
        _check_batch_size(tensors, self.max_batch_size)
        wanted = list(request.output_filter)
        for alias in wanted:
            if alias not in sig.outputs:
                raise _invalid(f"output tensor alias not found in signature: {alias} Outputs expected to be in "
                               f"the set {{{','.join(sig.outputs)}}}.")
        if len(set(wanted)) != len(wanted):
            dup = next(a for a in wanted if wanted.count(a) > 1)
            raise _invalid(f"duplicate output tensor alias: {dup}")
        outputs = sig(_as_tf(tensors, sig))
        response = predict_pb2.PredictResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = sig.name
        for alias in wanted or sorted(outputs):
            response.outputs[alias].CopyFrom(tf.make_tensor_proto(outputs[alias]))
        return response

    def metadata_proto(self, request):
        # get_model_metadata_impl.cc: ValidateGetModelMetadataRequest.
        if not request.HasField("model_spec"):
            raise _invalid("Missing ModelSpec")
        if not request.metadata_field:
            raise _invalid("GetModelMetadataRequest must specify at least one metadata_field")
        for field in request.metadata_field:
            if field != "signature_def":
                raise _invalid(f"Metadata field {field} is not supported")
        return self.registry.resolve(request.model_spec.name, *_spec_version(request.model_spec)).metadata_proto()

    def status_proto(self, request):
        if not request.HasField("model_spec"):
            raise _invalid("Missing ModelSpec")
        return self.registry.status_proto(request.model_spec.name, *_spec_version(request.model_spec))


def _spec_version(spec):
    version = spec.version.value if spec.HasField("version") else None
    label = spec.version_label if spec.WhichOneof("version_choice") == "version_label" else None
    return version, label


def _as_tf(tensors, sig):
    import tensorflow as tf

    return {name: tf.constant(arr, dtype=sig.inputs[name].dtype) for name, arr in tensors.items()}


def _decode(part):
    return urllib.parse.unquote(part) if part else None


def _version(part):
    if not part:
        return None
    try:
        version = int(part)
    except ValueError:
        version = None
    if version is None or not -(2 ** 63) <= version < 2 ** 63:  # http_rest_api_util.cc: SimpleAtoi into int64_t
        raise _invalid(f"Failed to convert version: {part} to numeric.")
    return version


# libevent's evhttp_send_error(req, 404, NULL) page (Content-Type text/html, Connection: close).
_EVHTTP_NOT_FOUND = (b"<HTML><HEAD>\n<TITLE>404 Not Found</TITLE>\n</HEAD><BODY>\n<H1>Not Found</H1>\n"
                     b"</BODY></HTML>\n")


def _error_json(message):
    return json.dumps({"error": message}).encode()


def _status_json(response):
    from google.protobuf import json_format

    # http_rest_api_util.cc: ToJsonString(GetModelStatusResponse); the protos carry snake_case json_names.
    return json.dumps(json_format.MessageToDict(response, always_print_fields_with_no_presence=True),
                      indent=1).encode()


def _run_warmup(servable):
    """Replay ``assets.extra/tf_serving_warmup_requests`` (PredictionLog TFRecords) as TF Serving does."""
    path = os.path.join(servable.path, "assets.extra", "tf_serving_warmup_requests")
    if not os.path.exists(path):
        return
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    service = _Service(registry=None)
    for i, record in enumerate(tf.data.TFRecordDataset(path)):
        if i >= MAX_WARMUP_RECORDS:
            break
        entry = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        if entry.WhichOneof("log_type") == "predict_log":
            try:
                service.predict_proto(entry.predict_log.request, servable=servable)
            except ServingStatus as exc:
                raise RuntimeError(f"warmup request {i} failed: {exc.code}: {exc.message}") from None


# --------------------------------------------------------------------------------------------------------------
# Transports
# --------------------------------------------------------------------------------------------------------------


class _RestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client's connection serves many requests
    server_version = "tfemb-serve"
    timeout = 120  # an idle keep-alive connection is dropped after this many seconds
    # TCP_NODELAY: with Nagle on, a small answer after the headers waits for the client's delayed ACK (40 ms).
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):
        log.debug("%s - %s", self.address_string(), fmt % args)

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def do_DELETE(self):
        self._handle("DELETE")

    def do_PATCH(self):
        self._handle("PATCH")

    def do_HEAD(self):  # evhttp accepts HEAD and passes it on; _reply sends no body
        self._handle("HEAD")

    def handle_expect_100(self):
        # "Expect: 100-continue" (curl sends it for large bodies): refuse an oversized body before it is sent.
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            n = 0
        if n > self.server.max_body_bytes:
            self._refuse(_BodyError(413, _too_large(n, self.server.max_body_bytes)), drain=0)
            return False
        return super().handle_expect_100()

    def _handle(self, method):
        self.server.active.acquire()
        try:
            try:
                body = self._read_body(self.server.max_body_bytes)
            except _BodyError as exc:
                self._refuse(exc, drain=exc.unread)
                return
            status, ctype, payload, close = self.server.service.rest(method, self.path, body)
            if close:
                self.close_connection = True
            self._reply(status, ctype, payload, close=close)
        finally:
            self.server.active.release()

    def _refuse(self, exc, drain):
        """Answer, then close. Reading (and dropping) the rest of the body first lets the client finish
        sending and read the answer; closing on unread data would reset the connection under it."""
        self.close_connection = True
        self.server.service.metrics.count("REST", None, "body", "RESOURCE_EXHAUSTED")
        self._reply(exc.status, "application/json", _error_json(exc.message), close=True)
        try:
            self.wfile.flush()
            self.connection.settimeout(5)
            left = min(drain, _MAX_DRAIN_BYTES)
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _read_body(self, limit):
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked(limit)
        if length is None:
            return b""
        try:
            n = int(length)
        except ValueError:
            n = -1
        if n < 0:  # a negative length would read to EOF: past the body limit, or forever on a kept-alive socket
            raise _BodyError(400, f"Malformed Content-Length: {length}")
        if n > limit:
            raise _BodyError(413, _too_large(n, limit), unread=n)
        return self.rfile.read(n)

    def _read_chunked(self, limit):
        chunks, total = [], 0
        while True:
            line = self.rfile.readline(65537)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise _BodyError(400, "Malformed chunked request body") from None
            if size == 0:
                while self.rfile.readline(65537).strip():  # trailers
                    pass
                return b"".join(chunks)
            total += size
            if total > limit:
                raise _BodyError(413, f"Request body exceeds the limit of {limit} bytes (tfemb serve --max-body-mb)",
                                 unread=_MAX_DRAIN_BYTES)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()

    def _reply(self, status, ctype, payload, close=False):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        if close:
            self.send_header("Connection", "close")
        self._headers_buffer.append(b"\r\n")
        if self.command != "HEAD":
            self._headers_buffer.append(payload)  # headers and body in one write
        self.flush_headers()


class _Counter:
    def __init__(self):
        self._n = 0
        self._cond = threading.Condition()

    def acquire(self):
        with self._cond:
            self._n += 1

    def release(self):
        with self._cond:
            self._n -= 1
            self._cond.notify_all()

    def wait_idle(self, timeout):
        with self._cond:
            return self._cond.wait_for(lambda: self._n == 0, timeout)


class _BodyError(Exception):
    def __init__(self, status, message, unread=0):
        super().__init__(message)
        self.status = status
        self.message = message
        self.unread = unread


_MAX_DRAIN_BYTES = 64 * 1024 * 1024


def _too_large(n, limit):
    return f"Request body of {n} bytes exceeds the limit of {limit} bytes (tfemb serve --max-body-mb)"


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # idle keep-alive connections must not block shutdown
    request_queue_size = 128

    def __init__(self, address, service, max_body_bytes):
        self.service = service
        self.max_body_bytes = max_body_bytes
        self.active = _Counter()  # requests being answered, so that stop() can let them finish
        if ":" in address[0]:
            import socket

            self.address_family = socket.AF_INET6
        super().__init__(address, _RestHandler)


def _grpc_servicers(service):
    import grpc
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    def call(api, fn, request, context, name):
        try:
            response = fn(request)
            service.metrics.count("gRPC", name, api, "OK")
            return response
        except ServingStatus as exc:
            service.metrics.count("gRPC", name, api, exc.code)
            context.abort(getattr(grpc.StatusCode, exc.code, grpc.StatusCode.UNKNOWN), exc.message)
        except Exception as exc:
            log.exception("gRPC %s failed", api)
            service.metrics.count("gRPC", name, api, "INTERNAL")
            context.abort(grpc.StatusCode.INTERNAL, f"Internal error: {type(exc).__name__}: {exc}")

    class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            return call("predict", service.predict_proto, request, context, request.model_spec.name)

        def GetModelMetadata(self, request, context):
            return call("metadata", service.metadata_proto, request, context, request.model_spec.name)

    class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
        def GetModelStatus(self, request, context):
            return call("status", service.status_proto, request, context, request.model_spec.name)

    return PredictionServicer(), ModelServicer()


class LocalServer:
    """REST and gRPC endpoints over a :class:`ModelRegistry`.

    Args:
        registry: the models to serve (started here if it is not running yet).
        host: the interface to bind; ``127.0.0.1`` unless told otherwise (``0.0.0.0`` exposes the server).
        port: REST port (TF Serving's ``--rest_api_port``); 0 picks a free port, ``None`` disables REST.
        grpc_port: gRPC port (TF Serving's ``--port``); 0 picks a free port, ``None`` disables gRPC.
        max_body_bytes: larger REST bodies are refused with 413; gRPC messages with RESOURCE_EXHAUSTED.
        grpc_workers: threads answering gRPC calls.
        max_batch_size: None (default: any number of rows, TF Serving without batching) or an int >= 1: requests
            of more rows are refused with INVALID_ARGUMENT (400) as TF Serving refuses them with batching on
            (``serving/batching.config``'s ``max_batch_size``), so a client can be tested against that limit.
        wait_for_models: True (default): :meth:`start` opens the ports only once every model of the registry has
            a version loaded, as ``tensorflow_model_server`` does (``ServerCore::Create`` waits for the configured
            models before ``server.cc`` starts gRPC and HTTP), logging each model still missing one; it blocks
            until then, or until :meth:`stop` is called from another thread. False: open the ports at once; a
            model without a version answers NOT_FOUND until one is loaded.

    Example:

        with LocalServer(ModelRegistry("exports/deepfm"), port=0, grpc_port=0) as server:
            Client(url=server.rest_url, model_name="deepfm").predict(frame)
    """

    def __init__(self, registry, host="127.0.0.1", port=8501, grpc_port=8500,
                 max_body_bytes=DEFAULT_MAX_BODY_BYTES, grpc_workers=16, max_batch_size=None, wait_for_models=True):
        if port is None and grpc_port is None:
            raise ValueError("LocalServer needs a REST port, a gRPC port or both. Received: port=None, "
                             "grpc_port=None")
        self.registry = registry
        self.host = host
        self.port = port
        self.grpc_port = grpc_port
        self.max_body_bytes = int(max_body_bytes)
        self.grpc_workers = grpc_workers
        if max_batch_size is not None and (isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int)
                                           or max_batch_size < 1):
            raise ValueError(f"max_batch_size must be None or an int >= 1. Received: max_batch_size={max_batch_size!r}")
        self.service = _Service(registry, max_batch_size=max_batch_size)
        self.wait_for_models = wait_for_models
        self._cancel = threading.Event()  # stop() while start() waits for the models
        self._http = None
        self._http_thread = None
        self._grpc = None

    def start(self):
        self.registry.start()
        try:
            if self.wait_for_models and not self.registry.wait_until_available(self._cancel) or self._cancel.is_set():
                return self  # stopped before every model had a version: no port was opened
            self._start_transports()
        except BaseException:
            self.stop(grace=0)
            raise
        return self

    def _start_transports(self):
        if self.port is not None:
            self._http = _HTTPServer((self.host, self.port), self.service, self.max_body_bytes)
            self.port = self._http.server_address[1]
            self._http_thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.2},
                                                 name="tfemb-serve-rest", daemon=True)
            self._http_thread.start()
        if self.grpc_port is not None:
            import grpc
            from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

            options = [("grpc.max_receive_message_length", self.max_body_bytes),
                       ("grpc.max_send_message_length", 2 ** 31 - 1),
                       ("grpc.so_reuseport", 0)]
            self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=self.grpc_workers,
                                                                thread_name_prefix="tfemb-serve-grpc"),
                                     options=options)
            prediction, model = _grpc_servicers(self.service)
            prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(prediction, self._grpc)
            model_service_pb2_grpc.add_ModelServiceServicer_to_server(model, self._grpc)
            host = f"[{self.host}]" if ":" in self.host else self.host
            try:
                bound = self._grpc.add_insecure_port(f"{host}:{self.grpc_port}")
            except RuntimeError as exc:  # grpcio raises where older versions returned 0
                raise OSError(f"cannot bind gRPC to {host}:{self.grpc_port}: {exc}") from None
            if not bound:
                raise OSError(f"cannot bind gRPC to {host}:{self.grpc_port}")
            self.grpc_port = bound
            self._grpc.start()

    @property
    def rest_url(self):
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}" if self._http is not None else None

    @property
    def grpc_target(self):
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.grpc_port}" if self._grpc is not None else None

    def stop(self, grace=2.0):
        """Stop accepting requests, let running ones finish (up to ``grace`` seconds), stop polling."""
        self._cancel.set()
        if self._grpc is not None:
            self._grpc.stop(grace).wait()
            self._grpc = None
        if self._http is not None and self._http_thread is None:  # bound, never served
            self._http.server_close()
            self._http = None
        if self._http is not None:
            self._http.shutdown()  # no new connections; then let the requests being answered finish
            self._http.active.wait_idle(grace)
            self._http.server_close()
            self._http_thread.join(timeout=grace + 5)
            self._http = None
        self.registry.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def serve(export_dir, port=8501, grpc_port=8500, host="127.0.0.1", model_name=None, model_config=None,
          poll_seconds=1.0, max_body_bytes=DEFAULT_MAX_BODY_BYTES, max_batch_size=None,
          allow_version_labels_for_unavailable_models=False, out=print):
    """Serve until SIGINT / SIGTERM (``tfemb serve``). Ports: 0 picks a free one, a negative one disables it. As
    ``tensorflow_model_server``, the ports open once every model has a version loaded (see :class:`LocalServer`)."""
    registry = ModelRegistry(export_dir, model_name=model_name, model_config=model_config,
                             poll_seconds=poll_seconds,
                             allow_version_labels_for_unavailable_models=allow_version_labels_for_unavailable_models)
    server = LocalServer(registry, host=host, port=None if port < 0 else port,
                         grpc_port=None if grpc_port < 0 else grpc_port, max_body_bytes=max_body_bytes,
                         max_batch_size=max_batch_size)
    done = threading.Event()
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, lambda *_: (done.set(), server._cancel.set()))
        except ValueError:  # not the main thread: the caller stops us some other way
            pass
    try:
        server.start()  # returns once every model has a version (or on SIGINT / SIGTERM while it waits)
        if not done.is_set():
            for name in registry.model_names:
                out(f"model {name}: base path {registry._models[name].base_path}, "
                    f"serving version(s) {sorted(registry._models[name].served)}")
            if server.rest_url:
                out(f"REST  on {server.rest_url}  (POST /v1/models/<name>:predict)")
            if server.grpc_target:
                out(f"gRPC  on {server.grpc_target}  (tensorflow.serving.PredictionService)")
            out("Ctrl-C to stop")
        while not done.wait(0.5):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        out("stopped")
    return 0
