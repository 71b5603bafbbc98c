"""The ``tfemb`` command: ``train``, ``compare``, ``inspect``, ``export``, ``serve``."""

import argparse
import json
import os
import sys


def _quiet_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def cmd_train(args):
    from tfemb import experiment, report

    cfg = experiment.load_config(args.config)
    if args.epochs is not None:
        cfg["train"]["epochs"] = args.epochs  # checked by run() with the rest of the recipe, before any data
    out_dir = args.out or os.path.join("runs", cfg["name"])
    result = experiment.run(cfg, out_dir=out_dir)
    result.pop("_model")
    print(report.console_table([{"metric": k, "value": v} for k, v in result["metrics"].items()]))
    print()
    print(report.console_table(result["tables"]))
    if result.get("numeric_tables"):  # numeric features embedded as fields (AutoDis, field embedding)
        print()
        print(report.console_table(result["numeric_tables"]))
    print(f"\nembedding parameters: {result['embedding_parameters']:,}  bytes: {result['embedding_bytes']:,}  "
          f"train: {result['train_seconds']:.1f}s ({result['examples_per_second']:,.0f} examples/s)")
    print(f"wrote {out_dir}/model.keras, schema.json, result.json")
    return 0


def _compare_spec(path):
    """The compare spec of ``--config`` PATH, checked (``tfemb.compare.check_spec``) before any data is read."""
    import yaml

    from tfemb import compare

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config: no file at {path}")
    with open(path) as fh:
        try:
            spec = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise ValueError(f"--config {path} is not valid YAML: {exc}") from exc
    if not isinstance(spec, dict):  # an empty file used to run the built-in main job instead
        raise ValueError(f"--config {path} must be a compare spec: a mapping with 'base' and 'variants'. "
                         f"Received: {'an empty file' if spec is None else type(spec).__name__}")
    compare.check_spec(spec, where=f"--config {path}")
    return spec


def _compare_out_dir(path):
    """Creates ``--out`` now: a path that is (or lies under) a file fails before any training."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out {path} is a file; give a directory (created when missing)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {path}: cannot create the directory ({exc.strerror or exc})") from exc


def cmd_compare(args):
    from tfemb import compare

    spec = _compare_spec(args.config) if args.config else None
    if args.quick:
        spec = compare.quick_spec(spec)
    _compare_out_dir(args.out)
    compare.run_compare(spec, out_dir=args.out, log=lambda m: (print(m), sys.stdout.flush()))
    return 0


def load_saved_model(path):
    """The Keras model of a ``.keras`` file or of a run directory (``tfemb train``'s ``model.keras``)."""
    from tfemb._keras import keras
    import tfemb.layers  # noqa: F401  (registers the schemes)
    import tfemb.models  # noqa: F401

    if os.path.isdir(path) and os.path.exists(os.path.join(path, "model.keras")):
        path = os.path.join(path, "model.keras")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no saved model at {path}: expected a .keras file or a run directory "
                                "(tfemb train writes <run>/model.keras)")
    import zipfile

    if not zipfile.is_zipfile(path):  # Keras would report a truncated archive as "File not found"
        raise ValueError(f"{path} is not a valid .keras archive (a zip file): corrupt or truncated?")
    return keras.models.load_model(path, compile=False)  # export and inspect need no optimizer or loss


def inspect_path(path):
    """Per-table rows, dims, parameters and bytes of a saved model (a ``.keras`` file or a run directory), or of
    an export (a SavedModel version directory or its parent: ``tfemb.export.report``)."""
    from tfemb.export.report import inspect_export, is_export, table_rows

    if is_export(path):
        return table_rows(inspect_export(path))
    _check_inspect_path(path)
    return load_saved_model(path).embedding_report()


def _check_inspect_path(path):
    """A clear error for a path ``tfemb inspect`` cannot read (neither a saved model nor an export): without it,
    a SavedModel's own file was called a corrupt .keras archive, and a folder of exports "no saved model"."""
    if os.path.basename(path) == "saved_model.pb" and os.path.isfile(path):
        raise ValueError(f"{path} is a SavedModel's graph file; inspect the export by its version directory "
                         f"({os.path.dirname(path) or '.'}) or the directory above it")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "model.keras")):
        raise FileNotFoundError(
            f"no saved model or export at {path}: expected a .keras file, a run directory (tfemb train writes "
            "<run>/model.keras), or an export (a SavedModel version directory or the directory of its integer "
            "versions)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file or directory: {path} (expected a .keras file, a run directory or "
                                "an export)")


def cmd_inspect(args):
    from tfemb import report
    from tfemb.export.report import console_report, inspect_export, is_export

    if is_export(args.path):  # an export: the full report (bytes on disk, per table, vs fixed)
        export = inspect_export(args.path)
        print(json.dumps(export, indent=2) if args.json else console_report(export))
        return 0
    rows = inspect_path(args.path)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        total = {"feature": "TOTAL", "parameters": sum(r["parameters"] for r in rows),
                 "bytes": sum(r["bytes"] for r in rows)}
        print(report.console_table(rows + [total]))
    return 0


def _read_rows(path):
    """Raw rows for warm-up requests: a CSV or Parquet file with the training columns."""
    import pandas as pd

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--warmup-rows: no file at {path}")
    return pd.read_parquet(path) if path.endswith((".parquet", ".pq")) else pd.read_csv(path)


