"""Tests of tfemb.models: every network builds, trains, saves and reloads; NumPy references for the interactions.

Sizes are tiny and all different (vocabularies 14/20 for CF; 8/12/6 for CTR, 2 dense features, dims 5/6) so
swapped axes show. Runs under Keras 3 and, with TF_USE_LEGACY_KERAS=1, Keras 2.
"""

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tfemb._keras import keras
from tfemb.data.pipeline import make_dataset
from tfemb.data.schema import CategoricalFeature, Label, MultiHotFeature, NumericFeature, Schema
from tfemb.layers.fixed_embedding import FixedEmbedding
from tfemb.layers.hashing_embedding import HashingEmbedding
from tfemb.models import (
    CF_MODELS, DLRM, IPNN, MODELS, CFNetwork, CrossNetwork, DCNv2, DeepFM, FactorizationMachine, LogisticRegression,
    MatrixFactorization, RecModel, WideAndDeep, get_model_class,
)
from tfemb.models import blocks
from tfemb.tasks import compile_model

ATOL = 1e-5


# ------------------------------------------------------------------------------------------------- fixtures
def _frame(n=240, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "user_id": rng.integers(0, 13, n),
        "item_id": rng.integers(100, 119, n),
        "genre": rng.choice(["a", "b", "c"], n),
        "c1": rng.integers(0, 7, n).astype(str),
        "c2": rng.integers(0, 11, n),
        "tags": ["|".join(map(str, rng.choice(5, rng.integers(0, 4), replace=False))) for _ in range(n)],
        "n1": rng.normal(size=n),
        "n2": rng.exponential(size=n),
        "click": rng.integers(0, 2, n),
        "rating": rng.integers(1, 6, n),
    })


LABELS = {
    "binary": lambda: Label("click"),
    "multiclass": lambda: Label("rating", kind="multiclass", num_classes=5, ratings=True),
    "regression": lambda: Label("rating", kind="regression"),
}


def cf_schema(df, task="binary", side=False):
    feats = [CategoricalFeature("user_id"), CategoricalFeature("item_id")]
    if side:
        feats += [CategoricalFeature("genre"), NumericFeature("n1")]
    return Schema(feats, LABELS[task]()).fit(df)


def ctr_schema(df, task="binary"):
    feats = [CategoricalFeature("c1"), CategoricalFeature("c2"), MultiHotFeature("tags", max_length=3),
             NumericFeature("n1"), NumericFeature("n2", transform="log")]
    return Schema(feats, LABELS[task]()).fit(df)


@pytest.fixture(scope="module")
def df():
    return _frame()


#: Small hyper-parameters per model (the defaults are paper/DeepCTR sized).
SMALL = {
    "cf": dict(hidden_units=(7,)),
    "neumf": dict(mlp_units=(7, 3)),
    "deepfm": dict(dnn_units=(7,)),
    "wide_deep": dict(dnn_units=(7,)),
    "dcn_v2": dict(dnn_units=(7,), cross_layers=2),
    "dlrm": dict(bottom_units=(7,), top_units=(9,)),
    "ipnn": dict(dnn_units=(7,)),
}


def make_model(name, df, task="binary", embedding_dim=5, **kwargs):
    schema = cf_schema(df, task) if name in CF_MODELS else ctr_schema(df, task)
    model = get_model_class(name)(schema, embedding_dim=embedding_dim, **{**SMALL.get(name, {}), **kwargs})
    x, y = schema.transform(df)
    return model, x, y


def without_build_configs(config):
    """A config without the ``build_config`` entries Keras 2 adds to sublayers built by a call (a layer rebuilt
    by ``build_from_config`` does not record its input shape again)."""
    if isinstance(config, dict):
        return {k: without_build_configs(v) for k, v in config.items() if k != "build_config"}
    return config


def predict(model, x):
    return np.asarray(model({k: tf.constant(v) for k, v in x.items()}))


# ------------------------------------------------------------------------------------------- every model
CASES = [(name, "binary") for name in MODELS] + [
    ("cf", "multiclass"), ("neumf", "multiclass"), ("mf", "regression"), ("dcn_v2", "multiclass"),
]


