"""DoubleHashingEmbedding: frequent ids keep their own rows, the others share a table through two hashes."""

import numpy as np
import tensorflow as tf

from tfemb._keras import keras, register
from tfemb.layers.embedding_scheme import (
    EmbeddingScheme, check_positive_int, dtype_bytes, fresh_initializer, reshape_to_ids, sparse_gather,
)
from tfemb.layers.hashing import universal_hash_params, universal_hash_tf
from tfemb.layers.hashing_embedding import check_hashable_vocabulary

COMBINES = ("sum", "concat")

#: ``DoubleHashingEmbedding.compact()`` forms: the hashes computed in-graph, or the row pair of each id stored.
COMPACT_LOOKUPS = ("hash", "index")

#: Bytes per entry of the id -> hot-row remap (int32).
REMAP_BYTES = 4


def check_combine(combine, output_dim):
    """``combine`` (``"sum"`` or ``"concat"``, the latter with an even ``output_dim``); a clear error otherwise."""
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}. Received: combine={combine!r}")
    if combine == "concat" and output_dim % 2:
        raise ValueError(
            f"output_dim must be even with combine='concat' (two halves). Received: output_dim={output_dim}"
        )
    return combine


def hot_ids_from_frequencies(frequencies, num_hot):
    """The ``num_hot`` ids with the largest counts, most frequent first, ties broken by the lower id."""
    order = np.argsort(-np.asarray(frequencies, dtype=np.float64), kind="stable")
    return order[:num_hot].astype(np.int64)


