"""Numeric-feature embeddings on Criteo: raw values, field embedding, three discretisations, AutoDis.

The comparison of the AutoDis paper (Guo et al., KDD 2021, arXiv 2012.08986, Table 3) on the Criteo 10K sample:
DeepFM (``models/deepfm_criteo10k.yaml``: its schema, split, network and training) with the 13 numeric features
I1..I13 entering the model as

- ``no embedding``: raw values (``sign(x)·log(1+|x|)``, standardised) concatenated to the deep part's input
  (the recipe's default),
- ``field embedding``: ``x · v_field`` (``FieldEmbedding``), one more field of the FM and deep parts,
- ``discretisation EDD / EFD / LD``: ``--buckets`` equal-width, equal-frequency or log-scale equal-width buckets,
  embedded as categorical features (``criteo_schema(numeric="discretize", discretizer=...)``),
- ``AutoDis``: soft discretisation into ``--buckets`` meta-embeddings (``AutoDisEmbedding``), with the paper's
  three aggregations and a temperature sweep,

each over ``--seeds`` seeds (weights and shuffling; the split stays the recipe's), and writes
``autodis.{json,md,png}``: test AUC and logloss as mean (min–max) over the seeds, validation AUC (on which the
defaults are chosen), parameters of the numeric embeddings, and the learned bucket assignment of one field.

A second dataset (``--datasets synthetic``) checks the mechanism where it must show: a generated CTR table whose
label depends on four count features through a bump (high in the middle of each feature's log range, low at
both ends) and on three weak categorical fields, learned by a factorization machine (no deep part). There a
representation that is linear in the value (raw values in the first-order terms, the field embedding ``x · v``)
cannot express the bump; bucket ids and AutoDis can.

    python benchmarks/autodis.py              # both datasets, 3 seeds -> benchmarks/results/autodis.*
    python benchmarks/autodis.py --quick      # 4 variants, 1 seed, 1 epoch -> outputs/bench-quick/

Real data comes from ``$TFEMB_DATA_DIR`` (default ``<repo>/../shared/data``); without the Criteo sample that
dataset is skipped (the synthetic one still runs when asked for; with nothing to run nothing is written).
"""

import argparse
import json
import pathlib
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import _benchcli  # noqa: E402

RECIPE = ROOT / "models" / "deepfm_criteo10k.yaml"
DATASET_FOLDER = "criteo"
#: The field whose learned bucket assignment is plotted (I5: counts spread over five orders of magnitude).
PLOT_FIELD = "I5"
DATASETS = ("criteo", "synthetic")
#: The synthetic dataset: rows, count features, categorical fields (values each), and its FM recipe.
SYNTHETIC_ROWS, SYNTHETIC_NUMERIC, SYNTHETIC_FIELDS, SYNTHETIC_VALUES = 20000, 4, 3, 30
SYNTHETIC_RECIPE = {
    "name": "fm_synthetic_numeric",
    "model": {"name": "fm", "embedding_dim": 8, "params": {}},
    "embedding": {"scheme": "fixed", "params": {}},
    "train": {"epochs": 40, "batch_size": 512, "optimizer": "adam", "learning_rate": 0.01,
              "embedding_optimizer": None, "early_stopping": {"monitor": "val_auc", "patience": 3}},
}


