"""Every baseline scheme trains under tf.distribute.MirroredStrategy on two logical CPU devices.

The CPU is split into two logical devices here, at import time, before anything in this process initialises
TensorFlow's runtime (test_layers_baseline.py, collected first, creates no tensor at import). If the runtime was
already initialised by another module, the split cannot happen and the tests skip, saying so.
"""

import tensorflow as tf

_SPLIT_ERROR = None
try:
    _cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )
except RuntimeError as error:  # the runtime was initialised before this module was imported
    _SPLIT_ERROR = str(error)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tfemb._keras import keras  # noqa: E402
from tfemb.layers import (  # noqa: E402
    DoubleHashingEmbedding, FixedEmbedding, HashingEmbedding, PEPEmbedding, QREmbedding,
)

V = 23
FREQS = [float((7 * i) % V) for i in range(V)]  # a shuffled popularity: double hashing keeps a remap

SCHEMES = [
    (FixedEmbedding, {"output_dim": 7}),
    (HashingEmbedding, {"output_dim": 11, "num_buckets": 5}),
    (QREmbedding, {"output_dim": 6, "num_buckets": 5, "operation": "mult"}),
    (QREmbedding, {"output_dim": 7, "num_buckets": 5, "operation": "concat", "combiner": "mean"}),
    (DoubleHashingEmbedding, {"output_dim": 6, "num_hot": 4, "num_buckets": 5}),
    (DoubleHashingEmbedding, {"output_dim": 6, "num_hot": 4, "num_buckets": 5, "combine": "concat",
                              "frequencies": FREQS, "combiner": "sum"}),
    # PEP search: V and s in one variable (the default) and in two; both halves must train.
    (PEPEmbedding, {"output_dim": 6, "threshold_init": -3.0}),
    (PEPEmbedding, {"output_dim": 6, "threshold_init": -3.0, "fused": False, "combiner": "mean"}),
]


@pytest.fixture(scope="module")
def strategy():
    # One strategy for the module: after a first MirroredStrategy has trained, a second one in the same process
    # fails with "Shape mismatch in the collective instance 100" (its collective keys restart and clash;
    # tensorflow/tensorflow#62790).
    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < 2:
        pytest.skip(
            f"needs 2 logical CPU devices, found {len(devices)}; the CPU could not be split "
            f"({_SPLIT_ERROR or 'TensorFlow was initialised before tests/test_layers_distribute.py was imported'})"
        )
    strategy = tf.distribute.MirroredStrategy([d.name for d in devices[:2]])
    assert strategy.num_replicas_in_sync == 2
    return strategy


@pytest.mark.parametrize("layer_cls,kwargs", SCHEMES, ids=lambda v: getattr(v, "__name__", None))
def test_scheme_trains_under_mirrored_strategy(strategy, layer_cls, kwargs):
    keras.utils.set_random_seed(0)  # seeded initial weights: the two SGD steps at 0.5 are the same in every run
    rng = np.random.RandomState(0)
    pooled = "combiner" in kwargs
    ids = rng.randint(0, V, size=(16, 3) if pooled else (16,)).astype(np.int64)
    if pooled:
        ids[::2, -1] = -1  # padded lists
    targets = rng.normal(size=(16, 1)).astype(np.float32)
    with strategy.scope():
        layer = layer_cls(vocabulary_size=V, **kwargs)
        inputs = keras.Input(shape=ids.shape[1:], dtype="int64")
        outputs = keras.layers.Dense(1)(keras.layers.Flatten()(layer(inputs)))
        model = keras.Model(inputs, outputs)
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.5), loss="mse")
    before = [np.array(w.numpy()) for w in layer.sparse_tables()]
    history = model.fit(ids, targets, batch_size=8, epochs=1, verbose=0)  # 2 steps of 2 x 4 examples
    assert np.all(np.isfinite(history.history["loss"])), history.history
    after = [np.array(w.numpy()) for w in layer.sparse_tables()]
    assert all(not np.allclose(b, a) for b, a in zip(before, after)), "an embedding table did not train"
    if isinstance(layer, PEPEmbedding):  # the thresholds train too (one variable: its second column block)
        threshold = np.asarray(layer.threshold)
        assert not np.allclose(threshold, -3.0) and np.all(np.isfinite(threshold))
