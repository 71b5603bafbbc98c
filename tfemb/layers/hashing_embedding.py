"""HashingEmbedding: the hashing trick, ids share the rows of a smaller table through a universal hash."""

from tfemb._keras import keras, register
from tfemb.layers.embedding_scheme import UniformTablesScheme, check_positive_int
from tfemb.layers.hashing import HASH_PRIME, universal_hash_params, universal_hash_tf


def check_hashable_vocabulary(vocabulary_size):
    """Universal hashing needs ids below the prime 2**31 - 1 (so ``a * id`` fits int64 and the hash is exact)."""
    if vocabulary_size > HASH_PRIME:
        raise ValueError(
            f"vocabulary_size must be <= 2**31 - 1 for universal hashing. Received: vocabulary_size={vocabulary_size}"
        )


@register
class HashingEmbedding(UniformTablesScheme):
    """The hashing trick: ``num_buckets`` shared rows, row ``h(id)`` for every id.

    ``E[h(id)]`` is the embedding of ``id``, with the universal hash

        h(x) = ((a * x + b) mod P) mod num_buckets,    P = 2**31 - 1,

    ``a`` in ``[1, P)`` and ``b`` in ``[0, P)`` drawn from ``numpy.random.RandomState(seed)``
    (``tfemb.layers.hashing``). The table has ``num_buckets x output_dim`` parameters whatever the vocabulary;
    ids that collide share their vector. Every id gets ``output_dim`` dimensions.

    Args:
        vocabulary_size: int, number of ids (OOV id 0 included), at most ``2**31 - 1``.
        output_dim: int, embedding dimension.
        num_buckets: int >= 1, rows of the shared table.
        seed: int >= 0, seed of the hash parameters (not of the table's initializer). Default 0.
        embeddings_initializer: initializer of the table. Default ``"uniform"`` (U(-0.05, 0.05), as
            ``FixedEmbedding``).
        **kwargs: ``combiner``, ``frequencies``, ``validate_ids`` and base Layer arguments.

    Example:

    >>> layer = HashingEmbedding(vocabulary_size=23, output_dim=7, num_buckets=5)
    >>> layer(tf.constant([0, 5, 22])).shape
    TensorShape([3, 7])
    >>> layer.parameter_count()
    35

    References:
        - Weinberger et al., "Feature Hashing for Large Scale Multitask Learning", ICML 2009.
        - Carter & Wegman, "Universal classes of hash functions", JCSS 1979.
    """

    def __init__(self, vocabulary_size, output_dim, num_buckets, seed=0, embeddings_initializer="uniform",
                 **kwargs):
        super().__init__(vocabulary_size, output_dim, **kwargs)
        check_hashable_vocabulary(self.vocabulary_size)
        self.num_buckets = check_positive_int("num_buckets", num_buckets)
        self.seed = check_positive_int("seed", seed, minimum=0)
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        a, b = universal_hash_params(self.seed, 1)
        self._hash_a, self._hash_b = int(a[0]), int(b[0])

    def build(self, input_shape=None):
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=(self.num_buckets, self.output_dim),
            initializer=self.embeddings_initializer,
            trainable=True,
        )
        self.built = True

    def hash_ids(self, ids):
        """Rows of ``ids`` in the table (int64 tensor, same shape)."""
        return universal_hash_tf(ids, self._hash_a, self._hash_b, self.num_buckets)

    def lookup(self, ids):
        return self.gather_rows(self.embeddings, self.hash_ids(ids))

    def parameter_count(self):
        return self.num_buckets * self.output_dim

    def sparse_tables(self):
        return [self.embeddings]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_buckets": self.num_buckets,
                "seed": self.seed,
                "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
            }
        )
        return config
