"""Small helpers that render identifiers and literals as DuckDB SQL."""

from __future__ import annotations

import math

Scalar = str | int | float | bool


def quote_ident(name: str) -> str:
    """Return ``name`` as a double-quoted DuckDB identifier."""
    return '"' + name.replace('"', '""') + '"'


def sql_string(value: str) -> str:
    """Return ``value`` as a single-quoted DuckDB string literal."""
    return "'" + value.replace("'", "''") + "'"


def sql_scalar(value: Scalar) -> str:
    """Return a JSON scalar (str, int, float, bool) as a DuckDB literal.

    Raises:
        ValueError: for a non-finite float or an unsupported Python type.
    """
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a finite number")
        return repr(value)
    if isinstance(value, str):
        return sql_string(value)
    raise ValueError(f"{value!r} is not a string, number or boolean")


def render_scalar(value: Scalar) -> str:
    """Return a config scalar the way messages print it (``20000``, ``EWR``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
