"""API-wide pieces: pagination, the filter backend and the exception handler."""

from __future__ import annotations

from collections import deque
from typing import Any, ClassVar

import structlog
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, InterfaceError, OperationalError
from django.db.models import QuerySet
from django_filters.rest_framework import DjangoFilterBackend
from rest_framework import status
from rest_framework.exceptions import ValidationError
from rest_framework.pagination import PageNumberPagination
from rest_framework.response import Response
from rest_framework.throttling import UserRateThrottle as DrfUserRateThrottle
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


class UserRateThrottle(DrfUserRateThrottle):
    """DRF's per-user throttle (the `user` rate, a sliding window of exact request
    times), with each user's times kept in a deque in this process.

    DRF keeps them as a list in Django's cache, and the default local-memory cache
    pickles and unpickles that list whole on every request: at the default
    100,000/hour a busy client's list holds tens of thousands of times, which cost
    about a millisecond per request. That cache is per process too, so the limit
    still holds per API process, as before.
    """

    #: Request times per throttle key, oldest first.
    histories: ClassVar[dict[str, deque[float]]] = {}
    #: Above this many keys, those with no request in the window are dropped.
    max_keys = 10_000

    def allow_request(self, request: Any, view: Any) -> bool:
        if self.rate is None:
            return True
        key = self.get_cache_key(request, view)
        if key is None:
            return True
        self.now = self.timer()
        if key not in self.histories and len(self.histories) >= self.max_keys:
            self._drop_idle()
        history = self.histories.setdefault(key, deque())
        while history and history[0] <= self.now - self.duration:
            history.popleft()
        self.history = history
        if len(history) >= self.num_requests:
            return self.throttle_failure()
        history.append(self.now)
        return True

    def wait(self) -> float | None:
        """Seconds until a request is allowed again (DRF's formula, oldest first)."""
        remaining = (
            self.duration - (self.now - self.history[0])
            if self.history
            else self.duration
        )
        available = self.num_requests - len(self.history) + 1
        if available <= 0:
            return None
        return remaining / float(available)

    def _drop_idle(self) -> None:
        for key, history in list(self.histories.items()):
            if not history or history[-1] <= self.now - self.duration:
                del self.histories[key]


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
