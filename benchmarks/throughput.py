"""Training throughput and peak memory of DeepFM: tfemb's embedding schemes side by side with DeepCTR.

What it measures, on synthetic Criteo-shaped data (26 categorical fields, 13 numeric, a planted signal):

- tfemb's ``DeepFM`` with ``fixed``, ``hashing``, ``qr`` and ``double_hashing`` embeddings (compression 4 for
  the compressed ones), under Keras 3 and under Keras 2 (``TF_USE_LEGACY_KERAS=1``), with the stock Keras Adam
  on every variable and with tfemb's row-sparse lazy Adam on the tables (``embedding_optimizer="adam"``);
- DeepCTR's ``DeepFM`` (Keras 2 only: it imports ``tensorflow.keras``) with the same embedding dimension, DNN,
  batch size, Adam, input pipeline and metrics;
- per run: examples/second over ``--steps`` training steps after ``--warmup`` excluded steps (tracing,
  compilation, first-touch allocation), median step time, peak RSS of the run's own process (every run is a
  separate subprocess, so ``ru_maxrss`` is that run's honest peak), the embedding parameter count and the
  actual size of the embedding layers' variables (they must match: no scheme may keep a hidden full-size
  table), and AUC / logloss on a held-out slice after the same number of training steps for every run.

Results go to ``<out>/throughput.json`` and ``<out>/throughput.md``; ``--levers`` adds one-change-at-a-time
variants of the tfemb fixed-embedding run (XLA, input pipeline, metrics, id validation, a fused lookup over
stacked field tables) so each speed lever's effect is measured in the same session.

Vocabulary sizes: the 26 per-field cardinalities of the Criteo Kaggle Display Advertising Challenge as
facebookresearch/dlrm's preprocessing reports them (``CRITEO_KAGGLE_CARDINALITIES``; 33.8M ids in total,
from 3 to 10.1M per field), each capped at ``VOCAB_CAP`` = 200,000 ids (the hashed/frequency-capped tables
production DeepFMs use) and multiplied by ``--vocab-scale``; every field also gets the OOV id 0. At the default
scale the 26 tables hold 1,483,141 ids (x 16 dims = 23.7M embedding parameters): six fields at the cap, the
others at their real sizes (4 .. 142,573).

Data: ids are drawn per field from a Zipf law (exponent ``ZIPF_EXPONENT``) over that field's ids, id 1 the most
popular, as a fitted ``tfemb.data.Schema`` numbers them. The label is Bernoulli(sigmoid(logit)) with
``logit = bias + sum_f w_f[id_f] + sum_(f,g) <u_f[id_f], u_g[id_g]> + beta . numeric + 0.3 * numeric_0**2``:
first-order id effects that are larger for frequent ids (so popular ids carry more signal, the premise of
the frequency-aware schemes), eight pairwise field interactions (what FM learns), and numeric effects; the
bias puts the click rate near Criteo's ~25%. A Bayes-optimal AUC is reported for reference.

Schema: fitting a ``Schema`` on tens of millions of string values would dominate the run, so the ids are
generated already encoded and each ``CategoricalFeature`` gets a ``Vocabulary`` built directly: values are
the raw integer keys 1..V-1 (a ``range``: this benchmark never encodes raw values), counts are the training
rows' per-id counts (``np.bincount``), OOV id 0 has count 0. Numeric features are generated standardised, so
``NumericFeature(transform=None)`` with stats mean 0 / std 1.

Run: ``python benchmarks/throughput.py`` (full, ~15 min on 2 cores), ``--quick`` (< 2 min),
``--levers`` (the lever variants too). DeepCTR runs are skipped, with a note, when ``deepctr`` is not
installed (``pip install -r requirements-bench.txt``).
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: tfemb is imported from this checkout
    sys.path.insert(0, str(REPO))
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))

import _benchcli  # noqa: E402

#: Per-field cardinalities of Criteo Kaggle DAC (C1..C26), as facebookresearch/dlrm's preprocessing counts them.
CRITEO_KAGGLE_CARDINALITIES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)
#: Cap on a field's ids before ``--vocab-scale`` (6 of the 26 Criteo fields exceed it).
VOCAB_CAP = 200_000
NUM_NUMERIC = 13
ZIPF_EXPONENT = 1.05
TARGET_CTR = 0.25
SCHEMES = ("fixed", "hashing", "qr", "double_hashing", "md", "md_field")
#: The main matrix by default (benchmarks/README.md: 4 schemes x 2 Keras x 2 optimizers = 16 tfemb runs); the MD
#: schemes are measured on request (``--schemes fixed md md_field``, results/throughput_md.md).
DEFAULT_SCHEMES = ("fixed", "hashing", "qr", "double_hashing")
OPTIMIZERS = ("adam", "lazy_adam")
COMPRESSION = 4.0
#: Temperature of the MD schemes (dlrm's --md-temperature default).
MD_ALPHA = 0.3
EMBEDDING_DIM = 16
LEARNING_RATE = 1e-3
#: Field pairs whose ids interact in the planted signal.
INTERACTING_PAIRS = ((0, 1), (2, 3), (3, 11), (5, 7), (9, 13), (15, 20), (18, 23), (8, 25))
CHILD_TIMEOUT = 900


# ================================================================================================ data
def vocabulary_sizes(scale=1.0, cap=VOCAB_CAP):
    """Ids per field, OOV id 0 included: ``round(min(cardinality, cap) * scale) + 1``, at least 3."""
    return [max(2, int(round(min(c, cap) * scale))) + 1 for c in CRITEO_KAGGLE_CARDINALITIES]


def _zipf_ids(rng, vocabulary_size, n, exponent=ZIPF_EXPONENT):
    """``n`` ids in ``[1, vocabulary_size)``, P(id = k) proportional to k**-exponent (id 1 the most popular)."""
    ranks = np.arange(1, vocabulary_size, dtype=np.float64)
    cdf = np.cumsum(ranks ** -exponent)
    cdf /= cdf[-1]
    return (np.searchsorted(cdf, rng.random(n), side="right") + 1).astype(np.int64)


def generate(rows, holdout, sizes, seed=0):
    """Synthetic Criteo-shaped rows: ``(x, y, counts, info)``; the last ``holdout`` rows are held out.

    ``x``: ``C1..C26`` int64 ids, ``I1..I13`` float32; ``y``: float32 0/1; ``counts``: per-field training
    counts (length ``V``) of the first ``rows`` rows.
    """
    rng = np.random.default_rng(seed)
    total = rows + holdout
    x, logit = {}, np.zeros(total)
    ids = []
    for f, size in enumerate(sizes):
        col = _zipf_ids(rng, size, total)
        ids.append(col)
        x[f"C{f + 1}"] = col
        # First-order effects shrink with the id's popularity rank: frequent ids carry more signal.
        strength = 0.25 / (1.0 + np.log10(np.arange(size, dtype=np.float64) + 1.0))
        weights = rng.normal(0.0, 1.0, size) * strength
        logit += weights[col]
    for a, b in INTERACTING_PAIRS:
        ua = rng.normal(0.0, 0.45, (sizes[a], 4))
        ub = rng.normal(0.0, 0.45, (sizes[b], 4))
        logit += np.einsum("nd,nd->n", ua[ids[a]], ub[ids[b]])
    numeric = rng.normal(0.0, 1.0, (total, NUM_NUMERIC))
    beta = rng.normal(0.0, 0.3, NUM_NUMERIC)
    logit += numeric @ beta + 0.3 * (numeric[:, 0] ** 2 - 1.0)
    for j in range(NUM_NUMERIC):
        x[f"I{j + 1}"] = numeric[:, j].astype(np.float32)
    # Bias that puts the mean click rate at TARGET_CTR (bisection on the sample).
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.mean(1.0 / (1.0 + np.exp(-(logit + mid)))) < TARGET_CTR:
            lo = mid
        else:
            hi = mid
    prob = 1.0 / (1.0 + np.exp(-(logit + (lo + hi) / 2)))
    y = (rng.random(total) < prob).astype(np.float32)
    counts = [np.bincount(col[:rows], minlength=size).astype(np.int64) for col, size in zip(ids, sizes)]
    info = {
        "click_rate": float(y.mean()),
        "bayes_auc_holdout": float(auc(y[rows:], prob[rows:])),
        "bayes_logloss_holdout": float(logloss(y[rows:], prob[rows:])),
    }
    return x, y, counts, info


def save_data(directory, x, y, counts, rows, sizes):
    """One ``.npy`` per array (children load them memory-mapped) plus ``meta.json``."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, values in x.items():
        np.save(directory / f"x_{name}.npy", values)
    np.save(directory / "y.npy", y)
    for f, c in enumerate(counts):
        np.save(directory / f"counts_C{f + 1}.npy", c)
    meta = {"rows": rows, "sizes": sizes, "names": list(x)}
    (directory / "meta.json").write_text(json.dumps(meta))


