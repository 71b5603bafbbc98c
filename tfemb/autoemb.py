"""AutoEmb's training procedure: the bilevel DARTS search (AutoEmb, DARTS), the joint one (SAM), streaming.

The layer, ``tfemb.layers.AutoEmbEmbedding``, holds the candidate tables, the transforms and the architecture
parameters θ (a controller network, or DARTS logits). This module trains a model that uses it:

- ``AutoEmbSearch(model, validation_stream, mode)``: a Keras model wrapping any ``RecModel``; ``fit`` runs
  the paper's alternating optimisation (Zhao et al., arXiv 2002.11252, Algorithm 1, first-order DARTS)::

      per training batch:  θ-step: θ ← θ - η_θ ∇_θ L_val(W, θ)    on the next validation batch (W fixed)
                           W-step: W ← W - η_W ∇_W L_train(W, θ)  on the training batch (θ fixed)

  (``mode="bilevel"``, AutoEmb and DARTS), or one step on the training loss for W and θ together
  (``mode="joint"``, the paper's SAM baseline). Validation batches come from a second dataset, or
  ``"previous_batch"``: the training batch before the current one (the stream's most recent data, as the
  authors' group's code, github.com/zgahhblhc/ESAPN ``Val_Type="last_batch"``). The W-step writes each id's
  loss into the layers' context (``AutoEmbEmbedding.record_losses``); the θ-step freezes the stream state.
- ``stream_fit(model, x, y, batch_size)``: the streaming protocol: time-ordered batches, each one first
  predicted (the forward pass of its W-step, before the update), then trained on; one pass; per-batch metrics,
  a test-period summary and the training speed. Works for any compiled tfemb model (a fixed-size baseline goes
  through the same step, without θ).
- ``hard_soft_difference``, ``set_inference_selection``: compare and switch the hard and soft exports.
- ``fit_experiment``: what ``tfemb.experiment.run`` calls for configs with an ``autoemb`` section.
"""

import contextlib
import time
import warnings

import numpy as np
import tensorflow as tf

from tfemb._keras import IS_KERAS_3, dataset_fit_kwargs, keras
from tfemb.layers.autoemb_embedding import INFERENCE_SELECTIONS, AutoEmbEmbedding
from tfemb.layers.embedding_scheme import multi_replica
from tfemb.models.rec_model import WeightedLossMixin

#: ``"bilevel"``: θ on validation batches, W on training batches, alternating (AutoEmb, DARTS);
#: ``"joint"``: W and θ together on the training loss (SAM).
MODES = ("bilevel", "joint")

#: ``validation_stream`` value: the previous training batch is the θ-step's validation batch.
PREVIOUS_BATCH = "previous_batch"

#: Weights-file keys (``AutoEmbSearch.save_own_variables``) of the lazy θ twin's variables.
THETA_TWIN_KEY = "theta_sparse_optimizer_"


# ----------------------------------------------------------------------------------------------- helpers
def _unwrap(model):
    """The ``RecModel`` of a search wrapper (``AutoEmbSearch``, ``tfemb.esapn.ESAPNSearch``), or ``model``."""
    return getattr(model, "rec_model", model)


def scheme_layers(model, cls):
    """``{feature: layer}`` of the embedding layers of class ``cls`` of a ``RecModel`` (or of the model a search
    wrapper holds), in the model's feature order."""
    model = _unwrap(model)
    layers = getattr(model, "embedding_layers", None)
    if layers is None:
        raise TypeError(f"expected a tfemb RecModel (embedding_layers by feature). Received: {type(model).__name__}")
    return {name: layers[name] for name in model.embedding_names if isinstance(layers[name], cls)}


def autoemb_layers(model):
    """``{feature: AutoEmbEmbedding}`` of a ``RecModel`` (or of the model an ``AutoEmbSearch`` wraps)."""
    return scheme_layers(model, AutoEmbEmbedding)


def architecture_variables(model):
    """θ: the controllers' (or DARTS logits') trainable variables of every AutoEmb layer of ``model``."""
    out = []
    for layer in autoemb_layers(model).values():
        out.extend(layer.architecture_variables())
    return out


def architecture_tables(model):
    """The θ variables of ``model``'s AutoEmb layers that are read by row (``AutoEmbEmbedding.architecture_tables``:
    controllers' popularity kernels, per-id DARTS logits)."""
    out = []
    for layer in autoemb_layers(model).values():
        out.extend(layer.architecture_tables())
    return out


def lazy_adam_twin(optimizer):
    """A ``tfemb.optimizers.SparseAdam`` with ``optimizer``'s hyperparameters when ``optimizer`` is a plain Keras
    Adam (constant learning rate; no AMSGrad, weight decay, clipping or EMA), else None."""
    from tfemb.optimizers import SparseAdam

    if not isinstance(optimizer, keras.optimizers.Adam) or getattr(optimizer, "amsgrad", False):
        return None
    if any(getattr(optimizer, name, None) for name in ("weight_decay", "clipnorm", "clipvalue", "global_clipnorm",
                                                       "use_ema")):
        return None
    rate = getattr(optimizer, "_learning_rate", None)
    if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule) or callable(rate):
        return None
    return SparseAdam(learning_rate=float(np.asarray(tf.convert_to_tensor(optimizer.learning_rate))),
                      beta_1=float(np.asarray(optimizer.beta_1)), beta_2=float(np.asarray(optimizer.beta_2)),
                      epsilon=float(np.asarray(optimizer.epsilon)))


