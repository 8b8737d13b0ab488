"""Shared fixtures: API clients, connectors, pipelines, a real Celery worker."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import unique

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def user(db):
    from django.contrib.auth import get_user_model

    return get_user_model().objects.create_user(unique("user"), password="pw-123456!")


@pytest.fixture
def admin_user_obj(db):
    from django.contrib.auth import get_user_model

    return get_user_model().objects.create_superuser(
        unique("admin"), "admin@example.com", "pw-123456!"
    )


@pytest.fixture
def api(user):
    """An API client authenticated with a real (hashed, expiring) knox token."""
    from knox.models import AuthToken
    from rest_framework.test import APIClient

    _, token = AuthToken.objects.create(user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    return client


@pytest.fixture
def anon():
    from rest_framework.test import APIClient

    return APIClient()


@pytest.fixture
def generator_connector(db):
    from connectors.models import Connector

    return Connector.objects.create(
        name=unique("gen"), kind="generator", config={"rows": 10}
    )


@pytest.fixture
def sqlite_sink(db, tmp_path):
    from connectors.models import Connector

    return Connector.objects.create(
        name=unique("sqlite"), kind="sqlite", config={"path": str(tmp_path / "w.db")}
    )


# --- A real Celery worker process ---------------------------------------------------


def _test_database_url() -> str:
    from django.db import connection

    s = connection.settings_dict
    return (
        f"postgres://{s['USER']}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/"
        f"{s['NAME']}"
    )


class Worker:
    """A `celery worker` subprocess on the test database, Redis broker and stage."""

    def __init__(
        self,
        log_path: Path,
        *,
        concurrency: int = 1,
        env: dict[str, str] | None = None,
    ) -> None:
        self.log_path = log_path
        self.concurrency = concurrency
        #: Extra environment for the worker process (its own broker, time limits).
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "config.settings.test",
            "DATABASE_URL": _test_database_url(),
            "PYTHONUNBUFFERED": "1",
            **self.env,
        }
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "config",
                "worker",
                "-Q",
                "control,io,cpu",
                "--concurrency",
                str(self.concurrency),
                "--pool",
                "prefork",
                "--without-mingle",
                "--without-gossip",
                "--without-heartbeat",
                "--loglevel",
                "INFO",
            ],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"worker exited: {self.log_path.read_text()[-3000:]}"
                )
            if b"ready." in self.log_path.read_bytes():
                return
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready: {self.log_path.read_text()[-3000:]}")

    def children(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True
        ).stdout
        return [int(p) for p in out.split()]

    def kill(self) -> None:
        """SIGKILL the main process and its pool children, as in a machine crash."""
        assert self.proc is not None
        doomed = [self.proc.pid, *self.children()]
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)

    def sigterm(self) -> None:
        """SIGTERM the main process: a warm shutdown (running tasks finish first)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def purge_broker() -> None:
    """Empty the queues, and forget what earlier tests' workers left delivered but
    unacknowledged: a worker a test SIGKILLed leaves its messages in Redis's unacked
    hash until the visibility timeout (over an hour with the test settings), which
    a later test waiting for the broker to drain would wait for. Only called while
    no test worker runs."""
    from config.celery_app import app

    with app.connection_for_write() as conn:
        channel = conn.default_channel
        for queue in ("control", "io", "cpu"):
            # A queue that does not exist yet has nothing to purge.
            with contextlib.suppress(Exception):
                channel.queue_purge(queue)
        channel.client.delete(
            channel.unacked_key, channel.unacked_index_key, channel.unacked_mutex_key
        )


@pytest.fixture
def worker_factory(transactional_db, tmp_path) -> Iterator:
    """Start real worker processes; all are stopped (and children reaped) after."""
    workers: list[Worker] = []
    purge_broker()

    def start(name: str = "worker", **kwargs) -> Worker:
        w = Worker(tmp_path / f"{name}-{len(workers)}.log", **kwargs).start()
        workers.append(w)
        return w

    yield start
    for w in workers:
        w.stop()
    purge_broker()


# --- What the service's own processes said, on a failure ---------------------------

_LOG_SIGNS = ("Traceback", "ERROR", "CRITICAL", "Error", "raised", "  File ")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that ran worker or server processes gets their error lines
    (from the `*.log` files in its tmp_path) as a report section, so a failure in
    CI explains itself without the files."""
    report = yield
    tmp_path = getattr(item, "funcargs", {}).get("tmp_path")
    if report.failed and call.when == "call" and isinstance(tmp_path, Path):
        for log in sorted(tmp_path.rglob("*.log")):
            lines = log.read_text(errors="replace").splitlines()
            signs = [line for line in lines if any(s in line for s in _LOG_SIGNS)]
            if signs:
                report.sections.append(
                    (f"errors in {log.name}", "\n".join(signs[-80:])[-12000:])
                )
    return report
