"""The locked-down in-memory DuckDB connection each compiled pipeline owns."""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

import duckdb

from transforms.engine.exceptions import EngineInterrupted, StepConfigError
from transforms.engine.sql import sql_string


def first_line(error: BaseException) -> str:
    """The first line of an error's message (DuckDB appends SQL context)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


_F = TypeVar("_F", bound=Callable[..., Any])


def _interrupted(error: BaseException) -> bool:
    """Whether `error` is DuckDB reporting that a signal stopped its query."""
    return isinstance(error, duckdb.InterruptException) or (
        type(error) is RuntimeError and str(error) == "Query interrupted"
    )


def interruptible(method: _F) -> _F:
    """Raise `EngineInterrupted` where DuckDB reports an interrupted query, instead
    of the bare `RuntimeError` a caller would take for a failure of the batch."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except (RuntimeError, duckdb.InterruptException) as exc:
            if _interrupted(exc):
                raise EngineInterrupted(
                    "the query was interrupted by a signal to this process"
                ) from exc
            raise

    return wrapper  # type: ignore[return-value]


def spill_directory() -> str:
    """Where DuckDB writes what does not fit in `memory_limit`: a directory of
    this process under the system's temporary directory. DuckDB's own default is
    `.tmp` in the working directory, which a container's read-only root refuses
    (the image writes only to /tmp) and which every process started there would
    share. DuckDB creates it on the first spill and removes its files on close."""
    return os.path.join(tempfile.gettempdir(), f"dis-duckdb-{os.getpid()}")


def connect(
    *, timezone: str, threads: int, memory_limit: str
) -> duckdb.DuckDBPyConnection:
    """Open an in-memory DuckDB connection that cannot reach the outside.

    No file or network access, no extension loading or installing, and the
    configuration is locked so SQL cannot undo any of it.

    Args:
        timezone: IANA time zone of the session (``TimeZone``).
        threads: DuckDB worker threads.
        memory_limit: DuckDB memory limit, e.g. ``"1GB"``.

    Returns:
        The open connection.

    Raises:
        StepConfigError: a parameter is invalid (unknown time zone, ...).
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise StepConfigError("threads", "must be a positive integer")
    config: dict[str, Any] = {
        "enable_external_access": False,
        "autoload_known_extensions": False,
        "autoinstall_known_extensions": False,
        "allow_community_extensions": False,
        "threads": threads,
        "memory_limit": memory_limit,
        "temp_directory": spill_directory(),
    }
    try:
        con = duckdb.connect(":memory:", config=config)
    except duckdb.Error as error:
        raise StepConfigError("memory_limit", first_line(error)) from error
    try:
        # TimeZone belongs to the ICU extension, which is only loaded once the
        # database is open, so it cannot be passed in `config`.
        con.execute(f"SET TimeZone = {sql_string(timezone)}")
        con.execute("SET lock_configuration = true")
    except duckdb.Error as error:
        con.close()
        raise StepConfigError("timezone", f"unknown time zone {timezone!r}") from error
    return con
