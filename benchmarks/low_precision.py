"""Low-precision embedding tables on Criteo: post-training quantisation vs LPT vs ALPT at 8, 4 and 2 bits.

The comparison of the ALPT paper (Li et al., AAAI 2023, arXiv 2212.05735, Tables 2-3) on the Criteo 10K sample:
DeepFM of ``models/deepfm_criteo10k.yaml`` (its schema, split, network, training and table L2) with its 26
categorical tables

- ``float32``: the recipe as it is (``FixedEmbedding``),
- ``PTQ b-bit``: that trained model with each table rounded afterwards to ``b``-bit codes with a per-row scale
  ``max|row| / (2^(b-1) - 1)`` (post-training quantisation; at 8 bits what ``export_saved_model(table_dtype=
  "int8")`` stores),
- ``LPT b-bit``: ``LowPrecisionEmbedding(step_size="fixed")`` (the table held as ``b``-bit codes throughout
  training, a fixed step size), with stochastic rounding (the paper's) and, at 8 and 4 bits, round-to-nearest
  (the paper's deterministic baseline),
- ``ALPT b-bit``: ``LowPrecisionEmbedding(step_size="adaptive")``, step sizes learned,

each over ``--seeds`` seeds (weights, shuffling and rounding; the split stays the recipe's), and writes
``low_precision.{json,md,png}``: test AUC and logloss as mean (min–max), validation AUC, the tables' bytes at
export, training seconds.

A second dataset (``--datasets synthetic``) is the main job's (``tfemb compare``): DeepFM with 16-dim tables on
60,000 synthetic Zipf CTR rows, where the tables carry more of the signal than on Criteo 10K (a uniform 4-dim
table loses AUC there), trained as the main job trains (the tables with lazy Adam, which updates and rounds back
only the rows a batch looked up, as the authors' code does), up to 8 epochs with patience 2. (Criteo's recipe
gives the tables the stock Adam, as its whole-table L2 needs dense updates: there every row is updated and
rounded back every step.)

    python benchmarks/low_precision.py              # both datasets, 3 seeds -> benchmarks/results/low_precision.*
    python benchmarks/low_precision.py --quick      # float32, PTQ, LPT and ALPT at 4 bits, 1 seed, 1 epoch

Real data comes from ``$TFEMB_DATA_DIR`` (default ``<repo>/../shared/data``); without the Criteo sample that
dataset is skipped (with nothing left to run nothing is written).
"""

import argparse
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
BITS = (8, 4, 2)
DATASETS = ("criteo", "synthetic")
TITLES = {"criteo": "Criteo 10K sample: DeepFM of `models/deepfm_criteo10k.yaml`, 26 categorical tables",
          "synthetic": "Synthetic Zipf CTR data of the main job (60,000 rows): DeepFM, 16-dim tables, lazy Adam"}


def variants(bits, alpt_learning_rates):
    """``(name, embedding section or None for float32)`` of every trained variant, in table order."""
    def lp(b, **params):
        return {"scheme": "low_precision", "params": {"bits": b, **params}}

    plan = [("float32", None)]
    for b in bits:
        plan.append((f"LPT {b}-bit (stochastic rounding)", lp(b, step_size="fixed")))
        if b >= 4:
            plan.append((f"LPT {b}-bit (round to nearest)", lp(b, step_size="fixed", rounding="deterministic")))
        for i, rate in enumerate(alpt_learning_rates):
            label = f"ALPT {b}-bit" + ("" if i == 0 else f" (step lr {rate:g})")
            plan.append((label, lp(b, step_size="adaptive", step_size_learning_rate=rate)))
    return plan


def ptq_tables(model, bits):
    """Rounds every embedding table of ``model`` (fixed tables) to ``bits``-bit codes with a per-row scale
    ``max|row| / Qp`` in place; returns the original values to restore."""
    qp = 2 ** (bits - 1) - 1
    saved = []
    for layer in model.embedding_list:
        w = layer.embeddings.numpy()
        saved.append(w.copy())
        scale = np.abs(w).max(axis=1, keepdims=True) / qp
        safe = np.where(scale > 0, scale, 1.0)
        layer.embeddings.assign((np.clip(np.round(w / safe), -qp, qp) * scale).astype(np.float32))
    return saved


