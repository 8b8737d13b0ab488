"""Avro parsing, Arrow and JSON Schema derivation, compatibility and inference."""

from __future__ import annotations

import io
from typing import Any

import fastavro
import jsonschema
import pyarrow as pa
import pytest

from transforms.schemas import (
    InferenceError,
    SchemaDefinitionError,
    avro_to_arrow,
    avro_to_json_schema,
    compatibility_problems,
    infer_avro,
    parse_avro,
    reader_problems,
)


def record(*fields: dict[str, Any], name: str = "Order") -> dict[str, Any]:
    return {"type": "record", "name": name, "fields": list(fields)}


def one(avro_type: Any, **extra: Any) -> dict[str, Any]:
    return record({"name": "f", "type": avro_type, **extra})


DECIMAL = {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2}
ADDRESS = {
    "type": "record",
    "name": "Address",
    "fields": [{"name": "city", "type": "string"}],
}

# --- Parsing --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("definition", "message"),
    [
        pytest.param(
            '"int"',
            "must be an Avro record schema (a JSON object)",
            id="not-a-record",
        ),
        pytest.param(
            "{",
            "not valid JSON: unexpected end of data: line 1 column 2 (char 1)",
            id="bad-json",
        ),
        pytest.param(one("integer"), "invalid Avro schema: integer", id="unknown-type"),
        pytest.param(
            one("int", default="x"),
            "invalid Avro schema: Default value <x> must match schema type: int",
            id="bad-default",
        ),
        pytest.param(
            record({"name": "a", "type": "int"}, {"name": "a", "type": "long"}),
            "a: duplicate field name",
            id="duplicate-field",
        ),
        pytest.param(
            record({"name": "next", "type": ["null", "Node"]}, name="Node"),
            "next: recursive type 'Node'",
            id="recursive",
        ),
    ],
)
def test_invalid_definitions_are_refused(definition, message):
    with pytest.raises(SchemaDefinitionError) as caught:
        parse_avro(definition)
    assert str(caught.value) == message


def test_fingerprint_ignores_docs_but_content_hash_does_not():
    plain = parse_avro(one("string"))
    documented = parse_avro(one("string", doc="the f"))
    assert plain.fingerprint == documented.fingerprint
    assert plain.content_hash != documented.content_hash
    assert len(plain.fingerprint) == 64


# --- Arrow ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("avro_type", "arrow_type", "nullable"),
    [
        pytest.param("boolean", pa.bool_(), False, id="boolean"),
        pytest.param("int", pa.int64(), False, id="int"),
        pytest.param("long", pa.int64(), False, id="long"),
        pytest.param("float", pa.float32(), False, id="float"),
        pytest.param("double", pa.float64(), False, id="double"),
        pytest.param("string", pa.string(), False, id="string"),
        pytest.param("bytes", pa.binary(), False, id="bytes"),
        pytest.param(
            {"type": "fixed", "name": "Md5", "size": 16},
            pa.binary(16),
            False,
            id="fixed",
        ),
        pytest.param(
            {"type": "int", "logicalType": "date"}, pa.date32(), False, id="date"
        ),
        pytest.param(
            {"type": "long", "logicalType": "timestamp-millis"},
            pa.timestamp("ms", tz="UTC"),
            False,
            id="timestamp-millis",
        ),
        pytest.param(
            {"type": "long", "logicalType": "timestamp-micros"},
            pa.timestamp("us", tz="UTC"),
            False,
            id="timestamp-micros",
        ),
        pytest.param(
            {"type": "long", "logicalType": "local-timestamp-micros"},
            pa.timestamp("us"),
            False,
            id="local-timestamp",
        ),
        pytest.param(
            {"type": "int", "logicalType": "time-millis"},
            pa.time32("ms"),
            False,
            id="time-millis",
        ),
        pytest.param(DECIMAL, pa.decimal128(10, 2), False, id="decimal"),
        pytest.param(
            {
                "type": "fixed",
                "name": "Big",
                "size": 20,
                "logicalType": "decimal",
                "precision": 40,
                "scale": 0,
            },
            pa.decimal256(40, 0),
            False,
            id="decimal-wide",
        ),
        pytest.param(
            {"type": "string", "logicalType": "uuid"}, pa.string(), False, id="uuid"
        ),
        pytest.param(["null", "string"], pa.string(), True, id="nullable"),
        pytest.param(
            ["null", DECIMAL], pa.decimal128(10, 2), True, id="nullable-decimal"
        ),
        pytest.param(
            ADDRESS,
            pa.struct([pa.field("city", pa.string(), nullable=False)]),
            False,
            id="record",
        ),
        pytest.param(
            {"type": "array", "items": ["null", "long"]},
            pa.list_(pa.field("item", pa.int64())),
            False,
            id="array",
        ),
        pytest.param(
            {"type": "map", "values": "double"},
            pa.map_(pa.string(), pa.field("value", pa.float64(), nullable=False)),
            False,
            id="map",
        ),
        pytest.param(
            {"type": "enum", "name": "Status", "symbols": ["NEW", "DONE"]},
            pa.string(),
            False,
            id="enum",
        ),
        pytest.param(
            ["int", "string"],
            pa.dense_union(
                [
                    pa.field("int", pa.int64(), nullable=False),
                    pa.field("string", pa.string(), nullable=False),
                ]
            ),
            False,
            id="union",
        ),
    ],
)
def test_avro_to_arrow(avro_type, arrow_type, nullable):
    schema = avro_to_arrow(parse_avro(one(avro_type)))
    assert schema == pa.schema([pa.field("f", arrow_type, nullable=nullable)])


