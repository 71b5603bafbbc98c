"""Schema: features, vocabularies with per-id training counts, numeric transforms, labels; JSON round trip.

A ``Schema`` is fitted on training rows (a pandas DataFrame) and then encodes any rows into the arrays models
take: int64 ids for categorical, multi-hot and discretised numeric features, float32 values for numeric
features. Id 0 of every vocabulary is out-of-vocabulary (unknown values, values rarer than ``min_count``,
missing values); the other ids are assigned in **descending training count**, so id 1 is the most popular
value. Each vocabulary keeps the training count of every id: popularity drives mixed-dimension embeddings,
AutoEmb, ESAPN and frequency-based double hashing.
"""

import dataclasses
import json
import math
from typing import Optional

import numpy as np
import pandas as pd

from tfemb.errors import DataError

#: Pads multi-hot id lists (never a real id; the embedding layers mask it).
PADDING_ID = -1

NUMERIC_TRANSFORMS = (None, "log", "standardize", "log_standardize")
DISCRETIZERS = (None, "equal_width", "equal_frequency", "log")
LABEL_KINDS = ("binary", "multiclass", "regression")
MULTI_HOT_COMBINERS = ("sum", "mean", "sqrtn")


def _require_columns(df, columns, what="feature", names=None):
    """``names[i]`` is the feature (or label) that reads ``columns[i]``; defaults to the column."""
    if not isinstance(df, pd.DataFrame):
        raise DataError(f"expected a pandas DataFrame. Received: {type(df).__name__}")
    names = list(columns) if names is None else list(names)
    for column, name in zip(columns, names):
        if column not in df.columns:
            raise DataError(
                f"missing column {column!r} for {what} {name!r}; the data has columns {list(df.columns)}"
            )


def _py(value):
    """A NumPy scalar as the Python value, so messages read ``11``, not ``np.int64(11)``."""
    return value.item() if isinstance(value, np.generic) else value


