"""The ``json_schema`` validate rule: JSON Schema (Draft 2020-12) on a column.

JSON Schema is not SQL, so the rule runs after the query, in Python, on the
one column's text and only on the rows the query kept. Each distinct payload
of a batch is parsed and validated once; the validator is built once, when
the pipeline compiles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jsonschema
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from jsonschema.exceptions import SchemaError
from referencing.exceptions import Unresolvable

from transforms.engine.exceptions import StepConfigError
from transforms.engine.steps import Rule

MAX_MESSAGE_CHARS = 200


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


@dataclass(frozen=True)
class JsonCheck:
    """A compiled json_schema rule."""

    rule: Rule
    validator: jsonschema.protocols.Validator

    def error(self, text: str) -> str | None:
        """The rule's message for one payload, None when it is valid.

        Never raises for any input: unparsable or too deeply nested payloads
        get a message.
        """
        label = self.rule.label
        try:
            instance = json.loads(text, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            return f"{label}: not valid JSON"
        try:
            error = next(iter(self.validator.iter_errors(instance)), None)
        except RecursionError:
            return f"{label}: nested too deeply to validate"
        except Unresolvable as unresolvable:
            # Only references inside the schema resolve: nothing is fetched.
            return f"{label}: the schema's reference cannot be resolved: {unresolvable}"
        if error is None:
            return None
        message = error.message
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + "..."
        return f"{label}: {error.json_path}: {message}"

    def errors(self, column: pa.ChunkedArray) -> list[tuple[int, str]]:
        """(row index, message) of each row of ``column`` that fails.

        Each distinct value is checked once; NULL passes.
        """
        distinct = pc.unique(column)
        messages = [
            None if text is None else self.error(text) for text in distinct.to_pylist()
        ]
        failing = [n for n, message in enumerate(messages) if message is not None]
        if not failing:
            return []
        positions = pc.index_in(column, value_set=distinct)
        if isinstance(positions, pa.ChunkedArray):
            positions = positions.combine_chunks()
        codes = positions.to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(np.isin(codes, failing))
        return [(int(row), str(messages[codes[row]])) for row in rows]


def compile_check(rule: Rule) -> JsonCheck:
    """Check a rule's schema (Draft 2020-12) and build its validator once.

    References are resolved only within the schema: nothing is fetched.

    Raises:
        StepConfigError: the schema is not a valid Draft 2020-12 schema.
    """
    try:
        jsonschema.Draft202012Validator.check_schema(rule.schema)
    except SchemaError as error:
        raise StepConfigError(
            rule.path, f"invalid JSON Schema: {error.message}"
        ) from error
    return JsonCheck(rule, jsonschema.Draft202012Validator(rule.schema))
