"""DeepHashEmbedding (DHE, Kang et al. KDD 2021): encoding, network, compact form and sizing against NumPy."""

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tfemb._keras import keras
from tfemb.layers import DeepHashEmbedding, dhe_parameter_count, dhe_width_for_budget, scheme_factory
from tfemb.layers.deep_hash_embedding import dense_hash_encoding_np, mish_np
from tfemb.layers.hashing import universal_hash_params


def numpy_forward(layer, ids, training=False):
    """The layer's output from its weights in NumPy: encoding, dense, batch norm (moving or batch statistics),
    Mish, ..., the last dense layer linear."""
    a, b = universal_hash_params(layer.seed, layer.num_hashes)
    x = dense_hash_encoding_np(np.asarray(ids).reshape(-1), a, b, layer.num_buckets, layer.distribution)
    value = lambda v: np.asarray(tf.convert_to_tensor(v), np.float64)  # noqa: E731
    last = len(layer.kernels) - 1
    for i, (kernel, bias) in enumerate(zip(layer.kernels, layer.biases)):
        x = x @ value(kernel) + value(bias)
        if i < last:
            if layer.norms:
                norm = layer.norms[i]
                if training:
                    mean, var = x.mean(axis=0), x.var(axis=0)
                else:
                    mean, var = value(norm.moving_mean), value(norm.moving_variance)
                x = (x - mean) / np.sqrt(var + norm.epsilon) * value(norm.gamma) + value(norm.beta)
            x = mish_np(x)
    return x.reshape(np.asarray(ids).shape + (layer.output_dim,))


def randomized(layer, seed=0):
    rng = np.random.default_rng(seed)
    for w in layer.weights:
        shape = tuple(w.shape)
        values = rng.uniform(0.5, 1.5, shape) if "variance" in w.name else rng.normal(0.0, 0.4, shape)
        w.assign(values.astype(np.float32))
    return layer


def test_encoding_is_the_papers_uniform_and_box_muller_transforms():
    ids = np.array([0, 1, 7, 123_456, 2**31 - 2], np.int64)
    a, b = universal_hash_params(3, 8)
    hashes = ((ids[:, None] * a + b) % (2**31 - 1)) % 1000
    uniform = dense_hash_encoding_np(ids, a, b, 1000, "uniform")
    np.testing.assert_allclose(uniform, hashes / 999.0 * 2 - 1)
    assert uniform.min() >= -1 and uniform.max() <= 1
    gauss = dense_hash_encoding_np(ids, a, b, 1000, "gaussian")
    u1, u2 = (hashes[:, 0::2] + 1) / 1000.0, hashes[:, 1::2] / 1000.0
    np.testing.assert_allclose(gauss[:, 0::2], np.sqrt(-2 * np.log(u1)) * np.cos(2 * np.pi * u2))
    np.testing.assert_allclose(gauss[:, 1::2], np.sqrt(-2 * np.log(u1)) * np.sin(2 * np.pi * u2))
    for distribution in ("uniform", "gaussian"):
        layer = DeepHashEmbedding(2**31 - 1, 4, num_hashes=8, num_buckets=1000, hidden_units=[3], seed=3,
                                  distribution=distribution)
        got = layer.encode(tf.constant(ids)).numpy()
        np.testing.assert_allclose(got, dense_hash_encoding_np(ids, a, b, 1000, distribution), atol=2e-6)


@pytest.mark.parametrize("distribution", ["uniform", "gaussian"])
def test_forward_matches_numpy_at_inference_and_in_training(distribution):
    layer = DeepHashEmbedding(5000, 6, num_hashes=32, hidden_units=[16, 8], distribution=distribution, seed=1)
    layer.build()
    randomized(layer)
    ids = np.array([[0, 3, 4999], [17, 17, 250]], np.int64)
    np.testing.assert_allclose(layer(tf.constant(ids), training=False).numpy(), numpy_forward(layer, ids),
                               atol=2e-5)
    np.testing.assert_allclose(layer(tf.constant(ids), training=True).numpy(),
                               numpy_forward(layer, ids, training=True), atol=2e-4)
    # Multi-hot pooling through the base class: the mean of the listed ids' vectors, -1 pads.
    pooled = DeepHashEmbedding.from_config({**layer.get_config(), "combiner": "mean"})
    pooled.build()
    pooled.set_weights(layer.get_weights())
    out = pooled(tf.constant([[3, 17, -1]]), training=False).numpy()
    np.testing.assert_allclose(out[0], numpy_forward(layer, np.array([3, 17])).mean(axis=0), atol=2e-5)


