"""Real-data quality: the deep recipes against a logistic-regression baseline on the same split.

What it runs (each model over ``--seeds``, default 0 1 2: the model's initialisation / shuffling seeds; the data
split is the recipe's and is the same for every model of a dataset):

- MovieLens 100K, binary task (rating >= 4), the recipes' random 80/10/10 split (seed 0):
  ``models/lr_movielens100k.yaml`` (baseline) vs ``models/cf_movielens100k.yaml`` (the criterion model, the
  AutoEmb/ESAPN CF network), with matrix factorisation and NeuMF for context;
- Criteo DAC 10K sample, the recipes' random 80/10/10 split (seed 0): ``models/lr_criteo10k.yaml`` vs
  ``models/deepfm_criteo10k.yaml`` (criterion), with DCN-v2 for context;
- Criteo again on a file-order split (first 80 % of the rows train, next 10 % validate, last 10 % test; the
  rows of Criteo's ``train.txt`` are in time order), LR vs DeepFM with the same recipes: a robustness check
  of the DeepFM defaults on a later, slightly shifted test period (``--no-time-order`` skips it).

The criterion (the project's issue): a deep model's mean test AUC must be no more than 0.005 below LR's on the
same split (``deep >= LR - 0.005``): PASS / FAIL per criterion row; the context rows show their gap only.
Every model is trained with its recipe's early stopping on the validation split (best weights restored) and
evaluated once on the test split.

Output: progress lines while running; ``<out>/real_data.json`` (environment, configs, per-seed results, the
summary) and ``<out>/real_data.md`` (tables). Exit status 1 when a criterion row fails.

Data: ``$TFEMB_DATA_DIR`` (default ``<repo>/../shared/data``), folders ``movielens-100k/`` and ``criteo/``. A
missing folder skips its dataset with the reason; with neither, nothing is written and the exit status is 0.

Run: ``python benchmarks/real_data.py`` (about 5 CPU-minutes under either Keras, so ~5 min wall on 2 free
cores; ``TF_USE_LEGACY_KERAS=1`` for Keras 2), ``--seeds 0`` for one seed, ``--datasets movielens`` for one
dataset. The report records wall and CPU time: on a shared machine the wall time is the larger.
"""

import argparse
import copy
import datetime
import json
import os
import pathlib
import platform
import resource
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

#: The criterion: a deep model may be at most this much below LR's mean test AUC.
AUC_TOLERANCE = 0.005

#: Context models, trained on the same prepared data as the criterion model (model and embedding sections
#: replace the deep recipe's; train settings are merged onto it). Settings picked on the validation split.
CONTEXT = {
    "movielens_100k": {
        "mf": {
            "model": {"name": "mf", "embedding_dim": 16, "params": {"l2": 1e-2}},
            "embedding": {"scheme": "fixed", "params": {}},
            "train": {},
        },
        "neumf": {
            "model": {"name": "neumf", "embedding_dim": 16, "params": {"dropout": 0.3}},
            "embedding": {"scheme": "fixed", "params": {}},
            "train": {},
        },
    },
    "criteo_10k": {
        "dcn_v2": {
            "model": {"name": "dcn_v2", "embedding_dim": 16,
                      "params": {"dnn_units": [128, 64], "dnn_dropout": 0.5, "l2_dnn": 1e-3}},
            "embedding": {"scheme": "fixed",
                          "params": {"embeddings_regularizer": {"class_name": "L2", "config": {"l2": 1e-3}}}},
            "train": {},
        },
    },
}

#: One suite per dataset: the data folder, the baseline and criterion recipes, and the extra split checks.
SUITES = [
    {"dataset": "movielens_100k", "folder": "movielens-100k", "baseline": "lr_movielens100k.yaml",
     "deep": "cf_movielens100k.yaml", "file_order_check": False},
    {"dataset": "criteo_10k", "folder": "criteo", "baseline": "lr_criteo10k.yaml",
     "deep": "deepfm_criteo10k.yaml", "file_order_check": True},
]


def log(message):
    print(message, flush=True)


def cpu_seconds():
    """User + system CPU time of this process (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def keras_version():
    """The running Keras' version (``tf.keras`` under Keras 2 has no ``__version__``; ``tf_keras`` has)."""
    from tfemb._keras import IS_KERAS_3, keras

    if IS_KERAS_3:
        return keras.__version__
    import tf_keras

    return tf_keras.__version__


