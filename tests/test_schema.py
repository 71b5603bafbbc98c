"""Schema: vocabularies with counts, multi-hot, numeric transforms and discretisers vs NumPy, labels, JSON, errors."""

import doctest

import numpy as np
import pandas as pd
import pytest

from tfemb.data import schema as schema_module
from tfemb.data.schema import (
    PADDING_ID,
    CategoricalFeature,
    Label,
    MultiHotFeature,
    NumericFeature,
    Schema,
    Vocabulary,
    schema_from_dataframe,
)
from tfemb.errors import DataError


def _frame():
    # 7 rows; every column has all-different counts so swapped ids would show.
    return pd.DataFrame({
        "color": ["red", "blue", "red", "green", "red", "blue", None],
        "size": [3, 1, 3, 3, 2, 1, 1],
        "tags": ["a|b", "b", "c|b|a", "", None, "b|d", "a"],
        "price": [1.0, 10.0, 100.0, 0.0, -5.0, 3.5, 7.0],
        "click": [1, 0, 1, 0, 0, 1, 0],
    })


# ------------------------------------------------------------------------------------------- vocabulary
def test_vocabulary_descending_count_with_oov_count():
    vocab = Vocabulary.fit(["b", "a", "b", "c", "b", "a", None])
    assert vocab.values == ["b", "a", "c"]
    assert vocab.counts == [1, 3, 2, 1]  # counts[0]: the missing value fell to OOV
    assert vocab.size == 4
    np.testing.assert_array_equal(vocab.frequencies(), [1, 3, 2, 1])


def test_vocabulary_ties_do_not_depend_on_row_order():
    assert Vocabulary.fit(["y", "x", "z"]).values == Vocabulary.fit(["z", "y", "x"]).values == ["x", "y", "z"]


def test_categorical_min_count_moves_rare_values_to_oov():
    f = CategoricalFeature("color", min_count=2)
    f.fit(_frame()["color"])
    assert f.vocabulary.values == ["red", "blue"]
    assert f.vocabulary.counts == [2, 3, 2]  # green (1) + None (1) in OOV
    np.testing.assert_array_equal(f.encode(_frame()["color"]), [1, 2, 1, 0, 1, 2, 0])


def test_categorical_max_size_keeps_most_frequent():
    f = CategoricalFeature("size", max_size=3)
    f.fit(_frame()["size"])
    assert f.vocabulary.values == [1, 3]  # 1 and 3 seen 3 times; 2 (once) goes to OOV
    assert f.vocabulary.counts == [1, 3, 3]
    assert f.vocabulary.size == 3


def test_unknown_and_missing_values_map_to_oov_at_transform():
    schema = Schema([CategoricalFeature("color"), CategoricalFeature("size")]).fit(_frame())
    x, y = schema.transform(pd.DataFrame({"color": ["blue", "purple", None, ""], "size": [1, 99, 3, 2.0]}))
    assert y is None
    np.testing.assert_array_equal(x["color"], [2, 0, 0, 0])
    # 2.0 equals the training int 2; 99 is unknown.
    np.testing.assert_array_equal(x["size"], [1, 0, 2, 3])
    assert x["color"].dtype == np.int64


def test_schema_frequencies_and_sizes():
    schema = Schema([CategoricalFeature("color")]).fit(_frame())
    assert schema.vocabulary_size("color") == 4
    np.testing.assert_array_equal(schema.frequencies("color"), [1, 3, 2, 1])
    assert schema.frequencies("color").sum() == len(_frame())


# -------------------------------------------------------------------------------------------- multi-hot
def test_multi_hot_padding_and_learned_max_length():
    f = MultiHotFeature("tags")
    f.fit(_frame()["tags"])
    assert f.max_length == 3
    assert f.vocabulary.values == ["b", "a", "c", "d"]
    assert f.vocabulary.counts == [0, 4, 3, 1, 1]
    out = f.encode(_frame()["tags"])
    expected = [[2, 1, -1], [1, -1, -1], [3, 1, 2], [-1, -1, -1], [-1, -1, -1], [1, 4, -1], [2, -1, -1]]
    np.testing.assert_array_equal(out, expected)
    assert PADDING_ID == -1


def test_multi_hot_max_length_cut_lists_and_unknown():
    f = MultiHotFeature("tags", max_length=2, separator=",")
    f.fit(pd.Series(["x,y,z", "y"]))
    out = f.encode(pd.Series(["z,q,y", ["y", "x"], None]))
    np.testing.assert_array_equal(out, [[3, 0], [1, 2], [-1, -1]])


