"""Partial aggregates of an aggregate step and their exact merge.

Each chunk's rows are grouped into a *partial* table: per group, a count, a
sum, a min, a max, an avg as sum and count, and a count distinct as the list
of the group's distinct values. Merging any split of the rows' partials gives
exactly what one pass over all rows gives (float sums up to the rounding of
the summation order). Both queries run in DuckDB over Arrow tables.
"""

# The module renders SQL from quoted identifiers and internal names only.
# ruff: noqa: S608

from __future__ import annotations

import duckdb
import pyarrow as pa

from transforms.engine.connection import first_line
from transforms.engine.exceptions import EngineError, StepConfigError
from transforms.engine.planner import MEASURE_PREFIX
from transforms.engine.sql import quote_ident
from transforms.engine.steps import AggregateStep, partial_columns

ROWS_VIEW = "__engine_agg_rows"
PARTIALS_VIEW = "__engine_agg_partials"


def _sum(sql: str, arrow_type: pa.DataType) -> str:
    """Sum that keeps integers as BIGINT (DuckDB widens them to HUGEINT)."""
    if pa.types.is_integer(arrow_type):
        return f"CAST(sum({sql}) AS BIGINT)"
    return f"sum({sql})"


def _group_by(step: AggregateStep) -> str:
    if not step.group_by:
        return ""
    return " GROUP BY " + ", ".join(quote_ident(k) for k in step.group_by)


def partial_sql(
    step: AggregateStep, rows: pa.Schema, source: str, *, only: int | None = None
) -> str:
    """The query grouping row values into partial aggregates.

    Args:
        step: the aggregate step.
        rows: schema of ``source``: the group keys (named as in ``group_by``)
            and one ``__engine_measure_<n>`` column per measure with an expr.
        source: the view of the rows.
        only: the index of the one measure to compute (to find a culprit).

    Returns:
        The SQL.
    """
    select = [quote_ident(k) for k in step.group_by]
    for n, m in enumerate(step.measures):
        if only is not None and n != only:
            continue
        value = f"{MEASURE_PREFIX}{n}"
        columns = [quote_ident(c) for c in partial_columns(m.name, m.fn)]
        if m.fn == "count":
            select.append(f"count({value if m.sql else '*'}) AS {columns[0]}")
        elif m.fn == "sum":
            select.append(f"{_sum(value, rows.field(value).type)} AS {columns[0]}")
        elif m.fn in ("min", "max"):
            select.append(f"{m.fn}({value}) AS {columns[0]}")
        elif m.fn == "avg":
            select.append(f"{_sum(value, rows.field(value).type)} AS {columns[0]}")
            select.append(f"count({value}) AS {columns[1]}")
        else:  # count_distinct
            select.append(
                f"list(DISTINCT {value}) FILTER (WHERE {value} IS NOT NULL) "
                f"AS {columns[0]}"
            )
    return f"SELECT {', '.join(select)} FROM {source}{_group_by(step)}"


def merge_sql(
    step: AggregateStep, partials: pa.Schema, source: str, *, final: bool
) -> str:
    """The query merging partial aggregates, into final values or a partial.

    Args:
        step: the aggregate step.
        partials: schema of the partial tables.
        source: the view of the concatenated partial tables.
        final: True for the final values, False for one merged partial.

    Returns:
        The SQL.
    """
    select = [quote_ident(k) for k in step.group_by]
    for m in step.measures:
        names = partial_columns(m.name, m.fn)
        first = quote_ident(names[0])
        out = quote_ident(m.name)
        if m.fn == "count":
            select.append(f"CAST(coalesce(sum({first}), 0) AS BIGINT) AS {first}")
        elif m.fn == "sum":
            select.append(f"{_sum(first, partials.field(names[0]).type)} AS {first}")
        elif m.fn in ("min", "max"):
            select.append(f"{m.fn}({first}) AS {first}")
        elif m.fn == "avg":
            total = _sum(first, partials.field(names[0]).type)
            count = f"CAST(coalesce(sum({quote_ident(names[1])}), 0) AS BIGINT)"
            if final:
                select.append(
                    f"CASE WHEN {count} > 0 "
                    f"THEN CAST({total} AS DOUBLE) / {count} END AS {out}"
                )
            else:
                select.append(f"{total} AS {first}, {count} AS {quote_ident(names[1])}")
        else:  # count_distinct
            values = f"list_distinct(flatten(list({first})))"
            if final:
                select.append(f"CAST(coalesce(length({values}), 0) AS BIGINT) AS {out}")
            else:
                select.append(f"{values} AS {first}")
    return f"SELECT {', '.join(select)} FROM {source}{_group_by(step)}"


