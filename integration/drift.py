"""Schema drift: a pipeline's policy applied to each extracted chunk, and proposals.

At extract, a chunk is compared with the source schema of the run's version (the
pipeline's recorded schema when the version has none yet: the first chunk records
it). What differs is recorded as `SchemaChange` rows and handled by the policy:

- `evolve`: the pipeline's source schema takes the change and a new version is
  frozen (the next runs use it); the chunk goes on unchanged, so a pass-through
  pipeline writes the new column in this run already (the sink adds it).
- `freeze`: rows with a value in a new column, or a value that no longer fits a
  known column's type, are rejected to dead letters naming the column.
- `quarantine`: the new columns' values are held in PostgreSQL and the rows load
  without them; one pending `SchemaChangeProposal` per pipeline and column set
  waits for an operator. A value that no longer fits a known column's type cannot
  be loaded into that column: it is rejected as under `freeze`.

The chunk leaves extract with the rows to reject marked in `_drift_error` and the
columns to leave out named in the schema metadata (`dis.drift_drop`);
`split_rejected` applies both before the engine runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import structlog
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from connectors.base import RUN_ID_COLUMN, SOURCE_REF_COLUMN
from connectors.exceptions import ConnectorError
from integration.choices import (
    DriftPolicy,
    HeldState,
    ProposalState,
    SchemaChangeKind,
)
from integration.models import (
    HeldValues,
    Pipeline,
    Run,
    SchemaChange,
    SchemaChangeProposal,
)
from transforms.engine import drift as engine_drift

logger = structlog.get_logger(__name__)

#: The column extract marks rows to reject with (the reason, naming the column).
DRIFT_ERROR = "_drift_error"
#: Schema metadata key: JSON list of the columns the kept rows leave out.
DROP_KEY = b"dis.drift_drop"


class ProposalDecidedError(Exception):
    """The proposal was already decided the other way (approve a rejected one)."""


@dataclass(frozen=True)
class ChunkDrift:
    """What the policy did with one chunk (for the chunk's stats)."""

    policy: str
    new_columns: list[str]
    type_changes: list[str]
    rejected: int = 0
    held: int = 0
    proposal: int | None = None
    version: int | None = None

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "policy": self.policy,
            "new_columns": self.new_columns,
            "type_changes": self.type_changes,
            "rejected": self.rejected,
            "held": self.held,
        }
        if self.proposal is not None:
            out["proposal"] = self.proposal
        if self.version is not None:
            out["version"] = self.version
        return out


def passes_through(steps: list[dict[str, Any]]) -> bool:
    """Whether the pipeline's output columns are its input's (no map, no aggregate):
    only then does a new source column reach the sink as it is."""
    return not any(
        isinstance(s, dict) and s.get("type") in ("map", "aggregate") for s in steps
    )


# --- At extract ---------------------------------------------------------------


def check_chunk(
    run_id: int, seq: int, version_spec: dict[str, Any], table: pa.Table
) -> tuple[pa.Table, ChunkDrift | None]:
    """Apply the version's drift policy to an extracted chunk.

    Args:
        run_id: the run.
        seq: the chunk.
        version_spec: the run's version spec (its `drift` entry decides).
        table: the chunk as the source read it.

    Returns:
        The table to stage (see the module doc) and what was done (None when the
        policy is `ignore` or the chunk fits).
    """
    spec = version_spec.get("drift")
    if not spec or spec["policy"] == DriftPolicy.IGNORE or table.num_rows == 0:
        return table, None
    run = Run.objects.select_related("version").get(pk=run_id)
    known = spec["source_schema"] or _baseline(run.pipeline_id, table)
    found = engine_drift.detect(table, known)
    if not found:
        return table, None
    policy = spec["policy"]
    if policy == DriftPolicy.EVOLVE:
        return table, _evolve(run, seq, found)
    marks = _reject_marks(table, found, new_columns=policy == DriftPolicy.FREEZE)
    held, proposal = 0, None
    if policy == DriftPolicy.QUARANTINE and found.new_columns:
        held, proposal = _hold(run, seq, table, found)
    _record(run, seq, found, policy=policy, proposal=proposal)
    rejected = len(marks) - marks.null_count
    if rejected:
        table = table.append_column(DRIFT_ERROR, marks)
    metadata = dict(table.schema.metadata or {})
    metadata[DROP_KEY] = orjson.dumps(found.new_names)
    done = ChunkDrift(
        policy=policy,
        new_columns=found.new_names,
        type_changes=[c.name for c in found.type_changes],
        rejected=rejected,
        held=held,
        proposal=proposal.pk if proposal else None,
    )
    logger.info("schema_drift", **done.stats())
    return table.replace_schema_metadata(metadata), done


