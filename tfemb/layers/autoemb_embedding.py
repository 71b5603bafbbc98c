"""AutoEmbEmbedding: N candidate dimensions per id, unified to one dim and soft-selected (AutoEmb, SAM, DARTS)."""

import numpy as np
import tensorflow as tf

from tfemb._keras import keras, register
from tfemb.layers.autoemb_controller import (
    POPULARITY_ENCODINGS,
    AutoEmbController,
    num_popularity_buckets,
    popularity_buckets,
)
from tfemb.layers.batch_norm import batch_norm
from tfemb.layers.embedding_scheme import (
    TrainingModeScheme, check_positive_int, dtype_bytes, fresh_initializer, sparse_gather,
)
from tfemb.layers.multi_dim_embedding import MultiDimEmbedding
from tfemb.optimizers import scatter_add, scatter_update

#: Candidate dimensions when none are given: N = 3 as in the paper's experiments (see docs/methods.md).
DEFAULT_CANDIDATE_DIMS = (2, 16, 128)

#: ``"controller"``: weights from the AutoEmb controller (AutoEmb, SAM); ``"darts"``: learnable logits (DARTS).
SELECTIONS = ("controller", "darts")

#: DARTS logits: one vector per id, or one for the whole feature ("side": all users, all items).
DARTS_GRANULARITIES = ("id", "side")

#: Where the popularity comes from: the running count of the stream, or the Schema's fixed training counts.
POPULARITY_SOURCES = ("stream", "frequencies")

#: What inference calls (``training=False``), ``compact()`` and the size accounting use.
INFERENCE_SELECTIONS = ("hard", "soft")


def check_candidate_dims(candidate_dims):
    """Candidate dims as a tuple of ints: non-empty, each >= 1, strictly increasing; else ``ValueError``."""
    try:
        dims = list(candidate_dims)
    except TypeError:
        raise ValueError(
            f"candidate_dims must be a non-empty, strictly increasing list of ints >= 1. "
            f"Received: candidate_dims={candidate_dims!r}"
        ) from None
    ok = bool(dims) and all(
        not isinstance(d, (bool, np.bool_)) and isinstance(d, (int, np.integer)) and d >= 1 for d in dims
    )
    if not ok or any(b <= a for a, b in zip(dims, dims[1:])):
        raise ValueError(
            "candidate_dims must be a non-empty, strictly increasing list of ints >= 1 (d_1 < ... < d_N). "
            f"Received: candidate_dims={candidate_dims!r}"
        )
    return tuple(int(d) for d in dims)


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}. Received: {name}={value!r}")
    return value


