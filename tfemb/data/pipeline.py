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

    Batches are gathered from the in-memory arrays by row index (one ``tf.gather`` per array and batch), in
    row order, or in a seeded random order per epoch with ``shuffle``. Every row appears exactly once per epoch.

    Args:
        x: dict of feature name -> NumPy array (rows first).
        y: labels or None (then the dataset yields features only).
        batch_size: rows per batch.
        shuffle: shuffle rows every epoch (seeded; a new order every epoch).
        repeat: repeat forever (for step-based training).
        drop_remainder: drop the last partial batch (fixed shapes, e.g. for XLA or distribution).
        seed: shuffle seed; the same seed gives the same sequence of epoch orders (each epoch, and each new
            iteration of the dataset, is shuffled anew). ``None``: a new order sequence every time.
        sample_weight: optional per-row weights (needs ``y``); the dataset then yields ``(x, y, w)``.
        cache: accepted for compatibility and ignored: the arrays are held in memory once and every batch is
            gathered from them, so there are no sliced rows to cache.
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
    data = parts if len(parts) > 1 else parts[0]
    batch_size = int(batch_size)
    batches = _index_batches(n, batch_size, shuffle, seed, repeat, drop_remainder)
    # The arrays are held once (one dataset element, repeated without copying) and zipped with the index
    # batches; every batch is then one gather per array. No per-row tf.data element ever exists, which made
    # slicing rows one by one (from_tensor_slices + batch) cost 22-30 ms of CPU per batch of 1024 x 39 features.
    ds = tf.data.Dataset.zip((batches, tf.data.Dataset.from_tensors(data).repeat()))
    ds = ds.map(lambda idx, d: tf.nest.map_structure(lambda t: tf.gather(t, idx), d),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def _index_batches(n, batch_size, shuffle, seed, repeat, drop_remainder):
    """A dataset of int64 row-index batches: one epoch, or epochs forever with ``repeat``.

    Shuffling permutes the ``n`` indices once per epoch with a stateless shuffle whose key comes from
    ``Dataset.random(seed, rerandomize_each_iteration=True)``: each epoch (and each new iteration of the
    dataset, as ``fit`` starts every epoch) gets a new order, and the sequence of orders depends only on
    ``seed``. One epoch's batches have the static shape ``[batch_size]`` with ``drop_remainder``, else
    ``[None]``, as ``Dataset.batch`` gives.
    """
    full = n // batch_size

    def epoch_order(key):
        order = tf.range(n, dtype=tf.int64)
        return tf.random.experimental.stateless_shuffle(order, seed=key) if shuffle else order

    if shuffle:
        keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2, drop_remainder=True)
    else:
        keys = tf.data.Dataset.from_tensors(tf.zeros([2], tf.int64)).repeat()

    if repeat:
        # Epochs follow each other as one stream and every batch is full, running across epoch boundaries as
        # repeat() before batch() gave: scan carries the rows after an epoch's last full batch to the next.
        def next_epoch(left, key):
            order = tf.concat([left, epoch_order(key)], 0)
            m = tf.shape(order, out_type=tf.int64)[0] // batch_size
            return order[m * batch_size:], tf.reshape(order[: m * batch_size], (-1, batch_size))

        ds = keys.scan(tf.zeros([0], tf.int64), next_epoch).unbatch()
        return ds.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))

    num_batches = full if drop_remainder or full * batch_size == n else full + 1

    def epoch_batches(key):
        order = epoch_order(key)
        if drop_remainder:
            return tf.data.Dataset.from_tensor_slices(tf.reshape(order[: full * batch_size], (full, batch_size)))
        return tf.data.Dataset.range(num_batches).map(lambda i: order[i * batch_size: (i + 1) * batch_size])

    # flat_map hides the length; state it so Keras (progress bars, len(ds)) sees what Dataset.batch gave.
    ds = keys.take(1).flat_map(epoch_batches)
    return ds.apply(tf.data.experimental.assert_cardinality(num_batches))