def model_variables(model):
    """W: every trainable variable of ``model`` that is not in θ."""
    theta = {id(v) for v in architecture_variables(model)}
    return [v for v in _unwrap(model).trainable_variables if id(v) not in theta]


@contextlib.contextmanager
def frozen_stream_state(model):
    """Within the block, training calls of ``model``'s AutoEmb layers leave counts and previous weights alone."""
    layers = list(autoemb_layers(model).values())
    before = [layer.state_frozen for layer in layers]
    for layer in layers:
        object.__setattr__(layer, "state_frozen", True)
    try:
        yield
    finally:
        for layer, state in zip(layers, before):
            object.__setattr__(layer, "state_frozen", state)


def set_inference_selection(model, selection):
    """Sets ``inference_selection`` (``"hard"`` / ``"soft"``) of every AutoEmb layer of ``model``; the model's
    traced predict / evaluate functions are dropped so the next call uses it."""
    if selection not in INFERENCE_SELECTIONS:
        raise ValueError(f"selection must be one of {INFERENCE_SELECTIONS}. Received: selection={selection!r}")
    for layer in autoemb_layers(model).values():
        layer.inference_selection = selection
    _drop_inference_functions(model)


def _drop_inference_functions(model):
    """Drops the traced predict / evaluate functions, which captured the layers' ``inference_selection``."""
    for m in {id(model): model, id(_unwrap(model)): _unwrap(model)}.values():
        for attr in ("predict_function", "test_function"):
            if hasattr(m, attr):
                setattr(m, attr, None)


def _tf_variable(variable):
    """The ``tf.Variable`` behind a Keras 3 variable (Keras 2 variables are ``tf.Variable`` already)."""
    inner = getattr(variable, "value", None)
    return inner if isinstance(inner, tf.Variable) else variable


def _loss_function(loss):
    if isinstance(loss, keras.losses.Loss):
        return loss.call
    if isinstance(loss, str):
        return keras.losses.get(loss)
    if callable(loss):
        return loss
    raise ValueError(f"the compiled loss must be one Keras loss (object, name or function). Received: {loss!r}")


def per_example_loss(loss, y_true, y_pred):
    """Unreduced per-example values ``[batch]`` of a compiled Keras loss (object, name or function).

    Rank-1 predictions (binary / regression heads) are given a trailing axis first, because Keras losses
    average over the last axis.
    """
    fn = _loss_function(loss)
    y_pred = tf.convert_to_tensor(y_pred)
    y_true = tf.convert_to_tensor(y_true)
    if y_pred.shape.rank == 1:
        y_pred = y_pred[:, tf.newaxis]
        y_true = tf.reshape(y_true, [-1, 1])
    if y_true.dtype != y_pred.dtype and not (y_pred.shape.rank == 2 and y_true.shape.rank == 1):
        y_true = tf.cast(y_true, y_pred.dtype)
    values = fn(y_true, y_pred)
    return tf.reshape(values, [-1])


def refuse_wrapper_save(search, filepath):
    """``search.save`` of a search wrapper (``AutoEmbSearch``, ``ESAPNSearch``): the ``.keras`` file could not be
    reloaded (the wrapper is a training procedure around ``rec_model``), so say what to save instead."""
    raise NotImplementedError(
        f"{type(search).__name__} is the search's training procedure, not a model to reload: save the searched "
        f"model instead, search.rec_model.save({str(filepath)!r}) (its selected sizes and stream state included), "
        "or export it with tfemb.export.export_saved_model(search.rec_model, ...)")


def build_optimizers_to_load(search):
    """Builds the optimizers of a compiled search wrapper (``AutoEmbSearch``, ``ESAPNSearch``) before its
    ``load_weights``: Keras 3 (and Keras 2's ``.h5``) load an optimizer's saved state only into a built optimizer of
    as many variables, and skip it with a warning otherwise, so a resumed search restarted its optimizers' moments
    and step counts. An uncompiled wrapper loads the weights alone."""
    if getattr(search, "optimizer", None) is not None:
        search._build_optimizers()


def _iter_validation(stream):
    """``(xv, yv, has_validation)`` elements of a validation dataset (``(x, y)`` or ``(x, y, w)`` batches)."""
    if not isinstance(stream, tf.data.Dataset):
        raise TypeError(
            f"validation_stream must be a tf.data.Dataset of (x, y) batches or {PREVIOUS_BATCH!r}. "
            f"Received: {type(stream).__name__}"
        )
    spec = stream.element_spec
    labels = spec[1] if isinstance(spec, tuple) and len(spec) >= 2 else None
    if labels is None or not isinstance(labels, tf.TensorSpec) or labels.shape.rank == 0:
        raise ValueError(
            "validation_stream must give batches (x, y) or (x, y, w): call .batch(...) on it (e.g. "
            "tfemb.data.make_dataset(x, y, batch_size=...)). Received elements with spec "
            f"{spec if labels is None else labels}")
    return stream.map(lambda *batch: (batch[0], batch[1], tf.constant(True)))


