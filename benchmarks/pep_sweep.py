"""PEP evidence: quality vs non-zero embedding parameters, against the fixed model and a uniform smaller dimension.

For every dataset / model (MovieLens-100K with the CF network; Criteo 10K with DeepFM and DCN-v2):

1. **Fixed baseline**: ``FixedEmbedding`` of the recipe's dimension ``d0``, trained with early stopping on the
   validation AUC (best weights restored). Model, table regularizer, batch size, learning rate and patience come
   from the tuned recipes ``models/cf_movielens100k.yaml`` and ``models/deepfm_criteo10k.yaml`` when present
   (DCN-v2 takes DeepFM's DNN settings); epochs are capped (``SETTINGS[...]["train"]["epochs"]``) and patience
   is at most 2 so the sweep fits its time budget.
2. **PEP search** from the same initial weights (the fixed model's initial tables are copied into the PEP tables,
   and every other weight too), thresholds ``feature_dim``, ``PEPSnapshots`` capturing every target (fractions of
   the dense count to keep: 0.5, 0.2, 0.1, 0.05, 0.01 = 50/80/90/95/99% fewer parameters). The search stops when
   all targets are reached or after its epoch budget; targets not reached are reported as such, with the fewest
   non-zeros reached. Never faked. The search leaves out the recipe's whole-table L2 on the embeddings: under
   Adam an L2 on rows that get no data gradient shrinks them by ~lr per step, so rarely seen rows vanish in the
   first epoch and the 50%/80% snapshots are taken almost before any training (on ML-100K the count fell to 10%
   in epoch 1 and the 90% ticket lost 0.026 AUC to the uniform model; a probe, see benchmarks/README.md).
3. **Retrain** each snapshot (the lottery ticket: ``tfemb.pep.retrain(mode="rewind")``, tables and dense weights
   back to their values before the search, masked) with exactly the fixed model's training settings, the recipe's
   table L2 included; test metrics. One retrain model is traced and reset for each snapshot (``reset_ticket``,
   tested equal to a fresh ``retrain``): tracing a 26-field Criteo model takes longer than retraining it.
4. **Uniform baseline**: a ``FixedEmbedding`` model whose dimension gives about the snapshot's parameter count,
   ``dim = max(1, round(nnz / ids))`` (ids = all rows of all tables), trained and evaluated the same way.
   "PEP is only useful if it beats simply using a smaller dimension." At 99% fewer parameters the uniform model
   cannot go below 1 dimension per id, so there it holds more parameters than PEP (reported).
5. **Mask controls** (``--controls``, default ``random,columns``): the same lottery-ticket retrain with a mask
   that PEP did not choose, at exactly the snapshot's count. ``random``: the snapshot's number of entries per
   table, drawn uniformly at random over the table (Frankle & Carbin's random-pruning control). ``columns``: each
   id keeps the number of dims PEP gave it, but at random columns. PEP's mask is worth its search only if it
   beats ``random``; where it also beats ``columns``, which columns it keeps matters beyond the sizes per id.

Search speed: per-step training time of the search (the PEPSnapshots counts and the threshold pressure included)
relative to the fixed model, (a) over the actual runs (median step, first steps of each fit excluded) and (b) in
interleaved bursts of steps after both have trained (fixed, PEP, fixed, PEP, ... on the same batches), which
cancels most of the drift of a shared machine's load. Both models use the same optimizer path: the stock Keras
Adam on every variable (as the recipes do for these small tables, and as the official PyTorch code does); tfemb's
row-sparse ``embedding_optimizer`` is used by neither.

Search hyper-parameters (``SETTINGS[...]["search"]``; benchmarks/README.md, "PEP evidence"). The official inits
(-15 for ml-1m, -150 for Criteo) with the official weight decay move the thresholds by ~lr per step from ~1e-7
(or exactly 0) to the scale of the entries: thousands of steps before anything is pruned, far beyond a short run
on a 10k-row sample. Here:

- a starting threshold ``g_scale * sigmoid(threshold_init) ~ 0.0075`` (``-6`` with ``g_scale = 3`` on ML-100K,
  ``-7.2`` with ``g_scale = 10`` on Criteo), below the entries' initial uniform(-0.05, 0.05) scale, so the search
  starts almost dense (the initial threshold itself prunes ~15%);
- ``g_scale``: the threshold's ceiling (L2 pulls ``s`` toward 0, so the threshold tends to ``g_scale / 2``); with
  the official ``g_scale = 1`` the count stalled at ~2% on ML-100K, with 3 at 3.5% on Criteo DeepFM;
- the threshold pressure: ``l2 * sum(s**2)`` on the thresholds (the official code's coupled weight decay on
  ``s``), starting gentle (``l2 = 1e-5``, so the loss decides which entries survive) and multiplied by 3 whenever
  the non-zero count fell by less than 15% over the last 200 steps while targets remain (``PressureSchedule``);
  a fixed strong pressure (1e-4) reaches 99% too but prunes popular and rare ids alike; a fixed gentle one
  stalls at ~4.5% on ML-100K;
- Criteo's search runs at learning rate 3e-3 (its recipe trains at 1e-3): thresholds move by ~lr per step, and
  the 8k-row sample gives 31 steps per epoch.

Metrics: exact AUC (Mann-Whitney, from the test predictions) and logloss; ΔAUC of PEP vs the uniform model with a
paired bootstrap 95% interval over the test rows (MovieLens: 10,000 test rows; Criteo 10K: only 1,000, so
differences under ~0.02 AUC are within noise there).

Outputs: ``<out>/pep_sweep.json``, ``pep_sweep.md``, ``pep_quality_vs_params.png``,
``pep_dims_vs_popularity.png``. A "## Findings" section written by hand into ``pep_sweep.md`` is kept when the
file is rewritten.

Run from the repository root::

    python benchmarks/pep_sweep.py                 # ml100k (CF) + criteo (DeepFM, DCN-v2), ~20 min on 2 cores
    python benchmarks/pep_sweep.py --quick         # ml100k only, targets 0.5 and 0.1, <= 3 epochs per model
    python benchmarks/pep_sweep.py --datasets criteo --models deepfm --seeds 2

Real data comes from ``$TFEMB_DATA_DIR`` (default ``<repo>/../shared/data``); a dataset that is absent is
skipped with a message. ``synthetic_cf`` (tfemb's generator, no files) is the dataset of the test.
"""

import argparse
import copy
import datetime
import json
import math
import os
import pathlib
import platform
import re
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: tfemb is imported from this checkout
    sys.path.insert(0, str(REPO))
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))

import _benchcli  # noqa: E402
import numpy as np  # noqa: E402

TARGETS = (0.5, 0.2, 0.1, 0.05, 0.01)
QUICK_TARGETS = (0.5, 0.1)
REPORT_TARGET = 0.1  # the snapshot whose sparsity_report (per popularity bucket) is written out
BOOTSTRAP = 500

