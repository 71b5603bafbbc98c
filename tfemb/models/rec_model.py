"""RecModel: the base of every tfemb network: one EmbeddingScheme per sparse feature of a Schema."""

import numpy as np
import tensorflow as tf

from tfemb import optimizers as sparse_optimizers
from tfemb._keras import IS_KERAS_3, TrackedCollectionsCheckpoint, dataset_fit_kwargs, deserialize, keras, serialize
from tfemb.data.schema import Schema
from tfemb.layers.embedding_scheme import EmbeddingScheme
from tfemb.layers.factory import NUMERIC_SCHEMES, numeric_factory
from tfemb.layers.fixed_embedding import FixedEmbedding
from tfemb.layers.numeric_embedding import NumericEmbedding


def _output_activation(task):
    return {"binary": "sigmoid", "multiclass": "softmax", "regression": None}[task]


def _keras3_dtype_policy(config, layer=None):
    """``(layer name, policy name)`` of the first Keras 3 dtype policy (a serialised ``DTypePolicy``) in a layer
    config tree, or None: the mark of a config written by Keras 3, which Keras 2 cannot deserialise."""
    if isinstance(config, dict):
        dtype = config.get("dtype")
        if isinstance(dtype, dict) and "DTypePolicy" in str(dtype.get("class_name", "")):
            return layer or config.get("name"), (dtype.get("config") or {}).get("name", dtype.get("class_name"))
        name = config.get("name") if isinstance(config.get("name"), str) else layer
        for value in config.values():
            found = _keras3_dtype_policy(value, name)
            if found is not None:
                return found
    elif isinstance(config, (list, tuple)):
        for value in config:
            found = _keras3_dtype_policy(value, layer)
            if found is not None:
                return found
    return None


def _keras2_dtype(embeddings):
    """``(layer name, dtype)`` when every serialised scheme in ``embeddings`` has its dtype as Keras 2 writes it (a
    string, or a ``Policy`` under mixed precision; Keras 3 writes a serialised ``DTypePolicy``), else None."""
    configs = [spec.get("config") for spec in (embeddings or {}).values() if isinstance(spec, dict)]
    configs = [c for c in configs if isinstance(c, dict) and "dtype" in c]

    def keras2(dtype):
        return isinstance(dtype, str) or (isinstance(dtype, dict) and dtype.get("class_name") == "Policy")

    if configs and all(keras2(c["dtype"]) for c in configs):
        dtype = configs[0]["dtype"]
        return configs[0].get("name"), dtype if isinstance(dtype, str) else (dtype.get("config") or {}).get("name")
    return None


