"""ESAPN's search procedure: the policy networks, the reward, REINFORCE, the alternating streaming schedule.

The layer, ``tfemb.layers.ESAPNEmbedding``, holds each id's embedding at its current size, the linear chain to
``d_n`` and the per-id state (size, count, last ``T`` losses). This module trains a model that uses it, as the
authors' code does (zgahhblhc/ESAPN ``model/train.py``: ``update_controller`` then ``update_RS`` per batch):

- ``ESAPNPolicy``: one policy network per ESAPN feature (users, items). State ``s = (f, e)``: the id's frequency
  ``f`` (its interactions so far) and its current size ``e`` (one-hot), plus its last loss with
  ``use_last_loss=True`` (the code's ``Policy_Type`` 2 / 5); actions ``a ∈ {unchange, enlarge}``.
- The reward of an id's action, the paper's ``R = (1/T) Σ_{t=1..T} L_t − L``: the mean of the id's last ``T``
  recorded losses minus its current loss ``L`` (``rewards``); REINFORCE minimises ``−Σ R · log π(a | s)``
  (``reinforce_loss``).
- ``ESAPNSearch(model)``: a Keras model wrapping a ``RecModel``. Per training batch ``t`` it alternates::

      policy step (batch t-1): sample a ~ π(·|s) per id of the previous batch; L = its loss under the current model
                               at the sampled sizes; R = mean(last T losses) − L; one REINFORCE step of the policies
      model step  (batch t):   a = argmax π(·|s) per id (no gradient); enlarged ids get e_{k+1} = W e_k + b;
                               forward (the batch's test prediction), one step of the recommender, then the state:
                               counts, loss histories, sizes

  The policy step uses the previous batch as its validation batch (the code's ``Val_Type="last_batch"``) and runs
  every ``policy_update_every`` batches (default: every batch, as the code). ``fit`` runs that schedule on a
  ``tf.data`` stream (time-ordered, unshuffled); ``stream_fit`` runs the test-then-train protocol and reports.
- ``stream_fit``: one pass over time-ordered batches, each predicted first, then trained on; per-batch metrics, a
  test-period summary, training speed, the memory report and quality by frequency bucket.
- ``memory_report`` / ``memory_table``: per feature, how many ids ended at each candidate size, their total
  dimensions, the FIXED total at ``d_n`` and the ratio (the paper's memory table).
- ``frequency_report``: quality (loss, accuracy, ...) of the interactions grouped by the running frequency of the
  user (item) at that interaction, rare to popular (the paper's "performance comparison with frequency").

Where tfemb simplifies or differs from the authors' code (where the paper and the code differ, tfemb follows the
paper):

- One decision per distinct id and batch (its state at its last occurrence in the batch); the code decides per
  row and keeps the last row's size.
- Ids already at ``d_n`` have no choice and are left out of the REINFORCE loss; the code forces their action to
  "unchange" and still weights its log-probability by the reward.
- The reward is the paper's (the code's ``Reward_Base="ave_loss"``: ``(1 − L) − (1 − mean)``); ``L`` of an id is
  the mean loss of its rows in the validation batch, and the REINFORCE sum weights each id by its number of rows
  (the code sums over rows).
- The validation loss ``L`` at the sampled sizes is computed at the current sizes: the code's tentative
  enlargement writes ``W e_k + b`` into the larger table, which the chain lifts to exactly the vector the id had,
  so ``L`` is the same number either way. A consequence worth knowing (true of the authors' code too): ``L``, and
  hence ``R``, does not depend on the sampled action, so the REINFORCE gradient has zero mean at every state:
  in expectation the policies do not learn from this step, they drift with the estimate's noise. tfemb keeps the
  published procedure; ``reinforce_loss`` and the update are standard and are tested on controlled rewards.
- Sampling uses a stateless generator keyed by ``(seed, feature, step)``, so a run is reproducible and
  resumable.
- Batch normalisation runs in training mode (batch statistics) in both steps' policy and model forward passes,
  as the authors' modules, which are never put in eval mode.
"""

import time

import numpy as np
import tensorflow as tf

from tfemb._keras import IS_KERAS_3, TrackedCollectionsCheckpoint, dataset_fit_kwargs, keras, register
from tfemb.autoemb import (
    PREVIOUS_BATCH, _batch_metrics, build_optimizers_to_load, cached_stream_step, per_example_loss,
    previous_batch_stream, refuse_wrapper_save, scheme_layers, stream_summary, stream_test_start,
)
from tfemb.layers.autoemb_controller import POPULARITY_ENCODINGS, num_popularity_buckets, popularity_buckets
from tfemb.layers.batch_norm import batch_norm
from tfemb.layers.embedding_scheme import check_positive_int, sparse_gather
from tfemb.layers.esapn_embedding import ESAPNEmbedding
from tfemb.models.rec_model import WeightedLossMixin
from tfemb.optimizers import replicas_in_sync

#: Policy actions, in the order of the policy's logits (the code's "remain dim, increase dim").
ACTIONS = ("unchange", "enlarge")
UNCHANGE, ENLARGE = 0, 1


# ------------------------------------------------------------------------------------------------ policy
def _glorot_part(kernel_initializer, fan_in, fan_out, index):
    """Glorot-uniform over a whole first layer (``fan_in`` inputs) for one of its stored parts."""
    if isinstance(kernel_initializer, keras.initializers.GlorotUniform):
        limit = float(np.sqrt(6.0 / (fan_in + fan_out)))
        seed = kernel_initializer.get_config().get("seed")
        return keras.initializers.RandomUniform(-limit, limit, seed=None if seed is None else int(seed) + index)
    # A new instance per weight: under Keras 2 one unseeded instance returns the same values at every call.
    return type(kernel_initializer).from_config(kernel_initializer.get_config())


