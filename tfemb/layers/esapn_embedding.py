"""ESAPNEmbedding: one hard embedding size per id, grown by a policy, lifted to d_n by a linear chain (ESAPN)."""

import numpy as np
import tensorflow as tf

from tfemb._keras import keras, register
from tfemb.layers.batch_norm import batch_norm
from tfemb.layers.embedding_scheme import (
    EmbeddingScheme, TrainingModeScheme, check_positive_int, dtype_bytes, fresh_initializer, multi_replica,
    reshape_to_ids, sparse_gather,
)
from tfemb.optimizers import scatter_add, scatter_update

#: The paper's candidate sizes D (Liu et al., SIGIR 2020, Section 3; the authors' ``Emb_Size``).
DEFAULT_CANDIDATE_DIMS = (2, 4, 8, 16, 64, 128)

#: T, the number of an id's most recent losses the reward averages (the authors' ``--last_num`` default).
DEFAULT_HISTORY_LENGTH = 5

#: ``"batch_norm_tanh"``: ``tanh(BN(e_n))`` after the chain (the authors' ``RS_MLP``); ``"none"``: ``e_n`` itself.
NORMALIZATIONS = ("batch_norm_tanh", "none")

#: Where the state's frequency ``f`` comes from: the stream's running count, or the fixed ``frequencies``.
POPULARITY_SOURCES = ("stream", "frequencies")

#: Non-trainable variables every ``ESAPNEmbedding`` owns, in creation order (``load_own_variables`` reads it).
STATE_VARIABLES = ("dims_record", "size_index", "counts", "loss_history", "num_losses")


def check_candidate_dims(candidate_dims):
    """Candidate sizes as a tuple of ints ``d_1 < ... < d_n``; ``ValueError`` naming the problem otherwise.

    >>> check_candidate_dims([2, 4, 8])
    (2, 4, 8)
    """
    try:
        dims = list(candidate_dims)
    except TypeError:
        raise ValueError(f"candidate_dims must be a non-empty list of ints >= 1. "
                         f"Received: candidate_dims={candidate_dims!r}") from None
    if not dims:
        raise ValueError(f"candidate_dims must be a non-empty list of ints >= 1. "
                         f"Received: candidate_dims={candidate_dims!r}")
    for d in dims:
        if isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)) or d < 1:
            raise ValueError(f"candidate_dims must hold ints >= 1; {d!r} is not one. "
                             f"Received: candidate_dims={candidate_dims!r}")
    repeated = sorted({int(d) for d in dims if dims.count(d) > 1})
    if repeated:
        raise ValueError(f"candidate_dims must not repeat a size; {repeated[0]} appears {dims.count(repeated[0])} "
                         f"times. Received: candidate_dims={candidate_dims!r}")
    for a, b in zip(dims, dims[1:]):
        if b < a:
            raise ValueError(f"candidate_dims must be sorted in increasing order (d_1 < ... < d_n); {a} comes "
                             f"before {b}. Received: candidate_dims={candidate_dims!r}")
    return tuple(int(d) for d in dims)


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}. Received: {name}={value!r}")
    return value


def _chain_cascade(stage_rows, stage_positions, gather_stage, kernels, biases, dtype):
    """Lifts ids entering the chain at different stages, each through exactly its own transforms.

    ``stage_rows[k]`` / ``stage_positions[k]``: rows of stage ``k``'s table and their positions in the batch (None
    for a stage no id enters). Stage 0's vectors pass ``kernels[0]``, then stage 1's join them, and so on, so
    every link is one matmul over the ids below it. Returns ``[n, d_last]`` in batch order.
    """
    h, positions = None, None
    for k, (rows, pos) in enumerate(zip(stage_rows, stage_positions)):
        if h is not None:
            h = tf.matmul(h, tf.cast(kernels[k - 1], dtype)) + tf.cast(biases[k - 1], dtype)  # [m, d_k]
        if rows is not None:
            entering = tf.cast(gather_stage(k, rows), dtype)  # [m_k, d_k]
            h = entering if h is None else tf.concat([h, entering], axis=0)
            positions = pos if positions is None else tf.concat([positions, pos], axis=0)
    return tf.gather(h, tf.math.invert_permutation(positions))


class _CandidateSetCheck(tf.__internal__.tracking.Trackable):
    """Written into ``tf.train.Checkpoint`` files with the layer; on restore it compares the saved candidate sizes
    and T with the layer's and raises a ``ValueError`` naming both. Its checkpoint key (``candidate_set``) sorts
    before the layer's variables, so it is restored, and fails, before a table of the wrong shape is read."""

    def __init__(self, layer_name, candidate_dims, history_length):
        self.layer_name = layer_name
        self.candidate_dims = tuple(candidate_dims)
        self.history_length = int(history_length)

    def _serialize_to_tensors(self):
        return {"candidate_dims": tf.constant(self.candidate_dims, tf.int64),
                "history_length": tf.constant(self.history_length, tf.int64)}

    def _restore_from_tensors(self, restored_tensors):
        saved = tuple(int(d) for d in np.asarray(restored_tensors["candidate_dims"]).reshape(-1))
        saved_t = int(np.asarray(restored_tensors["history_length"]))
        check_restored_candidates(self.layer_name, self.candidate_dims, saved, self.history_length, saved_t)
        return tf.no_op()


