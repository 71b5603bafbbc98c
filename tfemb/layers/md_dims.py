"""Blocks and dimensions of mixed-dimension (MD) embeddings, in pure NumPy (Ginart et al., arXiv 1909.11810).

The paper sizes an MD layer in two steps:

- **Blocking** (section 4.1). CF (Algorithm 2): sort the rows of one table by descending count and cut them
  into ``k + 1`` blocks of equal total popularity (``cf_blocks``). CTR: one block per categorical field, the
  fields' tables stacked (``stacked_md_blocks``).
- **Dimensions** (section 4.2, Algorithm 3): ``d_i = lambda * p_i ** alpha`` with a temperature ``alpha > 0``,
  where ``p`` is a block-level probability vector and either ``lambda = d0 * max(p) ** -alpha`` (the most
  popular block gets the base dimension ``d0``: ``alpha_power_dims``) or ``lambda`` meets a parameter budget
  (``budget_dims``), optionally rounded to a power of 2 (``pow2_round``), never below 1.

**Which ``p``.** The paper defines ``p_i = a_i / tau`` (``a_i`` the block's total count, ``tau`` the grand
total). After Algorithm 2's equal-mass cut every ``a_i`` is the same, so that ``p`` would give every block
the same dimension. What the paper's experiments and facebookresearch/dlrm's ``md_solver`` use in effect is
the mean per-row probability of a block, ``a_i / (tau * n_i)``: dlrm feeds ``md_solver`` the row counts
``n_i`` of the CTR tables (``d_i ∝ n_i ** -alpha``: every field is queried once per example, so a row of a
field with ``n_i`` rows is queried ``1 / n_i`` of the time on average), and for equal-mass CF blocks
``a_i / (tau * n_i) = 1 / ((k + 1) n_i)`` is again ``∝ 1 / n_i``. tfemb uses this mean per-row probability
everywhere (``block_probabilities``); ``block_masses`` gives the paper's ``a_i / tau`` for reports.

Reference implementation: facebookresearch/dlrm ``tricks/md_embedding_bag.py`` (``md_solver``,
``alpha_power_rule``, ``pow_2_round``) and ``dlrm_s_pytorch.py`` (``--md-flag``, ``--md-temperature`` 0.3,
``--md-threshold`` 200, ``--md-round-dims``); ``dlrm_md_solver`` reproduces ``md_solver``.
"""

import math
from typing import NamedTuple, Optional

import numpy as np

from tfemb.layers.embedding_scheme import check_positive_int


# --------------------------------------------------------------------------------------------------- validation
def check_alpha(alpha):
    """The temperature: a finite number > 0."""
    if isinstance(alpha, (bool, np.bool_)) or not isinstance(alpha, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(alpha)) or not alpha > 0:
        raise ValueError(f"alpha (the temperature) must be a finite number > 0. Received: alpha={alpha!r}")
    return float(alpha)


def check_counts(frequencies, name="frequencies", length=None):
    """Per-row counts: a non-empty 1-D array of finite, non-negative numbers with a positive total."""
    freq = np.asarray(frequencies, dtype=np.float64)
    if freq.ndim != 1 or freq.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of counts. Received: shape {freq.shape}")
    if length is not None and freq.shape[0] != length:
        raise ValueError(f"{name} must have {length} entries. Received: shape {freq.shape}")
    bad = ~np.isfinite(freq) | (freq < 0)
    if np.any(bad):
        raise ValueError(f"{name} must be finite and non-negative. Received: a count of {freq[bad][0]}")
    if not freq.sum() > 0:
        raise ValueError(f"{name} must have a positive total. Received: all {freq.shape[0]} counts are 0")
    return freq


def check_probabilities(p, name="p"):
    """A 1-D array of finite, non-negative block probabilities with a positive maximum."""
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1 or p.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array. Received: shape {p.shape}")
    bad = ~np.isfinite(p) | (p < 0)
    if np.any(bad):
        raise ValueError(f"{name} must be finite and non-negative. Received: {name} containing {p[bad][0]}")
    if not p.max() > 0:
        raise ValueError(f"{name} must have a positive entry. Received: {name}={p.tolist()}")
    return p