def _as_key(value):
    """Canonical vocabulary key of a raw value: ints stay ints, floats that are ints become ints, else str."""
    if isinstance(value, (bool, np.bool_)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return None
        return int(value) if float(value).is_integer() else str(value)
    if value is None or value is pd.NA:
        return None
    text = str(value)
    return text if text != "" else None


def _series_keys(series):
    return [_as_key(v) for v in series.tolist()]


def _check_key_kind(feature, series, keys):
    """DataError when a non-missing value is an int where the vocabulary holds strs, or the reverse.

    A vocabulary fitted on ints, given ``"3"``, would map every row to OOV silently (and the reverse). Floats
    that are ints (``3.0``, e.g. an int column made float64 by a NaN) count as ints, other floats as strs (as
    ``_as_key`` makes them). Mixed or empty vocabularies are not checked. NumPy int / float / bool columns are
    checked by dtype; other columns by the types of their keys.
    """
    expected = feature.vocabulary.key_kind()
    if expected is None:
        return
    kind = series.dtype.kind
    if kind in "iu":
        bad = None if expected is int else series.notna().to_numpy()
    elif kind == "b":
        bad = None if expected is str else series.notna().to_numpy()
    elif kind == "f":
        values = series.to_numpy(dtype=np.float64)
        with np.errstate(invalid="ignore"):
            integral = values % 1 == 0
        bad = (~np.isnan(values) & ~integral) if expected is int else integral
    else:
        wrong = str if expected is int else int
        bad = None if wrong not in set(map(type, keys)) else np.fromiter(
            (type(k) is wrong for k in keys), dtype=bool, count=len(keys))
    if bad is None or not bad.any():
        return
    row = int(np.flatnonzero(bad)[0])
    value = _py(series.iloc[row])
    name = expected.__name__
    raise DataError(
        f"{feature.name}: value {value!r} ({type(value).__name__}) in row {_py(series.index[row])!r} of column "
        f"{feature.column!r} does not match the vocabulary, whose keys are {name}s (the feature was fitted on "
        f"{name} values; every such value would map to the OOV id 0). Convert the column, e.g. "
        f"df[{feature.column!r}].astype({name})"
    )


@dataclasses.dataclass
class Vocabulary:
    """Values of a categorical feature and the training count of each id.

    ``values[i]`` has id ``i + 1``; id 0 is out-of-vocabulary. ``counts[i]`` is the training count of id
    ``i`` (``counts[0]``: training rows that fell to OOV: missing or rarer than ``min_count``).
    """

    values: list
    counts: list

    @property
    def size(self):
        """Number of ids, OOV included."""
        return len(self.values) + 1

    @classmethod
    def fit(cls, keys, min_count=1, max_size=None):
        counts = {}
        oov = 0
        for key in keys:
            if key is None:
                oov += 1
            else:
                counts[key] = counts.get(key, 0) + 1
        kept = [(k, c) for k, c in counts.items() if c >= min_count]
        oov += sum(c for c in counts.values() if c < min_count)
        # Descending count; ties by the value's text so the order does not depend on row order.
        kept.sort(key=lambda kc: (-kc[1], str(kc[0])))
        if max_size is not None and len(kept) > max_size - 1:
            oov += sum(c for _, c in kept[max_size - 1:])
            kept = kept[: max_size - 1]
        return cls(values=[k for k, _ in kept], counts=[oov] + [c for _, c in kept])

    def index(self):
        if getattr(self, "_index", None) is None:
            self._index = {v: i + 1 for i, v in enumerate(self.values)}
        return self._index

    def key_kind(self):
        """``int`` or ``str`` when every value is of that type, else None (mixed or empty)."""
        if not hasattr(self, "_key_kind"):
            kinds = set(map(type, self.values))
            self._key_kind = kinds.pop() if len(kinds) == 1 and kinds <= {int, str} else None
        return self._key_kind

    def lookup_keys(self, keys):
        index = self.index()
        return np.fromiter((index.get(k, 0) for k in keys), dtype=np.int64, count=len(keys))

    def frequencies(self):
        return np.asarray(self.counts, dtype=np.int64)

    def to_dict(self):
        return {"values": list(self.values), "counts": [int(c) for c in self.counts]}

    @classmethod
    def from_dict(cls, d):
        return cls(values=list(d["values"]), counts=list(d["counts"]))


@dataclasses.dataclass
class CategoricalFeature:
    """One id per row (user id, item id, a categorical field).

    Args:
        name: feature name (the model input name).
        column: source column; defaults to ``name``.
        min_count: values seen fewer times in training map to the OOV id 0.
        max_size: optional cap on the number of ids (OOV included); the rarest values go to OOV.
    """

    name: str
    column: Optional[str] = None
    min_count: int = 1
    max_size: Optional[int] = None
    vocabulary: Optional[Vocabulary] = None
    kind: str = dataclasses.field(default="categorical", init=False)

    def __post_init__(self):
        self.column = self.column or self.name
        if not isinstance(self.min_count, (int, np.integer)) or self.min_count < 1:
            raise DataError(f"{self.name}: min_count must be an int >= 1. Received: min_count={self.min_count!r}")
        if self.max_size is not None and (not isinstance(self.max_size, (int, np.integer)) or self.max_size < 2):
            raise DataError(f"{self.name}: max_size must be an int >= 2 or None. Received: max_size={self.max_size!r}")

    def fit(self, series):
        self.vocabulary = Vocabulary.fit(_series_keys(series), self.min_count, self.max_size)

    def encode(self, series):
        keys = _series_keys(series)
        _check_key_kind(self, series, keys)
        return self.vocabulary.lookup_keys(keys)


@dataclasses.dataclass
class MultiHotFeature:
    """A list of values per row (e.g. a movie's genres ``"Action|Comedy"``), padded with -1 to ``max_length``.

    Args:
        separator: separator of values inside a string cell (list cells are taken as they are).
        combiner: how the embedding layer pools the list: ``"sum"``, ``"mean"`` or ``"sqrtn"``.
        max_length: longest list kept; learned from the training data when None (longer lists are cut).
    """

    name: str
    column: Optional[str] = None
    separator: str = "|"
    combiner: str = "mean"
    max_length: Optional[int] = None
    min_count: int = 1
    vocabulary: Optional[Vocabulary] = None
    kind: str = dataclasses.field(default="multi_hot", init=False)

    def __post_init__(self):
        self.column = self.column or self.name
        if self.combiner not in MULTI_HOT_COMBINERS:
            raise DataError(
                f"{self.name}: combiner must be one of {MULTI_HOT_COMBINERS}. Received: combiner={self.combiner!r}"
            )
        if not isinstance(self.separator, str) or self.separator == "":
            raise DataError(
                f"{self.name}: separator must be a non-empty string. Received: separator={self.separator!r}"
            )
        length = self.max_length
        if length is not None and (isinstance(length, (bool, np.bool_)) or not isinstance(length, (int, np.integer))
                                   or length < 1):
            raise DataError(f"{self.name}: max_length must be an int >= 1 or None. Received: max_length={length!r}")
        if not isinstance(self.min_count, (int, np.integer)) or self.min_count < 1:
            raise DataError(f"{self.name}: min_count must be an int >= 1. Received: min_count={self.min_count!r}")

    def _lists(self, series):
        out = []
        for cell in series.tolist():
            if isinstance(cell, (list, tuple, np.ndarray)):
                items = list(cell)
            elif cell is None or (isinstance(cell, float) and math.isnan(cell)) or cell is pd.NA:
                items = []
            else:
                items = [p for p in str(cell).split(self.separator) if p != ""]
            out.append([k for k in (_as_key(v) for v in items) if k is not None])
        return out

    def fit(self, series):
        lists = self._lists(series)
        self.vocabulary = Vocabulary.fit([k for row in lists for k in row], self.min_count)
        if self.max_length is None:
            self.max_length = max(1, max((len(r) for r in lists), default=1))

    def encode(self, series):
        lists = self._lists(series)
        index = self.vocabulary.index()
        out = np.full((len(lists), self.max_length), PADDING_ID, dtype=np.int64)
        for i, row in enumerate(lists):
            ids = [index.get(k, 0) for k in row[: self.max_length]]
            out[i, : len(ids)] = ids
        return out


@dataclasses.dataclass
class NumericFeature:
    """A numeric value per row, fed to models as a float or, with ``discretize``, as a bucket id.

    Args:
        transform: ``None``, ``"log"`` (sign(x)·log(1 + |x|)), ``"standardize"`` ((x - mean) / std on the
            training rows) or ``"log_standardize"`` (both).
        fill_value: value for missing entries (NaN / empty). When None, a missing value is an error.
        discretize: ``None`` or ``"equal_width"``, ``"equal_frequency"``, ``"log"`` (equal width on the
            log scale). The feature then becomes ids: 1..num_buckets, with id 0 for missing values, and its
            vocabulary keeps each bucket's training count.
        num_buckets: buckets of the discretiser.
    """

    name: str
    column: Optional[str] = None
    transform: Optional[str] = None
    fill_value: Optional[float] = None
    discretize: Optional[str] = None
    num_buckets: int = 10
    stats: dict = dataclasses.field(default_factory=dict)
    vocabulary: Optional[Vocabulary] = None
    kind: str = dataclasses.field(default="numeric", init=False)

    def __post_init__(self):
        self.column = self.column or self.name
        if self.transform not in NUMERIC_TRANSFORMS:
            raise DataError(f"{self.name}: transform must be one of {NUMERIC_TRANSFORMS}. Received: transform={self.transform!r}")
        if self.discretize not in DISCRETIZERS:
            raise DataError(f"{self.name}: discretize must be one of {DISCRETIZERS}. Received: discretize={self.discretize!r}")
        if not isinstance(self.num_buckets, (int, np.integer)) or self.num_buckets < 1:
            raise DataError(f"{self.name}: num_buckets must be an int >= 1. Received: num_buckets={self.num_buckets!r}")

    @property
    def is_categorical(self):
        return self.discretize is not None

    def _raw(self, series, allow_missing):
        if not (pd.api.types.is_numeric_dtype(series) or pd.api.types.is_object_dtype(series)
                or pd.api.types.is_string_dtype(series)):
            raise DataError(f"{self.name}: numeric feature column {self.column!r} has dtype {series.dtype}")
        values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64)
        bad = np.isnan(values) & series.notna().to_numpy() & (series.astype(str).str.strip() != "").to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{self.name}: value {_py(series.iloc[row])!r} in row {_py(series.index[row])!r} "
                f"of column {self.column!r} is not a number"
            )
        if np.isinf(values).any():
            row = int(np.flatnonzero(np.isinf(values))[0])
            raise DataError(f"{self.name}: value {values[row]} in row {_py(series.index[row])!r} is infinite")
        missing = np.isnan(values)
        if missing.any() and not allow_missing:
            if self.fill_value is None:
                row = int(np.flatnonzero(missing)[0])
                raise DataError(
                    f"{self.name}: missing value (NaN) in row {_py(series.index[row])!r} of column {self.column!r}; "
                    "set fill_value on the NumericFeature to accept missing values"
                )
            values = np.where(missing, float(self.fill_value), values)
        return values, missing

    @staticmethod
    def _log(x):
        return np.sign(x) * np.log1p(np.abs(x))

    def _transformed(self, x):
        if self.transform in ("log", "log_standardize"):
            x = self._log(x)
        if self.transform in ("standardize", "log_standardize"):
            x = (x - self.stats["mean"]) / self.stats["std"]
        return x

    def fit(self, series):
        if self.is_categorical:
            values, missing = self._raw(series, allow_missing=True)
            present = values[~missing]
            if present.size == 0:
                raise DataError(f"{self.name}: no non-missing values to discretise")
            if self.discretize == "equal_width":
                edges = np.linspace(present.min(), present.max(), self.num_buckets + 1)[1:-1]
            elif self.discretize == "equal_frequency":
                edges = np.unique(np.quantile(present, np.linspace(0, 1, self.num_buckets + 1)[1:-1]))
            else:  # log
                logged = self._log(present)
                edges = np.linspace(logged.min(), logged.max(), self.num_buckets + 1)[1:-1]
            self.stats = {"boundaries": [float(e) for e in edges]}
            ids = self.encode(series)
            counts = np.bincount(ids, minlength=len(edges) + 2)
            self.vocabulary = Vocabulary(values=[f"bucket_{i}" for i in range(len(edges) + 1)], counts=counts.tolist())
        else:
            values, _ = self._raw(series, allow_missing=False)
            self.stats = {}
            x = self._log(values) if self.transform in ("log", "log_standardize") else values
            self.stats = {"mean": float(np.mean(x)), "std": float(np.std(x)) or 1.0}

    def encode(self, series):
        if self.is_categorical:
            values, missing = self._raw(series, allow_missing=True)
            x = self._log(values) if self.discretize == "log" else values
            ids = 1 + np.searchsorted(np.asarray(self.stats["boundaries"]), np.where(missing, 0.0, x), side="right")
            return np.where(missing, 0, ids).astype(np.int64)
        values, _ = self._raw(series, allow_missing=False)
        return self._transformed(values).astype(np.float32)


