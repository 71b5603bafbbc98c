"""LowPrecisionEmbedding: low-precision training (LPT) and its adaptive step sizes (ALPT), Li et al. AAAI 2023.

Checked against NumPy: the lookup (Δ·q), the initial step size (LSQ), the rounding back to the grid (stochastic
and to nearest), the straight-through step-size gradient and its scale; in training: tables stay on their grid,
round-to-nearest loses updates smaller than half a step where stochastic rounding keeps them in expectation,
ALPT moves only the looked-up rows' step sizes; export stores the codes exactly (int8 / int16)."""

import numpy as np
import pytest
import tensorflow as tf

from tfemb import experiment
from tfemb._keras import IS_KERAS_3, keras
from tfemb.export import export_saved_model, load_export, unsupported_ops
from tfemb.layers import LowPrecisionEmbedding, scheme_factory
from tfemb.layers.low_precision_embedding import code_range, stochastic_round
from tfemb.models import DeepFM


def _on_grid(layer):
    w = layer.embeddings.numpy().astype(np.float64)
    delta = layer.step_sizes.numpy().astype(np.float64)
    v = w / delta
    return float(np.max(np.abs(v - np.rint(v)))), v


@pytest.fixture(scope="module")
def data():
    prepared = experiment.prepare_data({
        "source": "synthetic_ctr", "params": {"num_rows": 1200, "seed": 0, "num_fields": 3, "num_numeric": 2,
                                              "vocabulary_sizes": [40, 300, 25]},
        "split": {"method": "random", "fractions": [0.8, 0.1, 0.1], "seed": 0}})
    return prepared


def _deepfm(prepared, **params):
    keras.utils.set_random_seed(0)
    model = DeepFM(prepared.schema, embedding_dim=4, dnn_units=(8,),
                   embeddings=scheme_factory("low_precision", output_dim=4, **params))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    model.build()
    return model


# -------------------------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_lookup_is_step_size_times_codes_in_range(bits):
    layer = LowPrecisionEmbedding(vocabulary_size=30, output_dim=5, bits=bits, step_size="fixed")
    ids = np.array([0, 3, 29, 3])
    out = layer(tf.constant(ids)).numpy()
    codes, delta = layer.codes(), layer.step_size_values()
    qn, qp = code_range(bits)
    assert (qn, qp) == (2 ** (bits - 1), 2 ** (bits - 1) - 1)
    assert codes.min() >= -qn and codes.max() <= qp
    np.testing.assert_array_equal(out, (codes[ids] * delta[ids, None]).astype(np.float32))
    # LSQ's start: every row's step 2·mean|w0|/sqrt(Qp); U(-0.05, 0.05) has mean |w0| ~ 0.025.
    assert np.all(delta == delta[0])
    assert abs(delta[0] - 2 * 0.025 / np.sqrt(qp)) < 0.15 * 2 * 0.025 / np.sqrt(qp)
    assert layer.parameter_count() == 150
    assert layer.storage_bytes() == 30 * (5 * (1 if bits <= 8 else 2) + 4)
    np.testing.assert_array_equal(layer.dims_per_id(), np.full(30, 5))


def test_initial_step_size_and_round_to_nearest_start():
    init = keras.initializers.RandomUniform(-0.3, 0.3, seed=3)
    layer = LowPrecisionEmbedding(vocabulary_size=20, output_dim=3, bits=3, initial_step_size=0.1,
                                  embeddings_initializer=init, step_size="fixed")
    layer.build()
    start = keras.initializers.RandomUniform(-0.3, 0.3, seed=3)((20, 3)).numpy()
    expected = np.clip(np.round(start / np.float32(0.1)), -4, 3) * np.float32(0.1)
    np.testing.assert_allclose(layer.embeddings.numpy(), expected, atol=1e-7)
    np.testing.assert_array_equal(layer.step_size_values(), np.full(20, 0.1, np.float32))


def test_stochastic_rounding_is_unbiased_and_between_neighbours():
    values = tf.constant(np.linspace(-3.0, 3.0, 13, dtype=np.float32))
    draws = np.stack([stochastic_round(values, tf.constant([7, s], tf.int32)).numpy() for s in range(2000)])
    v = values.numpy()
    assert np.all((draws == np.floor(v)) | (draws == np.ceil(v)))
    np.testing.assert_allclose(draws.mean(axis=0), v, atol=0.05)  # 2000 draws: sd <= 0.5/sqrt(2000) = 0.011
    on_grid = tf.constant([-2.0, 0.0, 5.0])
    np.testing.assert_array_equal(stochastic_round(on_grid, tf.constant([1, 2], tf.int32)).numpy(), [-2, 0, 5])