@pytest.mark.parametrize("name,task", CASES, ids=[f"{n}-{t}" for n, t in CASES])
def test_model_builds_trains_saves_and_reloads(name, task, df, tmp_path):
    model, x, y = make_model(name, df, task)
    model.build()
    out = predict(model, x)
    if task == "multiclass":
        assert out.shape == (len(df), 5)
        np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)
        assert (out >= 0).all()
    else:
        assert out.shape == (len(df),)
    if task == "binary":
        assert ((out >= 0) & (out <= 1)).all()
    assert np.isfinite(out).all()

    # get_config / from_config round trip: same config, same outputs with the same weights.
    clone = type(model).from_config(model.get_config())
    clone.build()
    clone.set_weights(model.get_weights())
    assert without_build_configs(clone.get_config()) == without_build_configs(model.get_config())
    np.testing.assert_allclose(predict(clone, x), out, atol=ATOL)

    compile_model(model, learning_rate=0.01)
    history = model.fit(make_dataset(x, y, batch_size=80), epochs=1, verbose=0, shuffle=False)
    assert np.isfinite(history.history["loss"]).all()

    path = str(tmp_path / f"{name}.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    assert type(reloaded) is type(model)
    np.testing.assert_allclose(predict(reloaded, x), predict(model, x), atol=ATOL)
    # Reloaded compiled, with the optimizer's state: it evaluates as the original and resumes training.
    assert int(reloaded.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy()) > 0
    data = make_dataset(x, y, batch_size=80)
    want = model.evaluate(data, verbose=0, return_dict=True)
    got = reloaded.evaluate(data, verbose=0, return_dict=True)
    assert set(got) == set(want)
    np.testing.assert_allclose([got[k] for k in sorted(want)], [want[k] for k in sorted(want)], atol=1e-5)
    assert np.isfinite(reloaded.fit(data, epochs=1, verbose=0).history["loss"]).all()


def test_models_registry():
    assert set(MODELS) == {"cf", "mf", "neumf", "lr", "fm", "deepfm", "wide_deep", "dcn_v2", "dlrm", "ipnn"}
    for name, cls in MODELS.items():
        assert get_model_class(name) is cls and issubclass(cls, RecModel)
        assert keras.utils.get_registered_name(cls) == f"tfemb>{cls.__name__}"
    with pytest.raises(ValueError, match="unknown model name 'deep_fm'.*deepfm"):
        get_model_class("deep_fm")


# ------------------------------------------------------------------------------------- NumPy references
def np_lookup(table, ids, combiner=None):
    """Reference of EmbeddingScheme.call: a row per id, or the pooled rows of a -1-padded list."""
    if ids.ndim == 1:
        return table[ids]
    mask = ids >= 0
    total = (table[np.where(mask, ids, 0)] * mask[..., None]).sum(axis=1)
    count = mask.sum(axis=1, keepdims=True).astype(np.float64)
    if combiner == "sum":
        return total
    if combiner == "sqrtn":
        count = np.sqrt(count)
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0)


def np_mlp(mlp, x):
    for dense in mlp.dense_layers:
        x = np.maximum(x @ dense.kernel.numpy() + dense.bias.numpy(), 0.0)
    return x


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def randomise(variables, seed):
    """Assigns seeded NumPy values (zeros-initialised biases and linear tables would hide mistakes); a
    FixedEmbedding stands for its table."""
    rng = np.random.default_rng(seed)
    for var in variables:
        var = getattr(var, "embeddings", var)
        var.assign(rng.normal(scale=0.5, size=tuple(var.shape)).astype(np.float32))


def np_linear(model, terms, x, dense):
    """Reference of LinearTerms: bias + sum of looked-up first-order weights + dense @ w."""
    out = terms.bias.numpy() + sum(
        np_lookup(table.embeddings.numpy(), x[name], model.schema.combiner(name))
        for name, table in zip(terms.feature_names, terms.tables)
    )
    if terms.dense_layer is not None:
        out = out + dense @ terms.dense_layer.kernel.numpy()
    return out  # [batch, units]


