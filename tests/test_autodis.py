"""Numeric-feature embeddings: AutoDis (Guo et al., KDD 2021) and the field embedding, against NumPy; numeric
features as fields of the CTR models (RecModel(numeric_embeddings=...)); recipes; export."""

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tfemb import compare, experiment
from tfemb.data.readers import criteo_schema
from tfemb.data.schema import CategoricalFeature, Label, NumericFeature, Schema
from tfemb.errors import DataError
from tfemb.export import export_saved_model, load_export
from tfemb.export.ops_check import check_ops, unsupported_ops
from tfemb.export.report import console_report
from tfemb.layers import AutoDisEmbedding, FieldEmbedding, numeric_factory
from tfemb.models import DLRM, CFNetwork, DeepFM, FactorizationMachine, LogisticRegression
from tfemb.tasks import compile_model

D = 4


def value(v):
    return np.asarray(tf.convert_to_tensor(v), np.float64)


def leaky_relu_np(x, slope):
    return np.where(x >= 0, x, slope * x)


def autodis_np(layer, x):
    """AutoDis from the layer's weights in NumPy: scores (softmax of the two-layer network with the skip
    connection, over the temperature), then the aggregation."""
    x = np.asarray(x, np.float64).reshape(-1)
    h = x[:, None] * value(layer.projection)[0][None, :]
    if layer.use_bias:
        h = h + value(layer.projection_bias)
    h = leaky_relu_np(h, layer.negative_slope)
    logits = h @ value(layer.mixing) + layer.skip_factor * h
    if layer.use_bias:
        logits = logits + value(layer.mixing_bias)
    z = logits / layer.temperature
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    meta = value(layer.meta_embeddings)
    if layer.aggregation == "weighted_average":
        return p, p @ meta
    k = 1 if layer.aggregation == "max_pooling" else layer.top_k
    top = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return p, meta[top].sum(axis=1)


def randomized(layer, seed=0):
    rng = np.random.default_rng(seed)
    for w in layer.weights:
        w.assign(rng.normal(0.0, 0.7, tuple(w.shape)).astype(np.float32))
    return layer


VALUES = np.array([-3.0, -0.7, -0.1, 0.0, 0.05, 0.4, 1.0, 2.5, 10.0], np.float32)


# --------------------------------------------------------------------------------------------- the layers
@pytest.mark.parametrize("aggregation,use_bias,temperature", [
    ("weighted_average", True, 1.0), ("weighted_average", False, 0.3), ("weighted_average", True, 1e-2),
    ("max_pooling", True, 1.0), ("top_k_sum", True, 2.0), ("top_k_sum", False, 1.0)])
def test_autodis_matches_numpy(aggregation, use_bias, temperature):
    layer = AutoDisEmbedding(D, num_buckets=6, temperature=temperature, skip_factor=0.25, aggregation=aggregation,
                             top_k=3, use_bias=use_bias, negative_slope=0.05)
    layer(tf.constant(VALUES))
    randomized(layer, seed=1)
    p_ref, e_ref = autodis_np(layer, VALUES)
    p = layer.bucket_scores(tf.constant(VALUES)).numpy()
    # float32 rounding of the logits, scaled by 1 / τ in the softmax.
    tol = 2e-6 * max(1.0, 1.0 / temperature)
    np.testing.assert_allclose(p, p_ref, atol=tol)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
    out = layer(tf.constant(VALUES)).numpy()
    assert out.shape == (len(VALUES), D)
    np.testing.assert_allclose(out, e_ref, atol=10 * tol)
    # [batch, 1] inputs give the same vectors.
    np.testing.assert_allclose(layer(tf.constant(VALUES[:, None])).numpy(), out, atol=0)


def test_weighted_average_is_continuous_and_hard_aggregations_are_not():
    soft = randomized(AutoDisEmbedding(D, num_buckets=8, temperature=0.5), seed=2)
    soft(tf.constant(VALUES))
    randomized(soft, seed=2)
    x = np.linspace(-2, 2, 2001).astype(np.float32)
    e = soft(tf.constant(x)).numpy()
    # Neighbouring values (step 0.002) get neighbouring embeddings: a bounded slope, no jumps.
    assert np.abs(np.diff(e, axis=0)).max() < 0.05
    hard = AutoDisEmbedding(D, num_buckets=8, temperature=0.5, aggregation="max_pooling")
    hard(tf.constant(VALUES))
    by_name = {w.name.split("/")[-1].split(":")[0]: w for w in soft.weights}  # the hard layer orders them otherwise
    for w in hard.weights:
        w.assign(by_name[w.name.split("/")[-1].split(":")[0]])
    chosen = np.argmax(hard.bucket_scores(tf.constant(x)).numpy(), axis=1)
    assert len(np.unique(chosen)) > 1  # the biases make value ranges choose different buckets
    jumps = np.abs(np.diff(hard(tf.constant(x)).numpy(), axis=0)).max(axis=1)
    assert jumps.max() > 10 * np.abs(np.diff(e, axis=0)).max()  # a hard edge between buckets


