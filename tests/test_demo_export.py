"""The main job ends by exporting the best model within a budget and printing how to serve and query it."""

import http.client
import json
import os
import shlex

import numpy as np
import pytest
import tensorflow as tf

from tfemb import compare, experiment
from tfemb.export import load_export

SMALL_BASE = {
    "data": {"source": "synthetic_ctr", "params": {"num_rows": 2000, "num_fields": 4, "seed": 3},
             "split": {"method": "random", "fractions": [0.8, 0.1, 0.1], "seed": 0}},
    "model": {"name": "deepfm", "embedding_dim": 8},
    "train": {"epochs": 1, "batch_size": 256, "verbose": 0, "embedding_optimizer": "adam"},
}
SPEC = {
    "base": SMALL_BASE,
    "variants": [
        {"name": "fixed-8", "embedding": {"scheme": "fixed"}},
        {"name": "hashing 4x", "embedding": {"scheme": "hashing", "params": {"compression": 4}}},
    ],
}


def test_compare_ends_with_an_export_that_serves_the_model(tmp_path):
    lines = []
    payload = compare.run_compare(SPEC, out_dir=str(tmp_path), log=lines.append)
    info = payload["export"]
    # Only hashing 4x is within 25% of fixed-8's embedding parameters.
    assert info["variant"] == "hashing 4x" and info["baseline"] == "fixed-8"
    assert info["embedding_parameters"] <= 0.25 * info["baseline_embedding_parameters"]
    assert info["export_dir"] == os.path.join(str(tmp_path), "export", info["name"])
    assert os.path.dirname(info["path"]) == info["export_dir"]
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["export"]["path"] == info["path"] and "_export_model" not in saved

    # The export loads and computes what the trained model computes, from raw rows.
    loaded = load_export(info["export_dir"])
    model = payload["_export_model"]
    prepared = experiment.prepare_data(experiment.merge(experiment.DEFAULTS, SMALL_BASE)["data"])
    test = prepared.frames["test"]
    x, _ = prepared.arrays["test"]
    expected = np.asarray(model({k: tf.constant(v) for k, v in x.items()}, training=False)).reshape(-1)
    got = loaded.predict(test)["probability"]
    np.testing.assert_allclose(got, expected, atol=1e-5)

    # The printed instructions: the serve command, a REST predict request, the Python client.
    text = "\n".join(lines)
    assert "tfemb serve" in text and ":predict" in text and "from tfemb.serving import Client" in text
    assert f"serve {info['export_dir']} --port 8501 --grpc-port 8500" in info["commands"]["serve"]
    assert lines.index(next(line for line in lines if "tfemb serve" in line)) > \
        lines.index(next(line for line in lines if line.startswith("wrote ")))  # the export is the last step

    # The printed curl body is a valid columnar request for the served model: send it to a local server.
    from tfemb.serving.server import LocalServer, ModelRegistry

    argv = shlex.split(info["commands"]["curl"])
    body, url = argv[argv.index("-d") + 1], argv[-1]
    assert url.endswith(f"/v1/models/{info['name']}:predict")
    with LocalServer(ModelRegistry(info["export_dir"], poll_seconds=0), port=0, grpc_port=None) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", url.split("8501", 1)[1], body=body)
        response = conn.getresponse()
        answer = json.loads(response.read())
        conn.close()
    assert response.status == 200, answer
    request = json.loads(body)["inputs"]
    direct = loaded.predict({k: v for k, v in request.items()})["probability"]
    # TF Serving's columnar answer: a signature with one output gives its value directly.
    np.testing.assert_allclose(np.asarray(answer["outputs"]).reshape(-1), direct, atol=1e-6)


def _result(name, scheme, params, auc):
    return {"name": name, "scheme": scheme, "model": "deepfm", "embedding_parameters": params,
            "metrics": {"auc": auc}}


