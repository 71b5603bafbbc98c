"""Train / validation / test splits: random, per user, chronological, and test-then-train streaming.

AutoEmb and ESAPN are streaming methods: rows arrive in time order and every batch is first evaluated, then
trained on. ``sort_by_time`` + ``stream_batches`` give that order; ``temporal_split`` cuts a time-ordered
dataset into consecutive periods; ``random_split`` and ``user_split`` are the offline splits.

Every split keeps the rows' original index (so a row can be traced back to its file line) and raises
``DataError`` when asked for an empty split.
"""

import numbers

import numpy as np
import pandas as pd

from tfemb.errors import DataError


def _py(value):
    return value.item() if isinstance(value, np.generic) else value


def _check_frame(df, columns=()):
    if not isinstance(df, pd.DataFrame):
        raise DataError(f"expected a pandas DataFrame. Received: {type(df).__name__}")
    if len(df) == 0:
        raise DataError("cannot split an empty dataset (0 rows)")
    for c in columns:
        if c is not None and c not in df.columns:
            raise DataError(f"missing column {c!r}; the data has columns {list(df.columns)}")


def _check_fractions(fractions):
    try:
        fracs = [f for f in fractions]
    except TypeError:
        raise DataError(f"fractions must be a sequence of numbers. Received: fractions={fractions!r}") from None
    if not fracs:
        raise DataError("fractions must not be empty. Received: fractions=()")
    for f in fracs:
        if isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0.0 < float(f) <= 1.0:
            raise DataError(f"every fraction must be a number in (0, 1]. Received: {f!r} in fractions={fractions!r}")
    total = float(sum(fracs))
    if abs(total - 1.0) > 1e-6:
        raise DataError(f"fractions must sum to 1. Received: fractions={fractions!r} (sum {total:g})")
    return [float(f) for f in fracs]


def _cut_points(n, fractions):
    """Row counts at the split boundaries: ``[0, c1, ..., n]`` (last split takes the rounding remainder)."""
    cum = np.rint(np.cumsum(fractions)[:-1] * n).astype(np.int64)
    return np.concatenate(([0], cum, [n]))


def _take_parts(df, order, fractions, what):
    bounds = _cut_points(len(df), fractions)
    parts = []
    for i in range(len(fractions)):
        rows = order[bounds[i]: bounds[i + 1]]
        if len(rows) == 0:
            raise DataError(
                f"{what} split {i} of {len(fractions)} is empty: {len(df)} rows x fraction {fractions[i]:g} "
                "rounds to 0 rows; use more rows or larger fractions"
            )
        parts.append(df.iloc[rows])
    return tuple(parts)


def random_split(df, fractions=(0.8, 0.1, 0.1), seed=0):
    """Shuffles rows (seeded) and cuts them by ``fractions``.

    Args:
        df: DataFrame.
        fractions: sizes of the splits, each in (0, 1], summing to 1.
        seed: int seed; the same seed gives the same split.

    Returns:
        tuple of DataFrames, one per fraction. Rows inside each split keep their original relative order.
    """
    _check_frame(df)
    fracs = _check_fractions(fractions)
    perm = np.random.default_rng(seed).permutation(len(df))
    bounds = _cut_points(len(df), fracs)
    orders = [np.sort(perm[bounds[i]: bounds[i + 1]]) for i in range(len(fracs))]
    return _take_parts(df, np.concatenate(orders), fracs, "random")


