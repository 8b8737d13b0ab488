"""File triggers: File Processing Service events on Kafka start pipeline runs.

`consume_file_events()` reads each (kafka connector, topic) that has an active
binding, from the consumer group's committed offsets to the end it finds, without
joining the group (see the kafka source). Every event matching a binding starts one
run of the bound pipeline with the event in the run's `source_options` and the
Idempotency-Key `fps:<file_id>`: a redelivered event (at-least-once) returns the
run it started before instead of a second one. Offsets are committed after each
batch's runs are recorded; a crash in between only redelivers events, which the
key absorbs. A malformed event or one that matches no binding is logged, counted
and skipped; it never stops the consumer.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections import Counter, defaultdict
from typing import Any
from urllib.parse import urlsplit

import orjson
import structlog
from django.db.models import F
from django.utils import timezone

from config import correlation
from connectors.base import SOURCE_REF_COLUMN
from connectors.exceptions import ConfigError, ConnectorError
from integration import services
from integration.choices import RunTrigger
from integration.exceptions import IdempotencyConflictError, PipelinePausedError
from integration.models import FileTrigger

logger = structlog.get_logger(__name__)

#: The event fields a run's source options receive (others are ignored).
EVENT_FIELDS = ("file_id", "url", "content_type", "size", "sha256")
REQUIRED_FIELDS = ("file_id", "url", "size", "sha256")
IDEMPOTENCY_PREFIX = "fps:"
#: Events decoded per Kafka read batch; offsets are committed per batch.
BATCH_EVENTS = 500


class MalformedEventError(ValueError):
    """A message that is not a valid File Processing Service event."""


def group_id(connector_id: int) -> str:
    """The consumer group of the file triggers of one kafka connector."""
    return f"dis-file-triggers-{connector_id}"


def parse_event(text: str | None) -> dict[str, Any]:
    """The event's fields, validated like the file_processing read options.

    Raises:
        MalformedEventError: not a JSON object, a required field missing, a field
            of the wrong type or shape.
    """
    from connectors.plugins.file_processing import load_read_options

    if not text:
        raise MalformedEventError("empty message")
    try:
        payload = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise MalformedEventError("not JSON") from None
    if not isinstance(payload, dict):
        raise MalformedEventError("not a JSON object")
    event = {k: payload[k] for k in EVENT_FIELDS if k in payload}
    missing = [k for k in REQUIRED_FIELDS if event.get(k) in (None, "")]
    if missing:
        raise MalformedEventError(f"missing {', '.join(missing)}")
    if isinstance(event["size"], bool):
        raise MalformedEventError("size: not an integer")
    try:
        loaded = load_read_options(event)
    except ConfigError as exc:
        raise MalformedEventError(str(exc)) from None
    if len(IDEMPOTENCY_PREFIX + loaded["file_id"]) > 200:
        raise MalformedEventError("file_id: longer than 196 characters")
    return {
        "file_id": loaded["file_id"],
        "url": loaded["url"],
        "content_type": loaded.get("content_type"),
        "size": loaded["size"],
        "sha256": loaded["sha256"].lower(),
    }


def matches(trigger: FileTrigger, event: dict[str, Any]) -> bool:
    """Whether the event's file name and media type match the binding's globs."""
    from connectors.plugins.file_processing.source import file_name, media_type

    pattern = trigger.filename_pattern
    if pattern:
        target = (
            urlsplit(event["url"]).path if "/" in pattern else file_name(event["url"])
        )
        if not fnmatch.fnmatchcase(target, pattern):
            return False
    wanted = trigger.content_type.strip().lower()
    return not wanted or fnmatch.fnmatchcase(
        media_type(event.get("content_type")), wanted
    )


def start_for_event(trigger: FileTrigger, event: dict[str, Any]) -> tuple[str, Any]:
    """Start (or find) the run of the binding's pipeline for one event.

    Returns:
        ("started" | "duplicate" | "refused", the run or the reason).
    """
    request_hash = hashlib.sha256(
        orjson.dumps(event, option=orjson.OPT_SORT_KEYS)
    ).hexdigest()
    try:
        run = services.start_run(
            trigger.pipeline_id,
            trigger=RunTrigger.EVENT,
            correlation_id=correlation.new_id(),
            params={"source_options": event, "file_trigger": trigger.name},
            idempotency_key=IDEMPOTENCY_PREFIX + event["file_id"],
            request_hash=request_hash,
        )
    except (PipelinePausedError, IdempotencyConflictError) as exc:
        return "refused", str(exc)
    if run is None:  # not reached: only scheduled runs can be skipped
        return "refused", "skipped"
    return ("duplicate" if getattr(run, "replayed", False) else "started"), run


def consume_file_events() -> dict[str, int]:
    """Consume every topic with an active file trigger once (to its current end).

    Returns:
        Counts: `events`, `started`, `duplicate`, `refused`, `unmatched`,
        `malformed`, and `failed` topics (a broker error; retried next time).
    """
    bindings: dict[tuple[int, str], list[FileTrigger]] = defaultdict(list)
    for trigger in FileTrigger.objects.filter(is_paused=False).select_related(
        "connector", "connector__credential", "pipeline"
    ):
        bindings[(trigger.connector_id, trigger.topic)].append(trigger)
    totals: Counter[str] = Counter()
    for (_connector, topic), triggers in bindings.items():
        try:
            totals.update(consume_topic(triggers[0].connector, topic, triggers))
        except ConnectorError as exc:
            totals["failed"] += 1
            logger.warning(
                "file_trigger_topic_failed",
                connector=triggers[0].connector.name,
                topic=topic,
                error=str(exc),
            )
            FileTrigger.objects.filter(pk__in=[t.pk for t in triggers]).update(
                last_error=str(exc)[:2000]
            )
    if totals:
        logger.info("file_events_consumed", **totals)
    return dict(totals)


def consume_topic(
    connector: Any, topic: str, triggers: list[FileTrigger]
) -> Counter[str]:
    """Read `topic` from the group's offsets to its end, starting matched runs.

    Raises:
        ConnectorError: the broker failed (offsets of handled batches are kept).
    """
    from connectors.plugins.kafka import KafkaSource

    counts: Counter[str] = Counter()
    options = {"topic": topic, "group_id": group_id(connector.pk), "format": "string"}
    source = connector.open_source()
    try:
        for chunk in source.plan(options, chunk_rows=BATCH_EVENTS):
            for batch in source.read(options, chunk):
                values = batch.column("value").to_pylist()
                refs = batch.column(SOURCE_REF_COLUMN).to_pylist()
                for text, ref in zip(values, refs, strict=True):
                    handle_message(text, ref, triggers, counts)
                # The runs of this batch are committed rows now: move past it.
                source.commit_offsets(options, KafkaSource.checkpoint(batch))
    finally:
        source.close()
    return counts


def handle_message(
    text: str | None, ref: str, triggers: list[FileTrigger], counts: Counter[str]
) -> None:
    """One message: parse, match every binding, start their runs, count."""
    counts["events"] += 1
    ids = [t.pk for t in triggers]
    now = timezone.now()
    try:
        event = parse_event(text)
    except MalformedEventError as exc:
        counts["malformed"] += 1
        logger.warning("file_event_malformed", source_ref=ref, error=str(exc))
        FileTrigger.objects.filter(pk__in=ids).update(
            topic_malformed=F("topic_malformed") + 1,
            last_error=f"{ref}: malformed event: {exc}"[:2000],
        )
        return
    matched = [t for t in triggers if matches(t, event)]
    if not matched:
        counts["unmatched"] += 1
        logger.info(
            "file_event_unmatched",
            source_ref=ref,
            file_id=event["file_id"],
            content_type=event["content_type"],
        )
        FileTrigger.objects.filter(pk__in=ids).update(
            topic_unmatched=F("topic_unmatched") + 1
        )
        return
    for trigger in matched:
        outcome, detail = start_for_event(trigger, event)
        counts[outcome] += 1
        field = {"started": "runs_started", "duplicate": "duplicates"}.get(
            outcome, "refused"
        )
        update: dict[str, Any] = {field: F(field) + 1, "last_event_at": now}
        if outcome == "refused":
            update["last_error"] = f"{ref}: {detail}"[:2000]
        FileTrigger.objects.filter(pk=trigger.pk).update(**update)
        logger.info(
            "file_event_handled",
            trigger=trigger.name,
            outcome=outcome,
            source_ref=ref,
            file_id=event["file_id"],
            run_id=getattr(detail, "pk", None),
        )
