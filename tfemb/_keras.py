"""One import point for Keras so tfemb runs under Keras 3 (default) and Keras 2.

TensorFlow 2.21 resolves ``tf.keras`` to Keras 3, or to ``tf-keras`` (Keras 2) when
``TF_USE_LEGACY_KERAS=1`` is set before TensorFlow is first imported. tfemb only uses the Layer/Model API
common to both, and asks this module when the two differ.
"""

import tensorflow as tf

keras = tf.keras

#: True under Keras 3, False under Keras 2 (tf-keras).
IS_KERAS_3 = not keras.__name__.startswith("tf_keras")


def dataset_fit_kwargs(x, kwargs):
    """``fit`` keyword arguments for ``x``: ``shuffle=False`` added when ``x`` is a ``tf.data.Dataset`` and the
    caller did not pass ``shuffle``.

    A dataset is never shuffled by ``fit`` (its own ``.shuffle()`` does that, e.g. ``make_dataset(...,
    shuffle=True)``), but Keras 3 warns "`shuffle=True` was passed, but will be ignored" on every such ``fit``
    because ``shuffle=True`` is ``fit``'s default, which reads as if the dataset's own shuffling were dropped.
    The training is the same either way; an explicit ``shuffle`` is passed through untouched.
    """
    if isinstance(x, tf.data.Dataset) and "shuffle" not in kwargs:
        return {**kwargs, "shuffle": False}
    return kwargs


def register(cls):
    """Registers a public class for (de)serialisation under the ``tfemb`` package."""
    return keras.utils.register_keras_serializable(package="tfemb")(cls)


def serialize(obj):
    return keras.utils.serialize_keras_object(obj)


def deserialize(config):
    return keras.utils.deserialize_keras_object(config)


def backend_name():
    return "keras3" if IS_KERAS_3 else "keras2"


class TrackedCollectionsCheckpoint:
    """Mixin of tfemb's layers and models: under Keras 3, ``tf.train.Checkpoint`` also saves and restores the
    layers and variables they hold in lists and dicts (e.g. a model's ``embedding_layers``, an MLP's dense layers).

    Keras 3 wraps list and dict attributes in its own tracked collections, which TensorFlow's checkpointing does not
    see (keras-team/keras#19425): a ``tf.train.Checkpoint(model=...)`` of a tfemb model silently held neither its
    embedding tables nor its dense tower (only what the compiled optimizer happened to reference). Here each
    trackable element of such a collection is a checkpoint child named ``"<attribute>/<key or index>"``. Keras'
    own ``.keras`` / ``.weights.h5`` files do not use this. Keras 2 tracks these collections itself: a no-op there.
    Restore into a built model (``model.build()``): elements are matched when the restore runs, not later.
    """

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        children = super()._trackable_children(save_type, **kwargs)
        if IS_KERAS_3 and save_type == "checkpoint":
            for attribute in dict.fromkeys(getattr(self, "_tracked", ())):
                value = getattr(self, attribute, None)
                if isinstance(value, dict):
                    items = value.items()
                elif isinstance(value, (list, tuple)):
                    items = enumerate(value)
                else:  # sets: no stable order to name their elements by
                    continue
                for key, item in items:
                    if isinstance(item, tf.__internal__.tracking.Trackable):
                        children.setdefault(f"{attribute}/{key}", item)
        return children