def load_data(directory):
    """``(train_x, train_y, holdout_x, holdout_y, counts, meta)`` from ``save_data``'s folder."""
    directory = pathlib.Path(directory)
    meta = json.loads((directory / "meta.json").read_text())
    rows = meta["rows"]
    x = {n: np.load(directory / f"x_{n}.npy", mmap_mode="r") for n in meta["names"]}
    y = np.load(directory / "y.npy", mmap_mode="r")
    counts = [np.load(directory / f"counts_C{f + 1}.npy") for f in range(len(meta["sizes"]))]
    train = {n: np.asarray(v[:rows]) for n, v in x.items()}
    held = {n: np.asarray(v[rows:]) for n, v in x.items()}
    return train, np.asarray(y[:rows]), held, np.asarray(y[rows:]), counts, meta


def build_schema(sizes, counts):
    """A fitted ``tfemb.data.Schema`` with the vocabularies built directly (see the module docstring)."""
    from tfemb.data.schema import CategoricalFeature, Label, NumericFeature, Schema, Vocabulary

    features = []
    for f, (size, count) in enumerate(zip(sizes, counts)):
        vocab = Vocabulary(values=range(1, size), counts=count)
        features.append(CategoricalFeature(f"C{f + 1}", vocabulary=vocab))
    for j in range(NUM_NUMERIC):
        features.append(NumericFeature(f"I{j + 1}", stats={"mean": 0.0, "std": 1.0}))
    return Schema(features, label=Label("label"))


