"""AutoDisEmbedding: a numeric feature softly discretised into learned buckets, each with a meta-embedding."""

import tensorflow as tf

from tfemb._keras import keras, register
from tfemb.layers.embedding_scheme import check_positive_int, fresh_initializer
from tfemb.layers.numeric_embedding import NumericEmbedding

#: How the bucket scores and the meta-embeddings make the embedding (the paper's three aggregation functions).
AGGREGATIONS = ("weighted_average", "max_pooling", "top_k_sum")


@register
class AutoDisEmbedding(NumericEmbedding):
    """AutoDis (Guo et al., "An Embedding Learning Framework for Numerical Features in CTR Prediction", KDD 2021,
    arXiv 2012.08986): a numeric value is softly assigned to ``H`` learned buckets, and its embedding aggregates
    the buckets' meta-embeddings.

    For a field with value ``x`` (one layer per field, as the paper's per-field parameters):

    - **Meta-embeddings** ``ME`` (``[H, d]``): one learned vector per bucket, shared by every value of the field.
    - **Automatic discretisation**: a two-layer network with a skip connection scores the buckets,
      ``h = LeakyReLU(w·x + b_1)`` (``w``, ``b_1``: ``[H]``), ``x̃ = h·W + b_2 + α·h`` (``W``: ``[H, H]``), and a
      softmax with temperature ``τ`` makes the scores a distribution over the buckets, ``p = softmax(x̃ / τ)``.
    - **Aggregation**: ``"weighted_average"`` (the paper's choice, ``e = p·ME``), ``"max_pooling"`` (the
      meta-embedding of the highest-scored bucket: a hard discretisation, whose scores get no gradient) or
      ``"top_k_sum"`` (the sum of the ``top_k`` highest-scored meta-embeddings, also hard). A hard aggregation
      passes no gradient to the scores, so the discretisation network keeps its initial (random) weights, which
      are then created non-trainable; only the meta-embeddings learn.

    Every value gets its own embedding, continuous in ``x`` (with ``weighted_average``), and similar values get
    similar ones, which hard bucketing (``NumericFeature(discretize=...)``) does not give at bucket edges.

    Where this differs from the paper:

    - Biases ``b_1``, ``b_2`` (``use_bias=True``, the default). The paper writes the network without them. Then
      ``h`` is ``x`` times one of two fixed vectors (by the sign of ``x``), so the bucket that scores highest is
      the same for every positive ``x`` and the scores only sharpen as ``|x|`` grows: no value range can have
      its own bucket. Public implementations (the PyTorch and EasyRec ones) use biased linear layers too.
      ``use_bias=False`` gives the equations as written. ``b_1`` starts uniform in ``[-1, 1]`` (PyTorch's
      start for a ``Linear(1, H)``), so the units' kinks spread over standardised inputs; ``b_2`` starts at 0. The authors' MindSpore release (``mindspore-ai/models``,
      ``research/recommend/autodis``) keeps only ``p = softmax(x·w / τ)``, with ``H = 20`` and ``τ = 1e-5``.
    - A fixed temperature ``τ``. The paper also describes a temperature-adaptive network, which is not
      implemented.
    - The LeakyReLU slope (``negative_slope``) is not given in the paper: 0.01, PyTorch's default.
    - The paper normalises numeric inputs before AutoDis. Here the input is whatever the Schema's transform makes
      of the value (``log_standardize`` for Criteo's counts).

    Args:
        output_dim: int, size of the meta-embeddings and of the output (``d``).
        num_buckets: int, ``H``, the number of meta-embeddings. Default 20 (the authors' release).
        temperature: float > 0, ``τ``. Default 1.0, chosen on the validation splits of ``benchmarks/autodis.py``
            among 0.1, 1 and 10: on Criteo 10K 0.1 and 1 tie (val AUC 0.7385 and 0.7376, 3 seeds), on its
            synthetic bumps 1 is ahead by 0.04 (``benchmarks/README.md``, "AutoDis evidence").
        skip_factor: float, ``α``, the weight of the skip connection. Default 0.1.
        aggregation: one of ``AGGREGATIONS``. Default ``"weighted_average"``.
        top_k: int, buckets summed by ``"top_k_sum"`` (at most ``num_buckets``). Default 2.
        use_bias: bool, biases in the discretisation network (see above). Default True.
        negative_slope: float, the LeakyReLU's slope for negative inputs. Default 0.01.
        kernel_initializer: initializer of ``w`` and ``W``. Default Glorot uniform.
        embeddings_initializer: initializer of ``ME``. Default ``RandomUniform(-0.05, 0.05)``.

    Input shape: float ``[batch]`` or ``[batch, 1]``. Output shape: ``[batch, output_dim]``.
    """

    def __init__(self, output_dim, num_buckets=20, temperature=1.0, skip_factor=0.1, aggregation="weighted_average",
                 top_k=2, use_bias=True, negative_slope=0.01, kernel_initializer="glorot_uniform",
                 embeddings_initializer="uniform", **kwargs):
        super().__init__(output_dim, **kwargs)
        self.num_buckets = check_positive_int("num_buckets", num_buckets)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a number > 0. Received: temperature={temperature!r}")
        self.temperature = float(temperature)
        if isinstance(skip_factor, bool) or not isinstance(skip_factor, (int, float)):
            raise ValueError(f"skip_factor must be a number. Received: skip_factor={skip_factor!r}")
        self.skip_factor = float(skip_factor)
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}. Received: aggregation={aggregation!r}")
        self.aggregation = aggregation
        self.top_k = check_positive_int("top_k", top_k)
        if self.top_k > self.num_buckets:
            raise ValueError(f"top_k must be at most num_buckets={self.num_buckets}. Received: top_k={top_k!r}")
        self.use_bias = bool(use_bias)
        if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)) or negative_slope < 0:
            raise ValueError(f"negative_slope must be a number >= 0. Received: negative_slope={negative_slope!r}")
        self.negative_slope = float(negative_slope)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)

    def build(self, input_shape=None):
        h, d = self.num_buckets, self.output_dim
        # A hard aggregation passes no gradient to the scores: the discretisation network keeps its initial
        # weights, so they are made non-trainable (no optimizer slots, no "gradients do not exist" warning).
        learns = self.aggregation == "weighted_average"
        # w is the kernel of a Dense(1 -> H), W of a Dense(H -> H): each gets its own initializer instance.
        self.projection = self.add_weight(name="projection", shape=(1, h), trainable=learns,
                                          initializer=fresh_initializer(self.kernel_initializer, 0))
        self.mixing = self.add_weight(name="mixing", shape=(h, h), trainable=learns,
                                      initializer=fresh_initializer(self.kernel_initializer, 1))
        if self.use_bias:
            # b_1 ~ U(-1, 1), as PyTorch initialises a Linear(1, H): zero biases would put every unit's kink at
            # x = 0; these spread them over the range of standardised inputs.
            self.projection_bias = self.add_weight(
                name="projection_bias", shape=(h,), trainable=learns,
                initializer=keras.initializers.RandomUniform(-1.0, 1.0))
            self.mixing_bias = self.add_weight(name="mixing_bias", shape=(h,), initializer="zeros", trainable=learns)
        self.meta_embeddings = self.add_weight(name="meta_embeddings", shape=(h, d),
                                               initializer=self.embeddings_initializer)
        self.built = True

    def bucket_scores(self, values):
        """``p``: ``[n]`` values -> ``[n, H]`` bucket probabilities (rows sum to 1)."""
        dtype = values.dtype
        h = values[:, None] * tf.cast(self.projection, dtype)  # [n, H]: the 1 -> H layer of a scalar input
        if self.use_bias:
            h = h + tf.cast(self.projection_bias, dtype)
        h = tf.nn.leaky_relu(h, alpha=self.negative_slope)
        logits = tf.matmul(h, tf.cast(self.mixing, dtype)) + self.skip_factor * h  # [n, H]
        if self.use_bias:
            logits = logits + tf.cast(self.mixing_bias, dtype)
        # The softmax in float32 under mixed precision: a small temperature overflows float16.
        return tf.cast(tf.nn.softmax(tf.cast(logits, tf.float32) / self.temperature, axis=-1), dtype)

    def embed_values(self, values):
        scores = self.bucket_scores(values)  # [n, H]
        meta = tf.cast(self.meta_embeddings, values.dtype)  # [H, d]
        if self.aggregation == "weighted_average":
            return tf.matmul(scores, meta)  # [n, d]
        k = 1 if self.aggregation == "max_pooling" else self.top_k
        top = tf.math.top_k(scores, k=k).indices  # [n, k]
        return tf.reduce_sum(tf.gather(meta, top), axis=1)  # [n, d]

    def parameter_count(self):
        h, d = self.num_buckets, self.output_dim
        return h + h * h + h * d + (2 * h if self.use_bias else 0)

    def get_config(self):
        config = super().get_config()
        config.update({
            "num_buckets": self.num_buckets,
            "temperature": self.temperature,
            "skip_factor": self.skip_factor,
            "aggregation": self.aggregation,
            "top_k": self.top_k,
            "use_bias": self.use_bias,
            "negative_slope": self.negative_slope,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
        })
        return config
