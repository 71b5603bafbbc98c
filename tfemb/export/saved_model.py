"""Export a ``RecModel`` as a TF Serving SavedModel: compact tables, raw-feature and encoded-id signatures.

``export_saved_model(model, export_dir)`` writes ``export_dir/<version>/``, the layout TF Serving watches:

```
export_dir/<version>/
  saved_model.pb                 graph, signatures "serving_default" (raw values) and "encoded" (ids)
  variables/                     the compact tables (float32, float16, or int8 / int16 + scales) and the other layers
  assets/tfemb_schema.json       the fitted Schema (vocabularies, numeric statistics): clients send raw values
  assets.extra/tf_serving_warmup_requests   PredictionLog records TF Serving replays at load (optional)
  assets.extra/tfemb_export.json / .md      the export report (sizes per table, vs fixed embeddings)
```

The version appears atomically: everything is written into ``export_dir/.tmp-<version>-<random>`` and renamed
into place, so a watcher never sees half a version (TF Serving ignores names that are not integers); an
existing version is replaced only with ``overwrite=True``, by an atomic exchange where the OS has one.

In the graph, every embedding scheme is replaced by its ``compact()`` inference layer, optionally with its
tables stored as int8, int16 or float16 (``tfemb.export.quantize``), and the raw feature values of the Schema are
encoded with stock ops (hash-table lookups, string splits, bucketisation): see ``raw_input_spec`` and
docs/export.md for the signatures.
"""

import ctypes
import errno
import os
import shutil
import tempfile
import time
import types

import numpy as np
import pandas as pd
import tensorflow as tf

from tfemb.data.schema import Schema, _as_key
from tfemb.errors import DataError
from tfemb.export import ops_check, quantize, warmup
from tfemb.export import report as export_report
from tfemb.layers.embedding_scheme import dtype_bytes

#: Signature taking raw feature values (TF Serving's default).
RAW_SIGNATURE = "serving_default"
#: Signature taking encoded ids (what ``Schema.transform`` returns).
ENCODED_SIGNATURE = "encoded"
#: The Schema JSON inside ``assets/``.
SCHEMA_ASSET = "tfemb_schema.json"
#: What ``raw_inputs`` sends for a missing value of an int64 feature: int64 min, outside any real vocabulary, so
#: it maps to the OOV id 0 as a missing value does in ``Schema.transform``.
MISSING_INT = np.iinfo(np.int64).min

#: Vocabulary values that make an int vocabulary (int64 keys in the graph).
_INT_KEY_TYPES = (int, np.integer)


class ExportError(ValueError):
    """An export cannot be written or read: names the path and what is wrong with it."""


# ------------------------------------------------------------------------------------------ signature spec
def _is_int_vocabulary(values):
    return bool(values) and all(isinstance(v, _INT_KEY_TYPES) and not isinstance(v, bool) for v in values)


def vocabulary_keys(feature):
    """``(keys, ids, dtype)`` of a feature's in-graph lookup table.

    Int vocabularies (every value an int) take int64 keys; any other vocabulary takes string keys, ints written
    as decimal text (``3`` -> ``"3"``). Multi-hot features always take string keys: their raw input is text
    split in-graph. Two values with the same text (``3`` and ``"3"`` in one vocabulary) keep the first, the more
    frequent id.
    """
    values = list(feature.vocabulary.values)
    if feature.kind != "multi_hot" and _is_int_vocabulary(values):
        return np.asarray(values, dtype=np.int64), np.arange(1, len(values) + 1, dtype=np.int64), "int64"
    keys, ids, seen = [], [], set()
    for i, value in enumerate(values):
        text = str(value)
        if text not in seen:
            seen.add(text)
            keys.append(text)
            ids.append(i + 1)
    return np.asarray(keys, dtype=object), np.asarray(ids, dtype=np.int64), "string"


def raw_input_spec(schema, names):
    """``{feature: {"dtype", "shape", "kind", "description"}}`` of the ``serving_default`` inputs.

    ``shape`` has ``-1`` for the batch. One input per feature the model reads, named like the feature.
    """
    spec = {}
    for name in names:
        f = schema.feature(name)
        if f.kind == "categorical":
            _, _, dtype = vocabulary_keys(f)
            what = "an int value" if dtype == "int64" else "a value as text (ints as decimal text)"
            spec[name] = {"dtype": dtype, "shape": [-1], "kind": "categorical",
                          "description": f"{what}; values not in the vocabulary ({f.vocabulary.size - 1} values) "
                                         f"map to the OOV id 0" + ("" if dtype == "int64" else ", as does ''")}
        elif f.kind == "multi_hot":
            spec[name] = {"dtype": "string", "shape": [-1], "kind": "multi_hot",
                          "description": f"values joined by {f.separator!r} (empty parts skipped, unknown values -> "
                                         f"OOV id 0, the first {f.max_length} kept; '' = no values)"}
        elif f.is_categorical:
            spec[name] = {"dtype": "float32", "shape": [-1], "kind": "bucketized",
                          "description": f"a number, bucketised in-graph ({f.discretize}, "
                                         f"{len(f.stats['boundaries']) + 1} buckets); NaN = missing -> id 0"}
        else:
            fill = ("NaN = missing is an error (no fill_value)" if f.fill_value is None
                    else f"NaN = missing -> {f.fill_value}")
            spec[name] = {"dtype": "float32", "shape": [-1], "kind": "numeric",
                          "description": f"a number; {fill}; transform {f.transform} applied in-graph"}
    return spec