#: Per-dataset data, models, dimension, training and search settings. ``recipe``: a tuned recipe in ``models/``
#: whose data, dimension, model parameters, table regularizer, batch size, learning rate and patience are used
#: when the file exists (another engineer's tuning on the validation split); ``train.epochs`` caps its epochs.
SETTINGS = {
    "ml100k": {
        "title": "MovieLens-100K (rating >= 4), CF network",
        "recipe": "cf_movielens100k.yaml",
        "data": {"source": "movielens_100k", "params": {"task": "binary"},
                 "split": {"method": "random", "fractions": [0.8, 0.1, 0.1], "seed": 0}},
        "requires": "movielens-100k",
        "models": ("cf",),
        "embedding_dim": 32,
        "model_params": {},
        "embedding_params": {},
        "train": {"batch_size": 256, "learning_rate": 2e-3, "epochs": 12, "patience": 2},
        "search": {"threshold_type": "feature_dim", "threshold_init": -6.0, "g_scale": 3.0, "threshold_l2": 1e-5,
                   "pressure_window": 200, "pressure_min_drop": 0.15, "pressure_factor": 3.0, "max_epochs": 40,
                   "check_every": 5},
    },
    "criteo": {
        "title": "Criteo 10K (train head, 8k/1k/1k rows)",
        "recipe": "deepfm_criteo10k.yaml",
        "data": {"source": "criteo", "params": {},
                 "split": {"method": "random", "fractions": [0.8, 0.1, 0.1], "seed": 0}},
        "requires": "criteo",
        "models": ("deepfm", "dcn_v2"),
        "embedding_dim": 16,
        "model_params": {},
        "embedding_params": {},
        "train": {"batch_size": 256, "learning_rate": 2e-3, "epochs": 12, "patience": 2},
        # g_scale 10 (init -7.2: the same starting threshold, 10 sigmoid(-7.2) ~ 0.0075): with g_scale 3 the
        # DeepFM search stalled at 3.5% kept, its threshold at the ceiling g_scale / 2 while the entries it had
        # to prune were larger.
        "search": {"threshold_type": "feature_dim", "threshold_init": -7.2, "g_scale": 10.0, "threshold_l2": 1e-5,
                   "pressure_window": 200, "pressure_min_drop": 0.15, "pressure_factor": 3.0, "max_epochs": 100,
                   "check_every": 5, "learning_rate": 3e-3},
    },
    "synthetic_cf": {
        "title": "synthetic CF (tfemb.data.make_synthetic_cf), CF network",
        "recipe": None,
        "data": {"source": "synthetic_cf",
                 "params": {"num_users": 300, "num_items": 200, "num_rows": 6000, "seed": 0},
                 "split": {"method": "random", "fractions": [0.8, 0.1, 0.1], "seed": 0}},
        "requires": None,
        "models": ("cf",),
        "embedding_dim": 8,
        "model_params": {},
        "embedding_params": {},
        "train": {"batch_size": 128, "learning_rate": 3e-3, "epochs": 2, "patience": 1},
        "search": {"threshold_type": "feature_dim", "threshold_init": -6.0, "g_scale": 3.0, "threshold_l2": 1e-5,
                   "pressure_window": 100, "pressure_min_drop": 0.15, "pressure_factor": 3.0, "max_epochs": 25,
                   "check_every": 5},
    },
}

#: Model parameters a recipe's model shares with another model of the sweep (DCN-v2 takes DeepFM's DNN and
#: embedding regularisation; it has no first-order terms).
SHARED_MODEL_PARAMS = {"dcn_v2": ("dnn_units", "dnn_dropout", "l2_dnn", "l2_embedding")}


def apply_recipe(setting):
    """``setting`` with its recipe's data, dimension, model / table parameters and training settings (the
    recipe's epochs are capped by ``setting["train"]["epochs"]``, its patience by ``setting["train"]["patience"]``)."""
    setting = copy.deepcopy(setting)
    path = REPO / "models" / setting["recipe"] if setting.get("recipe") else None
    if path is None or not path.exists():
        setting["recipe_used"] = None
        return setting
    import yaml

    recipe = yaml.safe_load(path.read_text())
    setting["recipe_used"] = f"models/{setting['recipe']}"
    setting["data"] = recipe["data"]
    setting["embedding_dim"] = int(recipe["model"].get("embedding_dim", setting["embedding_dim"]))
    setting["recipe_model"] = recipe["model"]["name"]
    setting["model_params"] = dict(recipe["model"].get("params") or {})
    setting["embedding_params"] = dict((recipe.get("embedding") or {}).get("params") or {})
    train = recipe.get("train") or {}
    patience = (train.get("early_stopping") or {}).get("patience", setting["train"]["patience"])
    setting["train"].update(batch_size=int(train.get("batch_size", setting["train"]["batch_size"])),
                            learning_rate=float(train.get("learning_rate", setting["train"]["learning_rate"])),
                            epochs=min(int(train.get("epochs", 10**6)), int(setting["train"]["epochs"])),
                            patience=min(int(patience), int(setting["train"]["patience"])))
    return setting


def model_params(setting, model_name):
    params = setting.get("model_params") or {}
    if setting.get("recipe_model") in (None, model_name):
        return dict(params)
    keep = SHARED_MODEL_PARAMS.get(model_name, ())
    return {k: v for k, v in params.items() if k in keep}


#: --quick: at most this many epochs per fixed / retrain / uniform model (the search keeps its budget: it stops
#: as soon as its targets are reached).
QUICK_EPOCHS = 3
TIMING_ROUNDS, TIMING_STEPS = 16, 40


