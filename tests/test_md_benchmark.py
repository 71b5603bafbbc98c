"""benchmarks/md_sweep.py end to end on the embedded synthetic CF data (no files needed), small sizes."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load_benchmark(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def md_sweep():
    return _load_benchmark("md_sweep")


def test_md_sweep_on_synthetic_cf(md_sweep, tmp_path):
    budgets = ["1/8", "1/4"]
    payload = md_sweep.main([
        "--datasets", "synthetic", "--tasks", "binary", "--alphas", "0.3", "--budgets", ",".join(budgets),
        "--epochs", "1", "--throughput-repeats", "0", "--out", str(tmp_path),
    ])
    saved = json.loads((tmp_path / "md_sweep.json").read_text())
    assert set(saved) >= {"meta", "settings", "runs", "throughput", "dims", "skipped"}
    assert saved["meta"]["alphas"] == [0.3] and saved["meta"]["budgets"] == budgets
    runs = saved["runs"]
    assert len(runs) == len(payload["runs"]) == 2 * len(budgets)  # uniform + MD per budget
    d0 = md_sweep.DATASETS["synthetic"]["d0"]
    for budget in budgets:
        num, den = map(int, budget.split("/"))
        dim = d0 * num // den
        group = [r for r in runs if r["uniform_dim"] == dim]
        uniform = next(r for r in group if r["kind"] == "uniform")
        md = next(r for r in group if r["kind"] == "md")
        # The paper's comparison: uniform tables of dim d in a model of dim d; MD keeps d0 with projections.
        assert uniform["embedding_dim"] == dim and md["embedding_dim"] == d0 and md["alpha"] == 0.3
        assert md["trained"] and uniform["trained"]
        # Equal budgets: the actual counts (projections included) within 10% of each other. Failable: the
        # budget-form solver can fall short by a whole dim of a large block.
        ratio = md["embedding_parameters"] / uniform["embedding_parameters"]
        assert abs(ratio - 1) <= 0.10, (budget, md["embedding_parameters"], uniform["embedding_parameters"])
        assert md["params_ratio_to_uniform"] == pytest.approx(ratio)
        for r in (uniform, md):
            assert set(r["metrics"]) == {"auc", "logloss", "accuracy", "mse"}
            assert 0.0 <= r["metrics"]["auc"] <= 1.0 and r["metrics"]["logloss"] > 0
            assert r["per_seed"][0]["epochs"] == 1
        # MD really mixes dims: every block <= d0, some below it, the most popular block the widest.
        for table in md["tables"]:
            dims = table["block_dims"]
            assert max(dims) <= d0 and min(dims) < d0 and dims[0] == max(dims)
        assert sum(t["parameters"] for t in md["tables"]) == md["embedding_parameters"]
    # Dims vs popularity: never wider for a less popular id.
    for feature in ("user_id", "item_id"):
        blocks = saved["dims"]["synthetic"]["features"][feature]["alphas"]["0.3"]
        dims = md_sweep.dims_by_rank(blocks["block_sizes"], blocks["block_dims"])
        assert np.all(np.diff(dims) <= 0)
    text = (tmp_path / "md_sweep.md").read_text()
    assert "## synthetic / binary" in text and "| budget | uniform dim | uniform params | uniform auc |" in text
    for png in ("md_quality_vs_params.png", "md_dims_vs_popularity.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_budget_dims_and_missing_data(md_sweep, tmp_path, monkeypatch):
    from fractions import Fraction

    # Fractions that round to the same uniform dim share one run; the smallest dim is 1.
    assert md_sweep.budget_dims([Fraction(1, 64), Fraction(1, 16), Fraction(1, 2)], 16) == [
        (1, [Fraction(1, 64), Fraction(1, 16)]), (8, [Fraction(1, 2)])]
    # A real dataset whose folder is absent is skipped with a message, not an error.
    monkeypatch.setenv("TFEMB_DATA_DIR", str(tmp_path / "nowhere"))
    payload = md_sweep.main(["--datasets", "criteo", "--throughput-repeats", "0", "--no-plots",
                             "--out", str(tmp_path / "out")])
    assert payload["runs"] == [] and "criteo" in payload["skipped"][0] and "absent" in payload["skipped"][0]


def test_throughput_only_measures_both_md_lookups(md_sweep, tmp_path):
    """``--throughput-only``: fixed, MD at a 4x smaller budget (default lookup), uniform d0/4 and the same MD
    model on the per-id gather path, in one process; ratios from the measured epochs."""
    payload = md_sweep.main(["--datasets", "synthetic", "--tasks", "binary", "--throughput-only",
                             "--throughput-repeats", "1", "--out", str(tmp_path)])
    t = payload["throughput"]["synthetic"]
    names = [r["variant"] for r in t["runs"]]
    assert names[0] == "fixed d0" and names[2] == "uniform d0/4" and names[3].endswith("per-id gather lookup")
    fixed, md, _, gather = t["runs"]
    assert md["embedding_parameters"] == gather["embedding_parameters"] <= fixed["embedding_parameters"] / 3
    assert all(r["examples_per_second"] > 0 and len(r["epoch_seconds"]) == 1 for r in t["runs"])
    assert t["md_over_fixed"] == pytest.approx(md["examples_per_second"] / fixed["examples_per_second"])
    assert t["md_gather_over_fixed"] == pytest.approx(gather["examples_per_second"] / fixed["examples_per_second"])
    assert t["target_met"] == (t["md_over_fixed"] >= 1)
    saved = json.loads((tmp_path / "md_sweep.json").read_text())
    assert saved["throughput"]["synthetic"]["md_gather_over_fixed"] == pytest.approx(t["md_gather_over_fixed"])


def test_md_ablation_on_synthetic_cf(tmp_path):
    """The four ablation models at one budget: uniform, one projected block, MD's blocks at equal dims, MD."""
    ablation = _load_benchmark("md_ablation")
    payload = ablation.main(["--datasets", "synthetic", "--tasks", "binary", "--budgets", "1/4", "--model-l2",
                             "recipe", "--seeds", "1", "--epochs", "1", "--no-plots", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "md_ablation.json").read_text())
    assert [r["variant"] for r in saved["runs"]] == list(ablation.VARIANTS) == [r["variant"] for r in payload["runs"]]
    by = {r["variant"]: r for r in saved["runs"]}
    d0 = ablation.md_sweep.DATASETS["synthetic"]["d0"]
    dim = d0 // 4
    assert all(r["uniform_dim"] == dim and r["metric"] == "auc" and 0 <= r["mean"] <= 1 for r in by.values())
    assert by["uniform"]["block_dims"] == [None, None]  # fixed tables
    assert by["projected uniform"]["block_dims"] == [[dim], [dim]]
    equal, md = by["MD blocks, equal dims"]["block_dims"], by["MD"]["block_dims"]
    assert all(dims == [dim] * len(dims) and len(dims) > 1 for dims in equal)
    assert all(len(m) == len(e) and len(set(m)) > 1 and m[0] == max(m) for m, e in zip(md, equal))  # mixed, popular first
    # Parameters: the projections come on top of the uniform tables, except for MD, solved for the same count.
    uniform = by["uniform"]["embedding_parameters"]
    assert by["projected uniform"]["embedding_parameters"] == uniform + 2 * dim * d0
    assert by["MD blocks, equal dims"]["embedding_parameters"] == uniform + sum(len(e) * dim * d0 for e in equal)
    assert abs(by["MD"]["embedding_parameters"] / uniform - 1) <= 0.10
    text = (tmp_path / "md_ablation.md").read_text()
    assert "## synthetic / binary, model L2 recipe, budget 1/4" in text and text.count("| MD |") == 1
    # --replot rewrites the Markdown from the JSON, with a findings section, without training.
    notes = tmp_path / "findings.md"
    notes.write_text("The dimension rule helps here.")
    again = ablation.main(["--replot", "--findings", str(notes), "--no-plots", "--out", str(tmp_path)])
    assert again["runs"] == saved["runs"]
    assert (tmp_path / "md_ablation.md").read_text().endswith("## Findings\n\nThe dimension rule helps here.\n")


