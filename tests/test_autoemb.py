"""AutoEmb (Zhao et al., arXiv 2002.11252): the layer, its controller and export form vs NumPy, the search procedure.

Sizes are tiny and all different (vocabulary 23, candidate dims 2 / 5 / 7 unified to 6, controller width 11, 10
popularity buckets) so a swapped axis, candidate or block shows. Weights, batch-norm statistics and stream state
are assigned from NumPy, never asserted from a framework's random stream; where a test trains (the search), it
compares the update with one computed from the same starting point by a separate gradient tape, or only checks
which variables moved. Runs under Keras 3 and, with TF_USE_LEGACY_KERAS=1, Keras 2. Nothing creates a tensor at
import time (tests/conftest.py splits the CPU first).
"""

import functools
import re

import numpy as np
import pytest
import tensorflow as tf

from tfemb._keras import keras
from tfemb.autoemb import (
    PREVIOUS_BATCH,
    AutoEmbSearch,
    architecture_tables,
    architecture_variables,
    autoemb_layers,
    fit_experiment,
    frozen_stream_state,
    hard_soft_difference,
    model_variables,
    per_example_loss,
    previous_batch_stream,
    set_inference_selection,
    stream_fit,
)
from tfemb.layers import AutoEmbController, AutoEmbEmbedding, MultiDimEmbedding, popularity_buckets, scheme_factory
from tfemb.layers.autoemb_controller import num_popularity_buckets
from tfemb.layers.autoemb_embedding import check_candidate_dims
from tfemb.testing import run_scheme_test

V = 23
DIMS = (2, 5, 7)
N = len(DIMS)
OUT = 6  # unified dimension, on purpose none of the candidate dims
UNITS = 11  # controller hidden width
MAX_POP = 9  # one-hot popularity: 10 buckets
BUCKETS = MAX_POP + 1
IDS = np.array([0, 22, 5, 1, 17, 3, 9, 11, 2, 20, 4, 13, 7, 21, 6, 16, 8, 19, 10, 15, 12, 18, 14])
MULTI = np.array([[0, 5, -1, -1], [22, 7, 13, 1], [3, -1, -1, -1], [-1, -1, -1, -1], [4, 4, 19, 2]])


def rng(seed):
    return np.random.default_rng(seed)


def np_value(variable):
    return tf.convert_to_tensor(variable).numpy()


def softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def batch_norm(h, params, training=False):
    """Keras batch normalisation: batch statistics (biased variance) in training, moving ones at inference."""
    gamma, beta, mean, var, eps = params
    if training:
        mean, var = h.mean(axis=0), h.var(axis=0)
    return (h - mean) / np.sqrt(var + eps) * gamma + beta


def bn_values(seed, width):
    r = rng(seed)
    return (r.uniform(0.5, 1.5, width), r.uniform(-0.3, 0.3, width), r.uniform(-0.4, 0.4, width),
            r.uniform(0.3, 2.0, width))


def assign_bn(norm, values, part=None):
    """Assigns ``(gamma, beta, moving mean, moving variance)`` to ``norm`` (a Keras BatchNormalization), or to the
    columns ``part`` of it (a candidate's slice of AutoEmbEmbedding's shared ``norm``)."""
    for variable, value in zip((norm.gamma, norm.beta, norm.moving_mean, norm.moving_variance), values):
        if part is None:
            variable.assign(np.asarray(value, np.float32))
        else:
            full = np.asarray(tf.convert_to_tensor(variable)).copy()
            full[part] = value
            variable.assign(full)
    return tuple(np.asarray(v, np.float64) for v in values) + (float(norm.epsilon),)


# ------------------------------------------------------------------------------------------- NumPy references
def assign_candidates(layer, seed=0):
    """Assigns tables, transforms and batch-norm statistics; returns them as float64 NumPy arrays."""
    r = rng(seed)
    params = []
    for i, dim in enumerate(layer.candidate_dims):
        table = r.uniform(-0.8, 0.8, (layer.vocabulary_size, dim)).astype(np.float32)
        kernel = r.uniform(-0.7, 0.7, (dim, layer.output_dim)).astype(np.float32)
        bias = r.uniform(-0.2, 0.2, layer.output_dim).astype(np.float32)
        layer.tables[i].assign(table)
        layer.kernels[i].assign(kernel)
        layer.biases[i].assign(bias)
        d = layer.output_dim
        bn = assign_bn(layer.norm, bn_values(seed * 10 + i, d), part=slice(i * d, (i + 1) * d))
        params.append((table.astype(np.float64), kernel.astype(np.float64), bias.astype(np.float64), bn))
    return params


def np_candidates(params, ids, training=False):
    """``tanh(BN_n(e_n W_n + b_n))`` of flat ``ids``: ``[n, N, out]``."""
    out = []
    for table, kernel, bias, bn in params:
        out.append(np.tanh(batch_norm(table[ids] @ kernel + bias, bn, training)))
    return np.stack(out, axis=1)


def assign_controller(controller, seed=0):
    r = rng(seed)
    h, n = controller.hidden_units, controller.num_candidates
    values = {
        "popularity": r.uniform(-0.9, 0.9, (controller.num_buckets, h)),
        "context": r.uniform(-0.9, 0.9, (n + 1, h)),
        "bias": r.uniform(-0.2, 0.2, h),
        "out_kernel": r.uniform(-1.5, 1.5, (h, n)),
        "out_bias": r.uniform(-0.3, 0.3, n),
    }
    controller.popularity_kernel.assign(values["popularity"].astype(np.float32))
    controller.context_kernel.assign(values["context"].astype(np.float32))
    controller.hidden_bias.assign(values["bias"].astype(np.float32))
    controller.output_layer.kernel.assign(values["out_kernel"].astype(np.float32))
    controller.output_layer.bias.assign(values["out_bias"].astype(np.float32))
    values["bn"] = assign_bn(controller.norm, bn_values(seed + 77, h))
    return {k: (v.astype(np.float32).astype(np.float64) if isinstance(v, np.ndarray) else v)
            for k, v in values.items()}


def np_controller(c, buckets, previous_weights, previous_loss, training=False):
    """``softmax(tanh(BN(onehot(p) W_p + [α_prev, loss_prev] W_c + b)) W_o + b_o)``."""
    onehot = np.eye(c["popularity"].shape[0])[buckets]
    context = np.concatenate([previous_weights, np.reshape(previous_loss, (-1, 1))], axis=1)
    hidden = onehot @ c["popularity"] + context @ c["context"] + c["bias"]
    hidden = np.tanh(batch_norm(hidden, c["bn"], training))
    return softmax(hidden @ c["out_kernel"] + c["out_bias"])


def np_state(seed=0):
    """Distinct stream state: counts spanning the one-hot cap, weights rows summing to 1, losses."""
    r = rng(seed)
    counts = (np.arange(V) * 7 + 3) % 14  # 0..13, some above MAX_POP = 9
    weights = r.dirichlet(np.ones(N), V)
    losses = r.uniform(0.1, 2.0, V)
    return counts.astype(np.int64), weights.astype(np.float32), losses.astype(np.float32)


def assign_state(layer, state):
    counts, weights, losses = state
    layer.counts.assign(counts)
    layer.previous_weights.assign(weights)
    layer.previous_loss.assign(losses)


def darts_layer(granularity="id", seed=0, **kwargs):
    layer = AutoEmbEmbedding(V, OUT, DIMS, selection="darts", darts_granularity=granularity, **kwargs)
    layer.build()
    params = assign_candidates(layer, seed)
    shape = (V, N) if granularity == "id" else (N,)
    logits = rng(seed + 5).uniform(-2.0, 2.0, shape).astype(np.float32)
    layer.architecture_logits.assign(logits)
    alpha = softmax(logits) if granularity == "id" else np.broadcast_to(softmax(logits), (V, N))
    return layer, params, alpha


def controller_layer(seed=0, **kwargs):
    layer = AutoEmbEmbedding(V, OUT, DIMS, controller_units=UNITS, max_popularity=MAX_POP, **kwargs)
    layer.build()
    params = assign_candidates(layer, seed)
    c = assign_controller(layer.controller, seed + 1)
    state = np_state(seed + 2)
    assign_state(layer, state)
    counts, weights, losses = state
    alpha = np_controller(c, np.minimum(counts, MAX_POP), weights.astype(np.float64), losses.astype(np.float64))
    return layer, params, alpha, c, state


def soft_reference(params, alpha, ids):
    flat = np.asarray(ids).reshape(-1)
    out = (alpha[flat][:, :, None] * np_candidates(params, flat)).sum(axis=1)
    return out.reshape(np.shape(ids) + (OUT,))


def hard_reference(params, alpha, ids):
    flat = np.asarray(ids).reshape(-1)
    choice = np.argmax(alpha[flat], axis=-1)
    out = np_candidates(params, flat)[np.arange(len(flat)), choice]
    return out.reshape(np.shape(ids) + (OUT,))


def pooled(reference, ids, combiner):
    mask = ids != -1
    vectors = reference(np.where(mask, ids, 0)) * mask[..., None]
    count = mask.sum(axis=1, keepdims=True).astype(np.float64)
    norm = {"sum": np.ones_like(count), "mean": count, "sqrtn": np.sqrt(count)}[combiner]
    return np.divide(vectors.sum(axis=1), norm, out=np.zeros((len(ids), OUT)), where=norm > 0)


def close(actual, expected, atol=1e-5):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=1e-5,
                               atol=atol)


