"""Webhook notifications: through the SSRF guard, with the correlation id."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import pytest

from connectors.ssrf import UnsafeUrlError
from integration import notifications, orchestration, services
from integration.models import Pipeline, Run
from tests.helpers import unique

pytestmark = pytest.mark.django_db

STEPS = [{"type": "map", "fields": [{"name": "id", "expr": "id", "type": "integer"}]}]


@pytest.fixture
def hook_server():
    received: list[tuple[dict, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((dict(self.headers), body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.received = received
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def failed_run(generator_connector, sqlite_sink, hook_server, monkeypatch, settings):
    settings.DIS_ALLOWED_NETWORKS = ["127.0.0.1/32"]
    monkeypatch.setattr(orchestration, "send_plan", lambda *a: None)
    pipeline = Pipeline.objects.create(
        name=unique("p"),
        source=generator_connector,
        sink=sqlite_sink,
        steps=STEPS,
        sink_options={"table": "t"},
        notify_url=f"http://127.0.0.1:{hook_server.server_port}/hooks/dis",
    )
    services.freeze_version(pipeline)
    run = services.start_run(pipeline.pk, correlation_id="corr-hook")
    Run.objects.filter(pk=run.pk).update(state="failed", error="boom")
    return run


def test_failed_run_is_posted_with_the_correlation_id(failed_run, hook_server):
    assert notifications.notify(failed_run.pk) == 204
    ((headers, body),) = hook_server.received
    assert headers["X-Correlation-ID"] == "corr-hook"
    payload = orjson.loads(body)
    assert (payload["event"], payload["run"], payload["error"]) == (
        "run.failed",
        failed_run.pk,
        "boom",
    )


def test_loopback_webhook_is_refused_without_allow_list(
    failed_run, hook_server, settings
):
    settings.DIS_ALLOWED_NETWORKS = []
    with pytest.raises(UnsafeUrlError):
        notifications.notify(failed_run.pk)
    assert hook_server.received == []


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:127.0.0.1]/x",
        "file:///etc/passwd",
    ],
    ids=["loopback", "metadata", "mapped-v6", "file"],
)
def test_unsafe_notify_url_is_400(api, generator_connector, sqlite_sink, url):
    response = api.post(
        "/api/v1/pipelines/",
        {
            "name": unique("p"),
            "source": generator_connector.name,
            "sink": sqlite_sink.name,
            "steps": STEPS,
            "sink_options": {"table": "t"},
            "notify_url": url,
        },
        format="json",
    )
    assert response.status_code == 400
    assert "notify_url" in response.json()


def test_stopping_a_run_sends_the_notification(failed_run, monkeypatch):
    sent: list[int] = []
    monkeypatch.setattr(
        orchestration, "send_notification", lambda rid, cid: sent.append(rid)
    )
    Run.objects.filter(pk=failed_run.pk).update(state="running")
    services.stop_run(failed_run.pk, "failed", "policy")
    assert sent == [failed_run.pk]
