"""PEPEmbedding: plug-in embedding pruning with learnable soft thresholds (Liu et al., ICLR 2021)."""

import math

import numpy as np
import tensorflow as tf

from tfemb._keras import keras, register
from tfemb.layers.embedding_scheme import EmbeddingScheme, check_positive_int, fresh_initializer, sparse_gather
from tfemb.layers.packed_embedding import (
    MIN_SAVING, PackedEmbedding, check_min_saving, choose_layout, packed_storage_bytes, resolve_layout, to_numpy,
)

#: Threshold granularities -> the shape of ``s`` (``V`` ids, ``d`` dims, ``F`` fields of a stacked table).
THRESHOLD_TYPES = {
    "global": "()",
    "dimension": "(d,)",
    "feature": "(V, 1)",
    "feature_dim": "(V, d)",
    "field": "(F, 1)",
    "field_dim": "(F, d)",
}

#: Granularities whose thresholds are indexed by id (gathered per lookup, row-sparse gradients).
ROW_INDEXED = ("feature", "feature_dim")

#: The official code's settings (ssui-liu/learnable-embed-sizes-for-RecSys, ``train_<dataset>.py``): the
#: threshold granularity and initial value, the scale ``gk`` of g(s), the base dimension, the targets
#: (``candidate_p``) and the optimizer (Adam, lr 1e-3, batch 1024, ``weight_decay`` 1e-5 on every parameter).
OFFICIAL_PRESETS = {
    "ml-1m": {"threshold_type": "feature_dim", "threshold_init": -15.0, "g_scale": 1.0, "output_dim": 32,
              "candidate_p": (50000, 30000, 20000), "learning_rate": 1e-3, "weight_decay": 1e-5,
              "batch_size": 1024},
    "criteo": {"threshold_type": "feature_dim", "threshold_init": -150.0, "g_scale": 1.0, "output_dim": 24,
               "candidate_p": (50000, 30000, 20000), "learning_rate": 1e-3, "weight_decay": 1e-5,
               "batch_size": 1024},
    "avazu": {"threshold_type": "feature_dim", "threshold_init": -150.0, "g_scale": 1.0, "output_dim": 24,
              "candidate_p": (50000, 30000, 20000), "learning_rate": 1e-3, "weight_decay": 1e-5,
              "batch_size": 1024},
}


#: Layout of the ``PackedEmbedding`` that ``compact()`` returns: a per-row bit mask of kept columns up to 64 dims
#: (fewer ops per lookup than a column index per value), else CSR columns.
COMPACT_LAYOUT = "auto"


def pep_preset(name, official_weight_decay=True):
    """``PEPEmbedding`` keyword arguments of an official preset (``"ml-1m"``, ``"criteo"``, ``"avazu"``).

    Gives ``threshold_type``, ``threshold_init``, ``g_scale`` and ``output_dim``; with
    ``official_weight_decay=True`` also ``threshold_regularizer=L2(weight_decay / 2)``: under Adam this is the
    official code's coupled weight decay on ``s`` (PyTorch adds ``weight_decay * s`` to the gradient; the
    gradient of ``L2(l)`` is ``2 l s``), which is what raises a threshold initialised at -150, where the
    float32 sigmoid and its gradient are exactly 0.

    >>> pep_preset("ml-1m", official_weight_decay=False)
    {'threshold_type': 'feature_dim', 'threshold_init': -15.0, 'g_scale': 1.0, 'output_dim': 32}
    """
    if name not in OFFICIAL_PRESETS:
        raise ValueError(f"preset must be one of {sorted(OFFICIAL_PRESETS)}. Received: preset={name!r}")
    preset = OFFICIAL_PRESETS[name]
    out = {key: preset[key] for key in ("threshold_type", "threshold_init", "g_scale", "output_dim")}
    if official_weight_decay:
        out["threshold_regularizer"] = keras.regularizers.L2(preset["weight_decay"] / 2.0)
    return out


@tf.custom_gradient
def threshold_sigmoid(s):
    """g(s) = sigmoid(s) whose value does not depend on where ``s`` sits in a tensor.

    TensorFlow's CPU sigmoid (and exp) kernels round the last elements of a tensor (the tail after the SIMD
    packets) differently from the others, so the same threshold gathered into a batch and computed over the
    whole table could differ in the last bit, and the forward pass, the mask and ``compact()`` would not agree
    exactly. ``0.5 * tanh(s / 2) + 0.5`` is the same function, and TF's float tanh kernel uses one formula for
    every position. Its float32 value is 0 below s ~ -17.3 (true sigmoid: < 3e-8); the gradient is the exact
    ``sigmoid(s) * (1 - sigmoid(s))`` everywhere, so a threshold far below that still learns (as in the
    official PyTorch code, where it is 0 only below about -88).
    """
    value = 0.5 * tf.tanh(0.5 * s) + 0.5

    def grad(upstream):
        p = tf.sigmoid(s)
        return upstream * p * (1.0 - p)

    return value, grad


def soft_threshold(values, threshold):
    """``sign(v) * ReLU(|v| - threshold)`` (the paper's S(V, s) with ``threshold = g_scale * g(s)``)."""
    return tf.sign(values) * tf.nn.relu(tf.abs(values) - threshold)