def encoded_input_spec(schema, names):
    """``{feature: {"dtype", "shape", "kind", "description"}}`` of the ``encoded`` inputs (``Schema.transform``)."""
    spec = {}
    input_spec = schema.input_spec()
    for name in names:
        f = schema.feature(name)
        shape, dtype = input_spec[name]
        if f.kind == "multi_hot":
            what = f"ids in [0, {f.vocabulary.size}) padded with -1 to {f.max_length}"
        elif dtype == "int64":
            what = f"an id in [0, {f.vocabulary.size}); 0 = OOV"
        else:
            what = "the transformed value (Schema.transform)"
        kind = "bucketized" if f.kind == "numeric" and f.is_categorical else f.kind
        spec[name] = {"dtype": dtype, "shape": [-1] + list(shape), "kind": kind, "description": what}
    return spec


def output_spec(task, num_classes=None):
    """``{output: {"dtype", "shape", "description"}}`` of both signatures for a task."""
    if task == "binary":
        return {"probability": {"dtype": "float32", "shape": [-1], "description": "P(label = 1)"}}
    if task == "multiclass":
        return {
            "probabilities": {"dtype": "float32", "shape": [-1, int(num_classes)],
                              "description": "class probabilities (softmax)"},
            "class_id": {"dtype": "int64", "shape": [-1], "description": "most probable class"},
        }
    return {"score": {"dtype": "float32", "shape": [-1], "description": "predicted value"}}


def model_input_names(model):
    """Features the model reads, in input order: sparse first, then dense."""
    return list(model.sparse_names) + list(model.dense_names)


def signature_spec(model):
    """Both signatures of ``model``'s export: ``{name: {"inputs": {...}, "outputs": {...}}}``."""
    names = model_input_names(model)
    outputs = output_spec(model.task, model.num_classes)
    return {
        RAW_SIGNATURE: {"inputs": raw_input_spec(model.schema, names), "outputs": outputs},
        ENCODED_SIGNATURE: {"inputs": encoded_input_spec(model.schema, names), "outputs": outputs},
    }


def _tensor_specs(spec):
    return {name: tf.TensorSpec([None] + [int(s) for s in entry["shape"][1:]], tf.as_dtype(entry["dtype"]), name=name)
            for name, entry in spec.items()}


# ------------------------------------------------------------------------------------------ raw values
def _cells(rows, feature, name):
    if isinstance(rows, pd.DataFrame):
        column = feature.column if feature.column in rows.columns else name
        if column not in rows.columns:
            raise KeyError(
                f"missing column {feature.column!r} for feature {name!r}; the rows have {list(rows.columns)}"
            )
        return rows[column].tolist()
    if not isinstance(rows, dict):
        raise TypeError(f"rows must be a pandas DataFrame or a dict of raw values. Received: {type(rows).__name__}")
    for key in (name, feature.column):
        if key in rows:
            values = rows[key]
            if not isinstance(values, (list, tuple, np.ndarray, pd.Series)):
                return [values]  # one row
            return values.tolist() if hasattr(values, "tolist") else list(values)
    raise KeyError(f"missing raw values for feature {name!r}; the rows have {sorted(rows)}")


def _text(value):
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    key = _as_key(value)
    return "" if key is None else str(key)


def _join(cell, separator):
    if isinstance(cell, (list, tuple, np.ndarray)):
        return separator.join(t for t in (_text(v) for v in cell) if t)
    return _text(cell) if not isinstance(cell, str) else cell


def _number(value):
    if value is None or value is pd.NA:
        return np.nan
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str) and value.strip() == "":
        return np.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a number") from None


def raw_inputs(schema, rows, names=None):
    """The ``serving_default`` inputs for raw rows: ``{feature: NumPy array}`` of the signature's dtypes.

    Args:
        schema: the fitted Schema of the export (``LoadedExport.schema``).
        rows: a pandas DataFrame (columns as in training, ``feature.column``) or a dict ``{feature or column:
            list of raw values}``.
        names: the features to encode; default every feature of the schema.

    Categorical values become text (strings as they are, ints as decimal text) or int64 as the signature
    takes them (a value for an int vocabulary that is no integer, e.g. ``"106"`` from a CSV read as text, is a
    ``DataError``, as in ``Schema.transform``); a missing int value becomes ``MISSING_INT`` (never a vocabulary
    value, so it maps to OOV like a missing value in ``Schema.transform``). Multi-hot lists are joined with the feature's separator; numbers
    become float32 (None / empty -> NaN).
    """
    names = schema.names if names is None else list(names)
    out = {}
    for name in names:
        f = schema.feature(name)
        cells = _cells(rows, f, name)
        if f.kind == "categorical":
            _, _, dtype = vocabulary_keys(f)
            if dtype == "int64":
                keys = [_as_key(v.decode("utf-8") if isinstance(v, bytes) else v) for v in cells]
                for row, (key, value) in enumerate(zip(keys, cells)):
                    if key is not None and not isinstance(key, int):  # as Schema.transform: not silently OOV
                        raise DataError(
                            f"feature {name!r}: value {value!r} ({type(value).__name__}) in row {row} is not an "
                            "integer, and the vocabulary of this feature holds ints; convert the column (e.g. "
                            "df[column].astype('Int64')), or pass None / NaN for a missing value")
                out[name] = np.asarray([MISSING_INT if k is None else k for k in keys], dtype=np.int64)
            else:
                out[name] = np.asarray([_text(v) for v in cells], dtype=object)
        elif f.kind == "multi_hot":
            out[name] = np.asarray([_join(c, f.separator) if c is not None else "" for c in cells], dtype=object)
        else:
            try:
                out[name] = np.asarray([_number(v) for v in cells], dtype=np.float32)
            except ValueError as error:
                raise ValueError(f"feature {name!r}: {error}") from None
    return out