# ------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("dims,shown", [
    ([], "[]"), ((5, 2, 7), "(5, 2, 7)"), ([2, 2, 7], "[2, 2, 7]"), ([2, 5.0, 7], "[2, 5.0, 7]"),
    ([0, 2], "[0, 2]"), ([-3, 2], "[-3, 2]"), ([True, 2], "[True, 2]"), (3, "3"), ("257", "'257'"),
])
def test_check_candidate_dims_names_the_value(dims, shown):
    with pytest.raises(ValueError, match=r"Received: candidate_dims=" + re.escape(shown)):
        check_candidate_dims(dims)
    with pytest.raises(ValueError, match=r"candidate_dims"):
        AutoEmbEmbedding(V, candidate_dims=dims)


def test_check_candidate_dims_accepts_increasing_ints():
    assert check_candidate_dims([2, np.int64(5), 7]) == (2, 5, 7)
    assert check_candidate_dims(np.array([1, 16])) == (1, 16)
    assert AutoEmbEmbedding(V, candidate_dims=[2, 5, 7]).output_dim == 7  # default: d_N


BAD_LAYERS = [
    (dict(selection="enas"), r"selection must be one of \('controller', 'darts'\). Received: selection='enas'"),
    (dict(darts_granularity="field"),
     r"darts_granularity must be one of \('id', 'side'\). Received: darts_granularity='field'"),
    (dict(popularity="frequencies"), r"popularity='frequencies' needs frequencies.*Received: frequencies=None"),
    (dict(popularity="global"), r"Received: popularity='global'"),
    (dict(popularity_encoding="bits"), r"Received: popularity_encoding='bits'"),
    (dict(inference_selection="topk"), r"Received: inference_selection='topk'"),
    (dict(batch_norm_momentum=1.0),
     r"batch_norm_momentum must be a number in \[0, 1\). Received: batch_norm_momentum=1.0"),
    (dict(batch_norm_momentum=-0.1), r"Received: batch_norm_momentum=-0.1"),
    (dict(batch_norm_momentum=True), r"Received: batch_norm_momentum=True"),
    (dict(batch_norm_momentum="0.9"), r"Received: batch_norm_momentum='0.9'"),
    (dict(max_popularity=0), r"Received: max_popularity=0"),
    (dict(controller_units=0), r"Received: controller_units=0"),
    (dict(output_dim=-3), r"Received: output_dim=-3"),
    (dict(combiner="max"), r"Received: combiner='max'"),
    (dict(frequencies=np.ones(22)), r"shape \(22,\)"),
    (dict(popularity="frequencies", frequencies=np.r_[np.ones(22), -2.0]), r"a count of -2"),
]


@pytest.mark.parametrize("kwargs,message", BAD_LAYERS)
def test_bad_layer_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AutoEmbEmbedding(V, **{"candidate_dims": DIMS, **kwargs})


def test_bad_controller_and_compact_arguments():
    with pytest.raises(ValueError, match=r"Received: num_candidates=0"):
        AutoEmbController(0, BUCKETS)
    with pytest.raises(ValueError, match=r"Received: num_buckets=0"):
        AutoEmbController(N, 0)
    with pytest.raises(ValueError, match=r"Received: batch_norm_momentum=1.5"):
        AutoEmbController(N, BUCKETS, batch_norm_momentum=1.5)
    with pytest.raises(ValueError, match=r"Received: selection='argmax'"):
        AutoEmbEmbedding(V, OUT, DIMS, controller_units=UNITS).compact("argmax")
    with pytest.raises(ValueError, match=r"Received: 'ranks'"):
        popularity_buckets(np.arange(3), "ranks")


# ------------------------------------------------------------------------------------------- popularity
def test_popularity_buckets_by_hand_and_tensors_agree():
    counts = np.array([0, 1, 2, 3, 7, 8, 1000, 1001, 5000, -4])
    one_hot = [0, 1, 2, 3, 7, 8, 1000, 1000, 1000, 0]
    log2 = [0, 1, 1, 2, 3, 3, 9, 9, 9, 0]  # floor(log2(1 + c)), capped at floor(log2(1001)) = 9
    assert popularity_buckets(counts, "one_hot", 1000).tolist() == one_hot
    assert popularity_buckets(counts, "log2", 1000).tolist() == log2
    for encoding, expected in (("one_hot", one_hot), ("log2", log2)):
        for dtype in (tf.int64, tf.int32):
            out = popularity_buckets(tf.constant(counts, dtype), encoding, 1000)
            assert out.dtype == tf.int64 and out.numpy().tolist() == expected
    # Every count 0..5000 against floor(log2), exact at the powers of two, and the bucket counts.
    many = np.arange(5001)
    for cap in (1, 9, 1000, 1023):
        expected = np.minimum(np.floor(np.log2(1 + many)), np.floor(np.log2(1 + cap))).astype(np.int64)
        np.testing.assert_array_equal(popularity_buckets(many, "log2", cap), expected)
        np.testing.assert_array_equal(popularity_buckets(tf.constant(many), "log2", cap).numpy(), expected)
        assert num_popularity_buckets("log2", cap) == expected.max() + 1
        assert num_popularity_buckets("one_hot", cap) == cap + 1
    assert popularity_buckets(np.array([[2, 30], [9, 10]]), "one_hot", MAX_POP).tolist() == [[2, 9], [9, 9]]


# ------------------------------------------------------------------------------------------- controller
def controller_case():
    controller = AutoEmbController(N, BUCKETS, hidden_units=UNITS)
    controller.build()
    c = assign_controller(controller, seed=3)
    r = rng(4)
    buckets = np.array([0, 9, 4, 4, 2, 7, 1])
    weights = r.dirichlet(np.ones(N), len(buckets)).astype(np.float32)
    losses = r.uniform(0.1, 2.0, len(buckets)).astype(np.float32)
    return controller, c, buckets, weights, losses


def test_controller_matches_numpy():
    controller, c, buckets, weights, losses = controller_case()
    expected = np_controller(c, buckets, weights.astype(np.float64), losses.astype(np.float64))
    inputs = (tf.constant(buckets), tf.constant(weights), tf.constant(losses))
    out = controller(inputs, training=False).numpy()
    close(out, expected)
    close(out.sum(axis=1), np.ones(len(buckets)), atol=1e-6)
    assert out.std(axis=0).min() > 1e-3  # the inputs matter: rows differ
    # check_inputs=False (AutoEmbEmbedding's own, valid-by-construction inputs): the same numbers, and no
    # assertion ops in the traced graph (a [batch, 1] loss still accepted).
    close(controller(inputs, training=False, check_inputs=False).numpy(), expected)
    close(controller((inputs[0], inputs[1], losses[:, None]), check_inputs=False).numpy(), expected)
    ops = {kind: {n.op for n in tf.function(lambda *t: controller(t, check_inputs=kind)).get_concrete_function(
        *inputs).graph.as_graph_def().node} for kind in (True, False)}
    assert "Assert" in ops[True] and "Assert" not in ops[False]
    # A [batch, 1] loss, int32 buckets and tf.function give the same; training mode uses the batch statistics.
    close(controller((tf.constant(buckets, tf.int32), weights, losses[:, None])).numpy(), expected)
    close(tf.function(lambda *t: controller(t))(*inputs).numpy(), expected)
    trained = np_controller(c, buckets, weights.astype(np.float64), losses.astype(np.float64), training=True)
    close(controller(inputs, training=True).numpy(), trained)
    close(controller(inputs, training=True, check_inputs=False).numpy(), trained)  # batch statistics again
    assert tuple(controller.compute_output_shape(((7,), (7, 3), (7,)))) == (7, N)


def test_controller_bad_inputs_are_named():
    controller, _, buckets, weights, losses = controller_case()
    b, w, loss = tf.constant(buckets), tf.constant(weights), tf.constant(losses)
    with pytest.raises(ValueError, match=r"previous_weights must have shape \[batch, num_candidates=3\].*\(7, 4\)"):
        controller((b, tf.ones([7, 4]), loss))
    with pytest.raises(ValueError, match=r"previous_weights must have shape.*\(7,\)"):
        controller((b, tf.ones([7]), loss))
    with pytest.raises(ValueError, match=r"popularity must have shape \[batch\].*\(7, 1\)"):
        controller((b[:, None], w, loss))
    with pytest.raises(ValueError, match=r"previous_loss must have shape \[batch\] or \[batch, 1\].*\(7, 2\)"):
        controller((b, w, tf.ones([7, 2])))
    with pytest.raises(ValueError, match=r"same batch size.*\(7,\), \(6, 3\), \(7,\)"):
        controller((b, w[:6], loss))
    with pytest.raises(TypeError, match=r"popularity must be integer bucket ids. Received: dtype=float32"):
        controller((tf.cast(b, tf.float32), w, loss))
    with pytest.raises(ValueError, match=r"tuple \(popularity, previous_weights, previous_loss\).*length 2"):
        controller((b, w))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"buckets must be < num_buckets=10"):
        controller((tf.constant([1, 10, 0, 0, 0, 0, 0]), w, loss))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"buckets must be >= 0"):
        controller((tf.constant([1, -1, 0, 0, 0, 0, 0]), w, loss))
    # Batch sizes unknown while tracing are checked when the graph runs.
    spec = [tf.TensorSpec([None], tf.int64), tf.TensorSpec([None, N], tf.float32), tf.TensorSpec([None], tf.float32)]
    traced = tf.function(lambda p, q, r: controller((p, q, r)), input_signature=spec)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"previous_weights and popularity differ in batch size"):
        traced(b, w[:5], loss)


