"""The contract every tfemb embedding method follows (see docs/ARCHITECTURE.md)."""

import numpy as np
import tensorflow as tf

from tfemb._keras import IS_KERAS_3, TrackedCollectionsCheckpoint, keras

#: Keras 3's variable class (its tf.Variable is ``.value``); None under Keras 2, whose variables are tf.Variables.
_KerasVariable = keras.Variable if IS_KERAS_3 else None

#: Value that pads multi-hot id lists; it is masked out by the combiner and never looked up.
PADDING_ID = -1

COMBINERS = ("sum", "mean", "sqrtn")

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "int16": 2, "int32": 4, "int64": 8}


def check_positive_int(name, value, minimum=1):
    """Raises ``ValueError`` naming the argument unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}. Received: {name}={value!r}")
    return int(value)


def fresh_initializer(initializer, index=0):
    """A new instance of ``initializer`` for the ``index``-th weight it starts. One instance used for several
    weights repeats its values (Keras 2 unseeded, with a warning; Keras 3 silently), so each weight gets its own
    copy; a seeded initializer gets ``seed + index``, reproducible and still different per index. Plain callables
    are returned as they are."""
    if not (hasattr(initializer, "get_config") and hasattr(type(initializer), "from_config")):
        return initializer
    config = initializer.get_config()
    if index and config.get("seed") is not None:
        config["seed"] = int(config["seed"]) + index
    return type(initializer).from_config(config)


def dtype_bytes(dtype):
    """Bytes per element of a dtype name or ``tf.DType``."""
    name = tf.as_dtype(dtype).name
    return _DTYPE_BYTES[name]


def check_frequencies(frequencies, vocabulary_size, name="frequencies"):
    """Validates per-id counts: a 1-D array of ``vocabulary_size`` non-negative finite numbers."""
    if frequencies is None:
        return None
    freq = np.asarray(frequencies, dtype=np.float64)
    if freq.ndim != 1 or freq.shape[0] != vocabulary_size:
        raise ValueError(
            f"{name} must have one count per id, shape ({vocabulary_size},). Received: shape {freq.shape}"
        )
    if not np.all(np.isfinite(freq)) or np.any(freq < 0):
        bad = freq[~np.isfinite(freq) | (freq < 0)][0]
        raise ValueError(f"{name} must be finite and non-negative. Received: a count of {bad}")
    return freq


def multi_replica():
    """True inside a ``tf.distribute`` strategy with more than one replica."""
    return tf.distribute.has_strategy() and tf.distribute.get_strategy().num_replicas_in_sync > 1


def sparse_gather(variable, rows):
    """``tf.gather(variable, rows)`` that reads only the rows of a variable, under Keras 3 too.

    A Keras 3 variable given to ``tf.gather`` is first read whole (ReadVariableOp + GatherV2); gathering from
    the tf.Variable under it (``.value``) reads only the rows (ResourceGather), ~11% less CPU per training
    step on a 1.48M-row table, and the gradient stays a row-sparse ``tf.IndexedSlices``. Inside a stateless
    scope ``.value`` is a plain tensor, which ``tf.gather`` also takes. Keras 2 variables are tf.Variables.
    """
    if _KerasVariable is not None and isinstance(variable, _KerasVariable):
        variable = variable.value
    return tf.gather(variable, rows)


def reshape_to_ids(out, ids, output_dim):
    """``out`` (``n * output_dim`` values, e.g. ``[n, output_dim]``) as ``[*ids.shape, output_dim]``, the known dims
    of ``ids`` kept static (a Flatten / Dense after the layer needs them in a functional model)."""
    if ids.shape.rank is None:
        return tf.reshape(out, tf.concat([tf.shape(ids), [output_dim]], axis=0))
    static = ids.shape.as_list()
    dynamic = tf.unstack(tf.shape(ids)) if None in static else []
    return tf.reshape(out, [s if s is not None else dynamic[j] for j, s in enumerate(static)] + [output_dim])


def _assert_all(ok, ids, message):
    """Fails (``InvalidArgumentError``) unless every entry of ``ok`` holds, printing ``message``, the first 8
    offending ``ids`` and their positions. The offending values are computed only on failure (inside the false
    branch of a ``cond``), so a passing check costs what ``tf.debugging.assert_*`` costs; those print the first
    entries of the whole tensor instead, which in a real batch are rarely the bad ones."""
    all_ok = tf.reduce_all(ok)
    if tf.executing_eagerly():
        if not bool(all_ok):
            bad = np.logical_not(ok.numpy())
            positions = [tuple(int(i) for i in p) if len(p) > 1 else int(p[0]) for p in np.argwhere(bad)[:8]]
            raise tf.errors.InvalidArgumentError(
                None, None, f"{message}; offending ids (first 8): {ids.numpy()[bad][:8].tolist()} at positions: "
                f"{positions}")
        return all_ok

    def fail():
        positions = tf.where(tf.logical_not(ok))[:8]  # works for ids of any (even unknown) rank
        report = tf.debugging.Assert(
            tf.constant(False),
            # As text: with only string data the Assert needs no guard of its own (one branch, not two).
            [message, "offending ids (first 8):", tf.strings.as_string(tf.gather_nd(ids, positions)),
             "at positions:", tf.strings.as_string(positions)], summarize=16)
        with tf.control_dependencies([report]):
            return tf.identity(all_ok)

    return tf.cond(all_ok, lambda: all_ok, fail)


class EmbeddingScheme(TrackedCollectionsCheckpoint, keras.layers.Layer):
    """Base class of every tfemb embedding method.

    An embedding scheme maps integer ids (id 0 is the out-of-vocabulary id of a ``tfemb.data.Schema``) to
    vectors of ``output_dim`` floats. Subclasses implement ``lookup`` (valid, non-padding ids to vectors) and
    the size accounting; this base class validates ids, pools multi-hot lists, casts to the compute dtype and
    keeps the common configuration.

    Args:
        vocabulary_size: int, number of ids, OOV id 0 included.
        output_dim: int, size of the vector handed to the model.
        combiner: one of ``"sum"``, ``"mean"``, ``"sqrtn"`` or ``None``. With a combiner, ids of shape
            ``[batch, k]`` (padded with -1) are pooled into ``[batch, output_dim]``; without one every id
            gets its own vector, ``[..., output_dim]``.
        frequencies: optional array of per-id training counts (length ``vocabulary_size``), for methods that
            use popularity.
        validate_ids: bool, whether ``call`` checks that ids lie in ``[0, vocabulary_size)`` (padding -1
            allowed with a combiner) and fails with a message naming the layer otherwise. Default True.

    Input shape:
        int tensor ``[batch]`` or ``[batch, k]``.

    Output shape:
        ``[batch, output_dim]`` / ``[batch, k, output_dim]``, or ``[batch, output_dim]`` with a combiner.
    """

    def __init__(self, vocabulary_size, output_dim, combiner=None, frequencies=None, validate_ids=True, **kwargs):
        kwargs.setdefault("autocast", False)  # integer ids are never cast to a float policy.
        super().__init__(**kwargs)
        self.vocabulary_size = check_positive_int("vocabulary_size", vocabulary_size)
        self.output_dim = check_positive_int("output_dim", output_dim)
        if combiner is not None and combiner not in COMBINERS:
            raise ValueError(f"combiner must be one of {COMBINERS} or None. Received: combiner={combiner!r}")
        self.combiner = combiner
        freq = check_frequencies(frequencies, self.vocabulary_size)
        # A float64 array, listed only in get_config: as a Python list (which Keras also wraps to track it)
        # 1.48M Criteo counts took 68 MB. Copied and read-only, so the caller's array cannot change it.
        if freq is not None:
            freq = freq.copy()
            freq.setflags(write=False)
        self.frequencies = freq
        self.validate_ids = bool(validate_ids)

    # ----------------------------------------------------------------------------------------------- forward
    def lookup(self, ids):
        """Vectors of valid ids: int64 ``ids`` of any shape -> float ``[*ids.shape, output_dim]``."""
        raise NotImplementedError

    def gather_rows(self, table, rows):
        """Rows ``rows`` (int64, any shape) of ``table``, one of ``sparse_tables()``: ``[*rows.shape, cols]``.

        Every scheme reads its row-indexed tables through this hook and never with ``tf.gather`` directly, so
        that export can change how a table is stored without touching the method: ``tfemb.export.quantize``
        gives a compact layer int8 rows with a per-row scale, or float16 rows, and overrides this hook to
        gather and dequantise them in-graph.
        """
        return sparse_gather(table, rows)

    def call(self, ids):
        if isinstance(ids, (tf.RaggedTensor, tf.SparseTensor)):
            raise TypeError(
                f"{self.name}: ids must be a dense integer tensor; multi-hot lists are padded with -1 to "
                f"[batch, max_length] (as tfemb.data's pipelines do) and pooled by the layer's combiner (e.g. "
                f"ragged.to_tensor(default_value=-1) with combiner='mean'). Received: {type(ids).__name__}")
        ids = tf.convert_to_tensor(ids)
        if not ids.dtype.is_integer:
            raise TypeError(
                f"{self.name}: ids must be an integer tensor. Received: dtype={ids.dtype.name}"
            )
        ids = tf.cast(ids, tf.int64)
        pooled = self.combiner is not None and ids.shape.rank is not None and ids.shape.rank >= 2
        if self.validate_ids:
            ids = self._checked(ids, allow_padding=pooled)
        if not pooled:
            return tf.cast(self.lookup(ids), self.compute_dtype)
        mask = tf.not_equal(ids, PADDING_ID)  # [batch, k]
        vectors = self.lookup(tf.where(mask, ids, tf.zeros_like(ids)))  # [batch, k, dim]
        weights = tf.cast(mask, vectors.dtype)[..., tf.newaxis]
        total = tf.reduce_sum(vectors * weights, axis=-2)  # [batch, dim]
        if self.combiner == "sum":
            out = total
        else:
            count = tf.reduce_sum(weights, axis=-2)
            if self.combiner == "sqrtn":
                count = tf.sqrt(count)
            out = tf.math.divide_no_nan(total, count)
        return tf.cast(out, self.compute_dtype)

    def _checked(self, ids, allow_padding):
        low = PADDING_ID if allow_padding else 0
        checks = [
            _assert_all(tf.greater_equal(ids, tf.constant(low, tf.int64)), ids,
                        f"{self.name}: ids must be >= {low} ({'-1 pads multi-hot lists, ' if allow_padding else ''}"
                        f"0 is the out-of-vocabulary id); received a smaller id"),
            _assert_all(tf.less(ids, tf.constant(self.vocabulary_size, tf.int64)), ids,
                        f"{self.name}: ids must be < vocabulary_size={self.vocabulary_size}; received a larger id"),
        ]
        with tf.control_dependencies(checks):
            return tf.identity(ids)

    def compute_output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if self.combiner is not None and len(input_shape) >= 2:
            return input_shape[:-1] + (self.output_dim,)
        return input_shape + (self.output_dim,)

    # ---------------------------------------------------------------------------------------- size accounting
    def parameter_count(self):
        """Parameters inference needs (after pruning / hard selection), not a training-time superset."""
        raise NotImplementedError

    def storage_bytes(self):
        """Bytes of the parameters (and index arrays) inference needs, at their export dtype."""
        raise NotImplementedError

    def search_parameter_count(self):
        """Parameters the layer trains (every trainable variable: for a search, all candidates and its
        architecture parameters), against ``parameter_count()``, what inference keeps."""
        if not self.built:
            self.build()
        return int(sum(int(np.prod(v.shape)) for v in self.trainable_variables))

    def dims_per_id(self):
        """NumPy int array of length ``vocabulary_size``: the effective dimension of each id."""
        raise NotImplementedError

    def compact(self):
        """An inference-only layer with frozen, physically smallest weights, stock TF ops, same outputs."""
        raise NotImplementedError

    def frozen_copy(self, **config):
        """A frozen layer of this class, with this layer's config (updated by ``config``) and weights: the
        ``compact()`` of a scheme whose training weights are already its smallest inference form."""
        if not self.built:
            self.build()
        layer = type(self).from_config({**self.get_config(), "trainable": False, **config})
        layer.build()
        layer.set_weights(self.get_weights())
        return layer

    def sparse_tables(self):
        """Variables indexed by id-derived rows (row-sparse gradients); ``tfemb`` optimizers update them lazily."""
        return []

    def frequencies_array(self):
        """Per-id counts as a (read-only) float64 NumPy array, or None."""
        return self.frequencies

    # ------------------------------------------------------------------------------------------ serialisation
    def load_own_variables(self, store):
        """``.keras`` / ``.weights.h5`` loading. Weights saved from a layer of another vocabulary (or other sizes)
        fail with an error naming this layer, the variable and both shapes (``_load_variables``).

        Keras 3 loads a layer once per path the model holds it under (a RecModel's ``embedding_layers`` and
        ``embedding_list``) and, when the first fails, retries under the next, where nothing is stored: that
        retry re-raises the first error instead of an uninformative "received 0 variables"."""
        previous = self.__dict__.get("_load_error")
        if len(store.keys()) == 0 and previous is not None:
            raise previous
        try:
            self._load_variables(store)
        except (ValueError, KeyError) as error:
            object.__setattr__(self, "_load_error", error)
            raise
        object.__setattr__(self, "_load_error", None)

    def _own_variables(self):
        """This layer's variables in the order Keras saves them (``save_own_variables``)."""
        if IS_KERAS_3:
            return list(self._trainable_variables) + list(self._non_trainable_variables)
        return list(self._trainable_weights) + list(self._non_trainable_weights)

    def _load_variables(self, store):
        """Loads the stored variables after checking their shapes against this layer's. Subclasses with another
        stored layout override it."""
        own = self._own_variables()
        if len(store.keys()) == len(own):
            for i, variable in enumerate(own):
                saved = tuple(int(n) for n in store[str(i)].shape)
                if saved != tuple(variable.shape):
                    name = getattr(variable, "path", variable.name).split("/")[-1].split(":")[0]
                    raise ValueError(
                        f"{self.name}: the saved weights do not fit this {type(self).__name__} (vocabulary_size="
                        f"{self.vocabulary_size}, output_dim={self.output_dim}): {name!r} was saved with shape "
                        f"{saved}, this layer's is {tuple(variable.shape)}. They come from a layer of another "
                        "vocabulary or size; build the model from the saved one's config (keras.models.load_model, "
                        "or from_config with the same Schema)"
                    )
        super().load_own_variables(store)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "vocabulary_size": self.vocabulary_size,
                "output_dim": self.output_dim,
                "combiner": self.combiner,
                "frequencies": None if self.frequencies is None else self.frequencies.tolist(),
                "validate_ids": self.validate_ids,
            }
        )
        return config


class TrainingModeScheme(EmbeddingScheme):
    """A scheme whose lookup depends on the training mode (batch norm, per-id state): ``call(ids, training)``
    keeps the mode in ``self._call_training`` (a Python bool read while tracing) for ``lookup``, which the base
    ``call`` invokes without it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        object.__setattr__(self, "_call_training", False)

    def call(self, ids, training=None):
        static = tf.get_static_value(training) if isinstance(training, (tf.Tensor, tf.Variable)) else training
        object.__setattr__(self, "_call_training", bool(static))
        try:
            return super().call(ids)
        finally:
            object.__setattr__(self, "_call_training", False)


class UniformTablesScheme(EmbeddingScheme):
    """A scheme whose ids all get ``output_dim`` and whose training tables are already their smallest inference
    form (fixed, hashing, QR): storage is the parameters at the variable dtype, ``compact()`` a frozen copy (the
    frequencies, which these lookups do not read, left out of its config)."""

    def storage_bytes(self):
        return self.parameter_count() * dtype_bytes(self.variable_dtype)

    def dims_per_id(self):
        return np.full(self.vocabulary_size, self.output_dim, dtype=np.int64)

    def compact(self):
        return self.frozen_copy(frequencies=None)
