"""Saving and reloading tfemb models and layers the ways Keras users do, for every embedding scheme.

For each scheme that ``scheme_factory`` / the recipes offer, inside a representative model (DeepFM for CTR, the CF
network and MF for CF): ``model.save("x.keras")`` + ``keras.models.load_model`` (no custom_objects), the weights file
(``.weights.h5`` under Keras 3, the TF checkpoint format under Keras 2) into a freshly built model of the same config,
``tf.train.Checkpoint``, and the layer's ``get_config`` -> ``from_config`` -> ``set_weights`` round trip; then what a
user can get wrong (another vocabulary, a truncated file). Runs under Keras 3 and, with TF_USE_LEGACY_KERAS=1,
Keras 2. Sizes are tiny (vocabularies of 6-20 ids, 4-dim embeddings).
"""

import os

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tfemb._keras import IS_KERAS_3, keras
from tfemb.data.pipeline import make_dataset
from tfemb.data.schema import CategoricalFeature, Label, MultiHotFeature, NumericFeature, Schema
from tfemb.layers import EmbeddingScheme, numeric_factory, scheme_factory
from tfemb.layers.mixed_dimension_embedding import md_field_factory
from tfemb.models import CFNetwork, DeepFM, MatrixFactorization
from tfemb.pep import retrain
from tfemb.tasks import compile_model

D = 4
ATOL = 1e-6


# ------------------------------------------------------------------------------------------------- fixtures
def _frame(n=96, seed=0, users=13, items=19):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "user_id": rng.zipf(1.6, n) % users,
        "item_id": 100 + rng.zipf(1.4, n) % items,
        "c1": (rng.zipf(1.5, n) % 9).astype(str),
        "c2": rng.integers(0, 6, n),
        "tags": ["|".join(map(str, rng.choice(5, rng.integers(0, 4), replace=False))) for _ in range(n)],
        "n1": rng.normal(size=n),
        "click": rng.integers(0, 2, n),
    })


def ctr_schema(df):
    return Schema([CategoricalFeature("c1"), CategoricalFeature("c2"), MultiHotFeature("tags", max_length=3),
                   NumericFeature("n1")], Label("click")).fit(df)


def cf_schema(df):
    return Schema([CategoricalFeature("user_id"), CategoricalFeature("item_id")], Label("click")).fit(df)


def _deepfm(embeddings, **kwargs):
    def make(schema):
        return DeepFM(schema, embeddings=embeddings(schema), embedding_dim=D, dnn_units=(5,), **kwargs)
    return "ctr", make


def _cf(embeddings, dim=D, cls=CFNetwork, **kwargs):
    def make(schema):
        if cls is CFNetwork:
            kwargs.setdefault("hidden_units", (5,))
        return cls(schema, embeddings=embeddings(schema), embedding_dim=dim, **kwargs)
    return "cf", make


