"""Streaming embedding-size search on MovieLens: FSE, SAM, DARTS, AutoEmb and ESAPN, test-then-train.

The protocol of the AutoEmb and ESAPN papers and of their authors' code (github.com/zgahhblhc/ESAPN,
``baselines/{Fixed,Darts,AutoEmb}``, ``model/train.py``):

- **Data**: MovieLens-100K and MovieLens latest-small (the papers use ml-20m and ml-latest; ours are the small
  sets in ``../shared/data``), every rating sorted by timestamp (stable), ids encoded by a Schema fitted on the
  whole stream (the authors' code also knows every id up front). Tasks: **binary** (rating >= 4, the papers'
  "high or low"), reporting accuracy and MSE, and **5-class** (the rating), accuracy and cross-entropy.
- **One pass**, batches of 500 in time order; every batch is first predicted (the forward pass of its training
  step, before the update), then trained on (``tfemb.autoemb.stream_fit`` / ``tfemb.esapn.stream_fit``). The
  quality figures are over the **test period**, the last ``--test-fraction`` (default 0.25: the code trains on
  15M of ml-20m's 20M rows, then tests on the rest, still updating) of the stream; the whole stream is reported
  too.
- **Network**: ``CFNetwork`` with the authors' defaults (BN on the concatenated embeddings, one 512-unit hidden
  layer with BN and tanh, a linear output). Adam 1e-3 for the model (``LR_model``), Adam 1e-4 for the
  architecture / policy parameters (``LR_darts``). Binary loss: MSE of the sigmoid output (the code's default
  ``Loss_Type="MSE_sigmoid"``; ``--binary-loss bce`` for log loss); 5-class: cross-entropy.
- **Methods** (candidate dims ``--candidates``, default ESAPN's {2, 4, 8, 16, 64, 128}):
  - ``fse``: one fixed table per side at the **sum** of the candidates (222; the papers' FSE / FIXED, as the
    code's ``fixed_emb_size = sum(Emb_Size)``); ``fse_max``: at the largest candidate (128), for reference.
  - ``sam``: AutoEmb's layer and controller, W and θ trained together on the training loss.
  - ``darts``: per-id learnable architecture logits, bilevel (θ on the previous batch, then W).
  - ``autoemb``: the controller (popularity one-hot, last weights, last loss), bilevel first-order DARTS.
  - ``esapn``: hard sizes per id grown by the two policy networks (``tfemb.esapn``; when available).
  Inference (and the exported model) of AutoEmb / SAM / DARTS keeps each id's highest-weighted candidate
  (``hard``); the stream's predictions are the soft training-mode ones, as in the papers.
- **Memory**: each method's exported embedding parameters (``embedding_parameter_count()``: hard selection,
  ESAPN's final sizes) against FSE; ESAPN's memory table as the paper's (ids per final size, total dims, FIXED,
  ratio).
- **Speed**: examples/s and CPU ms per example of the whole streaming step (θ / policy steps included), every
  method in the same process; ratio to FSE. Targets: AutoEmb and ESAPN <= 2x FSE's time per example. Two
  measurements: each seed's own stream (the methods one after another, so the machine's speed can drift
  between a method and FSE), and an **interleaved** pass (``--timing-passes``, default 1 per dataset and task):
  every method built afresh (seed 0) streams the same batches, the methods taking turns batch by batch in a
  random order, each batch's step timed (θ / policy step on the previous batch included, as in ``stream_fit``;
  the first 2 batches, tracing, left out). The interleaved ratios are the ones the targets are judged on.
- **By frequency** (the ESAPN paper's figure): test-period quality per bucket of the user's / item's running
  interaction count (1, 2-3, 4-7, ...), for every method.

Outputs (``--out``, default ``benchmarks/results``): ``streaming.json``, ``streaming.md``,
``streaming_quality.png`` (test quality per method and task, mean ± std over seeds), ``streaming_dims.png``
(selected dim vs popularity for AutoEmb and ESAPN) and ``streaming_by_frequency.png``. Datasets whose folder is
absent are skipped with the reason; ``--datasets synthetic`` uses the embedded generator (tests).

    python benchmarks/streaming.py                 # 2 datasets x 2 tasks x 6 methods x 3 seeds
    python benchmarks/streaming.py --quick         # ml100k binary, 1 seed, fse/autoemb/esapn on 20k rows
"""

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))

import _benchcli  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.get_logger().setLevel("ERROR")

