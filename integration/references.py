"""Reference datasets for enrich steps and referential rules.

A reference is read from a source connector, cut to the columns the steps need,
and cached twice with the reference's TTL: in Redis as an Arrow IPC blob (shared by
every worker) and in the process (the engine registers a table once and reuses it
while it is handed the same object). Each chunk records where its references came
from (memory, redis, or a miss that read the connector) and how old they were. A
Redis that cannot answer costs only the shared cache: the reference is read from
its connector.
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any

import orjson
import pyarrow as pa
import structlog
from django.conf import settings

from connectors.base import SOURCE_REF_COLUMN
from integration.staging import from_ipc, to_ipc

logger = structlog.get_logger(__name__)

DEFAULT_TTL_SECONDS = 600
#: Chunk size when reading a reference: references are small tables.
READ_CHUNK_ROWS = 1_000_000
_LOADED_AT = b"dis.loaded_at"

_local: dict[str, tuple[pa.Table, float]] = {}
_lock = threading.Lock()


def cache_key(ref: dict[str, Any], columns: list[str]) -> str:
    spec = {
        "connector": ref["connector"],
        "options": ref.get("options", {}),
        "columns": sorted(columns),
    }
    digest = hashlib.sha256(orjson.dumps(spec, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"dis:ref:{digest[:32]}"


def _redis() -> Any:
    if not settings.REDIS_URL:
        return None
    import redis

    return redis.Redis.from_url(
        settings.REDIS_URL, socket_connect_timeout=5, socket_timeout=10
    )


def _shared(call: Any, *args: Any, **kwargs: Any) -> Any:
    """A call on the shared cache; None when Redis cannot answer. The cache only
    saves reads: a Redis that is restarting or full must not fail the chunk, which
    then reads the reference from its connector."""
    import redis

    try:
        return call(*args, **kwargs)
    except redis.RedisError as exc:
        logger.warning("reference_cache_unavailable", error_class=type(exc).__name__)
        return None


def _read(ref: dict[str, Any], columns: list[str]) -> pa.Table:
    from connectors.base import Chunk
    from connectors.models import Connector

    connector = Connector.objects.select_related("credential").get(
        name=ref["connector"]
    )
    source = connector.open_source()
    options = ref.get("options", {})
    try:
        batches = []
        for chunk in source.plan(options, chunk_rows=READ_CHUNK_ROWS):
            batches.extend(source.read(options, Chunk(chunk.seq, chunk.spec)))
    finally:
        source.close()
    table = pa.Table.from_batches(batches) if batches else pa.table({})
    keep = [c for c in columns if c in table.column_names]
    if SOURCE_REF_COLUMN in table.column_names and SOURCE_REF_COLUMN not in keep:
        table = table.drop_columns([SOURCE_REF_COLUMN])
    return table.select(keep) if keep else table


def load(
    name: str, ref: dict[str, Any], columns: list[str], *, read_only: bool = False
) -> tuple[pa.Table, dict[str, Any]]:
    """The reference table and where it came from (`memory`, `redis`, `miss`).

    ``read_only`` (a preview) uses the caches but fills neither of them.
    """
    ttl = int(ref.get("ttl_seconds", DEFAULT_TTL_SECONDS))
    key = cache_key(ref, columns)
    now = time.time()
    with _lock:
        entry = _local.get(key)
    if entry is not None and now - entry[1] < ttl:
        return entry[0], {"source": "memory", "age_seconds": round(now - entry[1], 3)}
    client = _redis()
    if client is not None and ttl > 0:
        blob = _shared(client.get, key)
        if blob is not None:
            table = from_ipc(blob)
            loaded_at = float((table.schema.metadata or {}).get(_LOADED_AT, now))
            table = table.replace_schema_metadata(None)
            if not read_only:
                with _lock:
                    _local[key] = (table, loaded_at)
            return table, {"source": "redis", "age_seconds": round(now - loaded_at, 3)}
    table = _read(ref, columns)
    if read_only:
        return table, {"source": "miss", "age_seconds": 0.0}
    if client is not None and ttl > 0:
        stamped = table.replace_schema_metadata({_LOADED_AT: str(now).encode()})
        _shared(client.set, key, to_ipc(stamped), ex=ttl)
    with _lock:
        _local[key] = (table, now)
    logger.info("reference_loaded", reference=name, rows=table.num_rows)
    return table, {"source": "miss", "age_seconds": 0.0}


def for_version(
    spec: dict[str, Any], needed: dict[str, list[str]], *, read_only: bool = False
) -> tuple[dict[str, pa.Table], dict[str, Any]]:
    """Every reference a pipeline version's steps need, and the cache statistics."""
    tables: dict[str, pa.Table] = {}
    stats: dict[str, Any] = {}
    for name, columns in needed.items():
        tables[name], stats[name] = load(
            name, spec["references"][name], columns, read_only=read_only
        )
    return tables, stats


def clear_local() -> None:
    with _lock:
        _local.clear()
