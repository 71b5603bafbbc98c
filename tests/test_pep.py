"""PEP: the soft-threshold layer against NumPy, its gradients, snapshots, lottery-ticket retrain, packed tables.

Sizes are tiny and all different (vocabulary 23, dim 7, fields of 5 / 7 / 11 ids, g scale 0.7) so a swapped
axis or a broadcast over the wrong dimension shows. Values are assigned, never drawn from a framework's random
stream, except where a test only checks structure (zeros stay zeros). Runs under Keras 3 and, with
TF_USE_LEGACY_KERAS=1, Keras 2. Nothing creates a tensor at import time (tests/conftest.py splits the CPU first).
"""

import os
import re

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tfemb._keras import keras
from tfemb.data.schema import CategoricalFeature, Label, Schema
from tfemb.layers import SCHEMES, EmbeddingScheme, PackedEmbedding, PEPEmbedding, pep_preset, scheme_factory
from tfemb.layers.packed_embedding import choose_layout, csr_from_dense, packed_storage_bytes
from tfemb.layers.pep_embedding import OFFICIAL_PRESETS, THRESHOLD_TYPES, threshold_sigmoid
from tfemb.models import DeepFM
from tfemb.pep import (
    PEPSnapshot, PEPSnapshots, control_masks, control_snapshot, pep_layers, retrain, sparsity_report,
)
from tfemb.tasks import compile_model
from tfemb.testing import run_scheme_test

V, D = 23, 7
G = 0.7  # g_scale
OFFSETS = [0, 5, 12]  # fields of 5, 7 and 11 ids
IDS = np.array([0, 22, 5, 1, 17, 3, 9, 11, 2, 20, 4, 13, 7, 21, 6, 16, 8, 19, 10, 15, 12, 18, 14])
REPEATED = np.concatenate([IDS, [5, 5, 22, 0, 13]])  # repeated ids: gradients accumulate
MULTI = np.array([[0, 5, -1, -1], [22, 7, 13, 1], [3, -1, -1, -1], [-1, -1, -1, -1], [4, 4, 19, 2]])


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def table_values(seed=0, low=-0.6, high=0.6):
    return np.random.default_rng(seed).uniform(low, high, size=(V, D)).astype(np.float32)


def field_of_rows(offsets):
    return np.zeros(V, np.int64) if offsets is None else np.searchsorted(offsets, np.arange(V), side="right") - 1


def full_thresholds(kind, s, offsets=None):
    """NumPy ``g_scale * sigmoid(s)`` broadcast to the table, ``[V, D]``."""
    g = G * sigmoid(s)
    if kind == "global":
        return np.full((V, D), g)
    if kind == "dimension":
        return np.broadcast_to(g[None, :], (V, D))
    if kind in ("feature", "feature_dim"):
        return np.broadcast_to(g, (V, D))
    return np.broadcast_to(g[field_of_rows(offsets)], (V, D))  # field [F, 1] / field_dim [F, D]


def reference_table(kind, v, s, offsets=None):
    t = full_thresholds(kind, s, offsets)
    return np.sign(v) * np.maximum(np.abs(v) - t, 0.0)


def pep_case(kind, offsets=None, seed=0, **kw):
    layer = PEPEmbedding(V, D, threshold_type=kind, g_scale=G, field_offsets=offsets, **kw)
    layer.build()
    v = table_values(seed)
    s = np.random.default_rng(seed + 100).uniform(-3.0, 0.0, size=layer.threshold_shape()).astype(np.float32)
    layer.embeddings.assign(v)
    layer.threshold.assign(s)
    return layer, v, s


KINDS = [("global", None), ("dimension", None), ("feature", None), ("feature_dim", None), ("field", None),
         ("field_dim", None), ("field", OFFSETS), ("field_dim", OFFSETS)]
KIND_IDS = [k if o is None else f"{k}-stacked" for k, o in KINDS]


# ------------------------------------------------------------------------------------------ soft threshold
def test_threshold_sigmoid_value_gradient_and_position_independence():
    s = np.array([-20.0, -15.0, -3.0, -0.5, 0.0, 0.4, 2.5], np.float32)
    x = tf.constant(s)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = threshold_sigmoid(x)
    np.testing.assert_allclose(y.numpy(), sigmoid(s), rtol=1e-5, atol=6e-8)
    p = sigmoid(s)
    np.testing.assert_allclose(tape.gradient(y, x).numpy(), p * (1 - p), rtol=1e-5)  # nonzero even at -20
    # The same value at any position of any tensor (tf.sigmoid rounds a tensor's tail differently).
    values = np.random.default_rng(1).normal(-2.0, 3.0, 1001).astype(np.float32)
    full = threshold_sigmoid(tf.constant(values)).numpy()
    for start in range(1, 20):
        np.testing.assert_array_equal(threshold_sigmoid(tf.constant(values[start:start + 37])).numpy(),
                                      full[start:start + 37])


@pytest.mark.parametrize("kind,offsets", KINDS, ids=KIND_IDS)
def test_soft_threshold_matches_numpy(kind, offsets):
    layer, v, s = pep_case(kind, offsets)
    expected = reference_table(kind, v, s, offsets)
    assert 0.1 < (expected != 0).mean() < 0.95  # some, not all, entries pruned
    np.testing.assert_allclose(layer(tf.constant(IDS)).numpy(), expected[IDS], rtol=1e-5, atol=1e-6)
    ids_2d = IDS[:20].reshape(4, 5)
    np.testing.assert_allclose(layer(tf.constant(ids_2d)).numpy(), expected[ids_2d], rtol=1e-5, atol=1e-6)
    # The whole table, the mask and the outputs agree bit for bit.
    table = layer.pruned_table().numpy()
    np.testing.assert_array_equal(layer(tf.constant(IDS)).numpy(), table[IDS])
    np.testing.assert_array_equal(layer.current_mask(), table != 0)
    assert layer.parameter_count() == int((table != 0).sum()) == layer.nonzero_count()
    np.testing.assert_array_equal(layer.dims_per_id(), (table != 0).sum(axis=1))
    assert layer.threshold_values().shape == layer.threshold_shape()


