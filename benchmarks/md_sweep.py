"""Mixed-dimension (MD) embeddings vs uniform dimensions at equal parameter budgets (Ginart et al., 1909.11810).

What it measures:

- **CF** (MovieLens 100K and latest-small, ``CFNetwork``; binary "rating >= 4" and 5-class rating tasks) and
  **CTR** (Criteo 10K sample, ``DeepFM``). For every budget of a sweep, the **uniform** baseline is a
  ``FixedEmbedding`` of dim ``d`` (the model's ``embedding_dim`` is ``d``: ``RecModel`` needs every scheme to
  output ``embedding_dim``) and **MD** keeps the base dim ``d0`` (``embedding_dim = d0``, blocks projected up
  to it) at the same parameter count, for every temperature ``alpha``: the paper's comparison.
  Budgets are fractions of the fixed ``V x d0`` tables; ``d = max(1, round(fraction * d0))`` (fractions that
  round to the same ``d`` are run once) and MD is solved for exactly the uniform model's parameters
  (``compression = d0 / d``, projections counted): CF with ``scheme_factory("md", num_blocks=8, ...)``
  (Algorithm 2 blocks of each feature's counts, Algorithm 3 budget form), Criteo with
  ``md_field_factory`` (one block per field, the paper's CTR setting). The JSON reports both models' actual
  embedding parameters.
- **Quality** on the test split (the same random 80/10/10 split, seed 0, for every run; data prepared once
  per dataset/task): binary AUC, logloss, accuracy, MSE; multiclass accuracy and cross-entropy.
- **Training** follows the tuned recipes ``models/cf_movielens100k.yaml`` (both MovieLens sets) and
  ``models/deepfm_criteo10k.yaml`` when present: their network, optimizer, batch size and learning rate, and
  their table L2 (a whole-table Keras regularizer), which is applied to the uniform table and to every MD block
  table alike (the projections are not penalised; ``MixedDimensionEmbedding`` has no regularizer argument, so
  the benchmark sets it on the built block tables). Epochs and patience are capped at 20 and 2 (recipes: 40
  and 3; ``--epochs``, ``--patience``) to bound the sweep's time; the best validation epoch's weights are restored
  (val AUC for binary tasks, val cross-entropy for multiclass). Without a recipe: ``CFNetwork`` defaults,
  Adam 1e-3, batch 256. ``steps_per_execution`` only batches Keras steps into one call (same maths).
- **Throughput**, in the same process and with the same training settings: fixed at the full budget
  (``d0``), MD at a 4x smaller budget (``alpha=0.3``) and, for reference, uniform at ``d0/4``. Every model is
  traced and warmed up by one epoch (excluded), then the models take turns for ``--throughput-repeats``
  timed epochs each (no validation); examples/s is the best repeat (the shared machine adds noise only ever
  downward), with the median and the process CPU seconds per epoch beside it. Target: MD's examples/s >=
  fixed's.

At the full budget the solver gives every MD block ``d0``: that layer is the uniform ``d0`` table, so it is
not trained again (reported as "= uniform"). At 1/16 (uniform dim 1) MD cannot mix (one dim per id plus the
projections of two blocks exceed the budget): each feature falls back to one dim-1 block + projection.

Outputs (``--out``, default ``benchmarks/results``): ``md_sweep.json``, ``md_sweep.md`` (a table per
dataset/task), ``md_quality_vs_params.png`` (quality vs embedding parameters, one panel per dataset/task) and
``md_dims_vs_popularity.png`` (the dim MD assigns to each id vs its popularity rank, MovieLens users/items at
the 4x budget; Criteo field dims vs field size). Datasets whose folder is absent from ``$TFEMB_DATA_DIR``
(default ``../shared/data``) are skipped with a message. ``--datasets synthetic`` runs on the embedded
synthetic CF generator (for tests). ``--replot --findings FILE`` rewrites the Markdown (with a Findings section)
and the plots from an existing ``md_sweep.json`` without training.

Run from the repository root:

    python benchmarks/md_sweep.py            # full sweep: 105 trained runs, 26 min on 2 cores shared (load 4-8)
    python benchmarks/md_sweep.py --quick    # ML-100K binary, alpha 0.3, 3 budgets, < 3 min
"""

import argparse
import datetime
import fractions
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

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.get_logger().setLevel("ERROR")  # every run traces its own model: the retracing warnings are expected

import _benchcli  # noqa: E402
from tfemb import experiment, report  # noqa: E402
from tfemb._keras import IS_KERAS_3, keras  # noqa: E402
from tfemb.data import make_dataset  # noqa: E402
from tfemb.data import readers  # noqa: E402
from tfemb.layers import MixedDimensionEmbedding, scheme_factory  # noqa: E402
from tfemb.layers.md_dims import md_field_dims  # noqa: E402
from tfemb.layers.mixed_dimension_embedding import md_field_factory  # noqa: E402
from tfemb.models import get_model_class  # noqa: E402
from tfemb.tasks import compile_model  # noqa: E402

#: Dataset name -> how to load it and which network / base dim / recipe it uses.
DATASETS = {
    "ml100k": {"source": "movielens_100k", "folder": "movielens-100k", "kind": "cf", "model": "cf", "d0": 16,
               "tasks": ("binary", "multiclass"), "recipe": "cf_movielens100k.yaml"},
    "ml-latest-small": {"source": "movielens_latest_small", "folder": "movielens-latest-small", "kind": "cf",
                        "model": "cf", "d0": 16, "tasks": ("binary", "multiclass"), "recipe": "cf_movielens100k.yaml"},
    # The paper's CF setting: biased MF on rating regression (test MSE, lower is better).
    "ml100k-mf": {"source": "movielens_100k", "folder": "movielens-100k", "kind": "cf", "model": "mf", "d0": 16,
                  "tasks": ("regression",), "recipe": "mf_movielens100k.yaml"},
    "ml-latest-small-mf": {"source": "movielens_latest_small", "folder": "movielens-latest-small", "kind": "cf",
                           "model": "mf", "d0": 16, "tasks": ("regression",), "recipe": "mf_movielens100k.yaml"},
    "criteo": {"source": "criteo", "folder": "criteo", "kind": "ctr", "model": "deepfm", "d0": 16,
               "tasks": ("binary",), "recipe": "deepfm_criteo10k.yaml"},
    # Embedded generator (no files): for tests and smoke runs.
    "synthetic": {"source": "synthetic_cf", "folder": None, "kind": "cf", "model": "cf", "d0": 16,
                  "tasks": ("binary", "multiclass"), "recipe": None,
                  "params": {"num_users": 300, "num_items": 200, "num_rows": 6000, "seed": 0}},
}

