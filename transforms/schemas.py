"""Avro record schemas: parsing, Arrow and JSON Schema views, compatibility, inference.

Pure Python (no Django): the schema registry's models and API call these. Avro is
the definition format; fastavro parses and validates it, the rest walks the parsed
schema (named types resolved by their full names).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fastavro
import orjson
import pyarrow as pa
from fastavro.schema import fingerprint as avro_fingerprint
from fastavro.schema import to_parsing_canonical_form

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
PRIMITIVES = frozenset(
    {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
)
NAMED = frozenset({"record", "enum", "fixed", "error"})
_AVRO_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)
# Writer type -> reader types that read it (Avro specification, schema resolution).
_PROMOTIONS: dict[str, frozenset[str]] = {
    "int": frozenset({"long", "float", "double"}),
    "long": frozenset({"float", "double"}),
    "float": frozenset({"double"}),
    "string": frozenset({"bytes"}),
    "bytes": frozenset({"string"}),
}


class SchemaDefinitionError(ValueError):
    """An Avro definition is not a valid record schema (or is not supported)."""


@dataclass(frozen=True)
class ParsedSchema:
    """A validated Avro record schema and its named types, by full name.

    Attributes:
        definition: the schema as given (JSON).
        parsed: fastavro's parsed form (names made full, types checked).
        named: every named type (record, enum, fixed) by full name.
    """

    definition: dict[str, Any]
    parsed: dict[str, Any]
    named: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the Parsing Canonical Form (the Avro fingerprint, hex).

        Docs, defaults and aliases are not part of it: two versions differing only
        there share it; ``content_hash`` tells them apart.
        """
        return str(avro_fingerprint(to_parsing_canonical_form(self.parsed), "SHA-256"))

    @property
    def content_hash(self) -> str:
        """SHA-256 of the whole definition as canonical JSON (sorted keys)."""
        return content_hash(self.definition)

    def resolve(self, schema: Any) -> Any:
        """A named type's definition for a reference by name; anything else as is."""
        if isinstance(schema, str) and schema not in PRIMITIVES:
            return self.named[schema]
        return schema


def content_hash(value: Any) -> str:
    """SHA-256 (hex) of a JSON value in canonical form (sorted keys, compact)."""
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()


def parse_avro(definition: Any) -> ParsedSchema:
    """Parse and validate an Avro record schema.

    Args:
        definition: the Avro schema as JSON (a dict) or JSON text; its top level
            must be a record.

    Returns:
        The parsed schema.

    Raises:
        SchemaDefinitionError: not JSON, not a record, invalid Avro (fastavro's
            message), a duplicate field name or a recursive type.
    """
    if isinstance(definition, str | bytes):
        try:
            definition = orjson.loads(definition)
        except orjson.JSONDecodeError as exc:
            raise SchemaDefinitionError(f"not valid JSON: {exc}") from None
    if not isinstance(definition, dict) or definition.get("type") != "record":
        raise SchemaDefinitionError("must be an Avro record schema (a JSON object)")
    named: dict[str, Any] = {}
    try:
        parsed = fastavro.parse_schema(
            definition, named_schemas=named, _write_hint=False
        )
    except Exception as exc:  # noqa: BLE001 - fastavro raises many classes
        raise SchemaDefinitionError(f"invalid Avro schema: {exc}") from None
    schema = ParsedSchema(definition=definition, parsed=parsed, named=named)
    _check_structure(schema, parsed, [], "")
    return schema


def _check_structure(
    schema: ParsedSchema, node: Any, stack: list[str], path: str
) -> None:
    """Refuse duplicate field names and recursive types (Arrow cannot hold them)."""
    if isinstance(node, list):
        for branch in node:
            _check_structure(schema, branch, stack, path)
        return
    if isinstance(node, str):
        if node in PRIMITIVES:
            return
        if node in stack:
            raise SchemaDefinitionError(f"{path or 'schema'}: recursive type {node!r}")
        node = schema.named[node]
    if not isinstance(node, dict):
        return
    kind = node.get("type")
    if kind in ("record", "error"):
        name = node["name"]
        if name in stack:
            raise SchemaDefinitionError(f"{path or 'schema'}: recursive type {name!r}")
        seen: set[str] = set()
        for f in node["fields"]:
            if f["name"] in seen:
                raise SchemaDefinitionError(
                    f"{_join(path, f['name'])}: duplicate field name"
                )
            seen.add(f["name"])
            _check_structure(schema, f["type"], [*stack, name], _join(path, f["name"]))
    elif kind == "array":
        _check_structure(schema, node["items"], stack, f"{path}[]")
    elif kind == "map":
        _check_structure(schema, node["values"], stack, f"{path}{{}}")
    elif isinstance(kind, dict | list) or (isinstance(kind, str) and kind in stack):
        _check_structure(schema, kind, stack, path)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# --- Arrow ----------------------------------------------------------------------


