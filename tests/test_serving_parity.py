"""``tfemb serve`` behaving as stock ``tensorflow_model_server`` where a client moving between the two would
notice: what the REST port answers outside the API, version labels in a models.config, and when the server
starts answering. Real sockets on 127.0.0.1; the toy SavedModels and helpers are tests/test_serving.py's."""

import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tfemb.serving.server import LocalServer, ModelRegistry

from test_serving import REPO, save_toy
from test_serving import exports, server  # noqa: F401  (its module fixtures, reused here)


def raw_call(port, method, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


# libevent's evhttp_send_error(req, HTTP_NOTFOUND, NULL): the page TF Serving's HTTP server sends for a path its
# REST dispatcher ((?i)/v1/.*) does not take (net_http/server/internal/evhttp_server.cc).
EVHTTP_404 = (b"<HTML><HEAD>\n<TITLE>404 Not Found</TITLE>\n</HEAD><BODY>\n<H1>Not Found</H1>\n"
              b"</BODY></HTML>\n")


@pytest.mark.parametrize("method,path", [("GET", "/"), ("GET", "/v2/models/toy"), ("POST", "/v1"),
                                         ("GET", "/healthz"), ("PUT", "/models/toy:predict")])
def test_paths_outside_v1_get_libevents_404_page(server, method, path):
    status, headers, body = raw_call(server.port, method, path)
    assert status == 404
    assert headers["Content-Type"] == "text/html" and headers["Connection"] == "close"
    assert body == EVHTTP_404
    # Under /v1/ the REST handler answers, in JSON (http_rest_api_handler.cc: "Malformed request").
    status, headers, body = raw_call(server.port, method, "/v1/nothing")
    assert status == 400 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"error": f"Malformed request: {method} /v1/nothing"}


def test_head_is_answered_as_tf_serving_does(server):
    """evhttp accepts HEAD and hands it to the REST handler, which knows only GET and POST: 400, no body."""
    status, headers, body = raw_call(server.port, "HEAD", "/v1/models/toy")
    assert status == 400 and body == b""
    status, headers, body = raw_call(server.port, "HEAD", "/")
    assert status == 404 and body == b""


# ---------------------------------------------------------------------------------------------------------------
# Version labels (server_core.cc: UpdateModelVersionLabelMap runs before any version loads)
# ---------------------------------------------------------------------------------------------------------------


def test_labels_are_refused_at_start_without_the_flag_as_tf_serving_does(exports):
    """TF Serving assigns a config's labels before it loads a version, so at start-up every label points at a
    version that is not available: without --allow_version_labels_for_unavailable_models it does not start."""
    registry = ModelRegistry(str(exports), model_config=str(exports / "models.config"), poll_seconds=0)
    server = LocalServer(registry, port=0, grpc_port=0)
    with pytest.raises(ValueError, match=r"FAILED_PRECONDITION: Request to assign label to version 2 of model toy, "
                                         r"which is not currently available for inference \(version_labels "
                                         r"\{ key: 'canary' value: 2 \}"):
        server.start()
    assert server.rest_url is None and server.grpc_target is None  # no port was opened
    # The same config with the flag: served, the labels pick their versions.
    registry = ModelRegistry(str(exports), model_config=str(exports / "models.config"), poll_seconds=0,
                             allow_version_labels_for_unavailable_models=True)
    with LocalServer(registry, port=0, grpc_port=None) as srv:
        status, _, body = raw_call(srv.port, "GET", "/v1/models/toy/labels/stable/metadata")
        assert status == 200 and json.loads(body)["model_spec"]["version"] == "1"


def test_a_label_on_a_version_that_never_loads_answers_not_found(tmp_path):
    """With the flag, a label may name a version that is not there (yet): a request by it is one for that
    version, which TF Serving answers NOT_FOUND (ServableRequestFromModelSpec → Specific(name, version))."""
    save_toy(str(tmp_path / "toy"), 1, 1.0)
    config = tmp_path / "models.config"
    config.write_text('model_config_list { config { name: "toy" base_path: "toy" model_platform: "tensorflow" '
                      'version_labels { key: "next" value: 5 } } }')
    registry = ModelRegistry(str(tmp_path), model_config=str(config), poll_seconds=0,
                             allow_version_labels_for_unavailable_models=True)
    with LocalServer(registry, port=0, grpc_port=None) as srv:
        status, _, body = raw_call(srv.port, "GET", "/v1/models/toy/labels/next/metadata")
        assert status == 404 and json.loads(body) == {"error": "Servable not found for request: Specific(toy, 5)"}


