"""A source's chunks are stored and sent while the rest of its plan is found:
the first window goes out at once, no chunk finalizes a run still being planned,
an interrupted plan resumes keeping what it stored, a stop ends the planning."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from connectors.exceptions import TerminalError
from connectors.plugins.generator import GeneratorSource
from integration import services, tasks
from integration.models import ChunkRun, Pipeline, Run
from tests.helpers import run_chunk_steps
from tests.runs.conftest import finalize_window_run

pytestmark = pytest.mark.django_db(transaction=True)

CHUNKS = 10  # 100 rows in chunks of 10
WINDOW = 3


@pytest.fixture
def pipeline(window_pipeline):
    return window_pipeline


@pytest.fixture
def before_chunk(monkeypatch) -> Callable[[int, Callable[[], None]], None]:
    """Run a callback just before the plan yields chunk `seq` (once), with
    stored steps of two chunks after the first window."""
    hooks: dict[int, Callable[[], None]] = {}
    plan = GeneratorSource.plan

    def hooked(self, options, *, chunk_rows) -> Iterator:
        for chunk in plan(self, options, chunk_rows=chunk_rows):
            if chunk.seq in hooks:
                hooks.pop(chunk.seq)()
            yield chunk

    monkeypatch.setattr(GeneratorSource, "plan", hooked)
    monkeypatch.setattr(services, "PLAN_FLUSH_CHUNKS", 2)
    return hooks.__setitem__


def plan_until_crash(run: Run, before_chunk) -> None:
    """Run the plan task until it dies before yielding chunk 6 (five stored)."""

    def crash() -> None:
        raise RuntimeError("worker lost mid-plan")

    before_chunk(6, crash)
    with pytest.raises(RuntimeError):
        services.plan_run(run.pk)


def chunk_sends(sent) -> list[int]:
    return [c[2] for c in sent if c[0] == "chunk"]


def finish_in_flight(run: Run) -> None:
    """Run every queued chunk's steps (each completion may send the next)."""
    while chunk := (
        ChunkRun.objects.filter(run=run, state__in=["queued", "running"])
        .order_by("seq")
        .first()
    ):
        run_chunk_steps(run.pk, chunk.seq, chunk.attempt_token)


def test_the_first_window_is_sent_before_the_plan_is_complete(
    pipeline, sent, before_chunk
):
    run = services.start_run(pipeline.pk)
    seen: dict[str, object] = {}

    def look() -> None:
        seen["sent"] = chunk_sends(sent)
        seen["planned_at"] = Run.objects.get(pk=run.pk).planned_at

    before_chunk(7, look)
    services.plan_run(run.pk)
    assert seen == {"sent": [0, 1, 2], "planned_at": None}
    run.refresh_from_db()
    assert run.planned_at is not None
    assert run.chunks_total == CHUNKS
    assert ChunkRun.objects.filter(run=run).count() == CHUNKS
    assert chunk_sends(sent) == [0, 1, 2]
    assert [c for c in sent if c[0] == "finalize"] == []


def test_chunks_finished_while_planning_do_not_finalize_the_run(
    pipeline, sent, before_chunk
):
    run = services.start_run(pipeline.pk)
    finalized_early: list[tuple] = []

    def work() -> None:
        # Every chunk stored so far finishes while the plan is not complete.
        finish_in_flight(run)
        assert not ChunkRun.objects.filter(run=run).unfinished().exists()
        finalized_early.extend(c for c in sent if c[0] == "finalize")

    before_chunk(6, work)
    services.plan_run(run.pk)
    assert finalized_early == []
    assert sorted(chunk_sends(sent)) == list(range(8))
    finish_in_flight(run)
    assert sorted(chunk_sends(sent)) == list(range(CHUNKS))
    finalize_window_run(run, sent)


def test_the_last_chunk_done_before_the_plan_completes_is_finalized_by_the_plan(
    pipeline, sent, before_chunk, monkeypatch
):
    """All chunks finish between the last stored step and `planned_at`: the
    plan, not a chunk, sends the finalize."""
    run = services.start_run(pipeline.pk)
    monkeypatch.setattr(services, "PLAN_FLUSH_CHUNKS", CHUNKS)
    Pipeline.objects.filter(pk=pipeline.pk).update(max_in_flight=CHUNKS)
    store = services._store_chunks

    def store_then_finish(*args, **kwargs):
        stored = store(*args, **kwargs)
        finish_in_flight(run)
        assert [c for c in sent if c[0] == "finalize"] == []
        return stored

    monkeypatch.setattr(services, "_store_chunks", store_then_finish)
    # 10 chunks with a window of 10: the first step stores all of them.
    services.plan_run(run.pk)
    finalize_window_run(run, sent)


def test_an_interrupted_plan_resumes_keeping_the_chunks_it_stored(
    pipeline, sent, before_chunk
):
    run = services.start_run(pipeline.pk)
    plan_until_crash(run, before_chunk)
    run.refresh_from_db()
    assert run.planned_at is None
    stored = dict(ChunkRun.objects.filter(run=run).values_list("seq", "attempt_token"))
    assert sorted(stored) == [0, 1, 2, 3, 4]
    assert chunk_sends(sent) == [0, 1, 2]

    services.plan_run(run.pk)  # the plan task again (retry or reconcile)
    run.refresh_from_db()
    assert run.planned_at is not None
    assert run.chunks_total == CHUNKS
    again = dict(ChunkRun.objects.filter(run=run).values_list("seq", "attempt_token"))
    assert sorted(again) == list(range(CHUNKS))
    assert {seq: again[seq] for seq in stored} == stored  # kept, not re-created
    assert chunk_sends(sent) == [0, 1, 2]  # the window was full: nothing resent
    finish_in_flight(run)
    tasks.finalize_run(run.pk)
    run.refresh_from_db()
    assert (run.state, run.records_read, run.records_written) == (
        "succeeded_with_errors",
        100,
        95,
    )


def test_a_plan_resumed_over_a_changed_source_fails(pipeline, sent, before_chunk):
    run = services.start_run(pipeline.pk)
    plan_until_crash(run, before_chunk)
    pipeline.source.config = {"rows": 200}
    pipeline.source.save()
    with pytest.raises(TerminalError, match="source changed while the run was"):
        services.plan_run(run.pk)


def test_a_run_cancelled_while_planning_stops_the_plan(pipeline, sent, before_chunk):
    run = services.start_run(pipeline.pk)
    before_chunk(5, lambda: services.cancel_run(run.pk))
    services.plan_run(run.pk)
    run.refresh_from_db()
    assert run.state == "cancelled"
    assert run.planned_at is None
    states = dict(ChunkRun.objects.filter(run=run).values_list("seq", "state"))
    # The cancel skipped the five stored; the step stored after it is skipped
    # too, and planning stopped there.
    assert states == dict.fromkeys(range(7), "skipped")
    assert chunk_sends(sent) == [0, 1, 2]
