"""A worker killed between a chunk's key claim and its sink commit, in a
deduplicating run: the redelivered load finds the chunk's own keys and writes the
same rows, so each key is loaded exactly once, from its first row."""

from __future__ import annotations

import os
import signal

import pytest

from connectors.models import Connector
from integration import services
from integration.models import ChunkRun, Pipeline, RunKey
from tests.faults.conftest import FAST_REDELIVERY, wait_until
from tests.faults.test_worker_faults import writer_pid
from tests.helpers import unique, wait_for_run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROWS = 80
KEYS = 37  # k = id % 37: ids 1..37 are the first rows of their key
PAUSED_CHUNK = 3  # ids 31..40: 31..37 are first rows, 38..40 repeats


def test_sigkill_after_the_claim_loads_each_key_once(
    fault_kinds, sink_db, worker_factory, tmp_path
):
    markers = tmp_path / "markers"
    markers.mkdir()
    source = Connector.objects.create(
        name=unique("gen"), kind="generator", config={"rows": ROWS}
    )
    sink = Connector.objects.create(
        name=unique("slowpg"),
        kind="slowpg",
        config={
            **sink_db.config(),
            "pause_chunks": [PAUSED_CHUNK],
            "pause_seconds": 60,
            "marker_dir": str(markers),
        },
    )
    table = sink_db.new_table()
    pipeline = Pipeline.objects.create(
        name=unique("keys"),
        source=source,
        sink=sink,
        steps=[
            {
                "type": "map",
                "fields": [
                    {"name": "id", "expr": "id", "type": "integer", "required": True},
                    {
                        "name": "k",
                        "expr": f"CAST(id AS INTEGER) % {KEYS}",
                        "type": "integer",
                    },
                ],
            },
            {"type": "deduplicate", "key": ["k"], "keep": "first"},
        ],
        sink_options={"table": table, "write_mode": "append"},
        chunk_rows=10,
        max_in_flight=4,
    )
    services.validate_definition(pipeline)
    services.freeze_version(pipeline)
    # A chunk whose load came before its turn also sent itself a delayed load (the
    # turn poll). Were that poll (5 s) to arrive before the killed message comes
    # back (visibility timeout 20 s), it would load the chunk as a new task and the
    # crash would go uncounted: the poll waits longer than the redelivery here.
    worker = worker_factory(
        "pool",
        concurrency=2,
        env={**FAST_REDELIVERY, "DIS_LOAD_TURN_POLL_SECONDS": "60"},
    )
    run = services.start_run(pipeline.pk, correlation_id=unique("corr"))

    pid = wait_until(
        lambda: writer_pid(markers, run.pk, PAUSED_CHUNK),
        timeout=60,
        what=f"chunk {PAUSED_CHUNK} to be inside its write",
    )
    # Its keys are claimed (committed) and its rows not: the crash window.
    held = RunKey.objects.filter(run=run, seq=PAUSED_CHUNK)
    assert sorted(held.values_list("source_ref", flat=True)) == sorted(
        f"gen#{n}" for n in range(31, 38)
    )
    assert pid in worker.children()
    os.kill(pid, signal.SIGKILL)

    run = wait_for_run(run.pk, timeout=120)
    assert run.state == "succeeded", run.error
    rows = sink_db.query(f'SELECT id FROM "{table}" ORDER BY id')
    assert [r[0] for r in rows] == list(range(1, KEYS + 1))
    assert (run.records_written, run.records_deduplicated) == (KEYS, ROWS - KEYS)
    chunk = ChunkRun.objects.get(run=run, seq=PAUSED_CHUNK)
    # The same attempt loaded again after the crash (no resend with a new token).
    assert (chunk.state, chunk.attempts, chunk.crashes) == ("done", 1, 1)
