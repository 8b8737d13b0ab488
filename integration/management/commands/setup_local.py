"""Prepare the zero-config local service: an admin user and the flights example."""

from __future__ import annotations

import secrets
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser
from django.db import connection

from connectors.models import Connector, Credential
from integration import services
from integration.examples.flights import FLIGHTS_STEPS, write_flights_csv
from integration.models import Pipeline

EXAMPLE = "flights-example"


class Command(BaseCommand):
    help = "Create the local admin user and the flights example pipeline (idempotent)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--no-example", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        self._admin()
        if not options["no_example"]:
            self._example()

    def _admin(self) -> None:
        user_model = get_user_model()
        password_file = settings.LOCAL_DIR / "admin-password"
        if not user_model.objects.filter(username="admin").exists():
            password = secrets.token_urlsafe(12)
            user_model.objects.create_superuser("admin", "admin@localhost", password)
            password_file.write_text(password + "\n")
            password_file.chmod(0o600)
        password = (
            password_file.read_text().strip()
            if password_file.exists()
            else "(set before; see `manage.py changepassword admin`)"
        )
        self.stdout.write(
            "\nLog in to http://127.0.0.1:8000/admin/ as admin with password "
            f"{password}\n"
            "Get an API token: .venv/bin/python manage.py create_api_token admin\n"
            "then: curl -H 'Authorization: Token <token>' "
            "http://127.0.0.1:8000/api/v1/runs/\n"
        )

    def _example(self) -> None:
        data_dir = settings.LOCAL_DIR / "data"
        csv_path = data_dir / "flights.csv"
        if not csv_path.exists():
            rows = write_flights_csv(csv_path)
            self.stdout.write(f"wrote {rows:,} flights to {csv_path}")
        source, _ = Connector.objects.update_or_create(
            name="local-files",
            defaults={"kind": "files", "config": {"root": str(data_dir)}},
        )
        db = settings.DATABASES["default"]
        if connection.vendor == "postgresql":
            sink_config = {
                "host": db.get("HOST") or "127.0.0.1",
                "port": int(db.get("PORT") or 5432),
                "database": db["NAME"],
                "user": db.get("USER") or "postgres",
            }
            credential = None
            if db.get("PASSWORD"):
                credential = Credential.objects.filter(name="local-postgres").first()
                credential = credential or Credential(name="local-postgres")
                credential.set_secrets({"password": db["PASSWORD"]})
                credential.save()
            sink, _ = Connector.objects.update_or_create(
                name="local-postgres",
                defaults={
                    "kind": "postgres",
                    "config": sink_config,
                    "credential": credential,
                },
            )
        else:
            sink, _ = Connector.objects.update_or_create(
                name="local-sqlite",
                defaults={
                    "kind": "sqlite",
                    "config": {"path": str(settings.LOCAL_DIR / "warehouse.sqlite3")},
                },
            )
        pipeline, _ = Pipeline.objects.update_or_create(
            name=EXAMPLE,
            defaults={
                "description": "NYC 2013 flights: CSV -> map + validate -> table",
                "source": source,
                "source_options": {"path": "flights.csv"},
                "steps": FLIGHTS_STEPS,
                "sink": sink,
                "sink_options": {"table": "flights", "write_mode": "append"},
                "chunk_rows": 50_000,
            },
        )
        version = services.freeze_version(pipeline)
        self.stdout.write(
            f"example pipeline {EXAMPLE} v{version.number}: "
            f"{source.name} -> {sink.name}.flights\n"
            f"run it: .venv/bin/python manage.py run_pipeline {EXAMPLE} --wait\n"
        )
