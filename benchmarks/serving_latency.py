"""Serving size and latency of DeepFM exports, one per embedding scheme, against the fixed-embedding export.

What it measures, on one trained task (synthetic CTR data, ``tfemb.data.make_synthetic_ctr`` with a larger
vocabulary than the default so the tables dominate the model: 100,000 rows, eight fields of up to 200,000
values, ~51k ids in the fitted Schema; DeepFM, embedding dim 16):

- **Schemes.** ``fixed``; ``hashing``, ``qr`` (mult), ``double_hashing`` and ``md`` at compression 4
  (``tfemb.layers.scheme_factory(name, compression=4)``), double hashing exported twice (the hashes computed
  in-graph, the default, and ``compact_lookup="index"``: each id's pair of rows stored), MD twice: one block per field (the paper's CTR setting,
  ``{"scheme": "md", "params": {"blocking": "field"}}``) and eight popularity blocks per field (its CF
  blocking), the latter exported twice (blocks, the default, and ``compact_premultiply="head"``: the popular
  blocks premultiplied into one table, ``HeadTailEmbedding``); ``pep``: a PEP search whose ``threshold_init`` is
  calibrated (``pep_threshold_init``) so that the soft threshold starts near the target, snapshotted by
  ``tfemb.pep.PEPSnapshots`` when 25% of the dense embedding parameters are left, then retrained with the
  lottery-ticket rewind (``tfemb.pep.retrain``, ``mode="rewind"``) for the same epochs as the others: the
  exported PEP model is the *retrained snapshot* (``PackedEmbedding`` tables), not the search layer, exported
  four times: in the default bitmask layout (the smallest) and with ``compact_layout="slots"`` (the fastest
  packed lookup), each with the default ``compact_min_saving=0.25`` (a table its layout would shrink by less
  than 25% is exported dense, one row gather) and with ``compact_min_saving=None`` (every table packed); and the
  fixed model exported again with int8 and float16 tables (``table_dtype``). Every model trains ``--epochs``
  epochs with the same data split, optimizer and seed (no validation pass).
- **Size.** Each model is exported with ``tfemb.export.export_saved_model`` (warm-up rows included, as for TF
  Serving). Bytes on disk of ``saved_model.pb`` + ``variables/`` (the schema asset, identical for all, and the
  warm-up file are left out), and the embedding tables' bytes from the export report; ratios to the fixed
  export of the same run.
- **In-process latency.** Every export loaded with ``tf.saved_model.load``; its ``serving_default`` signature
  called with raw feature values (``tfemb.export.raw_inputs`` of test rows, prebuilt tensors) at batch 1 and
  256, after a warm-up; each call timed until its output is a NumPy array. The schemes are called round-robin
  (the first scheme rotating every round), so load on the shared machine hits all of them alike.
  p50 / p99 per scheme; the target is p99 at batch 256 <= 1.2x the fixed export's.
- **Through the local server.** A separate process runs ``tfemb.serving.LocalServer`` (what ``tfemb serve``
  runs) on ephemeral loopback ports, serving every export as its own model. ``tfemb.serving.Client`` calls it
  over REST (columnar JSON) and gRPC (``PredictionService.Predict``) at batch 1 and 256, round-robin over
  schemes and transports: p50 / p99 of the whole call (client encoding + transport + server + decoding).
- **Lookups alone.** Every feature's ``compact()`` layer at batch 256 in one ``tf.function`` (no encoding, no
  network), with the graph's op count, plus PEP's CSR layout beside its bitmask one over the same tables
  (outputs checked equal): the profile behind any scheme that misses the target.
- **Throughput under load.** ``--load-threads`` client threads each sending ``--load-requests`` batch-1
  requests to one model (REST, then gRPC); requests per second over the wall time, in two round-robin rounds.

Results: ``<out>/serving_latency.json`` and ``<out>/serving_latency.md``. Numbers are wall-clock on whatever
machine runs it; the ratios to fixed are measured in the same run and interleaved, which is what makes them
comparable on a shared machine.

Run from the repository root: ``python benchmarks/serving_latency.py`` (full, ~10 min on 2 busy cores) or
``--quick`` (< 2 min: smaller data, one epoch, fewer calls).
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: tfemb is imported from this checkout
    sys.path.insert(0, str(REPO))
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))

import _benchcli  # noqa: E402

#: Per-field vocabulary sizes of the synthetic data (values drawn; the Schema keeps those seen in training).
VOCABULARY_SIZES = (100, 1000, 10000, 50000, 200000, 300, 3000, 30000)
EMBEDDING_DIM = 16
COMPRESSION = 4
PEP_TARGET = 1.0 / COMPRESSION
TARGET_RATIO = 1.2

#: name -> (training scheme, scheme params, table_dtype); several exports may share one trained model.
SCHEMES = {
    "fixed": ("fixed", {}, None),
    "fixed int8": ("fixed", {}, "int8"),
    "fixed float16": ("fixed", {}, "float16"),
    "hashing 4x": ("hashing", {"compression": COMPRESSION}, None),
    "qr 4x": ("qr", {"compression": COMPRESSION, "operation": "mult"}, None),
    "double_hashing 4x": ("double_hashing", {"compression": COMPRESSION}, None),
    "double_hashing 4x (index)": ("double_hashing", {"compression": COMPRESSION}, None),
    # MD both ways: one block per field with dims across the fields (the paper's CTR setting, md_field_factory),
    # and Algorithm 2's popularity blocks within every field (the paper's CF blocking, scheme_factory("md")).
    "md per-field 4x": ("md", {"compression": COMPRESSION, "blocking": "field"}, None),
    "md blocks 4x": ("md", {"compression": COMPRESSION}, None),
    "md blocks 4x (head-tail)": ("md", {"compression": COMPRESSION}, None),
    "pep 25% (retrained)": ("pep", {}, None),
    "pep 25% (retrained, slots)": ("pep", {}, None),
    "pep 25% (retrained, all packed)": ("pep", {}, None),
    "pep 25% (retrained, slots, all packed)": ("pep", {}, None),
    # DHE as the main job has it: the fields whose budget holds hidden layers of 16 units get a network of 256
    # hashes and two hidden layers, the others a hashing table at the same compression.
    "dhe 4x": ("dhe", {"compression": COMPRESSION, "num_hashes": 256, "num_hidden_layers": 2, "min_width": 16,
                       "fallback": "hashing"}, None),
}

#: Export options of a variant that shares its trained model with another: ``optimize_for`` (the argument of
#: ``export_saved_model``: "latency" exports double hashing with each id's pair of rows stored,
#: ``compact_lookup="index"``, MD's popularity blocks as a head-tail table, ``compact_premultiply="head"``, and PEP in
#: the slots layout; "size", the default, their smallest forms), or layer
#: attributes: PEP's ``compact_layout`` (the default, "auto", is the bitmask layout) and ``compact_min_saving``
#: (the default, 0.25: a table that its packed layout would shrink by less than 25% is exported dense; None:
#: every table packed).
EXPORT_OPTIONS = {
    "double_hashing 4x (index)": {"optimize_for": "latency"},
    "md blocks 4x (head-tail)": {"optimize_for": "latency"},
    "pep 25% (retrained, slots)": {"optimize_for": "latency"},
    "pep 25% (retrained, all packed)": {"compact_min_saving": None},
    "pep 25% (retrained, slots, all packed)": {"compact_layout": "slots", "compact_min_saving": None},
}


def layer_options(options, expand=True):
    """The layer attributes of a variant's ``options``: with ``expand``, ``optimize_for`` replaced by the
    attributes that mode sets (``tfemb.export.saved_model.OPTIMIZE_FOR``); without, dropped (``export_saved_model``
    applies it itself)."""
    from tfemb.export.saved_model import OPTIMIZE_FOR

    options = dict(options or {})
    mode = options.pop("optimize_for", "size")
    return {**(OPTIMIZE_FOR[mode] if expand else {}), **options}


class export_options:
    """Context manager: every embedding layer of ``model`` takes the attributes of ``options`` it has (e.g. PEP's
    ``compact_layout`` / ``compact_min_saving``, double hashing's ``compact_lookup``; ``optimize_for`` expanded
    by ``layer_options``) for the block; restored on exit."""

    def __init__(self, model, options, expand=True):
        self.options = layer_options(options, expand)
        self.layers = [l for l in model.embedding_list if any(hasattr(l, k) for k in self.options)]
        self.saved = [{k: getattr(l, k) for k in self.options if hasattr(l, k)} for l in self.layers]

    def __enter__(self):
        for layer, saved in zip(self.layers, self.saved):
            for key in saved:
                setattr(layer, key, self.options[key])
        return self

    def __exit__(self, *exc):
        for layer, saved in zip(self.layers, self.saved):
            for key, value in saved.items():
                setattr(layer, key, value)


def pep_layouts(model):
    """``{feature: {"layout", "vocabulary_size", "nnz"}}`` of the PEP layers' compact tables (as exported)."""
    from tfemb.layers import PEPEmbedding

    out = {}
    for name in model.embedding_names:
        layer = model.embedding_layers[name]
        if isinstance(layer, PEPEmbedding):
            nnz = int(layer.nonzero_count())
            out[name] = {"layout": layer.compact_layout_for(nnz), "vocabulary_size": int(layer.vocabulary_size),
                         "nnz": nnz}
    return out


