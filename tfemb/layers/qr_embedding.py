"""QREmbedding: the quotient-remainder compositional embedding of Shi et al. (dlrm ``qr_embedding_bag.py``)."""

import math

import tensorflow as tf

from tfemb._keras import keras, register
from tfemb.layers.embedding_scheme import UniformTablesScheme, check_positive_int, fresh_initializer

OPERATIONS = ("mult", "add", "concat")


@register
class QREmbedding(UniformTablesScheme):
    """Quotient-remainder trick: two small tables whose rows, combined, are unique for every id.

    With ``m = num_buckets``, a remainder table ``R`` (``m`` rows) and a quotient table ``Q``
    (``ceil(vocabulary_size / m)`` rows), the embedding of ``id`` is

        e(id) = Q[id // m]  (op)  R[id % m],

    where ``op`` is the elementwise product (``"mult"``), the sum (``"add"``) or the concatenation
    ``[Q[id // m], R[id % m]]`` (``"concat"``). ``(id // m, id % m)`` is a complementary partition: no two ids
    share both rows, so ids differ even though the tables hold ``(ceil(V/m) + m)`` rows instead of ``V``.
    For ``"mult"`` and ``"add"`` both tables have ``output_dim`` columns; for ``"concat"`` the quotient table has
    ``output_dim // 2`` and the remainder table ``output_dim - output_dim // 2`` columns.

    Initialisation (``embeddings_initializer=None``, the default), with ``s = sqrt(1 / vocabulary_size)``:

    - ``"add"`` / ``"concat"``: both tables U(-s, s), the convention DLRM uses for its plain tables.
    - ``"mult"``: remainder table U(-s, s), quotient table U(1 - s, 1 + s). A product of two zero-mean draws
      would have a scale of ``s**2 / 3``, far below a plain table's, and vanishing gradients on both sides; with
      the quotient near 1 the product starts like a hashing-trick embedding (row ``id % m``) with the scale of a
      plain DLRM table (mean 0, ``E[e**2] = (1 + s**2/3) * s**2/3``) and the quotient rows learn a
      multiplicative correction, while the noise in ``Q`` already separates ids that share a remainder.

    An explicit ``embeddings_initializer`` is used for both tables, as dlrm does.

    Fidelity notes (differences from dlrm's ``QREmbeddingBag``):

    - dlrm's ``reset_parameters`` calls ``nn.init.uniform_(weight, np.sqrt(1 / num_categories))``, which passes
      ``sqrt(1/V)`` as the *lower* bound: its tables are drawn from U(sqrt(1/V), 1), all positive. That reads as
      a slip for the symmetric U(-sqrt(1/V), sqrt(1/V)) of DLRM's plain tables, which tfemb uses (see above).
    - dlrm pools each table over a bag first and then combines (``op(pool(Q), pool(R))``); tfemb composes each
      id's vector first and then pools (``pool(op(Q, R))``), the paper's per-category definition. The two agree
      for ``"add"`` and ``"concat"`` and for single ids; they differ for ``"mult"`` on multi-hot bags.
    - dlrm allows two independent dims for ``"concat"``; tfemb splits ``output_dim`` as above.

    Args:
        vocabulary_size: int, number of ids (OOV id 0 included).
        output_dim: int, embedding dimension (>= 2 for ``"concat"``).
        num_buckets: int >= 1, rows of the remainder table (dlrm's ``num_collisions``).
        operation: ``"mult"`` (default, as dlrm), ``"add"`` or ``"concat"``.
        embeddings_initializer: optional initializer of both tables; None for the defaults above.
        **kwargs: ``combiner``, ``frequencies``, ``validate_ids`` and base Layer arguments.

    Example:

    >>> layer = QREmbedding(vocabulary_size=23, output_dim=6, num_buckets=5, operation="concat")
    >>> layer(tf.constant([0, 5, 22])).shape
    TensorShape([3, 6])
    >>> layer.parameter_count()  # 5 quotient rows x 3 + 5 remainder rows x 3
    30

    References:
        - Shi, Mudigere, Naumov, Yang, "Compositional Embeddings Using Complementary Partitions for
          Memory-Efficient Recommendation Systems", KDD 2020, arXiv:1909.02107.
        - facebookresearch/dlrm, ``tricks/qr_embedding_bag.py`` (``QREmbeddingBag``).
    """

    def __init__(self, vocabulary_size, output_dim, num_buckets, operation="mult", embeddings_initializer=None,
                 **kwargs):
        super().__init__(vocabulary_size, output_dim, **kwargs)
        self.num_buckets = check_positive_int("num_buckets", num_buckets)
        if operation not in OPERATIONS:
            raise ValueError(f"operation must be one of {OPERATIONS}. Received: operation={operation!r}")
        if operation == "concat" and self.output_dim < 2:
            raise ValueError(
                f"output_dim must be >= 2 with operation='concat' (it is split between the two tables). "
                f"Received: output_dim={self.output_dim}"
            )
        self.operation = operation
        self.embeddings_initializer = (
            None if embeddings_initializer is None else keras.initializers.get(embeddings_initializer)
        )

    # ------------------------------------------------------------------------------------------------ shapes
    @property
    def num_quotients(self):
        """Rows of the quotient table, ``ceil(vocabulary_size / num_buckets)``."""
        return -(-self.vocabulary_size // self.num_buckets)

    @property
    def quotient_dim(self):
        return self.output_dim // 2 if self.operation == "concat" else self.output_dim

    @property
    def remainder_dim(self):
        return self.output_dim - self.output_dim // 2 if self.operation == "concat" else self.output_dim

    def _initializers(self):
        if self.embeddings_initializer is not None:
            return fresh_initializer(self.embeddings_initializer), fresh_initializer(self.embeddings_initializer)
        s = math.sqrt(1.0 / self.vocabulary_size)
        uniform = keras.initializers.RandomUniform(minval=-s, maxval=s)
        if self.operation == "mult":
            return keras.initializers.RandomUniform(minval=1.0 - s, maxval=1.0 + s), uniform
        return uniform, keras.initializers.RandomUniform(minval=-s, maxval=s)

    def build(self, input_shape=None):
        quotient_init, remainder_init = self._initializers()
        self.quotient_embeddings = self.add_weight(
            name="quotient_embeddings",
            shape=(self.num_quotients, self.quotient_dim),
            initializer=quotient_init,
            trainable=True,
        )
        self.remainder_embeddings = self.add_weight(
            name="remainder_embeddings",
            shape=(self.num_buckets, self.remainder_dim),
            initializer=remainder_init,
            trainable=True,
        )
        self.built = True

    # ----------------------------------------------------------------------------------------------- forward
    def lookup(self, ids):
        m = tf.constant(self.num_buckets, tf.int64)
        quotient = self.gather_rows(self.quotient_embeddings, tf.math.floordiv(ids, m))  # [..., quotient_dim]
        remainder = self.gather_rows(self.remainder_embeddings, tf.math.floormod(ids, m))  # [..., remainder_dim]
        if self.operation == "mult":
            return quotient * remainder
        if self.operation == "add":
            return quotient + remainder
        return tf.concat([quotient, remainder], axis=-1)

    # ---------------------------------------------------------------------------------------- size accounting
    def parameter_count(self):
        return self.num_quotients * self.quotient_dim + self.num_buckets * self.remainder_dim

    def sparse_tables(self):
        return [self.quotient_embeddings, self.remainder_embeddings]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_buckets": self.num_buckets,
                "operation": self.operation,
                "embeddings_initializer": None if self.embeddings_initializer is None
                else keras.initializers.serialize(self.embeddings_initializer),
            }
        )
        return config
