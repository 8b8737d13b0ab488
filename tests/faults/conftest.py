"""Fixtures for fault tests: numbered pipelines, a private Redis, the sink checks.

Every fault test loads the numbers 1..N and asks the sink how many are missing and
how many are there twice. A test that stops or flushes Redis gets its own
`redis-server` (AOF on, a free loopback port) so the machine's shared Redis, which
the rest of the suite uses, is never touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from kombu.utils.collections import eqhash

from tests.helpers import free_port, unique, wait_until

#: Worker environment that makes redelivery quick: a message whose worker is gone
#: comes back after 20 s (the visibility timeout stays above the hard time limit).
FAST_REDELIVERY = {
    "CELERY_TASK_TIME_LIMIT": "15",
    "CELERY_VISIBILITY_TIMEOUT": "20",
    "CELERY_UNACKED_RESTORE_INTERVAL": "1",
}

#: Fault-injecting connector kinds (see tests/faults/plugins.py).
FAULT_KINDS = (
    "crashing=tests.faults.plugins:CrashingPlugin,"
    "slowpg=tests.faults.plugins:SlowPostgresPlugin"
)

#: Map the generator's `id` (text) to an integer: the record number in the sink.
NUMBER_STEPS = [
    {
        "type": "map",
        "fields": [{"name": "id", "expr": "id", "type": "integer", "required": True}],
    }
]


# --- The sink ------------------------------------------------------------------------


@dataclass
class SinkDb:
    """The test database as a sink: connector configs, tables, the exact checks."""

    host: str
    port: int
    database: str
    user: str
    tables: list[str]

    def config(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "database": self.database,
            "user": self.user,
        }

    def new_table(self) -> str:
        self.tables.append(unique("f").replace("-", "_"))
        return self.tables[-1]

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with psycopg.connect(
            host=self.host, port=self.port, dbname=self.database, user=self.user
        ) as conn:
            return conn.execute(sql, params).fetchall()

    def missing_and_duplicates(self, table: str, total: int) -> tuple[int, int]:
        """(numbers of 1..total not in the table, rows that repeat a number)."""
        (row,) = self.query(
            f"SELECT {total} - count(DISTINCT id) FILTER (WHERE id BETWEEN 1 AND "
            f'{total}), count(*) - count(DISTINCT id) FROM "{table}"'
        )
        return int(row[0]), int(row[1])

    def row_versions(self, table: str) -> list[tuple]:
        """Every row's physical version (ctid, xmin): any rewrite changes it."""
        return self.query(
            f'SELECT id, ctid::text, xmin::text FROM "{table}" ORDER BY id'
        )


@pytest.fixture
def sink_db(transactional_db) -> Iterator[SinkDb]:
    """The test database as a sink; the tables the test made are dropped after."""
    from django.db import connection

    s = connection.settings_dict
    sink = SinkDb(
        host=s["HOST"] or "127.0.0.1",
        port=int(s["PORT"] or 5432),
        database=s["NAME"],
        user=s["USER"] or "postgres",
        tables=[],
    )
    yield sink
    # The sink's pools hold connections to the test database: close them so the
    # database can be dropped at the end of the session.
    from connectors.plugins.sql.pgcommon import close_pools

    close_pools()
    with psycopg.connect(
        host=sink.host,
        port=sink.port,
        dbname=sink.database,
        user=sink.user,
        autocommit=True,
    ) as conn:
        for table in sink.tables:
            conn.execute(f'DROP TABLE IF EXISTS "{table}"')


@pytest.fixture
def fault_kinds(monkeypatch) -> Iterator[None]:
    """The fault-injecting kinds, for this process and the workers it starts."""
    from connectors import registry

    monkeypatch.setenv("DIS_CONNECTOR_PATHS", FAULT_KINDS)
    registry.available_kinds.cache_clear()
    registry.get_plugin.cache_clear()
    yield
    registry.available_kinds.cache_clear()
    registry.get_plugin.cache_clear()


