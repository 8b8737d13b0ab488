"""The `files` source beyond plain CSV: JSON Lines, JSON arrays, Parquet, Avro,
compression, globs and CSV options."""

from __future__ import annotations

import datetime as dt
import gzip
import json
from pathlib import Path
from typing import Any

import fastavro
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.base import SOURCE_REF_COLUMN
from connectors.exceptions import ConfigError, TerminalError
from connectors.plugins.files import (
    RAW_COLUMN,
    READ_ERROR_COLUMN,
    RECORD_COLUMN,
    FilesPlugin,
    FilesSource,
)
from tests.connectors.contract import SourceContract

SYSTEM = [SOURCE_REF_COLUMN, READ_ERROR_COLUMN, RAW_COLUMN]
OK = {READ_ERROR_COLUMN: None, RAW_COLUMN: None}

AVRO_SCHEMA = {
    "type": "record",
    "name": "Person",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "name", "type": ["null", "string"]},
        {"name": "born", "type": {"type": "int", "logicalType": "date"}},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
    ],
}


def make_source(root: Path, **config: Any) -> FilesSource:
    source = FilesPlugin.source(FilesPlugin.load_config({"root": str(root), **config}))
    assert isinstance(source, FilesSource)
    return source


def read_table(
    source: FilesSource, options: dict[str, Any], *, chunk_rows: int
) -> pa.Table:
    chunks = list(source.plan(options, chunk_rows=chunk_rows))
    batches = [b for c in chunks for b in source.read(options, c)]
    return pa.Table.from_batches(batches)


def write_gzip(path: Path, data: bytes) -> None:
    with gzip.open(path, "wb") as stream:
        stream.write(data)


def write_zstd(path: Path, data: bytes) -> None:
    with pa.CompressedOutputStream(str(path), "zstd") as stream:
        stream.write(data)


