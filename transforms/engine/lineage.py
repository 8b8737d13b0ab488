"""Column lineage: which source columns each output field is computed from.

Follows each field's expression back through the steps (a map's fields read
the previous step's columns; a mask keeps a column's sources; filter and
validate steps change no values, so they add none; an enrich field reads
``<reference>.<column>``). Derived from the parsed
expressions, with sqlglot: no query runs.
"""

from __future__ import annotations

from collections.abc import Sequence

from transforms.engine.expressions import expression_columns
from transforms.engine.steps import AggregateStep, EnrichStep, MapStep, Step


def column_lineage(
    steps: Sequence[Step], outputs: Sequence[str]
) -> dict[str, list[str]]:
    """Map each output field to the source columns its value reads.

    Args:
        steps: the parsed steps.
        outputs: the output field names (the last map's fields, the source
            columns without a map, or an aggregate's keys and measures).

    Returns:
        ``{field: sorted source column names}``; a constant (``'nyc'``) or
        ``count(*)`` reads none. Nested references name their top column.
    """
    # Lower-case column name -> its source columns; a name not in it is a
    # source column passed through unchanged.
    sources: dict[str, set[str]] = {}

    def reads(sql: str) -> set[str]:
        found: set[str] = set()
        for column in expression_columns(sql):
            found |= sources.get(column.lower(), {column})
        return found

    for step in steps:
        if isinstance(step, MapStep):
            sources = {f.name.lower(): reads(f.sql) for f in step.fields}
        elif isinstance(step, EnrichStep):
            # Enrich fields read the reference's columns: "airlines.name".
            for f in step.fields:
                sources[f.name.lower()] = {
                    f"{step.reference}.{c}" for c in expression_columns(f.sql)
                }
        elif isinstance(step, AggregateStep):
            after = {k.lower(): sources.get(k.lower(), {k}) for k in step.group_by}
            for m in step.measures:
                after[m.name.lower()] = reads(m.sql) if m.sql else set()
            sources = after
    lineage: dict[str, list[str]] = {}
    for name in outputs:
        # DuckDB names are case-insensitive: list each column once.
        unique = {c.lower(): c for c in sorted(sources.get(name.lower(), {name}))}
        lineage[name] = sorted(unique.values(), key=str.lower)
    return lineage
