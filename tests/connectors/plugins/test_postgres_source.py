"""The `postgres` source against the real PostgreSQL server."""

from __future__ import annotations

import datetime as dt
import decimal
import traceback
import uuid
from typing import Any

import pyarrow as pa
import pytest
from psycopg import sql

from connectors.base import SOURCE_REF_COLUMN, Chunk
from connectors.exceptions import ConfigError, TransientError
from connectors.plugins.sql import PostgresPlugin
from connectors.plugins.sql.postgres_source import PostgresSource, SnapshotGoneError
from tests.connectors.contract import SourceContract
from tests.connectors.plugins.pgtools import PG_SETTINGS, pg_connect
from tests.helpers import free_port

UTC = dt.UTC


def make_source(config: dict[str, Any]) -> PostgresSource:
    source = PostgresPlugin.source(config)
    assert isinstance(source, PostgresSource)
    return source


def execute(schema: str, statement: str, *params: Any) -> None:
    with pg_connect() as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        conn.execute(statement, params or None)  # type: ignore[arg-type]


def read_all(
    source: PostgresSource, options: dict[str, Any], chunks: list[Chunk]
) -> pa.Table:
    batches = [b for c in chunks for b in source.read(options, c)]
    return pa.Table.from_batches(batches) if batches else pa.table({})


def ids(table: pa.Table) -> list[int]:
    return table.column("id").to_pylist() if table.num_rows else []


class TestPostgresSourceContract(SourceContract):
    """The `postgres` source passes the shared source contract."""

    @pytest.fixture
    def source(self, pg_config: dict[str, Any]) -> PostgresSource:
        return make_source(pg_config)

    @pytest.fixture
    def read_options(self, pg_schema: str) -> dict[str, Any]:
        execute(
            pg_schema,
            "CREATE TABLE people (id int PRIMARY KEY, name text); "
            "INSERT INTO people SELECT g, 'p' || g FROM generate_series(1, 7) g",
        )
        return {"table": "people", "schema": pg_schema}

    @pytest.fixture
    def expected_refs(self, pg_schema: str) -> list[str]:
        return [f"{pg_schema}.people#{n}" for n in range(1, 8)]


@pytest.fixture
def events(pg_schema: str) -> dict[str, Any]:
    """Table `events` (id, at int cursor) and the incremental read options on it."""
    execute(pg_schema, "CREATE TABLE events (id int PRIMARY KEY, at int, note text)")
    return {"table": "events", "schema": pg_schema, "cursor": "at"}


def add_events(schema: str, rows: list[tuple[int, int | None]]) -> None:
    with pg_connect() as conn, conn.cursor() as cur:
        cur.executemany(
            sql.SQL("INSERT INTO {} (id, at) VALUES (%s, %s)").format(
                sql.Identifier(schema, "events")
            ),
            rows,
        )


def run(
    source: PostgresSource, options: dict[str, Any], *, chunk_rows: int = 2
) -> tuple[list[int], dict[str, Any] | None]:
    """One incremental run: the ids read and the position to save."""
    chunks = list(source.plan(options, chunk_rows=chunk_rows))
    table = read_all(source, options, chunks)
    return sorted(ids(table)), (chunks[0].spec["cursor_upto"] if chunks else None)


def test_incremental_runs_with_ties_neither_skip_nor_repeat_a_row(
    pg_config: dict[str, Any], pg_schema: str, events: dict[str, Any]
) -> None:
    source = make_source(pg_config)
    add_events(pg_schema, [(1, 10), (2, 10), (3, 20), (4, 20), (5, 20), (9, None)])
    first, saved = run(source, events)
    # New rows tie with the saved cursor value (20), one on each side of its key.
    add_events(pg_schema, [(6, 20), (7, 30), (10, 20)])

    second, saved_again = run(source, {**events, "cursor_after": saved})
    third, _ = run(source, {**events, "cursor_after": saved_again})

    assert (first, saved) == ([1, 2, 3, 4, 5], {"cursor": 20, "key": [5]})
    assert (second, saved_again) == ([6, 7, 10], {"cursor": 30, "key": [7]})
    assert third == []


