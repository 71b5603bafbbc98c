"""DeepHashEmbedding: DHE, embeddings computed by a network from a dense hash encoding, with no table."""

import math

import numpy as np
import tensorflow as tf

from tfemb._keras import keras, register
from tfemb.layers.batch_norm import batch_norm
from tfemb.layers.embedding_scheme import TrainingModeScheme, check_positive_int, dtype_bytes, fresh_initializer
from tfemb.layers.hashing import universal_hash_params, universal_hash_tf
from tfemb.layers.hashing_embedding import check_hashable_vocabulary

#: How the ``k`` hash values become real numbers (the paper's two "real-valued" transforms).
DISTRIBUTIONS = ("uniform", "gaussian")

#: The paper's example network (its Figure 1: 1024 hashes, five hidden layers of 1800 units, for 2M ids).
PAPER_HIDDEN_UNITS = (1800,) * 5


def mish(x):
    """Mish, ``x · tanh(softplus(x))`` (Misra 2019), the paper's activation; stock ops (Softplus, Tanh, Mul)."""
    return x * tf.tanh(tf.math.softplus(x))


def mish_np(x):
    """NumPy Mish (references, tests)."""
    return x * np.tanh(np.logaddexp(0.0, x))


def dhe_parameter_count(num_hashes, hidden_units, output_dim):
    """Parameters of a DHE network at inference (batch norm folded into the dense layers): the dense kernels
    and biases ``num_hashes -> hidden_units[0] -> ... -> output_dim``."""
    widths = [int(num_hashes), *[int(w) for w in hidden_units], int(output_dim)]
    return int(sum(a * b + b for a, b in zip(widths[:-1], widths[1:])))


def dhe_width_for_budget(budget, num_hashes, output_dim, num_hidden_layers):
    """The largest width ``w`` of ``num_hidden_layers`` equal hidden layers whose network
    (``dhe_parameter_count``) has at most ``budget`` parameters; ``ValueError`` when even ``w = 1`` does not fit."""
    budget = float(budget)
    h, k, d = int(num_hidden_layers), int(num_hashes), int(output_dim)

    def params(w):
        return dhe_parameter_count(k, [w] * h, d)

    if params(1) > budget:
        raise ValueError(
            f"a DHE network of num_hashes={k} inputs, {h} hidden layer(s) and output_dim={d} needs at least "
            f"{params(1):,} parameters (width 1); the budget is {budget:,.0f}. Lower num_hashes or compression, "
            f"use fewer hidden layers, or give this feature another scheme")
    # params(w) = (h - 1) w^2 + (k + h + d) w + d: the positive root, then step to the integer that fits.
    a, b, c = h - 1, k + h + d, d - budget
    w = int(-c / b) if a == 0 else int((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a))
    w = max(1, w)
    while params(w + 1) <= budget:
        w += 1
    while w > 1 and params(w) > budget:
        w -= 1
    return w


def dense_hash_encoding_np(ids, a, b, num_buckets, distribution="uniform"):
    """NumPy reference of the encoding: ``[*ids.shape, k]`` float64 (see ``DeepHashEmbedding``)."""
    ids = np.asarray(ids, dtype=np.int64)
    hashes = ((ids[..., None] * np.asarray(a, np.int64) + np.asarray(b, np.int64)) % np.int64(2**31 - 1)) \
        % np.int64(num_buckets)
    m = float(num_buckets)
    if distribution == "uniform":
        return hashes / (m - 1.0) * 2.0 - 1.0 if m > 1 else np.zeros(hashes.shape)
    u1 = (hashes[..., 0::2] + 1.0) / m  # (0, 1]: the logarithm is finite
    u2 = hashes[..., 1::2] / m
    radius = np.sqrt(-2.0 * np.log(u1))
    out = np.empty(hashes.shape, np.float64)
    out[..., 0::2] = radius * np.cos(2.0 * np.pi * u2)
    out[..., 1::2] = radius * np.sin(2.0 * np.pi * u2)
    return out


