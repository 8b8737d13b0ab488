"""Fixtures of the REST connector tests: a local HTTP API and a connector context."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from connectors.base import ConnectorContext
from connectors.plugins.rest import RestPlugin, RestSink, RestSource
from tests.connectors.plugins.rest.server import ApiServer
from tests.helpers import unique

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14")
LOOPBACK = ("127.0.0.1/32",)


@pytest.fixture
def server() -> Iterator[ApiServer]:
    """A real HTTP server on a free loopback port, stopped after the test."""
    api = ApiServer().start()
    try:
        yield api
    finally:
        api.stop()


def drop_keys(name: str) -> None:
    """Delete the Redis keys of connector `name` (rate bucket, breaker, lease)."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.delete(f"dis:rate:{name}")
        for key in client.scan_iter(f"dis:breaker:{name}:*"):
            client.delete(key)
    finally:
        client.close()


@pytest.fixture
def context() -> Iterator[ConnectorContext]:
    """A context with a unique name, shared Redis and loopback allow-listed."""
    name = unique("rest-test")
    try:
        yield ConnectorContext(
            name=name,
            redis_url=REDIS_URL,
            allowed_networks=LOOPBACK,
            correlation_id="corr-123",
        )
    finally:
        drop_keys(name)


@pytest.fixture
def make_source(
    server: ApiServer, context: ConnectorContext
) -> Iterator[Callable[..., RestSource]]:
    """Build a rest source on the test server: `make_source(secrets=None, **config)`."""
    made: list[RestSource] = []

    def make(secrets: dict[str, Any] | None = None, **config: Any) -> RestSource:
        loaded = RestPlugin.load_config(
            {"base_url": server.url, "retry_backoff_seconds": 0.01, **config}, secrets
        )
        source = RestPlugin.source(loaded, context)
        assert isinstance(source, RestSource)
        made.append(source)
        return source

    yield make
    for source in made:
        source.close()


@pytest.fixture
def make_sink(
    server: ApiServer, context: ConnectorContext
) -> Iterator[Callable[..., RestSink]]:
    """Build a rest sink on the test server: `make_sink(secrets=None, **config)`."""
    made: list[RestSink] = []

    def make(secrets: dict[str, Any] | None = None, **config: Any) -> RestSink:
        loaded = RestPlugin.load_config(
            {"base_url": server.url, "retry_backoff_seconds": 0.01, **config}, secrets
        )
        sink = RestPlugin.sink(loaded, context)
        assert isinstance(sink, RestSink)
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.close()
