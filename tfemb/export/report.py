"""The export report: bytes on disk, bytes and parameters per table, against the same model with fixed tables.

Written by ``export_saved_model`` into the version as ``assets.extra/tfemb_export.json`` and
``assets.extra/tfemb_export.md`` (TF Serving ignores ``assets.extra`` apart from its warm-up file), and shown by
``tfemb inspect EXPORT``. ``bytes_on_disk`` are measured on the written files (the report itself excluded);
``model`` bytes (``saved_model.pb`` + ``variables/`` + ``assets/``) are what the comparisons use, so a warm-up
file does not count against a method.

The fixed-embedding reference is either estimated (this export with each scheme's stored tables replaced by
``vocabulary_size x output_dim`` float32 tables; everything else unchanged), or measured on an export of the
same network with ``FixedEmbedding`` tables (``fixed_reference="export"`` or a path).
"""

import json
import os

REPORT_JSON = os.path.join("assets.extra", "tfemb_export.json")
REPORT_MD = os.path.join("assets.extra", "tfemb_export.md")
FORMAT = "tfemb.ExportReport/1"


def _export_error(message):
    from tfemb.export.saved_model import ExportError

    return ExportError(message)


def _size(path):
    total = 0
    if os.path.isfile(path):
        return os.path.getsize(path)
    for folder, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    return total


def disk_usage(version_dir):
    """Bytes of a version directory's files: ``total`` and per part (the report files left out)."""
    report_files = {os.path.join(version_dir, REPORT_JSON), os.path.join(version_dir, REPORT_MD)}
    parts = {
        "saved_model_pb": _size(os.path.join(version_dir, "saved_model.pb")),
        "variables": _size(os.path.join(version_dir, "variables")),
        "assets": _size(os.path.join(version_dir, "assets")),
    }
    extra = 0
    extra_dir = os.path.join(version_dir, "assets.extra")
    for folder, _, files in os.walk(extra_dir):
        extra += sum(os.path.getsize(os.path.join(folder, f)) for f in files
                     if os.path.join(folder, f) not in report_files)
    parts["assets_extra"] = extra
    parts["model"] = parts["saved_model_pb"] + parts["variables"] + parts["assets"]
    parts["total"] = _size(version_dir) - sum(os.path.getsize(p) for p in report_files if os.path.isfile(p))
    return parts


def _ratio(a, b):
    return None if not b else float(a) / float(b)


def build_report(version_dir, info, reference_kind="estimate", reference=None, reference_path=None):
    """The report of a written version from the module's description (``ExportModule.describe``).

    Args:
        version_dir: the (possibly still temporary) version directory, measured on disk.
        info: ``ExportModule.describe()`` output.
        reference_kind: ``"estimate"``, ``"export"``, ``"path"`` or None (no comparison).
        reference: the report of the fixed-embedding export (kinds ``"export"`` and ``"path"``).
        reference_path: where that export is (kind ``"path"``).
    """
    usage = disk_usage(version_dir)
    features = info["features"]
    embedding = {"parameters": sum(f["parameters"] for f in features), "bytes": sum(f["bytes"] for f in features)}
    for f in features:
        f["vs_fixed_bytes"] = _ratio(f["bytes"], f["fixed_bytes"])
    fixed = {"source": reference_kind or "none"}
    if reference_kind == "estimate":
        fixed_bytes = sum(f["fixed_bytes"] for f in features)
        fixed.update({
            "model_bytes": usage["model"] - embedding["bytes"] + fixed_bytes,
            "embedding_parameters": sum(f["fixed_parameters"] for f in features),
            "embedding_bytes": fixed_bytes,
        })
    elif reference_kind in ("export", "path"):
        fixed.update({
            "model_bytes": reference["bytes_on_disk"]["model"],
            "embedding_parameters": reference["embedding"]["parameters"],
            "embedding_bytes": reference["embedding"]["bytes"],
            "all_fixed": all(f["scheme"] == "FixedEmbedding" for f in reference["features"]),
        })
        if reference_path:
            fixed["path"] = reference_path
    if reference_kind:
        fixed["ratios"] = {
            "model_bytes": _ratio(usage["model"], fixed["model_bytes"]),
            "embedding_bytes": _ratio(embedding["bytes"], fixed["embedding_bytes"]),
            "embedding_parameters": _ratio(embedding["parameters"], fixed["embedding_parameters"]),
        }
    return {"format": FORMAT, **info, "bytes_on_disk": usage, "embedding": embedding, "fixed_reference": fixed}