def avro_to_arrow(schema: ParsedSchema) -> pa.Schema:
    """The Arrow schema of an Avro record schema.

    int and long -> int64; float -> float32; double -> float64; boolean; string and
    enum -> string; bytes -> binary; fixed -> fixed_size_binary; date -> date32;
    time-millis/micros -> time32[ms]/time64[us]; timestamp-millis/micros ->
    timestamp[ms/us, tz=UTC] (local-timestamp-*: without a zone); decimal ->
    decimal128 (decimal256 past 38 digits); uuid -> string; record -> struct;
    array -> list; map -> map<string, values>; ``["null", T]`` -> T, nullable; a
    union of several non-null types -> a dense union.

    Args:
        schema: a parsed record schema.

    Returns:
        One Arrow field per record field; a field is nullable when its type is a
        union with ``"null"``.
    """
    record = schema.parsed
    return pa.schema(
        [_arrow_field(schema, f["name"], f["type"]) for f in record["fields"]]
    )


def _arrow_field(schema: ParsedSchema, name: str, avro: Any) -> pa.Field:
    data_type, nullable = _arrow_type(schema, avro)
    return pa.field(name, data_type, nullable=nullable)


def _arrow_type(schema: ParsedSchema, avro: Any) -> tuple[pa.DataType, bool]:
    """(Arrow type, nullable) of an Avro type."""
    avro = schema.resolve(avro)
    if isinstance(avro, list):
        branches = [b for b in avro if b != "null"]
        nullable = len(branches) < len(avro)
        if not branches:
            return pa.null(), True
        if len(branches) == 1:
            return _arrow_type(schema, branches[0])[0], nullable
        fields = [_arrow_field(schema, _branch_name(schema, b), b) for b in branches]
        return pa.dense_union(fields), nullable
    if isinstance(avro, str):
        return _PRIMITIVE_ARROW[avro], avro == "null"
    kind = avro["type"]
    logical = avro.get("logicalType")
    if logical is not None:
        logical_type = _arrow_logical(avro, logical)
        if logical_type is not None:
            return logical_type, False
    if kind in ("record", "error"):
        return pa.struct(
            [_arrow_field(schema, f["name"], f["type"]) for f in avro["fields"]]
        ), False
    if kind == "array":
        return pa.list_(_arrow_field(schema, "item", avro["items"])), False
    if kind == "map":
        value_type, nullable = _arrow_type(schema, avro["values"])
        return pa.map_(
            pa.string(), pa.field("value", value_type, nullable=nullable)
        ), False
    if kind == "enum":
        return pa.string(), False
    if kind == "fixed":
        return pa.binary(avro["size"]), False
    return _arrow_type(schema, kind)


_PRIMITIVE_ARROW: dict[str, pa.DataType] = {
    "null": pa.null(),
    "boolean": pa.bool_(),
    "int": pa.int64(),
    "long": pa.int64(),
    "float": pa.float32(),
    "double": pa.float64(),
    "bytes": pa.binary(),
    "string": pa.string(),
}


