"""Export for TF Serving: compact (optionally int8 / int16 / float16) tables, raw-feature signatures, warm-up, report.

>>> path = export_saved_model(model, "exports/ctr")            # doctest: +SKIP
>>> loaded = load_export("exports/ctr")                          # doctest: +SKIP
>>> loaded.predict(raw_rows)["probability"]                      # doctest: +SKIP

See docs/export.md for the layout, the signatures and the quantisation bounds.
"""

from tfemb.export.ops_check import UnsupportedOpsError, check_ops, core_op_names, list_ops, unsupported_ops
from tfemb.export.quantize import (
    TABLE_DTYPES,
    QuantizedTable,
    dequantized,
    element_error_bound,
    quantize_int,
    quantize_int8,
    quantize_scheme,
)
from tfemb.export.report import inspect_export, read_report
from tfemb.export.saved_model import (
    ENCODED_SIGNATURE,
    RAW_SIGNATURE,
    ExportError,
    ExportModule,
    LoadedExport,
    export_saved_model,
    list_versions,
    load_export,
    next_version,
    raw_inputs,
    signature_spec,
)
from tfemb.export.warmup import WARMUP_PATH, read_warmup_requests, write_warmup_requests

__all__ = [
    "ENCODED_SIGNATURE", "ExportError", "ExportModule", "LoadedExport", "QuantizedTable", "RAW_SIGNATURE",
    "TABLE_DTYPES", "UnsupportedOpsError", "WARMUP_PATH", "check_ops", "core_op_names", "dequantized",
    "element_error_bound", "export_saved_model", "inspect_export", "list_ops", "list_versions", "load_export",
    "next_version", "quantize_int", "quantize_int8", "quantize_scheme", "raw_inputs", "read_report", "read_warmup_requests",
    "signature_spec", "unsupported_ops", "write_warmup_requests",
]