def slug(name):
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_").replace("__", "_")


def percentile(values, q):
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


def stats_ms(seconds):
    ms = [1000.0 * s for s in seconds]
    return {"p50": percentile(ms, 50), "p90": percentile(ms, 90), "p99": percentile(ms, 99),
            "mean": float(np.mean(ms)) if ms else float("nan"), "n": len(ms)}


class Progress:
    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self, msg):
        print(f"[{time.perf_counter() - self.start:7.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ training
def _fit(model, prepared, train_cfg, epochs, callbacks=None):
    from tfemb.tasks import compile_model

    compile_model(model, optimizer=train_cfg["optimizer"], learning_rate=train_cfg["learning_rate"])
    train = prepared.dataset("train", train_cfg["batch_size"], shuffle=True, seed=0)
    model.fit(train, epochs=epochs, verbose=0, callbacks=callbacks or [])
    return model


def train_models(args, prepared, log):
    """``{training key: (keras model, test metrics, seconds, extra)}``, one per distinct trained scheme.

    Every model: ``tfemb.experiment.build_model`` (DeepFM, dim 16, lazy Adam on the tables), the same seed, split
    and ``--epochs``; no validation pass (the benchmark is about serving, the test AUC is reported for context).
    """
    import tensorflow as tf

    from tfemb import experiment

    train_cfg = {"batch_size": 512, "optimizer": "adam", "learning_rate": 0.002, "embedding_optimizer": "adam"}
    model_cfg = {"name": "deepfm", "embedding_dim": EMBEDDING_DIM}
    trained = {}
    for name, (scheme, params, _) in SCHEMES.items():
        if name not in args.schemes:
            continue
        key = (scheme, json.dumps(params, sort_keys=True))
        if key in trained:
            continue
        start = time.perf_counter()
        extra = {}
        tf.keras.utils.set_random_seed(0)
        if scheme == "pep":
            model, extra = train_pep(model_cfg, train_cfg, prepared, args, log)
        else:
            model = experiment.build_model(prepared.schema, model_cfg, {"scheme": scheme, "params": params}, train_cfg)
            _fit(model, prepared, train_cfg, args.epochs)
        metrics = experiment.evaluate(model, prepared, "test", train_cfg["batch_size"])
        seconds = time.perf_counter() - start
        trained[key] = (model, metrics, seconds, extra)
        log(f"trained {name:<22} {seconds:5.1f}s  test auc={metrics.get('auc', float('nan')):.4f}  "
            f"{int(model.embedding_parameter_count()):,} embedding parameters")
    return trained


def pep_threshold_init(schema, target=PEP_TARGET, margin=0.03):
    """The PEP ``threshold_init`` whose soft threshold ``sigmoid(s)`` already zeroes ``1 - target + margin`` of the
    glorot-uniform tables' entries at the start (entry ``x ~ U(-b_f, b_f)`` with ``b_f = sqrt(6 / (V_f + d))`` is
    zeroed when ``|x| < t``, with probability ``min(1, t / b_f)``), so a brief search reaches ``target``.

    The search (thresholds learned with the tables) then only has to go a little further; a long search with the
    official ``threshold_init`` values (-15 for MovieLens, -150 for Criteo) is out of a benchmark's budget.
    """
    sizes = np.array([f.vocabulary.size for f in schema.sparse_features], dtype=np.float64)
    bounds = np.sqrt(6.0 / (sizes + EMBEDDING_DIM))
    want = (1.0 - target + margin) * sizes.sum()
    lo, hi = 0.0, float(bounds.max())
    for _ in range(60):
        t = 0.5 * (lo + hi)
        pruned = float(np.sum(sizes * np.minimum(1.0, t / bounds)))
        lo, hi = (t, hi) if pruned < want else (lo, t)
    t = 0.5 * (lo + hi)
    return float(np.log(t / (1.0 - t)))


def train_pep(model_cfg, train_cfg, prepared, args, log, max_search_epochs=3):
    """PEP search until the snapshot at ``PEP_TARGET`` of the dense parameters, then the rewound retrain."""
    from tfemb import experiment
    from tfemb.pep import PEPSnapshots, retrain

    init = pep_threshold_init(prepared.schema)
    params = {"threshold_init": init}
    model = experiment.build_model(prepared.schema, model_cfg, {"scheme": "pep", "params": params}, train_cfg)
    snaps = PEPSnapshots(targets=[PEP_TARGET], check_every=5, stop_when_done=True)
    for _ in range(max_search_epochs):
        _fit(model, prepared, train_cfg, 1, callbacks=[snaps])
        if snaps.snapshots:
            break
    snap = snaps.snapshot(PEP_TARGET)  # KeyError (with the counts reached) if the search fell short
    log(f"        pep search (threshold_init {init:.2f}): {snap.count:,} of {snap.dense_count:,} embedding "
        f"parameters kept at step {snap.step}; retraining the snapshot (rewind)")
    rewind_dense = None
    try:
        ticket = retrain(model, snap, mode="rewind")
    except ValueError as error:  # seen under Keras 2 (tf-keras): the clone lists fewer weights than the search
        log(f"        retrain(mode='rewind') failed ({error}); retraining with rewind_dense=False: tables rewound, "
            f"dense layers freshly initialised")
        rewind_dense = False
        ticket = retrain(model, snap, mode="rewind", rewind_dense=False)
    _fit(ticket, prepared, train_cfg, args.epochs)
    return ticket, {"pep_search_step": snap.step, "pep_kept": snap.count, "pep_dense": snap.dense_count,
                    "pep_threshold_init": init, "pep_exported": "retrained snapshot (rewind)",
                    "pep_rewind_dense": rewind_dense}


# ------------------------------------------------------------------------------------------------ export
def export_all(args, trained, prepared, root, log):
    """Exports every scheme as ``root/<slug>/1``; returns ``{name: info}``."""
    import tensorflow as tf

    from tfemb.export import export_saved_model, load_export
    from tfemb.export.saved_model import model_input_names

    test = prepared.frames["test"]
    warmup = test.head(64)
    probe = test.head(256)
    encoded = {k: v[:256] for k, v in prepared.arrays["test"][0].items()}
    infos = {}
    for name, (scheme, params, table_dtype) in SCHEMES.items():
        if name not in args.schemes:
            continue
        model, metrics, seconds, extra = trained[(scheme, json.dumps(params, sort_keys=True))]
        start = time.perf_counter()
        options = EXPORT_OPTIONS.get(name, {})
        with export_options(model, options, expand=False):
            path = export_saved_model(model, os.path.join(root, slug(name)), version=1, table_dtype=table_dtype,
                                      warmup_rows=warmup, optimize_for=options.get("optimize_for", "size"))
        with export_options(model, options):
            layouts = pep_layouts(model)
        export_s = time.perf_counter() - start
        loaded = load_export(path)
        report = loaded.report
        names = model_input_names(model)
        keras_p = np.asarray(model({k: tf.constant(v) for k, v in encoded.items() if k in names}, training=False))
        keras_p = keras_p.reshape(-1)
        export_p = loaded.predict(probe)["probability"].reshape(-1)
        usage = report["bytes_on_disk"]
        infos[name] = {
            "scheme": scheme, "scheme_params": params, "table_dtype": table_dtype or "float32",
            "export_options": EXPORT_OPTIONS.get(name, {}), "optimize_for": report.get("optimize_for"),
            **({"pep_tables": layouts} if layouts else {}),
            "path": path, "model_name": slug(name),
            "test_metrics": metrics, "train_seconds": seconds, "export_seconds": export_s, **extra,
            "disk_bytes": usage["saved_model_pb"] + usage["variables"],
            "bytes_on_disk": usage,
            "embedding_bytes": report["embedding"]["bytes"],
            "embedding_parameters": report["embedding"]["parameters"],
            "fixed_embedding_bytes_estimate": report["fixed_reference"].get("embedding_bytes"),
            "max_abs_diff_vs_keras": float(np.max(np.abs(export_p - keras_p))),
        }
        log(f"exported {name:<22} {infos[name]['disk_bytes']:>10,} B on disk, "
            f"{infos[name]['embedding_bytes']:>10,} B of tables, max |export - keras| "
            f"{infos[name]['max_abs_diff_vs_keras']:.1e} ({export_s:.1f}s)")
        del loaded
    return infos


# ------------------------------------------------------------------------------------------------ in-process
def rotations(names, rounds):
    """Round ``r`` calls every name once, starting at name ``r mod n``."""
    names = list(names)
    for r in range(rounds):
        k = r % len(names)
        yield names[k:] + names[:k]


def batch_tensors(fn, raw):
    import tensorflow as tf

    _, specs = fn.structured_input_signature
    out = {}
    for name, spec in specs.items():
        values = raw[name]
        if spec.dtype == tf.string:
            values = [v.encode() if isinstance(v, str) else v for v in values]
        out[name] = tf.constant(values, dtype=spec.dtype)
    return out


def measure_in_process(args, infos, modules, batches, log, signature="serving_default"):
    """``{name: {batch: stats}}`` of a signature of the loaded exports (``tf.saved_model.load``) called in this
    process with ``batches`` (``{batch size: {input: array}}``), round-robin over the exports. Wall time per call,
    and (``"cpu"``) the process CPU time per call: on a shared machine wall-clock tails mostly measure waiting
    for a core, CPU time much less."""
    calls = {}
    out = {name: {} for name in infos}
    for name in infos:
        fn = modules[name].signatures[signature]
        calls[name] = {b: (fn, batch_tensors(fn, batches[b])) for b in batches}
        out[name]["graph_ops"] = graph_ops(fn)
    for batch, rounds in ((1, args.calls_b1), (256, args.calls_b256)):
        for name in infos:  # warm-up: tracing done at load; first calls allocate
            fn, tensors = calls[name][batch]
            for _ in range(args.warmup):
                fn(**tensors)
        times = {name: [] for name in infos}
        cpu = {name: [] for name in infos}
        for order in rotations(infos, rounds):
            for name in order:
                fn, tensors = calls[name][batch]
                start_cpu, start = time.process_time(), time.perf_counter()
                result = fn(**tensors)
                result = {k: v.numpy() for k, v in result.items()}
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
        for name in infos:
            out[name][batch] = stats_ms(times[name])
            out[name][batch]["cpu"] = stats_ms(cpu[name])  # process CPU time (all threads) per call
        log(f"in-process {signature} batch {batch}: " + ", ".join(
            f"{name} p99 {out[name][batch]['p99']:.2f}ms" for name in infos))
    return out


# ------------------------------------------------------------------------------------------------ profile
def graph_ops(fn):
    """Nodes of a loaded signature's graph and of every function it calls (before Grappler): a deterministic
    proxy for the per-call executor overhead, which dominates at small batches."""
    gd = fn.graph.as_graph_def()
    return len(gd.node) + sum(len(f.node_def) for f in gd.library.function)


def profile_lookups(args, trained, prepared, log):
    """Batch-256 embedding lookups alone (every feature's compact layer, no encoding, no network), round-robin,
    plus PEP's CSR layout beside its bitmask one (outputs checked equal).
    ``{variant: stats + ops}``."""
    import tensorflow as tf

    x = prepared.arrays["test"][0]
    variants = {}
    for name, (scheme, params, table_dtype) in SCHEMES.items():
        if name not in args.schemes or table_dtype is not None:
            continue
        model = trained[(scheme, json.dumps(params, sort_keys=True))][0]
        with export_options(model, EXPORT_OPTIONS.get(name)):
            layers = {f: model.embedding_layers[f].compact() for f in model.embedding_names}
        variants[f"{name}: compact layers"] = layers
        if scheme == "pep" and name not in EXPORT_OPTIONS:  # the bitmask layout; the CSR layout beside them
            from tfemb.layers import PackedEmbedding

            variants[f"{name}: csr layout (a column index per value)"] = {
                f: PackedEmbedding.from_dense(l.to_dense(), mask=l.stored_mask(), layout="csr", trainable=False,
                                              name=f"{l.name}_csr") for f, l in layers.items()}
    features = list(next(iter(variants.values())))
    ids = {f: tf.constant(x[f][:256].astype(np.int64)) for f in features}
    fns, out = {}, {}
    for name, layers in variants.items():
        def make(layers=layers):
            @tf.function
            def lookup(ids):
                return tf.concat([layers[f](ids[f]) for f in features], axis=1)
            return lookup
        fns[name] = make()
        gd = fns[name].get_concrete_function(ids).graph.as_graph_def()
        out[name] = {"ops": len(gd.node) + sum(len(f.node_def) for f in gd.library.function)}
    reference = {}
    for name, fn in fns.items():
        value = fn(ids).numpy()
        base = name.split(":")[0]
        if name.endswith("compact layers"):
            reference[base] = value
        else:
            out[name]["max_abs_diff_vs_compact"] = float(np.max(np.abs(value - reference[base])))
        for _ in range(args.warmup):
            fn(ids)
    wall, cpu = {n: [] for n in fns}, {n: [] for n in fns}
    for order in rotations(fns, args.calls_b256):
        for name in order:
            c, t = time.process_time(), time.perf_counter()
            fns[name](ids).numpy()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    for name in fns:
        out[name].update({"wall": stats_ms(wall[name]), "cpu_ms_mean": 1000.0 * float(np.mean(cpu[name]))})
    log("lookups alone, batch 256: " + ", ".join(
        f"{n} p50 {v['wall']['p50']:.2f}ms ({v['ops']} ops)" for n, v in out.items()))
    return out


# ------------------------------------------------------------------------------------------------ server
def serve_child(root):
    """Runs in the server process: a LocalServer over every model under ``root``; prints its ports; waits for
    stdin to close."""
    from tfemb.serving.server import LocalServer, ModelRegistry

    registry = ModelRegistry(root, poll_seconds=0)
    server = LocalServer(registry, port=0, grpc_port=0, grpc_workers=16).start()
    print(json.dumps({"rest": server.rest_url, "grpc": server.grpc_target, "models": registry.model_names}),
          flush=True)
    sys.stdin.read()
    server.stop(grace=1.0)


def start_server(root, log):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-child", root],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=30)
        raise RuntimeError(f"the server process exited with code {proc.returncode} before printing its ports")
    info = json.loads(line)
    log(f"local server (pid {proc.pid}): REST {info['rest']}, gRPC {info['grpc']}, {len(info['models'])} models")
    return proc, info


def stop_server(proc):
    try:
        proc.stdin.close()
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure_server(args, infos, raw_batches, endpoints, log):
    """``{name: {"rest"|"grpc": {batch: stats}}}`` round-robin over schemes, transport alternating."""
    from tfemb.serving import Client

    clients = {name: Client(url=endpoints["rest"], grpc_target=endpoints["grpc"], model_name=info["model_name"],
                            timeout=60.0)
               for name, info in infos.items()}
    columns = {b: {k: (v.tolist() if v.dtype == object else v) for k, v in raw.items()}
               for b, raw in raw_batches.items()}
    out = {name: {"rest": {}, "grpc": {}} for name in infos}
    for batch, rounds in ((1, args.server_calls_b1), (256, args.server_calls_b256)):
        for name in infos:
            for transport in ("rest", "grpc"):
                for _ in range(max(2, args.warmup // 4)):
                    clients[name].predict(columns[batch], transport=transport)
        times = {(name, t): [] for name in infos for t in ("rest", "grpc")}
        for r, order in enumerate(rotations(infos, rounds)):
            for name in order:
                for transport in (("rest", "grpc") if r % 2 == 0 else ("grpc", "rest")):
                    start = time.perf_counter()
                    clients[name].predict(columns[batch], transport=transport)
                    times[(name, transport)].append(time.perf_counter() - start)
        for (name, transport), values in times.items():
            out[name][transport][batch] = stats_ms(values)
        log(f"server batch {batch}: " + ", ".join(
            f"{name} REST/gRPC p50 {out[name]['rest'][batch]['p50']:.1f}/{out[name]['grpc'][batch]['p50']:.1f}ms"
            for name in infos))
    for client in clients.values():
        client.close()
    return out


def load_test(args, infos, raw_batches, endpoints, log, rounds=2):
    """``{name: {"rest"|"grpc": {"requests_per_second", "p50", "p99", "errors"}}}``: bounded concurrent load."""
    from tfemb.serving import Client

    row = {k: (v.tolist() if v.dtype == object else v) for k, v in raw_batches[1].items()}
    per_round = max(1, args.load_requests // rounds)
    acc = {(name, t): {"seconds": 0.0, "requests": 0, "latencies": [], "errors": 0}
           for name in infos for t in ("rest", "grpc")}
    for transport in ("rest", "grpc"):
        for order in rotations(infos, rounds):
            for name in order:
                client = Client(url=endpoints["rest"], grpc_target=endpoints["grpc"],
                                model_name=infos[name]["model_name"], timeout=60.0)
                client.predict(row, transport=transport)  # connect before timing
                latencies, errors = [], [0]
                lock = threading.Lock()
                barrier = threading.Barrier(args.load_threads + 1)

                def worker():
                    mine = []
                    barrier.wait()
                    for _ in range(per_round):
                        start = time.perf_counter()
                        try:
                            client.predict(row, transport=transport)
                        except Exception:  # counted, never hidden
                            with lock:
                                errors[0] += 1
                        mine.append(time.perf_counter() - start)
                    with lock:
                        latencies.extend(mine)

                threads = [threading.Thread(target=worker) for _ in range(args.load_threads)]
                for t in threads:
                    t.start()
                barrier.wait()
                start = time.perf_counter()
                for t in threads:
                    t.join()
                elapsed = time.perf_counter() - start
                client.close()
                a = acc[(name, transport)]
                a["seconds"] += elapsed
                a["requests"] += per_round * args.load_threads
                a["latencies"] += latencies
                a["errors"] += errors[0]
        log(f"load {transport}: " + ", ".join(
            f"{name} {acc[(name, transport)]['requests'] / acc[(name, transport)]['seconds']:.0f} req/s"
            for name in infos))
    out = {name: {} for name in infos}
    for (name, transport), a in acc.items():
        s = stats_ms(a["latencies"])
        out[name][transport] = {"requests_per_second": a["requests"] / a["seconds"], "requests": a["requests"],
                                "seconds": a["seconds"], "p50": s["p50"], "p99": s["p99"], "errors": a["errors"],
                                "threads": args.load_threads}
    return out


# ------------------------------------------------------------------------------------------------ report
def _ratio(a, b):
    return None if not b else float(a) / float(b)


def build_rows(infos, inproc, server, load):
    """Two tables: size + in-process latency (with the target), and the server / load numbers."""
    fixed, fixed_ip = infos.get("fixed"), inproc.get("fixed")
    main_rows, server_rows = [], []
    for name, info in infos.items():
        ip = inproc[name]
        ratio_p99 = _ratio(ip[256]["p99"], fixed_ip[256]["p99"]) if fixed else None
        verdict = "-" if name == "fixed" or ratio_p99 is None else ("PASS" if ratio_p99 <= TARGET_RATIO else "FAIL")
        cpu_ratio = _ratio(ip[256]["cpu"]["p99"], fixed_ip[256]["cpu"]["p99"]) if fixed else None
        cpu_verdict = "-" if name == "fixed" or cpu_ratio is None else (
            "PASS" if cpu_ratio <= TARGET_RATIO else "FAIL")
        main_rows.append({
            "scheme": name,
            "test auc": info["test_metrics"].get("auc", float("nan")),
            "disk bytes": info["disk_bytes"],
            "disk vs fixed": _ratio(info["disk_bytes"], fixed["disk_bytes"]) if fixed else None,
            "emb bytes": info["embedding_bytes"],
            "emb vs fixed": _ratio(info["embedding_bytes"], fixed["embedding_bytes"]) if fixed else None,
            "graph ops": ip["graph_ops"],
            "b1 p50 / p99 ms": f"{ip[1]['p50']:.2f} / {ip[1]['p99']:.2f}",
            "b256 p50 / p99 ms": f"{ip[256]['p50']:.2f} / {ip[256]['p99']:.2f}",
            "b256 p50 vs fixed": _ratio(ip[256]["p50"], fixed_ip[256]["p50"]) if fixed else None,
            "b256 p99 vs fixed": ratio_p99,
            "p99 <= 1.2x": verdict,
            "b256 CPU p50 / p99 ms": f"{ip[256]['cpu']['p50']:.2f} / {ip[256]['cpu']['p99']:.2f}",
            "b256 CPU p99 vs fixed": cpu_ratio,
            "CPU p99 <= 1.2x": cpu_verdict,
        })
        if server is None and load is None:
            continue
        row = {"scheme": name}
        if server is not None:
            for t, label in (("rest", "REST"), ("grpc", "gRPC")):
                for b in (1, 256):
                    st = server[name][t][b]
                    row[f"{label} b{b} p50 / p99 ms"] = f"{st['p50']:.1f} / {st['p99']:.1f}"
        if load is not None:
            for t, label in (("rest", "REST"), ("grpc", "gRPC")):
                row[f"load {label} req/s"] = load[name][t]["requests_per_second"]
                row[f"load {label} vs fixed"] = _ratio(load[name][t]["requests_per_second"],
                                                       load["fixed"][t]["requests_per_second"]) if fixed else None
                row[f"load {label} errors"] = load[name][t]["errors"]
        server_rows.append(row)
    return main_rows, server_rows


def _fmt(v):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if 0 < abs(v) < 1e-3:
            return f"{v:.1e}"
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def markdown(rows):
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def environment():
    import tensorflow as tf

    from tfemb._keras import keras

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    keras_version = getattr(keras, "__version__", None)
    if keras_version is None:  # tf_keras's API module has no __version__; its package does
        import tf_keras

        keras_version = f"{tf_keras.__version__} (tf-keras)"
    return {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras_version,
            "legacy_keras": os.environ.get("TF_USE_LEGACY_KERAS", "0") in ("1", "true", "True"),
            "cpus": os.cpu_count(), "load_average": load, "platform": platform.platform()}


def write_outputs(args, payload, rows, log):
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "serving_latency.json")
    md_path = os.path.join(args.out, "serving_latency.md")
    with open(json_path, "w") as fh:
        json.dump(payload, fh, indent=2, default=float)
    cfg = payload["config"]
    env = payload["environment"]
    lines = [
        "# Serving size and latency per embedding scheme (DeepFM, synthetic CTR)",
        "",
        f"{payload['date']}; {'--quick; ' if args.quick else ''}{cfg['rows']:,} rows, {cfg['ids']:,} ids in the "
        f"Schema, embedding dim {EMBEDDING_DIM}, {cfg['epochs']} epoch(s) per model; TF {env['tensorflow']}, Keras "
        f"{env['keras']}, {env['cpus']} CPUs, load average at start "
        f"{' / '.join(f'{x:.1f}' for x in env['load_average_start'] or [])}.",
        "",
        f"Reproduce: `{cfg.get('command') or 'python benchmarks/serving_latency.py'}`",
        "",
        f"In-process: `serving_default` with raw inputs, {cfg['calls_b1']} calls at batch 1 and {cfg['calls_b256']} at "
        f"batch 256 per export after {cfg['warmup']} warm-up calls, round-robin over exports. Server: a "
        f"LocalServer process, `tfemb.serving.Client`, {cfg['server_calls_b1']} / {cfg['server_calls_b256']} calls "
        f"per transport at batch 1 / 256, round-robin. Load: {cfg['load_threads']} threads x "
        f"{cfg['load_requests']} batch-1 requests per model and transport. Disk bytes: saved_model.pb + variables/. "
        f"Target: in-process p99 at batch 256 <= {TARGET_RATIO}x fixed, judged on the wall-clock p99 and on the "
        f"process CPU time per call (steadier on a shared machine).",
        "",
        "## Size and in-process latency (`serving_default`, raw inputs)",
        "",
        markdown(rows),
    ]
    if payload.get("server_table"):
        lines += ["## Through the local server (tfemb.serving.Client) and under load", "",
                  markdown(payload["server_table"])]
    if payload.get("lookup_table"):
        lines += ["## Embedding lookups alone (every feature's compact layer, batch 256, round-robin)", "",
                  "PEP's CSR layout (a column index per value) is measured beside its compact layers over the same "
                  "tables; its outputs are checked against theirs.", "", markdown(payload["lookup_table"])]
    if payload.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in payload["notes"]] + [""]
    with open(md_path, "w") as fh:
        fh.write("\n".join(lines))
    log(f"wrote {json_path} and {md_path}")


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smaller data, 1 epoch, fewer calls (< 2 min); writes into outputs/bench-quick unless --out "
                        "is given")
    p.add_argument("--rows", type=int, default=None,
                   help="synthetic rows (default 100000; quick 10000; at least 2560: the batch-256 calls read the "
                        "10%% test split)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per model (default 1)")
    p.add_argument("--calls-b1", type=int, default=None, help="in-process calls per export at batch 1 (500)")
    p.add_argument("--calls-b256", type=int, default=None,
                   help="in-process calls per export at batch 256 (3000: the p99 is the 30th slowest call)")
    p.add_argument("--server-calls-b1", type=int, default=None, help="server calls per transport, batch 1 (100)")
    p.add_argument("--server-calls-b256", type=int, default=None, help="server calls per transport, batch 256 (30)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per export and batch (20)")
    p.add_argument("--load-threads", type=int, default=8, help="threads of the load test (8)")
    p.add_argument("--load-requests", type=int, default=None, help="requests per load thread (200; quick 40)")
    p.add_argument("--schemes", nargs="+", default=None, help=f"subset of {list(SCHEMES)} (fixed is always run)".replace("%", "%%"))
    p.add_argument("--no-server", action="store_true", help="in-process measurements only")
    p.add_argument("--keep-exports", default=None, help="write the exports here and keep them (default: a temp dir)")
    p.add_argument("--out", default=None,
                   help="output folder (default: benchmarks/results; with --quick: outputs/bench-quick)")
    p.add_argument("--serve-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_child:
        return args
    args.command = _benchcli.command_line("serving_latency.py", argv)
    if args.out is None:
        args.out = _benchcli.default_out(args.quick)
    _benchcli.check_min(p, args, {"rows": 2560, "epochs": 1, "calls_b1": 1, "calls_b256": 1, "server_calls_b1": 1,
                                  "server_calls_b256": 1, "warmup": 0, "load_threads": 1, "load_requests": 1})
    _benchcli.check_out(p, args.out)
    if args.keep_exports:
        if os.path.exists(args.keep_exports) and (not os.path.isdir(args.keep_exports)
                                                  or os.listdir(args.keep_exports)):
            p.error(f"--keep-exports must be an empty or new folder. Received: {args.keep_exports!r}")
        _benchcli.check_out(p, args.keep_exports, flag="--keep-exports")
    quick = args.quick
    defaults = {"rows": (100_000, 10_000), "epochs": (1, 1), "calls_b1": (500, 60), "calls_b256": (3000, 100),
                "server_calls_b1": (100, 20), "server_calls_b256": (30, 8), "warmup": (20, 5),
                "load_requests": (200, 40)}
    for key, (full, small) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
    schemes = args.schemes or list(SCHEMES)
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        p.error(f"--schemes must be among {list(SCHEMES)}. Received: {unknown[0]!r}")
    args.schemes = ["fixed"] + [s for s in schemes if s != "fixed"]
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.serve_child:
        serve_child(args.serve_child)
        return
    log = Progress()
    from tfemb import experiment
    from tfemb.export import raw_inputs

    env = environment()
    env["load_average_start"] = env.pop("load_average")
    log(f"serving_latency: {'quick' if args.quick else 'full'} run; TF {env['tensorflow']}, Keras {env['keras']}, "
        f"load average {env['load_average_start']}")
    prepared = experiment.prepare_data({
        "source": "synthetic_ctr",
        "params": {"num_rows": args.rows, "seed": 0, "vocabulary_sizes": list(VOCABULARY_SIZES)},
        "split": {"method": "random", "fractions": [0.8, 0.1, 0.1], "seed": 0},
    })
    ids = sum(f.vocabulary.size for f in prepared.schema.sparse_features)
    log(f"data: {prepared.num_rows('train'):,} train rows, {ids:,} ids")
    trained = train_models(args, prepared, log)
    root = args.keep_exports or tempfile.mkdtemp(prefix="tfemb-serving-latency-")
    if args.keep_exports and os.path.exists(root) and os.listdir(root):
        raise SystemExit(f"--keep-exports {root} is not empty")
    try:
        infos = export_all(args, trained, prepared, root, log)
        lookups = profile_lookups(args, trained, prepared, log)
        del trained
        test = prepared.frames["test"]
        names = [n for n in prepared.schema.names if n in _input_names(infos)]
        raw_batches = {1: raw_inputs(prepared.schema, test.iloc[:1], names),
                       256: raw_inputs(prepared.schema, test.iloc[:256], names)}
        encoded_batches = {b: {k: v[:b] for k, v in prepared.arrays["test"][0].items() if k in names}
                           for b in (1, 256)}
        import tensorflow as tf

        modules = {name: tf.saved_model.load(info["path"]) for name, info in infos.items()}
        inproc = measure_in_process(args, infos, modules, raw_batches, log)
        encoded = None  # the "encoded" signature (ids in, no raw-value encoding): a diagnostic, full runs only
        if not args.quick:
            encoded = measure_in_process(args, infos, modules, encoded_batches, log, signature="encoded")
        del modules
        server = load = None
        if not args.no_server:
            proc, endpoints = start_server(root, log)
            try:
                server = measure_server(args, infos, raw_batches, endpoints, log)
                load = load_test(args, infos, raw_batches, endpoints, log)
            finally:
                stop_server(proc)
    finally:
        if not args.keep_exports:
            shutil.rmtree(root, ignore_errors=True)
    rows, server_rows = build_rows(infos, inproc, server, load)
    lookup_rows = [{"lookup (8 features, batch 256)": n, "graph ops": v["ops"], "p50 ms": v["wall"]["p50"],
                    "p90 ms": v["wall"]["p90"], "CPU ms / call": v["cpu_ms_mean"],
                    "max |diff| vs compact": v.get("max_abs_diff_vs_compact")} for n, v in lookups.items()]
    try:
        env["load_average_end"] = os.getloadavg()
    except OSError:
        pass
    notes = target_notes(rows, infos)
    payload = {
        "benchmark": "serving_latency",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "config": {"rows": args.rows, "ids": ids, "epochs": args.epochs, "calls_b1": args.calls_b1,
                   "calls_b256": args.calls_b256, "server_calls_b1": args.server_calls_b1,
                   "server_calls_b256": args.server_calls_b256, "warmup": args.warmup,
                   "load_threads": args.load_threads, "load_requests": args.load_requests,
                   "vocabulary_sizes": list(VOCABULARY_SIZES), "embedding_dim": EMBEDDING_DIM,
                   "compression": COMPRESSION, "target_ratio_p99_b256": TARGET_RATIO, "quick": args.quick,
                   "command": args.command},
        "environment": env,
        "schemes": {name: {**{k: v for k, v in info.items() if k != "path"},
                           "in_process": {"serving_default": inproc[name],
                                          "encoded": None if encoded is None else encoded[name]},
                           "server": None if server is None else server[name],
                           "load": None if load is None else load[name]}
                    for name, info in infos.items()},
        "table": rows,
        "server_table": server_rows,
        "lookups": lookups,
        "lookup_table": lookup_rows,
        "notes": notes,
    }
    write_outputs(args, payload, rows, log)
    print()
    print(markdown(rows))
    if server_rows:
        print(markdown(server_rows))
    print(markdown(lookup_rows))
    for n in notes:
        print("note:", n)
    log("done")


def _input_names(infos):
    from tfemb.export import read_report

    first = next(iter(infos.values()))
    return list(read_report(first["path"])["signatures"]["serving_default"]["inputs"])


def target_notes(rows, infos):
    notes = []
    for row in rows:
        if row["p99 <= 1.2x"] == "FAIL" and row["CPU p99 <= 1.2x"] == "FAIL":
            notes.append(f"{row['scheme']}: in-process p99 at batch 256 is {row['b256 p99 vs fixed']:.2f}x the fixed "
                         f"export's (target <= {TARGET_RATIO}x), its CPU time per call "
                         f"{row['b256 CPU p99 vs fixed']:.2f}x at p99: see benchmarks/README.md for the profile.")
    for row in rows:
        p50, wall, cpu = row["b256 p50 vs fixed"], row["p99 <= 1.2x"], row["CPU p99 <= 1.2x"]
        if wall in ("PASS", "FAIL") and wall != cpu:
            notes.append(f"{row['scheme']}: the wall-clock p99 ({wall}, {row['b256 p99 vs fixed']:.2f}x) and the "
                         f"CPU-time p99 ({cpu}, {row['b256 CPU p99 vs fixed']:.2f}x; median {p50:.2f}x) disagree: on a "
                         f"shared machine a wall-clock p99 is mostly time spent waiting for a core; the CPU-time "
                         f"figure is the one that repeats from run to run.")
    pep = next((i for n, i in infos.items() if i["scheme"] == "pep"), None)
    if pep:
        notes.append(f"pep: the exported model is the retrained snapshot (lottery-ticket rewind) of a search with "
                     f"threshold_init={pep['pep_threshold_init']:.2f}, taken at step {pep['pep_search_step']} with "
                     f"{pep['pep_kept']:,} of {pep['pep_dense']:,} embedding parameters kept.")
    for name, info in infos.items():
        tables = info.get("pep_tables")
        if not tables:
            continue
        by_layout = {}
        for feature, t in tables.items():
            kept = t["nnz"] / (t["vocabulary_size"] * EMBEDDING_DIM)
            by_layout.setdefault(t["layout"], []).append(f"{feature} ({t['vocabulary_size']:,} ids, {kept:.0%} kept)")
        notes.append(f"{name}: tables by export layout (compact_min_saving="
                     f"{layer_options(info['export_options']).get('compact_min_saving', 0.25)}): "
                     + "; ".join(f"{layout}: {', '.join(v)}" for layout, v in sorted(by_layout.items())) + ".")
    return notes


if __name__ == "__main__":
    main()
