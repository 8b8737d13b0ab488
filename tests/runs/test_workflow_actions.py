"""Workflow action nodes: an HTTP call and a SQL statement through connectors, and
a wait that asks again until its timeout."""

from __future__ import annotations

import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.utils import timezone

from connectors.exceptions import NotReadyError
from connectors.models import Connector
from integration import orchestration, workflows
from integration.models import NodeRun, Workflow
from tests.helpers import unique
from tests.runs.conftest import sink_query

pytestmark = pytest.mark.django_db


@pytest.fixture
def api_server():
    calls: list[tuple[str, str, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            calls.append(("POST", self.path, body))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"refreshed": true}')

        def log_message(self, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.calls = calls
    yield server
    server.shutdown()
    server.server_close()


def one_node_workflow(kind: str, config: dict) -> NodeRun:
    workflow = workflows.save_workflow(
        Workflow(name=unique("wf")),
        [{"key": "only", "kind": kind, "config": config, "max_attempts": 1}],
    )
    wrun = workflows.start_workflow(workflow.pk)
    workflows.advance(wrun.pk)
    return NodeRun.objects.get(workflow_run=wrun)


def test_http_node_calls_the_api_through_the_connector(api_server, sent, settings):
    settings.DIS_ALLOWED_NETWORKS = ["127.0.0.1/32"]
    api = Connector.objects.create(
        name=unique("api"),
        kind="rest",
        config={"base_url": f"http://127.0.0.1:{api_server.server_port}"},
    )
    nr = one_node_workflow(
        "http",
        {"connector": api.name, "method": "POST", "path": "/refresh", "body": {"x": 1}},
    )
    workflows.run_action(nr.pk)
    nr.refresh_from_db()
    assert (nr.state, nr.result) == (
        "succeeded",
        {"status": 200, "body": {"refreshed": True}},
    )
    assert api_server.calls == [("POST", "/refresh", b'{"x":1}')]
    workflows.advance(nr.workflow_run_id)
    assert nr.workflow_run.__class__.objects.get(pk=nr.workflow_run_id).state == (
        "succeeded"
    )


def test_http_node_to_loopback_fails_without_the_allow_list(api_server, sent, settings):
    settings.DIS_ALLOWED_NETWORKS = []
    api = Connector.objects.create(
        name=unique("api"),
        kind="rest",
        config={"base_url": f"http://127.0.0.1:{api_server.server_port}"},
    )
    nr = one_node_workflow("http", {"connector": api.name, "path": "/refresh"})
    workflows.run_action(nr.pk)
    nr.refresh_from_db()
    assert nr.state == "failed"
    assert api_server.calls == []


def test_sql_node_runs_one_parameterised_statement(pg_sink, sent):
    table = pg_sink.new_table()
    sink_query_setup = f'CREATE TABLE "{table}" (n int)'
    import psycopg

    cfg = pg_sink.config
    with psycopg.connect(
        host=cfg["host"], dbname=cfg["database"], user=cfg["user"], autocommit=True
    ) as conn:
        conn.execute(sink_query_setup)
    nr = one_node_workflow(
        "sql",
        {
            "connector": pg_sink.name,
            "statement": f'INSERT INTO "{table}" SELECT generate_series(1, %s)',
            "params": [3],
        },
    )
    workflows.run_action(nr.pk)
    nr.refresh_from_db()
    assert (nr.state, nr.result) == ("succeeded", {"rowcount": 3})
    assert sink_query(pg_sink, f'SELECT count(*) FROM "{table}"') == [(3,)]
    two = one_node_workflow(
        "sql", {"connector": pg_sink.name, "statement": "SELECT 1; SELECT 2"}
    )
    workflows.run_action(two.pk)
    two.refresh_from_db()
    assert two.state == "failed"
    assert "exactly one statement" in two.error


def test_wait_node_asks_again_until_its_timeout(monkeypatch, sent, generator_connector):
    from connectors.plugins.generator import GeneratorPlugin

    answers = [NotReadyError("not yet", retry_after=7), {"event": {"id": 1}}]

    def fake(cls, config, action, params, context=None):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(GeneratorPlugin, "run_action", classmethod(fake))
    republished: list[float] = []
    monkeypatch.setattr(
        orchestration, "publish", lambda sig, **kw: republished.append(kw["countdown"])
    )
    nr = one_node_workflow(
        "wait_event", {"connector": generator_connector.name, "timeout_seconds": 60}
    )
    workflows.run_action(nr.pk)
    nr.refresh_from_db()
    assert (nr.state, republished) == ("running", [7])
    workflows.run_action(nr.pk)
    nr.refresh_from_db()
    assert (nr.state, nr.result) == ("succeeded", {"event": {"id": 1}})

    # Past its timeout, a wait fails.
    answers.append(NotReadyError("still not", retry_after=7))
    late = one_node_workflow(
        "wait_event", {"connector": generator_connector.name, "timeout_seconds": 60}
    )
    NodeRun.objects.filter(pk=late.pk).update(
        started_at=timezone.now() - timedelta(seconds=61)
    )
    workflows.run_action(late.pk)
    late.refresh_from_db()
    assert late.state == "failed"
    assert "timed out waiting" in late.error
