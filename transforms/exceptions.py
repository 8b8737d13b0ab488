"""Errors of the transforms app (schema registry and mappings)."""

from __future__ import annotations

from transforms.schemas import InferenceError, SchemaDefinitionError


class TransformsError(Exception):
    """Root of the transforms app's errors."""


class IncompatibleSchemaError(TransformsError):
    """A new schema version breaks the subject's compatibility setting."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class MappingRulesError(TransformsError):
    """A mapping's rules do not compile, or miss a required target field.

    The message names the rule's position and field, e.g.
    ``rules[2] (distance_km): unknown type 'flot'``.
    """


class PreviewError(TransformsError):
    """A preview cannot run: the sample does not fit the mapping, or the
    connector could not be read. Record-level problems are never this error.

    ``field`` names the request field at fault (``records``, ``connector``,
    ``version``).
    """

    def __init__(self, message: str, *, field: str = "records") -> None:
        self.field = field
        super().__init__(message)


__all__ = [
    "IncompatibleSchemaError",
    "InferenceError",
    "MappingRulesError",
    "PreviewError",
    "SchemaDefinitionError",
    "TransformsError",
]
