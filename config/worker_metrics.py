"""Prometheus metrics of a Celery worker: each task's outcome and duration.

On when `DIS_WORKER_METRICS_PORT` is set (the Helm chart sets it on its worker
pods). The pool processes run the tasks; prometheus_client's multiprocess mode
has each of them write its samples to files under `PROMETHEUS_MULTIPROC_DIR`
(a fresh directory under the system's temporary directory unless that is set;
a given one loses its `*.db` sample files at start), and the worker's main
process serves their sum on the port. Set up in the main process before it
forks its pool (`signals.worker_init`), so the pool processes inherit the mode.

The run-level state (runs, records, dead letters, queues) is the API's
`/metrics` (integration/metrics.py): this adds what only a worker sees.

- `dis_worker_tasks_total{task, outcome}`: `succeeded`, `failed`, `retried`;
- `dis_worker_task_duration_seconds{task}`: a histogram of how long tasks ran.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog

logger = structlog.get_logger("dis.metrics")

#: Celery's task states (`task_postrun`'s `state`) as the `outcome` label.
OUTCOMES = {"SUCCESS": "succeeded", "FAILURE": "failed", "RETRY": "retried"}
#: Seconds: a control task takes milliseconds, a chunk step up to minutes.
BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

_metrics: dict[str, Any] = {}
_started: dict[str, float] = {}
#: The samples' directory when this process made it (removed at shutdown).
_made: list[str] = []


def port() -> int | None:
    value = os.environ.get("DIS_WORKER_METRICS_PORT", "").strip()
    return int(value) if value else None


def start(metrics_port: int) -> str:
    """Multiprocess mode and the HTTP server, in the worker's main process.
    Returns the samples' directory."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        # A restarted worker must not add its predecessor's samples to its own:
        # its sample files go (prometheus_client's `*.db`), nothing else there.
        os.makedirs(directory, exist_ok=True)
        for stale in Path(directory).glob("*.db"):
            stale.unlink(missing_ok=True)
    else:
        directory = tempfile.mkdtemp(prefix="dis-worker-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        _made.append(directory)

    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    start_http_server(metrics_port, registry=registry)
    _define()
    logger.info("worker_metrics_serving", port=metrics_port)
    return directory


def stop() -> None:
    """At the worker's shutdown: remove the samples' directory it made."""
    while _made:
        shutil.rmtree(_made.pop(), ignore_errors=True)


def _define() -> None:
    from prometheus_client import Counter, Histogram

    _metrics["tasks"] = Counter(
        "dis_worker_tasks",
        "Tasks this worker's pool ran, by task and outcome.",
        ["task", "outcome"],
    )
    _metrics["duration"] = Histogram(
        "dis_worker_task_duration_seconds",
        "How long tasks ran, by task.",
        ["task"],
        buckets=BUCKETS,
    )


def task_started(task_id: str | None) -> None:
    if _metrics and task_id:
        _started[task_id] = time.monotonic()


def task_ended(task_name: str, task_id: str | None, state: str | None) -> None:
    if not _metrics:
        return
    outcome = OUTCOMES.get(state or "", "other")
    _metrics["tasks"].labels(task_name, outcome).inc()
    started = _started.pop(task_id, None) if task_id else None
    if started is not None:
        elapsed = time.monotonic() - started
        _metrics["duration"].labels(task_name).observe(elapsed)