from tfemb import esapn as esapn_module  # noqa: E402
from tfemb import report  # noqa: E402
from tfemb._keras import IS_KERAS_3, keras  # noqa: E402
from tfemb.data import readers  # noqa: E402
from tfemb.streaming import (  # noqa: E402
    BATCH, ESAPN_CANDIDATES, LABELS, LR_ARCH, LR_MODEL, METHODS, QUALITY, prepare_stream, run_method,
)

DATASETS = {
    "ml100k": {"source": "movielens_100k", "folder": "movielens-100k"},
    "ml-latest-small": {"source": "movielens_latest_small", "folder": "movielens-latest-small"},
    "synthetic": {"source": "synthetic_cf", "folder": None,
                  "params": {"num_users": 300, "num_items": 200, "num_rows": 6000, "seed": 0}},
}
DEFAULT_METHODS = ("fse", "sam", "darts", "autoemb", "esapn")


def log(msg=""):
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------ data
def load_stream(dataset, task, max_rows=None):
    """``(schema, x, y, info)``: every rating of ``dataset`` in time order, encoded (``prepare_stream``)."""
    spec = DATASETS[dataset]
    return prepare_stream(spec["source"], spec.get("params"), task, max_rows)


def data_available(dataset):
    folder = DATASETS[dataset]["folder"]
    if folder is None:
        return True, None
    path = readers.data_dir() / folder
    return path.exists(), path


# ------------------------------------------------------------------------------------------------ runs
def run_one(dataset, task, method, seed, stream, candidates, args):
    schema, x, y, _ = stream
    out = run_method(method, schema, x, y, task, candidates=candidates, seed=seed, test_fraction=args.test_fraction,
                     loss=args.binary_loss, keep_dims=seed == 0)
    del out["model"]
    keras.backend.clear_session()
    if out.get("dims_by_popularity"):  # per id is megabytes of JSON: keep the mean dim per popularity bucket
        out["dims_by_popularity"] = {n: dims_by_bucket(d["counts"], d["dims"])
                                     for n, d in out["dims_by_popularity"].items()}
    return {"dataset": dataset, "task": task, **out}


def dims_by_bucket(counts, dims):
    """Mean selected dim of the ids whose final stream count is in ``[2^b, 2^(b+1))`` (ids never seen left out):
    ``{"bucket_start": [...], "mean_dim": [...], "ids": [...]}``."""
    counts, dims = np.asarray(counts), np.asarray(dims, np.float64)
    seen = counts > 0
    b = np.floor(np.log2(counts[seen])).astype(np.int64)
    starts = sorted(set(b.tolist()))
    return {"bucket_start": [int(2 ** k) for k in starts],
            "mean_dim": [float(dims[seen][b == k].mean()) for k in starts],
            "ids": [int((b == k).sum()) for k in starts]}


# ------------------------------------------------------------------------------------------------ outputs
def interleaved_timing(stream, task, methods, candidates, args, passes=1, seed=0, warmup_batches=2):
    """Time per example of every method on the same batches, the methods taking turns batch by batch.

    Each method is built afresh (``tfemb.streaming.build``, ``seed``) and streams the whole stream once per pass,
    through the search's ``stream_batch``, as ``stream_fit`` steps it (the θ / policy step on the previous batch,
    then the training step on the batch, its outputs fetched), but the methods alternate at every batch in a
    random order, so a change in the machine's speed hits all of them alike. Returns ``{method: {"examples_per_second", "cpu_ms_per_example",
    "time_per_example_vs_fse", "cpu_vs_fse", "batches"}}``.
    """
    from tfemb.autoemb import _cpu_seconds
    from tfemb.data.splits import stream_batches
    from tfemb.streaming import build

    schema, x, y, _ = stream
    x = {k: x[k] for k in ("user_id", "item_id")}
    batches = [({k: tf.convert_to_tensor(v) for k, v in xb.items()}, tf.convert_to_tensor(yb))
               for xb, yb in stream_batches(x, y, batch_size=BATCH)]
    rng = np.random.default_rng(seed)
    wall = {m: 0.0 for m in methods}
    cpu = {m: 0.0 for m in methods}
    rows = {m: 0 for m in methods}
    for _ in range(passes):
        searches = {m: build(m, schema, task, candidates, seed, args.binary_loss)[0] for m in methods}


        previous = None
        for t, (xt, yt) in enumerate(batches):
            for method in rng.permutation(methods):
                w, c = time.perf_counter(), _cpu_seconds()
                out = searches[method].stream_batch(t, xt, yt, previous)  # as stream_fit steps the batch
                out[0].numpy(), out[1].numpy()  # the predictions and losses, as stream_fit fetches them
                if t >= warmup_batches:
                    wall[method] += time.perf_counter() - w
                    cpu[method] += _cpu_seconds() - c
                    rows[method] += int(yt.shape[0])
            previous = (xt, yt)
        del searches
        keras.backend.clear_session()
    out = {m: {"examples_per_second": rows[m] / wall[m], "cpu_ms_per_example": 1000.0 * cpu[m] / rows[m],
               "batches": len(batches), "passes": passes, "timed_rows": rows[m]} for m in methods}
    if "fse" in out:
        for m in methods:
            out[m]["time_per_example_vs_fse"] = out["fse"]["examples_per_second"] / out[m]["examples_per_second"]
            out[m]["cpu_vs_fse"] = out[m]["cpu_ms_per_example"] / out["fse"]["cpu_ms_per_example"]
    return out


