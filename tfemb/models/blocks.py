"""Building blocks shared by tfemb's networks: MLP, linear (first-order) terms, cross network, and the
weightless interactions (FM second-order term, pairwise inner products, L2 of looked-up vectors).

Blocks that hold weights are registered Keras layers (``package="tfemb"``) so models that use them round-trip
through ``.keras`` files; the weightless interactions are plain functions of tensors.
"""

import numpy as np
import tensorflow as tf

from tfemb._keras import TrackedCollectionsCheckpoint, keras, register
from tfemb.layers.embedding_scheme import fresh_initializer
from tfemb.layers.fixed_embedding import FixedEmbedding


# ------------------------------------------------------------------------------------------------ validation
def check_units(name, units, allow_empty=True):
    """A tuple of positive ints from a list/tuple (or one int); raises ``ValueError`` naming the argument."""
    if isinstance(units, (int, np.integer)) and not isinstance(units, bool):
        units = (units,)
    if not isinstance(units, (list, tuple)) or any(
        isinstance(u, bool) or not isinstance(u, (int, np.integer)) or u < 1 for u in units
    ):
        raise ValueError(f"{name} must be a tuple of positive ints. Received: {name}={units!r}")
    if not units and not allow_empty:
        raise ValueError(f"{name} must hold at least one layer size. Received: {name}={tuple(units)!r}")
    return tuple(int(u) for u in units)


def check_rate(name, value):
    """A float in ``[0, 1)`` (dropout rates)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1). Received: {name}={value!r}")
    return float(value)


def check_l2(name, value):
    """A finite float >= 0 (L2 strengths)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not np.isfinite(value) \
            or value < 0:
        raise ValueError(f"{name} must be a float >= 0. Received: {name}={value!r}")
    return float(value)


def _l2_regularizer(l2):
    return keras.regularizers.L2(l2) if l2 else None


# ------------------------------------------------------------------------------------ weightless interactions
def stack_fields(embedded, names):
    """``{feature: [batch, dim]}`` -> ``[batch, fields, dim]`` in the order of ``names``."""
    return tf.stack([embedded[n] for n in names], axis=1)


def concat_inputs(vectors, dense=None):
    """Concatenates ``[batch, d_i]`` tensors and the optional dense features ``[batch, n_dense]``."""
    parts = list(vectors)
    if dense is not None:
        parts.append(tf.cast(dense, parts[0].dtype) if parts else dense)
    if not parts:
        raise ValueError("nothing to concatenate: the model has neither embedded nor dense features")
    return parts[0] if len(parts) == 1 else tf.concat(parts, axis=-1)


def fm_second_order(stacked):
    """Rendle's pairwise term ``sum_{i<j} <v_i, v_j>`` in O(fields x dim).

    ``0.5 * sum_d ((sum_i v_id)^2 - sum_i v_id^2)`` of ``stacked`` ``[batch, fields, dim]`` -> ``[batch, 1]``.
    """
    square_of_sum = tf.square(tf.reduce_sum(stacked, axis=1))  # [batch, dim]
    sum_of_square = tf.reduce_sum(tf.square(stacked), axis=1)  # [batch, dim]
    return 0.5 * tf.reduce_sum(square_of_sum - sum_of_square, axis=-1, keepdims=True)  # [batch, 1]


def pairwise_inner_products(stacked, self_interaction=False):
    """Inner products of all pairs of fields: ``[batch, fields, dim]`` -> ``[batch, pairs]``.

    Pairs ``(i, j)`` with ``i < j`` (``i <= j`` with ``self_interaction``) in row-major order of the upper
    triangle: ``(0, 1), (0, 2), ..., (1, 2), ...``; ``fields * (fields - 1) / 2`` of them.
    """
    fields = stacked.shape[1]
    if fields is None:
        raise ValueError("pairwise_inner_products needs a static number of fields")
    rows, cols = np.triu_indices(fields, k=0 if self_interaction else 1)
    gram = tf.matmul(stacked, stacked, transpose_b=True)  # [batch, fields, fields]
    flat = tf.reshape(gram, (-1, fields * fields))
    return tf.gather(flat, rows * fields + cols, axis=1)  # [batch, pairs]


