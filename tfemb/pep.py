"""The PEP procedure around ``tfemb.layers.PEPEmbedding``: search with snapshots, lottery-ticket retrain, reports.

One search run (plain ``model.fit`` with ``PEPSnapshots`` among the callbacks) yields a pruned table for each
target size; ``retrain`` builds the model again with a snapshot's masks, rewound to the initial values (the
lottery ticket) or freshly re-initialised, and ``model.fit`` trains it::

    snaps = PEPSnapshots(targets=[0.5, 0.2, 0.1])            # keep 50%, 20%, 10% of the embedding parameters
    model.fit(train, epochs=10, callbacks=[snaps])           # search: V and thresholds s train together
    ticket = retrain(model, snaps.snapshot(0.2), mode="rewind")
    compile_model(ticket); ticket.fit(train, epochs=10)      # pruned entries stay exactly 0
    sparsity_report(ticket, schema)                          # kept fraction per field and popularity bucket
    control = retrain(model, control_snapshot(snaps.snapshot(0.2), "random"))   # a random mask, same count

References: Liu et al., "Learnable Embedding Sizes for Recommender Systems", ICLR 2021 (arXiv:2101.07577);
ssui-liu/learnable-embed-sizes-for-RecSys (``engine.py``: ``candidate_p``, ``save_pruned_embedding``;
``models/pep_embedding.py``: ``init_retrain``).
"""

import dataclasses
import math
import warnings

import numpy as np
import tensorflow as tf

from tfemb._keras import keras
from tfemb.layers.packed_embedding import to_numpy
from tfemb.layers.pep_embedding import PEPEmbedding, kept_count


# --------------------------------------------------------------------------------------------------- layers
def _flatten_layers(model):
    if hasattr(model, "_flatten_layers"):
        return list(model._flatten_layers(include_self=False, recursive=True))
    out = []
    for layer in getattr(model, "layers", []):
        out.append(layer)
        out.extend(_flatten_layers(layer))
    return out


def pep_layers(model):
    """``{name: PEPEmbedding}`` of a model, in model order.

    For a ``tfemb.models.RecModel`` the names are its feature names (the keys of ``embedding_layers``); for other
    models (functional, Sequential, nested layers) the layers' names.
    """
    embedding_layers = getattr(model, "embedding_layers", None)
    if isinstance(embedding_layers, dict) and hasattr(model, "embedding_names"):
        return {n: embedding_layers[n] for n in model.embedding_names if isinstance(embedding_layers[n], PEPEmbedding)}
    out = {}
    for layer in _flatten_layers(model):
        if isinstance(layer, PEPEmbedding) and all(layer is not seen for seen in out.values()):
            out[layer.name] = layer
    return out


def _require_pep_layers(model, what):
    layers = pep_layers(model)
    if not layers:
        raise ValueError(f"{what} needs a model with at least one PEPEmbedding layer. Received: "
                         f"{type(model).__name__} with none")
    return layers


def _dense_weights(model, layers):
    """The model's weights that are not PEP tables (MLP, linear terms, other schemes), in model order."""
    skip = {id(w) for layer in layers.values() for w in layer.weights}
    return [w for w in model.weights if id(w) not in skip]


