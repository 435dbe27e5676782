"""The errors mmjax raises for input a user can fix. Each message says what is wrong and how to
fix it; entry points turn them into one `error:` line and exit code 2, before anything compiles.

A leaf module: it imports nothing of mmjax, so every layer can raise these without importing the
layers above it.
"""


class ConfigError(ValueError):
    """A configuration that cannot run; the message says how to fix it."""


class DataError(ValueError):
    """A dataset that cannot be opened as asked; the message says what to do."""


class NotPreparedError(DataError):
    """A catalog dataset whose files are not under the data dir."""


class EvalSpecError(ValueError):
    """An evaluation spec (`KIND:DATASET[:SPLIT]`) that cannot run as asked; the message names
    the spec and says what to do."""
