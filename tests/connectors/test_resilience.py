"""The shared circuit breaker and rate limiter, in Redis and in-process."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from connectors.exceptions import ConfigError, TerminalError, TransientError
from connectors.resilience import CircuitOpenError, RateLimiter, SharedBreaker
from tests.helpers import unique

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14")


@pytest.fixture(params=[REDIS_URL, None], ids=["redis", "in-process"])
def redis_url(request: pytest.FixtureRequest) -> str | None:
    return request.param


@pytest.fixture
def name() -> Iterator[str]:
    """A unique connector name; its Redis keys are deleted after the test."""
    value = unique("resilience")
    yield value
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(f"dis:rate:{value}")
    for key in client.scan_iter(f"dis:breaker:{value}:*"):
        client.delete(key)
    client.close()


class Calls:
    """A callable that counts its calls and fails while `error` is set."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.count = 0

    def __call__(self) -> str:
        self.count += 1
        if self.error is not None:
            raise self.error
        return "ok"


def trip(breaker: SharedBreaker, calls: Calls, times: int) -> None:
    for _ in range(times):
        with pytest.raises(TransientError):
            breaker.call(calls)


# -- breaker ---------------------------------------------------------------------------


def test_the_breaker_opens_after_fail_max_transient_failures(
    redis_url: str | None, name: str
) -> None:
    breaker = SharedBreaker(name, redis_url, fail_max=3, reset_timeout=30)
    calls = Calls(TransientError("down"))
    trip(breaker, calls, 3)

    with pytest.raises(CircuitOpenError) as caught:
        breaker.call(calls)

    assert calls.count == 3
    assert 29 < caught.value.retry_after <= 30
    state = breaker.state()
    assert (state["state"], state["failures"]) == ("open", 3)
    assert state["opened_at"] is not None


@pytest.mark.parametrize(
    "error",
    [TerminalError("404"), ConfigError("bad")],
    ids=["terminal", "config"],
)
def test_only_transient_failures_count(
    redis_url: str | None, name: str, error: Exception
) -> None:
    breaker = SharedBreaker(name, redis_url, fail_max=2, reset_timeout=30)
    calls = Calls(error)

    for _ in range(4):
        with pytest.raises(type(error)):
            breaker.call(calls)

    assert calls.count == 4
    assert breaker.state() == {
        "state": "closed",
        "failures": 0,
        "opened_at": None,
        "retry_after": 0,
    }


def test_a_success_resets_the_failure_count(redis_url: str | None, name: str) -> None:
    breaker = SharedBreaker(name, redis_url, fail_max=3, reset_timeout=30)
    trip(breaker, Calls(TransientError("down")), 2)

    assert breaker.call(Calls()) == "ok"
    trip(breaker, Calls(TransientError("down")), 2)

    assert breaker.state()["state"] == "closed"
    assert breaker.state()["failures"] == 2


def test_after_the_cool_down_a_successful_probe_closes_it(
    redis_url: str | None, name: str
) -> None:
    breaker = SharedBreaker(name, redis_url, fail_max=1, reset_timeout=0.3)
    trip(breaker, Calls(TransientError("down")), 1)
    time.sleep(0.35)

    assert breaker.state()["state"] == "half-open"
    assert breaker.call(Calls()) == "ok"
    assert breaker.state()["state"] == "closed"
    assert breaker.state()["failures"] == 0


def test_a_failed_probe_opens_it_again(redis_url: str | None, name: str) -> None:
    breaker = SharedBreaker(name, redis_url, fail_max=1, reset_timeout=0.3)
    calls = Calls(TransientError("down"))
    trip(breaker, calls, 1)
    time.sleep(0.35)

    trip(breaker, calls, 1)  # the probe
    with pytest.raises(CircuitOpenError) as caught:
        breaker.call(calls)

    assert calls.count == 2
    assert 0.2 < caught.value.retry_after <= 0.3


def test_while_one_caller_probes_the_others_are_refused(
    redis_url: str | None, name: str
) -> None:
    first = SharedBreaker(name, redis_url, fail_max=1, reset_timeout=0.2)
    second = SharedBreaker(name, redis_url, fail_max=1, reset_timeout=0.2)
    trip(first, Calls(TransientError("down")), 1)
    time.sleep(0.25)
    probing, release = threading.Event(), threading.Event()

    def slow_probe() -> str:
        probing.set()
        assert release.wait(5)
        return "probed"

    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(first.call(slow_probe)))
    thread.start()
    assert probing.wait(5)
    calls = Calls()
    with pytest.raises(CircuitOpenError, match="another worker is probing"):
        second.call(calls)
    release.set()
    thread.join(5)

    assert results == ["probed"]
    assert calls.count == 0
    assert second.call(calls) == "ok"  # closed now


def test_reset_closes_an_open_breaker(redis_url: str | None, name: str) -> None:
    breaker = SharedBreaker(name, redis_url, fail_max=1, reset_timeout=30)
    trip(breaker, Calls(TransientError("down")), 1)

    breaker.reset()

    assert breaker.call(Calls()) == "ok"


# -- rate limiter ----------------------------------------------------------------------


def test_calls_are_spaced_by_the_rate(redis_url: str | None, name: str) -> None:
    limiter = RateLimiter(name, 20, redis_url=redis_url)

    started = time.monotonic()
    for _ in range(6):
        limiter.acquire()
    elapsed = time.monotonic() - started

    assert 0.24 <= elapsed < 0.6


def test_a_burst_passes_at_once_then_the_rate_applies(
    redis_url: str | None, name: str
) -> None:
    limiter = RateLimiter(name, 4, redis_url=redis_url, burst=3)

    waits = [limiter.reserve() for _ in range(4)]

    assert waits[:3] == [0, 0, 0]
    assert 0.2 < waits[3] <= 0.25


def test_a_wait_beyond_max_wait_takes_no_token(
    redis_url: str | None, name: str
) -> None:
    limiter = RateLimiter(name, 1, redis_url=redis_url, max_wait=0.1)
    limiter.acquire()

    with pytest.raises(TransientError, match=r"budget of .* exhausted"):
        limiter.acquire()
    again = limiter.reserve()

    assert -1.0 <= again < -0.8  # still one token's wait: the refusal took nothing


def _grab(name: str, count: int, queue: Any) -> None:
    limiter = RateLimiter(name, 20, redis_url=REDIS_URL)
    for _ in range(count):
        limiter.acquire()
        queue.put(time.time())


def test_two_processes_share_one_budget(name: str) -> None:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_grab, args=(name, 8, queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    stamps = sorted(queue.get(timeout=10) for _ in range(16))
    for worker in workers:
        worker.join(10)

    assert stamps[-1] - stamps[0] >= 15 / 20 - 0.02
    # In any half second at most burst + rate * 0.5 = 11 calls pass.
    assert max(sum(1 for t in stamps if s <= t < s + 0.5) for s in stamps) <= 11