def test_threshold_shapes():
    shapes = {"global": (), "dimension": (D,), "feature": (V, 1), "feature_dim": (V, D), "field": (1, 1),
              "field_dim": (1, D)}
    assert set(shapes) == set(THRESHOLD_TYPES)
    for kind, shape in shapes.items():
        assert PEPEmbedding(V, D, threshold_type=kind).threshold_shape() == shape
    assert PEPEmbedding(V, D, threshold_type="field_dim", field_offsets=OFFSETS).threshold_shape() == (3, D)


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
def test_multi_hot_pooling(combiner):
    layer, v, s = pep_case("feature_dim")
    layer.combiner = combiner
    table = reference_table("feature_dim", v, s)
    mask = MULTI != -1
    total = (table[np.where(mask, MULTI, 0)] * mask[..., None]).sum(axis=1)
    count = mask.sum(axis=1, keepdims=True).astype(np.float64)
    norm = {"sum": np.ones_like(count), "mean": count, "sqrtn": np.sqrt(count)}[combiner]
    expected = np.divide(total, norm, out=np.zeros_like(total), where=norm > 0)
    np.testing.assert_allclose(layer(tf.constant(MULTI)).numpy(), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ gradients
def _reduce_threshold_grad(kind, per_entry, s, offsets):
    """Gradient w.r.t. ``s`` from the gradient w.r.t. each entry's threshold ``g_scale * sigmoid(s)``."""
    fields = field_of_rows(offsets)
    if kind == "global":
        total = per_entry.sum()
    elif kind == "dimension":
        total = per_entry.sum(axis=0)
    elif kind == "feature":
        total = per_entry.sum(axis=1, keepdims=True)
    elif kind == "feature_dim":
        total = per_entry
    else:
        total = np.zeros((len(offsets or [0]), D))
        np.add.at(total, fields, per_entry)
        if kind == "field":
            total = total.sum(axis=1, keepdims=True)
    p = sigmoid(s)
    return total * G * p * (1 - p)


@pytest.mark.parametrize("kind,offsets", KINDS, ids=KIND_IDS)
def test_gradients_reach_table_and_thresholds(kind, offsets):
    layer, v, s = pep_case(kind, offsets, seed=2)
    weights = np.random.default_rng(3).normal(size=(REPEATED.shape[0], D)).astype(np.float32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(tf.constant(REPEATED)) * weights)
    if kind in ("feature", "feature_dim"):  # id-indexed thresholds: V and s in one variable, one gradient
        assert layer.fused and layer.trainable_weights == [layer.fused_table]
        grad = tape.gradient(loss, layer.fused_table)
        assert isinstance(grad, tf.IndexedSlices)  # row-sparse, both halves
        dense = tf.convert_to_tensor(grad).numpy()
        grad_v, grad_s = dense[:, :D], dense[:, D:]
    else:
        assert not layer.fused
        grad_v, grad_s = tape.gradient(loss, [layer.embeddings, layer.threshold])
        assert isinstance(grad_v, tf.IndexedSlices)  # row-sparse table gradient

    active = np.abs(v) > full_thresholds(kind, s, offsets)
    expected_v = np.zeros((V, D))
    np.add.at(expected_v, REPEATED, weights * active[REPEATED])  # d/dV = 1 where kept, 0 where pruned
    per_entry = np.zeros((V, D))
    np.add.at(per_entry, REPEATED, -weights * np.sign(v[REPEATED]) * active[REPEATED])  # d/d(threshold)
    expected_s = _reduce_threshold_grad(kind, per_entry, s, offsets)
    np.testing.assert_allclose(tf.convert_to_tensor(grad_v).numpy(), expected_v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tf.convert_to_tensor(grad_s).numpy(), expected_s, rtol=1e-4, atol=1e-7)
    assert np.abs(expected_s).max() > 0


@pytest.mark.parametrize("kind", ["feature", "feature_dim"])
def test_fused_layout_equals_two_variables(kind):
    """``fused=True`` (one ``[V | s]`` variable) and ``fused=False`` (two) are the same model: equal outputs,
    equal gradients, and five Adam steps with regularizers on both halves end at the same weights."""
    reg = {"embeddings_regularizer": keras.regularizers.L2(0.01), "threshold_regularizer": keras.regularizers.L2(0.1)}
    fused, _, _ = pep_case(kind, seed=5, **reg)
    split, v, s = pep_case(kind, seed=5, fused=False, **reg)
    assert fused.fused and not split.fused and len(split.trainable_weights) == 2
    ids = tf.constant(REPEATED)
    weights = tf.constant(np.random.default_rng(6).normal(size=(REPEATED.shape[0], D)).astype(np.float32))
    np.testing.assert_array_equal(fused(ids).numpy(), split(ids).numpy())
    np.testing.assert_array_equal(fused.pruned_table().numpy(), split.pruned_table().numpy())
    for layer in (fused, split):
        layer.opt = keras.optimizers.Adam(0.05)
    for _ in range(5):
        for layer in (fused, split):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(layer(ids) * weights) + tf.add_n(layer.losses)
            variables = layer.trainable_weights
            layer.opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
    np.testing.assert_allclose(fused.embeddings.numpy(), split.embeddings.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused.threshold.numpy(), split.threshold.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(fused.threshold.numpy(), s)  # the thresholds did move
    assert fused.nonzero_count() == split.nonzero_count()


class _Cubed(keras.regularizers.Regularizer):
    """Not a sum of |x| or x**2: the fused table takes its half by a split."""

    def __call__(self, x):
        return 0.3 * tf.reduce_sum(tf.convert_to_tensor(x) ** 3)


class _ScaledL2(keras.regularizers.L2):
    """An L2 subclass with its own ``__call__``: it must not be taken for a plain L2."""

    def __call__(self, x):
        return 2.0 * super().__call__(x)


def _numpy_penalty(spec, x):
    """``(value, gradient)`` of a regularizer spec on ``x`` in float64."""
    kind, c = spec
    if kind is None:
        return 0.0, np.zeros_like(x)
    if kind == "l1":
        return c * np.abs(x).sum(), c * np.sign(x)
    if kind == "l2":
        return c * (x ** 2).sum(), 2 * c * x
    if kind == "l1l2":
        return c * np.abs(x).sum() + 2 * c * (x ** 2).sum(), c * np.sign(x) + 4 * c * x
    if kind == "scaled_l2":
        return 2 * c * (x ** 2).sum(), 4 * c * x
    return 0.3 * (x ** 3).sum(), 0.9 * x ** 2  # cubed


def _make_regularizer(spec):
    kind, c = spec
    return {None: lambda: None, "l1": lambda: keras.regularizers.L1(c), "l2": lambda: keras.regularizers.L2(c),
            "l1l2": lambda: keras.regularizers.L1L2(l1=c, l2=2 * c), "scaled_l2": lambda: _ScaledL2(c),
            "cubed": lambda: _Cubed()}[kind]()


REGULARIZER_SPECS = [(None, 0), ("l1", 0.03), ("l2", 0.05), ("l1l2", 0.02), ("scaled_l2", 0.04), ("cubed", 0)]


@pytest.mark.parametrize("embeddings_spec", REGULARIZER_SPECS, ids=lambda s: str(s[0]))
@pytest.mark.parametrize("threshold_spec", REGULARIZER_SPECS, ids=lambda s: str(s[0]))
def test_fused_table_penalty_and_gradient_match_numpy(embeddings_spec, threshold_spec):
    """The fused ``[V | s]`` variable's regularizer is the embeddings' regularizer on ``V`` plus the thresholds'
    on ``s``, value and gradient, whichever way it is computed (per-column coefficients for Keras' L1 / L2 /
    L1L2, a split for the others, including an L2 subclass that overrides ``__call__``)."""
    layer, v, s = pep_case("feature_dim", seed=8, embeddings_regularizer=_make_regularizer(embeddings_spec),
                           threshold_regularizer=_make_regularizer(threshold_spec))
    assert layer.fused
    if embeddings_spec[0] is None and threshold_spec[0] is None:
        assert not layer.losses
        return
    value_v, grad_v = _numpy_penalty(embeddings_spec, v.astype(np.float64))
    value_s, grad_s = _numpy_penalty(threshold_spec, s.astype(np.float64))
    with tf.GradientTape() as tape:
        (penalty,) = layer.losses  # the fused table's one regularization loss
    grad = tf.convert_to_tensor(tape.gradient(penalty, layer.fused_table)).numpy()
    np.testing.assert_allclose(float(penalty), value_v + value_s, rtol=2e-6)
    np.testing.assert_allclose(grad, np.concatenate([grad_v, grad_s], axis=1), rtol=2e-6, atol=1e-8)


def test_fused_table_penalty_reads_a_variable_coefficient():
    """An L2 whose coefficient is a variable (a schedule raises it during the search) is read at every call, in
    a traced function too."""
    pressure = keras.regularizers.L2(0.01)
    pressure.l2 = tf.Variable(0.01, trainable=False)
    layer, v, s = pep_case("feature_dim", seed=9, threshold_regularizer=pressure)
    penalty = tf.function(lambda: tf.add_n(layer.losses))
    np.testing.assert_allclose(float(penalty()), 0.01 * (s.astype(np.float64) ** 2).sum(), rtol=2e-6)
    pressure.l2.assign(0.07)
    np.testing.assert_allclose(float(penalty()), 0.07 * (s.astype(np.float64) ** 2).sum(), rtol=2e-6)


def test_column_view_reads_and_assigns_its_columns():
    layer, v, s = pep_case("feature_dim", seed=7)
    np.testing.assert_array_equal(np.asarray(layer.embeddings), v)
    np.testing.assert_array_equal(tf.convert_to_tensor(layer.threshold).numpy(), s)
    np.testing.assert_array_equal(layer.fused_table.numpy(), np.concatenate([v, s], axis=1))
    assert layer.embeddings.shape == (V, D) and layer.threshold.shape == (V, D)
    with pytest.raises(ValueError, match=r"shape \(23, 7\).*Received: shape \(23, 6\)"):
        layer.threshold.assign(np.zeros((V, D - 1), np.float32))
    np.testing.assert_array_equal(layer.embeddings.numpy(), v)  # a refused assign changes nothing


def test_threshold_gradient_matches_finite_difference():
    layer, v, _ = pep_case("global")
    # Magnitudes kept away from the threshold 0.25 so no entry crosses it within the difference step.
    v = np.where(np.abs(np.abs(v) - 0.25) < 0.05, v * 2.0, v).astype(np.float32)
    layer.embeddings.assign(v)
    s0 = float(np.log(0.25 / G) - np.log(1 - 0.25 / G))  # g_scale * sigmoid(s0) = 0.25
    weights = tf.constant(np.random.default_rng(4).normal(size=(V, D)).astype(np.float32))

    def loss_at(s):
        layer.threshold.assign(s)
        return float(tf.reduce_sum(layer(tf.constant(np.arange(V))) * weights))

    eps = 1e-2
    numeric = (loss_at(s0 + eps) - loss_at(s0 - eps)) / (2 * eps)
    layer.threshold.assign(s0)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(tf.constant(np.arange(V))) * weights)
    np.testing.assert_allclose(tape.gradient(loss, layer.threshold).numpy(), numeric, rtol=1e-3)


# ------------------------------------------------------------------------------------------------ snapshots
def _snapshot_model(values, threshold_init=-4.0, l2=0.1):
    """ids -> PEP -> Flatten -> frozen zero Dense: only the thresholds' L2 moves, s_n = s0 (1 - 2 lr l2)^n."""
    layer = PEPEmbedding(V, D, threshold_type="feature_dim", threshold_init=threshold_init,
                         threshold_regularizer=keras.regularizers.L2(l2), name="pep")
    inputs = keras.Input(shape=(), dtype="int64")
    head = keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros", trainable=False, name="head")
    model = keras.Model(inputs, head(keras.layers.Flatten()(layer(inputs))))
    layer.embeddings.assign(values)
    layer.set_initial_values()  # the search starts from the assigned values
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.5), loss="mse")
    return model, layer


