"""Row-sparse optimizers for embedding tables: update only the rows a batch looked up.

Keras' stock Adam (and, under Keras 3, Adagrad) updates its slot variables for every row of a table at every
step, so on realistic vocabularies the optimizer, not the network, sets the training speed (docs/ARCHITECTURE.md,
"Where training time goes"). These optimizers take the row-sparse gradients (``tf.IndexedSlices``) of the
tables an ``EmbeddingScheme`` lists in ``sparse_tables()`` and touch only those rows, as TorchRec's fused
optimizers and DLRM's row-wise Adagrad do. They are pure TensorFlow (trackable objects), so they behave the same
under Keras 3 and Keras 2 and checkpoint with ``tf.train.Checkpoint``.

Semantics differ from the dense optimizers in the known way: rows not looked up in a step keep their moments
(lazy Adam, as ``tfa.optimizers.LazyAdam``), and ``SparseAdagrad(rowwise=True)`` keeps one accumulator per row
(the mean of the row's squared gradient), as DLRM/TorchRec's row-wise Adagrad.
"""

import tensorflow as tf


def _dedupe(grad):
    """Sums the rows of an IndexedSlices that share an index: returns (unique_indices, summed_values)."""
    unique, position = tf.unique(grad.indices)
    values = tf.math.unsorted_segment_sum(grad.values, position, tf.shape(unique)[0])
    return unique, values


def _resource_variable(var):
    """The ``tf.Variable`` under a Keras variable. Under a mixed-precision policy, inside a layer's call, Keras
    reads float variables in the compute dtype: Keras 2's ``AutoCastVariable`` reports float16 as its ``dtype``,
    and Keras 3's variable returns a cast tensor (no ``handle``) as its value; a row update needs neither."""
    for attr in ("_value", "_variable"):  # Keras 3 variable (TF backend); Keras 2 AutoCastVariable
        inner = getattr(var, attr, None)
        if isinstance(inner, tf.Variable):
            return inner
    return var


def _scatter(op, var, indices, updates):
    """Row update of a tf.Variable or a Keras variable (which wraps one and has no scatter methods)."""
    var = _resource_variable(var)
    return op(resource=var.handle, indices=indices, updates=tf.cast(updates, var.dtype))


def scatter_sub(var, indices, updates):
    return _scatter(tf.raw_ops.ResourceScatterSub, var, indices, updates)


def scatter_add(var, indices, updates):
    return _scatter(tf.raw_ops.ResourceScatterAdd, var, indices, updates)


def scatter_update(var, indices, updates):
    return _scatter(tf.raw_ops.ResourceScatterUpdate, var, indices, updates)


def replicas_in_sync():
    """Replicas in sync of the current ``tf.distribute`` strategy (1 outside any, or in the default one)."""
    context = tf.distribute.get_replica_context()
    if context is not None:
        return context.num_replicas_in_sync
    return tf.distribute.get_strategy().num_replicas_in_sync


def check_single_replica(optimizer, replicas=None):
    """Raises a ValueError when ``optimizer`` (a SparseOptimizer) would run under a multi-replica strategy.

    Its row updates write each replica's own copy of a table with that replica's share of the gradient (no
    cross-replica sum) and keep one set of slots, so the replicas would silently drift apart."""
    replicas = replicas_in_sync() if replicas is None else int(replicas)
    if optimizer is not None and replicas > 1:
        raise ValueError(
            f"embedding_optimizer={type(optimizer).__name__}(learning_rate={optimizer.learning_rate:g}) (row-sparse "
            f"updates) runs on a single replica only. Received a tf.distribute strategy with {replicas} replicas "
            "in sync: build the model with embedding_optimizer=None under a multi-replica strategy (the compiled "
            "optimizer then updates the embedding tables, with gradients summed across replicas), or train on "
            "one replica (the default strategy or OneDeviceStrategy)."
        )


#: The attribute of a table variable that holds its row constraint: ``fn(indices)`` re-constrains the rows
#: ``indices`` (or the whole table when ``indices`` is None) after an update, as a Keras ``constraint`` would the
#: whole variable (``LowPrecisionEmbedding``'s rounding back to the grid). Keras constraints see the whole table;
#: a row-sparse update re-constrains only the rows it wrote.
ROW_CONSTRAINT = "tfemb_row_constraint"


def _row_constraint(var, update, indices):
    constrain = getattr(var, ROW_CONSTRAINT, None)
    if constrain is None:
        return update
    with tf.control_dependencies([update]):
        return constrain(indices)


