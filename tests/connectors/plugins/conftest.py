"""Fixtures of the connector plugin tests: a private PostgreSQL schema per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from psycopg import sql

from tests.connectors.plugins.pgtools import PG_PASSWORD, PG_SETTINGS, pg_connect


@pytest.fixture(scope="session", autouse=True)
def _close_postgres_pools() -> Iterator[None]:
    """Close the plugin's shared connection pools when the session ends."""
    yield
    from connectors.plugins.sql.postgres import close_pools

    close_pools()


@pytest.fixture
def pg_config() -> dict[str, Any]:
    """A loaded `postgres` connector config pointing at the test server."""
    from connectors.plugins.sql import PostgresPlugin

    secrets = {"password": PG_PASSWORD} if PG_PASSWORD else {}
    return PostgresPlugin.load_config(dict(PG_SETTINGS), secrets)


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A uniquely named schema, dropped with everything in it after the test."""
    name = f"test_plugins_{uuid.uuid4().hex[:12]}"
    with pg_connect() as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with pg_connect() as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


MYSQL_SETTINGS: dict[str, Any] = {
    "host": os.environ.get("TEST_MYSQL_HOST", "127.0.0.1"),
    "port": int(os.environ.get("TEST_MYSQL_PORT", "3306")),
    "user": os.environ.get("TEST_MYSQL_USER", "root"),
}


@pytest.fixture(scope="session", autouse=True)
def _dispose_sqlalchemy_engines() -> Iterator[None]:
    """Dispose of the SQL plugins' shared SQLAlchemy engines when the session ends."""
    yield
    from connectors.plugins.sql.alchemy import dispose_engines

    dispose_engines()


@pytest.fixture
def mysql_db() -> Iterator[str]:
    """A uniquely named MariaDB database, dropped after the test."""
    import pymysql

    name = f"test_plugins_{uuid.uuid4().hex[:12]}"
    conn = pymysql.connect(**MYSQL_SETTINGS, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        yield name
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


@pytest.fixture
def mysql_config(mysql_db: str) -> dict[str, Any]:
    """A loaded `mysql` connector config on the test's private database."""
    from connectors.plugins.sql import MysqlPlugin

    return MysqlPlugin.load_config({**MYSQL_SETTINGS, "database": mysql_db})