# ============================================================================================ metrics
def auc(labels, scores):
    """ROC AUC (Mann-Whitney, ties get average ranks)."""
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # Average rank of each run of equal scores.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    avg = (starts + ends - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, ends - starts)
    pos = labels.sum()
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    return float((ranks[labels == 1].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def logloss(labels, probs, eps=1e-7):
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# ============================================================================================== child
def _prebatched_dataset(tf, x, y, batch_size):
    """Batches sliced once in NumPy: every dataset element is a whole batch (no per-row tf.data work)."""
    n = (len(y) // batch_size) * batch_size
    xs = {k: np.asarray(v[:n]).reshape((-1, batch_size) + v.shape[1:]) for k, v in x.items()}
    ys = np.asarray(y[:n]).reshape(-1, batch_size)
    ds = tf.data.Dataset.from_tensor_slices((xs, ys)).cache().repeat()
    return ds.prefetch(tf.data.AUTOTUNE)


def index_gather_dataset(tf, x, y, batch_size, shuffle=False, seed=0, repeat=False, drop_remainder=False):
    """The body PROPOSED for ``tfemb.data.make_dataset``: batches of row indices, one gather per feature.

    The arrays are held once (``Dataset.from_tensors(...).repeat()``, zipped with the index batches) and every
    batch is one ``tf.gather`` per feature; shuffling permutes the ``n`` row indices once per epoch
    (stateless, seeded by ``seed`` and the epoch) instead of pushing every row through a shuffle buffer. This
    is the scheme of Keras's own array adapter; no per-row tf.data element ever exists. Full batches have a
    static shape (``[batch_size]``), as ``batch(drop_remainder=True)`` gives.
    """
    data = ({k: np.asarray(v) for k, v in x.items()}, np.asarray(y))
    n = len(y)
    full = n // batch_size
    tail = 0 if drop_remainder else n - full * batch_size

    def epoch_batches(epoch):
        order = tf.range(n, dtype=tf.int64)
        if shuffle:
            order = tf.random.experimental.stateless_shuffle(
                order, seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
        batches = tf.data.Dataset.from_tensor_slices(tf.reshape(order[: full * batch_size], (full, batch_size)))
        if tail:
            batches = batches.concatenate(tf.data.Dataset.from_tensors(order[full * batch_size:]))
        return batches

    epochs = tf.data.Dataset.counter() if repeat else tf.data.Dataset.range(1)
    ds = tf.data.Dataset.zip((epochs.flat_map(epoch_batches), tf.data.Dataset.from_tensors(data).repeat()))
    ds = ds.map(lambda idx, d: tf.nest.map_structure(lambda t: tf.gather(t, idx), d),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def _train_dataset(tf, config, x, y):
    """The training input of a run: a repeated tf.data pipeline, or ``None`` for the NumPy path."""
    from tfemb.data.pipeline import make_dataset

    pipeline = config.get("pipeline", "make_dataset")
    if pipeline == "prebatched":
        return _prebatched_dataset(tf, x, y, config["batch_size"])
    if pipeline == "index_gather":
        return index_gather_dataset(tf, x, y, config["batch_size"], shuffle=config.get("shuffle", False),
                                    seed=config.get("seed", 0), repeat=True, drop_remainder=True)
    if pipeline == "numpy":
        return None
    return make_dataset(x, y, batch_size=config["batch_size"], shuffle=config.get("shuffle", False),
                        repeat=True, drop_remainder=True)


def _fit(model, config, dataset, x, y, callbacks):
    """``warmup + steps`` training steps: over the repeated dataset, or (``pipeline="numpy"``) one shuffled
    epoch over the first ``(warmup + steps) * batch_size`` rows given as NumPy arrays (Keras slices them)."""
    total = config["warmup"] + config["steps"]
    if dataset is not None:
        return model.fit(dataset, epochs=1, steps_per_epoch=total, verbose=0, callbacks=callbacks)
    n = total * config["batch_size"]
    if n > len(y):
        raise ValueError(f"pipeline='numpy' needs {n} training rows (warmup + steps batches); got {len(y)}")
    xs = {k: v[:n] for k, v in x.items()}
    return model.fit(xs, y[:n], batch_size=config["batch_size"], epochs=1, shuffle=True, verbose=0,
                     callbacks=callbacks)


def _timer_callback(keras):
    class StepTimer(keras.callbacks.Callback):
        """Wall and process CPU time (all threads) at the end of every training batch."""

        def __init__(self):
            super().__init__()
            self.ends, self.cpu = [], []

        def on_train_begin(self, logs=None):
            self.begin, self.cpu_begin = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())
            self.cpu.append(time.process_time())

    return StepTimer()


def _variables_size(layers):
    """(float elements, bytes of float variables, bytes of integer index variables) of some layers' weights."""
    floats = float_bytes = int_bytes = 0
    for layer in layers:
        for v in layer.weights:
            n = int(np.prod(v.shape))
            dtype = np.dtype(v.dtype.name if hasattr(v.dtype, "name") else str(v.dtype))
            if np.issubdtype(dtype, np.floating):
                floats += n
                float_bytes += n * dtype.itemsize
            else:
                int_bytes += n * dtype.itemsize
    return floats, float_bytes, int_bytes


def _build_tfemb(config, schema):
    import tensorflow as tf

    from tfemb.layers import scheme_factory
    from tfemb.models.deepfm import DeepFM
    from tfemb.tasks import compile_model, task_metrics

    scheme = config["scheme"]
    kwargs = {"output_dim": EMBEDDING_DIM}
    if scheme != "fixed":
        kwargs["compression"] = COMPRESSION
    if not config.get("validate_ids", True):
        kwargs["validate_ids"] = False
    if scheme == "md_field":  # the paper's CTR setting: one block per field, dims from the field sizes
        from tfemb.layers import md_field_factory

        kwargs.pop("output_dim")
        embeddings = md_field_factory(schema, EMBEDDING_DIM, alpha=MD_ALPHA, round_pow2=True, **kwargs)
    else:
        embeddings = None if scheme == "fixed" and len(kwargs) == 1 else scheme_factory(scheme, **kwargs)
    model_kwargs = dict(config.get("model_kwargs", {}))
    model_cls = DeepFM
    if config.get("sparse_read"):
        _sparse_read_patch(tf)
    if config.get("fused"):
        model_cls = _fused_deepfm_class(tf, DeepFM)
    model = model_cls(schema, embeddings=embeddings, embedding_dim=EMBEDDING_DIM,
                      embedding_optimizer="adam" if config["optimizer"] == "lazy_adam" else None, **model_kwargs)
    compile_kwargs = {}
    if not config.get("metrics", True):
        compile_kwargs["metrics"] = []
    if config.get("metrics") == "light":
        compile_kwargs["metrics"] = [m for m in task_metrics("binary") if m.name == "logloss"]
    if compile_kwargs:
        from tfemb.tasks import task_loss

        optimizer = tf.keras.optimizers.Adam(learning_rate=LEARNING_RATE)
        model.compile(optimizer=optimizer, loss=task_loss("binary"), jit_compile=config.get("jit", False),
                      **compile_kwargs)
    else:
        compile_model(model, optimizer="adam", learning_rate=LEARNING_RATE, jit_compile=config.get("jit", False))
    model.build()
    layers = list(model.embedding_list)
    floats, float_bytes, int_bytes = _variables_size(layers)
    sizes = {
        "embedding_parameters": int(model.embedding_parameter_count()),
        "embedding_storage_bytes": int(model.embedding_storage_bytes()),
        "embedding_variable_floats": floats,
        "embedding_variable_bytes": float_bytes,
        "embedding_index_bytes": int_bytes,
        "linear_parameters": int(sum(t.parameter_count() for t in model.linear_tables())),
        "model_parameters": int(sum(int(np.prod(v.shape)) for v in model.trainable_weights)),
    }
    return model, sizes


def _fused_deepfm_class(tf, base):
    """EXPERIMENT (lever measurement only, not a tfemb feature): DeepFM over stacked field tables.

    The 26 factor tables become one ``[sum V, dim]`` variable and the 26 first-order tables one ``[sum V, 1]``
    variable; ids are offset by each field's first row, so one gather per table serves every field and the
    row-sparse optimizer gets one IndexedSlices per table instead of 26. Fixed embeddings only. The per-field
    layers are still built (and left unused), so this variant's memory is not meaningful.
    """
    from tfemb._keras import IS_KERAS_3
    from tfemb.models import blocks

    class FusedDeepFM(base):
        def _fused_setup(self):
            if getattr(self, "_fused_table", None) is not None:
                return
            sizes = [self.embedding_layers[n].vocabulary_size for n in self.embedding_names]
            self._fused_offsets = tf.constant(np.concatenate([[0], np.cumsum(sizes)[:-1]]), tf.int64)
            uniform = tf.keras.initializers.RandomUniform(-0.05, 0.05)
            self._fused_table = self.add_weight(name="fused_embeddings", shape=(int(sum(sizes)), self.embedding_dim),
                                                initializer=uniform, trainable=True)
            self._fused_linear = self.add_weight(name="fused_linear", shape=(int(sum(sizes)), 1),
                                                 initializer="zeros", trainable=True)
            self._fused_bias = self.add_weight(name="fused_bias", shape=(1,), initializer="zeros", trainable=True)

        def _fused_ids(self, inputs):
            ids = tf.stack([tf.cast(inputs[n], tf.int64) for n in self.embedding_names], axis=1)  # [batch, F]
            return ids + self._fused_offsets

        @staticmethod
        def _sparse(variable):
            return variable.value if IS_KERAS_3 else variable  # the tf.Variable: a ResourceGather, no dense read

        def embed(self, inputs):
            self._fused_setup()
            vectors = tf.gather(self._sparse(self._fused_table), self._fused_ids(inputs))  # [batch, F, dim]
            embedded = dict(zip(self.embedding_names, tf.unstack(vectors, axis=1)))
            dense = tf.stack([tf.cast(inputs[n], self.compute_dtype) for n in self.dense_names], axis=-1)
            return embedded, dense

        def linear_logits(self, inputs, dense, training=None):
            weights = tf.gather(self._sparse(self._fused_linear), self._fused_ids(inputs))  # [batch, F, 1]
            penalty = blocks.l2_penalty(tf.unstack(weights, axis=1), self.l2_linear)
            # Keras 2 refuses an eager add_loss outside a layer call (RecModel.build runs call eagerly).
            if penalty is not None and not tf.executing_eagerly():
                self.add_loss(penalty)
            return tf.reduce_sum(weights, axis=1) + self.linear.dense_layer(dense) + self._fused_bias

        def sparse_variables(self):
            self._fused_setup()
            return [self._fused_table, self._fused_linear]

    return FusedDeepFM


def _sparse_read_patch(tf):
    """EXPERIMENT (lever measurement only): ``EmbeddingScheme.gather_rows`` reads rows sparsely under Keras 3.

    ``tf.gather(keras3_variable, ids)`` converts the whole variable to a tensor first (ReadVariableOp, then
    GatherV2). Once a row-sparse update (ResourceScatter*) has touched the variable, TensorFlow keeps it in
    copy-on-read mode, so that dense read copies the entire table on every step. Gathering from the backing
    ``tf.Variable`` (``variable.value``) emits ResourceGather instead, which reads only the looked-up rows;
    the gradient is the same IndexedSlices. Under Keras 2 tables are ``tf.Variable`` already: no change.
    """
    from tfemb._keras import IS_KERAS_3, keras
    from tfemb.layers.embedding_scheme import EmbeddingScheme

    if IS_KERAS_3:
        def gather_rows(self, table, rows):
            if isinstance(table, keras.Variable):
                table = table.value
            return tf.gather(table, rows)

        EmbeddingScheme.gather_rows = gather_rows


def _deepctr_import_shim():
    """Imports deepctr without its import-time version check (a thread that queries PyPI over the network)."""
    import types

    saved = sys.modules.get("requests")
    stub = types.ModuleType("requests")
    stub.codes = types.SimpleNamespace(ok=200)
    stub.get = lambda *args, **kwargs: types.SimpleNamespace(status_code=0, text="{}")
    sys.modules["requests"] = stub
    try:
        import deepctr  # noqa: F401
        import deepctr.models  # noqa: F401
    finally:
        if saved is not None:
            sys.modules["requests"] = saved
        else:
            sys.modules.pop("requests", None)


def _build_deepctr(config, sizes):
    import tensorflow as tf

    from tfemb.tasks import task_loss, task_metrics

    _deepctr_import_shim()
    from deepctr.feature_column import DenseFeat, SparseFeat
    from deepctr.models import DeepFM

    sparse = [SparseFeat(f"C{f + 1}", vocabulary_size=size, embedding_dim=EMBEDDING_DIM, dtype="int64")
              for f, size in enumerate(sizes)]
    dense = [DenseFeat(f"I{j + 1}", 1) for j in range(NUM_NUMERIC)]
    columns = sparse + dense
    reg = config.get("l2", 0.0)
    model = DeepFM(columns, columns, dnn_hidden_units=tuple(config["dnn"]), l2_reg_linear=reg,
                   l2_reg_embedding=reg, l2_reg_dnn=0.0, dnn_dropout=0.0, seed=config["seed"], task="binary")
    model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate=LEARNING_RATE), loss=task_loss("binary"),
                  metrics=task_metrics("binary") if config.get("metrics", True) else [],
                  jit_compile=config.get("jit", False))
    # DeepCTR names its factor tables "sparse_emb_<feature>" and its first-order ones "linear..._emb_<feature>".
    emb_layers = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.Embedding)
                  and not layer.name.startswith("linear")]
    floats, float_bytes, int_bytes = _variables_size(emb_layers)
    fm_params = sum(size * EMBEDDING_DIM for size in sizes)
    info = {
        # DeepFM's factorised (FM + DNN) tables, the quantity tfemb's parameter_count() reports.
        "embedding_parameters": int(fm_params),
        "embedding_storage_bytes": int(fm_params * 4),
        "embedding_variable_floats": floats,
        "embedding_variable_bytes": float_bytes,
        "embedding_index_bytes": int_bytes,
        "linear_parameters": int(sum(sizes)),
        "model_parameters": int(sum(int(np.prod(v.shape)) for v in model.trainable_weights)),
    }
    return model, info


