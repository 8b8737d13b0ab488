"""The connector contract: plugins, sources and sinks.

Pure Python (no Django): plugins take plain config dicts and Arrow batches and return
plain values. The Django app `connectors` wraps them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import marshmallow
import pyarrow as pa

from connectors.exceptions import ConfigError

#: Columns every sink that can add columns writes next to the data.
RUN_ID_COLUMN = "_run_id"
CHUNK_SEQ_COLUMN = "_chunk_seq"
SOURCE_REF_COLUMN = "_source_ref"
SYSTEM_COLUMNS = (RUN_ID_COLUMN, CHUNK_SEQ_COLUMN, SOURCE_REF_COLUMN)


@dataclass(frozen=True)
class Capabilities:
    """What a connector kind can do, declared as data (never probed)."""

    source: bool = False
    sink: bool = False
    incremental: bool = False
    upsert: bool = False
    discover: bool = False
    chunkable: bool = False
    exactly_once: bool = False
    #: `Sink.backfill`: add columns and set their values on rows already written.
    backfill: bool = False


@dataclass(frozen=True)
class CheckResult:
    """Outcome of `check()`: a message an operator can act on, never a secret."""

    ok: bool
    message: str
    latency_ms: float = 0.0


@dataclass(frozen=True)
class Chunk:
    """One unit of parallel work planned by a source.

    Attributes:
        seq: position of the chunk in the run, from 0.
        spec: JSON-serialisable description `read()` needs (byte range, key range...).
    """

    seq: int
    spec: dict[str, Any]


@dataclass(frozen=True)
class StreamInfo:
    """A stream (table, file, topic) a source offers and its Arrow schema."""

    name: str
    schema: pa.Schema


@dataclass
class WriteResult:
    """What a sink write committed."""

    rows_written: int
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ConnectorContext:
    """What the service lends a connector at run time (plain values, no Django).

    Attributes:
        name: the connector's name: the key of its shared breaker and rate limit.
        redis_url: Redis for state shared by every worker (token bucket, breaker).
        allowed_networks: CIDRs a user-supplied URL may reach although private or
            link-local (the SSRF guard's allow-list).
        correlation_id: sent on outgoing requests and messages.
        data_allowed_networks: CIDRs a database or Kafka host may resolve to
            although private; None (a plugin used outside the service) checks
            nothing.
    """

    name: str = ""
    redis_url: str | None = None
    allowed_networks: tuple[str, ...] = ()
    correlation_id: str | None = None
    data_allowed_networks: tuple[str, ...] | None = None


#: Called by a sink inside its write transaction, after taking the chunk lock and
#: before committing; returns False when the attempt has been superseded.
Fence = Callable[[], bool]


def secret_field_names(schema: type[marshmallow.Schema]) -> tuple[str, ...]:
    """Names of the fields a config schema marks `metadata={"secret": True}`."""
    return tuple(
        name
        for name, fld in schema._declared_fields.items()
        if (fld.metadata or {}).get("secret")
    )


class Source:
    """Reads records as Arrow batches.

    Every batch `read()` yields carries a `_source_ref` string column (file#row,
    topic/partition/offset, primary key...) so every output row can be traced back.
    """

    def __init__(
        self, config: dict[str, Any], context: ConnectorContext | None = None
    ) -> None:
        self.config = config
        self.context = context or ConnectorContext()

    def check(self) -> CheckResult:
        raise NotImplementedError

    def discover(self) -> list[StreamInfo]:
        raise NotImplementedError

    def plan(self, options: dict[str, Any], *, chunk_rows: int) -> Iterator[Chunk]:
        """Split the read into chunks; streams, so a huge input needs bounded memory."""
        raise NotImplementedError

    def read(self, options: dict[str, Any], chunk: Chunk) -> Iterator[pa.RecordBatch]:
        """Yield the chunk's records; reads nothing outside the chunk."""
        raise NotImplementedError

    def fingerprint(self, options: dict[str, Any]) -> str | None:
        """A token that changes when the input changes (resume safety), if known."""
        return None

    def close(self) -> None:
        """Release pooled resources."""


class Sink:
    """Writes Arrow batches, idempotently per (run, chunk)."""

    def __init__(
        self, config: dict[str, Any], context: ConnectorContext | None = None
    ) -> None:
        self.config = config
        self.context = context or ConnectorContext()

    def check(self) -> CheckResult:
        raise NotImplementedError

    def prepare(
        self, options: dict[str, Any], schema: pa.Schema, *, run_id: int | None = None
    ) -> None:
        """Create (or check) the target for `schema` (data columns, no system ones).

        `run_id` names the run, for sinks that stage a run's rows (replace mode).
        """
        raise NotImplementedError

    def write(
        self,
        options: dict[str, Any],
        batch: pa.Table,
        *,
        run_id: int,
        chunk_seq: int,
        fence: Fence,
    ) -> WriteResult:
        """Write `batch` for (run_id, chunk_seq), replacing an earlier attempt's rows.

        `batch` has the data columns plus `_source_ref`. The implementation serialises
        attempts of the same chunk, calls `fence()` before committing and raises
        `FencedError` (rolling back) when it returns False.
        """
        raise NotImplementedError

    def finalize(self, options: dict[str, Any], *, run_id: int) -> None:
        """Called once when the run finished successfully."""

    def backfill(self, options: dict[str, Any], values: pa.Table) -> WriteResult:
        """Add `values`' data columns to the target and set them on written rows.

        `values` has `_run_id`, `_source_ref` and the data columns; a target row
        matching both gets the values (schema drift: held values of an approved
        proposal). Rows that match nothing are left out; idempotent.

        Raises:
            ConfigError: the sink cannot (capability `backfill` is False).
        """
        raise ConfigError(f"a {type(self).__name__} cannot back-fill columns")

    def dataset_name(self, options: dict[str, Any]) -> str:
        """The lineage dataset name of the target, e.g. `postgres://host/db.s.t`."""
        return ""

    def close(self) -> None:
        """Release pooled resources."""


class Plugin:
    """A connector kind: its config schema, capabilities, source and sink classes.

    Subclasses set the class attributes; the registry maps `kind` to the class.
    """

    kind: ClassVar[str]
    title: ClassVar[str] = ""
    config_schema: ClassVar[type[marshmallow.Schema]]
    capabilities: ClassVar[Capabilities] = Capabilities()
    source_class: ClassVar[type[Source] | None] = None
    sink_class: ClassVar[type[Sink] | None] = None
    #: Schemas of a pipeline's `source_options` / `sink_options` for this kind.
    #: Config fields holding user-supplied URLs: the service checks them with the
    #: SSRF guard when the connector is saved (a 400 before any connection).
    url_fields: ClassVar[tuple[str, ...]] = ()
    read_options_schema: ClassVar[type[marshmallow.Schema] | None] = None
    write_options_schema: ClassVar[type[marshmallow.Schema] | None] = None

    @classmethod
    def data_hosts(cls, config: dict[str, Any]) -> list[tuple[str, str, int]]:
        """The (config field, host, port) of the database or broker hosts the
        connector connects to (kinds that have some: postgres, mysql, kafka)."""
        return []

    @classmethod
    def check_data_hosts(
        cls, config: dict[str, Any], context: ConnectorContext | None
    ) -> None:
        """Refuse hosts outside the context's data allow-list (see `check_host`).

        Raises:
            ConfigError: naming the field, with `.errors` mapping it to the reason.
            TransientError: the resolver failed temporarily.
        """
        if context is None or context.data_allowed_networks is None:
            return
        from connectors.ssrf import check_host

        for name, host, port in cls.data_hosts(config):
            try:
                check_host(host, port, context.data_allowed_networks)
            except ConfigError as exc:
                error = type(exc)(f"{name}: {exc}")
                error.errors = {name: [str(exc)]}
                raise error from None

    @classmethod
    def secret_fields(cls) -> tuple[str, ...]:
        return secret_field_names(cls.config_schema)

    @classmethod
    def load_config(
        cls, config: dict[str, Any], secrets: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Validate `config` (plus the credential's `secrets`) and return it loaded.

        Secret fields must come from the credential, never from `config`.

        Raises:
            ConfigError: with `.errors` mapping field name to messages.
        """
        secret_names = set(cls.secret_fields())
        leaked = sorted(secret_names & set(config))
        if leaked:
            error = ConfigError(
                f"secret field(s) {', '.join(leaked)} belong in a credential"
            )
            error.errors = {
                name: ["Put this secret in a credential."] for name in leaked
            }
            raise error
        merged = dict(config)
        for name, value in (secrets or {}).items():
            if name in secret_names:
                merged[name] = value
        try:
            return cls.config_schema().load(merged)
        except marshmallow.ValidationError as exc:
            messages = exc.normalized_messages()
            error = ConfigError(
                "invalid configuration: " + ", ".join(sorted(map(str, messages)))
            )
            error.errors = messages
            raise error from None

    @classmethod
    def validate_options(cls, side: str, options: dict[str, Any]) -> None:
        """Check a pipeline's read (`side="source"`) or write (`"sink"`) options.

        Raises:
            ConfigError: with `.errors` mapping option name to messages.
        """
        schema = (
            cls.read_options_schema if side == "source" else cls.write_options_schema
        )
        if schema is None:
            return
        try:
            schema().load(options)
        except marshmallow.ValidationError as exc:
            messages = exc.normalized_messages()
            error = ConfigError(f"invalid {side} options: {messages}")
            error.errors = messages
            raise error from None

    @classmethod
    def run_action(
        cls,
        config: dict[str, Any],
        action: str,
        params: dict[str, Any],
        context: ConnectorContext | None = None,
    ) -> dict[str, Any]:
        """Perform a one-off workflow action (`http` call, `sql` statement).

        Returns a small JSON-serialisable result. Kinds without actions refuse.

        Raises:
            ConfigError: the kind has no such action.
        """
        raise ConfigError(f"connector kind {cls.kind!r} has no {action!r} action")

    @classmethod
    def source(
        cls, config: dict[str, Any], context: ConnectorContext | None = None
    ) -> Source:
        if cls.source_class is None:
            raise ConfigError(f"connector kind {cls.kind!r} cannot be a source")
        cls.check_data_hosts(config, context)
        return cls.source_class(config, context)

    @classmethod
    def sink(
        cls, config: dict[str, Any], context: ConnectorContext | None = None
    ) -> Sink:
        if cls.sink_class is None:
            raise ConfigError(f"connector kind {cls.kind!r} cannot be a sink")
        cls.check_data_hosts(config, context)
        return cls.sink_class(config, context)

    @classmethod
    def check(
        cls, config: dict[str, Any], context: ConnectorContext | None = None
    ) -> CheckResult:
        """Check the connection with whichever side the kind has."""
        started = time.perf_counter()
        side = (
            cls.source(config, context)
            if cls.source_class
            else cls.sink(config, context)
        )
        try:
            result = side.check()
        finally:
            side.close()
        if not result.latency_ms:
            elapsed = (time.perf_counter() - started) * 1000
            result = CheckResult(result.ok, result.message, round(elapsed, 2))
        return result
