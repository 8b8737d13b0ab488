"""The `rest` sink: batched POSTs with stable idempotency keys, at-least-once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pytest

from connectors.base import SOURCE_REF_COLUMN
from connectors.exceptions import FencedError, TerminalError, TransientError
from connectors.plugins.rest import RECORD_COLUMN, RestSink
from connectors.plugins.rest.records import JSON_FIELD_METADATA
from tests.connectors.plugins.rest.server import ApiServer, Recorded, Reply, json_reply


def sample(n: int = 5) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(range(1, n + 1), pa.int64()),
            "name": [f"n{i}" for i in range(1, n + 1)],
            SOURCE_REF_COLUMN: [f"src#{i}" for i in range(1, n + 1)],
        }
    )


def yes() -> bool:
    return True


class Receiver:
    """An endpoint that stores records once per idempotency key (as Stripe does)."""

    def __init__(self, server: ApiServer, *, fail_on: set[int] | None = None) -> None:
        self.by_key: dict[str, Any] = {}
        self.fail_on = fail_on or set()
        self.calls = 0
        server.route("POST", "/ingest", self.handle)

    def handle(self, request: Recorded) -> Reply:
        self.calls += 1
        if self.calls in self.fail_on:
            return json_reply({"error": "busy"}, 503)
        self.by_key.setdefault(request.headers["idempotency-key"], request.json())
        return json_reply({"accepted": True}, 201)

    def stored(self) -> list[Any]:
        records: list[Any] = []
        for payload in self.by_key.values():
            records += payload if isinstance(payload, list) else [payload]
        return sorted(records, key=lambda r: r["id"])


def test_batches_are_posted_with_idempotency_keys(
    server: ApiServer, make_sink: Callable[..., RestSink]
) -> None:
    receiver = Receiver(server)
    options = {"path": "/ingest", "batch_size": 2}

    result = make_sink().write(options, sample(), run_id=12, chunk_seq=3, fence=yes)

    hits = server.hits("/ingest")
    assert result.rows_written == 5
    assert result.details == {"requests": 3}
    assert [r.headers["idempotency-key"] for r in hits] == [
        "12-3-0",
        "12-3-1",
        "12-3-2",
    ]
    assert [r.json() for r in hits] == [
        [{"id": 1, "name": "n1"}, {"id": 2, "name": "n2"}],
        [{"id": 3, "name": "n3"}, {"id": 4, "name": "n4"}],
        [{"id": 5, "name": "n5"}],
    ]
    assert {r.headers["content-type"] for r in hits} == {"application/json"}
    assert {r.headers["x-correlation-id"] for r in hits} == {"corr-123"}
    assert len(receiver.stored()) == 5


def test_batch_size_one_posts_single_objects(
    server: ApiServer, make_sink: Callable[..., RestSink]
) -> None:
    Receiver(server)

    make_sink().write(
        {"path": "/ingest", "batch_size": 1},
        sample(2),
        run_id=1,
        chunk_seq=0,
        fence=yes,
    )

    assert [r.json() for r in server.hits("/ingest")] == [
        {"id": 1, "name": "n1"},
        {"id": 2, "name": "n2"},
    ]


def test_a_retried_chunk_reuses_its_keys_so_records_are_stored_once(
    server: ApiServer, make_sink: Callable[..., RestSink]
) -> None:
    receiver = Receiver(server, fail_on={2})
    sink = make_sink(max_retries=0)
    options = {"path": "/ingest", "batch_size": 2}

    with pytest.raises(TransientError):
        sink.write(options, sample(), run_id=7, chunk_seq=1, fence=yes)
    result = sink.write(options, sample(), run_id=7, chunk_seq=1, fence=yes)

    keys = [r.headers["idempotency-key"] for r in server.hits("/ingest")]
    assert keys == ["7-1-0", "7-1-1", "7-1-0", "7-1-1", "7-1-2"]
    assert result.rows_written == 5
    assert [r["id"] for r in receiver.stored()] == [1, 2, 3, 4, 5]


def test_a_fenced_write_sends_nothing(
    server: ApiServer, make_sink: Callable[..., RestSink]
) -> None:
    Receiver(server)

    with pytest.raises(FencedError):
        make_sink().write(
            {"path": "/ingest"}, sample(), run_id=1, chunk_seq=0, fence=lambda: False
        )

    assert server.hits("/ingest") == []


def test_json_columns_are_sent_as_json(
    server: ApiServer, make_sink: Callable[..., RestSink]
) -> None:
    Receiver(server)
    batch = pa.Table.from_arrays(
        [
            pa.array(['{"id":1,"tags":["a"]}', '{"id":2,"x":null}']),
            pa.array(["s#1", "s#2"]),
        ],
        schema=pa.schema(
            [
                pa.field(RECORD_COLUMN, pa.string(), metadata=JSON_FIELD_METADATA),
                pa.field(SOURCE_REF_COLUMN, pa.string()),
            ]
        ),
    )

    make_sink().write({"path": "/ingest"}, batch, run_id=1, chunk_seq=0, fence=yes)

    assert server.hits("/ingest")[0].json() == [
        {"record": {"id": 1, "tags": ["a"]}},
        {"record": {"id": 2, "x": None}},
    ]


def test_an_empty_batch_sends_nothing(
    server: ApiServer, make_sink: Callable[..., RestSink]
) -> None:
    Receiver(server)

    result = make_sink().write(
        {"path": "/ingest"}, sample().slice(0, 0), run_id=1, chunk_seq=0, fence=yes
    )

    assert (result.rows_written, server.hits("/ingest")) == (0, [])


def test_a_refused_batch_is_terminal(
    server: ApiServer, make_sink: Callable[..., RestSink]
) -> None:
    server.route("POST", "/ingest", lambda r: json_reply({"error": "bad id"}, 422))

    with pytest.raises(TerminalError) as caught:
        make_sink().write(
            {"path": "/ingest"}, sample(), run_id=1, chunk_seq=0, fence=yes
        )

    assert str(caught.value) == 'POST /ingest returned HTTP 422: {"error":"bad id"}'


def test_prepare_and_dataset_name(
    server: ApiServer, make_sink: Callable[..., RestSink]
) -> None:
    sink = make_sink()

    sink.prepare({"path": "/ingest"}, sample().schema)

    assert sink.dataset_name({"path": "/ingest"}) == f"{server.url}/ingest"
