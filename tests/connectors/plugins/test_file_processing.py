"""The file_processing source against a real local HTTP server (the service)."""

from __future__ import annotations

import gzip
import hashlib
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.base import SOURCE_REF_COLUMN, Chunk, ConnectorContext
from connectors.exceptions import ConfigError, TerminalError
from connectors.plugins.file_processing import (
    FileProcessingPlugin,
    FileProcessingSource,
    pick_format,
)
from connectors.ssrf import UnsafeUrlError
from tests.connectors.contract import SourceContract
from tests.connectors.plugins.rest.server import ApiServer, Recorded

LOOPBACK = ("127.0.0.1/32",)
CSV = b"id,name\n1,ada\n2,bob\n3,cy\n4,dee\n5,eve\n6,fay\n7,gus\n"

Publish = Callable[..., dict[str, Any]]


def event_for(
    file_id: str, url: str, body: bytes, content_type: str | None
) -> dict[str, Any]:
    """The event the service would announce for `body` at `url`."""
    return {
        "file_id": file_id,
        "url": url,
        "content_type": content_type,
        "size": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
    }


@pytest.fixture
def server() -> Iterator[ApiServer]:
    api = ApiServer().start()
    try:
        yield api
    finally:
        api.stop()


@pytest.fixture
def publish(server: ApiServer) -> Publish:
    """`publish(file_id, path, body, content_type, served=None)`: serve `served`
    (default `body`) at `path` and return the event announcing `body`."""

    def make(
        file_id: str,
        path: str,
        body: bytes,
        content_type: str | None = "text/csv",
        *,
        served: bytes | None = None,
    ) -> dict[str, Any]:
        payload = body if served is None else served
        server.route(
            "GET",
            path,
            lambda _r: (200, {"Content-Type": content_type or "x/y"}, payload),
        )
        return event_for(file_id, path, body, content_type)

    return make


@pytest.fixture
def make_source(
    server: ApiServer, tmp_path: Path
) -> Iterator[Callable[..., FileProcessingSource]]:
    made: list[FileProcessingSource] = []

    def make(
        allowed: tuple[str, ...] = LOOPBACK,
        secrets: dict[str, Any] | None = None,
        cache: str = "cache",
        **config: Any,
    ) -> FileProcessingSource:
        loaded = FileProcessingPlugin.load_config(
            {"base_url": server.url, "cache_dir": str(tmp_path / cache), **config},
            secrets,
        )
        source = FileProcessingPlugin.source(
            loaded,
            ConnectorContext(
                name="fps-test", allowed_networks=allowed, correlation_id="c-1"
            ),
        )
        made.append(source)
        return source  # type: ignore[return-value]

    yield make
    for source in made:
        source.close()


def read_all(
    source: FileProcessingSource, options: dict[str, Any], chunk_rows: int = 3
) -> pa.Table:
    chunks = list(source.plan(options, chunk_rows=chunk_rows))
    batches = [b for c in chunks for b in source.read(options, c)]
    return pa.Table.from_batches(batches)


class TestFileProcessingSourceContract(SourceContract):
    @pytest.fixture
    def source(
        self, make_source: Callable[..., FileProcessingSource]
    ) -> FileProcessingSource:
        return make_source()

    @pytest.fixture
    def read_options(self, publish: Publish) -> dict[str, Any]:
        return publish("f-contract", "/files/people.csv", CSV)

    @pytest.fixture
    def expected_refs(self) -> list[str]:
        return [f"f-contract#{n}" for n in range(1, 8)]


def test_the_file_is_parsed_with_the_files_readers(
    make_source: Callable[..., FileProcessingSource], publish: Publish
) -> None:
    options = publish("f-1", "/files/people.csv", CSV)

    table = read_all(make_source(), options)

    assert table.column("id").to_pylist() == ["1", "2", "3", "4", "5", "6", "7"]
    assert table.column("name").to_pylist()[:2] == ["ada", "bob"]
    assert table.column(SOURCE_REF_COLUMN).to_pylist()[0] == "f-1#1"


