"""Scheme factories: one callable builds the embedding layer of any feature, for models built from a Schema.

>>> make = scheme_factory("hashing", output_dim=8, compression=4.0)
>>> layer = make("item", 1000, None)
>>> layer.name, layer.num_buckets, layer.parameter_count()
('item_embedding', 250, 2000)
"""

import math

from tfemb.layers.autodis_embedding import AutoDisEmbedding
from tfemb.layers.autoemb_embedding import AutoEmbEmbedding
from tfemb.layers.deep_hash_embedding import DeepHashEmbedding, dhe_width_for_budget
from tfemb.layers.double_hashing_embedding import DoubleHashingEmbedding
from tfemb.layers.esapn_embedding import ESAPNEmbedding
from tfemb.layers.field_embedding import FieldEmbedding
from tfemb.layers.fixed_embedding import FixedEmbedding
from tfemb.layers.hashing_embedding import HashingEmbedding
from tfemb.layers.low_precision_embedding import LowPrecisionEmbedding
from tfemb.layers.mixed_dimension_embedding import MixedDimensionEmbedding, md_scheme
from tfemb.layers.pep_embedding import PEPEmbedding
from tfemb.layers.qr_embedding import QREmbedding

#: Scheme name -> layer class.
SCHEMES = {
    "fixed": FixedEmbedding,
    "hashing": HashingEmbedding,
    "qr": QREmbedding,
    "double_hashing": DoubleHashingEmbedding,
    "md": MixedDimensionEmbedding,
    "pep": PEPEmbedding,
    "autoemb": AutoEmbEmbedding,
    "esapn": ESAPNEmbedding,
    "dhe": DeepHashEmbedding,
    "low_precision": LowPrecisionEmbedding,
}

#: Schemes that take a ``compression`` ratio in place of ``num_buckets`` (and ``num_hot``).
COMPRESSIBLE = ("hashing", "qr", "double_hashing", "md", "dhe")

#: Compressible schemes whose sizes come from ``compression`` or their own rule, never from ``num_buckets``.
SIZED_BY_RULE = ("md",)

#: Hidden layers of a DHE network sized by ``compression`` (the paper's Figure 1 network has five).
DHE_HIDDEN_LAYERS = 5

#: ``scheme_factory("dhe", compression=...)`` arguments that size the network, and the schemes a feature whose
#: budget cannot hold it may fall back to (at the same compression).
DHE_SIZING = ("num_hidden_layers", "min_width", "fallback")
DHE_FALLBACKS = ("hashing",)

#: Arguments of every scheme (``EmbeddingScheme``) that a fallback layer keeps.
_BASE_ARGS = ("combiner", "validate_ids", "dtype")

#: Schemes that use per-id counts; the others are not handed ``frequencies`` (they would only bloat the config).
USES_FREQUENCIES = ("double_hashing", "md")

#: ``blocking`` of scheme ``"md"``: Algorithm 2 popularity blocks within each feature (the paper's CF setting), or
#: one block per field with dims across the fields (the paper's CTR setting; ``md_field_factory``).
MD_BLOCKINGS = ("popularity", "field")

#: Share of the parameter budget that double hashing gives to the hot table under ``compression``.
HOT_SHARE = 0.5


def get_scheme_class(name):
    """The layer class of a scheme name (one of ``SCHEMES``)."""
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"name must be one of {sorted(SCHEMES)}. Received: name={name!r}") from None


def _check_compression(compression):
    if isinstance(compression, bool) or not isinstance(compression, (int, float)) or not compression > 0 \
            or not math.isfinite(compression):
        raise ValueError(f"compression must be a finite number > 0. Received: compression={compression!r}")
    return float(compression)


def hashing_buckets(vocabulary_size, compression):
    """Rows of a hashing-trick table with ~1/compression of the fixed table's parameters, in [1, vocabulary]."""
    return max(1, min(vocabulary_size, int(vocabulary_size / compression)))


