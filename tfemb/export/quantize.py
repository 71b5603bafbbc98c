"""Table storage at export: int8 or int16 with a per-row scale, or float16, dequantised in-graph.

Any embedding scheme can be stored this way because every scheme reads its tables through
``EmbeddingScheme.gather_rows``: ``quantize_scheme`` traces the compact layer once to find the tables it gathers
from, gives each a ``QuantizedTable``, and overrides that hook on the layer, so the exported graph gathers the
stored rows (and their scales) and dequantises only the rows a request looks up. Projections, dense layers and
index arrays (remaps, permutations, packed column indices) keep their dtype.

Storage and the error of one dequantised element ``x̂`` against the float32 value ``x`` (the bounds
``element_error_bound`` returns and the tests check):

- ``"int8"``: symmetric scale per row ``r`` of a 2-D table, ``s_r = max_j |x_rj| / 127``; ``q = round(x / s_r)``
  in ``[-127, 127]``; ``x̂ = q * s_r``. ``|x̂ - x| <= s_r / 2 = max_j |x_rj| / 254`` (times ``1 + 1e-5`` for
  float32 rounding of the scale and the product). Storage ``rows * cols`` bytes + 4 bytes of scale per row. A
  row of zeros stays exactly zero. A 1-D table (the kept values of a packed, pruned table) has no rows: it
  gets one scale per block of ``INT8_BLOCK`` consecutive entries, with the same bound over the block.
- ``"int16"``: the same with ``32767`` in place of ``127`` (the per-row-scaled int16 tables of Baidu's
  SIGMOD 2021 CTR training system, here as export storage): ``|x̂ - x| <= max_j |x_rj| / 65534`` (times
  ``1 + 1e-2``: float32 rounding of ``q * s_r`` is no longer negligible next to the quantisation step). Storage
  ``2 · rows * cols`` bytes + 4 bytes of scale per row.
- ``"float16"``: ``x̂ = float32(float16(x))``. ``|x̂ - x| <= 2**-11 |x| + 2**-25`` (half a float16 ulp; the
  second term covers subnormals). Storage 2 bytes per value. Tables with values beyond float16's range
  (65504) are refused.

Example:

>>> values = np.array([[0.5, -0.25], [0.0, 0.0]], dtype=np.float32)
>>> q, scale = quantize_int8(values)
>>> q.tolist(), scale.tolist()
([[127, -64], [0, 0]], [0.003937007859349251, 0.0])
>>> bool(np.all(np.abs(dequantize_int8(q, scale) - values) <= element_error_bound(values, "int8")))
True
"""

import numpy as np
import tensorflow as tf

#: Table storage dtypes accepted by ``export_saved_model(table_dtype=...)``; None and "float32" keep the tables.
TABLE_DTYPES = (None, "float32", "float16", "int8", "int16")

INT8_MAX = 127
#: Largest stored magnitude of each integer storage (symmetric: ``-max..max``).
INT_MAX = {"int8": INT8_MAX, "int16": 32767}
FLOAT16_MAX = float(np.finfo(np.float16).max)
#: Entries per int8 scale of a 1-D table (the values of a packed table, which has no rows).
INT8_BLOCK = 64
#: Relative slack of the int8 bound for float32 rounding of the scale and of ``q * scale``.
INT8_ROUNDING_SLACK = 1e-5
#: The same per integer storage: int16's step is 258 times finer, so float32 rounding takes a larger share.
INT_ROUNDING_SLACK = {"int8": INT8_ROUNDING_SLACK, "int16": 1e-2}


def check_table_dtype(table_dtype):
    """Normalises ``table_dtype`` (None, "float32", "float16", "int8", "int16"); ``ValueError`` otherwise."""
    if table_dtype is not None and not isinstance(table_dtype, str):
        table_dtype = tf.as_dtype(table_dtype).name
    if table_dtype not in TABLE_DTYPES:
        raise ValueError(f"table_dtype must be one of {TABLE_DTYPES}. Received: table_dtype={table_dtype!r}")
    return None if table_dtype == "float32" else table_dtype


