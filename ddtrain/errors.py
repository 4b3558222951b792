"""Errors that reach the user as one line, with the exit code the CLI returns.

Anything raised as a `DDTrainError` is printed as ``error: <message>`` without a
traceback (``--debug`` shows it). Everything else is a bug and keeps its traceback.
"""


class DDTrainError(Exception):
    """A runtime failure the user can act on (bad data file, corrupt checkpoint...). Exit 1."""

    exit_code = 1


class ConfigError(DDTrainError):
    """A bad option, config key or value: the user must change the command. Exit 2."""

    exit_code = 2


class DataError(DDTrainError):
    """A dataset file is missing, truncated, malformed or fails its checksum. Exit 1."""


class CheckpointError(DDTrainError):
    """A checkpoint is missing, corrupt, or from another model. Exit 1."""
