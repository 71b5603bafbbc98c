"""Bad input to the Schema and the readers: a DataError naming the field and the value, nothing lost silently."""

import json

import numpy as np
import pandas as pd
import pytest

from tfemb.data.readers import (
    CRITEO_COLUMNS,
    read_criteo,
    read_criteo_csv,
    read_movielens_1m,
    read_movielens_100k,
    read_movielens_latest,
)
from tfemb.data.schema import CategoricalFeature, Label, MultiHotFeature, NumericFeature, Schema
from tfemb.errors import DataError


# ------------------------------------------------------------------------------ vocabulary key types
def _fitted(values):
    return Schema([CategoricalFeature("user")]).fit(pd.DataFrame({"user": values}))


def test_int_vocabulary_given_strings_names_feature_value_and_key_type():
    schema = _fitted([1, 2, 3, 1])
    as_text = pd.DataFrame({"user": ["3", "1"]})  # e.g. read with dtype=str
    with pytest.raises(DataError, match=r"user: value '3' \(str\) in row 0 of column 'user' does not match the "
                                        r"vocabulary, whose keys are ints"):
        schema.transform(as_text)
    with pytest.raises(DataError, match=r"user: value 'x' \(str\) in row 1 .*keys are ints"):
        schema.transform(pd.DataFrame({"user": [1, "x"]}))  # object column: the first bad element
    with pytest.raises(DataError, match=r"user: value 3.5 \(float\) in row 1 .*keys are ints"):
        schema.transform(pd.DataFrame({"user": [1.0, 3.5]}))
    with pytest.raises(DataError, match=r"user: value True \(bool\) in row 0 .*keys are ints"):
        schema.transform(pd.DataFrame({"user": [True, False]}))


def test_str_vocabulary_given_ints_names_feature_value_and_key_type():
    schema = _fitted(["1", "2", "3"])
    with pytest.raises(DataError, match=r"user: value 2 \(int\) in row 0 of column 'user' does not match the "
                                        r"vocabulary, whose keys are strs"):
        schema.transform(pd.DataFrame({"user": [2, 3]}))
    with pytest.raises(DataError, match=r"user: value 2.0 \(float\) in row 1 .*keys are strs"):
        schema.transform(pd.DataFrame({"user": [np.nan, 2.0]}))  # int ids made float64 by a NaN
    with pytest.raises(DataError, match=r"user: value 2 \(int\) in row 7 .*keys are strs"):
        schema.transform(pd.DataFrame({"user": pd.array([None, 2], dtype="Int64")}, index=[6, 7]))


def test_missing_unseen_and_integral_float_values_keep_working():
    schema = _fitted([1, 2, 2, 3])
    x, _ = schema.transform(pd.DataFrame({"user": [2.0, np.nan, 99.0, 1.0]}))  # float64 from a NaN
    assert x["user"].tolist() == [1, 0, 0, 2]
    x, _ = schema.transform(pd.DataFrame({"user": [2, 99, None, 3]}, dtype=object))
    assert x["user"].tolist() == [1, 0, 0, 3]
    x, _ = schema.transform(pd.DataFrame({"user": pd.array([2, None], dtype="Int64")}))
    assert x["user"].tolist() == [1, 0]
    schema = _fitted(["a", "b", "b"])
    x, _ = schema.transform(pd.DataFrame({"user": ["b", "zzz", None, np.nan, ""]}))
    assert x["user"].tolist() == [1, 0, 0, 0, 0]
    x, _ = schema.transform(pd.DataFrame({"user": [np.nan, np.nan]}))  # an all-missing column is float64
    assert x["user"].tolist() == [0, 0]


def test_vocabularies_of_mixed_or_float_keys_are_not_checked():
    mixed = _fitted(["1", 1, "a"])
    assert mixed.transform(pd.DataFrame({"user": [1, "a", "zz", 7]}))[0]["user"].tolist()[:2] != [0, 0]
    floats = _fitted([1.5, 2.5, 2.5])  # non-integral floats are str keys ("1.5")
    assert floats.transform(pd.DataFrame({"user": [2.5, 9.5]}))[0]["user"].tolist() == [1, 0]


