"""The one error base class, at the bottom of the layers: every part may raise it, none imports the CLI.

:class:`UserError` is a problem with the user's input: ``sgtm`` prints it as one line, exit code 2,
no traceback (``SGTM_DEBUG=1`` shows the traceback). :class:`ConfigError` is a bad config value;
its message names the dotted key (``pipeline.config`` re-exports it)."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback."""


class ConfigError(UserError, ValueError):
    """A bad config value; the message names the key and is one line."""