def test_tfemb_serve_has_tf_servings_flag(exports, capsys):
    from tfemb.cli import build_parser, main

    def parse(*flags):
        return build_parser().parse_args(["serve", "x", *flags]).allow_version_labels_for_unavailable_models

    assert parse() is False
    for spelling in ("--allow_version_labels_for_unavailable_models", "--allow-version-labels-for-unavailable-models"):
        assert parse(spelling) is True
        assert parse(f"{spelling}=true") is True and parse(f"{spelling}=false") is False
    with pytest.raises(SystemExit):
        parse("--allow_version_labels_for_unavailable_models=maybe")
    assert "expected true or false. Received: 'maybe'" in capsys.readouterr().err
    assert main(["serve", str(exports), "--model-config", str(exports / "models.config"), "--port", "0",
                 "--grpc-port", "-1"]) == 2
    err = capsys.readouterr().err
    assert "Request to assign label to version 2 of model toy" in err
    assert "--allow_version_labels_for_unavailable_models" in err


# ---------------------------------------------------------------------------------------------------------------
# Start-up: the ports open once every configured model has a version (server_core.cc, server.cc)
# ---------------------------------------------------------------------------------------------------------------

TWO_MODELS = """
model_config_list {
  config { name: "ready" base_path: "ready" model_platform: "tensorflow" }
  config { name: "late" base_path: "late" model_platform: "tensorflow" }
}
"""


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return False
    except ConnectionRefusedError:
        return True


def test_ports_open_only_once_every_configured_model_has_a_version(tmp_path, caplog):
    """ServerCore::Create waits until every configured model has an available version
    (ConnectAdaptersToManagerAndAwaitModelLoads) and only then does server.cc open the gRPC and HTTP ports: a
    client or a healthcheck never sees a server that answers for one model and 404s another it lists."""
    save_toy(str(tmp_path / "ready"), 1, 1.0)
    (tmp_path / "late").mkdir()
    (tmp_path / "models.config").write_text(TWO_MODELS)
    rest_port, grpc_port = _free_port(), _free_port()
    registry = ModelRegistry(str(tmp_path), model_config=str(tmp_path / "models.config"), poll_seconds=0.1)
    server = LocalServer(registry, port=rest_port, grpc_port=grpc_port)
    started = threading.Event()
    thread = threading.Thread(target=lambda: (server.start(), started.set()), daemon=True)
    try:
        with caplog.at_level(logging.WARNING, logger="tfemb.serving"):
            thread.start()
            deadline = time.monotonic() + 30
            while "late" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not started.is_set() and _refused(rest_port) and _refused(grpc_port)
            assert "No versions of servable late found under base path " + str(tmp_path / "late") in caplog.text
            assert "servable ready" not in caplog.text  # only the model still missing a version is named
            save_toy(str(tmp_path / "late"), 1, 2.0)
            assert started.wait(30)
        for name in ("ready", "late"):
            status, _, body = raw_call(rest_port, "GET", f"/v1/models/{name}")
            assert status == 200 and json.loads(body)["model_version_status"][0]["state"] == "AVAILABLE"
    finally:
        server.stop()
        thread.join(10)


def test_a_server_stopped_while_waiting_for_models_never_opens_its_ports(tmp_path):
    (tmp_path / "late").mkdir()
    rest_port = _free_port()
    server = LocalServer(ModelRegistry(str(tmp_path / "late"), poll_seconds=0.1), port=rest_port, grpc_port=None)
    thread = threading.Thread(target=server.start, daemon=True)
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive() and _refused(rest_port)
    server.stop()
    thread.join(10)
    assert not thread.is_alive() and _refused(rest_port) and server.rest_url is None
    # wait_for_models=False: the ports open at once, as before; the model answers 404 until a version comes.
    with LocalServer(ModelRegistry(str(tmp_path / "late"), poll_seconds=0.1), port=0, grpc_port=None,
                     wait_for_models=False) as srv:
        status, _, body = raw_call(srv.port, "GET", "/v1/models/late")
        assert status == 404 and json.loads(body) == {"error": "Could not find any versions of model late"}