def is_training(training):
    """True only for a Python/NumPy ``True`` (the ``training`` flag Keras passes in ``fit``)."""
    return isinstance(training, (bool, np.bool_)) and bool(training)


def l2_penalty(tensors, l2):
    """``l2 * sum_t mean_batch ||t_b||^2``: an L2 penalty on looked-up vectors (or None when ``l2 == 0``).

    Penalising the vectors a batch looked up (rather than every row of a table) keeps the gradients row-sparse,
    works for any embedding scheme, and weighs each id by how often it is seen. Models add it in training calls
    only (``training=True``): it shapes the updates and is not part of evaluation losses.
    """
    if not l2 or not tensors:
        return None
    total = tf.add_n([tf.reduce_mean(tf.reduce_sum(tf.square(tf.cast(t, tf.float32)), axis=-1)) for t in tensors])
    return l2 * total


# ---------------------------------------------------------------------------------------------- DNN towers
DNN_ARGUMENTS = ("dnn_units", "dnn_activation", "dnn_dropout", "dnn_batch_norm", "l2_dnn")


def add_dnn(model, dnn_units, dnn_activation, dnn_dropout, dnn_batch_norm, l2_dnn, allow_empty=True):
    """Checks a CTR model's DNN arguments, stores them on ``model`` under their own names (``DNN_ARGUMENTS``,
    which ``dnn_config`` reads back) and returns the tower, an ``MLP`` named ``"dnn"`` (the identity when
    ``dnn_units`` is empty, which ``allow_empty=False`` refuses)."""
    model.dnn_units = check_units("dnn_units", dnn_units, allow_empty=allow_empty)
    model.dnn_activation = dnn_activation
    model.dnn_dropout = check_rate("dnn_dropout", dnn_dropout)
    model.dnn_batch_norm = bool(dnn_batch_norm)
    model.l2_dnn = check_l2("l2_dnn", l2_dnn)
    return MLP(model.dnn_units, activation=dnn_activation, dropout=model.dnn_dropout, l2=model.l2_dnn,
               batch_norm=model.dnn_batch_norm, name="dnn")


def dnn_config(model):
    """The DNN arguments ``add_dnn`` stored on ``model``, for its ``get_config()``."""
    config = {name: getattr(model, name) for name in DNN_ARGUMENTS}
    config["dnn_units"] = list(model.dnn_units)
    return config