# ------------------------------------------------------------------------------------------- lookup
@pytest.mark.parametrize("granularity", ["id", "side"])
def test_darts_lookup_matches_numpy(granularity):
    layer, params, alpha = darts_layer(granularity, inference_selection="soft")
    ids = tf.constant(IDS)
    close(layer(ids).numpy(), soft_reference(params, alpha, IDS))
    close(layer.selection_weights(IDS), alpha[IDS], atol=1e-6)
    ids_2d = IDS[:20].reshape(4, 5)
    close(layer(tf.constant(ids_2d)).numpy(), soft_reference(params, alpha, ids_2d))
    layer.inference_selection = "hard"
    hard = hard_reference(params, alpha, IDS)
    close(layer(ids).numpy(), hard)
    assert np.abs(hard - soft_reference(params, alpha, IDS)).max() > 1e-2  # the two modes really differ
    np.testing.assert_array_equal(layer.selected_candidates(), np.argmax(alpha, axis=-1))
    if granularity == "id":
        assert len(set(np.argmax(alpha, axis=-1).tolist())) == N  # every candidate chosen by some id
    # Inference leaves the stream state alone.
    assert not np_value(layer.counts).any()


def test_darts_training_call_uses_batch_statistics():
    layer, params, alpha = darts_layer("id")
    ids = np.array([3, 5, 3, 0, 7, 22, 5])
    out = layer(tf.constant(ids), training=True).numpy()
    expected = (alpha[ids][:, :, None] * np_candidates(params, ids, training=True)).sum(axis=1)  # soft, batch BN
    close(out, expected)


def test_controller_lookup_matches_numpy():
    layer, params, alpha, _, _ = controller_layer(inference_selection="soft")
    close(layer.selection_weights(), alpha, atol=1e-6)
    close(layer.selection_weights(IDS[:7]), alpha[IDS[:7]], atol=1e-6)
    close(layer.selection_weights(batch_size=5), alpha, atol=1e-6)  # the batching of the read changes nothing
    close(layer(tf.constant(IDS)).numpy(), soft_reference(params, alpha, IDS))
    layer.inference_selection = "hard"
    close(layer(tf.constant(IDS)).numpy(), hard_reference(params, alpha, IDS))
    assert len(set(np.argmax(alpha, axis=-1).tolist())) >= 2
    np.testing.assert_array_equal(layer.selected_dims(), np.asarray(DIMS)[np.argmax(alpha, axis=-1)])


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
def test_multi_hot_pooling_matches_numpy(combiner):
    layer, params, alpha, _, _ = controller_layer(combiner=combiner)
    expected = pooled(lambda ids: hard_reference(params, alpha, ids), MULTI, combiner)
    close(layer(tf.constant(MULTI)).numpy(), expected)
    close(layer.compact()(tf.constant(MULTI)).numpy(), expected)
    layer.inference_selection = "soft"
    close(layer(tf.constant(MULTI)).numpy(), pooled(lambda ids: soft_reference(params, alpha, ids), MULTI, combiner))


def test_bad_ids_name_the_layer():
    layer = AutoEmbEmbedding(V, OUT, DIMS, controller_units=UNITS, name="genre_embedding")
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"genre_embedding: ids must be < vocabulary_size=23"):
        layer(tf.constant([3, 23]))
    with pytest.raises(TypeError, match=r"Received: dtype=float32"):
        layer(tf.constant([1.0]))


# ------------------------------------------------------------------------------------------- stream state
def test_training_call_updates_counts_and_previous_weights():
    layer, _, _, c, (counts, weights, losses) = controller_layer()
    ids = np.array([3, 5, 3, 0, 7, 22, 5, 5])
    # The weights of the call come from the state before it, with the controller's batch statistics.
    expected = np_controller(c, np.minimum(counts[ids], MAX_POP), weights[ids].astype(np.float64),
                             losses[ids].astype(np.float64), training=True)
    layer(tf.constant(ids), training=True)
    np.testing.assert_array_equal(np_value(layer.counts), counts + np.bincount(ids, minlength=V))
    stored = np_value(layer.previous_weights)
    close(stored[ids], expected, atol=1e-6)
    untouched = np.setdiff1d(np.arange(V), ids)
    np.testing.assert_array_equal(stored[untouched], weights[untouched])
    assert np.abs(stored[ids] - weights[ids]).max() > 1e-2  # the update is visible
    np.testing.assert_array_equal(np_value(layer.previous_loss), losses)  # written by record_losses only
    # The next call reads the new state: counts moved to other one-hot buckets, weights changed, and the
    # controller's batch normalisation moved its statistics towards the batch's (momentum 0.9).
    norm = layer.controller.norm
    mean, var = np_value(norm.moving_mean).astype(np.float64), np_value(norm.moving_variance).astype(np.float64)
    context = np.concatenate([weights[ids], losses[ids, None]], axis=1).astype(np.float64)
    hidden = c["popularity"][np.minimum(counts[ids], MAX_POP)] + context @ c["context"] + c["bias"]
    close(mean, 0.9 * c["bn"][2] + 0.1 * hidden.mean(axis=0), atol=1e-6)
    moved = {**c, "bn": c["bn"][:2] + (mean, var, c["bn"][4])}
    after = np_controller(moved, np.minimum(np_value(layer.counts), MAX_POP), stored.astype(np.float64),
                          losses.astype(np.float64))
    close(layer.selection_weights(), after, atol=1e-6)


@pytest.mark.parametrize("selection", ["controller", "darts"])
def test_trains_under_mixed_float16(selection):
    """The stream state (float32 counts / weights) is updated by row scatters while the layer computes in float16:
    under Keras 2 the state variables read float16 in the call, under Keras 3 a cast tensor; both must update the
    float32 variable, eagerly and in model.fit."""
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = AutoEmbEmbedding(V, candidate_dims=(2, 4, 8), controller_units=16, selection=selection)
        ids = np.array([0, 3, 5, 3, 7, 1], np.int64)
        out = layer(tf.constant(ids), training=True)
        assert out.dtype == tf.float16 and layer.previous_weights.dtype == "float32"
        np.testing.assert_array_equal(np_value(layer.counts), np.bincount(ids, minlength=V))
        inputs = keras.Input(shape=(), dtype="int64")
        model = keras.Model(inputs, keras.layers.Dense(1, dtype="float32")(layer(inputs)))
        model.compile(keras.optimizers.Adam(1e-2), "mse")
        history = model.fit(ids, np.ones((6, 1)), epochs=2, verbose=0)
        assert np.isfinite(history.history["loss"]).all()
        np.testing.assert_array_equal(np_value(layer.counts), 3 * np.bincount(ids, minlength=V))
    finally:
        keras.mixed_precision.set_global_policy(policy)


def test_darts_training_call_stores_softmax_weights_and_graph_mode_agrees():
    layer, _, alpha = darts_layer("id")
    ids = np.array([[4, 9], [4, 1]])
    tf.function(lambda t: layer(t, training=True))(tf.constant(ids))
    np.testing.assert_array_equal(np_value(layer.counts), np.bincount(ids.ravel(), minlength=V))
    close(np_value(layer.previous_weights)[[1, 4, 9]], alpha[[1, 4, 9]], atol=1e-6)
    first = np.zeros(N)
    first[0] = 1.0
    np.testing.assert_array_equal(np_value(layer.previous_weights)[0], first)  # initial: the smallest candidate


def test_record_losses_last_occurrence_wins_and_padding_is_skipped():
    layer = AutoEmbEmbedding(V, OUT, DIMS, controller_units=UNITS)
    layer.build()
    layer.record_losses(tf.constant([[3, 5, -1], [5, 7, -1], [-1, -1, -1]]), tf.constant([0.25, 0.5, 0.75]))
    expected = np.ones(V, np.float32)
    expected[[3, 5, 7]] = [0.25, 0.5, 0.5]
    np.testing.assert_array_equal(np_value(layer.previous_loss), expected)  # id 0 not written for the padding
    layer.record_losses(np.array([9, 2, 9]), np.array([[1.5], [2.5], [3.5]]))  # [batch, 1] losses
    expected[[9, 2]] = [3.5, 2.5]
    np.testing.assert_array_equal(np_value(layer.previous_loss), expected)


def cf_data():
    return _cf_data()


@functools.lru_cache(maxsize=1)
def _cf_data():
    from tfemb.data.splits import sort_by_time
    from tfemb.data.synthetic import make_synthetic_cf, synthetic_cf_schema

    df, _ = make_synthetic_cf(num_users=17, num_items=13, num_rows=120, latent_dim=3, seed=3)
    df = sort_by_time(df, "timestamp").reset_index(drop=True)
    schema = synthetic_cf_schema(df).fit(df)
    x, y = schema.transform(df)
    return schema, df, x, y


def cf_model(embedding=None, model_kwargs=None, **kwargs):
    from tfemb.models import CFNetwork

    schema = cf_data()[0]
    args = dict(output_dim=OUT, candidate_dims=DIMS, controller_units=UNITS, max_popularity=MAX_POP)
    args.update(kwargs)
    embeddings = embedding if embedding is not None else scheme_factory("autoemb", **args)
    model = CFNetwork(schema, embeddings=embeddings, embedding_dim=OUT, hidden_units=(5,), **(model_kwargs or {}))
    model.build()
    return model