def user_split(df, user_column="user_id", test_fraction=0.2, time_column=None, seed=0):
    """Holds out part of every user's interactions.

    Each user with ``n`` rows gives ``min(n - 1, round(n * test_fraction))`` rows to test: the latest ones when
    ``time_column`` is given (ties broken by row order), else a seeded random choice. So every user keeps at
    least one training row, and users with a single row stay in train only.

    Returns:
        ``(train, test)`` DataFrames, each in the original row order.
    """
    _check_frame(df, [user_column, time_column])
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real) or not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be a number in (0, 1). Received: test_fraction={test_fraction!r}")
    users = df[user_column]
    if users.isna().any():
        i = int(np.flatnonzero(users.isna().to_numpy())[0])
        raise DataError(f"user column {user_column!r} has a missing value in row {_py(df.index[i])!r}")
    codes, _ = pd.factorize(users)
    n = len(df)
    if time_column is not None:
        t = df[time_column]
        if t.isna().any():
            i = int(np.flatnonzero(t.isna().to_numpy())[0])
            raise DataError(f"time column {time_column!r} has a missing value in row {_py(df.index[i])!r}")
        key = pd.factorize(t, sort=True)[0]  # rank of time; works for numbers, strings and datetimes
    else:
        key = np.random.default_rng(seed).permutation(n)
    # Sort by (user, time / random key, row position); lexsort's last key is the primary one.
    order = np.lexsort((np.arange(n), key, codes))
    sizes = np.bincount(codes)
    sorted_codes = codes[order]
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    rank = np.arange(n) - starts[sorted_codes]  # position of the row inside its user's sequence
    n_test = np.minimum(sizes - 1, np.floor(sizes * float(test_fraction) + 0.5).astype(np.int64))
    is_test_sorted = rank >= sizes[sorted_codes] - n_test[sorted_codes]
    is_test = np.zeros(n, dtype=bool)
    is_test[order] = is_test_sorted
    if not is_test.any():
        raise DataError(
            f"user split gives an empty test set: with test_fraction={test_fraction} no user of "
            f"{len(sizes)} has enough rows (largest user: {int(sizes.max())} rows)"
        )
    return df.iloc[np.flatnonzero(~is_test)], df.iloc[np.flatnonzero(is_test)]


def sort_by_time(df, time_column):
    """Rows in time order; a stable sort, so rows with equal times keep their file order."""
    _check_frame(df, [time_column])
    if df[time_column].isna().any():
        i = int(np.flatnonzero(df[time_column].isna().to_numpy())[0])
        raise DataError(f"time column {time_column!r} has a missing value in row {_py(df.index[i])!r}")
    return df.sort_values(time_column, kind="stable")


def temporal_split(df, time_column, fractions=(0.8, 0.1, 0.1)):
    """Chronological cut: the first ``fractions[0]`` of rows by time, then the next, and so on.

    Splits are cut by row count after a stable sort by ``time_column``, so rows sharing the boundary
    timestamp may fall on either side (in file order).
    """
    df = sort_by_time(df, time_column)
    fracs = _check_fractions(fractions)
    return _take_parts(df, np.arange(len(df)), fracs, "temporal")


def stream_batches(x, y=None, batch_size=1024, time=None):
    """Yields ``(x_batch, y_batch)`` slices in row order, for test-then-train streaming.

    The rows must already be in time order (``sort_by_time`` before ``Schema.transform``). Each batch is a
    dict of the same features with up to ``batch_size`` rows; the last batch may be smaller.

    Args:
        x: dict of feature name -> array (``Schema.transform`` output).
        y: labels or None (then ``y_batch`` is None).
        batch_size: rows per batch.
        time: optional per-row times; when given, they are checked to be non-decreasing.
    """
    if not isinstance(x, dict) or not x:
        raise DataError(f"x must be a non-empty dict of feature arrays. Received: {type(x).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise DataError(f"batch_size must be an int >= 1. Received: batch_size={batch_size!r}")
    lengths = {k: len(v) for k, v in x.items()}
    if len(set(lengths.values())) != 1:
        raise DataError(f"all features must have the same number of rows. Received: {lengths}")
    n = next(iter(lengths.values()))
    if n == 0:
        raise DataError("cannot stream 0 rows")
    if y is not None and len(y) != n:
        raise DataError(f"labels have {len(y)} rows but features have {n}")
    if time is not None:
        t = np.asarray(time)
        if len(t) != n:
            raise DataError(f"time has {len(t)} rows but features have {n}")
        back = np.flatnonzero(t[1:] < t[:-1])
        if len(back):
            i = int(back[0]) + 1
            raise DataError(
                f"rows are not in time order: row {i} has time {_py(t[i])!r} < {_py(t[i - 1])!r} of row {i - 1}; "
                "sort with sort_by_time() first"
            )
    return _stream(x, y, n, int(batch_size))


def _stream(x, y, n, batch_size):
    for start in range(0, n, batch_size):
        end = min(start + batch_size, n)
        xb = {k: v[start:end] for k, v in x.items()}
        yield xb, (None if y is None else y[start:end])
