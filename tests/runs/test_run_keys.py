"""Run-scoped keys: the claim, the load order, crash and resume, in this process.

The task bodies run here on PostgreSQL; the broker is replaced by a recorder
(`sent`), so each test drives the chunks' steps itself, in the order it needs.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import timedelta

import pyarrow as pa
import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from connectors.exceptions import TransientError
from connectors.models import Connector
from integration import housekeeping, orchestration, runkeys, services, tasks
from integration.exceptions import ResumeRefusedError
from integration.models import ChunkRun, Pipeline, Run, RunKey
from tests.helpers import unique
from tests.runs.conftest import sink_query
from transforms.engine import KeyScope

pytestmark = pytest.mark.django_db(transaction=True)

#: id 1..30 in 3 chunks of 10; k = id % 4, so chunk 0 holds every key first
#: (ids 1-4) and its last row of each key (ids 7-10), chunk 2 the last ones.
KEYED_MAP = {
    "type": "map",
    "fields": [
        {"name": "id", "expr": "id", "type": "integer", "required": True},
        {"name": "k", "expr": "CAST(id AS INTEGER) % 4", "type": "integer"},
    ],
}
DEDUPE = {"type": "deduplicate", "key": ["k"], "keep": "first"}
DEDUPE_SCOPE = KeyScope("deduplicate", "deduplicate", "_dedupe_key", "first", ("k",), 1)
UNIQUE_SCOPE = KeyScope("unique:k", "unique", "_unique_k", "first", ("k",), 1)


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()  # noqa: S324 - a key hash


@pytest.fixture
def load_later(monkeypatch) -> list[tuple]:
    """The loads sent again: ("poll" | "wake", run id, seq, token)."""
    calls: list[tuple] = []

    def send_load(run_id, seq, token, cid, *, countdown):
        calls.append(("wake" if countdown == 0 else "poll", run_id, seq, token))

    monkeypatch.setattr(orchestration, "send_load", send_load)
    return calls


@pytest.fixture
def keyed(pg_sink, sent):
    """Make a planned run of 30 generated rows (3 chunks of 10) with `steps`."""

    def make(steps, *, window=3):
        source = Connector.objects.create(
            name=unique("gen"), kind="generator", config={"rows": 30}
        )
        table = pg_sink.new_table()
        pipeline = Pipeline.objects.create(
            name=unique("p"),
            source=source,
            sink=pg_sink,
            steps=steps,
            sink_options={"table": table},
            chunk_rows=10,
            max_in_flight=window,
            max_rejected_ratio=1.0,
        )
        services.validate_definition(pipeline)
        services.freeze_version(pipeline)
        run = services.start_run(pipeline.pk)
        services.plan_run(run.pk)
        return run, table

    return make


def token(run: Run, seq: int) -> str:
    return str(ChunkRun.objects.get(run=run, seq=seq).attempt_token)


def run_steps(run: Run, seq: int, *steps) -> None:
    t = token(run, seq)
    for step in steps:
        step(run.pk, seq, t)


E, T, L = tasks.extract_chunk, tasks.transform_chunk, tasks.load_chunk


def state(run: Run, seq: int) -> str:
    return ChunkRun.objects.get(run=run, seq=seq).state


def held(run: Run) -> dict[str, int]:
    return dict(RunKey.objects.filter(run=run).values_list("source_ref", "seq"))


def output(keys: list[str | None], refs: list[str], column="_dedupe_key") -> pa.Table:
    return pa.table(
        {
            "k": pa.array(keys, pa.string()),
            "_source_ref": pa.array(refs, pa.string()),
            column: pa.array([md5(k) if k else None for k in keys], pa.string()),
        }
    )


# --- The claim ------------------------------------------------------------------------


@pytest.fixture(params=["postgresql", "portable"])
def sql_path(request, monkeypatch):
    """PostgreSQL's COPY and INSERT ... RETURNING, or the plain SQL the local
    SQLite default uses (run here on PostgreSQL too)."""
    if request.param == "portable":
        monkeypatch.setattr(runkeys, "_is_postgresql", lambda: False)
    return request.param


def test_claim_keeps_the_holder_and_a_retry_claims_the_same(keyed, sql_path):
    run, _ = keyed([KEYED_MAP, DEDUPE])
    t0, t1 = token(run, 0), token(run, 1)

    first = runkeys.claim(
        run.pk, 0, t0, [DEDUPE_SCOPE], output(["a", "b"], ["#1", "#2"]), None
    )
    assert first.output.column_names == ["k", "_source_ref"]
    assert first.output.column("k").to_pylist() == ["a", "b"]
    assert first.deduplicated == 0

    later = output(["b", "c", None], ["#3", "#4", "#5"])
    second = runkeys.claim(run.pk, 1, t1, [DEDUPE_SCOPE], later, None)
    # b is chunk 0's; a NULL hash takes no part.
    assert second.output.column("k").to_pylist() == ["c", None]
    assert second.deduplicated == 1
    assert held(run) == {"#1": 0, "#2": 0, "#4": 1}

    # The same attempt again (a crash after the claim, before the sink commit):
    # it still holds its own keys.
    again = runkeys.claim(run.pk, 1, t1, [DEDUPE_SCOPE], later, None)
    assert again.output.column("k").to_pylist() == ["c", None]
    assert held(run) == {"#1": 0, "#2": 0, "#4": 1}

    # An attempt whose rows differ claims afresh: c is no longer chunk 1's.
    runkeys.claim(run.pk, 1, t1, [DEDUPE_SCOPE], output(["d"], ["#6"]), None)
    assert held(run) == {"#1": 0, "#2": 0, "#6": 1}

    # A superseded attempt claims nothing.
    assert (
        runkeys.claim(run.pk, 1, str(uuid.uuid4()), [DEDUPE_SCOPE], later, None) is None
    )
    assert held(run) == {"#1": 0, "#2": 0, "#6": 1}


def test_claim_rejects_a_unique_value_naming_the_first_row(keyed, sql_path):
    run, _ = keyed([KEYED_MAP, DEDUPE])
    runkeys.claim(
        run.pk,
        0,
        token(run, 0),
        [UNIQUE_SCOPE],
        output(["a"], ["f#1"], "_unique_k"),
        None,
    )
    rows = output(["a", "b"], ["f#2", "f#3"], "_unique_k")
    inputs = pa.table(
        {"k": ["a", "b"], "raw": ["x", "y"], "_source_ref": ["f#2", "f#3"]}
    )

    claimed = runkeys.claim(run.pk, 1, token(run, 1), [UNIQUE_SCOPE], rows, inputs)

    assert claimed.output.to_pylist() == [{"k": "b", "_source_ref": "f#3"}]
    assert claimed.deduplicated == 0
    assert claimed.rejected.to_pylist() == [
        {
            "k": "a",
            "raw": "x",
            "_source_ref": "f#2",
            "_error": "k: 'a' is not unique within the run (first at f#1)",
            "_step": "validate",
        }
    ]


@pytest.mark.parametrize(
    ("keep", "kept"), [("first", ["#1", "#3"]), ("last", ["#2", "#3"])]
)
def test_two_rows_of_one_chunk_with_a_key_keep_the_first_in_load_order(
    keyed, keep, kept
):
    run, _ = keyed([KEYED_MAP, DEDUPE])
    scope = KeyScope("deduplicate", "deduplicate", "_dedupe_key", keep, ("k",), 1)
    rows = output(["a", "a", "b"], ["#1", "#2", "#3"])

    claimed = runkeys.claim(run.pk, 0, token(run, 0), [scope], rows, None)

    assert claimed.output.column("_source_ref").to_pylist() == kept
    assert claimed.deduplicated == 1


# --- The load order -----------------------------------------------------------------


def test_a_load_waits_until_every_chunk_before_it_committed(keyed, load_later, pg_sink):
    run, table = keyed([KEYED_MAP, DEDUPE])
    run_steps(run, 1, E, T, L)
    # Chunk 0 has not loaded: chunk 1 writes nothing, claims nothing, and is
    # sent again for later.
    assert load_later == [("poll", run.pk, 1, token(run, 1))]
    assert state(run, 1) == "running"
    assert not RunKey.objects.filter(run=run).exists()
    assert sink_query(pg_sink, f'SELECT count(*) FROM "{table}"') == [(0,)]

    run_steps(run, 0, E, T, L)
    # Committed, chunk 0 wakes the waiting chunk 1 at once.
    assert load_later[1:] == [("wake", run.pk, 1, token(run, 1))]
    run_steps(run, 1, L)
    run_steps(run, 2, E, T, L)
    assert len(load_later) == 2

    tasks.finalize_run(run.pk)
    run.refresh_from_db()
    assert run.state == "succeeded", run.error
    assert sorted(sink_query(pg_sink, f'SELECT id, k FROM "{table}"')) == [
        (1, 1),
        (2, 2),
        (3, 3),
        (4, 0),
    ]
    assert (run.records_written, run.records_deduplicated) == (4, 26)
    assert list(
        ChunkRun.objects.filter(run=run).values_list("records_deduplicated", flat=True)
    ) == [6, 10, 10]
    assert not RunKey.objects.filter(run=run).exists()


def test_keep_last_dispatches_and_loads_from_the_last_chunk(
    keyed, sent, load_later, pg_sink
):
    run, table = keyed([KEYED_MAP, {**DEDUPE, "keep": "last"}], window=2)
    assert [c[2] for c in sent if c[0] == "chunk"] == [2, 1]
    run_steps(run, 1, E, T, L)  # chunk 2 has not loaded: not its turn
    assert load_later == [("poll", run.pk, 1, token(run, 1))]
    run_steps(run, 2, E, T, L)
    assert load_later[1:] == [("wake", run.pk, 1, token(run, 1))]
    assert [c[2] for c in sent if c[0] == "chunk"] == [2, 1, 0]
    run_steps(run, 1, L)
    run_steps(run, 0, E, T, L)
    tasks.finalize_run(run.pk)
    run.refresh_from_db()
    assert run.state == "succeeded", run.error
    assert sorted(sink_query(pg_sink, f'SELECT id, k FROM "{table}"')) == [
        (27, 3),
        (28, 0),
        (29, 1),
        (30, 2),
    ]


def test_a_retry_after_the_claim_loads_exactly_once(keyed, monkeypatch, pg_sink):
    """The load claims its keys, then the sink fails; the retried load finds its own
    keys and writes the same rows."""
    from integration import runtime

    run, table = keyed([KEYED_MAP, DEDUPE])
    run_steps(run, 0, E, T, L)
    real_open_sink = runtime.open_sink

    class Down:
        def __init__(self, sink):
            self.sink = sink

        def write(self, *args, **kwargs):
            raise TransientError("sink down")

        def close(self):
            self.sink.close()

    monkeypatch.setattr(runtime, "open_sink", lambda c: Down(real_open_sink(c)))
    run_steps(run, 1, E, T)
    with pytest.raises(TransientError):
        run_steps(run, 1, L)
    assert state(run, 1) == "running"
    assert set(held(run).values()) == {0}  # chunk 1 claimed nothing new
    monkeypatch.setattr(runtime, "open_sink", real_open_sink)
    run_steps(run, 1, L)
    run_steps(run, 2, E, T, L)
    tasks.finalize_run(run.pk)
    run.refresh_from_db()
    assert run.state == "succeeded", run.error
    assert sorted(sink_query(pg_sink, f'SELECT id FROM "{table}"')) == [
        (1,),
        (2,),
        (3,),
        (4,),
    ]


def test_unique_rule_across_chunks_rejects_the_later_rows(keyed, pg_sink):
    steps = [
        KEYED_MAP,
        {"type": "validate", "rules": [{"field": "k", "rule": "unique"}]},
    ]
    run, table = keyed(steps)
    for seq in (0, 1, 2):
        run_steps(run, seq, E, T, L)
    tasks.finalize_run(run.pk)
    run.refresh_from_db()
    assert run.state == "succeeded_with_errors", run.error
    assert sorted(sink_query(pg_sink, f'SELECT id FROM "{table}"')) == [
        (1,),
        (2,),
        (3,),
        (4,),
    ]
    letters = {d.payload["id"]: d.error for d in run.dead_letters.all()}
    assert sorted(map(int, letters)) == list(range(5, 31))
    # Chunk 0's repeats are the engine's (within the batch); the later chunks'
    # name the row holding the value.
    assert letters["5"] == "k: '1' is not unique"
    assert letters["13"] == ("k: '1' is not unique within the run (first at gen#1)")
    assert run.records_rejected == run.records_dead_lettered == 26


# --- Quarantine, resume, versions, retention ------------------------------------------


def test_a_quarantined_chunk_stops_the_run_and_a_resume_finishes_it_exactly(
    keyed, sent, load_later, pg_sink
):
    run, table = keyed([KEYED_MAP, DEDUPE])
    run_steps(run, 0, E, T, L)
    services.quarantine_chunk(run.pk, 1, token(run, 1), step="extract", crashes=3)
    run_steps(run, 2, E, T, L)
    run.refresh_from_db()
    assert run.state == "failed"
    assert "chunk 1 is quarantined" in run.error
    assert set(held(run).values()) == {0}  # the resume needs them

    services.resume_run(run.pk)
    services.plan_run(run.pk)
    for seq in (1, 2):
        run_steps(run, seq, E, T, L)
    tasks.finalize_run(run.pk)
    run.refresh_from_db()
    assert run.state == "succeeded", run.error
    assert run.records_deduplicated == 26
    assert sorted(sink_query(pg_sink, f'SELECT id FROM "{table}"')) == [
        (1,),
        (2,),
        (3,),
        (4,),
    ]


def test_resume_with_a_version_keyed_otherwise_is_refused(keyed):
    run, _ = keyed([KEYED_MAP, DEDUPE])
    services.cancel_run(run.pk)
    pipeline = run.pipeline
    pipeline.steps = [KEYED_MAP, {"type": "deduplicate", "key": ["id"]}]
    pipeline.save()
    services.freeze_version(pipeline)
    with pytest.raises(ResumeRefusedError, match="deduplicate keys or unique values"):
        services.resume_run(run.pk, use_current_version=True)
    # The same keys in a changed pipeline are fine.
    pipeline.steps = [KEYED_MAP, {"type": "filter", "where": "id > 0"}, DEDUPE]
    pipeline.save()
    services.freeze_version(pipeline)
    services.resume_run(run.pk, use_current_version=True)


def test_purge_deletes_the_keys_of_runs_that_cannot_resume(keyed):
    run, _ = keyed([KEYED_MAP, DEDUPE])
    run_steps(run, 0, E, T, L)
    services.cancel_run(run.pk)
    assert housekeeping.purge().run_keys == 0  # a cancelled run can be resumed
    Run.objects.filter(pk=run.pk).update(
        finished_at=timezone.now() - timedelta(days=31)
    )
    assert housekeeping.purge().run_keys == 4
    assert not RunKey.objects.filter(run=run).exists()


# --- Definitions ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        (
            [
                KEYED_MAP,
                DEDUPE,
                {
                    "type": "aggregate",
                    "group_by": ["k"],
                    "measures": [{"name": "n", "fn": "count"}],
                },
            ],
            "before an aggregate would hold within a chunk only",
        ),
        (
            [
                KEYED_MAP,
                {"type": "validate", "rules": [{"field": "id", "rule": "unique"}]},
                {**DEDUPE, "keep": "last"},
            ],
            "cannot be combined with unique rules",
        ),
    ],
    ids=["before-aggregate", "last-and-unique"],
)
def test_definitions_that_cannot_be_exact_are_refused(
    api, generator_connector, pg_sink, steps, message
):
    response = api.post(
        "/api/v1/pipelines/",
        {
            "name": unique("p"),
            "source": generator_connector.name,
            "sink": pg_sink.name,
            "steps": steps,
            "sink_options": {"table": "t"},
        },
        format="json",
    )
    assert response.status_code == 400, response.content
    assert message in str(response.json()["steps"])


def test_deduplicate_and_unique_pipelines_are_accepted(generator_connector, pg_sink):
    for steps in (
        [KEYED_MAP, DEDUPE],
        [KEYED_MAP, {**DEDUPE, "keep": "last"}],
        [KEYED_MAP, {"type": "validate", "rules": [{"field": "k", "rule": "unique"}]}],
    ):
        pipeline = Pipeline(
            name=unique("p"), source=generator_connector, sink=pg_sink, steps=steps
        )
        services.validate_definition(pipeline)
    with pytest.raises(ValidationError):
        services.validate_definition(
            Pipeline(
                name=unique("p"),
                source=generator_connector,
                sink=pg_sink,
                steps=[KEYED_MAP, {"type": "deduplicate", "key": ["nope"]}],
            )
        )


def test_a_second_load_leaves_a_chunk_to_the_live_load_of_it(keyed):
    """A wake-up and the chunk's own later check may both arrive: the one that finds
    a live task loading the chunk returns, unless that task's process is gone."""
    import os
    import socket

    run, _ = keyed([KEYED_MAP, DEDUPE])
    t1 = token(run, 1)
    ChunkRun.objects.filter(run=run, seq=1).update(
        step="load",
        step_open=True,
        step_task_id="other-task",
        step_owner=f"{socket.gethostname()}:{os.getpid()}",
        touched_at=timezone.now(),
    )
    assert services.loading_elsewhere(run.pk, 1, t1, "this-task")
    # The same message redelivered (its worker died) is the load itself.
    assert not services.loading_elsewhere(run.pk, 1, t1, "other-task")
    ChunkRun.objects.filter(run=run, seq=1).update(step_owner="nohost:1")
    ChunkRun.objects.filter(run=run, seq=1).update(
        touched_at=timezone.now() - timedelta(days=1)
    )
    assert not services.loading_elsewhere(run.pk, 1, t1, "this-task")


