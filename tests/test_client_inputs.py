"""``Client.predict`` sends raw rows the way ``load_export(path).predict(rows)`` calls the export.

A tiny untrained DeepFM (string and int categorical, multi-hot, numeric with a fill value) is exported and
served by ``LocalServer`` on 127.0.0.1; for REST columnar, REST row and gRPC, the client's predictions on
frames with missing categorical values (NaN, None, pd.NA), an int categorical read as float64 with a NaN,
multi-hot list cells and an extra label column must equal the export's own.
"""

import math

import re

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tfemb.data.schema import CategoricalFeature, Label, MultiHotFeature, NumericFeature, Schema, _as_key
from tfemb.errors import DataError
from tfemb.export import export_saved_model, load_export, raw_inputs
from tfemb.export.saved_model import MISSING_INT
from tfemb.models import DeepFM
from tfemb.serving import Client, ServingError
from tfemb.serving import client as client_module
from tfemb.serving.server import LocalServer, ModelRegistry

KINDS = [{"format": "columnar"}, {"format": "row"}, {"transport": "grpc"}]
KIND_IDS = ["rest-columnar", "rest-row", "grpc"]


def _frame(n=120, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "c1": rng.choice(list("abcdef"), n),
        "c2": rng.integers(100, 108, n),
        "tags": ["|".join(map(str, rng.choice(5, rng.integers(0, 4), replace=False))) for _ in range(n)],
        "n1": np.round(rng.normal(size=n), 3).astype(np.float32),
        "click": rng.integers(0, 2, n),
    })


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    frame = _frame()
    schema = Schema([CategoricalFeature("c1"), CategoricalFeature("c2"), MultiHotFeature("tags", max_length=3),
                     NumericFeature("n1", transform="standardize", fill_value=0.25)], Label("click")).fit(frame)
    model = DeepFM(schema, embedding_dim=4, dnn_units=(5,))
    model.build()
    rng = np.random.default_rng(1)
    for weight in model.weights:  # untrained but non-trivial: every input moves the output
        dtype = tf.as_dtype(weight.dtype)
        if dtype.is_floating:
            weight.assign(rng.normal(0.0, 0.5, tuple(weight.shape)).astype(dtype.as_numpy_dtype))
    export_dir = str(tmp_path_factory.mktemp("client_inputs") / "ctr")
    export_saved_model(model, export_dir, version=1)
    loaded = load_export(export_dir)
    assert {n: s.dtype.name for n, s in loaded.signatures["serving_default"].structured_input_signature[1].items()} \
        == {"c1": "string", "c2": "int64", "tags": "string", "n1": "float32"}
    srv = LocalServer(ModelRegistry(export_dir, poll_seconds=0), host="127.0.0.1", port=0, grpc_port=0).start()
    client = Client(url=srv.rest_url, grpc_target=srv.grpc_target, model_name="ctr", retries=0)
    try:
        yield frame, loaded, client
    finally:
        client.close()
        srv.stop()


def _missing_categorical(q):
    q["c1"] = q["c1"].astype(object)
    q.loc[1, "c1"] = np.nan
    q.loc[2, "c1"] = None
    q.loc[3, "c1"] = "zzz"  # unknown -> OOV
    return q


def _pd_na(q):  # pd.NA in a pandas StringDtype column and in a nullable Int64 column
    q = q.astype({"c1": "string", "c2": "Int64"})
    q.loc[1, "c1"] = pd.NA
    q.loc[4, "c2"] = pd.NA
    return q


def _int_as_float(q):  # as pandas reads an int column holding a NaN
    q["c2"] = q["c2"].astype("float64")
    q.loc[4, "c2"] = np.nan
    q.loc[5, "c2"] = 999.0  # unknown -> OOV
    q.loc[6, "n1"] = np.nan  # -> fill_value
    return q


def _multi_hot_lists(q):
    q["tags"] = [[int(t) for t in s.split("|") if t] for s in q["tags"]]
    q.at[7, "tags"] = []
    q.at[6, "tags"] = [3, 9, 1, 0]  # unknown 9, cut at max_length
    return q


def _everything(q):
    return _multi_hot_lists(_int_as_float(_missing_categorical(q)))


# Every frame keeps the label column "click" (test.head(k) as it is).
SCENARIOS = {"missing_categorical": _missing_categorical, "pd_na": _pd_na, "int_as_float_nan": _int_as_float,
             "multi_hot_lists": _multi_hot_lists, "extra_label_only": lambda q: q, "everything": _everything}


def _assert_same(got, want):
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(np.asarray(got[name], dtype=np.float64), want[name], rtol=1e-6, atol=1e-7,
                                   err_msg=name)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("kwargs", KINDS, ids=KIND_IDS)
