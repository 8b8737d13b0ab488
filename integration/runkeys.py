"""Run-scoped keys: deduplicate steps and unique rules exact across a whole run.

The engine keeps one row per key (deduplicate) and rejects repeated values (unique)
within one chunk, and gives every output row its key hashes (`KeyScope.column`).
Across chunks the run's keys live in PostgreSQL (`RunKey`, one row per run, scope
and key, naming the chunk that holds it). Exactness rests on two rules:

- **Load order.** A pipeline with run-wide keys loads its chunks one after the
  other in source order: chunk n's load starts only when every chunk before it
  (below it for `keep: first` and unique rules, above it for `keep: last`) is
  committed. Extract and transform still run in parallel. A load whose turn has
  not come returns; the chunk before it, once committed, sends it again
  (`wake_next`), and as a safety net (a lost message) it is also sent again after
  `DIS_LOAD_TURN_POLL_SECONDS`: no busy waiting. Chunks are dispatched in that
  order too, so the first unfinished chunk is always in flight and can load: no
  deadlock.
- **Claim before write.** In one metadata transaction that locks the chunk's row
  and checks its attempt token, the load forgets the keys its chunk claimed before
  (an earlier attempt's), drops or rejects the rows whose key an earlier chunk
  holds, and inserts the keys of the rows it keeps (and of the rejected rows that
  held a key in the chunk, as one pass over all rows would count them). A retry
  after a crash between this claim and the sink commit claims the same keys
  again; a superseded attempt claims nothing.

So the chunks committed form a prefix of the load order, and the keys stored are
exactly theirs, plus those of the one chunk loading.
"""

# The module renders SQL from internal table and column names only.
# ruff: noqa: S608

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from django.db import connection, transaction

from connectors.base import SOURCE_REF_COLUMN
from integration.choices import CHUNK_IN_FLIGHT, ChunkState, RunState
from integration.models import ChunkRun, RunKey
from transforms.engine import EngineError, KeyScope

#: Chunks load from the first to the last (`first`) or the other way (`last`).
ASCENDING, DESCENDING = "first", "last"
#: Values printed in a unique rule's message are cut to this many characters.
MAX_VALUE_CHARS = 100
_CLAIM_TABLE = "dis_runkey_claim"
_HELD_PREFIX = "__runkey_held__"


def load_order(scopes: Sequence[KeyScope]) -> str | None:
    """The order a pipeline's chunks must load in: `first` (ascending seq), `last`
    (descending, a deduplicate keeping the last row), or None (any order)."""
    if not scopes:
        return None
    return DESCENDING if any(s.keep == DESCENDING for s in scopes) else ASCENDING


def definition_error(compiled: Any) -> str:
    """Why a compiled step list cannot keep its keys exact across a run ("" if it
    can)."""
    from transforms.engine.steps import DeduplicateStep, ValidateStep

    if compiled.is_aggregate and any(
        isinstance(step, DeduplicateStep)
        or (
            isinstance(step, ValidateStep)
            and any(rule.kind == "unique" for rule in step.rules)
        )
        for step in compiled.steps
    ):
        return (
            "a deduplicate step or unique rule before an aggregate would hold "
            "within a chunk only: deduplicate in a pipeline of its own first"
        )
    if len({scope.keep for scope in compiled.key_scopes}) > 1:
        return (
            "a deduplicate step keeping the last row cannot be combined with "
            "unique rules (the first occurrence passes): the chunks of a run load "
            "in one order"
        )
    return ""


def signature(compiled: Any) -> list[tuple[str, ...]]:
    """What the stored keys of a run depend on: each scope's name, order and key
    columns with their output types. Two versions with the same signature hash
    the same rows to the same keys."""
    try:
        types = {f.name.lower(): str(f.type) for f in compiled.output_schema}
    except EngineError:  # no map step: the input's types, not known here
        types = {}
    return [
        (s.name, s.keep, *(f"{c}:{types.get(c.lower(), '?')}" for c in s.key))
        for s in compiled.key_scopes
    ]


@dataclass(frozen=True)
class Turn:
    """Whether a chunk may load now.

    Attributes:
        go: every chunk before it (in load order) is committed.
        blocked_by: a chunk before it that was skipped or quarantined (it cannot
            load before a resume), or None.
    """

    go: bool
    blocked_by: tuple[int, str] | None = None


def turn(run_id: int, seq: int, order: str) -> Turn:
    """May chunk `seq` of the run load now (see the module docstring)?"""
    before = ChunkRun.objects.filter(run_id=run_id).exclude(state=ChunkState.DONE)
    before = (
        before.filter(seq__lt=seq) if order == ASCENDING else before.filter(seq__gt=seq)
    )
    stuck = (
        before.filter(state__in=(ChunkState.SKIPPED, ChunkState.QUARANTINED))
        .order_by("seq")
        .values_list("seq", "state")
        .first()
    )
    if stuck is not None:
        return Turn(go=False, blocked_by=stuck)
    return Turn(go=not before.exists())


