"""Runs every benchmark of this folder in turn (``make bench``), each in its own process.

Each script writes its JSON + Markdown (and plots) into ``--out``. A full run uses the scripts' defaults
(their documented full runs: about 3-3.6 hours on 2 CPU cores, most of it ``md_sweep.py``, ``pep_sweep.py``,
``autodis.py`` and ``low_precision.py``)
and writes into ``benchmarks/results``, replacing the committed results. ``--quick`` passes ``--quick`` to the
scripts that have it (the others are left out) and writes into ``outputs/bench-quick``, so a check of the
scripts never overwrites the committed figures. Datasets missing from ``$TFEMB_DATA_DIR`` (default
``../shared/data``) are skipped by each script with a message.

    python benchmarks/run_all.py --quick                 # every script's small run, ~12.5 min (7.3 on 2 cores
                                                         # before autodis.py's ~3 and low_precision.py's
                                                         # ~1.5 min joined)
    python benchmarks/run_all.py --only streaming,md_ablation
    python benchmarks/run_all.py --dry-run               # print the commands only
"""

import argparse
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _benchcli  # noqa: E402

#: Script name -> whether it has ``--quick``. In the order they run: the short ones first.
BENCHMARKS = {
    "real_data": False,
    "dhe": True,
    "autodis": True,
    "low_precision": True,
    "serving_latency": True,
    "streaming": True,
    "throughput": True,
    "md_ablation": False,
    "md_sweep": True,
    "pep_sweep": True,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="each script's --quick run (scripts without one are skipped)")
    p.add_argument("--only", default=None, help=f"comma list of {', '.join(BENCHMARKS)}")
    p.add_argument("--out", default=None,
                   help="output folder (default: benchmarks/results; with --quick: outputs/bench-quick)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    names = list(BENCHMARKS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            p.error(f"--only takes {', '.join(BENCHMARKS)}. Received: {unknown[0]!r}")
    if not names:
        p.error(f"--only needs at least one of {', '.join(BENCHMARKS)}. Received: {args.only!r}")
    args.names = names
    if args.out is None:
        args.out = _benchcli.default_out(args.quick)
    _benchcli.check_out(p, args.out)
    return args


def commands(args):
    """``[(name, argv or None)]``: None for a script left out (no ``--quick`` in a quick run)."""
    out = []
    for name in args.names:
        if args.quick and not BENCHMARKS[name]:
            out.append((name, None))
            continue
        argv = [sys.executable, str(HERE / f"{name}.py"), "--out", args.out] + (["--quick"] if args.quick else [])
        out.append((name, argv))
    return out


def main(argv=None):
    args = parse_args(argv)
    plan = commands(args)
    results = []
    start = time.perf_counter()
    for i, (name, command) in enumerate(plan, 1):
        if command is None:
            print(f"[{i}/{len(plan)}] {name}: skipped (no --quick run)", flush=True)
            results.append((name, "skipped", 0.0))
            continue
        print(f"[{i}/{len(plan)}] {name}: {' '.join(command[1:])}  ({time.perf_counter() - start:.0f}s elapsed)",
              flush=True)
        if args.dry_run:
            results.append((name, "dry run", 0.0))
            continue
        t = time.perf_counter()
        code = subprocess.call(command, cwd=str(REPO))
        results.append((name, "ok" if code == 0 else f"FAILED (exit {code})", time.perf_counter() - t))
    print("\n| benchmark | status | minutes |\n|---|---|---|")
    for name, status, seconds in results:
        print(f"| {name} | {status} | {seconds / 60:.1f} |")
    print(f"\noutputs in {args.out}")
    failed = [name for name, status, _ in results if status.startswith("FAILED")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