def check_sizes(sizes, name="block_sizes", length=None):
    """Positive integer row counts (one per block)."""
    arr = np.asarray(sizes)
    if arr.ndim != 1 or arr.shape[0] == 0 or not (np.issubdtype(arr.dtype, np.integer) or (
            np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)))):
        raise ValueError(f"{name} must be a non-empty 1-D list of ints. Received: {name}={_short(sizes)}")
    arr = arr.astype(np.int64)
    if np.any(arr < 1):
        raise ValueError(f"{name} must all be >= 1. Received: {name}={_short(sizes)}")
    if length is not None and arr.shape[0] != length:
        raise ValueError(f"{name} must have {length} entries (one per block). Received: {name}={_short(sizes)}")
    return arr


def _short(values, limit=12):
    values = np.asarray(values).tolist() if not isinstance(values, (list, tuple)) else list(values)
    return values if len(values) <= limit else f"{values[:limit]}... ({len(values)} entries)"


# ------------------------------------------------------------------------------------------------------ rounding
def pow2_round(dims):
    """Each dimension rounded to the nearest power of 2 in log scale: ``2 ** round(log2(d))`` (dlrm ``pow_2_round``).

    Rounding is in log2 (ties to even, as ``torch.round``), so 5 -> 4, 6 -> 8 (log2 6 = 2.58), 12 -> 16 and
    23 -> 32 (log2 23 = 4.52; the nearest power in linear distance would be 16). Dimensions must be >= 1.

    >>> pow2_round([1, 3, 5, 6, 12, 23]).tolist()
    [1, 4, 4, 8, 16, 32]
    """
    d = np.asarray(dims, dtype=np.float64)
    if np.any(~np.isfinite(d)) or np.any(d < 1):
        raise ValueError(f"dims must be >= 1 to round to a power of 2. Received: dims={_short(dims)}")
    return (2 ** np.round(np.log2(d))).astype(np.int64)


def _round_dims(raw, round_pow2, cap):
    """Algorithm 3's rounding: a floor of 1, the nearest integer (ties to even, as dlrm), optionally the nearest
    power of 2, then at most ``cap`` (the base dimension) when one is given; a raw value of at least ``cap`` is
    ``cap`` itself (with ``round_pow2`` and a ``cap`` that is not a power of 2, e.g. 20, a block whose raw dim
    reaches 20 gets 20, the identity projection, not 16)."""
    d = np.round(np.maximum(1.0, raw))
    if round_pow2:
        d = 2 ** np.round(np.log2(d))
    if cap is not None:
        d = np.where(np.asarray(raw) >= cap, cap, np.minimum(d, cap))
    return d.astype(np.int64)


# ------------------------------------------------------------------------------------------------------ blocking
class CFBlocking(NamedTuple):
    """Algorithm 2's result for one table.

    Attributes:
        block_sizes: int64 array, rows ``n_i`` of each block, most popular block first (empty blocks dropped).
        permutation: None, or an int64 array of ``vocabulary_size`` entries: the rank of each id in descending
            count order (``permutation[id]``; rank 0 is the most popular id). None when the ranks need no table.
        oov_rank: with ``permutation`` None, the rank of id 0, the other ids keeping their order:
            ``rank(0) = oov_rank``, ``rank(x) = x - 1`` for ``1 <= x <= oov_rank``, ``rank(x) = x`` above. 0 when
            the ids are already in descending count order.
        sorted_frequencies: float64 array, the counts in rank order.
    """

    block_sizes: np.ndarray
    permutation: Optional[np.ndarray]
    oov_rank: int
    sorted_frequencies: np.ndarray


def ranks_from_oov_rank(vocabulary_size, oov_rank):
    """The rank of every id when only id 0 is out of place (``CFBlocking.oov_rank``)."""
    ids = np.arange(vocabulary_size, dtype=np.int64)
    ranks = np.where(ids <= oov_rank, ids - 1, ids)
    ranks[0] = oov_rank
    return ranks


