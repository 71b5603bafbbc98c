"""Experiments as configs: data -> schema -> model with an embedding scheme -> fit -> evaluate -> report.

A config is a dict (usually a YAML recipe in ``models/``)::

    name: deepfm_synthetic
    data:
      source: synthetic_ctr        # synthetic_ctr | synthetic_cf | movielens_100k | movielens_latest_small
                                   # | movielens_1m | criteo | avazu | csv
      params: {num_rows: 100000}   # synthetic: the generator's; MovieLens: path, task, with_side_features and
                                   # movielens_schema's; criteo: path, nrows, task and criteo_schema's; csv: path
                                   # and schema (schema_from_dataframe's arguments)
      split: {method: random, fractions: [0.8, 0.1, 0.1], seed: 0}   # random | user | temporal
    model: {name: deepfm, embedding_dim: 16, params: {}}
    embedding: {scheme: fixed, params: {}}     # see tfemb.layers.SCHEMES
    numeric_embedding: {scheme: autodis, params: {num_buckets: 20}}   # optional: the dense features as fields
                                               # (tfemb.layers.NUMERIC_SCHEMES: field | autodis); default raw
    train: {epochs: 5, batch_size: 1024, optimizer: adam, learning_rate: 0.001,
            embedding_optimizer: adam, early_stopping: {monitor: val_auc, patience: 2}}
    pep: {targets: [0.25], retrain: rewind, search_epochs: 8}   # optional, with scheme: pep (see run)
    autoemb: {mode: bilevel, validation: val}   # optional, with scheme: autoemb (tfemb.autoemb.fit_experiment)
"""

import copy
import json
import os
import time
import warnings

import numpy as np
import pandas as pd
import tensorflow as tf

from tfemb import data as tfdata
from tfemb._keras import keras
from tfemb.errors import DataError
from tfemb.layers import scheme_factory
from tfemb.models import get_model_class
from tfemb.tasks import compile_model

DEFAULTS = {
    "name": "experiment",
    "seed": 0,
    "data": {"source": "synthetic_ctr", "params": {}, "split": {"method": "random", "fractions": [0.8, 0.1, 0.1]}},
    "model": {"name": "deepfm", "embedding_dim": 16, "params": {}},
    "embedding": {"scheme": "fixed", "params": {}},
    "train": {
        "epochs": 5,
        "batch_size": 1024,
        "optimizer": "adam",
        "learning_rate": 0.001,
        "embedding_optimizer": None,
        "embedding_learning_rate": None,
        "early_stopping": None,
        "checkpoint": False,
        "verbose": 1,
        "jit_compile": False,
    },
    "numeric_embedding": None,
    "pep": None,
    "autoemb": None,
}


