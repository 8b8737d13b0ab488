"""The `file_processing` source: one announced file, verified, then parsed.

The run's source options carry the File Processing Service's event (`file_id`,
`url`, `content_type`, `size`, `sha256`) and the parse options. `plan()` downloads
the file through the SSRF guard into the local cache and verifies its byte size and
SHA-256 before any record is parsed; it then plans row chunks with the `files`
connector's parsers over the local copy. `read()` reads a chunk from the verified
copy (downloading and verifying it again on a worker that does not have it). The
format comes from the options, else the content type, else the URL's file name.
Every record's `_source_ref` is `<file_id>#<record number>`. Pure Python (no Django).
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.compute as pc

from connectors.base import (
    SOURCE_REF_COLUMN,
    CheckResult,
    Chunk,
    ConnectorContext,
    Source,
    StreamInfo,
)
from connectors.exceptions import ConfigError, ConnectorError, TerminalError
from connectors.plugins.file_processing.download import (
    Downloader,
    FileEvent,
    default_cache_dir,
)
from connectors.plugins.files import FilesPlugin, FilesSource
from connectors.plugins.files.source import EXTENSIONS
from connectors.plugins.files.storage import COMPRESSION_SUFFIXES

#: Media types (without parameters) and the format they mean.
CONTENT_TYPES = {
    "text/csv": "csv",
    "application/csv": "csv",
    "text/tab-separated-values": "csv",
    "application/x-ndjson": "jsonl",
    "application/ndjson": "jsonl",
    "application/jsonl": "jsonl",
    "application/x-jsonlines": "jsonl",
    "application/jsonlines": "jsonl",
    "application/json": "json",
    "application/vnd.apache.parquet": "parquet",
    "application/x-parquet": "parquet",
    "application/parquet": "parquet",
    "application/avro": "avro",
    "application/x-avro": "avro",
    "application/vnd.apache.avro+binary": "avro",
    "avro/binary": "avro",
}
#: Media types of a compressed file (its format then comes from the file name).
COMPRESSED_TYPES = {
    "application/gzip": "gzip",
    "application/x-gzip": "gzip",
    "application/zstd": "zstd",
}
_COMPRESSION_EXT = {"gzip": ".gz", "zstd": ".zst"}
_EVENT_FIELDS = ("file_id", "url", "size", "sha256")


def media_type(content_type: str | None) -> str:
    """`text/csv; charset=utf-8` -> `text/csv` (lowercase); None -> ``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def file_name(url: str) -> str:
    """The last segment of the URL's path, percent-decoded."""
    return unquote(posixpath.basename(urlsplit(url).path))


def pick_format(options: dict[str, Any], config: dict[str, Any]) -> tuple[str, str]:
    """(format, compression) of the announced file.

    The format is the options' `format`, else the content type's, else the file
    name's ending, else the connector's default `format`. Compression likewise:
    the options', else a compressed content type, else the name's ending.

    Raises:
        ConfigError: no format can be told.
    """
    name = file_name(options.get("url") or "").lower()
    stem, ext = posixpath.splitext(name)
    named_compression = COMPRESSION_SUFFIXES.get(ext)
    if named_compression:
        name = stem
    mtype = media_type(options.get("content_type"))
    compression = (
        options.get("compression")
        or COMPRESSED_TYPES.get(mtype)
        or named_compression
        or "none"
    )
    if compression == "auto":
        compression = named_compression or "none"
    fmt = options.get("format") or CONTENT_TYPES.get(mtype)
    if not fmt:
        fmt = next(
            (f for f, endings in EXTENSIONS.items() if name.endswith(endings)), None
        )
    fmt = fmt or config.get("format")
    if not fmt:
        raise ConfigError(
            f"cannot tell the format of file_id={options.get('file_id')} "
            f"(content type {mtype or '(none)'!r}): set the format option"
        )
    return fmt, compression


