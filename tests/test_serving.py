"""tfemb.serving over real sockets on 127.0.0.1: Client ↔ local server, REST and gRPC, TF Serving's API.

The SavedModels are small ``tf.Module`` exports with the signatures tfemb's exporter writes:
``serving_default`` (raw values: a string, a float and a [batch, 2] int64 input; outputs ``probability`` and
``score``) and ``encoded`` (int64 ids → ``score``). Version 2 doubles the table weights, so every answer
tells which version computed it.
"""

import base64
import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tfemb.serving import Client, ServingError
from tfemb.serving.server import DEFAULT_MAX_BODY_BYTES, LocalServer, ModelRegistry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BATCH = {"user": ["a", "b", "zz", "c"], "age": [1.0, 2.5, -3.0, 0.0], "tags": [[1, 2], [3, 4], [0, 0], [5, 6]]}
ROWS = [{name: BATCH[name][i] for name in BATCH} for i in range(4)]
MAX_BODY = 1 << 20  # the module's server refuses bodies over 1 MiB (the default is 16 MiB)
# Load test size; CI runs the full 8 x 500.
THREADS, REQUESTS = 8, int(os.environ.get("TFEMB_SERVING_LOAD_REQUESTS", "500"))

CONFIG = """
model_config_list {
  config {
    name: "toy"
    base_path: "toy"
    model_platform: "tensorflow"
    model_version_policy { specific { versions: 1 versions: 2 } }
    version_labels { key: "stable" value: 1 }
    version_labels { key: "canary" value: 2 }
  }
  config { name: "toy_latest" base_path: "toy" model_platform: "tensorflow" }
}
"""


class _Toy(tf.Module):
    def __init__(self, scale):
        super().__init__()
        init = tf.lookup.KeyValueTensorInitializer(tf.constant(["a", "b", "c"]), tf.constant([1, 2, 3], tf.int64))
        self.table = tf.lookup.StaticHashTable(init, default_value=0)  # unknown → 0 (OOV)
        self.w = tf.Variable(np.array([0.0, 0.5, -0.25, 1.0], np.float32) * scale)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.float32),
                                  tf.TensorSpec([None, 2], tf.int64)])
    def serve(self, user, age, tags):
        logit = (tf.gather(self.w, self.table.lookup(user)) + 0.1 * age
                 + 0.01 * tf.cast(tf.reduce_sum(tags, axis=1), tf.float32))
        return {"probability": tf.sigmoid(logit), "score": logit}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
    def encoded(self, ids):
        return {"score": tf.gather(self.w, ids)}


def save_toy(base, version, scale):
    """Write ``base/<version>`` the way tfemb's exporter does: into a hidden temp dir, then one rename."""
    os.makedirs(base, exist_ok=True)
    tmp = os.path.join(base, f".tmp-{version}")
    module = _Toy(scale)
    tf.saved_model.save(module, tmp, signatures={"serving_default": module.serve, "encoded": module.encoded})
    os.rename(tmp, os.path.join(base, str(version)))
    return os.path.join(base, str(version))


_REFERENCE = {}


def reference(path, signature="serving_default", inputs=None):
    """Outputs of the SavedModel called directly (no server)."""
    if path not in _REFERENCE:
        _REFERENCE[path] = tf.saved_model.load(path)
    fn = _REFERENCE[path].signatures[signature]
    inputs = BATCH if inputs is None else inputs
    specs = fn.structured_input_signature[1]
    return {k: v.numpy() for k, v in fn(**{n: tf.constant(inputs[n], specs[n].dtype) for n in specs}).items()}