def table_bytes(model, bits=None):
    """Bytes of the categorical tables as exported: as the model stores them, or as ``bits``-bit codes plus a
    float32 scale per row (PTQ)."""
    from tfemb.layers.low_precision_embedding import code_storage_bytes

    return int(sum(layer.storage_bytes() if bits is None else
                   code_storage_bytes(layer.vocabulary_size, layer.output_dim, bits) for layer in model.embedding_list))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=",".join(DATASETS),
                        help=f"comma list of {', '.join(DATASETS)} (default both)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant (default 3)")
    parser.add_argument("--bits", default=",".join(map(str, BITS)), help="comma list of bit widths (default 8,4,2)")
    parser.add_argument("--alpt-learning-rates", default="1e-5,1e-4",
                        help="ALPT step-size learning rates (default 1e-5,1e-4; the first is the default label)")
    parser.set_defaults(quick_help="float32 + PTQ, LPT and ALPT at 4 bits, 1 seed, 1 epoch (a smoke test)")
    args = _benchcli.parse_seeded(parser, argv, "low_precision.py", {"seeds": 1})
    args.datasets = _benchcli.split_list(parser, "--datasets", args.datasets, allowed=DATASETS, what="datasets")
    args.bits = _benchcli.split_list(parser, "--bits", args.bits, convert=int, check=lambda b: None if 2 <= b <= 16 else "outside [2, 16]",
                                     what="bit widths in [2, 16]")
    args.alpt_learning_rates = _benchcli.split_list(parser, "--alpt-learning-rates", args.alpt_learning_rates,
                                                    convert=float, check=lambda r: None if r > 0 else "not > 0",
                                                    what="learning rates > 0")
    return args


def aggregate(runs):
    rows = []
    for (dataset, name), results in runs.items():
        auc = np.array([r["auc"] for r in results])
        rows.append({
            "dataset": dataset,
            "variant": name,
            "bits": results[0]["bits"],
            "table_bytes": results[0]["table_bytes"],
            "auc_mean": float(auc.mean()), "auc_min": float(auc.min()), "auc_max": float(auc.max()),
            "logloss_mean": float(np.mean([r["logloss"] for r in results])),
            "val_auc_mean": float(np.mean([r["val_auc"] for r in results])),
            "train_seconds_mean": float(np.mean([r["train_seconds"] for r in results])),
            "epochs": [r["epochs"] for r in results],
            "auc_per_seed": auc.tolist(),
        })
    return rows