def people_parquet(path: Path, *, rows: int = 10, row_group_size: int = 4) -> None:
    table = pa.table(
        {
            "id": pa.array(range(1, rows + 1), pa.int64()),
            "score": pa.array([i / 2 for i in range(rows)], pa.float64()),
            "name": [f"p{i}" for i in range(1, rows + 1)],
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)


def people_avro(path: Path, *, rows: int = 10, sync_interval: int = 40) -> None:
    records = [
        {"id": i, "name": None if i == 2 else f"p{i}", "born": 19000 + i, "tags": []}
        for i in range(1, rows + 1)
    ]
    records[0]["tags"] = ["a", "b"]
    with path.open("wb") as stream:
        fastavro.writer(
            stream, AVRO_SCHEMA, records, sync_interval=sync_interval, codec="deflate"
        )


# -- the shared contract, per format -------------------------------------------------

JSONL = b'{"id": 1}\n{"id": 2}\n\n{"id": 3}\n{"id": 4}\n'


class TestJsonLinesSourceContract(SourceContract):
    """JSON Lines files pass the shared source contract."""

    @pytest.fixture
    def source(self, tmp_path: Path) -> FilesSource:
        (tmp_path / "p.jsonl").write_bytes(JSONL)
        return make_source(tmp_path, format="jsonl")

    @pytest.fixture
    def read_options(self) -> dict[str, Any]:
        return {"path": "p.jsonl", "fields": {"id": "integer"}}

    @pytest.fixture
    def expected_refs(self) -> list[str]:
        return [f"p.jsonl#{n}" for n in range(1, 5)]


class TestJsonArraySourceContract(SourceContract):
    """JSON array files pass the shared source contract."""

    @pytest.fixture
    def source(self, tmp_path: Path) -> FilesSource:
        (tmp_path / "p.json").write_text(json.dumps([{"id": i} for i in range(5)]))
        return make_source(tmp_path, format="json")

    @pytest.fixture
    def read_options(self) -> dict[str, Any]:
        return {"path": "p.json"}

    @pytest.fixture
    def expected_refs(self) -> list[str]:
        return [f"p.json#{n}" for n in range(1, 6)]


class TestParquetSourceContract(SourceContract):
    """Parquet files pass the shared source contract."""

    @pytest.fixture
    def source(self, tmp_path: Path) -> FilesSource:
        people_parquet(tmp_path / "p.parquet")
        return make_source(tmp_path, format="parquet")

    @pytest.fixture
    def read_options(self) -> dict[str, Any]:
        return {"path": "p.parquet"}

    @pytest.fixture
    def expected_refs(self) -> list[str]:
        return [f"p.parquet#{n}" for n in range(1, 11)]


class TestAvroSourceContract(SourceContract):
    """Avro files pass the shared source contract."""

    @pytest.fixture
    def source(self, tmp_path: Path) -> FilesSource:
        people_avro(tmp_path / "p.avro")
        return make_source(tmp_path, format="avro")

    @pytest.fixture
    def read_options(self) -> dict[str, Any]:
        return {"path": "p.avro"}

    @pytest.fixture
    def expected_refs(self) -> list[str]:
        return [f"p.avro#{n}" for n in range(1, 11)]


class TestGlobOfCompressedCsvSourceContract(SourceContract):
    """A glob over gzip and zstd CSV files passes the shared source contract."""

    @pytest.fixture
    def source(self, tmp_path: Path) -> FilesSource:
        (tmp_path / "in").mkdir()
        write_gzip(tmp_path / "in" / "a.csv.gz", b"x\n1\n2\n3\n4\n")
        write_zstd(tmp_path / "in" / "b.csv.zst", b"x\n5\n6\n")
        (tmp_path / "in" / "c.txt").write_bytes(b"x\n7\n")
        return make_source(tmp_path)

    @pytest.fixture
    def read_options(self) -> dict[str, Any]:
        return {"path": "in/*.csv.*"}

    @pytest.fixture
    def expected_refs(self) -> list[str]:
        return [f"in/a.csv.gz#{n}" for n in range(1, 5)] + [
            f"in/b.csv.zst#{n}" for n in range(1, 3)
        ]


# -- JSON Lines -----------------------------------------------------------------------


def test_jsonl_records_keep_their_text_and_declared_fields_are_typed(
    tmp_path: Path,
) -> None:
    (tmp_path / "e.jsonl").write_bytes(
        b'{"id": 1, "ok": true, "when": "2024-01-02", "extra": [1]}\r\n'
        b"\n"
        b'{"id": "two"}\n'
        b"not json\n"
        b'{"id": 4, "when": "yesterday"}\n'
        b"[1, 2]\n"
        b'{"id": 6, "ok": null}'
    )
    source = make_source(tmp_path, format="jsonl")
    options = {
        "path": "e.jsonl",
        "fields": {"id": "integer", "ok": "boolean", "when": "date"},
    }

    table = read_table(source, options, chunk_rows=2)

    assert table.schema.field(RECORD_COLUMN).metadata == {b"dis.type": b"json"}
    assert table.schema.field("when").type == pa.date32()
    rows = table.to_pylist()
    assert [r[SOURCE_REF_COLUMN] for r in rows] == [f"e.jsonl#{n}" for n in range(1, 7)]
    assert rows[0] == {
        "id": 1,
        "ok": True,
        "when": dt.date(2024, 1, 2),
        RECORD_COLUMN: '{"id": 1, "ok": true, "when": "2024-01-02", "extra": [1]}',
        SOURCE_REF_COLUMN: "e.jsonl#1",
        **OK,
    }
    assert [(r[READ_ERROR_COLUMN] or "")[:18] for r in rows[1:]] == [
        "invalid JSON value",
        "invalid JSON: inva",
        "field 'when': 'yes",
        "expected a JSON ob",
        "",
    ]
    assert [r[RAW_COLUMN] for r in rows[1:]] == [
        '{"id": "two"}',
        "not json",
        '{"id": 4, "when": "yesterday"}',
        "[1, 2]",
        None,
    ]
    assert [r["id"] for r in rows] == [1, None, None, None, None, 6]
    assert [r[RECORD_COLUMN] for r in rows[1:5]] == [None] * 4


def test_jsonl_without_fields_accepts_any_json_value(tmp_path: Path) -> None:
    (tmp_path / "v.jsonl").write_bytes(b'1\n"a"\n[true]\n{"b": null}\n')
    source = make_source(tmp_path, format="jsonl")

    table = read_table(source, {"path": "v.jsonl"}, chunk_rows=10)

    assert table.column_names == [RECORD_COLUMN, *SYSTEM]
    assert table.column(RECORD_COLUMN).to_pylist() == [
        "1",
        '"a"',
        "[true]",
        '{"b": null}',
    ]
    assert table.column(READ_ERROR_COLUMN).null_count == 4


def test_jsonl_invalid_utf8_is_that_records_error(tmp_path: Path) -> None:
    (tmp_path / "u.jsonl").write_bytes(b'{"a": "\xff"}\n{"a": "ok"}\n')
    source = make_source(tmp_path, format="jsonl")

    rows = read_table(source, {"path": "u.jsonl"}, chunk_rows=10).to_pylist()

    assert rows[0][READ_ERROR_COLUMN].startswith("not valid UTF-8")
    assert rows[1][RECORD_COLUMN] == '{"a": "ok"}'


@pytest.mark.parametrize("block_size", [1, 2, 7, 64], ids=lambda n: f"block{n}")
def test_jsonl_with_bom_and_crlf_at_every_block_size(
    tmp_path: Path, block_size: int
) -> None:
    (tmp_path / "b.jsonl").write_bytes(
        b'\xef\xbb\xbf{"i": 1}\r\n{"i": 2}\r\n\r\n{"i": 3}'
    )
    source = make_source(tmp_path, format="jsonl")
    source.block_size = block_size

    table = read_table(
        source, {"path": "b.jsonl", "fields": {"i": "integer"}}, chunk_rows=2
    )

    assert table.column("i").to_pylist() == [1, 2, 3]
    assert table.column(READ_ERROR_COLUMN).null_count == 3


# -- JSON arrays ----------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [1, 5, 1 << 20], ids=lambda n: f"block{n}")
@pytest.mark.parametrize("chunk_rows", [1, 2, 100], ids=lambda n: f"chunk{n}")
def test_json_array_elements_are_records(
    tmp_path: Path, block_size: int, chunk_rows: int
) -> None:
    values = [{"s": 'a,]}"\\', "n": [1, {"x": "["}]}, {"s": "é"}, {"s": None}]
    (tmp_path / "a.json").write_text(json.dumps(values, indent=2), encoding="utf-8")
    source = make_source(tmp_path, format="json")
    source.block_size = block_size

    table = read_table(
        source, {"path": "a.json", "fields": {"s": "string"}}, chunk_rows=chunk_rows
    )

    assert table.column("s").to_pylist() == ['a,]}"\\', "é", None]
    assert [json.loads(t) for t in table.column(RECORD_COLUMN).to_pylist()] == values
    assert table.column(SOURCE_REF_COLUMN).to_pylist() == [
        "a.json#1",
        "a.json#2",
        "a.json#3",
    ]


def test_a_broken_json_array_element_is_that_records_error(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_bytes(b'[{"a": 1}, {"a": tru}, , {"a": 3}]')
    source = make_source(tmp_path, format="json")

    rows = read_table(source, {"path": "a.json"}, chunk_rows=10).to_pylist()

    assert [r[RECORD_COLUMN] for r in rows] == ['{"a": 1}', None, None, '{"a": 3}']
    assert [r[RAW_COLUMN] for r in rows] == [None, '{"a": tru}', "", None]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(b'{"a": 1}', "one JSON array", id="object"),
        pytest.param(b"[1, 2", "not closed", id="truncated"),
        pytest.param(b"[1] [2]", "one JSON array", id="two-arrays"),
        pytest.param(b"[1] x", "after the JSON array", id="trailing"),
    ],
)
def test_a_file_that_is_not_one_json_array_is_refused(
    tmp_path: Path, content: bytes, message: str
) -> None:
    (tmp_path / "a.json").write_bytes(content)

    with pytest.raises(TerminalError, match=message):
        list(
            make_source(tmp_path, format="json").plan({"path": "a.json"}, chunk_rows=5)
        )