def merge(base, override):
    """Recursive dict merge: ``override`` wins; returns a new dict."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


#: Keys each section of a recipe may hold (``check_config``); ``*.params`` are checked by what they are passed to.
SECTION_KEYS = {
    "data": {"source", "params", "split"},
    "data.split": {"method", "fractions", "seed", "time_column", "user_column", "test_fraction", "val_fraction"},
    "model": {"name", "embedding_dim", "params"},
    "embedding": {"scheme", "params"},
    "numeric_embedding": {"scheme", "params"},
    "train": set(DEFAULTS["train"]),
    "train.early_stopping": {"monitor", "mode", "patience", "min_delta", "baseline", "start_from_epoch"},
    "pep": {"targets", "retrain", "retrain_target", "check_every", "search_epochs", "search_learning_rate"},
    "autoemb": {"mode", "validation", "controller_optimizer", "controller_learning_rate"},
}


def _positive_int(value, key):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DataError(f"{key} must be an int >= 1. Received: {key.rsplit('.', 1)[-1]}={value!r}")
    return int(value)


def check_config(cfg, where="config"):
    """``DataError`` naming the key and the value for a recipe (already merged with ``DEFAULTS``) that would
    otherwise run with other settings than written: an unknown key (a typo such as ``train.epocs`` silently kept
    the default), a section that is not a mapping, a non-positive or non-integer ``epochs`` / ``batch_size`` /
    ``embedding_dim``, a non-positive learning rate. Returns ``cfg``."""
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise DataError(f"{where}: unknown top-level key(s) {unknown}; known: {sorted(DEFAULTS)}")
    for section, known in SECTION_KEYS.items():
        parent, _, child = section.partition(".")
        value = cfg.get(parent)
        if child:
            value = value.get(child) if isinstance(value, dict) else None
        if value is None and section in ("pep", "autoemb", "numeric_embedding", "data.split",
                                         "train.early_stopping"):
            continue
        if not isinstance(value, dict):
            raise DataError(f"{where}: {section} must be a mapping. Received: {section}={value!r}")
        bad = sorted(set(value) - known)
        if bad:
            raise DataError(f"{where}: unknown key(s) {', '.join(f'{section}.{k}' for k in bad)}; known keys of "
                            f"{section}: {sorted(known)}")
    for section in ("data", "model", "embedding", "numeric_embedding"):
        if cfg.get(section) is None:
            continue
        params = cfg[section].get("params")
        if params is not None and not isinstance(params, dict):
            raise DataError(f"{where}: {section}.params must be a mapping. Received: {section}.params={params!r}")
    train = cfg["train"]
    _positive_int(train["epochs"], "train.epochs")
    _positive_int(train["batch_size"], "train.batch_size")
    _positive_int(cfg["model"].get("embedding_dim", 16), "model.embedding_dim")
    for key in ("learning_rate", "embedding_learning_rate"):
        value = train.get(key)
        if value is None and key == "embedding_learning_rate":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise DataError(f"{where}: train.{key} must be a number > 0. Received: {key}={value!r}")
    return cfg


def load_config(path):
    """Reads a YAML (or JSON) recipe and fills in the defaults."""
    import yaml

    if not os.path.exists(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as fh:
        text = fh.read()
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DataError(f"config {path} is not valid YAML: {exc}") from exc
    if not isinstance(cfg, dict):
        raise DataError(f"config {path} must be a mapping at the top level. Received: {type(cfg).__name__}")
    return check_config(merge(DEFAULTS, cfg), where=f"config {path}")


# ------------------------------------------------------------------------------------------------ data
def _source_frame(source, params):
    """(DataFrame, unfitted Schema) for a data source name."""
    params = dict(params or {})
    if source == "synthetic_ctr":
        df = tfdata.make_synthetic_ctr(**params)[0]
        return df, tfdata.synthetic_ctr_schema(df)
    if source == "synthetic_cf":
        task = params.get("task", "binary")
        df = tfdata.make_synthetic_cf(**params)[0]
        return df, tfdata.synthetic_cf_schema(df, task=task)
    task = params.pop("task", "binary")
    if source in ("movielens_100k", "movielens_1m", "movielens_latest_small", "movielens_latest"):
        folder = params.pop("path", None) or tfdata.require_data(
            {"movielens_100k": "movielens-100k", "movielens_latest_small": "movielens-latest-small",
             "movielens_latest": "movielens-latest", "movielens_1m": "movielens-1m"}[source])
        reader = {"movielens_100k": tfdata.read_movielens_100k, "movielens_1m": tfdata.read_movielens_1m}.get(
            source, tfdata.read_movielens_latest)
        side = params.pop("with_side_features", False)
        return reader(folder), tfdata.movielens_schema(task=task, with_side_features=side, **params)
    if source == "criteo":
        path = params.pop("path", None) or os.path.join(tfdata.require_data("criteo"), "criteo_train_head10k.txt")
        nrows = params.pop("nrows", None)
        return tfdata.read_criteo(path, nrows=nrows), tfdata.criteo_schema(**params)
    if source == "csv":
        missing = [key for key in ("path", "schema") if key not in params]
        if missing:
            raise DataError(f"data.params.{missing[0]} is required for source csv (the file, and the arguments of "
                            f"tfemb.data.schema_from_dataframe). Received: params={params}")
        path = params.pop("path")
        schema_cfg = params.pop("schema")
        return tfdata.read_csv(path), tfdata.schema_from_dataframe(None, **schema_cfg)
    raise DataError(
        "data.source must be one of synthetic_ctr, synthetic_cf, movielens_100k, movielens_1m, "
        f"movielens_latest_small, movielens_latest, criteo, csv. Received: source={source!r}"
    )


def split_frame(df, split_cfg, schema):
    split_cfg = dict(split_cfg or {})
    method = split_cfg.pop("method", "random")
    fractions = tuple(split_cfg.pop("fractions", (0.8, 0.1, 0.1)))
    seed = split_cfg.pop("seed", 0)
    if method == "random":
        parts = tfdata.random_split(df, fractions=fractions, seed=seed)
    elif method == "temporal":
        column = split_cfg.pop("time_column", None) or schema.time_column
        parts = tfdata.temporal_split(df, column, fractions=fractions)
    elif method == "user":
        test_fraction = split_cfg.pop("test_fraction", fractions[-1])
        train, test = tfdata.user_split(df, user_column=split_cfg.pop("user_column", "user_id"),
                                        test_fraction=test_fraction, time_column=schema.time_column, seed=seed)
        val_fraction = split_cfg.pop("val_fraction", 0.1)
        train, val = tfdata.random_split(train, fractions=(1 - val_fraction, val_fraction), seed=seed)
        parts = (train, val, test)
    else:
        raise DataError(f"data.split.method must be random, user or temporal. Received: method={method!r}")
    if len(parts) == 2:
        parts = (parts[0], None, parts[1])
    return parts


class PreparedData:
    """A fitted schema and the encoded train / validation / test arrays."""

    def __init__(self, schema, frames):
        self.schema = schema
        self.frames = frames
        self.arrays = {name: (None if df is None else schema.transform(df)) for name, df in frames.items()}

    def dataset(self, split, batch_size, shuffle=False, seed=0):
        x, y = self.arrays[split]
        return tfdata.make_dataset(x, y, batch_size=batch_size, shuffle=shuffle, seed=seed)

    def num_rows(self, split):
        return 0 if self.frames.get(split) is None else len(self.frames[split])


def prepare_data(data_cfg):
    try:
        df, schema = _source_frame(data_cfg["source"], data_cfg.get("params"))
    except TypeError as exc:  # e.g. a misspelt parameter: "got an unexpected keyword argument 'num_row'"
        raise DataError(f"data.params of source {data_cfg['source']!r} ({data_cfg.get('params')}): {exc}") from exc

    train, val, test = split_frame(df, data_cfg.get("split"), schema)
    schema.fit(train)
    return PreparedData(schema, {"train": train, "val": val, "test": test})


# ------------------------------------------------------------------------------------------------ model
def scheme_factory_for(schema, scheme, params):
    """The scheme factory of a recipe's ``embedding`` section: ``scheme_factory(scheme, **params)``, except
    ``{"scheme": "md", "params": {"blocking": "field", ...}}``, which sizes one block per field from the whole
    Schema (the paper's CTR setting: ``md_field_factory``; it takes ``output_dim``, ``alpha``, ``round_pow2``,
    ``threshold``, ``compression`` and layer arguments)."""
    params = dict(params)
    if scheme == "md" and params.get("blocking") == "field":
        from tfemb.layers.mixed_dimension_embedding import md_field_factory

        params.pop("blocking")
        if "num_blocks" in params:
            raise ValueError(f"md blocking='field' gives each field one block; num_blocks is for "
                             f"blocking='popularity'. Received: num_blocks={params['num_blocks']!r}")
        return md_field_factory(schema, **params)
    return scheme_factory(scheme, **params)


def numeric_factory_for(numeric_cfg, dim):
    """The ``numeric_embeddings`` argument of a recipe's ``numeric_embedding`` section (None: raw dense inputs)."""
    if not numeric_cfg:
        return None
    from tfemb.layers import numeric_factory

    params = dict(numeric_cfg.get("params") or {})
    params.setdefault("output_dim", dim)
    return numeric_factory(numeric_cfg.get("scheme"), **params)