def rows(start, stop):
    _, _, x, y = cf_data()
    return {k: v[start:stop] for k, v in x.items()}, y[start:stop]


def bincount(values, size):
    return np.bincount(np.asarray(values).ravel(), minlength=size)


def test_frozen_stream_state_and_reset():
    model = cf_model()
    layers = autoemb_layers(model)
    assert sorted(layers) == ["item_id", "user_id"]
    x, _ = rows(0, 30)
    before = {k: (np_value(l.counts), np_value(l.previous_weights)) for k, l in layers.items()}
    with frozen_stream_state(model):
        model(x, training=True)
        assert all(layer.state_frozen for layer in layers.values())
    for name, layer in layers.items():
        np.testing.assert_array_equal(np_value(layer.counts), before[name][0])
        np.testing.assert_array_equal(np_value(layer.previous_weights), before[name][1])
        assert not layer.state_frozen
    model(x, training=True)  # a training call of the model reaches the layers (training propagates)
    for name, layer in layers.items():
        np.testing.assert_array_equal(np_value(layer.counts), bincount(x[name], layer.vocabulary_size))
        layer.record_losses(x[name], np.full(30, 0.5))
        layer.reset_stream_state()
        assert not np_value(layer.counts).any()
        first = np.zeros((layer.vocabulary_size, N), np.float32)
        first[:, 0] = 1.0
        np.testing.assert_array_equal(np_value(layer.previous_weights), first)
        np.testing.assert_array_equal(np_value(layer.previous_loss), np.ones(layer.vocabulary_size))


def test_frequencies_popularity_keeps_counts_fixed():
    freq = (np.arange(V) * 5 % 17).astype(float) + 0.4  # rounded to the nearest count
    layer = AutoEmbEmbedding(V, OUT, DIMS, controller_units=UNITS, max_popularity=MAX_POP, popularity="frequencies",
                             frequencies=freq)
    layer(tf.constant(IDS), training=True)
    layer(tf.constant(IDS[:5]), training=True)
    np.testing.assert_array_equal(np_value(layer.counts), np.rint(freq).astype(np.int64))
    assert np.abs(np_value(layer.previous_weights)[IDS, 0] - 1.0).max() > 1e-3  # the weights still update
    layer.counts.assign(np.zeros(V, np.int64))
    layer.reset_stream_state()
    np.testing.assert_array_equal(np_value(layer.counts), np.rint(freq).astype(np.int64))


# ------------------------------------------------------------------------------------------- compact
def test_folded_transforms_match_numpy():
    layer, params, _ = darts_layer("id")
    for (kernel, bias), (_, w, b, (gamma, beta, mean, var, eps)) in zip(layer.folded_transforms(), params):
        scale = gamma / np.sqrt(var + eps)
        close(kernel, w * scale, atol=1e-6)
        close(bias, (b - mean) * scale + beta, atol=1e-6)
        e = rng(9).uniform(-1, 1, (4, w.shape[0]))
        close(e @ kernel + bias, batch_norm(e @ w + b, (gamma, beta, mean, var, eps)), atol=1e-5)


def test_hard_compact_stores_each_id_once():
    layer, params, alpha = darts_layer("id")
    choice = np.where(np.arange(V) % 2 == 0, 0, 2)  # candidate 1 (dim 5) used by no id
    logits = np.full((V, N), -1.0, np.float32)
    logits[np.arange(V), choice] = 1.5
    layer.architecture_logits.assign(logits)
    alpha = softmax(logits)
    compact = layer.compact()
    assert isinstance(compact, MultiDimEmbedding) and compact.selection == "hard"
    assert not compact.trainable_weights and compact.dims == [2, 7] and compact.rows == [12, 11]
    ids = tf.constant(IDS)
    close(compact(ids).numpy(), layer(ids).numpy())
    close(compact(ids).numpy(), hard_reference(params, alpha, IDS))
    # 12 ids x 2 + 11 ids x 7 table entries, the maps (2 x 6 + 6) and (7 x 6 + 6) of the used candidates.
    assert layer.parameter_count() == compact.parameter_count() == 12 * 2 + 11 * 7 + 18 + 48 == 167
    assert layer.storage_bytes() == compact.storage_bytes() == 167 * 4 + 23 * 4  # + the int32 remap
    assert sum(int(np.prod(t.shape)) for t in compact.tables) == 12 * 2 + 11 * 7
    np.testing.assert_array_equal(layer.dims_per_id(), np.asarray(DIMS)[choice])
    np.testing.assert_array_equal(compact.dims_per_id(), np.asarray(DIMS)[choice])
    # A frozen copy of a copy is the same layer.
    close(compact.compact()(ids).numpy(), compact(ids).numpy(), atol=0)


def test_hard_compact_of_a_controller_layer_and_a_single_block():
    layer, params, alpha, _, _ = controller_layer()
    compact = layer.compact()
    ids = tf.constant(IDS)
    close(compact(ids).numpy(), layer(ids).numpy())
    close(compact(ids).numpy(), hard_reference(params, alpha, IDS))
    choice = np.argmax(alpha, axis=-1)
    rows_per = np.bincount(choice, minlength=N)
    used = rows_per > 0
    expected = int((rows_per * np.asarray(DIMS)).sum() + sum(d * OUT + OUT for d, u in zip(DIMS, used) if u))
    assert layer.parameter_count() == compact.parameter_count() == expected
    assert layer.storage_bytes() == 4 * expected + 4 * V
    np.testing.assert_array_equal(layer.dims_per_id(), np.asarray(DIMS)[choice])
    # DARTS "side": one candidate for every id, one block.
    side, side_params, side_alpha = darts_layer("side")
    best = int(np.argmax(side_alpha[0]))
    compact = side.compact()
    assert compact.dims == [DIMS[best]] and compact.rows == [V]
    close(compact(ids).numpy(), hard_reference(side_params, side_alpha, IDS))
    assert side.parameter_count() == V * DIMS[best] + DIMS[best] * OUT + OUT


@pytest.mark.parametrize("kind", ["controller", "darts-id", "darts-side"])
def test_soft_compact_equals_soft_inference(kind):
    if kind == "controller":
        layer, params, alpha, _, _ = controller_layer(inference_selection="soft")
    else:
        layer, params, alpha = darts_layer(kind.split("-")[1], inference_selection="soft")
    compact = layer.compact()
    assert compact.selection == "soft" and compact.shared_weights == (kind == "darts-side")
    ids = tf.constant(IDS)
    close(compact(ids).numpy(), layer(ids).numpy())
    close(compact(ids).numpy(), soft_reference(params, alpha, IDS))
    weights = V * N if kind != "darts-side" else N
    expected = V * sum(DIMS) + sum(d * OUT + OUT for d in DIMS) + weights
    assert layer.parameter_count() == compact.parameter_count() == expected
    assert layer.storage_bytes() == compact.storage_bytes() == 4 * expected
    np.testing.assert_array_equal(layer.dims_per_id(), np.full(V, sum(DIMS)))
    # The hard form stays available with the layer in soft mode.
    close(layer.compact("hard")(ids).numpy(), hard_reference(params, alpha, IDS))
    assert layer.parameter_count("hard") < layer.parameter_count()


# ------------------------------------------------------------------------------------------- the contract
CONTRACT = [
    ({"vocabulary_size": V, "output_dim": OUT, "candidate_dims": DIMS, "controller_units": UNITS,
      "max_popularity": MAX_POP}, IDS[:11], (11, OUT)),
    # DARTS with the soft inference form (the "side" granularity's forms are checked directly above).
    ({"vocabulary_size": V, "candidate_dims": DIMS, "selection": "darts", "inference_selection": "soft"}, IDS[:11],
     (11, 7)),
    ({"vocabulary_size": V, "output_dim": OUT, "candidate_dims": DIMS, "controller_units": UNITS, "combiner": "mean",
      "popularity": "frequencies", "popularity_encoding": "log2", "frequencies": (np.arange(V) * 3.0).tolist()},
     MULTI, (5, OUT)),
]


@pytest.mark.parametrize("kwargs,ids,shape", CONTRACT, ids=["controller", "darts-soft", "multi-hot"])
def test_run_scheme_test(kwargs, ids, shape):
    # compact() is compared in inference mode (the trained layer called without training), where it applies.
    trained = run_scheme_test(AutoEmbEmbedding, kwargs, ids, shape, atol=1e-5)
    assert isinstance(trained, AutoEmbEmbedding)
    if kwargs.get("popularity") != "frequencies":  # the fit step counted its batch
        assert np_value(trained.counts).sum() == np.asarray(ids).size


# ------------------------------------------------------------------------------------------- configs
def test_layer_config_round_trip_keeps_the_outputs():
    layer, _, _, _, _ = controller_layer(combiner="sqrtn", popularity_encoding="one_hot", batch_norm_momentum=0.8)
    config = layer.get_config()
    assert config["candidate_dims"] == list(DIMS) and config["controller_units"] == UNITS
    clone = AutoEmbEmbedding.from_config(config)
    assert clone.get_config() == config
    clone.build()
    clone.set_weights(layer.get_weights())
    close(clone(tf.constant(MULTI)).numpy(), layer(tf.constant(MULTI)).numpy(), atol=1e-6)
    assert clone.norm.momentum == 0.8 and clone.controller.batch_norm_momentum == 0.8
    from tfemb._keras import deserialize, serialize

    again = deserialize(serialize(layer))
    assert isinstance(again, AutoEmbEmbedding) and again.get_config() == config


