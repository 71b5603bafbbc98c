"""tf.data pipelines from encoded arrays."""

import numpy as np
import tensorflow as tf

from tfemb.errors import DataError


def _length(x):
    lengths = {name: len(v) for name, v in x.items()}
    if len(set(lengths.values())) != 1:
        raise DataError(f"all features must have the same number of rows. Received: {lengths}")
    return next(iter(lengths.values()))


def make_dataset(x, y=None, batch_size=256, shuffle=False, seed=0, repeat=False, drop_remainder=False,
                 sample_weight=None, cache=True):
    """A batched, prefetched ``tf.data.Dataset`` of ``(features, label)`` from ``Schema.transform`` output.

    Args:
        x: dict of feature name -> NumPy array (rows first).
        y: labels or None (then the dataset yields features only).
        batch_size: rows per batch.
        shuffle: shuffle rows every epoch (seeded).
        repeat: repeat forever (for step-based training).
        drop_remainder: drop the last partial batch (fixed shapes, e.g. for XLA or distribution).
        seed: shuffle seed; the same seed gives the same order of batches.
        sample_weight: optional per-row weights (needs ``y``); the dataset then yields ``(x, y, w)``.
        cache: cache the sliced rows in memory (cheap: they are already NumPy arrays).
    """
    if not isinstance(x, dict):
        raise DataError(f"x must be a dict of feature name -> array. Received: {type(x).__name__}")
    if not x:
        raise DataError("no features given to make_dataset")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise DataError(f"batch_size must be an int >= 1. Received: batch_size={batch_size!r}")
    n = _length(x)
    if n == 0:
        raise DataError("cannot make a dataset from 0 rows")
    if y is not None and len(y) != n:
        raise DataError(f"labels have {len(y)} rows but features have {n}")
    if sample_weight is not None:
        if y is None:
            # Without labels the weights would be taken for labels.
            raise DataError("sample_weight needs labels y. Received: y=None")
        if len(sample_weight) != n:
            raise DataError(f"sample_weight has {len(sample_weight)} rows but features have {n}")
    tensors = {k: np.asarray(v) for k, v in x.items()}
    parts = (tensors,) if y is None else (tensors, np.asarray(y))
    if sample_weight is not None:
        parts = parts + (np.asarray(sample_weight, dtype=np.float32),)
    ds = tf.data.Dataset.from_tensor_slices(parts if len(parts) > 1 else parts[0])
    if cache:
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(min(n, 200_000), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    # Batching whole slices at once (instead of per-row maps) keeps the pipeline far from the bottleneck.
    ds = ds.batch(int(batch_size), drop_remainder=drop_remainder)
    return ds.prefetch(tf.data.AUTOTUNE)
