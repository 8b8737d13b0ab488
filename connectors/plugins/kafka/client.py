"""What the Kafka source and sink share: config, librdkafka settings, error classes.

Pure Python (no Django). librdkafka reports most failures asynchronously (through
`error_cb`), so every client here gets an `ErrorLog` that turns those reports into
the connector errors the service acts on, with the password redacted.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any

import marshmallow
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from marshmallow import fields, validate, validates_schema

from connectors.base import CheckResult
from connectors.exceptions import (
    ConfigError,
    ConnectorError,
    TerminalError,
    TransientError,
)

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
#: Kafka's own rule for topic names (so a topic never contains `/`).
TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_HOST_PORT_RE = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})$")

#: librdkafka's own log lines go to Python logging instead of stderr.
LIBRDKAFKA_LOGGER = logging.getLogger("connectors.kafka.librdkafka")

# Error codes that retrying with the same settings will not fix.
_CONFIG_CODES = {
    KafkaError._AUTHENTICATION,
    KafkaError._SSL,
    KafkaError.SASL_AUTHENTICATION_FAILED,
    KafkaError.UNSUPPORTED_SASL_MECHANISM,
    KafkaError.ILLEGAL_SASL_STATE,
    KafkaError._INVALID_ARG,
}
_TERMINAL_CODES = {
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.GROUP_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._UNKNOWN_TOPIC,
    KafkaError._UNKNOWN_PARTITION,
    KafkaError.MSG_SIZE_TOO_LARGE,
    KafkaError.INVALID_MSG,
    KafkaError.TOPIC_EXCEPTION,
    KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.INVALID_RECORD,
    KafkaError.POLICY_VIOLATION,
}


def _validate_servers(value: str) -> None:
    servers = [s.strip() for s in value.split(",")]
    for server in servers:
        match = _HOST_PORT_RE.match(server)
        if not match or not 0 < int(match.group(1)) < 65536:
            raise marshmallow.ValidationError(
                "Must be a comma-separated list of host:port (no scheme)."
            )


def validate_topic(value: str) -> None:
    """Marshmallow validator: a legal Kafka topic name (not `.` or `..`)."""
    if not TOPIC_RE.match(value) or value in (".", ".."):
        raise marshmallow.ValidationError(
            "Must be 1-249 characters from A-Z, a-z, 0-9, '.', '_' and '-'."
        )


class KafkaConfig(marshmallow.Schema):
    """Config of the kafka connector: where the brokers are and how to log in."""

    bootstrap_servers = fields.String(required=True, validate=_validate_servers)
    security_protocol = fields.String(
        load_default="PLAINTEXT", validate=validate.OneOf(SECURITY_PROTOCOLS)
    )
    sasl_mechanism = fields.String(
        load_default=None, allow_none=True, validate=validate.OneOf(SASL_MECHANISMS)
    )
    sasl_username = fields.String(load_default=None, allow_none=True)
    sasl_password = fields.String(
        load_default=None, allow_none=True, metadata={"secret": True}
    )
    ssl_ca_location = fields.String(load_default=None, allow_none=True)
    client_id = fields.String(
        load_default="data-integration-service", validate=validate.Length(1, 255)
    )
    #: Seconds to wait for a broker (connection setup, metadata, `check()`, a read
    #: that makes no progress).
    timeout = fields.Float(load_default=10.0, validate=validate.Range(0.1, 300))
    #: Seconds a produced message may take to be acknowledged before it fails.
    delivery_timeout = fields.Float(
        load_default=120.0, validate=validate.Range(1, 3600)
    )

    @validates_schema
    def _check_sasl(self, data: dict[str, Any], **kwargs: Any) -> None:
        sasl = data.get("security_protocol", "PLAINTEXT").startswith("SASL_")
        names = ("sasl_mechanism", "sasl_username", "sasl_password")
        if sasl:
            missing = {n: ["Required with SASL."] for n in names if not data.get(n)}
            if missing:
                raise marshmallow.ValidationError(missing)
        else:
            given = {
                n: ["Only with SASL_PLAINTEXT or SASL_SSL."]
                for n in names
                if data.get(n)
            }
            if given:
                raise marshmallow.ValidationError(given)


def redact(text: str, config: dict[str, Any]) -> str:
    """`text` with the configured password replaced by `***`."""
    password = config.get("sasl_password")
    if password:
        text = text.replace(str(password), "***")
    return text


def client_settings(config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """librdkafka settings for a loaded config, plus `extra` (dots allowed).

    Args:
        config: a config loaded by `KafkaConfig`.
        **extra: further librdkafka settings, e.g. `{"group.id": "g"}` via `**{}`.

    Returns:
        The settings dict to pass to `Consumer`, `Producer` or `AdminClient`.
    """
    timeout_ms = int(config.get("timeout", 10.0) * 1000)
    settings: dict[str, Any] = {
        "bootstrap.servers": config["bootstrap_servers"],
        "client.id": config.get("client_id") or "data-integration-service",
        "security.protocol": config.get("security_protocol", "PLAINTEXT"),
        "socket.connection.setup.timeout.ms": max(timeout_ms, 1000),
        "socket.timeout.ms": max(timeout_ms, 1000),
        "reconnect.backoff.max.ms": 2000,
        "logger": LIBRDKAFKA_LOGGER,
    }
    if settings["security.protocol"].startswith("SASL_"):
        settings["sasl.mechanism"] = config["sasl_mechanism"]
        settings["sasl.username"] = config["sasl_username"]
        settings["sasl.password"] = config["sasl_password"]
    if config.get("ssl_ca_location"):
        settings["ssl.ca.location"] = config["ssl_ca_location"]
    settings.update(extra)
    return settings


def classify(error: KafkaError, config: dict[str, Any], what: str) -> ConnectorError:
    """The connector error for a librdkafka error, its message redacted.

    Args:
        error: the error librdkafka reported.
        config: the loaded config (to redact its password).
        what: what was being done, e.g. `"reading orders/0"`.
    """
    message = redact(f"{what}: {error.str()} ({error.name()})", config)
    code = error.code()
    if code in _CONFIG_CODES:
        return ConfigError(message)
    if code in _TERMINAL_CODES or error.fatal():
        return TerminalError(message)
    return TransientError(message)


class ErrorLog:
    """Collects librdkafka's asynchronous errors (`error_cb`) for a client.

    `raise_if_failed()` raises at once for errors that will not heal (bad
    credentials, TLS failure, fatal errors); connection refusals only count once
    every broker is down, and even then only `check()` gives up early.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self._lock = threading.Lock()
        self.errors: list[KafkaError] = []

    def __call__(self, error: KafkaError) -> None:
        with self._lock:
            self.errors.append(error)

    def failure(self) -> KafkaError | None:
        """The first error that will not heal by waiting, if any."""
        with self._lock:
            for error in self.errors:
                if error.code() in _CONFIG_CODES or error.fatal():
                    return error
        return None

    def all_brokers_down(self) -> bool:
        with self._lock:
            return any(e.code() == KafkaError._ALL_BROKERS_DOWN for e in self.errors)

    def reason(self) -> str:
        """The most telling error text seen so far (redacted), or an empty string."""
        with self._lock:
            chosen = next(
                (e for e in self.errors if e.code() != KafkaError._ALL_BROKERS_DOWN),
                self.errors[0] if self.errors else None,
            )
        return redact(chosen.str(), self.config) if chosen else ""

    def raise_if_failed(self, what: str) -> None:
        """Raise the connector error for the first unhealable error, if any."""
        error = self.failure()
        if error is not None:
            raise classify(error, self.config, what)