def run_child(config, data_dir):
    """One measured run in this (fresh) process; returns the result dict."""
    started = time.perf_counter()
    train_x, train_y, held_x, held_y, counts, meta = load_data(data_dir)
    import tensorflow as tf

    keras = tf.keras
    keras.utils.set_random_seed(config["seed"])
    sizes = meta["sizes"]
    if config["kind"] == "deepctr":
        model, size_info = _build_deepctr(config, sizes)
    else:
        schema = build_schema(sizes, counts)
        model, size_info = _build_tfemb(config, schema)
    dataset = _train_dataset(tf, config, train_x, train_y)
    timer = _timer_callback(keras)
    warmup, steps, batch = config["warmup"], config["steps"], config["batch_size"]
    built = time.perf_counter()
    load_before = os.getloadavg()[0]
    _fit(model, config, dataset, train_x, train_y, [timer])
    ends, cpu = np.asarray(timer.ends), np.asarray(timer.cpu)
    seconds = float(ends[-1] - ends[warmup - 1])
    cpu_seconds = float(cpu[-1] - cpu[warmup - 1])
    step_ms = np.diff(ends[warmup - 1:]) * 1000.0
    trained = time.perf_counter()
    probs = _predict(model, tf, held_x)
    result = {
        **config,
        "keras_module": keras.__name__.split(".")[0],
        "tensorflow": tf.__version__,
        "examples_per_second": steps * batch / seconds,
        "timed_seconds": seconds,
        "step_ms_median": float(np.median(step_ms)),
        "step_ms_p90": float(np.percentile(step_ms, 90)),
        "cpu_ms_per_step": cpu_seconds / steps * 1000.0,
        "warmup_seconds": float(ends[warmup - 1] - timer.begin),
        "load_average": [load_before, os.getloadavg()[0]],
        "auc": auc(held_y, probs),
        "logloss": logloss(held_y, probs),
        "trained_examples": (warmup + steps) * batch,
        "peak_rss_mb": peak_rss_mb(),
        "setup_seconds": built - started,
        "eval_seconds": time.perf_counter() - trained,
        "total_seconds": time.perf_counter() - started,
        **size_info,
    }
    if config["kind"] == "tfemb":
        result["dnn"] = [int(u) for u in model.dnn_units]
    return result


def _predict(model, tf, x, max_batch=10_000):
    """Held-out probabilities; the batch divides the row count, so the predict function is traced once."""
    n = len(next(iter(x.values())))
    batch = next(d for d in range(min(n, max_batch), 0, -1) if n % d == 0)
    dataset = tf.data.Dataset.from_tensor_slices(dict(x)).batch(batch).prefetch(2)
    return np.asarray(model.predict(dataset, verbose=0)).reshape(-1)


