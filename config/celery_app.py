"""The Celery application; the correlation id travels in task headers."""

from __future__ import annotations

import os
from typing import Any

import structlog
from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")

app = Celery("dis")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@signals.setup_logging.connect
def _setup_logging(**kwargs: Any) -> None:
    # Use Django's LOGGING (JSON via structlog) in worker and beat.
    from django.conf import settings

    from config.logging import configure

    configure(settings.LOGGING)


@signals.before_task_publish.connect
def _add_correlation_header(
    headers: dict[str, Any] | None = None, **kwargs: Any
) -> None:
    from config import correlation

    if headers is not None and not headers.get(correlation.TASK_HEADER):
        cid = correlation.current()
        if cid:
            headers[correlation.TASK_HEADER] = cid


@signals.task_prerun.connect
def _bind_correlation(
    task: Any = None, task_id: str | None = None, **kwargs: Any
) -> None:
    from config import correlation

    structlog.contextvars.clear_contextvars()
    cid = getattr(task.request, correlation.TASK_HEADER, None) if task else None
    if cid is None and task is not None:
        cid = (task.request.headers or {}).get(correlation.TASK_HEADER)
    structlog.contextvars.bind_contextvars(
        correlation_id=cid or correlation.new_id(), task=task.name, task_id=task_id
    )


@signals.task_postrun.connect
def _unbind(**kwargs: Any) -> None:
    structlog.contextvars.clear_contextvars()
