"""Every tutorial notebook runs: its code cells, in order, in a fresh Python process (under this Keras mode).

Jupyter is not a dependency: a notebook is JSON, its code cells are plain Python (no magics), and running them
top to bottom in one interpreter is what "Run all" does. Notebooks are kept without outputs.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))

RUNNER = """
import json, sys
cells = json.load(open(sys.argv[1], encoding="utf-8"))["cells"]
source = "\\n\\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
exec(compile(source, sys.argv[1], "exec"), {"__name__": "__main__"})
"""


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_clean(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [] and cell.get("execution_count") is None, "commit notebooks without outputs"
            assert not any(line.lstrip().startswith(("%", "!")) for line in cell["source"]), "no IPython magics"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    # A user runs the notebook in notebooks/: it must leave no files there, and remove the temporary
    # directories it makes (exports, servers' model dirs), so both get a folder of their own here.
    workdir, tempdir = tmp_path / "cwd", tmp_path / "tmp"
    workdir.mkdir()
    tempdir.mkdir()
    env = dict(os.environ, MPLBACKEND="Agg", TF_CPP_MIN_LOG_LEVEL="2", TMPDIR=str(tempdir))
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(path)], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{path.name} failed:\n{proc.stderr[-4000:]}"
    assert sorted(p.name for p in workdir.iterdir()) == [], f"{path.name} left files in the working directory"
    assert sorted(p.name for p in tempdir.iterdir()) == [], f"{path.name} left temporary files"
