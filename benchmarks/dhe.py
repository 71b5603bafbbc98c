"""DHE (DeepHashEmbedding) against tables at equal parameter budgets, over several seeds.

Runs the compare spec ``benchmarks/specs/dhe_movielens.yaml`` (MovieLens latest-small, binary task, the CF
network; fixed-16, uniform fixed-4, hashing 4x, DHE at 4x with 1024 and 256 hashes, DHE at 1x) once per seed
(the recipe's ``seed``: weights, shuffling; the split stays the spec's) with ``tfemb.compare.run_compare``, and
writes the mean, min and max test AUC / logloss per variant, their embedding parameters and training seconds:

    python benchmarks/dhe.py                 # 3 seeds, ~12 min on 2 cores -> benchmarks/results/dhe.{json,md,png}
    python benchmarks/dhe.py --quick         # 1 seed, 1 epoch per variant -> outputs/bench-quick/

Real data comes from ``$TFEMB_DATA_DIR`` (default ``<repo>/../shared/data``); without MovieLens latest-small the
run is skipped and nothing is written.
"""

import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import _benchcli  # noqa: E402

SPEC = HERE / "specs" / "dhe_movielens.yaml"
DATASET_FOLDER = "movielens-latest-small"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant (default 3)")
    parser.set_defaults(quick_help="1 seed, 1 epoch per variant (a smoke test)")
    return _benchcli.parse_seeded(parser, argv, "dhe.py", {"seeds": 1})


def aggregate(runs_by_seed):
    """One row per variant (spec order): mean / min / max of test AUC and logloss over the seeds, parameters,
    mean training seconds and epochs."""
    rows = []
    for name in [r["name"] for r in runs_by_seed[0]]:
        results = [next(r for r in runs if r["name"] == name) for runs in runs_by_seed]
        auc = np.array([r["metrics"]["auc"] for r in results])
        logloss = np.array([r["metrics"]["logloss"] for r in results])
        rows.append({
            "variant": name,
            "embedding_parameters": int(results[0]["embedding_parameters"]),
            "embedding_bytes": int(results[0]["embedding_bytes"]),
            "auc_mean": float(auc.mean()), "auc_min": float(auc.min()), "auc_max": float(auc.max()),
            "logloss_mean": float(logloss.mean()),
            "train_seconds_mean": float(np.mean([r["train_seconds"] for r in results])),
            "epochs": [int(r["epochs"]) for r in results],
            "auc_per_seed": auc.tolist(),
        })
    return rows


def markdown(rows, meta):
    lines = [f"# DHE against tables at equal budgets ({meta['dataset']})", "", f"`{meta['command']}`", "",
             f"{meta['seeds']} seed(s), {meta['when']} UTC, TF {meta['tensorflow']}, {meta['keras']}. Spec: "
             f"`benchmarks/specs/dhe_movielens.yaml`. Test AUC: mean (min–max) over the seeds; training seconds: "
             f"mean per run (early stopping on val AUC, best weights restored).", "",
             "| variant | emb params | vs fixed-16 | test AUC | logloss | train s | epochs |",
             "|---|---|---|---|---|---|---|"]
    fixed = rows[0]["embedding_parameters"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['embedding_parameters']:,} | {r['embedding_parameters'] / fixed:.3f} | "
                     f"{r['auc_mean']:.4f} ({r['auc_min']:.4f}–{r['auc_max']:.4f}) | {r['logloss_mean']:.4f} | "
                     f"{r['train_seconds_mean']:.1f} | {', '.join(map(str, r['epochs']))} |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        kind = "DHE" if r["variant"].startswith("dhe") else ("hashing" if r["variant"].startswith("hashing")
                                                             else "fixed")
        marker = {"DHE": "o", "hashing": "s", "fixed": "^"}[kind]
        ax.errorbar(r["embedding_parameters"], r["auc_mean"],
                    yerr=[[r["auc_mean"] - r["auc_min"]], [r["auc_max"] - r["auc_mean"]]], fmt=marker, capsize=3)
        ax.annotate(r["variant"], (r["embedding_parameters"], r["auc_mean"]), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    params = [r["embedding_parameters"] for r in rows]
    ax.set_xlim(min(params) / 1.3, max(params) * 2.5)  # room for the labels right of the points
    ax.set_xlabel("embedding parameters (log scale)")
    ax.set_ylabel("test AUC (mean, min–max over seeds)")
    ax.set_title("DHE vs tables at equal budgets, MovieLens latest-small (binary)")
    ax.grid(True, alpha=0.3)
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

    from tfemb import compare
    from tfemb._keras import backend_name

    spec = yaml.safe_load(SPEC.read_text())
    if args.quick:
        spec = compare.quick_spec(spec)
    runs_by_seed = []
    start = time.time()
    for seed in range(args.seeds):
        seeded = compare.experiment.merge(spec, {"base": {"seed": seed}})
        print(f"== seed {seed} ({seed + 1}/{args.seeds}), {time.time() - start:.0f} s so far", flush=True)
        with tempfile.TemporaryDirectory() as scratch:  # compare's own tables, plot and export: not kept
            results = compare.run_compare(seeded, out_dir=scratch, log=lambda m: print(m, flush=True),
                                          export_budget=None)["results"]
        runs_by_seed.append(results)
    rows = aggregate(runs_by_seed)
    meta = {"command": args.command, "seeds": args.seeds, "dataset": "MovieLens latest-small, binary",
            "when": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "tensorflow": tf.__version__,
            "keras": backend_name(), "wall_seconds": time.time() - start}
    _benchcli.write_results(args.out, "dhe", {"meta": meta, "rows": rows}, markdown(rows, meta),
                            lambda path: plot(rows, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