# --------------------------------------------------------------------------------------------- weight blocks
@register
class MLP(TrackedCollectionsCheckpoint, keras.layers.Layer):
    """A stack of fully connected layers: ``Dense -> [BatchNorm] -> activation -> [Dropout]`` per layer.

    Batch normalisation, when on, comes before the activation (as in DeepCTR's ``DNN``).

    Args:
        units: tuple of ints, the width of each layer. An empty tuple makes the block the identity.
        activation: activation of every layer. Default ``"relu"``.
        dropout: dropout rate after each layer, in ``[0, 1)``. Default 0.
        l2: L2 strength of the kernels (``keras.regularizers.L2``). Default 0.
        batch_norm: batch normalisation before each activation. Default False.
        kernel_initializer: initializer of the kernels. Default ``"glorot_uniform"``. Each kernel draws from its
            own copy (kernel ``i`` of a seeded initializer with ``seed + i``), so no two start equal.

    Input shape:
        ``[batch, d]``.

    Output shape:
        ``[batch, units[-1]]`` (``[batch, d]`` when ``units`` is empty).

    Example:

    >>> mlp = MLP((11, 7), dropout=0.1)
    >>> mlp(tf.zeros((3, 5))).shape
    TensorShape([3, 7])
    """

    def __init__(self, units, activation="relu", dropout=0.0, l2=0.0, batch_norm=False,
                 kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        self.units = check_units("units", units)
        self.activation = activation
        self.dropout = check_rate("dropout", dropout)
        self.l2 = check_l2("l2", l2)
        self.batch_norm = bool(batch_norm)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.dense_layers = []
        self.norm_layers = []
        self.activation_layers = []
        self.dropout_layers = []
        for i, width in enumerate(self.units):
            self.dense_layers.append(keras.layers.Dense(
                width, use_bias=not self.batch_norm, kernel_initializer=fresh_initializer(self.kernel_initializer, i),
                kernel_regularizer=_l2_regularizer(self.l2), name=f"dense_{i}",
            ))
            if self.batch_norm:
                self.norm_layers.append(keras.layers.BatchNormalization(name=f"batch_norm_{i}"))
            self.activation_layers.append(keras.layers.Activation(activation, name=f"activation_{i}"))
            if self.dropout:
                self.dropout_layers.append(keras.layers.Dropout(self.dropout, name=f"dropout_{i}"))

    def call(self, x, training=None):
        for i, dense in enumerate(self.dense_layers):
            x = dense(x)  # [batch, units[i]]
            if self.batch_norm:
                x = self.norm_layers[i](x, training=training)
            x = self.activation_layers[i](x)
            if self.dropout:
                x = self.dropout_layers[i](x, training=training)
        return x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)[:-1] + ((self.units[-1],) if self.units else tuple(input_shape)[-1:])

    def get_config(self):
        config = super().get_config()
        config.update({
            "units": list(self.units),
            "activation": keras.activations.serialize(keras.activations.get(self.activation))
            if not isinstance(self.activation, str) else self.activation,
            "dropout": self.dropout,
            "l2": self.l2,
            "batch_norm": self.batch_norm,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        })
        return config


@register
class LinearTerms(TrackedCollectionsCheckpoint, keras.layers.Layer):
    """First-order terms: one weight (vector) per id of every sparse feature, a linear map of the dense
    features, and a bias.

    ``logit = b + sum_f w_f[id_f] + dense @ W_dense``. Each ``w_f`` is a ``FixedEmbedding(vocabulary_size,
    units)`` named ``f"{feature}_{suffix}"`` (zeros at start, as DeepCTR's linear part), so the row-sparse
    embedding optimizers can update it; a multi-hot feature pools its weights with its combiner.

    Args:
        vocabulary_sizes: list of ``[feature, vocabulary_size]`` pairs (or a dict), in input order.
        combiners: dict ``feature -> combiner`` for multi-hot features (others absent or None).
        num_dense: number of dense features (0: none). Default 0.
        units: width of the logits (1, or the classes of a multiclass head). Default 1.
        suffix: name suffix of the tables (``"linear"``; MF uses ``"bias"``). Default ``"linear"``.
        l2: L2 strength on the looked-up weights (``l2_penalty``, in training calls) and on the dense kernel.
            Default 0.
        use_bias: add a global bias. Default True.

    Input:
        ``inputs``: dict ``feature -> int ids`` (``[batch]`` or ``[batch, k]``); ``dense``: ``[batch,
        num_dense]`` or None.

    Output shape:
        ``[batch, units]``.
    """

    def __init__(self, vocabulary_sizes, combiners=None, num_dense=0, units=1, suffix="linear", l2=0.0,
                 use_bias=True, **kwargs):
        super().__init__(**kwargs)
        pairs = list(vocabulary_sizes.items()) if isinstance(vocabulary_sizes, dict) else list(vocabulary_sizes)
        self.vocabulary_sizes = [[str(n), int(s)] for n, s in pairs]
        self.combiners = {str(k): v for k, v in (combiners or {}).items() if v is not None}
        self.num_dense = int(num_dense)
        if self.num_dense < 0:
            raise ValueError(f"num_dense must be >= 0. Received: num_dense={num_dense!r}")
        self.units = int(units)
        if self.units < 1:
            raise ValueError(f"units must be >= 1. Received: units={units!r}")
        self.suffix = str(suffix)
        self.l2 = check_l2("l2", l2)
        self.use_bias = bool(use_bias)
        self.feature_names = [n for n, _ in self.vocabulary_sizes]
        self.tables = [
            FixedEmbedding(size, self.units, combiner=self.combiners.get(name), embeddings_initializer="zeros",
                           name=f"{name}_{self.suffix}")
            for name, size in self.vocabulary_sizes
        ]
        self.dense_layer = None
        if self.num_dense:
            self.dense_layer = keras.layers.Dense(
                self.units, use_bias=False, kernel_initializer="zeros",
                kernel_regularizer=_l2_regularizer(self.l2), name=f"dense_{self.suffix}",
            )

    def build(self, input_shape=None):
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.units,), initializer="zeros", trainable=True)
        self.built = True

    def table(self, name):
        """The ``FixedEmbedding`` of one feature."""
        return self.tables[self.feature_names.index(name)]

    def call(self, inputs, dense=None, training=None):
        terms = [table(inputs[name]) for name, table in zip(self.feature_names, self.tables)]  # [batch, units]
        penalty = l2_penalty(terms, self.l2) if is_training(training) else None
        if penalty is not None:
            self.add_loss(penalty)
        if self.dense_layer is not None:
            if dense is None:
                raise ValueError(f"{self.name}: expected {self.num_dense} dense features. Received: dense=None")
            terms.append(self.dense_layer(dense))
        if self.use_bias:
            batch = tf.shape(terms[0])[0] if terms else tf.shape(dense)[0]
            terms.append(tf.broadcast_to(tf.cast(self.bias, self.compute_dtype), (batch, self.units)))
        if not terms:
            raise ValueError(f"{self.name}: no sparse features, no dense features and no bias: nothing to sum")
        return tf.add_n([tf.cast(t, self.compute_dtype) for t in terms])

    def get_config(self):
        config = super().get_config()
        config.update({
            "vocabulary_sizes": self.vocabulary_sizes,
            "combiners": dict(self.combiners),
            "num_dense": self.num_dense,
            "units": self.units,
            "suffix": self.suffix,
            "l2": self.l2,
            "use_bias": self.use_bias,
        })
        return config