def test_rows_committed_after_the_plan_wait_for_the_next_run(
    pg_config: dict[str, Any], pg_schema: str, events: dict[str, Any]
) -> None:
    source = make_source(pg_config)
    add_events(pg_schema, [(1, 10), (2, 20)])
    chunks = list(source.plan(events, chunk_rows=1))
    add_events(pg_schema, [(3, 20), (4, 5), (5, 40)])  # after the plan

    first = read_all(source, events, chunks)
    saved = chunks[0].spec["cursor_upto"]
    second, _ = run(source, {**events, "cursor_after": saved})

    assert ids(first) == [1, 2]
    assert saved == {"cursor": 20, "key": [2]}
    assert second == [3, 5]  # 4 came in behind the cursor: the documented limit


def test_timestamp_cursor_positions_round_trip(
    pg_config: dict[str, Any], pg_schema: str
) -> None:
    execute(
        pg_schema,
        "CREATE TABLE t (k text PRIMARY KEY, at timestamptz); INSERT INTO t "
        "VALUES ('a', '2024-01-01 10:00:00.000001+00'), "
        "('b', '2024-01-01 10:00:00.000001+00')",
    )
    options = {"table": "t", "schema": pg_schema, "cursor": "at"}
    source = make_source(pg_config)
    saved = next(source.plan(options, chunk_rows=5)).spec["cursor_upto"]
    execute(pg_schema, "INSERT INTO t VALUES ('c', '2024-01-01 10:00:00.000001+00')")

    again = read_all(
        source,
        {**options, "cursor_after": saved},
        list(source.plan({**options, "cursor_after": saved}, chunk_rows=5)),
    )

    assert saved == {"cursor": "2024-01-01T10:00:00.000001+00:00", "key": ["b"]}
    assert again.column("k").to_pylist() == ["c"]


def test_checkpoint_is_the_greatest_cursor_and_key_of_a_batch(
    pg_config: dict[str, Any], pg_schema: str, events: dict[str, Any]
) -> None:
    add_events(pg_schema, [(1, 30), (2, 30), (3, 10), (4, None)])
    source = make_source(pg_config)
    chunk = next(source.plan(events, chunk_rows=10))

    batch = next(source.read(events, chunk))

    assert PostgresSource.checkpoint(batch) == {"cursor": 30, "key": [2]}
    assert PostgresSource.checkpoint(batch.slice(2, 1)) == {"cursor": 10, "key": [3]}
    assert PostgresSource.checkpoint(batch.slice(0, 0)) is None


def test_chunks_read_from_the_snapshot_see_no_later_change(
    pg_config: dict[str, Any], pg_schema: str
) -> None:
    execute(
        pg_schema,
        "CREATE TABLE t (id int PRIMARY KEY, v text); "
        "INSERT INTO t SELECT g, 'old' FROM generate_series(1, 6) g",
    )
    options = {"table": "t", "schema": pg_schema}
    source = make_source(pg_config)

    with source.export_snapshot() as snapshot:
        chunks = list(source.plan(options, chunk_rows=4, snapshot=snapshot))
        execute(pg_schema, "INSERT INTO t VALUES (7, 'new'), (8, 'new')")
        execute(pg_schema, "UPDATE t SET v = 'new' WHERE id = 2")
        table = read_all(source, options, chunks)
    latest = read_all(source, options, list(source.plan(options, chunk_rows=4)))

    assert [c.spec["snapshot"] for c in chunks] == [snapshot, snapshot]
    assert table.column("v").to_pylist() == ["old"] * 6
    assert ids(table) == [1, 2, 3, 4, 5, 6]
    assert ids(latest) == [1, 2, 3, 4, 5, 6, 7, 8]