def descending_ranks(frequencies):
    """``(order, permutation, oov_rank)`` of Algorithm 2's re-indexing: ``order[r]`` is the id of rank ``r``
    (stable sort by descending count: ties keep the lower id first).

    ``permutation`` is None when the ranks have a closed form: ids already in descending order
    (``oov_rank`` 0), or a ``tfemb.data.Schema``'s numbering, where ids 1.. are in descending order and only the
    OOV id 0, often rarer, is out of place (``oov_rank`` = the number of ids with a larger count).
    """
    freq = np.asarray(frequencies, dtype=np.float64)
    size = freq.shape[0]
    order = np.argsort(-freq, kind="stable")
    ranks = np.empty(size, dtype=np.int64)
    ranks[order] = np.arange(size, dtype=np.int64)
    oov_rank = int(ranks[0])
    if np.array_equal(ranks, ranks_from_oov_rank(size, oov_rank)):
        return order, None, oov_rank
    return order, ranks, 0


def equal_mass_block_sizes(sorted_frequencies, num_blocks):
    """Cuts counts sorted in descending order into at most ``num_blocks`` blocks of equal total count.

    Cut ``i`` (``i = 1 .. num_blocks - 1``) is the row boundary ``t`` whose cumulative count
    ``C(t) = sum(f[:t])`` is nearest to ``i * tau / num_blocks`` (ties: the later boundary). A count larger than
    a block's share (a very popular head id) makes consecutive cuts meet; the empty blocks are dropped, so fewer
    than ``num_blocks`` blocks come back, each of ``>= 1`` row.

    >>> equal_mass_block_sizes([6, 4, 3, 2, 2, 1, 1, 1], 4).tolist()   # masses 6, 4, 5, 5 of 20
    [1, 1, 2, 4]
    """
    f = np.asarray(sorted_frequencies, dtype=np.float64)
    cumulative = np.concatenate([[0.0], np.cumsum(f)])  # C(t), t = 0..V
    total = cumulative[-1]
    cuts = []
    for i in range(1, num_blocks):
        target = total * i / num_blocks
        t = int(np.searchsorted(cumulative, target, side="left"))  # first t with C(t) >= target
        if t > 0 and target - cumulative[t - 1] < cumulative[t] - target:
            t -= 1
        cuts.append(t)
    bounds = np.array([0] + cuts + [f.shape[0]], dtype=np.int64)
    sizes = np.diff(bounds)
    return sizes[sizes > 0]


def cf_blocks(frequencies, num_blocks):
    """Algorithm 2 (blocking for CF): re-index by descending count, then cut into equal-popularity blocks.

    Args:
        frequencies: per-id counts (length ``vocabulary_size``; a Schema's ``frequencies(name)``), finite,
            non-negative, with a positive total.
        num_blocks: int >= 1, ``k + 1`` of the paper (it suggests ``k`` in 8..16).

    Returns:
        A ``CFBlocking``: block sizes (most popular block first), and the id -> rank map, stored as a
        permutation only when no closed form exists (see ``descending_ranks``).

    >>> b = cf_blocks([2, 50, 40, 10, 5, 3, 2, 1, 1], num_blocks=3)  # Schema order: OOV id 0 has count 2
    >>> b.block_sizes.tolist(), b.permutation, b.oov_rank
    ([1, 1, 7], None, 5)
    """
    if isinstance(num_blocks, (bool, np.bool_)) or not isinstance(num_blocks, (int, np.integer)) or num_blocks < 1:
        raise ValueError(
            f"num_blocks (the paper's k + 1 blocks, k >= 0) must be an int >= 1. Received: num_blocks={num_blocks!r}"
        )
    num_blocks = int(num_blocks)
    freq = check_counts(frequencies)
    order, permutation, oov_rank = descending_ranks(freq)
    sorted_freq = freq[order]
    return CFBlocking(equal_mass_block_sizes(sorted_freq, num_blocks), permutation, oov_rank, sorted_freq)


def block_masses(sorted_frequencies, block_sizes):
    """The paper's block-level probabilities ``p_i = a_i / tau`` (``a_i``: total count of block ``i``)."""
    f = check_counts(sorted_frequencies, "sorted_frequencies")
    sizes = check_sizes(block_sizes)
    if sizes.sum() != f.shape[0]:
        raise ValueError(
            f"block_sizes must add up to the {f.shape[0]} counts. Received: block_sizes={_short(block_sizes)} "
            f"(sum {int(sizes.sum())})"
        )
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    cumulative = np.concatenate([[0.0], np.cumsum(f)])
    return (cumulative[bounds[1:]] - cumulative[bounds[:-1]]) / cumulative[-1]


