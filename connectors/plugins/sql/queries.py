"""Checks that a user-supplied SQL query only reads: one SELECT, nothing else.

The query is parsed with sqlglot in the source's dialect. Refused: more than one
statement, anything that is not a query (SELECT, UNION...), a data-modifying CTE,
`SELECT ... INTO`, locking clauses (`FOR UPDATE`/`FOR SHARE`) and calls to functions
that reach outside the database or change state (a deny-list per dialect). The SQL
that runs is sqlglot's rendering of the checked tree, never the text as typed, so a
tokenizer disagreement (comments, quoting) cannot smuggle in a second statement.
Sources also read in read-only transactions: the check is the first of two fences.
Pure Python (no Django, no database driver).
"""

from __future__ import annotations

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from connectors.exceptions import ConfigError

#: Functions a query may not call, per sqlglot dialect (lower case, unqualified).
DENIED_FUNCTIONS: dict[str, frozenset[str]] = {
    "postgres": frozenset(
        {
            "pg_read_file",
            "pg_read_binary_file",
            "pg_ls_dir",
            "pg_stat_file",
            "pg_ls_logdir",
            "pg_ls_waldir",
            "pg_ls_tmpdir",
            "pg_file_write",
            "lo_import",
            "lo_export",
            "lo_get",
            "lo_put",
            "lo_open",
            "lo_create",
            "lo_unlink",
            "lo_from_bytea",
            "dblink",
            "dblink_exec",
            "dblink_connect",
            "dblink_connect_u",
            "dblink_open",
            "dblink_send_query",
            "query_to_xml",
            "query_to_xml_and_xmlschema",
            "cursor_to_xml",
            "table_to_xml",
            "set_config",
            "nextval",
            "setval",
            "pg_sleep",
            "pg_sleep_for",
            "pg_sleep_until",
            "pg_terminate_backend",
            "pg_cancel_backend",
            "pg_reload_conf",
            "pg_rotate_logfile",
            "pg_promote",
            "pg_switch_wal",
            "pg_create_restore_point",
            "pg_advisory_lock",
            "pg_advisory_xact_lock",
            "pg_try_advisory_lock",
            "pg_notify",
        }
    ),
    "mysql": frozenset(
        {
            "load_file",
            "sleep",
            "benchmark",
            "get_lock",
            "release_lock",
            "release_all_locks",
            "master_pos_wait",
            "source_pos_wait",
            "sys_exec",
            "sys_eval",
        }
    ),
    "sqlite": frozenset(
        {"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer"}
    ),
}

_FORBIDDEN_NODES = tuple(
    node
    for node in (
        getattr(exp, name, None)
        for name in (
            "Insert",
            "Update",
            "Delete",
            "Merge",
            "Create",
            "Drop",
            "Alter",
            "Command",
            "Copy",
            "Into",
            "Lock",
            "Set",
            "Transaction",
            "Commit",
            "Rollback",
            "Pragma",
            "Grant",
            "Use",
            "Kill",
            "LoadData",
        )
    )
    if isinstance(node, type)
)


def read_only_query(query: str, dialect: str) -> str:
    """Check that `query` is one read-only SELECT and return the SQL to run.

    Args:
        query: the query as the user wrote it.
        dialect: the sqlglot dialect (`postgres`, `mysql`, `sqlite`).

    Returns:
        The query rendered by sqlglot from the checked tree.

    Raises:
        ConfigError: naming what is not allowed.
    """
    try:
        statements = [s for s in sqlglot.parse(query, read=dialect) if s is not None]
    except SqlglotError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"query is not valid {dialect} SQL: {first}") from None
    if len(statements) != 1:
        raise ConfigError(
            f"query must be a single SELECT statement, found {len(statements)}"
        )
    root = statements[0]
    if not isinstance(root, exp.Query):
        raise ConfigError(
            f"query must be a SELECT, not {root.key.upper()}: sources only read"
        )
    denied = DENIED_FUNCTIONS.get(dialect, frozenset())
    for node in root.walk():
        if isinstance(node, _FORBIDDEN_NODES):
            raise ConfigError(f"query must only read: {_describe(node)} is not allowed")
        if isinstance(node, exp.Func):
            name = (node.name if isinstance(node, exp.Anonymous) else "").lower()
            names = {name, node.sql_name().lower()}
            blocked = sorted(names & denied)
            if blocked:
                raise ConfigError(
                    f"query calls {blocked[0]}(), which sources may not use"
                )
    return root.sql(dialect=dialect)


def _describe(node: exp.Expression) -> str:
    if isinstance(node, exp.Lock):
        return "a locking clause (FOR UPDATE / FOR SHARE)"
    if isinstance(node, exp.Into):
        return "SELECT ... INTO"
    return f"a {node.key.upper()} statement"