class SparseOptimizer(tf.__internal__.tracking.AutoTrackable):
    """Base class: ``apply(grads_and_vars)`` with row-sparse or dense gradients.

    A trackable object, not a ``tf.Module``: a model holding one checkpoints its state (``tf.train.Checkpoint``,
    Keras 2's TF-format weights) as it does a Keras optimizer's, and Keras 2 does not count its slots among the
    model's weights. The slots are checkpointed by the position of their variable among the variables the
    optimizer has seen (``track`` order, which ``RecModel`` sets to its ``sparse_variables()`` order when built),
    because variable names differ between two models of one config; a restore into an optimizer that has not
    made its slots yet is applied when it makes them.
    """

    def __init__(self, learning_rate, name=None):
        super().__init__()
        self.name = name or type(self).__name__
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0. Received: learning_rate={learning_rate!r}")
        self.learning_rate = float(learning_rate)
        # (id(var), kind) -> slot and id(var) -> position: lookups, not checkpoint dependencies.
        object.__setattr__(self, "_slots", {})
        object.__setattr__(self, "_positions", {})
        self.slots = {}  # f"{position}_{kind}" -> slot: the checkpoint dependencies
        self.iterations = None

    def _slot(self, var, kind, shape=None, init=0.0):
        key = (id(var), kind)
        if key not in self._slots:
            position = self._positions.setdefault(id(var), len(self._positions))
            with tf.init_scope():
                shape = var.shape if shape is None else shape
                slot = tf.Variable(
                    tf.fill(shape, tf.constant(init, var.dtype)), trainable=False,
                    name=f"{var.name.split(':')[0].replace('/', '_')}_{kind}",
                )
            self._slots[key] = slot
            self.slots[f"{position}_{kind}"] = slot
        return self._slots[key]

    @property
    def variables(self):
        """The iteration counter (once built) and every slot, in creation order."""
        return ([] if self.iterations is None else [self.iterations]) + list(self._slots.values())

    def track(self, variables):
        """Fixes the positions by which the slots of ``variables`` are checkpointed (in this order), without making
        the slots: they are made on first use (``build`` / ``apply``), and a checkpoint restored before that is
        applied to them then."""
        for var in variables:
            self._positions.setdefault(id(var), len(self._positions))

    def build(self, variables):
        """Creates the slot variables eagerly (also done lazily on first use)."""
        with tf.init_scope():
            if self.iterations is None:
                self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="iterations")
            for var in variables:
                self._create_slots(var)

    def _create_slots(self, var):
        pass

    def apply(self, grads_and_vars):
        check_single_replica(self)
        grads_and_vars = [(g, v) for g, v in grads_and_vars if g is not None]
        self.build([v for _, v in grads_and_vars])
        step = self.iterations.assign_add(1)
        ops = []
        for grad, var in grads_and_vars:
            if isinstance(grad, tf.IndexedSlices):
                indices, values = _dedupe(grad)
                update = self._sparse_update(var, indices, tf.cast(values, var.dtype), step)
            else:
                indices = None
                update = self._dense_update(var, tf.cast(grad, var.dtype), step)
            ops.append(_row_constraint(var, update, indices))
        return tf.group(ops)

    def _sparse_update(self, var, indices, values, step):
        raise NotImplementedError

    def _dense_update(self, var, grad, step):
        raise NotImplementedError

    def get_config(self):
        return {"class_name": type(self).__name__, "learning_rate": self.learning_rate}


class SparseSGD(SparseOptimizer):
    """Plain SGD on the looked-up rows: ``E[i] -= lr * g_i``."""

    def __init__(self, learning_rate=0.01, name=None):
        super().__init__(learning_rate, name=name)

    def _sparse_update(self, var, indices, values, step):
        return scatter_sub(var, indices, self.learning_rate * values)

    def _dense_update(self, var, grad, step):
        return var.assign_sub(self.learning_rate * grad)