def ctr_arrays(model, x):
    emb = {n: np_lookup(model.embedding_layers[n].embeddings.numpy(), x[n], model.schema.combiner(n))
           for n in model.embedding_names}
    dense = np.stack([x[n] for n in model.dense_names], axis=1).astype(np.float64)
    return emb, dense


def brute_force_pairs(vectors):
    """``[<v_i, v_j> for i < j]`` by loops, in row-major upper-triangle order."""
    return np.stack([(vectors[i] * vectors[j]).sum(-1) for i in range(len(vectors))
                     for j in range(i + 1, len(vectors))], axis=1)


def test_fm_second_order_and_pairwise_products_match_loops():
    rng = np.random.default_rng(1)
    stacked = rng.normal(size=(3, 4, 5)).astype(np.float32)  # [batch, fields, dim]
    pairs = brute_force_pairs([stacked[:, f] for f in range(4)])
    np.testing.assert_allclose(blocks.pairwise_inner_products(tf.constant(stacked)).numpy(), pairs, atol=ATOL)
    np.testing.assert_allclose(blocks.fm_second_order(tf.constant(stacked)).numpy()[:, 0], pairs.sum(1), atol=ATOL)
    with_self = blocks.pairwise_inner_products(tf.constant(stacked), self_interaction=True).numpy()
    assert with_self.shape == (3, 10)
    np.testing.assert_allclose(with_self[:, 0], (stacked[:, 0] ** 2).sum(-1), atol=ATOL)


def test_fm_model_matches_numpy(df):
    model, x, _ = make_model("fm", df)
    model.build()
    randomise([model.linear.bias] + model.linear_tables() + [model.linear.dense_layer.kernel], seed=2)
    emb, dense = ctr_arrays(model, x)
    fm = brute_force_pairs([emb[n] for n in model.embedding_names]).sum(1)
    expected = sigmoid(np_linear(model, model.linear, x, dense)[:, 0] + fm)
    np.testing.assert_allclose(predict(model, x), expected, atol=ATOL)


def test_cross_network_matches_numpy():
    rng = np.random.default_rng(3)
    x0 = rng.normal(size=(4, 6)).astype(np.float32)
    for low_rank in (None, 2):
        layer = CrossNetwork(num_layers=2, low_rank=low_rank)
        layer(tf.constant(x0))
        randomise(layer.kernels + layer.projections + layer.biases, seed=4)
        x = x0.astype(np.float64)
        for i in range(2):
            w = layer.kernels[i].numpy()
            if low_rank is not None:
                w = layer.projections[i].numpy() @ w  # [d, r] x [r, d]
            x = x0 * (x @ w + layer.biases[i].numpy()) + x
        np.testing.assert_allclose(layer(tf.constant(x0)).numpy(), x, atol=ATOL)
        assert layer.kernels[0].shape == ((6, 6) if low_rank is None else (2, 6))
        clone = CrossNetwork.from_config(layer.get_config())
        assert clone.get_config() == layer.get_config()


def test_mlp_and_cross_layers_start_from_different_kernels():
    # One unseeded initializer instance returns the same values at every call of a shape (Keras 2 warns, Keras 3
    # does not): layers that share it started with equal kernels.
    mlp = blocks.MLP((6, 6, 6))
    mlp(tf.zeros((2, 6)))
    cross = CrossNetwork(num_layers=3)
    cross(tf.zeros((2, 6)))
    for kernels in ([d.kernel.numpy() for d in mlp.dense_layers], [k.numpy() for k in cross.kernels]):
        for i in range(1, len(kernels)):
            assert not np.array_equal(kernels[0], kernels[i])
    # A seeded initializer: layer i draws with seed + i, so the layers differ and a second MLP repeats the first.
    seeded, again = (blocks.MLP((6, 6), kernel_initializer=keras.initializers.GlorotUniform(seed=1))
                     for _ in range(2))
    seeded(tf.zeros((2, 6)))
    again(tf.zeros((2, 6)))
    assert not np.array_equal(seeded.dense_layers[0].kernel.numpy(), seeded.dense_layers[1].kernel.numpy())
    for a, b in zip(seeded.dense_layers, again.dense_layers):
        np.testing.assert_array_equal(a.kernel.numpy(), b.kernel.numpy())