def check_connection(config: dict[str, Any]) -> CheckResult:
    """Fetch the cluster's metadata within `timeout`; never raises.

    Gives up early when authentication fails or every broker refuses the
    connection, so a wrong password or a closed port answers in milliseconds.
    """
    started = time.perf_counter()
    servers = config["bootstrap_servers"]
    errors = ErrorLog(config)
    admin = AdminClient(client_settings(config, error_cb=errors))
    deadline = time.monotonic() + float(config.get("timeout", 10.0))
    while True:
        try:
            metadata = admin.list_topics(timeout=0.25)
        except KafkaException:
            metadata = None
        admin.poll(0)
        if metadata is not None:
            elapsed = round((time.perf_counter() - started) * 1000, 2)
            topics = sum(1 for name in metadata.topics if not name.startswith("__"))
            return CheckResult(
                True,
                f"connected to {servers}: {len(metadata.brokers)} broker(s), "
                f"{topics} topic(s)",
                elapsed,
            )
        failure = errors.failure()
        if failure is not None:
            message = f"cannot use {servers}: {redact(failure.str(), config)}"
            return CheckResult(False, message)
        if errors.all_brokers_down() or time.monotonic() > deadline:
            reason = errors.reason() or "no answer"
            return CheckResult(False, f"cannot reach {servers}: {reason}")


def first_server(config: dict[str, Any]) -> str:
    """The first bootstrap server: the cluster's name in lineage dataset names."""
    return str(config["bootstrap_servers"]).split(",")[0].strip()
