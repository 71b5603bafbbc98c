"""Synthetic data: determinism, Zipf shape, label rates, informative dims rising with popularity, schemas."""

import time

import numpy as np
import pandas as pd
import pytest

from tfemb.data.synthetic import (
    DEFAULT_VOCABULARY_SIZES,
    MOVIELENS_RATING_SHARES,
    effective_dims,
    effective_dims_by_rank,
    make_synthetic_cf,
    make_synthetic_ctr,
    synthetic_cf_schema,
    synthetic_ctr_schema,
    zipf_probabilities,
)
from tfemb.errors import DataError


@pytest.fixture(scope="module")
def ctr():
    t = time.perf_counter()
    df, info = make_synthetic_ctr()  # the defaults: 100k rows, 8 fields
    return df, info, time.perf_counter() - t


@pytest.fixture(scope="module")
def cf():
    t = time.perf_counter()
    df, info = make_synthetic_cf()
    return df, info, time.perf_counter() - t


def _spearman(a, b):
    ra = pd.Series(a).rank().to_numpy()
    rb = pd.Series(b).rank().to_numpy()
    return float(np.corrcoef(ra, rb)[0, 1])


# --------------------------------------------------------------------------------------------------- CTR
def test_ctr_layout_and_speed(ctr):
    df, info, elapsed = ctr
    assert elapsed < 2.0, f"100k synthetic CTR rows took {elapsed:.2f}s"
    assert list(df.columns) == ["label", "I1", "I2"] + [f"C{i}" for i in range(1, 9)]
    assert len(df) == 100_000
    assert df["label"].dtype == np.int64 and set(np.unique(df["label"])) == {0, 1}
    assert df["I1"].dtype == np.float64 and (df["I1"] >= 0).all()
    assert info["config"]["vocabulary_sizes"] == list(DEFAULT_VOCABULARY_SIZES[:8])
    for i, size in enumerate(info["config"]["vocabulary_sizes"]):
        assert df[f"C{i + 1}"].nunique() <= size
        assert isinstance(df[f"C{i + 1}"].iloc[0], str)


def test_ctr_is_deterministic():
    a = make_synthetic_ctr(num_rows=3000, seed=7)[0]
    b = make_synthetic_ctr(num_rows=3000, seed=7)[0]
    c = make_synthetic_ctr(num_rows=3000, seed=8)[0]
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)


def test_ctr_positive_rate(ctr):
    df, info, _ = ctr
    assert 0.25 <= df["label"].mean() <= 0.35
    assert info["realised_positive_rate"] == df["label"].mean()
    rate = make_synthetic_ctr(num_rows=20_000, positive_rate=0.1, seed=1)[0]["label"].mean()
    assert 0.07 <= rate <= 0.13


def test_ctr_zipf_shape(ctr):
    df, info, _ = ctr
    counts = df["C4"].value_counts()  # 5000 values
    assert counts.iloc[0] > 100 * counts.median()
    # Top value share close to the Zipf probability of rank 1.
    assert abs(counts.iloc[0] / len(df) - zipf_probabilities(5000, 1.1)[0]) < 0.01
    assert counts.index[0] == info["fields"]["C4"]["values"][0]


def test_ctr_informative_dims_rise_with_popularity(ctr):
    df, info, _ = ctr
    schema = synthetic_ctr_schema(df).fit(df)
    for field in ("C3", "C4", "C5"):
        vocab = schema.feature(field).vocabulary  # ids in descending training count
        dims = effective_dims(info, field, vocab.values)
        counts = np.asarray(vocab.counts[1:])
        assert dims.min() >= 1 and dims.max() <= 16
        top, bottom = dims[:20].mean(), dims[-len(dims) // 2:].mean()
        assert top > 2 * bottom, (field, top, bottom)
        assert _spearman(counts, dims) > 0.6  # many ties among the rare values
    # Ground truth: non-increasing with rank, and coordinates beyond d_eff are exactly zero.
    for table in info["fields"].values():
        d = table["effective_dims"]
        assert np.all(np.diff(d) <= 0) and d[0] == 16
        z = table["latents"]
        mask = np.arange(16)[None, :] >= d[:, None]
        assert np.all(z[mask] == 0) and np.all(z[~mask] != 0)


def test_effective_dims_formula():
    d = effective_dims_by_rank(1000, 1.1, 16, 0.25)
    ranks = np.arange(1, 1001)
    np.testing.assert_array_equal(d, np.clip(np.rint(16 * ranks ** (-0.275)), 1, 16))
    assert effective_dims({"fields": {"C1": {"values": np.array(["a", "b"], dtype=object),
                                             "effective_dims": np.array([5, 2])}}}, "C1", ["b", "zz"]).tolist() == [2, 0]


def test_ctr_label_follows_planted_logit(ctr):
    df, info, _ = ctr
    logit = info["logits"]
    hi, lo = df["label"][logit > np.quantile(logit, 0.9)].mean(), df["label"][logit < np.quantile(logit, 0.1)].mean()
    assert hi > 0.7 and lo < 0.05


def test_ctr_schema_from_df_and_config(ctr):
    df, info, _ = ctr
    small = df.iloc[:5000]
    a = synthetic_ctr_schema(small)
    b = synthetic_ctr_schema(info)
    c = synthetic_ctr_schema({"num_fields": 8, "num_numeric": 2}, min_count=2)
    assert a.names == b.names == c.names == ["I1", "I2"] + [f"C{i}" for i in range(1, 9)]
    x, y = a.fit_transform(small)
    assert x["C1"].dtype == np.int64 and x["I1"].dtype == np.float32 and y.shape == (5000,)
    assert c.fit(small).frequencies("C5")[0] > 0  # singletons -> OOV with min_count=2


def test_ctr_options_and_missing_numeric():
    df, _ = make_synthetic_ctr(num_rows=2000, num_fields=3, vocabulary_sizes=[7, 11, 13], num_numeric=0, seed=2)
    assert list(df.columns) == ["label", "C1", "C2", "C3"]
    df, _ = make_synthetic_ctr(num_rows=2000, num_fields=2, num_numeric=3, numeric_missing_rate=0.2)
    assert 0.1 < df["I3"].isna().mean() < 0.3
    x, _ = synthetic_ctr_schema(df).fit_transform(df)  # fill_value=0 accepts the NaNs
    assert np.isfinite(x["I3"]).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"num_rows": 0}, r"num_rows must be an int >= 1. Received: num_rows=0"),
    ({"num_fields": 2, "vocabulary_sizes": [5]}, r"vocabulary_sizes must have num_fields=2 entries. Received: 1"),
    ({"zipf_exponent": -1}, r"zipf_exponent must be a finite number >= 0. Received: zipf_exponent=-1"),
    ({"positive_rate": 1.0}, r"positive_rate must be in \(0, 1\). Received: positive_rate=1.0"),
    ({"latent_dim": 0}, r"latent_dim must be an int >= 1. Received: latent_dim=0"),
])
def test_ctr_bad_arguments(kwargs, match):
    with pytest.raises(DataError, match=match):
        make_synthetic_ctr(**kwargs)


