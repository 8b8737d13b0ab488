"""Workflows over connectors and credentials."""

from __future__ import annotations

from typing import Any

import structlog
from django.conf import settings
from django.utils import timezone

from connectors.base import CheckResult
from connectors.choices import CheckStatus
from connectors.exceptions import ConfigError, ConnectorError
from connectors.models import Connector

logger = structlog.get_logger(__name__)


def test_connection(connector_id: int) -> CheckResult:
    """Check a connector's connection and record the outcome on the row.

    The message never carries a secret: plugins build it without one, and an
    unexpected error is reported by its class name only.
    """
    connector = Connector.objects.select_related("credential").get(pk=connector_id)
    try:
        result = connector.plugin.check(connector.loaded_config(), connector.context())
    except ConnectorError as exc:
        result = CheckResult(False, str(exc))
    except Exception as exc:  # noqa: BLE001 - any failure is the check's answer
        logger.warning("connector_check_crashed", error_class=type(exc).__name__)
        result = CheckResult(False, f"check failed: {type(exc).__name__}")
    connector.last_check_status = CheckStatus.OK if result.ok else CheckStatus.FAILED
    connector.last_check_message = result.message
    connector.last_check_at = timezone.now()
    connector.save(
        update_fields=["last_check_status", "last_check_message", "last_check_at"]
    )
    logger.info("connector_checked", connector=connector.name, ok=result.ok)
    return result


def breaker_state(connector: Connector) -> dict[str, Any] | None:
    """The connector's shared circuit breaker as every worker sees it (Redis).

    None without Redis (zero-config mode): breakers are then per process.
    """
    if not settings.REDIS_URL:
        return None
    from connectors.resilience import SharedBreaker

    try:
        return SharedBreaker(connector.name, settings.REDIS_URL).state()
    except ConnectorError:
        return {"state": "unknown", "failures": 0, "opened_at": None, "retry_after": 0}


def reset_breaker(connector: Connector) -> None:
    """Close the connector's breaker by hand (the remote system is back)."""
    from connectors.resilience import SharedBreaker

    SharedBreaker(connector.name, settings.REDIS_URL or None).reset()
    logger.info("breaker_reset", connector=connector.name)


def discover(connector_id: int) -> list[dict[str, Any]]:
    """The streams a source connector offers, with their fields and types.

    Raises:
        ConnectorError: the kind cannot discover, or the system refused.
    """
    connector = Connector.objects.select_related("credential").get(pk=connector_id)
    if not connector.plugin.capabilities.discover:
        raise ConfigError(f"a {connector.kind} connector cannot discover streams")
    source = connector.open_source()
    try:
        streams = source.discover()
    finally:
        source.close()
    return [
        {
            "name": stream.name,
            "fields": [
                {"name": f.name, "type": str(f.type), "nullable": f.nullable}
                for f in stream.schema
            ],
        }
        for stream in streams
    ]


def unsafe_urls(plugin: Any, config: dict[str, Any]) -> dict[str, list[str]]:
    """The config's URL fields the SSRF guard refuses (field -> reason).

    Checked when a connector is saved, so a refusal is a 400 before any connection;
    the plugins check again (and pin the address) when they connect.
    """
    from connectors.ssrf import check_url

    refused: dict[str, list[str]] = {}
    for name in plugin.url_fields:
        value = config.get(name)
        if not value:
            continue
        try:
            check_url(str(value), tuple(settings.DIS_ALLOWED_NETWORKS))
        except ConfigError as exc:
            refused[name] = [str(exc)]
    return refused


def unsafe_hosts(plugin: Any, config: dict[str, Any]) -> dict[str, list[str]]:
    """The database/Kafka host fields the data allow-list refuses (field -> reason).

    `config` is the loaded config (defaults filled in). Checked when a connector is
    saved, so a refusal is a 400 naming the field; the plugins check again when
    they are opened or tested (`Plugin.check_data_hosts`). A resolver that fails
    temporarily does not block the save.
    """
    from connectors.base import ConnectorContext
    from connectors.exceptions import TransientError

    context = ConnectorContext(
        data_allowed_networks=tuple(settings.DIS_DATA_ALLOWED_NETWORKS)
    )
    try:
        plugin.check_data_hosts(config, context)
    except ConfigError as exc:
        return dict(getattr(exc, "errors", None) or {"config": [str(exc)]})
    except TransientError:
        return {}
    return {}
