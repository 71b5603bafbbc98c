"""Readers: the real shared datasets (skipped when absent), tiny files in the real formats, and bad files."""

import gzip
import os
import pathlib
import time

import numpy as np
import pandas as pd
import pytest

from tfemb.data import readers
from tfemb.data.readers import (
    AVAZU_COLUMNS,
    CRITEO_COLUMNS,
    MOVIELENS_COLUMNS,
    MOVIELENS_LATEST_COLUMNS,
    DataFileNotFoundError,
    criteo_schema,
    data_dir,
    movielens_schema,
    read_avazu,
    read_criteo,
    read_criteo_csv,
    read_csv,
    read_movielens_1m,
    read_movielens_1m_sample,
    read_movielens_100k,
    read_movielens_latest,
    require_data,
)
from tfemb.data.schema import MultiHotFeature, Schema
from tfemb.errors import DataError


def shared(subdir):
    """The real dataset folder, or skip (the data is never in the repository)."""
    try:
        return require_data(subdir)
    except DataFileNotFoundError as e:
        pytest.skip(f"real data not available: {e}")


# ------------------------------------------------------------------------------------------- locations
def test_data_dir_default_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv("TFEMB_DATA_DIR", raising=False)
    repo = pathlib.Path(readers.__file__).resolve().parents[2]
    assert data_dir() == (repo.parent / "shared" / "data").resolve()
    monkeypatch.setenv("TFEMB_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    (tmp_path / "criteo").mkdir()
    assert require_data("criteo") == tmp_path / "criteo"


def test_require_data_names_path_and_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("TFEMB_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataFileNotFoundError, match=r"nowhere/criteo does not exist.*TFEMB_DATA_DIR") as info:
        require_data("criteo")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, DataError)


# ----------------------------------------------------------------------------------------- real data
def test_real_movielens_100k():
    t = time.perf_counter()
    df = read_movielens_100k(shared("movielens-100k"))
    elapsed = time.perf_counter() - t
    assert list(df.columns) == list(MOVIELENS_COLUMNS)
    assert len(df) == 100_000
    assert df["user_id"].nunique() == 943 and df["item_id"].nunique() == 1682
    assert df["rating"].value_counts().sort_index().tolist() == [6110, 11370, 27145, 34174, 21201]
    assert df.groupby("user_id").size().min() >= 20
    assert df["user_id"].dtype == np.int64 and df["timestamp"].dtype == np.int64
    assert not df[["age", "gender", "occupation", "zip_code", "title", "genres"]].isna().any().any()
    toy = df[df["item_id"] == 1].iloc[0]
    assert toy["title"] == "Toy Story (1995)"
    assert toy["genres"] == "Animation|Children's|Comedy"
    assert toy["release_date"] == "01-Jan-1995"
    assert df["title"].str.contains("Misérables").any()  # latin-1 decoded
    assert elapsed < 2.0


def test_real_movielens_100k_schema_fits():
    df = read_movielens_100k(shared("movielens-100k"))
    schema = movielens_schema("binary", with_side_features=True).fit(df)
    x, y = schema.transform(df)
    assert schema.vocabulary_size("user_id") == 944 and schema.vocabulary_size("item_id") == 1683
    assert int(y.sum()) == 34174 + 21201
    assert schema.feature("genres").vocabulary.size == 20  # 19 genres + OOV
    assert x["genres"].shape == (100_000, 6)
    freq = schema.frequencies("item_id")
    assert freq[1] == df["item_id"].value_counts().max() and np.all(np.diff(freq[1:]) <= 0)


def test_real_movielens_latest_small():
    folder = shared("movielens-latest-small")
    df = read_movielens_latest(folder)
    assert list(df.columns) == list(MOVIELENS_LATEST_COLUMNS)
    assert len(df) == 100_836
    assert df["user_id"].nunique() == 610
    assert len(read_csv(folder / "movies.csv", required_columns=["movieId", "title", "genres"])) == 9742
    assert set(np.unique(df["rating"])) <= set(np.arange(1, 11) / 2.0)
    assert not df["title"].isna().any() and not df["title"].str.endswith("\r").any()
    assert not df["genres"].str.endswith("\r").any()  # CRLF stripped
    y = movielens_schema("multiclass").fit(df).transform(df)[1]
    assert sorted(np.unique(y)) == [0, 1, 2, 3, 4]


def test_real_movielens_1m_sample():
    df = read_movielens_1m_sample(shared("movielens-1m-sample") / "deepctr_movielens_sample.txt")
    assert list(df.columns) == list(MOVIELENS_COLUMNS)
    assert len(df) == 200
    assert df["rating"].value_counts().sort_index().tolist() == [10, 23, 54, 65, 48]
    assert df["release_date"].isna().all()
    assert (df["title"].str.contains(", The")).any()  # quoted titles with commas


def test_real_criteo_train_head():
    path = shared("criteo") / "criteo_train_head10k.txt"
    t = time.perf_counter()
    df = read_criteo(path)
    elapsed = time.perf_counter() - t
    assert list(df.columns) == list(CRITEO_COLUMNS)
    assert len(df) == 10_000
    assert int(df["label"].sum()) == 2182 and round(df["label"].mean() * 100, 2) == 21.82
    assert df["label"].dtype == np.int64
    assert all(df[f"I{i}"].dtype == np.float64 for i in range(1, 14))
    assert df["I12"].isna().any() and df["C22"].isna().any()
    assert df["C1"].dropna().str.fullmatch(r"[0-9a-f]{8}").all()
    assert elapsed < 1.0, f"reading 10k Criteo rows took {elapsed:.2f}s"
    head = read_criteo(path, nrows=100)
    assert len(head) == 100
    pd.testing.assert_frame_equal(head, df.iloc[:100])


def test_real_criteo_schema_round_trip():
    df = read_criteo(shared("criteo") / "criteo_train_head10k.txt")
    for numeric in ("log", "discretize"):
        schema = criteo_schema(numeric=numeric).fit(df.iloc[:8000])
        x, y = schema.transform(df.iloc[8000:])
        again = Schema.from_json(schema.to_json()).transform(df.iloc[8000:])[0]
        for name in x:
            np.testing.assert_array_equal(again[name], x[name])
        assert schema.frequencies("C3")[0] > 0  # min_count=2: singletons share the OOV id


def test_real_criteo_test_unlabeled():
    path = shared("criteo") / "criteo_test_head10k_unlabeled.txt"
    df = read_criteo(path, labeled=False)
    assert df.shape == (10_000, 39) and "label" not in df.columns
    assert df.iloc[0]["I2"] == 29.0 and np.isnan(df.iloc[0]["I1"])
    with pytest.raises(DataError, match=r"line 1 has 39 fields, expected 40.*labeled=False"):
        read_criteo(path)


def test_real_criteo_deepctr_csv():
    df = read_criteo_csv(shared("criteo") / "deepctr_criteo_sample.txt")
    assert list(df.columns) == list(CRITEO_COLUMNS)
    assert len(df) == 200 and int(df["label"].sum()) == 49
    assert df.iloc[0]["I3"] == 260.0 and np.isnan(df.iloc[0]["I1"])


# ------------------------------------------------------------------------------------ tiny MovieLens files
GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]