def test_quantized_against_numpy():
    layer = LowPrecisionEmbedding(vocabulary_size=4, output_dim=3, bits=3, initial_step_size=0.5, step_size="fixed",
                                  rounding="deterministic")
    layer.build()
    layer.step_sizes.assign([[0.5], [0.25], [1.0], [0.1]])
    w = np.array([[0.3, -0.8, 2.9], [0.1, 0.26, -5.0], [3.4, -3.6, 0.49], [0.0, 0.05, 0.16]], np.float32)
    delta = layer.step_sizes.numpy()
    expected = np.clip(np.round(w / delta), -4, 3) * delta
    np.testing.assert_allclose(layer.quantized(tf.constant(w)).numpy(), expected, atol=1e-7)
    # Stochastic: floor(v + u) with the layer's seed and the table's sum as the stateless seed.
    stochastic = LowPrecisionEmbedding.from_config({**layer.get_config(), "rounding": "stochastic"})
    stochastic.build()
    stochastic.step_sizes.assign(delta)
    got = stochastic.quantized(tf.constant(w)).numpy()
    v = np.clip(w / delta, -4, 3)
    seed = tf.stack([tf.constant(0, tf.int32), tf.bitcast(tf.reduce_sum(tf.constant(w)), tf.int32)])
    u = tf.random.stateless_uniform(w.shape, seed=seed).numpy()
    np.testing.assert_allclose(got, np.clip(np.floor(v + u), -4, 3) * delta, atol=1e-7)


def test_step_size_gradient_is_the_straight_through_lsq_gradient():
    layer = LowPrecisionEmbedding(vocabulary_size=3, output_dim=4, bits=2, initial_step_size=0.5)
    layer.build()
    # Off-grid values, as after an optimizer update: in range, and beyond both ends (codes -2..1).
    w = np.array([[0.2, -0.7, 0.9, -2.0], [0.26, 0.0, -0.49, 1.3], [0.1, 0.1, 0.1, 0.1]], np.float32)
    layer.embeddings.assign(w)
    layer.step_sizes.assign([[0.5], [0.4], [0.3]])
    ids = tf.constant([0, 1, 1])
    c = np.arange(12, dtype=np.float32).reshape(3, 4) / 10.0 - 0.4
    variable = layer.step_sizes.value if IS_KERAS_3 else layer.step_sizes
    object.__setattr__(layer, "_step_size_pass", True)
    try:
        with tf.GradientTape() as tape:
            tape.watch(variable)
            out = layer(ids)
            loss = tf.reduce_sum(out * c)
    finally:
        object.__setattr__(layer, "_step_size_pass", False)
    grad = tf.convert_to_tensor(tape.gradient(loss, variable)).numpy().reshape(-1)
    delta = np.array([0.5, 0.4, 0.3])
    expected_out = np.zeros((3, 4))
    expected = np.zeros(3)
    for k, i in enumerate([0, 1, 1]):
        v = w[i] / delta[i]
        vc = np.clip(v, -2, 1)
        expected_out[k] = delta[i] * np.round(vc)
        d = np.where(v < -2, -2.0, np.where(v > 1, 1.0, np.round(vc) - vc))
        expected[i] += np.sum(c[k] * d)
    np.testing.assert_allclose(out.numpy(), expected_out, atol=1e-6)
    np.testing.assert_allclose(grad, expected, atol=1e-5)
    # LSQ's scale as the authors' code: 1/sqrt(n·d·Qp).
    assert abs(float(layer.step_size_gradient_scale(3)) - 1 / np.sqrt(3 * 4 * 1)) < 1e-7


