"""benchmarks/serving_latency.py on its quick setting: the PEP model exported in both packed layouts.

One run (synthetic data, no server, ~40 s): the bitmask export (the default) and the slots export
(``compact_layout="slots"``) of the same retrained PEP model give the Keras model's outputs, store the same
parameters, and differ in bytes by exactly the slots layout's index (per id: a zero slot, ``d`` int8 offsets,
less the bitmask's int16 mask).
"""

import json
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "serving_latency.py"


def test_pep_exports_in_both_layouts(tmp_path):
    bitmask, slots = "pep 25% (retrained)", "pep 25% (retrained, slots)"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--no-server", "--schemes", "fixed", bitmask, slots,
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads((tmp_path / "serving_latency.json").read_text())
    runs = payload["schemes"]
    assert runs[bitmask]["export_options"] == {} and runs[slots]["export_options"] == {"compact_layout": "slots"}
    for name in (bitmask, slots):
        assert runs[name]["max_abs_diff_vs_keras"] <= 1e-5, name
    # The same trained model: the same kept entries.
    assert runs[bitmask]["embedding_parameters"] == runs[slots]["embedding_parameters"] == runs[bitmask]["pep_kept"]
    ids, dim = payload["config"]["ids"], payload["config"]["embedding_dim"]
    assert dim == 16  # int16 masks in the bitmask layout, int8 slot offsets
    assert runs[slots]["embedding_bytes"] - runs[bitmask]["embedding_bytes"] == ids * (4 + dim - 2)
    ops = {name: runs[name]["in_process"]["serving_default"]["graph_ops"] for name in runs}
    assert ops[slots] < ops[bitmask]
    lookups = payload["lookups"]
    assert lookups[f"{slots}: compact layers"]["ops"] < lookups[f"{bitmask}: compact layers"]["ops"]