def test_dlrm_dot_interaction_matches_numpy(df):
    model, x, _ = make_model("dlrm", df)
    model.build()
    emb, dense = ctr_arrays(model, x)
    bottom = np_mlp(model.bottom, dense)  # [batch, embedding_dim]
    assert bottom.shape == (len(df), 5)
    vectors = [bottom] + [emb[n] for n in model.embedding_names]
    top_in = np.concatenate([bottom, brute_force_pairs(vectors)], axis=1)  # 5 + 4*3/2 pairs
    assert top_in.shape == (len(df), 5 + 6)
    out = np_mlp(model.top, top_in) @ model.output_layer.kernel.numpy() + model.output_layer.bias.numpy()
    np.testing.assert_allclose(predict(model, x), sigmoid(out[:, 0]), atol=ATOL)


def test_dlrm_without_dense_features(df):
    schema = Schema([CategoricalFeature("c1"), CategoricalFeature("c2")], Label("click")).fit(df)
    model = DLRM(schema, embedding_dim=3, bottom_units=(4,), top_units=(5,))
    x, _ = schema.transform(df)
    model.build()
    assert model.bottom is None
    emb = [model.embedding_layers[n].embeddings.numpy()[x[n]] for n in ("c1", "c2")]
    top_in = np.concatenate(emb + [brute_force_pairs(emb)], axis=1)
    out = np_mlp(model.top, top_in) @ model.output_layer.kernel.numpy() + model.output_layer.bias.numpy()
    np.testing.assert_allclose(predict(model, x), sigmoid(out[:, 0]), atol=ATOL)


def test_ipnn_inner_products_match_numpy(df):
    model, x, _ = make_model("ipnn", df)
    model.build()
    emb, dense = ctr_arrays(model, x)
    vectors = [emb[n] for n in model.embedding_names]
    dnn_in = np.concatenate(vectors + [brute_force_pairs(vectors), dense], axis=1)
    assert dnn_in.shape == (len(df), 3 * 5 + 3 + 2)
    out = np_mlp(model.dnn, dnn_in) @ model.output_layer.kernel.numpy() + model.output_layer.bias.numpy()
    np.testing.assert_allclose(predict(model, x), sigmoid(out[:, 0]), atol=ATOL)


def test_matrix_factorization_matches_numpy(df):
    model, x, _ = make_model("mf", df, task="regression", embedding_dim=6)
    model.build()
    randomise([model.biases.bias] + model.bias_layers(), seed=5)
    user = model.embedding_layers["user_id"].embeddings.numpy()[x["user_id"]]
    item = model.embedding_layers["item_id"].embeddings.numpy()[x["item_id"]]
    user_bias, item_bias = (t.embeddings.numpy() for t in model.bias_layers())
    expected = ((user * item).sum(1) + user_bias[x["user_id"], 0] + item_bias[x["item_id"], 0]
                + model.biases.bias.numpy()[0])
    np.testing.assert_allclose(predict(model, x), expected, atol=ATOL)
    # The bias tables are updated as sparse tables but are not part of the embedding scheme.
    assert [layer.name for layer in model.bias_layers()] == ["user_id_bias", "item_id_bias"]
    assert model.bias_layers()[0].output_dim == 1
    assert {id(v) for v in model.sparse_variables()} >= {id(t.embeddings) for t in model.bias_layers()}
    assert [row["feature"] for row in model.embedding_report()] == ["user_id", "item_id"]
    assert model.embedding_parameter_count() == (14 + 20) * 6


