"""Compiles a step list once and runs it over Arrow batches with DuckDB.

``compile_steps`` checks the config and opens the pipeline's connection; the
query itself is planned per input schema (once, then cached) because the cast
of a mapped value depends on the type its expression yields. Each run
registers the batch as a view (no copy), runs one query and splits its result
into output and rejected rows with Arrow kernels: no per-record Python.

The few things SQL cannot do run after the query, on one column of the rows
it kept: JSON Schema rules (once per distinct payload) and Fernet encryption
(once per value). An aggregate step groups the kept rows in a second DuckDB
query into partial aggregates, which ``merge_partials`` merges.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms.engine.aggregate import AggregateQueries, merge, static_queries
from transforms.engine.connection import connect, first_line, interruptible
from transforms.engine.exceptions import EngineError
from transforms.engine.jsonrules import JsonCheck, compile_check
from transforms.engine.lineage import column_lineage
from transforms.engine.masking import Secrets, encrypt_column
from transforms.engine.planner import (
    BATCH_VIEW,
    DUPES,
    ERR,
    PRECAST_TYPES,
    RAISED,
    RAISED_MARK,
    REF_POS,
    REF_SOURCE,
    RID,
    STEP,
    Constants,
    Plan,
    PlanBuilder,
    ReferenceTable,
    check_input_schema,
    precast_candidates,
    precast_columns,
    reference_tables,
)
from transforms.engine.steps import (
    DEDUPE_KEY_COLUMN,
    ERROR_COLUMN,
    SOURCE_REF,
    STEP_COLUMN,
    AggregateStep,
    DeduplicateStep,
    EnrichStep,
    KeyScope,
    MapStep,
    MaskStep,
    Step,
    ValidateStep,
    key_scopes,
    parse_steps,
    reference_columns,
)

# Errors a single row can cause (a user's CAST, an overflow, error(), a
# malformed JSON); the failing rows are then isolated. Anything else fails
# the whole batch.
ROW_ERRORS: tuple[type[Exception], ...] = (
    duckdb.DataError,
    duckdb.InvalidInputException,
    duckdb.NotImplementedException,
    # DuckDB quotes the offending value in its message, cut to a byte length:
    # a cut inside a multi-byte character makes the binding raise this instead.
    UnicodeDecodeError,
)
# Rows of one batch whose DuckDB error message is looked up one by one; the
# rest say RAISED_MARK.
MAX_DIAGNOSED_ROWS = 100
# Bisection (the fallback when TRY cannot be used) costs a few queries per
# failing row; past this many the batch fails instead of crawling.
MAX_BISECTED_ROWS = 100

VIOLATIONS_SCHEMA = pa.schema(
    [pa.field("rule", pa.string()), pa.field(SOURCE_REF, pa.string())]
)
_VIOLATIONS_WORK = VIOLATIONS_SCHEMA.append(pa.field(RID, pa.int64()))

# Distinct sets of pre-cast columns planned per input schema (each is a plan
# and a prepared statement); past this a batch uses the largest planned set
# its castable columns include (the empty set, the plain plan, at worst).
MAX_PRECAST_VARIANTS = 4

_SchemaKey = tuple[tuple[str, str], ...]
# The input schema's key, the registered references' schema keys and the
# input columns pre-cast to int64.
_PlanKey = tuple[_SchemaKey, tuple[tuple[str, _SchemaKey], ...], tuple[str, ...]]


@dataclass
class EngineResult:
    """What one batch became.

    Attributes:
        output: the output schema's columns, then ``_source_ref``; for an
            aggregate pipeline, the batch's partial aggregates (no
            ``_source_ref``), to merge with ``merge_partials``.
        rejected: the input columns as received, then ``_error`` (the
            messages, ``; ``-separated) and ``_step`` (the first failing step:
            ``map``, ``filter``, ``validate`` or ``aggregate``).
        filtered: rows dropped by filter steps (counted, not rejected).
        rows_in: rows in the input batch.
        deduplicated: rows a deduplicate step dropped as duplicates within the
            batch (of kept rows that reached the end: the duplicates of a row
            a later filter drops count as filtered).
        rejected_keys: aligned with ``rejected``, the key hash columns of the
            run-wide keys (``key_scopes``) for the rejected rows that hold a
            key in the batch although a later step (or another rule of the
            same step) rejected them: the row a deduplicate step kept, the
            first occurrence of a unique value. NULL for the others. A run
            records them too, so the result does not depend on the chunking.
            None without key scopes.
        violations: one row per (rejected row, validate rule it violates):
            ``rule`` (the rule's path, e.g. ``steps[2].rules[0]``, see
            ``CompiledPipeline.rules``) and the row's ``_source_ref``, in
            input order; the data for a data-quality report.
    """

    output: pa.Table
    rejected: pa.Table
    filtered: int
    rows_in: int
    deduplicated: int = 0
    rejected_keys: pa.Table | None = None
    violations: pa.Table = field(default_factory=VIOLATIONS_SCHEMA.empty_table)


@dataclass(frozen=True)
class _Failure:
    """A row isolated by bisection: it makes the query raise on its own."""

    rid: int
    step: str
    message: str


class CompiledPipeline:
    """A step list compiled for DuckDB, reused across many batches.

    Owns one locked-down in-memory DuckDB connection. Not thread-safe: use one
    per worker process or thread, and ``close()`` it when done (or use it as a
    context manager).
    """

    def __init__(
        self,
        steps: Sequence[Step],
        *,
        timezone: str = "UTC",
        threads: int = 1,
        memory_limit: str = "1GB",
        input_schema: pa.Schema | None = None,
        secrets: Mapping[str, str] | None = None,
        reference_schemas: Mapping[str, pa.Schema] | None = None,
        precast: bool = True,
    ) -> None:
        self.steps = list(steps)
        # Input columns whose integer or timestamptz fields may read an Arrow
        # pre-cast (with that type), and per input schema the sets of pre-cast
        # columns planned so far.
        self._precast = precast_candidates(self.steps) if precast else {}
        self._precast_variants: dict[_SchemaKey, list[tuple[str, ...]]] = {}
        self._needed = reference_columns(self.steps)
        self._reference_tables: list[ReferenceTable] = reference_tables(self.steps)
        # Reference name -> the object last registered (kept, so its id() is
        # not reused) and the schema of its registered columns.
        self._registered: dict[str, tuple[object, pa.Schema]] = {}
        self.timezone = timezone
        self._con: duckdb.DuckDBPyConnection | None = connect(
            timezone=timezone, threads=threads, memory_limit=memory_limit
        )
        self._plans: dict[_PlanKey, Plan] = {}
        self._safe_plans: dict[_PlanKey, Plan | None] = {}
        # id(plan) -> the plan and the name its query is PREPAREd under: parsing
        # and planning the query costs ~15 ms, paid once per plan, not per batch.
        # Keyed by plan, not query text: two input schemas can give one text.
        self._prepared: dict[int, tuple[Plan, str]] = {}
        self._aggregates: dict[_PlanKey, AggregateQueries] = {}
        last = self.steps[-1] if self.steps else None
        self._aggregate = last if isinstance(last, AggregateStep) else None
        # The rows' schema before an aggregate (the output otherwise).
        self._static_rows = _static_rows_schema(self.steps)
        self._static_schema = None if self._aggregate else self._static_rows
        self._static_aggregate: AggregateQueries | None = None
        try:
            self._secrets = Secrets(self.con, self.steps, secrets)
            self._json_checks: dict[str, JsonCheck] = {
                rule.path: compile_check(rule)
                for step in self.steps
                if isinstance(step, ValidateStep)
                for rule in step.rules
                if rule.kind == "json_schema"
            }
            self._constants = Constants(self.con, self.steps)
            if self._aggregate is not None and self._static_rows is not None:
                self._static_aggregate = static_queries(
                    self.con, self._aggregate, self._static_rows
                )
            if reference_schemas is not None and self._needed:
                self._register_references(
                    {
                        name: reference_schemas[name].empty_table()
                        for name in self._needed
                        if name in reference_schemas
                    },
                    complete=False,
                )
            if input_schema is not None:
                schema = _without_view_types(input_schema.empty_table()).schema
                if set(self._registered) == set(self._needed):
                    self._plan(schema)
                else:
                    check_input_schema(schema)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        kinds = ", ".join(step.kind for step in self.steps)
        state = "closed" if self._con is None else "open"
        return f"<CompiledPipeline [{kinds}] {state}>"

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The pipeline's open DuckDB connection."""
        if self._con is None:
            raise EngineError("the compiled pipeline is closed")
        return self._con

    @property
    def output_schema(self) -> pa.Schema:
        """The output's data columns (without ``_source_ref``).

        Known at compile time from the last map step's field types (a mask
        step makes its fields strings). Without a map step the output is the
        input's columns: known once ``input_schema`` was given to
        ``compile_steps`` or a batch has run. For an aggregate pipeline, the
        schema of the partial aggregates ``run()`` outputs.

        Raises:
            EngineError: no map step, and no input schema known yet.
        """
        if self._aggregate is not None:
            return self._known_aggregate().partial_schema
        if self._static_schema is not None:
            return self._static_schema
        if self._plans:
            schema = next(iter(self._plans.values())).output_schema
            return schema.remove(schema.get_field_index(SOURCE_REF))
        raise EngineError(
            "without a map step the output schema is the input's: "
            "pass input_schema to compile_steps or run a batch first"
        )

    @property
    def is_aggregate(self) -> bool:
        """Whether the last step is an aggregate (``run()`` gives partials)."""
        return self._aggregate is not None

    @property
    def references(self) -> dict[str, list[str]]:
        """Each reference dataset the pipeline reads -> the columns it needs
        (enrich keys and the columns its fields read, referential columns):
        load only these and pass them to ``run(..., references=...)``."""
        return {name: list(columns) for name, columns in self._needed.items()}

    @property
    def dedupe_key_column(self) -> str | None:
        """The output column holding each row's deduplicate key hash
        (``_dedupe_key``), for run-wide deduplication by the caller; None
        without a deduplicate step, and for an aggregate pipeline."""
        if self._aggregate is not None:
            return None
        if any(isinstance(step, DeduplicateStep) for step in self.steps):
            return DEDUPE_KEY_COLUMN
        return None

    @property
    def unique_columns(self) -> dict[str, str]:
        """Each field with a ``unique`` rule -> the output column holding its
        value hashes (``_unique_<field>``), for run-wide checks by the caller;
        empty for an aggregate pipeline."""
        if self._aggregate is not None:
            return {}
        found: dict[str, str] = {}
        for step in self.steps:
            if isinstance(step, ValidateStep):
                for rule in step.rules:
                    if rule.kind == "unique":
                        found.setdefault(rule.field, f"_unique_{rule.field}")
        return found

    @property
    def key_scopes(self) -> list[KeyScope]:
        """The keys to keep exact across the batches of a run, in step order:
        the deduplicate step's and each unique field's (see ``KeyScope``);
        empty for an aggregate pipeline."""
        return key_scopes(self.steps)

    @property
    def rules(self) -> dict[str, dict[str, Any]]:
        """Each validate rule's path (as in ``EngineResult.violations``) -> its
        step index, field and kind, in step and rule order."""
        return rule_index(self.steps)

    @property
    def final_schema(self) -> pa.Schema:
        """The schema of the pipeline's result: for an aggregate pipeline, of
        ``merge_partials``'s output (group keys, then one column per
        measure); otherwise the output schema.

        Raises:
            EngineError: the schema depends on an input schema not known yet.
        """
        if self._aggregate is not None:
            return self._known_aggregate().final_schema
        return self.output_schema

    @property
    def column_lineage(self) -> dict[str, list[str]]:
        """Each final output field -> the source columns its value reads.

        Raises:
            EngineError: no map step, and no input schema known yet (the
                output fields are then the input's columns).
        """
        if self._aggregate is not None:
            outputs = [
                *self._aggregate.group_by,
                *(m.name for m in self._aggregate.measures),
            ]
        elif self._static_rows is not None:
            outputs = self._static_rows.names
        else:
            outputs = self.output_schema.names
        return column_lineage(self.steps, outputs)

    @interruptible
    def merge_partials(
        self, partial_tables: Sequence[pa.Table], *, final: bool = True
    ) -> pa.Table:
        """Merge partial aggregates of any number of batches.

        The result equals one pass over all the batches' rows, whatever the
        split (float sums and averages up to summation-order rounding).

        Args:
            partial_tables: ``run()`` outputs; empty tables are fine.
            final: True for the final values (``final_schema``); False for one
                merged partial table (``output_schema``), to merge further.

        Returns:
            One row per group; without ``group_by`` exactly one row.

        Raises:
            EngineError: not an aggregate pipeline, a table that is not its
                partial, or the partial schema is not known (no map step, no
                input schema and no table).
        """
        if self._aggregate is None:
            raise EngineError("merge_partials needs a pipeline ending in aggregate")
        queries = self._static_aggregate or next(iter(self._aggregates.values()), None)
        if queries is not None:
            partials = queries.partial_schema
        elif partial_tables:
            partials = partial_tables[0].schema
        else:
            raise EngineError(
                "the partial schema is not known: pass input_schema to "
                "compile_steps, run a batch or pass a partial table"
            )
        return merge(
            self.con, self._aggregate, partials, list(partial_tables), final=final
        )

    @interruptible
    def run(
        self,
        batch: pa.RecordBatch | pa.Table,
        *,
        references: Mapping[str, pa.Table | pa.RecordBatch] | None = None,
    ) -> EngineResult:
        """Run the pipeline over one batch.

        Args:
            batch: the source records, with a ``_source_ref`` column.
            references: each reference dataset the pipeline reads, by name
                (see ``references``): at least the columns it needs. A table
                is registered with DuckDB once and reused while the same
                object is passed again; a different object replaces it.

        Returns:
            The output rows, the rejected rows (with their original values) and
            the counts.

        Raises:
            InputSchemaError: no ``_source_ref`` column, or a reserved name.
            StepConfigError: an expression does not bind against the batch's
                columns (checked once per new input schema).
            EngineError: the query failed for a reason no row explains, or a
                reference dataset is missing or lacks a needed column.
            EngineInterrupted: a signal to this process stopped DuckDB.
        """
        if self._needed:
            self._register_references(references or {}, complete=True)
        table = (
            pa.Table.from_batches([batch])
            if isinstance(batch, pa.RecordBatch)
            else batch
        )
        table = _without_view_types(table)
        casts = self._precast_batch(table)
        precast = tuple(casts)
        plan = self._plan(table.schema, precast)
        rows_in = table.num_rows
        work = table
        for name, companion in precast_columns(table.schema, precast).items():
            work = work.append_column(
                pa.field(companion, casts[name].type), casts[name]
            )
        work = work.append_column(RID, pa.array(np.arange(rows_in, dtype=np.int64)))
        failures: list[_Failure] = []
        try:
            result = self._execute(plan, work)
        except ROW_ERRORS:
            result, failures = self._recover(table.schema, precast, plan, work)
        if plan.reorders:
            result = _in_input_order(result)

        deduplicated = 0
        if plan.counts_dupes:
            deduplicated = int(pc.sum(result.column(DUPES)).as_py() or 0)
        if result.column(ERR).null_count == result.num_rows:
            good, bad = result, result.slice(0, 0)  # the common case: no errors
        else:
            ok = pc.is_null(result.column(ERR))
            good = result.filter(ok)
            bad = result.filter(pc.invert(ok))
        if bad.num_rows and pc.any(pc.is_valid(bad.column(RAISED))).as_py():
            bad = self._diagnose_raised(table.schema, precast, bad, work)
        filtered = rows_in - result.num_rows - len(failures) - deduplicated
        checked = good
        violations = _violations(plan, bad)
        if plan.json_checks:
            good, invalid, json_violations = self._check_json(plan, good)
            failures = [*failures, *invalid]
            violations = pa.concat_tables([violations, json_violations])
        violations = _by_row(violations)
        output = good.select(plan.output_schema.names).cast(plan.output_schema)
        for f, column in plan.encrypted:
            index = output.schema.get_field_index(column)
            tokens = encrypt_column(self._secrets.fernets[f.secret], output[column])
            output = output.set_column(index, output.schema.field(index), tokens)
        if self._aggregate is not None:
            output = self._partials(table.schema, precast, output)
        else:
            for hidden, name in plan.exposed:
                output = output.append_column(
                    pa.field(name, pa.string()), good.column(hidden)
                )
        rejected_keys = None
        if plan.exposed and self._aggregate is None:
            rejected_keys = _rejected_keys(plan.exposed, bad, checked, failures)
        return EngineResult(
            output=output,
            rejected=_rejected(table, bad, failures),
            filtered=filtered,
            rows_in=rows_in,
            deduplicated=deduplicated,
            rejected_keys=rejected_keys,
            violations=violations,
        )

    def close(self) -> None:
        """Release the DuckDB connection; the pipeline can no longer run."""
        if self._con is not None:
            self._con.close()
            self._con = None

    def __enter__(self) -> CompiledPipeline:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---------------------------------------------------------------- plans

    def _builder(
        self, schema: pa.Schema, precast: tuple[str, ...], *, safe: bool
    ) -> PlanBuilder:
        return PlanBuilder(
            self.con,
            self.steps,
            self._constants,
            static_schema=self._static_schema,
            safe=safe,
            precast=precast_columns(schema, precast),
        )

    def _registered_empty(
        self, schema: pa.Schema, precast: tuple[str, ...] = ()
    ) -> pa.Table:
        table = schema.empty_table()
        for name, companion in precast_columns(schema, precast).items():
            type_ = PRECAST_TYPES[self._precast[name.lower()]]
            table = table.append_column(pa.field(companion, type_), pa.array([], type_))
        return table.append_column(RID, pa.array([], pa.int64()))

    def _key(self, schema: pa.Schema, precast: tuple[str, ...] = ()) -> _PlanKey:
        """A plan's cache key: the input schema, the references' and the
        pre-cast columns."""
        refs = tuple(
            (name, _schema_key(self._registered[name][1]))
            for name in sorted(self._registered)
        )
        return _schema_key(schema), refs, precast

    def _precast_batch(self, table: pa.Table) -> dict[str, pa.ChunkedArray]:
        """The batch's candidate columns whose strict cast Arrow can do instead
        of DuckDB, cast (int64 or UTC timestamps), in input order.

        A column qualifies only when the result is provably the strict cast's.
        For an integer field: every non-null value is ASCII ``[+-]?[0-9]+``
        (Arrow's cast alone also takes ``0x1F``, which the strict cast refuses)
        and Arrow's cast succeeds for all (it refuses a leading ``+``, spaces,
        ``''`` and overflow, which the strict cast may take or reject: such a
        column stays a string and DuckDB casts it as before). For a
        timestamptz field: see `_utc_timestamps`. Past MAX_PRECAST_VARIANTS
        distinct sets for the schema, a planned subset is used.
        """
        if not self._precast or table.num_rows == 0:
            return {}  # an empty batch would plan a set for nothing
        by_name: dict[str, list[pa.Field]] = {}
        for f in table.schema:
            by_name.setdefault(f.name.lower(), []).append(f)
        casts: dict[str, pa.ChunkedArray] = {}
        for f in table.schema:
            kind = self._precast.get(f.name.lower())
            if (
                kind is None
                or len(by_name[f.name.lower()]) != 1
                or not (pa.types.is_string(f.type) or pa.types.is_large_string(f.type))
            ):
                continue
            column = table.column(f.name)
            cast = (
                _utc_timestamps(column) if kind == "timestamptz" else _integers(column)
            )
            if cast is not None:
                casts[f.name] = cast
        chosen = self._precast_variant(table.schema, tuple(casts))
        return {name: casts[name] for name in chosen}

    def _precast_variant(
        self, schema: pa.Schema, castable: tuple[str, ...]
    ) -> tuple[str, ...]:
        """The pre-cast set to plan a batch with: ``castable`` while the
        schema has fewer than MAX_PRECAST_VARIANTS sets, else the largest
        planned set within it, so plans and prepared statements stay few."""
        if not castable:
            return castable
        known = self._precast_variants.setdefault(_schema_key(schema), [])
        if castable in known:
            return castable
        if len(known) < MAX_PRECAST_VARIANTS:
            known.append(castable)
            return castable
        within = [v for v in known if set(v) <= set(castable)]
        return max(within, key=len, default=())

    def _register_references(
        self, references: Mapping[str, pa.Table | pa.RecordBatch], *, complete: bool
    ) -> None:
        """Register the reference datasets not registered yet as these objects.

        Each is cut to its needed columns and materialised into the tables
        the steps read (enrich: one row per key, the first; referential: the
        distinct values), once per distinct object.

        Raises:
            EngineError: a needed reference is missing (``complete``), lacks a
                column, or does not load.
        """
        for name, columns in self._needed.items():
            given = references.get(name)
            if given is None:
                if complete:
                    raise EngineError(
                        f"reference dataset {name!r} is missing: pass it in "
                        f"run(..., references={{{name!r}: table}})"
                    )
                continue
            known = self._registered.get(name)
            if known is not None and known[0] is given:
                continue
            self._load_reference(name, given, columns)

    def _load_reference(
        self, name: str, given: pa.Table | pa.RecordBatch, columns: Sequence[str]
    ) -> None:
        if isinstance(given, pa.RecordBatch):
            table = pa.Table.from_batches([given])
        elif isinstance(given, pa.Table):
            table = given
        else:
            raise EngineError(
                f"reference dataset {name!r} must be a pyarrow Table, "
                f"not {type(given).__name__}"
            )
        actual = {c.lower(): c for c in table.schema.names}
        missing = [c for c in columns if c.lower() not in actual]
        if missing:
            raise EngineError(
                f"reference dataset {name!r} has no column {missing[0]!r} "
                f"(it needs {', '.join(columns)})"
            )
        table = _without_view_types(table.select([actual[c.lower()] for c in columns]))
        source = table.append_column(
            REF_POS, pa.array(np.arange(table.num_rows, dtype=np.int64))
        )
        self.con.register(REF_SOURCE, source)
        try:
            for ref in self._reference_tables:
                if ref.reference == name:
                    self.con.execute(
                        f"CREATE OR REPLACE TEMP TABLE {ref.name} AS {ref.sql}"
                    )
        except duckdb.Error as error:
            self._registered.pop(name, None)
            raise EngineError(
                f"reference dataset {name!r} does not load: {first_line(error)}"
            ) from error
        finally:
            self.con.unregister(REF_SOURCE)
        self._registered[name] = (given, table.schema)

    def _plan(self, schema: pa.Schema, precast: tuple[str, ...] = ()) -> Plan:
        key = self._key(schema, precast)
        plan = self._plans.get(key)
        if plan is None:
            check_input_schema(schema)
            self.con.register(BATCH_VIEW, self._registered_empty(schema, precast))
            try:
                plan = self._builder(schema, precast, safe=False).build()
            finally:
                self.con.unregister(BATCH_VIEW)
            if self._aggregate is not None:
                rows = plan.output_schema
                rows = rows.remove(rows.get_field_index(SOURCE_REF))
                self._aggregates[key] = AggregateQueries(
                    self.con, self._aggregate, rows
                )
            self._plans[key] = plan
        return plan

    def _known_aggregate(self) -> AggregateQueries:
        if self._static_aggregate is not None:
            return self._static_aggregate
        if self._aggregates:
            return next(iter(self._aggregates.values()))
        raise EngineError(
            "without a map step the aggregate's schema depends on the input's: "
            "pass input_schema to compile_steps or run a batch first"
        )

    def _partials(
        self, schema: pa.Schema, precast: tuple[str, ...], rows: pa.Table
    ) -> pa.Table:
        key = self._key(schema, precast)
        partials = self._aggregates[key].partials(self.con, rows)
        if self._static_aggregate is not None:
            partials = partials.cast(self._static_aggregate.partial_schema)
        return partials

    def _check_json(
        self, plan: Plan, good: pa.Table
    ) -> tuple[pa.Table, list[_Failure], pa.Table]:
        """Apply the json_schema rules to the rows the query kept.

        Returns:
            The rows that pass, a failure (``validate``) per row that does
            not, with its messages in rule order, and the violations.
        """
        found: dict[int, list[str]] = {}
        broken: list[tuple[str, int]] = []  # (rule path, row)
        for rule, column in plan.json_checks:
            check = self._json_checks[rule.path]
            for row, message in check.errors(good.column(column)):
                found.setdefault(row, []).append(message)
                broken.append((rule.path, row))
        picked = pa.array([row for _, row in broken], pa.int64())
        violations = pa.Table.from_arrays(
            [
                pa.array([path for path, _ in broken], pa.string()),
                good.column(SOURCE_REF).take(picked),
                good.column(RID).take(picked),
            ],
            schema=_VIOLATIONS_WORK,
        )
        if not found:
            return good, [], violations
        rows = sorted(found)
        rids = good.column(RID).take(pa.array(rows, pa.int64())).to_pylist()
        keep = np.ones(good.num_rows, dtype=bool)
        keep[rows] = False
        failures = [
            _Failure(rid, "validate", "; ".join(found[row]))
            for rid, row in zip(rids, rows, strict=True)
        ]
        return good.filter(pa.array(keep)), failures, violations

    def _safe_plan(self, schema: pa.Schema, precast: tuple[str, ...]) -> Plan | None:
        """The TRY-wrapped plan, or None when DuckDB refuses TRY (volatile
        functions such as random() cannot be wrapped)."""
        key = self._key(schema, precast)
        if key not in self._safe_plans:
            self.con.register(BATCH_VIEW, self._registered_empty(schema, precast))
            try:
                builder = self._builder(schema, precast, safe=True)
                self._safe_plans[key] = builder.build()
            except (duckdb.Error, EngineError):
                self._safe_plans[key] = None
            finally:
                self.con.unregister(BATCH_VIEW)
        return self._safe_plans[key]

    # -------------------------------------------------------------- running

    def _execute(self, plan: Plan, work: pa.Table) -> pa.Table:
        self.con.register(BATCH_VIEW, work)
        try:
            prepared = self._prepared.get(id(plan))
            if prepared is None:
                name = f"__engine_q{len(self._prepared)}"
                self.con.execute(f"PREPARE {name} AS {plan.query()}")
                self.con.complete()
                prepared = self._prepared[id(plan)] = (plan, name)
            name = prepared[1]
            return self.con.sql(f"EXECUTE {name}").to_arrow_table()
        finally:
            self.con.unregister(BATCH_VIEW)

    def _recover(
        self, schema: pa.Schema, precast: tuple[str, ...], plan: Plan, work: pa.Table
    ) -> tuple[pa.Table, list[_Failure]]:
        """Run a batch whose query raised, rejecting only the rows that raise.

        First with the safe plan (one query; raising expressions become row
        errors), else by bisecting the batch with the normal plan.

        Raises:
            EngineError: the query fails even on an empty batch, so no row is
                to blame.
        """
        try:
            self._execute(plan, work.slice(0, 0))
        except duckdb.Error as error:
            raise EngineError(f"the batch query failed: {first_line(error)}") from error
        safe = self._safe_plan(schema, precast)
        if safe is not None:
            try:
                return self._execute(safe, work), []
            except ROW_ERRORS:
                pass  # e.g. an error TRY does not catch: bisect instead
        return self._bisect(plan, work)

    def _bisect(self, plan: Plan, work: pa.Table) -> tuple[pa.Table, list[_Failure]]:
        parts: list[pa.Table] = [self._execute(plan, work.slice(0, 0))]
        failures: list[_Failure] = []
        # Depth first, left half first: good rows keep their input order.
        pending: list[tuple[int, int]] = [(0, work.num_rows)]
        while pending:
            offset, length = pending.pop()
            segment = work.slice(offset, length)
            try:
                parts.append(self._execute(plan, segment))
            except ROW_ERRORS as error:
                if length == 1:
                    if len(failures) >= MAX_BISECTED_ROWS:
                        raise EngineError(
                            f"more than {MAX_BISECTED_ROWS} rows make the query "
                            f"raise; the first: {failures[0].message}"
                        ) from error
                    step, message = self._diagnose(plan, segment, None)
                    failures.append(
                        _Failure(offset, step, message or first_line(error))
                    )
                else:
                    half = length // 2
                    pending.append((offset + half, length - half))
                    pending.append((offset, half))
        return pa.concat_tables(parts), failures

    def _diagnose(
        self, plan: Plan, row: pa.Table, probe_id: int | None
    ) -> tuple[str, str | None]:
        """Evaluate one row's expressions alone to get DuckDB's message.

        Args:
            plan: the plan whose probes to run.
            row: the one-row work table.
            probe_id: the expression known to raise, or None to try all in
                step order.

        Returns:
            The step kind and ``"<field>: <DuckDB message>"`` (None when no
            expression raises on its own).
        """
        probes = plan.probes if probe_id is None else [plan.probes[probe_id]]
        self.con.register(BATCH_VIEW, row)
        try:
            for probe in probes:
                select = f"SELECT {probe.sql} FROM {probe.source}"  # noqa: S608
                query = plan.query(upto=probe.source, select=select)
                try:
                    self.con.sql(query).fetchall()
                except duckdb.Error as error:
                    return probe.step.kind, f"{probe.label}: {first_line(error)}"
                except UnicodeDecodeError:
                    # DuckDB's message cut a character of the value in two.
                    return probe.step.kind, f"{probe.label}: {RAISED_MARK}"
        finally:
            self.con.unregister(BATCH_VIEW)
        return (probes[0].step.kind if probes else "map"), None

    def _diagnose_raised(
        self,
        schema: pa.Schema,
        precast: tuple[str, ...],
        bad: pa.Table,
        work: pa.Table,
    ) -> pa.Table:
        """Put DuckDB's message in place of RAISED_MARK for the first rows."""
        safe = self._safe_plan(schema, precast)
        if safe is None:
            return bad
        rids = bad.column(RID).to_pylist()
        raised = bad.column(RAISED).to_pylist()
        errors = bad.column(ERR).to_pylist()
        diagnosed = 0
        for n, probe_id in enumerate(raised):
            if probe_id is None or diagnosed >= MAX_DIAGNOSED_ROWS:
                continue
            diagnosed += 1
            _, message = self._diagnose(safe, work.slice(rids[n], 1), probe_id)
            label = safe.probes[probe_id].label
            if message is not None:
                errors[n] = errors[n].replace(f"{label}: {RAISED_MARK}", message, 1)
        index = bad.schema.get_field_index(ERR)
        return bad.set_column(index, ERR, pa.array(errors, pa.string()))


