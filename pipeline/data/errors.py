"""One error type for bad data inputs, so the CLI and the loader can print one line naming the file."""

from __future__ import annotations


class DataError(ValueError):
    """A problem with a data file or data setting; the message is one line and names the file or key."""