def _sum_to(grad, s, values):
    """Sums ``grad`` (shaped like ``values``) down to the shape of ``s``, which broadcasts to ``values``: ``s`` of
    the same shape (gathered per entry), ``[..., 1]`` (one threshold per row), ``[d]`` (per dimension) or ``()``."""
    s_rank, v_rank = s.shape.rank, values.shape.rank
    if s_rank is not None and v_rank is not None:
        if s_rank == 0:
            return tf.reduce_sum(grad)
        if s_rank == v_rank:
            if s.shape[-1] == 1 and values.shape[-1] != 1:
                return tf.reduce_sum(grad, axis=-1, keepdims=True)
            if s.shape[-1] is not None and s.shape[-1] == values.shape[-1]:
                return grad
        elif s_rank == 1 and values.shape[-1] is not None:
            return tf.reduce_sum(tf.reshape(grad, [-1, values.shape[-1]]), axis=0)
    # Anything else: the general broadcast reduction (as TensorFlow's own binary-op gradients do).
    axes, _ = tf.raw_ops.BroadcastGradientArgs(s0=tf.shape(s), s1=tf.shape(values))
    return tf.reshape(tf.reduce_sum(grad, axis=axes), tf.shape(s))


def _scaled_threshold(logits, g_scale, dtype):
    """``g_scale * g(s)`` exactly as ``pruned_values`` computes it (threshold_sigmoid's value, then the scale)."""
    t = 0.5 * tf.tanh(0.5 * logits) + 0.5
    if g_scale != 1.0:  # x * 1.0 == x: skipping it changes no bit
        t = g_scale * t
    return tf.cast(t, dtype)


def kept_count(values, s, g_scale=1.0):
    """Number of non-zeros of ``pruned_values(values, s, g_scale)`` (int64), without forming it: an entry is kept
    iff ``|v| - t > 0``, i.e. ``|v| > t`` (IEEE subtraction of finite floats has the sign of the comparison)."""
    t = _scaled_threshold(s, float(g_scale), values.dtype)
    return tf.math.count_nonzero(tf.abs(values) > t, dtype=tf.int64)


def pruned_values(values, s, g_scale=1.0):
    """``sign(v) * ReLU(|v| - g_scale * g(s))`` with one hand-written gradient: the training-time hot path.

    The value is computed exactly as ``soft_threshold(values, g_scale * threshold_sigmoid(s))`` (the same ops in
    the same order, so the outputs, ``pruned_table()``, the masks and ``compact()`` agree bit for bit). The
    gradient is the same function's (``d/dv = 1`` where the entry is kept, else 0; ``d/dt = -sign(v)`` where
    kept; ``dg/ds = sigmoid(s) (1 - sigmoid(s))`` exactly, as ``threshold_sigmoid``), written as a handful of ops
    instead of the chain of broadcasting binary-op gradients (sign, abs, relu, the sigmoid's custom gradient, the
    g_scale product), which on a model with many small tables is what made the search step slower than it needs
    to be.

    Args:
        values: float tensor ``[..., d]`` (gathered rows or the whole table).
        s: the thresholds' logits, broadcastable to ``values``: the same shape, ``[..., 1]``, ``[d]`` or ``()``.
        g_scale: Python float >= 0, the scale of g(s).
    """
    g_scale = float(g_scale)

    @tf.custom_gradient
    def forward(v, logits):
        return _pruned_with_grad(v, logits, g_scale)

    return forward(values, s)


def _pruned_with_grad(v, logits, g_scale):
    """``(out, grad)``: ``pruned_values``' value and its gradient function ``upstream -> (d/dv, d/dlogits)``."""
    t = _scaled_threshold(logits, g_scale, v.dtype)
    sign = tf.sign(v)
    diff = tf.abs(v) - t
    out = sign * tf.nn.relu(diff)

    def grad(upstream):
        # Six ops (a search step runs one such chain per table): ReluGrad is ``upstream`` where |v| - t > 0, else
        # 0 (the relu's own gradient); SigmoidGrad(p, x) is x * p * (1 - p), the exact sigmoid derivative (the
        # tanh form of the value is flat below s ~ -17.3, this is not); the sign of d/dt = -sign(v) and the
        # g_scale go in one product.
        grad_v = tf.raw_ops.ReluGrad(gradients=upstream, features=diff)
        grad_t = tf.cast(_sum_to(sign * grad_v, logits, v), logits.dtype)
        grad_s = tf.raw_ops.SigmoidGrad(y=tf.sigmoid(logits), dy=grad_t)
        return grad_v, (-grad_s if g_scale == 1.0 else grad_s * tf.constant(-g_scale, grad_s.dtype))

    return out, grad


def fused_pruned_values(rows, output_dim, g_scale=1.0):
    """``pruned_values(rows[..., :d], rows[..., d:], g_scale)`` for rows of the fused ``[V | s]`` table, with one
    gradient tensor for both halves (a concat instead of two slice gradients and their sum).

    Same ops and order as ``pruned_values`` on the two halves, so the value is bit-identical to the unfused
    layout's; ``s`` is ``[..., d]`` (``feature_dim``) or ``[..., 1]`` (``feature``).
    """
    g_scale = float(g_scale)
    d = int(output_dim)

    @tf.custom_gradient
    def forward(r):
        v, s = tf.split(r, [d, -1], axis=-1)  # one op for both halves (no strided slices), any input rank
        out, grad = _pruned_with_grad(v, s, g_scale)
        return out, lambda upstream: tf.concat(grad(upstream), axis=-1)

    return forward(rows)


