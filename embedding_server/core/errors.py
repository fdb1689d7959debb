"""Exception types shared by the store, the gRPC service and the clients.

Every error a caller can cause is an :class:`InvalidRequestError` (gRPC ``INVALID_ARGUMENT``);
every configuration problem is a :class:`ConfigError`. Both carry a message that names the
offending file, key, feature or table, so the caller can fix it without reading code.
"""


class ConfigError(ValueError):
    """A configuration file or value is missing, misspelled or out of range."""


class InvalidRequestError(ValueError):
    """A lookup, gradient or admin request is malformed; nothing of it was applied."""


class ShardUnavailableError(RuntimeError):
    """An embedding server could not be reached or failed while serving a request."""


def describe_value(x: object) -> str:
    """ "uint64 array of shape (3,)" or a type name, for error messages."""
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is not None and dtype is not None:
        return f"{dtype} array of shape {tuple(shape)}"
    return type(x).__name__
