"""The shared connector contract: test classes every source and sink passes.

A connector's test module subclasses `SourceContract` or `SinkContract` (as a
`Test...` class) and provides the fixtures listed on each class. The contract classes
themselves are not collected (their names do not start with `Test`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pytest

from connectors.base import SOURCE_REF_COLUMN, Chunk, Sink, Source
from connectors.exceptions import FencedError


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
