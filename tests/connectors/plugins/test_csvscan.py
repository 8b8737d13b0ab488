"""Record-boundary scanning of CSV bytes, at every block size."""

from __future__ import annotations

import io

import numpy as np
import pytest

from connectors.plugins.files.csvscan import fields_per_record, iter_records


def records(data: bytes, block_size: int) -> list[bytes]:
    found = []
    for starts, stops in iter_records(io.BytesIO(data), block_size=block_size):
        found += [
            data[a:b] for a, b in zip(starts.tolist(), stops.tolist(), strict=True)
        ]
    return found


CASES = [
    pytest.param(b"a,b\n1,2\n", [b"a,b\n", b"1,2\n"], id="plain"),
    pytest.param(b"a,b\n1,2", [b"a,b\n", b"1,2"], id="no-trailing-newline"),
    pytest.param(b"a,b\r\n1,2\r\n", [b"a,b\r\n", b"1,2\r\n"], id="crlf"),
    pytest.param(
        b'a,b\n"x\ny",2\n3,4\n',
        [b"a,b\n", b'"x\ny",2\n', b"3,4\n"],
        id="quoted-newline",
    ),
    pytest.param(
        b'a\n"he said ""hi\n"""\n',
        [b"a\n", b'"he said ""hi\n"""\n'],
        id="doubled-quotes",
    ),
    pytest.param(b"a\n\n1\r\n\r\n2\n\n", [b"a\n", b"1\r\n", b"2\n"], id="blank-lines"),
    pytest.param(b"a\n\r", [b"a\n"], id="lone-cr-at-end"),
    pytest.param(b"", [], id="empty"),
    pytest.param(b"\n\n", [], id="only-blank-lines"),
    pytest.param(
        b'a\n"unclosed\n1\n', [b"a\n", b'"unclosed\n1\n'], id="unclosed-quote"
    ),
]


@pytest.mark.parametrize(("data", "expected"), CASES)
def test_records_are_the_same_at_every_block_size(
    data: bytes, expected: list[bytes]
) -> None:
    for block_size in range(1, len(data) + 2):
        assert records(data, block_size) == expected, block_size


def test_a_block_edge_between_cr_and_lf_is_not_a_blank_line() -> None:
    data = b"a\r\n\r\n1\r\n"

    assert records(data, 4) == [b"a\r\n", b"1\r\n"]
    assert records(data, 3) == [b"a\r\n", b"1\r\n"]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(b"1,2,3\n", [3], id="plain"),
        pytest.param(b'"a,b",2\n', [2], id="delimiter-in-quotes"),
        pytest.param(b'1\n"x,\n,y",2,3,4\n\n5,6\n', [1, 4, 2], id="blank-and-newlines"),
        pytest.param(b"1,2\r\n3", [2, 1], id="no-trailing-newline"),
    ],
)
def test_fields_per_record(data: bytes, expected: list[int]) -> None:
    stops = [stop for _, stop in _ranges(data)]

    counts = fields_per_record(data, np.array(stops, dtype=np.int64), delimiter=44)

    assert counts.tolist() == expected


def _ranges(data: bytes) -> list[tuple[int, int]]:
    found = []
    for starts, stops in iter_records(io.BytesIO(data), block_size=len(data) or 1):
        found += list(zip(starts.tolist(), stops.tolist(), strict=True))
    return found
