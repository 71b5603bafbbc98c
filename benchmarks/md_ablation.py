"""Where MD's quality goes: the dimension rule and the projections measured apart (Ginart et al., 1909.11810).

``md_sweep.py`` compares MD with uniform dimensions at equal parameter budgets, the paper's comparison. MD
changes two things at once: **who gets how many dims** (Algorithm 3's popularity rule over Algorithm 2's
blocks) and **how a vector is built** (a block table times a per-block projection to ``d0``, Algorithm 1). This
benchmark separates them. For each dataset / task and uniform dim ``d`` (a budget fraction of ``d0``), four
models are trained with the same recipe, seeds and split:

1. **uniform**: a ``FixedEmbedding`` of dim ``d`` in a model of dim ``d`` (``md_sweep``'s baseline);
2. **projected uniform**: one MD block of dim ``d`` for all ids with one projection ``d x d0`` (model dim ``d0``):
   the projection alone, no mixing;
3. **MD blocks, equal dims**: the MD layer's own Algorithm 2 blocks (by popularity), every block at ``d``, each
   with its own projection: MD's architecture with the dimension rule switched off;
4. **MD**: the same blocks with Algorithm 3's dims (``--alpha``) at the uniform model's parameter count
   (``md_sweep.make_factory``): the full method.

(3) vs (4) is the dimension rule's effect at (nearly) equal parameters, inside MD's architecture; (1) vs (2)
and (2) vs (3) are what the projections cost. ``--model-l2`` runs each setting with the recipe's model L2
(``recipe``) and with another value (e.g. ``0``: the MF recipe's per-example L2 off, where the uniform model
overfits as ``d`` grows, the regime of the paper's MF curves).

Outputs (``--out``, default ``benchmarks/results``): ``md_ablation.json``, ``md_ablation.md`` (mean ± std over
seeds) and ``md_ablation.png``. Datasets whose folder is absent are skipped with a message.

    python benchmarks/md_ablation.py                      # ML-100K and latest-small MF, 1/4 and 1/2, 3 seeds
    python benchmarks/md_ablation.py --datasets synthetic --tasks binary --seeds 1 --epochs 1   # smoke run
"""

import argparse
import datetime
import json
import os
import pathlib
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _benchcli  # noqa: E402
import md_sweep  # noqa: E402  (sets up sys.path for tfemb and TensorFlow's logging)
from tfemb import report  # noqa: E402
from tfemb.layers import MixedDimensionEmbedding, scheme_factory  # noqa: E402