# ------------------------------------------------------------------------------------------------ snapshots
@dataclasses.dataclass
class PEPSnapshot:
    """The pruned tables of a search at the step its non-zero count first reached ``target``.

    Attributes:
        target: the target as given (an int count, or a float fraction of the dense count to keep).
        target_count: the target as a count of non-zero embedding parameters.
        count: non-zero embedding parameters at the snapshot (``<= target_count``).
        dense_count: parameters of the unpruned tables (sum of ``vocabulary_size * output_dim``).
        step: training batches done when it was taken (1 after the first batch), over all ``fit`` calls.
        epoch: the epoch (from 0) of that batch.
        masks: ``{layer name: bool array [vocabulary_size, output_dim]}``, the kept entries.
        initial_values: ``{layer name: float array}``, the tables' values before the search (shared by the
            snapshots of one callback, not copied), or None.
        initial_weights: the model's other weights before the search (in model order), or None.
    """

    target: object
    target_count: int
    count: int
    dense_count: int
    step: int
    epoch: int
    masks: dict
    initial_values: dict = None
    initial_weights: list = None

    @property
    def kept_fraction(self):
        return self.count / self.dense_count if self.dense_count else 0.0

    def save(self, path):
        """Writes the snapshot to a ``.npz`` file (masks, initial values and weights, metadata)."""
        arrays = {f"mask/{name}": mask for name, mask in self.masks.items()}
        for name, value in (self.initial_values or {}).items():
            arrays[f"initial/{name}"] = value
        for i, value in enumerate(self.initial_weights or []):
            arrays[f"weight/{i:06d}"] = value
        meta = {"target": self.target, "target_count": self.target_count, "count": self.count,
                "dense_count": self.dense_count, "step": self.step, "epoch": self.epoch}
        np.savez_compressed(path, __meta__=np.asarray(repr(meta)), **arrays)

    @classmethod
    def load(cls, path):
        import ast

        with np.load(path, allow_pickle=False) as data:
            meta = ast.literal_eval(str(data["__meta__"]))
            masks, initial, weights = {}, {}, []
            for key in data.files:
                if key.startswith("mask/"):
                    masks[key[5:]] = data[key].astype(bool)
                elif key.startswith("initial/"):
                    initial[key[8:]] = data[key]
            weights = [data[k] for k in sorted(k for k in data.files if k.startswith("weight/"))]
        return cls(masks=masks, initial_values=initial or None, initial_weights=weights or None, **meta)


def _check_targets(targets):
    if isinstance(targets, (int, float, np.integer, np.floating)):
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise ValueError("targets must name at least one target size. Received: []")
    for t in targets:
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, float, np.integer, np.floating)):
            raise ValueError(f"targets must be ints (parameter counts) or floats in (0, 1) (fractions of the dense "
                             f"count to keep). Received: {t!r}")
        if isinstance(t, (int, np.integer)) and t < 0:
            raise ValueError(f"a target parameter count must be >= 0. Received: {t}")
        if isinstance(t, (float, np.floating)) and not (0.0 < t < 1.0):
            raise ValueError(f"a target fraction must be in (0, 1) (the share of parameters kept; use an int for a "
                             f"count). Received: {t}")
    targets = [float(t) if isinstance(t, (float, np.floating)) else int(t) for t in targets]
    if len(set((type(t), t) for t in targets)) != len(targets):
        raise ValueError(f"targets must be distinct. Received: {targets}")
    return targets


def grouped_nonzero_count(layers):
    """The sum of ``layer.nonzero_count_tensor()`` over ``layers`` (an int64 tensor), with the same elementwise
    ops (so the same count, exactly) but fewer of them: the ``[V | s]`` rows of the layers whose
    ``count_operands()`` has them are stacked per ``(g_scale, dtype, output_dim)``, split once into values and
    thresholds and counted at once; the others are counted one by one."""
    groups, parts = {}, []
    for layer in layers:
        rows = layer.count_operands()
        if rows is None:
            parts.append(layer.nonzero_count_tensor())
        else:
            groups.setdefault((float(layer.g_scale), rows.dtype, int(layer.output_dim)), []).append(rows)
    for (g_scale, _, _), tables in groups.items():
        rows = tables[0] if len(tables) == 1 else tf.concat(tables, axis=0)
        values, logits = tf.split(rows, 2, axis=1)
        parts.append(kept_count(values, logits, g_scale))
    return parts[0] if len(parts) == 1 else tf.add_n(parts)


