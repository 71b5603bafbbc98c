"""tfemb: how big each embedding of a TensorFlow/Keras recommender should be."""

from tfemb.version import __version__