class WeightedLossMixin:
    """``compute_loss`` that gives per-example losses for ``[batch]`` outputs (binary and regression models).

    Keras' losses average over the last axis first: on ``[batch]`` outputs that leaves one scalar per batch,
    which (1) a ``[batch]`` sample weight cannot weight per example (Keras 2: "Can not squeeze dim[0]"; Keras 3:
    silently multiplies the batch mean by the mean weight), and (2) Keras 3 does not divide by the number of
    replicas under a ``tf.distribute`` strategy (``reduce_values`` skips scalars), so with N replicas the summed
    gradients were N times too large. A trailing axis gives per-example losses, which Keras weights and scales
    per replica as intended; unweighted on one replica, the mean is the same. Mixed into ``RecModel`` and the
    search wrappers (``tfemb.autoemb``, ``tfemb.esapn``), which compute the loss of their own steps."""

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, *args, **kwargs):
        if ((IS_KERAS_3 or sample_weight is not None) and y is not None and y_pred is not None
                and getattr(y_pred, "shape", None) is not None and y_pred.shape.rank == 1):
            y_pred = y_pred[:, tf.newaxis]
            y = tf.reshape(y, [-1, 1])
        return super().compute_loss(x, y, y_pred, sample_weight, *args, **kwargs)

    def track_loss(self, loss, x):
        """Keras 3: adds a step's ``compute_loss`` value to the ``loss`` that ``fit`` reports, as Keras' own
        ``train_step`` does: under an N-replica strategy each replica's loss is its share of the global mean
        (divided by N, so the summed gradients are the global batch's), which is multiplied back here. (Keras 2
        tracks the loss inside ``compute_loss``.)"""
        if not IS_KERAS_3:
            return
        replicas = sparse_optimizers.replicas_in_sync()
        if replicas > 1:
            loss = loss * tf.cast(replicas, loss.dtype)
        self._loss_tracker.update_state(loss, sample_weight=tf.shape(tf.nest.flatten(x)[0])[0])

    def build_compiled_under_strategy(self, x, y=None, sample_weight=None):
        """Builds the model and its compiled loss and metrics from the first rows of ``x`` (a ``tf.data.Dataset``
        or arrays), in the strategy's scope, before a Keras 3 ``fit`` / ``evaluate`` under a multi-replica
        ``tf.distribute`` strategy. Keras 3 would otherwise build them from the replica-*averaged* first batch
        (``strategy.reduce("MEAN", ...)``), which turns the integer id inputs into floats: every scheme then
        refuses its ids and ``fit`` fails with "Unable to automatically build the model". Keras 2 needs none of
        this; nor does a single replica, or a model whose loss and metrics are built already. The search wrappers
        (``tfemb.autoemb``, ``tfemb.esapn``) run their ``rec_model`` forward and build their own loss and metrics."""
        strategy = self.distribute_strategy
        if not IS_KERAS_3 or strategy is None or strategy.num_replicas_in_sync < 2:
            return
        unbuilt = [c for c in (getattr(self, "_compile_loss", None), getattr(self, "_compile_metrics", None))
                   if c is not None and not c.built]
        if not unbuilt and self.built:
            return
        if isinstance(x, tf.data.Dataset):
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(next(iter(x)))
        elif isinstance(x, (dict, np.ndarray, tf.Tensor, list, tuple)):
            def head(v):
                return None if v is None else tf.convert_to_tensor(np.asarray(v)[:2]) \
                    if not isinstance(v, tf.Tensor) else v[:2]
            x, y, sample_weight = tf.nest.map_structure(head, x), tf.nest.map_structure(head, y), \
                tf.nest.map_structure(head, sample_weight)
        else:  # a generator or PyDataset: left to Keras
            return
        with strategy.scope():
            y_pred = getattr(self, "rec_model", self)(x, training=False)
            if y is not None:
                self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
                self.compute_metrics(x, y, y_pred, sample_weight)
                self.reset_metrics()


