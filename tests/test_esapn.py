"""ESAPN: the hard-size layer and its chain against NumPy, the per-id state, reward, REINFORCE, export, streaming.

Sizes are tiny and all different (vocabulary 23, candidate sizes 2 / 3 / 5 / 7, T = 3) so a swapped axis or a
link applied to the wrong size shows. Values are assigned, never drawn from a framework's random stream, except
where a test checks structure only (sizes grow, a stream runs). Runs under Keras 3 and, with
TF_USE_LEGACY_KERAS=1, Keras 2. Nothing creates a tensor at import time (tests/conftest.py splits the CPU first).
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from tfemb._keras import keras
from tfemb.esapn import (
    ENLARGE, ESAPNPolicy, ESAPNSearch, FrequencyReport, esapn_layers, frequency_report, memory_report, memory_table,
    reinforce_loss, rewards, sample_actions, stream_fit,
)
from tfemb.layers.esapn_embedding import ESAPNCompactEmbedding, ESAPNEmbedding, check_candidate_dims
from tfemb.testing import run_scheme_test

V = 23
DIMS = (2, 3, 5, 7)
T = 3
IDS = np.array([0, 22, 5, 1, 17, 3, 9, 11, 2, 20, 4, 13, 7, 21, 6, 16, 8, 19, 10, 15, 12, 18, 14])
SIZES = np.array([(3 * i + 1) % 4 for i in range(V)])  # every size used, ids shuffled across them
EPS = 1e-3  # Keras' BatchNormalization epsilon


def layer_case(normalization="none", sizes=SIZES, seed=0, **kw):
    """A built layer with assigned tables, chain, sizes (and batch-norm statistics); returns it and the arrays."""
    layer = ESAPNEmbedding(V, candidate_dims=DIMS, history_length=T, normalization=normalization, **kw)
    layer.build()
    rng = np.random.default_rng(seed)
    tables = [rng.uniform(-0.6, 0.6, size=(V, d)).astype(np.float32) for d in DIMS]
    kernels = [rng.uniform(-0.7, 0.7, size=(a, b)).astype(np.float32) for a, b in zip(DIMS, DIMS[1:])]
    biases = [rng.uniform(-0.2, 0.2, size=(b,)).astype(np.float32) for b in DIMS[1:]]
    for var, value in zip(layer.tables + layer.kernels + layer.biases, tables + kernels + biases):
        var.assign(value)
    layer.size_index.assign(np.asarray(sizes, np.int64))
    norm = None
    if normalization == "batch_norm_tanh":
        d = DIMS[-1]
        norm = {"gamma": rng.uniform(0.5, 1.5, d), "beta": rng.uniform(-0.3, 0.3, d),
                "moving_mean": rng.uniform(-0.2, 0.2, d), "moving_variance": rng.uniform(0.3, 2.0, d)}
        for name, value in norm.items():
            getattr(layer.lift_norm, name).assign(value.astype(np.float32))
    return layer, tables, kernels, biases, norm


def np_lift(tables, kernels, biases, sizes, ids):
    """The paper's chain e_{k+1} = e_k W_k + b_k from each id's size to d_n, in float64."""
    out = []
    for i in np.asarray(ids).reshape(-1):
        e = tables[sizes[i]][i].astype(np.float64)
        for k in range(sizes[i], len(kernels)):
            e = e @ kernels[k] + biases[k]
        out.append(e)
    return np.stack(out).reshape(np.shape(ids) + (DIMS[-1],))


def np_normalize(x, norm):
    return np.tanh((x - norm["moving_mean"]) / np.sqrt(norm["moving_variance"] + EPS) * norm["gamma"] + norm["beta"])


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("dims,words", [
    ([2, 8, 4], ["sorted", "8 comes before 4", "[2, 8, 4]"]),
    ([2, 4, 4, 8], ["repeat", "4 appears 2 times", "[2, 4, 4, 8]"]),
    ([], ["non-empty", "[]"]),
    ([2, 0, 4], ["ints >= 1", "0"]),
    ([2, 2.5], ["ints >= 1", "2.5"]),
    ([True, 4], ["ints >= 1", "True"]),
    (7, ["non-empty", "7"]),
])
def test_bad_candidate_dims_name_the_value(dims, words):
    with pytest.raises(ValueError) as error:
        ESAPNEmbedding(V, candidate_dims=dims)
    assert all(w in str(error.value) for w in words), str(error.value)


@pytest.mark.parametrize("kwargs,words", [
    ({"history_length": 0}, ["history_length", "Received: history_length=0"]),
    ({"history_length": -2}, ["history_length", "-2"]),
    ({"history_length": 1.5}, ["history_length", "1.5"]),
    ({"history_length": True}, ["history_length", "True"]),
    ({"output_dim": 5}, ["output_dim", "d_n=7", "output_dim=5"]),
    ({"normalization": "layer_norm"}, ["normalization", "layer_norm"]),
    ({"popularity": "frequencies"}, ["frequencies=None"]),
    ({"batch_norm_momentum": 1.0}, ["batch_norm_momentum", "1.0"]),
])
def test_bad_arguments_name_the_value(kwargs, words):
    with pytest.raises(ValueError) as error:
        ESAPNEmbedding(V, candidate_dims=DIMS, **kwargs)
    assert all(w in str(error.value) for w in words), str(error.value)


def test_check_candidate_dims_accepts_numpy_ints_and_a_single_size():
    assert check_candidate_dims(np.array([2, 4, 16])) == (2, 4, 16)
    assert check_candidate_dims([9]) == (9,)
    layer = ESAPNEmbedding(V, candidate_dims=[9], normalization="none")
    assert layer(tf.constant([1, 2])).shape == (2, 9) and layer.parameter_count() == V * 9


# ---------------------------------------------------------------------------------------- lookup and chain
@pytest.mark.parametrize("normalization", ["none", "batch_norm_tanh"])
def test_lookup_is_the_chain_from_each_ids_size(normalization):
    layer, tables, kernels, biases, norm = layer_case(normalization)
    expected = np_lift(tables, kernels, biases, SIZES, IDS)
    if norm is not None:
        expected = np_normalize(expected, norm)
    np.testing.assert_allclose(layer(tf.constant(IDS), training=False).numpy(), expected, rtol=1e-5, atol=1e-6)
    ids_2d = IDS[:20].reshape(4, 5)
    np.testing.assert_allclose(layer(tf.constant(ids_2d), training=False).numpy(),
                               expected[:20].reshape(4, 5, DIMS[-1]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(layer.dims_per_id(), np.asarray(DIMS)[SIZES])


def test_training_call_normalises_with_batch_statistics():
    layer, tables, kernels, biases, _ = layer_case("batch_norm_tanh")
    lifted = np_lift(tables, kernels, biases, SIZES, IDS)
    mean, var = lifted.mean(axis=0), lifted.var(axis=0)
    gamma, beta = (np.asarray(layer.lift_norm.gamma), np.asarray(layer.lift_norm.beta))
    expected = np.tanh((lifted - mean) / np.sqrt(var + EPS) * gamma + beta)
    np.testing.assert_allclose(layer(tf.constant(IDS), training=True).numpy(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("combiner", ["sum", "mean"])
def test_multi_hot_pooling(combiner):
    layer, tables, kernels, biases, _ = layer_case("none", combiner=combiner)
    multi = np.array([[0, 5, -1], [22, 7, 13], [-1, -1, -1], [4, 4, 19]])
    vectors = np_lift(tables, kernels, biases, SIZES, np.where(multi == -1, 0, multi))
    mask = (multi != -1)[..., None]
    total = (vectors * mask).sum(axis=1)
    count = mask.sum(axis=1)
    expected = total if combiner == "sum" else np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    np.testing.assert_allclose(layer(tf.constant(multi)).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_gradients_reach_only_the_rows_of_each_ids_current_size():
    sizes = np.where(np.arange(V) % 2 == 0, 1, 3)  # nobody at size 0 or 2
    layer, *_ = layer_case("none", sizes=sizes)
    ids = np.array([4, 7, 4, 10, 3])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(tf.constant(ids)) * np.arange(1, 8, dtype=np.float32))
    grads = tape.gradient(loss, layer.tables + layer.kernels)
    assert all(isinstance(g, tf.IndexedSlices) for g in grads[:4] if g is not None)
    rows = [set() if g is None else set(np.asarray(g.indices).tolist()) for g in grads[:4]]
    assert rows[0] == set() and rows[2] == set()
    assert rows[1] == {4, 10} and rows[3] == {7, 3}
    assert grads[4] is None or not np.any(tf.convert_to_tensor(grads[4]).numpy())  # W_{1->2}: no id passes it
    assert np.any(tf.convert_to_tensor(grads[5]).numpy()) and np.any(tf.convert_to_tensor(grads[6]).numpy())


# ------------------------------------------------------------------------------------------------- state
def test_enlarge_initialises_from_the_transform_and_keeps_the_output():
    layer, tables, kernels, biases, norm = layer_case("batch_norm_tanh")
    before = layer(tf.constant(np.arange(V)), training=False).numpy()
    ids = np.array([5, 9, 5, -1, 14, 3, 9])  # repeats and padding; 14 is already at d_n
    at_max = [i for i in set(ids.tolist()) - {-1} if SIZES[i] == len(DIMS) - 1]
    unique, grown = layer.enlarge(tf.constant(ids))
    unique, grown = unique.numpy(), grown.numpy()
    assert sorted(unique.tolist()) == [3, 5, 9, 14]
    assert at_max == [14] and {int(i) for i, g in zip(unique, grown) if not g} == {14}
    after_sizes = layer.size_indices()
    for i in range(V):
        if i in unique and i not in at_max:
            k = SIZES[i]
            assert after_sizes[i] == k + 1
            np.testing.assert_allclose(np.asarray(layer.tables[k + 1])[i], tables[k][i] @ kernels[k] + biases[k],
                                       rtol=1e-5, atol=1e-6)
        else:
            assert after_sizes[i] == SIZES[i]
    # Other rows of every table are untouched.
    changed = [i for i in unique if i not in at_max]
    for k in range(len(DIMS)):
        keep = [i for i in range(V) if not (i in changed and SIZES[i] + 1 == k)]
        np.testing.assert_array_equal(np.asarray(layer.tables[k])[keep], tables[k][keep])
    # The lifted vector is unchanged by the enlargement (the chain continues from W e_k + b).
    np.testing.assert_allclose(layer(tf.constant(np.arange(V)), training=False).numpy(), before, atol=1e-6)
    assert layer.dims_per_id().sum() == np.asarray(DIMS)[SIZES].sum() + sum(
        DIMS[SIZES[i] + 1] - DIMS[SIZES[i]] for i in changed)


def test_enlarge_never_passes_the_largest_size_and_sizes_only_grow():
    layer, *_ = layer_case("none", sizes=np.zeros(V, np.int64))
    history = [layer.size_indices()]
    for _ in range(len(DIMS) + 1):
        layer.enlarge(tf.constant([1, 2, 2, 8]))
        history.append(layer.size_indices())
    steps = np.diff(np.stack(history), axis=0)
    assert np.all(steps >= 0) and np.all(steps <= 1)
    assert history[-1][[1, 2, 8]].tolist() == [len(DIMS) - 1] * 3 and history[-1].sum() == 3 * (len(DIMS) - 1)


def test_record_losses_counts_history_and_last_losses():
    layer, *_ = layer_case("none")
    np.testing.assert_array_equal(layer.last_losses(tf.constant([3, 4])).numpy(), [1.0, 1.0])  # none recorded yet
    batches = [
        (np.array([[3, 4, -1], [3, -1, -1], [5, 4, 4]]), np.array([0.5, 0.25, 2.0])),  # 4 twice in a row, padding
        (np.array([[4, -1, -1], [6, -1, -1]]), np.array([0.125, 4.0])),
        (np.array([[4, 5, -1]]), np.array([8.0])),
        (np.array([[4, -1, -1]]), np.array([16.0])),
    ]
    for ids, losses in batches:
        layer.record_losses(tf.constant(ids), tf.constant(losses, tf.float32))
    counts = np.asarray(layer.counts)
    assert counts[[3, 4, 5, 6]].tolist() == [2, 6, 2, 1] and counts.sum() == 11
    history = np.asarray(layer.loss_history)
    # Most recent first, one entry per batch (the last occurrence's loss), only the last T kept.
    np.testing.assert_array_equal(history[4], [16.0, 8.0, 0.125])
    np.testing.assert_array_equal(history[3], [0.25, 0.0, 0.0])
    np.testing.assert_array_equal(history[5], [8.0, 2.0, 0.0])
    assert np.asarray(layer.num_losses)[[3, 4, 5, 6, 7]].tolist() == [1, 4, 2, 1, 0]
    np.testing.assert_array_equal(layer.last_losses(tf.constant([4, 3, 7])).numpy(), [16.0, 0.25, 1.0])
    mean, has = layer.recent_loss_mean(tf.constant([4, 5, 7]))
    np.testing.assert_allclose(mean.numpy(), [(16 + 8 + 0.125) / 3, 5.0, 0.0])
    assert has.numpy().tolist() == [True, True, False]
    layer.reset_stream_state()
    assert np.asarray(layer.counts).sum() == 0 and layer.size_indices().sum() == 0


def test_frequencies_popularity_is_fixed():
    freq = np.arange(V, dtype=np.float64) * 2
    layer = ESAPNEmbedding(V, candidate_dims=DIMS, popularity="frequencies", frequencies=freq)
    layer.build()
    layer.record_losses(tf.constant([1, 2, 2]), tf.constant([0.1, 0.2, 0.3]))
    np.testing.assert_array_equal(np.asarray(layer.counts), freq.astype(np.int64))


# ------------------------------------------------------------------------------------- reward, REINFORCE
def test_reward_is_mean_of_last_t_losses_minus_current_loss():
    layer, *_ = layer_case("none")
    history = np.zeros((V, T), np.float32)
    history[2] = [0.9, 0.6, 0.3]
    history[5] = [0.4, 0.8, 0.0]
    history[8] = [0.7, 0.0, 0.0]
    recorded = np.zeros(V, np.int64)
    recorded[[2, 5, 8]] = [7, 2, 1]  # more than T, fewer, one
    layer.loss_history.assign(history)
    layer.num_losses.assign(recorded)
    ids = np.array([5, 2, 8, 5, 11])  # 11 has no recorded loss
    losses = np.array([0.2, 0.5, 0.1, 0.6, 0.3], np.float32)
    unique, occurrences, reward, has = (t.numpy() for t in rewards(layer, tf.constant(ids), tf.constant(losses)))
    assert unique.tolist() == [5, 2, 8, 11] and occurrences.tolist() == [2, 1, 1, 1]
    np.testing.assert_allclose(reward, [0.6 - 0.4, 0.6 - 0.5, 0.7 - 0.1, 0.0], rtol=1e-6, atol=1e-7)
    assert has.tolist() == [True, True, True, False]


def test_reinforce_loss_gradient_matches_numpy():
    logits = np.array([[0.2, -0.3], [1.1, 0.4], [-0.5, 0.9], [0.0, 0.0]], np.float32)
    actions = np.array([1, 0, 1, 0])
    r = np.array([0.5, -1.5, 2.0, 0.25], np.float32)
    w = np.array([1.0, 2.0, 0.0, 3.0], np.float32)
    x = tf.constant(logits)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = reinforce_loss(x, actions, r, w)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    onehot = np.eye(2)[actions]
    np.testing.assert_allclose(float(loss), float(-(w * r * np.log(p[np.arange(4), actions])).sum()), rtol=1e-5)
    np.testing.assert_allclose(tape.gradient(loss, x).numpy(), (w * r)[:, None] * (p - onehot), rtol=1e-5, atol=1e-7)


def _policy_states():
    return (tf.constant([1, 3, 5, 7, 9, 40]), tf.constant([0, 1, 2, 0, 1, 2]),
            tf.constant([0.3, 1.0, 0.2, 0.7, 0.5, 0.9]))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("action,reward", [(ENLARGE, 1.0), (ENLARGE, -1.0), (0, 1.0), (0, -1.0)])
def test_policy_update_moves_toward_rewarded_actions(action, reward, seed):
    """One REINFORCE step raises the summed log-probability of a rewarded action and lowers a penalised one's.

    (The summed log-probability of the *other* action need not move the opposite way when the step changes the
    states' probabilities unevenly; an earlier form of this test asserted that and failed for some initial
    weights.)"""
    keras.utils.set_random_seed(seed)
    policy = ESAPNPolicy(num_sizes=4, max_popularity=11, popularity_embedding_dim=5, hidden_units=7,
                         use_last_loss=True)
    states = _policy_states()
    optimizer = keras.optimizers.SGD(learning_rate=0.05)

    def log_p_action():
        return float(tf.reduce_sum(tf.nn.log_softmax(policy(states, training=True))[:, action]))

    before = log_p_action()
    with tf.GradientTape() as tape:
        logits = policy(states, training=True)
        loss = reinforce_loss(logits, tf.fill([6], action), tf.fill([6], reward))
    variables = policy.trainable_variables
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    assert np.sign(reward) * (log_p_action() - before) > 1e-4


def test_sample_actions_is_reproducible_and_follows_the_probabilities():
    logits = tf.constant(np.log([[0.9, 0.1]] * 4000 + [[0.2, 0.8]] * 4000).astype(np.float32))
    a = sample_actions(logits, tf.constant([3, 11], tf.int64)).numpy()
    np.testing.assert_array_equal(a, sample_actions(logits, tf.constant([3, 11], tf.int64)).numpy())
    assert abs(a[:4000].mean() - 0.1) < 0.03 and abs(a[4000:].mean() - 0.8) < 0.03
    assert not np.array_equal(a, sample_actions(logits, tf.constant([3, 12], tf.int64)).numpy())


def test_policy_config_round_trip_and_one_hot_popularity():
    policy = ESAPNPolicy(num_sizes=4, popularity_encoding="log2", max_popularity=100, popularity_embedding_dim=0,
                         hidden_units=11, use_last_loss=True, name="user_id_policy")
    logits = policy(_policy_states())
    assert logits.shape == (6, 2) and logits.dtype == tf.float32
    assert policy.popularity_kernel.shape == (7, 11)  # one row per doubling up to 100: buckets 0..6
    clone = ESAPNPolicy.from_config(policy.get_config())
    assert clone.get_config() == policy.get_config()
    with pytest.raises(ValueError, match="popularity_encoding"):
        ESAPNPolicy(num_sizes=4, popularity_encoding="sqrt")


# ------------------------------------------------------------------------------------------------ export
ALLOWED_OPS = {"Placeholder", "Identity", "NoOp", "Const", "Cast", "Reshape", "Shape", "StridedSlice", "Pack",
               "ConcatV2", "GatherV2", "ResourceGather", "ReadVariableOp", "UpperBound", "Sub", "DynamicPartition",
               "Range", "MatMul", "AddV2", "InvertPermutation", "Mul", "Tanh", "Unpack", "AssertGreaterEqual",
               "GreaterEqual", "Less", "All", "Assert", "LessEqual", "Fill", "Size", "If", "StatelessIf"}


@pytest.mark.parametrize("normalization", ["none", "batch_norm_tanh"])
def test_compact_matches_inference_and_stores_each_id_once(normalization):
    sizes = np.where(np.arange(V) % 3 == 0, 3, 1)  # sizes 1 and 3 used: stage 2 has no rows, size 0 is not stored
    layer, tables, kernels, biases, norm = layer_case(normalization, sizes=sizes)
    compact = layer.compact()
    assert isinstance(compact, ESAPNCompactEmbedding) and not compact.trainable_weights
    ids = np.arange(V)
    expected = np_lift(tables, kernels, biases, sizes, ids)
    if norm is not None:
        expected = np_normalize(expected, norm)
    np.testing.assert_allclose(compact(tf.constant(ids)).numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(compact(tf.constant(ids)).numpy(), layer(tf.constant(ids), training=False).numpy(),
                               atol=1e-6)
    # Sizes by hand: 8 ids at 7 dims, 15 at 3; links 3->5 and 5->7; the folded batch norm's scale and shift.
    high, low = int((sizes == 3).sum()), int((sizes == 1).sum())
    assert (high, low) == (8, 15)
    chain = (3 * 5 + 5) + (5 * 7 + 7)
    expected_params = high * 7 + low * 3 + chain + (2 * 7 if norm is not None else 0)
    assert layer.parameter_count() == compact.parameter_count() == expected_params
    assert layer.storage_bytes() == compact.storage_bytes() == 4 * expected_params + 4 * V
    np.testing.assert_array_equal(compact.dims_per_id(), np.asarray(DIMS)[sizes])
    assert compact.dims == [3, 5, 7] and compact.rows == [15, 0, 8]
    assert [tuple(t.shape) for t in compact.tables] == [(15, 3), (8, 7)]
    assert layer.transform_parameter_count() == chain + (2 * 7 if norm is not None else 0)
    assert layer.search_parameter_count() == V * sum(DIMS) + sum(a * b + b for a, b in zip(DIMS, DIMS[1:])) + (
        2 * 7 if norm is not None else 0)
    # The compact layer's own round trips, and stock ops only.
    again = compact.compact()
    np.testing.assert_array_equal(again(tf.constant(ids)).numpy(), compact(tf.constant(ids)).numpy())
    clone = ESAPNCompactEmbedding.from_config(compact.get_config())
    assert clone.get_config() == compact.get_config()
    graph = tf.function(lambda x: compact(x)).get_concrete_function(tf.TensorSpec([None], tf.int64)).graph
    ops = {op.type for op in graph.get_operations()}
    assert ops <= ALLOWED_OPS, ops - ALLOWED_OPS


def test_compact_with_every_id_at_one_size():
    layer, tables, kernels, biases, _ = layer_case("none", sizes=np.full(V, 3))
    compact = layer.compact()
    assert compact.dims == [7] and compact.parameter_count() == V * 7
    np.testing.assert_allclose(compact(tf.constant(IDS)).numpy(), tables[3][IDS], atol=1e-7)


def test_compact_arrays_are_checked():
    with pytest.raises(ValueError, match="permutation"):
        ESAPNCompactEmbedding.from_arrays([np.ones((2, 2), "float32")], [], [], remap=[0, 0])
    with pytest.raises(ValueError, match="sum to vocabulary_size"):
        ESAPNCompactEmbedding(3, 2, dims=[2], rows=[2])


# --------------------------------------------------------------------------------------- contract, config
def test_docstring_examples_run():
    import doctest

    from tfemb import esapn
    from tfemb.layers import esapn_embedding

    for module in (esapn_embedding, esapn):
        result = doctest.testmod(module, extraglobs={"np": np, "tf": tf}, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, (module.__name__, result)


def test_scheme_contract():
    run_scheme_test(ESAPNEmbedding, {"vocabulary_size": V, "candidate_dims": DIMS, "history_length": T},
                    ids=IDS[:11], expected_output_shape=(11, 7), atol=1e-5)


def test_config_round_trip():
    layer = ESAPNEmbedding(V, output_dim=7, candidate_dims=DIMS, history_length=4, normalization="none",
                           popularity="frequencies", frequencies=np.arange(V), batch_norm_momentum=0.5,
                           embeddings_initializer=keras.initializers.RandomUniform(-0.1, 0.1, seed=3),
                           combiner="mean", name="item_id_embedding")
    config = layer.get_config()
    assert config["candidate_dims"] == list(DIMS) and config["history_length"] == 4
    clone = ESAPNEmbedding.from_config(config)
    assert clone.get_config() == config
    assert keras.layers.deserialize(keras.layers.serialize(layer)).get_config() == config


# --------------------------------------------------------------------------------------- save and restore
def _stateful_layer(**kw):
    layer, *_ = layer_case("batch_norm_tanh", **kw)
    layer.record_losses(tf.constant([3, 4, 4, 9]), tf.constant([0.5, 0.25, 2.0, 0.75]))
    layer.enlarge(tf.constant([4, 9]))
    return layer


def _state(layer):
    return [np.asarray(tf.convert_to_tensor(v)) for v in
            (layer.size_index, layer.counts, layer.loss_history, layer.num_losses)]


def test_checkpoint_restores_the_state(tmp_path):
    layer = _stateful_layer()
    path = tf.train.Checkpoint(layer=layer).write(str(tmp_path / "ckpt"))
    fresh = ESAPNEmbedding(V, candidate_dims=DIMS, history_length=T)
    fresh.build()
    tf.train.Checkpoint(layer=fresh).restore(path)
    for a, b in zip(_state(layer), _state(fresh)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fresh(tf.constant(IDS), training=False).numpy(),
                                  layer(tf.constant(IDS), training=False).numpy())


@pytest.mark.parametrize("dims,t,words", [
    ((2, 3, 5, 8), T, ["candidate_dims=[2, 3, 5, 8]", "candidate_dims=[2, 3, 5, 7]"]),
    ((2, 3, 7), T, ["candidate_dims=[2, 3, 7]", "Received: candidate_dims=[2, 3, 5, 7]"]),
    ((2, 3, 5, 7, 9), T, ["candidate_dims=[2, 3, 5, 7, 9]"]),
    (DIMS, 4, ["history_length=4", "Received: history_length=3"]),
])
def test_checkpoint_from_another_candidate_set_is_a_clear_error(tmp_path, dims, t, words):
    path = tf.train.Checkpoint(layer=_stateful_layer()).write(str(tmp_path / "ckpt"))
    other = ESAPNEmbedding(V, candidate_dims=dims, history_length=t)
    other.build()
    with pytest.raises(ValueError) as error:
        tf.train.Checkpoint(layer=other).restore(path)
    assert all(w in str(error.value) for w in words), str(error.value)


def _tiny_cf(task="binary", rows=600, dims=(2, 3, 5, 8), seed=0, **layer_kw):
    from tfemb.data.synthetic import make_synthetic_cf, synthetic_cf_schema
    from tfemb.models import CFNetwork
    from tfemb.tasks import compile_model

    df, _ = make_synthetic_cf(num_users=40, num_items=30, num_rows=rows, seed=seed, task=task)
    schema = synthetic_cf_schema(df, task=task)
    schema.fit(df)
    x, y = schema.transform(df)

    def make(name, vocabulary_size, frequencies):
        return ESAPNEmbedding(vocabulary_size, candidate_dims=dims, name=f"{name}_embedding", **layer_kw)

    model = CFNetwork(schema, embeddings={"user_id": make, "item_id": make}, embedding_dim=dims[-1],
                      hidden_units=(16,))
    compile_model(model)
    return model, schema, x, y


def _batch(x, y, start, size):
    return {k: tf.constant(v[start:start + size]) for k, v in x.items()}, tf.constant(y[start:start + size])


@pytest.fixture(scope="module")
def streamed():
    """A tiny CF model after one ``stream_fit`` pass (600 rows, batches of 50, test period from row 300)."""
    model, _, x, y = _tiny_cf()
    search = ESAPNSearch(model, popularity_embedding_dim=3, policy_units=5)
    search.compile(optimizer=keras.optimizers.Adam(1e-2))
    return model, x, y, stream_fit(search, x, y, batch_size=50, evaluate_from=0.5)


def test_keras_file_keeps_the_state_and_refuses_another_candidate_set(tmp_path, streamed):
    model, x, y, _ = streamed
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    for name in ("user_id", "item_id"):
        for a, b in zip(_state(model.embedding_layers[name]), _state(loaded.embedding_layers[name])):
            np.testing.assert_array_equal(a, b)
    assert np.asarray(model.embedding_layers["user_id"].counts).sum() == 600
    xq = {k: tf.constant(v[:40]) for k, v in x.items()}
    np.testing.assert_allclose(loaded(xq, training=False).numpy(), model(xq, training=False).numpy(), atol=1e-6)
    # Weights of this model into one built with other candidate sizes.
    weights = str(tmp_path / "model.weights.h5")
    model.save_weights(weights)
    other, *_ = _tiny_cf(dims=(2, 4, 8))
    other.build()
    with pytest.raises(ValueError) as error:
        other.load_weights(weights)
    assert "candidate_dims=[2, 3, 5, 8]" in str(error.value) and "candidate_dims=[2, 4, 8]" in str(error.value)


# ---------------------------------------------------------------------------------------------- procedure
def test_policy_step_skips_ids_without_a_choice():
    model, _, x, y = _tiny_cf()
    search = ESAPNSearch(model, popularity_embedding_dim=3, policy_units=5)
    search.compile(optimizer="sgd", policy_optimizer=keras.optimizers.SGD(learning_rate=0.1))
    search._build_optimizers()
    xb, yb = _batch(x, y, 0, 40)
    layers = esapn_layers(search)
    for name, layer in layers.items():  # every id of the batch has a history
        layer.record_losses(xb[name], tf.fill([40], 0.7))
    weights = [np.asarray(v) for v in search.policy_variables()]
    for layer in layers.values():
        layer.size_index.assign(np.full(layer.vocabulary_size, len(layer.candidate_dims) - 1, np.int64))
    loss, stats = search.policy_step(xb, yb)
    assert float(loss) == 0.0 and int(search.policy_updates.numpy()) == 1
    assert all(np.array_equal(w, np.asarray(v)) for w, v in zip(weights, search.policy_variables()))
    for layer in layers.values():
        layer.size_index.assign(np.zeros(layer.vocabulary_size, np.int64))
    loss, stats = search.policy_step(xb, yb)
    assert float(loss) != 0.0
    assert any(not np.array_equal(w, np.asarray(v)) for w, v in zip(weights, search.policy_variables()))
    assert all(np.isfinite(float(r)) and 0.0 <= float(q) <= 1.0 for r, q in stats.values())


def test_stream_sizes_only_grow_and_state_is_recorded():
    model, _, x, y = _tiny_cf()
    search = ESAPNSearch(model, popularity_embedding_dim=3, policy_units=5, seed=4)
    search.compile(optimizer=keras.optimizers.Adam(1e-2))
    layers = esapn_layers(search)
    snapshots = [{n: l.size_indices() for n, l in layers.items()}]
    for t in range(6):
        previous = _batch(x, y, 50 * (t - 1), 50) if t else ()
        _, losses, enlarged, stats = search.stream_step(*_batch(x, y, 50 * t, 50), *previous)
        now = {n: l.size_indices() for n, l in layers.items()}
        for name in layers:
            step = now[name] - snapshots[-1][name]
            assert np.all(step >= 0) and np.all(step <= 1) and int(enlarged[name]) == int(step.sum())
            assert now[name].max() <= len(layers[name].candidate_dims) - 1
        snapshots.append(now)
        assert bool(stats) == (t > 0)
    assert int(search.policy_updates.numpy()) == 5
    user = layers["user_id"]
    seen = np.bincount(x["user_id"][:300], minlength=user.vocabulary_size)
    np.testing.assert_array_equal(np.asarray(user.counts), seen)
    assert np.all(np.asarray(user.num_losses)[seen > 0] >= 1)


def test_stream_step_is_traced_once_for_a_partial_last_batch():
    """A stream whose last batch is short (130 rows in batches of 50) traces the policy + model step once, with the
    batch dimension open (tracing it again for the last batch took 4.6 s of a 17 s MovieLens stream)."""
    model, _, x, y = _tiny_cf(rows=130)
    search = ESAPNSearch(model, popularity_embedding_dim=3, policy_units=5)
    search.compile(optimizer=keras.optimizers.Adam(1e-2))
    result = stream_fit(search, x, y, batch_size=50)
    assert [b["size"] for b in result["batches"]] == [50, 50, 30]
    assert search._stream_functions[True].experimental_get_tracing_count() == 1
    assert search._stream_functions[False].experimental_get_tracing_count() == 1


def test_stream_fit_reports_under_this_keras(streamed):
    model, x, y, result = streamed
    assert len(result["batches"]) == 12 and result["test"]["rows"] == 300 and result["evaluate_from"] == 300
    for key in ("loss", "accuracy", "mse", "logloss"):
        assert np.isfinite(result["all"][key]) and np.isfinite(result["test"][key])
    assert result["examples_per_second"] > 0 and result["cpu_ms_per_example"] > 0
    assert "policy" not in result["batches"][0] and set(result["batches"][1]["policy"]) == {"user_id", "item_id"}
    memory = result["memory"]
    for name in ("user_id", "item_id"):
        layer = model.embedding_layers[name]
        row = memory[name]
        dims = layer.dims_per_id()
        assert row["ids"] == layer.vocabulary_size and sum(row["ids_per_dim"].values()) == layer.vocabulary_size
        assert row["total_dims"] == dims.sum() and row["fixed_dims"] == layer.vocabulary_size * 8
        assert row["ratio"] == pytest.approx(dims.sum() / (layer.vocabulary_size * 8))
        assert row["parameters"] == layer.parameter_count()
        buckets = result["by_frequency"][name]
        assert sum(b["rows"] for b in buckets) == 300
        assert [b["min"] for b in buckets] == sorted(b["min"] for b in buckets)
        assert all(2 <= b["mean_dim"] <= 8 for b in buckets)
    assert "| user_id |" in memory_table(memory)
    seen = memory_report(model, seen_only=True)["user_id"]
    assert seen["ids"] == len(np.unique(x["user_id"]))


def test_fixed_baseline_streams_through_the_same_loop():
    from tfemb.data.synthetic import make_synthetic_cf, synthetic_cf_schema
    from tfemb.models import CFNetwork
    from tfemb.tasks import compile_model

    df, _ = make_synthetic_cf(num_users=40, num_items=30, num_rows=300, seed=1, task="multiclass")
    schema = synthetic_cf_schema(df, task="multiclass")
    schema.fit(df)
    x, y = schema.transform(df)
    model = compile_model(CFNetwork(schema, embedding_dim=8, hidden_units=(16,)))
    result = stream_fit(model, x, y, batch_size=60)
    assert result["memory"] == {} and np.isfinite(result["all"]["cross_entropy"])
    assert sum(b["rows"] for b in result["by_frequency"]["item_id"]) == 300
    assert "mean_dim" not in result["by_frequency"]["item_id"][0]


def test_fit_alternates_policy_and_model_steps():
    model, _, x, y = _tiny_cf(rows=250)
    search = ESAPNSearch(model, popularity_embedding_dim=3, policy_units=5, policy_update_every=2)
    search.compile(optimizer=keras.optimizers.Adam(1e-2))
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(50)
    history = search.fit(dataset, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    assert int(search.policy_updates.numpy()) == 2  # batches 2 and 4 (batch 0 has no previous batch)
    assert np.asarray(model.embedding_layers["item_id"].counts).sum() == 250
    with pytest.raises(TypeError, match="tf.data.Dataset"):
        search.fit(x, y)


def test_stream_batch_takes_the_policy_step_every_k_batches():
    """``stream_batch`` (``stream_fit``'s step, and the streaming benchmark's): the policy step on the previous
    batch at batches 2 and 4 of 5 with ``policy_update_every=2`` (batch 0 has no previous batch)."""
    model, _, x, y = _tiny_cf(rows=250)
    search = ESAPNSearch(model, popularity_embedding_dim=3, policy_units=5, policy_update_every=2)
    search.compile(optimizer=keras.optimizers.Adam(1e-2))
    previous = None
    for t in range(5):
        batch = _batch(x, y, 50 * t, 50)
        y_pred, losses, enlarged, stats = search.stream_batch(t, *batch, previous=previous)
        assert y_pred.shape[0] == 50 and losses.shape == (50,)
        assert bool(stats) == (t in (2, 4)), t
        previous = batch
    assert int(search.policy_updates.numpy()) == 2


def test_frequency_report_buckets():
    report = frequency_report({"user_id": np.array([3, 3, 5, 3, 3, 3, 5])}, y=np.array([1, 0, 1, 1, 0, 1, 1]),
                              y_pred=np.array([0.9, 0.2, 0.4, 0.6, 0.7, 0.8, 0.6]),
                              losses=np.arange(7, dtype=float), task="binary")
    rows = report["user_id"]
    # running counts: 3 -> 1, 2, 3, 4, 5; 5 -> 1, 2
    assert [(r["frequency"], r["rows"]) for r in rows] == [("1", 2), ("2-3", 3), ("4-7", 2)]
    assert rows[0]["loss"] == pytest.approx((0 + 2) / 2) and rows[2]["accuracy"] == pytest.approx(0.5)
    later = frequency_report({"user_id": np.array([3, 5])}, y=np.array([1, 1]), y_pred=np.array([0.9, 0.1]),
                             losses=np.array([0.5, 1.5]), task="binary", history={"user_id": np.array([3, 3, 3, 9])})
    assert [(r["frequency"], r["rows"], r["accuracy"]) for r in later["user_id"]] == [("1", 1, 0.0), ("4-7", 1, 1.0)]
    explicit = FrequencyReport(edges=[1, 3])
    explicit.add(np.array([1, 2, 3, 9]), {"loss": np.array([1.0, 2.0, 3.0, 5.0])})
    assert [(r["frequency"], r["rows"], r["loss"]) for r in explicit.result()] == [("1-2", 2, 1.5), ("3+", 2, 4.0)]


def test_export_matches_the_keras_model(tmp_path, streamed):
    from tfemb.export import check_ops, export_saved_model, load_export

    model, x, _, _ = streamed
    assert len(set(model.embedding_layers["user_id"].dims_per_id().tolist())) > 1  # several sizes exported
    path = export_saved_model(model, str(tmp_path / "esapn"))
    check_ops(path)
    loaded = load_export(path)
    xq = {k: v[:64] for k, v in x.items()}
    expected = model({k: tf.constant(v) for k, v in xq.items()}, training=False).numpy()
    np.testing.assert_allclose(loaded.predict_encoded(xq)["probability"], expected, atol=1e-5)
    for row in loaded.report["features"]:
        assert row["parameters"] == model.embedding_layers[row["feature"]].parameter_count()


# --------------------------------------------------------------------------------------------- distribute
_DISTRIBUTE_SCRIPT = textwrap.dedent("""
    import os
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from tfemb._keras import keras
    from tfemb.data.synthetic import make_synthetic_cf, synthetic_cf_schema
    from tfemb.esapn import ESAPNSearch
    from tfemb.layers.esapn_embedding import ESAPNEmbedding
    from tfemb.models import CFNetwork

    df, _ = make_synthetic_cf(num_users=40, num_items=30, num_rows=200, seed=0)
    schema = synthetic_cf_schema(df)
    schema.fit(df)
    x, y = schema.transform(df)
    strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")[:2]])
    with strategy.scope():
        make = lambda name, v, f: ESAPNEmbedding(v, candidate_dims=(2, 3, 5, 8), name=name + "_embedding")
        model = CFNetwork(schema, embeddings={"user_id": make, "item_id": make}, embedding_dim=8, hidden_units=(16,))
        search = ESAPNSearch(model, popularity_embedding_dim=3, policy_units=5)
        search.compile(optimizer=keras.optimizers.Adam(1e-2), metrics=[])
    history = search.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(40), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1]), history.history
    layer = model.embedding_layers["user_id"]

    def replicas(variable):  # the per-device copies (Keras 3 variables wrap the distributed tf.Variable)
        inner = getattr(variable, "value", None)
        return [np.asarray(v) for v in (inner if isinstance(inner, tf.Variable) else variable).values]

    copies = replicas(layer.size_index)
    assert len(copies) == 2 and np.array_equal(copies[0], copies[1]), copies
    counts = replicas(layer.counts)
    assert np.array_equal(counts[0], counts[1]) and counts[0].sum() == 200, counts
    assert int(np.asarray(search.policy_updates)) == 4 and copies[0].sum() > 0
    for table in layer.tables:  # enlargements wrote the same rows on both replicas
        values = replicas(table)
        assert np.allclose(values[0], values[1], atol=1e-6)
    print("OK")
""")


def test_search_trains_under_mirrored_strategy():
    # A process of its own: a second MirroredStrategy in one process clashes with the first's collectives
    # (tests/test_layers_distribute.py).
    result = subprocess.run([sys.executable, "-c", _DISTRIBUTE_SCRIPT], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]