VARIANTS = ("uniform", "projected uniform", "MD blocks, equal dims", "MD")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="ml100k-mf,ml-latest-small-mf",
                   help=f"comma list of {', '.join(n for n, s in md_sweep.DATASETS.items() if s['kind'] == 'cf')}")
    p.add_argument("--tasks", default="regression,binary", help="each dataset runs the first of these it has")
    p.add_argument("--budgets", default="1/4,1/2", help="fractions of d0: uniform dim d = fraction * d0")
    p.add_argument("--alpha", type=float, default=0.2, help="MD temperature of variant 4 (default 0.2)")
    p.add_argument("--model-l2", default="recipe,0",
                   help="comma list of the model's L2 (the MF / CF network 'l2' parameter): 'recipe' or a number")
    p.add_argument("--lrs", default=None,
                   help="comma list of learning rates (default: the recipe's); more than one needs --tune")
    p.add_argument("--tune", action="store_true",
                   help="tune every variant on the validation split: train it at each learning rate (--lrs) x "
                        "model L2 (--model-l2) and report the test quality of the grid point with the best mean "
                        "validation metric over seeds")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=40, help="max epochs (default 40; best validation epoch kept)")
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--num-blocks", type=int, default=8)
    p.add_argument("--d0-cf", type=int, default=None, help="base dim (default: the dataset's, 16)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--findings", help="a Markdown file: its text becomes the 'Findings' section of md_ablation.md")
    p.add_argument("--replot", action="store_true",
                   help="no training: rewrite md_ablation.md and the plot from <out>/md_ablation.json")
    p.add_argument("--out", default=_benchcli.default_out(), help="output folder (default: benchmarks/results)")
    args = p.parse_args(argv)
    args.argv_text = _benchcli.argv_text(argv)
    cf = [n for n, s in md_sweep.DATASETS.items() if s["kind"] == "cf"]
    args.datasets = _benchcli.split_list(p, "--datasets", args.datasets, allowed=cf)
    args.tasks = _benchcli.split_list(p, "--tasks", args.tasks, allowed=md_sweep.TASK_METRICS)
    args.budgets = sorted(set(_benchcli.split_list(p, "--budgets", args.budgets, md_sweep.parse_fraction,
                                                   what="fractions like 1/8 or 0.25")))
    _benchcli.check_min(p, args, {"seeds": 1, "epochs": 1, "patience": 0, "num_blocks": 1, "d0_cf": 1})
    _benchcli.check_file(p, args.findings, "--findings")
    if args.replot and not (pathlib.Path(args.out) / "md_ablation.json").is_file():
        p.error(f"--replot rewrites <out>/md_ablation.json's report: there is none in --out {args.out!r}")
    _benchcli.check_out(p, args.out)
    levels = []
    for value in args.model_l2.split(","):
        value = value.strip()
        if value == "recipe":
            levels.append(None)
        else:
            try:
                levels.append(float(value))
            except ValueError:
                p.error(f"--model-l2 takes 'recipe' or numbers. Received: {value!r}")
    args.model_l2 = levels
    rates = []
    for value in (args.lrs or "").split(","):
        if not value.strip():
            continue
        try:
            rates.append(float(value))
        except ValueError:
            p.error(f"--lrs takes numbers. Received: {value.strip()!r}")
        if not rates[-1] > 0:
            p.error(f"--lrs must be > 0. Received: {value.strip()!r}")
    args.lrs = rates or [None]
    if len(args.lrs) > 1 and not args.tune:
        p.error(f"several --lrs ({args.lrs}) need --tune (one table per learning rate is not written)")
    if not (args.alpha > 0):
        p.error(f"--alpha must be > 0. Received: {args.alpha}")
    return args


def sweep_args(args):
    """The ``md_sweep`` arguments these runs share (recipe, epochs, blocks, base dim)."""
    argv = ["--epochs", str(args.epochs), "--patience", str(args.patience), "--num-blocks", str(args.num_blocks),
            "--seeds", str(args.seeds), "--throughput-repeats", "0"]
    if args.d0_cf:
        argv += ["--d0-cf", str(args.d0_cf)]
    return md_sweep.parse_args(argv)


def factories(spec, prepared, d0, dim, alpha, sargs):
    """``[(variant, factory, model embedding_dim)]`` of the four models at uniform dim ``dim``."""
    md_factory, _, _ = md_sweep.make_factory(spec, prepared, d0, dim, alpha, sargs)
    blocks = md_sweep._md_factory(spec, prepared, d0, alpha, d0 / dim, sargs)

    def projected(name, size, frequencies=None):
        return MixedDimensionEmbedding(size, d0, block_sizes=[size], block_dims=[dim], name=f"{name}_embedding")

    def equal_dims(name, size, frequencies=None):
        layer = blocks(name, size, frequencies)  # Algorithm 2's blocks of this feature (the ids' ranks)
        return MixedDimensionEmbedding(size, d0, block_sizes=list(layer.block_sizes),
                                       block_dims=[dim] * layer.num_blocks, permutation=layer.permutation,
                                       oov_rank=layer.oov_rank, name=f"{name}_embedding")

    return [("uniform", scheme_factory("fixed", output_dim=dim), dim), ("projected uniform", projected, d0),
            ("MD blocks, equal dims", equal_dims, d0), ("MD", md_factory, d0)]


