"""gunicorn.conf.py: the settings gunicorn reads from the repository root."""

from __future__ import annotations

import gc
import runpy
from pathlib import Path

CONF = Path(__file__).resolve().parents[2] / "gunicorn.conf.py"


def test_workers_come_from_web_concurrency(monkeypatch):
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    assert runpy.run_path(str(CONF))["workers"] == 4
    monkeypatch.setenv("WEB_CONCURRENCY", "7")
    assert runpy.run_path(str(CONF))["workers"] == 7


def test_a_loaded_worker_freezes_the_app_out_of_the_collectors_reach():
    conf = runpy.run_path(str(CONF))
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    try:
        conf["post_worker_init"](None)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
