"""Credentials: secrets are write-only and never appear in a response or the admin."""

from __future__ import annotations

import pytest

from connectors.models import Credential
from tests.helpers import unique

pytestmark = pytest.mark.django_db

SECRET = "s3cr3t-Value-that-must-never-leak"


def _create(api, **secrets):
    name = unique("cred")
    response = api.post(
        "/api/v1/credentials/",
        {"name": name, "secrets": secrets or {"password": SECRET}},
        format="json",
    )
    assert response.status_code == 201, response.content
    return response


def test_create_returns_field_names_not_values(api):
    response = _create(api, password=SECRET, token="another-" + SECRET)
    body = response.json()
    assert "secrets" not in body
    assert body["field_names"] == ["password", "token"]
    assert SECRET not in response.content.decode()


def test_secret_is_encrypted_at_rest_and_decrypts(api):
    body = _create(api).json()
    row = Credential.objects.get(pk=body["id"])
    assert SECRET not in row.ciphertext
    assert row.get_secrets() == {"password": SECRET}
    assert row.key_id == body["key_id"]


def test_secret_never_in_any_api_response(api):
    body = _create(api).json()
    pages = [
        api.get("/api/v1/credentials/"),
        api.get(f"/api/v1/credentials/{body['id']}/"),
        api.patch(
            f"/api/v1/credentials/{body['id']}/", {"description": "x"}, format="json"
        ),
        api.get("/api/schema/"),
    ]
    for page in pages:
        assert page.status_code == 200
        assert SECRET not in page.content.decode()


def test_update_secrets_replaces_them(api):
    body = _create(api).json()
    response = api.patch(
        f"/api/v1/credentials/{body['id']}/",
        {"secrets": {"password": "new-" + SECRET}},
        format="json",
    )
    assert response.status_code == 200
    assert SECRET not in response.content.decode()
    assert Credential.objects.get(pk=body["id"]).get_secrets() == {
        "password": "new-" + SECRET
    }


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "ok-name"}, "secrets"),
        ({"name": "ok-name", "secrets": {}}, "secrets"),
        ({"name": "ok-name", "secrets": "nope"}, "secrets"),
        ({"name": "has spaces!", "secrets": {"a": "b"}}, "name"),
    ],
    ids=["missing", "empty", "not-object", "bad-name"],
)
def test_bad_body_is_400_naming_the_field(api, body, field):
    response = api.post("/api/v1/credentials/", body, format="json")
    assert response.status_code == 400
    assert field in response.json()


def test_secret_never_in_admin_pages(client, admin_user_obj, api):
    body = _create(api).json()
    client.force_login(admin_user_obj)
    for url in [
        "/admin/connectors/credential/",
        f"/admin/connectors/credential/{body['id']}/change/",
        "/admin/connectors/credential/add/",
    ]:
        page = client.get(url)
        assert page.status_code == 200
        assert SECRET not in page.content.decode()


def test_admin_creates_credential_from_name_value_lines(client, admin_user_obj):
    client.force_login(admin_user_obj)
    name = unique("admincred")
    page = client.post(
        "/admin/connectors/credential/add/",
        {"name": name, "description": "", "secrets": f"password={SECRET}\ntoken=t"},
    )
    assert page.status_code == 302
    assert Credential.objects.get(name=name).get_secrets() == {
        "password": SECRET,
        "token": "t",
    }


def test_unknown_id_is_404(api):
    assert api.get("/api/v1/credentials/999999999/").status_code == 404
