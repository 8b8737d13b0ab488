"""Recovery through real workers: poison records, the error policy, resume with a
corrected mapping, dead-letter replay. Each checks the sink for missing and
duplicate record numbers."""

from __future__ import annotations

import pytest

from connectors.models import Connector
from integration import services
from integration.models import ChunkRun, DeadLetter, Pipeline
from tests.helpers import unique, wait_for_run
from tests.runs.conftest import sink_query

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TOTAL = 1000
POISON = [3, 150, 151, 420, 640, 871, 999]  # amounts written "12,5": not a float


def map_steps(amount_expr: str) -> list[dict]:
    return [
        {
            "type": "map",
            "fields": [
                {"name": "n", "expr": "n", "type": "integer", "required": True},
                {"name": "amount", "expr": amount_expr, "type": "float"},
            ],
        }
    ]


BROKEN = map_steps("amount")
FIXED = map_steps("replace(amount, ',', '.')")


@pytest.fixture
def numbers_dir(tmp_path):
    lines = ["n,amount"]
    for n in range(1, TOTAL + 1):
        lines.append(f'{n},"{n},5"' if n in POISON else f"{n},{n}.25")
    (tmp_path / "numbers.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


def make(numbers_dir, pg_sink, *, ratio, chunk_rows=100, window=2):
    source = Connector.objects.create(
        name=unique("files"), kind="files", config={"root": str(numbers_dir)}
    )
    table = pg_sink.new_table()
    pipeline = Pipeline.objects.create(
        name=unique("numbers"),
        source=source,
        source_options={"path": "numbers.csv"},
        steps=BROKEN,
        sink=pg_sink,
        sink_options={"table": table},
        chunk_rows=chunk_rows,
        max_in_flight=window,
        max_rejected_ratio=ratio,
    )
    services.freeze_version(pipeline)
    return pipeline, table


def fix(pipeline):
    pipeline.steps = FIXED
    pipeline.save()
    return services.freeze_version(pipeline)


def missing_and_duplicates(pg_sink, table) -> tuple[int, int]:
    (row,) = sink_query(
        pg_sink,
        f"SELECT {TOTAL} - count(DISTINCT n) FILTER (WHERE n BETWEEN 1 AND {TOTAL}), "
        f'count(*) - count(DISTINCT n) FROM "{table}"',
    )
    return tuple(row)


def test_tolerant_policy_dead_letters_poison_then_replay_completes(
    worker_factory, numbers_dir, pg_sink, api
):
    pipeline, table = make(numbers_dir, pg_sink, ratio=0.05)
    worker_factory(concurrency=2)
    run = wait_for_run(services.start_run(pipeline.pk).pk)
    assert run.state == "succeeded_with_errors", run.error
    assert (run.records_read, run.records_written, run.records_rejected) == (
        1000,
        993,
        7,
    )
    letters = DeadLetter.objects.filter(run=run)
    assert sorted(int(dl.source_ref.split("#")[1]) for dl in letters) == POISON
    assert all("amount" in dl.error for dl in letters)
    assert missing_and_duplicates(pg_sink, table) == (7, 0)

    fix(pipeline)
    response = api.post(
        "/api/v1/dead-letters/replay/", {"filter": {"run": run.pk}}, format="json"
    )
    assert response.status_code == 202, response.content
    replay = wait_for_run(response.json()["id"])
    assert replay.kind == "replay"
    assert replay.state == "succeeded", replay.error
    assert (replay.records_read, replay.records_written) == (7, 7)
    assert missing_and_duplicates(pg_sink, table) == (0, 0)
    assert set(letters.values_list("state", "replay_run")) == {("replayed", replay.pk)}
    # Replayed values went through the corrected mapping.
    (row,) = sink_query(pg_sink, f'SELECT amount FROM "{table}" WHERE n = 150')
    assert row[0] == 150.5


def test_strict_policy_fails_then_resume_runs_only_uncommitted_chunks(
    worker_factory, numbers_dir, pg_sink, api
):
    pipeline, table = make(numbers_dir, pg_sink, ratio=0.0, chunk_rows=100, window=1)
    worker_factory(concurrency=1)
    run = wait_for_run(services.start_run(pipeline.pk).pk)
    assert run.state == "failed"
    # Chunk 0 holds record 3: it fails before writing; nothing after it starts.
    chunks = {c.seq: c for c in ChunkRun.objects.filter(run=run)}
    assert chunks[0].state == "skipped"
    assert all(c.state == "skipped" and c.attempts <= 1 for c in chunks.values())
    assert run.records_written == 0

    refused = api.post(f"/api/v1/runs/{run.pk}/resume/", {}, format="json")
    assert refused.status_code == 202  # same version: resumes, fails again
    again = wait_for_run(run.pk)
    assert again.state == "failed"

    fix(pipeline)
    response = api.post(
        f"/api/v1/runs/{run.pk}/resume/", {"use_current_version": True}, format="json"
    )
    assert response.status_code == 202, response.content
    assert response.json()["version"] == 2
    done = wait_for_run(run.pk)
    assert done.state == "succeeded", done.error
    assert done.resumed_count == 2
    assert missing_and_duplicates(pg_sink, table) == (0, 0)
    assert done.records_written == TOTAL


def test_resume_after_partial_commit_skips_committed_chunks(
    worker_factory, numbers_dir, pg_sink
):
    # Poison only in the last chunk: chunks 0-8 commit, chunk 9 (records 901-1000,
    # holding 999) stops the run.
    lines = ["n,amount"] + [
        f'{n},"{n},5"' if n == 999 else f"{n},{n}.25" for n in range(1, TOTAL + 1)
    ]
    (numbers_dir / "numbers.csv").write_text("\n".join(lines) + "\n")
    pipeline, table = make(numbers_dir, pg_sink, ratio=0.0, chunk_rows=100, window=1)
    worker_factory(concurrency=1)
    run = wait_for_run(services.start_run(pipeline.pk).pk)
    assert run.state == "failed"
    assert run.records_written == 900
    fix(pipeline)
    services.resume_run(run.pk, use_current_version=True)
    run = wait_for_run(run.pk)
    assert run.state == "succeeded", run.error
    attempts = dict(ChunkRun.objects.filter(run=run).values_list("seq", "attempts"))
    assert attempts == {**dict.fromkeys(range(9), 1), 9: 2}
    assert missing_and_duplicates(pg_sink, table) == (0, 0)
