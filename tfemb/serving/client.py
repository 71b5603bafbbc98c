"""A client for TF Serving's REST and gRPC APIs (and ``tfemb serve``, which speaks the same).

REST needs only the standard library and NumPy. gRPC uses tensorflow-serving-api's stubs, whose messages
embed TensorFlow's ``TensorProto``: TensorFlow is imported the first time a gRPC call is made, never for REST.
"""

import base64
import http.client
import json
import socket
import sys
import threading
import time
import urllib.parse

import numpy as np

# Canonical status name for each HTTP status TF Serving answers with (http_server.cc: ToHTTPStatusCode).
_HTTP_TO_CODE = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    409: "ABORTED", 413: "RESOURCE_EXHAUSTED", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL",
    501: "UNIMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
}

# DataType enum names in GetModelMetadata's TensorInfo → NumPy dtypes (for casting inputs, typing outputs).
_NP_FOR_DT = {
    "DT_FLOAT": np.float32, "DT_DOUBLE": np.float64, "DT_HALF": np.float16, "DT_INT8": np.int8,
    "DT_INT16": np.int16, "DT_INT32": np.int32, "DT_INT64": np.int64, "DT_UINT8": np.uint8,
    "DT_UINT16": np.uint16, "DT_UINT32": np.uint32, "DT_UINT64": np.uint64, "DT_BOOL": np.bool_,
    "DT_STRING": object,
}

#: What a missing value of an int64 [batch] input becomes: int64 min, never a vocabulary value, so the export maps
#: it to the OOV id 0. The same value as ``tfemb.export.saved_model.MISSING_INT`` (not imported: that module loads
#: TensorFlow, and REST must not).
MISSING_INT = np.iinfo(np.int64).min
#: Separator joining the values of a list cell sent to a [batch] string input (``MultiHotFeature.separator``'s
#: default); ``Client(separators=...)`` sets another per input.
DEFAULT_SEPARATOR = "|"


class ServingError(Exception):
    """A request the server refused or could not be reached for.

    Attributes:
        code: canonical status name, as gRPC spells it (``"NOT_FOUND"``, ``"INVALID_ARGUMENT"``,
            ``"UNAVAILABLE"``, ``"DEADLINE_EXCEEDED"``, ...).
        http_status: the HTTP status of a REST answer (``None`` for gRPC and for unreachable servers).
        message: the server's own error message (REST ``{"error": ...}``, gRPC status details).
        transport: ``"rest"`` or ``"grpc"``.
    """

    def __init__(self, message, code="UNKNOWN", http_status=None, transport="rest"):
        self.message = message
        self.code = code
        self.http_status = http_status
        self.transport = transport
        where = f"HTTP {http_status} " if http_status is not None else ""
        super().__init__(f"{where}{code}: {message}")


class _Unavailable(ServingError):
    """Retried: connection refused or reset, HTTP 503, gRPC UNAVAILABLE."""


