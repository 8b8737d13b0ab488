"""HTTP middleware: correlation id in, bound to logs, echoed out."""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable

import structlog
from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse

from config import correlation

logger = structlog.get_logger("dis.http")


class CorrelationIdMiddleware:
    """Takes `X-Correlation-ID` (or makes one), binds it, returns it, logs the call."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        structlog.contextvars.clear_contextvars()
        cid = correlation.clean(request.headers.get(correlation.HEADER))
        cid = cid or correlation.new_id()
        request.correlation_id = cid  # type: ignore[attr-defined]
        correlation.bind(cid)
        started = time.perf_counter()
        response = self.get_response(request)
        response[correlation.HEADER] = cid
        logger.info(
            "http_request",
            method=request.method,
            path=request.path,
            status=response.status_code,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
        )
        structlog.contextvars.clear_contextvars()
        return response


class DatabaseUnavailableMiddleware:
    """A database outage answers 503 with a short JSON body, never a 500 traceback.

    Runs inside the correlation middleware, so the 503 carries the id and is logged.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(
        self, request: HttpRequest, exception: Exception
    ) -> HttpResponse | None:
        if isinstance(exception, OperationalError | InterfaceError):
            logger.warning("database_unavailable", error_class=type(exception).__name__)
            response = JsonResponse(
                {"detail": "the metadata database is unavailable; retry later"},
                status=503,
            )
            response["Retry-After"] = "5"
            return response
        return None


class MetricsMiddleware:
    """`GET /metrics`: the service's Prometheus metrics (integration/metrics.py).

    Answered here, ahead of Django's host check, CSRF and HTTPS redirect: a
    Prometheus server scrapes each pod by its IP over plain HTTP, a Host that no
    `DJANGO_ALLOWED_HOSTS` can list in advance. With `DIS_METRICS_TOKEN` set the
    scrape must send it as a bearer token.
    """

    PATH = "/metrics"

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        self._registry = None

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path_info != self.PATH:
            return self.get_response(request)
        if request.method not in ("GET", "HEAD"):
            response = JsonResponse({"detail": "method not allowed"}, status=405)
            response["Allow"] = "GET, HEAD"
            return response
        token = settings.DIS_METRICS_TOKEN
        if token:
            sent = request.headers.get("Authorization", "").removeprefix("Bearer ")
            if not hmac.compare_digest(sent.encode(), token.encode()):
                response = JsonResponse(
                    {"detail": "a bearer token is required"}, status=401
                )
                response["WWW-Authenticate"] = 'Bearer realm="metrics"'
                return response
        from integration import metrics

        if self._registry is None:
            self._registry = metrics.registry()
        body, content_type = metrics.render(
            self._registry, request.headers.get("Accept")
        )
        return HttpResponse(body, content_type=content_type)
