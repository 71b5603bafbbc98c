"""Baseline schemes (fixed, hashing, QR, double hashing) against NumPy references, plus the contract checks.

Sizes are tiny and all different (vocabulary 23, dims 7 / 11 / 6, 5 buckets, 4 hot ids) so a swapped axis or
table shows. Nothing here creates a tensor at import time: tests/test_layers_distribute.py, collected after this
file in the same process, must still be able to split the CPU into logical devices.
"""

import json
import math

import numpy as np
import pytest
import tensorflow as tf

from tfemb.layers import (
    SCHEMES,
    DoubleHashingEmbedding,
    EmbeddingScheme,
    FixedEmbedding,
    HashingEmbedding,
    QREmbedding,
    get_scheme_class,
    scheme_factory,
    universal_hash_np,
    universal_hash_params,
    universal_hash_tf,
)
from tfemb.layers.factory import double_hashing_sizes, hashing_buckets, qr_buckets
from tfemb.testing import run_scheme_test

V = 23  # vocabulary
HOT = 4
BUCKETS = 5
SEED = 3
P = 2**31 - 1

# Single ids (every id once, shuffled) and padded multi-hot lists (a fully padded row included).
IDS = np.array([0, 22, 5, 1, 17, 3, 9, 11, 2, 20, 4, 13, 7, 21, 6, 16, 8, 19, 10, 15, 12, 18, 14])
MULTI = np.array([[0, 5, -1, -1], [22, 7, 13, 1], [3, -1, -1, -1], [-1, -1, -1, -1], [4, 4, 19, 2]])
# Counts whose top-4 ids are 12, 5, then 9 and 17 (a tie at 40, broken by the lower id); id 0 ranks 5th.
FREQS = np.full(V, 3.0)
FREQS[[12, 5, 17, 9, 0]] = [100.0, 50.0, 40.0, 40.0, 30.0]
FREQ_HOT = np.array([12, 5, 9, 17])  # descending count, tie 40/40 -> lower id 9 before 17
SORTED_FREQS = np.arange(V, 0, -1).astype(float)  # already descending: no remap


def _values(rows, cols, offset=0.0):
    """Distinct, recognisable table values: entry (r, c) = offset + r + c/100."""
    return (offset + np.arange(rows)[:, None] + np.arange(cols)[None, :] / 100.0).astype(np.float32)


def _build(layer, assignments):
    layer.build()
    for name, value in assignments.items():
        getattr(layer, name).assign(value)
    return layer


# ---------------------------------------------------------------------------------------------- reference builders
def fixed_case(**kw):
    table = _values(V, 7)
    layer = _build(FixedEmbedding(V, 7, **kw), {"embeddings": table})
    return layer, lambda ids: table[ids]


def hashing_case(**kw):
    table = _values(BUCKETS, 11, offset=0.5)
    layer = _build(HashingEmbedding(V, 11, BUCKETS, seed=SEED, **kw), {"embeddings": table})
    a, b = universal_hash_params(SEED, 1)
    return layer, lambda ids: table[universal_hash_np(ids, a[0], b[0], BUCKETS)]