def pipeline_only(data_dir, batch_size, steps, variant):
    """Batches/second of an input pipeline alone (no model): is the pipeline ever the bottleneck?"""
    train_x, train_y, _, _, _, _ = load_data(data_dir)
    import tensorflow as tf

    name, _, extra = variant.partition("+")
    config = {"batch_size": batch_size, "pipeline": name, "shuffle": extra == "shuffle"}
    it = iter(_train_dataset(tf, config, train_x, train_y))
    for _ in range(5):
        next(it)
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    seconds = time.perf_counter() - start
    return {"pipeline": variant, "examples_per_second": steps * batch_size / seconds,
            "ms_per_batch": seconds / steps * 1000.0, "peak_rss_mb": peak_rss_mb()}


# ============================================================================================= parent
def _child_env(keras_version):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if keras_version == 2:
        env["TF_USE_LEGACY_KERAS"] = "1"
    else:
        env.pop("TF_USE_LEGACY_KERAS", None)
    return env


def run_in_subprocess(config, data_dir, workdir, timeout=CHILD_TIMEOUT):
    """Runs one configuration in a fresh Python process; returns its result dict or an error dict."""
    result_path = pathlib.Path(workdir) / f"result_{config['id']}.json"
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", json.dumps(config),
           "--data", str(data_dir), "--result", str(result_path)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=_child_env(config["keras"]), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**config, "error": f"timed out after {timeout} s"}
    if proc.returncode != 0 or not result_path.exists():
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-15:])
        return {**config, "error": f"exit code {proc.returncode}: {tail}"}
    result = json.loads(result_path.read_text())
    result["wall_seconds"] = time.perf_counter() - start
    return result


def deepctr_available():
    code = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('deepctr') else 1)"
    return subprocess.run([sys.executable, "-c", code]).returncode == 0


def label_of(config):
    if config["kind"] == "deepctr":
        text = "DeepCTR DeepFM"
        if config.get("l2"):
            text += " (L2 1e-5, library default)"
        return text + f" [{config['pipeline']}]"
    return f"tfemb DeepFM {config['scheme']}"


#: The lever variants. The input pipeline is the first-order lever (on 2 cores a slow pipeline takes CPU from
#: the train step and hides every other lever), so the others are measured one at a time on top of the
#: index-gather pipeline (the proposed make_dataset) and compared with "index-gather pipeline".
LEVERS = (
    ("baseline: make_dataset", {}),
    ("NumPy arrays to fit", {"pipeline": "numpy"}),
    ("prebatched pipeline", {"pipeline": "prebatched"}),
    ("index-gather pipeline (proposed make_dataset)", {"pipeline": "index_gather"}),
    ("index-gather, shuffled", {"pipeline": "index_gather", "shuffle": True}),
    ("+ jit_compile=True", {"pipeline": "index_gather", "jit": True}),
    ("+ no compiled metrics", {"pipeline": "index_gather", "metrics": False}),
    ("+ validate_ids=False", {"pipeline": "index_gather", "validate_ids": False}),
    ("+ sparse-read lookup (experiment)", {"pipeline": "index_gather", "sparse_read": True}),
    ("+ fused lookup (experiment)", {"pipeline": "index_gather", "fused": True}),
    ("+ fused + no metrics + validate_ids=False", {"pipeline": "index_gather", "fused": True, "metrics": False,
                                                   "validate_ids": False}),
)
#: The lever the "+ ..." variants are compared with.
LEVER_REFERENCE = "index-gather pipeline (proposed make_dataset)"


def plan(args, tfemb_dnn):
    """The list of configurations to run, in order."""
    base = {"batch_size": args.batch_size, "warmup": args.warmup, "steps": args.steps, "seed": args.seed,
            "pipeline": args.pipeline, "jit": args.jit}
    configs = []
    for keras_version in args.keras if args.main else ():
        for optimizer in args.optimizers:
            for scheme in args.schemes:
                configs.append({**base, "kind": "tfemb", "scheme": scheme, "keras": keras_version,
                                "optimizer": optimizer})
    if args.deepctr and args.main:
        deepctr = {**base, "kind": "deepctr", "scheme": "fixed", "keras": 2, "optimizer": "adam", "dnn": tfemb_dnn,
                   "l2": 0.0}
        # DeepCTR documents model.fit on NumPy arrays; it is also run on tfemb's pipeline. The faster of the
        # two is the reference the ratios use.
        pipelines = ["numpy"] + ([args.pipeline] if args.pipeline != "numpy" and not args.quick else [])
        configs += [{**deepctr, "pipeline": p} for p in pipelines]
        if args.deepctr_defaults:
            configs.append({**deepctr, "pipeline": "numpy", "l2": 1e-5})
    if args.levers:
        for keras_version in args.keras:
            for optimizer in args.lever_optimizers:
                common = {**base, "kind": "tfemb", "scheme": "fixed", "keras": keras_version, "optimizer": optimizer,
                          "pipeline": "make_dataset", "jit": False, "lever": True}
                for name, change in LEVERS:
                    if change.get("fused") and optimizer != "lazy_adam":
                        continue  # the prototype relies on the row-sparse optimizer skipping unused tables
                    configs.append({**common, **change, "variant": name})
    for i, config in enumerate(configs):
        config["id"] = i
    return configs


def _best_of(samples):
    """The repeat with the highest examples/s (the least disturbed by other load), with every repeat's
    examples/s and CPU ms/step attached; an error only when every repeat failed."""
    good = [r for r in samples if "error" not in r]
    if not good:
        return samples[-1]
    best = dict(max(good, key=lambda r: r["examples_per_second"]))
    best["repeats"] = len(samples)
    best["examples_per_second_samples"] = [r["examples_per_second"] for r in good]
    best["cpu_ms_per_step_samples"] = [r["cpu_ms_per_step"] for r in good]
    return best


def _fmt(value, spec):
    return "—" if value is None else format(value, spec)


