"""A worker's own Prometheus metrics (config/worker_metrics.py), from a real
worker process whose pool runs a pipeline."""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from config import worker_metrics
from connectors.models import Connector
from integration import services
from integration.models import ChunkRun, Pipeline
from tests.helpers import free_port, unique, wait_for_run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STEPS = [{"type": "map", "fields": [{"name": "id", "expr": "id", "type": "integer"}]}]


def _samples(port: int) -> dict:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200
    found = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            found[s.name, tuple(sorted(s.labels.items()))] = s.value
    return found


def test_the_workers_pool_reports_each_tasks_outcome_and_duration(
    worker_factory, tmp_path
):
    source = Connector.objects.create(
        name=unique("gen"), kind="generator", config={"rows": 250}
    )
    sink = Connector.objects.create(
        name=unique("out"), kind="sqlite", config={"path": str(tmp_path / "o.db")}
    )
    pipeline = Pipeline.objects.create(
        name=unique("wm"),
        source=source,
        sink=sink,
        steps=STEPS,
        sink_options={"table": "t"},
        chunk_rows=50,
    )
    services.freeze_version(pipeline)
    port = free_port()
    made_before = set(Path(tempfile.gettempdir()).glob("dis-worker-metrics-*"))
    # Two pool processes: the main process serves the sum of both.
    worker = worker_factory(concurrency=2, env={"DIS_WORKER_METRICS_PORT": str(port)})
    made = set(Path(tempfile.gettempdir()).glob("dis-worker-metrics-*")) - made_before
    assert len(made) == 1  # the samples' directory it made
    run = wait_for_run(services.start_run(pipeline.pk).pk, timeout=120)
    assert run.state == "succeeded", run.error
    chunks = ChunkRun.objects.filter(run=run).count()
    assert chunks == 5

    samples = _samples(port)

    def tasks(task: str, outcome: str = "succeeded") -> float:
        key = ("dis_worker_tasks_total", (("outcome", outcome), ("task", task)))
        return samples.get(key, 0)

    assert tasks("integration.plan_run") == 1
    assert tasks("integration.finalize_run") >= 1
    # Each chunk ran as one fused task or as its extract, transform and load.
    fused = tasks("integration.process_chunk")
    chained = tasks("integration.load_chunk")
    assert fused + chained == chunks
    for task in ("integration.plan_run", "integration.process_chunk"):
        ran = sum(
            v
            for (name, labels), v in samples.items()
            if name == "dis_worker_tasks_total" and ("task", task) in labels
        )
        timed = samples.get(
            ("dis_worker_task_duration_seconds_count", (("task", task),)), 0
        )
        assert timed == ran, task
    # A worker that stops removes the directory it made.
    worker.stop()
    assert not [d for d in made if d.exists()]


def test_outcomes_follow_celerys_task_states(monkeypatch):
    counted = []

    class Fake:
        def labels(self, *labels):
            counted.append(labels)
            return self

        def inc(self):
            pass

        def observe(self, value):
            assert value >= 0

    monkeypatch.setattr(
        worker_metrics, "_metrics", {"tasks": Fake(), "duration": Fake()}
    )
    worker_metrics.task_started("t1")
    worker_metrics.task_ended("integration.plan_run", "t1", "SUCCESS")
    worker_metrics.task_ended("integration.load_chunk", "t2", "RETRY")
    worker_metrics.task_ended("integration.load_chunk", "t3", "FAILURE")
    assert counted == [
        ("integration.plan_run", "succeeded"),
        ("integration.plan_run",),  # its duration: it was seen starting
        ("integration.load_chunk", "retried"),
        ("integration.load_chunk", "failed"),
    ]


def test_off_without_a_port(monkeypatch):
    monkeypatch.delenv("DIS_WORKER_METRICS_PORT", raising=False)
    assert worker_metrics.port() is None
    monkeypatch.setattr(worker_metrics, "_metrics", {})
    worker_metrics.task_started("t")  # no metrics defined: nothing to count
    worker_metrics.task_ended("integration.plan_run", "t", "SUCCESS")
    assert worker_metrics._started == {}


def test_a_given_directory_loses_only_the_old_sample_files(tmp_path, monkeypatch):
    (tmp_path / "counter_123.db").write_bytes(b"old samples")
    (tmp_path / "keep.txt").write_text("not ours")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    served = []
    monkeypatch.setattr(
        "prometheus_client.start_http_server",
        lambda port, registry: served.append(port),
    )
    monkeypatch.setattr(worker_metrics, "_define", lambda: None)
    assert worker_metrics.start(9999) == str(tmp_path)
    assert served == [9999]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