class PEPSnapshots(keras.callbacks.Callback):
    """Takes the PEP masks when the model's non-zero embedding parameters first fall to each target size.

    After every ``check_every`` training batches it counts the non-zeros of every ``PEPEmbedding`` of the model
    (the pruned tables V̂, in TensorFlow, without copying them out); the first time the count is ``<=`` a target,
    it stores a ``PEPSnapshot`` (per-layer masks, step, epoch, count). One run thus gives several pruned tables
    without restarting, as the official code's ``candidate_p``. Targets are parameter counts (ints) or
    fractions of the dense count to keep (floats in (0, 1): 0.5, 0.2, 0.1, 0.05, 0.01 are "50%, 80%, 90%, 95%,
    99% fewer"; a fraction ``f`` means ``floor(f * dense_count)`` parameters).

    At the end of training, targets never reached are recorded in ``unreached`` (target, target count, the
    fewest non-zeros reached and when, the final count) and a ``UserWarning`` says so.

    The search's starting point is kept for ``retrain``: with ``capture_initial=True`` (default) the tables'
    initial values (from each layer's frozen copy when it keeps one, else the tables at the start of training)
    and the model's other weights at the start of training (if the model is not built yet then, after its first
    batch, as the official code's "initial_embedding") are stored once and shared by all snapshots.

    Differences from the official ``engine.py`` (documented, deliberate):
    - When one check crosses several targets, all of them get this step's mask; the official code saves one
      target per step (the largest) and the next ones at the following steps.
    - Training goes on after the last target unless ``stop_when_done=True`` (the official code exits).

    Args:
        targets: an int / float or a list of them (see above); distinct.
        check_every: int >= 1, batches between two counts. Default 1 (the official ``log_interval``).
        layers: optional ``{name: PEPEmbedding}`` or list of layers to watch; default ``pep_layers(model)``.
        stop_when_done: set ``model.stop_training`` once every target is reached. Default False.
        capture_initial: keep the initial values and weights for ``retrain``. Default True.
        verbose: 1 prints a line per snapshot. Default 0.

    Attributes:
        snapshots: the ``PEPSnapshot`` list, in the order taken.
        unreached: dicts of the targets never reached (filled at the end of each ``fit``).
        history: ``(step, count)`` of every check.
        dense_count, min_count, last_count: parameter counts.
    """

    def __init__(self, targets, check_every=1, layers=None, stop_when_done=False, capture_initial=True, verbose=0):
        super().__init__()
        self.targets = _check_targets(targets)
        if isinstance(check_every, bool) or not isinstance(check_every, (int, np.integer)) or check_every < 1:
            raise ValueError(f"check_every must be an int >= 1. Received: check_every={check_every!r}")
        self.check_every = int(check_every)
        self._given_layers = layers
        self.stop_when_done = bool(stop_when_done)
        self.capture_initial = bool(capture_initial)
        self.verbose = int(verbose)
        self.snapshots = []
        self.unreached = []
        self.history = []
        self.step = 0
        self.epoch = 0
        self.min_count = None
        self.min_step = None
        self.last_count = None
        self.dense_count = None
        self.initial_values = None
        self.initial_weights = None
        self._layers = None
        self._reached = set()
        self._captured = False
        self._count_fn = None

    # ----------------------------------------------------------------------------------------- helpers
    def watched_layers(self):
        """``{name: PEPEmbedding}`` the callback counts."""
        if self._layers is None:
            given = self._given_layers
            if given is None:
                self._layers = _require_pep_layers(self.model, "PEPSnapshots")
            elif isinstance(given, dict):
                self._layers = dict(given)
            else:
                self._layers = {layer.name: layer for layer in given}
            bad = [n for n, layer in self._layers.items() if not isinstance(layer, PEPEmbedding)]
            if bad:
                raise TypeError(f"PEPSnapshots watches PEPEmbedding layers only. Received: {bad}")
        return self._layers

    def target_count(self, target):
        """A target as a parameter count."""
        if isinstance(target, (float, np.floating)):
            return int(math.floor(target * self.dense_count))
        return int(target)

    def pending(self):
        """Targets not reached yet, largest count first."""
        out = [t for i, t in enumerate(self.targets) if i not in self._reached]
        return sorted(out, key=self.target_count, reverse=True)

    def snapshot(self, target):
        """The snapshot of a target (as given to the callback: ``0.2`` and ``20`` are different targets)."""
        for snap in self.snapshots:
            if snap.target == target and isinstance(snap.target, float) == isinstance(target, float):
                return snap
        raise KeyError(f"no snapshot for target {target!r}; reached: {[s.target for s in self.snapshots]}, not "
                       f"reached: {self.pending()}")

    def count(self):
        """Non-zero embedding parameters of the watched layers now.

        One traced function sums every watched layer's count (``grouped_nonzero_count``) and one
        value comes back to Python: counting a 26-table model op by op in eager mode cost about as much as
        three training steps.
        """
        if self._count_fn is None:
            layers = list(self.watched_layers().values())
            for layer in layers:
                layer._ensure_built()

            @tf.function(autograph=False)
            def total():
                return grouped_nonzero_count(layers)

            self._count_fn = total
        return int(self._count_fn())

    def _capture(self):
        if not self.capture_initial or self.initial_values is not None:
            return True
        layers = self.watched_layers()
        if not all(layer.built for layer in layers.values()) or not self.model.built:
            return False
        self.initial_values = {}
        for name, layer in layers.items():
            value = layer.initial_values()
            self.initial_values[name] = value if value is not None else to_numpy(layer.embeddings)
        self.initial_weights = [to_numpy(w) for w in _dense_weights(self.model, layers)]
        return True

    # --------------------------------------------------------------------------------------- callbacks
    def on_train_begin(self, logs=None):
        layers = self.watched_layers()
        if self.dense_count is None:
            self.dense_count = sum(layer.vocabulary_size * layer.output_dim for layer in layers.values())
        self._captured = self._capture()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = int(epoch)

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if not self._captured:
            self._captured = self._capture()
        if self.step % self.check_every == 0:
            self.check()

    def check(self):
        """Counts the non-zeros now and takes the snapshots of the targets this count reaches."""
        count = self.count()
        self.last_count = count
        self.history.append((self.step, count))
        if self.min_count is None or count < self.min_count:
            self.min_count, self.min_step = count, self.step
        crossed = [(i, t) for i, t in enumerate(self.targets)
                   if i not in self._reached and count <= self.target_count(t)]
        crossed.sort(key=lambda pair: self.target_count(pair[1]), reverse=True)
        if not crossed:
            return []
        masks = {name: layer.current_mask() for name, layer in self.watched_layers().items()}
        taken = []
        for index, target in crossed:
            self._reached.add(index)
            snap = PEPSnapshot(target=target, target_count=self.target_count(target), count=count,
                               dense_count=self.dense_count, step=self.step, epoch=self.epoch, masks=masks,
                               initial_values=self.initial_values, initial_weights=self.initial_weights)
            self.snapshots.append(snap)
            taken.append(snap)
            if self.verbose:
                print(f"PEPSnapshots: target {target!r} ({snap.target_count} parameters) reached at step "
                      f"{self.step} (epoch {self.epoch}): {count} non-zero of {self.dense_count}")
        if self.stop_when_done and not self.pending():
            self.model.stop_training = True
        return taken

    def on_train_end(self, logs=None):
        if self.last_count is None or self.step % self.check_every:
            self.check()  # the final state counts too
        self.unreached = [
            {"target": t, "target_count": self.target_count(t), "reached": self.min_count,
             "reached_at_step": self.min_step, "final": self.last_count}
            for t in self.pending()
        ]
        if self.unreached:
            listed = ", ".join(f"{u['target']!r} ({u['target_count']} parameters)" for u in self.unreached)
            warnings.warn(
                f"PEPSnapshots: target(s) {listed} never reached: the fewest non-zero embedding parameters was "
                f"{self.min_count} of {self.dense_count} (step {self.min_step}); now {self.last_count}. Train "
                f"longer, or raise the pruning pressure (threshold_init, g_scale, threshold_regularizer)",
                UserWarning, stacklevel=2,
            )