FEATURE_TYPES = {"categorical": CategoricalFeature, "multi_hot": MultiHotFeature, "numeric": NumericFeature}


@dataclasses.dataclass
class Label:
    """The target column and how it becomes the model's label.

    Args:
        column: source column.
        kind: ``"binary"`` (0/1; ``threshold`` turns a rating into 1 when >= threshold),
            ``"multiclass"`` (class ids 0..num_classes-1; ``ceil(value) - 1`` when ``ratings=True``, so ratings
            1-5 or 0.5-5 become 5 classes), or ``"regression"`` (float).
    """

    column: str
    kind: str = "binary"
    threshold: Optional[float] = None
    num_classes: Optional[int] = None
    ratings: bool = False

    def __post_init__(self):
        if self.kind not in LABEL_KINDS:
            raise DataError(f"label kind must be one of {LABEL_KINDS}. Received: kind={self.kind!r}")
        if self.kind == "multiclass" and (not isinstance(self.num_classes, (int, np.integer)) or self.num_classes < 2):
            raise DataError(f"multiclass label needs num_classes >= 2. Received: num_classes={self.num_classes!r}")
        if self.threshold is not None and (isinstance(self.threshold, (bool, np.bool_))
                                           or not isinstance(self.threshold, (int, float, np.integer, np.floating))
                                           or not math.isfinite(self.threshold)):
            raise DataError(
                f"label {self.column!r}: threshold must be a finite number or None. "
                f"Received: threshold={self.threshold!r}"
            )

    def encode(self, series):
        values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64)
        if np.isnan(values).any():
            row = int(np.flatnonzero(np.isnan(values))[0])
            raise DataError(
                f"label {self.column!r}: value {_py(series.iloc[row])!r} in row {_py(series.index[row])!r} "
                "is not a number"
            )
        if np.isinf(values).any():
            row = int(np.flatnonzero(np.isinf(values))[0])
            raise DataError(
                f"label {self.column!r}: value {_py(series.iloc[row])!r} in row {_py(series.index[row])!r} is infinite"
            )
        if self.kind == "binary":
            if self.threshold is not None:
                return (values >= self.threshold).astype(np.float32)
            bad = ~np.isin(values, (0.0, 1.0))
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise DataError(
                    f"label {self.column!r}: binary labels must be 0 or 1 (or set threshold). "
                    f"Received: {values[row]} in row {_py(series.index[row])!r}"
                )
            return values.astype(np.float32)
        if self.kind == "multiclass":
            classes = (np.ceil(values) - 1) if self.ratings else values
            bad = (classes < 0) | (classes >= self.num_classes) | (classes != np.round(classes))
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise DataError(
                    f"label {self.column!r}: class must be an integer in [0, {self.num_classes}). "
                    f"Received: {values[row]} in row {_py(series.index[row])!r}"
                )
            return classes.astype(np.int64)
        return values.astype(np.float32)