def test_key_type_check_after_json_round_trip(tmp_path):
    path = tmp_path / "schema.json"
    _fitted([10, 20, 20]).save(path)
    with pytest.raises(DataError, match=r"user: value '20' \(str\) .*keys are ints"):
        Schema.load(path).transform(pd.DataFrame({"user": ["20"]}))
    assert Schema.load(path).transform(pd.DataFrame({"user": [20, 30]}))[0]["user"].tolist() == [1, 0]


# -------------------------------------------------------------------------------------- multi-hot arguments
@pytest.mark.parametrize("kwargs, match", [
    ({"max_length": 0}, r"genres: max_length must be an int >= 1 or None. Received: max_length=0"),
    ({"max_length": -1}, r"genres: max_length must be an int >= 1 or None. Received: max_length=-1"),
    ({"max_length": "3"}, r"genres: max_length must be an int >= 1 or None. Received: max_length='3'"),
    ({"max_length": 2.0}, r"genres: max_length must be an int >= 1 or None. Received: max_length=2.0"),
    ({"separator": ""}, r"genres: separator must be a non-empty string. Received: separator=''"),
    ({"separator": None}, r"genres: separator must be a non-empty string. Received: separator=None"),
    ({"min_count": 0}, r"genres: min_count must be an int >= 1. Received: min_count=0"),
    ({"min_count": 1.5}, r"genres: min_count must be an int >= 1. Received: min_count=1.5"),
])
def test_bad_multi_hot_arguments(kwargs, match):
    with pytest.raises(DataError, match=match):
        MultiHotFeature("genres", **kwargs)


def test_multi_hot_valid_arguments_still_work():
    df = pd.DataFrame({"genres": ["a,b,c", "b"]})
    schema = Schema([MultiHotFeature("genres", separator=",", max_length=np.int64(2), min_count=1)]).fit(df)
    assert schema.transform(df)[0]["genres"].shape == (2, 2)


# -------------------------------------------------------------------------------------------------- labels
def test_infinite_label_values_name_row_and_value():
    df = pd.DataFrame({"rating": [4.0, np.inf]}, index=[5, 6])
    with pytest.raises(DataError, match=r"label 'rating': value inf in row 6 is infinite"):
        Label("rating", kind="regression").encode(df["rating"])
    with pytest.raises(DataError, match=r"label 'rating': value -inf in row 5 is infinite"):
        Label("rating", threshold=4.0).encode(pd.Series([-np.inf, 1.0], index=[5, 6]))


@pytest.mark.parametrize("threshold", ["4", True, float("nan"), float("inf"), [4]])
def test_bad_label_threshold(threshold):
    with pytest.raises(DataError, match=r"label 'rating': threshold must be a finite number or None. "
                                        r"Received: threshold="):
        Label("rating", threshold=threshold)


def test_numeric_label_thresholds_still_work():
    for threshold in (4, 3.5, np.float64(4.0), np.int64(4)):
        y = Label("rating", threshold=threshold).encode(pd.Series([3.5, 4.0]))
        assert y.tolist() == [float(3.5 >= threshold), 1.0]


# ------------------------------------------------------------------------------------------ schema files
def _schema_dict():
    df = pd.DataFrame({"user": [1, 2], "price": [1.0, 2.0], "click": [0, 1]})
    schema = Schema([CategoricalFeature("user"), NumericFeature("price")], Label("click")).fit(df)
    return schema.to_dict()


def test_load_truncated_schema_file_names_the_file(tmp_path):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(_schema_dict())[:100])
    with pytest.raises(DataError, match=r"schema.json: not valid JSON \(truncated\?\): .*line 1, column"):
        Schema.load(path)
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(DataError, match=r"schema.json: not a tfemb schema: cannot decode the text as utf-8"):
        Schema.load(path)


