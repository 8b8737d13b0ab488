"""`generator`: a source of synthetic rows, for demos and tests of the run machinery."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import marshmallow
import pyarrow as pa
import pyarrow.compute as pc
from marshmallow import fields, validate

from connectors.base import (
    SOURCE_REF_COLUMN,
    Capabilities,
    CheckResult,
    Chunk,
    Plugin,
    Source,
    StreamInfo,
)


class GeneratorConfig(marshmallow.Schema):
    """Config of the generator: how many rows it makes."""

    rows = fields.Integer(required=True, validate=validate.Range(min=0, max=10**9))


class GeneratorReadOptions(marshmallow.Schema):
    """The generator reads no options."""


SCHEMA = pa.schema([("id", pa.string()), ("label", pa.string())])


class GeneratorSource(Source):
    """Yields rows `id` = 1..rows and `label` = 'row-<id>', all as strings."""

    def check(self) -> CheckResult:
        return CheckResult(True, f"generates {self.config['rows']} rows")

    def discover(self) -> list[StreamInfo]:
        return [StreamInfo("rows", SCHEMA)]

    def plan(self, options: dict[str, Any], *, chunk_rows: int) -> Iterator[Chunk]:
        total = self.config["rows"]
        for seq, start in enumerate(range(0, total, chunk_rows)):
            yield Chunk(seq, {"start": start, "stop": min(start + chunk_rows, total)})

    def read(self, options: dict[str, Any], chunk: Chunk) -> Iterator[pa.RecordBatch]:
        ids = pc.cast(
            pa.array(range(chunk.spec["start"] + 1, chunk.spec["stop"] + 1)),
            pa.string(),
        )
        yield pa.RecordBatch.from_arrays(
            [
                ids,
                pc.binary_join_element_wise("row-", ids, ""),
                pc.binary_join_element_wise("gen#", ids, ""),
            ],
            names=[*SCHEMA.names, SOURCE_REF_COLUMN],
        )

    def fingerprint(self, options: dict[str, Any]) -> str | None:
        return f"rows={self.config['rows']}"


class GeneratorPlugin(Plugin):
    """Synthetic rows; proves the registry and drives tests without external systems."""

    kind = "generator"
    title = "Synthetic rows"
    config_schema = GeneratorConfig
    capabilities = Capabilities(source=True, discover=True, chunkable=True)
    source_class = GeneratorSource
    read_options_schema = GeneratorReadOptions