def _arrow_logical(avro: Mapping[str, Any], logical: str) -> pa.DataType | None:
    """The Arrow type of a logical type; None when it does not apply (Avro ignores
    a logical type on the wrong underlying type)."""
    kind = avro["type"]
    if logical == "decimal" and kind in ("bytes", "fixed"):
        precision = avro.get("precision", 0)
        scale = avro.get("scale", 0)
        if precision > 38:
            return pa.decimal256(precision, scale)
        return pa.decimal128(precision, scale)
    return {
        ("date", "int"): pa.date32(),
        ("time-millis", "int"): pa.time32("ms"),
        ("time-micros", "long"): pa.time64("us"),
        ("timestamp-millis", "long"): pa.timestamp("ms", tz="UTC"),
        ("timestamp-micros", "long"): pa.timestamp("us", tz="UTC"),
        ("local-timestamp-millis", "long"): pa.timestamp("ms"),
        ("local-timestamp-micros", "long"): pa.timestamp("us"),
        ("uuid", "string"): pa.string(),
    }.get((logical, kind))


def _branch_name(schema: ParsedSchema, avro: Any) -> str:
    avro = schema.resolve(avro) if isinstance(avro, str) else avro
    if isinstance(avro, str):
        return avro
    if avro.get("type") in NAMED:
        return str(avro["name"]).rsplit(".", 1)[-1]
    return str(avro.get("logicalType") or avro["type"])


def arrow_schema_fields(arrow: pa.Schema) -> list[dict[str, Any]]:
    """A JSON view of an Arrow schema: ``[{"name", "type", "nullable"}]``."""
    return [
        {"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in arrow
    ]


# --- JSON Schema ----------------------------------------------------------------


def avro_to_json_schema(schema: ParsedSchema) -> dict[str, Any]:
    """A JSON Schema (Draft 2020-12) of the records an Avro schema describes.

    Records are objects whose fields without an Avro default are ``required``
    (a nullable field without a default must be present, possibly null); extra
    properties are allowed, as an Avro reader ignores fields it does not know.
    Dates, times and timestamps are ISO 8601 strings (``format``), decimals a
    number or a decimal string, bytes and fixed a string, enums an ``enum`` of
    strings, maps objects, and ``["null", T]`` T's schema with ``"null"`` added.

    Args:
        schema: a parsed record schema.

    Returns:
        The JSON Schema, with ``$schema`` and ``title`` (the record's name).
    """
    record = schema.parsed
    out: dict[str, Any] = {"$schema": JSON_SCHEMA_DIALECT}
    out.update(_json_type(schema, record))
    out["title"] = str(record["name"])
    return out


def _json_type(schema: ParsedSchema, avro: Any) -> dict[str, Any]:
    avro = schema.resolve(avro)
    if isinstance(avro, list):
        branches = [_json_type(schema, b) for b in avro]
        if all(set(b) == {"type"} and isinstance(b["type"], str) for b in branches):
            return {"type": [b["type"] for b in branches]}
        return {"anyOf": branches}
    if isinstance(avro, str):
        return dict(_PRIMITIVE_JSON[avro])
    kind = avro["type"]
    out: dict[str, Any]
    logical = _json_logical(avro)
    if logical is not None:
        out = logical
    elif kind in ("record", "error"):
        required = [f["name"] for f in avro["fields"] if "default" not in f]
        properties = {}
        for f in avro["fields"]:
            prop = _json_type(schema, f["type"])
            if "doc" in f:
                prop["description"] = f["doc"]
            if "default" in f:
                prop["default"] = f["default"]
            properties[f["name"]] = prop
        out = {"type": "object", "properties": properties}
        if required:
            out["required"] = required
    elif kind == "array":
        out = {"type": "array", "items": _json_type(schema, avro["items"])}
    elif kind == "map":
        out = {
            "type": "object",
            "additionalProperties": _json_type(schema, avro["values"]),
        }
    elif kind == "enum":
        out = {"type": "string", "enum": list(avro["symbols"])}
    elif kind == "fixed":
        out = {"type": "string", "minLength": avro["size"], "maxLength": avro["size"]}
    else:
        return _json_type(schema, kind)
    if kind in ("record", "error", "enum") and "doc" in avro:
        out["description"] = avro["doc"]
    return out


_PRIMITIVE_JSON: dict[str, dict[str, Any]] = {
    "null": {"type": "null"},
    "boolean": {"type": "boolean"},
    "int": {"type": "integer", "minimum": _INT32[0], "maximum": _INT32[1]},
    "long": {"type": "integer", "minimum": _INT64[0], "maximum": _INT64[1]},
    "float": {"type": "number"},
    "double": {"type": "number"},
    "bytes": {"type": "string"},
    "string": {"type": "string"},
}


def _json_logical(avro: Mapping[str, Any]) -> dict[str, Any] | None:
    logical, kind = avro.get("logicalType"), avro["type"]
    if logical == "decimal" and kind in ("bytes", "fixed"):
        return {
            "type": ["number", "string"],
            "pattern": r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)$",
        }
    formats = {
        ("date", "int"): "date",
        ("time-millis", "int"): "time",
        ("time-micros", "long"): "time",
        ("timestamp-millis", "long"): "date-time",
        ("timestamp-micros", "long"): "date-time",
        ("local-timestamp-millis", "long"): "date-time",
        ("local-timestamp-micros", "long"): "date-time",
        ("uuid", "string"): "uuid",
    }
    fmt = formats.get((logical, kind))
    return None if fmt is None else {"type": "string", "format": fmt}


