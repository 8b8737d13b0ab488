"""The `kafka` source against a real broker (Tansu): plan, read, commit, decode."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from typing import Any

import orjson
import pyarrow as pa
import pytest
from fastavro import parse_schema, schemaless_writer

from connectors.base import SOURCE_REF_COLUMN, Chunk
from connectors.exceptions import ConfigError, TerminalError, TransientError
from connectors.plugins.kafka import KafkaPlugin, KafkaSource
from connectors.registry import get_plugin
from tests.connectors.contract import SourceContract


def make_source(config: dict[str, Any]) -> KafkaSource:
    source = KafkaPlugin.source(config)
    assert isinstance(source, KafkaSource)
    return source


def read_all(
    source: KafkaSource, options: dict[str, Any], chunk_rows: int = 1000
) -> tuple[list[Chunk], pa.Table]:
    chunks = list(source.plan(options, chunk_rows=chunk_rows))
    batches = [b for c in chunks for b in source.read(options, c)]
    table = pa.Table.from_batches(batches) if batches else pa.table({})
    return chunks, table


def json_messages(n: int, partitions: int = 3) -> list[tuple[int, Any, Any, Any]]:
    return [
        (
            i % partitions,
            f"k{i}".encode(),
            orjson.dumps({"i": i, "name": f"n{i}"}),
            None,
        )
        for i in range(n)
    ]


def refs(topic: str, per_partition: dict[int, range]) -> list[str]:
    return [f"{topic}/{p}/{o}" for p, offsets in per_partition.items() for o in offsets]


class TestKafkaSourceContract(SourceContract):
    """The `kafka` source passes the shared source contract (3-record chunks)."""

    @pytest.fixture
    def topic(
        self, make_topic: Callable[..., str], produce: Callable[..., None]
    ) -> str:
        topic = make_topic(3)
        produce(topic, json_messages(8))
        return topic

    @pytest.fixture
    def source(self, kafka_config: dict[str, Any]) -> KafkaSource:
        return make_source(kafka_config)

    @pytest.fixture
    def read_options(self, topic: str) -> dict[str, Any]:
        return {"topic": topic, "group_id": f"g-{topic}", "start": "earliest"}

    @pytest.fixture
    def expected_refs(self, topic: str) -> list[str]:
        return refs(topic, {0: range(3), 1: range(3), 2: range(2)})


def test_the_registry_knows_the_kind() -> None:
    assert get_plugin("kafka") is KafkaPlugin


def test_plan_splits_partitions_into_offset_ranges(
    kafka_config: dict[str, Any],
    make_topic: Callable[..., str],
    produce: Callable[..., None],
) -> None:
    topic = make_topic(3)
    produce(topic, json_messages(300))
    options = {"topic": topic, "group_id": "g1"}

    chunks = list(make_source(kafka_config).plan(options, chunk_rows=40))

    assert [(c.seq, c.spec["partition"]) for c in chunks] == [
        (0, 0), (1, 0), (2, 0), (3, 1), (4, 1), (5, 1), (6, 2), (7, 2), (8, 2)
    ]  # fmt: skip
    assert chunks[2].spec == {
        "topic": topic,
        "partition": 0,
        "start_offset": 80,
        "end_offset": 100,
        "max_records": 20,
    }


def test_every_message_is_read_exactly_once(
    kafka_config: dict[str, Any],
    make_topic: Callable[..., str],
    produce: Callable[..., None],
) -> None:
    topic = make_topic(3)
    produce(topic, json_messages(300))
    options = {"topic": topic, "group_id": "g1", "fields": {"i": "integer"}}

    _, table = read_all(make_source(kafka_config), options, chunk_rows=40)

    rows = table.sort_by("i").to_pylist()
    assert [r["i"] for r in rows] == list(range(300))
    assert rows[7]["key"] == "k7"
    assert json.loads(rows[7]["record"]) == {"i": 7, "name": "n7"}
    assert rows[7][SOURCE_REF_COLUMN] == f"{topic}/1/2"
    assert (rows[7]["_partition"], rows[7]["_offset"]) == (1, 2)
    assert table.column("_read_error").null_count == 300
    assert table.schema.field("record").metadata == {b"dis.type": b"json"}


def test_committed_offsets_make_the_next_plan_start_after_them(
    kafka_config: dict[str, Any],
    make_topic: Callable[..., str],
    produce: Callable[..., None],
) -> None:
    topic = make_topic(3)
    produce(topic, json_messages(9))
    source = make_source(kafka_config)
    options = {"topic": topic, "group_id": f"g-{topic}"}
    _, first = read_all(source, options)

    started = time.monotonic()
    source.commit_offsets(options, source.checkpoint(first))
    commit_seconds = time.monotonic() - started
    produce(topic, [(0, None, b'{"i": 9}', None), (2, None, b'{"i": 10}', None)])
    chunks, second = read_all(source, options)

    assert source.checkpoint(first) == {0: 3, 1: 3, 2: 3}
    assert source.committed_offsets(options) == {0: 3, 1: 3, 2: 3}
    assert commit_seconds < 2  # no group join (that takes seconds on Tansu)
    assert [c.spec["start_offset"] for c in chunks] == [3, 3]
    assert second.column(SOURCE_REF_COLUMN).to_pylist() == [
        f"{topic}/0/3",
        f"{topic}/2/3",
    ]


def test_nothing_new_plans_no_chunk(
    kafka_config: dict[str, Any],
    make_topic: Callable[..., str],
    produce: Callable[..., None],
) -> None:
    topic = make_topic(2)
    produce(topic, json_messages(4, partitions=2))
    source = make_source(kafka_config)
    options = {"topic": topic, "group_id": f"g-{topic}"}
    source.commit_offsets(options, {0: 2, 1: 2})

    assert list(source.plan(options, chunk_rows=10)) == []


def test_start_earliest_ignores_the_committed_offsets(
    kafka_config: dict[str, Any],
    make_topic: Callable[..., str],
    produce: Callable[..., None],
) -> None:
    topic = make_topic(1)
    produce(topic, json_messages(3, partitions=1))
    source = make_source(kafka_config)
    options = {"topic": topic, "group_id": f"g-{topic}"}
    source.commit_offsets(options, {0: 3})

    _, table = read_all(source, {**options, "start": "earliest"})

    assert table.num_rows == 3


def test_unreadable_values_become_error_rows(
    kafka_config: dict[str, Any],
    make_topic: Callable[..., str],
    produce: Callable[..., None],
) -> None:
    topic = make_topic(1)
    produce(
        topic,
        [
            (0, None, b'{"n": 1, "day": "2024-02-29"}', None),
            (0, None, b'{"n": 2, oops}', None),
            (0, None, b'{"n": "three"}', None),
            (0, None, b"[1, 2]", None),
            (0, None, b'{"n": 5, "day": "29.02.2024"}', None),
            (0, b"tomb", None, None),
            (0, None, b'{"n":\n 7}', None),
        ],
    )
    options = {
        "topic": topic,
        "group_id": "g",
        "fields": {"n": "integer", "day": "date"},
    }

    _, table = read_all(make_source(kafka_config), options)

    rows = table.to_pylist()
    assert [r["n"] for r in rows] == [1, None, None, None, None, None, 7]
    assert [r["day"] for r in rows] == [dt.date(2024, 2, 29)] + [None] * 6
    assert [r["_read_error"] for r in rows] == [
        None,
        "invalid JSON: unexpected character, expected a string key: line 1 "
        "column 10 (char 9)",
        "invalid JSON value: Column(/n) changed from number to string in row 0",
        "expected a JSON object, got list",
        "field 'day': '29.02.2024' is not a YYYY-MM-DD date",
        None,
        None,
    ]
    assert [r["_raw"] for r in rows] == [
        None,
        '{"n": 2, oops}',
        '{"n": "three"}',
        "[1, 2]",
        '{"n": 5, "day": "29.02.2024"}',
        None,
        None,
    ]
    assert [r["record"] for r in rows][5:] == [None, '{"n":\n 7}']
    assert rows[5]["key"] == "tomb"


def test_string_values_and_headers(
    kafka_config: dict[str, Any],
    make_topic: Callable[..., str],
    produce: Callable[..., None],
) -> None:
    topic = make_topic(1)
    produce(
        topic,
        [
            (0, b"a", "héllo".encode(), [("h1", b"v1"), ("h2", None)]),
            (0, b"b", b"\xff\xfe", None),
        ],
    )
    options = {"topic": topic, "group_id": "g", "format": "string"}

    _, table = read_all(make_source(kafka_config), options)

    rows = table.to_pylist()
    assert [r["value"] for r in rows] == ["héllo", None]
    assert rows[0]["headers"] == '{"h1":"v1","h2":null}'
    assert rows[1]["_read_error"] == (
        "value is not valid UTF-8: invalid start byte at byte 0"
    )
    assert rows[1]["_raw"] == "\ufffd\ufffd"


AVRO_SCHEMA = {
    "type": "record",
    "name": "Reading",
    "fields": [
        {"name": "sensor", "type": "string"},
        {"name": "value", "type": ["null", "double"], "default": None},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
    ],
}


def test_avro_values_are_decoded_with_typed_columns(
    kafka_config: dict[str, Any],
    make_topic: Callable[..., str],
    produce: Callable[..., None],
) -> None:
    import io

    topic = make_topic(1)
    parsed = parse_schema(AVRO_SCHEMA)
    at = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
    buffer = io.BytesIO()
    schemaless_writer(
        buffer, parsed, {"sensor": "s1", "value": 1.5, "at": at, "tags": ["x"]}
    )
    produce(topic, [(0, None, buffer.getvalue(), None), (0, None, b"\x07", None)])
    options = {
        "topic": topic,
        "group_id": "g",
        "format": "avro",
        "avro_schema": json.dumps(AVRO_SCHEMA),
    }

    _, table = read_all(make_source(kafka_config), options)

    rows = table.to_pylist()
    assert table.column_names[:4] == ["key", "record", "sensor", "value"]
    assert (rows[0]["sensor"], rows[0]["value"], rows[0]["at"]) == ("s1", 1.5, at)
    assert json.loads(rows[0]["record"]) == {
        "sensor": "s1",
        "value": 1.5,
        "at": "2024-05-01T12:00:00+00:00",
        "tags": ["x"],
    }
    assert rows[1]["_read_error"].startswith("invalid Avro value: ")
    assert rows[1]["_raw"] == "Bw=="


def test_checkpoint_takes_the_last_offset_of_each_partition() -> None:
    batch = pa.table({SOURCE_REF_COLUMN: ["t/0/4", "t/1/9", "t/0/7", "t/0/5"]})

    assert KafkaSource.checkpoint(batch) == {0: 8, 1: 10}


def test_a_missing_topic_is_terminal(kafka_config: dict[str, Any]) -> None:
    source = make_source(kafka_config)

    with pytest.raises(TerminalError, match="topic 'no-such-topic' does not exist"):
        list(source.plan({"topic": "no-such-topic", "group_id": "g"}, chunk_rows=10))


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"topic": "a/b", "group_id": "g"}, "topic"),
        ({"topic": "t"}, "group_id"),
        ({"topic": "t", "group_id": "g", "format": "avro"}, "avro_schema"),
        ({"topic": "t", "group_id": "g", "fields": {"key": "string"}}, "fields"),
        ({"topic": "t", "group_id": "g", "fields": {"n": "int"}}, "fields"),
    ],
    ids=["slash-in-topic", "no-group", "avro-without-schema", "reserved", "bad-type"],
)
def test_bad_read_options_are_config_errors(
    options: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        KafkaPlugin.validate_options("source", options)

    assert list(caught.value.errors) == [field]


def test_an_unreachable_broker_fails_the_check_quickly() -> None:
    config = KafkaPlugin.load_config({"bootstrap_servers": "127.0.0.1:1", "timeout": 3})

    started = time.monotonic()
    result = KafkaPlugin.check(config)

    assert result.ok is False
    assert result.message.startswith("cannot reach 127.0.0.1:1: ")
    assert time.monotonic() - started < 2


def test_an_unreachable_broker_is_a_transient_read_error() -> None:
    config = KafkaPlugin.load_config({"bootstrap_servers": "127.0.0.1:1", "timeout": 1})

    with pytest.raises(TransientError, match=r"cannot reach 127\.0\.0\.1:1"):
        list(make_source(config).plan({"topic": "t", "group_id": "g"}, chunk_rows=5))


def test_wrong_credentials_fail_clearly_without_the_secret(
    secured_bootstrap: str,
) -> None:
    config = KafkaPlugin.load_config(
        {
            "bootstrap_servers": secured_bootstrap,
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "SCRAM-SHA-256",
            "sasl_username": "alice",
            "timeout": 5,
        },
        {"sasl_password": "hunter2-secret"},
    )

    started = time.monotonic()
    result = KafkaPlugin.check(config)
    check_seconds = time.monotonic() - started
    with pytest.raises(ConfigError) as caught:
        list(make_source(config).plan({"topic": "t", "group_id": "g"}, chunk_rows=5))

    assert result.ok is False
    assert "SASL SCRAM authentication failed" in result.message
    assert "hunter2-secret" not in result.message
    assert check_seconds < 2
    assert "SASL SCRAM authentication failed" in str(caught.value)
    assert "hunter2-secret" not in str(caught.value)


def test_the_password_belongs_in_a_credential() -> None:
    with pytest.raises(ConfigError) as caught:
        KafkaPlugin.load_config({"bootstrap_servers": "b:9092", "sasl_password": "x"})

    assert list(caught.value.errors) == ["sasl_password"]
    assert KafkaPlugin.secret_fields() == ("sasl_password",)


def test_sasl_needs_a_mechanism_and_a_user() -> None:
    with pytest.raises(ConfigError) as caught:
        KafkaPlugin.load_config(
            {"bootstrap_servers": "b:9092", "security_protocol": "SASL_SSL"}
        )

    assert sorted(caught.value.errors) == [
        "sasl_mechanism",
        "sasl_password",
        "sasl_username",
    ]


def test_an_open_chunk_reads_to_the_end_of_the_partition(
    kafka_config: dict[str, Any],
    make_topic: Callable[..., str],
    produce: Callable[..., None],
) -> None:
    # What plan() yields for a partition whose high-water mark does not verify.
    topic = make_topic(1)
    produce(topic, json_messages(25, partitions=1))
    spec = {
        "topic": topic,
        "partition": 0,
        "start_offset": 20,
        "end_offset": None,
        "max_records": None,
    }
    options = {"topic": topic, "group_id": "g"}

    batches = list(make_source(kafka_config).read(options, Chunk(0, spec)))

    table = pa.Table.from_batches(batches)
    assert table.column("_offset").to_pylist() == [20, 21, 22, 23, 24]


def test_the_end_is_found_by_reading_not_by_list_offsets(
    kafka_config: dict[str, Any],
    make_topic: Callable[..., str],
    produce: Callable[..., None],
) -> None:
    # Tansu's ListOffsets answers 501 here; the plan's end must be the real one.
    topic = make_topic(1)
    messages = json_messages(600, partitions=1)
    for start in range(0, 600, 100):  # several produce batches
        produce(topic, messages[start : start + 100])
    source = make_source(kafka_config)

    chunks = list(source.plan({"topic": topic, "group_id": "g"}, chunk_rows=250))

    assert [(c.spec["start_offset"], c.spec["end_offset"]) for c in chunks] == [
        (0, 250),
        (250, 500),
        (500, 600),
    ]
