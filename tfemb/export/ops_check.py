"""Which ops a SavedModel needs, and whether stock TensorFlow Serving has them all.

TF Serving links TensorFlow's core op library and nothing else: a graph that calls Python (``tf.py_function``,
``tf.numpy_function``: ops ``EagerPyFunc``, ``PyFunc``, ``PyFuncStateless``) or an op from a custom library
(``tf.load_op_library``, TF Text, TF Addons...) fails to load or to run there. ``list_ops`` reads every op of
a SavedModel's MetaGraphs, in the graph and in every function of its function library; ``check_ops`` fails on
any op that is not a core op.

Core ops are the ones TensorFlow generates into ``tf.raw_ops`` from its own op registry. An op registered later
by a custom library is in the runtime registry but not in ``tf.raw_ops``; an op no loaded library registers is
in neither. The Python-function ops are core ops with Python kernels, so they are refused by name.
"""

import os

import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

#: Core ops whose kernels call back into the Python interpreter (absent from a C++ server).
PYTHON_OPS = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc"})


class UnsupportedOpsError(ValueError):
    """A SavedModel uses ops stock TF Serving does not have; ``.ops`` maps each op to the functions using it."""

    def __init__(self, message, ops):
        super().__init__(message)
        self.ops = ops


_CORE_OPS = None


def core_op_names():
    """Frozenset of the core TensorFlow op names (``tf.raw_ops``)."""
    global _CORE_OPS
    if _CORE_OPS is None:
        _CORE_OPS = frozenset(name for name in dir(tf.raw_ops) if not name.startswith("_"))
    return _CORE_OPS


def read_saved_model_proto(path):
    """The ``SavedModel`` protobuf of a SavedModel directory (or of a ``saved_model.pb`` file)."""
    pb = os.path.join(path, "saved_model.pb") if os.path.isdir(path) else path
    with open(pb, "rb") as fh:
        data = fh.read()
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString(data)
    return proto


def list_ops(path_or_proto):
    """Ops of every MetaGraph of a SavedModel.

    Args:
        path_or_proto: a SavedModel directory, its ``saved_model.pb``, or a parsed ``SavedModel`` proto.

    Returns:
        ``{op_name: sorted list of places}``, a place being ``"graph"`` (the MetaGraph's top-level graph) or
        ``"function:<name>"`` (a function of the library). Calls of library functions (nodes whose op is a
        function name) are not ops and are left out.
    """
    proto = path_or_proto if isinstance(path_or_proto, saved_model_pb2.SavedModel) \
        else read_saved_model_proto(path_or_proto)
    found = {}
    for meta_graph in proto.meta_graphs:
        graph = meta_graph.graph_def
        functions = {f.signature.name for f in graph.library.function}
        for node in graph.node:
            if node.op not in functions:
                found.setdefault(node.op, set()).add("graph")
        for function in graph.library.function:
            for node in function.node_def:
                if node.op not in functions:
                    found.setdefault(node.op, set()).add(f"function:{function.signature.name}")
    return {op: sorted(places) for op, places in sorted(found.items())}


def unsupported_ops(path_or_proto):
    """``{op: reason}`` for every op of the SavedModel that is not a core op or that needs Python."""
    core = core_op_names()
    bad = {}
    for op in list_ops(path_or_proto):
        if op in PYTHON_OPS:
            bad[op] = "runs a Python function (tf.py_function / tf.numpy_function)"
        elif op not in core:
            bad[op] = "not a core TensorFlow op (a custom op library)"
    return bad


def check_ops(path_or_proto):
    """Raises ``UnsupportedOpsError`` naming each offending op, where it is used and why; returns the op list
    (``list_ops``) when every op is a core op that needs no Python."""
    ops = list_ops(path_or_proto)
    bad = unsupported_ops(path_or_proto)
    if bad:
        where = path_or_proto if isinstance(path_or_proto, str) else "the SavedModel"
        details = "; ".join(f"{op} ({reason}; in {', '.join(ops[op][:3])})" for op, reason in sorted(bad.items()))
        raise UnsupportedOpsError(
            f"{where} uses ops that stock TensorFlow Serving cannot run: {details}",
            {op: ops[op] for op in bad},
        )
    return ops
