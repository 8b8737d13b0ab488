"""API-wide pieces: pagination and the exception handler."""

from __future__ import annotations

from typing import Any

import structlog
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, InterfaceError, OperationalError
from rest_framework import status
from rest_framework.exceptions import ValidationError
from rest_framework.pagination import PageNumberPagination
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

logger = structlog.get_logger("dis.api")


class Pagination(PageNumberPagination):
    page_size_query_param = "page_size"
    max_page_size = 500


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's handler, plus model validation and integrity errors as 400s."""
    if isinstance(exc, DjangoValidationError):
        detail = (
            exc.message_dict if hasattr(exc, "error_dict") else {"detail": exc.messages}
        )
        exc = ValidationError(detail)
    elif isinstance(exc, OperationalError | InterfaceError):
        # The database is down: a 503 the client can retry, not a 500.
        logger.warning("database_unavailable", error_class=type(exc).__name__)
        return Response(
            {"detail": "the metadata database is unavailable; retry later"},
            status=status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": "5"},
        )
    elif isinstance(exc, IntegrityError):
        logger.warning("integrity_error", error=str(exc).splitlines()[0])
        return Response(
            {"detail": "conflicts with an existing object"},
            status=status.HTTP_409_CONFLICT,
        )
    return drf_exception_handler(exc, context)