# --------------------------------------------------------------------------------------------- training
def test_fixed_step_size_keeps_every_table_on_its_grid(data):
    model = _deepfm(data, bits=4, step_size="fixed")
    x, y = data.arrays["train"]
    before = {l.name: (l.embeddings.numpy().copy(), l.step_sizes.numpy().copy()) for l in model.embedding_list}
    model.fit(x, y, batch_size=128, epochs=1, verbose=0)
    for layer in model.embedding_list:
        off, v = _on_grid(layer)
        assert off < 1e-4 and np.rint(v).min() >= -8 and np.rint(v).max() <= 7
        np.testing.assert_array_equal(layer.step_sizes.numpy(), before[layer.name][1])  # LPT: fixed steps
        assert np.any(layer.embeddings.numpy() != before[layer.name][0])  # and it did train


@pytest.mark.parametrize("step_size", ["fixed", "adaptive"])
def test_lazy_embedding_optimizer_updates_and_rounds_only_the_looked_up_rows(step_size, data):
    """With a row-sparse ``embedding_optimizer`` (the paper's setting) only the rows a batch looked up change, and
    they are rounded back to the grid (the table's row constraint; ALPT: after the step-size pass)."""
    keras.utils.set_random_seed(0)
    model = DeepFM(data.schema, embedding_dim=4, dnn_units=(8,), embedding_optimizer="adam",
                   embeddings=scheme_factory("low_precision", output_dim=4, bits=4, step_size=step_size,
                                             step_size_learning_rate=1e-3))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    model.build()
    assert all(layer.sparse_tables() == [layer.embeddings] for layer in model.embedding_list)
    x, y = data.arrays["train"]
    x, y = {k: v[:300] for k, v in x.items()}, y[:300]
    before = {l.name: l.embeddings.numpy().copy() for l in model.embedding_list}
    model.fit(x, y, batch_size=100, epochs=1, verbose=0)
    for layer, feature in zip(model.embedding_list, model.embedding_names):
        assert _on_grid(layer)[0] < 1e-4
        w = layer.embeddings.numpy()
        unseen = np.setdiff1d(np.arange(layer.vocabulary_size), np.unique(x[feature]))
        np.testing.assert_array_equal(w[unseen], before[layer.name][unseen])
        assert np.any(w != before[layer.name])


def test_round_to_nearest_loses_small_updates_stochastic_rounding_keeps_them(data):
    """The paper's point for stochastic rounding: with updates under half a step, round-to-nearest never moves
    a table; stochastic rounding moves it by the update in expectation."""
    moved = {}
    for rounding in ("deterministic", "stochastic"):
        model = _deepfm(data, bits=8, step_size="fixed", rounding=rounding, initial_step_size=0.01)
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss="binary_crossentropy")
        x, y = data.arrays["train"]
        before = [l.embeddings.numpy().copy() for l in model.embedding_list]
        model.fit(x, y, batch_size=128, epochs=1, verbose=0)
        moved[rounding] = sum(int(np.sum(l.embeddings.numpy() != b)) for l, b in zip(model.embedding_list, before))
    assert moved["deterministic"] == 0
    assert moved["stochastic"] > 0


