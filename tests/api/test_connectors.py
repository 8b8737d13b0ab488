"""Connectors API: config validated by the plugin schema, secrets kept out of config."""

from __future__ import annotations

import pytest

from connectors.models import Connector
from tests.helpers import unique

pytestmark = pytest.mark.django_db


def test_create_generator_connector(api):
    name = unique("gen")
    response = api.post(
        "/api/v1/connectors/",
        {"name": name, "kind": "generator", "config": {"rows": 5}},
        format="json",
    )
    assert response.status_code == 201, response.content
    assert response.json()["config"] == {"rows": 5}
    assert Connector.objects.get(name=name).kind == "generator"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"kind": "nope", "config": {}}, "kind"),
        ({"kind": "generator", "config": {"rows": "many"}}, "config"),
        ({"kind": "generator", "config": {}}, "config"),
        ({"kind": "generator", "config": []}, "config"),
        ({"kind": "generator"}, "config"),
    ],
    ids=["unknown-kind", "bad-type", "missing-key", "not-object", "no-config"],
)
def test_bad_connector_is_400_naming_the_field(api, body, field):
    response = api.post(
        "/api/v1/connectors/", {"name": unique("c"), **body}, format="json"
    )
    assert response.status_code == 400
    assert field in response.json()


def test_config_error_names_the_config_key(api):
    response = api.post(
        "/api/v1/connectors/",
        {"name": unique("c"), "kind": "generator", "config": {"rows": -1}},
        format="json",
    )
    assert response.status_code == 400
    assert "rows" in response.json()["config"]


def test_filter_by_kind(api, generator_connector):
    listed = api.get("/api/v1/connectors/", {"kind": "generator"}).json()
    assert generator_connector.name in [c["name"] for c in listed["results"]]
    assert api.get("/api/v1/connectors/", {"kind": "files"}).json()["count"] == 0


def test_test_action_reports_and_records(api, generator_connector):
    response = api.post(f"/api/v1/connectors/{generator_connector.pk}/test/")
    assert response.status_code == 200
    assert response.json()["ok"] is True
    generator_connector.refresh_from_db()
    assert generator_connector.last_check_status == "ok"


def test_duplicate_name_is_400(api, generator_connector):
    response = api.post(
        "/api/v1/connectors/",
        {"name": generator_connector.name, "kind": "generator", "config": {"rows": 1}},
        format="json",
    )
    assert response.status_code == 400
    assert "name" in response.json()


def test_unknown_connector_is_404(api):
    assert api.get("/api/v1/connectors/987654321/").status_code == 404
    assert api.post("/api/v1/connectors/987654321/test/").status_code == 404


def test_malformed_json_is_400(api):
    response = api.generic(
        "POST", "/api/v1/connectors/", "{not json", content_type="application/json"
    )
    assert response.status_code == 400


def test_discover_returns_streams_and_fields(api, generator_connector):
    response = api.post(f"/api/v1/connectors/{generator_connector.pk}/discover/")
    assert response.status_code == 200
    assert response.json() == [
        {
            "name": "rows",
            "fields": [
                {"name": "id", "type": "string", "nullable": True},
                {"name": "label", "type": "string", "nullable": True},
            ],
        }
    ]


def test_discover_on_a_kind_that_cannot_is_400(api, tmp_path):
    from connectors.models import Connector

    kafka_like = Connector.objects.create(
        name=unique("rest"),
        kind="rest",
        config={"base_url": "https://api.example.com"},
    )
    response = api.post(f"/api/v1/connectors/{kafka_like.pk}/discover/")
    assert response.status_code == 400
    assert "cannot discover" in response.json()["detail"]


def test_breaker_state_is_shown_and_can_be_reset(api, generator_connector):
    body = api.get(f"/api/v1/connectors/{generator_connector.pk}/").json()
    assert body["breaker"] == {
        "state": "closed",
        "failures": 0,
        "opened_at": None,
        "retry_after": 0.0,
    }
    response = api.post(f"/api/v1/connectors/{generator_connector.pk}/reset-breaker/")
    assert response.status_code == 200
    assert response.json()["breaker"]["state"] == "closed"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:127.0.0.1]/",
        "http://[64:ff9b::7f00:1]/",
        "http://10.0.0.5/",
    ],
    ids=["loopback", "metadata", "mapped-v6", "nat64", "private"],
)
def test_unsafe_rest_url_is_400_at_save(api, url):
    response = api.post(
        "/api/v1/connectors/",
        {"name": unique("rest"), "kind": "rest", "config": {"base_url": url}},
        format="json",
    )
    assert response.status_code == 400
    assert "base_url" in response.json()["config"]


def test_allow_listed_loopback_is_accepted(api, settings):
    settings.DIS_ALLOWED_NETWORKS = ["127.0.0.1/32"]
    response = api.post(
        "/api/v1/connectors/",
        {
            "name": unique("rest"),
            "kind": "rest",
            "config": {"base_url": "http://127.0.0.1:9/"},
        },
        format="json",
    )
    assert response.status_code == 201, response.content
