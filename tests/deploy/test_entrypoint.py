"""docker/entrypoint.sh's roles, run for real with what the chart gives a pod.

No container runtime here: the test renders charts/dis, builds each container's
environment from it (the ConfigMap, the secret references, the secret files at
their mount path's stand-in) and runs the container's args through the image's
entrypoint on this machine's PostgreSQL (a scratch database) and Redis. The API,
a worker and beat then run the example pipeline end to end.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from django.conf import settings

from tests.deploy.common import (
    ENTRYPOINT,
    dockerfile_collectstatic_env,
    find,
    pod_spec,
    render,
)
from tests.helpers import free_port, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REDIS_DB = 12
SECRET_MOUNT = "/var/run/secrets/dis"


@pytest.fixture
def scratch_database() -> Iterator[str]:
    db = settings.DATABASES["default"]
    server = f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}"
    name = f"dis_deploy_{secrets.token_hex(4)}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{server}/{name}"
    finally:
        with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def scratch_redis() -> Iterator[str]:
    """Redis database 12 (keys under a private prefix); what the test adds is
    deleted after (never FLUSHDB)."""
    client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
    before = set(client.keys("*"))
    try:
        yield f"redis://127.0.0.1:6379/{REDIS_DB}"
    finally:
        added = set(client.keys("*")) - before
        if added:
            client.delete(*added)
        client.close()


def container_env(
    docs: list[dict[str, Any]],
    container: dict[str, Any],
    secret_values: dict[str, str],
    secret_dir: Path,
) -> dict[str, str]:
    """The environment Kubernetes would give `container`, secret files under
    `secret_dir` standing in for the mounted Secret."""
    [source] = container["envFrom"]
    env = dict(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for entry in container["env"]:
        if "value" in entry:
            env[entry["name"]] = entry["value"].replace(SECRET_MOUNT, str(secret_dir))
        else:
            env[entry["name"]] = secret_values[
                entry["valueFrom"]["secretKeyRef"]["key"]
            ]
    return env


class Role:
    """One container's args through the entrypoint, as a process of its own."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path):
        self.name, self.log = name, log
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            [str(ENTRYPOINT), *args],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            raise
        finally:
            self._log.close()


