"""`files`: CSV files under a local root directory, read in parallel byte-range chunks.

`plan()` scans a file once, in fixed-size blocks and vectorised (see `csvscan`), and
cuts it into chunks of `chunk_rows` records: a byte range plus the number of its first
record. `read()` parses one byte range with pyarrow's C++ CSV reader, every column as
a string, and adds `_source_ref` = `<path>#<record>`. Records are numbered from 1 after
the header; blank lines are not records. Pure Python (no Django).
"""

from __future__ import annotations

import codecs
import hashlib
import io
import os
from collections.abc import Iterator
from typing import Any

import marshmallow
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
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
from connectors.exceptions import ConfigError, TerminalError, TransientError
from connectors.plugins.files.csvscan import (
    fields_per_record,
    iter_records,
)

#: Set (with `RAW_COLUMN`) on rows that could not be parsed; their data columns are
#: NULL. Present, NULL, on every other row too, so all batches share one schema.
READ_ERROR_COLUMN = "_read_error"
#: The undecoded text of an unparsable row (line ending stripped), for dead-lettering.
RAW_COLUMN = "_raw"

BLOCK_SIZE = 8 * 1024 * 1024
MAX_HEADER_BYTES = 16 * 1024 * 1024
FINGERPRINT_HEAD_BYTES = 64 * 1024
_UTF8_BOM = codecs.BOM_UTF8


def _validate_root(value: str) -> None:
    if not value or not os.path.isabs(value) or "\x00" in value:
        raise marshmallow.ValidationError("Must be an absolute directory path.")


def _validate_encoding(value: str) -> None:
    try:
        codecs.lookup(value)
    except LookupError:
        raise marshmallow.ValidationError(f"Unknown encoding {value!r}.") from None
    # Records are found by scanning bytes for '"' and '\n': the encoding must write
    # ASCII as single ASCII bytes (utf-8, latin-1, cp1252 do; utf-16 does not).
    if '",\n\r'.encode(value) != b'",\n\r':
        raise marshmallow.ValidationError("Must be an ASCII-compatible encoding.")


def _validate_delimiter(value: str) -> None:
    if len(value) != 1 or not value.isascii() or value in '"\r\n':
        raise marshmallow.ValidationError(
            "Must be one ASCII character other than a quote or a line ending."
        )


class FilesConfig(marshmallow.Schema):
    """Config of the files connector: where the files are and how they are written."""

    root = fields.String(required=True, validate=_validate_root)
    format = fields.String(load_default="csv", validate=validate.OneOf(["csv"]))
    delimiter = fields.String(load_default=",", validate=_validate_delimiter)
    encoding = fields.String(load_default="utf-8", validate=_validate_encoding)


class FilesReadOptions(marshmallow.Schema):
    """A pipeline's read options for the files connector."""

    path = fields.String(required=True, validate=validate.Length(min=1))


def _load_options(options: dict[str, Any]) -> dict[str, Any]:
    try:
        return FilesReadOptions().load(options)
    except marshmallow.ValidationError as exc:
        error = ConfigError(f"invalid read options: {exc.normalized_messages()}")
        error.errors = exc.normalized_messages()
        raise error from None


def _os_error(path: str, exc: OSError) -> TerminalError | TransientError:
    """Class an OS error: a missing or forbidden file will not heal by retrying."""
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
        return TerminalError(f"{path}: {exc.strerror}")
    return TransientError(f"{path}: {exc.strerror or exc}")


def _pread_exactly(fd: int, length: int, offset: int) -> bytes:
    parts: list[bytes] = []
    while length > 0:
        part = os.pread(fd, min(length, 1 << 30), offset)
        if not part:
            break
        parts.append(part)
        length -= len(part)
        offset += len(part)
    return b"".join(parts)