def assert_outputs_equal(got, want):
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def http_call(server, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, resp.getheader("Content-Type"), json.loads(data) if data else None
    finally:
        conn.close()


def post(server, path, doc):
    return http_call(server, "POST", path, json.dumps(doc).encode())


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    save_toy(str(root / "toy"), 1, 1.0)
    save_toy(str(root / "toy"), 2, 2.0)
    (root / "models.config").write_text(CONFIG)
    return root


@pytest.fixture(scope="module")
def server(exports):
    registry = ModelRegistry(str(exports), model_config=str(exports / "models.config"), poll_seconds=0,
                             allow_version_labels_for_unavailable_models=True)
    srv = LocalServer(registry, port=0, grpc_port=0, max_body_bytes=MAX_BODY).start()
    yield srv
    srv.stop()


def ref(exports, version, signature="serving_default", inputs=None):
    return reference(str(exports / "toy" / str(version)), signature, inputs)


def assert_healthy(server, exports):
    status, _, body = http_call(server, "GET", "/v1/models/toy_latest")
    assert status == 200 and body["model_version_status"][0]["state"] == "AVAILABLE"
    assert_outputs_equal(Client(url=server.rest_url, model_name="toy_latest").predict(BATCH), ref(exports, 2))


# ---------------------------------------------------------------------------------------------------------------
# REST and gRPC predict, status, metadata
# ---------------------------------------------------------------------------------------------------------------


def test_binds_loopback_by_default_and_reports_a_busy_port(server, exports):
    assert server.host == "127.0.0.1" and server._http.server_address[0] == "127.0.0.1"
    assert server.grpc_target.startswith("127.0.0.1:")
    assert DEFAULT_MAX_BODY_BYTES == 16 * 1024 * 1024
    busy_grpc = int(server.grpc_target.split(":")[1])
    for ports in ({"port": server.port, "grpc_port": 0}, {"port": 0, "grpc_port": busy_grpc}):
        with pytest.raises(OSError):
            LocalServer(ModelRegistry(str(exports / "toy"), poll_seconds=0), **ports).start()
    assert_healthy(server, exports)


@pytest.mark.parametrize("fmt", ["columnar", "row"])
def test_rest_predict_equals_the_savedmodel(server, exports, fmt):
    client = Client(url=server.rest_url, model_name="toy_latest")
    want = ref(exports, 2)
    assert_outputs_equal(client.predict(BATCH, format=fmt), want)
    assert_outputs_equal(client.predict(pd.DataFrame(BATCH), format=fmt), want)  # list column → [batch, 2]
    assert_outputs_equal(client.predict(ROWS, format=fmt), want)
    encoded = client.predict(np.array([0, 1, 2, 3]), signature_name="encoded", format=fmt)
    assert_outputs_equal(encoded, ref(exports, 2, "encoded", {"ids": [0, 1, 2, 3]}))


def test_rest_json_has_tf_servings_shapes(server, exports):
    want = ref(exports, 2)
    status, ctype, body = post(server, "/v1/models/toy_latest:predict", {"instances": ROWS})
    assert (status, ctype) == (200, "application/json")
    assert list(body) == ["predictions"] and len(body["predictions"]) == 4
    for i, row in enumerate(body["predictions"]):  # several outputs: one object per instance
        assert set(row) == {"probability", "score"}
        assert np.float32(row["score"]) == want["score"][i]
    status, _, body = post(server, "/v1/models/toy_latest:predict", {"inputs": BATCH})
    assert list(body) == ["outputs"] and set(body["outputs"]) == {"probability", "score"}
    np.testing.assert_array_equal(np.float32(body["outputs"]["probability"]), want["probability"])
    # float32 values are written in their shortest form (0.63, not 0.6299999952316284).
    assert all(len(repr(v)) <= 11 for v in body["outputs"]["score"])
    # One output, one input: names are omitted on both sides.
    ids_ref = ref(exports, 2, "encoded", {"ids": [1, 2]})["score"]
    status, _, body = post(server, "/v1/models/toy_latest:predict", {"signature_name": "encoded", "instances": [1, 2]})
    assert status == 200 and np.array_equal(np.float32(body["predictions"]), ids_ref)
    status, _, body = post(server, "/v1/models/toy_latest:predict", {"signature_name": "encoded", "inputs": [1, 2]})
    assert status == 200 and np.array_equal(np.float32(body["outputs"]), ids_ref)
    # Binary strings as {"b64": ...}.
    b64 = dict(BATCH, user=[{"b64": base64.b64encode(u.encode()).decode()} for u in BATCH["user"]])
    status, _, body = post(server, "/v1/models/toy_latest:predict", {"inputs": b64})
    assert status == 200 and np.array_equal(np.float32(body["outputs"]["score"]), want["score"])


def test_grpc_predict_metadata_and_status(server, exports):
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
    import grpc

    client = Client(grpc_target=server.grpc_target, model_name="toy_latest")
    assert_outputs_equal(client.predict(BATCH), ref(exports, 2))
    assert_outputs_equal(client.predict(pd.DataFrame(BATCH)), ref(exports, 2))
    assert_outputs_equal(client.predict([0, 3], signature_name="encoded"), ref(exports, 2, "encoded", {"ids": [0, 3]}))
    assert set(client.predict(BATCH, output_filter=["score"])) == {"score"}

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "toy_latest"
    for name, spec in (("user", tf.string), ("age", tf.float32), ("tags", tf.int64)):
        request.inputs[name].CopyFrom(tf.make_tensor_proto(BATCH[name], dtype=spec))
    with grpc.insecure_channel(server.grpc_target) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=10)
    assert response.model_spec.version.value == 2 and response.model_spec.signature_name == "serving_default"
    np.testing.assert_array_equal(tf.make_ndarray(response.outputs["score"]), ref(exports, 2)["score"])

    meta = client.metadata()
    assert meta["model_spec"] == {"name": "toy_latest", "version": "2", "signature_name": ""}
    sigdefs = meta["metadata"]["signature_def"]["signature_def"]
    assert {"serving_default", "encoded"} <= set(sigdefs)
    inputs = sigdefs["serving_default"]["inputs"]
    assert {n: inputs[n]["dtype"] for n in inputs} == {"user": "DT_STRING", "age": "DT_FLOAT", "tags": "DT_INT64"}
    assert client.status() == {"model_version_status": [
        {"version": "2", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}


def test_rest_status_and_metadata(server):
    status, ctype, body = http_call(server, "GET", "/v1/models/toy")
    assert (status, ctype) == (200, "application/json")
    assert body == {"model_version_status": [
        {"version": v, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}} for v in ("2", "1")]}
    assert http_call(server, "GET", "/v1/models/toy/versions/1")[2]["model_version_status"][0]["version"] == "1"
    assert http_call(server, "GET", "/v1/models/toy/labels/canary")[2]["model_version_status"][0]["version"] == "2"
    status, _, body = http_call(server, "GET", "/v1/models/toy/labels/stable/metadata")
    assert status == 200 and body["model_spec"] == {"name": "toy", "version": "1", "signature_name": ""}
    outputs = body["metadata"]["signature_def"]["signature_def"]["serving_default"]["outputs"]
    assert set(outputs) == {"probability", "score"} and outputs["score"]["dtype"] == "DT_FLOAT"
    assert Client(url=server.rest_url, model_name="toy", label="canary").metadata()["model_spec"]["version"] == "2"


def test_versions_and_labels_pick_the_model(server, exports):
    for kwargs, version in (({}, 2), ({"version": 1}, 1), ({"version": 2}, 2), ({"label": "stable"}, 1),
                            ({"label": "canary"}, 2)):
        rest = Client(url=server.rest_url, model_name="toy", **kwargs)
        grpc_client = Client(grpc_target=server.grpc_target, model_name="toy", **kwargs)
        assert_outputs_equal(rest.predict(BATCH), ref(exports, version))
        assert_outputs_equal(rest.predict(ROWS, format="row"), ref(exports, version))
        assert_outputs_equal(grpc_client.predict(BATCH), ref(exports, version))
    want = ref(exports, 1)["score"]
    for path in ("/v1/models/toy/versions/1:predict", "/v1/models/toy/labels/stable:predict"):
        status, _, body = post(server, path, {"inputs": BATCH})
        assert status == 200 and np.array_equal(np.float32(body["outputs"]["score"]), want)


# ---------------------------------------------------------------------------------------------------------------
# Errors: TF Serving's status codes and {"error": ...} bodies; the server stays healthy
# ---------------------------------------------------------------------------------------------------------------

P = "/v1/models/toy_latest:predict"
BAD = [
    ("malformed JSON", "POST", P, b'{"inputs": [1,', 400, "JSON Parse error"),
    ("empty body", "POST", P, b"", 400, "JSON Parse error: The document is empty"),
    ("not an object", "POST", P, b"[1, 2]", 400, "Is not object"),
    ("wrong input name (columnar)", "POST", P, {"inputs": {"usr": ["a"], "age": [1.0], "tags": [[1, 2]]}}, 400,
     "Missing named input: user in 'inputs' object."),
    ("wrong input name (row)", "POST", P, {"instances": [{"usr": "a", "age": 1.0, "tags": [1, 2]}]}, 400,
     "does not have named input: usr"),
    ("missing input (row)", "POST", P, {"instances": [{"age": 1.0, "tags": [1, 2]}]}, 400,
     "keys must be equal to: age,tags,user"),
    ("string for float", "POST", P, {"inputs": {"user": ["a"], "age": ["old"], "tags": [[1, 2]]}}, 400,
     'input: age of \'inputs\' object. Error: JSON Value: "old" Type: String is not of expected type: float'),
    ("float for int64", "POST", P, {"inputs": {"user": ["a"], "age": [1.0], "tags": [[1.5, 2]]}}, 400,
     "JSON Value: 1.5 Type: Number is not of expected type: int64"),
    ("number for string", "POST", P, {"instances": [{"user": 7, "age": 1.0, "tags": [1, 2]}]}, 400,
     "key: user of 'instances' list. Error: INVALID_ARGUMENT: JSON Value: 7 Type: Number is not of expected type: "
     "string"),
    ("wrong rank", "POST", P, {"inputs": {"user": ["a"], "age": [1.0], "tags": [1, 2]}}, 400,
     "input 'tags' of signature 'serving_default' expects shape [?,2] (dtype int64); got shape [2]"),
    ("ragged list", "POST", P, {"inputs": {"user": ["a", "b"], "age": [1.0, 2.0], "tags": [[1, 2], [3]]}}, 400,
     "Encountered list at unexpected size: 1 at level: 1 expected size: 2"),
    ("both keys", "POST", P, {"inputs": BATCH, "instances": ROWS}, 400,
     "Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist"),
    ("no inputs", "POST", P, {"signature_name": "serving_default"}, 400, "Missing 'inputs' or 'instances' key"),
    ("empty instances", "POST", P, {"instances": []}, 400, "No values in 'instances' array"),
    ("lone surrogate in a string", "POST", P, b'{"inputs": {"user": ["\\ud800"], "age": [1.0], "tags": [[1, 2]]}}',
     400, 'JSON Value: "\\ud800" is not a valid UTF-8 string'),
    ("unknown signature", "POST", P, {"signature_name": "nope", "inputs": BATCH}, 400,
     'Serving signature name: "nope" not found in signature def'),
    ("signature_name not a string", "POST", P, {"signature_name": 3, "inputs": BATCH}, 400,
     "'signature_name' key must be a string value."),
    ("missing model", "POST", "/v1/models/nope:predict", {"inputs": BATCH}, 404,
     "Servable not found for request: Latest(nope)"),
    ("missing version", "POST", "/v1/models/toy/versions/7:predict", {"inputs": BATCH}, 404,
     "Servable not found for request: Specific(toy, 7)"),
    ("unknown label", "POST", "/v1/models/toy/labels/beta:predict", {"inputs": BATCH}, 400,
     "Unrecognized servable version label: beta"),
    ("status of a missing model", "GET", "/v1/models/nope", None, 404, "Could not find any versions of model nope"),
    ("status of a missing version", "GET", "/v1/models/toy/versions/7", None, 404,
     "Could not find version 7 of model toy"),
    ("metadata of a missing version", "GET", "/v1/models/toy/versions/7/metadata", None, 404,
     "Servable not found for request: Specific(toy, 7)"),
    ("GET on predict", "GET", P, None, 400, "Malformed request: GET /v1/models/toy_latest:predict"),
    ("no model name", "GET", "/v1/models", None, 400, "Missing model name in request."),
    ("classify", "POST", "/v1/models/toy_latest:classify", {"examples": []}, 501, "classify is not served"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_requests_get_tf_serving_errors_and_the_server_stays_healthy(server, exports, case):
    _, method, path, body, want_status, want_message = case
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    status, ctype, answer = http_call(server, method, path, raw)
    assert status == want_status
    assert ctype == "application/json" and list(answer) == ["error"]
    assert want_message in answer["error"]
    assert_healthy(server, exports)


def test_oversized_bodies_are_refused_with_413(server, exports):
    body = json.dumps({"inputs": {"user": ["a" * 1000] * 1600, "age": [1.0], "tags": [[1, 2]]}}).encode()
    assert len(body) > MAX_BODY
    status, _, answer = http_call(server, "POST", P, body)
    assert status == 413 and f"exceeds the limit of {MAX_BODY} bytes" in answer["error"]
    with pytest.raises(ServingError) as info:
        Client(url=server.rest_url, model_name="toy_latest").predict({"user": ["a" * 1000] * 1600})
    assert (info.value.code, info.value.http_status) == ("RESOURCE_EXHAUSTED", 413)
    # "Expect: 100-continue" (curl's habit for big bodies): refused before the body is sent.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"POST {P} HTTP/1.1\r\nHost: x\r\nContent-Length: {2 * MAX_BODY}\r\n"
                     "Expect: 100-continue\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")
    # A negative Content-Length would read to EOF (past the limit, or forever on a kept-alive socket): 400 at once.
    for length in ("-1", "abc"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(f"POST {P} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n{{}}".encode())
            answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 400") and f"Malformed Content-Length: {length}".encode() in answer
    assert_healthy(server, exports)


def test_max_batch_size_refuses_larger_requests_as_tf_serving_with_batching(exports):
    """``max_batch_size`` (``tfemb serve --max-batch-size``): TF Serving with batching on refuses a request of more
    rows than ``batching.config``'s ``max_batch_size``; the local server can be told to do the same."""
    with pytest.raises(ValueError, match=r"max_batch_size must be None or an int >= 1. Received: max_batch_size=0"):
        LocalServer(ModelRegistry(str(exports / "toy"), poll_seconds=0), port=0, grpc_port=None, max_batch_size=0)
    registry = ModelRegistry(str(exports), model_config=str(exports / "models.config"), poll_seconds=0,
                             allow_version_labels_for_unavailable_models=True)
    with LocalServer(registry, port=0, grpc_port=0, max_batch_size=3) as srv:
        small = {name: values[:3] for name, values in BATCH.items()}
        for client in (Client(url=srv.rest_url, model_name="toy_latest"),
                       Client(grpc_target=srv.grpc_target, model_name="toy_latest")):
            assert_outputs_equal(client.predict(small), ref(exports, 2, inputs=small))  # 3 rows: served
            with pytest.raises(ServingError, match=r"Task size 4 is larger than maximum input batch size 3") as info:
                client.predict(BATCH)
            assert info.value.code == "INVALID_ARGUMENT"
            # The client splits what it sends: requests of at most max_rows rows, outputs concatenated in order.
            for max_rows in (1, 3):
                assert_outputs_equal(client.predict(BATCH, max_rows=max_rows), ref(exports, 2))
            assert_outputs_equal(client.predict(pd.DataFrame(BATCH), max_rows=2), ref(exports, 2))
            with pytest.raises(ValueError, match=r"max_rows must be None or an int >= 1. Received: max_rows=0"):
                client.predict(BATCH, max_rows=0)
        rest = Client(url=srv.rest_url, model_name="toy_latest")
        assert_outputs_equal(rest.predict(BATCH, format="row", max_rows=3), ref(exports, 2))
        assert_outputs_equal(rest.predict([0, 3, 1, 2], signature_name="encoded", max_rows=3),
                             ref(exports, 2, "encoded", {"ids": [0, 3, 1, 2]}))
        status, _, answer = post(srv, P, {"instances": ROWS})
        assert status == 400 and answer == {"error": "Task size 4 is larger than maximum input batch size 3"}
        status, _, _ = post(srv, P, {"instances": ROWS[:3]})
        assert status == 200


def test_grpc_errors_carry_tf_servings_codes(server, exports):
    import grpc
    from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

    def predict(model="toy_latest", version=None, signature="", **inputs):
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.model_spec.signature_name = signature
        if version is not None:
            request.model_spec.version.value = version
        for name, (value, dtype) in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value, dtype=dtype))
        return stub.Predict(request, timeout=10)

    user, age, tags = (BATCH["user"], tf.string), (BATCH["age"], tf.float32), (BATCH["tags"], tf.int64)
    cases = [
        (dict(model="nope", user=user, age=age, tags=tags), "NOT_FOUND",
         "Servable not found for request: Latest(nope)"),
        (dict(model="toy", version=7, user=user, age=age, tags=tags), "NOT_FOUND",
         "Servable not found for request: Specific(toy, 7)"),
        (dict(usr=user, age=age, tags=tags), "INVALID_ARGUMENT",
         "input tensor alias not found in signature: usr. Inputs expected to be in the set {age,tags,user}."),
        (dict(age=age, tags=tags), "INVALID_ARGUMENT",
         "input size does not match signature: 2!=3 len({age,tags}) != len({age,tags,user}). Sent extra: {}. "
         "Missing but required: {user}."),
        (dict(user=user, age=(["x"] * 4, tf.string), tags=tags), "INVALID_ARGUMENT",
         "input 'age' of signature 'serving_default' expects dtype float but got string"),
        (dict(user=user, age=age, tags=([1, 2, 3, 4], tf.int64)), "INVALID_ARGUMENT",
         "input 'tags' of signature 'serving_default' expects shape [?,2] (dtype int64); got shape [4]"),
        (dict(signature="nope", user=user, age=age, tags=tags), "FAILED_PRECONDITION",
         'Serving signature key "nope" not found.'),
    ]
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for kwargs, code, message in cases:
            with pytest.raises(grpc.RpcError) as info:
                predict(**kwargs)
            assert info.value.code().name == code and message in info.value.details()
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        request.model_spec.name = "toy"
        with pytest.raises(grpc.RpcError) as info:
            stub.GetModelMetadata(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "must specify at least one metadata_field" in info.value.details()
    with pytest.raises(ServingError) as info:
        Client(grpc_target=server.grpc_target, model_name="nope").status()
    assert info.value.code == "NOT_FOUND" and "Could not find any versions of model nope" in info.value.message
    assert_healthy(server, exports)


def test_client_errors_carry_the_servers_message(server):
    client = Client(url=server.rest_url, grpc_target=server.grpc_target, model_name="toy_latest")
    with pytest.raises(ServingError) as info:
        client.predict({"user": ["a"], "age": ["old"], "tags": [[1, 2]]})
    err = info.value
    assert (err.code, err.http_status, err.transport) == ("INVALID_ARGUMENT", 400, "rest")
    assert 'JSON Value: "old" Type: String is not of expected type: float' in err.message and err.message in str(err)
    with pytest.raises(ServingError) as info:
        Client(url=server.rest_url, model_name="toy", version=9).predict(BATCH)
    assert (info.value.code, info.value.http_status) == ("NOT_FOUND", 404)
    assert info.value.message == "Servable not found for request: Specific(toy, 9)"
    with pytest.raises(ServingError) as info:
        Client(grpc_target=server.grpc_target, model_name="toy", label="beta").predict(BATCH)
    assert (info.value.code, info.value.transport) == ("INVALID_ARGUMENT", "grpc")
    assert info.value.message == "Unrecognized servable version label: beta"
    with pytest.raises(ValueError, match="must be numeric"):  # gRPC tensors are typed on the client side
        client.predict({"user": ["a"], "age": ["old"], "tags": [[1, 2]]}, transport="grpc")


# ---------------------------------------------------------------------------------------------------------------
# Availability: retries, concurrent load, new versions under load
# ---------------------------------------------------------------------------------------------------------------


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_client_retries_until_a_late_server_starts(exports):
    rest_port, grpc_port = _free_port(), _free_port()
    start = time.monotonic()
    with pytest.raises(ServingError) as info:  # nothing listening and no retries: UNAVAILABLE at once
        Client(url=f"http://127.0.0.1:{rest_port}", model_name="toy", retries=0).status()
    assert info.value.code == "UNAVAILABLE" and time.monotonic() - start < 2
    with pytest.raises(ServingError) as info:  # retries with backoff 0.05 + 0.1, then give up
        Client(grpc_target=f"127.0.0.1:{grpc_port}", model_name="toy", retries=2, backoff=0.05).status()
    assert info.value.code == "UNAVAILABLE" and time.monotonic() - start >= 0.15

    servers = []

    def start_late():
        time.sleep(0.8)
        registry = ModelRegistry(str(exports), model_config=str(exports / "models.config"), poll_seconds=0,
                                 allow_version_labels_for_unavailable_models=True)
        servers.append(LocalServer(registry, port=rest_port, grpc_port=grpc_port).start())

    grpc_answer = {}

    def grpc_call():  # retries from before the server is up, like the REST call below
        grpc_client = Client(grpc_target=f"127.0.0.1:{grpc_port}", model_name="toy", retries=8, backoff=0.1)
        grpc_answer.update(grpc_client.predict(BATCH))
        grpc_answer["_at"] = time.monotonic()

    threads = [threading.Thread(target=start_late), threading.Thread(target=grpc_call)]
    begin = time.monotonic()
    for t in threads:
        t.start()
    try:
        rest = Client(url=f"http://127.0.0.1:{rest_port}", model_name="toy", retries=8, backoff=0.1)
        assert rest.status()["model_version_status"][0]["state"] == "AVAILABLE"
        assert time.monotonic() - begin >= 0.8
    finally:
        for t in threads:
            t.join()
        for srv in servers:
            srv.stop()
    assert grpc_answer.pop("_at") - begin >= 0.8
    assert_outputs_equal(grpc_answer, ref(exports, 2))


def test_client_retries_503_but_not_timeouts():
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    hits = []

    class Flaky(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            if len(hits) <= 2:
                body, status = b'{"error": "warming up"}', 503
            elif self.path.endswith("/slow"):
                time.sleep(1.5)
                body, status = b"{}", 200
            else:
                body, status = b'{"model_version_status": []}', 200
            try:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # the timed-out client has gone
                pass

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        assert Client(url=url, model_name="m", backoff=0.01).status() == {"model_version_status": []}
        assert len(hits) == 3  # two 503s retried
        start = time.monotonic()
        with pytest.raises(ServingError) as info:
            Client(url=url, model_name="slow", timeout=0.3, retries=3)._rest("GET", "/slow")
        assert info.value.code == "DEADLINE_EXCEEDED" and time.monotonic() - start < 1.2  # not retried
        assert len(hits) == 4
    finally:
        httpd.shutdown()
        httpd.server_close()


def _hammer(server, thread_index, count, check, stop_when=None, hard_cap=None):
    """One load thread: REST columnar / REST row / gRPC by thread; ``check`` sorts each answer."""
    transport = "grpc" if thread_index % 4 == 3 else "rest"
    fmt = "row" if thread_index % 2 else "columnar"
    client = Client(url=server.rest_url, grpc_target=server.grpc_target, model_name="live", timeout=30, retries=0)
    done = 0
    while done < count or (stop_when is not None and not stop_when() and done < hard_cap):
        try:
            check(client.predict(BATCH, format=fmt, transport=transport))
        except Exception as exc:  # every failure is counted, none may happen
            check(exc)
        done += 1
    client.close()
    return done


def _run_load(server, count, check, **kwargs):
    totals = [0] * THREADS
    threads = [threading.Thread(target=lambda i=i: totals.__setitem__(i, _hammer(server, i, count, check, **kwargs)))
               for i in range(THREADS)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    return sum(totals), time.monotonic() - start


@pytest.fixture
def live(tmp_path):
    base = str(tmp_path / "live")
    save_toy(base, 1, 1.0)
    srv = LocalServer(ModelRegistry(base, poll_seconds=0.2), port=0, grpc_port=0).start()
    yield base, srv
    srv.stop()


def test_concurrent_load_has_no_failures(live):
    base, server = live
    want = reference(os.path.join(base, "1"))
    failures, lock = [], threading.Lock()

    def check(answer):
        if isinstance(answer, Exception) or not all(np.array_equal(answer[k], want[k]) for k in want):
            with lock:
                failures.append(answer)

    total, seconds = _run_load(server, REQUESTS, check)
    print(f"\nload: {THREADS} threads x {REQUESTS} = {total} requests in {seconds:.1f} s "
          f"({total / seconds:.0f}/s), {len(failures)} failures")
    assert total == THREADS * REQUESTS and failures == []


def test_a_new_version_written_under_load_is_picked_up_without_failed_requests(live):
    base, server = live
    v1 = reference(os.path.join(base, "1"))
    v2_path = os.path.join(base, "2")
    v2 = _Expected(v2_path)
    seen = {"v1": 0, "v2": 0}
    failures, lock, answered = [], threading.Lock(), threading.Event()

    def check(answer):
        with lock:
            if isinstance(answer, Exception):
                failures.append(answer)
            elif all(np.array_equal(answer[k], v1[k]) for k in v1):
                seen["v1"] += 1
            elif os.path.exists(v2_path) and all(np.array_equal(answer[k], v2[k]) for k in v2):
                seen["v2"] += 1
            else:
                failures.append(answer)
            if sum(seen.values()) >= 200:
                answered.set()

    def write_versions():
        answered.wait(120)
        # Junk the poller must ignore: hidden, non-integer, and an integer dir without saved_model.pb.
        shutil.copytree(os.path.join(base, "1"), os.path.join(base, ".tmp-9"))
        shutil.copytree(os.path.join(base, "1"), os.path.join(base, "8.partial"))
        os.makedirs(os.path.join(base, "7", "variables"))
        save_toy(base, 2, 2.0)

    writer = threading.Thread(target=write_versions)
    writer.start()
    count = max(REQUESTS // 3, 50)  # per thread at least; each goes on (up to 20x) until v2 has answered
    try:
        total, seconds = _run_load(server, count, check, stop_when=lambda: seen["v2"] >= THREADS * 5,
                                   hard_cap=20 * count)
    finally:
        writer.join()
    print(f"\nswitch: {total} requests in {seconds:.1f} s, {seen['v1']} answered by v1, {seen['v2']} by v2, "
          f"{len(failures)} failures")
    assert failures == [] and seen["v2"] > 0
    status = Client(url=server.rest_url, model_name="live").status()["model_version_status"]
    assert [(s["version"], s["state"]) for s in status] == [("2", "AVAILABLE"), ("1", "END")]
    grpc_client = Client(grpc_target=server.grpc_target, model_name="live")
    assert grpc_client.metadata()["model_spec"]["version"] == "2"
    assert_outputs_equal(grpc_client.predict(BATCH), reference(v2_path))


class _Expected:
    """The v2 reference outputs, computed once the test has written v2."""

    def __init__(self, path):
        self.path = path
        self._values = None

    def _load(self):
        if self._values is None:
            self._values = reference(self.path)
        return self._values

    def __iter__(self):
        return iter(self._load())

    def __getitem__(self, key):
        return self._load()[key]


def test_registry_ignores_incomplete_versions_and_keeps_serving_through_a_bad_one(tmp_path):
    base = str(tmp_path / "m")
    save_toy(base, 1, 1.0)
    registry = ModelRegistry(base, model_name="m", poll_seconds=0).start()
    assert sorted(registry._models["m"].served) == [1]
    os.makedirs(os.path.join(base, "3", "variables"))  # no saved_model.pb yet
    shutil.copytree(os.path.join(base, "1"), os.path.join(base, ".tmp-4"))
    shutil.copytree(os.path.join(base, "1"), os.path.join(base, "5-partial"))
    shutil.copytree(os.path.join(base, "1"), os.path.join(base, "6"))  # complete, but new: seen once first
    registry.poll_once()
    assert sorted(registry._models["m"].served) == [1]
    registry.poll_once()  # unchanged since the last poll: loaded, swapped in, 1 unloaded
    assert sorted(registry._models["m"].served) == [6]
    os.makedirs(os.path.join(base, "7"))
    with open(os.path.join(base, "7", "saved_model.pb"), "wb") as fh:
        fh.write(b"not a SavedModel")
    registry.poll_once()
    registry.poll_once()
    assert sorted(registry._models["m"].served) == [6]  # a broken newest version does not take 6 down
    from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus

    states = {s.version: (s.state, s.status.error_message) for s in registry.status_proto("m").model_version_status}
    assert sorted(states) == [1, 6, 7]  # 3, .tmp-4, 5-partial were never versions
    assert states[6] == (ModelVersionStatus.AVAILABLE, "") and states[1] == (ModelVersionStatus.END, "")
    assert states[7][0] == ModelVersionStatus.END and "loading" in states[7][1]
    registry.stop()


def _write_warmup(version_dir, users):
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    request.inputs["user"].CopyFrom(tf.make_tensor_proto(users, dtype=tf.string))
    request.inputs["age"].CopyFrom(tf.make_tensor_proto([1.0] * len(users), dtype=tf.float32))
    request.inputs["tags"].CopyFrom(tf.make_tensor_proto([[1, 2]] * len(users), dtype=tf.int64))
    log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
    os.makedirs(os.path.join(version_dir, "assets.extra"), exist_ok=True)
    with tf.io.TFRecordWriter(os.path.join(version_dir, "assets.extra", "tf_serving_warmup_requests")) as writer:
        writer.write(log.SerializeToString())


def test_warmup_requests_are_replayed_before_a_version_is_served(tmp_path):
    base = str(tmp_path / "m")
    _write_warmup(save_toy(base, 1, 1.0), ["a", "b"])
    bad = save_toy(base, 2, 2.0)
    _write_warmup(bad, ["a"])
    os.remove(os.path.join(bad, "assets.extra", "tf_serving_warmup_requests"))
    with tf.io.TFRecordWriter(os.path.join(bad, "assets.extra", "tf_serving_warmup_requests")) as writer:
        writer.write(b"not a PredictionLog")
    registry = ModelRegistry(base, model_name="m", poll_seconds=0).start()
    assert sorted(registry._models["m"].served) == [1]  # 2's warm-up fails: 1 stays
    assert "loading" in registry._models["m"].states[2][2]


# ---------------------------------------------------------------------------------------------------------------
# The CLI and the real exporter
# ---------------------------------------------------------------------------------------------------------------


def test_tfemb_serve_command(tmp_path, capsys):
    from tfemb.cli import build_parser

    args = build_parser().parse_args(["serve", "exports/m"])
    assert (args.port, args.grpc_port, args.host, args.poll_seconds, args.max_body_mb, args.max_batch_size) == (
        8501, 8500, "127.0.0.1", 1.0, 16.0, None)
    from tfemb.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["serve", str(tmp_path / "empty"), "--port", "0", "--grpc-port", "-1", "--max-batch-size", "0"]) == 2
    assert "tfemb serve: error: max_batch_size must be None or an int >= 1. Received: max_batch_size=0" in (
        capsys.readouterr().err)
    base = str(tmp_path / "deepfm")
    save_toy(base, 3, 1.0)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen([sys.executable, "-m", "tfemb.cli", "serve", base, "--port", "0", "--grpc-port", "0",
                             "--poll-seconds", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)
    try:
        lines, url, target = [], None, None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (url and target):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("REST"):
                url = line.split()[2]
            if line.startswith("gRPC"):
                target = line.split()[2]
        assert url and target, "".join(lines)
        assert url.startswith("http://127.0.0.1:") and target.startswith("127.0.0.1:")
        assert "model deepfm" in lines[0] and "[3]" in lines[0]
        want = reference(os.path.join(base, "3"))
        assert_outputs_equal(Client(url=url, model_name="deepfm").predict(BATCH, format="row"), want)
        assert_outputs_equal(Client(grpc_target=target, model_name="deepfm").predict(BATCH), want)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert "stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serves_a_tfemb_export(tmp_path):
    export = pytest.importorskip("tfemb.export", reason="tfemb.export is not in this tree yet")
    from tfemb import experiment

    prepared = experiment.prepare_data({"source": "synthetic_ctr", "params": {"num_rows": 400, "seed": 0}})
    model = experiment.build_model(prepared.schema, {"name": "deepfm", "embedding_dim": 4}, {"scheme": "fixed"})
    features, _ = next(iter(prepared.dataset("train", 16)))
    model(features)
    frame = prepared.frames["test"].head(6)
    export_dir = str(tmp_path / "deepfm")
    # The warm-up records are replayed by the server before the version is served, as TF Serving does.
    version_dir = export.export_saved_model(model, export_dir, warmup_rows=frame)
    assert os.path.exists(os.path.join(version_dir, "assets.extra", "tf_serving_warmup_requests"))
    inputs = export.raw_inputs(prepared.schema, frame)
    fn = tf.saved_model.load(version_dir).signatures["serving_default"]
    specs = fn.structured_input_signature[1]
    want = {k: v.numpy() for k, v in fn(**{k: tf.constant(v, specs[k].dtype) for k, v in inputs.items()}).items()}
    with LocalServer(ModelRegistry(export_dir, poll_seconds=0), port=0, grpc_port=0) as srv:
        client = Client(url=srv.rest_url, grpc_target=srv.grpc_target, model_name="deepfm")
        for kwargs in ({"format": "columnar"}, {"format": "row"}, {"transport": "grpc"}):
            assert_outputs_equal(client.predict(inputs, **kwargs), want)
        assert set(client.metadata()["metadata"]["signature_def"]["signature_def"]) >= {"serving_default", "encoded"}


def test_registry_refuses_a_trained_keras_model_instead_of_an_export(tmp_path):
    """A tfemb train run directory (model.keras, no versions) or a .keras file would wait forever for versions:
    a clear error points to tfemb export. A model directory that also holds versions serves them."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.keras").write_bytes(b"PK")
    for path in (run, run / "model.keras"):
        with pytest.raises(ValueError, match=r"holds a trained Keras model \(model.keras\).*tfemb export"):
            ModelRegistry(str(path), poll_seconds=0)
    (run / "3").mkdir()
    (run / "3" / "saved_model.pb").write_bytes(b"")
    registry = ModelRegistry(str(run), poll_seconds=0)
    assert registry.model_names == ["run"]
    empty = tmp_path / "empty"  # TF Serving's behaviour: an empty base path waits for its first version
    empty.mkdir()
    assert ModelRegistry(str(empty), poll_seconds=0).model_names == ["empty"]
    # One version directory, or a file, is not a base path either: the error names the directory to serve.
    with pytest.raises(ValueError, match=r"is one SavedModel version .* serve the directory of its versions, " +
                       re.escape(str(run))):
        ModelRegistry(str(run / "3"), poll_seconds=0)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt is a file, not a model's base path"):
        ModelRegistry(str(tmp_path / "notes.txt"), poll_seconds=0)


def test_registry_waits_for_a_missing_base_path_with_a_warning(tmp_path, caplog):
    missing = tmp_path / "not_yet"
    with caplog.at_level(logging.WARNING, logger="tfemb.serving"):
        registry = ModelRegistry(str(missing), poll_seconds=0)
    assert registry.model_names == ["not_yet"]
    assert f"{missing} does not exist (yet)" in caplog.text