def test_deepfm_and_wide_deep_sum_their_parts(df):
    for name in ("deepfm", "wide_deep"):
        model, x, _ = make_model(name, df)
        model.build()
        terms = model.linear if name == "deepfm" else model.wide
        randomise([terms.bias] + list(terms.tables) + [terms.dense_layer.kernel], seed=6)
        emb, dense = ctr_arrays(model, x)
        vectors = [emb[n] for n in model.embedding_names]
        deep = np_mlp(model.dnn, np.concatenate(vectors + [dense], axis=1)) @ model.dnn_output.kernel.numpy()
        logit = np_linear(model, terms, x, dense)[:, 0] + deep[:, 0]
        if name == "deepfm":
            logit = logit + brute_force_pairs(vectors).sum(1)
        np.testing.assert_allclose(predict(model, x), sigmoid(logit), atol=ATOL)


# -------------------------------------------------------------------------------- model-specific structure
def test_logistic_regression_has_no_embedding_scheme(df):
    model, x, _ = make_model("lr", df, embeddings=lambda name, size, freq: FixedEmbedding(size, 5))
    model.build()
    assert model.embedding_layers == {} and model.embedding_report() == []
    assert [t.name for t in model.linear_tables()] == ["c1_linear", "c2_linear", "tags_linear"]
    assert len(model.sparse_variables()) == 3
    randomise([model.linear.bias] + model.linear_tables() + [model.linear.dense_layer.kernel], seed=7)
    dense = np.stack([x[n] for n in model.dense_names], axis=1)
    expected = sigmoid(np_linear(model, model.linear, x, dense)[:, 0])
    np.testing.assert_allclose(predict(model, x), expected, atol=ATOL)


def test_cf_network_side_features(df):
    schema = cf_schema(df, side=True)
    plain = CFNetwork(schema, embedding_dim=4, hidden_units=(3,))
    assert plain.embedding_names == ["user_id", "item_id"] and plain.dense_names == []
    x, _ = schema.transform(df)
    only_ids = {"user_id": x["user_id"], "item_id": x["item_id"]}
    assert predict(plain, only_ids).shape == (len(df),)  # side inputs are not needed
    side = CFNetwork(schema, embedding_dim=4, hidden_units=(3,), side_features=True)
    assert side.embedding_names == ["user_id", "item_id", "genre"] and side.dense_names == ["n1"]
    side.build()
    assert side.mlp.dense_layers[0].kernel.shape == (3 * 4 + 1, 3)
    # Default sizes follow the authors' code: BN -> 512 tanh (BN) -> output.
    default = CFNetwork(schema)
    assert default.hidden_units == (512,) and default.activation == "tanh" and default.batch_norm


def test_dcn_v2_structures_and_low_rank(df):
    schema = ctr_schema(df)
    x, _ = schema.transform(df)
    for structure in ("stacked", "parallel"):
        model = DCNv2(schema, embedding_dim=5, dnn_units=(4,), low_rank=3, structure=structure)
        model.build()
        d = 3 * 5 + 2
        assert model.cross.projections[0].shape == (d, 3)
        assert model.output_layer.kernel.shape == ((4 if structure == "stacked" else d + 4), 1)
        assert predict(model, x).shape == (len(df),)


# ------------------------------------------------------------------------------------ row-sparse training
def _learnable(n=1200, seed=0):
    rng = np.random.default_rng(seed)
    df = _frame(n, seed)
    c1_effect = {str(i): w for i, w in enumerate(rng.normal(scale=2.0, size=7))}
    c2_effect = rng.normal(scale=2.0, size=11)
    score = df["c1"].map(c1_effect).to_numpy() + c2_effect[df["c2"].to_numpy()] + df["n1"].to_numpy()
    df["click"] = (rng.random(n) < sigmoid(score)).astype(int)
    return df