#: Used when a dataset has no recipe in models/ (the brief's fallback).
FALLBACK_TRAIN = {"optimizer": "adam", "learning_rate": 1e-3, "batch_size": 256, "epochs": 10,
                  "early_stopping": {"patience": 2}, "embedding_optimizer": None}

#: Quality metric (higher is better unless ``lower_is_better``), loss metric, early-stopping monitor per task.
TASK_METRICS = {
    "binary": {"quality": "auc", "loss": "logloss", "monitor": "val_auc", "mode": "max",
               "all": ["auc", "logloss", "accuracy", "mse"]},
    "multiclass": {"quality": "accuracy", "loss": "cross_entropy", "monitor": "val_cross_entropy", "mode": "min",
                   "all": ["accuracy", "cross_entropy"]},
    "regression": {"quality": "mse", "loss": "mae", "monitor": "val_mse", "mode": "min", "all": ["mse", "mae"],
                   "lower_is_better": True},
}


def gain(task, md, uniform):
    """How much better MD's quality is than uniform's (> 0: MD better), whatever the metric's direction."""
    return (uniform - md) if TASK_METRICS[task].get("lower_is_better") else (md - uniform)

DEFAULT_BUDGETS = "1/16,1/8,1/4,1/2,1"


def log(msg=""):
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------ arguments
def parse_fraction(text):
    try:
        value = fractions.Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"budget fractions look like 1/8 or 0.25. Received: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"budget fractions must be in (0, 1]. Received: {text!r}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="ml100k,ml-latest-small,ml100k-mf,ml-latest-small-mf,criteo",
                   help=f"comma list of {', '.join(DATASETS)} (default: the three real ones)")
    p.add_argument("--tasks", default="binary,multiclass,regression",
                   help="comma list of binary, multiclass, regression (each dataset runs the ones it has)")
    p.add_argument("--alphas", default="0.1,0.2,0.3,0.4", help="MD temperatures (default 0.1,0.2,0.3,0.4)")
    p.add_argument("--budgets", default=DEFAULT_BUDGETS,
                   help=f"fractions of the fixed V x d0 tables (default {DEFAULT_BUDGETS}); uniform dim = "
                        "max(1, round(fraction * d0))")
    p.add_argument("--d0-cf", type=int, default=None, help="base dim of the CF runs (default 16, the recipe's)")
    p.add_argument("--d0-ctr", type=int, default=None, help="base dim of the Criteo runs (default 16)")
    p.add_argument("--num-blocks", type=int, default=8, help="MD blocks per CF feature (paper: k in 8..16)")
    p.add_argument("--round-pow2", action="store_true", help="round MD dims to powers of 2")
    p.add_argument("--projections-init", default=None,
                   help="initializer of the MD projections (default: the layer's, glorot_uniform as dlrm; e.g. "
                        "'identity': each projection starts as the first d_i rows of the identity)")
    p.add_argument("--match", choices=("nearest", "at_most"), default="nearest",
                   help="MD budget: nearest to the uniform count (default) or the plain budget form (<= it)")
    p.add_argument("--seeds", type=int, default=1, help="training seeds per run (same split); metrics averaged")
    p.add_argument("--epochs", type=int, default=None, help="max epochs (default: min(recipe, 20))")
    p.add_argument("--patience", type=int, default=None, help="early-stopping patience (default: min(recipe, 2))")
    p.add_argument("--batch-size", type=int, default=None, help="override the recipe's batch size")
    p.add_argument("--lr", type=float, default=None, help="override the recipe's learning rate")
    p.add_argument("--no-table-l2", action="store_true", help="drop the recipes' table L2 (for both uniform and MD)")
    p.add_argument("--steps-per-execution", type=int, default=8, help="Keras steps per call (speed only)")
    p.add_argument("--throughput-repeats", type=int, default=3, help="timed epochs per model (0: skip)")
    p.add_argument("--throughput-alpha", type=float, default=0.3, help="alpha of the MD throughput model")
    p.add_argument("--throughput-only", action="store_true",
                   help="no quality sweep: measure only the training throughput of each dataset (its first task "
                        "among --tasks) and replace the throughput section of an existing <out>/md_sweep.json "
                        "(quality runs, findings and plots are kept; --findings replaces the findings)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--findings", help="a Markdown file: its text becomes the 'Findings' section of md_sweep.md")
    p.add_argument("--replot", action="store_true",
                   help="no training: rewrite md_sweep.md and the plots from <out>/md_sweep.json (with --findings)")
    p.add_argument("--quick", action="store_true",
                   help="ML-100K binary, alpha 0.3, budgets 1/16,1/4,1, 4 epochs, 1 throughput repeat (< 3 min); "
                        "writes into outputs/bench-quick unless --out is given")
    p.add_argument("--out", default=None,
                   help="output folder (default: benchmarks/results; with --quick: outputs/bench-quick)")
    args = p.parse_args(argv)
    args.argv_text = _benchcli.argv_text(argv)
    if args.out is None:
        args.out = _benchcli.default_out(args.quick)
    _benchcli.check_min(p, args, {"seeds": 1, "epochs": 1, "patience": 0, "batch_size": 1, "num_blocks": 1,
                                  "d0_cf": 1, "d0_ctr": 1, "steps_per_execution": 1, "throughput_repeats": 0})
    if args.lr is not None and not args.lr > 0:
        p.error(f"--lr must be > 0. Received: {args.lr!r}")
    _benchcli.check_file(p, args.findings, "--findings")
    if args.quick:
        args.datasets = "ml100k" if args.datasets == p.get_default("datasets") else args.datasets
        args.tasks = "binary" if args.tasks == p.get_default("tasks") else args.tasks
        args.alphas = "0.3" if args.alphas == p.get_default("alphas") else args.alphas
        args.budgets = "1/16,1/4,1" if args.budgets == p.get_default("budgets") else args.budgets
        args.epochs = args.epochs or 4
        args.patience = args.patience or 1
        args.throughput_repeats = min(args.throughput_repeats, 1)
    args.datasets = _benchcli.split_list(p, "--datasets", args.datasets, allowed=DATASETS)
    args.tasks = _benchcli.split_list(p, "--tasks", args.tasks, allowed=TASK_METRICS)
    args.alphas = _benchcli.split_list(p, "--alphas", args.alphas, float, what="numbers",
                                       check=lambda a: None if a > 0 else "MD temperatures must be > 0")
    args.budgets = sorted(set(_benchcli.split_list(p, "--budgets", args.budgets, parse_fraction,
                                                   what="fractions like 1/8 or 0.25")))
    if not args.throughput_alpha > 0:
        p.error(f"--throughput-alpha must be > 0. Received: {args.throughput_alpha!r}")
    if args.replot and not (pathlib.Path(args.out) / "md_sweep.json").is_file():
        p.error(f"--replot rewrites <out>/md_sweep.json's report: there is none in --out {args.out!r}")
    _benchcli.check_out(p, args.out)
    if args.throughput_only and args.throughput_repeats < 1:
        p.error("--throughput-only needs --throughput-repeats >= 1")
    if args.throughput_only and args.replot:
        p.error("--throughput-only and --replot exclude each other")
    return args