# ---------------------------------------------------------------------------------------------- numeric
@pytest.mark.parametrize("transform", [None, "log", "standardize", "log_standardize"])
def test_numeric_transforms_match_numpy(transform):
    df = _frame()
    f = NumericFeature("price", transform=transform)
    f.fit(df["price"])
    x = df["price"].to_numpy()
    expected = x.copy()
    if transform in ("log", "log_standardize"):
        expected = np.sign(expected) * np.log1p(np.abs(expected))
    if transform in ("standardize", "log_standardize"):
        expected = (expected - expected.mean()) / expected.std()
    out = f.encode(df["price"])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_numeric_fill_value_replaces_missing():
    s = pd.Series([1.0, np.nan, 3.0, ""], dtype=object)
    f = NumericFeature("n", fill_value=-1.0, transform="standardize")
    f.fit(s)
    filled = np.array([1.0, -1.0, 3.0, -1.0])
    np.testing.assert_allclose(f.encode(s), (filled - filled.mean()) / filled.std(), rtol=1e-6)


def _bucket(values, edges):
    return 1 + np.searchsorted(edges, values, side="right")


@pytest.mark.parametrize("method", ["equal_width", "equal_frequency", "log"])
def test_discretizers_match_numpy(method):
    rng = np.random.default_rng(3)
    values = np.floor(np.exp(rng.normal(2.0, 1.5, 211)))
    values[[5, 17]] = np.nan
    series = pd.Series(values)
    f = NumericFeature("n", discretize=method, num_buckets=7)
    f.fit(series)
    present = values[~np.isnan(values)]
    if method == "equal_width":
        edges = np.linspace(present.min(), present.max(), 8)[1:-1]
        mapped = values
    elif method == "equal_frequency":
        edges = np.unique(np.quantile(present, np.linspace(0, 1, 8)[1:-1]))
        mapped = values
    else:
        logged = np.log1p(present)
        edges = np.linspace(logged.min(), logged.max(), 8)[1:-1]
        mapped = np.log1p(values)
    np.testing.assert_allclose(f.stats["boundaries"], edges)
    ids = f.encode(series)
    expected = np.where(np.isnan(values), 0, _bucket(np.nan_to_num(mapped), edges))
    np.testing.assert_array_equal(ids, expected)
    assert ids.dtype == np.int64
    # Vocabulary: one id per bucket, OOV (id 0) counts the missing values.
    assert f.vocabulary.size == len(edges) + 2
    np.testing.assert_array_equal(f.vocabulary.frequencies(), np.bincount(expected, minlength=len(edges) + 2))
    assert f.vocabulary.counts[0] == 2