def test_alpt_learns_the_step_sizes_of_looked_up_rows_and_stays_on_grid(data):
    model = _deepfm(data, bits=2, step_size="adaptive", step_size_learning_rate=1e-3)
    x, y = data.arrays["train"]
    start = {l.name: l.step_sizes.numpy().copy() for l in model.embedding_list}
    history = model.fit(x, y, batch_size=128, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    for layer, feature in zip(model.embedding_list, model.embedding_names):
        off, _ = _on_grid(layer)
        assert off < 1e-4
        seen = np.unique(x[feature])
        unseen = np.setdiff1d(np.arange(layer.vocabulary_size), seen)
        delta, before = layer.step_sizes.numpy().reshape(-1), start[layer.name].reshape(-1)
        assert np.any(delta[seen] != before[seen])
        np.testing.assert_array_equal(delta[unseen], before[unseen])  # lazy Adam: rows not looked up stay
        assert np.all(delta > 0)


def test_alpt_loss_reported_once_per_step(data):
    """The step-size pass computes a second loss; ``fit`` reports the training pass's only (a model with the
    same weights and a fixed step size reports the same first-epoch loss)."""
    losses = {}
    for step in ("adaptive", "fixed"):
        model = _deepfm(data, bits=8, step_size=step, rounding="deterministic", step_size_learning_rate=1e-12)
        x, y = data.arrays["train"]
        losses[step] = model.fit(x, y, batch_size=1000, epochs=1, verbose=0).history["loss"][0]
    assert abs(losses["adaptive"] - losses["fixed"]) < 1e-4


# ----------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("bits,dtype", [(4, "int8"), (12, "int16")])
def test_export_stores_the_codes_exactly(bits, dtype, data, tmp_path):
    model = _deepfm(data, bits=bits, step_size="adaptive", step_size_learning_rate=1e-4)
    x, y = data.arrays["train"]
    model.fit(x, y, batch_size=256, epochs=1, verbose=0)
    # table_dtype does not re-round a low-precision table (float16 would only lose precision).
    path = export_saved_model(model, tmp_path / "lp", table_dtype="float16")
    assert not unsupported_ops(path)  # stock ops only: an int gather, a cast, a multiply
    loaded = load_export(path)
    xt, _ = data.arrays["test"]
    expected = model(xt, training=False).numpy()
    got = loaded.predict_encoded(xt)["probability"]
    assert float(np.max(np.abs(got - expected))) <= 1e-6
    rows = [r for r in loaded.report["tables"] if r["kind"] == "table"]
    assert {r["dtype"] for r in rows} == {dtype}
    from tfemb.export.report import summary_lines

    assert f"tables stored as float16 ({dtype} where trained so)" in summary_lines(loaded.report)[0]
    for layer, feature in zip(model.embedding_list, model.embedding_names):
        row = next(r for r in rows if r["feature"] == feature)
        assert row["bytes"] == layer.storage_bytes() and row["parameters"] == layer.parameter_count()


def test_config_round_trip_and_keras_file(data, tmp_path):
    model = _deepfm(data, bits=4, step_size="adaptive", step_size_learning_rate=1e-4)
    x, y = data.arrays["train"]
    model.fit(x, y, batch_size=256, epochs=1, verbose=0)
    layer = model.embedding_list[0]
    clone = LowPrecisionEmbedding.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    xt, _ = data.arrays["test"]
    np.testing.assert_allclose(loaded(xt, training=False).numpy(), model(xt, training=False).numpy(), atol=1e-6)
    for a, b in zip(loaded.embedding_list, model.embedding_list):
        np.testing.assert_array_equal(a.step_sizes.numpy(), b.step_sizes.numpy())


def test_checkpoint_holds_the_step_size_optimizer_state(data, tmp_path):
    """ALPT's step-size Adam (iterations, moments) is a checkpoint dependency of the layer: a restored model goes
    on where the saved one stopped."""
    model = _deepfm(data, bits=4, step_size_learning_rate=1e-3)
    x, y = data.arrays["train"]
    model.fit(x, y, batch_size=200, epochs=1, verbose=0)
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    fresh = _deepfm(data, bits=4, step_size_learning_rate=1e-3)
    tf.train.Checkpoint(model=fresh).restore(path).assert_existing_objects_matched()
    for restored, saved in zip(fresh.embedding_list, model.embedding_list):
        restored.step_size_optimizer().build([restored.step_sizes])  # slots made now get the restored values
        ours, theirs = restored.step_size_optimizer().variables, saved.step_size_optimizer().variables
        assert len(ours) == len(theirs) == 3 and int(np.asarray(theirs[0])) > 0
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(restored.step_sizes.numpy(), saved.step_sizes.numpy())


# ----------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs,message", [
    ({"bits": 1}, r"bits must be an int in \[2, 16\]. Received: bits=1"),
    ({"bits": 17}, r"Received: bits=17"),
    ({"bits": True}, r"Received: bits=True"),
    ({"step_size": "learned"}, r"step_size must be one of \('adaptive', 'fixed'\). Received: step_size='learned'"),
    ({"rounding": "up"}, r"rounding must be one of .* Received: rounding='up'"),
    ({"initial_step_size": 0.0}, r"initial_step_size must be a finite number > 0 or None. Received: "
                                 r"initial_step_size=0.0"),
    ({"step_size_learning_rate": -1}, r"Received: step_size_learning_rate=-1"),
])
def test_bad_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LowPrecisionEmbedding(vocabulary_size=5, output_dim=2, **kwargs)


def test_docstring_example_runs():
    import doctest

    import tfemb.layers.low_precision_embedding as module

    result = doctest.testmod(module, extraglobs={"np": np, "tf": tf}, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0