# ------------------------------------------------------------------------------------------------ settings
def load_recipe(name):
    """The recipe dict from models/, or None when the file is absent."""
    if not name:
        return None
    path = REPO / "models" / name
    if not path.exists():
        return None
    import yaml

    with open(path) as fh:
        return yaml.safe_load(fh)


def settings_for(spec, args):
    """Training settings, network params, table regularizer and data params of one dataset."""
    recipe = load_recipe(spec["recipe"])
    train = dict(FALLBACK_TRAIN)
    model_params, table_reg, data_params, split = {}, None, dict(spec.get("params") or {}), None
    if recipe:
        train.update({k: v for k, v in (recipe.get("train") or {}).items()
                      if v is not None or k == "embedding_optimizer"})
        model_params = dict((recipe.get("model") or {}).get("params") or {})
        table_reg = ((recipe.get("embedding") or {}).get("params") or {}).get("embeddings_regularizer")
        data_params.update({k: v for k, v in ((recipe.get("data") or {}).get("params") or {}).items() if k != "task"})
        split = (recipe.get("data") or {}).get("split")
    patience = int((train.get("early_stopping") or {}).get("patience", 2))
    train["epochs"] = args.epochs if args.epochs else min(int(train["epochs"]), 20)
    train["patience"] = args.patience if args.patience else min(patience, 2)
    if args.batch_size:
        train["batch_size"] = args.batch_size
    if args.lr:
        train["learning_rate"] = args.lr
    if args.no_table_l2:
        table_reg = None
    return {
        "recipe": spec["recipe"] if recipe else None,
        "train": {k: train[k] for k in ("optimizer", "learning_rate", "batch_size", "epochs", "patience",
                                        "embedding_optimizer")},
        "model_params": model_params,
        "table_regularizer": table_reg,
        "data_params": data_params,
        "split": split or {"method": "random", "fractions": [0.8, 0.1, 0.1], "seed": 0},
    }


def data_available(spec):
    if spec["folder"] is None:
        return True, None
    path = readers.data_dir() / spec["folder"]
    return path.exists(), path


def prepare(spec, task, settings):
    params = dict(settings["data_params"])
    if spec["kind"] == "cf":
        params["task"] = task
    return experiment.prepare_data({"source": spec["source"], "params": params, "split": settings["split"]})


# ------------------------------------------------------------------------------------------------ models
def base_dim(spec, args):
    """d0 of a dataset: --d0-ctr / --d0-cf when given, else the dataset's default."""
    given = args.d0_ctr if spec["kind"] == "ctr" else args.d0_cf
    return int(given or spec["d0"])


def budget_dims(budgets, d0):
    """[(uniform dim, [requested fractions])] in ascending dim; fractions rounding to one dim share a run."""
    out = {}
    for f in budgets:
        d = max(1, int(round(float(f) * d0)))
        out.setdefault(min(d, d0), []).append(f)
    return sorted(out.items())


def model_features(spec, prepared):
    """The sparse features the model embeds (CF: user and item ids; CTR: every sparse field)."""
    if spec["kind"] == "cf":
        return ["user_id", "item_id"]
    return [f.name for f in prepared.schema.sparse_features]


def _md_factory(spec, prepared, d0, alpha, compression, args):
    extra = {"projections_initializer": args.projections_init} if args.projections_init else {}
    if spec["kind"] == "ctr":
        try:
            return md_field_factory(prepared.schema, d0, alpha=alpha, round_pow2=args.round_pow2,
                                    compression=compression, **extra)
        except ValueError as error:
            if "budget is too small" not in str(error):
                raise
            return smallest_field_factory(prepared.schema, d0)
    return scheme_factory("md", output_dim=d0, num_blocks=args.num_blocks, alpha=alpha, round_pow2=args.round_pow2,
                          compression=compression, **extra)


def _factory_parameters(factory, prepared, features):
    schema = prepared.schema
    return sum(int(factory(n, schema.vocabulary_size(n), schema.frequencies(n)).parameter_count()) for n in features)


def make_factory(spec, prepared, d0, dim, alpha, args):
    """``(factory, model embedding_dim, info)`` of a uniform (``alpha`` None) or MD variant at uniform dim ``dim``.

    MD's budget is the uniform model's parameter count ``U = sum_f V_f * dim``, i.e. ``compression = d0 / dim``.
    The budget form gives at most ``U`` but may fall short by up to one dim of a large block (the unpopular
    tail block of a CF feature, or a big CTR field): ~10% on MovieLens at 1/4. With ``--match nearest``
    (default) the budget is raised in 0.5% steps up to +20% and the MD layer whose total is nearest to ``U``
    (ties: not above) is kept, so the two models' parameter counts match as closely as the dims allow.
    """
    if alpha is None:
        return scheme_factory("fixed", output_dim=dim), dim, {}
    features = model_features(spec, prepared)
    target = sum(prepared.schema.vocabulary_size(n) for n in features) * dim
    compression = d0 / dim
    steps = [0.0] if args.match == "at_most" else [i * 0.005 for i in range(41)]
    best = None
    for delta in steps:
        factory = _md_factory(spec, prepared, d0, alpha, compression / (1 + delta), args)
        params = _factory_parameters(factory, prepared, features)
        score = (abs(params - target), params > target, delta)
        if best is None or score < best[0]:
            best = (score, factory, delta, params)
    _, factory, delta, params = best
    schema = prepared.schema
    dims = {n: factory(n, schema.vocabulary_size(n), schema.frequencies(n)).block_dims for n in features}
    info = {"compression_requested": compression, "compression_used": compression / (1 + delta),
            "budget_raised_by": delta, "target_parameters": target, "md_parameters": params,
            # Every block at d0 (no projection): the layer IS the uniform d0 table (the full budget).
            "degenerate": all(d == d0 for ds in dims.values() for d in ds)}
    return factory, d0, info


def smallest_field_factory(schema, d0):
    """Per-field MD at its smallest (every field dim 1 + a 1 x d0 projection): used when the budget is below it,
    as ``scheme_factory("md")`` does for CF (the run then reports its actual, larger parameter count)."""
    def build(feature_name, vocabulary_size, frequencies=None):
        return MixedDimensionEmbedding(vocabulary_size, d0, [vocabulary_size], [1], name=f"{feature_name}_embedding")

    build.field_dims = {f.name: 1 for f in schema.sparse_features}
    return build


