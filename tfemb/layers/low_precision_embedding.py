"""LowPrecisionEmbedding: embeddings trained in low precision (LPT) with a learned step size (ALPT).

Li et al., "Adaptive Low-Precision Training for Embeddings in Click-Through Rate Prediction", AAAI 2023
(arXiv 2212.05735). Each row ``i`` of the table is ``w_i = Δ_i · q_i``: integer codes ``q_i`` of ``bits`` bits
(``-2^(b-1) <= q <= 2^(b-1) - 1``) times a step size ``Δ_i``. A training step:

1. looks up ``w = Δ·q`` and trains it as a float table (forward and backward as usual);
2. the optimizer's update gives full-precision rows ``w̃``;
3. (ALPT, ``step_size="adaptive"``) the step sizes take a gradient step on the loss of the model with
   ``ŵ = Δ·round(clip(w̃/Δ, -Qn, Qp))`` in place of the embeddings: the straight-through (LSQ) gradient
   ``∂ŵ/∂Δ = round(v) - v`` inside the range and ``-Qn`` / ``Qp`` outside it, ``v = w̃/Δ``, scaled by
   ``1/sqrt(n·d·Qp)`` (``n`` ids looked up, dimension ``d``), as the authors' code does;
4. the rows are quantised back: ``q = R(clip(w̃/Δ, -Qn, Qp))``, with ``R`` stochastic rounding
   (``floor(v + u)``, ``u ~ U[0, 1)``: unbiased, the paper's choice, whose convergence it proves) or
   round-to-nearest (``rounding="deterministic"``, the paper's weaker baseline).

So, unlike quantisation-aware training, no full-precision copy of the table survives a step: what the model
holds between steps is exactly ``Δ·q``, and ``compact()`` stores the codes and step sizes as they are (int8 for
``bits <= 8``, int16 up to 16), with outputs identical to the trained layer's.

Where this differs from the paper (also in ``docs/methods.md``):

- The codes live in a float32 variable during training (each entry exactly ``Δ_i·q``); the paper (and the
  authors' GPU kernels) hold int8 codes. The numerics are the paper's; the training-memory saving is not
  realised here: only the export is physically smaller.
- Step 4 runs after every optimizer update of the table: for the fixed step size as a Keras ``constraint`` of
  the table (so any Keras training loop gets it), or, with a row-sparse ``embedding_optimizer`` (lazy Adam, the
  authors' setting), on the rows the batch looked up only (``tfemb.optimizers.ROW_CONSTRAINT``); for ALPT in
  ``RecModel.train_step`` after step 3, which needs ``RecModel.fit`` (or ``RecModel.train_step``) to train its
  step sizes.
- The stochastic rounding draws stateless uniforms seeded by the layer's ``seed`` and the bits of the sum of
  the updated table, so replicas of a ``tf.distribute`` strategy (which hold the same table after each
  all-reduced update) round alike without a shared random state.
- The step sizes take Adam on the rows a batch looked up (``tfemb.optimizers.SparseAdam``,
  ``step_size_learning_rate``); the authors' code uses the main optimizer's type. Its state is in a
  ``tf.train.Checkpoint`` of the model, not in ``.keras`` / ``.weights.h5`` files. ALPT trains on one replica.
- The initial step size is LSQ's ``2·mean|w0| / sqrt(Qp)`` over the initial table, for every row, unless
  ``initial_step_size`` is given. Codes of fewer than 8 bits are stored one per int8 at export (no bit packing).

Args:
    vocabulary_size: int, number of ids (OOV id 0 included).
    output_dim: int, embedding dimension.
    bits: int in ``[2, 16]``, bits per code. Default 8.
    step_size: ``"adaptive"`` (ALPT: learned per row) or ``"fixed"`` (LPT: the initial step size throughout).
    rounding: ``"stochastic"`` (default) or ``"deterministic"``, the rounding after each update.
    initial_step_size: float > 0, or None for LSQ's initialisation (see above).
    step_size_learning_rate: float > 0, Adam's learning rate for the step sizes (ALPT). Default 1e-5.
    embeddings_initializer: initializer of the full-precision start (quantised at build). Default
        ``"uniform"`` (U(-0.05, 0.05), as ``FixedEmbedding``).
    seed: int, seed of the stochastic rounding. Default 0.
    embeddings_regularizer: optional regularizer of the table (its values ``Δ·q``), as ``FixedEmbedding``'s.
    **kwargs: ``combiner``, ``frequencies``, ``validate_ids`` and base Layer arguments.

Example:

>>> layer = LowPrecisionEmbedding(vocabulary_size=10, output_dim=4, bits=4, step_size="fixed")
>>> codes = layer.codes()  # integers in [-8, 7]
>>> bool(np.all(codes >= -8) and np.all(codes <= 7))
True
"""

