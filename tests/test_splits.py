"""Splits: random, per user, chronological, streaming order; fraction validation and empty splits."""

import numpy as np
import pandas as pd
import pytest

from tfemb.data.readers import movielens_schema
from tfemb.data.splits import random_split, sort_by_time, stream_batches, temporal_split, user_split
from tfemb.errors import DataError


def _ratings(n=1000, users=37, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "user_id": rng.integers(1, users + 1, n),
        "item_id": rng.integers(1, 200, n),
        "rating": rng.integers(1, 6, n).astype(float),
        "timestamp": rng.integers(0, 50, n),  # many ties on purpose
    }, index=pd.RangeIndex(100, 100 + n))


# ------------------------------------------------------------------------------------------------ random
def test_random_split_sizes_disjoint_and_ordered():
    df = _ratings()
    train, val, test = random_split(df, (0.8, 0.1, 0.1), seed=3)
    assert (len(train), len(val), len(test)) == (800, 100, 100)
    idx = np.concatenate([train.index, val.index, test.index])
    assert sorted(idx) == list(df.index)
    for part in (train, val, test):
        assert part.index.is_monotonic_increasing  # original relative order kept
        pd.testing.assert_frame_equal(part, df.loc[part.index])


def test_random_split_is_seeded():
    df = _ratings()
    a = random_split(df, seed=1)
    b = random_split(df, seed=1)
    c = random_split(df, seed=2)
    for x, y in zip(a, b):
        pd.testing.assert_frame_equal(x, y)
    assert not a[2].index.equals(c[2].index)


def test_random_split_two_parts_and_rounding():
    train, test = random_split(_ratings(n=7), (0.5, 0.5))
    assert len(train) + len(test) == 7 and min(len(train), len(test)) >= 3


@pytest.mark.parametrize("fractions, match", [
    ((0.8, 0.1), r"fractions must sum to 1. Received: fractions=\(0.8, 0.1\) \(sum 0.9\)"),
    ((1.2, -0.2), r"every fraction must be a number in \(0, 1\]. Received: 1.2"),
    ((0.0, 1.0), r"every fraction must be a number in \(0, 1\]. Received: 0.0"),
    (("a", 1.0), r"every fraction must be a number in \(0, 1\]. Received: 'a'"),
    ((), r"fractions must not be empty"),
    (0.8, r"fractions must be a sequence of numbers. Received: fractions=0.8"),
])
def test_bad_fractions(fractions, match):
    with pytest.raises(DataError, match=match):
        random_split(_ratings(), fractions)
    with pytest.raises(DataError, match=match):
        temporal_split(_ratings(), "timestamp", fractions)


def test_empty_split_raises():
    with pytest.raises(DataError, match=r"random split 2 of 3 is empty: 5 rows x fraction 0.05 rounds to 0 rows"):
        random_split(_ratings(n=5), (0.8, 0.15, 0.05))
    with pytest.raises(DataError, match=r"cannot split an empty dataset \(0 rows\)"):
        random_split(_ratings().iloc[:0])
    with pytest.raises(DataError, match=r"expected a pandas DataFrame. Received: list"):
        random_split([1, 2, 3])


# -------------------------------------------------------------------------------------------------- user
def test_user_split_latest_interactions_by_time():
    df = _ratings()
    train, test = user_split(df, test_fraction=0.2, time_column="timestamp")
    assert len(train) + len(test) == len(df)
    assert set(train.index).isdisjoint(test.index)
    assert set(train["user_id"]) == set(df["user_id"])  # every user keeps training rows
    for user, rows in df.groupby("user_id"):
        n = len(rows)
        expected = min(n - 1, int(np.floor(n * 0.2 + 0.5)))
        held = test[test["user_id"] == user]
        assert len(held) == expected
        kept = train[train["user_id"] == user]
        if expected:
            assert held["timestamp"].min() >= kept["timestamp"].max()
    assert train.index.is_monotonic_increasing and test.index.is_monotonic_increasing


def test_user_split_time_ties_follow_row_order():
    df = pd.DataFrame({"user_id": [1, 1, 1, 1, 2, 2], "timestamp": [5, 5, 5, 5, 1, 1]})
    train, test = user_split(df, test_fraction=0.5, time_column="timestamp")
    assert test.index.tolist() == [2, 3, 5]


