"""The contract of the embeddings of numeric features: one float per row -> one vector per row."""

import tensorflow as tf

from tfemb._keras import TrackedCollectionsCheckpoint, keras
from tfemb.layers.embedding_scheme import check_positive_int, dtype_bytes


class NumericEmbedding(TrackedCollectionsCheckpoint, keras.layers.Layer):
    """Base class of the layers that embed a numeric feature (``FieldEmbedding``, ``AutoDisEmbedding``).

    A numeric feature has no ids: each row holds one real value (a ``NumericFeature`` of a ``tfemb.data.Schema``,
    after its transform, e.g. ``log_standardize``). A numeric embedding maps that value to a vector of
    ``output_dim`` floats, so the feature joins a CTR model as one more field beside the embedded categorical
    features (the FM and cross terms then see it too) instead of being a raw input of the deep part. The
    ``RecModel`` argument ``numeric_embeddings`` builds one per dense feature.

    Subclasses implement ``embed_values(values)`` (``[n]`` floats of the compute dtype -> ``[n, output_dim]``) and
    ``parameter_count()``. The layer has no separate inference form: its weights are few and its ops are stock
    TensorFlow ops, so the export keeps it as it is.

    Args:
        output_dim: int, size of the vector handed to the model.

    Input shape:
        float tensor ``[batch]`` or ``[batch, 1]``.

    Output shape:
        ``[batch, output_dim]``.
    """

    def __init__(self, output_dim, **kwargs):
        super().__init__(**kwargs)
        self.output_dim = check_positive_int("output_dim", output_dim)

    def call(self, values):
        values = tf.convert_to_tensor(values)
        if values.dtype in (tf.string, tf.bool) or not (values.dtype.is_floating or values.dtype.is_integer):
            raise TypeError(f"{self.name}: a numeric feature's values must be numbers. Received: dtype {values.dtype.name}")
        rank = values.shape.rank
        if rank == 2 and values.shape[-1] is not None and values.shape[-1] != 1:
            raise ValueError(f"{self.name}: expected one value per row, shape [batch] or [batch, 1]. Received: shape "
                             f"{values.shape}")
        if rank not in (1, 2):
            raise ValueError(f"{self.name}: expected one value per row, shape [batch] or [batch, 1]. Received: shape "
                             f"{values.shape}")
        if rank == 2:
            values = tf.squeeze(values, axis=-1)
        out = self.embed_values(tf.cast(values, self.compute_dtype))
        out.set_shape([values.shape[0], self.output_dim])
        return out

    def embed_values(self, values):
        """``[n]`` values -> ``[n, output_dim]``; implemented by each method."""
        raise NotImplementedError

    def compute_output_shape(self, input_shape):
        return (tuple(input_shape)[0], self.output_dim)

    def parameter_count(self):
        """Parameters the layer needs at inference (all of its weights, built or not); by each method."""
        raise NotImplementedError

    def storage_bytes(self):
        """Bytes of those parameters at the layer's variable dtype."""
        return int(self.parameter_count()) * dtype_bytes(self.dtype)

    def get_config(self):
        config = super().get_config()
        config.update({"output_dim": self.output_dim})
        return config
