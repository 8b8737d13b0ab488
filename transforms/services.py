"""Schema registry and mapping workflows: register versions, freeze rules, preview."""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import re
from collections.abc import Mapping as MappingABC
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import pyarrow as pa
import structlog
from django.db import transaction

from transforms.choices import Compatibility, PreviewValues
from transforms.engine import EngineError, StepConfigError, compile_steps
from transforms.engine.steps import ERROR_COLUMN, SOURCE_REF, STEP_COLUMN, parse_steps
from transforms.exceptions import (
    IncompatibleSchemaError,
    MappingRulesError,
    PreviewError,
)
from transforms.models import Mapping, MappingVersion, SchemaSubject, SchemaVersion
from transforms.schemas import compatibility_problems, content_hash, parse_avro

logger = structlog.get_logger("dis.transforms")

PREVIEW_REF_PREFIX = "preview#"
MAX_PREVIEW_RECORDS = 1000
_RULES_PATH = re.compile(r"^steps\[0\](?:\.fields)?")


# --- Schema registry ------------------------------------------------------------


def check_compatibility(subject: SchemaSubject, definition: Any) -> list[str]:
    """Why ``definition`` may not become the subject's next version.

    Args:
        subject: the subject.
        definition: the candidate Avro record schema.

    Returns:
        The reasons (empty when it may): against the latest version, under the
        subject's compatibility mode.

    Raises:
        SchemaDefinitionError: the definition is not a valid Avro record schema.
    """
    parsed = parse_avro(definition)
    latest = subject.latest_version
    if latest is None or subject.compatibility == Compatibility.NONE:
        return []
    return compatibility_problems(
        latest.parsed(),
        parsed,
        subject.compatibility,
        old_label=f"version {latest.number}",
    )


def register_schema_version(
    subject_id: int, definition: Any
) -> tuple[SchemaVersion, bool]:
    """Register a definition as the subject's next version.

    A definition registered before (same content hash) returns its version.

    Args:
        subject_id: the subject's id.
        definition: an Avro record schema (JSON).

    Returns:
        The version and whether it was created now.

    Raises:
        SchemaDefinitionError: not a valid Avro record schema.
        IncompatibleSchemaError: breaks the subject's compatibility with the
            latest version; ``problems`` holds the reasons.
        SchemaSubject.DoesNotExist: no such subject.
    """
    parsed = parse_avro(definition)
    with transaction.atomic():
        # Serialises registrations of one subject: numbers and checks stay exact.
        subject = SchemaSubject.objects.select_for_update().get(pk=subject_id)
        existing = subject.versions.filter(content_hash=parsed.content_hash).first()
        if existing is not None:
            return existing, False
        problems = check_compatibility(subject, parsed.definition)
        if problems:
            raise IncompatibleSchemaError(problems)
        latest = subject.latest_version
        version = SchemaVersion.objects.create(
            subject=subject,
            number=latest.number + 1 if latest else 1,
            definition=parsed.definition,
            fingerprint=parsed.fingerprint,
            content_hash=parsed.content_hash,
        )
    logger.info("schema_version_created", subject=subject.name, version=version.number)
    return version, True


def create_subject(
    *,
    name: str,
    compatibility: str = Compatibility.BACKWARD,
    description: str = "",
    definition: Any = None,
) -> SchemaSubject:
    """Create a subject, with its first version when a definition is given.

    Raises:
        SchemaDefinitionError: the definition is not a valid Avro record schema
            (nothing is created).
    """
    if definition is not None:
        parse_avro(definition)
    with transaction.atomic():
        subject = SchemaSubject.objects.create(
            name=name, compatibility=compatibility, description=description
        )
        if definition is not None:
            register_schema_version(subject.pk, definition)
    return subject


# --- Mappings -------------------------------------------------------------------


def _rules_message(exc: StepConfigError) -> str:
    """The engine's message with ``steps[0].fields[i]`` spelled ``rules[i]``."""
    path = _RULES_PATH.sub("rules", exc.path) if exc.path else "rules"
    return f"{path}: {exc.detail}"