#: case -> (data kind, schema -> unbuilt model). Non-default constructor arguments everywhere, so a config that
#: drops one shows.
CASES = {
    "fixed": _deepfm(lambda s: scheme_factory("fixed", output_dim=D, embeddings_initializer="glorot_uniform")),
    "hashing": _deepfm(lambda s: scheme_factory("hashing", output_dim=D, compression=2.0, seed=7)),
    "qr": _deepfm(lambda s: scheme_factory("qr", output_dim=D, compression=2.0, operation="concat")),
    "double_hashing": _deepfm(lambda s: scheme_factory("double_hashing", output_dim=D, compression=2.0, seed=3,
                                                       combine="concat", compact_lookup="index"),
                              embedding_optimizer="adam"),
    "md_popularity": _deepfm(lambda s: scheme_factory("md", output_dim=D, num_blocks=2, alpha=0.5, lookup="gather",
                                                      compact_premultiply=False)),
    "md_field": _deepfm(lambda s: md_field_factory(s, D, alpha=0.5), embedding_optimizer="rowwise_adagrad"),
    "pep": _deepfm(lambda s: scheme_factory("pep", output_dim=D, threshold_init=-2.0, g_scale=2.0,
                                            keep_initial=True)),
    "pep_retrain": _deepfm(lambda s: scheme_factory("pep", output_dim=D, threshold_init=-2.0, g_scale=2.0,
                                                    keep_initial=True)),
    "autoemb": _cf(lambda s: scheme_factory("autoemb", output_dim=D, candidate_dims=(2, 4), controller_units=5)),
    "autoemb_darts": _cf(lambda s: scheme_factory("autoemb", output_dim=D, candidate_dims=(2, 4), selection="darts")),
    "esapn": _cf(lambda s: scheme_factory("esapn", output_dim=5, candidate_dims=(2, 3, 5), history_length=3),
                 dim=5),
    "dhe": _deepfm(lambda s: scheme_factory("dhe", output_dim=D, num_hashes=6, num_buckets=1000, hidden_units=(5,),
                                            distribution="gaussian", seed=4)),
    # The numeric feature n1 embedded as a field (AutoDis, the field embedding) beside the categorical ones.
    "autodis": _deepfm(lambda s: scheme_factory("fixed", output_dim=D),
                       numeric_embeddings=numeric_factory("autodis", output_dim=D, num_buckets=5, temperature=0.5,
                                                          skip_factor=0.3)),
    "field_numeric": _deepfm(lambda s: None, numeric_embeddings={"n1": "field"}),
    # Low-precision tables: LPT (fixed steps, rounded back by the lazy optimizer's row constraint) and ALPT.
    "lpt": _deepfm(lambda s: scheme_factory("low_precision", output_dim=D, bits=4, step_size="fixed",
                                            initial_step_size=0.02, seed=5), embedding_optimizer="adam"),
    "alpt": _deepfm(lambda s: scheme_factory("low_precision", output_dim=D, bits=3, rounding="deterministic",
                                             step_size_learning_rate=1e-3, seed=6)),
    "fixed_cf": _cf(lambda s: None),
    "mf_qr": _cf(lambda s: scheme_factory("qr", output_dim=D, num_buckets=4, operation="add"),
                 cls=MatrixFactorization),
}


@pytest.fixture(scope="module")
def frame():
    return _frame()


def make_case(case, df, compiled=True):
    """A built model of ``case`` on ``df``, its encoded inputs and labels; PEP after its search (thresholds no
    longer at their init), ``pep_retrain`` the lottery-ticket model of a mask of that search."""
    kind, make = CASES[case]
    schema = ctr_schema(df) if kind == "ctr" else cf_schema(df)
    x, y = schema.transform(df)
    model = make(schema)
    model.build()
    if case == "pep_retrain":
        masks = {name: np.random.default_rng(i).random((layer.vocabulary_size, D)) < 0.5
                 for i, (name, layer) in enumerate(model.embedding_layers.items())}
        model = retrain(model, masks, mode="random", seed=1)
    if compiled:
        compile_model(model, optimizer="adam", learning_rate=0.05)
    return model, x, y


def inputs_of(x):
    return {k: tf.constant(v) for k, v in x.items()}


def predict(model, x):
    return np.asarray(model(inputs_of(x), training=False))


def fit_once(model, x, y):
    return model.fit(make_dataset(x, y, batch_size=48), epochs=1, verbose=0).history["loss"]


def sizes(model):
    """What the size reports say of each scheme."""
    return {name: (layer.parameter_count(), layer.storage_bytes(), np.asarray(layer.dims_per_id()).tolist())
            for name, layer in model.embedding_layers.items()}


def weights_by_name(model):
    return {w.path if IS_KERAS_3 else w.name: np.asarray(w) for w in model.weights}


def assert_same_weights(a, b):
    wa, wb = [np.asarray(w) for w in a.weights], [np.asarray(w) for w in b.weights]
    assert len(wa) == len(wb)
    for i, (u, v) in enumerate(zip(wa, wb)):
        np.testing.assert_array_equal(u, v, err_msg=f"weight {i}: {a.weights[i].name}")


