"""The limits, on the same transformed rows: PostgreSQL COPY and dlt.

Usage: ``python bench/limits.py --rows 1000000 [--loaders copy dlt-arrow dlt-dicts]``

The rows are the ones the batch scenario loaded: `bench/data/transformed_<rows>.csv`,
exported from its sink table by `bench/batch.py` (system columns included, so every
loader writes the same 23 columns). Without that file the flights CSV is
transformed here with the engine directly (the same steps, enrich included, and
the same columns).

Each loader runs in its own fresh process (its peak RSS is its own) into a private
database, timed from the first byte to the commit:

- `copy`: `COPY ... FROM STDIN (FORMAT csv)` of that CSV through psycopg into an
  empty table without indexes: the physical limit of loading;
- `dlt-arrow`: dlt (`dlt[postgres]`) loading a `pyarrow.Table` with the `csv` loader
  file format (Arrow writes CSV, PostgreSQL COPYs it);
- `dlt-arrow-parquet`: the same table with the `parquet` loader file format, which
  dlt loads through the ADBC driver (`adbc-driver-postgresql`; dlt's documented
  fast path for Arrow into PostgreSQL);
- `dlt-dicts`: dlt loading the same rows as plain dicts (built before the clock
  starts), with its default `insert_values` loader file format.

Writes `bench/results/limits-<timestamp>.json` with our records/s as ratios:
ours / COPY, ours / dlt (ours = the latest `batch-append` result of the same size).
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import data
from bench.common import (
    DATA_DIR,
    PYTHON,
    ROOT,
    BenchDatabase,
    RssSampler,
    load_results,
    machine,
    pg_connect,
    self_peak_rss_mb,
    write_result,
)

LOADERS = ("copy", "dlt-arrow", "dlt-arrow-parquet", "dlt-dicts")
PG_TYPES = {
    "int64": "bigint",
    "double": "double precision",
    "string": "text",
    "bool": "boolean",
    "timestamp[s, tz=UTC]": "timestamptz",
    "timestamp[us, tz=UTC]": "timestamptz",
}


def transformed_path(rows: int) -> Path:
    return DATA_DIR / f"transformed_{rows}.csv"


def read_transformed(path: Path) -> Any:
    """The transformed CSV as a typed Arrow table (timestamps UTC, booleans t/f)."""
    import pyarrow.csv as pacsv

    return pacsv.read_csv(
        path,
        convert_options=pacsv.ConvertOptions(
            true_values=["t", "true"], false_values=["f", "false"]
        ),
    )


def transform_with_engine(rows: int, path: Path, chunk_rows: int = 50_000) -> None:
    """The fallback: the flights steps run by the engine over the source CSV."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from bench.batch import pipeline_steps
    from integration.examples.flights import FLIGHT_COLUMNS
    from transforms.engine import compile_steps

    source = data.ensure(rows)
    table = pacsv.read_csv(
        source,
        convert_options=pacsv.ConvertOptions(
            column_types=dict.fromkeys(FLIGHT_COLUMNS, pa.string()),
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
        ),
    )
    refs = pa.array([f"{source.name}#{n}" for n in range(1, table.num_rows + 1)])
    table = table.append_column("_source_ref", refs)
    airlines = pacsv.read_csv(
        DATA_DIR / "airlines.csv",
        convert_options=pacsv.ConvertOptions(
            column_types={"carrier": pa.string(), "name": pa.string()}
        ),
    )
    parts = []
    with compile_steps(pipeline_steps(enrich=True), timezone="UTC") as compiled:
        for seq, start in enumerate(range(0, table.num_rows, chunk_rows)):
            batch = table.slice(start, chunk_rows)
            out = compiled.run(batch, references={"airlines": airlines}).output
            ref = out.column("_source_ref")
            out = out.drop_columns(["_source_ref"])
            out = out.append_column("_run_id", pa.array([1] * out.num_rows, pa.int64()))
            out = out.append_column(
                "_chunk_seq", pa.array([seq] * out.num_rows, pa.int64())
            )
            parts.append(out.append_column("_source_ref", ref))
    result = pa.concat_tables(parts)
    tmp = path.with_suffix(".tmp")
    pacsv.write_csv(result, tmp)
    tmp.replace(path)
    print(f"transformed {result.num_rows:,} rows with the engine into {path.name}")


def create_table(conn: Any, name: str, schema: Any) -> None:
    columns = ", ".join(
        f'"{field.name}" {PG_TYPES.get(str(field.type), "text")}' for field in schema
    )
    conn.execute(f'CREATE TABLE "{name}" ({columns})')
    conn.commit()


# --- the loaders (each in its own process) -------------------------------------


def child_copy(db: str, path: Path) -> dict[str, Any]:
    import pyarrow.csv as pacsv

    schema = read_transformed_schema(path, pacsv)
    with pg_connect(db) as conn:
        create_table(conn, "flights_copy", schema)
        start = time.perf_counter()
        with (
            conn.cursor() as cur,
            cur.copy('COPY "flights_copy" FROM STDIN (FORMAT csv, HEADER)') as copy,
            path.open("rb") as fh,
        ):
            while block := fh.read(1 << 20):
                copy.write(block)
        conn.commit()
        seconds = time.perf_counter() - start
        (records,) = conn.execute('SELECT count(*) FROM "flights_copy"').fetchone()
    return {"seconds": seconds, "records": records}


