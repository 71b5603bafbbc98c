"""Readers for the public recommender datasets, and the Schemas that go with them.

Every reader returns a pandas DataFrame with documented, canonical columns, so one Schema works for every
dataset of a family:

- MovieLens (100K, 1M, 20M / latest / latest-small):
  ``user_id, item_id, rating, timestamp`` (+ ``age, gender, occupation, zip_code`` where the release has user
  data) + ``title, genres`` (+ ``release_date``). ``rating`` is float64 (1-5, or 0.5-5 in steps of 0.5),
  ``timestamp`` int64 Unix seconds, ``genres`` the genre names joined with ``"|"``.
- Criteo DAC: ``label`` (int64 0/1), ``I1..I13`` (float64, NaN where empty), ``C1..C26`` (strings, missing
  where empty).
- Avazu: every original column as a string (``click`` int64 0/1) plus ``hour_of_day`` and ``weekday`` derived
  from ``hour`` (``YYMMDDHH``).

Bad files never pass silently: a missing, unreadable, empty, corrupt (gzip) or truncated file (for MovieLens
and Criteo also a last line without a line end, which a cut inside the last field leaves), a row with the wrong
number of fields, or a MovieLens rating outside the release's range, raises ``DataError`` naming the file, and
the line where a line is at fault (a file line: blank lines, which pandas skips, count). Field
counts of the unquoted formats (tab-, pipe-, ``::``- and comma-separated) are checked by a vectorised pass over
the bytes before pandas parses them with explicit dtypes. Files may be gzip-compressed (detected by their
magic bytes).

The data of the tests and benchmarks is never part of the repository: ``data_dir()`` points at it
(``$TFEMB_DATA_DIR``, default ``<repo>/../shared/data``).
"""

import csv
import gzip
import io
import os
import pathlib
import zlib

import numpy as np
import pandas as pd

from tfemb.data.schema import CategoricalFeature, Label, MultiHotFeature, NumericFeature, Schema
from tfemb.errors import DataError

#: Environment variable naming the folder of the real datasets (tests and benchmarks).
DATA_DIR_ENV = "TFEMB_DATA_DIR"

MOVIELENS_COLUMNS = ("user_id", "item_id", "rating", "timestamp", "age", "gender", "occupation", "zip_code",
                     "title", "genres", "release_date")
MOVIELENS_LATEST_COLUMNS = ("user_id", "item_id", "rating", "timestamp", "title", "genres")
CRITEO_NUMERIC = tuple(f"I{i}" for i in range(1, 14))
CRITEO_CATEGORICAL = tuple(f"C{i}" for i in range(1, 27))
CRITEO_COLUMNS = ("label",) + CRITEO_NUMERIC + CRITEO_CATEGORICAL
AVAZU_COLUMNS = ("id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
                 "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type",
                 "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21")