def _init_kwargs(kind, d, what):
    """``d`` as constructor arguments of the dataclass ``kind``: DataError on unknown or missing keys."""
    fields = [f for f in dataclasses.fields(kind) if f.init]
    unknown = sorted(set(d) - {f.name for f in fields})
    if unknown:
        raise DataError(f"{what}: unknown keys {unknown}; expected keys among {[f.name for f in fields]}")
    missing = [f.name for f in fields if f.name not in d and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise DataError(f"{what}: missing key {missing[0]!r}")
    return d


def _vocabulary_from_dict(d, name):
    ok = isinstance(d, dict) and isinstance(d.get("values"), list) and isinstance(d.get("counts"), list)
    if not ok or len(d["counts"]) != len(d["values"]) + 1:
        shown = repr(d) if len(repr(d)) <= 200 else repr(d)[:200] + "..."
        raise DataError(
            f"feature {name!r}: the vocabulary must be {{'values': [...], 'counts': [...]}} with one count more "
            f"than values (OOV first). Received: {shown}"
        )
    return Vocabulary.from_dict(d)


class Schema:
    """The features and label of a dataset, fitted on training rows.

    Args:
        features: list of ``CategoricalFeature`` / ``MultiHotFeature`` / ``NumericFeature``.
        label: a ``Label``, or None for unlabeled data.
        time_column: optional column that orders rows in time (for streaming splits).

    Example:

    >>> df = pd.DataFrame({"user": ["a", "b", "a"], "item": [3, 4, 3], "click": [1, 0, 1]})
    >>> schema = Schema([CategoricalFeature("user"), CategoricalFeature("item")], Label("click")).fit(df)
    >>> x, y = schema.transform(df)
    >>> x["user"].tolist(), schema.vocabulary_size("user"), schema.frequencies("user").tolist()
    ([1, 2, 1], 3, [0, 2, 1])
    """

    def __init__(self, features, label=None, time_column=None):
        names = [f.name for f in features]
        if not names:
            raise DataError("a Schema needs at least one feature. Received: features=[]")
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise DataError(f"feature names must be unique. Received duplicates: {sorted(dup)}")
        self.features = list(features)
        self.label = label
        self.time_column = time_column

    # ------------------------------------------------------------------------------------------- accessors
    def feature(self, name):
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"no feature named {name!r}; the schema has {[f.name for f in self.features]}")

    @property
    def names(self):
        return [f.name for f in self.features]

    @property
    def sparse_features(self):
        """Features fed as ids (categorical, multi-hot, discretised numeric)."""
        return [f for f in self.features if f.kind != "numeric" or f.is_categorical]

    @property
    def dense_features(self):
        """Numeric features fed as floats."""
        return [f for f in self.features if f.kind == "numeric" and not f.is_categorical]

    @property
    def is_fitted(self):
        return all(f.vocabulary is not None for f in self.sparse_features) and all(
            f.stats for f in self.dense_features
        )

    def vocabulary_size(self, name):
        f = self.feature(name)
        if f.vocabulary is None:
            raise DataError(f"feature {name!r} has no vocabulary: fit the schema first")
        return f.vocabulary.size

    def frequencies(self, name):
        """Per-id training counts of a sparse feature (length ``vocabulary_size``; entry 0 is OOV)."""
        self.vocabulary_size(name)
        return self.feature(name).vocabulary.frequencies()

    def combiner(self, name):
        f = self.feature(name)
        return f.combiner if f.kind == "multi_hot" else None

    def input_spec(self):
        """``{name: (shape_without_batch, dtype)}`` of the encoded inputs."""
        spec = {}
        for f in self.features:
            if f.kind == "multi_hot":
                spec[f.name] = ((f.max_length,), "int64")
            elif f.kind == "numeric" and not f.is_categorical:
                spec[f.name] = ((), "float32")
            else:
                spec[f.name] = ((), "int64")
        return spec

    @property
    def task(self):
        return None if self.label is None else self.label.kind

    # -------------------------------------------------------------------------------------------- fitting
    def _columns(self, with_label):
        cols = [f.column for f in self.features]
        if with_label and self.label is not None:
            cols.append(self.label.column)
        return cols

    def fit(self, df):
        """Learns vocabularies (with counts) and numeric statistics from training rows; returns self."""
        _require_columns(df, self._columns(with_label=False), names=self.names)
        if len(df) == 0:
            raise DataError("cannot fit a Schema on an empty dataset (0 rows)")
        for f in self.features:
            f.fit(df[f.column])
        return self

    def transform(self, df, with_label=None):
        """Encodes rows: returns ``(features, labels)``; ``labels`` is None without a label column.

        Unknown categorical values map to the OOV id 0. ``with_label=None`` encodes the label when the
        column is present.
        """
        if not self.is_fitted:
            raise DataError("the Schema is not fitted: call schema.fit(train_df) first")
        _require_columns(df, self._columns(with_label=False), names=self.names)
        if len(df) == 0:
            raise DataError("cannot encode an empty dataset (0 rows)")
        x = {f.name: f.encode(df[f.column]) for f in self.features}
        if with_label is None:
            with_label = self.label is not None and self.label.column in df.columns
        y = None
        if with_label:
            _require_columns(df, [self.label.column], what="label")
            y = self.label.encode(df[self.label.column])
        return x, y

    def fit_transform(self, df):
        return self.fit(df).transform(df)

    # ---------------------------------------------------------------------------------------- serialisation
    def to_dict(self):
        feats = []
        for f in self.features:
            d = dataclasses.asdict(f)
            d["vocabulary"] = None if f.vocabulary is None else f.vocabulary.to_dict()
            feats.append(d)
        return {
            "format": "tfemb.Schema/1",
            "features": feats,
            "label": None if self.label is None else dataclasses.asdict(self.label),
            "time_column": self.time_column,
        }

    @classmethod
    def from_dict(cls, d, source=None):
        """The Schema of ``to_dict()``'s output; a malformed dict raises DataError (prefixed with ``source``)."""
        where = f"{source}: " if source else ""
        if not isinstance(d, dict):
            raise DataError(f"{where}not a tfemb schema: expected a JSON object. Received: a {type(d).__name__}")
        if d.get("format") != "tfemb.Schema/1":
            raise DataError(f"{where}not a tfemb schema: format={d.get('format')!r}")
        if not isinstance(d.get("features"), list):
            raise DataError(f"{where}the schema has no 'features' list. Received: features={d.get('features')!r}")
        unknown = sorted(set(d) - {"format", "features", "label", "time_column"})
        if unknown:
            raise DataError(f"{where}unknown schema keys {unknown}")
        try:
            feats = []
            for n, fd in enumerate(d["features"]):
                if not isinstance(fd, dict):
                    raise DataError(f"feature {n} is not a JSON object. Received: {fd!r}")
                fd = dict(fd)
                kind = fd.pop("kind", None)
                if kind not in FEATURE_TYPES:
                    raise DataError(f"unknown feature kind {kind!r} for feature {fd.get('name')!r}")
                vocab = fd.pop("vocabulary", None)
                f = FEATURE_TYPES[kind](**_init_kwargs(FEATURE_TYPES[kind], fd, f"{kind} feature {fd.get('name')!r}"))
                f.vocabulary = None if vocab is None else _vocabulary_from_dict(vocab, f.name)
                feats.append(f)
            label = d.get("label")
            if label is not None:
                if not isinstance(label, dict):
                    raise DataError(f"label is not a JSON object. Received: {label!r}")
                label = Label(**_init_kwargs(Label, label, "label"))
            return cls(feats, label=label, time_column=d.get("time_column"))
        except DataError as e:
            raise DataError(f"{where}{e}") from e

    def to_json(self):
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text, source=None):
        """The Schema of ``to_json()``'s text; bad JSON raises DataError (prefixed with ``source``)."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            where = f"{source}: " if source else ""
            raise DataError(
                f"{where}not valid JSON (truncated?): {e.msg} (line {e.lineno}, column {e.colno})"
            ) from e
        return cls.from_dict(d, source=source)

    def save(self, path):
        with open(path, "w") as fh:
            fh.write(self.to_json())

    @classmethod
    def load(cls, path):
        with open(path, "rb") as fh:
            data = fh.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not a tfemb schema: cannot decode the text as utf-8: {e}") from e
        return cls.from_json(text, source=path)

    def __repr__(self):
        parts = []
        for f in self.features:
            size = f"{f.vocabulary.size} ids" if f.vocabulary is not None else f.kind
            parts.append(f"{f.name}({size})")
        return f"Schema({', '.join(parts)}; label={self.label.column if self.label else None})"


def schema_from_dataframe(df, label=None, categorical=None, numeric=None, multi_hot=None, **label_kwargs):
    """A Schema for user-named columns.

    ``categorical``, ``numeric`` and ``multi_hot`` are each a list of column names, or a mapping ``{column:
    options}`` whose options are the feature's arguments (e.g. ``numeric={"I1": {"fill_value": 0.0, "transform":
    "log"}}``, ``multi_hot={"genres": {"separator": "|", "max_length": 5}}``; ``None`` for the defaults): the
    form a ``data: {source: csv, params: {schema: ...}}`` recipe can write. ``label_kwargs`` go to ``Label``.
    """
    feats = []
    for kind, spec, what in ((CategoricalFeature, categorical, "categorical"), (MultiHotFeature, multi_hot,
                                                                                 "multi_hot"),
                             (NumericFeature, numeric, "numeric")):
        if spec is None:
            continue
        if isinstance(spec, str) or not isinstance(spec, (list, tuple, dict)):
            raise DataError(f"{what} must be a list of column names or a mapping {{column: options}}. "
                            f"Received: {what}={spec!r}")
        items = spec.items() if isinstance(spec, dict) else ((c, None) for c in spec)
        for column, options in items:
            if options is not None and not isinstance(options, dict):
                raise DataError(f"{what}[{column!r}]: options must be a mapping of {kind.__name__} arguments. "
                                f"Received: {options!r}")
            feats.append(kind(**_init_kwargs(kind, {"name": column, **(options or {})}, f"{what}[{column!r}]")))
    return Schema(feats, label=None if label is None else Label(label, **label_kwargs))