def test_only_the_best_model_within_budget_is_kept():
    pairs = []
    results = [_result("hashing 4x", "hashing", 25, 0.70),  # before the baseline: kept until it is known
               _result("fixed-16", "fixed", 100, 0.80),
               _result("fixed-4", "fixed", 25, 0.72),
               _result("qr 3x", "qr", 33, 0.90),            # better but over budget
               _result("md 4x", "md", 24, 0.71)]
    kept_after = []
    for r in results:
        pairs = compare._keep_best_model(pairs + [[r, object()]], 0.25)
        kept_after.append([p[0]["name"] for p in pairs if p[1] is not None])
    assert kept_after[0] == ["hashing 4x"]
    assert kept_after[1] == ["hashing 4x"]
    assert kept_after[-1] == ["fixed-4"]
    assert compare.select_best(results, 0.25)[0] == 2
    # Lower is better for MSE; no baseline or no candidate: nothing to export.
    mse = [dict(r, metrics={"mse": 1.0 - r["metrics"]["auc"]}) for r in results]
    assert compare.select_best(mse, 0.25)[0] == 2
    assert compare.select_best(results[:1], 0.25) is None
    assert compare.select_best(results[1:2], 0.25) is None
    # With validation metrics the choice reads them, not the test split's: md 4x is best on validation.
    val = {"fixed-16": 0.79, "fixed-4": 0.70, "md 4x": 0.73, "hashing 4x": 0.69, "qr 3x": 0.95}
    with_val = [dict(r, val_metrics={"auc": val[r["name"]]}) for r in results]
    assert compare.select_best(with_val, 0.25)[0] == 4
    # ... unless a candidate has none: then every candidate is judged on the test split.
    assert compare.select_best(with_val[:4] + [results[4]], 0.25)[0] == 2
    lines = []
    assert compare.export_best([(results[1], object())], out_dir="unused", log=lines.append) is None
    assert "nothing exported" in lines[0]


def test_export_budget_none_skips_the_export(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "export_best", lambda *a, **k: pytest.fail("export_best must not run"))
    spec = {"base": SMALL_BASE, "variants": SPEC["variants"][:1]}
    payload = compare.run_compare(spec, out_dir=str(tmp_path), log=lambda m: None, export_budget=None)
    assert "export" not in payload and not (tmp_path / "export").exists()


def test_export_best_without_rows_prints_a_valid_example(tmp_path):
    prepared = experiment.prepare_data(experiment.merge(experiment.DEFAULTS, SMALL_BASE)["data"])
    model = experiment.build_model(prepared.schema, {"name": "deepfm", "embedding_dim": 4},
                                   {"scheme": "hashing", "params": {"compression": 4}})
    model.build()
    results = [_result("fixed-16", "fixed", 1000, 0.8), _result("hashing 4x", "hashing", 250, 0.7)]
    lines = []
    info = compare.export_best([(results[0], None), (results[1], model)], out_dir=str(tmp_path), log=lines.append)
    assert info["name"] == "deepfm_hashing_4x" and info["path"].endswith(os.path.join("deepfm_hashing_4x", "1"))
    body = json.loads(shlex.split(info["commands"]["curl"])[2])["inputs"]
    got = load_export(info["export_dir"]).predict(body)["probability"]
    assert got.shape == (1,) and 0.0 <= float(got[0]) <= 1.0
    assert any("tfemb serve" in line for line in lines)


def test_a_rerun_that_exports_nothing_says_the_exports_there_are_older(tmp_path, monkeypatch):
    # Nothing within the budget: an earlier run's export must not pass for this run's.
    fake = {"fixed-8": dict(_result("fixed-8", "fixed", 100, 0.7), embedding_bytes=400, train_seconds=1.0,
                            epochs=1, _model=None),
            "hashing 4x": dict(_result("hashing 4x", "hashing", 30, 0.7), embedding_bytes=120, train_seconds=1.0,
                               epochs=1, _model=None)}
    monkeypatch.setattr(experiment, "run", lambda cfg, **k: dict(fake[cfg["name"]]))
    (tmp_path / "export" / "deepfm_qr_4x" / "1").mkdir(parents=True)
    lines = []
    payload = compare.run_compare(SPEC, out_dir=str(tmp_path), log=lines.append)
    assert "export" not in payload
    assert any("nothing exported" in line for line in lines)
    assert any("deepfm_qr_4x are from an earlier run" in line for line in lines), lines