def wake_next(version_id: int, run_id: int, seq: int, correlation_id: str) -> bool:
    """After chunk `seq` committed: send the load of the next chunk in load order
    now if it is waiting for its turn (its periodic check would come later)."""
    from integration import orchestration, runtime

    order = load_order(runtime.compiled_version(version_id).key_scopes)
    if order is None:
        return False
    following = seq + 1 if order == ASCENDING else seq - 1
    token = (
        ChunkRun.objects.filter(
            run_id=run_id, seq=following, state__in=CHUNK_IN_FLIGHT, step="load"
        )
        .values_list("attempt_token", flat=True)
        .first()
    )
    if token is None:
        return False
    orchestration.send_load(run_id, following, str(token), correlation_id, countdown=0)
    return True


@dataclass
class Claimed:
    """A chunk's rows after the run-wide keys.

    Attributes:
        output: the rows to write, without the key hash columns.
        rejected: rows whose unique value an earlier row of the run holds: the
            input columns, `_error` and `_step` (`validate`).
        deduplicated: rows dropped because an earlier chunk kept their key.
    """

    output: pa.Table
    rejected: pa.Table
    deduplicated: int


def strip_keys(output: pa.Table, scopes: Sequence[KeyScope]) -> pa.Table:
    """The output without the key hash columns the engine appended."""
    return output.drop_columns(
        [s.column for s in scopes if s.column in output.schema.names]
    )


def claim(
    run_id: int,
    seq: int,
    token: str,
    scopes: Sequence[KeyScope],
    output: pa.Table,
    inputs: pa.Table | None,
    held: pa.Table | None = None,
) -> Claimed | None:
    """Claim the run-wide keys of a chunk's output; drop or reject the rows whose
    key an earlier chunk holds.

    Scopes apply in step order: a row dropped or rejected by one claims no key of
    a later one. Within the chunk the engine already kept one row per key; should
    two rows still share a key, the first in load order wins here too. Rejected
    rows that hold a key in the chunk (`held`) claim it too, as in one pass over
    all the rows: the row a deduplicate step kept that a later rule rejected, the
    first occurrence of a unique value that another rule rejected.

    Args:
        run_id, seq, token: the attempt (its chunk's row is locked and its token
            checked: a superseded attempt claims nothing).
        scopes: the pipeline's `key_scopes`.
        output: the engine's output rows, with `_source_ref` and the key columns.
        inputs: the input rows of `output`, aligned with it (the dead letters of
            unique rules hold them); needed only with unique scopes.
        held: the key columns and `_source_ref` of the chunk's rejected rows
            (the engine's `rejected_keys`), or None.

    Returns:
        The rows to write and those rejected; None when the attempt is stale.
    """
    n = output.num_rows
    rows = _key_rows(output, scopes, held)
    keep = np.ones(rows.num_rows, dtype=bool)
    errors: dict[int, str] = {}
    deduplicated = 0
    order = load_order(scopes)
    with transaction.atomic():
        current = list(
            ChunkRun.objects.select_for_update(of=("self",))
            .filter(
                run_id=run_id,
                seq=seq,
                attempt_token=token,
                state__in=CHUNK_IN_FLIGHT,
                run__state=RunState.RUNNING,
            )
            .values_list("pk", flat=True)
        )
        if not current:
            return None
        # An earlier attempt's claim (the same rows, or different ones if what
        # the source gave changed): the chunk claims afresh.
        RunKey.objects.filter(run_id=run_id, seq=seq).delete()
        with connection.cursor() as cursor:
            cursor.execute(
                f"CREATE TEMP TABLE {_CLAIM_TABLE} (key uuid, pos integer, ref text)"
            )
            for scope in scopes:
                lost = _claim_scope(cursor, run_id, seq, scope, rows, keep, order)
                if not lost:
                    continue
                keep[np.fromiter(lost, dtype=np.int64, count=len(lost))] = False
                # Rows past the output were rejected already.
                lost = {pos: why for pos, why in lost.items() if pos < n}
                if scope.kind == "deduplicate":
                    deduplicated += len(lost)
                    continue
                for pos, (holder, first_ref) in lost.items():
                    errors[pos] = _unique_message(scope, output, pos, holder, first_ref)
            cursor.execute(f"DROP TABLE {_CLAIM_TABLE}")
    rejected = _rejected(inputs, errors)
    kept = output if keep[:n].all() else output.filter(pa.array(keep[:n]))
    return Claimed(strip_keys(kept, scopes), rejected, deduplicated)