class TablePartL2(keras.regularizers.Regularizer):
    """``l2 * sum(x[:entries] ** 2)``: the recipe's table L2 on the block tables at the front of an MD layer's
    flat parameter buffer, not on its projections (as when the tables were separate variables)."""

    def __init__(self, l2, entries):
        self.l2, self.entries = float(l2), int(entries)

    def __call__(self, x):
        return self.l2 * tf.reduce_sum(tf.square(tf.reshape(x, [-1])[:self.entries]))

    def get_config(self):
        return {"l2": self.l2, "entries": self.entries}


def _attach_table_l2(model, reg_config):
    """The recipe's whole-table L2 on every embedding table: FixedEmbedding tables and MD block tables."""
    if not reg_config:
        return
    for layer in model.embedding_list:
        if isinstance(layer, MixedDimensionEmbedding):
            base = keras.regularizers.get(dict(reg_config))
            l2 = float(base.get_config()["l2"])
            var, reg = layer.flat_parameters, TablePartL2(l2, layer._layout.table_size)
        else:
            var, reg = layer.embeddings, keras.regularizers.get(dict(reg_config))
        if IS_KERAS_3:
            var.regularizer = reg
        else:  # tf-keras: the same callable-loss mechanism add_weight(regularizer=) uses
            layer.add_loss(lambda v=var, r=reg: r(v))


def build_model(spec, prepared, factory, embedding_dim, settings, seed, steps_per_execution):
    tf.keras.utils.set_random_seed(seed)
    train = settings["train"]
    model = get_model_class(spec["model"])(
        prepared.schema, embeddings=factory, embedding_dim=embedding_dim,
        embedding_optimizer=train.get("embedding_optimizer"), **settings["model_params"])
    model.build()
    _attach_table_l2(model, settings["table_regularizer"])
    compile_model(model, optimizer=train["optimizer"], learning_rate=train["learning_rate"],
                  steps_per_execution=steps_per_execution)
    return model


class BestEpoch(keras.callbacks.Callback):
    """Early stopping that always ends on the best epoch's weights (also when the epoch cap is reached)."""

    def __init__(self, monitor, mode, patience):
        super().__init__()
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.best, self.best_epoch, self.weights, self.wait = None, None, None, 0

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        value = float(value)
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if better:
            self.best, self.best_epoch, self.wait = value, epoch + 1, 0
            self.weights = self.model.get_weights()
        else:
            self.wait += 1
            if self.wait >= self.patience:
                self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.weights is not None:
            self.model.set_weights(self.weights)


def table_report(model):
    rows = model.embedding_report()
    for row in rows:
        layer = model.embedding_layers[row["feature"]]
        if isinstance(layer, MixedDimensionEmbedding):
            row["block_sizes"] = list(layer.block_sizes)
            row["block_dims"] = list(layer.block_dims)
    return rows


def datasets(prepared, batch_size, seed):
    """Train (shuffled, full batches only: one traced shape; the order changes every epoch, so every row is
    used), validation and test (each one batch: one forward trace shared when the sizes match)."""
    x, y = prepared.arrays["train"]
    train = make_dataset(x, y, batch_size=batch_size, shuffle=True, seed=seed, drop_remainder=True)
    out = [train]
    for split in ("val", "test"):
        xs, ys = prepared.arrays[split]
        out.append(make_dataset(xs, ys, batch_size=len(ys)))
    return out