def qr_case(operation, dim=6, **kw):
    layer = QREmbedding(V, dim, BUCKETS, operation=operation, **kw)
    dq, dr = (dim // 2, dim - dim // 2) if operation == "concat" else (dim, dim)
    q = _values(math.ceil(V / BUCKETS), dq, offset=1.0)  # 5 quotient rows
    r = _values(BUCKETS, dr, offset=-2.0)
    _build(layer, {"quotient_embeddings": q, "remainder_embeddings": r})

    def reference(ids):
        qv, rv = q[ids // BUCKETS], r[ids % BUCKETS]
        return {"mult": lambda: qv * rv, "add": lambda: qv + rv, "concat": lambda: np.concatenate([qv, rv], -1)}[
            operation]()

    return layer, reference


def double_hashing_case(combine, frequencies=None, **kw):
    dim = 6
    shared_dim = dim // 2 if combine == "concat" else dim
    layer = DoubleHashingEmbedding(V, dim, HOT, BUCKETS, combine=combine, seed=SEED, frequencies=frequencies, **kw)
    hot = _values(HOT, dim, offset=100.0)
    shared = _values(BUCKETS, shared_dim, offset=-7.0)
    _build(layer, {"hot_embeddings": hot, "shared_embeddings": shared})
    a, b = universal_hash_params(SEED, 2)
    hot_ids = np.arange(HOT) if frequencies is None else np.argsort(-np.asarray(frequencies), kind="stable")[:HOT]
    row_of = {int(i): r for r, i in enumerate(hot_ids)}

    def reference(ids):
        out = []
        for i in ids.reshape(-1):
            if int(i) in row_of:
                out.append(hot[row_of[int(i)]])
                continue
            e1 = shared[universal_hash_np(i, a[0], b[0], BUCKETS)]
            e2 = shared[universal_hash_np(i, a[1], b[1], BUCKETS)]
            out.append(e1 + e2 if combine == "sum" else np.concatenate([e1, e2]))
        return np.stack(out).reshape(ids.shape + (dim,))

    return layer, reference


CASES = {
    "fixed": fixed_case,
    "hashing": hashing_case,
    "qr_mult": lambda **kw: qr_case("mult", **kw),
    "qr_add": lambda **kw: qr_case("add", **kw),
    "qr_concat": lambda **kw: qr_case("concat", dim=7, **kw),
    "dh_sum": lambda **kw: double_hashing_case("sum", **kw),
    "dh_concat": lambda **kw: double_hashing_case("concat", **kw),
    "dh_sum_freq": lambda **kw: double_hashing_case("sum", frequencies=FREQS, **kw),
    "dh_concat_freq": lambda **kw: double_hashing_case("concat", frequencies=FREQS, **kw),
}


# ------------------------------------------------------------------------------------------------------- hashing
def test_universal_hash_matches_the_formula_and_tf():
    a, b = universal_hash_params(SEED, 3)
    assert a.shape == b.shape == (3,) and a.dtype == np.int64
    assert np.all((a >= 1) & (a < P)) and np.all((b >= 0) & (b < P))
    np.testing.assert_array_equal(universal_hash_params(SEED, 3)[0], a)  # deterministic
    assert not np.array_equal(universal_hash_params(SEED + 1, 3)[0], a)
    ids = np.array([0, 1, 2, 22, 12345, 2**31 - 2])
    for ai, bi in zip(a, b):
        python = [((int(ai) * int(x) + int(bi)) % P) % 7 for x in ids]  # exact big-int arithmetic
        np.testing.assert_array_equal(universal_hash_np(ids, ai, bi, 7), python)
        np.testing.assert_array_equal(universal_hash_tf(tf.constant(ids), ai, bi, 7).numpy(), python)
    # Several pairs at once: a last axis of hashes, each column the single hash of its pair.
    many = universal_hash_tf(tf.constant(ids.reshape(2, 3)), a, b, 7).numpy()
    assert many.shape == (2, 3, 3)
    for j, (ai, bi) in enumerate(zip(a, b)):
        np.testing.assert_array_equal(many[..., j], universal_hash_np(ids, ai, bi, 7).reshape(2, 3))


def test_universal_hash_spreads_ids_over_buckets():
    a, b = universal_hash_params(0, 1)
    counts = np.bincount(universal_hash_np(np.arange(10_000), a[0], b[0], 10), minlength=10)
    assert counts.min() > 800 and counts.max() < 1200, counts


# ------------------------------------------------------------------------------------------- NumPy references
@pytest.mark.parametrize("case", sorted(CASES))
def test_single_ids_match_numpy(case):
    layer, reference = CASES[case]()
    np.testing.assert_allclose(layer(tf.constant(IDS)).numpy(), reference(IDS), rtol=1e-6)
    ids_2d = IDS[:20].reshape(4, 5)  # no combiner: [batch, k] -> [batch, k, dim]
    np.testing.assert_allclose(layer(tf.constant(ids_2d)).numpy(), reference(ids_2d), rtol=1e-6)


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_multi_hot_pooling_matches_numpy(case, combiner):
    layer, reference = CASES[case](combiner=combiner)
    mask = MULTI != -1
    vectors = reference(np.where(mask, MULTI, 0)) * mask[..., None]
    total = vectors.sum(axis=1)
    count = mask.sum(axis=1, keepdims=True).astype(np.float32)
    norm = {"sum": np.ones_like(count), "mean": count, "sqrtn": np.sqrt(count)}[combiner]
    expected = np.divide(total, norm, out=np.zeros_like(total), where=norm > 0)  # empty row -> zeros
    np.testing.assert_allclose(layer(tf.constant(MULTI)).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_double_hashing_hot_set():
    assert DoubleHashingEmbedding(V, 6, HOT, BUCKETS, frequencies=FREQS).hot_ids().tolist() == FREQ_HOT.tolist()
    assert DoubleHashingEmbedding(V, 6, HOT, BUCKETS).hot_ids().tolist() == [0, 1, 2, 3]
    # Counts already in descending order: hot ids are 0..3 and no remap is stored.
    layer = DoubleHashingEmbedding(V, 6, HOT, BUCKETS, frequencies=SORTED_FREQS)
    layer.build()
    assert layer.hot_rows is None and [w.name.split("/")[-1].split(":")[0] for w in layer.weights] == [
        "hot_embeddings", "shared_embeddings"]
    remapped = DoubleHashingEmbedding(V, 6, HOT, BUCKETS, frequencies=FREQS)
    remapped.build()
    expected = np.full(V, -1)
    expected[FREQ_HOT] = np.arange(HOT)
    np.testing.assert_array_equal(np.asarray(remapped.hot_rows.numpy()), expected)
    assert all(w is not remapped.hot_rows for w in remapped.trainable_weights)


def test_double_hashing_without_hot_ids_and_all_hot():
    cold = DoubleHashingEmbedding(V, 6, 0, BUCKETS, seed=SEED)
    shared = _values(BUCKETS, 6)
    _build(cold, {"shared_embeddings": shared})
    a, b = universal_hash_params(SEED, 2)
    expected = shared[universal_hash_np(IDS, a[0], b[0], BUCKETS)] + shared[universal_hash_np(IDS, a[1], b[1], BUCKETS)]
    np.testing.assert_allclose(cold(tf.constant(IDS)).numpy(), expected, rtol=1e-6)
    assert cold.hot_embeddings is None and cold.parameter_count() == 30  # 5 shared rows x 6
    every = DoubleHashingEmbedding(V, 6, V, BUCKETS)
    hot = _values(V, 6)
    _build(every, {"hot_embeddings": hot})
    np.testing.assert_allclose(every(tf.constant(IDS)).numpy(), hot[IDS], rtol=1e-6)


def test_qr_pairs_are_unique():
    layer = QREmbedding(V, 6, BUCKETS)
    pairs = {(i // BUCKETS, i % BUCKETS) for i in range(V)}
    assert len(pairs) == V and layer.num_quotients == 5


def test_qr_default_initialisation_scale():
    s = math.sqrt(1.0 / 10_000)
    mult = QREmbedding(10_000, 8, 100)
    mult.build()
    q, r = mult.quotient_embeddings.numpy(), mult.remainder_embeddings.numpy()
    assert np.all(np.abs(q - 1.0) <= s + 1e-7) and np.all(np.abs(r) <= s + 1e-7)
    vectors = mult(tf.constant(np.arange(10_000))).numpy()
    assert 0.5 * s / math.sqrt(3) < vectors.std() < 1.5 * s / math.sqrt(3)  # a plain U(-s, s) table's scale
    add = QREmbedding(10_000, 8, 100, operation="add")
    add.build()
    assert np.all(np.abs(add.quotient_embeddings.numpy()) <= s + 1e-7)
    assert not np.allclose(add.quotient_embeddings.numpy()[:5, :5], add.remainder_embeddings.numpy()[:5, :5])


def test_two_tables_do_not_share_initial_values():
    # Keras 2 repeats the values of an unseeded initializer instance that is called twice.
    layer = DoubleHashingEmbedding(V, 6, BUCKETS, BUCKETS)
    layer.build()
    assert not np.allclose(layer.hot_embeddings.numpy(), layer.shared_embeddings.numpy())


# ---------------------------------------------------------------------------------------------- size accounting
# Hand counts (float32 = 4 bytes):
#   fixed         23 x 7                                   = 161 params,  644 bytes
#   hashing       5 buckets x 11                           =  55 params,  220 bytes
#   qr mult/add   (ceil(23/5)=5 quotient + 5 rem.) x 6     =  60 params,  240 bytes
#   qr concat 7   5 quotient x 3 + 5 remainder x 4         =  35 params,  140 bytes
#   dh sum        (4 hot + 5 shared) x 6                   =  54 params,  216 bytes
#   dh concat     4 hot x 6 + 5 shared x 3                 =  39 params,  156 bytes
#   dh + remap    params unchanged, + 23 ids x 4 bytes     = 216 + 92 = 308 / 156 + 92 = 248 bytes
SIZES = {
    "fixed": (161, 644, 7),
    "hashing": (55, 220, 11),
    "qr_mult": (60, 240, 6),
    "qr_add": (60, 240, 6),
    "qr_concat": (35, 140, 7),
    "dh_sum": (54, 216, 6),
    "dh_concat": (39, 156, 6),
    "dh_sum_freq": (54, 308, 6),
    "dh_concat_freq": (39, 248, 6),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_size_accounting(case):
    layer, _ = CASES[case]()
    params, nbytes, dim = SIZES[case]
    assert layer.parameter_count() == params
    assert layer.storage_bytes() == nbytes
    dims = layer.dims_per_id()
    assert dims.shape == (V,) and np.all(dims == dim)
    # Table memory is what parameter_count says: no hidden full-size copy.
    floats = [w for w in layer.weights if tf.as_dtype(w.dtype).is_floating]
    assert sum(int(np.prod(w.shape)) for w in floats) == params
    assert sum(int(np.prod(w.shape)) for w in layer.sparse_tables()) == params


def test_storage_bytes_follow_the_variable_dtype():
    assert HashingEmbedding(V, 11, BUCKETS, dtype="float64").storage_bytes() == 55 * 8
    assert DoubleHashingEmbedding(V, 6, HOT, BUCKETS, dtype="float64", frequencies=FREQS).storage_bytes() == (
        54 * 8 + 92)


# ---------------------------------------------------------------------------------------------- contract helper
CONTRACT = [
    (FixedEmbedding, {"vocabulary_size": V, "output_dim": 7}, IDS[:6], (6, 7)),
    (HashingEmbedding, {"vocabulary_size": V, "output_dim": 11, "num_buckets": BUCKETS, "seed": SEED,
                        "combiner": "mean"}, MULTI, (5, 11)),
    (QREmbedding, {"vocabulary_size": V, "output_dim": 6, "num_buckets": BUCKETS}, IDS[:6], (6, 6)),
    (QREmbedding, {"vocabulary_size": V, "output_dim": 6, "num_buckets": BUCKETS, "operation": "add"},
     IDS[:6].reshape(3, 2), (3, 2, 6)),
    (QREmbedding, {"vocabulary_size": V, "output_dim": 7, "num_buckets": BUCKETS, "operation": "concat",
                   "combiner": "sqrtn"}, MULTI, (5, 7)),
    (DoubleHashingEmbedding, {"vocabulary_size": V, "output_dim": 6, "num_hot": HOT, "num_buckets": BUCKETS},
     IDS[:6], (6, 6)),
    (DoubleHashingEmbedding, {"vocabulary_size": V, "output_dim": 6, "num_hot": HOT, "num_buckets": BUCKETS,
                              "combine": "concat", "frequencies": FREQS.tolist(), "combiner": "sum"}, MULTI, (5, 6)),
]


@pytest.mark.parametrize("layer_cls,kwargs,ids,shape", CONTRACT, ids=lambda v: getattr(v, "__name__", None))
def test_run_scheme_test(layer_cls, kwargs, ids, shape):
    trained = run_scheme_test(layer_cls, kwargs, ids, shape)
    assert isinstance(trained, EmbeddingScheme)


def test_compact_keeps_the_hot_remap():
    layer, reference = double_hashing_case("concat", frequencies=FREQS)
    compact = layer.compact()
    np.testing.assert_allclose(compact(tf.constant(IDS)).numpy(), reference(IDS), rtol=1e-6)
    assert compact.storage_bytes() == layer.storage_bytes() and not compact.trainable_weights


@pytest.mark.parametrize("combine", ["sum", "concat"])
@pytest.mark.parametrize("frequencies", [None, "remap", "sorted"])
def test_double_hashing_index_compact_matches_the_layer(combine, frequencies, tmp_path):
    """compact_lookup="index": one stacked table and a stored pair of rows per id; the same vectors, bit for bit
    on these values, for every id, hot (remapped or a range) or cold, single ids and pooled multi-hot lists."""
    freqs = {None: None, "remap": FREQS, "sorted": SORTED_FREQS}[frequencies]
    layer, reference = double_hashing_case(combine, frequencies=freqs, compact_lookup="index")
    compact = layer.compact()
    assert type(compact).__name__ == "IndexedRowsEmbedding" and not compact.trainable_weights
    np.testing.assert_array_equal(compact(tf.constant(IDS)).numpy(), layer(tf.constant(IDS)).numpy())
    np.testing.assert_allclose(compact(tf.constant(IDS)).numpy(), reference(IDS), rtol=1e-6)
    np.testing.assert_array_equal(compact(tf.constant(IDS.reshape(23, 1))).numpy(),
                                  layer(tf.constant(IDS.reshape(23, 1))).numpy())
    # Sizes: the same parameters; the table holds the hot and shared rows (+ one zero row for "sum"), the index
    # two int16 per id.
    assert compact.parameter_count() == layer.parameter_count() == HOT * 6 + BUCKETS * (6 if combine == "sum" else 3)
    rows = HOT + BUCKETS + 1 if combine == "sum" else 2 * HOT + BUCKETS
    width = 6 if combine == "sum" else 3
    assert compact.storage_bytes() == rows * width * 4 + V * 2 * 2
    assert {w.name.split("/")[-1].split(":")[0]: tuple(w.shape) for w in compact.weights} == {
        "table": (rows, width), "row_index": (V, 2)}
    assert tf.as_dtype(compact.row_index.dtype).name == "int16"
    np.testing.assert_array_equal(compact.dims_per_id(), np.full(V, 6))
    # Config round trip (the option travels with the layer) and a frozen reload.
    again = DoubleHashingEmbedding.from_config(layer.get_config())
    assert again.compact_lookup == "index"
    copy = type(compact).from_config(compact.get_config())
    copy.build()
    copy.set_weights(compact.get_weights())
    np.testing.assert_array_equal(copy(tf.constant(IDS)).numpy(), compact(tf.constant(IDS)).numpy())
    # With a combiner, as the layer.
    pooled = DoubleHashingEmbedding.from_config({**layer.get_config(), "combiner": "mean"})
    pooled.build()
    pooled.set_weights(layer.get_weights())
    np.testing.assert_allclose(pooled.compact()(tf.constant(MULTI)).numpy(), pooled(tf.constant(MULTI)).numpy(),
                               rtol=1e-6)


def test_indexed_rows_bad_input():
    from tfemb.layers import IndexedRowsEmbedding

    with pytest.raises(ValueError, match=r"compact_lookup must be one of \('hash', 'index'\). Received: "
                                         r"compact_lookup='fast'"):
        DoubleHashingEmbedding(V, 6, HOT, BUCKETS, compact_lookup="fast")
    with pytest.raises(ValueError, match=r"rows must index table rows 0..2. Received: values in \[0, 3\]"):
        IndexedRowsEmbedding.from_arrays(np.zeros((3, 4), np.float32), [[0, 3], [1, 2]])
    with pytest.raises(ValueError, match=r"rows \[vocabulary_size, 2\]. Received: shapes \(3, 4\) and \(2, 3\)"):
        IndexedRowsEmbedding.from_arrays(np.zeros((3, 4), np.float32), [[0, 1, 2], [1, 2, 0]])
    with pytest.raises(ValueError, match="inference-only. Received: trainable=True"):
        IndexedRowsEmbedding(5, 4, 3, trainable=True)
    layer = IndexedRowsEmbedding.from_arrays(np.zeros((3, 4), np.float32), [[0, 1], [1, 2]])
    with pytest.raises(tf.errors.InvalidArgumentError, match="ids must be < vocabulary_size=2"):
        layer(tf.constant([0, 2]))


# --------------------------------------------------------------------------------------------------- bad input
BAD_ARGS = [
    (FixedEmbedding, {"vocabulary_size": 0, "output_dim": 7}, r"vocabulary_size=0"),
    (HashingEmbedding, {"vocabulary_size": -4, "output_dim": 7, "num_buckets": 5}, r"vocabulary_size=-4"),
    (QREmbedding, {"vocabulary_size": 23, "output_dim": -3, "num_buckets": 5}, r"output_dim=-3"),
    (DoubleHashingEmbedding, {"vocabulary_size": 23, "output_dim": 0, "num_hot": 4, "num_buckets": 5},
     r"output_dim=0"),
    (HashingEmbedding, {"vocabulary_size": 23, "output_dim": 7, "num_buckets": 0}, r"num_buckets=0"),
    (QREmbedding, {"vocabulary_size": 23, "output_dim": 7, "num_buckets": 0}, r"num_buckets=0"),
    (DoubleHashingEmbedding, {"vocabulary_size": 23, "output_dim": 6, "num_hot": 4, "num_buckets": 0},
     r"num_buckets=0"),
    (HashingEmbedding, {"vocabulary_size": 23, "output_dim": 7, "num_buckets": 2.5}, r"num_buckets=2.5"),
    (HashingEmbedding, {"vocabulary_size": 2**31, "output_dim": 7, "num_buckets": 5}, r"vocabulary_size=2147483648"),
    (HashingEmbedding, {"vocabulary_size": 23, "output_dim": 7, "num_buckets": 5, "seed": -1}, r"seed=-1"),
    (QREmbedding, {"vocabulary_size": 23, "output_dim": 7, "num_buckets": 5, "operation": "div"},
     r"operation='div'"),
    (QREmbedding, {"vocabulary_size": 23, "output_dim": 1, "num_buckets": 5, "operation": "concat"},
     r"output_dim=1"),
    (DoubleHashingEmbedding, {"vocabulary_size": 23, "output_dim": 6, "num_hot": 4, "num_buckets": 5,
                              "combine": "max"}, r"combine='max'"),
    (DoubleHashingEmbedding, {"vocabulary_size": 23, "output_dim": 7, "num_hot": 4, "num_buckets": 5,
                              "combine": "concat"}, r"output_dim=7"),
    (DoubleHashingEmbedding, {"vocabulary_size": 23, "output_dim": 6, "num_hot": 30, "num_buckets": 5},
     r"num_hot=30"),
    (DoubleHashingEmbedding, {"vocabulary_size": 23, "output_dim": 6, "num_hot": -1, "num_buckets": 5},
     r"num_hot=-1"),
    (DoubleHashingEmbedding, {"vocabulary_size": 23, "output_dim": 6, "num_hot": 4, "num_buckets": 5,
                              "frequencies": [1.0] * 22}, r"frequencies.*Received: shape \(22,\)"),
    (DoubleHashingEmbedding, {"vocabulary_size": 23, "output_dim": 6, "num_hot": 4, "num_buckets": 5,
                              "frequencies": [1.0] * 22 + [-2.0]}, r"frequencies.*Received: a count of -2"),
    (FixedEmbedding, {"vocabulary_size": 23, "output_dim": 7, "combiner": "max"}, r"combiner='max'"),
]


@pytest.mark.parametrize("layer_cls,kwargs,message", BAD_ARGS)
def test_bad_arguments_name_the_field_and_value(layer_cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        layer_cls(**kwargs)


LAYERS = {
    "fixed": lambda **kw: FixedEmbedding(V, 7, **kw),
    "hashing": lambda **kw: HashingEmbedding(V, 7, BUCKETS, **kw),
    "qr": lambda **kw: QREmbedding(V, 7, BUCKETS, **kw),
    "double_hashing": lambda **kw: DoubleHashingEmbedding(V, 6, HOT, BUCKETS, frequencies=FREQS, **kw),
}


@pytest.mark.parametrize("scheme", sorted(LAYERS))
def test_bad_ids_name_the_field_and_value(scheme):
    with pytest.raises(TypeError, match=r"ids must be an integer tensor. Received: dtype=float32"):
        LAYERS[scheme]()(tf.constant([1.0, 2.0]))
    for ragged in (tf.ragged.constant([[1, 2], [3]], dtype=tf.int64), tf.sparse.from_dense(tf.constant([[1, 2]]))):
        with pytest.raises(TypeError, match=f"ids must be a dense integer tensor.*Received: {type(ragged).__name__}"):
            LAYERS[scheme](combiner="mean")(ragged)
    # The offending values and their positions, also when they are not among the first entries of the batch.
    ids = np.zeros(100, np.int64)
    ids[[60, 97]] = [30, 777]
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"(?s)ids must be < vocabulary_size=23.*30.*777.*at positions:.*60.*97"):
        LAYERS[scheme]()(tf.constant(ids))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"(?s)ids must be >= 0.*\[ *-5\]"):
        LAYERS[scheme]()(tf.constant([-5]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"(?s)ids must be >= -1.*-2"):
        LAYERS[scheme](combiner="sum")(tf.constant([[1, -2]]))
    # Inside a compiled function too.
    layer = LAYERS[scheme]()
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"(?s)ids must be < vocabulary_size=23.*\[23\]"):
        tf.function(lambda x: layer(x))(tf.constant([1, 2, 23]))


# ------------------------------------------------------------------------------------------------------- factory
def test_factory_builds_named_layers():
    assert {"fixed", "hashing", "qr", "double_hashing"} <= set(SCHEMES)
    assert get_scheme_class("qr") is QREmbedding
    layer = scheme_factory("fixed", output_dim=7)("user_id", V, FREQS)
    assert isinstance(layer, FixedEmbedding) and layer.name == "user_id_embedding" and layer.frequencies is None
    layer = scheme_factory("qr", output_dim=6, num_buckets=BUCKETS, operation="add")("item", V, FREQS)
    assert isinstance(layer, QREmbedding) and layer.operation == "add" and layer.num_buckets == BUCKETS
    layer = scheme_factory("double_hashing", output_dim=6, num_hot=HOT, num_buckets=BUCKETS)("item", V, FREQS)
    assert layer.hot_ids().tolist() == FREQ_HOT.tolist()  # frequencies reach the scheme that uses them


@pytest.mark.parametrize("vocabulary_size", [1, 2, 3, 23, 1000, 54_321])
@pytest.mark.parametrize("compression", [1.0, 4.0, 16.0])
@pytest.mark.parametrize("name,extra", [("hashing", {}), ("qr", {}), ("qr", {"operation": "concat"}),
                                        ("double_hashing", {}), ("double_hashing", {"combine": "concat"})])
def test_factory_compression(name, extra, vocabulary_size, compression):
    dim = 8
    layer = scheme_factory(name, output_dim=dim, compression=compression, **extra)("f", vocabulary_size, None)
    budget = vocabulary_size * dim / compression
    rows = {"hashing": lambda: layer.num_buckets,
            "qr": lambda: layer.num_buckets,
            "double_hashing": lambda: layer.num_hot + layer.num_buckets}[name]()
    assert rows <= vocabulary_size
    qr_minimum = name == "qr" and 2 * math.sqrt(vocabulary_size) * dim > budget
    capped = rows == vocabulary_size  # e.g. "concat" at compression 1 would need more rows than ids
    if budget >= 2 * dim and not qr_minimum and not capped:
        assert 0.75 * budget <= layer.parameter_count() <= budget, (layer.parameter_count(), budget)


def test_factory_compression_worked_examples():
    # 1000 ids x 8 dims = 8000 fixed params; compression 4 -> a 2000-parameter budget.
    assert hashing_buckets(1000, 4.0) == 250  # 250 x 8 = 2000
    # QR: m + ceil(1000/m) <= 250 rows; largest m = 245 (245 + 5 = 250 rows, 2000 params).
    assert qr_buckets(1000, 8, 4.0) == 245
    assert double_hashing_sizes(1000, 8, 4.0) == (125, 125)  # half the budget hot: (125 + 125) x 8
    assert double_hashing_sizes(1000, 8, 4.0, "concat") == (125, 250)  # 125 x 8 + 250 x 4
    assert hashing_buckets(3, 0.5) == 3  # a tiny vocabulary stays at its size
    # QR cannot go below ~2 sqrt(V) rows: for 3 ids every m gives 4 rows; ties go to the larger m.
    assert qr_buckets(3, 8, 4.0) == 3


@pytest.mark.parametrize("call,message", [
    (lambda: scheme_factory("lookup", output_dim=7), r"name='lookup'"),
    (lambda: get_scheme_class("mixed"), r"name='mixed'"),
    (lambda: scheme_factory("hashing", output_dim=7, compression=0), r"compression=0"),
    (lambda: scheme_factory("hashing", output_dim=7, compression="4"), r"compression='4'"),
    (lambda: scheme_factory("hashing", output_dim=7, compression=4.0, num_buckets=5), r"num_buckets=5"),
    (lambda: scheme_factory("fixed", output_dim=7, compression=4.0), r"compression=4.0"),
    (lambda: scheme_factory("qr", output_dim=7), r"num_buckets or compression"),
])
def test_factory_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_double_hashing_schema_order_needs_no_remap():
    # A Schema numbers ids by descending count with OOV id 0 first (often count 0): the hot ids are then the
    # contiguous range 1..num_hot, served by an offset, with no id -> row remap stored.
    freq = np.array([0, 50, 40, 30, 20, 10, 5, 4, 3, 2, 1], dtype=np.float64)  # 11 ids
    layer = DoubleHashingEmbedding(11, 6, num_hot=3, num_buckets=4, frequencies=freq)
    layer.build()
    assert layer.hot_rows is None
    np.testing.assert_array_equal(layer.hot_ids(), [1, 2, 3])
    assert layer.storage_bytes() == (3 * 6 + 4 * 6) * 4  # no remap bytes
    hot = np.arange(18, dtype=np.float32).reshape(3, 6)
    layer.hot_embeddings.assign(hot)
    out = layer(tf.constant([1, 2, 3])).numpy()
    np.testing.assert_allclose(out, hot)  # ids 1, 2, 3 -> hot rows 0, 1, 2
    # id 0 (OOV, count 0) is cold: it goes through the two hashes.
    shared = layer.shared_embeddings.numpy()
    r1, r2 = [universal_hash_np(np.array([0]), a, b, 4)[0] for a, b in layer._hash_params]
    np.testing.assert_allclose(layer(tf.constant([0])).numpy()[0], shared[r1] + shared[r2], rtol=1e-6)
    # Ids above the hot range (4..10) are cold too; the unsigned range test of the lookup sees both sides.
    ids = np.array([[0, 4, 3], [10, 1, 7]])
    expected = np.zeros(ids.shape + (6,), np.float32)
    for pos, i in np.ndenumerate(ids):
        if 1 <= i <= 3:
            expected[pos] = hot[i - 1]
        else:
            r1, r2 = [universal_hash_np(np.array([i]), a, b, 4)[0] for a, b in layer._hash_params]
            expected[pos] = shared[r1] + shared[r2]
    np.testing.assert_array_equal(layer(tf.constant(ids)).numpy(), expected)
    np.testing.assert_array_equal(layer.hash_pairs(tf.constant(ids)).numpy(),
                                  np.stack([r.numpy() for r in layer.hash_ids(tf.constant(ids))], axis=-1))


# ------------------------------------------------------------------------------------------ base-class internals
def test_frequencies_are_kept_as_an_array_and_listed_in_the_config():
    counts = FREQS.copy()
    layer = DoubleHashingEmbedding(V, 6, HOT, BUCKETS, frequencies=counts)
    # An array (a list of 1.48M Criteo counts took 68 MB), copied and read-only.
    assert isinstance(layer.frequencies, np.ndarray) and layer.frequencies.dtype == np.float64
    assert not layer.frequencies.flags.writeable and layer.frequencies_array() is layer.frequencies
    counts[:] = 0.0
    np.testing.assert_array_equal(layer.frequencies, FREQS)
    config = layer.get_config()
    assert isinstance(config["frequencies"], list) and config["frequencies"] == FREQS.tolist()
    json.dumps(config)
    clone = DoubleHashingEmbedding.from_config(config)
    np.testing.assert_array_equal(clone.frequencies, FREQS)
    np.testing.assert_array_equal(clone.hot_ids(), FREQ_HOT)
    assert FixedEmbedding(V, 3).frequencies is None and FixedEmbedding(V, 3).get_config()["frequencies"] is None


@pytest.mark.parametrize("case", sorted(CASES))
def test_gather_rows_reads_rows_sparsely(case):
    """Tables are read row by row (ResourceGather, never a whole-table read) and their gradients are row-sparse."""
    layer, _ = CASES[case]()
    ids = tf.constant([[1, 5, 5, 22]], tf.int64)

    @tf.function
    def grads(ids):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(ids))
        return tape.gradient(loss, layer.sparse_tables())

    graph = grads.get_concrete_function(ids).graph
    ops = {op.type for op in graph.get_operations()}
    assert "ResourceGather" in ops and "ReadVariableOp" not in ops, sorted(ops)
    assert all(isinstance(g, tf.IndexedSlices) for g in grads(ids))
