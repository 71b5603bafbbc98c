"""make_dataset: batches, shapes, dtypes, seeded shuffling, weights, and bad input."""

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tfemb._keras import keras
from tfemb.data.pipeline import make_dataset
from tfemb.data.schema import CategoricalFeature, Label, MultiHotFeature, NumericFeature, Schema
from tfemb.errors import DataError


def _encoded(n=23):
    rng = np.random.default_rng(0)
    df = pd.DataFrame({
        "user": rng.integers(0, 7, n),
        "tags": ["|".join(rng.choice(list("abcde"), rng.integers(0, 4), replace=False)) for _ in range(n)],
        "price": rng.normal(size=n),
        "click": rng.integers(0, 2, n),
    })
    schema = Schema([CategoricalFeature("user"), MultiHotFeature("tags"), NumericFeature("price")], Label("click"))
    return schema.fit_transform(df)


def test_batches_shapes_and_dtypes():
    x, y = _encoded()
    batches = list(make_dataset(x, y, batch_size=5))
    assert [len(b[1]) for b in batches] == [5, 5, 5, 5, 3]
    xb, yb = batches[0]
    assert xb["user"].dtype == tf.int64 and xb["user"].shape == (5,)
    assert xb["tags"].dtype == tf.int64 and xb["tags"].shape == (5, x["tags"].shape[1])
    assert xb["price"].dtype == tf.float32 and yb.dtype == tf.float32
    np.testing.assert_array_equal(np.concatenate([b[0]["user"].numpy() for b in batches]), x["user"])
    np.testing.assert_array_equal(np.concatenate([b[1].numpy() for b in batches]), y)


def test_drop_remainder_and_repeat():
    x, y = _encoded()
    ds = make_dataset(x, y, batch_size=5, drop_remainder=True)
    assert [len(b[1]) for b in ds] == [5, 5, 5, 5]
    assert ds.element_spec[1].shape == (5,)
    ds = make_dataset(x, y, batch_size=10, repeat=True)
    assert len(list(ds.take(7))) == 7


def test_features_only_and_sample_weight():
    x, y = _encoded()
    (first,) = list(make_dataset(x, batch_size=100))
    assert isinstance(first, dict) and first["user"].shape == (23,)
    w = np.linspace(0.5, 1.5, 23)
    xb, yb, wb = next(iter(make_dataset(x, y, batch_size=4, sample_weight=w)))
    np.testing.assert_allclose(wb.numpy(), w[:4].astype(np.float32))
    assert wb.dtype == tf.float32


def test_shuffle_is_seeded_and_complete():
    x, y = _encoded(n=200)

    def order(seed):
        return np.concatenate([b[0]["price"].numpy() for b in make_dataset(x, y, batch_size=32, shuffle=True,
                                                                           seed=seed)])

    a, b, c = order(1), order(1), order(2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, x["price"])
    np.testing.assert_array_equal(np.sort(a), np.sort(x["price"]))


def _epoch_rows(ds):
    """The row ids (``x["row"]``) of one pass over ``ds``, in order."""
    return np.concatenate([b[0]["row"].numpy() for b in ds])


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("batch_size", [1, 7, 37, 50])
def test_every_row_once_per_epoch(shuffle, batch_size):
    n = 37
    x = {"row": np.arange(n), "tags": np.arange(2 * n).reshape(n, 2)}
    ds = make_dataset(x, np.zeros(n, np.float32), batch_size=batch_size, shuffle=shuffle, seed=3)
    assert len(ds) == -(-n // batch_size)
    for _ in range(3):  # every iteration is a full epoch
        batches = list(ds)
        assert [len(b[1]) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
        rows = _epoch_rows(batches)
        np.testing.assert_array_equal(np.sort(rows), np.arange(n))
        # Features of one row stay together whatever the order.
        tags = np.concatenate([b[0]["tags"].numpy() for b in batches])
        np.testing.assert_array_equal(tags, x["tags"][rows])
        if not shuffle:
            np.testing.assert_array_equal(rows, np.arange(n))


def test_shuffle_differs_across_epochs_and_is_reproducible():
    n = 200
    x = {"row": np.arange(n)}

    def epochs(seed, count=3):
        ds = make_dataset(x, np.zeros(n, np.float32), batch_size=32, shuffle=True, seed=seed)
        return [_epoch_rows(ds) for _ in range(count)]

    a, b, c = epochs(1), epochs(1), epochs(2)
    for first, second in zip(a, b):
        np.testing.assert_array_equal(first, second)  # same seed, same sequence of epoch orders
    assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[1], a[2])  # reshuffled every epoch
    assert not np.array_equal(a[0], c[0])
    assert all(not np.array_equal(rows, np.arange(n)) for rows in a)


@pytest.mark.parametrize("shuffle", [False, True])
def test_repeat_streams_whole_epochs_in_full_batches(shuffle):
    n, batch_size = 23, 10
    x = {"row": np.arange(n)}
    ds = make_dataset(x, np.zeros(n, np.float32), batch_size=batch_size, shuffle=shuffle, seed=0, repeat=True)
    batches = list(ds.take(7))
    assert all(len(b[1]) == batch_size for b in batches)  # batches run across epoch boundaries
    stream = _epoch_rows(batches)
    epochs = [stream[i * n:(i + 1) * n] for i in range(3)]
    for rows in epochs:
        np.testing.assert_array_equal(np.sort(rows), np.arange(n))
    assert np.array_equal(epochs[0], epochs[1]) != shuffle


def test_dataset_trains_a_keras_model():
    x, y = _encoded(n=64)
    inputs = {"user": keras.Input(shape=(), dtype="int64", name="user"),
              "price": keras.Input(shape=(), dtype="float32", name="price")}
    emb = keras.layers.Embedding(8, 3)(inputs["user"])
    h = keras.layers.Concatenate()([emb, keras.layers.Reshape((1,))(inputs["price"])])
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(h))
    model.compile(optimizer="sgd", loss="binary_crossentropy")
    ds = make_dataset({"user": x["user"], "price": x["price"]}, y, batch_size=16)
    history = model.fit(ds, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.parametrize("call, match", [
    (lambda x, y: make_dataset({}), r"no features given to make_dataset"),
    (lambda x, y: make_dataset(x["user"]), r"x must be a dict of feature name -> array. Received: ndarray"),
    (lambda x, y: make_dataset(x, y, batch_size=0), r"batch_size must be an int >= 1. Received: batch_size=0"),
    (lambda x, y: make_dataset(x, y, batch_size="8"), r"batch_size must be an int >= 1. Received: batch_size='8'"),
    (lambda x, y: make_dataset(x, y[:5]), r"labels have 5 rows but features have 23"),
    (lambda x, y: make_dataset({"a": np.arange(3), "b": np.arange(4)}), r"same number of rows.*'a': 3, 'b': 4"),
    (lambda x, y: make_dataset({"a": np.arange(0)}), r"cannot make a dataset from 0 rows"),
    (lambda x, y: make_dataset(x, sample_weight=np.ones(23)), r"sample_weight needs labels y"),
    (lambda x, y: make_dataset(x, y, sample_weight=np.ones(3)), r"sample_weight has 3 rows but features have 23"),
])
def test_bad_input(call, match):
    x, y = _encoded()
    with pytest.raises(DataError, match=match):
        call(x, y)
