"""Error types shared by every layer.

A `MedsegError` is meant for a person: its message names the file or case, says
what was expected, what was found, and how to fix it. The CLI prints it without a
traceback and exits with status 2.
"""

from __future__ import annotations

__all__ = ["MedsegError", "DataError", "LabelError"]


class MedsegError(Exception):
    """An error caused by user input or configuration, with a message for a person."""


class DataError(MedsegError):
    """A data root, case or file is missing, unreadable or inconsistent."""


class LabelError(DataError):
    """Label values do not fit the label convention."""
