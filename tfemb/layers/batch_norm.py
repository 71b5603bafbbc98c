"""Training-mode batch normalisation of ``[batch, features]`` tensors through TensorFlow's fused kernel."""

import tensorflow as tf

from tfemb._keras import keras


def _fusable(layer, x, training):
    if not training or not isinstance(layer, keras.layers.BatchNormalization) or not layer.built:
        return False
    if x.dtype != tf.float32 or x.shape.rank != 2 or x.shape[-1] is None:
        return False
    axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    if list(axis) not in ([-1], [1]):
        return False
    # Variants the fused kernel does not compute: Keras 2's renormalisation / ghost batches / adjustment, Keras 3's
    # cross-replica synchronisation.
    return not any(getattr(layer, name, None) for name in ("renorm", "virtual_batch_size", "adjustment",
                                                           "synchronized"))


def batch_norm(layer, x, training):
    """``layer(x, training=training)`` for a built Keras ``BatchNormalization`` over the last axis of a float32
    ``[batch, features]`` tensor; in training mode through ``FusedBatchNormV3`` (one kernel forward, one backward,
    instead of the moments, broadcasts and products of Keras' graph), with the same output, gradients and moving
    statistics: the batch mean and biased variance normalise (``epsilon`` added), ``moving = momentum · moving +
    (1 - momentum) · batch statistic`` with the biased variance, as Keras updates them. Anything else (inference,
    another dtype, rank or layer option) calls the layer itself."""
    if not _fusable(layer, x, training):
        return layer(x, training=training)
    c = x.shape[-1]
    gamma = tf.convert_to_tensor(layer.gamma) if layer.scale else tf.ones([c], tf.float32)
    beta = tf.convert_to_tensor(layer.beta) if layer.center else tf.zeros([c], tf.float32)
    empty = tf.zeros([0], tf.float32)
    y, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=tf.reshape(x, [-1, 1, 1, c]), scale=gamma, offset=beta, mean=empty, variance=empty,
        epsilon=float(layer.epsilon), exponential_avg_factor=1.0, data_format="NHWC", is_training=True)
    # The kernel returns the Bessel-corrected variance (n / (n - 1), for n > 1) for the moving average; Keras
    # averages the biased one.
    n = tf.cast(tf.shape(x)[0], tf.float32)
    variance = variance * tf.maximum(n - 1.0, 1.0) / tf.maximum(n, 1.0)
    m = float(layer.momentum)
    layer.moving_mean.assign(layer.moving_mean * m + tf.stop_gradient(mean) * (1.0 - m))
    layer.moving_variance.assign(layer.moving_variance * m + tf.stop_gradient(variance) * (1.0 - m))
    return tf.reshape(y, tf.shape(x))
