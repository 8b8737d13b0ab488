"""Batch end to end through the real service: API -> Celery workers -> PostgreSQL.

Usage::

    python bench/batch.py --rows 1000000 [--mode append|upsert]
                          [--workers 1 --concurrency 2] [--chunk-rows 50000]

Creates a private database and Redis database, migrates, creates the connectors
(files source on `bench/data`, postgres sink on the bench database) and the
flights pipeline of `integration/examples/flights.py` (20 mapped fields with
strict casts and derived fields, 4 validation rules) with enrich by carrier from the
`airlines` reference between the map and the rules, starts gunicorn
(`config.wsgi`, production settings) and N Celery worker processes on Redis, then
times `POST /api/v1/pipelines/{id}/runs/` until `GET /api/v1/runs/{id}/` shows a
terminal state. Peak RSS of every process is sampled from `/proc`. Writes
`bench/results/batch-<mode>-<timestamp>.json` and refreshes docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import data
from bench.common import (
    DATA_DIR,
    DOC,
    RESULTS_DIR,
    ROOT,
    BenchDatabase,
    BenchRedis,
    RssSampler,
    api_call,
    django_setup,
    machine,
    manage,
    postmaster_pid,
    self_peak_rss_mb,
    service_env,
    start_gunicorn,
    start_worker,
    write_result,
)

TERMINAL = {"succeeded", "succeeded_with_errors", "failed", "cancelled"}
KEY = ["time_hour", "carrier", "flight"]
TABLE = "flights"


#: Enrich by carrier from the `airlines` reference (bench/data/airlines.csv).
ENRICH_STEP: dict[str, Any] = {
    "type": "enrich",
    "reference": "airlines",
    "on": {"carrier": "carrier"},
    "fields": [{"name": "airline_name", "expr": "name", "type": "string"}],
}
REFERENCES = {
    "airlines": {"connector": "bench-files", "options": {"path": "airlines.csv"}}
}


def enrich_supported() -> bool:
    """Whether the engine and pipelines offer `enrich` (added by another issue)."""
    from integration.models import Pipeline

    text = (ROOT / "docs" / "transforms.md").read_text()
    fields = {f.name for f in Pipeline._meta.get_fields()}
    return "## Enrich" in text and "references" in fields


def pipeline_steps(enrich: bool) -> list[dict[str, Any]]:
    """The flights example's map and rules, with enrich by carrier between them."""
    from integration.examples.flights import FLIGHTS_STEPS

    mapping, *rest = FLIGHTS_STEPS
    return [mapping, ENRICH_STEP, *rest] if enrich else list(FLIGHTS_STEPS)


def setup_pipeline(args: argparse.Namespace, db: BenchDatabase) -> tuple[int, str]:
    """Connectors, pipeline and an API token in the bench database."""
    from django.contrib.auth import get_user_model

    from connectors.models import Connector
    from integration import services
    from integration.models import Pipeline

    user_model = get_user_model()
    user_model.objects.create_superuser("bench", "bench@localhost", "unused-pw-1!")
    source = Connector.objects.create(
        name="bench-files", kind="files", config={"root": str(DATA_DIR)}
    )
    sink = Connector.objects.create(
        name="bench-postgres",
        kind="postgres",
        config={
            "host": "127.0.0.1",
            "port": 5432,
            "database": db.name,
            "user": "postgres",
        },
    )
    sink_options: dict[str, Any] = {"table": TABLE, "write_mode": args.mode}
    if args.mode == "upsert":
        sink_options["key"] = KEY
    extra = {"references": REFERENCES} if args.enrich else {}
    pipeline = Pipeline.objects.create(
        name=f"bench-flights-{args.mode}",
        source=source,
        source_options={"path": data.csv_path(args.rows).name},
        steps=pipeline_steps(args.enrich),
        **extra,
        sink=sink,
        sink_options=sink_options,
        chunk_rows=args.chunk_rows,
        max_in_flight=args.window,
        max_rejected_ratio=0.01,
    )
    services.freeze_version(pipeline)
    return pipeline.pk, ""


