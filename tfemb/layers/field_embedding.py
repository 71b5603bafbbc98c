"""FieldEmbedding: a numeric feature as its value times one learned vector per field."""

import tensorflow as tf

from tfemb._keras import keras, register
from tfemb.layers.numeric_embedding import NumericEmbedding


@register
class FieldEmbedding(NumericEmbedding):
    """Field embedding of a numeric feature: ``e = x · v``, one learned vector ``v`` for the whole field.

    The "Field Embedding" baseline of AutoDis (Guo et al., KDD 2021, arXiv 2012.08986, Section 2.2), the numeric
    embedding of AutoInt and of DeepFM-style models that treat a numeric field as a one-valued categorical one:
    every value of the field shares ``v``, scaled by the value, so two values differ only in the length of their
    embedding (the paper's "low capacity" of this method). Values should be normalised (e.g. the Schema's
    ``log_standardize`` transform), as their scale is the embedding's.

    Args:
        output_dim: int, size of ``v`` and of the output.
        embeddings_initializer: initializer of ``v``. Default ``RandomUniform(-0.05, 0.05)`` (Keras' embedding
            default).

    Input shape: float ``[batch]`` or ``[batch, 1]``. Output shape: ``[batch, output_dim]``.
    """

    def __init__(self, output_dim, embeddings_initializer="uniform", **kwargs):
        super().__init__(output_dim, **kwargs)
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)

    def build(self, input_shape=None):
        self.field_vector = self.add_weight(name="field_vector", shape=(self.output_dim,),
                                            initializer=self.embeddings_initializer)
        self.built = True

    def embed_values(self, values):
        return values[:, None] * tf.cast(self.field_vector, values.dtype)[None, :]  # [n, d]

    def parameter_count(self):
        return self.output_dim

    def get_config(self):
        config = super().get_config()
        config.update({"embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer)})
        return config