def test_user_split_random_is_seeded_and_single_rows_stay_in_train():
    df = pd.concat([_ratings(), pd.DataFrame({"user_id": [999], "item_id": [1], "rating": [3.0],
                                              "timestamp": [0]}, index=[5000])])
    a = user_split(df, seed=4)
    b = user_split(df, seed=4)
    c = user_split(df, seed=5)
    assert a[1].index.equals(b[1].index) and not a[1].index.equals(c[1].index)
    assert 5000 in a[0].index and 999 not in set(a[1]["user_id"])


def test_user_split_errors():
    df = _ratings()
    with pytest.raises(DataError, match=r"test_fraction must be a number in \(0, 1\). Received: test_fraction=1"):
        user_split(df, test_fraction=1)
    with pytest.raises(DataError, match=r"missing column 'uid'"):
        user_split(df, user_column="uid")
    with pytest.raises(DataError, match=r"missing column 'time'"):
        user_split(df, time_column="time")
    one_each = pd.DataFrame({"user_id": [1, 2, 3], "item_id": [1, 1, 1]})
    with pytest.raises(DataError, match=r"user split gives an empty test set.*largest user: 1 rows"):
        user_split(one_each)
    with pytest.raises(DataError, match=r"user column 'user_id' has a missing value in row 1"):
        user_split(pd.DataFrame({"user_id": [1, None, 1]}))


# ---------------------------------------------------------------------------------------------- temporal
def test_sort_by_time_is_stable():
    df = pd.DataFrame({"t": [3, 1, 3, 1, 2], "row": range(5)})
    assert sort_by_time(df, "t")["row"].tolist() == [1, 3, 4, 0, 2]
    with pytest.raises(DataError, match=r"time column 't' has a missing value in row 1"):
        sort_by_time(pd.DataFrame({"t": [1.0, np.nan]}), "t")
    with pytest.raises(DataError, match=r"missing column 'ts'"):
        sort_by_time(df, "ts")


def test_temporal_split_is_chronological():
    df = _ratings()
    train, val, test = temporal_split(df, "timestamp", (0.7, 0.2, 0.1))
    assert (len(train), len(val), len(test)) == (700, 200, 100)
    assert train["timestamp"].max() <= val["timestamp"].min()
    assert val["timestamp"].max() <= test["timestamp"].min()
    assert train["timestamp"].is_monotonic_increasing
    pd.testing.assert_frame_equal(pd.concat([train, val, test]), sort_by_time(df, "timestamp"))


# --------------------------------------------------------------------------------------------- streaming
def test_stream_batches_in_order():
    df = sort_by_time(_ratings(n=103), "timestamp")
    schema = movielens_schema("binary").fit(df)
    x, y = schema.transform(df)
    batches = list(stream_batches(x, y, batch_size=25, time=df["timestamp"].to_numpy()))
    assert [len(b[1]) for b in batches] == [25, 25, 25, 25, 3]
    np.testing.assert_array_equal(np.concatenate([b[0]["user_id"] for b in batches]), x["user_id"])
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)
    assert set(batches[0][0]) == {"user_id", "item_id"}


def test_stream_batches_without_labels():
    x = {"a": np.arange(5)}
    batches = list(stream_batches(x, batch_size=2))
    assert [b[0]["a"].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    assert all(b[1] is None for b in batches)


def test_stream_batches_errors():
    x = {"a": np.arange(5), "b": np.arange(5)}
    with pytest.raises(DataError, match=r"rows are not in time order: row 2 has time 1 < 4 of row 1"):
        stream_batches(x, time=[3, 4, 1, 5, 6])
    with pytest.raises(DataError, match=r"batch_size must be an int >= 1. Received: batch_size=0"):
        stream_batches(x, batch_size=0)
    with pytest.raises(DataError, match=r"all features must have the same number of rows"):
        stream_batches({"a": np.arange(5), "b": np.arange(4)})
    with pytest.raises(DataError, match=r"labels have 3 rows but features have 5"):
        stream_batches(x, np.arange(3))
    with pytest.raises(DataError, match=r"x must be a non-empty dict"):
        stream_batches({})
    with pytest.raises(DataError, match=r"cannot stream 0 rows"):
        stream_batches({"a": np.arange(0)})