def test_without_biases_the_best_bucket_is_one_per_sign_of_the_value():
    # The paper's equations as written: the highest-scored bucket is the same for every positive value (and for
    # every negative one), which is why the layer has biases by default.
    layer = randomized(AutoDisEmbedding(D, num_buckets=8, use_bias=False), seed=3)
    layer(tf.constant(VALUES))
    randomized(layer, seed=3)
    x = np.concatenate([np.linspace(0.01, 50, 500), -np.linspace(0.01, 50, 500)]).astype(np.float32)
    chosen = np.argmax(layer.bucket_scores(tf.constant(x)).numpy(), axis=1)
    assert len(np.unique(chosen[:500])) == 1 and len(np.unique(chosen[500:])) == 1


def test_gradients_reach_the_network_only_with_the_weighted_average():
    for aggregation, learns in (("weighted_average", True), ("max_pooling", False), ("top_k_sum", False)):
        layer = AutoDisEmbedding(D, num_buckets=5, aggregation=aggregation)
        layer(tf.constant(VALUES))
        names = sorted(w.name.split("/")[-1].split(":")[0] for w in layer.trainable_weights)
        expected = ["meta_embeddings", "mixing", "mixing_bias", "projection", "projection_bias"] if learns else \
            ["meta_embeddings"]
        assert names == expected, aggregation
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(layer(tf.constant(VALUES))))
        grads = tape.gradient(loss, layer.trainable_weights)
        assert all(g is not None and np.any(np.asarray(tf.convert_to_tensor(g)) != 0) for g in grads)
    assert len(layer.weights) == 5 and layer.parameter_count() == sum(int(np.prod(w.shape)) for w in layer.weights)


def test_field_embedding_is_value_times_one_vector():
    layer = FieldEmbedding(D)
    out = layer(tf.constant(VALUES)).numpy()
    v = value(layer.field_vector)
    np.testing.assert_allclose(out, VALUES[:, None].astype(np.float64) * v[None, :], atol=1e-6)
    assert layer.parameter_count() == D and layer.storage_bytes() == 4 * D


def test_sizes_and_config_round_trip():
    layer = AutoDisEmbedding(8, num_buckets=10, temperature=0.2, skip_factor=0.5, aggregation="top_k_sum", top_k=4,
                             negative_slope=0.1)
    assert layer.parameter_count() == 10 + 10 * 10 + 10 * 8 + 2 * 10  # w, W, ME, b_1 and b_2
    assert layer.storage_bytes() == 4 * layer.parameter_count()
    layer(tf.constant(VALUES))
    assert layer.parameter_count() == sum(int(np.prod(w.shape)) for w in layer.weights)
    clone = AutoDisEmbedding.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    clone(tf.constant(VALUES))
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(clone(tf.constant(VALUES)).numpy(), layer(tf.constant(VALUES)).numpy(), atol=0)
    assert AutoDisEmbedding(8, num_buckets=10, use_bias=False).parameter_count() == 10 + 100 + 80


@pytest.mark.parametrize("kwargs,match", [
    ({"num_buckets": 0}, "num_buckets must be an int >= 1. Received: num_buckets=0"),
    ({"temperature": 0.0}, "temperature must be a number > 0. Received: temperature=0.0"),
    ({"temperature": "hot"}, "temperature must be a number > 0. Received: temperature='hot'"),
    ({"aggregation": "mean"}, "aggregation must be one of .* Received: aggregation='mean'"),
    ({"top_k": 21}, "top_k must be at most num_buckets=20. Received: top_k=21"),
    ({"negative_slope": -1}, "negative_slope must be a number >= 0. Received: negative_slope=-1"),
    ({"skip_factor": None}, "skip_factor must be a number. Received: skip_factor=None"),
    ({"output_dim": 0}, "output_dim must be an int >= 1. Received: output_dim=0"),
])
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutoDisEmbedding(**{"output_dim": D, **kwargs})


