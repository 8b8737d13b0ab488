"""Admin pages of schema subjects, versions, mappings and the mapping preview."""

from __future__ import annotations

import json

import pytest

from tests.helpers import unique
from transforms import services
from transforms.models import Mapping, SchemaSubject

V1 = {
    "type": "record",
    "name": "Customer",
    "fields": [{"name": "id", "type": "long"}, {"name": "email", "type": "string"}],
}
RULES = [
    {"name": "id", "expr": "id", "type": "integer"},
    {"name": "email", "expr": "lower(email)", "type": "string"},
]


@pytest.fixture
def staff(client, admin_user_obj):
    client.force_login(admin_user_obj)
    return client


@pytest.fixture
def subject(db) -> SchemaSubject:
    return services.create_subject(name=unique("customers"), definition=V1)


@pytest.fixture
def mapping(db, subject) -> Mapping:
    mapping = Mapping.objects.create(
        name=unique("m"), source_subject=subject, rules=RULES
    )
    services.save_mapping(mapping)
    return mapping


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("/admin/transforms/schemasubject/", id="subjects"),
        pytest.param("/admin/transforms/schemasubject/add/", id="subject-add"),
        pytest.param("/admin/transforms/schemaversion/", id="versions"),
        pytest.param("/admin/transforms/mapping/", id="mappings"),
        pytest.param("/admin/transforms/mapping/add/", id="mapping-add"),
        pytest.param("/admin/transforms/mappingversion/", id="mapping-versions"),
        pytest.param("/admin/transforms/schemasubject/?q=customers", id="search"),
        pytest.param(
            "/admin/transforms/schemasubject/?compatibility__exact=full", id="filter"
        ),
    ],
)
def test_admin_lists_and_add_pages_load(staff, mapping, url):
    assert staff.get(url).status_code == 200


def test_admin_detail_pages_show_derived_schemas(staff, subject, mapping):
    version = subject.latest_version
    page = staff.get(f"/admin/transforms/schemaversion/{version.pk}/change/")
    assert page.status_code == 200
    assert b"draft/2020-12" in page.content
    assert b"int64" in page.content
    assert (
        staff.get(f"/admin/transforms/schemasubject/{subject.pk}/change/").status_code
        == 200
    )
    page = staff.get(f"/admin/transforms/mapping/{mapping.pk}/change/")
    assert page.status_code == 200
    assert f"/admin/transforms/mapping/{mapping.pk}/preview/".encode() in page.content
    assert (
        staff.get(
            f"/admin/transforms/mappingversion/{mapping.current_version_id}/change/"
        ).status_code
        == 200
    )


def test_admin_registers_a_version_and_refuses_an_incompatible_one(staff, subject):
    url = f"/admin/transforms/schemasubject/{subject.pk}/change/"
    form = {
        "name": subject.name,
        "compatibility": "backward",
        "description": "",
        "versions-TOTAL_FORMS": "1",
        "versions-INITIAL_FORMS": "1",
        "versions-MIN_NUM_FORMS": "0",
        "versions-MAX_NUM_FORMS": "1000",
        "versions-0-id": str(subject.latest_version.pk),
        "versions-0-subject": str(subject.pk),
    }
    removed = {**V1, "fields": V1["fields"][:1]}
    refused = staff.post(url, {**form, "new_version": json.dumps(removed)})
    assert refused.status_code == 200
    assert b"field &#x27;email&#x27; was removed" in refused.content
    assert subject.versions.count() == 1
    added = {
        **V1,
        "fields": [*V1["fields"], {"name": "n", "type": "int", "default": 0}],
    }
    saved = staff.post(url, {**form, "new_version": json.dumps(added)})
    assert saved.status_code == 302
    assert subject.latest_version.number == 2


def test_admin_mapping_form_reports_rule_errors(staff, subject):
    response = staff.post(
        "/admin/transforms/mapping/add/",
        {
            "name": unique("m"),
            "description": "",
            "source_subject": str(subject.pk),
            "target_subject": "",
            "rules": json.dumps([{"name": "id", "type": "flot"}]),
            "versions-TOTAL_FORMS": "0",
            "versions-INITIAL_FORMS": "0",
            "versions-MIN_NUM_FORMS": "0",
            "versions-MAX_NUM_FORMS": "1000",
        },
    )
    assert response.status_code == 200
    assert b"rules[0] (id): unknown type" in response.content


def test_admin_preview_shows_outputs_and_errors(staff, mapping):
    url = f"/admin/transforms/mapping/{mapping.pk}/preview/"
    assert staff.get(url).status_code == 200
    records = [{"id": 1, "email": "A@B.C"}, {"id": "x", "email": "d@e.f"}]
    page = staff.post(url, {"records": json.dumps(records), "values": "text"})
    assert page.status_code == 200
    content = page.content.decode()
    assert "1 output(s)" in content
    assert "1 error(s) of 2 record(s)" in content
    assert "a@b.c" in content
    bad = staff.post(url, {"records": json.dumps([{"x": 1}]), "values": "text"})
    assert bad.status_code == 200
    assert "the sample does not fit the rules" in bad.content.decode()