class ColumnView:
    """Columns ``[start, stop)`` of a 2-D variable, read and assigned like a variable of that shape.

    ``PEPEmbedding`` keeps ``V`` and id-indexed thresholds ``s`` in one ``[V, d + k]`` variable (one gather, one
    gradient and one optimizer update per step instead of two); ``layer.embeddings`` and ``layer.threshold`` are
    views of its halves. ``tf.convert_to_tensor`` / ``np.asarray`` read the columns, ``assign`` writes them.
    Take gradients with respect to the variable itself (``layer.fused_table``); a view is not a variable.
    """

    def __init__(self, variable, start, stop, name):
        self.variable, self.start, self.stop, self.name = variable, int(start), int(stop), name

    @property
    def shape(self):
        return tf.TensorShape([self.variable.shape[0], self.stop - self.start])

    @property
    def dtype(self):
        return tf.as_dtype(self.variable.dtype)

    def read_value(self):
        return tf.convert_to_tensor(self.variable)[:, self.start:self.stop]

    def numpy(self):
        return self.read_value().numpy()

    def __array__(self, dtype=None, copy=None):
        value = self.numpy()
        return value if dtype is None else value.astype(dtype)

    def assign(self, value):
        table = tf.convert_to_tensor(self.variable)
        value = tf.cast(tf.convert_to_tensor(value), table.dtype)
        if tuple(value.shape) != tuple(self.shape):
            raise ValueError(f"{self.name}: assign needs shape {tuple(self.shape)}. Received: shape {tuple(value.shape)}")
        self.variable.assign(tf.concat([table[:, :self.start], value, table[:, self.stop:]], axis=1))
        return self

    def __repr__(self):
        return f"<ColumnView {self.name} shape={tuple(self.shape)} of {self.variable.name}>"


tf.register_tensor_conversion_function(ColumnView, lambda view, dtype=None, name=None, as_ref=False:
                                       tf.cast(view.read_value(), dtype) if dtype is not None else view.read_value())


def _norm_coefficients(regularizer):
    """``(l1, l2)`` of a Keras ``L1``, ``L2`` or ``L1L2`` regularizer whose ``__call__`` is the built-in one
    (``l1 * sum(|x|) + l2 * sum(x**2)``; a coefficient may be a float or a variable), ``(0, 0)`` for None, and
    None for any other regularizer."""
    if regularizer is None:
        return 0.0, 0.0
    regs = keras.regularizers
    for cls, names in ((regs.L1L2, ("l1", "l2")), (regs.L2, ("l2",)), (regs.L1, ("l1",))):
        if isinstance(regularizer, cls) and type(regularizer).__call__ is cls.__call__:
            return tuple(getattr(regularizer, n, 0.0) if n in names else 0.0 for n in ("l1", "l2"))
    return None


class _FusedRegularizer:
    """The fused ``[V | s]`` table's regularizer: the embeddings' regularizer on columns ``[0, d)`` plus the
    thresholds' on ``[d, d + k)`` (either may be None; the original ones are in the config).

    Keras' ``L1`` / ``L2`` / ``L1L2`` (the usual ones, and the official weight decay) are sums over entries, so
    both are computed over the whole table at once with a coefficient per column: ``sum(x**2 * c2) +
    sum(|x| * c1)``, no slicing. Any other regularizer gets its half from one ``tf.split``. Slicing columns out
    of the table costs a copy forward and a whole-table gradient backward (``StridedSliceGrad`` or a concat) for
    every table and step: on a 26-table DeepFM search that was about a third of the step's extra time over the
    fixed model. The penalty equals the two regularizers' sum up to float rounding.
    """

    def __init__(self, embeddings_regularizer, threshold_regularizer, output_dim, threshold_columns):
        self.regularizers = (embeddings_regularizer, threshold_regularizer)
        self.sizes = [int(output_dim), int(threshold_columns)]
        coefficients = [_norm_coefficients(r) for r in self.regularizers]
        self.coefficients = None if None in coefficients else coefficients

    def _column_weights(self, which, dtype):
        """``[d + k]`` coefficients of norm ``which`` (0: l1, 1: l2) per column, or None where both are 0."""
        values = [c[which] for c in self.coefficients]
        if all(isinstance(v, (int, float)) and v == 0 for v in values):
            return None
        if all(isinstance(v, (int, float)) for v in values):
            return tf.constant(np.repeat(np.asarray(values, np.float64), self.sizes), dtype)
        return tf.concat([tf.fill([n], tf.cast(v, dtype)) for v, n in zip(values, self.sizes)], axis=0)

    def __call__(self, x):
        x = tf.convert_to_tensor(x)
        if self.coefficients is not None:
            terms = []
            for which, norm in ((0, tf.abs), (1, tf.square)):
                weights = self._column_weights(which, x.dtype)
                if weights is not None:
                    terms.append(tf.reduce_sum(norm(x) * weights))
            if not terms:
                return tf.zeros([], x.dtype)
            return terms[0] if len(terms) == 1 else tf.add_n(terms)
        halves = tf.split(x, self.sizes, axis=1)
        terms = [r(half) for r, half in zip(self.regularizers, halves) if r is not None]
        return terms[0] if len(terms) == 1 else tf.add_n(terms)


