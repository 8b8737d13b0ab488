"""Connector errors, grouped by what the caller should do next.

Pure Python: imported by plugins, so no Django here.
"""

from __future__ import annotations


class ConnectorError(Exception):
    """Root of every error a connector raises."""


class ConfigError(ConnectorError):
    """The connector's configuration is wrong: fix it, retrying will not help."""


class TransientError(ConnectorError):
    """A passing failure (connection, timeout, 5xx, 429): retry with backoff."""


class TerminalError(ConnectorError):
    """The run cannot go on (permission denied, table missing): fail the run."""


class NotReadyError(TransientError):
    """What an action waits for has not happened yet: ask again after `retry_after`
    seconds (a workflow's wait_event node)."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SkippableError(ConnectorError):
    """One record is bad: dead-letter it and go on."""


class FencedError(ConnectorError):
    """A sink write lost its claim on the chunk (a newer attempt owns it).

    Not a failure: the stale attempt stops quietly and the newer one commits.
    """


class RegistryError(ConnectorError):
    """The plugin registry is inconsistent (unknown or duplicate kind)."""