def fit_eval(spec, prepared, task, factory, embedding_dim, settings, seed, args):
    train = settings["train"]
    tm = TASK_METRICS[task]
    model = build_model(spec, prepared, factory, embedding_dim, settings, seed, args.steps_per_execution)
    train_ds, val_ds, test_ds = datasets(prepared, int(train["batch_size"]), seed)
    best = BestEpoch(tm["monitor"], tm["mode"], int(train["patience"]))
    start, cpu = time.perf_counter(), time.process_time()
    history = model.fit(train_ds, validation_data=val_ds, epochs=int(train["epochs"]), verbose=0, callbacks=[best],
                        shuffle=False)  # the dataset shuffles itself (seeded)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    metrics = model.evaluate(test_ds, verbose=0, return_dict=True)
    epochs = len(history.history.get("loss", []))
    out = {
        "metrics": {k: float(metrics[k]) for k in tm["all"] if k in metrics},
        "embedding_parameters": int(model.embedding_parameter_count()),
        "embedding_dim": int(model.embedding_dim),
        "epochs": epochs,
        "best_epoch": best.best_epoch,
        "validation": best.best,  # the monitored validation metric at the best epoch
        "train_seconds": seconds,
        "train_cpu_seconds": cpu_seconds,
        "fit_examples_per_second": (prepared.num_rows("train") // int(train["batch_size"])) * int(train["batch_size"])
        * epochs / max(seconds, 1e-9),  # tracing and validation included
        "tables": table_report(model),
    }
    del model
    keras.backend.clear_session()
    return out


# ------------------------------------------------------------------------------------------------ throughput
def measure_throughput(spec, prepared, d0, settings, args):
    """Fixed at d0, MD at d0 / 4 budget, uniform at d0 / 4, interleaved timed epochs in one process."""
    d4 = max(1, d0 // 4)
    # The MD model with the layer's default lookup ("auto": the small-table path on small vocabularies), then
    # the same model forced onto the per-id gather path, for the lever's effect in the same run.
    variants = [("fixed d0", None, d0, None), (f"md 4x alpha={args.throughput_alpha}", args.throughput_alpha, d4, None),
                ("uniform d0/4", None, d4, None),
                (f"md 4x alpha={args.throughput_alpha}, per-id gather lookup", args.throughput_alpha, d4, "gather")]
    batch = int(settings["train"]["batch_size"])
    train_ds = datasets(prepared, batch, 0)[0]
    rows = (prepared.num_rows("train") // batch) * batch  # full batches only
    built = []
    for name, alpha, dim, lookup in variants:
        factory, emb_dim, _ = make_factory(spec, prepared, d0, dim, alpha, args)
        model = build_model(spec, prepared, factory, emb_dim, settings, 0, args.steps_per_execution)
        if lookup is not None:
            for layer in model.embedding_list:
                if isinstance(layer, MixedDimensionEmbedding):
                    layer.lookup_mode = lookup
        start = time.perf_counter()
        model.fit(train_ds, epochs=1, verbose=0, shuffle=False)  # tracing + first touch: excluded
        built.append({"name": name, "model": model, "walls": [], "cpus": [],
                      "warmup_seconds": time.perf_counter() - start,
                      "embedding_parameters": int(model.embedding_parameter_count())})
    for _ in range(args.throughput_repeats):
        for entry in built:
            start, cpu = time.perf_counter(), time.process_time()
            entry["model"].fit(train_ds, epochs=1, verbose=0, shuffle=False)
            entry["walls"].append(time.perf_counter() - start)
            entry["cpus"].append(time.process_time() - cpu)
    out = []
    for entry in built:
        out.append({
            "variant": entry["name"],
            "embedding_parameters": entry["embedding_parameters"],
            "examples_per_second": rows / min(entry["walls"]),
            "median_examples_per_second": rows / float(np.median(entry["walls"])),
            "cpu_seconds_per_epoch": float(np.median(entry["cpus"])),
            "epoch_seconds": [float(w) for w in entry["walls"]],
            "warmup_seconds": entry["warmup_seconds"],
        })
        del entry["model"]
    keras.backend.clear_session()
    fixed, md, gather = out[0], out[1], out[3]
    return {
        "md_gather_over_fixed": gather["examples_per_second"] / fixed["examples_per_second"],
        "rows_per_epoch": rows,
        "batch_size": batch,
        "repeats": args.throughput_repeats,
        "runs": out,
        "md_over_fixed": md["examples_per_second"] / fixed["examples_per_second"],
        "md_over_fixed_median": md["median_examples_per_second"] / fixed["median_examples_per_second"],
        "md_over_fixed_cpu": fixed["cpu_seconds_per_epoch"] / max(md["cpu_seconds_per_epoch"], 1e-9),
        "target_met": md["examples_per_second"] >= fixed["examples_per_second"],
    }


# ------------------------------------------------------------------------------------------------ dims
def dims_by_rank(block_sizes, block_dims):
    """The dim of the id at each popularity rank (block i holds the next block_sizes[i] ranks)."""
    return np.repeat(np.asarray(block_dims, dtype=np.int64), np.asarray(block_sizes, dtype=np.int64))


def popularity_dims(spec, prepared, d0, alphas, args, compression=4):
    """For the dims plot: per CF feature, dims by popularity rank; for CTR, per field (size, dim)."""
    schema = prepared.schema
    if spec["kind"] == "ctr":
        sizes = {f.name: schema.vocabulary_size(f.name) for f in schema.sparse_features}
        dims = {str(a): md_field_dims(schema, d0, alpha=a, round_pow2=args.round_pow2, compression=compression)
                for a in alphas}
        return {"kind": "ctr", "compression": compression, "field_sizes": sizes, "field_dims": dims}
    features = {}
    for name in ("user_id", "item_id"):
        freq = np.asarray(schema.frequencies(name))
        per_alpha = {}
        for a in alphas:
            layer = scheme_factory("md", output_dim=d0, num_blocks=args.num_blocks, alpha=a,
                                   round_pow2=args.round_pow2, compression=compression)(name, freq.shape[0], freq)
            ranks = layer.ranks_array()
            by_rank = np.empty_like(ranks)
            by_rank[ranks] = np.arange(ranks.shape[0])  # id at each rank (blocks hold consecutive ranks)
            assert np.array_equal(layer.dims_per_id()[by_rank], dims_by_rank(layer.block_sizes, layer.block_dims))
            per_alpha[str(a)] = {"block_sizes": list(layer.block_sizes), "block_dims": list(layer.block_dims)}
        counts = np.sort(freq)[::-1]
        # ~200 log-spaced ranks are enough for the plot's count curve (and keep the JSON small).
        ranks = np.unique(np.geomspace(1, counts.shape[0], 200).round().astype(np.int64))
        features[name] = {"vocabulary_size": int(counts.shape[0]), "count_ranks": ranks.tolist(),
                          "counts_at_ranks": counts[ranks - 1].tolist(), "alphas": per_alpha}
    return {"kind": "cf", "compression": compression, "features": features}


# ------------------------------------------------------------------------------------------------ reporting
def fmt_frac(fracs):
    return ", ".join(str(f) for f in fracs)


def summarise(runs, task):
    """Rows of the per-dataset/task table: one per budget, uniform and each alpha side by side."""
    tm = TASK_METRICS[task]
    by_budget = {}
    for r in runs:
        by_budget.setdefault(r["uniform_dim"], {})[r["alpha"]] = r
    rows, loss_rows = [], []
    for dim in sorted(by_budget):
        group = by_budget[dim]
        uni = group.get(None)
        row = {"budget": str(fractions.Fraction(dim, group[next(iter(group))]["d0"])), "uniform dim": dim}
        loss_row = dict(row)
        if uni:
            row["uniform params"] = uni["embedding_parameters"]
            row[f"uniform {tm['quality']}"] = uni["metrics"].get(tm["quality"], float("nan"))
            loss_row[f"uniform {tm['loss']}"] = uni["metrics"].get(tm["loss"], float("nan"))
        mds = [(a, r) for a, r in sorted((a, r) for a, r in group.items() if a is not None)]
        if mds and uni:
            ratios = [r["embedding_parameters"] / uni["embedding_parameters"] for _, r in mds]
            row["MD/uniform params"] = f"{min(ratios):.3f}-{max(ratios):.3f}" if len(ratios) > 1 else f"{ratios[0]:.3f}"
        for a, r in mds:
            trained = r.get("trained", True)
            row[f"MD α={a:g}"] = r["metrics"].get(tm["quality"], float("nan")) if trained else "= uniform"
            loss_row[f"MD α={a:g}"] = r["metrics"].get(tm["loss"], float("nan")) if trained else "= uniform"
        q = [r["metrics"].get(tm["quality"], float("nan")) for _, r in mds if r.get("trained", True)]
        if q and uni:
            u = uni["metrics"].get(tm["quality"], float("nan"))
            row["best MD gain"] = float(np.nanmax([gain(task, v, u) for v in q]))
        elif mds:
            row["best MD gain"] = "(every block at d0)"
        rows.append(row)
        loss_rows.append(loss_row)
    return rows, loss_rows


def auto_findings(runs_by_key):
    """Plain counts: at how many budgets does MD beat uniform (any alpha / every alpha)."""
    lines = []
    for (dataset, task), runs in runs_by_key.items():
        tm = TASK_METRICS[task]
        by_dim = {}
        for r in runs:
            if r.get("trained", True):
                by_dim.setdefault(r["uniform_dim"], {})[r["alpha"]] = r["metrics"].get(tm["quality"], float("nan"))
        wins_any, wins_all, n, small = 0, 0, 0, []
        for dim, g in sorted(by_dim.items()):
            if None not in g or len(g) < 2:
                continue
            n += 1
            diffs = [gain(task, v, g[None]) for a, v in g.items() if a is not None]
            wins_any += max(diffs) > 0
            wins_all += min(diffs) > 0
            small.append(f"d={dim}: best MD {max(diffs):+.4f}, worst {min(diffs):+.4f}")
        if n:
            lines.append(f"- {dataset} / {task} ({tm['quality']}): some α beats uniform at {wins_any}/{n} budgets, "
                         f"every α at {wins_all}/{n}. " + "; ".join(small))
    return lines


def quality_plot(path, runs_by_key, alphas):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    keys = list(runs_by_key)
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.9 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        dataset, task = key
        tm = TASK_METRICS[task]
        runs = runs_by_key[key]
        uni = sorted((r["embedding_parameters"], r["metrics"].get(tm["quality"]), r["uniform_dim"])
                     for r in runs if r["alpha"] is None)
        if uni:
            ax.plot([u[0] for u in uni], [u[1] for u in uni], "k-o", lw=2, label="uniform")
            for x, y, d in uni:
                ax.annotate(f"d={d}", (x, y), textcoords="offset points", xytext=(3, -10), fontsize=7)
        for a in alphas:
            pts = sorted((r["embedding_parameters"], r["metrics"].get(tm["quality"]))
                         for r in runs if r["alpha"] == a and r.get("trained", True))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "--s", ms=4, label=f"MD α={a:g}")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("embedding parameters (log)")
        ax.set_ylabel(f"test {tm['quality']}")
        ax.set_title(f"{dataset} / {task}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dims_plot(path, dims_info):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for dataset, info in dims_info.items():
        if info["kind"] == "cf":
            panels += [(dataset, feature, info) for feature in info["features"]]
        else:
            panels.append((dataset, None, info))
    if not panels:
        return
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), squeeze=False)
    for ax, (dataset, feature, info) in zip(axes.flat, panels):
        if feature is not None:
            feat = info["features"][feature]
            for a, d in feat["alphas"].items():
                dims = dims_by_rank(d["block_sizes"], d["block_dims"])
                ax.step(np.arange(1, len(dims) + 1), dims, where="post", label=f"α={a}")
            twin = ax.twinx()
            twin.plot(feat["count_ranks"], np.maximum(feat["counts_at_ranks"], 0.5),
                      color="0.6", lw=1, alpha=0.7)
            twin.set_yscale("log")
            twin.set_ylabel("training count (grey)", fontsize=8)
            ax.set_xlabel("popularity rank (log)")
            ax.set_title(f"{dataset} {feature}: MD dims at {info['compression']}x budget", fontsize=9)
        else:
            sizes = info["field_sizes"]
            names = sorted(sizes, key=sizes.get)
            for a, dims in info["field_dims"].items():
                ax.plot([sizes[n] for n in names], [dims[n] for n in names], "o-", ms=3, label=f"α={a}")
            ax.set_xlabel("field vocabulary size (log; row popularity ∝ 1/size)")
            ax.set_title(f"{dataset} fields: MD dims at {info['compression']}x budget", fontsize=9)
        ax.set_xscale("log")
        ax.set_ylabel("assigned dim")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="center left")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(path, payload, runs_by_key):
    meta = payload["meta"]
    lines = ["# Mixed-dimension embeddings vs uniform dimensions at equal parameter budgets", "",
             f"`{('python benchmarks/md_sweep.py ' + meta['argv']).strip()}` ({meta['date']}, "
             f"{meta['total_seconds'] / 60:.1f} min wall"
             + (f", {meta['cpu_seconds'] / 60:.1f} CPU min" if meta.get("cpu_seconds") else "")
             + f", load average at the end {', '.join(f'{x:.1f}' for x in meta.get('load_average') or [])}, "
             f"TF {meta['tensorflow']}, {meta['keras']}). Quality on the test "
             "split (same random 80/10/10 split for every run); uniform = fixed tables of dim d (model dim d); MD = "
             "base dim d0 with projections, solved for the uniform model's parameter count (projections "
             "counted). Budget = d / d0 of the fixed V×d0 tables.", ""]
    if payload.get("findings"):
        lines += ["## Findings", "", payload["findings"], ""]
    for skip in payload["skipped"]:
        lines.append(f"- skipped: {skip}")
    if payload["skipped"]:
        lines.append("")
    for key, runs in runs_by_key.items():
        dataset, task = key
        s = payload["settings"][dataset]
        tm = TASK_METRICS[task]
        d0 = runs[0]["d0"]
        lines += [f"## {dataset} / {task} ({runs[0]['model']}, d0={d0})", "",
                  f"Training: recipe `{s['recipe'] or 'none (fallback)'}`; {json.dumps(s['train'])}; table L2: "
                  f"{json.dumps(s['table_regularizer'])}; seeds: {meta['seeds']}.", ""]
        rows, loss_rows = summarise(runs, task)
        better = "lower" if tm.get("lower_is_better") else "higher"
        lines += [f"Test {tm['quality']} ({better} is better; 'best MD gain' > 0: MD better than uniform):", "", report.markdown_table(rows),
                  f"Test {tm['loss']} (lower is better):", "", report.markdown_table(loss_rows)]
    if payload["throughput"]:
        lines += ["## Training throughput (same process, same settings)", "",
                  "Examples/s of one training epoch (best of the timed repeats; tracing and a warm-up epoch "
                  "excluded; no validation). MD at a 4× smaller budget vs fixed at the full budget; target: "
                  "ratio ≥ 1. The MD model uses the layer's default `lookup=\"auto\"` (the small-table path on "
                  "vocabularies of at most 2**18 d0-wide rows); the same model on the per-id gather path "
                  "(`lookup=\"gather\"`) is measured beside it.", ""]
        tr = meta.get("throughput_run")
        if tr:
            lines += [f"Measured apart from the quality sweep: `{('python benchmarks/md_sweep.py ' + tr['argv']).strip()}` "
                      f"({tr['date']}, {tr['repeats']} timed epochs per model, {tr['total_seconds'] / 60:.1f} min "
                      f"wall, load average at the end "
                      f"{', '.join(f'{x:.1f}' for x in tr.get('load_average') or [])}, TF {tr['tensorflow']}, "
                      f"{tr['keras']}).", ""]
        rows = []
        for dataset, t in payload["throughput"].items():
            for r in t["runs"]:
                rows.append({"dataset": dataset, "variant": r["variant"], "emb params": r["embedding_parameters"],
                             "examples/s (best)": r["examples_per_second"],
                             "examples/s (median)": r["median_examples_per_second"],
                             "CPU s/epoch": r["cpu_seconds_per_epoch"]})
        lines.append(report.markdown_table(rows))
        ratio_rows = [{"dataset": d, "MD/fixed (best)": t["md_over_fixed"], "MD/fixed (median)":
                       t["md_over_fixed_median"], "MD/fixed (CPU)": t["md_over_fixed_cpu"],
                       "per-id gather MD/fixed (best)": t.get("md_gather_over_fixed", float("nan")),
                       "target met": "yes" if t["target_met"] else "no"} for d, t in payload["throughput"].items()]
        lines.append(report.markdown_table(ratio_rows))
    lines += ["## Automatic summary", ""] + auto_findings(runs_by_key) + [""]
    lines += ["Plots: `md_quality_vs_params.png` (quality vs embedding parameters), `md_dims_vs_popularity.png` "
              "(MD dims vs popularity rank).", ""]
    with open(path, "w") as fh:
        fh.write("\n".join(lines))