@register
class DoubleHashingEmbedding(EmbeddingScheme):
    """Frequency-based double hashing (hybrid hashing) of Zhang et al. (Twitter, RecSys 2020).

    The ``num_hot`` most frequent ids keep their own rows in a hot table ``H`` (``num_hot x output_dim``); every
    other id is mapped by two independent universal hashes ``h1``, ``h2`` (``tfemb.layers.hashing``, both drawn
    from ``seed``) into one shared table ``S`` of ``num_buckets`` rows:

        e(id) = H[row(id)]                      if id is hot,
        e(id) = S[h1(id)] + S[h2(id)]           otherwise, combine="sum"      (S: num_buckets x output_dim),
        e(id) = [S[h1(id)], S[h2(id)]]          otherwise, combine="concat"   (S: num_buckets x output_dim/2).

    Two hashes make a full collision (same pair of rows) about ``1/num_buckets`` times as likely as with one
    hash, so rare ids stay distinguishable with few parameters, while popular ids, which carry most of the
    signal, are never shared.

    Which ids are hot:

    - ``frequencies=None``: ids are taken as already sorted by descending popularity (``tfemb.data.Schema``
      numbers them that way, OOV id 0 first), so ids ``0 .. num_hot-1`` are hot and ``row(id) = id``. Id 0 gets
      no special treatment: it is hot whenever ``num_hot >= 1``.
    - ``frequencies`` given: the ``num_hot`` ids with the largest counts (ties: lower id first) are hot, row
      = rank. Unless these are exactly ids ``0 .. num_hot-1`` in that order (counts already in descending
      order, the usual case), a remap ``id -> hot row or -1`` (int32, ``vocabulary_size`` entries) is kept as a
      non-trainable weight ``hot_rows``; it counts in ``storage_bytes`` (4 bytes per entry) but not in
      ``parameter_count``.

    Fidelity notes: the paper builds the hot set from training counts and double-hashes the rest; it does not
    fix the hash family (tfemb uses multiply-mod-prime) nor an initialiser. When ``h1(id) == h2(id)`` the id
    simply gets ``2 S[h]`` (sum) or ``[S[h], S[h]]`` (concat), as with any two independent hashes.

    Args:
        vocabulary_size: int, number of ids (OOV id 0 included), at most ``2**31 - 1``.
        output_dim: int, embedding dimension (even for ``combine="concat"``).
        num_hot: int in ``[0, vocabulary_size]``, ids with their own row.
        num_buckets: int >= 1, rows of the shared table.
        combine: ``"sum"`` (default) or ``"concat"``, how the two hashed rows make a vector.
        seed: int >= 0, seed of the two hashes (not of the initialiser). Default 0.
        frequencies: optional per-id training counts (length ``vocabulary_size``) that pick the hot ids.
        embeddings_initializer: initializer of both tables. Default ``"uniform"`` (U(-0.05, 0.05)).
        compact_lookup: ``"hash"`` (default) or ``"index"``, the form of ``compact()``. ``"hash"``: the two
            tables as trained, the hashes computed at each lookup (the smallest export). ``"index"``: an
            ``IndexedRowsEmbedding``: the tables stacked into one, and per id the two rows it sums (or
            concatenates) stored as a pair of small ints (int16 up to 32,767 rows): one index gather and one
            row gather per lookup instead of the hash arithmetic and the hot / cold select, for ``2 x 2`` more
            bytes per id at int16 (the same outputs).
        **kwargs: ``combiner``, ``validate_ids`` and base Layer arguments.

    Example:

    >>> layer = DoubleHashingEmbedding(vocabulary_size=23, output_dim=6, num_hot=4, num_buckets=5)
    >>> layer(tf.constant([0, 5, 22])).shape
    TensorShape([3, 6])
    >>> layer.parameter_count()  # (4 hot + 5 shared rows) x 6
    54

    References:
        - Zhang, Liu, Xie, Ktena, Tejani, Gupta, Myana, Dilipkumar, Paul, Ihara, Upadhyaya, Huszar, Shi,
          "Model Size Reduction Using Frequency Based Double Hashing for Recommender Systems", RecSys 2020,
          arXiv:2007.14523.
    """

    def __init__(self, vocabulary_size, output_dim, num_hot, num_buckets, combine="sum", seed=0,
                 frequencies=None, embeddings_initializer="uniform", compact_lookup="hash", **kwargs):
        super().__init__(vocabulary_size, output_dim, frequencies=frequencies, **kwargs)
        check_hashable_vocabulary(self.vocabulary_size)
        self.num_hot = check_positive_int("num_hot", num_hot, minimum=0)
        if self.num_hot > self.vocabulary_size:
            raise ValueError(
                f"num_hot must be <= vocabulary_size={self.vocabulary_size}. Received: num_hot={self.num_hot}"
            )
        self.num_buckets = check_positive_int("num_buckets", num_buckets)
        self.combine = check_combine(combine, self.output_dim)
        if compact_lookup not in COMPACT_LOOKUPS:
            raise ValueError(f"compact_lookup must be one of {COMPACT_LOOKUPS}. Received: compact_lookup="
                             f"{compact_lookup!r}")
        self.compact_lookup = compact_lookup
        self.seed = check_positive_int("seed", seed, minimum=0)
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        a, b = universal_hash_params(self.seed, 2)
        self._hash_params = [(int(a[i]), int(b[i])) for i in range(2)]
        self._hot_offset, self._remap = self._make_remap()

    def _make_remap(self):
        """``(offset, remap)``: hot row = id - offset when the hot ids are one contiguous range (the usual
        case: a Schema numbers ids by descending count, id 0 being OOV), else an int32 ``[vocabulary_size]``
        remap id -> hot row (or -1)."""
        freq = self.frequencies_array()
        if freq is None or self.num_hot == 0:
            return 0, None
        hot = hot_ids_from_frequencies(freq, self.num_hot)
        low = int(hot.min())
        if int(hot.max()) - low + 1 == self.num_hot:  # a contiguous range, whatever its order
            return low, None
        remap = np.full(self.vocabulary_size, -1, dtype=np.int32)
        remap[hot] = np.arange(self.num_hot, dtype=np.int32)
        return 0, remap

    @property
    def shared_dim(self):
        """Columns of the shared table."""
        return self.output_dim // 2 if self.combine == "concat" else self.output_dim

    def hot_ids(self):
        """NumPy int64 array of the hot ids, in row order."""
        if self._remap is None:
            return np.arange(self._hot_offset, self._hot_offset + self.num_hot, dtype=np.int64)
        return hot_ids_from_frequencies(self.frequencies_array(), self.num_hot)

    def build(self, input_shape=None):
        self.hot_embeddings = None
        if self.num_hot:
            self.hot_embeddings = self.add_weight(
                name="hot_embeddings",
                shape=(self.num_hot, self.output_dim),
                initializer=fresh_initializer(self.embeddings_initializer),
                trainable=True,
            )
        self.shared_embeddings = self.add_weight(
            name="shared_embeddings",
            shape=(self.num_buckets, self.shared_dim),
            initializer=fresh_initializer(self.embeddings_initializer),
            trainable=True,
        )
        self.hot_rows = None
        if self._remap is not None:
            remap = self._remap

            def remap_initializer(shape, dtype=None):
                return tf.constant(remap, dtype=tf.int32, shape=shape)

            self.hot_rows = self.add_weight(
                name="hot_rows",
                shape=(self.vocabulary_size,),
                dtype="int32",
                initializer=remap_initializer,
                trainable=False,
            )
        self.built = True

    # ----------------------------------------------------------------------------------------------- forward
    def hash_ids(self, ids):
        """The two shared-table rows of ``ids``: a pair of int64 tensors of the shape of ``ids``."""
        rows = self.hash_pairs(ids)
        return rows[..., 0], rows[..., 1]

    def hash_pairs(self, ids):
        """Both shared-table rows of ``ids`` at once, ``[..., 2]`` int64 (``universal_hash_tf`` with both pairs,
        broadcast over a last axis of 2: the ops of one hash)."""
        a, b = zip(*self._hash_params)
        return universal_hash_tf(ids, a, b, self.num_buckets)

    def lookup(self, ids):
        # One gather of both hashed rows ([..., 2, shared_dim]); their sum (or concatenation) is the cold vector.
        pair = self.gather_rows(self.shared_embeddings, self.hash_pairs(ids))
        if self.combine == "sum":
            cold = tf.reduce_sum(pair, axis=-2)  # = first + second, bit for bit (one addition)
        else:
            cold = reshape_to_ids(pair, ids, self.output_dim)  # [first, second] side by side
        if self.hot_embeddings is None:
            return cold
        if self.hot_rows is None:
            hot_row = ids - self._hot_offset
            # 0 <= hot_row < num_hot in one unsigned comparison (negative rows wrap to huge values).
            is_hot = tf.cast(hot_row, tf.uint64) < tf.constant(self.num_hot, tf.uint64)
            row = tf.where(is_hot, hot_row, tf.constant(0, tf.int64))
        else:
            hot_row = tf.cast(sparse_gather(self.hot_rows, ids), tf.int64)  # -1 (cold) or 0..num_hot - 1
            is_hot = hot_row >= 0
            row = tf.maximum(hot_row, 0)
        hot = self.gather_rows(self.hot_embeddings, row)
        return tf.where(is_hot[..., tf.newaxis], hot, cold)

    # ---------------------------------------------------------------------------------------- size accounting
    def parameter_count(self):
        return self.num_hot * self.output_dim + self.num_buckets * self.shared_dim

    def storage_bytes(self):
        remap = 0 if self._remap is None else REMAP_BYTES * self.vocabulary_size
        return self.parameter_count() * dtype_bytes(self.variable_dtype) + remap

    def dims_per_id(self):
        return np.full(self.vocabulary_size, self.output_dim, dtype=np.int64)

    def compact(self):
        """``compact_lookup="hash"``: a frozen copy (the tables are already the smallest form; frequencies stay in
        the config because they define the hot set). ``"index"``: the ``IndexedRowsEmbedding`` of
        ``indexed_rows()``."""
        if self.compact_lookup == "hash":
            return self.frozen_copy()
        table, rows, zero_row = self.indexed_rows()
        config = self.get_config()
        keep = {key: config[key] for key in ("name", "dtype", "combiner", "validate_ids") if key in config}
        return IndexedRowsEmbedding.from_arrays(table, rows, combine=self.combine, zero_row=zero_row, **keep)

    def indexed_rows(self):
        """``(table, rows, zero_row)`` (NumPy): every vector of this layer as the sum (``combine="sum"``) or the
        concatenation (``"concat"``) of two rows of one stacked ``table``, ``rows[id]`` holding their indices.

        ``"sum"``: ``table = [H; S; 0]``; a hot id reads ``(its hot row, the zero row)``, a cold id ``(h1, h2)``
        offset by ``num_hot``. ``"concat"``: ``table = [H split in halves; S]`` (rows of ``output_dim / 2``); a hot
        id reads its two halves, a cold id ``(h1, h2)``. Both reproduce ``lookup`` exactly (``x + 0 = x``)."""
        if not self.built:
            self.build()
        ids = np.arange(self.vocabulary_size, dtype=np.int64)
        pairs = np.asarray(self.hash_pairs(tf.constant(ids)), dtype=np.int64)  # [V, 2]
        shared = np.asarray(tf.convert_to_tensor(self.shared_embeddings))
        hot_row = np.full(self.vocabulary_size, -1, np.int64)  # id -> its hot row, -1 for a cold id
        hot_row[self.hot_ids()] = np.arange(self.num_hot)
        hot = hot_row >= 0
        hot_table = (np.zeros((0, self.output_dim), shared.dtype) if self.hot_embeddings is None
                     else np.asarray(tf.convert_to_tensor(self.hot_embeddings)))
        if self.combine == "sum":
            table = np.concatenate([hot_table, shared, np.zeros((1, self.output_dim), shared.dtype)])
            zero = table.shape[0] - 1
            rows = np.where(hot[:, None], np.stack([hot_row, np.full_like(hot_row, zero)], axis=1),
                            pairs + self.num_hot)
            return table, rows, True
        half = self.output_dim // 2
        table = np.concatenate([hot_table.reshape(-1, half), shared])  # hot row r -> rows 2r, 2r + 1
        rows = np.where(hot[:, None], np.stack([2 * hot_row, 2 * hot_row + 1], axis=1), pairs + 2 * self.num_hot)
        return table, rows, False

    def sparse_tables(self):
        tables = [] if self.hot_embeddings is None else [self.hot_embeddings]
        return tables + [self.shared_embeddings]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_hot": self.num_hot,
                "num_buckets": self.num_buckets,
                "combine": self.combine,
                "seed": self.seed,
                "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
                "compact_lookup": self.compact_lookup,
            }
        )
        return config