def _baseline(pipeline_id: int, table: pa.Table) -> list[dict[str, str]]:
    """The pipeline's recorded source schema; recorded from `table` when empty
    (and a version including it frozen for the next runs)."""
    from integration import services

    with transaction.atomic():
        pipeline = Pipeline.objects.select_for_update().get(pk=pipeline_id)
        if pipeline.source_schema:
            return list(pipeline.source_schema)
        pipeline.source_schema = engine_drift.infer_schema(table)
        pipeline.save(update_fields=["source_schema", "updated_at"])
        version = services.freeze_version(pipeline)
    logger.info(
        "source_schema_recorded",
        pipeline=pipeline.name,
        columns=len(pipeline.source_schema),
        version=version.number,
    )
    return list(pipeline.source_schema)


def _evolve(run: Run, seq: int, found: engine_drift.Drift) -> ChunkDrift:
    """Take the change into the pipeline's source schema and freeze a version."""
    from integration import services

    with transaction.atomic():
        pipeline = Pipeline.objects.select_for_update().get(pk=run.pipeline_id)
        pipeline.source_schema = engine_drift.widen(pipeline.source_schema, found)
        pipeline.save(update_fields=["source_schema", "updated_at"])
        version = services.freeze_version(pipeline)
        _record(
            run,
            seq,
            found,
            policy=DriftPolicy.EVOLVE,
            applied=version,
        )
    done = ChunkDrift(
        policy=DriftPolicy.EVOLVE,
        new_columns=found.new_names,
        type_changes=[c.name for c in found.type_changes],
        version=version.number,
    )
    logger.info("schema_drift", **done.stats())
    return done


def _reject_marks(
    table: pa.Table, found: engine_drift.Drift, *, new_columns: bool
) -> pa.Array:
    """Per row, why drift rejects it (NULL: kept), built with Arrow kernels."""
    n = table.num_rows
    parts: list[pa.Array] = []
    if new_columns:
        for name in found.new_names:
            carried = engine_drift.carries_values(table, [name])
            message = (
                f"column {name!r} is not in the pipeline's source schema "
                "(drift policy freeze)"
            )
            parts.append(pc.if_else(carried, message, pa.scalar(None, pa.string())))
    for change in found.type_changes:
        values = pc.cast(table.column(change.name).combine_chunks(), pa.string())
        message = pc.binary_join_element_wise(
            f"column {change.name!r}: value '",
            values,
            f"' does not fit its type {change.old_type} (drift: the source now "
            f"gives {change.new_type})",
            "",
        )
        parts.append(pc.if_else(change.misfits, message, pa.scalar(None, pa.string())))
    if not parts:
        return pa.nulls(n, pa.string())
    # null_handling="skip" drops all-null rows (pyarrow 26): join with "" for
    # NULL and trim the separators an absent reason leaves.
    joined = pc.binary_join_element_wise(
        *parts, "; ", null_handling="replace", null_replacement=""
    )
    joined = pc.replace_substring_regex(joined, "(; )+", "; ")
    joined = pc.replace_substring_regex(joined, "^; |; $", "")
    marks = pc.if_else(pc.equal(joined, ""), pa.scalar(None, pa.string()), joined)
    if "_read_error" in table.column_names:
        # An unreadable row is rejected by the reader already.
        unreadable = pc.is_valid(table.column("_read_error").combine_chunks())
        marks = pc.if_else(unreadable, pa.scalar(None, pa.string()), marks)
    return marks


def _hold(
    run: Run, seq: int, table: pa.Table, found: engine_drift.Drift
) -> tuple[int, SchemaChangeProposal]:
    """Store the chunk's new-column values under the pending proposal."""
    from integration.staging import to_ipc

    proposal = _pending_proposal(run, found.new_columns)
    carried = engine_drift.carries_values(table, found.new_names)
    values = table.select([SOURCE_REF_COLUMN, *found.new_names]).filter(carried)
    HeldValues.objects.update_or_create(
        proposal=proposal,
        run=run,
        chunk_seq=seq,
        defaults={
            "rows": values.num_rows,
            "payload": to_ipc(values),
            "state": HeldState.HELD,
        },
    )
    return values.num_rows, proposal


def _pending_proposal(run: Run, columns: list[dict[str, str]]) -> SchemaChangeProposal:
    """The pipeline's pending proposal for this column set, opened if none."""
    key = ",".join(sorted(c["name"] for c in columns))[:500]
    for _ in range(3):
        found = SchemaChangeProposal.objects.filter(
            pipeline_id=run.pipeline_id, column_key=key, state=ProposalState.PENDING
        ).first()
        if found is not None:
            return found
        try:
            with transaction.atomic():
                proposal = SchemaChangeProposal.objects.create(
                    pipeline_id=run.pipeline_id,
                    columns=columns,
                    column_key=key,
                    first_run=run,
                )
        except IntegrityError:  # another chunk opened it first
            continue
        logger.info("schema_proposal_opened", proposal=proposal.pk, columns=key)
        return proposal
    raise RuntimeError("could not open or find the schema change proposal")


