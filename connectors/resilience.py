"""Resilience shared by every worker: a circuit breaker and a request-rate limiter.

Both keep their state in Redis when the connector context has a `redis_url`, so every
worker process of every machine sees one breaker and spends one rate budget per
connector; without Redis they fall back to state shared inside the process.
Pure Python (no Django).
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import pybreaker
import redis

from connectors.exceptions import TransientError

T = TypeVar("T")

RATE_KEY_PREFIX = "dis:rate:"
BREAKER_KEY_PREFIX = "dis:breaker:"

_clients: dict[str, redis.Redis] = {}
_clients_lock = threading.Lock()


def redis_client(url: str) -> redis.Redis:
    """One Redis client (and connection pool) per URL in this process."""
    with _clients_lock:
        client = _clients.get(url)
        if client is None:
            client = redis.Redis.from_url(
                url, socket_timeout=5, socket_connect_timeout=5
            )
            _clients[url] = client
        return client


class CircuitOpenError(TransientError):
    """The connector's breaker is open: the call was not made; retry later.

    Attributes:
        retry_after: seconds until a call may be tried again (a best guess).
    """

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# -- rate limiter ------------------------------------------------------------------

# A token bucket that lends tokens ahead: a caller always takes its token and is told
# how long to wait before using it, so callers queue in arrival order and Redis is
# asked once per request. A caller that would wait longer than `max_wait` takes nothing.
# The clock is Redis's own, so workers on machines with skewed clocks agree.
_BUCKET_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local wait = 0
if tokens < 1 then
  wait = (1 - tokens) / rate
end
if wait > max_wait then
  return tostring(-wait)
end
tokens = tokens - 1
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst / rate + wait) * 1000) + 1000)
return tostring(wait)
"""


class _LocalBucket:
    """The in-process twin of the Redis token bucket (same arithmetic)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tokens: float | None = None
        self.ts = 0.0

    def reserve(self, rate: float, burst: float, max_wait: float) -> float:
        with self.lock:
            now = time.monotonic()
            if self.tokens is None:
                self.tokens, self.ts = burst, now
            tokens = min(burst, self.tokens + max(0.0, now - self.ts) * rate)
            wait = (1 - tokens) / rate if tokens < 1 else 0.0
            if wait > max_wait:
                return -wait
            self.tokens, self.ts = tokens - 1, now
            return wait


_local_buckets: dict[str, _LocalBucket] = {}
_local_buckets_lock = threading.Lock()


class RateLimiter:
    """A token bucket of `rate` requests per second shared by all workers.

    The bucket lives in Redis under `dis:rate:<name>` (updated atomically by a Lua
    script) when `redis_url` is given, else in this process (shared by every limiter
    of the same name). It holds at most `burst` tokens: in any window of `w` seconds
    at most `burst + rate * w` calls pass.

    Args:
        name: the connector's name (the key of its budget).
        rate: requests per second (> 0, may be below 1).
        redis_url: Redis for a budget shared across processes; None for in-process.
        burst: the bucket's size, at least 1 (default 1: no bursts).
        max_wait: the longest `acquire()` waits for a token before it gives up.
        sleep: the sleep function (tests may replace it).
    """

    def __init__(
        self,
        name: str,
        rate: float,
        *,
        redis_url: str | None = None,
        burst: float | None = None,
        max_wait: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.name = name
        self.rate = float(rate)
        self.burst = max(1.0, float(burst) if burst is not None else 1.0)
        self.max_wait = max_wait
        self.key = RATE_KEY_PREFIX + name
        self._sleep = sleep
        self._redis = redis_client(redis_url) if redis_url else None
        self._script = (
            self._redis.register_script(_BUCKET_SCRIPT) if self._redis else None
        )
        if self._redis is None:
            with _local_buckets_lock:
                self._bucket = _local_buckets.setdefault(name, _LocalBucket())

    def reserve(self) -> float:
        """Take a token; return the seconds to wait before using it.

        Returns:
            The wait (0 when a token was there), or a negative number (minus the wait
            that would be needed) when it exceeds `max_wait` and nothing was taken.

        Raises:
            TransientError: Redis is unreachable.
        """
        if self._script is None:
            return self._bucket.reserve(self.rate, self.burst, self.max_wait)
        try:
            raw = self._script(
                keys=[self.key], args=[self.rate, self.burst, self.max_wait]
            )
        except redis.RedisError as exc:
            raise TransientError(
                f"rate limiter unavailable: {type(exc).__name__}"
            ) from None
        return float(raw)

    def acquire(self) -> float:
        """Wait for this caller's turn in the shared budget.

        Returns:
            The seconds waited.

        Raises:
            TransientError: the wait would exceed `max_wait` (the budget is
                oversubscribed: retry later), or Redis is unreachable.
        """
        wait = self.reserve()
        if wait < 0:
            raise TransientError(
                f"request rate budget of {self.name!r} exhausted for the next "
                f"{-wait:.1f}s; retry later"
            )
        if wait > 0:
            self._sleep(wait)
        return wait


# -- circuit breaker ---------------------------------------------------------------


class _RedisStorage(pybreaker.CircuitRedisStorage):
    """pybreaker's Redis storage with `opened_at` kept to the millisecond.

    pybreaker stores whole seconds, which makes a short cool-down end up to a second
    early; the admin also wants the exact time.
    """

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        super().__init__(pybreaker.STATE_CLOSED, client, namespace=namespace)

    @property
    def opened_at(self) -> datetime | None:
        try:
            raw = self._redis.get(self._namespace("opened_at_ms"))
        except redis.RedisError:
            self.logger.exception("RedisError")
            return None
        if not raw:
            return None
        return datetime.fromtimestamp(int(raw) / 1000, UTC)

    @opened_at.setter
    def opened_at(self, now: datetime) -> None:
        try:
            self._redis.set(
                self._namespace("opened_at_ms"), int(now.timestamp() * 1000)
            )
        except redis.RedisError:
            self.logger.exception("RedisError")


class _LocalLease:
    """The in-process probe lease (a lock with an expiry)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.holder: str | None = None
        self.expires = 0.0

    def acquire(self, token: str, ttl: float) -> bool:
        with self.lock:
            now = time.monotonic()
            if self.holder is not None and now < self.expires:
                return False
            self.holder, self.expires = token, now + ttl
            return True

    def release(self, token: str) -> None:
        with self.lock:
            if self.holder == token:
                self.holder = None

    def remaining(self) -> float:
        with self.lock:
            return max(0.0, self.expires - time.monotonic()) if self.holder else 0.0


