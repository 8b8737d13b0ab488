"""Fault-injecting connector kinds for tests, joined through DIS_CONNECTOR_PATHS.

`crashing`: the generator source, except that reading the chunk named in its config
kills the worker process (`os._exit(1)`) every time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import marshmallow
import pyarrow as pa
from marshmallow import fields

from connectors.base import Chunk
from connectors.plugins.generator import GeneratorPlugin, GeneratorSource


class CrashingConfig(marshmallow.Schema):
    rows = fields.Integer(required=True)
    crash_chunk = fields.Integer(required=True)


class CrashingSource(GeneratorSource):
    """Generator rows; the worker dies reading chunk `crash_chunk`."""

    def read(self, options: dict[str, Any], chunk: Chunk) -> Iterator[pa.RecordBatch]:
        if chunk.seq == self.config["crash_chunk"]:
            os._exit(1)
        yield from super().read(options, chunk)


class CrashingPlugin(GeneratorPlugin):
    """A source whose one chunk kills its worker."""

    kind = "crashing"
    config_schema = CrashingConfig
    source_class = CrashingSource
