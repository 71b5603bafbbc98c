"""How to serve and query an export: the ``tfemb serve`` command, a curl request and the Python client calls.

Printed by ``tfemb compare`` (``tfemb.compare.export_best``) and ``tfemb export`` after they write an export.
"""

import json
import os
import shlex

from tfemb.export.saved_model import model_input_names, output_spec, raw_inputs


def example_row(model, rows=None):
    """One row of raw values the export's ``serving_default`` takes, as JSON-ready lists.

    ``rows`` (a DataFrame or a dict of raw values): its first row without missing values among the model's
    inputs. Without rows: each vocabulary's most frequent value, 0.0 for numbers.
    """
    names = model_input_names(model)
    if rows is None:
        rows = {}
        for feature_name in names:
            feature = model.schema.feature(feature_name)
            vocab = getattr(feature, "vocabulary", None) if feature.kind in ("categorical", "multi_hot") else None
            rows[feature_name] = [vocab.values[0] if vocab is not None and vocab.values else 0.0]
    values = raw_inputs(model.schema, rows.head(256) if hasattr(rows, "head") else rows, names)
    n = len(next(iter(values.values()))) if values else 0
    pick = 0
    for i in range(n):
        if all(not (v.dtype.kind == "f" and v[i] != v[i]) for v in values.values()):
            pick = i
            break
    return {name: [v[pick].item() if hasattr(v[pick], "item") else v[pick]] for name, v in values.items()}


def serving_commands(model, export_dir, name=None, rows=None, port=8501, grpc_port=8500):
    """``{"serve", "curl", "python"}``: the commands that serve ``export_dir`` (a model's export directory) with
    ``tfemb serve`` and query it over REST (curl) and from Python (``tfemb.serving.Client``, REST and gRPC), with
    one example row (``example_row(model, rows)``). ``name``: the served model name (default: the directory's
    base name, as ``tfemb serve`` and TF Serving name it)."""
    name = name or os.path.basename(os.path.normpath(export_dir))
    example = example_row(model, rows)
    output = next(iter(output_spec(model.task, model.num_classes)))
    tfemb_bin = os.path.join(".venv", "bin", "tfemb")
    tfemb_cmd = tfemb_bin if os.path.exists(tfemb_bin) else "tfemb"
    body = json.dumps({"inputs": example})
    return {
        "serve": f"{tfemb_cmd} serve {shlex.quote(export_dir)} --port {port} --grpc-port {grpc_port}",
        "curl": f"curl -d {shlex.quote(body)} http://127.0.0.1:{port}/v1/models/{name}:predict",
        "python": "\n".join([
            "from tfemb.serving import Client",
            f'client = Client(url="http://127.0.0.1:{port}", grpc_target="127.0.0.1:{grpc_port}", '
            f'model_name="{name}")',
            f"row = {example!r}",
            f'client.predict(row)["{output}"]                     # REST',
            f'client.predict(row, transport="grpc")["{output}"]   # gRPC',
        ]),
    }


def log_serving_commands(commands, log=print):
    """Prints ``serving_commands`` as ``tfemb compare`` and ``tfemb export`` show them."""
    log("Serve it (TF Serving's REST API on 8501, gRPC on 8500; Ctrl-C stops):")
    log(f"  {commands['serve']}")
    log("Query it over REST (one row, raw values):")
    log(f"  {commands['curl']}")
    log("Or from Python:")
    for line in commands["python"].splitlines():
        log(f"  {line}")
    log("(stock TF Serving serves the same directory: see serving/README.md and docker/README.md)")