class FileProcessingSource(Source):
    """Reads the one file a File Processing Service event announced."""

    def __init__(
        self, config: dict[str, Any], context: ConnectorContext | None = None
    ) -> None:
        super().__init__(config, context)
        self.downloader = Downloader(config, self.context)
        self.cache_dir = Path(config.get("cache_dir") or default_cache_dir())

    # -- settings ------------------------------------------------------------------

    def _settings(self, options: dict[str, Any]) -> dict[str, Any]:
        from connectors.plugins.file_processing import load_read_options

        loaded = load_read_options(options)
        missing = [f for f in _EVENT_FIELDS if loaded.get(f) in (None, "")]
        if missing:
            error = ConfigError(
                f"no file event in the source options (missing {', '.join(missing)}):"
                " a file_processing pipeline is started by a file trigger or with "
                "the event in the run's source_options"
            )
            error.errors = {f: ["Required."] for f in missing}
            raise error
        loaded["format"], loaded["compression"] = pick_format(loaded, self.config)
        return loaded

    @staticmethod
    def _event(settings: dict[str, Any]) -> FileEvent:
        return FileEvent(
            file_id=str(settings["file_id"]),
            url=str(settings["url"]),
            content_type=settings.get("content_type"),
            size=int(settings["size"]),
            sha256=str(settings["sha256"]).lower(),
        )

    @staticmethod
    def _local_name(settings: dict[str, Any]) -> str:
        suffix = EXTENSIONS[settings["format"]][0]
        suffix += _COMPRESSION_EXT.get(settings["compression"], "")
        # Per file_id too: another event announcing the same checksum gets its own
        # download (and verification) from its own URL.
        file_key = hashlib.sha256(str(settings["file_id"]).encode()).hexdigest()[:16]
        return f"{file_key}-{str(settings['sha256']).lower()}{suffix}"

    def _files_source(self, settings: dict[str, Any]) -> FilesSource:
        """A `files` source over the cache folder with the run's parse options."""
        parse = {
            name: settings[name]
            for name in ("delimiter", "quote_char", "header", "encoding")
            if settings.get(name) is not None
        }
        for name in ("delimiter", "quote_char", "header", "encoding"):
            if name not in parse and self.config.get(name) is not None:
                parse[name] = self.config[name]
        config = FilesPlugin.load_config(
            {
                "protocol": "file",
                "root": str(self.cache_dir),
                "format": settings["format"],
                **parse,
            }
        )
        return FilesSource(config, self.context)

    @staticmethod
    def _files_options(settings: dict[str, Any], name: str) -> dict[str, Any]:
        options: dict[str, Any] = {
            "path": name,
            "format": settings["format"],
            "compression": settings["compression"],
        }
        if settings.get("columns"):
            options["columns"] = settings["columns"]
        if settings.get("fields"):
            options["fields"] = settings["fields"]
        return options

    def _local_copy(self, settings: dict[str, Any]) -> str:
        """The cache name of the verified file (downloaded if not cached here)."""
        name = self._local_name(settings)
        self.downloader.fetch(self._event(settings), self.cache_dir, name)
        return name

    # -- contract ------------------------------------------------------------------

    def check(self) -> CheckResult:
        """GET the service's base URL: any answer but 401, 403 or 5xx is a success
        (the base URL itself need not serve anything)."""
        try:
            status = self.downloader.probe()
        except ConnectorError as exc:
            return CheckResult(False, str(exc))
        host = urlsplit(self.downloader.base_url).hostname
        if status in (401, 403) or status >= 500:
            return CheckResult(False, f"{host} answered HTTP {status}")
        return CheckResult(True, f"reached {host}: HTTP {status}")

    def discover(self) -> list[StreamInfo]:
        """Each announced file has its own schema: nothing to discover up front.

        Raises:
            ConfigError: always.
        """
        raise ConfigError(
            "a file_processing connector has no fixed streams: each file announced "
            "brings its own"
        )

    def fingerprint(self, options: dict[str, Any]) -> str | None:
        """The announced SHA-256: a resumed run reads the very same bytes."""
        sha256 = options.get("sha256")
        return f"sha256={str(sha256).lower()}" if sha256 else None

    def plan(self, options: dict[str, Any], *, chunk_rows: int) -> Iterator[Chunk]:
        """Download and verify the file, then plan it with the `files` parsers.

        Raises:
            ConfigError: no event in the options, a refused URL, unknown format.
            TerminalError: size or SHA-256 mismatch, HTTP 4xx, an unreadable file.
            TransientError: the service is unreachable or answered 5xx/429.
        """
        settings = self._settings(options)
        name = self._local_copy(settings)
        files = self._files_source(settings)
        try:
            for chunk in files.plan(
                self._files_options(settings, name), chunk_rows=chunk_rows
            ):
                yield Chunk(
                    chunk.seq,
                    {
                        **chunk.spec,
                        "file_id": settings["file_id"],
                        "sha256": settings["sha256"].lower(),
                    },
                )
        finally:
            files.close()

    def read(self, options: dict[str, Any], chunk: Chunk) -> Iterator[pa.RecordBatch]:
        """The chunk's records from the verified copy (fetched again if missing).

        Raises:
            TerminalError: the chunk was planned for another file, a size or
                SHA-256 mismatch on a fresh download, an unreadable chunk.
        """
        settings = self._settings(options)
        if chunk.spec.get("sha256") != settings["sha256"].lower():
            raise TerminalError(
                f"chunk {chunk.seq} was planned for another file than "
                f"file_id={settings['file_id']}"
            )
        name = self._local_copy(settings)
        files = self._files_source(settings)
        inner = {k: v for k, v in chunk.spec.items() if k not in ("file_id", "sha256")}
        prefix = len(name)
        ref_prefix = f"{settings['file_id']}"
        try:
            for batch in files.read(
                self._files_options(settings, name), Chunk(chunk.seq, inner)
            ):
                index = batch.schema.get_field_index(SOURCE_REF_COLUMN)
                refs = pc.binary_join_element_wise(
                    ref_prefix,
                    pc.utf8_slice_codeunits(batch.column(index), prefix),
                    "",
                )
                yield batch.set_column(index, SOURCE_REF_COLUMN, refs)
        finally:
            files.close()

    def close(self) -> None:
        self.downloader.close()
