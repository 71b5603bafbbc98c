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
    ],
}

COLUMNS_BY_TASK = {
    "binary": ["auc", "logloss"],
    "multiclass": ["accuracy", "cross_entropy"],
    "regression": ["mse", "mae"],
}


def run_compare(spec=None, out_dir="outputs/compare", log=print):
    """Runs every variant on the same data split; writes compare.json, compare.md and compare.png."""
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
    variants = spec["variants"]
    for i, variant in enumerate(variants, 1):
        cfg = experiment.merge(base, {k: v for k, v in variant.items() if k != "name"})
        cfg["name"] = variant["name"]
        start = time.perf_counter()
        log(f"[{i}/{len(variants)}] {variant['name']}: training {cfg['model']['name']} ...")
        result = experiment.run(cfg, prepared=prepared, log=log)
        result.pop("_model")
        log(f"        done in {time.perf_counter() - start:.1f}s: "
            + ", ".join(f"{m}={result['metrics'].get(m, float('nan')):.4f}" for m in metric_names)
            + f", {result['embedding_parameters']:,} embedding parameters")
        results.append(result)

    rows = []
    for r in results:
        row = {"variant": r["name"]}
        row.update({m: r["metrics"].get(m, float("nan")) for m in metric_names})
        row.update({"emb params": r["embedding_parameters"], "emb bytes": r["embedding_bytes"],
                    "train s": r["train_seconds"], "epochs": r["epochs"]})
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
    return payload


def main(out_dir="outputs/compare", spec=None):
    run_compare(spec, out_dir=out_dir, log=lambda msg: (print(msg), sys.stdout.flush()))