def grid_settings(base, learning_rate, model_l2):
    """``base`` (``md_sweep.settings_for``) with the learning rate and the model's L2 set (None: the recipe's)."""
    settings = dict(base, model_params=dict(base["model_params"]), train=dict(base["train"]))
    if model_l2 is not None:
        settings["model_params"]["l2"] = model_l2
    if learning_rate is not None:
        settings["train"]["learning_rate"] = learning_rate
    return settings


def train_point(spec, prepared, task, factory, emb_dim, settings, args, sargs):
    """One variant at one setting, every seed: the per-seed results and their means (validation, test)."""
    per_seed = [md_sweep.fit_eval(spec, prepared, task, factory, emb_dim, settings, seed, sargs)
                for seed in range(args.seeds)]
    values = [r["metrics"][md_sweep.TASK_METRICS[task]["quality"]] for r in per_seed]
    point = {"learning_rate": settings["train"]["learning_rate"], "model_l2": settings["model_params"].get("l2"),
             "per_seed": per_seed, "values": values, "test_mean": float(np.mean(values)),
             "validation_mean": float(np.mean([r["validation"] for r in per_seed]))}
    if args.tune:  # a grid takes minutes per variant: one line per point
        monitor = md_sweep.TASK_METRICS[task]["monitor"]
        md_sweep.log(f"    lr {point['learning_rate']:g}, L2 {point['model_l2']}: {monitor}="
                     f"{point['validation_mean']:.4f}")
    return point


def choice(row):
    """``"lr 0.01, L2 0.1"``: the learning rate and model L2 of a run row."""
    l2 = row["model_l2_value"]
    return f"lr {row['learning_rate']:g}, L2 {'none' if l2 is None else format(l2, 'g')}"


def select(tried, mode):
    """The grid point with the best mean validation metric (``mode`` ``"min"`` or ``"max"``); the first on ties.
    The test metric plays no part in the choice."""
    key = (lambda t: t["validation_mean"]) if mode == "min" else (lambda t: -t["validation_mean"])
    return min(tried, key=key)


