"""The PostgreSQL server the plugin tests use (env `TEST_PG_*` overrides)."""

from __future__ import annotations

import os
from typing import Any

import psycopg

PG_SETTINGS: dict[str, Any] = {
    "host": os.environ.get("TEST_PG_HOST", "127.0.0.1"),
    "port": int(os.environ.get("TEST_PG_PORT", "5432")),
    "database": os.environ.get("TEST_PG_DATABASE", "postgres"),
    "user": os.environ.get("TEST_PG_USER", "postgres"),
}
PG_PASSWORD = os.environ.get("TEST_PG_PASSWORD")


def pg_connect() -> psycopg.Connection[Any]:
    """An autocommit admin connection to the test server."""
    return psycopg.connect(
        host=PG_SETTINGS["host"],
        port=PG_SETTINGS["port"],
        dbname=PG_SETTINGS["database"],
        user=PG_SETTINGS["user"],
        password=PG_PASSWORD,
        autocommit=True,
    )
