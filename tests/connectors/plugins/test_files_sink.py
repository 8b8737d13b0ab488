"""The `files` sink: one file per (run, chunk), atomic, idempotent, fenced."""

from __future__ import annotations

import datetime as dt
import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastavro
import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from connectors.base import SOURCE_REF_COLUMN, Sink
from connectors.exceptions import ConfigError, FencedError
from connectors.plugins.files import FilesPlugin, FilesSink
from connectors.plugins.files.storage import LOCK_DIRECTORY
from tests.connectors.contract import SinkContract

FORMATS = [
    pytest.param({"format": "csv"}, id="csv"),
    pytest.param({"format": "csv", "compression": "gzip"}, id="csv-gzip"),
    pytest.param({"format": "jsonl"}, id="jsonl"),
    pytest.param({"format": "jsonl", "compression": "zstd"}, id="jsonl-zstd"),
    pytest.param({"format": "parquet"}, id="parquet"),
    pytest.param({"format": "avro"}, id="avro"),
]


def make_sink(root: Path, **config: Any) -> FilesSink:
    sink = FilesPlugin.sink(FilesPlugin.load_config({"root": str(root), **config}))
    assert isinstance(sink, FilesSink)
    return sink


def read_back(path: Path, options: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of a file the sink wrote, read with the format's own library."""
    data = path.read_bytes()
    compression = options.get("compression", "none")
    if compression != "none":
        data = pa.input_stream(pa.py_buffer(data), compression=compression).read()
    fmt = options["format"]
    if fmt == "csv":
        return pacsv.read_csv(
            io.BytesIO(data),
            convert_options=pacsv.ConvertOptions(
                column_types={SOURCE_REF_COLUMN: pa.string()}
            ),
        ).to_pylist()
    if fmt == "jsonl":
        return [orjson.loads(line) for line in data.splitlines() if line]
    if fmt == "parquet":
        return pq.read_table(io.BytesIO(data)).to_pylist()
    return list(fastavro.reader(io.BytesIO(data)))  # type: ignore[arg-type]


class TestFilesSinkContract(SinkContract):
    """The `files` sink passes the shared sink contract in every format."""

    @pytest.fixture
    def sink(self, tmp_path: Path) -> FilesSink:
        return make_sink(tmp_path)

    @pytest.fixture(params=FORMATS)
    def write_options(self, request: pytest.FixtureRequest) -> dict[str, Any]:
        return {"directory": "out", **request.param}

    @pytest.fixture
    def sample(self) -> pa.Table:
        return pa.table(
            {
                "id": pa.array([1, 2, 3], pa.int64()),
                "name": ["a", None, "c"],
                SOURCE_REF_COLUMN: ["in.csv#1", "in.csv#2", "in.csv#3"],
            }
        )

    @pytest.fixture
    def refs_of(
        self, tmp_path: Path, sink: FilesSink, write_options: dict[str, Any]
    ) -> Callable[[int, int], list[str]]:
        def refs(run_id: int, chunk_seq: int) -> list[str]:
            name = sink.file_path(write_options, run_id=run_id, chunk_seq=chunk_seq)
            path = tmp_path / name
            if not path.exists():
                return []
            rows = read_back(path, write_options)
            assert {(r["_run_id"], r["_chunk_seq"]) for r in rows} <= {
                (run_id, chunk_seq)
            }
            return sorted(r[SOURCE_REF_COLUMN] for r in rows)

        return refs

    @pytest.fixture
    def wait_until_blocked(self) -> Callable[[], None]:
        # A second writer blocks on the chunk's lock file: give it time to get there.
        return lambda: time.sleep(0.3)

    def test_dataset_name_names_the_table(
        self, sink: Sink, write_options: dict[str, Any], tmp_path: Path
    ) -> None:
        """Files have no table: the dataset is the target directory."""
        assert sink.dataset_name(write_options) == f"file://{tmp_path}/out"


def test_the_file_name_carries_prefix_run_chunk_and_extension(tmp_path: Path) -> None:
    sink = make_sink(tmp_path, format="parquet")
    options = {"directory": "a/b", "prefix": "orders-"}
    sink.prepare(options, pa.schema([("x", pa.int64())]))

    result = sink.write(
        options,
        pa.table({"x": [1], SOURCE_REF_COLUMN: ["r#1"]}),
        run_id=42,
        chunk_seq=7,
        fence=lambda: True,
    )

    assert result.details["path"] == "a/b/orders-run-42-chunk-000007.parquet"
    assert result.details["url"] == (
        f"file://{tmp_path}/a/b/orders-run-42-chunk-000007.parquet"
    )
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == [
        LOCK_DIRECTORY,
        "orders-run-42-chunk-000007.parquet",
    ]


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(lambda: False, id="fenced"),
        pytest.param(lambda: 1 / 0 == 0, id="fence-raises"),
    ],
)
def test_a_failed_commit_leaves_the_earlier_file_and_no_temporary_file(
    tmp_path: Path, failure: Callable[[], bool]
) -> None:
    sink = make_sink(tmp_path, format="csv")
    options = {"directory": "out"}
    first = pa.table({"x": ["old"], SOURCE_REF_COLUMN: ["r#1"]})
    sink.prepare(options, first.schema)
    sink.write(options, first, run_id=1, chunk_seq=0, fence=lambda: True)
    before = (tmp_path / "out" / "run-1-chunk-000000.csv").read_bytes()

    with pytest.raises((FencedError, ZeroDivisionError)):
        sink.write(
            options,
            pa.table({"x": ["new"], SOURCE_REF_COLUMN: ["r#1"]}),
            run_id=1,
            chunk_seq=0,
            fence=failure,
        )

    assert (tmp_path / "out" / "run-1-chunk-000000.csv").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        LOCK_DIRECTORY,
        "run-1-chunk-000000.csv",
    ]


