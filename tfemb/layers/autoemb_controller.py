"""AutoEmbController: the network that weights an id's candidate embedding dimensions (AutoEmb's controller)."""

import numpy as np
import tensorflow as tf

from tfemb._keras import TrackedCollectionsCheckpoint, keras, register
from tfemb.layers.batch_norm import batch_norm
from tfemb.layers.embedding_scheme import check_positive_int, sparse_gather

#: Popularity encodings: ``"one_hot"`` (the count itself, capped) and ``"log2"`` (``floor(log2(1 + count))``).
POPULARITY_ENCODINGS = ("one_hot", "log2")


def popularity_buckets(counts, encoding="one_hot", max_popularity=1000):
    """The one-hot position of each count: what the controller's popularity input encodes.

    ``"one_hot"``: ``min(count, max_popularity)``, one position per count up to the cap (the paper feeds the
    popularity as a one-hot vector; the cap bounds its length). ``"log2"``: ``min(floor(log2(1 + count)),
    floor(log2(1 + max_popularity)))``, one position per doubling, for long streams. Works on NumPy arrays and on
    tensors (int64 out).

    >>> popularity_buckets(np.array([0, 1, 3, 7, 2000]), "one_hot", 1000).tolist()
    [0, 1, 3, 7, 1000]
    >>> popularity_buckets(np.array([0, 1, 3, 7, 2000]), "log2", 1000).tolist()
    [0, 1, 2, 3, 9]
    """
    if encoding not in POPULARITY_ENCODINGS:
        raise ValueError(f"popularity_encoding must be one of {POPULARITY_ENCODINGS}. Received: {encoding!r}")
    # floor(log2(1 + c)) capped at K = floor(log2(1 + max_popularity)), exactly, in integers: the number of
    # powers 2^1..2^K that 1 + c reaches.
    top = num_popularity_buckets("log2", max_popularity) - 1
    powers = 2 ** np.arange(1, top + 1, dtype=np.int64)  # [K]
    if isinstance(counts, (tf.Tensor, tf.Variable)):
        counts = tf.maximum(tf.cast(counts, tf.int64), 0)
        if encoding == "one_hot":
            return tf.minimum(counts, max_popularity)
        reached = tf.cast((counts + 1)[..., tf.newaxis] >= tf.constant(powers), tf.int64)
        return tf.reduce_sum(reached, axis=-1)
    counts = np.maximum(np.asarray(counts, dtype=np.int64), 0)
    if encoding == "one_hot":
        return np.minimum(counts, max_popularity)
    return ((counts + 1)[..., np.newaxis] >= powers).sum(axis=-1).astype(np.int64)


def num_popularity_buckets(encoding, max_popularity):
    """Length of the popularity one-hot vector: ``max_popularity + 1`` or ``floor(log2(1 + max_popularity)) + 1``."""
    if encoding == "one_hot":
        return int(max_popularity) + 1
    return int(max_popularity + 1).bit_length()


