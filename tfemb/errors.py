"""Errors tfemb raises for bad input. Each message names the field and the value received."""


class DataError(ValueError):
    """Bad input data: a missing column, a wrong dtype, a missing or out-of-range value, an unreadable file."""
