"""The `rest` source against a real local HTTP server: pagination, records, errors."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
import pyarrow as pa
import pytest

from connectors.base import SOURCE_REF_COLUMN, Chunk
from connectors.exceptions import ConfigError, TerminalError, TransientError
from connectors.plugins.rest import (
    RAW_COLUMN,
    READ_ERROR_COLUMN,
    RECORD_COLUMN,
    RestPlugin,
    RestSource,
)
from connectors.plugins.rest.client import ThrottledError
from connectors.registry import get_plugin
from tests.connectors.contract import SourceContract
from tests.connectors.plugins.rest.server import (
    ApiServer,
    Recorded,
    Reply,
    json_reply,
)

ITEMS = [
    {"id": i, "name": f"item {i}", "updated": f"2024-01-0{i}"} for i in range(1, 8)
]
CHUNK = Chunk(0, {"page_start": 1})


def read_table(source: RestSource, options: dict[str, Any]) -> pa.Table:
    chunks = list(source.plan(options, chunk_rows=1000))
    batches = [b for c in chunks for b in source.read(options, c)]
    return pa.Table.from_batches(batches)


def ids(table: pa.Table) -> list[int]:
    return [orjson.loads(r)["id"] for r in table.column(RECORD_COLUMN).to_pylist()]


def page_handler(request: Recorded) -> Reply:
    page = int(request.param("page") or 1)
    size = int(request.param("per_page") or 3)
    return json_reply({"data": {"items": ITEMS[(page - 1) * size : page * size]}})


class TestRestSourceContract(SourceContract):
    """The `rest` source passes the shared source contract."""

    @pytest.fixture
    def source(
        self, server: ApiServer, make_source: Callable[..., RestSource]
    ) -> RestSource:
        server.route("GET", "/", lambda r: json_reply({"ok": True}))
        server.route("GET", "/items", page_handler)
        return make_source()

    @pytest.fixture
    def read_options(self) -> dict[str, Any]:
        return {
            "path": "/items",
            "records_path": "data.items",
            "pagination": {"type": "page", "size_param": "per_page", "size": 3},
        }

    @pytest.fixture
    def expected_refs(self) -> list[str]:
        return [f"/items?page={1 + i // 3}#{i % 3}" for i in range(7)]


def test_the_registry_finds_the_plugin() -> None:
    assert get_plugin("rest") is RestPlugin


def test_capabilities_and_secret_fields() -> None:
    assert RestPlugin.capabilities.source is True
    assert RestPlugin.capabilities.sink is True
    assert RestPlugin.capabilities.incremental is True
    assert RestPlugin.capabilities.chunkable is False
    assert RestPlugin.secret_fields() == (
        "password",
        "token",
        "api_key",
        "client_secret",
    )


# -- pagination ------------------------------------------------------------------------


def offset_handler(request: Recorded) -> Reply:
    offset, limit = int(request.param("offset") or 0), int(request.param("limit") or 0)
    return json_reply({"results": ITEMS[offset : offset + limit]})


def cursor_handler(request: Recorded) -> Reply:
    after = request.param("after")
    if request.method == "POST":
        after = request.json().get("after")
    start = int(after or 0)
    page = ITEMS[start : start + 3]
    following = str(start + 3) if start + 3 < len(ITEMS) else None
    return json_reply({"items": page, "meta": {"next": following}})


def link_handler(server: ApiServer) -> Callable[[Recorded], Reply]:
    def handle(request: Recorded) -> Reply:
        page = int(request.param("p") or 1)
        headers = {}
        if page * 3 < len(ITEMS):
            headers["Link"] = (
                f'<{server.url}/items?p=1>; rel="first", '
                f'</items?p={page + 1}>; rel="next"'
            )
        return json_reply(ITEMS[(page - 1) * 3 : page * 3], **headers)

    return handle


PAGINATION_CASES = [
    pytest.param(
        {
            "records_path": "data.items",
            "pagination": {"type": "page", "size_param": "per_page", "size": 3},
        },
        page_handler,
        [
            {"page": ["1"], "per_page": ["3"]},
            {"page": ["2"], "per_page": ["3"]},
            {"page": ["3"], "per_page": ["3"]},
        ],
        id="page-with-size",
    ),
    pytest.param(
        {"records_path": "data.items", "pagination": {"type": "page", "start": 1}},
        page_handler,
        [{"page": ["1"]}, {"page": ["2"]}, {"page": ["3"]}, {"page": ["4"]}],
        id="page-until-empty",
    ),
    pytest.param(
        {"records_path": "results", "pagination": {"type": "offset", "limit": 3}},
        offset_handler,
        [{"offset": [str(o)], "limit": ["3"]} for o in (0, 3, 6)],
        id="offset",
    ),
    pytest.param(
        {
            "records_path": "items",
            "pagination": {
                "type": "cursor",
                "cursor_path": "meta.next",
                "cursor_param": "after",
            },
        },
        cursor_handler,
        [{}, {"after": ["3"]}, {"after": ["6"]}],
        id="cursor",
    ),
]


@pytest.mark.parametrize(("options", "handler", "queries"), PAGINATION_CASES)
def test_pagination_reads_every_record_once(
    server: ApiServer,
    make_source: Callable[..., RestSource],
    options: dict[str, Any],
    handler: Callable[[Recorded], Reply],
    queries: list[dict[str, list[str]]],
) -> None:
    server.route("GET", "/items", handler)

    table = read_table(make_source(), {"path": "/items", **options})

    assert ids(table) == list(range(1, 8))
    assert [r.query for r in server.hits("/items")] == queries
    assert table.column(SOURCE_REF_COLUMN).to_pylist()[-1] == "/items?page=3#0"


def test_cursor_pagination_in_a_post_body(
    server: ApiServer, make_source: Callable[..., RestSource]
) -> None:
    server.route("POST", "/search", cursor_handler)
    options = {
        "path": "/search",
        "method": "POST",
        "body": {"query": "all"},
        "records_path": "items",
        "pagination": {
            "type": "cursor",
            "cursor_path": "meta.next",
            "cursor_param": "after",
            "cursor_in": "body",
        },
    }

    table = read_table(make_source(), options)

    assert ids(table) == list(range(1, 8))
    assert [r.json() for r in server.hits("/search")] == [
        {"query": "all"},
        {"query": "all", "after": "3"},
        {"query": "all", "after": "6"},
    ]


def test_link_header_pagination(
    server: ApiServer, make_source: Callable[..., RestSource]
) -> None:
    server.route("GET", "/items", link_handler(server))

    table = read_table(
        make_source(), {"path": "/items", "pagination": {"type": "link_header"}}
    )

    assert ids(table) == list(range(1, 8))
    assert [r.query for r in server.hits("/items")] == [{}, {"p": ["2"]}, {"p": ["3"]}]


def test_a_link_to_another_origin_is_not_followed(
    server: ApiServer, make_source: Callable[..., RestSource]
) -> None:
    server.route(
        "GET",
        "/items",
        lambda r: json_reply(ITEMS[:1], Link='<http://127.0.0.2:1/x>; rel="next"'),
    )
    source = make_source()

    with pytest.raises(TerminalError, match="another origin"):
        read_table(source, {"path": "/items", "pagination": {"type": "link_header"}})
    assert len(server.hits("/items")) == 1


def test_max_pages_stops_the_read(
    server: ApiServer, make_source: Callable[..., RestSource]
) -> None:
    server.route("GET", "/items", page_handler)
    options = {
        "path": "/items",
        "records_path": "data.items",
        "pagination": {"type": "page"},
        "max_pages": 2,
    }

    table = read_table(make_source(), options)

    assert ids(table) == [1, 2, 3, 4, 5, 6]
    assert len(server.hits("/items")) == 2


def test_plan_is_one_json_chunk(
    server: ApiServer, make_source: Callable[..., RestSource]
) -> None:
    chunks = list(make_source().plan({"path": "/items"}, chunk_rows=10))

    assert chunks == [Chunk(0, {"page_start": 1})]
    assert server.requests == []


# -- records ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "records_path", "expected"),
    [
        pytest.param(
            {"data": {"items": [{"a": 1}]}}, "data.items", [{"a": 1}], id="dotted"
        ),
        pytest.param(
            {"data": {"items": [{"a": 1}]}}, "$.data.items", [{"a": 1}], id="jsonpath"
        ),
        pytest.param(
            {"r": [{"rows": [{"a": 2}]}]}, "r[0].rows", [{"a": 2}], id="index"
        ),
        pytest.param(
            [{"a": 3}, {"a": 4}], None, [{"a": 3}, {"a": 4}], id="top-level-list"
        ),
        pytest.param({"data": {"a": 5}}, "data", [{"a": 5}], id="object-is-one-record"),
        pytest.param({"data": None}, "data", [], id="null-is-no-records"),
    ],
)
def test_records_path_finds_the_records(
    server: ApiServer,
    make_source: Callable[..., RestSource],
    payload: Any,
    records_path: str | None,
    expected: list[Any],
) -> None:
    server.route("GET", "/r", lambda r: json_reply(payload))

    batches = list(
        make_source().read({"path": "/r", "records_path": records_path}, CHUNK)
    )

    got = [
        orjson.loads(x) for b in batches for x in b.column(RECORD_COLUMN).to_pylist()
    ]
    assert got == expected


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        pytest.param(
            {"other": []},
            "records_path 'data.items' is not in the response",
            id="missing",
        ),
        pytest.param({"data": {"items": 3}}, "leads to a int", id="scalar"),
    ],
)
def test_a_wrong_records_path_is_terminal(
    server: ApiServer,
    make_source: Callable[..., RestSource],
    payload: Any,
    message: str,
) -> None:
    server.route("GET", "/r", lambda r: json_reply(payload))

    with pytest.raises(TerminalError, match=message):
        list(make_source().read({"path": "/r", "records_path": "data.items"}, CHUNK))


def test_declared_fields_are_typed_and_a_bad_record_gets_a_read_error(
    server: ApiServer, make_source: Callable[..., RestSource]
) -> None:
    records = [
        {"id": 1, "name": "a", "price": 1.5, "active": True, "extra": {"x": [1]}},
        {"id": "two", "name": "b", "price": 2, "active": False},
        {"id": 3, "price": None},
        ["not", "an", "object"],
    ]
    server.route("GET", "/r", lambda r: json_reply(records))
    options = {
        "path": "/r",
        "fields": {
            "id": "integer",
            "name": "string",
            "price": "float",
            "active": "boolean",
        },
    }

    (batch,) = make_source().read(options, CHUNK)

    assert batch.schema.names == [
        "id",
        "name",
        "price",
        "active",
        RECORD_COLUMN,
        SOURCE_REF_COLUMN,
        READ_ERROR_COLUMN,
        RAW_COLUMN,
    ]
    assert batch.schema.field("id").type == pa.int64()
    assert batch.schema.field("price").type == pa.float64()
    assert batch.schema.field("active").type == pa.bool_()
    assert batch.schema.field(RECORD_COLUMN).metadata == {b"dis.type": b"json"}
    assert batch.column("id").to_pylist() == [1, None, 3, None]
    assert batch.column("name").to_pylist() == ["a", "b", None, None]
    assert batch.column("price").to_pylist() == [1.5, 2.0, None, None]
    assert batch.column(READ_ERROR_COLUMN).to_pylist() == [
        None,
        "field 'id': expected integer, got string",
        None,
        "record is a JSON array, not an object",
    ]
    assert batch.column(RAW_COLUMN).to_pylist() == [
        None,
        '{"id":"two","name":"b","price":2,"active":false}',
        None,
        '["not","an","object"]',
    ]
    assert orjson.loads(batch.column(RECORD_COLUMN)[0].as_py())["extra"] == {"x": [1]}
    assert batch.column(SOURCE_REF_COLUMN).to_pylist() == [
        f"/r?page=1#{i}" for i in range(4)
    ]


def test_declared_fields_cannot_use_reserved_names() -> None:
    with pytest.raises(ConfigError) as caught:
        RestPlugin.validate_options("source", {"fields": {"record": "string"}})

    assert caught.value.errors == {"fields": ["Field name(s) record are reserved."]}


@pytest.mark.parametrize(
    ("options", "errors"),
    [
        pytest.param(
            {"pagination": {"type": "sideways"}},
            {
                "pagination": {
                    "type": ["Must be one of: none, page, offset, cursor, link_header."]
                }
            },
            id="unknown-type",
        ),
        pytest.param(
            {"pagination": {"type": "cursor"}},
            {
                "pagination": {
                    "cursor_path": ["Required for cursor pagination."],
                    "cursor_param": ["Required for cursor pagination."],
                }
            },
            id="cursor-needs-path-and-param",
        ),
        pytest.param(
            {"path": "http://elsewhere/x"},
            {"path": ["A path under base_url, not a URL."]},
            id="path-is-not-a-url",
        ),
    ],
)
def test_bad_read_options_are_config_errors(
    options: dict[str, Any], errors: dict[str, Any]
) -> None:
    with pytest.raises(ConfigError) as caught:
        RestPlugin.validate_options("source", options)

    assert caught.value.errors == errors


# -- incremental -----------------------------------------------------------------------


def test_incremental_read_sends_since_and_reports_the_max_cursor(
    server: ApiServer, make_source: Callable[..., RestSource]
) -> None:
    def since_handler(request: Recorded) -> Reply:
        since = request.param("updated_since") or ""
        return json_reply([i for i in ITEMS if i["updated"] > since])

    server.route("GET", "/items", since_handler)
    source = make_source()
    options = {
        "path": "/items",
        "since_param": "updated_since",
        "since_value": "2024-01-04",
        "cursor_field": "updated",
    }

    table = read_table(source, options)

    assert ids(table) == [5, 6, 7]
    assert server.hits("/items")[0].query == {"updated_since": ["2024-01-04"]}
    assert source.cursor_value == "2024-01-07"


def test_incremental_read_with_nothing_new_keeps_the_cursor(
    server: ApiServer, make_source: Callable[..., RestSource]
) -> None:
    server.route("GET", "/items", lambda r: json_reply([]))
    source = make_source()
    options = {
        "path": "/items",
        "since_param": "since",
        "since_value": 41,
        "cursor_field": "seq",
    }

    assert read_table_or_empty(source, options) == 0
    assert source.cursor_value == 41


def read_table_or_empty(source: RestSource, options: dict[str, Any]) -> int:
    return sum(b.num_rows for b in source.read(options, CHUNK))


# -- headers ---------------------------------------------------------------------------


def test_requests_carry_the_correlation_id_and_configured_headers(
    server: ApiServer, make_source: Callable[..., RestSource]
) -> None:
    server.route("GET", "/items", lambda r: json_reply([]))

    list(
        make_source(headers={"Accept": "application/json"}).read(
            {"path": "/items"}, CHUNK
        )
    )

    (request,) = server.hits("/items")
    assert request.headers["x-correlation-id"] == "corr-123"
    assert request.headers["accept"] == "application/json"
    assert request.headers["host"] == server.url.removeprefix("http://")


# -- failures --------------------------------------------------------------------------


def sequence(*replies: Reply) -> Callable[[Recorded], Reply]:
    """Answer with `replies` in turn, repeating the last one."""
    queue = list(replies)

    def handle(request: Recorded) -> Reply:
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return handle


def test_429_honours_retry_after_then_succeeds(
    server: ApiServer, make_source: Callable[..., RestSource]
) -> None:
    server.route(
        "GET",
        "/items",
        sequence(json_reply({}, 429, **{"Retry-After": "1"}), json_reply(ITEMS[:2])),
    )

    started = time.monotonic()
    rows = read_table_or_empty(make_source(), {"path": "/items"})

    hits = server.hits("/items")
    assert rows == 2
    assert len(hits) == 2
    assert hits[1].at - hits[0].at >= 1.0
    assert time.monotonic() - started < 3


def test_429_beyond_the_cap_is_transient_at_once(
    server: ApiServer, make_source: Callable[..., RestSource]
) -> None:
    server.route(
        "GET", "/items", lambda r: json_reply({}, 429, **{"Retry-After": "120"})
    )

    with pytest.raises(ThrottledError) as caught:
        list(make_source(max_retry_after_seconds=5).read({"path": "/items"}, CHUNK))

    assert isinstance(caught.value, TransientError)
    assert caught.value.retry_after == 120.0
    assert (
        str(caught.value) == "GET /items was throttled (HTTP 429); retry after 120.0s"
    )
    assert len(server.hits("/items")) == 1


def test_5xx_is_retried_with_backoff_then_succeeds(
    server: ApiServer, make_source: Callable[..., RestSource]
) -> None:
    server.route(
        "GET",
        "/items",
        sequence(
            json_reply({"e": 1}, 503), json_reply({"e": 2}, 502), json_reply(ITEMS[:3])
        ),
    )

    rows = read_table_or_empty(make_source(max_retries=2), {"path": "/items"})

    assert rows == 3
    assert len(server.hits("/items")) == 3


def test_5xx_after_the_retries_is_transient(
    server: ApiServer, make_source: Callable[..., RestSource]
) -> None:
    server.route("GET", "/items", lambda r: (500, {}, b"database   down\n"))

    with pytest.raises(TransientError) as caught:
        list(make_source(max_retries=2).read({"path": "/items"}, CHUNK))

    assert str(caught.value) == "GET /items returned HTTP 500: database down"
    assert len(server.hits("/items")) == 3


def test_a_timeout_is_transient(
    server: ApiServer, make_source: Callable[..., RestSource]
) -> None:
    def slow(request: Recorded) -> Reply:
        time.sleep(0.6)
        return json_reply([])

    server.route("GET", "/slow", slow)

    with pytest.raises(TransientError) as caught:
        list(
            make_source(timeout_seconds=0.2, max_retries=0).read(
                {"path": "/slow"}, CHUNK
            )
        )

    assert str(caught.value) == "GET /slow timed out after 0.2s"


@pytest.mark.parametrize(
    "sized",
    [pytest.param(True, id="content-length"), pytest.param(False, id="streamed")],
)
def test_a_response_over_the_size_limit_is_terminal(
    server: ApiServer, make_source: Callable[..., RestSource], sized: bool
) -> None:
    body = orjson.dumps([{"blob": "x" * 1000} for _ in range(200)])
    headers = {} if sized else {"X-No-Length": "1"}
    server.route("GET", "/big", lambda r: (200, headers, body))

    with pytest.raises(TerminalError) as caught:
        list(make_source(max_response_bytes=50_000).read({"path": "/big"}, CHUNK))

    expected = (
        f"GET /big: response of {len(body)} bytes exceeds max_response_bytes (50000)"
        if sized
        else "GET /big: response exceeds max_response_bytes (50000)"
    )
    assert str(caught.value) == expected


def test_a_client_error_is_terminal_with_an_excerpt(
    server: ApiServer, make_source: Callable[..., RestSource]
) -> None:
    server.route("GET", "/items", lambda r: json_reply({"error": "no such list"}, 404))

    with pytest.raises(TerminalError) as caught:
        list(make_source().read({"path": "/items"}, CHUNK))

    assert str(caught.value) == 'GET /items returned HTTP 404: {"error":"no such list"}'
    assert len(server.hits("/items")) == 1


def test_a_body_that_is_not_json_is_terminal(
    server: ApiServer, make_source: Callable[..., RestSource]
) -> None:
    server.route("GET", "/items", lambda r: (200, {}, b"<html>"))

    with pytest.raises(
        TerminalError, match=r"response of /items is not JSON \(HTTP 200\)"
    ):
        list(make_source().read({"path": "/items"}, CHUNK))


def test_a_redirect_on_the_same_server_is_followed(
    server: ApiServer, make_source: Callable[..., RestSource]
) -> None:
    server.route("GET", "/old", lambda r: (302, {"Location": "/new?x=1"}, b""))
    server.route("GET", "/new", lambda r: json_reply(ITEMS[:1]))

    assert read_table_or_empty(make_source(), {"path": "/old"}) == 1
    assert server.hits("/new")[0].query == {"x": ["1"]}


def test_a_redirect_to_the_metadata_address_is_refused(
    server: ApiServer, make_source: Callable[..., RestSource]
) -> None:
    server.route(
        "GET",
        "/old",
        lambda r: (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
    )

    with pytest.raises(ConfigError, match="non-public address"):
        list(make_source().read({"path": "/old"}, CHUNK))


def test_check_reports_the_status(
    server: ApiServer, make_source: Callable[..., RestSource]
) -> None:
    server.route("GET", "/health", lambda r: json_reply({"ok": True}))

    result = make_source(check_path="/health").check()

    assert (result.ok, result.message) == (True, "GET /health answered HTTP 200")