import numpy as np
import tensorflow as tf

from tfemb._keras import IS_KERAS_3, keras, register
from tfemb.layers.embedding_scheme import EmbeddingScheme, check_positive_int
from tfemb.optimizers import ROW_CONSTRAINT

STEP_SIZES = ("adaptive", "fixed")
ROUNDINGS = ("stochastic", "deterministic")
MIN_BITS, MAX_BITS = 2, 16


def code_range(bits):
    """``(Qn, Qp)``: codes lie in ``[-Qn, Qp]`` = ``[-2^(bits-1), 2^(bits-1) - 1]``."""
    return 2 ** (bits - 1), 2 ** (bits - 1) - 1


def storage_dtype(bits):
    """The integer dtype the codes are stored in at export: int8 up to 8 bits, int16 above."""
    return "int8" if bits <= 8 else "int16"


def code_storage_bytes(rows, cols, bits):
    """Bytes of a ``rows x cols`` table stored as ``bits``-bit codes (one byte each up to 8 bits, two above) plus one
    float32 scale per row."""
    return rows * (cols * (1 if bits <= 8 else 2) + 4)


def stochastic_round(values, seed):
    """``floor(values + u)``, ``u ~ U[0, 1)`` stateless with ``seed`` (int32 ``[2]``): rounds up with probability
    equal to the fractional part, so ``E[result] = values``."""
    noise = tf.random.stateless_uniform(tf.shape(values), seed=seed, dtype=values.dtype)
    return tf.floor(values + noise)


class _Requantize(keras.constraints.Constraint):
    """The table's constraint under a fixed step size: after every optimizer update the rows are rounded back to
    their grid (step 4 of the training step)."""

    def __init__(self, layer):
        object.__setattr__(self, "_layer", layer)

    def __call__(self, w):
        return self._layer.quantized(w)

    def get_config(self):
        return {}


class _QuantizedStart(keras.initializers.Initializer):
    """The table's initializer: the layer's ``embeddings_initializer`` rounded to the grid of Δ0."""

    def __init__(self, layer):
        object.__setattr__(self, "_layer", layer)

    def __call__(self, shape, dtype=None):
        layer = self._layer
        with tf.init_scope():  # eager, so that Δ0 is a number the step sizes' initializer can read
            start = layer.embeddings_initializer(shape, dtype=dtype)
            delta = layer.initial_delta(start)
            object.__setattr__(layer, "_start_delta", delta)
            return layer.quantized(start, stochastic=False, delta=tf.constant(delta, tf.as_dtype(start.dtype)))

    def get_config(self):
        return {}


class _StartStepSize(keras.initializers.Initializer):
    """The step sizes' initializer: Δ0 of the table's start in every row."""

    def __init__(self, layer):
        object.__setattr__(self, "_layer", layer)

    def __call__(self, shape, dtype=None):
        layer = self._layer
        delta = layer.__dict__.get("_start_delta")
        if delta is None:
            raise RuntimeError(f"{layer.name}: the step sizes were initialised before the table")
        return tf.fill(shape, tf.constant(delta, dtype or tf.float32))

    def get_config(self):
        return {}


