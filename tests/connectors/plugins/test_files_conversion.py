"""Format conversion: every files source format to every files sink format.

A table with a date, a timestamp in a zone, a decimal(10, 2), an integer, a string
with a comma, quotes and an accent, a struct, a list, and a row of nulls is
written natively in each source format (CSV, JSON Lines, JSON array, Parquet,
Avro, by their own libraries, not by our sink), read by the files source, typed
by the engine where the format has no types (a map step, as a pipeline would),
written by the files sink in each sink format, read back and typed again. Values
survive everywhere; types survive where both formats carry them (see the type
mapping table in docs/connectors.md).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.base import SOURCE_REF_COLUMN
from connectors.plugins.files import FilesPlugin
from transforms.engine import compile_steps

SOURCE_FORMATS = ["csv", "jsonl", "json", "parquet", "avro"]
SINK_FORMATS = ["csv", "jsonl", "parquet", "avro"]
TYPED_FORMATS = ("parquet", "avro")
ZONE = "Europe/Paris"

STRUCT = pa.struct([("x", pa.int64()), ("y", pa.string())])
INSTANT = dt.datetime(2024, 2, 29, 9, 30, 0, 123456, tzinfo=dt.UTC)
ROWS: list[dict[str, Any]] = [
    {
        "d": dt.date(2024, 2, 29),
        "ts": INSTANT,
        "dec": Decimal("12.34"),
        "n": -7,
        "s": 'a, "b" é',
        "st": {"x": 1, "y": "z"},
        "l": [1, 2, 3],
    },
    {"d": None, "ts": None, "dec": None, "n": None, "s": None, "st": None, "l": None},
]
ARROW = pa.schema(
    [
        ("d", pa.date32()),
        ("ts", pa.timestamp("us", tz=ZONE)),
        ("dec", pa.decimal128(10, 2)),
        ("n", pa.int64()),
        ("s", pa.string()),
        ("st", STRUCT),
        ("l", pa.list_(pa.int64())),
    ]
)
AVRO = {
    "type": "record",
    "name": "Row",
    "fields": [
        {"name": "d", "type": ["null", {"type": "int", "logicalType": "date"}]},
        {
            "name": "ts",
            "type": ["null", {"type": "long", "logicalType": "timestamp-micros"}],
        },
        {
            "name": "dec",
            "type": [
                "null",
                {
                    "type": "bytes",
                    "logicalType": "decimal",
                    "precision": 10,
                    "scale": 2,
                },
            ],
        },
        {"name": "n", "type": ["null", "long"]},
        {"name": "s", "type": ["null", "string"]},
        {
            "name": "st",
            "type": [
                "null",
                {
                    "type": "record",
                    "name": "St",
                    "fields": [
                        {"name": "x", "type": ["null", "long"]},
                        {"name": "y", "type": ["null", "string"]},
                    ],
                },
            ],
        },
        {"name": "l", "type": ["null", {"type": "array", "items": "long"}]},
    ],
}


def as_text(name: str, value: Any) -> Any:
    """A value as a text format writes it: ISO dates and zoned timestamps,
    decimals as strings (exact), nested values as JSON."""
    if value is None:
        return None
    if name == "ts":
        return value.astimezone(dt.timezone(dt.timedelta(hours=1))).isoformat()
    if name in ("d", "dec"):
        return str(value)
    return value


def write_source(root: Path, fmt: str) -> str:
    """The rows written natively in ``fmt``; returns the file name."""
    name = f"source.{fmt}"
    path = root / name
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(ARROW.names)
        for row in ROWS:
            writer.writerow(
                [
                    ""
                    if v is None
                    else json.dumps(v)
                    if k in ("st", "l")
                    else as_text(k, v)
                    for k, v in row.items()
                ]
            )
        path.write_text(out.getvalue(), encoding="utf-8")
    elif fmt in ("jsonl", "json"):
        records = [{k: as_text(k, v) for k, v in row.items()} for row in ROWS]
        if fmt == "jsonl":
            path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
        else:
            path.write_text(json.dumps(records, indent=1))
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(ROWS, schema=ARROW), path)
    else:
        with path.open("wb") as stream:
            fastavro.writer(stream, AVRO, ROWS)
    return name


# How a pipeline types a text format's records: a map step over the CSV columns
# (strings) or over the JSON `record` column.
def typing_steps(fmt: str) -> list[dict[str, Any]]:
    def expr(name: str, *, nested: bool = False) -> str:
        if fmt == "csv":
            return name
        return f"record->'$.{name}'" if nested else f"record->>'$.{name}'"

    return [
        {
            "type": "map",
            "fields": [
                {"name": "d", "expr": expr("d"), "type": "date"},
                {"name": "ts", "expr": expr("ts"), "type": "timestamptz"},
                {
                    "name": "dec",
                    "expr": expr("dec"),
                    "type": "decimal",
                    "precision": 10,
                    "scale": 2,
                },
                {"name": "n", "expr": expr("n"), "type": "integer"},
                {"name": "s", "expr": expr("s"), "type": "string"},
                {"name": "st", "expr": expr("st", nested=True), "type": "json"},
                {"name": "l", "expr": expr("l", nested=True), "type": "json"},
            ],
        }
    ]


def read(root: Path, fmt: str, path: str) -> pa.Table:
    """Read a file with the files source; type it as a pipeline would."""
    source = FilesPlugin.source(FilesPlugin.load_config({"root": str(root)}))
    options = {"path": path, "format": fmt}
    batches = [
        b for c in source.plan(options, chunk_rows=100) for b in source.read(options, c)
    ]
    table = pa.Table.from_batches(batches)
    assert table.column("_read_error").null_count == table.num_rows
    if fmt in TYPED_FORMATS:
        return table.select([*ARROW.names, SOURCE_REF_COLUMN])
    with compile_steps(typing_steps(fmt), timezone="America/New_York") as compiled:
        result = compiled.run(table.drop_columns(["_read_error", "_raw"]))
    assert result.rejected.num_rows == 0, result.rejected.to_pylist()
    return result.output


def expected_types(source: str, sink: str) -> dict[str, pa.DataType]:
    if source in TYPED_FORMATS and sink in TYPED_FORMATS:
        # Avro's timestamp-micros is an instant in UTC: the zone's name is lost.
        zone = ZONE if source == sink == "parquet" else "UTC"
        return {
            "d": pa.date32(),
            "ts": pa.timestamp("us", tz=zone),
            "dec": pa.decimal128(10, 2),
            "n": pa.int64(),
            "s": pa.string(),
            "st": STRUCT,
            "l": pa.list_(pa.int64()),
        }
    # A text format on the way: the types are the typing map's.
    return {
        "d": pa.date32(),
        "ts": pa.timestamp("us", tz="UTC"),
        "dec": pa.decimal128(10, 2),
        "n": pa.int64(),
        "s": pa.string(),
        "st": pa.string(),  # JSON text
        "l": pa.string(),
    }


def plain(name: str, value: Any) -> Any:
    """A read value as a comparable Python value (JSON text parsed)."""
    if name in ("st", "l") and isinstance(value, str):
        return json.loads(value)
    return value


@pytest.mark.parametrize("sink_format", SINK_FORMATS)
@pytest.mark.parametrize("source_format", SOURCE_FORMATS)
def test_any_source_format_to_any_sink_format_keeps_values_and_types(
    tmp_path: Path, source_format: str, sink_format: str
) -> None:
    source_root, sink_root = tmp_path / "in", tmp_path / "out"
    source_root.mkdir()
    name = write_source(source_root, source_format)
    batch = read(source_root, source_format, name)

    sink = FilesPlugin.sink(
        FilesPlugin.load_config({"root": str(sink_root), "format": sink_format})
    )
    sink.prepare({}, batch.schema)
    written = sink.write({}, batch, run_id=1, chunk_seq=0, fence=lambda: True)
    result = read(sink_root, sink_format, written.details["path"])

    types = expected_types(source_format, sink_format)
    for column, arrow_type in types.items():
        actual = result.schema.field(column).type
        if pa.types.is_list(arrow_type):  # Parquet and Avro name the item apart
            assert pa.types.is_list(actual), column
            assert actual.value_type == arrow_type.value_type, column
        else:
            assert actual == arrow_type, column
    rows = [
        {k: plain(k, v) for k, v in row.items() if k in ARROW.names}
        for row in result.to_pylist()
    ]
    assert rows == ROWS
    assert rows[0]["ts"] == INSTANT  # the same instant, whatever the zone shown