class RawFeatureEncoder(tf.Module):
    """Raw feature values -> the encoded inputs of the model, in-graph and with stock ops only.

    - categorical: ``StaticHashTable`` (``KeyValueTensorInitializer``) value -> id, default 0 (OOV).
    - multi-hot: ``tf.strings.split`` by the separator, empty parts dropped, lookup, padded with -1 and cut to
      ``max_length`` (``RaggedTensor.to_tensor``).
    - numeric: NaN -> ``fill_value`` (or an ``InvalidArgument`` error without one), then ``log`` /
      ``standardize`` in float64 as ``NumericFeature.encode``, then float32.
    - bucketised numeric: ``1 + searchsorted(boundaries, x, side="right")`` in float64 (after the log for
      ``discretize="log"``), NaN -> 0, as ``NumericFeature.encode``.
    """

    def __init__(self, schema, names):
        super().__init__(name="raw_feature_encoder")
        self._features = {name: schema.feature(name) for name in names}  # plain objects, not tracked
        self.tables = {}
        for name, f in self._features.items():
            if f.kind in ("categorical", "multi_hot") and f.vocabulary.values:
                keys, ids, dtype = vocabulary_keys(f)
                initializer = tf.lookup.KeyValueTensorInitializer(
                    tf.constant(keys.tolist() if dtype == "string" else keys, dtype=tf.as_dtype(dtype)),
                    tf.constant(ids, dtype=tf.int64),
                )
                self.tables[name] = tf.lookup.StaticHashTable(initializer, default_value=0, name=f"{name}_vocabulary")

    def _lookup(self, name, keys):
        if name not in self.tables:  # an empty vocabulary: everything is OOV
            return tf.zeros_like(keys, dtype=tf.int64) if not isinstance(keys, tf.RaggedTensor) \
                else tf.ragged.map_flat_values(lambda k: tf.zeros_like(k, dtype=tf.int64), keys)
        return self.tables[name].lookup(keys)

    def encode(self, name, raw):
        f = self._features[name]
        if f.kind == "categorical":
            return self._lookup(name, raw)  # [batch]
        if f.kind == "multi_hot":
            tokens = tf.strings.split(raw, sep=f.separator)  # ragged [batch, None]
            tokens = tf.ragged.boolean_mask(tokens, tf.not_equal(tokens, ""))
            ids = self._lookup(name, tokens)
            return ids.to_tensor(default_value=-1, shape=[None, f.max_length])  # [batch, max_length]
        x = tf.cast(raw, tf.float64)
        missing = tf.math.is_nan(x)
        if f.is_categorical:
            if f.discretize == "log":
                x = tf.sign(x) * tf.math.log1p(tf.abs(x))
            x = tf.where(missing, tf.zeros_like(x), x)
            boundaries = np.asarray(f.stats["boundaries"], dtype=np.float64)
            if boundaries.size:
                bucket = tf.searchsorted(tf.constant(boundaries), x, side="right", out_type=tf.int64)
            else:
                bucket = tf.zeros_like(x, dtype=tf.int64)
            return tf.where(missing, tf.zeros_like(bucket), bucket + 1)  # [batch]
        if f.fill_value is None:
            check = tf.debugging.assert_equal(
                tf.reduce_any(missing), False,
                message=f"missing value (NaN) in numeric feature {name} and the schema gives it no fill_value",
            )
            with tf.control_dependencies([check]):
                x = tf.identity(x)
        else:
            x = tf.where(missing, tf.constant(float(f.fill_value), tf.float64), x)
        if f.transform in ("log", "log_standardize"):
            x = tf.sign(x) * tf.math.log1p(tf.abs(x))
        if f.transform in ("standardize", "log_standardize"):
            x = (x - float(f.stats["mean"])) / float(f.stats["std"])
        return tf.cast(x, tf.float32)  # [batch]

    def __call__(self, raw):
        return {name: self.encode(name, raw[name]) for name in self._features}


# ------------------------------------------------------------------------------------------ the module
class _CompactView:
    """The model seen with its compact embedding layers: ``RecModel.embed`` and ``RecModel.call`` run unchanged,
    every other attribute (interaction block, head, linear terms) is the model's own."""

    def __init__(self, model, embedding_layers):
        from tfemb.models.rec_model import RecModel

        self.__dict__["_model"] = model
        self.__dict__["embedding_layers"] = embedding_layers
        self.__dict__["embed"] = types.MethodType(RecModel.embed, self)

    def __getattr__(self, name):
        return getattr(self._model, name)


class _Parts:
    """Untracked holder: the export module saves only the variables its graph reads, not whole layers."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


def _tf_variable(variable):
    """The ``tf.Variable`` behind a Keras 3 variable (Keras 2 variables are ``tf.Variable`` already)."""
    inner = getattr(variable, "_value", None)
    return inner if isinstance(inner, tf.Variable) else variable


def _named_outputs(y, task):
    if task == "multiclass":
        return {"probabilities": y, "class_id": tf.argmax(y, axis=-1, output_type=tf.int64)}
    return {"probability": y} if task == "binary" else {"score": y}


#: ``export_saved_model(optimize_for=...)``: the compact-form options each mode sets, for the export, on the
#: embedding layers that have them. ``"size"``: every scheme's own defaults, the smallest compact forms (PEP's
#: bitmask layout, double hashing's in-graph hashes, MD's blocks). ``"latency"``: the faster forms where a scheme
#: has one, at more bytes (PEP's ``"slots"`` layout, double hashing's stored row pairs, MD's head-tail table;
#: ``docs/export.md``). Schemes without such an option export the same way in both modes.
OPTIMIZE_FOR = {
    "size": {},
    "latency": {"compact_layout": "slots", "compact_lookup": "index", "compact_premultiply": "head"},
}


def check_optimize_for(optimize_for):
    if not isinstance(optimize_for, str) or optimize_for not in OPTIMIZE_FOR:
        raise ValueError(f"optimize_for must be one of {sorted(OPTIMIZE_FOR)}. Received: optimize_for={optimize_for!r}")
    return optimize_for


def compact_layer(layer, optimize_for="size"):
    """``layer.compact()`` with the ``optimize_for`` mode's options (``OPTIMIZE_FOR``) set on ``layer`` for the
    call, where it has the attribute; the layer's own values are restored afterwards."""
    options = {k: v for k, v in OPTIMIZE_FOR[check_optimize_for(optimize_for)].items() if hasattr(layer, k)}
    saved = {k: getattr(layer, k) for k in options}
    try:
        for key, value in options.items():
            setattr(layer, key, value)
        return layer.compact()
    finally:
        for key, value in saved.items():
            setattr(layer, key, value)


