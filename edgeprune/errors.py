"""User-facing errors.

Anything a user can cause (bad path, bad model name, bad number, unreachable device) is raised as
an `EdgepruneError`; the CLI prints its message on one line and exits non-zero, never a traceback.
"""

from __future__ import annotations


class EdgepruneError(Exception):
    """An error caused by input the user can fix. The message names the problem and, ideally, the fix."""

    exit_code: int = 2


class UnsupportedModelError(EdgepruneError):
    """The model (or one of its layers) cannot be handled by the requested operation."""


class DataError(EdgepruneError):
    """The data is missing, empty, or does not match the model."""


class DeviceError(EdgepruneError):
    """A benchmark device cannot be reached or fails mid-run."""

    exit_code = 3