def block_probabilities(sorted_frequencies, block_sizes):
    """Mean per-row probability of each block, ``a_i / (tau * n_i)``: the ``p`` tfemb gives Algorithm 3.

    For CTR field blocks (each field queried once per example) this is ``∝ 1 / n_i``, dlrm's ``md_solver``
    rule; for Algorithm 2's equal-mass blocks it is ``1 / ((k + 1) n_i)``. See the module docstring.

    >>> block_probabilities([6, 4, 3, 2, 2, 1, 1, 1], [1, 1, 2, 4]).tolist()
    [0.3, 0.2, 0.125, 0.0625]
    """
    sizes = check_sizes(block_sizes)
    return block_masses(sorted_frequencies, sizes) / sizes


# ---------------------------------------------------------------------------------------------------- dimensions
def alpha_power_dims(p, d0, alpha, round_pow2=False):
    """Algorithm 3 with ``lambda = d0 * max(p) ** -alpha``: ``d_i = lambda * p_i ** alpha``, the most popular
    block gets ``d0``.

    Each ``d_i`` is floored at 1 and rounded to the nearest int (ties to even), then, with ``round_pow2``, to
    the nearest power of 2 in log scale (``pow2_round``); dims never exceed ``d0`` (with ``round_pow2`` and a
    ``d0`` that is not a power of 2, dlrm would instead raise the base dim, e.g. 12 -> 16).

    Args:
        p: block probabilities (``block_probabilities``), any positive scale: only ratios matter.
        d0: int >= 1, the base dimension (the layer's ``output_dim``).
        alpha: float > 0, the temperature (dlrm's default 0.3). Larger alpha, more skewed dims.
        round_pow2: bool, round to powers of 2.

    Returns:
        int64 array of dims in ``[1, d0]``.

    >>> alpha_power_dims([1 / 9, 1 / 15, 1 / 45], d0=7, alpha=0.5).tolist()  # lambda = 7 * 9 ** 0.5 = 21
    [7, 5, 3]
    """
    p = check_probabilities(p)
    d0 = check_positive_int("d0", d0)
    alpha = check_alpha(alpha)
    lam = d0 * p.max() ** -alpha
    return _round_dims(lam * p ** alpha, round_pow2, d0)


def md_parameter_count(block_sizes, block_dims, d0=None, include_projections=True):
    """Parameters of an MD layer: ``sum n_i d_i`` plus, with ``include_projections``, ``d_i * d0`` for every
    block with ``d_i != d0`` (the projection; a block of the base dim has the identity)."""
    n = np.asarray(block_sizes, dtype=np.int64)
    d = np.asarray(block_dims, dtype=np.int64)
    total = int(np.sum(n * d))
    if include_projections:
        total += int(np.sum(np.where(d != d0, d * d0, 0)))
    return total