def test_bad_inputs_name_the_layer():
    layer = AutoDisEmbedding(D, name="price_numeric_embedding")
    with pytest.raises(TypeError, match="price_numeric_embedding: a numeric feature's values must be numbers. "
                                        "Received: dtype string"):
        layer(tf.constant(["1.5"]))
    with pytest.raises(ValueError, match=r"price_numeric_embedding: expected one value per row.*\(3, 2\)"):
        layer(tf.zeros((3, 2)))
    with pytest.raises(ValueError, match="expected one value per row"):
        FieldEmbedding(D)(tf.zeros((2, 1, 1)))
    with pytest.raises(ValueError, match="unknown numeric embedding 'autodiss'"):
        numeric_factory("autodiss", output_dim=D)
    with pytest.raises(ValueError, match="needs output_dim"):
        numeric_factory("autodis")
    with pytest.raises(ValueError, match="temperature must be a number > 0"):  # at the factory, not per feature
        numeric_factory("autodis", output_dim=D, temperature=-1.0)


def test_mixed_float16_outputs_are_finite_at_a_small_temperature():
    policy = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = AutoDisEmbedding(D, num_buckets=6, temperature=1e-3)
        out = layer(tf.constant(VALUES))
    finally:
        tf.keras.mixed_precision.set_global_policy(policy)
    assert out.dtype == tf.float16 and np.all(np.isfinite(out.numpy()))
    p_ref, e_ref = autodis_np(layer, VALUES)
    np.testing.assert_allclose(out.numpy().astype(np.float64), e_ref, atol=2e-2)


# --------------------------------------------------------------------------------------------- the models
def ctr_frame(n=240, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    return pd.DataFrame({
        "c": rng.choice(list("abcdef"), n),
        "price": x,
        "count": rng.exponential(3.0, n).round(),
        "click": (rng.random(n) < 1 / (1 + np.exp(-2 * x))).astype(int),
    })


@pytest.fixture(scope="module")
def ctr():
    df = ctr_frame()
    schema = Schema([CategoricalFeature("c"), NumericFeature("price", transform="standardize"),
                     NumericFeature("count", transform="log")], Label("click")).fit(df)
    x, y = schema.transform(df)
    return df, schema, x, y


def test_numeric_features_become_fields(ctr):
    _, schema, x, _ = ctr
    raw = DeepFM(schema, embedding_dim=D, dnn_units=(5,))
    assert raw.field_names == ["c"] and raw.raw_dense_names == ["price", "count"] and not raw.numeric_layers
    model = DeepFM(schema, embedding_dim=D, dnn_units=(5,), numeric_embeddings="autodis")
    assert model.field_names == ["c", "price", "count"] and model.raw_dense_names == []
    assert [type(model.numeric_layers[n]).__name__ for n in ("price", "count")] == ["AutoDisEmbedding"] * 2
    assert model.numeric_layers["price"].name == "price_numeric_embedding"
    embedded, dense = model.embed({k: tf.constant(v) for k, v in x.items()})
    assert set(embedded) == {"c", "price", "count"} and dense is None
    assert embedded["price"].shape == (len(schema.transform(ctr[0])[1]), D)
    mixed = DeepFM(schema, embedding_dim=D, dnn_units=(5,), numeric_embeddings={"price": "field"})
    assert mixed.field_names == ["c", "price"] and mixed.raw_dense_names == ["count"]
    # The deep part reads 3 fields (no raw values); the first-order terms still read both raw values.
    model(x)
    assert model.dnn.dense_layers[0].kernel.shape[0] == 3 * D
    assert model.linear.dense_layer.kernel.shape[0] == 2
    assert model.numeric_parameter_count() == 2 * model.numeric_layers["price"].parameter_count()
    assert [r["feature"] for r in model.numeric_embedding_report()] == ["price", "count"]


def test_fm_pairwise_term_includes_the_numeric_fields(ctr):
    """FactorizationMachine with field embeddings against NumPy: b + w[c] + dense @ w + Σ_{i<j} <v_i, v_j>, the
    numeric fields' vectors being x · v."""
    _, schema, x, _ = ctr
    model = FactorizationMachine(schema, embedding_dim=D, numeric_embeddings="field")
    model(x)
    rng = np.random.default_rng(5)
    for w in model.weights:
        w.assign(rng.normal(0, 0.5, tuple(w.shape)).astype(np.float32))
    got = model(x, training=False).numpy()
    table = value(model.embedding_layers["c"].embeddings)
    vectors = [table[x["c"]]] + [x[n][:, None].astype(np.float64) * value(model.numeric_layers[n].field_vector)
                                 for n in ("price", "count")]
    pair = sum((vectors[i] * vectors[j]).sum(axis=1) for i in range(3) for j in range(i + 1, 3))
    terms = model.linear
    linear = value(terms.tables[0].embeddings)[x["c"], 0] + \
        np.stack([x["price"], x["count"]], axis=1) @ value(terms.dense_layer.kernel)[:, 0] + value(terms.bias)[0]
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-(linear + pair))), atol=2e-5)


