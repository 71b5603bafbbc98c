r"""Synthetic CTR and CF datasets with a planted signal: the embedded default data (no download).

Every method of tfemb rests on one premise: **frequent ids carry more information than rare ones**, so a
popular id deserves a bigger embedding and a rare id gains nothing from one. These generators plant exactly
that, with known ground truth, so the main job and the tests run without any dataset on disk.

Generative model (per categorical field ``f`` with ``V_f`` values; for CF the fields are users and items):

1. **Zipf popularity.** The value of rank ``r`` (1 = most popular) is drawn with probability
   ``p_f(r) = r^(-s) / sum_k k^(-s)`` (``s = zipf_exponent``), independently per row and field.
2. **Popularity-dependent information.** Value ``r`` has a latent vector ``z_f(r)`` in ``R^D``
   (``D = latent_dim``) whose first ``d_eff(r)`` coordinates are i.i.d. ``N(0, 1)`` and the rest exactly 0::

       d_eff(r) = clip(round(D * (p_f(r) / p_f(1)) ** beta), 1, D) = clip(round(D * r ** (-s * beta)), 1, D)

   with ``beta = info_exponent``. Popular values have many informative dimensions (and, with unit variance
   per dimension, a larger norm); rare values have one or two.
3. **Small id biases** ``b_f(r) ~ N(0, bias_std^2)``.
4. **Label.**
   CTR: the logit of a row with values ``r_1..r_F`` and numeric features ``x_1..x_m`` is::

       phi   = sum_{a<b} <z_a(r_a), z_b(r_b)>            (all field pairs, FM-style)
       logit = c + sigma_int * phi / std(phi) + sum_f b_f(r_f) + sum_j w_j * std_log(x_j)
       label ~ Bernoulli(sigmoid(logit))

   ``std(phi)`` is taken over the generated rows, ``std_log`` standardises ``log(1 + x)``, ``w_j ~ N(0,
   numeric_std^2)``, and the intercept ``c`` is solved (bisection) so that ``mean(sigmoid(logit))`` equals
   ``positive_rate`` (default 0.3; Criteo's samples have 22-26 % positives).
   The numeric features ``I1..Im`` are Criteo-like counts ``floor(exp(N(mu_j, sigma_j^2)))``.

   CF: ``score = sigma_int * <u, v> / std(<u, v>) + b_u + b_i + N(0, noise_std^2)``, and the rating
   ``1..5`` is ``score`` cut at its empirical quantiles 6.1 / 17.5 / 44.6 / 78.8 %, so the rating
   distribution equals MovieLens-100K's (1: 6.1 %, 2: 11.4 %, 3: 27.1 %, 4: 34.2 %, 5: 21.2 %).
   ``label = rating >= 4`` (``movielens_schema``'s binary rule).

Because the interaction of two popular values spans up to ``D`` dimensions while that of rare values spans
one or two, a model needs a large embedding for popular values and a small one suffices (and overfits less)
for rare ones: mixed-dimension, AutoEmb, ESAPN and PEP should beat a fixed size at equal parameters.

Raw values are shuffled with respect to popularity (CTR: strings such as ``"3_0f2a"``; CF: ints
``1..num_users``), so nothing but the counts reveals it. Generation is seeded and deterministic (numpy
``Generator`` streams spawned per component) and vectorised: 100k rows take well under a second.

Both generators return ``(df, info)``. The ground truth ``info`` holds, per field, the raw value of each rank, its probability, its
``d_eff`` and its latent vector and bias; ``effective_dims(info, field, values)`` looks up ``d_eff`` by raw
value (e.g. in Schema vocabulary order).
"""

import numpy as np
import pandas as pd

from tfemb.data.readers import movielens_schema
from tfemb.data.schema import CategoricalFeature, Label, NumericFeature, Schema
from tfemb.errors import DataError

#: Default vocabulary sizes, cycled over the fields: a spread of small to large fields.
DEFAULT_VOCABULARY_SIZES = (50, 200, 1000, 5000, 20000, 100, 500, 2000, 10000, 30)
#: MovieLens-100K rating shares of 1..5 (6110 / 11370 / 27145 / 34174 / 21201 of 100,000).
MOVIELENS_RATING_SHARES = (0.0611, 0.1137, 0.27145, 0.34174, 0.21201)


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{name} must be an int >= {minimum}. Received: {name}={value!r}")
    return int(value)


