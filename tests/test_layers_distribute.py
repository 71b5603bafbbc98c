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
    DeepHashEmbedding, DoubleHashingEmbedding, FixedEmbedding, HashingEmbedding, PEPEmbedding, QREmbedding,
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
    # DHE: no table; its network (and each replica's batch norm) trains.
    (DeepHashEmbedding, {"output_dim": 5, "num_hashes": 16, "hidden_units": [8, 8], "combiner": "mean"}),
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
    trained = layer.sparse_tables() or layer.trainable_weights  # a table-free scheme: its network
    before = [np.array(w.numpy()) for w in trained]
    history = model.fit(ids, targets, batch_size=8, epochs=1, verbose=0)  # 2 steps of 2 x 4 examples
    assert np.all(np.isfinite(history.history["loss"])), history.history
    after = [np.array(w.numpy()) for w in trained]
    assert all(not np.allclose(b, a) for b, a in zip(before, after)), "an embedding table did not train"
    if isinstance(layer, PEPEmbedding):  # the thresholds train too (one variable: its second column block)
        threshold = np.asarray(layer.threshold)
        assert not np.allclose(threshold, -3.0) and np.all(np.isfinite(threshold))


# ------------------------------------------------------------------------------------- models under a strategy
def _ctr_data(rows=128):
    from tfemb.data import make_synthetic_ctr, synthetic_ctr_schema

    df, _ = make_synthetic_ctr(num_rows=rows, seed=0)
    schema = synthetic_ctr_schema(df).fit(df)
    x, y = schema.transform(df)
    return schema, x, y


def _cf_data(rows=160, task="binary"):
    from tfemb.data import make_synthetic_cf, synthetic_cf_schema

    df, _ = make_synthetic_cf(num_users=40, num_items=30, num_rows=rows, seed=0, task=task)
    schema = synthetic_cf_schema(df, task=task).fit(df)
    x, y = schema.transform(df)
    return schema, x, y


def _max_diff(a, b):
    return max((float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64)))) for u, v in zip(a, b)
                if np.size(u)), default=0.0)


