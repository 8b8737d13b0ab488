"""Shared pieces of the benchmark scripts.

A private PostgreSQL database and Redis database per run (created and removed by
the script), the service processes (gunicorn, Celery workers) started in their own
process groups and stopped by id, peak-RSS sampling from `/proc`, the machine
description, result files and the generated table in `docs/benchmarks.md`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
DATA_DIR = BENCH / "data"
RESULTS_DIR = BENCH / "results"
DOC = ROOT / "docs" / "benchmarks.md"
PYTHON = sys.executable

PG_HOST = os.environ.get("BENCH_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("BENCH_PG_PORT", "5432"))
PG_USER = os.environ.get("BENCH_PG_USER", "postgres")
REDIS_HOST = os.environ.get("BENCH_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("BENCH_REDIS_PORT", "6379"))
#: Redis database numbers the benchmarks may use (the tests use the others).
REDIS_DBS = (8, 9, 10, 11)

# --- clean-up ------------------------------------------------------------------

_CLEANUPS: list[Callable[[], None]] = []


def on_exit(fn: Callable[[], None]) -> Callable[[], None]:
    """Run `fn` at exit (also after SIGTERM/SIGINT), latest registered first."""
    _CLEANUPS.append(fn)
    return fn


def run_cleanups() -> None:
    while _CLEANUPS:
        fn = _CLEANUPS.pop()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - clean up the rest anyway
            print(
                f"cleanup {getattr(fn, '__name__', fn)} failed: {exc}", file=sys.stderr
            )


def _on_signal(signum: int, frame: object) -> None:
    run_cleanups()
    sys.exit(128 + signum)


atexit.register(run_cleanups)
signal.signal(signal.SIGTERM, _on_signal)
signal.signal(signal.SIGINT, _on_signal)


# --- PostgreSQL and Redis ------------------------------------------------------


def pg_connect(dbname: str = "postgres", **kwargs: Any) -> Any:
    import psycopg

    return psycopg.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=dbname, **kwargs
    )


class BenchDatabase:
    """A database `dis_bench_<random>`, dropped at exit."""

    def __init__(self, label: str = "") -> None:
        suffix = f"{label}_" if label else ""
        self.name = f"dis_bench_{suffix}{secrets.token_hex(4)}"
        with pg_connect(autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        on_exit(self.drop)

    @property
    def url(self) -> str:
        return f"postgres://{PG_USER}@{PG_HOST}:{PG_PORT}/{self.name}"

    def connect(self, **kwargs: Any) -> Any:
        return pg_connect(self.name, **kwargs)

    def drop(self) -> None:
        with pg_connect(autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        print(f"dropped database {self.name}")


class BenchRedis:
    """An empty Redis database among 8..11 with a private staging prefix.

    At exit the keys written there are deleted one by one (never FLUSHDB: the
    Redis server is shared).
    """

    def __init__(self) -> None:
        import redis

        self.prefix = f"dis:bench:{secrets.token_hex(4)}"
        for number in REDIS_DBS:
            client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=number)
            if client.dbsize() == 0:
                self.db, self.client = number, client
                break
        else:
            raise SystemExit(
                f"no empty Redis database among {REDIS_DBS}: another benchmark is "
                "running (or left keys behind)"
            )
        # Claim the database so a concurrent benchmark picks another one.
        self.client.set(f"{self.prefix}:claimed", "1")
        on_exit(self.clear)

    @property
    def url(self) -> str:
        return f"redis://{REDIS_HOST}:{REDIS_PORT}/{self.db}"

    def clear(self) -> None:
        keys = list(self.client.scan_iter(count=1000))
        for start in range(0, len(keys), 500):
            self.client.delete(*keys[start : start + 500])
        print(f"deleted {len(keys)} keys from Redis db {self.db}")


def service_env(db: BenchDatabase, rds: BenchRedis, **extra: str) -> dict[str, str]:
    """The environment of every service process: production settings, bench stores."""
    from cryptography.fernet import Fernet

    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.production",
        "DATABASE_URL": db.url,
        "CELERY_BROKER_URL": rds.url,
        "REDIS_URL": rds.url,
        "DIS_STAGING_PREFIX": f"{rds.prefix}:stage",
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
        "DIS_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
        "DJANGO_SECURE_SSL_REDIRECT": "false",
        # The bench's PostgreSQL is on loopback, which production refuses unless
        # allow-listed (docs/operations.md, network allow-lists).
        "DIS_DATA_ALLOWED_NETWORKS": os.environ.get(
            "DIS_DATA_ALLOWED_NETWORKS", "127.0.0.0/8,::1/128"
        ),
        "DIS_LOCAL_DIR": str(RESULTS_DIR / ".local"),
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def django_setup(env: dict[str, str]) -> None:
    """Configure Django in this process with the services' environment."""
    os.environ.update(env)
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()

    def close() -> None:
        from django.db import connections

        connections.close_all()

    on_exit(close)