class RecModel(WeightedLossMixin, TrackedCollectionsCheckpoint, keras.Model):
    """Base class of tfemb's CF and CTR networks.

    It owns one ``EmbeddingScheme`` per sparse feature of ``schema`` (categorical, multi-hot, discretised
    numeric), the head for the schema's task, and an optional row-sparse optimizer for the embedding tables.
    Subclasses implement ``interact(embedded, dense, training)`` -> logits, and may add first-order (wide) logits
    computed from the raw encoded inputs with ``linear_logits(inputs, dense, training)``.

    Class attribute ``uses_embeddings``: False for models that use no embedding scheme (logistic regression);
    no scheme is built and ``embed`` returns ``{}``. Subclasses that read only some features of the schema
    (CF models: user and item) override ``_input_features()``.

    Args:
        schema: a fitted ``tfemb.data.Schema`` (vocabulary sizes, per-id counts, combiners, task).
        embeddings: how each sparse feature is embedded: None (``FixedEmbedding(embedding_dim)``), a factory
            ``f(feature_name, vocabulary_size, frequencies) -> EmbeddingScheme`` (e.g.
            ``tfemb.layers.scheme_factory("hashing", output_dim=16, compression=4)``), or a dict
            ``{feature: EmbeddingScheme or factory}`` (features left out get the default).
        embedding_dim: dimension every scheme outputs (the base dimension the interaction block sees).
        embedding_optimizer: None (every variable uses the optimizer given to ``compile``), or a
            ``tfemb.optimizers.SparseOptimizer`` / name (``"adam"``, ``"adagrad"``, ``"rowwise_adagrad"``,
            ``"sgd"``) that updates only the looked-up rows of the embedding tables (far faster on large
            vocabularies; single-replica only).
        embedding_learning_rate: learning rate of a named ``embedding_optimizer``.
        num_classes: classes of a multiclass head (default: the schema label's ``num_classes``).
        numeric_embeddings: how the dense (numeric) features enter the model: None (the default: as raw values,
            concatenated to the deep part's input and read by the first-order terms), or an embedding per feature
            that makes each one more field beside the embedded sparse features, ``embedding_dim`` wide (the FM,
            cross and interaction terms then see it): ``"field"`` (``FieldEmbedding``, ``x · v``), ``"autodis"``
            (``AutoDisEmbedding``, the AutoDis paper's soft discretisation), a factory ``f(feature_name) ->
            NumericEmbedding`` (e.g. ``tfemb.layers.numeric_factory("autodis", output_dim=16, num_buckets=40)``),
            or a dict ``{feature: any of these}`` (features left out stay raw). First-order terms keep reading the
            raw values of every dense feature.
    """

    #: False: the model uses no EmbeddingScheme (e.g. LR, first-order weights only); none is built.
    uses_embeddings = True

    def __init__(self, schema, embeddings=None, embedding_dim=16, embedding_optimizer=None,
                 embedding_learning_rate=None, num_classes=None, numeric_embeddings=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(schema, dict):
            schema = Schema.from_dict(schema)
        if not isinstance(schema, Schema):
            raise TypeError(f"schema must be a tfemb.data.Schema. Received: {type(schema).__name__}")
        if not schema.is_fitted:
            raise ValueError("schema must be fitted (schema.fit(train_df)) before building a model")
        self.schema = schema
        self.embedding_dim = int(embedding_dim)
        if self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1. Received: embedding_dim={embedding_dim!r}")
        self.task = schema.task or "binary"
        label = schema.label
        self.num_classes = num_classes or (label.num_classes if label is not None else None)
        if self.task == "multiclass" and not self.num_classes:
            raise ValueError("a multiclass model needs num_classes")
        self.output_units = self.num_classes if self.task == "multiclass" else 1
        # Features the model reads: sparse (ids) and dense (floats); all of the schema's by default.
        self.sparse_names, self.dense_names = self._input_features()
        self.embedding_layers = {}
        if self.uses_embeddings:
            owner = {}  # id(layer) -> the feature it was given for
            for name in self.sparse_names:
                layer = self._make_scheme(name, embeddings)
                if id(layer) in owner:
                    # Each feature has its own vocabulary (its ids mean different values), and a saved model or
                    # an export stores one table per feature: a table shared in memory would silently come
                    # back as two after a reload, and be counted twice in the size reports.
                    raise ValueError(
                        f"the same {type(layer).__name__} object ({layer.name!r}) was given for features "
                        f"{owner[id(layer)]!r} and {name!r}: each feature needs its own embedding layer (pass a "
                        "factory, e.g. scheme_factory(...), or one layer per feature)")
                owner[id(layer)] = name
                self.embedding_layers[name] = layer
        # Keras tracks layers held in a dict attribute; keep a list too for a stable order.
        self.embedding_names = [n for n in self.sparse_names if n in self.embedding_layers]
        self.embedding_list = [self.embedding_layers[n] for n in self.embedding_names]
        # Dense features embedded as fields (numeric_embeddings), in dense_names order, and those that stay raw.
        self.numeric_layers = self._make_numeric_layers(numeric_embeddings, owner if self.uses_embeddings else {})
        self.numeric_names = [n for n in self.dense_names if n in self.numeric_layers]
        self.raw_dense_names = [n for n in self.dense_names if n not in self.numeric_layers]
        #: Every feature the interaction block sees as a vector: the embedded sparse ones, then the numeric ones.
        self.field_names = self.embedding_names + self.numeric_names
        self._embedding_lr = embedding_learning_rate
        self.embedding_optimizer = sparse_optimizers.get(embedding_optimizer, embedding_learning_rate)
        if self.embedding_optimizer is not None:
            # Schemes with a choice of lookup (MixedDimensionEmbedding's lookup="auto") keep the one whose table
            # gradient is row-sparse, so the lazy optimizer updates only the looked-up rows.
            for layer in self.embedding_list:
                object.__setattr__(layer, "row_sparse_gradients", True)

    # -------------------------------------------------------------------------------------------- schemes
    def _input_features(self):
        """``(sparse_names, dense_names)`` the model reads; every feature of the schema by default.

        Called by ``__init__`` before any scheme is built (``self.schema`` is set): a subclass that uses a
        subset of the features (e.g. only user and item ids) overrides it, so no unused table is built.
        """
        return [f.name for f in self.schema.sparse_features], [f.name for f in self.schema.dense_features]

    def _make_scheme(self, name, embeddings):
        spec = embeddings.get(name) if isinstance(embeddings, dict) else embeddings
        size = self.schema.vocabulary_size(name)
        combiner = self.schema.combiner(name)
        if spec is None:
            layer = FixedEmbedding(size, self.embedding_dim, combiner=combiner, name=f"{name}_embedding")
        elif isinstance(spec, EmbeddingScheme):
            layer = spec
        elif isinstance(spec, dict):  # a serialised layer (from_config)
            layer = deserialize(spec)
        elif callable(spec):
            layer = spec(name, size, self.schema.frequencies(name))
            if combiner is not None and getattr(layer, "combiner", None) is None:
                layer.combiner = combiner
        else:
            raise TypeError(f"embeddings[{name!r}] must be an EmbeddingScheme, a factory or None. Received: {spec!r}")
        if not isinstance(layer, EmbeddingScheme):
            raise TypeError(f"the embedding of {name!r} must be a tfemb EmbeddingScheme. Received: {type(layer).__name__}")
        if layer.vocabulary_size != size:
            raise ValueError(
                f"the embedding of {name!r} has vocabulary_size={layer.vocabulary_size} but the schema has {size} ids"
            )
        if layer.output_dim != self.embedding_dim:
            raise ValueError(
                f"the embedding of {name!r} has output_dim={layer.output_dim}; this model needs "
                f"embedding_dim={self.embedding_dim}"
            )
        return layer

    def _make_numeric_layers(self, spec, owner):
        """``{dense feature: NumericEmbedding}`` from the ``numeric_embeddings`` argument (see the class doc)."""
        if spec is None:
            return {}
        dense_names = list(self.dense_names)  # a plain list in messages (Keras 2 wraps attributes)
        if not self.uses_embeddings:
            raise ValueError(f"{type(self).__name__} uses no embeddings, so it cannot embed numeric features. "
                             f"Received: numeric_embeddings={spec!r}")
        if not dense_names:
            raise ValueError(f"numeric_embeddings was given, but {type(self).__name__} reads no numeric (dense) "
                             f"feature of this schema. Received: numeric_embeddings={spec!r}")
        if isinstance(spec, NumericEmbedding) and len(dense_names) > 1:
            raise ValueError(
                f"one {type(spec).__name__} object was given for {len(dense_names)} numeric features "
                f"{dense_names}: each feature needs its own layer (pass a name, a factory such as "
                "tfemb.layers.numeric_factory(...), or a dict of one layer per feature)")
        if isinstance(spec, dict):
            unknown = [n for n in spec if n not in dense_names]
            if unknown:
                raise ValueError(f"numeric_embeddings names {unknown[0]!r}, which is not a numeric (dense) feature "
                                 f"this model reads; those are {dense_names}")
            per_feature = {n: spec.get(n) for n in dense_names}
        else:
            per_feature = {n: spec for n in dense_names}
        layers = {}
        for name, one in per_feature.items():
            if one is None:
                continue
            if isinstance(one, str):
                if one not in NUMERIC_SCHEMES:
                    raise ValueError(f"numeric_embeddings[{name!r}]: unknown numeric embedding {one!r}; choose one "
                                     f"of {sorted(NUMERIC_SCHEMES)}, a NumericEmbedding or a factory")
                layer = numeric_factory(one, output_dim=self.embedding_dim)(name)  # named as the factory names
            elif isinstance(one, NumericEmbedding):
                layer = one
            elif isinstance(one, dict):  # a serialised layer (from_config)
                layer = deserialize(one)
            elif callable(one):
                layer = one(name)
            else:
                raise TypeError(f"numeric_embeddings[{name!r}] must be a name ({sorted(NUMERIC_SCHEMES)}), a "
                                f"NumericEmbedding, a factory or None. Received: {one!r}")
            if not isinstance(layer, NumericEmbedding):
                raise TypeError(f"the numeric embedding of {name!r} must be a tfemb NumericEmbedding. Received: "
                                f"{type(layer).__name__}")
            if layer.output_dim != self.embedding_dim:
                raise ValueError(f"the numeric embedding of {name!r} has output_dim={layer.output_dim}; this model "
                                 f"needs embedding_dim={self.embedding_dim}")
            if id(layer) in owner:
                raise ValueError(f"the same {type(layer).__name__} object ({layer.name!r}) was given for features "
                                 f"{owner[id(layer)]!r} and {name!r}: each feature needs its own layer")
            owner[id(layer)] = name
            layers[name] = layer
        return layers

    # ------------------------------------------------------------------------------------------- forward
    def _check_inputs(self, inputs):
        if not isinstance(inputs, dict):
            raise TypeError(f"inputs must be a dict of feature name -> tensor. Received: {type(inputs).__name__}")
        missing = [n for n in self.sparse_names + self.dense_names if n not in inputs]
        if missing:
            raise KeyError(f"missing input feature {missing[0]!r}; the model needs {self.sparse_names + self.dense_names}")

    def embed(self, inputs):
        """``({feature: [batch, embedding_dim]}, dense [batch, n_dense] or None)``: the embedded sparse features and
        the embedded numeric ones (``field_names``), and the numeric features that stay raw (``raw_dense_names``);
        ``{}`` when the model uses no embedding scheme (``uses_embeddings = False``)."""
        self._check_inputs(inputs)
        embedded = {name: self.embedding_layers[name](inputs[name]) for name in self.embedding_names}
        for name in self.numeric_names:
            embedded[name] = self.numeric_layers[name](inputs[name])
        return embedded, self._stack_dense(inputs, self.raw_dense_names)

    def _stack_dense(self, inputs, names):
        if not names:
            return None
        return tf.stack([tf.cast(inputs[n], self.compute_dtype) for n in names], axis=-1)  # [batch, len(names)]

    def interact(self, embedded, dense, training=None):
        """Subclasses: embedded features -> logits ``[batch, output_units]`` (or None when the model has only
        ``linear_logits``)."""
        raise NotImplementedError

    #: Name of the attribute that holds the model's first-order terms (a ``blocks.LinearTerms``), or None.
    linear_terms_attribute = None

    def linear_tables(self):
        """The first-order ``FixedEmbedding`` tables, one per sparse feature (``[]`` for a model without
        first-order terms)."""
        terms = getattr(self, self.linear_terms_attribute) if self.linear_terms_attribute else None
        return [] if terms is None else list(terms.tables)

    def linear_logits(self, inputs, dense, training=None):
        """First-order (wide) logits ``[batch, output_units]`` from the raw encoded ``inputs``, added to those of
        ``interact``: the ``linear_terms_attribute`` layer's, None (the default) when the model has none."""
        if not self.linear_terms_attribute:
            return None
        return getattr(self, self.linear_terms_attribute)(inputs, dense, training=training)

    def call(self, inputs, training=None):
        embedded, dense = self.embed(inputs)
        logits = self.interact(embedded, dense, training=training)
        # First-order terms read every dense feature raw, the embedded ones too.
        linear_dense = self._stack_dense(inputs, self.dense_names) if self.numeric_names else dense
        linear = self.linear_logits(inputs, linear_dense, training=training)
        if linear is not None:
            logits = linear if logits is None else tf.cast(logits, linear.dtype) + linear
        if logits is None:
            raise NotImplementedError(f"{type(self).__name__}: interact() and linear_logits() both returned None")
        logits = tf.cast(logits, tf.float32)  # heads stay float32 under mixed precision
        if self.task == "multiclass":
            return tf.nn.softmax(logits)  # [batch, num_classes]
        logits = tf.squeeze(logits, axis=-1)  # [batch], the rank of the labels
        return tf.sigmoid(logits) if self.task == "binary" else logits

    def build(self, input_shape=None):
        # Keras builds reloaded models from shapes with float placeholders; ids must be integers, so the
        # model is built by running it once on a valid encoded batch instead.
        if not self.built:
            self.call(self.example_inputs())
        self.built = True
        if self.embedding_optimizer is not None:
            # The slots are checkpointed by their table's position in sparse_variables(), the order two models of
            # one config share (they are made on the first training step; a restore before that applies then).
            self.embedding_optimizer.track(self.sparse_variables())

    def get_build_config(self):
        # Keras records input shapes only when a model is built through __call__; a model built by build()
        # (which calls self.call) would be saved without a build config under Keras 2 and reload unbuilt, so its
        # weights could not load. Any built model is rebuilt from example inputs instead.
        return {"example_inputs": True} if self.built else None

    def build_from_config(self, config):
        self.build()

    def compile(self, *args, **kwargs):
        super().compile(*args, **kwargs)
        # A named embedding optimizer without its own learning rate follows the compiled optimizer's.
        if self.embedding_optimizer is not None and self._embedding_lr is None and self.optimizer is not None:
            try:
                self.embedding_optimizer.learning_rate = float(keras.backend.get_value(self.optimizer.learning_rate))
            except (TypeError, ValueError):  # a schedule: keep the optimizer's default
                pass

    def compile_from_config(self, config):
        """Recompiles a reloaded model (``keras.models.load_model``) with the saved optimizer, loss and metrics, as
        Keras does for a model whose ``compile`` is not overridden (Keras skips it for an overridden one, leaving a
        reloaded model that cannot ``evaluate`` or resume ``fit``). The optimizer is built so that its saved state
        loads; a row-sparse ``embedding_optimizer`` starts with fresh slots."""
        # The saving library's deserializer (tf.keras under Keras 3 has no keras.saving; keras.utils' is that one).
        config = getattr(keras, "saving", keras.utils).deserialize_keras_object(config)
        self.compile(**config)
        if self.built and getattr(self, "optimizer", None) is not None and hasattr(self.optimizer, "build"):
            self.optimizer.build(self.dense_trainable_variables())

    def dense_trainable_variables(self):
        """The trainable variables the compiled optimizer updates: all of them, or, with an
        ``embedding_optimizer``, all but ``sparse_variables()``. The compiled optimizer is built with these (on the
        first step, and by ``compile_from_config``), so a reloaded model's optimizer has the saved one's variables
        and its state loads (Keras skips, with only a warning, an optimizer state of another length)."""
        if self.embedding_optimizer is None:
            return list(self.trainable_variables)
        sparse_ids = {id(v) for v in self.sparse_variables()}
        return [v for v in self.trainable_variables if id(v) not in sparse_ids]

    # ------------------------------------------------------------------------------------------ training
    def sparse_variables(self):
        """Embedding-table variables updated by ``embedding_optimizer`` (when set)."""
        out = []
        for layer in self._embedding_like_layers():
            out.extend(layer.sparse_tables())
        return out

    def _embedding_like_layers(self):
        return list(self.embedding_list) + self.linear_tables()

    def fit(self, x=None, y=None, **kwargs):
        """Keras ``fit``; a ``tf.data.Dataset`` is passed with ``shuffle=False`` unless told otherwise (Keras never
        shuffles a dataset; see ``tfemb._keras.dataset_fit_kwargs``)."""
        self.check_embedding_optimizer_replicas()
        self.build_compiled_under_strategy(x, y, kwargs.get("sample_weight"))
        return super().fit(x, y, **dataset_fit_kwargs(x, kwargs))

    def check_embedding_optimizer_replicas(self, strategy=None):
        """Raises a ValueError, before any step is traced, when the model has a row-sparse ``embedding_optimizer``
        and would train under a multi-replica strategy (``strategy``, default the model's). Also called by the
        search wrappers' ``fit`` (``tfemb.esapn``, ``tfemb.autoemb``), whose steps use the same optimizer."""
        strategy = strategy or self.distribute_strategy
        sparse_optimizers.check_single_replica(self.embedding_optimizer, strategy.num_replicas_in_sync)

    def evaluate(self, x=None, y=None, **kwargs):
        self.build_compiled_under_strategy(x, y, kwargs.get("sample_weight"))
        return super().evaluate(x, y, **kwargs)

    def train_step(self, data):
        adaptive = self.low_precision_layers(adaptive=True)
        if self.embedding_optimizer is None:
            logs = super().train_step(data)
        else:
            sparse_optimizers.check_single_replica(self.embedding_optimizer)
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
            variables = self.trainable_variables
            self.apply_split_gradients(zip(tape.gradient(loss, variables), variables))
            self.track_loss(loss, x)
            logs = self.compute_metrics(x, y, y_pred, sample_weight)
        if adaptive:
            self.step_size_step(data, adaptive)
        return logs

    def low_precision_layers(self, adaptive=None):
        """The ``LowPrecisionEmbedding`` layers (only the ALPT ones with ``adaptive=True``, the LPT ones with
        False)."""
        from tfemb.layers.low_precision_embedding import LowPrecisionEmbedding

        return [layer for layer in self.embedding_list if isinstance(layer, LowPrecisionEmbedding)
                and (adaptive is None or layer.adaptive == adaptive)]

    def step_size_step(self, data, layers=None):
        """Steps 3 and 4 of ALPT (``tfemb.layers.LowPrecisionEmbedding``) after a training step has updated the
        tables: the loss of the model with each ALPT table read as ``Δ·round(clip(w̃/Δ))`` gives the step sizes
        a (straight-through) gradient step, then each table is rounded back to its grid with the new step sizes.
        ``train_step`` calls it; a custom training loop calls it after each update."""
        layers = self.low_precision_layers(adaptive=True) if layers is None else layers
        if not layers:
            return tf.no_op()
        replicas = sparse_optimizers.replicas_in_sync()
        if replicas > 1:
            raise ValueError(
                f"{layers[0].name}: LowPrecisionEmbedding(step_size='adaptive') (ALPT) trains its step sizes on one "
                f"replica only. Received a tf.distribute strategy with {replicas} replicas in sync: use "
                "step_size='fixed' (LPT) under a multi-replica strategy, or train on one replica")
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        # The tf.Variable the lookup gathers from (sparse_gather reads a Keras 3 variable's ``.value``).
        variables = [layer.step_sizes.value if IS_KERAS_3 else layer.step_sizes for layer in layers]
        restore = _untracked_loss(self)
        for layer in layers:
            object.__setattr__(layer, "_step_size_pass", True)
        try:
            with tf.GradientTape() as tape:
                tape.watch(variables)
                y_pred = self(x, training=True)
                loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
        finally:
            for layer in layers:
                object.__setattr__(layer, "_step_size_pass", False)
            restore()
        batch = tf.shape(tf.nest.flatten(x)[0])[0]
        ops = []
        for layer, gradient in zip(layers, tape.gradient(loss, variables)):
            if gradient is None:
                continue
            with tf.control_dependencies([layer.apply_step_size_gradient(gradient, batch)]):
                ops.append(layer.requantize())
        return tf.group(ops)

    def apply_split_gradients(self, grads_and_vars, optimizer=None):
        """Applies ``(gradient, variable)`` pairs: those of ``sparse_variables()`` through the row-sparse
        ``embedding_optimizer`` (when the model has one), the others through ``optimizer`` (default: the compiled
        one). Pairs without a gradient are dropped. Also used by the search wrappers' steps (``tfemb.autoemb``,
        ``tfemb.esapn``)."""
        sparse = self.embedding_optimizer
        sparse_ids = {id(v) for v in self.sparse_variables()} if sparse is not None else set()
        pairs = [(g, v) for g, v in grads_and_vars if g is not None]
        dense_pairs = [(g, v) for g, v in pairs if id(v) not in sparse_ids]
        sparse_pairs = [(g, v) for g, v in pairs if id(v) in sparse_ids]
        if dense_pairs:
            if optimizer is None and IS_KERAS_3 and not self.optimizer.built:
                # Built with every dense variable, not only those with a gradient in this first step: the
                # variables compile_from_config builds a reloaded model's optimizer with.
                self.optimizer.build(self.dense_trainable_variables())
            (optimizer or self.optimizer).apply_gradients(dense_pairs)
        if sparse_pairs:
            sparse.apply(sparse_pairs)

    # --------------------------------------------------------------------------------------- size reports
    def embedding_report(self):
        """One row per sparse feature: rows, parameters, bytes, mean dimension of each scheme."""
        rows = []
        for name in self.embedding_names:
            layer = self.embedding_layers[name]
            dims = np.asarray(layer.dims_per_id())
            rows.append({
                "feature": name,
                "scheme": type(layer).__name__,
                "vocabulary_size": int(layer.vocabulary_size),
                "output_dim": int(layer.output_dim),
                "mean_dim": float(dims.mean()),
                "parameters": int(layer.parameter_count()),
                "bytes": int(layer.storage_bytes()),
            })
        return rows

    def numeric_embedding_report(self):
        """One row per embedded numeric feature: layer, parameters, bytes (``[]`` without ``numeric_embeddings``)."""
        return [{"feature": n, "scheme": type(self.numeric_layers[n]).__name__,
                 "output_dim": int(self.numeric_layers[n].output_dim),
                 "parameters": int(self.numeric_layers[n].parameter_count()),
                 "bytes": int(self.numeric_layers[n].storage_bytes())} for n in self.numeric_names]

    def numeric_parameter_count(self):
        """Parameters of the numeric embeddings (not counted in ``embedding_parameter_count``, the id tables')."""
        return sum(self.numeric_layers[n].parameter_count() for n in self.numeric_names)

    def embedding_parameter_count(self):
        return sum(self.embedding_layers[n].parameter_count() for n in self.embedding_names)

    def embedding_storage_bytes(self):
        return sum(self.embedding_layers[n].storage_bytes() for n in self.embedding_names)

    # -------------------------------------------------------------------------------------- serialisation
    def get_config(self):
        config = {
            "name": self.name,
            "schema": self.schema.to_dict(),
            "embeddings": {n: serialize(self.embedding_layers[n]) for n in self.embedding_names},
            "embedding_dim": self.embedding_dim,
            "embedding_optimizer": None if self.embedding_optimizer is None else self.embedding_optimizer.get_config(),
            "embedding_learning_rate": self._embedding_lr,
            "num_classes": self.num_classes,
            "numeric_embeddings": {n: serialize(self.numeric_layers[n]) for n in self.numeric_names} or None,
            # The dtype policy the model was built under (e.g. "mixed_float16"): from_config builds every sublayer
            # under it again, whatever the global policy of the process that reloads it.
            "dtype": self.dtype_policy.name,
        }
        return config

    @classmethod
    def from_config(cls, config):
        if IS_KERAS_3:
            found = _keras2_dtype(config.get("embeddings"))
            if found is not None:
                layer, dtype = found
                raise ValueError(
                    f"{cls.__name__} {config.get('name')!r} was saved by Keras 2 (tf-keras): its layer {layer!r} has "
                    f"dtype={dtype!r}, a string, where Keras 3 (the Keras of this process) writes a DTypePolicy. The "
                    "two Kerases order a model's layers differently in the weights file (Keras 2 by feature name), "
                    "so the tables would load into the wrong features. Load the file under Keras 2 "
                    "(TF_USE_LEGACY_KERAS=1), or export the model there (tfemb export / "
                    "tfemb.export.export_saved_model): a SavedModel loads under both"
                )
        else:
            found = _keras3_dtype_policy(config.get("embeddings"))
            if found is not None:
                layer, policy = found
                raise ValueError(
                    f"{cls.__name__} {config.get('name')!r} was saved by Keras 3: its layer {layer!r} has the Keras 3 "
                    f"dtype policy {policy!r}, which Keras 2 (tf-keras, TF_USE_LEGACY_KERAS=1, the Keras of this "
                    "process) cannot rebuild. Load the file under Keras 3 (without TF_USE_LEGACY_KERAS), or export "
                    "the model there (tfemb export / tfemb.export.export_saved_model): a SavedModel loads under both"
                )
        policy = config.get("dtype")
        if not isinstance(policy, str):
            return cls(**config)
        # The dense layers a network makes in __init__ take the global policy: set it to the saved one meanwhile,
        # or a model trained under mixed_float16 would rebuild half float32 (and fail to build: float16 schemes
        # meeting a float32 tower) in a process with the default policy.
        previous = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy(policy)
        try:
            return cls(**config)
        finally:
            keras.mixed_precision.set_global_policy(previous)

    def example_inputs(self, batch_size=2):
        """A batch of valid encoded inputs (OOV ids / zeros): builds the model and serves as a smoke input."""
        out = {}
        for name, (shape, dtype) in self.schema.input_spec().items():
            out[name] = tf.zeros((batch_size,) + tuple(shape), dtype=dtype)
        return out


class _NoUpdate:
    def update_state(self, *args, **kwargs):
        return None


def _untracked_loss(model):
    """Keras 2's ``compute_loss`` adds its value to the ``loss`` that ``fit`` reports; ALPT's step-size pass
    computes a second loss that must not be counted. Swaps the tracker for a no-op (while tracing) and returns
    the function that puts it back. Keras 3 tracks the loss in ``train_step`` (``track_loss``): nothing to do."""
    container = getattr(model, "compiled_loss", None)
    if IS_KERAS_3 or container is None or not hasattr(container, "_total_loss_mean"):
        return lambda: None
    saved = container._total_loss_mean
    container._total_loss_mean = _NoUpdate()

    def restore():
        container._total_loss_mean = saved

    return restore