def summarise(results):
    """Adds ratios to tfemb fixed (same keras, optimizer) and to DeepCTR; returns the headline summary."""
    main = [r for r in results if not r.get("lever") and "error" not in r]
    fixed = {(r["keras"], r["optimizer"]): r for r in main if r["kind"] == "tfemb" and r["scheme"] == "fixed"}
    references = [r for r in main if r["kind"] == "deepctr" and not r.get("l2")]
    deepctr = max(references, key=lambda r: r["examples_per_second"]) if references else None
    for r in results:
        if "error" in r:
            continue
        ref = fixed.get((r["keras"], r["optimizer"])) if r["kind"] == "tfemb" and not r.get("lever") else None
        r["ratio_to_fixed"] = r["examples_per_second"] / ref["examples_per_second"] if ref else None
        r["ratio_to_deepctr"] = (r["examples_per_second"] / deepctr["examples_per_second"]) if deepctr else None
        r["deepctr_reference"] = r is deepctr
    summary = {}
    if deepctr:
        summary.update({"deepctr_reference": label_of(deepctr),
                        "deepctr_examples_per_second": deepctr["examples_per_second"],
                        "deepctr_auc": deepctr["auc"], "deepctr_logloss": deepctr["logloss"]})
        candidates = [r for r in main if r["kind"] == "tfemb" and r["scheme"] == "fixed"]
        if candidates:
            best = max(candidates, key=lambda r: r["examples_per_second"])
            summary.update({
                "best_tfemb_fixed": {k: best[k] for k in ("keras", "optimizer", "pipeline", "examples_per_second",
                                                          "auc", "logloss")},
                "speedup_vs_deepctr": best["examples_per_second"] / deepctr["examples_per_second"],
                # CPU time per step moves far less with other load on the machine than wall time does.
                "cpu_speedup_vs_deepctr": deepctr["cpu_ms_per_step"] / best["cpu_ms_per_step"],
                "auc_difference": best["auc"] - deepctr["auc"],
            })
            # "Equal AUC" allows the run-to-run noise of a 100k-row held-out AUC (~0.001).
            summary["target_met"] = bool(summary["speedup_vs_deepctr"] >= 1.5
                                         and best["auc"] >= deepctr["auc"] - 0.001)
            summary["per_setting"] = [
                {"keras": r["keras"], "optimizer": r["optimizer"],
                 "speedup_vs_deepctr": r["examples_per_second"] / deepctr["examples_per_second"],
                 "cpu_speedup_vs_deepctr": deepctr["cpu_ms_per_step"] / r["cpu_ms_per_step"],
                 "auc_difference": r["auc"] - deepctr["auc"]}
                for r in candidates
            ]
    return summary


def _error_line(r, columns):
    return f"| {label_of(r)} | {r['keras']} | {r['optimizer']} | failed: {r['error'].splitlines()[-1][:120]} |" + \
        " |" * (columns - 4)


def markdown(results, summary, meta):
    lines = ["# DeepFM training throughput", ""]
    lines.append(
        f"{meta['machine']}; TensorFlow {meta['tensorflow']}; batch {meta['batch_size']}, {meta['steps']} timed "
        f"steps after {meta['warmup']} warm-up steps; {meta['train_rows']:,} training rows, "
        f"{meta['holdout_rows']:,} held-out rows; 26 categorical fields ({meta['total_ids']:,} ids, "
        f"vocab scale {meta['vocab_scale']}) + 13 numeric; embedding dim {EMBEDDING_DIM}; DNN "
        f"{meta['dnn']}; compression {COMPRESSION:g} for hashing / QR / double hashing; Adam, learning rate "
        f"{LEARNING_RATE:g}. Click rate {meta['data']['click_rate']:.3f}; Bayes-optimal held-out AUC "
        f"{meta['data']['bayes_auc_holdout']:.4f}, logloss {meta['data']['bayes_logloss_holdout']:.4f}. "
        f"AUC/logloss: held-out, after {meta['warmup'] + meta['steps']} training steps (equal for all runs). "
        f"Load average during the runs: {meta['load_average_range'][0]:.1f}-{meta['load_average_range'][1]:.1f} "
        f"(above {os.cpu_count()} means other processes shared the cores)"
        + (f"; each configuration ran {meta['repeats']} times round-robin, the fastest repeat is shown."
           if meta["repeats"] > 1 else ".")
    )
    lines.append("")
    lines.append(f"Reproduce: `{meta.get('command') or 'python benchmarks/throughput.py'}`")
    lines.append("")
    lines.append(
        "`adam`: stock Keras Adam on every variable. `lazy_adam`: tfemb's row-sparse `embedding_optimizer=\"adam\"` "
        "on the tables, stock Adam on the rest. Input: `make_dataset` = `tfemb.data.make_dataset`, `numpy` = "
        "NumPy arrays handed to `fit` (DeepCTR's documented usage), `prebatched` = whole batches sliced in NumPy, "
        "`index_gather` = batches of row indices and one gather per feature (the proposed `make_dataset`). "
        "Ratio to fixed: same Keras, same optimizer. Ratio to DeepCTR: against the faster DeepCTR run (no L2, "
        "stock Adam, same model). CPU ms/step: process CPU time (all threads) per step, less sensitive to "
        "other load than wall time. Peak RSS: the run's own process. Table MB: float variables of the "
        "embedding layers (equals embedding params x 4 bytes when no scheme keeps a hidden table); index MB: "
        "integer lookup arrays (double hashing's id -> hot-row remap). Linear params: DeepFM's first-order "
        "per-id weights (a full-vocabulary 1-dim table per field, not compressed by the scheme)."
    )
    lines.append("")
    if all(r.get("lever") for r in results):
        return _levers_markdown(lines, results, meta)
    header = ("| config | keras | optimizer | input | examples/s | ratio to fixed | ratio to DeepCTR | ms/step "
              "(median) | CPU ms/step | peak RSS MB | embedding params | table MB | index MB | linear params "
              "| AUC | logloss |")
    columns = header.count("|") - 1
    lines += [header, "|" + "---|" * columns]
    for r in results:
        if r.get("lever"):
            continue
        if "error" in r:
            lines.append(_error_line(r, columns))
            continue
        lines.append(
            f"| {label_of(r)} | {r['keras']} | {r['optimizer']} | {r['pipeline']} | "
            f"{r['examples_per_second']:,.0f} | {_fmt(r.get('ratio_to_fixed'), '.2f')} | "
            f"{_fmt(r.get('ratio_to_deepctr'), '.2f')} | {r['step_ms_median']:.1f} | {r['cpu_ms_per_step']:.1f} | "
            f"{r['peak_rss_mb']:,.0f} | {r['embedding_parameters']:,} | "
            f"{r['embedding_variable_bytes'] / 2**20:,.1f} | {r['embedding_index_bytes'] / 2**20:,.1f} | "
            f"{r.get('linear_parameters', 0):,} | {r['auc']:.4f} | {r['logloss']:.4f} |"
        )
    if "speedup_vs_deepctr" in summary and meta.get("quick"):
        lines += ["", "Quick run (vocab scale 0.1, few steps): a smoke test of the script, not a measurement of "
                      "the target; with small tables dense Adam is cheap and the input pipeline dominates."]
    elif "speedup_vs_deepctr" in summary:
        best = summary["best_tfemb_fixed"]
        lines += ["", f"**Target (tfemb fixed >= 1.5x DeepCTR examples/s at equal or better AUC): "
                      f"{'met' if summary['target_met'] else 'NOT met'}.** Best tfemb fixed run (Keras "
                      f"{best['keras']}, {best['optimizer']}, {best['pipeline']}): "
                      f"{best['examples_per_second']:,.0f} examples/s = {summary['speedup_vs_deepctr']:.2f}x "
                      f"{summary['deepctr_reference']} ({summary['deepctr_examples_per_second']:,.0f}); "
                      f"{summary['cpu_speedup_vs_deepctr']:.2f}x less CPU time per step; AUC {best['auc']:.4f} vs "
                      f"{summary['deepctr_auc']:.4f}.", ""]
        for row in summary["per_setting"]:
            lines.append(f"- tfemb fixed, Keras {row['keras']}, {row['optimizer']}: "
                         f"{row['speedup_vs_deepctr']:.2f}x DeepCTR's examples/s "
                         f"({row['cpu_speedup_vs_deepctr']:.2f}x by CPU time per step), "
                         f"AUC {row['auc_difference']:+.4f}")
    mismatched = [r for r in results if "error" not in r and r["kind"] == "tfemb" and not r.get("lever")
                  and r["embedding_variable_floats"] != r["embedding_parameters"]]
    lines.append("")
    if mismatched:
        lines.append("**Table memory check FAILED** for: " + ", ".join(
            f"{label_of(r)} (variables {r['embedding_variable_floats']:,} vs parameters "
            f"{r['embedding_parameters']:,})" for r in mismatched))
    else:
        lines.append("Table memory check: in every tfemb run the embedding layers' float variables hold exactly "
                     "`parameter_count()` values (no hidden full-size table).")
    return _levers_markdown(lines, results, meta)