def test_loads_of_a_pipeline_without_keys_never_defer(keyed):
    import os
    import socket

    run, _ = keyed([KEYED_MAP])
    ChunkRun.objects.filter(run=run, seq=1).update(
        step="load",
        step_open=True,
        step_task_id="other-task",
        step_owner=f"{socket.gethostname()}:{os.getpid()}",
        touched_at=timezone.now(),
    )
    assert not services.loading_elsewhere(run.pk, 1, token(run, 1), "this-task")


# --- Rows a later rule rejects still hold their key, as in one pass ---


def test_a_kept_row_rejected_later_still_holds_its_key(keyed, pg_sink):
    """Deduplicate keeps ids 1-4 of chunk 0, then a rule rejects ids 1 and 2. In one
    pass over all 30 rows keys 1 and 2 have no row left; so too across chunks (ids
    13 and 14 of chunk 1 do not take their place)."""
    steps = [
        KEYED_MAP,
        DEDUPE,
        {"type": "validate", "rules": [{"field": "id", "rule": "range", "min": 3}]},
    ]
    run, table = keyed(steps)
    for seq in (0, 1, 2):
        run_steps(run, seq, E, T, L)
    tasks.finalize_run(run.pk)
    run.refresh_from_db()
    assert sorted(sink_query(pg_sink, f'SELECT id FROM "{table}"')) == [(3,), (4,)]
    assert sorted(int(d.payload["id"]) for d in run.dead_letters.all()) == [1, 2]
    assert (run.records_rejected, run.records_deduplicated) == (2, 26)