@pytest.fixture
def numbered(sink_db):
    """Make a pipeline loading the numbers 1..rows into a new sink table.

    Returns `make(rows, chunk_rows, window, sink_kind="postgres", **sink_config)` ->
    (pipeline, table).
    """
    from connectors.models import Connector
    from integration import services
    from integration.models import Pipeline

    def make(
        rows: int,
        *,
        chunk_rows: int,
        window: int,
        sink_kind: str = "postgres",
        **sink_config: Any,
    ):
        source = Connector.objects.create(
            name=unique("gen"), kind="generator", config={"rows": rows}
        )
        sink = Connector.objects.create(
            name=unique("sink"),
            kind=sink_kind,
            config={**sink_db.config(), **sink_config},
        )
        table = sink_db.new_table()
        pipeline = Pipeline.objects.create(
            name=unique("numbers"),
            source=source,
            steps=NUMBER_STEPS,
            sink=sink,
            sink_options={"table": table, "write_mode": "append"},
            chunk_rows=chunk_rows,
            max_in_flight=window,
            max_rejected_ratio=0.0,
        )
        services.freeze_version(pipeline)
        return pipeline, table

    return make


# --- A private Redis ------------------------------------------------------------------


class RedisServer:
    """A `redis-server` of the test's own, with AOF (`everysec`) in `directory`."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.binary = binary
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, db=db)

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--logfile",
                str(self.directory / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    "redis-server exited: "
                    + (self.directory / "redis.log").read_text()[-2000:]
                )
            try:
                return bool(self.client().ping())
            except Exception:  # noqa: BLE001 - not listening yet
                return False

        wait_until(ready, timeout=20, interval=0.05, what="redis-server to answer")
        return self

    def stop(self) -> None:
        """SIGTERM: Redis fsyncs its AOF and exits (a clean shutdown, no data lost)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def restart(self, *, down_seconds: float = 0) -> None:
        """Stop, stay down for `down_seconds` (an AOF being loaded), start again."""
        self.stop()
        time.sleep(down_seconds)
        self.start()


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


def _use_broker(url: str) -> None:
    """Make this process publish to `url` (Celery read its settings at import).

    Celery prefers the `CELERY_BROKER_URL` environment variable over its config,
    so the caller sets both.
    """
    from config.celery_app import app

    app.conf.broker_url = url
    app._pool = None
    app.amqp._producer_pool = None


def _forget_broker(url: str) -> None:
    """Close this process's pooled connections to `url` and drop the pools, so a
    later server on the same port starts from fresh ones."""
    from kombu import pools

    from config.celery_app import app

    conn = app.connection_for_write(url)
    for group in (pools.producers, pools.connections):
        with contextlib.suppress(KeyError):
            pool = dict.__getitem__(group, eqhash(conn))
            with contextlib.suppress(Exception):
                pool.force_close_all()
            del group[conn]
    conn.release()


@pytest.fixture
def own_redis(redis_server, settings, monkeypatch) -> Iterator[dict[str, str]]:
    """Broker and staged batches on the private Redis, for this process and workers.

    Yields the environment a worker needs to use it too. Request it before
    `worker_factory` so the workers are stopped before this Redis is.
    """
    from config.celery_app import app
    from integration import staging

    env = {
        "CELERY_BROKER_URL": redis_server.url(0),
        "REDIS_URL": redis_server.url(1),
        "DIS_STAGING_URL": redis_server.url(1),
    }
    original_broker = app.conf.broker_url
    for name, value in env.items():
        monkeypatch.setenv(name, value)
        setattr(settings, name, value)
    staging.stage.cache_clear()
    _use_broker(env["CELERY_BROKER_URL"])
    try:
        yield env
    finally:
        _forget_broker(env["CELERY_BROKER_URL"])
        monkeypatch.setenv("CELERY_BROKER_URL", original_broker)
        _use_broker(original_broker)
        staging.stage.cache_clear()


@pytest.fixture
def redis_workers(own_redis, worker_factory):
    """Start workers on the private Redis (with quick redelivery)."""

    def start(name: str = "worker", *, concurrency: int = 2, **env: str):
        return worker_factory(
            name,
            concurrency=concurrency,
            env={**own_redis, **FAST_REDELIVERY, **env},
        )

    return start


def chunk_states(run_id: int) -> dict[str, int]:
    from django.db.models import Count

    from integration.models import ChunkRun

    return dict(
        ChunkRun.objects.filter(run_id=run_id)
        .values_list("state")
        .annotate(n=Count("id"))
        .values_list("state", "n")
    )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