@register
class DeepHashEmbedding(TrainingModeScheme):
    """Deep Hash Embedding (DHE; Kang et al., KDD 2021, arXiv 2010.10784): no embedding table; each id's vector
    is computed by a network from a fixed, dense encoding of the id.

    **Encoding** (deterministic, not learned, nothing stored): ``k = num_hashes`` universal hashes
    ``H_j(x) = ((a_j x + b_j) mod P) mod m`` (``m = num_buckets``, ``P = 2**31 - 1``; ``a_j, b_j`` drawn from
    ``seed``, the family of ``tfemb.layers.hashing``), made real-valued: ``"uniform"`` (the paper's default)
    maps ``H`` to ``2 H / (m - 1) - 1`` in ``[-1, 1]``; ``"gaussian"`` applies the Box-Muller transform to pairs of
    hash values (``k`` must be even). With ``k`` hashes the encoding is unique for all practical vocabularies
    (two ids share it only if all ``k`` hashes collide), so DHE has no collisions in the sense the hashing trick has.

    **Embedding network** (learned): ``len(hidden_units)`` dense layers, each followed by batch normalisation
    (``batch_norm=True``) and the Mish activation, then a linear layer to ``output_dim``, as in the paper (its
    Figure 1: ``k = 1024``, five hidden layers of 1800 units, 32-dim embeddings for 2M ids at a quarter of the
    table's size). Parameters do not depend on the vocabulary: ``dhe_parameter_count(k, hidden_units, d)``
    (``parameter_count()``, batch norm folded into the dense layers as at inference). ``scheme_factory("dhe",
    compression=c)`` sizes equal hidden layers so the network has about ``1/c`` of the fixed table's parameters
    (``dhe_width_for_budget``), the paper's comparison at equal model size.

    Every id gets ``output_dim`` dimensions (``dims_per_id``). ``compact()`` is the frozen network with each batch
    normalisation folded into its dense layer (``y = (W s) x + (b - μ) s + β``, ``s = γ / sqrt(σ² + ε)``):
    the same outputs as this layer at inference, in stock ops (int64 hash arithmetic, MatMul, Softplus, Tanh).

    Where tfemb differs from the paper (``docs/methods.md``, DHE): the hash family is the multiply-mod-prime one
    with one prime ``2**31 - 1`` for all ``k`` hashes (the paper: universal hashing, a prime ``p > m``); the dense
    layers start from Glorot-uniform kernels (Keras' ``Dense`` default; the paper does not give its initialiser);
    ids are the Schema's encoded ids (0 = out of vocabulary), so values unseen at training share id 0 rather than
    getting their own encoding as raw DHE inputs could; DHE with side features (the paper's variant with the id's attributes) is not
    implemented.

    Args:
        vocabulary_size: int, number of ids (OOV id 0 included), at most ``2**31 - 1``.
        output_dim: int, embedding dimension ``d``.
        num_hashes: int >= 1, ``k`` (even for ``"gaussian"``). Default 1024 (the paper's).
        num_buckets: int >= 1, ``m``, the range of each hash. Default ``10**6`` (the paper's).
        hidden_units: widths of the hidden layers (at least one). Default ``(1800,) * 5``, the paper's example,
            which has ~14.9M parameters: size it to the vocabulary (``scheme_factory("dhe", compression=...)``).
        distribution: ``"uniform"`` (default) or ``"gaussian"``.
        batch_norm: bool, batch normalisation after each hidden dense layer (the paper's). Default True.
        batch_norm_momentum: momentum of the moving statistics. Default 0.99 (Keras').
        seed: int >= 0, seed of the hash parameters (not of the initialisers). Default 0.
        kernel_initializer: initializer of the dense kernels. Default ``"glorot_uniform"``.
        **kwargs: ``combiner``, ``frequencies`` (unused by DHE), ``validate_ids`` and base Layer arguments.

    Example:

    >>> layer = DeepHashEmbedding(vocabulary_size=10**6, output_dim=8, num_hashes=64, hidden_units=[32, 32])
    >>> layer(tf.constant([0, 5, 999_999])).shape
    TensorShape([3, 8])
    >>> layer.parameter_count()  # 64*32+32 + 32*32+32 + 32*8+8, against 8,000,000 for a fixed table
    3400
    """

    def __init__(self, vocabulary_size, output_dim, num_hashes=1024, num_buckets=10**6,
                 hidden_units=PAPER_HIDDEN_UNITS, distribution="uniform", batch_norm=True, batch_norm_momentum=0.99,
                 seed=0, kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(vocabulary_size, output_dim, **kwargs)
        check_hashable_vocabulary(self.vocabulary_size)
        self.num_hashes = check_positive_int("num_hashes", num_hashes)
        self.num_buckets = check_positive_int("num_buckets", num_buckets)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}. Received: distribution={distribution!r}")
        if distribution == "gaussian" and self.num_hashes % 2:
            raise ValueError(f"distribution='gaussian' pairs the hashes (Box-Muller): num_hashes must be even. "
                             f"Received: num_hashes={self.num_hashes}")
        self.distribution = distribution
        try:
            units = [check_positive_int("hidden_units[i]", u) for u in hidden_units]
        except TypeError:
            units = []
        if not units:
            raise ValueError(f"hidden_units must be a non-empty list of ints >= 1. Received: hidden_units={hidden_units!r}")
        self.hidden_units = tuple(units)
        if not isinstance(batch_norm, (bool, np.bool_)):
            raise ValueError(f"batch_norm must be True or False. Received: batch_norm={batch_norm!r}")
        self.use_batch_norm = bool(batch_norm)
        momentum = batch_norm_momentum
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"batch_norm_momentum must be a number in [0, 1). Received: batch_norm_momentum={momentum!r}")
        self.batch_norm_momentum = float(momentum)
        self.seed = check_positive_int("seed", seed, minimum=0)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        a, b = universal_hash_params(self.seed, self.num_hashes)
        self._hash_a, self._hash_b = a, b
        self.norms = [keras.layers.BatchNormalization(momentum=self.batch_norm_momentum, name=f"batch_norm_{i}")
                      for i in range(len(self.hidden_units))] if self.use_batch_norm else []

    @property
    def widths(self):
        """``[k, *hidden_units, output_dim]``: the network's layer widths."""
        return [self.num_hashes, *self.hidden_units, self.output_dim]

    def build(self, input_shape=None):
        self.kernels, self.biases = [], []
        for i, (fan_in, fan_out) in enumerate(zip(self.widths[:-1], self.widths[1:])):
            # A fresh initializer per kernel: under Keras 2 one unseeded instance gives equal-shaped kernels the
            # same values.
            self.kernels.append(self.add_weight(name=f"kernel_{i}", shape=(fan_in, fan_out),
                                                initializer=fresh_initializer(self.kernel_initializer, i)))
            self.biases.append(self.add_weight(name=f"bias_{i}", shape=(fan_out,), initializer="zeros"))
        for norm, units in zip(self.norms, self.hidden_units):
            norm.build((None, units))
        self.built = True

    # ----------------------------------------------------------------------------------------------- forward
    def hash_parameters(self):
        """``(a, b)``: the ``k`` hashes' int64 NumPy parameters."""
        return self._hash_a.copy(), self._hash_b.copy()

    def encode(self, ids):
        """The dense hash encoding of int64 ``ids`` ``[n]``: ``[n, k]`` in the compute dtype."""
        hashes = tf.cast(universal_hash_tf(ids, self._hash_a, self._hash_b, self.num_buckets), tf.float32)
        m = float(self.num_buckets)
        if self.distribution == "uniform":
            out = hashes * (2.0 / (m - 1.0)) - 1.0 if m > 1 else tf.zeros_like(hashes)
        else:
            u1 = (hashes[:, 0::2] + 1.0) / m
            u2 = hashes[:, 1::2] * (2.0 * math.pi / m)
            radius = tf.sqrt(-2.0 * tf.math.log(u1))
            pairs = tf.stack([radius * tf.cos(u2), radius * tf.sin(u2)], axis=-1)  # [n, k/2, 2]
            out = tf.reshape(pairs, [-1, self.num_hashes])
        return tf.cast(out, self.compute_dtype)

    def lookup(self, ids):
        training = self._call_training
        x = self.encode(tf.reshape(ids, [-1]))
        last = len(self.kernels) - 1
        for i, (kernel, bias) in enumerate(zip(self.kernels, self.biases)):
            x = tf.matmul(x, tf.cast(kernel, x.dtype)) + tf.cast(bias, x.dtype)
            if i < last:
                if self.norms:
                    x = batch_norm(self.norms[i], x, training)
                x = mish(x)
        return tf.reshape(x, tf.concat([tf.shape(ids), [self.output_dim]], axis=0))

    # ---------------------------------------------------------------------------------------- size accounting
    def parameter_count(self):
        return dhe_parameter_count(self.num_hashes, self.hidden_units, self.output_dim)

    def storage_bytes(self):
        """The network's kernels and biases at the variable dtype. The ``2k`` int64 hash parameters are graph
        constants, as ``HashingEmbedding``'s are: in an export's ``saved_model.pb`` (its bytes on disk), not
        here."""
        return self.parameter_count() * dtype_bytes(self.variable_dtype)

    def dims_per_id(self):
        return np.full(self.vocabulary_size, self.output_dim, dtype=np.int64)

    def folded_weights(self):
        """``[(kernel, bias), ...]`` (NumPy float64) of the inference network: each hidden layer's batch
        normalisation (moving statistics) folded into its dense layer."""
        if not self.built:
            self.build()
        value = lambda v: np.asarray(tf.convert_to_tensor(v), np.float64)  # noqa: E731
        out = []
        for i, (kernel, bias) in enumerate(zip(self.kernels, self.biases)):
            w, b = value(kernel), value(bias)
            if i < len(self.norms):
                norm = self.norms[i]
                gamma = value(norm.gamma) if norm.scale else np.ones_like(b)
                beta = value(norm.beta) if norm.center else np.zeros_like(b)
                scale = gamma / np.sqrt(value(norm.moving_variance) + float(norm.epsilon))
                w, b = w * scale, (b - value(norm.moving_mean)) * scale + beta
            out.append((w, b))
        return out

    def compact(self):
        """A frozen ``DeepHashEmbedding`` without batch normalisation whose dense layers hold the folded weights
        (``folded_weights``): this layer's inference outputs, ``parameter_count()`` values."""
        layer = type(self).from_config({**self.get_config(), "batch_norm": False, "trainable": False,
                                        "frequencies": None})
        layer.build()
        for (w, b), kernel, bias in zip(self.folded_weights(), layer.kernels, layer.biases):
            kernel.assign(w.astype(np.float32))
            bias.assign(b.astype(np.float32))
        return layer

    def get_config(self):
        config = super().get_config()
        config.update({
            "num_hashes": self.num_hashes,
            "num_buckets": self.num_buckets,
            "hidden_units": list(self.hidden_units),
            "distribution": self.distribution,
            "batch_norm": self.use_batch_norm,
            "batch_norm_momentum": self.batch_norm_momentum,
            "seed": self.seed,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        })
        return config
