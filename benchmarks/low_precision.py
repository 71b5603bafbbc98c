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

    python benchmarks/low_precision.py              # 3 seeds -> benchmarks/results/low_precision.*
    python benchmarks/low_precision.py --quick      # float32, PTQ, LPT and ALPT at 4 bits, 1 seed, 1 epoch

Real data comes from ``$TFEMB_DATA_DIR`` (default ``<repo>/../shared/data``); without the Criteo sample nothing
runs and nothing is written.
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
BITS = (8, 4, 2)


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


def evaluate(model, prepared, split, batch_size):
    from tfemb import experiment

    return experiment.evaluate(model, prepared, split, batch_size)


def table_bytes(model, bits=None):
    """Bytes of the categorical tables as exported: float32, or ``bits``-bit codes (1 byte up to 8 bits) plus a
    float32 scale per row."""
    total = 0
    for layer in model.embedding_list:
        if bits is None:
            total += layer.storage_bytes()
        else:
            total += layer.vocabulary_size * (layer.output_dim * (1 if bits <= 8 else 2) + 4)
    return int(total)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant (default 3)")
    parser.add_argument("--bits", default=",".join(map(str, BITS)), help="comma list of bit widths (default 8,4,2)")
    parser.add_argument("--alpt-learning-rates", default="1e-5,1e-4",
                        help="ALPT step-size learning rates (default 1e-5,1e-4; the first is the default label)")
    parser.set_defaults(quick_help="float32 + PTQ, LPT and ALPT at 4 bits, 1 seed, 1 epoch (a smoke test)")
    args = _benchcli.parse_seeded(parser, argv, "low_precision.py", {"seeds": 1})
    args.bits = _benchcli.split_list(parser, "--bits", args.bits, convert=int, check=lambda b: None if 2 <= b <= 16 else "outside [2, 16]",
                                     what="bit widths in [2, 16]")
    args.alpt_learning_rates = _benchcli.split_list(parser, "--alpt-learning-rates", args.alpt_learning_rates,
                                                    convert=float, check=lambda r: None if r > 0 else "not > 0",
                                                    what="learning rates > 0")
    return args