def test_a_chunk_whose_snapshot_is_gone_is_a_transient_error(
    pg_config: dict[str, Any], pg_schema: str
) -> None:
    execute(pg_schema, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
    options = {"table": "t", "schema": pg_schema}
    source = make_source(pg_config)
    with source.export_snapshot() as snapshot:
        chunks = list(source.plan(options, chunk_rows=4, snapshot=snapshot))

    with pytest.raises(SnapshotGoneError, match="no longer exists") as caught:
        read_all(source, options, chunks)

    assert isinstance(caught.value, TransientError)


def test_a_query_is_read_in_key_chunks(
    pg_config: dict[str, Any], pg_schema: str
) -> None:
    execute(
        pg_schema,
        "CREATE TABLE t (a int, b text, n numeric); "
        "INSERT INTO t SELECT g % 2, 'x' || g, g / 4.0 FROM generate_series(1, 5) g",
    )
    options = {
        "query": f"SELECT a, b, n FROM \"{pg_schema}\".t WHERE b <> 'x5' -- a; comment",
        "key": ["a", "b"],
    }
    PostgresPlugin.validate_options("source", options)
    source = make_source(pg_config)
    chunks = list(source.plan(options, chunk_rows=3))

    table = read_all(source, options, chunks)

    assert len(chunks) == 2
    assert table.column(SOURCE_REF_COLUMN).to_pylist() == [
        "query#0,x2",
        "query#0,x4",
        "query#1,x1",
        "query#1,x3",
    ]
    assert [decimal.Decimal(v) for v in table.column("n").to_pylist()] == [
        decimal.Decimal("0.5"),
        decimal.Decimal("1"),
        decimal.Decimal("0.25"),
        decimal.Decimal("0.75"),
    ]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        pytest.param("SELECT 1; DROP TABLE t", "single SELECT", id="two-statements"),
        pytest.param("DELETE FROM t", "not DELETE", id="delete"),
        pytest.param(
            "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
            "DELETE statement is not allowed",
            id="modifying-cte",
        ),
        pytest.param("SELECT * FROM t FOR UPDATE", "locking clause", id="for-update"),
        pytest.param("SELECT * INTO t2 FROM t", "SELECT ... INTO", id="select-into"),
        pytest.param(
            "SELECT pg_catalog.pg_read_file('/etc/passwd')",
            "pg_read_file()",
            id="pg-read-file",
        ),
        pytest.param("SELECT lo_import('/etc/passwd')", "lo_import()", id="lo-import"),
        pytest.param("SELECT dblink('h', 'q')", "dblink()", id="dblink"),
        pytest.param("SELECT nextval('s')", "nextval()", id="nextval"),
        pytest.param("COPY t TO '/tmp/x'", "not COPY", id="copy"),
        pytest.param("SELECT (", "not valid postgres SQL", id="unparsable"),
    ],
)
def test_a_query_that_does_more_than_read_is_refused(query: str, message: str) -> None:
    with pytest.raises(
        ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
    ) as caught:
        PostgresPlugin.validate_options("source", {"query": query, "key": "id"})

    assert list(caught.value.errors) == ["query"]


