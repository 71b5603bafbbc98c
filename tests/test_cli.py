"""The main job and the CLI, end to end on the embedded synthetic data (small sizes)."""

import json
import math

import pytest

from tfemb import cli, compare, experiment, report

SMALL_BASE = {
    "data": {"source": "synthetic_ctr", "params": {"num_rows": 3000, "seed": 1}},
    "model": {"name": "deepfm", "embedding_dim": 8},
    "train": {"epochs": 1, "batch_size": 256, "verbose": 0, "embedding_optimizer": "adam"},
}


def test_compare_writes_table_plot_and_json(tmp_path):
    spec = {
        "base": SMALL_BASE,
        "variants": [
            {"name": "fixed-8", "embedding": {"scheme": "fixed"}},
            {"name": "hashing 4x", "embedding": {"scheme": "hashing", "params": {"compression": 4}}},
        ],
    }
    lines = []
    payload = compare.run_compare(spec, out_dir=str(tmp_path), log=lines.append)
    results = payload["results"]
    assert [r["name"] for r in results] == ["fixed-8", "hashing 4x"]
    fixed, hashed = results
    # The hashed tables hold about a quarter of the fixed tables' parameters, never more.
    assert hashed["embedding_parameters"] <= fixed["embedding_parameters"] / 3
    for r in results:
        assert 0.0 <= r["metrics"]["auc"] <= 1.0
        assert r["embedding_bytes"] == 4 * r["embedding_parameters"] or r["scheme"] != "fixed"
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["task"] == "binary" and len(saved["results"]) == 2
    md = (tmp_path / "compare.md").read_text()
    assert "| variant | auc | logloss | val auc | emb params | emb bytes | train s | epochs |" in md
    for r in results:  # test AUC, logloss, then the validation AUC the export's choice reads
        assert f"| {r['metrics']['auc']:.4f} | {r['metrics']['logloss']:.4f} | {r['val_metrics']['auc']:.4f} |" in md
    for r in results:  # seconds with one decimal in every row, whatever their size
        assert f"| {r['train_seconds']:.1f} | {r['epochs']} |" in md
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("hashing 4x" in line for line in lines)
    assert any("epoch 1:" in line for line in lines)  # progress per epoch


def test_default_compare_covers_every_baseline_scheme():
    schemes = {v["embedding"]["scheme"] for v in compare.DEFAULT_COMPARE["variants"]}
    assert {"fixed", "hashing", "qr", "double_hashing", "md", "pep", "dhe", "low_precision"} <= schemes
    assert {"fse", "darts", "sam", "autoemb", "esapn"} <= set(compare.DEFAULT_COMPARE["streaming"]["methods"])
    numeric = {(v.get("numeric_embedding") or {}).get("scheme") for v in compare.DEFAULT_COMPARE["variants"]}
    assert "autodis" in numeric


