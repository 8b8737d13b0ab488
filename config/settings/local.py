"""Zero-configuration local mode: SQLite, an embedded broker, generated keys.

For trying the service on one machine, not for durability: kombu's filesystem
transport does not redeliver a message whose worker died. Setting DATABASE_URL,
CELERY_BROKER_URL and REDIS_URL moves it onto PostgreSQL and Redis.
"""

from __future__ import annotations

from pathlib import Path

from config.settings.base import *  # noqa: F403
from config.settings.base import LOCAL_DIR, env

DEBUG = env.bool("DJANGO_DEBUG", default=True)
LOCAL_DIR.mkdir(parents=True, exist_ok=True)
# The embedded broker's folders must exist before a worker declares its queues.
for _folder in ("data_folder_in", "processed_folder"):
    if _folder in CELERY_BROKER_TRANSPORT_OPTIONS:  # noqa: F405
        Path(CELERY_BROKER_TRANSPORT_OPTIONS[_folder]).mkdir(  # noqa: F405
            parents=True, exist_ok=True
        )

if not SECRET_KEY:  # noqa: F405
    _key_file = LOCAL_DIR / "django-secret-key"
    if not _key_file.exists():
        import secrets

        _key_file.write_text(secrets.token_urlsafe(50))
        _key_file.chmod(0o600)
    SECRET_KEY = _key_file.read_text().strip()

#: One machine: the database and Kafka connectors of `make run` are on loopback.
DIS_DATA_ALLOWED_NETWORKS = env.list(
    "DIS_DATA_ALLOWED_NETWORKS", default=["127.0.0.0/8", "::1/128"]
)

#: Generate a Fernet key once into the git-ignored local folder when none is set.
DIS_ENCRYPTION_KEYS_GENERATE = True
