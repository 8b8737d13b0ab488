"""The only place Celery chains are built and sent.

A chunk is one task, `process_chunk` (extract, transform and load with the batch in
memory), or, when its load must wait for the chunks before it (run-wide keys), one
chain of immutable signatures: extract -> transform -> load. Each step of a chain
passes a reference (the staged batch key is derived from run, chunk and attempt
token), never a payload, and never waits on another task's result.
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import chain, signature
from django.db import transaction

from config import correlation

logger = structlog.get_logger(__name__)


def publish(sig: Any, headers: dict[str, str] | None = None, **options: Any) -> None:
    """Send after commit; a broker that is down is logged, not raised: the rows say
    what should run, and the reconciler resends what never arrived."""
    try:
        sig.apply_async(headers=headers or {}, **options)
    except Exception as exc:  # noqa: BLE001 - any broker failure: the reconciler recovers
        logger.warning("publish_failed", task=sig.task, error_class=type(exc).__name__)


def _headers(correlation_id: str | None) -> dict[str, str]:
    cid = correlation_id or correlation.current()
    return {correlation.TASK_HEADER: cid} if cid else {}


def chunk_chain(run_id: int, seq: int, token: str) -> chain:
    args = (run_id, seq, token)
    return chain(
        signature("integration.extract_chunk", args=args, immutable=True),
        signature("integration.transform_chunk", args=args, immutable=True),
        signature("integration.load_chunk", args=args, immutable=True),
    )


def send_chunk(
    run_id: int, seq: int, token: str, correlation_id: str, *, fused: bool = False
) -> list[str]:
    """Send a chunk's task (`fused`) or chain once the current transaction commits.

    Returns:
        The ids of its tasks (fixed now), so a cancel can revoke them.
    """
    if fused:
        sig = signature(
            "integration.process_chunk", args=(run_id, seq, token), immutable=True
        )
        ids = [sig.freeze().id]
    else:
        sig = chunk_chain(run_id, seq, token)
        sig.freeze()
        ids = [task.id for task in sig.tasks]
    transaction.on_commit(lambda: publish(sig, _headers(correlation_id)))
    return ids


def send_load(
    run_id: int, seq: int, token: str, correlation_id: str, *, countdown: float
) -> None:
    """Send a chunk's load again in `countdown` seconds (after commit): a chunk of
    a pipeline that loads in order waits its turn this way, not in a busy loop."""
    sig = signature("integration.load_chunk", args=(run_id, seq, token), immutable=True)
    transaction.on_commit(
        lambda: publish(sig, _headers(correlation_id), countdown=countdown)
    )


def revoke(task_ids: list[str]) -> None:
    """Revoke queued tasks after commit (best effort: their tasks also find their
    chunk stopped and return without work)."""
    if not task_ids:
        return

    def send() -> None:
        from config.celery_app import app

        try:
            app.control.revoke(task_ids)
        except Exception as exc:  # noqa: BLE001 - the database guard stops them anyway
            logger.warning("revoke_failed", error_class=type(exc).__name__)

    transaction.on_commit(send)


def send_plan(run_id: int, correlation_id: str) -> None:
    sig = signature("integration.plan_run", args=(run_id,), immutable=True)
    transaction.on_commit(lambda: publish(sig, _headers(correlation_id)))


def send_finalize(run_id: int, correlation_id: str) -> None:
    sig = signature("integration.finalize_run", args=(run_id,), immutable=True)
    transaction.on_commit(lambda: publish(sig, _headers(correlation_id)))


def send_notification(run_id: int, correlation_id: str) -> None:
    sig = signature("integration.notify_run", args=(run_id,), immutable=True)
    transaction.on_commit(lambda: publish(sig, _headers(correlation_id)))