# ------------------------------------------------------------------------------------------------ data
def file_order_prepared(cfg):
    """The Criteo recipe's data on a file-order (time-order) 80/10/10 split, as ``experiment.PreparedData``."""
    from tfemb import data as tfdata
    from tfemb.experiment import PreparedData

    params = dict(cfg["data"].get("params") or {})
    path = params.pop("path", None) or tfdata.require_data("criteo") / "criteo_train_head10k.txt"
    df = tfdata.read_criteo(path, nrows=params.pop("nrows", None))
    fractions = cfg["data"].get("split", {}).get("fractions", (0.8, 0.1, 0.1))
    # A temporal split on the row number: the library's cut points, in file order.
    parts = tfdata.temporal_split(df.assign(_row=np.arange(len(df))), "_row", fractions=fractions)
    frames = {name: part.drop(columns="_row").reset_index(drop=True)
              for name, part in zip(("train", "val", "test"), parts)}
    schema = tfdata.criteo_schema(**params)
    schema.fit(frames["train"])
    return PreparedData(schema, frames)


def same_data(a, b):
    return json.dumps(a["data"], sort_keys=True) == json.dumps(b["data"], sort_keys=True)


# ----------------------------------------------------------------------------------------------- train
def train_once(cfg, prepared, seed):
    from tfemb import experiment
    from tfemb._keras import keras

    keras.backend.clear_session()
    cfg = copy.deepcopy(cfg)
    cfg["seed"] = int(seed)
    cfg["train"]["verbose"] = 0
    result = experiment.run(cfg, prepared=prepared)
    result.pop("_model", None)
    val_auc = result["history"].get("val_auc") or [float("nan")]
    return {
        "seed": int(seed),
        "auc": result["metrics"]["auc"],
        "logloss": result["metrics"]["logloss"],
        "best_val_auc": float(np.nanmax(val_auc)),
        "epochs": result["epochs"],
        "best_epoch": int(np.nanargmax(val_auc)) + 1,
        "train_seconds": result["train_seconds"],
        "total_parameters": result["total_parameters"],
    }


def summarise(runs):
    auc = np.array([r["auc"] for r in runs])
    ll = np.array([r["logloss"] for r in runs])
    return {
        "auc_mean": float(auc.mean()), "auc_std": float(auc.std()),
        "logloss_mean": float(ll.mean()), "logloss_std": float(ll.std()),
        "best_val_auc_mean": float(np.mean([r["best_val_auc"] for r in runs])),
        "epochs": [r["epochs"] for r in runs],
        "train_seconds_mean": float(np.mean([r["train_seconds"] for r in runs])),
    }