def _check_positive(name, value, allow_zero=False):
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and np.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise DataError(f"{name} must be a finite number {bound}. Received: {name}={value!r}")
    return float(value)


def zipf_probabilities(size, exponent):
    """``p(r) = r^-s / sum_k k^-s`` for ranks ``r = 1..size``."""
    w = np.arange(1, size + 1, dtype=np.float64) ** -float(exponent)
    return w / w.sum()


def effective_dims_by_rank(size, exponent, latent_dim, info_exponent):
    """``d_eff(r) = clip(round(D * r^(-s * beta)), 1, D)`` for ranks ``r = 1..size``."""
    ranks = np.arange(1, size + 1, dtype=np.float64)
    d = np.rint(latent_dim * ranks ** (-float(exponent) * float(info_exponent)))
    return np.clip(d, 1, latent_dim).astype(np.int64)


def _latents(rng, dims, latent_dim):
    z = rng.standard_normal((len(dims), latent_dim)).astype(np.float32)
    z[np.arange(latent_dim)[None, :] >= dims[:, None]] = 0.0
    return z


def _sample_ranks(rng, probs, n):
    """0-based ranks drawn with probabilities ``probs`` (inverse CDF)."""
    cdf = np.cumsum(probs)
    cdf[-1] = 1.0
    return np.searchsorted(cdf, rng.random(n), side="right").astype(np.int64)


def _solve_intercept(logit, rate):
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if np.mean(1.0 / (1.0 + np.exp(-(logit + mid)))) < rate:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _standardized(x):
    std = float(np.std(x))
    return (x - float(np.mean(x))) / (std if std > 0 else 1.0)


def effective_dims(info, field, values):
    """Ground-truth ``d_eff`` of raw ``values`` of ``field`` (0 for values the generator never made)."""
    table = info["fields"][field]
    index = pd.Index(table["values"])
    pos = index.get_indexer(pd.Index(list(values), dtype=index.dtype))
    dims = np.where(pos >= 0, table["effective_dims"][np.maximum(pos, 0)], 0)
    return dims.astype(np.int64)