def previous_batch_stream(dataset, repeat=True):
    """The validation stream of ``"previous_batch"``: element ``t`` is training batch ``t - 1`` (batch 0 for
    ``t = 0``, flagged so that its θ-step is skipped: a batch's labels must not reach θ before it is predicted).

    ``dataset`` must give the same batches in the same order each time it is iterated (a time-ordered stream,
    not a reshuffling one: then the "previous" batch is a random training batch). With ``repeat`` the stream
    restarts in step with every epoch of ``dataset`` (its cardinality must be finite).
    """
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(f"validation_stream={PREVIOUS_BATCH!r} needs a tf.data.Dataset to fit on. "
                        f"Received: {type(dataset).__name__}")
    pairs = dataset.map(lambda *batch: (batch[0], batch[1]))
    first = pairs.take(1).map(lambda x, y: (x, y, tf.constant(False)))
    stream = first.concatenate(pairs.map(lambda x, y: (x, y, tf.constant(True))))
    if not repeat:
        return stream
    steps = int(dataset.cardinality())
    if steps == tf.data.INFINITE_CARDINALITY:
        return stream
    if steps < 0:  # unknown: count once
        steps = int(dataset.reduce(np.int64(0), lambda count, _: count + 1))
    if steps == 0:
        raise ValueError("the training dataset is empty: no batch to stream")
    return stream.take(steps).repeat()


def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}. Received: mode={mode!r}")
    return mode


def batch_polymorphic_function(step, args):
    """``tf.function(step)`` traced once for any batch size: its input signature is ``args``' structure with the
    first (batch) dimension of every tensor left open. A stream's last batch is usually partial; a function traced
    on full batches would trace the whole step again for it (seconds for a bilevel or policy step, more than the
    rest of a MovieLens stream's steps together)."""
    def relaxed(value):
        value = tf.convert_to_tensor(value)
        return tf.TensorSpec([None] + value.shape.as_list()[1:], value.dtype)

    return tf.function(step, input_signature=tf.nest.map_structure(relaxed, list(args)))


def cached_stream_step(search, key, step, args):
    """``search``'s stream step for ``key`` (whether the θ / policy step runs), traced once by
    ``batch_polymorphic_function(step(key), args)`` and kept in ``search._stream_functions``, then called on
    ``args``. ``step(key)`` returns the step function; the search's optimizers are built before the first trace."""
    fn = search._stream_functions.get(key)
    if fn is None:
        search._build_optimizers()
        fn = batch_polymorphic_function(step(key), args)
        search._stream_functions[key] = fn
    return fn(*args)