def synthetic_frame(n=SYNTHETIC_ROWS, seed=0):
    """Counts ``I1..I4`` (``floor(exp(N(1.5, 1.2²)))``) and fields ``C1..C3``; the logit is a sum of bumps
    ``1.5·exp(-((log(1 + x) - c_j) / 0.5)²) - 0.5`` (``c_j``: the 30th to 75th percentile of each feature's log)
    and small random effects of the categorical values."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    frame, logit = {}, np.full(n, -0.3)
    for j in range(SYNTHETIC_NUMERIC):
        x = np.floor(np.exp(rng.normal(1.5, 1.2, n)))
        z = np.log1p(x)
        center = np.quantile(z, 0.3 + 0.15 * j)
        logit += 1.5 * np.exp(-(((z - center) / 0.5) ** 2)) - 0.5
        frame[f"I{j + 1}"] = x
    for j in range(SYNTHETIC_FIELDS):
        values = rng.integers(0, SYNTHETIC_VALUES, n)
        logit += rng.normal(0.0, 0.3, SYNTHETIC_VALUES)[values]
        frame[f"C{j + 1}"] = [f"c{j + 1}_{v}" for v in values]
    frame["label"] = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(int)
    frame["true_logit"] = logit  # not a feature of the schema: the oracle's score
    return pd.DataFrame(frame)


def auc_np(labels, scores):
    """ROC AUC by ranks (ties share their mean rank)."""
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = np.asarray(scores)[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for start, count in zip(first, counts):
        ranks[order[start:start + count]] = start + (count + 1) / 2.0
    positives = labels.sum()
    return float((ranks[labels].sum() - positives * (positives + 1) / 2.0) / (positives * (len(labels) - positives)))


def prepare_synthetic(data_params):
    """The synthetic dataset's ``PreparedData`` (random 80/10/10 split, seed 0) under ``data_params`` (those of
    ``criteo_schema``: ``numeric``, ``discretizer``, ``num_buckets``)."""
    from tfemb import experiment
    from tfemb.data import random_split
    from tfemb.data.schema import CategoricalFeature, Label, NumericFeature, Schema

    df = synthetic_frame()
    nums = [f"I{j + 1}" for j in range(SYNTHETIC_NUMERIC)]
    if data_params.get("numeric") == "discretize":
        numeric = [NumericFeature(c, discretize=data_params["discretizer"], num_buckets=data_params["num_buckets"])
                   for c in nums]
    else:
        numeric = [NumericFeature(c, transform="log_standardize") for c in nums]
    schema = Schema(numeric + [CategoricalFeature(f"C{j + 1}") for j in range(SYNTHETIC_FIELDS)],
                    label=Label("label", "binary"))
    train, val, test = random_split(df, (0.8, 0.1, 0.1), seed=0)
    schema.fit(train)
    return experiment.PreparedData(schema, {"train": train, "val": val, "test": test})


def variants(buckets):
    """``(name, data params, numeric_embedding section)`` of every variant, in table order."""
    def autodis(**params):
        return {"scheme": "autodis", "params": {"num_buckets": buckets, **params}}

    def discretised(kind):
        return {"numeric": "discretize", "discretizer": kind, "num_buckets": buckets}

    return [
        ("no embedding (raw values)", {}, None),
        ("field embedding", {}, {"scheme": "field", "params": {}}),
        ("discretisation EDD (equal width)", discretised("equal_width"), None),
        ("discretisation EFD (equal frequency)", discretised("equal_frequency"), None),
        ("discretisation LD (log scale)", discretised("log"), None),
        ("AutoDis (weighted average, τ=1)", {}, autodis(temperature=1.0)),
        ("AutoDis (weighted average, τ=0.1)", {}, autodis(temperature=0.1)),
        ("AutoDis (weighted average, τ=10)", {}, autodis(temperature=10.0)),
        ("AutoDis (max-pooling, τ=1)", {}, autodis(temperature=1.0, aggregation="max_pooling")),
        ("AutoDis (top-2 sum, τ=1)", {}, autodis(temperature=1.0, aggregation="top_k_sum", top_k=2)),
    ]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=",".join(DATASETS),
                        help=f"comma list of {', '.join(DATASETS)} (default both)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant (default 3)")
    parser.add_argument("--buckets", type=int, default=20,
                        help="buckets of the discretisations and meta-embeddings of AutoDis (default 20, the "
                             "authors' release)")
    parser.set_defaults(quick_help="4 variants (one of each kind), 1 seed, 1 epoch (a smoke test)")
    args = _benchcli.parse_seeded(parser, argv, "autodis.py", {"seeds": 1, "buckets": 2})
    args.datasets = _benchcli.split_list(parser, "--datasets", args.datasets, allowed=DATASETS, what="datasets")
    return args


def aggregate(runs):
    """One row per dataset and variant: mean / min / max of test AUC, mean logloss and val AUC over the seeds,
    parameters."""
    rows = []
    for (dataset, name), results in runs.items():
        auc = np.array([r["metrics"]["auc"] for r in results])
        rows.append({
            "dataset": dataset,
            "variant": name,
            "numeric_parameters": int(results[0]["numeric_parameters"]),
            "embedding_parameters": int(results[0]["embedding_parameters"]),
            "auc_mean": float(auc.mean()), "auc_min": float(auc.min()), "auc_max": float(auc.max()),
            "logloss_mean": float(np.mean([r["metrics"]["logloss"] for r in results])),
            "val_auc_mean": float(np.mean([r["val_metrics"]["auc"] for r in results])),
            "train_seconds_mean": float(np.mean([r["train_seconds"] for r in results])),
            "epochs": [int(r["epochs"]) for r in results],
            "auc_per_seed": auc.tolist(),
        })
    return rows


TITLES = {
    "criteo": "Criteo 10K sample: DeepFM of `models/deepfm_criteo10k.yaml`, I1..I13",
    "synthetic": (f"Synthetic bumps ({SYNTHETIC_ROWS:,} rows; the label depends on {SYNTHETIC_NUMERIC} counts through "
                  "a bump each): a factorization machine, no deep part"),
}


def markdown(rows, meta):
    lines = ["# Numeric-feature embeddings", "", f"`{meta['command']}`", "",
             f"{meta['seeds']} seed(s), {meta['when']} UTC, TF {meta['tensorflow']}, {meta['keras']}; "
             f"{meta['buckets']} buckets / meta-embeddings. Test AUC: mean (min–max) over the seeds; val AUC: mean "
             "(the split defaults are chosen on); numeric params: the numeric embeddings' parameters "
             "(discretisations: their bucket tables, counted in the id tables' column); id-table params: every "
             "categorical table's. Train seconds on 2 shared CPU cores."]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        lines += ["", f"## {TITLES[dataset]}", "",
                  "| variant | test AUC | logloss | val AUC | numeric params | id-table params | train s | epochs |",
                  "|---|---|---|---|---|---|---|---|"]
        if dataset == "synthetic" and meta.get("synthetic_oracle_auc") is not None:
            lines.insert(len(lines) - 2, f"The generator's own logit scores the test rows at AUC "
                                         f"{meta['synthetic_oracle_auc']:.4f}: no model can do better.\n")
        for r in (r for r in rows if r["dataset"] == dataset):
            lines.append(f"| {r['variant']} | {r['auc_mean']:.4f} ({r['auc_min']:.4f}–{r['auc_max']:.4f}) | "
                         f"{r['logloss_mean']:.4f} | {r['val_auc_mean']:.4f} | {r['numeric_parameters']:,} | "
                         f"{r['embedding_parameters']:,} | {r['train_seconds_mean']:.1f} | "
                         f"{', '.join(map(str, r['epochs']))} |")
    return "\n".join(lines) + "\n"


def bucket_assignment(model, prepared, field):
    """``(raw values, [n, H] bucket probabilities)`` of an AutoDis model's ``field`` over its training range."""
    import pandas as pd
    import tensorflow as tf

    feature = prepared.schema.feature(field)
    raw = prepared.frames["train"][feature.column].dropna().to_numpy(dtype=np.float64)
    grid = np.unique(np.quantile(raw, np.linspace(0.0, 1.0, 200)))
    encoded = feature.encode(pd.Series(grid))  # the Schema's transform, as at training
    layer = model.numeric_layers[field]
    return grid, layer.bucket_scores(tf.constant(encoded)).numpy()