def make_synthetic_ctr(num_rows=100_000, num_fields=8, vocabulary_sizes=None, num_numeric=2, zipf_exponent=1.1,
                       latent_dim=16, seed=0, info_exponent=0.25, interaction_scale=1.5, bias_std=0.3,
                       numeric_std=0.4, numeric_missing_rate=0.0, positive_rate=0.3):
    """A Criteo-like CTR dataset with Zipf ids whose information grows with popularity (see module doc).

    Args:
        num_rows: rows.
        num_fields: categorical fields ``C1..Ck``.
        vocabulary_sizes: values per field; default ``DEFAULT_VOCABULARY_SIZES`` cycled
            (50, 200, 1000, 5000, 20000, 100, 500, 2000 for 8 fields).
        num_numeric: numeric fields ``I1..Im`` (Criteo-like non-negative counts).
        zipf_exponent: ``s`` of the Zipf popularity.
        latent_dim: ``D``, the most informative dimensions an id can have.
        seed: int seed; the same arguments give an identical DataFrame.
        info_exponent: ``beta`` in ``d_eff(r) = clip(round(D * r^(-s * beta)), 1, D)``.
        interaction_scale: std of the pairwise interaction term in the logit.
        bias_std: std of the per-id biases.
        numeric_std: std of the numeric features' weights.
        numeric_missing_rate: share of numeric values replaced by NaN (Criteo has many).
        positive_rate: target mean click probability (the realised rate varies by sampling).

    Returns:
        ``(df, info)``: ``df`` has ``label`` (int64 0/1), ``I1..Im`` (float64), ``C1..Ck`` (str); ``info`` is the
        ground truth: ``info["fields"][name]`` with ``values`` (raw value of each popularity rank),
        ``probabilities``, ``effective_dims``, ``latents``, ``biases``; plus ``logits``, ``intercept``,
        ``numeric_weights``, ``realised_positive_rate`` and ``config``.

    Example:

    >>> df, info = make_synthetic_ctr(num_rows=1000, num_fields=3, seed=0)
    >>> list(df.columns)
    ['label', 'I1', 'I2', 'C1', 'C2', 'C3']
    >>> int(info["fields"]["C1"]["effective_dims"][0])  # the most popular value uses all latent_dim dims
    16
    """
    num_rows = _check_int("num_rows", num_rows, 1)
    num_fields = _check_int("num_fields", num_fields, 1)
    num_numeric = _check_int("num_numeric", num_numeric, 0)
    latent_dim = _check_int("latent_dim", latent_dim, 1)
    zipf_exponent = _check_positive("zipf_exponent", zipf_exponent, allow_zero=True)
    info_exponent = _check_positive("info_exponent", info_exponent, allow_zero=True)
    for name, value in [("interaction_scale", interaction_scale), ("bias_std", bias_std),
                        ("numeric_std", numeric_std)]:
        _check_positive(name, value, allow_zero=True)
    if not 0.0 <= float(numeric_missing_rate) < 1.0:
        raise DataError(
            f"numeric_missing_rate must be in [0, 1). Received: numeric_missing_rate={numeric_missing_rate!r}"
        )
    if not 0.0 < float(positive_rate) < 1.0:
        raise DataError(f"positive_rate must be in (0, 1). Received: positive_rate={positive_rate!r}")
    if vocabulary_sizes is None:
        vocabulary_sizes = [DEFAULT_VOCABULARY_SIZES[i % len(DEFAULT_VOCABULARY_SIZES)] for i in range(num_fields)]
    vocabulary_sizes = list(vocabulary_sizes)
    if len(vocabulary_sizes) != num_fields:
        raise DataError(
            f"vocabulary_sizes must have num_fields={num_fields} entries. Received: {len(vocabulary_sizes)} entries"
        )
    vocabulary_sizes = [_check_int("vocabulary_sizes entry", v, 1) for v in vocabulary_sizes]

    streams = np.random.SeedSequence(seed).spawn(num_fields + 2)
    fields = {}
    columns = {}
    total = np.zeros((num_rows, latent_dim), dtype=np.float64)  # sum_f z_f      [rows, D]
    squares = np.zeros(num_rows, dtype=np.float64)               # sum_f |z_f|^2  [rows]
    bias = np.zeros(num_rows, dtype=np.float64)
    for f, size in enumerate(vocabulary_sizes):
        rng = np.random.default_rng(streams[f])
        name = f"C{f + 1}"
        probs = zipf_probabilities(size, zipf_exponent)
        dims = effective_dims_by_rank(size, zipf_exponent, latent_dim, info_exponent)
        z = _latents(rng, dims, latent_dim)
        b = (rng.standard_normal(size) * bias_std).astype(np.float32)
        width = max(4, len(f"{size - 1:x}"))
        values = np.array([f"{f + 1}_{j:0{width}x}" for j in rng.permutation(size)], dtype=object)
        ranks = _sample_ranks(rng, probs, num_rows)
        rows_z = z[ranks].astype(np.float64)
        total += rows_z
        squares += np.einsum("nd,nd->n", rows_z, rows_z)
        bias += b[ranks]
        columns[name] = values[ranks]
        fields[name] = {"values": values, "probabilities": probs, "effective_dims": dims, "latents": z, "biases": b}
    phi = 0.5 * (np.einsum("nd,nd->n", total, total) - squares)
    phi_std = float(np.std(phi)) or 1.0
    logit = interaction_scale * phi / phi_std + bias

    rng = np.random.default_rng(streams[num_fields])
    numeric = {}
    weights = rng.standard_normal(num_numeric) * numeric_std
    mus = rng.uniform(0.5, 3.0, num_numeric)
    sigmas = rng.uniform(0.8, 1.6, num_numeric)
    for j in range(num_numeric):
        x = np.floor(np.exp(rng.normal(mus[j], sigmas[j], num_rows)))
        logit = logit + weights[j] * _standardized(np.log1p(x))
        if numeric_missing_rate > 0:
            x[rng.random(num_rows) < numeric_missing_rate] = np.nan
        numeric[f"I{j + 1}"] = x

    intercept = _solve_intercept(logit, float(positive_rate))
    logit = logit + intercept
    rng = np.random.default_rng(streams[num_fields + 1])
    label = (rng.random(num_rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)

    df = pd.DataFrame({"label": label, **numeric, **columns})
    info = {
        "kind": "ctr",
        "config": {"num_rows": num_rows, "num_fields": num_fields, "vocabulary_sizes": vocabulary_sizes,
                   "num_numeric": num_numeric, "zipf_exponent": zipf_exponent, "latent_dim": latent_dim,
                   "seed": seed, "info_exponent": info_exponent, "interaction_scale": interaction_scale,
                   "bias_std": bias_std, "numeric_std": numeric_std, "numeric_missing_rate": numeric_missing_rate,
                   "positive_rate": positive_rate},
        "fields": fields,
        "numeric_weights": weights,
        "intercept": intercept,
        "interaction_std": phi_std,
        "logits": logit,
        "realised_positive_rate": float(label.mean()),
    }
    return df, info


def synthetic_ctr_schema(df_or_config, min_count=1):
    """The Schema of ``make_synthetic_ctr`` data: ``C*`` categorical, ``I*`` numeric, binary ``label``.

    Args:
        df_or_config: the generated DataFrame, its ``info`` dict, or a dict with ``num_fields`` and
            ``num_numeric``.
        min_count: ``min_count`` of the categorical features.

    Numeric features use ``transform="log_standardize"`` and ``fill_value=0`` (as for Criteo).
    """
    if isinstance(df_or_config, pd.DataFrame):
        cats = [c for c in df_or_config.columns if c.startswith("C") and c[1:].isdigit()]
        nums = [c for c in df_or_config.columns if c.startswith("I") and c[1:].isdigit()]
        if not cats:
            raise DataError(f"no C1..Ck columns in the DataFrame; it has columns {list(df_or_config.columns)}")
    elif isinstance(df_or_config, dict):
        config = df_or_config.get("config", df_or_config)
        if "num_fields" not in config:
            raise DataError(f"config needs 'num_fields'. Received keys: {sorted(config)}")
        cats = [f"C{i + 1}" for i in range(int(config["num_fields"]))]
        nums = [f"I{i + 1}" for i in range(int(config.get("num_numeric", 0)))]
    else:
        raise DataError(f"expected a DataFrame or a config dict. Received: {type(df_or_config).__name__}")
    feats = [NumericFeature(c, transform="log_standardize", fill_value=0.0) for c in nums]
    feats += [CategoricalFeature(c, min_count=min_count) for c in cats]
    return Schema(feats, label=Label("label", "binary"))


def make_synthetic_cf(num_users=2000, num_items=1000, num_rows=100_000, zipf_exponent=1.0, latent_dim=32, seed=0,
                      task="binary", info_exponent=0.25, interaction_scale=1.0, bias_std=0.3, noise_std=0.5,
                      start_time=1_514_764_800, duration_days=365):
    """A MovieLens-like rating dataset with Zipf users and items whose information grows with popularity.

    Args:
        num_users, num_items: population sizes (ids ``1..num_users`` / ``1..num_items``, shuffled with respect
            to popularity); unpopular ones may not occur in the rows.
        num_rows: ratings, in time order.
        zipf_exponent: ``s`` of both Zipf popularities.
        latent_dim: ``D``.
        seed: int seed; the same arguments give an identical DataFrame.
        task: ``"binary"`` adds ``label = rating >= 4``; ``"multiclass"`` / ``"regression"`` use ``rating``.
        info_exponent: ``beta`` of ``d_eff`` (module doc).
        interaction_scale, bias_std, noise_std: scales of the score's terms.
        start_time, duration_days: Unix time of the first rating and the span of the timestamps.

    Returns:
        ``(df, info)``: ``df`` has ``user_id, item_id, rating (float64, 1-5), timestamp (int64)`` (+ ``label``
        int64 for ``task="binary"``), in time order; ``info`` is the ground truth, with fields ``"user_id"`` and
        ``"item_id"`` laid out as in ``make_synthetic_ctr``, plus ``scores`` and ``rating_cuts``.
    """
    num_users = _check_int("num_users", num_users, 1)
    num_items = _check_int("num_items", num_items, 1)
    num_rows = _check_int("num_rows", num_rows, 1)
    latent_dim = _check_int("latent_dim", latent_dim, 1)
    zipf_exponent = _check_positive("zipf_exponent", zipf_exponent, allow_zero=True)
    info_exponent = _check_positive("info_exponent", info_exponent, allow_zero=True)
    for name, value in [("interaction_scale", interaction_scale), ("bias_std", bias_std), ("noise_std", noise_std)]:
        _check_positive(name, value, allow_zero=True)
    _check_positive("duration_days", duration_days)
    if task not in ("binary", "multiclass", "regression"):
        raise DataError(f"task must be 'binary', 'multiclass' or 'regression'. Received: task={task!r}")

    streams = np.random.SeedSequence(seed).spawn(3)
    fields = {}
    rows_z = {}
    bias = np.zeros(num_rows, dtype=np.float64)
    columns = {}
    for k, (name, size) in enumerate([("user_id", num_users), ("item_id", num_items)]):
        rng = np.random.default_rng(streams[k])
        probs = zipf_probabilities(size, zipf_exponent)
        dims = effective_dims_by_rank(size, zipf_exponent, latent_dim, info_exponent)
        z = _latents(rng, dims, latent_dim)
        b = (rng.standard_normal(size) * bias_std).astype(np.float32)
        values = rng.permutation(size).astype(np.int64) + 1
        ranks = _sample_ranks(rng, probs, num_rows)
        rows_z[name] = z[ranks].astype(np.float64)
        bias += b[ranks]
        columns[name] = values[ranks]
        fields[name] = {"values": values, "probabilities": probs, "effective_dims": dims, "latents": z, "biases": b}
    dot = np.einsum("nd,nd->n", rows_z["user_id"], rows_z["item_id"])
    dot_std = float(np.std(dot)) or 1.0
    rng = np.random.default_rng(streams[2])
    score = interaction_scale * dot / dot_std + bias + rng.standard_normal(num_rows) * noise_std
    cuts = np.quantile(score, np.cumsum(MOVIELENS_RATING_SHARES)[:-1])
    rating = (1 + np.searchsorted(cuts, score, side="right")).astype(np.float64)
    span = float(duration_days) * 86400.0
    timestamp = (int(start_time) + np.sort(rng.random(num_rows)) * span).astype(np.int64)

    df = pd.DataFrame({"user_id": columns["user_id"], "item_id": columns["item_id"], "rating": rating,
                       "timestamp": timestamp})
    if task == "binary":
        df["label"] = (rating >= 4).astype(np.int64)
    info = {
        "kind": "cf",
        "config": {"num_users": num_users, "num_items": num_items, "num_rows": num_rows,
                   "zipf_exponent": zipf_exponent, "latent_dim": latent_dim, "seed": seed, "task": task,
                   "info_exponent": info_exponent, "interaction_scale": interaction_scale, "bias_std": bias_std,
                   "noise_std": noise_std},
        "fields": fields,
        "interaction_std": dot_std,
        "rating_cuts": cuts,
        "scores": score,
    }
    return df, info


def synthetic_cf_schema(df_or_config=None, task="binary", with_label_column=False):
    """The Schema of ``make_synthetic_cf`` data: ``user_id``, ``item_id``, time column ``timestamp``.

    Args:
        df_or_config: the generated DataFrame, its ``info`` dict, or None; only checked (the layout is fixed).
        task: the label follows ``movielens_schema``: ``"binary"`` (``rating >= 4``), ``"multiclass"`` (5
            rating classes) or ``"regression"``.
        with_label_column: (binary only) use the generated ``label`` column (the same values) instead.
    """
    if isinstance(df_or_config, pd.DataFrame):
        missing = [c for c in ("user_id", "item_id", "rating", "timestamp") if c not in df_or_config.columns]
        if missing:
            raise DataError(f"missing column {missing[0]!r}; the data has columns {list(df_or_config.columns)}")
    elif df_or_config is not None and not isinstance(df_or_config, dict):
        raise DataError(f"expected a DataFrame, a config dict or None. Received: {type(df_or_config).__name__}")
    schema = movielens_schema(task)
    if with_label_column:
        if task != "binary":
            raise DataError(f"with_label_column needs task='binary'. Received: task={task!r}")
        schema.label = Label("label", "binary")
    return schema
