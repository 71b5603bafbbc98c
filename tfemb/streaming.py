"""Streaming embedding-size search: FSE, SAM, DARTS, AutoEmb and ESAPN under one test-then-train protocol.

The shared driver of ``benchmarks/streaming.py`` and of ``tfemb compare``'s streaming table. The protocol is the
AutoEmb and ESAPN papers' (and their authors' code, github.com/zgahhblhc/ESAPN): rows in time order, batches of
500, each batch predicted first and then trained on, one pass; the CF network of the papers (``CFNetwork``
defaults); Adam 1e-3 for the model, 1e-4 for the architecture / policy parameters.

- ``build(method, schema, task, candidates, seed, binary_loss)``: the compiled search wrapper, its model and the
  ``stream_fit`` that trains it.
- ``run_method(method, schema, x, y, task, ...)``: one streamed run with its test-period quality, exported
  embedding parameters, speed and (for AutoEmb / ESAPN) the selected dims.

Methods (``METHODS``): ``fse`` (one fixed table per side at the sum of the candidate dims, the papers' FSE /
FIXED), ``fse_max`` (at the largest candidate), ``sam`` (AutoEmb's layer, W and θ together), ``darts`` (per-id
architecture logits, bilevel), ``autoemb`` (the controller, bilevel first-order DARTS), ``esapn`` (hard sizes
grown by two REINFORCE policies).
"""

import time

import numpy as np
import tensorflow as tf

from tfemb._keras import keras
from tfemb.layers.autoemb_embedding import AutoEmbEmbedding
from tfemb.layers.esapn_embedding import ESAPNEmbedding
from tfemb.layers.fixed_embedding import FixedEmbedding

METHODS = ("fse", "fse_max", "sam", "darts", "autoemb", "esapn")
LABELS = {"fse": "FSE (sum)", "fse_max": "FSE (max)", "sam": "SAM", "darts": "DARTS", "autoemb": "AutoEmb",
          "esapn": "ESAPN"}
#: ESAPN's candidate sizes (the paper and code); AutoEmb's paper uses three (``(2, 16, 128)``).
ESAPN_CANDIDATES = (2, 4, 8, 16, 64, 128)
#: The authors' code: ``LR_model``, ``LR_darts``, ``Batch_Size``.
LR_MODEL, LR_ARCH, BATCH = 1e-3, 1e-4, 500
#: Test-period quality reported per task (the papers' tables).
QUALITY = {"binary": ("accuracy", "mse"), "multiclass": ("accuracy", "cross_entropy")}


def prepare_stream(source, params=None, task="binary", max_rows=None):
    """``(schema, x, y, info)``: every row of a CF source (``tfemb.experiment`` source names: ``synthetic_cf``,
    ``movielens_100k``, ``movielens_latest_small``, ...) sorted by timestamp (stable), the user and item ids
    encoded by a Schema fitted on the whole stream (the authors' code also knows every id up front; the
    popularity the methods use is the running count of the stream, not these counts)."""
    from tfemb import experiment
    from tfemb.data.splits import sort_by_time

    params = dict(params or {}, task=task)
    df, schema = experiment._source_frame(source, params)
    df = sort_by_time(df, "timestamp").reset_index(drop=True)
    if max_rows:
        df = df.iloc[:int(max_rows)]
    schema.fit(df)
    x, y = schema.transform(df)
    x = {k: v for k, v in x.items() if k in ("user_id", "item_id")}
    info = {"rows": int(len(df)), "users": int(schema.vocabulary_size("user_id")),
            "items": int(schema.vocabulary_size("item_id"))}
    if task == "binary":
        info["positive_rate"] = float(np.mean(y))
    return schema, x, y, info


def _check_method(method):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}. Received: method={method!r}")
    return method


def scheme(method, candidates=ESAPN_CANDIDATES):
    """``(factory, embedding_dim)``: a scheme factory ``(feature, vocabulary_size, frequencies) -> layer`` for the
    user and item ids, and the model's embedding dim."""
    _check_method(method)
    candidates = tuple(int(c) for c in candidates)
    if method in ("fse", "fse_max"):
        dim = sum(candidates) if method == "fse" else max(candidates)
        return (lambda name, v, f=None: FixedEmbedding(v, dim, name=f"{name}_embedding")), dim
    if method == "esapn":
        return (lambda name, v, f=None: ESAPNEmbedding(v, candidate_dims=candidates, name=f"{name}_embedding")), \
            max(candidates)
    selection = "darts" if method == "darts" else "controller"
    return (lambda name, v, f=None: AutoEmbEmbedding(v, candidate_dims=candidates, selection=selection,
                                                     name=f"{name}_embedding")), max(candidates)


def binary_loss(name):
    """``"mse"``: MSE of the sigmoid output (the authors' default ``Loss_Type="MSE_sigmoid"``); ``"bce"``."""
    if name not in ("mse", "bce"):
        raise ValueError(f"binary_loss must be 'mse' or 'bce'. Received: binary_loss={name!r}")
    return keras.losses.MeanSquaredError() if name == "mse" else keras.losses.BinaryCrossentropy()