def test_training_updates_batch_norm_statistics_and_the_layer_learns():
    layer = DeepHashEmbedding(1000, 4, num_hashes=64, hidden_units=[32, 32], seed=2)
    target = np.random.default_rng(0).normal(size=(1000, 4)).astype(np.float32)
    ids = np.arange(1000)
    model = keras.Sequential([keras.Input(shape=(), dtype="int64"), layer])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    before = float(model.evaluate(ids, target, verbose=0))
    moving = np.asarray(tf.convert_to_tensor(layer.norms[0].moving_mean)).copy()
    model.fit(ids, target, epochs=30, batch_size=100, verbose=0)
    after = float(model.evaluate(ids, target, verbose=0))
    assert after < 0.5 * before  # it memorises 1,000 ids' random vectors with 4,452 parameters
    assert not np.allclose(np.asarray(tf.convert_to_tensor(layer.norms[0].moving_mean)), moving)


def test_hidden_layers_of_one_shape_start_from_different_kernels():
    layer = DeepHashEmbedding(100, 4, num_hashes=8, hidden_units=[6, 6, 6])
    layer.build()
    kernels = [np.asarray(tf.convert_to_tensor(k)) for k in layer.kernels[1:3]]
    assert kernels[0].shape == kernels[1].shape and not np.allclose(kernels[0], kernels[1])
    seeded = DeepHashEmbedding(100, 4, num_hashes=8, hidden_units=[6, 6, 6],
                               kernel_initializer=keras.initializers.GlorotUniform(seed=7))
    again = DeepHashEmbedding.from_config(seeded.get_config())
    seeded.build(), again.build()
    for a, b in zip(seeded.kernels, again.kernels):  # seeded: reproducible, and still one draw per kernel
        np.testing.assert_array_equal(np.asarray(tf.convert_to_tensor(a)), np.asarray(tf.convert_to_tensor(b)))
    assert not np.allclose(np.asarray(tf.convert_to_tensor(seeded.kernels[1])),
                           np.asarray(tf.convert_to_tensor(seeded.kernels[2])))


def test_compact_folds_batch_norm_and_keeps_the_outputs():
    layer = DeepHashEmbedding(800, 5, num_hashes=24, hidden_units=[12, 10, 7], seed=4)
    layer.build()
    randomized(layer, seed=1)
    compact = layer.compact()
    assert not compact.trainable and not compact.norms and compact.use_batch_norm is False
    ids = tf.constant(np.arange(0, 800, 7))
    np.testing.assert_allclose(compact(ids).numpy(), layer(ids, training=False).numpy(), atol=1e-5)
    # Inference parameters: dense kernels and biases only, what compact() stores.
    count = 24 * 12 + 12 + 12 * 10 + 10 + 10 * 7 + 7 + 7 * 5 + 5
    assert layer.parameter_count() == compact.parameter_count() == count == dhe_parameter_count(24, [12, 10, 7], 5)
    assert sum(int(np.prod(w.shape)) for w in compact.weights) == count
    assert compact.storage_bytes() == count * 4
    assert layer.search_parameter_count() == count + 2 * (12 + 10 + 7)  # + batch norms' gamma and beta
    np.testing.assert_array_equal(layer.dims_per_id(), np.full(800, 5))


def test_config_round_trip_keeps_every_argument():
    layer = DeepHashEmbedding(300, 4, num_hashes=10, num_buckets=977, hidden_units=[6, 5], distribution="gaussian",
                              batch_norm_momentum=0.9, seed=11, name="item_embedding")
    layer.build()
    randomized(layer)
    copy = DeepHashEmbedding.from_config(layer.get_config())
    copy.build()
    copy.set_weights(layer.get_weights())
    for key in ("num_hashes", "num_buckets", "hidden_units", "distribution", "batch_norm_momentum", "seed"):
        assert getattr(copy, key) == getattr(layer, key), key
    ids = tf.constant([0, 5, 299])
    np.testing.assert_array_equal(copy(ids, training=False).numpy(), layer(ids, training=False).numpy())
    # Another seed is another encoding.
    other = DeepHashEmbedding.from_config({**layer.get_config(), "seed": 12})
    assert not np.array_equal(other.encode(ids).numpy(), layer.encode(ids).numpy())