def budget_dims(p, block_sizes, alpha, budget, d0=None, round_pow2=False, include_projections=False):
    """Algorithm 3 with ``lambda`` chosen to meet a parameter budget ``B``.

    ``d_i(lambda) = round(max(1, lambda * p_i ** alpha))`` (then, with ``round_pow2``, a power of 2; at most
    ``d0`` when given), and ``lambda`` is the one whose cost is the largest that does not exceed ``B``, where
    the cost is ``sum n_i d_i`` (the paper's budget) or, with ``include_projections``, the layer's whole
    ``parameter_count`` (``+ d_i * d0`` for each projected block). The paper's closed form
    ``lambda = B * (sum_i p_i ** (alpha - 1)) ** -1`` assumes ``n_i = 1 / p_i`` and ignores the floor and the
    rounding; the general constraint ``sum n_i lambda p_i ** alpha = B`` gives ``lambda = B / sum n_i p_i ** alpha``
    before rounding, and this function solves the rounded one exactly: with ``d0`` by enumerating every
    ``lambda`` at which a dim changes (with projections the cost is not monotone in ``lambda``: a block that
    reaches ``d0`` drops its projection), without ``d0`` by bisection (the table cost is monotone).

    Args:
        p: block probabilities (``block_probabilities``).
        block_sizes: rows ``n_i`` of each block.
        alpha: float > 0, the temperature.
        budget: the parameter budget ``B`` (> 0).
        d0: optional int, the base dimension: caps every dim (needed for ``include_projections``).
        round_pow2: bool, round dims to powers of 2.
        include_projections: bool, count the projections in the cost. Default False (the paper's ``sum n_i d_i``).

    Returns:
        int64 array of dims; their cost is ``<= budget`` and no ``lambda`` gives a larger cost within it; with
        ``d0``, every block at ``d0`` when that fits the budget (with projections counted, a larger cost would
        only be projections on top of smaller tables).

    Raises:
        ValueError: if ``budget`` is below the cost of one dimension per block.

    >>> budget_dims([1 / 9, 1 / 15, 1 / 45], [3, 5, 15], alpha=0.5, budget=100).tolist()  # 24 + 30 + 45 = 99
    [8, 6, 3]
    """
    p = check_probabilities(p)
    n = check_sizes(block_sizes, length=p.shape[0])
    alpha = check_alpha(alpha)
    if d0 is not None:
        d0 = check_positive_int("d0", d0)
    if include_projections and d0 is None:
        raise ValueError("include_projections needs the base dimension d0. Received: d0=None")
    if isinstance(budget, (bool, np.bool_)) or not isinstance(budget, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(budget)) or not budget > 0:
        raise ValueError(f"budget must be a finite number > 0. Received: budget={budget!r}")
    weights = p ** alpha

    def cost(dims):
        return md_parameter_count(n, dims, d0, include_projections)

    ones = np.ones_like(n)
    minimum = cost(ones)
    if budget < minimum:
        detail = f"{int(n.sum())} rows x 1"
        if include_projections and d0 > 1:
            detail += f" + {len(n)} projections of 1 x {d0}"
        raise ValueError(
            f"budget is too small to give every block one dimension: the smallest layer of these "
            f"{len(n)} blocks has {minimum} parameters ({detail}). Received: budget={budget!r}"
        )

    if d0 is not None:
        full = np.full_like(n, d0)
        if cost(full) <= budget:
            # The budget fits every block at d0 (a fixed-size table): that is the layer. With projections
            # counted, a larger cost within the budget would only be projections on top of smaller tables.
            return full
        # Every lambda at which some block's rounded dim changes (raw value crossing v - 1/2, or reaching d0,
        # where a rounded power of 2 below d0 becomes d0), just above it.
        positive = weights > 0
        steps = np.append(np.arange(2, d0 + 1, dtype=np.float64) - 0.5, float(d0))
        lambdas = (steps[None, :] / weights[positive][:, None]).reshape(-1) * (1 + 1e-9)
        lambdas = np.concatenate([[0.0], np.unique(lambdas)])
        dims = _round_dims(lambdas[:, None] * weights[None, :], round_pow2, d0)  # [candidates, blocks]
        costs = np.sum(dims * n[None, :], axis=1)
        if include_projections:
            costs = costs + np.sum(np.where(dims != d0, dims * d0, 0), axis=1)
        feasible = np.flatnonzero(costs <= budget)
        best = feasible[np.argmax(costs[feasible])]  # the first (smallest lambda) of the largest feasible cost
        return dims[best]

    # No cap: the table cost is monotone in lambda; bisect for the largest feasible lambda.
    def dims_at(lam):
        return _round_dims(lam * weights, round_pow2, None)

    lo, hi = 0.0, 1.0
    while cost(dims_at(hi)) <= budget:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if cost(dims_at(mid)) <= budget:
            lo = mid
        else:
            hi = mid
    return dims_at(lo)


