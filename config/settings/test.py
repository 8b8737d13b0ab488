"""Settings for the test suite: the machine's real PostgreSQL and Redis."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

#: Two checkouts on one machine (a developer's and CI's) must not share a test
#: database, broker queues or staged batches: names carry a tag of the checkout.
CHECKOUT_TAG = hashlib.sha1(  # noqa: S324 - a name, not security
    str(Path(__file__).resolve().parents[2]).encode()
).hexdigest()[:8]

os.environ.setdefault(
    "DATABASE_URL", f"postgres://postgres@127.0.0.1:5432/dis_{CHECKOUT_TAG}"
)
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/14")
os.environ.setdefault("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15")
os.environ.setdefault("DIS_STAGING_PREFIX", f"dis:{CHECKOUT_TAG}:stage")
os.environ.setdefault("LOG_LEVEL", "INFO")
# The machine's PostgreSQL, MariaDB and the Tansu brokers are on loopback.
os.environ.setdefault("DIS_DATA_ALLOWED_NETWORKS", "127.0.0.0/8,::1/128")

from config.settings.base import *  # noqa: E402, F403
from config.settings.base import LOCAL_DIR  # noqa: E402

SECRET_KEY = "test-only-not-secret"  # noqa: S105
DIS_ENCRYPTION_KEYS = os.environ.get(
    "DIS_ENCRYPTION_KEYS", "qXkRhVQ3uP9yR8n0b6mMZqJx3cW2nK9tF0e5sHhYp1g="
)
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
LOCAL_DIR.mkdir(parents=True, exist_ok=True)
CELERY_BROKER_TRANSPORT_OPTIONS = {
    **CELERY_BROKER_TRANSPORT_OPTIONS,  # noqa: F405
    "global_keyprefix": f"dis:{CHECKOUT_TAG}:",
}
REST_FRAMEWORK = {**REST_FRAMEWORK, "DEFAULT_THROTTLE_CLASSES": []}  # noqa: F405