# ---------------------------------------------------------------------------------------------- the search
class AutoEmbSearch(WeightedLossMixin, keras.Model):
    """Trains a ``RecModel`` whose embeddings include ``AutoEmbEmbedding`` layers: ``fit`` alternates θ and W.

    ``train_step`` (Keras ``fit``): in ``"bilevel"`` mode, a θ-step on the next validation batch (gradient of the
    validation loss w.r.t. θ only, W held; first-order DARTS, ``W*(θ) ≈ W``; the layers' stream state is frozen),
    then a W-step on the training batch (gradient w.r.t. W only; θ held; counts, previous weights and per-id
    losses updated). In ``"joint"`` mode (SAM) one step on the training loss updates W and θ. A model without
    AutoEmb layers (a fixed-size baseline) trains with the plain W-step, so it can share ``stream_fit``.

    Sample weights (``(x, y, w)`` batches) weight the W-step's loss and the metrics, as in Keras. The θ-step's
    validation loss and the layers' stream state are unweighted: a validation batch's weights are not read, and
    every row of a training batch counts as one interaction of its ids (``counts``) and leaves its own loss as
    their loss context (``previous_loss``), whatever its weight (the papers' streams have no weights).

    Metrics and losses are the compiled ones; the wrapped model's row-sparse ``embedding_optimizer`` (when set)
    updates the candidate tables as it updates any scheme's. Save and export the wrapped model
    (``search.rec_model``): the wrapper only carries the procedure. To pause and resume a search, checkpoint the
    wrapper (``tf.train.Checkpoint(search=...)``, ``save_weights`` / ``load_weights``) and restore it into a compiled
    wrapper of the same arguments: it holds the model, its stream state and every optimizer's state
    (docs/methods.md, "Checkpointing and resuming a search").

    Args:
        model: a tfemb ``RecModel``.
        validation_stream: ``"previous_batch"`` (default; needs ``fit`` on a ``tf.data.Dataset``) or a
            ``tf.data.Dataset`` of ``(x, y)`` batches, read one batch per θ-step from its start at every ``fit``
            (``.repeat()`` it for several epochs: a stream that runs out stops ``fit`` with an error naming it).
            Unused in ``"joint"`` mode and when the model has no θ.
        mode: ``"bilevel"`` (default) or ``"joint"``.
        sparse_theta_updates: bool, default True: the θ tables read by row (each controller's popularity kernel,
            ``num_buckets x hidden_units``, whose one-hot input is a row gather; per-id DARTS logits) are updated
            by lazy Adam (``tfemb.optimizers.SparseAdam`` with the θ optimizer's hyperparameters): only the rows of
            the popularity buckets / ids in the batch move. The paper's dense Adam also moves the other rows by
            their momentum, at the cost of a full Adam update of a 1001 x 512 kernel per side and step (about a
            fifth of a bilevel step on MovieLens). False (or a θ optimizer that is not a plain Adam, or a
            multi-replica strategy) updates every θ variable with the θ optimizer.

    ``compile(optimizer, controller_optimizer=None, loss=None, metrics=None, ...)``: ``optimizer`` updates W;
    ``controller_optimizer`` θ (default: Adam at 1e-4 in bilevel mode, the authors' ``LR_darts``; in joint mode
    the W optimizer updates θ too, in the same call, as the authors' SAM); loss and metrics default to the
    task's (``tfemb.tasks``).

    Example::

        model = CFNetwork(schema, embeddings=scheme_factory("autoemb", output_dim=128, candidate_dims=(2, 16, 128)),
                          embedding_dim=128)
        search = AutoEmbSearch(model, validation_stream="previous_batch")
        search.compile(optimizer=keras.optimizers.Adam(1e-3), controller_optimizer=keras.optimizers.Adam(1e-4))
        search.fit(train_ds, epochs=1)            # time-ordered, unshuffled batches
        export_saved_model(model, "exports/autoemb")   # hard selection
    """

    def __init__(self, model, validation_stream=PREVIOUS_BATCH, mode="bilevel", sparse_theta_updates=True,
                 **kwargs):
        super().__init__(**kwargs)
        from tfemb.models.rec_model import RecModel

        if not isinstance(model, RecModel):
            raise TypeError(f"model must be a tfemb RecModel. Received: {type(model).__name__}")
        self.rec_model = model
        self.mode = _check_mode(mode)
        if not (isinstance(validation_stream, tf.data.Dataset) or validation_stream == PREVIOUS_BATCH):
            raise TypeError(
                f"validation_stream must be a tf.data.Dataset of (x, y) batches or {PREVIOUS_BATCH!r}. "
                f"Received: {type(validation_stream).__name__}"
            )
        self.validation_stream = validation_stream
        if not isinstance(sparse_theta_updates, bool):
            raise TypeError(f"sparse_theta_updates must be a bool. Received: {sparse_theta_updates!r}")
        self.sparse_theta_updates = sparse_theta_updates
        self.controller_optimizer = None
        object.__setattr__(self, "_theta_sparse_optimizer", None)
        if not model.built:
            model.build()
        # Plain attributes (not tracked): the partition of the variables and the validation iterator.
        object.__setattr__(self, "_theta", architecture_variables(model))
        object.__setattr__(self, "_validation_iterator", None)
        object.__setattr__(self, "_stream_functions", {})
        self.built = True

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        children = super()._trackable_children(save_type, **kwargs)
        # The lazy-Adam twin of θ's optimizer (``sparse_theta_updates``) is a plain attribute, so that Keras does not
        # count it among the wrapper's layers; its slots (the controllers' popularity kernels', the DARTS logits')
        # are checkpointed as a child, as the other optimizers' are: without them a resumed search moved θ, hence
        # every embedding, differently from the uninterrupted one.
        if save_type == "checkpoint" and self._theta_sparse_optimizer is not None:
            children.setdefault("theta_sparse_optimizer", self._theta_sparse_optimizer)
        return children

    @property
    def uses_validation(self):
        """Whether a step reads a validation batch: bilevel mode and a model with θ."""
        return self.mode == "bilevel" and bool(self._theta)

    def call(self, inputs, training=None):
        return self.rec_model(inputs, training=training)

    def build(self, input_shape=None):
        if not self.rec_model.built:
            self.rec_model.build()
        self.built = True

    def compile(self, optimizer="adam", controller_optimizer=None, loss=None, metrics=None, **kwargs):
        from tfemb.tasks import task_loss, task_metrics

        task = self.rec_model.task
        super().compile(optimizer=optimizer, loss=task_loss(task) if loss is None else loss,
                        metrics=task_metrics(task) if metrics is None else metrics, **kwargs)
        if controller_optimizer is None and self.mode == "bilevel":
            controller_optimizer = keras.optimizers.Adam(learning_rate=1e-4)
        elif isinstance(controller_optimizer, str):
            controller_optimizer = keras.optimizers.get(controller_optimizer)
        self.controller_optimizer = controller_optimizer
        # The row-sparse twin of θ's optimizer for the θ tables (``sparse_theta_updates``).
        lazy = None
        if self.sparse_theta_updates and architecture_tables(self.rec_model):
            lazy = lazy_adam_twin(controller_optimizer if controller_optimizer is not None else self.optimizer)
        object.__setattr__(self, "_theta_sparse_optimizer", lazy)
        self._stream_functions.clear()

    def _sparse_theta_ids(self):
        """``id``s of the θ tables updated row-sparsely in this step (empty when off, or under a multi-replica
        strategy)."""
        if self._theta_sparse_optimizer is None or multi_replica():
            return set()
        return {id(v) for v in architecture_tables(self.rec_model)}

    def _apply_theta(self, pairs, optimizer):
        """Applies θ's ``(gradient, variable)`` pairs: its row-read tables through the lazy twin (when on), the rest
        through ``optimizer``."""
        sparse = self._sparse_theta_ids()
        rows = [(g, v) for g, v in pairs if id(v) in sparse]
        rest = [(g, v) for g, v in pairs if id(v) not in sparse]
        if rows:
            self._theta_sparse_optimizer.apply(rows)
        if rest:
            optimizer.apply_gradients(rest)

    def _w_variables(self):
        if self.mode == "joint":
            return list(self.rec_model.trainable_variables)
        return model_variables(self.rec_model)

    def _build_optimizers(self):
        """Creates the optimizers' slots eagerly (never inside a traced step or a ``tf.cond`` branch)."""
        # Keras 3 models have no ``optimizer`` attribute before compile() (Keras 2: None).
        if getattr(self, "optimizer", None) is None:
            raise RuntimeError("compile() the AutoEmbSearch before training it")
        # Slots of variables created under a tf.distribute strategy must be created in its scope too.
        strategy = getattr(self, "distribute_strategy", None) or tf.distribute.get_strategy()
        with tf.init_scope(), strategy.scope():
            variables = self.rec_model.trainable_variables
            if self.mode == "bilevel" or self.controller_optimizer is not None:
                variables = model_variables(self.rec_model)
            if not getattr(self.optimizer, "built", False) or not IS_KERAS_3:
                self.optimizer.build(variables)
            if self._theta and self.controller_optimizer is not None and (
                    not getattr(self.controller_optimizer, "built", False) or not IS_KERAS_3):
                self.controller_optimizer.build(self._theta)
            if self._theta_sparse_optimizer is not None:
                self._theta_sparse_optimizer.build(architecture_tables(self.rec_model))

    # ----------------------------------------------------------------------------------------------- steps
    def _theta_step(self, x, y):
        """One first-order DARTS step of θ on a validation batch; returns the validation loss."""
        theta = self._theta
        watched = [_tf_variable(v) for v in theta]  # Keras 3 variables wrap the tf.Variable the tape sees
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(watched)
            with frozen_stream_state(self.rec_model):
                y_pred = self.rec_model(x, training=True)
            loss = tf.reduce_mean(per_example_loss(self.loss, y, y_pred))
        grads = tape.gradient(loss, watched)
        self._apply_theta([(g, v) for g, v in zip(grads, theta) if g is not None], self.controller_optimizer)
        return loss

    def _w_step(self, x, y, sample_weight=None):
        """One step of W (and θ in joint mode) on a training batch; ``(y_pred, loss, per-example losses)``.

        ``y_pred`` is computed before the update: in a stream, the batch's test prediction."""
        variables = self._w_variables()
        with tf.GradientTape() as tape:
            y_pred = self.rec_model(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
        grads = tape.gradient(loss, variables)
        theta_ids = {id(v) for v in self._theta} if self.controller_optimizer is not None else set()
        pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
        if self.mode == "joint" and self.controller_optimizer is None:  # SAM: θ with W's optimizer, its tables lazily
            theta_ids = self._sparse_theta_ids()
        theta_pairs = [(g, v) for g, v in pairs if id(v) in theta_ids]
        self.rec_model.apply_split_gradients([(g, v) for g, v in pairs if id(v) not in theta_ids], self.optimizer)
        if theta_pairs:
            self._apply_theta(theta_pairs, self.controller_optimizer)
        per_example = tf.stop_gradient(per_example_loss(self.loss, y, y_pred))
        for name, layer in autoemb_layers(self.rec_model).items():
            layer.record_losses(x[name], per_example)
        return y_pred, loss, per_example

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if self.uses_validation:
            iterator = self._validation_iterator
            if iterator is None:
                raise RuntimeError("AutoEmbSearch.train_step runs inside fit(), which opens the validation stream")
            element = iterator.get_next_as_optional()
            check = tf.debugging.assert_equal(
                element.has_value(), True,
                message="AutoEmbSearch: the validation stream ran out of batches (one is read per training step); "
                        "give a longer stream, or .repeat() it",
            )
            with tf.control_dependencies([check]):
                x_val, y_val, has_validation = element.get_value()
            tf.cond(has_validation, lambda: self._theta_step(x_val, y_val), lambda: tf.constant(0.0))
        y_pred, loss, _ = self._w_step(x, y, sample_weight)
        self.track_loss(loss, x)
        return self.compute_metrics(x, y, y_pred, sample_weight)

    def fit(self, x=None, y=None, **kwargs):
        """Keras ``fit``; opens the validation stream first (``"previous_batch"`` needs ``x`` a dataset)."""
        replicas = self.distribute_strategy.num_replicas_in_sync
        if replicas > 1 and autoemb_layers(self.rec_model):
            raise NotImplementedError(
                f"AutoEmbSearch does not train AutoEmb layers under a multi-replica tf.distribute strategy yet "
                f"(received {replicas} replicas): each replica would write only its own share of the batch into "
                "the per-id stream state (counts, last weights, last losses), and the bilevel θ-step reads one "
                "validation stream inside a tf.cond (a synchronisation point in control flow). Train with one "
                "replica (the default strategy or OneDeviceStrategy); tfemb.esapn.ESAPNSearch gathers its state "
                "across replicas."
            )
        self.rec_model.check_embedding_optimizer_replicas(self.distribute_strategy)
        self._build_optimizers()
        if IS_KERAS_3 and isinstance(x, tf.data.Dataset) and replicas > 1:
            self.build_compiled_under_strategy(x)
        if self.uses_validation:
            if self.validation_stream == PREVIOUS_BATCH:
                stream = previous_batch_stream(x)
            else:
                stream = _iter_validation(self.validation_stream)
            object.__setattr__(self, "_validation_iterator", iter(stream))
        self.train_function = None  # the traced step captures the iterator: trace again for the new one
        return super().fit(x, y, **dataset_fit_kwargs(x, kwargs))

    # ------------------------------------------------------------------------------------------- streaming
    def stream_step(self, x, y, x_val=None, y_val=None):
        """One test-then-train step of the stream (used by ``stream_fit``): the θ-step on ``(x_val, y_val)``
        when given (bilevel mode), then the W-step; returns ``(y_pred, per-example losses)`` as tensors."""
        key = x_val is not None and self.uses_validation
        if not key:
            x_val, y_val = x, y  # unused placeholders with the same structure

        def step(with_theta):
            def fn(x, y, x_val, y_val):
                if with_theta:
                    self._theta_step(x_val, y_val)
                y_pred, _, per_example = self._w_step(x, y)
                return y_pred, per_example
            return fn

        return cached_stream_step(self, key, step, (x, y, x_val, y_val))

    def stream_batch(self, t, x, y, previous=None):
        """Batch ``t`` of a stream as ``stream_fit`` steps it: ``stream_step(x, y, *previous)`` (the θ-step on the
        previous batch ``(x, y)``, then the W-step) when ``previous`` is given, else the W-step alone."""
        del t  # every batch after the first has its θ-step
        return self.stream_step(x, y, *previous) if previous is not None else self.stream_step(x, y)

    def load_weights(self, filepath, *args, **kwargs):
        """Keras ``load_weights``; a compiled wrapper's optimizers are built first, so that the optimizer state of
        the file (``.weights.h5``: Keras skips the state of an optimizer not built yet, with a warning) is loaded."""
        build_optimizers_to_load(self)
        return super().load_weights(filepath, *args, **kwargs)

    def save_own_variables(self, store):
        """Keras' weights-file hook (``.weights.h5``): also writes the lazy θ twin's step count and slots, as
        ``theta_sparse_optimizer_<i>`` (a ``tf.train.Checkpoint`` holds them as the child ``theta_sparse_optimizer``)."""
        super().save_own_variables(store)
        if self._theta_sparse_optimizer is not None:
            for i, variable in enumerate(self._theta_sparse_optimizer.variables):
                store[f"{THETA_TWIN_KEY}{i}"] = variable.numpy()

    def load_own_variables(self, store):
        twin_keys = sorted((k for k in store.keys() if k.startswith(THETA_TWIN_KEY)),
                           key=lambda k: int(k[len(THETA_TWIN_KEY):]))
        super().load_own_variables({k: store[k] for k in store.keys() if k not in twin_keys} if twin_keys else store)
        if not twin_keys:
            return
        twin = self._theta_sparse_optimizer
        variables = [] if twin is None else twin.variables
        if len(variables) != len(twin_keys):
            warnings.warn(
                f"{self.name}: the weights file holds the state of a lazy-Adam θ optimizer ({len(twin_keys)} variables) "
                f"that this wrapper does not have ({len(variables)} variables: sparse_theta_updates="
                f"{self.sparse_theta_updates}, compiled with a plain Adam θ optimizer: "
                f"{twin is not None}); it is skipped", stacklevel=2)
            return
        for key, variable in zip(twin_keys, variables):
            variable.assign(store[key])

    def get_config(self):
        return {"name": self.name, "mode": self.mode, "sparse_theta_updates": self.sparse_theta_updates,
                "model": keras.utils.serialize_keras_object(self.rec_model)}

    def save(self, filepath, *args, **kwargs):
        refuse_wrapper_save(self, filepath)


# ------------------------------------------------------------------------------------------------ stream
def _batch_metrics(task, y, p):
    """Per-batch quality of predictions ``p`` against labels ``y`` (NumPy), as the paper reports them."""
    y = np.asarray(y)
    p = np.asarray(p, dtype=np.float64)
    if task == "binary":
        clipped = np.clip(p, 1e-7, 1 - 1e-7)
        return {"accuracy": float(np.mean((p > 0.5) == (y > 0.5))), "mse": float(np.mean((p - y) ** 2)),
                "logloss": float(-np.mean(y * np.log(clipped) + (1 - y) * np.log(1 - clipped)))}
    if task == "multiclass":
        labels = y.astype(np.int64).reshape(-1)
        chosen = np.clip(p[np.arange(len(labels)), labels], 1e-7, 1.0)
        return {"accuracy": float(np.mean(np.argmax(p, axis=-1) == labels)),
                "cross_entropy": float(-np.mean(np.log(chosen)))}
    return {"mse": float(np.mean((p - y) ** 2)), "mae": float(np.mean(np.abs(p - y)))}


def _cpu_seconds():
    return time.process_time()


def stream_test_start(evaluate_from, n):
    """The row where a stream's test period starts: ``evaluate_from`` as a fraction ``0 <= f < 1`` of ``n`` rows
    or as a row index ``0 <= i < n``; else ``ValueError`` naming the value."""
    if isinstance(evaluate_from, (float, np.floating)):
        if not 0.0 <= evaluate_from < 1.0:
            raise ValueError(f"evaluate_from as a fraction must be in [0, 1). Received: evaluate_from={evaluate_from!r}")
        return int(round(evaluate_from * n))
    start = int(evaluate_from)
    if not 0 <= start < n:
        raise ValueError(f"evaluate_from as a row index must be in [0, {n}). Received: evaluate_from={evaluate_from!r}")
    return start


def stream_summary(records, keys, start_test, seconds, cpu, timed_rows, timed_wall, timed_cpu):
    """The result dict of a streamed pass: per-batch ``records`` (``start``, ``size`` and the metrics ``keys``),
    their example-weighted means over the whole stream (``all``) and the test period (``test``), and the speed."""
    def summary(rows):
        # NaN, not 0, for a period without rows (a 0.0 MSE or loss would read as a perfect model).
        total = sum(r["size"] for r in rows)
        return {"rows": total, **{k: float(sum(r[k] * r["size"] for r in rows) / total) if total else float("nan")
                                  for k in keys}}

    test = [r for r in records if r["start"] >= start_test]
    if records and not test:
        warnings.warn(f"the stream's test period is empty: no batch starts at or after row {start_test} (the test "
                      f"period is whole batches; the last starts at row {records[-1]['start']}). Its metrics are "
                      "NaN; lower evaluate_from / test_fraction or the batch size", stacklevel=3)

    return {
        "batches": records,
        "all": summary(records),
        "test": summary(test),
        "evaluate_from": start_test,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "examples_per_second": timed_rows / timed_wall if timed_wall > 0 else float("nan"),
        "cpu_ms_per_example": 1000.0 * timed_cpu / timed_rows if timed_rows else float("nan"),
    }


def stream_fit(model, x, y, batch_size=500, validation=PREVIOUS_BATCH, evaluate_from=0.0, log=None,
               log_every=50, warmup_batches=2, keep_predictions=False):
    """The streaming protocol: one pass over time-ordered batches, each predicted first, then trained on.

    For each batch ``t`` (rows in the order given: sort by time first): the bilevel θ-step on the validation batch
    (batch ``t - 1`` with ``validation="previous_batch"``, none for ``t = 0``), then the W-step on batch ``t``,
    whose forward pass, made before the update, is the batch's test prediction (the paper's "generate
    predictions, evaluate, then update W"). Batch normalisation uses the batch's statistics in that pass, as in
    training.

    Args:
        model: an ``AutoEmbSearch`` (compiled), or a compiled tfemb ``RecModel``: it is wrapped in an
            ``AutoEmbSearch`` with its optimizer and loss (a model without AutoEmb layers trains by the W-step
            alone; with AutoEmb layers the wrapper's default bilevel mode and θ optimizer apply).
        x: dict of encoded feature arrays (``Schema.transform``), rows in time order.
        y: labels.
        batch_size: rows per batch. Default 500 (the authors' code).
        validation: ``"previous_batch"`` or None (no θ-step).
        evaluate_from: where the test period starts, as a fraction of the rows (``0.0 <= f < 1``) or a row index
            (int); the summary ``test`` covers the batches starting at or after it (the paper: the later part of
            the stream), ``all`` the whole stream.
        log: optional callable for progress lines, every ``log_every`` batches.
        warmup_batches: first batches left out of the speed figures (tracing).
        keep_predictions: also return every row's test prediction (``predictions``, ``[rows(, classes)]``) and
            per-example loss (``row_losses``), in stream order, e.g. for ``tfemb.esapn.frequency_report``.

    Returns:
        dict: ``batches`` (per batch: ``start``, ``size``, ``loss`` and the task's metrics), ``all`` and ``test``
        (example-weighted means), ``seconds`` / ``cpu_seconds`` (whole stream), ``examples_per_second`` and
        ``cpu_ms_per_example`` (after the warm-up batches), ``evaluate_from`` (row index); with
        ``keep_predictions``, ``predictions`` and ``row_losses``.
    """
    from tfemb.data.splits import stream_batches

    if isinstance(model, AutoEmbSearch):
        search = model
        if getattr(search, "optimizer", None) is None:  # Keras 3: no attribute before compile()
            raise RuntimeError("compile() the AutoEmbSearch before stream_fit")
    else:
        if getattr(model, "optimizer", None) is None:
            raise RuntimeError("stream_fit needs a compiled model (tfemb.tasks.compile_model)")
        search = AutoEmbSearch(model)
        search.compile(optimizer=model.optimizer, loss=model.loss, metrics=[])
    if validation not in (PREVIOUS_BATCH, None):
        raise ValueError(f"validation must be {PREVIOUS_BATCH!r} or None. Received: validation={validation!r}")
    n = len(next(iter(x.values())))
    start_test = stream_test_start(evaluate_from, n)
    task = search.rec_model.task
    records, previous, kept = [], None, []
    wall0, cpu0 = time.perf_counter(), _cpu_seconds()
    timed_rows, timed_wall, timed_cpu = 0, 0.0, 0.0
    start = 0
    for t, (xb, yb) in enumerate(stream_batches(x, y, batch_size=batch_size)):
        b_wall, b_cpu = time.perf_counter(), _cpu_seconds()
        xt = {k: tf.convert_to_tensor(v) for k, v in xb.items()}
        yt = tf.convert_to_tensor(yb)
        y_pred, losses = search.stream_batch(t, xt, yt, previous if validation == PREVIOUS_BATCH else None)
        p = y_pred.numpy()
        row_losses = losses.numpy()
        loss = float(np.mean(row_losses))
        if keep_predictions:
            kept.append((p, row_losses))
        if t >= warmup_batches:
            timed_rows += len(yb)
            timed_wall += time.perf_counter() - b_wall
            timed_cpu += _cpu_seconds() - b_cpu
        record = {"start": start, "size": len(yb), "loss": loss}
        record.update(_batch_metrics(task, yb, p))
        records.append(record)
        previous = (xt, yt)
        start += len(yb)
        if log is not None and log_every and (t + 1) % log_every == 0:
            log(f"    batch {t + 1}: rows {start:,}/{n:,}, loss={loss:.4f}, "
                + ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k not in ("start", "size", "loss")))
    seconds, cpu = time.perf_counter() - wall0, _cpu_seconds() - cpu0

    keys = [k for k in records[0] if k not in ("start", "size")] if records else []
    out = stream_summary(records, keys, start_test, seconds, cpu, timed_rows, timed_wall, timed_cpu)
    if keep_predictions:
        out["predictions"] = np.concatenate([p for p, _ in kept], axis=0)
        out["row_losses"] = np.concatenate([l for _, l in kept], axis=0)
    return out