def _spread_values():
    """161 distinct magnitudes in (0, 0.5), 12 of them raised to 0.9 (never prunable: g(s) <= 0.5)."""
    magnitudes = (np.arange(1, V * D + 1) / (V * D + 2) * 0.5).reshape(V, D)
    signs = np.where(np.random.default_rng(5).random((V, D)) < 0.5, -1.0, 1.0)
    magnitudes[np.arange(12) % V, np.arange(12) % D] = 0.9
    return (signs * magnitudes).astype(np.float32)


def test_snapshots_at_targets_in_one_run():
    values = _spread_values()
    model, layer = _snapshot_model(values)
    snaps = PEPSnapshots(targets=[0.5, 0.2, 30, 5])  # 80, 32, 30 and an unreachable 5 parameters
    ids = np.arange(40) % V
    with pytest.warns(UserWarning, match=r"never reached.*fewest non-zero embedding parameters was 12 of 161"):
        model.fit(ids, np.zeros(40, np.float32), batch_size=1, epochs=2, verbose=0, callbacks=[snaps])
    assert snaps.dense_count == V * D and snaps.step == 80
    np.testing.assert_array_equal(layer.embeddings.numpy(), values)  # the head is frozen at zero: V never moves

    assert [s.target for s in snaps.snapshots] == [0.5, 0.2, 30]
    assert [s.target_count for s in snaps.snapshots] == [80, 32, 30]
    counts = dict(snaps.history)
    previous = None
    for snap in snaps.snapshots:
        assert snap.count <= snap.target_count and counts[snap.step] == snap.count
        assert snap.step == 1 or counts[snap.step - 1] > snap.target_count  # the first step at or below
        mask = snap.masks["pep"]
        assert mask.shape == (V, D) and mask.dtype == bool and mask.sum() == snap.count
        # Thresholds grow monotonically: later masks are subsets of earlier ones, the big entries never go.
        assert previous is None or not np.any(mask & ~previous)
        assert mask[np.abs(values) == np.float32(0.9)].all()
        assert snap.epoch == (snap.step - 1) // 40
        previous = mask
    # Analytic check of one mask: after n SGD steps s_n = -4 (1 - 2 * 0.5 * 0.1)^n, kept = |v| > sigmoid(s_n).
    snap = snaps.snapshots[0]
    s_n = -4.0 * 0.9 ** snap.step
    np.testing.assert_array_equal(snap.masks["pep"], np.abs(values) > sigmoid(s_n))
    # The impossible target, with the count reached.
    assert snaps.unreached == [{"target": 5, "target_count": 5, "reached": 12, "reached_at_step": snaps.min_step,
                                "final": 12}]
    with pytest.raises(KeyError, match="no snapshot for target 5"):
        snaps.snapshot(5)
    assert snaps.snapshot(0.2) is snaps.snapshots[1]
    # Initial values kept for the rewind: the table before the search (the layer's frozen copy).
    np.testing.assert_array_equal(snaps.initial_values["pep"], layer.initial_values())


def test_snapshot_save_and_load(tmp_path):
    values = _spread_values()
    model, _ = _snapshot_model(values)
    snaps = PEPSnapshots(targets=[0.5], check_every=2)
    model.fit(np.arange(10) % V, np.zeros(10, np.float32), batch_size=1, epochs=2, verbose=0, callbacks=[snaps])
    snap = snaps.snapshot(0.5)
    assert snap.step % 2 == 0
    path = os.path.join(tmp_path, "snap.npz")
    snap.save(path)
    loaded = PEPSnapshot.load(path)
    assert (loaded.target, loaded.count, loaded.step, loaded.epoch) == (snap.target, snap.count, snap.step, snap.epoch)
    np.testing.assert_array_equal(loaded.masks["pep"], snap.masks["pep"])
    np.testing.assert_array_equal(loaded.initial_values["pep"], snap.initial_values["pep"])
    assert len(loaded.initial_weights) == len(snap.initial_weights) == 1  # the head's kernel


# -------------------------------------------------------------------------------------------------- retrain
def _trainable_model(layer):
    inputs = keras.Input(shape=(), dtype="int64")
    outputs = keras.layers.Dense(1, name="head")(keras.layers.Flatten()(layer(inputs)))
    return keras.Model(inputs, outputs)


def _mask(seed=6, keep=0.3):
    return np.random.default_rng(seed).random((V, D)) < keep