def test_the_target_appears_only_after_the_fence(tmp_path: Path) -> None:
    sink = make_sink(tmp_path, format="jsonl")
    options = {"directory": "out"}
    target = tmp_path / "out" / "run-3-chunk-000001.jsonl"
    seen: dict[str, Any] = {}

    def fence() -> bool:
        seen["target"] = target.exists()
        seen["temporary"] = [
            p.name for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")
        ]
        return True

    sink.prepare(options, pa.schema([("x", pa.int64())]))
    sink.write(
        options,
        pa.table({"x": [1], SOURCE_REF_COLUMN: ["r#1"]}),
        run_id=3,
        chunk_seq=1,
        fence=fence,
    )

    assert seen["target"] is False
    assert len(seen["temporary"]) == 1
    assert seen["temporary"][0].startswith(".run-3-chunk-000001.jsonl.")
    assert target.exists()


TYPED = pa.table(
    {
        "i": pa.array([1, None], pa.int32()),
        "f": pa.array([1.5, None], pa.float64()),
        "b": pa.array([True, None]),
        "d": pa.array([dt.date(2024, 1, 2), None], pa.date32()),
        "t": pa.array(
            [dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC), None],
            pa.timestamp("us", tz="UTC"),
        ),
        "j": pa.array(['{"k": [1, 2]}', None], pa.string()),
        SOURCE_REF_COLUMN: ["r#1", "r#2"],
    }
).cast(
    pa.schema(
        [
            ("i", pa.int32()),
            ("f", pa.float64()),
            ("b", pa.bool_()),
            ("d", pa.date32()),
            ("t", pa.timestamp("us", tz="UTC")),
            pa.field("j", pa.string(), metadata={b"dis.type": b"json"}),
            (SOURCE_REF_COLUMN, pa.string()),
        ]
    )
)


