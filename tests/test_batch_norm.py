"""tfemb.layers.batch_norm: the fused training-mode batch normalisation equals the Keras layer's."""

import numpy as np
import pytest
import tensorflow as tf

from tfemb._keras import keras
from tfemb.layers.batch_norm import batch_norm


def _pair(c, seed, **kwargs):
    rng = np.random.default_rng(seed)
    gamma, beta = rng.normal(size=c).astype("float32"), rng.normal(size=c).astype("float32")
    layers = []
    for _ in range(2):
        layer = keras.layers.BatchNormalization(momentum=0.8, **kwargs)
        layer.build((None, c))
        if layer.scale:
            layer.gamma.assign(gamma)
        if layer.center:
            layer.beta.assign(beta)
        layers.append(layer)
    return layers


def _run(layer, x, w, fused):
    variables = [v if isinstance(v, tf.Variable) else v.value for v in layer.trainable_weights]
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = batch_norm(layer, x, True) if fused else layer(x, training=True)
        loss = tf.reduce_sum(y * w)
    grads = tape.gradient(loss, [x] + variables)
    return [y.numpy()] + [g.numpy() for g in grads] + [np.asarray(layer.moving_mean), np.asarray(layer.moving_variance)]


@pytest.mark.parametrize("n", [1, 2, 7, 300])
@pytest.mark.parametrize("options", [{}, {"center": False}, {"scale": False, "epsilon": 0.1}])
def test_fused_training_matches_the_keras_layer(n, options):
    keras_layer, fused_layer = _pair(5, n, **options)
    rng = np.random.default_rng(n + 1)
    for step in range(2):  # twice: the moving statistics follow the same path
        x = tf.constant((rng.normal(size=(n, 5)) * 3 + 1).astype("float32"))
        w = tf.constant(rng.normal(size=(n, 5)).astype("float32"))
        expected, got = _run(keras_layer, x, w, False), _run(fused_layer, x, w, True)
        for e, g in zip(expected, got):
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(e).max())))
    assert not np.allclose(np.asarray(fused_layer.moving_mean), 0.0)  # the statistics did move


def test_fused_path_is_taken_only_where_it_applies():
    layer = _pair(4, 0)[0]
    x = tf.ones([3, 4])

    def ops(fn):
        graph = tf.function(fn).get_concrete_function().graph.as_graph_def()
        return {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}

    assert "FusedBatchNormV3" in ops(lambda: batch_norm(layer, x, True))
    assert "FusedBatchNormV3" not in ops(lambda: batch_norm(layer, x, False))  # inference: the layer itself
    deep = keras.layers.BatchNormalization()
    deep.build((None, 2, 4))
    assert "FusedBatchNormV3" not in ops(lambda: batch_norm(deep, tf.ones([3, 2, 4]), True))  # rank 3: the layer
    np.testing.assert_allclose(batch_norm(layer, x, False).numpy(), layer(x, training=False).numpy())