@register
class LowPrecisionEmbedding(EmbeddingScheme):
    __doc__ = __doc__.split("\n\n", 1)[1]

    def __init__(self, vocabulary_size, output_dim, bits=8, step_size="adaptive", rounding="stochastic",
                 initial_step_size=None, step_size_learning_rate=1e-5, embeddings_initializer="uniform", seed=0,
                 embeddings_regularizer=None, **kwargs):
        super().__init__(vocabulary_size, output_dim, **kwargs)
        if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}]. Received: bits={bits!r}")
        self.bits = int(bits)
        if step_size not in STEP_SIZES:
            raise ValueError(f"step_size must be one of {STEP_SIZES}. Received: step_size={step_size!r}")
        self.step_size = step_size
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}. Received: rounding={rounding!r}")
        self.rounding = rounding
        if initial_step_size is not None and not (isinstance(initial_step_size, (int, float))
                                                  and not isinstance(initial_step_size, bool)
                                                  and np.isfinite(initial_step_size) and initial_step_size > 0):
            raise ValueError(f"initial_step_size must be a finite number > 0 or None. Received: "
                             f"initial_step_size={initial_step_size!r}")
        self.initial_step_size = None if initial_step_size is None else float(initial_step_size)
        if isinstance(step_size_learning_rate, bool) or not isinstance(step_size_learning_rate, (int, float)) \
                or not step_size_learning_rate > 0:
            raise ValueError(f"step_size_learning_rate must be a number > 0. Received: "
                             f"step_size_learning_rate={step_size_learning_rate!r}")
        self.step_size_learning_rate = float(step_size_learning_rate)
        self.seed = check_positive_int("seed", seed, minimum=0)
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.embeddings_regularizer = keras.regularizers.get(embeddings_regularizer)
        self.code_min, self.code_max = -code_range(self.bits)[0], code_range(self.bits)[1]
        # Read while tracing RecModel's step-size pass (ALPT step 3): the lookup then returns ŵ = Δ·round(clip(w̃/Δ)).
        object.__setattr__(self, "_step_size_pass", False)

    @property
    def adaptive(self):
        return self.step_size == "adaptive"

    def build(self, input_shape=None):
        # The initializers share the start: the table's draws w0, sets Δ0 from it and rounds it to the grid; the
        # step sizes' fills Δ0 (Keras may defer both to the first use of the variables, in this order).
        self.embeddings = self.add_weight(
            name="embeddings", shape=(self.vocabulary_size, self.output_dim),
            initializer=_QuantizedStart(self), regularizer=self.embeddings_regularizer, trainable=True,
            constraint=None if self.adaptive else _Requantize(self),
        )
        self.step_sizes = self.add_weight(name="step_sizes", shape=(self.vocabulary_size, 1),
                                          initializer=_StartStepSize(self), trainable=False)
        if not self.adaptive:  # a row-sparse embedding_optimizer rounds the rows it updates (tfemb.optimizers)
            setattr(self.embeddings, ROW_CONSTRAINT, self.requantize_rows)
        else:
            from tfemb.optimizers import SparseAdam

            # A checkpoint dependency of the layer (a tf.train.Checkpoint of the model holds its state); its slots
            # are made on the first step, and a restore before that is applied then.
            self.step_size_adam = SparseAdam(learning_rate=self.step_size_learning_rate,
                                             name=f"{self.name}_step_size_adam")
            self.step_size_adam.track([self.step_sizes])
        self.built = True

    def initial_delta(self, start):
        """Δ0 for the initial table ``start``: ``initial_step_size``, or LSQ's ``2·mean|w0| / sqrt(Qp)``."""
        if self.initial_step_size is not None:
            return self.initial_step_size
        value = 2.0 * float(np.mean(np.abs(np.asarray(start, dtype=np.float64)))) / np.sqrt(self.code_max)
        return max(value, 1e-8)

    # ------------------------------------------------------------------------------------------ quantisation
    def quantized(self, values, stochastic=None, delta=None):
        """``Δ·R(clip(values/Δ, -Qn, Qp))``: step 4 (rounding back to the grid) of the whole table, or of some of its
        rows with their step sizes ``delta`` (``[rows, 1]``; default the step sizes of every row); ``stochastic``
        defaults to ``rounding == "stochastic"``."""
        stochastic = self.rounding == "stochastic" if stochastic is None else stochastic
        values = tf.convert_to_tensor(values)
        delta = tf.cast(tf.convert_to_tensor(self.step_sizes if delta is None else delta), values.dtype)
        v = tf.clip_by_value(values / delta, float(self.code_min), float(self.code_max))
        if stochastic:
            # The bits of the values' sum: replicas holding the same updated table draw the same noise.
            total = tf.bitcast(tf.reduce_sum(tf.cast(values, tf.float32)), tf.int32)
            q = stochastic_round(v, tf.stack([tf.constant(self.seed, tf.int32), total]))
            q = tf.clip_by_value(q, float(self.code_min), float(self.code_max))
        else:
            q = tf.round(v)
        return q * delta

    def requantize_rows(self, indices=None):
        """Rounds the rows ``indices`` (int, unique; all rows when None) back to their grid in place: step 4 after
        a row-sparse update (``embedding_optimizer``), which writes only the rows a batch looked up."""
        if indices is None:
            return self.requantize()
        variable = self.embeddings.value if IS_KERAS_3 else self.embeddings  # the tf.Variable (scatter_update)
        rows = tf.gather(variable, indices)
        delta = tf.gather(tf.convert_to_tensor(self.step_sizes), indices)
        return variable.scatter_update(tf.IndexedSlices(self.quantized(rows, delta=delta), indices))

    def requantize(self):
        """Rounds the table back to its grid in place (step 4); ``RecModel.train_step`` calls it for ALPT."""
        return self.embeddings.assign(self.quantized(self.embeddings))

    def codes(self):
        """The integer codes ``q`` (NumPy int array ``[vocabulary_size, output_dim]``)."""
        if not self.built:
            self.build()
        w = np.asarray(self.embeddings.numpy(), dtype=np.float64)
        delta = np.asarray(self.step_sizes.numpy(), dtype=np.float64)
        return np.rint(w / delta).astype(np.int64)

    def step_size_values(self):
        """The step sizes ``Δ`` (NumPy float32 ``[vocabulary_size]``)."""
        if not self.built:
            self.build()
        return self.step_sizes.numpy().reshape(-1)

    # ----------------------------------------------------------------------------------------------- forward
    def lookup(self, ids):
        rows = self.gather_rows(self.embeddings, ids)
        if not self._step_size_pass:
            return rows
        # ALPT step 3: ŵ = Δ·round(clip(w̃/Δ)) with a straight-through round; only Δ gets a gradient.
        rows = tf.stop_gradient(rows)
        delta = self.gather_rows(self.step_sizes, ids)  # [..., 1]
        v = tf.clip_by_value(rows / delta, float(self.code_min), float(self.code_max))
        q = v + tf.stop_gradient(tf.round(v) - v)
        return delta * q

    def step_size_gradient_scale(self, looked_up):
        """LSQ's gradient scale of the step sizes, ``1/sqrt(n·d·Qp)`` for ``n`` ids looked up."""
        n = tf.cast(looked_up, tf.float32)
        return tf.math.rsqrt(n * float(self.output_dim) * float(self.code_max))

    def step_size_optimizer(self):
        """The lazy Adam (``tfemb.optimizers.SparseAdam``) of the step sizes (ALPT), made with the layer."""
        if not self.built:
            self.build()
        return self.step_size_adam

    def apply_step_size_gradient(self, gradient, looked_up):
        """Step 3's update: Adam on the scaled gradient of the rows looked up; step sizes stay >= 1e-8."""
        scale = self.step_size_gradient_scale(looked_up)
        if isinstance(gradient, tf.IndexedSlices):
            gradient = tf.IndexedSlices(gradient.values * scale, gradient.indices, gradient.dense_shape)
        else:
            gradient = gradient * scale
        update = self.step_size_optimizer().apply([(gradient, self.step_sizes)])
        with tf.control_dependencies([update]):
            return self.step_sizes.assign(tf.maximum(self.step_sizes, 1e-8))

    # ---------------------------------------------------------------------------------------- size accounting
    def parameter_count(self):
        return self.vocabulary_size * self.output_dim

    def storage_bytes(self):
        """Codes at their export dtype (1 byte up to 8 bits, 2 above) plus one float32 step size per row."""
        return code_storage_bytes(self.vocabulary_size, self.output_dim, self.bits)

    def dims_per_id(self):
        return np.full(self.vocabulary_size, self.output_dim, dtype=np.int64)

    def compact(self):
        """A frozen ``FixedEmbedding`` whose table is stored as this layer's codes (int8 / int16) and step sizes,
        exactly: ``tfemb.export.quantize.store_codes``. Its outputs equal this layer's (the table is on its grid
        after every step; a table off the grid, trained outside ``RecModel.train_step``, is rounded to nearest)."""
        from tfemb.export.quantize import store_codes
        from tfemb.layers.fixed_embedding import FixedEmbedding

        if not self.built:
            self.build()
        codes = self.codes()
        codes = np.clip(codes, self.code_min, self.code_max)
        delta = self.step_size_values().astype(np.float32)
        values = (codes.astype(np.float32) * delta[:, None]).astype(np.float32)
        base = {k: v for k, v in self.get_config().items() if k in ("combiner", "validate_ids", "dtype")}
        layer = FixedEmbedding(vocabulary_size=self.vocabulary_size, output_dim=self.output_dim,
                               name=f"{self.name}_compact", trainable=False, **base)
        layer.build()
        layer.embeddings.assign(values)
        store_codes(layer, layer.embeddings, codes, delta, storage_dtype(self.bits))
        return layer

    def sparse_tables(self):
        # With an ``embedding_optimizer`` (lazy Adam, ...) the rows a batch looked up are updated and rounded back
        # (the table's row constraint; the paper's setting, where only those rows change); otherwise the compiled
        # optimizer updates the whole table and its Keras constraint rounds it back.
        return [self.embeddings]

    def get_config(self):
        config = super().get_config()
        config.update({
            "bits": self.bits,
            "step_size": self.step_size,
            "rounding": self.rounding,
            "initial_step_size": self.initial_step_size,
            "step_size_learning_rate": self.step_size_learning_rate,
            "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
            "seed": self.seed,
            "embeddings_regularizer": keras.regularizers.serialize(self.embeddings_regularizer)
            if self.embeddings_regularizer is not None else None,
        })
        return config
