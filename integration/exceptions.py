"""Errors of the integration app."""

from __future__ import annotations


class IntegrationError(Exception):
    """Root of the integration app's errors."""


class PipelinePausedError(IntegrationError):
    """The pipeline is paused: no run starts."""


class PipelineInvalidError(IntegrationError):
    """The pipeline's definition cannot run (bad steps, wrong connector side)."""
