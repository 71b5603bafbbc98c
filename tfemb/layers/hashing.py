"""Universal hashing of integer ids, in NumPy (references, tests) and TensorFlow (layers).

The family is Carter-Wegman's multiply-mod-prime hash

    h(x) = ((a * x + b) mod P) mod m,    P = 2**31 - 1 (a Mersenne prime), a in [1, P), b in [0, P).

For ids ``0 <= x < P`` the inner map ``x -> (a*x + b) mod P`` is a bijection, so two ids collide only through
the final ``mod m``, with probability about ``1/m`` over the draw of ``(a, b)``. ``a`` and ``b`` are drawn from
``numpy.random.RandomState(seed)``, so a seed fixes the hash on every platform, and they are baked into the graph
as constants: the TensorFlow version is a handful of stock int64 ops (``Mul``, ``AddV2``, ``FloorMod``) that any
TF Serving binary runs. ``a * x < 2**62`` for ``x < 2**31``, so int64 never overflows.

Example:

>>> a, b = universal_hash_params(seed=0, count=2)
>>> ids = np.arange(5)
>>> expected = universal_hash_np(ids, a[0], b[0], 3)
>>> bool(np.array_equal(universal_hash_tf(tf.constant(ids), a[0], b[0], 3).numpy(), expected))
True
"""

import numpy as np
import tensorflow as tf

#: The Mersenne prime 2**31 - 1 of the hash family; ids must be smaller than it.
HASH_PRIME = 2**31 - 1


def universal_hash_params(seed, count=1):
    """Draws ``count`` independent ``(a, b)`` pairs of the universal family, deterministically from ``seed``.

    Args:
        seed: int in ``[0, 2**32)``, seed of ``numpy.random.RandomState``.
        count: int, number of hash functions.

    Returns:
        ``(a, b)``: two int64 NumPy arrays of shape ``[count]``, ``a`` in ``[1, P)``, ``b`` in ``[0, P)``.
    """
    rng = np.random.RandomState(seed)
    a = rng.randint(1, HASH_PRIME, size=count, dtype=np.int64)
    b = rng.randint(0, HASH_PRIME, size=count, dtype=np.int64)
    return a, b


def universal_hash_np(ids, a, b, m):
    """``((a * ids + b) mod P) mod m`` for a NumPy array of non-negative ids ``< 2**31`` (int64 result)."""
    ids = np.asarray(ids, dtype=np.int64)
    return ((np.int64(a) * ids + np.int64(b)) % np.int64(HASH_PRIME)) % np.int64(m)


def universal_hash_tf(ids, a, b, m):
    """``((a * ids + b) mod P) mod m`` with int64 TF ops; ``ids``: int tensor of non-negative ids ``< 2**31``.

    ``a`` and ``b`` are ints (one hash: the shape of ``ids``) or equal-length 1-D sequences of ``k`` pairs (``k``
    hashes at once, broadcast over a new last axis: ``[*ids.shape, k]``, in the ops of one hash)."""
    ids = tf.cast(ids, tf.int64)
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if a.ndim:
        ids = ids[..., tf.newaxis]
    mixed = tf.math.floormod(ids * tf.constant(a, tf.int64) + tf.constant(b, tf.int64),
                             tf.constant(HASH_PRIME, tf.int64))
    return tf.math.floormod(mixed, tf.constant(int(m), tf.int64))
