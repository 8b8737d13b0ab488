"""The `wait_event` action: the first new matching JSON message, then past it."""

from __future__ import annotations

import orjson
import pytest

from connectors.base import ConnectorContext
from connectors.exceptions import NotReadyError
from connectors.plugins.kafka import KafkaPlugin


def event(file_id: str, content_type: str) -> bytes:
    return orjson.dumps(
        {"file_id": file_id, "content_type": content_type, "size": 3, "sha256": "x"}
    )


def test_wait_event_returns_the_first_match_and_commits_past_it(
    kafka_config, make_topic, produce
):
    topic = make_topic(partitions=1)
    params = {
        "topic": topic,
        "group_id": "wf-wait-1",
        "match": {"content_type": "text/csv"},
        "poll_seconds": 3,
    }
    context = ConnectorContext(name="fps")
    produce(topic, [(0, None, event("a", "image/png"), None)])
    with pytest.raises(NotReadyError) as info:
        KafkaPlugin.run_action(kafka_config, "wait_event", params, context)
    assert info.value.retry_after == 3.0
    produce(
        topic,
        [
            (0, None, event("b", "text/csv"), None),
            (0, None, event("c", "text/csv"), None),
        ],
    )
    first = KafkaPlugin.run_action(kafka_config, "wait_event", params, context)
    assert (first["event"]["file_id"], first["source_ref"]) == ("b", f"{topic}/0/1")
    second = KafkaPlugin.run_action(kafka_config, "wait_event", params, context)
    assert second["event"]["file_id"] == "c"
    with pytest.raises(NotReadyError):
        KafkaPlugin.run_action(kafka_config, "wait_event", params, context)


def test_other_actions_are_refused(kafka_config):
    from connectors.exceptions import ConfigError

    with pytest.raises(ConfigError, match="has no 'sql' action"):
        KafkaPlugin.run_action(kafka_config, "sql", {}, None)
