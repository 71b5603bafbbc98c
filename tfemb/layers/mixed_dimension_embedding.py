"""MixedDimensionEmbedding: blocks of rows with their own dims, projected to the base dim (Ginart et al.)."""

from typing import NamedTuple

import numpy as np
import tensorflow as tf

from tfemb._keras import keras, register
from tfemb.layers import md_dims
from tfemb.layers.embedding_scheme import (
    EmbeddingScheme, check_frequencies, check_positive_int, dtype_bytes, fresh_initializer, multi_replica,
    reshape_to_ids,
)

#: Bytes per entry of a stored id -> rank permutation (int32).
PERMUTATION_BYTES = 4

PREMULTIPLY = (False, True, "auto", "fast", "head")

#: ``premultiply="fast"``: a layer with at most this many ``d0``-wide table entries (``vocabulary_size * d0``;
#: 64 KB in float32) is exported as one plain ``[vocabulary_size, d0]`` table.
PLAIN_TABLE_ENTRIES = 2**14

#: Ranks up to this many are found with ``Bucketize`` (float32 boundaries: exact for integers below 2**24).
_BUCKETIZE_LIMIT = 2**24

#: ``lookup`` modes of ``MixedDimensionEmbedding``.
_LOOKUPS = ("auto", "gather", "table")

#: ``lookup="auto"`` projects the whole table (``"table"``) when it has at most this many ``d0``-wide entries.
_TABLE_LOOKUP_LIMIT = 2**18


@tf.custom_gradient
def _dense_gradient(table):
    """The identity, whose gradient is made dense once: the gather of ids from ``projected_table()`` gives it a
    ``tf.IndexedSlices``, which the gradients of ``concat`` and ``split`` would otherwise cut up block by block
    (a mask, a ``Where`` and gathers per block, then a dense conversion per block for the projection matmuls).
    One ``UnsortedSegmentSum`` here instead: the same values, about 150 fewer ops per table and training step on
    an 8-block layer."""
    def grad(upstream):
        return tf.convert_to_tensor(upstream)
    return tf.identity(table), grad


class Layout(NamedTuple):
    """Where every number of an MD layer lives in its one flat parameter buffer, and the constants of the lookup.

    The buffer holds the block tables ``E_0 .. E_k`` (row-major, block after block: ``table_offsets``), then the
    projections ``P_i`` of the blocks with ``d_i < d0`` (row-major ``d_i x d0``: ``projection_offsets``, -1 for
    a block without one). The lookup works on a "wide" row of ``W = sum_i d_i`` columns, one group of ``d_i``
    columns per block, projected blocks first (in block order), then the blocks of dim ``d0``. An id of rank
    ``r`` in block ``b`` fills only its block's columns: column ``c`` of block ``b`` (``j``-th of the group) holds
    buffer entry ``table_offsets[b] + (r - t_b) d_b + j = column_base[c] + r * column_dim[c]``. The wide row
    times ``[P_stacked; I; ...; I]`` (``W x d0``) is ``E_b[r - t_b] @ P_b``.

    Row width ``g = gcd(d_0, ..., d_k, d0)``: every block dim, every table offset and every projection offset is a
    multiple of ``g``, so the buffer is stored as ``[size / g, g]`` (``[size]`` when ``g = 1``) and the lookup
    gathers whole rows of ``g`` entries: ``g`` times fewer indices in the gather and in its row-sparse gradient,
    which is what a lazy optimizer's cost scales with (a CTR field of dim 16 reads one row of 16, like a fixed
    table). The ``group_*`` arrays are the ``column_*`` ones per group of ``g`` columns, in row units.
    """

    size: int  # parameter_count(): tables + projections
    table_size: int
    table_offsets: np.ndarray  # [K] start of each block table
    projection_offsets: np.ndarray  # [K] start of each projection, -1 when d_i = d0
    uniform_dim: int  # > 0: every id reads d consecutive entries at rank * d (one block, or every block at d0)
    column_block: np.ndarray  # [W] int32: block of each wide column
    column_base: np.ndarray  # [W] int64
    column_dim: np.ndarray  # [W] int64
    projection_positions: np.ndarray  # [Wp, d0] int64: the stacked projections' entries in the buffer
    identity_rows: np.ndarray  # [W - Wp, d0] float: identities of the blocks of dim d0 (after the projections)
    row_width: int  # g
    group_block: np.ndarray  # [W / g] int32
    group_base: np.ndarray  # [W / g] int64, in rows of g
    group_dim: np.ndarray  # [W / g] int64, in rows of g
    projection_rows: np.ndarray  # [Wp, d0 / g] int64: the stacked projections' buffer rows
    max_dim: int  # d_max = max_i d_i
    block_row_base: np.ndarray  # [K] int64: an id of rank r in block b starts at buffer row base[b] + r dim[b]
    block_row_dim: np.ndarray  # [K] int64: d_b / g
    column_within: np.ndarray  # [W] int64: the column of a block's row each wide column holds
    side_by_side: bool  # frozen lookup: projections side by side (K d_max <= 2 W multiply-adds per id and d0)


def md_layout(block_sizes, block_dims, output_dim):
    """The ``Layout`` of an MD layer (pure NumPy)."""
    sizes = np.asarray(block_sizes, dtype=np.int64)
    dims = np.asarray(block_dims, dtype=np.int64)
    d0 = int(output_dim)
    rank_offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    table_offsets = np.concatenate([[0], np.cumsum(sizes * dims)[:-1]])
    table_size = int(np.sum(sizes * dims))
    projected = dims != d0
    projection_offsets = np.full(dims.shape, -1, dtype=np.int64)
    projection_offsets[projected] = table_size + np.concatenate([[0], np.cumsum(dims[projected] * d0)[:-1]])
    size = table_size + int(np.sum(dims[projected] * d0))
    uniform = int(dims[0]) if (len(dims) == 1 or np.all(dims == d0)) else 0
    order = list(np.flatnonzero(projected)) + list(np.flatnonzero(~projected))
    column_block = np.concatenate([np.full(dims[b], b) for b in order]).astype(np.int32)
    within = np.concatenate([np.arange(dims[b]) for b in order])
    column_dim = dims[column_block]
    column_base = table_offsets[column_block] - rank_offsets[column_block] * column_dim + within
    wp = int(np.sum(dims[projected]))
    projection_positions = (table_size + np.arange(wp * d0, dtype=np.int64)).reshape(wp, d0)
    identity_rows = np.tile(np.eye(d0, dtype=np.float32), (int(np.sum(~projected)), 1))
    g = int(np.gcd.reduce(np.concatenate([dims, [d0]])))
    group_block, group_base, group_dim = column_block[::g], column_base[::g] // g, column_dim[::g] // g
    projection_rows = projection_positions[:, ::g] // g
    dmax, k = int(dims.max()), len(dims)
    return Layout(size, table_size, table_offsets, projection_offsets, uniform, column_block,
                  column_base.astype(np.int64), column_dim.astype(np.int64), projection_positions, identity_rows,
                  g, group_block.astype(np.int32), group_base.astype(np.int64), group_dim.astype(np.int64),
                  projection_rows.astype(np.int64), dmax, (table_offsets - rank_offsets * dims) // g, dims // g,
                  within.astype(np.int64), bool(k * dmax <= 2 * column_block.shape[0]))


def _check_premultiply(value, name="premultiply"):
    # ``in`` would accept 1 and 0 (equal to True and False): compare types too.
    if not any(value == m and type(value) is type(m) for m in PREMULTIPLY):
        raise ValueError(f"{name} must be one of {PREMULTIPLY}. Received: {name}={value!r}")
    return value