class ExportModule(tf.Module):
    """What ``export_saved_model`` saves: the raw-feature encoder, the variables the graph reads and two
    ``tf.function`` endpoints, ``serve_raw`` and ``serve_encoded`` (the signatures).

    Args:
        model: a built ``RecModel``.
        table_dtype: None, ``"float16"``, ``"int8"`` or ``"int16"``: storage of the schemes' tables.
        schema_path: optional path of the Schema JSON to save as an asset.
        optimize_for: ``"size"`` (default) or ``"latency"``: the compact forms (``OPTIMIZE_FOR``).
    """

    def __init__(self, model, table_dtype=None, schema_path=None, optimize_for="size"):
        super().__init__(name="tfemb_export")
        from tfemb.models.rec_model import RecModel

        if type(model).call is not RecModel.call or type(model).embed is not RecModel.embed:
            raise ExportError(
                f"{type(model).__name__} overrides call() or embed(); the exporter runs RecModel.call with the "
                "compact embedding layers and cannot reproduce a custom forward pass"
            )
        self.table_dtype = quantize.check_table_dtype(table_dtype)
        if self.table_dtype and not model.embedding_names:
            raise ExportError(
                f"table_dtype={self.table_dtype!r} stores the embedding schemes' tables, and {type(model).__name__} "
                "has none (its per-id first-order weights stay float32): export it with table_dtype=None"
            )
        self.optimize_for = check_optimize_for(optimize_for)
        names = model_input_names(model)
        spec = signature_spec(model)
        compact, gathered, quantized = {}, {}, {}
        for name in model.embedding_names:
            layer = compact_layer(model.embedding_layers[name], self.optimize_for)
            gathered[name] = quantize.gathered_tables(layer)
            # A scheme that stores no id-indexed table (DHE: a network) keeps float32 weights under table_dtype.
            if self.table_dtype and not gathered[name] and layer.sparse_tables():
                raise ExportError(
                    f"feature {name!r}: {type(layer).__name__} reads no table through EmbeddingScheme.gather_rows, "
                    f"so table_dtype={self.table_dtype!r} cannot apply to it; its lookup must gather its tables with "
                    "self.gather_rows(table, rows) (export it with table_dtype=None meanwhile)"
                )
            # A compact layer that already stores its tables (a low-precision-trained table's own codes) keeps
            # that storage: re-rounding it to table_dtype could only lose precision.
            quantized[name] = quantize.quantized_tables(layer) or quantize.quantize_scheme(
                layer, self.table_dtype if gathered[name] else None, gathered[name])
            compact[name] = layer
        if self.table_dtype and not any(gathered.values()):
            schemes = sorted({type(model.embedding_layers[n]).__name__ for n in model.embedding_names})
            raise ExportError(
                f"table_dtype={self.table_dtype!r} stores the embedding schemes' tables, and none of "
                f"{type(model).__name__}'s schemes ({', '.join(schemes)}) has one: export it with table_dtype=None")
        self.encoder = RawFeatureEncoder(model.schema, names)
        parts = _Parts(model=model, compact=compact, gathered=gathered, quantized=quantized, task=model.task,
                       spec=spec, view=_CompactView(model, compact))
        self._parts = parts
        encoder = self.encoder

        def serve_encoded(features):
            return _named_outputs(RecModel.call(parts.view, dict(features), training=False), parts.task)

        def serve_raw(features):
            # A call of the encoded graph (stored once in the function library), not a second copy of it.
            return parts.serve_encoded(encoder(features))

        # The tf.functions stay untracked: saved as attributes they would be traced and stored a second time
        # beside the signatures. The graph code has no tensor-dependent Python control flow: no AutoGraph.
        parts.serve_encoded = tf.function(serve_encoded, autograph=False,
                                          input_signature=[_tensor_specs(spec[ENCODED_SIGNATURE]["inputs"])])
        parts.serve_raw = tf.function(serve_raw, autograph=False,
                                      input_signature=[_tensor_specs(spec[RAW_SIGNATURE]["inputs"])])
        parts.raw_function = parts.serve_raw.get_concrete_function()
        parts.encoded_function = parts.serve_encoded.get_concrete_function()
        # Exactly the variables the two graphs read: the compact (or quantised) tables and the other layers;
        # the training tables of the model are not among them.
        saved, seen = [], set()
        for fn in (parts.raw_function, parts.encoded_function):
            for variable in fn.variables:
                if id(variable) not in seen:
                    seen.add(id(variable))
                    saved.append(variable)
        self.saved_variables = saved
        self._saved_ids = frozenset(seen)
        self._check_captures(model)
        if schema_path is not None:
            self.schema_asset = tf.saved_model.Asset(schema_path)

    def _check_captures(self, model):
        for name in model.embedding_names:
            original = model.embedding_layers[name]
            for weight in [] if original is self._parts.compact[name] else original.weights:
                if id(_tf_variable(weight)) in self._saved_ids:
                    raise ExportError(
                        f"the exported graph reads {weight.name} of the training layer {name!r}, not its compact copy"
                    )
            for table, _ in self._parts.quantized[name]:
                if id(_tf_variable(table)) in self._saved_ids:
                    raise ExportError(
                        f"{self._parts.compact[name].name} ({type(self._parts.compact[name]).__name__}) reads table "
                        f"{quantize.short_name(table)} outside EmbeddingScheme.gather_rows, so it cannot be stored as "
                        f"{self.table_dtype}; route every table lookup through EmbeddingScheme.gather_rows"
                    )

    @property
    def signatures(self):
        """The concrete functions saved as the ``serving_default`` and ``encoded`` signatures."""
        return {RAW_SIGNATURE: self._parts.raw_function, ENCODED_SIGNATURE: self._parts.encoded_function}

    def serve_raw(self, features):
        """Runs the raw-feature graph in this process: ``{feature: tensor}`` -> ``{output: tensor}``."""
        return self._parts.serve_raw(features)

    def serve_encoded(self, features):
        """Runs the encoded-id graph in this process."""
        return self._parts.serve_encoded(features)

    # ------------------------------------------------------------------------------------------- report
    def describe(self):
        """Model, signatures and one row per saved table of every compact layer (the report's input)."""
        parts = self._parts
        model = parts.model
        tables, features = [], []
        claimed = set()
        for name in model.embedding_names:
            layer, original = parts.compact[name], model.embedding_layers[name]
            gathered = {id(_tf_variable(t)) for t in parts.gathered[name]}
            stored = {id(_tf_variable(t)): q for t, q in parts.quantized[name]}
            rows = []
            for weight in layer.weights:
                variable = _tf_variable(weight)
                key = id(variable)
                shape = [int(s) for s in weight.shape]
                size = int(np.prod(shape)) if shape else 1
                if key in stored:
                    q = stored[key]
                    claimed.update(id(v) for v in q.storage_variables())
                    rows.append({"table": quantize.short_name(weight), "kind": "table", "shape": shape,
                                 "dtype": q.table_dtype, "parameters": q.parameter_count(),
                                 "bytes": q.storage_bytes()})
                elif key in self._saved_ids:
                    claimed.add(key)
                    dtype = tf.as_dtype(weight.dtype)
                    kind = "table" if key in gathered else ("dense" if dtype.is_floating else "index")
                    rows.append({"table": quantize.short_name(weight), "kind": kind, "shape": shape,
                                 "dtype": dtype.name, "parameters": size if dtype.is_floating else 0,
                                 "bytes": size * dtype_bytes(dtype)})
            for row in rows:
                tables.append({"feature": name, "scheme": type(original).__name__, **row})
            dims = np.asarray(layer.dims_per_id())
            features.append({
                "feature": name,
                "scheme": type(original).__name__,
                "vocabulary_size": int(original.vocabulary_size),
                "output_dim": int(original.output_dim),
                "mean_dim": float(dims.mean()) if dims.size else 0.0,
                # The layer's own count: a slots-layout PackedEmbedding also stores a zero per row, which its
                # values row lists as stored floats but which is not a parameter.
                "parameters": int(layer.parameter_count()),
                "bytes": sum(r["bytes"] for r in rows),
                "fixed_parameters": int(original.vocabulary_size * original.output_dim),
                "fixed_bytes": int(original.vocabulary_size * original.output_dim * 4),
            })
        other_parameters = other_bytes = 0
        for variable in self.saved_variables:
            if id(variable) in claimed:
                continue
            dtype = tf.as_dtype(variable.dtype)
            size = int(np.prod(variable.shape.as_list())) if variable.shape.rank else 1
            other_parameters += size if dtype.is_floating else 0
            other_bytes += size * dtype_bytes(dtype)
        from tfemb._keras import backend_name
        from tfemb.version import __version__

        return {
            "model": type(model).__name__,
            "task": model.task,
            "table_dtype": self.table_dtype or "float32",
            "optimize_for": self.optimize_for,
            "keras": backend_name(),
            "tensorflow_version": tf.__version__,
            "tfemb_version": __version__,
            "signatures": parts.spec,
            "features": features,
            "tables": tables,
            "other": {"parameters": int(other_parameters), "bytes": int(other_bytes),
                      "description": "dense layers, first-order (linear / bias) tables, batch-norm statistics, "
                                     "numeric-feature embeddings (also listed under 'numeric')"},
            # Numeric features embedded as fields (AutoDis, field embedding): float32 as trained, part of "other".
            "numeric": [{"feature": n, "layer": type(model.numeric_layers[n]).__name__,
                         "parameters": int(model.numeric_layers[n].parameter_count()),
                         "bytes": int(model.numeric_layers[n].storage_bytes())}
                        for n in getattr(model, "numeric_names", [])],
        }


