"""``tfemb compare``: every implemented scheme against the fixed baseline, at comparable budgets, one run."""

import math
import os
import sys
import time

from tfemb import experiment, report
from tfemb.errors import DataError

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
        # DHE: no tables, a network per field sized to the budget; fields whose budget cannot hold hidden layers of
        # 16 units (the five smallest here) keep a hashing table at the same compression.
        {"name": "dhe 4x (k=256, 2 layers)",
         "embedding": {"scheme": "dhe", "params": {"compression": 4, "num_hashes": 256, "num_hidden_layers": 2,
                                                   "min_width": 16, "fallback": "hashing"}}},
        # AutoDis (the numeric features I1, I2 as fields, softly discretised into 20 meta-embeddings each) beside
        # the fixed tables: its parameters are not in the embedding columns, which count the id tables.
        {"name": "fixed-16 + AutoDis numeric", "embedding": {"scheme": "fixed"},
         "numeric_embedding": {"scheme": "autodis", "params": {"num_buckets": 20}}},
        # ALPT: the fixed-16 tables trained as 8-bit codes with learned per-row step sizes (LowPrecisionEmbedding);
        # as many parameters as fixed-16, about a third of its bytes (1 byte a code + a float32 step per row).
        {"name": "alpt 8-bit", "embedding": {"scheme": "low_precision", "params": {"bits": 8}}},
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

#: Keys a compare spec may hold (``check_spec``), and those of its ``streaming`` section.
SPEC_KEYS = ("name", "base", "variants", "streaming")
STREAMING_KEYS = ("data", "task", "methods", "candidates", "test_fraction")
#: ``tfemb compare --quick``: rows of a synthetic source (at most) and epochs (``quick_spec``).
QUICK_ROWS, QUICK_EPOCHS = 8000, 1
_SYNTHETIC_SOURCES = ("synthetic_ctr", "synthetic_cf")

COLUMNS_BY_TASK = {
    "binary": ["auc", "logloss"],
    "multiclass": ["accuracy", "cross_entropy"],
    "regression": ["mse", "mae"],
}