def without_build_configs(config):
    """A config without the ``build_config`` entries Keras 2 records for sublayers built by a call."""
    if isinstance(config, dict):
        return {k: without_build_configs(v) for k, v in config.items() if k != "build_config"}
    return config


def fresh_copy(model):
    """A freshly built model of the same config (new weights)."""
    clone = type(model).from_config(model.get_config())
    clone.build()
    return clone


@pytest.fixture(scope="module")
def trained(frame):
    """Every case trained for one epoch (cached per case)."""
    cache = {}

    def get(case):
        if case not in cache:
            model, x, y = make_case(case, frame)
            fit_once(model, x, y)
            cache[case] = (model, x, y)
        return cache[case]
    return get


# ----------------------------------------------------------------------------------------------- .keras files
@pytest.mark.parametrize("case", list(CASES))
def test_keras_file_round_trip(case, trained, tmp_path):
    model, x, y = trained(case)
    path = str(tmp_path / f"{case}.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    assert type(reloaded) is type(model)
    np.testing.assert_allclose(predict(reloaded, x), predict(model, x), rtol=0, atol=ATOL)
    assert sizes(reloaded) == sizes(model)
    assert_same_weights(reloaded, model)
    for name, layer in model.embedding_layers.items():
        assert reloaded.embedding_layers[name].get_config() == layer.get_config(), name
    # Compiled with the optimizer's state: training resumes from the same step.
    assert int(reloaded.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy()) > 0
    if IS_KERAS_3:
        for a, b in zip(reloaded.optimizer.variables, model.optimizer.variables):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
    assert np.isfinite(fit_once(reloaded, x, y)).all()


# ------------------------------------------------------------------------------------ weights and checkpoints
def weights_path(tmp_path, name):
    """Keras 3 writes ``.weights.h5``; Keras 2's default (any other name) is the TF checkpoint format."""
    return str(tmp_path / (f"{name}.weights.h5" if IS_KERAS_3 else f"{name}_ckpt"))


@pytest.mark.parametrize("case", list(CASES))
def test_weights_file_into_a_fresh_model(case, trained, tmp_path):
    model, x, y = trained(case)
    path = weights_path(tmp_path, case)
    model.save_weights(path)
    fresh = fresh_copy(model)
    assert not np.allclose(predict(fresh, x), predict(model, x), atol=ATOL)
    fresh.load_weights(path)
    assert_same_weights(fresh, model)
    np.testing.assert_allclose(predict(fresh, x), predict(model, x), rtol=0, atol=ATOL)
    assert sizes(fresh) == sizes(model)


@pytest.mark.parametrize("case", list(CASES))
def test_tf_train_checkpoint(case, trained, tmp_path):
    model, x, y = trained(case)
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    # Into a model that is not compiled: every weight (tables, dense tower, per-id state) is in the checkpoint.
    plain = fresh_copy(model)
    tf.train.Checkpoint(model=plain).restore(path).expect_partial()
    assert_same_weights(plain, model)
    # Into a compiled one: the optimizers' state too.
    fresh = fresh_copy(model)
    compile_model(fresh, optimizer="adam", learning_rate=0.05)
    fresh.optimizer.build(fresh.dense_trainable_variables())
    status = tf.train.Checkpoint(model=fresh).restore(path)
    status.assert_existing_objects_matched()
    assert_same_weights(fresh, model)
    # The compiled optimizer's state comes back with the model (Keras tracks it as an attribute of the model).
    assert int(fresh.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy()) > 0
    if model.embedding_optimizer is not None:  # the row-sparse optimizer's slots too, restored when made
        assert not fresh.embedding_optimizer.variables
        fresh.embedding_optimizer.build(fresh.sparse_variables())
        assert len(fresh.embedding_optimizer.variables) == len(model.embedding_optimizer.variables) > 1
        for a, b in zip(fresh.embedding_optimizer.variables, model.embedding_optimizer.variables):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(predict(fresh, x), predict(model, x), rtol=0, atol=ATOL)
    assert sizes(fresh) == sizes(model)


# ------------------------------------------------------------------------------------------ model configs
@pytest.mark.parametrize("case", list(CASES))
def test_model_config_and_set_weights(case, trained):
    """``from_config(get_config())`` -> build -> ``set_weights(get_weights())`` of a trained model (under Keras 2 the
    row-sparse optimizer's slots were among a trained model's weights, so a fresh model refused them)."""
    model, x, _ = trained(case)
    clone = fresh_copy(model)
    assert without_build_configs(clone.get_config()) == without_build_configs(model.get_config())
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(predict(clone, x), predict(model, x), rtol=0, atol=ATOL)
    assert sizes(clone) == sizes(model)


# ------------------------------------------------------------------------------------------ layer configs
@pytest.mark.parametrize("case", list(CASES))
def test_layer_config_round_trip(case, trained):
    model, x, _ = trained(case)
    for name, layer in model.embedding_layers.items():
        config = layer.get_config()
        clone = type(layer).from_config(config)
        assert clone.get_config() == config, name
        ids = tf.constant(x[name])
        clone(ids)  # builds
        clone.set_weights(layer.get_weights())
        np.testing.assert_allclose(np.asarray(clone(ids)), np.asarray(layer(ids)), rtol=0, atol=ATOL, err_msg=name)
        assert (clone.parameter_count(), clone.storage_bytes()) == (layer.parameter_count(), layer.storage_bytes())
        np.testing.assert_array_equal(clone.dims_per_id(), layer.dims_per_id())
        # Through Keras' own serialisation too (what a model config holds).
        again = keras.layers.deserialize(keras.layers.serialize(layer))
        assert type(again) is type(layer) and again.get_config() == config
    for name, layer in model.numeric_layers.items():  # numeric embeddings (AutoDis, field): float inputs
        config = layer.get_config()
        clone = type(layer).from_config(config)
        assert clone.get_config() == config, name
        values = tf.constant(x[name])
        clone(values)
        clone.set_weights(layer.get_weights())
        np.testing.assert_allclose(np.asarray(clone(values)), np.asarray(layer(values)), rtol=0, atol=ATOL)
        assert (clone.parameter_count(), clone.storage_bytes()) == (layer.parameter_count(), layer.storage_bytes())
        again = keras.layers.deserialize(keras.layers.serialize(layer))
        assert type(again) is type(layer) and again.get_config() == config


# ------------------------------------------------------------------------------------------ what goes wrong
def _other_vocabulary(case):
    """A model of ``case`` fitted on other rows: some features have another vocabulary size."""
    other_df = _frame(n=12, seed=5) if CASES[case][0] == "ctr" else _frame(seed=5, users=7, items=9)
    other, _, _ = make_case(case, other_df, compiled=False)
    return other


@pytest.mark.parametrize("case", list(CASES))
def test_weights_of_another_vocabulary_fail_naming_the_layer_and_shapes(case, trained, tmp_path):
    model, _, _ = trained(case)
    other = _other_vocabulary(case)
    differ = [n for n, layer in model.embedding_layers.items()
              if other.embedding_layers[n].vocabulary_size != layer.vocabulary_size]
    assert differ
    files = [weights_path(tmp_path, case)]
    model.save_weights(files[0])
    if IS_KERAS_3:  # Keras 3 also loads the weights of a .keras file
        files.append(str(tmp_path / f"{case}.keras"))
        model.save(files[1])
    for path in files:
        with pytest.raises(ValueError) as error:
            other.load_weights(path)
        message = str(error.value)
        # The layer (not a "received 0 variables" from Keras 3's retry under the model's other path), the
        # variable's shapes and, from tfemb's own check, the vocabulary.
        assert "shape" in message and "received 0 variables" not in message, message
        if IS_KERAS_3:  # (Keras 2's TF-format error names the variable, without its layer when built by build())
            # (the scheme's layer, or the feature's linear table for a table-free scheme such as DHE)
            assert any(f"{n}_embedding" in message or f"{n}_linear" in message for n in differ), message
            assert "vocabulary_size=" in message, message
    checkpoint = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match="incompatible tensor with shape"):
        tf.train.Checkpoint(model=other).restore(checkpoint)