def _record(
    run: Run,
    seq: int,
    found: engine_drift.Drift,
    *,
    policy: str,
    proposal: SchemaChangeProposal | None = None,
    applied: Any = None,
) -> None:
    """One SchemaChange per run, column and kind (a later chunk adds nothing)."""
    rows = [
        (SchemaChangeKind.ADDED, c["name"], "", c["type"]) for c in found.new_columns
    ] + [
        (SchemaChangeKind.TYPE_CHANGED, c.name, c.old_type, c.new_type)
        for c in found.type_changes
    ]
    for kind, column, old, new in rows:
        if policy == DriftPolicy.EVOLVE:
            action = f"applied in version {applied.number}"
        elif kind == SchemaChangeKind.ADDED and policy == DriftPolicy.QUARANTINE:
            action = f"values held for proposal {proposal.pk}" if proposal else "held"
        else:
            action = "rows with such values rejected to dead letters"
        SchemaChange.objects.get_or_create(
            run=run,
            column=column,
            kind=kind,
            defaults={
                "pipeline_id": run.pipeline_id,
                "version_id": run.version_id,
                "old_type": old,
                "new_type": new,
                "policy": policy,
                "action": action,
                "applied_version": applied,
                "proposal": proposal if kind == SchemaChangeKind.ADDED else None,
                "chunk_seq": seq,
            },
        )


# --- Before the engine ----------------------------------------------------------


def split_rejected(table: pa.Table) -> tuple[pa.Table, pa.Table | None]:
    """Split off the rows extract marked, and drop the columns it named.

    Returns:
        The rows to transform (without the dropped columns and `_drift_error`), and
        the rejected rows as received plus `_error` and `_step` (`drift`), or None.
    """
    metadata = dict(table.schema.metadata or {})
    if DROP_KEY not in metadata and DRIFT_ERROR not in table.column_names:
        return table, None
    drop = orjson.loads(metadata.pop(DROP_KEY, b"[]"))
    rejected = None
    if DRIFT_ERROR in table.column_names:
        marked = pc.is_valid(table.column(DRIFT_ERROR))
        bad = table.filter(marked)
        table = table.filter(pc.invert(marked)).drop_columns([DRIFT_ERROR])
        rejected = bad.drop_columns([DRIFT_ERROR]).append_column(
            "_error", bad.column(DRIFT_ERROR)
        )
        rejected = rejected.append_column(
            "_step", pa.array(["drift"] * bad.num_rows, pa.string())
        )
    table = table.drop_columns([c for c in drop if c in table.column_names])
    return table.replace_schema_metadata(metadata or None), rejected


# --- Operators' decisions ---------------------------------------------------------


def approve(proposal_id: int, *, user_id: int | None = None) -> SchemaChangeProposal:
    """Apply a proposal: the columns join the source schema (a new version), the
    sink table gains them and the held values are back-filled into loaded rows.

    Idempotent: approving an approved proposal returns it unchanged. The sink work
    happens before the proposal is marked approved, so a failure leaves it pending
    (and a second approval redoes it: the back-fill is idempotent).

    Raises:
        ProposalDecidedError: the proposal was rejected.
        ValidationError: naming `sink`, when the sink cannot back-fill.
    """
    from integration import services
    from integration.staging import from_ipc

    with transaction.atomic():
        proposal = SchemaChangeProposal.objects.select_for_update().get(pk=proposal_id)
        if proposal.state == ProposalState.APPROVED:
            return proposal
        if proposal.state == ProposalState.REJECTED:
            raise ProposalDecidedError(f"proposal {proposal.pk} was rejected")
        pipeline = Pipeline.objects.select_for_update().get(pk=proposal.pipeline_id)
        schema = list(pipeline.source_schema or [])
        have = {c["name"] for c in schema}
        schema += [dict(c) for c in proposal.columns if c["name"] not in have]
        pipeline.source_schema = schema
        pipeline.save(update_fields=["source_schema", "updated_at"])
        version = services.freeze_version(pipeline)
        held = list(proposal.held.filter(state=HeldState.HELD))
        held_rows = sum(h.rows for h in held)
        names = [c["name"] for c in proposal.columns]
        if passes_through(version.spec["steps"]):
            tables = []
            for h in held:
                t = from_ipc(bytes(h.payload))
                tables.append(
                    t.append_column(
                        RUN_ID_COLUMN, pa.array([h.run_id] * t.num_rows, pa.int64())
                    )
                )
            backfilled = _backfill(pipeline, version, tables, proposal.columns)
            held_state = HeldState.LOADED
            note = ""
        else:
            backfilled = 0
            held_state = HeldState.DROPPED
            note = (
                "the pipeline's map step decides its sink columns: add a field for "
                f"{', '.join(names)} to load them from the next run on; the held "
                "values were not loaded"
            )
        HeldValues.objects.filter(pk__in=[h.pk for h in held]).update(state=held_state)
        SchemaChange.objects.filter(proposal=proposal).update(applied_version=version)
        proposal.state = ProposalState.APPROVED
        proposal.applied_version = version
        proposal.decided_by_id = user_id
        proposal.decided_at = timezone.now()
        proposal.result = {
            "version": version.number,
            "held_rows": held_rows,
            "backfilled_rows": backfilled,
            **({"note": note} if note else {}),
        }
        proposal.save()
    logger.info("schema_proposal_approved", proposal=proposal.pk, **proposal.result)
    return proposal


