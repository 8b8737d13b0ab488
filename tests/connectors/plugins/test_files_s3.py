"""The `files` connector on S3-compatible object storage (a local moto server)."""

from __future__ import annotations

import io
import logging
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.base import SOURCE_REF_COLUMN, ConnectorContext, Sink
from connectors.exceptions import ConfigError, TransientError
from connectors.plugins.files import FilesPlugin, FilesSink, FilesSource
from tests.connectors.contract import SinkContract, SourceContract

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

REGION = "eu-west-1"
KEY_ID, SECRET = "test-key-id", "test-secret"
LOOPBACK = ConnectorContext(name="files-s3", allowed_networks=("127.0.0.0/8",))


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """A moto S3 server on a free loopback port, for this module's tests."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def fs(endpoint: str) -> Any:
    """A client of the test server, for arranging and inspecting objects."""
    return s3fs.S3FileSystem(
        key=KEY_ID,
        secret=SECRET,
        endpoint_url=endpoint,
        client_kwargs={"region_name": REGION},
        skip_instance_cache=True,
        use_listings_cache=False,
    )


@pytest.fixture
def bucket(fs: Any) -> str:
    """A bucket private to the test."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    return name


def s3_config(endpoint: str, bucket: str, **extra: Any) -> dict[str, Any]:
    return FilesPlugin.load_config(
        {
            "protocol": "s3",
            "bucket": bucket,
            "root": "data",
            "endpoint_url": endpoint,
            "region": REGION,
            "aws_access_key_id": KEY_ID,
            **extra,
        },
        {"aws_secret_access_key": SECRET},
    )


def put(fs: Any, key: str, data: bytes) -> None:
    with fs.open(key, "wb") as stream:
        stream.write(data)


class TestS3CsvGlobSourceContract(SourceContract):
    """CSV files under a bucket prefix, read through a glob."""

    @pytest.fixture
    def source(self, fs: Any, bucket: str, endpoint: str) -> FilesSource:
        put(fs, f"{bucket}/data/in/a.csv", b'x,y\n1,"p\nq"\n2,r\n3,s\n')
        put(fs, f"{bucket}/data/in/b.csv", b"x,y\n4,t\n")
        put(fs, f"{bucket}/data/in/c.json", b"[]")
        put(fs, f"{bucket}/other/d.csv", b"x,y\n5,u\n")
        source = FilesPlugin.source(s3_config(endpoint, bucket), LOOPBACK)
        assert isinstance(source, FilesSource)
        return source

    @pytest.fixture
    def read_options(self) -> dict[str, Any]:
        return {"path": "in/*.csv"}

    @pytest.fixture
    def expected_refs(self) -> list[str]:
        return ["in/a.csv#1", "in/a.csv#2", "in/a.csv#3", "in/b.csv#1"]


class TestS3ParquetSourceContract(SourceContract):
    """A Parquet object, read by row-group slices through ranged GETs."""

    @pytest.fixture
    def source(self, fs: Any, bucket: str, endpoint: str) -> FilesSource:
        buffer = io.BytesIO()
        pq.write_table(pa.table({"n": list(range(7))}), buffer, row_group_size=3)
        put(fs, f"{bucket}/data/p.parquet", buffer.getvalue())
        source = FilesPlugin.source(
            s3_config(endpoint, bucket, format="parquet"), LOOPBACK
        )
        assert isinstance(source, FilesSource)
        return source

    @pytest.fixture
    def read_options(self) -> dict[str, Any]:
        return {"path": "p.parquet"}

    @pytest.fixture
    def expected_refs(self) -> list[str]:
        return [f"p.parquet#{n}" for n in range(1, 8)]