def manage(env: dict[str, str], *args: str) -> str:
    """Run `manage.py` with the services' environment; its stdout."""
    out = subprocess.run(
        [PYTHON, "manage.py", *args],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout


# --- processes -----------------------------------------------------------------


class Service:
    """A subprocess in its own process group; `stop()` ends that group only."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], log: Path
    ) -> None:
        self.name = name
        self.log_path = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        on_exit(self.stop)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_for_log(self, needle: bytes, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.tail()}")
            if needle in self.log_path.read_bytes():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready:\n{self.tail()}")

    def tail(self, size: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-size:]

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # Pool children left behind by a killed parent share its process group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_gunicorn(
    env: dict[str, str], log: Path, *, workers: int = 2, port: int | None = None
) -> tuple[Service, str]:
    """gunicorn `config.wsgi` (production settings) and its base URL."""
    port = port or free_port()
    service = Service(
        "gunicorn",
        [
            PYTHON,
            "-m",
            "gunicorn",
            "config.wsgi",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            str(workers),
            # No access log, as gunicorn.conf.py has it (the service logs each
            # request as JSON); BENCH_ACCESS_LOG=1 adds gunicorn's on stdout.
            *(["--access-logfile", "-"] if os.environ.get("BENCH_ACCESS_LOG") else []),
        ],
        env,
        log,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited:\n{service.tail()}")
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=2) as response:  # noqa: S310
                if response.status == 200:
                    return service, base
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    raise RuntimeError(f"gunicorn not ready:\n{service.tail()}")


def start_worker(
    env: dict[str, str], log: Path, *, name: str, concurrency: int
) -> Service:
    """A Celery worker on the control, io and cpu queues, as deployed."""
    service = Service(
        name,
        [
            PYTHON,
            "-m",
            "celery",
            "-A",
            "config",
            "worker",
            "-Q",
            "control,io,cpu",
            "--concurrency",
            str(concurrency),
            "--pool",
            "prefork",
            "--hostname",
            f"{name}@%h",
            "--without-mingle",
            "--without-gossip",
            "--without-heartbeat",
            "--loglevel",
            "INFO",
        ],
        env,
        log,
    )
    service.wait_for_log(b"ready.")
    return service


def api_call(
    base: str,
    method: str,
    path: str,
    token: str,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(  # noqa: S310 - our own local server
        f"{base}{path}",
        data=data,
        method=method,
        headers={
            "Authorization": f"Token {token}",
            "Content-Type": "application/json",
            **(headers or {}),
        },
    )
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
        return json.loads(response.read())


# --- memory --------------------------------------------------------------------


def _status_kb(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    key, value = line.split(":", 1)
                    values[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return values


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    """The fields of `/proc/<pid>/stat` after the command name (state first)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
        return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far."""
    fields = _stat(pid)
    return (
        None if fields is None else (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    )


def _parent(pid: int) -> int | None:
    fields = _stat(pid)
    return None if fields is None else int(fields[1])


def postmaster_pid(conn: Any) -> int | None:
    """The PostgreSQL server's main process (the parent of this session's
    backend), when it runs on this machine."""
    (backend,) = conn.execute("SELECT pg_backend_pid()").fetchone()
    return _parent(backend)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:160]


def _walk(pid: int) -> Iterator[tuple[int, int]]:
    """A process and its descendants, each with its depth below `pid`."""
    stack = [(pid, 0)]
    while stack:
        current, depth = stack.pop()
        yield current, depth
        stack.extend((child, depth + 1) for child in _children(current))


def pids_named(*names: str) -> list[int]:
    """The processes whose command name (`/proc/<pid>/comm`) is one of `names`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() in names:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _machine_jiffies() -> tuple[int, int]:
    """(busy, all) jiffies of every CPU so far, from `/proc/stat`."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values[:8]) - idle, sum(values[:8])


class CpuShares:
    """Where the CPU of one measured phase went: the service (a process tree),
    PostgreSQL, Redis, this script's finished children (wrk) and the rest of the
    machine, in CPU ms per request, plus how busy the machine's CPUs were.

    A process that ends during the phase (a PostgreSQL backend whose connection
    reached `DATABASE_CONN_MAX_AGE`) is counted through its parent's CPU time of
    waited-for children.
    """

    def __init__(self, service_pid: int) -> None:
        self.service_pid = service_pid

    def _read(self) -> dict[str, Any]:
        def each(pids: list[int]) -> dict[int, tuple[float, float]]:
            times = {}
            for pid in pids:
                fields = _stat(pid)
                if fields is not None:
                    own = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
                    waited = (int(fields[13]) + int(fields[14])) / _CLOCK_TICKS
                    times[pid] = (own, waited)
            return times

        children = os.times()
        busy, every = _machine_jiffies()
        return {
            "service": each([pid for pid, _ in _walk(self.service_pid)]),
            "postgres": each(pids_named("postgres")),
            "redis": each(pids_named("redis-server")),
            "wrk": children.children_user + children.children_system,
            "busy": busy / _CLOCK_TICKS,
            "all": every / _CLOCK_TICKS,
        }

    def start(self) -> CpuShares:
        self.before = self._read()
        return self

    def stop(self, requests: int) -> dict[str, float]:
        after = self._read()
        delta = {}
        for key, value in after.items():
            if isinstance(value, dict):
                # A process started since counts whole; one that ended counts
                # through its parent's CPU of waited-for children.
                earlier = self.before[key]
                own = sum(
                    t - earlier.get(pid, (0.0, 0.0))[0] for pid, (t, _) in value.items()
                )
                gone = sum(earlier[pid][0] for pid in earlier.keys() - value.keys())
                waited = sum(
                    w - earlier[pid][1]
                    for pid, (_, w) in value.items()
                    if pid in earlier
                )
                delta[key] = own - gone + waited
            else:
                delta[key] = value - self.before[key]
        groups = ("service", "postgres", "redis", "wrk")
        delta["other"] = max(0.0, delta["busy"] - sum(delta[g] for g in groups))
        shares = {
            f"{g}_ms": round(delta[g] * 1000 / max(requests, 1), 3)
            for g in (*groups, "other")
        }
        shares["machine_busy_pct"] = round(100 * delta["busy"] / delta["all"], 1)
        return shares


class RssSampler:
    """Samples VmHWM/VmRSS of named processes and all their descendants.

    Per process: the peak of VmHWM (the kernel's own high-water mark, so a peak
    between two samples is not missed) and of VmRSS; per named tree: the peak of
    the summed VmRSS. Also each process's CPU time as last seen, so `cpu_since`
    gives the CPU seconds each tree used after a `cpu_mark` (a process that ends
    between two samples loses at most its last 0.2 s).
    """

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.roots: dict[str, tuple[int, bool]] = {}
        self.procs: dict[int, dict[str, Any]] = {}
        self.tree_peak_kb: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._lock = threading.Lock()

    def watch(self, label: str, pid: int, *, descendants: bool = True) -> None:
        with self._lock:
            self.roots[label] = (pid, descendants)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def sample(self) -> None:
        with self._lock:
            roots = dict(self.roots)
        for label, (root, descendants) in roots.items():
            total = 0
            tree = _walk(root) if descendants else iter([(root, 0)])
            for pid, depth in tree:
                kb = _status_kb(pid)
                if not kb:
                    continue
                total += kb.get("VmRSS", 0)
                entry = self.procs.setdefault(
                    pid,
                    {
                        "tree": label,
                        "role": "main" if depth == 0 else f"child (depth {depth})",
                        "cmd": _cmdline(pid),
                        "peak_hwm_kb": 0,
                        "peak_rss_kb": 0,
                    },
                )
                entry["peak_hwm_kb"] = max(entry["peak_hwm_kb"], kb.get("VmHWM", 0))
                entry["peak_rss_kb"] = max(entry["peak_rss_kb"], kb.get("VmRSS", 0))
                cpu = cpu_seconds(pid)
                if cpu is not None:
                    entry["cpu_s"] = cpu
            self.tree_peak_kb[label] = max(self.tree_peak_kb.get(label, 0), total)

    def cpu_mark(self) -> dict[int, float]:
        """Each known process's CPU seconds now (sampled at once)."""
        self.sample()
        return {pid: entry.get("cpu_s", 0.0) for pid, entry in self.procs.items()}

    def cpu_since(self, mark: dict[int, float]) -> dict[str, float]:
        """CPU seconds per tree since `mark` (processes started since count all)."""
        self.sample()
        used: dict[str, float] = {}
        for pid, entry in self.procs.items():
            spent = entry.get("cpu_s", 0.0) - mark.get(pid, 0.0)
            used[entry["tree"]] = used.get(entry["tree"], 0.0) + max(spent, 0.0)
        return {label: round(seconds, 2) for label, seconds in sorted(used.items())}

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.sample()
        return self.report()

    def report(self) -> dict[str, Any]:
        processes = [
            {
                "pid": pid,
                **entry,
                "peak_rss_mb": round(entry["peak_hwm_kb"] / 1024, 1),
            }
            for pid, entry in sorted(self.procs.items())
        ]
        return {
            "processes": processes,
            "tree_peak_rss_mb": {
                label: round(kb / 1024, 1) for label, kb in self.tree_peak_kb.items()
            },
        }


