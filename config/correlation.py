"""The correlation id: one id from the API call to the sink, on every log line."""

from __future__ import annotations

import re
import uuid

import structlog

HEADER = "X-Correlation-ID"
#: Celery message header that carries the id between processes (Celery uses
#: `correlation_id` itself, for the task id).
TASK_HEADER = "x_correlation_id"
_VALID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def new_id() -> str:
    return uuid.uuid4().hex


def clean(value: str | None) -> str | None:
    """The id if it is safe to echo and log, else None."""
    if value and _VALID.match(value):
        return value
    return None


def current() -> str | None:
    """The correlation id bound in this context, if any."""
    return structlog.contextvars.get_contextvars().get("correlation_id")


def bind(correlation_id: str, **extra: object) -> None:
    structlog.contextvars.bind_contextvars(correlation_id=correlation_id, **extra)
