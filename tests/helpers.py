"""Small helpers shared by tests."""

from __future__ import annotations

import time
import uuid


def unique(prefix: str) -> str:
    """A name no other test (or earlier run) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def wait_for_run(run_id: int, timeout: float = 180):
    """Poll the database until the run is terminal; returns the run."""
    from integration.models import Run

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = Run.objects.get(pk=run_id)
        if run.is_terminal:
            return run
        time.sleep(0.25)
    run = Run.objects.get(pk=run_id)
    chunks = list(
        run.chunks.values_list(
            "seq", "state", "attempts", "step", "step_open", "crashes", "step_owner"
        )
    )
    raise AssertionError(
        f"run {run_id} not finished after {timeout}s: {run.state}; chunks {chunks}"
    )