def _flags(*names):
    return "|".join("1" if g in names else "0" for g in GENRES)


def _write_100k(folder, data=None):
    folder.mkdir(exist_ok=True)
    (folder / "u.data").write_text(data or "1\t10\t5\t881250949\n2\t20\t3\t891717742\n1\t20\t1\t878887116\n")
    (folder / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|T8H1N\n")
    (folder / "u.item").write_bytes(
        ("10|Misérables, Les (1995)|01-Jan-1995||http://x|" + _flags("Drama", "War") + "\n"
         + "20|unknown|||http://y|" + _flags("unknown") + "\n").encode("latin-1"))
    (folder / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(GENRES)) + "\n")
    return folder


def test_movielens_100k_tiny(tmp_path):
    df = read_movielens_100k(_write_100k(tmp_path / "ml-100k"))
    assert list(df.columns) == list(MOVIELENS_COLUMNS)
    assert df["user_id"].tolist() == [1, 2, 1] and df["rating"].tolist() == [5.0, 3.0, 1.0]
    assert df["genres"].tolist() == ["Drama|War", "unknown", "unknown"]
    assert df["title"].iloc[0] == "Misérables, Les (1995)"
    assert df["zip_code"].tolist() == ["85711", "T8H1N", "85711"]
    assert df["release_date"].iloc[0] == "01-Jan-1995" and pd.isna(df["release_date"].iloc[1])