def _without_view_types(table: pa.Table) -> pa.Table:
    """Cast string_view/binary_view columns to string/binary (same values):
    Arrow's take/filter kernels, used to split rejected rows, lack view types."""
    fields = []
    for f in table.schema:
        if pa.types.is_string_view(f.type):
            f = f.with_type(pa.string())
        elif pa.types.is_binary_view(f.type):
            f = f.with_type(pa.binary())
        fields.append(f)
    schema = pa.schema(fields, metadata=table.schema.metadata)
    return table if schema == table.schema else table.cast(schema)


def _static_rows_schema(steps: Sequence[Step]) -> pa.Schema | None:
    """The rows' schema after the steps, when known without the input's:
    the last map's fields, masked fields turned to strings."""
    schema: pa.Schema | None = None
    for step in steps:
        if isinstance(step, MapStep):
            schema = pa.schema([f.type.arrow_field(f.name) for f in step.fields])
        elif isinstance(step, EnrichStep) and schema is not None:
            for f in step.fields:
                schema = schema.append(f.type.arrow_field(f.name))
        elif isinstance(step, MaskStep) and schema is not None:
            names = [n.lower() for n in schema.names]
            for f in step.fields:
                index = names.index(f.name.lower())
                schema = schema.set(index, pa.field(schema.names[index], pa.string()))
    return schema


