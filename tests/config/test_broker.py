"""The Redis broker transport: kombu's, with one client reused per channel."""

from __future__ import annotations

import uuid

from django.conf import settings
from kombu import Connection, Exchange, Queue

from config.broker import Transport
from config.celery_app import app


def _connection() -> Connection:
    return Connection(settings.CELERY_BROKER_URL, transport=Transport)


def test_the_test_settings_publish_through_the_reusing_transport():
    assert settings.CELERY_BROKER_URL.startswith("redis://")
    with app.connection_for_write() as conn:
        assert isinstance(conn.transport, Transport)


def test_a_channel_reuses_one_client_until_its_pool_is_replaced():
    with _connection() as conn:
        channel = conn.channel()
        try:
            first = channel._create_client()
            assert channel._create_client() is first
            assert first.connection_pool is channel.pool
            channel._after_fork()  # kombu drops the pool: a new client for the new one
            second = channel._create_client()
            assert second is not first
            assert second.connection_pool is channel.pool
            # The consumer's client (BRPOP) stays kombu's own.
            assert channel._create_client(asynchronous=True) is not second
        finally:
            channel.close()


def test_messages_published_through_the_shared_client_arrive_in_order():
    name = f"test-broker-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    with _connection() as conn:
        producer = conn.Producer(serializer="json")
        try:
            for i in range(3):
                producer.publish(
                    {"n": i},
                    exchange=queue.exchange,
                    routing_key=name,
                    declare=[queue],
                )
            simple = conn.SimpleQueue(queue)
            got = []
            for _ in range(3):
                message = simple.get(timeout=5)
                got.append(message.payload["n"])
                message.ack()
            simple.close()
            assert got == [0, 1, 2]
        finally:
            queue(conn.default_channel).delete()
