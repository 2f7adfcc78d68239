"""Errors a user can act on. The CLI prints them as one line and exits with status 2, no traceback."""


class QwenClsError(Exception):
    """Base class for problems in the user's config or data."""


class ConfigError(QwenClsError):
    """A config key is missing, unknown or has a bad value; the message names the key."""


class DataError(QwenClsError):
    """A data file or row is bad; the message names the file and line."""


class DiskSpaceError(QwenClsError):
    """The checkpoints a run will keep do not fit in the free space of its output_dir."""


class CheckpointError(QwenClsError):
    """A checkpoint cannot be used: incomplete, or holding objects other than tensors (never unpickled)."""


class NonFiniteLossError(QwenClsError):
    """The loss went NaN or infinite; the message names the step and the batch's datasets."""
