"""Choices of the connectors app."""

from __future__ import annotations

from django.db import models


class CheckStatus(models.TextChoices):
    UNKNOWN = "unknown", "Unknown"
    OK = "ok", "OK"
    FAILED = "failed", "Failed"
