"""The metadata database's backend: Django's PostgreSQL backend whose health check
sends `SELECT 1` only when the connection's socket has something to read."""

from __future__ import annotations

import select
import time

import psycopg
import pytest
from django.conf import settings
from django.db import connection
from django.db.backends.postgresql import base as django_postgresql

from integration.models import Run

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def select_one(monkeypatch):
    """Counts Django's own check (`SELECT 1`), still answering as it would."""
    calls = []
    original = django_postgresql.DatabaseWrapper.is_usable

    def counted(self):
        calls.append(self.alias)
        return original(self)

    monkeypatch.setattr(django_postgresql.DatabaseWrapper, "is_usable", counted)
    return calls


def _backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def test_the_settings_use_this_backend_with_health_checks():
    assert settings.DATABASES["default"]["ENGINE"] == "config.postgres"
    assert settings.DATABASES["default"]["CONN_HEALTH_CHECKS"] is True
    assert connection.vendor == "postgresql"


def test_a_quiet_idle_connection_is_usable_without_a_query(select_one):
    _backend_pid()
    assert connection.is_usable() is True
    assert select_one == []


def test_a_connection_inside_a_transaction_is_checked_with_a_query(select_one):
    from django.db import transaction

    with transaction.atomic():
        _backend_pid()
        assert connection.is_usable() is True
    assert select_one == ["default"]


def test_a_session_the_server_ended_is_replaced_before_the_next_query():
    old = _backend_pid()
    dsn = connection.get_connection_params()
    with psycopg.connect(
        host=dsn.get("host"),
        port=dsn.get("port"),
        user=dsn.get("user"),
        dbname=dsn["dbname"],
        autocommit=True,
    ) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [old])
    fd = connection.connection.fileno()
    deadline = time.monotonic() + 10
    while not select.select([fd], [], [], 0.1)[0]:  # the server's goodbye arrives
        assert time.monotonic() < deadline
    assert connection.is_usable() is False
    # What Django does before a request's first query: close, then reconnect.
    connection.health_check_done = False
    connection.close_if_health_check_failed()
    assert Run.objects.count() == 0
    assert _backend_pid() != old