def timing_markdown(timing):
    """The interleaved-timing table: one row per dataset / task, time per example vs FSE (CPU in brackets)."""
    pairs = [(d, t) for d in timing for t in timing[d]]
    if not pairs:
        return []
    methods = [m for m in timing[pairs[0][0]][pairs[0][1]] if m != "fse"]
    lines = ["| dataset / task | FSE examples/s | " + " | ".join(LABELS[m] for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for d, t in pairs:
        row = timing[d][t]
        cells = [f"{row[m]['time_per_example_vs_fse']:.2f}× ({row[m]['cpu_vs_fse']:.2f}×)"
                 if "time_per_example_vs_fse" in row[m] else f"{row[m]['examples_per_second']:,.0f} ex/s"
                 for m in methods]
        fse = f"{row['fse']['examples_per_second']:,.0f}" if "fse" in row else "n/a"
        lines.append(f"| {d} / {t} | {fse} | " + " | ".join(cells) + " |")
    return lines


def aggregate(runs):
    """Per (dataset, task, method): mean and std over seeds of the test metrics, params, speed."""
    groups = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["task"], r["method"]), []).append(r)
    rows = []
    for (dataset, task, method), rs in groups.items():
        row = {"dataset": dataset, "task": task, "method": method, "seeds": len(rs)}
        for m in QUALITY[task]:
            vals = [r["test"][m] for r in rs]
            row[m], row[m + "_std"] = float(np.mean(vals)), float(np.std(vals))
        row["embedding_parameters"] = float(np.mean([r["embedding_parameters"] for r in rs]))
        row["examples_per_second"] = float(np.mean([r["examples_per_second"] for r in rs]))
        row["cpu_ms_per_example"] = float(np.mean([r["cpu_ms_per_example"] for r in rs]))
        row["mean_dim"] = {n: float(np.mean([r["mean_dim"][n] for r in rs])) for n in rs[0]["mean_dim"]}
        rows.append(row)
    # Ratios to FSE of the same dataset / task (same process, same data).
    for row in rows:
        fse = next((r for r in rows if r["dataset"] == row["dataset"] and r["task"] == row["task"]
                    and r["method"] == "fse"), None)
        if fse:
            row["params_vs_fse"] = row["embedding_parameters"] / fse["embedding_parameters"]
            row["time_per_example_vs_fse"] = fse["examples_per_second"] / row["examples_per_second"]
            row["cpu_vs_fse"] = row["cpu_ms_per_example"] / fse["cpu_ms_per_example"]
    return rows


