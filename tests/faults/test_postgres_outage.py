"""PostgreSQL stopped (`immediate`, as in a crash) in the middle of a run.

Everything runs against a throwaway cluster (`initdb` as the postgres user in a
temporary directory, a free port) and a private Redis: the API under gunicorn, a
real worker, and the reconciler, all as subprocesses with that cluster as their
`DATABASE_URL`. The machine's shared PostgreSQL and Redis are never touched.
During the outage the API answers 503 (never a 500 with a traceback); after the
restart the run finishes with every number once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import ROOT, Worker
from tests.faults.conftest import FAST_REDELIVERY, free_port, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PG_BIN = Path("/usr/lib/postgresql/15/bin")
ROWS = 2000


class PgCluster:
    """A PostgreSQL cluster of the test's own, run as the postgres user."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="dis-fault-pg-"))
        shutil.chown(self.root, "postgres", "postgres")
        self.data = self.root / "data"
        self.port = free_port()

    def _as_postgres(self, *args: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def init(self) -> None:
        self._as_postgres(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        )
        self._as_postgres(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "postgres.log"),
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"
        )

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def url(self, database: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str) -> psycopg.Connection:
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            dbname=database,
            user="postgres",
            autocommit=True,
        )


@pytest.fixture
def pg_cluster() -> Iterator[PgCluster]:
    if not (PG_BIN / "initdb").exists() or shutil.which("runuser") is None:
        pytest.skip("PostgreSQL 15 binaries or runuser are not available")
    cluster = PgCluster()
    try:
        cluster.init()
        cluster.start()
        with cluster.connect("postgres") as conn:
            conn.execute("CREATE DATABASE dis")
        yield cluster
    finally:
        if cluster.running():
            cluster.stop("immediate")
        shutil.rmtree(cluster.root, ignore_errors=True)


class Service:
    """Runs this project's processes against the throwaway cluster and Redis."""

    def __init__(self, env: dict[str, str], tmp_path: Path) -> None:
        self.env = env
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def manage(self, *args: str, timeout: float = 120) -> str:
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    def shell(self, code: str) -> str:
        return self.manage("shell", "-c", code)

    def gunicorn(self, port: int) -> None:
        log = (self.tmp_path / "gunicorn.log").open("ab")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "config.wsgi:application",
                "--bind",
                f"127.0.0.1:{port}",
                "--workers",
                "1",
                "--threads",
                "2",
                "--timeout",
                "30",
            ],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)

        def healthy() -> bool:
            if proc.poll() is not None:
                raise RuntimeError((self.tmp_path / "gunicorn.log").read_text()[-3000:])
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, timeout=30, interval=0.2, what="gunicorn to answer")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


SETUP = """
import json
from django.contrib.auth import get_user_model
from knox.models import AuthToken
from connectors.models import Connector
from integration import services
from integration.models import Pipeline

user = get_user_model().objects.create_user("operator", password="pw-123456!")
_, token = AuthToken.objects.create(user)
source = Connector.objects.create(name="numbers", kind="generator",
                                  config={{"rows": {rows}}})
sink = Connector.objects.create(name="sink", kind="postgres", config={{
    "host": "127.0.0.1", "port": {port}, "database": "dis", "user": "postgres"}})
pipeline = Pipeline.objects.create(
    name="numbers", source=source, sink=sink, sink_options={{"table": "numbers"}},
    steps=[{{"type": "map", "fields": [
        {{"name": "id", "expr": "id", "type": "integer", "required": True}}]}}],
    chunk_rows=10, max_in_flight=4, max_rejected_ratio=0.0)
services.freeze_version(pipeline)
print(json.dumps({{"token": token, "pipeline": pipeline.pk}}))
"""

RECONCILE = (
    "from integration import housekeeping; "
    "print(housekeeping.reconcile(stale_seconds=5))"
)


def assert_503(response: httpx.Response) -> None:
    """The outage answer: 503, a short JSON body, Retry-After; no traceback."""
    assert response.status_code == 503, response.text[:2000]
    assert response.headers["Retry-After"] == "5"
    assert response.json() == {
        "detail": "the metadata database is unavailable; retry later"
    }
    assert "Traceback" not in response.text


def test_postgres_stopped_immediately_mid_run_then_restarted(
    pg_cluster, redis_server, tmp_path
):
    """PostgreSQL dies mid-run (`pg_ctl stop -m immediate`): the API answers 503 to
    reads and run requests all through the outage; once PostgreSQL is back, the
    reconciler resends what was lost and the run ends `succeeded` with every
    number once."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": pg_cluster.url("dis"),
        "CELERY_BROKER_URL": redis_server.url(0),
        "REDIS_URL": redis_server.url(1),
        "DIS_STAGING_URL": redis_server.url(1),
        "PYTHONUNBUFFERED": "1",
        **FAST_REDELIVERY,
    }
    service = Service(env, tmp_path)
    worker = Worker(
        tmp_path / "worker.log",
        concurrency=2,
        env={
            name: env[name]
            for name in (
                "DATABASE_URL",
                "CELERY_BROKER_URL",
                "REDIS_URL",
                "DIS_STAGING_URL",
                *FAST_REDELIVERY,
            )
        },
    )
    try:
        service.manage("migrate", "--noinput")
        output = service.shell(SETUP.format(rows=ROWS, port=pg_cluster.port))
        created = json.loads(output.strip().splitlines()[-1])
        api_port = free_port()
        service.gunicorn(api_port)
        worker.start()
        api = httpx.Client(
            base_url=f"http://127.0.0.1:{api_port}/api/v1",
            headers={"Authorization": f"Token {created['token']}"},
            timeout=30,
        )
        runs_url = f"/pipelines/{created['pipeline']}/runs/"
        response = api.post(runs_url, json={})
        assert response.status_code == 202, response.text
        run_url = f"/runs/{response.json()['id']}/"

        before = wait_until(
            lambda: (r := api.get(run_url).json())["chunks_done"] >= 20 and r,
            timeout=60,
            interval=0.1,
            what="20 committed chunks",
        )
        pg_cluster.stop("immediate")
        assert before["state"] == "running"
        assert before["chunks_done"] < before["chunks_total"] == ROWS // 10
        outage_ends = time.monotonic() + 5
        answers = 0
        while time.monotonic() < outage_ends:
            assert_503(api.get(run_url))
            assert_503(api.post(runs_url, json={}))
            answers += 2
            time.sleep(0.25)
        assert answers >= 10
        pg_cluster.start()

        deadline = time.monotonic() + 150
        run: dict = {}
        while time.monotonic() < deadline:
            response = api.get(run_url)
            if response.status_code == 200:
                run = response.json()
                if run["state"] not in ("queued", "running"):
                    break
            service.shell(RECONCILE)
            time.sleep(1)
        assert run.get("state") == "succeeded", run.get("error", run)
        assert (run["records_read"], run["records_written"]) == (ROWS, ROWS)
        assert run["chunks_done"] == ROWS // 10
        with pg_cluster.connect("dis") as conn:
            (row,) = conn.execute(
                f"SELECT {ROWS} - count(DISTINCT id) FILTER (WHERE id BETWEEN 1 AND "
                f"{ROWS}), count(*) - count(DISTINCT id) FROM numbers"
            ).fetchall()
        assert tuple(row) == (0, 0)
    finally:
        if worker.proc is not None:
            worker.stop()
        service.stop()
