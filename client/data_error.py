"""The one error for data a node or a simulation cannot use (re-exported by fedsafe.client.data)."""


class DataError(ValueError):
    """Data that cannot be used as asked: a missing file, a bad column, too few samples, an unreadable image."""
