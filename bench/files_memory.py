"""Peak memory of the files source on a 2,000,000-row file (CSV, gzip CSV, Parquet).

Generates the files under a temporary directory (20 columns: ints, floats, short
and longer strings, dates as text), then, for each format, runs `plan()` and
`read()` of every chunk in a fresh subprocess and reports that process's peak
resident set (VmHWM), its baseline after imports, rows read and the time taken.

    .venv/bin/python bench/files_memory.py [--rows 2000000] [--chunk-rows 50000]

The acceptance target is a peak under 400 MB for CSV and Parquet.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = 20
GENERATE_STEP = 100_000


def generate(directory: Path, rows: int) -> dict[str, Path]:
    """Write the CSV, gzip CSV and Parquet files, `GENERATE_STEP` rows at a time."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    paths = {
        "csv": directory / "big.csv",
        "csv.gz": directory / "big.csv.gz",
        "parquet": directory / "big.parquet",
    }
    rng = np.random.default_rng(7)

    def make_table(start: int, n: int) -> pa.Table:
        ids = np.arange(start + 1, start + n + 1, dtype=np.int64)
        columns: dict[str, pa.Array] = {"id": pa.array(ids)}
        for i in range(1, COLUMNS):
            kind = i % 4
            if kind == 0:
                columns[f"c{i}"] = pa.array(rng.integers(0, 1_000_000, n))
            elif kind == 1:
                columns[f"c{i}"] = pa.array(rng.random(n) * 1000)
            elif kind == 2:
                codes = pa.array(rng.integers(0, 1000, n)).cast(pa.string())
                columns[f"c{i}"] = pc.binary_join_element_wise("name-", codes, "")
            else:
                days = pa.array(rng.integers(0, 20_000, n).astype(np.int32))
                columns[f"c{i}"] = days.cast(pa.date32()).cast(pa.string())
        return pa.table(columns)

    schema = make_table(0, 1).schema
    with (
        pa.OSFile(str(paths["csv"]), "wb") as csv_out,
        pa.CompressedOutputStream(str(paths["csv.gz"]), "gzip") as gz_out,
        pacsv.CSVWriter(csv_out, schema) as csv_writer,
        pacsv.CSVWriter(gz_out, schema) as gz_writer,
        pq.ParquetWriter(str(paths["parquet"]), schema) as parquet_writer,
    ):
        for start in range(0, rows, GENERATE_STEP):
            table = make_table(start, min(GENERATE_STEP, rows - start))
            csv_writer.write_table(table)
            gz_writer.write_table(table)
            parquet_writer.write_table(table, row_group_size=250_000)
    return paths


def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(root: str, name: str, fmt: str, chunk_rows: int) -> None:
    """(In the child) plan and read every chunk; print one JSON line of figures."""
    sys.path.insert(0, str(ROOT))
    from connectors.plugins.files import FilesPlugin

    source = FilesPlugin.source(FilesPlugin.load_config({"root": root, "format": fmt}))
    baseline = _vm_hwm_mb()
    started = time.perf_counter()
    options = {"path": name}
    chunks = rows = 0
    for chunk in source.plan(options, chunk_rows=chunk_rows):
        chunks += 1
        for batch in source.read(options, chunk):
            rows += batch.num_rows
    elapsed = time.perf_counter() - started
    print(
        json.dumps(
            {
                "file": name,
                "rows": rows,
                "chunks": chunks,
                "seconds": round(elapsed, 2),
                "baseline_mb": round(baseline, 1),
                "peak_rss_mb": round(_vm_hwm_mb(), 1),
            }
        )
    )


def main() -> None:
    """Generate the files, measure each in a subprocess, print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--chunk-rows", type=int, default=50_000)
    parser.add_argument("--child", nargs=3, metavar=("ROOT", "NAME", "FORMAT"))
    args = parser.parse_args()
    if args.child:
        measure(*args.child, chunk_rows=args.chunk_rows)
        return
    with tempfile.TemporaryDirectory(prefix="files-memory-") as tmp:
        directory = Path(tmp)
        started = time.perf_counter()
        paths = generate(directory, args.rows)
        sizes = {k: round(p.stat().st_size / 2**20, 1) for k, p in paths.items()}
        print(f"generated in {time.perf_counter() - started:.1f}s; MiB: {sizes}")
        for key, fmt in (("csv", "csv"), ("parquet", "parquet"), ("csv.gz", "csv")):
            result = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--chunk-rows",
                    str(args.chunk_rows),
                    "--child",
                    str(directory),
                    paths[key].name,
                    fmt,
                ],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            print(result.stdout.strip())


if __name__ == "__main__":
    main()
