"""Workflows over connectors and credentials."""

from __future__ import annotations

import structlog
from django.utils import timezone

from connectors.base import CheckResult
from connectors.choices import CheckStatus
from connectors.exceptions import ConnectorError
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