SAVE_UNDER_OTHER_KERAS = """
import sys
sys.path.insert(0, {tests!r})
import test_persistence as T
model, x, y = T.make_case("fixed_cf", T._frame())
T.fit_once(model, x, y)
model.save({path!r})
"""


def test_keras_file_of_the_other_keras_fails_naming_the_version(tmp_path):
    """A ``.keras`` file written under the other Keras: Keras 3 cannot rebuild under Keras 2 what Keras 3 wrote,
    and Keras 2 files loaded under Keras 3 would put each table into another feature (the two order the layers
    of the weights file differently: Keras 2 by feature name, here item_id before user_id). Both are refused
    with an error naming the version, the layer and the way out."""
    import subprocess
    import sys

    path = str(tmp_path / "other.keras")
    env = dict(os.environ)
    if IS_KERAS_3:
        env["TF_USE_LEGACY_KERAS"] = "1"
    else:
        env.pop("TF_USE_LEGACY_KERAS", None)
    script = SAVE_UNDER_OTHER_KERAS.format(tests=os.path.dirname(os.path.abspath(__file__)), path=path)
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300, capture_output=True)
    other = "Keras 2 \\(tf-keras\\)" if IS_KERAS_3 else "Keras 3"
    with pytest.raises(ValueError, match=f"CFNetwork 'cf_network' was saved by {other}: its layer "
                                         "'(user|item)_id_embedding' has .*Load the file under Keras"):
        keras.models.load_model(path)