def index_dtype(num_rows):
    """Smallest signed integer dtype of a row index below ``num_rows``: int16 or int32."""
    return "int16" if num_rows <= 2**15 else "int32"


@register
class IndexedRowsEmbedding(EmbeddingScheme):
    """A frozen table of vectors made of two stored rows each: ``e(id) = T[r0(id)] + T[r1(id)]`` (``"sum"``) or
    ``[T[r0(id)], T[r1(id)]]`` (``"concat"``), with ``r(id)`` stored per id.

    The ``compact_lookup="index"`` form of ``DoubleHashingEmbedding`` (``indexed_rows()``): its hot and shared
    tables stacked into ``table`` and each id's pair of rows in ``row_index`` (``[vocabulary_size, 2]``, int16 up to
    32,767 rows, else int32). A lookup is one gather of the pairs, a cast, one gather of the rows and a sum (or a
    reshape): no hash arithmetic and no select, for the index bytes. Inference only (``trainable=False``).

    Args:
        vocabulary_size: int, number of ids.
        output_dim: int, embedding dimension (the row width is ``output_dim`` for ``"sum"``, half of it for
            ``"concat"``).
        num_rows: int >= 1, rows of ``table``.
        combine: ``"sum"`` or ``"concat"``.
        zero_row: bool, the last row is an all-zero padding row (``"sum"``: what a hot id adds to its own row);
            it is not counted in ``parameter_count()``.
        **kwargs: ``combiner``, ``validate_ids`` and base Layer arguments.

    Example:

    >>> layer = IndexedRowsEmbedding.from_arrays(np.eye(3, dtype="float32"), [[0, 2], [1, 1]])
    >>> layer(tf.constant([0, 1])).numpy().tolist()
    [[1.0, 0.0, 1.0], [0.0, 2.0, 0.0]]
    """

    def __init__(self, vocabulary_size, output_dim, num_rows, combine="sum", zero_row=False, **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(vocabulary_size, output_dim, **kwargs)
        if self.trainable:
            raise ValueError(f"{self.name}: IndexedRowsEmbedding is inference-only. Received: trainable=True")
        self.num_rows = check_positive_int("num_rows", num_rows)
        self.combine = check_combine(combine, self.output_dim)
        self.zero_row = bool(zero_row)

    @classmethod
    def from_arrays(cls, table, rows, combine="sum", zero_row=False, **kwargs):
        """A built layer holding ``table`` (``[num_rows, width]``) and ``rows`` (``[vocabulary_size, 2]`` ints)."""
        table = np.asarray(table)
        rows = np.asarray(rows)
        if table.ndim != 2 or rows.ndim != 2 or rows.shape[1] != 2:
            raise ValueError(f"table must be [num_rows, width] and rows [vocabulary_size, 2]. Received: shapes "
                             f"{table.shape} and {rows.shape}")
        if rows.size and (rows.min() < 0 or rows.max() >= table.shape[0]):
            raise ValueError(f"rows must index table rows 0..{table.shape[0] - 1}. Received: values in "
                             f"[{rows.min()}, {rows.max()}]")
        width = table.shape[1] * (2 if combine == "concat" else 1)
        layer = cls(rows.shape[0], width, table.shape[0], combine=combine, zero_row=zero_row, **kwargs)
        layer.build()
        layer.table.assign(table.astype(np.float32 if layer.variable_dtype is None else layer.variable_dtype))
        layer.row_index.assign(rows.astype(layer.index_dtype))
        return layer

    @property
    def index_dtype(self):
        return index_dtype(self.num_rows)

    @property
    def row_width(self):
        return self.output_dim // 2 if self.combine == "concat" else self.output_dim

    def build(self, input_shape=None):
        self.table = self.add_weight(name="table", shape=(self.num_rows, self.row_width), initializer="zeros",
                                     trainable=False)
        self.row_index = self.add_weight(name="row_index", shape=(self.vocabulary_size, 2), dtype=self.index_dtype,
                                         initializer="zeros", trainable=False)
        self.built = True

    def lookup(self, ids):
        pairs = tf.cast(sparse_gather(self.row_index, ids), tf.int32)  # [..., 2]
        rows = self.gather_rows(self.table, pairs)  # [..., 2, width]
        if self.combine == "sum":
            return tf.reduce_sum(rows, axis=-2)  # one addition: r0 + r1
        return reshape_to_ids(rows, ids, self.output_dim)

    def parameter_count(self):
        return (self.num_rows - int(self.zero_row)) * self.row_width

    def storage_bytes(self):
        return (self.num_rows * self.row_width * dtype_bytes(self.variable_dtype)
                + self.vocabulary_size * 2 * dtype_bytes(self.index_dtype))

    def dims_per_id(self):
        return np.full(self.vocabulary_size, self.output_dim, dtype=np.int64)

    def compact(self):
        return self.frozen_copy()

    def get_config(self):
        config = super().get_config()
        config.update({"num_rows": self.num_rows, "combine": self.combine, "zero_row": self.zero_row})
        return config