def test_factory_sizes_the_network_to_the_compression_budget():
    make = scheme_factory("dhe", output_dim=16, compression=4.0, num_hashes=256, num_hidden_layers=3)
    layer = make("item", 50_000, None)
    budget = 50_000 * 16 / 4
    width = layer.hidden_units[0]
    assert layer.hidden_units == (width,) * 3 and layer.name == "item_embedding"
    assert layer.parameter_count() <= budget < dhe_parameter_count(256, [width + 1] * 3, 16)
    assert dhe_width_for_budget(budget, 256, 16, 3) == width
    # One hidden layer: the linear case of the width solver.
    w1 = dhe_width_for_budget(10_000, 100, 8, 1)
    assert dhe_parameter_count(100, [w1], 8) <= 10_000 < dhe_parameter_count(100, [w1 + 1], 8)
    with pytest.raises(ValueError, match=r"feature 'tiny' \(vocabulary_size=20, compression=4.0\).*needs at least"):
        scheme_factory("dhe", output_dim=16, compression=4.0)("tiny", 20, None)
    with pytest.raises(ValueError, match="compression replaces hidden_units"):
        scheme_factory("dhe", output_dim=8, compression=2.0, hidden_units=[4])
    with pytest.raises(ValueError, match="num_hidden_layers size a DHE network with compression"):
        scheme_factory("dhe", output_dim=8, num_hidden_layers=2)
    with pytest.raises(ValueError, match="num_hidden_layers must be an int >= 1. Received: num_hidden_layers=0"):
        scheme_factory("dhe", output_dim=8, compression=2.0, num_hidden_layers=0)
    with pytest.raises(ValueError, match="fallback must be one of .* Received: fallback='fixed'"):
        scheme_factory("dhe", output_dim=8, compression=2.0, fallback="fixed")


def test_factory_falls_back_to_hashing_where_the_budget_cannot_hold_the_network():
    from tfemb.layers import HashingEmbedding

    make = scheme_factory("dhe", output_dim=16, compression=4.0, num_hashes=64, num_hidden_layers=2, min_width=16,
                          fallback="hashing", combiner="mean")
    big, small = make("item", 20_000, None), make("tiny", 100, None)
    assert isinstance(big, DeepHashEmbedding) and big.hidden_units[0] >= 16 and big.combiner == "mean"
    assert isinstance(small, HashingEmbedding) and small.name == "tiny_embedding" and small.combiner == "mean"
    assert small.num_buckets == 25 and small.parameter_count() == 100 * 16 / 4
    # Without a fallback the same feature is an error naming it and the width it would get.
    with pytest.raises(ValueError, match=r"feature 'tiny' .*width \d+, under min_width=16.*fallback='hashing'"):
        scheme_factory("dhe", output_dim=16, compression=4.0, num_hashes=64, num_hidden_layers=2,
                       min_width=16)("tiny", 100, None)


