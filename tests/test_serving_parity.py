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
