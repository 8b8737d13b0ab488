"""Consume File Processing Service events and start the bound pipelines' runs."""

from __future__ import annotations

import time
from typing import Any

import orjson
from django.core.management.base import BaseCommand, CommandParser

from integration import file_triggers


class Command(BaseCommand):
    help = (
        "Read the topics of the active file triggers to their end and start a run "
        "per matching event (what beat's `integration.file_triggers` does); with "
        "--interval, keep doing it."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--interval",
            type=float,
            default=0.0,
            help="Seconds between passes; 0 (default) makes a single pass.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        interval = options["interval"]
        while True:
            counts = file_triggers.consume_file_events()
            self.stdout.write(
                orjson.dumps(counts, option=orjson.OPT_SORT_KEYS).decode()
            )
            if interval <= 0:
                return
            time.sleep(interval)
