"""HTTP middleware: correlation id in, bound to logs, echoed out."""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog
from django.http import HttpRequest, HttpResponse

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
