"""Mixed-dimension embeddings (Ginart et al., arXiv 1909.11810): blocking, dims and the layer vs NumPy references.

Sizes are tiny and all different (vocabulary 23, base dim 7, blocks of 3 / 5 / 15 rows with dims 7 / 5 / 3) so
a swapped block, axis or projection shows. Dims and blocks are checked against values computed by hand (in the
comments). Nothing here creates a tensor at import time (see tests/test_layers_distribute.py).
"""

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tfemb._keras import keras
from tfemb.data.schema import schema_from_dataframe
from tfemb.layers import (
    HeadTailEmbedding,
    MixedDimensionEmbedding,
    alpha_power_dims,
    block_probabilities,
    budget_dims,
    cf_blocks,
    dlrm_md_solver,
    get_scheme_class,
    md_field_dims,
    md_field_factory,
    pow2_round,
    scheme_factory,
    stacked_md_blocks,
)
from tfemb.layers import mixed_dimension_embedding as md_module
from tfemb.layers.mixed_dimension_embedding import PLAIN_TABLE_ENTRIES
from tfemb.layers.md_dims import block_masses, equal_mass_block_sizes, md_parameter_count, ranks_from_oov_rank
from tfemb.testing import run_scheme_test

V = 23
D0 = 7
SIZES = [3, 5, 15]
DIMS = [7, 5, 3]
OFFSETS = [0, 3, 8]

# Counts in descending order, 120 in all, cut by Algorithm 2 (k + 1 = 3 blocks of 40) into 3 / 5 / 15 rows:
#   22 + 10 + 8 = 40 | 8 * 5 = 40 | 5 + 4 + 4 + 3 * 5 + 2 * 5 + 1 + 1 = 40.
SORTED_COUNTS = np.array([22, 10, 8, 8, 8, 8, 8, 8, 5, 4, 4, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 1, 1], dtype=float)
# The same counts numbered as a Schema does: OOV id 0 (count 2) first, ids 1.. in descending count. Id 0 ranks
# after the 16 ids with a larger count (22, 10, 8 x 6, 5, 4 x 2, 3 x 5) and before the other 2s (stable sort).
SCHEMA_COUNTS = np.concatenate([[2.0], np.delete(SORTED_COUNTS, 16)])
SCHEMA_OOV_RANK = 16
PERM = [5, 17, 0, 22, 9, 13, 1, 20, 3, 11, 7, 15, 2, 19, 6, 21, 4, 10, 14, 8, 18, 12, 16]  # rank of each id

# Single ids (every id once, shuffled) and padded multi-hot lists (a fully padded row included).
IDS = np.array([0, 22, 5, 1, 17, 3, 9, 11, 2, 20, 4, 13, 7, 21, 6, 16, 8, 19, 10, 15, 12, 18, 14])
MULTI = np.array([[0, 5, -1, -1], [22, 7, 13, 1], [3, -1, -1, -1], [-1, -1, -1, -1], [4, 4, 19, 2]])


def _values(rows, cols, offset=0.0):
    """Distinct, recognisable values: entry (r, c) = offset + r / 10 + c / 100."""
    return (offset + np.arange(rows)[:, None] / 10.0 + np.arange(cols)[None, :] / 100.0).astype(np.float32)


TABLES = [_values(3, 7, 0.5), _values(5, 5, -1.0), _values(15, 3, 2.0)]
PROJECTIONS = [None, _values(5, 7, -0.2) / 3.0, _values(3, 7, 0.3) / 5.0]


def _ranks(layer_kind):
    return {
        "identity": np.arange(V),
        "oov_rank": ranks_from_oov_rank(V, SCHEMA_OOV_RANK),
        "permutation": np.asarray(PERM),
    }[layer_kind]


def md_case(kind="identity", **kw):
    """A layer with assigned weights and its NumPy reference ``ids -> vectors``."""
    extra = {"identity": {}, "oov_rank": {"oov_rank": SCHEMA_OOV_RANK}, "permutation": {"permutation": PERM}}[kind]
    layer = MixedDimensionEmbedding(V, D0, SIZES, DIMS, **extra, **kw)
    layer.build()
    layer.set_block_weights(TABLES, PROJECTIONS)
    return layer, algorithm1_reference(_ranks(kind), SIZES, TABLES, PROJECTIONS, D0)


def algorithm1_reference(ranks, sizes, tables, projections, d0):
    """NumPy Algorithm 1: ``ids -> vectors`` (float64) for an id -> rank map, block tables and projections."""
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])

    def reference(ids):
        out = []
        for x in np.asarray(ids).reshape(-1):
            r = ranks[int(x)]
            b = np.searchsorted(offsets, r, side="right") - 1
            vector = tables[b][r - offsets[b]].astype(np.float64)
            out.append(vector if projections[b] is None else vector @ projections[b])
        return np.stack(out).reshape(np.shape(ids) + (d0,))

    return reference


KINDS = ["identity", "oov_rank", "permutation"]


# ---------------------------------------------------------------------------------------- forward (Algorithm 1)
def test_the_test_fixtures_are_what_the_comments_say():
    assert SORTED_COUNTS.sum() == 120 and len(SORTED_COUNTS) == len(SCHEMA_COUNTS) == V
    assert sorted(PERM) == list(range(V))
    order = np.argsort(-SCHEMA_COUNTS, kind="stable")
    assert order[SCHEMA_OOV_RANK] == 0 and np.array_equal(SCHEMA_COUNTS[order], SORTED_COUNTS)


