"""`files`: CSV, JSON Lines, JSON, Parquet and Avro files, local or on S3.

The source reads files under a root (a local directory, or a key prefix of an
S3-compatible bucket through fsspec/s3fs), one path or a glob of them, in parallel
row chunks planned in bounded memory (see `source`); the sink writes one file per
(run, chunk), atomically (see `sink`). Pure Python (no Django).
"""

from __future__ import annotations

import codecs
import os
from typing import Any

import marshmallow
from marshmallow import fields, validate, validates_schema

from connectors.base import Capabilities, Plugin
from connectors.exceptions import ConfigError
from connectors.plugins.files.records import (
    FIELD_TYPES,
    RAW_COLUMN,
    READ_ERROR_COLUMN,
    RECORD_COLUMN,
    RESERVED_NAMES,
)
from connectors.plugins.files.sink import FilesSink, FilesWriteOptions
from connectors.plugins.files.source import FilesSource

__all__ = [
    "RAW_COLUMN",
    "READ_ERROR_COLUMN",
    "RECORD_COLUMN",
    "FilesConfig",
    "FilesPlugin",
    "FilesReadOptions",
    "FilesSink",
    "FilesSource",
    "FilesWriteOptions",
]

FORMATS = ("csv", "jsonl", "json", "parquet", "avro")
COMPRESSIONS = ("auto", "none", "gzip", "zstd")


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


def _validate_quote(value: str) -> None:
    if len(value) > 1 or not value.isascii() or (value and value in "\r\n"):
        raise marshmallow.ValidationError(
            "Must be one ASCII character (not a line ending), or empty for no quoting."
        )


class FilesConfig(marshmallow.Schema):
    """Config of the files connector: where the files are and how they are written."""

    protocol = fields.String(
        load_default="file", validate=validate.OneOf(["file", "s3"])
    )
    root = fields.String(load_default=None, allow_none=True)
    bucket = fields.String(load_default=None, allow_none=True)
    endpoint_url = fields.URL(
        load_default=None, allow_none=True, schemes={"http", "https"}, require_tld=False
    )
    region = fields.String(load_default=None, allow_none=True)
    aws_access_key_id = fields.String(load_default=None, allow_none=True)
    aws_secret_access_key = fields.String(
        load_default=None, allow_none=True, metadata={"secret": True}
    )
    format = fields.String(load_default="csv", validate=validate.OneOf(FORMATS))
    compression = fields.String(
        load_default="auto", validate=validate.OneOf(COMPRESSIONS)
    )
    delimiter = fields.String(load_default=",", validate=_validate_delimiter)
    quote_char = fields.String(load_default='"', validate=_validate_quote)
    header = fields.Boolean(load_default=True)
    encoding = fields.String(load_default="utf-8", validate=_validate_encoding)

    @validates_schema
    def _where(self, data: dict[str, Any], **kwargs: Any) -> None:
        root = data.get("root")
        if data["protocol"] == "file":
            if not root or not os.path.isabs(root) or "\x00" in root:
                raise marshmallow.ValidationError(
                    "Must be an absolute directory path.", field_name="root"
                )
            return
        if not data.get("bucket"):
            raise marshmallow.ValidationError(
                "The s3 protocol needs a bucket.", field_name="bucket"
            )
        if root and (root.startswith("/") or ".." in root.split("/")):
            raise marshmallow.ValidationError(
                "On S3, root is a key prefix inside the bucket (no leading /, no ..).",
                field_name="root",
            )
        if bool(data.get("aws_access_key_id")) != bool(
            data.get("aws_secret_access_key")
        ):
            raise marshmallow.ValidationError(
                "Give both the access key id and the secret access key, or neither.",
                field_name="aws_access_key_id",
            )

    @validates_schema
    def _quoting(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data.get("quote_char") and data["quote_char"] == data.get("delimiter"):
            raise marshmallow.ValidationError(
                "The quote character cannot be the delimiter.", field_name="quote_char"
            )


def _validate_fields(value: dict[str, str]) -> None:
    reserved = sorted(set(value) & set(RESERVED_NAMES))
    if reserved:
        raise marshmallow.ValidationError(f"Reserved name(s): {', '.join(reserved)}.")


class FilesReadOptions(marshmallow.Schema):
    """A pipeline's read options for the files connector."""

    path = fields.String(required=True, validate=validate.Length(min=1))
    format = fields.String(load_default=None, validate=validate.OneOf(FORMATS))
    compression = fields.String(
        load_default=None, validate=validate.OneOf(COMPRESSIONS)
    )
    #: CSV without a header: the column names (default `column_1`, `column_2`...).
    columns = fields.List(
        fields.String(validate=validate.Length(min=1)), load_default=None
    )

    #: JSON formats: top-level fields pulled out into typed columns.
    fields = fields.Dict(
        keys=fields.String(validate=validate.Length(min=1)),
        values=fields.String(validate=validate.OneOf(list(FIELD_TYPES))),
        load_default=dict,
        validate=_validate_fields,
    )


def load_read_options(options: dict[str, Any]) -> dict[str, Any]:
    """Validate a pipeline's read options.

    Raises:
        ConfigError: with `.errors` mapping option name to messages.
    """
    try:
        return FilesReadOptions().load(options)
    except marshmallow.ValidationError as exc:
        error = ConfigError(f"invalid read options: {exc.normalized_messages()}")
        error.errors = exc.normalized_messages()
        raise error from None


class FilesPlugin(Plugin):
    """Files in a local directory or an S3 bucket: a chunked source and a sink."""

    kind = "files"
    title = "Files (CSV, JSON Lines, JSON, Parquet, Avro; local or S3)"
    config_schema = FilesConfig
    url_fields = ("endpoint_url",)
    capabilities = Capabilities(source=True, sink=True, discover=True, chunkable=True)
    source_class = FilesSource
    sink_class = FilesSink
    read_options_schema = FilesReadOptions
    write_options_schema = FilesWriteOptions