@register
class AutoEmbController(TrackedCollectionsCheckpoint, keras.layers.Layer):
    """Softmax weights over ``N`` candidate embedding dimensions from an id's popularity and context.

    The controller of AutoEmb (Zhao et al., arXiv 2002.11252, Section 2): its input is the id's popularity as a
    one-hot vector and its context, the weights it produced for the id last time and the id's last loss; a
    hidden layer with batch normalisation and tanh, then a softmax over the candidates::

        h = tanh(BN(onehot(p) · W_p + [α_prev, loss_prev] · W_c + b))        # [batch, hidden_units]
        α = softmax(h · W_o + b_o)                                          # [batch, num_candidates]

    The layout (``Linear(·, 512) -> BatchNorm -> Tanh -> Linear(512, N) -> Softmax``, popularity one-hot, last
    weights, last loss) follows the authors' group's AutoEmb baseline in github.com/zgahhblhc/ESAPN
    (``baselines/AutoEmb/train_autoemb.py``, ``Policy`` type 5). The one-hot product is computed as a row
    gather of ``W_p`` (the same numbers, without materialising the one-hot matrix).

    Args:
        num_candidates: int >= 1, ``N``.
        num_buckets: int >= 1, length of the popularity one-hot vector (see ``popularity_buckets``).
        hidden_units: int >= 1, width of the hidden layer. Default 512 (authors' code).
        batch_norm_momentum: momentum of the hidden batch normalisation's moving statistics. Default 0.9
            (PyTorch's default, which the authors' code uses).
        kernel_initializer: initializer of ``W_p``, ``W_c`` and ``W_o``. Default ``"glorot_uniform"``.

    Input:
        a tuple ``(popularity, previous_weights, previous_loss)``: int ``[batch]`` bucket ids in
        ``[0, num_buckets)``; float ``[batch, num_candidates]``; float ``[batch]`` or ``[batch, 1]``.

    Output shape:
        ``[batch, num_candidates]``, rows summing to 1.

    Example:

    >>> controller = AutoEmbController(num_candidates=3, num_buckets=11, hidden_units=7)
    >>> weights = controller((tf.constant([0, 4, 10]), tf.fill([3, 3], 1 / 3), tf.ones([3])))
    >>> weights.shape
    TensorShape([3, 3])
    """

    def __init__(self, num_candidates, num_buckets, hidden_units=512, batch_norm_momentum=0.9,
                 kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        self.num_candidates = check_positive_int("num_candidates", num_candidates)
        self.num_buckets = check_positive_int("num_buckets", num_buckets)
        self.hidden_units = check_positive_int("hidden_units", hidden_units)
        momentum = batch_norm_momentum
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"batch_norm_momentum must be a number in [0, 1). Received: batch_norm_momentum={momentum!r}")
        self.batch_norm_momentum = float(momentum)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.norm = keras.layers.BatchNormalization(momentum=self.batch_norm_momentum, name="hidden_batch_norm")
        self.output_layer = keras.layers.Dense(self.num_candidates, kernel_initializer=self.kernel_initializer,
                                               name="logits")

    def build(self, input_shape=None):
        h, n = self.hidden_units, self.num_candidates
        # The first layer is one Dense over [onehot(p), α_prev, loss_prev]; its kernel is stored in two parts.
        self.popularity_kernel = self.add_weight(name="popularity_kernel", shape=(self.num_buckets, h),
                                                 initializer=self._first_layer_initializer(n, 0))
        self.context_kernel = self.add_weight(name="context_kernel", shape=(n + 1, h),
                                              initializer=self._first_layer_initializer(n, 1))
        self.hidden_bias = self.add_weight(name="hidden_bias", shape=(h,), initializer="zeros")
        self.norm.build((None, h))
        self.output_layer.build((None, h))
        self.built = True

    def _first_layer_initializer(self, n, index):
        """Glorot over the whole first layer (fan-in ``num_buckets + N + 1``), as one Dense would be initialised."""
        fan_in, fan_out = self.num_buckets + n + 1, self.hidden_units
        if isinstance(self.kernel_initializer, keras.initializers.GlorotUniform):
            limit = float(np.sqrt(6.0 / (fan_in + fan_out)))
            seed = self.kernel_initializer.get_config().get("seed")
            seed = None if seed is None else int(seed) + index
            return keras.initializers.RandomUniform(-limit, limit, seed=seed)
        # A new instance per weight: under Keras 2 one unseeded instance returns the same values at every call.
        return type(self.kernel_initializer).from_config(self.kernel_initializer.get_config())

    def _check_inputs(self, inputs):
        if not isinstance(inputs, (tuple, list)) or len(inputs) != 3:
            raise ValueError(
                f"{self.name}: inputs must be a tuple (popularity, previous_weights, previous_loss). "
                f"Received: {type(inputs).__name__}" + (f" of length {len(inputs)}" if isinstance(inputs, (tuple, list)) else "")
            )
        popularity, weights, loss = (tf.convert_to_tensor(t) for t in inputs)
        if not popularity.dtype.is_integer:
            raise TypeError(f"{self.name}: popularity must be integer bucket ids. Received: dtype={popularity.dtype.name}")
        n = self.num_candidates
        if popularity.shape.rank is not None and popularity.shape.rank != 1:
            raise ValueError(f"{self.name}: popularity must have shape [batch]. Received: shape {popularity.shape}")
        if weights.shape.rank is not None and (weights.shape.rank != 2 or weights.shape[-1] not in (None, n)):
            raise ValueError(
                f"{self.name}: previous_weights must have shape [batch, num_candidates={n}]. "
                f"Received: shape {weights.shape}"
            )
        if loss.shape.rank == 2 and loss.shape[-1] in (None, 1):
            loss = tf.reshape(loss, [-1])
        if loss.shape.rank is not None and loss.shape.rank != 1:
            raise ValueError(f"{self.name}: previous_loss must have shape [batch] or [batch, 1]. Received: shape {loss.shape}")
        batch = [popularity.shape[0], weights.shape[0], loss.shape[0]]
        known = {b for b in batch if b is not None}
        if len(known) > 1:
            raise ValueError(
                f"{self.name}: popularity, previous_weights and previous_loss must have the same batch size. "
                f"Received: shapes {popularity.shape}, {weights.shape}, {loss.shape}"
            )
        checks = [
            tf.debugging.assert_equal(tf.shape(weights)[0], tf.shape(popularity)[0],
                                      message=f"{self.name}: previous_weights and popularity differ in batch size"),
            tf.debugging.assert_equal(tf.shape(loss)[0], tf.shape(popularity)[0],
                                      message=f"{self.name}: previous_loss and popularity differ in batch size"),
            tf.debugging.assert_equal(tf.shape(weights)[-1], n,
                                      message=f"{self.name}: previous_weights must have num_candidates={n} columns"),
            tf.debugging.assert_non_negative(popularity, message=f"{self.name}: popularity buckets must be >= 0"),
            tf.debugging.assert_less(tf.cast(popularity, tf.int64), tf.constant(self.num_buckets, tf.int64),
                                     message=f"{self.name}: popularity buckets must be < num_buckets={self.num_buckets}"),
        ]
        # Every input the layer reads goes through the checks: otherwise, in a graph, the concat of weights and
        # loss may run first and fail with an opaque ConcatOp error instead of the message above.
        with tf.control_dependencies(checks):
            popularity = tf.identity(tf.cast(popularity, tf.int64))
            weights, loss = tf.identity(weights), tf.identity(loss)
        return popularity, weights, loss

    def call(self, inputs, training=None, check_inputs=True):
        """``inputs`` as documented on the class. ``check_inputs=False`` skips the shape, dtype and bucket-range
        assertions: for callers whose inputs are valid by construction (``AutoEmbEmbedding`` builds them from its
        own state: capped buckets, ``[n, N]`` weights, ``[n]`` losses), where the assertions' ops and the order
        they impose are a measurable part of a streaming step."""
        if check_inputs:
            popularity, weights, loss = self._check_inputs(inputs)
        else:
            popularity, weights, loss = (tf.convert_to_tensor(t) for t in inputs)
            popularity = tf.cast(popularity, tf.int64)
            loss = tf.reshape(loss, [-1])
        context = tf.concat([tf.cast(weights, self.compute_dtype),
                             tf.cast(loss, self.compute_dtype)[:, tf.newaxis]], axis=1)  # [batch, N + 1]
        # The kernel's rows only (a read of the whole 1001 x 512 kernel copies it each step when the same step
        # then updates it).
        hidden = (tf.cast(sparse_gather(self.popularity_kernel, popularity), self.compute_dtype)
                  + tf.matmul(context, tf.cast(self.context_kernel, self.compute_dtype))
                  + tf.cast(self.hidden_bias, self.compute_dtype))  # [batch, hidden_units]
        hidden = tf.tanh(batch_norm(self.norm, hidden, training))
        logits = tf.cast(self.output_layer(hidden), tf.float32)  # softmax in float32 under mixed precision
        return tf.nn.softmax(logits, axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], self.num_candidates)

    def get_config(self):
        config = super().get_config()
        config.update({
            "num_candidates": self.num_candidates,
            "num_buckets": self.num_buckets,
            "hidden_units": self.hidden_units,
            "batch_norm_momentum": self.batch_norm_momentum,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        })
        return config
