"""Webhook notifications of run outcomes (failed, succeeded with errors).

The pipeline's `notify_url` is user-supplied: it goes through the SSRF guard, and
the request connects to the address that was checked (no second DNS lookup).
Redirects are not followed. The correlation id travels in `X-Correlation-ID`.
"""

from __future__ import annotations

import httpx
import orjson
import structlog
from django.conf import settings

from config import correlation
from connectors.exceptions import TransientError
from connectors.ssrf import pin_url
from integration.models import Run

logger = structlog.get_logger(__name__)

TIMEOUT_SECONDS = 10.0


def payload(run: Run) -> dict[str, object]:
    """What the webhook receives: the run's outcome, never a secret."""
    return {
        "event": f"run.{run.state}",
        "run": run.pk,
        "pipeline": run.pipeline.name,
        "version": run.version.number,
        "state": run.state,
        "kind": run.kind,
        "correlation_id": run.correlation_id,
        "records_read": run.records_read,
        "records_written": run.records_written,
        "records_rejected": run.records_rejected,
        "records_dead_lettered": run.records_dead_lettered,
        "error": run.error,
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
    }


def notify(run_id: int) -> int | None:
    """POST the run's outcome to its pipeline's webhook; returns the HTTP status.

    Raises:
        TransientError: on a connection error, a timeout or a 5xx (Celery retries).
    """
    run = Run.objects.select_related("pipeline", "version").filter(pk=run_id).first()
    if run is None or not run.pipeline.notify_url:
        return None
    target = pin_url(run.pipeline.notify_url, tuple(settings.DIS_ALLOWED_NETWORKS))
    try:
        # trust_env off: an environment proxy must not get around the guard.
        with httpx.Client(
            trust_env=False, timeout=TIMEOUT_SECONDS, follow_redirects=False
        ) as client:
            response = client.post(
                target.url,
                content=orjson.dumps(payload(run)),
                headers={
                    "Host": target.host_header,
                    "Content-Type": "application/json",
                    correlation.HEADER: run.correlation_id,
                    "User-Agent": "data-integration-service",
                },
                extensions=target.extensions,
            )
    except httpx.HTTPError as exc:
        raise TransientError(f"webhook unreachable: {type(exc).__name__}") from None
    if response.status_code >= 500:
        raise TransientError(f"webhook answered {response.status_code}")
    logger.info("run_notified", run_id=run_id, status=response.status_code)
    return response.status_code
