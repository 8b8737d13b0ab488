"""Cancel a queued or running run."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from integration import services
from integration.models import Run


class Command(BaseCommand):
    help = "Cancel run ID: no new chunk starts; committed chunks stay committed."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("run_id", type=int)
        parser.add_argument("--reason", default="cancelled from the command line")

    def handle(self, *args: Any, **options: Any) -> None:
        run = Run.objects.filter(pk=options["run_id"]).first()
        if run is None:
            raise CommandError(f"no run {options['run_id']}")
        if not services.cancel_run(run.pk, options["reason"]):
            raise CommandError(f"run {run.pk} already ended ({run.state})")
        self.stdout.write(f"run {run.pk} cancelled")