TASK_LINE = re.compile(
    r"Task (integration\.\w+)\[[^\]]+\] succeeded in ([0-9.]+)s", re.ASCII
)


def task_times(logs: list[Path]) -> dict[str, Any]:
    """Per task name: count, total and mean seconds, from the workers' logs."""
    times: dict[str, list[float]] = defaultdict(list)
    for log in logs:
        for match in TASK_LINE.finditer(log.read_text(errors="replace")):
            times[match.group(1)].append(float(match.group(2)))
    return {
        name: {
            "count": len(values),
            "total_s": round(sum(values), 2),
            "mean_s": round(statistics.fmean(values), 3),
        }
        for name, values in sorted(times.items())
    }


def chunk_times(run_id: int) -> dict[str, Any]:
    from integration.models import ChunkRun, Run

    run = Run.objects.get(pk=run_id)
    chunks = list(ChunkRun.objects.filter(run_id=run_id).order_by("seq"))
    walls = [
        (c.finished_at - c.started_at).total_seconds()
        for c in chunks
        if c.started_at and c.finished_at
    ]
    first_start = min((c.started_at for c in chunks if c.started_at), default=None)
    return {
        "chunks": len(chunks),
        "attempts": sum(c.attempts for c in chunks),
        "chunk_wall_mean_s": round(statistics.fmean(walls), 3) if walls else None,
        "chunk_wall_max_s": round(max(walls), 3) if walls else None,
        "created_to_first_chunk_s": (
            round((first_start - run.created_at).total_seconds(), 3)
            if first_start
            else None
        ),
        "last_chunk_to_finished_s": (
            round(
                (
                    run.finished_at
                    - max(c.finished_at for c in chunks if c.finished_at)
                ).total_seconds(),
                3,
            )
            if run.finished_at and chunks and all(c.finished_at for c in chunks)
            else None
        ),
    }


def export_transformed(db: BenchDatabase, path: Path) -> None:
    """The sink table as CSV (what the run loaded), for `bench/limits.py`."""
    tmp = path.with_suffix(".tmp")
    with db.connect() as conn, conn.cursor() as cur, tmp.open("wb") as out:
        cur.execute("SET timezone = 'UTC'")
        with cur.copy(f'COPY "{TABLE}" TO STDOUT (FORMAT csv, HEADER)') as copy:
            for block in copy:
                out.write(block)
    tmp.replace(path)
    print(f"exported the sink table to {path.relative_to(ROOT)}")