def _get(url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    """GET as the probes and the ingress send it: Host is an allowed name."""
    return httpx.get(url, headers={"Host": "localhost", **(headers or {})}, timeout=10)


def _while_running(check: Any, roles: list[Role]) -> Any:
    """`check` as a `wait_until` predicate: fails at once when a role exited, and
    counts a service that does not answer yet as not ready."""

    def predicate() -> Any:
        for role in roles:
            if role.proc.poll() is not None:
                said = role.log.read_text()[-3000:]
                raise AssertionError(f"{role.name} exited: {said}")
        with contextlib.suppress(OSError, httpx.TransportError, psycopg.Error):
            return check()
        return None

    return predicate


def test_the_charts_pods_run_the_service_end_to_end(
    tmp_path, scratch_database, scratch_redis
):
    fernet_key = base64.urlsafe_b64encode(os.urandom(32)).decode()
    secret_values = {
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(40),
        "DIS_ENCRYPTION_KEYS": fernet_key,
        "DATABASE_URL": scratch_database,
        "CELERY_BROKER_URL": scratch_redis,
        "REDIS_URL": scratch_redis,
        "DIS_METRICS_TOKEN": secrets.token_urlsafe(16),
    }
    tag = secrets.token_hex(4)
    local_dir = tmp_path / "local"
    local_dir.mkdir()
    docs = render(
        tmp_path,
        {
            "secrets": {"values": secret_values},
            "api": {"webConcurrency": 2},
            "worker": {"concurrency": 1},
            "migrations": {"timeoutSeconds": 3},
            "metrics": {"token": True},
            # Private keys in the shared Redis database: another checkout may
            # run this test at the same time.
            "config": {
                "DIS_STAGING_PREFIX": f"dis:deploy:{tag}:stage",
                "CELERY_BROKER_KEY_PREFIX": f"dis:deploy:{tag}:",
            },
            # The example's sink is this machine's PostgreSQL, on loopback.
            "extraEnv": [
                {"name": "DIS_DATA_ALLOWED_NETWORKS", "value": "127.0.0.0/8"},
                {"name": "DIS_LOCAL_DIR", "value": str(local_dir)},
            ],
        },
    )
    secret_dir = tmp_path / "secrets"
    secret_dir.mkdir()
    for name in ("DJANGO_SECRET_KEY", "DIS_ENCRYPTION_KEYS"):
        (secret_dir / name).write_text(secret_values[name])
    static_root = tmp_path / "static"
    port, worker_metrics_port = free_port(), free_port()
    base_env = {
        # The image's: its virtualenv first on PATH, and its collected static files.
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "PYTHONUNBUFFERED": "1",
        "DJANGO_STATIC_ROOT": str(static_root),
    }

    def env_of(
        deployment: str, container: str, *, init: bool = False
    ) -> dict[str, str]:
        spec = pod_spec(deployment_or_job(deployment))
        [c] = [
            c
            for c in spec["initContainers" if init else "containers"]
            if c["name"] == container
        ]
        return {**base_env, **container_env(docs, c, secret_values, secret_dir)}

    def deployment_or_job(name: str) -> dict[str, Any]:
        kind = "Job" if "migrate" in name else "Deployment"
        return find(docs, kind, name)

    def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(ENTRYPOINT), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    # Before the migrate job: the init container waits, then gives up, saying why.
    waiting = env_of("rel-dis-api", "wait-for-migrations", init=True)
    waiting["DIS_MIGRATIONS_POLL_SECONDS"] = "1"
    result = run(["wait-for-migrations"], waiting)
    assert result.returncode == 1
    assert "still lacks migrations after 3 s" in result.stderr

    [migrate] = pod_spec(find(docs, "Job", "rel-dis-migrate-1"))["containers"]
    result = run(migrate["args"], env_of("rel-dis-migrate-1", "migrate"))
    assert result.returncode == 0, result.stdout + result.stderr

    result = run(["wait-for-migrations"], waiting)
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout

    # The Dockerfile's collectstatic step, with its placeholders.
    build_env = {**base_env, **dockerfile_collectstatic_env()}
    result = run(["manage", "collectstatic", "--no-input", "-v0"], build_env)
    assert result.returncode == 0, result.stderr
    assert (static_root / "admin" / "css" / "base.css").exists()

    roles: list[Role] = []
    try:
        for name in ("api", "worker", "beat"):
            [container] = pod_spec(find(docs, "Deployment", f"rel-dis-{name}"))[
                "containers"
            ]
            env = env_of(f"rel-dis-{name}", name)
            if name == "api":
                assert env["PORT"] == "8000"
                env["PORT"] = str(port)  # the pod's own port, free on this machine
            if name == "worker":
                assert env["DIS_WORKER_METRICS_PORT"] == "9808"
                env["DIS_WORKER_METRICS_PORT"] = str(worker_metrics_port)
            roles.append(
                Role(name, container["args"], env, tmp_path / f"role-{name}.log")
            )
        api_url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            response = _get(f"{api_url}/readyz")
            return response.status_code == 200 and response.json()["status"] == "ok"

        wait_until(
            _while_running(ready, roles), timeout=60, interval=0.3, what="the API"
        )
        # Behind the ingress (TLS ended there): the admin's CSS from the image.
        css = _get(
            f"{api_url}/static/admin/css/base.css", {"X-Forwarded-Proto": "https"}
        )
        assert css.status_code == 200
        assert css.headers["Content-Type"].startswith("text/css")
        assert css.content == (static_root / "admin" / "css" / "base.css").read_bytes()
        # Plain HTTP is redirected, except the probes.
        assert _get(f"{api_url}/api/v1/runs/").status_code == 301
        assert _get(f"{api_url}/healthz").status_code == 200

        # Beat: the DatabaseScheduler wrote the built-in schedule to the database.
        def scheduled() -> list[str]:
            with psycopg.connect(scratch_database) as conn:
                rows = conn.execute(
                    "SELECT name FROM django_celery_beat_periodictask"
                ).fetchall()
            return [r[0] for r in rows]

        names = wait_until(
            _while_running(scheduled, roles),
            timeout=60,
            interval=0.3,
            what="beat's schedule",
        )
        assert set(settings.CELERY_BEAT_SCHEDULE) <= set(names)

        # The worker: the example pipeline, started and waited for as an operator would.
        manage_env = env_of("rel-dis-api", "api")
        result = run(["manage", "setup_local"], manage_env)
        assert result.returncode == 0, result.stderr
        result = run(
            ["manage", "run_pipeline", "flights-example", "--wait"], manage_env
        )
        assert result.returncode == 0, result.stdout + result.stderr
        with psycopg.connect(scratch_database) as conn:
            [(state, written)] = conn.execute(
                "SELECT state, records_written FROM integration_run"
            ).fetchall()
            [(rows,)] = conn.execute("SELECT count(*) FROM flights").fetchall()
        assert (state, written, rows) == ("succeeded", 336_776, 336_776)

        token = run(["manage", "create_api_token", "admin"], manage_env)
        assert token.returncode == 0, token.stderr
        runs = _get(
            f"{api_url}/api/v1/runs/",
            {
                "X-Forwarded-Proto": "https",
                "Authorization": f"Token {token.stdout.split()[-1]}",
            },
        )
        assert runs.status_code == 200
        [listed] = runs.json()["results"]
        assert (listed["state"], listed["records_written"]) == ("succeeded", 336_776)

        # Prometheus scrapes the pod by its IP, over plain HTTP, with the token.
        metrics_url = f"http://127.0.0.1:{port}/metrics"
        assert httpx.get(metrics_url, timeout=10).status_code == 401
        scraped = httpx.get(
            metrics_url,
            headers={"Authorization": f"Bearer {secret_values['DIS_METRICS_TOKEN']}"},
            timeout=10,
        )
        assert scraped.status_code == 200
        lines = scraped.text.splitlines()
        written = (
            'dis_pipeline_last_run_records{outcome="written",'
            'pipeline="flights-example"} 336776.0'
        )
        assert written in lines
        assert "dis_metadata_database_up 1.0" in lines
        assert "dis_broker_up 1.0" in lines
        # The worker pod's own metrics: its pool's tasks.
        worker_scrape = httpx.get(
            f"http://127.0.0.1:{worker_metrics_port}/metrics", timeout=10
        )
        assert worker_scrape.status_code == 200
        plan = 'dis_worker_tasks_total{outcome="succeeded",task="integration.plan_run"}'
        assert f"{plan} 1.0" in worker_scrape.text.splitlines()
    finally:
        codes = {role.name: role.stop() for role in roles}
    # Each role stops cleanly on the kubelet's SIGTERM.
    assert codes == {"api": 0, "worker": 0, "beat": 0}
