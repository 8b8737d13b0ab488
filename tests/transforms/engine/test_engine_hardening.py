"""The DuckDB connection cannot reach files, the network or its own settings."""

from __future__ import annotations

import os
from typing import Any

import duckdb
import pytest

from transforms.engine import StepConfigError, compile_steps


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        pytest.param(
            "read_csv('/etc/passwd')",
            "function read_csv() is not allowed",
            id="read_csv",
        ),
        pytest.param(
            "COPY (SELECT 1) TO '/tmp/out.csv'",
            "statements are not allowed (COPY)",
            id="copy",
        ),
    ],
)
def test_the_parser_check_refuses_file_access_at_compile_time(
    expr: str, message: str
) -> None:
    steps = [
        {"type": "map", "fields": [{"name": "leak", "expr": expr, "type": "string"}]}
    ]

    with pytest.raises(StepConfigError) as raised:
        compile_steps(steps)

    assert str(raised.value) == f"steps[0].fields[0] (leak): {message}"


@pytest.mark.parametrize(
    ("sql", "error", "message"),
    [
        pytest.param(
            "SELECT * FROM read_csv('/etc/passwd')",
            duckdb.PermissionException,
            'Cannot access file "/etc/passwd"',
            id="read_csv",
        ),
        pytest.param(
            "COPY (SELECT 1) TO '/tmp/engine-hardening-test.csv'",
            duckdb.PermissionException,
            "file system operations are disabled",
            id="copy",
        ),
        pytest.param(
            "ATTACH '/tmp/engine-hardening-test.db' AS x",
            duckdb.PermissionException,
            "file system operations are disabled",
            id="attach",
        ),
        pytest.param(
            "INSTALL httpfs",
            duckdb.PermissionException,
            "file system operations are disabled",
            id="install",
        ),
        pytest.param(
            "LOAD httpfs",
            duckdb.PermissionException,
            "Loading external extensions is disabled",
            id="load",
        ),
        pytest.param(
            "SET enable_external_access = true",
            duckdb.InvalidInputException,
            "the configuration has been locked",
            id="unlock-external-access",
        ),
        pytest.param(
            "SET lock_configuration = false",
            duckdb.InvalidInputException,
            "the configuration has been locked",
            id="unlock-configuration",
        ),
        pytest.param(
            "SET threads = 8",
            duckdb.InvalidInputException,
            "the configuration has been locked",
            id="threads",
        ),
    ],
)
def test_duckdb_itself_refuses_outside_access(
    compile_pipeline: Any, sql: str, error: type[Exception], message: str
) -> None:
    pipeline = compile_pipeline([])

    with pytest.raises(error, match=message):
        pipeline.con.sql(sql).fetchall()


def test_connection_settings(compile_pipeline: Any) -> None:
    pipeline = compile_pipeline(
        [], timezone="America/New_York", threads=1, memory_limit="512MB"
    )

    rows = pipeline.con.sql(
        "SELECT current_setting('TimeZone'), current_setting('threads'), "
        "current_setting('memory_limit'), current_setting('enable_external_access'), "
        "current_setting('autoload_known_extensions'), "
        "current_setting('autoinstall_known_extensions'), "
        "current_setting('lock_configuration')"
    ).fetchall()

    assert rows == [("America/New_York", 1, "488.2 MiB", False, False, False, True)]


def test_spills_go_to_a_directory_of_this_process_under_tmp(
    compile_pipeline: Any, tmp_path: Any, monkeypatch: Any
) -> None:
    # Not the working directory: a container's root (and so /app) is read-only.
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    pipeline = compile_pipeline([], memory_limit="100MB")
    spill = tmp_path / f"dis-duckdb-{os.getpid()}"
    [(directory,)] = pipeline.con.sql(
        "SELECT current_setting('temp_directory')"
    ).fetchall()
    assert directory == str(spill)
    # An aggregate larger than the memory limit spills there and completes.
    [(groups,)] = pipeline.con.sql(
        "SELECT count(*) FROM (SELECT range % 4000037 AS k, count(*) "
        "FROM range(10000000) GROUP BY k)"
    ).fetchall()
    assert groups == 4_000_037
    assert spill.is_dir()
    assert not (tmp_path / ".tmp").exists()