# --- Compatibility --------------------------------------------------------------


def compatibility_problems(
    old: ParsedSchema, new: ParsedSchema, mode: str, *, old_label: str = "previous"
) -> list[str]:
    """Why ``new`` may not follow ``old`` under a compatibility mode.

    The rules are Avro's schema resolution (see ``reader_problems``), applied:

    - ``backward``: the new schema reads data written with the old one; and a
      field the old schema requires (no default) is not removed — consumers of
      the subject rely on it. (Stricter than Confluent's BACKWARD, which lets
      any field go.) An optional field (with a default) may be removed.
    - ``forward``: the old schema reads data written with the new one.
    - ``full``: both.
    - ``none``: anything goes.

    Args:
        old: the subject's latest version.
        new: the candidate version.
        mode: ``backward``, ``forward``, ``full`` or ``none``.
        old_label: how messages name the old version, e.g. ``version 3``.

    Returns:
        Human-readable reasons, empty when compatible.
    """
    problems: list[str] = []
    if mode in ("backward", "full"):
        problems += [
            f"the new schema cannot read data written with {old_label}: {p}"
            for p in reader_problems(new, old)
        ]
        problems += _removed_required(old, new, old_label)
    if mode in ("forward", "full"):
        problems += [
            f"{old_label} cannot read data written with the new schema: {p}"
            for p in reader_problems(old, new)
        ]
    return list(dict.fromkeys(problems))


def _removed_required(old: ParsedSchema, new: ParsedSchema, label: str) -> list[str]:
    kept = {f["name"] for f in new.parsed["fields"]}
    for f in new.parsed["fields"]:
        kept.update(f.get("aliases", []))
    return [
        f"field {f['name']!r} was removed, but it is required in {label} "
        "(it has no default)"
        for f in old.parsed["fields"]
        if f["name"] not in kept and "default" not in f
    ]


def reader_problems(reader: ParsedSchema, writer: ParsedSchema) -> list[str]:
    """Why data written with ``writer`` cannot be read with ``reader``.

    Avro's resolution rules: a record field of the reader that the writer lacks
    needs a default (fields are matched by name or by the reader's aliases; a
    writer field the reader lacks is ignored); types must match or promote (int
    -> long, float, double; long -> float, double; float -> double; string <->
    bytes); every branch of a writer union must be readable, and a reader union
    must have a branch for a non-union writer; enum symbols the writer may write
    must exist in the reader (unless it has a default); named types keep their
    name; fixed types their size. Stricter than fastavro: a logical type must
    not change (a date read as an int, or millis as micros, silently changes the
    values) and a decimal keeps its scale and does not lose precision.

    Args:
        reader: the schema reading.
        writer: the schema the data was written with.

    Returns:
        One message per problem, each naming the field path; empty when readable.
    """
    problems: list[str] = []
    _resolve(reader, writer, reader.parsed, writer.parsed, "", problems)
    return problems


def _describe(schema: ParsedSchema, avro: Any) -> str:
    avro = schema.resolve(avro)
    if isinstance(avro, list):
        return "[" + ", ".join(_describe(schema, b) for b in avro) + "]"
    if isinstance(avro, str):
        return avro
    if avro.get("logicalType"):
        return f"{avro['type']}/{avro['logicalType']}"
    if avro["type"] in NAMED:
        return f"{avro['type']} {avro['name']}"
    return str(avro["type"])


