"""Connector kind -> plugin class, imported on first use.

Built-in kinds are dotted paths so the web process never imports a database or Kafka
driver it does not use. Third-party kinds join through the `dis.connectors`
entry-point group; a kind defined twice is an error. Pure Python (no Django).
"""

from __future__ import annotations

import importlib
import os
from functools import cache
from importlib.metadata import entry_points

from connectors.base import Plugin
from connectors.exceptions import RegistryError

ENTRY_POINT_GROUP = "dis.connectors"
ENV_PATHS = "DIS_CONNECTOR_PATHS"

BUILTIN_KINDS: dict[str, str] = {
    "generator": "connectors.plugins.generator:GeneratorPlugin",
    "files": "connectors.plugins.files:FilesPlugin",
    "kafka": "connectors.plugins.kafka:KafkaPlugin",
    "postgres": "connectors.plugins.sql:PostgresPlugin",
    "sqlite": "connectors.plugins.sql:SqlitePlugin",
    "mysql": "connectors.plugins.sql:MysqlPlugin",
    "rest": "connectors.plugins.rest:RestPlugin",
    "file_processing": "connectors.plugins.file_processing:FileProcessingPlugin",
}


@cache
def available_kinds() -> dict[str, str]:
    """Every known kind and the dotted path of its plugin class.

    Raises:
        RegistryError: when two plugins claim the same kind.
    """
    kinds = dict(BUILTIN_KINDS)
    extra = [(ep.name, ep.value) for ep in entry_points(group=ENTRY_POINT_GROUP)]
    extra += _paths_from_environment()
    for name, value in extra:
        if name in kinds:
            raise RegistryError(
                f"connector kind {name!r} is defined twice: {kinds[name]} and {value}"
            )
        kinds[name] = value
    return kinds


def _paths_from_environment() -> list[tuple[str, str]]:
    """`DIS_CONNECTOR_PATHS="kind=package.module:Class,..."`: plugins not packaged
    with an entry point (a deployment's own module, test fault injectors)."""
    pairs = []
    for item in os.environ.get(ENV_PATHS, "").split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        if not sep or ":" not in value:
            raise RegistryError(
                f"{ENV_PATHS}: expected kind=module:Class, got {item!r}"
            )
        pairs.append((name.strip(), value.strip()))
    return pairs


@cache
def get_plugin(kind: str) -> type[Plugin]:
    """The plugin class of `kind`, importing its module on first use.

    Raises:
        RegistryError: for an unknown kind or a path that does not name a Plugin.
    """
    try:
        path = available_kinds()[kind]
    except KeyError:
        raise RegistryError(f"unknown connector kind {kind!r}") from None
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RegistryError(
            f"connector kind {kind!r} cannot be loaded: {exc}"
        ) from None
    plugin = getattr(module, attr, None)
    if not (isinstance(plugin, type) and issubclass(plugin, Plugin)):
        raise RegistryError(f"{path} is not a connector Plugin class")
    if plugin.kind != kind:
        raise RegistryError(f"{path} declares kind {plugin.kind!r}, not {kind!r}")
    return plugin


def kind_choices() -> list[tuple[str, str]]:
    """(kind, kind) pairs for forms; does not import any plugin."""
    return [(kind, kind) for kind in sorted(available_kinds())]