def test_a_first_value_rejected_by_another_rule_still_holds_it(keyed, pg_sink):
    """In one step, ids 1 and 2 fail the range rule but are the first rows with
    k = 1 and k = 2: in one pass they make every later row with those values not
    unique, so across chunks too."""
    rules = [
        {"field": "id", "rule": "range", "min": 3},
        {"field": "k", "rule": "unique"},
    ]
    run, table = keyed([KEYED_MAP, {"type": "validate", "rules": rules}])
    for seq in (0, 1, 2):
        run_steps(run, seq, E, T, L)
    tasks.finalize_run(run.pk)
    run.refresh_from_db()
    assert sorted(sink_query(pg_sink, f'SELECT id FROM "{table}"')) == [(3,), (4,)]
    letters = {int(d.payload["id"]): d.error for d in run.dead_letters.all()}
    assert sorted(letters) == [1, 2, *range(5, 31)]
    assert letters[13] == "k: '1' is not unique within the run (first at gen#1)"


def test_admin_lists_which_row_holds_a_key(keyed, client, admin_user_obj):
    run, _ = keyed([KEYED_MAP, DEDUPE])
    run_steps(run, 0, E, T, L)
    client.force_login(admin_user_obj)
    page = client.get("/admin/integration/runkey/?q=gen%232&scope=deduplicate")
    assert page.status_code == 200
    text = page.content.decode()
    assert "gen#2" in text
    assert "gen#3" not in text
    assert client.get("/admin/integration/runkey/?q=x").status_code == 200
