"""MultiDimEmbedding: ids stored at one of several dimensions, each lifted to the output dim (AutoEmb's export)."""

import numpy as np
import tensorflow as tf

from tfemb._keras import register
from tfemb.layers.embedding_scheme import EmbeddingScheme, check_positive_int, dtype_bytes

#: ``"hard"``: each id stored once, in one block; ``"soft"``: each id in every block, outputs weighted per id.
MULTI_DIM_SELECTIONS = ("hard", "soft")

ACTIVATIONS = {"tanh": tf.tanh, "linear": tf.identity}


@register
class MultiDimEmbedding(EmbeddingScheme):
    """Blocks of rows at different dimensions, each with an affine map to ``output_dim`` and an activation.

    Block ``b`` has a table ``E_b`` (``[rows_b, dims_b]``), a kernel ``K_b`` (``[dims_b, output_dim]``) and a
    bias ``c_b``. With ``selection="hard"`` every id lives in exactly one block, at row ``remap[id]`` of the
    concatenated blocks (int32 ``[vocabulary_size]``)::

        e(id) = act(E_b[r] · K_b + c_b),  b = the block holding row remap[id], r = its row inside the block

    With ``selection="soft"`` every block holds every id (``rows_b = vocabulary_size``) and the output is a
    per-id weighted sum, ``e(id) = Σ_b w[id, b] · act(E_b[id] · K_b + c_b)`` (``w``: ``[vocabulary_size,
    blocks]``, or ``[1, blocks]`` shared by all ids with ``shared_weights=True``).

    It is the ``compact()`` form of ``AutoEmbEmbedding``: the hard form stores each id once at the dimension its
    search selected, with the candidate's linear transform and frozen batch normalisation folded into ``K_b``
    and ``c_b`` and ``act = tanh``; the soft form is the exact soft model with the controller's weights frozen
    per id. Lookups use stock ops only (``Gather``, ``UpperBound``, ``DynamicPartition``, ``MatMul``,
    ``DynamicStitch``, ``Tanh``); tables are read through ``gather_rows``, so int8 / float16 export applies.
    The layer is frozen by default (``trainable=False``).

    Args:
        vocabulary_size: int, number of ids (OOV id 0 included).
        output_dim: int, dimension of the output vectors.
        dims: list of ints >= 1, the dimension of each block.
        rows: list of ints >= 1, the rows of each block (hard: they sum to ``vocabulary_size``; soft: each is
            ``vocabulary_size``; default for soft).
        selection: ``"hard"`` or ``"soft"``. Default ``"hard"``.
        shared_weights: soft only: one weight vector for all ids. Default False.
        activation: ``"tanh"`` (default) or ``"linear"``.
        **kwargs: ``combiner``, ``frequencies``, ``validate_ids`` and base Layer arguments.

    Example:

    >>> layer = MultiDimEmbedding.from_arrays(
    ...     tables=[np.ones((2, 1), "float32"), np.ones((1, 3), "float32")],
    ...     kernels=[np.full((1, 2), 0.5, "float32"), np.zeros((3, 2), "float32")],
    ...     biases=[np.zeros(2, "float32"), np.full(2, 0.25, "float32")],
    ...     remap=np.array([2, 0, 1]), activation="linear")
    >>> layer(tf.constant([0, 1, 2])).numpy().tolist()
    [[0.25, 0.25], [0.5, 0.5], [0.5, 0.5]]
    >>> layer.dims_per_id().tolist(), layer.parameter_count()  # 2x1 + 1x3 rows, (1x2 + 2) + (3x2 + 2) maps
    ([3, 1, 1], 17)
    """

    def __init__(self, vocabulary_size, output_dim, dims, rows=None, selection="hard", shared_weights=False,
                 activation="tanh", **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(vocabulary_size, output_dim, **kwargs)
        if selection not in MULTI_DIM_SELECTIONS:
            raise ValueError(f"selection must be one of {MULTI_DIM_SELECTIONS}. Received: selection={selection!r}")
        self.selection = selection
        if not isinstance(dims, (list, tuple)) or not dims:
            raise ValueError(f"dims must be a non-empty list of ints >= 1. Received: dims={dims!r}")
        # Validated as plain lists: Keras 2 wraps a list attribute (ListWrapper), which messages would print.
        dims = [check_positive_int("dims[i]", d) for d in dims]
        if rows is None:
            if selection == "hard":
                raise ValueError("rows is required with selection='hard' (the rows of each block)")
            rows = [self.vocabulary_size] * len(dims)
        if not isinstance(rows, (list, tuple)) or len(rows) != len(dims):
            shown = list(rows) if isinstance(rows, (list, tuple)) else rows
            raise ValueError(f"rows must list one count per block ({len(dims)}). Received: rows={shown!r}")
        rows = [check_positive_int("rows[i]", r) for r in rows]
        if selection == "hard" and sum(rows) != self.vocabulary_size:
            raise ValueError(
                f"with selection='hard' the blocks' rows must sum to vocabulary_size={self.vocabulary_size}. "
                f"Received: rows={rows} (sum {sum(rows)})"
            )
        if selection == "soft" and any(r != self.vocabulary_size for r in rows):
            raise ValueError(f"with selection='soft' every block has vocabulary_size rows. Received: rows={rows}")
        self.dims, self.rows = dims, rows
        self.shared_weights = bool(shared_weights)
        if self.shared_weights and selection != "soft":
            raise ValueError("shared_weights=True needs selection='soft'")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}. Received: activation={activation!r}")
        self.activation = activation
        self.offsets = np.concatenate([[0], np.cumsum(self.rows)]).astype(np.int64).tolist()

    @classmethod
    def from_arrays(cls, tables, kernels, biases, remap=None, weights=None, **kwargs):
        """A built layer holding the given arrays: ``remap`` (hard) or ``weights`` (soft), not both.

        Args:
            tables, kernels, biases: one array per block (``[rows_b, dims_b]``, ``[dims_b, output_dim]``,
                ``[output_dim]``).
            remap: hard: int array ``[vocabulary_size]``, each id's row in the concatenated blocks (a permutation
                of ``range(vocabulary_size)``).
            weights: soft: float array ``[vocabulary_size, blocks]`` (or ``[1, blocks]`` shared by all ids).
            **kwargs: other constructor arguments (``name``, ``combiner``, ``activation``, ...).
        """
        if (remap is None) == (weights is None):
            raise ValueError("give remap (hard selection) or weights (soft selection), exactly one")
        tables = [np.asarray(t) for t in tables]
        kernels = [np.asarray(k) for k in kernels]
        biases = [np.asarray(b) for b in biases]
        # Checked here, before any assignment: zip() below would silently pair a table with another block's map.
        if not tables or len(kernels) != len(tables) or len(biases) != len(tables):
            raise ValueError(
                "from_arrays needs one kernel and one bias per table (at least one table). Received: "
                f"{len(tables)} tables, {len(kernels)} kernels, {len(biases)} biases"
            )
        if any(t.ndim != 2 for t in tables):
            raise ValueError(f"tables must be 2-D [rows, dims]. Received: shapes {[t.shape for t in tables]}")
        output_dim = int(kernels[0].shape[1]) if kernels[0].ndim == 2 else -1
        for b, (table, kernel, bias) in enumerate(zip(tables, kernels, biases)):
            if kernel.shape != (table.shape[1], output_dim):
                raise ValueError(f"kernels[{b}] must have shape {(table.shape[1], output_dim)} (dims of tables[{b}], "
                                 f"output_dim). Received: shape {kernel.shape}")
            if bias.shape != (output_dim,):
                raise ValueError(f"biases[{b}] must have shape {(output_dim,)}. Received: shape {bias.shape}")
        dims = [int(t.shape[1]) for t in tables]
        if remap is not None:
            remap = np.asarray(remap, dtype=np.int64)
            vocabulary_size = int(remap.shape[0]) if remap.ndim == 1 else -1
            if remap.ndim != 1 or sorted(remap.tolist()) != list(range(vocabulary_size)):
                shown = remap.tolist() if remap.size <= 20 else f"{remap[:20].tolist()}... ({remap.size} values)"
                raise ValueError("remap must be a permutation of range(vocabulary_size): every id owns one row. "
                                 f"Received: remap={shown}")
            layer = cls(vocabulary_size, output_dim, dims, rows=[int(t.shape[0]) for t in tables], selection="hard",
                        **kwargs)
        else:
            weights = np.asarray(weights, dtype=np.float32)
            vocabulary_size = int(tables[0].shape[0])
            if weights.shape not in ((vocabulary_size, len(tables)), (1, len(tables))):
                raise ValueError(f"weights must have shape {(vocabulary_size, len(tables))} or {(1, len(tables))} "
                                 f"(per id, or shared). Received: shape {weights.shape}")
            layer = cls(vocabulary_size, output_dim, dims, selection="soft", shared_weights=weights.shape[0] == 1,
                        **kwargs)
        layer.build()
        for variable, value in zip(layer.tables + layer.kernels + layer.biases, list(tables) + list(kernels) + list(biases)):
            variable.assign(np.asarray(value, dtype=np.float32))
        if remap is not None:
            layer.remap.assign(remap.astype(np.int32))
        else:
            layer.weights_table.assign(weights)
        return layer

    def build(self, input_shape=None):
        d = self.output_dim
        self.tables, self.kernels, self.biases = [], [], []
        for b, (rows, dim) in enumerate(zip(self.rows, self.dims)):
            self.tables.append(self.add_weight(name=f"table_{b}", shape=(rows, dim), initializer="zeros"))
            self.kernels.append(self.add_weight(name=f"kernel_{b}", shape=(dim, d), initializer="zeros"))
            self.biases.append(self.add_weight(name=f"bias_{b}", shape=(d,), initializer="zeros"))
        if self.selection == "hard":
            # Before from_arrays or loaded weights fill it: the identity layout, id i at row i.
            self.remap = self.add_weight(
                name="remap", shape=(self.vocabulary_size,), dtype="int32", trainable=False,
                initializer=lambda shape, dtype=None: tf.range(self.vocabulary_size, dtype=tf.int32),
            )
        else:
            self.weights_table = self.add_weight(
                name="selection_weights", shape=(1 if self.shared_weights else self.vocabulary_size, len(self.dims)),
                initializer="zeros", trainable=False,
            )
        self.built = True

    def _block(self, b, rows):
        act = ACTIVATIONS[self.activation]
        vectors = self.gather_rows(self.tables[b], rows)  # [m, dims_b]
        return act(tf.matmul(vectors, self.kernels[b]) + self.biases[b])  # [m, output_dim]

    def lookup(self, ids):
        flat = tf.reshape(ids, [-1])  # [n]
        if self.selection == "soft":
            if self.shared_weights:
                weights = tf.broadcast_to(self.weights_table, tf.stack([tf.size(flat), len(self.dims)]))
            else:
                weights = tf.gather(self.weights_table, flat)  # [n, blocks]
            out = tf.add_n([weights[:, b:b + 1] * self._block(b, flat) for b in range(len(self.dims))])
        else:
            rows = tf.cast(tf.gather(self.remap, flat), tf.int64)  # [n], row in the concatenated blocks
            if len(self.dims) == 1:
                out = self._block(0, rows)
            else:
                starts = tf.constant(self.offsets[1:-1], tf.int64)  # first row of blocks 1..B-1
                block = tf.searchsorted(starts, rows, side="right", out_type=tf.int32)  # [n]
                local = rows - tf.gather(tf.constant(self.offsets[:-1], tf.int64), block)
                parts = tf.dynamic_partition(local, block, len(self.dims))
                positions = tf.dynamic_partition(tf.range(tf.size(flat)), block, len(self.dims))
                out = tf.dynamic_stitch(positions, [self._block(b, parts[b]) for b in range(len(self.dims))])
        return tf.reshape(out, tf.concat([tf.shape(ids), [self.output_dim]], axis=0))

    # -------------------------------------------------------------------------------------- size accounting
    def parameter_count(self):
        maps = sum(dim * self.output_dim + self.output_dim for dim in self.dims)
        tables = sum(rows * dim for rows, dim in zip(self.rows, self.dims))
        weights = 0 if self.selection == "hard" else (1 if self.shared_weights else self.vocabulary_size) * len(self.dims)
        return tables + maps + weights

    def storage_bytes(self):
        floats = self.parameter_count() * dtype_bytes(self.variable_dtype or "float32")
        return floats + (self.vocabulary_size * 4 if self.selection == "hard" else 0)  # int32 remap

    def dims_per_id(self):
        if self.selection == "soft":
            return np.full(self.vocabulary_size, sum(self.dims), dtype=np.int64)
        if not self.built:
            self.build()
        rows = np.asarray(tf.convert_to_tensor(self.remap)).astype(np.int64)
        block = np.searchsorted(np.asarray(self.offsets[1:-1]), rows, side="right")
        return np.asarray(self.dims, dtype=np.int64)[block]

    def compact(self):
        """Already the inference form: a frozen copy."""
        config = {k: v for k, v in self.get_config().items()
                  if k not in ("vocabulary_size", "output_dim", "dims", "rows", "selection", "shared_weights")}
        config.update(trainable=False, frequencies=None)
        arrays = {"tables": self.tables, "kernels": self.kernels, "biases": self.biases}
        arrays = {k: [np.asarray(tf.convert_to_tensor(v)) for v in vs] for k, vs in arrays.items()}
        if self.selection == "hard":
            arrays["remap"] = np.asarray(tf.convert_to_tensor(self.remap))
        else:
            arrays["weights"] = np.asarray(tf.convert_to_tensor(self.weights_table))
        return MultiDimEmbedding.from_arrays(**arrays, **config)

    def sparse_tables(self):
        return list(self.tables) if self.trainable else []

    def get_config(self):
        config = super().get_config()
        config.update({"dims": list(self.dims), "rows": list(self.rows), "selection": self.selection,
                       "shared_weights": self.shared_weights, "activation": self.activation})
        return config