def build(method, schema, task, candidates=ESAPN_CANDIDATES, seed=0, loss="mse"):
    """``(search wrapper, model, stream_fit)`` for one method on the user / item ids of ``schema``, compiled.

    ``loss``: the binary task's loss (``binary_loss``); other tasks use their own (``tfemb.tasks``).
    """
    from tfemb import autoemb, esapn
    from tfemb.models.cf_network import CFNetwork
    from tfemb.tasks import task_loss

    keras.utils.set_random_seed(seed)
    factory, dim = scheme(method, candidates)
    model = CFNetwork(schema, embeddings=factory, embedding_dim=dim)
    model.build()
    compiled_loss = binary_loss(loss) if task == "binary" else task_loss(task)
    if method == "esapn":
        search = esapn.ESAPNSearch(model, seed=seed)
        search.compile(optimizer=keras.optimizers.Adam(LR_MODEL), policy_optimizer=keras.optimizers.Adam(LR_ARCH),
                       loss=compiled_loss, metrics=[])
        return search, model, esapn.stream_fit
    mode = "joint" if method == "sam" else "bilevel"
    search = autoemb.AutoEmbSearch(model, validation_stream=autoemb.PREVIOUS_BATCH, mode=mode)
    # SAM: θ with the model's optimizer in the same step (the authors' SAM); bilevel: θ at LR_darts.
    controller = None if method == "sam" else keras.optimizers.Adam(LR_ARCH)
    search.compile(optimizer=keras.optimizers.Adam(LR_MODEL), controller_optimizer=controller, loss=compiled_loss,
                   metrics=[])
    return search, model, autoemb.stream_fit


def selection_dims(model, features=("user_id", "item_id")):
    """``{feature: (final counts, selected dim per id)}`` of the AutoEmb / ESAPN layers of ``model``."""
    out = {}
    for name in features:
        layer = model.embedding_layers[name]
        if isinstance(layer, (AutoEmbEmbedding, ESAPNEmbedding)):
            counts = np.asarray(tf.convert_to_tensor(layer.counts)).astype(np.int64)
            out[name] = (counts, np.asarray(layer.dims_per_id(), np.int64))
    return out


def run_method(method, schema, x, y, task, candidates=ESAPN_CANDIDATES, seed=0, test_fraction=0.25, loss="mse",
               keep_dims=False, log=None):
    """One streamed run of ``method`` over the time-ordered encoded rows ``x``, ``y`` (user_id and item_id).

    Returns a dict: ``test`` / ``all`` (example-weighted quality over the last ``test_fraction`` of the stream /
    the whole stream), ``seconds``, ``examples_per_second``, ``cpu_ms_per_example`` (θ / policy steps
    included), ``embedding_parameters`` / ``embedding_bytes`` (the exported form), ``mean_dim`` per side,
    ``by_frequency`` (test-period quality by the id's running count), ``memory`` (ESAPN), ``hard_vs_soft``
    (AutoEmb / SAM / DARTS: the hard export against the soft model on the test period) and, with
    ``keep_dims``, ``dims_by_popularity`` (final counts and dims per id); ``model`` is the trained model.
    """
    from tfemb import esapn
    from tfemb.autoemb import hard_soft_difference

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1). Received: test_fraction={test_fraction!r}")
    features = ("user_id", "item_id")
    x = {k: x[k] for k in features}
    search, model, fit = build(method, schema, task, candidates, seed, loss)
    start = time.perf_counter()
    if method == "esapn":
        res = fit(search, x, y, batch_size=BATCH, evaluate_from=1.0 - test_fraction, log=log)
        by_frequency = res.get("by_frequency")
    else:
        res = fit(search, x, y, batch_size=BATCH, evaluate_from=1.0 - test_fraction, keep_predictions=True, log=log)
        first = res["evaluate_from"]
        # Running counts from the start of the stream (history), buckets over the test period, as ESAPN's.
        by_frequency = esapn.frequency_report(
            {n: x[n][first:] for n in features}, y[first:], res["predictions"][first:], res["row_losses"][first:],
            task, history={n: x[n][:first] for n in features})
    seconds = time.perf_counter() - start
    dims = selection_dims(model, features)
    out = {
        "method": method, "seed": seed, "test": res["test"], "all": res["all"], "seconds": seconds,
        "examples_per_second": res["examples_per_second"], "cpu_ms_per_example": res["cpu_ms_per_example"],
        "embedding_parameters": int(model.embedding_parameter_count()),
        "embedding_bytes": int(model.embedding_storage_bytes()),
        "mean_dim": {n: float(np.mean(d)) for n, (_, d) in dims.items()},
        "by_frequency": by_frequency,
    }
    if method == "esapn":
        out["memory"] = res.get("memory") or esapn.memory_report(model)
    if method in ("autoemb", "sam", "darts"):
        tail = slice(res["evaluate_from"], None)
        diff = hard_soft_difference(model, {k: v[tail] for k, v in x.items()}, y[tail])
        out["hard_vs_soft"] = {k: diff[k] for k in ("max_abs", "mean_abs", "agreement")}
        out["hard_test"], out["soft_test"] = diff.get("hard"), diff.get("soft")
    if keep_dims and dims:
        out["dims_by_popularity"] = {n: {"counts": c.tolist(), "dims": d.tolist()} for n, (c, d) in dims.items()}
    out["model"] = model
    return out