# ------------------------------------------------------------------------------------------ versions
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _renameat2(src, dst, flags):
    """Linux ``renameat2``: True when done, False when unavailable here (the caller falls back)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    if err in (errno.EEXIST, errno.ENOTEMPTY):
        raise FileExistsError(f"{dst} already exists; pass overwrite=True to replace it")
    raise OSError(err, os.strerror(err), dst)


def list_versions(export_dir):
    """Sorted integer versions (directories named by an integer) in ``export_dir``; ``[]`` if none."""
    if not os.path.isdir(export_dir):
        return []
    return sorted(int(n) for n in os.listdir(export_dir)
                  if n.isdigit() and os.path.isdir(os.path.join(export_dir, n)))


def next_version(export_dir):
    """The largest existing version + 1, or 1."""
    versions = list_versions(export_dir)
    return versions[-1] + 1 if versions else 1


def _check_version(version):
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 0:
        raise ValueError(f"version must be an int >= 0 (TF Serving's version numbers). Received: version={version!r}")
    return int(version)


def _publish(tmp, target, overwrite):
    """Moves the finished ``tmp`` directory to ``target`` in one step."""
    if os.path.exists(target):
        if not overwrite:
            raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
        if _renameat2(tmp, target, _RENAME_EXCHANGE):  # atomic swap; tmp now holds the old version
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = tempfile.mkdtemp(prefix=f".old-{os.path.basename(target)}-", dir=os.path.dirname(target))
        os.rmdir(old)
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
        return
    if _renameat2(tmp, target, _RENAME_NOREPLACE):
        return
    if os.path.exists(target):
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
    os.rename(tmp, target)


def _fsync_tree(root):
    """Flushes the files of a finished version to disk before it is renamed into place."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# ------------------------------------------------------------------------------------------ export