@pytest.mark.parametrize(
    "content", [b"", b"[]", b" [ ] \n"], ids=["empty", "empty-array", "spaces"]
)
def test_an_empty_json_array_plans_no_chunk(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "a.json").write_bytes(content)

    source = make_source(tmp_path, format="json")

    assert list(source.plan({"path": "a.json"}, chunk_rows=5)) == []


# -- Parquet --------------------------------------------------------------------------


def test_parquet_chunks_are_row_group_slices_and_types_are_kept(
    tmp_path: Path,
) -> None:
    people_parquet(tmp_path / "p.parquet", rows=10, row_group_size=4)
    source = make_source(tmp_path, format="parquet")
    options = {"path": "p.parquet"}

    chunks = list(source.plan(options, chunk_rows=3))
    table = read_table(source, options, chunk_rows=3)

    assert [
        (c.spec["row_group"], c.spec["start"], c.spec["rows"], c.spec["first_row"])
        for c in chunks
    ] == [(0, 0, 3, 1), (0, 3, 1, 4), (1, 0, 3, 5), (1, 3, 1, 8), (2, 0, 2, 9)]
    assert table.schema.field("id").type == pa.int64()
    assert table.schema.field("score").type == pa.float64()
    assert table.column("id").to_pylist() == list(range(1, 11))
    assert table.column(SOURCE_REF_COLUMN).to_pylist()[3:5] == [
        "p.parquet#4",
        "p.parquet#5",
    ]