# ------------------------------------------------------------------------------------------------ export
def hard_soft_difference(model, x, y=None, batch_size=4096):
    """How the hard export's outputs differ from the soft model's, on inputs ``x`` (inference mode).

    Returns a dict: ``max_abs`` / ``mean_abs`` difference of the model outputs, ``agreement`` (share of rows
    whose predicted class is the same; binary: the 0.5 cut), and with labels ``y`` the task metrics of both
    (``hard``, ``soft``). The layers' ``inference_selection`` is restored afterwards.
    """
    rec = _unwrap(model)
    layers = autoemb_layers(rec)
    saved = {name: layer.inference_selection for name, layer in layers.items()}
    outputs = {}
    try:
        for selection in INFERENCE_SELECTIONS:
            for layer in layers.values():
                layer.inference_selection = selection
            n = len(next(iter(x.values())))
            parts = [rec({k: tf.convert_to_tensor(v[s:s + batch_size]) for k, v in x.items()}, training=False).numpy()
                     for s in range(0, n, batch_size)]
            outputs[selection] = np.concatenate(parts, axis=0)
    finally:
        # Each layer gets its own selection back (layers of one model may differ: user hard, item soft).
        for name, layer in layers.items():
            layer.inference_selection = saved[name]
        _drop_inference_functions(rec)
    hard, soft = outputs["hard"].astype(np.float64), outputs["soft"].astype(np.float64)
    diff = np.abs(hard - soft)
    if rec.task == "multiclass":
        agreement = float(np.mean(np.argmax(hard, -1) == np.argmax(soft, -1)))
    elif rec.task == "binary":
        agreement = float(np.mean((hard > 0.5) == (soft > 0.5)))
    else:
        agreement = float("nan")
    out = {"max_abs": float(diff.max()) if diff.size else 0.0, "mean_abs": float(diff.mean()) if diff.size else 0.0,
           "agreement": agreement}
    if y is not None:
        out["hard"] = _batch_metrics(rec.task, y, hard)
        out["soft"] = _batch_metrics(rec.task, y, soft)
    return out


