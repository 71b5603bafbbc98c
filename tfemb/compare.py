"""``tfemb compare``: every implemented scheme against the fixed baseline, at comparable budgets, one run."""

import os
import sys
import time

from tfemb import experiment, report

#: The main job on the embedded default dataset (synthetic Zipf CTR data; no download).
DEFAULT_COMPARE = {
    "name": "compare",
    "base": {
        "data": {"source": "synthetic_ctr", "params": {"num_rows": 60000, "seed": 0},
                 "split": {"method": "random", "fractions": [0.8, 0.1, 0.1], "seed": 0}},
        "model": {"name": "deepfm", "embedding_dim": 16},
        "train": {"epochs": 4, "batch_size": 512, "optimizer": "adam", "learning_rate": 0.002,
                  "embedding_optimizer": "adam",
                  "early_stopping": {"monitor": "val_auc", "patience": 1}, "verbose": 0},
    },
    "variants": [
        {"name": "fixed-16", "embedding": {"scheme": "fixed"}},
        {"name": "fixed-4 (uniform, 1/4 budget)", "model": {"embedding_dim": 4}, "embedding": {"scheme": "fixed"}},
        {"name": "hashing 4x", "embedding": {"scheme": "hashing", "params": {"compression": 4}}},
        {"name": "qr-mult 4x", "embedding": {"scheme": "qr", "params": {"compression": 4, "operation": "mult"}}},
        {"name": "double-hashing 4x", "embedding": {"scheme": "double_hashing", "params": {"compression": 4}}},
        # MD both ways: the paper's CTR setting (one block per field, dims across the fields) and its CF blocking
        # (popularity blocks within every field).
        {"name": "md per-field α=0.3 4x",
         "embedding": {"scheme": "md", "params": {"compression": 4, "alpha": 0.3, "blocking": "field"}}},
        {"name": "md α=0.3 4x", "embedding": {"scheme": "md", "params": {"compression": 4, "alpha": 0.3}}},
        # PEP: a search with a snapshot at 1/4 of the fixed parameters, then its lottery ticket retrained (the row
        # reports the retrained model; train s = search + retrain). Settings: benchmarks/README.md, "PEP evidence".
        {"name": "pep 4x (search+retrain)",
         "embedding": {"scheme": "pep", "params": {
             "threshold_init": -6.0, "g_scale": 3.0, "embeddings_initializer": "uniform",
             "threshold_regularizer": {"class_name": "L2", "config": {"l2": 1e-5}}}},
         "pep": {"targets": [0.25], "retrain": "rewind", "search_epochs": 6, "search_learning_rate": 0.01}},
    ],
    # The streaming methods (AutoEmb and its baselines, ESAPN) size the user and item ids of a CF network as the
    # stream arrives: a second table, on the embedded synthetic CF data in time order, test-then-train, one pass
    # (tfemb.streaming; benchmarks/streaming.py runs the same on MovieLens).
    "streaming": {
        "data": {"source": "synthetic_cf", "params": {"num_users": 1500, "num_items": 1000, "num_rows": 40000,
                                                      "seed": 0}},
        "task": "binary",
        "methods": ["fse", "darts", "sam", "autoemb", "esapn"],
        "candidates": [2, 4, 8, 16, 64, 128],
        "test_fraction": 0.25,
    },
}

COLUMNS_BY_TASK = {
    "binary": ["auc", "logloss"],
    "multiclass": ["accuracy", "cross_entropy"],
    "regression": ["mse", "mae"],
}


