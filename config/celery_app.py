"""The Celery application; the correlation id travels in task headers."""

from __future__ import annotations

import os
from typing import Any

import structlog
from celery import Celery, signals

from config import worker_metrics

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
    worker_metrics.task_started(task_id)


@signals.task_postrun.connect
def _unbind(
    task: Any = None,
    task_id: str | None = None,
    state: str | None = None,
    **kwargs: Any,
) -> None:
    if task is not None:
        worker_metrics.task_ended(task.name, task_id, state)
    structlog.contextvars.clear_contextvars()


@signals.worker_init.connect
def _serve_metrics(**kwargs: Any) -> None:
    """The worker's Prometheus metrics, when DIS_WORKER_METRICS_PORT is set."""
    metrics_port = worker_metrics.port()
    if metrics_port:
        worker_metrics.start(metrics_port)


@signals.worker_shutdown.connect
def _stop_metrics(**kwargs: Any) -> None:
    worker_metrics.stop()


@signals.worker_init.connect
def _preload(**kwargs: Any) -> None:
    """Import the connector plugins and the reference cache in the worker's main
    process, before it forks its pool: each pool process then starts with them
    loaded instead of paying the imports (DuckDB, Arrow, drivers) on its first
    task (about 4 % of a 1M-row batch's worker time in bench/profile.py; the first
    chunk of each pool process took 1.3 s against 0.5 s for the others, a third of
    that in pandas' import)."""
    import contextlib
    import importlib

    from connectors.registry import BUILTIN_KINDS, get_plugin

    for kind in BUILTIN_KINDS:
        with contextlib.suppress(Exception):  # a broken plugin fails its own task
            get_plugin(kind)
    # pandas: pyarrow imports it on the first pa.array() of a numpy array (~0.2 s);
    # sqlglot's DuckDB dialect: loaded on the first expression a step parses.
    for module in (
        "integration.references",
        "integration.staging",
        "pandas",
        "sqlglot.dialects.duckdb",
    ):
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
