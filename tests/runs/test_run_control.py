"""Cancel, resume refusals, Idempotency-Key, dead-letter edits and discards."""

from __future__ import annotations

import threading

import pytest

from connectors.models import Connector
from integration import orchestration, services
from integration.models import ChunkRun, DeadLetter, Pipeline, Run
from tests.helpers import unique

STEPS = [{"type": "map", "fields": [{"name": "n", "expr": "n", "type": "integer"}]}]


@pytest.fixture
def csv_pipeline(db, tmp_path, sqlite_sink):
    (tmp_path / "n.csv").write_text("n\n" + "\n".join(map(str, range(1, 31))) + "\n")
    source = Connector.objects.create(
        name=unique("files"), kind="files", config={"root": str(tmp_path)}
    )
    pipeline = Pipeline.objects.create(
        name=unique("p"),
        source=source,
        source_options={"path": "n.csv"},
        sink=sqlite_sink,
        sink_options={"table": "t"},
        steps=STEPS,
        chunk_rows=10,
        max_in_flight=1,
    )
    services.freeze_version(pipeline)
    pipeline.csv_path = tmp_path / "n.csv"
    return pipeline


@pytest.mark.django_db
def test_cancel_queued_and_running_runs(api, csv_pipeline, sent):
    queued = services.start_run(csv_pipeline.pk)
    response = api.post(f"/api/v1/runs/{queued.pk}/cancel/")
    assert response.status_code == 202
    assert response.json()["state"] == "cancelled"

    running = services.start_run(csv_pipeline.pk)
    services.plan_run(running.pk)
    assert ChunkRun.objects.filter(run=running, state="queued").count() == 1
    chunk = ChunkRun.objects.get(run=running, state="queued")
    assert api.post(f"/api/v1/runs/{running.pk}/cancel/").status_code == 202
    # The queued chunk's three tasks are revoked.
    token = str(chunk.attempt_token)
    assert sent[-1] == (
        "revoke",
        [f"{token}-extract", f"{token}-load", f"{token}-transform"],
    )
    assert set(
        ChunkRun.objects.filter(run=running).values_list("state", flat=True)
    ) == {"skipped"}
    # A second cancel is refused: the run already ended.
    again = api.post(f"/api/v1/runs/{running.pk}/cancel/")
    assert again.status_code == 409
    assert "already ended" in again.json()["detail"]


@pytest.mark.django_db
def test_resume_is_refused_when_the_source_changed(api, csv_pipeline, sent):
    run = services.start_run(csv_pipeline.pk)
    services.plan_run(run.pk)
    services.cancel_run(run.pk)
    csv_pipeline.csv_path.write_text("n\n1\n2\n")
    response = api.post(f"/api/v1/runs/{run.pk}/resume/", {}, format="json")
    assert response.status_code == 409
    assert "source changed since the run was planned" in response.json()["detail"]


@pytest.mark.django_db
def test_resume_refuses_a_version_that_reads_differently(api, csv_pipeline, sent):
    run = services.start_run(csv_pipeline.pk)
    services.plan_run(run.pk)
    services.cancel_run(run.pk)
    csv_pipeline.chunk_rows = 5
    csv_pipeline.save()
    services.freeze_version(csv_pipeline)
    response = api.post(
        f"/api/v1/runs/{run.pk}/resume/", {"use_current_version": True}, format="json"
    )
    assert response.status_code == 409
    assert "chunk_rows changed" in response.json()["detail"]


@pytest.mark.django_db
def test_resume_of_a_succeeded_run_is_refused(api, csv_pipeline, sent):
    run = services.start_run(csv_pipeline.pk)
    Run.objects.filter(pk=run.pk).update(state="succeeded")
    response = api.post(f"/api/v1/runs/{run.pk}/resume/", {}, format="json")
    assert response.status_code == 409
    assert "only failed or cancelled runs" in response.json()["detail"]