def test_tfemb_serve_names_the_model_it_waits_for_and_opens_its_ports_when_it_comes(tmp_path):
    """The command as a compose service runs it: the log names the missing model, the ports stay closed (the
    healthcheck fails) until its version is there, then both models answer."""
    save_toy(str(tmp_path / "ready"), 1, 1.0)
    (tmp_path / "late").mkdir()
    (tmp_path / "models.config").write_text(TWO_MODELS)
    rest_port = _free_port()
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen([sys.executable, "-m", "tfemb.cli", "serve", str(tmp_path), "--model-config",
                             str(tmp_path / "models.config"), "--port", str(rest_port), "--grpc-port", "-1",
                             "--poll-seconds", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    out, err = [], []
    for stream, lines in ((proc.stdout, out), (proc.stderr, err)):  # drained aside: a read never blocks the test
        threading.Thread(target=lambda st=stream, ls=lines: ls.extend(iter(st.readline, "")), daemon=True).start()

    def wait_for(lines, text):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and not any(text in line for line in lines):
            time.sleep(0.05)
        return any(text in line for line in lines)

    try:
        assert wait_for(err, f"No versions of servable late found under base path {tmp_path / 'late'}"), "".join(err)
        assert _refused(rest_port) and not any("servable ready" in line for line in err)
        save_toy(str(tmp_path / "late"), 1, 2.0)
        assert wait_for(out, f"REST  on http://127.0.0.1:{rest_port}"), "".join(out + err)
        for name in ("ready", "late"):
            status, _, body = raw_call(rest_port, "GET", f"/v1/models/{name}")
            assert status == 200 and json.loads(body)["model_version_status"][0]["state"] == "AVAILABLE"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------------------------
# Status and metadata responses
# ---------------------------------------------------------------------------------------------------------------


def test_status_ignores_a_version_label_as_tf_serving_does(server):
    """get_model_status_impl.cc looks at model_spec.version only: a status request by label (REST
    /labels/<l>, gRPC ModelSpec.version_label) answers every version of the model, even for a label the config
    does not have (http_rest_api_handler.cc: ProcessModelStatusRequest → GetModelStatusImpl::GetModelStatus)."""
    import grpc
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    every = raw_call(server.port, "GET", "/v1/models/toy")
    assert [s["version"] for s in json.loads(every[2])["model_version_status"]] == ["2", "1"]
    for label in ("stable", "canary", "nope"):
        status, _, body = raw_call(server.port, "GET", f"/v1/models/toy/labels/{label}")
        assert (status, body) == (200, every[2]), label
    status, _, body = raw_call(server.port, "GET", "/v1/models/nope/labels/stable")
    assert status == 404 and json.loads(body) == {"error": "Could not find any versions of model nope"}
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "toy"
        request.model_spec.version_label = "stable"
        assert [s.version for s in stub.GetModelStatus(request, timeout=10).model_version_status] == [2, 1]
    # Metadata and predict resolve the label (GetServableHandle); an unknown one is INVALID_ARGUMENT.
    status, _, body = raw_call(server.port, "GET", "/v1/models/toy/labels/nope/metadata")
    assert status == 400 and json.loads(body) == {"error": "Unrecognized servable version label: nope"}


# ---------------------------------------------------------------------------------------------------------------
# models.config validation (server_core.cc: GetPlatform)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields,message", [
    ("", "Illegal setting neither ModelServerConfig::model_type (deprecated) nor ModelServerConfig::model_platform."),
    ('model_platform: "tensorflow" model_type: TENSORFLOW',
     "Illegal setting both ModelServerConfig::model_type (deprecated) and ModelServerConfig::model_platform."),
    ("model_type: OTHER", "ModelServerConfig::model_type choice 2 not supported."),
])
def test_a_config_tf_serving_refuses_is_refused(tmp_path, fields, message):
    """A config without model_platform served by tfemb serve would stop tensorflow_model_server from starting."""
    config = tmp_path / "models.config"
    config.write_text(f'model_config_list {{ config {{ name: "m" base_path: "m" {fields} }} }}')
    with pytest.raises(ValueError) as info:
        ModelRegistry(str(tmp_path), model_config=str(config), poll_seconds=0)
    assert message in str(info.value) and "'m'" in str(info.value)


def test_the_deprecated_model_type_tensorflow_is_served(tmp_path):
    save_toy(str(tmp_path / "m"), 1, 1.0)
    config = tmp_path / "models.config"
    config.write_text('model_config_list { config { name: "m" base_path: "m" model_type: TENSORFLOW } }')
    with LocalServer(ModelRegistry(str(tmp_path), model_config=str(config), poll_seconds=0), port=0,
                     grpc_port=None) as srv:
        assert raw_call(srv.port, "GET", "/v1/models/m")[0] == 200


@pytest.mark.parametrize("path", ["/v1/models/toy/versions/9223372036854775808",
                                  "/v1/models/toy/versions/18446744073709551615/metadata"])
def test_a_version_beyond_int64_is_a_bad_request(server, path):
    """http_rest_api_util.cc ParseModelInfo: absl::SimpleAtoi into int64_t fails → INVALID_ARGUMENT (400)."""
    version = path.split("/")[5]
    for method, target in (("GET", path), ("POST", path.replace("/metadata", "") + ":predict")):
        status, _, body = raw_call(server.port, method, target)
        assert status == 400 and json.loads(body) == {"error": f"Failed to convert version: {version} to numeric."}
    assert raw_call(server.port, "GET", "/v1/models/toy/versions/9223372036854775807")[0] == 404  # int64 max: fine


