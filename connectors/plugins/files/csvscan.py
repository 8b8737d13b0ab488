"""Vectorised record-boundary scanning of CSV bytes (numpy; no per-byte Python loop).

A record ends at a newline byte preceded by an even number of quote characters since
the start of the file. A doubled quote (`""`) adds two quotes and leaves the parity
alone, and a newline inside a quoted field sees an odd count, so both are handled by
one cumulative count carried from block to block. `\\r\\n` endings end at the `\\n`.

Assumes RFC 4180 quoting: a quote character only opens a field or appears doubled
inside a quoted field. A stray quote inside an unquoted field (`ab"c`) upsets the
parity; `FilesSource.read` detects the resulting row-count mismatch and fails loudly
rather than mislabelling rows. Lines ended by a lone `\\r` (classic Mac) are not
split. Blank lines (`\\n` or `\\r\\n` alone) are skipped, as pyarrow's reader does.

With `quote=None` (CSV without quoting, JSON Lines) every newline ends a record.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

QUOTE = ord('"')
NEWLINE = ord("\n")
CR = ord("\r")

Offsets = npt.NDArray[np.int64]

_EMPTY: Offsets = np.empty(0, dtype=np.int64)


class RowScanner:
    """Finds the byte ranges of the non-blank records of a CSV stream, block by block.

    Feed consecutive blocks with `feed()`, then call `finish()` once. Each call returns
    `(starts, stops)`: absolute byte offsets of the records completed so far (stop is
    exclusive and includes the line ending). Memory is bounded by the block size.
    """

    def __init__(self, *, quote: int | None = QUOTE) -> None:
        self.quote = quote
        self.position = 0  # absolute offset of the next block
        self._quotes = 0  # quote characters seen so far (only the parity matters)
        self._next_start = 0  # absolute offset where the next record starts
        self._last_byte = -1  # last byte of the previous block

    def feed(self, block: bytes) -> tuple[Offsets, Offsets]:
        """Scan the next block.

        Args:
            block: the bytes that follow the previous block.

        Returns:
            `(starts, stops)` of the non-blank records whose line ending is in `block`.
        """
        if not block:
            return _EMPTY, _EMPTY
        arr = np.frombuffer(block, dtype=np.uint8)
        newlines = np.flatnonzero(arr == NEWLINE)
        if self.quote is None:
            ends = newlines
        else:
            quotes = np.flatnonzero(arr == self.quote)
            quotes_before = np.searchsorted(quotes, newlines) + self._quotes
            ends = newlines[(quotes_before & 1) == 0]
            self._quotes += int(quotes.size)
        base = self.position
        self.position += len(block)
        previous_last_byte = self._last_byte
        self._last_byte = int(arr[-1])
        if not ends.size:
            return _EMPTY, _EMPTY
        stops = ends.astype(np.int64) + (base + 1)
        starts = np.empty_like(stops)
        starts[0] = self._next_start
        starts[1:] = stops[:-1]
        self._next_start = int(stops[-1])
        before_newline = np.where(
            ends > 0, arr[np.maximum(ends - 1, 0)], previous_last_byte
        )
        lengths = stops - starts
        blank = (lengths == 1) | ((lengths == 2) & (before_newline == CR))
        keep = ~blank
        return starts[keep], stops[keep]

    def finish(self) -> tuple[Offsets, Offsets]:
        """The last record when the stream does not end with a newline.

        Returns:
            `(starts, stops)` with zero or one record.
        """
        length = self.position - self._next_start
        if length == 0 or (length == 1 and self._last_byte == CR):
            return _EMPTY, _EMPTY
        start = self._next_start
        self._next_start = self.position
        return (
            np.array([start], dtype=np.int64),
            np.array([self.position], dtype=np.int64),
        )


def iter_records(
    stream: BinaryIO, *, block_size: int, quote: int | None = QUOTE
) -> Iterator[tuple[Offsets, Offsets]]:
    """Scan `stream` from its current position (taken as offset 0) to its end.

    Args:
        stream: a binary file object positioned at the start of the CSV data.
        block_size: bytes read per step; memory stays proportional to it.
        quote: the quote byte, or None when nothing is quoted (every newline ends a
            record).

    Yields:
        `(starts, stops)` per block, possibly empty, then the unterminated last record.
    """
    scanner = RowScanner(quote=quote)
    while block := stream.read(block_size):
        yield scanner.feed(block)
    yield scanner.finish()


def fields_per_record(
    data: bytes, stops: Offsets, *, delimiter: int, quote: int | None = QUOTE
) -> npt.NDArray[np.int64]:
    """Count the fields of each record in `data` (delimiters outside quotes + 1).

    Args:
        data: CSV bytes that start at a record boundary (offsets are relative to it).
        stops: record stop offsets (exclusive) within `data`, ascending.
        delimiter: the delimiter byte.
        quote: the quote byte, or None when nothing is quoted.

    Returns:
        One count per record, aligned with `stops`.
    """
    arr = np.frombuffer(data, dtype=np.uint8)
    delimiters = np.flatnonzero(arr == delimiter)
    if quote is not None:
        quotes = np.flatnonzero(arr == quote)
        outside = (np.searchsorted(quotes, delimiters) & 1) == 0
        delimiters = delimiters[outside]
    # A delimiter at p belongs to the record whose [start, stop) holds p; blank lines
    # between records hold no delimiter, so the stops alone place it.
    record = np.searchsorted(stops, delimiters, side="right")
    return np.bincount(record, minlength=len(stops)).astype(np.int64) + 1
