"""FixedEmbedding: one table, one dimension for every id (the FSE baseline)."""

from tfemb._keras import keras, register
from tfemb.layers.embedding_scheme import UniformTablesScheme


@register
class FixedEmbedding(UniformTablesScheme):
    """A plain ``vocabulary_size x output_dim`` table: every id gets ``output_dim`` dimensions.

    ``E[id]`` is the embedding of ``id``. This is the fixed-size-embedding (FSE) baseline the other methods
    are measured against.

    Args:
        vocabulary_size: int, number of ids (OOV id 0 included).
        output_dim: int, embedding dimension.
        embeddings_initializer: initializer of the table. Default ``"uniform"`` (Keras' Embedding default,
            U(-0.05, 0.05)).
        embeddings_regularizer: optional regularizer of the table.
        **kwargs: ``combiner``, ``frequencies``, ``validate_ids`` and base Layer arguments.

    Example:

    >>> layer = FixedEmbedding(vocabulary_size=23, output_dim=7)
    >>> layer(tf.constant([0, 5, 22])).shape
    TensorShape([3, 7])
    """

    def __init__(self, vocabulary_size, output_dim, embeddings_initializer="uniform",
                 embeddings_regularizer=None, **kwargs):
        super().__init__(vocabulary_size, output_dim, **kwargs)
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.embeddings_regularizer = keras.regularizers.get(embeddings_regularizer)

    def build(self, input_shape=None):
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=(self.vocabulary_size, self.output_dim),
            initializer=self.embeddings_initializer,
            regularizer=self.embeddings_regularizer,
            trainable=True,
        )
        self.built = True

    def lookup(self, ids):
        return self.gather_rows(self.embeddings, ids)

    def parameter_count(self):
        return self.vocabulary_size * self.output_dim

    def sparse_tables(self):
        return [self.embeddings]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
                "embeddings_regularizer": keras.regularizers.serialize(self.embeddings_regularizer)
                if self.embeddings_regularizer is not None else None,
            }
        )
        return config
