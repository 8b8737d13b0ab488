"""Errors of the integration app."""

from __future__ import annotations


class IntegrationError(Exception):
    """Root of the integration app's errors."""


class PipelinePausedError(IntegrationError):
    """The pipeline is paused: no run starts."""


class ResumeRefusedError(IntegrationError):
    """A run cannot be resumed (wrong state, or its source changed since the plan)."""


class IdempotencyConflictError(IntegrationError):
    """An Idempotency-Key was used before with a different request."""