def run_compare(spec=None, out_dir="outputs/compare", log=print, export_budget=0.25):
    """Runs every variant on the same data split; writes compare.json, compare.md and compare.png.

    Then exports the best variant within ``export_budget`` of the fixed baseline's embedding parameters to
    ``<out_dir>/export/<name>/`` and prints how to serve and query it (``export_best``; ``export_budget=None``
    skips this). Only that variant's model is kept in memory while the others train.
    """
    spec = spec or DEFAULT_COMPARE
    base = experiment.merge(experiment.DEFAULTS, spec.get("base", {}))
    log(f"tfemb compare: preparing data ({base['data']['source']}) ...")
    prepared = experiment.prepare_data(base["data"])
    task = prepared.schema.task
    metric_names = COLUMNS_BY_TASK[task]
    log(f"  {prepared.num_rows('train'):,} train / {prepared.num_rows('val'):,} val / "
        f"{prepared.num_rows('test'):,} test rows; {len(prepared.schema.sparse_features)} sparse features, "
        f"{sum(f.vocabulary.size for f in prepared.schema.sparse_features):,} ids")
    results = []
    kept = []  # [result, model or None]: only the model export_best may pick is kept
    variants = spec["variants"]
    for i, variant in enumerate(variants, 1):
        cfg = experiment.merge(base, {k: v for k, v in variant.items() if k != "name"})
        cfg["name"] = variant["name"]
        start = time.perf_counter()
        log(f"[{i}/{len(variants)}] {variant['name']}: training {cfg['model']['name']} ...")
        result = experiment.run(cfg, prepared=prepared, log=log)
        model = result.pop("_model")
        if export_budget is not None:
            kept = _keep_best_model(kept + [[result, model]], export_budget)
        del model
        log(f"        done in {time.perf_counter() - start:.1f}s: "
            + ", ".join(f"{m}={result['metrics'].get(m, float('nan')):.4f}" for m in metric_names)
            + f", {result['embedding_parameters']:,} embedding parameters")
        results.append(result)

    rows = []
    for r in results:
        unreached = (r.get("pep") or {}).get("reached") is False  # the searched model, not a retrained ticket
        row = {"variant": r["name"] + (" [PEP target not reached: searched model]" if unreached else "")}
        row.update({m: r["metrics"].get(m, float("nan")) for m in metric_names})
        row.update({"emb params": r["embedding_parameters"], "emb bytes": r["embedding_bytes"],
                    "train s": f"{r['train_seconds']:.1f}", "epochs": r["epochs"]})  # one decimal in every row
        rows.append(row)
    os.makedirs(out_dir, exist_ok=True)
    payload = {"spec": spec, "task": task, "results": results}
    report.write_json(os.path.join(out_dir, "compare.json"), payload)
    md = f"# tfemb compare ({base['data']['source']}, {base['model']['name']})\n\n" + report.markdown_table(rows)
    with open(os.path.join(out_dir, "compare.md"), "w") as fh:
        fh.write(md)
    quality = metric_names[0]
    report.scatter_plot(
        os.path.join(out_dir, "compare.png"),
        [(r["name"], r["embedding_bytes"], r["metrics"].get(quality, float("nan"))) for r in results],
        "embedding bytes (log scale)", f"test {quality}",
        f"{base['model']['name']} on {base['data']['source']}: {quality} vs embedding size",
    )
    log("")
    log(report.console_table(rows))
    log("")
    log(f"wrote {out_dir}/compare.json, compare.md, compare.png")
    if spec.get("streaming"):
        stream = payload["streaming"] = run_streaming(spec["streaming"], log=log)
        with open(os.path.join(out_dir, "compare.md"), "a") as fh:
            fh.write("\n" + stream["markdown"])
        report.write_json(os.path.join(out_dir, "compare.json"), {k: v for k, v in payload.items() if not k.startswith("_")})
        from tfemb.streaming import LABELS, QUALITY

        q = QUALITY[spec["streaming"].get("task", "binary")][0]
        report.scatter_plot(
            os.path.join(out_dir, "compare_streaming.png"),
            [(LABELS[r["method"]], r["embedding_bytes"], r["test"][q]) for r in stream["runs"]],
            "embedding bytes of the export (log scale)", f"test-period {q}",
            f"CF network on {spec['streaming']['data']['source']}, streamed: {q} vs embedding size",
        )
        log(f"appended the streaming table to {out_dir}/compare.md and compare.json; plot compare_streaming.png")
    if export_budget is not None:
        exported = export_best(kept, budget_fraction=export_budget, out_dir=out_dir, rows=prepared.frames["test"],
                               log=log)
        kept = None
        if exported is not None:
            payload["_export_model"] = exported.pop("_model")
            payload["export"] = exported
            report.write_json(os.path.join(out_dir, "compare.json"),
                              {k: v for k, v in payload.items() if not k.startswith("_")})
    return payload


