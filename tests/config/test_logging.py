"""JSON logs: the correlation id on every line of a request; secrets redacted."""

from __future__ import annotations

import io
import logging

import orjson
import pytest
import structlog
from django.conf import settings
from hypothesis import given
from hypothesis import settings as settings_h
from hypothesis import strategies as st

from config.logging import build_logging_config, redact_secrets, redact_text


@pytest.fixture
def log_lines():
    """Every log line the process writes, as parsed JSON, during the test."""
    config = build_logging_config("INFO", "json")
    formatter_cfg = config["formatters"]["structured"]
    factory = formatter_cfg.pop("()")
    formatter = factory(**formatter_cfg)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.addHandler(handler)

    def lines() -> list[dict]:
        return [orjson.loads(line) for line in stream.getvalue().splitlines() if line]

    yield lines
    root.removeHandler(handler)


@pytest.mark.django_db
def test_correlation_id_is_taken_returned_and_logged(api, log_lines):
    response = api.get("/api/v1/runs/", HTTP_X_CORRELATION_ID="abc")
    assert response["X-Correlation-ID"] == "abc"
    request_lines = [line for line in log_lines() if line["event"] == "http_request"]
    assert request_lines
    assert all(line["correlation_id"] == "abc" for line in request_lines)
    assert request_lines[-1]["path"] == "/api/v1/runs/"


@pytest.mark.django_db
def test_correlation_id_is_generated_when_missing_or_unsafe(api, log_lines):
    generated = api.get("/api/v1/runs/")["X-Correlation-ID"]
    assert len(generated) == 32
    unsafe = api.get("/api/v1/runs/", HTTP_X_CORRELATION_ID="a b\n<script>")
    assert unsafe["X-Correlation-ID"] not in ("a b\n<script>", generated)


def test_every_line_is_json_with_timestamp_and_level(log_lines):
    structlog.contextvars.bind_contextvars(correlation_id="xyz")
    try:
        structlog.get_logger("t").info("hello", n=1)
        logging.getLogger("plain.stdlib").warning("from stdlib %s", "too")
    finally:
        structlog.contextvars.clear_contextvars()
    first, second = log_lines()[-2:]
    assert first["event"] == "hello"
    assert first["correlation_id"] == "xyz"
    assert first["level"] == "info"
    assert "timestamp" in first
    assert second["event"] == "from stdlib too"
    assert second["correlation_id"] == "xyz"


@pytest.mark.parametrize(
    ("event", "leak"),
    [
        ({"event": "x", "password": "hunter2"}, "hunter2"),
        ({"event": "x", "config": {"api_key": "k-123"}}, "k-123"),
        ({"event": "x", "Authorization": "Token abcdef"}, "abcdef"),
        ({"event": "connect postgres://bob:hunter2@db:5432/x"}, "hunter2"),
        ({"event": "x", "detail": "login failed password=hunter2 for bob"}, "hunter2"),
        ({"event": "x", "items": [{"secret": "zzz"}]}, "zzz"),
    ],
    ids=["key", "nested", "header", "url", "inline", "list"],
)
def test_secrets_are_redacted(event, leak):
    out = orjson.dumps(redact_secrets(None, "info", event)).decode()
    assert leak not in out
    assert "***" in out


def test_redaction_keeps_harmless_text():
    assert redact_text("read 5 rows from postgres://db:5432/x") == (
        "read 5 rows from postgres://db:5432/x"
    )


def test_settings_logging_uses_the_structured_formatter():
    assert settings.LOGGING["handlers"]["stderr"]["formatter"] == "structured"


@settings_h(max_examples=500, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "password",
                "Token",
                "api_key",
                "secret",
                "passwd",
                "pg",
                "://",
                "@",
                "=",
                ":",
                " ",
                "x",
                "u:p",
                ";",
                "'",
                "é",
                "\n",
            ]
        )
        | st.text(max_size=3),
        max_size=12,
    ).map("".join)
)
def test_redaction_skipping_a_pattern_changes_nothing(text):
    """The prefilters only skip a pattern on text it cannot match."""
    from config.logging import INLINE_SECRET_PATTERN, REDACTED, URL_PASSWORD_PATTERN

    always = URL_PASSWORD_PATTERN.sub(r"\g<scheme>" + REDACTED + "@", text)
    always = INLINE_SECRET_PATTERN.sub(r"\g<key>" + REDACTED, always)
    assert redact_text(text) == always


def test_a_value_orjson_refuses_is_still_logged(log_lines):
    structlog.get_logger("test").info("huge", value=2**70, at={1: "int key"})
    (line,) = [line for line in log_lines() if line["event"] == "huge"]
    assert line["value"] == 2**70
    assert line["at"] == {"1": "int key"}
