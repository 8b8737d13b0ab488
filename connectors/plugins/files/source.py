"""The `files` source: CSV, JSON Lines, JSON arrays, Parquet and Avro, in row chunks.

Text formats (CSV, JSON Lines, JSON arrays) are planned by one bounded-memory scan of
the file in 8 MiB blocks that finds record boundaries with numpy (see `csvscan` and
`jsonscan`); a chunk is the byte range of `chunk_rows` whole records. A compressed
text file (gzip, zstd) is scanned through a decompressing stream; its chunks are
ranges of the decompressed bytes, so reading chunk k decompresses (and discards)
everything before it: the total work grows with the square of the number of chunks
per file (see the docs). Parquet chunks are row groups or slices of them, Avro chunks
runs of blocks. Every batch carries `_source_ref` = `<path>#<record number>` (from 1)
and the `_read_error`/`_raw` columns of unreadable records. Pure Python (no Django).
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import io
from collections.abc import Iterator
from typing import Any

import fastavro
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from connectors.base import (
    SOURCE_REF_COLUMN,
    SYSTEM_COLUMNS,
    CheckResult,
    Chunk,
    ConnectorContext,
    Source,
    StreamInfo,
)
from connectors.exceptions import ConfigError, TerminalError
from connectors.plugins.files.csvscan import QUOTE, fields_per_record, iter_records
from connectors.plugins.files.jsonscan import (
    JsonShapeError,
    iter_elements,
    split_elements,
)
from connectors.plugins.files.records import (
    RAW_COLUMN,
    READ_ERROR_COLUMN,
    RECORD_COLUMN,
    avro_arrow_schema,
    avro_records_to_batch,
    decode_json,
    json_field,
    texts_from_ranges,
)
from connectors.plugins.files.storage import (
    BLOCK_SIZE,
    COMPRESSION_SUFFIXES,
    Storage,
    detect_compression,
    has_glob,
    io_errors,
    make_storage,
    matches,
    os_error,
)

MAX_HEADER_BYTES = 16 * 1024 * 1024
#: Rows decoded per Parquet batch; a chunk is read as one or more of these.
PARQUET_BATCH_ROWS = 64 * 1024
_UTF8_BOM = codecs.BOM_UTF8

#: File name endings each format is discovered by (compressed variants included
#: for the text formats).
EXTENSIONS = {
    "csv": (".csv",),
    "jsonl": (".jsonl", ".ndjson"),
    "json": (".json",),
    "parquet": (".parquet", ".pq"),
    "avro": (".avro",),
}
TEXT_FORMATS = ("csv", "jsonl", "json")
UPSTREAM_RENAMED = frozenset((*SYSTEM_COLUMNS, READ_ERROR_COLUMN, RAW_COLUMN))


def source_refs(path: str, numbers: np.ndarray) -> pa.Array:
    """`<path>#<n>` for each record number, computed by Arrow kernels."""
    as_text = pc.cast(pa.array(numbers, pa.int64()), pa.string())
    return pc.binary_join_element_wise(f"{path}#", as_text, "")


def upstream_name(name: str) -> str:
    """A file column named like a system column, renamed `_upstream<name>`.

    A file this service wrote carries `_run_id`, `_chunk_seq` and `_source_ref`;
    read again, they are data, kept under a name the next sink will not clash with.
    """
    return f"_upstream{name}" if name in UPSTREAM_RENAMED else name


def _rename_upstream(batch: pa.RecordBatch) -> pa.RecordBatch:
    names = batch.schema.names
    if not UPSTREAM_RENAMED.intersection(names):
        return batch
    return batch.rename_columns([upstream_name(n) for n in names])


def _error_columns(n: int) -> list[pa.Array]:
    return [pa.nulls(n, pa.string()), pa.nulls(n, pa.string())]


class FilesSource(Source):
    """Reads files under the connector's root (a directory or bucket prefix).

    CSV columns are strings; JSON records travel as a `record` JSON column plus the
    declared `fields`; Parquet and Avro keep their types.
    """

    #: Bytes read per scanning step in `plan()`; tests lower it to hit block edges.
    block_size: int = BLOCK_SIZE

    def __init__(
        self, config: dict[str, Any], context: ConnectorContext | None = None
    ) -> None:
        super().__init__(config, context)
        self.storage: Storage = make_storage(config, self.context)

    # -- settings ------------------------------------------------------------------

    def _options(self, options: dict[str, Any]) -> dict[str, Any]:
        from connectors.plugins.files import load_read_options

        loaded = load_read_options(options)
        loaded["format"] = loaded.get("format") or self.config.get("format", "csv")
        loaded["compression"] = loaded.get("compression") or self.config.get(
            "compression", "auto"
        )
        return loaded

    def _quote(self) -> int | None:
        char = self.config.get("quote_char", '"')
        return ord(char) if char else None

    def _delimiter(self) -> str:
        return str(self.config.get("delimiter", ","))

    def _files(self, path: str) -> list[str]:
        """The files a read covers: the path itself, or the glob's matches (sorted)."""
        if has_glob(path):
            return self.storage.glob(path)
        return [path]

    def resolve(self, path: str) -> str:
        """The real path of a local `path`, refusing anything outside the root.

        Raises:
            ConfigError: when the path escapes the root (or the storage is not local).
        """
        resolver = getattr(self.storage, "resolve", None)
        if resolver is None:
            raise ConfigError("resolve() is for local storage")
        return str(resolver(path))

    # -- contract ------------------------------------------------------------------

    def check(self) -> CheckResult:
        return self.storage.check()

    def discover(self) -> list[StreamInfo]:
        """One stream per file of the configured format under the root.

        Hidden entries, empty CSV files (no header) and links leading out of the
        root are left out; the stream name is the path to put in the read options.
        """
        fmt = self.config.get("format", "csv")
        endings = EXTENSIONS[fmt]
        if fmt in TEXT_FORMATS:
            endings = tuple(e + c for e in endings for c in ("", *COMPRESSION_SUFFIXES))
        streams: list[StreamInfo] = []
        try:
            for path in self.storage.walk():
                if not path.lower().endswith(endings):
                    continue
                try:
                    schema = self._schema_of(path, fmt)
                except ConfigError:  # a symbolic link that leads out of root
                    continue
                if schema is not None:
                    streams.append(StreamInfo(path, schema))
        except io_errors() as exc:
            raise os_error(".", exc) from exc
        return streams

    def _schema_of(self, path: str, fmt: str) -> pa.Schema | None:
        compression = detect_compression(path, self.config.get("compression", "auto"))
        if fmt == "csv":
            columns = self._header(path, compression)
            return (
                None
                if columns is None
                else pa.schema([(c, pa.string()) for c in columns])
            )
        if fmt in ("jsonl", "json"):
            return pa.schema([json_field(RECORD_COLUMN)])
        try:
            with self.storage.open(path) as stream:
                if fmt == "parquet":
                    schema = pq.read_schema(stream).remove_metadata()
                    return pa.schema(
                        [f.with_name(upstream_name(f.name)) for f in schema]
                    )
                reader = fastavro.reader(stream)
                return avro_arrow_schema(reader.writer_schema, upstream_name)[0]
        except io_errors() as exc:
            raise os_error(path, exc) from exc
        except (ValueError, pa.ArrowInvalid):
            return None

    def fingerprint(self, options: dict[str, Any]) -> str | None:
        """Size, version (mtime or ETag) and a hash of the head of each file."""
        path = self._options(options)["path"]
        if not has_glob(path):
            return self.storage.fingerprint(path)
        files = self._files(path)
        digest = hashlib.sha256()
        for name in files:
            digest.update(f"{name}\x00{self.storage.fingerprint(name)}\x00".encode())
        return f"files={len(files)}:sha256={digest.hexdigest()[:32]}"

    def plan(self, options: dict[str, Any], *, chunk_rows: int) -> Iterator[Chunk]:
        """Chunks of `chunk_rows` records per file, found in bounded memory.

        A glob plans every matched file in sorted order (no match: no chunk). Each
        chunk's spec names its file (`path`) and `format`, plus what the format needs
        (see the module doc). An empty or header-only file yields no chunk.

        Raises:
            ConfigError: bad options or a path outside the root.
            TerminalError: missing/unreadable file, header too long, duplicate
                columns, a JSON file that is not one array, a broken Parquet or
                Avro file.
        """
        if chunk_rows < 1:
            raise ConfigError("chunk_rows must be at least 1")
        settings = self._options(options)
        seq = 0
        for path in self._files(settings["path"]):
            for spec in self._plan_file(path, settings, chunk_rows):
                yield Chunk(seq, spec)
                seq += 1

    def _plan_file(
        self, path: str, settings: dict[str, Any], chunk_rows: int
    ) -> Iterator[dict[str, Any]]:
        fmt = settings["format"]
        compression = detect_compression(path, settings["compression"])
        try:
            if fmt == "parquet":
                yield from self._plan_parquet(path, chunk_rows)
            elif fmt == "avro":
                yield from self._plan_avro(path, chunk_rows)
            else:
                yield from self._plan_text(path, fmt, compression, settings, chunk_rows)
        except io_errors() as exc:
            raise os_error(path, exc) from exc
        except JsonShapeError as exc:
            raise TerminalError(f"{path}: {exc}") from exc
        except pa.ArrowInvalid as exc:
            raise TerminalError(f"{path}: cannot be read: {exc}") from exc

    # -- text formats ----------------------------------------------------------------

    def _scan(self, stream: Any, fmt: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if fmt == "json":
            return iter_elements(stream, block_size=self.block_size)
        quote = None if fmt == "jsonl" else self._quote()
        return iter_records(stream, block_size=self.block_size, quote=quote)

    def _plan_text(
        self,
        path: str,
        fmt: str,
        compression: str,
        settings: dict[str, Any],
        chunk_rows: int,
    ) -> Iterator[dict[str, Any]]:
        base: dict[str, Any] = {"path": path, "format": fmt}
        if compression != "none":
            base["compression"] = compression
        header = fmt == "csv" and self.config.get("header", True)
        columns: list[str] | None = None if fmt == "csv" else []
        next_row = 1
        rows = 0  # records in the chunk being built
        offset = stop = 0
        first_row = 1

        def spec() -> dict[str, Any]:
            out = {
                **base,
                "offset": offset,
                "length": stop - offset,
                "first_row": first_row,
                "rows": rows,
            }
            if fmt == "csv":
                out["columns"] = list(columns or [])
            return out

        with self.storage.open(path, compression) as stream:
            for starts, stops in self._scan(stream, fmt):
                i, n = 0, len(starts)
                if columns is None:
                    if not n:
                        self._check_header_size(path, stream)
                        continue
                    raw = self.storage.read_range(
                        path, int(starts[0]), int(stops[0] - starts[0]), compression
                    )
                    if header:
                        columns = self._parse_header(path, raw, offset=int(starts[0]))
                        i = 1
                    else:
                        columns = self._default_columns(raw, settings)
                while i < n:
                    if rows == 0:
                        offset, first_row = int(starts[i]), next_row
                    take = min(chunk_rows - rows, n - i)
                    i += take
                    rows += take
                    next_row += take
                    stop = int(stops[i - 1])
                    if rows == chunk_rows:
                        yield spec()
                        rows = 0
        if rows and columns is not None:
            yield spec()

    def _default_columns(self, raw: bytes, settings: dict[str, Any]) -> list[str]:
        """Column names of a CSV file without a header: given, or `column_<n>`."""
        if settings.get("columns"):
            return [upstream_name(c) for c in settings["columns"]]
        if raw.startswith(_UTF8_BOM):
            raw = raw[len(_UTF8_BOM) :]
        stops = np.array([len(raw)], dtype=np.int64)
        count = int(
            fields_per_record(
                raw, stops, delimiter=ord(self._delimiter()), quote=self._quote()
            )[0]
        )
        return [f"column_{n}" for n in range(1, count + 1)]

    def read(self, options: dict[str, Any], chunk: Chunk) -> Iterator[pa.RecordBatch]:
        """Read the chunk's records; yields data rows, then unreadable rows.

        CSV: the header's columns (strings; empty unquoted field = NULL, quoted `""`
        = empty string); a row with the wrong number of fields comes out with NULL
        data, `_read_error` = "expected N fields, got M" and `_raw` = its text.
        JSON Lines / JSON: declared `fields`, `record`; an unparsable record or a
        field of the wrong type is an error row. Parquet / Avro: the file's columns.
        Then `_source_ref`, `_read_error`, `_raw`.

        Raises:
            TerminalError: the file changed since planning, or the chunk does not parse
                into the planned number of rows (an unsupported CSV dialect).
        """
        settings = self._options(options)
        spec = chunk.spec
        path = str(spec.get("path"))
        wanted = settings["path"]
        if path != wanted and not (has_glob(wanted) and matches(wanted, path)):
            raise TerminalError(
                f"chunk {chunk.seq} was planned for {path!r}, not {wanted!r}"
            )
        fmt = spec.get("format", "csv")
        if fmt != settings["format"]:
            raise TerminalError(
                f"chunk {chunk.seq} was planned as {fmt}, not {settings['format']}"
            )
        try:
            if fmt == "parquet":
                yield from self._read_parquet(path, spec)
            elif fmt == "avro":
                yield from self._read_avro(path, spec)
            elif fmt == "csv":
                yield from self._read_csv(path, spec)
            else:
                yield from self._read_json(path, spec, settings)
        except io_errors() as exc:
            raise os_error(path, exc) from exc

    def _range(self, path: str, spec: dict[str, Any]) -> bytes:
        data = self.storage.read_range(
            path,
            int(spec["offset"]),
            int(spec["length"]),
            spec.get("compression", "none"),
        )
        if int(spec["offset"]) == 0 and data.startswith(_UTF8_BOM):
            data = data[len(_UTF8_BOM) :]
        return data

    def _read_json(
        self, path: str, spec: dict[str, Any], settings: dict[str, Any]
    ) -> Iterator[pa.RecordBatch]:
        data = self._range(path, spec)
        first_row, rows = int(spec["first_row"]), int(spec["rows"])
        if spec["format"] == "json":
            try:
                starts, stops = split_elements(data)
            except JsonShapeError as exc:
                raise TerminalError(f"{path}: {exc}") from exc
            trim = b" \t\r\n,"
        else:
            parts = list(
                iter_records(io.BytesIO(data), block_size=len(data) or 1, quote=None)
            )
            starts = np.concatenate([p[0] for p in parts])
            stops = np.concatenate([p[1] for p in parts])
            trim = b" \t\r\n"
        if len(starts) != rows:
            raise self._mismatch(path, first_row, rows, len(starts))
        texts = texts_from_ranges(data, starts, stops, trim=trim)
        refs = source_refs(path, np.arange(first_row, first_row + rows, dtype=np.int64))
        batch = decode_json(texts, fields=settings.get("fields") or {}, refs=refs)
        yield from pa.Table.from_batches([batch]).to_batches(
            max_chunksize=PARQUET_BATCH_ROWS
        )

    def _read_csv(self, path: str, spec: dict[str, Any]) -> Iterator[pa.RecordBatch]:
        data = self._range(path, spec)
        columns: list[str] = list(spec["columns"])
        first_row, rows = int(spec["first_row"]), int(spec["rows"])
        invalid: list[int] = []  # field counts of skipped rows (any order: threads)

        def on_invalid_row(row: Any) -> str:
            invalid.append(row.actual_columns)
            return "skip"

        quote = self._quote()
        try:
            table = pacsv.read_csv(
                pa.py_buffer(data),
                read_options=pacsv.ReadOptions(
                    column_names=columns,
                    autogenerate_column_names=False,
                    skip_rows=0,
                    encoding=self._arrow_encoding(),
                ),
                parse_options=pacsv.ParseOptions(
                    delimiter=self._delimiter(),
                    quote_char=chr(quote) if quote is not None else False,
                    double_quote=True,
                    newlines_in_values=quote is not None,
                    ignore_empty_lines=True,
                    invalid_row_handler=on_invalid_row,
                ),
                convert_options=pacsv.ConvertOptions(
                    column_types=dict.fromkeys(columns, pa.string()),
                    strings_can_be_null=True,
                    quoted_strings_can_be_null=False,
                    null_values=[""],
                ),
            )
        except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
            raise TerminalError(
                f"{path}: rows {first_row}-{first_row + rows - 1} cannot be parsed: "
                f"{exc}"
            ) from exc
        if table.num_rows + len(invalid) != rows:
            raise self._mismatch(path, first_row, rows, table.num_rows + len(invalid))
        numbers = np.arange(first_row, first_row + rows, dtype=np.int64)
        bad_rows = None
        if invalid:
            bad_rows = self._locate_invalid(data, columns, sorted(invalid))
            if bad_rows is None:
                raise self._mismatch(path, first_row, rows, -1)
            good = np.ones(rows, dtype=bool)
            good[bad_rows[0]] = False
            numbers = numbers[good]
        table = table.append_column(SOURCE_REF_COLUMN, source_refs(path, numbers))
        table = table.append_column(
            READ_ERROR_COLUMN, pa.nulls(len(table), pa.string())
        )
        table = table.append_column(RAW_COLUMN, pa.nulls(len(table), pa.string()))
        yield from table.to_batches()
        if bad_rows is not None:
            yield self._error_batch(path, data, columns, first_row, *bad_rows)

    # -- Parquet ---------------------------------------------------------------------

    def _plan_parquet(self, path: str, chunk_rows: int) -> Iterator[dict[str, Any]]:
        with self._parquet(path) as parquet:
            metadata = parquet.metadata
            row = 1
            for group in range(metadata.num_row_groups):
                size = metadata.row_group(group).num_rows
                for start in range(0, size, chunk_rows):
                    yield {
                        "path": path,
                        "format": "parquet",
                        "row_group": group,
                        "start": start,
                        "rows": min(chunk_rows, size - start),
                        "first_row": row + start,
                    }
                row += size

    @contextlib.contextmanager
    def _parquet(self, path: str) -> Iterator[pq.ParquetFile]:
        """The Parquet file (its footer read); closes what it opened."""
        source = self.storage.arrow_source(path)
        try:
            try:
                parquet = pq.ParquetFile(source)
            except pa.ArrowInvalid as exc:
                raise TerminalError(
                    f"{path}: not a readable Parquet file: {exc}"
                ) from exc
            with parquet:
                yield parquet
        finally:
            if hasattr(source, "close"):
                source.close()

    def _read_parquet(
        self, path: str, spec: dict[str, Any]
    ) -> Iterator[pa.RecordBatch]:
        skip, remaining = int(spec["start"]), int(spec["rows"])
        number = int(spec["first_row"])
        with self._parquet(path) as parquet:
            group = int(spec["row_group"])
            if group >= parquet.metadata.num_row_groups:
                raise TerminalError(f"{path}: the file changed since it was planned")
            # Rows before the slice's start are decoded and dropped: a Parquet row
            # group has no row-level seek (chunk_rows >= the row group size avoids it).
            for batch in parquet.iter_batches(
                batch_size=PARQUET_BATCH_ROWS, row_groups=[group], use_threads=False
            ):
                if skip >= batch.num_rows:
                    skip -= batch.num_rows
                    continue
                part = _rename_upstream(batch.slice(skip, remaining))
                skip = 0
                remaining -= part.num_rows
                n = part.num_rows
                refs = source_refs(path, np.arange(number, number + n, dtype=np.int64))
                number += n
                yield pa.RecordBatch.from_arrays(
                    [*part.columns, refs, *_error_columns(n)],
                    schema=part.schema.append(pa.field(SOURCE_REF_COLUMN, pa.string()))
                    .append(pa.field(READ_ERROR_COLUMN, pa.string()))
                    .append(pa.field(RAW_COLUMN, pa.string())),
                )
                if not remaining:
                    break
        if remaining:
            raise TerminalError(f"{path}: the file changed since it was planned")

    # -- Avro ------------------------------------------------------------------------

    def _plan_avro(self, path: str, chunk_rows: int) -> Iterator[dict[str, Any]]:
        blocks: list[tuple[int, int, int]] = []  # (offset, end, records) of a chunk
        header_length = None
        next_row = 1
        rows = skip = 0
        with self.storage.open(path) as stream:
            try:
                for block in fastavro.block_reader(stream):
                    if header_length is None:
                        header_length = int(block.offset)
                    start, end = int(block.offset), int(block.offset + block.size)
                    taken = 0
                    while taken < block.num_records:
                        if rows == 0:
                            blocks = []
                            skip = taken
                            first_row = next_row
                        if not blocks or blocks[-1][0] != start:
                            blocks.append((start, end, block.num_records))
                        take = min(chunk_rows - rows, block.num_records - taken)
                        taken += take
                        rows += take
                        next_row += take
                        if rows == chunk_rows:
                            yield self._avro_spec(
                                path, header_length, blocks, skip, rows, first_row
                            )
                            rows = 0
            except (ValueError, EOFError, StopIteration) as exc:
                raise TerminalError(f"{path}: not a readable Avro file: {exc}") from exc
        if rows and header_length is not None:
            yield self._avro_spec(path, header_length, blocks, skip, rows, first_row)

    @staticmethod
    def _avro_spec(
        path: str,
        header_length: int,
        blocks: list[tuple[int, int, int]],
        skip: int,
        rows: int,
        first_row: int,
    ) -> dict[str, Any]:
        return {
            "path": path,
            "format": "avro",
            "header_length": header_length,
            "offset": blocks[0][0],
            "length": blocks[-1][1] - blocks[0][0],
            "skip": skip,
            "rows": rows,
            "first_row": first_row,
        }

    def _read_avro(self, path: str, spec: dict[str, Any]) -> Iterator[pa.RecordBatch]:
        header = self.storage.read_range(path, 0, int(spec["header_length"]))
        body = self.storage.read_range(path, int(spec["offset"]), int(spec["length"]))
        skip, rows = int(spec["skip"]), int(spec["rows"])
        number = int(spec["first_row"])
        try:
            reader = fastavro.reader(io.BytesIO(header + body))
            schema, as_json, names = avro_arrow_schema(
                reader.writer_schema, upstream_name
            )
            records: list[dict[str, Any]] = []
            for index, record in enumerate(reader):
                if index < skip:
                    continue
                records.append(record)
                if len(records) == rows or len(records) == PARQUET_BATCH_ROWS:
                    n = len(records)
                    refs = source_refs(
                        path, np.arange(number, number + n, dtype=np.int64)
                    )
                    yield avro_records_to_batch(records, schema, as_json, names, refs)
                    number += n
                    rows -= n
                    records = []
                    if not rows:
                        return
        except (ValueError, EOFError) as exc:
            raise TerminalError(f"{path}: not a readable Avro file: {exc}") from exc
        raise TerminalError(f"{path}: the file changed since it was planned")

    # -- CSV helpers -----------------------------------------------------------------

    def _arrow_encoding(self) -> str:
        name = codecs.lookup(self.config.get("encoding", "utf-8")).name
        return "utf8" if name in ("utf-8", "utf-8-sig") else name

    @staticmethod
    def _check_header_size(path: str, stream: Any) -> None:
        position = stream.tell() if hasattr(stream, "tell") else 0
        if position > MAX_HEADER_BYTES:
            raise TerminalError(
                f"{path}: no end of the header row in the first {MAX_HEADER_BYTES} "
                "bytes (an unclosed quote?)"
            )

    def _parse_header(self, path: str, raw: bytes, *, offset: int) -> list[str]:
        if offset == 0 and raw.startswith(_UTF8_BOM):
            raw = raw[len(_UTF8_BOM) :]
        if not raw.endswith(b"\n"):  # pyarrow wants the header row terminated
            raw += b"\n"
        quote = self._quote()
        try:
            table = pacsv.read_csv(
                pa.py_buffer(raw),
                read_options=pacsv.ReadOptions(encoding=self._arrow_encoding()),
                parse_options=pacsv.ParseOptions(
                    delimiter=self._delimiter(),
                    quote_char=chr(quote) if quote is not None else False,
                    newlines_in_values=quote is not None,
                ),
            )
        except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
            raise TerminalError(
                f"{path}: the header row cannot be parsed: {exc}"
            ) from exc
        columns = [upstream_name(c) for c in table.column_names]
        duplicates = sorted({c for c in columns if columns.count(c) > 1})
        if duplicates:
            raise TerminalError(
                f"{path}: duplicate column names in the header: {', '.join(duplicates)}"
            )
        return columns

    def _header(self, path: str, compression: str = "none") -> list[str] | None:
        """The header's column names, or None for an empty file."""
        try:
            with self.storage.open(path, compression) as stream:
                for starts, stops in iter_records(
                    stream, block_size=self.block_size, quote=self._quote()
                ):
                    if len(starts):
                        raw = self.storage.read_range(
                            path, int(starts[0]), int(stops[0] - starts[0]), compression
                        )
                        return self._parse_header(path, raw, offset=int(starts[0]))
                    self._check_header_size(path, stream)
        except io_errors() as exc:
            raise os_error(path, exc) from exc
        return None

    def _locate_invalid(
        self, data: bytes, columns: list[str], invalid: list[int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """Find the skipped rows: pyarrow's row numbers are None when it uses threads.

        Returns:
            (indexes within the chunk, field counts, starts, stops) of the ragged rows,
            or None when our count disagrees with pyarrow's.
        """
        quote = self._quote()
        starts_parts, stops_parts = [], []
        for starts, stops in iter_records(
            io.BytesIO(data), block_size=len(data), quote=quote
        ):
            starts_parts.append(starts)
            stops_parts.append(stops)
        starts = np.concatenate(starts_parts)
        stops = np.concatenate(stops_parts)
        counts = fields_per_record(
            data, stops, delimiter=ord(self._delimiter()), quote=quote
        )
        bad = np.flatnonzero(counts != len(columns))
        if sorted(counts[bad].tolist()) != invalid:
            return None
        return bad, counts[bad], starts[bad], stops[bad]

    def _error_batch(
        self,
        path: str,
        data: bytes,
        columns: list[str],
        first_row: int,
        indexes: np.ndarray,
        counts: np.ndarray,
        starts: np.ndarray,
        stops: np.ndarray,
    ) -> pa.RecordBatch:
        n = len(indexes)
        encoding = self.config.get("encoding", "utf-8")
        # Only the (few) ragged rows are touched one by one.
        raw = [
            data[start:stop].rstrip(b"\r\n").decode(encoding, errors="replace")
            for start, stop in zip(starts.tolist(), stops.tolist(), strict=True)
        ]
        errors = [f"expected {len(columns)} fields, got {count}" for count in counts]
        arrays = [pa.nulls(n, pa.string()) for _ in columns]
        arrays += [
            source_refs(path, indexes.astype(np.int64) + first_row),
            pa.array(errors, pa.string()),
            pa.array(raw, pa.string()),
        ]
        names = [*columns, SOURCE_REF_COLUMN, READ_ERROR_COLUMN, RAW_COLUMN]
        return pa.RecordBatch.from_arrays(arrays, names=names)

    @staticmethod
    def _mismatch(path: str, first_row: int, rows: int, parsed: int) -> TerminalError:
        found = f"{parsed} rows" if parsed >= 0 else "other ragged rows"
        return TerminalError(
            f"{path}: rows {first_row}-{first_row + rows - 1} were planned as {rows} "
            f"rows but parse as {found}; the file uses a CSV dialect this connector "
            "does not support (a quote inside an unquoted field, or lone CR line "
            "endings)"
        )

    def close(self) -> None:
        """Nothing pooled: files are opened per call."""


__all__ = ["QUOTE", "FilesSource", "source_refs"]