def test_discretizer_edge_value_goes_to_upper_bucket():
    f = NumericFeature("n", discretize="equal_width", num_buckets=4)
    f.fit(pd.Series([0.0, 4.0]))
    np.testing.assert_allclose(f.stats["boundaries"], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(f.encode(pd.Series([0.0, 0.99, 1.0, 3.5, 4.0, 9.0, -3.0])), [1, 1, 2, 4, 4, 4, 1])


# ------------------------------------------------------------------------------------------------ labels
def test_label_binary_and_threshold():
    np.testing.assert_array_equal(Label("c").encode(pd.Series([0, 1, 1.0])), [0, 1, 1])
    out = Label("r", threshold=4).encode(pd.Series([1, 3.5, 4, 4.5, 5]))
    np.testing.assert_array_equal(out, [0, 0, 1, 1, 1])
    assert out.dtype == np.float32


def test_label_multiclass_ratings_half_steps_give_five_classes():
    label = Label("r", "multiclass", num_classes=5, ratings=True)
    ratings = np.arange(1, 11) / 2.0  # 0.5 .. 5.0
    out = label.encode(pd.Series(ratings))
    np.testing.assert_array_equal(out, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    np.testing.assert_array_equal(out, np.floor(ratings - 0.5))  # ESAPN's rule
    np.testing.assert_array_equal(label.encode(pd.Series([1, 2, 3, 4, 5])), [0, 1, 2, 3, 4])
    assert out.dtype == np.int64


def test_label_multiclass_plain_and_regression():
    np.testing.assert_array_equal(Label("k", "multiclass", num_classes=3).encode(pd.Series([2, 0, 1])), [2, 0, 1])
    out = Label("r", "regression").encode(pd.Series([1.5, 4]))
    np.testing.assert_allclose(out, [1.5, 4.0])
    assert out.dtype == np.float32


# ------------------------------------------------------------------------------------------------- JSON
def _full_schema():
    return Schema(
        [
            CategoricalFeature("color", min_count=1),
            CategoricalFeature("size_id", column="size", max_size=3),
            MultiHotFeature("tags", combiner="sqrtn"),
            NumericFeature("price", transform="log_standardize"),
            NumericFeature("price_bucket", column="price", discretize="equal_frequency", num_buckets=3),
        ],
        label=Label("click"),
        time_column="size",
    )


def test_json_round_trip_gives_identical_transform(tmp_path):
    df = _frame()
    schema = _full_schema().fit(df)
    x, y = schema.transform(df)
    again = Schema.from_json(schema.to_json())
    path = tmp_path / "schema.json"
    schema.save(path)
    loaded = Schema.load(path)
    for other in (again, loaded):
        x2, y2 = other.transform(df)
        assert set(x2) == set(x)
        for name in x:
            np.testing.assert_array_equal(x2[name], x[name])
            assert x2[name].dtype == x[name].dtype
        np.testing.assert_array_equal(y2, y)
        assert other.time_column == "size"
        assert other.input_spec() == schema.input_spec()
        np.testing.assert_array_equal(other.frequencies("color"), schema.frequencies("color"))
    assert schema.to_dict() == again.to_dict()


def test_input_spec_and_feature_groups():
    schema = _full_schema().fit(_frame())
    spec = schema.input_spec()
    assert spec["color"] == ((), "int64")
    assert spec["tags"] == ((3,), "int64")
    assert spec["price"] == ((), "float32")
    assert spec["price_bucket"] == ((), "int64")
    assert [f.name for f in schema.dense_features] == ["price"]
    assert schema.combiner("tags") == "sqrtn" and schema.combiner("color") is None
    assert schema.task == "binary"
    assert "color(4 ids)" in repr(schema)


def test_schema_from_dataframe():
    schema = schema_from_dataframe(_frame(), label="click", categorical=["color"], numeric=["price"],
                                   multi_hot=["tags"]).fit(_frame())
    assert schema.names == ["color", "tags", "price"]
    x, y = schema.transform(_frame())
    assert y.tolist() == [1, 0, 1, 0, 0, 1, 0]


def test_transform_without_label_column():
    schema = Schema([CategoricalFeature("color")], label=Label("click")).fit(_frame())
    x, y = schema.transform(_frame().drop(columns=["click"]))
    assert y is None
    with pytest.raises(DataError, match="missing column 'click' for label 'click'"):
        schema.transform(_frame().drop(columns=["click"]), with_label=True)


def test_docstring_examples_run():
    result = doctest.testmod(schema_module, extraglobs={"pd": pd}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------------------------------- bad input
def test_missing_column_names_feature_and_column():
    schema = Schema([CategoricalFeature("size_id", column="sz")])
    with pytest.raises(DataError, match=r"missing column 'sz' for feature 'size_id'.*columns \['color'"):
        schema.fit(_frame())


def test_not_a_dataframe():
    with pytest.raises(DataError, match="expected a pandas DataFrame. Received: dict"):
        Schema([CategoricalFeature("a")]).fit({"a": [1]})


def test_numeric_column_of_strings_names_field_and_value():
    df = pd.DataFrame({"price": ["1.5", "cheap", "2"]})
    with pytest.raises(DataError, match=r"price: value 'cheap' in row 1 of column 'price' is not a number"):
        Schema([NumericFeature("price")]).fit(df)


def test_numeric_column_of_wrong_dtype():
    df = pd.DataFrame({"when": pd.to_datetime(["2020-01-01", "2020-01-02"])})
    with pytest.raises(DataError, match=r"when: numeric feature column 'when' has dtype datetime64"):
        Schema([NumericFeature("when")]).fit(df)


def test_numeric_infinite_value():
    with pytest.raises(DataError, match=r"price: value inf in row 1 is infinite"):
        Schema([NumericFeature("price")]).fit(pd.DataFrame({"price": [1.0, np.inf]}))


def test_messages_name_rows_of_a_split_frame_as_plain_values():
    df = pd.DataFrame({"price": [1.0, np.nan], "click": [1, 7]}, index=[10, 11])
    with pytest.raises(DataError, match=r"price: missing value \(NaN\) in row 11 of column 'price'"):
        Schema([NumericFeature("price")]).fit(df)
    with pytest.raises(DataError, match=r"label 'click': binary labels must be 0 or 1.*Received: 7.0 in row 11$"):
        Label("click").encode(df["click"])


def test_nan_without_fill_value():
    df = pd.DataFrame({"price": [1.0, np.nan]})
    with pytest.raises(DataError, match=r"price: missing value \(NaN\) in row 1 of column 'price'.*fill_value"):
        Schema([NumericFeature("price")]).fit(df)


def test_empty_dataset():
    empty = _frame().iloc[:0]
    with pytest.raises(DataError, match=r"cannot fit a Schema on an empty dataset \(0 rows\)"):
        Schema([CategoricalFeature("color")]).fit(empty)
    schema = Schema([CategoricalFeature("color")]).fit(_frame())
    with pytest.raises(DataError, match=r"cannot encode an empty dataset \(0 rows\)"):
        schema.transform(empty)


def test_unfitted_schema():
    schema = Schema([CategoricalFeature("color"), NumericFeature("price")])
    assert not schema.is_fitted
    with pytest.raises(DataError, match="not fitted"):
        schema.transform(_frame())
    with pytest.raises(DataError, match="feature 'color' has no vocabulary"):
        schema.vocabulary_size("color")
    assert not Schema.from_json(schema.to_json()).is_fitted


def test_binary_label_out_of_range():
    df = _frame().assign(click=[1, 0, 2, 0, 0, 1, 0])
    schema = Schema([CategoricalFeature("color")], label=Label("click")).fit(df)
    with pytest.raises(DataError, match=r"label 'click': binary labels must be 0 or 1.*Received: 2.0 in row 2"):
        schema.transform(df)


def test_label_not_a_number():
    with pytest.raises(DataError, match=r"label 'click': value 'yes' in row 1 is not a number"):
        Label("click").encode(pd.Series(["1", "yes"]))


def test_multiclass_rating_out_of_range():
    label = Label("rating", "multiclass", num_classes=5, ratings=True)
    with pytest.raises(DataError, match=r"label 'rating': class must be an integer in \[0, 5\). Received: 0.0"):
        label.encode(pd.Series([3, 0]))
    with pytest.raises(DataError, match=r"Received: 6.0 in row 0"):
        label.encode(pd.Series([6]))


@pytest.mark.parametrize("kwargs, match", [
    ({"min_count": 0}, r"color: min_count must be an int >= 1. Received: min_count=0"),
    ({"min_count": 1.5}, r"color: min_count must be an int >= 1. Received: min_count=1.5"),
    ({"max_size": 1}, r"color: max_size must be an int >= 2 or None. Received: max_size=1"),
])
def test_bad_categorical_arguments(kwargs, match):
    with pytest.raises(DataError, match=match):
        CategoricalFeature("color", **kwargs)


@pytest.mark.parametrize("make, match", [
    (lambda: NumericFeature("p", transform="sqrt"), r"p: transform must be one of .*Received: transform='sqrt'"),
    (lambda: NumericFeature("p", discretize="kmeans"), r"p: discretize must be one of .*Received: discretize='kmeans'"),
    (lambda: NumericFeature("p", num_buckets=0), r"p: num_buckets must be an int >= 1. Received: num_buckets=0"),
    (lambda: MultiHotFeature("t", combiner="max"), r"t: combiner must be one of .*Received: combiner='max'"),
    (lambda: Label("c", kind="ranking"), r"label kind must be one of .*Received: kind='ranking'"),
    (lambda: Label("c", kind="multiclass"), r"multiclass label needs num_classes >= 2. Received: num_classes=None"),
    (lambda: Schema([]), r"a Schema needs at least one feature"),
    (lambda: Schema([CategoricalFeature("a"), NumericFeature("a")]), r"feature names must be unique.*\['a'\]"),
    (lambda: Schema.from_dict({"format": "other"}), r"not a tfemb schema: format='other'"),
])
def test_bad_arguments(make, match):
    with pytest.raises(DataError, match=match):
        make()


def test_discretize_all_missing():
    with pytest.raises(DataError, match="p: no non-missing values to discretise"):
        NumericFeature("p", discretize="log").fit(pd.Series([np.nan, np.nan]))