def build_model(schema, model_cfg, embedding_cfg, train_cfg=None, numeric_cfg=None):
    train_cfg = train_cfg or {}
    cls = get_model_class(model_cfg["name"])
    dim = int(model_cfg.get("embedding_dim", 16))
    emb_params = dict(embedding_cfg.get("params") or {})
    emb_params.setdefault("output_dim", dim)
    scheme = embedding_cfg.get("scheme", "fixed")
    kwargs = dict(model_cfg.get("params") or {})
    try:
        factory = scheme_factory_for(schema, scheme, emb_params)
        numeric = numeric_factory_for(numeric_cfg, dim)
        if numeric is not None:
            kwargs["numeric_embeddings"] = numeric
        return cls(
            schema,
            embeddings=factory,
            embedding_dim=dim,
            embedding_optimizer=train_cfg.get("embedding_optimizer"),
            embedding_learning_rate=train_cfg.get("embedding_learning_rate"),
            **kwargs,
        )
    except (TypeError, ValueError) as exc:  # name the sections a misspelt or missing parameter came from
        numeric = "" if not numeric_cfg else (f" and numeric embedding {numeric_cfg.get('scheme')!r} (params "
                                              f"{numeric_cfg.get('params') or {}})")
        raise DataError(f"model {model_cfg['name']!r} (params {model_cfg.get('params') or {}}) with embedding "
                        f"scheme {scheme!r} (params {embedding_cfg.get('params') or {}}){numeric}: {exc}") from exc


