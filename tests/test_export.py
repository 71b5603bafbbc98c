"""Tests of tfemb.export: SavedModels for TF Serving from any embedding scheme.

For every scheme (fixed, hashing, QR mult/add/concat, double hashing, mixed dimension, PEP) a tiny DeepFM is
exported and reloaded; the ``serving_default`` signature (raw values: unknown strings and ints, empty and
over-long multi-hot lists, missing numbers, values on bucket boundaries) and the ``encoded`` signature (ids)
must equal the Keras model within 1e-5, at two batch sizes and in a fresh process. int8 / float16 tables are
checked element-wise against their stated bounds, against the Keras model with the same dequantised tables
(1e-5), and against the float model through a first-order bound. Also: only core ops (a ``tf.py_function`` and
an unknown op are caught), warm-up records, atomic versions, partial / corrupt exports, the report and
``tfemb inspect``. Runs under Keras 3 and, with TF_USE_LEGACY_KERAS=1, Keras 2.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tfemb import cli
from tfemb.data.schema import CategoricalFeature, Label, MultiHotFeature, NumericFeature, Schema
from tfemb.errors import DataError
from tfemb.export import (
    ENCODED_SIGNATURE, RAW_SIGNATURE, ExportError, UnsupportedOpsError, check_ops,
    element_error_bound, export_saved_model, inspect_export, list_ops, list_versions, load_export, next_version,
    quantize_scheme, raw_inputs, read_warmup_requests, unsupported_ops,
)
from tfemb.export.ops_check import read_saved_model_proto
from tfemb.export.quantize import (INT8_BLOCK, QuantizedTable, dequantized, gathered_tables, quantize_int,
                                   quantize_int8)
from tfemb.export.saved_model import MISSING_INT, vocabulary_keys
from tfemb.export.warmup import request_inputs
from tfemb.layers import FixedEmbedding, scheme_factory
from tfemb.models import DeepFM, FactorizationMachine, MatrixFactorization, NeuMF
from tfemb.models.cf_network import CFNetwork

ATOL = 1e-5
DIM = 6

#: The schemes every parity test runs; MD and PEP only when their layers exist.
SCHEMES = {
    "fixed": lambda: None,
    "hashing": lambda: scheme_factory("hashing", output_dim=DIM, num_buckets=5),
    "qr_mult": lambda: scheme_factory("qr", output_dim=DIM, num_buckets=3, operation="mult"),
    "qr_add": lambda: scheme_factory("qr", output_dim=DIM, num_buckets=3, operation="add"),
    "qr_concat": lambda: scheme_factory("qr", output_dim=DIM, num_buckets=3, operation="concat"),
    "double_hashing": lambda: scheme_factory("double_hashing", output_dim=DIM, num_hot=3, num_buckets=4),
    # The same scheme exported with each id's pair of rows stored (DoubleHashingEmbedding(compact_lookup=...)).
    "double_hashing_index": lambda: scheme_factory("double_hashing", output_dim=DIM, num_hot=3, num_buckets=4,
                                                   compact_lookup="index"),
    # MD keeping its blocks in the export (premultiplied only where smaller), as a larger table's export does,
    # and with the default "fast", which exports a table as small as these as one plain table.
    "md": lambda: scheme_factory("md", output_dim=DIM, num_blocks=2, compact_premultiply="auto"),
    "md_fast": lambda: scheme_factory("md", output_dim=DIM, num_blocks=2),
    "pep": lambda: scheme_factory("pep", output_dim=DIM, threshold_type="dimension"),
    # The same PEP tables exported in the slots layout (the fastest lookup, PEPEmbedding(compact_layout=...)).
    "pep_slots": lambda: scheme_factory("pep", output_dim=DIM, threshold_type="dimension", compact_layout="slots"),
    # DHE: no table, the network with its batch norms folded (the Box-Muller encoding: the more ops of the two).
    "dhe": lambda: scheme_factory("dhe", output_dim=DIM, num_hashes=16, hidden_units=[8, 8], distribution="gaussian"),
}
LAYER_MODULES = {"md": "tfemb.layers.mixed_dimension_embedding", "md_fast": "tfemb.layers.mixed_dimension_embedding",
                 "pep": "tfemb.layers.pep_embedding"}


def require_scheme(scheme):
    module = LAYER_MODULES.get(scheme)
    if module is not None and importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not in the tree yet (the {scheme} layer is written separately)")


# ------------------------------------------------------------------------------------------------ data
def _f32(values):
    return np.asarray(values, dtype=np.float32).astype(np.float64)  # exact in the float32 raw signature


def ctr_frame(n=300, seed=0):
    rng = np.random.default_rng(seed)
    n1 = _f32(np.round(rng.normal(size=n), 3))
    n1[::17] = np.nan  # missing values, filled by the schema
    return pd.DataFrame({
        "c1": rng.choice(list("abcdefg"), n),
        "c2": rng.integers(100, 111, n),
        "tags": ["|".join(map(str, rng.choice(5, rng.integers(0, 4), replace=False))) for _ in range(n)],
        "n1": n1,
        "n2": _f32(np.round(rng.exponential(size=n), 3)),
        "n3": _f32(np.concatenate([[0.0, 8.0], rng.integers(0, 9, n - 2)])),  # equal width: edges 2, 4, 6
        "n4": _f32(np.round(rng.normal(scale=20, size=n), 2)),
        "click": rng.integers(0, 2, n),
    })


def ctr_schema(df):
    return Schema([
        CategoricalFeature("c1"), CategoricalFeature("c2"), MultiHotFeature("tags", max_length=3),
        NumericFeature("n1", transform="standardize", fill_value=0.25), NumericFeature("n2", transform="log"),
        NumericFeature("n3", discretize="equal_width", num_buckets=4),
        NumericFeature("n4", discretize="log", num_buckets=3),
    ], Label("click")).fit(df)


def query_rows(df):
    edge = pd.DataFrame({
        "c1": ["zzz", "", "a", "b"],  # unknown and empty strings -> OOV
        "c2": [999, 100, 101, -5],  # unknown ints -> OOV
        "tags": ["1||9|2|3|4", "", "3", "4|4"],  # empty part, unknown 9, cut at 3; no values
        "n1": [np.nan, 0.5, -1.25, 3.0],  # NaN -> fill_value
        "n2": [0.0, 2.5, 1000.0, 0.125],
        "n3": [2.0, np.nan, -5.0, 6.0],  # on a boundary (side="right"), missing -> 0, below the range
        "n4": [-3.0, np.nan, 100.0, 0.0],
        "click": [0, 1, 0, 1],
    })
    return pd.concat([df.head(9), edge], ignore_index=True)


def cf_frame(n=400, seed=1):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "user_id": rng.integers(0, 30, n),
        "item_id": [f"i{k}" for k in rng.integers(0, 20, n)],
        "click": rng.integers(0, 2, n),
        "rating": rng.integers(1, 6, n),
    })


def cf_schema(df, label):
    return Schema([CategoricalFeature("user_id"), CategoricalFeature("item_id")], label).fit(df)


def randomize(model, seed=0):
    """Non-trivial weights everywhere (the initial linear terms are zero, the tables near zero)."""
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        dtype = tf.as_dtype(weight.dtype)
        if not dtype.is_floating:
            continue
        shape = tuple(weight.shape)
        values = rng.uniform(0.5, 1.5, shape) if "variance" in weight.name else rng.normal(0.0, 0.3, shape)
        weight.assign(values.astype(dtype.as_numpy_dtype))
    return model


def keras_outputs(model, rows):
    x, _ = model.schema.transform(rows)
    return model(x, training=False).numpy()


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


# ------------------------------------------------------------------------------------------------ fixtures
class Ctr:
    def __init__(self):
        self.frame = ctr_frame()
        self.schema = ctr_schema(self.frame)
        self.query = query_rows(self.frame)


@pytest.fixture(scope="module")
def ctr():
    return Ctr()


def deepfm(schema, scheme, seed=0):
    model = DeepFM(schema, embeddings=SCHEMES[scheme](), embedding_dim=DIM, dnn_units=(7,))
    model.build()
    return randomize(model, seed)


@pytest.fixture(scope="module")
def exports(ctr, tmp_path_factory):
    """``get(scheme, table_dtype=None) -> (model, version_dir)``: DeepFM exports, built once per module."""
    cache = {}
    root = tmp_path_factory.mktemp("exports")

    def get(scheme, table_dtype=None):
        require_scheme(scheme)
        if scheme not in cache:
            model = deepfm(ctr.schema, scheme)
            warm = ctr.query.head(5) if scheme == "fixed" else None
            cache[scheme] = (model, export_saved_model(model, root / scheme, warmup_rows=warm))
        if table_dtype is None:
            return cache[scheme]
        key = (scheme, table_dtype)
        if key not in cache:
            model = cache[scheme][0]
            cache[key] = (model, export_saved_model(model, root / f"{scheme}-{table_dtype}", table_dtype=table_dtype))
        return cache[key]

    return get


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_export_matches_keras_for_every_scheme(scheme, ctr, exports):
    model, path = exports(scheme)
    loaded = load_export(path)
    assert loaded.version == 1 and set(loaded.signatures) == {RAW_SIGNATURE, ENCODED_SIGNATURE}
    expected = keras_outputs(model, ctr.query)
    raw = loaded.predict(ctr.query)
    assert set(raw) == {"probability"} and raw["probability"].shape == (len(ctr.query),)
    assert max_diff(raw["probability"], expected) <= ATOL
    x, _ = ctr.schema.transform(ctr.query)
    assert max_diff(loaded.predict_encoded(x)["probability"], expected) <= ATOL
    # A second batch size: one row (an edge row: unknown values everywhere).
    one = loaded.predict(ctr.query.iloc[[9]])["probability"]
    assert one.shape == (1,) and abs(float(one[0]) - float(expected[9])) <= ATOL
    # PEP: the packed layouts, and (slots) tables that packing would not shrink by 25% exported dense.
    layouts = {type(model.embedding_layers[n].compact()).__name__ + ":" + getattr(
        model.embedding_layers[n].compact(), "layout", "") for n in model.embedding_names}
    if scheme == "pep":
        assert layouts == {"PackedEmbedding:bitmask"}
    if scheme == "pep_slots":
        assert layouts == {"PackedEmbedding:slots", "PackedEmbedding:dense"}
    if scheme == "double_hashing_index":
        assert layouts == {"IndexedRowsEmbedding:"}
    # The compact layers' size accounting is what the export stores (float32 tables).
    report = loaded.report
    for row in report["features"]:
        compact = model.embedding_layers[row["feature"]].compact()
        assert row["parameters"] == compact.parameter_count()
        assert row["bytes"] == compact.storage_bytes()
    assert report["table_dtype"] == "float32"


@pytest.mark.parametrize("scheme,tables", [("pep", {"row_splits", "slot_offsets", "values"}),
                                           ("double_hashing", {"row_index", "table"})])
def test_optimize_for_latency_exports_the_faster_forms(scheme, tables, ctr, exports, tmp_path):
    """``optimize_for="latency"``: PEP exported in the slots layout, double hashing with each id's row pair
    stored, the same outputs as the Keras model; the layers keep their own options; the report records the mode.
    The default exports (``"size"``) are the smallest forms: PEP's bitmask and double hashing's hashes."""
    require_scheme(scheme)
    model, default_path = exports(scheme)
    path = export_saved_model(model, tmp_path / scheme, optimize_for="latency")
    loaded = load_export(path)
    expected = keras_outputs(model, ctr.query)
    assert max_diff(loaded.predict(ctr.query)["probability"], expected) <= ATOL
    report, default = loaded.report, load_export(default_path).report
    assert report["optimize_for"] == "latency" and default["optimize_for"] == "size"
    names = {row["table"].split("/")[-1].split(":")[0] for row in report["tables"]
             if row["scheme"] != "FixedEmbedding" and row["feature"] in model.embedding_names}
    assert tables <= names, names
    assert not tables <= {row["table"].split("/")[-1].split(":")[0] for row in default["tables"]}
    # More bytes for the faster lookups (a slot per cell / a row pair per id).
    assert report["embedding"]["bytes"] > default["embedding"]["bytes"]
    layer = next(model.embedding_layers[n] for n in model.embedding_names)
    assert getattr(layer, "compact_layout", "auto") == "auto" and getattr(layer, "compact_lookup", "hash") == "hash"
    with pytest.raises(ValueError, match=r"optimize_for must be one of \['latency', 'size'\]. Received: "
                                         r"optimize_for='speed'"):
        export_saved_model(model, tmp_path / "bad", optimize_for="speed")
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


@pytest.mark.parametrize("table_dtype", [None, "int8"])
def test_optimize_for_latency_exports_md_head_tail(table_dtype, ctr, exports, tmp_path, monkeypatch):
    """``optimize_for="latency"`` exports MD as ``HeadTailEmbedding`` (its popular blocks premultiplied into one
    d0-wide head, the last block factored): the Keras model's outputs, the tables quantised like any other. These
    fields are small enough to be plain tables in both modes; ``PLAIN_TABLE_ENTRIES = 0`` treats them as large."""
    from tfemb.layers import mixed_dimension_embedding as md_module

    monkeypatch.setattr(md_module, "PLAIN_TABLE_ENTRIES", 0)
    model, _ = exports("md")
    path = export_saved_model(model, tmp_path / "md", optimize_for="latency", table_dtype=table_dtype)
    loaded = load_export(path)
    bound = ATOL if table_dtype is None else OUTPUT_BOUND[table_dtype]
    assert max_diff(loaded.predict(ctr.query)["probability"], keras_outputs(model, ctr.query)) <= bound
    applicable = [n for n in model.embedding_names if model.embedding_layers[n].head_tail() is not None]
    assert len(applicable) >= 2  # the discretised fields rank their ids by a permutation: the blocks form
    for name in applicable:
        kinds = {row["table"].split("/")[-1].split(":")[0]: row["kind"] for row in loaded.report["tables"]
                 if row["feature"] == name}
        assert kinds == {"head": "table", "tail": "table", "projection": "dense"}, (name, kinds)
    if table_dtype:
        assert {row["dtype"] for row in loaded.report["tables"] if row["kind"] == "table"} == {table_dtype}


def test_raw_signature_dtypes_and_direct_tensors(ctr, exports):
    model, path = exports("fixed")
    loaded = load_export(path)
    fn = loaded.signatures[RAW_SIGNATURE]
    _, specs = fn.structured_input_signature
    dtypes = {name: spec.dtype.name for name, spec in specs.items()}
    assert dtypes == {"c1": "string", "c2": "int64", "tags": "string", "n1": "float32", "n2": "float32",
                      "n3": "float32", "n4": "float32"}
    assert all(spec.shape.as_list() == [None] for spec in specs.values())
    _, encoded = loaded.signatures[ENCODED_SIGNATURE].structured_input_signature
    assert encoded["tags"].shape.as_list() == [None, 3] and encoded["n3"].dtype == tf.int64
    out = fn(
        c1=tf.constant(["a", "nope"]), c2=tf.constant([101, 7], tf.int64), tags=tf.constant(["0|1", ""]),
        n1=tf.constant([0.5, np.nan], tf.float32), n2=tf.constant([1.0, 2.0], tf.float32),
        n3=tf.constant([2.0, 7.5], tf.float32), n4=tf.constant([1.0, np.nan], tf.float32),
    )
    rows = pd.DataFrame({"c1": ["a", "nope"], "c2": [101, 7], "tags": ["0|1", ""], "n1": [0.5, np.nan],
                         "n2": [1.0, 2.0], "n3": [2.0, 7.5], "n4": [1.0, np.nan]})
    assert max_diff(out["probability"].numpy(), keras_outputs(model, rows)) <= ATOL
    # Unknown values are the OOV id 0 of the Keras model, explicitly.
    x, _ = ctr.schema.transform(rows)
    assert x["c1"][1] == 0 and x["c2"][1] == 0 and x["n4"][1] == 0
    spec = loaded.report["signatures"][RAW_SIGNATURE]["inputs"]
    assert spec["c2"]["dtype"] == "int64" and "OOV" in spec["c1"]["description"]


def test_missing_number_without_fill_value_is_a_clear_serving_error(ctr, exports):
    _, path = exports("fixed")
    loaded = load_export(path)
    inputs = raw_inputs(ctr.schema, ctr.query.head(2), loaded.input_names())
    inputs["n2"] = np.array([1.0, np.nan], np.float32)  # n2 has no fill_value
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"missing value \(NaN\) in numeric feature n2"):
        loaded.call(inputs)


def test_raw_inputs_and_vocabulary_keys():
    df = pd.DataFrame({"c": [3, "3", "a", 3, "a", "a", True], "m": [[1, 2], "2|x", None, [], "1", "", "x"]})
    schema = Schema([CategoricalFeature("c"), MultiHotFeature("m")]).fit(df)
    # Vocabulary by count: "a" (3), 3 (2), then "3" and "True" (1 each); 3 and "3" share the text "3", and
    # the more frequent id keeps it.
    assert schema.feature("c").vocabulary.values == ["a", 3, "3", "True"]
    keys, ids, dtype = vocabulary_keys(schema.feature("c"))
    assert dtype == "string" and keys.tolist() == ["a", "3", "True"] and ids.tolist() == [1, 2, 4]
    ints = Schema([CategoricalFeature("u")]).fit(pd.DataFrame({"u": [5, 6, 6]}))
    assert vocabulary_keys(ints.feature("u"))[2] == "int64"
    out = raw_inputs(ints, {"u": [None, 6.0, np.nan, 5]})
    assert out["u"].tolist() == [MISSING_INT, 6, MISSING_INT, 5]
    with pytest.raises(DataError, match=r"feature 'u': value '6' \(str\) in row 2 is not an integer"):
        raw_inputs(ints, {"u": [None, 6.0, "6", 5]})  # as Schema.transform: never silently OOV
    out = raw_inputs(schema, {"c": [3, None, True], "m": [[1, 2], np.nan, "a||b"]})
    assert out["c"].tolist() == ["3", "", "True"] and out["m"].tolist() == ["1|2", "", "a||b"]


@pytest.mark.parametrize("kind", ["cf_binary", "neumf_multiclass", "mf_regression"])
def test_cf_models_export(kind, tmp_path):
    df = cf_frame()
    label = {"cf_binary": Label("click"), "neumf_multiclass": Label("rating", kind="multiclass", num_classes=5,
                                                                     ratings=True),
             "mf_regression": Label("rating", kind="regression")}[kind]
    schema = cf_schema(df, label)
    if kind == "cf_binary":
        model = CFNetwork(schema, embeddings=scheme_factory("qr", output_dim=DIM, num_buckets=4), embedding_dim=DIM,
                          hidden_units=(7,))
    elif kind == "neumf_multiclass":
        model = NeuMF(schema, embeddings=scheme_factory("hashing", output_dim=DIM, num_buckets=9), embedding_dim=DIM,
                      mlp_units=(7, 3))
    else:
        model = MatrixFactorization(schema, embeddings=scheme_factory("double_hashing", output_dim=DIM, num_hot=4,
                                                                      num_buckets=5), embedding_dim=DIM)
    model.build()
    randomize(model, seed=3)
    path = export_saved_model(model, tmp_path / kind)
    loaded = load_export(path)
    rows = pd.concat([df.head(6), pd.DataFrame({"user_id": [10**9, 3], "item_id": ["i3", "unknown"],
                                                "click": [0, 1], "rating": [1, 2]})], ignore_index=True)
    expected = keras_outputs(model, rows)
    out = loaded.predict(rows)
    _, specs = loaded.signatures[RAW_SIGNATURE].structured_input_signature
    assert specs["user_id"].dtype == tf.int64 and specs["item_id"].dtype == tf.string
    if kind == "neumf_multiclass":
        assert set(out) == {"probabilities", "class_id"} and out["probabilities"].shape == (len(rows), 5)
        assert max_diff(out["probabilities"], expected) <= ATOL
        assert out["class_id"].tolist() == np.argmax(expected, axis=-1).tolist()
    else:
        name = "probability" if kind == "cf_binary" else "score"
        assert set(out) == {name} and max_diff(out[name], expected) <= ATOL
    x, _ = schema.transform(rows)
    encoded = loaded.predict_encoded(x)
    first = "probabilities" if kind == "neumf_multiclass" else next(iter(encoded))
    assert max_diff(encoded[first], expected) <= ATOL


# ------------------------------------------------------------------------------------------------ int8 / float16
#: Stated bounds on |export - float32 Keras model| of the test DeepFM's probabilities (weights ~ N(0, 0.3));
#: measured over every scheme and both Keras modes: int8 <= 3.1e-3, float16 <= 1.7e-4. int16's step is 258
#: times int8's. The per-example first-order bound of test_quantized_output_within_first_order_bound is the
#: derived one.
OUTPUT_BOUND = {"int8": 1e-2, "int16": 1e-4, "float16": 1e-3}
INT_STORAGE = {"int8": 1, "int16": 2}  # bytes per stored value of the integer storages (+ 4 per scale)


@pytest.mark.parametrize("scheme,table_dtype", [
    ("fixed", "int8"), ("fixed", "float16"), ("qr_mult", "int8"), ("double_hashing", "float16"),
    ("double_hashing_index", "int8"), ("md", "int8"),
    ("md_fast", "float16"),
    ("pep", "int8"), ("pep", "float16"), ("pep_slots", "int8"),
    ("fixed", "int16"), ("md", "int16"), ("pep", "int16"),
])
def test_quantized_tables(scheme, table_dtype, ctr, exports):
    model, path = exports(scheme, table_dtype)
    loaded = load_export(path)
    out = loaded.predict(ctr.query)["probability"]
    expected = keras_outputs(model, ctr.query)
    assert max_diff(out, expected) <= OUTPUT_BOUND[table_dtype]
    # Every stored table: each dequantised element within its stated bound of the float32 value.
    pairs = [pair for name in model.embedding_names
             for pair in quantize_scheme(model.embedding_layers[name].compact(), table_dtype)]
    assert pairs, "no table was quantised"
    for table, quantized in pairs:
        values = tf.convert_to_tensor(table).numpy()
        assert np.all(np.abs(quantized.dequantized() - values) <= element_error_bound(values, table_dtype))
        assert quantized.dequantized().tolist() == dequantized(values, table_dtype).tolist()
    # Stored bytes: int8 one byte per value, int16 two, + a float32 scale per row (per block of a 1-D table);
    # float16 two.
    for row in loaded.report["tables"]:
        if row["kind"] != "table":
            continue
        assert row["dtype"] == table_dtype
        size = int(np.prod(row["shape"]))
        if table_dtype in INT_STORAGE:
            scales = row["shape"][0] if len(row["shape"]) == 2 else -(-size // INT8_BLOCK)
            assert row["bytes"] == INT_STORAGE[table_dtype] * size + 4 * scales
        else:
            assert row["bytes"] == 2 * size
    if scheme in ("pep", "pep_slots", "md", "md_fast", "double_hashing_index"):
        return
    # The schemes whose compact tables are their training tables (not PEP's packed ones, nor MD's, whose small
    # blocks and OOV row are premultiplied): the Keras model with the same dequantised tables gives the export's
    # outputs (float32 parity).
    saved = [layer.weights for layer in model.embedding_list]
    originals = [[tf.convert_to_tensor(w).numpy() for w in weights] for weights in saved]
    try:
        for name in model.embedding_names:
            for table in gathered_tables(model.embedding_layers[name]):
                table.assign(dequantized(tf.convert_to_tensor(table).numpy(), table_dtype))
        assert max_diff(out, keras_outputs(model, ctr.query)) <= ATOL
    finally:
        for weights, values in zip(saved, originals):
            for weight, value in zip(weights, values):
                weight.assign(value)


@pytest.mark.parametrize("table_dtype", ["int8", "int16", "float16"])
def test_quantized_output_within_first_order_bound(table_dtype, ctr, exports):
    """|export - model| <= 2 * sum_f sum_j |d out / d e_fj| * bound_fj per example (fixed tables: e_f = T_f[id])."""
    model, path = exports("fixed", table_dtype)
    out = load_export(path).predict(ctr.query)["probability"]
    x, _ = ctr.schema.transform(ctr.query)
    x = {k: tf.constant(v) for k, v in x.items()}
    with tf.GradientTape() as tape:
        embedded, dense = model.embed(x)
        tape.watch(list(embedded.values()))
        logits = model.interact(embedded, dense, training=False) + model.linear_logits(x, dense, training=False)
        y = tf.sigmoid(tf.squeeze(logits, -1))
    grads = tape.gradient(y, embedded)
    bound = np.zeros(len(ctr.query))
    for name in model.embedding_names:
        layer = model.embedding_layers[name]
        element = element_error_bound(tf.convert_to_tensor(layer.embeddings).numpy(), table_dtype)
        ids = x[name].numpy()
        if ids.ndim == 2:  # mean of the listed rows: its error is at most the largest row bound
            per_row = np.where((ids >= 0)[..., None], element[np.maximum(ids, 0)], 0.0).max(axis=1)
        else:
            per_row = element[ids]
        bound += np.sum(np.abs(grads[name].numpy()) * per_row, axis=-1)
    diff = np.abs(out.astype(np.float64) - y.numpy().astype(np.float64))
    assert np.all(diff <= 2 * bound + 1e-6), (diff.max(), bound.min())


def test_table_dtype_on_a_model_without_scheme_tables_is_refused(ctr, tmp_path):
    from tfemb.models import LogisticRegression

    model = LogisticRegression(ctr.schema)
    model.build()
    with pytest.raises(ExportError, match=r"table_dtype='int8' stores the embedding schemes' tables, and "
                                          r"LogisticRegression has none"):
        export_saved_model(model, tmp_path / "lr", table_dtype="int8")
    assert not (tmp_path / "lr").exists()
    assert os.path.isdir(export_saved_model(model, tmp_path / "lr"))  # float32 as it is


def test_int8_reference_by_hand():
    table = np.array([[0.5, -0.25, 0.125], [0.0, 0.0, 0.0], [1e-3, -2e-3, 0.0]], np.float32)
    q, scale = quantize_int8(table)
    assert q.dtype == np.int8 and q[0].tolist() == [127, -64, 32] and q[1].tolist() == [0, 0, 0]
    np.testing.assert_allclose(scale, [0.5 / 127, 0.0, 2e-3 / 127], rtol=1e-6)
    entries = np.linspace(-1, 1, 2 * INT8_BLOCK + 5).astype(np.float32)  # a 1-D table: scales per block
    q1, scale1 = quantize_int8(entries)
    assert q1.shape == entries.shape and scale1.shape == (3,)
    stored = QuantizedTable(entries, "int8", "t")
    rows = tf.constant([0, 70, 132], tf.int64)
    np.testing.assert_allclose(stored.gather(rows).numpy(), stored.dequantized()[[0, 70, 132]])
    assert np.all(np.abs(stored.dequantized() - entries) <= element_error_bound(entries, "int8"))
    with pytest.raises(ValueError, match="float16 storage holds values up to 65504"):
        QuantizedTable(np.array([[1e5]], np.float32), "float16", "big")
    with pytest.raises(ValueError, match="table_dtype must be one of"):
        dequantized(table, "int4")


def test_int16_reference_by_hand():
    table = np.array([[0.5, -0.25, 0.125], [0.0, 0.0, 0.0], [1e-3, -2e-3, 0.0]], np.float32)
    q, scale = quantize_int(table, "int16")
    assert q.dtype == np.int16 and q[0].tolist() == [32767, -16384, 8192] and q[1].tolist() == [0, 0, 0]
    assert q[2][1:].tolist() == [-32767, 0] and q[2][0] in (16383, 16384)  # 1e-3 / (2e-3 / 32767) ≈ 16383.5
    np.testing.assert_allclose(scale, [0.5 / 32767, 0.0, 2e-3 / 32767], rtol=1e-6)
    # 258 times finer than int8 on the same table, and within the stated bound.
    err16 = np.abs(dequantized(table, "int16") - table).max()
    err8 = np.abs(dequantized(table, "int8") - table).max()
    assert err16 <= element_error_bound(table, "int16").max() and err16 < err8 / 100
    rng = np.random.default_rng(0)
    big = rng.normal(0, 1, (300, 16)).astype(np.float32)
    assert np.all(np.abs(dequantized(big, "int16") - big) <= element_error_bound(big, "int16"))
    stored = QuantizedTable(big, "int16", "t")
    assert stored.values.dtype == tf.int16 and stored.storage_bytes() == 2 * big.size + 4 * 300
    np.testing.assert_array_equal(stored.gather(tf.constant([3, 299], tf.int64)).numpy(),
                                  stored.dequantized()[[3, 299]])
    with pytest.raises(ValueError, match="integer table storage is one of .* Received: table_dtype='int4'"):
        quantize_int(table, "int4")


# ------------------------------------------------------------------------------------------------ fresh process
def test_reload_in_a_fresh_process(ctr, exports):
    cases = [exports("fixed"), exports("qr_concat"), exports("double_hashing", "int8")]
    rows = ctr.query
    inputs = {k: (v.tolist()) for k, v in raw_inputs(ctr.schema, rows).items()}
    code = (
        "import json, sys, tensorflow as tf\n"
        "spec = json.loads(sys.stdin.read())\n"
        "out = []\n"
        "for path in spec['paths']:\n"
        "    fn = tf.saved_model.load(path).signatures['serving_default']\n"
        "    _, specs = fn.structured_input_signature\n"
        "    feed = {k: tf.constant(spec['inputs'][k], dtype=s.dtype) for k, s in specs.items()}\n"
        "    out.append(fn(**feed)['probability'].numpy().tolist())\n"
        "print(json.dumps(out))\n"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", code], input=json.dumps({"paths": [p for _, p in cases],
                            "inputs": inputs}), capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    outputs = json.loads(result.stdout.strip().splitlines()[-1])
    for (model, path), values in zip(cases, outputs):
        bound = OUTPUT_BOUND["int8"] if path.endswith("-int8/1") else ATOL
        assert max_diff(values, keras_outputs(model, rows)) <= bound


# ------------------------------------------------------------------------------------------------ ops
@pytest.mark.parametrize("scheme", ["double_hashing", "dhe"])
def test_only_core_ops(scheme, exports):
    _, path = exports(scheme)
    ops = check_ops(path)
    assert "LookupTableFindV2" in ops and "StringSplitV2" in ops and not unsupported_ops(path)
    assert not {"PyFunc", "EagerPyFunc", "PyFuncStateless"} & set(ops)
    if scheme == "dhe":  # the hash arithmetic, Box-Muller and Mish in stock ops; no batch norm left
        assert {"FloorMod", "Log", "Cos", "Sin", "Softplus", "Tanh"} <= set(ops)
        assert not {op for op in ops if "BatchNorm" in op}


def test_py_function_and_custom_ops_are_caught(tmp_path, exports):
    class Bad(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
        def serve(self, x):
            return tf.py_function(lambda v: v * 2.0, [x], Tout=tf.float32)

    bad = Bad()
    tf.saved_model.save(bad, str(tmp_path / "bad"), signatures={"serving_default": bad.serve})
    with pytest.raises(UnsupportedOpsError, match="EagerPyFunc") as info:
        check_ops(str(tmp_path / "bad"))
    assert "EagerPyFunc" in info.value.ops
    # An op that no core library registers (a custom op): edited into a copy of a real export.
    _, path = exports("hashing")
    copy = tmp_path / "custom"
    shutil.copytree(path, copy)
    proto = read_saved_model_proto(str(copy))
    function = proto.meta_graphs[0].graph_def.library.function[0]
    node = function.node_def.add()
    node.name, node.op = "custom", "TfembCustomLookup"
    (copy / "saved_model.pb").write_bytes(proto.SerializeToString())
    assert "TfembCustomLookup" in list_ops(str(copy))
    assert "not a core TensorFlow op" in unsupported_ops(str(copy))["TfembCustomLookup"]


class PyFuncEmbedding(FixedEmbedding):
    """A scheme whose lookup calls Python: its export must be refused."""

    def lookup(self, ids):
        out = tf.py_function(lambda i: tf.gather(self.embeddings, i), [ids], Tout=tf.float32)
        out.set_shape(ids.shape.concatenate([self.output_dim]))
        return out

    def compact(self):
        layer = PyFuncEmbedding(self.vocabulary_size, self.output_dim, name=self.name, trainable=False)
        layer.build()
        layer.embeddings.assign(self.embeddings)
        return layer


def test_export_refuses_a_python_scheme_and_leaves_nothing(tmp_path):
    df = cf_frame()
    schema = cf_schema(df, Label("click"))
    model = MatrixFactorization(schema, embeddings={"user_id": PyFuncEmbedding(schema.vocabulary_size("user_id"), DIM)},
                                embedding_dim=DIM)
    model.build()
    with pytest.raises(ExportError, match="EagerPyFunc"):
        export_saved_model(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()  # the base directory this export created is removed too
    with pytest.raises(ExportError, match="EagerPyFunc"):
        export_saved_model(model, tmp_path / "a" / "b" / "m")
    assert not (tmp_path / "a").exists()  # and the parents it created
    (tmp_path / "m").mkdir()  # an existing base directory stays, empty
    with pytest.raises(ExportError, match="EagerPyFunc"):
        export_saved_model(model, tmp_path / "m")
    assert os.listdir(tmp_path / "m") == []


# ------------------------------------------------------------------------------------------------ warm-up
def test_warmup_requests_parse_and_run(ctr, exports):
    _, path = exports("fixed")
    logs = read_warmup_requests(path)
    assert [log.WhichOneof("log_type") for log in logs] == ["predict_log", "predict_log"]
    loaded = load_export(path)
    sizes = []
    for log in logs:
        request = log.predict_log.request
        assert request.model_spec.signature_name == RAW_SIGNATURE and request.model_spec.name == "fixed"
        inputs = request_inputs(log)
        assert set(inputs) == set(loaded.input_names())
        sizes.append(len(inputs["c1"]))
        out = loaded.call(inputs)  # what TF Serving does with each record when it loads the version
        assert np.all(np.isfinite(out["probability"]))
    assert sizes == [5, 1]
    assert os.path.getsize(os.path.join(path, "assets.extra", "tf_serving_warmup_requests")) > 0


# ------------------------------------------------------------------------------------------------ versions
@pytest.fixture(scope="module")
def small_cf():
    df = cf_frame()
    schema = cf_schema(df, Label("click"))
    models = []
    for seed in (0, 1):
        model = MatrixFactorization(schema, embedding_dim=4)
        model.build()
        models.append(randomize(model, seed))
    return df, models


def _entries(folder):
    return sorted(os.listdir(folder))


def test_versions_are_atomic_and_never_overwritten(tmp_path, small_cf):
    df, (first, second) = small_cf
    base = tmp_path / "mf"
    assert export_saved_model(first, base).endswith(os.sep + "1")
    assert export_saved_model(first, base).endswith(os.sep + "2")
    assert list_versions(base) == [1, 2] and next_version(base) == 3
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_saved_model(second, base, version=2)
    assert _entries(base) == ["1", "2"]
    # overwrite=True swaps the version in one step; nothing temporary is left.
    export_saved_model(second, base, version=2, overwrite=True)
    assert _entries(base) == ["1", "2"]
    rows = df.head(6)
    assert max_diff(load_export(base).predict(rows)["probability"], keras_outputs(second, rows)) <= ATOL
    assert max_diff(load_export(base / "1").predict(rows)["probability"], keras_outputs(first, rows)) <= ATOL
    # A failing export (warm-up rows without the item column) leaves no version and no temporary directory.
    with pytest.raises(ExportError, match="item_id"):
        export_saved_model(first, base, warmup_rows={"user_id": [1, 2]})
    assert _entries(base) == ["1", "2"]


def test_a_version_number_picked_by_the_export_is_never_overwritten(tmp_path, small_cf, monkeypatch):
    """overwrite=True replaces only a version the caller named: with version=None, a number that another writer
    published while this export was being written is theirs, and the export takes the next one."""
    from tfemb.export import saved_model as saved_model_module

    df, (first, second) = small_cf
    base = tmp_path / "mf"
    write, raced = saved_model_module._write_version, []

    def write_while_another_writer_publishes(*args, **kwargs):
        write(*args, **kwargs)
        if not raced:  # the first call only: the other writer, done first, publishes version 1
            raced.append(True)
            export_saved_model(first, base, version=1)
    monkeypatch.setattr(saved_model_module, "_write_version", write_while_another_writer_publishes)
    assert export_saved_model(second, base, overwrite=True).endswith(os.sep + "2")
    rows = df.head(6)
    assert max_diff(load_export(base / "1").predict(rows)["probability"], keras_outputs(first, rows)) <= ATOL
    assert max_diff(load_export(base / "2").predict(rows)["probability"], keras_outputs(second, rows)) <= ATOL
    assert _entries(base) == ["1", "2"]


def test_next_version_ignores_other_names(tmp_path):
    for name in ("7", "3", "abc", ".tmp-9-xyz", "12.bak"):
        (tmp_path / name).mkdir()
    (tmp_path / "20").write_text("a file, not a version")
    assert list_versions(tmp_path) == [3, 7] and next_version(tmp_path) == 8
    assert next_version(tmp_path / "missing") == 1
    with pytest.raises(ValueError, match="version must be an int >= 0"):
        export_saved_model(MatrixFactorization(cf_schema(cf_frame(), Label("click"))), tmp_path, version=-1)


def test_partial_or_corrupt_exports_give_clear_errors(tmp_path, exports):
    _, path = exports("qr_add")
    no_vars = tmp_path / "no_vars" / "1"
    shutil.copytree(path, no_vars)
    shutil.rmtree(no_vars / "variables")
    with pytest.raises(ExportError, match="variables") as info:
        load_export(no_vars.parent)
    assert str(no_vars) in str(info.value)
    truncated = tmp_path / "truncated" / "1"
    shutil.copytree(path, truncated)
    data = (truncated / "saved_model.pb").read_bytes()
    (truncated / "saved_model.pb").write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match="saved_model.pb") as info:
        load_export(truncated)
    assert str(truncated) in str(info.value)
    no_pb = tmp_path / "no_pb" / "4"
    shutil.copytree(path, no_pb)
    os.remove(no_pb / "saved_model.pb")
    with pytest.raises(ExportError, match="saved_model.pb is missing"):
        load_export(no_pb)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="not an export"):
        load_export(tmp_path / "empty")
    with pytest.raises(ExportError, match="no such export"):
        load_export(tmp_path / "nowhere")
    assert cli.main(["inspect", str(no_vars.parent)]) == 2
    # Variables cut short (a truncated copy): named by inspect as by load_export, from the index alone.
    cut = tmp_path / "cut" / "2"
    shutil.copytree(path, cut)
    shard = next((cut / "variables").glob("variables.data-*"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    for check in (load_export, inspect_export):
        with pytest.raises(ExportError, match=r"variables/ holds [\d,]+ bytes of data, less than the [\d,]+ its "
                                              r"index lists \(a truncated or partial copy\)"):
            check(cut)
    (cut / "variables" / "variables.index").write_bytes(b"garbage")
    with pytest.raises(ExportError, match="variables/variables.index cannot be read"):
        inspect_export(cut)


# ------------------------------------------------------------------------------------------------ report
@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory):
    """An FM whose tables dominate the export: 3,000 users and 2,000 items, dim 16."""
    rng = np.random.default_rng(5)
    n = 12000
    df = pd.DataFrame({"user": np.concatenate([np.arange(3000), rng.integers(0, 3000, n - 3000)]),
                       "item": np.concatenate([np.arange(2000), rng.integers(0, 2000, n - 2000)]),
                       "click": rng.integers(0, 2, n)})
    schema = Schema([CategoricalFeature("user"), CategoricalFeature("item")], Label("click")).fit(df)
    root = tmp_path_factory.mktemp("big")
    fixed = FactorizationMachine(schema, embedding_dim=16)
    fixed.build()
    hashed = FactorizationMachine(schema, embeddings=scheme_factory("hashing", output_dim=16, compression=8),
                                  embedding_dim=16)
    hashed.build()
    fixed_path = export_saved_model(fixed, root / "fixed")
    return {"schema": schema, "fixed": fixed, "hashed": hashed, "fixed_path": fixed_path, "root": root}


def test_report_sizes_and_fixed_reference(big_vocab):
    fixed_report = inspect_export(big_vocab["fixed_path"])
    tables = {t["feature"]: t for t in fixed_report["tables"]}
    for name, size in (("user", 3001), ("item", 2001)):
        assert tables[name]["shape"] == [size, 16] and tables[name]["dtype"] == "float32"
        assert tables[name]["parameters"] == size * 16 and tables[name]["bytes"] == size * 16 * 4
    assert fixed_report["embedding"]["bytes"] == (3001 + 2001) * 16 * 4
    usage = fixed_report["bytes_on_disk"]
    assert usage["variables"] > fixed_report["embedding"]["bytes"]  # the checkpoint holds the tables
    assert usage["total"] == usage["model"] + usage["assets_extra"] + os.path.getsize(
        os.path.join(big_vocab["fixed_path"], "fingerprint.pb"))
    # A compact export is smaller on disk than the fixed one, measured against that export.
    path = export_saved_model(big_vocab["hashed"], big_vocab["root"] / "hashed",
                              fixed_reference=big_vocab["fixed_path"])
    report = inspect_export(path)
    fixed = report["fixed_reference"]
    assert fixed["source"] == "path" and fixed["all_fixed"]
    assert report["bytes_on_disk"]["model"] < fixed_report["bytes_on_disk"]["model"]
    assert fixed["model_bytes"] == fixed_report["bytes_on_disk"]["model"]
    assert fixed["ratios"]["embedding_parameters"] <= 1 / 7 and fixed["ratios"]["model_bytes"] < 0.6
    assert report["bytes_on_disk"]["variables"] < 0.2 * fixed_report["bytes_on_disk"]["variables"]
    # The estimate (no reference export) is close to the measurement.
    estimated = export_saved_model(big_vocab["hashed"], big_vocab["root"] / "hashed", version=9)
    estimate = inspect_export(estimated)["fixed_reference"]
    assert estimate["source"] == "estimate"
    assert abs(estimate["model_bytes"] - fixed["model_bytes"]) <= 0.02 * fixed["model_bytes"]
    # int8 tables: about a quarter of the float32 bytes.
    small = export_saved_model(big_vocab["fixed"], big_vocab["root"] / "fixed-int8", table_dtype="int8")
    assert inspect_export(small)["embedding"]["bytes"] == (3001 + 2001) * (16 + 4)
    md = open(os.path.join(path, "assets.extra", "tfemb_export.md")).read()
    assert "# Export report" in md and "| feature | scheme | table |" in md and "serving_default" in md


def test_fixed_reference_export_measures_the_fixed_twin(big_vocab, tmp_path):
    path = export_saved_model(big_vocab["hashed"], tmp_path / "h", fixed_reference="export")
    fixed = inspect_export(path)["fixed_reference"]
    assert fixed["source"] == "export" and fixed["all_fixed"]
    measured = inspect_export(big_vocab["fixed_path"])["bytes_on_disk"]["model"]
    assert abs(fixed["model_bytes"] - measured) <= 0.01 * measured
    assert _entries(tmp_path / "h") == ["1"]


@pytest.mark.parametrize("edit,message", [
    (lambda r: r.update(model="MatrixFactorization", task="regression"),
     r"it exports a MatrixFactorization \(regression\), this model is a FactorizationMachine \(binary\)"),
    (lambda r: r.update(table_dtype="int8"), "its tables are stored as int8, not float32"),
    (lambda r: r["features"][0].update(scheme="HashingEmbedding"),
     r"feature\(s\) \['user'\] are not FixedEmbedding tables \(\['HashingEmbedding'\]\)"),
    (lambda r: r["features"][1].update(vocabulary_size=99),
     r"its tables have other vocabularies or dimensions: item: 99 x 16 \(this model: 2001 x 16\)"),
    (lambda r: r.update(features=r["features"][:1]), r"its embedded features are \['user'\], this model's"),
])
def test_fixed_reference_path_must_be_a_fixed_export_of_the_model(big_vocab, tmp_path, edit, message):
    """``fixed_reference=PATH`` (``tfemb export --fixed-reference PATH``): the export of another model, or of a
    compact or quantised one, is refused before anything is written, instead of ratios "vs fixed embeddings"
    that compare with something else (a DeepFM export measured against an MF export read 422%)."""
    reference = tmp_path / "reference" / "1"
    shutil.copytree(big_vocab["fixed_path"], reference)
    report_path = reference / "assets.extra" / "tfemb_export.json"
    report = json.loads(report_path.read_text())
    edit(report)
    report_path.write_text(json.dumps(report))
    with pytest.raises(ExportError, match="is not a fixed-embedding export of this model: " + message):
        export_saved_model(big_vocab["hashed"], tmp_path / "out", fixed_reference=str(reference.parent))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scheme", ["double_hashing_index", "fixed"])
def test_summary_parameters_agree_with_the_table_total(scheme, exports, capsys):
    """``tfemb inspect EXPORT``: the summary's embedding parameters (the schemes' counts) and the TOTAL row of the
    stored tables (values stored) differ where a compact form stores zeros (here the zero row of each indexed
    double-hashing table); the summary says how many values are stored instead of two unexplained totals."""
    _, path = exports(scheme)
    report = inspect_export(path)
    stored = sum(t["parameters"] for t in report["tables"])
    parameters = report["embedding"]["parameters"]
    assert cli.main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    summary = next(line for line in text.splitlines() if line.startswith("embedding tables:"))
    total = next(line for line in text.splitlines() if line.startswith("TOTAL"))
    assert f"{stored:,}" in total.split()
    if scheme == "fixed":
        assert stored == parameters and "values stored" not in summary
    else:
        assert stored == parameters + len(report["features"]) * DIM  # one zero row per table
        assert f"{parameters:,} parameters ({stored:,} values stored in the tables below" in summary


def test_inspect_cli_on_exports(big_vocab, capsys):
    parent = os.path.dirname(big_vocab["fixed_path"])
    assert cli.main(["inspect", parent]) == 0
    text = capsys.readouterr().out
    assert "bytes on disk" in text and "user" in text and "TOTAL" in text
    assert cli.main(["inspect", big_vocab["fixed_path"], "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "FactorizationMachine" and len(report["tables"]) == 2
