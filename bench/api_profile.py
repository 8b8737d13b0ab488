"""What one API request costs, measured in-process: CPU, queries, PostgreSQL time.

Usage: ``python bench/api_profile.py [--requests 1000] [--profile cprofile]``

The same setup as `bench/api.py` (a private database and Redis database, the
production settings, 200 pipelines, 1000 queued runs, no worker), but no gunicorn
and no wrk: this process calls `config.wsgi.application` (every middleware
included) with WSGI environs like gunicorn builds them, `--requests` times for
`GET /api/v1/runs/`, as many `POST /api/v1/pipelines/{id}/runs/` (each with its
own `Idempotency-Key`, cycling over the pipelines) and as many
`GET /api/v1/runs/{id}/` of a running run with 20 chunks (what `bench/batch.py`
polls while a run works), in `--rounds` alternating
rounds, and shows each endpoint's cheapest round (other processes on a shared
machine only ever add to CPU time). Per request it reports:

- `cpu_ms`: this process's CPU time (`time.process_time`);
- `pg_ms`: CPU time of the PostgreSQL backends serving this process (utime+stime
  from `/proc/<pid>/stat`; PostgreSQL must run on this machine);
- `redis_ms`: CPU time of the `redis-server` process (shared with anything else
  using it: indicative only);
- `queries`: SQL statements through Django's cursors (not counted: BEGIN/COMMIT
  and the `SELECT 1` of `CONN_HEALTH_CHECKS`), and `connections`: database
  connections opened while measuring (0 when `CONN_MAX_AGE` keeps them);
- `msgs`: Celery messages that reached the `control` queue in Redis.

CPU time and query counts do not depend on what else runs on the machine, unlike
wall-clock latency under load. `--profile cprofile` (or `pyinstrument`, if
installed) writes a profile of each endpoint's measured requests to
`bench/results/logs/`. Prints a table and the statements seen (`--explain`: the
plans of those without parameters); writes no result file and leaves
docs/benchmarks.md alone.

`--gunicorn` sends the same requests over HTTP, one at a time, to gunicorn with
one sync worker, and reports that worker's CPU ms (its HTTP handling and socket
writes included) and its PostgreSQL backend's, per request.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import secrets
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    RESULTS_DIR,
    BenchDatabase,
    BenchRedis,
    cpu_seconds,
    django_setup,
    manage,
    pids_named,
    service_env,
)


def _proc_cpu_ms(pid: int) -> float:
    """utime + stime of a process in ms (0 when it is gone or not readable)."""
    return (cpu_seconds(pid) or 0.0) * 1000


class Probe:
    """Counts statements and connections; remembers the backends' pids."""

    def __init__(self) -> None:
        self.queries: Counter[str] = Counter()
        self.backends: set[int] = set()
        self.connections = 0

    def __call__(
        self, execute: Callable[..., Any], sql: str, params: Any, many: bool, ctx: Any
    ) -> Any:
        self.queries[sql] += 1
        raw = ctx["connection"].connection
        if raw is not None:
            self.backends.add(raw.info.backend_pid)
        return execute(sql, params, many, ctx)

    def connected(self, **kwargs: Any) -> None:
        self.connections += 1


def environ(
    method: str, path: str, token: str, body: bytes = b"", **headers: str
) -> dict[str, Any]:
    """A WSGI environ like gunicorn's for a request from 127.0.0.1."""
    env: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "127.0.0.1:8000",
        "HTTP_AUTHORIZATION": f"Token {token}",
        "HTTP_ACCEPT": "*/*",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    if body:
        env["CONTENT_TYPE"] = "application/json"
        env["CONTENT_LENGTH"] = str(len(body))
    for name, value in headers.items():
        env["HTTP_" + name.upper().replace("-", "_")] = value
    return env


def call(app: Any, env: dict[str, Any]) -> tuple[int, bytes]:
    status: list[str] = []
    result = app(env, lambda s, h, exc_info=None: status.append(s))
    try:
        body = b"".join(result)
    finally:
        if hasattr(result, "close"):
            result.close()  # request_finished: Django closes or keeps the connection
    return int(status[0].split()[0]), body