@register
class AutoEmbEmbedding(TrainingModeScheme):
    """Every id holds an embedding in each of ``N`` candidate dimensions; a per-id softmax weights them.

    AutoEmb (Zhao et al., "AutoEmb: Automated Embedding Dimensionality Search in Streaming Recommendations",
    arXiv 2002.11252). For candidate dimensions ``d_1 < ... < d_N`` each id ``u`` has ``e_u^n ∈ R^{d_n}``.
    *Dimension unification*: each candidate passes its own linear transform to ``output_dim`` (the paper's
    ``d_N``), batch normalisation and tanh, so the candidates are comparable::

        ê_u^n = tanh(BN_n(e_u^n · W_n + b_n))                               # [output_dim], n = 1..N
        e_u   = Σ_n α_u^n · ê_u^n                                           # soft selection

    The weights ``α_u`` (``selection``):

    - ``"controller"`` (AutoEmb; SAM trains the same layer differently): an ``AutoEmbController`` fed with the
      id's popularity (one-hot, ``popularity_encoding``) and its context: the weights it produced for the id the
      last time it was trained on and the id's last training loss (the paper's "previous hyperparameters and
      loss"). The controller's variables are the architecture parameters θ.
    - ``"darts"`` (the paper's DARTS baseline): ``α = softmax(a)`` with learnable logits ``a``, one vector per id
      (``darts_granularity="id"``, as the authors' group's DARTS baseline in github.com/zgahhblhc/ESAPN) or one for
      the whole feature (``"side"``). The logits are θ.

    **Stream state** (non-trainable variables, saved with the layer): ``counts`` (int64 ``[V]``, the id's
    training interactions so far: its popularity), ``previous_weights`` (``[V, N]``, initialised to all weight on
    the smallest candidate as in the authors' code) and ``previous_loss`` (``[V]``, initialised to 1). A training
    call (``training=True``) first computes the weights from the state as it was *before* the batch, then adds
    the batch's ids to ``counts`` and stores each id's new weights (its last occurrence in the batch wins; the
    paper counts per interaction, tfemb per batch). ``previous_loss`` is written by the training procedure
    (``tfemb.autoemb``: ``record_losses``), which knows the per-example losses. ``tfemb.autoemb.AutoEmbSearch``
    (the bilevel DARTS procedure) freezes the state during its θ-steps.

    **Inference** (``training=False``) uses ``inference_selection``: ``"hard"`` (default) keeps only each id's
    highest-weighted candidate, with weight 1; ``"soft"`` the weighted sum. The weights at inference come from
    the frozen state (final counts, last weights, last losses) and the controller's moving statistics, so they
    are a fixed function of the id. ``compact()``, ``parameter_count()``, ``storage_bytes()`` and
    ``dims_per_id()`` follow the same mode: hard gives a ``MultiDimEmbedding`` that stores every id once, at its
    selected dimension, with that candidate's transform and frozen batch normalisation folded into one affine
    map (physically ``Σ_n rows_n · d_n`` table entries + the maps of the used candidates + an int32 id -> row
    remap); soft gives the exact soft model (all ``N`` tables, all maps and the frozen per-id weights).

    Args:
        vocabulary_size: int, number of ids (OOV id 0 included).
        output_dim: int, the unified dimension every candidate is mapped to. Default ``max(candidate_dims)``
            (the paper's ``d_N``).
        candidate_dims: strictly increasing ints, the candidate dimensions. Default ``(2, 16, 128)``.
        selection: ``"controller"`` (default) or ``"darts"``.
        darts_granularity: ``"id"`` (default) or ``"side"``; only with ``selection="darts"``.
        popularity: ``"stream"`` (default: running counts from 0, updated by training calls) or
            ``"frequencies"`` (the ``frequencies`` given, e.g. the Schema's training counts, fixed).
        popularity_encoding: ``"one_hot"`` (default, one position per count up to ``max_popularity``) or
            ``"log2"`` (one per doubling).
        max_popularity: int >= 1, counts above it share the last one-hot position. Default 1000.
        controller_units: int, hidden width of the controller. Default 512 (authors' code).
        batch_norm_momentum: momentum of the candidates' and the controller's batch normalisation. Default 0.9
            (PyTorch's default, which the authors' code uses).
        inference_selection: ``"hard"`` (default) or ``"soft"``, see above.
        embeddings_initializer: initializer of the candidate tables. Default ``"uniform"`` (U(-0.05, 0.05)).
        transform_initializer: initializer of the transforms ``W_n``. Default ``"glorot_uniform"``.
        **kwargs: ``combiner``, ``frequencies``, ``validate_ids`` and base Layer arguments.

    Input shape:
        int tensor ``[batch]`` or ``[batch, k]``.

    Output shape:
        ``[batch, output_dim]`` / ``[batch, k, output_dim]``, or ``[batch, output_dim]`` with a combiner.

    Example:

    >>> layer = AutoEmbEmbedding(vocabulary_size=23, candidate_dims=(2, 5, 7), controller_units=11)
    >>> layer(tf.constant([0, 5, 22])).shape
    TensorShape([3, 7])

    Where tfemb simplifies the paper: popularity is counted per batch, not per interaction; multi-hot padding
    (id -1) is looked up as the OOV id 0 and counts as an interaction of id 0; the hard export uses weight 1 for
    the selected candidate (the paper selects softly; the difference is reported by
    ``tfemb.autoemb.hard_soft_difference``).

    References:
        - Zhao et al., arXiv 2002.11252 (AutoEmb, its SAM and DARTS baselines).
        - Liu et al., "DARTS: Differentiable Architecture Search", ICLR 2019.
    """

    def __init__(self, vocabulary_size, output_dim=None, candidate_dims=DEFAULT_CANDIDATE_DIMS,
                 selection="controller", darts_granularity="id", popularity="stream", popularity_encoding="one_hot",
                 max_popularity=1000, controller_units=512, batch_norm_momentum=0.9, inference_selection="hard",
                 embeddings_initializer="uniform", transform_initializer="glorot_uniform", **kwargs):
        dims = check_candidate_dims(candidate_dims)
        super().__init__(vocabulary_size, dims[-1] if output_dim is None else output_dim, **kwargs)
        self.candidate_dims = dims
        self.selection = _choice("selection", selection, SELECTIONS)
        self.darts_granularity = _choice("darts_granularity", darts_granularity, DARTS_GRANULARITIES)
        self.popularity = _choice("popularity", popularity, POPULARITY_SOURCES)
        if self.popularity == "frequencies" and self.frequencies is None:
            raise ValueError("popularity='frequencies' needs frequencies (per-id counts). Received: frequencies=None")
        self.popularity_encoding = _choice("popularity_encoding", popularity_encoding, POPULARITY_ENCODINGS)
        self.max_popularity = check_positive_int("max_popularity", max_popularity)
        self.controller_units = check_positive_int("controller_units", controller_units)
        momentum = batch_norm_momentum
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"batch_norm_momentum must be a number in [0, 1). Received: batch_norm_momentum={momentum!r}")
        self.batch_norm_momentum = float(momentum)
        self.inference_selection = _choice("inference_selection", inference_selection, INFERENCE_SELECTIONS)
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.transform_initializer = keras.initializers.get(transform_initializer)
        # One batch normalisation over the N candidates' concatenated outputs ([n, N * output_dim]): its statistics
        # are per feature, so this is exactly N separate batch normalisations of [n, output_dim] each, in one op
        # group instead of N (the candidates' BN was a third of the layer's training step).
        self.norm = keras.layers.BatchNormalization(momentum=self.batch_norm_momentum, name="candidate_batch_norm")
        self.controller = None
        if self.selection == "controller":
            self.controller = AutoEmbController(
                len(dims), num_popularity_buckets(self.popularity_encoding, self.max_popularity),
                hidden_units=self.controller_units, batch_norm_momentum=self.batch_norm_momentum, name="controller",
            )
        # A Python flag read while tracing (as the training mode, TrainingModeScheme): whether the procedure froze
        # the stream state (θ-steps of the bilevel search must not count their validation batch as traffic).
        object.__setattr__(self, "state_frozen", False)

    @property
    def num_candidates(self):
        return len(self.candidate_dims)

    def build(self, input_shape=None):
        v, d, n = self.vocabulary_size, self.output_dim, self.num_candidates
        self.tables, self.kernels, self.biases = [], [], []
        for i, dim in enumerate(self.candidate_dims):
            self.tables.append(self.add_weight(name=f"embeddings_{i}", shape=(v, dim),
                                               initializer=fresh_initializer(self.embeddings_initializer, i)))
            self.kernels.append(self.add_weight(name=f"transform_kernel_{i}", shape=(dim, d),
                                                initializer=fresh_initializer(self.transform_initializer, i)))
            self.biases.append(self.add_weight(name=f"transform_bias_{i}", shape=(d,), initializer="zeros"))

        self.norm.build((None, n * d))
        if self.controller is not None:
            self.controller.build()
            self.architecture_logits = None
        else:
            shape = (v, n) if self.darts_granularity == "id" else (n,)
            self.architecture_logits = self.add_weight(name="architecture_logits", shape=shape, initializer="zeros")
        if self.popularity == "frequencies":
            counts = np.rint(self.frequencies_array()).astype(np.int64)
            count_init = lambda shape, dtype=None: tf.constant(counts, tf.int64)  # noqa: E731
        else:
            count_init = "zeros"
        self.counts = self.add_weight(name="counts", shape=(v,), dtype="int64", initializer=count_init,
                                      trainable=False)
        first = np.zeros((v, n), np.float32)
        first[:, 0] = 1.0  # the authors' code starts every id with all weight on the smallest candidate
        self.previous_weights = self.add_weight(name="previous_weights", shape=(v, n), dtype="float32",
                                                initializer=lambda shape, dtype=None: tf.constant(first),
                                                trainable=False)
        self.previous_loss = self.add_weight(name="previous_loss", shape=(v,), dtype="float32", initializer="ones",
                                             trainable=False)
        self.built = True

    # ----------------------------------------------------------------------------------------------- forward
    def soft_weights(self, flat_ids, training=False):
        """The softmax weights ``α`` of int64 ids ``[n]`` from the current state: ``[n, N]`` float32."""
        n = self.num_candidates
        if self.controller is None:
            if self.darts_granularity == "side":
                return tf.broadcast_to(tf.nn.softmax(self.architecture_logits), tf.stack([tf.size(flat_ids), n]))
            return tf.nn.softmax(sparse_gather(self.architecture_logits, flat_ids), axis=-1)
        popularity = popularity_buckets(sparse_gather(self.counts, flat_ids), self.popularity_encoding,
                                        self.max_popularity)
        # Inputs valid by construction (capped buckets, the state's own shapes): no input assertions.
        return self.controller(
            (popularity, sparse_gather(self.previous_weights, flat_ids), sparse_gather(self.previous_loss, flat_ids)),
            training=training, check_inputs=False,
        )

    def candidate_vectors(self, flat_ids, training=False):
        """The unified candidates ``ê^n`` of int64 ids ``[n]``: ``[n, N, output_dim]``."""
        lifted = []
        for i in range(self.num_candidates):
            vectors = tf.cast(self.gather_rows(self.tables[i], flat_ids), self.compute_dtype)  # [n, d_i]
            lifted.append(tf.matmul(vectors, tf.cast(self.kernels[i], self.compute_dtype))
                          + tf.cast(self.biases[i], self.compute_dtype))  # [n, output_dim]
        normed = batch_norm(self.norm, tf.concat(lifted, axis=1), training)  # [n, N * output_dim]: N BNs in one
        return tf.tanh(tf.reshape(normed, [-1, self.num_candidates, self.output_dim]))

    def candidate_norm(self, i):
        """``(gamma, beta, moving_mean, moving_variance, epsilon)`` of candidate ``i``'s batch normalisation (NumPy
        float64 slices of the shared layer's variables; gamma 1 / beta 0 when the layer has none)."""
        if not self.built:
            self.build()
        d, norm = self.output_dim, self.norm
        part = slice(i * d, (i + 1) * d)
        value = lambda v: np.asarray(tf.convert_to_tensor(v), np.float64)[part]  # noqa: E731
        gamma = value(norm.gamma) if norm.scale else np.ones(d)
        beta = value(norm.beta) if norm.center else np.zeros(d)
        return gamma, beta, value(norm.moving_mean), value(norm.moving_variance), float(norm.epsilon)

    def lookup(self, ids):
        training = self._call_training
        flat = tf.reshape(ids, [-1])  # [n]
        weights = self.soft_weights(flat, training=training)  # [n, N], from the state before this batch
        used = weights
        if not training and self.inference_selection == "hard":
            used = tf.one_hot(tf.argmax(weights, axis=-1), self.num_candidates, dtype=weights.dtype)
        candidates = self.candidate_vectors(flat, training=training)  # [n, N, output_dim]
        out = tf.reduce_sum(tf.cast(used, candidates.dtype)[:, :, tf.newaxis] * candidates, axis=1)  # [n, dim]
        if training and not self.state_frozen:
            self._update_state(flat, tf.stop_gradient(weights))
        return tf.reshape(out, tf.concat([tf.shape(ids), [self.output_dim]], axis=0))

    # ------------------------------------------------------------------------------------------ stream state
    @staticmethod
    def _last_occurrence(flat_ids):
        """``(unique ids, index of each one's last occurrence in flat_ids)``."""
        unique, position = tf.unique(flat_ids)
        last = tf.math.unsorted_segment_max(tf.range(tf.size(flat_ids)), position, tf.size(unique))
        return unique, last

    def _update_state(self, flat_ids, weights):
        if self.popularity == "stream":
            scatter_add(self.counts, flat_ids, tf.ones_like(flat_ids))
        unique, last = self._last_occurrence(flat_ids)
        scatter_update(self.previous_weights, unique, tf.gather(tf.cast(weights, tf.float32), last))

    def record_losses(self, ids, losses):
        """Stores each id's latest per-example training loss (the controller's loss context).

        Args:
            ids: int ids ``[batch]`` or ``[batch, k]`` (the layer's input; -1 padding is skipped).
            losses: float ``[batch]``, the per-example losses of the batch (each id of a row gets its row's loss;
                an id seen several times keeps its last occurrence's).
        """
        ids = tf.cast(tf.convert_to_tensor(ids), tf.int64)
        losses = tf.cast(tf.reshape(tf.convert_to_tensor(losses), [-1]), tf.float32)
        rank = ids.shape.rank
        if rank is not None and rank > 1:
            losses = tf.reshape(losses, tf.concat([tf.shape(losses), tf.ones([rank - 1], tf.int32)], axis=0))
        losses = tf.broadcast_to(losses, tf.shape(ids))
        flat, flat_losses = tf.reshape(ids, [-1]), tf.reshape(losses, [-1])
        keep = tf.not_equal(flat, -1)
        flat, flat_losses = tf.boolean_mask(flat, keep), tf.boolean_mask(flat_losses, keep)
        unique, last = self._last_occurrence(flat)
        scatter_update(self.previous_loss, unique, tf.gather(flat_losses, last))

    def reset_stream_state(self):
        """Counts back to their start (0, or the ``frequencies``), weights to the first candidate, losses to 1."""
        if not self.built:
            self.build()
        if self.popularity == "frequencies":
            self.counts.assign(np.rint(self.frequencies_array()).astype(np.int64))
        else:
            self.counts.assign(np.zeros(self.vocabulary_size, np.int64))
        first = np.zeros((self.vocabulary_size, self.num_candidates), np.float32)
        first[:, 0] = 1.0
        self.previous_weights.assign(first)
        self.previous_loss.assign(np.ones(self.vocabulary_size, np.float32))

    def architecture_variables(self):
        """θ: the controller's trainable variables, or the DARTS logits."""
        if not self.built:
            self.build()
        if self.controller is not None:
            return list(self.controller.trainable_variables)
        return [self.architecture_logits]

    def architecture_tables(self):
        """The θ variables read by row: the controller's popularity kernel (its one-hot input is a row gather), or
        the per-id DARTS logits; ``tfemb.autoemb.AutoEmbSearch`` can update them row-sparsely."""
        if not self.built:
            self.build()
        if self.controller is not None:
            return [self.controller.popularity_kernel]
        return [self.architecture_logits] if self.darts_granularity == "id" else []

    # ------------------------------------------------------------------------------------- selection export
    def selection_weights(self, ids=None, batch_size=65536):
        """Inference soft weights ``α`` (``[n, N]`` NumPy) of ``ids`` (default all ids), from the frozen state."""
        if not self.built:
            self.build()
        ids = np.arange(self.vocabulary_size) if ids is None else np.asarray(ids).reshape(-1)
        parts = [self.soft_weights(tf.constant(ids[s:s + batch_size], tf.int64), training=False).numpy()
                 for s in range(0, len(ids), batch_size)]
        return np.concatenate(parts, axis=0) if parts else np.zeros((0, self.num_candidates), np.float32)

    def selected_candidates(self):
        """Index of each id's highest-weighted candidate (``[V]`` int64): the hard selection."""
        if self.controller is None and self.darts_granularity == "side":
            if not self.built:
                self.build()
            best = int(np.argmax(np.asarray(tf.convert_to_tensor(self.architecture_logits))))
            return np.full(self.vocabulary_size, best, np.int64)
        return np.argmax(self.selection_weights(), axis=-1).astype(np.int64)

    def selected_dims(self):
        """Each id's selected candidate dimension (``[V]``), whatever ``inference_selection`` is."""
        return np.asarray(self.candidate_dims, np.int64)[self.selected_candidates()]

    def folded_transforms(self):
        """Per candidate ``(kernel, bias)`` with the inference batch normalisation folded in (float32 NumPy).

        ``BN(x) = γ (x - μ) / sqrt(σ² + ε) + β = x·s + t`` with ``s = γ / sqrt(σ² + ε)``, ``t = β - μ·s``, so
        ``BN(e·W + b) = e·(W·diag(s)) + (b·s + t)``, computed in float64.
        """
        out = []
        for i in range(self.num_candidates):
            gamma, beta, mean, variance, epsilon = self.candidate_norm(i)
            value = lambda v: np.asarray(tf.convert_to_tensor(v), np.float64)  # noqa: E731
            scale = gamma / np.sqrt(variance + epsilon)
            shift = beta - mean * scale
            kernel = value(self.kernels[i]) * scale[np.newaxis, :]
            bias = value(self.biases[i]) * scale + shift
            out.append((kernel.astype(np.float32), bias.astype(np.float32)))
        return out

    def _hard_blocks(self):
        """``(used candidate indices, ids of each, remap)``: ids of a block in ascending order."""
        choice = self.selected_candidates()
        used = [int(c) for c in np.unique(choice)]
        members = [np.flatnonzero(choice == c) for c in used]
        remap = np.empty(self.vocabulary_size, np.int64)
        start = 0
        for ids in members:
            remap[ids] = start + np.arange(len(ids))
            start += len(ids)
        return used, members, remap

    def compact(self, selection=None):
        """The inference layer (a frozen ``MultiDimEmbedding``): ``selection`` ``"hard"`` / ``"soft"``, default
        ``inference_selection``."""
        selection = _choice("selection", selection or self.inference_selection, INFERENCE_SELECTIONS)
        if not self.built:
            self.build()
        config = {"name": self.name, "combiner": self.combiner, "validate_ids": self.validate_ids,
                  "activation": "tanh", "trainable": False}
        folded = self.folded_transforms()
        tables = [np.asarray(tf.convert_to_tensor(t)) for t in self.tables]
        if selection == "soft":
            if self.controller is None and self.darts_granularity == "side":
                weights = tf.nn.softmax(self.architecture_logits).numpy()[np.newaxis, :]
            else:
                weights = self.selection_weights()
            return MultiDimEmbedding.from_arrays(tables, [k for k, _ in folded], [b for _, b in folded],
                                                 weights=weights, **config)
        used, members, remap = self._hard_blocks()
        return MultiDimEmbedding.from_arrays(
            [tables[c][ids] for c, ids in zip(used, members)], [folded[c][0] for c in used],
            [folded[c][1] for c in used], remap=remap, **config,
        )

    # -------------------------------------------------------------------------------------- size accounting
    def _sizes(self, selection=None):
        """``(table entries, map parameters, weight parameters, index bytes)`` of the inference form."""
        selection = selection or self.inference_selection
        d = self.output_dim
        if selection == "soft":
            maps = sum(dim * d + d for dim in self.candidate_dims)
            shared = self.controller is None and self.darts_granularity == "side"
            weights = (1 if shared else self.vocabulary_size) * self.num_candidates
            return self.vocabulary_size * sum(self.candidate_dims), maps, weights, 0
        choice = self.selected_candidates()
        rows = np.bincount(choice, minlength=self.num_candidates)
        dims = np.asarray(self.candidate_dims, np.int64)
        entries = int((rows * dims).sum())
        maps = int(sum(dims[c] * d + d for c in range(self.num_candidates) if rows[c] > 0))
        return entries, maps, 0, 4 * self.vocabulary_size

    def parameter_count(self, selection=None):
        """Parameters of the inference form (``selection`` default ``inference_selection``): hard, the selected
        rows + the maps of the used candidates; soft, every table + every map + the per-id weights. The
        controller, the DARTS logits and the stream state are search-time only and not counted."""
        entries, maps, weights, _ = self._sizes(selection)
        return entries + maps + weights

    def storage_bytes(self, selection=None):
        entries, maps, weights, index = self._sizes(selection)
        return (entries + maps + weights) * dtype_bytes(self.variable_dtype or "float32") + index

    def dims_per_id(self):
        if self.inference_selection == "soft":
            return np.full(self.vocabulary_size, sum(self.candidate_dims), np.int64)
        return self.selected_dims()

    def sparse_tables(self):
        if not self.built:
            self.build()
        return list(self.tables)

    # ------------------------------------------------------------------------------------------ serialisation
    def get_config(self):
        config = super().get_config()
        config.update({
            "candidate_dims": list(self.candidate_dims),
            "selection": self.selection,
            "darts_granularity": self.darts_granularity,
            "popularity": self.popularity,
            "popularity_encoding": self.popularity_encoding,
            "max_popularity": self.max_popularity,
            "controller_units": self.controller_units,
            "batch_norm_momentum": self.batch_norm_momentum,
            "inference_selection": self.inference_selection,
            "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
            "transform_initializer": keras.initializers.serialize(self.transform_initializer),
        })
        return config
