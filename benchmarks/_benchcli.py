"""Command-line helpers shared by the benchmark scripts (not a benchmark: ``run_all.py`` does not run it).

- ``default_out(quick)``: where a run writes when ``--out`` is not given: ``benchmarks/results`` (the committed
  figures) for a full run, ``outputs/bench-quick`` for a ``--quick`` run, as ``run_all.py --quick`` does, so a
  check of a script never writes over the committed results unless ``--out benchmarks/results`` asks for it.
- ``check_out(parser, out)``: ``--out`` must be a folder this process can create or write into; checked before
  any work, so a long run does not end in a traceback.
- ``split_list`` / ``check_min`` / ``check_file``: argument checks that end in ``parser.error`` naming the flag
  and the value (exit status 2, no traceback).
- ``command_line(script, argv)``: the shell command that reproduces a run, for the Markdown reports.
- ``parse_seeded(parser, argv, script, minimums)``: ``--quick`` / ``--out`` / ``--seeds`` handling of the scripts
  that repeat a spec over seeds (``dhe.py``, ``autodis.py``).
"""

import argparse
import os
import pathlib
import shlex
import sys

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
QUICK_OUT = REPO / "outputs" / "bench-quick"


def default_out(quick=False):
    """The default ``--out``: ``outputs/bench-quick`` for a quick run, else ``benchmarks/results``."""
    return str(QUICK_OUT if quick else RESULTS)


def check_out(parser, out, flag="--out"):
    """``parser.error`` unless ``out`` is (or can be created as) a writable folder. Creates nothing."""
    path = pathlib.Path(out).expanduser()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file" if probe == path else f"cannot be created: {probe} is a file"
        parser.error(f"{flag} must be a folder. Received: {out!r} ({where})")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == path else f" (cannot be created in {probe})"
        parser.error(f"{flag} is not writable. Received: {out!r}{where}")
    return str(path)


def check_file(parser, path, flag):
    """``parser.error`` unless ``path`` (when given) is a readable file."""
    if path is not None and not pathlib.Path(path).expanduser().is_file():
        parser.error(f"{flag} must be an existing file. Received: {path!r}")
    return path


def check_min(parser, args, minimums):
    """``{attribute: minimum}``: ``parser.error`` for the first given value below its minimum (None is skipped)."""
    for name, minimum in minimums.items():
        value = getattr(args, name)
        if value is not None and value < minimum:
            parser.error(f"--{name.replace('_', '-')} must be >= {minimum}. Received: {value!r}")


def split_list(parser, flag, text, convert=str, allowed=None, check=None, what="values"):
    """A comma list of ``text``, each item converted and checked; ``parser.error`` names the flag and the item.

    ``convert`` raises ValueError (or ``argparse.ArgumentTypeError``) for a bad item; ``allowed`` lists the
    accepted values; ``check(value)`` returns a message for a value out of range, or None. At least one item.
    """
    values = []
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        try:
            value = convert(item)
        except argparse.ArgumentTypeError as err:  # its message names the value
            parser.error(f"{flag}: {err}")
        except (ValueError, TypeError):
            parser.error(f"{flag} takes a comma list of {what}. Received: {item!r}")
        if allowed is not None and value not in allowed:
            parser.error(f"{flag} must be among {', '.join(map(str, allowed))}. Received: {item!r}")
        problem = check(value) if check else None
        if problem:
            parser.error(f"{flag}: {problem}. Received: {item!r}")
        values.append(value)
    if not values:
        parser.error(f"{flag} needs at least one value. Received: {text!r}")
    return values


def argv_text(argv=None):
    """The arguments of a run, quoted for a shell; ``argv`` defaults to ``sys.argv[1:]``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return " ".join(shlex.quote(str(a)) for a in argv)


def command_line(script, argv=None):
    """``python benchmarks/<script> <args>`` quoted for a shell; ``argv`` defaults to ``sys.argv[1:]``."""
    return f"python benchmarks/{script} {argv_text(argv)}".strip()


def parse_seeded(parser, argv, script, minimums):
    """Adds ``--quick`` (its help: the parser's default ``quick_help``, ``parser.set_defaults(quick_help=...)``) and
    ``--out``, parses ``argv``,
    records the command line, fills the default ``--out``, checks ``minimums`` and ``--out``; ``--quick`` runs one
    seed. Returns the arguments."""
    parser.add_argument("--quick", action="store_true", help=parser.get_default("quick_help"))
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/results; --quick: "
                        "outputs/bench-quick)")
    args = parser.parse_args(argv)
    args.command = command_line(script, argv)
    if args.out is None:
        args.out = default_out(args.quick)
    check_min(parser, args, minimums)
    check_out(parser, args.out)
    if args.quick:
        args.seeds = 1
    return args


def runnable_datasets(datasets, folders):
    """``datasets`` without those whose data folder (``folders[name]``, below ``$TFEMB_DATA_DIR``) is absent, each
    skipped with the path and the reason printed."""
    from tfemb.data.readers import data_dir

    kept = []
    for name in datasets:
        folder = folders.get(name)
        if folder is not None and not (data_dir() / folder).is_dir():
            print(f"SKIPPED {name}: data folder {data_dir() / folder} is absent (set TFEMB_DATA_DIR to the folder "
                  "holding it).")
            continue
        kept.append(name)
    return kept


def write_results(out, name, payload, markdown_text, plot):
    """Writes ``<out>/<name>.json`` (``payload``), ``<name>.md`` and, through ``plot(path)``, ``<name>.png``; prints
    the Markdown and what was written."""
    import json
    import pathlib

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    (out / f"{name}.md").write_text(markdown_text)
    plot(out / f"{name}.png")
    print(markdown_text)
    print(f"wrote {out / (name + '.json')}, {name}.md and {name}.png")
