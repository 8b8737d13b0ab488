"""Errors raised by the record engine, grouped by what the caller should do next."""

from __future__ import annotations


class EngineError(Exception):
    """Root of every error the record engine raises."""


class EngineInterrupted(EngineError):
    """DuckDB stopped a query because the process received a signal whose Python
    handler raised: a Celery worker terminating its task (SIGTERM, e.g. after it
    lost the broker), a soft time limit. DuckDB turns the handler's exception into
    its own `RuntimeError('Query interrupted')`, so the signal's intent is lost;
    this error stands for it. Nothing of the batch was produced: running the same
    batch again gives the same result.
    """


class StepConfigError(EngineError):
    """The step configuration is invalid; fix the pipeline version.

    The message names the step and field, e.g.
    ``steps[0].fields[3] (distance_km): unknown type 'flot'``.
    """

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.detail = message
        super().__init__(f"{path}: {message}" if path else message)


class InputSchemaError(EngineError):
    """A batch does not fit the compiled pipeline (missing or reserved columns).

    Record-level problems never raise this: they become rejected rows.
    """
