"""``tfemb serve`` behaving as stock ``tensorflow_model_server`` where a client moving between the two would
notice: what the REST port answers outside the API, version labels in a models.config, and when the server
starts answering. Real sockets on 127.0.0.1; the toy SavedModels and helpers are tests/test_serving.py's."""

import http.client
import json

import pytest

from tfemb.serving.server import LocalServer, ModelRegistry

from test_serving import CONFIG, save_toy  # noqa: F401  (the module fixtures below reuse its exports)
from test_serving import exports, server  # noqa: F401


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
    with pytest.raises(ValueError, match=r"FAILED_PRECONDITION: Request to assign label to version 1 of model toy, "
                                         r"which is not currently available for inference"):
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

    parse = lambda *a: build_parser().parse_args(["serve", "x", *a]).allow_version_labels_for_unavailable_models  # noqa: E731
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
    assert "Request to assign label to version 1 of model toy" in err
    assert "--allow_version_labels_for_unavailable_models" in err