# ------------------------------------------------------------------------------------------------- the CTR rules
def dlrm_md_solver(row_counts, alpha, d0=None, budget=None, round_pow2=True, queries=None, threshold=None):
    """facebookresearch/dlrm's ``md_solver`` (``tricks/md_embedding_bag.py``), reproduced in NumPy.

    dlrm sorts the tables by row count ``n`` (ascending), divides by ``queries`` (average lookups per example,
    default 1), and applies ``alpha_power_rule``: with ``d0``, ``lambda = d0 * n_min ** alpha``,
    ``d = lambda * n ** -alpha``, the smallest table set to ``d0`` exactly and the others floored at 1; with a
    budget ``B`` instead, ``lambda = B / sum n ** (1 - alpha)`` and every dim floored at 1. Dims are rounded to
    ints (``torch.round``: ties to even), then, with ``round_dim`` (here ``round_pow2``, default True as in
    ``md_solver``; dlrm's ``--md-round-dims`` flag defaults to False), to ``2 ** round(log2 d)``. The order of
    the input is restored. This is Algorithm 3 with ``p ∝ queries / n`` (one block per table).

    ``threshold`` (dlrm's ``--md-threshold``, 200 on its command line) reproduces ``DLRM_Net.create_emb``:
    tables of ``n <= threshold`` rows are not given the MD treatment and keep the base dim ``d0`` (a plain
    table); the others keep the dims computed over all tables. None (default) applies the rule to every table.

    The budget form's ``B`` is the closed form's, not a solved constraint: with the floor and the rounding the
    resulting ``sum n_i d_i`` may differ from ``B`` (``budget_dims`` solves it). The budget form does not cap
    dims at a base dim (dlrm then sizes the base as the largest dim) and with ``round_pow2`` the smallest
    table's ``d0`` is rounded too (12 -> 16): tfemb's layer-building helpers cap dims at ``output_dim``.

    Args:
        row_counts: rows of each table (ints >= 1).
        alpha: float > 0, the temperature (dlrm: ``--md-temperature``, default 0.3).
        d0: int, the base dimension; or None with ``budget``.
        budget: total parameter budget ``B`` when ``d0`` is None.
        round_pow2: bool, dlrm's ``round_dim``.
        queries: optional average lookups per example of each table (dlrm's ``k``); default 1 each.
        threshold: optional int, tables with at most this many rows keep ``d0``.

    Returns:
        int64 array of dims, in the order of ``row_counts``.

    >>> dlrm_md_solver([1000, 10, 100], alpha=0.5, d0=16, round_pow2=False).tolist()  # lambda = 16 * 10 ** .5
    [2, 16, 5]
    """
    n = check_sizes(row_counts, "row_counts").astype(np.float64)
    alpha = check_alpha(alpha)
    if queries is None:
        k = np.ones_like(n)
    else:
        k = check_probabilities(queries, "queries")
        if k.shape != n.shape or np.any(k <= 0):
            raise ValueError(
                f"queries must be one positive number per table ({n.shape[0]}). Received: queries={_short(queries)}"
            )
    order = np.argsort(n, kind="stable")
    m = n[order] / k[order]
    if d0 is not None:
        d0 = check_positive_int("d0", d0)
        lam = d0 * m[0] ** alpha
    elif budget is not None:
        if isinstance(budget, (bool, np.bool_)) or not isinstance(budget, (int, float, np.integer, np.floating)) \
                or not math.isfinite(float(budget)) or not budget > 0:
            raise ValueError(f"budget must be a finite number > 0. Received: budget={budget!r}")
        lam = budget / np.sum(m ** (1 - alpha))
    else:
        raise ValueError("dlrm_md_solver needs d0 or budget. Received: d0=None, budget=None")
    d = np.maximum(1.0, lam * m ** -alpha)
    if d0 is not None:
        d[0] = d0
    d = np.round(d)
    if round_pow2:
        d = 2 ** np.round(np.log2(d))
    dims = np.empty_like(d)
    dims[order] = d
    dims = dims.astype(np.int64)
    if threshold is not None:
        threshold = check_positive_int("threshold", threshold, minimum=0)
        if d0 is None:
            raise ValueError("threshold keeps small tables at d0, so it needs d0. Received: d0=None")
        dims = np.where(n <= threshold, d0, dims)
    return dims


class StackedBlocks(NamedTuple):
    """One MD layer over stacked CTR field tables (the paper's CTR setting): block ``i`` is field ``i``."""

    block_sizes: np.ndarray  #: rows of each field
    block_dims: np.ndarray  #: dims of each field
    offsets: np.ndarray  #: first stacked row of each field (``t_i``): field ``i``'s id ``x`` is row ``t_i + x``
    probabilities: np.ndarray  #: mean per-row probability of each block, ``queries_i / (sum(queries) * n_i)``