@register
class ESAPNPolicy(keras.layers.Layer):
    """The embedding size adjustment policy network: logits of (unchange, enlarge) from an id's state.

    The authors' ``Policy`` (zgahhblhc/ESAPN ``model/train.py``; default ``Policy_Type=1``)::

        p = BN(P[bucket(f)])                    (popularity_embedding_dim > 0; one_hot(bucket(f)) otherwise)
        h = tanh(BN([p, one_hot(e)(, loss)] · W_1 + b_1))                       # [batch, hidden_units]
        logits = h · W_2 + b_2                                                  # [batch, 2]

    ``f`` is the id's frequency (interactions so far), bucketed by ``popularity_buckets`` (the count itself up to
    ``max_popularity``, or one bucket per doubling); ``e`` the index of its current size. The one-hot products
    are computed as row gathers of the kernels.

    Args:
        num_sizes: int >= 1, ``n``, the number of candidate sizes.
        popularity_encoding: ``"one_hot"`` (default: ``min(f, max_popularity)``) or ``"log2"``.
        max_popularity: int >= 1, the cap of the frequency buckets. Default 1000.
        popularity_embedding_dim: int >= 0: a learned embedding of the frequency bucket with batch
            normalisation (default 32, the authors' ``Setting_Popularity[1]``), or 0 for the one-hot bucket
            itself (the code's ``Policy_Type`` 3-5).
        hidden_units: int >= 1, width of the hidden layer. Default 512 (authors' code).
        use_last_loss: bool, whether the state includes the id's last loss. Default False (the paper's
            ``s = (f, e)``, the code's default type).
        batch_norm_momentum: momentum of the batch normalisations. Default 0.9 (PyTorch's default).
        kernel_initializer: initializer of the kernels. Default ``"glorot_uniform"``.

    Input:
        tuple ``(frequency, size_index, last_loss)``: int ``[batch]``, int ``[batch]`` in ``[0, n)``, float
        ``[batch]``.

    Output shape:
        ``[batch, 2]`` float32 logits.

    Example:

    >>> policy = ESAPNPolicy(num_sizes=3, max_popularity=11, popularity_embedding_dim=5, hidden_units=7)
    >>> policy((tf.constant([0, 4, 90]), tf.constant([0, 1, 2]), tf.ones([3]))).shape
    TensorShape([3, 2])
    """

    def __init__(self, num_sizes, popularity_encoding="one_hot", max_popularity=1000, popularity_embedding_dim=32,
                 hidden_units=512, use_last_loss=False, batch_norm_momentum=0.9, kernel_initializer="glorot_uniform",
                 **kwargs):
        super().__init__(**kwargs)
        self.num_sizes = check_positive_int("num_sizes", num_sizes)
        if popularity_encoding not in POPULARITY_ENCODINGS:
            raise ValueError(f"popularity_encoding must be one of {POPULARITY_ENCODINGS}. "
                             f"Received: popularity_encoding={popularity_encoding!r}")
        self.popularity_encoding = popularity_encoding
        self.max_popularity = check_positive_int("max_popularity", max_popularity)
        self.popularity_embedding_dim = check_positive_int("popularity_embedding_dim", popularity_embedding_dim, 0)
        self.hidden_units = check_positive_int("hidden_units", hidden_units)
        self.use_last_loss = bool(use_last_loss)
        momentum = batch_norm_momentum
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"batch_norm_momentum must be a number in [0, 1). "
                             f"Received: batch_norm_momentum={momentum!r}")
        self.batch_norm_momentum = float(momentum)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.num_buckets = num_popularity_buckets(self.popularity_encoding, self.max_popularity)
        self.popularity_norm = None
        if self.popularity_embedding_dim:
            self.popularity_norm = keras.layers.BatchNormalization(momentum=self.batch_norm_momentum,
                                                                   name="popularity_batch_norm")
        self.hidden_norm = keras.layers.BatchNormalization(momentum=self.batch_norm_momentum, name="hidden_batch_norm")
        self.output_layer = keras.layers.Dense(len(ACTIONS), kernel_initializer=self.kernel_initializer, name="logits")

    def build(self, input_shape=None):
        h, p = self.hidden_units, self.popularity_embedding_dim
        width = p or self.num_buckets
        fan_in = width + self.num_sizes + int(self.use_last_loss)
        if p:
            # nn.Embedding's N(0, 1) initialisation, as the authors' popularity embedding.
            self.popularity_embeddings = self.add_weight(
                name="popularity_embeddings", shape=(self.num_buckets, p),
                initializer=keras.initializers.RandomNormal(stddev=1.0))
            self.popularity_norm.build((None, p))
        self.popularity_kernel = self.add_weight(name="popularity_kernel", shape=(width, h),
                                                 initializer=_glorot_part(self.kernel_initializer, fan_in, h, 0))
        self.size_kernel = self.add_weight(name="size_kernel", shape=(self.num_sizes, h),
                                           initializer=_glorot_part(self.kernel_initializer, fan_in, h, 1))
        self.loss_kernel = None
        if self.use_last_loss:
            self.loss_kernel = self.add_weight(name="loss_kernel", shape=(1, h),
                                               initializer=_glorot_part(self.kernel_initializer, fan_in, h, 2))
        self.hidden_bias = self.add_weight(name="hidden_bias", shape=(h,), initializer="zeros")
        self.hidden_norm.build((None, h))
        self.output_layer.build((None, h))
        self.built = True

    def call(self, inputs, training=None):
        if not isinstance(inputs, (tuple, list)) or len(inputs) != 3:
            raise ValueError(f"{self.name}: inputs must be a tuple (frequency, size_index, last_loss). "
                             f"Received: {type(inputs).__name__}")
        frequency, size_index, last_loss = (tf.convert_to_tensor(t) for t in inputs)
        dtype = self.compute_dtype
        buckets = popularity_buckets(tf.cast(frequency, tf.int64), self.popularity_encoding, self.max_popularity)
        if self.popularity_embedding_dim:
            popularity = batch_norm(self.popularity_norm,
                                    tf.cast(sparse_gather(self.popularity_embeddings, buckets), dtype), training)
            hidden = tf.matmul(popularity, tf.cast(self.popularity_kernel, dtype))
        else:
            hidden = tf.cast(sparse_gather(self.popularity_kernel, buckets), dtype)
        hidden += tf.cast(sparse_gather(self.size_kernel, tf.cast(size_index, tf.int64)), dtype)
        if self.loss_kernel is not None:
            hidden += tf.cast(last_loss, dtype)[:, tf.newaxis] * tf.cast(self.loss_kernel, dtype)
        hidden = tf.tanh(batch_norm(self.hidden_norm, hidden + tf.cast(self.hidden_bias, dtype), training))
        return tf.cast(self.output_layer(hidden), tf.float32)  # [batch, 2]

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], len(ACTIONS))

    def load_own_variables(self, store):
        """``.weights.h5`` loading: weights of a policy of other arguments fail naming this policy, its arguments and
        both variable shapes. (Keras 3 loads the policy once per path the wrapper holds it under and retries under
        the next when the first fails: the retry re-raises the first error instead of Keras' "received 0
        variables".)"""
        previous = self.__dict__.get("_load_error")
        if len(store.keys()) == 0 and previous is not None:
            raise previous
        own = (list(self._trainable_variables) + list(self._non_trainable_variables) if IS_KERAS_3
               else list(self._trainable_weights) + list(self._non_trainable_weights))
        saved = [tuple(int(n) for n in store[str(i)].shape) for i in range(len(store.keys()))]
        if saved != [tuple(v.shape) for v in own]:
            names = [getattr(v, "path", v.name).split("/")[-1].split(":")[0] for v in own]
            error = ValueError(
                f"{self.name}: the saved weights do not fit this ESAPNPolicy (num_sizes={self.num_sizes}, "
                f"hidden_units={self.hidden_units}, popularity_embedding_dim={self.popularity_embedding_dim}, "
                f"use_last_loss={self.use_last_loss}, popularity_encoding={self.popularity_encoding!r}, "
                f"max_popularity={self.max_popularity}): saved variable shapes {saved}, this policy's "
                f"{dict(zip(names, (tuple(v.shape) for v in own)))}. They come from an ESAPNSearch of other policy "
                "arguments (policy_units, popularity_embedding_dim, use_last_loss, popularity_encoding, "
                "max_popularity) or candidate sizes: build the search with the saved one's arguments")
            object.__setattr__(self, "_load_error", error)
            raise error
        object.__setattr__(self, "_load_error", None)
        super().load_own_variables(store)

    def get_config(self):
        config = super().get_config()
        config.update({
            "num_sizes": self.num_sizes,
            "popularity_encoding": self.popularity_encoding,
            "max_popularity": self.max_popularity,
            "popularity_embedding_dim": self.popularity_embedding_dim,
            "hidden_units": self.hidden_units,
            "use_last_loss": self.use_last_loss,
            "batch_norm_momentum": self.batch_norm_momentum,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        })
        return config