def test_controller_and_multi_dim_config_round_trips():
    controller, c, buckets, weights, losses = controller_case()
    config = controller.get_config()
    clone = AutoEmbController.from_config(config)
    assert clone.get_config() == config
    clone.build()
    clone.set_weights(controller.get_weights())
    inputs = (tf.constant(buckets), tf.constant(weights), tf.constant(losses))
    close(clone(inputs).numpy(), controller(inputs).numpy(), atol=1e-6)
    layer, _, _, _, _ = controller_layer(combiner="sum")
    for selection in ("hard", "soft"):
        compact = layer.compact(selection)
        config = compact.get_config()
        clone = MultiDimEmbedding.from_config(config)
        assert clone.get_config() == config and clone.selection == selection
        clone.build()
        clone.set_weights(compact.get_weights())
        close(clone(tf.constant(MULTI)).numpy(), compact(tf.constant(MULTI)).numpy(), atol=1e-6)


BAD_MULTI_DIM = [
    (lambda: MultiDimEmbedding(V, OUT, [2, 7], rows=[12, 10]),
     r"rows must sum to vocabulary_size=23.*Received: rows=\[12, 10\] \(sum 22\)"),
    (lambda: MultiDimEmbedding(V, OUT, [2, 7]), r"rows is required with selection='hard'"),
    (lambda: MultiDimEmbedding(V, OUT, [2, 7], rows=[23]), r"one count per block \(2\). Received: rows=\[23\]"),
    (lambda: MultiDimEmbedding(V, OUT, [2, 0], rows=[12, 11]), r"dims\[i\]=0"),
    (lambda: MultiDimEmbedding(V, OUT, [], rows=[]), r"Received: dims=\[\]"),
    (lambda: MultiDimEmbedding(V, OUT, [2, 7], rows=[23, 22], selection="soft"), r"every block has vocabulary_size"),
    (lambda: MultiDimEmbedding(V, OUT, [2, 7], selection="top"), r"Received: selection='top'"),
    (lambda: MultiDimEmbedding(V, OUT, [2], rows=[V], shared_weights=True), r"shared_weights=True needs"),
    (lambda: MultiDimEmbedding(V, OUT, [2], rows=[V], activation="relu"), r"Received: activation='relu'"),
    (lambda: MultiDimEmbedding.from_arrays([np.ones((3, 2))], [np.ones((2, 4))], [np.ones(4)], remap=[0, 0, 2]),
     r"remap must be a permutation of range\(vocabulary_size\).*Received: remap=\[0, 0, 2\]"),
    (lambda: MultiDimEmbedding.from_arrays([np.ones((3, 2))], [np.ones((2, 4))], [np.ones(4)], remap=[0, 1, 3]),
     r"remap must be a permutation"),
    (lambda: MultiDimEmbedding.from_arrays([np.ones((3, 2))], [np.ones((2, 4))], [np.ones(4)]),
     r"give remap \(hard selection\) or weights \(soft selection\), exactly one"),
    (lambda: MultiDimEmbedding.from_arrays([np.ones((3, 2))], [np.ones((2, 4))], [np.ones(4)], weights=np.ones((2, 1))),
     r"weights must have shape \(3, 1\) or \(1, 1\).*Received: shape \(2, 1\)"),
    (lambda: MultiDimEmbedding.from_arrays([np.ones((3, 2))], [np.ones((2, 4))], [np.ones(4)], weights=np.ones((3, 2))),
     r"weights must have shape \(3, 1\) or \(1, 1\).*Received: shape \(3, 2\)"),
    (lambda: MultiDimEmbedding.from_arrays([np.ones((2, 2)), np.ones((1, 3))], [np.ones((2, 4))], [np.ones(4)],
                                           remap=[0, 1, 2]), r"one kernel and one bias per table.*2 tables, 1 kernels"),
    (lambda: MultiDimEmbedding.from_arrays([np.ones((3, 2))], [np.ones((3, 4))], [np.ones(4)], remap=[0, 1, 2]),
     r"kernels\[0\] must have shape \(2, 4\).*Received: shape \(3, 4\)"),
    (lambda: MultiDimEmbedding.from_arrays([np.ones((3, 2))], [np.ones((2, 4))], [np.ones(5)], remap=[0, 1, 2]),
     r"biases\[0\] must have shape \(4,\).*Received: shape \(5,\)"),
]


