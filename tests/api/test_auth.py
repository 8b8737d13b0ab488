"""Authentication: token first (401 without one), tokens hashed with expiry."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone
from knox.models import AuthToken

pytestmark = pytest.mark.django_db

ENDPOINTS = [
    "/api/v1/credentials/",
    "/api/v1/connectors/",
    "/api/v1/pipelines/",
    "/api/v1/runs/",
    "/api/v1/dead-letters/",
]


@pytest.mark.parametrize("url", ENDPOINTS, ids=lambda u: u.split("/")[3])
def test_anonymous_call_is_401_with_token_challenge(anon, url):
    response = anon.get(url)
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"


@pytest.mark.parametrize("url", ENDPOINTS, ids=lambda u: u.split("/")[3])
def test_token_call_is_200(api, url):
    assert api.get(url).status_code == 200


def test_wrong_token_is_401(anon):
    anon.credentials(HTTP_AUTHORIZATION="Token " + "0" * 64)
    assert anon.get("/api/v1/runs/").status_code == 401


def test_expired_token_is_401(anon, user):
    instance, token = AuthToken.objects.create(user, expiry=timedelta(hours=1))
    AuthToken.objects.filter(pk=instance.pk).update(
        expiry=timezone.now() - timedelta(seconds=1)
    )
    anon.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    assert anon.get("/api/v1/runs/").status_code == 401


def test_tokens_are_stored_hashed(user):
    instance, token = AuthToken.objects.create(user)
    assert token not in instance.digest
    assert not AuthToken.objects.filter(digest=token).exists()


def test_create_api_token_command_prints_a_working_token(anon, user, capsys):
    call_command("create_api_token", user.username, "--expiry-hours", "2")
    token = capsys.readouterr().out.strip()
    anon.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    assert anon.get("/api/v1/runs/").status_code == 200
    stored = AuthToken.objects.get(user=user)
    assert (
        timedelta(hours=1, minutes=59)
        < stored.expiry - timezone.now()
        <= timedelta(hours=2)
    )


def test_create_api_token_unknown_user_fails():
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="no user named 'nobody-here'"):
        call_command("create_api_token", "nobody-here")


def test_health_endpoints_need_no_token(anon):
    assert anon.get("/healthz").json() == {"status": "ok"}
    body = anon.get("/readyz").json()
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"database", "broker"}
    assert all(c["ok"] and c["latency_ms"] >= 0 for c in body["checks"].values())


def _database_down(execute, sql, params, many, context):
    from django.db import OperationalError

    raise OperationalError("connection to server was lost")


@pytest.mark.parametrize(
    ("method", "url"),
    [("get", "/api/v1/runs/"), ("post", "/api/v1/connectors/")],
    ids=["list", "create"],
)
def test_database_outage_is_503_not_500(api, method, url):
    from django.db import connection

    with connection.execute_wrapper(_database_down):
        response = getattr(api, method)(url, {}, format="json")
    assert response.status_code == 503
    assert response.json() == {
        "detail": "the metadata database is unavailable; retry later"
    }
    assert response["Retry-After"] == "5"
