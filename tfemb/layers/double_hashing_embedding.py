"""DoubleHashingEmbedding: frequent ids keep their own rows, the others share a table through two hashes."""

import numpy as np
import tensorflow as tf

from tfemb._keras import keras, register
from tfemb.layers.embedding_scheme import EmbeddingScheme, check_positive_int, dtype_bytes, reshape_to_ids, sparse_gather
from tfemb.layers.hashing import universal_hash_params, universal_hash_tf
from tfemb.layers.hashing_embedding import check_hashable_vocabulary
from tfemb.layers.qr_embedding import fresh_initializer

COMBINES = ("sum", "concat")

#: Bytes per entry of the id -> hot-row remap (int32).
REMAP_BYTES = 4


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
                 frequencies=None, embeddings_initializer="uniform", **kwargs):
        super().__init__(vocabulary_size, output_dim, frequencies=frequencies, **kwargs)
        check_hashable_vocabulary(self.vocabulary_size)
        self.num_hot = check_positive_int("num_hot", num_hot, minimum=0)
        if self.num_hot > self.vocabulary_size:
            raise ValueError(
                f"num_hot must be <= vocabulary_size={self.vocabulary_size}. Received: num_hot={self.num_hot}"
            )
        self.num_buckets = check_positive_int("num_buckets", num_buckets)
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}. Received: combine={combine!r}")
        if combine == "concat" and self.output_dim % 2:
            raise ValueError(
                f"output_dim must be even with combine='concat' (two halves). Received: output_dim={self.output_dim}"
            )
        self.combine = combine
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
        # Tables are already the smallest form; frequencies stay in the config because they define the hot set.
        return self.frozen_copy()

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
            }
        )
        return config
