"""The mapping API: rule validation, versions, and the side-effect-free preview."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest
from django.apps import apps
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tests.helpers import unique
from transforms.engine import compile_steps
from transforms.models import MappingVersion
from transforms.services import jsonable

RULES = [
    {"name": "id", "expr": "id", "type": "integer", "required": True},
    {"name": "amount", "expr": "amount", "type": "decimal", "scale": 2},
    {"name": "paid_on", "expr": "paid", "type": "date"},
    {"name": "city", "expr": "address->>'city'", "type": "string"},
    {"name": "vip", "expr": "vip", "type": "boolean", "default": False},
    {"name": "source", "expr": "'api'", "type": "string"},
]
RECORDS = [
    {"id": 1, "amount": "10.50", "paid": "2024-02-29", "address": {"city": "Oslo"}},
    {"id": "x", "amount": "1.5", "paid": "2024-01-01", "vip": True},
    {"id": 3, "amount": "2.555", "paid": "2013-02-30", "vip": None},
    {"id": 4, "amount": 7, "paid": None, "address": {"city": None}, "vip": False},
]
SOURCE = {
    "type": "record",
    "name": "Payment",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "amount", "type": "string"},
        {"name": "paid", "type": ["null", "string"], "default": None},
        {"name": "address", "type": ["null", "string"], "default": None},
        {"name": "vip", "type": ["null", "string"], "default": None},
    ],
}
TARGET = {
    "type": "record",
    "name": "Payment",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "amount", "type": "string"},
        {"name": "currency", "type": "string"},
        {"name": "note", "type": ["null", "string"], "default": None},
    ],
}


def make_subject(api, definition: dict[str, Any]) -> str:
    name = unique("subject")
    response = api.post(
        "/api/v1/schemas/", {"name": name, "definition": definition}, format="json"
    )
    assert response.status_code == 201, response.json()
    return name


def make_mapping(api, rules: list[dict[str, Any]] = RULES, **extra: Any) -> dict:
    response = api.post(
        "/api/v1/mappings/",
        {"name": unique("payments"), "rules": rules, **extra},
        format="json",
    )
    assert response.status_code == 201, response.json()
    return response.json()


@pytest.fixture
def mapping(api) -> dict[str, Any]:
    return make_mapping(api)


def test_create_freezes_version_one(mapping):
    assert mapping["current_version"]["number"] == 1
    assert mapping["current_version"]["rules"] == RULES
    assert len(mapping["current_version"]["content_hash"]) == 64


def test_new_version_only_when_rules_change(api, mapping):
    url = f"/api/v1/mappings/{mapping['id']}/"
    same = api.patch(url, {"rules": RULES, "description": "x"}, format="json")
    assert same.json()["current_version"]["number"] == 1
    changed = api.patch(url, {"rules": RULES[:2]}, format="json")
    assert changed.json()["current_version"]["number"] == 2
    back = api.patch(url, {"rules": RULES}, format="json")
    assert back.json()["current_version"]["number"] == 1
    versions = api.get(f"{url}versions/").json()["results"]
    assert [v["number"] for v in versions] == [2, 1]


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        pytest.param([], "rules: must be a non-empty list of field rules", id="empty"),
        pytest.param(
            {"a": 1}, "rules: must be a non-empty list of field rules", id="obj"
        ),
        pytest.param(
            [{"name": "id", "type": "integer"}, {"name": "x", "type": "flot"}],
            "rules[1] (x): unknown type 'flot'",
            id="unknown-type",
        ),
        pytest.param(
            [{"name": "x", "expr": "read_csv('/etc/passwd')", "type": "string"}],
            None,
            id="table-function",
        ),
        pytest.param(
            [{"name": "x", "expr": "a +", "type": "string"}], None, id="syntax"
        ),
        pytest.param(
            [{"name": "x", "type": "string"}, {"name": "X", "type": "string"}],
            "rules[1] (X): duplicate field name 'X'",
            id="duplicate",
        ),
        pytest.param(
            [{"name": "x", "type": "string", "colour": "red"}], None, id="unknown-key"
        ),
    ],
)
def test_invalid_rules_are_400_naming_the_position(api, rules, message):
    response = api.post(
        "/api/v1/mappings/", {"name": unique("bad"), "rules": rules}, format="json"
    )
    assert response.status_code == 400
    errors = response.json()["rules"]
    assert len(errors) == 1
    if message is not None:
        assert errors[0] == message
    else:
        assert errors[0].startswith("rules[")


def test_rules_may_only_read_source_fields(api):
    source = make_subject(api, SOURCE)
    response = api.post(
        "/api/v1/mappings/",
        {
            "name": unique("m"),
            "source_subject": source,
            "rules": [{"name": "x", "expr": "amout", "type": "string"}],
        },
        format="json",
    )
    assert response.status_code == 400
    assert response.json()["rules"][0].startswith("rules[0] (x): ")
    assert "amout" in response.json()["rules"][0]


def test_rules_must_produce_required_target_fields(api):
    target = make_subject(api, TARGET)
    response = api.post(
        "/api/v1/mappings/",
        {
            "name": unique("m"),
            "target_subject": target,
            "rules": [{"name": "id", "type": "integer"}],
        },
        format="json",
    )
    assert response.status_code == 400
    assert response.json() == {
        "rules": [
            f"rules: do not produce the required fields of {target} version 1: "
            "amount, currency"
        ]
    }
    ok = make_mapping(
        api,
        [
            {"name": "id", "type": "integer"},
            {"name": "amount", "type": "string"},
            {"name": "currency", "expr": "'EUR'", "type": "string"},
        ],
        target_subject=target,
    )
    assert ok["target_subject"] == target


def test_unknown_subject_and_mapping_ids(api):
    response = api.post(
        "/api/v1/mappings/",
        {"name": unique("m"), "source_subject": "nope", "rules": RULES},
        format="json",
    )
    assert response.status_code == 400
    assert list(response.json()) == ["source_subject"]
    assert api.get("/api/v1/mappings/999999999/").status_code == 404
    assert (
        api.post(
            "/api/v1/mappings/999999999/preview/", {"records": []}, format="json"
        ).status_code
        == 404
    )


# --- Preview --------------------------------------------------------------------


def engine_result(rules: list[dict[str, Any]], table: pa.Table) -> tuple[list, list]:
    with compile_steps([{"type": "map", "fields": rules}]) as compiled:
        result = compiled.run(table)
    outputs = [jsonable(row) for row in result.output.to_pylist()]
    errors = result.rejected.select(["_source_ref", "_error", "_step"]).to_pylist()
    return outputs, errors


def as_text_table(records: list[dict[str, Any]]) -> pa.Table:
    """What a CSV source would read: strings, JSON for objects, null stays null."""
    columns = ["id", "amount", "paid", "address", "vip"]
    cells: dict[str, list[str | None]] = {c: [] for c in columns}
    for record in records:
        for c in columns:
            value = record.get(c)
            if isinstance(value, dict):
                value = (
                    '{"city":'
                    + ("null" if value["city"] is None else f'"{value["city"]}"')
                    + "}"
                )
            elif isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, int):
                value = str(value)
            cells[c].append(value)
    return pa.table(
        {
            **{c: pa.array(v, pa.string()) for c, v in cells.items()},
            "_source_ref": [f"preview#{i}" for i in range(len(records))],
        }
    )


def test_preview_equals_the_engine_on_the_same_records(api, mapping):
    response = api.post(
        f"/api/v1/mappings/{mapping['id']}/preview/",
        {"records": RECORDS},
        format="json",
    )
    assert response.status_code == 200, response.json()
    body = response.json()
    outputs, errors = engine_result(RULES, as_text_table(RECORDS))
    assert body["version"] == 1
    assert body["rows_in"] == 4
    assert body["outputs"] == outputs
    assert [
        {"source_ref": e["source_ref"], "error": e["error"], "step": e["step"]}
        for e in body["errors"]
    ] == [
        {"source_ref": e["_source_ref"], "error": e["_error"], "step": e["_step"]}
        for e in errors
    ]
    assert body["outputs"] == [
        {
            "id": 1,
            "amount": "10.50",
            "paid_on": "2024-02-29",
            "city": "Oslo",
            "vip": False,
            "source": "api",
            "_source_ref": "preview#0",
        },
        {
            "id": 4,
            "amount": "7.00",
            "paid_on": None,
            "city": None,
            "vip": False,
            "source": "api",
            "_source_ref": "preview#3",
        },
    ]
    assert [(e["index"], e["step"]) for e in body["errors"]] == [
        (1, "map"),
        (2, "map"),
    ]
    assert "id" in body["errors"][0]["error"]
    assert "'x'" in body["errors"][0]["error"]
    assert "paid_on" in body["errors"][1]["error"]
    assert body["column_lineage"] == {
        "id": ["id"],
        "amount": ["amount"],
        "paid_on": ["paid"],
        "city": ["address"],
        "vip": ["vip"],
        "source": [],
    }


def table_counts() -> dict[str, int]:
    models = [
        *apps.get_app_config("transforms").get_models(),
        *apps.get_app_config("integration").get_models(),
        *apps.get_app_config("connectors").get_models(),
    ]
    return {m._meta.label: m.objects.count() for m in models}


def test_preview_writes_nothing(api, mapping):
    before = table_counts()
    with CaptureQueriesContext(connection) as queries:
        response = api.post(
            f"/api/v1/mappings/{mapping['id']}/preview/",
            {"records": RECORDS},
            format="json",
        )
    assert response.status_code == 200
    assert table_counts() == before
    writes = [
        q["sql"]
        for q in queries.captured_queries
        if q["sql"].lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE"))
        and "knox_authtoken" not in q["sql"]  # the token's last-seen stamp
    ]
    assert writes == []


def test_preview_typed_values_reach_nested_fields(api):
    mapping = make_mapping(
        api,
        [
            {"name": "city", "expr": "address.city", "type": "string"},
            {"name": "n", "expr": "len(tags)", "type": "integer"},
        ],
    )
    response = api.post(
        f"/api/v1/mappings/{mapping['id']}/preview/",
        {
            "records": [{"address": {"city": "Oslo"}, "tags": ["a", "b"]}],
            "values": "typed",
        },
        format="json",
    )
    assert response.status_code == 200, response.json()
    assert response.json()["outputs"] == [
        {"city": "Oslo", "n": 2, "_source_ref": "preview#0"}
    ]


def test_preview_runs_an_older_version(api, mapping):
    api.patch(
        f"/api/v1/mappings/{mapping['id']}/",
        {"rules": [{"name": "id", "type": "integer"}]},
        format="json",
    )
    url = f"/api/v1/mappings/{mapping['id']}/preview/"
    records = [{**RECORDS[0], "vip": "yes"}]
    current = api.post(url, {"records": records}, format="json").json()
    old = api.post(url, {"records": records, "version": 1}, format="json").json()
    assert current["version"] == 2
    assert current["outputs"] == [{"id": 1, "_source_ref": "preview#0"}]
    assert old["version"] == 1
    assert old["outputs"][0]["amount"] == "10.50"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param({}, "records", id="nothing"),
        pytest.param({"records": [1]}, "records", id="not-objects"),
        pytest.param({"records": [{"_source_ref": "x"}]}, "records", id="reserved"),
        pytest.param(
            {"records": [{"id": 1}], "version": 7}, "version", id="no-version"
        ),
        pytest.param({"records": [{"idx": 1}]}, "records", id="missing-column"),
        pytest.param(
            {"records": [{"id": 1}, {"id": "a"}], "values": "typed"},
            "records",
            id="mixed-types",
        ),
        pytest.param({"connector": "nope"}, "connector", id="unknown-connector"),
        pytest.param({"records": [{"id": 1}], "connector": "x"}, "records", id="both"),
    ],
)
def test_preview_400_names_the_field(api, body, field):
    mapping = make_mapping(api, [{"name": "id", "expr": "id", "type": "integer"}])
    response = api.post(
        f"/api/v1/mappings/{mapping['id']}/preview/", body, format="json"
    )
    assert response.status_code == 400, response.json()
    assert list(response.json()) == [field]


def test_preview_samples_a_source_connector(api, generator_connector):
    mapping = make_mapping(
        api,
        [
            {"name": "id", "expr": "id", "type": "integer"},
            {"name": "label", "expr": "upper(label)", "type": "string"},
        ],
    )
    response = api.post(
        f"/api/v1/mappings/{mapping['id']}/preview/",
        {"connector": generator_connector.name, "limit": 3},
        format="json",
    )
    assert response.status_code == 200, response.json()
    assert response.json()["outputs"] == [
        {"id": n, "label": f"ROW-{n}", "_source_ref": f"gen#{n}"} for n in (1, 2, 3)
    ]
    assert MappingVersion.objects.filter(mapping_id=mapping["id"]).count() == 1