def test_a_checksum_mismatch_fails_before_any_record_is_parsed(
    make_source: Callable[..., FileProcessingSource],
    publish: Publish,
    tmp_path: Path,
) -> None:
    tampered = CSV.replace(b"ada", b"eve")
    options = publish("bad-1", "/files/people.csv", CSV, served=tampered)
    expected = hashlib.sha256(CSV).hexdigest()
    got = hashlib.sha256(tampered).hexdigest()

    with pytest.raises(TerminalError) as raised:
        list(make_source().plan(options, chunk_rows=3))

    assert str(raised.value) == (
        f"sha256 mismatch for file_id=bad-1: expected {expected}, got {got}"
    )
    assert list((tmp_path / "cache").iterdir()) == []  # nothing kept to parse


@pytest.mark.parametrize(
    ("served", "got"),
    [
        pytest.param(CSV + b"8,hal\n", "more than 49", id="longer"),
        pytest.param(CSV[:-4], "45", id="shorter"),
    ],
)
def test_a_size_mismatch_is_a_clear_error(
    make_source: Callable[..., FileProcessingSource],
    publish: Publish,
    served: bytes,
    got: str,
) -> None:
    options = publish("size-1", "/files/people.csv", CSV, served=served)

    with pytest.raises(TerminalError) as raised:
        list(make_source().plan(options, chunk_rows=3))

    assert str(raised.value) == (
        f"size mismatch for file_id=size-1: expected 49 bytes, got {got}"
    )


def test_the_format_comes_from_the_content_type(
    make_source: Callable[..., FileProcessingSource], publish: Publish
) -> None:
    lines = b'{"a": 1}\n{"a": 2}\n'
    options = publish("j-1", "/download/abc", lines, "application/x-ndjson")

    table = read_all(make_source(), {**options, "fields": {"a": "integer"}})

    assert table.column("a").to_pylist() == [1, 2]


def test_parquet_and_gzip_are_read(
    make_source: Callable[..., FileProcessingSource], publish: Publish
) -> None:
    sink = io.BytesIO()
    pq.write_table(pa.table({"x": [1, 2, 3]}), sink)
    parquet = publish(
        "p-1", "/blob/1", sink.getvalue(), "application/vnd.apache.parquet"
    )
    packed = publish(
        "g-1", "/files/people.csv.gz", gzip.compress(CSV), "application/gzip"
    )
    source = make_source()

    assert read_all(source, parquet).column("x").to_pylist() == [1, 2, 3]
    assert read_all(source, packed).num_rows == 7


def test_a_worker_without_the_copy_downloads_and_verifies_it_again(
    make_source: Callable[..., FileProcessingSource],
    publish: Publish,
    server: ApiServer,
) -> None:
    options = publish("f-2", "/files/people.csv", CSV)
    chunks = list(make_source(cache="planner").plan(options, chunk_rows=4))

    other = make_source(cache="other-worker")
    rows = [b.num_rows for c in chunks for b in other.read(options, c)]

    assert rows == [4, 3]
    assert len(server.hits("/files/people.csv")) == 2  # planner + the other worker


def test_credentials_go_to_the_service_only(
    make_source: Callable[..., FileProcessingSource],
    publish: Publish,
    server: ApiServer,
) -> None:
    options = publish("f-3", "/files/people.csv", CSV)
    source = make_source(auth_type="bearer", secrets={"token": "s3cr3t-token"})

    list(source.plan(options, chunk_rows=10))

    (request,) = server.hits("/files/people.csv")
    assert request.headers["authorization"] == "Bearer s3cr3t-token"
    assert request.headers["x-correlation-id"] == "c-1"
    assert request.headers["accept-encoding"] == "identity"