@pytest.mark.parametrize("call,message", BAD_MULTI_DIM)
def test_multi_dim_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_multi_dim_by_hand_and_docstrings():
    import doctest

    from tfemb.layers import autoemb_controller, autoemb_embedding, multi_dim_embedding

    # Three blocks, ids permuted over them: id -> row remap[id] -> (block, local row).
    tables = [np.arange(4, dtype=np.float32).reshape(2, 2), np.arange(3, dtype=np.float32).reshape(1, 3) + 1,
              np.full((2, 1), 0.5, np.float32)]
    kernels = [np.eye(2, 3, dtype=np.float32), np.ones((3, 3), np.float32) / 3,
               np.array([[1.0, -1.0, 2.0]], np.float32)]
    biases = [np.zeros(3, np.float32), np.full(3, 0.1, np.float32), np.zeros(3, np.float32)]
    remap = np.array([3, 0, 4, 2, 1])
    layer = MultiDimEmbedding.from_arrays(tables, kernels, biases, remap=remap, activation="linear")
    flat = [tables[0][0], tables[0][1], tables[1][0], tables[2][0], tables[2][1]]  # rows 0..4 of the blocks
    blocks = [0, 0, 1, 2, 2]
    expected = np.stack([flat[r] @ kernels[blocks[r]] + biases[blocks[r]] for r in remap])
    close(layer(tf.constant(np.arange(5))).numpy(), expected)
    np.testing.assert_array_equal(layer.dims_per_id(), [1, 2, 1, 3, 2])
    for module in (autoemb_controller, autoemb_embedding, multi_dim_embedding):
        result = doctest.testmod(module, extraglobs={"np": np, "tf": tf}, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, (module.__name__, result)


# ------------------------------------------------------------------------------------------- factory
def test_scheme_factory_builds_autoemb_layers():
    schema = cf_data()[0]
    model = cf_model()
    for name in ("user_id", "item_id"):
        layer = model.embedding_layers[name]
        assert isinstance(layer, AutoEmbEmbedding) and layer.name == f"{name}_embedding"
        assert layer.candidate_dims == DIMS and layer.output_dim == OUT and layer.frequencies is None
        assert layer.vocabulary_size == schema.vocabulary_size(name)
    model = cf_model(popularity="frequencies")
    for name in ("user_id", "item_id"):
        layer = model.embedding_layers[name]
        freq = np.asarray(schema.frequencies(name))
        np.testing.assert_array_equal(layer.frequencies, freq)
        np.testing.assert_array_equal(np_value(layer.counts), np.rint(freq).astype(np.int64))
        assert np_value(layer.counts).sum() == 120  # the schema's training counts, every row once
    assert isinstance(scheme_factory("autoemb", output_dim=OUT, candidate_dims=DIMS)("f", V, None), AutoEmbEmbedding)


# ------------------------------------------------------------------------------------------- the search
def assign_model_state(model, seed=0):
    """Distinct counts, weights and losses per id, so the controllers' gradients are not degenerate."""
    for k, layer in enumerate(autoemb_layers(model).values()):
        r = rng(seed + k)
        v = layer.vocabulary_size
        layer.counts.assign(r.integers(0, 14, v).astype(np.int64))
        layer.previous_weights.assign(r.dirichlet(np.ones(N), v).astype(np.float32))
        layer.previous_loss.assign(r.uniform(0.1, 2.0, v).astype(np.float32))


def snapshot(variables):
    return [np_value(v).copy() for v in variables]


def dense(grad, variable):
    if grad is None:
        return np.zeros(variable.shape, np.float32)
    return tf.convert_to_tensor(grad).numpy()


def reference_gradients(model, x, y, variables, with_predictions=False):
    """Gradients of the compiled (mean binary cross-entropy) loss of one training-mode pass, state frozen."""
    with frozen_stream_state(model):
        with tf.GradientTape() as tape:
            p = model(x, training=True)
            loss = keras.losses.BinaryCrossentropy()(tf.reshape(y, [-1, 1]), tf.reshape(p, [-1, 1]))
        grads = [dense(g, v) for g, v in zip(tape.gradient(loss, variables), variables)]
    return (grads, np.asarray(p, np.float64)) if with_predictions else grads


def one_batch(x, y):
    return tf.data.Dataset.from_tensors((x, y))


def feeds_batch_norm(variable):
    """An AutoEmb candidate's transform bias: it feeds the candidates' batch normalisation, which subtracts the
    batch mean in training, so its gradient is zero; computed, it is float rounding (~1e-6), whose value depends
    on the reduction order (the machine's SIMD width), in the reference and in the step alike."""
    return "transform_bias" in variable.name


def has_gradients(grads, variables):
    """Every variable has a non-zero gradient (none silently None / zero), except the transform biases, whose
    gradient is zero up to rounding (``feeds_batch_norm``)."""
    for g, v in zip(grads, variables):
        if feeds_batch_norm(v):
            assert np.abs(g).max() < 1e-5, (v.name, np.abs(g).max())
        else:
            assert np.abs(g).max() > 0, v.name
    return True


def assert_moved(before, after, expected=None, atol=1e-6, variables=None):
    """Each variable unchanged (``expected=None``) or at its expected value. With ``variables`` given, the
    transform biases (``feeds_batch_norm``: a step of rounding noise) are checked to ``1e-5``."""
    for i, (b, a) in enumerate(zip(before, after)):
        if expected is None:
            np.testing.assert_array_equal(a, b, err_msg=f"variable {i} moved")
        else:
            tol = 1e-5 if variables is not None and feeds_batch_norm(variables[i]) else atol
            np.testing.assert_allclose(a, expected[i], rtol=1e-5, atol=tol, err_msg=f"variable {i}")


def test_bilevel_step_theta_on_validation_then_w_on_training():
    xt, yt = rows(0, 30)
    xv, yv = rows(60, 90)
    lr_theta, lr_w = 0.5, 0.3
    model = cf_model()
    assign_model_state(model)
    theta, w = architecture_variables(model), model_variables(model)
    assert theta and w and not {id(v) for v in theta} & {id(v) for v in w}
    assert {id(v) for v in theta} | {id(v) for v in w} == {id(v) for v in model.trainable_variables}
    theta0, w0 = snapshot(theta), snapshot(w)
    # θ-step: the validation batch's gradient w.r.t. θ at the start (W held, stream state frozen).
    g_theta = reference_gradients(model, xv, yv, theta)
    g_theta_train = reference_gradients(model, xt, yt, theta)
    theta1 = [t - lr_theta * g for t, g in zip(theta0, g_theta)]
    # W-step, after the θ-step: the training batch's gradient w.r.t. W at (θ1, W0).
    for variable, value in zip(theta, theta1):
        variable.assign(value)
    g_w = reference_gradients(model, xt, yt, w)
    g_w_val = reference_gradients(model, xv, yv, w)
    for variable, value in zip(theta, theta0):
        variable.assign(value)
    # Every variable has a gradient (none silently None / zero), so "expected" below is never "unchanged".
    assert has_gradients(g_theta + g_w, theta + w)
    search = AutoEmbSearch(model, validation_stream=one_batch(xv, yv).repeat())
    search.compile(optimizer=keras.optimizers.SGD(lr_w), controller_optimizer=keras.optimizers.SGD(lr_theta))
    history = search.fit(one_batch(xt, yt), epochs=1, verbose=0)
    after_theta, after_w = snapshot(theta), snapshot(w)
    assert_moved(theta0, after_theta, theta1)
    assert_moved(w0, after_w, [v - lr_w * g for v, g in zip(w0, g_w)], variables=w)
    # The other batch would have given other updates: the test tells the two apart.
    assert max(np.abs(a - (t - lr_theta * g)).max() for a, t, g in zip(after_theta, theta0, g_theta_train)) > 1e-3
    assert max(np.abs(a - (v - lr_w * g)).max() for a, v, g in zip(after_w, w0, g_w_val)) > 1e-3
    assert {"loss", "auc", "logloss", "accuracy", "mse"} <= set(history.history)
    # Only the W-step counted its batch.
    for name, layer in autoemb_layers(model).items():
        r = rng(list(autoemb_layers(model)).index(name))
        start = r.integers(0, 14, layer.vocabulary_size)
        np.testing.assert_array_equal(np_value(layer.counts), start + bincount(xt[name], layer.vocabulary_size))


def test_theta_tables_are_updated_row_sparsely():
    """``sparse_theta_updates`` (default): the controllers' popularity kernels take lazy Adam on the batch's summed
    row gradients, so a row (a popularity bucket) moves only in a θ-step whose batch uses it. Two θ-steps on
    batches with different buckets: the first moves exactly the used rows by Adam's first step (NumPy); the second
    leaves the rows only the first batch used where they were. With ``sparse_theta_updates=False`` (Keras' dense
    Adam) those rows move again, by their momentum."""
    batches = [rows(0, 6), rows(60, 66)]
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-7
    runs = {}
    for sparse in (True, False):
        model = cf_model()
        if sparse:
            start = snapshot(model.weights)
        else:  # the same starting point
            for variable, value in zip(model.weights, start):
                variable.assign(value)
        assign_model_state(model)
        search = AutoEmbSearch(model, sparse_theta_updates=sparse)
        search.compile(optimizer=keras.optimizers.SGD(0.1), controller_optimizer=keras.optimizers.Adam(lr))
        search._build_optimizers()
        tables = architecture_tables(model)
        assert [t.shape for t in tables] == [(MAX_POP + 1, UNITS)] * 2  # the two controllers' popularity kernels
        assert (search._theta_sparse_optimizer is not None) == sparse
        states, grads = [snapshot(tables)], []
        for xv, yv in batches:
            grads.append(reference_gradients(model, xv, yv, tables))
            search._theta_step({k: tf.constant(v) for k, v in xv.items()}, tf.constant(yv))
            states.append(snapshot(tables))
        runs[sparse] = (states, grads)
    (k0, k1, k2), (g1, g2) = runs[True]
    d1, d2 = runs[False][0][1:]
    for i in range(2):
        used = [set(np.flatnonzero(np.abs(g[i]).max(axis=1) > 0).tolist()) for g in (g1, g2)]
        only_first, untouched = sorted(used[0] - used[1]), sorted(set(range(MAX_POP + 1)) - used[0] - used[1])
        assert only_first and untouched
        first = np.sqrt(1 - b2) / (1 - b1) * (1 - b1) * g1[i] / (np.sqrt((1 - b2) * g1[i] ** 2) + eps)
        np.testing.assert_allclose(k1[i], k0[i] - lr * first, rtol=1e-5, atol=1e-7)  # zero rows stay
        np.testing.assert_array_equal(k2[i][only_first], k1[i][only_first])  # lazy: no gradient, no move
        assert np.abs(d2[i][only_first] - d1[i][only_first]).min() > 0  # dense: moved by the momentum
        np.testing.assert_array_equal(k2[i][untouched], k0[i][untouched])
    with pytest.raises(TypeError, match="sparse_theta_updates must be a bool. Received: 'yes'"):
        AutoEmbSearch(cf_model(), sparse_theta_updates="yes")
    # Not a plain Adam: every θ variable through the θ optimizer.
    search = AutoEmbSearch(cf_model())
    search.compile(optimizer="sgd", controller_optimizer=keras.optimizers.Adam(0.01, amsgrad=True))
    assert search._theta_sparse_optimizer is None


def test_joint_step_moves_w_and_theta_on_the_training_batch():
    xt, yt = rows(30, 60)
    lr = 0.4
    # The candidate tables go to the row-sparse embedding optimizer (plain SGD: the same update as dense SGD).
    model = cf_model(selection="darts", model_kwargs={"embedding_optimizer": "sgd", "embedding_learning_rate": lr})
    assign_model_state(model)
    theta, w = architecture_variables(model), model_variables(model)
    assert [tuple(v.shape) for v in theta] == [(18, N), (14, N)]  # the DARTS logits of users and items
    assert len(model.sparse_variables()) == 2 * N
    variables = theta + w
    before = snapshot(variables)
    losses_before = {k: np_value(l.previous_loss) for k, l in autoemb_layers(model).items()}
    grads, p = reference_gradients(model, xt, yt, variables, with_predictions=True)
    assert has_gradients(grads, variables)
    search = AutoEmbSearch(model, mode="joint")  # SAM: no validation stream is read
    assert not search.uses_validation
    search.compile(optimizer=keras.optimizers.SGD(lr))
    search.fit(one_batch(xt, yt), epochs=1, verbose=0)
    assert_moved(before, snapshot(variables), [v - lr * g for v, g in zip(before, grads)], variables=variables)
    # The W-step wrote the per-example losses of its forward pass: each id gets the loss of its last row.
    q = np.clip(p, 1e-7, 1 - 1e-7)
    per_example = -(yt * np.log(q) + (1 - yt) * np.log(1 - q))
    for name, layer in autoemb_layers(model).items():
        expected = losses_before[name].astype(np.float64)
        for i, ident in enumerate(xt[name]):
            expected[ident] = per_example[i]
        assert len(np.unique(xt[name])) < len(xt[name])  # repeated ids: the last occurrence is what counts
        close(np_value(layer.previous_loss), expected, atol=1e-5)


def test_per_example_loss_matches_numpy_for_every_task():
    y = np.array([1.0, 0.0, 1.0, 0.0])
    p = np.array([0.9, 0.2, 0.35, 0.6])
    expected = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    for loss in (keras.losses.BinaryCrossentropy(), "binary_crossentropy"):
        close(per_example_loss(loss, tf.constant(y), tf.constant(p, tf.float32)).numpy(), expected)
    labels = np.array([2, 0, 4, 1])  # the papers' 5-class rating task
    probs = softmax(rng(5).normal(size=(4, 5)))
    close(per_example_loss(keras.losses.SparseCategoricalCrossentropy(), tf.constant(labels),
                           tf.constant(probs, tf.float32)).numpy(), -np.log(probs[np.arange(4), labels]))
    ratings = np.array([3.0, 4.0, 1.0, 5.0])
    scores = np.array([2.5, 4.5, 2.0, 3.0])
    for loss in (keras.losses.MeanSquaredError(), "mse", keras.losses.get("mean_squared_error")):
        close(per_example_loss(loss, tf.constant(ratings), tf.constant(scores, tf.float32)).numpy(),
              (scores - ratings) ** 2)
    with pytest.raises(ValueError, match=r"one Keras loss"):
        per_example_loss(["mse"], tf.constant(ratings), tf.constant(scores))


def test_a_finite_validation_stream_that_runs_out_stops_fit():
    model = cf_model(selection="darts")
    xt, yt = rows(0, 30)
    search = AutoEmbSearch(model, validation_stream=one_batch(*rows(60, 90)))  # one batch, not repeated
    search.compile(optimizer="sgd")
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"validation stream ran out of batches"):
        search.fit(one_batch(xt, yt).repeat(3), epochs=1, verbose=0)


