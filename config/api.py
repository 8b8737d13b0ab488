"""API-wide pieces: pagination, the filter backend, the exception handler and the
schema hook for `/metrics`."""

from __future__ import annotations

from typing import Any

import structlog
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, InterfaceError, OperationalError
from django.db.models import QuerySet
from django_filters.rest_framework import DjangoFilterBackend
from rest_framework import status
from rest_framework.exceptions import ValidationError
from rest_framework.pagination import PageNumberPagination
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

logger = structlog.get_logger("dis.api")


class Pagination(PageNumberPagination):
    page_size_query_param = "page_size"
    max_page_size = 500


class FilterBackend(DjangoFilterBackend):
    """django-filter's backend, skipped when the request names none of the view's
    filters: building the filter form for every list request cost about a quarter
    of an unfiltered `GET /api/v1/runs/` (bench/api.py)."""

    def filter_queryset(self, request: Any, queryset: QuerySet, view: Any) -> QuerySet:
        filterset_class = self.get_filterset_class(view, queryset)
        if filterset_class is not None and not any(
            name in request.query_params for name in _parameter_names(filterset_class)
        ):
            return queryset
        return super().filter_queryset(request, queryset, view)


def _parameter_names(filterset_class: Any) -> set[str]:
    """The query parameters a filterset reads (a range filter reads two)."""
    names: set[str] = set()
    for name, f in filterset_class.base_filters.items():
        names.add(name)
        suffixes = getattr(getattr(f, "field_class", None), "widget", None)
        names.update(f"{name}_{s}" for s in getattr(suffixes, "suffixes", ()) or ())
    return names


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


def metrics_schema(result: dict, generator: Any, request: Any, public: bool) -> dict:
    """drf-spectacular hook: `GET /metrics` in the schema. The endpoint is answered
    by `config.middleware.MetricsMiddleware` (ahead of the host check), not by a
    view, so the generator cannot see it."""
    schemes = result.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes["metricsToken"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "DIS_METRICS_TOKEN, when the deployment sets one.",
    }
    result["paths"]["/metrics"] = {
        "get": {
            "operationId": "metrics_retrieve",
            "description": (
                "The service's state for Prometheus: runs, last runs, dead letters "
                "and queues, read from the database and the broker at each scrape "
                "(docs/operations.md, Metrics). Prometheus' text format, or "
                "OpenMetrics when the Accept header asks for it."
            ),
            "tags": ["health"],
            "security": [{"metricsToken": []}, {}],
            "responses": {
                "200": {
                    "content": {
                        "text/plain": {"schema": {"type": "string"}},
                        "application/openmetrics-text": {"schema": {"type": "string"}},
                    },
                    "description": "The metrics.",
                },
                "401": {"description": "DIS_METRICS_TOKEN is set and was not sent."},
            },
        }
    }
    return result
