"""Production: every required secret comes from the environment (or NAME_FILE).

A missing one stops start-up rather than running with a default.
"""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured

from config.settings.base import *  # noqa: F403
from config.settings.base import env, env_secret


def required_secret(name: str) -> str:
    value = env_secret(name)
    if not value:
        raise ImproperlyConfigured(f"{name} (or {name}_FILE) must be set in production")
    return value


DEBUG = False
SECRET_KEY = required_secret("DJANGO_SECRET_KEY")
DIS_ENCRYPTION_KEYS = required_secret("DIS_ENCRYPTION_KEYS")
DATABASES = {"default": database_from_env(env.str("DATABASE_URL"))}  # noqa: F405
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL")
REDIS_URL = env.str("REDIS_URL")

SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=True)
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$"]
SECURE_HSTS_SECONDS = env.int("DJANGO_SECURE_HSTS_SECONDS", default=31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = True
SECURE_HSTS_PRELOAD = True
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

# The admin's CSS and JavaScript, collected into STATIC_ROOT when the image is
# built (docker/Dockerfile) and served by the API process: no separate web server.
MIDDLEWARE = [*MIDDLEWARE]  # noqa: F405
MIDDLEWARE.insert(
    MIDDLEWARE.index("django.middleware.security.SecurityMiddleware") + 1,
    "whitenoise.middleware.WhiteNoiseMiddleware",
)
