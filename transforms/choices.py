"""Choices of the transforms app."""

from __future__ import annotations

from django.db import models


class Compatibility(models.TextChoices):
    """What a new schema version must keep with the previous one."""

    BACKWARD = "backward", "Backward (the new schema reads old data)"
    FORWARD = "forward", "Forward (the old schema reads new data)"
    FULL = "full", "Full (both)"
    NONE = "none", "None (no check)"


class PreviewValues(models.TextChoices):
    """How preview records become the engine's input columns."""

    TEXT = "text", "Text, like a CSV source gives them"
    TYPED = "typed", "Typed, as Arrow infers them from the JSON values"