def stacked_md_blocks(field_vocabulary_sizes, output_dim, alpha=0.3, round_pow2=False, compression=None,
                      queries=None):
    """Blocks and dims of one MD layer that stacks CTR field tables, one block per field.

    A field with ``n_i`` rows queried ``q_i`` times per example (1 for a categorical field) has mean per-row
    probability ``p_i = q_i / (sum(q) n_i)``, so Algorithm 3 gives dlrm's per-table rule ``d_i ∝ (n_i/q_i) ** -alpha``
    (``dlrm_md_solver``), capped at ``output_dim``. With ``compression`` the budget form is solved instead, for
    ``1/compression`` of the uniform layer's ``sum n_i * output_dim`` parameters, projections included.

    Models in tfemb embed each field with its own scheme; ``tfemb.layers.md_field_factory`` builds those per-field
    layers with these dims. This helper is for a single stacked layer: ids of field ``i`` are shifted by
    ``offsets[i]``.

    >>> s = stacked_md_blocks([1000, 10, 100], output_dim=16, alpha=0.5)
    >>> s.block_dims.tolist(), s.offsets.tolist()
    ([2, 16, 5], [0, 1000, 1010])
    """
    n = check_sizes(field_vocabulary_sizes, "field_vocabulary_sizes")
    output_dim = check_positive_int("output_dim", output_dim)
    q = np.ones(n.shape[0]) if queries is None else check_probabilities(queries, "queries")
    if q.shape != n.shape or np.any(q <= 0):
        raise ValueError(f"queries must be one positive number per field ({n.shape[0]}). Received: {_short(queries)}")
    p = q / (q.sum() * n)
    if compression is None:
        dims = alpha_power_dims(p, output_dim, alpha, round_pow2)
    else:
        budget = int(n.sum()) * output_dim / check_compression(compression)
        dims = budget_dims(p, n, alpha, budget, d0=output_dim, round_pow2=round_pow2, include_projections=True)
    offsets = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64)
    return StackedBlocks(n, dims, offsets, p)


def check_compression(compression):
    if isinstance(compression, (bool, np.bool_)) or not isinstance(compression, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(compression)) or not compression > 0:
        raise ValueError(f"compression must be a finite number > 0. Received: compression={compression!r}")
    return float(compression)


def md_field_dims(schema, output_dim, alpha=0.3, round_pow2=False, threshold=None, compression=None, features=None):
    """The dim of every sparse feature of a fitted Schema under the per-table rule (one block per field).

    Without ``compression``: dlrm's ``md_solver`` over all fields' row counts (``dlrm_md_solver`` with
    ``d0=output_dim``, ``round_pow2`` as given, dims capped at ``output_dim``; ``threshold`` keeps fields of at
    most that many ids at ``output_dim``, as dlrm's ``--md-threshold``). With ``compression``: the budget form
    for ``1/compression`` of the fixed tables' parameters, projections included (``stacked_md_blocks``).

    Args:
        schema: a fitted ``tfemb.data.Schema``.
        output_dim: int, the base dimension ``d0`` every field is projected to.
        alpha: float > 0, the temperature.
        round_pow2: bool, round dims to powers of 2.
        threshold: optional int (dlrm's default is 200), fields with ``<= threshold`` ids keep ``output_dim``.
        compression: optional float > 0, solve the budget form instead.
        features: optional list of feature names; default every sparse feature of the schema.

    Returns:
        dict feature name -> dim.
    """
    names = list(features) if features is not None else [f.name for f in schema.sparse_features]
    if not names:
        raise ValueError("md_field_dims needs at least one sparse feature. Received: an empty feature list")
    sizes = [schema.vocabulary_size(name) for name in names]
    output_dim = check_positive_int("output_dim", output_dim)
    if compression is None:
        dims = np.minimum(dlrm_md_solver(sizes, alpha, d0=output_dim, round_pow2=round_pow2, threshold=threshold),
                          output_dim)
    else:
        dims = stacked_md_blocks(sizes, output_dim, alpha, round_pow2, compression=compression).block_dims
        if threshold is not None:
            dims = np.where(np.asarray(sizes) <= check_positive_int("threshold", threshold, 0), output_dim, dims)
    return {name: int(d) for name, d in zip(names, dims)}
