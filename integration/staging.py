"""Staged batches: Arrow IPC blobs (lz4) waiting between the tasks of a chunk.

Redis (with a TTL) when configured, else a local folder (zero-config mode). A staged
batch may vanish (TTL, a flushed Redis): callers treat a miss as "redo the chunk from
extract", never as a failure.
"""

from __future__ import annotations

import os
import time
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
from django.conf import settings

from connectors.exceptions import TransientError

_WRITE_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")


def to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=_WRITE_OPTIONS) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(blob: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(blob)).read_all()


class RedisStage:
    """Staged batches in Redis with a TTL.

    A Redis that is restarting or unreachable raises `TransientError`, so the step
    is retried with back-off instead of failing the run.
    """

    def __init__(self, url: str, ttl: int) -> None:
        import redis

        self.client = redis.Redis.from_url(url)
        self.ttl = ttl
        self._errors = (
            redis.ConnectionError,
            redis.TimeoutError,
            redis.BusyLoadingError,
        )

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except self._errors as exc:
            raise TransientError(
                f"staging store unavailable: {type(exc).__name__}"
            ) from None

    def put(self, key: str, table: pa.Table) -> int:
        blob = to_ipc(table)
        self._call(self.client.set, key, blob, ex=self.ttl)
        return len(blob)

    def get(self, key: str) -> pa.Table | None:
        blob = self._call(self.client.get, key)
        return None if blob is None else from_ipc(blob)

    def delete(self, *keys: str) -> None:
        if keys:
            self._call(self.client.delete, *keys)


class FileStage:
    """Staged batches as files in a local folder; expired files count as missing."""

    def __init__(self, root: str, ttl: int) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.ttl = ttl

    def _path(self, key: str) -> Path:
        return self.root / (key.replace(":", "_") + ".arrow")

    def put(self, key: str, table: pa.Table) -> int:
        blob = to_ipc(table)
        path = self._path(key)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(blob)
        tmp.replace(path)  # atomic: a reader never sees half a batch
        return len(blob)

    def get(self, key: str) -> pa.Table | None:
        path = self._path(key)
        try:
            if time.time() - path.stat().st_mtime > self.ttl:
                path.unlink(missing_ok=True)
                return None
            return from_ipc(path.read_bytes())
        except FileNotFoundError:
            return None

    def delete(self, *keys: str) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)

    def purge_expired(self) -> int:
        """Delete staged files older than the TTL; returns how many."""
        deadline = time.time() - self.ttl
        count = 0
        for path in self.root.glob("*.arrow"):
            try:
                if path.stat().st_mtime < deadline:
                    path.unlink()
                    count += 1
            except FileNotFoundError:
                continue
        return count


@cache
def stage() -> RedisStage | FileStage:
    """The process's staging backend, from `DIS_STAGING_URL`."""
    url = settings.DIS_STAGING_URL
    ttl = settings.DIS_STAGING_TTL_SECONDS
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStage(url, ttl)
    return FileStage(urlparse(url).path, ttl)


def key(run_id: int, seq: int, token: str, part: str) -> str:
    return f"{settings.DIS_STAGING_PREFIX}:{run_id}:{seq}:{token}:{part}"