def test_the_api_verb_is_case_sensitive_though_the_path_is_not(server):
    """The path regexes are (?i), but http_rest_api_handler.cc compares the method ("predict") and the
    subresource ("metadata") exactly: :PREDICT is a malformed request, /METADATA asks for the status."""
    body = json.dumps({"instances": [{"user": "a", "age": 1.0, "tags": [1, 2]}]}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        for path, want in (("/V1/MODELS/toy:predict", 200), ("/v1/models/toy:Predict", 400),
                           ("/v1/models/toy:PREDICT", 400)):
            conn.request("POST", path, body=body)
            resp = conn.getresponse()
            answer = json.loads(resp.read())
            assert resp.status == want, path
            if want == 400:
                assert answer == {"error": f"Malformed request: POST {path}"}
    finally:
        conn.close()
    status, _, body = raw_call(server.port, "GET", "/v1/models/toy/versions/1/METADATA")
    assert status == 200 and list(json.loads(body)) == ["model_version_status"]
    status, _, body = raw_call(server.port, "GET", "/V1/Models/toy/versions/1/metadata")
    assert status == 200 and json.loads(body)["model_spec"]["version"] == "1"


def _start_until_logged(server, caplog, text, timeout=30):
    """Starts ``server`` in a thread (it waits for its models), lets it run until ``text`` is logged, stops it."""
    thread = threading.Thread(target=server.start, daemon=True)
    with caplog.at_level(logging.WARNING, logger="tfemb.serving"):
        thread.start()
        deadline = time.monotonic() + timeout
        while text not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    server.stop()
    thread.join(10)


def test_the_wait_log_names_a_version_that_failed_to_load(tmp_path, caplog):
    base = tmp_path / "broken"
    (base / "1").mkdir(parents=True)
    (base / "1" / "saved_model.pb").write_bytes(b"not a SavedModel")
    server = LocalServer(ModelRegistry(str(base), poll_seconds=0.1), port=_free_port(), grpc_port=None)
    _start_until_logged(server, caplog, "failed to load")
    assert "version 1 failed to load (loading " in caplog.text
    assert "model 'broken' has no version loaded" in caplog.text and _refused(server.port)


def test_grpc_without_a_model_name_is_invalid_argument(server):
    """server_core.cc ServableRequestFromModelSpec: an empty ModelSpec.name is INVALID_ARGUMENT 'ModelSpec has no
    name specified.' for every call that gets a servable (Predict, GetModelMetadata)."""
    import grpc
    from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        predict = predict_pb2.PredictRequest()
        predict.model_spec.signature_name = "serving_default"
        metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        metadata.model_spec.version_label = "stable"
        for call, request in ((stub.Predict, predict), (stub.GetModelMetadata, metadata)):
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details() == "ModelSpec has no name specified."
        with pytest.raises(grpc.RpcError) as info:  # predict_impl.cc: no model_spec at all
            stub.Predict(predict_pb2.PredictRequest(), timeout=10)
        assert (info.value.code(), info.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")


def test_the_metrics_path_answers_any_method_in_text_plain(server):
    """http_server.cc registers the Prometheus path as an exact-path handler, ahead of the /v1/ dispatcher;
    ProcessPrometheusRequest does not look at the method and answers Content-Type text/plain."""
    from tfemb.serving.server import PROMETHEUS_PATH

    raw_call(server.port, "GET", "/v1/models/toy")
    for method in ("GET", "POST", "HEAD"):
        status, headers, body = raw_call(server.port, method, PROMETHEUS_PATH)
        assert (status, headers["Content-Type"]) == (200, "text/plain"), method
        if method != "HEAD":
            assert b':tensorflow:serving:request_count{API="status",entrypoint="REST",model_name="toy"' in body
    assert raw_call(server.port, "GET", PROMETHEUS_PATH + "/")[0] == 404  # exact path only


def test_the_wait_log_says_why_a_model_has_no_version(tmp_path, caplog):
    """file_system_storage_path_source.cc's words: a base path that is not there, or one whose versions the
    'specific' policy does not name."""
    save_toy(str(tmp_path / "old"), 1, 1.0)
    (tmp_path / "models.config").write_text(
        'model_config_list { config { name: "gone" base_path: "gone" model_platform: "tensorflow" } '
        'config { name: "old" base_path: "old" model_platform: "tensorflow" '
        'model_version_policy { specific { versions: 3 } } } }')
    registry = ModelRegistry(str(tmp_path), model_config=str(tmp_path / "models.config"), poll_seconds=0.1)
    server = LocalServer(registry, port=_free_port(), grpc_port=None)
    _start_until_logged(server, caplog, "servable old")
    assert f"Could not find base path {tmp_path / 'gone'} for servable gone" in caplog.text
    assert ("No versions of servable old found under base path " in caplog.text
            and "specific { versions: [3] } names none of the versions there: [1]" in caplog.text)
