"""Every benchmark script answers ``--help`` (argparse formats every help string: a stray ``%`` fails there)."""

import pathlib
import subprocess
import sys

import pytest

#: The scripts (``_*.py`` are helpers the scripts import, not benchmarks).
BENCHMARKS = sorted(p for p in (pathlib.Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py")
                    if not p.name.startswith("_"))


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
        assert quick == ("--quick" in _help_text(name)), name


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


# --------------------------------------------------------------------------------------------------------------
# What a researcher runs: bad arguments, --out, missing data, the command in the Markdown. All in-process, no
# training (each check stops before the first model is built).
def _load(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS[0].parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parse(module, argv):
    return module.parse_args(argv)


def _help_text(name):
    """A script's ``--help`` text, in-process (argparse prints it and exits)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        _parse(_load(name), ["--help"])
    return out.getvalue()


BAD_ARGUMENTS = [
    ("md_sweep", ["--alphas", "abc"], "--alphas", "'abc'"),
    ("md_sweep", ["--budgets", "foo"], "--budgets", "'foo'"),
    ("md_sweep", ["--seeds", "0"], "--seeds", "0"),
    ("md_sweep", ["--datasets", "nope"], "--datasets", "'nope'"),
    ("md_ablation", ["--seeds", "-1"], "--seeds", "-1"),
    ("md_ablation", ["--tasks", "nope"], "--tasks", "'nope'"),
    ("pep_sweep", ["--targets", "abc"], "--targets", "'abc'"),
    ("pep_sweep", ["--targets", "1.5"], "--targets", "'1.5'"),
    ("pep_sweep", ["--seeds", "-1"], "--seeds", "-1"),
    ("pep_sweep", ["--datasets", "nope"], "--datasets", "'nope'"),
    ("pep_sweep", ["--models", "nope"], "--models", "'nope'"),
    ("pep_sweep", ["--models", "deepfm", "--datasets", "ml100k"], "--models", "deepfm --datasets ml100k"),
    ("streaming", ["--candidates", "a,b"], "--candidates", "'a'"),
    ("streaming", ["--seeds", "-2"], "--seeds", "-2"),
    ("streaming", ["--max-rows", "-5"], "--max-rows", "-5"),
    ("streaming", ["--findings", "/nonexistent/findings.md"], "--findings", "/nonexistent/findings.md"),
    ("serving_latency", ["--calls-b1", "0"], "--calls-b1", "0"),
    ("serving_latency", ["--schemes", "nope"], "--schemes", "'nope'"),
    ("throughput", ["--steps", "-3"], "--steps", "-3"),
    ("throughput", ["--vocab-scale", "0"], "--vocab-scale", "0"),
    ("real_data", ["--seeds", "-1"], "--seeds", "-1"),
    ("dhe", ["--seeds", "0"], "--seeds", "0"),
    ("autodis", ["--seeds", "0"], "--seeds", "0"),
    ("autodis", ["--buckets", "1"], "--buckets", "1"),
    ("autodis", ["--datasets", "avazu"], "--datasets", "'avazu'"),
    ("low_precision", ["--seeds", "0"], "--seeds", "0"),
    ("low_precision", ["--bits", "1"], "--bits", "'1'"),
    ("low_precision", ["--alpt-learning-rates", "0"], "--alpt-learning-rates", "'0'"),
]


@pytest.mark.parametrize("name,argv,flag,value", BAD_ARGUMENTS, ids=[f"{b[0]}{b[1]}" for b in BAD_ARGUMENTS])
def test_bad_arguments_name_the_flag_and_the_value(name, argv, flag, value, capsys, tmp_path):
    """A bad value is a usage error (exit status 2) naming the flag and the value, not a traceback or a run."""
    module = _load(name)
    with pytest.raises(SystemExit) as info:
        _parse(module, argv + ["--out", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and value in err, err


@pytest.mark.parametrize("name", ["md_sweep", "md_ablation", "pep_sweep", "streaming", "serving_latency",
                                  "throughput", "real_data", "dhe", "autodis", "low_precision", "run_all"])
def test_out_that_cannot_be_a_folder_is_refused_before_any_work(name, tmp_path, capsys):
    module = _load(name)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as info:
        _parse(module, ["--out", str(blocker / "sub")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--out" in err and str(blocker / "sub") in err, err


@pytest.mark.parametrize("name", ["md_sweep", "pep_sweep", "streaming", "serving_latency", "throughput", "dhe",
                                  "autodis", "low_precision"])
def test_quick_runs_never_default_to_the_committed_results(name):
    """``python benchmarks/<script>.py --quick`` (as the README shows it) writes into outputs/bench-quick, as
    ``run_all.py --quick`` does; only a full run (or an explicit --out) writes into benchmarks/results."""
    module = _load(name)
    assert _parse(module, ["--quick"]).out.endswith("outputs/bench-quick")
    assert _parse(module, []).out.endswith("benchmarks/results")


def test_streaming_quick_keeps_the_options_given():
    streaming = _load("streaming")
    args = _parse(streaming, ["--quick", "--datasets", "synthetic", "--methods", "fse,esapn"])
    assert args.datasets == ["synthetic"] and args.methods == ["fse", "esapn"] and args.max_rows == 20000
    args = _parse(streaming, ["--quick"])
    assert args.datasets == ["ml100k"] and args.methods == ["fse", "autoemb", "esapn"] and args.seeds == 1


@pytest.mark.parametrize("name,argv,written", [
    ("md_sweep", ["--datasets", "ml100k", "--throughput-repeats", "0"], "md_sweep.json"),
    ("md_sweep", ["--datasets", "ml100k", "--throughput-only"], "md_sweep.json"),
    ("md_ablation", ["--datasets", "ml100k-mf"], "md_ablation.json"),
    ("pep_sweep", ["--datasets", "ml100k"], "pep_sweep.json"),
    ("pep_sweep", ["--datasets", "ml100k", "--timing-only"], "pep_timing.json"),
    ("streaming", ["--datasets", "ml100k"], "streaming.json"),
    ("dhe", [], "dhe.json"),
    ("autodis", ["--datasets", "criteo"], "autodis.json"),
    ("low_precision", ["--datasets", "criteo"], "low_precision.json"),
])
def test_missing_data_leaves_the_results_folder_as_it_is(name, argv, written, tmp_path, monkeypatch, capsys):
    """With the data folder absent every dataset is skipped with the reason and nothing is written: an empty
    report must never replace the results already in --out (``make bench`` on a machine without the data)."""
    monkeypatch.setenv("TFEMB_DATA_DIR", str(tmp_path / "nowhere"))
    out = tmp_path / "results"
    out.mkdir()
    committed = '{"committed": true}'
    (out / written).write_text(committed)
    _load(name).main(argv + ["--out", str(out)])
    printed = capsys.readouterr().out
    assert str(tmp_path / "nowhere") in printed and "nothing written" in printed
    assert sorted(p.name for p in out.iterdir()) == [written] and (out / written).read_text() == committed


def _committed(name):
    import json

    return json.loads((BENCHMARKS[0].parent / "results" / f"{name}.json").read_text())


def test_markdown_states_the_command_that_reproduces_it(tmp_path):
    import argparse

    command = "python benchmarks/x.py --schemes 'md per-field 4x' --out /tmp/o"
    real_data = _load("real_data")
    report = dict(_committed("real_data"), command=command)
    assert f"`{command}`" in real_data.markdown(report)
    pep = _load("pep_sweep")
    payload = _committed("pep_sweep")
    payload["args"]["command"] = command
    assert f"`{command}`" in pep.markdown(payload)
    throughput = _load("throughput")
    saved = _committed("throughput")
    saved["meta"]["command"] = command
    assert f"`{command}`" in throughput.markdown(saved["runs"], saved["summary"], saved["meta"])
    serving = _load("serving_latency")
    payload = _committed("serving_latency")
    payload["config"]["command"] = command
    args = argparse.Namespace(out=str(tmp_path), quick=False)
    serving.write_outputs(args, payload, payload["table"], lambda *a, **k: None)
    assert f"`{command}`" in (tmp_path / "serving_latency.md").read_text()
    # The scripts record their own command line, quoted for a shell.
    assert _parse(serving, ["--schemes", "md per-field 4x", "--out", str(tmp_path)]).command == (
        f"python benchmarks/serving_latency.py --schemes 'md per-field 4x' --out {tmp_path}")
    assert _parse(real_data, ["--seeds", "0", "--out", str(tmp_path)]).command == (
        f"python benchmarks/real_data.py --seeds 0 --out {tmp_path}")


def test_throughput_default_matrix_is_the_documented_one():
    """benchmarks/README.md: the full run is 4 schemes x 2 Keras x 2 optimizers (16 tfemb runs), --quick the 4
    schemes under Keras 3 with lazy Adam; MD is measured on request (--schemes fixed md md_field)."""
    throughput = _load("throughput")
    full, quick = _parse(throughput, []), _parse(throughput, ["--quick"])
    assert full.schemes == quick.schemes == ["fixed", "hashing", "qr", "double_hashing"]
    assert len(full.schemes) * len(full.keras) * len(full.optimizers) == 16
    assert _parse(throughput, ["--schemes", "fixed", "md", "md_field"]).schemes == ["fixed", "md", "md_field"]