def test_previous_batch_stream_order():
    data = tf.data.Dataset.range(4).map(lambda i: ({"ids": tf.fill([2], i)}, tf.cast(i, tf.float32) * 10.0))

    def read(stream, n):
        return [(int(x["ids"][0]), float(y), bool(flag)) for x, y, flag in stream.take(n)]

    assert read(previous_batch_stream(data, repeat=False), 10) == [
        (0, 0.0, False), (0, 0.0, True), (1, 10.0, True), (2, 20.0, True), (3, 30.0, True)]
    # Repeated in step with the epochs of the training data: element t of every epoch is batch t - 1.
    assert read(previous_batch_stream(data), 9) == [
        (0, 0.0, False), (0, 0.0, True), (1, 10.0, True), (2, 20.0, True)] * 2 + [(0, 0.0, False)]
    unknown = data.filter(lambda x, y: y >= 0)  # cardinality unknown: counted once
    assert read(previous_batch_stream(unknown), 5) == read(previous_batch_stream(data), 5)
    weighted = data.map(lambda x, y: (x, y, tf.ones([2])))
    assert read(previous_batch_stream(weighted), 3) == read(previous_batch_stream(data), 3)
    with pytest.raises(ValueError, match=r"training dataset is empty"):
        previous_batch_stream(data.take(0))
    with pytest.raises(TypeError, match=r"needs a tf.data.Dataset.*Received: dict"):
        previous_batch_stream({"ids": np.arange(3)})


def test_fit_skips_the_theta_step_of_the_first_batch():
    # "previous_batch" on one batch: there is no batch before it, so θ stays (every epoch); W trains.
    model = cf_model(selection="darts")
    theta, w = architecture_variables(model), model_variables(model)
    theta0, w0 = snapshot(theta), snapshot(w)
    search = AutoEmbSearch(model)
    assert search.validation_stream == PREVIOUS_BATCH and search.uses_validation
    search.compile(optimizer=keras.optimizers.Adam(0.01), controller_optimizer=keras.optimizers.Adam(0.01))
    search.fit(one_batch(*rows(0, 40)), epochs=2, verbose=0)
    assert_moved(theta0, snapshot(theta))
    assert max(np.abs(a - b).max() for a, b in zip(snapshot(w), w0)) > 1e-4
    with pytest.raises(TypeError, match=r"needs a tf.data.Dataset"):
        search.fit(*rows(0, 40), epochs=1, verbose=0)


def test_fit_experiment_with_previous_batch_on_a_dataset():
    from tfemb.data.pipeline import make_dataset

    _, _, x, y = cf_data()
    train = make_dataset(x, y, batch_size=40)  # three time-ordered batches
    val = make_dataset({k: v[:30] for k, v in x.items()}, y[:30], batch_size=30)
    cfg = {"autoemb": {"mode": "bilevel", "validation": "previous_batch", "controller_learning_rate": 0.01},
           "train": {"optimizer": "adam", "learning_rate": 0.01, "epochs": 2}}
    model = cf_model()
    theta0 = snapshot(architecture_variables(model))
    history = fit_experiment(model, cfg, train, val)  # val: Keras' end-of-epoch evaluation only
    assert len(history.history["loss"]) == 2 and np.isfinite(history.history["loss"]).all()
    assert len(history.history["val_loss"]) == 2 and "val_auc" in history.history
    # θ moved (θ-steps on batches 0 and 1 of each epoch); only the W-steps counted interactions.
    assert all(np.abs(a - b).max() > 0 for a, b in zip(snapshot(architecture_variables(model)), theta0) if a.ndim == 2)
    for name, layer in autoemb_layers(model).items():
        np.testing.assert_array_equal(np_value(layer.counts), 2 * bincount(x[name], layer.vocabulary_size))
    with pytest.raises(ValueError, match=r"needs a validation split"):
        fit_experiment(model, {**cfg, "autoemb": {"validation": "val"}}, train)
    with pytest.raises(ValueError, match=r"Received: 'test'"):
        fit_experiment(model, {**cfg, "autoemb": {"validation": "test"}}, train)
    with pytest.raises(ValueError, match=r"Received: mode='both'"):
        fit_experiment(model, {**cfg, "autoemb": {"mode": "both"}}, train)


def test_search_of_a_model_without_autoemb_layers_is_the_plain_w_step():
    model = cf_model(embedding=scheme_factory("fixed", output_dim=OUT))
    assert not autoemb_layers(model) and not architecture_variables(model)
    xt, yt = rows(0, 30)
    w = model_variables(model)
    assert len(w) == len(model.trainable_variables)
    w0 = snapshot(w)
    grads = reference_gradients(model, xt, yt, w)
    assert all(np.abs(g).max() > 0 for g in grads)
    search = AutoEmbSearch(model)  # "previous_batch", but there is no θ: no validation stream is opened
    assert not search.uses_validation
    search.compile(optimizer=keras.optimizers.SGD(0.3))
    search.fit(xt, yt, batch_size=30, epochs=1, verbose=0)  # arrays are fine without a stream
    assert_moved(w0, snapshot(w), [v - 0.3 * g for v, g in zip(w0, grads)])


def test_search_arguments_are_checked():
    with pytest.raises(TypeError, match=r"model must be a tfemb RecModel. Received: Sequential"):
        AutoEmbSearch(keras.Sequential([keras.layers.Dense(1)]))
    model = cf_model()
    with pytest.raises(ValueError, match=r"Received: mode='alternate'"):
        AutoEmbSearch(model, mode="alternate")
    with pytest.raises(TypeError, match=r"Received: list"):
        AutoEmbSearch(model, validation_stream=[1, 2])
    xt, yt = rows(0, 30)
    unbatched = AutoEmbSearch(model, validation_stream=tf.data.Dataset.from_tensor_slices((xt, yt)))
    unbatched.compile(optimizer="sgd")
    with pytest.raises(ValueError, match=r"validation_stream must give batches \(x, y\).*call \.batch"):
        unbatched.fit(one_batch(xt, yt), verbose=0)
    with pytest.raises(NotImplementedError, match=r"save the searched model instead, search.rec_model.save"):
        AutoEmbSearch(model).save("search.keras")
    with pytest.raises(RuntimeError, match=r"compile\(\) the AutoEmbSearch"):
        AutoEmbSearch(model).fit(one_batch(*rows(0, 30)), verbose=0)
    with pytest.raises(ValueError, match=r"Received: selection='both'"):
        set_inference_selection(model, "both")


# ------------------------------------------------------------------------------------------- streaming
def bce(y, p):
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


@pytest.fixture(scope="module")
def streamed():
    """A CFNetwork trained by ``stream_fit`` (three batches of 40), with what it predicted before any update."""
    from tfemb.tasks import compile_model

    _, _, x, y = cf_data()
    model = compile_model(cf_model(), learning_rate=0.05)
    assign_model_state(model)
    with frozen_stream_state(model):  # the W-step's forward pass, before any update
        first = np.asarray(model(rows(0, 40)[0], training=True))
        second = np.asarray(model(rows(40, 80)[0], training=True))
    counts = {k: np_value(l.counts) for k, l in autoemb_layers(model).items()}
    theta = snapshot(architecture_variables(model))
    result = stream_fit(model, x, y, batch_size=40, evaluate_from=0.5, keep_predictions=True)
    return {"model": model, "result": result, "first": first, "second": second, "counts": counts, "theta": theta}


def test_stream_fit_is_test_then_train(streamed):
    _, _, x, y = cf_data()
    model, result, first, second = streamed["model"], streamed["result"], streamed["first"], streamed["second"]
    batches = result["batches"]
    assert [(b["start"], b["size"]) for b in batches] == [(0, 40), (40, 40), (80, 40)]
    assert set(batches[0]) == {"start", "size", "loss", "accuracy", "mse", "logloss"}
    y0, y1 = y[:40], y[40:80]
    assert batches[0]["loss"] == pytest.approx(bce(y0, first), abs=1e-5)
    assert batches[0]["logloss"] == pytest.approx(bce(y0, first), abs=1e-5)
    assert batches[0]["mse"] == pytest.approx(float(np.mean((first - y0) ** 2)), abs=1e-6)
    assert batches[0]["accuracy"] == pytest.approx(float(np.mean((first > 0.5) == (y0 > 0.5))))
    assert abs(batches[1]["loss"] - bce(y1, second)) > 1e-4  # batch 1 is predicted after training on batch 0
    # Summaries: example-weighted means; the test period starts at row 60, i.e. with the batch at row 80.
    assert result["all"]["rows"] == 120 and result["test"]["rows"] == 40 and result["evaluate_from"] == 60
    assert result["all"]["loss"] == pytest.approx(np.mean([b["loss"] for b in batches]))
    assert result["test"]["loss"] == pytest.approx(batches[2]["loss"])
    assert result["seconds"] > 0 and result["examples_per_second"] > 0  # one batch after the two warm-up ones
    # One pass: every row counted once; the two θ-steps (on batches 0 and 1) moved the controllers.
    for name, layer in autoemb_layers(model).items():
        np.testing.assert_array_equal(np_value(layer.counts) - streamed["counts"][name],
                                      bincount(x[name], layer.vocabulary_size))
    assert any(np.abs(a - b).max() > 0 for a, b in zip(snapshot(architecture_variables(model)), streamed["theta"]))
    # keep_predictions: every row's test prediction and loss, in stream order, consistent with the batch records.
    assert result["predictions"].shape == (120,) and result["row_losses"].shape == (120,)
    np.testing.assert_allclose(result["predictions"][:40], first, atol=1e-6)
    for b in batches:
        rows = slice(b["start"], b["start"] + b["size"])
        assert float(np.mean(result["row_losses"][rows])) == pytest.approx(b["loss"], abs=1e-6)