@pytest.mark.parametrize("case", ["fixed", "md_field", "pep_retrain", "esapn", "autodis", "alpt"])
def test_mixed_float16_model_reloads_under_the_default_policy(case, frame, tmp_path):
    """A model built under mixed_float16 keeps that policy through its config and a ``.keras`` file, whatever the
    global policy of the process that reloads it: before, its dense layers rebuilt float32 beside float16
    schemes, and load_model failed ("AddN ... expected to be a half tensor")."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model, x, y = make_case(case, frame)
        fit_once(model, x, y)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    for name, layer in model.embedding_layers.items():
        clone = type(layer).from_config(layer.get_config())
        assert clone.compute_dtype == "float16" and clone.variable_dtype == "float32", name
    path = str(tmp_path / "mixed.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    assert reloaded.dtype_policy.name == "mixed_float16"
    assert {layer.compute_dtype for layer in reloaded.embedding_layers.values()} == {"float16"}
    np.testing.assert_allclose(predict(reloaded, x), predict(model, x), rtol=0, atol=ATOL)
    clone = type(model).from_config(model.get_config())
    assert clone.dtype_policy.name == "mixed_float16"
    assert keras.mixed_precision.global_policy().name == "float32"


@pytest.mark.parametrize("case", ["pep_retrain", "md_popularity", "double_hashing", "autoemb", "esapn", "dhe",
                                  "lpt"])
def test_model_of_compact_layers_round_trips(case, trained, tmp_path):
    """A model built from the schemes' ``compact()`` layers (PackedEmbedding, MD's frozen form, IndexedRowsEmbedding,
    MultiDimEmbedding, ESAPNCompactEmbedding, DHE's folded network) saves, reloads and checkpoints as it predicts."""
    model, x, _ = trained(case)
    config = {k: v for k, v in model.get_config().items() if k not in ("embeddings", "embedding_optimizer", "name")}
    config["embeddings"] = {name: layer.compact() for name, layer in model.embedding_layers.items()}
    compact = type(model)(**config)
    compact.build()
    expected = predict(compact, x)
    path = str(tmp_path / "compact.keras")
    compact.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_allclose(predict(reloaded, x), expected, rtol=0, atol=ATOL)
    assert sizes(reloaded) == sizes(compact)
    checkpoint = tf.train.Checkpoint(model=compact).save(str(tmp_path / "ckpt"))
    fresh = fresh_copy(compact)
    tf.train.Checkpoint(model=fresh).restore(checkpoint).expect_partial()
    np.testing.assert_allclose(predict(fresh, x), expected, rtol=0, atol=ATOL)
