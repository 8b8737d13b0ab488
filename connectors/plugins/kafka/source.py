"""The Kafka source: bounded batch reads of a topic, one chunk per offset range.

Offsets are never taken from ListOffsets (Tansu answers it wrongly, e.g. 1 for a
partition of 498 records). `plan()` probes each partition instead: it assigns the
partition at its start offset and waits for the first message or
`enable.partition.eof`; the fetch response's high-water mark that came with it is
then verified by two more probes (the message just before it exists, and reading
from it gives EOF at once). A verified end splits the partition into chunks of
`chunk_rows` offsets; an end that does not verify gives one open chunk that reads to
EOF. Reads `assign()` partitions and never join the consumer group; offsets are
committed for the group directly by `commit_offsets()`. Pure Python (no Django).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import marshmallow
import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from marshmallow import fields, validate, validates_schema

from connectors.base import SOURCE_REF_COLUMN, CheckResult, Chunk, Source, StreamInfo
from connectors.exceptions import ConfigError, TerminalError, TransientError
from connectors.plugins.kafka.client import (
    ErrorLog,
    check_connection,
    classify,
    client_settings,
    redact,
    validate_topic,
)
from connectors.plugins.kafka.codec import (
    FIELD_TYPES,
    RESERVED_COLUMNS,
    Messages,
    ValueFormat,
    avro_field_types,
    decode,
    parse_avro_schema,
)

#: Messages decoded into one Arrow batch.
BATCH_ROWS = 10_000
#: Seconds a verification probe may wait; a high-water mark past the end gets no
#: answer at all from Tansu (no EOF, no out-of-range error), only this timeout.
VERIFY_TIMEOUT = 2.0


def _validate_avro_schema(value: Any) -> None:
    try:
        parse_avro_schema(value)
    except Exception as exc:  # noqa: BLE001 - fastavro/orjson raise many kinds
        raise marshmallow.ValidationError(f"Not a valid Avro schema: {exc}") from None


class KafkaReadOptions(marshmallow.Schema):
    """A pipeline's read options for the kafka connector."""

    topic = fields.String(required=True, validate=validate_topic)
    group_id = fields.String(required=True, validate=validate.Length(1, 255))
    format = fields.String(
        load_default="json", validate=validate.OneOf(["json", "avro", "string"])
    )
    avro_schema = fields.Raw(
        load_default=None, allow_none=True, validate=_validate_avro_schema
    )
    avro_framing = fields.String(
        load_default="none", validate=validate.OneOf(["none", "confluent"])
    )
    start = fields.String(
        load_default="committed", validate=validate.OneOf(["committed", "earliest"])
    )
    fields = fields.Dict(
        keys=fields.String(validate=validate.Length(1, 255)),
        values=fields.String(validate=validate.OneOf(list(FIELD_TYPES))),
        load_default=dict,
    )

    @validates_schema
    def _check(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data.get("format") == "avro" and not data.get("avro_schema"):
            raise marshmallow.ValidationError(
                {"avro_schema": ["Required when format is avro."]}
            )
        if data.get("format") == "string" and data.get("fields"):
            raise marshmallow.ValidationError(
                {"fields": ["Typed fields need format json or avro."]}
            )
        clashes = sorted(set(data.get("fields") or {}) & set(RESERVED_COLUMNS))
        if clashes:
            raise marshmallow.ValidationError(
                {"fields": [f"Reserved column name(s): {', '.join(clashes)}."]}
            )


def load_read_options(options: dict[str, Any]) -> dict[str, Any]:
    """Validated read options.

    Raises:
        ConfigError: with `.errors` mapping option name to messages.
    """
    try:
        loaded: dict[str, Any] = KafkaReadOptions().load(options)
    except marshmallow.ValidationError as exc:
        error = ConfigError(f"invalid read options: {exc.normalized_messages()}")
        error.errors = exc.normalized_messages()
        raise error from None
    return loaded


def value_format(options: dict[str, Any]) -> ValueFormat:
    """The `ValueFormat` of loaded read options (Avro `fields` default: the schema)."""
    if options["format"] != "avro":
        return ValueFormat(options["format"], tuple(options["fields"].items()))
    raw = options["avro_schema"]
    parsed = parse_avro_schema(raw)
    declared = tuple(options["fields"].items())
    if not declared:
        declared = avro_field_types(parsed)
    return ValueFormat(
        "avro",
        declared,
        avro_schema=parsed,
        confluent=options["avro_framing"] == "confluent",
    )


class KafkaSource(Source):
    """Reads a topic from the group's committed offsets to the end found at start."""

    # -- clients -------------------------------------------------------------------

    def _consumer(
        self, group_id: str, errors: ErrorLog, *, fetch_wait_ms: int = 100
    ) -> Consumer:
        settings = client_settings(
            self.config,
            error_cb=errors,
            **{
                "group.id": group_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": fetch_wait_ms,
                # Never used to join here (reads assign()), but keep a join fast if
                # librdkafka ever does: Tansu takes ~23 s with the defaults.
                "session.timeout.ms": 6000,
                "heartbeat.interval.ms": 500,
                "max.poll.interval.ms": 10000,
            },
        )
        return Consumer(settings)

    @property
    def _timeout(self) -> float:
        return float(self.config.get("timeout", 10.0))

    def _partitions(
        self, consumer: Consumer, topic: str, errors: ErrorLog
    ) -> list[int]:
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                metadata = consumer.list_topics(topic, timeout=0.5)
            except KafkaException as exc:
                consumer.poll(0)  # serves error_cb (nothing is assigned yet)
                errors.raise_if_failed(f"listing {topic}")
                if time.monotonic() > deadline:
                    reason = errors.reason() or str(exc)
                    raise TransientError(
                        redact(
                            f"cannot reach {self.config['bootstrap_servers']}: "
                            f"{reason}",
                            self.config,
                        )
                    ) from None
                continue
            info = metadata.topics.get(topic)
            if info is None or info.error is not None:
                code = info.error.code() if info and info.error else None
                if code in (
                    KafkaError.UNKNOWN_TOPIC_OR_PART,
                    KafkaError._UNKNOWN_TOPIC,
                    None,
                ):
                    raise TerminalError(f"topic {topic!r} does not exist")
                raise classify(info.error, self.config, f"listing {topic}")
            return sorted(info.partitions)

    # -- contract ------------------------------------------------------------------

    def check(self) -> CheckResult:
        return check_connection(self.config)

    def discover(self) -> list[StreamInfo]:
        """One stream per topic (internal `__` topics left out), JSON layout."""
        errors = ErrorLog(self.config)
        consumer = self._consumer("dis-discover", errors)
        try:
            try:
                metadata = consumer.list_topics(timeout=self._timeout)
            except KafkaException as exc:
                errors.raise_if_failed("listing topics")
                raise TransientError(
                    redact(f"cannot list topics: {errors.reason() or exc}", self.config)
                ) from None
        finally:
            consumer.close()
        schema = ValueFormat("json").output_schema()
        return [
            StreamInfo(name, schema)
            for name in sorted(metadata.topics)
            if not name.startswith("__")
        ]

    def plan(self, options: dict[str, Any], *, chunk_rows: int) -> Iterator[Chunk]:
        """Chunks of at most `chunk_rows` offsets, per partition, from start to end.

        A chunk spec: `topic`, `partition`, `start_offset`, `end_offset` (exclusive;
        None when the partition's end could not be verified: read to EOF) and
        `max_records` (None likewise). Partitions with nothing to read get no
        chunk, so a second plan after `commit_offsets()` yields only new records.

        Raises:
            ConfigError: bad options, authentication failure.
            TerminalError: the topic does not exist.
            TransientError: the brokers do not answer within `timeout`.
        """
        if chunk_rows < 1:
            raise ConfigError("chunk_rows must be at least 1")
        opts = load_read_options(options)
        topic = opts["topic"]
        errors = ErrorLog(self.config)
        consumer = self._consumer(opts["group_id"], errors, fetch_wait_ms=10)
        try:
            partitions = self._partitions(consumer, topic, errors)
            starts = self._start_offsets(consumer, opts, partitions, errors)
            first = self._probe(consumer, topic, starts, errors, self._timeout)
            ends = self._verified_ends(consumer, topic, first, errors)
        finally:
            consumer.close()
        seq = 0
        for partition in partitions:
            start = first.get(partition)
            if start is None:
                continue
            end = ends.get(partition)
            if end is None:
                spec = _spec(topic, partition, start, None)
                yield Chunk(seq, spec)
                seq += 1
                continue
            for offset in range(start, end, chunk_rows):
                stop = min(offset + chunk_rows, end)
                yield Chunk(seq, _spec(topic, partition, offset, stop))
                seq += 1

    def read(self, options: dict[str, Any], chunk: Chunk) -> Iterator[pa.RecordBatch]:
        """The chunk's messages, decoded, in batches of up to 10,000.

        Reads from `start_offset` until `end_offset`, `max_records` messages or
        EOF, whichever comes first. Every batch has `key`, `record` (or `value` for
        the string format), the declared `fields`, `headers`, `_partition`,
        `_offset`, `_timestamp`, `_source_ref` (`<topic>/<partition>/<offset>`),
        `_read_error` and `_raw`.

        Raises:
            ConfigError: bad options, authentication failure.
            TerminalError: the chunk was planned for another topic.
            TransientError: no progress for `timeout` seconds.
        """
        opts = load_read_options(options)
        fmt = value_format(opts)
        spec = chunk.spec
        topic, partition = opts["topic"], int(spec["partition"])
        if spec.get("topic") != topic:
            raise TerminalError(
                f"chunk {chunk.seq} was planned for topic {spec.get('topic')!r}, "
                f"not {topic!r}"
            )
        start = int(spec["start_offset"])
        end = None if spec.get("end_offset") is None else int(spec["end_offset"])
        limit = None if spec.get("max_records") is None else int(spec["max_records"])
        errors = ErrorLog(self.config)
        consumer = self._consumer(opts["group_id"], errors)
        try:
            consumer.assign([TopicPartition(topic, partition, start)])
            messages = _empty(topic, partition)
            count = 0
            done = False
            last_progress = time.monotonic()
            while not done:
                want = BATCH_ROWS - len(messages)
                if limit is not None:
                    want = min(want, limit - count)
                polled = consumer.consume(num_messages=max(want, 1), timeout=0.5)
                if not polled:
                    errors.raise_if_failed(f"reading {topic}/{partition}")
                    if time.monotonic() - last_progress > self._timeout:
                        raise TransientError(
                            redact(
                                f"reading {topic}/{partition} from offset {start}: "
                                f"no progress in {self._timeout:g} s"
                                + (f" ({errors.reason()})" if errors.errors else ""),
                                self.config,
                            )
                        )
                    continue
                last_progress = time.monotonic()
                for msg in polled:
                    if msg.partition() != partition:
                        continue
                    error = msg.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            if msg.offset() >= start:
                                done = True
                                break
                            continue
                        raise classify(
                            error, self.config, f"reading {topic}/{partition}"
                        )
                    offset = msg.offset()
                    if offset < start:
                        continue
                    if end is not None and offset >= end:
                        done = True
                        break
                    _append(messages, msg)
                    count += 1
                    if (limit is not None and count >= limit) or (
                        end is not None and offset >= end - 1
                    ):
                        done = True
                        break
                if len(messages) >= BATCH_ROWS:
                    yield decode(messages, fmt)
                    messages = _empty(topic, partition)
            if len(messages):
                yield decode(messages, fmt)
        finally:
            consumer.close()

    # -- incremental -----------------------------------------------------------------

    @staticmethod
    def checkpoint(batch: pa.Table | pa.RecordBatch) -> dict[int, int]:
        """The next offset to read per partition after `batch`: {partition: last + 1}.

        Computed from `_source_ref`, so any table that kept it works; pass what
        `read()` returned (before filters and dead-lettering drop rows), or the last
        offsets of filtered-out rows are read again next time.
        """
        if batch.num_rows == 0:
            return {}
        refs = batch.column(SOURCE_REF_COLUMN)
        parts = pc.split_pattern(refs, "/")
        partition = pc.cast(pc.list_element(parts, 1), pa.int32())
        offset = pc.cast(pc.list_element(parts, 2), pa.int64())
        grouped = (
            pa.table({"p": partition, "o": offset})
            .group_by("p")
            .aggregate([("o", "max")])
        )
        return {
            int(p): int(o) + 1
            for p, o in zip(
                grouped.column("p").to_pylist(),
                grouped.column("o_max").to_pylist(),
                strict=True,
            )
        }

    def committed_offsets(self, options: dict[str, Any]) -> dict[int, int]:
        """The group's committed offset per partition (partitions without one left out).

        Raises:
            ConfigError, TerminalError, TransientError: as for `plan()`.
        """
        opts = load_read_options(options)
        errors = ErrorLog(self.config)
        consumer = self._consumer(opts["group_id"], errors)
        try:
            partitions = self._partitions(consumer, opts["topic"], errors)
            return {
                p: o
                for p, o in self._committed(consumer, opts, partitions, errors).items()
                if o >= 0
            }
        finally:
            consumer.close()

    def commit_offsets(self, options: dict[str, Any], offsets: dict[int, int]) -> None:
        """Commit `{partition: next offset}` for the group, without joining it.

        Call only after the sink confirmed the records before those offsets.

        Raises:
            ConfigError: bad options, authentication failure.
            TransientError: the commit failed or timed out (safe to retry).
        """
        opts = load_read_options(options)
        if not offsets:
            return
        errors = ErrorLog(self.config)
        consumer = self._consumer(opts["group_id"], errors)
        topic = opts["topic"]
        try:
            partitions = [
                TopicPartition(topic, int(p), int(o))
                for p, o in sorted(offsets.items())
            ]
            try:
                result = consumer.commit(offsets=partitions, asynchronous=False)
            except KafkaException as exc:
                errors.raise_if_failed(f"committing offsets of {topic}")
                raise classify(
                    exc.args[0], self.config, f"committing offsets of {topic}"
                ) from None
            failed = [tp for tp in result or [] if tp.error is not None]
            if failed:
                raise classify(
                    failed[0].error,
                    self.config,
                    f"committing offset {failed[0].offset} of "
                    f"{topic}/{failed[0].partition}",
                )
        finally:
            consumer.close()

    # -- planning helpers ------------------------------------------------------------

    def _committed(
        self,
        consumer: Consumer,
        opts: dict[str, Any],
        partitions: list[int],
        errors: ErrorLog,
    ) -> dict[int, int]:
        topic = opts["topic"]
        try:
            result = consumer.committed(
                [TopicPartition(topic, p) for p in partitions], timeout=self._timeout
            )
        except KafkaException as exc:
            errors.raise_if_failed(f"reading committed offsets of {topic}")
            raise classify(
                exc.args[0], self.config, f"reading committed offsets of {topic}"
            ) from None
        return {tp.partition: tp.offset for tp in result}

    def _start_offsets(
        self,
        consumer: Consumer,
        opts: dict[str, Any],
        partitions: list[int],
        errors: ErrorLog,
    ) -> dict[int, int]:
        starts = dict.fromkeys(partitions, OFFSET_BEGINNING)
        if opts["start"] == "committed":
            for partition, offset in self._committed(
                consumer, opts, partitions, errors
            ).items():
                if offset >= 0:
                    starts[partition] = offset
        return starts

    def _probe(
        self,
        consumer: Consumer,
        topic: str,
        offsets: dict[int, int],
        errors: ErrorLog,
        timeout: float,
        *,
        required: bool = True,
    ) -> dict[int, int | None]:
        """Per partition: the offset of the first message at or after the offset
        asked for, or None at EOF. Partitions that do not answer within `timeout`
        raise (`required`) or are left out."""
        if not offsets:
            return {}
        consumer.assign([TopicPartition(topic, p, o) for p, o in offsets.items()])
        found: dict[int, int | None] = {}
        deadline = time.monotonic() + timeout
        while len(found) < len(offsets):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if not required:
                    break
                waiting = sorted(set(offsets) - set(found))
                raise TransientError(
                    redact(
                        f"no answer from {topic} partition(s) {waiting} in "
                        f"{timeout:g} s"
                        + (f": {errors.reason()}" if errors.errors else ""),
                        self.config,
                    )
                )
            msg = consumer.poll(min(remaining, 0.5))
            if msg is None:
                errors.raise_if_failed(f"reading {topic}")
                continue
            partition = msg.partition()
            if partition not in offsets or partition in found:
                continue
            asked = offsets[partition]
            error = msg.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    raise classify(error, self.config, f"reading {topic}/{partition}")
                if asked < 0 or msg.offset() >= asked:
                    found[partition] = None
                continue
            if asked < 0 or msg.offset() >= asked:
                found[partition] = msg.offset()
        consumer.unassign()
        return found

    def _verified_ends(
        self,
        consumer: Consumer,
        topic: str,
        first: dict[int, int | None],
        errors: ErrorLog,
    ) -> dict[int, int]:
        """{partition: end offset} for partitions whose high-water mark verifies."""
        hints: dict[int, int] = {}
        for partition, offset in first.items():
            if offset is None:
                continue
            try:
                _, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), cached=True
                )
            except KafkaException:
                continue
            if high > offset:
                hints[partition] = high
        before = self._probe(
            consumer,
            topic,
            {p: h - 1 for p, h in hints.items()},
            errors,
            VERIFY_TIMEOUT,
            required=False,
        )
        candidates = {p: h for p, h in hints.items() if before.get(p) == h - 1}
        after = self._probe(
            consumer, topic, candidates, errors, VERIFY_TIMEOUT, required=False
        )
        return {p: h for p, h in candidates.items() if p in after and after[p] is None}


def _spec(topic: str, partition: int, start: int, end: int | None) -> dict[str, Any]:
    return {
        "topic": topic,
        "partition": partition,
        "start_offset": start,
        "end_offset": end,
        "max_records": None if end is None else end - start,
    }


def _empty(topic: str, partition: int) -> Messages:
    return Messages(topic, partition, [], [], [], [], [])


def _append(messages: Messages, msg: Message) -> None:
    messages.offsets.append(msg.offset())
    messages.keys.append(msg.key())
    messages.values.append(msg.value())
    messages.headers.append(msg.headers())
    kind, stamp = msg.timestamp()
    messages.timestamps.append(stamp if kind != 0 and stamp >= 0 else None)
