"""Authentication of the `rest` connector, and secrets kept out of every message."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote_plus

import pytest

from connectors.base import Chunk
from connectors.exceptions import ConfigError, ConnectorError, TerminalError
from connectors.plugins.rest import RestPlugin, RestSource
from tests.connectors.plugins.rest.server import ApiServer, Recorded, Reply, json_reply

CHUNK = Chunk(0, {"page_start": 1})
SECRET = "s3cr3t-Value/with+chars"


def read_rows(source: RestSource, path: str = "/items") -> int:
    return sum(b.num_rows for b in source.read({"path": path}, CHUNK))


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    ("config", "secrets", "header", "expected_header", "expected_query"),
    [
        pytest.param({}, {}, "authorization", None, {}, id="none"),
        pytest.param(
            {"auth_type": "bearer"},
            {"token": SECRET},
            "authorization",
            f"Bearer {SECRET}",
            {},
            id="bearer",
        ),
        pytest.param(
            {"auth_type": "basic", "username": "ann"},
            {"password": SECRET},
            "authorization",
            basic("ann", SECRET),
            {},
            id="basic",
        ),
        pytest.param(
            {"auth_type": "api_key", "api_key_name": "X-Key"},
            {"api_key": SECRET},
            "x-key",
            SECRET,
            {},
            id="api-key-header",
        ),
        pytest.param(
            {"auth_type": "api_key", "api_key_name": "key", "api_key_in": "query"},
            {"api_key": SECRET},
            "authorization",
            None,
            {"key": [SECRET]},
            id="api-key-query",
        ),
    ],
)
def test_each_auth_type_sends_its_credentials(
    server: ApiServer,
    make_source: Callable[..., RestSource],
    config: dict[str, Any],
    secrets: dict[str, str],
    header: str,
    expected_header: str | None,
    expected_query: dict[str, list[str]],
) -> None:
    server.route("GET", "/items", lambda r: json_reply([{"id": 1}]))

    assert read_rows(make_source(secrets, **config)) == 1

    (request,) = server.hits("/items")
    assert request.headers.get(header) == expected_header
    assert request.query == expected_query


def basic_client(request: Recorded) -> tuple[str, str] | None:
    """The (id, secret) of HTTP basic client authentication, form-decoded (RFC 6749)."""
    header = request.headers.get("authorization", "")
    if not header.startswith("Basic "):
        return None
    user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    return unquote_plus(user), unquote_plus(password)


class TokenServer:
    """An OAuth2 token endpoint issuing tok-1, tok-2, ... and an API checking them."""

    def __init__(self, server: ApiServer, *, expires_in: float = 3600) -> None:
        self.issued: list[str] = []
        self.revoked: set[str] = set()
        self.expires_in = expires_in
        server.route("POST", "/oauth/token", self.token)
        server.route("GET", "/items", self.items)

    def token(self, request: Recorded) -> Reply:
        form = parse_qs(request.body.decode())
        client_ok = basic_client(request) == ("app", SECRET) or (
            form.get("client_id") == ["app"] and form.get("client_secret") == [SECRET]
        )
        if form.get("grant_type") != ["client_credentials"] or not client_ok:
            return json_reply({"error": "invalid_client"}, 401)
        self.issued.append(f"tok-{len(self.issued) + 1}")
        return json_reply(
            {
                "access_token": self.issued[-1],
                "token_type": "Bearer",
                "expires_in": self.expires_in,
            }
        )

    def items(self, request: Recorded) -> Reply:
        auth = request.headers.get("authorization", "")
        token = auth.removeprefix("Bearer ")
        if token not in self.issued or token in self.revoked:
            return json_reply({"error": "invalid_token"}, 401)
        return json_reply([{"id": 1, "token": token}])


def oauth_config(server: ApiServer, **extra: Any) -> dict[str, Any]:
    return {
        "auth_type": "oauth2_client_credentials",
        "token_url": f"{server.url}/oauth/token",
        "client_id": "app",
        "scope": "read",
        **extra,
    }


@pytest.mark.parametrize(
    ("method", "form_has_secret"),
    [
        pytest.param("client_secret_basic", False, id="basic"),
        pytest.param("client_secret_post", True, id="post"),
    ],
)
def test_oauth2_fetches_a_token_once_and_reuses_it(
    server: ApiServer,
    make_source: Callable[..., RestSource],
    method: str,
    form_has_secret: bool,
) -> None:
    tokens = TokenServer(server)
    source = make_source(
        {"client_secret": SECRET}, **oauth_config(server, token_auth_method=method)
    )

    read_rows(source)
    read_rows(source)

    assert tokens.issued == ["tok-1"]
    (token_request,) = server.hits("/oauth/token")
    form = parse_qs(token_request.body.decode())
    assert form["scope"] == ["read"]
    assert ("client_secret" in form) is form_has_secret
    assert [r.headers["authorization"] for r in server.hits("/items")] == [
        "Bearer tok-1",
        "Bearer tok-1",
    ]


def test_oauth2_refreshes_after_a_401(
    server: ApiServer, make_source: Callable[..., RestSource]
) -> None:
    tokens = TokenServer(server)
    source = make_source({"client_secret": SECRET}, **oauth_config(server))
    read_rows(source)
    tokens.revoked.add("tok-1")

    assert read_rows(source) == 1

    assert tokens.issued == ["tok-1", "tok-2"]
    assert [r.headers["authorization"] for r in server.hits("/items")] == [
        "Bearer tok-1",
        "Bearer tok-1",
        "Bearer tok-2",
    ]


def test_oauth2_refreshes_a_token_about_to_expire(
    server: ApiServer, make_source: Callable[..., RestSource]
) -> None:
    tokens = TokenServer(server, expires_in=0.5)
    source = make_source({"client_secret": SECRET}, **oauth_config(server))
    read_rows(source)
    time.sleep(0.5)

    read_rows(source)

    assert tokens.issued == ["tok-1", "tok-2"]
    assert all(
        r.headers["authorization"] != "Bearer tok-1" for r in server.hits("/items")[1:]
    )
    assert len(server.hits("/items")) == 2  # no 401 on the way


def test_oauth2_a_refused_client_is_terminal(
    server: ApiServer, make_source: Callable[..., RestSource]
) -> None:
    TokenServer(server)
    source = make_source({"client_secret": "wrong-secret"}, **oauth_config(server))

    with pytest.raises(TerminalError) as caught:
        read_rows(source)

    assert str(caught.value) == (
        'OAuth2 token request returned HTTP 401: {"error":"invalid_client"}'
    )


def test_a_still_refused_token_after_refresh_is_terminal(
    server: ApiServer, make_source: Callable[..., RestSource]
) -> None:
    tokens = TokenServer(server)
    source = make_source({"client_secret": SECRET}, **oauth_config(server))
    server.route("GET", "/items", lambda r: json_reply({"error": "nope"}, 401))

    with pytest.raises(TerminalError, match="HTTP 401"):
        read_rows(source)

    assert tokens.issued == ["tok-1", "tok-2"]
    assert len(server.hits("/items")) == 2


# -- secrets -------------------------------------------------------------------------


def echo_everything(status: int) -> Callable[[Recorded], Reply]:
    """Answer with the request's headers and query in the body (a leaky API)."""

    def handle(request: Recorded) -> Reply:
        return json_reply({"headers": request.headers, "query": request.query}, status)

    return handle


