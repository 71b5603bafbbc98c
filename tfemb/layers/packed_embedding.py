"""PackedEmbedding: a pruned table stored row by row as (column, value) pairs (CSR), for inference."""

import numpy as np
import tensorflow as tf

from tfemb._keras import register
from tfemb.layers.embedding_scheme import EmbeddingScheme, check_positive_int, dtype_bytes, sparse_gather

#: Largest int32 value: row offsets switch to int64 above it.
_INT32_MAX = 2**31 - 1


def column_dtype(output_dim):
    """Smallest signed integer dtype that holds a column index in ``[0, output_dim)``."""
    if output_dim <= 2**7:
        return "int8"
    if output_dim <= 2**15:
        return "int16"
    return "int32"


#: ``PackedEmbedding`` layouts: ``"csr"`` (a column index per value), ``"bitmask"`` (a bit mask of kept
#: columns per row, ``output_dim <= 64``), ``"slots"`` (each row's values and a zero, plus a small slot index per
#: cell: the fastest packed lookup, a larger index; inference only), ``"dense"`` (the pruned table as it is,
#: zeros included: one row gather, no index; inference only) and ``"auto"`` (``"bitmask"`` whenever it applies).
LAYOUTS = ("csr", "bitmask", "slots", "dense", "auto")

#: Layouts that store more than the kept values and cannot train (a trained zero would change the pattern).
INFERENCE_ONLY_LAYOUTS = ("slots", "dense")

#: ``PEPEmbedding.compact()``'s default: a table whose packed layout would save less than this fraction of the
#: dense table's bytes is exported dense (``"dense"`` layout).
MIN_SAVING = 0.25

#: Widest row a bit mask holds (an int64 per row).
_BITMASK_MAX_DIM = 64


def mask_dtype(output_dim):
    """Smallest signed integer dtype with ``output_dim`` bits (bitmask layout): int8 up to 8 dims, ... int64."""
    for bits, dtype in ((8, "int8"), (16, "int16"), (32, "int32"), (64, "int64")):
        if output_dim <= bits:
            return dtype
    raise ValueError(f"the bitmask layout holds at most {_BITMASK_MAX_DIM} dims. Received: output_dim={output_dim}")


#: Widest row whose bit mask shares one integer with the row's start (``row_index``, bitmask layout).
_ROW_INDEX_MAX_DIM = 32


def row_index_dtype(output_dim, nnz):
    """dtype of the bitmask layout's combined per-row index ``start << output_dim | mask`` (``row_index``):
    ``"int32"`` while every start (at most ``nnz``) fits in the bits above the mask, ``"int64"`` otherwise; None
    above 32 dims, where the starts and masks are stored apart (``row_splits``, ``row_masks``)."""
    if output_dim > _ROW_INDEX_MAX_DIM:
        return None
    return "int32" if int(nnz) < 2 ** (31 - int(output_dim)) else "int64"


def row_index_from_csr(row_splits, columns, output_dim, dtype):
    """The bitmask layout's ``row_index``: per row, its start in the values shifted above its bit mask."""
    masks = row_masks_from_csr(row_splits, columns, "int64").view(np.uint64) & np.uint64((1 << output_dim) - 1)
    starts = np.asarray(row_splits[:-1], dtype=np.uint64) << np.uint64(output_dim)
    return (starts | masks).astype(np.int64).astype(dtype)


def csr_parts_from_row_index(row_index, output_dim, nnz):
    """``(row_splits, masks)`` (int64, uint64) of a ``row_index`` array: its inverse."""
    row_index = np.asarray(row_index, dtype=np.int64)
    splits = np.concatenate([row_index >> output_dim, [int(nnz)]]).astype(np.int64)
    return splits, row_index.view(np.uint64) & np.uint64((1 << output_dim) - 1)