@pytest.mark.parametrize("kwargs,message", [
    ({"num_hashes": 0}, "num_hashes must be an int >= 1. Received: num_hashes=0"),
    ({"num_buckets": 2.5}, "num_buckets must be an int >= 1. Received: num_buckets=2.5"),
    ({"hidden_units": []}, r"hidden_units must be a non-empty list of ints >= 1. Received: hidden_units=\[\]"),
    ({"hidden_units": 8}, "hidden_units must be a non-empty list of ints >= 1. Received: hidden_units=8"),
    ({"hidden_units": [8, 0]}, r"hidden_units\[i\] must be an int >= 1. Received: hidden_units\[i\]=0"),
    ({"distribution": "normal"}, "distribution must be one of .* Received: distribution='normal'"),
    ({"distribution": "gaussian", "num_hashes": 7}, "num_hashes must be even. Received: num_hashes=7"),
    ({"batch_norm": "yes"}, "batch_norm must be True or False. Received: batch_norm='yes'"),
    ({"batch_norm_momentum": 1.0}, r"batch_norm_momentum must be a number in \[0, 1\). Received: batch_norm_momentum=1.0"),
    ({"seed": -1}, "seed must be an int >= 0. Received: seed=-1"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeepHashEmbedding(100, 4, **{"hidden_units": [4], **kwargs})


def test_out_of_range_ids_are_refused_as_by_every_scheme():
    layer = DeepHashEmbedding(10, 4, num_hashes=8, hidden_units=[4])
    with pytest.raises(tf.errors.InvalidArgumentError, match="ids must be < vocabulary_size=10"):
        layer(tf.constant([3, 10]))


def test_deepfm_with_dhe_trains_through_tfemb_models():
    from tfemb.data import CategoricalFeature, Label, Schema, make_dataset
    from tfemb.models import DeepFM

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"u": rng.integers(0, 200, 2000), "i": rng.integers(0, 300, 2000)})
    df["click"] = ((df["u"] % 2) ^ (df["i"] % 3 == 0)).astype(int)
    schema = Schema([CategoricalFeature("u"), CategoricalFeature("i")], Label("click")).fit(df)
    x, y = schema.transform(df)
    model = DeepFM(schema, embeddings=scheme_factory("dhe", output_dim=8, num_hashes=64, hidden_units=[32, 32]),
                   embedding_dim=8, dnn_units=(16,))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    first = model.fit(make_dataset(x, y, batch_size=200), epochs=1, verbose=0).history["loss"][0]
    last = model.fit(make_dataset(x, y, batch_size=200), epochs=8, verbose=0).history["loss"][-1]
    assert last < 0.8 * first
    assert model.embedding_parameter_count() == 2 * dhe_parameter_count(64, [32, 32], 8)


def test_the_dhe_benchmark_spec_is_a_valid_compare_spec():
    import pathlib

    import yaml

    from tfemb import compare

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "specs" / "dhe_movielens.yaml"
    spec = yaml.safe_load(path.read_text())
    compare.check_spec(spec, where=str(path))
    assert {v["embedding"]["scheme"] for v in spec["variants"]} == {"fixed", "hashing", "dhe"}


def test_table_dtype_stores_the_other_schemes_tables_and_keeps_dhe_float32(tmp_path):
    from tfemb.data import CategoricalFeature, Label, Schema
    from tfemb.export import ExportError, export_saved_model, load_export
    from tfemb.models import DeepFM

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"u": rng.integers(0, 40, 400), "i": rng.integers(0, 3000, 400)})
    df["click"] = (df["u"] % 2).astype(int)
    schema = Schema([CategoricalFeature("u"), CategoricalFeature("i")], Label("click")).fit(df)
    x, _ = schema.transform(df)
    # Items get a DHE network, users (too few ids for one) a hashing table: int8 stores the hashing table only.
    mixed = DeepFM(schema, embeddings=scheme_factory("dhe", output_dim=8, compression=2.0, num_hashes=16,
                                                     num_hidden_layers=1, min_width=8, fallback="hashing"),
                   embedding_dim=8, dnn_units=(8,))
    mixed.build()
    assert [type(mixed.embedding_layers[n]).__name__ for n in ("u", "i")] == ["HashingEmbedding", "DeepHashEmbedding"]
    path = export_saved_model(mixed, tmp_path / "mixed", table_dtype="int8")
    loaded = load_export(path)
    dtypes = {row["feature"]: {t["dtype"] for t in loaded.report["tables"] if t["feature"] == row["feature"]}
              for row in loaded.report["features"]}
    assert "int8" in dtypes["u"] and dtypes["i"] == {"float32"}
    expected = mixed(x, training=False).numpy()
    assert np.max(np.abs(loaded.predict_encoded(x)["probability"] - expected)) < 0.02
    # A model whose every scheme is DHE has no table to store: refused, naming the schemes.
    only = DeepFM(schema, embeddings=scheme_factory("dhe", output_dim=8, num_hashes=16, hidden_units=[8]),
                  embedding_dim=8, dnn_units=(8,))
    only.build()
    with pytest.raises(ExportError, match=r"none of DeepFM's schemes \(DeepHashEmbedding\) has one"):
        export_saved_model(only, tmp_path / "only", table_dtype="float16")
    assert not (tmp_path / "only").exists()