# ------------------------------------------------------------------------------------------------ main
def run(args):
    t_start, cpu_start = time.perf_counter(), time.process_time()
    os.makedirs(args.out, exist_ok=True)
    payload = {"meta": {}, "settings": {}, "runs": [], "throughput": {}, "dims": {}, "skipped": []}
    plan = []  # (dataset, task)
    for dataset in args.datasets:
        spec = DATASETS[dataset]
        ok, path = data_available(spec)
        if not ok:
            msg = (f"{dataset}: data folder {path} is absent "
                   f"(set TFEMB_DATA_DIR to the folder holding {spec['folder']}/)")
            log(f"SKIP {msg}")
            payload["skipped"].append(msg)
            continue
        for task in args.tasks:
            if task in spec["tasks"]:
                plan.append((dataset, task))
            else:
                payload["skipped"].append(f"{dataset}/{task}: not a task of this dataset")
    if not plan:  # every dataset skipped: leave the results in --out as they are (no empty report over them)
        log("SKIPPED: no dataset/task to run" + (f" ({'; '.join(payload['skipped'])})" if payload["skipped"] else "")
            + f"; nothing written to {args.out}.")
        return payload
    # Count runs for progress / ETA.
    total = 0
    for dataset, task in plan:
        d0 = base_dim(DATASETS[dataset], args)
        total += len(budget_dims(args.budgets, d0)) * (1 + len(args.alphas)) * args.seeds
    log(f"md_sweep: {len(plan)} dataset/task pairs, {total} training runs, alphas {args.alphas}, "
        f"budgets {fmt_frac(args.budgets)}, seeds {args.seeds}")
    done, runs_by_key = 0, {}
    for dataset, task in plan:
        spec = DATASETS[dataset]
        d0 = base_dim(spec, args)
        settings = settings_for(spec, args)
        payload["settings"][dataset] = settings
        t0 = time.perf_counter()
        prepared = prepare(spec, task, settings)
        log(f"== {dataset} / {task}: {prepared.num_rows('train'):,} train / {prepared.num_rows('val'):,} val / "
            f"{prepared.num_rows('test'):,} test rows, d0={d0}, recipe {settings['recipe']}, "
            f"train {settings['train']} (data {time.perf_counter() - t0:.1f}s)")
        if dataset not in payload["dims"]:
            payload["dims"][dataset] = popularity_dims(spec, prepared, d0, args.alphas, args)
        key_runs = runs_by_key.setdefault((dataset, task), [])
        for dim, fracs in budget_dims(args.budgets, d0):
            uniform_params = None
            for alpha in [None] + list(args.alphas):
                per_seed = []
                factory, emb_dim, match_info = make_factory(spec, prepared, d0, dim, alpha, args)
                if match_info.get("degenerate"):
                    # MD with every block at d0 is the uniform d0 model itself: not trained again.
                    uni = next(r for r in key_runs if r["uniform_dim"] == dim and r["alpha"] is None)
                    record = dict(uni, kind="md_field" if spec["kind"] == "ctr" else "md", alpha=alpha,
                                  trained=False, budget_match=match_info,
                                  note="every MD block at d0: identical to the uniform d0 model (not retrained)")
                    payload["runs"].append(record)
                    key_runs.append(record)
                    done += args.seeds
                    log(f"[{done}/{total}] {dataset}/{task} budget {dim}/{d0} MD α={alpha:g}: every block at d0 "
                        "= the uniform model (not retrained)")
                    continue
                for seed in range(args.seeds):
                    start = time.perf_counter()
                    res = fit_eval(spec, prepared, task, factory, emb_dim, settings, seed, args)
                    per_seed.append(res)
                    done += 1
                    elapsed = time.perf_counter() - t_start
                    tm = TASK_METRICS[task]
                    name = "uniform" if alpha is None else f"MD α={alpha:g}"
                    log(f"[{done}/{total}] {dataset}/{task} budget {dim}/{d0} {name} seed {seed}: "
                        f"{tm['quality']}={res['metrics'].get(tm['quality'], float('nan')):.4f} "
                        f"{tm['loss']}={res['metrics'].get(tm['loss'], float('nan')):.4f}, "
                        f"{res['embedding_parameters']:,} params, {res['epochs']} ep (best {res['best_epoch']}), "
                        f"{time.perf_counter() - start:.1f}s; elapsed {elapsed / 60:.1f} min, "
                        f"ETA {elapsed / done * (total - done) / 60:.1f} min")
                metrics = {k: float(np.mean([r["metrics"][k] for r in per_seed])) for k in per_seed[0]["metrics"]}
                params = per_seed[0]["embedding_parameters"]
                if alpha is None:
                    uniform_params = params
                record = {
                    "dataset": dataset, "task": task, "model": spec["model"], "d0": d0,
                    "kind": "uniform" if alpha is None else ("md_field" if spec["kind"] == "ctr" else "md"),
                    "alpha": alpha, "uniform_dim": dim, "requested_fractions": [str(f) for f in fracs],
                    "budget_fraction": str(fractions.Fraction(dim, d0)),
                    "compression": None if alpha is None else d0 / dim,
                    "budget_match": match_info,
                    "embedding_dim": per_seed[0]["embedding_dim"],
                    "embedding_parameters": params,
                    "uniform_parameters": uniform_params,
                    "params_ratio_to_uniform": params / uniform_params if uniform_params else None,
                    "trained": True,
                    "metrics": metrics,
                    "metrics_std": {k: float(np.std([r["metrics"][k] for r in per_seed])) for k in metrics},
                    "per_seed": [{k: v for k, v in r.items() if k != "tables"} for r in per_seed],
                    "tables": per_seed[0]["tables"],
                }
                payload["runs"].append(record)
                key_runs.append(record)
        if args.throughput_repeats > 0 and dataset not in payload["throughput"]:
            log(f"   throughput on {dataset}/{task}: fixed d0={d0} vs MD at 4x smaller budget "
                f"({args.throughput_repeats} timed epochs each, interleaved) ...")
            t = measure_throughput(spec, prepared, d0, settings, args)
            t["task"] = task
            payload["throughput"][dataset] = t
            log("   " + "; ".join(f"{r['variant']}: {r['examples_per_second']:,.0f} ex/s "
                                  f"({r['embedding_parameters']:,} params)" for r in t["runs"])
                + f" -> MD/fixed = {t['md_over_fixed']:.2f} ({'met' if t['target_met'] else 'NOT met'})")
    total_seconds = time.perf_counter() - t_start
    payload["meta"] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "argv": args.argv_text,
        "quick": bool(args.quick), "datasets": args.datasets, "tasks": args.tasks, "alphas": args.alphas,
        "budgets": [str(b) for b in args.budgets], "d0": {d: base_dim(DATASETS[d], args) for d in args.datasets},
        "num_blocks": args.num_blocks, "round_pow2": args.round_pow2, "match": args.match, "seeds": args.seeds,
        "steps_per_execution": args.steps_per_execution, "total_seconds": total_seconds,
        "cpu_seconds": time.process_time() - cpu_start,  # all threads of this process
        "tensorflow": tf.__version__, "keras": keras_version(),
        "python": platform.python_version(), "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "data_dir": str(readers.data_dir()),
    }
    if args.findings:
        payload["findings"] = pathlib.Path(args.findings).read_text().strip()
    write_outputs(args, payload)
    log(f"in {total_seconds / 60:.1f} min ({payload['meta']['cpu_seconds'] / 60:.1f} CPU min)")
    return payload


