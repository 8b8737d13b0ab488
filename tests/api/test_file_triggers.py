"""File trigger API and admin: bindings are checked, counters are read-only."""

from __future__ import annotations

from typing import Any

import pytest

from connectors.models import Connector
from integration import file_triggers
from integration.models import FileTrigger, Pipeline
from tests.helpers import unique

pytestmark = pytest.mark.django_db


@pytest.fixture
def parts(sqlite_sink: Connector) -> dict[str, Any]:
    kafka = Connector.objects.create(
        name=unique("kafka"), kind="kafka", config={"bootstrap_servers": "k:9092"}
    )
    fps = Connector.objects.create(
        name=unique("fps"),
        kind="file_processing",
        config={"base_url": "https://fps.example.com"},
    )
    pipeline = Pipeline.objects.create(
        name=unique("p"), source=fps, sink=sqlite_sink, sink_options={"table": "t"}
    )
    other = Pipeline.objects.create(
        name=unique("p"),
        source=kafka,
        sink=sqlite_sink,
        source_options={"topic": "t", "group_id": "g"},
        sink_options={"table": "t"},
    )
    return {"kafka": kafka, "fps": fps, "pipeline": pipeline, "other": other}


def body(parts: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {
        "name": unique("ft"),
        "connector": parts["kafka"].name,
        "topic": "files.processed",
        "pipeline": parts["pipeline"].name,
        "filename_pattern": "orders-*.csv",
        "content_type": "text/csv",
        **changes,
    }


def test_create_and_list_a_file_trigger(api, parts):
    response = api.post("/api/v1/file-triggers/", body(parts), format="json")

    assert response.status_code == 201, response.content
    created = response.json()
    assert created["runs_started"] == 0
    listed = api.get("/api/v1/file-triggers/", {"pipeline": parts["pipeline"].name})
    assert [t["name"] for t in listed.json()["results"]] == [created["name"]]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        pytest.param({"connector": "fps"}, "connector", id="not-kafka"),
        pytest.param({"pipeline": "other"}, "pipeline", id="source-not-fps"),
        pytest.param(
            {"filename_pattern": "", "content_type": ""},
            "filename_pattern",
            id="matches-everything",
        ),
        pytest.param({"topic": "bad topic!"}, "topic", id="bad-topic"),
    ],
)
def test_a_bad_binding_is_400_naming_the_field(api, parts, changes, field):
    resolved = {k: parts[v].name if v in parts else v for k, v in changes.items()}

    response = api.post(
        "/api/v1/file-triggers/", body(parts, **resolved), format="json"
    )

    assert response.status_code == 400
    assert field in response.json()


def test_counters_cannot_be_written(api, parts):
    created = api.post("/api/v1/file-triggers/", body(parts), format="json").json()

    response = api.patch(
        f"/api/v1/file-triggers/{created['id']}/",
        {"runs_started": 99, "is_paused": True},
        format="json",
    )

    assert response.status_code == 200
    trigger = FileTrigger.objects.get(pk=created["id"])
    assert (trigger.runs_started, trigger.is_paused) == (0, True)


def test_a_loopback_service_url_is_400_at_save(api):
    response = api.post(
        "/api/v1/connectors/",
        {
            "name": unique("fps"),
            "kind": "file_processing",
            "config": {"base_url": "http://127.0.0.1:9/"},
        },
        format="json",
    )

    assert response.status_code == 400
    assert "base_url" in str(response.json()["config"])


def test_admin_lists_and_searches_file_triggers(client, admin_user_obj, parts):
    FileTrigger.objects.create(
        name="invoices-in",
        connector=parts["kafka"],
        topic="files.processed",
        pipeline=parts["pipeline"],
        content_type="application/pdf",
    )
    client.force_login(admin_user_obj)

    page = client.get("/admin/integration/filetrigger/", {"q": "invoices"})

    assert page.status_code == 200
    assert b"invoices-in" in page.content


@pytest.mark.parametrize(
    ("pattern", "content_type", "event", "expected"),
    [
        pytest.param("orders-*.csv", "", {"url": "/a/orders-1.csv"}, True, id="name"),
        pytest.param("orders-*.csv", "", {"url": "/a/x-1.csv"}, False, id="other-name"),
        pytest.param("/in/*/*.csv", "", {"url": "/in/eu/a.csv"}, True, id="path"),
        pytest.param(
            "",
            "text/csv",
            {"url": "/x", "content_type": "Text/CSV; charset=utf-8"},
            True,
            id="type-params-ignored",
        ),
        pytest.param(
            "*.csv",
            "application/*",
            {"url": "/a.csv", "content_type": "text/csv"},
            False,
            id="both-must-match",
        ),
    ],
)
def test_matching(pattern, content_type, event, expected):
    trigger = FileTrigger(filename_pattern=pattern, content_type=content_type)

    assert file_triggers.matches(trigger, {"content_type": None, **event}) is expected


@pytest.mark.parametrize(
    ("text", "error"),
    [
        pytest.param(None, "empty message", id="empty"),
        pytest.param("[1]", "not a JSON object", id="array"),
        pytest.param(
            '{"file_id": "a", "url": "/x", "size": 1}', "missing sha256", id="no-sha"
        ),
        pytest.param(
            '{"file_id": "a", "url": "/x", "size": true, "sha256": "' + "a" * 64 + '"}',
            "size: not an integer",
            id="bool-size",
        ),
        pytest.param(
            '{"file_id": "a", "url": "/x", "size": 1, "sha256": "zz"}',
            "sha256",
            id="bad-sha",
        ),
    ],
)
def test_malformed_events(text, error):
    with pytest.raises(file_triggers.MalformedEventError, match=error):
        file_triggers.parse_event(text)
