"""User-facing errors.

Anything a user can cause (a bad option, a missing file, a checkpoint of the wrong model)
raises :class:`DyditError`. The CLI prints such errors as one line and exits non-zero;
everything else is a bug and keeps its traceback.
"""


class DyditError(Exception):
    """An error caused by user input, reported by the CLI as a one-line message."""


class CheckpointError(DyditError):
    """A checkpoint file is missing, corrupt, unsafe or does not fit the model."""