class FilesSource(Source):
    """Reads CSV files under `root` as all-string Arrow batches, in row chunks."""

    #: Bytes read per scanning step in `plan()`; tests lower it to hit block edges.
    block_size: int = BLOCK_SIZE

    # -- paths -------------------------------------------------------------------

    @property
    def _root(self) -> str:
        return os.path.realpath(self.config["root"])

    def resolve(self, path: str) -> str:
        """The real path of `path` (relative to root), refusing anything outside root.

        Symbolic links are resolved first, so a link that points out of root is
        refused too.

        Args:
            path: a path relative to the configured root (or absolute inside it).

        Returns:
            The resolved absolute path.

        Raises:
            ConfigError: when the path escapes the root.
        """
        root = self._root
        try:
            resolved = os.path.realpath(os.path.join(root, path))
        except ValueError:  # an embedded NUL byte
            raise ConfigError(f"invalid path {path!r}") from None
        if os.path.commonpath([root, resolved]) != root or resolved == root:
            raise ConfigError(f"path {path!r} is outside the connector's root")
        return resolved

    # -- contract ------------------------------------------------------------------

    def check(self) -> CheckResult:
        root = self.config["root"]
        if not os.path.isdir(root):
            return CheckResult(False, f"root {root} is not a directory")
        try:
            with os.scandir(root) as entries:
                next(entries, None)
        except OSError as exc:
            return CheckResult(False, f"root {root} is not readable: {exc.strerror}")
        return CheckResult(True, f"root {root} is readable")

    def discover(self) -> list[StreamInfo]:
        """One stream per `*.csv` file under root (recursive, hidden entries skipped).

        Empty files (no header) and links leading out of root are left out. The
        schema is the header's columns, all strings; the stream name is the path to
        put in the read options.
        """
        root = self._root
        streams: list[StreamInfo] = []
        for directory, subdirs, files in os.walk(root):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith(".") or not name.lower().endswith(".csv"):
                    continue
                relative = os.path.relpath(os.path.join(directory, name), root)
                relative = relative.replace(os.sep, "/")
                try:
                    columns = self._header(relative)
                except ConfigError:  # a symbolic link that leads out of root
                    continue
                if columns is not None:
                    schema = pa.schema([(c, pa.string()) for c in columns])
                    streams.append(StreamInfo(relative, schema))
        return streams

    def fingerprint(self, options: dict[str, Any]) -> str | None:
        """Size, mtime and a hash of the first 64 KiB of the file."""
        path = _load_options(options)["path"]
        resolved = self.resolve(path)
        try:
            with open(resolved, "rb") as stream:
                stat = os.fstat(stream.fileno())
                head = stream.read(FINGERPRINT_HEAD_BYTES)
        except OSError as exc:
            raise _os_error(path, exc) from exc
        digest = hashlib.sha256(head).hexdigest()[:16]
        return f"size={stat.st_size}:mtime_ns={stat.st_mtime_ns}:head={digest}"

    def plan(self, options: dict[str, Any], *, chunk_rows: int) -> Iterator[Chunk]:
        """Chunks of `chunk_rows` records, found in one bounded-memory pass.

        Each chunk's spec: `path`, `offset` and `length` (bytes of its records),
        `first_row` (1-based record number, header excluded), `rows`, `columns`.
        An empty or header-only file yields no chunk.

        Raises:
            ConfigError: bad options or a path outside root.
            TerminalError: missing/unreadable file, header too long, duplicate columns.
        """
        if chunk_rows < 1:
            raise ConfigError("chunk_rows must be at least 1")
        path = _load_options(options)["path"]
        resolved = self.resolve(path)
        try:
            stream = open(resolved, "rb")  # noqa: SIM115 - closed in finally below
        except OSError as exc:
            raise _os_error(path, exc) from exc
        try:
            yield from self._plan(stream, path, chunk_rows)
        except OSError as exc:
            raise _os_error(path, exc) from exc
        finally:
            stream.close()

    def _plan(self, stream: Any, path: str, chunk_rows: int) -> Iterator[Chunk]:
        columns: list[str] | None = None
        seq = 0
        next_row = 1
        rows = 0  # records in the chunk being built
        offset = stop = 0
        first_row = 1
        for starts, stops in iter_records(stream, block_size=self.block_size):
            i, n = 0, len(starts)
            if columns is None:
                if not n:
                    self._check_header_size(path, stream.tell())
                    continue
                raw = _pread_exactly(
                    stream.fileno(), int(stops[0] - starts[0]), int(starts[0])
                )
                columns = self._parse_header(path, raw, offset=int(starts[0]))
                i = 1
            while i < n:
                if rows == 0:
                    offset, first_row = int(starts[i]), next_row
                take = min(chunk_rows - rows, n - i)
                i += take
                rows += take
                next_row += take
                stop = int(stops[i - 1])
                if rows == chunk_rows:
                    yield self._chunk(seq, path, offset, stop, first_row, rows, columns)
                    seq += 1
                    rows = 0
        if rows and columns is not None:
            yield self._chunk(seq, path, offset, stop, first_row, rows, columns)

    def _chunk(
        self,
        seq: int,
        path: str,
        offset: int,
        stop: int,
        first_row: int,
        rows: int,
        columns: list[str],
    ) -> Chunk:
        spec = {
            "path": path,
            "offset": offset,
            "length": stop - offset,
            "first_row": first_row,
            "rows": rows,
            "columns": list(columns),
        }
        return Chunk(seq, spec)

    def read(self, options: dict[str, Any], chunk: Chunk) -> Iterator[pa.RecordBatch]:
        """Parse the chunk's byte range; yields data rows, then unparsable rows.

        Every batch has the header's columns (strings; empty unquoted field = NULL,
        quoted `""` = empty string), then `_source_ref`, `_read_error`, `_raw`.
        A row with the wrong number of fields comes out with NULL data columns,
        `_read_error` = "expected N fields, got M" and `_raw` = its text.

        Raises:
            TerminalError: the file changed since planning, or the chunk does not parse
                into the planned number of rows (an unsupported CSV dialect).
        """
        path = _load_options(options)["path"]
        spec = chunk.spec
        if spec.get("path") != path:
            raise TerminalError(
                f"chunk {chunk.seq} was planned for {spec.get('path')!r}, not {path!r}"
            )
        data = self._read_range(path, int(spec["offset"]), int(spec["length"]))
        columns: list[str] = list(spec["columns"])
        first_row, rows = int(spec["first_row"]), int(spec["rows"])
        invalid: list[int] = []  # field counts of skipped rows (any order: threads)

        def on_invalid_row(row: Any) -> str:
            invalid.append(row.actual_columns)
            return "skip"

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
                    delimiter=self.config.get("delimiter", ","),
                    quote_char='"',
                    double_quote=True,
                    newlines_in_values=True,
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
        table = table.append_column(SOURCE_REF_COLUMN, _source_refs(path, numbers))
        table = table.append_column(
            READ_ERROR_COLUMN, pa.nulls(len(table), pa.string())
        )
        table = table.append_column(RAW_COLUMN, pa.nulls(len(table), pa.string()))
        yield from table.to_batches()
        if bad_rows is not None:
            yield self._error_batch(path, data, columns, first_row, *bad_rows)

    # -- helpers -------------------------------------------------------------------

    def _arrow_encoding(self) -> str:
        name = codecs.lookup(self.config.get("encoding", "utf-8")).name
        return "utf8" if name in ("utf-8", "utf-8-sig") else name

    def _check_header_size(self, path: str, position: int) -> None:
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
        try:
            table = pacsv.read_csv(
                pa.py_buffer(raw),
                read_options=pacsv.ReadOptions(encoding=self._arrow_encoding()),
                parse_options=pacsv.ParseOptions(
                    delimiter=self.config.get("delimiter", ","),
                    newlines_in_values=True,
                ),
            )
        except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
            raise TerminalError(
                f"{path}: the header row cannot be parsed: {exc}"
            ) from exc
        columns = table.column_names
        duplicates = sorted({c for c in columns if columns.count(c) > 1})
        if duplicates:
            raise TerminalError(
                f"{path}: duplicate column names in the header: {', '.join(duplicates)}"
            )
        return columns

    def _header(self, path: str) -> list[str] | None:
        """The header's column names, or None for an empty file."""
        resolved = self.resolve(path)
        try:
            with open(resolved, "rb") as stream:
                for starts, stops in iter_records(stream, block_size=self.block_size):
                    if len(starts):
                        raw = _pread_exactly(
                            stream.fileno(), int(stops[0] - starts[0]), int(starts[0])
                        )
                        return self._parse_header(path, raw, offset=int(starts[0]))
                    self._check_header_size(path, stream.tell())
        except OSError as exc:
            raise _os_error(path, exc) from exc
        return None

    def _read_range(self, path: str, offset: int, length: int) -> bytes:
        resolved = self.resolve(path)
        try:
            with open(resolved, "rb") as stream:
                data = _pread_exactly(stream.fileno(), length, offset)
        except OSError as exc:
            raise _os_error(path, exc) from exc
        if len(data) != length:
            raise TerminalError(f"{path}: the file is shorter than when it was planned")
        return data

    def _locate_invalid(
        self, data: bytes, columns: list[str], invalid: list[int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """Find the skipped rows: pyarrow's row numbers are None when it uses threads.

        Returns:
            (indexes within the chunk, field counts, starts, stops) of the ragged rows,
            or None when our count disagrees with pyarrow's.
        """
        starts_parts, stops_parts = [], []
        for starts, stops in iter_records(io.BytesIO(data), block_size=len(data)):
            starts_parts.append(starts)
            stops_parts.append(stops)
        starts = np.concatenate(starts_parts)
        stops = np.concatenate(stops_parts)
        delimiter = ord(self.config.get("delimiter", ","))
        counts = fields_per_record(data, stops, delimiter=delimiter)
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
            _source_refs(path, indexes.astype(np.int64) + first_row),
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


def _source_refs(path: str, numbers: np.ndarray) -> pa.Array:
    """`<path>#<n>` for each record number, computed by Arrow kernels."""
    as_text = pc.cast(pa.array(numbers, pa.int64()), pa.string())
    return pc.binary_join_element_wise(f"{path}#", as_text, "")


class FilesPlugin(Plugin):
    """CSV files under a local directory; chunked by byte ranges for parallel reads."""

    kind = "files"
    title = "Files (CSV)"
    config_schema = FilesConfig
    capabilities = Capabilities(source=True, discover=True, chunkable=True)
    source_class = FilesSource
    read_options_schema = FilesReadOptions
