"""Every benchmark script answers ``--help`` (argparse formats every help string: a stray ``%`` fails there)."""

import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", BENCHMARKS, ids=[p.name for p in BENCHMARKS])
def test_benchmark_help(script):
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout and "--" in done.stdout


def _run_all():
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_all", BENCHMARKS[0].parent / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_all_lists_every_benchmark_and_its_quick_flag():
    """``make bench`` (run_all.py) runs every script of the folder; ``--quick`` only where the script has it."""
    run_all = _run_all()
    scripts = {p.stem for p in BENCHMARKS} - {"run_all"}
    assert set(run_all.BENCHMARKS) == scripts
    for name, quick in run_all.BENCHMARKS.items():
        assert quick == ('"--quick"' in (BENCHMARKS[0].parent / f"{name}.py").read_text()), name


def test_run_all_dry_run_and_bad_names(tmp_path, capsys):
    run_all = _run_all()
    assert run_all.main(["--quick", "--dry-run", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "md_ablation: skipped (no --quick run)" in printed
    assert f"streaming.py --out {tmp_path} --quick" in printed and f"outputs in {tmp_path}" in printed
    args = run_all.parse_args(["--quick"])
    assert args.out.endswith("outputs/bench-quick")  # a quick check never writes over the committed results
    assert run_all.parse_args([]).out.endswith("benchmarks/results")
    with pytest.raises(SystemExit):
        run_all.parse_args(["--only", "nope"])