class EpochLog(keras.callbacks.Callback):
    """One line per epoch through ``log`` (the main job's progress when Keras' bars are off)."""

    def __init__(self, log, keys=("loss", "val_loss", "val_auc", "val_accuracy")):
        super().__init__()
        self._log, self._keys = log, keys

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        parts = [f"{k}={float(logs[k]):.4f}" for k in self._keys if k in logs]
        self._log(f"        epoch {epoch + 1}: " + ", ".join(parts))


def _callbacks(train_cfg, out_dir, has_val, log=None, task=None):
    cbs = [EpochLog(log)] if log is not None else []
    es = train_cfg.get("early_stopping")
    if es and has_val:
        es = dict(es)
        monitor = es.pop("monitor", "val_loss")
        if task is not None:  # Keras only warns about an unknown monitor, and then never stops early
            from tfemb.tasks import task_metrics

            names = ["loss"] + [m.name for m in task_metrics(task)]
            known = names + [f"val_{n}" for n in names]
            if monitor not in known:
                raise DataError(f"train.early_stopping.monitor must be one of {known} for a {task} model. "
                                f"Received: monitor={monitor!r}")
        mode = es.pop("mode", "max" if monitor.endswith(("auc", "accuracy")) else "min")
        cbs.append(keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, restore_best_weights=True,
                                                 patience=es.pop("patience", 2), **es))
    if train_cfg.get("checkpoint") and out_dir:
        os.makedirs(out_dir, exist_ok=True)
        cbs.append(keras.callbacks.ModelCheckpoint(os.path.join(out_dir, "checkpoint.weights.h5"),
                                                   save_weights_only=True))
    return cbs


def evaluate(model, prepared, split, batch_size):
    """Metrics of ``model`` on a split, as a plain dict of floats."""
    x, y = prepared.arrays[split]
    results = model.evaluate(tfdata.make_dataset(x, y, batch_size=batch_size), verbose=0, return_dict=True)
    return {k: float(v) for k, v in results.items()}