def validate_rules(
    rules: Any,
    *,
    source: SchemaSubject | None = None,
    target: SchemaSubject | None = None,
) -> None:
    """Check a mapping's rules the way a run would use them.

    They compile as the fields of one engine ``map`` step; with a source subject
    (that has a version) each expression may only read its top-level fields; with
    a target subject the rules must produce every field it requires (no default).

    Args:
        rules: the list of field rules.
        source: the source subject, if any.
        target: the target subject, if any.

    Raises:
        MappingRulesError: naming the rule's position and field, e.g.
            ``rules[1] (amount): unknown type 'money'``.
    """
    if not isinstance(rules, list) or not rules:
        raise MappingRulesError("rules: must be a non-empty list of field rules")
    steps = [{"type": "map", "fields": rules}]
    try:
        compile_steps(steps).close()
        source_version = source.latest_version if source is not None else None
        if source_version is not None:
            names = [f["name"] for f in source_version.definition["fields"]]
            parse_steps(steps, input_columns=names)
    except StepConfigError as exc:
        raise MappingRulesError(_rules_message(exc)) from None
    target_version = target.latest_version if target is not None else None
    if target_version is not None:
        produced = {r["name"] for r in rules}
        missing = [f for f in target_version.required_fields() if f not in produced]
        if missing:
            raise MappingRulesError(
                f"rules: do not produce the required fields of {target.name} "
                f"version {target_version.number}: {', '.join(missing)}"
            )


def save_mapping(mapping: Mapping) -> MappingVersion:
    """Make the mapping's rules its current version (call after saving it).

    Rules seen before reuse their version; new rules get the next number.

    Returns:
        The current version.
    """
    digest = content_hash(mapping.rules)
    with transaction.atomic():
        Mapping.objects.select_for_update().filter(pk=mapping.pk).first()
        version = MappingVersion.objects.filter(
            mapping=mapping, content_hash=digest
        ).first()
        if version is None:
            last = mapping.versions.order_by("-number").first()
            version = MappingVersion.objects.create(
                mapping=mapping,
                number=last.number + 1 if last else 1,
                rules=mapping.rules,
                content_hash=digest,
            )
            logger.info(
                "mapping_version_created", mapping=mapping.name, version=version.number
            )
        if mapping.current_version_id != version.pk:
            mapping.current_version = version
            Mapping.objects.filter(pk=mapping.pk).update(current_version=version)
    return version


# --- Preview --------------------------------------------------------------------


@dataclass
class PreviewResult:
    """What a mapping made of a sample.

    Attributes:
        version: the mapping version number that ran.
        outputs: the output records (JSON values), each with ``_source_ref``.
        errors: one per rejected record: ``index`` (in the sample), ``source_ref``,
            ``error`` and ``step``.
        column_lineage: each output field -> the source columns it reads.
        rows_in: records in the sample.
    """

    version: int
    outputs: list[dict[str, Any]]
    errors: list[dict[str, Any]]
    column_lineage: dict[str, list[str]]
    rows_in: int


def records_table(
    records: Sequence[Any], *, values: str = PreviewValues.TEXT
) -> pa.Table:
    """The engine input for JSON records, with ``_source_ref`` = ``preview#<i>``.

    Args:
        records: JSON objects.
        values: ``text``: every value becomes a string column value, as a CSV
            source reads it (numbers as written, booleans ``true``/``false``,
            objects and lists as compact JSON, null stays null); ``typed``: Arrow
            infers the column types from the JSON values (objects become
            structs, lists lists), as a typed source would give them.

    Raises:
        PreviewError: a record is not an object, uses ``_source_ref``, or (typed)
            the values of a key do not share a type.
    """
    for index, record in enumerate(records):
        if not isinstance(record, MappingABC):
            raise PreviewError(f"records[{index}]: must be a JSON object")
        if SOURCE_REF in record:
            raise PreviewError(f"records[{index}]: {SOURCE_REF!r} is reserved")
    refs = pa.array(
        [f"{PREVIEW_REF_PREFIX}{i}" for i in range(len(records))], pa.string()
    )
    if values == PreviewValues.TYPED:
        try:
            table = pa.Table.from_pylist([dict(r) for r in records])
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
            raise PreviewError(f"not typed consistently: {exc}") from None
        if not records:
            table = pa.table({})
        return table.append_column(SOURCE_REF, refs)
    columns: dict[str, None] = {}
    for record in records:
        columns.update(dict.fromkeys(record))
    return pa.table(
        {
            **{
                c: pa.array([_as_text(r.get(c)) for r in records], pa.string())
                for c in columns
            },
            SOURCE_REF: refs,
        }
    )


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return str(value)


