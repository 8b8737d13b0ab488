"""The `sqlite` sink: the zero-configuration local target."""

from __future__ import annotations

import datetime as dt
import decimal
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from connectors.base import SOURCE_REF_COLUMN
from connectors.exceptions import ConfigError, TerminalError, TransientError
from connectors.plugins.sql import SqlitePlugin
from connectors.plugins.sql.sqlite import SqliteSink
from connectors.registry import get_plugin
from tests.connectors.contract import (
    EvolveSinkContract,
    ReplaceSinkContract,
    SinkContract,
    UpsertSinkContract,
    keyed,
)


def make_sink(path: Path, **config: Any) -> SqliteSink:
    sink = SqlitePlugin.sink(SqlitePlugin.load_config({"path": str(path), **config}))
    assert isinstance(sink, SqliteSink)
    return sink


def fetch(path: Path, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(query, params).fetchall()


class TestSqliteSinkContract(SinkContract):
    """The `sqlite` sink passes the shared sink contract."""

    @pytest.fixture
    def db(self, tmp_path: Path) -> Path:
        return tmp_path / "out.db"

    @pytest.fixture
    def sink(self, db: Path) -> SqliteSink:
        return make_sink(db)

    @pytest.fixture
    def write_options(self) -> dict[str, Any]:
        return {"table": "people", "write_mode": "append"}

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
    def refs_of(self, db: Path) -> Callable[[int, int], list[str]]:
        def refs_of(run_id: int, chunk_seq: int) -> list[str]:
            rows = fetch(
                db,
                "SELECT _source_ref FROM people WHERE _run_id = ? "
                "AND _chunk_seq = ? ORDER BY 1",
                run_id,
                chunk_seq,
            )
            return [ref for (ref,) in rows]

        return refs_of

    @pytest.fixture
    def wait_until_blocked(self) -> Callable[[], None]:
        # SQLite does not show who waits on its lock: give the second writer time
        # to reach BEGIN IMMEDIATE (the outcome is the same either way).
        return lambda: time.sleep(0.3)


class TestSqliteSinkModes(UpsertSinkContract, ReplaceSinkContract, EvolveSinkContract):
    """The `sqlite` sink passes the upsert, replace and drift contracts."""

    @pytest.fixture
    def db(self, tmp_path: Path) -> Path:
        return tmp_path / "out.db"

    @pytest.fixture
    def sink(self, db: Path) -> SqliteSink:
        return make_sink(db)

    @pytest.fixture
    def base_options(self) -> dict[str, Any]:
        return {"table": "people"}

    @pytest.fixture
    def select(self, db: Path) -> Callable[[str, list[str]], list[Any]]:
        def select(table: str, columns: list[str]) -> list[Any]:
            names = ", ".join(f'"{c}"' for c in columns)
            return fetch(db, f'SELECT {names} FROM "{table}" ORDER BY {names}')

        return select

    @pytest.fixture
    def columns_of(self, db: Path) -> Callable[[str], set[str] | None]:
        def columns_of(table: str) -> set[str] | None:
            rows = fetch(db, "SELECT name FROM pragma_table_info(?)", table)
            return {name for (name,) in rows} or None

        return columns_of

    @pytest.fixture
    def wait_until_blocked(self) -> Callable[[], None]:
        return lambda: time.sleep(0.3)


def test_upsert_creates_one_unique_index_and_replace_recreates_the_run_index(
    tmp_path: Path,
) -> None:
    db = tmp_path / "t.db"
    sink = make_sink(db)
    upsert = {"table": "t", "write_mode": "upsert", "key": ["id"]}
    sink.prepare(upsert, keyed([]).schema)
    sink.prepare(upsert, keyed([]).schema)
    replace = {"table": "r", "write_mode": "replace"}
    sink.prepare(replace, keyed([]).schema, run_id=3)
    sink.finalize(replace, run_id=3)

    assert fetch(db, "SELECT name, tbl_name FROM sqlite_master WHERE type = 'index' "
                 "ORDER BY 1") == [
        ("r_run_chunk_idx", "r"),
        ("t_key_idx", "t"),
        ("t_run_chunk_idx", "t"),
    ]  # fmt: skip


def test_the_registry_finds_the_plugin() -> None:
    assert get_plugin("sqlite") is SqlitePlugin


def test_every_type_is_stored_exactly(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    table = pa.table(
        {
            "text": ["a", "", None],
            "ts_tz": pa.array(
                [dt.datetime(2024, 1, 1, 10, 0, 0, 123456, tzinfo=dt.UTC), None, None],
                pa.timestamp("us", "Europe/Paris"),
            ),
            "ts_ns": pa.array([1_700_000_000_123_456_789, None, 0], pa.timestamp("ns")),
            "flag": [True, False, None],
            "day": pa.array([dt.date(2024, 2, 29), None, dt.date(1, 1, 1)]),
            "amount": pa.array(
                [decimal.Decimal("1.10"), None, decimal.Decimal("-0.01")],
                pa.decimal128(5, 2),
            ),
            "n": pa.array([2**63 - 1, None, -1], pa.int64()),
            "x": [0.5, None, -1e300],
            "doc": pa.array(['{"a": 1}', None, "[]"], pa.json_()),
            SOURCE_REF_COLUMN: ["r#1", "r#2", "r#3"],
        }
    )
    sink = make_sink(db)
    sink.prepare({"table": "t"}, table.schema)

    sink.write({"table": "t"}, table, run_id=5, chunk_seq=2, fence=lambda: True)

    assert fetch(db, "SELECT name, type FROM pragma_table_info('t')") == [
        ("text", "TEXT"),
        ("ts_tz", "TIMESTAMPTZ"),
        ("ts_ns", "TIMESTAMP"),
        ("flag", "BOOLEAN"),
        ("day", "DATE"),
        ("amount", "TEXT"),
        ("n", "INTEGER"),
        ("x", "REAL"),
        ("doc", "TEXT"),
        ("_run_id", "INTEGER"),
        ("_chunk_seq", "INTEGER"),
        ("_source_ref", "TEXT"),
    ]
    assert fetch(db, "SELECT * FROM t ORDER BY _source_ref") == [
        (
            "a",
            "2024-01-01T10:00:00.123456+00:00",
            "2023-11-14T22:13:20.123456",
            1,
            "2024-02-29",
            "1.10",
            2**63 - 1,
            0.5,
            '{"a": 1}',
            5,
            2,
            "r#1",
        ),
        ("", None, None, 0, None, None, None, None, None, 5, 2, "r#2"),
        (
            None,
            None,
            "1970-01-01T00:00:00.000000",
            None,
            "0001-01-01",
            "-0.01",
            -1,
            -1e300,
            "[]",
            5,
            2,
            "r#3",
        ),
    ]


def test_prepare_refuses_an_existing_table_that_lacks_columns(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE old (x TEXT)")

    with pytest.raises(TerminalError, match="lacks column"):
        make_sink(db).prepare({"table": "old"}, pa.schema([("x", pa.string())]))


def test_writing_to_a_missing_table_is_terminal(tmp_path: Path) -> None:
    with pytest.raises(TerminalError, match="no such table"):
        make_sink(tmp_path / "t.db").write(
            {"table": "nope"},
            pa.table({"x": ["a"]}),
            run_id=1,
            chunk_seq=0,
            fence=lambda: True,
        )


def test_a_locked_database_is_transient(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    sink = make_sink(db, busy_timeout=0.1)
    sink.prepare({"table": "t"}, pa.schema([("x", pa.string())]))
    with closing(sqlite3.connect(db, isolation_level=None)) as holder:
        holder.execute("BEGIN IMMEDIATE")

        with pytest.raises(TransientError, match="locked"):
            sink.write(
                {"table": "t"},
                pa.table({"x": ["a"]}),
                run_id=1,
                chunk_seq=0,
                fence=lambda: True,
            )


def test_check(tmp_path: Path) -> None:
    assert make_sink(tmp_path / "new.db").check().ok is True
    assert make_sink(tmp_path / "missing-dir" / "x.db").check().ok is False


def test_a_relative_path_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        SqlitePlugin.load_config({"path": "out.db"})

    assert list(caught.value.errors) == ["path"]


def test_dataset_name(tmp_path: Path) -> None:
    name = make_sink(tmp_path / "out.db").dataset_name({"table": "flights"})

    assert name == f"sqlite://{tmp_path}/out.db/flights"