def _backfill(
    pipeline: Pipeline,
    version: Any,
    tables: list[pa.Table],
    columns: list[dict[str, str]],
) -> int:
    """Add the columns to the sink and set the held values; rows updated."""
    from integration import runtime

    sink_options = version.spec["sink"]["options"]
    if not pipeline.sink.plugin.capabilities.backfill:
        raise ValidationError(
            {
                "sink": f"a {pipeline.sink.kind} sink cannot add columns to loaded "
                "rows (capability backfill); reject the proposal, or change the "
                "sink"
            }
        )
    if tables:
        values = pa.concat_tables(tables, promote_options="permissive")
    else:
        values = pa.table(
            {
                RUN_ID_COLUMN: pa.array([], pa.int64()),
                SOURCE_REF_COLUMN: pa.array([], pa.string()),
            }
        )
    if values.num_rows == 0:
        # Nothing held: the column is still added, so the next run finds it.
        values = pa.table(
            {
                RUN_ID_COLUMN: pa.array([0], pa.int64()),
                SOURCE_REF_COLUMN: pa.array([None], pa.string()),
                **{
                    c["name"]: pa.array([None], _arrow_type(c["type"])) for c in columns
                },
            }
        )
    sink = runtime.open_sink(pipeline.sink_id)
    try:
        result = sink.backfill(sink_options, values)
    except ConnectorError as exc:
        raise ValidationError({"sink": f"back-fill failed: {exc}"}) from None
    finally:
        sink.close()
    return result.rows_written


def _arrow_type(label: str | None) -> pa.DataType:
    from transforms.engine.drift import _field_type

    found = _field_type(label or "string")
    return found.arrow if found is not None else pa.string()


def reject(proposal_id: int, *, user_id: int | None = None) -> SchemaChangeProposal:
    """Refuse a proposal: its held values are marked rejected (purged with the
    dead letters' retention). Idempotent.

    Raises:
        ProposalDecidedError: the proposal was approved.
    """
    with transaction.atomic():
        proposal = SchemaChangeProposal.objects.select_for_update().get(pk=proposal_id)
        if proposal.state == ProposalState.REJECTED:
            return proposal
        if proposal.state == ProposalState.APPROVED:
            raise ProposalDecidedError(f"proposal {proposal.pk} was approved")
        count = proposal.held.filter(state=HeldState.HELD).update(
            state=HeldState.REJECTED
        )
        proposal.state = ProposalState.REJECTED
        proposal.decided_by_id = user_id
        proposal.decided_at = timezone.now()
        proposal.result = {"held_rows_rejected": count}
        proposal.save()
    logger.info("schema_proposal_rejected", proposal=proposal.pk)
    return proposal


def run_drift_stats(chunk_stats: list[dict[str, Any]]) -> dict[str, Any]:
    """A run's drift, merged from its chunks' stats (empty when none drifted)."""
    merged: dict[str, Any] = {}
    for stats in chunk_stats:
        found = (stats or {}).get("drift")
        if not found:
            continue
        merged.setdefault("policy", found["policy"])
        for key in ("new_columns", "type_changes"):
            have = merged.setdefault(key, [])
            have += [c for c in found[key] if c not in have]
        for key in ("rejected", "held"):
            merged[key] = merged.get(key, 0) + found[key]
        if "proposal" in found:
            proposals = merged.setdefault("proposals", [])
            if found["proposal"] not in proposals:
                proposals.append(found["proposal"])
        if "version" in found:
            merged["version"] = max(merged.get("version", 0), found["version"])
    return merged