def test_named_type_reference_resolves_to_the_same_struct():
    schema = avro_to_arrow(
        parse_avro(
            record(
                {"name": "home", "type": ADDRESS},
                {"name": "work", "type": ["null", "Address"], "default": None},
            )
        )
    )
    assert schema.field("work").type == schema.field("home").type
    assert schema.field("work").nullable is True


# --- JSON Schema ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("avro_type", "expected"),
    [
        pytest.param("boolean", {"type": "boolean"}, id="boolean"),
        pytest.param(
            "int",
            {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1},
            id="int",
        ),
        pytest.param(
            "long",
            {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1},
            id="long",
        ),
        pytest.param("float", {"type": "number"}, id="float"),
        pytest.param("double", {"type": "number"}, id="double"),
        pytest.param("string", {"type": "string"}, id="string"),
        pytest.param("bytes", {"type": "string"}, id="bytes"),
        pytest.param(
            {"type": "fixed", "name": "Two", "size": 2},
            {"type": "string", "minLength": 2, "maxLength": 2},
            id="fixed",
        ),
        pytest.param(
            {"type": "int", "logicalType": "date"},
            {"type": "string", "format": "date"},
            id="date",
        ),
        pytest.param(
            {"type": "long", "logicalType": "timestamp-micros"},
            {"type": "string", "format": "date-time"},
            id="timestamp",
        ),
        pytest.param(
            DECIMAL,
            {
                "type": ["number", "string"],
                "pattern": r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)$",
            },
            id="decimal",
        ),
        pytest.param(["null", "string"], {"type": ["null", "string"]}, id="nullable"),
        pytest.param(
            ADDRESS,
            {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
            id="record",
        ),
        pytest.param(
            {"type": "array", "items": "string"},
            {"type": "array", "items": {"type": "string"}},
            id="array",
        ),
        pytest.param(
            {"type": "map", "values": "boolean"},
            {"type": "object", "additionalProperties": {"type": "boolean"}},
            id="map",
        ),
        pytest.param(
            {"type": "enum", "name": "S", "symbols": ["A", "B"]},
            {"type": "string", "enum": ["A", "B"]},
            id="enum",
        ),
        pytest.param(
            ["null", ADDRESS],
            {
                "anyOf": [
                    {"type": "null"},
                    {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                        "required": ["city"],
                    },
                ]
            },
            id="nullable-record",
        ),
    ],
)
def test_avro_to_json_schema(avro_type, expected):
    schema = avro_to_json_schema(parse_avro(one(avro_type)))
    assert schema == {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {"f": expected},
        "required": ["f"],
        "title": "Order",
    }
    jsonschema.Draft202012Validator.check_schema(schema)


