"""Checks user SQL expressions before they are compiled into the engine's query.

An expression is one scalar DuckDB expression over the columns of the previous
step: no statements, subqueries, table functions, aggregates or windows. The
check is defence in depth: the DuckDB connection is locked down as well.
"""

from __future__ import annotations

from collections.abc import Iterable

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError, TokenError

from transforms.engine.exceptions import StepConfigError

INTERNAL_PREFIX = "__engine"

# Subquery passes here only to be refused with a precise message below.
_EXPRESSION_ROOTS = (exp.Condition, exp.Interval, exp.Tuple, exp.Subquery)

# Node classes that make an expression more than a row-wise scalar expression.
_FORBIDDEN: tuple[tuple[type[exp.Expression], str], ...] = (
    (exp.Subquery, "subqueries are not allowed"),
    (exp.Query, "subqueries are not allowed"),
    (exp.Exists, "subqueries are not allowed"),
    (exp.Values, "VALUES lists are not allowed"),
    (exp.Table, "table references are not allowed"),
    (exp.From, "table references are not allowed"),
    (exp.Join, "table references are not allowed"),
    (exp.Placeholder, "parameters are not allowed"),
    (exp.Parameter, "parameters are not allowed"),
    (exp.Window, "window functions are not allowed"),
    (exp.AggFunc, "aggregate functions are not allowed"),
    (exp.Explode, "unnest changes the number of rows and is not allowed"),
    (exp.Unnest, "unnest changes the number of rows and is not allowed"),
    (exp.Star, "'*' is not allowed"),
    (exp.Columns, "COLUMNS(...) is not allowed"),
    (exp.Alias, "aliases are not allowed; name the field instead"),
)

_FORBIDDEN_FUNCTIONS = frozenset(
    {
        "query",
        "query_table",
        "glob",
        "getenv",
        "sniff_csv",
        "nextval",
        "currval",
        "setseed",
        "getvariable",
        "unnest",
    }
)
_FORBIDDEN_FUNCTION_PREFIXES = ("read_", "parquet_", "duckdb_", "pragma_", "iceberg_")


def _function_name(node: exp.Func) -> str:
    if isinstance(node, exp.Anonymous):
        return str(node.name).lower()
    return node.sql_name().lower()


def _is_forbidden_function(name: str) -> bool:
    return (
        name in _FORBIDDEN_FUNCTIONS
        or name.startswith(_FORBIDDEN_FUNCTION_PREFIXES)
        or name.endswith("_scan")
    )


def check_expression(
    text: object,
    *,
    path: str,
    columns: Iterable[str] | None = None,
) -> str:
    """Check one user expression and return the SQL to embed in the query.

    The returned SQL is sqlglot's rendering of the parsed tree in the DuckDB
    dialect, so what runs is exactly what was checked.

    Args:
        text: the expression as written in the step config.
        path: where the expression is in the config, for error messages.
        columns: the column names the expression may use, when known.

    Returns:
        The expression as DuckDB SQL.

    Raises:
        StepConfigError: the text is not a single allowed scalar expression.
    """
    if not isinstance(text, str) or not text.strip():
        raise StepConfigError(path, "expression must be a non-empty string")
    try:
        trees = sqlglot.parse(text, read="duckdb")
    except TokenError as error:
        # The tokenizer's message has no position (an unterminated string
        # or quoted name): find where the bad token starts.
        line, col = _token_error_position(text)
        raise StepConfigError(
            path,
            f"invalid SQL expression: unterminated string or quoted name "
            f"starting at Line {line}, Col: {col}.",
        ) from error
    except SqlglotError as error:
        # sqlglot's message ends with "Line <n>, Col: <m>." (1-based).
        first = str(error).splitlines()[0]
        raise StepConfigError(path, f"invalid SQL expression: {first}") from error
    trees = [tree for tree in trees if tree is not None]
    if len(trees) != 1:
        raise StepConfigError(path, "must be exactly one SQL expression")
    tree = trees[0]
    # An allowlist: scalar expressions are Conditions in sqlglot; statements
    # (SELECT, SET, COPY, ATTACH, DROP, PRAGMA, LOAD, ...) are not.
    if not isinstance(tree, _EXPRESSION_ROOTS):
        kind = (
            str(tree.this).split()[0].upper()
            if isinstance(tree, exp.Command)
            else tree.key.upper()
        )
        raise StepConfigError(path, f"statements are not allowed ({kind})")

    known = {c.lower() for c in columns} if columns is not None else None
    lambda_args = {
        ident.name.lower()
        for node in tree.find_all(exp.Lambda)
        for ident in node.expressions
    }
    for node in tree.walk():
        for node_class, message in _FORBIDDEN:
            if isinstance(node, node_class):
                raise StepConfigError(path, message)
        if isinstance(node, exp.Func):
            name = _function_name(node)
            if _is_forbidden_function(name):
                raise StepConfigError(path, f"function {name}() is not allowed")
        if isinstance(node, exp.Column):
            parts = [part.name for part in node.parts]
            head = parts[0]
            if head.lower().startswith(INTERNAL_PREFIX):
                raise StepConfigError(path, f"column {head!r} is reserved")
            if (
                known is not None
                and head.lower() not in known
                and head.lower() not in lambda_args
            ):
                raise StepConfigError(path, f"unknown column {head!r}")
    return tree.sql(dialect="duckdb")


_MAX_SCANNED_CHARS = 10_000


def _token_error_position(text: str) -> tuple[int, int]:
    """Line and column (1-based) where the token that does not tokenize starts.

    The longest prefix that tokenizes ends just before it. Costs one
    tokenization per character scanned, only on this error path.
    """
    tokenizer = sqlglot.Dialect.get_or_raise("duckdb").tokenizer_class()
    end = len(text) - 1
    for end in range(min(len(text), _MAX_SCANNED_CHARS) - 1, -1, -1):
        try:
            tokenizer.tokenize(text[:end])
        except SqlglotError:
            continue
        break
    line = text.count("\n", 0, end) + 1
    return line, end - (text.rfind("\n", 0, end) + 1) + 1


def expression_columns(expr: str) -> list[str]:
    """The columns an expression reads, in order of first use.

    A nested reference (``payload.user.id``, ``payload['user']``) reads its
    top-level column (``payload``); lambda parameters are not columns. Names
    compare case-insensitively, as in DuckDB; each is listed once, spelled as
    first written.

    Args:
        expr: one SQL expression (DuckDB dialect).

    Returns:
        The column names.

    Raises:
        StepConfigError: the text is not a single allowed scalar expression.
    """
    tree = sqlglot.parse_one(check_expression(expr, path="expr"), read="duckdb")
    lambda_args = {
        ident.name.lower()
        for node in tree.find_all(exp.Lambda)
        for ident in node.expressions
    }
    heads = [node.parts[0] for node in tree.find_all(exp.Column)]
    heads.sort(key=lambda ident: ident.meta.get("start", 0))
    seen: dict[str, str] = {}
    for ident in heads:
        if ident.name.lower() not in lambda_args:
            seen.setdefault(ident.name.lower(), ident.name)
    return list(seen.values())


def bare_column(sql: str) -> str | None:
    """The column an expression is, when it is nothing but one column
    reference (``year``, ``"Year"``); None for anything else (``payload.id``,
    ``(year)``, ``year + 0``).

    Args:
        sql: an expression as ``check_expression`` returned it.

    Returns:
        The column name as written (DuckDB resolves it case-insensitively).
    """
    tree = sqlglot.parse_one(sql, read="duckdb")
    if isinstance(tree, exp.Column) and len(tree.parts) == 1:
        return str(tree.parts[0].name)
    return None
