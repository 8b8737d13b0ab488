"""Create an API token for a user (stored hashed; shown once)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from knox.models import AuthToken


class Command(BaseCommand):
    help = "Create an API token for USERNAME and print it once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument(
            "--expiry-hours",
            type=int,
            default=24 * 30,
            help="Hours until the token expires (0: never). Default 720.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        user = get_user_model().objects.filter(username=options["username"]).first()
        if user is None:
            raise CommandError(f"no user named {options['username']!r}")
        hours = options["expiry_hours"]
        if hours < 0:
            raise CommandError("--expiry-hours must be 0 or more")
        _, token = AuthToken.objects.create(
            user, expiry=timedelta(hours=hours) if hours else None
        )
        self.stdout.write(token)