def measure(
    name: str,
    n: int,
    make: Callable[[int], dict[str, Any]],
    app: Any,
    probe: Probe,
    redis_pid: int | None,
    expect: tuple[int, ...],
    profiler: Any = None,
    queued: Callable[[], int] = lambda: 0,
) -> dict[str, Any]:
    probe.queries.clear()
    probe.connections = 0
    queued_before = queued()
    environs = [make(i) for i in range(n)]
    pg_before = {pid: _proc_cpu_ms(pid) for pid in probe.backends}
    redis_before = _proc_cpu_ms(redis_pid) if redis_pid else 0.0
    if profiler is not None:
        profiler.start()
    started_cpu, started = time.process_time(), time.perf_counter()
    for env in environs:
        status, body = call(app, env)
        if status not in expect:
            raise SystemExit(f"{name}: HTTP {status}: {body[:500]!r}")
    cpu, wall = time.process_time() - started_cpu, time.perf_counter() - started
    if profiler is not None:
        profiler.stop()
    # A backend that started while measuring counts whole; one that ended
    # (`CONN_MAX_AGE` reached: see `connections`) is lost since its last reading.
    now = {pid: _proc_cpu_ms(pid) for pid in probe.backends}
    pg = sum(ms - pg_before.get(pid, 0.0) for pid, ms in now.items() if ms)
    redis = (_proc_cpu_ms(redis_pid) - redis_before) if redis_pid else None
    return {
        "endpoint": name,
        "requests": n,
        "cpu_ms": round(cpu * 1000 / n, 3),
        "wall_ms": round(wall * 1000 / n, 3),
        "pg_ms": round(pg / n, 3),
        "redis_ms": round(redis / n, 3) if redis is not None else None,
        "total_ms": round(cpu * 1000 / n + pg / n, 3),
        "queries": round(sum(probe.queries.values()) / n, 2),
        "messages": round((queued() - queued_before) / n, 2),
        "connections": probe.connections,
        "statements": probe.queries.most_common(),
    }


def explain(statements: list[tuple[str, int]]) -> None:
    """EXPLAIN ANALYZE of each distinct read statement seen (params are unknown,
    so only statements without parameters are explained)."""
    from django.db import connection

    with connection.cursor() as cursor:
        for sql, _ in statements:
            if not sql.lstrip().upper().startswith("SELECT") or "%s" in sql:
                continue
            cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql)
            plan = "\n    ".join(row[0] for row in cursor.fetchall())
            print(f"  {sql[:160]}\n    {plan}")


def through_gunicorn(
    args: Any, env: dict[str, str], db: BenchDatabase, token: str, ids: list[int]
) -> None:
    """The same requests over HTTP to gunicorn with one sync worker, one at a
    time: CPU ms of that worker (HTTP handling and socket writes included) and of
    the database's client backends, per request; the cheapest round."""
    import http.client

    from bench.common import start_gunicorn

    logs = RESULTS_DIR / "logs"
    api, base = start_gunicorn(env, logs / f"api-profile-{db.name}.log", workers=1)
    port = int(base.rsplit(":", 1)[1])
    worker = int(
        Path(f"/proc/{api.pid}/task/{api.pid}/children").read_text().split()[0]
    )

    def backends() -> list[int]:
        with db.connect() as conn:
            return [
                row[0]
                for row in conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = %s"
                    " AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
                    (db.name,),
                )
            ]

    def call_http(method: str, path: str, body: bytes, key: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port)
        headers = {"Authorization": f"Token {token}"}
        if body:
            headers.update({"Content-Type": "application/json", "Idempotency-Key": key})
        conn.request(method, path, body=body or None, headers=headers)
        response = conn.getresponse()
        response.read()
        conn.close()
        return response.status

    prefix = secrets.token_hex(6)
    endpoints = {
        "GET /api/v1/runs/": lambda i: call_http("GET", "/api/v1/runs/", b"", ""),
        "POST /api/v1/pipelines/{id}/runs/": lambda i: call_http(
            "POST",
            f"/api/v1/pipelines/{ids[i % len(ids)]}/runs/",
            b"{}",
            f"{prefix}-{i}",
        ),
    }
    best: dict[str, tuple[float, float]] = {}
    for request in endpoints.values():
        for i in range(args.warmup):
            request(-1 - i)
    for round_ in range(args.rounds):
        for name, request in endpoints.items():
            pids = backends()
            pg_before = {pid: _proc_cpu_ms(pid) for pid in pids}
            cpu_before = _proc_cpu_ms(worker)
            for i in range(args.requests):
                status = request(round_ * args.requests + i)
                if status not in (200, 202):
                    raise SystemExit(f"{name}: HTTP {status}")
            cpu = (_proc_cpu_ms(worker) - cpu_before) / args.requests
            now = {pid: _proc_cpu_ms(pid) for pid in pids}
            pg = sum(ms - pg_before[pid] for pid, ms in now.items() if ms)
            pg /= args.requests
            if name not in best or cpu + pg < sum(best[name]):
                best[name] = (cpu, pg)
    api.stop()
    print(
        f"{'endpoint (gunicorn, 1 sync worker)':36} {'cpu ms':>7} {'pg ms':>6} "
        f"{'total':>6}"
    )
    for name, (cpu, pg) in best.items():
        print(f"{name:36} {cpu:7.2f} {pg:6.2f} {cpu + pg:6.2f}")


