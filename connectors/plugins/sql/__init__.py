"""SQL connector kinds: `postgres`, `mysql` (MariaDB/MySQL) and `sqlite`.

Each kind lives in its own module and is imported on first attribute access, so asking
for `SqlitePlugin` never imports the PostgreSQL driver. Pure Python (no Django).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from connectors.plugins.sql.mysql import MysqlPlugin
    from connectors.plugins.sql.postgres import PostgresPlugin
    from connectors.plugins.sql.sqlite import SqlitePlugin

__all__ = ["MysqlPlugin", "PostgresPlugin", "SqlitePlugin"]

_MODULES = {
    "MysqlPlugin": "connectors.plugins.sql.mysql",
    "PostgresPlugin": "connectors.plugins.sql.postgres",
    "SqlitePlugin": "connectors.plugins.sql.sqlite",
}


def __getattr__(name: str) -> Any:
    try:
        module = _MODULES[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    return getattr(importlib.import_module(module), name)
