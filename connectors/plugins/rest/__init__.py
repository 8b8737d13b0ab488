"""`rest`: JSON over HTTP APIs, as a source (paginated reads) and a sink (POSTs).

The source pages through an endpoint (page number, offset/limit, a cursor in the body,
or the `Link` header) and yields one Arrow batch per page: each record whole as JSON
in the `record` column, the fields the read options declare as typed columns, and
`_source_ref` = `<url path>?page=<n>#<index>` (pages from 1, records from 0).
An incremental read sends the saved cursor in a "since" parameter; after `read()`
the source's `cursor_value` holds the largest `cursor_field` it saw.

The sink POSTs JSON arrays of `batch_size` records (or single objects) with an
`Idempotency-Key: <run_id>-<chunk_seq>-<n>` header that stays the same when the
chunk is retried: delivery is at-least-once, and a receiver that honours the key
makes it effectively once.

Requests go through the SSRF guard, the connector's shared rate limit and circuit
breaker (see `client`). Pure Python (no Django).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any
from urllib.parse import urljoin, urlsplit

import marshmallow
import orjson
import pyarrow as pa
from marshmallow import fields, validate, validates_schema

from connectors.base import (
    SYSTEM_COLUMNS,
    Capabilities,
    CheckResult,
    Chunk,
    ConnectorContext,
    Fence,
    Plugin,
    Sink,
    Source,
    StreamInfo,
    WriteResult,
)
from connectors.exceptions import (
    ConfigError,
    ConnectorError,
    FencedError,
    TerminalError,
)
from connectors.plugins.rest.client import (
    RestClient,
    check_config_urls,
    config_redactor,
    join_url,
    origin,
)
from connectors.plugins.rest.records import (
    FIELD_TYPES,
    RAW_COLUMN,
    READ_ERROR_COLUMN,
    RECORD_COLUMN,
    RESERVED_NAMES,
    batch_schema,
    dig,
    extract_records,
    max_cursor,
    next_link,
    parse_path,
    records_to_batch,
)

__all__ = [
    "RAW_COLUMN",
    "READ_ERROR_COLUMN",
    "RECORD_COLUMN",
    "RestPlugin",
    "RestSink",
    "RestSource",
]

AUTH_TYPES = ("none", "bearer", "basic", "api_key", "oauth2_client_credentials")
#: Headers that carry credentials or framing: set by the connector, not by config.
FORBIDDEN_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "host", "content-length"}
)
#: Secret config fields each auth type needs (they come from the credential).
AUTH_REQUIRES: dict[str, tuple[str, ...]] = {
    "bearer": ("token",),
    "basic": ("username", "password"),
    "api_key": ("api_key",),
    "oauth2_client_credentials": ("token_url", "client_id", "client_secret"),
}


def _validate_http_url(value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise marshmallow.ValidationError("Must be an http:// or https:// URL.")
    if parts.username is not None or parts.password is not None:
        raise marshmallow.ValidationError(
            "Credentials do not belong in the URL: use a credential."
        )


def _validate_headers(value: dict[str, str]) -> None:
    bad = sorted(name for name in value if name.lower() in FORBIDDEN_HEADERS)
    if bad:
        raise marshmallow.ValidationError(
            f"Header(s) {', '.join(bad)} cannot be set here (credentials belong in "
            "a credential)."
        )


class RestConfig(marshmallow.Schema):
    """Config of the rest connector: the API, its authentication and limits."""

    base_url = fields.String(required=True, validate=_validate_http_url)
    headers = fields.Dict(
        keys=fields.String(validate=validate.Length(min=1)),
        values=fields.String(),
        load_default=dict,
        validate=_validate_headers,
    )
    auth_type = fields.String(load_default="none", validate=validate.OneOf(AUTH_TYPES))
    username = fields.String(load_default=None, allow_none=True)
    password = fields.String(
        load_default=None, allow_none=True, metadata={"secret": True}
    )
    token = fields.String(load_default=None, allow_none=True, metadata={"secret": True})
    api_key = fields.String(
        load_default=None, allow_none=True, metadata={"secret": True}
    )
    api_key_name = fields.String(
        load_default="X-API-Key", validate=validate.Length(min=1)
    )
    api_key_in = fields.String(
        load_default="header", validate=validate.OneOf(["header", "query"])
    )
    token_url = fields.String(
        load_default=None, allow_none=True, validate=_validate_http_url
    )
    client_id = fields.String(load_default=None, allow_none=True)
    client_secret = fields.String(
        load_default=None, allow_none=True, metadata={"secret": True}
    )
    scope = fields.String(load_default=None, allow_none=True)
    token_auth_method = fields.String(
        load_default="client_secret_basic",
        validate=validate.OneOf(["client_secret_basic", "client_secret_post"]),
    )
    check_path = fields.String(load_default="")
    timeout_seconds = fields.Float(
        load_default=30.0, validate=validate.Range(min=0, max=600, min_inclusive=False)
    )
    max_response_bytes = fields.Integer(
        load_default=50 * 1024 * 1024, validate=validate.Range(min=1)
    )
    rate_limit_per_second = fields.Float(
        load_default=None,
        allow_none=True,
        validate=validate.Range(min=0, min_inclusive=False),
    )
    rate_limit_burst = fields.Float(
        load_default=None, allow_none=True, validate=validate.Range(min=1)
    )
    max_retries = fields.Integer(load_default=3, validate=validate.Range(min=0, max=10))
    retry_backoff_seconds = fields.Float(
        load_default=0.5, validate=validate.Range(min=0, max=60)
    )
    max_retry_after_seconds = fields.Float(
        load_default=60.0, validate=validate.Range(min=0, max=3600)
    )
    breaker_fail_max = fields.Integer(
        load_default=5, validate=validate.Range(min=1, max=1000)
    )
    breaker_reset_seconds = fields.Float(
        load_default=30.0, validate=validate.Range(min=0, min_inclusive=False)
    )

    @validates_schema
    def _auth_fields(self, data: dict[str, Any], **kwargs: Any) -> None:
        needed = AUTH_REQUIRES.get(data.get("auth_type", "none"), ())
        secret = {"password", "token", "api_key", "client_secret"}
        missing = {
            name: [
                f"Required for auth_type {data['auth_type']}"
                + (" (from the credential)." if name in secret else ".")
            ]
            for name in needed
            if not data.get(name)
        }
        if missing:
            raise marshmallow.ValidationError(missing)


class PaginationSchema(marshmallow.Schema):
    """How a read moves from page to page."""

    type = fields.String(
        load_default="none",
        validate=validate.OneOf(["none", "page", "offset", "cursor", "link_header"]),
    )
    # page
    page_param = fields.String(load_default="page", validate=validate.Length(min=1))
    start = fields.Integer(load_default=1)
    size_param = fields.String(load_default=None, allow_none=True)
    size = fields.Integer(
        load_default=None, allow_none=True, validate=validate.Range(min=1)
    )
    # offset
    offset_param = fields.String(load_default="offset", validate=validate.Length(min=1))
    limit_param = fields.String(load_default="limit", validate=validate.Length(min=1))
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1))
    # cursor
    cursor_path = fields.String(load_default=None, allow_none=True)
    cursor_param = fields.String(load_default=None, allow_none=True)
    cursor_in = fields.String(
        load_default="query", validate=validate.OneOf(["query", "body"])
    )

    @validates_schema
    def _cursor_fields(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data.get("type") == "cursor":
            missing = {
                name: ["Required for cursor pagination."]
                for name in ("cursor_path", "cursor_param")
                if not data.get(name)
            }
            if missing:
                raise marshmallow.ValidationError(missing)
        if data.get("size_param") and not data.get("size"):
            raise marshmallow.ValidationError({"size": ["Required with size_param."]})


def _validate_fields(value: dict[str, str]) -> None:
    bad = sorted(n for n in value if n in RESERVED_NAMES or n.startswith("_"))
    if bad:
        raise marshmallow.ValidationError(
            f"Field name(s) {', '.join(bad)} are reserved."
        )


class RestReadOptions(marshmallow.Schema):
    """A pipeline's read options for the rest connector."""

    path = fields.String(load_default="")
    method = fields.String(load_default="GET", validate=validate.OneOf(["GET", "POST"]))
    params = fields.Dict(keys=fields.String(), load_default=dict)
    body = fields.Raw(load_default=None, allow_none=True)
    records_path = fields.String(load_default=None, allow_none=True)
    pagination = fields.Nested(PaginationSchema, load_default=lambda: {"type": "none"})
    max_pages = fields.Integer(
        load_default=None, allow_none=True, validate=validate.Range(min=1)
    )
    since_param = fields.String(load_default=None, allow_none=True)
    since_value = fields.Raw(load_default=None, allow_none=True)
    cursor_field = fields.String(load_default=None, allow_none=True)
    #: `fields` in the options: declared top-level fields and their types.
    field_types = fields.Dict(
        data_key="fields",
        keys=fields.String(validate=validate.Length(min=1)),
        values=fields.String(validate=validate.OneOf(list(FIELD_TYPES))),
        load_default=dict,
        validate=_validate_fields,
    )

    @validates_schema
    def _shape(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data.get("path", "").startswith(("http://", "https://")):
            raise marshmallow.ValidationError(
                {"path": ["A path under base_url, not a URL."]}
            )
        pagination = data.get("pagination") or {}
        body_cursor = (
            pagination.get("type") == "cursor" and pagination.get("cursor_in") == "body"
        )
        if body_cursor and (
            data.get("method") != "POST" or not isinstance(data.get("body") or {}, dict)
        ):
            raise marshmallow.ValidationError(
                {
                    "pagination": [
                        "cursor_in body needs method POST and a JSON object body."
                    ]
                }
            )


class RestWriteOptions(marshmallow.Schema):
    """A pipeline's write options for the rest connector."""

    path = fields.String(load_default="")
    method = fields.String(
        load_default="POST", validate=validate.OneOf(["POST", "PUT", "PATCH"])
    )
    batch_size = fields.Integer(
        load_default=100, validate=validate.Range(min=1, max=100_000)
    )


def _load(schema: type[marshmallow.Schema], options: dict[str, Any], what: str) -> Any:
    try:
        return schema().load(options)
    except marshmallow.ValidationError as exc:
        error = ConfigError(f"invalid {what} options: {exc.normalized_messages()}")
        error.errors = exc.normalized_messages()
        raise error from None


class _RestSide:
    """What the rest source and sink share: one client, the check."""

    config: dict[str, Any]
    context: ConnectorContext
    _client: RestClient | None = None

    @property
    def client(self) -> RestClient:
        if self._client is None:
            self._client = RestClient(self.config, self.context)
        return self._client

    def check(self) -> CheckResult:
        """GET `base_url` + `check_path` (through the guard, with credentials).

        The message names the status or the failure, never a secret.
        """
        url = join_url(self.config["base_url"], self.config.get("check_path") or "")
        try:
            check_config_urls(self.config, self.context)
            response = self.client.request("GET", url, guarded=False)
        except ConnectorError as exc:
            redact = (
                self._client.redact if self._client else config_redactor(self.config)
            )
            return CheckResult(False, redact(str(exc)))
        path = urlsplit(url).path or "/"
        return CheckResult(True, f"GET {path} answered HTTP {response.status}")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class RestSource(_RestSide, Source):
    """Reads a JSON API endpoint page by page as Arrow batches (one per page).

    Attributes:
        cursor_value: after `read()`, the largest `cursor_field` value seen (or the
            `since_value` the read started from when no record had one): the
            checkpoint of an incremental read.
    """

    def __init__(
        self, config: dict[str, Any], context: ConnectorContext | None = None
    ) -> None:
        super().__init__(config, context)
        self.cursor_value: Any = None

    def discover(self) -> list[StreamInfo]:
        """One stream, the configured base URL, with the schema of undeclared reads."""
        return [StreamInfo(self.config["base_url"], batch_schema({}))]

    def plan(self, options: dict[str, Any], *, chunk_rows: int) -> Iterator[Chunk]:
        """One chunk: an API's pages cannot be split ahead without reading them."""
        _load(RestReadOptions, options, "read")
        yield Chunk(0, {"page_start": 1})

    def read(self, options: dict[str, Any], chunk: Chunk) -> Iterator[pa.RecordBatch]:
        """Page through the endpoint; one batch per page with records.

        Raises:
            ConfigError: bad options or a URL refused by the SSRF guard.
            TerminalError: a 4xx, a body that is not JSON or too large, a missing
                records path, a `Link` to another origin.
            TransientError: 5xx, timeouts, 429, an open breaker (retry the chunk).
        """
        opts = _load(RestReadOptions, options, "read")
        pagination = opts["pagination"]
        kind = pagination["type"]
        declared: dict[str, str] = opts["field_types"]
        method = opts["method"]
        url = join_url(self.config["base_url"], opts["path"])
        ref_path = urlsplit(url).path or "/"
        params: dict[str, Any] = dict(opts["params"])
        body = copy.deepcopy(opts["body"])
        cursor_field = opts["cursor_field"]
        self.cursor_value = opts["since_value"]
        if opts["since_param"] and opts["since_value"] is not None:
            params[opts["since_param"]] = opts["since_value"]
        if kind == "page":
            params[pagination["page_param"]] = pagination["start"]
            if pagination["size_param"]:
                params[pagination["size_param"]] = pagination["size"]
        elif kind == "offset":
            params[pagination["offset_param"]] = 0
            params[pagination["limit_param"]] = pagination["limit"]
        cursor_path = parse_path(pagination.get("cursor_path"))
        page = int(chunk.spec.get("page_start", 1))
        pages = 0
        seen_cursors: set[str] = set()
        while True:
            response = self.client.request(
                method, url, params=params, json=body if method == "POST" else None
            )
            document = response.json()
            records = extract_records(document, opts["records_path"])
            if records:
                yield records_to_batch(
                    records, ref_prefix=f"{ref_path}?page={page}", fields=declared
                )
                if cursor_field:
                    self.cursor_value = max_cursor(
                        records, cursor_field, self.cursor_value
                    )
            pages += 1
            page += 1
            if opts["max_pages"] and pages >= opts["max_pages"]:
                return
            if kind == "page":
                size = pagination["size"]
                if not records or (size and len(records) < size):
                    return
                params[pagination["page_param"]] += 1
            elif kind == "offset":
                if len(records) < pagination["limit"]:
                    return
                params[pagination["offset_param"]] += len(records)
            elif kind == "cursor":
                token = dig(document, cursor_path, None)
                if token in (None, "") or not records:
                    return
                key = orjson.dumps(token).decode()
                if key in seen_cursors:
                    return
                seen_cursors.add(key)
                if pagination["cursor_in"] == "body":
                    body = {**(body or {}), pagination["cursor_param"]: token}
                else:
                    params[pagination["cursor_param"]] = token
            elif kind == "link_header":
                target = next_link(response.headers.get("link"))
                if not target:
                    return
                next_url = urljoin(response.url, target)
                if origin(next_url) != origin(self.config["base_url"]):
                    raise TerminalError(
                        "the Link header points to another origin "
                        f"({urlsplit(next_url).hostname}); refusing to follow it"
                    )
                url, params = next_url, {}
            else:
                return


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


class RestSink(_RestSide, Sink):
    """POSTs records as JSON to an endpoint, at-least-once, with idempotency keys.

    Each request carries `Idempotency-Key: <run_id>-<chunk_seq>-<n>` (`n` counts
    the chunk's requests from 0), identical when the chunk is retried, so a receiver
    that honours the key stores each record once. Columns with field metadata
    `dis.type: json` (the rest source's `record`) are sent as JSON, not as strings.
    """

    def prepare(
        self, options: dict[str, Any], schema: pa.Schema, *, run_id: int | None = None
    ) -> None:
        """Nothing to create; checks the options and the URL."""
        _load(RestWriteOptions, options, "write")
        check_config_urls(self.config, self.context)

    def dataset_name(self, options: dict[str, Any]) -> str:
        opts = _load(RestWriteOptions, options, "write")
        return join_url(self.config["base_url"], opts["path"])

    def write(
        self,
        options: dict[str, Any],
        batch: pa.Table,
        *,
        run_id: int,
        chunk_seq: int,
        fence: Fence,
    ) -> WriteResult:
        """Send the batch's rows in requests of `batch_size`.

        `fence()` is asked once, before the first request: a superseded attempt
        sends nothing. Requests already accepted stay accepted when a later one
        fails; the retried chunk sends them again under the same keys.

        Raises:
            FencedError: the attempt was superseded.
            TerminalError / TransientError: as the client classes the failure.
        """
        opts = _load(RestWriteOptions, options, "write")
        if not fence():
            raise FencedError(f"run {run_id} chunk {chunk_seq} was superseded")
        data = batch.drop_columns(
            [name for name in batch.column_names if name in SYSTEM_COLUMNS]
            + [
                name
                for name in (READ_ERROR_COLUMN, RAW_COLUMN)
                if name in batch.column_names
            ]
        )
        json_columns = {
            f.name
            for f in data.schema
            if f.metadata and f.metadata.get(b"dis.type") == b"json"
        }
        rows = data.to_pylist()
        size = opts["batch_size"]
        written = requests = 0
        for n, start in enumerate(range(0, len(rows), size)):
            group = [_row_json(row, json_columns) for row in rows[start : start + size]]
            payload = group[0] if size == 1 else b"[" + b",".join(group) + b"]"
            self.client.request(
                opts["method"],
                opts["path"],
                content=payload,
                headers={"Idempotency-Key": f"{run_id}-{chunk_seq}-{n}"},
            )
            written += len(group)
            requests += 1
        return WriteResult(written, {"requests": requests})


def _row_json(row: dict[str, Any], json_columns: set[str]) -> bytes:
    """One row as a compact JSON object (JSON columns embedded, not quoted)."""
    for name in json_columns:
        value = row.get(name)
        if isinstance(value, str):
            try:
                row[name] = orjson.Fragment(value)
            except TypeError:  # pragma: no cover - orjson without Fragment
                row[name] = orjson.loads(value)
    return orjson.dumps(row, default=_json_default, option=orjson.OPT_NON_STR_KEYS)


class RestPlugin(Plugin):
    """JSON over HTTP APIs: paginated source and idempotency-keyed sink."""

    kind = "rest"
    title = "REST API (JSON over HTTP)"
    config_schema = RestConfig
    capabilities = Capabilities(source=True, sink=True, incremental=True)
    source_class = RestSource
    sink_class = RestSink
    read_options_schema = RestReadOptions
    write_options_schema = RestWriteOptions
    url_fields = ("base_url", "token_url")

    @classmethod
    def run_action(
        cls,
        config: dict[str, Any],
        action: str,
        params: dict[str, Any],
        context: ConnectorContext | None = None,
    ) -> dict[str, Any]:
        """`http`: one request (`method`, `path`, `params`, `body`) to the API."""
        if action != "http":
            return super().run_action(config, action, params, context)
        return _http_action(config, params, context)


def _http_action(
    config: dict[str, Any], params: dict[str, Any], context: ConnectorContext | None
) -> dict[str, Any]:
    """A workflow's `http` node: one request through the connector's client (auth,
    SSRF guard, retries, breaker, rate limit); returns the status and a JSON body."""
    method = str(params.get("method", "POST")).upper()
    if method not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        raise ConfigError(f"http action: unsupported method {method!r}")
    client = RestClient(config, context or ConnectorContext())
    try:
        response = client.request(
            method,
            str(params.get("path", "")),
            params=params.get("params") or None,
            json=params.get("body"),
            what="workflow action",
        )
    finally:
        client.close()
    try:
        body: Any = orjson.loads(response.body) if response.body else None
    except orjson.JSONDecodeError:
        body = None
    return {"status": response.status, "body": body}