@pytest.mark.parametrize("fmt", ["parquet", "avro"])
def test_typed_formats_round_trip_through_the_files_source(
    tmp_path: Path, fmt: str
) -> None:
    sink = make_sink(tmp_path, format=fmt)
    sink.prepare({}, TYPED.schema)
    path = sink.write({}, TYPED, run_id=9, chunk_seq=0, fence=lambda: True).details[
        "path"
    ]
    source = FilesPlugin.source(
        FilesPlugin.load_config({"root": str(tmp_path), "format": fmt})
    )
    options = {"path": path}

    batches = [
        b for c in source.plan(options, chunk_rows=10) for b in source.read(options, c)
    ]
    table = pa.Table.from_batches(batches)

    assert table.column_names == [
        "i",
        "f",
        "b",
        "d",
        "t",
        "j",
        "_upstream_run_id",
        "_upstream_chunk_seq",
        "_upstream_source_ref",
        SOURCE_REF_COLUMN,
        "_read_error",
        "_raw",
    ]
    assert table.schema.field("j").metadata == {b"dis.type": b"json"}
    assert table.schema.field("d").type == pa.date32()
    assert table.schema.field("t").type == pa.timestamp("us", tz="UTC")
    first = table.to_pylist()[0]
    assert (first["i"], first["f"], first["b"], first["j"]) == (
        1,
        1.5,
        True,
        '{"k": [1, 2]}',
    )
    assert first["d"] == dt.date(2024, 1, 2)
    assert first["t"] == dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert first["_upstream_source_ref"] == "r#1"
    assert first["_upstream_run_id"] == 9
    assert first[SOURCE_REF_COLUMN] == f"{path}#1"
    assert table.to_pylist()[1]["i"] is None


def test_jsonl_embeds_json_columns_as_json(tmp_path: Path) -> None:
    sink = make_sink(tmp_path, format="jsonl")
    sink.prepare({}, TYPED.schema)

    sink.write({}, TYPED, run_id=1, chunk_seq=0, fence=lambda: True)

    lines = (tmp_path / "run-1-chunk-000000.jsonl").read_bytes().splitlines()
    assert orjson.loads(lines[0]) == {
        "i": 1,
        "f": 1.5,
        "b": True,
        "d": "2024-01-02",
        "t": "2024-01-02T03:04:05+00:00",
        "j": {"k": [1, 2]},
        "_run_id": 1,
        "_chunk_seq": 0,
        "_source_ref": "r#1",
    }


@pytest.mark.parametrize(
    ("config", "options", "schema", "message"),
    [
        pytest.param(
            {"format": "json"}, {}, [("x", pa.int64())], "writes csv", id="json-format"
        ),
        pytest.param(
            {},
            {"format": "parquet", "compression": "gzip"},
            [("x", pa.int64())],
            "compresses internally",
            id="parquet-gzip",
        ),
        pytest.param(
            {}, {"directory": "../up"}, [("x", pa.int64())], "directory", id="escape"
        ),
        pytest.param(
            {}, {"prefix": "a/b"}, [("x", pa.int64())], "prefix", id="prefix-slash"
        ),
        pytest.param(
            {}, {}, [("_run_id", pa.int64())], "system column", id="system-column"
        ),
        pytest.param(
            {},
            {"write_mode": "upsert"},
            [("x", pa.int64())],
            "appends",
            id="upsert",
        ),
        pytest.param(
            {"format": "avro"},
            {},
            [("p q", pa.int64())],
            "not valid Avro names",
            id="avro-name",
        ),
    ],
)
def test_prepare_refuses_what_cannot_be_written(
    tmp_path: Path,
    config: dict[str, Any],
    options: dict[str, Any],
    schema: list[tuple[str, pa.DataType]],
    message: str,
) -> None:
    with pytest.raises(ConfigError, match=message):
        make_sink(tmp_path, **config).prepare(options, pa.schema(schema))


def test_a_directory_link_out_of_the_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "out").symlink_to(tmp_path)
    sink = make_sink(root)

    with pytest.raises(ConfigError, match="outside"):
        sink.write(
            {"directory": "out"},
            pa.table({"x": [1], SOURCE_REF_COLUMN: ["r#1"]}),
            run_id=1,
            chunk_seq=0,
            fence=lambda: True,
        )


def test_the_append_write_mode_is_accepted(tmp_path: Path) -> None:
    sink = make_sink(tmp_path)

    sink.prepare({"write_mode": "append"}, pa.schema([("x", pa.int64())]))

    FilesPlugin.validate_options("sink", {"write_mode": "append", "format": "avro"})


def test_check(tmp_path: Path) -> None:
    assert make_sink(tmp_path).check().ok is True
    assert make_sink(tmp_path / "missing").check().ok is False
