"""Start a run of a pipeline; with --wait, follow it to the end."""

from __future__ import annotations

import sys
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from config import correlation
from integration import services
from integration.choices import RunTrigger
from integration.exceptions import PipelinePausedError
from integration.models import Pipeline, Run

BAR_WIDTH = 30


def progress_line(run: Run) -> str:
    total = run.chunks_total or 0
    done = run.chunks_done
    filled = int(BAR_WIDTH * done / total) if total else 0
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    return (
        f"[{bar}] {done}/{total} chunks  read {run.records_read:,}  "
        f"written {run.records_written:,}  rejected {run.records_rejected:,}  "
        f"{run.state}"
    )


class Command(BaseCommand):
    help = "Start a run of pipeline NAME. Exits non-zero when a waited run fails."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name")
        parser.add_argument("--wait", action="store_true", help="Follow the run.")
        parser.add_argument(
            "--timeout", type=float, default=0, help="Give up waiting after N seconds."
        )
        parser.add_argument("--interval", type=float, default=0.5)

    def handle(self, *args: Any, **options: Any) -> None:
        pipeline = Pipeline.objects.filter(name=options["name"]).first()
        if pipeline is None:
            raise CommandError(f"no pipeline named {options['name']!r}")
        cid = correlation.new_id()
        correlation.bind(cid)
        try:
            run = services.start_run(
                pipeline.pk, trigger=RunTrigger.MANUAL, correlation_id=cid
            )
        except PipelinePausedError as exc:
            raise CommandError(str(exc)) from None
        assert run is not None  # noqa: S101 - only scheduled runs can be skipped
        self.stdout.write(f"run {run.pk} queued (correlation id {cid})")
        if options["wait"]:
            follow(self, run, timeout=options["timeout"], interval=options["interval"])


def follow(command: BaseCommand, run: Run, *, timeout: float, interval: float) -> None:
    """Show a progress bar until the run ends; CommandError when it failed."""
    started = time.monotonic()
    tty = sys.stdout.isatty()
    last = ""
    while True:
        run.refresh_from_db()
        line = progress_line(run)
        if tty:
            command.stdout.write("\r" + line, ending="")
            command.stdout.flush()
        elif line != last:
            command.stdout.write(line)
        last = line
        if run.is_terminal:
            break
        if timeout and time.monotonic() - started > timeout:
            raise CommandError(f"run {run.pk} still {run.state} after the timeout")
        time.sleep(interval)
    if tty:
        command.stdout.write("")
    seconds = run.duration_seconds or 0.0
    rate = run.records_read / seconds if seconds else 0.0
    command.stdout.write(
        f"run {run.pk} {run.state}: read {run.records_read:,}, written "
        f"{run.records_written:,}, rejected {run.records_rejected:,}, filtered "
        f"{run.records_filtered:,}, dead letters {run.records_dead_lettered:,} in "
        f"{seconds:.2f} s ({rate:,.0f} records/s)"
    )
    if run.error:
        command.stdout.write(f"reason: {run.error}")
    if run.state in ("failed", "cancelled"):
        raise CommandError(f"run {run.pk} {run.state}")