@pytest.mark.parametrize("model_name,scheme,task,numeric", [
    # DeepFM's numeric features embedded by AutoDis; DLRM's raw, through its bottom MLP.
    ("deepfm", "double_hashing", "binary", "autodis"), ("dlrm", "md", "binary", None), ("mf", "qr", "regression", None),
])
def test_model_fit_on_two_replicas_matches_one_replica(strategy, model_name, scheme, task, numeric):
    """``strategy.scope()`` around building, ``compile_model`` and ``fit`` trains as one replica does on the same
    global batches. Keras 3 failed twice here: ``fit`` could not build the model ("Unable to automatically build
    the model": it built from the replica-averaged first batch, float ids), and the loss of the models' [batch]
    outputs was not divided by the replicas, so the summed gradients were twice the global batch's (reported
    loss 2x, weights off by 1e-1)."""
    from tfemb.layers import scheme_factory
    from tfemb.models import get_model_class
    from tfemb.tasks import compile_model

    schema, x, y = _cf_data(task=task) if model_name == "mf" else _ctr_data()
    kwargs = {} if scheme == "fixed" else {"compression": 2}

    def build():
        keras.utils.set_random_seed(0)
        model = get_model_class(model_name)(schema, embedding_dim=8, numeric_embeddings=numeric,
                                            embeddings=scheme_factory(scheme, output_dim=8, **kwargs))
        assert bool(model.numeric_names) == bool(numeric)
        model.build()
        compile_model(model, optimizer="sgd", learning_rate=0.1)
        return model

    def data():
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(32)

    one = build()
    with strategy.scope():
        two = build()
        two.set_weights(one.get_weights())
        history_two = two.fit(data(), epochs=2, verbose=0).history
    history_one = one.fit(data(), epochs=2, verbose=0).history
    np.testing.assert_allclose(history_two["loss"], history_one["loss"], rtol=1e-5, atol=1e-6)
    assert _max_diff(one.get_weights(), two.get_weights()) < 1e-4
    evaluated_one = one.evaluate(data(), verbose=0, return_dict=True)
    evaluated_two = two.evaluate(data(), verbose=0, return_dict=True)
    for name, value in evaluated_one.items():
        np.testing.assert_allclose(evaluated_two[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_low_precision_tables_on_two_replicas(strategy):
    """LPT (``LowPrecisionEmbedding(step_size="fixed")``) under two replicas: the stochastic rounding after each
    all-reduced update is seeded by the table itself, so both replicas' copies stay equal and on the grid. ALPT
    trains its step sizes on one replica only: refused, naming the layer and the replicas."""
    from tfemb.layers import scheme_factory
    from tfemb.models import DeepFM
    from tfemb.tasks import compile_model

    schema, x, y = _ctr_data()
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    for step_size in ("fixed", "adaptive"):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = DeepFM(schema, embedding_dim=4, dnn_units=(8,),
                           embeddings=scheme_factory("low_precision", output_dim=4, bits=4, step_size=step_size))
            model.build()
            compile_model(model, optimizer="adam", learning_rate=0.01)
        if step_size == "adaptive":
            with pytest.raises(ValueError, match=r"_embedding: LowPrecisionEmbedding\(step_size='adaptive'\) \(ALPT\) "
                                                 r"trains its step sizes on one replica only. Received a "
                                                 r"tf.distribute strategy with 2 replicas"):
                model.fit(data, epochs=1, verbose=0)
            continue
        before = [layer.embeddings.numpy().copy() for layer in model.embedding_list]
        model.fit(data, epochs=2, verbose=0)
        for layer, start in zip(model.embedding_list, before):
            variable = layer.embeddings.value if hasattr(layer.embeddings, "path") else layer.embeddings
            copies = [np.asarray(v.numpy()) for v in variable.values]
            assert len(copies) == 2
            np.testing.assert_array_equal(copies[0], copies[1])
            codes = copies[0].astype(np.float64) / layer.step_sizes.numpy().astype(np.float64)
            assert np.max(np.abs(codes - np.rint(codes))) < 1e-4 and not np.array_equal(copies[0], start)


def test_sample_weights_weight_each_example_of_a_rank_1_output():
    """Keras 3 averaged [batch] outputs to one scalar before weighting, so a [batch] sample weight only scaled
    the batch mean (weights (1, 0) gave half the unweighted loss, not the first example's loss / 2)."""
    from tfemb.models import MatrixFactorization
    from tfemb.tasks import compile_model

    schema, x, _ = _cf_data(task="binary")
    model = MatrixFactorization(schema, embedding_dim=4)
    model.build()
    compile_model(model)
    y = tf.constant([1.0, 0.0])
    y_pred = tf.constant([0.9, 0.9])
    weighted = float(model.compute_loss(x=None, y=y, y_pred=y_pred, sample_weight=tf.constant([1.0, 0.0])))
    np.testing.assert_allclose(weighted, -np.log(0.9) / 2, rtol=1e-5)


def test_row_sparse_embedding_optimizer_is_refused_under_two_replicas(strategy):
    """The row-sparse optimizers update each replica's copy with that replica's share of the gradient and no
    cross-replica sum: ``RecModel.fit`` refused, but ``ESAPNSearch.fit`` (through ``apply_split_gradients``)
    trained, and the replicas' tables drifted apart silently (max diff 6e-4 after 10 steps)."""
    from tfemb.esapn import ESAPNSearch
    from tfemb.layers import ESAPNEmbedding
    from tfemb.models import CFNetwork, MatrixFactorization
    from tfemb.tasks import compile_model

    schema, x, y = _cf_data()
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(40)
    with strategy.scope():
        model = MatrixFactorization(schema, embedding_dim=4, embedding_optimizer="adam")
        compile_model(model)
        with pytest.raises(ValueError, match=r"embedding_optimizer=SparseAdam\(learning_rate=0\.001\).*2 replicas"):
            model.fit(data, epochs=1, verbose=0)

        def make(name, vocabulary_size, frequencies):
            return ESAPNEmbedding(vocabulary_size, candidate_dims=(2, 4), name=f"{name}_embedding")

        cf = CFNetwork(schema, embeddings={"user_id": make, "item_id": make}, embedding_dim=4, hidden_units=(4,),
                       embedding_optimizer="sgd")
        search = ESAPNSearch(cf, popularity_embedding_dim=2, policy_units=3)
        search.compile(optimizer=keras.optimizers.SGD(0.1), metrics=[])
        with pytest.raises(ValueError, match=r"embedding_optimizer=SparseSGD.*2 replicas"):
            search.fit(data, epochs=1, verbose=0)


def test_esapn_search_on_two_replicas_matches_one_replica(strategy):
    """``ESAPNSearch`` gathers its per-id state across replicas: with no batch normalisation (whose statistics
    are per replica) the sizes, weights and reported loss equal one replica's. The reported loss was half of it
    once the replicas' losses were scaled (each replica's loss is its share of the global mean)."""
    from tfemb.esapn import ESAPNSearch
    from tfemb.layers import ESAPNEmbedding
    from tfemb.models import CFNetwork

    schema, x, y = _cf_data(rows=200)

    def build():
        keras.utils.set_random_seed(0)

        def make(name, vocabulary_size, frequencies):
            return ESAPNEmbedding(vocabulary_size, candidate_dims=(2, 3, 5, 8), normalization="none",
                                  name=f"{name}_embedding")

        model = CFNetwork(schema, embeddings={"user_id": make, "item_id": make}, embedding_dim=8, hidden_units=(8,),
                          batch_norm=False, input_batch_norm=False)
        search = ESAPNSearch(model, popularity_embedding_dim=3, policy_units=5)
        search.compile(optimizer=keras.optimizers.SGD(0.1), policy_optimizer=keras.optimizers.SGD(0.1), metrics=[])
        return model, search

    def data():
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(40)

    model_one, search_one = build()
    with strategy.scope():
        model_two, search_two = build()
        model_two.set_weights(model_one.get_weights())
        search_two.set_weights(search_one.get_weights())
        loss_two = search_two.fit(data(), epochs=1, verbose=0).history["loss"]
    loss_one = search_one.fit(data(), epochs=1, verbose=0).history["loss"]
    np.testing.assert_allclose(loss_two, loss_one, rtol=1e-5)
    for name in ("user_id", "item_id"):
        np.testing.assert_array_equal(model_two.embedding_layers[name].dims_per_id(),
                                      model_one.embedding_layers[name].dims_per_id())
    assert _max_diff(model_one.get_weights(), model_two.get_weights()) < 1e-4
