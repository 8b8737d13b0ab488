"""Vectorised element-boundary scanning of a JSON array file (numpy, bounded memory).

A file holding one JSON array (`[{...}, {...}]`) is cut into its elements without
parsing them: a quote not escaped by an odd run of backslashes toggles "inside a
string"; outside strings `[`/`{` open and `]`/`}` close a level; an element ends at a
comma, or at the closing `]`, one level down from the top. All of it is state carried
from block to block (string parity, depth, the backslash run at the block's end), so
memory is bounded by the block size and a huge array is planned like a CSV file:
byte ranges of whole elements.

The elements are not validated here: a broken element comes out as a byte range that
fails to parse on read (that record's error). Only the outer shape is checked: the
file must hold one array.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

Offsets = npt.NDArray[np.int64]

_QUOTE = ord('"')
_BACKSLASH = ord("\\")
_COMMA = ord(",")
#: Byte classes: blank (JSON whitespace), other, and the structural ones.
_BLANK, _OTHER, _OPENING, _CLOSING, _SEPARATOR = 0, 1, 2, 3, 4
_KIND = np.full(256, _OTHER, dtype=np.uint8)
_KIND[[0x20, 0x09, 0x0A, 0x0D]] = _BLANK
_KIND[[ord("["), ord("{")]] = _OPENING
_KIND[[ord("]"), ord("}")]] = _CLOSING
_KIND[_COMMA] = _SEPARATOR
_BOM = b"\xef\xbb\xbf"
_EMPTY: Offsets = np.empty(0, dtype=np.int64)


_NOT_AN_ARRAY = "the file must hold one JSON array (use jsonl for one value per line)"


class JsonShapeError(ValueError):
    """The file does not hold exactly one JSON array."""


class ArrayScanner:
    """Finds the byte ranges of the elements of a JSON array, block by block.

    Feed consecutive blocks with `feed()`, then call `finish()` once. Ranges are
    absolute offsets; an element's range may include the whitespace around it.

    Args:
        inside: start already inside the array (at the first element), as `read()`
            does with a chunk's byte range; the range's end then closes the last
            element.
    """

    def __init__(self, *, inside: bool = False) -> None:
        self.position = 0
        self._inside = inside
        self._depth = 1 if inside else 0
        self._in_string = False
        self._backslashes = 0  # backslashes at the end of the previous block
        self._opened = inside  # the top-level `[` was seen
        self._closed = False
        self._start = 0  # where the element in progress starts
        self._content = False  # a non-blank byte seen in the element in progress
        self._elements = 0
        self._bom_possible = True  # the bytes so far are a prefix of a UTF-8 BOM

    def feed(self, block: bytes) -> tuple[Offsets, Offsets]:
        """Scan the next block.

        Returns:
            `(starts, stops)` of the elements that end in `block`.

        Raises:
            JsonShapeError: the file is not one JSON array.
        """
        if not block:
            return _EMPTY, _EMPTY
        base = self.position
        skip = 0
        while (
            not self._inside
            and self._bom_possible
            and skip < len(block)
            and base + skip < len(_BOM)
        ):
            if block[skip] != _BOM[base + skip]:
                self._bom_possible = False
                break
            skip += 1
        self.position += len(block)
        arr = np.frombuffer(block, dtype=np.uint8)
        kinds = _KIND[arr]  # one pass: the class of every byte

        def has_content(lo: int, hi: int | None = None) -> bool:
            return bool(np.any(kinds[max(lo, skip) : hi] != _BLANK))

        if self._closed:
            if has_content(0):
                raise JsonShapeError("unexpected content after the JSON array")
            return _EMPTY, _EMPTY
        real = self._real_quotes(arr, skip)
        structural = np.flatnonzero(kinds >= _OPENING)
        structural = structural[structural >= skip]
        quote_count = np.searchsorted(real, structural)
        string_parity = (quote_count + (1 if self._in_string else 0)) & 1
        structural = structural[string_parity == 0]
        self._in_string = bool((real.size + (1 if self._in_string else 0)) & 1)
        chars = arr[structural]
        classes = kinds[structural]
        delta = np.where(
            classes == _OPENING, 1, np.where(classes == _CLOSING, -1, 0)
        ).astype(np.int64)
        after = np.cumsum(delta) + self._depth
        depth_before = after - delta
        if after.size:
            self._depth = int(after[-1])
        if np.any(after < 0):
            # Below the top level: a bracket closed after the array ended.
            raise JsonShapeError("unexpected content after the JSON array")
        # Top level: the opening `[` (once) and nothing else outside the array.
        top = np.flatnonzero(depth_before == 0)
        for k in top.tolist():
            position = int(structural[k])
            if self._opened or chars[k] != ord("["):
                raise JsonShapeError(_NOT_AN_ARRAY)
            if has_content(0, position):
                raise JsonShapeError(_NOT_AN_ARRAY)
            self._opened = True
            self._start = base + position + 1
            self._content = False
        if not self._opened:
            if has_content(0):
                raise JsonShapeError(_NOT_AN_ARRAY)
            return _EMPTY, _EMPTY
        ends_mask = (depth_before == 1) & ((chars == _COMMA) | (chars == ord("]")))
        ends = structural[ends_mask].astype(np.int64)
        closes = chars[ends_mask] == ord("]")
        previous = self._start - base  # may be negative: started in an earlier block
        close_at = np.flatnonzero(closes)
        if close_at.size:
            ends = ends[: int(close_at[0]) + 1]
            if has_content(int(ends[-1]) + 1):
                raise JsonShapeError("unexpected content after the JSON array")
            self._closed = True
            self._depth = 0
        starts = np.empty(ends.size, dtype=np.int64)
        if ends.size:
            starts[0] = previous
            starts[1:] = ends[:-1] + 1
        stops = ends
        # The closing bracket ending the first "element": `[]` unless it has content.
        if (
            self._elements == 0
            and ends.size == 1
            and self._closed
            and not (self._content or has_content(previous, int(ends[0])))
        ):
            starts, stops = _EMPTY, _EMPTY
        self._elements += int(starts.size)
        if ends.size:
            previous = int(ends[-1]) + 1
            self._content = False
        self._start = base + previous
        # Whether the pending element has content: tells `[ ]` from `[x]` (until a
        # first element) and ends a chunk range's last element (`inside`).
        pending = not self._closed and (self._inside or self._elements == 0)
        if pending and not self._content:
            self._content = has_content(previous)
        return starts + base, stops + base

    def _real_quotes(self, arr: npt.NDArray[np.uint8], skip: int) -> Offsets:
        """Positions of the quotes that open or close a string.

        A quote after an odd run of backslashes is escaped. Backslashes are only
        valid inside strings, so the run alone decides (a broken file fails later,
        when its elements are parsed).
        """
        n = arr.size
        quotes = np.flatnonzero(arr == _QUOTE).astype(np.int64)
        quotes = quotes[quotes >= skip]
        slashes = np.flatnonzero(arr == _BACKSLASH).astype(np.int64)
        carried = self._backslashes
        if not slashes.size:
            self._backslashes = 0
            if carried & 1 and quotes.size and quotes[0] == 0:
                return quotes[1:]
            return quotes
        # Runs of consecutive backslashes: where each ends (inclusive), how long.
        breaks = np.flatnonzero(np.diff(slashes) != 1)
        run_ends = np.append(slashes[breaks], slashes[-1])
        run_starts = np.insert(slashes[breaks + 1], 0, slashes[0])
        lengths = run_ends - run_starts + 1
        lengths[run_starts == 0] += carried  # a run that goes on from the last block
        # The run right before each quote, if any.
        k = np.searchsorted(run_ends, quotes - 1)
        found = k < run_ends.size
        found[found] = run_ends[k[found]] == quotes[found] - 1
        run = np.zeros(quotes.size, dtype=np.int64)
        run[found] = lengths[k[found]]
        run[quotes == 0] = carried
        self._backslashes = int(lengths[-1]) if run_ends[-1] == n - 1 else 0
        return quotes[(run & 1) == 0]

    def finish(self) -> tuple[Offsets, Offsets]:
        """The last element of a range scanned with `inside=True`; checks the shape.

        Returns:
            `(starts, stops)` with zero or one element.

        Raises:
            JsonShapeError: the array was never closed (a truncated file).
        """
        if self._inside:
            if self._closed or not self._content:
                return _EMPTY, _EMPTY
            self._closed = True
            return (
                np.array([self._start], dtype=np.int64),
                np.array([self.position], dtype=np.int64),
            )
        if self._opened and not self._closed:
            raise JsonShapeError("the JSON array is not closed (a truncated file?)")
        return _EMPTY, _EMPTY


def iter_elements(
    stream: BinaryIO, *, block_size: int
) -> Iterator[tuple[Offsets, Offsets]]:
    """Scan a JSON array file from its start.

    Args:
        stream: a binary stream positioned at the file's first byte.
        block_size: bytes read per step.

    Yields:
        `(starts, stops)` of the elements found, block by block.

    Raises:
        JsonShapeError: the file does not hold one JSON array.
    """
    scanner = ArrayScanner()
    while block := stream.read(block_size):
        yield scanner.feed(block)
    yield scanner.finish()


def split_elements(data: bytes) -> tuple[Offsets, Offsets]:
    """The elements of a chunk's byte range (elements and the commas between them).

    Returns:
        `(starts, stops)` relative to `data`.
    """
    scanner = ArrayScanner(inside=True)
    starts, stops = scanner.feed(data)
    last_starts, last_stops = scanner.finish()
    return np.concatenate([starts, last_starts]), np.concatenate([stops, last_stops])