def test_client_predicts_raw_rows_like_the_export(served, kwargs, scenario):
    frame, loaded, client = served
    query = SCENARIOS[scenario](frame.head(8).copy())
    assert "click" in query.columns
    want = loaded.predict(query)
    assert want["probability"].shape == (8,) and np.all(np.isfinite(want["probability"]))
    if scenario not in ("extra_label_only", "multi_hot_lists"):  # the missing values are OOV / filled
        assert not np.allclose(want["probability"], loaded.predict(frame.head(8))["probability"])
    _assert_same(client.predict(query, **kwargs), want)
    # A dict of columns and row dicts, label included.
    _assert_same(client.predict({name: query[name].tolist() for name in query.columns}, **kwargs), want)
    _assert_same(client.predict(query.to_dict("records"), **kwargs), want)
    # What raw_inputs builds ("a|b" multi-hot text, MISSING_INT) still goes as it is.
    _assert_same(client.predict(raw_inputs(loaded.schema, query, loaded.input_names()), **kwargs), want)


def test_client_keeps_sending_what_the_server_should_refuse(served):
    frame, _, client = served
    rows = frame.head(3).drop(columns=["click"])
    for kwargs in KINDS:  # a missing input: the server's error names it
        with pytest.raises(ServingError, match="c2"):
            client.predict(rows.drop(columns=["c2"]), **kwargs)
    with pytest.raises(ValueError, match=r"takes inputs \['c1', 'c2', 'n1', 'tags'\]; the data has none"):
        client.predict({"user": ["a"]})
    bad = rows.astype({"n1": object})
    bad.loc[0, "n1"] = "old"
    with pytest.raises(ServingError, match='"old"') as info:
        client.predict(bad)
    assert info.value.http_status == 400
    with pytest.raises(ValueError, match="must be numeric"):
        client.predict(bad, transport="grpc")


def test_separators_join_list_cells():
    column = client_module._raw_column("t", [["a", "b"], [], None, "x;y", [1, 2.0, np.nan, ""]], "DT_STRING", ";")
    assert column.tolist() == ["a;b", "", "", "x;y", "1;2"]
    client = Client(url="http://127.0.0.1:1", model_name="m", separators={"t": ";"})
    assert (client._separator("t"), client._separator("u")) == (";", "|")
    assert Client(url="http://127.0.0.1:1", model_name="m", separators=",")._separator("t") == ","


def test_conversions_follow_the_exports_rules():
    """The client restates raw_inputs' rules (tfemb.export loads TensorFlow; REST must not): both must agree."""
    assert client_module.MISSING_INT == MISSING_INT
    values = [0, 7, -3, 2.0, 2.5, float("nan"), None, pd.NA, "", "x", "12", True, np.int64(5), np.float32(4.0),
              np.float64(1e20), b"bytes", np.str_("s")]
    for value in values:
        assert client_module._key(value) == _as_key(value), repr(value)

    schema = Schema([CategoricalFeature("s"), CategoricalFeature("i"), MultiHotFeature("m"),
                     NumericFeature("x", fill_value=0.0)]).fit(pd.DataFrame({
                         "s": ["a", "b", "a"], "i": [1, 2, 3], "m": ["a|b", "c", ""], "x": [0.5, 1.0, 2.0]}))
    rows = pd.DataFrame({
        "s": pd.array(["a", pd.NA, "zz", None, "b"], dtype="string"),
        "i": [1.0, np.nan, 4.0, 3.0, -0.0],
        "m": [["a", "b"], [], None, "c|a", [1, np.nan]],
        "x": [0.5, np.nan, 3, 1e10, -2.0],
    })
    want = raw_inputs(schema, rows)
    dtypes = {"s": "DT_STRING", "i": "DT_INT64", "m": "DT_STRING", "x": "DT_FLOAT"}
    for name, dtype in dtypes.items():
        for values in (rows[name].to_numpy(), rows[name].tolist()):
            got = client_module._raw_column(name, values, dtype, "|")
            assert got.dtype == want[name].dtype, name
            np.testing.assert_array_equal(got, want[name], err_msg=name)
    # A value for the int vocabulary that is no integer (text from a CSV read as str, 2.5) is an error in both,
    # as in Schema.transform: it would map to OOV silently.
    for bad, shown in (([1, "12"], "'12' (str) in row 1"), ([2.5, 1.0], "2.5 (float) in row 0")):
        with pytest.raises(DataError, match=re.escape(f"feature 'i': value {shown} is not an integer")):
            raw_inputs(schema, {**rows.head(2).to_dict("list"), "i": bad})
        with pytest.raises(ValueError, match=re.escape(f"input 'i': value {shown} is not an integer")):
            client_module._raw_column("i", np.asarray(bad, dtype=object if isinstance(bad[1], str) else float),
                                      "DT_INT64", "|")