# -------------------------------------------------------------------------------------------------- retrain
RETRAIN_MODES = ("rewind", "random")


def _retrain_config(layer):
    return {**layer.get_config(), "retrain": True, "keep_initial": False}


def _clone_for_retrain(model):
    """A new, built model of the same architecture whose PEP layers are in retrain mode (mask of ones)."""
    if hasattr(model, "embedding_layers") and hasattr(model, "embedding_names") and hasattr(model, "schema"):
        config = model.get_config()
        embeddings = dict(config["embeddings"])
        for name, layer in model.embedding_layers.items():
            if isinstance(layer, PEPEmbedding):
                serialized = dict(embeddings[name])
                serialized["config"] = {**serialized["config"], "retrain": True, "keep_initial": False}
                embeddings[name] = serialized
        config["embeddings"] = embeddings
        clone = type(model).from_config(config)
        clone.build()
        return clone

    def clone_layer(layer):
        if isinstance(layer, PEPEmbedding):
            return PEPEmbedding.from_config(_retrain_config(layer))
        return layer.__class__.from_config(layer.get_config())

    try:
        return keras.models.clone_model(model, clone_function=clone_layer)
    except (ValueError, TypeError) as err:
        raise TypeError(
            f"retrain needs a tfemb RecModel, a functional or a Sequential model (or a factory returning one). "
            f"Received: {type(model).__name__} ({err})"
        ) from err