def run_streaming(spec, log=print):
    """The streaming table of the main job: each method of ``spec["methods"]`` streamed once over the same
    time-ordered CF data (``tfemb.streaming.run_method``). Returns ``{"rows", "runs", "markdown", "data"}``."""
    from tfemb import streaming

    task = spec.get("task", "binary")
    data = spec["data"]
    log("")
    log(f"tfemb compare, streaming: preparing {data['source']} in time order ...")
    schema, x, y, info = streaming.prepare_stream(data["source"], data.get("params"), task)
    log(f"  {info['rows']:,} rows, {info['users']:,} users, {info['items']:,} items; test-then-train, one pass, "
        f"quality over the last {spec.get('test_fraction', 0.25):.0%}")
    q1, q2 = streaming.QUALITY[task]
    rows, runs = [], []
    for i, method in enumerate(spec["methods"], 1):
        log(f"[{i}/{len(spec['methods'])}] {streaming.LABELS[method]}: streaming ...")
        r = streaming.run_method(method, schema, x, y, task, candidates=spec.get("candidates", streaming.ESAPN_CANDIDATES),
                                 test_fraction=spec.get("test_fraction", 0.25))
        r.pop("model")
        runs.append({k: v for k, v in r.items() if k != "by_frequency"})
        log(f"        done in {r['seconds']:.1f}s: {q1}={r['test'][q1]:.4f}, {q2}={r['test'][q2]:.4f}, "
            f"{r['embedding_parameters']:,} embedding parameters")
        rows.append({"method": streaming.LABELS[method], f"test {q1}": r["test"][q1], f"test {q2}": r["test"][q2],
                     "emb params": r["embedding_parameters"], "emb bytes": r["embedding_bytes"],
                     "mean dim (users/items)": " / ".join(f"{v:.1f}" for v in r["mean_dim"].values()) or "fixed",
                     "examples/s": round(r["examples_per_second"]), "stream s": f"{r['seconds']:.1f}"})
    fse = next((r for r in runs if r["method"] == "fse"), None)
    if fse:
        for row, r in zip(rows, runs):
            row["time/example vs FSE"] = f"{fse['examples_per_second'] / r['examples_per_second']:.2f}x"
    log("")
    log(report.console_table(rows))
    md = (f"## Streaming ({data['source']}, CF network, {task}; test-then-train, one pass, quality over the last "
          f"{spec.get('test_fraction', 0.25):.0%} of the stream)\n\n" + report.markdown_table(rows))
    return {"rows": rows, "runs": runs, "markdown": md, "data": info}


def main(out_dir="outputs/compare", spec=None):
    run_compare(spec, out_dir=out_dir, log=lambda msg: (print(msg), sys.stdout.flush()))


# ------------------------------------------------------------------------------------------ export the best
#: Quality metric of each task (the first of COLUMNS_BY_TASK) and whether higher is better.
_QUALITY = (("auc", True), ("accuracy", True), ("mse", False))


def _quality(result):
    """``(metric, value, higher_is_better)`` of a result, or None when it has no finite quality metric."""
    for name, higher in _QUALITY:
        value = result["metrics"].get(name)
        if value is not None and value == value:
            return name, float(value), higher
    return None


def select_best(results, budget_fraction=0.25):
    """``(index of the best result, baseline result, budget)`` or None.

    The baseline is the first result with the ``fixed`` scheme (the main job lists it first); the candidates are
    the results whose ``embedding_parameters`` are at most ``budget_fraction`` x the baseline's; the best has the
    best quality (AUC, accuracy: highest; MSE: lowest). None when there is no baseline or no candidate.
    """
    baseline = next((r for r in results if r.get("scheme") == "fixed"), None)
    if baseline is None:
        return None
    budget = budget_fraction * baseline["embedding_parameters"]
    best, best_key = None, None
    for i, r in enumerate(results):
        q = _quality(r)
        if q is None or r["embedding_parameters"] > budget:
            continue
        key = q[1] if q[2] else -q[1]
        if best_key is None or key > best_key:
            best, best_key = i, key
    return None if best is None else (best, baseline, budget)