def _check_model(model):
    from tfemb.models.rec_model import RecModel

    if not isinstance(model, RecModel):
        raise TypeError(f"model must be a tfemb RecModel. Received: {type(model).__name__}")
    if not model.built:
        model.build()


def _fixed_twin(model):
    """The same network with ``FixedEmbedding`` tables of the same vocabularies and dimension."""
    config = dict(model.get_config())
    config["embeddings"] = {}
    config["embedding_optimizer"] = None
    twin = type(model).from_config(config)
    twin.build()
    return twin


def _fixed_reference_info(model, fixed_reference):
    """``(kind, report)`` of the fixed-embedding reference: ``"estimate"`` (None), ``"export"`` or a path."""
    if fixed_reference is None or fixed_reference == "estimate":
        return "estimate", None
    if fixed_reference == "export":
        with tempfile.TemporaryDirectory(prefix="tfemb-fixed-reference-") as folder:
            path = export_saved_model(_fixed_twin(model), folder, version=1, fixed_reference="none")
            info = export_report.read_report(path)
        return "export", info
    if isinstance(fixed_reference, (str, os.PathLike)):
        version_dir = resolve_version_dir(os.fspath(fixed_reference))
        reference = export_report.read_report(version_dir)
        check_fixed_reference(model, reference)
        return "path", reference
    raise ValueError(
        "fixed_reference must be None (estimate), 'export' (export the same model with fixed embeddings and "
        f"measure it) or the path of a fixed-embedding export. Received: fixed_reference={fixed_reference!r}"
    )


def check_fixed_reference(model, reference):
    """``ExportError`` unless the export ``reference`` (its report) is what the report compares against: the same
    network (model class, task) with ``FixedEmbedding`` float32 tables of this model's features, vocabularies
    and dimensions. Another model's export, or a compact or quantised one, would give ratios that are not "vs
    fixed embeddings"."""
    problems = []
    if reference.get("model") != type(model).__name__ or reference.get("task") != model.task:
        problems.append(f"it exports a {reference.get('model')} ({reference.get('task')}), this model is a "
                        f"{type(model).__name__} ({model.task})")
    if reference.get("table_dtype", "float32") != "float32":
        problems.append(f"its tables are stored as {reference.get('table_dtype')}, not float32")
    features = {f["feature"]: f for f in reference.get("features", [])}
    not_fixed = sorted(name for name, f in features.items() if f.get("scheme") != "FixedEmbedding")
    if not_fixed:
        problems.append(f"feature(s) {not_fixed} are not FixedEmbedding tables "
                        f"({sorted({features[n].get('scheme') for n in not_fixed})})")
    expected = {name: (int(model.embedding_layers[name].vocabulary_size), int(model.embedding_layers[name].output_dim))
                for name in model.embedding_names}
    found = {name: (f.get("vocabulary_size"), f.get("output_dim")) for name, f in features.items()}
    if set(expected) != set(found):
        problems.append(f"its embedded features are {sorted(found)}, this model's {sorted(expected)}")
    else:
        shapes = [f"{name}: {found[name][0]} x {found[name][1]} (this model: {expected[name][0]} x {expected[name][1]})"
                  for name in sorted(expected) if found[name] != expected[name]]
        if shapes:
            problems.append("its tables have other vocabularies or dimensions: " + "; ".join(shapes))
    if problems:
        raise ExportError(
            f"fixed_reference {reference.get('path')} is not a fixed-embedding export of this model: "
            + "; ".join(problems) + ". Pass the export of the same network with FixedEmbedding float32 tables, "
            "fixed_reference='export' to export and measure one, or None to estimate it"
        )