def test_stream_fit_without_validation_leaves_theta_and_checks_arguments():
    from tfemb.tasks import compile_model

    _, _, x, y = cf_data()
    model = compile_model(cf_model(selection="darts"), learning_rate=0.05)
    theta0 = snapshot(architecture_variables(model))
    with pytest.warns(UserWarning, match=r"test period is empty: no batch starts at or after row 61"):
        result = stream_fit(model, x, y, batch_size=60, validation=None, evaluate_from=61)
    assert [b["size"] for b in result["batches"]] == [60, 60] and result["test"]["rows"] == 0  # no batch starts >= 61
    # An empty period has no metrics (NaN), not a perfect 0.0 MSE / loss.
    assert all(np.isnan(v) for k, v in result["test"].items() if k != "rows"), result["test"]
    assert result["all"]["rows"] == 120
    assert_moved(theta0, snapshot(architecture_variables(model)))
    for bad in (1.0, -0.5, 120, -1):
        with pytest.raises(ValueError, match=r"Received: evaluate_from=" + str(bad).replace(".", r"\.")):
            stream_fit(model, x, y, batch_size=50, evaluate_from=bad)
    with pytest.raises(ValueError, match=r"Received: validation='val'"):
        stream_fit(model, x, y, validation="val")
    with pytest.raises(RuntimeError, match=r"needs a compiled model"):
        stream_fit(cf_model(), x, y)
    with pytest.raises(RuntimeError, match=r"compile\(\) the AutoEmbSearch before stream_fit"):
        stream_fit(AutoEmbSearch(cf_model()), x, y)


def test_stream_batch_runs_the_theta_step_only_with_a_previous_batch():
    """``stream_batch`` (what ``stream_fit`` and the streaming benchmark's interleaved timing call): batch 0 has no
    previous batch and trains W alone (θ unchanged); a later batch first takes the θ-step on the previous one."""
    _, _, x, y = cf_data()
    search = AutoEmbSearch(cf_model())
    search.compile(optimizer=keras.optimizers.Adam(0.05), controller_optimizer=keras.optimizers.Adam(0.05))
    first = {k: tf.constant(v) for k, v in rows(0, 40)[0].items()}, tf.constant(rows(0, 40)[1])
    second = {k: tf.constant(v) for k, v in rows(40, 80)[0].items()}, tf.constant(rows(40, 80)[1])
    theta = architecture_variables(search.rec_model)
    before = snapshot(theta)
    y_pred, losses = search.stream_batch(0, *first)
    assert y_pred.shape[0] == 40 and losses.shape == (40,)
    assert_moved(before, snapshot(theta))  # no θ-step without a previous batch
    search.stream_batch(1, *second, previous=first)
    assert any(not np.array_equal(b, a) for b, a in zip(before, snapshot(theta)))


def test_stream_step_is_traced_once_for_a_partial_last_batch():
    """120 rows in batches of 50: the last batch has 20 rows. The step (θ-step + W-step) is traced once, with the
    batch dimension open, not again for the short batch (a second trace of a bilevel step costs seconds)."""
    _, _, x, y = cf_data()
    search = AutoEmbSearch(cf_model())
    search.compile(optimizer=keras.optimizers.Adam(0.05), controller_optimizer=keras.optimizers.Adam(0.01))
    result = stream_fit(search, x, y, batch_size=50)
    assert [b["size"] for b in result["batches"]] == [50, 50, 20]
    assert search._stream_functions[True].experimental_get_tracing_count() == 1  # θ + W, batches 1 and 2
    assert search._stream_functions[False].experimental_get_tracing_count() == 1  # W alone, batch 0


# ------------------------------------------------------------------------------------------- hard vs soft
def test_hard_soft_difference_restores_each_layers_selection():
    _, _, x, y = cf_data()
    model = cf_model()
    assign_model_state(model)
    model.embedding_layers["user_id"].inference_selection = "soft"
    inputs = {k: tf.constant(v) for k, v in x.items()}
    outputs = {}
    for selection in ("hard", "soft"):
        for layer in autoemb_layers(model).values():
            layer.inference_selection = selection
        outputs[selection] = np.asarray(model(inputs, training=False), np.float64)
    model.embedding_layers["user_id"].inference_selection = "soft"
    model.embedding_layers["item_id"].inference_selection = "hard"
    result = hard_soft_difference(model, x, y, batch_size=50)
    diff = np.abs(outputs["hard"] - outputs["soft"])
    assert result["max_abs"] == pytest.approx(diff.max(), abs=1e-6) and result["max_abs"] > 0
    assert result["mean_abs"] == pytest.approx(diff.mean(), abs=1e-6)
    assert result["agreement"] == pytest.approx(np.mean((outputs["hard"] > 0.5) == (outputs["soft"] > 0.5)))
    assert result["hard"]["logloss"] == pytest.approx(bce(y, outputs["hard"]), abs=1e-5)
    assert model.embedding_layers["user_id"].inference_selection == "soft"
    assert model.embedding_layers["item_id"].inference_selection == "hard"
    set_inference_selection(model, "hard")
    assert {layer.inference_selection for layer in autoemb_layers(model).values()} == {"hard"}


# ------------------------------------------------------------------------------------------- export
def test_export_matches_hard_inference_and_is_smaller_than_soft(streamed, tmp_path):
    from tfemb.export import export_saved_model, load_export

    _, df, x, _ = cf_data()
    model = streamed["model"]
    layers = autoemb_layers(model)
    path = export_saved_model(model, str(tmp_path / "autoemb"))
    loaded = load_export(path)
    inputs = {k: tf.constant(v) for k, v in x.items()}
    expected = np.asarray(model(inputs, training=False))
    np.testing.assert_allclose(loaded.predict_encoded(x)["probability"], expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(loaded.predict(df.iloc[:17])["probability"], expected[:17], rtol=0, atol=1e-5)
    features = {f["feature"]: f for f in loaded.report["features"]}
    for name, layer in layers.items():
        assert features[name]["parameters"] == layer.parameter_count()
        assert features[name]["bytes"] == layer.storage_bytes()
        assert layer.parameter_count() < layer.parameter_count("soft") < layer.search_parameter_count()
        assert features[name]["mean_dim"] == pytest.approx(layer.dims_per_id().mean())


def test_keras_save_keeps_state_and_selection(streamed, tmp_path):
    _, _, x, _ = cf_data()
    model = streamed["model"]
    path = str(tmp_path / "model.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    inputs = {k: tf.constant(v) for k, v in x.items()}
    np.testing.assert_allclose(np.asarray(reloaded(inputs, training=False)), np.asarray(model(inputs, training=False)),
                               atol=1e-6)
    for name, layer in autoemb_layers(model).items():
        again = reloaded.embedding_layers[name]
        assert isinstance(again, AutoEmbEmbedding)
        np.testing.assert_array_equal(np_value(again.counts), np_value(layer.counts))
        np.testing.assert_array_equal(np_value(again.previous_loss), np_value(layer.previous_loss))
        np.testing.assert_array_equal(again.selected_candidates(), layer.selected_candidates())


MULTI_REPLICA_SCRIPT = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from tfemb._keras import keras
from tfemb.autoemb import AutoEmbSearch
from tfemb.data import make_dataset
from tfemb.data.synthetic import make_synthetic_cf, synthetic_cf_schema
from tfemb.layers import scheme_factory
from tfemb.models import CFNetwork
df, _ = make_synthetic_cf(num_users=20, num_items=15, num_rows=400, seed=0)
schema = synthetic_cf_schema(df).fit(df)
x, y = schema.transform(df)
ds = make_dataset({k: x[k] for k in ("user_id", "item_id")}, y, batch_size=100, drop_remainder=True)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
for mode in ("bilevel", "joint"):
    with strategy.scope():
        model = CFNetwork(schema, embeddings=scheme_factory("autoemb", output_dim=4, candidate_dims=(2, 4),
                                                            controller_units=8), embedding_dim=4)
        search = AutoEmbSearch(model, mode=mode)
        search.compile(optimizer=keras.optimizers.Adam(1e-3))
    try:
        search.fit(ds, epochs=1, verbose=0)
    except NotImplementedError as error:
        assert "multi-replica" in str(error) and "received 2 replicas" in str(error), error
        print("refused", mode)
    else:
        raise AssertionError("fit under 2 replicas must be refused: the per-id state would count half the batch")
"""


def test_multi_replica_training_is_refused_with_a_clear_error():
    """Under MirroredStrategy each replica would write only its share of the batch into the per-id state (counts
    came out at half the rows when this was tried), so fit refuses, naming the replica count (subprocess: one
    MirroredStrategy per process)."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", MULTI_REPLICA_SCRIPT], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused bilevel" in proc.stdout and "refused joint" in proc.stdout
