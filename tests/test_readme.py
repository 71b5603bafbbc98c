"""The README's Python examples run as a new user would paste them: in a fresh process, in an empty folder.

The blocks of "Use it from Python" and "Export and serve" share their variables (the export block exports the
model the first block trained), so they run together, in order; the streaming block reads MovieLens 100K and
runs on its own, skipped with the reason where that folder is absent.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from tfemb.data.readers import data_dir

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
STREAMING = [b for b in BLOCKS if "prepare_stream" in b]
OTHERS = [b for b in BLOCKS if "prepare_stream" not in b]


def run_python(source, cwd):
    env = dict(os.environ, MPLBACKEND="Agg", TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-c", source], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_readme_has_the_examples():
    assert len(STREAMING) == 1 and len(OTHERS) >= 2, [b.splitlines()[0] for b in BLOCKS]
    assert any("export_saved_model" in b for b in OTHERS)


def test_readme_training_and_export_examples_run(tmp_path):
    proc = run_python("\n".join(OTHERS), tmp_path)
    assert proc.returncode == 0, f"README example failed:\n{proc.stderr[-4000:]}"
    assert "'scheme': 'DoubleHashingEmbedding'" in proc.stdout  # the embedding report was printed
    assert "'C8', 'I1', 'I2']" in proc.stdout  # the numeric features as fields (AutoDis)
    assert (tmp_path / "exports" / "deepfm" / "1" / "saved_model.pb").is_file()  # the path the comment names


def test_readme_streaming_example_runs(tmp_path):
    folder = data_dir() / "movielens-100k"
    if not folder.exists():
        pytest.skip(f"real dataset {folder} is absent (set TFEMB_DATA_DIR to the folder holding movielens-100k/)")
    proc = run_python(STREAMING[0], tmp_path)
    assert proc.returncode == 0, f"README streaming example failed:\n{proc.stderr[-4000:]}"
    assert "'rows': 25000" in proc.stdout  # the last 25% of ML-100K's 100,000 ratings
