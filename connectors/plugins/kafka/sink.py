"""The Kafka sink and the dead-letter publisher: one message per row, at least once.

Rows are serialised only here, at the edge (JSON via orjson, or schemaless Avro),
and produced by an idempotent producer (`enable.idempotence`, `acks=all`); every
delivery report is checked. Kafka cannot take back messages, so a retried chunk is
produced again: consumers de-duplicate by the `dis-run-id`, `dis-chunk-seq` and
`dis-source-ref` headers. Pure Python (no Django).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Sequence
from typing import Any

import marshmallow
import orjson
import pyarrow as pa
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from marshmallow import fields, validate, validates_schema

from connectors.base import (
    SOURCE_REF_COLUMN,
    SYSTEM_COLUMNS,
    CheckResult,
    Fence,
    Sink,
    WriteResult,
)
from connectors.exceptions import (
    ConfigError,
    FencedError,
    TerminalError,
    TransientError,
)
from connectors.plugins.kafka.client import (
    ErrorLog,
    check_connection,
    classify,
    client_settings,
    first_server,
    redact,
    validate_topic,
)
from connectors.plugins.kafka.codec import (
    CONFLUENT_MAGIC,
    RAW_COLUMN,
    READ_ERROR_COLUMN,
    encode_avro,
    encode_json,
    parse_avro_schema,
)
from connectors.plugins.sql.common import is_json

RUN_ID_HEADER = "dis-run-id"
CHUNK_SEQ_HEADER = "dis-chunk-seq"
SOURCE_REF_HEADER = "dis-source-ref"
CORRELATION_HEADER = "x-correlation-id"
ERROR_HEADER = "dis-error"
STEP_HEADER = "dis-step"
#: Header values are cut to this many bytes (a long error message is not a payload).
MAX_HEADER_BYTES = 4096


def _validate_avro_schema(value: Any) -> None:
    try:
        parse_avro_schema(value)
    except Exception as exc:  # noqa: BLE001 - fastavro/orjson raise many kinds
        raise marshmallow.ValidationError(f"Not a valid Avro schema: {exc}") from None


class KafkaWriteOptions(marshmallow.Schema):
    """A pipeline's write options for the kafka connector."""

    topic = fields.String(required=True, validate=validate_topic)
    format = fields.String(
        load_default="json", validate=validate.OneOf(["json", "avro"])
    )
    avro_schema = fields.Raw(
        load_default=None, allow_none=True, validate=_validate_avro_schema
    )
    avro_framing = fields.String(
        load_default="none", validate=validate.OneOf(["none", "confluent"])
    )
    avro_schema_id = fields.Integer(
        load_default=None, allow_none=True, validate=validate.Range(0, 2**31 - 1)
    )
    key_field = fields.String(load_default=None, allow_none=True)
    create_topic = fields.Boolean(load_default=False)
    partitions = fields.Integer(load_default=1, validate=validate.Range(1, 100_000))
    replication_factor = fields.Integer(
        load_default=-1, validate=validate.Range(-1, 100)
    )

    @validates_schema
    def _check(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data.get("format") == "avro" and not data.get("avro_schema"):
            raise marshmallow.ValidationError(
                {"avro_schema": ["Required when format is avro."]}
            )
        if (
            data.get("avro_framing") == "confluent"
            and data.get("avro_schema_id") is None
        ):
            raise marshmallow.ValidationError(
                {"avro_schema_id": ["Required with the confluent framing."]}
            )


def load_write_options(options: dict[str, Any]) -> dict[str, Any]:
    """Validated write options.

    Raises:
        ConfigError: with `.errors` mapping option name to messages.
    """
    try:
        loaded: dict[str, Any] = KafkaWriteOptions().load(options)
    except marshmallow.ValidationError as exc:
        error = ConfigError(f"invalid write options: {exc.normalized_messages()}")
        error.errors = exc.normalized_messages()
        raise error from None
    return loaded


class _Deliveries:
    """Counts delivery reports of one produce round; keeps the first failure."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.delivered = 0
        self.failed = 0
        self.first_error: KafkaError | None = None

    def __call__(self, error: KafkaError | None, msg: Message) -> None:
        with self._lock:
            if error is None:
                self.delivered += 1
            else:
                self.failed += 1
                if self.first_error is None:
                    self.first_error = error


def _header(value: str) -> bytes:
    return value.encode("utf-8")[:MAX_HEADER_BYTES]


def produce_all(
    producer: Producer,
    topic: str,
    messages: Sequence[tuple[bytes | None, bytes, list[tuple[str, bytes]]]],
    *,
    config: dict[str, Any],
    errors: ErrorLog,
) -> int:
    """Produce `(key, value, headers)` messages, flush, and check every report.

    Returns:
        The number of messages delivered (all of them).

    Raises:
        ConfigError: authentication failure.
        TerminalError: a non-retriable delivery error (message too large, topic
            authorization...).
        TransientError: any other delivery failure or a flush timeout.
    """
    deliveries = _Deliveries()
    for key, value, headers in messages:
        while True:
            try:
                producer.produce(
                    topic, value=value, key=key, headers=headers, on_delivery=deliveries
                )
                break
            except BufferError:  # the local queue is full: let it drain
                producer.poll(0.1)
                errors.raise_if_failed(f"producing to {topic}")
            except KafkaException as exc:
                raise classify(exc.args[0], config, f"producing to {topic}") from None
        producer.poll(0)
    timeout = float(config.get("delivery_timeout", 120.0)) + 5
    remaining = producer.flush(timeout)
    errors.raise_if_failed(f"producing to {topic}")
    if deliveries.first_error is not None:
        raise classify(
            deliveries.first_error,
            config,
            f"{deliveries.failed} of {len(messages)} message(s) to {topic} not "
            "delivered",
        )
    if remaining:
        raise TransientError(
            redact(
                f"{remaining} message(s) to {topic} still undelivered after "
                f"{timeout:g} s" + (f": {errors.reason()}" if errors.errors else ""),
                config,
            )
        )
    return deliveries.delivered


def producer_settings(config: dict[str, Any], errors: ErrorLog) -> dict[str, Any]:
    """librdkafka settings of an idempotent, acks=all producer."""
    return client_settings(
        config,
        error_cb=errors,
        **{
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "message.timeout.ms": int(
                float(config.get("delivery_timeout", 120)) * 1000
            ),
        },
    )


class KafkaSink(Sink):
    """Produces one message per row to a topic; at-least-once per (run, chunk)."""

    _producer: Producer | None = None
    _errors: ErrorLog | None = None

    def _get_producer(self) -> tuple[Producer, ErrorLog]:
        if self._producer is None or self._errors is None:
            self._errors = ErrorLog(self.config)
            self._producer = Producer(producer_settings(self.config, self._errors))
        elif self._errors.failure() is not None:  # a fatal idempotence error
            self._drop_producer()
            return self._get_producer()
        return self._producer, self._errors

    def _drop_producer(self) -> None:
        if self._producer is not None:
            self._producer.flush(0)
        self._producer = None
        self._errors = None

    def check(self) -> CheckResult:
        return check_connection(self.config)

    def prepare(
        self, options: dict[str, Any], schema: pa.Schema, *, run_id: int | None = None
    ) -> None:
        """Create the topic when `create_topic` is set, else check it exists.

        For Avro, every column the schema requires (no default, not nullable) must
        be in `schema`.

        Raises:
            ConfigError: bad options, or columns the Avro schema requires are missing.
            TerminalError: the topic is missing and `create_topic` is false.
            TransientError: the brokers do not answer.
        """
        opts = load_write_options(options)
        if opts["format"] == "avro":
            _check_avro_columns(opts["avro_schema"], schema)
        topic = opts["topic"]
        errors = ErrorLog(self.config)
        admin = AdminClient(client_settings(self.config, error_cb=errors))
        timeout = float(self.config.get("timeout", 10.0))
        if opts["create_topic"]:
            new = NewTopic(
                topic,
                num_partitions=opts["partitions"],
                replication_factor=opts["replication_factor"],
            )
            future = admin.create_topics([new], request_timeout=timeout)[topic]
            try:
                future.result(timeout=timeout + 1)
            except KafkaException as exc:
                error = exc.args[0]
                if error.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    errors.raise_if_failed(f"creating topic {topic}")
                    raise classify(
                        error, self.config, f"creating topic {topic}"
                    ) from None
            return
        try:
            metadata = admin.list_topics(timeout=timeout)
        except KafkaException as exc:
            errors.raise_if_failed(f"listing topics for {topic}")
            raise classify(
                exc.args[0], self.config, f"listing topics for {topic}"
            ) from None
        if topic not in metadata.topics:
            raise TerminalError(
                f"topic {topic!r} does not exist (set create_topic to create it)"
            )

    def write(
        self,
        options: dict[str, Any],
        batch: pa.Table,
        *,
        run_id: int,
        chunk_seq: int,
        fence: Fence,
    ) -> WriteResult:
        """Produce one message per row; at-least-once, never replaces.

        Every row is serialised before anything is produced, so a row that cannot
        be serialised fails the chunk with nothing sent. `fence()` is called right
        before producing: False raises `FencedError` with nothing sent. A retry of
        the same chunk produces its rows again (consumers de-duplicate by headers).

        Raises:
            ConfigError: bad options, unknown `key_field`, authentication failure.
            TerminalError: a row that cannot be serialised, a non-retriable
                delivery error.
            TransientError: a delivery failure or timeout (retry the chunk).
            FencedError: the attempt lost its claim on the chunk.
        """
        opts = load_write_options(options)
        topic = opts["topic"]
        messages = self._serialise(opts, batch, run_id=run_id, chunk_seq=chunk_seq)
        if not fence():
            raise FencedError(
                f"chunk {chunk_seq} of run {run_id} belongs to a newer attempt"
            )
        if not messages:
            return WriteResult(0, {"topic": topic, "replaced": 0})
        producer, errors = self._get_producer()
        try:
            delivered = produce_all(
                producer, topic, messages, config=self.config, errors=errors
            )
        except (ConfigError, TerminalError, TransientError):
            self._drop_producer()
            raise
        return WriteResult(delivered, {"topic": topic, "replaced": 0})

    def _serialise(
        self,
        opts: dict[str, Any],
        batch: pa.Table,
        *,
        run_id: int,
        chunk_seq: int,
    ) -> list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]:
        drop = {*SYSTEM_COLUMNS, READ_ERROR_COLUMN, RAW_COLUMN}
        data = [f.name for f in batch.schema if f.name not in drop]
        key_field = opts["key_field"]
        if key_field is not None and key_field not in batch.column_names:
            raise ConfigError(f"key_field {key_field!r} is not a column of the batch")
        refs: list[Any] = (
            batch.column(SOURCE_REF_COLUMN).to_pylist()
            if SOURCE_REF_COLUMN in batch.column_names
            else [None] * batch.num_rows
        )
        keys = batch.column(key_field).to_pylist() if key_field else None
        json_columns = [f.name for f in batch.schema if f.name in data and is_json(f)]
        rows = batch.select(data).to_pylist()
        base = [
            (RUN_ID_HEADER, str(run_id).encode()),
            (CHUNK_SEQ_HEADER, str(chunk_seq).encode()),
        ]
        if self.context.correlation_id:
            base.append((CORRELATION_HEADER, _header(self.context.correlation_id)))
        avro = opts["format"] == "avro"
        schema = parse_avro_schema(opts["avro_schema"]) if avro else None
        prefix = b""
        if avro and opts["avro_framing"] == "confluent":
            prefix = CONFLUENT_MAGIC + struct.pack(">I", opts["avro_schema_id"])
        messages = []
        for i, row in enumerate(rows):
            for name in json_columns:
                text = row[name]
                if text is not None:
                    row[name] = orjson.loads(text) if avro else orjson.Fragment(text)
            try:
                value = encode_avro(row, schema, prefix) if avro else encode_json(row)
            except (ValueError, TypeError, orjson.JSONEncodeError) as exc:
                raise TerminalError(
                    f"row {refs[i] or i} cannot be written as {opts['format']}: {exc}"
                ) from None
            headers = list(base)
            if refs[i] is not None:
                headers.append((SOURCE_REF_HEADER, _header(str(refs[i]))))
            messages.append((_key(keys[i]) if keys else None, value, headers))
        return messages

    def dataset_name(self, options: dict[str, Any]) -> str:
        """`kafka://<first bootstrap server>/<topic>`."""
        return f"kafka://{first_server(self.config)}/{options.get('topic', '')}"

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(float(self.config.get("timeout", 10.0)))
        self._producer = None
        self._errors = None


def _key(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8")


def _check_avro_columns(avro_schema: Any, schema: pa.Schema) -> None:
    parsed = parse_avro_schema(avro_schema)
    if not isinstance(parsed, dict) or parsed.get("type") != "record":
        return
    missing = []
    for field in parsed.get("fields", []):
        kind = field.get("type")
        nullable = kind == "null" or (isinstance(kind, list) and "null" in kind)
        if (
            field["name"] not in schema.names
            and "default" not in field
            and not nullable
        ):
            missing.append(field["name"])
    if missing:
        raise ConfigError(
            f"the Avro schema requires column(s) the batch lacks: {', '.join(missing)}"
        )


def publish_dead_letters(
    config: dict[str, Any],
    topic: str,
    rows: Sequence[dict[str, Any]],
    errors: Sequence[str],
    source_refs: Sequence[str | None],
    *,
    step: str | Sequence[str] = "",
    correlation_id: str | None = None,
) -> int:
    """Publish rejected rows to a dead-letter topic, with the reason in headers.

    Each row becomes one JSON message with headers `dis-error`, `dis-step`,
    `dis-source-ref` (and `x-correlation-id` when given). Waits for every delivery.

    Args:
        config: a loaded kafka connector config.
        topic: the dead-letter topic (must exist or be auto-created by the broker).
        rows: the rejected records (their original source values).
        errors: why each was rejected, one per row.
        source_refs: where each came from, one per row.
        step: the step that rejected them: one for all, or one per row.
        correlation_id: of the run or stream batch.

    Returns:
        The number of messages delivered.

    Raises:
        ValueError: the sequences differ in length.
        ConfigError, TerminalError, TransientError: as for `KafkaSink.write`.
    """
    steps = [step] * len(rows) if isinstance(step, str) else list(step)
    if not len(rows) == len(errors) == len(source_refs) == len(steps):
        raise ValueError("rows, errors, source_refs and steps must have one per row")
    if not rows:
        return 0
    messages = []
    for row, error, ref, row_step in zip(rows, errors, source_refs, steps, strict=True):
        headers = [
            (ERROR_HEADER, _header(str(error))),
            (STEP_HEADER, _header(str(row_step))),
        ]
        if ref is not None:
            headers.append((SOURCE_REF_HEADER, _header(str(ref))))
        if correlation_id:
            headers.append((CORRELATION_HEADER, _header(correlation_id)))
        try:
            value = encode_json(dict(row))
        except (TypeError, orjson.JSONEncodeError) as exc:
            raise TerminalError(
                f"dead letter {ref} cannot be written as JSON: {exc}"
            ) from None
        messages.append((None, value, headers))
    log = ErrorLog(config)
    producer = Producer(producer_settings(config, log))
    return produce_all(producer, topic, messages, config=config, errors=log)
