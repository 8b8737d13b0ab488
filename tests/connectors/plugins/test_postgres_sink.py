"""The `postgres` sink against the real PostgreSQL server."""

from __future__ import annotations

import datetime as dt
import decimal
import math
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pytest
from psycopg import sql

from connectors.base import SOURCE_REF_COLUMN
from connectors.exceptions import ConfigError, TerminalError, TransientError
from connectors.plugins.files import FilesPlugin
from connectors.plugins.sql import PostgresPlugin, postgres
from connectors.plugins.sql.common import lock_key
from connectors.plugins.sql.postgres import (
    BinaryPlan,
    PostgresSink,
    binary_plan,
    redact,
)
from connectors.registry import get_plugin
from tests.connectors.contract import (
    EvolveSinkContract,
    ReplaceSinkContract,
    SinkContract,
    UpsertSinkContract,
    keyed,
)
from tests.connectors.plugins.pgtools import PG_SETTINGS, pg_connect
from tests.helpers import free_port

UTC = dt.UTC
NAIVE = dt.datetime(1969, 12, 31, 23, 59, 59, 5)  # noqa: DTZ001 - a naive column
OLD_NAIVE = dt.datetime(1899, 12, 31, 23, 59, 59, 999999)  # noqa: DTZ001 - naive too


