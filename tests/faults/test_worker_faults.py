"""Worker faults on real worker processes: a pool child SIGKILLed in the middle of
a sink write, and a warm shutdown (SIGTERM) in the middle of a run.

(SIGKILL of the worker's main process is proven by
`tests/runs/test_flights_e2e.py::test_sigkill_worker_mid_run_loses_and_duplicates_nothing`.)
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from integration import services
from integration.models import ChunkRun, Run
from tests.faults.conftest import FAST_REDELIVERY, pid_alive, wait_until
from tests.helpers import unique, wait_for_run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROWS = 300
PAUSED_CHUNK = 7


def writer_pid(markers: Path, run_id: int, seq: int) -> int | None:
    """The pid of the process pausing inside chunk `seq`'s write, once it is there."""
    marker = markers / f"{run_id}-{seq}"
    try:
        text = marker.read_text()
    except FileNotFoundError:
        return None
    return int(text) if text else None


def test_sigkill_pool_child_during_write_loses_and_duplicates_nothing(
    fault_kinds, numbered, sink_db, worker_factory, tmp_path
):
    """A pool child killed inside its write transaction (rows deleted and COPYed,
    not committed) is replaced by the main process; `reject_on_worker_lost` puts
    the message back and the same attempt writes the chunk again: every number
    once."""
    markers = tmp_path / "markers"
    markers.mkdir()
    pipeline, table = numbered(
        ROWS,
        chunk_rows=10,
        window=4,
        sink_kind="slowpg",
        pause_chunks=[PAUSED_CHUNK],
        pause_seconds=60,
        marker_dir=str(markers),
    )
    worker = worker_factory("pool", concurrency=2, env=FAST_REDELIVERY)
    run = services.start_run(pipeline.pk, correlation_id=unique("corr"))

    pid = wait_until(
        lambda: writer_pid(markers, run.pk, PAUSED_CHUNK),
        timeout=60,
        what=f"chunk {PAUSED_CHUNK} to be inside its write",
    )
    assert pid in worker.children()
    os.kill(pid, signal.SIGKILL)

    run = wait_for_run(run.pk, timeout=120)
    assert run.state == "succeeded", run.error
    assert (run.records_read, run.records_written, run.records_rejected) == (
        ROWS,
        ROWS,
        0,
    )
    assert run.chunks_done == run.chunks_total == ROWS // 10
    assert sink_db.missing_and_duplicates(table, ROWS) == (0, 0)
    # The same attempt (no reconciler resend) ran the chunk's task again, and the
    # killed write was counted as a crash of that step (one `process_chunk` task).
    chunk = ChunkRun.objects.get(run=run, seq=PAUSED_CHUNK)
    assert (chunk.state, chunk.attempts, chunk.crashes, chunk.step) == (
        "done",
        1,
        1,
        "process",
    )
    # The main process survived and replaced its child.
    assert worker.proc.poll() is None
    assert not pid_alive(pid)
    children = worker.children()
    assert len(children) == 2
    assert pid not in children


def test_sigterm_warm_shutdown_mid_run_then_new_worker_completes(
    fault_kinds, numbered, sink_db, worker_factory, tmp_path
):
    """SIGTERM is a warm shutdown: the write in progress commits, messages the
    worker had reserved go back to the broker, the worker exits 0; a new worker
    finishes the run with every number once and no step counted as a crash."""
    markers = tmp_path / "markers"
    markers.mkdir()
    pipeline, table = numbered(
        ROWS,
        chunk_rows=10,
        window=4,
        sink_kind="slowpg",
        pause_chunks=[PAUSED_CHUNK],
        pause_seconds=3,
        marker_dir=str(markers),
    )
    first = worker_factory("leaving", concurrency=2, env=FAST_REDELIVERY)
    run = services.start_run(pipeline.pk)
    wait_until(
        lambda: writer_pid(markers, run.pk, PAUSED_CHUNK),
        timeout=60,
        what=f"chunk {PAUSED_CHUNK} to be inside its write",
    )
    first.sigterm()
    assert first.proc.wait(60) == 0

    # The write that was in progress finished before the worker left.
    chunk = ChunkRun.objects.get(run=run, seq=PAUSED_CHUNK)
    assert (chunk.state, chunk.attempts, chunk.crashes) == ("done", 1, 0)
    run.refresh_from_db()
    assert run.state == "running"
    assert run.chunks_done < run.chunks_total

    worker_factory("successor", concurrency=2, env=FAST_REDELIVERY)
    run = wait_for_run(run.pk, timeout=120)
    assert run.state == "succeeded", run.error
    assert (run.records_read, run.records_written) == (ROWS, ROWS)
    assert sink_db.missing_and_duplicates(table, ROWS) == (0, 0)
    chunks = ChunkRun.objects.filter(run=run)
    assert set(chunks.values_list("state", flat=True)) == {"done"}
    assert set(chunks.values_list("attempts", flat=True)) == {1}
    assert set(chunks.values_list("crashes", flat=True)) == {0}
    assert Run.objects.get(pk=run.pk).chunks_done == ROWS // 10
