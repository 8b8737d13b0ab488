"""Project configuration: settings, Celery app, URLs, logging."""

from config.celery_app import app as celery_app

__all__ = ("celery_app",)