def plot(rows, assignments, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    panels = len(datasets) + len(assignments)
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5), squeeze=False)
    axes = list(axes[0])
    for ax, dataset in zip(axes, datasets):
        part = [r for r in rows if r["dataset"] == dataset]
        names = [r["variant"] for r in part]
        means = np.array([r["auc_mean"] for r in part])
        err = np.array([[r["auc_mean"] - r["auc_min"] for r in part], [r["auc_max"] - r["auc_mean"] for r in part]])
        colors = ["#999999" if n.startswith("no ") else "#6baed6" if n.startswith("field") else
                  "#fd8d3c" if n.startswith("discret") else "#31a354" for n in names]
        y = np.arange(len(part))[::-1]
        low = (means - err[0]).min() - 0.002
        ax.barh(y, means - low, left=low, xerr=err, color=colors, capsize=3)
        ax.set_yticks(y, names, fontsize=8)
        ax.set_xlabel("test AUC (mean, min–max over seeds)")
        ax.set_title({"criteo": "DeepFM, Criteo 10K: I1..I13 embedded as",
                      "synthetic": "FM, synthetic bumps: counts embedded as"}[dataset], fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
    for bx, (field, dataset, (grid, probs)) in zip(axes[len(datasets):], assignments):
        im = bx.imshow(probs.T, aspect="auto", origin="lower", cmap="viridis",
                       extent=[0, len(grid) - 1, -0.5, probs.shape[1] - 0.5])
        ticks = np.linspace(0, len(grid) - 1, 6).astype(int)
        bx.set_xticks(ticks, [f"{grid[t]:.3g}" for t in ticks], fontsize=8)
        bx.set_xlabel(f"{field} raw value (training quantiles, even steps)")
        bx.set_ylabel("meta-embedding (bucket)")
        bx.set_title(f"AutoDis soft assignment of {dataset} {field} (seed 0, τ=1)", fontsize=10)
        fig.colorbar(im, ax=bx, label="p(bucket | value)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    datasets = _benchcli.runnable_datasets(args.datasets, {"criteo": DATASET_FOLDER})
    if not datasets:
        print(f"nothing to run: nothing written to {args.out}.")
        return 0
    import tensorflow as tf
    import yaml

    from tfemb import experiment
    from tfemb._keras import backend_name

    recipes = {"criteo": experiment.merge(experiment.DEFAULTS, yaml.safe_load(RECIPE.read_text())),
               "synthetic": experiment.merge(experiment.DEFAULTS, SYNTHETIC_RECIPE)}
    for recipe in recipes.values():
        recipe["train"]["verbose"] = 0
        if args.quick:
            recipe["train"]["epochs"] = 1
    plan = variants(args.buckets)
    if args.quick:  # a smoke test of the script: one variant of each kind
        plan = [v for v in plan if v[0].startswith(("no embedding", "field", "discretisation LD",
                                                    "AutoDis (weighted average, τ=1)"))]
    prepared_by_data = {}
    runs, assignments = {}, []
    start = time.time()
    for dataset in datasets:
        recipe = recipes[dataset]
        for seed in range(args.seeds):
            for i, (name, data_params, numeric) in enumerate(plan, 1):
                key = (dataset, json.dumps(data_params, sort_keys=True))
                if dataset == "criteo":
                    data_cfg = experiment.merge(recipe["data"], {"params": data_params})
                    if key not in prepared_by_data:
                        prepared_by_data[key] = experiment.prepare_data(data_cfg)
                else:
                    data_cfg = recipe["data"]
                    if key not in prepared_by_data:
                        prepared_by_data[key] = prepare_synthetic(data_params)
                cfg = experiment.merge(recipe, {"name": name, "seed": seed, "data": data_cfg,
                                                "numeric_embedding": numeric})
                result = experiment.run(cfg, prepared=prepared_by_data[key])
                model = result.pop("_model", None)
                runs.setdefault((dataset, name), []).append(result)
                print(f"{dataset} seed {seed} [{i}/{len(plan)}] {name}: test AUC {result['metrics']['auc']:.4f}, "
                      f"val AUC {result['val_metrics']['auc']:.4f}, {result['epochs']} epochs, "
                      f"{result['train_seconds']:.1f} s ({time.time() - start:.0f} s so far)", flush=True)
                if seed == 0 and name.startswith("AutoDis (weighted average, τ=1)"):
                    field = PLOT_FIELD if dataset == "criteo" else "I2"
                    assignments.append((field, dataset, bucket_assignment(model, prepared_by_data[key], field)))
    rows = aggregate(runs)
    oracle = None
    if "synthetic" in datasets:  # the generator's own logit on the test rows: the best AUC any model can reach
        test = next(p for (d, _), p in prepared_by_data.items() if d == "synthetic").frames["test"]
        oracle = auc_np(test["label"].to_numpy(), test["true_logit"].to_numpy())
    meta = {"command": args.command, "seeds": args.seeds, "buckets": args.buckets, "datasets": datasets,
            "when": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "tensorflow": tf.__version__,
            "keras": backend_name(), "wall_seconds": time.time() - start, "synthetic_oracle_auc": oracle}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "rows": rows,
               "assignments": [{"dataset": d, "field": f, "values": grid.tolist(),
                                "probabilities": np.round(probs, 5).tolist()} for f, d, (grid, probs) in assignments]}
    (out / "autodis.json").write_text(json.dumps(payload, indent=2))
    (out / "autodis.md").write_text(markdown(rows, meta))
    plot(rows, assignments, out / "autodis.png")
    print(markdown(rows, meta))
    print(f"wrote {out / 'autodis.json'}, autodis.md and autodis.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