@pytest.mark.parametrize("edit, match", [
    (lambda d: [d], r"not a tfemb schema: expected a JSON object. Received: a list"),
    (lambda d: {k: v for k, v in d.items() if k != "features"},
     r"the schema has no 'features' list. Received: features=None"),
    (lambda d: {**d, "features": [{**d["features"][0], "typo": 1}]},
     r"categorical feature 'user': unknown keys \['typo'\]; expected keys among \['name'"),
    (lambda d: {**d, "features": [{k: v for k, v in d["features"][0].items() if k != "name"}]},
     r"categorical feature None: missing key 'name'"),
    (lambda d: {**d, "features": [{**d["features"][0], "kind": "dense"}]},
     r"unknown feature kind 'dense' for feature 'user'"),
    (lambda d: {**d, "features": ["user"]}, r"feature 0 is not a JSON object. Received: 'user'"),
    (lambda d: {**d, "features": [{**d["features"][0], "vocabulary": {"values": [1]}}]},
     r"feature 'user': the vocabulary must be .*Received: \{'values': \[1\]\}"),
    (lambda d: {**d, "label": {**d["label"], "colum": "click"}}, r"label: unknown keys \['colum'\]"),
    (lambda d: {**d, "label": {**d["label"], "threshold": "4"}}, r"label 'click': threshold must be a finite"),
    (lambda d: {**d, "extra": 1}, r"unknown schema keys \['extra'\]"),
])
def test_malformed_schema_json_names_the_file_and_the_fault(tmp_path, edit, match):
    with pytest.raises(DataError, match=match):
        Schema.from_dict(edit(_schema_dict()))
    path = tmp_path / "bad_schema.json"
    path.write_text(json.dumps(edit(_schema_dict())))
    with pytest.raises(DataError, match=r"bad_schema.json: " + match):
        Schema.load(path)


def test_from_json_without_a_file():
    with pytest.raises(DataError, match=r"^not valid JSON \(truncated\?\)"):
        Schema.from_json('{"format": "tfemb.Schema/1", "feat')


# -------------------------------------------------------------------------------------- reader line numbers
GENRES = ["unknown", "Action", "Drama"]


def _write_100k(folder, data):
    folder.mkdir(exist_ok=True)
    (folder / "u.data").write_text(data)
    (folder / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|T8H1N\n")
    (folder / "u.item").write_text("10|A (1995)|01-Jan-1995||http://x|0|1|0\n20|B (1996)|||http://y|0|0|1\n")
    (folder / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(GENRES)) + "\n")
    return folder


def test_movielens_100k_line_numbers_count_blank_lines(tmp_path):
    ok = "1\t10\t5\t881250949\n"
    folder = _write_100k(tmp_path / "ml", ok + "\n\n" + ok + "7\t20\t3\t891717742\n")
    with pytest.raises(DataError, match=r"u.data: line 5 refers to user_id=7, which u.user does not contain"):
        read_movielens_100k(folder)
    _write_100k(folder, ok + "\n" + ok + "\r\n" + "2\tx\t3\t891717742\n")
    with pytest.raises(DataError, match=r"u.data: line 5: item_id must be an integer. Received: 'x'"):
        read_movielens_100k(folder)
    _write_100k(folder, "\n" + ok + "\n" + "2\t20\t9\t891717742\n")
    with pytest.raises(DataError, match=r"u.data: line 4: rating must be in \[1, 5\] .*Received: 9.0"):
        read_movielens_100k(folder)


def test_criteo_line_numbers_count_blank_lines(tmp_path):
    row = "\t".join(["1"] + ["2"] * 13 + ["abcd1234"] * 26)
    bad = "\t".join(["2"] + ["2"] * 13 + ["abcd1234"] * 26)
    path = tmp_path / "train.txt"
    path.write_text(row + "\n\n\n" + row + "\n" + bad + "\n")
    with pytest.raises(DataError, match=r"train.txt: line 5: label must be 0 or 1. Received: 2.0"):
        read_criteo(path)
    path.write_text(",".join(CRITEO_COLUMNS) + "\n" + row.replace("\t", ",") + "\n\n" + bad.replace("\t", ",") + "\n")
    with pytest.raises(DataError, match=r"train.txt: line 4: label must be 0 or 1. Received: 2.0"):
        read_criteo_csv(path)


def _write_latest(folder, ratings):
    folder.mkdir(exist_ok=True)
    (folder / "ratings.csv").write_text(ratings)
    (folder / "movies.csv").write_text("movieId,title,genres\n1,A (1995),Drama\n2,B (1996),Comedy\n")
    return folder