def read_transformed_schema(path: Path, pacsv: Any) -> Any:
    with pacsv.open_csv(
        path,
        convert_options=pacsv.ConvertOptions(
            true_values=["t", "true"], false_values=["f", "false"]
        ),
    ) as reader:
        return reader.schema


def _dlt_pipeline(db: str, name: str) -> Any:
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
    import dlt

    return dlt.pipeline(
        pipeline_name=name,
        destination=dlt.destinations.postgres(
            credentials=f"postgresql://postgres:trust-auth-unused@127.0.0.1:5432/{db}"
        ),
        dataset_name=name,
        pipelines_dir=tempfile.mkdtemp(prefix="dlt-bench-"),
    )


def _dlt_records(pipeline: Any, table: str) -> int:
    with pipeline.sql_client() as client:
        return client.execute_sql(f"SELECT count(*) FROM {table}")[0][0]


def child_dlt_arrow(db: str, path: Path, file_format: str = "csv") -> dict[str, Any]:
    table = read_transformed(path)
    pipeline = _dlt_pipeline(db, f"dlt_arrow_{file_format}")
    start = time.perf_counter()
    info = pipeline.run(table, table_name="flights", loader_file_format=file_format)
    seconds = time.perf_counter() - start
    info.raise_on_failed_jobs()
    return {
        "seconds": seconds,
        "records": _dlt_records(pipeline, "flights"),
        "loader_file_format": file_format,
    }


def child_dlt_arrow_parquet(db: str, path: Path) -> dict[str, Any]:
    """Parquet files loaded by the ADBC PostgreSQL driver (adbc-driver-postgresql)."""
    return child_dlt_arrow(db, path, "parquet")


def child_dlt_dicts(db: str, path: Path) -> dict[str, Any]:
    table = read_transformed(path)
    build = time.perf_counter()
    rows = table.to_pylist()
    build = time.perf_counter() - build
    del table
    pipeline = _dlt_pipeline(db, "dlt_dicts")
    start = time.perf_counter()
    info = pipeline.run(rows, table_name="flights")
    seconds = time.perf_counter() - start
    info.raise_on_failed_jobs()
    return {
        "seconds": seconds,
        "records": _dlt_records(pipeline, "flights"),
        "loader_file_format": "insert_values (default)",
        "dicts_built_before_clock_s": round(build, 2),
    }


CHILDREN = {
    "copy": child_copy,
    "dlt-arrow": child_dlt_arrow,
    "dlt-arrow-parquet": child_dlt_arrow_parquet,
    "dlt-dicts": child_dlt_dicts,
}


def run_child(name: str, db: BenchDatabase, path: Path) -> dict[str, Any]:
    sampler = RssSampler().start()
    proc = subprocess.Popen(
        [PYTHON, __file__, "--child", name, "--db", db.name, "--csv", str(path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    sampler.watch(name, proc.pid)
    out, _ = proc.communicate()
    memory = sampler.stop()
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {out[-2000:]}"}
    result = json.loads(out.strip().splitlines()[-1])
    result["records_per_s"] = round(result["records"] / result["seconds"])
    result["seconds"] = round(result["seconds"], 3)
    result["peak_rss_mb_sampled"] = memory["tree_peak_rss_mb"].get(name)
    return result


def ours(rows: int) -> dict[str, Any] | None:
    batch = [
        r
        for r in load_results("batch-append")
        if r["rows"] == rows and r["run"]["state"] == "succeeded"
    ]
    if not batch:
        return None
    r = batch[-1]
    return {
        "file": r["_file"],
        "seconds": r["seconds"],
        "records_per_s": r["records_per_s"],
        "workers": r["workers"],
        "concurrency": r["concurrency"],
        "worker_peak_rss_mb_max": r.get("worker_peak_rss_mb_max"),
        "measured_at": r["measured_at"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--loaders", nargs="+", choices=LOADERS, default=list(LOADERS))
    p.add_argument("--note", default="")
    p.add_argument("--child", choices=LOADERS, help=argparse.SUPPRESS)
    p.add_argument("--db", help=argparse.SUPPRESS)
    p.add_argument("--csv", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        result = CHILDREN[args.child](args.db, args.csv)
        result["peak_rss_mb"] = self_peak_rss_mb()
        print(json.dumps(result))
        return

    path = transformed_path(args.rows)
    origin = "exported from the batch-append sink table"
    if not path.exists():
        transform_with_engine(args.rows, path)
        origin = "transformed by transforms.engine in bench/limits.py"
    before = machine()
    db = BenchDatabase("limits")
    loaders = {}
    for name in args.loaders:
        print(f"{name} ...", flush=True)
        loaders[name] = run_child(name, db, path)
        print(f"{name}: {loaders[name]}", flush=True)
    mine = ours(args.rows)
    ratios = {}
    if mine:
        for name, m in loaders.items():
            if m.get("records_per_s"):
                ratios[f"ours/{name}"] = round(
                    mine["records_per_s"] / m["records_per_s"], 3
                )
    write_result(
        "limits",
        {
            "rows": args.rows,
            "input": f"{path.relative_to(ROOT)} ({origin})",
            "loaders": loaders,
            "ours": mine,
            "ratios": ratios,
            "note": args.note,
            "machine": before,
            "loadavg_after": os.getloadavg(),
        },
    )
    print(json.dumps({"loaders": loaders, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
