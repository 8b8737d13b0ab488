"""`kafka`: a Kafka topic as a bounded batch source and as an at-least-once sink.

The source reads each partition from the group's committed offset to the end found
when the run was planned, in offset-range chunks, without joining the group; the
run commits the offsets after the sink confirmed. The sink produces one message per
row with an idempotent producer. See `source` and `sink`; the DLQ helper
`publish_dead_letters` is for stream pipelines. Pure Python (no Django).
"""

from __future__ import annotations

from connectors.base import Capabilities, Plugin
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
