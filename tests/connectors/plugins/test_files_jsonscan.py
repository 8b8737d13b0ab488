"""Element-boundary scanning of JSON array files, at every block size."""

from __future__ import annotations

import io
import json
import random
from typing import Any

import pytest

from connectors.plugins.files.jsonscan import (
    JsonShapeError,
    iter_elements,
    split_elements,
)


def elements(data: bytes, block_size: int) -> list[Any]:
    found = []
    for starts, stops in iter_elements(io.BytesIO(data), block_size=block_size):
        found += [
            json.loads(data[a:b])
            for a, b in zip(starts.tolist(), stops.tolist(), strict=True)
        ]
    return found


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randint(0, 5 if depth < 3 else 2)
    if kind == 0:
        return rng.randint(-5, 5)
    if kind == 1:
        alphabet = ["a", '"', "\\", ",", "[", "]", "{", "}", " ", "\n", "é"]
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
    if kind == 2:
        return rng.choice([None, True, False, 1.5])
    if kind == 3:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {
        rng.choice(["a", "b\\", 'c"', "[d"]): random_value(rng, depth + 1)
        for _ in range(rng.randint(0, 3))
    }


def test_random_arrays_split_into_their_elements_at_every_block_size() -> None:
    rng = random.Random(20241125)
    for _ in range(60):
        values = [random_value(rng) for _ in range(rng.randint(0, 5))]
        text = json.dumps(values, indent=rng.choice([None, 2])).encode()
        if rng.random() < 0.3:
            text = b"\xef\xbb\xbf" + text

        for block_size in range(1, len(text) + 2, max(1, len(text) // 40)):
            assert elements(text, block_size) == values, (text, block_size)


def test_a_chunk_range_splits_into_the_same_elements() -> None:
    text = b'[ {"a": "x,y"} ,\n [1, [2]], "s\\"]" , 4 ]'
    spans = [
        (a, b)
        for starts, stops in iter_elements(io.BytesIO(text), block_size=5)
        for a, b in zip(starts.tolist(), stops.tolist(), strict=True)
    ]
    data = text[spans[1][0] : spans[3][1]]

    starts, stops = split_elements(data)

    assert [json.loads(data[a:b]) for a, b in zip(starts, stops, strict=True)] == [
        [1, [2]],
        's"]',
        4,
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(b'{"a": 1}', "one JSON array", id="object"),
        pytest.param(b"1", "one JSON array", id="scalar"),
        pytest.param(b"x[1]", "one JSON array", id="leading"),
        pytest.param(b"[1] x", "after the JSON array", id="trailing"),
        pytest.param(b"[1]]", "after the JSON array", id="unbalanced"),
        pytest.param(b'[1, "2]', "not closed", id="unclosed-string"),
    ],
)
@pytest.mark.parametrize("block_size", [1, 3, 100], ids=lambda n: f"block{n}")
def test_shapes_that_are_not_one_array_are_refused(
    data: bytes, message: str, block_size: int
) -> None:
    with pytest.raises(JsonShapeError, match=message):
        elements(data, block_size)


@pytest.mark.parametrize("data", [b"", b"  \n", b"[]", b"[ \n ]"])
def test_empty_inputs_have_no_elements(data: bytes) -> None:
    assert elements(data, 1) == []