def _key_rows(
    output: pa.Table, scopes: Sequence[KeyScope], held: pa.Table | None
) -> pa.Table:
    """The key columns and `_source_ref` of the output rows, then of the rejected
    rows holding a key (every scope's column, NULL where a table lacks it)."""
    names = [*(s.column for s in scopes), SOURCE_REF_COLUMN]
    parts = []
    for table in (output, held):
        if table is None:
            continue
        parts.append(
            pa.table(
                {
                    name: table.column(name).cast(pa.string())
                    if name in table.schema.names
                    else pa.nulls(table.num_rows, pa.string())
                    for name in names
                }
            )
        )
    return pa.concat_tables(parts)


def _claim_scope(
    cursor: Any,
    run_id: int,
    seq: int,
    scope: KeyScope,
    rows: pa.Table,
    keep: np.ndarray,
    order: str | None,
) -> dict[int, tuple[int, str]]:
    """Claim one scope's keys of the rows still kept.

    Returns:
        The positions that lose -> (the chunk holding their key, the row holding
        it).
    """
    hashes = rows.column(scope.column).combine_chunks()
    candidates = np.flatnonzero(
        keep & pc.is_valid(hashes).to_numpy(zero_copy_only=False)
    )
    if order == DESCENDING:
        candidates = candidates[::-1]
    if not len(candidates):
        return {}
    refs = _refs(rows)
    keys = hashes.take(pa.array(candidates, pa.int64())).to_numpy(zero_copy_only=False)
    # The engine kept one row per key; should two rows still share one, the
    # first in load order wins.
    _, first = np.unique(keys, return_index=True)
    lost: dict[int, tuple[int, str]] = {}
    if len(first) < len(candidates):
        winner = np.zeros(len(candidates), dtype=bool)
        winner[first] = True
        holder = dict(zip(keys[first], candidates[first], strict=True))
        for pos, key in zip(candidates[~winner], keys[~winner], strict=True):
            lost[int(pos)] = (seq, refs[holder[key]].as_py() or "")
        candidates, keys = candidates[winner], keys[winner]
    claim = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "pos": pa.array(candidates, pa.int64()),
            "ref": refs.take(pa.array(candidates, pa.int64())).fill_null(""),
        }
    )
    _load_claim_table(cursor, claim)
    lost.update(_insert_claim(cursor, run_id, seq, scope))
    cursor.execute(f"DELETE FROM {_CLAIM_TABLE}")
    return lost


def _insert_claim(
    cursor: Any, run_id: int, seq: int, scope: KeyScope
) -> dict[int, tuple[int, str]]:
    """Insert the claim table's keys that no chunk holds yet as chunk `seq`'s.

    Returns:
        The positions whose key another chunk holds -> (that chunk, its row);
        for a deduplicate scope only the positions matter ((-1, "")).
    """
    key = connection.ops.quote_name("key")
    table = RunKey._meta.db_table
    insert = (
        f"INSERT INTO {table} (run_id, scope, {key}, seq, source_ref) "
        f"SELECT %s, %s, c.key, %s, c.ref FROM {_CLAIM_TABLE} c WHERE true "
        f"ON CONFLICT (run_id, scope, {key}) DO NOTHING"
    )
    params = [run_id, scope.name, seq]
    if not _is_postgresql():
        cursor.execute(
            f"SELECT c.pos, k.seq, k.source_ref FROM {_CLAIM_TABLE} c JOIN {table} k "
            f"ON k.run_id = %s AND k.scope = %s AND k.{key} = c.key",
            [run_id, scope.name],
        )
        held = {int(p): (h, r) for p, h, r in cursor.fetchall()}
        cursor.execute(insert, params)
        return held
    # One statement: the keys it could not insert are the ones held (a join of
    # the claim with all the run's keys would grow with the run).
    cursor.execute(
        f"WITH ins AS ({insert} RETURNING {key}) SELECT c.pos, c.key "
        f"FROM {_CLAIM_TABLE} c WHERE NOT EXISTS "
        f"(SELECT 1 FROM ins WHERE ins.{key} = c.key)",
        params,
    )
    lost = cursor.fetchall()
    if not lost or scope.kind == "deduplicate":
        return {int(pos): (-1, "") for pos, _ in lost}
    cursor.execute(
        f"SELECT {key}, seq, source_ref FROM {table} WHERE run_id = %s "
        f"AND scope = %s AND {key} = ANY(%s::uuid[])",
        [run_id, scope.name, [str(k) for _, k in lost]],
    )
    holders = {str(k): (h, r) for k, h, r in cursor.fetchall()}
    return {int(pos): holders[str(k)] for pos, k in lost}