_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 24


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file or folder does not exist (both a ``DataError`` and a ``FileNotFoundError``)."""


# ------------------------------------------------------------------------------------------------ locations
def _repo_root():
    return pathlib.Path(__file__).resolve().parents[2]


def data_dir():
    """The folder of the real datasets: ``$TFEMB_DATA_DIR``, else ``<repo>/../shared/data``.

    ``<repo>`` is the folder that holds the ``tfemb`` package. The folder may not exist; ``require_data``
    checks.
    """
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    if env:
        return pathlib.Path(env).expanduser()
    return (_repo_root().parent / "shared" / "data").resolve()


def require_data(subdir=""):
    """``data_dir() / subdir`` if it exists, else ``DataFileNotFoundError`` naming the path and the variable."""
    path = data_dir() / subdir if subdir else data_dir()
    if not path.exists():
        raise DataFileNotFoundError(
            f"data not found: {path} does not exist. Set the environment variable {DATA_DIR_ENV} to the folder "
            f"that holds the datasets (default: <repo>/../shared/data; now {DATA_DIR_ENV}="
            f"{os.environ.get(DATA_DIR_ENV, '')!r})"
        )
    return path


# ---------------------------------------------------------------------------------------------- raw bytes
def _check_file(path, what="file"):
    path = pathlib.Path(path)
    if not path.exists():
        raise DataFileNotFoundError(f"{what} not found: {path}")
    if path.is_dir():
        raise DataError(f"{path} is a directory, expected a {what}")
    return path


def _read_bytes(path, max_lines=None):
    """The bytes of a (possibly gzip-compressed) file, cut after ``max_lines`` lines when given."""
    path = _check_file(path)
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == _GZIP_MAGIC
        fh = gzip.open(path, "rb") if compressed else open(path, "rb")
        with fh:
            if max_lines is None:
                data = fh.read()
            else:
                parts, lines = [], 0
                while lines < max_lines:
                    chunk = fh.read(_CHUNK)
                    if not chunk:
                        break
                    parts.append(chunk)
                    lines += chunk.count(b"\n")
                data = b"".join(parts)
                if lines >= max_lines:
                    newlines = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
                    data = data[: int(newlines[max_lines - 1]) + 1]
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: corrupt or truncated gzip file ({type(e).__name__}: {e})") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({type(e).__name__}: {e.strerror or e})") from e
    if not data or data.isspace():  # isspace() stops at the first other byte: no copy of a large file
        raise DataError(f"{path}: the file is empty")
    return data


def _line_bounds(data):
    """Start and end offsets of every line (end excludes the newline)."""
    buf = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(buf == 10)
    if len(buf) and buf[-1] != 10:
        ends = np.append(ends, len(buf))
    starts = np.concatenate(([0], ends[:-1] + 1)).astype(np.int64)
    return buf, starts, ends


def _check_field_counts(data, sep, expected, path, first_line=1, hint=""):
    """Raises DataError at the first non-empty line whose field count is not ``expected`` (one-byte ``sep``).

    Returns the number of non-empty lines. ``first_line`` is the file line number of ``data``'s first line.
    """
    buf, starts, ends = _line_bounds(data)
    seps = np.flatnonzero(buf == ord(sep))
    fields = np.searchsorted(seps, ends) - np.searchsorted(seps, starts) + 1
    length = ends - starts
    has_cr = np.zeros(len(ends), dtype=bool)
    nonzero = length > 0
    has_cr[nonzero] = buf[ends[nonzero] - 1] == 13
    empty = (length - has_cr) == 0
    bad = (fields != expected) & ~empty
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        line = first_line + i
        truncated = i == len(ends) - 1 and (len(buf) == 0 or buf[-1] != 10) and fields[i] < expected
        reason = " (the file is truncated: its last line is cut short and has no line end)" if truncated else ""
        snippet = bytes(buf[starts[i]: min(ends[i], starts[i] + 80)]).decode("latin-1")
        raise DataError(
            f"{path}: line {line} has {int(fields[i])} fields, expected {expected}{reason}{hint}. "
            f"Line starts: {snippet!r}"
        )
    return int((~empty).sum())


def _file_line(data, row, first_line=1):
    """The file line of DataFrame row ``row`` (0-based), counting the blank lines pandas skips.

    ``first_line`` is the file line of row 0 when the file has no blank line (2 after a header). Without
    ``data`` (a file pandas read itself) it is ``first_line + row``. Only called to word an error.
    """
    if data is None:
        return first_line + row
    return int(_nonblank_lines(data)[row + first_line - 1]) + 1


def _nonblank_lines(data):
    """0-based indices of the lines of ``data`` that are not blank (a lone ``\\r`` counts as blank)."""
    buf, starts, ends = _line_bounds(data)
    length = ends - starts
    has_cr = np.zeros(len(ends), dtype=bool)
    has_cr[length > 0] = buf[ends[length > 0] - 1] == 13
    return np.flatnonzero(length - has_cr > 0)


def _require_line_end(data, path):
    """DataError when the last line has no line end: a file cut inside its last field still parses."""
    if not data.endswith(b"\n"):
        line = data.count(b"\n") + 1
        raise DataError(
            f"{path}: line {line}: the file ends without a newline: truncated? (a file cut "
            "inside its last field would load with a corrupted last row)"
        )


def _check_range(df, column, low, high, path, data, first_line=1, what="the dataset's range"):
    """DataError at the first row whose ``column`` is missing or outside ``[low, high]``."""
    values = df[column].to_numpy(dtype=np.float64)
    bad = ~((values >= low) & (values <= high))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        received = "nothing (empty field)" if np.isnan(values[i]) else repr(_py(values[i]))
        raise DataError(
            f"{path}: line {_file_line(data, i, first_line)}: {column} must be in [{low}, {high}] ({what}). "
            f"Received: {received}"
        )


def _py(value):
    """A NumPy scalar as the Python value, so messages read ``2.0``, not ``np.float64(2.0)``."""
    return value.item() if isinstance(value, np.generic) else value


def _parse(data, path, names=None, sep="\t", dtype=None, header=None, encoding="utf-8", quoted=False,
           usecols=None):
    kwargs = dict(sep=sep, header=header, names=names, encoding=encoding, keep_default_na=False, na_values=[""],
                  quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE, usecols=usecols, engine="c",
                  skip_blank_lines=True)
    try:
        return pd.read_csv(io.BytesIO(data), dtype=dtype, **kwargs)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: cannot decode the text as {encoding}: {e}") from e
    except (ValueError, pd.errors.ParserError) as e:
        raise _locate_bad_value(data, path, dtype, kwargs, e) from e


def _locate_bad_value(data, path, dtype, kwargs, error):
    """The DataError for a numeric field that does not parse, naming its line, column and value."""
    first_line = 1 if kwargs["header"] is None else 2
    try:
        raw = pd.read_csv(io.BytesIO(data), dtype=str, **kwargs)
    except (ValueError, pd.errors.ParserError):
        # Not a bad value but a malformed file (e.g. an unclosed quote): pandas' message names the line.
        return DataError(f"{path}: cannot parse the file: {error}")
    for col, kind in (dtype or {}).items():
        kind = np.dtype(kind) if kind is not str else None
        if kind is None or kind.kind not in "iuf" or col not in raw.columns:
            continue
        text = raw[col]
        values = pd.to_numeric(text, errors="coerce")
        missing = text.isna().to_numpy()
        bad = values.isna().to_numpy() & ~missing
        if kind.kind in "iu":
            bad |= missing | (values.notna().to_numpy() & (values.to_numpy(dtype=np.float64) % 1 != 0))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            what = "an integer" if kind.kind in "iu" else "a number"
            received = "nothing (empty field)" if missing[i] else repr(text.iloc[i])
            return DataError(f"{path}: line {_file_line(data, i, first_line)}: {col} must be {what}. "
                             f"Received: {received}")
    return DataError(f"{path}: cannot parse the file: {error}")


def _header(data, path, sep=","):
    first = data.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", errors="replace")
    return [c.strip().strip('"') for c in first.split(sep)]


def _require_header(columns, required, path):
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(f"{path}: missing column {missing[0]!r} in the header; the header has {columns}")


def _no_missing(df, columns, path, first_line=1, why="the line is incomplete", data=None):
    """DataError at the first row with a missing value in one of ``columns`` (mandatory fields)."""
    for col in columns:
        isna = df[col].isna().to_numpy()
        if isna.any():
            i = int(np.flatnonzero(isna)[0])
            raise DataError(f"{path}: line {_file_line(data, i, first_line)} has no value for {col!r} ({why})")


def _foreign_keys(df, column, keys, path, other, data=None, first_line=1):
    unknown = ~df[column].isin(keys).to_numpy()
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        raise DataError(
            f"{path}: line {_file_line(data, i, first_line)} refers to {column}={_py(df[column].iloc[i])!r}, "
            f"which {other} does not contain"
        )


def _nrows_arg(nrows):
    if nrows is None:
        return None
    if isinstance(nrows, bool) or not isinstance(nrows, (int, np.integer)) or nrows < 1:
        raise DataError(f"nrows must be a positive int or None. Received: nrows={nrows!r}")
    return int(nrows)


def _folder(path, files, dataset):
    path = pathlib.Path(path)
    if not path.is_dir():
        raise DataFileNotFoundError(f"{dataset} folder not found: {path}")
    for name in files:
        _check_file(path / name, what=f"{dataset} file {name!r}")
    return path


# --------------------------------------------------------------------------------------------- MovieLens
def _movielens_frame(ratings, users, items):
    df = ratings.merge(users, on="user_id", how="left").merge(items, on="item_id", how="left")
    df["rating"] = df["rating"].astype(np.float64)
    if "release_date" not in df.columns:
        df["release_date"] = pd.Series([None] * len(df), dtype=object)
    return df[list(MOVIELENS_COLUMNS)]


def read_movielens_100k(path):
    """MovieLens 100K (``ml-100k`` folder): 100,000 ratings joined with user and item features.

    Reads ``u.data`` (ratings), ``u.user``, ``u.item`` (latin-1) and ``u.genre``. ``genres`` joins the names
    (from ``u.genre``) of the item's 19 genre flags with ``"|"``; ``release_date`` is the text of ``u.item``
    (e.g. ``"01-Jan-1995"``, missing for one item); ``occupation`` is a name (``"technician"``).

    Returns:
        DataFrame with ``MOVIELENS_COLUMNS``, one row per rating, in ``u.data`` order.
    """
    path = _folder(path, ["u.data", "u.user", "u.item", "u.genre"], "MovieLens 100K")
    ratings_data = _read_bytes(path / "u.data")
    _check_field_counts(ratings_data, "\t", 4, path / "u.data")
    _require_line_end(ratings_data, path / "u.data")
    ratings = _parse(ratings_data, path / "u.data", ["user_id", "item_id", "rating", "timestamp"],
                     dtype={"user_id": np.int64, "item_id": np.int64, "rating": np.float64,
                            "timestamp": np.int64})
    _check_range(ratings, "rating", 1, 5, path / "u.data", ratings_data, what="ml-100k ratings are 1-5 stars")

    data = _read_bytes(path / "u.user")
    _check_field_counts(data, "|", 5, path / "u.user")
    _require_line_end(data, path / "u.user")
    users = _parse(data, path / "u.user", ["user_id", "age", "gender", "occupation", "zip_code"], sep="|",
                   dtype={"user_id": np.int64, "age": np.int64, "gender": str, "occupation": str, "zip_code": str})

    data = _read_bytes(path / "u.genre")
    _require_line_end(data, path / "u.genre")
    text = data.decode("latin-1")
    genre_names = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        name, sep, gid = line.rpartition("|")
        if not sep or not gid.strip().isdigit():
            raise DataError(f"{path / 'u.genre'}: line {n} is not 'name|id': {line!r}")
        genre_names[int(gid)] = name
    if sorted(genre_names) != list(range(len(genre_names))):
        raise DataError(f"{path / 'u.genre'}: genre ids must be 0..n-1. Received: {sorted(genre_names)}")
    names = [genre_names[i] for i in range(len(genre_names))]

    data = _read_bytes(path / "u.item")
    _check_field_counts(data, "|", 5 + len(names), path / "u.item")
    _require_line_end(data, path / "u.item")
    flag_cols = [f"g{i}" for i in range(len(names))]
    items = _parse(data, path / "u.item",
                   ["item_id", "title", "release_date", "video_release_date", "imdb_url"] + flag_cols, sep="|",
                   dtype={"item_id": np.int64, "title": str, "release_date": str, **{c: np.int64 for c in flag_cols}},
                   encoding="latin-1", usecols=["item_id", "title", "release_date"] + flag_cols)
    flags = items[flag_cols].to_numpy()
    if not np.isin(flags, (0, 1)).all():
        i = int(np.flatnonzero(~np.isin(flags, (0, 1)).all(axis=1))[0])
        raise DataError(f"{path / 'u.item'}: line {_file_line(data, i)} has a genre flag that is not 0 or 1")
    genre_arr = np.asarray(names, dtype=object)
    items["genres"] = ["|".join(genre_arr[row.astype(bool)]) for row in flags]
    items = items[["item_id", "title", "genres", "release_date"]]

    _foreign_keys(ratings, "user_id", users["user_id"], path / "u.data", "u.user", ratings_data)
    _foreign_keys(ratings, "item_id", items["item_id"], path / "u.data", "u.item", ratings_data)
    return _movielens_frame(ratings, users, items)


def _read_double_colon(file, names, dtype, encoding="latin-1"):
    # ``::`` needs pandas' slow python engine; titles never hold tabs, so "::" -> "\t" keeps the C parser.
    data = _read_bytes(file).replace(b"::", b"\t")
    _check_field_counts(data, "\t", len(names), file, hint=" ('::'-separated)")
    _require_line_end(data, file)
    return _parse(data, file, names, dtype=dtype, encoding=encoding), data


def read_movielens_1m(path):
    """MovieLens 1M (``ml-1m`` folder): ``ratings.dat``, ``users.dat``, ``movies.dat`` (``::``, latin-1).

    ML-1M codes ``age`` (1, 18, 25, 35, 45, 50, 56) and ``occupation`` (0-20) as ints, as its README
    describes; they are kept as codes. ML-1M has no release date (titles carry the year): ``release_date``
    is missing in every row, so the columns equal ``read_movielens_100k``'s.
    """
    path = _folder(path, ["ratings.dat", "users.dat", "movies.dat"], "MovieLens 1M")
    ratings, ratings_data = _read_double_colon(path / "ratings.dat", ["user_id", "item_id", "rating", "timestamp"],
                                 {"user_id": np.int64, "item_id": np.int64, "rating": np.float64,
                                  "timestamp": np.int64})
    users, _ = _read_double_colon(path / "users.dat", ["user_id", "gender", "age", "occupation", "zip_code"],
                               {"user_id": np.int64, "gender": str, "age": np.int64, "occupation": np.int64,
                                "zip_code": str})
    items, _ = _read_double_colon(path / "movies.dat", ["item_id", "title", "genres"],
                               {"item_id": np.int64, "title": str, "genres": str})
    _check_range(ratings, "rating", 1, 5, path / "ratings.dat", ratings_data,
                 what="ml-1m ratings are 1-5 stars")
    _foreign_keys(ratings, "user_id", users["user_id"], path / "ratings.dat", "users.dat", ratings_data)
    _foreign_keys(ratings, "item_id", items["item_id"], path / "ratings.dat", "movies.dat", ratings_data)
    return _movielens_frame(ratings, users, items)


def read_movielens_1m_sample(file):
    """DeepCTR's joined ML-1M sample CSV (``movielens_sample.txt``), in the columns of ``read_movielens_1m``.

    The file has the header ``user_id,movie_id,rating,timestamp,title,genres,gender,age,occupation,zip``.
    """
    data = _read_bytes(file)
    _require_line_end(data, file)
    src = ["user_id", "movie_id", "rating", "timestamp", "title", "genres", "gender", "age", "occupation", "zip"]
    _require_header(_header(data, file), src, file)
    df = _parse(data, file, header=0, sep=",", quoted=True, encoding="latin-1",
                dtype={"user_id": np.int64, "movie_id": np.int64, "rating": np.float64, "timestamp": np.int64,
                       "title": str, "genres": str, "gender": str, "age": np.int64, "occupation": np.int64,
                       "zip": str})
    _no_missing(df, ["genres", "gender", "zip"], file, first_line=2, data=data)
    _check_range(df, "rating", 1, 5, file, data, first_line=2, what="ml-1m ratings are 1-5 stars")
    df = df.rename(columns={"movie_id": "item_id", "zip": "zip_code"})
    df["release_date"] = pd.Series([None] * len(df), dtype=object)
    return df[list(MOVIELENS_COLUMNS)]


def read_movielens_latest(path):
    """MovieLens 20M / 25M / latest / latest-small: ``ratings.csv`` joined with ``movies.csv``.

    Returns ``MOVIELENS_LATEST_COLUMNS`` (``user_id, item_id, rating, timestamp, title, genres``); these
    releases have no user data. ``genres`` is kept as written (``"(no genres listed)"`` included). CRLF line
    ends are accepted.
    """
    path = _folder(path, ["ratings.csv", "movies.csv"], "MovieLens")
    file = path / "ratings.csv"
    data = _read_bytes(file)
    _require_header(_header(data, file), ["userId", "movieId", "rating", "timestamp"], file)
    _check_field_counts(data, ",", len(_header(data, file)), file)
    _require_line_end(data, file)
    ratings = _parse(data, file, header=0, sep=",",
                     dtype={"userId": np.int64, "movieId": np.int64, "rating": np.float64, "timestamp": np.int64})
    _check_range(ratings, "rating", 0.5, 5.0, file, data, first_line=2,
                 what="MovieLens latest / 20M ratings are 0.5-5.0 stars")
    ratings_data = data
    file = path / "movies.csv"
    data = _read_bytes(file)
    _require_line_end(data, file)
    _require_header(_header(data, file), ["movieId", "title", "genres"], file)
    movies = _parse(data, file, header=0, sep=",", quoted=True,
                    dtype={"movieId": np.int64, "title": str, "genres": str})
    _no_missing(movies, ["title", "genres"], file, first_line=2, data=data)
    ratings = ratings.rename(columns={"userId": "user_id", "movieId": "item_id"})
    movies = movies.rename(columns={"movieId": "item_id"})[["item_id", "title", "genres"]]
    _foreign_keys(ratings, "item_id", movies["item_id"], path / "ratings.csv", "movies.csv", ratings_data,
                  first_line=2)
    return ratings.merge(movies, on="item_id", how="left")[list(MOVIELENS_LATEST_COLUMNS)]


# ------------------------------------------------------------------------------------------------- Criteo
def _criteo_label(df, path, first_line, data=None):
    label = df["label"].to_numpy()
    bad = ~np.isin(label, (0.0, 1.0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: line {_file_line(data, i, first_line)}: label must be 0 or 1. "
                        f"Received: {_py(label[i])!r}")
    df["label"] = label.astype(np.int64)


def read_criteo(path, nrows=None, labeled=True):
    """Criteo Display Advertising Challenge TSV (``train.txt`` / ``test.txt``, plain or gzip).

    Args:
        path: the file.
        nrows: read only the first ``nrows`` lines.
        labeled: True for the 40-field train file (``label, I1..I13, C1..C26``), False for the 39-field
            unlabeled test file.

    Returns:
        DataFrame: ``label`` int64 (when labeled), ``I1..I13`` float64 (NaN where empty), ``C1..C26`` strings
        (missing where empty).

    Raises:
        DataError: the file is missing / unreadable / empty, or a line does not have 40 (39) fields, which
            also catches a file cut mid-line, or a value does not parse.
    """
    nrows = _nrows_arg(nrows)
    data = _read_bytes(path, max_lines=nrows)
    names = list(CRITEO_COLUMNS if labeled else CRITEO_COLUMNS[1:])
    other = "labeled=False (the 39-field test file)" if labeled else "labeled=True (the 40-field train file)"
    _check_field_counts(data, "\t", len(names), path, hint=f"; for the other Criteo layout pass {other}")
    _require_line_end(data, path)
    dtype = {c: np.float64 for c in CRITEO_NUMERIC}
    dtype.update({c: str for c in CRITEO_CATEGORICAL})
    if labeled:
        dtype["label"] = np.float64
    df = _parse(data, path, names, dtype=dtype)
    if labeled:
        _criteo_label(df, path, 1, data)
    return df


def read_criteo_csv(path, nrows=None):
    """DeepCTR's Criteo sample (``criteo_sample.txt``): CSV with header ``label,I1..I13,C1..C26``.

    Same columns and dtypes as ``read_criteo``. Numbers written as floats (``260.0``) are accepted.
    """
    nrows = _nrows_arg(nrows)
    data = _read_bytes(path, max_lines=None if nrows is None else nrows + 1)
    columns = _header(data, path)
    _require_header(columns, CRITEO_COLUMNS, path)
    _check_field_counts(data, ",", len(columns), path)
    _require_line_end(data, path)
    dtype = {c: np.float64 for c in ("label",) + CRITEO_NUMERIC}
    dtype.update({c: str for c in CRITEO_CATEGORICAL})
    df = _parse(data, path, header=0, sep=",", dtype=dtype)
    _no_missing(df, ["label"], path, first_line=2, data=data)
    _criteo_label(df, path, 2, data)
    return df[list(CRITEO_COLUMNS)]


# -------------------------------------------------------------------------------------------------- Avazu
def read_avazu(path, nrows=None):
    """Avazu CTR CSV (``train`` with ``click``, or ``test`` without), plain or gzip.

    Every original column is read as a string (they are all categorical, ``id`` is a 64-bit hash), except
    ``click`` (int64 0/1). ``hour`` (``YYMMDDHH``, e.g. ``14102100``) stays a string and also gives
    ``hour_of_day`` (0-23) and ``weekday`` (0 = Monday) int64 columns.
    """
    nrows = _nrows_arg(nrows)
    data = _read_bytes(path, max_lines=None if nrows is None else nrows + 1)
    columns = _header(data, path)
    _require_header(columns, [c for c in AVAZU_COLUMNS if c != "click"], path)
    _check_field_counts(data, ",", len(columns), path)
    dtype = {c: str for c in columns}
    if "click" in columns:
        dtype["click"] = np.float64
    df = _parse(data, path, header=0, sep=",", dtype=dtype)
    _no_missing(df, ["hour"], path, first_line=2, data=data)
    if "click" in df.columns:
        _no_missing(df, ["click"], path, first_line=2, data=data)
        click = df["click"].to_numpy()
        bad = ~np.isin(click, (0.0, 1.0))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{path}: line {_file_line(data, i, 2)}: click must be 0 or 1. "
                            f"Received: {_py(click[i])!r}")
        df["click"] = click.astype(np.int64)
    # Few distinct hours (240 in the whole train set): parse each once.
    codes, uniques = pd.factorize(df["hour"])
    parsed = pd.to_datetime(pd.Series(uniques, dtype=object), format="%y%m%d%H", errors="coerce")
    bad_unique = parsed.isna().to_numpy() | ~pd.Series(uniques, dtype=object).str.fullmatch(r"\d{8}").to_numpy()
    if bad_unique.any():
        i = int(np.flatnonzero(bad_unique[codes])[0])
        raise DataError(f"{path}: line {_file_line(data, i, 2)}: hour must be YYMMDDHH. "
                        f"Received: {df['hour'].iloc[i]!r}")
    df["hour_of_day"] = parsed.dt.hour.to_numpy(dtype=np.int64)[codes]
    df["weekday"] = parsed.dt.weekday.to_numpy(dtype=np.int64)[codes]
    return df


# ------------------------------------------------------------------------------------------------ generic
def read_csv(path, required_columns=None, **pandas_kwargs):
    """Any CSV with user-named columns: ``pandas.read_csv`` with tfemb's file errors.

    Args:
        path: the file (compression inferred by pandas).
        required_columns: columns that must be present and have no missing value.
        **pandas_kwargs: passed to ``pandas.read_csv`` (``sep``, ``dtype``, ``usecols``, ...).
    """
    path = _check_file(path)
    try:
        df = pd.read_csv(path, **pandas_kwargs)
    except pd.errors.EmptyDataError as e:
        raise DataError(f"{path}: the file is empty") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: cannot decode the text: {e}") from e
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: corrupt or truncated compressed file ({type(e).__name__}: {e})") from e
    except (ValueError, pd.errors.ParserError) as e:
        raise DataError(f"{path}: cannot parse the file: {e}") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({type(e).__name__}: {e})") from e
    if required_columns:
        _require_header(list(df.columns), required_columns, path)
        try:
            _no_missing(df, required_columns, path, first_line=2, why="a required column")
        except DataError:  # word the error with the file line where the rows map to lines one to one
            data = _csv_lines_data(path, len(df), pandas_kwargs)
            if data is None:
                col = next(c for c in required_columns if df[c].isna().any())
                i = int(np.flatnonzero(df[col].isna().to_numpy())[0])
                raise DataError(f"{path}: data row {i + 1} (after the header, blank lines not counted) has no "
                                f"value for {col!r} (a required column)") from None
            _no_missing(df, required_columns, path, first_line=2, why="a required column", data=data)
    return df


#: ``read_csv`` options under which DataFrame rows may not map to the file's non-blank lines one to one.
_ROW_MAPPING_KWARGS = ("skiprows", "header", "comment", "skipfooter", "skip_blank_lines", "nrows", "chunksize",
                       "compression", "names", "lineterminator", "quotechar", "escapechar", "quoting")


def _csv_lines_data(path, rows, pandas_kwargs):
    """The file's bytes (for ``_file_line``) when its non-blank lines are the header and one line per row
    of the DataFrame (no multi-line quoted fields, comments or skipped rows), else None."""
    if any(key in pandas_kwargs for key in _ROW_MAPPING_KWARGS) or path.suffix in (".bz2", ".zip", ".xz", ".zst", ".tar"):
        return None
    try:
        data = _read_bytes(path)
    except DataError:
        return None
    return data if len(_nonblank_lines(data)) == rows + 1 else None


# ------------------------------------------------------------------------------------------------ schemas
def movielens_schema(task="binary", with_side_features=False):
    """The Schema of the MovieLens CF tasks of AutoEmb / ESAPN.

    Features: ``user_id`` and ``item_id`` (categorical); with ``with_side_features`` also ``gender``, ``age``,
    ``occupation`` (categorical) and ``genres`` (multi-hot, ``"|"``-separated). Rows are ordered by
    ``timestamp`` for streaming.

    Labels, as in ESAPN's released preprocessing (``zgahhblhc/ESAPN``, ``data processing/
    preprocessing_movielens.py``), whose AutoEmb, DARTS and fixed-size baselines train on the same files:

    - ``"binary"``: 1 when ``rating >= 4`` else 0 (ESAPN writes ``rating > 3.5``; the same on MovieLens'
      0.5-step ratings), the usual "liked" cut of MovieLens CTR setups.
    - ``"multiclass"``: 5 classes, ``ceil(rating) - 1`` (ESAPN: ``floor(rating - 0.5)``; equal on 0.5-step
      ratings): 1 -> 0, ..., 5 -> 4, and 0.5 -> 0, 4.5 -> 4 on ml-latest / ml-20m.
    - ``"regression"``: the rating itself.
    """
    if task == "binary":
        label = Label("rating", "binary", threshold=4.0)
    elif task == "multiclass":
        label = Label("rating", "multiclass", num_classes=5, ratings=True)
    elif task == "regression":
        label = Label("rating", "regression")
    else:
        raise DataError(f"task must be 'binary', 'multiclass' or 'regression'. Received: task={task!r}")
    feats = [CategoricalFeature("user_id"), CategoricalFeature("item_id")]
    if with_side_features:
        feats += [CategoricalFeature("gender"), CategoricalFeature("age"), CategoricalFeature("occupation"),
                  MultiHotFeature("genres", separator="|", combiner="mean")]
    return Schema(feats, label=label, time_column="timestamp")


def criteo_schema(min_count=2, numeric="log", num_buckets=16, discretizer="log"):
    """The Schema of Criteo DAC: 13 numeric + 26 categorical features, binary ``label``.

    Args:
        min_count: categorical values seen fewer times in training share the OOV id 0. The default 2 suits
            samples of 10k-100k rows, where most hashes occur once: singletons then train the OOV row,
            which test rows with unseen values use. Full-data setups use larger cut-offs (DLRM's Criteo
            Terabyte preprocessing, for example, keeps values seen at least 15 times).
        numeric: ``"log"``: I1..I13 as floats, ``sign(x)·log(1+|x|)`` then standardised, missing -> 0 before
            the transform (raw inputs of the deep part, or embedded by ``RecModel(numeric_embeddings=...)``, e.g.
            AutoDis); ``"discretize"``: I1..I13 as ``num_buckets`` buckets (ids, missing -> id 0), embedded as
            categorical features.
        num_buckets: buckets per numeric feature when ``numeric="discretize"``.
        discretizer: how ``numeric="discretize"`` cuts the values, the three discretisations of the AutoDis
            paper: ``"log"`` (equal width on the log scale, the default), ``"equal_width"`` or
            ``"equal_frequency"`` (``NumericFeature(discretize=...)``).
    """
    if numeric == "log":
        nums = [NumericFeature(c, transform="log_standardize", fill_value=0.0) for c in CRITEO_NUMERIC]
    elif numeric == "discretize":
        nums = [NumericFeature(c, fill_value=0.0, discretize=discretizer, num_buckets=num_buckets)
                for c in CRITEO_NUMERIC]
    else:
        raise DataError(f"numeric must be 'log' or 'discretize'. Received: numeric={numeric!r}")
    cats = [CategoricalFeature(c, min_count=min_count) for c in CRITEO_CATEGORICAL]
    return Schema(nums + cats, label=Label("label", "binary"))
