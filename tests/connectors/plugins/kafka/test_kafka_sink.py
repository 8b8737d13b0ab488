"""The `kafka` sink and the dead-letter publisher against a real broker (Tansu)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pytest
from confluent_kafka.admin import AdminClient

from connectors.base import SOURCE_REF_COLUMN, ConnectorContext
from connectors.exceptions import ConfigError, FencedError, TerminalError
from connectors.plugins.kafka import KafkaPlugin, KafkaSink, publish_dead_letters
from connectors.plugins.kafka.codec import json_field
from tests.connectors.plugins.kafka.test_kafka_source import (
    AVRO_SCHEMA,
    make_source,
    read_all,
)


def make_sink(config: dict[str, Any], correlation_id: str | None = None) -> KafkaSink:
    sink = KafkaPlugin.sink(config, ConnectorContext(correlation_id=correlation_id))
    assert isinstance(sink, KafkaSink)
    return sink


def _yes() -> bool:
    return True


def _no() -> bool:
    return False


SAMPLE = pa.table(
    {
        "id": pa.array([1, 2, None], pa.int64()),
        "name": ["Ann", "Bob", "Cy"],
        "at": pa.array(
            [dt.datetime(2024, 1, 1, 10, tzinfo=dt.UTC), None, None],
            pa.timestamp("us", tz="UTC"),
        ),
        "extra": pa.array(['{"a": 1}', None, "3"], pa.string()),
        SOURCE_REF_COLUMN: ["p.csv#1", "p.csv#2", "p.csv#3"],
    },
    schema=pa.schema(
        [
            pa.field("id", pa.int64()),
            pa.field("name", pa.string()),
            pa.field("at", pa.timestamp("us", tz="UTC")),
            json_field("extra"),
            pa.field(SOURCE_REF_COLUMN, pa.string()),
        ]
    ),
)


def test_write_produces_one_message_per_row_with_key_and_headers(
    kafka_config: dict[str, Any], make_topic: Callable[..., str]
) -> None:
    topic = make_topic(1)
    sink = make_sink(kafka_config, correlation_id="corr-1")
    options = {"topic": topic, "key_field": "name"}
    sink.prepare(options, SAMPLE.schema)

    result = sink.write(options, SAMPLE, run_id=7, chunk_seq=2, fence=_yes)
    sink.close()
    _, table = read_all(make_source(kafka_config), {"topic": topic, "group_id": "g"})

    assert result.rows_written == 3
    assert table.column("key").to_pylist() == ["Ann", "Bob", "Cy"]
    assert [json.loads(r) for r in table.column("record").to_pylist()] == [
        {"id": 1, "name": "Ann", "at": "2024-01-01T10:00:00+00:00", "extra": {"a": 1}},
        {"id": 2, "name": "Bob", "at": None, "extra": None},
        {"id": None, "name": "Cy", "at": None, "extra": 3},
    ]  # fmt: skip
    assert json.loads(table.column("headers")[0].as_py()) == {
        "dis-run-id": "7",
        "dis-chunk-seq": "2",
        "x-correlation-id": "corr-1",
        "dis-source-ref": "p.csv#1",
    }


def test_a_fenced_write_produces_nothing(
    kafka_config: dict[str, Any], make_topic: Callable[..., str]
) -> None:
    topic = make_topic(1)
    sink = make_sink(kafka_config)

    with pytest.raises(FencedError):
        sink.write({"topic": topic}, SAMPLE, run_id=1, chunk_seq=0, fence=_no)
    sink.close()

    source = make_source(kafka_config)
    assert list(source.plan({"topic": topic, "group_id": "g"}, chunk_rows=10)) == []


def test_a_retried_chunk_is_produced_again(
    kafka_config: dict[str, Any], make_topic: Callable[..., str]
) -> None:
    topic = make_topic(1)
    sink = make_sink(kafka_config)
    sink.write({"topic": topic}, SAMPLE, run_id=3, chunk_seq=0, fence=_yes)

    sink.write({"topic": topic}, SAMPLE, run_id=3, chunk_seq=0, fence=_yes)
    sink.close()

    _, table = read_all(make_source(kafka_config), {"topic": topic, "group_id": "g"})
    refs = [
        json.loads(h)["dis-source-ref"] for h in table.column("headers").to_pylist()
    ]
    assert refs == ["p.csv#1", "p.csv#2", "p.csv#3"] * 2  # at least once


def test_avro_round_trip(
    kafka_config: dict[str, Any], make_topic: Callable[..., str]
) -> None:
    topic = make_topic(1)
    at = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
    batch = pa.table(
        {
            "sensor": ["s1", "s2"],
            "value": [1.5, None],
            "at": pa.array([at, at], pa.timestamp("ms", tz="UTC")),
            "tags": pa.array([["x"], []], pa.list_(pa.string())),
            SOURCE_REF_COLUMN: ["r#1", "r#2"],
        }
    )
    schema = json.dumps(AVRO_SCHEMA)
    sink = make_sink(kafka_config)
    options = {"topic": topic, "format": "avro", "avro_schema": schema}
    sink.prepare(options, batch.schema)
    sink.write(options, batch, run_id=1, chunk_seq=0, fence=_yes)
    sink.close()

    _, table = read_all(
        make_source(kafka_config),
        {"topic": topic, "group_id": "g", "format": "avro", "avro_schema": schema},
    )

    assert table.select(["sensor", "value", "at"]).to_pylist() == [
        {"sensor": "s1", "value": 1.5, "at": at},
        {"sensor": "s2", "value": None, "at": at},
    ]
    assert [json.loads(r)["tags"] for r in table.column("record").to_pylist()] == [
        ["x"],
        [],
    ]


def test_confluent_framed_avro_round_trip(
    kafka_config: dict[str, Any], make_topic: Callable[..., str]
) -> None:
    topic = make_topic(1)
    schema = {"type": "record", "name": "R", "fields": [{"name": "n", "type": "long"}]}
    sink = make_sink(kafka_config)
    options = {
        "topic": topic,
        "format": "avro",
        "avro_schema": schema,
        "avro_framing": "confluent",
        "avro_schema_id": 42,
    }
    sink.write(options, pa.table({"n": [5]}), run_id=1, chunk_seq=0, fence=_yes)
    sink.close()

    read = {"topic": topic, "group_id": "g", "format": "string"}
    _, raw = read_all(make_source(kafka_config), read)
    _, table = read_all(
        make_source(kafka_config),
        {**read, "format": "avro", "avro_schema": schema, "avro_framing": "confluent"},
    )

    assert raw.column("value").to_pylist() == ["\x00\x00\x00\x00*\n"]
    assert table.column("n").to_pylist() == [5]


def test_a_row_that_does_not_fit_the_avro_schema_sends_nothing(
    kafka_config: dict[str, Any], make_topic: Callable[..., str]
) -> None:
    topic = make_topic(1)
    schema = {"type": "record", "name": "R", "fields": [{"name": "n", "type": "long"}]}
    batch = pa.table({"n": ["five"], SOURCE_REF_COLUMN: ["f#1"]})
    sink = make_sink(kafka_config)
    options = {"topic": topic, "format": "avro", "avro_schema": schema}

    with pytest.raises(TerminalError, match=r"^row f#1 cannot be written as avro: "):
        sink.write(options, batch, run_id=1, chunk_seq=0, fence=_yes)
    with pytest.raises(ConfigError, match="requires column\\(s\\) the batch lacks: n"):
        sink.prepare(options, pa.schema([("m", pa.int64())]))
    sink.close()

    source = make_source(kafka_config)
    assert list(source.plan({"topic": topic, "group_id": "g"}, chunk_rows=10)) == []


def test_prepare_creates_the_topic_only_when_asked(
    kafka_config: dict[str, Any], kafka_bootstrap: str
) -> None:
    sink = make_sink(kafka_config)
    name = f"created-{id(sink)}"

    with pytest.raises(TerminalError, match=f"topic '{name}' does not exist"):
        sink.prepare({"topic": name}, SAMPLE.schema)
    sink.prepare({"topic": name, "create_topic": True, "partitions": 4}, SAMPLE.schema)
    sink.prepare({"topic": name, "create_topic": True}, SAMPLE.schema)  # exists: fine
    sink.prepare({"topic": name}, SAMPLE.schema)

    metadata = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(
        timeout=5
    )
    assert len(metadata.topics[name].partitions) == 4


def test_an_unknown_key_field_is_a_config_error(
    kafka_config: dict[str, Any], make_topic: Callable[..., str]
) -> None:
    sink = make_sink(kafka_config)

    with pytest.raises(ConfigError, match="key_field 'nope' is not a column"):
        sink.write(
            {"topic": make_topic(1), "key_field": "nope"},
            SAMPLE,
            run_id=1,
            chunk_seq=0,
            fence=_yes,
        )


def test_dataset_name(kafka_config: dict[str, Any], kafka_bootstrap: str) -> None:
    sink = make_sink(kafka_config)

    assert sink.dataset_name({"topic": "orders"}) == f"kafka://{kafka_bootstrap}/orders"


def test_the_sink_check_is_ok(kafka_config: dict[str, Any]) -> None:
    result = make_sink(kafka_config).check()

    assert result.ok is True
    assert result.message.startswith(
        f"connected to {kafka_config['bootstrap_servers']}"
    )


def test_dead_letters_carry_the_error_in_headers(
    kafka_config: dict[str, Any], make_topic: Callable[..., str]
) -> None:
    topic = make_topic(1)

    delivered = publish_dead_letters(
        kafka_config,
        topic,
        [{"id": "x", "n": 1}, {"id": "y"}],
        ["n: not an integer", "n: required"],
        ["orders/0/5", "orders/0/6"],
        step="map",
        correlation_id="corr-9",
    )

    _, table = read_all(make_source(kafka_config), {"topic": topic, "group_id": "g"})
    assert delivered == 2
    assert table.column("record").to_pylist() == ['{"id":"x","n":1}', '{"id":"y"}']
    assert [json.loads(h) for h in table.column("headers").to_pylist()] == [
        {
            "dis-error": "n: not an integer",
            "dis-step": "map",
            "dis-source-ref": "orders/0/5",
            "x-correlation-id": "corr-9",
        },
        {
            "dis-error": "n: required",
            "dis-step": "map",
            "dis-source-ref": "orders/0/6",
            "x-correlation-id": "corr-9",
        },
    ]