def run_batch(
    args: argparse.Namespace,
    on_workers: Callable[[list[int]], Callable[[], dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Run the scenario once; the result (not yet written).

    `on_workers` is called with the worker main PIDs before the run starts and
    returns a function called after it ends (the profiler uses it).
    """
    data.ensure(args.rows)
    db = BenchDatabase(args.mode)
    rds = BenchRedis()
    env = service_env(db, rds)
    before = machine()
    manage(env, "migrate", "--no-input", "-v0")
    django_setup(env)
    if args.enrich is None:
        args.enrich = enrich_supported()
    pipeline_id, _ = setup_pipeline(args, db)
    token = manage(env, "create_api_token", "bench").strip().splitlines()[-1]
    logs = RESULTS_DIR / "logs" / f"batch-{db.name}"
    sampler = RssSampler().start()
    sampler.watch("bench client", os.getpid(), descendants=False)
    api, base = start_gunicorn(env, logs / "gunicorn.log", workers=2)
    sampler.watch("gunicorn", api.pid)
    workers = []
    for n in range(args.workers):
        worker = start_worker(
            env, logs / f"worker{n}.log", name=f"bench{n}", concurrency=args.concurrency
        )
        sampler.watch(f"worker{n}", worker.pid)
        workers.append(worker)
    time.sleep(1)  # let the pool children finish importing before the clock starts
    after_hook = on_workers([w.pid for w in workers]) if on_workers else None

    with db.connect() as conn:
        postgres = postmaster_pid(conn)
    if postgres is not None:
        sampler.watch("postgres", postgres)  # every backend and helper process
    cpu_mark = sampler.cpu_mark()
    start = time.perf_counter()
    run = api_call(base, "POST", f"/api/v1/pipelines/{pipeline_id}/runs/", token, {})
    while run["state"] not in TERMINAL:
        time.sleep(0.1)
        run = api_call(base, "GET", f"/api/v1/runs/{run['id']}/", token)
        if time.perf_counter() - start > args.timeout:
            raise SystemExit(f"run {run['id']} not finished after {args.timeout} s")
    seconds = time.perf_counter() - start
    cpu = sampler.cpu_since(cpu_mark)
    profile = after_hook() if after_hook else None
    memory = sampler.stop()

    with db.connect() as conn:
        (rows_in_sink,) = conn.execute(f'SELECT count(*) FROM "{TABLE}"').fetchone()
    if args.export or args.mode == "append":
        export_transformed(db, DATA_DIR / f"transformed_{args.rows}.csv")
    for worker in workers:
        worker.stop()
    api.stop()
    worker_rss = [
        p["peak_rss_mb"] for p in memory["processes"] if p["tree"].startswith("worker")
    ]
    records = run["records_written"]
    return {
        "rows": args.rows,
        "mode": args.mode,
        "workers": args.workers,
        "concurrency": args.concurrency,
        "chunk_rows": args.chunk_rows,
        "window": args.window,
        "api_server": "gunicorn config.wsgi --workers 2 (production settings)",
        "steps": "flights example: map 20 fields (casts, derived)"
        + (" + enrich by carrier (airlines)" if args.enrich else "")
        + " + 4 rules",
        "enrich": args.enrich,
        "run": {
            k: run.get(k)
            for k in (
                "id",
                "state",
                "error",
                "records_read",
                "records_written",
                "records_rejected",
                "chunks_total",
                "chunks_done",
                "duration_seconds",
            )
        },
        "rows_in_sink": rows_in_sink,
        "records": records,
        "seconds": round(seconds, 3),
        "records_per_s": round(records / seconds),
        "peak_rss_mb": memory,
        "worker_peak_rss_mb_max": max(worker_rss, default=None),
        # CPU seconds each process tree used from the API call to the terminal
        # state; on a CPU-bound run their sum over `seconds` x CPUs is how busy
        # the machine was, and the split says where the time went.
        "cpu_seconds": cpu,
        "client_peak_rss_mb": self_peak_rss_mb(),
        "tasks": task_times([w.log_path for w in workers]),
        "chunk_timing": chunk_times(run["id"]),
        "profile": profile,
        "note": args.note,
        "machine": before,
        "loadavg_after": os.getloadavg(),
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--mode", choices=["append", "upsert"], default="append")
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_argument(
        "--concurrency", type=int, default=2, help="pool processes per worker"
    )
    p.add_argument("--chunk-rows", type=int, default=50_000)
    p.add_argument("--window", type=int, default=4, help="chunks in flight")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--export", action="store_true", help="export the sink as CSV")
    p.add_argument("--note", default="", help="e.g. 'measured under load'")
    p.add_argument(
        "--enrich",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="enrich by carrier (default: when the engine offers enrich)",
    )
    return p


def main() -> None:
    args = parser().parse_args()
    result = run_batch(args)
    write_result(f"batch-{args.mode}", result)
    print(
        f"{result['records']:,} records in {result['seconds']:.1f} s = "
        f"{result['records_per_s']:,} records/s ({result['run']['state']}); "
        f"worker peak RSS max {result['worker_peak_rss_mb_max']} MB; "
        f"see {DOC.relative_to(ROOT)}"
    )
    cpu = result["cpu_seconds"]
    workers = sum(v for k, v in cpu.items() if k.startswith("worker"))
    print(
        f"CPU seconds during the run: workers {workers:.2f}, "
        + ", ".join(
            f"{k} {v:.2f}" for k, v in cpu.items() if not k.startswith("worker")
        )
        + f" ({os.cpu_count()} CPUs x {result['seconds']:.1f} s available)"
    )
    if result["run"]["state"] != "succeeded" or result["rows_in_sink"] != args.rows:
        raise SystemExit(
            f"unexpected: state {result['run']['state']}, "
            f"{result['rows_in_sink']} rows in the sink"
        )


if __name__ == "__main__":
    main()