class TestS3SinkContract(SinkContract):
    """The sink writes one object per (run, chunk) under the bucket prefix."""

    @pytest.fixture
    def sink(self, bucket: str, endpoint: str) -> FilesSink:
        sink = FilesPlugin.sink(s3_config(endpoint, bucket), LOOPBACK)
        assert isinstance(sink, FilesSink)
        return sink

    @pytest.fixture(params=["parquet", "csv"])
    def write_options(self, request: pytest.FixtureRequest) -> dict[str, Any]:
        return {"directory": "out", "format": request.param}

    @pytest.fixture
    def sample(self) -> pa.Table:
        return pa.table(
            {"id": pa.array([1, 2], pa.int64()), SOURCE_REF_COLUMN: ["s#1", "s#2"]}
        )

    @pytest.fixture
    def refs_of(
        self, fs: Any, bucket: str, sink: FilesSink, write_options: dict[str, Any]
    ) -> Callable[[int, int], list[str]]:
        def refs(run_id: int, chunk_seq: int) -> list[str]:
            name = sink.file_path(write_options, run_id=run_id, chunk_seq=chunk_seq)
            key = f"{bucket}/data/{name}"
            fs.invalidate_cache()
            if not fs.exists(key):
                return []
            data = fs.cat_file(key)
            if write_options["format"] == "parquet":
                table = pq.read_table(io.BytesIO(data))
            else:
                import pyarrow.csv as pacsv

                table = pacsv.read_csv(
                    io.BytesIO(data),
                    convert_options=pacsv.ConvertOptions(
                        column_types={SOURCE_REF_COLUMN: pa.string()}
                    ),
                )
            return sorted(table.column(SOURCE_REF_COLUMN).to_pylist())

        return refs

    @pytest.fixture
    def wait_until_blocked(self) -> Callable[[], None]:
        return lambda: time.sleep(0.3)

    def test_dataset_name_names_the_table(
        self, sink: Sink, write_options: dict[str, Any], bucket: str
    ) -> None:
        """Objects have no table: the dataset is the target prefix."""
        assert sink.dataset_name(write_options) == f"s3://{bucket}/data/out"


def test_no_temporary_object_is_left_behind(
    fs: Any, bucket: str, endpoint: str
) -> None:
    sink = FilesPlugin.sink(s3_config(endpoint, bucket, format="jsonl"), LOOPBACK)
    batch = pa.table({"id": [1], SOURCE_REF_COLUMN: ["s#1"]})
    sink.prepare({}, batch.schema)
    sink.write({}, batch, run_id=1, chunk_seq=0, fence=lambda: True)

    with pytest.raises(Exception, match="newer attempt"):
        sink.write({}, batch, run_id=1, chunk_seq=1, fence=lambda: False)

    fs.invalidate_cache()
    assert fs.find(bucket) == [f"{bucket}/data/run-1-chunk-000000.jsonl"]


def test_a_written_object_is_read_back_by_the_source(
    fs: Any, bucket: str, endpoint: str
) -> None:
    sink = FilesPlugin.sink(s3_config(endpoint, bucket, format="avro"), LOOPBACK)
    batch = pa.table({"id": [5, 6], SOURCE_REF_COLUMN: ["s#1", "s#2"]})
    sink.prepare({"directory": "x"}, batch.schema)
    sink.write({"directory": "x"}, batch, run_id=2, chunk_seq=3, fence=lambda: True)
    source = FilesPlugin.source(s3_config(endpoint, bucket, format="avro"), LOOPBACK)
    options = {"path": "x/*.avro"}

    rows = [
        r
        for c in source.plan(options, chunk_rows=1)
        for b in source.read(options, c)
        for r in b.to_pylist()
    ]

    assert [(r["id"], r[SOURCE_REF_COLUMN]) for r in rows] == [
        (5, "x/run-2-chunk-000003.avro#1"),
        (6, "x/run-2-chunk-000003.avro#2"),
    ]
    assert [s.name for s in source.discover()] == ["x/run-2-chunk-000003.avro"]


def test_check_reports_a_missing_bucket(endpoint: str) -> None:
    source = FilesPlugin.source(s3_config(endpoint, "no-such-bucket"), LOOPBACK)

    result = source.check()

    assert result.ok is False
    assert "no-such-bucket" in result.message
    assert SECRET not in result.message


