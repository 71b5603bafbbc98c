"""MixedDimensionEmbedding: blocks of rows with their own dims, projected to the base dim (Ginart et al.)."""

import numpy as np
import tensorflow as tf

from tfemb._keras import keras, register
from tfemb.layers import md_dims
from tfemb.layers.embedding_scheme import EmbeddingScheme, check_frequencies, check_positive_int, dtype_bytes
from tfemb.layers.qr_embedding import fresh_initializer

#: Bytes per entry of a stored id -> rank permutation (int32).
PERMUTATION_BYTES = 4

PREMULTIPLY = (False, True, "auto")


def _multi_replica():
    """True inside a ``tf.distribute`` strategy with more than one replica."""
    return tf.distribute.has_strategy() and tf.distribute.get_strategy().num_replicas_in_sync > 1


@register
class MixedDimensionEmbedding(EmbeddingScheme):
    """Mixed-dimension (MD) embedding layer of Ginart et al.: popular rows get more dimensions.

    The ``vocabulary_size`` rows, taken in rank order (most popular first), are cut into ``K = k + 1`` blocks of
    ``n_i`` rows (``block_sizes``). Block ``i`` has a table ``E_i`` (``n_i x d_i``) and, when ``d_i < d0``
    (``d0 = output_dim``), a projection ``P_i`` (``d_i x d0``); a block of dim ``d0`` uses the identity. As in
    the paper's Algorithm 1, an id of rank ``r`` finds its block ``i`` through the offsets
    ``t_i = sum_{j<i} n_j`` (``t_i <= r < t_{i+1}``) and

        e(id) = E_i[r - t_i] @ P_i          (a ``d0`` vector; ``E_i[r - t_i]`` when ``d_i = d0``).

    Everything is differentiable: tables (row-sparse gradients, listed in ``sparse_tables()``) and
    projections (dense variables) train together. The batch is split by block with ``tf.dynamic_partition``,
    so each id is gathered and projected once (one gather and one matmul per block over that block's ids
    only), and reassembled with ``tf.dynamic_stitch``; multi-hot lists are pooled by the base class's combiner.
    Under a multi-replica ``tf.distribute`` strategy every table is gathered at all ids instead (same outputs
    and gradients; see ``_lookup_fixed_size_gathers`` for the TensorFlow crash this avoids).

    Rank of an id: ``rank = id`` by default (ids already in descending popularity); ``oov_rank = r0`` for a
    ``tfemb.data.Schema``'s numbering, where only the OOV id 0 is out of place (``rank(0) = r0``, ids
    ``1..r0`` move up one, the others keep their id); or an explicit ``permutation`` (``permutation[id]`` =
    rank), stored as a non-trainable int32 weight ``id_ranks`` and counted in ``storage_bytes`` (4 bytes per id).

    Use ``from_frequencies`` (Algorithm 2 blocking + Algorithm 3 dims, the CF setting) or ``from_schema``;
    ``md_field_factory`` gives each CTR field one block (the paper's CTR setting, dlrm's per-table rule);
    ``tfemb.layers.md_dims`` has the rules themselves.

    Initialisation: tables ``embeddings_initializer`` (default ``"uniform"``, U(-0.05, 0.05) as tfemb's other
    tables), projections ``projections_initializer`` (default ``"glorot_uniform"``, the xavier_uniform of
    dlrm's ``PrEmbeddingBag``). dlrm draws its tables from U(-sqrt(1/n), sqrt(1/n)); pass
    ``embeddings_initializer`` to match.

    Args:
        vocabulary_size: int, number of ids (OOV id 0 included); ``sum(block_sizes)`` must equal it.
        output_dim: int, the base dimension ``d0`` every vector is projected to.
        block_sizes: list of ints >= 1, rows of each block, most popular block first.
        block_dims: list of ints in ``[1, output_dim]``, dim of each block.
        permutation: optional list of ``vocabulary_size`` ints, a permutation: the rank of each id.
        oov_rank: int in ``[0, vocabulary_size)``, rank of id 0 when ``permutation`` is None. Default 0.
        embeddings_initializer: initializer of the block tables.
        projections_initializer: initializer of the projections.
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
    >>> layer.dims_per_id()[[0, 3, 8]].tolist()
    [7, 5, 3]

    References:
        - Ginart, Naumov, Mudigere, Yang, Zou, "Mixed Dimension Embeddings with Application to
          Memory-Efficient Recommendation Systems", arXiv:1909.11810 (ISIT 2021).
        - facebookresearch/dlrm, ``tricks/md_embedding_bag.py`` (``PrEmbeddingBag``, ``md_solver``).
    """

    def __init__(self, vocabulary_size, output_dim, block_sizes, block_dims, permutation=None, oov_rank=0,
                 embeddings_initializer="uniform", projections_initializer="glorot_uniform", **kwargs):
        super().__init__(vocabulary_size, output_dim, **kwargs)
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

    def build(self, input_shape=None):
        self.block_embeddings = []
        self.projections = []
        for i, (rows, dim) in enumerate(zip(self.block_sizes, self.block_dims)):
            self.block_embeddings.append(self.add_weight(
                name=f"embeddings_{i}",
                shape=(rows, dim),
                initializer=fresh_initializer(self.embeddings_initializer),
                trainable=True,
            ))
            projection = None
            if dim != self.output_dim:
                projection = self.add_weight(
                    name=f"projection_{i}",
                    shape=(dim, self.output_dim),
                    initializer=fresh_initializer(self.projections_initializer),
                    trainable=True,
                )
            self.projections.append(projection)
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

    # ----------------------------------------------------------------------------------------------- forward
    def ranks(self, ids):
        """Rank of each id (its row in the stacked blocks): int64 tensor of the shape of ``ids``."""
        if self.id_ranks is not None:
            return tf.cast(tf.gather(self.id_ranks, ids), tf.int64)
        if self.oov_rank:
            moved = tf.where(ids <= self.oov_rank, ids - 1, ids)
            return tf.where(tf.equal(ids, 0), tf.constant(self.oov_rank, tf.int64), moved)
        return ids

    def _block_vectors(self, i, rows):
        vectors = self.gather_rows(self.block_embeddings[i], rows)  # [n, d_i]
        if self.projections[i] is None:
            return vectors
        return tf.matmul(vectors, self.projections[i])  # [n, d0]

    def _lookup_fixed_size_gathers(self, block, rows):
        """The lookup for multi-replica ``tf.distribute`` strategies: every table is gathered at ``n`` rows (the
        ids of other blocks at a clipped, unused row) so that each replica's row-sparse table gradient has a fixed
        number of rows. Table gradients whose row count varies between replicas (and may be 0) crash TensorFlow's
        cross-replica aggregation (a segfault under MirroredStrategy, Keras 3 and 2, TF 2.21; compare
        tensorflow/tensorflow#42500). Projections still see only their block's ids."""
        parts, positions = [], []
        for i, table in enumerate(self.block_embeddings):
            where = tf.where(tf.equal(block, i))[:, 0]  # positions of block i's ids
            vectors = self.gather_rows(table, tf.clip_by_value(rows, 0, self.block_sizes[i] - 1))  # [n, d_i]
            vectors = tf.gather(vectors, where)
            parts.append(vectors if self.projections[i] is None else tf.matmul(vectors, self.projections[i]))
            positions.append(tf.cast(where, tf.int32))
        return tf.dynamic_stitch(positions, parts)  # [n, d0]

    def lookup(self, ids):
        flat = tf.reshape(self.ranks(ids), [-1])  # [n]
        if self.num_blocks == 1:
            out = self._block_vectors(0, flat)
        else:
            # Block of each rank: the number of offsets t_1..t_k it reaches (k comparisons, no table).
            block = tf.add_n([tf.cast(flat >= t, tf.int32) for t in self._offsets[1:]])  # [n]
            rows = flat - tf.gather(tf.constant(self._offsets, tf.int64), block)  # row inside the block
            if _multi_replica():
                out = self._lookup_fixed_size_gathers(block, rows)
            else:
                row_parts = tf.dynamic_partition(rows, block, self.num_blocks)
                positions = tf.dynamic_partition(tf.range(tf.size(flat)), block, self.num_blocks)
                out = tf.dynamic_stitch(
                    positions, [self._block_vectors(i, part) for i, part in enumerate(row_parts)]
                )  # [n, d0]
        if ids.shape.rank is None:
            return tf.reshape(out, tf.concat([tf.shape(ids), [self.output_dim]], axis=0))
        # Known dims stay static (Flatten / Dense after the layer need them in a functional model).
        static = ids.shape.as_list()
        dynamic = tf.unstack(tf.shape(ids)) if None in static else []
        shape = [s if s is not None else dynamic[j] for j, s in enumerate(static)] + [self.output_dim]
        return tf.reshape(out, shape)

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

    def compact(self, premultiply=False):
        """A frozen copy (stock ops: gather, matmul, dynamic_partition / dynamic_stitch), same outputs.

        Args:
            premultiply: False (default): block tables and projections as trained, the smallest form for any
                block with more than ``d_i d0 / (d0 - d_i)`` rows. True: every projected block stored as
                ``E_i @ P_i`` (``n_i x d0``, no matmul at lookup; for a whole vocabulary this is the size of the
                uniform table). ``"auto"``: only the blocks where that is smaller (``premultiply_report``).
                A premultiplied block reports ``d0`` in ``dims_per_id`` and ``parameter_count``: it is what the
                compact layer stores.
        """
        if premultiply not in PREMULTIPLY:
            raise ValueError(f"premultiply must be one of {PREMULTIPLY}. Received: premultiply={premultiply!r}")
        if not self.built:
            self.build()
        report = self.premultiply_report()
        tables, dims = [], []
        for i, table in enumerate(self.block_embeddings):
            merge = self.projections[i] is not None and (premultiply is True or (
                premultiply == "auto" and report[i]["smaller"]))
            tables.append(tf.matmul(table, self.projections[i]) if merge else tf.convert_to_tensor(table))
            dims.append(self.output_dim if merge else self.block_dims[i])
        config = {**self.get_config(), "block_dims": dims, "trainable": False, "frequencies": None}
        layer = MixedDimensionEmbedding.from_config(config)
        layer.build()
        for i in range(self.num_blocks):
            layer.block_embeddings[i].assign(tables[i])
            if layer.projections[i] is not None:
                layer.projections[i].assign(self.projections[i])
        return layer

    def sparse_tables(self):
        return list(self.block_embeddings)

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
            }
        )
        return config


# --------------------------------------------------------------------------------------------------- factories
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
