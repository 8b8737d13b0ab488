"""API latency under a fixed rate: `GET /api/v1/runs/` and starting runs.

Usage: ``python bench/api.py [--rate 200] [--duration 60] [--pipelines 200]``

A private database and Redis database; gunicorn serving `config.wsgi` with the
production settings on PostgreSQL; no Celery worker running (runs stay queued and
their plan messages wait in Redis). `--seed-runs` runs exist before the GETs.
Each endpoint gets `--warmup` seconds at the rate, then `--duration` seconds at
the rate measured by `wrk` (Debian's wrk 4 has no rate option: `bench/wrk/rate.lua`
paces each wrk thread on a monotonic clock). The POSTs cycle over `--pipelines`
pipelines, each request with its own `Idempotency-Key`.

The per-user throttle (default 100,000/hour) is raised for the run
(`API_THROTTLE_USER`): a few runs in an hour from one token would exhaust it. The
throttle check itself still runs on every request.

Writes `bench/results/api-<timestamp>.json` and refreshes docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    BENCH,
    DATA_DIR,
    RESULTS_DIR,
    BenchDatabase,
    BenchRedis,
    CpuShares,
    RssSampler,
    django_setup,
    machine,
    manage,
    service_env,
    start_gunicorn,
    write_result,
)

LUA = BENCH / "wrk" / "rate.lua"


def setup(pipelines: int, seed_runs: int) -> list[int]:
    from django.contrib.auth import get_user_model

    from connectors.models import Connector
    from integration import services
    from integration.examples.flights import FLIGHTS_STEPS
    from integration.models import Pipeline

    get_user_model().objects.create_superuser("bench", "bench@localhost", "unused-1!")
    source = Connector.objects.create(
        name="bench-files", kind="files", config={"root": str(DATA_DIR)}
    )
    sink = Connector.objects.create(
        name="bench-sqlite",
        kind="sqlite",
        config={"path": str(RESULTS_DIR / "unused.sqlite3")},
    )
    ids = []
    for n in range(pipelines):
        pipeline = Pipeline.objects.create(
            name=f"bench-api-{n:04d}",
            source=source,
            source_options={"path": "flights_50000.csv"},
            steps=FLIGHTS_STEPS,
            sink=sink,
            sink_options={"table": f"t{n}", "write_mode": "append"},
        )
        services.freeze_version(pipeline)
        ids.append(pipeline.pk)
    for n in range(seed_runs):
        services.start_run(ids[n % len(ids)])
    return ids


def wrk(
    base: str,
    token: str,
    *,
    rate: int,
    duration: int,
    threads: int,
    connections: int,
    method: str,
    paths: list[str],
) -> dict[str, Any]:
    prefix = secrets.token_hex(6)
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        base,
        "--",
        token,
        str(rate),
        str(threads),
        method,
        prefix,
        *paths,
    ]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("BENCH_JSON "))
    raw = json.loads(line.removeprefix("BENCH_JSON "))
    seconds = raw["duration_us"] / 1e6
    return {
        "method": method,
        "requests": raw["requests"],
        "duration_s": round(seconds, 2),
        "achieved_rps": round(raw["requests"] / seconds, 1),
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p95_ms": raw["p95_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "mean_ms": round(raw["mean_us"] / 1000, 2),
        "errors": sum(raw["errors"].values()),
        "error_detail": raw["errors"],
        "wrk_stdout": out,
    }


def start_pyspy(pid: int, path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """py-spy on gunicorn and its workers, collapsed stacks into `path`."""
    pyspy = Path(sys.executable).parent / "py-spy"
    argv = [str(pyspy), "record", "--pid", str(pid), "--subprocesses"]
    argv += ["--nonblocking", "--rate", "200", "--format", "raw", "--output", str(path)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, path


def stop_pyspy(proc: subprocess.Popen[bytes], path: Path) -> dict[str, Any]:
    from bench.profile import summarize

    proc.send_signal(signal.SIGINT)
    proc.wait(60)
    summary = summarize(path)
    return {
        "file": str(path),
        "samples": summary["samples"],
        "inclusive": summary["inclusive"][:25],
        "self": summary["self"][:25],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=int, default=200, help="requests per second")
    p.add_argument("--duration", type=int, default=60, help="seconds per endpoint")
    p.add_argument("--warmup", type=int, default=5, help="seconds before each")
    p.add_argument("--pipelines", type=int, default=200)
    p.add_argument("--seed-runs", type=int, default=1000)
    p.add_argument("--gunicorn-workers", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="wrk threads")
    p.add_argument("--connections", type=int, default=32, help="wrk connections")
    p.add_argument("--note", default="")
    p.add_argument(
        "--profile", action="store_true", help="py-spy on gunicorn while measuring"
    )
    args = p.parse_args()

    before = machine()
    db = BenchDatabase("api")
    rds = BenchRedis()
    env = service_env(db, rds, API_THROTTLE_USER="100000000/hour")
    manage(env, "migrate", "--no-input", "-v0")
    django_setup(env)
    ids = setup(args.pipelines, args.seed_runs)
    token = manage(env, "create_api_token", "bench").strip().splitlines()[-1]
    logs = RESULTS_DIR / "logs" / f"api-{db.name}"
    sampler = RssSampler().start()
    api, base = start_gunicorn(
        env, logs / "gunicorn.log", workers=args.gunicorn_workers
    )
    sampler.watch("gunicorn", api.pid)

    endpoints = {
        "GET /api/v1/runs/": ("GET", ["/api/v1/runs/"]),
        "POST /api/v1/pipelines/{id}/runs/": (
            "POST",
            [f"/api/v1/pipelines/{i}/runs/" for i in ids],
        ),
    }
    results = {}
    for name, (method, paths) in endpoints.items():
        common = {
            "rate": args.rate,
            "threads": args.threads,
            "connections": args.connections,
            "method": method,
            "paths": paths,
        }
        if args.warmup:
            wrk(base, token, duration=args.warmup, **common)
        spy = (
            start_pyspy(api.pid, logs / f"{method.lower()}.txt")
            if args.profile
            else None
        )
        shares = CpuShares(api.pid).start()
        results[name] = wrk(base, token, duration=args.duration, **common)
        results[name]["cpu_per_request"] = shares.stop(results[name]["requests"])
        if spy:
            results[name]["profile"] = stop_pyspy(*spy)
        print(
            f"{name}: {results[name]['achieved_rps']} req/s, "
            f"p50 {results[name]['p50_ms']} ms, p95 {results[name]['p95_ms']} ms, "
            f"p99 {results[name]['p99_ms']} ms, errors {results[name]['errors']}; "
            f"CPU ms per request {results[name]['cpu_per_request']}",
            flush=True,
        )
    memory = sampler.stop()
    from integration.models import Run

    runs_after = Run.objects.count()
    api.stop()
    write_result(
        "api",
        {
            "rate": args.rate,
            "duration": args.duration,
            "warmup": args.warmup,
            "pipelines": args.pipelines,
            "seeded_runs": args.seed_runs,
            "runs_after": runs_after,
            "gunicorn_workers": args.gunicorn_workers,
            "wrk": {"threads": args.threads, "connections": args.connections},
            "pacing": "bench/wrk/rate.lua (delay() on CLOCK_MONOTONIC; Debian wrk 4)",
            "endpoints": results,
            "peak_rss_mb": memory,
            "note": args.note,
            "machine": before,
            "loadavg_after": os.getloadavg(),
        },
    )


if __name__ == "__main__":
    main()
