"""The mask step: redaction, salted SHA-256 and Fernet encryption of PII."""

from __future__ import annotations

import hashlib
from typing import Any

import pyarrow as pa
import pytest
from cryptography.fernet import Fernet

from transforms.engine import StepConfigError, compile_steps

SALT = "pepper-7f3a"
KEY = Fernet.generate_key().decode()
SECRETS = {"mask_salt": SALT, "fernet_key": KEY}
PEOPLE_MAP = {
    "type": "map",
    "fields": [
        {"name": "email", "expr": "email", "type": "string"},
        {"name": "card", "expr": "card", "type": "string"},
        {"name": "age", "expr": "age", "type": "integer"},
    ],
}


def mask(*fields: dict[str, Any]) -> dict[str, Any]:
    return {"type": "mask", "fields": list(fields)}


@pytest.mark.parametrize(
    ("field", "values", "expected"),
    [
        pytest.param(
            {"name": "card", "method": "redact"},
            ["4111111111111111", "", None],
            ["***", "***", None],
            id="redact",
        ),
        pytest.param(
            {"name": "card", "method": "redact", "keep_last": 4},
            ["4111111111111111", "1234", "12", None],
            ["***1111", "***", "***", None],
            id="redact-keep-last-never-reveals-a-short-value",
        ),
        pytest.param(
            {"name": "email", "method": "sha256"},
            ["ann@example.com", None],
            [hashlib.sha256(f"{SALT}ann@example.com".encode()).hexdigest(), None],
            id="sha256-salted",
        ),
        pytest.param(
            {"name": "age", "method": "sha256"},
            ["42"],
            [hashlib.sha256(f"{SALT}42".encode()).hexdigest()],
            id="sha256-of-an-integer-hashes-its-text",
        ),
    ],
)
def test_mask_in_sql(
    compile_pipeline: Any,
    make_batch: Any,
    field: dict[str, Any],
    values: list[str | None],
    expected: list[str | None],
) -> None:
    pipeline = compile_pipeline([PEOPLE_MAP, mask(field)], secrets=SECRETS)
    count = len(values)
    batch = make_batch(email=values, card=values, age=["1"] * count)
    if field["name"] == "age":
        batch = make_batch(email=["x"] * count, card=["x"] * count, age=values)

    result = pipeline.run(batch)

    assert result.output[field["name"]].to_pylist() == expected
    assert pipeline.output_schema.field(field["name"]).type == pa.string()


def test_encrypt_round_trips_with_the_key_and_keeps_nulls(
    compile_pipeline: Any, make_batch: Any
) -> None:
    pipeline = compile_pipeline(
        [PEOPLE_MAP, mask({"name": "email", "method": "encrypt"})], secrets=SECRETS
    )

    result = pipeline.run(
        make_batch(
            email=["ann@example.com", None, "ann@example.com"],
            card=["1", "2", "3"],
            age=["1", "2", "3"],
        )
    )

    tokens = result.output["email"].to_pylist()
    assert tokens[1] is None
    assert tokens[0] != tokens[2]  # a fresh IV per value: equal inputs differ
    fernet = Fernet(KEY)
    assert [fernet.decrypt(t.encode()).decode() for t in (tokens[0], tokens[2])] == [
        "ann@example.com",
        "ann@example.com",
    ]
    assert result.output.schema.field("email").type == pa.string()


def test_validate_after_mask_sees_the_masked_value(
    compile_pipeline: Any, make_batch: Any
) -> None:
    steps = [
        PEOPLE_MAP,
        mask({"name": "email", "method": "sha256"}),
        {
            "type": "validate",
            "rules": [{"field": "email", "rule": "length", "min": 64, "max": 64}],
        },
    ]

    result = compile_pipeline(steps, secrets=SECRETS).run(
        make_batch(email=["a@b.c"], card=["1"], age=["1"])
    )

    assert result.output.num_rows == 1


