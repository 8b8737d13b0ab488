"""The shared connector contract: test classes every source and sink passes.

A connector's test module subclasses `SourceContract`, `SinkContract` and, for the
write modes it offers, `UpsertSinkContract`, `ReplaceSinkContract` and
`EvolveSinkContract` (as `Test...` classes) and provides the fixtures listed on each
class. The contract classes themselves are not collected (their names do not start
with `Test`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pytest

from connectors.base import SOURCE_REF_COLUMN, SYSTEM_COLUMNS, Chunk, Sink, Source
from connectors.exceptions import ConfigError, FencedError, TerminalError


class SourceContract:
    """What every source does.

    Fixtures a subclass provides:
        source: a `Source` ready to read.
        read_options: options of a read over a known input.
        expected_refs: the `_source_ref` of every record of that input, in order.
    """

    chunk_rows = 3

    def _read_all(
        self, source: Source, read_options: dict[str, Any]
    ) -> tuple[list[Chunk], pa.Table]:
        chunks = list(source.plan(read_options, chunk_rows=self.chunk_rows))
        batches = [b for c in chunks for b in source.read(read_options, c)]
        return chunks, pa.Table.from_batches(batches) if batches else pa.table({})

    def test_check_is_ok(self, source: Source) -> None:
        assert source.check().ok is True

    def test_chunks_are_numbered_from_zero_and_serialisable(
        self, source: Source, read_options: dict[str, Any]
    ) -> None:
        chunks = list(source.plan(read_options, chunk_rows=self.chunk_rows))

        assert [c.seq for c in chunks] == list(range(len(chunks)))
        for chunk in chunks:
            assert json.loads(json.dumps(chunk.spec)) == chunk.spec

    def test_every_record_is_read_exactly_once(
        self, source: Source, read_options: dict[str, Any], expected_refs: list[str]
    ) -> None:
        _, table = self._read_all(source, read_options)

        assert table.column(SOURCE_REF_COLUMN).to_pylist() == expected_refs

    def test_every_batch_carries_a_string_source_ref(
        self, source: Source, read_options: dict[str, Any]
    ) -> None:
        chunks = list(source.plan(read_options, chunk_rows=self.chunk_rows))
        for chunk in chunks:
            for batch in source.read(read_options, chunk):
                assert batch.schema.field(SOURCE_REF_COLUMN).type == pa.string()
                assert batch.column(SOURCE_REF_COLUMN).null_count == 0

    def test_fingerprint_is_stable(
        self, source: Source, read_options: dict[str, Any]
    ) -> None:
        assert source.fingerprint(read_options) == source.fingerprint(read_options)


class SinkContract:
    """What every sink that is idempotent per (run, chunk) does.

    Fixtures a subclass provides:
        sink: a `Sink` whose target is private to the test.
        write_options: options naming that target.
        sample: a table of data columns plus `_source_ref` (at least 2 rows).
        refs_of: `refs_of(run_id, chunk_seq)` -> sorted `_source_ref` stored for it.
        wait_until_blocked: called inside a first writer's transaction until a second
            writer waits on it (or a short while).
    """

    def test_prepare_twice_is_harmless(
        self, sink: Sink, write_options: dict[str, Any], sample: pa.Table
    ) -> None:
        sink.prepare(write_options, sample.schema)
        sink.prepare(write_options, sample.schema)

    def test_write_commits_every_row(
        self,
        sink: Sink,
        write_options: dict[str, Any],
        sample: pa.Table,
        refs_of: Callable[[int, int], list[str]],
    ) -> None:
        sink.prepare(write_options, sample.schema)

        result = sink.write(write_options, sample, run_id=7, chunk_seq=0, fence=_yes)

        assert result.rows_written == sample.num_rows
        assert refs_of(7, 0) == sorted(sample.column(SOURCE_REF_COLUMN).to_pylist())

    def test_writing_a_chunk_twice_keeps_its_rows_once(
        self,
        sink: Sink,
        write_options: dict[str, Any],
        sample: pa.Table,
        refs_of: Callable[[int, int], list[str]],
    ) -> None:
        sink.prepare(write_options, sample.schema)
        sink.write(write_options, sample, run_id=7, chunk_seq=1, fence=_yes)
        sink.write(write_options, sample, run_id=7, chunk_seq=2, fence=_yes)

        again = sink.write(write_options, sample, run_id=7, chunk_seq=1, fence=_yes)

        refs = sorted(sample.column(SOURCE_REF_COLUMN).to_pylist())
        assert again.rows_written == sample.num_rows
        assert refs_of(7, 1) == refs
        assert refs_of(7, 2) == refs

    def test_a_retry_with_fewer_rows_replaces_the_earlier_attempt(
        self,
        sink: Sink,
        write_options: dict[str, Any],
        sample: pa.Table,
        refs_of: Callable[[int, int], list[str]],
    ) -> None:
        sink.prepare(write_options, sample.schema)
        sink.write(write_options, sample, run_id=8, chunk_seq=0, fence=_yes)

        sink.write(write_options, sample.slice(0, 1), run_id=8, chunk_seq=0, fence=_yes)

        assert refs_of(8, 0) == sample.column(SOURCE_REF_COLUMN).to_pylist()[:1]

    def test_an_empty_batch_clears_the_chunk(
        self,
        sink: Sink,
        write_options: dict[str, Any],
        sample: pa.Table,
        refs_of: Callable[[int, int], list[str]],
    ) -> None:
        sink.prepare(write_options, sample.schema)
        sink.write(write_options, sample, run_id=9, chunk_seq=0, fence=_yes)

        result = sink.write(
            write_options, sample.slice(0, 0), run_id=9, chunk_seq=0, fence=_yes
        )

        assert result.rows_written == 0
        assert refs_of(9, 0) == []

    def test_a_fenced_write_commits_nothing(
        self,
        sink: Sink,
        write_options: dict[str, Any],
        sample: pa.Table,
        refs_of: Callable[[int, int], list[str]],
    ) -> None:
        sink.prepare(write_options, sample.schema)
        sink.write(write_options, sample, run_id=10, chunk_seq=0, fence=_yes)

        with pytest.raises(FencedError):
            sink.write(
                write_options, sample.slice(0, 1), run_id=10, chunk_seq=0, fence=_no
            )
        with pytest.raises(FencedError):
            sink.write(write_options, sample, run_id=10, chunk_seq=1, fence=_no)

        assert refs_of(10, 0) == sorted(sample.column(SOURCE_REF_COLUMN).to_pylist())
        assert refs_of(10, 1) == []

    def test_concurrent_attempts_of_one_chunk_keep_its_rows_once(
        self,
        sink: Sink,
        write_options: dict[str, Any],
        sample: pa.Table,
        refs_of: Callable[[int, int], list[str]],
        wait_until_blocked: Callable[[], None],
    ) -> None:
        sink.prepare(write_options, sample.schema)
        first_inside = threading.Event()
        results: dict[str, Any] = {}

        def first_fence() -> bool:
            first_inside.set()
            wait_until_blocked()
            return True

        def attempt(name: str, fence: Callable[[], bool]) -> None:
            try:
                results[name] = sink.write(
                    write_options, sample, run_id=11, chunk_seq=0, fence=fence
                )
            except Exception as exc:  # noqa: BLE001 - reported by the assertion
                results[name] = exc

        first = threading.Thread(target=attempt, args=("first", first_fence))
        second = threading.Thread(target=attempt, args=("second", _yes))
        first.start()
        assert first_inside.wait(10)
        second.start()  # starts while the first holds the chunk: must wait for it
        first.join(30)
        second.join(30)

        assert results["first"].details["replaced"] == 0
        assert results["second"].details["replaced"] == sample.num_rows
        assert refs_of(11, 0) == sorted(sample.column(SOURCE_REF_COLUMN).to_pylist())

    def test_dataset_name_names_the_table(
        self, sink: Sink, write_options: dict[str, Any]
    ) -> None:
        assert sink.dataset_name(write_options).endswith(write_options["table"])


def _yes() -> bool:
    return True


def _no() -> bool:
    return False


#: `select(table, columns)` -> the rows of `table` (in the test's schema), sorted.
Select = Callable[[str, list[str]], list[tuple[Any, ...]]]
#: `columns_of(table)` -> the table's column names, None when there is no table.
ColumnsOf = Callable[[str], "set[str] | None"]


def keyed(rows: list[tuple[int, str]], *, refs: str = "k") -> pa.Table:
    """A batch of (`id`, `name`) rows plus `_source_ref` `<refs>#<n>` by position."""
    return pa.table(
        {
            "id": pa.array([r[0] for r in rows], pa.int64()),
            "name": pa.array([r[1] for r in rows], pa.string()),
            SOURCE_REF_COLUMN: [f"{refs}#{n}" for n in range(1, len(rows) + 1)],
        }
    )


class UpsertSinkContract:
    """What every sink with the `upsert` write mode does.

    Fixtures a subclass provides:
        sink: a `Sink` whose target is private to the test.
        base_options: write options naming a table (no `write_mode`).
        select: see `Select`.
        wait_until_blocked: as for `SinkContract`, for run 11, chunk 0 of the table.
    """

    @pytest.fixture
    def upsert_options(self, base_options: dict[str, Any]) -> dict[str, Any]:
        return {**base_options, "write_mode": "upsert", "key": ["id"]}

    def _stored(self, select: Select, options: dict[str, Any]) -> list[tuple[Any, ...]]:
        return select(options["table"], ["id", "name", "_run_id", "_chunk_seq"])

    def test_upsert_inserts_then_updates(
        self, sink: Sink, upsert_options: dict[str, Any], select: Select
    ) -> None:
        sink.prepare(upsert_options, keyed([(1, "a")]).schema)
        first = sink.write(
            upsert_options,
            keyed([(1, "a"), (2, "b")]),
            run_id=1,
            chunk_seq=0,
            fence=_yes,
        )

        second = sink.write(
            upsert_options,
            keyed([(2, "B"), (3, "c")]),
            run_id=2,
            chunk_seq=0,
            fence=_yes,
        )

        assert (first.rows_written, first.details["inserted"]) == (2, 2)
        assert (second.rows_written, second.details["updated"]) == (2, 1)
        assert self._stored(select, upsert_options) == [
            (1, "a", 1, 0),
            (2, "B", 2, 0),
            (3, "c", 2, 0),
        ]

    def test_the_last_duplicate_of_a_key_in_a_chunk_wins(
        self, sink: Sink, upsert_options: dict[str, Any], select: Select
    ) -> None:
        batch = keyed([(5, "first"), (4, "x"), (5, "second"), (5, "last")])
        sink.prepare(upsert_options, batch.schema)

        result = sink.write(upsert_options, batch, run_id=3, chunk_seq=1, fence=_yes)

        assert result.rows_written == 2
        assert self._stored(select, upsert_options) == [
            (4, "x", 3, 1),
            (5, "last", 3, 1),
        ]
        assert select(upsert_options["table"], ["id", SOURCE_REF_COLUMN]) == [
            (4, "k#2"),
            (5, "k#4"),
        ]

    def test_writing_a_chunk_twice_gives_the_same_rows(
        self, sink: Sink, upsert_options: dict[str, Any], select: Select
    ) -> None:
        batch = keyed([(1, "a"), (2, "b")])
        sink.prepare(upsert_options, batch.schema)
        sink.write(upsert_options, batch, run_id=4, chunk_seq=0, fence=_yes)
        before = self._stored(select, upsert_options)

        again = sink.write(upsert_options, batch, run_id=4, chunk_seq=0, fence=_yes)

        assert again.rows_written == 2
        assert self._stored(select, upsert_options) == before

    def test_rows_from_before_the_run_stay(
        self, sink: Sink, upsert_options: dict[str, Any], select: Select
    ) -> None:
        sink.prepare(upsert_options, keyed([]).schema)
        sink.write(
            upsert_options,
            keyed([(1, "old"), (2, "old")]),
            run_id=5,
            chunk_seq=0,
            fence=_yes,
        )

        sink.write(upsert_options, keyed([]), run_id=6, chunk_seq=0, fence=_yes)
        sink.write(
            upsert_options, keyed([(2, "new")]), run_id=6, chunk_seq=1, fence=_yes
        )

        assert self._stored(select, upsert_options) == [
            (1, "old", 5, 0),
            (2, "new", 6, 1),
        ]

    def test_a_fenced_upsert_commits_nothing(
        self, sink: Sink, upsert_options: dict[str, Any], select: Select
    ) -> None:
        sink.prepare(upsert_options, keyed([]).schema)
        sink.write(upsert_options, keyed([(1, "a")]), run_id=7, chunk_seq=0, fence=_yes)

        with pytest.raises(FencedError):
            sink.write(
                upsert_options,
                keyed([(1, "z"), (9, "z")]),
                run_id=8,
                chunk_seq=0,
                fence=_no,
            )

        assert self._stored(select, upsert_options) == [(1, "a", 7, 0)]

    def test_a_null_key_is_refused(
        self, sink: Sink, upsert_options: dict[str, Any], select: Select
    ) -> None:
        batch = pa.table(
            {
                "id": pa.array([1, None], pa.int64()),
                "name": ["a", "b"],
                SOURCE_REF_COLUMN: ["k#1", "k#2"],
            }
        )
        sink.prepare(upsert_options, batch.schema)

        with pytest.raises(TerminalError, match="key column 'id' is NULL in 1 row"):
            sink.write(upsert_options, batch, run_id=9, chunk_seq=0, fence=_yes)

        assert self._stored(select, upsert_options) == []

    def test_a_key_missing_from_the_data_is_a_config_error(
        self, sink: Sink, base_options: dict[str, Any]
    ) -> None:
        options = {**base_options, "write_mode": "upsert", "key": ["nope"]}

        with pytest.raises(ConfigError, match="key column\\(s\\) nope"):
            sink.prepare(options, keyed([]).schema)

    def test_concurrent_upserts_of_one_chunk_keep_its_rows_once(
        self,
        sink: Sink,
        upsert_options: dict[str, Any],
        select: Select,
        wait_until_blocked: Callable[[], None],
    ) -> None:
        batch = keyed([(1, "a"), (2, "b"), (3, "c")])
        sink.prepare(upsert_options, batch.schema)
        results = _race(
            lambda fence: sink.write(
                upsert_options, batch, run_id=11, chunk_seq=0, fence=fence
            ),
            wait_until_blocked,
        )

        assert results["first"].details["inserted"] == 3
        assert results["second"].details["updated"] == 3
        assert self._stored(select, upsert_options) == [
            (1, "a", 11, 0),
            (2, "b", 11, 0),
            (3, "c", 11, 0),
        ]


class ReplaceSinkContract:
    """What every sink with the `replace` write mode does.

    Fixtures a subclass provides: `sink`, `base_options`, `select`, `columns_of`
    (see `UpsertSinkContract`, `Select`, `ColumnsOf`).
    """

    @pytest.fixture
    def replace_options(self, base_options: dict[str, Any]) -> dict[str, Any]:
        return {**base_options, "write_mode": "replace"}

    def _run(
        self, sink: Sink, options: dict[str, Any], run_id: int, rows: list[Any]
    ) -> None:
        sink.prepare(options, keyed([]).schema, run_id=run_id)  # type: ignore[call-arg]
        for seq, part in enumerate(rows):
            sink.write(options, keyed(part), run_id=run_id, chunk_seq=seq, fence=_yes)

    def test_finalize_swaps_the_staged_rows_in(
        self,
        sink: Sink,
        replace_options: dict[str, Any],
        select: Select,
        columns_of: ColumnsOf,
    ) -> None:
        table = replace_options["table"]
        self._run(sink, replace_options, 1, [[(1, "a"), (2, "b")]])
        sink.finalize(replace_options, run_id=1)
        self._run(sink, replace_options, 2, [[(3, "c")], [(4, "d")]])

        before = select(table, ["id", "_run_id"])
        sink.finalize(replace_options, run_id=2)

        assert before == [(1, 1), (2, 1)]
        assert select(table, ["id", "_run_id", "_chunk_seq"]) == [
            (3, 2, 0),
            (4, 2, 1),
        ]
        assert columns_of(f"{table}__dis_run_2") is None

    def test_finalize_twice_is_harmless(
        self, sink: Sink, replace_options: dict[str, Any], select: Select
    ) -> None:
        self._run(sink, replace_options, 3, [[(1, "a")]])
        sink.finalize(replace_options, run_id=3)

        sink.finalize(replace_options, run_id=3)

        assert select(replace_options["table"], ["id", "_run_id"]) == [(1, 3)]

    def test_a_staged_chunk_written_twice_is_kept_once(
        self, sink: Sink, replace_options: dict[str, Any], select: Select
    ) -> None:
        self._run(sink, replace_options, 4, [[(1, "a"), (2, "b")]])
        sink.write(
            replace_options,
            keyed([(1, "a"), (2, "b")]),
            run_id=4,
            chunk_seq=0,
            fence=_yes,
        )

        sink.finalize(replace_options, run_id=4)

        assert select(replace_options["table"], ["id"]) == [(1,), (2,)]

    def test_replace_needs_the_run_id(
        self, sink: Sink, replace_options: dict[str, Any]
    ) -> None:
        with pytest.raises(ConfigError, match="run id"):
            sink.prepare(replace_options, keyed([]).schema)


class EvolveSinkContract:
    """What every sink does when an existing table lacks columns (schema drift).

    Fixtures a subclass provides: `sink`, `base_options`, `select`, `columns_of`.
    """

    def test_missing_columns_fail_by_default(
        self, sink: Sink, base_options: dict[str, Any]
    ) -> None:
        sink.prepare(base_options, pa.schema([("id", pa.int64())]))
        wider = pa.schema([("id", pa.int64()), ("b", pa.string()), ("c", pa.int64())])

        with pytest.raises(TerminalError, match="lacks column\\(s\\) b, c: "):
            sink.prepare(base_options, wider)

    def test_missing_columns_are_added_when_allowed(
        self,
        sink: Sink,
        base_options: dict[str, Any],
        select: Select,
        columns_of: ColumnsOf,
    ) -> None:
        options = {**base_options, "evolve": "add_columns"}
        sink.prepare(options, pa.schema([("id", pa.int64())]))
        sink.write(
            options,
            keyed([(1, "a")]).select(["id", SOURCE_REF_COLUMN]),
            run_id=1,
            chunk_seq=0,
            fence=_yes,
        )

        sink.prepare(options, keyed([]).schema)
        sink.write(options, keyed([(2, "b")]), run_id=1, chunk_seq=1, fence=_yes)

        assert columns_of(options["table"]) == {"id", "name", *SYSTEM_COLUMNS}
        assert select(options["table"], ["id", "name"]) == [(1, None), (2, "b")]


def _race(
    write: Callable[[Callable[[], bool]], Any],
    wait_until_blocked: Callable[[], None],
) -> dict[str, Any]:
    """Run two attempts of one write; the second starts while the first holds it."""
    first_inside = threading.Event()
    results: dict[str, Any] = {}

    def first_fence() -> bool:
        first_inside.set()
        wait_until_blocked()
        return True

    def attempt(name: str, fence: Callable[[], bool]) -> None:
        try:
            results[name] = write(fence)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion
            results[name] = exc

    first = threading.Thread(target=attempt, args=("first", first_fence))
    second = threading.Thread(target=attempt, args=("second", _yes))
    first.start()
    assert first_inside.wait(10)
    second.start()
    first.join(30)
    second.join(30)
    return results
