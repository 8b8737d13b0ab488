"""Deduplicate and unique exact across the chunks of a run, through real workers.

A small CSV whose keys repeat across chunks (7 rows a chunk, 3 chunks in flight);
what PostgreSQL holds after the run is compared with the same selection computed
here from the CSV rows, not through the service.
"""

from __future__ import annotations

import csv
import random
import time
from pathlib import Path

import pytest

from integration import orchestration, services
from integration.models import ChunkRun, DeadLetter, Pipeline, RunKey
from tests.helpers import unique, wait_for_broker_to_drain, wait_for_run
from tests.runs.conftest import sink_query

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROWS = 84
CHUNK_ROWS = 7
MAP = {
    "type": "map",
    "fields": [
        {"name": "id", "expr": "id", "type": "integer", "required": True},
        {"name": "k", "expr": "k", "type": "string"},
        {"name": "v", "expr": "v", "type": "string"},
    ],
}


def write_csv(path: Path, seed: int) -> list[dict[str, str]]:
    """Rows 1..ROWS with keys from a small set (so each repeats across chunks);
    some keys are empty (NULL)."""
    rnd = random.Random(seed)
    rows = [
        {
            "id": str(n),
            "k": rnd.choice([f"k{i}" for i in range(12)] + [""]),
            "v": f"v{n}",
        }
        for n in range(1, ROWS + 1)
    ]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "k", "v"])
        writer.writeheader()
        writer.writerows(rows)
    return rows


def make_pipeline(tmp_path, pg_sink, steps, *, seed=5, window=3):
    from connectors.models import Connector

    rows = write_csv(tmp_path / "keys.csv", seed)
    source = Connector.objects.create(
        name=unique("files"), kind="files", config={"root": str(tmp_path)}
    )
    table = pg_sink.new_table()
    pipeline = Pipeline.objects.create(
        name=unique("keys"),
        source=source,
        source_options={"path": "keys.csv"},
        steps=steps,
        sink=pg_sink,
        sink_options={"table": table, "write_mode": "append"},
        chunk_rows=CHUNK_ROWS,
        max_in_flight=window,
        max_rejected_ratio=1.0,
    )
    services.validate_definition(pipeline)
    services.freeze_version(pipeline)
    return pipeline, table, rows


def kept(rows: list[dict[str, str]], keep: str) -> dict[str | None, int]:
    """Key -> the id of its first (or last) row in file order; '' is NULL."""
    out: dict[str | None, int] = {}
    for row in rows if keep == "first" else reversed(rows):
        out.setdefault(row["k"] or None, int(row["id"]))
    return out


def sink_rows(pg_sink, table) -> dict[str | None, int]:
    got = sink_query(pg_sink, f'SELECT k, id FROM "{table}"')
    assert len(got) == len({k for k, _ in got}), f"a key loaded twice: {got}"
    return dict(got)


@pytest.mark.parametrize("keep", ["first", "last"])
def test_deduplicate_keeps_exactly_the_first_or_last_row_per_key(
    worker_factory, pg_sink, tmp_path, keep
):
    steps = [MAP, {"type": "deduplicate", "key": ["k"], "keep": keep}]
    pipeline, table, rows = make_pipeline(tmp_path, pg_sink, steps)
    worker_factory(concurrency=2)
    run = wait_for_run(services.start_run(pipeline.pk).pk, timeout=120)

    assert run.state == "succeeded", run.error
    want = kept(rows, keep)
    assert sink_rows(pg_sink, table) == want
    assert run.chunks_total == ROWS // CHUNK_ROWS == 12
    assert (run.records_read, run.records_written) == (ROWS, len(want))
    assert run.records_deduplicated == ROWS - len(want)
    assert (run.records_rejected, run.records_filtered) == (0, 0)
    # Duplicates are counted, not dead-lettered; the keys go with the run's end.
    assert not DeadLetter.objects.filter(run=run).exists()
    assert not RunKey.objects.filter(run=run).exists()
    # Rows of later chunks really lost to earlier ones (not only within a chunk).
    per_chunk = ChunkRun.objects.filter(run=run).values_list(
        "records_deduplicated", flat=True
    )
    assert sum(per_chunk) == run.records_deduplicated


def test_unique_rule_dead_letters_exactly_the_later_occurrences(
    worker_factory, pg_sink, tmp_path
):
    steps = [MAP, {"type": "validate", "rules": [{"field": "k", "rule": "unique"}]}]
    pipeline, table, rows = make_pipeline(tmp_path, pg_sink, steps, seed=9)
    worker_factory(concurrency=2)
    run = wait_for_run(services.start_run(pipeline.pk).pk, timeout=120)

    assert run.state == "succeeded_with_errors", run.error
    first = kept(rows, "first")
    nulls = {int(r["id"]) for r in rows if not r["k"]}
    got = sink_query(pg_sink, f'SELECT k, id FROM "{table}"')
    # NULL is no value: every row with an empty key passes.
    assert sorted(got, key=lambda r: r[1]) == sorted(
        [(k, i) for k, i in first.items() if k is not None]
        + [(None, i) for i in nulls],
        key=lambda r: r[1],
    )
    later = {
        int(r["id"]): r["k"] for r in rows if r["k"] and first[r["k"]] != int(r["id"])
    }
    letters = DeadLetter.objects.filter(run=run)
    assert {int(d.payload["id"]): d.payload["k"] for d in letters} == later
    ref_of = {int(r["id"]): f"keys.csv#{r['id']}" for r in rows}
    for letter in letters:
        k = letter.payload["k"]
        assert letter.step == "validate"
        assert letter.source_ref == ref_of[int(letter.payload["id"])]
        within_run = (
            f"k: '{k}' is not unique within the run (first at {ref_of[first[k]]})"
        )
        # A repeat within its own chunk has the engine's (batch) message.
        assert letter.error in (within_run, f"k: '{k}' is not unique"), letter.error
    assert any("within the run" in d.error for d in letters)
    assert run.records_rejected == run.records_dead_lettered == len(later)
    assert run.records_written == ROWS - len(later)


def test_every_chain_delivered_twice_still_one_row_per_key(
    worker_factory, pg_sink, tmp_path
):
    """Two workers; every attempt's chain is published a second time with the same
    token while the run goes on (as a redelivery would): still exactly the first
    row per key."""
    steps = [MAP, {"type": "deduplicate", "key": ["k"], "keep": "first"}]
    pipeline, table, rows = make_pipeline(tmp_path, pg_sink, steps, seed=13, window=4)
    worker_factory("a", concurrency=1)
    worker_factory("b", concurrency=1)
    run = services.start_run(pipeline.pk)

    duplicated: set[tuple[int, str]] = set()

    def duplicate_new_attempts() -> None:
        attempts = ChunkRun.objects.filter(
            run=run, attempt_token__isnull=False
        ).values_list("seq", "attempt_token")
        for seq, token in attempts:
            if (seq, str(token)) not in duplicated:
                orchestration.chunk_chain(run.pk, seq, str(token)).apply_async()
                duplicated.add((seq, str(token)))

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        duplicate_new_attempts()
        run.refresh_from_db()
        if run.is_terminal:
            break
        time.sleep(0.02)
    run = wait_for_run(run.pk, timeout=5)
    assert run.state == "succeeded", run.error
    assert {seq for seq, _ in duplicated} == set(range(12))
    wait_for_broker_to_drain()
    want = kept(rows, "first")
    assert sink_rows(pg_sink, table) == want
    assert (run.records_written, run.records_deduplicated) == (
        len(want),
        ROWS - len(want),
    )