def test_json_schema_fields_with_defaults_are_optional_and_validate():
    schema = avro_to_json_schema(
        parse_avro(
            record(
                {"name": "id", "type": "long", "doc": "the key"},
                {"name": "note", "type": ["null", "string"], "default": None},
            )
        )
    )
    assert schema["required"] == ["id"]
    assert schema["properties"]["id"]["description"] == "the key"
    assert schema["properties"]["note"]["default"] is None
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid({"id": 1})
    assert not validator.is_valid({"note": "x"})
    assert not validator.is_valid({"id": "1"})


# --- Compatibility --------------------------------------------------------------

V1 = record(
    {"name": "id", "type": "long"},
    {"name": "email", "type": "string"},
    {"name": "note", "type": ["null", "string"], "default": None},
)


def without(name: str) -> dict[str, Any]:
    return record(*(f for f in V1["fields"] if f["name"] != name))


def plus(*fields: dict[str, Any]) -> dict[str, Any]:
    return record(*V1["fields"], *fields)


def changed(name: str, avro_type: Any) -> dict[str, Any]:
    return record(
        *({**f, "type": avro_type} if f["name"] == name else f for f in V1["fields"])
    )


CASES = {
    # id: (new definition, compatible under backward, forward, full)
    "same": (V1, True, True, True),
    "remove-required": (without("email"), False, False, False),
    "remove-optional": (without("note"), True, True, True),
    "add-with-default": (
        plus({"name": "x", "type": "int", "default": 0}),
        True,
        True,
        True,
    ),
    "add-without-default": (plus({"name": "x", "type": "int"}), False, True, False),
    "promote-int-to-long": (None, True, False, False),
    "long-to-int": (changed("id", "int"), False, True, False),
    "string-to-long": (changed("email", "long"), False, False, False),
    "make-nullable": (changed("email", ["null", "string"]), True, False, False),
    "rename-with-alias": (
        record(
            V1["fields"][0],
            {"name": "mail", "type": "string", "aliases": ["email"]},
            V1["fields"][2],
        ),
        True,
        False,
        False,
    ),
}


def _case(case_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    new = CASES[case_id][0]
    if case_id == "promote-int-to-long":
        return changed("id", "int"), V1
    return V1, new


@pytest.mark.parametrize("mode", ["backward", "forward", "full"])
@pytest.mark.parametrize("case_id", list(CASES))
def test_compatibility_matrix(case_id, mode):
    old, new = _case(case_id)
    expected = CASES[case_id][{"backward": 1, "forward": 2, "full": 3}[mode]]
    problems = compatibility_problems(parse_avro(old), parse_avro(new), mode)
    assert (problems == []) is expected, problems


@pytest.mark.parametrize("case_id", list(CASES))
def test_reader_rules_agree_with_fastavro_resolution(case_id):
    """Where fastavro resolves, it agrees with reader_problems (both ways)."""
    old, new = _case(case_id)
    values = {"long": 1, "int": 1, "string": "s"}
    for writer, reader in ((old, new), (new, old)):
        # A union writes null: the branch the other schema may not read.
        sample = {
            f["name"]: None if isinstance(f["type"], list) else values[f["type"]]
            for f in writer["fields"]
        }
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, fastavro.parse_schema(writer), sample)
        buffer.seek(0)
        try:
            fastavro.schemaless_reader(
                buffer, fastavro.parse_schema(writer), fastavro.parse_schema(reader)
            )
            readable = True
        except Exception:  # noqa: BLE001 - fastavro raises several classes
            readable = False
        assert (reader_problems(parse_avro(reader), parse_avro(writer)) == []) is (
            readable
        )