def _levers_markdown(lines, results, meta):
    """The lever and pipeline tables (when measured) and the closing of the report."""
    levers = [r for r in results if r.get("lever")]
    if levers:
        lines += ["", "## Speed levers (tfemb DeepFM, fixed embeddings, one change at a time)", "",
                  "Pipelines are compared with the make_dataset baseline; `+` rows add one lever to the index-gather "
                  "pipeline and are compared with it. `(experiment)`: a prototype inside this script that "
                  "measures a proposed tfemb change. \"vs reference\": examples/s ratio; \"CPU vs reference\": "
                  "ratio of CPU time per step (>1 = less CPU), the steadier of the two on a shared machine.", "",
                  "| variant | keras | optimizer | examples/s | vs reference | ms/step (median) | CPU ms/step "
                  "| CPU vs reference | peak RSS MB | AUC |", "|" + "---|" * 10]
        def reference(r):
            name = LEVER_REFERENCE if r["variant"].startswith("+") else LEVERS[0][0]
            return next((b for b in levers if b.get("variant") == name and "error" not in b
                         and (b["keras"], b["optimizer"]) == (r["keras"], r["optimizer"])), None)

        for r in levers:
            if "error" in r:
                lines.append(f"| {r['variant']} | {r['keras']} | {r['optimizer']} | failed: "
                             f"{r['error'].splitlines()[-1][:120]} |" + " |" * 5)
                continue
            ref = reference(r)
            ratio = r["examples_per_second"] / ref["examples_per_second"] if ref else None
            cpu_ratio = ref["cpu_ms_per_step"] / r["cpu_ms_per_step"] if ref else None
            lines.append(f"| {r['variant']} | {r['keras']} | {r['optimizer']} | {r['examples_per_second']:,.0f} | "
                         f"{_fmt(ratio, '.2f')} | {r['step_ms_median']:.1f} | {r['cpu_ms_per_step']:.1f} | "
                         f"{_fmt(cpu_ratio, '.2f')} | {r['peak_rss_mb']:,.0f} | {r['auc']:.4f} |")
    pipes = meta.get("pipelines")
    if pipes:
        lines += ["", "## Input pipeline alone (no model)", "", "| pipeline | examples/s | ms per batch |",
                  "|---|---|---|"]
        for p in pipes:
            lines.append(f"| {p['pipeline']} | {p['examples_per_second']:,.0f} | {p['ms_per_batch']:.2f} |")
    lines.append("")
    return "\n".join(lines)


def _load_range(results):
    loads = [v for r in results if "load_average" in r for v in r["load_average"]]
    return [min(loads), max(loads)] if loads else [float("nan"), float("nan")]


