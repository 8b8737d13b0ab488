"""Settings for the test suite: the machine's real PostgreSQL and Redis."""

from __future__ import annotations

import os

os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/dis")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/14")
os.environ.setdefault("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15")
os.environ.setdefault("LOG_LEVEL", "INFO")

from config.settings.base import *  # noqa: F403
from config.settings.base import LOCAL_DIR

SECRET_KEY = "test-only-not-secret"  # noqa: S105
DIS_ENCRYPTION_KEYS = os.environ.get(
    "DIS_ENCRYPTION_KEYS", "qXkRhVQ3uP9yR8n0b6mMZqJx3cW2nK9tF0e5sHhYp1g="
)
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
LOCAL_DIR.mkdir(parents=True, exist_ok=True)
REST_FRAMEWORK = {**REST_FRAMEWORK, "DEFAULT_THROTTLE_CLASSES": []}  # noqa: F405