def cmd_export(args):
    from tfemb.export import export_saved_model, inspect_export
    from tfemb.export.commands import log_serving_commands, serving_commands
    from tfemb.export.report import console_report
    from tfemb.models.rec_model import RecModel

    model = load_saved_model(args.model)
    if not isinstance(model, RecModel):
        raise ValueError(f"MODEL: {args.model} holds a {type(model).__name__}, not a tfemb RecModel")
    rows = _read_rows(args.warmup_rows) if args.warmup_rows else None
    reference = args.fixed_reference
    if reference == "estimate":
        reference = None
    try:
        path = export_saved_model(model, args.export_dir, version=args.version, overwrite=args.overwrite,
                                  table_dtype=args.table_dtype, warmup_rows=None if rows is None else rows.head(64),
                                  fixed_reference=reference, optimize_for=args.optimize_for)
    except FileExistsError as exc:
        if exc.errno is not None:  # from the OS (e.g. EXPORT_DIR is a file), not an existing version
            raise
        raise FileExistsError(f"{str(exc).split(';')[0]}; --overwrite replaces it") from exc
    report = inspect_export(path)
    if args.json:
        print(json.dumps({"path": path, "report": report}, indent=2))
        return 0
    print(console_report(report))
    print(f"\nexported to {path}\n")
    log_serving_commands(serving_commands(model, args.export_dir, rows=rows),
                         log=lambda m: (print(m), sys.stdout.flush()))
    return 0


def cmd_serve(args):
    from tfemb.serving import server

    try:
        return server.serve(args.export_dir, port=args.port, grpc_port=args.grpc_port, host=args.host,
                            model_name=args.model_name, model_config=args.model_config,
                            poll_seconds=args.poll_seconds, max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                            max_batch_size=args.max_batch_size, allow_version_labels_for_unavailable_models=(
                                args.allow_version_labels_for_unavailable_models),
                            out=lambda m: (print(m), sys.stdout.flush()))
    except (OSError, ValueError) as exc:  # a port in use, an address that is not ours, a bad --max-batch-size
        print(f"tfemb serve: error: {exc}", file=sys.stderr)
        return 2


def _true_false(text):
    """A TF Serving boolean flag's value (``--flag=true``)."""
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false. Received: {text!r}")


def build_parser():
    parser = argparse.ArgumentParser(prog="tfemb", description="Embedding-size methods for Keras recommenders")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train and evaluate one recipe (models/*.yaml)")
    p.add_argument("--config", required=True, help="YAML recipe")
    p.add_argument("--out", help="output directory (default runs/<name>)")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("compare", help="every scheme vs the fixed baseline on the embedded default data")
    p.add_argument("--config", help="YAML compare spec (base + variants); default: the built-in main job")
    p.add_argument("--out", default="outputs/compare",
                   help="output directory (default outputs/compare); an earlier run's files there are replaced, "
                        "the export is added as a new version")
    p.add_argument("--quick", action="store_true",
                   help="a small, fast run (for smoke tests): 1 epoch and at most 8,000 rows of synthetic CTR data")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("inspect", help="per-table rows, dims, parameters and bytes of a saved model or an export")
    p.add_argument("path", help="a .keras model, a run directory, or an export (a SavedModel version directory or "
                                "its parent)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("export", help="export a trained model as a compact SavedModel version for TF Serving")
    p.add_argument("model", metavar="MODEL", help="a run directory (tfemb train's output) or a .keras file")
    p.add_argument("export_dir", metavar="EXPORT_DIR",
                   help="the model's export directory (TF Serving's base_path): writes EXPORT_DIR/<version>/")
    p.add_argument("--version", type=int, help="version number (default: the next free one)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing version")
    p.add_argument("--table-dtype", choices=["float16", "int8", "int16"],
                   help="store the tables in float16, or in int8 / int16 with a per-row scale")
    p.add_argument("--optimize-for", choices=["size", "latency"], default="size",
                   help="the smallest compact forms (default) or the faster ones where a scheme has one")
    p.add_argument("--fixed-reference", default="estimate", metavar="{estimate,export,PATH}",
                   help="the report's fixed-embedding baseline: estimated (default), exported and measured, or "
                        "the path of a fixed export")
    p.add_argument("--warmup-rows", metavar="FILE", help="CSV or Parquet of raw rows: the export's warm-up "
                                                         "requests (first 64) and the printed example")
    p.add_argument("--json", action="store_true", help="print the path and the export report as JSON")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("serve", help="serve SavedModel exports over TF Serving's REST and gRPC APIs (local)")
    p.add_argument("export_dir", metavar="EXPORT_DIR",
                   help="a model's export dir (integer version subdirs) or a dir of such model dirs")
    p.add_argument("--port", type=int, default=8501, help="REST port (default 8501; 0: any free port; -1: off)")
    p.add_argument("--grpc-port", type=int, default=8500, help="gRPC port (default 8500; 0: any free; -1: off)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--model-name", help="name of the single model (default: the base name of EXPORT_DIR)")
    p.add_argument("--model-config", help="TF Serving models.config; relative base_paths are under EXPORT_DIR")
    p.add_argument("--poll-seconds", type=float, default=1.0, help="seconds between checks for new versions")
    p.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body, MiB (default 16)")
    p.add_argument("--max-batch-size", type=int, metavar="N",
                   help="refuse requests of more than N rows, as TF Serving with batching does (serving/"
                        "batching.config: 256); default: no limit")
    p.add_argument("--allow_version_labels_for_unavailable_models", "--allow-version-labels-for-unavailable-models",
                   nargs="?", const=True, default=False, type=_true_false, metavar="true|false",
                   help="TF Serving's flag: let --model-config's version_labels name versions not loaded yet "
                        "(labels are assigned before any version loads: without it a labelled config is refused)")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv=None):
    _quiet_tensorflow()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError, KeyError) as exc:  # OSError: a missing file, a path that is a file, ...
        print(f"tfemb {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