def test_movielens_100k_truncated_and_missing(tmp_path):
    folder = _write_100k(tmp_path / "ml-100k", data="1\t10\t5\t881250949\n2\t20")
    with pytest.raises(DataError, match=r"u.data: line 2 has 2 fields, expected 4 \(the file is truncated"):
        read_movielens_100k(folder)
    (folder / "u.data").write_text("1\t10\t5\t881250949\n2\t\t3\t891717742\n")
    with pytest.raises(DataError, match=r"u.data: line 2: item_id must be an integer. Received: nothing"):
        read_movielens_100k(folder)
    (folder / "u.data").write_text("1\t10\t5\t881250949\n2\t1.5\t3\t891717742\n")
    with pytest.raises(DataError, match=r"u.data: line 2: item_id must be an integer. Received: '1.5'"):
        read_movielens_100k(folder)
    (folder / "u.data").write_text("1\t10\t5\t881250949\n7\t20\t3\t891717742\n")
    with pytest.raises(DataError, match=r"u.data: line 2 refers to user_id=7, which u.user does not contain"):
        read_movielens_100k(folder)
    (folder / "u.genre").unlink()
    with pytest.raises(DataFileNotFoundError, match=r"MovieLens 100K file 'u.genre' not found: .*u.genre"):
        read_movielens_100k(folder)
    with pytest.raises(DataFileNotFoundError, match=r"MovieLens 100K folder not found: .*absent"):
        read_movielens_100k(tmp_path / "absent")