def _is_postgresql() -> bool:
    """COPY and DML in a CTE on PostgreSQL; plain SQL elsewhere (the local SQLite
    default)."""
    return connection.vendor == "postgresql"


def _refs(output: pa.Table) -> pa.Array:
    if SOURCE_REF_COLUMN not in output.schema.names:
        return pa.nulls(output.num_rows, pa.string())
    return output.column(SOURCE_REF_COLUMN).combine_chunks().cast(pa.string())


def _load_claim_table(cursor: Any, claim: pa.Table) -> None:
    """Fill the claim table: COPY on PostgreSQL, plain inserts elsewhere."""
    if _is_postgresql():
        buffer = io.BytesIO()
        pacsv.write_csv(claim, buffer, pacsv.WriteOptions(include_header=False))
        with cursor.cursor.copy(
            f"COPY {_CLAIM_TABLE} (key, pos, ref) FROM STDIN WITH (FORMAT csv)"
        ) as copy:
            copy.write(buffer.getvalue())
    else:
        cursor.executemany(
            f"INSERT INTO {_CLAIM_TABLE} (key, pos, ref) VALUES (%s, %s, %s)",
            list(
                zip(
                    *(claim.column(c).to_pylist() for c in claim.column_names),
                    strict=True,
                )
            ),
        )


def _unique_message(
    scope: KeyScope, output: pa.Table, pos: int, holder: int, ref: str
) -> str:
    field = scope.key[0]
    names = {n.lower(): n for n in output.schema.names}
    column = names.get(field.lower())
    where = f"first at {ref}" if ref else f"first in chunk {holder}"
    if column is None:
        return f"{field}: the value is not unique within the run ({where})"
    value = output.column(column)[pos].as_py()
    text = str(value)
    if len(text) > MAX_VALUE_CHARS:
        text = text[:MAX_VALUE_CHARS] + "..."
    return f"{field}: '{text}' is not unique within the run ({where})"


def _rejected(inputs: pa.Table | None, errors: dict[int, str]) -> pa.Table:
    if not errors:
        return pa.table({})
    if inputs is None:
        raise ValueError("unique rules reject rows: their input rows are needed")
    positions = sorted(errors)
    rows = inputs.take(pa.array(positions, pa.int64()))
    return rows.append_column(
        "_error", pa.array([errors[p] for p in positions], pa.string())
    ).append_column("_step", pa.array(["validate"] * len(positions), pa.string()))


def aligned_inputs(table: pa.Table, output: pa.Table) -> pa.Table:
    """The input rows of each output row (matched by `_source_ref`), aligned with
    `output`: what a unique rule's dead letter holds."""
    index = pc.index_in(
        output.column(SOURCE_REF_COLUMN), value_set=table.column(SOURCE_REF_COLUMN)
    )
    return table.take(index)


def attach_held(rejected: pa.Table, rejected_keys: pa.Table | None) -> pa.Table:
    """The rejected rows with the engine's `rejected_keys` appended (prefixed), to
    travel with them to the load."""
    if rejected_keys is None or rejected_keys.num_rows != rejected.num_rows:
        return rejected
    for name in rejected_keys.column_names:
        rejected = rejected.append_column(
            f"{_HELD_PREFIX}{name}", rejected_keys.column(name)
        )
    return rejected


def detach_held(rejected: pa.Table) -> tuple[pa.Table, pa.Table | None]:
    """Split `attach_held`'s columns off again: (the rejected rows as the engine
    gave them, their key columns with `_source_ref` or None)."""
    names = [c for c in rejected.column_names if c.startswith(_HELD_PREFIX)]
    if not names:
        return rejected, None
    held = pa.table(
        {
            **{c[len(_HELD_PREFIX) :]: rejected.column(c) for c in names},
            SOURCE_REF_COLUMN: rejected.column(SOURCE_REF_COLUMN)
            if SOURCE_REF_COLUMN in rejected.column_names
            else pa.nulls(rejected.num_rows, pa.string()),
        }
    )
    return rejected.drop_columns(names), held


def forget(run_id: int) -> int:
    """Delete a run's keys (it cannot be resumed any more); returns how many."""
    deleted, _ = RunKey.objects.filter(run_id=run_id).delete()
    return deleted


def resume_error(old: Any, new: Any) -> str:
    """Why the keys a run stored under version `old` do not fit version `new`
    ("" if they do), for a resume with another version."""
    if signature(old) == signature(new):
        return ""
    return (
        "the run's deduplicate keys or unique values were stored for "
        f"{signature(old) or 'none'}; this version needs {signature(new) or 'none'}"
    )