def check_restored_candidates(layer_name, candidate_dims, saved_dims, history_length=None, saved_history=None):
    """Raises ``ValueError`` when a checkpoint's candidate sizes (or T) differ from a layer's."""
    if tuple(saved_dims) != tuple(candidate_dims):
        raise ValueError(
            f"{layer_name}: the checkpoint was written by an ESAPNEmbedding with candidate_dims={list(saved_dims)}, "
            f"but this layer has candidate_dims={list(candidate_dims)}; build the layer with the checkpoint's "
            f"candidate sizes to restore it. Received: candidate_dims={list(saved_dims)}"
        )
    if saved_history is not None and int(saved_history) != int(history_length):
        raise ValueError(
            f"{layer_name}: the checkpoint was written with history_length={int(saved_history)}, but this layer has "
            f"history_length={int(history_length)}. Received: history_length={int(saved_history)}"
        )


@register
class ESAPNEmbedding(TrainingModeScheme):
    """Each id holds one embedding of its current size ``d_k ∈ D``; a linear chain lifts it to ``d_n``.

    ESAPN (Liu et al., "Automated Embedding Size Search in Deep Recommender Systems", SIGIR 2020). The candidate
    sizes are ``D = {d_1 < ... < d_n}``; every id starts at ``d_1`` (hard selection: one size per id at a
    time). An id at size ``d_k`` is brought to ``d_n`` through the paper's chain of linear transforms, one per
    pair of consecutive sizes and shared by all ids of the feature::

        e_{k+1} = W_{k→k+1} · e_k + b_{k→k+1}            (k = 1 .. n-1; tfemb stores W as [d_k, d_{k+1}])
        e(id)   = tanh(BN(e_n))                          (normalization="batch_norm_tanh", default)
        e(id)   = e_n                                    (normalization="none")

    so the recommendation model always sees ``d_n = output_dim``. Sizes only grow: ``enlarge(ids)`` moves ids one
    candidate up, and initialises the id's new embedding from its current one, ``e_{k+1} ← W_{k→k+1} e_k +
    b_{k→k+1}`` (authors' code, ``update_RS``): the lifted vector, and hence the model's output, is unchanged at
    the moment of the enlargement, and training then uses the ``d_{k+1}`` free parameters. During the search
    every id has a row in every size's table (``V x d_k`` each, as the authors' ``emb_user`` list); only the row of
    its current size is read, so only that row gets a gradient (row-sparse, ``sparse_tables()``).

    **Per-id state** (non-trainable variables, saved with the layer by ``.keras`` files and
    ``tf.train.Checkpoint``): ``size_index`` (int64 ``[V]``, index ``k - 1`` of the current size, starts at 0),
    ``counts`` (int64 ``[V]``, the id's interactions so far: the frequency ``f`` of the policy's state; or the
    given ``frequencies`` with ``popularity="frequencies"``), ``loss_history`` (``[V, T]``, the id's last ``T``
    losses, most recent first) and ``num_losses`` (int64 ``[V]``, how many were recorded, one per batch the id
    was trained in). (Under Keras 3, ``tf.train.Checkpoint`` does not follow a ``RecModel``'s dict of embedding
    layers: checkpoint the layer itself, or save the model as ``.keras``.) The layer's ``call`` never changes the
    state: the procedure (``tfemb.esapn``) calls
    ``enlarge`` with its policy's decisions and ``record_losses`` with the per-example training losses.

    **Export.** ``compact()`` returns an ``ESAPNCompactEmbedding``: each id stored once, at its final size
    (blocks of rows per size, an int32 id -> row remap), plus the chain from the smallest size in use to
    ``d_n`` and, with batch normalisation, its frozen scale and shift. ``parameter_count()``,
    ``storage_bytes()`` and ``dims_per_id()`` describe that form.

    Args:
        vocabulary_size: int, number of ids (OOV id 0 included).
        output_dim: int, must equal ``max(candidate_dims)`` (the chain ends at ``d_n``). Default ``d_n``.
        candidate_dims: strictly increasing ints ``d_1 < ... < d_n``. Default ``(2, 4, 8, 16, 64, 128)``.
        history_length: int >= 1, ``T`` of the reward (the last ``T`` losses of an id). Default 5.
        normalization: ``"batch_norm_tanh"`` (default, authors' code) or ``"none"`` (the chain alone).
        popularity: ``"stream"`` (default: counts from 0, added by ``record_losses``) or ``"frequencies"``
            (the given ``frequencies``, e.g. the Schema's training counts, fixed).
        batch_norm_momentum: momentum of the batch normalisation's moving statistics. Default 0.9 (PyTorch's
            default, which the authors' code uses).
        embeddings_initializer: initializer of the tables. Default ``"uniform"`` (U(-0.05, 0.05), tfemb's tables).
        transform_initializer: initializer of the kernels ``W``. Default ``"glorot_uniform"``.
        **kwargs: ``combiner``, ``frequencies``, ``validate_ids`` and base Layer arguments.

    Input shape:
        int tensor ``[batch]`` or ``[batch, k]``.

    Output shape:
        ``[batch, output_dim]`` / ``[batch, k, output_dim]``, or ``[batch, output_dim]`` with a combiner.

    Example:

    >>> layer = ESAPNEmbedding(vocabulary_size=23, candidate_dims=(2, 3, 7))
    >>> layer(tf.constant([0, 5, 22])).shape
    TensorShape([3, 7])
    >>> layer.dims_per_id()[:3].tolist(), layer.parameter_count()  # 23 ids x 2 + chain 2x3+3 + 3x7+7 + BN 2x7
    ([2, 2, 2], 97)

    Where tfemb simplifies the paper / the authors' code:

    - The chain, the enlarge initialisation and ``tanh(BN(e_n))`` (one batch normalisation per feature, shared by
      all sizes) follow ``RS_MLP`` and ``update_RS`` in zgahhblhc/ESAPN ``model/train.py``; the slides' formulas
      show the chain only, which is ``normalization="none"``.
    - Initialisers are tfemb's (tables U(-0.05, 0.05), Glorot kernels, zero biases), not PyTorch's (N(0, 1)
      tables, Kaiming-uniform linear layers).
    - Losses are recorded once per batch and id (its last occurrence's loss, as the authors' array writes do),
      counts once per interaction.
    - Multi-hot padding (id -1) is looked up as the OOV id 0 and is skipped by ``record_losses``.
    - Under a multi-replica ``tf.distribute`` strategy the lookup gathers every size's table at all ids of the
      batch (other sizes' ids at row 0, masked): table gradients whose row count varies between replicas crash
      TensorFlow 2.21's cross-replica aggregation (see ``MixedDimensionEmbedding``). Same outputs.

    References:
        - Liu, Zhao, Wang, Liu, Tang, "Automated Embedding Size Search in Deep Recommender Systems", SIGIR 2020;
          code: github.com/zgahhblhc/ESAPN.
    """

    def __init__(self, vocabulary_size, output_dim=None, candidate_dims=DEFAULT_CANDIDATE_DIMS,
                 history_length=DEFAULT_HISTORY_LENGTH, normalization="batch_norm_tanh", popularity="stream",
                 batch_norm_momentum=0.9, embeddings_initializer="uniform", transform_initializer="glorot_uniform",
                 **kwargs):
        dims = check_candidate_dims(candidate_dims)
        if output_dim is not None and output_dim != dims[-1]:
            raise ValueError(
                f"output_dim must equal the largest candidate size d_n={dims[-1]} (the chain lifts every id to "
                f"d_n). Received: output_dim={output_dim!r} with candidate_dims={list(dims)}"
            )
        super().__init__(vocabulary_size, dims[-1], **kwargs)
        self.candidate_dims = dims
        self.history_length = check_positive_int("history_length", history_length)
        self.normalization = _choice("normalization", normalization, NORMALIZATIONS)
        self.popularity = _choice("popularity", popularity, POPULARITY_SOURCES)
        if self.popularity == "frequencies" and self.frequencies is None:
            raise ValueError("popularity='frequencies' needs frequencies (per-id counts). Received: frequencies=None")
        momentum = batch_norm_momentum
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"batch_norm_momentum must be a number in [0, 1). "
                             f"Received: batch_norm_momentum={momentum!r}")
        self.batch_norm_momentum = float(momentum)
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.transform_initializer = keras.initializers.get(transform_initializer)
        self.lift_norm = None
        if self.normalization == "batch_norm_tanh":
            self.lift_norm = keras.layers.BatchNormalization(momentum=self.batch_norm_momentum,
                                                             name="lift_batch_norm")

    @property
    def num_candidates(self):
        return len(self.candidate_dims)

    # ------------------------------------------------------------------------------------------------ build
    def build(self, input_shape=None):
        v, dims = self.vocabulary_size, self.candidate_dims
        # Restored first from a tf.train.Checkpoint (its key sorts first): a different candidate set fails here.
        self.candidate_set = _CandidateSetCheck(self.name, dims, self.history_length)
        self.tables, self.kernels, self.biases = [], [], []
        for k, d in enumerate(dims):
            table = self.add_weight(name=f"embeddings_{k}", shape=(v, d),
                                    initializer=fresh_initializer(self.embeddings_initializer, k))
            setattr(self, f"embeddings_{k}", table)  # an attribute, so tf.train.Checkpoint saves it under Keras 3
            self.tables.append(table)
        for k in range(len(dims) - 1):
            kernel = self.add_weight(name=f"transform_kernel_{k}", shape=(dims[k], dims[k + 1]),
                                     initializer=fresh_initializer(self.transform_initializer, k))
            bias = self.add_weight(name=f"transform_bias_{k}", shape=(dims[k + 1],), initializer="zeros")
            setattr(self, f"transform_kernel_{k}", kernel)
            setattr(self, f"transform_bias_{k}", bias)
            self.kernels.append(kernel)
            self.biases.append(bias)
        if self.lift_norm is not None:
            self.lift_norm.build((None, dims[-1]))
        # The non-trainable state, in the order of STATE_VARIABLES.
        record = np.asarray(dims, np.int64)
        self.dims_record = self.add_weight(name="dims_record", shape=(len(dims),), dtype="int64", trainable=False,
                                           initializer=lambda shape, dtype=None: tf.constant(record))
        self.size_index = self.add_weight(name="size_index", shape=(v,), dtype="int64", initializer="zeros",
                                          trainable=False)
        self.counts = self.add_weight(name="counts", shape=(v,), dtype="int64", initializer=self._count_initializer(),
                                      trainable=False)
        self.loss_history = self.add_weight(name="loss_history", shape=(v, self.history_length), dtype="float32",
                                            initializer="zeros", trainable=False)
        self.num_losses = self.add_weight(name="num_losses", shape=(v,), dtype="int64", initializer="zeros",
                                          trainable=False)
        self.built = True

    def _initial_counts(self):
        if self.popularity == "frequencies":
            return np.rint(self.frequencies_array()).astype(np.int64)
        return np.zeros(self.vocabulary_size, np.int64)

    def _count_initializer(self):
        counts = self._initial_counts()
        return lambda shape, dtype=None: tf.constant(counts, tf.int64)

    def _load_variables(self, store):
        """``.keras`` / ``.weights.h5`` loading: a file from a different candidate set (or T) fails with an error
        naming both, before any variable is assigned."""
        mine = 3 * self.num_candidates - 2 + len(STATE_VARIABLES)
        total = len(store.keys())
        groups, rest = divmod(total - len(STATE_VARIABLES) + 2, 3)
        saved = saved_t = None
        if rest == 0 and groups >= 1:
            record = np.asarray(store[str(3 * groups - 2)])
            history = np.asarray(store[str(3 * groups - 2 + STATE_VARIABLES.index("loss_history"))])
            if record.ndim == 1 and record.shape[0] == groups and history.ndim == 2:
                saved, saved_t = tuple(int(d) for d in record), int(history.shape[1])
        if saved is None:
            raise ValueError(f"{self.name}: the saved weights do not come from an ESAPNEmbedding: {total} "
                             f"variables, this layer has {mine}")
        check_restored_candidates(self.name, self.candidate_dims, saved, self.history_length, saved_t)
        super()._load_variables(store)

    # ----------------------------------------------------------------------------------------------- forward
    def lift(self, flat_ids, sizes):
        """``e_n`` (before the normalisation) of int64 ids ``[m]`` at size indices ``sizes`` ``[m]``: ``[m, d_n]``."""
        dtype = self.compute_dtype
        n = self.num_candidates
        if n == 1:
            return tf.cast(self.gather_rows(self.tables[0], flat_ids), dtype)
        if multi_replica():
            return self._lift_fixed_size(flat_ids, sizes, dtype)
        parts = tf.dynamic_partition(flat_ids, tf.cast(sizes, tf.int32), n)
        positions = tf.dynamic_partition(tf.range(tf.size(flat_ids)), tf.cast(sizes, tf.int32), n)
        return _chain_cascade(parts, positions, lambda k, rows: self.gather_rows(self.tables[k], rows),
                              self.kernels, self.biases, dtype)

    def _lift_fixed_size(self, flat_ids, sizes, dtype):
        """The same lift with every gather of size ``m`` (multi-replica strategies, see the class docstring)."""
        x = None
        for k in range(self.num_candidates):
            member = tf.equal(sizes, k)
            rows = tf.cast(self.gather_rows(self.tables[k], tf.where(member, flat_ids, tf.zeros_like(flat_ids))), dtype)
            entering = tf.where(member[:, tf.newaxis], rows, tf.zeros_like(rows))  # [m, d_k]
            if x is None:
                x = entering
            else:
                lifted = tf.matmul(x, tf.cast(self.kernels[k - 1], dtype)) + tf.cast(self.biases[k - 1], dtype)
                x = tf.where(tf.less(sizes, k)[:, tf.newaxis], lifted, entering)
        return x

    def lookup(self, ids):
        flat = tf.reshape(ids, [-1])  # [m]
        out = self.lift(flat, sparse_gather(self.size_index, flat))  # [m, d_n]
        if self.lift_norm is not None:
            out = tf.tanh(batch_norm(self.lift_norm, out, self._call_training))
        return reshape_to_ids(out, ids, self.output_dim)

    # ------------------------------------------------------------------------------------------ stream state
    @staticmethod
    def valid_ids(ids, values=None):
        """Flattened int64 ids without -1 padding, and ``values`` ``[batch]`` (one per row) broadcast to them.

        Returns ``(flat_ids [m], flat_values [m] or None)``.
        """
        ids = tf.cast(tf.convert_to_tensor(ids), tf.int64)
        if values is not None:
            values = tf.reshape(tf.convert_to_tensor(values), [-1])
            rank = ids.shape.rank
            if rank is not None and rank > 1:
                values = tf.reshape(values, tf.concat([tf.shape(values), tf.ones([rank - 1], tf.int32)], axis=0))
            values = tf.reshape(tf.broadcast_to(values, tf.shape(ids)), [-1])
        flat = tf.reshape(ids, [-1])
        keep = tf.not_equal(flat, -1)
        flat = tf.boolean_mask(flat, keep)
        return flat, None if values is None else tf.boolean_mask(values, keep)

    @staticmethod
    def batch_ids(flat_ids):
        """``(unique, position, occurrences, last)``: the distinct ids, each element's index into them, how often
        each occurs and the index of its last occurrence."""
        unique, position = tf.unique(flat_ids)
        u = tf.size(unique)
        occurrences = tf.math.unsorted_segment_sum(tf.ones_like(flat_ids), position, u)
        last = tf.math.unsorted_segment_max(tf.range(tf.size(flat_ids)), position, u)
        return unique, position, occurrences, last

    def last_losses(self, unique):
        """Each id's most recent recorded loss (1.0 before any, as the authors' ``user_losses``): ``[u]``."""
        history = sparse_gather(self.loss_history, unique)
        return tf.where(sparse_gather(self.num_losses, unique) > 0, history[:, 0], tf.ones_like(history[:, 0]))

    def recent_loss_mean(self, unique):
        """``((1/T') Σ_{t=1..T'} L_t, T' > 0)`` of ids ``[u]``, ``T' = min(num_losses, T)``: the reward's baseline."""
        history = sparse_gather(self.loss_history, unique)  # [u, T]
        recorded = tf.minimum(sparse_gather(self.num_losses, unique), self.history_length)  # [u]
        mask = tf.range(self.history_length, dtype=tf.int64)[tf.newaxis, :] < recorded[:, tf.newaxis]
        total = tf.reduce_sum(tf.where(mask, history, tf.zeros_like(history)), axis=1)
        return total / tf.cast(tf.maximum(recorded, 1), tf.float32), recorded > 0

    def enlarge(self, ids):
        """Moves each id one size up (ids at ``d_n`` stay), ``e_{k+1}[id] ← e_k[id] · W_{k→k+1} + b_{k→k+1}``.

        Vectorised: one gather, matmul and scatter per candidate size, none per id.

        Args:
            ids: int ids, any shape (repeats and -1 padding allowed).

        Returns:
            ``(unique ids [u], grown [u] bool)``: the distinct ids given and which of them moved up.
        """
        flat, _ = self.valid_ids(ids)
        flat = tf.unique(flat)[0]
        current = sparse_gather(self.size_index, flat)
        writes = []
        for k in range(self.num_candidates - 1):
            rows = tf.boolean_mask(flat, tf.equal(current, k))
            grown = tf.matmul(sparse_gather(self.tables[k], rows), self.kernels[k]) + self.biases[k]
            writes.append(scatter_update(self.tables[k + 1], rows, grown))
        grow = current < self.num_candidates - 1
        with tf.control_dependencies(writes):
            scatter_update(self.size_index, tf.boolean_mask(flat, grow), tf.boolean_mask(current, grow) + 1)
        return flat, grow

    def record_losses(self, ids, losses):
        """Records a trained batch: counts += occurrences (``popularity="stream"``), each id's loss pushed into
        its history (its last occurrence's, most recent first), ``num_losses`` += 1.

        Args:
            ids: int ids ``[batch]`` or ``[batch, k]`` (the layer's input; -1 padding is skipped).
            losses: float ``[batch]``, the per-example losses (each id of a row gets its row's loss).
        """
        flat, flat_losses = self.valid_ids(ids, tf.cast(losses, tf.float32))
        unique, _, occurrences, last = self.batch_ids(flat)
        ops = []
        if self.popularity == "stream":
            ops.append(scatter_add(self.counts, unique, occurrences))
        history = sparse_gather(self.loss_history, unique)  # [u, T]
        newest = tf.gather(flat_losses, last)[:, tf.newaxis]
        ops.append(scatter_update(self.loss_history, unique, tf.concat([newest, history[:, :-1]], axis=1)))
        ops.append(scatter_add(self.num_losses, unique, tf.ones_like(unique)))
        return tf.group(ops)

    def reset_stream_state(self):
        """Every id back to ``d_1``, counts to their start (0 or the ``frequencies``), no recorded losses."""
        if not self.built:
            self.build()
        self.size_index.assign(np.zeros(self.vocabulary_size, np.int64))
        self.counts.assign(self._initial_counts())
        self.loss_history.assign(np.zeros((self.vocabulary_size, self.history_length), np.float32))
        self.num_losses.assign(np.zeros(self.vocabulary_size, np.int64))

    # ------------------------------------------------------------------------------------- selection export
    def size_indices(self):
        """Each id's current size index (``[V]`` int64 NumPy)."""
        if not self.built:
            self.build()
        return np.asarray(tf.convert_to_tensor(self.size_index)).astype(np.int64)

    def normalization_affine(self):
        """``(scale, shift)`` of the inference batch normalisation, ``BN(x) = x·scale + shift`` (float64 NumPy)."""
        norm = self.lift_norm
        value = lambda v: np.asarray(tf.convert_to_tensor(v), np.float64)  # noqa: E731
        gamma = value(norm.gamma) if norm.scale else 1.0
        beta = value(norm.beta) if norm.center else 0.0
        scale = gamma / np.sqrt(value(norm.moving_variance) + norm.epsilon)
        return scale, beta - value(norm.moving_mean) * scale

    def compact(self):
        """The inference layer: an ``ESAPNCompactEmbedding`` with each id at its final size."""
        if not self.built:
            self.build()
        sizes = self.size_indices()
        first = int(sizes.min())
        members = [np.flatnonzero(sizes == k) for k in range(first, self.num_candidates)]
        remap = np.empty(self.vocabulary_size, np.int64)
        start = 0
        for ids in members:
            remap[ids] = start + np.arange(len(ids))
            start += len(ids)
        value = lambda v: np.asarray(tf.convert_to_tensor(v))  # noqa: E731
        tables = [value(self.tables[k])[ids] for k, ids in zip(range(first, self.num_candidates), members)]
        kernels = [value(self.kernels[k]) for k in range(first, self.num_candidates - 1)]
        biases = [value(self.biases[k]) for k in range(first, self.num_candidates - 1)]
        scale = shift = None
        if self.lift_norm is not None:
            scale, shift = self.normalization_affine()
        return ESAPNCompactEmbedding.from_arrays(tables, kernels, biases, remap, scale=scale, shift=shift,
                                                 name=self.name, combiner=self.combiner,
                                                 validate_ids=self.validate_ids)

    # -------------------------------------------------------------------------------------- size accounting
    def _inference_sizes(self):
        """``(table entries, chain + normalisation parameters)`` of the compact form."""
        sizes = self.size_indices()
        dims = np.asarray(self.candidate_dims, np.int64)
        entries = int(dims[sizes].sum())
        first = int(sizes.min())
        chain = sum(self.candidate_dims[k] * self.candidate_dims[k + 1] + self.candidate_dims[k + 1]
                    for k in range(first, self.num_candidates - 1))
        norm = 2 * self.output_dim if self.lift_norm is not None else 0
        return entries, int(chain + norm)

    def transform_parameter_count(self):
        """Parameters of the export's chain (from the smallest size in use) and frozen normalisation."""
        return self._inference_sizes()[1]

    def parameter_count(self):
        """Parameters of the export: each id's row at its final size, the chain from the smallest size in use to
        ``d_n``, and the frozen normalisation's scale and shift. The other sizes' rows and the state are
        search-time only."""
        entries, maps = self._inference_sizes()
        return entries + maps

    def storage_bytes(self):
        """Those parameters at the variable dtype, plus the int32 id -> row remap."""
        return self.parameter_count() * dtype_bytes(self.variable_dtype or "float32") + 4 * self.vocabulary_size

    def dims_per_id(self):
        return np.asarray(self.candidate_dims, np.int64)[self.size_indices()]

    def sparse_tables(self):
        if not self.built:
            self.build()
        return list(self.tables)

    # ------------------------------------------------------------------------------------------ serialisation
    def get_config(self):
        config = super().get_config()
        config.update({
            "candidate_dims": list(self.candidate_dims),
            "history_length": self.history_length,
            "normalization": self.normalization,
            "popularity": self.popularity,
            "batch_norm_momentum": self.batch_norm_momentum,
            "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
            "transform_initializer": keras.initializers.serialize(self.transform_initializer),
        })
        return config