def run(args):
    start, cpu = time.perf_counter(), time.process_time()
    sargs = sweep_args(args)
    payload = {"meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                        "argv": args.argv_text,
                        "alpha": args.alpha, "budgets": [md_sweep.fmt_frac([b]) for b in args.budgets],
                        "seeds": args.seeds, "epochs": args.epochs, "patience": args.patience,
                        "num_blocks": args.num_blocks, "tune": bool(args.tune),
                        "tensorflow": md_sweep.tf.__version__,
                        "keras": md_sweep.keras_version()},
               "settings": {}, "runs": [], "skipped": []}
    ran = False
    for dataset in args.datasets:
        spec = md_sweep.DATASETS[dataset]
        ok, folder = md_sweep.data_available(spec)
        if not ok:
            payload["skipped"].append(f"{dataset}: data folder {folder} is absent (set TFEMB_DATA_DIR)")
            md_sweep.log("SKIP " + payload["skipped"][-1])
            continue
        task = next((t for t in args.tasks if t in spec["tasks"]), None)
        if task is None:
            payload["skipped"].append(f"{dataset}: none of the tasks {args.tasks} (it has {list(spec['tasks'])})")
            md_sweep.log("SKIP " + payload["skipped"][-1])
            continue
        ran = True
        d0 = md_sweep.base_dim(spec, sargs)
        base = md_sweep.settings_for(spec, sargs)
        prepared = md_sweep.prepare(spec, task, base)
        quality = md_sweep.TASK_METRICS[task]["quality"]
        levels = [("tuned", None)] if args.tune else [("recipe" if l2 is None else f"{l2:g}", l2)
                                                      for l2 in args.model_l2]
        for label, level in levels:
            payload["settings"][f"{dataset}/{label}"] = (
                dict(base, grid={"learning_rate": [base["train"]["learning_rate"] if lr is None else lr
                                                   for lr in args.lrs],
                                 "model_l2": [base["model_params"].get("l2") if l2 is None else l2
                                              for l2 in args.model_l2]})
                if args.tune else grid_settings(base, args.lrs[0], level))
            for fraction in args.budgets:
                dim = max(1, int(round(fraction * d0)))
                for variant, factory, emb_dim in factories(spec, prepared, d0, dim, args.alpha, sargs):
                    points = ([(lr, l2) for lr in args.lrs for l2 in args.model_l2] if args.tune
                              else [(args.lrs[0], level)])
                    tried = [train_point(spec, prepared, task, factory, emb_dim, grid_settings(base, lr, l2), args,
                                         sargs) for lr, l2 in points]
                    best = select(tried, md_sweep.TASK_METRICS[task]["mode"])
                    per_seed = best["per_seed"]
                    row = {"dataset": dataset, "task": task, "model_l2": label,
                           "model_l2_value": best["model_l2"], "learning_rate": best["learning_rate"],
                           "budget": md_sweep.fmt_frac([fraction]), "uniform_dim": dim, "d0": d0,
                           "variant": variant, "metric": quality, "mean": best["test_mean"],
                           "std": float(np.std(best["values"])), "values": best["values"],
                           "validation_mean": best["validation_mean"],
                           "embedding_parameters": per_seed[0]["embedding_parameters"],
                           "best_epochs": [r["best_epoch"] for r in per_seed],
                           "block_dims": [t.get("block_dims") for t in per_seed[0]["tables"]]}
                    if args.tune:
                        row["grid"] = [{k: t[k] for k in ("learning_rate", "model_l2", "validation_mean",
                                                          "test_mean")} for t in tried]
                    payload["runs"].append(row)
                    chosen = f" (chosen: {choice(row)})" if args.tune else ""
                    md_sweep.log(f"{dataset}/{task} l2={label} d={dim} {variant:<22} {quality}={row['mean']:.4f} ± "
                                 f"{row['std']:.4f}{chosen} ({row['embedding_parameters']:,} params, best epochs "
                                 f"{row['best_epochs']}; {time.perf_counter() - start:.0f}s)")
    if not ran:  # every dataset skipped: leave the results in --out as they are (no empty report over them)
        md_sweep.log(f"SKIPPED: no dataset to run; nothing written to {args.out}.")
        return payload
    payload["meta"]["total_seconds"] = time.perf_counter() - start
    payload["meta"]["cpu_seconds"] = time.process_time() - cpu
    payload["meta"]["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if args.findings:
        payload["findings"] = pathlib.Path(args.findings).read_text().strip()
    write_outputs(args, payload)
    return payload


def groups(runs):
    out = {}
    for r in runs:
        out.setdefault((r["dataset"], r["task"], r["model_l2"], r["budget"]), {})[r["variant"]] = r
    return out


def markdown(payload):
    meta = payload["meta"]
    lines = ["# MD ablation: the dimension rule and the projections measured apart", "",
             f"`python benchmarks/md_ablation.py {meta['argv']}` ({meta['date']}, {meta['total_seconds'] / 60:.1f} "
             f"min, TF {meta['tensorflow']}, {meta['keras']}). MD α = {meta['alpha']}, {meta['num_blocks']} "
             f"blocks per feature, {meta['seeds']} seed(s) (mean ± std), best validation epoch of at most "
             f"{meta['epochs']} (patience {meta['patience']}); the same split and recipe for every model"
             f"{' (learning rate and model L2 tuned per variant, below)' if meta.get('tune') else ''}. Variants: "
             "**uniform** (fixed tables of dim d, model dim d), **projected uniform** (one block of dim d, one "
             "projection to d0), **MD blocks, equal dims** (MD's popularity blocks, every block at d, a projection "
             "each), **MD** (the same blocks with Algorithm 3's dims at the uniform model's parameter count).", ""]
    if meta.get("tune"):
        lines[-1:-1] = ["", "**Tuned**: every variant is trained at each learning rate x model L2 of the grid (every "
                        "seed) and reported at the grid point with the best mean validation metric; the test metric "
                        "plays no part in the choice. The chosen point is in the table, every point in the JSON "
                        "(`grid`)."]
    for msg in payload["skipped"]:
        lines.append(f"- skipped: {msg}")
    for (dataset, task, l2, budget), by in groups(payload["runs"]).items():
        first = next(iter(by.values()))
        tuned = "grid" in first
        lower = md_sweep.TASK_METRICS[task].get("lower_is_better", False)
        heading = ("tuned on validation" if tuned else f"model L2 {l2}" + (
            "" if first["model_l2_value"] is None else f" ({first['model_l2_value']:g})"))
        lines += ["", f"## {dataset} / {task}, {heading}"
                      f", budget {budget} (d = {first['uniform_dim']}, d0 = {first['d0']})", "",
                  f"| variant | test {first['metric']} ({'lower' if lower else 'higher'} is better) | vs uniform | "
                  "embedding params | best epochs | block dims (first feature) |" + (" chosen on validation |" if tuned else ""),
                  "|---|---|---|---|---|---|" + ("---|" if tuned else "")]
        uniform = by.get("uniform")
        for variant in VARIANTS:
            r = by.get(variant)
            if r is None:
                continue
            delta = r["mean"] - uniform["mean"] if uniform else float("nan")
            dims = r["block_dims"][0] if r["block_dims"] and r["block_dims"][0] else "-"
            lines.append(f"| {variant} | {r['mean']:.4f} ± {r['std']:.4f} | {delta:+.4f} | "
                         f"{r['embedding_parameters']:,} | {r['best_epochs']} | {dims} |"
                         + (f" {choice(r)} |" if tuned else ""))
    if payload.get("findings"):
        lines += ["", "## Findings", "", payload["findings"]]
    return "\n".join(lines) + "\n"


def plot(path, payload):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(groups(payload["runs"]))
    if not keys:
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(keys)), 4))
    width = 0.8 / len(VARIANTS)
    by_key = groups(payload["runs"])
    for i, variant in enumerate(VARIANTS):
        xs = [k + (i - 1.5) * width for k in range(len(keys))]
        means = [by_key[key].get(variant, {}).get("mean", np.nan) for key in keys]
        stds = [by_key[key].get(variant, {}).get("std", 0.0) for key in keys]
        ax.bar(xs, means, width, yerr=stds, label=variant, capsize=2)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{d}\n{'lr, L2 tuned' if l2 == 'tuned' else 'L2 ' + l2}, {b}" for d, _, l2, b in keys],
                       fontsize=7)
    values = [r["mean"] for r in payload["runs"]]
    spread = max(values) - min(values) or 1.0
    ax.set_ylim(min(values) - 0.3 * spread, max(values) + 0.3 * spread)
    ax.set_ylabel(f"test {payload['runs'][0]['metric']}")
    ax.set_title("MD ablation: uniform, projection only, MD blocks at equal dims, MD")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(args, payload):
    os.makedirs(args.out, exist_ok=True)
    report.write_json(os.path.join(args.out, "md_ablation.json"), payload)
    with open(os.path.join(args.out, "md_ablation.md"), "w") as fh:
        fh.write(markdown(payload))
    plots = not args.no_plots and bool(payload["runs"])
    if plots:
        plot(os.path.join(args.out, "md_ablation.png"), payload)
    md_sweep.log(f"wrote {args.out}/md_ablation.json, md_ablation.md" + (", md_ablation.png" if plots else ""))


def replot(args):
    with open(os.path.join(args.out, "md_ablation.json")) as fh:
        payload = json.load(fh)
    if args.findings:
        payload["findings"] = pathlib.Path(args.findings).read_text().strip()
    write_outputs(args, payload)
    return payload


def main(argv=None):
    args = parse_args(argv)
    return replot(args) if args.replot else run(args)


if __name__ == "__main__":
    main()