def test_a_broken_parquet_file_is_terminal(tmp_path: Path) -> None:
    (tmp_path / "p.parquet").write_bytes(b"not parquet at all")

    with pytest.raises(TerminalError, match="not a readable Parquet file"):
        list(
            make_source(tmp_path, format="parquet").plan(
                {"path": "p.parquet"}, chunk_rows=5
            )
        )


# -- Avro -----------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_rows", [1, 3, 4, 100], ids=lambda n: f"chunk{n}")
def test_avro_chunks_split_blocks_and_keep_types(
    tmp_path: Path, chunk_rows: int
) -> None:
    people_avro(tmp_path / "p.avro", rows=10, sync_interval=40)
    source = make_source(tmp_path, format="avro")

    table = read_table(source, {"path": "p.avro"}, chunk_rows=chunk_rows)

    assert table.schema.field("id").type == pa.int64()
    assert table.schema.field("born").type == pa.date32()
    assert table.schema.field("tags").type == pa.list_(pa.string())
    assert table.column("id").to_pylist() == list(range(1, 11))
    assert table.column("name").to_pylist()[:3] == ["p1", None, "p3"]
    assert table.column("tags").to_pylist()[:2] == [["a", "b"], []]
    assert table.column(SOURCE_REF_COLUMN).to_pylist() == [
        f"p.avro#{n}" for n in range(1, 11)
    ]


def test_avro_plans_several_blocks(tmp_path: Path) -> None:
    people_avro(tmp_path / "p.avro", rows=10, sync_interval=40)
    source = make_source(tmp_path, format="avro")

    specs = [c.spec for c in source.plan({"path": "p.avro"}, chunk_rows=4)]

    assert [(s["first_row"], s["rows"]) for s in specs] == [(1, 4), (5, 4), (9, 2)]
    assert len({s["offset"] for s in specs}) > 1  # several blocks, split
    assert all(s["header_length"] == specs[0]["header_length"] for s in specs)


# -- compression ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "write", "config"),
    [
        pytest.param("t.csv.gz", write_gzip, {}, id="gzip-by-extension"),
        pytest.param("t.csv.zst", write_zstd, {}, id="zstd-by-extension"),
        pytest.param("t.data", write_gzip, {"compression": "gzip"}, id="gzip-option"),
    ],
)
def test_compressed_csv_is_chunked_by_decompressed_offsets(
    tmp_path: Path, name: str, write: Any, config: dict[str, Any]
) -> None:
    write(tmp_path / name, b'a,b\n1,x\n2,"y\nz"\n3,w\n4,v\n5,u\n')
    source = make_source(tmp_path, **config)
    options = {"path": name}

    chunks = list(source.plan(options, chunk_rows=2))
    table = read_table(source, options, chunk_rows=2)

    assert [(c.spec["offset"], c.spec["rows"]) for c in chunks] == [
        (4, 2),
        (16, 2),
        (24, 1),
    ]
    assert {c.spec["compression"] for c in chunks} == {
        config.get("compression") or ("gzip" if name.endswith(".gz") else "zstd")
    }
    assert table.column("b").to_pylist() == ["x", "y\nz", "w", "v", "u"]
    assert table.column(SOURCE_REF_COLUMN).to_pylist()[-1] == f"{name}#5"


