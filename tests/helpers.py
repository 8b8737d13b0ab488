"""Small helpers shared by tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def unique(prefix: str) -> str:
    """A name no other test (or earlier run) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def wait_for_run(run_id: int, timeout: float = 180, *, reconcile_stale: int = 0):
    """Poll the database until the run is terminal; returns the run.

    With `reconcile_stale`, run the reconciler every 5 s as beat would, resending
    work quiet for that many seconds (after a worker was killed, a message it was
    about to publish is only ever resent by the reconciler).
    """
    from integration import housekeeping
    from integration.models import Run

    deadline = time.monotonic() + timeout
    next_reconcile = time.monotonic() + 5
    while time.monotonic() < deadline:
        run = Run.objects.get(pk=run_id)
        if run.is_terminal:
            return run
        if reconcile_stale and time.monotonic() > next_reconcile:
            housekeeping.reconcile(stale_seconds=reconcile_stale)
            next_reconcile = time.monotonic() + 5
        time.sleep(0.25)
    run = Run.objects.get(pk=run_id)
    chunks = list(
        run.chunks.values_list(
            "seq", "state", "attempts", "step", "step_open", "crashes", "step_owner"
        )
    )
    raise AssertionError(
        f"run {run_id} not finished after {timeout}s: {run.state}; chunks {chunks}"
    )


def run_chunk_steps(run_id: int, seq: int, token: str) -> None:
    """Run a chunk's chain (extract, transform, load) in this process, as the
    worker would: each completion may claim and send the next chunk."""
    from integration import tasks

    for step in (tasks.extract_chunk, tasks.transform_chunk, tasks.load_chunk):
        step(run_id, seq, str(token))


#: A DuckDB query that runs for minutes: long enough for any signal to land in it.
ENDLESS_QUERY = "SELECT count(*) FROM range(1000000000000) t(x) WHERE x % 7 = 3"


class Signalled(Exception):
    """What the handler `signal_during` installs raises (as billiard's SIGTERM
    handler raises SystemExit in a pool process)."""


@contextlib.contextmanager
def signal_during(seconds: float = 0.2) -> Iterator[None]:
    """Send this process SIGUSR2 after `seconds`, handled by a Python handler that
    raises `Signalled`, the way a Celery pool process handles its terminate signal."""

    def handler(signum: int, frame: object) -> None:
        raise Signalled(signum)

    previous = signal.signal(signal.SIGUSR2, handler)
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGUSR2))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR2, previous)


def airlines_reference(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    """A reference for enrich steps: a SQLite `airlines` table (UA United, AA
    American) behind a `sqlite` connector. Returns the pipeline's reference entry
    and the database file (to change the rows under it)."""
    import sqlite3
    from contextlib import closing

    from connectors.models import Connector

    db = tmp_path / "ref.db"
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE airlines (carrier TEXT PRIMARY KEY, name TEXT)")
        conn.executemany(
            "INSERT INTO airlines VALUES (?, ?)", [("UA", "United"), ("AA", "American")]
        )
        conn.commit()
    connector = Connector.objects.create(
        name=unique("ref"), kind="sqlite", config={"path": str(db)}
    )
    return {"connector": connector.name, "options": {"table": "airlines"}}, db


def broker_backlog() -> dict[str, Any]:
    """What the test broker still holds: messages waiting per queue, and each
    message delivered but not yet acknowledged (task name, seconds since delivery)."""
    from config.celery_app import app

    with app.connection_for_write() as conn:
        channel = conn.default_channel
        client = channel.client
        waiting = {q: client.llen(q) for q in ("control", "io", "cpu")}
        delivered = dict(
            client.zrange(channel.unacked_index_key, 0, -1, withscores=True)
        )
        # HGETALL is not among the commands kombu prefixes: the whole key, then.
        held = client.hgetall(channel.global_keyprefix + channel.unacked_key)
    unacked = [
        (
            json.loads(raw)[0].get("headers", {}).get("task"),
            round(time.time() - delivered.get(tag, 0), 1),
        )
        for tag, raw in held.items()
    ]
    return {"waiting": waiting, "unacked": sorted(unacked, key=str)}


def broker_idle() -> bool:
    """No message waiting in a queue and none delivered but not yet acknowledged."""
    backlog = broker_backlog()
    return not any(backlog["waiting"].values()) and not backlog["unacked"]


def wait_for_broker_to_drain(timeout: float = 60) -> None:
    """Wait until `broker_idle`; on a timeout, say what the broker still holds."""
    from tests.faults.conftest import wait_until

    try:
        wait_until(broker_idle, timeout=timeout, interval=0.2, what="the broker")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: still held {broker_backlog()}") from None


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], Any], *, timeout: float, interval: float = 0.05, what: str
) -> Any:
    """Poll `predicate` until it returns something truthy; returns that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
