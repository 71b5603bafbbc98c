"""The ``tfemb`` command: ``train``, ``compare``, ``inspect``, ``serve``."""

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
        cfg["train"]["epochs"] = args.epochs
    out_dir = args.out or os.path.join("runs", cfg["name"])
    result = experiment.run(cfg, out_dir=out_dir)
    result.pop("_model")
    print(report.console_table([{"metric": k, "value": v} for k, v in result["metrics"].items()]))
    print()
    print(report.console_table(result["tables"]))
    print(f"\nembedding parameters: {result['embedding_parameters']:,}  bytes: {result['embedding_bytes']:,}  "
          f"train: {result['train_seconds']:.1f}s ({result['examples_per_second']:,.0f} examples/s)")
    print(f"wrote {out_dir}/model.keras, schema.json, result.json")
    return 0


def cmd_compare(args):
    from tfemb import compare, experiment

    spec = None
    if args.config:
        import yaml

        with open(args.config) as fh:
            spec = yaml.safe_load(fh)
    if args.quick:
        spec = experiment.merge(spec or compare.DEFAULT_COMPARE, {})
        spec["base"] = experiment.merge(spec["base"], {"data": {"params": {"num_rows": 8000}}, "train": {"epochs": 1}})
    compare.run_compare(spec, out_dir=args.out, log=lambda m: (print(m), sys.stdout.flush()))
    return 0


def inspect_path(path):
    """Per-table rows, dims, parameters and bytes of a saved model (a ``.keras`` file or a run directory), or of
    an export (a SavedModel version directory or its parent: ``tfemb.export.report``)."""
    from tfemb.export.report import inspect_export, is_export, table_rows

    if is_export(path):
        return table_rows(inspect_export(path))
    from tfemb._keras import keras
    import tfemb.layers  # noqa: F401  (registers the schemes)
    import tfemb.models  # noqa: F401

    if os.path.isdir(path) and os.path.exists(os.path.join(path, "model.keras")):
        path = os.path.join(path, "model.keras")
    if not os.path.exists(path):
        raise FileNotFoundError(f"nothing to inspect at {path}: expected a .keras file or a run directory")
    model = keras.models.load_model(path)
    return model.embedding_report()


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


def cmd_serve(args):
    from tfemb.serving import server

    try:
        return server.serve(args.export_dir, port=args.port, grpc_port=args.grpc_port, host=args.host,
                            model_name=args.model_name, model_config=args.model_config,
                            poll_seconds=args.poll_seconds, max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                            out=lambda m: (print(m), sys.stdout.flush()))
    except OSError as exc:  # a port in use, an address that is not ours
        print(f"tfemb serve: error: {exc}", file=sys.stderr)
        return 2


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
    p.add_argument("--out", default="outputs/compare", help="output directory (default outputs/compare)")
    p.add_argument("--quick", action="store_true", help="a small, fast run (for smoke tests)")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("inspect", help="per-table rows, dims, parameters and bytes of a saved model or an export")
    p.add_argument("path", help="a .keras model, a run directory, or an export (a SavedModel version directory or "
                                "its parent)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)
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
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv=None):
    _quiet_tensorflow()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"tfemb {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
