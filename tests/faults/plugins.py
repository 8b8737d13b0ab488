"""Fault-injecting connector kinds for tests, joined through DIS_CONNECTOR_PATHS.

`crashing`: the generator source, except that reading the chunk named in its config
kills the worker process (`os._exit(1)`) every time.

`slowpg`: the PostgreSQL sink, except that the first write of each chunk named in
`pause_chunks` pauses inside its transaction (rows deleted and COPYed, not yet
committed) for `pause_seconds`. While it pauses, the file `<marker_dir>/<run>-<chunk>`
holds the pid of the process writing, so a test can kill exactly that process in
the middle of a write.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import marshmallow
import pyarrow as pa
from marshmallow import fields

from connectors.base import Chunk, Fence, WriteResult
from connectors.plugins.generator import GeneratorPlugin, GeneratorSource
from connectors.plugins.sql.pgcommon import PostgresConfig
from connectors.plugins.sql.postgres import PostgresPlugin, PostgresSink


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


class SlowPostgresConfig(PostgresConfig):
    pause_chunks = fields.List(fields.Integer(), load_default=list)
    pause_seconds = fields.Float(load_default=0.0)
    marker_dir = fields.String(required=True)


class SlowPostgresSink(PostgresSink):
    """The PostgreSQL sink; the first write of a paused chunk waits before COMMIT."""

    def write(
        self,
        options: dict[str, Any],
        batch: pa.Table,
        *,
        run_id: int,
        chunk_seq: int,
        fence: Fence,
    ) -> WriteResult:
        def pausing_fence() -> bool:
            # Called inside the write transaction, after DELETE + COPY.
            if chunk_seq in self.config["pause_chunks"]:
                marker = Path(self.config["marker_dir"]) / f"{run_id}-{chunk_seq}"
                try:
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    pass  # an earlier attempt paused already
                else:
                    os.write(fd, str(os.getpid()).encode())
                    os.close(fd)
                    time.sleep(self.config["pause_seconds"])
            return fence()

        return super().write(
            options, batch, run_id=run_id, chunk_seq=chunk_seq, fence=pausing_fence
        )


class SlowPostgresPlugin(PostgresPlugin):
    """A PostgreSQL sink that holds chosen chunks' writes open for a while."""

    kind = "slowpg"
    config_schema = SlowPostgresConfig
    sink_class = SlowPostgresSink
