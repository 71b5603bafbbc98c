"""``run_scheme_test``: one call checks the whole EmbeddingScheme contract of a layer class.

In the spirit of Keras' ``run_layer_test``: config round trip, eager vs ``tf.function``, symbolic and
``compute_output_shape`` shapes, one ``fit`` step, ``.keras`` save/reload, ``compact()`` and mixed precision,
under whichever Keras (3, or 2 with ``TF_USE_LEGACY_KERAS=1``) is active.
"""

import os
import tempfile

import numpy as np
import tensorflow as tf

from tfemb._keras import keras

#: Tolerance of output comparisons between two ways of computing the same float32 values.
ATOL = 1e-6


def _dtype_name(dtype):
    return tf.as_dtype(dtype).name


def _assert_close(actual, expected, what, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-6, atol=atol, err_msg=what)


def _float_weights(layer):
    return [w for w in layer.weights if tf.as_dtype(w.dtype).is_floating]


def build_tiny_model(layer_cls, init_kwargs, ids_shape):
    """``Input(int64) -> layer -> Flatten -> Dense(1)``, compiled with SGD and MSE; returns ``(model, layer)``."""
    layer = layer_cls(**init_kwargs)
    inputs = keras.Input(shape=tuple(ids_shape[1:]), dtype="int64", name="ids")
    embedded = layer(inputs)
    outputs = keras.layers.Dense(1, name="head")(keras.layers.Flatten()(embedded))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss="mse")
    return model, layer, embedded


def run_scheme_test(layer_cls, init_kwargs, ids, expected_output_shape, atol=ATOL):
    """Checks the EmbeddingScheme contract of ``layer_cls(**init_kwargs)`` on one batch of ``ids``.

    Checks, in order: the output shape of an eager call; ``compute_output_shape``; ``from_config(get_config())``
    gives the same config; eager and ``tf.function`` outputs are equal (also for ids of unknown shape); in a tiny
    functional model (``Input(int64) -> layer -> Flatten -> Dense(1)``) the symbolic shape matches and one ``fit``
    step gives a finite loss; saving that model in the ``.keras`` format and ``keras.models.load_model`` give equal
    predictions; ``compact()`` gives an untrainable layer with equal outputs; under the ``mixed_float16``
    policy the outputs are float16 and the float weights float32 (the global policy is restored afterwards).

    Args:
        layer_cls: an ``EmbeddingScheme`` subclass.
        init_kwargs: dict of constructor arguments.
        ids: integer array-like ``[batch]`` or ``[batch, k]`` (``-1`` pads multi-hot lists with a combiner).
        expected_output_shape: tuple, the full output shape for ``ids`` (batch included).
        atol: absolute tolerance of float32 output comparisons.

    Returns:
        The trained layer of the tiny model.
    """
    ids = np.asarray(ids, dtype=np.int64)
    expected_output_shape = tuple(expected_output_shape)
    ids_t = tf.constant(ids)

    # Eager call and shapes.
    layer = layer_cls(**init_kwargs)
    eager = layer(ids_t)
    assert tuple(eager.shape) == expected_output_shape, (tuple(eager.shape), expected_output_shape)
    assert tuple(layer.compute_output_shape(ids.shape)) == expected_output_shape
    assert _dtype_name(eager.dtype) == "float32", eager.dtype

    # Config round trip.
    config = layer.get_config()
    clone = layer_cls.from_config(config)
    assert clone.get_config() == config, "from_config(get_config()) changed the config"

    # Eager vs graph, also with ids of unknown shape (a generic serving or tf.data signature): of unknown rank
    # too unless the layer pools multi-hot lists (a combiner needs to know which axis holds the lists).
    graph = tf.function(lambda x: layer(x))(ids_t)
    _assert_close(graph, eager, "tf.function output differs from eager output", atol)
    spec = tf.TensorSpec(None if layer.combiner is None else [None] * ids.ndim, tf.int64)
    unknown = tf.function(lambda x: layer(x), input_signature=[spec])(ids_t)
    _assert_close(unknown, eager, f"tf.function output for ids of shape {spec.shape} differs from eager output", atol)

    # One fit step in a tiny model (symbolic shape on the way).
    model, trained, symbolic = build_tiny_model(layer_cls, init_kwargs, ids.shape)
    assert tuple(symbolic.shape)[1:] == expected_output_shape[1:], (tuple(symbolic.shape), expected_output_shape)
    targets = np.linspace(-1.0, 1.0, ids.shape[0], dtype=np.float32)[:, np.newaxis]
    history = model.fit(ids, targets, batch_size=ids.shape[0], epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1]), history.history
    predictions = model.predict(ids, verbose=0)

    # .keras save / reload.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        reloaded = keras.models.load_model(path)
    _assert_close(reloaded.predict(ids, verbose=0), predictions, ".keras reload changed the predictions", atol)

    # compact(): frozen, same outputs.
    compact = trained.compact()
    _assert_close(compact(ids_t), trained(ids_t), "compact() changed the outputs", atol)
    assert not compact.trainable_weights, "compact() layer has trainable weights"

    # Mixed precision: float16 outputs, float32 master weights.
    policy = keras.mixed_precision.global_policy()
    try:
        keras.mixed_precision.set_global_policy("mixed_float16")
        mixed = layer_cls(**init_kwargs)
        out = mixed(ids_t)
        assert _dtype_name(out.dtype) == "float16", out.dtype
        assert all(_dtype_name(w.dtype) == "float32" for w in _float_weights(mixed)), mixed.weights
    finally:
        keras.mixed_precision.set_global_policy(policy)
    return trained
