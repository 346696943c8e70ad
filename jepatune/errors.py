"""One exception hierarchy for errors a user can cause.

The CLI turns a `JepatuneError` into one line on stderr and exit status 2; any other
exception is a bug and keeps its traceback.
"""


class JepatuneError(Exception):
    """Base class: bad input the user can fix. The message names the thing and the fix."""


class ConfigError(JepatuneError):
    """A config key, value or file is invalid."""


class DataError(JepatuneError):
    """A data folder, shard or text file is missing or malformed."""


class ExportError(JepatuneError):
    """An artifact or checkpoint cannot be written or read."""


class SpaceError(JepatuneError):
    """A search space is invalid or impossible to satisfy."""