def _integers(column: pa.ChunkedArray) -> pa.ChunkedArray | None:
    """The strings as int64 when every non-null value is ``[+-]?[0-9]+`` and
    Arrow's cast takes them all; else None (DuckDB's strict cast decides)."""
    if not _all_digits(column) and not _all_digits(
        pc.utf8_ltrim(column, characters="+-")  # signed values
    ):
        return None
    try:
        return pc.cast(column, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None  # a '+' sign or an overflow: DuckDB decides


def _utc_timestamps(column: pa.ChunkedArray) -> pa.ChunkedArray | None:
    """The strings as UTC timestamps when every non-null value is the
    canonical ``YYYY-MM-DDThh:mm:ssZ`` (or a space for the ``T``); else None.

    Twenty bytes that Arrow's ISO 8601 cast to a zoned timestamp takes can only
    be that form (it refuses a value without an offset, a missing or
    single-digit field, hour 24, second 60 and dates that do not exist), and
    the strict cast's pattern takes every such value and gives the same
    instant, with the session's time zone playing no part (``Z``). Anything
    else (padding, fractions, offsets, an empty string) leaves the column to
    DuckDB. It saves the strict cast's pattern match, trim and parse per row.
    """
    lengths = pc.binary_length(column)
    if not pc.all(pc.equal(lengths, _CANONICAL_UTC_BYTES), min_count=0).as_py():
        return None
    try:
        return pc.cast(column, PRECAST_TYPES["timestamptz"])
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None


#: Bytes of ``YYYY-MM-DDThh:mm:ssZ``.
_CANONICAL_UTC_BYTES = 20


def _all_digits(column: pa.ChunkedArray) -> bool:
    """Every non-null value is ASCII digits only (and not empty)."""
    return bool(pc.all(pc.ascii_is_decimal(column), min_count=0).as_py())


#: Up to this many runs of consecutive rows, `_in_input_order` reorders by
#: slicing (zero copy) instead of taking every column row by row.
_MAX_SLICED_RUNS = 16


def _in_input_order(result: pa.Table) -> pa.Table:
    """The result sorted by input row id (a join or window may reorder it);
    unchanged, at the cost of one pass, when already in order.

    A hash join usually moves only a block or two of rows (DuckDB emits some
    rows of a vector late): then the sorted order is a few runs of consecutive
    rows, put back together from zero-copy slices.
    """
    rids = result.column(RID).to_numpy()
    if rids.size < 2 or bool(np.all(rids[1:] > rids[:-1])):
        return result
    order = np.argsort(rids, kind="stable")
    breaks = np.flatnonzero(order[1:] != order[:-1] + 1) + 1
    if breaks.size >= _MAX_SLICED_RUNS:
        return result.take(pa.array(order))
    starts = np.concatenate(([0], breaks))
    stops = np.concatenate((breaks, [order.size]))
    return pa.concat_tables(
        result.slice(int(order[a]), int(b - a))
        for a, b in zip(starts, stops, strict=True)
    )


def rule_index(steps: Sequence[Step]) -> dict[str, dict[str, Any]]:
    """Each validate rule's path -> its step index, field and kind."""
    return {
        rule.path: {"step": step.index, "field": rule.field, "kind": rule.kind}
        for step in steps
        if isinstance(step, ValidateStep)
        for rule in step.rules
    }


def _violations(plan: Plan, bad: pa.Table) -> pa.Table:
    """The validate rule violations of the rows the query rejected, with the
    row's id (``RID``): rule path, ``_source_ref``, ``RID``."""
    parts = [_VIOLATIONS_WORK.empty_table()]
    if bad.num_rows:
        refs = bad.column(SOURCE_REF).combine_chunks()
        rids = bad.column(RID).combine_chunks()
        for step, column in plan.violations:
            lists = bad.column(column).combine_chunks()
            positions = pc.list_flatten(lists)
            if len(positions) == 0:
                continue
            rows = pc.list_parent_indices(lists)
            paths = pa.array([rule.path for rule in step.rules], pa.string())
            parts.append(
                pa.Table.from_arrays(
                    [paths.take(positions), refs.take(rows), rids.take(rows)],
                    schema=_VIOLATIONS_WORK,
                )
            )
    return pa.concat_tables(parts)


def _by_row(violations: pa.Table) -> pa.Table:
    """Violations in input row order (a row's rules in step and rule order),
    without the row id."""
    if violations.num_rows > 1:
        # Arrow's sort is stable: a row's rules keep their order.
        violations = violations.take(pc.sort_indices(violations.column(RID)))
    return violations.drop_columns([RID])


def _schema_key(schema: pa.Schema) -> _SchemaKey:
    return tuple((f.name, str(f.type)) for f in schema)


def _rejected(table: pa.Table, bad: pa.Table, failures: list[_Failure]) -> pa.Table:
    """The rejected input rows, in input order, with ``_error`` and ``_step``."""
    rids = bad.column(RID).combine_chunks()
    errors = bad.column(ERR).combine_chunks().cast(pa.string())
    steps = bad.column(STEP).combine_chunks().cast(pa.string())
    if failures:
        rids = pa.concat_arrays([rids, pa.array([f.rid for f in failures], pa.int64())])
        errors = pa.concat_arrays(
            [errors, pa.array([f.message for f in failures], pa.string())]
        )
        steps = pa.concat_arrays(
            [steps, pa.array([f.step for f in failures], pa.string())]
        )
        order = pc.sort_indices(rids)
        rids, errors, steps = (a.take(order) for a in (rids, errors, steps))
    # An empty take still copies every column (Arrow concatenates the chunks).
    picked = table.take(rids) if len(rids) else table.slice(0, 0)
    return picked.append_column(
        pa.field(ERROR_COLUMN, pa.string()), errors
    ).append_column(pa.field(STEP_COLUMN, pa.string()), steps)


def _rejected_keys(
    exposed: Sequence[tuple[str, str]],
    bad: pa.Table,
    checked: pa.Table,
    failures: list[_Failure],
) -> pa.Table:
    """The exposed key hashes of the rejected rows, in ``_rejected``'s order: from
    the query for rows it rejected, from the rows it kept for those a json_schema
    rule rejected after it, NULL for rows isolated by bisection."""
    rids = bad.column(RID).combine_chunks()
    columns = {name: bad.column(hidden).combine_chunks() for hidden, name in exposed}
    if failures:
        kept = {rid: n for n, rid in enumerate(checked.column(RID).to_pylist())}
        rows = [kept.get(f.rid) for f in failures]
        rids = pa.concat_arrays([rids, pa.array([f.rid for f in failures], pa.int64())])
        for hidden, name in exposed:
            extra = (
                checked.column(hidden).combine_chunks().take(pa.array(rows, pa.int64()))
            )
            columns[name] = pa.concat_arrays(
                [columns[name].cast(pa.string()), extra.cast(pa.string())]
            )
        order = pc.sort_indices(rids)
        columns = {name: values.take(order) for name, values in columns.items()}
    return pa.table(
        {name: values.cast(pa.string()) for name, values in columns.items()}
    )


def compile_steps(
    steps: Sequence[Mapping[str, Any]],
    *,
    timezone: str = "UTC",
    threads: int = 1,
    memory_limit: str = "1GB",
    input_schema: pa.Schema | None = None,
    secrets: Mapping[str, str] | None = None,
    reference_schemas: Mapping[str, pa.Schema] | None = None,
    precast: bool = True,
) -> CompiledPipeline:
    """Check a step list and compile it for DuckDB.

    Args:
        steps: the step config: a list of ``map``, ``filter``, ``validate``,
            ``enrich``, ``deduplicate``, ``mask`` and ``aggregate`` objects,
            run in order.
        timezone: IANA time zone of the session: naive strings cast to
            ``timestamptz`` are read in it, and so are SQL time functions.
        threads: DuckDB threads; 1 because workers are processes.
        memory_limit: DuckDB memory limit, e.g. ``"1GB"``.
        input_schema: the source batch schema, when known: expressions are
            then checked against its columns and the query is planned now.
        secrets: values mask steps use, by name: ``mask_salt`` (sha256) and
            ``fernet_key`` (encrypt) unless a field names another. They are
            never put in SQL text, error messages or reprs.
        reference_schemas: the schemas of the reference datasets enrich steps
            and referential rules read, when known: with ``input_schema`` the
            query is then planned (and checked) now.
        precast: let Arrow cast a batch's integer columns that the first map
            reads as they are (``"expr": "year"``) when every value is plain
            digits, instead of DuckDB's strict cast; the results are the
            same, only faster. False is for tests that compare both paths.

    Returns:
        The compiled pipeline; ``close()`` it when done.

    Raises:
        StepConfigError: the config is invalid; the message names the step and
            field, e.g. ``steps[0].fields[3] (distance_km): unknown type 'flot'``.
    """
    input_columns = None
    if input_schema is not None:
        input_columns = [n for n in input_schema.names if n != SOURCE_REF]
    return CompiledPipeline(
        parse_steps(steps, input_columns=input_columns),
        timezone=timezone,
        threads=threads,
        memory_limit=memory_limit,
        input_schema=input_schema,
        secrets=secrets,
        reference_schemas=reference_schemas,
        precast=precast,
    )


def merge_partials(
    compiled: CompiledPipeline, partial_tables: Sequence[pa.Table]
) -> pa.Table:
    """Merge an aggregate pipeline's partial tables into its final result.

    Equals one pass over all the rows, whatever the split into batches (float
    sums and averages up to summation-order rounding). Runs in DuckDB.

    Args:
        compiled: the aggregate pipeline that produced the partials.
        partial_tables: ``run()`` outputs, in any order; empty ones are fine.

    Returns:
        The final table, of schema ``compiled.final_schema``.

    Raises:
        EngineError: see ``CompiledPipeline.merge_partials``.
    """
    return compiled.merge_partials(partial_tables)