def new_profiler(kind: str | None) -> Any:
    if kind == "cprofile":
        import cProfile

        # CPU time, not wall time: waiting for PostgreSQL or Redis is not counted
        # (their CPU is `pg_ms`/`redis_ms`), nor time other processes take.
        profiler = cProfile.Profile(time.process_time)
        profiler.start, profiler.stop = profiler.enable, profiler.disable
        return profiler
    if kind == "pyinstrument":
        import pyinstrument

        return pyinstrument.Profiler(interval=0.0005)
    return None


def write_profile(profiler: Any, stem: Path) -> None:
    if hasattr(profiler, "dump_stats"):
        import pstats

        profiler.dump_stats(f"{stem}.prof")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(50)
        print(f"profile: {stem}.prof")
    else:
        Path(f"{stem}.html").write_text(profiler.output_html())
        print(profiler.output_text(unicode=False, show_all=False))
        print(f"profile: {stem}.html")


def slug(endpoint: str) -> str:
    """`GET /api/v1/runs/{id}/` -> `get-runs-id` (a profile file's name)."""
    words = re.findall(r"[a-z]+", endpoint.lower().replace("/api/v1/", " "))
    return "-".join(w for w in words if w != "chunks")


def running_run(pipeline_id: int, chunks: int = 20) -> int:
    """A running run with `chunks` chunks, half done (with the reference stats a
    chunk of the batch bench records): what `bench/batch.py` polls."""
    from django.utils import timezone

    from integration import services
    from integration.models import ChunkRun, Run

    run = services.start_run(pipeline_id)
    stats = {"references": {"airlines": {"source": "hit", "age_seconds": 0.5}}}
    ChunkRun.objects.bulk_create(
        ChunkRun(
            run_id=run.pk,
            seq=seq,
            spec={"path": "flights.csv", "offset": seq * 5_000_000},
            state="done" if seq < chunks // 2 else "pending",
            stats=stats if seq < chunks // 2 else {},
        )
        for seq in range(chunks)
    )
    Run.objects.filter(pk=run.pk).update(
        state="running",
        chunks_total=chunks,
        chunks_done=chunks // 2,
        planned_at=timezone.now(),
        started_at=timezone.now(),
    )
    return run.pk


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1000, help="per endpoint")
    p.add_argument("--warmup", type=int, default=100, help="per endpoint, unmeasured")
    p.add_argument(
        "--rounds", type=int, default=3, help="per endpoint; the cheapest is shown"
    )
    p.add_argument("--pipelines", type=int, default=200)
    p.add_argument("--seed-runs", type=int, default=1000)
    p.add_argument("--profile", choices=["cprofile", "pyinstrument"])
    p.add_argument(
        "--only",
        metavar="TEXT",
        help="measure only the endpoints whose name contains TEXT (e.g. POST)",
    )
    p.add_argument("--explain", action="store_true", help="EXPLAIN ANALYZE reads")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument(
        "--gunicorn",
        action="store_true",
        help="through gunicorn (1 sync worker, sequential requests) instead",
    )
    args = p.parse_args()

    db = BenchDatabase("apiprof")
    rds = BenchRedis()
    env = service_env(db, rds, API_THROTTLE_USER="100000000/hour")
    manage(env, "migrate", "--no-input", "-v0")
    django_setup(env)

    import logging

    from django.db import connection
    from django.db.backends.signals import connection_created
    from knox.models import AuthToken

    from bench.api import setup
    from config.wsgi import application  # sets up logging again

    logs = RESULTS_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_file = (logs / f"api-profile-{db.name}.log").open("w")
    for handler in logging.getLogger().handlers:  # as gunicorn: stderr to a file
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(log_file)

    ids = setup(args.pipelines, args.seed_runs)
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.get(username="bench")
    _, token = AuthToken.objects.create(user)
    if args.gunicorn:
        connection.close()
        through_gunicorn(args, env, db, token, ids)
        return
    connection.close()

    probe = Probe()
    connection_created.connect(probe.connected, weak=False)
    prefix = secrets.token_hex(6)

    def get(i: int) -> dict[str, Any]:
        return environ("GET", "/api/v1/runs/", token)

    def post(i: int) -> dict[str, Any]:
        path = f"/api/v1/pipelines/{ids[i % len(ids)]}/runs/"
        return environ("POST", path, token, b"{}", idempotency_key=f"{prefix}-{i}")

    polled = running_run(ids[0])

    def detail(i: int) -> dict[str, Any]:
        return environ("GET", f"/api/v1/runs/{polled}/", token)

    redis_pid = next(iter(pids_named("redis-server")), None)
    endpoints = (
        ("GET /api/v1/runs/", get, (200,)),
        ("POST /api/v1/pipelines/{id}/runs/", post, (202,)),
        ("GET /api/v1/runs/{id}/ (20 chunks)", detail, (200,)),
    )
    if args.only:
        endpoints = tuple(e for e in endpoints if args.only in e[0])
    best: dict[str, dict[str, Any]] = {}
    profiles = []
    with connection.execute_wrapper(probe):
        for name, make, expect in endpoints:
            prefix = secrets.token_hex(6)
            measure(name, args.warmup, make, application, probe, redis_pid, expect)
        # Rounds alternate the endpoints; each keeps its cheapest round: on a
        # shared machine, other processes only ever add to CPU time.
        for _ in range(1 if args.profile else args.rounds):
            for name, make, expect in endpoints:
                prefix = secrets.token_hex(6)
                profiler = new_profiler(args.profile)
                result = measure(
                    name,
                    args.requests,
                    make,
                    application,
                    probe,
                    redis_pid,
                    expect,
                    profiler,
                    lambda: rds.client.llen("control"),
                )
                if name not in best or result["total_ms"] < best[name]["total_ms"]:
                    best[name] = result
                profiles.append((slug(name), profiler))
    results = list(best.values())
    if args.json:
        print(json.dumps(results, indent=2))
    print(
        f"{'endpoint':36} {'cpu ms':>7} {'pg ms':>6} {'total':>6} {'redis':>6} "
        f"{'wall ms':>7} {'queries':>7} {'conns':>5} {'msgs':>5}"
    )
    for r in results:
        print(
            f"{r['endpoint']:36} {r['cpu_ms']:7.2f} {r['pg_ms']:6.2f} "
            f"{r['total_ms']:6.2f} {r['redis_ms'] or 0:6.2f} {r['wall_ms']:7.2f} "
            f"{r['queries']:7.2f} {r['connections']:5d} {r['messages']:5.2f}"
        )
    for r in results:
        print(f"\n{r['endpoint']}: statements (count over {r['requests']} requests)")
        for sql, count in r["statements"]:
            print(f"  {count:6d}  {sql[:200]}")
    if args.explain:
        for r in results:
            explain(r["statements"])
    for label, profiler in profiles:
        if profiler is not None:
            write_profile(profiler, logs / f"api-profile-{label}-{db.name}")


if __name__ == "__main__":
    main()
