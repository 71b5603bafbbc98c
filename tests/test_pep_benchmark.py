"""The PEP evidence: benchmarks/pep_sweep.py on synthetic CF data, and the ``pep`` section of ``experiment.run``.

The sweep runs quickly (tiny synthetic data, two targets, short timing bursts) and its JSON is checked for what the
benchmark claims: every reached snapshot is within its target, the retrained model keeps exactly the snapshot's
entries, the uniform baseline's parameters are within one dimension per id of the snapshot's non-zeros.
"""

import copy
import importlib.util
import json
import math
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from tfemb import experiment

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_sweep():
    spec = importlib.util.spec_from_file_location("pep_sweep", REPO / "benchmarks" / "pep_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fast_settings(sweep):
    settings = copy.deepcopy(sweep.SETTINGS)
    cf = settings["synthetic_cf"]
    cf["train"].update(epochs=2, patience=1)
    # Strong pressure from the start: the two targets are reached in a few epochs of 38 steps.
    cf["search"].update(threshold_init=-5.0, threshold_l2=1e-4, pressure_window=40, max_epochs=20)
    return settings


def test_sweep_on_synthetic_cf(tmp_path, monkeypatch):
    sweep = load_sweep()
    monkeypatch.setattr(sweep, "TIMING_ROUNDS", 1)
    monkeypatch.setattr(sweep, "TIMING_STEPS", 6)
    monkeypatch.setattr(sweep, "BOOTSTRAP", 40)
    targets = [0.5, 0.2]
    payload = sweep.run_sweep(["synthetic_cf"], targets=targets, quick=True, out=str(tmp_path),
                              settings=fast_settings(sweep))

    for name in ("pep_sweep.json", "pep_sweep.md", "pep_quality_vs_params.png", "pep_dims_vs_popularity.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "pep_sweep.json").read_text())
    assert saved["args"]["targets"] == targets and saved["skipped"] == []
    (run,) = saved["runs"]
    assert (run["dataset"], run["model"], run["seed"]) == ("synthetic_cf", "cf", 0)
    ids, dim = run["ids"], run["embedding_dim"]
    assert ids == sum(run["tables"].values())
    assert run["fixed"]["params"] == ids * dim == run["search"]["dense_count"]
    assert 0.0 <= run["fixed"]["auc"] <= 1.0 and run["fixed"]["logloss"] > 0
    for key in ("ratio_in_run_median_step", "ratio_interleaved_median_step", "ratio_interleaved_cpu",
                "ratio_interleaved_without_counts"):
        assert math.isfinite(run["timing"][key]) and run["timing"][key] > 0, key

    assert [p["target"] for p in run["points"]] == targets
    reached = [p for p in run["points"] if p["reached"]]
    assert reached, f"no target reached: {run['search']}"
    for p in run["points"]:
        assert p["target_count"] == math.floor(p["target"] * ids * dim)
        if not p["reached"]:  # reported, with the fewest non-zeros, never as a result
            assert p["fewest_reached"] > p["target_count"] and "pep" not in p
            continue
        assert p["nnz"] <= p["target_count"]
        assert p["pep"]["params"] <= p["nnz"]  # the retrained model keeps only the snapshot's entries
        uniform = p["uniform"]
        assert uniform["dim"] == max(1, round(p["nnz"] / ids)) and uniform["params"] == uniform["dim"] * ids
        assert abs(uniform["params"] - p["nnz"]) <= ids  # within one dimension per id
        lo, hi = p["delta_auc_ci95"]
        assert lo <= hi and all(0.0 <= m["auc"] <= 1.0 for m in (p["pep"], uniform))
        assert set(p["controls"]) == {"random", "columns"}
        for control in p["controls"].values():  # retrained at the snapshot's count, compared with PEP's ticket
            assert control["params"] <= p["nnz"] and 0.0 <= control["auc"] <= 1.0
            assert control["pep_minus_control"] == pytest.approx(p["pep"]["auc"] - control["auc"])
            lo, hi = control["pep_minus_control_ci95"]
            assert lo <= hi
    snaps = {s["target"]: s for s in run["search"]["snapshots"]}
    assert set(snaps) == {p["target"] for p in reached}
    assert run["search"]["unreached"] == [] or len(reached) < len(targets)
    assert set(run["dims_vs_popularity"]) == {str(p["target"]) for p in reached}

    md = (tmp_path / "pep_sweep.md").read_text()
    assert "| keep | fewer | reached | nnz (PEP) |" in md and "## Findings" in md
    assert "Search time per step / fixed" in md
    assert "| fewer | PEP AUC | random mask AUC | PEP − random mask |" in md


def test_sweep_controls_are_the_library_controls():
    from tfemb.pep import CONTROL_KINDS

    assert load_sweep().CONTROLS == CONTROL_KINDS


def test_reset_ticket_equals_a_fresh_retrain():
    """The sweep reuses one retrained model across snapshots; after ``reset_ticket`` it must hold exactly what
    ``tfemb.pep.retrain`` would build (masks, rewound tables, initial dense weights) and a fresh optimizer."""
    from tfemb.data import make_synthetic_cf, synthetic_cf_schema
    from tfemb.layers import scheme_factory
    from tfemb.models import CFNetwork
    from tfemb.pep import PEPSnapshots, retrain
    from tfemb.tasks import compile_model

    sweep = load_sweep()
    df = make_synthetic_cf(num_users=40, num_items=30, num_rows=600, seed=3)[0]
    schema = synthetic_cf_schema(df).fit(df)
    x, y = schema.transform(df)
    tf.keras.utils.set_random_seed(0)
    pep = scheme_factory("pep", output_dim=5, threshold_init=-5.0, g_scale=1.0,
                         threshold_regularizer={"class_name": "L2", "config": {"l2": 1e-3}})
    model = CFNetwork(schema, embeddings=pep, embedding_dim=5, hidden_units=(7,))
    compile_model(model, learning_rate=0.05)
    snaps = PEPSnapshots([0.95, 0.85], check_every=1)
    model.fit(x, y, batch_size=64, epochs=6, verbose=0, callbacks=[snaps])
    assert len(snaps.snapshots) == 2, snaps.unreached
    first, second = snaps.snapshots
    assert first.count > second.count

    ticket = compile_model(retrain(model, first), learning_rate=0.05)
    ticket.fit(x, y, batch_size=64, epochs=1, verbose=0)
    sweep.reset_ticket(ticket, second)
    fresh = retrain(model, second)
    assert len(ticket.weights) == len(fresh.weights)
    for a, b in zip(ticket.weights, fresh.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.name)
    assert ticket.embedding_parameter_count() == second.count
    for var in sweep.optimizer_variables(ticket.optimizer):
        name = getattr(var, "path", None) or var.name
        if "learning_rate" in name:
            assert float(np.asarray(var)) == pytest.approx(0.05)
        else:
            assert not np.any(np.asarray(var)), name


TINY = {
    "data": {"source": "synthetic_ctr", "params": {"num_rows": 2000, "num_fields": 3, "seed": 4}},
    "model": {"name": "fm", "embedding_dim": 4},
    "embedding": {"scheme": "pep", "params": {"threshold_init": -4.0, "g_scale": 3.0,
                                               "threshold_regularizer": {"class_name": "L2",
                                                                         "config": {"l2": 1e-4}}}},
    "train": {"epochs": 1, "batch_size": 128, "verbose": 0},
}


def test_experiment_run_pep_section_reports_the_retrained_snapshot():
    cfg = dict(TINY, pep={"targets": [0.5], "search_epochs": 15, "search_learning_rate": 0.05})
    result = experiment.run(cfg)
    pep = result["pep"]
    assert pep["reached"], pep
    (snap,) = pep["snapshots"]
    assert snap["count"] == pep["nnz"] <= snap["target_count"] == pep["dense_count"] // 2
    assert result["embedding_parameters"] <= pep["nnz"]
    model = result["_model"]
    assert all(model.embedding_layers[n].retrain for n in model.embedding_names)
    assert result["train_seconds"] == pytest.approx(pep["search_seconds"] + pep["retrain_seconds"])
    assert 0.0 <= result["metrics"]["auc"] <= 1.0


def test_experiment_run_pep_unreached_target_is_flagged():
    cfg = dict(TINY, pep={"targets": [1], "search_epochs": 1})
    result = experiment.run(cfg)
    pep = result["pep"]
    assert not pep["reached"] and pep["unreached"][0]["target_count"] == 1
    assert result["embedding_parameters"] == pep["nnz"] > 1
    assert not any(result["_model"].embedding_layers[n].retrain for n in result["_model"].embedding_names)


def test_timing_only_on_synthetic_cf(tmp_path, monkeypatch):
    """``--timing-only``: fixed, the search (fused layout), the two-variable search and the fixed model at twice
    the dimension, interleaved; the ratios and the Markdown table come from the measured steps."""
    sweep = load_sweep()
    monkeypatch.setattr(sweep, "TIMING_ROUNDS", 2)
    monkeypatch.setattr(sweep, "TIMING_STEPS", 6)
    payload = sweep.run_timing(["synthetic_cf"], out=str(tmp_path), settings=fast_settings(sweep))
    (run,) = payload["runs"]
    bursts = run["interleaved"]
    assert set(bursts) == {"fixed", "pep", "pep_without_counts", "pep_two_variables", "fixed_double_dim"}
    for name, summary in bursts.items():
        assert summary["steps"] == 2 * (6 + 2 - 2), name  # two rounds, the first 2 steps of each left out
    np.testing.assert_allclose(run["ratio_amortised_two_variables"],
                               bursts["pep_two_variables"]["amortised_step_ms"] / bursts["fixed"]["amortised_step_ms"])
    np.testing.assert_allclose(run["ratio_amortised_fixed_double_dim"],
                               bursts["fixed_double_dim"]["amortised_step_ms"] / bursts["fixed"]["amortised_step_ms"])
    saved = json.loads((tmp_path / "pep_timing.json").read_text())
    assert saved["runs"][0]["ratio_amortised"] == run["ratio_amortised"]
    table = (tmp_path / "pep_timing.md").read_text()
    assert "two variables" in table and "fixed at 2·d0" in table and f"| synthetic_cf | cf | 0 | {bursts['fixed']['amortised_step_ms']:.2f} |" in table
