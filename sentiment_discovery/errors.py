"""The project's own input errors: what ``cli.run_script`` reports in one line (anything else keeps its
traceback, so that a bug never looks like bad input)."""

from __future__ import annotations


class DataError(Exception):
    """Bad input data: the message names the file and, where it applies, the line and key."""


class CheckpointError(Exception):
    """A checkpoint that cannot be read or does not fit its architecture."""


class UsageError(ValueError):
    """A value or path a user gave that cannot be used (a flag out of range, a neuron the model lacks,
    an output path that cannot be written); the message names the flag or path."""


class OutputError(OSError):
    """An output that cannot be written (a symlink planted at it, a full disk, no permission), in one
    line naming it (safe_io.py)."""


INPUT_ERRORS = (DataError, CheckpointError, UsageError, OutputError)