def _pep_search(model, cfg, train_ds, log=None):
    """The PEP search of ``run``: ``cfg["pep"]`` = ``{targets, retrain ("rewind" | "random"), retrain_target,
    search_epochs, search_learning_rate, check_every}``.

    Trains ``model`` (PEP tables) for ``search_epochs`` (default ``train.epochs``; no early stopping: the search
    runs until every target is reached; at ``search_learning_rate`` if given, else ``train.learning_rate``) with
    ``tfemb.pep.PEPSnapshots``, then returns the retrained model (trained at ``train.learning_rate``) of
    ``retrain_target`` (default the first target), compiled as the search model, and the search summary. When
    that target is not reached the searched model itself is returned and the summary says ``reached: False``.
    """
    from tfemb.pep import PEPSnapshots, pep_layers, retrain

    pep_cfg = dict(cfg["pep"])
    train_cfg = cfg["train"]
    if not pep_layers(model):
        raise ValueError("config 'pep' needs embedding.scheme 'pep'. Received: "
                         f"scheme={cfg['embedding'].get('scheme')!r}")
    targets = pep_cfg.get("targets", [0.25])
    targets = list(targets) if isinstance(targets, (list, tuple)) else [targets]
    chosen = pep_cfg.get("retrain_target", targets[0])
    mode = pep_cfg.get("retrain", "rewind")
    snaps = PEPSnapshots(targets, check_every=int(pep_cfg.get("check_every", 5)), stop_when_done=True)
    callbacks = [snaps]
    if log:
        callbacks.append(keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: log(
            f"        search epoch {epoch + 1}: {snaps.last_count:,} of {snaps.dense_count:,} non-zero")))
    if pep_cfg.get("search_learning_rate"):  # the thresholds move by ~lr per step: a faster search
        compile_model(model, optimizer=train_cfg["optimizer"], learning_rate=float(pep_cfg["search_learning_rate"]),
                      jit_compile=train_cfg.get("jit_compile", False))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # unreached targets are reported in the summary
        history = model.fit(train_ds, epochs=int(pep_cfg.get("search_epochs", train_cfg["epochs"])), shuffle=False,
                            callbacks=callbacks, verbose=train_cfg.get("verbose", 1))
    summary = {
        "targets": targets, "retrain": mode, "retrain_target": chosen, "dense_count": int(snaps.dense_count),
        "search_seconds": time.perf_counter() - start, "search_epochs": len(history.history.get("loss", [])),
        "search_steps": snaps.step,
        "snapshots": [{"target": s.target, "target_count": s.target_count, "count": s.count, "step": s.step,
                       "epoch": s.epoch} for s in snaps.snapshots],
        "unreached": snaps.unreached,
    }
    try:
        snapshot = snaps.snapshot(chosen)
    except KeyError:
        if log:
            log(f"        PEP target {chosen!r} not reached (fewest non-zeros {snaps.min_count:,} of "
                f"{snaps.dense_count:,}): reporting the searched model")
        return model, dict(summary, reached=False, nnz=snaps.last_count, _history=history)
    ticket = retrain(model, snapshot, mode=mode, seed=int(cfg.get("seed", 0)))
    compile_model(ticket, optimizer=train_cfg["optimizer"], learning_rate=train_cfg["learning_rate"],
                  jit_compile=train_cfg.get("jit_compile", False))
    if log:
        log(f"        PEP snapshot {chosen!r}: {snapshot.count:,} of {snaps.dense_count:,} non-zeros at step "
            f"{snapshot.step}; retraining ({mode})")
    return ticket, dict(summary, reached=True, nnz=snapshot.count)


