"""The SSRF guard: schemes, private and embedded addresses, allow-list, rebinding."""

from __future__ import annotations

import datetime
import socket
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from connectors.base import Chunk, ConnectorContext
from connectors.exceptions import ConfigError, TerminalError
from connectors.plugins.rest import RestPlugin
from connectors.ssrf import UnsafeUrlError, check_url, resolve_url
from tests.connectors.plugins.rest.server import ApiServer, json_reply
from tests.helpers import unique

REFUSED = [
    pytest.param("file:///etc/passwd", "URL scheme 'file' is not allowed", id="file"),
    pytest.param("ftp://example.com/x", "URL scheme 'ftp' is not allowed", id="ftp"),
    pytest.param("gopher://127.0.0.1:6379/_", "scheme 'gopher'", id="gopher"),
    pytest.param("//example.com/x", "URL scheme '(none)'", id="no-scheme"),
    pytest.param("http://127.0.0.1/", "non-public address (127.0.0.1)", id="loopback"),
    pytest.param("http://localhost:8000/", "non-public address", id="localhost"),
    pytest.param("http://169.254.169.254/latest/", "(169.254.169.254)", id="metadata"),
    pytest.param("http://10.1.2.3/", "(10.1.2.3)", id="private-10"),
    pytest.param("http://172.16.0.1/", "(172.16.0.1)", id="private-172"),
    pytest.param("http://192.168.1.1/", "(192.168.1.1)", id="private-192"),
    pytest.param("http://100.100.100.200/", "(100.100.100.200)", id="cgnat"),
    pytest.param("http://0.0.0.0/", "(0.0.0.0)", id="unspecified"),
    pytest.param("http://224.0.0.1/", "(224.0.0.1)", id="multicast"),
    pytest.param("http://240.0.0.1/", "(240.0.0.1)", id="reserved"),
    pytest.param("http://2130706433/", "(127.0.0.1)", id="decimal-loopback"),
    pytest.param("http://[::1]/", "(::1)", id="ipv6-loopback"),
    pytest.param("http://[::]/", "(::)", id="ipv6-unspecified"),
    pytest.param("http://[::ffff:127.0.0.1]/", "(::ffff:7f00:1)", id="ipv4-mapped"),
    pytest.param("http://[64:ff9b::7f00:1]/", "(64:ff9b::7f00:1)", id="nat64"),
    pytest.param("http://[2002:7f00:1::]/", "(2002:7f00:1::)", id="6to4"),
    pytest.param("http://[fe80::1]/", "(fe80::1)", id="ipv6-link-local"),
    pytest.param("http://[fd00:ec2::254]/", "(fd00:ec2::254)", id="ipv6-ula-metadata"),
    pytest.param("http://[ff02::1]/", "(ff02::1)", id="ipv6-multicast"),
    pytest.param("http://user:pw@example.com/", "credentials in a URL", id="userinfo"),
    pytest.param("http:///path", "URL has no host", id="no-host"),
]


@pytest.mark.parametrize(("url", "message"), REFUSED)
def test_unsafe_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(UnsafeUrlError) as caught:
        check_url(url, ())

    assert isinstance(caught.value, ConfigError)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("url", "allowed", "addresses"),
    [
        pytest.param(
            "http://127.0.0.1:8080/",
            ("127.0.0.1/32",),
            ("127.0.0.1",),
            id="allow-listed-loopback",
        ),
        pytest.param(
            "https://10.1.2.3/",
            ("10.0.0.0/8",),
            ("10.1.2.3",),
            id="allow-listed-private",
        ),
        pytest.param(
            "http://[::ffff:127.0.0.1]/",
            ("127.0.0.0/8",),
            ("::ffff:7f00:1",),
            id="mapped-inside-allowed-v4",
        ),
        pytest.param("https://8.8.8.8/dns", (), ("8.8.8.8",), id="public-v4"),
        pytest.param(
            "https://[2606:4700:4700::1111]/",
            (),
            ("2606:4700:4700::1111",),
            id="public-v6",
        ),
    ],
)
def test_public_and_allow_listed_addresses_pass(
    url: str, allowed: tuple[str, ...], addresses: tuple[str, ...]
) -> None:
    assert resolve_url(url, allowed).addresses == addresses


def test_the_allow_list_is_exact() -> None:
    with pytest.raises(UnsafeUrlError):
        check_url("http://127.0.0.2/", ("127.0.0.1/32",))


