"""What the PostgreSQL source and sink share: config, pooled connections, errors.

Connections are built from validated fields as keyword arguments (never a DSN) and
pooled per worker process. Errors are classed by what to do next and never carry the
password. Pure Python (no Django).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import marshmallow
import psycopg
from marshmallow import fields, validate
from psycopg_pool import ConnectionPool, PoolTimeout

from connectors.base import CheckResult
from connectors.exceptions import (
    ConfigError,
    ConnectorError,
    TerminalError,
    TransientError,
)

SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
APPLICATION_NAME = "dis-connector"
#: Seconds a caller waits for a pooled connection on top of `connect_timeout`.
POOL_WAIT_SECONDS = 20.0


def validate_host(value: str) -> None:
    """Refuse a host that is a socket path or smells of a DSN fragment.

    Raises:
        marshmallow.ValidationError: for such a host.
    """
    # A leading '/' would select a Unix socket directory and '=' smells of a DSN
    # fragment: both are refused so the config stays a plain host name or address.
    if not value or value.startswith("/") or "=" in value or value != value.strip():
        raise marshmallow.ValidationError(
            "Must be a host name or IP address (no socket path, no '=')."
        )


class PostgresConfig(marshmallow.Schema):
    """Config of a PostgreSQL connector; `password` comes from the credential."""

    host = fields.String(required=True, validate=validate_host)
    port = fields.Integer(load_default=5432, validate=validate.Range(1, 65535))
    database = fields.String(required=True, validate=validate.Length(min=1))
    user = fields.String(required=True, validate=validate.Length(min=1))
    password = fields.String(
        load_default=None, allow_none=True, metadata={"secret": True}
    )
    sslmode = fields.String(load_default="prefer", validate=validate.OneOf(SSL_MODES))
    connect_timeout = fields.Integer(load_default=10, validate=validate.Range(1, 300))
    pool_size = fields.Integer(load_default=4, validate=validate.Range(1, 64))


def connection_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """psycopg connection keyword arguments from a loaded config (never a raw DSN).

    Raises:
        ConfigError: a host that is a socket path or carries '='.
    """
    try:
        validate_host(str(config.get("host", "")))
    except marshmallow.ValidationError:
        raise ConfigError("host must be a host name or IP address") from None
    kwargs: dict[str, Any] = {
        "host": config["host"],
        "port": int(config.get("port", 5432)),
        "dbname": config["database"],
        "user": config["user"],
        "sslmode": config.get("sslmode", "prefer"),
        "connect_timeout": int(config.get("connect_timeout", 10)),
        "application_name": APPLICATION_NAME,
        "autocommit": True,
    }
    if config.get("password"):
        kwargs["password"] = config["password"]
    return kwargs


_POOLS: dict[str, ConnectionPool] = {}
_POOLS_LOCK = threading.Lock()


def shared_pool(config: dict[str, Any]) -> ConnectionPool:
    """The process's connection pool for `config`, created on first use.

    Keyed by a hash of the connection settings and the process id, so a forked worker
    never reuses its parent's sockets. Before creating a pool, one direct connection
    is made and closed: a pool would hide why it cannot connect (wrong port, unknown
    database) behind a timeout, while the direct attempt fails at once and clearly.
    The pool's size (`pool_size`) bounds how many reads and writes of the connector
    run at once in the process.

    Raises:
        psycopg.Error: the direct connection failed.
    """
    kwargs = connection_kwargs(config)
    size = int(config.get("pool_size", 4))
    material = json.dumps([os.getpid(), size, kwargs], sort_keys=True, default=str)
    key = hashlib.sha256(material.encode()).hexdigest()
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None or pool.closed:
            psycopg.connect(**kwargs).close()
            pool = ConnectionPool(
                kwargs=kwargs,
                min_size=0,
                max_size=size,
                open=True,
                timeout=kwargs["connect_timeout"] + POOL_WAIT_SECONDS,
                check=ConnectionPool.check_connection,
                name=f"dis-{kwargs['host']}:{kwargs['port']}/{kwargs['dbname']}",
            )
            _POOLS[key] = pool
    return pool


def close_pools() -> None:
    """Close every pool of this process (worker shutdown, tests)."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        pool.close()


def redact(text: str, password: str | None) -> str:
    """`text` without the password and without any `password=...` fragment."""
    if password:
        text = text.replace(password, "***")
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", text)


class PostgresClient:
    """Connection handling shared by `PostgresSource` and `PostgresSink`.

    Subclasses set `config` and `_kwargs` (from `connection_kwargs`).
    """

    config: dict[str, Any]
    _kwargs: dict[str, Any]

    @property
    def _target(self) -> str:
        return f"{self._kwargs['host']}:{self._kwargs['port']}/{self._kwargs['dbname']}"

    def check(self) -> CheckResult:
        """Connect directly (not through the pool) and run `SELECT 1`."""
        user = self._kwargs["user"]
        try:
            with psycopg.connect(**self._kwargs) as conn:
                row = conn.execute(
                    "SELECT 1, current_setting('server_version')"
                ).fetchone()
        except psycopg.Error as exc:
            return CheckResult(
                False, f"cannot connect to {self._target} as {user}: {self._text(exc)}"
            )
        version = row[1] if row else "?"
        return CheckResult(
            True, f"connected to {self._target} as {user} (PostgreSQL {version})"
        )

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        with shared_pool(self.config).connection() as conn:
            yield conn

    def _text(self, exc: BaseException) -> str:
        text = " ".join(str(exc).split())
        return redact(text, self._kwargs.get("password"))

    def _failure(self, exc: BaseException, doing: str) -> ConnectorError:
        """Class a driver error by what to do next; never with the password in it."""
        if isinstance(exc, PoolTimeout):
            # The pool hides why it could not connect: ask the server directly once.
            try:
                psycopg.connect(**self._kwargs).close()
            except psycopg.Error as direct:
                exc = direct
            else:
                return TransientError(
                    f"{doing}: no free connection to {self._target} in the pool"
                )
        message = f"{doing} on {self._target}: {self._text(exc)}"
        sqlstate = getattr(exc, "sqlstate", None) or ""
        text = str(exc)
        if (
            sqlstate.startswith("28")  # invalid authorization
            or sqlstate == "3D000"  # database does not exist
            or "authentication failed" in text
            or ("database" in text and "does not exist" in text)
        ):
            return TerminalError(message)
        if sqlstate in (
            "25006",
            "40001",
            "40P01",
        ):  # read-only, serialization, deadlock
            return TransientError(message)
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            return TransientError(message)
        return TerminalError(message)