def markdown(payload):
    meta, rows = payload["meta"], payload["summary"]
    lines = ["# Streaming embedding-size search (test-then-train, one pass)", "",
             f"`python benchmarks/streaming.py {meta['argv']}` ({meta['date']}, {meta['total_seconds'] / 60:.1f} min, "
             f"load average at the end {', '.join(f'{v:.1f}' for v in meta['load_average'] or [])}, TF "
             f"{meta['tensorflow']}, Keras {meta['keras']}). Candidates {meta['candidates']}; batch {BATCH}; Adam "
             f"{LR_MODEL} (model), {LR_ARCH} (θ / policies); binary loss {meta['binary_loss']}; {meta['seeds']} "
             f"seed(s), mean ± std. Quality over the test period (the last {meta['test_fraction']:.0%} of the "
             "stream, still trained on as it streams); params: exported embedding parameters (hard selection / final "
             "sizes); time per example vs FSE: the whole step, θ / policy steps included, same process.", ""]
    for msg in payload["skipped"]:
        lines += [f"- skipped: {msg}"]
    for (dataset, task) in sorted({(r["dataset"], r["task"]) for r in rows}):
        q1, q2 = QUALITY[task]
        info = payload["data"].get(dataset, {}).get(task, {})
        lines += ["", f"## {dataset} / {task}", "",
                  f"{info.get('rows', 0):,} ratings, {info.get('users', 0):,} user ids, {info.get('items', 0):,} item "
                  "ids (OOV included).", "",
                  f"| method | test {q1} | test {q2} | embedding params | params vs FSE | mean dim (users / items) | "
                  "examples/s | time/example vs FSE | CPU vs FSE |", "|---|---|---|---|---|---|---|---|---|"]
        for r in [r for r in rows if r["dataset"] == dataset and r["task"] == task]:
            md = r["mean_dim"]
            dims = f"{md.get('user_id', float('nan')):.1f} / {md.get('item_id', float('nan')):.1f}" if md else "fixed"
            lines.append(f"| {LABELS[r['method']]} | {r[q1]:.4f} ± {r[q1 + '_std']:.4f} | {r[q2]:.4f} ± "
                         f"{r[q2 + '_std']:.4f} | {r['embedding_parameters']:,.0f} | {r.get('params_vs_fse', 1):.3f} | "
                         f"{dims} | {r['examples_per_second']:,.0f} | {r.get('time_per_example_vs_fse', 1):.2f}× | "
                         f"{r.get('cpu_vs_fse', 1):.2f}× |")
        hs = [x for x in payload["runs"] if x["dataset"] == dataset and x["task"] == task and "hard_vs_soft" in x]
        if hs:
            lines += ["", "Hard export vs the soft model on the test period (mean over seeds): "
                      + "; ".join(f"{LABELS[m]}: prediction agreement "
                                  f"{np.mean([x['hard_vs_soft']['agreement'] for x in hs if x['method'] == m]):.3f}, "
                                  f"mean |Δ| {np.mean([x['hard_vs_soft']['mean_abs'] for x in hs if x['method'] == m]):.4f}"
                                  for m in sorted({x['method'] for x in hs}))]
        mem = [x for x in payload["runs"] if x["dataset"] == dataset and x["task"] == task and x.get("memory")]
        if mem:
            lines += ["", "ESAPN memory (seed 0; ids per final size, as the paper's table):", "",
                      esapn_module.memory_table(mem[0]["memory"])]
    timing = payload.get("timing") or {}
    if timing:
        lines += ["", "## Time per example, interleaved (the targets' measurement)", "",
                  "Every method built afresh (seed 0) streams the same batches once, the methods taking turns batch by "
                  "batch in a random order; the whole step of each batch timed (θ / policy step included; the first "
                  "2 batches left out). Time per example vs FSE, wall clock (process CPU time in brackets); "
                  "target: AutoEmb and ESAPN ≤ 2×.", ""] + timing_markdown(timing)
    if payload.get("findings"):
        lines += ["", "## Findings", "", payload["findings"]]
    return "\n".join(lines) + "\n"


