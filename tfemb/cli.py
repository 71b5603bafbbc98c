"""The ``tfemb`` command: ``train``, ``compare``, ``inspect``."""

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
    """Per-table rows, dims, parameters and bytes of a saved model (a ``.keras`` file or a run directory)."""
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

    rows = inspect_path(args.path)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        total = {"feature": "TOTAL", "parameters": sum(r["parameters"] for r in rows),
                 "bytes": sum(r["bytes"] for r in rows)}
        print(report.console_table(rows + [total]))
    return 0


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
    p = sub.add_parser("inspect", help="per-table rows, dims, parameters and bytes of a saved model")
    p.add_argument("path", help="a .keras model or a run directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)
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
