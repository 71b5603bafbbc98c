"""benchmarks/serving_latency.py on its quick setting: the PEP model exported in both packed layouts, with and
without the dense fallback.

One run (synthetic data, no server, ~60 s): the bitmask export (the default) and the slots export
(``optimize_for="latency"``) of the same retrained PEP model give the Keras model's outputs and store the same
parameters. With every table packed (``compact_min_saving=None``) the two differ in bytes by exactly the layouts'
indexes (slots: per id a zero slot, ``d`` int8 offsets and an offset; bitmask: per id a row index, per table a
trailing zero). With the default
``compact_min_saving=0.25`` a table is exported dense exactly where its layout would save less than 25%, and the
bytes are those of the layouts chosen. Double hashing exported with each id's row pair stored
(``optimize_for="latency"``: ``compact_lookup="index"``) gives the same outputs for exactly its index's bytes more.
"""

import json
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "serving_latency.py"


def test_pep_exports_in_both_layouts(tmp_path):
    from tfemb.layers.packed_embedding import packed_storage_bytes

    bitmask, slots = "pep 25% (retrained)", "pep 25% (retrained, slots)"
    bitmask_all, slots_all = "pep 25% (retrained, all packed)", "pep 25% (retrained, slots, all packed)"
    names = (bitmask, slots, bitmask_all, slots_all)
    hashed, indexed = "double_hashing 4x", "double_hashing 4x (index)"
    blocks, head_tail = "md blocks 4x", "md blocks 4x (head-tail)"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--no-server", "--schemes", "fixed", *names,
                           hashed, indexed, blocks, head_tail,
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads((tmp_path / "serving_latency.json").read_text())
    runs = payload["schemes"]
    # The slots export is export_saved_model(optimize_for="latency"); the report records the mode.
    assert runs[bitmask]["export_options"] == {} and runs[slots]["export_options"] == {"optimize_for": "latency"}
    assert runs[bitmask]["optimize_for"] == "size" and runs[slots]["optimize_for"] == "latency"
    assert runs[slots_all]["export_options"] == {"compact_layout": "slots", "compact_min_saving": None}
    for name in names:
        assert runs[name]["max_abs_diff_vs_keras"] <= 1e-5, name
        # The same trained model: the same kept entries.
        assert runs[name]["embedding_parameters"] == runs[bitmask]["pep_kept"], name
    ids, dim = payload["config"]["ids"], payload["config"]["embedding_dim"]
    assert dim == 16  # a 16-bit mask in each bitmask row index, int8 slot offsets
    # Per table: slots store a zero and 16 int8 offsets per id and (V + 1) int32 offsets; the bitmask one trailing
    # zero and one row index per id (int32 while nnz < 2**15, else int64).
    index_bytes = sum(t["vocabulary_size"] * (4 if t["nnz"] < 2 ** 15 else 8) + 4
                      for t in runs[bitmask_all]["pep_tables"].values())
    tables = len(runs[bitmask_all]["pep_tables"])
    assert runs[slots_all]["embedding_bytes"] - runs[bitmask_all]["embedding_bytes"] == (
        ids * (4 + dim + 4) + tables * 4 - index_bytes)
    # The dense fallback: dense exactly where the layout would save < 25%, and the bytes of the layouts chosen.
    for name, layout in ((bitmask, "bitmask"), (slots, "slots"), (bitmask_all, "bitmask"), (slots_all, "slots")):
        tables = runs[name]["pep_tables"]
        expected = 0
        for feature, t in tables.items():
            v, nnz = t["vocabulary_size"], t["nnz"]
            packed, dense = packed_storage_bytes(v, dim, nnz, layout=layout), v * dim * 4
            fallback = name in (bitmask, slots) and packed > 0.75 * dense
            assert t["layout"] == ("dense" if fallback else layout), (name, feature, t)
            expected += dense if fallback else packed
        assert runs[name]["embedding_bytes"] == expected, name
    assert sum(t["nnz"] for t in runs[bitmask]["pep_tables"].values()) == runs[bitmask]["pep_kept"]
    ops = {name: runs[name]["in_process"]["serving_default"]["graph_ops"] for name in runs}
    assert ops[slots_all] < ops[bitmask_all]
    lookups = payload["lookups"]
    assert lookups[f"{slots_all}: compact layers"]["ops"] < lookups[f"{bitmask_all}: compact layers"]["ops"]
    # Double hashing with each id's row pair stored: the same model and outputs; the bytes of one zero row per
    # field (16 float32) and two int16 per id more; fewer graph ops than the in-graph hashes.
    assert runs[indexed]["export_options"] == {"optimize_for": "latency"} and runs[indexed]["optimize_for"] == "latency"
    assert runs[indexed]["max_abs_diff_vs_keras"] <= 1e-5
    assert runs[indexed]["embedding_parameters"] == runs[hashed]["embedding_parameters"]
    fields = len(payload["config"]["vocabulary_sizes"])  # one double-hashed table per sparse field
    assert runs[indexed]["embedding_bytes"] - runs[hashed]["embedding_bytes"] == fields * dim * 4 + ids * 2 * 2
    assert lookups[f"{indexed}: compact layers"]["ops"] < lookups[f"{hashed}: compact layers"]["ops"]
    # MD's popularity blocks as head-tail tables: the same model and outputs, more bytes, fewer lookup ops.
    assert runs[head_tail]["optimize_for"] == "latency" and runs[head_tail]["max_abs_diff_vs_keras"] <= 1e-5
    assert runs[head_tail]["embedding_bytes"] > runs[blocks]["embedding_bytes"]
    assert lookups[f"{head_tail}: compact layers"]["ops"] < lookups[f"{blocks}: compact layers"]["ops"]