def aggregate(runs):
    rows = []
    for name, results in runs.items():
        auc = np.array([r["auc"] for r in results])
        rows.append({
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
    base = next(r for r in rows if r["variant"] == "float32")
    lines = ["# Low-precision embedding tables (Criteo 10K, DeepFM)", "", f"`{meta['command']}`", "",
             f"{meta['seeds']} seed(s), {meta['when']} UTC, TF {meta['tensorflow']}, {meta['keras']}. DeepFM of "
             "`models/deepfm_criteo10k.yaml`, its 26 categorical tables stored as below (the numeric features, "
             "dense layers and first-order weights stay float32). Test AUC: mean (min–max) over the seeds; "
             "val AUC: mean; table bytes: the categorical tables as exported (codes + a float32 scale per row); "
             "PTQ rows are the float32 models rounded after training (no training of their own). Train seconds on "
             "2 shared CPU cores.", "",
             "| variant | bits | test AUC | Δ AUC vs float32 | logloss | val AUC | table bytes | vs float32 | "
             "train s | epochs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['bits']} | {r['auc_mean']:.4f} ({r['auc_min']:.4f}–{r['auc_max']:.4f}) "
                     f"| {r['auc_mean'] - base['auc_mean']:+.4f} | {r['logloss_mean']:.4f} | {r['val_auc_mean']:.4f} "
                     f"| {r['table_bytes']:,} | {r['table_bytes'] / base['table_bytes']:.3f} | "
                     f"{r['train_seconds_mean']:.1f} | {', '.join(map(str, r['epochs']))} |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    families = {"PTQ": ("#fd8d3c", "s"), "LPT": ("#6baed6", "o"), "ALPT": ("#31a354", "^")}
    base = next(r for r in rows if r["variant"] == "float32")
    ax.axhline(base["auc_mean"], color="#555555", ls="--", lw=1, label=f"float32 ({base['auc_mean']:.4f})")
    for family, (color, marker) in families.items():
        for variant_kind in sorted({r["variant"].split(" (")[0].split(" ", 1)[0] + ("" if "(" not in r["variant"]
                                    else " (" + r["variant"].split(" (", 1)[1]) for r in rows
                                    if r["variant"].startswith(family + " ")}):
            part = [r for r in rows if r["variant"].startswith(family + " ")
                    and (r["variant"].split(" (", 1)[1] if "(" in r["variant"] else "") ==
                    (variant_kind.split(" (", 1)[1] if "(" in variant_kind else "")]
            if not part:
                continue
            part.sort(key=lambda r: r["bits"])
            bits = np.array([r["bits"] for r in part], dtype=float)
            mean = np.array([r["auc_mean"] for r in part])
            err = np.array([[r["auc_mean"] - r["auc_min"] for r in part], [r["auc_max"] - r["auc_mean"] for r in part]])
            dashed = "nearest" in variant_kind or "lr" in variant_kind
            ax.errorbar(bits, mean, yerr=err, color=color, marker=marker, ls=":" if dashed else "-", capsize=3,
                        mfc="white" if dashed else color, label=variant_kind)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["bits"] for r in rows if r["variant"] != "float32"}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("bits per table entry")
    ax.set_ylabel("test AUC (mean, min–max over seeds)")
    ax.set_title("DeepFM, Criteo 10K: categorical tables in low precision", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    from tfemb.data.readers import data_dir

    if not (data_dir() / DATASET_FOLDER).is_dir():
        print(f"SKIPPED criteo: data folder {data_dir() / DATASET_FOLDER} is absent (set TFEMB_DATA_DIR to the "
              f"folder holding it); nothing written to {args.out}.")
        return 0
    import tensorflow as tf
    import yaml

    from tfemb import experiment
    from tfemb._keras import backend_name

    recipe = experiment.merge(experiment.DEFAULTS, yaml.safe_load(RECIPE.read_text()))
    recipe["train"]["verbose"] = 0
    bits, rates = args.bits, args.alpt_learning_rates
    if args.quick:
        recipe["train"]["epochs"] = 1
        bits, rates = [4], rates[:1]
    plan = variants(bits, rates)
    if args.quick:
        plan = [p for p in plan if "nearest" not in p[0]]
    regularizer = recipe["embedding"]["params"].get("embeddings_regularizer")
    prepared = experiment.prepare_data(recipe["data"])
    runs = {}
    start = time.time()
    for seed in range(args.seeds):
        for i, (name, embedding) in enumerate(plan, 1):
            section = recipe["embedding"] if embedding is None else {
                "scheme": embedding["scheme"],
                "params": {**embedding["params"], "embeddings_regularizer": regularizer, "seed": seed}}
            cfg = experiment.merge(recipe, {"name": name, "seed": seed})
            cfg["embedding"] = section
            result = experiment.run(cfg, prepared=prepared)
            model = result.pop("_model")
            b = embedding["params"]["bits"] if embedding else 32
            record = {"bits": b, "auc": result["metrics"]["auc"], "logloss": result["metrics"]["logloss"],
                      "val_auc": result["val_metrics"]["auc"], "train_seconds": result["train_seconds"],
                      "epochs": int(result["epochs"]), "table_bytes": table_bytes(model)}
            runs.setdefault(name, []).append(record)
            print(f"seed {seed} [{i}/{len(plan)}] {name}: test AUC {record['auc']:.4f}, val AUC "
                  f"{record['val_auc']:.4f}, {record['epochs']} epochs, {record['train_seconds']:.1f} s "
                  f"({time.time() - start:.0f} s so far)", flush=True)
            if embedding is None:  # post-training quantisation of this float32 model, every bit width
                for pb in bits:
                    saved = ptq_tables(model, pb)
                    batch = recipe["train"]["batch_size"]
                    test, val = evaluate(model, prepared, "test", batch), evaluate(model, prepared, "val", batch)
                    for layer, w in zip(model.embedding_list, saved):
                        layer.embeddings.assign(w)
                    runs.setdefault(f"PTQ {pb}-bit", []).append({
                        "bits": pb, "auc": test["auc"], "logloss": test["logloss"], "val_auc": val["auc"],
                        "train_seconds": 0.0, "epochs": 0, "table_bytes": table_bytes(model, pb)})
                    print(f"seed {seed}     PTQ {pb}-bit of it: test AUC {test['auc']:.4f}", flush=True)
            del model
    order = ["float32"] + [f"PTQ {b}-bit" for b in bits] + [n for n, _ in plan if n != "float32"]
    rows = aggregate({name: runs[name] for name in order if name in runs})
    meta = {"command": args.command, "seeds": args.seeds, "bits": bits, "alpt_learning_rates": rates,
            "when": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "tensorflow": tf.__version__,
            "keras": backend_name(), "wall_seconds": time.time() - start}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "low_precision.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / "low_precision.md").write_text(markdown(rows, meta))
    plot(rows, out / "low_precision.png")
    print(markdown(rows, meta))
    print(f"wrote {out / 'low_precision.json'}, low_precision.md and low_precision.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
