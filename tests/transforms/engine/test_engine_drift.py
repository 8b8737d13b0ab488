"""Schema drift detection: new columns, type changes, schema definitions."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest

from transforms.engine import drift


def batch(**columns) -> pa.Table:
    n = len(next(iter(columns.values())))
    refs = [f"f.csv#{i + 1}" for i in range(n)]
    return pa.table({**columns, "_source_ref": refs})


def test_infer_schema_names_field_types_and_skips_system_columns():
    table = pa.table(
        {
            "id": pa.array([1], pa.int32()),
            "name": ["a"],
            "price": pa.array([1.5], pa.float64()),
            "amount": pa.array([None], pa.decimal128(10, 2)),
            "ok": [True],
            "day": [dt.date(2024, 1, 1)],
            "tags": [["x"]],
            "_source_ref": ["f#1"],
            "_read_error": pa.array([None], pa.string()),
        }
    )
    assert drift.infer_schema(table) == [
        {"name": "id", "type": "integer"},
        {"name": "name", "type": "string"},
        {"name": "price", "type": "float"},
        {"name": "amount", "type": "decimal(10,2)"},
        {"name": "ok", "type": "boolean"},
        {"name": "day", "type": "date"},
        {"name": "tags", "type": "varchar[]"},
    ]


def test_a_batch_that_fits_has_no_drift():
    table = batch(id=["1", "2"], name=["a", None])
    schema = [{"name": "id", "type": "integer"}, {"name": "name", "type": "string"}]
    found = drift.detect(table, schema)
    assert not found
    assert found.new_columns == []
    assert found.type_changes == []


def test_new_columns_are_found_in_batch_order_with_their_type():
    table = batch(email=["a@x"], id=pa.array([1], pa.int64()), score=pa.array([2.5]))
    found = drift.detect(table, [{"name": "id", "type": "integer"}])
    assert found.new_columns == [
        {"name": "email", "type": "string"},
        {"name": "score", "type": "float"},
    ]
    assert found.new_names == ["email", "score"]
    assert found.type_changes == []


@pytest.mark.parametrize(
    ("known", "values", "misfits"),
    [
        ("integer", ["1", "n/a", "", None, "517.5"], [False, True, False, False, True]),
        ("float", ["1.5", "1e3", "abc"], [False, False, True]),
        ("boolean", ["true", "no", "maybe"], [False, False, True]),
        ("date", ["2024-01-31", "2013-02-30", "31/01/2024"], [False, True, True]),
        ("decimal(5,1)", ["1.2", "1.25"], [False, True]),
    ],
    ids=["integer", "float", "boolean", "date", "decimal"],
)
def test_string_values_that_do_not_fit_the_known_type_are_a_type_change(
    known, values, misfits
):
    found = drift.detect(batch(v=values), [{"name": "v", "type": known}])
    (change,) = found.type_changes
    assert (change.name, change.old_type, change.new_type) == ("v", known, "string")
    assert change.misfits.to_pylist() == misfits


def test_a_typed_column_that_changed_type():
    table = batch(v=pa.array([1.0, 2.5], pa.float64()))
    (change,) = drift.detect(table, [{"name": "v", "type": "integer"}]).type_changes
    assert (change.old_type, change.new_type) == ("integer", "float")
    assert change.misfits.to_pylist() == [False, True]


def test_a_narrower_type_whose_values_all_fit_is_not_drift():
    table = batch(v=pa.array([1, 2], pa.int16()), s=["3", "4"])
    schema = [{"name": "v", "type": "integer"}, {"name": "s", "type": "integer"}]
    assert not drift.detect(table, schema)


def test_nested_known_type_changed_misfits_every_present_value():
    table = batch(v=["x", None])
    (change,) = drift.detect(table, [{"name": "v", "type": "varchar[]"}]).type_changes
    assert change.misfits.to_pylist() == [True, False]


def test_carries_values_ignores_nulls_and_blank_strings():
    table = batch(a=["x", None, "  ", None], b=[None, None, None, "1"])
    assert drift.carries_values(table, ["a"]).to_pylist() == [
        True,
        False,
        False,
        False,
    ]
    assert drift.carries_values(table, ["a", "b"]).to_pylist() == [
        True,
        False,
        False,
        True,
    ]


def test_widen_applies_new_columns_and_type_changes():
    table = batch(id=["1", "x"], email=["a", "b"])
    schema = [{"name": "id", "type": "integer"}]
    found = drift.detect(table, schema)
    assert drift.widen(schema, found) == [
        {"name": "id", "type": "string"},
        {"name": "email", "type": "string"},
    ]


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"id": "integer"}, "must be a list"),
        ([{"name": "id"}], "entry 0: needs exactly name and type"),
        ([{"name": "", "type": "string"}], "bad column name"),
        ([{"name": "_source_ref", "type": "string"}], "bad column name"),
        ([{"name": "a", "type": 3}], "bad type"),
        (
            [{"name": "a", "type": "string"}, {"name": "a", "type": "integer"}],
            "entry 1: column 'a' named twice",
        ),
    ],
    ids=["not-list", "no-type", "empty-name", "system", "type-not-str", "twice"],
)
def test_check_schema_refuses_bad_definitions(schema, message):
    with pytest.raises(drift.SchemaDefinitionError, match=message):
        drift.check_schema(schema)


def test_check_schema_normalises_type_case():
    assert drift.check_schema([{"name": "a", "type": "INTEGER"}]) == [
        {"name": "a", "type": "integer"}
    ]
