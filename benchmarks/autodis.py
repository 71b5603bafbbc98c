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

    python benchmarks/autodis.py              # 3 seeds, ~10 min on 2 cores -> benchmarks/results/autodis.*
    python benchmarks/autodis.py --quick      # 4 variants, 1 seed, 1 epoch -> outputs/bench-quick/

Real data comes from ``$TFEMB_DATA_DIR`` (default ``<repo>/../shared/data``); without the Criteo sample the run
is skipped and nothing is written.
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
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant (default 3)")
    parser.add_argument("--buckets", type=int, default=20,
                        help="buckets of the discretisations and meta-embeddings of AutoDis (default 20, the "
                             "authors' release)")
    parser.add_argument("--quick", action="store_true", help="4 variants (one of each kind), 1 seed, 1 epoch (a "
                        "smoke test)")
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/results; --quick: "
                        "outputs/bench-quick)")
    args = parser.parse_args(argv)
    args.command = _benchcli.command_line("autodis.py", argv)
    if args.out is None:
        args.out = _benchcli.default_out(args.quick)
    _benchcli.check_min(parser, args, {"seeds": 1, "buckets": 2})
    _benchcli.check_out(parser, args.out)
    if args.quick:
        args.seeds = 1
    return args


def aggregate(runs):
    """One row per variant: mean / min / max of test AUC, mean logloss and val AUC over the seeds, parameters."""
    rows = []
    for name, results in runs.items():
        auc = np.array([r["metrics"]["auc"] for r in results])
        rows.append({
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


def markdown(rows, meta):
    lines = [f"# Numeric-feature embeddings, {meta['dataset']}", "", f"`{meta['command']}`", "",
             f"{meta['seeds']} seed(s), {meta['when']} UTC, TF {meta['tensorflow']}, {meta['keras']}; "
             f"{meta['buckets']} buckets / meta-embeddings. DeepFM of `models/deepfm_criteo10k.yaml`. Test AUC: mean "
             "(min–max) over the seeds; val AUC: mean (the split defaults are chosen on); numeric params: the "
             "numeric embeddings' parameters (discretisations: their bucket tables, counted in the id tables' "
             "column); id-table params: every categorical table's.", "",
             "| variant | test AUC | logloss | val AUC | numeric params | id-table params | train s | epochs |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['auc_mean']:.4f} ({r['auc_min']:.4f}–{r['auc_max']:.4f}) | "
                     f"{r['logloss_mean']:.4f} | {r['val_auc_mean']:.4f} | {r['numeric_parameters']:,} | "
                     f"{r['embedding_parameters']:,} | {r['train_seconds_mean']:.1f} | "
                     f"{', '.join(map(str, r['epochs']))} |")
    return "\n".join(lines) + "\n"


def bucket_assignment(model, prepared, field):
    """``(raw values, [n, H] bucket probabilities)`` of an AutoDis model's ``field`` over its training range."""
    import tensorflow as tf

    feature = prepared.schema.feature(field)
    raw = prepared.frames["train"][feature.column].dropna().to_numpy(dtype=np.float64)
    grid = np.unique(np.quantile(raw, np.linspace(0.0, 1.0, 200)))
    encoded = feature._transformed(grid).astype(np.float32)
    layer = model.numeric_layers[field]
    return grid, layer.bucket_scores(tf.constant(encoded)).numpy()


def plot(rows, assignment, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1.2, 1]})
    names = [r["variant"] for r in rows]
    means = np.array([r["auc_mean"] for r in rows])
    err = np.array([[r["auc_mean"] - r["auc_min"] for r in rows], [r["auc_max"] - r["auc_mean"] for r in rows]])
    colors = ["#999999" if n.startswith("no ") else "#6baed6" if n.startswith("field") else
              "#fd8d3c" if n.startswith("discret") else "#31a354" for n in names]
    y = np.arange(len(rows))[::-1]
    ax.barh(y, means - means.min() + 0.002, left=means.min() - 0.002, xerr=err, color=colors, capsize=3)
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlabel("test AUC (mean, min–max over seeds)")
    ax.set_title("DeepFM on Criteo 10K: how I1..I13 are embedded")
    ax.grid(True, axis="x", alpha=0.3)
    if assignment is not None:
        grid, probs = assignment
        im = bx.imshow(probs.T, aspect="auto", origin="lower", cmap="viridis",
                       extent=[0, len(grid) - 1, -0.5, probs.shape[1] - 0.5])
        ticks = np.linspace(0, len(grid) - 1, 6).astype(int)
        bx.set_xticks(ticks, [f"{grid[t]:.3g}" for t in ticks], fontsize=8)
        bx.set_xlabel(f"{PLOT_FIELD} raw value (training quantiles, even steps)")
        bx.set_ylabel("meta-embedding (bucket)")
        bx.set_title(f"AutoDis soft assignment of {PLOT_FIELD} (seed 0, τ=1)")
        fig.colorbar(im, ax=bx, label="p(bucket | value)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    from tfemb.data.readers import data_dir

    folder = data_dir() / DATASET_FOLDER
    if not folder.is_dir():
        print(f"SKIPPED: data folder {folder} is absent (set TFEMB_DATA_DIR to the folder holding it); nothing "
              f"written to {args.out}.")
        return 0
    import tensorflow as tf
    import yaml

    from tfemb import experiment
    from tfemb._keras import backend_name

    recipe = experiment.merge(experiment.DEFAULTS, yaml.safe_load(RECIPE.read_text()))
    recipe["train"]["verbose"] = 0
    if args.quick:
        recipe["train"]["epochs"] = 1
    prepared_by_data = {}
    runs, assignment = {}, None
    start = time.time()
    plan = variants(args.buckets)
    if args.quick:  # a smoke test of the script: one variant of each kind
        plan = [v for v in plan if v[0].startswith(("no embedding", "field", "discretisation LD",
                                                    "AutoDis (weighted average, τ=1)"))]
    for seed in range(args.seeds):
        for i, (name, data_params, numeric) in enumerate(plan, 1):
            data_cfg = experiment.merge(recipe["data"], {"params": data_params})
            key = json.dumps(data_cfg, sort_keys=True)
            if key not in prepared_by_data:
                prepared_by_data[key] = experiment.prepare_data(data_cfg)
            cfg = experiment.merge(recipe, {"name": name, "seed": seed, "data": data_cfg,
                                            "numeric_embedding": numeric})
            result = experiment.run(cfg, prepared=prepared_by_data[key])
            model = result.pop("_model", None)
            runs.setdefault(name, []).append(result)
            print(f"seed {seed} [{i}/{len(plan)}] {name}: test AUC {result['metrics']['auc']:.4f}, val AUC "
                  f"{result['val_metrics']['auc']:.4f}, {result['epochs']} epochs, {result['train_seconds']:.1f} s "
                  f"({time.time() - start:.0f} s so far)", flush=True)
            if seed == 0 and name.startswith("AutoDis (weighted average, τ=1)"):
                assignment = bucket_assignment(model, prepared_by_data[key], PLOT_FIELD)
    rows = aggregate(runs)
    meta = {"command": args.command, "seeds": args.seeds, "buckets": args.buckets,
            "dataset": "Criteo 10K sample (DeepFM, binary)",
            "when": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "tensorflow": tf.__version__,
            "keras": backend_name(), "wall_seconds": time.time() - start}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "rows": rows}
    if assignment is not None:
        payload["assignment"] = {"field": PLOT_FIELD, "values": assignment[0].tolist(),
                                 "probabilities": np.round(assignment[1], 5).tolist()}
    (out / "autodis.json").write_text(json.dumps(payload, indent=2))
    (out / "autodis.md").write_text(markdown(rows, meta))
    plot(rows, assignment, out / "autodis.png")
    print(markdown(rows, meta))
    print(f"wrote {out / 'autodis.json'}, autodis.md and autodis.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
