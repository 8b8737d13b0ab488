"""File Processing Service end to end: events on Tansu, files on a local HTTP server,
runs on a real worker, rows in PostgreSQL."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest

from connectors.models import Connector
from integration import file_triggers, services
from integration.choices import RunState, RunTrigger
from integration.models import FileTrigger, Pipeline, Run
from tests.connectors.plugins.kafka.conftest import (  # noqa: F401 - fixtures
    kafka_bootstrap,
    make_topic,
    produce,
)
from tests.connectors.plugins.rest.server import ApiServer
from tests.helpers import unique, wait_for_run
from tests.runs.conftest import sink_query

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LOOPBACK_ENV = {"DIS_ALLOWED_NETWORKS": "127.0.0.1/32"}
ORDERS = b"id,item\n1,apple\n2,pear\n3,plum\n"
STEPS = [
    {
        "type": "map",
        "fields": [
            {"name": "id", "expr": "id", "type": "integer"},
            {"name": "item", "expr": "item", "type": "string"},
        ],
    }
]


@pytest.fixture
def fps() -> Iterator[ApiServer]:
    """The File Processing Service's file server."""
    server = ApiServer().start()
    try:
        yield server
    finally:
        server.stop()


def serve(
    server: ApiServer,
    file_id: str,
    path: str,
    body: bytes,
    content_type: str = "text/csv",
    *,
    served: bytes | None = None,
    size: int | None = None,
) -> dict[str, Any]:
    """Serve `served` (default `body`) at `path`; the event announces `body`."""
    payload = body if served is None else served
    server.route("GET", path, lambda _r: (200, {"Content-Type": content_type}, payload))
    return {
        "file_id": file_id,
        "url": path,
        "content_type": content_type,
        "size": len(body) if size is None else size,
        "sha256": hashlib.sha256(body).hexdigest(),
    }


@pytest.fixture
def binding(
    transactional_db: None,
    kafka_bootstrap: str,  # noqa: F811
    make_topic: Callable[..., str],  # noqa: F811
    fps: ApiServer,
    pg_sink: Connector,
    tmp_path: Any,
) -> tuple[FileTrigger, str]:
    """A file trigger: `*.csv` files of type text/csv on a new topic -> PostgreSQL."""
    kafka = Connector.objects.create(
        name=unique("kafka"),
        kind="kafka",
        config={"bootstrap_servers": kafka_bootstrap, "timeout": 5},
    )
    source = Connector.objects.create(
        name=unique("fps"),
        kind="file_processing",
        config={"base_url": fps.url, "cache_dir": str(tmp_path / "fps-cache")},
    )
    table = pg_sink.new_table()
    pipeline = Pipeline.objects.create(
        name=unique("orders"),
        source=source,
        steps=STEPS,
        sink=pg_sink,
        sink_options={"table": table},
        chunk_rows=2,
    )
    services.freeze_version(pipeline)
    topic = make_topic(partitions=1)
    trigger = FileTrigger.objects.create(
        name=unique("orders-files"),
        connector=kafka,
        topic=topic,
        pipeline=pipeline,
        filename_pattern="orders-*.csv",
        content_type="text/csv",
    )
    return trigger, table


def publish(produce: Callable[..., None], topic: str, *events: Any) -> None:  # noqa: F811
    produce(
        topic,
        [
            (0, None, e if isinstance(e, bytes) else orjson.dumps(e), None)
            for e in events
        ],
    )


def run_for(trigger: FileTrigger, file_id: str) -> Run:
    return Run.objects.get(pipeline=trigger.pipeline, idempotency_key=f"fps:{file_id}")