SECRET_CASES = [
    pytest.param({"auth_type": "bearer"}, {"token": SECRET}, id="bearer"),
    pytest.param(
        {"auth_type": "basic", "username": "ann"}, {"password": SECRET}, id="basic"
    ),
    pytest.param(
        {"auth_type": "api_key", "api_key_in": "query", "api_key_name": "k"},
        {"api_key": SECRET},
        id="api-key-query",
    ),
    pytest.param(
        {"auth_type": "api_key", "api_key_name": "X-Key"},
        {"api_key": SECRET},
        id="api-key-header",
    ),
]


@pytest.mark.parametrize(("config", "secrets"), SECRET_CASES)
@pytest.mark.parametrize("status", [403, 503], ids=["terminal", "transient"])
def test_secrets_are_never_in_an_exception_or_a_check_message(
    server: ApiServer,
    make_source: Callable[..., RestSource],
    config: dict[str, Any],
    secrets: dict[str, str],
    status: int,
) -> None:
    server.route("GET", "/items", echo_everything(status))
    server.route("GET", "/", echo_everything(status))
    source = make_source(secrets, max_retries=0, **config)

    with pytest.raises(ConnectorError) as caught:
        read_rows(source)
    result = source.check()

    encoded = base64.b64encode(f"ann:{SECRET}".encode()).decode()
    for message in (str(caught.value), result.message):
        assert f"HTTP {status}" in message
        assert SECRET not in message
        assert "s3cr3t" not in message
        assert encoded not in message
    assert result.ok is False