def test_dlrm_without_raw_dense_features_has_no_bottom_mlp(ctr):
    _, schema, x, _ = ctr
    assert DLRM(schema, embedding_dim=D, bottom_units=(5,), top_units=(5,)).bottom is not None
    model = DLRM(schema, embedding_dim=D, bottom_units=(5,), top_units=(5,), numeric_embeddings="autodis")
    assert model.bottom is None
    assert model(x).shape == (len(x["c"]),)


def test_training_learns_the_numeric_signal(ctr):
    """The label depends on price only: a DeepFM whose price enters through AutoDis learns it (train AUC well
    above chance), and the AutoDis weights move."""
    _, schema, x, y = ctr
    tf.keras.utils.set_random_seed(0)
    model = DeepFM(schema, embedding_dim=D, dnn_units=(8,), numeric_embeddings="autodis")
    compile_model(model, optimizer="adam", learning_rate=0.02)
    model(x)
    before = [w.copy() for w in model.numeric_layers["price"].get_weights()]
    model.fit(x, y, batch_size=32, epochs=8, verbose=0)
    after = model.numeric_layers["price"].get_weights()
    assert all(np.abs(a - b).max() > 1e-3 for a, b in zip(after, before))
    auc = tf.keras.metrics.AUC()
    auc.update_state(y, model.predict(x, verbose=0))
    assert float(auc.result()) > 0.75


def test_bad_numeric_embeddings_are_clear_errors(ctr):
    _, schema, _, _ = ctr
    with pytest.raises(ValueError, match="names 'cost', which is not a numeric .* those are \\['price', 'count'\\]"):
        DeepFM(schema, embedding_dim=D, numeric_embeddings={"cost": "autodis"})
    with pytest.raises(ValueError, match="unknown numeric embedding 'auto'"):
        DeepFM(schema, embedding_dim=D, numeric_embeddings="auto")
    with pytest.raises(ValueError, match="has output_dim=3; this model needs embedding_dim=4"):
        DeepFM(schema, embedding_dim=D, numeric_embeddings=numeric_factory("field", output_dim=3))
    one = AutoDisEmbedding(D)
    with pytest.raises(ValueError, match="one AutoDisEmbedding object was given for 2 numeric features"):
        DeepFM(schema, embedding_dim=D, numeric_embeddings=one)
    with pytest.raises(ValueError, match="the same AutoDisEmbedding object .* for features 'price' and 'count'"):
        DeepFM(schema, embedding_dim=D, numeric_embeddings={"price": one, "count": one})
    with pytest.raises(TypeError, match="must be a tfemb NumericEmbedding. Received: Dense"):
        DeepFM(schema, embedding_dim=D, numeric_embeddings=lambda name: tf.keras.layers.Dense(D))
    with pytest.raises(ValueError, match="LogisticRegression uses no embeddings"):
        LogisticRegression(schema, numeric_embeddings="autodis")
    cf_df = pd.DataFrame({"user_id": [1, 2, 3, 1], "item_id": [5, 6, 5, 7], "click": [0, 1, 1, 0]})
    cf = Schema([CategoricalFeature("user_id"), CategoricalFeature("item_id")], Label("click")).fit(cf_df)
    with pytest.raises(ValueError, match="CFNetwork reads no numeric \\(dense\\) feature"):
        CFNetwork(cf, embedding_dim=D, numeric_embeddings="field")


