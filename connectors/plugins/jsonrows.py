"""Typed columns from JSON objects, shared by the files and Kafka readers.

A batch of JSON objects is parsed by Arrow against the declared schema in one go;
when that fails, the input is halved around the failures so only the bad objects
get an error. Pure Python (no Django).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

ARROW_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError)


def read_json_isolating(
    objects: list[tuple[int, bytes]], schema: pa.Schema, errors: list[str | None]
) -> pa.Table:
    """Parse the objects (record index, one JSON object without newlines),
    halving the input around failures to isolate bad ones.

    A record whose field has the wrong JSON type (a string where an integer is
    declared) gets an error in `errors`; the others are parsed exactly as on the
    fast path.
    """
    if not objects:
        return schema.empty_table()
    lines = [line for _, line in objects]
    try:
        table = pajson.read_json(
            pa.py_buffer(b"\n".join(lines)),
            parse_options=pajson.ParseOptions(
                explicit_schema=schema, unexpected_field_behavior="ignore"
            ),
        )
        if table.num_rows == len(lines):
            return table
        failure = f"expected one JSON object, found {table.num_rows}"
    except ARROW_ERRORS as exc:
        failure = str(exc).removeprefix("JSON parse error: ")
    if len(objects) == 1:
        errors[objects[0][0]] = f"invalid JSON value: {failure}"
        return schema.empty_table()
    half = len(objects) // 2
    left = read_json_isolating(objects[:half], schema, errors)
    right = read_json_isolating(objects[half:], schema, errors)
    return pa.concat_tables([left, right])


def to_dates(name: str, column: pa.Array, errors: list[str | None]) -> pa.Array:
    """`YYYY-MM-DD` strings to dates; another text is that row's error."""
    parsed = pc.strptime(column, format="%Y-%m-%d", unit="s", error_is_null=True)
    failed = pc.and_(pc.is_valid(column), pc.is_null(parsed))
    for i in np.flatnonzero(failed.to_numpy(zero_copy_only=False)).tolist():
        if errors[i] is None:
            errors[i] = (
                f"field {name!r}: {column[i].as_py()!r} is not a YYYY-MM-DD date"
            )
    return parsed.cast(pa.date32())