def test_a_named_secret_and_a_mask_before_any_map(
    compile_pipeline: Any, make_batch: Any
) -> None:
    steps = [mask({"name": "email", "method": "sha256", "secret": "email_salt"})]

    result = compile_pipeline(steps, secrets={"email_salt": "s"}).run(
        make_batch(email=["a"], other=["kept"])
    )

    assert result.output.to_pylist() == [
        {
            "email": hashlib.sha256(b"sa").hexdigest(),
            "other": "kept",
            "_source_ref": "/data/flights.csv#0",
        }
    ]


def test_secrets_are_never_echoed(compile_pipeline: Any, make_batch: Any) -> None:
    pipeline = compile_pipeline(
        [
            PEOPLE_MAP,
            mask(
                {"name": "email", "method": "sha256"},
                {"name": "card", "method": "encrypt"},
            ),
        ],
        secrets=SECRETS,
    )
    pipeline.run(make_batch(email=["a"], card=["b"], age=["1"]))

    plans = [plan.query() for plan in pipeline._plans.values()]
    shown = [repr(pipeline), str(vars(pipeline)), *plans]
    assert [text for text in shown if SALT in text or KEY in text] == []


@pytest.mark.parametrize(
    ("steps", "secrets", "message"),
    [
        pytest.param(
            [PEOPLE_MAP, mask({"name": "email", "method": "sha256"})],
            None,
            "steps[1].fields[0] (email): sha256 needs secrets['mask_salt']: "
            "a non-empty string",
            id="missing-salt",
        ),
        pytest.param(
            [PEOPLE_MAP, mask({"name": "email", "method": "encrypt"})],
            {"fernet_key": "not-a-key-" + SALT},
            "steps[1].fields[0] (email): secrets['fernet_key'] is not a valid "
            "Fernet key",
            id="bad-fernet-key-not-echoed",
        ),
        pytest.param(
            [PEOPLE_MAP, mask({"name": "phone", "method": "redact"})],
            None,
            "steps[1].fields[0] (phone): unknown field 'phone'",
            id="unknown-field",
        ),
        pytest.param(
            [PEOPLE_MAP, mask({"name": "email", "method": "blur"})],
            None,
            "steps[1].fields[0] (email): unknown method 'blur'; "
            "use redact, sha256, encrypt",
            id="unknown-method",
        ),
        pytest.param(
            [PEOPLE_MAP, mask({"name": "email", "method": "sha256", "keep_last": 2})],
            SECRETS,
            "steps[1].fields[0] (email): unknown key 'keep_last'",
            id="keep-last-is-for-redact",
        ),
        pytest.param(
            [PEOPLE_MAP, mask({"name": "email", "method": "redact", "keep_last": -1})],
            None,
            "steps[1].fields[0] (email): keep_last must be an integer >= 0",
            id="negative-keep-last",
        ),
        pytest.param(
            [
                PEOPLE_MAP,
                mask({"name": "email", "method": "encrypt"}),
                {"type": "filter", "where": "age > 1"},
            ],
            SECRETS,
            "steps[2]: a mask step that encrypts must be the last step",
            id="encrypt-not-last",
        ),
    ],
)
def test_invalid_mask_config(
    steps: list[dict[str, Any]], secrets: dict[str, str] | None, message: str
) -> None:
    with pytest.raises(StepConfigError) as raised:
        compile_steps(steps, secrets=secrets)

    assert str(raised.value) == message
    assert raised.value.__cause__ is None or SALT not in str(raised.value.__cause__)
    assert SALT not in str(raised.value)


def test_encrypt_cost_on_50k_rows(compile_pipeline: Any) -> None:
    # One Fernet call per value: this bounds it (about 0.2 s measured).
    rows = 50_000
    batch = pa.table(
        {
            "email": [f"user{n}@example.com" for n in range(rows)],
            "_source_ref": [str(n) for n in range(rows)],
        }
    )
    pipeline = compile_pipeline(
        [mask({"name": "email", "method": "encrypt"})], secrets=SECRETS
    )

    result = pipeline.run(batch)

    assert result.output.num_rows == rows
    assert Fernet(KEY).decrypt(result.output["email"][rows - 1].as_py().encode()) == (
        b"user49999@example.com"
    )