def _fit(model, steps=6, lr=0.1):
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr), loss="mse")
    ids = np.arange(V)
    targets = np.linspace(-1, 1, V).astype(np.float32)
    model.fit(ids, targets, batch_size=8, epochs=steps // 3, verbose=0)


def _searched_to_half(values):
    """``(model, its PEP layer, the snapshot at 50% kept)`` of a short search from ``values``."""
    model, layer = _snapshot_model(values)
    snaps = PEPSnapshots(targets=[0.5])
    model.fit(np.arange(20) % V, np.zeros(20, np.float32), batch_size=1, epochs=1, verbose=0, callbacks=[snaps])
    return model, layer, snaps.snapshot(0.5)


def test_retrain_rewind_keeps_pruned_entries_zero():
    values = _spread_values()
    model, layer, snap = _searched_to_half(values)
    mask = snap.masks["pep"]

    ticket = retrain(model, snap, mode="rewind")
    new = pep_layers(ticket)["pep"]
    assert new is not layer and new.retrain and new.initial_embeddings is None and new.threshold is None
    np.testing.assert_array_equal(new.embeddings.numpy(), values * mask)  # initial values x mask
    np.testing.assert_array_equal(new.current_mask(), mask)
    assert new.parameter_count() == mask.sum() == snap.count
    np.testing.assert_array_equal(ticket.get_layer("head").kernel.numpy(), snap.initial_weights[0])  # rewound
    assert not model.get_layer("pep").retrain  # the searched model is untouched

    ticket.get_layer("head").trainable = True  # the search model's head was frozen; let the ticket learn
    _fit(ticket)
    trained = new.embeddings.numpy()
    assert np.all(trained[~mask] == 0.0)  # exactly zero after Adam steps
    assert np.mean(trained[mask] != (values * mask)[mask]) > 0.5  # the kept entries did train
    np.testing.assert_array_equal(new(tf.constant(IDS)).numpy(), (trained * mask)[IDS])
    assert new.parameter_count() == mask.sum()


def test_control_masks_keep_the_counts_and_move_the_entries():
    rng = np.random.default_rng(3)
    # PEP-like masks: popular rows (first) keep more entries than rare ones.
    kept = np.linspace(6, 0, V).round().astype(int)
    masks = {"pep": np.arange(D)[None, :] < kept[:, None], "other": rng.random((11, 5)) < 0.3}
    for kind in ("random", "columns"):
        out = control_masks(masks, kind, seed=0)
        assert set(out) == set(masks)
        for name, mask in masks.items():
            control = out[name]
            assert control.dtype == bool and control.shape == mask.shape
            assert control.sum() == mask.sum()  # the same count per table
            assert not np.array_equal(control, mask)
            if kind == "columns":  # and per id
                np.testing.assert_array_equal(control.sum(axis=1), mask.sum(axis=1))
            np.testing.assert_array_equal(control, control_masks(masks, kind, seed=0)[name])  # seeded
        assert any(not np.array_equal(out[n], control_masks(masks, kind, seed=1)[n]) for n in masks)
    # The random control spreads the entries over the rows: rare rows get some, popular rows lose some.
    rows = control_masks(masks, "random", seed=0)["pep"].sum(axis=1)
    assert rows[-5:].sum() > 0 and rows[:5].sum() < kept[:5].sum()
    with pytest.raises(ValueError, match="kind must be one of .* Received: kind='magnitude'"):
        control_masks(masks, "magnitude")
    with pytest.raises(ValueError, match="mask 'pep' must be a 2-D bool array .* dtype float64"):
        control_masks({"pep": np.ones((V, D))})
    with pytest.raises(TypeError, match="snapshot must be a PEPSnapshot. Received: dict"):
        control_snapshot(masks)


def test_control_ticket_retrains_with_the_control_mask():
    values = _spread_values()
    model, _, snap = _searched_to_half(values)
    control = control_snapshot(snap, "random", seed=4)
    assert (control.count, control.step, control.target) == (snap.count, snap.step, snap.target)
    assert control.initial_values is snap.initial_values and snap.masks is not control.masks
    ticket = retrain(model, control)
    new = pep_layers(ticket)["pep"]
    mask = control.masks["pep"]
    np.testing.assert_array_equal(new.current_mask(), mask)
    np.testing.assert_array_equal(new.embeddings.numpy(), values * mask)  # the same rewind, another mask
    assert new.parameter_count() == mask.sum() == snap.count


def test_retrain_random_mode_and_mask_dict():
    layer = PEPEmbedding(V, D, name="pep")
    model = _trainable_model(layer)
    initial = layer.initial_values()
    mask = _mask()
    ticket = retrain(model, {"pep": mask}, mode="random", seed=7)
    new = pep_layers(ticket)["pep"]
    table = new.embeddings.numpy()
    assert np.all(table[~mask] == 0.0) and np.all(table[mask] != 0.0)
    assert not np.allclose(table[mask], initial[mask])  # a fresh draw, not the rewind
    limit = np.sqrt(6.0 / (V + D))  # glorot_uniform
    assert np.abs(table).max() <= limit
    _fit(ticket)
    assert np.all(new.embeddings.numpy()[~mask] == 0.0)
    # Rewind from the layers' own initial copies when the mask comes without a snapshot.
    rewound = pep_layers(retrain(model, {"pep": mask}))["pep"]
    np.testing.assert_array_equal(rewound.embeddings.numpy(), initial * mask)


def test_retrain_from_a_factory():
    def factory():
        return _trainable_model(PEPEmbedding(V, D, name="pep"))

    mask = _mask()
    initial = table_values(12)
    ticket = retrain(factory, {"pep": mask}, initial_values={"pep": initial})
    np.testing.assert_array_equal(pep_layers(ticket)["pep"].embeddings.numpy(), initial * mask)
    fresh = pep_layers(retrain(factory, {"pep": mask}, mode="random"))["pep"]
    assert fresh.retrain and np.all(fresh.embeddings.numpy()[~mask] == 0.0)
    with pytest.raises(ValueError, match="from a factory needs the search's initial values"):
        retrain(factory, {"pep": mask})


def test_retrain_mode_layer_and_run_scheme_test_with_mask():
    mask = _mask()
    layer = PEPEmbedding(V, D, mask=mask)
    assert layer.retrain and layer.get_config()["retrain"] is True and "mask" not in layer.get_config()
    out = layer(tf.constant(IDS)).numpy()
    np.testing.assert_array_equal(out, (layer.embeddings.numpy() * mask)[IDS])
    assert np.all(layer.embeddings.numpy()[~mask] == 0.0)
    assert layer.parameter_count() == mask.sum()
    trained = run_scheme_test(PEPEmbedding, {"vocabulary_size": V, "output_dim": D, "mask": mask}, IDS[:6], (6, D))
    assert np.all(trained.embeddings.numpy()[~mask] == 0.0)


# ------------------------------------------------------------------------------------------ compact / packed
def test_compact_packs_the_pruned_table_exactly():
    layer, v, s = pep_case("feature_dim", seed=8)
    layer.threshold.assign(np.full((V, D), 0.5, np.float32))  # g = 0.7 sigmoid(0.5) = 0.437: most entries pruned
    table = layer.pruned_table().numpy()
    nnz = int((table != 0).sum())
    assert 0 < nnz < 0.35 * V * D
    packed = layer.compact()
    assert isinstance(packed, PackedEmbedding) and not packed.trainable_weights and packed.name == layer.name
    ids = np.concatenate([IDS, IDS[::-1]])
    np.testing.assert_array_equal(packed(tf.constant(ids)).numpy(), table[ids])  # bit for bit
    np.testing.assert_array_equal(packed(tf.constant(ids)).numpy(), layer(tf.constant(ids)).numpy())
    np.testing.assert_array_equal(packed(tf.constant(IDS[:20].reshape(4, 5))).numpy(), table[IDS[:20].reshape(4, 5)])
    assert packed.parameter_count() == layer.parameter_count() == nnz
    np.testing.assert_array_equal(packed.dims_per_id(), layer.dims_per_id())
    # Physically smaller: nnz float32 values and a zero + one int32 row index per row (start << 7 | 7-bit mask),
    # no dense matrix (the bitmask layout, COMPACT_LAYOUT "auto" up to 64 dims).
    assert packed.layout == "bitmask"
    assert packed.storage_bytes() == layer.storage_bytes() == (nnz + 1) * 4 + V * 4 < V * D * 4
    stored = sum(int(np.prod(w.shape)) * tf.as_dtype(w.dtype).size for w in packed.weights)
    assert stored == packed.storage_bytes()
    assert {w.name.split("/")[-1].split(":")[0]: tf.as_dtype(w.dtype).name for w in packed.weights} == {
        "row_index": "int32", "values": "float32"}
    csr = PackedEmbedding.from_dense(table, layout="csr")  # a column index per value
    assert csr.storage_bytes() == nnz * 5 + (V + 1) * 4
    np.testing.assert_array_equal(csr(tf.constant(ids)).numpy(), table[ids])
    np.testing.assert_array_equal(packed.to_dense(), table)
    # With a combiner, as the layer.
    layer.combiner = "mean"
    packed_mean = layer.compact()
    np.testing.assert_allclose(packed_mean(tf.constant(MULTI)).numpy(), layer(tf.constant(MULTI)).numpy(), atol=1e-7)


def test_compact_exports_dense_where_packing_saves_little():
    """``compact_min_saving``: a table whose packed layout would save less than that fraction of the dense bytes
    is exported in the "dense" layout (the pruned table with its zeros, one row gather); outputs are exact."""
    dense_bytes = V * D * 4
    # By hand: bitmask bytes = (nnz + 1) * 4 + V * 4 (an int32 row index: start << 7 | mask); dense = V * D * 4
    # (V = 23, D = 7: 644 bytes).
    assert packed_storage_bytes(V, D, 135, layout="bitmask") == 136 * 4 + V * 4 == 636
    assert packed_storage_bytes(V, D, 135, layout="dense") == dense_bytes == 644
    assert choose_layout("auto", V, D, 135) == "dense"  # saves 8 of 644 bytes
    assert choose_layout("auto", V, D, 135, min_saving=0.0) == "bitmask"  # 636 < 644: it does save
    assert choose_layout("auto", V, D, 161, min_saving=0.0) == "dense"  # every entry kept: 740 > 644
    assert choose_layout("auto", V, D, 135, min_saving=None) == "bitmask"
    # 25%: packed at most 483 bytes; bitmask at 98 kept is 396 + 92 = 488 (dense), at 97 kept 484 (dense), at
    # 96 kept 480 (bitmask).
    assert choose_layout("auto", V, D, 97) == "dense" and choose_layout("auto", V, D, 96) == "bitmask"
    # slots at 30 kept: (30 + 23) * 4 + 23 * 7 + 24 * 4 = 469 bytes, a 27% saving.
    assert choose_layout("slots", V, D, 30) == "slots" and choose_layout("slots", V, D, 30, min_saving=0.3) == "dense"
    assert choose_layout("dense", V, D, 0, min_saving=None) == "dense"

    for threshold, expected in ((-6.0, "dense"), (0.5, "bitmask")):  # few entries pruned / most entries pruned
        layer, _, _ = pep_case("feature_dim", seed=8)
        layer.threshold.assign(np.full((V, D), threshold, np.float32))
        table = layer.pruned_table().numpy()
        nnz = int((table != 0).sum())
        packed = layer.compact()
        assert packed.layout == expected == layer.compact_layout_for()
        ids = np.concatenate([IDS, IDS[::-1]])
        np.testing.assert_array_equal(packed(tf.constant(ids)).numpy(), table[ids])  # bit for bit
        np.testing.assert_array_equal(packed(tf.constant(IDS[:20].reshape(4, 5))).numpy(),
                                      table[IDS[:20].reshape(4, 5)])
        assert packed.parameter_count() == layer.parameter_count() == nnz
        stored = sum(int(np.prod(w.shape)) * tf.as_dtype(w.dtype).size for w in packed.weights)
        assert stored == packed.storage_bytes() == layer.storage_bytes()
        if expected == "dense":
            assert stored == dense_bytes and [w.shape for w in packed.weights] == [(V, D)]
            np.testing.assert_array_equal(packed.to_dense(), table)
            np.testing.assert_array_equal(packed.dims_per_id(), layer.dims_per_id())
        # Without the fallback the same table packs (and is larger when little is pruned).
        layer.compact_min_saving = None
        assert layer.compact().layout == "bitmask"
        assert layer.storage_bytes() == packed_storage_bytes(V, D, nnz, layout="bitmask")

    # The setting travels with the config; bad values and a trainable dense table are clear errors.
    layer = PEPEmbedding(V, D, compact_min_saving=0.5)
    assert PEPEmbedding.from_config(layer.get_config()).compact_min_saving == 0.5
    assert PEPEmbedding(V, D, compact_min_saving=None).compact_min_saving is None
    for bad in (1.0, -0.1, "high", True):
        with pytest.raises(ValueError, match=f"compact_min_saving must be a number in \\[0, 1\\) or None. "
                                             f"Received: compact_min_saving={re.escape(repr(bad))}"):
            PEPEmbedding(V, D, compact_min_saving=bad)
    with pytest.raises(ValueError, match="layout='dense' is inference-only"):
        PackedEmbedding(V, D, 3, layout="dense", trainable=True)


@pytest.mark.parametrize("layout", ["csr", "bitmask", "slots"])
def test_packed_embedding_from_dense_edge_cases_and_reload(tmp_path, layout):
    empty = PackedEmbedding.from_dense(np.zeros((V, D), np.float32), layout=layout)
    assert empty.parameter_count() == 0
    # slots: a zero per row, a slot per cell; bitmask: a trailing zero, an int32 row index per row, no offsets
    index = {"csr": 0, "bitmask": 4 + V * 4 - (V + 1) * 4, "slots": V * 4 + V * D}[layout]
    assert empty.storage_bytes() == (V + 1) * 4 + index
    np.testing.assert_array_equal(empty(tf.constant(IDS)).numpy(), np.zeros((V, D)))
    # A mask keeps an entry even when its value is 0 (retrain tables count the mask).
    table = np.zeros((V, D), np.float32)
    table[3, 6] = -1.25
    mask = np.zeros((V, D), bool)
    mask[3, [0, 6]] = True
    kept = PackedEmbedding.from_dense(table, mask=mask, layout=layout)
    assert kept.parameter_count() == 2 and kept.dims_per_id()[3] == 2
    np.testing.assert_array_equal(kept.stored_mask(), mask)
    np.testing.assert_array_equal(kept(tf.constant([3, 4])).numpy(), table[[3, 4]])
    splits, cols, vals = csr_from_dense(table, mask)
    assert splits[3] == 0 and splits[4] == 2 and cols.tolist() == [0, 6] and vals.tolist() == [0.0, -1.25]
    assert packed_storage_bytes(V, 200, 10) == 10 * (4 + 2) + 24 * 4  # int16 columns above 128 dims
    # Save / reload inside a model.
    dense = table_values(9) * _mask(10)
    packed = PackedEmbedding.from_dense(dense, layout=layout)
    assert packed.get_config()["layout"] == layout
    inputs = keras.Input(shape=(), dtype="int64")
    model = keras.Model(inputs, packed(inputs))
    path = os.path.join(tmp_path, "packed.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_array_equal(reloaded.predict(IDS, verbose=0), dense[IDS])
    with pytest.raises(ValueError, match=r"mask must have the shape of the table, \(23, 7\)"):
        PackedEmbedding.from_dense(dense, mask=np.ones((V, 6), bool))
    with pytest.raises(ValueError, match="nnz must be <= vocabulary_size"):
        PackedEmbedding(V, D, nnz=V * D + 1)


# ------------------------------------------------------------------------------------------------- contract
CONTRACT = [
    {"vocabulary_size": V, "output_dim": D},
    {"vocabulary_size": V, "output_dim": D, "threshold_type": "global", "threshold_init": -2.0, "combiner": "mean"},
    {"vocabulary_size": V, "output_dim": D, "threshold_type": "field_dim", "field_offsets": OFFSETS,
     "threshold_init": "criteo", "threshold_regularizer": keras.regularizers.L2(1e-4)},
]
CONTRACT_IDS = [(IDS[:6], (6, D)), (MULTI, (5, D)), (IDS[:6].reshape(3, 2), (3, 2, D))]


@pytest.mark.parametrize("index", range(len(CONTRACT)))
def test_run_scheme_test(index):
    ids, shape = CONTRACT_IDS[index]
    trained = run_scheme_test(PEPEmbedding, CONTRACT[index], ids, shape)
    assert isinstance(trained, EmbeddingScheme)
    # The initial copy is training-time state: not a trainable weight, not counted, not in compact().
    assert trained.initial_embeddings is not None
    assert all(w is not trained.initial_embeddings for w in trained.trainable_weights)
    assert trained.parameter_count() <= V * D
    assert all("initial" not in w.name for w in trained.compact().weights)


@pytest.mark.parametrize("layout", ["csr", "bitmask", "slots"])
def test_packed_embedding_contract(layout):
    run_scheme_test(PackedEmbedding, {"vocabulary_size": V, "output_dim": D, "nnz": 9, "layout": layout},
                    IDS[:6], (6, D))


@pytest.mark.parametrize("dim", [1, 7, 16, 127, 130])
def test_slots_layout_matches_the_dense_table(dim):
    """The slots layout: full, empty and single-entry rows, an empty last row, int8 / int16 slot offsets: the
    lookup returns the dense table's rows exactly (1-D, 2-D and pooled ids), it converts back to the same CSR,
    its stored bytes are ``storage_bytes()`` and it refuses to train (its zero slots must stay zero)."""
    from tfemb.layers.packed_embedding import csr_from_slots, slot_offset_dtype, slots_from_csr

    rng = np.random.default_rng(dim)
    rows = 40
    table = rng.normal(size=(rows, dim)).astype(np.float32)
    keep = rng.random((rows, dim)) < 0.3
    keep[0] = True  # a full row
    keep[1] = False  # an empty row
    keep[2] = False
    keep[2, -1] = True  # the last column alone
    keep[-1] = False  # the last row empty: its zero slot is the buffer's last entry
    table[~keep] = 0.0
    slots = PackedEmbedding.from_dense(table, mask=keep, layout="slots")
    ids = np.concatenate([np.arange(rows), rng.integers(0, rows, 50)])
    np.testing.assert_array_equal(slots(tf.constant(ids)).numpy(), table[ids])
    np.testing.assert_array_equal(slots(tf.constant(ids[:48].reshape(6, 8))).numpy(), table[ids[:48].reshape(6, 8)])
    np.testing.assert_array_equal(slots.stored_mask(), keep)
    np.testing.assert_array_equal(slots.dims_per_id(), keep.sum(axis=1))
    np.testing.assert_array_equal(slots.to_dense(), table)
    assert slots.parameter_count() == keep.sum()
    assert tf.as_dtype(slots.slot_offsets.dtype).name == slot_offset_dtype(dim) == ("int8" if dim < 128 else "int16")
    stored = sum(int(np.prod(w.shape)) * tf.as_dtype(w.dtype).size for w in slots.weights)
    assert stored == slots.storage_bytes()
    # The slots hold each row's values in column order, then a zero; the offsets of the other cells point at it.
    splits, cols, vals = csr_from_dense(table, keep)
    slot_splits, offsets, slot_values = slots_from_csr(splits, cols, vals, dim)
    assert slot_values.shape[0] == keep.sum() + rows and np.all(slot_values[slot_splits[1:] - 1] == 0.0)
    assert np.all(offsets[1] == 0) and np.all(offsets[~keep] == np.repeat(keep.sum(1), dim).reshape(rows, dim)[~keep])
    for a, b in zip(csr_from_slots(slot_splits, offsets, slot_values), (splits, cols, vals)):
        np.testing.assert_array_equal(a, b)
    pooled = PackedEmbedding.from_dense(table, mask=keep, layout="slots", combiner="sum")
    np.testing.assert_allclose(pooled(tf.constant([[0, 2, -1], [1, -1, -1]])).numpy(),
                               np.stack([table[0] + table[2], table[1]]), rtol=1e-6)
    with pytest.raises(ValueError, match=r"layout='slots' is inference-only .*Received: trainable=True"):
        PackedEmbedding(rows, dim, 3, layout="slots", trainable=True)


@pytest.mark.parametrize("dim", [8, 16, 31, 32, 33, 64])
def test_bitmask_layout_matches_the_dense_table(dim):
    """Masks of every width (int8 .. int64), the top bit (the sign of the mask's integer) included: the bitmask
    lookup returns the dense table's rows exactly, as the CSR lookup does, and the masks are the kept columns."""
    from tfemb.layers.packed_embedding import columns_from_row_masks, mask_dtype, row_masks_from_csr

    rng = np.random.default_rng(dim)
    rows = 40
    table = rng.normal(size=(rows, dim)).astype(np.float32)
    keep = rng.random((rows, dim)) < 0.4
    keep[0] = True  # a full row: every bit set, the top one too
    keep[1] = False  # an empty row
    keep[2, -1] = True  # the top bit alone
    keep[2, :-1] = False
    table[~keep] = 0.0
    bitmask = PackedEmbedding.from_dense(table, mask=keep, layout="bitmask")
    csr = PackedEmbedding.from_dense(table, mask=keep, layout="csr")
    assert PackedEmbedding.from_dense(table, mask=keep, layout="auto").layout == "bitmask"
    if dim > 32:  # the masks apart from the row offsets; up to 32 dims, one int32 / int64 per row holds both
        assert tf.as_dtype(bitmask.row_masks.dtype).name == mask_dtype(dim)
    else:
        assert tf.as_dtype(bitmask.row_index.dtype).name == ("int32" if keep.sum() < 2 ** (31 - dim) else "int64")
    ids = np.concatenate([np.arange(rows), rng.integers(0, rows, 50)])
    np.testing.assert_array_equal(bitmask(tf.constant(ids)).numpy(), table[ids])
    np.testing.assert_array_equal(bitmask(tf.constant(ids)).numpy(), csr(tf.constant(ids)).numpy())
    np.testing.assert_array_equal(bitmask.stored_mask(), keep)
    np.testing.assert_array_equal(bitmask.dims_per_id(), keep.sum(axis=1))
    splits, cols, _ = csr_from_dense(table, keep)
    masks = row_masks_from_csr(splits, cols, mask_dtype(dim))
    assert int(masks[1]) == 0
    if dim in (8, 16, 32, 64):  # the mask's top bit is column dim - 1: two's complement makes it negative
        assert int(masks[2]) < 0
    np.testing.assert_array_equal(columns_from_row_masks(masks, dim), cols)
    names = ["row_index", "values"] if dim <= 32 else ["row_masks", "row_splits", "values"]
    assert sorted(w.name.split("/")[-1].split(":")[0] for w in bitmask.weights) == names
    assert bitmask.storage_bytes() == sum(int(np.prod(w.shape)) * tf.as_dtype(w.dtype).size for w in bitmask.weights)
    with pytest.raises(ValueError, match="layout='bitmask' holds at most 64 dims. Received: output_dim=65"):
        PackedEmbedding(rows, 65, 3, layout="bitmask")
    with pytest.raises(ValueError, match="layout must be one of .*Received: layout='dots'"):
        PackedEmbedding(rows, dim, 3, layout="dots")
    assert PackedEmbedding(rows, 65, 3, layout="auto").layout == "csr"


def test_sparse_tables():
    for kind in THRESHOLD_TYPES:
        layer = PEPEmbedding(V, D, threshold_type=kind)
        tables = layer.sparse_tables()  # builds the layer
        expected = [layer.fused_table] if kind in ("feature", "feature_dim") else [layer.embeddings]
        assert [id(t) for t in tables] == [id(t) for t in expected]
    retraining = PEPEmbedding(V, D, mask=_mask())
    assert [id(t) for t in retraining.sparse_tables()] == [id(retraining.embeddings)]


# ------------------------------------------------------------------------------------------ factory, presets
def test_factory_and_presets():
    assert SCHEMES["pep"] is PEPEmbedding
    make = scheme_factory("pep", output_dim=D, threshold_type="feature", threshold_init="ml-1m")
    layer = make("item", V, np.arange(V))
    assert isinstance(layer, PEPEmbedding) and layer.name == "item_embedding" and layer.frequencies is None
    assert layer.threshold_init == -15.0
    assert OFFICIAL_PRESETS["criteo"]["threshold_init"] == -150.0 and OFFICIAL_PRESETS["ml-1m"]["output_dim"] == 32
    kwargs = pep_preset("avazu")
    assert kwargs["threshold_type"] == "feature_dim" and kwargs["g_scale"] == 1.0
    assert np.isclose(kwargs["threshold_regularizer"].get_config()["l2"], 5e-6)
    preset_layer = PEPEmbedding(V, **kwargs)
    assert preset_layer.output_dim == 24
    # At -150 the float32 threshold and its gradient are exactly 0 (the official code too): nothing is pruned.
    assert preset_layer.parameter_count() == V * 24


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input():
    with pytest.raises(ValueError, match=r"threshold_type must be one of .*Received: threshold_type='row'"):
        PEPEmbedding(V, D, threshold_type="row")
    with pytest.raises(ValueError, match=r"mask must have the table's shape \(23, 7\).*Received: .*\(23, 6\)"):
        PEPEmbedding(V, D, mask=np.ones((V, 6)))
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        PEPEmbedding(V, D, mask=np.full((V, D), 0.5))
    with pytest.raises(ValueError, match=r"threshold_init must be a number or a preset name"):
        PEPEmbedding(V, D, threshold_init="movielens")
    with pytest.raises(ValueError, match="g_scale must be a finite number >= 0"):
        PEPEmbedding(V, D, g_scale=-1.0)
    with pytest.raises(ValueError, match="field_offsets must be increasing ints starting at 0"):
        PEPEmbedding(V, D, threshold_type="field", field_offsets=[0, 12, 5])
    with pytest.raises(ValueError, match="field_offsets must be increasing"):
        PEPEmbedding(V, D, field_offsets=[0, 23])
    searching = PEPEmbedding(V, D)
    with pytest.raises(ValueError, match="set_mask needs a layer in retrain mode"):
        searching.set_mask(_mask())
    retraining = PEPEmbedding(V, D, retrain=True)
    with pytest.raises(ValueError, match=r"mask must have the table's shape \(23, 7\)"):
        retraining.set_mask(np.ones((V + 1, D)))
    with pytest.raises(ValueError, match=r"initial values must have the table's shape"):
        retraining.rewind(np.ones((V, D + 1)))
    for bad in ([1.5], [-3], ["half"], [], [0.5, 0.5]):
        with pytest.raises(ValueError, match="target"):
            PEPSnapshots(targets=bad)
    with pytest.raises(ValueError, match="check_every must be an int >= 1"):
        PEPSnapshots(targets=[0.5], check_every=0)
    model = _trainable_model(PEPEmbedding(V, D, name="pep"))
    with pytest.raises(ValueError, match=r"must name the model's PEP layers \['pep'\]. Missing: \['pep'\]"):
        retrain(model, {"other": _mask()})
    with pytest.raises(ValueError, match=r"mask must have the table's shape"):
        retrain(model, {"pep": np.ones((V, 3), bool)})
    with pytest.raises(ValueError, match="mode must be one of"):
        retrain(model, {"pep": _mask()}, mode="lottery")
    no_pep = _trainable_model(keras.layers.Embedding(V, D))
    callback = PEPSnapshots(targets=[0.5])
    callback.set_model(no_pep)
    with pytest.raises(ValueError, match="needs a model with at least one PEPEmbedding layer"):
        callback.watched_layers()


# -------------------------------------------------------------------------------------------------- reports
def test_sparsity_report_by_field_and_popularity():
    mask = np.zeros((V, D), bool)
    mask[:5] = True  # ids 0-4: all 7 dims
    mask[5:12, :2] = True  # ids 5-11: 2 dims
    layer = PEPEmbedding(V, D, mask=mask, field_offsets=OFFSETS, frequencies=np.arange(V, 0, -1), name="stacked")
    report = sparsity_report({"stacked": layer}, num_buckets=2)
    assert [(r["field"], r["ids"], r["nonzero"], r["empty_ids"]) for r in report["fields"]] == [
        (0, 5, 35, 0), (1, 7, 14, 0), (2, 11, 0, 11)]
    assert report["total"] == {"dense": V * D, "nonzero": 49, "kept_fraction": 49 / (V * D)}
    field1 = [r for r in report["buckets"] if r["field"] == 1]
    assert [(r["bucket"], r["ids"], r["rank_range"], r["mean_dim"]) for r in field1] == [
        (0, 4, (0, 4), 2.0), (1, 3, (4, 7), 2.0)]
    counts = np.arange(V, 0, -1)[5:12].astype(float)
    assert np.isclose(field1[0]["count_share"], counts[:4].sum() / counts.sum())
    # Counts from a Schema rank the ids of a feature (most popular first), without them the id order.
    reversed_counts = np.arange(V)  # id 22 is the most popular
    plain = PEPEmbedding(V, D, mask=mask, name="plain")

    class FakeSchema:
        names = ["plain"]

        def frequencies(self, name):
            return reversed_counts

    by_count = sparsity_report({"plain": plain}, schema=FakeSchema(), num_buckets=3)["buckets"]
    by_id = sparsity_report({"plain": plain}, num_buckets=3)["buckets"]
    assert [r["mean_dim"] for r in by_id][0] > [r["mean_dim"] for r in by_count][0]
    assert by_count[0]["mean_dim"] == 0.0 and by_count[0]["count_share"] > by_count[-1]["count_share"]
    with pytest.raises(ValueError, match="num_buckets must be an int >= 1"):
        sparsity_report({"plain": plain}, num_buckets=0)


# --------------------------------------------------------------------------------------- with a RecModel
def test_deepfm_search_snapshot_and_retrain_with_sparse_optimizer():
    rng = np.random.default_rng(11)
    df = pd.DataFrame({"c1": rng.integers(0, 9, 96).astype(str), "c2": rng.integers(0, 13, 96),
                       "click": rng.integers(0, 2, 96)})
    schema = Schema([CategoricalFeature("c1"), CategoricalFeature("c2")], Label("click")).fit(df)
    x, y = schema.transform(df)
    make = scheme_factory("pep", output_dim=5, threshold_type="feature_dim", threshold_init=-1.5,
                          threshold_regularizer=keras.regularizers.L2(0.5))
    model = DeepFM(schema, embeddings=make, embedding_dim=5, dnn_units=(4,), embedding_optimizer="adam")
    model.build()
    compile_model(model, optimizer="adam", learning_rate=0.05)
    assert model.embedding_parameter_count() > 60  # g(-1.5) = 0.18 prunes a few entries only
    snaps = PEPSnapshots(targets=[0.5])
    model.fit(x, y, batch_size=16, epochs=4, verbose=0, callbacks=[snaps])
    assert set(pep_layers(model)) == {"c1", "c2"} and snaps.dense_count == sum(
        schema.vocabulary_size(n) * 5 for n in ("c1", "c2"))
    snap = snaps.snapshot(0.5)
    assert snap.count <= snaps.dense_count // 2 == 60
    rows = {r["feature"]: r for r in model.embedding_report()}
    assert rows["c1"]["parameters"] == model.embedding_layers["c1"].parameter_count()

    ticket = retrain(model, snap)
    assert type(ticket) is DeepFM and all(layer.retrain for layer in pep_layers(ticket).values())
    for name, layer in pep_layers(ticket).items():
        np.testing.assert_array_equal(layer.embeddings.numpy(), snap.initial_values[name] * snap.masks[name])
    compile_model(ticket, optimizer="adam", learning_rate=0.05)
    ticket.fit(x, y, batch_size=16, epochs=2, verbose=0)
    for name, layer in pep_layers(ticket).items():
        assert np.all(layer.embeddings.numpy()[~snap.masks[name]] == 0.0)
    assert ticket.embedding_parameter_count() == snap.count
    report = sparsity_report(ticket, schema, num_buckets=2)
    assert report["total"]["nonzero"] == snap.count
    # Config round trip of the retrain model keeps the retrain mode.
    clone = DeepFM.from_config(ticket.get_config())
    assert all(layer.retrain for layer in pep_layers(clone).values())


def test_docstring_examples_run():
    import doctest

    from tfemb.layers import packed_embedding, pep_embedding

    for module in (packed_embedding, pep_embedding):
        result = doctest.testmod(module, extraglobs={"np": np, "tf": tf}, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, (module.__name__, result)


def test_kept_count_equals_the_non_zeros_of_the_pruned_values():
    """``kept_count`` (the snapshots' count) is the number of non-zeros of ``pruned_values`` without forming it,
    ties ``|v| == t`` included (pruned to 0 by both)."""
    from tfemb.layers.pep_embedding import _scaled_threshold, kept_count, pruned_values

    v = table_values(3)
    s = np.random.default_rng(4).normal(-1.0, 1.0, size=(V, D)).astype(np.float32)
    t = _scaled_threshold(tf.constant(s), G, tf.float32).numpy()  # the layer's own float32 thresholds
    np.testing.assert_allclose(t, G * sigmoid(s), rtol=1e-5)
    v[0, :3] = t[0, :3]  # exact ties: |v| == t
    v[1, :2] = -t[1, :2]
    v[2, 0] = 0.0
    pruned = pruned_values(tf.constant(v), tf.constant(s), G).numpy()
    assert pruned[0, :3].tolist() == [0.0, 0.0, 0.0] and pruned[1, :2].tolist() == [0.0, 0.0]
    assert int(kept_count(tf.constant(v), tf.constant(s), G)) == int(np.count_nonzero(pruned))
    for shape in [(), (D,), (V, 1)]:  # global, dimension-wise and feature-wise thresholds broadcast the same way
        small = np.full(shape, -0.5, np.float32)
        expected = np.count_nonzero(pruned_values(tf.constant(v), tf.constant(small), G).numpy())
        assert int(kept_count(tf.constant(v), tf.constant(small), G)) == expected


def test_grouped_count_equals_the_sum_of_the_layer_counts():
    """``grouped_nonzero_count`` (what ``PEPSnapshots.count`` runs) stacks the ``[V | s]`` rows per ``(g_scale,
    dtype, output_dim)``: the same count as adding every layer's own, for mixed threshold types, scales, widths,
    the two-variable layout and a layer in retrain mode."""
    from tfemb.pep import grouped_nonzero_count

    rng = np.random.default_rng(11)
    layers = []
    for i, (kind, g, d, fused) in enumerate([("feature_dim", 3.0, D, True), ("feature_dim", 3.0, D, False),
                                             ("feature_dim", 1.0, D, True), ("feature_dim", 3.0, D - 2, True),
                                             ("dimension", 3.0, D, False), ("global", 1.0, D, False)]):
        layer = PEPEmbedding(V + i, d, threshold_type=kind, g_scale=g, fused=fused, name=f"t{i}")
        layer.build()
        layer.embeddings.assign(rng.normal(0, 0.6, size=(V + i, d)).astype(np.float32))
        layer.threshold.assign(rng.normal(-1.0, 1.0, size=layer.threshold_shape()).astype(np.float32))
        layers.append(layer)
    assert [layer.fused for layer in layers] == [True, False, True, True, False, False]
    mask = rng.random((V, D)) < 0.4
    retrained = PEPEmbedding(V, D, mask=mask, retrain=True, name="r")
    retrained.build()
    layers.append(retrained)
    assert [layer.count_operands() is not None for layer in layers] == [True] * 4 + [False] * 3
    expected = sum(int(layer.nonzero_count_tensor()) for layer in layers)
    assert expected == sum(int(np.count_nonzero(layer.pruned_table().numpy())) for layer in layers)
    assert int(grouped_nonzero_count(layers)) == expected
    assert int(tf.function(grouped_nonzero_count)(layers)) == expected
    assert int(grouped_nonzero_count(layers[:1])) == int(layers[0].nonzero_count_tensor())


@pytest.mark.parametrize("fused", [True, False])
def test_searching_layer_saves_and_reloads(tmp_path, fused):
    """A search-mode layer in a ``.keras`` file: the table, the thresholds, the initial copy and the layout come
    back, so a search can be resumed (and rewound) after a reload."""
    layer, v, s = pep_case("feature_dim", seed=11, fused=fused)
    layer.set_initial_values(v * 0.5)
    inputs = keras.Input(shape=(), dtype="int64")
    model = keras.Model(inputs, layer(inputs))
    path = os.path.join(tmp_path, "search.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    (again,) = [w for w in reloaded.layers if isinstance(w, PEPEmbedding)]
    assert again.fused == fused and again.get_config()["fused"] == fused
    np.testing.assert_array_equal(np.asarray(again.embeddings), v)
    np.testing.assert_array_equal(np.asarray(again.threshold), s)
    np.testing.assert_array_equal(again.initial_values(), v * 0.5)
    np.testing.assert_array_equal(reloaded.predict(IDS, verbose=0), model.predict(IDS, verbose=0))