def markdown(rows, meta):
    lines = ["# Low-precision embedding tables", "", f"`{meta['command']}`", "",
             f"{meta['seeds']} seed(s), {meta['when']} UTC, TF {meta['tensorflow']}, {meta['keras']}. The categorical "
             "tables stored as below (numeric features, dense layers and first-order weights stay float32). Test "
             "AUC: mean (min–max) over the seeds; val AUC: mean; table bytes: the categorical tables as exported "
             "(codes, one byte each up to 8 bits, + a float32 scale per row); PTQ rows are the float32 models "
             "rounded after training (no training of their own). Train seconds on 2 shared CPU cores."]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        part = [r for r in rows if r["dataset"] == dataset]
        base = next(r for r in part if r["variant"] == "float32")
        lines += ["", f"## {TITLES[dataset]}", "",
                  "| variant | bits | test AUC | Δ AUC vs float32 | logloss | val AUC | table bytes | vs float32 | "
                  "train s | epochs |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in part:
            lines.append(f"| {r['variant']} | {r['bits']} | {r['auc_mean']:.4f} ({r['auc_min']:.4f}–"
                         f"{r['auc_max']:.4f}) | {r['auc_mean'] - base['auc_mean']:+.4f} | {r['logloss_mean']:.4f} | "
                         f"{r['val_auc_mean']:.4f} | {r['table_bytes']:,} | "
                         f"{r['table_bytes'] / base['table_bytes']:.3f} | {r['train_seconds_mean']:.1f} | "
                         f"{', '.join(map(str, r['epochs']))} |")
    return "\n".join(lines) + "\n"


def _family(variant):
    """``(family, style)`` of a variant name: ``("LPT", "stochastic rounding")``, ``("ALPT", "")``, ..."""
    head, _, rest = variant.partition(" (")
    return head.split(" ")[0], rest.rstrip(")")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(7.5 * len(datasets), 5), squeeze=False)
    colors = {"PTQ": ("#fd8d3c", "s"), "LPT": ("#6baed6", "o"), "ALPT": ("#31a354", "^")}
    for ax, dataset in zip(axes[0], datasets):
        part = [r for r in rows if r["dataset"] == dataset]
        base = next(r for r in part if r["variant"] == "float32")
        ax.axhline(base["auc_mean"], color="#555555", ls="--", lw=1, label=f"float32 ({base['auc_mean']:.4f})")
        lines = {}
        for r in part:
            if r["variant"] != "float32":
                lines.setdefault(_family(r["variant"]), []).append(r)
        for (family, style), group in lines.items():
            group.sort(key=lambda r: r["bits"])
            bits = np.array([r["bits"] for r in group], dtype=float)
            mean = np.array([r["auc_mean"] for r in group])
            err = np.array([[r["auc_mean"] - r["auc_min"] for r in group],
                            [r["auc_max"] - r["auc_mean"] for r in group]])
            color, marker = colors[family]
            plain = style in ("", "stochastic rounding")
            ax.errorbar(bits, mean, yerr=err, color=color, marker=marker, ls="-" if plain else ":", capsize=3,
                        mfc=color if plain else "white", label=f"{family} ({style})" if style else family)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["bits"] for r in part if r["variant"] != "float32"}))
        ax.get_xaxis().set_major_formatter(ScalarFormatter())
        ax.set_xlabel("bits per table entry")
        ax.set_ylabel("test AUC (mean, min–max over seeds)")
        ax.set_title(TITLES[dataset].split(":")[0], fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def recipes():
    """Dataset -> recipe (merged with the defaults)."""
    import yaml

    from tfemb import compare, experiment

    criteo = experiment.merge(experiment.DEFAULTS, yaml.safe_load(RECIPE.read_text()))
    synthetic = experiment.merge(experiment.DEFAULTS, compare.DEFAULT_COMPARE["base"])
    synthetic = experiment.merge(synthetic, {
        "name": "deepfm_synthetic", "embedding": {"scheme": "fixed", "params": {}},
        "train": {"epochs": 8, "early_stopping": {"monitor": "val_auc", "patience": 2}}})
    return {"criteo": criteo, "synthetic": synthetic}


def main(argv=None):
    args = parse_args(argv)
    datasets = _benchcli.runnable_datasets(args.datasets, {"criteo": DATASET_FOLDER})
    if not datasets:
        print(f"nothing to run: nothing written to {args.out}.")
        return 0
    import tensorflow as tf

    from tfemb import experiment
    from tfemb._keras import backend_name

    bits, rates = args.bits, args.alpt_learning_rates
    if args.quick:
        bits, rates = [4], rates[:1]
    plan = variants(bits, rates)
    if args.quick:
        plan = [p for p in plan if "nearest" not in p[0]]
    runs = {}
    start = time.time()
    for dataset in datasets:
        recipe = recipes()[dataset]
        recipe["train"]["verbose"] = 0
        if args.quick:
            recipe["train"]["epochs"] = 1
        regularizer = recipe["embedding"].get("params", {}).get("embeddings_regularizer")
        batch = recipe["train"]["batch_size"]
        prepared = experiment.prepare_data(recipe["data"])
        for seed in range(args.seeds):
            for i, (name, embedding) in enumerate(plan, 1):
                section = recipe["embedding"] if embedding is None else {
                    "scheme": embedding["scheme"],
                    "params": {**embedding["params"], "seed": seed,
                               **({"embeddings_regularizer": regularizer} if regularizer else {})}}
                cfg = experiment.merge(recipe, {"name": name, "seed": seed})
                cfg["embedding"] = section
                result = experiment.run(cfg, prepared=prepared)
                model = result.pop("_model")
                b = embedding["params"]["bits"] if embedding else 32
                record = {"bits": b, "auc": result["metrics"]["auc"], "logloss": result["metrics"]["logloss"],
                          "val_auc": result["val_metrics"]["auc"], "train_seconds": result["train_seconds"],
                          "epochs": int(result["epochs"]), "table_bytes": table_bytes(model)}
                runs.setdefault((dataset, name), []).append(record)
                print(f"{dataset} seed {seed} [{i}/{len(plan)}] {name}: test AUC {record['auc']:.4f}, val AUC "
                      f"{record['val_auc']:.4f}, {record['epochs']} epochs, {record['train_seconds']:.1f} s "
                      f"({time.time() - start:.0f} s so far)", flush=True)
                if embedding is None:  # post-training quantisation of this float32 model, every bit width
                    for pb in bits:
                        saved = ptq_tables(model, pb)
                        test = experiment.evaluate(model, prepared, "test", batch)
                        val = experiment.evaluate(model, prepared, "val", batch)
                        for layer, w in zip(model.embedding_list, saved):
                            layer.embeddings.assign(w)
                        runs.setdefault((dataset, f"PTQ {pb}-bit"), []).append({
                            "bits": pb, "auc": test["auc"], "logloss": test["logloss"], "val_auc": val["auc"],
                            "train_seconds": 0.0, "epochs": 0, "table_bytes": table_bytes(model, pb)})
                        print(f"{dataset} seed {seed}     PTQ {pb}-bit of it: test AUC {test['auc']:.4f}", flush=True)
                del model
    order = ["float32"] + [f"PTQ {b}-bit" for b in bits] + [n for n, _ in plan if n != "float32"]
    rows = aggregate({(d, n): runs[(d, n)] for d in datasets for n in order if (d, n) in runs})
    meta = {"command": args.command, "seeds": args.seeds, "datasets": datasets, "bits": bits,
            "alpt_learning_rates": rates, "when": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "tensorflow": tf.__version__, "keras": backend_name(), "wall_seconds": time.time() - start}
    _benchcli.write_results(args.out, "low_precision", {"meta": meta, "rows": rows}, markdown(rows, meta),
                            lambda path: plot(rows, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