def _resolve(
    rs: ParsedSchema,
    ws: ParsedSchema,
    reader: Any,
    writer: Any,
    path: str,
    problems: list[str],
) -> None:
    reader, writer = rs.resolve(reader), ws.resolve(writer)
    where = f"field {path!r}" if path else "the record"
    if isinstance(writer, list):
        for branch in writer:
            _resolve(rs, ws, reader, branch, path, problems)
        return
    if isinstance(reader, list):
        for branch in reader:
            branch_problems: list[str] = []
            _resolve(rs, ws, branch, writer, path, branch_problems)
            if not branch_problems:
                return
        problems.append(
            f"{where}: {_describe(ws, writer)} matches no branch of "
            f"{_describe(rs, reader)}"
        )
        return
    r_kind = reader if isinstance(reader, str) else reader["type"]
    w_kind = writer if isinstance(writer, str) else writer["type"]
    if isinstance(r_kind, dict | list) or isinstance(w_kind, dict | list):
        # {"type": {...}} wraps another type.
        _resolve(
            rs,
            ws,
            r_kind if isinstance(r_kind, dict | list) else reader,
            w_kind if isinstance(w_kind, dict | list) else writer,
            path,
            problems,
        )
        return
    if r_kind != w_kind and r_kind not in _PROMOTIONS.get(w_kind, ()):
        problems.append(
            f"{where}: type changed from {_describe(ws, writer)} to "
            f"{_describe(rs, reader)}"
        )
        return
    r_logical = reader.get("logicalType") if isinstance(reader, dict) else None
    w_logical = writer.get("logicalType") if isinstance(writer, dict) else None
    if r_logical != w_logical:
        problems.append(
            f"{where}: logical type changed from {w_logical or 'none'} to "
            f"{r_logical or 'none'}"
        )
        return
    if r_logical == "decimal":
        if reader.get("scale", 0) != writer.get("scale", 0):
            problems.append(f"{where}: decimal scale changed")
        elif reader.get("precision", 0) < writer.get("precision", 0):
            problems.append(f"{where}: decimal precision lowered")
    if r_kind in NAMED and _short(reader["name"]) not in _names(writer, reader):
        problems.append(
            f"{where}: {r_kind} name changed from {writer['name']!r} to "
            f"{reader['name']!r}"
        )
        return
    if r_kind in ("record", "error"):
        _resolve_record(rs, ws, reader, writer, path, problems)
    elif r_kind == "enum":
        default = reader.get("default")
        missing = [s for s in writer["symbols"] if s not in reader["symbols"]]
        if missing and default is None:
            problems.append(
                f"{where}: enum symbols {', '.join(missing)} are not in the reader "
                "(and it has no default)"
            )
    elif r_kind == "fixed" and reader["size"] != writer["size"]:
        problems.append(
            f"{where}: fixed size changed from {writer['size']} to {reader['size']}"
        )
    elif r_kind == "array":
        _resolve(rs, ws, reader["items"], writer["items"], f"{path}[]", problems)
    elif r_kind == "map":
        _resolve(rs, ws, reader["values"], writer["values"], f"{path}{{}}", problems)


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _names(writer: Mapping[str, Any], reader: Mapping[str, Any]) -> set[str]:
    """Short names under which the reader accepts the writer's named type."""
    accepted = {_short(writer["name"])}
    if any(_short(a) == _short(writer["name"]) for a in reader.get("aliases", [])):
        accepted.add(_short(reader["name"]))
    return accepted


def _resolve_record(
    rs: ParsedSchema,
    ws: ParsedSchema,
    reader: Mapping[str, Any],
    writer: Mapping[str, Any],
    path: str,
    problems: list[str],
) -> None:
    written = {f["name"]: f for f in writer["fields"]}
    for f in reader["fields"]:
        field_path = _join(path, f["name"])
        match = next(
            (
                written[name]
                for name in [f["name"], *f.get("aliases", [])]
                if name in written
            ),
            None,
        )
        if match is not None:
            _resolve(rs, ws, f["type"], match["type"], field_path, problems)
        elif "default" not in f:
            problems.append(
                f"field {field_path!r} is not in the data and has no default"
            )


