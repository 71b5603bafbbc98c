"""The one place tfemb's version is written (read by setup.py and tfemb.__version__)."""

__version__ = "0.1.0"