@pytest.mark.parametrize(
    ("options", "field"),
    [
        pytest.param({}, "table", id="nothing"),
        pytest.param({"table": "t", "query": "SELECT 1"}, "table", id="both"),
        pytest.param({"query": "SELECT 1"}, "key", id="query-without-key"),
        pytest.param(
            {"table": "t", "cursor_after": {"cursor": 1, "key": [1]}},
            "cursor_after",
            id="after-without-cursor",
        ),
    ],
)
def test_invalid_read_options_are_refused(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        PostgresPlugin.validate_options("source", options)

    assert list(caught.value.errors) == [field]


def test_reads_run_in_a_read_only_transaction(
    pg_config: dict[str, Any], pg_schema: str
) -> None:
    execute(pg_schema, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
    options = {
        "query": "SELECT current_setting('transaction_read_only') AS ro, 1 AS id",
        "key": "id",
    }
    source = make_source(pg_config)

    table = read_all(source, options, list(source.plan(options, chunk_rows=5)))

    assert table.column("ro").to_pylist() == ["on"]


def test_a_table_without_primary_key_needs_a_key(
    pg_config: dict[str, Any], pg_schema: str
) -> None:
    execute(pg_schema, "CREATE TABLE t (id int)")

    with pytest.raises(ConfigError, match="has no primary key"):
        list(
            make_source(pg_config).plan(
                {"table": "t", "schema": pg_schema}, chunk_rows=5
            )
        )


def test_types_are_read_as_arrow_types(
    pg_config: dict[str, Any], pg_schema: str
) -> None:
    execute(
        pg_schema,
        "CREATE TABLE t (id bigint PRIMARY KEY, s smallint, i int, f real, d double "
        "precision, n numeric(8,3), b bool, day date, tm time, ts timestamp, "
        "tz timestamptz, j jsonb, u uuid, txt text); INSERT INTO t VALUES "
        "(1, 2, 3, 1.5, 'NaN', 12.345, true, '2024-02-29', '10:11:12.5', "
        "'2024-01-01 01:02:03.000004', '2024-01-01 01:02:03+02', '{\"a\": [1]}', "
        "'00000000-0000-0000-0000-000000000001', 'a\nb'), "
        "(2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, "
        "NULL, '')",
    )
    options = {"table": "t", "schema": pg_schema}
    source = make_source(pg_config)

    table = read_all(source, options, list(source.plan(options, chunk_rows=5)))

    assert [str(f.type) for f in table.schema] == [
        "int64", "int16", "int32", "float", "double", "decimal128(8, 3)", "bool",
        "date32[day]", "time64[us]", "timestamp[us]", "timestamp[us, tz=UTC]",
        "string", "string", "string", "string",
    ]  # fmt: skip
    assert table.schema.field("j").metadata == {b"dis.type": b"json"}
    rows = table.to_pylist()
    assert rows[0]["d"] != rows[0]["d"]  # NaN
    del rows[0]["d"]
    assert rows[0] == {
        "id": 1, "s": 2, "i": 3, "f": 1.5, "n": decimal.Decimal("12.345"), "b": True,
        "day": dt.date(2024, 2, 29), "tm": dt.time(10, 11, 12, 500000),
        "ts": dt.datetime(2024, 1, 1, 1, 2, 3, 4),  # noqa: DTZ001 - a naive column
        "tz": dt.datetime(2023, 12, 31, 23, 2, 3, tzinfo=dt.UTC).astimezone(
            rows[0]["tz"].tzinfo
        ),
        "j": '{"a": [1]}', "u": "00000000-0000-0000-0000-000000000001",
        "txt": "a\nb", SOURCE_REF_COLUMN: f"{pg_schema}.t#1",
    }  # fmt: skip
    assert rows[1]["txt"] == ""
    assert rows[1]["s"] is None


def test_discover_lists_tables_with_their_arrow_schema(
    pg_config: dict[str, Any], pg_schema: str
) -> None:
    execute(pg_schema, "CREATE TABLE t (id int PRIMARY KEY, at timestamptz)")

    streams = {s.name: s.schema for s in make_source(pg_config).discover()}

    assert streams[f"{pg_schema}.t"] == pa.schema(
        [("id", pa.int32()), ("at", pa.timestamp("us", "UTC"))]
    )


def test_a_failing_source_never_shows_the_password() -> None:
    password = f"pw-{uuid.uuid4().hex}"
    config = PostgresPlugin.load_config(
        {**PG_SETTINGS, "port": free_port(), "connect_timeout": 2},
        {"password": password},
    )
    source = make_source(config)

    result = source.check()
    with pytest.raises(TransientError) as caught:
        list(source.plan({"table": "t"}, chunk_rows=5))

    assert result.ok is False
    assert password not in result.message
    assert password not in "".join(traceback.format_exception(caught.value))


def test_capabilities_are_declared() -> None:
    capabilities = PostgresPlugin.capabilities

    assert (
        capabilities.source,
        capabilities.incremental,
        capabilities.chunkable,
        capabilities.discover,
        capabilities.upsert,
    ) == (True, True, True, True, True)