def quality_plot(path, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["dataset"], r["task"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.6), squeeze=False)
    for ax, (dataset, task) in zip(axes[0], keys):
        group = [r for r in rows if r["dataset"] == dataset and r["task"] == task]
        q = QUALITY[task][0]
        xs = np.arange(len(group))
        ax.bar(xs, [r[q] for r in group], yerr=[r[q + "_std"] for r in group], color="tab:blue", alpha=0.8)
        lo = min(r[q] - r[q + "_std"] for r in group)
        hi = max(r[q] + r[q + "_std"] for r in group)
        ax.set_ylim(lo - 0.3 * (hi - lo + 1e-3), hi + 0.3 * (hi - lo + 1e-3))
        ax.set_xticks(xs, [LABELS[r["method"]] for r in group], rotation=30, fontsize=8)
        for x_, r in zip(xs, group):
            ax.annotate(f"{r['embedding_parameters'] / 1e3:,.0f}k", (x_, lo - 0.25 * (hi - lo + 1e-3)), ha="center",
                        fontsize=7, color="0.3")
        ax.set_ylabel(f"test-period {q}")
        ax.set_title(f"{dataset} / {task} (grey: embedding params)", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dims_plot(path, runs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [r for r in runs if r.get("dims_by_popularity") and r["task"] == "binary"]
    if not panels:
        return
    keys = sorted({(r["dataset"], n) for r in panels for n in r["dims_by_popularity"]})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.6), squeeze=False)
    for ax, (dataset, feature) in zip(axes[0], keys):
        for r in [r for r in panels if r["dataset"] == dataset and feature in r["dims_by_popularity"]]:
            d = r["dims_by_popularity"][feature]
            ax.plot(d["bucket_start"], d["mean_dim"], "o-", ms=3, label=LABELS[r["method"]])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel(f"{feature} interactions in the stream (bucket start)")
        ax.set_ylabel("mean selected dim")
        ax.set_title(f"{dataset}: selected dim vs popularity", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def frequency_plot(path, runs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["dataset"], r["task"], f) for r in runs if r.get("by_frequency") for f in r["by_frequency"]})
    if not panels:
        return
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.4 * nrows), squeeze=False)
    for ax, (dataset, task, feature) in zip(axes.flat, panels):
        q = QUALITY[task][0]
        for method in METHODS:
            rs = [r for r in runs if r["dataset"] == dataset and r["task"] == task and r["method"] == method
                  and r.get("by_frequency")]
            if not rs:
                continue
            buckets = rs[0]["by_frequency"][feature]
            labels = [b["frequency"] for b in buckets]
            vals = [np.mean([next((x[q] for x in r["by_frequency"][feature] if x["frequency"] == lab), np.nan)
                             for r in rs]) for lab in labels]
            ax.plot(range(len(labels)), vals, "o-", ms=3, label=LABELS[method])
            ax.set_xticks(range(len(labels)), labels, rotation=45, fontsize=7)
        ax.set_xlabel(f"{feature} running frequency")
        ax.set_ylabel(f"test-period {q}")
        ax.set_title(f"{dataset} / {task}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="ml100k,ml-latest-small", help=f"comma list of {', '.join(DATASETS)}")
    p.add_argument("--tasks", default="binary,multiclass")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--candidates", default=",".join(map(str, ESAPN_CANDIDATES)))
    p.add_argument("--seeds", type=int, default=3, help="seeds per method (default 3)")
    p.add_argument("--timing-passes", type=int, default=1,
                   help="interleaved timing passes per dataset and task (default 1; 0: none): every method built "
                        "afresh streams the same batches, the methods taking turns batch by batch")
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--binary-loss", choices=("mse", "bce"), default="mse")
    p.add_argument("--max-rows", type=int, default=None, help="first rows of each stream only")
    p.add_argument("--quick", action="store_true",
                   help="ML-100K binary, FSE / AutoEmb / ESAPN on the first 20,000 rows, 1 seed, at most 1 timing "
                        "pass (options given explicitly are kept); writes into outputs/bench-quick unless --out is "
                        "given")
    p.add_argument("--out", default=None,
                   help="output folder (default: benchmarks/results; with --quick: outputs/bench-quick)")
    p.add_argument("--findings", default=None, help="a Markdown file: its text becomes the Findings section")
    p.add_argument("--replot", action="store_true",
                   help="no training: rewrite streaming.md and the plots from <out>/streaming.json (with --findings)")
    args = p.parse_args(argv)
    args.argv_text = _benchcli.argv_text(argv)
    if args.out is None:
        args.out = _benchcli.default_out(args.quick)
    if args.quick:  # the quick run's settings, where the option was not given
        quick = {"datasets": "ml100k", "tasks": "binary", "seeds": 1, "methods": "fse,autoemb,esapn"}
        for name, value in quick.items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
        args.max_rows = args.max_rows or 20000
        args.timing_passes = min(args.timing_passes, 1)
    args.datasets = _benchcli.split_list(p, "--datasets", args.datasets, allowed=DATASETS)
    args.tasks = _benchcli.split_list(p, "--tasks", args.tasks, allowed=QUALITY)
    args.methods = _benchcli.split_list(p, "--methods", args.methods, allowed=METHODS)
    args.candidates = tuple(_benchcli.split_list(p, "--candidates", args.candidates, int, what="integers",
                                                 check=lambda c: None if c >= 1 else "dims must be >= 1"))
    _benchcli.check_min(p, args, {"seeds": 1, "timing_passes": 0, "max_rows": 1})
    _benchcli.check_file(p, args.findings, "--findings")
    if args.replot and not (pathlib.Path(args.out) / "streaming.json").is_file():
        p.error(f"--replot rewrites <out>/streaming.json's report: there is none in --out {args.out!r}")
    _benchcli.check_out(p, args.out)
    if not 0.0 < args.test_fraction < 1.0:
        p.error(f"--test-fraction must be in (0, 1). Received: {args.test_fraction}")
    return args


def run(args):
    t0 = time.perf_counter()
    payload = {"meta": {}, "data": {}, "runs": [], "skipped": [], "timing": {}}
    plan = [(d, t) for d in args.datasets for t in args.tasks]
    total = len(plan) * len(args.methods) * args.seeds
    done = 0
    for dataset, task in plan:
        ok, folder = data_available(dataset)
        if not ok:
            msg = f"{dataset}: data folder {folder} is absent (set TFEMB_DATA_DIR to the folder holding it)"
            if msg not in payload["skipped"]:
                payload["skipped"].append(msg)
                log("SKIP " + msg)
            continue
        stream = load_stream(dataset, task, args.max_rows)
        payload["data"].setdefault(dataset, {})[task] = stream[3]
        log(f"== {dataset} / {task}: {stream[3]['rows']:,} ratings in time order, {stream[3]['users']:,} users, "
            f"{stream[3]['items']:,} items")
        for seed in range(args.seeds):
            for method in args.methods:  # methods take turns within a seed: load drifts hit all of them
                r = run_one(dataset, task, method, seed, stream, args.candidates, args)
                payload["runs"].append(r)
                done += 1
                q1, q2 = QUALITY[task]
                log(f"[{done}/{total}] {dataset}/{task} {LABELS[method]} seed {seed}: test {q1}={r['test'][q1]:.4f} "
                    f"{q2}={r['test'][q2]:.4f}, {r['embedding_parameters']:,} params, "
                    f"{r['examples_per_second']:,.0f} ex/s ({r['cpu_ms_per_example']:.3f} CPU ms/ex), "
                    f"{r['seconds']:.0f}s; elapsed {(time.perf_counter() - t0) / 60:.1f} min")
        if args.timing_passes > 0:
            timing = interleaved_timing(stream, task, args.methods, args.candidates, args, passes=args.timing_passes)
            payload["timing"].setdefault(dataset, {})[task] = timing
            log(f"   interleaved timing {dataset}/{task}: " + ", ".join(
                f"{LABELS[m]} {v['examples_per_second']:,.0f} ex/s"
                + (f" ({v['time_per_example_vs_fse']:.2f}x FSE)" if "time_per_example_vs_fse" in v else "")
                for m, v in timing.items()) + f"; elapsed {(time.perf_counter() - t0) / 60:.1f} min")
    if not payload["data"]:  # every dataset skipped: leave the results in --out as they are
        log(f"SKIPPED: no dataset to run; nothing written to {args.out}.")
        return payload
    payload["summary"] = aggregate(payload["runs"])
    payload["meta"] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "argv": args.argv_text,
        "candidates": list(args.candidates), "seeds": args.seeds, "test_fraction": args.test_fraction,
        "timing_passes": args.timing_passes,
        "binary_loss": args.binary_loss, "max_rows": args.max_rows, "total_seconds": time.perf_counter() - t0,
        "tensorflow": tf.__version__, "keras": "3" if IS_KERAS_3 else "2 (tf-keras)",
        "python": platform.python_version(), "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if args.findings:
        payload["findings"] = pathlib.Path(args.findings).read_text().strip()
    write_outputs(args.out, payload)
    return payload


def write_outputs(out, payload):
    os.makedirs(out, exist_ok=True)
    report.write_json(os.path.join(out, "streaming.json"), payload)
    with open(os.path.join(out, "streaming.md"), "w") as fh:
        fh.write(markdown(payload))
    if payload["summary"]:
        quality_plot(os.path.join(out, "streaming_quality.png"), payload["summary"])
        dims_plot(os.path.join(out, "streaming_dims.png"), payload["runs"])
        frequency_plot(os.path.join(out, "streaming_by_frequency.png"), payload["runs"])
    log(f"wrote {out}/streaming.json, streaming.md" + (" and the plots" if payload["summary"] else ""))


def replot(args):
    with open(os.path.join(args.out, "streaming.json")) as fh:
        payload = json.load(fh)
    for r in payload["runs"]:  # files written before the per-bucket form
        for n, d in (r.get("dims_by_popularity") or {}).items():
            if "counts" in d:
                r["dims_by_popularity"][n] = dims_by_bucket(d["counts"], d["dims"])
    if args.findings:
        payload["findings"] = pathlib.Path(args.findings).read_text().strip()
    write_outputs(args.out, payload)
    return payload


def main(argv=None):
    args = parse_args(argv)
    return replot(args) if args.replot else run(args)


if __name__ == "__main__":
    main()
