"""The reference cache of enrich steps: in the process, in Redis, or read again.

Redis is the machine's; a Redis that cannot answer is a closed port of this host.
"""

from __future__ import annotations

import socket
import sqlite3
from contextlib import closing

import pytest
import redis
from django.conf import settings

from integration import references
from tests.helpers import airlines_reference

pytestmark = pytest.mark.django_db

COLUMNS = ["carrier", "name"]


@pytest.fixture
def airlines(tmp_path):
    """A reference read from a SQLite table, and that table's file."""
    ref, db = airlines_reference(tmp_path)
    references.clear_local()
    yield ref, db
    references.clear_local()
    redis.Redis.from_url(settings.REDIS_URL).delete(references.cache_key(ref, COLUMNS))


def _names(table) -> list[tuple[str, str]]:
    return sorted(zip(*table.select(COLUMNS).to_pydict().values(), strict=True))


def _rename_united(db) -> None:
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("UPDATE airlines SET name = 'Renamed' WHERE carrier = 'UA'")
        conn.commit()


def test_a_reference_is_read_once_then_served_from_the_process_and_redis(airlines):
    ref, db = airlines
    first, where = references.load("airlines", ref, COLUMNS)
    assert where == {"source": "miss", "age_seconds": 0.0}
    assert _names(first) == [("AA", "American"), ("UA", "United")]
    _rename_united(db)  # the caches, not the connector, answer from now on

    again, where = references.load("airlines", ref, COLUMNS)
    assert where["source"] == "memory"
    assert again is first
    references.clear_local()  # another worker process: Redis answers
    shared, where = references.load("airlines", ref, COLUMNS)
    assert where["source"] == "redis"
    assert _names(shared) == [("AA", "American"), ("UA", "United")]


def test_a_redis_that_cannot_answer_costs_the_cache_not_the_chunk(airlines, settings):
    """A Redis restarting (here: nothing listens) once failed the chunk with
    `ConnectionError`; the reference is read from its connector instead."""
    ref, db = airlines
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    settings.REDIS_URL = f"redis://127.0.0.1:{closed_port}/0"

    table, where = references.load("airlines", ref, COLUMNS)

    assert where == {"source": "miss", "age_seconds": 0.0}
    assert _names(table) == [("AA", "American"), ("UA", "United")]
    _rename_united(db)
    references.clear_local()
    table, where = references.load("airlines", ref, COLUMNS)
    assert where["source"] == "miss"  # read again, nothing cached in Redis
    assert ("UA", "Renamed") in _names(table)