def test_loopback_is_refused_without_the_allow_list_and_nothing_is_sent(
    make_source: Callable[..., FileProcessingSource],
    publish: Publish,
    server: ApiServer,
) -> None:
    options = publish("f-4", "/files/people.csv", CSV)

    with pytest.raises(UnsafeUrlError, match="non-public address"):
        list(make_source(allowed=()).plan(options, chunk_rows=10))

    assert server.requests == []


def test_a_redirect_is_checked_again(
    make_source: Callable[..., FileProcessingSource], server: ApiServer
) -> None:
    canary = ApiServer().start()
    try:
        server.route(
            "GET",
            "/files/moved.csv",
            lambda _r: (
                302,
                {"Location": f"{canary.url}/x".replace("127.0.0.1", "127.0.0.2")},
                b"",
            ),
        )
        options = event_for("f-5", "/files/moved.csv", CSV, "text/csv")

        with pytest.raises(UnsafeUrlError, match=r"127\.0\.0\.2"):
            list(make_source().plan(options, chunk_rows=10))

        assert canary.requests == []
    finally:
        canary.stop()


def test_another_host_needs_allow_other_hosts(
    make_source: Callable[..., FileProcessingSource], server: ApiServer
) -> None:
    options = event_for("f-6", "http://files.example.com/a.csv", CSV, "text/csv")

    with pytest.raises(ConfigError, match="allow_other_hosts"):
        list(make_source().plan(options, chunk_rows=10))

    assert server.requests == []


def test_a_file_over_the_limit_is_refused_before_downloading(
    make_source: Callable[..., FileProcessingSource],
    publish: Publish,
    server: ApiServer,
) -> None:
    options = publish("f-7", "/files/people.csv", CSV)

    with pytest.raises(TerminalError, match="over max_file_bytes \\(10\\)"):
        list(make_source(max_file_bytes=10).plan(options, chunk_rows=10))

    assert server.requests == []


def test_a_run_without_an_event_is_a_config_error(
    make_source: Callable[..., FileProcessingSource],
) -> None:
    with pytest.raises(ConfigError, match="no file event in the source options"):
        list(make_source().plan({}, chunk_rows=10))


def test_a_chunk_of_another_file_is_refused(
    make_source: Callable[..., FileProcessingSource], publish: Publish
) -> None:
    first = publish("f-8", "/files/people.csv", CSV)
    second = publish("f-9", "/files/other.csv", CSV + b"8,hal\n")
    source = make_source()
    (chunk, *_) = list(source.plan(first, chunk_rows=10))

    with pytest.raises(TerminalError, match="planned for another file"):
        list(source.read(second, Chunk(0, chunk.spec)))


def test_check_reports_the_service(
    make_source: Callable[..., FileProcessingSource], server: ApiServer
) -> None:
    def answer(_r: Recorded) -> tuple[int, dict[str, str], bytes]:
        return (200, {}, orjson.dumps({"ok": True}))

    server.route("GET", "/", answer)

    assert make_source().check().ok is True
    assert make_source(allowed=()).check().ok is False


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        pytest.param(
            {"content_type": "text/csv; charset=utf-8"}, ("csv", "none"), id="csv"
        ),
        pytest.param({"url": "/a/b.jsonl.zst"}, ("jsonl", "zstd"), id="by-name"),
        pytest.param(
            {"url": "/a/b.csv", "content_type": "application/json"},
            ("json", "none"),
            id="type-wins",
        ),
        pytest.param(
            {"url": "/a/b", "content_type": "text/csv", "format": "jsonl"},
            ("jsonl", "none"),
            id="option-wins",
        ),
    ],
)
def test_pick_format(options: dict[str, Any], expected: tuple[str, str]) -> None:
    assert pick_format(options, {}) == expected


def test_an_unknown_format_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="cannot tell the format of file_id=z"):
        pick_format({"file_id": "z", "url": "/x", "content_type": "image/png"}, {})


def test_secrets_must_come_from_a_credential() -> None:
    with pytest.raises(ConfigError, match="token"):
        FileProcessingPlugin.load_config(
            {"base_url": "https://fps.example.com", "auth_type": "bearer", "token": "x"}
        )
