"""Database and Kafka hosts: their own allow-list, checked on save, test and open."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from django.core.exceptions import ValidationError

from connectors.base import ConnectorContext
from connectors.exceptions import ConfigError
from connectors.models import Connector
from connectors.plugins.kafka import KafkaPlugin
from connectors.plugins.sql import PostgresPlugin
from connectors.ssrf import UnsafeHostError, check_host
from tests.helpers import unique

LOOPBACK = ["127.0.0.0/8", "::1/128"]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("host", "address"),
    [
        pytest.param("127.0.0.1", "127.0.0.1", id="loopback"),
        pytest.param("localhost", "", id="localhost"),
        pytest.param("10.1.2.3", "10.1.2.3", id="private"),
        pytest.param("169.254.169.254", "169.254.169.254", id="metadata"),
        pytest.param("[::ffff:127.0.0.1]", "::ffff:7f00:1", id="ipv4-mapped"),
        pytest.param("64:ff9b::7f00:1", "64:ff9b::7f00:1", id="nat64"),
    ],
)
def test_non_public_hosts_are_refused(host: str, address: str) -> None:
    with pytest.raises(UnsafeHostError, match=f"non-public address \\({address}"):
        check_host(host, 5432, ())


def test_allow_listed_hosts_pass_and_unresolvable_ones_are_left_to_the_driver():
    assert check_host("127.0.0.1", 5432, LOOPBACK) == ("127.0.0.1",)
    assert check_host("::ffff:127.0.0.1", 5432, LOOPBACK) == ("::ffff:7f00:1",)
    assert check_host("db.example.invalid", 5432, ()) == ()
    with pytest.raises(UnsafeHostError, match=r"169\.254\.169\.254"):
        check_host("169.254.169.254", 80, LOOPBACK)


def test_a_plugin_used_outside_the_service_checks_nothing():
    config = PostgresPlugin.load_config(
        {"host": "127.0.0.1", "database": "x", "user": "u"}
    )

    PostgresPlugin.check_data_hosts(config, None)
    PostgresPlugin.check_data_hosts(config, ConnectorContext())
    with pytest.raises(ConfigError, match=r"^host: host '127\.0\.0\.1'") as caught:
        PostgresPlugin.check_data_hosts(
            config, ConnectorContext(data_allowed_networks=())
        )
    assert list(caught.value.errors) == ["host"]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("kind", "config", "field"),
    [
        pytest.param(
            "postgres",
            {"host": "127.0.0.1", "database": "d", "user": "u"},
            "host",
            id="postgres",
        ),
        pytest.param(
            "mysql",
            {"host": "localhost", "database": "d", "user": "u"},
            "host",
            id="mysql",
        ),
        pytest.param(
            "kafka",
            {"bootstrap_servers": "db.example.invalid:9092,127.0.0.1:9092"},
            "bootstrap_servers",
            id="kafka",
        ),
    ],
)
def test_a_private_host_is_400_at_save_naming_the_field(
    api: Any, settings: Any, kind: str, config: dict[str, Any], field: str
) -> None:
    settings.DIS_DATA_ALLOWED_NETWORKS = []

    response = api.post(
        "/api/v1/connectors/",
        {"name": unique(kind), "kind": kind, "config": config},
        format="json",
    )

    assert response.status_code == 400
    assert list(response.json()["config"]) == [field]
    assert "non-public address (127.0.0.1)" in response.json()["config"][field][0]


@pytest.mark.django_db
def test_an_allow_listed_host_is_saved(api: Any, settings: Any) -> None:
    settings.DIS_DATA_ALLOWED_NETWORKS = ["127.0.0.0/8"]

    response = api.post(
        "/api/v1/connectors/",
        {
            "name": unique("pg"),
            "kind": "postgres",
            "config": {"host": "127.0.0.1", "database": "d", "user": "u"},
        },
        format="json",
    )

    assert response.status_code == 201, response.content


@pytest.mark.django_db
def test_the_admin_form_refuses_it_too(settings: Any) -> None:
    settings.DIS_DATA_ALLOWED_NETWORKS = []
    connector = Connector(
        name=unique("pg"),
        kind="postgres",
        config={"host": "10.9.8.7", "database": "d", "user": "u"},
    )

    with pytest.raises(ValidationError, match=r"host: host '10\.9\.8\.7'"):
        connector.clean()


@pytest.mark.django_db
def test_test_and_open_refuse_a_host_no_longer_allowed(api: Any, settings: Any):
    settings.DIS_DATA_ALLOWED_NETWORKS = LOOPBACK
    port = _closed_port()
    kafka = Connector.objects.create(
        name=unique("kafka"),
        kind="kafka",
        config={"bootstrap_servers": f"127.0.0.1:{port}", "timeout": 1},
    )
    settings.DIS_DATA_ALLOWED_NETWORKS = []

    response = api.post(f"/api/v1/connectors/{kafka.pk}/test/")

    assert response.status_code == 200
    assert response.json()["ok"] is False
    assert response.json()["message"].startswith(
        "bootstrap_servers: host '127.0.0.1' resolves to a non-public address"
    )
    with pytest.raises(ConfigError, match="bootstrap_servers"):
        kafka.open_source()
    with pytest.raises(ConfigError, match="bootstrap_servers"):
        KafkaPlugin.run_action(
            kafka.loaded_config(),
            "wait_event",
            {"topic": "t", "group_id": "g"},
            kafka.context(),
        )
