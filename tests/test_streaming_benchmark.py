"""benchmarks/streaming.py on the embedded synthetic stream: the per-seed runs and the interleaved timing pass.

One small run (3,000 rows, FSE / AutoEmb / ESAPN, 1 seed, ~1 min): every method has its quality row, and the
interleaved timing pass timed every method on the same batches (all but the first two), with ratios to FSE
that are the quotients of the measured rates, and its table is in the Markdown.
"""

import json
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "streaming.py"


def test_streaming_benchmark_interleaved_timing(tmp_path):
    rows, batch = 3000, 500
    done = subprocess.run([sys.executable, str(SCRIPT), "--datasets", "synthetic", "--tasks", "binary", "--methods",
                           "fse,autoemb,esapn", "--seeds", "1", "--max-rows", str(rows), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads((tmp_path / "streaming.json").read_text())
    assert {r["method"] for r in payload["runs"]} == {"fse", "autoemb", "esapn"}
    timing = payload["timing"]["synthetic"]["binary"]
    assert set(timing) == {"fse", "autoemb", "esapn"}
    for method, t in timing.items():
        assert t["batches"] == rows // batch and t["passes"] == 1
        assert t["timed_rows"] == rows - 2 * batch  # the first two batches (tracing) are not timed
        assert t["examples_per_second"] > 0 and t["cpu_ms_per_example"] > 0
        assert t["time_per_example_vs_fse"] == pytest.approx(
            timing["fse"]["examples_per_second"] / t["examples_per_second"])
        assert t["cpu_vs_fse"] == pytest.approx(t["cpu_ms_per_example"] / timing["fse"]["cpu_ms_per_example"])
    assert timing["fse"]["time_per_example_vs_fse"] == pytest.approx(1.0)
    md = (tmp_path / "streaming.md").read_text()
    assert "## Time per example, interleaved" in md
    line = next(l for l in md.splitlines() if l.startswith("| synthetic / binary |"))
    assert f"{timing['autoemb']['time_per_example_vs_fse']:.2f}×" in line