def side_by_side_projections(block_dims, output_dim, layout):
    """``(rows, kept, identity)`` of the frozen lookup's projections side by side (``[d_max, K d0]``; pure NumPy,
    built only for a frozen layer that takes that path): ``rows`` ``[d_max, K d0 / g]`` the buffer rows of each
    projection (0 where none; int32 where it fits, as it is a constant of the exported graph), ``kept`` which
    entries are read from the buffer (row ``j < d_b`` of a projected block), ``identity`` the identity of each
    block of dim ``d0`` (zeros elsewhere), or a scalar 0 when no block is at ``d0``."""
    dims, d0, g, dmax = np.asarray(block_dims), int(output_dim), layout.row_width, layout.max_dim
    k = len(dims)
    rows = np.zeros((dmax, k * d0 // g), dtype=np.int32 if layout.size // g < 2**31 else np.int64)
    kept = np.zeros((dmax, k * d0), dtype=bool)
    identity = np.zeros((dmax, k * d0), dtype=np.float32)
    for b, d in enumerate(int(x) for x in dims):
        if layout.projection_offsets[b] >= 0:
            rows[:d, b * d0 // g:(b + 1) * d0 // g] = (
                layout.projection_offsets[b] + np.arange(d)[:, None] * d0 + np.arange(0, d0, g)[None, :]) // g
            kept[:d, b * d0:(b + 1) * d0] = True
        else:
            identity[np.arange(d), b * d0 + np.arange(d)] = 1.0
    return rows, kept, identity if identity.any() else np.zeros((), np.float32)


@register
class MixedDimensionEmbedding(EmbeddingScheme):
    """Mixed-dimension (MD) embedding layer of Ginart et al.: popular rows get more dimensions.

    The ``vocabulary_size`` rows, taken in rank order (most popular first), are cut into ``K = k + 1`` blocks of
    ``n_i`` rows (``block_sizes``). Block ``i`` has a table ``E_i`` (``n_i x d_i``) and, when ``d_i < d0``
    (``d0 = output_dim``), a projection ``P_i`` (``d_i x d0``); a block of dim ``d0`` uses the identity. As in
    the paper's Algorithm 1, an id of rank ``r`` finds its block ``i`` through the offsets
    ``t_i = sum_{j<i} n_j`` (``t_i <= r < t_{i+1}``) and

        e(id) = E_i[r - t_i] @ P_i          (a ``d0`` vector; ``E_i[r - t_i]`` when ``d_i = d0``).

    **Storage.** All tables and projections live in ONE flat variable ``flat_parameters`` of exactly
    ``parameter_count()`` floats (the tables row-major block after block, then the projections; ``md_layout``),
    so an optimizer, a regulariser or a checkpoint sees one variable per layer, as for a fixed table. It is
    shaped ``[parameter_count() / g, g]`` with the row width ``g = gcd(block dims, d0)`` (``[parameter_count()]``
    when ``g = 1``), so lookups and their sparse gradients move whole rows of ``g`` entries.
    ``block_tables()`` / ``block_projections()`` give the per-block arrays, ``set_block_weights`` assigns them.

    **Lookup** (a fixed number of ops, whatever ``K``): the block of each rank by one ``Bucketize``; every id's
    ``d_b`` entries gathered into its block's columns of a ``[n, sum_i d_i]`` matrix (zeros elsewhere; ids never
    gather entries of other blocks); one matmul with the projections stacked vertically (identities for blocks
    of dim ``d0``). With one block, or every block at ``d0``, the ids read ``d`` consecutive entries and the
    projection (if any) follows. Everything is differentiable: the gradient of ``flat_parameters`` is row-sparse
    (``tf.IndexedSlices``) over exactly the table entries the batch looked up plus the projections' entries, so
    tfemb's lazy optimizers (``sparse_tables()``) update nothing else. Under a multi-replica ``tf.distribute``
    strategy the gather has a fixed size instead (entries of other blocks are read at position 0 and masked to
    zero, so each replica's gradient has the same number of entries; see ``_wide_fixed_size``).

    **Small tables** (``lookup="table"``): every block projected at once, ``T = concat_i(E_i @ P_i)``
    (``projected_table()``, ``[vocabulary_size, d0]``), then one gather of the ids' rows; the same vectors and
    gradient values, but the buffer's gradient is dense (made dense once, at the projected table, so that the
    per-block gradients are plain slices and matmuls). For a vocabulary of a few thousand ids this costs
    fewer ops than the per-id path and is the faster one in training. ``lookup="auto"`` (default) takes it when
    the layer is trainable, has at most ``2**18`` ``d0``-wide rows (``vocabulary_size * d0``), and no lazy
    row-sparse optimizer needs its gradient (``RecModel(embedding_optimizer=...)`` marks its layers), also for a
    single projected block (a per-field CTR layer, whose per-id path gathers ``d`` single entries per id when
    ``g = 1``: in three interleaved Criteo DeepFM runs the table path trained 1.06x, 0.97x and 1.20x as fast);
    ``lookup="gather"`` always uses the per-id path, and so does a layer with a ``gather_rows`` hook installed
    (export quantisation reads every table entry through it).

    **Frozen** (``compact()``, or ``trainable=False``; no gradient needed): each id reads the ``d_max`` buffer
    entries from its row's start and ONE matmul with the projections side by side picks its block's result
    (``_frozen_lookup``): the same vectors with fewer graph ops, the serving path of an exported model.

    Rank of an id: ``rank = id`` by default (ids already in descending popularity); ``oov_rank = r0`` for a
    ``tfemb.data.Schema``'s numbering, where only the OOV id 0 is out of place (``rank(0) = r0``, ids
    ``1..r0`` move up one, the others keep their id); or an explicit ``permutation`` (``permutation[id]`` =
    rank), stored as a non-trainable int32 weight ``id_ranks`` and counted in ``storage_bytes`` (4 bytes per id).

    Use ``from_frequencies`` (Algorithm 2 blocking + Algorithm 3 dims, the CF setting) or ``from_schema``;
    ``md_field_factory`` gives each CTR field one block (the paper's CTR setting, dlrm's per-table rule);
    ``tfemb.layers.md_dims`` has the rules themselves.

    Initialisation: each block table by ``embeddings_initializer`` (default ``"uniform"``, U(-0.05, 0.05) as
    tfemb's other tables) with its own shape ``(n_i, d_i)``, each projection by ``projections_initializer``
    (default ``"glorot_uniform"``, the xavier_uniform of dlrm's ``PrEmbeddingBag``) with shape ``(d_i, d0)``.
    dlrm draws its tables from U(-sqrt(1/n), sqrt(1/n)); pass ``embeddings_initializer`` to match.

    Args:
        vocabulary_size: int, number of ids (OOV id 0 included); ``sum(block_sizes)`` must equal it.
        output_dim: int, the base dimension ``d0`` every vector is projected to.
        block_sizes: list of ints >= 1, rows of each block, most popular block first.
        block_dims: list of ints in ``[1, output_dim]``, dim of each block.
        permutation: optional list of ``vocabulary_size`` ints, a permutation: the rank of each id.
        oov_rank: int in ``[0, vocabulary_size)``, rank of id 0 when ``permutation`` is None. Default 0.
        embeddings_initializer: initializer of the block tables.
        projections_initializer: initializer of the projections.
        lookup: ``"auto"`` (default), ``"gather"`` (per-id, row-sparse gradient) or ``"table"`` (whole
            projected table, then a gather); see **Small tables**.
        compact_premultiply: what ``compact()`` (and so the export) does with the projections, one of
            ``PREMULTIPLY``; default ``"fast"`` (see ``compact``).
        **kwargs: ``combiner``, ``frequencies`` (kept for reports), ``validate_ids`` and base Layer arguments.

    Input shape:
        int tensor ``[batch]`` or ``[batch, k]``.

    Output shape:
        ``[batch, output_dim]`` / ``[batch, k, output_dim]``, or ``[batch, output_dim]`` with a combiner.

    Example:

    >>> layer = MixedDimensionEmbedding(23, 7, block_sizes=[3, 5, 15], block_dims=[7, 5, 3])
    >>> layer(tf.constant([0, 5, 22])).shape
    TensorShape([3, 7])
    >>> layer.parameter_count()  # tables 3*7 + 5*5 + 15*3, projections 5*7 + 3*7
    147
    >>> layer.flat_parameters.shape  # all of them in one variable
    TensorShape([147])
    >>> layer.dims_per_id()[[0, 3, 8]].tolist()
    [7, 5, 3]

    References:
        - Ginart, Naumov, Mudigere, Yang, Zou, "Mixed Dimension Embeddings with Application to
          Memory-Efficient Recommendation Systems", arXiv:1909.11810 (ISIT 2021).
        - facebookresearch/dlrm, ``tricks/md_embedding_bag.py`` (``PrEmbeddingBag``, ``md_solver``).
    """

    def __init__(self, vocabulary_size, output_dim, block_sizes, block_dims, permutation=None, oov_rank=0,
                 embeddings_initializer="uniform", projections_initializer="glorot_uniform", lookup="auto",
                 compact_premultiply="fast", **kwargs):
        super().__init__(vocabulary_size, output_dim, **kwargs)
        if lookup not in _LOOKUPS:
            raise ValueError(f"lookup must be one of {_LOOKUPS}. Received: lookup={lookup!r}")
        self.lookup_mode = lookup
        self.compact_premultiply = _check_premultiply(compact_premultiply, "compact_premultiply")
        sizes = md_dims.check_sizes(block_sizes, "block_sizes")
        if int(sizes.sum()) != self.vocabulary_size:
            raise ValueError(
                f"block_sizes must add up to vocabulary_size={self.vocabulary_size}. Received: "
                f"block_sizes={md_dims._short(block_sizes)} (sum {int(sizes.sum())})"
            )
        dims = md_dims.check_sizes(block_dims, "block_dims", length=sizes.shape[0])
        if np.any(dims > self.output_dim):
            raise ValueError(
                f"block_dims must be <= output_dim={self.output_dim} (blocks are projected up to the base dim). "
                f"Received: block_dims={md_dims._short(block_dims)}"
            )
        self.block_sizes = [int(n) for n in sizes]
        self.block_dims = [int(d) for d in dims]
        self.permutation = self._check_permutation(permutation)
        self.oov_rank = check_positive_int("oov_rank", oov_rank, minimum=0)
        if self.oov_rank >= self.vocabulary_size:
            raise ValueError(
                f"oov_rank must be < vocabulary_size={self.vocabulary_size}. Received: oov_rank={self.oov_rank}"
            )
        if self.permutation is not None and self.oov_rank:
            raise ValueError(
                f"oov_rank is only used without a permutation (the permutation already ranks id 0). Received: "
                f"oov_rank={self.oov_rank} and a permutation"
            )
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.projections_initializer = keras.initializers.get(projections_initializer)
        self._offsets = [int(t) for t in np.concatenate([[0], np.cumsum(sizes)[:-1]])]
        # A plain attribute (a tuple of NumPy arrays) that Keras does not track.
        object.__setattr__(self, "_layout", md_layout(self.block_sizes, self.block_dims, self.output_dim))

    def _check_permutation(self, permutation):
        if permutation is None:
            return None
        perm = np.asarray(permutation)
        if perm.ndim != 1 or perm.shape[0] != self.vocabulary_size or not np.issubdtype(perm.dtype, np.integer):
            raise ValueError(
                f"permutation must be {self.vocabulary_size} ints (the rank of each id). Received: shape {perm.shape}, "
                f"dtype {perm.dtype}"
            )
        if not np.array_equal(np.sort(perm), np.arange(self.vocabulary_size)):
            raise ValueError(
                f"permutation must hold each rank 0..{self.vocabulary_size - 1} once. Received: "
                f"permutation={md_dims._short(permutation)}"
            )
        return [int(r) for r in perm]

    # ---------------------------------------------------------------------------------------------- builders
    @classmethod
    def from_frequencies(cls, frequencies, output_dim, num_blocks=8, alpha=0.3, budget=None, round_pow2=False,
                         budget_counts_projections=True, **kwargs):
        """An MD layer sized by the paper's CF rules from per-id counts.

        Algorithm 2 (``md_dims.cf_blocks``): ids ranked by descending count, cut into ``num_blocks`` blocks of
        equal total count. Algorithm 3 on the blocks' mean per-row probabilities ``a_i / (tau n_i)``
        (``md_dims.block_probabilities``): ``d_i = d0 (p_i / max p) ** alpha`` (``md_dims.alpha_power_dims``),
        or, with ``budget``, ``lambda`` solved so that the parameters are the most that fit in ``budget``
        (``md_dims.budget_dims``).

        Args:
            frequencies: per-id counts (length = the vocabulary size), e.g. ``schema.frequencies(name)``.
            output_dim: int, base dimension ``d0``.
            num_blocks: int >= 1, ``k + 1`` (the paper suggests ``k`` in 8..16). Default 8.
            alpha: float > 0, temperature. Default 0.3 (dlrm's ``--md-temperature``).
            budget: optional parameter budget.
            round_pow2: bool, round dims to powers of 2.
            budget_counts_projections: bool, the budget covers ``parameter_count()`` (tables + projections,
                default) or only the paper's ``sum n_i d_i``.
            **kwargs: other layer arguments (``combiner``, ``name``, initializers, ...).
        """
        freq = md_dims.check_counts(frequencies)
        blocking = md_dims.cf_blocks(freq, num_blocks)
        p = md_dims.block_probabilities(blocking.sorted_frequencies, blocking.block_sizes)
        if budget is None:
            dims = md_dims.alpha_power_dims(p, output_dim, alpha, round_pow2)
        else:
            dims = md_dims.budget_dims(p, blocking.block_sizes, alpha, budget, d0=output_dim, round_pow2=round_pow2,
                                       include_projections=budget_counts_projections)
        return cls(
            vocabulary_size=freq.shape[0],
            output_dim=output_dim,
            block_sizes=blocking.block_sizes.tolist(),
            block_dims=dims.tolist(),
            permutation=None if blocking.permutation is None else blocking.permutation.tolist(),
            oov_rank=blocking.oov_rank,
            frequencies=freq,
            **kwargs,
        )

    @classmethod
    def from_schema(cls, schema, feature, output_dim, **kwargs):
        """``from_frequencies`` with a fitted Schema's counts, combiner and the name ``f"{feature}_embedding"``."""
        kwargs.setdefault("combiner", schema.combiner(feature))
        kwargs.setdefault("name", f"{feature}_embedding")
        return cls.from_frequencies(schema.frequencies(feature), output_dim, **kwargs)

    # ----------------------------------------------------------------------------------------------- weights
    @property
    def num_blocks(self):
        return len(self.block_sizes)

    def _projected(self, i):
        return self.block_dims[i] != self.output_dim

    def _flat_initializer(self, shape, dtype=None):
        """Every block table drawn by ``embeddings_initializer`` with its own shape ``(n_i, d_i)`` and every
        projection by ``projections_initializer`` with shape ``(d_i, d0)``, laid out as ``md_layout`` says."""
        dtype = dtype or "float32"
        parts = [tf.reshape(fresh_initializer(self.embeddings_initializer)((n, d), dtype=dtype), [-1])
                 for n, d in zip(self.block_sizes, self.block_dims)]
        parts += [tf.reshape(fresh_initializer(self.projections_initializer)((d, self.output_dim), dtype=dtype), [-1])
                  for i, d in enumerate(self.block_dims) if self._projected(i)]
        return tf.reshape(tf.concat(parts, axis=0), shape)

    def build(self, input_shape=None):
        self.flat_parameters = self.add_weight(
            name="flat_parameters",
            shape=self._buffer_shape(),
            initializer=self._flat_initializer,
            trainable=True,
        )
        self.id_ranks = None
        if self.permutation is not None:
            ranks = np.asarray(self.permutation, dtype=np.int32)

            def ranks_initializer(shape, dtype=None):
                return tf.constant(ranks, dtype=tf.int32, shape=shape)

            self.id_ranks = self.add_weight(
                name="id_ranks",
                shape=(self.vocabulary_size,),
                dtype="int32",
                initializer=ranks_initializer,
                trainable=False,
            )
        self.built = True

    def _buffer_shape(self):
        """``(size,)`` for row width 1, else ``(size / g, g)``."""
        g, size = self._layout.row_width, self._layout.size
        return (size,) if g == 1 else (size // g, g)

    def _flat_numpy(self):
        """The buffer as a 1-D NumPy array (``parameter_count()`` entries in layout order)."""
        if not self.built:
            self.build()
        return np.asarray(tf.convert_to_tensor(self.flat_parameters)).reshape(-1)

    def _flat_tensor(self):
        """The buffer as a 1-D tensor (a read of the whole variable: for views and regularisers, not lookups)."""
        return tf.reshape(tf.convert_to_tensor(self.flat_parameters), [-1])

    def block_tables(self):
        """The block tables ``E_i`` as NumPy arrays ``[n_i, d_i]`` (copies)."""
        flat, lay = self._flat_numpy(), self._layout
        return [flat[s:s + n * d].reshape(n, d).copy()
                for s, n, d in zip(lay.table_offsets, self.block_sizes, self.block_dims)]

    def block_projections(self):
        """The projections ``P_i`` as NumPy arrays ``[d_i, d0]`` (copies), None for a block of dim ``d0``."""
        flat, lay = self._flat_numpy(), self._layout
        return [None if s < 0 else flat[s:s + d * self.output_dim].reshape(d, self.output_dim).copy()
                for s, d in zip(lay.projection_offsets, self.block_dims)]

    def set_block_weights(self, tables, projections=None):
        """Assigns per-block tables ``[n_i, d_i]`` and projections ``[d_i, d0]`` (None, or None entries, for the
        blocks of dim ``d0``; ``projections=None`` keeps the current ones) to ``flat_parameters``."""
        if not self.built:
            self.build()
        flat, lay = self._flat_numpy().copy(), self._layout
        if len(tables) != self.num_blocks:
            raise ValueError(f"{self.name}: expected {self.num_blocks} block tables. Received: {len(tables)}")
        for i, (table, s) in enumerate(zip(tables, lay.table_offsets)):
            shape = (self.block_sizes[i], self.block_dims[i])
            table = np.asarray(table)
            if table.shape != shape:
                raise ValueError(f"{self.name}: block table {i} must have shape {shape}. Received: {table.shape}")
            flat[s:s + table.size] = table.reshape(-1)
        for i, s in enumerate(lay.projection_offsets):
            p = None if projections is None else projections[i]
            if s < 0 or p is None:
                if s >= 0 and projections is not None:
                    raise ValueError(f"{self.name}: block {i} (dim {self.block_dims[i]}) needs a projection")
                continue
            shape = (self.block_dims[i], self.output_dim)
            p = np.asarray(p)
            if p.shape != shape:
                raise ValueError(f"{self.name}: projection {i} must have shape {shape}. Received: {p.shape}")
            flat[s:s + p.size] = p.reshape(-1)
        self.flat_parameters.assign(flat.reshape(self._buffer_shape()))

    @property
    def block_embeddings(self):
        """Read-only views of the block tables (tensors ``[n_i, d_i]``); assign with ``set_block_weights``."""
        lay, flat = self._layout, self._flat_tensor()
        return [tf.reshape(flat[s:s + n * d], (n, d))
                for s, n, d in zip(lay.table_offsets, self.block_sizes, self.block_dims)]

    @property
    def projections(self):
        """Read-only views of the projections (tensors ``[d_i, d0]``, None for blocks of dim ``d0``)."""
        d0, flat = self.output_dim, self._flat_tensor()
        return [None if s < 0 else tf.reshape(flat[s:s + d * d0], (d, d0))
                for s, d in zip(self._layout.projection_offsets, self.block_dims)]

    def _load_variables(self, store):
        """Loads ``.keras`` weights: this layout (one flat buffer), or the per-block variables of tfemb <= 0.x
        (``embeddings_i`` and ``projection_i`` for each block, then ``id_ranks``), converted."""
        first = store["0"]
        if tuple(int(n) for n in first.shape) == self._buffer_shape():
            return super()._load_variables(store)
        if len(first.shape) == 1 and int(first.shape[0]) == self._layout.size:  # the flat layout of row width 1
            self.flat_parameters.assign(np.asarray(first).reshape(self._buffer_shape()))
            if self.id_ranks is not None:
                self.id_ranks.assign(np.asarray(store["1"]))
            return None
        values = [np.asarray(store[str(i)]) for i in range(len(store.keys()))]
        legacy = self.num_blocks + sum(self._projected(i) for i in range(self.num_blocks)) + (
            self.permutation is not None)
        expected = []  # the earlier layout: each block's table, its projection when d_i < d0, then id_ranks
        for i in range(self.num_blocks):
            expected.append((self.block_sizes[i], self.block_dims[i]))
            if self._projected(i):
                expected.append((self.block_dims[i], self.output_dim))
        if self.permutation is not None:
            expected.append((self.vocabulary_size,))
        if [tuple(v.shape) for v in values] != expected:
            raise ValueError(
                f"{self.name}: the saved weights do not fit this MixedDimensionEmbedding (vocabulary_size="
                f"{self.vocabulary_size}, block_sizes={md_dims._short(self.block_sizes)}, block_dims="
                f"{md_dims._short(self.block_dims)}): expected {1 + (self.permutation is not None)} variables "
                f"(flat_parameters{', id_ranks' if self.permutation is not None else ''}; flat_parameters of "
                f"shape {self._buffer_shape()}) or the {legacy} per-block variables of "
                f"the earlier layout. Received: {len(values)} variables of shapes {[v.shape for v in values]}. "
                "They come from a layer of another vocabulary or blocking; build the model from the saved one's "
                "config (keras.models.load_model, or from_config with the same Schema)"
            )
        tables, projections, k = [], [], 0
        for i in range(self.num_blocks):
            tables.append(values[k])
            k += 1
            projections.append(values[k] if self._projected(i) else None)
            k += self._projected(i)
        self.set_block_weights(tables, projections)
        if self.id_ranks is not None:
            self.id_ranks.assign(values[k])

    # ----------------------------------------------------------------------------------------------- forward
    def ranks(self, ids):
        """Rank of each id (its row in the stacked blocks): int64 tensor of the shape of ``ids``."""
        if self.id_ranks is not None:
            return tf.cast(tf.gather(self.id_ranks, ids), tf.int64)
        if self.oov_rank:
            # Ids 1..oov_rank move down one rank and id 0 takes rank oov_rank: (id + oov_rank) mod (oov_rank + 1)
            # on 0..oov_rank; ids above keep their own. With oov_rank = V - 1 (the OOV id is the least popular,
            # as a Schema's id 0 usually is) no valid id is above: two ops.
            cycled = tf.math.floormod(ids + self.oov_rank, self.oov_rank + 1)
            if self.oov_rank == self.vocabulary_size - 1:
                return cycled
            return tf.where(ids > self.oov_rank, ids, cycled)
        return ids

    def block_of(self, ranks):
        """Block of each rank (int32, the shape of ``ranks``): the number of offsets ``t_1..t_k`` it reaches."""
        boundaries = self._offsets[1:]
        if self.vocabulary_size <= _BUCKETIZE_LIMIT:
            return tf.raw_ops.Bucketize(input=ranks, boundaries=[float(t) for t in boundaries])
        flat = tf.reshape(ranks, [1, -1])
        block = tf.searchsorted(tf.constant([boundaries], tf.int64), flat, side="right", out_type=tf.int32)
        return tf.reshape(block, tf.shape(ranks))

    def _gather_groups(self, rows):
        """Buffer rows ``rows`` (int64, any shape ``S``) as ``[*S, g]`` entries, or ``[*S]`` when ``g = 1``."""
        return self.gather_rows(self.flat_parameters, rows)

    def _stacked_projections(self):
        """``[W, d0]``: the projections stacked vertically (read from the buffer), then identities."""
        lay = self._layout
        stacked = self._gather_groups(tf.constant(lay.projection_rows))  # [Wp, d0 / g(, g)]
        if lay.row_width > 1:
            stacked = tf.reshape(stacked, [lay.projection_rows.shape[0], self.output_dim])
        if lay.identity_rows.shape[0]:
            stacked = tf.concat([stacked, tf.constant(lay.identity_rows, dtype=stacked.dtype)], axis=0)
        return stacked

    def _wide_positions(self, ranks):
        """``(valid, positions)``, both ``[n, W / g]``: which groups of ``g`` wide columns each rank fills, and
        their buffer rows."""
        lay = self._layout
        block = self.block_of(ranks)  # [n]
        valid = tf.equal(block[:, tf.newaxis], tf.constant(lay.group_block)[tf.newaxis, :])
        positions = tf.constant(lay.group_base)[tf.newaxis, :] + ranks[:, tf.newaxis] * tf.constant(
            lay.group_dim)[tf.newaxis, :]
        return valid, positions

    def _to_wide(self, grouped):
        """``[n, W / g, g]`` -> ``[n, W]`` (no-op for ``g = 1``)."""
        if self._layout.row_width == 1:
            return grouped
        return tf.reshape(grouped, [-1, self._layout.column_block.shape[0]])

    def _wide_exact(self, ranks):
        """``[n, W]``: each id's entries in its block's columns, zeros elsewhere; only its own buffer rows are
        gathered, so the buffer's gradient lists exactly the looked-up rows."""
        valid, positions = self._wide_positions(ranks)
        where = tf.where(valid)  # [m, 2], m = sum of the ids' block dims / g
        values = self._gather_groups(tf.gather_nd(positions, where))  # [m(, g)]
        shape = tf.shape(positions, out_type=tf.int64)
        if self._layout.row_width > 1:
            shape = tf.concat([shape, [self._layout.row_width]], axis=0)
        return self._to_wide(tf.scatter_nd(where, values, shape))

    def _wide_fixed_size(self, ranks):
        """The same ``[n, W]`` with a gather of fixed size ``n x W`` (other blocks' columns read entry 0 and are
        masked to zero). Used under multi-replica ``tf.distribute`` strategies: table gradients whose number of
        entries varies between replicas crash TensorFlow's cross-replica aggregation (a segfault under
        MirroredStrategy, Keras 3 and 2, TF 2.21; compare tensorflow/tensorflow#42500). The masked reads add zero
        gradients at entry 0, which dense optimizers (the only ones allowed there) treat as no gradient."""
        valid, positions = self._wide_positions(ranks)
        values = self._gather_groups(tf.where(valid, positions, tf.zeros_like(positions)))  # [n, W / g(, g)]
        if self._layout.row_width > 1:
            valid = tf.broadcast_to(valid[:, :, tf.newaxis], tf.shape(values))
        return self._to_wide(tf.where(valid, values, tf.zeros_like(values)))

    def _frozen_lookup(self, ranks):
        """``[n, d0]`` for a frozen layer (``compact()``, inference): each id reads ``d_max`` consecutive buffer
        entries from its row's start (the entries past its block dim belong to the next row, block or the
        projections, always inside the buffer, and meet zero projection rows), then ONE matmul with every block's
        projection side by side (``[d_max, K d0]``) and a per-id pick of its block's ``d0`` columns: no wide
        ``[n, W]`` position or mask arithmetic, fewer graph nodes than ``_wide_fixed_size``. The padded
        projections are built from the buffer each call (``gather_rows``: export quantisation still applies).
        That matmul costs ``K d_max d0`` multiply-adds per id; where it is more than twice the wide row's
        ``W d0`` (dims falling fast over many blocks), the ``d_max`` values are spread into the wide row instead
        (one column gather and a select) and multiplied by the stacked projections. Same outputs either way
        (tested against the NumPy reference); about half the CPU time of ``_wide_fixed_size`` per lookup on
        the serving benchmark's layers."""
        lay = self._layout
        g = lay.row_width
        block = self.block_of(ranks)  # [n] int32
        start = tf.gather(tf.constant(lay.block_row_base), block) + ranks * tf.gather(
            tf.constant(lay.block_row_dim), block)  # [n], in rows of g
        values = self.gather_rows(self.flat_parameters, tf.expand_dims(start, 1) + tf.constant(
            np.arange(lay.max_dim // g, dtype=np.int64)))  # [n, d_max / g(, g)]
        if g > 1:
            values = tf.reshape(values, [-1, lay.max_dim])
        if lay.side_by_side:
            rows, kept, identity = side_by_side_projections(self.block_dims, self.output_dim, lay)
            side = self.gather_rows(self.flat_parameters, tf.constant(rows))  # [d_max, K d0 / g(, g)]
            if g > 1:
                side = tf.reshape(side, kept.shape)
            side = tf.where(tf.constant(kept), side, tf.constant(identity, side.dtype))
            out = tf.reshape(tf.matmul(values, side), [-1, self.num_blocks, self.output_dim])
            return tf.gather(out, block, batch_dims=1)
        wide = tf.gather(values, tf.constant(lay.column_within), axis=1)  # [n, W]
        valid = tf.equal(block[:, tf.newaxis], tf.constant(lay.column_block)[tf.newaxis, :])
        return tf.matmul(tf.where(valid, wide, tf.constant(0, wide.dtype)), self._stacked_projections())

    def _table_lookup(self):
        """Whether ``lookup`` gathers from ``projected_table()`` (see **Small tables** in the class docstring).
        Never when a ``gather_rows`` hook is installed on the layer (export quantisation, ``gathered_tables``):
        the per-id path reads every table entry through it, as the hook's contract needs."""
        if "gather_rows" in self.__dict__:
            return False
        if self.lookup_mode != "auto":
            return self.lookup_mode == "table"
        return (self.trainable and not getattr(self, "row_sparse_gradients", False)
                and self.vocabulary_size * self.output_dim <= _TABLE_LOOKUP_LIMIT)

    def projected_table(self):
        """``[vocabulary_size, d0]`` tensor: every block projected, ``concat_i(E_i @ P_i)`` in rank order (the
        rows Algorithm 1 returns, for all ranks at once), differentiable; read from the whole buffer."""
        d0 = self.output_dim
        # One split of the buffer (its gradient is one concat) into the tables, then the projections.
        sizes = [n * d for n, d in zip(self.block_sizes, self.block_dims)]
        sizes += [d * d0 for i, d in enumerate(self.block_dims) if self._projected(i)]
        pieces = tf.split(self._flat_tensor(), sizes) if len(sizes) > 1 else [self._flat_tensor()]
        projections = iter(pieces[self.num_blocks:])
        parts = []
        for i, (n, d) in enumerate(zip(self.block_sizes, self.block_dims)):
            table = tf.reshape(pieces[i], [n, d])
            if self._projected(i):
                table = tf.matmul(table, tf.reshape(next(projections), [d, d0]))
            parts.append(table)
        return _dense_gradient(parts[0] if len(parts) == 1 else tf.concat(parts, axis=0))

    def lookup(self, ids):
        one_dim = ids.shape.rank == 1  # [n] ids: no reshapes in or out (the serving case, one id per feature)
        flat = self.ranks(ids) if one_dim else tf.reshape(self.ranks(ids), [-1])  # [n]
        lay = self._layout
        if lay.uniform_dim and not (lay.uniform_dim != self.output_dim and self._table_lookup()):
            # One block (or every block at d0): id of rank r reads entries r*d .. r*d + d - 1.
            d, g = lay.uniform_dim, lay.row_width
            if d == g and g > 1:  # one buffer row per id, as a fixed table
                out = self._gather_groups(flat)  # [n, d]
            else:
                positions = flat[:, tf.newaxis] * (d // g) + tf.range(d // g, dtype=tf.int64)[tf.newaxis, :]
                out = tf.reshape(self._gather_groups(positions), [-1, d])  # [n, d]
            if d != self.output_dim:
                out = tf.matmul(out, self._stacked_projections())
        elif self._table_lookup():
            out = tf.gather(self.projected_table(), flat)  # [n, d0]
        else:
            # A frozen layer (compact(), inference) needs no gradient: the padded read and one matmul. Training:
            # exact-size gathers give row-sparse gradients of exactly the looked-up rows; multi-replica strategies
            # need the fixed-size gather (no dynamic shapes).
            if not self.trainable:
                out = self._frozen_lookup(flat)
            else:
                wide = self._wide_fixed_size(flat) if multi_replica() else self._wide_exact(flat)
                out = tf.matmul(wide, self._stacked_projections())  # [n, d0]
        return out if one_dim else reshape_to_ids(out, ids, self.output_dim)

    # ---------------------------------------------------------------------------------------- size accounting
    def ranks_array(self):
        """NumPy int64 array: the rank of every id."""
        if self.permutation is not None:
            return np.asarray(self.permutation, dtype=np.int64)
        return md_dims.ranks_from_oov_rank(self.vocabulary_size, self.oov_rank)

    def blocks_array(self):
        """NumPy int64 array: the block of every id."""
        return np.searchsorted(np.asarray(self._offsets), self.ranks_array(), side="right") - 1

    def parameter_count(self):
        return md_dims.md_parameter_count(self.block_sizes, self.block_dims, self.output_dim)

    def storage_bytes(self):
        permutation = 0 if self.permutation is None else PERMUTATION_BYTES * self.vocabulary_size
        return self.parameter_count() * dtype_bytes(self.variable_dtype) + permutation

    def dims_per_id(self):
        return np.asarray(self.block_dims, dtype=np.int64)[self.blocks_array()]

    def premultiply_report(self):
        """Per block: parameters stored as factors (``E_i``, ``P_i``) vs. premultiplied (``E_i @ P_i``).

        Premultiplying removes a block's matmul from the lookup but stores ``n_i x d0`` instead of
        ``n_i d_i + d_i d0`` numbers, which is smaller only when ``n_i < d_i d0 / (d0 - d_i)``: in practice
        blocks (or CTR fields) of a few rows. Returns a list of dicts with keys ``block``, ``rows``, ``dim``,
        ``factored``, ``premultiplied``, ``smaller`` (True when premultiplying saves parameters).
        """
        report = []
        for i, (rows, dim) in enumerate(zip(self.block_sizes, self.block_dims)):
            factored = rows * dim + (dim * self.output_dim if dim != self.output_dim else 0)
            premultiplied = rows * self.output_dim
            report.append({"block": i, "rows": rows, "dim": dim, "factored": factored,
                           "premultiplied": premultiplied, "smaller": premultiplied < factored})
        return report

    def compact(self, premultiply=None):
        """A frozen copy (the same flat layout and lookup, stock ops: Bucketize, gather, matmul), same outputs.

        Adjacent blocks of dim ``d0`` (identity projections) are stored as one block: the same rows, the same
        parameters and outputs, a narrower lookup. ``block_sizes`` of the compact layer may therefore be fewer.

        A layer ranked with an ``oov_rank`` (a Schema's numbering: the OOV id 0 at rank ``r0``) whose first block
        is at ``d0`` (after premultiplying) stores the OOV id's vector (``E_b[r0 - t_b] @ P_b``, ``d0`` numbers) as
        the first row of that block instead, so that every id's rank is the id itself: the lookup computes no
        rank (two ops fewer per feature), at ``d0 - d_b`` more parameters. ``dims_per_id()[0]`` is then ``d0``.

        Args:
            premultiply: None (default): the layer's ``compact_premultiply`` (``"fast"`` unless configured).
                False: block tables and projections as trained, the smallest form for any block with more than
                ``d_i d0 / (d0 - d_i)`` rows. True: every projected block stored as ``E_i @ P_i`` (``n_i x d0``,
                no projection; for a whole vocabulary this is the size of the uniform table). ``"auto"``: only the
                blocks where that is smaller (``premultiply_report``). ``"fast"``: ``"auto"``, and a layer of at
                most ``PLAIN_TABLE_ENTRIES`` (``2**14``) ``d0``-wide entries (``vocabulary_size * d0``, 64 KB
                in float32) stored as one plain table (True): its lookup is one gather, as a fixed table's. On
                the serving benchmark's eight fields this exports three small fields (101, 301 and 1,001 ids)
                as plain tables, for 9% more embedding parameters and ~10% faster lookups (``docs/methods.md``,
                MD export). A premultiplied block reports ``d0`` in ``dims_per_id`` and ``parameter_count``: it
                is what the compact layer stores.
                ``"head"``: a ``HeadTailEmbedding`` (``head_tail()``): every block but the last premultiplied
                into one ``d0``-wide table, the last block factored; a lookup is two row gathers and one matmul.
                Larger than ``"fast"`` (on the serving benchmark 0.33 against 0.26 of the fixed tables' bytes),
                faster (its lookups ~25% less time). Layers of at most ``PLAIN_TABLE_ENTRIES`` entries are plain
                tables as with ``"fast"``; where ``head_tail()`` does not apply, ``"fast"``.
                ``export_saved_model(..., optimize_for="latency")`` sets it.
        """
        premultiply = _check_premultiply(self.compact_premultiply if premultiply is None else premultiply)
        if premultiply == "head" and self.vocabulary_size * self.output_dim > PLAIN_TABLE_ENTRIES:
            layer = self.head_tail()
            if layer is not None:
                return layer
        if premultiply in ("fast", "head"):
            premultiply = True if self.vocabulary_size * self.output_dim <= PLAIN_TABLE_ENTRIES else "auto"
        if not self.built:
            self.build()
        d0 = self.output_dim
        report = self.premultiply_report()
        sizes, tables, projections, dims = list(self.block_sizes), self.block_tables(), self.block_projections(), []
        for i in range(self.num_blocks):
            merge = projections[i] is not None and (premultiply is True or (
                premultiply == "auto" and report[i]["smaller"]))
            if merge:
                tables[i] = tf.matmul(tables[i], projections[i]).numpy()
                projections[i] = None
            dims.append(d0 if merge else self.block_dims[i])
        oov_rank = self.oov_rank
        if self.permutation is None and oov_rank and dims[0] == d0:
            # The OOV id's vector becomes row 0 of block 0: ids 1..r0 (ranks 0..r0 - 1) move down one row, the
            # other ids keep theirs, so rank = id.
            block = int(np.searchsorted(np.asarray(self._offsets), oov_rank, side="right")) - 1
            row = oov_rank - self._offsets[block]
            vector = tables[block][row]
            if projections[block] is not None:
                vector = tf.matmul(vector[np.newaxis, :], projections[block]).numpy()[0]
            tables[block] = np.delete(tables[block], row, axis=0)
            sizes[block] -= 1
            tables[0] = np.concatenate([vector[np.newaxis, :].astype(tables[0].dtype), tables[0]], axis=0)
            sizes[0] += 1
            if not sizes[block]:
                del sizes[block], tables[block], projections[block], dims[block]
            oov_rank = 0
        # Adjacent blocks at d0 have identity projections: one block holding their rows in the same rank order is
        # the same function with the same parameters, and a narrower wide matrix at lookup.
        merged_sizes, merged_dims, merged_tables, merged_projections = [], [], [], []
        for n, d, table, projection in zip(sizes, dims, tables, projections):
            if merged_dims and d == d0 and merged_dims[-1] == d and projection is None \
                    and merged_projections[-1] is None:
                merged_sizes[-1] += n
                merged_tables[-1] = np.concatenate([merged_tables[-1], table], axis=0)
                continue
            merged_sizes.append(n)
            merged_dims.append(d)
            merged_tables.append(table)
            merged_projections.append(projection)
        config = {**self.get_config(), "block_sizes": merged_sizes, "block_dims": merged_dims, "trainable": False,
                  "frequencies": None, "oov_rank": oov_rank}
        layer = MixedDimensionEmbedding.from_config(config)
        layer.build()
        layer.set_block_weights(merged_tables, merged_projections)
        return layer

    def head_tail(self):
        """The ``HeadTailEmbedding`` of this layer (same outputs), or None where it does not apply.

        Every block but the last is premultiplied (``E_i @ P_i``) into one ``d0``-wide ``head`` table holding ids
        ``0..h-1``, ``h`` the smallest count such that every id from ``h`` on is in the last block; the last block's
        rows of those ids stay factored (``tail``, ``d_k`` wide, and its projection). Without a ``permutation``
        ids follow ranks, so ``h`` is the last block's offset ``t_k``, or ``t_k + 1`` when the OOV id (``oov_rank``)
        is in the last block (its vector is then stored premultiplied in the head). None with one block, a last
        block at ``d0``, or a ``permutation`` that scatters the last block's ids among the others
        (``h > t_k + 1``)."""
        if not self.built:
            self.build()
        k = self.num_blocks
        if k < 2 or not self._projected(k - 1):
            return None
        ranks, offsets = self.ranks_array(), np.asarray(self._offsets)
        blocks = np.searchsorted(offsets, ranks, side="right") - 1  # blocks_array(), without a second rank pass
        t = int(offsets[k - 1])
        head_ids = np.flatnonzero(ranks < t)
        h = int(head_ids.max()) + 1 if head_ids.size else 0
        if h > t + 1:
            return None
        tables, projections = self.block_tables(), self.block_projections()
        head = np.zeros((h, self.output_dim), np.float32)
        for b in range(k):
            ids = np.flatnonzero(blocks[:h] == b)
            if ids.size:
                rows = tables[b][ranks[ids] - offsets[b]]
                head[ids] = rows if projections[b] is None else tf.matmul(rows, projections[b]).numpy()
        tail = tables[k - 1][ranks[h:] - t]
        config = self.get_config()
        keep = {key: config[key] for key in ("name", "dtype", "combiner", "validate_ids") if key in config}
        return HeadTailEmbedding.from_arrays(head, tail, projections[k - 1], **keep)

    def sparse_tables(self):
        """``[flat_parameters]``: its gradient lists the looked-up table entries and the projections' entries."""
        return [self.flat_parameters]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "block_sizes": list(self.block_sizes),
                "block_dims": list(self.block_dims),
                "permutation": None if self.permutation is None else list(self.permutation),
                "oov_rank": self.oov_rank,
                "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
                "projections_initializer": keras.initializers.serialize(self.projections_initializer),
                "lookup": self.lookup_mode,
                "compact_premultiply": self.compact_premultiply,
            }
        )
        return config


# --------------------------------------------------------------------------------------------------- factories
@register
class HeadTailEmbedding(EmbeddingScheme):
    """A frozen mixed-dimension table in two tiers: the ids of the popular blocks read one ``d0``-wide row, the
    others a row of the last (rarest, narrowest) block times its projection::

        e(id) = head[min(id, h)] + tail[max(id - h + 1, 0)] @ projection

    ``head`` holds ids ``0..h-1`` (their block vectors premultiplied by their projections, ``E_i @ P_i``) and a zero
    row ``h``; ``tail`` a zero row 0 and ids ``h..V-1`` of the last block (``d_k`` wide). A lookup is two row
    gathers, one matmul and an add, against the blocks form's bucketize, index arithmetic, an element gather of
    ``d_max`` entries per id and a wide matmul: the ``compact_premultiply="head"`` form of
    ``MixedDimensionEmbedding`` (``head_tail()``), which ``export_saved_model(..., optimize_for="latency")`` takes.
    It stores ``h x d0`` numbers for the head instead of its blocks' ``n_i x d_i`` and projections. Inference only.

    Args:
        vocabulary_size: int, number of ids.
        output_dim: int, ``d0``.
        head_rows: int in ``[0, vocabulary_size]``, ``h``: ids below it read the head.
        tail_dim: int in ``[1, output_dim]``, the last block's dim ``d_k``.
        **kwargs: ``combiner``, ``validate_ids`` and base Layer arguments.

    Example:

    >>> layer = HeadTailEmbedding.from_arrays(np.eye(2, 3, dtype="float32"), np.ones((2, 1), "float32"),
    ...                                       np.full((1, 3), 0.5, "float32"))
    >>> layer(tf.constant([0, 1, 2, 3])).numpy().tolist()
    [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]
    """

    def __init__(self, vocabulary_size, output_dim, head_rows, tail_dim, **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(vocabulary_size, output_dim, **kwargs)
        if self.trainable:
            raise ValueError(f"{self.name}: HeadTailEmbedding is inference-only. Received: trainable=True")
        head_rows = int(head_rows)
        if not 0 <= head_rows <= self.vocabulary_size:
            raise ValueError(f"head_rows must be in [0, vocabulary_size={self.vocabulary_size}]. "
                             f"Received: head_rows={head_rows}")
        tail_dim = check_positive_int("tail_dim", tail_dim)
        if tail_dim > self.output_dim:
            raise ValueError(f"tail_dim must be at most output_dim={self.output_dim}. Received: tail_dim={tail_dim}")
        self.head_rows, self.tail_dim = head_rows, tail_dim

    @classmethod
    def from_arrays(cls, head, tail, projection, **kwargs):
        """A built layer: ``head`` ``[h, d0]`` (the vectors of ids ``0..h-1``), ``tail`` ``[V - h, d_k]`` (ids
        ``h..V-1`` before projection), ``projection`` ``[d_k, d0]``; the zero rows are added here."""
        head, tail, projection = (np.asarray(a) for a in (head, tail, projection))
        if head.ndim != 2 or tail.ndim != 2 or projection.shape != (tail.shape[1], head.shape[1]):
            raise ValueError(f"head must be [h, d0], tail [V - h, d_k] and projection [d_k, d0]. Received: shapes "
                             f"{head.shape}, {tail.shape}, {projection.shape}")
        layer = cls(head.shape[0] + tail.shape[0], head.shape[1], head.shape[0], tail.shape[1], **kwargs)
        layer.build()
        dtype = np.float32 if layer.variable_dtype is None else layer.variable_dtype
        layer.head.assign(np.concatenate([head, np.zeros((1, head.shape[1]))]).astype(dtype))
        layer.tail.assign(np.concatenate([np.zeros((1, tail.shape[1])), tail]).astype(dtype))
        layer.projection.assign(projection.astype(dtype))
        return layer

    def build(self, input_shape=None):
        h, v, d, dk = self.head_rows, self.vocabulary_size, self.output_dim, self.tail_dim
        self.head = self.add_weight(name="head", shape=(h + 1, d), initializer="zeros", trainable=False)
        self.tail = self.add_weight(name="tail", shape=(v - h + 1, dk), initializer="zeros", trainable=False)
        self.projection = self.add_weight(name="projection", shape=(dk, d), initializer="zeros", trainable=False)
        self.built = True

    def lookup(self, ids):
        one_dim = ids.shape.rank == 1
        flat = ids if one_dim else tf.reshape(ids, [-1])
        h = tf.constant(self.head_rows, flat.dtype)
        head = self.gather_rows(self.head, tf.minimum(flat, h))  # [n, d0]; the tail's ids read the zero row h
        tail = self.gather_rows(self.tail, tf.maximum(flat - (h - 1), 0))  # [n, d_k]; the head's read row 0 (zero)
        out = head + tf.matmul(tail, tf.cast(self.projection, tail.dtype))
        return out if one_dim else reshape_to_ids(out, ids, self.output_dim)

    def parameter_count(self):
        h = self.head_rows
        return h * self.output_dim + (self.vocabulary_size - h) * self.tail_dim + self.tail_dim * self.output_dim

    def storage_bytes(self):  # the two zero rows are stored too
        return (self.parameter_count() + self.output_dim + self.tail_dim) * dtype_bytes(self.variable_dtype)

    def dims_per_id(self):
        dims = np.full(self.vocabulary_size, self.tail_dim, dtype=np.int64)
        dims[:self.head_rows] = self.output_dim
        return dims

    def compact(self):
        return self.frozen_copy()

    def get_config(self):
        config = super().get_config()
        config.update({"head_rows": self.head_rows, "tail_dim": self.tail_dim})
        return config


def md_scheme(feature_name, vocabulary_size, frequencies, output_dim, compression=None, num_blocks=8, alpha=0.3,
              round_pow2=False, **kwargs):
    """The layer ``scheme_factory("md", ...)`` builds for one feature (CF blocking of that feature's counts).

    Without ``compression``: ``MixedDimensionEmbedding.from_frequencies`` (the most popular block gets
    ``output_dim``). With ``compression=c``: the budget form for ``vocabulary_size * output_dim / c`` parameters,
    projections included. When that budget cannot give each of ``num_blocks`` blocks one dimension (a tiny
    vocabulary), fewer blocks are tried; with one block the smallest layer (dim 1 + projection,
    ``vocabulary_size + output_dim`` parameters) is used even if it exceeds the budget.
    """
    if frequencies is None:
        raise ValueError(
            f"scheme 'md' needs per-id counts (a Schema's frequencies) to rank and block the ids. Received: "
            f"frequencies=None for feature {feature_name!r}"
        )
    freq = check_frequencies(frequencies, vocabulary_size)
    kwargs.setdefault("name", f"{feature_name}_embedding")
    common = dict(output_dim=output_dim, alpha=alpha, round_pow2=round_pow2, **kwargs)
    if compression is None:
        return MixedDimensionEmbedding.from_frequencies(freq, num_blocks=num_blocks, **common)
    budget = vocabulary_size * output_dim / md_dims.check_compression(compression)
    for blocks in range(check_positive_int("num_blocks", num_blocks), 0, -1):
        try:
            return MixedDimensionEmbedding.from_frequencies(freq, num_blocks=blocks, budget=budget, **common)
        except ValueError as error:
            if "budget is too small" not in str(error):
                raise
    blocking = md_dims.cf_blocks(freq, 1)
    return MixedDimensionEmbedding(
        vocabulary_size, output_dim, [vocabulary_size], [1],
        permutation=None if blocking.permutation is None else blocking.permutation.tolist(),
        oov_rank=blocking.oov_rank, frequencies=freq, **kwargs,
    )


def md_field_factory(schema, output_dim, alpha=0.3, round_pow2=False, threshold=None, compression=None, **kwargs):
    """A scheme factory giving every CTR field one block: the paper's CTR setting, dlrm's per-table rule.

    Field dims come from ``md_dims.md_field_dims`` over ALL sparse features of ``schema`` (dlrm's
    ``md_solver``: ``d ∝ n ** -alpha``, the smallest field gets ``output_dim``; or the budget form with
    ``compression``). Each field is then a ``MixedDimensionEmbedding`` of one block: a ``n x d`` table and,
    when ``d < output_dim``, a ``d x output_dim`` projection (dlrm's ``PrEmbeddingBag``).

    Args:
        schema: a fitted ``tfemb.data.Schema``.
        output_dim: int, the base dimension (the model's embedding dim).
        alpha, round_pow2, threshold, compression: see ``md_dims.md_field_dims``.
        **kwargs: other layer arguments (initializers, ``validate_ids``).

    Returns:
        A callable ``(feature_name, vocabulary_size, frequencies=None) -> MixedDimensionEmbedding`` with the
        attribute ``field_dims`` (dict feature -> dim), for ``RecModel(embeddings=...)``.
    """
    dims = md_dims.md_field_dims(schema, output_dim, alpha, round_pow2, threshold, compression)

    def build(feature_name, vocabulary_size, frequencies=None):
        if feature_name not in dims:
            raise ValueError(
                f"md_field_factory has dims for {sorted(dims)}. Received: feature_name={feature_name!r}"
            )
        return MixedDimensionEmbedding(
            vocabulary_size, output_dim, [vocabulary_size], [dims[feature_name]],
            name=f"{feature_name}_embedding", **kwargs,
        )

    build.scheme_name = "md_field"
    build.scheme_class = MixedDimensionEmbedding
    build.field_dims = dict(dims)
    return build
