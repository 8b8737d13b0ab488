"""Local mode (SQLite, `make run`'s zero configuration): the run views answer as
on PostgreSQL. Their raw-SQL fast paths are PostgreSQL's only: on SQLite a raw
row's timestamps are naive, which made `GET /api/v1/runs/` a 500 once a run had
started."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import django
django.setup()
from datetime import timedelta

from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connection
from django.utils import timezone
from knox.models import AuthToken
from rest_framework.test import APIClient

from connectors.models import Connector
from integration import services
from integration.models import Pipeline, Run

call_command("migrate", verbosity=0)
assert connection.vendor == "sqlite"
user = get_user_model().objects.create_superuser("local", "l@localhost", "x-1!aaaa")
source = Connector.objects.create(name="gen", kind="generator", config={"rows": 10})
sink = Connector.objects.create(name="out", kind="sqlite", config={"path": "OUT"})
pipeline = Pipeline.objects.create(
    name="p", source=source, sink=sink, sink_options={"table": "t"},
    steps=[
        {"type": "map", "fields": [{"name": "id", "expr": "id", "type": "integer"}]}
    ],
)
services.freeze_version(pipeline)
client = APIClient(SERVER_NAME="localhost")
client.credentials(HTTP_AUTHORIZATION=f"Token {AuthToken.objects.create(user)[1]}")
started = client.post(f"/api/v1/pipelines/{pipeline.pk}/runs/", {}, format="json")
assert started.status_code == 202, started.content
run_id = started.json()["id"]
Run.objects.filter(pk=run_id).update(
    state="running", started_at=timezone.now() - timedelta(seconds=5)
)
listed = client.get("/api/v1/runs/")
assert listed.status_code == 200, listed.content
(item,) = listed.json()["results"]
assert item["started_at"].endswith("Z") and item["duration_seconds"] >= 5, item
detail = client.get(f"/api/v1/runs/{run_id}/")
assert detail.status_code == 200, detail.content
assert detail.json()["started_at"] == item["started_at"]
scraped = client.get("/metrics").content.decode()
for line in (
    'dis_runs_active{pipeline="p",state="running"} 1.0',
    "dis_metadata_database_up 1.0",
    "dis_broker_up 1.0",
):
    assert line in scraped.splitlines(), scraped
print("LOCAL-MODE-OK")
"""


def test_the_run_views_answer_on_sqlite(tmp_path):
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.local",
        "DIS_LOCAL_DIR": str(tmp_path),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "CELERY_BROKER_URL": "memory://",
    }
    for name in ("REDIS_URL", "DIS_STAGING_URL"):
        env.pop(name, None)
    script = SCRIPT.replace("OUT", str(tmp_path / "out.db"))
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    tail = re.findall(r"exception_value\">(.*?)<|(\w+Error: .*)", result.stderr)
    assert "LOCAL-MODE-OK" in result.stdout, tail or result.stderr[-3000:]