def write_report(version_dir, info, reference_kind="estimate", reference=None):
    """Builds the report and writes ``assets.extra/tfemb_export.json`` and ``.md``; returns the report."""
    reference_path = reference.get("path") if reference_kind == "path" and reference else None
    report = build_report(version_dir, info, reference_kind, reference, reference_path)
    os.makedirs(os.path.join(version_dir, "assets.extra"), exist_ok=True)
    with open(os.path.join(version_dir, REPORT_JSON), "w") as fh:
        json.dump(report, fh, indent=2)
    with open(os.path.join(version_dir, REPORT_MD), "w") as fh:
        fh.write(markdown_report(report))
    return report


def read_report(version_dir):
    """The report of a version directory (with its ``path``); ``ExportError`` when absent or unreadable."""
    path = os.path.join(version_dir, REPORT_JSON)
    if not os.path.isfile(path):
        raise _export_error(f"{version_dir}: no export report ({REPORT_JSON}); not written by tfemb.export")
    try:
        with open(path) as fh:
            report = json.load(fh)
    except (OSError, ValueError) as error:
        raise _export_error(f"{path}: unreadable export report: {error}") from error
    if report.get("format") != FORMAT:
        raise _export_error(f"{path}: not a tfemb export report (format={report.get('format')!r})")
    report["path"] = version_dir
    return report


# ------------------------------------------------------------------------------------------ text
def _mb(n):
    return f"{n:,} B" if n < 10_000 else f"{n / 1e6:,.3f} MB"


def _pct(r):
    return "n/a" if r is None else f"{100 * r:.1f}%"


def summary_lines(report):
    usage = report["bytes_on_disk"]
    fixed = report["fixed_reference"]
    # The table rows count the values each table stores; a compact form can store zeros that are no parameter of
    # the scheme (the zero row of an indexed double-hashing table, MD's head / tail zero rows, PEP's pruned
    # entries in a dense table or the zero after its packed values). Say so where the two totals differ, or the
    # TOTAL row under the tables contradicts this line.
    stored = sum(t["parameters"] for t in report.get("tables", []))
    stored_note = ""
    if report.get("features") and stored != report["embedding"]["parameters"]:
        stored_note = f" ({stored:,} values stored in the tables below, zeros of the compact forms included)"
    # A low-precision-trained table keeps its own codes whatever table_dtype was asked for: name what is stored.
    own = sorted({t["dtype"] for t in report.get("tables", []) if t.get("kind") == "table"} - {report["table_dtype"]})
    stored_as = report["table_dtype"] + (f" ({', '.join(own)} where trained so)" if own else "")
    lines = [
        f"model: {report['model']} ({report['task']}), tables stored as {stored_as}"
        + (f", compact forms for {report['optimize_for']}" if report.get("optimize_for") else ""),
        f"bytes on disk: {_mb(usage['total'])} (saved_model.pb {_mb(usage['saved_model_pb'])}, variables "
        f"{_mb(usage['variables'])}, assets {_mb(usage['assets'])}, assets.extra {_mb(usage['assets_extra'])})",
        f"embedding tables: {report['embedding']['parameters']:,} parameters{stored_note}, "
        f"{_mb(report['embedding']['bytes'])}",
        f"other layers: {report['other']['parameters']:,} parameters, {_mb(report['other']['bytes'])}",
    ]
    numeric = report.get("numeric") or []
    if numeric:
        kinds = ", ".join(sorted({row["layer"] for row in numeric}))
        lines.append(f"  of which numeric-feature embeddings ({kinds}): {len(numeric)} features, "
                     f"{sum(r['parameters'] for r in numeric):,} parameters, "
                     f"{_mb(sum(r['bytes'] for r in numeric))}")
    if fixed.get("source", "none") != "none":
        what = {"estimate": "estimated", "export": "measured", "path": "measured"}[fixed["source"]]
        lines.append(
            f"vs fixed embeddings ({what}): model {_mb(usage['model'])} vs {_mb(fixed['model_bytes'])} "
            f"({_pct(fixed['ratios']['model_bytes'])}); embedding bytes {_pct(fixed['ratios']['embedding_bytes'])}, "
            f"parameters {_pct(fixed['ratios']['embedding_parameters'])}"
        )
    return lines