# --------------------------------------------------------------------------------------- reward, REINFORCE
def reinforce_loss(logits, actions, rewards, weights=None):
    """REINFORCE's surrogate loss ``−Σ_i w_i · R_i · log π(a_i | s_i)`` (the code's ``CrossEntropy · reward``).

    Args:
        logits: float ``[m, 2]`` policy logits.
        actions: int ``[m]``, the actions taken (0 unchange, 1 enlarge).
        rewards: float ``[m]``; not differentiated.
        weights: optional float ``[m]`` (e.g. rows per id, 0 to leave an id out).
    """
    logits = tf.cast(logits, tf.float32)
    rewards = tf.stop_gradient(tf.cast(rewards, tf.float32))
    nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(actions, tf.int32), logits=logits)
    terms = nll * rewards
    if weights is not None:
        terms *= tf.cast(weights, tf.float32)
    return tf.reduce_sum(terms)


def sample_actions(logits, seed):
    """Actions ``a ~ softmax(logits)`` (int32 ``[m]``) from a stateless generator with ``seed`` (int ``[2]``)."""
    enlarge = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)[:, ENLARGE]
    draw = tf.random.stateless_uniform(tf.shape(enlarge), seed=tf.cast(seed, tf.int64), dtype=tf.float32)
    return tf.cast(draw < enlarge, tf.int32)


def rewards(layer, flat_ids, flat_losses):
    """The paper's reward of each distinct id: ``R = (1/T') Σ_{t=1..T'} L_t − L``.

    ``L_t`` are the id's recorded losses (most recent first, ``T' = min(recorded, T)``); ``L`` is the mean of
    ``flat_losses`` over the id's occurrences in ``flat_ids``.

    Returns:
        ``(unique [u], occurrences [u], rewards [u], has_history [u] bool)``; ids with no recorded loss get 0.
    """
    unique, position, occurrences, _ = layer.batch_ids(flat_ids)
    current = tf.math.unsorted_segment_mean(tf.cast(flat_losses, tf.float32), position, tf.size(unique))
    baseline, has_history = layer.recent_loss_mean(unique)
    return unique, occurrences, tf.where(has_history, baseline - current, tf.zeros_like(current)), has_history


# ------------------------------------------------------------------------------------------------ helpers
def esapn_layers(model):
    """``{feature: ESAPNEmbedding}`` of a ``RecModel`` (or of the model an ``ESAPNSearch`` wraps)."""
    return scheme_layers(model, ESAPNEmbedding)