@pytest.mark.django_db
def test_idempotency_key_returns_the_same_run(api, csv_pipeline, sent):
    url = f"/api/v1/pipelines/{csv_pipeline.pk}/runs/"
    first = api.post(url, {}, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
    second = api.post(url, {}, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
    assert (first.status_code, second.status_code) == (202, 200)
    assert first.json()["id"] == second.json()["id"]
    assert second["Idempotent-Replayed"] == "true"
    other = api.post(
        url, {"params": {"x": 1}}, format="json", HTTP_IDEMPOTENCY_KEY="k-1"
    )
    assert other.status_code == 409
    assert "different request" in other.json()["detail"]
    assert Run.objects.filter(pipeline=csv_pipeline).count() == 1


def test_idempotency_key_answers_before_a_pause(api, csv_pipeline, sent):
    url = f"/api/v1/pipelines/{csv_pipeline.pk}/runs/"
    first = api.post(url, {}, format="json", HTTP_IDEMPOTENCY_KEY="before-pause")
    assert first.status_code == 202
    Pipeline.objects.filter(pk=csv_pipeline.pk).update(is_paused=True)
    again = api.post(url, {}, format="json", HTTP_IDEMPOTENCY_KEY="before-pause")
    assert (again.status_code, again.json()["id"]) == (200, first.json()["id"])
    other = api.post(
        url, {"params": {"x": 1}}, format="json", HTTP_IDEMPOTENCY_KEY="before-pause"
    )
    assert "different request" in other.json()["detail"]
    new = api.post(url, {}, format="json", HTTP_IDEMPOTENCY_KEY="after-pause")
    assert new.status_code == 409
    assert "paused" in new.json()["detail"]
    assert Run.objects.filter(pipeline=csv_pipeline).count() == 1


@pytest.mark.django_db(transaction=True)
def test_twenty_concurrent_requests_with_one_key_create_one_run(
    csv_pipeline, user, sent
):
    from knox.models import AuthToken
    from rest_framework.test import APIClient

    _, token = AuthToken.objects.create(user)
    url = f"/api/v1/pipelines/{csv_pipeline.pk}/runs/"
    barrier = threading.Barrier(20)
    statuses: list[int] = []
    ids: list[int] = []

    def call() -> None:
        from django.db import connection

        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
        barrier.wait(10)
        response = client.post(url, {}, format="json", HTTP_IDEMPOTENCY_KEY="same")
        statuses.append(response.status_code)
        ids.append(response.json()["id"])
        connection.close()

    threads = [threading.Thread(target=call) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(statuses) == [200] * 19 + [202]
    assert len(set(ids)) == 1
    assert Run.objects.filter(pipeline=csv_pipeline).count() == 1


@pytest.fixture
def letters(db, csv_pipeline, sent):
    run = services.start_run(csv_pipeline.pk)
    return [
        DeadLetter.objects.create(
            run=run,
            pipeline=csv_pipeline,
            chunk_seq=0,
            step="map",
            error="n: cannot convert 'x' to integer",
            payload={"n": "x"},
            source_ref=f"n.csv#{i}",
        )
        for i in range(1, 4)
    ]


@pytest.mark.django_db
def test_edit_payload_of_an_open_dead_letter(api, letters):
    url = f"/api/v1/dead-letters/{letters[0].pk}/"
    response = api.patch(url, {"payload": {"n": "7"}}, format="json")
    assert response.status_code == 200
    assert response.json()["payload"] == {"n": "7"}
    assert response.json()["edited"] is True
    assert api.patch(url, {"payload": "x"}, format="json").status_code == 400
    assert api.patch(url, {"error": "hidden"}, format="json").json()["error"] == (
        "n: cannot convert 'x' to integer"
    )


@pytest.mark.django_db
def test_discard_one_and_many(api, letters):
    one = api.post(
        f"/api/v1/dead-letters/{letters[0].pk}/discard/", {"reason": "test data"}
    )
    assert one.status_code == 200
    assert (one.json()["state"], one.json()["discard_reason"]) == (
        "discarded",
        "test data",
    )
    again = api.post(f"/api/v1/dead-letters/{letters[0].pk}/discard/", {"reason": "x"})
    assert again.status_code == 409
    many = api.post(
        "/api/v1/dead-letters/discard/",
        {"filter": {"pipeline": letters[0].pipeline.name}, "reason": "bulk"},
        format="json",
    )
    assert many.json() == {"count": 2}
    edit = api.patch(
        f"/api/v1/dead-letters/{letters[1].pk}/", {"payload": {}}, format="json"
    )
    assert edit.status_code == 400
    assert "discarded" in edit.json()["payload"][0]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "ids"),
        ({"ids": []}, "ids"),
        ({"ids": [987654321]}, "ids"),
        ({"filter": {"state": "nope"}}, "filter"),
        ({"ids": ["x"]}, "ids"),
    ],
    ids=["empty", "empty-ids", "unknown-ids", "bad-filter", "bad-id"],
)
def test_replay_bad_selection_is_400(api, letters, body, field):
    response = api.post("/api/v1/dead-letters/replay/", body, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()


@pytest.mark.django_db
def test_replay_creates_a_replay_run(api, letters, sent):
    response = api.post(
        "/api/v1/dead-letters/replay/",
        {"ids": [dl.pk for dl in letters]},
        format="json",
    )
    assert response.status_code == 202
    run = Run.objects.get(pk=response.json()["id"])
    assert run.kind == "replay"
    assert run.params == {"dead_letter_ids": sorted(dl.pk for dl in letters)}
    services.plan_run(run.pk)
    (chunk,) = ChunkRun.objects.filter(run=run)
    assert chunk.spec == {"dead_letter_ids": sorted(dl.pk for dl in letters)}


@pytest.mark.django_db
def test_send_chunk_fixes_the_ids_of_its_three_tasks():
    ids = orchestration.send_chunk(1, 0, "token", "cid")
    assert len(ids) == len(set(ids)) == 3


@pytest.mark.django_db
def test_send_chunk_fused_is_one_task_to_revoke():
    assert len(orchestration.send_chunk(1, 0, "token", "cid", fused=True)) == 1