def table_rows(report):
    """One row per stored table: feature, scheme, table, shape, dtype, parameters, bytes."""
    return [{"feature": t["feature"], "scheme": t["scheme"], "table": t["table"], "kind": t["kind"],
             "shape": "x".join(str(s) for s in t["shape"]), "dtype": t["dtype"], "parameters": t["parameters"],
             "bytes": t["bytes"]} for t in report["tables"]]


def feature_rows(report):
    return [{"feature": f["feature"], "scheme": f["scheme"], "vocabulary": f["vocabulary_size"],
             "mean_dim": f["mean_dim"], "parameters": f["parameters"], "bytes": f["bytes"],
             "fixed_bytes": f["fixed_bytes"], "vs_fixed": _pct(f["vs_fixed_bytes"])} for f in report["features"]]


def signature_rows(report):
    rows = []
    for signature, spec in report.get("signatures", {}).items():
        for direction in ("inputs", "outputs"):
            for name, entry in spec[direction].items():
                rows.append({"signature": signature, "io": direction[:-1], "name": name, "dtype": entry["dtype"],
                             "shape": str(entry["shape"]), "description": entry.get("description", "")})
    return rows


def markdown_report(report):
    from tfemb.report import markdown_table

    parts = ["# Export report", ""]
    parts += [f"- {line}" for line in summary_lines(report)]
    parts += ["", "## Embedding tables per feature", "", markdown_table(feature_rows(report)),
              "## Stored tables", "", markdown_table(table_rows(report))]
    if report.get("signatures"):
        parts += ["## Signatures", "", markdown_table(signature_rows(report))]
    return "\n".join(parts)


def console_report(report):
    from tfemb.report import console_table

    rows = table_rows(report)
    total = {"feature": "TOTAL", "parameters": sum(r["parameters"] for r in rows),
             "bytes": sum(r["bytes"] for r in rows)}
    return "\n".join(summary_lines(report)) + "\n\n" + console_table(rows + [total])


# ------------------------------------------------------------------------------------------ inspect
def is_export(path):
    """True for a SavedModel version directory or a directory of integer versions."""
    if not os.path.isdir(path):
        return False
    if os.path.exists(os.path.join(path, "saved_model.pb")) or os.path.isdir(os.path.join(path, "variables")):
        return True
    return any(n.isdigit() and os.path.isdir(os.path.join(path, n)) for n in os.listdir(path))


def _generic_report(version_dir):
    """A report for a SavedModel tfemb did not write: its variables from the checkpoint, bytes on disk."""
    import numpy as np
    import tensorflow as tf

    reader = tf.train.load_checkpoint(os.path.join(version_dir, "variables", "variables"))
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    tables = []
    for name in sorted(shapes):
        if name.startswith("_CHECKPOINTABLE_OBJECT_GRAPH") or name == "_CHECKPOINTABLE_OBJECT_GRAPH":
            continue
        dtype = tf.as_dtype(dtypes[name])
        size = int(np.prod(shapes[name])) if shapes[name] else 1
        tables.append({"feature": "", "scheme": "", "table": name, "kind": "variable", "shape": list(shapes[name]),
                       "dtype": dtype.name, "parameters": size if dtype.is_floating else 0,
                       "bytes": size * (dtype.size if dtype != tf.string else 0)})
    return {"format": FORMAT, "model": "SavedModel (not written by tfemb)", "task": "?", "table_dtype": "?",
            "features": [], "tables": tables, "other": {"parameters": 0, "bytes": 0},
            "embedding": {"parameters": sum(t["parameters"] for t in tables), "bytes": sum(t["bytes"] for t in tables)},
            "bytes_on_disk": disk_usage(version_dir), "fixed_reference": {"source": "none"}, "path": version_dir}


def inspect_export(path):
    """The report of an export (a version directory or its parent: the latest version), after checking that
    the version is complete. SavedModels not written by tfemb get a report of their variables."""
    from tfemb.export.saved_model import resolve_version_dir, validate_version_dir

    version_dir = resolve_version_dir(path)
    validate_version_dir(version_dir)
    if not os.path.isfile(os.path.join(version_dir, REPORT_JSON)):
        return _generic_report(version_dir)
    return read_report(version_dir)
