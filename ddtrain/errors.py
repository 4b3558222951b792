"""Errors that reach the user as one line, with the exit code the CLI returns.

Anything raised as a `DDTrainError` is printed as ``error: <message>`` without a
traceback (``--debug`` shows it). Everything else is a bug and keeps its traceback.
"""


class DDTrainError(Exception):
    """A runtime failure the user can act on (bad data file, corrupt checkpoint...). Exit 1.

    collective: every rank raised this same error at the same point of the program (a
    decision all ranks took on identical data), so an MPI job can end cleanly with one
    message instead of aborting. Set it with `everywhere(...)`.
    """

    exit_code = 1
    collective = False


def everywhere(error: DDTrainError) -> DDTrainError:
    """Mark `error` as raised by every rank at the same point (see DDTrainError.collective)."""
    error.collective = True
    return error


class ConfigError(DDTrainError):
    """A bad option, config key or value: the user must change the command. Exit 2."""

    exit_code = 2


class DataError(DDTrainError):
    """A dataset file is missing, truncated, malformed or fails its checksum. Exit 1."""


class CheckpointError(DDTrainError):
    """A checkpoint is missing, corrupt, or from another model. Exit 1."""