def test_a_loopback_endpoint_is_refused_unless_allow_listed(
    endpoint: str, bucket: str
) -> None:
    source = FilesPlugin.source(s3_config(endpoint, bucket))

    with pytest.raises(ConfigError, match="non-public address"):
        list(source.plan({"path": "*.csv"}, chunk_rows=1))
    assert source.check().ok is False


def test_a_path_cannot_leave_the_prefix(endpoint: str, bucket: str) -> None:
    source = FilesPlugin.source(s3_config(endpoint, bucket), LOOPBACK)

    with pytest.raises(ConfigError, match="outside"):
        list(source.plan({"path": "../other/d.csv"}, chunk_rows=1))


def test_fingerprint_uses_the_etag(fs: Any, bucket: str, endpoint: str) -> None:
    put(fs, f"{bucket}/data/t.csv", b"x\n1\n")
    source = FilesPlugin.source(s3_config(endpoint, bucket), LOOPBACK)
    before = source.fingerprint({"path": "t.csv"})

    put(fs, f"{bucket}/data/t.csv", b"x\n2\n")

    assert before is not None
    assert before.startswith("size=4:etag=")
    assert (
        FilesPlugin.source(s3_config(endpoint, bucket), LOOPBACK).fingerprint(
            {"path": "t.csv"}
        )
        != before
    )


def test_an_unreachable_endpoint_is_transient() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    source = FilesPlugin.source(
        s3_config(f"http://127.0.0.1:{port}", "some-bucket"), LOOPBACK
    )

    assert source.check().ok is False
    with pytest.raises(TransientError, match="Could not connect"):
        list(source.plan({"path": "t.csv"}, chunk_rows=1))


@pytest.fixture
def rebinding_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Made-up names answering from a queue (the last answer repeats), like a
    DNS-rebinding attacker's server; `answers["<name>#lookups"]` counts lookups."""
    answers: dict[str, list[str]] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host in answers:
            queue = answers[host]
            address = queue.pop(0) if len(queue) > 1 else queue[0]
            answers.setdefault(f"{host}#lookups", []).append(address)
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            return [(family, socket.SOCK_STREAM, 6, "", (address, port or 0))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers


def _canary_storage(port: int, allowed: tuple[str, ...]) -> Any:
    from connectors.plugins.files.storage import S3Storage

    config = s3_config(f"http://s3.rebind.example:{port}", "bucket-x")
    return S3Storage(
        config, ConnectorContext(name="s3-rebind", allowed_networks=allowed)
    )


def test_an_endpoint_rebound_to_loopback_after_the_check_is_refused(
    rebinding_dns: dict[str, list[str]],
) -> None:
    from tests.connectors.plugins.rest.server import ApiServer

    canary = ApiServer().start()
    port = int(canary.url.rsplit(":", 1)[1])
    # The check sees a public address; the connection-time lookup gets loopback.
    rebinding_dns["s3.rebind.example"] = ["93.184.216.34", "127.0.0.1"]
    storage = _canary_storage(port, ())
    try:
        result = storage.check()
    finally:
        canary.stop()

    assert result.ok is False
    assert "Could not connect to the endpoint URL" in result.message
    # Looked up by the check (public) and again when connecting (loopback).
    assert rebinding_dns["s3.rebind.example#lookups"][:2] == [
        "93.184.216.34",
        "127.0.0.1",
    ]
    assert canary.requests == []


def test_the_connection_goes_to_the_checked_address_with_the_endpoint_name(
    rebinding_dns: dict[str, list[str]],
) -> None:
    from tests.connectors.plugins.rest.server import ApiServer

    canary = ApiServer().start()
    port = int(canary.url.rsplit(":", 1)[1])
    rebinding_dns["s3.rebind.example"] = ["127.0.0.1", "127.0.0.1"]
    storage = _canary_storage(port, ("127.0.0.1/32",))
    try:
        storage.check()  # the canary is no S3 server: the answer does not matter
    finally:
        canary.stop()

    assert canary.requests
    assert canary.requests[0].headers["host"] == f"s3.rebind.example:{port}"
