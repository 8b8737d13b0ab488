"""A run's data-quality report: violations per rule with sample source references.

A CSV whose rows break several rules (some rows two at once) runs through a real
worker into PostgreSQL in several chunks; the report's counts and samples are
computed independently from the rows the test wrote.
"""

from __future__ import annotations

import pytest

from integration import services
from integration.models import Pipeline
from tests.helpers import unique, wait_for_run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROWS = 30
STEPS = [
    {
        "type": "map",
        "fields": [
            {"name": "id", "expr": "id", "type": "integer"},
            {"name": "amount", "expr": "amount", "type": "decimal", "scale": 2},
            {"name": "status", "expr": "status", "type": "string"},
            {"name": "note", "expr": "note", "type": "string"},
        ],
    },
    {"type": "filter", "where": "note IS NULL OR note <> 'skip'"},
    {
        "type": "validate",
        "rules": [
            {"field": "id", "rule": "not_null"},
            {"field": "amount", "rule": "range", "min": 0},
            {"field": "status", "rule": "enum", "values": ["new", "paid"]},
            {"field": "note", "rule": "length", "max": 100},
        ],
    },
]


def row(i: int) -> dict[str, str]:
    return {
        "id": "seven" if i == 7 else str(i),
        "amount": f"-{i}.25" if i % 2 == 0 else f"{i}.25",
        "status": "bogus" if i % 5 == 0 else "paid",
        "note": "skip" if i == 29 else f"row {i}",
    }


def ref(i: int) -> str:
    return f"q.csv#{i + 1}"


def test_quality_report_of_a_real_run(worker_factory, tmp_path, pg_sink, api, client):
    from connectors.models import Connector

    rows = [row(i) for i in range(ROWS)]
    lines = ["id,amount,status,note"] + [",".join(r.values()) for r in rows]
    (tmp_path / "q.csv").write_text("\n".join(lines) + "\n")
    source = Connector.objects.create(
        name=unique("files"), kind="files", config={"root": str(tmp_path)}
    )
    pipeline = Pipeline.objects.create(
        name=unique("quality"),
        source=source,
        source_options={"path": "q.csv"},
        steps=STEPS,
        sink=pg_sink,
        sink_options={"table": pg_sink.new_table(), "write_mode": "append"},
        chunk_rows=7,
        max_rejected_ratio=1.0,
    )
    services.freeze_version(pipeline)
    worker_factory(concurrency=1)
    run = wait_for_run(services.start_run(pipeline.pk, correlation_id=unique("c")).pk)
    assert run.state == "succeeded_with_errors", run.error
    assert run.chunks_total == 5

    # Independently: which kept rows break which rule.
    kept = [i for i in range(ROWS) if i != 29]
    negative = [i for i in kept if i % 2 == 0]  # -0.25 for row 0 too
    bogus = [i for i in kept if i % 5 == 0]
    not_an_id = [7]
    validate_rejected = sorted((set(negative) | set(bogus)) - set(not_an_id))

    response = api.get(f"/api/v1/runs/{run.pk}/quality/")
    assert response.status_code == 200
    report = response.json()
    assert report["run"] == run.pk
    assert report["records_read"] == ROWS
    assert report["records_rejected"] == len(validate_rejected) + 1
    assert report["rejected_by_step"] == {"map": 1, "validate": len(validate_rejected)}
    by_rule = {r["rule"]: r for r in report["rules"]}
    assert list(by_rule) == [
        "steps[2].rules[0] (id)",
        "steps[2].rules[1] (amount)",
        "steps[2].rules[2] (status)",
        "steps[2].rules[3] (note)",
    ]
    # The value that does not convert is NULL for the rules: not_null sees it.
    assert by_rule["steps[2].rules[0] (id)"] == {
        "rule": "steps[2].rules[0] (id)",
        "step": 2,
        "field": "id",
        "kind": "not_null",
        "violations": 1,
        "samples": [ref(7)],
    }
    amount = by_rule["steps[2].rules[1] (amount)"]
    assert amount["kind"] == "range"
    assert amount["violations"] == len(negative) == 15
    assert amount["samples"] == [ref(i) for i in negative[: services.QUALITY_SAMPLES]]
    status = by_rule["steps[2].rules[2] (status)"]
    assert status["violations"] == len(bogus) == 6
    assert status["samples"] == [ref(i) for i in bogus]
    assert by_rule["steps[2].rules[3] (note)"]["violations"] == 0
    assert by_rule["steps[2].rules[3] (note)"]["samples"] == []
    # Two rules broken by one row are two violations of one rejected row.
    assert set(negative) & set(bogus) == {0, 10, 20}

    # The same report on the run's admin page.
    from django.contrib.auth import get_user_model

    admin = get_user_model().objects.create_superuser(unique("admin"), "a@b.c", "pw")
    client.force_login(admin)
    page = client.get(f"/admin/integration/run/{run.pk}/change/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "Data quality" in html
    assert "steps[2].rules[1] (amount)" in html
    assert f"<td>range</td><td>{len(negative)}</td>" in html
    assert ", ".join(ref(i) for i in bogus) in html