def test_movielens_latest_line_numbers_count_the_header_and_blank_lines(tmp_path):
    head = "userId,movieId,rating,timestamp\n"
    folder = _write_latest(tmp_path / "ml", head + "1,1,4.0,964982703\n\n1,9,3.0,964982703\n")
    with pytest.raises(DataError, match=r"ratings.csv: line 4 refers to item_id=9, which movies.csv does not"):
        read_movielens_latest(folder)


# ------------------------------------------------------------------------------------ truncated last lines
def test_movielens_100k_cut_inside_the_last_field(tmp_path):
    folder = _write_100k(tmp_path / "ml", "1\t10\t5\t881250949\n2\t20\t3\t8917")  # cut mid-timestamp
    with pytest.raises(DataError, match=r"u.data: line 2: the file ends without a newline: truncated\?"):
        read_movielens_100k(folder)
    (folder / "u.data").write_text("1\t10\t5\t881250949\n2\t20\t3\t8917\n")
    assert len(read_movielens_100k(folder)) == 2  # the same rows with their line end load
    (folder / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|T8H")
    with pytest.raises(DataError, match=r"u.user: line 2: the file ends without a newline"):
        read_movielens_100k(folder)


def test_movielens_1m_and_latest_cut_inside_the_last_field(tmp_path):
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    (folder / "ratings.dat").write_text("1::1193::5::978300760\n1::1193::5::97830")
    (folder / "users.dat").write_text("1::F::1::10::48067\n")
    (folder / "movies.dat").write_text("1193::One Flew (1975)::Drama\n")
    with pytest.raises(DataError, match=r"ratings.dat: line 2: the file ends without a newline: truncated\?"):
        read_movielens_1m(folder)
    folder = _write_latest(tmp_path / "ml-latest", "userId,movieId,rating,timestamp\r\n1,1,4.0,9649827")
    with pytest.raises(DataError, match=r"ratings.csv: line 2: the file ends without a newline: truncated\?"):
        read_movielens_latest(folder)


def test_criteo_cut_inside_the_last_field(tmp_path):
    row = "\t".join(["1"] + ["2"] * 13 + ["abcd1234"] * 26)
    path = tmp_path / "train.txt"
    path.write_text(row + "\n" + row[:-3])  # 40 fields, the last one cut
    with pytest.raises(DataError, match=r"train.txt: line 2: the file ends without a newline: truncated\?"):
        read_criteo(path)
    path.write_text(row + "\n" + row + "\n" + row[:-3])
    assert len(read_criteo(path, nrows=2)) == 2  # the cut line is not read
    path.write_text(",".join(CRITEO_COLUMNS) + "\n" + row.replace("\t", ",")[:-3])
    with pytest.raises(DataError, match=r"train.txt: line 2: the file ends without a newline: truncated\?"):
        read_criteo_csv(path)


# ---------------------------------------------------------------------------------------- rating ranges
def test_movielens_ratings_outside_the_documented_range(tmp_path):
    folder = _write_100k(tmp_path / "ml", "1\t10\t5\t881250949\n2\t20\t0\t891717742\n")
    with pytest.raises(DataError, match=r"u.data: line 2: rating must be in \[1, 5\] .*Received: 0.0"):
        read_movielens_100k(folder)
    (folder / "u.data").write_text("1\t10\t5\t881250949\n2\t20\t\t891717742\n")
    with pytest.raises(DataError, match=r"u.data: line 2: rating must be in \[1, 5\] .*Received: nothing"):
        read_movielens_100k(folder)
    head = "userId,movieId,rating,timestamp\n"
    folder = _write_latest(tmp_path / "ml-latest", head + "1,1,0.5,1\n1,2,5.0,2\n2,1,5.5,3\n")
    with pytest.raises(DataError, match=r"ratings.csv: line 4: rating must be in \[0.5, 5.0\] .*Received: 5.5"):
        read_movielens_latest(folder)
    _write_latest(folder, head + "1,1,0.0,1\n")
    with pytest.raises(DataError, match=r"ratings.csv: line 2: rating must be in \[0.5, 5.0\] .*Received: 0.0"):
        read_movielens_latest(folder)
    _write_latest(folder, head + "1,1,0.5,1\n1,2,5.0,2\n")
    assert read_movielens_latest(folder)["rating"].tolist() == [0.5, 5.0]