def retrain(model, snapshot, mode="rewind", initial_values=None, rewind_dense=None, seed=None):
    """A model of the same architecture with the PEP layers in retrain mode with ``snapshot``'s masks.

    The paper's retraining: the searched mask is fixed and the base model is trained again on the pruned
    embeddings. ``mode="rewind"`` is the lottery-ticket rewind: each table restarts from its initial values (the
    values before the search) times the mask; ``mode="random"`` draws the tables again from their initializer
    and applies the same mask (the official ``re_init=True``). Pruned entries are zero and stay exactly zero
    during training (see ``PEPEmbedding``).

    The other weights (MLP, linear terms, other schemes): with ``rewind_dense=True`` (the default in rewind mode
    when the snapshot holds them) they restart from their values at the start of the search, as in the official
    code, whose retrain run re-seeds the same generator and so draws the same initial dense weights; otherwise
    they are freshly initialised.

    Args:
        model: the searched model (a ``tfemb.models.RecModel``, a functional or a Sequential model), or a
            factory ``() -> model`` (a new model of the same architecture; its layer names must match the
            snapshot's). The model is not modified: a new one is built from its config.
        snapshot: a ``PEPSnapshot``, or a dict ``{layer name: mask}``.
        mode: ``"rewind"`` or ``"random"``.
        initial_values: optional ``{layer name: array}``, the tables' initial values for ``"rewind"``; default
            the snapshot's, else the searched layers' frozen copies.
        rewind_dense: bool or None (see above).
        seed: optional int seed of the ``"random"`` re-initialisation.

    Returns:
        The new model, built and not compiled (compile it as the search model, e.g. ``tfemb.tasks.compile_model``).
    """
    if mode not in RETRAIN_MODES:
        raise ValueError(f"mode must be one of {RETRAIN_MODES}. Received: mode={mode!r}")
    from_factory = callable(model) and not isinstance(model, keras.Model)
    source = model() if from_factory else model
    if not isinstance(source, keras.Model):
        raise TypeError(f"retrain needs a Keras model or a factory returning one. Received: {type(source).__name__}")
    if isinstance(snapshot, PEPSnapshot):
        masks = snapshot.masks
    elif isinstance(snapshot, dict):
        masks = snapshot
    else:
        raise TypeError(f"snapshot must be a PEPSnapshot or a dict of masks. Received: {type(snapshot).__name__}")
    source_layers = _require_pep_layers(source, "retrain")
    missing = [n for n in source_layers if n not in masks]
    extra = [n for n in masks if n not in source_layers]
    if missing or extra:
        raise ValueError(
            f"the snapshot's masks must name the model's PEP layers {list(source_layers)}. Missing: {missing}; "
            f"unknown: {extra}"
        )
    if mode == "rewind":
        initial = initial_values
        if initial is None and isinstance(snapshot, PEPSnapshot):
            initial = snapshot.initial_values
        if initial is None and from_factory:
            raise ValueError(
                "mode='rewind' from a factory needs the search's initial values: a PEPSnapshot holding them "
                "(PEPSnapshots(capture_initial=True)) or initial_values=...; a new model's tables are not the ones "
                "the search started from"
            )
        if initial is None:
            initial = {n: layer.initial_values() for n, layer in source_layers.items()}
            if any(v is None for v in initial.values()):
                raise ValueError(
                    "mode='rewind' needs the tables' initial values: from the snapshot (PEPSnapshots("
                    "capture_initial=True)), the searched layers (keep_initial=True) or initial_values=..."
                )
        lacking = [n for n in source_layers if n not in initial]
        if lacking:
            raise ValueError(f"initial_values has no table for {lacking}")

    new = _clone_for_retrain(source)
    layers = _require_pep_layers(new, "retrain")
    for name, layer in layers.items():
        layer.set_mask(masks[name])
        if mode == "rewind":
            layer.rewind(initial[name])
        else:
            layer.reinitialize(seed=seed)

    weights = snapshot.initial_weights if isinstance(snapshot, PEPSnapshot) else None
    if rewind_dense is None:
        rewind_dense = mode == "rewind" and weights is not None
    if rewind_dense:
        if weights is None:
            raise ValueError("rewind_dense=True needs a PEPSnapshot holding the initial weights "
                             "(PEPSnapshots(capture_initial=True))")
        targets = _dense_weights(new, layers)
        shapes = [tuple(w.shape) for w in targets]
        if shapes != [tuple(np.shape(v)) for v in weights]:
            raise ValueError(
                f"the snapshot's initial weights do not match the new model's: {len(weights)} arrays vs "
                f"{len(targets)} weights (or different shapes); use rewind_dense=False"
            )
        for var, value in zip(targets, weights):
            var.assign(value)
    return new