def _machine():
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({cpu})"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=None, help="training rows (default 400,000; quick 60,000)")
    parser.add_argument("--holdout", type=int, default=None, help="held-out rows (default 100,000; quick 20,000)")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 200; quick 40)")
    parser.add_argument("--epochs", type=float, default=None,
                        help="timed length in passes over the training rows (overrides --steps)")
    parser.add_argument("--warmup", type=int, default=None, help="excluded warm-up steps (default 30; quick 10)")
    parser.add_argument("--vocab-scale", type=float, default=None,
                        help="multiplies the capped Criteo cardinalities (default 1.0: 1.48M ids; quick 0.1)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: benchmarks/results; with --quick: outputs/bench-quick)")
    parser.add_argument("--name", default="throughput", help="output file stem: <out>/<name>.json and .md")
    parser.add_argument("--quick", action="store_true",
                        help="a small run (< 2 minutes) to check the script; writes into outputs/bench-quick unless "
                             "--out is given")
    parser.add_argument("--levers", action="store_true", help="also run the one-lever-at-a-time variants")
    parser.add_argument("--schemes", nargs="+", default=list(DEFAULT_SCHEMES), choices=SCHEMES,
                        help=f"embedding schemes of the tfemb runs (default {' '.join(DEFAULT_SCHEMES)})")
    parser.add_argument("--keras", nargs="+", type=int, default=None, choices=[2, 3],
                        help="Keras versions of the tfemb runs (default 3 2; quick: 3)")
    parser.add_argument("--optimizers", nargs="+", default=None, choices=OPTIMIZERS,
                        help="optimizers of the tfemb runs (default adam lazy_adam; quick: lazy_adam)")
    parser.add_argument("--pipeline", default="make_dataset",
                        choices=("make_dataset", "prebatched", "numpy", "index_gather"),
                        help="input of the main runs: tfemb.data.make_dataset (default), whole batches sliced in "
                        "NumPy (prebatched), NumPy arrays handed to fit (numpy), or batches of row indices with one "
                        "gather per feature (index_gather)")
    parser.add_argument("--lever-optimizers", nargs="+", default=["lazy_adam"], choices=OPTIMIZERS)
    parser.add_argument("--jit", action="store_true", help="jit_compile=True for the main runs")
    parser.add_argument("--no-deepctr", dest="deepctr", action="store_false")
    parser.add_argument("--deepctr-defaults", action="store_true",
                        help="also run DeepCTR with its default L2 (1e-5) on embeddings and linear weights")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every configuration this many times (round-robin) and keep the fastest repeat")
    parser.add_argument("--no-main", dest="main", action="store_false",
                        help="skip the main matrix (with --levers: only the lever variants)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-data", action="store_true", help="keep the generated data folder")
    # Internal: one measured configuration in this process.
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--pipeline-only", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {"rows": (60_000, 400_000), "holdout": (20_000, 100_000), "steps": (40, 200),
                "warmup": (10, 30), "vocab_scale": (0.1, 1.0), "keras": ([3], [3, 2]),
                "optimizers": (["lazy_adam"], list(OPTIMIZERS))}
    for name, (q, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, q if quick else full)
    if args.child or args.pipeline_only:
        return args
    args.command = _benchcli.command_line("throughput.py", argv)
    if args.out is None:
        args.out = _benchcli.default_out(args.quick)
    _benchcli.check_min(parser, args, {"rows": 1, "holdout": 2, "batch_size": 1, "steps": 1, "repeats": 1})
    for name in ("epochs", "vocab_scale"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0. Received: {value!r}")
    if not args.name or pathlib.Path(args.name).name != args.name or args.name in (".", ".."):
        parser.error(f"--name is a file stem (no folder). Received: {args.name!r}")
    _benchcli.check_out(parser, args.out)
    if args.epochs is not None:
        args.steps = max(1, int(round(args.epochs * args.rows / args.batch_size)))
    if args.warmup < 1:
        parser.error(f"--warmup must be >= 1 (the first step traces the graph). Received: {args.warmup!r}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        result = run_child(json.loads(args.child), args.data)
        pathlib.Path(args.result).write_text(json.dumps(result))
        return 0
    if args.pipeline_only:
        config = json.loads(args.pipeline_only)
        result = pipeline_only(args.data, config["batch_size"], config["steps"], config["pipeline"])
        pathlib.Path(args.result).write_text(json.dumps(result))
        return 0

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = vocabulary_sizes(args.vocab_scale)
    total_start = time.perf_counter()
    print(f"generating {args.rows:,} + {args.holdout:,} rows, 26 fields with {sum(sizes):,} ids "
          f"(vocab scale {args.vocab_scale}) ...", flush=True)
    x, y, counts, data_info = generate(args.rows, args.holdout, sizes, seed=args.seed)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="tfemb_throughput_"))
    data_dir = workdir / "data"
    save_data(data_dir, x, y, counts, args.rows, sizes)
    del x, y
    print(f"  click rate {data_info['click_rate']:.3f}, Bayes-optimal held-out AUC "
          f"{data_info['bayes_auc_holdout']:.4f} ({time.perf_counter() - total_start:.0f} s)", flush=True)
    if args.deepctr and not deepctr_available():
        print("deepctr is not installed: DeepCTR runs skipped (pip install -r requirements-bench.txt)", flush=True)
        args.deepctr = False
    tfemb_dnn = _tfemb_dnn_default()
    configs = plan(args, tfemb_dnn)
    results = []
    try:
        pipelines = []
        if args.levers:
            for variant in ("make_dataset", "make_dataset+shuffle", "prebatched", "index_gather",
                            "index_gather+shuffle"):
                path = workdir / f"pipeline_{variant}.json"
                cfg = {"batch_size": args.batch_size, "steps": args.steps, "pipeline": variant}
                proc = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), "--pipeline-only",
                                       json.dumps(cfg), "--data", str(data_dir), "--result", str(path)],
                                      env=_child_env(3), capture_output=True, text=True, timeout=CHILD_TIMEOUT)
                if proc.returncode == 0:
                    p = json.loads(path.read_text())
                    pipelines.append(p)
                    print(f"[pipeline] {variant}: {p['examples_per_second']:,.0f} examples/s "
                          f"({p['ms_per_batch']:.2f} ms/batch)", flush=True)
        samples = {c["id"]: [] for c in configs}
        total = len(configs) * args.repeats
        count = 0
        for repeat in range(args.repeats):  # round-robin, so slow phases of other load hit every config alike
            for config in configs:
                count += 1
                result = run_in_subprocess(config, data_dir, workdir)
                samples[config["id"]].append(result)
                name = label_of(config) + (f" <{config['variant']}>" if config.get("variant") else "")
                prefix = f"[{count}/{total}] {name}, keras {config['keras']}, {config['optimizer']}"
                if "error" in result:
                    print(f"{prefix}: FAILED {result['error']}", flush=True)
                else:
                    print(f"{prefix}: {result['examples_per_second']:,.0f} examples/s "
                          f"({result['step_ms_median']:.1f} ms/step, CPU {result['cpu_ms_per_step']:.1f} ms/step), "
                          f"peak RSS {result['peak_rss_mb']:,.0f} MB, AUC {result['auc']:.4f}, logloss "
                          f"{result['logloss']:.4f}, load {result['load_average'][1]:.1f} "
                          f"({result['wall_seconds']:.0f} s)", flush=True)
        results = [_best_of(samples[c["id"]]) for c in configs]
    finally:
        if not args.keep_data:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"data kept in {data_dir}")
    summary = summarise(results)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "python": platform.python_version(),
        "tensorflow": next((r["tensorflow"] for r in results if "tensorflow" in r), None),
        "quick": args.quick,
        "command": args.command,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "steps": args.steps,
        "warmup": args.warmup,
        "train_rows": args.rows,
        "holdout_rows": args.holdout,
        "vocab_scale": args.vocab_scale,
        "vocab_cap": VOCAB_CAP,
        "vocabulary_sizes": sizes,
        "total_ids": int(sum(sizes)),
        "criteo_kaggle_cardinalities": list(CRITEO_KAGGLE_CARDINALITIES),
        "zipf_exponent": ZIPF_EXPONENT,
        "embedding_dim": EMBEDDING_DIM,
        "compression": COMPRESSION,
        "learning_rate": LEARNING_RATE,
        "dnn": tfemb_dnn,
        "data": data_info,
        "pipelines": pipelines,
        "load_average_range": _load_range(results),
        "total_seconds": time.perf_counter() - total_start,
    }
    report = {"meta": meta, "summary": summary, "runs": results}
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    (out / f"{args.name}.md").write_text(markdown(results, summary, meta))
    print(f"wrote {out / (args.name + '.json')} and {out / (args.name + '.md')} "
          f"({meta['total_seconds'] / 60:.1f} min)", flush=True)
    if "speedup_vs_deepctr" in summary:
        verdict = ("(quick run: not a target measurement)" if args.quick else
                   f"target {'met' if summary['target_met'] else 'NOT met'}")
        print(f"tfemb fixed vs DeepCTR: {summary['speedup_vs_deepctr']:.2f}x examples/s, AUC difference "
              f"{summary['auc_difference']:+.4f}; {verdict}")
    return 0


def _tfemb_dnn_default():
    """tfemb DeepFM's default ``dnn_units`` (read from its source, so the parent never imports TensorFlow);
    DeepCTR gets the same."""
    import ast

    tree = ast.parse((REPO / "tfemb" / "models" / "deepfm.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "__init__":
            args = node.args.args[-len(node.args.defaults):]
            for arg, default in zip(args, node.args.defaults):
                if arg.arg == "dnn_units":
                    return [int(v) for v in ast.literal_eval(default)]
    raise RuntimeError("could not read DeepFM's default dnn_units from tfemb/models/deepfm.py")


if __name__ == "__main__":
    sys.exit(main())