def test_removing_a_required_field_under_backward_names_the_field():
    problems = compatibility_problems(
        parse_avro(V1), parse_avro(without("email")), "backward", old_label="version 1"
    )
    assert problems == [
        "field 'email' was removed, but it is required in version 1 (it has no default)"
    ]


@pytest.mark.parametrize(
    ("old_type", "new_type", "message"),
    [
        pytest.param(
            {"type": "long", "logicalType": "timestamp-millis"},
            {"type": "long", "logicalType": "timestamp-micros"},
            "field 'f': logical type changed from timestamp-millis to timestamp-micros",
            id="millis-to-micros",
        ),
        pytest.param(
            DECIMAL,
            {**DECIMAL, "scale": 3},
            "field 'f': decimal scale changed",
            id="decimal-scale",
        ),
        pytest.param(
            {"type": "enum", "name": "S", "symbols": ["A", "B"]},
            {"type": "enum", "name": "S", "symbols": ["A"]},
            "field 'f': enum symbols B are not in the reader (and it has no default)",
            id="enum-symbol-removed",
        ),
        pytest.param(
            {"type": "array", "items": "string"},
            {"type": "array", "items": "int"},
            "field 'f[]': type changed from string to int",
            id="array-items",
        ),
        pytest.param(
            ADDRESS,
            {
                **ADDRESS,
                "fields": [*ADDRESS["fields"], {"name": "zip", "type": "string"}],
            },
            "field 'f.zip' is not in the data and has no default",
            id="nested-field-added",
        ),
    ],
)
def test_backward_problems_name_the_path(old_type, new_type, message):
    problems = compatibility_problems(
        parse_avro(one(old_type)), parse_avro(one(new_type)), "backward"
    )
    assert problems == [
        f"the new schema cannot read data written with previous: {message}"
    ]


def test_none_allows_anything():
    assert compatibility_problems(parse_avro(V1), parse_avro(one("int")), "none") == []


# --- Inference ------------------------------------------------------------------


def test_infer_widens_types_and_makes_missing_or_null_keys_nullable():
    definition = infer_avro(
        [
            {"id": 1, "price": 2, "ok": True, "tag": "a", "address": {"city": "Oslo"}},
            {"id": 2, "price": 2.5, "ok": None, "tag": 3, "items": [1, 2.5]},
        ],
        name="Order",
    )
    assert definition == {
        "type": "record",
        "name": "Order",
        "fields": [
            {"name": "id", "type": "long"},
            {"name": "price", "type": "double"},
            {"name": "ok", "type": ["null", "boolean"], "default": None},
            {"name": "tag", "type": "string"},
            {
                "name": "address",
                "type": [
                    "null",
                    {
                        "type": "record",
                        "name": "Order_address",
                        "fields": [{"name": "city", "type": "string"}],
                    },
                ],
                "default": None,
            },
            {
                "name": "items",
                "type": ["null", {"type": "array", "items": "double"}],
                "default": None,
            },
        ],
    }
    parse_avro(definition)


def test_infer_integers_past_64_bits_become_strings():
    assert infer_avro([{"a": 2**63 - 1}, {"b": 2**63}])["fields"] == [
        {"name": "a", "type": ["null", "long"], "default": None},
        {"name": "b", "type": ["null", "string"], "default": None},
    ]


def test_infer_only_null_becomes_nullable_string():
    assert infer_avro([{"a": None}])["fields"] == [
        {"name": "a", "type": ["null", "string"], "default": None}
    ]


@pytest.mark.parametrize(
    ("records", "message"),
    [
        pytest.param([], "records: at least one record is needed", id="empty"),
        pytest.param(
            [{"a": 1}, 3], "records[1]: must be a JSON object", id="not-object"
        ),
        pytest.param(
            [{"a": {"first name": 1}}],
            "records[0].a: key 'first name' is not a valid Avro name "
            "(letters, digits and _, not starting with a digit)",
            id="bad-key",
        ),
    ],
)
def test_infer_refuses(records, message):
    with pytest.raises(InferenceError) as caught:
        infer_avro(records)
    assert str(caught.value) == message