def check_spec(spec, where="compare spec"):
    """``DataError`` naming the key and the value for a compare spec that could not run to its end, raised before
    any data is read or any model trained (a typo in the last variant used to surface only after the others had
    trained): a spec that is not a mapping, an unknown top-level key, no ``variants`` or a variant without a
    unique ``name``, a variant whose recipe ``experiment.check_config`` refuses (unknown keys, non-positive
    sizes), an unknown model or scheme name, a ``pep`` / ``autoemb`` section without its scheme, and a
    ``streaming`` section with unknown keys, methods or task, candidates that are not ints >= 1 or a
    ``test_fraction`` outside (0, 1). Returns the variants' recipes, merged with ``base`` and the defaults."""
    from tfemb.layers.factory import get_scheme_class
    from tfemb.models import get_model_class

    if not isinstance(spec, dict):
        raise DataError(f"{where} must be a mapping with 'base' and 'variants'. Received: {type(spec).__name__}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise DataError(f"{where}: unknown top-level key(s) {unknown}; known: {list(SPEC_KEYS)}")
    base = spec.get("base") or {}
    if not isinstance(base, dict):
        raise DataError(f"{where}: base must be a mapping. Received: base={base!r}")
    variants = spec.get("variants")
    if not isinstance(variants, list) or not variants:
        raise DataError(f"{where}: variants must be a non-empty list of mappings. Received: variants={variants!r}")
    base = experiment.merge(experiment.DEFAULTS, base)
    cfgs, names = [], set()
    for i, variant in enumerate(variants, 1):
        if not isinstance(variant, dict):
            raise DataError(f"{where}: variant {i} must be a mapping. Received: {variant!r}")
        name = variant.get("name")
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{where}: variant {i} needs a name (a non-empty string). Received: name={name!r}")
        if name in names:
            raise DataError(f"{where}: variant names must be unique. Received: name={name!r} twice")
        names.add(name)
        cfg = experiment.merge(base, {k: v for k, v in variant.items() if k != "name"})
        cfg["name"] = name
        vwhere = f"{where}, variant {name!r}"
        try:
            experiment.check_config(cfg, where=vwhere)
        except DataError as exc:  # some of its messages do not say where
            raise DataError(str(exc) if str(exc).startswith(vwhere) else f"{vwhere}: {exc}") from None
        try:
            get_model_class(cfg["model"]["name"])
            get_scheme_class(cfg["embedding"].get("scheme", "fixed"))
        except ValueError as exc:
            raise DataError(f"{vwhere}: {exc}") from None
        if "data" in variant and cfg["data"] != base["data"]:
            # The data is prepared once, from base: a variant's own data section would be silently ignored.
            raise DataError(f"{vwhere}: every variant trains on the base's data, which is prepared once; move the "
                            f"data section to base (or run another spec). Received: data={variant['data']!r}")
        numeric = cfg.get("numeric_embedding")
        if numeric:
            from tfemb.layers.factory import NUMERIC_SCHEMES

            if numeric.get("scheme") not in NUMERIC_SCHEMES:
                raise DataError(f"{vwhere}: numeric_embedding.scheme must be one of {sorted(NUMERIC_SCHEMES)}. "
                                f"Received: scheme={numeric.get('scheme')!r}")
        scheme = cfg["embedding"].get("scheme", "fixed")
        for section, needs in (("pep", "pep"), ("autoemb", "autoemb")):
            if cfg.get(section) and scheme != needs:
                raise DataError(f"{vwhere}: {section} needs embedding.scheme {needs!r}. Received: scheme={scheme!r}")
        cfgs.append(cfg)
    stream = spec.get("streaming")
    if stream:
        from tfemb import streaming

        if not isinstance(stream, dict):
            raise DataError(f"{where}: streaming must be a mapping. Received: streaming={stream!r}")
        unknown = sorted(set(stream) - set(STREAMING_KEYS))
        if unknown:
            raise DataError(f"{where}: unknown key(s) {', '.join('streaming.' + k for k in unknown)}; known: "
                            f"{list(STREAMING_KEYS)}")
        if not isinstance(stream.get("data"), dict) or "source" not in stream["data"]:
            raise DataError(f"{where}: streaming.data must be a mapping with a source. "
                            f"Received: data={stream.get('data')!r}")
        task = stream.get("task", "binary")
        if task not in streaming.QUALITY:
            raise DataError(f"{where}: streaming.task must be one of {sorted(streaming.QUALITY)}. "
                            f"Received: task={task!r}")
        methods = stream.get("methods")
        if not isinstance(methods, list) or not methods or any(m not in streaming.METHODS for m in methods):
            raise DataError(f"{where}: streaming.methods must be a non-empty list of {list(streaming.METHODS)}. "
                            f"Received: methods={methods!r}")
        candidates = stream.get("candidates", list(streaming.ESAPN_CANDIDATES))
        if not isinstance(candidates, (list, tuple)) or not candidates or any(
                isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in candidates):
            raise DataError(f"{where}: streaming.candidates must be a non-empty list of ints >= 1. "
                            f"Received: candidates={candidates!r}")
        fraction = stream.get("test_fraction", 0.25)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
            raise DataError(f"{where}: streaming.test_fraction must be a number in (0, 1). "
                            f"Received: test_fraction={fraction!r}")
    return cfgs


def quick_spec(spec=None):
    """The spec of ``tfemb compare --quick``: ``QUICK_EPOCHS`` epoch(s), and at most ``QUICK_ROWS`` rows when the
    CTR data is synthetic (``num_rows`` is a parameter of the synthetic sources only; others keep their rows).
    The streaming section is kept as it is."""
    spec = experiment.merge(spec or DEFAULT_COMPARE, {})
    check_spec(spec)
    base = spec.get("base") or {}
    quick = {"train": {"epochs": QUICK_EPOCHS}}
    data = base.get("data") or {}
    if data.get("source", experiment.DEFAULTS["data"]["source"]) in _SYNTHETIC_SOURCES:
        rows = (data.get("params") or {}).get("num_rows")
        quick["data"] = {"params": {"num_rows": min(rows, QUICK_ROWS) if isinstance(rows, int) else QUICK_ROWS}}
    spec["base"] = experiment.merge(base, quick)
    for variant in spec["variants"]:  # a variant's own epochs would undo --quick
        if isinstance(variant.get("train"), dict) and "epochs" in variant["train"]:
            variant["train"]["epochs"] = QUICK_EPOCHS
    return spec


def _prepare_out_dir(out_dir, log):
    """Creates ``out_dir`` before any training (a path that is a file fails now, not after the last variant),
    says when it holds an earlier run's results (replaced; the export is added as a new version), and removes
    the earlier streaming plot, which a spec without streaming would otherwise leave beside the new tables."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"out_dir {out_dir} is a file, not a directory")
    os.makedirs(out_dir, exist_ok=True)
    earlier = [f for f in ("compare.json", "compare.md", "compare.png", "compare_streaming.png")
               if os.path.exists(os.path.join(out_dir, f))]
    if earlier:
        log(f"tfemb compare: {out_dir} holds an earlier run: {', '.join(earlier)} will be replaced; the export is added as a "
            "new version of its model")
    stale = os.path.join(out_dir, "compare_streaming.png")
    if os.path.exists(stale):
        os.remove(stale)


def run_compare(spec=None, out_dir="outputs/compare", log=print, export_budget=0.25):
    """Runs every variant on the same data split; writes compare.json, compare.md and compare.png.

    Then exports the best variant within ``export_budget`` of the fixed baseline's embedding parameters to
    ``<out_dir>/export/<name>/`` and prints how to serve and query it (``export_best``; ``export_budget=None``
    skips this). Only that variant's model is kept in memory while the others train.

    The spec is checked (``check_spec``) and ``out_dir`` created before any data is read; every variant's model
    is built once on the prepared schema before the first one trains, so a bad scheme parameter fails at once.
    An earlier run's files in ``out_dir`` are replaced.
    """
    spec = DEFAULT_COMPARE if spec is None else spec
    cfgs = check_spec(spec)
    base = experiment.merge(experiment.DEFAULTS, spec.get("base") or {})
    _prepare_out_dir(out_dir, log)
    log(f"tfemb compare: preparing data ({base['data']['source']}) ...")
    prepared = experiment.prepare_data(base["data"])
    for cfg in cfgs:  # scheme and model parameters, checked on the schema before any training
        experiment.build_model(prepared.schema, cfg["model"], cfg["embedding"], cfg["train"], cfg.get("numeric_embedding"))
    task = prepared.schema.task
    metric_names = COLUMNS_BY_TASK[task]
    log(f"  {prepared.num_rows('train'):,} train / {prepared.num_rows('val'):,} val / "
        f"{prepared.num_rows('test'):,} test rows; {len(prepared.schema.sparse_features)} sparse features, "
        f"{sum(f.vocabulary.size for f in prepared.schema.sparse_features):,} ids")
    results = []
    kept = []  # [result, model or None]: only the model export_best may pick is kept
    variants = spec["variants"]
    for i, (variant, cfg) in enumerate(zip(variants, cfgs), 1):
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
        if any(x.get("val_metrics") for x in results):  # what the export's choice reads (select_best)
            row[f"val {metric_names[0]}"] = (r.get("val_metrics") or {}).get(metric_names[0], float("nan"))
        row.update({"emb params": r["embedding_parameters"], "emb bytes": r["embedding_bytes"],
                    "train s": f"{r['train_seconds']:.1f}", "epochs": _epochs_cell(r)})  # one decimal in every row
        rows.append(row)
    os.makedirs(out_dir, exist_ok=True)
    payload = {"spec": spec, "task": task, "results": results}
    report.write_json(os.path.join(out_dir, "compare.json"), payload)
    md = f"# tfemb compare ({base['data']['source']}, {base['model']['name']})\n\n" + report.markdown_table(rows)
    with open(os.path.join(out_dir, "compare.md"), "w") as fh:
        fh.write(md)
    quality = metric_names[0]
    searched = [r["name"] for r in results if (r.get("pep") or {}).get("reached") is False]
    report.scatter_plot(  # a PEP point that is the searched model says so, as its table row (short: a footnote)
        os.path.join(out_dir, "compare.png"),
        [(r["name"] + (" †" if r["name"] in searched else ""), r["embedding_bytes"],
          r["metrics"].get(quality, float("nan"))) for r in results],
        "embedding bytes (log scale)", f"test {quality}",
        f"{base['model']['name']} on {base['data']['source']}: {quality} vs embedding size",
        note="† PEP target not reached: the searched model, not a retrained ticket" if searched else None,
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
        earlier = os.path.join(out_dir, "export")
        if exported is None and os.path.isdir(earlier) and os.listdir(earlier):
            log(f"(the exports under {earlier}: {', '.join(sorted(os.listdir(earlier)))} are from an earlier run)")
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
                     # the hard export's predictions vs the soft model's on the test rows (what the size column
                     # costs in fidelity); FSE and ESAPN export the model that streamed
                     "export = model": _export_fidelity(r.get("hard_vs_soft")),
                     "examples/s": _finite_round(r["examples_per_second"]), "stream s": f"{r['seconds']:.1f}"})
    fse = next((r for r in runs if r["method"] == "fse"), None)
    if fse:
        for row, r in zip(rows, runs):
            ratio = fse["examples_per_second"] / r["examples_per_second"] if r["examples_per_second"] else math.nan
            # a stream too short for a timed batch after the warm-up has no speed
            row["time/example vs FSE"] = f"{ratio:.2f}x" if math.isfinite(ratio) else "n/a"
    log("")
    log(report.console_table(rows))
    md = (f"## Streaming ({data['source']}, CF network, {task}; test-then-train, one pass, quality over the last "
          f"{spec.get('test_fraction', 0.25):.0%} of the stream)\n\n" + report.markdown_table(rows)
          + "\nemb params / emb bytes / mean dim: the export at the sizes each search chose. test accuracy / mse: "
            "the model's test-then-train quality during the stream (for DARTS, SAM and AutoEmb the soft mixture of "
            "the candidates; compare.json holds the hard export's on the same rows as streaming.runs[].hard_test). "
            "export = model: for those three, the share of test rows where the hard export (each id at its "
            "highest-weighted size) predicts what the soft model predicts (the same class; binary: the same side "
            "of 0.5); FSE and ESAPN export the model that streamed. "
            "examples/s: after the warm-up batches (what time/example vs FSE compares); stream s: the whole "
            "stream's wall time, warm-up and tracing included.\n")
    return {"rows": rows, "runs": runs, "markdown": md, "data": info}


def _epochs_cell(result):
    """The table's epochs: a retrained PEP ticket shows ``search + retrain`` epochs, as its train s counts both."""
    pep = result.get("pep") or {}
    if pep.get("reached") and "search_epochs" in pep:
        return f"{pep['search_epochs']}+{result['epochs']}"
    return result["epochs"]


def _export_fidelity(hard_vs_soft):
    """The streaming table's "export = model" cell: ``"same"`` (the exported model is the streamed one), the
    share of test rows where the hard export agrees with the soft model, or (regression) their mean |Δ|."""
    if not hard_vs_soft:
        return "same"
    agreement = hard_vs_soft.get("agreement", math.nan)
    if math.isfinite(agreement):
        return f"{agreement:.0%} agree"
    return f"mean |Δ| {hard_vs_soft['mean_abs']:.3g}"


def _finite_round(value):
    value = float(value)
    return round(value) if math.isfinite(value) else value


def main(out_dir="outputs/compare", spec=None):
    run_compare(spec, out_dir=out_dir, log=lambda msg: (print(msg), sys.stdout.flush()))


# ------------------------------------------------------------------------------------------ export the best
#: Quality metric of each task (the first of COLUMNS_BY_TASK) and whether higher is better.
_QUALITY = (("auc", True), ("accuracy", True), ("mse", False))


def _quality(result, split=None):
    """``(metric, value, higher_is_better, split)`` of a result, or None when it has no finite quality metric.

    ``split=None``: the validation metrics (``val_metrics``) when the result has them, else the test metrics
    (``metrics``); ``"val"`` / ``"test"``: that split's only."""
    sources = {"val": result.get("val_metrics") or {}, "test": result.get("metrics") or {}}
    for where in ([split] if split else ["val", "test"]):
        for name, higher in _QUALITY:
            value = sources[where].get(name)
            if value is not None and value == value:
                return name, float(value), higher, where
    return None


def _selection_split(candidates):
    """``"val"`` when every candidate result has validation metrics, else ``"test"``."""
    return "val" if candidates and all(_quality(r, "val") for r in candidates) else "test"


def select_best(results, budget_fraction=0.25):
    """``(index of the best result, baseline result, budget)`` or None.

    The baseline is the first result with the ``fixed`` scheme (the main job lists it first); the candidates are
    the results whose ``embedding_parameters`` are at most ``budget_fraction`` x the baseline's; the best has the
    best quality (AUC, accuracy: highest; MSE: lowest) on the validation split when every candidate has
    validation metrics (``experiment.run``'s ``val_metrics``), so that the test split stays out of the choice,
    else on the test split. None when there is no baseline or no candidate.
    """
    baseline = next((r for r in results if r.get("scheme") == "fixed"), None)
    if baseline is None:
        return None
    budget = budget_fraction * baseline["embedding_parameters"]
    candidates = [i for i, r in enumerate(results) if r["embedding_parameters"] <= budget and _quality(r)]
    split = _selection_split([results[i] for i in candidates])
    best, best_key = None, None
    for i in candidates:
        q = _quality(results[i], split)
        if q is None:
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
    (the first ``fixed`` variant), the one with the best validation quality (``select_best``; the test quality
    without a validation split), exports its model with
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
        ``export_dir``, ``path`` (the version directory), ``metric``, ``value`` (on the ``selected_on`` split,
        ``"val"`` or ``"test"``), ``test_value``, ``embedding_parameters``,
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
    split = _selection_split([r for r, _ in pairs if r["embedding_parameters"] <= chosen[2] and _quality(r)])
    metric, value, _, _ = _quality(result, split)
    test = _quality(result, "test")
    name = _slug(f"{result['model']}_{result['name']}")
    export_dir = os.path.join(out_dir, "export", name)
    warmup = None if rows is None else rows.head(64)
    path = export_saved_model(model, export_dir, warmup_rows=warmup)

    commands = serving_commands(model, export_dir, name=name, rows=rows)
    share = result["embedding_parameters"] / max(baseline["embedding_parameters"], 1)
    log("")
    chosen_by = (f"validation {metric} {value:.4f}, test {test[0]} {test[1]:.4f}" if split == "val"
                 else f"test {metric} {value:.4f}; no validation split")
    log(f"Best variant within {budget_fraction:.0%} of {baseline['name']}'s embedding parameters: "
        f"{result['name']} ({chosen_by}; {result['embedding_parameters']:,} embedding parameters, "
        f"{share:.1%} of {baseline['name']})")
    log(f"exported to {path}")
    log("")
    log_serving_commands(commands, log)
    return {"variant": result["name"], "name": name, "export_dir": export_dir, "path": path, "metric": metric,
            "value": value, "selected_on": split, "test_value": None if test is None else test[1],
            "embedding_parameters": result["embedding_parameters"], "baseline": baseline["name"],
            "baseline_embedding_parameters": baseline["embedding_parameters"], "budget_fraction": budget_fraction,
            "commands": commands, "_model": model}