def qr_buckets(vocabulary_size, output_dim, compression, operation="mult"):
    """Remainder rows ``m`` of a QR layer with at most ~1/compression of the fixed table's parameters.

    Parameters are ``ceil(V/m) * dq + m * dr`` (``dq``, ``dr``: the two tables' widths). Of the ``m`` that fit
    the budget ``V * output_dim / compression`` the largest is taken, so most of the budget is the remainder
    table (the hashing-trick table of ``id % m``) and the quotient table is the small complementary one. When
    the budget is below QR's minimum (about ``2 sqrt(V)`` rows, e.g. a tiny vocabulary), ``m`` minimises the
    parameters instead; ``m`` never exceeds ``V``.
    """
    dq, dr = (output_dim // 2, output_dim - output_dim // 2) if operation == "concat" else (output_dim, output_dim)
    v = vocabulary_size
    if dq < 1:
        return 1  # invalid for "concat"; the layer reports it.

    def params(m):
        return -(-v // m) * dq + m * dr

    budget = v * output_dim / compression
    disc = budget * budget - 4.0 * v * dq * dr
    if disc >= 0:
        # Larger root of m*dr + V*dq/m = budget, then step down to the integer that fits.
        m = min(v, max(1, int((budget + math.sqrt(disc)) / (2 * dr))))
        while m > 1 and params(m) > budget:
            m -= 1
        if params(m) <= budget:
            return m
    best = max(1, min(v, round(math.sqrt(v * dq / dr))))
    candidates = {max(1, min(v, best + k)) for k in range(-2, 3)}
    return min(candidates, key=lambda m: (params(m), -m))  # ties: the larger remainder table


def double_hashing_sizes(vocabulary_size, output_dim, compression, combine="sum"):
    """``(num_hot, num_buckets)`` of a double-hashing layer with ~1/compression of the fixed parameters.

    Half the budget (``HOT_SHARE``) goes to the hot table and the rest to the shared table; the two together
    never hold more rows than the vocabulary, and the shared table has at least one row.
    """
    shared_dim = output_dim // 2 if combine == "concat" else output_dim
    budget = vocabulary_size * output_dim / compression
    num_hot = max(0, min(vocabulary_size, int(budget * HOT_SHARE / output_dim)))
    num_buckets = int((budget - num_hot * output_dim) / shared_dim)
    num_buckets = max(1, min(num_buckets, vocabulary_size - num_hot))
    return num_hot, num_buckets


def scheme_factory(name, **kwargs):
    """A callable ``(feature_name, vocabulary_size, frequencies) -> EmbeddingScheme`` for one scheme name.

    Args:
        name: ``"fixed"``, ``"hashing"``, ``"qr"``, ``"double_hashing"``, ``"md"`` or ``"pep"`` (``PEPEmbedding``:
            ``threshold_type``, ``threshold_init``, ``g_scale``, ...; sized by its search, no ``compression``), or
            ``"autoemb"`` (``AutoEmbEmbedding``: ``candidate_dims``, ``selection``, ...; sized by its search and
            trained with ``tfemb.autoemb``; gets the feature's counts only with ``popularity="frequencies"``), or
            ``"esapn"`` (``ESAPNEmbedding``: ``candidate_dims``, ``history_length``, ...; ``output_dim`` must be
            ``max(candidate_dims)``; sized by its policies, trained with ``tfemb.esapn``), or ``"dhe"``
            (``DeepHashEmbedding``: ``num_hashes``, ``hidden_units``, ``distribution``, ...; no table), or
            ``"low_precision"`` (``LowPrecisionEmbedding``: ``bits``, ``step_size`` (``"adaptive"``, ALPT, or
            ``"fixed"``, LPT), ``rounding``, ...; a full table of ``bits``-bit codes).
        **kwargs: arguments of the layer class (e.g. ``output_dim``, ``combiner``, ``operation``). For
            ``"hashing"``, ``"qr"`` and ``"double_hashing"``, ``compression`` (a float ratio, e.g. 4.0) may
            replace ``num_buckets`` (and ``num_hot``): the sizes are then derived per feature so that the layer
            has about ``1/compression`` of the parameters of a fixed table of the same vocabulary and
            dimension, never more rows than the vocabulary (see ``hashing_buckets``, ``qr_buckets``,
            ``double_hashing_sizes``: double hashing gives half the budget to the hot table). ``"md"`` takes
            ``num_blocks``, ``alpha``, ``round_pow2`` and optionally ``compression`` (the budget form of
            Algorithm 3, projections included; see ``tfemb.layers.mixed_dimension_embedding.md_scheme``) and
            ``blocking="popularity"`` (the default; ``"field"``, one block per CTR field, needs the whole
            Schema: ``md_field_factory`` or ``tfemb.experiment.build_model``). ``"dhe"`` takes ``compression``
            in place of ``hidden_units``: ``num_hidden_layers`` (default 5, the paper's) equal hidden layers as wide
            as the budget allows (``dhe_width_for_budget``). A feature whose budget cannot hold them at
            ``min_width`` (default 1) units, as a small vocabulary's, is an error naming it, or with
            ``fallback="hashing"`` gets a hashing-trick table at the same compression (DHE is meant for the
            large vocabularies).

    The layer is named ``f"{feature_name}_embedding"``; ``frequencies`` are passed only to schemes that use
    popularity (``double_hashing``, ``md``; ``md`` requires them).

    Example:

    >>> make = scheme_factory("double_hashing", output_dim=8, compression=4.0)
    >>> layer = make("user", 1000, None)
    >>> layer.num_hot, layer.num_buckets, layer.parameter_count()
    (125, 125, 2000)
    """
    cls = get_scheme_class(name)
    kwargs = dict(kwargs)
    if name == "md":
        blocking = kwargs.pop("blocking", "popularity")
        if blocking not in MD_BLOCKINGS:
            raise ValueError(f"md blocking must be one of {MD_BLOCKINGS}. Received: blocking={blocking!r}")
        if blocking == "field":
            raise ValueError(
                "md blocking='field' sizes every field from the whole Schema's vocabularies: use "
                "tfemb.layers.mixed_dimension_embedding.md_field_factory(schema, output_dim, ...), or "
                "tfemb.experiment.build_model / a recipe with {'scheme': 'md', 'params': {'blocking': 'field'}}. "
                "Received: blocking='field' in scheme_factory"
            )
    compression = kwargs.pop("compression", None)
    if compression is not None:
        if name not in COMPRESSIBLE:
            raise ValueError(
                f"compression is only accepted by {COMPRESSIBLE}. Received: compression={compression!r} for "
                f"name={name!r}"
            )
        compression = _check_compression(compression)
        replaced = ("hidden_units",) if name == "dhe" else ("num_buckets", "num_hot", "budget")
        taken = [key for key in replaced if key in kwargs]
        if taken:
            raise ValueError(
                f"compression replaces {', '.join(taken)}; give one or the other. Received: "
                f"compression={compression}, " + ", ".join(f"{key}={kwargs[key]!r}" for key in taken)
            )
    elif name in COMPRESSIBLE and name not in SIZED_BY_RULE + ("dhe",) and "num_buckets" not in kwargs:
        raise ValueError(f"scheme {name!r} needs num_buckets or compression. Received neither")
    if "output_dim" not in kwargs:
        raise ValueError(f"scheme_factory needs output_dim. Received: {sorted(kwargs)}")
    dhe_sizing = {key: kwargs.pop(key) for key in DHE_SIZING if key in kwargs} if name == "dhe" else {}
    if dhe_sizing and compression is None:
        raise ValueError(f"{', '.join(dhe_sizing)} size a DHE network with compression; without it give "
                         f"hidden_units. Received: " + ", ".join(f"{k}={v!r}" for k, v in dhe_sizing.items()))
    hidden_layers = dhe_sizing.get("num_hidden_layers", DHE_HIDDEN_LAYERS)
    min_width = dhe_sizing.get("min_width", 1)
    fallback = dhe_sizing.get("fallback")
    for key, value in (("num_hidden_layers", hidden_layers), ("min_width", min_width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be an int >= 1. Received: {key}={value!r}")
    if fallback not in (None,) + DHE_FALLBACKS:
        raise ValueError(f"fallback must be one of {DHE_FALLBACKS} or None. Received: fallback={fallback!r}")

    def build(feature_name, vocabulary_size, frequencies=None):
        args = dict(kwargs)
        if name == "md":  # Algorithm 2 blocking of this feature's counts, Algorithm 3 dims
            return md_scheme(feature_name, vocabulary_size, frequencies, compression=compression, **args)
        if compression is not None:
            dim = args["output_dim"]
            if name == "hashing":
                args["num_buckets"] = hashing_buckets(vocabulary_size, compression)
            elif name == "qr":
                args["num_buckets"] = qr_buckets(vocabulary_size, dim, compression, args.get("operation", "mult"))
            elif name == "dhe":
                budget = vocabulary_size * dim / compression
                try:
                    width = dhe_width_for_budget(budget, args.get("num_hashes", 1024), dim, hidden_layers)
                    if width < min_width:
                        raise ValueError(f"the budget of {budget:,.0f} parameters holds hidden layers of width "
                                         f"{width}, under min_width={min_width}")
                except ValueError as exc:
                    if fallback is None:
                        raise ValueError(f"feature {feature_name!r} (vocabulary_size={vocabulary_size}, "
                                         f"compression={compression}): {exc}; or set fallback="
                                         f"{DHE_FALLBACKS[0]!r} for such features") from None
                    return HashingEmbedding(vocabulary_size=vocabulary_size, output_dim=dim,
                                            num_buckets=hashing_buckets(vocabulary_size, compression),
                                            name=f"{feature_name}_embedding",
                                            **{k: v for k, v in args.items() if k in _BASE_ARGS})
                args["hidden_units"] = [width] * hidden_layers
            else:
                args["num_hot"], args["num_buckets"] = double_hashing_sizes(
                    vocabulary_size, dim, compression, args.get("combine", "sum")
                )
        if name in USES_FREQUENCIES or (name in ("autoemb", "esapn") and args.get("popularity") == "frequencies"):
            args["frequencies"] = frequencies
        args["name"] = f"{feature_name}_embedding"
        return cls(vocabulary_size=vocabulary_size, **args)

    build.scheme_name = name
    build.scheme_class = cls
    return build


#: Numeric-embedding name -> layer class (``numeric_factory``; ``RecModel(numeric_embeddings=...)``).
NUMERIC_SCHEMES = {
    "field": FieldEmbedding,
    "autodis": AutoDisEmbedding,
}


def numeric_factory(name, **kwargs):
    """A callable ``(feature_name) -> NumericEmbedding`` for one numeric-embedding name.

    Args:
        name: ``"field"`` (``FieldEmbedding``: ``x · v``) or ``"autodis"`` (``AutoDisEmbedding``: ``num_buckets``,
            ``temperature``, ``skip_factor``, ``aggregation``, ...).
        **kwargs: arguments of the layer class; ``output_dim`` is required (a model's ``embedding_dim``).

    The layer is named ``f"{feature_name}_numeric_embedding"``.

    Example:
        >>> make = numeric_factory("autodis", output_dim=8, num_buckets=10)
        >>> layer = make("I1")
        >>> layer.name, layer.parameter_count()
        ('I1_numeric_embedding', 200)
    """
    if name not in NUMERIC_SCHEMES:
        raise ValueError(f"unknown numeric embedding {name!r}; choose one of {sorted(NUMERIC_SCHEMES)}")
    cls = NUMERIC_SCHEMES[name]
    if "output_dim" not in kwargs:
        raise ValueError(f"numeric_factory({name!r}) needs output_dim (the model's embedding_dim)")
    cls(**kwargs)  # fail here, naming the argument, not on the first feature

    def build(feature_name):
        return cls(**kwargs, name=f"{feature_name}_numeric_embedding")

    build.numeric_scheme = name
    return build