def resolve_layout(layout, output_dim):
    """``layout`` with ``"auto"`` resolved: ``"bitmask"`` up to 64 dims, else ``"csr"``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}. Received: layout={layout!r}")
    if layout == "auto":
        return "bitmask" if output_dim <= _BITMASK_MAX_DIM else "csr"
    if layout == "bitmask" and output_dim > _BITMASK_MAX_DIM:
        raise ValueError(f"layout='bitmask' holds at most {_BITMASK_MAX_DIM} dims. Received: output_dim={output_dim}")
    return layout


def _signed_bits(values, dtype):
    """uint64 NumPy bit patterns as the signed integer ``dtype`` of the same width (two's complement)."""
    width = np.dtype(dtype).itemsize * 8
    return np.asarray(values, dtype=np.uint64).astype(np.dtype(f"uint{width}")).view(dtype)


def row_masks_from_csr(row_splits, columns, dtype):
    """Per row, the bit mask of its columns (bit ``c`` set iff column ``c`` is kept), as ``dtype`` (two's
    complement: a mask with the top bit set is negative)."""
    rows = np.repeat(np.arange(len(row_splits) - 1), np.diff(row_splits))
    masks = np.zeros(len(row_splits) - 1, dtype=np.uint64)
    np.bitwise_or.at(masks, rows, np.left_shift(np.uint64(1), np.asarray(columns, dtype=np.uint64)))
    return _signed_bits(masks, dtype)


def columns_from_row_masks(masks, output_dim):
    """The CSR columns of per-row bit masks (ascending within a row, rows in order)."""
    masks = np.asarray(masks)
    bits = masks.view(np.dtype(f"uint{masks.dtype.itemsize * 8}")).astype(np.uint64)
    kept = (bits[:, None] >> np.arange(output_dim, dtype=np.uint64)[None, :]) & np.uint64(1)
    return np.nonzero(kept)[1].astype(np.int64)


def slot_offset_dtype(output_dim):
    """Smallest signed integer dtype of a slot offset in ``[0, output_dim]`` (``"slots"`` layout)."""
    return column_dtype(output_dim + 1)


def slots_from_csr(row_splits, columns, values, output_dim):
    """``(slot_splits, slot_offsets, slot_values)`` of a CSR table (``"slots"`` layout).

    Row ``r`` owns slots ``slot_splits[r]:slot_splits[r + 1]``: its kept values in column order, then one 0.
    ``slot_offsets[r, c]`` is the slot of column ``c`` within the row: the value's rank for a kept column, the
    row's length (its zero slot) for the others, so ``slot_values[slot_splits[r] + slot_offsets[r]]`` is row
    ``r`` of the dense table, exactly.
    """
    row_splits = np.asarray(row_splits, np.int64)
    rows = len(row_splits) - 1
    lengths = np.diff(row_splits)
    offsets = np.repeat(lengths[:, None], output_dim, axis=1)
    entry_rows = np.repeat(np.arange(rows), lengths)
    offsets[entry_rows, np.asarray(columns, np.int64)] = np.arange(row_splits[-1]) - row_splits[entry_rows]
    slot_splits = row_splits + np.arange(rows + 1)
    slot_values = np.zeros(int(slot_splits[-1]), dtype=np.asarray(values).dtype)
    slot_values[np.arange(row_splits[-1]) + entry_rows] = values
    return slot_splits, offsets, slot_values


def csr_from_slots(slot_splits, slot_offsets, slot_values):
    """The inverse of ``slots_from_csr``: ``(row_splits, columns, values)``."""
    slot_splits = np.asarray(slot_splits, np.int64)
    rows = len(slot_splits) - 1
    lengths = np.diff(slot_splits) - 1
    row_splits = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    kept = np.asarray(slot_offsets, np.int64) < lengths[:, None]
    columns = np.nonzero(kept)[1].astype(np.int64)  # row-major: ascending within a row, as the slots
    entry_rows = np.repeat(np.arange(rows), lengths)
    values = np.asarray(slot_values)[np.arange(row_splits[-1]) + entry_rows]
    return row_splits, columns, values


def row_splits_dtype(nnz):
    """``int32`` row offsets while ``nnz`` fits in one, else ``int64``."""
    return "int32" if nnz <= _INT32_MAX else "int64"


def to_numpy(variable):
    """A Keras 3 / Keras 2 variable (or tensor) as a NumPy array."""
    return np.asarray(tf.convert_to_tensor(variable))


def packed_storage_bytes(vocabulary_size, output_dim, nnz, value_dtype="float32", layout="csr"):
    """Bytes of a packed table: ``nnz`` values, ``vocabulary_size + 1`` row offsets and ``nnz`` column indices
    (``"csr"``); ``nnz + 1`` values (the last one a zero) and ``vocabulary_size`` row indices of the start and bit
    mask together, int32 or int64 (``"bitmask"`` up to 32 dims; above, the masks and ``vocabulary_size + 1`` row
    offsets apart); see ``PackedEmbedding`` for ``"slots"`` and ``"dense"``.

    >>> packed_storage_bytes(23, 7, 30)  # 30 x (4 + 1) + 24 x 4
    246
    >>> packed_storage_bytes(23, 7, 30, layout="bitmask")  # (30 + 1) x 4 + 23 x 4 (int32 row_index)
    216
    >>> packed_storage_bytes(23, 40, 30, layout="bitmask")  # (30 + 1) x 4 + 23 x 8 (masks) + 24 x 4 (offsets)
    404
    >>> packed_storage_bytes(23, 7, 30, layout="slots")  # (30 + 23) x 4 + 23 x 7 x 1 + 24 x 4
    469
    >>> packed_storage_bytes(23, 7, 30, layout="dense")  # 23 x 7 x 4
    644
    """
    layout = resolve_layout(layout, output_dim)
    if layout == "dense":  # the whole table, zeros included
        return int(vocabulary_size) * int(output_dim) * dtype_bytes(value_dtype)
    if layout == "slots":  # nnz values + a zero per row, a slot offset per cell, row offsets over the slots
        slots = int(nnz) + int(vocabulary_size)
        return (slots * dtype_bytes(value_dtype)
                + int(vocabulary_size) * int(output_dim) * dtype_bytes(slot_offset_dtype(output_dim))
                + (int(vocabulary_size) + 1) * dtype_bytes(row_splits_dtype(slots)))
    if layout == "bitmask":  # nnz values and a zero, one row_index per row (or a mask per row and row offsets)
        combined = row_index_dtype(output_dim, nnz)
        index = (int(vocabulary_size) * dtype_bytes(combined) if combined else
                 int(vocabulary_size) * dtype_bytes(mask_dtype(output_dim))
                 + (int(vocabulary_size) + 1) * dtype_bytes(row_splits_dtype(nnz)))
        return (int(nnz) + 1) * dtype_bytes(value_dtype) + index
    return (int(nnz) * (dtype_bytes(value_dtype) + dtype_bytes(column_dtype(output_dim)))
            + (int(vocabulary_size) + 1) * dtype_bytes(row_splits_dtype(nnz)))


def check_min_saving(min_saving):
    """``min_saving`` as a float in ``[0, 1)``, or None; a clear error otherwise."""
    if min_saving is None:
        return None
    if isinstance(min_saving, bool) or not isinstance(min_saving, (int, float, np.integer, np.floating)) \
            or not 0.0 <= float(min_saving) < 1.0:
        raise ValueError(f"compact_min_saving must be a number in [0, 1) or None. Received: compact_min_saving="
                         f"{min_saving!r}")
    return float(min_saving)


def choose_layout(layout, vocabulary_size, output_dim, nnz, value_dtype="float32", min_saving=MIN_SAVING):
    """The layout a pruned table is exported in: ``layout`` resolved, or ``"dense"`` when that packed layout
    would save less than ``min_saving`` of the dense table's bytes (None: always ``layout``).

    A packed lookup costs an index gather, index arithmetic and an element gather per id where the dense table
    costs one row gather, and on a table that keeps most of its entries the packing saves little or nothing
    (the slots layout is even larger than the dense table above ~60% kept at d = 16).

    >>> choose_layout("auto", 100, 16, 400)  # 25% kept: bitmask is 34% of the dense bytes
    'bitmask'
    >>> choose_layout("auto", 100, 16, 1400)  # 88% kept: bitmask would save 3%
    'dense'
    >>> choose_layout("auto", 100, 16, 1400, min_saving=None)
    'bitmask'
    """
    layout = resolve_layout(layout, output_dim)
    min_saving = check_min_saving(min_saving)
    if layout == "dense" or min_saving is None:
        return layout
    dense = packed_storage_bytes(vocabulary_size, output_dim, nnz, value_dtype, "dense")
    packed = packed_storage_bytes(vocabulary_size, output_dim, nnz, value_dtype, layout)
    return "dense" if packed > (1.0 - min_saving) * dense else layout


def csr_from_dense(table, mask=None):
    """``(row_splits, columns, values)`` of the entries of a ``[rows, dim]`` table selected by ``mask``.

    Args:
        table: float array ``[rows, dim]``.
        mask: optional bool array of the same shape: the entries to keep (kept even when their value is 0).
            Default: the non-zero entries of ``table``.

    Returns:
        ``row_splits`` (int64 ``[rows + 1]``: row ``r`` owns entries ``row_splits[r]:row_splits[r + 1]``),
        ``columns`` (int64 ``[nnz]``, ascending within a row) and ``values`` (``[nnz]``, the table's dtype).
    """
    table = np.asarray(table)
    if table.ndim != 2:
        raise ValueError(f"table must be a 2-D array [rows, dim]. Received: shape {table.shape}")
    mask = table != 0 if mask is None else np.asarray(mask)
    if mask.shape != table.shape:
        raise ValueError(
            f"mask must have the shape of the table, {table.shape}. Received: mask of shape {mask.shape}"
        )
    mask = mask.astype(bool)
    rows, cols = np.nonzero(mask)  # row-major: rows ascending, columns ascending within a row
    row_splits = np.concatenate([[0], np.cumsum(mask.sum(axis=1))]).astype(np.int64)
    return row_splits, cols.astype(np.int64), table[rows, cols]


@register
class PackedEmbedding(EmbeddingScheme):
    """A pruned embedding table stored physically small: per row, only its kept values and their columns.

    The table ``T`` (``vocabulary_size x output_dim``, most entries zero) is held in compressed-sparse-row form:

    - ``row_splits`` (``vocabulary_size + 1`` ints, int32 or int64): the entries of row ``r`` are
      ``row_splits[r]:row_splits[r + 1]``;
    - ``columns`` (``nnz`` ints, int8 up to 128 dims, else int16 / int32): each entry's column (``layout="csr"``,
      the default), or a bit mask per row of ``output_dim`` bits, at most 64 dims: bit ``c`` of row ``r``'s mask
      is set iff column ``c`` is kept (``layout="bitmask"``, below);
    - ``values`` (``nnz`` floats): each entry's value.

    ``layout="auto"`` is ``"bitmask"`` up to 64 dims, else ``"csr"``; ``PEPEmbedding.compact()`` uses it. A
    bitmask lookup reads column ``c`` of a row from entry ``start + popcount(mask & (2**c - 1))`` and zeroes the
    columns whose bit is clear (a gather, bitwise ops, one select: fewer ops than the CSR lookup below, no
    scatter). Up to 32 dims the row's start and mask share one integer, ``row_index = start << output_dim |
    mask`` (``vocabulary_size`` ints, int32 while ``nnz < 2**(31 - output_dim)``, else int64), so a lookup gathers
    one index instead of two; above 32 dims they are stored apart (``row_splits`` and ``row_masks``). ``values``
    ends with one zero (``nnz + 1`` floats): a pruned column after a row's last kept value reads the next row's
    first value or that zero, inside the buffer, so no clipping is needed. Its index bytes are
    ``vocabulary_size x (4 or 8)`` instead of ``nnz x column bytes + (vocabulary_size + 1) x offset bytes``:
    smaller when rows keep more than ~1 of 16 dims, larger for nearly empty tables.

    ``layout="slots"`` (inference only) stores each row's kept values followed by one 0 (``values`` holds ``nnz +
    vocabulary_size`` floats; ``row_splits`` indexes them) and ``slot_offsets`` (``vocabulary_size x output_dim``
    small ints, int8 below 128 dims): the slot of each cell within its row, the value's rank for a kept column
    and the row's zero for a pruned one. A lookup is ``values[row_splits[id] + slot_offsets[id]]``: two index
    gathers, an add and one gather, the fewest ops of the three layouts, for ``V x (d + 4)`` more bytes than
    the bitmask at int8 offsets. ``parameter_count()`` is still ``nnz``.

    ``layout="dense"`` (inference only) stores the pruned table as it is, ``[vocabulary_size, output_dim]`` values
    with its zeros: one row gather per lookup, as a fixed table, and no index. ``PEPEmbedding.compact()`` uses it
    for a table whose packed layout would save less than ``compact_min_saving`` of these bytes
    (``choose_layout``). ``parameter_count()`` is still ``nnz``; ``storage_bytes()`` counts every stored value.

    A CSR lookup reads ``output_dim`` entry slots per id from its start (clipped into the buffer; the slots past the
    id's length are zeroed) and adds each value into its ``(row, column)`` cell with one
    ``tf.math.unsorted_segment_sum`` (``tf.gather``, ``tf.where``, ``unsorted_segment_sum``: stock TensorFlow ops,
    a fixed number per lookup). Every cell receives at most one non-zero value, so the outputs equal ``T[ids]``
    exactly, bit for bit.

    ``parameter_count()`` is ``nnz``; ``storage_bytes()`` counts the values and both index arrays
    (``nnz x (value bytes + column bytes) + (vocabulary_size + 1) x offset bytes``), so the packed table is
    smaller than the dense one when fewer than about ``(4d - 4) / (5d)`` of the entries are kept (float32
    values, int8 columns, int32 offsets: 75% at d = 16).

    It is the ``compact()`` form of ``PEPEmbedding``; build one from any dense table with ``from_dense``. The
    layer is frozen by default (``trainable=False``); with ``trainable=True`` only the kept values train
    (their gradient is row-sparse over entries and listed in ``sparse_tables()``), the zero pattern never changes.

    Args:
        vocabulary_size: int, number of ids (OOV id 0 included).
        output_dim: int, embedding dimension.
        nnz: int >= 0, number of stored entries.
        layout: ``"csr"`` (default), ``"bitmask"`` (``output_dim <= 64``), ``"slots"`` or ``"dense"``
            (``trainable=False`` only) or ``"auto"``.
        **kwargs: ``combiner``, ``frequencies``, ``validate_ids`` and base Layer arguments.

    Input shape:
        int tensor ``[batch]`` or ``[batch, k]``.

    Output shape:
        ``[batch, output_dim]`` / ``[batch, k, output_dim]``, or ``[batch, output_dim]`` with a combiner.

    Example:

    >>> table = np.zeros((23, 7), "float32"); table[5, [0, 3]] = [1.5, -2.0]; table[22, 6] = 0.25
    >>> packed = PackedEmbedding.from_dense(table)
    >>> packed(tf.constant([5, 0, 22])).numpy()[:, [0, 3, 6]].tolist()
    [[1.5, -2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.25]]
    >>> packed.parameter_count(), packed.storage_bytes()  # 3 x (4 + 1) + 24 x 4
    (3, 111)
    """

    def __init__(self, vocabulary_size, output_dim, nnz, layout="csr", **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(vocabulary_size, output_dim, **kwargs)
        self.layout = resolve_layout(layout, self.output_dim)
        self.nnz = check_positive_int("nnz", nnz, minimum=0)
        if self.layout in INFERENCE_ONLY_LAYOUTS and self.trainable:
            raise ValueError(f"{self.name}: layout={self.layout!r} is inference-only (training would change the "
                             "stored zeros). "
                             "Received: trainable=True")
        if self.nnz > self.vocabulary_size * self.output_dim:
            raise ValueError(
                f"nnz must be <= vocabulary_size * output_dim = {self.vocabulary_size * self.output_dim}. "
                f"Received: nnz={self.nnz}"
            )

    @classmethod
    def from_dense(cls, table, mask=None, **kwargs):
        """A built ``PackedEmbedding`` holding ``table`` (``[vocabulary_size, output_dim]``).

        Args:
            table: float array-like ``[vocabulary_size, output_dim]``.
            mask: optional bool array of the same shape, the entries to store (default: non-zeros of ``table``).
            **kwargs: other constructor arguments (``name``, ``combiner``, ``dtype``, ...).
        """
        table = np.asarray(table)
        row_splits, columns, values = csr_from_dense(table, mask)
        layer = cls(table.shape[0], table.shape[1], int(values.shape[0]), **kwargs)
        layer.build()
        value_dtype = np.float32 if layer.variable_dtype is None else layer.variable_dtype
        if layer.layout == "dense":
            kept = np.zeros(table.shape, dtype=value_dtype)
            kept[np.repeat(np.arange(table.shape[0]), np.diff(row_splits)), columns] = values
            layer.values.assign(kept)
            return layer
        if layer.layout == "slots":
            slot_splits, offsets, slot_values = slots_from_csr(row_splits, columns, values, table.shape[1])
            layer.row_splits.assign(slot_splits.astype(layer.row_splits_dtype))
            layer.slot_offsets.assign(offsets.astype(layer.slot_offset_dtype))
            layer.values.assign(slot_values.astype(value_dtype))
            return layer
        if layer.layout == "bitmask":
            if layer.row_index_dtype:
                layer.row_index.assign(row_index_from_csr(row_splits, columns, table.shape[1], layer.row_index_dtype))
            else:
                layer.row_splits.assign(row_splits.astype(layer.row_splits_dtype))
                layer.row_masks.assign(row_masks_from_csr(row_splits, columns, layer.mask_dtype))
            layer.values.assign(np.append(values, 0).astype(value_dtype))  # the zero that pruned columns read
            return layer
        layer.row_splits.assign(row_splits.astype(layer.row_splits_dtype))
        layer.columns.assign(columns.astype(layer.column_dtype))
        layer.values.assign(values.astype(value_dtype))
        return layer

    @property
    def column_dtype(self):
        return column_dtype(self.output_dim)

    @property
    def row_splits_dtype(self):
        return row_splits_dtype(self.nnz + (self.vocabulary_size if self.layout == "slots" else 0))

    @property
    def slot_offset_dtype(self):
        return slot_offset_dtype(self.output_dim)

    @property
    def mask_dtype(self):
        return mask_dtype(self.output_dim)

    @property
    def row_index_dtype(self):
        """The bitmask layout's combined per-row index dtype (None: starts and masks apart, or another layout)."""
        return row_index_dtype(self.output_dim, self.nnz) if self.layout == "bitmask" else None

    def build(self, input_shape=None):
        # Before from_dense or loaded weights fill it, the layer holds a valid layout of zeros: the first nnz
        # entries of the table in row-major order.
        d, nnz = self.output_dim, self.nnz
        splits = np.minimum(np.arange(self.vocabulary_size + 1) * d, nnz)
        self.columns = self.row_masks = self.slot_offsets = self.row_splits = self.row_index = None
        if self.layout == "dense":
            self.values = self.add_weight(name="values", shape=(self.vocabulary_size, d), initializer="zeros",
                                          trainable=False)
            self.built = True
            return
        if self.layout == "slots":
            slot_splits, offsets, _ = slots_from_csr(splits, np.arange(nnz) % d, np.zeros(nnz, np.float32), d)
            self.row_splits = self.add_weight(
                name="row_splits", shape=(self.vocabulary_size + 1,), dtype=self.row_splits_dtype, trainable=False,
                initializer=lambda shape, dtype=None: tf.constant(slot_splits, self.row_splits_dtype),
            )
            self.slot_offsets = self.add_weight(
                name="slot_offsets", shape=(self.vocabulary_size, d), dtype=self.slot_offset_dtype, trainable=False,
                initializer=lambda shape, dtype=None: tf.constant(offsets, self.slot_offset_dtype),
            )
            self.values = self.add_weight(name="values", shape=(nnz + self.vocabulary_size,), initializer="zeros",
                                          trainable=False)
            self.built = True
            return
        if self.layout == "bitmask":
            columns = np.arange(nnz) % d
            if self.row_index_dtype:
                index = row_index_from_csr(splits, columns, d, self.row_index_dtype)
                self.row_index = self.add_weight(
                    name="row_index", shape=(self.vocabulary_size,), dtype=self.row_index_dtype, trainable=False,
                    initializer=lambda shape, dtype=None: tf.constant(index, self.row_index_dtype),
                )
            else:
                masks = row_masks_from_csr(splits, columns, self.mask_dtype)
                self.row_splits = self.add_weight(
                    name="row_splits", shape=(self.vocabulary_size + 1,), dtype=self.row_splits_dtype,
                    trainable=False, initializer=lambda shape, dtype=None: tf.constant(splits, self.row_splits_dtype),
                )
                self.row_masks = self.add_weight(
                    name="row_masks", shape=(self.vocabulary_size,), dtype=self.mask_dtype, trainable=False,
                    initializer=lambda shape, dtype=None: tf.constant(masks, self.mask_dtype),
                )
            # The kept values, then one zero: the entry a pruned column past its row's last value reads.
            self.values = self.add_weight(name="values", shape=(nnz + 1,), initializer="zeros", trainable=True)
            self.built = True
            return
        self.row_splits = self.add_weight(
            name="row_splits", shape=(self.vocabulary_size + 1,), dtype=self.row_splits_dtype, trainable=False,
            initializer=lambda shape, dtype=None: tf.constant(splits, self.row_splits_dtype),
        )
        self.columns = self.add_weight(
            name="columns", shape=(nnz,), dtype=self.column_dtype, trainable=False,
            initializer=lambda shape, dtype=None: tf.constant(np.arange(nnz) % d, self.column_dtype),
        )
        self.values = self.add_weight(name="values", shape=(nnz,), initializer="zeros", trainable=True)
        self.built = True

    def lookup(self, ids):
        d = self.output_dim
        if self.layout == "dense":
            return self.gather_rows(self.values, ids)  # [*ids.shape, d]: a fixed table's lookup
        if self.layout == "slots":
            flat = ids if ids.shape.rank == 1 else tf.reshape(ids, [-1])
            out = self._slots_lookup(flat)
            return out if ids.shape.rank == 1 else tf.reshape(out, tf.concat([tf.shape(ids), [d]], axis=0))
        if self.layout == "bitmask" and self.nnz and ids.shape.rank == 1:
            return self._bitmask_lookup(ids)  # [n, d] already: no reshapes (serving calls this per feature)
        flat = tf.reshape(ids, [-1])  # [n]
        n = tf.shape(flat, out_type=tf.int64)[0]
        if self.nnz == 0:  # nothing kept: every vector is zero (and there is no entry to gather)
            dense = tf.zeros(tf.stack([n, tf.constant(d, tf.int64)]), self.compute_dtype)
            return tf.reshape(dense, tf.concat([tf.shape(ids), [d]], axis=0))
        if self.layout == "bitmask":
            return tf.reshape(self._bitmask_lookup(flat), tf.concat([tf.shape(ids), [d]], axis=0))
        splits = tf.cast(tf.convert_to_tensor(self.row_splits), tf.int64)
        starts = tf.gather(splits, flat)  # [n]
        lengths = tf.gather(splits, flat + 1) - starts  # [n], kept dims of each id
        # Every id reads d entry slots, start + 0..d-1 (clipped into the buffer); the slots beyond its length are
        # zeroed, and each value lands in its (row, column) cell by one segment sum (x + 0 == x, so the output is
        # exactly the stored values). A fixed number of ops per lookup: no tf.repeat / cumsum / scatter_nd.
        k = tf.range(d, dtype=tf.int64)
        positions = tf.minimum(starts[:, tf.newaxis] + k[tf.newaxis, :], self.nnz - 1)  # [n, d]
        valid = k[tf.newaxis, :] < lengths[:, tf.newaxis]
        values = self.gather_rows(self.values, positions)  # [n, d]; the hook export uses for int8 / float16
        values = tf.where(valid, values, tf.zeros_like(values))
        columns = tf.cast(tf.gather(self.columns, positions), tf.int64)  # [n, d]
        cells = tf.range(n)[:, tf.newaxis] * d + columns
        dense = tf.math.unsorted_segment_sum(tf.reshape(values, [-1]), tf.reshape(cells, [-1]), n * d)
        return tf.reshape(dense, tf.concat([tf.shape(ids), [d]], axis=0))

    def _slots_lookup(self, flat):
        """``[n, d]`` rows of ids ``flat`` from the slots layout: cell ``(r, c)`` is slot ``row_splits[r] +
        slot_offsets[r, c]``, a kept value or the row's zero. Two gathers of the index, one add, one gather of
        values: no select, no clipping (every slot index is inside the buffer)."""
        splits = tf.reshape(tf.convert_to_tensor(self.row_splits), [-1, 1])  # [V + 1, 1]: starts come out [n, 1]
        starts = tf.gather(splits, flat)  # [n, 1]
        offsets = tf.cast(sparse_gather(self.slot_offsets, flat), starts.dtype)  # [n, d]
        return self.gather_rows(self.values, starts + offsets)  # [n, d]; the export's hook

    def _bitmask_lookup(self, flat):
        """``[n, d]`` rows of ids ``flat`` from the bitmask layout: column ``c`` of a row with mask ``m`` is kept
        iff bit ``c`` of ``m`` is set, and its value is entry ``start + popcount(m & (2**c - 1))`` (the number of
        kept columns before it). Every column reads one entry (a pruned column after the row's last value reads
        the next row's first, or the trailing zero) and the columns not kept are zeroed: one index gather (up to
        32 dims, the start and the mask in one integer), a shift, bitwise ops, a gather of values and a select;
        no clipping, no scatter."""
        d = self.output_dim
        combined = self.row_index_dtype
        dtype = tf.as_dtype(combined or self.mask_dtype)
        bits = np.left_shift(np.uint64(1), np.arange(d, dtype=np.uint64))
        low = tf.constant(_signed_bits(bits - np.uint64(1), dtype.name))  # [d]: the columns before c
        bit = tf.constant(_signed_bits(bits, dtype.name))  # [d]: column c
        column = tf.expand_dims(flat, 1)  # [n, 1]
        if combined:  # one index gather: the start above the mask
            masks = sparse_gather(self.row_index, column)  # [n, 1]
            starts = tf.bitwise.right_shift(masks, tf.constant(d, dtype))  # [n, 1]
        else:
            starts = sparse_gather(self.row_splits, column)  # [n, 1]
            masks = sparse_gather(self.row_masks, column)  # [n, 1]
        before = tf.cast(tf.raw_ops.PopulationCount(x=tf.bitwise.bitwise_and(masks, low)), starts.dtype)  # [n, d]
        # At most the next row's start (nnz for the last row): inside the values, whose last entry is a zero.
        values = self.gather_rows(self.values, starts + before)  # [n, d]; the export's hook
        kept = tf.not_equal(tf.bitwise.bitwise_and(masks, bit), tf.zeros([], dtype))
        return tf.where(kept, values, tf.constant(0, values.dtype))

    # -------------------------------------------------------------------------------------- size accounting
    def parameter_count(self):
        return self.nnz

    def storage_bytes(self):
        return packed_storage_bytes(self.vocabulary_size, self.output_dim, self.nnz, self.variable_dtype or "float32",
                                    self.layout)

    def dims_per_id(self):
        return np.diff(self._csr()[0])

    def _csr(self):
        if not self.built:
            self.build()
        if self.layout == "dense":  # the stored non-zeros (a kept entry whose value is 0 reads as pruned)
            return csr_from_dense(to_numpy(self.values))
        if self.layout == "slots":
            return csr_from_slots(to_numpy(self.row_splits), to_numpy(self.slot_offsets), to_numpy(self.values))
        if self.layout == "bitmask":
            values = to_numpy(self.values)[:self.nnz]  # without the trailing zero
            if self.row_index_dtype:
                splits, masks = csr_parts_from_row_index(to_numpy(self.row_index), self.output_dim, self.nnz)
                return splits, columns_from_row_masks(masks, self.output_dim), values
            masks = to_numpy(self.row_masks)
            return to_numpy(self.row_splits).astype(np.int64), columns_from_row_masks(masks, self.output_dim), values
        splits = to_numpy(self.row_splits).astype(np.int64)
        return splits, to_numpy(self.columns).astype(np.int64), to_numpy(self.values)

    def stored_mask(self):
        """Bool array ``[vocabulary_size, output_dim]``: the entries the layer stores."""
        splits, columns, _ = self._csr()
        mask = np.zeros((self.vocabulary_size, self.output_dim), dtype=bool)
        mask[np.repeat(np.arange(self.vocabulary_size), np.diff(splits)), columns] = True
        return mask

    def to_dense(self):
        """The table as a dense NumPy array ``[vocabulary_size, output_dim]``."""
        splits, columns, values = self._csr()
        table = np.zeros((self.vocabulary_size, self.output_dim), dtype=values.dtype)
        table[np.repeat(np.arange(self.vocabulary_size), np.diff(splits)), columns] = values
        return table

    def compact(self):
        """Already the inference form: a frozen copy."""
        config = {k: v for k, v in self.get_config().items() if k not in ("vocabulary_size", "output_dim", "nnz")}
        config.update(trainable=False, frequencies=None)
        return PackedEmbedding.from_dense(self.to_dense(), mask=self.stored_mask(), **config)

    def sparse_tables(self):
        return [self.values] if self.trainable else []

    def get_config(self):
        config = super().get_config()
        config["nnz"] = self.nnz
        config["layout"] = self.layout
        return config