# ---------------------------------------------------------------------------------------- export, recipes
@pytest.mark.parametrize("aggregation", ["weighted_average", "top_k_sum"])
def test_export_parity_and_stock_ops(aggregation, ctr, tmp_path):
    df, schema, x, _ = ctr
    model = DeepFM(schema, embedding_dim=D, dnn_units=(5,),
                   numeric_embeddings={"price": numeric_factory("autodis", output_dim=D, num_buckets=7,
                                                                temperature=0.5, aggregation=aggregation),
                                       "count": "field"})
    model(x)
    rng = np.random.default_rng(3)
    for w in model.weights:
        w.assign(rng.normal(0, 0.4, tuple(w.shape)).astype(np.float32))
    path = export_saved_model(model, tmp_path / "autodis")
    loaded = load_export(path)
    rows = pd.concat([df.head(20), pd.DataFrame({"c": ["zzz"], "price": [123.0], "count": [0.0], "click": [0]})],
                     ignore_index=True)
    expected = model(schema.transform(rows)[0], training=False).numpy()
    got = loaded.predict(rows)["probability"]
    assert np.max(np.abs(got - expected)) <= 1e-5
    assert not unsupported_ops(path)
    assert {"Softmax", "LeakyRelu"} <= set(check_ops(path))
    # The report lists the numeric embeddings (inside "other": float32 weights as trained).
    numeric = loaded.report["numeric"]
    assert [(r["feature"], r["layer"]) for r in numeric] == [("price", "AutoDisEmbedding"), ("count", "FieldEmbedding")]
    assert numeric[0]["parameters"] == model.numeric_layers["price"].parameter_count() == 7 + 49 + 7 * D + 14
    assert sum(r["bytes"] for r in numeric) <= loaded.report["other"]["bytes"]
    assert "of which numeric-feature embeddings (AutoDisEmbedding, FieldEmbedding): 2 features" in \
        console_report(loaded.report)


def test_recipe_numeric_embedding_section():
    cfg = experiment.merge(experiment.DEFAULTS, {
        "data": {"source": "synthetic_ctr", "params": {"num_rows": 600, "num_numeric": 2}},
        "model": {"name": "deepfm", "embedding_dim": D, "params": {"dnn_units": [4]}},
        "numeric_embedding": {"scheme": "autodis", "params": {"num_buckets": 5}},
        "train": {"epochs": 1, "batch_size": 128, "verbose": 0},
    })
    experiment.check_config(cfg)
    prepared = experiment.prepare_data(cfg["data"])
    if not prepared.schema.dense_features:
        pytest.skip("the synthetic CTR generator made no numeric feature")
    model = experiment.build_model(prepared.schema, cfg["model"], cfg["embedding"], cfg["train"],
                                   cfg["numeric_embedding"])
    assert model.numeric_names and all(l.num_buckets == 5 for l in model.numeric_layers.values())
    bad = experiment.merge(cfg, {"numeric_embedding": {"scheme": "autodis", "params": {"buckets": 5}}})
    with pytest.raises(DataError, match="numeric embedding 'autodis' .*buckets"):
        experiment.build_model(prepared.schema, bad["model"], bad["embedding"], bad["train"],
                               bad["numeric_embedding"])
    with pytest.raises(DataError, match="unknown key\\(s\\) numeric_embedding.kind"):
        experiment.check_config(experiment.merge(cfg, {"numeric_embedding": {"kind": "autodis"}}))


def test_compare_spec_checks_numeric_embedding_and_refuses_per_variant_data():
    base = {"data": {"source": "synthetic_ctr", "params": {"num_rows": 500}}}
    with pytest.raises(DataError, match="variant 'v': numeric_embedding.scheme must be one of .* Received: "
                                        "scheme='autodiss'"):
        compare.check_spec({"base": base, "variants": [{"name": "v", "numeric_embedding": {"scheme": "autodiss"}}]})
    with pytest.raises(DataError, match="variant 'w': every variant trains on the base's data"):
        compare.check_spec({"base": base, "variants": [
            {"name": "w", "data": {"source": "synthetic_ctr", "params": {"num_rows": 900}}}]})
    # A data section equal to the base's is harmless.
    compare.check_spec({"base": base, "variants": [{"name": "same", "data": base["data"]}]})


def test_criteo_schema_discretizers():
    for kind in ("log", "equal_width", "equal_frequency"):
        schema = criteo_schema(numeric="discretize", discretizer=kind, num_buckets=5)
        assert {f.discretize for f in schema.features if isinstance(f, NumericFeature)} == {kind}
    with pytest.raises(DataError, match="discretize must be one of .* Received: discretize='quantile'"):
        criteo_schema(numeric="discretize", discretizer="quantile")