def log(msg=""):
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------- metrics
def auc_score(y, p):
    """Exact ROC AUC (Mann-Whitney U with average ranks for ties)."""
    y = np.asarray(y).ravel().astype(bool)
    p = np.asarray(p, dtype=np.float64).ravel()
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    _, first, counts = np.unique(p[order], return_index=True, return_counts=True)
    ranks = np.empty(p.size)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def logloss(y, p):
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.clip(np.asarray(p, dtype=np.float64).ravel(), 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def paired_bootstrap_delta_auc(y, p_a, p_b, n=BOOTSTRAP, seed=0):
    """95% interval of AUC(a) - AUC(b) over test rows resampled with replacement (the same rows for both)."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y).ravel()
    deltas = []
    for _ in range(n):
        idx = rng.integers(0, y.size, y.size)
        deltas.append(auc_score(y[idx], p_a[idx]) - auc_score(y[idx], p_b[idx]))
    deltas = np.asarray([d for d in deltas if not math.isnan(d)])
    return [float(np.percentile(deltas, 2.5)), float(np.percentile(deltas, 97.5))]


# ---------------------------------------------------------------------------------------------- training
#: Mask controls (``--controls``, ``tfemb.pep.control_snapshot``): retrained like the PEP ticket, with a mask
#: PEP did not choose.
CONTROLS = ("random", "columns")


def _keras():
    from tfemb._keras import keras

    return keras


def make_step_timer(skip=2):
    keras = _keras()

    class StepTimer(keras.callbacks.Callback):
        """Wall and process-CPU time of each training batch, from the batch's begin to its end callbacks.

        Placed last in the callback list, so a batch's interval includes the other callbacks' batch-end work
        (PEPSnapshots' counts). The first ``skip`` batches of each ``fit`` (tracing) are left out.
        """

        def __init__(self):
            super().__init__()
            self.wall, self.cpu = [], []
            self.rounds = []  # per fit: the wall time of each timed batch
            self._n = 0
            self._t = None

        def on_train_begin(self, logs=None):
            self._n = 0
            self.rounds.append([])

        def on_train_batch_begin(self, batch, logs=None):
            self._t = (time.perf_counter(), time.process_time())

        def on_train_batch_end(self, batch, logs=None):
            wall, cpu = time.perf_counter() - self._t[0], time.process_time() - self._t[1]
            self._n += 1
            if self._n > skip:
                self.wall.append(wall)
                self.cpu.append(cpu)
                self.rounds[-1].append(wall)

    return StepTimer()


def make_epoch_log(prefix, snaps=None, pressure=None):
    keras = _keras()

    class EpochLine(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self._t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            parts = [f"{k}={float(logs[k]):.4f}" for k in ("val_auc", "val_logloss") if k in logs]
            if snaps is not None and snaps.last_count is not None:
                parts.append(f"non-zero {snaps.last_count:,}/{snaps.dense_count:,} "
                             f"({snaps.last_count / snaps.dense_count:.2%}), {len(snaps.snapshots)}/"
                             f"{len(snaps.targets)} targets")
            if pressure is not None:
                parts.append(f"threshold L2 {float(pressure.strength.numpy()):.1e}")
            log(f"      {prefix} epoch {epoch + 1}: {time.perf_counter() - self._t:.1f}s " + ", ".join(parts))

    return EpochLine()


def compile_for(model, train):
    from tfemb.tasks import compile_model

    compile_model(model, optimizer="adam", learning_rate=train["learning_rate"])
    return model


def train_model(model, prep, train, seed, prefix, early_stopping=True, extra_callbacks=()):
    """``fit`` with early stopping on the validation AUC (best weights restored); returns (epochs, seconds)."""
    keras = _keras()
    batch = int(train["batch_size"])
    callbacks = [make_epoch_log(prefix)] + list(extra_callbacks)
    val = prep.dataset("val", batch) if early_stopping else None
    if early_stopping:
        callbacks.insert(0, keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", restore_best_weights=True,
                                                          patience=int(train["patience"])))
    start = time.perf_counter()
    history = model.fit(prep.dataset("train", batch, shuffle=True, seed=seed), validation_data=val,
                        epochs=int(train["epochs"]), verbose=0, callbacks=callbacks)
    return len(history.history.get("loss", [])), time.perf_counter() - start


def test_metrics(model, prep, batch):
    x, y = prep.arrays["test"]
    from tfemb.data import make_dataset

    p = np.asarray(model.predict(make_dataset(x, None, batch_size=batch), verbose=0)).ravel()
    return {"auc": auc_score(y, p), "logloss": logloss(y, p)}, p


def _scheme_weight_ids(model):
    return {id(w) for layer in model.embedding_layers.values() for w in layer.weights}


def copy_initial_weights(fixed_initial, pep_model):
    """Starts the PEP search from the fixed model's initial weights: tables into V (and the rewind copy), the
    other weights (MLP, linear terms) one to one."""
    tables, others = fixed_initial
    for name, layer in pep_model.embedding_layers.items():
        layer.embeddings.assign(tables[name])
        if getattr(layer, "initial_embeddings", None) is not None:
            layer.set_initial_values()
    skip = _scheme_weight_ids(pep_model)
    targets = [w for w in pep_model.weights if id(w) not in skip]
    if [tuple(w.shape) for w in targets] != [v.shape for v in others]:
        raise RuntimeError("the PEP model's non-embedding weights do not match the fixed model's")
    for var, value in zip(targets, others):
        var.assign(value)


def initial_weights(model):
    from tfemb.layers.packed_embedding import to_numpy

    tables = {name: to_numpy(layer.embeddings) for name, layer in model.embedding_layers.items()}
    skip = _scheme_weight_ids(model)
    others = [to_numpy(w) for w in model.weights if id(w) not in skip]
    return tables, others


def optimizer_variables(optimizer):
    variables = optimizer.variables
    return list(variables() if callable(variables) else variables)


def reset_optimizer(optimizer):
    """Zeroes an optimizer's state (step count, moments), keeping its learning rate: as freshly compiled."""
    import tensorflow as tf

    for var in optimizer_variables(optimizer):
        if "learning_rate" not in (getattr(var, "path", None) or var.name):
            var.assign(tf.zeros(tuple(var.shape), tf.as_dtype(var.dtype)))


def reset_ticket(ticket, snapshot):
    """Makes a retrained model (``tfemb.pep.retrain`` output, trained already) the lottery ticket of another
    snapshot: masks, rewound tables, the dense weights from the start of the search, a fresh optimizer state.
    Same weights as ``retrain(searched_model, snapshot, mode="rewind")`` (the test checks it); it reuses the
    traced train step, which on the 26-field Criteo models takes longer than the retraining itself."""
    from tfemb.pep import _dense_weights, pep_layers

    layers = pep_layers(ticket)
    for name, layer in layers.items():
        layer.set_mask(snapshot.masks[name])
        layer.rewind(snapshot.initial_values[name])
    targets = _dense_weights(ticket, layers)
    if [tuple(v.shape) for v in targets] != [np.shape(w) for w in snapshot.initial_weights]:
        raise RuntimeError("the snapshot's initial weights do not match the retrained model's")
    for var, value in zip(targets, snapshot.initial_weights):
        var.assign(value)
    if ticket.optimizer is not None:
        reset_optimizer(ticket.optimizer)
    return ticket


def step_summary(timer, batch):
    wall, cpu = np.asarray(timer.wall), np.asarray(timer.cpu)
    if wall.size == 0:
        return {"steps": 0}
    # Amortised: each round's mean step (every batch, the counting ones included), the median over rounds.
    rounds = [np.mean(r) for r in getattr(timer, "rounds", []) if r]
    amortised = float(np.median(rounds) * 1e3) if rounds else float("nan")
    return {"steps": int(wall.size), "median_step_ms": float(np.median(wall) * 1e3), "amortised_step_ms": amortised,
            "mean_step_ms": float(wall.mean() * 1e3), "median_cpu_ms": float(np.median(cpu) * 1e3),
            "mean_cpu_ms": float(cpu.mean() * 1e3), "us_per_example": float(np.median(wall) / batch * 1e6)}


def interleaved_timing(fixed, pep, prep, train, check_every, seed, extra=None):
    """Alternating bursts of training steps (fixed, PEP, ...) on the same batches: per-step wall and CPU.

    ``extra``: optional ``{name: model}`` of further variants, timed in the same rounds (train step alone)."""
    from tfemb.pep import PEPSnapshots

    batch = int(train["batch_size"])
    ds = prep.dataset("train", batch, shuffle=True, seed=seed + 1).take(TIMING_STEPS + 2)
    extra = dict(extra or {})
    timers = {"fixed": make_step_timer(), "pep": make_step_timer(), "pep_without_counts": make_step_timer()}
    timers.update({name: make_step_timer() for name in extra})
    # The search's counting cost: one callback for all rounds, as one search has one (its count function is
    # traced once; a new callback per round would add a retrace to every round).
    counter = PEPSnapshots([1], check_every=check_every, capture_initial=False)
    for _ in range(TIMING_ROUNDS):
        fixed.fit(ds, epochs=1, verbose=0, callbacks=[timers["fixed"]])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pep.fit(ds, epochs=1, verbose=0, callbacks=[counter, timers["pep"]])
        pep.fit(ds, epochs=1, verbose=0, callbacks=[timers["pep_without_counts"]])  # the train step alone
        for name, model in extra.items():
            model.fit(ds, epochs=1, verbose=0, callbacks=[timers[name]])
    return {k: step_summary(t, batch) for k, t in timers.items()}


_PRESSURE_CLASS = None


def threshold_pressure(l2):
    """An L2 regularizer of the thresholds, ``l2 * sum(s**2)``, whose strength is a variable (shared by every
    PEP table of a model, raised by ``make_pressure_schedule`` without retracing the train step)."""
    global _PRESSURE_CLASS
    if _PRESSURE_CLASS is None:
        import tensorflow as tf

        keras = _keras()

        @keras.utils.register_keras_serializable(package="tfemb_benchmarks")
        class ThresholdPressure(keras.regularizers.L2):
            """Keras' L2 (``l2 * sum(x**2)``, its own ``__call__``) with the strength in a variable: a PEP
            table computes it over the whole fused table with per-column coefficients, no slicing."""

            def __init__(self, l2=1e-5):
                super().__init__(l2=float(l2))
                self.strength = tf.Variable(float(l2), trainable=False, dtype=tf.float32, name="threshold_pressure")
                self.l2 = self.strength

            def get_config(self):
                return {"l2": float(self.strength.numpy())}

        _PRESSURE_CLASS = ThresholdPressure
    return _PRESSURE_CLASS(l2)


def make_pressure_schedule(pressure, snaps, window, min_drop, factor):
    """Multiplies the threshold pressure by ``factor`` when the non-zero count fell by less than ``min_drop``
    (relative) over the last ``window`` steps while pruning is under way (count below 95% of dense) and targets
    remain. A gentle start lets the loss decide which entries survive (popular ids keep more dimensions); the
    raises carry the search down to the smallest targets within its budget."""
    keras = _keras()

    class PressureSchedule(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.raises = []
            self._start = None

        def on_train_batch_end(self, batch, logs=None):
            if snaps.step % window or snaps.last_count is None:
                return
            count = snaps.last_count
            if self._start is not None and snaps.pending() and count < 0.95 * snaps.dense_count \
                    and self._start - count < min_drop * self._start:
                new = float(pressure.strength.numpy()) * factor
                pressure.strength.assign(new)
                self.raises.append({"step": snaps.step, "count": count, "l2": new})
            self._start = count

    return PressureSchedule()


# -------------------------------------------------------------------------------------------- popularity
def dims_vs_popularity(masks, schema, bins=24):
    """Mean kept dims per id against the id's popularity rank (all tables pooled, ranked by training count)."""
    counts, dims = [], []
    for name, mask in masks.items():
        counts.append(np.asarray(schema.frequencies(name), dtype=np.float64))
        dims.append(mask.sum(axis=1))
    counts, dims = np.concatenate(counts), np.concatenate(dims)
    order = np.argsort(-counts, kind="stable")
    counts, dims = counts[order], dims[order]
    edges = np.unique(np.round(np.logspace(0, math.log10(counts.size), bins + 1)).astype(int))
    edges[0] = 0
    edges[-1] = counts.size
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        if hi > lo:
            rows.append({"rank_lo": int(lo) + 1, "rank_hi": int(hi), "mean_count": float(counts[lo:hi].mean()),
                         "mean_dim": float(dims[lo:hi].mean())})
    return rows


# -------------------------------------------------------------------------------------------------- runs
def pep_embedding_cfg(search, dim, pressure):
    params = {"output_dim": dim, "threshold_type": search["threshold_type"], "threshold_init": search["threshold_init"],
              "g_scale": search["g_scale"], "embeddings_initializer": "uniform"}
    if pressure is not None:
        params["threshold_regularizer"] = pressure
    return {"scheme": "pep", "params": params}


def run_one(prep, ds_name, setting, model_name, seed, targets, quick, controls=CONTROLS):
    """Fixed, PEP search, retrained snapshots, their mask controls and uniform baselines for one dataset / model
    / seed."""
    import tensorflow as tf

    from tfemb import experiment
    from tfemb.pep import PEPSnapshots, control_snapshot, retrain, sparsity_report

    tf.get_logger().setLevel("ERROR")  # predict() retraces once per new model: expected here

    keras = _keras()
    train = dict(setting["train"])
    if quick:
        train["epochs"] = min(int(train["epochs"]), QUICK_EPOCHS)
    search = dict(setting["search"])
    d0 = int(setting["embedding_dim"])
    batch = int(train["batch_size"])
    model_cfg = {"name": model_name, "embedding_dim": d0, "params": model_params(setting, model_name)}
    table_params = dict(setting.get("embedding_params") or {})  # e.g. the recipe's whole-table L2, for every model
    tag = f"[{ds_name}/{model_name}/seed {seed}]"
    y_test = prep.arrays["test"][1]
    result = {"dataset": ds_name, "model": model_name, "seed": seed, "embedding_dim": d0, "train": train,
              "model_params": model_cfg["params"], "table_params": table_params, "search_settings": search}

    # 1. fixed baseline ------------------------------------------------------------------------------
    tf.keras.utils.set_random_seed(seed)
    fixed = compile_for(experiment.build_model(prep.schema, model_cfg, {"scheme": "fixed", "params": table_params}),
                        train)
    fixed.build()
    start_weights = initial_weights(fixed)
    ids_total = int(sum(layer.vocabulary_size for layer in fixed.embedding_layers.values()))
    result["ids"] = ids_total
    result["tables"] = {n: int(layer.vocabulary_size) for n, layer in fixed.embedding_layers.items()}
    log(f"{tag} fixed d={d0}: {ids_total:,} ids, {fixed.embedding_parameter_count():,} embedding parameters")
    fixed_timer = make_step_timer()
    epochs, seconds = train_model(fixed, prep, train, seed, "fixed", extra_callbacks=[fixed_timer])
    metrics, p_fixed = test_metrics(fixed, prep, batch)
    result["fixed"] = {"dim": d0, "params": int(fixed.embedding_parameter_count()), "epochs": epochs,
                       "train_seconds": seconds, **metrics}
    log(f"{tag} fixed: auc={metrics['auc']:.4f} logloss={metrics['logloss']:.4f} ({epochs} epochs, {seconds:.0f}s)")

    # 2. PEP search from the same initial weights --------------------------------------------------------
    tf.keras.utils.set_random_seed(seed)
    pressure = threshold_pressure(search["threshold_l2"])
    # The search: the recipe's model and training, its table L2 left out (see the module doc); the retrained
    # tickets get it back, so they train exactly as the fixed and uniform models do.
    search_train = dict(train, learning_rate=float(search.get("learning_rate") or train["learning_rate"]))
    pep = compile_for(experiment.build_model(prep.schema, model_cfg, pep_embedding_cfg(search, d0, pressure)),
                      search_train)
    pep.build()
    copy_initial_weights(start_weights, pep)
    snaps = PEPSnapshots(list(targets), check_every=int(search["check_every"]), stop_when_done=True)
    schedule = make_pressure_schedule(pressure, snaps, int(search["pressure_window"]),
                                      float(search["pressure_min_drop"]), float(search["pressure_factor"]))
    pep_timer = make_step_timer()
    max_epochs = int(search["max_epochs"])
    log(f"{tag} PEP search: targets {list(targets)}, at most {max_epochs} epochs, init {search['threshold_init']}, "
        f"g_scale {search['g_scale']}, threshold L2 from {search['threshold_l2']}")
    start = time.perf_counter()
    with warnings.catch_warnings(record=True):  # unreached targets are reported below
        warnings.simplefilter("always")
        history = pep.fit(prep.dataset("train", batch, shuffle=True, seed=seed), epochs=max_epochs, verbose=0,
                          callbacks=[snaps, schedule, make_epoch_log("search", snaps, pressure), pep_timer])
    search_seconds = time.perf_counter() - start
    result["search"] = {
        "epochs": len(history.history.get("loss", [])), "steps": snaps.step, "seconds": search_seconds,
        "dense_count": int(snaps.dense_count), "final_count": snaps.last_count, "min_count": snaps.min_count,
        "snapshots": [{"target": s.target, "target_count": s.target_count, "count": s.count, "step": s.step,
                       "epoch": s.epoch} for s in snaps.snapshots],
        "unreached": snaps.unreached, "pressure_raises": schedule.raises,
        "count_history": [list(map(int, h)) for h in snaps.history[:: max(1, len(snaps.history) // 200)]],
    }
    log(f"{tag} search: {len(snaps.snapshots)}/{len(targets)} targets in {snaps.step} steps "
        f"({search_seconds:.0f}s); fewest non-zeros {snaps.min_count:,} of {snaps.dense_count:,}")

    # search speed vs fixed ----------------------------------------------------------------------------
    in_run = {"fixed": step_summary(fixed_timer, batch), "pep": step_summary(pep_timer, batch)}
    bursts = interleaved_timing(fixed, pep, prep, train, int(search["check_every"]), seed)

    def ratio(t, key):
        return t["pep"].get(key, float("nan")) / t["fixed"].get(key, float("nan"))

    result["timing"] = {
        "in_run": in_run, "interleaved": bursts,
        "ratio_in_run_median_step": ratio(in_run, "median_step_ms"),
        "ratio_in_run_cpu": ratio(in_run, "median_cpu_ms"),
        "ratio_interleaved_median_step": ratio(bursts, "median_step_ms"),
        "ratio_interleaved_cpu": ratio(bursts, "median_cpu_ms"),
        "ratio_interleaved_without_counts": (bursts["pep_without_counts"].get("median_step_ms", float("nan"))
                                             / bursts["fixed"].get("median_step_ms", float("nan"))),
    }
    log(f"{tag} search/fixed time per step: in run {result['timing']['ratio_in_run_median_step']:.2f}x "
        f"(CPU {result['timing']['ratio_in_run_cpu']:.2f}x), interleaved "
        f"{result['timing']['ratio_interleaved_median_step']:.2f}x (CPU {result['timing']['ratio_interleaved_cpu']:.2f}x; "
        f"train step alone, without the snapshot counts: {result['timing']['ratio_interleaved_without_counts']:.2f}x)")

    # 3 + 4. retrain every snapshot, uniform baseline at its size -------------------------------------
    uniform_cache = {}
    ticket = None
    points = []
    popularity = {}
    for target in targets:
        snap = next((s for s in snaps.snapshots if s.target == target), None)
        point = {"target": target, "fewer": 1.0 - target, "target_count": snaps.target_count(target),
                 "reached": snap is not None}
        if snap is None:
            miss = next(u for u in snaps.unreached if u["target"] == target)
            point.update({"fewest_reached": miss["reached"], "fewest_at_step": miss["reached_at_step"]})
            log(f"{tag} target {target}: NOT reached (fewest non-zeros {miss['reached']:,} > "
                f"{point['target_count']:,})")
            points.append(point)
            continue
        point.update({"nnz": snap.count, "step": snap.step, "epoch": snap.epoch})
        popularity[str(target)] = dims_vs_popularity(snap.masks, prep.schema)
        if ticket is None and not table_params:
            ticket = compile_for(retrain(pep, snap, mode="rewind"), train)
        else:
            if ticket is None:  # the retrain mode of the search's tables, plus the recipe's table regularizer
                ticket_cfg = pep_embedding_cfg(search, d0, None)
                ticket_cfg["params"].update(table_params, retrain=True)
                ticket = compile_for(experiment.build_model(prep.schema, model_cfg, ticket_cfg), train)
                ticket.build()
            # = retrain(pep, snap, mode="rewind") (tested), reusing the traced train step of the first ticket
            reset_ticket(ticket, snap)
        epochs, seconds = train_model(ticket, prep, train, seed, f"retrain {target}")
        metrics, p_pep = test_metrics(ticket, prep, batch)
        point["pep"] = {"params": int(ticket.embedding_parameter_count()), "epochs": epochs,
                        "train_seconds": seconds, **metrics}
        if target == REPORT_TARGET:
            result["sparsity_report"] = sparsity_report(ticket, prep.schema, num_buckets=5)
        dim = max(1, int(round(snap.count / ids_total)))
        if dim not in uniform_cache:
            tf.keras.utils.set_random_seed(seed)
            uni = compile_for(experiment.build_model(prep.schema, dict(model_cfg, embedding_dim=dim),
                                                     {"scheme": "fixed", "params": table_params}), train)
            u_epochs, u_seconds = train_model(uni, prep, train, seed, f"uniform d={dim}")
            u_metrics, p_uni = test_metrics(uni, prep, batch)
            uniform_cache[dim] = ({"dim": dim, "params": int(uni.embedding_parameter_count()), "epochs": u_epochs,
                                   "train_seconds": u_seconds, **u_metrics}, p_uni)
            del uni
        point["uniform"], p_uni = uniform_cache[dim]
        point["delta_auc"] = point["pep"]["auc"] - point["uniform"]["auc"]
        point["delta_auc_ci95"] = paired_bootstrap_delta_auc(y_test, p_pep, p_uni, seed=seed)
        point["delta_auc_vs_fixed"] = point["pep"]["auc"] - result["fixed"]["auc"]
        point["controls"] = {}
        for kind in controls:  # the same ticket, with a mask PEP did not choose (same counts)
            reset_ticket(ticket, control_snapshot(snap, kind, seed=seed))
            c_epochs, c_seconds = train_model(ticket, prep, train, seed, f"control {kind} {target}")
            c_metrics, p_control = test_metrics(ticket, prep, batch)
            point["controls"][kind] = {
                "params": int(ticket.embedding_parameter_count()), "epochs": c_epochs, "train_seconds": c_seconds,
                **c_metrics, "pep_minus_control": point["pep"]["auc"] - c_metrics["auc"],
                "pep_minus_control_ci95": paired_bootstrap_delta_auc(y_test, p_pep, p_control, seed=seed)}
            log(f"{tag} target {target}: control {kind}: auc={c_metrics['auc']:.4f} (PEP - control "
                f"{point['controls'][kind]['pep_minus_control']:+.4f})")
        log(f"{tag} target {target} ({1 - target:.0%} fewer): nnz {snap.count:,} -> PEP auc={metrics['auc']:.4f} "
            f"logloss={metrics['logloss']:.4f} | uniform d={dim} ({point['uniform']['params']:,} params) "
            f"auc={point['uniform']['auc']:.4f} logloss={point['uniform']['logloss']:.4f} | "
            f"dAUC={point['delta_auc']:+.4f} [{point['delta_auc_ci95'][0]:+.4f}, {point['delta_auc_ci95'][1]:+.4f}]")
        points.append(point)
    result["points"] = points
    result["dims_vs_popularity"] = popularity
    del fixed, pep, ticket
    keras.backend.clear_session()
    return result


def _dataset_available(setting):
    if not setting["requires"]:
        return True, ""
    from tfemb.data.readers import data_dir

    path = data_dir() / setting["requires"]
    return path.exists(), str(path)


def run_sweep(datasets=("ml100k", "criteo"), models=None, targets=TARGETS, seeds=1, quick=False, out=None,
              settings=None, controls=CONTROLS, command=None):
    """Runs the sweep; returns the JSON payload (and writes the outputs when ``out`` is given and some dataset
    ran: with every dataset skipped, ``out`` is left as it is). ``command``: the command line for the report."""
    from tfemb import experiment

    settings = copy.deepcopy(settings or SETTINGS)
    targets = [float(t) for t in targets]
    unknown = [c for c in controls if c not in CONTROLS]
    if unknown:  # before the first search, not after it
        raise SystemExit(f"unknown control(s) {unknown}; known: {list(CONTROLS)} (or 'none')")
    payload = {"benchmark": "pep_sweep", "created": datetime.datetime.now().isoformat(timespec="seconds"),
               "platform": {"python": platform.python_version(), "machine": platform.machine(),
                            "cpus": os.cpu_count()},
               "args": {"datasets": list(datasets), "models": None if models is None else list(models),
                        "targets": targets, "seeds": seeds, "quick": quick, "controls": list(controls),
                        "command": command},
               "settings": {}, "skipped": [], "runs": []}
    start = time.perf_counter()
    for ds_name in datasets:
        if ds_name not in settings:
            raise SystemExit(f"unknown dataset {ds_name!r}; known: {sorted(settings)}")
        setting = apply_recipe(settings[ds_name])
        ok, path = _dataset_available(setting)
        if not ok:
            msg = f"{ds_name}: skipped, data folder {path} is absent (set TFEMB_DATA_DIR to the folder holding it)"
            log(msg)
            payload["skipped"].append(msg)
            continue
        payload["settings"][ds_name] = setting
        prep = experiment.prepare_data(setting["data"])
        log(f"== {setting['title']}: {prep.num_rows('train'):,} train / {prep.num_rows('val'):,} val / "
            f"{prep.num_rows('test'):,} test rows ({time.perf_counter() - start:.0f}s elapsed)")
        ds_models = setting["models"] if (models is None or ds_name != "criteo") else models
        for model_name in ds_models:
            for seed in range(seeds):
                payload["runs"].append(run_one(prep, ds_name, setting, model_name, seed, targets, quick, controls))
                log(f"   ({time.perf_counter() - start:.0f}s elapsed)")
    payload["seconds"] = time.perf_counter() - start
    if out and not payload["settings"]:
        log(f"SKIPPED: no dataset to run; nothing written to {out}.")
    elif out:
        write_outputs(payload, out)
    return payload


def run_timing(datasets=("ml100k", "criteo"), models=None, seeds=1, out=None, settings=None, command=None):
    """``--timing-only``: the search step's time vs the fixed step's, interleaved in one process, without the
    quality sweep. Per dataset / model / seed: the fixed and PEP models of ``run_one`` (same settings, same
    initial weights), one warm-up epoch of ``TIMING_STEPS`` steps each, then ``interleaved_timing``. Writes
    ``<out>/pep_timing.json`` and ``.md``; returns the payload."""
    import tensorflow as tf

    from tfemb import experiment

    settings = copy.deepcopy(settings or SETTINGS)
    start = time.perf_counter()
    payload = {"benchmark": "pep_sweep --timing-only", "created": datetime.datetime.now().isoformat(timespec="seconds"),
               "platform": {"python": platform.python_version(), "machine": platform.machine(),
                            "cpus": os.cpu_count()}, "tensorflow": tf.__version__,
               "keras": "2 (tf-keras)" if os.environ.get("TF_USE_LEGACY_KERAS") == "1" else "3",
               "rounds": TIMING_ROUNDS, "steps_per_round": TIMING_STEPS, "skipped": [], "runs": [],
               "command": command or "python benchmarks/pep_sweep.py --timing-only"}
    measured = 0
    for ds_name in datasets:
        setting = apply_recipe(settings[ds_name])
        ok, path = _dataset_available(setting)
        if not ok:
            payload["skipped"].append(f"{ds_name}: data folder {path} is absent (set TFEMB_DATA_DIR to the folder "
                                      "holding it)")
            log(payload["skipped"][-1])
            continue
        measured += 1
        prep = experiment.prepare_data(setting["data"])
        train, search, d0 = dict(setting["train"]), dict(setting["search"]), int(setting["embedding_dim"])
        table_params = dict(setting.get("embedding_params") or {})
        for model_name in (setting["models"] if (models is None or ds_name != "criteo") else models):
            model_cfg = {"name": model_name, "embedding_dim": d0, "params": model_params(setting, model_name)}
            for seed in range(seeds):
                tf.keras.utils.set_random_seed(seed)
                fixed = compile_for(experiment.build_model(prep.schema, model_cfg,
                                                           {"scheme": "fixed", "params": table_params}), train)
                fixed.build()
                pressure = threshold_pressure(search["threshold_l2"])
                search_train = dict(train, learning_rate=float(search.get("learning_rate") or train["learning_rate"]))
                pep = compile_for(experiment.build_model(prep.schema, model_cfg, pep_embedding_cfg(search, d0, pressure)),
                                  search_train)
                pep.build()
                copy_initial_weights(initial_weights(fixed), pep)
                # The same search with V and s in two variables per table (PEPEmbedding(fused=False)), train step
                # alone: what the fused layout saves, measured in the same rounds.
                split_cfg = pep_embedding_cfg(search, d0, pressure)
                split_cfg["params"]["fused"] = False
                split = compile_for(experiment.build_model(prep.schema, model_cfg, split_cfg), search_train)
                split.build()
                copy_initial_weights(initial_weights(fixed), split)
                # A reference for what the search's table costs: the fixed model at twice the dimension. With
                # feature_dim thresholds the search trains a [V, 2 * d0] table (V and s), as this model does.
                wide = compile_for(experiment.build_model(prep.schema, dict(model_cfg, embedding_dim=2 * d0),
                                                          {"scheme": "fixed", "params": table_params}), train)
                wide.build()
                warm = prep.dataset("train", int(train["batch_size"]), shuffle=True, seed=seed).take(TIMING_STEPS)
                for model in (fixed, pep, split, wide):
                    model.fit(warm, epochs=1, verbose=0)
                bursts = interleaved_timing(fixed, pep, prep, train, int(search["check_every"]), seed,
                                            extra={"pep_two_variables": split, "fixed_double_dim": wide})
                med = {k: v.get("median_step_ms", float("nan")) for k, v in bursts.items()}
                amo = {k: v.get("amortised_step_ms", float("nan")) for k, v in bursts.items()}
                cpu = {k: v.get("median_cpu_ms", float("nan")) for k, v in bursts.items()}
                run = {"dataset": ds_name, "model": model_name, "seed": seed, "interleaved": bursts,
                       "ratio_median_step": med["pep"] / med["fixed"], "ratio_cpu": cpu["pep"] / cpu["fixed"],
                       "ratio_without_counts": med["pep_without_counts"] / med["fixed"],
                       "ratio_amortised": amo["pep"] / amo["fixed"],
                       "ratio_amortised_without_counts": amo["pep_without_counts"] / amo["fixed"],
                       "ratio_amortised_two_variables": amo["pep_two_variables"] / amo["fixed"],
                       "ratio_amortised_fixed_double_dim": amo["fixed_double_dim"] / amo["fixed"]}
                payload["runs"].append(run)
                log(f"[{ds_name}/{model_name}/seed {seed}] search/fixed per step: amortised "
                    f"{run['ratio_amortised']:.2f}x, median step {run['ratio_median_step']:.2f}x "
                    f"(CPU {run['ratio_cpu']:.2f}x; without the snapshot counts {run['ratio_without_counts']:.2f}x); "
                    f"fixed {med['fixed']:.2f} ms, search {med['pep']:.2f} ms; fixed at {2 * d0} dims "
                    f"{run['ratio_amortised_fixed_double_dim']:.2f}x fixed")
                del fixed, pep, split, wide
                tf.keras.backend.clear_session()
    payload["seconds"] = time.perf_counter() - start
    payload["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if out and not measured:
        log(f"SKIPPED: no dataset to measure; nothing written to {out}.")
    elif out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "pep_timing.json"), "w") as fh:
            json.dump(payload, fh, indent=1)
        lines = ["# PEP search step vs fixed step (interleaved, one process)", "",
                 f"`{payload['command']}` ({payload['created']}, Keras {payload['keras']}, TF "
                 f"{payload['tensorflow']}, {payload['seconds'] / 60:.1f} min, load average at the end "
                 f"{', '.join(f'{x:.1f}' for x in payload['load_average'] or [])}). {TIMING_ROUNDS} rounds of "
                 f"{TIMING_STEPS} steps per model, alternating on the same batches (the first 2 steps of each round "
                 "left out). The search step includes the snapshot callback's non-zero counts (every `check_every` "
                 "steps, as the search runs). **Amortised** ms/step: each round's mean step, counting batches "
                 "included, then the median over rounds (the time the search phase takes per step; the target is "
                 "judged on it). Median step: the median single batch (a counting batch rarely is the median). "
                 "Without counts: the train step alone. Two variables: the same search with `V` and `s` in two "
                 "variables per table (`PEPEmbedding(fused=False)`; the default keeps them in one), train step "
                 "alone, in the same rounds. Fixed at 2·d0: the fixed model with twice the embedding dimension, in "
                 "the same rounds, a reference for the cost of the `[V, 2·d0]` table (`V` and `s`) the search "
                 "trains with `feature_dim` thresholds. Target: search/fixed ≤ 1.3.", "",
                 "| dataset | model | seed | fixed ms/step (amortised) | search ms/step (amortised) | search/fixed "
                 "(amortised) | median step ratio | CPU ratio | without counts (amortised) | two variables, without "
                 "counts (amortised) | fixed at 2·d0 / fixed (amortised) | target met |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in payload["runs"]:
            b = r["interleaved"]
            lines.append(f"| {r['dataset']} | {r['model']} | {r['seed']} | {b['fixed']['amortised_step_ms']:.2f} | "
                         f"{b['pep']['amortised_step_ms']:.2f} | {r['ratio_amortised']:.2f} | "
                         f"{r['ratio_median_step']:.2f} | {r['ratio_cpu']:.2f} | "
                         f"{r['ratio_amortised_without_counts']:.2f} | "
                         f"{r.get('ratio_amortised_two_variables', float('nan')):.2f} | "
                         f"{r.get('ratio_amortised_fixed_double_dim', float('nan')):.2f} | "
                         f"{'yes' if r['ratio_amortised'] <= 1.3 else 'no'} |")
        with open(os.path.join(out, "pep_timing.md"), "w") as fh:
            fh.write("\n".join(lines + [""]) + "\n")
        log(f"wrote {out}/pep_timing.json, pep_timing.md")
    return payload


# --------------------------------------------------------------------------------------------- outputs
def _mean(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(values)) if values else float("nan")


def _fmt(value, digits=4):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def aggregate(runs):
    """Per (dataset, model): the fixed baseline, the timing ratios and one row per target, averaged over seeds."""
    groups = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["model"]), []).append(r)
    out = []
    for (ds, model), rs in groups.items():
        rows = []
        for i, target in enumerate(p["target"] for p in rs[0]["points"]):
            pts = [r["points"][i] for r in rs]
            reached = [p for p in pts if p["reached"]]
            row = {"target": target, "fewer": 1 - target, "target_count": pts[0]["target_count"],
                   "reached": f"{len(reached)}/{len(pts)}"}
            if reached:
                row.update({
                    "nnz": int(round(_mean([p["nnz"] for p in reached]))),
                    "pep_auc": _mean([p["pep"]["auc"] for p in reached]),
                    "pep_logloss": _mean([p["pep"]["logloss"] for p in reached]),
                    "uniform_dim": "/".join(str(d) for d in sorted({p["uniform"]["dim"] for p in reached})),
                    "uniform_params": int(round(_mean([p["uniform"]["params"] for p in reached]))),
                    "uniform_auc": _mean([p["uniform"]["auc"] for p in reached]),
                    "uniform_logloss": _mean([p["uniform"]["logloss"] for p in reached]),
                    "delta_auc": _mean([p["delta_auc"] for p in reached]),
                    "ci": reached[0]["delta_auc_ci95"] if len(reached) == 1 else None,
                    "seed_cis": [p["delta_auc_ci95"] for p in reached],
                    "seed_deltas": [p["delta_auc"] for p in reached],
                    "pep_auc_std": float(np.std([p["pep"]["auc"] for p in reached])),
                    "uniform_auc_std": float(np.std([p["uniform"]["auc"] for p in reached])),
                    "controls": {kind: {
                        "auc": _mean([p["controls"][kind]["auc"] for p in reached]),
                        "pep_minus_control": _mean([p["controls"][kind]["pep_minus_control"] for p in reached]),
                        "seed_deltas": [p["controls"][kind]["pep_minus_control"] for p in reached],
                        "seed_cis": [p["controls"][kind]["pep_minus_control_ci95"] for p in reached],
                    } for kind in reached[0].get("controls", {})},
                })
            else:
                row["fewest"] = min(p["fewest_reached"] for p in pts)
            rows.append(row)
        timing = {k: _mean([r["timing"][k] for r in rs]) for k in
                  ("ratio_in_run_median_step", "ratio_in_run_cpu", "ratio_interleaved_median_step",
                   "ratio_interleaved_cpu", "ratio_interleaved_without_counts")}
        out.append({"dataset": ds, "model": model, "seeds": len(rs), "ids": rs[0]["ids"],
                    "dim": rs[0]["embedding_dim"], "dense_count": rs[0]["search"]["dense_count"],
                    "fixed_auc": _mean([r["fixed"]["auc"] for r in rs]),
                    "fixed_logloss": _mean([r["fixed"]["logloss"] for r in rs]),
                    "fixed_params": rs[0]["fixed"]["params"],
                    "search_epochs": _mean([r["search"]["epochs"] for r in rs]),
                    "search_steps": _mean([r["search"]["steps"] for r in rs]),
                    "timing": timing, "rows": rows, "runs": rs})
    return out


def _bucket_summary(report):
    """Mean kept dims per popularity bucket over all tables (bucket 0 = the most popular fifth of each table)."""
    acc = {}
    for b in report["buckets"]:
        nonzero, ids = acc.get(b["bucket"], (0, 0))
        acc[b["bucket"]] = (nonzero + b["nonzero"], ids + b["ids"])
    return [{"bucket": k, "ids": ids, "nonzero": nz, "mean_dim": nz / ids if ids else 0.0}
            for k, (nz, ids) in sorted(acc.items())]


def markdown(payload, findings=None):
    groups = aggregate(payload["runs"])
    command = payload["args"].get("command") or "python benchmarks/pep_sweep.py"
    lines = ["# PEP sweep: quality vs non-zero embedding parameters", "",
             f"Generated by `{command}` on {payload['created']} ({payload['platform']['cpus']} CPUs, "
             f"Python {payload['platform']['python']}); total {payload['seconds'] / 60:.1f} min"
             + (" (`--quick`)" if payload["args"]["quick"] else "") + f", seeds: {payload['args']['seeds']}.", "",
             "PEP = the snapshot's mask retrained from the rewound initial weights (lottery ticket). Uniform = a "
             "`FixedEmbedding` model with `dim = max(1, round(nnz / ids))`. AUC is exact (from the test "
             "predictions); ΔAUC = PEP − uniform with a paired bootstrap 95% interval over the test rows "
             f"({BOOTSTRAP} resamples; with several seeds: the mean, then each seed's). AUCs with several seeds: "
             "mean ± std over seeds. Embedding parameters only (DeepFM's first-order weights, equal for all "
             "variants, are not counted).", ""]
    for msg in payload["skipped"]:
        lines += [f"- **skipped**: {msg}", ""]
    for g in groups:
        title = payload["settings"][g["dataset"]]["title"]
        s = payload["settings"][g["dataset"]]["search"]
        t = g["timing"]
        setting = payload["settings"][g["dataset"]]
        run0 = g["runs"][0]
        lines += [f"## {title} — {g['model']}", "",
                  f"Settings: recipe {setting.get('recipe_used') or '(none: built-in settings)'}; model params "
                  f"`{json.dumps(run0.get('model_params', {}))}`; tables `{json.dumps(run0.get('table_params', {}))}` "
                  f"(fixed, uniform and retrained; not in the search); batch {run0['train']['batch_size']}, lr "
                  f"{run0['train']['learning_rate']}, ≤ {run0['train']['epochs']} epochs, patience "
                  f"{run0['train']['patience']}; search lr {s.get('learning_rate') or run0['train']['learning_rate']}.",
                  "",
                  f"Fixed d={g['dim']}: AUC {_fmt(g['fixed_auc'])}, logloss {_fmt(g['fixed_logloss'])}, "
                  f"{g['fixed_params']:,} embedding parameters ({g['ids']:,} ids). Search: "
                  f"{g['search_epochs']:.0f} epochs / {g['search_steps']:.0f} steps (threshold_init "
                  f"{s['threshold_init']}, g_scale {s['g_scale']}, threshold L2 from {s['threshold_l2']}, raised "
                  f"×{s['pressure_factor']} at steps "
                  f"{', '.join(str(r['step']) for r in run0['search'].get('pressure_raises', [])) or '(none)'}, "
                  f"{s['threshold_type']}).", "",
                  f"**Search time per step / fixed**: {t['ratio_interleaved_median_step']:.2f}× wall, "
                  f"{t['ratio_interleaved_cpu']:.2f}× CPU (interleaved bursts; the train step alone, without PEPSnapshots' "
                  f"counts every {s['check_every']} steps: {t['ratio_interleaved_without_counts']:.2f}× wall); "
                  f"{t['ratio_in_run_median_step']:.2f}× wall, {t['ratio_in_run_cpu']:.2f}× CPU over the actual runs "
                  "(median step). Target ≤ 1.3×.", "",
                  "| keep | fewer | reached | nnz (PEP) | PEP AUC | PEP logloss | uniform dim | uniform params "
                  "| uniform AUC | uniform logloss | ΔAUC (95% CI) | fixed AUC |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in g["rows"]:
            if "nnz" in row:
                if row["ci"] is not None:
                    delta = f"{row['delta_auc']:+.4f} [{row['ci'][0]:+.4f}, {row['ci'][1]:+.4f}]"
                else:  # several seeds: the mean, then each seed's difference and interval
                    delta = f"{row['delta_auc']:+.4f} (" + "; ".join(
                        f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]" for d, (lo, hi) in zip(row["seed_deltas"], row["seed_cis"])) + ")"
                multi = g["seeds"] > 1
                pep_auc = _fmt(row["pep_auc"]) + (f" ±{row['pep_auc_std']:.4f}" if multi else "")
                uni_auc = _fmt(row["uniform_auc"]) + (f" ±{row['uniform_auc_std']:.4f}" if multi else "")
                lines.append(
                    f"| {row['target']:g} | {row['fewer']:.0%} | {row['reached']} | {row['nnz']:,} | "
                    f"{pep_auc} | {_fmt(row['pep_logloss'])} | {row['uniform_dim']} | "
                    f"{row['uniform_params']:,} | {uni_auc} | {_fmt(row['uniform_logloss'])} | "
                    f"{delta} | {_fmt(g['fixed_auc'])} |")
            else:
                lines.append(
                    f"| {row['target']:g} | {row['fewer']:.0%} | no ({row['reached']}): fewest {row['fewest']:,} > "
                    f"{row['target_count']:,} | – | – | – | – | – | – | – | – | {_fmt(g['fixed_auc'])} |")
        kinds = [k for k in CONTROLS if any(k in row.get("controls", {}) for row in g["rows"])]
        if kinds:
            names = {"random": "random mask", "columns": "PEP's sizes, random columns"}
            lines += ["", "Mask controls: the same lottery-ticket retrain with a mask PEP did not choose, at the "
                          "snapshot's count (random: per table; columns: each id keeps PEP's number of dims, at "
                          "random columns). PEP − control ΔAUC, mean, then each seed's with its paired 95% interval:",
                      "", "| fewer | PEP AUC | " + " | ".join(f"{names[k]} AUC | PEP − {names[k]}" for k in kinds)
                      + " |", "|---|---|" + "---|---|" * len(kinds)]
            for row in g["rows"]:
                if "nnz" not in row or not row.get("controls"):
                    continue
                cells = []
                for k in kinds:
                    c = row["controls"][k]
                    cells += [_fmt(c["auc"]), f"{c['pep_minus_control']:+.4f} (" + "; ".join(
                        f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]" for d, (lo, hi) in zip(c["seed_deltas"], c["seed_cis"]))
                        + ")"]
                lines.append(f"| {row['fewer']:.0%} | {_fmt(row['pep_auc'])} | " + " | ".join(cells) + " |")
        rep = g["runs"][0].get("sparsity_report")
        if rep:
            lines += ["", f"Kept dimensions by popularity bucket at the {1 - REPORT_TARGET:.0%}-fewer snapshot "
                          "(seed 0; bucket 0 = the most popular fifth of each table's ids; count share = share of the "
                          "table's training rows):", "",
                      "| table | bucket | ids | count share | mean kept dims | kept fraction |", "|---|---|---|---|---|---|"]
            tables = sorted({b["feature"] for b in rep["buckets"]},
                            key=lambda f: -next(x["ids"] for x in rep["fields"] if x["feature"] == f))
            shown = tables[:3]
            for b in rep["buckets"]:
                if b["feature"] in shown:
                    share = "–" if b["count_share"] is None else f"{b['count_share']:.1%}"
                    lines.append(f"| {b['feature']} | {b['bucket']} | {b['ids']:,} | {share} | {b['mean_dim']:.2f} | "
                                 f"{b['kept_fraction']:.1%} |")
            if len(tables) > len(shown):
                lines += ["", f"(the {len(shown)} largest of {len(tables)} tables; all in pep_sweep.json) All tables "
                              "pooled by bucket:", "", "| bucket | ids | mean kept dims |", "|---|---|---|"]
                for row in _bucket_summary(rep):
                    lines.append(f"| {row['bucket']} | {row['ids']:,} | {row['mean_dim']:.2f} |")
        lines.append("")
    lines += ["## Automatic summary", ""]
    for g in groups:
        rows = [r for r in g["rows"] if "nnz" in r]
        # a point counts when the paired interval excludes 0 on the same side in every seed
        wins = [r for r in rows if all(ci[0] > 0 for ci in r["seed_cis"])]
        losses = [r for r in rows if all(ci[1] < 0 for ci in r["seed_cis"])]
        unreached = [r for r in g["rows"] if "nnz" not in r]
        lines.append(
            f"- {g['dataset']}/{g['model']}: PEP − uniform ΔAUC at "
            + ", ".join(f"{r['fewer']:.0%} fewer {r['delta_auc']:+.4f}" for r in rows)
            + f"; better at {len(wins)}, worse at {len(losses)} of {len(rows)} points (95% CI excludes 0 in every seed)"
            + (f"; {len(unreached)} target(s) not reached" if unreached else "")
            + f"; search step {g['timing']['ratio_interleaved_median_step']:.2f}× fixed."
            + "".join(
                f" PEP − {k} mask: better at {sum(all(ci[0] > 0 for ci in r['controls'][k]['seed_cis']) for r in rows)}, "
                f"worse at {sum(all(ci[1] < 0 for ci in r['controls'][k]['seed_cis']) for r in rows)} of {len(rows)}."
                for k in CONTROLS if rows and all(k in r.get("controls", {}) for r in rows)))
    lines.append("")
    lines += ["## Findings", "", findings.strip() if findings else "(to be written after the run)", ""]
    return "\n".join(lines)


def plot_quality(payload, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = aggregate(payload["runs"])
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(5.2 * max(1, len(groups)), 4.2), squeeze=False)
    for ax, g in zip(axes[0], groups):
        rows = [r for r in g["rows"] if "nnz" in r]
        ax.plot([r["nnz"] for r in rows], [r["pep_auc"] for r in rows], "o-", label="PEP (retrained)")
        for r in rows:
            ax.annotate(f"{r['fewer']:.0%}", (r["nnz"], r["pep_auc"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
        uni = sorted({(r["uniform_params"], r["uniform_auc"], r["uniform_dim"]) for r in rows})
        ax.plot([u[0] for u in uni], [u[1] for u in uni], "s--", label="uniform dim")
        for u in uni:
            ax.annotate(f"d={u[2]}", (u[0], u[1]), textcoords="offset points", xytext=(4, -10), fontsize=7)
        styles = {"random": ("^:", "tab:gray", "random mask (same count)"),
                  "columns": ("v:", "tab:green", "PEP's sizes, random columns")}
        for kind, (fmt, color, label) in styles.items():
            shown = [r for r in rows if kind in r.get("controls", {})]
            if shown:
                ax.plot([r["nnz"] for r in shown], [r["controls"][kind]["auc"] for r in shown], fmt, color=color,
                        markersize=5, label=label)
        ax.plot([g["fixed_params"]], [g["fixed_auc"]], "k*", markersize=11, label=f"fixed d={g['dim']}")
        ax.axhline(g["fixed_auc"], color="k", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("embedding parameters (non-zeros)")
        ax.set_ylabel("test AUC")
        ax.set_title(f"{g['dataset']} / {g['model']}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_popularity(payload, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = {}
    for r in payload["runs"]:
        seen.setdefault((r["dataset"], r["model"]), r)
    runs = list(seen.values())
    fig, axes = plt.subplots(1, max(1, len(runs)), figsize=(5.2 * max(1, len(runs)), 4.2), squeeze=False)
    for ax, r in zip(axes[0], runs):
        for target, rows in r["dims_vs_popularity"].items():
            x = [math.sqrt(b["rank_lo"] * b["rank_hi"]) for b in rows]
            ax.plot(x, [b["mean_dim"] for b in rows], "o-", ms=3, label=f"{1 - float(target):.0%} fewer")
        ax.set_xscale("log")
        ax.set_xlabel("popularity rank of the id (all tables, by training count)")
        ax.set_ylabel(f"mean kept dims (of {r['embedding_dim']})")
        ax.set_title(f"{r['dataset']} / {r['model']} (seed {r['seed']})", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _existing_findings(md_path):
    if not os.path.exists(md_path):
        return None
    text = open(md_path).read()
    m = re.search(r"^## Findings\s*\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    if not m or "(to be written after the run)" in m.group(1):
        return None
    return m.group(1)


def write_outputs(payload, out):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "pep_sweep.json"), "w") as fh:
        json.dump(payload, fh, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else float(o))
    md_path = os.path.join(out, "pep_sweep.md")
    findings = _existing_findings(md_path)
    with open(md_path, "w") as fh:
        fh.write(markdown(payload, findings))
    if payload["runs"]:
        plot_quality(payload, os.path.join(out, "pep_quality_vs_params.png"))
        plot_popularity(payload, os.path.join(out, "pep_dims_vs_popularity.png"))
    log(f"wrote {out}/pep_sweep.json, pep_sweep.md"
        + (", pep_quality_vs_params.png, pep_dims_vs_popularity.png" if payload["runs"] else ""))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default=None, help=f"comma list of {', '.join(SETTINGS)} "
                                                         "(default ml100k,criteo; --quick: ml100k)")
    parser.add_argument("--models", default=None, help="Criteo models, comma list (default deepfm,dcn_v2)")
    parser.add_argument("--targets", default=None, help="fractions to keep, comma list "
                                                        "(default 0.5,0.2,0.1,0.05,0.01; --quick: 0.5,0.1)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per model (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="ml100k, two targets, fewer epochs (< 3 min); writes into outputs/bench-quick unless "
                             "--out is given")
    parser.add_argument("--out", default=None,
                        help="output folder (default: benchmarks/results; with --quick: outputs/bench-quick)")
    parser.add_argument("--controls", default=",".join(CONTROLS),
                        help="mask controls retrained beside each ticket, comma list of random, columns; or none")
    parser.add_argument("--timing-only", action="store_true",
                        help="only the search-vs-fixed step time (interleaved), to <out>/pep_timing.{json,md}")
    args = parser.parse_args(argv)
    args.command = _benchcli.command_line("pep_sweep.py", argv)
    if args.out is None:
        args.out = _benchcli.default_out(args.quick)
    _benchcli.check_min(parser, args, {"seeds": 1})
    args.datasets = (_benchcli.split_list(parser, "--datasets", args.datasets, allowed=SETTINGS) if args.datasets
                     else (["ml100k"] if args.quick else ["ml100k", "criteo"]))
    args.targets = (_benchcli.split_list(parser, "--targets", args.targets, float, what="numbers",
                                         check=lambda t: None if 0 < t < 1 else "targets must be in (0, 1)")
                    if args.targets else list(QUICK_TARGETS if args.quick else TARGETS))
    if args.models:
        from tfemb.models import CF_MODELS, MODELS

        args.models = _benchcli.split_list(parser, "--models", args.models,
                                           allowed=[m for m in MODELS if m not in CF_MODELS])
        if "criteo" not in args.datasets:
            parser.error(f"--models picks the Criteo models, and --datasets has no criteo. Received: --models "
                         f"{','.join(args.models)} --datasets {','.join(args.datasets)}")
    args.controls = ([] if args.controls.strip() == "none"
                     else _benchcli.split_list(parser, "--controls", args.controls, allowed=CONTROLS))
    _benchcli.check_out(parser, args.out)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.timing_only:
        return run_timing(args.datasets, models=args.models, seeds=args.seeds, out=args.out, command=args.command)
    return run_sweep(args.datasets, models=args.models or None, targets=args.targets, seeds=args.seeds,
                     quick=args.quick, out=args.out, controls=args.controls, command=args.command)


if __name__ == "__main__":
    main()