def test_events_start_verified_runs_once_each(
    worker_factory: Callable[..., Any],
    binding: tuple[FileTrigger, str],
    fps: ApiServer,
    produce: Callable[..., None],  # noqa: F811
    pg_sink: Connector,
    settings: Any,
) -> None:
    settings.DIS_ALLOWED_NETWORKS = ["127.0.0.1/32"]
    trigger, table = binding
    good = serve(fps, "f-good", "/files/orders-1.csv", ORDERS)
    tampered = ORDERS.replace(b"pear", b"peer")
    mismatch = serve(fps, "f-bad", "/files/orders-2.csv", ORDERS, served=tampered)
    wrong_size = serve(fps, "f-size", "/files/orders-3.csv", ORDERS, size=10)
    other_type = serve(fps, "f-pdf", "/files/orders-4.csv", b"%PDF", "application/pdf")
    publish(
        produce,
        trigger.topic,
        good,
        mismatch,
        good,  # redelivered: no second run
        other_type,  # matches no binding
        b"{not json",
        {"file_id": "f-x", "url": "/files/orders-9.csv"},  # no size, no sha256
        wrong_size,
    )
    worker_factory(concurrency=1, env=LOOPBACK_ENV)

    counts = file_triggers.consume_file_events()

    assert counts == {
        "events": 7,
        "started": 3,
        "duplicate": 1,
        "unmatched": 1,
        "malformed": 2,
    }
    ok = wait_for_run(run_for(trigger, "f-good").pk)
    assert ok.state == RunState.SUCCEEDED, ok.error
    assert ok.trigger == RunTrigger.EVENT
    assert ok.records_written == 3
    assert sink_query(pg_sink, f'SELECT id, item FROM "{table}" ORDER BY id') == [
        (1, "apple"),
        (2, "pear"),
        (3, "plum"),
    ]
    bad = wait_for_run(run_for(trigger, "f-bad").pk)
    assert bad.state == RunState.FAILED
    assert (
        f"sha256 mismatch for file_id=f-bad: expected "
        f"{hashlib.sha256(ORDERS).hexdigest()}, got "
        f"{hashlib.sha256(tampered).hexdigest()}"
    ) in bad.error
    short = wait_for_run(run_for(trigger, "f-size").pk)
    assert short.state == RunState.FAILED
    assert "size mismatch for file_id=f-size: expected 10 bytes, got more than 10" in (
        short.error
    )
    assert Run.objects.filter(pipeline=trigger.pipeline).count() == 3
    assert fps.hits("/files/orders-4.csv") == []
    trigger.refresh_from_db()
    assert (
        trigger.runs_started,
        trigger.duplicates,
        trigger.topic_unmatched,
        trigger.topic_malformed,
    ) == (3, 1, 1, 2)

    # Offsets were committed: a second pass reads nothing; a late redelivery of
    # an event already run starts nothing either.
    assert file_triggers.consume_file_events() == {}
    publish(produce, trigger.topic, good)
    assert file_triggers.consume_file_events() == {"events": 1, "duplicate": 1}
    assert Run.objects.filter(pipeline=trigger.pipeline).count() == 3


def test_the_beat_task_on_the_worker_starts_the_run(
    worker_factory: Callable[..., Any],
    binding: tuple[FileTrigger, str],
    fps: ApiServer,
    produce: Callable[..., None],  # noqa: F811
    pg_sink: Connector,
) -> None:
    from integration.tasks import file_triggers as file_triggers_task

    trigger, table = binding
    publish(produce, trigger.topic, serve(fps, "f-1", "/in/orders-7.csv", ORDERS))
    worker_factory(concurrency=1, env=LOOPBACK_ENV)

    file_triggers_task.delay()

    deadline = time.monotonic() + 60
    while not Run.objects.filter(pipeline=trigger.pipeline).exists():
        assert time.monotonic() < deadline, "no run was started"
        time.sleep(0.25)
    run = wait_for_run(run_for(trigger, "f-1").pk)
    assert run.state == RunState.SUCCEEDED, run.error
    assert sink_query(pg_sink, f'SELECT count(*) FROM "{table}"') == [(3,)]


def test_loopback_without_the_allow_list_fails_the_run_and_sends_nothing(
    worker_factory: Callable[..., Any],
    binding: tuple[FileTrigger, str],
    fps: ApiServer,
    produce: Callable[..., None],  # noqa: F811
) -> None:
    trigger, _ = binding
    publish(produce, trigger.topic, serve(fps, "f-2", "/files/orders-8.csv", ORDERS))
    worker_factory(concurrency=1, env={"DIS_ALLOWED_NETWORKS": ""})

    assert file_triggers.consume_file_events()["started"] == 1

    run = wait_for_run(run_for(trigger, "f-2").pk)
    assert run.state == RunState.FAILED
    assert "resolves to a non-public address (127.0.0.1)" in run.error
    assert fps.requests == []
