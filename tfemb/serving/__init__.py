"""Serving tfemb exports: a client for TF Serving's REST / gRPC APIs and a local server that speaks them.

``Client`` and ``ServingError`` import no TensorFlow (REST needs only the standard library and NumPy).
``ModelRegistry``, ``LocalServer`` and ``serve`` (the ``tfemb serve`` command) load SavedModels, so they are
imported on first use.
"""

from tfemb.serving.client import Client, ServingError

__all__ = ["Client", "ServingError", "LocalServer", "ModelRegistry", "ServingStatus", "serve"]


def __getattr__(name):
    if name in ("LocalServer", "ModelRegistry", "ServingStatus", "serve"):
        from tfemb.serving import server

        return getattr(server, name)
    raise AttributeError(f"module 'tfemb.serving' has no attribute {name!r}")