def _blocks(values):
    """A 1-D table as ``[ceil(n / INT8_BLOCK), INT8_BLOCK]`` rows (zero padded); 2-D tables as they are."""
    if values.ndim == 2:
        return values
    padded = np.zeros(-(-values.shape[0] // INT8_BLOCK) * INT8_BLOCK, dtype=values.dtype)
    padded[: values.shape[0]] = values
    return padded.reshape(-1, INT8_BLOCK)


def _check_rank(values):
    if values.ndim not in (1, 2):
        raise ValueError(f"table storage needs a 1-D or 2-D table. Received: shape {values.shape}")


def quantize_int(values, table_dtype="int8"):
    """``(q, scale)``: ``table_dtype`` (``"int8"`` or ``"int16"``) values of ``values``' shape and float32 scales,
    ``values ≈ q * scale[row]``, ``|q| <= INT_MAX[table_dtype]``.

    A 2-D table has one scale per row; a 1-D table one per block of ``INT8_BLOCK`` entries.
    """
    if table_dtype not in INT_MAX:
        raise ValueError(f"integer table storage is one of {tuple(INT_MAX)}. Received: table_dtype={table_dtype!r}")
    limit = INT_MAX[table_dtype]
    values = np.asarray(values, dtype=np.float32)
    _check_rank(values)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{table_dtype} storage needs finite table values. Received: a NaN or infinite value")
    rows = _blocks(values).astype(np.float64)
    amax = np.max(np.abs(rows), axis=1) if rows.shape[1] else np.zeros(rows.shape[0])
    scale = amax / limit  # [rows]
    safe = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint(rows / safe[:, None]), -limit, limit).astype(table_dtype)
    if values.ndim == 1:
        q = q.reshape(-1)[: values.shape[0]]
    return q, scale.astype(np.float32)


def quantize_int8(values):
    """``quantize_int(values, "int8")``."""
    return quantize_int(values, "int8")


def dequantize_int8(q, scale):
    """NumPy reference of the in-graph dequantisation of int8 or int16 values (float32, as the graph computes
    it)."""
    q = np.asarray(q)
    scale = np.asarray(scale, dtype=np.float32)
    if q.ndim == 1:
        return q.astype(np.float32) * scale[np.arange(q.shape[0]) // INT8_BLOCK]
    return q.astype(np.float32) * scale[:, None]


def to_float16(values, name="table"):
    """``values`` as float16; raises ``ValueError`` naming ``name`` when a value exceeds float16's range."""
    values = np.asarray(values, dtype=np.float32)
    big = np.abs(values) > FLOAT16_MAX
    if np.any(big) or not np.all(np.isfinite(values)):
        worst = values[big | ~np.isfinite(values)].flat[0]
        raise ValueError(
            f"{name}: float16 storage holds values up to {FLOAT16_MAX:g}. Received: a value of {worst}; export this "
            "table with table_dtype='int8' or None"
        )
    return values.astype(np.float16)


def dequantized(values, table_dtype):
    """The float32 values the exported graph reads for a table stored as ``table_dtype`` (NumPy)."""
    table_dtype = check_table_dtype(table_dtype)
    values = np.asarray(values, dtype=np.float32)
    if table_dtype is None:
        return values
    if table_dtype == "float16":
        return to_float16(values).astype(np.float32)
    return dequantize_int8(*quantize_int(values, table_dtype))


def element_error_bound(values, table_dtype):
    """Bound on ``|dequantized - values|`` for every element (NumPy array of the table's shape)."""
    table_dtype = check_table_dtype(table_dtype)
    values = np.asarray(values, dtype=np.float32)
    if table_dtype is None:
        return np.zeros_like(values)
    if table_dtype == "float16":
        return np.abs(values) * 2.0**-11 + 2.0**-25
    _check_rank(values)
    rows = _blocks(values)
    bound = np.max(np.abs(rows), axis=1, keepdims=True) / (2 * INT_MAX[table_dtype]) * \
        (1 + INT_ROUNDING_SLACK[table_dtype])
    bound = np.broadcast_to(bound, rows.shape)
    return bound.reshape(-1)[: values.shape[0]].copy() if values.ndim == 1 else bound.copy()


def _numpy(variable):
    return tf.convert_to_tensor(variable).numpy()


def short_name(variable):
    """``"embeddings"`` from a Keras 3 name or a Keras 2 ``"layer/embeddings:0"``."""
    return str(variable.name).split("/")[-1].split(":")[0]


class QuantizedTable(tf.Module):
    """A table stored as int8 or int16 + float32 scales (per row, or per block of a 1-D table), or as float16;
    ``gather`` dequantises the gathered rows.

    Args:
        values: float32 NumPy array ``[rows, cols]`` (or ``[entries]``), the trained table.
        table_dtype: ``"int8"``, ``"int16"`` or ``"float16"``.
        name: name of the table (used for the variables and in reports).
    """

    def __init__(self, values, table_dtype, name):
        super().__init__(name=None)
        self.table_dtype = check_table_dtype(table_dtype)
        if self.table_dtype is None:
            raise ValueError("QuantizedTable needs table_dtype 'int8', 'int16' or 'float16'. Received: None")
        self.table_name = str(name)
        values = np.asarray(values, dtype=np.float32)
        _check_rank(values)
        self.shape = tuple(int(s) for s in values.shape)
        if self.table_dtype in INT_MAX:
            q, scale = quantize_int(values, self.table_dtype)
            self.values = tf.Variable(q, trainable=False, name=f"{self.table_name}_{self.table_dtype}")
            self.scales = tf.Variable(scale, trainable=False, name=f"{self.table_name}_scale")
        else:
            self.values = tf.Variable(to_float16(values, self.table_name), trainable=False,
                                      name=f"{self.table_name}_float16")
            self.scales = None

    @classmethod
    def from_codes(cls, codes, scales, table_dtype, name):
        """A table stored as given integer ``codes`` ``[rows, cols]`` and per-row ``scales`` ``[rows]``, with no
        further rounding (a low-precision-trained table, ``LowPrecisionEmbedding``: its values are exactly
        ``codes * scales``)."""
        table_dtype = check_table_dtype(table_dtype)
        if table_dtype not in INT_MAX:
            raise ValueError(f"from_codes stores int8 or int16 codes. Received: table_dtype={table_dtype!r}")
        codes = np.asarray(codes)
        info = np.iinfo(table_dtype)
        if codes.ndim != 2 or codes.min(initial=0) < info.min or codes.max(initial=0) > info.max:
            raise ValueError(f"{name}: codes must be a 2-D array within {table_dtype}'s range. Received: shape "
                             f"{codes.shape}, range [{codes.min(initial=0)}, {codes.max(initial=0)}]")
        scales = np.asarray(scales, dtype=np.float32).reshape(-1)
        if scales.shape[0] != codes.shape[0]:
            raise ValueError(f"{name}: one scale per row of the codes. Received: {scales.shape[0]} scales for "
                             f"{codes.shape[0]} rows")
        table = cls.__new__(cls)
        tf.Module.__init__(table, name=None)
        table.table_dtype = table_dtype
        table.table_name = str(name)
        table.shape = tuple(int(s) for s in codes.shape)
        table.values = tf.Variable(codes.astype(table_dtype), trainable=False, name=f"{table.table_name}_{table_dtype}")
        table.scales = tf.Variable(scales, trainable=False, name=f"{table.table_name}_scale")
        return table

    def gather(self, rows, dtype=tf.float32):
        """Dequantised rows: ``[*rows.shape, cols]`` (``[*rows.shape]`` for a 1-D table) of ``dtype``."""
        stored = tf.gather(self.values, rows)  # int8, int16 or float16
        if self.scales is None:
            return tf.cast(stored, dtype)
        if len(self.shape) == 1:
            scale = tf.gather(self.scales, tf.math.floordiv(rows, INT8_BLOCK))  # [...], one per block
            return tf.cast(tf.cast(stored, tf.float32) * scale, dtype)
        scale = tf.gather(self.scales, rows)  # [...], one per row
        return tf.cast(tf.cast(stored, tf.float32) * scale[..., tf.newaxis], dtype)

    def parameter_count(self):
        return int(np.prod(self.shape))

    def storage_bytes(self):
        if self.table_dtype == "int8":
            return self.parameter_count() + 4 * int(self.scales.shape[0])
        if self.table_dtype == "int16":
            return 2 * self.parameter_count() + 4 * int(self.scales.shape[0])
        return self.parameter_count() * 2

    def dequantized(self):
        """The float32 table the graph reads (NumPy)."""
        if self.scales is None:
            return self.values.numpy().astype(np.float32)
        return dequantize_int8(self.values.numpy(), self.scales.numpy())

    def storage_variables(self):
        return [self.values] + ([] if self.scales is None else [self.scales])


def gathered_tables(layer):
    """The float tables ``layer`` reads through ``gather_rows``, in order of first use.

    Found by tracing ``layer.lookup`` on ids ``[None]`` with a recording hook (graph code runs every branch,
    so every table a lookup can read is seen once).
    """
    recorded = []
    previous = layer.__dict__.get("gather_rows")  # an override already installed (quantize_scheme)
    if previous is not None:
        base_gather = previous
    else:
        def base_gather(table, rows):
            return type(layer).gather_rows(layer, table, rows)

    def record(table, rows):
        if not any(t is table for t in recorded):
            recorded.append(table)
        return base_gather(table, rows)

    object.__setattr__(layer, "gather_rows", record)
    try:
        tf.function(layer.lookup, autograph=False).get_concrete_function(tf.TensorSpec([None], tf.int64))
    finally:
        if previous is None:
            layer.__dict__.pop("gather_rows", None)
        else:
            object.__setattr__(layer, "gather_rows", previous)
    return [t for t in recorded if tf.as_dtype(t.dtype).is_floating]


def quantize_scheme(layer, table_dtype, tables=None):
    """Stores every table ``layer`` gathers from as ``table_dtype``; returns ``[(table, QuantizedTable)]``.

    ``layer`` should be a compact (inference-only) layer: this changes how it reads its tables, by overriding
    its ``gather_rows`` hook; the float tables stay on the layer but are no longer read, so an export does not
    save them. ``table_dtype`` None or ``"float32"`` changes nothing and returns ``[]``. Each pair holds the
    original table variable (variables are not hashable, hence pairs) and its ``QuantizedTable``.
    ``tables``: the tables to store, default ``gathered_tables(layer)``.
    """
    table_dtype = check_table_dtype(table_dtype)
    if table_dtype is None:
        return []
    if getattr(layer, "_tfemb_quantized", None):
        raise ValueError(f"{layer.name}: its tables are already stored as {layer._tfemb_quantized_dtype}")
    storage = {}
    for table in gathered_tables(layer) if tables is None else tables:
        storage[id(table)] = (table, QuantizedTable(_numpy(table), table_dtype, f"{layer.name}_{short_name(table)}"))
    return _install(layer, storage, table_dtype)


def _install(layer, storage, table_dtype):
    """Makes ``layer`` read the tables of ``storage`` (``id(table) -> (table, QuantizedTable)``) through its
    ``gather_rows`` hook; returns ``[(table, QuantizedTable)]``."""
    base_gather = type(layer).gather_rows

    def gather_rows(table, rows):
        entry = storage.get(id(table))
        if entry is None:
            return base_gather(layer, table, rows)
        return entry[1].gather(rows, dtype=tf.as_dtype(table.dtype))

    # Plain attributes, not tracked by Keras: the export chooses what it saves (the graph's captures).
    object.__setattr__(layer, "gather_rows", gather_rows)
    object.__setattr__(layer, "_tfemb_quantized", storage)
    object.__setattr__(layer, "_tfemb_quantized_dtype", table_dtype)
    return list(storage.values())


def store_codes(layer, table, codes, scales, table_dtype):
    """Stores ``table`` (a variable ``layer`` gathers through ``gather_rows``) as the given integer ``codes`` and
    per-row ``scales`` (``QuantizedTable.from_codes``: exact, no re-rounding), as ``quantize_scheme`` would; the
    compact layer of a low-precision-trained table (``LowPrecisionEmbedding.compact``). The exporter keeps this
    storage whatever its ``table_dtype``. Returns ``[(table, QuantizedTable)]``."""
    stored = QuantizedTable.from_codes(codes, scales, table_dtype, f"{layer.name}_{short_name(table)}")
    return _install(layer, {id(table): (table, stored)}, stored.table_dtype)


def quantized_tables(layer):
    """``[(original table, QuantizedTable)]`` of a layer given to ``quantize_scheme`` (``[]`` otherwise)."""
    return list(getattr(layer, "_tfemb_quantized", {}).values())