@register
class CrossNetwork(TrackedCollectionsCheckpoint, keras.layers.Layer):
    """DCN-v2 cross layers: ``x_{l+1} = x_0 ⊙ (x_l W_l + b_l) + x_l``.

    ``W_l`` is full rank (``[d, d]``) by default, or the low-rank product ``V_l U_l`` (``[d, r] x [r, d]``)
    with ``low_rank=r`` (the paper's cost-saving mixture-free variant). Row-vector convention: ``W_l`` here is
    the transpose of the paper's matrix.

    Args:
        num_layers: number of cross layers. Default 2.
        low_rank: None (full rank) or the rank ``r`` of each ``W_l``. Default None.
        l2: L2 strength of the cross kernels. Default 0.
        kernel_initializer: initializer of the kernels. Default ``"glorot_uniform"``. Each kernel draws from its
            own copy (kernel ``i`` of a seeded initializer with ``seed + i``), so no two start equal.

    Input shape:
        ``[batch, d]``.

    Output shape:
        ``[batch, d]``.

    References:
        - Wang et al., "DCN V2: Improved Deep & Cross Network and Practical Lessons for Web-scale Learning to
          Rank Systems", WWW 2021 (arXiv 2008.13535).
    """

    def __init__(self, num_layers=2, low_rank=None, l2=0.0, kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)) or num_layers < 1:
            raise ValueError(f"num_layers must be an int >= 1. Received: num_layers={num_layers!r}")
        self.num_layers = int(num_layers)
        if low_rank is not None and (isinstance(low_rank, bool) or not isinstance(low_rank, (int, np.integer))
                                     or low_rank < 1):
            raise ValueError(f"low_rank must be None or an int >= 1. Received: low_rank={low_rank!r}")
        self.low_rank = None if low_rank is None else int(low_rank)
        self.l2 = check_l2("l2", l2)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        dim = int(input_shape[-1])
        reg = _l2_regularizer(self.l2)
        self.kernels, self.projections, self.biases = [], [], []
        for i in range(self.num_layers):
            if self.low_rank is None:
                self.kernels.append(self.add_weight(name=f"kernel_{i}", shape=(dim, dim),
                                                    initializer=fresh_initializer(self.kernel_initializer, i),
                                                    regularizer=reg))
            else:
                self.projections.append(self.add_weight(name=f"kernel_v_{i}", shape=(dim, self.low_rank),
                                                        initializer=fresh_initializer(self.kernel_initializer, 2 * i),
                                                        regularizer=reg))
                self.kernels.append(self.add_weight(name=f"kernel_u_{i}", shape=(self.low_rank, dim),
                                                    initializer=fresh_initializer(self.kernel_initializer, 2 * i + 1),
                                                    regularizer=reg))
            self.biases.append(self.add_weight(name=f"bias_{i}", shape=(dim,), initializer="zeros"))
        self.built = True

    def call(self, x0):
        x = x0  # [batch, d]
        for i in range(self.num_layers):
            h = tf.matmul(x, self.projections[i]) if self.low_rank is not None else x  # [batch, r] or [batch, d]
            x = x0 * (tf.matmul(h, self.kernels[i]) + self.biases[i]) + x  # [batch, d]
        return x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({
            "num_layers": self.num_layers,
            "low_rank": self.low_rank,
            "l2": self.l2,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        })
        return config


