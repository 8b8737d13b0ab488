"""kombu's Redis transport with one reused client per channel for its commands.

kombu builds a new `redis.Redis` object around the channel's connection pool for
every command it sends outside the consumer (each publish, each queue size...). The
object holds no connection, only the pool and redis-py's response callbacks, so
building it is pure cost: about a tenth of what publishing a task costs the API. A
client is safe to share: every command borrows a connection from the pool and gives
it back. This channel keeps one client per pool and makes a new one when kombu
replaces the pool (after a fork, after a reconnect).

Settings use it for `redis://` broker URLs (`CELERY_BROKER_TRANSPORT`).
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis


class Channel(redis.Channel):
    _shared_client: tuple[Any, Any] | None = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool = self.pool
        shared = self._shared_client
        if shared is None or shared[0] is not pool:
            shared = self._shared_client = (pool, super()._create_client())
        return shared[1]


class Transport(redis.Transport):
    Channel = Channel