def _write_version(model, folder, table_dtype, warmup_rows, fixed_reference, model_name, optimize_for="size",
                   resolved_reference=None):
    staging = tempfile.mkdtemp(prefix="tfemb-export-schema-")
    try:
        schema_path = os.path.join(staging, SCHEMA_ASSET)
        model.schema.save(schema_path)
        module = ExportModule(model, table_dtype=table_dtype, schema_path=schema_path, optimize_for=optimize_for)
        tf.saved_model.save(module, folder, signatures=module.signatures)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    try:
        ops_check.check_ops(folder)
    except ops_check.UnsupportedOpsError as error:
        raise ExportError(str(error)) from error
    if warmup_rows is not None:
        names = model_input_names(model)
        try:
            batches = warmup.warmup_batches(raw_inputs(model.schema, warmup_rows, names))
            for batch in batches:  # a failing warm-up request would make TF Serving refuse the version
                module.serve_raw({k: tf.constant(v.tolist() if v.dtype == object else v) for k, v in batch.items()})
        except Exception as error:
            raise ExportError(f"warm-up rows cannot be served by the export: {error}") from error
        warmup.write_warmup_requests(os.path.join(folder, warmup.WARMUP_PATH), batches, RAW_SIGNATURE, model_name)
    if resolved_reference is not None:  # a path, read and checked by export_saved_model before writing
        kind, reference = resolved_reference
    else:
        kind, reference = _fixed_reference_info(model, fixed_reference) if fixed_reference != "none" else (None, None)
    info = module.describe()
    info["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    export_report.write_report(folder, info, reference_kind=kind, reference=reference)


def export_saved_model(model, export_dir, version=None, overwrite=False, table_dtype=None, warmup_rows=None,
                       fixed_reference=None, optimize_for="size"):
    """Writes ``model`` as ``export_dir/<version>/``, a SavedModel stock TF Serving loads.

    Every embedding scheme is replaced by its ``compact()`` layer (physically smaller tables, stock ops); with
    ``table_dtype`` its tables are stored as float16, or int8 / int16 (per-row scale), and dequantised in-graph. Two
    signatures: ``"serving_default"`` takes raw feature values and ``"encoded"`` takes ids (docs/export.md); the
    outputs are ``probability`` (binary), ``probabilities`` + ``class_id`` (multiclass) or ``score``
    (regression). Only core TensorFlow ops are used (checked before the version appears).

    Args:
        model: a ``tfemb.models.RecModel`` (built, or buildable from its schema).
        export_dir: the model's base directory (TF Serving's ``base_path``); created if missing.
        version: int version; default the largest existing version + 1 (1 for a new directory).
        overwrite: replace an existing ``version`` (atomically where the OS can exchange two directories). Only
            a version given explicitly: with ``version=None`` the export always takes a free number.
        table_dtype: None (float32), ``"float16"``, ``"int8"`` or ``"int16"`` (int: per-row scale).
        warmup_rows: optional raw rows (a pandas DataFrame or a dict of raw values, as ``raw_inputs`` takes)
            written as ``assets.extra/tf_serving_warmup_requests`` (one request with up to 256 rows, one with one
            row); each request is run once before it is written.
        fixed_reference: the report's fixed-embedding baseline: None (estimated: this export with every
            scheme's tables replaced by ``vocabulary_size x output_dim`` float32 tables), ``"export"`` (the
            same network with ``FixedEmbedding`` is exported to a temporary directory and measured) or the path
            of an export of the fixed model (``check_fixed_reference``: the same network with float32
            ``FixedEmbedding`` tables of the same vocabularies and dimensions; checked before anything is written).
        optimize_for: ``"size"`` (default: every scheme's smallest compact form) or ``"latency"`` (the faster
            forms where a scheme has one, at more bytes: PEP's ``"slots"`` layout, double hashing's stored row
            pairs, MD's head-tail table; ``OPTIMIZE_FOR``). The layers' own ``compact_layout`` /
            ``compact_lookup`` / ``compact_premultiply`` are set for the export only. The export report records
            the mode.

    Returns:
        The path of the version directory.

    Raises:
        FileExistsError: ``version`` exists and ``overwrite`` is False.
        ExportError: the graph needs a non-core op, warm-up rows fail, a scheme reads a table outside its
            ``gather_rows`` hook with ``table_dtype`` set, or ``fixed_reference`` is the path of an export that is
            not the fixed-embedding form of this model.
    """
    _check_model(model)
    table_dtype = quantize.check_table_dtype(table_dtype)
    optimize_for = check_optimize_for(optimize_for)
    export_dir = os.path.abspath(os.fspath(export_dir))
    auto = version is None
    if not auto:
        version = _check_version(version)
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise ExportError(f"export_dir {export_dir} is a file, not a directory (the model's base path, which holds "
                          "its integer version directories)")
    resolved_reference = None
    if fixed_reference is not None and fixed_reference not in ("none", "estimate", "export"):
        resolved_reference = _fixed_reference_info(model, fixed_reference)  # a wrong path fails before any write
    created = _missing_dirs(export_dir)  # the directories this export creates, deepest first
    os.makedirs(export_dir, exist_ok=True)
    if auto:
        version = next_version(export_dir)
    target = os.path.join(export_dir, str(version))
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
    tmp = tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=export_dir)
    published = False
    try:
        _write_version(model, tmp, table_dtype, warmup_rows, fixed_reference, os.path.basename(export_dir),
                       optimize_for, resolved_reference)
        _fsync_tree(tmp)
        for _ in range(100):
            try:
                # overwrite only ever replaces a version the caller named: a version number picked here that
                # another writer claimed meanwhile is theirs, and this export takes the next one.
                _publish(tmp, target, overwrite and not auto)
                break
            except FileExistsError:
                if not auto:  # another writer took this version meanwhile
                    raise
                version = next_version(export_dir)
                target = os.path.join(export_dir, str(version))
        else:
            raise ExportError(f"{export_dir}: could not claim a new version number")
        published = True
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        if not published:  # a failed first export leaves nothing, not even the parents it created
            for folder in created:
                try:
                    os.rmdir(folder)  # only while empty: another writer's files stay
                except OSError:
                    break
    return target


def _missing_dirs(path):
    """The directories ``os.makedirs(path)`` would create, deepest first."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


# ------------------------------------------------------------------------------------------ loading
def resolve_version_dir(path):
    """The SavedModel version directory of ``path``: ``path`` itself, or its latest integer version."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise ExportError(
            f"{path}: no such export (expected a SavedModel version directory or a directory of versions)"
        )
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    versions = list_versions(path)
    if versions:
        return os.path.join(path, str(versions[-1]))
    if os.path.isdir(path) and (os.path.basename(path).isdigit() or os.path.exists(os.path.join(path, "variables"))):
        return path  # a version directory without saved_model.pb: validate_version_dir says what is missing
    raise ExportError(
        f"{path}: not an export: it holds neither saved_model.pb nor integer-named version directories"
    )