def test_compressed_json_lines_read_option(tmp_path: Path) -> None:
    write_gzip(tmp_path / "t.log", b'{"i": 1}\n{"i": 2}\n{"i": 3}\n')
    source = make_source(tmp_path)
    options = {"path": "t.log", "format": "jsonl", "compression": "gzip"}

    table = read_table(source, options, chunk_rows=2)

    assert table.column(RECORD_COLUMN).to_pylist() == [
        '{"i": 1}',
        '{"i": 2}',
        '{"i": 3}',
    ]


def test_a_corrupt_gzip_file_is_terminal(tmp_path: Path) -> None:
    (tmp_path / "t.csv.gz").write_bytes(b"\x1f\x8b\x08\x00garbage" * 3)

    with pytest.raises(TerminalError, match=r"t\.csv\.gz: cannot decompress \(gzip\)"):
        list(make_source(tmp_path).plan({"path": "t.csv.gz"}, chunk_rows=2))


# -- globs ----------------------------------------------------------------------------


def test_a_glob_plans_every_matched_file_in_order(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.csv").write_bytes(b"x\n1\n2\n3\n")
    (tmp_path / "d" / "a.csv").write_bytes(b"x\n4\n")
    (tmp_path / "d" / "sub" / "c.csv").write_bytes(b"x\n5\n")
    (tmp_path / "d" / ".hidden.csv").write_bytes(b"x\n6\n")
    (tmp_path / "d" / "e.txt").write_bytes(b"x\n7\n")
    source = make_source(tmp_path)

    flat = list(source.plan({"path": "d/*.csv"}, chunk_rows=2))
    deep = read_table(source, {"path": "d/**/*.csv"}, chunk_rows=2)

    assert [(c.seq, c.spec["path"], c.spec["first_row"]) for c in flat] == [
        (0, "d/a.csv", 1),
        (1, "d/b.csv", 1),
        (2, "d/b.csv", 3),
    ]
    assert deep.column(SOURCE_REF_COLUMN).to_pylist() == [
        "d/a.csv#1",
        "d/b.csv#1",
        "d/b.csv#2",
        "d/b.csv#3",
        "d/sub/c.csv#1",
    ]


def test_a_glob_without_matches_plans_nothing(tmp_path: Path) -> None:
    assert list(make_source(tmp_path).plan({"path": "none/*.csv"}, chunk_rows=2)) == []


def test_a_glob_cannot_leave_the_root(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="outside"):
        list(make_source(tmp_path).plan({"path": "../*.csv"}, chunk_rows=2))


def test_a_chunk_is_refused_for_a_glob_that_does_not_match_its_file(
    tmp_path: Path,
) -> None:
    (tmp_path / "a.csv").write_bytes(b"x\n1\n")
    source = make_source(tmp_path)
    chunk = next(source.plan({"path": "*.csv"}, chunk_rows=2))

    with pytest.raises(TerminalError, match=r"planned for 'a\.csv'"):
        list(source.read({"path": "*.tsv"}, chunk))


def test_the_glob_fingerprint_changes_when_a_file_appears(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_bytes(b"x\n1\n")
    source = make_source(tmp_path)
    before = source.fingerprint({"path": "*.csv"})

    (tmp_path / "b.csv").write_bytes(b"x\n2\n")

    assert before.startswith("files=1:")
    assert source.fingerprint({"path": "*.csv"}).startswith("files=2:")


# -- CSV options ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "names"),
    [
        pytest.param({}, ["column_1", "column_2"], id="generated-names"),
        pytest.param({"columns": ["a", "b"]}, ["a", "b"], id="given-names"),
    ],
)
def test_csv_without_a_header(
    tmp_path: Path, options: dict[str, Any], names: list[str]
) -> None:
    (tmp_path / "t.csv").write_bytes(b'\xef\xbb\xbf1,"x,y"\n2,z\n')
    source = make_source(tmp_path, header=False)

    table = read_table(source, {"path": "t.csv", **options}, chunk_rows=1)

    assert table.column_names == [*names, *SYSTEM]
    assert table.column(names[0]).to_pylist() == ["1", "2"]
    assert table.column(names[1]).to_pylist() == ["x,y", "z"]
    assert table.column(SOURCE_REF_COLUMN).to_pylist() == ["t.csv#1", "t.csv#2"]


def test_csv_without_quoting_keeps_quotes_as_text(tmp_path: Path) -> None:
    (tmp_path / "t.tsv").write_bytes(b'a\tb\n"x\t5 " inch\n')
    source = make_source(tmp_path, delimiter="\t", quote_char="")

    rows = read_table(source, {"path": "t.tsv"}, chunk_rows=5).to_pylist()

    assert rows == [{"a": '"x', "b": '5 " inch', SOURCE_REF_COLUMN: "t.tsv#1", **OK}]


def test_csv_with_another_quote_character(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_bytes(b"a,b\n'x,y',1\n'it''s',2\n")
    source = make_source(tmp_path, quote_char="'")

    table = read_table(source, {"path": "t.csv"}, chunk_rows=1)

    assert table.column("a").to_pylist() == ["x,y", "it's"]


# -- discovery and config ----------------------------------------------------------


def test_discover_lists_files_of_the_configured_format(tmp_path: Path) -> None:
    people_parquet(tmp_path / "b.parquet")
    people_parquet(tmp_path / "a.pq")
    (tmp_path / "c.csv").write_bytes(b"x\n1\n")

    streams = make_source(tmp_path, format="parquet").discover()

    assert [(s.name, s.schema.names) for s in streams] == [
        ("a.pq", ["id", "score", "name"]),
        ("b.parquet", ["id", "score", "name"]),
    ]


def test_discover_reads_avro_schemas_and_compressed_csv_headers(tmp_path: Path) -> None:
    people_avro(tmp_path / "p.avro")
    write_gzip(tmp_path / "c.csv.gz", b"u,v\n1,2\n")

    avro = make_source(tmp_path, format="avro").discover()
    csv = make_source(tmp_path).discover()

    assert [(s.name, s.schema.names) for s in avro] == [
        ("p.avro", ["id", "name", "born", "tags"])
    ]
    assert [(s.name, s.schema.names) for s in csv] == [("c.csv.gz", ["u", "v"])]


@pytest.mark.parametrize(
    ("options", "field"),
    [
        pytest.param({"path": "x", "format": "xml"}, "format", id="format"),
        pytest.param({"path": "x", "compression": "bz2"}, "compression", id="codec"),
        pytest.param({"path": "x", "fields": {"a": "uuid"}}, "fields", id="type"),
        pytest.param(
            {"path": "x", "fields": {"record": "string"}}, "fields", id="name"
        ),
    ],
)
def test_invalid_read_options_are_refused(
    tmp_path: Path, options: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        list(make_source(tmp_path).plan(options, chunk_rows=1))

    assert list(caught.value.errors) == [field]


@pytest.mark.parametrize(
    ("config", "field"),
    [
        pytest.param({"protocol": "s3"}, "bucket", id="s3-needs-bucket"),
        pytest.param(
            {"protocol": "s3", "bucket": "b", "root": "/abs"}, "root", id="s3-root"
        ),
        pytest.param(
            {"protocol": "s3", "bucket": "b", "aws_access_key_id": "k"},
            "aws_access_key_id",
            id="half-credentials",
        ),
        pytest.param(
            {"root": "/d", "endpoint_url": "ftp://x"}, "endpoint_url", id="endpoint"
        ),
        pytest.param({"root": "/d", "quote_char": ";;"}, "quote_char", id="quote"),
        pytest.param(
            {"root": "/d", "quote_char": ";", "delimiter": ";"},
            "quote_char",
            id="quote-is-delimiter",
        ),
    ],
)
def test_invalid_config_is_refused(config: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        FilesPlugin.load_config(config)

    assert list(caught.value.errors) == [field]


def test_the_secret_key_belongs_in_a_credential() -> None:
    config = {"protocol": "s3", "bucket": "b", "aws_secret_access_key": "x"}

    assert FilesPlugin.secret_fields() == ("aws_secret_access_key",)
    with pytest.raises(ConfigError, match="belong in a credential"):
        FilesPlugin.load_config(config)
