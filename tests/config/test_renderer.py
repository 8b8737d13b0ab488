"""The API's JSON renderer: DRF's output, serialised by orjson."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid
from zoneinfo import ZoneInfo

import pytest
from django.utils.translation import gettext_lazy
from hypothesis import given, settings
from hypothesis import strategies as st
from rest_framework.renderers import JSONRenderer as DRFRenderer
from rest_framework.settings import api_settings

from config.renderers import JSONRenderer

OURS, DRF = JSONRenderer(), DRFRenderer()

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.text()
    | st.datetimes(timezones=st.sampled_from([None, dt.UTC, ZoneInfo("Asia/Kolkata")]))
    | st.dates()
    | st.times()
    | st.uuids()
    | st.decimals(allow_nan=False, allow_infinity=False, places=3)
)
documents = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text() | st.integers(), inner, max_size=4)
    ),
    max_leaves=20,
)


def test_the_api_renders_with_it():
    assert api_settings.DEFAULT_RENDERER_CLASSES[0] is JSONRenderer


@settings(max_examples=300, deadline=None)
@given(documents)
def test_the_same_bytes_as_drf(data):
    assert OURS.render(data, "application/json", {}) == DRF.render(
        data, "application/json", {}
    )


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.floats(allow_nan=False, allow_infinity=False), st.lists))
def test_floats_are_the_same_numbers(data):
    assert json.loads(OURS.render(data)) == json.loads(DRF.render(data))


@pytest.mark.parametrize(
    "data",
    [
        {"at": dt.datetime(2026, 11, 26, 16, 0, 0, 123456, tzinfo=dt.UTC)},
        {"line": "a\u2028b\u2029c", "é": "ü"},
        {1: "int key", None: "none key", False: "bool key"},
        {"big": 2**70},
        {"lazy": gettext_lazy("Invalid token.")},
        {"amount": decimal.Decimal("1.50"), "id": uuid.UUID(int=7)},
        None,
    ],
    ids=[
        "utc-as-z",
        "line-separators",
        "keys",
        "beyond-64-bits",
        "lazy",
        "types",
        "none",
    ],
)
def test_examples_render_as_drf(data):
    assert OURS.render(data, "application/json") == DRF.render(data, "application/json")


def test_indent_asked_for_is_drf_pretty_printing():
    data = {"a": [1, 2]}
    for media_type, context in [
        ("application/json; indent=2", {}),
        (None, {"indent": 4}),
    ]:
        rendered = OURS.render(data, media_type, context)
        assert rendered == DRF.render(data, media_type, context)
        assert b"\n" in rendered


def test_what_neither_can_serialise_is_drfs_error():
    with pytest.raises(TypeError):
        OURS.render({"x": object()})
