"""Re-encrypt every credential with the newest key. Resumable."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction

from connectors.crypto import keyring
from connectors.models import Credential


class Command(BaseCommand):
    help = (
        "Re-encrypt credentials still encrypted under an older key with the newest "
        "key (the first of DIS_ENCRYPTION_KEYS). Each row commits on its own, so an "
        "interrupted rotation is finished by running the command again."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--limit", type=int, default=0, help="Stop after N rows (0: all)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        ring = keyring()
        primary = ring.primary_id
        todo = Credential.objects.exclude(key_id=primary).order_by("pk")
        total = todo.count()
        done = 0
        for pk in todo.values_list("pk", flat=True).iterator():
            with transaction.atomic():
                row = (
                    Credential.objects.select_for_update()
                    .filter(pk=pk)
                    .exclude(key_id=primary)
                    .first()
                )
                if row is None:  # rotated by a concurrent run of this command
                    continue
                row.ciphertext, row.key_id = ring.rotate(row.ciphertext)
                row.save(update_fields=["ciphertext", "key_id", "updated_at"])
            done += 1
            if options["limit"] and done >= options["limit"]:
                break
        left = Credential.objects.exclude(key_id=primary).count()
        self.stdout.write(
            f"re-encrypted {done} of {total} credential(s) with key {primary}; "
            f"{left} left"
        )