def keras_version():
    from importlib import metadata

    name = "keras" if IS_KERAS_3 else "tf-keras"
    try:
        return f"{name} {metadata.version(name)}"
    except metadata.PackageNotFoundError:
        return name


def runs_by_key_of(payload):
    out = {}
    for r in payload["runs"]:
        out.setdefault((r["dataset"], r["task"]), []).append(r)
    return out


def write_outputs(args, payload):
    """md_sweep.json, md_sweep.md and the two plots from a payload (a new run or a --replot)."""
    runs_by_key = runs_by_key_of(payload)
    report.write_json(os.path.join(args.out, "md_sweep.json"), payload)
    write_markdown(os.path.join(args.out, "md_sweep.md"), payload, runs_by_key)
    plots = not args.no_plots and bool(runs_by_key)
    if plots:
        quality_plot(os.path.join(args.out, "md_quality_vs_params.png"), runs_by_key, payload["meta"]["alphas"])
        dims_plot(os.path.join(args.out, "md_dims_vs_popularity.png"), payload["dims"])
    log("")
    for line in auto_findings(runs_by_key):
        log(line)
    log(f"wrote {args.out}/md_sweep.json, md_sweep.md" + (", md_quality_vs_params.png, md_dims_vs_popularity.png"
                                                          if plots else ""))


