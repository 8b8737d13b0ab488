"""The `mysql` source and sink against the real MariaDB server."""

from __future__ import annotations

import time
import traceback
import uuid
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pymysql
import pytest

from connectors.base import SOURCE_REF_COLUMN
from connectors.exceptions import ConfigError, TerminalError, TransientError
from connectors.plugins.sql import MysqlPlugin
from connectors.plugins.sql.mysql import MysqlSink, MysqlSource
from connectors.registry import get_plugin
from tests.connectors.contract import (
    EvolveSinkContract,
    SinkContract,
    SourceContract,
    UpsertSinkContract,
)
from tests.connectors.plugins.conftest import MYSQL_SETTINGS
from tests.helpers import free_port


def query(database: str, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    conn = pymysql.connect(**MYSQL_SETTINGS, database=database, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(statement, params or None)
            return list(cur.fetchall())
    finally:
        conn.close()


def make_sink(config: dict[str, Any]) -> MysqlSink:
    sink = MysqlPlugin.sink(config)
    assert isinstance(sink, MysqlSink)
    return sink


def _lock_waiter() -> Callable[[], None]:
    def wait() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            rows = query(
                "mysql",
                "SELECT count(*) FROM information_schema.processlist "
                "WHERE info LIKE 'SELECT GET_LOCK(%%'",
            )
            if rows[0][0]:
                return
            time.sleep(0.02)
        pytest.fail("the second writer never waited for the chunk lock")

    return wait


class TestMysqlSinkContract(SinkContract):
    """The `mysql` sink passes the shared sink contract."""

    @pytest.fixture
    def sink(self, mysql_config: dict[str, Any]) -> MysqlSink:
        return make_sink(mysql_config)

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
    def refs_of(self, mysql_db: str) -> Callable[[int, int], list[str]]:
        def refs_of(run_id: int, chunk_seq: int) -> list[str]:
            rows = query(
                mysql_db,
                "SELECT _source_ref FROM people WHERE _run_id = %s "
                "AND _chunk_seq = %s ORDER BY 1",
                run_id,
                chunk_seq,
            )
            return [ref for (ref,) in rows]

        return refs_of

    @pytest.fixture
    def wait_until_blocked(self) -> Callable[[], None]:
        return _lock_waiter()


class TestMysqlSinkModes(UpsertSinkContract, EvolveSinkContract):
    """The `mysql` sink passes the upsert and drift contracts."""

    @pytest.fixture
    def sink(self, mysql_config: dict[str, Any]) -> MysqlSink:
        return make_sink(mysql_config)

    @pytest.fixture
    def base_options(self) -> dict[str, Any]:
        return {"table": "people"}

    @pytest.fixture
    def select(self, mysql_db: str) -> Callable[[str, list[str]], list[Any]]:
        def select(table: str, columns: list[str]) -> list[Any]:
            names = ", ".join(f"`{c}`" for c in columns)
            return query(mysql_db, f"SELECT {names} FROM `{table}` ORDER BY {names}")

        return select

    @pytest.fixture
    def columns_of(self, mysql_db: str) -> Callable[[str], set[str] | None]:
        def columns_of(table: str) -> set[str] | None:
            rows = query(
                mysql_db,
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = %s AND table_name = %s",
                mysql_db,
                table,
            )
            return {name for (name,) in rows} or None

        return columns_of

    @pytest.fixture
    def wait_until_blocked(self) -> Callable[[], None]:
        return _lock_waiter()


class TestMysqlSourceContract(SourceContract):
    """The `mysql` source passes the shared source contract."""

    @pytest.fixture
    def source(self, mysql_config: dict[str, Any]) -> MysqlSource:
        source = MysqlPlugin.source(mysql_config)
        assert isinstance(source, MysqlSource)
        return source

    @pytest.fixture
    def read_options(self, mysql_db: str) -> dict[str, Any]:
        query(mysql_db, "CREATE TABLE people (id INT PRIMARY KEY, name TEXT)")
        query(
            mysql_db,
            "INSERT INTO people VALUES "
            + ", ".join(f"({n}, 'p{n}')" for n in range(1, 8)),
        )
        return {"table": "people"}

    @pytest.fixture
    def expected_refs(self) -> list[str]:
        return [f"people#{n}" for n in range(1, 8)]


def test_the_registry_finds_the_plugin() -> None:
    assert get_plugin("mysql") is MysqlPlugin


def test_a_query_is_read_with_typed_columns(
    mysql_config: dict[str, Any], mysql_db: str
) -> None:
    query(
        mysql_db,
        "CREATE TABLE t (a INT, b VARCHAR(10), n DECIMAL(8,3), d DATETIME(6))",
    )
    query(
        mysql_db,
        "INSERT INTO t VALUES (1, 'x', 1.5, '2024-01-01 10:00:00.5'), "
        "(2, 'y', NULL, NULL), (3, 'z', -2, '2024-01-02 00:00:00')",
    )
    options = {"query": "SELECT a, b, n, d FROM t WHERE a < 3", "key": "a"}
    MysqlPlugin.validate_options("source", options)
    source = MysqlPlugin.source(mysql_config)

    batches = [
        b for c in source.plan(options, chunk_rows=1) for b in source.read(options, c)
    ]
    table = pa.Table.from_batches(batches)

    assert [str(f.type) for f in table.schema] == [
        "int64", "string", "decimal128(8, 3)", "timestamp[us]", "string",
    ]  # fmt: skip
    assert table.column(SOURCE_REF_COLUMN).to_pylist() == ["query#1", "query#2"]


@pytest.mark.parametrize(
    "statement",
    [
        pytest.param("SELECT LOAD_FILE('/etc/passwd')", id="load-file"),
        pytest.param("SELECT SLEEP(10)", id="sleep"),
        pytest.param("DELETE FROM t", id="delete"),
        pytest.param("SELECT * FROM t FOR UPDATE", id="for-update"),
    ],
)
def test_a_query_that_does_more_than_read_is_refused(statement: str) -> None:
    with pytest.raises(ConfigError) as caught:
        MysqlPlugin.validate_options("source", {"query": statement, "key": "id"})

    assert list(caught.value.errors) == ["query"]


def test_replace_is_refused(mysql_config: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="append and upsert"):
        make_sink(mysql_config).dataset_name({"table": "t", "write_mode": "replace"})


@pytest.mark.parametrize(
    ("change", "error"),
    [
        pytest.param({"port": "free"}, TransientError, id="unreachable"),
        pytest.param({"user": "nobody_here"}, TerminalError, id="wrong-user"),
    ],
)
def test_the_password_never_shows_in_errors(
    change: dict[str, Any], error: type[Exception]
) -> None:
    password = f"pw-{uuid.uuid4().hex}"
    settings = {**MYSQL_SETTINGS, "database": "mysql", "connect_timeout": 2, **change}
    if settings["port"] == "free":
        settings["port"] = free_port()
    config = MysqlPlugin.load_config(settings, {"password": password})
    sink = make_sink(config)
    source = MysqlPlugin.source(config)

    result = sink.check()
    errors = []
    for call in (
        lambda: sink.prepare({"table": "t"}, pa.schema([("x", pa.string())])),
        lambda: list(source.plan({"table": "t"}, chunk_rows=5)),
    ):
        with pytest.raises(error) as caught:
            call()
        errors.append("".join(traceback.format_exception(caught.value)))

    assert result.ok is False
    assert password not in result.message
    assert source.check().ok is False
    assert all(password not in text for text in errors)


def test_a_socket_path_host_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        MysqlPlugin.load_config({**MYSQL_SETTINGS, "host": "/run/mysqld/mysqld.sock",
                                 "database": "x"})  # fmt: skip

    assert list(caught.value.errors) == ["host"]
