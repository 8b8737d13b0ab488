"""`file_processing`: files announced by the File Processing Service, verified.

The service announces each processed file as a JSON event on a Kafka topic
(`file_id`, `url`, `content_type`, `size`, `sha256`) and serves its bytes over
HTTP. A file trigger (in the `integration` app) starts a run with the event in the
run's source options; this source downloads the file through the SSRF guard,
verifies size and SHA-256 before parsing anything, and parses it with the `files`
connector's readers (see `source` and `download`). Pure Python (no Django).
"""

from __future__ import annotations

import os
from typing import Any

import marshmallow
from marshmallow import fields, validate, validates_schema

from connectors.base import Capabilities, Plugin
from connectors.exceptions import ConfigError
from connectors.plugins.file_processing.source import (
    CONTENT_TYPES,
    FileProcessingSource,
    pick_format,
)
from connectors.plugins.files import (
    COMPRESSIONS,
    FORMATS,
    _validate_delimiter,
    _validate_encoding,
    _validate_fields,
    _validate_quote,
)
from connectors.plugins.files.records import FIELD_TYPES

__all__ = [
    "CONTENT_TYPES",
    "FileProcessingConfig",
    "FileProcessingPlugin",
    "FileProcessingReadOptions",
    "FileProcessingSource",
    "pick_format",
]

AUTH_TYPES = ("none", "bearer", "api_key")
SHA256_RE = r"^[0-9a-fA-F]{64}$"


class FileProcessingConfig(marshmallow.Schema):
    """Config of the file_processing connector: the service, its auth and limits."""

    base_url = fields.URL(required=True, schemes={"http", "https"}, require_tld=False)
    auth_type = fields.String(load_default="none", validate=validate.OneOf(AUTH_TYPES))
    token = fields.String(load_default=None, allow_none=True, metadata={"secret": True})
    api_key = fields.String(
        load_default=None, allow_none=True, metadata={"secret": True}
    )
    api_key_header = fields.String(
        load_default="X-API-Key", validate=validate.Length(1, 100)
    )
    #: Accept event URLs on another origin than `base_url` (still SSRF-checked;
    #: the credentials are only ever sent to `base_url`'s origin).
    allow_other_hosts = fields.Boolean(load_default=False)
    #: Connect and read timeout of one request (seconds).
    timeout_seconds = fields.Float(load_default=30.0, validate=validate.Range(0.1, 600))
    #: The whole download must end within this many seconds.
    download_deadline_seconds = fields.Float(
        load_default=3600.0, validate=validate.Range(1, 86_400)
    )
    #: A file announced bigger than this is refused before any byte is fetched.
    max_file_bytes = fields.Integer(
        load_default=5 * 1024**3, validate=validate.Range(min=1)
    )
    #: Local folder of verified copies (default: a folder in the system temp dir).
    cache_dir = fields.String(load_default=None, allow_none=True)
    #: Defaults of the parse options (a run's source options override them).
    format = fields.String(
        load_default=None, allow_none=True, validate=validate.OneOf(FORMATS)
    )
    delimiter = fields.String(load_default=",", validate=_validate_delimiter)
    quote_char = fields.String(load_default='"', validate=_validate_quote)
    header = fields.Boolean(load_default=True)
    encoding = fields.String(load_default="utf-8", validate=_validate_encoding)

    @validates_schema
    def _auth(self, data: dict[str, Any], **kwargs: Any) -> None:
        needed = {"bearer": "token", "api_key": "api_key"}.get(data["auth_type"])
        if needed and not data.get(needed):
            raise marshmallow.ValidationError(
                f"Required with auth_type {data['auth_type']}.", field_name=needed
            )
        cache_dir = data.get("cache_dir")
        if cache_dir and (not os.path.isabs(cache_dir) or "\x00" in cache_dir):
            raise marshmallow.ValidationError(
                "Must be an absolute directory path.", field_name="cache_dir"
            )


class FileProcessingReadOptions(marshmallow.Schema):
    """A run's read options: the announced file (the event) and how to parse it.

    The event fields are optional here so a pipeline can be defined without one;
    a run without them fails at planning with a clear message.
    """

    file_id = fields.String(load_default=None, validate=validate.Length(1, 200))
    url = fields.String(load_default=None, validate=validate.Length(1, 4096))
    content_type = fields.String(load_default=None, allow_none=True)
    size = fields.Integer(load_default=None, validate=validate.Range(min=0))
    sha256 = fields.String(load_default=None, validate=validate.Regexp(SHA256_RE))
    format = fields.String(load_default=None, validate=validate.OneOf(FORMATS))
    compression = fields.String(
        load_default=None, validate=validate.OneOf(COMPRESSIONS)
    )
    delimiter = fields.String(load_default=None, validate=_validate_delimiter)
    quote_char = fields.String(load_default=None, validate=_validate_quote)
    header = fields.Boolean(load_default=None)
    encoding = fields.String(load_default=None, validate=_validate_encoding)
    #: CSV without a header: the column names.
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
    """Validate a run's read options.

    Raises:
        ConfigError: with `.errors` mapping option name to messages.
    """
    try:
        loaded: dict[str, Any] = FileProcessingReadOptions().load(options)
    except marshmallow.ValidationError as exc:
        error = ConfigError(f"invalid read options: {exc.normalized_messages()}")
        error.errors = exc.normalized_messages()
        raise error from None
    return loaded


class FileProcessingPlugin(Plugin):
    """Files announced by the File Processing Service: downloaded, verified, read."""

    kind = "file_processing"
    title = "File Processing Service (verified downloads of announced files)"
    config_schema = FileProcessingConfig
    url_fields = ("base_url",)
    capabilities = Capabilities(source=True, chunkable=True)
    source_class = FileProcessingSource
    read_options_schema = FileProcessingReadOptions