class Client:
    """Predictions, model status and metadata from TF Serving or ``tfemb serve``.

    Args:
        url: REST base URL, e.g. ``"http://127.0.0.1:8501"``.
        grpc_target: gRPC ``host:port``, e.g. ``"127.0.0.1:8500"``.
        model_name: the model to ask.
        version: a specific version (``/versions/<v>``, ``ModelSpec.version``); default: the latest.
        label: a version label from the server's models.config (``/labels/<l>``, ``ModelSpec.version_label``).
        timeout: seconds per request.
        retries: further attempts when the server is unavailable (connection refused or reset, HTTP 503,
            gRPC UNAVAILABLE), with exponential backoff. Other errors are raised at once.
        backoff: seconds before the first retry; doubled each time.
        separators: the separator of each multi-hot input whose feature does not use ``"|"`` (``{input: sep}``,
            or one string for all): list cells of a [batch] string input are joined with it, as
            ``tfemb.export.raw_inputs`` joins them with the feature's separator.

    A DataFrame, a dict of columns or row dicts is sent the way ``load_export(path).predict(frame)`` calls the
    export (``tfemb.export.raw_inputs``): the client reads the signature from the model's metadata (once per
    signature; cached), keeps only the signature's inputs (a label column or other extra columns are dropped) and
    converts every [batch] input to the signature's dtype: missing values (NaN, None, ``pd.NA``) become ``""``
    for string inputs, ``MISSING_INT`` for int64 inputs (both map to the OOV id) and NaN for float inputs; list
    cells of a string input are joined with the separator; floats holding ints (an int column with a NaN, read
    by pandas as float64) become int64. Other inputs (e.g. [batch, k]) and bare arrays are sent as given.

    Example:

        client = Client(url="http://127.0.0.1:8501", model_name="deepfm")
        client.predict(frame)["probability"]                    # DataFrame with the raw feature columns
        client.predict([{"user": "u1", "age": 31.0}], format="row")
        Client(grpc_target="127.0.0.1:8500", model_name="deepfm").predict({"user": ["u1"], "age": [31.0]})
    """

    def __init__(self, url=None, grpc_target=None, *, model_name, version=None, label=None, timeout=10.0,
                 retries=3, backoff=0.2, separators=None):
        if url is None and grpc_target is None:
            raise ValueError("Client needs url (REST) or grpc_target (gRPC). Received neither.")
        if not model_name:
            raise ValueError(f"model_name must be a non-empty string. Received: model_name={model_name!r}")
        if version is not None and label is not None:
            raise ValueError(f"give version or label, not both. Received: version={version}, label={label!r}")
        if retries < 0 or backoff < 0 or timeout <= 0:
            raise ValueError(f"need retries >= 0, backoff >= 0, timeout > 0. Received: retries={retries}, "
                             f"backoff={backoff}, timeout={timeout}")
        self.url = url.rstrip("/") if url else None
        self.grpc_target = grpc_target
        self.model_name = model_name
        self.version = None if version is None else int(version)
        self.label = label
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        if separators is not None and not isinstance(separators, (str, dict)):
            raise ValueError(f"separators must be a string or a dict {{input: separator}}. "
                             f"Received: {type(separators).__name__}")
        self.separators = separators
        self._local = threading.local()  # one keep-alive HTTP connection per thread
        self._grpc_lock = threading.Lock()
        self._channel = None
        self._stubs = None
        self._signatures = {}
        if self.url:
            parts = urllib.parse.urlsplit(self.url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"url must look like http://host:port. Received: url={url!r}")
            self._http_parts = parts

    # -- public API --------------------------------------------------------------------------------------------

    def predict(self, data, signature_name="serving_default", format="columnar", transport=None,
                output_filter=None, max_rows=None):
        """Run a signature on a batch; returns ``{output name: np.ndarray}`` whatever the transport.

        Args:
            data: a pandas DataFrame (one column per input; other columns, e.g. the label, are dropped), a dict
                ``{input: list | array}``, a list of row dicts, or one array / list for a single-input signature
                (sent as given). Raw values are converted as ``load_export(path).predict`` converts them (see
                the class docstring).
            signature_name: the SignatureDef to run (``"serving_default"`` takes raw feature values,
                ``"encoded"`` takes int64 ids).
            format: REST body form: ``"columnar"`` (``{"inputs": ...}``) or ``"row"`` (``{"instances": ...}``).
            transport: ``"rest"`` or ``"grpc"``; default: REST when a url was given.
            output_filter: gRPC only: the outputs to compute (default all).
            max_rows: None (default: one request) or an int >= 1: the rows are sent in requests of at most
                ``max_rows`` rows, in order, and the outputs concatenated. TF Serving with batching refuses a
                request larger than its ``max_batch_size`` (``serving/batching.config``: 256).
        """
        if format not in ("columnar", "row"):
            raise ValueError(f"format must be 'columnar' or 'row'. Received: format={format!r}")
        if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, (int, np.integer))
                                     or max_rows < 1):
            raise ValueError(f"max_rows must be None or an int >= 1. Received: max_rows={max_rows!r}")
        transport = self._transport(transport)
        raw = _raw_columns(data)
        if raw is None:  # one array / list for a single-input signature: sent as given
            columns = _columns(data)
        else:
            columns = self._convert(raw, signature_name, transport)
        if output_filter and transport != "grpc":
            raise ValueError("output_filter is a gRPC option; the REST API returns every output")

        def call(part):
            if transport == "grpc":
                return self._grpc_predict(part, signature_name, output_filter)
            return self._rest_predict(part, signature_name, format)

        rows = len(next(iter(columns.values()))) if isinstance(columns, dict) and columns else len(columns)
        if max_rows is None or rows <= max_rows:
            return call(columns)
        parts = []
        for start in range(0, rows, int(max_rows)):
            window = slice(start, start + int(max_rows))
            parts.append(call({k: v[window] for k, v in columns.items()} if isinstance(columns, dict)
                              else columns[window]))
        return {name: np.concatenate([np.asarray(part[name]) for part in parts]) for name in parts[0]}

    def status(self, transport=None):
        """``GetModelStatusResponse`` as a dict: ``{"model_version_status": [{"version", "state", "status"}]}``."""
        if self._transport(transport) == "grpc":
            from google.protobuf import json_format
            from tensorflow_serving.apis import get_model_status_pb2

            request = get_model_status_pb2.GetModelStatusRequest()
            self._fill_spec(request.model_spec)
            response = self._grpc_call("GetModelStatus", request)
            return json_format.MessageToDict(response, always_print_fields_with_no_presence=True)
        return self._rest("GET", self._model_path())

    def metadata(self, transport=None):
        """``{"model_spec": ..., "metadata": {"signature_def": {"signature_def": {name: SignatureDef}}}}``."""
        if self._transport(transport) == "grpc":
            from google.protobuf import json_format
            from tensorflow_serving.apis import get_model_metadata_pb2

            request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
            self._fill_spec(request.model_spec)
            response = self._grpc_call("GetModelMetadata", request)
            sigmap = get_model_metadata_pb2.SignatureDefMap()
            response.metadata["signature_def"].Unpack(sigmap)
            opts = {"preserving_proto_field_name": True, "always_print_fields_with_no_presence": True}
            return {"model_spec": json_format.MessageToDict(response.model_spec, **opts),
                    "metadata": {"signature_def": json_format.MessageToDict(sigmap, **opts)}}
        return self._rest("GET", self._model_path() + "/metadata")

    def signature(self, signature_name="serving_default", transport=None):
        """``{"inputs": {name: (dtype, shape)}, "outputs": {...}}`` of one signature, from metadata (cached)."""
        transport = self._transport(transport)
        key = (transport, signature_name)
        if key not in self._signatures:
            sigdefs = self.metadata(transport)["metadata"]["signature_def"]["signature_def"]
            if signature_name not in sigdefs:
                raise ServingError(f"model {self.model_name} has no signature {signature_name!r}; it has "
                                   f"{sorted(sigdefs)}", code="INVALID_ARGUMENT", transport=transport)
            sigdef = sigdefs[signature_name]
            self._signatures[key] = {
                side: {name: (info.get("dtype", "DT_INVALID"), _dims(info)) for name, info in
                       sigdef.get(side, {}).items()} for side in ("inputs", "outputs")}
        return self._signatures[key]

    def _input_spec(self, signature_name, transport):
        """``{input: (dtype, dims)}`` from the cached metadata; None when a REST server will not give it."""
        try:
            return self.signature(signature_name, transport)["inputs"]
        except ServingError as exc:
            # gRPC tensors need the dtypes. Over REST, a server that answers no metadata (or no such
            # signature) still gets the request as given and answers with its own error.
            if transport == "grpc" or exc.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                raise
            return None

    def _separator(self, name):
        if isinstance(self.separators, str):
            return self.separators
        return (self.separators or {}).get(name, DEFAULT_SEPARATOR)

    def _convert(self, raw, signature_name, transport):
        """Raw columns → ``{input: np.ndarray}`` for the signature, as ``tfemb.export.raw_inputs`` builds them."""
        spec = self._input_spec(signature_name, transport)
        if spec is None:
            return {name: _stack(_as_array(values)) for name, values in raw.items()}
        present = [name for name in spec if name in raw]
        if not present:
            raise ValueError(f"signature {signature_name!r} of model {self.model_name} takes inputs {sorted(spec)}; "
                             f"the data has none of them: {sorted(raw)}")
        # An input missing from the data is left out: the server's error names it (as TF Serving's does).
        columns = {}
        for name in present:
            dtype, dims = spec[name]
            if dims == [-1] and dtype in _RAW_DTYPES:
                columns[name] = _raw_column(name, raw[name], dtype, self._separator(name))
            else:
                columns[name] = _stack(_as_array(raw[name]))
        return columns

    def close(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        with self._grpc_lock:
            if self._channel is not None:
                self._channel.close()
                self._channel, self._stubs = None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- REST --------------------------------------------------------------------------------------------------

    def _model_path(self):
        path = "/v1/models/" + urllib.parse.quote(self.model_name, safe="")
        if self.version is not None:
            path += f"/versions/{self.version}"
        elif self.label is not None:
            path += "/labels/" + urllib.parse.quote(self.label, safe="")
        return path

    def _rest_predict(self, columns, signature_name, format):
        body = {"signature_name": signature_name}
        if isinstance(columns, dict):
            if format == "row":
                body["instances"] = _rows(columns)
            else:
                body["inputs"] = {name: _jsonable(arr) for name, arr in columns.items()}
        else:
            body["instances" if format == "row" else "inputs"] = _jsonable(columns)
        answer = self._rest("POST", self._model_path() + ":predict", json.dumps(body).encode())
        if "predictions" in answer:
            preds = answer["predictions"]
            if preds and isinstance(preds[0], dict) and not _is_b64(preds[0]):
                out = {name: [row[name] for row in preds] for name in preds[0]}
            else:
                out = {self._single_output(signature_name, "rest"): preds}
        elif "outputs" in answer:
            outs = answer["outputs"]
            if isinstance(outs, dict) and not _is_b64(outs):
                out = outs
            else:
                out = {self._single_output(signature_name, "rest"): outs}
        else:
            raise ServingError(f"unexpected predict answer: keys {sorted(answer)}", code="INTERNAL")
        types = self._output_types(signature_name)
        return {name: _from_json(values, types.get(name)) for name, values in out.items()}

    def _output_types(self, signature_name):
        """``{output: DT_* name}`` from the (cached) metadata; ``{}`` if the server will not say."""
        try:
            return {name: dtype for name, (dtype, _) in self.signature(signature_name, "rest")["outputs"].items()}
        except ServingError:
            return {}

    def _single_output(self, signature_name, transport):
        # TF Serving omits the name when a signature has one output; the metadata says what it is.
        try:
            return next(iter(self.signature(signature_name, transport)["outputs"]))
        except (ServingError, StopIteration):
            return "output"

    def _rest(self, method, path, body=None):
        return self._with_retries(lambda: self._rest_once(method, path, body), "rest")

    def _connection(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            parts = self._http_parts
            cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
            conn = cls(parts.hostname, parts.port, timeout=self.timeout)
            self._local.conn = conn
            self._local.used = False
        return conn

    def _drop_connection(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        self._local.conn = None

    def _rest_once(self, method, path, body):
        full_path = self._http_parts.path.rstrip("/") + path
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        for attempt in (0, 1):
            conn = self._connection()
            reused = self._local.used
            try:
                conn.request(method, full_path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self._local.used = True
                if resp.will_close:
                    self._drop_connection()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError,
                    ConnectionAbortedError) as exc:
                self._drop_connection()
                if reused and attempt == 0:
                    continue  # the server closed an idle keep-alive connection: resend on a fresh one
                raise _Unavailable(f"connection to {self.url} lost: {exc}", code="UNAVAILABLE") from None
            except ConnectionRefusedError as exc:
                self._drop_connection()
                raise _Unavailable(f"cannot connect to {self.url}: {exc}", code="UNAVAILABLE") from None
            except (socket.timeout, TimeoutError):
                self._drop_connection()
                raise ServingError(f"no answer from {self.url} within {self.timeout:g} s",
                                   code="DEADLINE_EXCEEDED") from None
            except (OSError, http.client.HTTPException) as exc:
                self._drop_connection()
                raise ServingError(f"request to {self.url} failed: {exc}", code="UNKNOWN") from None
        try:
            answer = json.loads(data) if data else {}
        except ValueError:
            answer = None
        if resp.status == 200 and isinstance(answer, dict):
            return answer
        if isinstance(answer, dict) and "error" in answer:
            message = str(answer["error"])
        else:
            message = data.decode("utf-8", "replace").strip() or resp.reason
        code = _HTTP_TO_CODE.get(resp.status, "UNKNOWN" if resp.status != 200 else "INTERNAL")
        cls = _Unavailable if resp.status == 503 else ServingError
        raise cls(message, code=code, http_status=resp.status, transport="rest")

    # -- gRPC --------------------------------------------------------------------------------------------------

    def _grpc_predict(self, columns, signature_name, output_filter):
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        spec = self.signature(signature_name, "grpc")
        if not isinstance(columns, dict):
            if len(spec["inputs"]) != 1:
                raise ValueError(f"signature {signature_name!r} has inputs {sorted(spec['inputs'])}: pass a dict, "
                                 "a DataFrame or row dicts, not a bare array")
            columns = {next(iter(spec["inputs"])): np.asarray(columns)}
        request = predict_pb2.PredictRequest()
        self._fill_spec(request.model_spec)
        request.model_spec.signature_name = signature_name
        for name, arr in columns.items():
            dtype = spec["inputs"].get(name, (None,))[0]
            arr = _cast(name, np.asarray(arr) if not isinstance(arr, np.ndarray) else arr, dtype)
            tf_dtype = tf.string if arr.dtype == object or arr.dtype.kind in "SU" else None
            request.inputs[name].CopyFrom(tf.make_tensor_proto(arr, dtype=tf_dtype))
        request.output_filter.extend(output_filter or [])
        response = self._grpc_call("Predict", request)
        out = {}
        for name, proto in response.outputs.items():
            arr = tf.make_ndarray(proto)
            out[name] = arr
        return out

    def _fill_spec(self, spec):
        spec.name = self.model_name
        if self.version is not None:
            spec.version.value = self.version
        elif self.label is not None:
            spec.version_label = self.label

    def _grpc_stub(self, method):
        with self._grpc_lock:
            if self._stubs is None:
                import grpc
                from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

                if not self.grpc_target:
                    raise ValueError("this Client has no grpc_target")
                # Reconnect quickly: gRPC's default backoff (1 s, growing) would outlast our own retries.
                options = [("grpc.max_receive_message_length", 2 ** 31 - 1),
                           ("grpc.max_send_message_length", 2 ** 31 - 1),
                           ("grpc.initial_reconnect_backoff_ms", 100),
                           ("grpc.min_reconnect_backoff_ms", 100),
                           ("grpc.max_reconnect_backoff_ms", 1000)]
                self._channel = grpc.insecure_channel(self.grpc_target, options=options)
                self._stubs = (prediction_service_pb2_grpc.PredictionServiceStub(self._channel),
                               model_service_pb2_grpc.ModelServiceStub(self._channel))
            prediction, model = self._stubs
        return getattr(model if method == "GetModelStatus" else prediction, method)

    def _grpc_call(self, method, request):
        import grpc

        def once():
            try:
                return self._grpc_stub(method)(request, timeout=self.timeout)
            except grpc.RpcError as exc:
                code = exc.code().name if exc.code() is not None else "UNKNOWN"
                cls = _Unavailable if code == "UNAVAILABLE" else ServingError
                raise cls(exc.details() or str(exc), code=code, transport="grpc") from None

        return self._with_retries(once, "grpc")

    # -- shared ------------------------------------------------------------------------------------------------

    def _transport(self, transport):
        transport = transport or ("rest" if self.url else "grpc")
        if transport not in ("rest", "grpc"):
            raise ValueError(f"transport must be 'rest' or 'grpc'. Received: transport={transport!r}")
        if transport == "rest" and not self.url:
            raise ValueError("transport='rest' needs url=...")
        if transport == "grpc" and not self.grpc_target:
            raise ValueError("transport='grpc' needs grpc_target=...")
        return transport

    def _with_retries(self, fn, transport):
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except _Unavailable as exc:
                if attempt == self.retries:
                    raise ServingError(exc.message, code=exc.code, http_status=exc.http_status,
                                       transport=transport) from None
                time.sleep(self.backoff * (2 ** attempt))


# ------------------------------------------------------------------------------------------------------------------
# Data conversion
# ------------------------------------------------------------------------------------------------------------------


def _raw_columns(data):
    """DataFrame / dict / row dicts → ``{name: column}`` (an array or a list of raw cells); None for anything else.

    A Series becomes its array; other values are kept as given (``_raw_column`` takes a scalar as one row).
    """
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(data, pd.DataFrame):
        return {str(col): data[col].to_numpy() for col in data.columns}
    if isinstance(data, dict):
        if not data:
            raise ValueError("data is an empty dict: give one entry per model input")
        out = {}
        for key, values in data.items():
            if pd is not None and isinstance(values, (pd.Series, pd.Index)):
                values = values.to_numpy()
            out[str(key)] = values
        return out
    if isinstance(data, (list, tuple)) and data and all(isinstance(r, dict) for r in data):
        names = list(data[0])
        for i, row in enumerate(data):
            if set(row) != set(names):
                raise ValueError(f"row {i} has keys {sorted(row)}; row 0 has {sorted(names)}")
        return {str(name): [row[name] for row in data] for name in names}
    return None


def _as_array(values):
    if isinstance(values, np.ndarray):
        return values
    return _object_or_array(list(values) if isinstance(values, tuple) else values)


def _columns(data):
    """One array / list (a single-input signature) → ``np.ndarray``; other data goes through ``_raw_columns``."""
    if isinstance(data, (list, tuple, np.ndarray)):
        return np.asarray(data) if not isinstance(data, np.ndarray) else data
    raise TypeError(f"data must be a DataFrame, a dict of columns, a list of row dicts or an array. "
                    f"Received: {type(data).__name__}")


# Raw values → the [batch] inputs of a raw signature, by the rules of ``tfemb.export.raw_inputs`` (which loads
# TensorFlow with ``tfemb.export``, so they are restated here; tests/test_client_inputs.py checks that both
# agree): the signature's dtype stands for the feature kind (string: categorical as text or multi-hot;
# int64: categorical with int keys; float: numeric).
_RAW_DTYPES = ("DT_STRING", "DT_INT64", "DT_FLOAT", "DT_DOUBLE")


def _is_missing(value):
    if value is None:
        return True
    if isinstance(value, (float, np.floating)):
        return value != value  # NaN
    return type(value).__name__ in ("NAType", "NaTType")  # pd.NA, pd.NaT


def _key(value):
    """``tfemb.data.schema._as_key``: ints stay ints, floats that are ints become ints, missing → None, else str."""
    if isinstance(value, (bool, np.bool_)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if value != value:
            return None
        return int(value) if float(value).is_integer() else str(value)
    if _is_missing(value):
        return None
    text = str(value)
    return text if text != "" else None


def _text(value):
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    key = _key(value)
    return "" if key is None else str(key)


def _raw_column(name, values, dtype, separator):
    """One [batch] input from raw cells, cast to the signature's dtype (see ``_RAW_DTYPES``)."""
    if not isinstance(values, (list, tuple, np.ndarray)):
        values = [values]  # one row
    arr = values if isinstance(values, np.ndarray) else None
    if arr is not None and arr.ndim == 2 and dtype == "DT_STRING":
        arr, cells, kind = None, list(arr), "O"  # one list cell per row (multi-hot)
    elif arr is not None and arr.ndim != 1:
        return _stack(arr)  # an already shaped input: sent as given
    else:
        cells = arr.tolist() if arr is not None else list(values)
        kind = arr.dtype.kind if arr is not None else "O"
    if dtype == "DT_STRING":
        if kind in "US":
            return arr.astype(object)  # bytes stay bytes ({"b64": ...} in JSON), the same tensor value
        out = np.empty(len(cells), dtype=object)
        for i, cell in enumerate(cells):
            if isinstance(cell, bytes):
                out[i] = cell
            elif isinstance(cell, (list, tuple, np.ndarray)):  # multi-hot list cell
                out[i] = separator.join(t for t in (_text(v) for v in cell) if t)
            elif isinstance(cell, str):
                out[i] = cell
            else:
                out[i] = _text(cell)
        return out
    if dtype == "DT_INT64":
        if kind in "iu":
            return arr.astype(np.int64, copy=False)
        if kind == "b":
            return arr  # not a raw categorical (bool vocabularies take text): cast as given
        if kind == "f":
            whole = np.isfinite(arr) & (arr == np.round(arr)) & (np.abs(arr) < 2.0 ** 63)
            wrong = ~whole & ~np.isnan(arr)
            if wrong.any():
                _wrong_int(name, int(np.flatnonzero(wrong)[0]), arr[wrong][0].item())
            ints = np.full(arr.shape, MISSING_INT, dtype=np.int64)
            ints[whole] = arr[whole].astype(np.int64)
            return ints
        keys = [_key(c.decode("utf-8") if isinstance(c, bytes) else c) for c in cells]
        for row, (key, cell) in enumerate(zip(keys, cells)):
            if key is not None and not isinstance(key, int):
                _wrong_int(name, row, cell)
        return np.asarray([MISSING_INT if k is None else k for k in keys], dtype=np.int64)
    target = _NP_FOR_DT[dtype]  # float: numbers as they are, missing / blank → NaN
    if kind in "fiub":
        return arr.astype(target, copy=False)
    numbers = [_number(c) for c in cells]
    if any(n is None for n in numbers):  # text that is no number: the server (REST) or _cast (gRPC) refuses it
        return _object_or_array([c if n is None else n for c, n in zip(cells, numbers)])
    return np.asarray(numbers, dtype=target)


def _wrong_int(name, row, value):
    """A value for an int-keyed categorical input that is neither an integer nor missing: as
    ``Schema.transform``, an error (it would map to the OOV id silently, e.g. a CSV column read as text)."""
    raise ValueError(f"input {name!r}: value {value!r} ({type(value).__name__}) in row {row} is not an integer, "
                     "and the model's vocabulary of this feature holds ints; convert the column (e.g. "
                     "df[column].astype('Int64')), or send None / NaN for a missing value")


def _number(value):
    """A float, NaN for a missing or blank value, None for a value that is no number."""
    if _is_missing(value):
        return float("nan")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str) and value.strip() == "":
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _object_or_array(values):
    try:
        return np.asarray(values)
    except ValueError:  # ragged
        arr = np.empty(len(values), dtype=object)
        arr[:] = values
        return arr


def _stack(arr):
    # A DataFrame column of lists / arrays (multi-hot features) → one [batch, k] array.
    if arr.dtype == object and arr.size and isinstance(arr.flat[0], (list, tuple, np.ndarray)):
        try:
            return np.stack([np.asarray(v) for v in arr])
        except ValueError:
            raise ValueError("a column of lists must have lists of one length (the model's [batch, k] input)") \
                from None
    return arr


def _rows(columns):
    lengths = {name: len(arr) for name, arr in columns.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"the row format needs every input to have the same number of rows. Received: {lengths}; "
                         "use format='columnar'")
    values = {name: _jsonable(arr) for name, arr in columns.items()}
    n = next(iter(lengths.values()))
    return [{name: values[name][i] for name in values} for i in range(n)]


def _jsonable(arr):
    """Array → nested lists of JSON values; bytes become ``{"b64": ...}`` (TF Serving's binary encoding)."""
    arr = np.asarray(arr) if not isinstance(arr, np.ndarray) else arr
    if arr.dtype.kind in "fiub" or arr.dtype.kind == "U":
        return arr.tolist()
    if arr.dtype.kind == "S":
        return _jsonable(arr.astype(object))
    return _json_leaf(arr.tolist())


def _json_leaf(value):
    if isinstance(value, list):
        return [_json_leaf(v) for v in value]
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return _jsonable(value)
    if _is_missing(value) and not isinstance(value, float):
        return None  # pd.NA / pd.NaT are no JSON values; NaN is (TF Serving reads it)
    return value


def _is_b64(value):
    return isinstance(value, dict) and len(value) == 1 and "b64" in value


def _from_json(values, dtype=None):
    def leaf(v):
        if isinstance(v, list):
            return [leaf(x) for x in v]
        if _is_b64(v):
            return base64.b64decode(v["b64"])
        return v

    arr = _object_or_array(leaf(values))
    target = _NP_FOR_DT.get(dtype)
    if target is not None and target is not object and arr.dtype != object:
        return arr.astype(target)
    return arr


def _cast(name, arr, dtype):
    """Cast an input to the signature's dtype (gRPC tensors are typed; JSON is typed by the server)."""
    arr = _stack(arr)
    target = _NP_FOR_DT.get(dtype)
    if target is None:
        return arr
    if target is object:
        if arr.dtype.kind in "fiub":
            raise ValueError(f"input {name!r} must hold strings (the model expects {dtype}); received "
                             f"{arr.dtype} values")
        return arr.astype(object) if arr.dtype.kind == "U" else arr
    if arr.dtype == object or arr.dtype.kind in "SU":
        raise ValueError(f"input {name!r} must be numeric (the model expects {dtype}); received strings")
    if np.issubdtype(target, np.integer) and arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"input {name!r} holds non-integer values; the model expects {dtype}")
    return arr.astype(target, copy=False)


def _dims(info):
    shape = info.get("tensor_shape", {})
    if shape.get("unknown_rank"):
        return None
    return [int(d.get("size", -1)) for d in shape.get("dim", [])]