def test_deepfm_trains_with_sparse_adam():
    df = _learnable()
    schema = ctr_schema(df)
    x, y = schema.transform(df)
    model = DeepFM(schema, embedding_dim=4, dnn_units=(8,), embedding_optimizer="adam")
    compile_model(model, learning_rate=0.02)
    history = model.fit(make_dataset(x, y, batch_size=100, shuffle=True), epochs=3, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.05, losses
    assert model.embedding_optimizer.iterations.numpy() == 36


def test_sparse_optimizer_changes_only_looked_up_rows(df):
    schema = ctr_schema(df)
    x, y = schema.transform(df)
    model = DeepFM(schema, embedding_dim=4, dnn_units=(8,), embedding_optimizer="adam")
    compile_model(model, learning_rate=0.05)
    model.build()
    randomise(model.linear_tables(), seed=8)
    tables = {f"{n}_embedding": (n, model.embedding_layers[n].embeddings) for n in model.embedding_names}
    tables.update({t.name: (n, t.embeddings) for n, t in zip(model.linear.feature_names, model.linear.tables)})
    assert {id(v) for _, v in tables.values()} == {id(v) for v in model.sparse_variables()}
    before = {k: v.numpy().copy() for k, (_, v) in tables.items()}
    batch = {k: v[:6] for k, v in x.items()}
    model.fit(make_dataset(batch, y[:6], batch_size=6), epochs=1, verbose=0, shuffle=False)
    for key, (feature, var) in tables.items():
        ids = np.unique(batch[feature])
        looked_up = set(ids[ids >= 0].tolist()) | ({0} if (batch[feature] < 0).any() else set())
        untouched = [i for i in range(var.shape[0]) if i not in looked_up]
        assert untouched, key  # the batch must leave rows out for the test to mean anything
        after = var.numpy()
        np.testing.assert_array_equal(after[untouched], before[key][untouched], err_msg=key)
        changed = [i for i in looked_up if i > 0 and not np.array_equal(after[i], before[key][i])]
        assert changed, key


# ------------------------------------------------------------------------------------------ scheme specs
def test_any_scheme_factory_and_per_feature_dict(df, tmp_path):
    schema = ctr_schema(df)
    x, _ = schema.transform(df)
    factory = lambda name, size, freq: FixedEmbedding(size, 5, name=f"{name}_fixed")  # noqa: E731
    model = IPNN(schema, embeddings=factory, embedding_dim=5, dnn_units=(4,))
    assert [model.embedding_layers[n].name for n in model.embedding_names] == ["c1_fixed", "c2_fixed", "tags_fixed"]
    assert model.embedding_layers["tags"].combiner == "mean"  # the schema's combiner is handed to the scheme
    assert predict(model, x).shape == (len(df),)

    hashed = HashingEmbedding(schema.vocabulary_size("c2"), 5, num_buckets=4, name="c2_hashed")
    model = WideAndDeep(schema, embeddings={"c2": hashed}, embedding_dim=5, dnn_units=(4,))
    assert model.embedding_layers["c2"] is hashed
    assert isinstance(model.embedding_layers["c1"], FixedEmbedding)
    out = predict(model, x)
    clone = WideAndDeep.from_config(model.get_config())
    clone.build()
    clone.set_weights(model.get_weights())
    assert isinstance(clone.embedding_layers["c2"], HashingEmbedding)
    np.testing.assert_allclose(predict(clone, x), out, atol=ATOL)
    report = {row["feature"]: row for row in model.embedding_report()}
    assert report["c2"]["parameters"] == 4 * 5 and report["c1"]["parameters"] == 8 * 5


# -------------------------------------------------------------------------------------------- bad input
def test_clear_errors(df):
    unfitted = Schema([CategoricalFeature("c1")], Label("click"))
    with pytest.raises(ValueError, match="schema must be fitted"):
        DeepFM(unfitted)
    schema = ctr_schema(df)
    with pytest.raises(ValueError, match="has vocabulary_size=9 but the schema has 8 ids"):
        FactorizationMachine(schema, embeddings={"c1": FixedEmbedding(9, 5)}, embedding_dim=5)
    with pytest.raises(ValueError, match="output_dim=4; this model needs embedding_dim=5"):
        DeepFM(schema, embeddings=lambda name, size, freq: FixedEmbedding(size, 4), embedding_dim=5)
    size = schema.vocabulary_size("c1")
    shared = FixedEmbedding(size, 5, name="shared")  # one object for two features: refused, not counted twice
    two = Schema([CategoricalFeature("c1"), CategoricalFeature("c1_again", column="c1")],
                 Label("click")).fit(df)
    with pytest.raises(ValueError, match="the same FixedEmbedding object \\('shared'\\) was given for features 'c1' "
                                         "and 'c1_again': each feature needs its own embedding layer"):
        FactorizationMachine(two, embeddings={"c1": shared, "c1_again": shared}, embedding_dim=5)
    model = WideAndDeep(schema, embedding_dim=5, dnn_units=(3,))
    x, _ = schema.transform(df)
    with pytest.raises(KeyError, match="missing input feature 'n2'"):
        model({k: v for k, v in x.items() if k != "n2"})
    with pytest.raises(ValueError, match="unknown model name 'xgboost'"):
        get_model_class("xgboost")
    cf = cf_schema(df)
    with pytest.raises(ValueError, match="user_feature='user' is not a sparse"):
        CFNetwork(cf, user_feature="user")
    with pytest.raises(ValueError, match="supports the 'binary' and 'regression' tasks"):
        MatrixFactorization(cf_schema(df, task="multiclass"))
    with pytest.raises(ValueError, match=r"dnn_units must be a tuple of positive ints. Received: dnn_units=\(8, 0\)"):
        DeepFM(schema, dnn_units=(8, 0))
    with pytest.raises(ValueError, match="structure must be one of"):
        DCNv2(schema, structure="sideways")
    with pytest.raises(ValueError, match="dropout must be a float in"):
        CFNetwork(cf, dropout=1.5)
    with pytest.raises(ValueError, match="l2_linear must be a float >= 0"):
        LogisticRegression(schema, l2_linear=-1.0)


# ------------------------------------------------------------------------------------------ fit on datasets
def test_fit_on_a_dataset_does_not_warn_that_shuffle_is_ignored(df):
    """Keras 3 warns "`shuffle=True` was passed, but will be ignored" on a plain fit(dataset) (fit's default),
    which reads as if make_dataset(shuffle=True) were undone; RecModel.fit passes shuffle=False for datasets."""
    import warnings

    model, x, y = make_model("deepfm", df)
    compile_model(model, learning_rate=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(make_dataset(x, y, batch_size=80, shuffle=True, seed=0), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert not [w for w in caught if "shuffle" in str(w.message)], [str(w.message) for w in caught]


def test_dataset_fit_kwargs_only_fills_in_shuffle_for_datasets():
    from tfemb._keras import dataset_fit_kwargs

    ds = tf.data.Dataset.from_tensor_slices(np.arange(4))
    assert dataset_fit_kwargs(ds, {"epochs": 2}) == {"epochs": 2, "shuffle": False}
    assert dataset_fit_kwargs(ds, {"shuffle": True}) == {"shuffle": True}  # an explicit choice passes through
    assert dataset_fit_kwargs(np.arange(4), {"epochs": 2}) == {"epochs": 2}  # arrays: fit's default stays


@pytest.mark.parametrize("name,task", [("fm", "binary"), ("mf", "regression")])
def test_sample_weights_weight_the_loss_under_both_kerases(name, task, df):
    """Keras 2 averaged [batch] outputs over their last axis before weighting, and fit on (x, y, w) failed
    ("Can not squeeze dim[0]"); weights now apply per example, as in Keras 3."""
    model, x, y = make_model(name, df, task)
    model.build()
    compile_model(model, learning_rate=0.01)
    pred = tf.constant(model.predict(x, verbose=0))
    y_t = tf.constant(y)
    plain = float(model.compute_loss(x=x, y=y_t, y_pred=pred))
    doubled = float(model.compute_loss(x=x, y=y_t, y_pred=pred, sample_weight=tf.fill([len(y)], 2.0)))
    np.testing.assert_allclose(doubled, 2 * plain, rtol=1e-5)
    weights = np.where(np.arange(len(y)) % 2 == 0, 1.0, 0.0).astype(np.float32)
    data = tf.data.Dataset.from_tensor_slices((x, y, weights)).batch(80)
    assert np.isfinite(model.fit(data, epochs=1, verbose=0).history["loss"]).all()
