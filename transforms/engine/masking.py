"""The mask step: redact, salted SHA-256 and Fernet encryption of PII fields.

Redaction and hashing are SQL in the pipeline's query. The salt is handed to
DuckDB as a session variable set through a prepared parameter, so it is never
part of any SQL text (nor of an error message quoting it); user expressions
cannot read variables (``getvariable`` is refused). Fernet is not in DuckDB:
it runs after the query, in Python, on the one column.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import duckdb
import pyarrow as pa
from cryptography.fernet import Fernet

from transforms.engine.exceptions import StepConfigError
from transforms.engine.sql import sql_string
from transforms.engine.steps import REDACTED, MaskField, MaskStep, Step

_SALT_VARIABLE = "__engine_salt_"


def salt_variable(secret: str) -> str:
    """The DuckDB variable holding the salt named ``secret``."""
    return _SALT_VARIABLE + secret.encode().hex()


def mask_sql(f: MaskField, column: str) -> str:
    """SQL of a masked column's value; NULL stays NULL.

    Args:
        f: the mask field.
        column: SQL of the column (a quoted identifier).

    Returns:
        A VARCHAR expression: ``'***'`` (or ``'***' || last N characters``
        when the value is longer than N), the salted SHA-256 hex digest, or
        the plain text that Fernet encrypts after the query.
    """
    text = f"CAST({column} AS VARCHAR)"
    if f.method == "redact":
        stars = sql_string(REDACTED)
        if f.keep_last:
            return (
                f"CASE WHEN {column} IS NULL THEN NULL "
                f"WHEN length({text}) > {f.keep_last} "
                f"THEN {stars} || right({text}, {f.keep_last}) ELSE {stars} END"
            )
        return f"CASE WHEN {column} IS NULL THEN NULL ELSE {stars} END"
    if f.method == "sha256":
        salt = f"getvariable({sql_string(salt_variable(f.secret))})"
        return f"sha256({salt} || {text})"
    return text


class Secrets:
    """The secrets a step list's mask steps need, checked once.

    Holds the Fernet objects and sets the salts on the connection; keeps no
    other copy of the values, and its repr shows only the secret names.
    """

    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        steps: Sequence[Step],
        secrets: Mapping[str, str] | None,
    ) -> None:
        provided = dict(secrets or {})
        self.fernets: dict[str, Fernet] = {}
        self._names: list[str] = []
        seen: set[tuple[str, str]] = set()
        for step in steps:
            if not isinstance(step, MaskStep):
                continue
            for f in step.fields:
                if f.method == "redact" or (f.method, f.secret) in seen:
                    continue
                value = provided.get(f.secret)
                where = f"secrets[{f.secret!r}]"
                if not isinstance(value, str) or not value:
                    raise StepConfigError(
                        f.path, f"{f.method} needs {where}: a non-empty string"
                    )
                if f.method == "sha256":
                    con.execute(f"SET VARIABLE {salt_variable(f.secret)} = ?", [value])
                else:
                    try:
                        self.fernets[f.secret] = Fernet(value)
                    except (ValueError, TypeError):
                        # Never chain the original error: it may quote the key.
                        raise StepConfigError(
                            f.path, f"{where} is not a valid Fernet key"
                        ) from None
                seen.add((f.method, f.secret))
                self._names.append(f.secret)

    def __repr__(self) -> str:
        return f"Secrets(names={self._names!r})"


def encrypt_column(fernet: Fernet, column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Fernet-encrypt each non-null value of a string column.

    One ``encrypt`` call per value cannot be avoided (each token has its own
    random IV); the batch shares one timestamp.

    Args:
        fernet: the key.
        column: the plain text values.

    Returns:
        The tokens (URL-safe base64 strings); NULL stays NULL.
    """
    now = int(time.time())
    encrypt = fernet.encrypt_at_time
    tokens = [
        None if value is None else encrypt(value.encode(), now).decode("ascii")
        for value in column.to_pylist()
    ]
    return pa.array(tokens, pa.string())