def _all_gather(value):
    """``value`` of every replica concatenated on axis 0 (itself on one replica): each replica then applies the same
    state updates, so the per-id state stays identical across replicas."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return value
    return ctx.all_gather(value, axis=0)


def _frequency(layer, unique, occurrences):
    """The state's ``f``: counts so far, plus this batch's occurrences when the batch is not recorded yet."""
    counts = sparse_gather(layer.counts, unique)
    return counts + occurrences if occurrences is not None and layer.popularity == "stream" else counts


# ---------------------------------------------------------------------------------------------- the search
class ESAPNSearch(WeightedLossMixin, TrackedCollectionsCheckpoint, keras.Model):
    """Trains a ``RecModel`` whose user / item embeddings are ``ESAPNEmbedding`` layers, policies alternating.

    ``train_step`` (Keras ``fit``) and ``stream_step`` (``stream_fit``) run, per batch: the policy step on the
    previous batch, then the model step on the current one (module docstring). Without ESAPN layers (a FIXED
    baseline) only the plain model step runs, so baselines share ``stream_fit``.

    Save and export the wrapped model (``search.rec_model``): it holds the embeddings and the per-id state; the
    wrapper holds the policies (one per ESAPN feature, ``search.policies``), their optimizer and the step count. To
    pause and resume a search, checkpoint the wrapper (``tf.train.Checkpoint(search=...)``, ``save_weights`` /
    ``load_weights``) and restore it into a compiled wrapper of the same arguments (docs/methods.md, "Checkpointing
    and resuming a search").

    Sample weights (``(x, y, w)`` batches) weight the model step's loss and the metrics, as in Keras. The policy
    step and the per-id state are unweighted: every row counts as one interaction of its ids and leaves its own
    loss in their loss history, whatever its weight (the paper's streams have no weights).

    Args:
        model: a tfemb ``RecModel``.
        validation: ``"previous_batch"`` (default, the code's ``Val_Type="last_batch"``) or None (no policy
            updates: sizes follow the initial policy).
        policy_update_every: int >= 1, a policy step every this many batches. Default 1 (authors' code).
        seed: int, seed of the action sampling. Default 0.
        policy_units, popularity_encoding, max_popularity, popularity_embedding_dim, use_last_loss,
        policy_batch_norm_momentum: ``ESAPNPolicy`` arguments (``hidden_units``, ...; defaults 512, ``"one_hot"``,
            1000, 32, False, 0.9).

    ``compile(optimizer="adam", policy_optimizer=None, loss=None, metrics=None, ...)``: ``optimizer`` trains the
    recommender (the code: Adam 1e-3), ``policy_optimizer`` the policies (default Adam 1e-4, the code's
    ``LR_darts``); loss and metrics default to the task's (``tfemb.tasks``).

    Under a multi-replica ``tf.distribute`` strategy every replica gathers the batch's ids and losses of all
    replicas (``all_gather``) and applies the same decisions and state updates, so the per-id state stays identical
    on every replica; a skipped policy step (first batch, ``policy_update_every``) is a step with zero gradients
    there, since a synchronising step cannot sit in a ``tf.cond``.

    Example::

        def make(name, vocabulary_size, frequencies):
            return ESAPNEmbedding(vocabulary_size, candidate_dims=(2, 4, 8, 16, 64, 128), name=f"{name}_embedding")

        model = CFNetwork(schema, embeddings={"user_id": make, "item_id": make}, embedding_dim=128)
        search = ESAPNSearch(model)
        search.compile(optimizer=keras.optimizers.Adam(1e-3))
        result = stream_fit(search, x, y, batch_size=500)   # time-ordered rows
        export_saved_model(model, "exports/esapn")
    """

    def __init__(self, model, validation=PREVIOUS_BATCH, policy_update_every=1, seed=0, policy_units=512,
                 popularity_encoding="one_hot", max_popularity=1000, popularity_embedding_dim=32, use_last_loss=False,
                 policy_batch_norm_momentum=0.9, **kwargs):
        super().__init__(**kwargs)
        from tfemb.models.rec_model import RecModel

        if not isinstance(model, RecModel):
            raise TypeError(f"model must be a tfemb RecModel. Received: {type(model).__name__}")
        if validation not in (PREVIOUS_BATCH, None):
            raise ValueError(f"validation must be {PREVIOUS_BATCH!r} or None. Received: validation={validation!r}")
        self.rec_model = model
        self.validation = validation
        self.policy_update_every = check_positive_int("policy_update_every", policy_update_every)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an int. Received: seed={seed!r}")
        self.seed = int(seed)
        self.policy_config = {"hidden_units": policy_units, "popularity_encoding": popularity_encoding,
                              "max_popularity": max_popularity, "popularity_embedding_dim": popularity_embedding_dim,
                              "use_last_loss": use_last_loss, "batch_norm_momentum": policy_batch_norm_momentum}
        if not model.built:
            model.build()
        layers = esapn_layers(model)
        self.feature_names = list(layers)
        self.policies = {name: ESAPNPolicy(layer.num_candidates, name=f"{name}_policy", **self.policy_config)
                         for name, layer in layers.items()}
        for policy in self.policies.values():
            with tf.name_scope(policy.name):  # Keras 2: its variables' names carry the policy (built outside a call)
                policy.build()
        self.policy_updates = self.add_weight(name="policy_updates", shape=(), dtype="int64", initializer="zeros",
                                              trainable=False)
        self.policy_optimizer = None
        object.__setattr__(self, "_stream_functions", {})
        self.built = True

    @property
    def uses_policy(self):
        return self.validation == PREVIOUS_BATCH and bool(self.feature_names)

    def call(self, inputs, training=None):
        if isinstance(inputs, (tuple, list)) and len(inputs) == 2 and isinstance(inputs[0], dict):
            inputs = inputs[0]  # (x, previous batch): the input structure of fit's paired stream
        return self.rec_model(inputs, training=training)

    def build(self, input_shape=None):
        self.built = True

    def esapn_layers(self):
        return esapn_layers(self.rec_model)

    def policy_variables(self):
        return [v for name in self.feature_names for v in self.policies[name].trainable_variables]

    def compile(self, optimizer="adam", policy_optimizer=None, loss=None, metrics=None, **kwargs):
        from tfemb.tasks import task_loss, task_metrics

        task = self.rec_model.task
        super().compile(optimizer=optimizer, loss=task_loss(task) if loss is None else loss,
                        metrics=task_metrics(task) if metrics is None else metrics, **kwargs)
        if policy_optimizer is None:
            policy_optimizer = keras.optimizers.Adam(learning_rate=1e-4)
        elif isinstance(policy_optimizer, str):
            policy_optimizer = keras.optimizers.get(policy_optimizer)
        self.policy_optimizer = policy_optimizer
        self._stream_functions.clear()

    def _build_optimizers(self):
        """Creates the optimizers' slots eagerly (never inside a traced step or a ``tf.cond`` branch)."""
        if self.optimizer is None:
            raise RuntimeError("compile() the ESAPNSearch before training it")
        strategy = getattr(self, "distribute_strategy", None) or tf.distribute.get_strategy()
        with tf.init_scope(), strategy.scope():
            if not getattr(self.optimizer, "built", False) or not IS_KERAS_3:
                self.optimizer.build(self.rec_model.trainable_variables)
            if self.uses_policy and (not getattr(self.policy_optimizer, "built", False) or not IS_KERAS_3):
                self.policy_optimizer.build(self.policy_variables())

    # ----------------------------------------------------------------------------------------------- steps
    def policy_step(self, x_prev, y_prev, gate=None):
        """One REINFORCE step of every policy on the previous batch; returns ``(loss, {feature: (mean reward,
        mean enlarge probability)})``.

        ``gate`` (a bool tensor) is for multi-replica strategies, where a step cannot sit in a ``tf.cond`` (it
        synchronises the replicas): False multiplies the loss, hence the gradients, by 0 and does not count the
        step. With Adam a zero gradient still applies the moments' decay (none before the first real step)."""
        layers = self.esapn_layers()
        y_pred = self.rec_model(x_prev, training=True)  # the model after its step on this batch (code: train mode)
        row_losses = tf.stop_gradient(per_example_loss(self.loss, y_prev, y_pred))
        step = tf.convert_to_tensor(self.policy_updates)
        variables = self.policy_variables()
        stats = {}
        with tf.GradientTape() as tape:
            terms = []
            for i, name in enumerate(self.feature_names):
                layer, policy = layers[name], self.policies[name]
                flat, flat_losses = layer.valid_ids(x_prev[name], row_losses)
                flat, flat_losses = _all_gather(flat), _all_gather(flat_losses)
                unique, occurrences, reward, has_history = rewards(layer, flat, flat_losses)
                sizes = sparse_gather(layer.size_index, unique)
                logits = policy((_frequency(layer, unique, None), sizes, layer.last_losses(unique)), training=True)
                actions = sample_actions(logits, tf.stack([tf.constant(self.seed + 7919 * i, tf.int64), step]))
                choice = tf.logical_and(has_history, sizes < layer.num_candidates - 1)  # ids at d_n have none
                weights = tf.where(choice, tf.cast(occurrences, tf.float32), tf.zeros_like(reward))
                terms.append(reinforce_loss(logits, actions, reward, weights))
                used = tf.maximum(tf.reduce_sum(tf.cast(choice, tf.float32)), 1.0)
                stats[name] = (tf.reduce_sum(tf.where(choice, reward, tf.zeros_like(reward))) / used,
                               tf.reduce_mean(tf.nn.softmax(logits)[:, ENLARGE]))
            # Every replica computes the same loss on the gathered batch; the gradients are summed over replicas.
            loss = tf.add_n(terms) / float(replicas_in_sync())
            if gate is not None:
                loss *= tf.cast(gate, loss.dtype)
        grads = tape.gradient(loss, variables)
        self.policy_optimizer.apply_gradients([(g, v) for g, v in zip(grads, variables) if g is not None])
        self.policy_updates.assign_add(1 if gate is None else tf.cast(gate, tf.int64))
        return loss, stats

    def decide_and_enlarge(self, x):
        """The model step's greedy actions: ``argmax π(·|s)`` for each distinct id of ``x``; enlarges those chosen.

        Returns ``{feature: number of ids enlarged}``."""
        layers = self.esapn_layers()
        enlarged = {}
        for name in self.feature_names:
            layer, policy = layers[name], self.policies[name]
            flat, _ = layer.valid_ids(x[name])
            unique, _, occurrences, _ = layer.batch_ids(_all_gather(flat))
            sizes = sparse_gather(layer.size_index, unique)
            logits = policy((_frequency(layer, unique, occurrences), sizes, layer.last_losses(unique)),
                            training=True)  # the code's policy is in train mode here too
            chosen = tf.boolean_mask(unique, tf.equal(tf.argmax(logits, axis=-1), ENLARGE))
            _, grown = layer.enlarge(chosen)
            enlarged[name] = tf.reduce_sum(tf.cast(grown, tf.int64))
        return enlarged

    def model_step(self, x, y, sample_weight=None):
        """Greedy enlargement, one step of the recommender on ``(x, y)``, then the per-id state.

        Returns ``(y_pred, loss, per-example losses, {feature: ids enlarged})``; ``y_pred`` is computed before the
        update (in a stream, the batch's test prediction) and after this batch's enlargements."""
        enlarged = self.decide_and_enlarge(x) if self.feature_names else {}
        variables = self.rec_model.trainable_variables
        with tf.GradientTape() as tape:
            y_pred = self.rec_model(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
        self.rec_model.apply_split_gradients(zip(tape.gradient(loss, variables), variables), self.optimizer)
        per_example = tf.stop_gradient(per_example_loss(self.loss, y, y_pred))
        layers = self.esapn_layers()
        for name in self.feature_names:
            layers[name].record_losses(_all_gather(x[name]), _all_gather(per_example))
        return y_pred, loss, per_example, enlarged

    def _take_policy_step(self):
        """Whether this batch has a policy step (every ``policy_update_every`` batches)."""
        return tf.equal(tf.math.floormod(self.optimizer.iterations, self.policy_update_every), 0)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if self.uses_policy:
            x, (x_prev, y_prev, has_prev) = x
            # Every replica must take the same branch (the policy step gathers across replicas).
            has_prev = tf.reduce_any(_all_gather(tf.reshape(tf.cast(has_prev, tf.int32), [-1])) > 0)
            run = tf.logical_and(has_prev, self._take_policy_step())
            if replicas_in_sync() > 1:
                self.policy_step(x_prev, y_prev, gate=run)
            else:
                tf.cond(run, lambda: self.policy_step(x_prev, y_prev)[0], lambda: tf.constant(0.0))
        y_pred, loss, _, _ = self.model_step(x, y, sample_weight)
        self.track_loss(loss, x)
        return self.compute_metrics(x, y, y_pred, sample_weight)

    def fit(self, x=None, y=None, **kwargs):
        """Keras ``fit`` on a ``tf.data.Dataset`` of time-ordered ``(x, y)`` batches; each batch's previous one is
        paired with it for the policy step."""
        self.rec_model.check_embedding_optimizer_replicas(self.distribute_strategy)
        self._build_optimizers()
        if IS_KERAS_3 and isinstance(x, tf.data.Dataset) and self.distribute_strategy.num_replicas_in_sync > 1:
            self.build_compiled_under_strategy(x)
        if self.uses_policy:
            if not isinstance(x, tf.data.Dataset):
                raise TypeError("ESAPNSearch.fit needs a tf.data.Dataset of (x, y) batches (the policy step reads the "
                                f"previous batch). Received: {type(x).__name__}")
            previous = previous_batch_stream(x, repeat=False).map(
                # A per-row int flag: it splits across replicas (Keras 3 also averages a first batch to build).
                lambda xp, yp, flag: (xp, yp, tf.fill(tf.shape(yp)[:1], tf.cast(flag, tf.int32))))
            # Elements ((x, previous batch), y[, sample_weight]): Keras sees x, y and weights where it expects them.
            x = tf.data.Dataset.zip((x, previous)).map(
                lambda current, prev: ((current[0], prev),) + tuple(current[1:]))
        self.train_function = None
        return super().fit(x, y, **dataset_fit_kwargs(x, kwargs))

    def stream_step(self, x, y, x_prev=None, y_prev=None):
        """One test-then-train step (``stream_fit``): the policy step on ``(x_prev, y_prev)`` when given, then the
        model step on ``(x, y)``. Returns tensors ``(y_pred, per-example losses, {feature: ids enlarged},
        policy stats or {})``."""
        key = x_prev is not None and self.uses_policy
        if not key:
            x_prev, y_prev = x, y  # unused placeholders with the same structure

        def step(with_policy):
            def fn(x, y, x_prev, y_prev):
                stats = {}
                if with_policy:
                    _, stats = self.policy_step(x_prev, y_prev)
                y_pred, _, per_example, enlarged = self.model_step(x, y)
                return y_pred, per_example, enlarged, stats
            return fn

        return cached_stream_step(self, key, step, (x, y, x_prev, y_prev))

    def stream_batch(self, t, x, y, previous=None):
        """Batch ``t`` of a stream as ``stream_fit`` steps it: the policy step on ``previous`` (the previous batch
        ``(x, y)``) every ``policy_update_every`` batches, then the model step (``stream_step``)."""
        if previous is not None and t % self.policy_update_every == 0:
            return self.stream_step(x, y, *previous)
        return self.stream_step(x, y)

    def load_weights(self, filepath, *args, **kwargs):
        """Keras ``load_weights``; a compiled wrapper's optimizers are built first, so that the optimizer state of
        the file (``.weights.h5``: Keras skips the state of an optimizer not built yet, with a warning) is loaded."""
        build_optimizers_to_load(self)
        return super().load_weights(filepath, *args, **kwargs)

    def get_config(self):
        policy = dict(self.policy_config)
        return {"name": self.name, "validation": self.validation, "policy_update_every": self.policy_update_every,
                "seed": self.seed, "policy_units": policy.pop("hidden_units"),
                "policy_batch_norm_momentum": policy.pop("batch_norm_momentum"), **policy,
                "model": keras.utils.serialize_keras_object(self.rec_model)}

    def save(self, filepath, *args, **kwargs):
        refuse_wrapper_save(self, filepath)


# ------------------------------------------------------------------------------------------------ reports
def memory_report(model, seen_only=False):
    """Per ESAPN feature: how many ids ended at each candidate size, and their dimensions against FIXED at d_n.

    Args:
        model: a ``RecModel`` or ``ESAPNSearch``.
        seen_only: count only ids with a recorded interaction (``counts > 0``); default False: every id of the
            vocabulary (what the export stores, as the paper's table, where every user occurs).

    Returns:
        ``{feature: {"ids_per_dim": {d: ids}, "ids", "total_dims" (Σ ids·d), "fixed_dims" (ids·d_n), "ratio",
        "transform_parameters" (chain + normalisation of the export), "parameters" (``parameter_count()``)}}``.
    """
    out = {}
    for name, layer in esapn_layers(model).items():
        dims = layer.dims_per_id()
        if seen_only:
            dims = dims[np.asarray(tf.convert_to_tensor(layer.counts)) > 0]
        total = int(dims.sum())
        fixed = int(len(dims) * layer.output_dim)
        out[name] = {
            "ids_per_dim": {int(d): int((dims == d).sum()) for d in layer.candidate_dims},
            "ids": int(len(dims)),
            "total_dims": total,
            "fixed_dims": fixed,
            "ratio": total / fixed if fixed else float("nan"),
            "transform_parameters": layer.transform_parameter_count(),
            "parameters": int(layer.parameter_count()),
        }
    return out


def memory_table(report):
    """The memory report as a Markdown table (one row per feature), laid out as the paper's."""
    if not report:
        return ""
    dims = sorted({d for row in report.values() for d in row["ids_per_dim"]})
    lines = ["| feature | " + " | ".join(str(d) for d in dims) + " | total dim | FIXED | ratio |",
             "|---|" + "---:|" * (len(dims) + 3)]
    for name, row in report.items():
        cells = [f"{row['ids_per_dim'].get(d, 0):,}" for d in dims]
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {row['total_dims']:,} | {row['fixed_dims']:,} | {100 * row['ratio']:.2f}% |")
    return "\n".join(lines)


def _row_metrics(task, y, p, losses):
    """Per-row quality arrays (the row form of ``tfemb.autoemb._batch_metrics``)."""
    y = np.asarray(y)
    p = np.asarray(p, dtype=np.float64)
    out = {"loss": np.asarray(losses, np.float64)}
    if task == "binary":
        out["accuracy"] = ((p > 0.5) == (y > 0.5)).astype(np.float64)
        out["mse"] = (p - y) ** 2
    elif task == "multiclass":
        out["accuracy"] = (np.argmax(p, axis=-1) == y.astype(np.int64).reshape(-1)).astype(np.float64)
    else:
        out["mse"] = (p - y) ** 2
        out["mae"] = np.abs(p - y)
    return out


def _running_counts(counts, ids):
    """Each row's running count of its id (1 at the id's first interaction), updating ``counts`` in place."""
    order = np.argsort(ids, kind="stable")
    ordered = ids[order]
    first = np.ones(len(ids), bool)
    first[1:] = ordered[1:] != ordered[:-1]
    start = np.maximum.accumulate(np.where(first, np.arange(len(ids)), 0))
    running = np.empty(len(ids), np.int64)
    running[order] = counts[ordered] + (np.arange(len(ids)) - start) + 1
    np.add.at(counts, ids, 1)
    return running


class FrequencyReport:
    """Accumulates per-row quality by the running frequency of an id at each interaction, in buckets.

    Buckets are ``[e_j, e_{j+1})`` of ``edges`` (default powers of two: 1, 2-3, 4-7, ...; frequencies below the
    first edge are dropped). ``add`` takes one batch (running counts per row and per-row metric arrays);
    ``result()`` returns ``[{"frequency": "4-7", "min": 4, "max": 7, "rows": n, "<metric>": mean, ...}]`` for the
    non-empty buckets, rare to popular (``max`` is None for the open last bucket of explicit edges).
    """

    def __init__(self, edges=None):
        if edges is not None:
            edges = sorted(int(e) for e in edges)
            if not edges or edges[0] < 1 or len(set(edges)) != len(edges):
                raise ValueError(f"frequency edges must be distinct ints >= 1. Received: edges={edges!r}")
        self.edges = None if edges is None else np.asarray(edges, np.int64)
        self._rows, self._sums = {}, {}

    def bucket(self, frequency):
        """Bucket index of each frequency (-1: below the first edge)."""
        frequency = np.maximum(np.asarray(frequency, np.int64), 1)
        if self.edges is None:
            return np.floor(np.log2(frequency)).astype(np.int64)
        return np.searchsorted(self.edges, frequency, side="right") - 1

    def _range(self, b):
        if self.edges is None:
            return 2 ** b, 2 ** (b + 1) - 1
        high = int(self.edges[b + 1]) - 1 if b + 1 < len(self.edges) else None
        return int(self.edges[b]), high

    def add(self, frequency, metrics):
        buckets = self.bucket(frequency)
        for b in np.unique(buckets[buckets >= 0]).tolist():
            rows = buckets == b
            self._rows[b] = self._rows.get(b, 0) + int(rows.sum())
            sums = self._sums.setdefault(b, {})
            for key, values in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(np.asarray(values, np.float64)[rows].sum())

    def result(self):
        out = []
        for b in sorted(self._rows):
            low, high = self._range(b)
            label = f"{low}" if high == low else (f"{low}+" if high is None else f"{low}-{high}")
            row = {"frequency": label, "min": low, "max": high, "rows": self._rows[b]}
            row.update({k: v / self._rows[b] for k, v in self._sums[b].items()})
            out.append(row)
        return out


def frequency_report(features, y, y_pred, losses, task, dims=None, edges=None, history=None):
    """Quality by frequency bucket for whole arrays (one call; ``stream_fit`` accumulates batch by batch).

    Args:
        features: ``{feature: int ids [rows]}`` in stream order; each row's frequency is the running count of
            its id up to and including that row.
        y, y_pred, losses: labels, predictions and per-example losses per row.
        task: ``"binary"``, ``"multiclass"`` or ``"regression"``.
        dims: optional ``{feature: dims [rows]}``, the id's size at each interaction (reported as ``mean_dim``).
        edges: bucket edges (default powers of two).
        history: optional ``{feature: int ids}`` of the stream's rows before these (e.g. before the test period),
            counted first, so that frequencies are running counts from the start of the stream, as
            ``stream_fit``'s (and the authors' ``user_frequency``).

    Returns:
        ``{feature: [bucket rows]}`` (see ``FrequencyReport``).
    """
    metrics = _row_metrics(task, y, y_pred, losses)
    out = {}
    for name, ids in features.items():
        ids = np.asarray(ids, np.int64)
        before = np.asarray((history or {}).get(name, np.zeros(0)), np.int64)
        size = int(max(ids.max() if ids.size else 0, before.max() if before.size else 0)) + 1
        counts = np.bincount(before, minlength=size).astype(np.int64)
        running = _running_counts(counts, ids)
        report = FrequencyReport(edges)
        extra = {} if dims is None or name not in dims else {"mean_dim": np.asarray(dims[name], np.float64)}
        report.add(running, {**metrics, **extra})
        out[name] = report.result()
    return out


# ------------------------------------------------------------------------------------------------ stream
def _cpu_seconds():
    return time.process_time()


def stream_fit(model, x, y, batch_size=500, validation=PREVIOUS_BATCH, evaluate_from=0.0, frequency_features=None,
               frequency_edges=None, log=None, log_every=50, warmup_batches=2):
    """The streaming protocol with ESAPN: one pass over time-ordered batches, each predicted first, then trained.

    For each batch ``t`` (rows in the order given: sort by time first): the policy step on batch ``t - 1`` (none
    for ``t = 0``), then the model step on batch ``t``, whose forward pass (after the batch's greedy
    enlargements, before the update) is the batch's test prediction.

    Args:
        model: an ``ESAPNSearch`` (compiled), or a compiled tfemb ``RecModel``, wrapped in an ``ESAPNSearch`` with
            its optimizer and loss (a model without ESAPN layers, e.g. FIXED, trains by the model step alone).
        x: dict of encoded feature arrays (``Schema.transform``), rows in time order.
        y: labels.
        batch_size: rows per batch. Default 500 (the authors' code).
        validation: ``"previous_batch"`` or None (no policy step; only used when wrapping a ``RecModel``).
        evaluate_from: where the test period starts, a fraction of the rows (``0.0 <= f < 1``) or a row index;
            ``test`` and ``by_frequency`` cover the batches starting at or after it, ``all`` the whole stream.
        frequency_features: features of the frequency report (default: the model's 1-D id features, e.g.
            ``user_id`` and ``item_id``).
        frequency_edges: bucket edges of the frequency report (default powers of two).
        log: optional callable for progress lines, every ``log_every`` batches.
        warmup_batches: first batches left out of the speed figures (tracing).

    Returns:
        dict: ``batches`` (per batch: ``start``, ``size``, ``loss``, the task's metrics, ``enlarged`` per feature and,
        after the first batch, ``policy`` = ``{feature: {"reward", "enlarge_probability"}}``), ``all`` and ``test``
        (example-weighted means), ``seconds`` / ``cpu_seconds``, ``examples_per_second`` and
        ``cpu_ms_per_example`` (after the warm-up batches, policy steps included), ``evaluate_from`` (row index),
        ``memory`` (``memory_report``), ``by_frequency`` (``{feature: buckets}``).
    """
    from tfemb.data.splits import stream_batches

    if isinstance(model, ESAPNSearch):
        search = model
        if search.optimizer is None:
            raise RuntimeError("compile() the ESAPNSearch before stream_fit")
    else:
        if getattr(model, "optimizer", None) is None:
            raise RuntimeError("stream_fit needs a compiled model (tfemb.tasks.compile_model)")
        search = ESAPNSearch(model, validation=validation)
        search.compile(optimizer=model.optimizer, loss=model.loss, metrics=[])
    n = len(next(iter(x.values())))
    start_test = stream_test_start(evaluate_from, n)
    rec = search.rec_model
    task = rec.task
    if frequency_features is None:
        frequency_features = [name for name in rec.embedding_names if np.asarray(x[name]).ndim == 1]
    missing = [name for name in frequency_features if name not in x]
    if missing:
        raise ValueError(f"frequency_features must be features of x. Received: {missing[0]!r}")
    running = {name: np.zeros(int(rec.embedding_layers[name].vocabulary_size) if name in rec.embedding_layers
                              else int(np.max(x[name])) + 1, np.int64) for name in frequency_features}
    by_frequency = {name: FrequencyReport(frequency_edges) for name in frequency_features}
    layers = esapn_layers(search)
    records, previous = [], None
    wall0, cpu0 = time.perf_counter(), _cpu_seconds()
    timed_rows, timed_wall, timed_cpu = 0, 0.0, 0.0
    start = 0
    for t, (xb, yb) in enumerate(stream_batches(x, y, batch_size=batch_size)):
        b_wall, b_cpu = time.perf_counter(), _cpu_seconds()
        xt = {k: tf.convert_to_tensor(v) for k, v in xb.items()}
        yt = tf.convert_to_tensor(yb)
        y_pred, losses, enlarged, stats = search.stream_batch(t, xt, yt, previous)
        p, row_losses = y_pred.numpy(), losses.numpy()
        record = {"start": start, "size": len(yb), "loss": float(np.mean(row_losses))}
        record.update(_batch_metrics(task, yb, p))
        if t >= warmup_batches:
            timed_rows += len(yb)
            timed_wall += time.perf_counter() - b_wall
            timed_cpu += _cpu_seconds() - b_cpu
        record["enlarged"] = {name: int(v) for name, v in enlarged.items()}
        if stats:
            record["policy"] = {name: {"reward": float(r), "enlarge_probability": float(q)}
                                for name, (r, q) in stats.items()}
        records.append(record)
        # The frequency report: each row's running count before / at this interaction, its id's size after the
        # batch's enlargements (the size the prediction used).
        counts = {name: _running_counts(running[name], np.asarray(xb[name], np.int64)) for name in frequency_features}
        if start >= start_test:
            metrics = _row_metrics(task, yb, p, row_losses)
            for name in frequency_features:
                extra = {}
                if name in layers:
                    ids = np.asarray(xb[name], np.int64)
                    extra["mean_dim"] = np.asarray(layers[name].candidate_dims, np.float64)[
                        np.asarray(sparse_gather(layers[name].size_index, tf.constant(ids)))]
                by_frequency[name].add(counts[name], {**metrics, **extra})
        previous = (xt, yt)
        start += len(yb)
        if log is not None and log_every and (t + 1) % log_every == 0:
            log(f"    batch {t + 1}: rows {start:,}/{n:,}, loss={record['loss']:.4f}, "
                + ", ".join(f"{k}={v:.4f}" for k, v in record.items() if isinstance(v, float) and k != "loss")
                + "".join(f", {name} dims={memory_report(search)[name]['total_dims']:,}" for name in layers))
    seconds, cpu = time.perf_counter() - wall0, _cpu_seconds() - cpu0
    metric_keys = [k for k, v in records[0].items() if isinstance(v, float)] if records else []
    out = stream_summary(records, metric_keys, start_test, seconds, cpu, timed_rows, timed_wall, timed_cpu)
    out["memory"] = memory_report(search)
    out["by_frequency"] = {name: report.result() for name, report in by_frequency.items()}
    return out