# ---------------------------------------------------------------------------------------------- report
def markdown(report):
    env = report["environment"]
    lines = [
        "# Real data: deep recipes vs logistic regression",
        "",
        f"Generated {report['generated']} by `benchmarks/real_data.py` under Keras {env['keras']} "
        f"({env['keras_mode']}), TensorFlow {env['tensorflow']}, {env['cpus']} CPUs; "
        f"{report['total_seconds'] / 60:.1f} min wall, {report['cpu_seconds'] / 60:.1f} min CPU in all.",
        "",
        f"Reproduce: `{report.get('command') or 'python benchmarks/real_data.py'}`"
        + (" (with `TF_USE_LEGACY_KERAS=1` for Keras 2)" if env["keras_mode"] != "Keras 3" else ""),
        "",
        f"Test AUC and logloss: mean ± std over model seeds {report['seeds']} (same data split for every model "
        "of a dataset). Early stopping on the validation split's AUC, best weights restored. "
        f"**Criterion**: deep AUC ≥ LR AUC − {AUC_TOLERANCE} (means). Gap = model AUC − LR AUC.",
        "",
        "| dataset | split | model | role | test AUC | test logloss | gap vs LR | criterion | best val AUC "
        "| epochs | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        s = row["summary"]
        gap = "—" if row["role"] == "baseline" else f"{row['gap_vs_lr']:+.4f}"
        verdict = row.get("verdict") or ("—" if row["role"] == "baseline" else "(context)")
        verdict = f"**{verdict}**" if verdict in ("PASS", "FAIL") else verdict
        lines.append(
            f"| {row['dataset']} | {row['split']} | {row['model']} | {row['role']} | "
            f"{s['auc_mean']:.4f} ± {s['auc_std']:.4f} | {s['logloss_mean']:.4f} ± {s['logloss_std']:.4f} | "
            f"{gap} | {verdict} | {s['best_val_auc_mean']:.4f} | {','.join(map(str, s['epochs']))} | "
            f"{s['train_seconds_mean']:.1f} |"
        )
    lines += ["", "## Criteria", ""]
    for c in report["criteria"]:
        lines.append(
            f"- {c['dataset']} ({c['split']} split): {c['model']} {c['deep_auc']:.4f} vs LR {c['lr_auc']:.4f}, "
            f"gap {c['gap']:+.4f} (allowed ≥ {-AUC_TOLERANCE:+.3f}): **{c['verdict']}**"
        )
    if report["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {s}" for s in report["skipped"]]
    lines += [
        "",
        "## Notes",
        "",
        "- Recipes: `models/lr_movielens100k.yaml`, `models/cf_movielens100k.yaml`, `models/lr_criteo10k.yaml`, "
        "`models/deepfm_criteo10k.yaml` (`tfemb train --config ...`); context models' settings are in "
        "`CONTEXT` of the benchmark. Full configs are in `real_data.json`.",
        "- The Criteo sample's validation and test splits hold 1,000 rows each (~220 clicks): an AUC measured "
        "on them has a standard error of ~0.02, and the models' differences on the same rows are a few "
        "thousandths, so the seeds' spread understates the uncertainty of a comparison on another sample.",
        "- `file-order`: the first 80 % of `criteo_train_head10k.txt` train, the next 10 % validate, the last "
        "10 % test (Criteo's rows are in time order); the random split mixes the periods.",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=_benchcli.default_out(), help="output folder (default: benchmarks/results)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="model seeds (default 0 1 2)")
    parser.add_argument("--datasets", nargs="+", choices=("movielens", "criteo"), default=["movielens", "criteo"],
                        help="datasets to run (default both)")
    parser.add_argument("--no-context", action="store_true", help="skip the context models (MF, NeuMF, DCN-v2)")
    parser.add_argument("--no-time-order", action="store_true", help="skip the Criteo file-order split check")
    args = parser.parse_args(argv)
    args.command = _benchcli.command_line("real_data.py", argv)
    bad = [s for s in args.seeds if s < 0]
    if bad:
        parser.error(f"--seeds must be >= 0. Received: {bad[0]!r}")
    _benchcli.check_out(parser, args.out)
    return args


def main(argv=None):
    args = parse_args(argv)
    from tfemb.data import readers

    root = readers.data_dir()
    wanted = [s for s in SUITES if s["dataset"].split("_")[0] in args.datasets]
    suites, skipped = [], []
    for suite in wanted:
        folder = root / suite["folder"]
        if folder.is_dir():
            suites.append(suite)
        else:
            skipped.append(f"{suite['dataset']}: {folder} does not exist (set {readers.DATA_DIR_ENV} to the folder "
                           f"that holds {suite['folder']}/)")
    for message in skipped:
        log(f"SKIPPED {message}")
    if not suites:
        log("SKIPPED: no real dataset found; nothing written.")
        return 0

    import tensorflow as tf

    from tfemb import experiment
    from tfemb._keras import IS_KERAS_3

    start, cpu_start = time.perf_counter(), cpu_seconds()
    jobs = []  # (suite, split, model, role, cfg, prepared-key)
    prepared = {}
    configs = {}
    for suite in suites:
        base = experiment.load_config(str(REPO / "models" / suite["baseline"]))
        deep = experiment.load_config(str(REPO / "models" / suite["deep"]))
        if not same_data(base, deep):
            raise SystemExit(f"{suite['baseline']} and {suite['deep']} must have the same data section (same "
                             "features and split)")
        ds = suite["dataset"]
        log(f"preparing {ds} ({base['data']['source']}, {base['data']['split']['method']} split) ...")
        t = time.perf_counter()
        prepared[(ds, "random")] = experiment.prepare_data(base["data"])
        p = prepared[(ds, "random")]
        log(f"  {p.num_rows('train'):,} train / {p.num_rows('val'):,} val / {p.num_rows('test'):,} test rows "
            f"({time.perf_counter() - t:.1f} s)")
        configs[ds] = {"lr": base, deep["model"]["name"]: deep}
        split = base["data"]["split"]["method"]
        jobs.append((ds, split, "lr", "baseline", base))
        jobs.append((ds, split, deep["model"]["name"], "criterion", deep))
        if not args.no_context:
            for name, over in CONTEXT[ds].items():
                cfg = copy.deepcopy(deep)
                cfg["name"] = f"{name}_{ds}"
                cfg["model"], cfg["embedding"] = copy.deepcopy(over["model"]), copy.deepcopy(over["embedding"])
                cfg["train"] = experiment.merge(cfg["train"], over["train"])
                configs[ds][name] = cfg
                jobs.append((ds, split, name, "context", cfg))
        if suite["file_order_check"] and not args.no_time_order:
            prepared[(ds, "file-order")] = file_order_prepared(base)
            jobs.append((ds, "file-order", "lr", "baseline", base))
            jobs.append((ds, "file-order", deep["model"]["name"], "criterion", deep))

    total = len(jobs) * len(args.seeds)
    log(f"{total} training runs ({len(jobs)} models x {len(args.seeds)} seeds), Keras {keras_version()}")
    rows, done = [], 0
    for ds, split, name, role, cfg in jobs:
        data = prepared[(ds, "random" if split != "file-order" else "file-order")]
        runs = []
        for seed in args.seeds:
            r = train_once(cfg, data, seed)
            done += 1
            runs.append(r)
            log(f"[{done:2d}/{total}] {ds:14s} {split:10s} {name:7s} seed {seed}: test AUC {r['auc']:.4f} "
                f"logloss {r['logloss']:.4f} (best val AUC {r['best_val_auc']:.4f} at epoch {r['best_epoch']}, "
                f"{r['train_seconds']:.1f} s)")
        rows.append({"dataset": ds, "split": split, "model": name, "role": role, "runs": runs,
                     "summary": summarise(runs)})

    criteria = []
    for row in rows:
        lr_row = next(r for r in rows if r["dataset"] == row["dataset"] and r["split"] == row["split"]
                      and r["role"] == "baseline")
        row["gap_vs_lr"] = row["summary"]["auc_mean"] - lr_row["summary"]["auc_mean"]
        if row["role"] == "criterion":
            row["verdict"] = "PASS" if row["gap_vs_lr"] >= -AUC_TOLERANCE else "FAIL"
            criteria.append({"dataset": row["dataset"], "split": row["split"], "model": row["model"],
                             "deep_auc": row["summary"]["auc_mean"], "lr_auc": lr_row["summary"]["auc_mean"],
                             "gap": row["gap_vs_lr"], "verdict": row["verdict"]})

    report = {
        "generated": datetime.datetime.now().isoformat(timespec="seconds"),
        "environment": {
            "python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras_version(),
            "keras_mode": "Keras 3" if IS_KERAS_3 else "Keras 2 (tf-keras)", "platform": platform.platform(),
            "cpus": os.cpu_count(), "data_dir": str(root),
        },
        "seeds": list(args.seeds),
        "command": args.command,
        "criterion": f"deep test AUC (mean over seeds) >= LR test AUC (mean) - {AUC_TOLERANCE}, same split",
        "auc_tolerance": AUC_TOLERANCE,
        "configs": configs,
        "rows": rows,
        "criteria": criteria,
        "skipped": skipped,
        "total_seconds": time.perf_counter() - start,
        "cpu_seconds": cpu_seconds() - cpu_start,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "real_data.json", "w") as fh:
        json.dump(report, fh, indent=2)
    (out / "real_data.md").write_text(markdown(report))
    log("")
    for c in criteria:
        log(f"{c['verdict']}: {c['dataset']} ({c['split']}) {c['model']} AUC {c['deep_auc']:.4f} vs LR "
            f"{c['lr_auc']:.4f} (gap {c['gap']:+.4f}, allowed >= {-AUC_TOLERANCE:+.3f})")
    log(f"wrote {out / 'real_data.json'} and {out / 'real_data.md'} ({report['total_seconds'] / 60:.1f} min wall, "
        f"{report['cpu_seconds'] / 60:.1f} min CPU)")
    return 1 if any(c["verdict"] == "FAIL" for c in criteria) else 0


if __name__ == "__main__":
    sys.exit(main())
