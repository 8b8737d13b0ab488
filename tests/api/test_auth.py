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


# --- The token check: one query, then remembered per process ------------------


def _token_queries(queries) -> list[str]:
    return [q["sql"] for q in queries.captured_queries if "knox_authtoken" in q["sql"]]


@pytest.fixture
def token_client(anon, user):
    """An API client with a fresh token, that token's row, and the token."""
    instance, token = AuthToken.objects.create(user, expiry=timedelta(hours=1))
    anon.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    return anon, instance, token


def test_a_token_is_checked_by_one_query_then_remembered(token_client):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    client, _, _ = token_client
    with CaptureQueriesContext(connection) as first:
        assert client.get("/api/v1/runs/").status_code == 200
    with CaptureQueriesContext(connection) as second:
        assert client.get("/api/v1/runs/").status_code == 200
    (lookup,) = _token_queries(first)
    assert '"knox_authtoken"."digest" =' in lookup
    assert _token_queries(second) == []


def test_without_the_cache_every_call_checks_the_table(token_client, settings):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    settings.API_TOKEN_CACHE_SECONDS = 0
    client, _, _ = token_client
    for _ in range(2):
        with CaptureQueriesContext(connection) as queries:
            assert client.get("/api/v1/runs/").status_code == 200
        assert len(_token_queries(queries)) == 1


def test_a_remembered_token_is_refused_and_deleted_once_expired(
    token_client, monkeypatch
):
    from django.utils import timezone as dj_timezone

    client, instance, _ = token_client
    assert client.get("/api/v1/runs/").status_code == 200  # remembered now
    later = dj_timezone.now() + timedelta(hours=1, seconds=1)
    monkeypatch.setattr(dj_timezone, "now", lambda: later)
    assert client.get("/api/v1/runs/").status_code == 401
    assert not AuthToken.objects.filter(pk=instance.pk).exists()


def test_a_token_deleted_in_this_process_is_refused_at_once(token_client):
    client, instance, _ = token_client
    assert client.get("/api/v1/runs/").status_code == 200
    instance.delete()  # as the admin's delete action does
    assert client.get("/api/v1/runs/").status_code == 401


def test_a_user_deactivated_in_this_process_is_refused_at_once(token_client, user):
    client, _, _ = token_client
    assert client.get("/api/v1/runs/").status_code == 200
    user.is_active = False
    user.save()
    assert client.get("/api/v1/runs/").status_code == 401


def test_a_token_deleted_elsewhere_works_until_its_seconds_passed(
    token_client, settings, monkeypatch
):
    """The documented window: a process that checked the token keeps it for
    API_TOKEN_CACHE_SECONDS after another process deleted it, not longer."""
    import time

    from django.db import connection

    from config import authentication

    settings.API_TOKEN_CACHE_SECONDS = 5
    client, instance, _ = token_client
    assert client.get("/api/v1/runs/").status_code == 200
    with connection.cursor() as cursor:  # no signal: as another process would
        cursor.execute("DELETE FROM knox_authtoken WHERE digest = %s", [instance.pk])
    assert client.get("/api/v1/runs/").status_code == 200
    now = time.monotonic()
    monkeypatch.setattr(
        authentication, "time", type("Clock", (), {"monotonic": lambda: now + 5})
    )
    assert client.get("/api/v1/runs/").status_code == 401


def test_unknown_tokens_are_never_remembered(anon):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    anon.credentials(HTTP_AUTHORIZATION="Token " + "1" * 64)
    for _ in range(2):
        with CaptureQueriesContext(connection) as queries:
            assert anon.get("/api/v1/runs/").status_code == 401
        assert len(_token_queries(queries)) == 1


def test_a_token_that_is_not_utf8_is_401(anon):
    anon.credentials(HTTP_AUTHORIZATION="Token caf\xe9")
    assert anon.get("/api/v1/runs/").status_code == 401


def test_what_a_request_sets_on_its_user_does_not_reach_the_next(token_client):
    from config.authentication import TokenAuthentication

    _, _, token = token_client
    check = TokenAuthentication().authenticate_credentials
    for _ in range(2):  # the table's user, then the remembered one
        first, _ = check(token.encode())
        first.first_name = "changed by a request"
    second, auth_token = check(token.encode())
    assert second.pk == first.pk
    assert second.first_name == ""
    assert auth_token.user is second


def test_purge_deletes_expired_tokens_only(user):
    from integration import housekeeping

    expired, _ = AuthToken.objects.create(user, expiry=timedelta(hours=1))
    AuthToken.objects.filter(pk=expired.pk).update(
        expiry=timezone.now() - timedelta(seconds=1)
    )
    live, _ = AuthToken.objects.create(user, expiry=timedelta(hours=1))
    forever, _ = AuthToken.objects.create(user, expiry=None)
    report = housekeeping.purge()
    assert report.api_tokens == 1
    assert set(AuthToken.objects.filter(user=user).values_list("pk", flat=True)) == {
        live.pk,
        forever.pk,
    }
