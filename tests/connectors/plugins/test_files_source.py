"""The `files` source: planning CSV byte ranges and reading them as Arrow batches."""

from __future__ import annotations

import csv
import io
import os
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from connectors.base import SOURCE_REF_COLUMN
from connectors.exceptions import ConfigError, TerminalError
from connectors.plugins.files import (
    RAW_COLUMN,
    READ_ERROR_COLUMN,
    FilesPlugin,
    FilesSource,
)
from connectors.registry import get_plugin
from tests.connectors.contract import SourceContract

HEADER_AND_ROWS = b'id,name,note\n1,Ann,"two\nlines"\n2,Bob,\n3,"Cy ""C""",x\n4,Dee,y\n'


def make_source(root: Path, **config: Any) -> FilesSource:
    source = FilesPlugin.source(FilesPlugin.load_config({"root": str(root), **config}))
    assert isinstance(source, FilesSource)
    return source


def read_all(
    source: FilesSource, path: str, *, chunk_rows: int
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every data row (without the system columns) and every `_source_ref`."""
    options = {"path": path}
    rows: list[dict[str, Any]] = []
    refs: list[str] = []
    for chunk in source.plan(options, chunk_rows=chunk_rows):
        for batch in source.read(options, chunk):
            refs += batch.column(SOURCE_REF_COLUMN).to_pylist()
            data = batch.drop_columns(
                [SOURCE_REF_COLUMN, READ_ERROR_COLUMN, RAW_COLUMN]
            )
            rows += data.to_pylist()
    return rows, refs


class TestFilesSourceContract(SourceContract):
    """The `files` source passes the shared source contract."""

    @pytest.fixture
    def source(self, tmp_path: Path) -> FilesSource:
        (tmp_path / "people.csv").write_bytes(HEADER_AND_ROWS)
        return make_source(tmp_path)

    @pytest.fixture
    def read_options(self) -> dict[str, Any]:
        return {"path": "people.csv"}

    @pytest.fixture
    def expected_refs(self) -> list[str]:
        return [f"people.csv#{n}" for n in range(1, 5)]


def test_the_registry_finds_the_plugin() -> None:
    assert get_plugin("files") is FilesPlugin


PEOPLE = [
    {"id": "1", "name": "Ann", "note": "two\nlines"},
    {"id": "2", "name": "Bob", "note": None},
    {"id": "3", "name": 'Cy "C"', "note": "x"},
    {"id": "4", "name": "Dee", "note": "y"},
]

DIALECTS = [
    pytest.param(HEADER_AND_ROWS, PEOPLE, id="lf"),
    pytest.param(HEADER_AND_ROWS.replace(b"\n", b"\r\n"), None, id="crlf"),
    pytest.param(HEADER_AND_ROWS.rstrip(b"\n"), PEOPLE, id="no-trailing-newline"),
    pytest.param(
        HEADER_AND_ROWS.replace(b"2,Bob", b"\n\n2,Bob") + b"\n\n",
        PEOPLE,
        id="blank-lines",
    ),
    pytest.param(b"\xef\xbb\xbf" + HEADER_AND_ROWS, PEOPLE, id="utf8-bom"),
]


@pytest.mark.parametrize(("content", "expected"), DIALECTS)
@pytest.mark.parametrize("chunk_rows", [1, 3, 1000], ids=lambda n: f"chunk{n}")
def test_every_row_is_read_once_with_its_number_at_every_block_size(
    tmp_path: Path,
    content: bytes,
    expected: list[dict[str, Any]] | None,
    chunk_rows: int,
) -> None:
    if expected is None:  # CRLF: the quoted newline keeps its \r\n
        expected = [dict(row) for row in PEOPLE]
        expected[0]["note"] = "two\r\nlines"
    (tmp_path / "people.csv").write_bytes(content)
    source = make_source(tmp_path)

    for block_size in range(1, len(content) + 2):
        source.block_size = block_size
        rows, refs = read_all(source, "people.csv", chunk_rows=chunk_rows)

        assert rows == expected, block_size
        assert refs == [f"people.csv#{n}" for n in range(1, 5)], block_size


def test_plan_specs_are_exact(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_bytes(b"a,b\n1,2\n\n3,4\n5,6\n")
    source = make_source(tmp_path)

    specs = [c.spec for c in source.plan({"path": "t.csv"}, chunk_rows=2)]

    assert specs == [
        {
            "path": "t.csv",
            "format": "csv",
            "offset": 4,
            "length": 9,
            "first_row": 1,
            "rows": 2,
            "columns": ["a", "b"],
        },
        {
            "path": "t.csv",
            "format": "csv",
            "offset": 13,
            "length": 4,
            "first_row": 3,
            "rows": 1,
            "columns": ["a", "b"],
        },
    ]


@pytest.mark.parametrize("block_size", [4, 8, 12], ids=lambda n: f"block{n}")
def test_chunks_ending_exactly_on_a_block_edge(tmp_path: Path, block_size: int) -> None:
    # Header and rows are 4 bytes each: every row ends exactly on a block edge.
    (tmp_path / "t.csv").write_bytes(b"a,b\n1,2\n3,4\n5,6\n7,8\n")
    source = make_source(tmp_path)
    source.block_size = block_size

    chunks = list(source.plan({"path": "t.csv"}, chunk_rows=2))

    assert [(c.spec["offset"], c.spec["length"]) for c in chunks] == [(4, 8), (12, 8)]
    assert read_all(source, "t.csv", chunk_rows=2)[1] == [
        "t.csv#1",
        "t.csv#2",
        "t.csv#3",
        "t.csv#4",
    ]


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"a,b\n", id="header-only"),
        pytest.param(b"a,b", id="header-only-no-newline"),
        pytest.param(b"a,b\r\n\r\n\n", id="header-and-blank-lines"),
        pytest.param(b"\n\n", id="blank-lines-only"),
    ],
)
def test_files_without_data_rows_plan_no_chunk(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "t.csv").write_bytes(content)

    assert list(make_source(tmp_path).plan({"path": "t.csv"}, chunk_rows=10)) == []


def test_empty_fields_are_null_and_quoted_empty_fields_are_empty_strings(
    tmp_path: Path,
) -> None:
    (tmp_path / "t.csv").write_bytes(b'a,b,c\n1,,""\n,"",\n')

    rows, _ = read_all(make_source(tmp_path), "t.csv", chunk_rows=10)

    assert rows == [
        {"a": "1", "b": None, "c": ""},
        {"a": None, "b": "", "c": None},
    ]


def test_values_stay_strings(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_bytes(b"n,f,d\n007,1.50,2024-01-02\n")
    source = make_source(tmp_path)
    chunk = next(source.plan({"path": "t.csv"}, chunk_rows=10))

    batch = next(source.read({"path": "t.csv"}, chunk))

    assert batch.schema == pa.schema(
        [
            ("n", pa.string()),
            ("f", pa.string()),
            ("d", pa.string()),
            (SOURCE_REF_COLUMN, pa.string()),
            (READ_ERROR_COLUMN, pa.string()),
            (RAW_COLUMN, pa.string()),
        ]
    )
    assert batch.to_pylist()[0]["n"] == "007"


def test_ragged_rows_come_out_as_read_errors(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_bytes(
        b'a,b,c\n1,2,3\n4,5\n6,7,8\n9,"x,y",10,11\n12,13,14'
    )
    source = make_source(tmp_path)
    chunks = list(source.plan({"path": "t.csv"}, chunk_rows=10))

    batches = list(source.read({"path": "t.csv"}, chunks[0]))

    rows = pa.Table.from_batches(batches).to_pylist()
    ok = {READ_ERROR_COLUMN: None, RAW_COLUMN: None}
    assert rows == [
        {"a": "1", "b": "2", "c": "3", SOURCE_REF_COLUMN: "t.csv#1", **ok},
        {"a": "6", "b": "7", "c": "8", SOURCE_REF_COLUMN: "t.csv#3", **ok},
        {"a": "12", "b": "13", "c": "14", SOURCE_REF_COLUMN: "t.csv#5", **ok},
        {
            "a": None,
            "b": None,
            "c": None,
            SOURCE_REF_COLUMN: "t.csv#2",
            READ_ERROR_COLUMN: "expected 3 fields, got 2",
            RAW_COLUMN: "4,5",
        },
        {
            "a": None,
            "b": None,
            "c": None,
            SOURCE_REF_COLUMN: "t.csv#4",
            READ_ERROR_COLUMN: "expected 3 fields, got 4",
            RAW_COLUMN: '9,"x,y",10,11',
        },
    ]
    assert len({b.schema for b in batches}) == 1


def test_a_stray_quote_fails_loudly_instead_of_mislabelling_rows(
    tmp_path: Path,
) -> None:
    (tmp_path / "t.csv").write_bytes(b'a,b\nx"y,1\n2,3\n')
    source = make_source(tmp_path)
    chunk = next(source.plan({"path": "t.csv"}, chunk_rows=10))

    with pytest.raises(TerminalError, match="dialect"):
        list(source.read({"path": "t.csv"}, chunk))


def test_a_file_truncated_after_planning_is_refused(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_bytes(b"a\n1\n2\n")
    source = make_source(tmp_path)
    chunk = next(source.plan({"path": "t.csv"}, chunk_rows=10))
    (tmp_path / "t.csv").write_bytes(b"a\n1\n")

    with pytest.raises(TerminalError, match="shorter"):
        list(source.read({"path": "t.csv"}, chunk))


def test_other_delimiter_and_encoding(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_bytes("name;city\nJosé;Zürich\n".encode("latin-1"))
    source = make_source(tmp_path, delimiter=";", encoding="latin-1")

    assert read_all(source, "t.csv", chunk_rows=5)[0] == [
        {"name": "José", "city": "Zürich"}
    ]


def test_matches_python_csv_on_a_random_file(tmp_path: Path) -> None:
    rng = random.Random(20240601)
    alphabet = ["a", "b", ",", '"', "\n", "\r\n", " ", "é", ""]
    rows = [
        [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))
            for _ in range(4)
        ]
        for _ in range(400)
    ]
    buffer = io.StringIO()
    writer = csv.writer(buffer, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\r\n")
    writer.writerow(["c0", "c1", "c2", "c3"])
    writer.writerows(rows)
    (tmp_path / "r.csv").write_text(buffer.getvalue(), encoding="utf-8", newline="")
    source = make_source(tmp_path)

    for block_size, chunk_rows in [(7, 13), (64, 1), (4096, 100), (1 << 20, 400)]:
        source.block_size = block_size
        got, refs = read_all(source, "r.csv", chunk_rows=chunk_rows)

        assert [[r[f"c{i}"] for i in range(4)] for r in got] == rows
        assert refs == [f"r.csv#{n}" for n in range(1, 401)]


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("../outside.csv", id="dot-dot"),
        pytest.param("sub/../../outside.csv", id="dot-dot-inside"),
        pytest.param("/etc/passwd", id="absolute-outside"),
        pytest.param("link.csv", id="symlink-out"),
        pytest.param(".", id="the-root-itself"),
    ],
)
def test_paths_outside_the_root_are_refused(tmp_path: Path, path: str) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "outside.csv").write_bytes(b"a\n1\n")
    (root / "link.csv").symlink_to(tmp_path / "outside.csv")
    source = make_source(root)
    options = {"path": path}

    with pytest.raises(ConfigError, match="outside"):
        list(source.plan(options, chunk_rows=10))
    with pytest.raises(ConfigError, match="outside"):
        source.fingerprint(options)


def test_an_absolute_path_inside_the_root_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_bytes(b"a\n1\n")
    source = make_source(tmp_path)

    assert len(list(source.plan({"path": str(tmp_path / "t.csv")}, chunk_rows=1))) == 1


def test_a_missing_file_is_terminal(tmp_path: Path) -> None:
    with pytest.raises(TerminalError, match=r"nope\.csv"):
        list(make_source(tmp_path).plan({"path": "nope.csv"}, chunk_rows=1))


def test_fingerprint_changes_with_the_file(tmp_path: Path) -> None:
    target = tmp_path / "t.csv"
    target.write_bytes(b"a\n1\n")
    source = make_source(tmp_path)
    before = source.fingerprint({"path": "t.csv"})

    target.write_bytes(b"a\n2\n")
    os.utime(target, ns=(0, 0))

    assert source.fingerprint({"path": "t.csv"}) != before


def test_discover_lists_csv_files_with_string_columns(tmp_path: Path) -> None:
    (tmp_path / "b.csv").write_bytes(b"x,y\n1,2\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.CSV").write_bytes(b'"p q",r\n')
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "notes.txt").write_bytes(b"x\n")
    (tmp_path / ".hidden.csv").write_bytes(b"h\n")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.csv"
    outside.write_bytes(b"o\n")
    (tmp_path / "link-out.csv").symlink_to(outside)

    streams = make_source(tmp_path).discover()

    assert [(s.name, s.schema.names) for s in streams] == [
        ("b.csv", ["x", "y"]),
        ("sub/a.CSV", ["p q", "r"]),
    ]
    assert {f.type for s in streams for f in s.schema} == {pa.string()}


def test_duplicate_header_names_are_refused(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_bytes(b"a,b,a\n1,2,3\n")

    with pytest.raises(TerminalError, match="duplicate column names"):
        list(make_source(tmp_path).plan({"path": "t.csv"}, chunk_rows=1))


def test_check(tmp_path: Path) -> None:
    assert make_source(tmp_path).check().ok is True
    assert make_source(tmp_path / "missing").check().ok is False


@pytest.mark.parametrize(
    ("config", "field"),
    [
        pytest.param({"root": "relative/dir"}, "root", id="relative-root"),
        pytest.param({"root": "/data", "format": "xml"}, "format", id="format"),
        pytest.param({"root": "/data", "delimiter": '"'}, "delimiter", id="delim"),
        pytest.param({"root": "/data", "delimiter": ";;"}, "delimiter", id="delim2"),
        pytest.param({"root": "/data", "encoding": "utf-16"}, "encoding", id="utf16"),
        pytest.param({"root": "/data", "encoding": "klingon"}, "encoding", id="enc"),
    ],
)
def test_invalid_config_is_refused(config: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        FilesPlugin.load_config(config)

    assert list(caught.value.errors) == [field]


def test_read_options_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="path"):
        list(make_source(tmp_path).plan({"file": "t.csv"}, chunk_rows=1))
