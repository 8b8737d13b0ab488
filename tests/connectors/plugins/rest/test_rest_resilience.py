"""The REST connector's shared breaker and rate limit, across worker processes."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import pytest

from connectors.base import Chunk, ConnectorContext
from connectors.exceptions import ConnectorError
from connectors.plugins.rest import RestPlugin, RestSource
from tests.connectors.plugins.rest.server import ApiServer, Recorded, Reply, json_reply

CHUNK = Chunk(0, {"page_start": 1})


def worker(config: dict[str, Any], context: ConnectorContext, conn: Connection) -> None:
    """A worker process: reads `/flaky` once per "call" and reports the outcome."""
    source = RestPlugin.source(RestPlugin.load_config(config), context)
    while conn.recv() == "call":
        try:
            rows = sum(b.num_rows for b in source.read({"path": "/flaky"}, CHUNK))
            conn.send(f"ok:{rows}")
        except ConnectorError as exc:
            conn.send(type(exc).__name__)
    source.close()


class Flaky:
    """Fails with 503 while `down`; when up, answers slowly (the probe overlaps)."""

    def __init__(self, server: ApiServer) -> None:
        self.down = True
        server.route("GET", "/flaky", self.handle)

    def handle(self, request: Recorded) -> Reply:
        if self.down:
            return json_reply({"error": "down"}, 503)
        time.sleep(0.4)
        return json_reply([{"id": 1}])


def test_two_processes_share_one_breaker_and_make_exactly_one_probe(
    server: ApiServer, context: ConnectorContext
) -> None:
    flaky = Flaky(server)
    config = {
        "base_url": server.url,
        "max_retries": 0,
        "breaker_fail_max": 3,
        "breaker_reset_seconds": 1.0,
    }
    ctx = multiprocessing.get_context("fork")
    pipes = [ctx.Pipe() for _ in range(2)]
    procs = [
        ctx.Process(target=worker, args=(config, context, child), daemon=True)
        for _, child in pipes
    ]
    for proc in procs:
        proc.start()
    a, b = (parent for parent, _ in pipes)

    def call(*conns: Connection) -> list[str]:
        for conn in conns:
            conn.send("call")
        return [conn.recv() for conn in conns]

    try:
        # Three failures, counted across both processes, open the breaker.
        assert call(a) + call(b) + call(a) == ["TransientError"] * 3
        # Both now refuse without calling.
        assert call(a, b) == ["CircuitOpenError", "CircuitOpenError"]
        assert len(server.hits("/flaky")) == 3
        # After the cool-down both try at once: exactly one probe reaches the API.
        flaky.down = False
        time.sleep(1.05)
        outcomes = call(a, b)
        assert sorted(outcomes) == ["CircuitOpenError", "ok:1"]
        assert len(server.hits("/flaky")) == 4
        # The probe closed it for everyone.
        assert call(a, b) == ["ok:1", "ok:1"]
        assert len(server.hits("/flaky")) == 6
    finally:
        for parent, _ in pipes:
            parent.send("stop")
        for proc in procs:
            proc.join(5)


@pytest.mark.parametrize("shared", [True, False], ids=["redis", "in-process"])
def test_pages_are_fetched_at_the_configured_rate(
    server: ApiServer,
    make_source: Callable[..., RestSource],
    context: ConnectorContext,
    shared: bool,
) -> None:
    def page(request: Recorded) -> Reply:
        n = int(request.param("page") or 1)
        return json_reply([{"n": n}] if n <= 6 else [])

    server.route("GET", "/items", page)
    source = make_source(rate_limit_per_second=20)
    if not shared:
        source.context = ConnectorContext(
            name=context.name + "-local", allowed_networks=context.allowed_networks
        )
    options = {"path": "/items", "pagination": {"type": "page", "size": 1}}

    rows = sum(b.num_rows for b in source.read(options, CHUNK))

    hits = server.hits("/items")
    assert rows == 6
    assert len(hits) == 7  # six pages and the empty one that ends the read
    assert hits[-1].at - hits[0].at >= 6 / 20 - 0.02


def _reader(config: dict[str, Any], context: ConnectorContext, until: float) -> None:
    """A worker process reading `/budget` page after page until `until`."""
    source = RestPlugin.source(RestPlugin.load_config(config), context)
    options = {"path": "/budget", "pagination": {"type": "page", "size": 1}}
    while time.time() < until:
        for _ in source.read(options, CHUNK):
            pass
    source.close()


@pytest.mark.slow
def test_two_processes_never_exceed_a_shared_10_per_second_budget(
    server: ApiServer, context: ConnectorContext
) -> None:
    """The issue's acceptance: over 20 s, no 1-second window holds more than 11
    requests at the server, from two processes sharing 10 requests/s."""

    def page(request: Recorded) -> Reply:
        n = int(request.param("page") or 1)
        return json_reply([{"n": n}] if n <= 5 else [])

    server.route("GET", "/budget", page)
    config = {
        "base_url": server.url,
        "rate_limit_per_second": 10,
        "retry_backoff_seconds": 0.01,
    }
    ctx = multiprocessing.get_context("fork")
    until = time.time() + 20
    readers = [ctx.Process(target=_reader, args=(config, context, until)) for _ in "ab"]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(40)
    stamps = sorted(hit.at for hit in server.hits("/budget"))
    assert len(stamps) >= 180  # the budget was used, not just respected
    busiest = max(sum(1 for t in stamps if s <= t < s + 1.0) for s in stamps)
    assert busiest <= 11