# ------------------------------------------------------------------------------------------ model helpers
def cf_input_features(schema, user_feature, item_feature, side_features=False):
    """``(sparse_names, dense_names)`` of a CF model: user and item ids, then (with ``side_features``) every
    other sparse feature and all dense features of ``schema``."""
    sparse = [f.name for f in schema.sparse_features]
    for arg, name in (("user_feature", user_feature), ("item_feature", item_feature)):
        if name not in sparse:
            raise ValueError(
                f"{arg}={name!r} is not a sparse (id) feature of the schema; its sparse features are {sparse}"
            )
    if user_feature == item_feature:
        raise ValueError(f"user_feature and item_feature must differ. Received: both {user_feature!r}")
    if not side_features:
        return [user_feature, item_feature], []
    others = [n for n in sparse if n not in (user_feature, item_feature)]
    return [user_feature, item_feature] + others, [f.name for f in schema.dense_features]


def require_single_score(model):
    """Models whose output is one score per example (MF's dot product, FM's pairwise sum) have no multiclass
    head: raise a clear error for a multiclass schema."""
    if model.task == "multiclass":
        raise ValueError(
            f"{type(model).__name__} predicts one score per example and supports the 'binary' and 'regression' "
            f"tasks. Received: a multiclass schema ({model.num_classes} classes); use CFNetwork, NeuMF or an MLP "
            "model for multiclass labels"
        )


def make_linear_terms(model, l2=0.0, suffix="linear", features=None, with_dense=True, name=None):
    """A ``LinearTerms`` block over ``features`` (default: the model's sparse features) and, with
    ``with_dense``, its dense features, sized for the model's head."""
    features = model.sparse_names if features is None else features
    return LinearTerms(
        [[n, model.schema.vocabulary_size(n)] for n in features],
        combiners={n: model.schema.combiner(n) for n in features},
        num_dense=len(model.dense_names) if with_dense else 0,
        units=model.output_units, suffix=suffix, l2=l2, name=name or f"{suffix}_terms",
    )


def add_embedding_l2(model, embedded, l2, training):
    """In a training call, adds ``l2_penalty`` of the looked-up vectors ``embedded`` (dict or list) to ``model``'s
    losses. (Outside training nothing is added: Keras 2 also rejects eager losses outside ``__call__``, which is
    how ``RecModel.build`` runs the model.)"""
    if not is_training(training):
        return
    tensors = list(embedded.values()) if isinstance(embedded, dict) else list(embedded)
    penalty = l2_penalty(tensors, l2)
    if penalty is not None:
        model.add_loss(penalty)