def test_md_ablation_arguments_are_checked():
    ablation = _load_benchmark("md_ablation")
    with pytest.raises(SystemExit):
        ablation.parse_args(["--datasets", "criteo"])  # a CTR dataset: the ablation is about CF blocks
    with pytest.raises(SystemExit):
        ablation.parse_args(["--model-l2", "none"])
    with pytest.raises(SystemExit):
        ablation.parse_args(["--alpha", "0"])


def test_md_ablation_tune_reports_the_validation_choice(tmp_path, monkeypatch):
    """--tune trains every grid point and reports the one with the best validation metric, never the best test."""
    ablation = _load_benchmark("md_ablation")
    calls = []

    def fake_fit_eval(spec, prepared, task, factory, embedding_dim, settings, seed, args):
        lr, l2 = settings["train"]["learning_rate"], settings["model_params"]["l2"]
        calls.append((lr, l2, seed))
        # Validation AUC peaks at lr 0.01, L2 0.3; test AUC is best where validation is worst.
        validation = 0.7 - abs(lr - 0.01) - abs(l2 - 0.3) + 0.001 * seed
        return {"metrics": {"auc": 1.4 - validation}, "validation": validation, "embedding_parameters": 7,
                "best_epoch": 1 + seed, "tables": [{}]}

    monkeypatch.setattr(ablation.md_sweep, "fit_eval", fake_fit_eval)
    payload = ablation.main(["--datasets", "synthetic", "--tasks", "binary", "--budgets", "1/4", "--tune",
                             "--lrs", "0.003,0.01,0.03", "--model-l2", "0.1,0.3", "--seeds", "2", "--no-plots",
                             "--out", str(tmp_path)])
    grid = {(lr, l2) for lr in (0.003, 0.01, 0.03) for l2 in (0.1, 0.3)}
    assert sorted(calls) == sorted((lr, l2, s) for lr, l2 in grid for s in (0, 1) for _ in ablation.VARIANTS)
    assert [r["variant"] for r in payload["runs"]] == list(ablation.VARIANTS)
    for row in payload["runs"]:
        assert (row["learning_rate"], row["model_l2_value"]) == (0.01, 0.3)
        assert row["model_l2"] == "tuned" and len(row["grid"]) == 6
        assert row["validation_mean"] == pytest.approx(0.7005)
        assert row["mean"] == pytest.approx(1.4 - 0.7005) and row["values"] == pytest.approx([0.7, 0.699])
        assert row["mean"] < max(point["test_mean"] for point in row["grid"])  # a test-based choice would differ
    text = (tmp_path / "md_ablation.md").read_text()
    assert "## synthetic / binary, tuned on validation, budget 1/4" in text
    assert text.count("| lr 0.01, L2 0.3 |") == 4 and "**Tuned**" in text
    # A loss monitored for its minimum picks the lowest validation value.
    tried = [{"validation_mean": 0.3}, {"validation_mean": 0.2}, {"validation_mean": 0.2}]
    assert ablation.select(tried, "min") is tried[1] and ablation.select(tried, "max") is tried[0]


def test_md_ablation_learning_rates_are_checked():
    ablation = _load_benchmark("md_ablation")
    assert ablation.parse_args([]).lrs == [None]  # the recipe's
    assert ablation.parse_args(["--lrs", "0.02"]).lrs == [0.02]
    for bad in (["--lrs", "0.01,0.03"], ["--lrs", "fast", "--tune"], ["--lrs", "0", "--tune"]):
        with pytest.raises(SystemExit):
            ablation.parse_args(bad)
