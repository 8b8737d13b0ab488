"""Resume a failed or cancelled run: only its uncommitted chunks run again."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from integration import services
from integration.exceptions import ResumeRefusedError
from integration.management.commands.run_pipeline import follow
from integration.models import Run


class Command(BaseCommand):
    help = "Resume run ID; exits non-zero when refused or when a waited run fails."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("run_id", type=int)
        parser.add_argument(
            "--current-version",
            action="store_true",
            help="Process the remaining chunks with the pipeline's current version.",
        )
        parser.add_argument("--wait", action="store_true", help="Follow the run.")
        parser.add_argument("--timeout", type=float, default=0)

    def handle(self, *args: Any, **options: Any) -> None:
        if not Run.objects.filter(pk=options["run_id"]).exists():
            raise CommandError(f"no run {options['run_id']}")
        try:
            run = services.resume_run(
                options["run_id"], use_current_version=options["current_version"]
            )
        except ResumeRefusedError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"run {run.pk} resumed (version {run.version.number})")
        if options["wait"]:
            follow(self, run, timeout=options["timeout"], interval=0.5)