@register
class ESAPNCompactEmbedding(EmbeddingScheme):
    """ESAPN's inference form: each id stored once at its final size, lifted to ``d_n`` by the frozen chain.

    Stage ``j`` of the chain has dimension ``dims[j]`` (the candidate sizes from the smallest one in use up to
    ``d_n``) and a block of ``rows[j]`` table rows (0 for a size no id ended at). Id ``i`` lives at row
    ``remap[i]`` of the concatenated blocks; an id of stage ``j`` passes the links ``j .. J-1``::

        e_{j+1} = e_j · K_j + c_j,      e(id) = tanh(e_J · scale + shift)   (normalised)   or   e_J

    ``scale`` / ``shift`` are the training layer's batch normalisation with its moving statistics folded in.
    Stock ops only (``Gather``, ``UpperBound``, ``DynamicPartition``, ``MatMul``, ``ConcatV2``,
    ``InvertPermutation``, ``Tanh``); the tables are read through ``gather_rows``, so int8 / float16 export
    applies. The layer is frozen by default (``trainable=False``). Built by ``ESAPNEmbedding.compact()`` or
    ``from_arrays``.

    Args:
        vocabulary_size: int, number of ids (OOV id 0 included).
        output_dim: int, ``dims[-1]``.
        dims: strictly increasing ints, the chain's stage dimensions.
        rows: ints >= 0, rows of each stage's block, summing to ``vocabulary_size``.
        normalized: bool, whether ``tanh(e·scale + shift)`` follows the chain. Default True.
        **kwargs: ``combiner``, ``validate_ids`` and base Layer arguments.

    Example:

    >>> layer = ESAPNCompactEmbedding.from_arrays(
    ...     tables=[np.ones((2, 1), "float32"), np.full((1, 2), 3.0, "float32")],
    ...     kernels=[np.full((1, 2), 0.5, "float32")], biases=[np.zeros(2, "float32")], remap=np.array([2, 0, 1]))
    >>> layer(tf.constant([0, 1, 2])).numpy().tolist()
    [[3.0, 3.0], [0.5, 0.5], [0.5, 0.5]]
    >>> layer.dims_per_id().tolist(), layer.parameter_count()  # 2x1 + 1x2 rows, chain 1x2 + 2
    ([2, 1, 1], 8)
    """

    def __init__(self, vocabulary_size, output_dim, dims, rows, normalized=True, **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(vocabulary_size, output_dim, **kwargs)
        self.dims = list(check_candidate_dims(dims))
        if self.dims[-1] != self.output_dim:
            raise ValueError(f"output_dim must equal dims[-1]={self.dims[-1]}. Received: output_dim={output_dim!r}")
        if not isinstance(rows, (list, tuple)) or len(rows) != len(self.dims):
            raise ValueError(f"rows must list one count per stage ({len(self.dims)}). Received: rows={rows!r}")
        self.rows = [check_positive_int("rows[j]", r, minimum=0) for r in rows]
        if sum(self.rows) != self.vocabulary_size:
            raise ValueError(f"rows must sum to vocabulary_size={self.vocabulary_size}. "
                             f"Received: rows={self.rows} (sum {sum(self.rows)})")
        self.normalized = bool(normalized)
        self.offsets = np.concatenate([[0], np.cumsum(self.rows)]).astype(np.int64).tolist()

    @classmethod
    def from_arrays(cls, tables, kernels, biases, remap, scale=None, shift=None, **kwargs):
        """A built layer holding the given arrays.

        Args:
            tables: one ``[rows_j, dims_j]`` array per stage (0 rows allowed).
            kernels, biases: the chain's links, ``[dims_j, dims_{j+1}]`` and ``[dims_{j+1}]``.
            remap: int array ``[vocabulary_size]``, a permutation: each id's row in the concatenated blocks.
            scale, shift: ``[dims[-1]]`` arrays of the folded normalisation, or None for none.
            **kwargs: other constructor arguments (``name``, ``combiner``, ...).
        """
        tables = [np.asarray(t, np.float32) for t in tables]
        remap = np.asarray(remap, np.int64)
        if sorted(remap.tolist()) != list(range(remap.shape[0])):
            raise ValueError("remap must be a permutation of range(vocabulary_size): every id owns one row")
        if (scale is None) != (shift is None):
            raise ValueError("give scale and shift together, or neither")
        dims = [int(t.shape[1]) for t in tables]
        layer = cls(int(remap.shape[0]), dims[-1], dims, [int(t.shape[0]) for t in tables],
                    normalized=scale is not None, **kwargs)
        layer.build()
        for table, value in zip(layer.tables, [t for t in tables if t.shape[0] > 0]):
            table.assign(value)
        for variable, value in zip(layer.kernels + layer.biases, list(kernels) + list(biases)):
            variable.assign(np.asarray(value, np.float32))
        if scale is not None:
            layer.scale.assign(np.asarray(scale, np.float32))
            layer.shift.assign(np.asarray(shift, np.float32))
        layer.remap.assign(remap.astype(np.int32))
        return layer

    def build(self, input_shape=None):
        self.tables, self.kernels, self.biases = [], [], []
        for j, (rows, dim) in enumerate(zip(self.rows, self.dims)):
            if rows > 0:  # a size no id ended at stores no block
                self.tables.append(self.add_weight(name=f"table_{j}", shape=(rows, dim), initializer="zeros"))
        for j in range(len(self.dims) - 1):
            self.kernels.append(self.add_weight(name=f"kernel_{j}", shape=(self.dims[j], self.dims[j + 1]),
                                                initializer="zeros"))
            self.biases.append(self.add_weight(name=f"bias_{j}", shape=(self.dims[j + 1],), initializer="zeros"))
        if self.normalized:
            self.scale = self.add_weight(name="scale", shape=(self.output_dim,), initializer="ones")
            self.shift = self.add_weight(name="shift", shape=(self.output_dim,), initializer="zeros")
        self.remap = self.add_weight(
            name="remap", shape=(self.vocabulary_size,), dtype="int32", trainable=False,
            initializer=lambda shape, dtype=None: tf.range(self.vocabulary_size, dtype=tf.int32),
        )
        self.built = True

    def _stage_tables(self):
        """Stage index -> its table variable (stages with rows only)."""
        used = [j for j, r in enumerate(self.rows) if r > 0]
        return dict(zip(used, self.tables))

    def lookup(self, ids):
        flat = tf.reshape(ids, [-1])  # [m]
        rows = tf.cast(sparse_gather(self.remap, flat), tf.int64)  # [m], row in the concatenated blocks
        stages = self._stage_tables()
        dtype = self.compute_dtype
        if len(self.dims) == 1:
            out = tf.cast(self.gather_rows(self.tables[0], rows), dtype)
        else:
            starts = tf.constant(self.offsets[1:-1], tf.int64)  # first row of stages 1..J-1
            stage = tf.searchsorted(starts, rows, side="right", out_type=tf.int32)  # [m]
            local = rows - tf.gather(tf.constant(self.offsets[:-1], tf.int64), stage)
            count = len(self.dims)
            parts = tf.dynamic_partition(local, stage, count)
            positions = tf.dynamic_partition(tf.range(tf.size(flat)), stage, count)
            parts = [parts[j] if j in stages else None for j in range(count)]
            positions = [positions[j] if j in stages else None for j in range(count)]
            out = _chain_cascade(parts, positions, lambda j, r: self.gather_rows(stages[j], r), self.kernels,
                                 self.biases, dtype)
        if self.normalized:
            out = tf.tanh(out * tf.cast(self.scale, dtype) + tf.cast(self.shift, dtype))
        return reshape_to_ids(out, ids, self.output_dim)

    # -------------------------------------------------------------------------------------- size accounting
    def parameter_count(self):
        tables = sum(r * d for r, d in zip(self.rows, self.dims))
        chain = sum(self.dims[j] * self.dims[j + 1] + self.dims[j + 1] for j in range(len(self.dims) - 1))
        return tables + chain + (2 * self.output_dim if self.normalized else 0)

    def storage_bytes(self):
        return self.parameter_count() * dtype_bytes(self.variable_dtype or "float32") + 4 * self.vocabulary_size

    def dims_per_id(self):
        if not self.built:
            self.build()
        rows = np.asarray(tf.convert_to_tensor(self.remap)).astype(np.int64)
        stage = np.searchsorted(np.asarray(self.offsets[1:-1]), rows, side="right")
        return np.asarray(self.dims, np.int64)[stage]

    def compact(self):
        """Already the inference form: a frozen copy."""
        value = lambda v: np.asarray(tf.convert_to_tensor(v))  # noqa: E731
        stages = self._stage_tables()
        tables = [value(stages[j]) if j in stages else np.zeros((0, d), np.float32) for j, d in enumerate(self.dims)]
        return ESAPNCompactEmbedding.from_arrays(
            tables, [value(k) for k in self.kernels], [value(b) for b in self.biases], value(self.remap),
            scale=value(self.scale) if self.normalized else None, shift=value(self.shift) if self.normalized else None,
            name=self.name, combiner=self.combiner, validate_ids=self.validate_ids)

    def sparse_tables(self):
        return list(self.tables) if self.trainable else []

    def get_config(self):
        config = super().get_config()
        config.update({"dims": list(self.dims), "rows": list(self.rows), "normalized": self.normalized})
        return config