def test_the_oauth_token_and_client_secret_are_never_in_a_message(
    server: ApiServer, make_source: Callable[..., RestSource]
) -> None:
    TokenServer(server)
    server.route("GET", "/items", echo_everything(400))
    source = make_source({"client_secret": SECRET}, **oauth_config(server))

    with pytest.raises(TerminalError) as caught:
        read_rows(source)

    assert "HTTP 400" in str(caught.value)
    assert "tok-1" not in str(caught.value)
    assert "s3cr3t" not in str(caught.value)


def test_a_secret_in_the_config_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        RestPlugin.load_config(
            {
                "base_url": "https://api.example.com",
                "auth_type": "bearer",
                "token": SECRET,
            }
        )

    assert SECRET not in str(caught.value)
    assert caught.value.errors == {"token": ["Put this secret in a credential."]}


@pytest.mark.parametrize(
    ("config", "errors"),
    [
        pytest.param(
            {"auth_type": "bearer"},
            {"token": ["Required for auth_type bearer (from the credential)."]},
            id="bearer-needs-token",
        ),
        pytest.param(
            {"auth_type": "oauth2_client_credentials", "client_id": "x"},
            {
                "token_url": ["Required for auth_type oauth2_client_credentials."],
                "client_secret": [
                    "Required for auth_type oauth2_client_credentials (from the "
                    "credential)."
                ],
            },
            id="oauth-needs-token-url-and-secret",
        ),
        pytest.param(
            {"headers": {"Authorization": "Bearer x"}},
            {
                "headers": [
                    "Header(s) Authorization cannot be set here (credentials belong in "
                    "a credential)."
                ]
            },
            id="no-authorization-header-in-config",
        ),
        pytest.param(
            {"base_url": "https://ann:pw@api.example.com"},
            {"base_url": ["Credentials do not belong in the URL: use a credential."]},
            id="no-credentials-in-url",
        ),
        pytest.param(
            {"base_url": "ftp://api.example.com"},
            {"base_url": ["Must be an http:// or https:// URL."]},
            id="http-only",
        ),
    ],
)
def test_bad_auth_config_is_refused(
    config: dict[str, Any], errors: dict[str, Any]
) -> None:
    with pytest.raises(ConfigError) as caught:
        RestPlugin.load_config({"base_url": "https://api.example.com", **config})

    assert caught.value.errors == errors


def test_an_api_key_in_the_query_is_not_logged(
    server: ApiServer,
    make_source: Callable[..., RestSource],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server.route("GET", "/items", lambda r: json_reply([{"id": 1}]))
    source = make_source(
        {"api_key": SECRET}, auth_type="api_key", api_key_in="query", api_key_name="k"
    )

    with caplog.at_level("DEBUG"):
        read_rows(source)

    assert server.hits("/items")[0].query == {"k": [SECRET]}
    assert "HTTP Request: GET" in caplog.text
    assert "s3cr3t" not in caplog.text