# --- Inference ------------------------------------------------------------------


class InferenceError(ValueError):
    """A sample from which no Avro schema can be inferred."""


def infer_avro(
    records: Sequence[Mapping[str, Any]], *, name: str = "Record"
) -> dict[str, Any]:
    """Infer an Avro record schema from JSON records.

    Each key becomes a field, in first-seen order. Types are widened across the
    sample: boolean, long (integers; past 64 bits string), double (numbers; long +
    double is double), string; any other mix is string. Objects become nested
    records (their keys merged across the sample), lists arrays (items widened
    over all elements).
    A key that is null or missing in some record becomes ``["null", T]`` with
    default null; a key that is only ever null becomes ``["null", "string"]``;
    an empty list's items are nullable strings.

    Args:
        records: the sample, JSON objects.
        name: the top-level record's name (nested records are named after their
            path: ``Record_address``).

    Returns:
        The Avro definition (valid for ``parse_avro``).

    Raises:
        InferenceError: no records, a record that is not an object, or a key that
            is not a valid Avro name (naming its position).
    """
    if not _AVRO_NAME.match(name):
        raise InferenceError(f"name {name!r} is not a valid Avro name")
    if not records:
        raise InferenceError("records: at least one record is needed")
    for index, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise InferenceError(f"records[{index}]: must be a JSON object")
    shape = _Shape()
    for index, record in enumerate(records):
        shape.add(record, f"records[{index}]")
    return _shape_record(shape, name)


@dataclass
class _Shape:
    """What a sample's values at one position looked like."""

    kinds: set[str] = field(default_factory=set)
    nullable: bool = False
    #: Object values seen here, and their keys' shapes.
    objects: int = 0
    fields: dict[str, _Shape] = field(default_factory=dict)
    #: How many of the parent's objects had this key.
    present: int = 0
    items: _Shape | None = None

    def add(self, value: Any, where: str) -> None:
        if value is None:
            self.nullable = True
        elif isinstance(value, bool):
            self.kinds.add("boolean")
        elif isinstance(value, int):
            # Past 64 bits only a string keeps the value exact.
            self.kinds.add("long" if _INT64[0] <= value <= _INT64[1] else "string")
        elif isinstance(value, float):
            self.kinds.add("double" if math.isfinite(value) else "string")
        elif isinstance(value, str):
            self.kinds.add("string")
        elif isinstance(value, Mapping):
            self.kinds.add("record")
            self.objects += 1
            for key, item in value.items():
                if not isinstance(key, str) or not _AVRO_NAME.match(key):
                    raise InferenceError(
                        f"{where}: key {key!r} is not a valid Avro name "
                        "(letters, digits and _, not starting with a digit)"
                    )
                child = self.fields.setdefault(key, _Shape())
                child.present += 1
                child.add(item, f"{where}.{key}")
        elif isinstance(value, list):
            self.kinds.add("array")
            if self.items is None:
                self.items = _Shape()
            for position, item in enumerate(value):
                self.items.add(item, f"{where}[{position}]")
        else:
            self.kinds.add("string")


def _widen(kinds: set[str]) -> str | None:
    if not kinds:
        return None
    if len(kinds) == 1:
        return next(iter(kinds))
    if kinds == {"long", "double"}:
        return "double"
    return "string"


def _shape_type(shape: _Shape, name: str) -> Any:
    kind = _widen(shape.kinds) or "string"
    if kind == "record":
        avro: Any = _shape_record(shape, name)
    elif kind == "array":
        items = shape.items or _Shape()
        avro = {"type": "array", "items": _shape_type(items, f"{name}_item")}
    else:
        avro = kind
    if shape.nullable or not shape.kinds:
        return ["null", avro]
    return avro


def _shape_record(shape: _Shape, name: str) -> dict[str, Any]:
    fields: list[dict[str, Any]] = []
    for key, child in shape.fields.items():
        if child.present < shape.objects:
            child.nullable = True
        avro = _shape_type(child, f"{name}_{key}")
        spec: dict[str, Any] = {"name": key, "type": avro}
        if isinstance(avro, list):
            spec["default"] = None
        fields.append(spec)
    return {"type": "record", "name": name, "fields": fields}