# ------------------------------------------------------------------------------------------------- controls
#: Mask controls (``control_snapshot``): masks the search did not choose, at its counts.
CONTROL_KINDS = ("random", "columns")


def control_masks(masks, kind="random", seed=0):
    """``{layer name: bool mask}`` with the same kept counts as ``masks`` but entries the search did not choose.

    ``"random"``: each table keeps as many entries as in ``masks``, drawn uniformly over the whole table (the
    lottery-ticket literature's random-pruning control). ``"columns"``: each row (id) keeps as many entries as its
    row in ``masks``, at columns drawn uniformly within the row (the sizes per id kept, the columns not).
    Seeded: the same ``seed`` gives the same masks.
    """
    if kind not in CONTROL_KINDS:
        raise ValueError(f"kind must be one of {CONTROL_KINDS}. Received: kind={kind!r}")
    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(masks):
        mask = np.asarray(masks[name])
        if mask.dtype != bool or mask.ndim != 2:
            raise ValueError(f"mask {name!r} must be a 2-D bool array [vocabulary_size, output_dim]. Received: "
                             f"dtype {mask.dtype}, shape {mask.shape}")
        if kind == "random":
            flat = np.zeros(mask.size, dtype=bool)
            flat[rng.choice(mask.size, size=int(mask.sum()), replace=False)] = True
            out[name] = flat.reshape(mask.shape)
        else:  # each row's columns permuted at random: the row keeps its count
            out[name] = np.take_along_axis(mask, np.argsort(rng.random(mask.shape), axis=1), axis=1)
    return out


def control_snapshot(snapshot, kind="random", seed=0):
    """``snapshot`` with its masks replaced by a control's (``control_masks``): same count, step, initial values
    and weights. ``retrain(model, control_snapshot(snap, "random"))`` trains the control ticket beside
    ``retrain(model, snap)``: the search's mask is worth its cost only where its ticket beats the control's
    (``benchmarks/pep_sweep.py`` does this at every target)."""
    if not isinstance(snapshot, PEPSnapshot):
        raise TypeError(f"snapshot must be a PEPSnapshot. Received: {type(snapshot).__name__}")
    return dataclasses.replace(snapshot, masks=control_masks(snapshot.masks, kind, seed))