def replot(args):
    """Rewrites the Markdown and plots from an existing md_sweep.json (adding --findings); no training."""
    path = os.path.join(args.out, "md_sweep.json")
    with open(path) as fh:
        payload = json.load(fh)
    if args.findings:
        payload["findings"] = pathlib.Path(args.findings).read_text().strip()
    write_outputs(args, payload)
    return payload


def run_throughput_only(args):
    """``--throughput-only``: the throughput of every dataset, merged into ``<out>/md_sweep.json`` (when present)
    in place of its throughput section; the quality runs, dims and findings of that file are kept."""
    t_start, cpu_start = time.perf_counter(), time.process_time()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "md_sweep.json")
    if os.path.exists(path):
        with open(path) as fh:
            payload = json.load(fh)
    else:
        payload = {"meta": {}, "settings": {}, "runs": [], "throughput": {}, "dims": {}, "skipped": []}
    measured = 0
    for dataset in args.datasets:
        spec = DATASETS[dataset]
        ok, folder = data_available(spec)
        if not ok:
            log(f"SKIP {dataset}: data folder {folder} is absent (set TFEMB_DATA_DIR to the folder holding "
                f"{spec['folder']}/)")
            continue
        measured += 1
        task = next((t for t in args.tasks if t in spec["tasks"]), spec["tasks"][0])
        d0 = base_dim(spec, args)
        settings = settings_for(spec, args)
        payload.setdefault("settings", {}).setdefault(dataset, settings)
        prepared = prepare(spec, task, settings)
        log(f"   throughput on {dataset}/{task}: fixed d0={d0} vs MD at 4x smaller budget "
            f"({args.throughput_repeats} timed epochs each, interleaved) ...")
        t = measure_throughput(spec, prepared, d0, settings, args)
        t["task"] = task
        payload["throughput"][dataset] = t
        log("   " + "; ".join(f"{r['variant']}: {r['examples_per_second']:,.0f} ex/s, "
                              f"{r['cpu_seconds_per_epoch']:.3f} CPU s/epoch" for r in t["runs"])
            + f" -> MD/fixed = {t['md_over_fixed']:.2f} (median {t['md_over_fixed_median']:.2f}, "
              f"CPU {t['md_over_fixed_cpu']:.2f}; {'met' if t['target_met'] else 'NOT met'})")
    if not measured:
        log(f"SKIPPED: no dataset to measure; nothing written to {args.out}.")
        return payload
    payload.setdefault("meta", {})["throughput_run"] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "argv": args.argv_text,
        "datasets": args.datasets, "repeats": args.throughput_repeats, "alpha": args.throughput_alpha,
        "steps_per_execution": args.steps_per_execution, "total_seconds": time.perf_counter() - t_start,
        "cpu_seconds": time.process_time() - cpu_start, "tensorflow": tf.__version__, "keras": keras_version(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if args.findings:
        payload["findings"] = pathlib.Path(args.findings).read_text().strip()
    if payload.get("meta", {}).get("date"):  # a quality sweep is there: rewrite its Markdown (plots unchanged)
        _write_tables(args, payload)
    else:  # no quality sweep to report beside it: the JSON only
        report.write_json(path, payload)
        log(f"wrote {path}")
    return payload


def _write_tables(args, payload):
    runs_by_key = runs_by_key_of(payload)
    report.write_json(os.path.join(args.out, "md_sweep.json"), payload)
    write_markdown(os.path.join(args.out, "md_sweep.md"), payload, runs_by_key)
    log(f"wrote {args.out}/md_sweep.json, md_sweep.md")


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        return replot(args)
    return run_throughput_only(args) if args.throughput_only else run(args)


if __name__ == "__main__":
    main()