def sample_connector(
    name: str, options: dict[str, Any] | None = None, *, limit: int = 20
) -> pa.Table:
    """The first ``limit`` records of a source connector's first chunk.

    Reads only: nothing is planned into the database, no offset is committed.

    Raises:
        PreviewError: unknown connector, not a source, bad options, or the read
            failed (the message says why).
    """
    from connectors.exceptions import ConfigError
    from connectors.models import Connector

    connector = Connector.objects.filter(name=name).first()
    if connector is None:
        raise PreviewError(f"no connector named {name!r}", field="connector")
    options = options or {}
    try:
        if not connector.plugin.capabilities.source:
            raise PreviewError(
                f"a {connector.kind} connector is not a source", field="connector"
            )
        try:
            connector.plugin.validate_options("source", options)
        except ConfigError as exc:
            detail = getattr(exc, "errors", None) or str(exc)
            raise PreviewError(str(detail), field="options") from None
        source = connector.open_source()
        try:
            chunk = next(iter(source.plan(options, chunk_rows=limit)), None)
            batches: list[pa.RecordBatch] = []
            rows = 0
            if chunk is not None:
                for batch in source.read(options, chunk):
                    batches.append(batch)
                    rows += batch.num_rows
                    if rows >= limit:
                        break
        finally:
            source.close()
    except PreviewError:
        raise
    except Exception as exc:  # noqa: BLE001 - any plugin failure is the caller's 400
        raise PreviewError(
            f"could not read a sample: {exc}", field="connector"
        ) from None
    if not batches:
        raise PreviewError("the source gave no records", field="connector")
    return pa.Table.from_batches(batches).slice(0, limit)


def preview_mapping(
    mapping: Mapping,
    *,
    records: Sequence[Any] | None = None,
    table: pa.Table | None = None,
    version: int | None = None,
    values: str = PreviewValues.TEXT,
) -> PreviewResult:
    """Run a mapping version over a sample with the engine; writes nothing.

    Args:
        mapping: the mapping.
        records: JSON objects (see ``records_table`` for ``values``), or
        table: an engine input batch (a connector's sample, with ``_source_ref``).
        version: the version number to run; the current version by default.
        values: how ``records`` become columns: ``text`` or ``typed``.

    Returns:
        The outputs, the per-record errors and the column lineage.

    Raises:
        PreviewError: no such version, or the sample does not fit the rules (an
            expression reads a column the sample lacks, a reserved column).
    """
    if version is None:
        chosen = mapping.current_version
    else:
        chosen = mapping.versions.filter(number=version).first()
    if chosen is None:
        raise PreviewError(
            f"mapping {mapping.name} has no version {version}"
            if version is not None
            else f"mapping {mapping.name} has no version yet",
            field="version",
        )
    if table is None:
        table = records_table(records or [], values=values)
    refs = table.column(SOURCE_REF).to_pylist()
    index_of = {ref: i for i, ref in enumerate(refs)}
    try:
        with compile_steps(chosen.steps()) as compiled:
            result = compiled.run(table)
            lineage = compiled.column_lineage
    except StepConfigError as exc:
        raise PreviewError(
            f"the sample does not fit the rules: {_rules_message(exc)}"
        ) from None
    except EngineError as exc:
        raise PreviewError(str(exc)) from None
    rejected = result.rejected
    errors = [
        {"index": index_of.get(ref), "source_ref": ref, "error": error, "step": step}
        for ref, error, step in zip(
            rejected.column(SOURCE_REF).to_pylist(),
            rejected.column(ERROR_COLUMN).to_pylist(),
            rejected.column(STEP_COLUMN).to_pylist(),
            strict=True,
        )
    ]
    errors.sort(key=lambda e: (e["index"] is None, e["index"] or 0))
    return PreviewResult(
        version=chosen.number,
        outputs=[jsonable(row) for row in result.output.to_pylist()],
        errors=errors,
        column_lineage=lineage,
        rows_in=result.rows_in,
    )


def jsonable(value: Any) -> Any:
    """An engine output value as JSON: ISO 8601 dates and times, decimals as
    strings (exact), bytes as base64; containers converted recursively."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    return value