def validate_version_dir(path):
    """Raises ``ExportError`` naming ``path`` and the problem when the version directory is partial or corrupt;
    returns the parsed ``SavedModel`` proto."""
    from google.protobuf.message import DecodeError

    pb = os.path.join(path, "saved_model.pb")
    if not os.path.isfile(pb):
        raise ExportError(f"{path}: saved_model.pb is missing (a partial or interrupted export?)")
    if os.path.getsize(pb) == 0:
        raise ExportError(f"{pb} is empty (a partial or interrupted export?)")
    try:
        proto = ops_check.read_saved_model_proto(pb)
    except (DecodeError, RuntimeError, ValueError) as error:
        raise ExportError(f"{pb} is not a valid SavedModel (truncated or corrupt): {error}") from error
    if not proto.meta_graphs or not proto.meta_graphs[0].signature_def:
        raise ExportError(f"{pb} is not a valid SavedModel (truncated or corrupt): it holds no signatures")
    index = os.path.join(path, "variables", "variables.index")
    has_variables = any(
        node.WhichOneof("kind") == "variable" for node in proto.meta_graphs[0].object_graph_def.nodes
    )
    if has_variables:
        if not os.path.isfile(index):
            raise ExportError(f"{path}: variables/variables.index is missing (a partial export: variables/ was not "
                              "written or was removed)")
        shards = [n for n in os.listdir(os.path.dirname(index)) if n.startswith("variables.data-")]
        if not shards:
            raise ExportError(f"{path}: variables/ holds no variables.data-* shard (a partial export)")
        _check_variable_bytes(path, shards)
    return proto


def _check_variable_bytes(path, shards):
    """``ExportError`` when the variables' data shards hold fewer bytes than the index says their numeric tensors
    take (a truncated copy). Reads the index only, never the values."""
    prefix = os.path.join(path, "variables", "variables")
    try:
        reader = tf.train.load_checkpoint(prefix)
        shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    except (tf.errors.OpError, ValueError) as error:
        raise ExportError(f"{path}: variables/variables.index cannot be read (truncated or corrupt): {error}") \
            from error
    expected = sum(int(np.prod(shapes[name], dtype=np.int64)) * dtypes[name].size for name in shapes
                   if dtypes[name] != tf.string)
    stored = sum(os.path.getsize(os.path.join(path, "variables", n)) for n in shards)
    if stored < expected:
        raise ExportError(f"{path}: variables/ holds {stored:,} bytes of data, less than the {expected:,} its index "
                          "lists (a truncated or partial copy)")


class LoadedExport:
    """A loaded tfemb export: the TensorFlow object, its Schema, its report, and calls with raw rows.

    Attributes:
        path: the version directory.
        version: its integer version (None if its name is not an integer).
        module: what ``tf.saved_model.load`` returned.
        schema: the ``Schema`` baked into the export (None for a SavedModel that tfemb did not write).
        report: the export report (``tfemb.export.report``), or None.
    """

    def __init__(self, path, module, schema, report):
        self.path = path
        base = os.path.basename(path)
        self.version = int(base) if base.isdigit() else None
        self.module = module
        self.schema = schema
        self.report = report

    @property
    def signatures(self):
        return self.module.signatures

    def input_names(self, signature=RAW_SIGNATURE):
        _, kwargs = self.signatures[signature].structured_input_signature
        return list(kwargs)

    def call(self, inputs, signature=RAW_SIGNATURE):
        """Runs a signature on ``{input: array}``; returns ``{output: NumPy array}``."""
        fn = self.signatures[signature]
        _, specs = fn.structured_input_signature
        tensors = {}
        for name, spec in specs.items():
            if name not in inputs:
                raise KeyError(f"signature {signature!r} needs input {name!r}; received {sorted(inputs)}")
            values = inputs[name]
            if spec.dtype == tf.string:
                values = np.asarray(values, dtype=object).tolist()
            tensors[name] = tf.constant(values, dtype=spec.dtype)
        return {k: v.numpy() for k, v in fn(**tensors).items()}

    def predict(self, rows):
        """Outputs of ``serving_default`` for raw rows (a DataFrame or a dict of raw values)."""
        if self.schema is None:
            raise ExportError(f"{self.path}: no tfemb schema asset; call() the signature with tensors instead")
        return self.call(raw_inputs(self.schema, rows, self.input_names()))

    def predict_encoded(self, inputs):
        """Outputs of the ``encoded`` signature for encoded ids (``Schema.transform``'s first value)."""
        return self.call({k: v for k, v in inputs.items() if k in self.input_names(ENCODED_SIGNATURE)},
                         ENCODED_SIGNATURE)


def load_export(path):
    """Loads an export (a version directory, or the base directory: its latest version) after checking it.

    Raises:
        ExportError: naming the path, when it is not an export, is partial (missing ``saved_model.pb`` or
            ``variables/``) or corrupt (a truncated ``saved_model.pb``), or TensorFlow cannot load it.
    """
    version_dir = resolve_version_dir(path)
    validate_version_dir(version_dir)
    try:
        module = tf.saved_model.load(version_dir)
    except Exception as error:  # TensorFlow raises many types here; the message says which file is wrong
        raise ExportError(f"{version_dir}: TensorFlow cannot load this SavedModel: {error}") from error
    schema = None
    schema_path = os.path.join(version_dir, "assets", SCHEMA_ASSET)
    if os.path.isfile(schema_path):
        try:
            schema = Schema.load(schema_path)
        except (ValueError, KeyError, TypeError) as error:
            raise ExportError(f"{schema_path}: unreadable schema: {error}") from error
    report = None
    try:
        report = export_report.read_report(version_dir)
    except ExportError:
        report = None
    return LoadedExport(version_dir, module, schema, report)