def self_peak_rss_mb() -> float:
    """This process's VmHWM (ru_maxrss would carry the parent's peak across exec)."""
    return round(_status_kb(os.getpid()).get("VmHWM", 0) / 1024, 1)


# --- machine and results -------------------------------------------------------


def _first(path: str, prefix: str) -> str:
    with contextlib.suppress(OSError), open(path) as fh:
        for line in fh:
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    return ""


def _version(module: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """nproc, memory, CPU model, load, versions of everything involved."""
    versions: dict[str, Any] = {"python": platform.python_version()}
    with contextlib.suppress(Exception), pg_connect() as conn:
        versions["postgres"] = conn.execute("SHOW server_version").fetchone()[0]
    with contextlib.suppress(Exception):
        import redis

        versions["redis"] = redis.Redis(host=REDIS_HOST, port=REDIS_PORT).info(
            "server"
        )["redis_version"]
    for package in (
        "duckdb",
        "pyarrow",
        "celery",
        "Django",
        "gunicorn",
        "psycopg",
        "dlt",
        "py-spy",
    ):
        versions[package.lower()] = _version(package)
    versions["wrk"] = None
    with contextlib.suppress(OSError):  # wrk is only installed for bench/api.py
        wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
        text = (wrk.stdout or wrk.stderr).split("Copyright")[0].strip()
        versions["wrk"] = text or None
    mem_kb = int(_first("/proc/meminfo", "MemTotal").split()[0] or 0)
    return {
        "nproc": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "cpu_model": _first("/proc/cpuinfo", "model name"),
        "kernel": platform.release(),
        "loadavg": os.getloadavg(),
        "versions": versions,
    }


def timestamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def write_result(scenario: str, result: dict[str, Any]) -> Path:
    """Write `bench/results/<scenario>-<timestamp>.json` and refresh the doc table."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    result = {
        "scenario": scenario,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **result,
    }
    result.setdefault("machine", machine())
    path = RESULTS_DIR / f"{scenario}-{timestamp()}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")
    from bench import report

    report.update_doc()
    return path


def load_results(scenario_prefix: str = "") -> list[dict[str, Any]]:
    """Every result file (oldest first), optionally of scenarios with a prefix."""
    results = []
    for path in sorted(RESULTS_DIR.glob(f"{scenario_prefix}*.json")):
        with contextlib.suppress(ValueError):
            data = json.loads(path.read_text())
            data["_file"] = path.name
            results.append(data)
    results.sort(key=lambda r: r.get("measured_at", ""))
    return results
