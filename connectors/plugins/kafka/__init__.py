"""`kafka`: a Kafka topic as a bounded batch source and as an at-least-once sink.

The source reads each partition from the group's committed offset to the end found
when the run was planned, in offset-range chunks, without joining the group; the
run commits the offsets after the sink confirmed. The sink produces one message per
row with an idempotent producer. See `source` and `sink`; the DLQ helper
`publish_dead_letters` is for stream pipelines. Pure Python (no Django).
"""

from __future__ import annotations

from typing import Any

import orjson

from connectors.base import (
    SOURCE_REF_COLUMN,
    Capabilities,
    ConnectorContext,
    Plugin,
)
from connectors.exceptions import ConfigError, NotReadyError
from connectors.plugins.kafka.client import KafkaConfig
from connectors.plugins.kafka.sink import (
    KafkaSink,
    KafkaWriteOptions,
    publish_dead_letters,
)
from connectors.plugins.kafka.source import KafkaReadOptions, KafkaSource

__all__ = [
    "KafkaConfig",
    "KafkaPlugin",
    "KafkaReadOptions",
    "KafkaSink",
    "KafkaSource",
    "KafkaWriteOptions",
    "publish_dead_letters",
]


class KafkaPlugin(Plugin):
    """Kafka topics: batch source (offset-range chunks, incremental) and sink."""

    kind = "kafka"
    title = "Kafka"
    config_schema = KafkaConfig
    capabilities = Capabilities(
        source=True, sink=True, incremental=True, chunkable=True, discover=True
    )
    source_class = KafkaSource
    sink_class = KafkaSink
    read_options_schema = KafkaReadOptions
    write_options_schema = KafkaWriteOptions

    @classmethod
    def data_hosts(cls, config: dict[str, Any]) -> list[tuple[str, str, int]]:
        hosts = []
        for server in str(config["bootstrap_servers"]).split(","):
            host, _, port = server.strip().rpartition(":")
            hosts.append(("bootstrap_servers", host, int(port)))
        return hosts

    @classmethod
    def run_action(
        cls,
        config: dict[str, Any],
        action: str,
        params: dict[str, Any],
        context: ConnectorContext | None = None,
    ) -> dict[str, Any]:
        """`wait_event`: the first new JSON message on `topic` whose fields equal
        `match` (e.g. a File Processing Service event for a content type)."""
        if action != "wait_event":
            return super().run_action(config, action, params, context)
        cls.check_data_hosts(config, context)
        return wait_for_event(config, params, context)


def wait_for_event(
    config: dict[str, Any], params: dict[str, Any], context: ConnectorContext | None
) -> dict[str, Any]:
    """Scan the group's new messages for one matching `match`; commit past it.

    Messages read that do not match are committed too (they are not waited for).

    Raises:
        NotReadyError: nothing matched yet; ask again after `poll_seconds`.
    """
    match = params.get("match") or {}
    if not isinstance(match, dict):
        raise ConfigError("wait_event: match must be an object of field values")
    options = {
        "topic": params.get("topic"),
        "group_id": params.get("group_id")
        or f"dis-wait-{(context or ConnectorContext()).name}",
        "format": "json",
    }
    source = KafkaSource(config, context)
    try:
        for chunk in source.plan(options, chunk_rows=10_000):
            for batch in source.read(options, chunk):
                records = batch.column("record").to_pylist()
                refs = batch.column(SOURCE_REF_COLUMN).to_pylist()
                for i, (text, ref) in enumerate(zip(records, refs, strict=True)):
                    event = orjson.loads(text) if text else None
                    if isinstance(event, dict) and all(
                        event.get(k) == v for k, v in match.items()
                    ):
                        source.commit_offsets(
                            options, KafkaSource.checkpoint(batch.slice(0, i + 1))
                        )
                        return {"event": event, "source_ref": ref}
                source.commit_offsets(options, KafkaSource.checkpoint(batch))
    finally:
        source.close()
    raise NotReadyError(
        f"no event on {options['topic']} matches {match} yet",
        retry_after=float(params.get("poll_seconds", 10)),
    )