def run(cfg, prepared=None, out_dir=None, log=None):
    """Trains and evaluates one config; returns a result dict (and writes it to ``out_dir`` when given)."""
    cfg = check_config(merge(DEFAULTS, cfg), where=f"config {cfg.get('name', '')!r}".rstrip())
    tf.keras.utils.set_random_seed(int(cfg.get("seed", 0)))
    prepared = prepared or prepare_data(cfg["data"])
    train_cfg = cfg["train"]
    model = build_model(prepared.schema, cfg["model"], cfg["embedding"], train_cfg, cfg.get("numeric_embedding"))
    compile_model(model, optimizer=train_cfg["optimizer"], learning_rate=train_cfg["learning_rate"],
                  jit_compile=train_cfg.get("jit_compile", False))
    batch = int(train_cfg["batch_size"])
    has_val = prepared.num_rows("val") > 0
    train_ds = prepared.dataset("train", batch, shuffle=True, seed=int(cfg.get("seed", 0)))
    val_ds = prepared.dataset("val", batch) if has_val else None
    callbacks = _callbacks(train_cfg, out_dir, has_val, log, model.task)  # checked before any training
    pep = None
    if cfg.get("pep"):  # PEP: search with snapshots, then the fit below retrains the snapshot's lottery ticket
        model, pep = _pep_search(model, cfg, train_ds, log)
    start = time.perf_counter()
    if pep is not None and not pep["reached"]:
        history = pep.pop("_history")  # no snapshot to retrain: the searched model is reported, flagged
    elif cfg.get("autoemb"):  # AutoEmb / DARTS / SAM: the alternating search is the training
        from tfemb.autoemb import autoemb_layers, fit_experiment

        if not autoemb_layers(model):
            raise ValueError("config 'autoemb' needs embedding.scheme 'autoemb'. Received: "
                             f"scheme={cfg['embedding']['scheme']!r}")
        history = fit_experiment(model, cfg, train_ds, val_ds, callbacks=callbacks,
                                 verbose=train_cfg.get("verbose", 1))
    else:
        history = model.fit(train_ds, validation_data=val_ds, epochs=int(train_cfg["epochs"]), shuffle=False,
                            callbacks=callbacks, verbose=train_cfg.get("verbose", 1))
    seconds = time.perf_counter() - start
    epochs_run = len(history.history.get("loss", []))
    test_split = "test" if prepared.num_rows("test") else "val"
    metrics = evaluate(model, prepared, test_split, batch)
    # The validation split's metrics: what a choice between runs should read (tfemb compare's export), the test
    # split staying for the report.
    val_metrics = evaluate(model, prepared, "val", batch) if has_val and test_split == "test" else None
    result = {
        "name": cfg["name"],
        "model": cfg["model"]["name"],
        "scheme": cfg["embedding"]["scheme"],
        "scheme_params": cfg["embedding"].get("params") or {},
        "embedding_dim": model.embedding_dim,
        "metrics": metrics,
        "evaluated_on": test_split,
        "val_metrics": val_metrics,
        "embedding_parameters": int(model.embedding_parameter_count()),
        "embedding_bytes": int(model.embedding_storage_bytes()),
        "total_parameters": int(sum(int(np.prod(v.shape)) for v in model.weights)),
        "train_seconds": seconds,
        "epochs": epochs_run,
        "examples_per_second": prepared.num_rows("train") * epochs_run / max(seconds, 1e-9),
        "tables": model.embedding_report(),
        "numeric_embedding": cfg.get("numeric_embedding"),
        "numeric_parameters": int(model.numeric_parameter_count()),
        "numeric_tables": model.numeric_embedding_report(),
        "history": {k: [float(x) for x in v] for k, v in history.history.items()},
    }
    if pep is not None:
        pep["retrain_seconds"] = seconds
        result["train_seconds"] = pep["search_seconds"] + seconds  # the method's whole training cost
        result["pep"] = pep
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        model.save(os.path.join(out_dir, "model.keras"))
        prepared.schema.save(os.path.join(out_dir, "schema.json"))
        with open(os.path.join(out_dir, "result.json"), "w") as fh:
            json.dump(result, fh, indent=2)
    result["_model"] = model
    return result


def table_rows(results, metric_names):
    rows = []
    for r in results:
        row = {"variant": r["name"], "scheme": r["scheme"]}
        for m in metric_names:
            row[m] = r["metrics"].get(m, float("nan"))
        row["emb_params"] = r["embedding_parameters"]
        row["emb_bytes"] = r["embedding_bytes"]
        row["train_s"] = r["train_seconds"]
        rows.append(row)
    return pd.DataFrame(rows)
