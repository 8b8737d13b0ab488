"""The `sqlite` source: a table or read-only query of a SQLite file."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from connectors.base import SOURCE_REF_COLUMN
from connectors.exceptions import ConfigError
from connectors.plugins.sql import SqlitePlugin
from connectors.plugins.sql.sqlite import SqliteSink, SqliteSource
from tests.connectors.contract import SourceContract, keyed


def make_source(path: Path) -> SqliteSource:
    source = SqlitePlugin.source(SqlitePlugin.load_config({"path": str(path)}))
    assert isinstance(source, SqliteSource)
    return source


class TestSqliteSourceContract(SourceContract):
    """The `sqlite` source passes the shared source contract."""

    @pytest.fixture
    def db(self, tmp_path: Path) -> Path:
        path = tmp_path / "in.db"
        with closing(sqlite3.connect(path)) as conn:
            conn.execute("CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT)")
            conn.executemany(
                "INSERT INTO people VALUES (?, ?)", [(n, f"p{n}") for n in range(1, 8)]
            )
            conn.commit()
        return path

    @pytest.fixture
    def source(self, db: Path) -> SqliteSource:
        return make_source(db)

    @pytest.fixture
    def read_options(self) -> dict[str, Any]:
        return {"table": "people"}

    @pytest.fixture
    def expected_refs(self) -> list[str]:
        return [f"people#{n}" for n in range(1, 8)]


def test_rows_written_by_the_sink_read_back(tmp_path: Path) -> None:
    db = tmp_path / "round.db"
    sink = SqlitePlugin.sink(SqlitePlugin.load_config({"path": str(db)}))
    assert isinstance(sink, SqliteSink)
    options = {"table": "t", "write_mode": "upsert", "key": ["id"]}
    sink.prepare(options, keyed([]).schema)
    sink.write(options, keyed([(2, "b"), (1, "a")]), run_id=1, chunk_seq=0,
               fence=lambda: True)  # fmt: skip
    source = make_source(db)
    read = {"query": "SELECT id, name FROM t", "key": "id"}
    SqlitePlugin.validate_options("source", read)

    table = pa.Table.from_batches(
        [b for c in source.plan(read, chunk_rows=1) for b in source.read(read, c)]
    )

    assert table.to_pylist() == [
        {"id": 1, "name": "a", SOURCE_REF_COLUMN: "query#1"},
        {"id": 2, "name": "b", SOURCE_REF_COLUMN: "query#2"},
    ]


@pytest.mark.parametrize(
    "statement",
    [
        pytest.param("SELECT load_extension('x')", id="load-extension"),
        pytest.param("PRAGMA table_info(t)", id="pragma"),
        pytest.param("ATTACH DATABASE 'x' AS y", id="attach"),
        pytest.param("SELECT 1; DELETE FROM t", id="two-statements"),
    ],
)
def test_a_query_that_does_more_than_read_is_refused(statement: str) -> None:
    with pytest.raises(ConfigError) as caught:
        SqlitePlugin.validate_options("source", {"query": statement, "key": "id"})

    assert list(caught.value.errors) == ["query"]


def test_the_file_is_opened_read_only(tmp_path: Path) -> None:
    db = tmp_path / "ro.db"
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
        conn.execute("INSERT INTO t VALUES (1)")
        conn.commit()
    source = make_source(db)

    with source.engine.connect() as conn, pytest.raises(Exception, match="readonly"):
        conn.exec_driver_sql("INSERT INTO t VALUES (2)")