_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_local_storages: dict[str, pybreaker.CircuitMemoryStorage] = {}
_local_leases: dict[str, _LocalLease] = {}
_local_lock = threading.Lock()


def _not_transient(exc: BaseException) -> bool:
    """pybreaker exclusion: only transient failures count against the breaker."""
    return not isinstance(exc, TransientError) or isinstance(exc, CircuitOpenError)


class SharedBreaker:
    """A circuit breaker per connector whose state every worker shares.

    Built on `pybreaker.CircuitBreaker`; with `redis_url` its state lives in Redis
    (keys under `dis:breaker:<name>:`), so after `fail_max` consecutive transient
    failures, counted across all processes, every process stops calling for
    `reset_timeout` seconds. Then a single probe call is let through across all
    processes: the caller that wins a probe lease (`SET NX PX` in Redis) makes it,
    every other caller gets `CircuitOpenError`. The probe's success closes the
    breaker; its failure opens it for another `reset_timeout`.

    Only `TransientError` failures count; a config or terminal error (a 404, a bad
    request) proves the remote system answered, so it counts as a success.

    Without `redis_url` the state is shared by the breakers of the same name in this
    process.

    Args:
        name: the connector's name.
        redis_url: Redis for the shared state; None for in-process state.
        fail_max: consecutive transient failures that open the breaker.
        reset_timeout: seconds the breaker stays open before a probe.
        probe_lease_seconds: how long a probe may take before another process may
            probe (covers a worker that dies mid-probe).
    """

    def __init__(
        self,
        name: str,
        redis_url: str | None = None,
        *,
        fail_max: int = 5,
        reset_timeout: float = 30.0,
        probe_lease_seconds: float = 60.0,
    ) -> None:
        self.name = name
        self.reset_timeout = float(reset_timeout)
        self.probe_lease_seconds = float(probe_lease_seconds)
        self.namespace = BREAKER_KEY_PREFIX + name
        self.lease_key = f"{self.namespace}:probe"
        self._redis = redis_client(redis_url) if redis_url else None
        storage: pybreaker.CircuitBreakerStorage
        if self._redis is not None:
            try:
                storage = _RedisStorage(self._redis, self.namespace)
            except redis.RedisError as exc:
                raise TransientError(
                    f"circuit breaker state unavailable: {type(exc).__name__}"
                ) from None
            self._release = self._redis.register_script(_RELEASE_LEASE)
        else:
            with _local_lock:
                storage = _local_storages.setdefault(
                    name, pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
                )
                self._lease = _local_leases.setdefault(name, _LocalLease())
        self._breaker = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_timeout,
            exclude=[_not_transient],
            state_storage=storage,
            name=name,
            throw_new_error_on_trip=False,
        )

    # -- state -----------------------------------------------------------------------

    def _opened_at(self) -> datetime | None:
        return self._breaker._state_storage.opened_at

    def _cool_down_left(self) -> float:
        opened_at = self._opened_at()
        if opened_at is None:
            return 0.0
        elapsed = (datetime.now(UTC) - opened_at).total_seconds()
        return max(0.0, self.reset_timeout - elapsed)

    def state(self) -> dict[str, Any]:
        """The breaker as the admin and the API show it.

        Returns:
            `{"state": "closed" | "open" | "half-open", "failures": n,
            "opened_at": ISO-8601 UTC or None, "retry_after": seconds or 0}`.
            An open breaker whose cool-down has ended shows `half-open`: the next
            call is the probe.
        """
        state = self._breaker.current_state
        retry_after = 0.0
        if state == pybreaker.STATE_OPEN:
            retry_after = self._cool_down_left()
            if retry_after == 0:
                state = pybreaker.STATE_HALF_OPEN
        opened_at = self._opened_at()
        return {
            "state": state,
            "failures": self._breaker.fail_counter,
            "opened_at": opened_at.isoformat() if opened_at else None,
            "retry_after": round(retry_after, 3),
        }

    def reset(self) -> None:
        """Close the breaker by hand (an operator's action)."""
        self._breaker.close()
        self._breaker._state_storage.reset_counter()

    # -- calls -------------------------------------------------------------------------

    def _try_lease(self, token: str) -> bool:
        if self._redis is None:
            return self._lease.acquire(token, self.probe_lease_seconds)
        try:
            return bool(
                self._redis.set(
                    self.lease_key,
                    token,
                    nx=True,
                    px=max(1, int(self.probe_lease_seconds * 1000)),
                )
            )
        except redis.RedisError as exc:
            raise TransientError(
                f"circuit breaker state unavailable: {type(exc).__name__}"
            ) from None

    def _drop_lease(self, token: str) -> None:
        if self._redis is None:
            self._lease.release(token)
            return
        with contextlib.suppress(redis.RedisError):  # it expires on its own anyway
            self._release(keys=[self.lease_key], args=[token])

    def _lease_left(self) -> float:
        if self._redis is None:
            return self._lease.remaining()
        try:
            ttl_ms = self._redis.pttl(self.lease_key)
        except redis.RedisError:
            return self.probe_lease_seconds
        return max(ttl_ms, 0) / 1000

    def _open_error(self, retry_after: float, why: str) -> CircuitOpenError:
        return CircuitOpenError(
            f"circuit breaker {self.name!r} is open ({why}); retry in "
            f"{retry_after:.1f}s",
            retry_after=round(retry_after, 3),
        )

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call `fn(*args, **kwargs)` through the breaker.

        Returns:
            What `fn` returns.

        Raises:
            CircuitOpenError: the breaker is open, or half-open and another caller
                holds the probe lease. `fn` was not called.
            Exception: whatever `fn` raises (a transient one is counted).
        """
        state = self._breaker.current_state
        if state == pybreaker.STATE_CLOSED:
            return self._call(fn, *args, **kwargs)
        if state == pybreaker.STATE_OPEN:
            left = self._cool_down_left()
            if left > 0:
                raise self._open_error(left, "cooling down")
        token = uuid.uuid4().hex
        if not self._try_lease(token):
            raise self._open_error(
                max(self._lease_left(), 0.1), "another worker is probing"
            )
        try:
            # Read again under the lease: a probe that just ended may have closed or
            # re-opened the breaker.
            state = self._breaker.current_state
            if state == pybreaker.STATE_OPEN:
                left = self._cool_down_left()
                if left > 0:
                    raise self._open_error(left, "cooling down")
            return self._call(fn, *args, **kwargs)
        finally:
            self._drop_lease(token)

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return self._breaker.call(fn, *args, **kwargs)
        except pybreaker.CircuitBreakerError:
            # pybreaker's own check raced with another process opening the breaker.
            raise self._open_error(
                max(self._cool_down_left(), 0.1), "opened meanwhile"
            ) from None