def test_compare_streaming_table(tmp_path):
    """The streaming section of the main job: every method streamed over the same time-ordered rows, a table in
    compare.md and compare.json, sizes that the methods chose (not the fixed tables')."""
    spec = {
        "base": SMALL_BASE,
        "variants": [{"name": "fixed-8", "embedding": {"scheme": "fixed"}}],
        "streaming": {"data": {"source": "synthetic_cf", "params": {"num_users": 60, "num_items": 40,
                                                                    "num_rows": 2500, "seed": 3}},
                      "task": "binary", "methods": ["fse", "autoemb", "esapn"], "candidates": [2, 4, 8],
                      "test_fraction": 0.4},
    }
    lines = []
    payload = compare.run_compare(spec, out_dir=str(tmp_path), log=lines.append, export_budget=None)
    stream = payload["streaming"]
    assert [r["method"] for r in stream["runs"]] == ["fse", "autoemb", "esapn"]
    fse, auto, es = stream["runs"]
    users, items = stream["data"]["users"], stream["data"]["items"]
    assert fse["embedding_parameters"] == (users + items) * 14  # FSE at the sum of the candidates, 2 + 4 + 8
    for r in (auto, es):  # exported at the sizes the search chose: every id at one of the candidates
        assert set(r["mean_dim"]) == {"user_id", "item_id"}
        assert all(2 <= d <= 8 for d in r["mean_dim"].values())
    assert es["embedding_parameters"] < fse["embedding_parameters"]
    for r in stream["runs"]:
        assert r["test"]["rows"] == 1000 and 0.0 <= r["test"]["accuracy"] <= 1.0  # the last 40% of 2,500 rows
    md = (tmp_path / "compare.md").read_text()
    assert "## Streaming (synthetic_cf" in md and "| AutoEmb |" in md and "| ESAPN |" in md
    for r, label in zip(stream["runs"], ("FSE (sum)", "AutoEmb", "ESAPN")):  # seconds and ratio, fixed decimals
        ratio = fse["examples_per_second"] / r["examples_per_second"]
        assert f"| {r['seconds']:.1f} | {ratio:.2f}x |" in md and f"| {label} |" in md
    # The hard export's fidelity to the soft model beside the size it has; FSE and ESAPN export what streamed.
    agreement = auto["hard_vs_soft"]["agreement"]
    assert f"| {agreement:.0%} agree |" in md and md.count("| same |") == 2
    assert compare._export_fidelity({"agreement": float("nan"), "mean_abs": 0.1234}) == "mean |Δ| 0.123"  # regression
    # PEP's epochs cell counts the search and the retraining, as its train seconds do.
    assert compare._epochs_cell({"epochs": 3, "pep": {"reached": True, "search_epochs": 2}}) == "2+3"
    assert compare._epochs_cell({"epochs": 2, "pep": {"reached": False, "search_epochs": 2}}) == 2
    assert compare._epochs_cell({"epochs": 4}) == 4
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert len(saved["streaming"]["runs"]) == 3
    assert any("ESAPN: streaming" in line for line in lines)
    assert (tmp_path / "compare_streaming.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


TINY_SPEC = {
    "base": {"data": {"source": "synthetic_ctr", "params": {"num_rows": 1500, "num_fields": 3, "seed": 0}},
             "model": {"name": "deepfm", "embedding_dim": 4},
             "train": {"epochs": 1, "batch_size": 256, "verbose": 0}},
    "variants": [{"name": "fixed", "embedding": {"scheme": "fixed"}},
                 {"name": "hashing 4x", "embedding": {"scheme": "hashing", "params": {"compression": 4}}}],
}


def _no_training(monkeypatch):
    monkeypatch.setattr(experiment, "run", lambda *a, **k: pytest.fail("a variant trained before the error"))


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["variants"].append({"name": "bad", "embedding": {"scheme": "hashingg"}}),
     "variant 'bad': name must be one of"),
    (lambda s: s["variants"].append({"name": "neg", "model": {"embedding_dim": -4}}),
     "variant 'neg': model.embedding_dim must be an int >= 1. Received: embedding_dim=-4"),
    (lambda s: s.update(variant=s.pop("variants")), "unknown top-level key(s) ['variant']"),
    (lambda s: s["variants"].append({"name": "fixed"}), "variant names must be unique. Received: name='fixed'"),
    (lambda s: s.update(streaming={"data": {"source": "synthetic_cf"}, "methods": ["fse", "esapnn"]}),
     "streaming.methods must be a non-empty list of"),
    (lambda s: s.update(streaming={"data": {"source": "synthetic_cf"}, "methods": ["fse"], "test_fraction": 1.5}),
     "streaming.test_fraction must be a number in (0, 1). Received: test_fraction=1.5"),
])
def test_compare_config_mistakes_are_named_before_any_data(tmp_path, capsys, monkeypatch, edit, message):
    """A mistake in the last variant or in the streaming section used to surface only after the other variants
    had trained (minutes of the main job), some as a bare KeyError ("error: 'variants'")."""
    import yaml

    monkeypatch.setattr(experiment, "prepare_data", lambda *a, **k: pytest.fail("data read before the error"))
    spec = json.loads(json.dumps(TINY_SPEC))
    edit(spec)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert cli.main(["compare", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"--config {path}" in err and message in err, err


def test_compare_config_that_is_not_a_spec_is_refused(tmp_path, capsys, monkeypatch):
    # An empty file (or a list) used to run the whole built-in main job instead.
    monkeypatch.setattr(experiment, "prepare_data", lambda *a, **k: pytest.fail("data read before the error"))
    for text, what in (("", "an empty file"), ("[]", "list")):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        assert cli.main(["compare", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert "must be a compare spec: a mapping with 'base' and 'variants'" in err and what in err, err
    assert cli.main(["compare", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "--config: no file at" in capsys.readouterr().err


def test_compare_out_that_is_a_file_fails_before_training(tmp_path, capsys, monkeypatch):
    # It used to fail with "[Errno 17] File exists" after the last variant had trained.
    monkeypatch.setattr(experiment, "prepare_data", lambda *a, **k: pytest.fail("data read before the error"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert cli.main(["compare", "--quick", "--out", str(afile)]) == 2
    assert f"--out {afile} is a file" in capsys.readouterr().err
    assert cli.main(["compare", "--quick", "--out", str(afile / "sub")]) == 2
    assert f"--out {afile / 'sub'}: cannot create the directory" in capsys.readouterr().err
    with pytest.raises(NotADirectoryError, match="is a file"):  # the Python API too
        compare.run_compare(TINY_SPEC, out_dir=str(afile), log=lambda m: None)


def test_compare_bad_scheme_parameter_fails_before_the_first_variant_trains(tmp_path, monkeypatch):
    _no_training(monkeypatch)
    spec = json.loads(json.dumps(TINY_SPEC))
    spec["variants"][1]["embedding"]["params"]["compression"] = -4
    with pytest.raises(ValueError, match="compression must be a finite number > 0. Received: compression=-4"):
        compare.run_compare(spec, out_dir=str(tmp_path), log=lambda m: None)


def test_quick_spec_shrinks_only_what_it_can():
    quick = compare.quick_spec(None)  # the main job: 8,000 rows, 1 epoch; the default itself is not changed
    assert quick["base"]["data"]["params"]["num_rows"] == 8000 and quick["base"]["train"]["epochs"] == 1
    assert compare.DEFAULT_COMPARE["base"]["data"]["params"]["num_rows"] == 60000
    small = compare.quick_spec(TINY_SPEC)  # never more rows than the spec asks for
    assert small["base"]["data"]["params"]["num_rows"] == 1500
    # A real source has no num_rows ("criteo_schema() got an unexpected keyword argument 'num_rows'").
    criteo = dict(TINY_SPEC, base=dict(TINY_SPEC["base"], data={"source": "criteo", "params": {"nrows": 3000}}))
    criteo["variants"] = [dict(TINY_SPEC["variants"][0], train={"epochs": 5})]
    quick = compare.quick_spec(criteo)
    assert quick["base"]["data"]["params"] == {"nrows": 3000}
    assert quick["base"]["train"]["epochs"] == 1 and quick["variants"][0]["train"]["epochs"] == 1


def _fake_result(name, scheme, params, auc, pep=None):
    result = {"name": name, "model": "deepfm", "scheme": scheme, "metrics": {"auc": auc, "logloss": 0.5},
              "embedding_parameters": params, "embedding_bytes": 4 * params, "train_seconds": 1.0, "epochs": 1,
              "_model": None}
    if pep is not None:
        result["pep"] = pep
    return result


def test_compare_rerun_replaces_the_earlier_files_and_labels_points_as_the_table(tmp_path, monkeypatch):
    fake = {"fixed": _fake_result("fixed", "fixed", 100, 0.7),
            "hashing 4x": _fake_result("hashing 4x", "hashing", 25, 0.68, pep={"reached": False})}
    monkeypatch.setattr(experiment, "run", lambda cfg, **k: dict(fake[cfg["name"]]))
    plotted = []
    real_plot = report.scatter_plot
    monkeypatch.setattr(report, "scatter_plot", lambda path, points, *a, **k: (plotted.append((points, k)),
                                                                               real_plot(path, points, *a, **k)))
    (tmp_path / "compare_streaming.png").write_bytes(b"an earlier run's plot")
    (tmp_path / "compare.md").write_text("an earlier run's table")
    lines = []
    compare.run_compare(TINY_SPEC, out_dir=str(tmp_path), log=lines.append, export_budget=None)
    assert any("holds an earlier run" in line and "will be replaced" in line for line in lines)
    # No streaming in this spec: the earlier run's streaming plot no longer stands beside the new tables.
    assert not (tmp_path / "compare_streaming.png").exists()
    assert "an earlier run" not in (tmp_path / "compare.md").read_text()
    # The plot marks the searched (unretrained) PEP row, as the table does.
    md = (tmp_path / "compare.md").read_text()
    assert "| hashing 4x [PEP target not reached: searched model] |" in md
    assert [p[0] for p in plotted[0][0]] == ["fixed", "hashing 4x †"]
    assert "PEP target not reached" in plotted[0][1]["note"]


def test_streaming_table_survives_a_stream_without_timed_batches(monkeypatch):
    """A stream too short for a batch after the warm-up has no speed (NaN): the table used to crash with
    "cannot convert float NaN to integer" after the CTR part had run."""
    import numpy as np

    from tfemb import streaming

    def fake_run(method, *a, **k):
        return {"method": method, "test": {"accuracy": float("nan"), "mse": float("nan")}, "seconds": 1.0,
                "examples_per_second": float("nan"), "embedding_parameters": 10, "embedding_bytes": 40,
                "mean_dim": {}, "by_frequency": {}, "model": None}

    monkeypatch.setattr(streaming, "prepare_stream", lambda *a, **k: (None, {}, np.zeros(3), {
        "rows": 3, "users": 1, "items": 1}))
    monkeypatch.setattr(streaming, "run_method", fake_run)
    out = compare.run_streaming({"data": {"source": "synthetic_cf"}, "methods": ["fse", "esapn"]},
                                log=lambda m: None)
    assert all(math.isnan(r["examples/s"]) for r in out["rows"])
    assert [r["time/example vs FSE"] for r in out["rows"]] == ["n/a", "n/a"]
    assert "| nan | 1.0 | n/a |" in out["markdown"]


def test_train_then_inspect(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: tiny\n"
        "data: {source: synthetic_ctr, params: {num_rows: 2000, seed: 2}}\n"
        "model: {name: fm, embedding_dim: 4}\n"
        "embedding: {scheme: qr, params: {compression: 2}}\n"
        "train: {epochs: 2, batch_size: 256, verbose: 0, checkpoint: true,\n"
        "        early_stopping: {monitor: val_auc, patience: 1}}\n"
    )
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(recipe), "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["scheme"] == "qr" and result["model"] == "fm"
    assert (out / "model.keras").exists() and (out / "schema.json").exists()
    assert (out / "checkpoint.weights.h5").exists()  # ModelCheckpoint ran
    assert 1 <= result["epochs"] <= 2 and "val_auc" in result["history"]
    capsys.readouterr()
    assert cli.main(["inspect", str(out), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["scheme"] for r in rows} == {"QREmbedding"}
    assert sum(r["parameters"] for r in rows) == result["embedding_parameters"]


def test_train_then_export(tmp_path, capsys):
    """tfemb export: a run directory -> a compact export TF Serving loads, its report, warm-up and how to serve it."""
    import numpy as np

    from tfemb.data.synthetic import make_synthetic_ctr
    from tfemb.export import WARMUP_PATH, load_export, read_warmup_requests

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: tiny\n"
        "data: {source: synthetic_ctr, params: {num_rows: 2000, seed: 2}}\n"
        "model: {name: fm, embedding_dim: 4}\n"
        "embedding: {scheme: double_hashing, params: {compression: 2}}\n"
        "train: {epochs: 1, batch_size: 256, verbose: 0}\n"
    )
    run, exports = tmp_path / "run", tmp_path / "exports" / "tiny"
    assert cli.main(["train", "--config", str(recipe), "--out", str(run)]) == 0
    rows, _ = make_synthetic_ctr(num_rows=300, seed=2)
    rows.to_csv(tmp_path / "rows.csv", index=False)
    capsys.readouterr()
    args = ["export", str(run), str(exports), "--optimize-for", "latency", "--warmup-rows", str(tmp_path / "rows.csv")]
    assert cli.main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["path"] == str(exports / "1")
    assert out["report"]["optimize_for"] == "latency"
    assert [t["scheme"] for t in out["report"]["tables"]][0] == "DoubleHashingEmbedding"
    assert len(read_warmup_requests(str(exports / "1" / WARMUP_PATH))) == 2

    # The export computes what the trained model computes on the same raw rows.
    model = cli.load_saved_model(str(run))
    features, _ = model.schema.transform(rows.head(32), with_label=False)
    expected = model.predict(features, verbose=0).reshape(-1)
    got = load_export(str(exports)).predict(rows.head(32))["probability"].reshape(-1)
    np.testing.assert_allclose(got, expected, atol=1e-5)

    # The console form: the report, then how to serve and query it with one of the given rows.
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert f"exported to {exports / '2'}" in text and "compact forms for latency" in text
    assert f"serve {exports} --port 8501" in text and "/v1/models/tiny:predict" in text
    assert f'"C1": ["{rows["C1"].iloc[0]}"]' in text

    # Errors name what is wrong and write nothing.
    assert cli.main(["export", str(run), str(exports), "--version", "1"]) == 2
    assert "--overwrite replaces it" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path / "nothing"), str(exports)]) == 2
    assert "no saved model at" in capsys.readouterr().err
    assert cli.main(["export", str(run), str(exports), "--warmup-rows", str(tmp_path / "none.csv")]) == 2
    assert "--warmup-rows: no file at" in capsys.readouterr().err
    assert sorted(p.name for p in exports.iterdir()) == ["1", "2"]
    assert cli.main(["export", str(run), str(exports), "--version", "1", "--overwrite"]) == 0
    (tmp_path / "afile").write_text("x")  # EXPORT_DIR is a file, or under one
    assert cli.main(["export", str(run), str(tmp_path / "afile")]) == 2
    assert "afile is a file, not a directory" in capsys.readouterr().err
    assert cli.main(["export", str(run), str(tmp_path / "afile" / "sub")]) == 2
    assert "Not a directory" in capsys.readouterr().err
    assert cli.main(["export", str(run), str(tmp_path / "fresh"), "--version", "-3"]) == 2
    assert "version must be an int >= 0" in capsys.readouterr().err
    assert cli.main(["export", str(run), str(tmp_path / "fresh"), "--warmup-rows", str(run / "result.json")]) == 2
    capsys.readouterr()
    assert not (tmp_path / "fresh").exists()  # a failed first export leaves no empty base directory
    corrupt = tmp_path / "corrupt"  # a truncated model.keras is named as such, not as "file not found"
    corrupt.mkdir()
    (corrupt / "model.keras").write_bytes((run / "model.keras").read_bytes()[:2000])
    for command in (["export", str(corrupt), str(exports)], ["inspect", str(corrupt)]):
        assert cli.main(command) == 2
        assert "model.keras is not a valid .keras archive (a zip file): corrupt or truncated?" in \
            capsys.readouterr().err


def test_cli_errors_are_clear(tmp_path, capsys):
    assert cli.main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {source: nowhere}\n")
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert "data.source must be one of" in capsys.readouterr().err
    assert cli.main(["inspect", str(tmp_path / "nothing")]) == 2


def test_inspect_errors_name_what_inspect_reads(tmp_path, capsys):
    """A folder that is neither a run nor an export (e.g. the folder of several exports) and a SavedModel's own
    graph file get errors that say inspect also reads exports, not "no saved model" / "not a valid .keras"."""
    (tmp_path / "exports" / "deepfm").mkdir(parents=True)
    graph = tmp_path / "exports" / "deepfm" / "1" / "saved_model.pb"
    graph.parent.mkdir()
    graph.write_bytes(b"\x08\x01")
    assert cli.main(["inspect", str(tmp_path / "exports")]) == 2
    err = capsys.readouterr().err
    assert f"no saved model or export at {tmp_path / 'exports'}" in err and "SavedModel version directory" in err
    assert cli.main(["inspect", str(graph)]) == 2
    err = capsys.readouterr().err
    assert "is a SavedModel's graph file; inspect the export by its version directory" in err
    assert "not a valid .keras archive" not in err
    assert cli.main(["inspect", str(tmp_path / "missing")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


TINY = ("name: tiny\n"
        "data: {source: synthetic_ctr, params: {num_rows: 1000, seed: 2}}\n"
        "model: {name: fm, embedding_dim: 4}\n"
        "train: {epochs: 1, batch_size: 256, verbose: 0}\n")


@pytest.mark.parametrize("edit,message", [
    ({"trian": {"epochs": 1}}, "unknown top-level key(s) ['trian']"),
    ({"train": {"epocs": 1}}, "unknown key(s) train.epocs; known keys of train: "),
    ({"data": {"split": {"fraction": [0.5, 0.5]}}}, "unknown key(s) data.split.fraction"),
    ({"train": {"early_stopping": {"monitr": "val_auc"}}}, "unknown key(s) train.early_stopping.monitr"),
    ({"pep": {"target": [0.25]}}, "unknown key(s) pep.target"),
    ({"model": "deepfm"}, "model must be a mapping. Received: model='deepfm'"),
    ({"data": [1, 2]}, "data must be a mapping. Received: data=[1, 2]"),
    ({"train": {"epochs": 0}}, "train.epochs must be an int >= 1. Received: epochs=0"),
    ({"train": {"epochs": "two"}}, "train.epochs must be an int >= 1. Received: epochs='two'"),
    ({"train": {"batch_size": 51.5}}, "train.batch_size must be an int >= 1. Received: batch_size=51.5"),
    ({"train": {"learning_rate": -1}}, "train.learning_rate must be a number > 0. Received: learning_rate=-1"),
    ({"data": {"params": {"num_row": 10}}}, "data.params of source 'synthetic_ctr'"),
    ({"data": {"source": "csv", "params": {"schema": {}}}}, "data.params.path is required for source csv"),
    ({"embedding": {"scheme": "double_hashing", "params": {"compresion": 4}}},
     "embedding scheme 'double_hashing' (params {'compresion': 4})"),
    ({"train": {"early_stopping": {"monitor": "val_acu"}}},
     "train.early_stopping.monitor must be one of ['loss', 'auc'"),
])
def test_config_mistakes_are_named_before_training(tmp_path, capsys, edit, message):
    """A typo in a recipe must not silently run with other settings: each mistake names the key and value."""
    import yaml

    cfg = experiment.merge(yaml.safe_load(TINY), {})
    for key, value in edit.items():
        cfg[key] = experiment.merge(cfg.get(key) or {}, value) if isinstance(value, dict) and isinstance(
            cfg.get(key), dict) else value
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (out / "model.keras").exists()


def test_epochs_override_is_checked(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY)
    for value in ("0", "-2"):
        assert cli.main(["train", "--config", str(recipe), "--epochs", value, "--out", str(tmp_path / "r")]) == 2
        assert f"train.epochs must be an int >= 1. Received: epochs={value}" in capsys.readouterr().err


def test_config_merge_keeps_defaults():
    cfg = experiment.merge(experiment.DEFAULTS, {"train": {"epochs": 7}})
    assert cfg["train"]["epochs"] == 7 and cfg["train"]["batch_size"] == experiment.DEFAULTS["train"]["batch_size"]
    with pytest.raises(Exception, match="data.source must be one of"):
        experiment.prepare_data({"source": "nowhere"})


def test_csv_recipe_sets_feature_options(tmp_path, capsys):
    """A csv source's schema takes per-column feature options: a numeric column with missing values trains with
    its fill_value; a misspelt option is named."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"C1": rng.choice(list("abcd"), 400), "I1": rng.random(400),
                          "click": rng.integers(0, 2, 400)})
    frame.loc[::7, "I1"] = np.nan
    frame.to_csv(tmp_path / "rows.csv", index=False)

    def recipe(numeric):
        path = tmp_path / "r.yaml"
        path.write_text(
            "name: csv\n"
            f"data: {{source: csv, params: {{path: {tmp_path / 'rows.csv'}, schema: {{label: click, "
            f"categorical: [C1], numeric: {numeric}}}}}}}\n"
            "model: {name: lr, embedding_dim: 4}\n"
            "train: {epochs: 1, batch_size: 128, verbose: 0}\n")
        return str(path)

    assert cli.main(["train", "--config", recipe("{I1: {fill_value: 0.0}}"), "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "result.json").read_text())["metrics"]
    capsys.readouterr()
    assert cli.main(["train", "--config", recipe("[I1]"), "--out", str(tmp_path / "run2")]) == 2
    assert "set fill_value on the NumericFeature" in capsys.readouterr().err
    assert cli.main(["train", "--config", recipe("{I1: {fil_value: 0.0}}"), "--out", str(tmp_path / "run3")]) == 2
    assert "numeric['I1']: unknown keys ['fil_value']" in capsys.readouterr().err
