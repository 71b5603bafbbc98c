"""TF Serving warm-up requests: ``assets.extra/tf_serving_warmup_requests``.

TF Serving replays the ``PredictionLog`` records of this TFRecord file (at most 1,000) when it loads a version,
before the version serves traffic, so the first real request does not pay for graph initialisation. A request
that fails makes the version fail to load; ``export_saved_model`` therefore runs every warm-up request through
the exported signature before it writes the file.
"""

import os

import numpy as np
import tensorflow as tf

#: Path of the warm-up file inside a SavedModel version directory.
WARMUP_PATH = os.path.join("assets.extra", "tf_serving_warmup_requests")

#: Rows of the largest warm-up request.
MAX_WARMUP_BATCH = 256


def _apis():
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    return model_pb2, predict_pb2, prediction_log_pb2


def predict_request(inputs, signature_name="serving_default", model_name=""):
    """A ``PredictRequest`` from ``{input name: array-like}`` (strings, int64, float32 arrays)."""
    _, predict_pb2, _ = _apis()
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    for name, values in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(np.asarray(values)))
    return request


def warmup_batches(inputs, batch_sizes=None):
    """Slices ``{name: array [rows, ...]}`` into the warm-up requests' inputs: all rows (at most
    ``MAX_WARMUP_BATCH``) and one row, or the given ``batch_sizes``."""
    rows = len(next(iter(inputs.values())))
    if rows == 0:
        raise ValueError("warm-up rows are empty (0 rows)")
    sizes = batch_sizes or sorted({min(rows, MAX_WARMUP_BATCH), 1}, reverse=True)
    return [{name: np.asarray(values)[:size] for name, values in inputs.items()} for size in sizes]


def write_warmup_requests(path, batches, signature_name="serving_default", model_name=""):
    """Writes one ``PredictionLog`` (a ``PredictLog`` with its request) per batch to the TFRecord ``path``.

    Args:
        path: the file to write (its directory is created), usually ``<version>/assets.extra/
            tf_serving_warmup_requests``.
        batches: list of ``{input name: array}``, one request each.
        signature_name: signature the requests call. Default ``"serving_default"``.
        model_name: ``model_spec.name`` of the requests (TF Serving does not check it during warm-up).

    Returns:
        The number of records written.
    """
    _, _, prediction_log_pb2 = _apis()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for batch in batches:
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=predict_request(batch, signature_name, model_name))
            )
            writer.write(log.SerializeToString())
    return len(batches)


def read_warmup_requests(path):
    """The ``PredictionLog`` records of a warm-up file (a version directory or the file itself)."""
    _, _, prediction_log_pb2 = _apis()
    if os.path.isdir(path):
        path = os.path.join(path, WARMUP_PATH)
    logs = []
    for record in tf.data.TFRecordDataset(path):
        log = prediction_log_pb2.PredictionLog()
        log.ParseFromString(record.numpy())
        logs.append(log)
    return logs


def request_inputs(log):
    """``{input name: NumPy array}`` of a ``PredictionLog``'s predict request (strings as bytes)."""
    return {name: tf.make_ndarray(proto) for name, proto in log.predict_log.request.inputs.items()}