def test_ctr_schema_bad_input():
    with pytest.raises(DataError, match=r"no C1..Ck columns"):
        synthetic_ctr_schema(pd.DataFrame({"x": [1]}))
    with pytest.raises(DataError, match=r"config needs 'num_fields'"):
        synthetic_ctr_schema({"num_numeric": 1})
    with pytest.raises(DataError, match=r"expected a DataFrame or a config dict. Received: int"):
        synthetic_ctr_schema(3)


# ---------------------------------------------------------------------------------------------------- CF
def test_cf_layout_ratings_and_speed(cf):
    df, info, elapsed = cf
    assert elapsed < 2.0
    assert list(df.columns) == ["user_id", "item_id", "rating", "timestamp", "label"]
    assert len(df) == 100_000
    assert df["user_id"].between(1, 2000).all() and df["item_id"].between(1, 1000).all()
    shares = df["rating"].value_counts(normalize=True).sort_index()
    assert shares.index.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    np.testing.assert_allclose(shares.to_numpy(), MOVIELENS_RATING_SHARES, atol=1e-3)
    np.testing.assert_array_equal(df["label"], (df["rating"] >= 4).astype(int))
    assert df["timestamp"].is_monotonic_increasing


def test_cf_is_deterministic_and_tasks():
    a, info = make_synthetic_cf(num_rows=2000, seed=3)
    pd.testing.assert_frame_equal(a, make_synthetic_cf(num_rows=2000, seed=3)[0])
    assert not a.equals(make_synthetic_cf(num_rows=2000, seed=4)[0])
    m = make_synthetic_cf(num_rows=2000, seed=3, task="multiclass")[0]
    assert "label" not in m.columns
    pd.testing.assert_frame_equal(m, a.drop(columns=["label"]))
    with pytest.raises(DataError, match=r"task must be .*Received: task='rank'"):
        make_synthetic_cf(task="rank")


def test_cf_popularity_and_informative_dims(cf):
    df, info, _ = cf
    counts = df["user_id"].value_counts()
    assert counts.iloc[0] > 20 * counts.median()
    schema = synthetic_cf_schema(df).fit(df)
    for field in ("user_id", "item_id"):
        vocab = schema.feature(field).vocabulary
        dims = effective_dims(info, field, vocab.values)
        assert dims[:10].mean() > 2 * dims[-100:].mean()
        assert _spearman(vocab.counts[1:], dims) > 0.7


def test_docstring_examples_run():
    import doctest

    from tfemb.data import synthetic

    result = doctest.testmod(synthetic)
    assert result.attempted > 0 and result.failed == 0


def test_cf_rating_follows_planted_score(cf):
    df, info, _ = cf
    corr = np.corrcoef(info["scores"], df["rating"])[0, 1]
    assert corr > 0.8


@pytest.mark.parametrize("task", ["binary", "multiclass", "regression"])
def test_cf_schema_fits(cf, task):
    df = cf[0].iloc[:3000]
    x, y = synthetic_cf_schema(df, task=task).fit_transform(df)
    assert set(x) == {"user_id", "item_id"}
    if task == "binary":
        np.testing.assert_array_equal(y, df["label"])
        np.testing.assert_array_equal(synthetic_cf_schema(with_label_column=True).fit_transform(df)[1], y)
        assert synthetic_cf_schema(cf[1]).names == ["user_id", "item_id"]
    elif task == "multiclass":
        np.testing.assert_array_equal(y, df["rating"] - 1)
    else:
        np.testing.assert_allclose(y, df["rating"])
    with pytest.raises(DataError, match=r"with_label_column needs task='binary'"):
        synthetic_cf_schema(task="regression", with_label_column=True)
    with pytest.raises(DataError, match=r"missing column 'rating'"):
        synthetic_cf_schema(df.drop(columns=["rating"]))