@pytest.mark.parametrize("kind", KINDS)
def test_single_ids_match_numpy(kind):
    layer, reference = md_case(kind)
    np.testing.assert_allclose(layer(tf.constant(IDS)).numpy(), reference(IDS), rtol=1e-6, atol=1e-6)
    ids_2d = IDS[:20].reshape(4, 5)  # no combiner: [batch, k] -> [batch, k, dim]
    np.testing.assert_allclose(layer(tf.constant(ids_2d)).numpy(), reference(ids_2d), rtol=1e-6, atol=1e-6)
    graph = tf.function(lambda x: layer(x))(tf.constant(ids_2d))
    np.testing.assert_allclose(graph.numpy(), reference(ids_2d), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("vocab", [2, 7])
def test_ranks_for_every_oov_rank(vocab):
    """``ranks()`` of a layer without a permutation equals ``md_dims.ranks_from_oov_rank`` for every position of
    the OOV id, the last one (a Schema's usual case, the two-op form) included."""
    for oov_rank in range(vocab):
        layer = MixedDimensionEmbedding(vocab, 4, [vocab], [4], oov_rank=oov_rank)
        layer.build()
        got = layer.ranks(tf.range(vocab, dtype=tf.int64)).numpy()
        np.testing.assert_array_equal(got, ranks_from_oov_rank(vocab, oov_rank), err_msg=f"oov_rank={oov_rank}")


def test_block_lookup_by_hand():
    layer, _ = md_case("identity")
    out = layer(tf.constant([2, 3, 8])).numpy()
    # Rank 2: last row of block 0, no projection; rank 3 = t_1: block 1, row 0; rank 8 = t_2: block 2, row 0.
    np.testing.assert_allclose(out[0], TABLES[0][2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[1], TABLES[1][0] @ PROJECTIONS[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[2], TABLES[2][0] @ PROJECTIONS[2], rtol=1e-5, atol=1e-6)
    # Schema numbering: id 0 has rank 16 (block 2, row 8); ids 1..16 move up one rank; id 17 keeps rank 17.
    oov, _ = md_case("oov_rank")
    out = oov(tf.constant([0, 1, 4, 17])).numpy()
    np.testing.assert_allclose(out[0], TABLES[2][8] @ PROJECTIONS[2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[1], TABLES[0][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[2], TABLES[1][0] @ PROJECTIONS[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[3], TABLES[2][9] @ PROJECTIONS[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
@pytest.mark.parametrize("kind", KINDS)
def test_multi_hot_pooling_matches_numpy(kind, combiner):
    layer, reference = md_case(kind, combiner=combiner)
    mask = MULTI != -1
    vectors = reference(np.where(mask, MULTI, 0)) * mask[..., None]
    total = vectors.sum(axis=1)
    count = mask.sum(axis=1, keepdims=True).astype(np.float64)
    norm = {"sum": np.ones_like(count), "mean": count, "sqrtn": np.sqrt(count)}[combiner]
    expected = np.divide(total, norm, out=np.zeros_like(total), where=norm > 0)  # empty row -> zeros
    np.testing.assert_allclose(layer(tf.constant(MULTI)).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_one_block_and_all_base_dim_layers():
    single = MixedDimensionEmbedding(V, D0, [V], [4])
    single.build()
    table, projection = _values(V, 4), _values(4, D0, -0.3)
    single.set_block_weights([table], [projection])
    np.testing.assert_allclose(single(tf.constant(IDS)).numpy(), table[IDS] @ projection, rtol=1e-5, atol=1e-6)
    assert single.parameter_count() == V * 4 + 4 * D0 == single.flat_parameters.shape[0]
    np.testing.assert_array_equal(single.block_tables()[0], table)
    np.testing.assert_array_equal(single.block_projections()[0], projection)
    uniform = MixedDimensionEmbedding(V, D0, SIZES, [D0] * 3)  # identity projections: a split fixed table
    uniform.build()
    assert all(p is None for p in uniform.projections) and uniform.parameter_count() == V * D0
    tables = [_values(n, D0, float(i)) for i, n in enumerate(SIZES)]
    uniform.set_block_weights(tables)
    np.testing.assert_allclose(uniform(tf.constant(IDS)).numpy(), np.concatenate(tables)[IDS], rtol=1e-6)


def _block_entries(block, row=None):
    """Positions in ``flat_parameters`` of block ``block``'s table (or of one of its rows), from the layout the
    docstring states: tables 3x7 | 5x5 | 15x3 row-major (offsets 0, 21, 46), then P_1 (5x7, at 91), P_2 (3x7, at
    126)."""
    start = [0, 21, 46][block]
    if row is None:
        return np.arange(start, start + SIZES[block] * DIMS[block])
    return start + row * DIMS[block] + np.arange(DIMS[block])


PROJECTION_ENTRIES = {1: np.arange(91, 126), 2: np.arange(126, 147)}


def test_flat_layout_by_hand():
    layer, _ = md_case("identity")
    lay = layer._layout
    assert lay.size == 147 and lay.table_size == 91 and layer.flat_parameters.shape == (147,)
    assert lay.table_offsets.tolist() == [0, 21, 46] and lay.projection_offsets.tolist() == [-1, 91, 126]
    flat = tf.convert_to_tensor(layer.flat_parameters).numpy()
    for b in range(3):
        np.testing.assert_array_equal(flat[_block_entries(b)], TABLES[b].reshape(-1))
    np.testing.assert_array_equal(flat[PROJECTION_ENTRIES[1]], PROJECTIONS[1].reshape(-1))
    np.testing.assert_array_equal(flat[PROJECTION_ENTRIES[2]], PROJECTIONS[2].reshape(-1))
    # Wide columns: the projected blocks 1 (5 columns) and 2 (3), then block 0 (7, identity).
    assert lay.column_block.tolist() == [1] * 5 + [2] * 3 + [0] * 7 and lay.uniform_dim == 0
    # Rank 4 (block 1, row 1) reads entries 21 + 5 + 0..4 in columns 0..4: base + 4 * 5.
    np.testing.assert_array_equal(lay.column_base[:5] + 4 * lay.column_dim[:5], _block_entries(1, 1))
    for b in range(3):
        for p, got in ((None, layer.block_tables()[b]), (b, layer.block_projections()[b])):
            want = TABLES[b] if p is None else PROJECTIONS[b]
            assert (got is None and want is None) or np.array_equal(got, want)
        np.testing.assert_array_equal(layer.block_embeddings[b].numpy(), TABLES[b])
    assert MixedDimensionEmbedding(V, D0, [V], [3])._layout.uniform_dim == 3
    assert MixedDimensionEmbedding(V, D0, SIZES, [D0] * 3)._layout.uniform_dim == D0


def _expected_flat_gradient(ids, weights, ranks):
    """d sum(out * weights) / d flat_parameters, from the per-block formulas."""
    expected = np.zeros(147)
    for pos, r in enumerate(ranks[ids]):
        b = np.searchsorted(OFFSETS, r, side="right") - 1
        row = r - OFFSETS[b]
        if PROJECTIONS[b] is None:
            expected[_block_entries(b, row)] += weights[pos]
        else:
            expected[_block_entries(b, row)] += weights[pos] @ PROJECTIONS[b].T  # d loss / d E_b[row]
            expected[PROJECTION_ENTRIES[b]] += np.outer(TABLES[b][row], weights[pos]).reshape(-1)  # d / d P_b
    return expected


@pytest.mark.parametrize("lookup", ["gather", "table"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_tables_and_projections(kind, lookup):
    layer, _ = md_case(kind)
    layer.lookup_mode = lookup
    ids = np.array([0, 3, 3, 9, 17, 22])
    weights = _values(len(ids), D0, -0.4)  # loss = sum(out * weights)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(tf.constant(ids)) * weights)
    (grad,) = tape.gradient(loss, [layer.flat_parameters])
    np.testing.assert_allclose(tf.convert_to_tensor(grad).numpy(), _expected_flat_gradient(ids, weights, _ranks(kind)),
                               rtol=1e-5, atol=1e-6)
    if lookup == "table":  # the whole projected table is computed: a dense gradient, zero off the looked-up rows
        assert not isinstance(grad, tf.IndexedSlices)
        return
    assert isinstance(grad, tf.IndexedSlices)  # row-sparse
    # The gradient lists exactly the looked-up table entries and the projections, nothing else: a lazy optimizer
    # must not move entries of rows that were not looked up (with Adam a zero gradient still moves them).
    looked_up = set()
    for r in _ranks(kind)[ids]:
        b = np.searchsorted(OFFSETS, r, side="right") - 1
        looked_up.update(_block_entries(b, r - OFFSETS[b]).tolist())
    projections = set(PROJECTION_ENTRIES[1].tolist()) | set(PROJECTION_ENTRIES[2].tolist())
    assert set(grad.indices.numpy().tolist()) == looked_up | projections
    assert layer.sparse_tables() == [layer.flat_parameters]
    assert [v.name for v in layer.trainable_weights] == [layer.flat_parameters.name]


# Row width g = gcd(block dims, d0) > 1: the buffer is [size / g, g] and lookups move whole rows of g entries.
ROW_WIDTH_CASES = {
    "three blocks, g=2": ([3, 5, 15], [8, 4, 2], 8),
    "one projected block, g=4": ([23], [4], 8),
    "one block at d0, g=8": ([23], [8], 8),
    "two blocks at d0, g=8": ([3, 20], [8, 8], 8),
    "dims 12/6, g=6": ([4, 19], [12, 6], 12),
}


def _row_width_case(sizes, dims, d0):
    rng = np.random.default_rng(7)
    v = sum(sizes)
    perm = rng.permutation(v)
    layer = MixedDimensionEmbedding(v, d0, sizes, dims, permutation=perm.tolist())
    layer.build()
    tables = [rng.normal(size=(n, d)).astype(np.float32) for n, d in zip(sizes, dims)]
    projections = [None if d == d0 else rng.normal(size=(d, d0)).astype(np.float32) for d in dims]
    layer.set_block_weights(tables, projections)
    offsets = np.concatenate([[0], np.cumsum(sizes)])

    def reference(ids):
        out = np.zeros(np.shape(ids) + (d0,))
        for idx in np.ndindex(np.shape(ids)):
            r = perm[ids[idx]]
            b = np.searchsorted(offsets, r, side="right") - 1
            row = tables[b][r - offsets[b]]
            out[idx] = row if projections[b] is None else row @ projections[b]
        return out

    def entries(ids):
        """Buffer entries (layout order) an id batch reads: its rows' entries plus every projection's."""
        lay = layer._layout
        out = set()
        for r in perm[np.asarray(ids).reshape(-1)]:
            b = np.searchsorted(offsets, r, side="right") - 1
            start = lay.table_offsets[b] + (r - offsets[b]) * dims[b]
            out.update(range(start, start + dims[b]))
        for b, s in enumerate(lay.projection_offsets):
            if s >= 0:
                out.update(range(s, s + dims[b] * d0))
        return out

    return layer, tables, projections, reference, entries


@pytest.mark.parametrize("lookup", ["gather", "table"])
@pytest.mark.parametrize("case", sorted(ROW_WIDTH_CASES))
def test_row_width_buffer_lookup_and_gradient(case, lookup):
    sizes, dims, d0 = ROW_WIDTH_CASES[case]
    g = math.gcd(*dims, d0)
    layer, tables, projections, reference, entries = _row_width_case(sizes, dims, d0)
    layer.lookup_mode = lookup
    assert layer._layout.row_width == g > 1
    assert tuple(layer.flat_parameters.shape) == (layer.parameter_count() // g, g)
    for got, want in zip(layer.block_tables(), tables):
        np.testing.assert_array_equal(got, want)
    ids = np.array([[0, 5, 5], [22, 9, 1], [13, 17, 3]])
    np.testing.assert_allclose(layer(tf.constant(ids)).numpy(), reference(ids), rtol=1e-5, atol=1e-5)
    weights = np.random.default_rng(1).normal(size=ids.shape + (d0,)).astype(np.float32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(tf.constant(ids)) * weights)
    (grad,) = tape.gradient(loss, [layer.flat_parameters])
    if lookup == "gather":
        assert isinstance(grad, tf.IndexedSlices) and tuple(grad.values.shape[1:]) == (g,)  # whole rows of g
        rows = set(grad.indices.numpy().tolist())
        assert rows == {e // g for e in entries(ids)}  # exactly the looked-up rows and the projections' rows
    else:  # dense, non-zero only on the looked-up rows and the projections' rows
        nonzero = set(np.flatnonzero(np.any(tf.convert_to_tensor(grad).numpy() != 0, axis=-1)).tolist())
        assert nonzero <= {e // g for e in entries(ids)}
    # Gradient values against finite differences of the NumPy reference are linear here: d loss / d entry.
    dense = tf.convert_to_tensor(grad).numpy().reshape(-1)
    flat = layer._flat_numpy()
    for entry in sorted(entries(ids))[:: max(1, len(entries(ids)) // 7)]:
        bumped = flat.copy()
        bumped[entry] += 1.0
        layer.flat_parameters.assign(bumped.reshape(layer.flat_parameters.shape))
        plus = float(tf.reduce_sum(layer(tf.constant(ids)) * weights))
        layer.flat_parameters.assign(flat.reshape(layer.flat_parameters.shape))
        base = float(tf.reduce_sum(layer(tf.constant(ids)) * weights))
        # Linear in each entry, up to float32 rounding on sums of a few dozen products.
        np.testing.assert_allclose(plus - base, dense[entry], rtol=1e-3, atol=1e-3)
    compact = layer.compact(premultiply=False)  # block tables as trained (the default makes a table this small plain)
    np.testing.assert_allclose(compact(tf.constant(ids)).numpy(), reference(ids), rtol=1e-5, atol=1e-5)
    assert tuple(compact.flat_parameters.shape) == tuple(layer.flat_parameters.shape)


def test_row_width_fixed_size_gathers_and_layout_loading():
    layer, _, _, reference, _ = _row_width_case([3, 5, 15], [8, 4, 2], 8)
    ids = tf.constant([0, 22, 5, 11, 3])
    ranks = layer.ranks(ids)
    exact, fixed = layer._wide_exact(ranks), layer._wide_fixed_size(ranks)
    np.testing.assert_array_equal(exact.numpy(), fixed.numpy())
    np.testing.assert_allclose(tf.matmul(fixed, layer._stacked_projections()).numpy(), reference(ids.numpy()),
                               rtol=1e-5, atol=1e-5)
    # A buffer saved by the 1-D layout (row width 1) loads into the [size / 2, 2] one.
    again = MixedDimensionEmbedding(layer.vocabulary_size, 8, [3, 5, 15], [8, 4, 2], permutation=layer.permutation)
    again.build()
    again.load_own_variables({"0": layer._flat_numpy(), "1": np.asarray(layer.permutation, np.int32)})
    np.testing.assert_allclose(again(ids).numpy(), reference(ids.numpy()), rtol=1e-5, atol=1e-5)


def test_row_width_lazy_adam_moves_only_looked_up_rows():
    from tfemb.optimizers import SparseAdam

    layer, _, _, _, entries = _row_width_case([23], [4], 8)
    optimizer = SparseAdam(learning_rate=0.1)
    before = layer._flat_numpy().copy()
    for ids in ([0, 4, 9], [1, 10]):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(layer(tf.constant(ids)) - 1.0))
        grads = tape.gradient(loss, layer.sparse_tables())
        optimizer.apply(zip(grads, layer.sparse_tables()))
    moved = set(np.flatnonzero(layer._flat_numpy() != before).tolist())
    assert moved == entries([0, 4, 9, 1, 10])


def test_lazy_adam_leaves_rows_not_looked_up_alone():
    from tfemb.optimizers import SparseAdam

    layer, _ = md_case("identity")
    optimizer = SparseAdam(learning_rate=0.1)
    before = tf.convert_to_tensor(layer.flat_parameters).numpy().copy()
    for ids in ([0, 4, 9], [1, 10]):  # ranks 0, 4, 9 then 1, 10: blocks 0, 1, 2 then 0, 2
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(layer(tf.constant(ids)) - 1.0))
        grads = tape.gradient(loss, layer.sparse_tables())
        optimizer.apply(zip(grads, layer.sparse_tables()))
    after = tf.convert_to_tensor(layer.flat_parameters).numpy()
    moved = set(np.flatnonzero(after != before).tolist())
    touched = set()
    for r in (0, 4, 9, 1, 10):
        b = np.searchsorted(OFFSETS, r, side="right") - 1
        touched.update(_block_entries(b, r - OFFSETS[b]).tolist())
    touched |= set(PROJECTION_ENTRIES[1].tolist()) | set(PROJECTION_ENTRIES[2].tolist())
    assert moved == touched


# ------------------------------------------------------------------------------------------- Algorithm 2 (CF)
def test_equal_mass_cut_by_hand():
    assert equal_mass_block_sizes(SORTED_COUNTS, 3).tolist() == SIZES  # cuts at C(3) = 40, C(8) = 80
    # [6, 4, 3, 2, 2, 1, 1, 1], total 20: halves at C(2) = 10 -> [2, 6]; quarters at 5, 10, 15 -> nearest
    # boundaries C(1) = 6, C(2) = 10, C(4) = 15 -> masses 6, 4, 5, 5.
    counts = [6, 4, 3, 2, 2, 1, 1, 1]
    assert equal_mass_block_sizes(counts, 2).tolist() == [2, 6]
    assert equal_mass_block_sizes(counts, 4).tolist() == [1, 1, 2, 4]
    # 23 equal counts in 3 blocks: targets 7.67 and 15.33 -> nearest boundaries 8 and 15 -> 8 / 7 / 8 rows.
    assert equal_mass_block_sizes(np.ones(23), 3).tolist() == [8, 7, 8]
    # A head id heavier than a block's share: cuts meet (targets 4, 8, 12 -> boundaries 1, 1, 2); the empty
    # block is dropped, so 3 blocks come back for 4 asked.
    assert equal_mass_block_sizes([8, 4, 2, 1, 1], 4).tolist() == [1, 1, 3]
    # More blocks than rows: every block has one row.
    assert equal_mass_block_sizes([3, 2, 1], 5).tolist() == [1, 1, 1]
    assert equal_mass_block_sizes(SORTED_COUNTS, 1).tolist() == [V]


def test_cf_blocks_reindexes_by_descending_count():
    identity = cf_blocks(SORTED_COUNTS, 3)
    assert identity.block_sizes.tolist() == SIZES and identity.permutation is None and identity.oov_rank == 0
    # Schema numbering: only id 0 is out of place -> an offset (oov_rank), no stored permutation.
    schema = cf_blocks(SCHEMA_COUNTS, 3)
    assert schema.block_sizes.tolist() == SIZES and schema.permutation is None
    assert schema.oov_rank == SCHEMA_OOV_RANK
    np.testing.assert_array_equal(schema.sorted_frequencies, SORTED_COUNTS)
    # Any other order: the ranks are stored. [5, 9, 1, 7] sorts to ids 1, 3, 0, 2 -> ranks [2, 0, 3, 1].
    shuffled = cf_blocks([5, 9, 1, 7], 2)
    assert shuffled.permutation.tolist() == [2, 0, 3, 1] and shuffled.oov_rank == 0
    assert shuffled.block_sizes.tolist() == [1, 3]  # total 22, half 11: C(1) = 9 (2 away) vs C(2) = 16 (5 away)
    # Ties keep the lower id first (stable), so equal counts need no permutation.
    assert cf_blocks(np.ones(V), 3).permutation is None


def test_block_probabilities_are_mean_per_row():
    # Equal masses a_i / tau = 1/3: the paper's p would give every block the same dim. Mean per-row
    # probabilities a_i / (tau n_i) = 1/9, 1/15, 1/45.
    np.testing.assert_allclose(block_masses(SORTED_COUNTS, SIZES), [1 / 3] * 3)
    np.testing.assert_allclose(block_probabilities(SORTED_COUNTS, SIZES), [1 / 9, 1 / 15, 1 / 45])
    np.testing.assert_allclose(block_probabilities([6, 4, 3, 2, 2, 1, 1, 1], [1, 1, 2, 4]), [0.3, 0.2, 0.125, 0.0625])


# --------------------------------------------------------------------------------------------- Algorithm 3
P = np.array([1 / 9, 1 / 15, 1 / 45])


def test_alpha_power_dims_by_hand():
    # lambda = d0 * max(p) ** -alpha = 7 * (1/9) ** -0.5 = 21; d = 21 * p ** 0.5 = 7, 5.42, 3.13.
    lam = D0 * P.max() ** -0.5
    assert math.isclose(lam, 21.0)
    np.testing.assert_allclose(lam * P ** 0.5, [7.0, 21 / math.sqrt(15), 21 / math.sqrt(45)])
    assert alpha_power_dims(P, D0, 0.5).tolist() == [7, 5, 3]
    assert alpha_power_dims(P * 10, D0, 0.5).tolist() == [7, 5, 3]  # only ratios matter
    assert alpha_power_dims(P, D0, 1.0).tolist() == [7, 4, 1]  # 7, 4.2, 1.4
    assert alpha_power_dims(P, D0, 2.0).tolist() == [7, 3, 1]  # 7, 2.52, 0.28 -> floor of 1
    assert alpha_power_dims(P, D0, 0.5, round_pow2=True).tolist() == [7, 4, 4]  # 7 -> 8 capped at d0, 5 -> 4, 3 -> 4
    assert alpha_power_dims([1.0, 0.25], 12, 1.0, round_pow2=True).tolist() == [12, 4]  # 12 -> 16, capped at 12
    assert alpha_power_dims([1.0, 0.0], 5, 0.3).tolist() == [5, 1]  # a block never seen still gets 1


def test_pow2_round_is_dlrms_log_rounding():
    assert pow2_round([1, 2, 3, 5, 6, 11, 12, 23, 64]).tolist() == [1, 2, 4, 4, 8, 8, 16, 32, 64]


def test_budget_dims_by_hand():
    n = np.array(SIZES)
    # General constraint sum n_i lambda p_i ** 0.5 = 100: lambda = 100 / (1 + 5/sqrt(15) + 15/sqrt(45)) = 22.09,
    # d = 7.36, 5.70, 3.29 (rounded 7, 6, 3: 96 parameters). The largest lambda that fits: block 0 reaches 8 at
    # lambda = 22.5 (8, 6, 3: 24 + 30 + 45 = 99); block 2 reaches 4 at lambda = 23.5 (114 > 100).
    lam = 100 / np.sum(n * P ** 0.5)
    assert math.isclose(lam, 22.0894, rel_tol=1e-4)
    assert np.round(lam * P ** 0.5).tolist() == [7, 6, 3]
    dims = budget_dims(P, n, 0.5, 100)
    assert dims.tolist() == [8, 6, 3] and md_parameter_count(n, dims, include_projections=False) == 99
    assert budget_dims(P, n, 0.5, 100, d0=D0).tolist() == [7, 6, 3]  # capped at d0: block 0 cannot take 8
    # With projections (d0 = 7): 44 is the floor (23 rows + 3 projections of 1 x 7); 150 gives back the
    # alpha-power layer (7, 5, 3: 91 + 5*7 + 3*7 = 147); the whole fixed table (161) needs no projection.
    for budget, expected, cost in [(44, [1, 1, 1], 44), (100, [3, 3, 1], 88), (120, [4, 3, 2], 120),
                                   (150, [7, 5, 3], 147), (161, [7, 7, 7], 161)]:
        dims = budget_dims(P, n, 0.5, budget, d0=D0, include_projections=True)
        assert dims.tolist() == expected and md_parameter_count(n, dims, D0) == cost, (budget, dims)


def test_budget_closed_form_when_rows_are_inverse_probabilities():
    # The paper's lambda = B (sum p_i ** (alpha - 1)) ** -1 holds for n_i = 1 / p_i (here p = 1/3, 1/5, 1/15).
    n = np.array([3, 5, 15])
    p, alpha, budget = 1.0 / n, 0.5, 100
    paper = budget / np.sum(p ** (alpha - 1))
    general = budget / np.sum(n * p ** alpha)
    assert math.isclose(paper, general)
    dims = budget_dims(p, n, alpha, budget)
    assert np.all(np.abs(dims - paper * p ** alpha) <= 1.0)  # within rounding of the closed form
    assert md_parameter_count(n, dims, include_projections=False) <= budget


@pytest.mark.parametrize("round_pow2", [False, True])
@pytest.mark.parametrize("projections", [False, True])
@pytest.mark.parametrize("budget", [101, 130, 155, 230, 400])
def test_budget_dims_is_the_largest_that_fits(budget, projections, round_pow2):
    # Within rounding of B: no lambda of the alpha-power family gives a larger cost that still fits.
    n = np.array([3, 5, 15, 40])
    p = block_probabilities(np.concatenate([np.full(3, 20.0), np.full(5, 8.0), np.full(15, 3.0), np.ones(40)]), n)
    d0 = 9
    dims = budget_dims(p, n, 0.4, budget, d0=d0, round_pow2=round_pow2, include_projections=projections)
    cost = md_parameter_count(n, dims, d0, projections)
    assert cost <= budget
    best = 0
    for lam in np.geomspace(1e-3, 1e4, 20000):
        raw = lam * p ** 0.4
        d = np.round(np.maximum(1.0, raw))
        d = np.minimum(2 ** np.round(np.log2(d)) if round_pow2 else d, d0)
        d = np.where(raw >= d0, d0, d)  # a raw dim that reaches d0 is d0 (9, not the power of 2 below it)
        c = md_parameter_count(n, d, d0, projections)
        best = max(best, c if c <= budget else 0)
    assert best <= cost, (dims, cost, best)


def test_round_pow2_with_a_base_dim_that_is_no_power_of_2():
    """The most popular block gets d0 itself (20, the identity projection), not the power of 2 below it; a
    budget that fits every block at d0 gives the fixed-size layer, not projections on top of smaller tables."""
    assert alpha_power_dims([1.0, 0.1], d0=20, alpha=0.3, round_pow2=True).tolist() == [20, 8]  # 20 * .1**.3 = 10
    assert budget_dims([1.0], [100], alpha=0.3, budget=10_000, d0=20, round_pow2=True).tolist() == [20]
    assert budget_dims([1.0, 0.5], [10, 100], alpha=0.3, budget=100_000, d0=40, round_pow2=True).tolist() == [40, 40]
    layer = MixedDimensionEmbedding.from_frequencies([1000, 500, 200, 100, 50, 20, 10, 5, 2, 1], 20, num_blocks=3,
                                                     round_pow2=True, budget=10**6)
    assert layer.block_dims == [20] * len(layer.block_sizes) and layer.parameter_count() == 10 * 20


# ----------------------------------------------------------------------------------------- the CTR rule (dlrm)
CRITEO_KAGGLE = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
                 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]  # rows per table, 26 fields


def _dlrm_transliteration(n, alpha, d0=None, budget=None, round_dim=True, k=None):
    """dlrm ``md_solver`` / ``alpha_power_rule`` / ``pow_2_round`` step by step, loops as in dlrm."""
    n = np.asarray(n, dtype=np.float64)
    indices = np.argsort(n, kind="stable")
    n = n[indices]
    k = np.ones(len(n)) if k is None else np.asarray(k, dtype=np.float64)[indices]
    m = n / k
    lamb = d0 * m[0] ** alpha if d0 is not None else budget / np.sum(m ** (1 - alpha))
    d = np.ones(len(m)) * lamb * m ** (-alpha)
    for i in range(len(d)):
        if i == 0 and d0 is not None:
            d[i] = d0
        else:
            d[i] = 1 if d[i] < 1 else d[i]
    d = np.round(d)
    if round_dim:
        d = 2 ** np.round(np.log2(d))
    undo = [0] * len(indices)
    for i, v in enumerate(indices):
        undo[v] = i
    return d[undo].astype(int).tolist()


def test_dlrm_md_solver_by_hand():
    # Sorted 10, 100, 1000: lambda = 16 * 10 ** 0.5 = 50.6 -> 16, 5.06, 1.60 -> 16, 5, 2, back in input order.
    assert dlrm_md_solver([1000, 10, 100], 0.5, d0=16, round_pow2=False).tolist() == [2, 16, 5]
    assert dlrm_md_solver([1000, 10, 100], 0.5, d0=16).tolist() == [2, 16, 4]  # md_solver rounds by default
    # Budget form: lambda = 1000 / (10 ** .5 + 100 ** .5 + 1000 ** .5) = 22.33 -> 7.06, 2.23, 0.71 -> 7, 2, 1.
    assert dlrm_md_solver([10, 100, 1000], 0.5, budget=1000, round_pow2=False).tolist() == [7, 2, 1]
    assert dlrm_md_solver([10, 100, 1000], 0.5, budget=1000).tolist() == [8, 2, 1]
    # Queries per example divide the rows: 1000 / 10 = 100 -> same dim as the 100-row table.
    assert dlrm_md_solver([1000, 10, 100], 0.5, d0=16, queries=[10, 1, 1], round_pow2=False).tolist() == [5, 16, 5]
    # --md-threshold: tables of <= 200 rows keep d0.
    assert dlrm_md_solver([1000, 10, 100], 0.5, d0=16, round_pow2=False, threshold=200).tolist() == [2, 16, 16]
    # dlrm does not cap: with d0 = 12 and rounding, the smallest table gets 16 (tfemb's layer helpers cap).
    assert dlrm_md_solver([1, 4], 1.0, d0=12).tolist() == [16, 4]


@pytest.mark.parametrize("kwargs", [dict(d0=16), dict(d0=16, round_dim=False), dict(d0=32, round_dim=False),
                                    dict(budget=2e7), dict(budget=2e7, round_dim=False)])
def test_dlrm_md_solver_matches_dlrm_on_criteo_sizes(kwargs):
    round_pow2 = kwargs.pop("round_dim", True)
    ours = dlrm_md_solver(CRITEO_KAGGLE, 0.3, round_pow2=round_pow2, **kwargs).tolist()
    assert ours == _dlrm_transliteration(CRITEO_KAGGLE, 0.3, round_dim=round_pow2, **kwargs)
    if kwargs.get("d0") == 16 and not round_pow2:
        # By hand: 3 rows -> 16; 4 -> 16 (3/4) ** .3 = 14.7 -> 15; 10 -> 16 (0.3) ** .3 = 11.1 -> 11; 10.1M -> 1.
        assert (ours[8], ours[19], ours[16], ours[2]) == (16, 15, 11, 1)


def test_stacked_blocks_follow_the_dlrm_rule():
    stacked = stacked_md_blocks(CRITEO_KAGGLE, 16, alpha=0.3)
    assert stacked.block_dims.tolist() == dlrm_md_solver(CRITEO_KAGGLE, 0.3, d0=16, round_pow2=False).tolist()
    assert stacked.offsets.tolist() == np.concatenate([[0], np.cumsum(CRITEO_KAGGLE)[:-1]]).tolist()
    np.testing.assert_allclose(stacked.probabilities, 1.0 / (26 * np.asarray(CRITEO_KAGGLE)))
    small = stacked_md_blocks([4, 11, 40], 8, alpha=0.5, compression=2.0)  # budget 55 * 8 / 2 = 220
    assert md_parameter_count(small.block_sizes, small.block_dims, 8) <= 220


def _field_schema():
    n = 78
    df = pd.DataFrame({"a": np.arange(n) % 3, "b": np.arange(n) % 10, "c": np.arange(n) % 39,
                       "y": np.arange(n) % 2})
    return schema_from_dataframe(df, label="y", categorical=["a", "b", "c"]).fit(df), df


def test_md_field_dims_and_factory():
    schema, _ = _field_schema()
    assert [schema.vocabulary_size(f) for f in "abc"] == [4, 11, 40]  # values + OOV
    # Smallest field (4 ids) gets 8; 11 ids: 8 (4/11) ** .5 = 4.82 -> 5; 40 ids: 8 (0.1) ** .5 = 2.53 -> 3.
    assert md_field_dims(schema, 8, alpha=0.5) == {"a": 8, "b": 5, "c": 3}
    assert md_field_dims(schema, 8, alpha=0.5, round_pow2=True) == {"a": 8, "b": 4, "c": 4}
    assert md_field_dims(schema, 8, alpha=0.5, threshold=11) == {"a": 8, "b": 8, "c": 3}
    squeezed = md_field_dims(schema, 8, alpha=0.5, compression=2.0)
    n = [4, 11, 40]
    assert md_parameter_count(n, [squeezed[f] for f in "abc"], 8) <= 55 * 8 / 2
    make = md_field_factory(schema, 8, alpha=0.5)
    assert make.field_dims == {"a": 8, "b": 5, "c": 3}
    layers = {f: make(f, schema.vocabulary_size(f), schema.frequencies(f)) for f in "abc"}
    for layer in layers.values():
        layer.build()
    assert [layers[f].block_dims for f in "abc"] == [[8], [5], [3]]
    assert layers["a"].projections == [None] and layers["c"].name == "c_embedding"
    assert layers["c"].parameter_count() == 40 * 3 + 3 * 8
    with pytest.raises(ValueError, match=r"feature_name='d'"):
        make("d", 5, None)


def test_md_blocking_in_recipes():
    """A recipe's ``{"scheme": "md", "params": {"blocking": "field"}}`` builds the per-field layers of
    ``md_field_factory`` from the whole Schema; ``"popularity"`` (the default) the per-feature Algorithm 2 blocks;
    anything else, or ``"field"`` where no Schema is at hand, is refused with the value received."""
    from tfemb import experiment

    schema, _ = _field_schema()
    model = experiment.build_model(schema, {"name": "deepfm", "embedding_dim": 8},
                                   {"scheme": "md", "params": {"blocking": "field", "alpha": 0.5}})
    assert {f: model.embedding_layers[f].block_dims for f in "abc"} == {"a": [8], "b": [5], "c": [3]}
    popular = experiment.build_model(schema, {"name": "deepfm", "embedding_dim": 8},
                                     {"scheme": "md", "params": {"blocking": "popularity", "num_blocks": 2}})
    assert popular.embedding_layers["c"].num_blocks == 2
    with pytest.raises(ValueError, match="num_blocks is for blocking='popularity'. Received: num_blocks=2"):
        experiment.build_model(schema, {"name": "deepfm", "embedding_dim": 8},
                               {"scheme": "md", "params": {"blocking": "field", "num_blocks": 2}})
    with pytest.raises(ValueError, match=r"md blocking must be one of \('popularity', 'field'\). "
                                         r"Received: blocking='rows'"):
        scheme_factory("md", output_dim=8, blocking="rows")
    with pytest.raises(ValueError, match="md_field_factory.*Received: blocking='field' in scheme_factory"):
        scheme_factory("md", output_dim=8, blocking="field")


def test_md_schemes_train_in_a_model(tmp_path):
    from tfemb.data.pipeline import make_dataset
    from tfemb.models import DeepFM
    from tfemb.tasks import compile_model

    schema, df = _field_schema()
    x, y = schema.transform(df)
    for embeddings in (md_field_factory(schema, 6, alpha=0.5),
                       scheme_factory("md", output_dim=6, num_blocks=3, alpha=0.5)):
        model = DeepFM(schema, embeddings=embeddings, embedding_dim=6, dnn_units=(4,), embedding_optimizer="adam")
        compile_model(model, learning_rate=0.01)
        history = model.fit(make_dataset(x, y, batch_size=26), epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"]).all()
        assert all(isinstance(layer, MixedDimensionEmbedding) for layer in model.embedding_layers.values())
        # The lazy optimizer needs row-sparse gradients: "auto" keeps the per-id gather (a small table otherwise
        # takes the projected-table lookup).
        assert not any(layer._table_lookup() for layer in model.embedding_layers.values())
        plain = DeepFM(schema, embeddings=embeddings, embedding_dim=6, dnn_units=(4,))
        assert all(layer._table_lookup() for layer in plain.embedding_layers.values())
        path = str(tmp_path / "model.keras")
        model.save(path)
        reloaded = keras.models.load_model(path)
        inputs = {k: tf.constant(v) for k, v in x.items()}
        np.testing.assert_allclose(np.asarray(reloaded(inputs)), np.asarray(model(inputs)), atol=1e-5)


# ------------------------------------------------------------------------------------------------- tf.distribute
def test_fixed_size_gathers_match_the_exact_lookup():
    # The lookup used under multi-replica strategies gives the same vectors and the same (dense) gradient.
    layer, reference = md_case("permutation")
    ranks = layer.ranks(tf.constant(IDS))
    weights = _values(V, 15, -0.4)  # [n, W]
    with tf.GradientTape(persistent=True) as tape:
        fixed = layer._wide_fixed_size(ranks)
        exact = layer._wide_exact(ranks)
        loss_fixed = tf.reduce_sum(fixed * weights)
        loss_exact = tf.reduce_sum(exact * weights)
    np.testing.assert_array_equal(fixed.numpy(), exact.numpy())
    out = tf.matmul(fixed, layer._stacked_projections())
    np.testing.assert_allclose(out.numpy(), reference(IDS), rtol=1e-5, atol=1e-6)
    g_fixed = tape.gradient(loss_fixed, layer.flat_parameters)
    g_exact = tape.gradient(loss_exact, layer.flat_parameters)
    np.testing.assert_allclose(tf.convert_to_tensor(g_fixed).numpy(), tf.convert_to_tensor(g_exact).numpy(),
                               atol=1e-6)
    # Fixed size: n x W entries whatever the blocks of the batch; exact: sum of the ids' block dims.
    assert g_fixed.indices.shape[0] == V * 15
    assert g_exact.indices.shape[0] == int(np.sum(np.asarray(DIMS)[layer.blocks_array()[IDS]]))


MIRRORED_SCRIPT = textwrap.dedent("""
    import numpy as np
    import tensorflow as tf
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    from tfemb._keras import keras
    from tfemb.layers import MixedDimensionEmbedding
    strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")[:2]])
    for extra in ({}, {"permutation": list(np.random.RandomState(1).permutation(23)), "combiner": "sum"}):
        keras.utils.set_random_seed(0)  # seeded initial weights: an unseeded draw could diverge (NaN) at this rate
        rng = np.random.RandomState(0)
        ids = rng.randint(0, 23, size=(32, 3) if extra else (32,)).astype(np.int64)
        with strategy.scope():
            layer = MixedDimensionEmbedding(23, 7, [3, 5, 15], [7, 5, 3], **extra)
            inputs = keras.Input(shape=ids.shape[1:], dtype="int64")
            model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Flatten()(layer(inputs))))
            model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss="mse")
        before = [w.numpy().copy() for w in layer.trainable_weights]
        history = model.fit(ids, rng.normal(size=(32, 1)).astype("float32"), batch_size=8, epochs=3, verbose=0)
        assert np.all(np.isfinite(history.history["loss"])), history.history
        assert all(not np.allclose(b, w.numpy()) for b, w in zip(before, layer.trainable_weights))
    print("MIRRORED_OK")
""")


def test_trains_under_mirrored_strategy():
    # In a fresh process: the CPU is split into two logical devices there, and one MirroredStrategy per process
    # avoids tensorflow/tensorflow#62790 (see tests/test_layers_distribute.py). Tables gathered with a per-replica
    # varying number of rows crashed this (segfault); the layer then uses fixed-size gathers.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "MIRRORED_OK" in proc.stdout, (proc.returncode, proc.stderr[-3000:])


# ---------------------------------------------------------------------------------------------- from counts
def test_from_frequencies_cf_rule():
    layer = MixedDimensionEmbedding.from_frequencies(SORTED_COUNTS, D0, num_blocks=3, alpha=0.5)
    assert (layer.block_sizes, layer.block_dims, layer.permutation, layer.oov_rank) == (SIZES, DIMS, None, 0)
    schema_layer = MixedDimensionEmbedding.from_frequencies(SCHEMA_COUNTS, D0, num_blocks=3, alpha=0.5)
    assert (schema_layer.block_sizes, schema_layer.block_dims) == (SIZES, DIMS)
    assert schema_layer.oov_rank == SCHEMA_OOV_RANK and schema_layer.permutation is None
    shuffled = SORTED_COUNTS[np.asarray(PERM)]  # id x has the count of rank PERM[x]
    perm_layer = MixedDimensionEmbedding.from_frequencies(shuffled, D0, num_blocks=3, alpha=0.5)
    assert perm_layer.block_dims == DIMS
    # Ranks by a stable sort of the counts (equal counts may rank differently from PERM): stored as a permutation.
    ranks = np.empty(V, dtype=int)
    ranks[np.argsort(-shuffled, kind="stable")] = np.arange(V)
    assert perm_layer.permutation == ranks.tolist()
    np.testing.assert_array_equal(perm_layer.dims_per_id(), np.asarray(DIMS)[
        np.searchsorted(OFFSETS, ranks, side="right") - 1])
    budgeted = MixedDimensionEmbedding.from_frequencies(SCHEMA_COUNTS, D0, num_blocks=3, alpha=0.5, budget=120)
    assert budgeted.block_dims == [4, 3, 2] and budgeted.parameter_count() == 120
    tables_only = MixedDimensionEmbedding.from_frequencies(
        SCHEMA_COUNTS, D0, num_blocks=3, alpha=0.5, budget=100, budget_counts_projections=False)
    assert tables_only.block_dims == [7, 6, 3]


def test_scheme_factory_md():
    assert get_scheme_class("md") is MixedDimensionEmbedding
    layer = scheme_factory("md", output_dim=D0, num_blocks=3, alpha=0.5)("item", V, SCHEMA_COUNTS)
    assert layer.name == "item_embedding" and layer.block_dims == DIMS and layer.oov_rank == SCHEMA_OOV_RANK
    with pytest.raises(ValueError, match=r"frequencies=None for feature 'item'"):
        scheme_factory("md", output_dim=D0)("item", V, None)
    with pytest.raises(ValueError, match=r"budget=100"):
        scheme_factory("md", output_dim=D0, compression=2.0, budget=100)


@pytest.mark.parametrize("vocabulary_size", [1000, 54_321])
@pytest.mark.parametrize("compression", [1.0, 4.0, 8.0])
def test_scheme_factory_md_compression(vocabulary_size, compression):
    dim = 16
    counts = np.concatenate([[3.0], 1e5 / np.arange(1, vocabulary_size) ** 1.1])  # Zipf, Schema order
    layer = scheme_factory("md", output_dim=dim, compression=compression)("f", vocabulary_size, counts)
    budget = vocabulary_size * dim / compression
    # At most the budget, and short of it by less than one more dim for the largest block (the rounding step of
    # the budget form: on a Zipf vocabulary the last equal-mass block holds most of the rows).
    params = layer.parameter_count()
    assert budget - max(layer.block_sizes) < params <= budget, (layer.block_sizes, layer.block_dims, params, budget)
    assert layer.permutation is None and layer.num_blocks == 8


def test_scheme_factory_md_tiny_vocabulary():
    # 3 ids x 8 dims / 16 = 1.5 parameters: no block layout fits; one block of dim 1 is the smallest layer.
    layer = scheme_factory("md", output_dim=8, compression=16.0)("f", 3, [0.0, 5.0, 2.0])
    assert layer.block_sizes == [3] and layer.block_dims == [1] and layer.parameter_count() == 3 + 8


# --------------------------------------------------------------------------------------------- size accounting
def test_size_accounting_by_hand():
    # Tables 3*7 + 5*5 + 15*3 = 91, projections 5*7 + 3*7 = 56 -> 147 parameters, 588 bytes in float32;
    # a stored permutation adds 23 ids x 4 bytes = 92.
    for kind, nbytes in [("identity", 588), ("oov_rank", 588), ("permutation", 680)]:
        layer, _ = md_case(kind)
        assert layer.parameter_count() == 147 and layer.storage_bytes() == nbytes
        floats = [w for w in layer.weights if tf.as_dtype(w.dtype).is_floating]
        assert sum(int(np.prod(w.shape)) for w in floats) == 147
        assert sum(int(np.prod(w.shape)) for w in layer.sparse_tables()) == 147  # the one flat buffer
        assert layer._layout.table_size == 91
        blocks = np.searchsorted(OFFSETS, _ranks(kind), side="right") - 1
        np.testing.assert_array_equal(layer.dims_per_id(), np.asarray(DIMS)[blocks])
    assert md_case("identity")[0].dims_per_id().tolist() == [7] * 3 + [5] * 5 + [3] * 15
    oov = md_case("oov_rank")[0].dims_per_id()
    assert oov[0] == 3 and oov[1:4].tolist() == [7] * 3 and oov[4:9].tolist() == [5] * 5 and set(oov[9:]) == {3}
    assert MixedDimensionEmbedding(V, D0, SIZES, DIMS, dtype="float64").storage_bytes() == 147 * 8


# ----------------------------------------------------------------------------------------------------- compact
def test_compact_and_premultiply():
    layer, reference = md_case("permutation")
    expected = reference(IDS)
    report = {row["block"]: row for row in layer.premultiply_report()}
    # Block 1 (5 rows, dim 5): factors 25 + 35 = 60 vs 5 x 7 = 35 premultiplied -> smaller. Block 2 (15 rows,
    # dim 3): 45 + 21 = 66 vs 105 -> not.
    assert (report[1]["factored"], report[1]["premultiplied"], report[1]["smaller"]) == (60, 35, True)
    assert (report[2]["factored"], report[2]["premultiplied"], report[2]["smaller"]) == (66, 105, False)
    # Premultiplied blocks are at d0, and adjacent blocks at d0 are stored as one (identity projections).
    for premultiply, sizes, dims, params in [(False, [3, 5, 15], [7, 5, 3], 147), ("auto", [8, 15], [7, 3], 122),
                                             (True, [23], [7], 161)]:
        compact = layer.compact(premultiply=premultiply)
        assert compact.block_sizes == sizes and compact.block_dims == dims and compact.parameter_count() == params
        np.testing.assert_array_equal(compact.dims_per_id(), [7 if p is True or (p == "auto" and d == 5) else d
                                                              for d, p in zip(layer.dims_per_id(),
                                                                              [premultiply] * V)])
        assert compact.storage_bytes() == params * 4 + 92 and not compact.trainable_weights
        np.testing.assert_allclose(compact(tf.constant(IDS)).numpy(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"premultiply='yes'"):
        layer.compact(premultiply="yes")


def _op_types(layer, ids):
    graph = tf.function(lambda x: layer(x)).get_concrete_function(tf.constant(ids)).graph.as_graph_def()
    return [n.op for n in graph.node] + [n.op for f in graph.library.function for n in f.node_def]


@pytest.mark.parametrize("sizes,dims,oov_rank,premultiply,want_sizes,want_dims,params", [
    (SIZES, DIMS, SCHEMA_OOV_RANK, False, [4, 5, 14], [7, 5, 3], 147 + 7 - 3),  # a Schema's OOV rank, block 2
    (SIZES, DIMS, V - 1, False, [4, 5, 14], [7, 5, 3], 151),  # the OOV id least popular
    (SIZES, DIMS, 2, False, [3, 5, 15], [7, 5, 3], 147),  # inside block 0: the same blocks
    (SIZES, DIMS, SCHEMA_OOV_RANK, "auto", [9, 14], [7, 3], 126),  # block 1 premultiplied and merged with 0
    ([3, 1, 19], DIMS, 3, False, [4, 19], [7, 3], 21 + 7 + 57 + 21),  # the OOV row was a block of its own
    ([8, 15], [5, 3], SCHEMA_OOV_RANK, False, [8, 15], [5, 3], 40 + 45 + 35 + 21),  # block 0 below d0: kept
])
def test_compact_stores_the_oov_row_first(sizes, dims, oov_rank, premultiply, want_sizes, want_dims, params):
    """With an ``oov_rank`` and a first block at ``d0``, ``compact()`` stores the OOV id's projected vector as row 0
    of block 0, so that rank = id: no rank ops in the lookup, the same vector for every id (NumPy Algorithm 1)."""
    rng = np.random.default_rng(oov_rank)
    tables = [rng.normal(size=(n, d)).astype(np.float32) for n, d in zip(sizes, dims)]
    projections = [None if d == D0 else rng.normal(size=(d, D0)).astype(np.float32) for d in dims]
    layer = MixedDimensionEmbedding(V, D0, sizes, dims, oov_rank=oov_rank)
    layer.build()
    layer.set_block_weights(tables, projections)
    reference = algorithm1_reference(ranks_from_oov_rank(V, oov_rank), sizes, tables, projections, D0)
    compact = layer.compact(premultiply=premultiply)
    assert (compact.block_sizes, compact.block_dims, compact.parameter_count()) == (want_sizes, want_dims, params)
    moved = dims[0] == D0
    assert compact.oov_rank == (0 if moved else oov_rank) and compact.permutation is None
    assert compact.dims_per_id()[0] == (D0 if moved else layer.dims_per_id()[0])
    for ids in (IDS, IDS.reshape(-1, 1), np.arange(V)):
        np.testing.assert_allclose(compact(tf.constant(ids)).numpy(), reference(ids), rtol=1e-5, atol=1e-5)
    assert ("FloorMod" in _op_types(compact, IDS)) is not moved and "FloorMod" in _op_types(layer, IDS)


def test_compact_fast_exports_small_tables_plain():
    """``compact_premultiply="fast"`` (the default): a layer of at most ``PLAIN_TABLE_ENTRIES`` ``d0``-wide entries
    is one plain table (a gather, no Bucketize or matmul); a larger one is compacted as ``"auto"``."""
    layer, reference = md_case("oov_rank")  # 23 x 7 entries
    assert layer.compact_premultiply == "fast"
    plain = layer.compact()
    assert (plain.block_sizes, plain.block_dims, plain.parameter_count(), plain.oov_rank) == ([V], [D0], V * D0, 0)
    np.testing.assert_allclose(plain(tf.constant(IDS)).numpy(), reference(IDS), rtol=1e-5, atol=1e-5)
    assert not {"Bucketize", "MatMul", "FloorMod"} & set(_op_types(plain, IDS))
    kept = MixedDimensionEmbedding.from_config({**layer.get_config(), "compact_premultiply": False})
    kept.build()
    kept.set_block_weights(TABLES, PROJECTIONS)
    assert kept.compact().block_sizes == [4, 5, 14] and kept.compact_premultiply is False

    rows = PLAIN_TABLE_ENTRIES // 4  # 4 + 4 * rows entries of dim 4: just above the limit
    big = MixedDimensionEmbedding(rows + 1, 4, [1, rows], [4, 1])
    big.build()
    fast, auto = big.compact(), big.compact(premultiply="auto")
    # Block 1 (4,096 rows of dim 1) premultiplied would be 16,384 numbers against 4,100: kept factored.
    assert fast.block_sizes == auto.block_sizes == [1, rows] and fast.block_dims == [4, 1]
    ids = tf.constant(np.random.default_rng(0).integers(0, rows + 1, 50))
    np.testing.assert_allclose(fast(ids).numpy(), big(ids).numpy(), rtol=1e-5, atol=1e-6)
    for bad in (1, "fastest", None):
        with pytest.raises(ValueError, match=f"compact_premultiply must be one of .*Received: compact_premultiply={bad!r}"):
            MixedDimensionEmbedding(V, D0, SIZES, DIMS, compact_premultiply=bad)


@pytest.mark.parametrize("kind", ["identity", "oov_rank"])
def test_head_tail_form_matches_algorithm1(kind, monkeypatch):
    """``compact_premultiply="head"``: blocks 0..k-1 premultiplied into one d0-wide head (ids 0..h-1), the last
    block factored (tail + projection); the outputs of Algorithm 1, two row gathers and a matmul per lookup."""
    layer, reference = md_case(kind)
    layer_mean = md_case(kind, combiner="mean")[0]
    ht, ht_mean = layer.head_tail(), layer_mean.head_tail()
    assert isinstance(ht, HeadTailEmbedding) and not ht.trainable_weights
    t = SIZES[0] + SIZES[1]  # ranks of blocks 0 and 1
    # With the Schema's OOV rank (16, in the last block) id 0's vector joins the head: ids 1..16 keep rank id - 1.
    h = t + 1 if kind == "oov_rank" else t
    assert ht.head_rows == h
    np.testing.assert_allclose(ht(tf.constant(IDS)).numpy(), reference(IDS), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ht_mean(tf.constant(MULTI)).numpy(), layer_mean(tf.constant(MULTI)).numpy(),
                               rtol=1e-5, atol=1e-6)
    two_d = IDS[:20].reshape(5, 4)
    np.testing.assert_allclose(ht(tf.constant(two_d)).numpy(), reference(two_d), rtol=1e-5, atol=1e-5)
    # Sizes by hand: h d0-wide rows, V - h rows of dim 3, the 3 x 7 projection; stored with two zero rows.
    assert ht.parameter_count() == h * D0 + (V - h) * 3 + 3 * D0
    assert ht.storage_bytes() == 4 * (ht.parameter_count() + D0 + 3)
    assert ht.dims_per_id().tolist() == [D0] * h + [3] * (V - h)
    ops = set(_op_types(ht, IDS))
    assert "MatMul" in ops and not {"Bucketize", "FloorMod"} & ops
    copy = HeadTailEmbedding.from_config(ht.get_config())
    copy.build()
    copy.set_weights(ht.get_weights())
    np.testing.assert_array_equal(copy(tf.constant(IDS)).numpy(), ht(tf.constant(IDS)).numpy())
    # compact(premultiply="head") gives it above the plain-table size; a plain table at or below, as "fast".
    assert layer.compact(premultiply="head").block_sizes == [V]
    monkeypatch.setattr(md_module, "PLAIN_TABLE_ENTRIES", 0)
    assert isinstance(layer.compact(premultiply="head"), HeadTailEmbedding)


def test_head_tail_form_where_it_does_not_apply(monkeypatch):
    """No head-tail form for one block, a last block at d0, or a permutation that scatters the last block's ids
    among the first (h would be far above the last block's offset): compact(premultiply="head") is then "fast"."""
    monkeypatch.setattr(md_module, "PLAIN_TABLE_ENTRIES", 0)
    layer, reference = md_case("permutation")
    assert layer.head_tail() is None
    fallback = layer.compact(premultiply="head")
    assert isinstance(fallback, MixedDimensionEmbedding)
    np.testing.assert_allclose(fallback(tf.constant(IDS)).numpy(), reference(IDS), rtol=1e-5, atol=1e-5)
    for sizes, dims in (([V], [3]), (SIZES, [7, 5, 7])):
        assert MixedDimensionEmbedding(V, D0, sizes, dims).head_tail() is None


def test_head_tail_bad_arguments_are_named():
    for kwargs, message in (({"head_rows": V + 1, "tail_dim": 3}, f"head_rows must be in \\[0, vocabulary_size={V}\\]. "
                                                                   f"Received: head_rows={V + 1}"),
                            ({"head_rows": 3, "tail_dim": 8}, "tail_dim must be at most output_dim=7. Received: tail_dim=8"),
                            ({"head_rows": 3, "tail_dim": 3, "trainable": True}, "inference-only. Received: trainable=True")):
        with pytest.raises(ValueError, match=message):
            HeadTailEmbedding(V, D0, **kwargs)
    with pytest.raises(ValueError, match=r"projection \[d_k, d0\]. Received: shapes \(3, 7\), \(20, 3\), \(7, 3\)"):
        HeadTailEmbedding.from_arrays(np.zeros((3, 7)), np.zeros((20, 3)), np.zeros((7, 3)))


# ------------------------------------------------------------------------------------------------ contract
CONTRACT = [
    ({"vocabulary_size": V, "output_dim": D0, "block_sizes": SIZES, "block_dims": DIMS}, IDS[:6], (6, 7)),
    ({"vocabulary_size": V, "output_dim": D0, "block_sizes": SIZES, "block_dims": DIMS, "permutation": PERM,
      "combiner": "mean"}, MULTI, (5, 7)),
    ({"vocabulary_size": V, "output_dim": D0, "block_sizes": SIZES, "block_dims": DIMS,
      "oov_rank": SCHEMA_OOV_RANK}, IDS[:6].reshape(3, 2), (3, 2, 7)),
    ({"vocabulary_size": V, "output_dim": D0, "block_sizes": [V], "block_dims": [2], "combiner": "sqrtn",
      "frequencies": SCHEMA_COUNTS.tolist()}, MULTI, (5, 7)),
]


@pytest.mark.parametrize("kwargs,ids,shape", CONTRACT)
def test_run_scheme_test(kwargs, ids, shape):
    trained = run_scheme_test(MixedDimensionEmbedding, kwargs, ids, shape)
    assert isinstance(trained, MixedDimensionEmbedding)


def test_loads_weights_of_the_per_block_layout():
    # .keras files written before the flat buffer hold one variable per block table and projection (then id_ranks).
    layer, reference = md_case("permutation")
    fresh = MixedDimensionEmbedding(V, D0, SIZES, DIMS, permutation=PERM)
    fresh.build()
    legacy = [TABLES[0], TABLES[1], PROJECTIONS[1], TABLES[2], PROJECTIONS[2], np.asarray(PERM, np.int32)]
    fresh.load_own_variables({str(i): v for i, v in enumerate(legacy)})
    np.testing.assert_allclose(fresh(tf.constant(IDS)).numpy(), reference(IDS), rtol=1e-5, atol=1e-6)
    # The current layout loads as it is; a wrong number of variables is refused with the expected names.
    again = MixedDimensionEmbedding(V, D0, SIZES, DIMS, permutation=PERM)
    again.build()
    again.load_own_variables({"0": tf.convert_to_tensor(layer.flat_parameters).numpy(),
                              "1": np.asarray(PERM, np.int32)})
    np.testing.assert_allclose(again(tf.constant(IDS)).numpy(), reference(IDS), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"flat_parameters, id_ranks.*Received: 3 variables"):
        again.load_own_variables({str(i): v for i, v in enumerate(legacy[:3])})


def test_config_round_trip_keeps_the_blocks():
    layer = MixedDimensionEmbedding.from_frequencies(SCHEMA_COUNTS, D0, num_blocks=3, alpha=0.5, combiner="sum")
    config = layer.get_config()
    assert config["block_sizes"] == SIZES and config["block_dims"] == DIMS
    assert config["oov_rank"] == SCHEMA_OOV_RANK and config["permutation"] is None
    clone = MixedDimensionEmbedding.from_config(config)
    assert clone.get_config() == config and clone.storage_bytes() == layer.storage_bytes()


# --------------------------------------------------------------------------------------------------- bad input
BAD_CALLS = [
    (lambda: alpha_power_dims(P, D0, 0), r"alpha=0"),
    (lambda: alpha_power_dims(P, D0, -0.5), r"alpha=-0.5"),
    (lambda: alpha_power_dims(P, D0, float("nan")), r"alpha=nan"),
    (lambda: budget_dims(P, SIZES, 0.0, 100), r"alpha=0.0"),
    (lambda: MixedDimensionEmbedding.from_frequencies(SORTED_COUNTS, D0, alpha=-1), r"alpha=-1"),
    (lambda: cf_blocks(SORTED_COUNTS, 0), r"num_blocks=0"),
    (lambda: cf_blocks(SORTED_COUNTS, -1), r"num_blocks=-1"),
    (lambda: MixedDimensionEmbedding.from_frequencies(SORTED_COUNTS, D0, num_blocks=-2), r"num_blocks=-2"),
    (lambda: budget_dims(P, SIZES, 0.5, 22), r"one dimension.*23 parameters.*budget=22"),
    (lambda: budget_dims(P, SIZES, 0.5, 40, d0=D0, include_projections=True), r"44 parameters.*budget=40"),
    (lambda: budget_dims(P, SIZES, 0.5, -5), r"budget=-5"),
    (lambda: budget_dims(P, [3, 5], 0.5, 100), r"block_sizes=\[3, 5\]"),
    (lambda: budget_dims(P, SIZES, 0.5, 100, include_projections=True), r"d0=None"),
    (lambda: MixedDimensionEmbedding.from_frequencies(SORTED_COUNTS, D0, num_blocks=3, budget=30),
     r"budget=30"),
    (lambda: cf_blocks([1.0, -2.0, 3.0], 2), r"a count of -2"),
    (lambda: cf_blocks([0.0, 0.0], 2), r"positive total"),
    (lambda: cf_blocks(np.ones((2, 3)), 2), r"shape \(2, 3\)"),
    (lambda: scheme_factory("md", output_dim=D0)("f", V, np.ones(22)), r"shape \(22,\)"),
    (lambda: scheme_factory("md", output_dim=D0)("f", V, np.r_[np.ones(22), -3.0]), r"a count of -3"),
    (lambda: MixedDimensionEmbedding(V, D0, SIZES, DIMS, frequencies=np.ones(22)), r"shape \(22,\)"),
    (lambda: alpha_power_dims([0.5, -0.1], D0, 0.5), r"-0.1"),
    (lambda: pow2_round([0, 4]), r"dims=\[0, 4\]"),
    (lambda: dlrm_md_solver([10, 100], 0.3), r"d0 or budget"),
    (lambda: dlrm_md_solver([10, 0], 0.3, d0=4), r"row_counts=\[10, 0\]"),
    (lambda: MixedDimensionEmbedding(V, D0, [3, 5, 14], DIMS), r"block_sizes=\[3, 5, 14\] \(sum 22\)"),
    (lambda: MixedDimensionEmbedding(V, D0, SIZES, [8, 5, 3]), r"block_dims=\[8, 5, 3\]"),
    (lambda: MixedDimensionEmbedding(V, D0, SIZES, [7, 5]), r"block_dims=\[7, 5\]"),
    (lambda: MixedDimensionEmbedding(V, D0, SIZES, [7, 0, 3]), r"block_dims=\[7, 0, 3\]"),
    (lambda: MixedDimensionEmbedding(V, D0, SIZES, DIMS, permutation=[0] * V), r"permutation=\[0, 0"),
    (lambda: MixedDimensionEmbedding(V, D0, SIZES, DIMS, permutation=PERM[:5]), r"shape \(5,\)"),
    (lambda: MixedDimensionEmbedding(V, D0, SIZES, DIMS, oov_rank=23), r"oov_rank=23"),
    (lambda: MixedDimensionEmbedding(V, D0, SIZES, DIMS, oov_rank=2, permutation=PERM), r"oov_rank=2"),
    (lambda: MixedDimensionEmbedding(V, 0, SIZES, DIMS), r"output_dim=0"),
]


@pytest.mark.parametrize("call,message", BAD_CALLS)
def test_bad_input_names_the_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_bad_ids_name_the_layer_and_value():
    layer = MixedDimensionEmbedding(V, D0, SIZES, DIMS, permutation=PERM)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"(?s)ids must be < vocabulary_size=23.*offending ids.*\[30\] at positions: \[1\]"):
        layer(tf.constant([3, 30]))
    with pytest.raises(TypeError, match=r"Received: dtype=float32"):
        layer(tf.constant([1.0]))


def test_docstring_examples_run():
    import doctest

    from tfemb.layers import md_dims, mixed_dimension_embedding

    for module in (md_dims, mixed_dimension_embedding):
        result = doctest.testmod(module, extraglobs={"np": np, "tf": tf}, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, (module.__name__, result)


def _single_block_layer():
    """One block of dim 3 with its projection (a per-field CTR layer), OOV rank as a Schema's."""
    layer = MixedDimensionEmbedding(V, D0, [V], [3], oov_rank=SCHEMA_OOV_RANK)
    layer.build()
    layer.set_block_weights([_values(V, 3, 0.2)], [_values(3, D0, -0.4) / 5.0])
    return layer


@pytest.mark.parametrize("single_block", [False, True])
def test_lookup_modes_agree_and_auto_chooses(single_block):
    """``lookup="table"`` (every block projected, then one gather) equals the per-id gather path in outputs and
    gradients, for 3 blocks and for one projected block; ``"auto"`` takes the table for small trainable layers
    without a lazy optimizer only."""
    layer = _single_block_layer() if single_block else md_case("oov_rank")[0]
    ids = tf.constant([[0, 3], [22, 9], [17, 17]])
    weights = _values(6, D0, 0.1).reshape(3, 2, D0)
    results = {}
    for mode in ("gather", "table"):
        layer.lookup_mode = mode
        with tf.GradientTape() as tape:
            out = layer(ids)
            loss = tf.reduce_sum(out * weights)
        grad = tape.gradient(loss, layer.flat_parameters)
        # The table path's gradient is dense (made dense once at the projected table), the gather path's row-sparse.
        assert isinstance(grad, tf.IndexedSlices) is (mode == "gather")
        results[mode] = (out.numpy(), tf.convert_to_tensor(grad).numpy())
    np.testing.assert_allclose(results["table"][0], results["gather"][0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(results["table"][1], results["gather"][1], rtol=1e-5, atol=1e-6)
    if single_block:
        layer.lookup_mode = "auto"
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(ids) * weights)
        assert not isinstance(tape.gradient(loss, layer.flat_parameters), tf.IndexedSlices)  # auto: the table
        return
    layer.lookup_mode = "auto"
    assert layer._table_lookup()  # 23 x 7 entries: small
    object.__setattr__(layer, "row_sparse_gradients", True)  # as RecModel sets with an embedding_optimizer
    assert not layer._table_lookup()
    big = MixedDimensionEmbedding(2**17, 8, [2**16, 2**16], [8, 2])
    assert not big._table_lookup()  # 2**20 entries: the per-id gather
    frozen = md_case("identity")[0].compact()
    assert not frozen._table_lookup()
    assert MixedDimensionEmbedding.from_config(layer.get_config()).lookup_mode == "auto"
    with pytest.raises(ValueError, match="lookup must be one of .*Received: lookup='dense'"):
        MixedDimensionEmbedding(23, 7, [3, 20], [7, 3], lookup="dense")


@pytest.mark.parametrize("sizes,dims,d0,side_by_side", [
    ([3, 5, 15], [7, 5, 3], 7, True),  # the fixtures' shape: K d_max = 21 <= 2 W = 30
    ([2, 3, 4, 5, 6, 7, 8, 9], [16, 8, 4, 2, 1, 1, 1, 1], 16, False),  # dims falling fast: 128 > 2 * 34
    ([4, 6, 9, 11], [8, 8, 4, 2], 8, True),  # row width g = 2; two blocks at d0 (merged by compact)
    ([5, 4, 6], [3, 8, 2], 8, True),  # a block at d0 between projected ones
])
@pytest.mark.parametrize("permuted", [False, True])
def test_frozen_lookup_matches_numpy(sizes, dims, d0, side_by_side, permuted):
    """A frozen layer (``compact()``, or ``trainable=False``) reads ``d_max`` entries per id and multiplies by the
    projections side by side, or spreads them into the wide row when that is cheaper; both give Algorithm 1's
    vectors (NumPy reference), single and pooled multi-hot ids, eager and traced."""
    rng = np.random.default_rng(len(sizes) + permuted)
    vocab = sum(sizes)
    perm = rng.permutation(vocab) if permuted else np.arange(vocab)
    layer = MixedDimensionEmbedding(vocab, d0, sizes, dims, permutation=perm.tolist() if permuted else None)
    layer.build()
    tables = [rng.normal(size=(n, d)).astype(np.float32) for n, d in zip(sizes, dims)]
    projections = [None if d == d0 else rng.normal(size=(d, d0)).astype(np.float32) for d in dims]
    layer.set_block_weights(tables, projections)
    reference = algorithm1_reference(perm, sizes, tables, projections, d0)

    assert layer._layout.side_by_side is side_by_side
    ids = np.arange(vocab)[::-1]
    for frozen in (layer.compact(premultiply=False),
                   MixedDimensionEmbedding.from_config({**layer.get_config(), "trainable": False})):
        if not frozen.built:
            frozen.build()
            frozen.set_block_weights(tables, projections)
        np.testing.assert_allclose(frozen(tf.constant(ids)).numpy(), reference(ids), rtol=1e-5, atol=1e-5)
        traced = tf.function(lambda x, f=frozen: f(x))(tf.constant(ids.reshape(-1, 1)))
        np.testing.assert_allclose(traced.numpy(), reference(ids.reshape(-1, 1)), rtol=1e-5, atol=1e-5)
    pooled = MixedDimensionEmbedding.from_config({**layer.get_config(), "trainable": False, "combiner": "sum"})
    pooled.build()
    pooled.set_block_weights(tables, projections)
    multi = np.array([[0, vocab - 1, -1], [2, 2, 1]])
    want = np.stack([reference([0, vocab - 1]).sum(0), reference([2, 2, 1]).sum(0)])
    np.testing.assert_allclose(pooled(tf.constant(multi)).numpy(), want, rtol=1e-5, atol=1e-5)


def test_table_lookup_gradient_is_made_dense_once():
    """The gather from ``projected_table()`` gives a row-sparse gradient; it is made dense once at the table, so
    the gradient graph of an 8-block layer has one dense conversion (``UnsortedSegmentSum``), not one per block,
    and no per-block masks (``Where``) cutting a ``tf.IndexedSlices`` up."""
    sizes, dims = [4, 5, 6, 7, 8, 9, 10, 11], [8, 7, 6, 5, 4, 3, 2, 1]
    layer = MixedDimensionEmbedding(sum(sizes), 8, sizes, dims, lookup="table")
    layer.build()

    @tf.function
    def grad(ids):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(ids) ** 2)
        return tape.gradient(loss, layer.flat_parameters)

    ids = tf.constant([0, 5, 33, 59], tf.int64)
    graph = grad.get_concrete_function(ids).graph.as_graph_def()
    # (The id checks' failure branches, which locate the offending ids with a Where, run only on bad ids.)
    ops = [n.op for n in graph.node] + [n.op for f in graph.library.function for n in f.node_def
                                        if not any(m.op == "Assert" for m in f.node_def)]
    assert ops.count("UnsortedSegmentSum") == 1 and ops.count("Where") == 0, sorted(set(ops))
    layer.lookup_mode = "gather"
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(ids) ** 2)
    expected = tf.convert_to_tensor(tape.gradient(loss, layer.flat_parameters)).numpy()
    np.testing.assert_allclose(grad(ids).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_projected_table_and_its_gradient_match_numpy():
    """``projected_table()`` = ``concat_i(E_i @ P_i)`` (a block at d0: ``E_i`` itself), and its gradient with
    respect to the buffer, against NumPy: for a dense upstream (the whole table) and through the ids' gather
    (row slices, repeated ids)."""
    sizes, dims, d0 = [3, 4, 5, 6], [6, 4, 6, 1], 6  # two blocks at d0 (identity), one not adjacent
    layer = MixedDimensionEmbedding(sum(sizes), d0, sizes, dims, lookup="table")
    layer.build()
    rng = np.random.default_rng(3)
    tables = [rng.normal(size=(n, d)).astype(np.float32) for n, d in zip(sizes, dims)]
    projections = [None if d == d0 else rng.normal(size=(d, d0)).astype(np.float32) for d in dims]
    layer.set_block_weights(tables, projections)
    want = np.concatenate([t if p is None else t @ p for t, p in zip(tables, projections)])
    np.testing.assert_allclose(layer.projected_table().numpy(), want, rtol=1e-5, atol=1e-6)

    weights = rng.normal(size=want.shape).astype(np.float32)
    ids = np.array([0, 4, 4, 17, 9, 12])  # ranks = ids here (no permutation, OOV at rank 0)

    def numpy_grads(upstream):  # d/d(E_i) = U_i P_i^T, d/d(P_i) = E_i^T U_i, per block, laid out as the layer does
        g_tables, g_proj, row = [], [], 0
        for t, p in zip(tables, projections):
            u = upstream[row:row + len(t)]
            g_tables.append(u if p is None else u @ p.T)
            g_proj.append(None if p is None else t.T @ u)
            row += len(t)
        probe = MixedDimensionEmbedding(sum(sizes), d0, sizes, dims)
        probe.build()
        probe.set_block_weights(g_tables, g_proj)
        return np.asarray(tf.convert_to_tensor(probe.flat_parameters)).reshape(-1)

    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer.projected_table() * weights)
    got = tf.convert_to_tensor(tape.gradient(loss, layer.flat_parameters)).numpy().reshape(-1)
    np.testing.assert_allclose(got, numpy_grads(weights), rtol=1e-4, atol=1e-5)

    upstream = np.zeros_like(want)
    np.add.at(upstream, ids, weights[: len(ids)])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.gather(layer.projected_table(), tf.constant(ids)) * weights[: len(ids)])
    got = tf.convert_to_tensor(tape.gradient(loss, layer.flat_parameters)).numpy().reshape(-1)
    np.testing.assert_allclose(got, numpy_grads(upstream), rtol=1e-4, atol=1e-5)