def test_an_invalid_allowed_network_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="invalid allowed network 'nope'"):
        check_url("http://8.8.8.8/", ("nope",))


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Answers for made-up names; each name answers once (a rebinding attacker's
    second answer would be private: here a second lookup fails the test)."""
    answers: dict[str, list[str]] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host in answers:
            queue = answers[host]
            assert queue, f"{host} was resolved a second time"
            address = queue.pop(0)
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            return [(family, socket.SOCK_STREAM, 6, "", (address, port or 0))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers


def test_a_name_with_one_private_record_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def two_records(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("8.8.8.8", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", two_records)

    with pytest.raises(UnsafeUrlError, match=r"\(10.0.0.5\)"):
        check_url("http://mixed.example/", ())


def test_the_client_connects_to_the_checked_address_without_a_second_lookup(
    fake_dns: dict[str, list[str]],
) -> None:
    server = ApiServer().start()
    server.route("GET", "/items", lambda r: json_reply([{"id": 1}]))
    port = server.url.rsplit(":", 1)[1]
    # First answer loopback (allow-listed), then a private address (the rebind).
    fake_dns["api.rebind.example"] = ["127.0.0.1", "10.0.0.9"]
    context = ConnectorContext(
        name=unique("ssrf-rebind"), allowed_networks=("127.0.0.1/32",)
    )
    config = RestPlugin.load_config({"base_url": f"http://api.rebind.example:{port}"})
    source = RestPlugin.source(config, context)
    try:
        rows = sum(b.num_rows for b in source.read({"path": "/items"}, Chunk(0, {})))
    finally:
        source.close()
        server.stop()

    assert rows == 1
    assert fake_dns["api.rebind.example"] == ["10.0.0.9"]  # looked up exactly once
    assert server.hits("/items")[0].headers["host"] == f"api.rebind.example:{port}"


def test_loopback_is_refused_without_the_allow_list_and_the_canary_sees_nothing() -> (
    None
):
    canary = ApiServer().start()
    canary.route("GET", "/", lambda r: json_reply({}))
    canary.route("POST", "/oauth/token", lambda r: json_reply({"access_token": "x"}))
    context = ConnectorContext(name=unique("ssrf-canary"))
    try:
        source = RestPlugin.source(
            RestPlugin.load_config({"base_url": canary.url}), context
        )
        with pytest.raises(UnsafeUrlError):
            list(source.read({"path": "/"}, Chunk(0, {})))
        assert source.check().ok is False
        assert "non-public address (127.0.0.1)" in source.check().message
        source.close()
        oauth = RestPlugin.source(
            RestPlugin.load_config(
                {
                    "base_url": "https://8.8.8.8",
                    "auth_type": "oauth2_client_credentials",
                    "token_url": f"{canary.url}/oauth/token",
                    "client_id": "c",
                },
                {"client_secret": "s"},
            ),
            context,
        )
        result = oauth.check()
        oauth.close()
    finally:
        canary.stop()

    assert result.ok is False
    assert result.message.startswith(
        "token_url: host '127.0.0.1' resolves to a non-public"
    )
    assert canary.requests == []


def _self_signed(tmp_path: Path, host: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.mark.parametrize(
    ("host", "outcome"),
    [
        pytest.param("api.tls.example", "1 row", id="name-matches"),
        pytest.param(
            "other.tls.example",
            "TerminalError: GET /items failed: the TLS certificate of "
            "'other.tls.example' could not be verified",
            id="name-differs",
        ),
    ],
)
def test_https_to_the_pinned_address_still_verifies_the_name(
    fake_dns: dict[str, list[str]], tmp_path: Path, host: str, outcome: str
) -> None:
    cert_path, key_path = _self_signed(tmp_path, "api.tls.example")
    server = ApiServer()
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert_path, key_path)
    server.httpd.socket = tls.wrap_socket(server.httpd.socket, server_side=True)
    server.start()
    server.route("GET", "/items", lambda r: json_reply([{"id": 1}]))
    port = server.url.rsplit(":", 1)[1]
    fake_dns[host] = ["127.0.0.1"]
    context = ConnectorContext(
        name=unique("ssrf-tls"), allowed_networks=("127.0.0.1/32",)
    )
    config = RestPlugin.load_config(
        {"base_url": f"https://{host}:{port}", "max_retries": 0}
    )
    source = RestPlugin.source(config, context)
    # The test's CA instead of the system's (the only change to the client).
    source.client.http = httpx.Client(
        verify=ssl.create_default_context(cafile=str(cert_path)), trust_env=False
    )
    try:
        rows = sum(b.num_rows for b in source.read({"path": "/items"}, Chunk(0, {})))
        got = f"{rows} row"
    except TerminalError as exc:
        got = f"{type(exc).__name__}: {exc}"
    finally:
        source.close()
        server.stop()

    assert got == outcome
    if outcome == "1 row":
        assert server.hits("/items")[0].headers["host"] == f"{host}:{port}"