def _check_threshold_init(threshold_init):
    if isinstance(threshold_init, str):
        if threshold_init not in OFFICIAL_PRESETS:
            raise ValueError(
                f"threshold_init must be a number or a preset name in {sorted(OFFICIAL_PRESETS)}. Received: "
                f"threshold_init={threshold_init!r}"
            )
        return float(OFFICIAL_PRESETS[threshold_init]["threshold_init"])
    if isinstance(threshold_init, bool) or not isinstance(threshold_init, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(threshold_init)):
        raise ValueError(f"threshold_init must be a finite number. Received: threshold_init={threshold_init!r}")
    return float(threshold_init)


@register
class PEPEmbedding(EmbeddingScheme):
    """PEP (plug-in embedding pruning): a table pruned by learnable soft thresholds.

    The table ``V`` (``vocabulary_size x output_dim``) is re-parameterised as

        V̂ = sign(V) * ReLU(|V| - g_scale * g(s)),    g = sigmoid,

    and ``e(id) = V̂[id]``. The thresholds ``s`` train with ``V`` and the rest of the model by gradient
    descent (plain ``model.fit``): entries whose magnitude falls below their threshold become exactly zero, so
    each id keeps its own number of dimensions. ``s`` has one of these granularities (``threshold_type``):

    - ``"global"``: one scalar for the table;
    - ``"dimension"``: a vector over the ``d`` dimensions;
    - ``"feature"``: one value per id, ``[V, 1]``;
    - ``"feature_dim"``: a matrix ``[V, d]`` (the official default);
    - ``"field"`` / ``"field_dim"``: one value (or one vector over dims) per field. In tfemb each feature has
      its own layer, so without ``field_offsets`` the layer is one field: ``"field"`` is a per-feature scalar
      (numerically ``"global"`` within the table) and ``"field_dim"`` a per-feature vector (``"dimension"``).
      With ``field_offsets`` the layer is a stacked table of several fields (as the official code's single
      table over all fields) and field ``i`` owns the ids ``[field_offsets[i], field_offsets[i + 1])``.

    Two modes:

    - **search** (``mask=None``, ``retrain=False``): the soft threshold above. The layer also keeps a frozen
      copy of ``V``'s initial values (``keep_initial``) for the lottery-ticket rewind; it is training-time state:
      saved with the layer (so a search can be resumed and rewound after a reload) but never counted in
      ``parameter_count`` / ``storage_bytes`` and never part of ``compact()``.
    - **retrain** (``mask`` given, or ``retrain=True`` for a layer whose mask is loaded with its weights): a fixed
      binary mask, ``e(id) = (V * mask)[id]``; the thresholds are not used (the official code sets
      ``gk = 0``). The gradient of a pruned entry is exactly 0, so with the zero that ``set_mask`` / ``rewind``
      / the initial draw write there, pruned entries stay exactly zero under SGD, Adam, Adagrad, L1/L2 penalties
      and the row-sparse ``tfemb.optimizers``. The mask is stored as an int8 weight (not in the config).

    ``tfemb.pep`` has the procedure: ``PEPSnapshots`` (a callback taking the masks when the model's number of
    non-zero embedding parameters first falls to each target, in one run) and ``retrain`` (a model in retrain
    mode, rewound to the initial values x mask or freshly re-initialised with the same mask).

    Size accounting: ``parameter_count()`` is the number of non-zeros of the pruned table (search: of V̂;
    retrain: of the mask); ``dims_per_id()`` the kept dimensions of each id; ``compact()`` a
    ``PackedEmbedding`` (per-row values + a bit mask of kept columns per row up to 64 dims, else int8 / int16
    column indices + row offsets; ``COMPACT_LAYOUT``) whose outputs equal V̂ exactly;
    ``storage_bytes()`` its bytes.

    Gradients: ``V`` and the id-indexed thresholds (``"feature"``, ``"feature_dim"``) are gathered per lookup,
    so their gradients are row-sparse; the other granularities' thresholds are small dense variables.

    Storage (``fused``, default True): in search mode with id-indexed thresholds, ``V`` and ``s`` are the two
    column blocks of one ``[V, d + k]`` variable, ``fused_table`` (``k = d`` for ``"feature_dim"``, 1 for
    ``"feature"``). A step then has one gather, one row-sparse gradient and one optimizer update per table
    instead of two (Criteo DeepFM, 26 tables: ~1,200 fewer graph ops per train step). Element-wise optimizers (SGD, Adam, Adagrad) and the two regularizers (each applied to its own
    columns) give the same training as two variables (tested). ``embeddings`` and ``threshold`` are then
    ``ColumnView`` s of the two blocks: read (``np.asarray``, ``tf.convert_to_tensor``) and ``assign`` them as
    before, but take gradients with respect to ``fused_table``. ``fused=False`` keeps two variables (e.g. to
    give the thresholds their own optimizer); retrain mode always has ``embeddings`` and an int8 ``mask``.
    ``sparse_tables()`` lists the row-indexed variables: ``[fused_table]`` or ``[embeddings, threshold]``. Exact zeros of V̂ have gradient 0 with
    respect to ``V`` (the ReLU is flat there), as in the paper.

    Args:
        vocabulary_size: int, number of ids (OOV id 0 included).
        output_dim: int, embedding dimension.
        threshold_type: one of ``THRESHOLD_TYPES``. Default ``"feature_dim"``.
        threshold_init: initial value of every threshold ``s``, or a preset name (``"ml-1m"``: -15,
            ``"criteo"`` / ``"avazu"``: -150, the official scripts' values). Default -15.
        g_scale: the official code's ``gk``, a factor on g(s) (1 in every official script). Default 1.0.
        field_offsets: optional increasing ints starting at 0 and below ``vocabulary_size``: the first id of each
            field of a stacked table (for ``"field"`` / ``"field_dim"``; reports use it for every type).
        mask: optional 0/1 array ``[vocabulary_size, output_dim]``: retrain mode with this fixed mask.
        retrain: bool, retrain mode without a mask array (the mask weight starts at ones, to be set by
            ``set_mask`` or loaded with the weights). Implied by ``mask``.
        keep_initial: bool, keep a frozen copy of the initial ``V`` (search mode). Default: True in search mode,
            False in retrain mode.
        embeddings_initializer: initializer of ``V``. Default ``"glorot_uniform"`` (the official code's
            ``xavier_uniform_``; it draws one table over all fields, so its bound ``sqrt(6 / (sum of
            vocabularies + d))`` matches tfemb's only for a stacked table).
        embeddings_regularizer: optional regularizer of ``V`` (dense over the whole table).
        threshold_regularizer: optional regularizer of ``s``; see ``pep_preset`` for the official weight decay.
        fused: bool, store ``V`` and id-indexed ``s`` in one variable (see Storage). Default True.
        compact_layout: the ``PackedEmbedding`` layout of ``compact()`` (and ``storage_bytes()``): ``"auto"``
            (the default ``COMPACT_LAYOUT``: ``"bitmask"`` up to 64 dims, the smallest), ``"bitmask"``, ``"csr"``,
            ``"slots"`` (the fastest packed lookup, about twice the bytes of ``"bitmask"`` at d = 16) or
            ``"dense"`` (the pruned table with its zeros).
        compact_min_saving: float in ``[0, 1)`` or None. ``compact()`` exports the table in the ``"dense"``
            layout (one row gather per lookup, as a fixed table) when ``compact_layout`` would save less than
            this fraction of the dense table's bytes: a packed lookup costs several ops per id, which a small
            saving does not pay for. Default 0.25 (``packed_embedding.MIN_SAVING``); 0: dense only when packing
            saves nothing; None: always ``compact_layout``. ``parameter_count()`` is the kept count either way.
        **kwargs: ``combiner``, ``frequencies`` (for reports), ``validate_ids`` and base Layer arguments.

    Input shape:
        int tensor ``[batch]`` or ``[batch, k]``.

    Output shape:
        ``[batch, output_dim]`` / ``[batch, k, output_dim]``, or ``[batch, output_dim]`` with a combiner.

    Example:

    >>> layer = PEPEmbedding(23, 7, threshold_type="dimension", threshold_init=-3.0)
    >>> layer(tf.constant([0, 5, 22])).shape
    TensorShape([3, 7])
    >>> layer.threshold.shape, layer.parameter_count() <= 23 * 7
    (TensorShape([7]), True)

    References:
        - Liu, Gao, Chen, Jin, Li, "Learnable Embedding Sizes for Recommender Systems", ICLR 2021,
          arXiv:2101.07577; ssui-liu/learnable-embed-sizes-for-RecSys (``models/pep_embedding.py``).
        - Kusupati et al., "Soft Threshold Weight Reparameterization for Learnable Sparsity", ICML 2020.
        - Frankle & Carbin, "The Lottery Ticket Hypothesis", ICLR 2019.
    """

    def __init__(self, vocabulary_size, output_dim, threshold_type="feature_dim", threshold_init=-15.0, g_scale=1.0,
                 field_offsets=None, mask=None, retrain=False, keep_initial=None,
                 embeddings_initializer="glorot_uniform", embeddings_regularizer=None, threshold_regularizer=None,
                 fused=True, compact_layout=None, compact_min_saving=MIN_SAVING, **kwargs):
        super().__init__(vocabulary_size, output_dim, **kwargs)
        if threshold_type not in THRESHOLD_TYPES:
            raise ValueError(
                f"threshold_type must be one of {tuple(THRESHOLD_TYPES)}. Received: threshold_type={threshold_type!r}"
            )
        self.threshold_type = threshold_type
        self.threshold_init = _check_threshold_init(threshold_init)
        if isinstance(g_scale, bool) or not isinstance(g_scale, (int, float, np.integer, np.floating)) \
                or not math.isfinite(float(g_scale)) or g_scale < 0:
            raise ValueError(f"g_scale must be a finite number >= 0. Received: g_scale={g_scale!r}")
        self.g_scale = float(g_scale)
        self.field_offsets = self._check_field_offsets(field_offsets)
        self._mask_value = None if mask is None else self.check_mask(mask)
        self.retrain = bool(retrain) or mask is not None
        self.keep_initial = (not self.retrain) if keep_initial is None else bool(keep_initial)
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.embeddings_regularizer = keras.regularizers.get(embeddings_regularizer)
        self.threshold_regularizer = keras.regularizers.get(threshold_regularizer)
        self.fused_threshold = bool(fused)
        self.compact_layout = COMPACT_LAYOUT if compact_layout is None else compact_layout
        resolve_layout(self.compact_layout, self.output_dim)  # a clear error for an unknown layout
        self.compact_min_saving = check_min_saving(compact_min_saving)
        self.threshold = None
        self.mask = None
        self.initial_embeddings = None
        self.fused_table = None

    @property
    def fused(self):
        """True when ``V`` and ``s`` live in one ``[V, d + k]`` variable (``fused_table``): search mode with
        id-indexed thresholds (``"feature"``, ``"feature_dim"``) and ``fused=True``."""
        return self.fused_threshold and not self.retrain and self.threshold_type in ROW_INDEXED

    # ------------------------------------------------------------------------------------------ validation
    def _check_field_offsets(self, field_offsets):
        if field_offsets is None:
            return None
        offsets = [check_positive_int("field_offsets[i]", o, minimum=0) for o in field_offsets]
        if not offsets or offsets[0] != 0 or any(b <= a for a, b in zip(offsets, offsets[1:])) \
                or offsets[-1] >= self.vocabulary_size:
            raise ValueError(
                f"field_offsets must be increasing ints starting at 0, each below vocabulary_size="
                f"{self.vocabulary_size} (the first id of each field). Received: field_offsets={list(field_offsets)}"
            )
        return offsets

    def check_mask(self, mask):
        """Validates a 0/1 mask of the table's shape; returns it as an int8 NumPy array."""
        shape = (self.vocabulary_size, self.output_dim)
        value = np.asarray(mask)
        if value.shape != shape:
            raise ValueError(
                f"{self.name}: mask must have the table's shape {shape} (vocabulary_size, output_dim). "
                f"Received: mask of shape {value.shape}"
            )
        if value.dtype != bool and not np.all((value == 0) | (value == 1)):
            bad = value[(value != 0) & (value != 1)].ravel()[0]
            raise ValueError(f"{self.name}: mask must hold only 0 and 1 (or booleans). Received: a value {bad!r}")
        return value.astype(np.int8)

    @property
    def num_fields(self):
        """Fields of the table: ``len(field_offsets)``, or 1."""
        return 1 if self.field_offsets is None else len(self.field_offsets)

    def threshold_shape(self):
        """Shape of ``s`` for this layer's ``threshold_type``."""
        v, d, f = self.vocabulary_size, self.output_dim, self.num_fields
        return {"global": (), "dimension": (d,), "feature": (v, 1), "feature_dim": (v, d), "field": (f, 1),
                "field_dim": (f, d)}[self.threshold_type]

    # ---------------------------------------------------------------------------------------------- weights
    def build(self, input_shape=None):
        shape = (self.vocabulary_size, self.output_dim)
        with tf.init_scope():
            initial = tf.convert_to_tensor(fresh_initializer(self.embeddings_initializer)(shape, dtype="float32"))
            if self.retrain and self._mask_value is not None:
                initial = initial * tf.cast(self._mask_value, initial.dtype)
        if self.fused:
            self._build_fused(initial)
        else:
            self.embeddings = self.add_weight(
                name="embeddings", shape=shape, initializer=lambda shape, dtype=None: tf.cast(initial, dtype),
                regularizer=self.embeddings_regularizer, trainable=True,
            )
        if self.fused:
            pass
        elif self.retrain:
            mask = np.ones(shape, np.int8) if self._mask_value is None else self._mask_value
            self.mask = self.add_weight(
                name="mask", shape=shape, dtype="int8", trainable=False,
                initializer=lambda shape, dtype=None: tf.constant(mask, tf.int8),
            )
        else:
            self.threshold = self.add_weight(
                name="threshold", shape=self.threshold_shape(), regularizer=self.threshold_regularizer,
                initializer=keras.initializers.Constant(self.threshold_init), trainable=True,
            )
        if self.keep_initial:
            self.initial_embeddings = self.add_weight(
                name="initial_embeddings", shape=shape, trainable=False,
                initializer=lambda shape, dtype=None: tf.cast(initial, dtype),
            )
        self._mask_value = None  # the weight holds it now
        self.built = True

    def _build_fused(self, initial):
        d = self.output_dim
        k = self.threshold_shape()[1]
        start = tf.concat([initial, tf.fill([self.vocabulary_size, k], tf.constant(self.threshold_init, initial.dtype))],
                          axis=1)
        regularizer = None
        if self.embeddings_regularizer is not None or self.threshold_regularizer is not None:
            regularizer = _FusedRegularizer(self.embeddings_regularizer, self.threshold_regularizer, d, k)
        self.fused_table = self.add_weight(
            name="embeddings_and_threshold", shape=(self.vocabulary_size, d + k),
            initializer=lambda shape, dtype=None: tf.cast(start, dtype), regularizer=regularizer,
            trainable=True,
        )
        self.embeddings = ColumnView(self.fused_table, 0, d, f"{self.name}/embeddings")
        self.threshold = ColumnView(self.fused_table, d, d + k, f"{self.name}/threshold")

    def _ensure_built(self):
        if not self.built:
            self.build()

    # ---------------------------------------------------------------------------------------------- forward
    def _field_index(self, ids):
        offsets = tf.constant(self.field_offsets, tf.int64)
        flat = tf.reshape(ids, [-1])
        field = tf.searchsorted(offsets, flat, side="right") - 1
        return tf.reshape(field, tf.shape(ids))

    def _threshold_logits(self, ids=None):
        """``s`` broadcastable to the rows of ``ids`` (``[..., d]``), or to the whole table: gathered per id
        (``feature``, ``feature_dim``) or per field (stacked ``field``, ``field_dim``), else the small variable."""
        kind = self.threshold_type
        if kind in ROW_INDEXED and ids is not None:
            if self.fused:
                return sparse_gather(self.fused_table, ids)[..., self.output_dim:]
            return sparse_gather(self.threshold, ids)  # [..., 1] / [..., d]: reads only the rows
        s = tf.convert_to_tensor(self.threshold)  # the whole [V, 1] / [V, d] variable, or the small one
        if kind in ("field", "field_dim"):
            if self.field_offsets is None:
                s = s[0]  # one field: a scalar (field) or a [d] vector (field_dim)
                s = s[0] if kind == "field" else s
            else:
                rows = tf.range(self.vocabulary_size, dtype=tf.int64) if ids is None else ids
                s = tf.gather(s, self._field_index(rows))  # [..., 1] / [..., d]
        return s

    def _thresholds(self, ids=None):
        """``g_scale * g(s)`` broadcastable to the rows of ``ids`` (``[..., d]``), or to the whole table."""
        return self.g_scale * threshold_sigmoid(self._threshold_logits(ids))

    def lookup(self, ids):
        if self.fused:  # one gather of both halves' rows
            return fused_pruned_values(sparse_gather(self.fused_table, ids), self.output_dim, self.g_scale)
        rows = sparse_gather(self.embeddings, ids)  # [..., d], reading only the rows
        if self.retrain:
            return rows * tf.cast(sparse_gather(self.mask, ids), rows.dtype)
        return pruned_values(rows, self._threshold_logits(ids), self.g_scale)

    def pruned_table(self):
        """The whole table the layer looks up, a ``[vocabulary_size, output_dim]`` tensor (search: V̂, retrain:
        ``V * mask``); its rows equal the layer's outputs bit for bit."""
        self._ensure_built()
        if self.fused:  # one read of the variable, the lookup's own ops: the same values bit for bit
            return fused_pruned_values(tf.convert_to_tensor(self.fused_table), self.output_dim, self.g_scale)
        table = tf.convert_to_tensor(self.embeddings)
        if self.retrain:
            return table * tf.cast(self.mask, table.dtype)
        return pruned_values(table, self._threshold_logits(), self.g_scale)

    # ------------------------------------------------------------------------------------------------ masks
    def current_mask(self):
        """NumPy bool ``[vocabulary_size, output_dim]``: the kept entries (search: non-zeros of V̂; retrain: the
        mask)."""
        self._ensure_built()
        if self.retrain:
            return to_numpy(self.mask).astype(bool)
        return to_numpy(self.pruned_table()) != 0

    def nonzero_count(self):
        """Number of kept entries (a Python int), computed in TensorFlow without copying the table out."""
        return int(self.nonzero_count_tensor())

    def nonzero_count_tensor(self):
        """Number of kept entries as an int64 scalar tensor (traceable: ``PEPSnapshots`` sums every layer's in
        one ``tf.function``)."""
        self._ensure_built()
        if self.retrain:
            return tf.math.count_nonzero(tf.convert_to_tensor(self.mask), dtype=tf.int64)
        if self.fused:  # one read of the variable, its two column blocks
            table = tf.convert_to_tensor(self.fused_table)
            return kept_count(table[:, :self.output_dim], table[:, self.output_dim:], self.g_scale)
        return kept_count(tf.convert_to_tensor(self.embeddings), self._threshold_logits(), self.g_scale)

    def count_operands(self):
        """The ``[vocabulary_size, 2 * output_dim]`` rows ``[V | s]`` when ``kept_count(rows[:, :d], rows[:, d:],
        g_scale)`` is this layer's count (search mode, ``feature_dim`` thresholds), else None: the fused variable
        itself, or the two variables side by side. ``PEPSnapshots`` stacks the rows of the layers with the same
        ``g_scale``, dtype and ``output_dim`` and counts them with one chain of ops (a 26-table model: one concat
        and one split, no per-table slices)."""
        self._ensure_built()
        if self.retrain or self.threshold_type != "feature_dim":
            return None
        if self.fused:
            return tf.convert_to_tensor(self.fused_table)
        return tf.concat([tf.convert_to_tensor(self.embeddings), tf.convert_to_tensor(self.threshold)], axis=1)

    def threshold_values(self):
        """NumPy ``g_scale * g(s)`` in the shape of ``s`` (None in retrain mode)."""
        self._ensure_built()
        if self.retrain:
            return None
        return to_numpy(self.g_scale * threshold_sigmoid(tf.convert_to_tensor(self.threshold)))

    def initial_values(self):
        """NumPy copy of the table's initial values (search mode with ``keep_initial``), else None."""
        self._ensure_built()
        return None if self.initial_embeddings is None else to_numpy(self.initial_embeddings)

    def set_initial_values(self, values=None):
        """Sets the frozen copy used by the rewind: ``values``, or the table as it is now (e.g. after assigning
        or loading the weights a search starts from). Needs ``keep_initial``."""
        self._ensure_built()
        if self.initial_embeddings is None:
            raise ValueError(f"{self.name}: this layer keeps no initial values (keep_initial=False)")
        value = tf.convert_to_tensor(self.embeddings) if values is None else np.asarray(values, np.float32)
        if tuple(value.shape) != (self.vocabulary_size, self.output_dim):
            raise ValueError(
                f"{self.name}: initial values must have the table's shape {(self.vocabulary_size, self.output_dim)}. "
                f"Received: shape {tuple(value.shape)}"
            )
        self.initial_embeddings.assign(value)

    def set_mask(self, mask):
        """Retrain mode: sets the fixed mask and zeroes the pruned entries of ``V`` (before or after build)."""
        if not self.retrain:
            raise ValueError(
                f"{self.name}: set_mask needs a layer in retrain mode (PEPEmbedding(..., retrain=True) or "
                f"tfemb.pep.retrain); this one is searching"
            )
        value = self.check_mask(mask)
        if not self.built:
            self._mask_value = value
            return
        self.mask.assign(value)
        self.embeddings.assign(tf.convert_to_tensor(self.embeddings) * tf.cast(value, self.embeddings.dtype))

    def rewind(self, initial_values):
        """Retrain mode: ``V = initial_values * mask`` (the lottery-ticket rewind)."""
        self._ensure_built()
        shape = (self.vocabulary_size, self.output_dim)
        initial = np.asarray(initial_values)
        if initial.shape != shape:
            raise ValueError(
                f"{self.name}: initial values must have the table's shape {shape}. Received: shape {initial.shape}"
            )
        mask = to_numpy(self.mask) if self.retrain else 1
        self.embeddings.assign((initial * mask).astype(np.float32))

    def reinitialize(self, seed=None):
        """A fresh random draw of ``V`` from ``embeddings_initializer`` (times the mask in retrain mode)."""
        self._ensure_built()
        init = self.embeddings_initializer
        if seed is not None and hasattr(init, "get_config"):
            config = init.get_config()
            if "seed" in config:
                init = init.__class__.from_config({**config, "seed": seed})
        value = tf.convert_to_tensor(fresh_initializer(init)((self.vocabulary_size, self.output_dim),
                                                             dtype="float32"))
        if self.retrain:
            value = value * tf.cast(self.mask, value.dtype)
        self.embeddings.assign(value)

    # ------------------------------------------------------------------------------------------ size accounting
    def parameter_count(self):
        return self.nonzero_count()

    def compact_layout_for(self, nnz=None):
        """The layout ``compact()`` exports this table in at ``nnz`` kept entries (default: the current count):
        ``compact_layout`` resolved, or ``"dense"`` under ``compact_min_saving`` (``choose_layout``)."""
        nnz = self.nonzero_count() if nnz is None else nnz
        return choose_layout(self.compact_layout, self.vocabulary_size, self.output_dim, nnz,
                             self.variable_dtype or "float32", self.compact_min_saving)

    def storage_bytes(self):
        nnz = self.nonzero_count()
        return packed_storage_bytes(self.vocabulary_size, self.output_dim, nnz, self.variable_dtype or "float32",
                                    layout=self.compact_layout_for(nnz))

    def dims_per_id(self):
        return self.current_mask().sum(axis=1).astype(np.int64)

    def compact(self):
        """A frozen ``PackedEmbedding`` of the pruned table, in ``compact_layout_for()``'s layout: outputs equal
        this layer's exactly."""
        config = self.get_config()
        keep = {key: config[key] for key in ("name", "dtype", "combiner", "validate_ids") if key in config}
        mask = self.current_mask()
        return PackedEmbedding.from_dense(to_numpy(self.pruned_table()), mask=mask, trainable=False,
                                          layout=self.compact_layout_for(int(mask.sum())), **keep)

    def sparse_tables(self):
        self._ensure_built()
        if self.fused:
            return [self.fused_table]
        tables = [self.embeddings]
        if not self.retrain and self.threshold_type in ROW_INDEXED:
            tables.append(self.threshold)
        return tables

    # --------------------------------------------------------------------------------------------- config
    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "threshold_type": self.threshold_type,
                "threshold_init": self.threshold_init,
                "g_scale": self.g_scale,
                "field_offsets": self.field_offsets,
                "retrain": self.retrain,
                "keep_initial": self.keep_initial,
                "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
                "embeddings_regularizer": keras.regularizers.serialize(self.embeddings_regularizer)
                if self.embeddings_regularizer is not None else None,
                "threshold_regularizer": keras.regularizers.serialize(self.threshold_regularizer)
                if self.threshold_regularizer is not None else None,
                "fused": self.fused_threshold,
                "compact_layout": self.compact_layout,
                "compact_min_saving": self.compact_min_saving,
            }
        )
        return config