@pytest.fixture
def copy_formats(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The FORMAT (`binary` or `csv`) of every COPY the sink runs, in order."""
    formats: list[str] = []
    original = psycopg.Cursor.copy

    def copy(self: psycopg.Cursor[Any], statement: Any, *args: Any, **kw: Any) -> Any:
        text = sql.Composed([statement]).as_string(self.connection)
        formats.append(text.rsplit("FORMAT ", 1)[1].rstrip(")"))
        return original(self, statement, *args, **kw)

    monkeypatch.setattr(psycopg.Cursor, "copy", copy)
    return formats


def make_sink(config: dict[str, Any]) -> PostgresSink:
    sink = PostgresPlugin.sink(config)
    assert isinstance(sink, PostgresSink)
    return sink


def fetch(schema: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with pg_connect() as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        return conn.execute(query, params).fetchall()  # type: ignore[arg-type]


class TestPostgresSinkContract(SinkContract):
    """The `postgres` sink passes the shared sink contract."""

    @pytest.fixture
    def sink(self, pg_config: dict[str, Any]) -> PostgresSink:
        return make_sink(pg_config)

    @pytest.fixture
    def write_options(self, pg_schema: str) -> dict[str, Any]:
        return {"table": "people", "schema": pg_schema, "write_mode": "append"}

    @pytest.fixture
    def sample(self) -> pa.Table:
        return pa.table(
            {
                "name": ["Ann", "Bob", "Cy"],
                "age": pa.array([31, None, 7], pa.int64()),
                SOURCE_REF_COLUMN: ["p.csv#1", "p.csv#2", "p.csv#3"],
            }
        )

    @pytest.fixture
    def refs_of(self, pg_schema: str) -> Callable[[int, int], list[str]]:
        def refs_of(run_id: int, chunk_seq: int) -> list[str]:
            rows = fetch(
                pg_schema,
                "SELECT _source_ref FROM people WHERE _run_id = %s "
                "AND _chunk_seq = %s ORDER BY 1",
                run_id,
                chunk_seq,
            )
            return [ref for (ref,) in rows]

        return refs_of

    @pytest.fixture
    def wait_until_blocked(self, pg_schema: str) -> Callable[[], None]:
        # The contract writes run 11, chunk 0 of table "people": the two-int lock is
        # (classid, objid, objsubid) = (key1 as oid, chunk_seq, 2) in pg_locks.
        key1 = lock_key(PG_SETTINGS["database"], pg_schema, "people", 11)

        def wait() -> None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with pg_connect() as conn:
                    waiting = conn.execute(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                        "AND NOT granted AND classid = %s::bigint::oid "
                        "AND objid = 0 AND objsubid = 2",
                        (key1 & 0xFFFFFFFF,),
                    ).fetchone()
                if waiting and waiting[0]:
                    return
                time.sleep(0.02)
            pytest.fail("the second writer never waited for the chunk lock")

        return wait


class TestPostgresSinkModes(
    UpsertSinkContract, ReplaceSinkContract, EvolveSinkContract
):
    """The `postgres` sink passes the upsert, replace and drift contracts."""

    @pytest.fixture
    def sink(self, pg_config: dict[str, Any]) -> PostgresSink:
        return make_sink(pg_config)

    @pytest.fixture
    def base_options(self, pg_schema: str) -> dict[str, Any]:
        return {"table": "people", "schema": pg_schema}

    @pytest.fixture
    def select(self, pg_schema: str) -> Callable[[str, list[str]], list[Any]]:
        def select(table: str, columns: list[str]) -> list[Any]:
            query = sql.SQL("SELECT {} FROM {} ORDER BY {}").format(
                sql.SQL(", ").join(map(sql.Identifier, columns)),
                sql.Identifier(pg_schema, table),
                sql.SQL(", ").join(map(sql.Identifier, columns)),
            )
            with pg_connect() as conn:
                return conn.execute(query).fetchall()

        return select

    @pytest.fixture
    def columns_of(self, pg_schema: str) -> Callable[[str], set[str] | None]:
        def columns_of(table: str) -> set[str] | None:
            rows = fetch(
                pg_schema,
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = %s AND table_name = %s",
                pg_schema,
                table,
            )
            return {name for (name,) in rows} or None

        return columns_of

    @pytest.fixture
    def wait_until_blocked(self, pg_schema: str) -> Callable[[], None]:
        return _waiter(pg_schema, "people", 11)


def _waiter(schema: str, table: str, run_id: int) -> Callable[[], None]:
    """Wait until a second session waits on the chunk lock of (table, run, 0)."""
    key1 = lock_key(PG_SETTINGS["database"], schema, table, run_id)

    def wait() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with pg_connect() as conn:
                waiting = conn.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND NOT granted AND classid = %s::bigint::oid "
                    "AND objid = 0 AND objsubid = 2",
                    (key1 & 0xFFFFFFFF,),
                ).fetchone()
            if waiting and waiting[0]:
                return
            time.sleep(0.02)
        pytest.fail("the second writer never waited for the chunk lock")

    return wait


def test_upsert_creates_a_unique_index_on_the_key_once(
    pg_config: dict[str, Any], pg_schema: str
) -> None:
    options = {"table": "t", "schema": pg_schema, "write_mode": "upsert", "key": "id"}
    make_sink(pg_config).prepare(options, keyed([]).schema)

    make_sink(pg_config).prepare(options, keyed([]).schema)

    assert fetch(
        pg_schema,
        "SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND tablename = 't' "
        "ORDER BY 1",
        pg_schema,
    ) == [
        (f"CREATE INDEX t_run_chunk_idx ON {pg_schema}.t USING btree (_run_id, "
         "_chunk_seq)",),
        (f"CREATE UNIQUE INDEX t_key_idx ON {pg_schema}.t USING btree (id)",),
    ]  # fmt: skip


def test_upsert_uses_an_existing_primary_key(
    pg_config: dict[str, Any], pg_schema: str
) -> None:
    with pg_connect() as conn:
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (name text, id bigint, PRIMARY KEY (name, id), "
                "_run_id bigint NOT NULL, _chunk_seq integer NOT NULL, "
                "_source_ref text)"
            ).format(sql.Identifier(pg_schema, "t"))
        )
    options = {
        "table": "t", "schema": pg_schema, "write_mode": "upsert", "key": ["id", "name"]
    }  # fmt: skip
    sink = make_sink(pg_config)
    sink.prepare(options, keyed([]).schema)

    sink.write(options, keyed([(1, "a"), (1, "a")]), run_id=1, chunk_seq=0,
               fence=lambda: True)  # fmt: skip

    assert fetch(pg_schema, "SELECT id, name, _source_ref FROM t") == [(1, "a", "k#2")]
    assert fetch(
        pg_schema,
        "SELECT indexname FROM pg_indexes WHERE schemaname = %s",
        pg_schema,
    ) == [("t_pkey",)]


def test_upsert_with_duplicate_keys_in_the_table_is_terminal(
    pg_config: dict[str, Any], pg_schema: str
) -> None:
    sink = make_sink(pg_config)
    base = {"table": "t", "schema": pg_schema}
    sink.prepare(base, keyed([]).schema)
    sink.write(base, keyed([(1, "a"), (1, "b")]), run_id=1, chunk_seq=0,
               fence=lambda: True)  # fmt: skip

    with pytest.raises(TerminalError, match="could not create unique index"):
        sink.prepare({**base, "write_mode": "upsert", "key": ["id"]}, keyed([]).schema)


def test_replace_keeps_the_old_table_until_finalize_and_views_block_the_swap(
    pg_config: dict[str, Any], pg_schema: str
) -> None:
    sink = make_sink(pg_config)
    options = {"table": "t", "schema": pg_schema, "write_mode": "replace"}
    sink.prepare(options, keyed([]).schema, run_id=1)
    sink.write(options, keyed([(1, "a")]), run_id=1, chunk_seq=0, fence=lambda: True)
    sink.finalize(options, run_id=1)
    with pg_connect() as conn:
        conn.execute(
            sql.SQL("CREATE VIEW {} AS SELECT * FROM {}").format(
                sql.Identifier(pg_schema, "v"), sql.Identifier(pg_schema, "t")
            )
        )
    sink.prepare(options, keyed([]).schema, run_id=2)
    sink.write(options, keyed([(2, "b")]), run_id=2, chunk_seq=0, fence=lambda: True)

    with pytest.raises(TerminalError, match="depend"):
        sink.finalize(options, run_id=2)

    assert fetch(pg_schema, "SELECT id FROM t") == [(1,)]
    assert fetch(pg_schema, "SELECT id FROM t__dis_run_2") == [(2,)]


def test_the_registry_finds_the_plugin() -> None:
    assert get_plugin("postgres") is PostgresPlugin


ALL_TYPES = pa.table(
    {
        "text": pa.array(["a", "", None, 'q"x', "l\nm", "c,d\\"]),
        "ts_tz": pa.array(
            [dt.datetime(2024, 1, 1, 10, 0, 0, 123456, tzinfo=UTC)] * 5 + [None],
            pa.timestamp("us", "Europe/Paris"),
        ),
        "ts_ns": pa.array([1_700_000_000_123_456_789] * 6, pa.timestamp("ns", "UTC")),
        "ts": pa.array([NAIVE] * 6, pa.timestamp("us")),
        "f64": pa.array([1.5, math.nan, math.inf, -math.inf, 1e300, 0.1]),
        "f32": pa.array([0.25] * 6, pa.float32()),
        "i64": pa.array([2**62, None, 3, 4, 5, -6], pa.int64()),
        "i32": pa.array([2**31 - 1] * 6, pa.int32()),
        "i16": pa.array([-(2**15)] * 6, pa.int16()),
        "flag": pa.array([True, False, None, True, True, False]),
        "day": pa.array([dt.date(2024, 2, 29)] * 5 + [None]),
        "amount": pa.array(
            [decimal.Decimal("-123.45")] * 5 + [None], pa.decimal128(10, 2)
        ),
        "doc": pa.array(['{"a": [1, 2]}', None, "[]", "1", '"x"', "null"], pa.json_()),
        "meta": pa.array(['{"k": "v"}'] * 6),
        "kind": pa.array(["x", "y", "x", "y", "x", None]).dictionary_encode(),
        SOURCE_REF_COLUMN: [f"f.csv#{n}" for n in range(1, 7)],
    }
)
ALL_TYPES = ALL_TYPES.set_column(
    ALL_TYPES.schema.get_field_index("meta"),
    pa.field("meta", pa.string(), metadata={"dis.type": "json"}),
    ALL_TYPES.column("meta"),
)


def test_every_type_round_trips(
    pg_config: dict[str, Any], pg_schema: str, copy_formats: list[str]
) -> None:
    sink = make_sink(pg_config)
    options = {"table": "all_types", "schema": pg_schema}
    sink.prepare(options, ALL_TYPES.schema)

    sink.write(options, ALL_TYPES, run_id=1, chunk_seq=0, fence=lambda: True)

    assert copy_formats == ["binary"]

    columns = dict(
        fetch(
            pg_schema,
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = %s AND table_name = 'all_types'",
            pg_schema,
        )
    )
    assert columns == {
        "text": "text",
        "ts_tz": "timestamp with time zone",
        "ts_ns": "timestamp with time zone",
        "ts": "timestamp without time zone",
        "f64": "double precision",
        "f32": "real",
        "i64": "bigint",
        "i32": "integer",
        "i16": "smallint",
        "flag": "boolean",
        "day": "date",
        "amount": "numeric",
        "doc": "jsonb",
        "meta": "jsonb",
        "kind": "text",
        "_run_id": "bigint",
        "_chunk_seq": "integer",
        "_source_ref": "text",
    }
    rows = fetch(
        pg_schema,
        "SELECT text, text IS NULL, ts_tz, ts_ns, ts, f64::text, f32, i64, i32, i16, "
        "flag, day, amount, doc IS NULL, doc::text, meta->>'k', kind, _run_id, "
        "_chunk_seq FROM all_types ORDER BY _source_ref",
    )
    ts_tz = dt.datetime(2024, 1, 1, 10, 0, 0, 123456, tzinfo=UTC)
    ts_ns = dt.datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC)
    amount = decimal.Decimal("-123.45")
    common = (ts_ns, NAIVE)
    assert rows == [
        ("a", False, ts_tz, *common, "1.5", 0.25, 2**62, 2**31 - 1, -(2**15), True,
         dt.date(2024, 2, 29), amount, False, '{"a": [1, 2]}', "v", "x", 1, 0),
        ("", False, ts_tz, *common, "NaN", 0.25, None, 2**31 - 1, -(2**15), False,
         dt.date(2024, 2, 29), amount, True, None, "v", "y", 1, 0),
        (None, True, ts_tz, *common, "Infinity", 0.25, 3, 2**31 - 1, -(2**15), None,
         dt.date(2024, 2, 29), amount, False, "[]", "v", "x", 1, 0),
        ('q"x', False, ts_tz, *common, "-Infinity", 0.25, 4, 2**31 - 1, -(2**15),
         True, dt.date(2024, 2, 29), amount, False, "1", "v", "y", 1, 0),
        ("l\nm", False, ts_tz, *common, "1e+300", 0.25, 5, 2**31 - 1, -(2**15), True,
         dt.date(2024, 2, 29), amount, False, '"x"', "v", "x", 1, 0),
        ("c,d\\", False, None, *common, "0.1", 0.25, -6, 2**31 - 1, -(2**15), False,
         None, None, False, "null", "v", None, 1, 0),
    ]  # fmt: skip


def test_more_numeric_and_time_types_round_trip(
    pg_config: dict[str, Any], pg_schema: str, copy_formats: list[str]
) -> None:
    table = pa.table(
        {
            "t64": pa.array([dt.time(10, 1, 2, 3), None], pa.time64("us")),
            "t32": pa.array([dt.time(23, 59, 59), None], pa.time32("s")),
            "d64": pa.array([dt.date(2020, 1, 1), None], pa.date64()),
            "f16": pa.array([1.5, None], pa.float16()),
            "u8": pa.array([255, None], pa.uint8()),
            "u64": pa.array([2**64 - 1, None], pa.uint64()),
            "ts_ms": pa.array(
                [dt.datetime(2024, 5, 5, 1, 2, 3, 456000, tzinfo=UTC), None],
                pa.timestamp("ms", "America/New_York"),
            ),
            SOURCE_REF_COLUMN: ["r#1", "r#2"],
        }
    )
    sink = make_sink(pg_config)
    options = {"table": "more", "schema": pg_schema}
    sink.prepare(options, table.schema)

    sink.write(options, table, run_id=1, chunk_seq=0, fence=lambda: True)

    assert copy_formats == ["csv"]  # uint64 -> numeric(20,0) has no binary path

    assert fetch(
        pg_schema, "SELECT t64, t32, d64, f16, u8, u64, ts_ms FROM more ORDER BY 1"
    ) == [
        (
            dt.time(10, 1, 2, 3),
            dt.time(23, 59, 59),
            dt.date(2020, 1, 1),
            1.5,
            255,
            decimal.Decimal(2**64 - 1),
            dt.datetime(2024, 5, 5, 1, 2, 3, 456000, tzinfo=UTC),
        ),
        (None, None, None, None, None, None, None),
    ]


def test_permission_denied_is_terminal(
    pg_config: dict[str, Any], pg_schema: str
) -> None:
    role = f"test_plugins_{uuid.uuid4().hex[:12]}"
    with pg_connect() as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        make_sink(pg_config).prepare(
            {"table": "t", "schema": pg_schema}, pa.schema([("x", pa.string())])
        )
        sink = make_sink({**pg_config, "user": role})

        with pytest.raises(TerminalError, match="permission denied"):
            sink.write(
                {"table": "t", "schema": pg_schema},
                pa.table({"x": ["a"]}),
                run_id=1,
                chunk_seq=0,
                fence=lambda: True,
            )
    finally:
        with pg_connect() as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_csv_from_the_files_source_lands_with_null_and_empty_kept_apart(
    tmp_path: Path, pg_config: dict[str, Any], pg_schema: str
) -> None:
    (tmp_path / "in.csv").write_bytes(b'a,b\n1,""\n,x\n"multi\nline",\n')
    source = FilesPlugin.source(FilesPlugin.load_config({"root": str(tmp_path)}))
    chunk = next(source.plan({"path": "in.csv"}, chunk_rows=10))
    batch = pa.Table.from_batches(source.read({"path": "in.csv"}, chunk))
    batch = batch.select(["a", "b", SOURCE_REF_COLUMN])
    sink = make_sink(pg_config)
    options = {"table": "from_csv", "schema": pg_schema}
    sink.prepare(options, batch.schema)

    sink.write(options, batch, run_id=3, chunk_seq=0, fence=lambda: True)

    assert fetch(pg_schema, "SELECT a, b, _source_ref FROM from_csv ORDER BY 3") == [
        ("1", "", "in.csv#1"),
        (None, "x", "in.csv#2"),
        ("multi\nline", None, "in.csv#3"),
    ]


def test_prepare_creates_the_run_chunk_index(
    pg_config: dict[str, Any], pg_schema: str
) -> None:
    make_sink(pg_config).prepare(
        {"table": "t", "schema": pg_schema}, pa.schema([("x", pa.string())])
    )

    assert fetch(
        pg_schema,
        "SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND tablename = 't'",
        pg_schema,
    ) == [
        (
            f"CREATE INDEX t_run_chunk_idx ON {pg_schema}.t "
            "USING btree (_run_id, _chunk_seq)",
        )
    ]


def test_prepare_refuses_an_existing_table_that_lacks_columns(
    pg_config: dict[str, Any], pg_schema: str
) -> None:
    with pg_connect() as conn:
        conn.execute(
            sql.SQL("CREATE TABLE {} (x text, _run_id bigint)").format(
                sql.Identifier(pg_schema, "old")
            )
        )
    schema = pa.schema([("x", pa.string()), ("y", pa.int64())])

    with pytest.raises(
        TerminalError, match="lacks column\\(s\\) y, _chunk_seq, _source_ref"
    ):
        make_sink(pg_config).prepare({"table": "old", "schema": pg_schema}, schema)


def test_prepare_in_a_missing_schema_is_terminal(pg_config: dict[str, Any]) -> None:
    options = {"table": "t", "schema": f"missing_{uuid.uuid4().hex[:8]}"}

    with pytest.raises(TerminalError, match="does not exist"):
        make_sink(pg_config).prepare(options, pa.schema([("x", pa.string())]))


def test_writing_to_a_missing_table_is_terminal(
    pg_config: dict[str, Any], pg_schema: str
) -> None:
    batch = pa.table({"x": ["a"], SOURCE_REF_COLUMN: ["r#1"]})

    with pytest.raises(TerminalError, match="does not exist"):
        make_sink(pg_config).write(
            {"table": "nope", "schema": pg_schema},
            batch,
            run_id=1,
            chunk_seq=0,
            fence=lambda: True,
        )


def test_an_unmappable_type_is_a_config_error(
    pg_config: dict[str, Any], pg_schema: str
) -> None:
    schema = pa.schema([("blob", pa.binary())])

    with pytest.raises(ConfigError, match="blob"):
        make_sink(pg_config).prepare({"table": "t", "schema": pg_schema}, schema)


def test_a_failing_connection_never_shows_the_password() -> None:
    password = f"pw-{uuid.uuid4().hex}"
    config = PostgresPlugin.load_config(
        {**PG_SETTINGS, "port": free_port(), "connect_timeout": 2},
        {"password": password},
    )
    sink = make_sink(config)

    result = sink.check()
    with pytest.raises(TransientError) as caught:
        sink.write(
            {"table": "t"},
            pa.table({"x": ["a"]}),
            run_id=1,
            chunk_seq=0,
            fence=lambda: True,
        )

    assert result.ok is False
    assert f"127.0.0.1:{config['port']}/postgres" in result.message
    assert "refused" in result.message
    assert password not in result.message
    assert password not in "".join(traceback.format_exception(caught.value))


def test_an_unknown_database_is_terminal(pg_config: dict[str, Any]) -> None:
    sink = make_sink({**pg_config, "database": f"nope_{uuid.uuid4().hex[:8]}"})

    with pytest.raises(TerminalError, match="does not exist"):
        sink.write(
            {"table": "t"},
            pa.table({"x": ["a"]}),
            run_id=1,
            chunk_seq=0,
            fence=lambda: True,
        )
    assert sink.check().ok is False


def test_check_reports_the_server(pg_config: dict[str, Any]) -> None:
    result = make_sink(pg_config).check()

    assert result.ok is True
    assert result.message.startswith(
        f"connected to {PG_SETTINGS['host']}:{PG_SETTINGS['port']}/"
        f"{PG_SETTINGS['database']} as {PG_SETTINGS['user']} (PostgreSQL "
    )


def test_dataset_name(pg_config: dict[str, Any]) -> None:
    name = make_sink(pg_config).dataset_name({"table": "flights", "schema": "raw"})

    assert name == (
        f"postgres://{PG_SETTINGS['host']}:{PG_SETTINGS['port']}/"
        f"{PG_SETTINGS['database']}.raw.flights"
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        pytest.param({"host": "/var/run/postgresql"}, "host", id="socket-path"),
        pytest.param({"host": "db host=evil"}, "host", id="dsn-fragment"),
        pytest.param({"port": 0}, "port", id="port"),
        pytest.param({"sslmode": "maybe"}, "sslmode", id="sslmode"),
    ],
)
def test_invalid_config_is_refused(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        PostgresPlugin.load_config({**PG_SETTINGS, **change})

    assert list(caught.value.errors) == [field]


def test_a_password_in_the_config_is_refused() -> None:
    with pytest.raises(ConfigError, match="credential"):
        PostgresPlugin.load_config({**PG_SETTINGS, "password": "x"})


def test_the_password_is_a_secret_field() -> None:
    assert PostgresPlugin.secret_fields() == ("password",)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        pytest.param({}, "table", id="no-table"),
        pytest.param({"table": "t", "write_mode": "merge"}, "write_mode", id="mode"),
        pytest.param({"table": "t", "write_mode": "upsert"}, "key", id="no-key"),
        pytest.param(
            {"table": "t", "write_mode": "upsert", "key": []}, "key", id="empty-key"
        ),
        pytest.param(
            {"table": "t", "write_mode": "upsert", "key": ["_run_id"]},
            "key",
            id="system-key",
        ),
        pytest.param({"table": "t", "evolve": "drop"}, "evolve", id="evolve"),
        pytest.param({"table": "t__dis_run_1"}, "table", id="staging-name"),
        pytest.param({"table": "x" * 64}, "table", id="long-name"),
    ],
)
def test_invalid_write_options_are_refused(
    pg_config: dict[str, Any], options: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        make_sink(pg_config).dataset_name(options)

    assert list(caught.value.errors) == [field]


def test_redact_removes_the_password_and_password_fragments() -> None:
    text = "failed: host=h password='a b' user=u; also s3cret and password=s3cret"

    assert redact(text, "s3cret") == (
        "failed: host=h password=*** user=u; also *** and password=***"
    )


# -- binary COPY ---------------------------------------------------------------------


def _oids(**types: str) -> dict[str, int]:
    """Column name -> type OID, for PostgreSQL type names."""
    with pg_connect() as conn:
        return {
            name: conn.execute("SELECT %s::regtype::oid::int", (type_,)).fetchone()[0]
            for name, type_ in types.items()
        }


@pytest.mark.parametrize(
    ("arrow", "pg", "casts"),
    [
        pytest.param(pa.int64(), "bigint", {}, id="int64-bigint"),
        pytest.param(pa.int32(), "integer", {}, id="int32-integer"),
        pytest.param(pa.int16(), "smallint", {}, id="int16-smallint"),
        pytest.param(pa.int64(), "integer", {"c": pa.int32()}, id="int64-integer"),
        pytest.param(pa.int32(), "bigint", {"c": pa.int64()}, id="int32-bigint"),
        pytest.param(pa.uint8(), "smallint", {"c": pa.int16()}, id="uint8-smallint"),
        pytest.param(pa.float64(), "double precision", {}, id="float64"),
        pytest.param(pa.float32(), "real", {}, id="float32"),
        pytest.param(pa.bool_(), "boolean", {}, id="bool"),
        pytest.param(pa.string(), "text", {}, id="string-text"),
        pytest.param(pa.string(), "varchar(10)", {}, id="string-varchar"),
        pytest.param(pa.string(), "char(3)", {}, id="string-char"),
        pytest.param(pa.string(), "json", {}, id="string-json"),
        pytest.param(pa.large_string(), "text", {}, id="large-string"),
        pytest.param(pa.string_view(), "text", {}, id="string-view"),
        pytest.param(pa.date32(), "date", {}, id="date32"),
        pytest.param(pa.timestamp("us"), "timestamp", {}, id="ts-naive"),
        pytest.param(pa.timestamp("us"), "timestamptz", {}, id="ts-naive-tz"),
        pytest.param(pa.timestamp("us", "UTC"), "timestamptz", {}, id="ts-tz"),
        pytest.param(
            pa.timestamp("ms", "UTC"),
            "timestamptz",
            {"c": pa.timestamp("us", "UTC")},
            id="ts-ms",
        ),
        pytest.param(pa.time64("us"), "time", {}, id="time64"),
        pytest.param(pa.time32("s"), "time", {"c": pa.time64("us")}, id="time32"),
        pytest.param(pa.decimal128(10, 2), "numeric(10,2)", {}, id="decimal128"),
        pytest.param(pa.decimal64(12, 3), "numeric", {}, id="decimal64"),
    ],
)
def test_binary_plan_takes_exactly_matching_types(
    arrow: pa.DataType, pg: str, casts: dict[str, pa.DataType]
) -> None:
    plan = binary_plan(pa.schema([("c", arrow)]), _oids(c=pg))

    assert plan == BinaryPlan(casts=casts, jsonb=frozenset())


def test_binary_plan_marks_jsonb_columns() -> None:
    schema = pa.schema([("a", pa.string()), ("b", pa.large_string())])

    plan = binary_plan(schema, _oids(a="jsonb", b="text"))

    assert plan == BinaryPlan(casts={}, jsonb=frozenset({"a"}))


@pytest.mark.parametrize(
    ("arrow", "pg"),
    [
        pytest.param(pa.int64(), "numeric", id="int-numeric"),
        pytest.param(pa.int64(), "double precision", id="int-double"),
        pytest.param(pa.int64(), "text", id="int-text"),
        pytest.param(pa.uint64(), "numeric(20,0)", id="uint64-numeric"),
        pytest.param(pa.float64(), "real", id="double-real"),
        pytest.param(pa.float32(), "double precision", id="real-double"),
        pytest.param(pa.float16(), "real", id="float16"),
        pytest.param(pa.string(), "uuid", id="string-uuid"),
        pytest.param(pa.string(), "integer", id="string-integer"),
        pytest.param(pa.timestamp("us", "UTC"), "text", id="ts-text"),
        pytest.param(pa.timestamp("us"), "date", id="ts-date"),
        pytest.param(pa.timestamp("ns", "UTC"), "timestamptz", id="ts-ns"),
        pytest.param(pa.time64("ns"), "time", id="time-ns"),
        pytest.param(pa.date64(), "date", id="date64"),
        pytest.param(pa.date32(), "timestamp", id="date-timestamp"),
        pytest.param(pa.decimal256(40, 2), "numeric", id="decimal256"),
        pytest.param(pa.decimal128(10, 2), "double precision", id="decimal-double"),
        pytest.param(pa.bool_(), "integer", id="bool-integer"),
        pytest.param(pa.null(), "text", id="null"),
        pytest.param(pa.json_(), "jsonb", id="json-extension"),
        pytest.param(pa.dictionary(pa.int32(), pa.string()), "text", id="dictionary"),
        pytest.param(pa.list_(pa.int64()), "bigint[]", id="list"),
        pytest.param(pa.time64("us"), "timetz", id="timetz"),
    ],
)
def test_binary_plan_refuses_every_other_pair(arrow: pa.DataType, pg: str) -> None:
    schema = pa.schema([("ok", pa.int64()), ("c", arrow)])

    assert binary_plan(schema, _oids(ok="bigint", c=pg)) is None


def test_binary_plan_refuses_a_column_the_table_lacks() -> None:
    schema = pa.schema([("ok", pa.int64()), ("c", pa.int64())])

    assert binary_plan(schema, _oids(ok="bigint")) is None


def test_every_type_goes_as_binary_and_loads_what_csv_loads(
    pg_config: dict[str, Any],
    pg_schema: str,
    copy_formats: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A row of values and a row of NULLs in every column, written once as binary and
    # once with the binary path switched off; both tables must read back the same.
    values = {
        "i64": pa.array([-(2**63), None], pa.int64()),
        "i32": pa.array([-(2**31), None], pa.int32()),
        "i16": pa.array([2**15 - 1, None], pa.int16()),
        "i8": pa.array([-128, None], pa.int8()),
        "u32": pa.array([2**32 - 1, None], pa.uint32()),
        "f64": pa.array([-0.1, None]),
        "f32": pa.array([3.4e38, None], pa.float32()),
        "flag": pa.array([False, None]),
        "text": pa.array(["é\t\\,\"\n'", None]),
        "large": pa.array(["x" * 10_000, None], pa.large_string()),
        "view": pa.array(["a view longer than twelve", None], pa.string_view()),
        "day": pa.array([dt.date(1, 1, 1), None]),
        "ts": pa.array([OLD_NAIVE, None]),
        "ts_tz": pa.array(
            [dt.datetime(1969, 7, 20, 20, 17, 40, 1, tzinfo=UTC), None],
            pa.timestamp("us", "America/New_York"),
        ),
        "ts_ms": pa.array(
            [dt.datetime(2000, 1, 1, tzinfo=UTC), None], pa.timestamp("ms", "UTC")
        ),
        "ts_ns": pa.array([-1_000, None], pa.timestamp("ns", "UTC")),
        "t64": pa.array([dt.time(23, 59, 59, 999999), None], pa.time64("us")),
        "t32": pa.array([dt.time(0, 0, 1), None], pa.time32("ms")),
        "amount": pa.array([decimal.Decimal("-0.01"), None], pa.decimal128(10, 2)),
        "big": pa.array(
            [decimal.Decimal("-1234567890123456789012345678.0123456789"), None],
            pa.decimal128(38, 10),
        ),
        "doc": pa.array(['{"a": [1, 2.5, null]}', None], pa.json_()),
        "kind": pa.array(["x", None]).dictionary_encode(),
        SOURCE_REF_COLUMN: ["r#1", None],
    }
    batch = pa.table(values)
    sink = make_sink(pg_config)
    sink.prepare({"table": "bin", "schema": pg_schema}, batch.schema)
    sink.prepare({"table": "csv", "schema": pg_schema}, batch.schema)

    sink.write({"table": "bin", "schema": pg_schema}, batch, run_id=1, chunk_seq=0,
               fence=lambda: True)  # fmt: skip
    monkeypatch.setattr(postgres, "binary_plan", lambda *_: None)
    sink.write({"table": "csv", "schema": pg_schema}, batch, run_id=1, chunk_seq=0,
               fence=lambda: True)  # fmt: skip

    assert copy_formats == ["binary", "csv"]
    names = ", ".join(f'"{n}"::text' for n in [*values, "_run_id", "_chunk_seq"])
    query = f"SELECT {names} FROM {{}} ORDER BY _source_ref NULLS LAST"
    binary_rows = fetch(pg_schema, query.format("bin"))
    assert binary_rows == fetch(pg_schema, query.format("csv"))
    assert binary_rows == [
        (str(-(2**63)), str(-(2**31)), str(2**15 - 1), "-128", str(2**32 - 1),
         "-0.1", "3.4e+38", "false", "é\t\\,\"\n'", "x" * 10_000,
         "a view longer than twelve", "0001-01-01", "1899-12-31 23:59:59.999999",
         "1969-07-20 20:17:40.000001+00", "2000-01-01 00:00:00+00",
         "1969-12-31 23:59:59.999999+00", "23:59:59.999999", "00:00:01", "-0.01",
         "-1234567890123456789012345678.0123456789", '{"a": [1, 2.5, null]}', "x",
         "r#1", "1", "0"),
        (None,) * (len(values) - 1) + (None, "1", "0"),
    ]  # fmt: skip


def _create(schema: str, table: str, columns: str) -> None:
    with pg_connect() as conn:
        conn.execute(
            sql.SQL("CREATE TABLE {} ({}, _run_id bigint NOT NULL, "
                    "_chunk_seq bigint NOT NULL, _source_ref text)").format(
                sql.Identifier(schema, table), sql.SQL(columns)
            )
        )  # fmt: skip


def test_a_table_with_narrower_types_is_cast_and_stays_binary(
    pg_config: dict[str, Any], pg_schema: str, copy_formats: list[str]
) -> None:
    # Someone else's table: integer/smallint for int64, varchar, char, jsonb for a
    # plain string, timestamptz for a naive timestamp, bigint for _chunk_seq.
    _create(pg_schema, "theirs", "i integer, s smallint, v varchar(10), "
            "c char(3), j jsonb, ts timestamptz")  # fmt: skip
    batch = pa.table(
        {
            "i": pa.array([2**31 - 1, None], pa.int64()),
            "s": pa.array([-(2**15), None], pa.int64()),
            "v": ["0123456789", None],
            "c": ["ab", None],
            "j": ['{"k": 1}', None],
            "ts": pa.array([OLD_NAIVE, None], pa.timestamp("us")),
            SOURCE_REF_COLUMN: ["r#1", "r#2"],
        }
    )

    make_sink(pg_config).write({"table": "theirs", "schema": pg_schema}, batch,
                               run_id=1, chunk_seq=7, fence=lambda: True)  # fmt: skip

    assert copy_formats == ["binary"]
    assert fetch(pg_schema, "SELECT i, s, v, c, j, ts, _chunk_seq FROM theirs "
                 "ORDER BY _source_ref") == [
        (2**31 - 1, -(2**15), "0123456789", "ab ", {"k": 1},
         OLD_NAIVE.replace(tzinfo=UTC), 7),
        (None, None, None, None, None, None, 7),
    ]  # fmt: skip


def test_a_table_with_other_types_falls_back_to_csv(
    pg_config: dict[str, Any], pg_schema: str, copy_formats: list[str]
) -> None:
    # numeric for int64, text for a timestamp, double for a decimal, uuid for a
    # string: binary cannot fill these, CSV (PostgreSQL parsing text) can.
    _create(pg_schema, "theirs", "n numeric, ts text, d double precision, u uuid, "
            "i integer")  # fmt: skip
    batch = pa.table(
        {
            "n": pa.array([2**62, None], pa.int64()),
            "ts": pa.array(
                [dt.datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=UTC), None],
                pa.timestamp("us", "UTC"),
            ),
            "d": pa.array([decimal.Decimal("1.25"), None], pa.decimal128(5, 2)),
            "u": ["00000000-0000-0000-0000-000000000001", None],
            "i": pa.array([1, None], pa.int64()),
            SOURCE_REF_COLUMN: ["r#1", "r#2"],
        }
    )

    make_sink(pg_config).write({"table": "theirs", "schema": pg_schema}, batch,
                               run_id=1, chunk_seq=0, fence=lambda: True)  # fmt: skip

    assert copy_formats == ["csv"]
    assert fetch(pg_schema, "SELECT n, ts, d, u::text, i FROM theirs "
                 "ORDER BY _source_ref") == [
        (decimal.Decimal(2**62), "2024-01-02 03:04:05.000006", 1.25,
         "00000000-0000-0000-0000-000000000001", 1),
        (None, None, None, None, None),
    ]  # fmt: skip


def test_an_integer_too_wide_for_the_column_fails_as_it_did_with_csv(
    pg_config: dict[str, Any], pg_schema: str, copy_formats: list[str]
) -> None:
    _create(pg_schema, "theirs", "i integer")
    batch = pa.table({"i": pa.array([2**31], pa.int64()), SOURCE_REF_COLUMN: ["r"]})

    sink = make_sink(pg_config)

    with pytest.raises(TerminalError, match="out of range for type integer"):
        sink.write({"table": "theirs", "schema": pg_schema}, batch, run_id=1,
                   chunk_seq=0, fence=lambda: True)  # fmt: skip
    assert copy_formats == ["csv"]


def test_upsert_stages_its_chunk_in_binary(
    pg_config: dict[str, Any], pg_schema: str, copy_formats: list[str]
) -> None:
    # The key column is integer (not the bigint prepare would choose): the staging
    # table copies the target's types, so the cast applies there too.
    _create(pg_schema, "t", "id integer PRIMARY KEY, name varchar(5), seen timestamptz")
    options = {"table": "t", "schema": pg_schema, "write_mode": "upsert", "key": "id"}
    sink = make_sink(pg_config)
    at = dt.datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)

    def batch(rows: list[tuple[int, str | None]]) -> pa.Table:
        table = keyed([(i, n or "") for i, n in rows])
        names = pa.array([n for _, n in rows], pa.string())
        seen = pa.array([at] * len(rows), pa.timestamp("us", "UTC"))
        return table.set_column(1, "name", names).append_column("seen", seen)

    first = sink.write(options, batch([(1, "a"), (2, "b")]), run_id=1, chunk_seq=0,
                       fence=lambda: True)  # fmt: skip
    second = sink.write(options, batch([(2, None), (3, "c"), (2, "bb")]), run_id=2,
                        chunk_seq=0, fence=lambda: True)  # fmt: skip

    assert copy_formats == ["binary", "binary"]
    assert (first.details["inserted"], second.details) == (
        2, {"inserted": 1, "updated": 1, "replaced": 1}
    )  # fmt: skip
    assert fetch(pg_schema, "SELECT id, name, seen, _run_id FROM t ORDER BY id") == [
        (1, "a", at, 1),
        (2, "bb", at, 2),
        (3, "c", at, 2),
    ]


@pytest.mark.parametrize(
    ("extra", "format_"),
    [
        pytest.param("", "binary", id="binary"),
        pytest.param(", n numeric", "csv", id="csv"),
    ],
)
def test_a_nul_byte_in_a_string_is_terminal_with_either_format(
    pg_config: dict[str, Any],
    pg_schema: str,
    copy_formats: list[str],
    extra: str,
    format_: str,
) -> None:
    _create(pg_schema, "t", f"s text{extra}")
    columns: dict[str, Any] = {"s": ["a\x00b"], SOURCE_REF_COLUMN: ["r"]}
    if extra:
        columns["n"] = pa.array([1], pa.int64())

    with pytest.raises(TerminalError, match='encoding "UTF8": 0x00'):
        make_sink(pg_config).write({"table": "t", "schema": pg_schema},
                                   pa.table(columns), run_id=1, chunk_seq=0,
                                   fence=lambda: True)  # fmt: skip
    assert copy_formats == [format_]
    assert fetch(pg_schema, "SELECT count(*) FROM t") == [(0,)]


def test_a_date_outside_postgresql_range_is_terminal_in_binary(
    pg_config: dict[str, Any], pg_schema: str, copy_formats: list[str]
) -> None:
    batch = pa.table({"d": pa.array([-(2**31)], pa.date32()), SOURCE_REF_COLUMN: ["r"]})
    sink = make_sink(pg_config)
    options = {"table": "t", "schema": pg_schema}
    sink.prepare(options, batch.schema)

    with pytest.raises(TerminalError, match=r"binary COPY into .*days since"):
        sink.write(options, batch, run_id=1, chunk_seq=0, fence=lambda: True)
    assert copy_formats == ["binary"]


def test_large_strings_go_into_jsonb_in_binary(
    pg_config: dict[str, Any], pg_schema: str, copy_formats: list[str]
) -> None:
    _create(pg_schema, "t", "doc jsonb, note text")
    batch = pa.table(
        {
            "doc": pa.array(['{"a": 1}', None], pa.large_string()),
            "note": pa.array(["n", None], pa.large_string()),
            SOURCE_REF_COLUMN: ["r#1", "r#2"],
        }
    )

    make_sink(pg_config).write({"table": "t", "schema": pg_schema}, batch, run_id=1,
                               chunk_seq=0, fence=lambda: True)  # fmt: skip

    assert copy_formats == ["binary"]
    assert fetch(pg_schema, "SELECT doc, note FROM t ORDER BY _source_ref") == [
        ({"a": 1}, "n"),
        (None, None),
    ]
