"""The schema registry API: subjects, versions, compatibility, inference."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import unique
from transforms.models import Mapping, SchemaSubject, SchemaVersion

V1 = {
    "type": "record",
    "name": "Customer",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "email", "type": "string"},
        {"name": "note", "type": ["null", "string"], "default": None},
    ],
}


def without(name: str) -> dict[str, Any]:
    return {**V1, "fields": [f for f in V1["fields"] if f["name"] != name]}


def plus(field: dict[str, Any]) -> dict[str, Any]:
    return {**V1, "fields": [*V1["fields"], field]}


@pytest.fixture
def subject(api) -> dict[str, Any]:
    response = api.post(
        "/api/v1/schemas/",
        {"name": unique("customers"), "definition": V1},
        format="json",
    )
    assert response.status_code == 201, response.json()
    return response.json()


def test_create_subject_registers_version_one_with_derived_schemas(api, subject):
    latest = subject["latest_version"]
    assert subject["compatibility"] == "backward"
    assert "definition" not in subject
    assert latest["number"] == 1
    assert latest["subject"] == subject["name"]
    assert latest["definition"] == V1
    assert len(latest["fingerprint"]) == 64
    assert latest["arrow_schema"] == [
        {"name": "id", "type": "int64", "nullable": False},
        {"name": "email", "type": "string", "nullable": False},
        {"name": "note", "type": "string", "nullable": True},
    ]
    assert latest["json_schema"]["required"] == ["id", "email"]
    assert latest["json_schema"]["$schema"] == (
        "https://json-schema.org/draft/2020-12/schema"
    )


def test_create_subject_without_definition_has_no_version(api):
    response = api.post(
        "/api/v1/schemas/",
        {"name": unique("empty"), "compatibility": "full"},
        format="json",
    )
    assert response.status_code == 201
    assert response.json()["latest_version"] is None


def test_invalid_definition_creates_nothing(api):
    name = unique("bad")
    response = api.post(
        "/api/v1/schemas/",
        {"name": name, "definition": {"type": "record", "name": "R", "fields": 3}},
        format="json",
    )
    assert response.status_code == 400
    assert list(response.json()) == ["definition"]
    assert response.json()["definition"][0].startswith("invalid Avro schema:")
    assert not SchemaSubject.objects.filter(name=name).exists()


def test_compatible_version_is_registered_and_same_definition_is_reused(api, subject):
    url = f"/api/v1/schemas/{subject['id']}/versions/"
    v2 = plus({"name": "age", "type": ["null", "int"], "default": None})
    created = api.post(url, {"definition": v2}, format="json")
    assert created.status_code == 201
    assert created.json()["number"] == 2
    again = api.post(url, {"definition": v2}, format="json")
    assert again.status_code == 200
    assert again.json()["id"] == created.json()["id"]
    listed = api.get(url)
    assert [v["number"] for v in listed.json()["results"]] == [2, 1]
    one = api.get(f"{url}1/")
    assert one.status_code == 200
    assert one.json()["definition"] == V1
    assert api.get(f"{url}9/").status_code == 404


def test_removing_a_required_field_is_refused_under_backward_with_the_reason(
    api, subject
):
    response = api.post(
        f"/api/v1/schemas/{subject['id']}/versions/",
        {"definition": without("email")},
        format="json",
    )
    assert response.status_code == 400
    assert response.json() == {
        "definition": [
            "incompatible under backward compatibility: field 'email' was removed, "
            "but it is required in version 1 (it has no default)"
        ]
    }
    assert SchemaVersion.objects.filter(subject_id=subject["id"]).count() == 1


def test_removing_an_optional_field_is_allowed_under_backward(api, subject):
    response = api.post(
        f"/api/v1/schemas/{subject['id']}/versions/",
        {"definition": without("note")},
        format="json",
    )
    assert response.status_code == 201


@pytest.mark.parametrize(
    ("mode", "status"),
    [
        pytest.param("backward", 400, id="backward"),
        pytest.param("forward", 201, id="forward"),
        pytest.param("full", 400, id="full"),
        pytest.param("none", 201, id="none"),
    ],
)
def test_added_field_without_default_per_mode(api, subject, mode, status):
    api.patch(f"/api/v1/schemas/{subject['id']}/", {"compatibility": mode})
    response = api.post(
        f"/api/v1/schemas/{subject['id']}/versions/",
        {"definition": plus({"name": "age", "type": "int"})},
        format="json",
    )
    assert response.status_code == status, response.json()


def test_compatibility_check_registers_nothing(api, subject):
    response = api.post(
        f"/api/v1/schemas/{subject['id']}/compatibility/",
        {"definition": plus({"name": "age", "type": "int"})},
        format="json",
    )
    assert response.status_code == 200
    assert response.json() == {
        "compatible": False,
        "compatibility": "backward",
        "latest_version": 1,
        "problems": [
            "the new schema cannot read data written with version 1: "
            "field 'age' is not in the data and has no default"
        ],
    }
    assert SchemaVersion.objects.filter(subject_id=subject["id"]).count() == 1


def test_definition_cannot_be_changed_by_update(api, subject):
    response = api.patch(
        f"/api/v1/schemas/{subject['id']}/", {"definition": V1}, format="json"
    )
    assert response.status_code == 400
    assert list(response.json()) == ["definition"]


def test_unknown_ids_are_404(api):
    assert api.get("/api/v1/schemas/999999999/").status_code == 404
    assert api.get("/api/v1/schemas/abc/").status_code == 404
    response = api.post(
        "/api/v1/schemas/999999999/versions/", {"definition": V1}, format="json"
    )
    assert response.status_code == 404


def test_list_filters_by_name_and_compatibility(api, subject):
    response = api.get("/api/v1/schemas/", {"name": subject["name"]})
    assert [s["id"] for s in response.json()["results"]] == [subject["id"]]
    response = api.get(
        "/api/v1/schemas/", {"name": subject["name"], "compatibility": "full"}
    )
    assert response.json()["results"] == []


def test_subject_used_by_a_mapping_is_not_deleted(api, subject):
    Mapping.objects.create(
        name=unique("m"),
        source_subject_id=subject["id"],
        rules=[{"name": "id", "type": "integer"}],
    )
    response = api.delete(f"/api/v1/schemas/{subject['id']}/")
    assert response.status_code == 409
    assert response.json()["detail"].startswith("in use by ")


def test_infer_returns_a_registrable_schema(api, subject):
    response = api.post(
        "/api/v1/schemas/infer/",
        {
            "records": [
                {"id": 1, "email": "a@example.com"},
                {"id": 2, "email": None, "score": 0.5},
            ],
            "name": "Customer",
        },
        format="json",
    )
    assert response.status_code == 200
    definition = response.json()["definition"]
    assert definition == {
        "type": "record",
        "name": "Customer",
        "fields": [
            {"name": "id", "type": "long"},
            {"name": "email", "type": ["null", "string"], "default": None},
            {"name": "score", "type": ["null", "double"], "default": None},
        ],
    }
    registered = api.post(
        "/api/v1/schemas/",
        {"name": unique("inferred"), "definition": definition},
        format="json",
    )
    assert registered.status_code == 201


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param({"records": []}, "records", id="empty"),
        pytest.param({"records": [1]}, "records", id="not-objects"),
        pytest.param({"records": [{"a b": 1}]}, "records", id="bad-key"),
        pytest.param({"records": [{"a": 1}], "name": "1x"}, "name", id="bad-name"),
    ],
)
def test_infer_400_names_the_field(api, body, field):
    response = api.post("/api/v1/schemas/infer/", body, format="json")
    assert response.status_code == 400
    assert list(response.json()) == [field]