# -------------------------------------------------------------------------------------------------- reports
def _popularity_order(counts, size):
    """Ids from most to least popular (stable: ties keep id order); id order without counts."""
    if counts is None:
        return np.arange(size)
    return np.argsort(-np.asarray(counts, dtype=np.float64), kind="stable")


def sparsity_report(model, schema=None, num_buckets=5):
    """Kept fraction of every PEP table, per field and per popularity bucket.

    Args:
        model: a model with ``PEPEmbedding`` layers (or a ``{name: PEPEmbedding}`` dict).
        schema: optional ``tfemb.data.Schema``: per-id counts of each feature rank the ids. Without it, a layer's
            ``frequencies`` are used, else the id order (a Schema numbers ids by descending count, the OOV id 0
            first).
        num_buckets: int >= 1, popularity buckets per field (equal numbers of ids; bucket 0 the most popular).

    Returns:
        ``{"fields": [...], "buckets": [...], "total": {...}}``. Field rows: ``feature``, ``field`` (index in a
        stacked table, else 0), ``ids``, ``dense``, ``nonzero``, ``kept_fraction``, ``mean_dim``, ``empty_ids``
        (ids with no dimension left). Bucket rows: ``feature``, ``field``, ``bucket``, ``ids``, ``rank_range``,
        ``count_share`` (share of the field's counts, None without counts), ``nonzero``, ``kept_fraction``,
        ``mean_dim``.
    """
    if isinstance(num_buckets, bool) or not isinstance(num_buckets, (int, np.integer)) or num_buckets < 1:
        raise ValueError(f"num_buckets must be an int >= 1. Received: num_buckets={num_buckets!r}")
    layers = dict(model) if isinstance(model, dict) else _require_pep_layers(model, "sparsity_report")
    fields, buckets = [], []
    total_dense = total_nonzero = 0
    for name, layer in layers.items():
        mask = layer.current_mask()
        counts = None
        if schema is not None and name in getattr(schema, "names", ()):
            counts = schema.frequencies(name)
        elif layer.frequencies is not None:
            counts = layer.frequencies_array()
        offsets = list(layer.field_offsets or [0]) + [layer.vocabulary_size]
        for f, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
            part = mask[lo:hi]
            dims = part.sum(axis=1)
            nonzero = int(dims.sum())
            dense = int(part.size)
            total_dense += dense
            total_nonzero += nonzero
            fields.append({"feature": name, "field": f, "ids": hi - lo, "dense": dense, "nonzero": nonzero,
                           "kept_fraction": nonzero / dense, "mean_dim": float(dims.mean()),
                           "empty_ids": int(np.sum(dims == 0))})
            part_counts = None if counts is None else np.asarray(counts, dtype=np.float64)[lo:hi]
            order = _popularity_order(part_counts, hi - lo)
            rank = 0
            for b, chunk in enumerate(np.array_split(order, min(num_buckets, hi - lo))):
                chunk_dims = dims[chunk]
                share = None
                if part_counts is not None:
                    whole = part_counts.sum()
                    share = float(part_counts[chunk].sum() / whole) if whole > 0 else 0.0
                buckets.append({"feature": name, "field": f, "bucket": b, "ids": int(chunk.size),
                                "rank_range": (rank, rank + int(chunk.size)), "count_share": share,
                                "nonzero": int(chunk_dims.sum()),
                                "kept_fraction": float(chunk_dims.sum() / (chunk.size * layer.output_dim)),
                                "mean_dim": float(chunk_dims.mean())})
                rank += int(chunk.size)
    total = {"dense": total_dense, "nonzero": total_nonzero,
             "kept_fraction": total_nonzero / total_dense if total_dense else 0.0}
    return {"fields": fields, "buckets": buckets, "total": total}
