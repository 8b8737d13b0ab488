"""Per-process caches for workers: compiled pipeline versions and open connectors.

A pipeline version compiles once per worker process, not once per chunk; sources and
sinks keep their pools for the life of the process.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from django.conf import settings

from connectors.models import Connector
from integration.models import PipelineVersion


@lru_cache(maxsize=32)
def compiled_version(version_id: int) -> Any:
    """The engine's compiled form of a pipeline version (immutable, so cacheable)."""
    version = PipelineVersion.objects.get(pk=version_id)
    return compile_spec(version.spec)


def compile_spec(spec: dict[str, Any]) -> Any:
    """Compile a version spec's steps as workers do (a new, uncached pipeline:
    the caller closes it)."""
    from transforms.engine import compile_steps

    return compile_steps(
        spec["steps"],
        timezone=settings.TIME_ZONE,
        threads=settings.DIS_ENGINE_THREADS,
        memory_limit=settings.DIS_ENGINE_MEMORY_LIMIT,
    )


def open_source(connector_id: int) -> Any:
    connector = Connector.objects.select_related("credential").get(pk=connector_id)
    return connector.open_source()


def open_sink(connector_id: int) -> Any:
    connector = Connector.objects.select_related("credential").get(pk=connector_id)
    return connector.open_sink()


def reset() -> None:
    """Forget cached objects (tests, and after a fork)."""
    from integration import references

    compiled_version.cache_clear()
    references.clear_local()