def _keep_best_model(pairs, budget_fraction):
    """``pairs`` (``[result, model]``) with every model dropped that ``export_best`` cannot pick any more.

    Until the baseline has been trained every model is kept (its budget is unknown); after that only the best
    candidate's.
    """
    results = [r for r, _ in pairs]
    if not any(r.get("scheme") == "fixed" for r in results):
        return pairs
    chosen = select_best(results, budget_fraction)
    return [[r, m if chosen is not None and i == chosen[0] else None] for i, (r, m) in enumerate(pairs)]


def _slug(text):
    """An ASCII model name for URLs and directories: ``"md α=0.3 4x"`` -> ``"md_0_3_4x"``."""
    out = "".join(c if (c.isascii() and c.isalnum()) or c in "-_" else "_" for c in str(text).strip().lower())
    while "__" in out:
        out = out.replace("__", "_")
    return out.strip("_-") or "model"


def export_best(results_and_models, budget_fraction=0.25, out_dir="outputs/compare", rows=None, log=print):
    """Exports the best variant within a budget for TF Serving and prints how to serve and query it.

    Picks, among the variants whose embedding parameters are at most ``budget_fraction`` x the fixed baseline's
    (the first ``fixed`` variant), the one with the best test quality (``select_best``), exports its model with
    ``tfemb.export.export_saved_model`` to ``<out_dir>/export/<name>/<version>/`` (the next free version) and
    prints the ``tfemb serve`` command, a curl REST predict request with one real row's raw values and the
    Python ``Client`` calls.

    Args:
        results_and_models: ``(result, model)`` pairs (``experiment.run`` results, ``model`` its ``_model`` or
            None when it was not kept); the chosen variant's model must be there.
        budget_fraction: the budget as a fraction of the baseline's embedding parameters.
        out_dir: the compare output directory.
        rows: raw rows (a DataFrame with the training columns, e.g. the test split): the export's warm-up
            requests and the row of the printed examples. Without it, no warm-up and an example from the
            vocabularies' most frequent values.
        log: where the lines go.

    Returns:
        None when nothing fits the budget, else a dict: ``variant``, ``name`` (the served model name),
        ``export_dir``, ``path`` (the version directory), ``metric``, ``value``, ``embedding_parameters``,
        ``baseline`` and its ``baseline_embedding_parameters``, ``budget_fraction``, ``commands`` (``serve``,
        ``curl``, ``python``) and ``_model`` (the exported Keras model).
    """
    from tfemb.export import export_saved_model
    from tfemb.export.commands import log_serving_commands, serving_commands

    pairs = [tuple(p) for p in results_and_models]
    chosen = select_best([r for r, _ in pairs], budget_fraction)
    if chosen is None:
        log(f"no variant within {budget_fraction:.0%} of a fixed baseline's embedding parameters: nothing exported")
        return None
    index, baseline, _ = chosen
    result, model = pairs[index]
    if model is None:
        raise ValueError(f"export_best: the model of the best variant {result['name']!r} was not kept")
    metric, value, _ = _quality(result)
    name = _slug(f"{result['model']}_{result['name']}")
    export_dir = os.path.join(out_dir, "export", name)
    warmup = None if rows is None else rows.head(64)
    path = export_saved_model(model, export_dir, warmup_rows=warmup)

    commands = serving_commands(model, export_dir, name=name, rows=rows)
    share = result["embedding_parameters"] / max(baseline["embedding_parameters"], 1)
    log("")
    log(f"Best variant within {budget_fraction:.0%} of {baseline['name']}'s embedding parameters: "
        f"{result['name']} ({metric}={value:.4f}, {result['embedding_parameters']:,} embedding parameters, "
        f"{share:.1%} of {baseline['name']})")
    log(f"exported to {path}")
    log("")
    log_serving_commands(commands, log)
    return {"variant": result["name"], "name": name, "export_dir": export_dir, "path": path, "metric": metric,
            "value": value, "embedding_parameters": result["embedding_parameters"], "baseline": baseline["name"],
            "baseline_embedding_parameters": baseline["embedding_parameters"], "budget_fraction": budget_fraction,
            "commands": commands, "_model": model}