def _write_1m(folder, ratings=None):
    folder.mkdir(exist_ok=True)
    default = "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n"
    (folder / "ratings.dat").write_text(ratings or default)
    (folder / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    (folder / "movies.dat").write_bytes(
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n661::Star Wars: Episode I (1999)::Action|Sci-Fi\n"
        "3::Amélie (2001)::Comedy|Romance\n".encode("latin-1"))
    return folder


def test_movielens_1m_tiny(tmp_path):
    df = read_movielens_1m(_write_1m(tmp_path / "ml-1m"))
    assert list(df.columns) == list(MOVIELENS_COLUMNS)
    assert df["item_id"].tolist() == [1193, 661, 1193]
    assert df["title"].tolist()[1] == "Star Wars: Episode I (1999)"
    assert df["genres"].tolist() == ["Drama", "Action|Sci-Fi", "Drama"]
    assert df["age"].tolist() == [1, 1, 56] and df["occupation"].tolist() == [10, 10, 16]
    assert df["release_date"].isna().all()
    schema = movielens_schema("regression", with_side_features=True).fit(df)
    assert schema.transform(df)[1].tolist() == [5.0, 3.0, 4.0]


def test_movielens_1m_bad_rows(tmp_path):
    folder = _write_1m(tmp_path / "ml-1m", ratings="1::1193::5::978300760\n1::661::3\n")
    with pytest.raises(DataError, match=r"ratings.dat: line 2 has 3 fields, expected 4 \('::'-separated\)"):
        read_movielens_1m(folder)
    _write_1m(folder, ratings="1::1193::5::978300760\n1::999::3::978302109\n")
    with pytest.raises(DataError, match=r"line 2 refers to item_id=999, which movies.dat does not contain"):
        read_movielens_1m(folder)


def test_movielens_1m_sample_tiny(tmp_path):
    path = tmp_path / "sample.txt"
    path.write_text("user_id,movie_id,rating,timestamp,title,genres,gender,age,occupation,zip\n"
                    '517,105,4,976203603,"Bridges of Madison County, The (1995)",Drama|Romance,F,25,14,55408\n')
    df = read_movielens_1m_sample(path)
    assert df["title"].iloc[0] == "Bridges of Madison County, The (1995)"
    assert df["item_id"].iloc[0] == 105 and df["zip_code"].iloc[0] == "55408"
    path.write_text("user_id,movie_id,rating,timestamp,title,genres,gender,age,occupation,zip\n"
                    '517,105,4,976203603,"Bridges (1995)",Drama,F,25\n')
    with pytest.raises(DataError, match=r"sample.txt: line 2: occupation must be an integer. Received: nothing"):
        read_movielens_1m_sample(path)
    path.write_text("user_id,movie_id,rating,timestamp,title,genres,gender,age,occupation,zip\n"
                    '517,105,4,976203603,"Bridges (1995)",Drama,F,25,14\n')
    with pytest.raises(DataError, match=r"sample.txt: line 2 has no value for 'zip'"):
        read_movielens_1m_sample(path)


def _write_latest(folder, ratings=None):
    folder.mkdir(exist_ok=True)
    (folder / "ratings.csv").write_bytes((ratings or "userId,movieId,rating,timestamp\r\n1,1,4.0,964982703\r\n"
                                          "1,2,0.5,964981247\r\n2,1,3.5,964982224\r\n").encode())
    (folder / "movies.csv").write_bytes('movieId,title,genres\r\n1,"American President, The (1995)",Comedy|Drama'
                                        '|Romance\r\n2,Some Film (2017),(no genres listed)\r\n'.encode())
    return folder


def test_movielens_latest_tiny_crlf_and_quotes(tmp_path):
    df = read_movielens_latest(_write_latest(tmp_path / "ml-latest"))
    assert list(df.columns) == list(MOVIELENS_LATEST_COLUMNS)
    assert df["rating"].tolist() == [4.0, 0.5, 3.5]
    assert df["title"].tolist()[0] == "American President, The (1995)"
    assert df["genres"].tolist() == ["Comedy|Drama|Romance", "(no genres listed)", "Comedy|Drama|Romance"]
    y = movielens_schema("binary").fit(df).transform(df)[1]
    assert y.tolist() == [1.0, 0.0, 0.0]


def test_movielens_latest_truncated(tmp_path):
    folder = _write_latest(tmp_path / "ml-latest",
                           ratings="userId,movieId,rating,timestamp\r\n1,1,4.0,964982703\r\n1,2,0.")
    with pytest.raises(DataError, match=r"ratings.csv: line 3 has 3 fields, expected 4 \(the file is truncated"):
        read_movielens_latest(folder)
    (folder / "ratings.csv").write_text("user,movie,rating,timestamp\n1,1,4.0,1\n")
    with pytest.raises(DataError, match=r"missing column 'userId' in the header"):
        read_movielens_latest(folder)


# ------------------------------------------------------------------------------------------ tiny Criteo
def _criteo_line(label, seed):
    rng = np.random.default_rng(seed)
    ints = ["" if rng.random() < 0.3 else str(int(rng.integers(-2, 500))) for _ in range(13)]
    cats = ["" if rng.random() < 0.2 else f"{int(rng.integers(0, 2**32)):08x}" for _ in range(26)]
    fields = ([] if label is None else [str(label)]) + ints + cats
    return "\t".join(fields)


def _criteo_text(n=5, labeled=True):
    return "".join(_criteo_line(i % 2 if labeled else None, i) + "\n" for i in range(n))


def test_criteo_tiny_values(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(_criteo_text())
    df = read_criteo(path)
    assert df.shape == (5, 40) and df["label"].tolist() == [0, 1, 0, 1, 0]
    raw = [line.split("\t") for line in path.read_text().splitlines()]
    for i, fields in enumerate(raw):
        for j, col in enumerate(CRITEO_COLUMNS[1:14], start=1):
            expected = np.nan if fields[j] == "" else float(fields[j])
            np.testing.assert_equal(df[col].iloc[i], expected)
        for j, col in enumerate(CRITEO_COLUMNS[14:], start=14):
            assert (pd.isna(df[col].iloc[i]) and fields[j] == "") or df[col].iloc[i] == fields[j]


def test_criteo_all_trailing_fields_empty(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("1" + "\t" * 39 + "\n" + "0\t3" + "\t" * 38 + "\n")
    df = read_criteo(path)
    assert df.shape == (2, 40) and df["I1"].tolist()[1] == 3.0 and df["C26"].isna().all()


def test_criteo_gzip_and_corrupt_gzip(tmp_path):
    path = tmp_path / "train.txt.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(_criteo_text(6))
    df = read_criteo(path, nrows=4)
    assert len(df) == 4
    pd.testing.assert_frame_equal(df, read_criteo(path).iloc[:4])
    blob = path.read_bytes()
    (tmp_path / "cut.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"cut.gz: corrupt or truncated gzip file"):
        read_criteo(tmp_path / "cut.gz")
    (tmp_path / "bad.gz").write_bytes(blob[:10] + b"\x00garbage" * 20)
    with pytest.raises(DataError, match=r"bad.gz: corrupt or truncated gzip file"):
        read_criteo(tmp_path / "bad.gz")


def test_criteo_truncated_mid_line(tmp_path):
    text = _criteo_text(3)
    path = tmp_path / "cut.txt"
    path.write_text(text[: len(text) - 60])
    with pytest.raises(DataError, match=r"cut.txt: line 3 has \d+ fields, expected 40 \(the file is truncated"):
        read_criteo(path)


def test_criteo_wrong_field_counts_are_not_dropped(tmp_path):
    lines = _criteo_text(4).splitlines()
    lines[1] = lines[1] + "\textra"
    path = tmp_path / "long.txt"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"long.txt: line 2 has 41 fields, expected 40"):
        read_criteo(path)
    lines = _criteo_text(4).splitlines()
    lines[2] = "\t".join(lines[2].split("\t")[:-1])
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"line 3 has 39 fields, expected 40"):
        read_criteo(path)


def test_criteo_bad_values(tmp_path):
    fields = _criteo_line(1, 0).split("\t")
    fields[4] = "abc"
    path = tmp_path / "bad.txt"
    path.write_text(_criteo_text(2) + "\t".join(fields) + "\n")
    with pytest.raises(DataError, match=r"bad.txt: line 3: I4 must be a number. Received: 'abc'"):
        read_criteo(path)
    fields = _criteo_line(1, 0).split("\t")
    fields[0] = "2"
    path.write_text("\t".join(fields) + "\n")
    with pytest.raises(DataError, match=r"bad.txt: line 1: label must be 0 or 1. Received: 2.0"):
        read_criteo(path)


def test_criteo_unlabeled_tiny(tmp_path):
    path = tmp_path / "test.txt"
    path.write_text(_criteo_text(3, labeled=False))
    assert read_criteo(path, labeled=False).shape == (3, 39)
    with pytest.raises(DataError, match=r"line 1 has 39 fields, expected 40"):
        read_criteo(path)
    with pytest.raises(DataError, match=r"nrows must be a positive int or None. Received: nrows=0"):
        read_criteo(path, nrows=0)


def test_criteo_csv_tiny(tmp_path):
    path = tmp_path / "sample.csv"
    row = ["1", "", "3", "260.0"] + [""] * 10 + ["05db9164"] + [""] * 25
    path.write_text(",".join(CRITEO_COLUMNS) + "\n" + ",".join(row) + "\n")
    df = read_criteo_csv(path)
    assert df["label"].tolist() == [1] and df["I3"].tolist() == [260.0] and df["C1"].tolist() == ["05db9164"]
    path.write_text(",".join(CRITEO_COLUMNS) + "\n" + ",".join(row[:20]) + "\n")
    with pytest.raises(DataError, match=r"sample.csv: line 2 has 20 fields, expected 40"):
        read_criteo_csv(path)


# ------------------------------------------------------------------------------------------- tiny Avazu
AVAZU_ROWS = [
    "1000009418151094273,0,14102100,1005,0,1fbe01fe,f3845767,28905ebd,ecad2386,7801e8d9,07d7df22,a99f214a,"
    "ddd2926e,44956a24,1,2,15706,320,50,1722,0,35,-1,79",
    "10000169349117863715,1,14102813,1005,0,1fbe01fe,f3845767,28905ebd,ecad2386,7801e8d9,07d7df22,a99f214a,"
    "96809ac8,711ee120,1,0,15704,320,50,1722,0,35,100084,79",
]


def test_avazu_tiny(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text(",".join(AVAZU_COLUMNS) + "\n" + "\n".join(AVAZU_ROWS) + "\n")
    df = read_avazu(path)
    assert list(df.columns) == list(AVAZU_COLUMNS) + ["hour_of_day", "weekday"]
    assert df["click"].tolist() == [0, 1] and df["click"].dtype == np.int64
    assert df["id"].tolist()[1] == "10000169349117863715"  # beyond int64: kept as text
    assert df["C20"].tolist() == ["-1", "100084"]
    assert df["hour"].tolist() == ["14102100", "14102813"]
    assert df["hour_of_day"].tolist() == [0, 13]
    assert df["weekday"].tolist() == [1, 1]  # 2014-10-21 and 2014-10-28 were Tuesdays
    assert len(read_avazu(path, nrows=1)) == 1


def test_avazu_test_file_without_click(tmp_path):
    path = tmp_path / "test.csv"
    header = [c for c in AVAZU_COLUMNS if c != "click"]
    rows = [r.split(",") for r in AVAZU_ROWS]
    path.write_text(",".join(header) + "\n" + "\n".join(",".join(r[:1] + r[2:]) for r in rows) + "\n")
    df = read_avazu(path)
    assert "click" not in df.columns and df["weekday"].tolist() == [1, 1]


def test_avazu_bad_files(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text(",".join(AVAZU_COLUMNS) + "\n" + AVAZU_ROWS[0] + "\n" + AVAZU_ROWS[1][:40])
    with pytest.raises(DataError, match=r"train.csv: line 3 has 6 fields, expected 24 \(the file is truncated"):
        read_avazu(path)
    path.write_text(",".join(AVAZU_COLUMNS) + "\n" + AVAZU_ROWS[0].replace("14102100", "14103299") + "\n")
    with pytest.raises(DataError, match=r"train.csv: line 2: hour must be YYMMDDHH. Received: '14103299'"):
        read_avazu(path)
    path.write_text("id,click,when\n1,0,14102100\n")
    with pytest.raises(DataError, match=r"missing column 'hour' in the header"):
        read_avazu(path)


# ------------------------------------------------------------------------------------- generic & errors
def test_read_csv_generic(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("u,i,y\na,1,0\nb,2,1\n")
    df = read_csv(path, required_columns=["u", "y"], dtype={"u": str})
    assert df["u"].tolist() == ["a", "b"]
    with pytest.raises(DataError, match=r"missing column 'z' in the header"):
        read_csv(path, required_columns=["z"])
    path.write_text("u,i,y\na,1,0\nb,2,\n")
    with pytest.raises(DataError, match=r"d.csv: line 3 has no value for 'y'"):
        read_csv(path, required_columns=["y"])
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(DataError, match=r"e.csv: the file is empty"):
        read_csv(tmp_path / "e.csv")
    (tmp_path / "x.csv.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DataError, match=r"x.csv.gz: corrupt or truncated compressed file"):
        read_csv(tmp_path / "x.csv.gz")
    path.write_text('u,i\n"a,1\n')
    with pytest.raises(DataError, match=r"d.csv: cannot parse the file"):
        read_csv(path)


def test_read_csv_names_the_file_line_past_blank_lines(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("u,y\n\na,0\n\r\n\nb,\n")  # blank lines (one with CRLF) before the bad row, file line 6
    with pytest.raises(DataError, match=r"d.csv: line 6 has no value for 'y'"):
        read_csv(path, required_columns=["y"])
    gz = tmp_path / "d.csv.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    with pytest.raises(DataError, match=r"d.csv.gz: line 6 has no value for 'y'"):
        read_csv(gz, required_columns=["y"])
    # A quoted field over two lines: rows no longer map to lines one to one, so the row is named instead.
    path.write_text('u,y\n"a\nb",0\n\nc,\n')
    with pytest.raises(DataError, match=r"d.csv: data row 2 \(after the header, blank lines not counted\) has no "
                                        r"value for 'y'"):
        read_csv(path, required_columns=["y"])
    path.write_text("# comment\nu,y\na,\n")
    with pytest.raises(DataError, match=r"data row 1 .* 'y'"):
        read_csv(path, required_columns=["y"], comment="#")


@pytest.mark.parametrize("reader", [read_criteo, read_criteo_csv, read_avazu, read_csv, read_movielens_1m_sample])
def test_missing_empty_and_directory(reader, tmp_path):
    with pytest.raises(DataFileNotFoundError, match=r"not found: .*absent.txt"):
        reader(tmp_path / "absent.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty.txt: the file is empty"):
        reader(tmp_path / "empty.txt")
    with pytest.raises(DataError, match=r"is a directory"):
        reader(tmp_path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read files without permission")
def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.txt"
    path.write_text(_criteo_text(2))
    path.chmod(0)
    try:
        with pytest.raises(DataError, match=r"locked.txt: cannot read the file \(PermissionError"):
            read_criteo(path)
    finally:
        path.chmod(0o600)


def test_unreadable_file_simulated(tmp_path, monkeypatch):
    path = tmp_path / "locked.txt"
    path.write_text(_criteo_text(2))

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(readers, "open", deny, raising=False)
    with pytest.raises(DataError, match=r"locked.txt: cannot read the file \(PermissionError: Permission denied\)"):
        read_criteo(path)


def test_undecodable_text(tmp_path):
    path = tmp_path / "sample.txt"
    path.write_bytes(b"user_id,movie_id,rating,timestamp,title,genres,gender,age,occupation,zip\n"
                     b"1,2,4,9,Caf\xe9 (1999),Drama,F,25,4,55408\n")
    assert read_movielens_1m_sample(path)["title"].tolist() == ["Café (1999)"]  # latin-1 by design
    (tmp_path / "u.csv").write_bytes(b"a,b\n\xff\xfe,1\n")
    with pytest.raises(DataError, match=r"u.csv: cannot decode the text"):
        read_csv(tmp_path / "u.csv", encoding="utf-8")


# ------------------------------------------------------------------------------------------------ schemas
@pytest.mark.parametrize("task, expected", [
    ("binary", [0.0, 0.0, 1.0, 1.0]), ("multiclass", [0, 2, 3, 4]), ("regression", [1.0, 3.0, 4.0, 5.0])])
def test_movielens_schema_tasks(task, expected):
    df = pd.DataFrame({"user_id": [1, 2, 1, 3], "item_id": [5, 5, 6, 7], "rating": [1, 3, 4, 5],
                       "timestamp": [4, 3, 2, 1]})
    schema = movielens_schema(task)
    assert schema.names == ["user_id", "item_id"] and schema.time_column == "timestamp"
    x, y = schema.fit_transform(df)
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(x["user_id"], [1, 2, 1, 3])


def test_movielens_schema_side_features():
    schema = movielens_schema(with_side_features=True)
    assert schema.names == ["user_id", "item_id", "gender", "age", "occupation", "genres"]
    assert isinstance(schema.feature("genres"), MultiHotFeature)
    with pytest.raises(DataError, match=r"task must be 'binary', 'multiclass' or 'regression'. Received: task='rank'"):
        movielens_schema("rank")


def test_criteo_schema_layout():
    schema = criteo_schema()
    assert len(schema.dense_features) == 13 and len(schema.sparse_features) == 26
    assert schema.feature("C1").min_count == 2
    assert schema.feature("I1").transform == "log_standardize" and schema.feature("I1").fill_value == 0
    disc = criteo_schema(min_count=5, numeric="discretize", num_buckets=8)
    assert len(disc.sparse_features) == 39 and disc.feature("I5").discretize == "log"
    assert disc.feature("I5").num_buckets == 8 and disc.feature("C9").min_count == 5
    with pytest.raises(DataError, match=r"numeric must be 'log' or 'discretize'. Received: numeric='raw'"):
        criteo_schema(numeric="raw")
    with pytest.raises(DataError, match=r"C1: min_count must be an int >= 1. Received: min_count=0"):
        criteo_schema(min_count=0)