class SparseAdagrad(SparseOptimizer):
    """Adagrad on the looked-up rows; ``rowwise=True`` keeps one accumulator per row (DLRM / TorchRec).

    Element-wise: ``a += g²; E -= lr·g/(√a + ε)``. Row-wise: ``a_i += mean_j g_ij²`` (one float per row).
    """

    def __init__(self, learning_rate=0.05, initial_accumulator_value=0.1, epsilon=1e-7, rowwise=False, name=None):
        super().__init__(learning_rate, name=name)
        self.initial_accumulator_value = float(initial_accumulator_value)
        self.epsilon = float(epsilon)
        self.rowwise = bool(rowwise)

    def _accumulator(self, var):
        shape = var.shape[:1] if self.rowwise and var.shape.rank == 2 else var.shape
        return self._slot(var, "accumulator", shape, self.initial_accumulator_value)

    def _create_slots(self, var):
        self._accumulator(var)

    def _rowwise(self, var):
        return self.rowwise and var.shape.rank == 2

    def _sparse_update(self, var, indices, values, step):
        acc = self._accumulator(var)
        sq = tf.reduce_mean(tf.square(values), axis=1) if self._rowwise(var) else tf.square(values)
        scatter_add(acc, indices, sq)
        a = tf.gather(acc, indices)
        if self._rowwise(var):
            a = a[:, tf.newaxis]
        return scatter_sub(var, indices, self.learning_rate * values / (tf.sqrt(a) + self.epsilon))

    def _dense_update(self, var, grad, step):
        acc = self._accumulator(var)
        sq = tf.reduce_mean(tf.square(grad), axis=1) if self._rowwise(var) else tf.square(grad)
        a = acc.assign_add(sq)
        if self._rowwise(var):
            a = a[:, tf.newaxis]
        return var.assign_sub(self.learning_rate * grad / (tf.sqrt(a) + self.epsilon))

    def get_config(self):
        return {**super().get_config(), "initial_accumulator_value": self.initial_accumulator_value,
                "epsilon": self.epsilon, "rowwise": self.rowwise}


class SparseAdam(SparseOptimizer):
    """Lazy Adam: moments and parameters of the looked-up rows only (as ``tfa.optimizers.LazyAdam``).

    For each looked-up row: ``m = β1·m + (1-β1)·g``, ``v = β2·v + (1-β2)·g²``,
    ``E -= lr·√(1-β2^t)/(1-β1^t) · m/(√v + ε)`` with ``t`` the global step.
    """

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, name=None):
        super().__init__(learning_rate, name=name)
        self.beta_1, self.beta_2, self.epsilon = float(beta_1), float(beta_2), float(epsilon)

    def _create_slots(self, var):
        self._slot(var, "m")
        self._slot(var, "v")

    def _lr(self, var, step):
        t = tf.cast(step, var.dtype)
        return self.learning_rate * tf.sqrt(1.0 - tf.pow(self.beta_2, t)) / (1.0 - tf.pow(self.beta_1, t))

    def _sparse_update(self, var, indices, values, step):
        m, v = self._slot(var, "m"), self._slot(var, "v")
        m_rows = self.beta_1 * tf.gather(m, indices) + (1.0 - self.beta_1) * values
        v_rows = self.beta_2 * tf.gather(v, indices) + (1.0 - self.beta_2) * tf.square(values)
        ops = [scatter_update(m, indices, m_rows), scatter_update(v, indices, v_rows)]
        with tf.control_dependencies(ops):
            delta = self._lr(var, step) * m_rows / (tf.sqrt(v_rows) + self.epsilon)
            return scatter_sub(var, indices, delta)

    def _dense_update(self, var, grad, step):
        m, v = self._slot(var, "m"), self._slot(var, "v")
        m_new = m.assign(self.beta_1 * m + (1.0 - self.beta_1) * grad)
        v_new = v.assign(self.beta_2 * v + (1.0 - self.beta_2) * tf.square(grad))
        return var.assign_sub(self._lr(var, step) * m_new / (tf.sqrt(v_new) + self.epsilon))

    def get_config(self):
        return {**super().get_config(), "beta_1": self.beta_1, "beta_2": self.beta_2, "epsilon": self.epsilon}


SPARSE_OPTIMIZERS = {"sgd": SparseSGD, "adagrad": SparseAdagrad, "rowwise_adagrad": SparseAdagrad, "adam": SparseAdam,
                     "lazy_adam": SparseAdam}


def get(identifier, learning_rate=None):
    """A SparseOptimizer from an instance, a name (``"sgd"``, ``"adagrad"``, ``"rowwise_adagrad"``,
    ``"adam"``/``"lazy_adam"``) or a config dict; None stays None."""
    if identifier is None or isinstance(identifier, SparseOptimizer):
        return identifier
    if isinstance(identifier, dict):
        config = dict(identifier)
        cls = {c.__name__: c for c in (SparseSGD, SparseAdagrad, SparseAdam)}[config.pop("class_name")]
        return cls(**config)
    if identifier not in SPARSE_OPTIMIZERS:
        raise ValueError(
            f"embedding_optimizer must be one of {sorted(SPARSE_OPTIMIZERS)} or a SparseOptimizer. "
            f"Received: {identifier!r}"
        )
    kwargs = {} if learning_rate is None else {"learning_rate": learning_rate}
    if identifier == "rowwise_adagrad":
        kwargs["rowwise"] = True
    return SPARSE_OPTIMIZERS[identifier](**kwargs)