# -------------------------------------------------------------------------------------------- experiments
def fit_experiment(model, cfg, train_ds, val_ds=None, callbacks=None, verbose=0):
    """Trains ``model`` as ``tfemb.experiment.run`` does for a config with an ``autoemb`` section.

    ``cfg["autoemb"]``: ``mode`` (``"bilevel"``, ``"joint"``), ``validation`` (``"val"``: the validation split,
    repeated; ``"previous_batch"``), ``controller_optimizer`` (name, default ``"adam"``),
    ``controller_learning_rate`` (default 1e-4; in joint mode unset means "the W optimizer"). W uses
    ``train.optimizer`` / ``train.learning_rate``; epochs, early stopping and callbacks as for any model.
    Returns the Keras ``History``.
    """
    from tfemb.tasks import make_optimizer

    spec = dict(cfg.get("autoemb") or {})
    train_cfg = cfg["train"]
    mode = _check_mode(spec.get("mode", "bilevel"))
    source = spec.get("validation", "val")
    if source == "val":
        if val_ds is None:
            raise ValueError("autoemb.validation='val' needs a validation split")
        stream = val_ds.repeat()
    elif source == PREVIOUS_BATCH:
        stream = PREVIOUS_BATCH
    else:
        raise ValueError(f"autoemb.validation must be 'val' or {PREVIOUS_BATCH!r}. Received: {source!r}")
    lr = spec.get("controller_learning_rate")
    controller = None
    if mode == "bilevel" or lr is not None:
        controller = make_optimizer(spec.get("controller_optimizer", "adam"), float(1e-4 if lr is None else lr))
    search = AutoEmbSearch(model, validation_stream=stream, mode=mode)
    search.compile(optimizer=make_optimizer(train_cfg["optimizer"], train_cfg["learning_rate"]),
                   controller_optimizer=controller, jit_compile=False)
    return search.fit(train_ds, validation_data=val_ds, epochs=int(train_cfg["epochs"]), shuffle=False,
                      callbacks=callbacks or [], verbose=verbose)