def run_view(
    con: duckdb.DuckDBPyConnection, view: str, table: pa.Table, sql: str
) -> pa.Table:
    """Run ``sql`` with ``table`` registered as ``view``."""
    con.register(view, table)
    try:
        return con.sql(sql).to_arrow_table()
    finally:
        con.unregister(view)


class AggregateQueries:
    """An aggregate step's queries for one schema of its input rows.

    Attributes:
        partial_schema: schema of a partial table (``run()``'s output).
        final_schema: schema of the merged result.
    """

    def __init__(
        self, con: duckdb.DuckDBPyConnection, step: AggregateStep, rows: pa.Schema
    ) -> None:
        self.step = step
        self.rows = rows
        self.partial_sql = partial_sql(step, rows, ROWS_VIEW)
        try:
            empty = run_view(con, ROWS_VIEW, rows.empty_table(), self.partial_sql)
        except duckdb.Error as error:
            raise StepConfigError(self._culprit(con), first_line(error)) from error
        self.partial_schema = empty.schema
        self.final_schema = merged_schema(con, step, self.partial_schema)

    def _culprit(self, con: duckdb.DuckDBPyConnection) -> str:
        """Path of the first measure whose aggregate does not bind."""
        for n, m in enumerate(self.step.measures):
            sql = partial_sql(self.step, self.rows, ROWS_VIEW, only=n)
            try:
                run_view(con, ROWS_VIEW, self.rows.empty_table(), sql)
            except duckdb.Error:
                return m.path
        return f"steps[{self.step.index}]"

    def partials(self, con: duckdb.DuckDBPyConnection, rows: pa.Table) -> pa.Table:
        """Group one batch's rows into partial aggregates.

        Raises:
            EngineError: the grouping failed (e.g. an integer sum overflows).
        """
        try:
            table = run_view(con, ROWS_VIEW, rows, self.partial_sql)
        except duckdb.Error as error:
            raise EngineError(f"the aggregate failed: {first_line(error)}") from error
        return table


def merged_schema(
    con: duckdb.DuckDBPyConnection, step: AggregateStep, partials: pa.Schema
) -> pa.Schema:
    """The final schema of merged partials of schema ``partials``."""
    sql = merge_sql(step, partials, PARTIALS_VIEW, final=True)
    return run_view(con, PARTIALS_VIEW, partials.empty_table(), sql).schema


def merge(
    con: duckdb.DuckDBPyConnection,
    step: AggregateStep,
    partials: pa.Schema,
    tables: list[pa.Table],
    *,
    final: bool,
) -> pa.Table:
    """Merge partial tables (cast to ``partials``) into final values or a partial.

    Raises:
        EngineError: a table does not fit the partial schema, or the merge
            failed (e.g. an integer sum overflows).
    """
    try:
        cast = [t.select(partials.names).cast(partials) for t in tables]
    except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        raise EngineError(f"not a partial of this aggregate: {error}") from error
    combined = pa.concat_tables([partials.empty_table(), *cast])
    sql = merge_sql(step, partials, PARTIALS_VIEW, final=final)
    try:
        result = run_view(con, PARTIALS_VIEW, combined, sql)
    except duckdb.Error as error:
        raise EngineError(f"the merge failed: {first_line(error)}") from error
    return result if final else result.cast(partials)


def static_queries(
    con: duckdb.DuckDBPyConnection, step: AggregateStep, static_rows: pa.Schema
) -> AggregateQueries:
    """The aggregate's queries typed from the compile-time schema of its rows.

    Args:
        con: the pipeline's connection.
        step: the aggregate step.
        static_rows: the columns the step reads (the last map's fields).

    Raises:
        StepConfigError: a key or measure does not bind.
    """
    select = [f"{quote_ident(k)} AS {quote_ident(k)}" for k in step.group_by]
    paths = [
        f"steps[{step.index}].group_by[{n}] ({k})" for n, k in enumerate(step.group_by)
    ]
    for n, m in enumerate(step.measures):
        if m.sql is not None:
            select.append(f"({m.sql}) AS {MEASURE_PREFIX}{n}")
            paths.append(m.path)
    rows_table = static_rows.empty_table()
    if not select:
        return AggregateQueries(con, step, pa.schema([]))
    try:
        rows = run_view(
            con, ROWS_VIEW, rows_table, f"SELECT {', '.join(select)} FROM {ROWS_VIEW}"
        ).schema
    except duckdb.Error as error:
        for path, sql in zip(paths, select, strict=True):
            try:
                run_view(con, ROWS_VIEW, rows_table, f"SELECT {sql} FROM {ROWS_VIEW}")
            except duckdb.Error as probe_error:
                raise StepConfigError(path, first_line(probe_error)) from error
        raise StepConfigError(f"steps[{step.index}]", first_line(error)) from error
    return AggregateQueries(con, step, rows)
