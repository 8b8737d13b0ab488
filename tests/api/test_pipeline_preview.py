"""`POST /api/v1/pipelines/{id}/preview/` without a worker: the shapes it answers.

The comparison with a real run is tests/runs/test_preview_e2e.py.
"""

from __future__ import annotations

from pathlib import Path

from integration import services
from integration.models import Pipeline, Run
from tests.helpers import airlines_reference, unique


def make_pipeline(source, sink, steps) -> Pipeline:
    pipeline = Pipeline.objects.create(
        name=unique("preview"),
        source=source,
        steps=steps,
        sink=sink,
        sink_options={"table": "t"},
    )
    services.freeze_version(pipeline)
    return pipeline


def test_an_aggregate_pipeline_previews_its_merged_groups(
    api, generator_connector, sqlite_sink
):
    steps = [
        {
            "type": "map",
            "fields": [
                {"name": "k", "expr": "k", "type": "string"},
                {"name": "v", "expr": "v", "type": "integer"},
            ],
        },
        {"type": "filter", "where": "k <> 'skip'"},
        {
            "type": "aggregate",
            "group_by": ["k"],
            "measures": [
                {"name": "rows", "fn": "count"},
                {"name": "total", "fn": "sum", "expr": "v"},
                {"name": "mean", "fn": "avg", "expr": "v"},
            ],
        },
    ]
    pipeline = make_pipeline(generator_connector, sqlite_sink, steps)
    records = [
        {"k": "a", "v": 1},
        {"k": "b", "v": 10},
        {"k": "a", "v": 2},
        {"k": "a", "v": "x"},
        {"k": "skip", "v": 5},
    ]

    response = api.post(
        f"/api/v1/pipelines/{pipeline.pk}/preview/", {"records": records}, format="json"
    )

    assert response.status_code == 200, response.json()
    body = response.json()
    assert sorted(body["outputs"], key=lambda r: r["k"]) == [
        {"k": "a", "rows": 2, "total": 3, "mean": 1.5},
        {"k": "b", "rows": 1, "total": 10, "mean": 10.0},
    ]
    assert body["schema"] == [
        {"name": "k", "type": "string"},
        {"name": "rows", "type": "int64"},
        {"name": "total", "type": "int64"},
        {"name": "mean", "type": "double"},
    ]
    assert body["errors"] == [
        {
            "index": 3,
            "source_ref": "preview#3",
            "step": "map",
            "error": "v: cannot convert 'x' to integer",
        }
    ]
    assert (body["rows_in"], body["filtered"], body["version"]) == (5, 1, 1)
    # Nothing ran and nothing was written.
    assert not Run.objects.filter(pipeline=pipeline).exists()
    assert not Path(sqlite_sink.config["path"]).exists()


def test_a_pipeline_previews_a_sample_of_its_source(
    api, generator_connector, sqlite_sink
):
    steps = [{"type": "filter", "where": "true"}]
    pipeline = make_pipeline(generator_connector, sqlite_sink, steps)

    response = api.post(
        f"/api/v1/pipelines/{pipeline.pk}/preview/", {"limit": 3}, format="json"
    )

    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["rows_in"] == 3
    assert len(body["outputs"]) == 3
    assert body["errors"] == []


def test_preview_refuses_bad_input_with_the_field(
    api, generator_connector, sqlite_sink
):
    pipeline = make_pipeline(generator_connector, sqlite_sink, [])
    url = f"/api/v1/pipelines/{pipeline.pk}/preview/"

    assert api.post(url, {"limit": 0}, format="json").json() == {
        "limit": ["Ensure this value is greater than or equal to 1."]
    }
    response = api.post(url, {"records": [{"_source_ref": "x"}]}, format="json")
    assert response.status_code == 400
    assert response.json() == {"records": ["records[0]: '_source_ref' is reserved"]}


def test_preview_reads_references_without_filling_the_caches(
    api, generator_connector, sqlite_sink, tmp_path
):
    import redis
    from django.conf import settings

    from integration import references

    ref, _db = airlines_reference(tmp_path)
    steps = [
        {
            "type": "enrich",
            "reference": "airlines",
            "on": {"carrier": "carrier"},
            "fields": [{"name": "airline", "expr": "name", "type": "string"}],
            "required": True,
        }
    ]
    pipeline = Pipeline.objects.create(
        name=unique("preview"),
        source=generator_connector,
        steps=steps,
        references={"airlines": ref},
        sink=sqlite_sink,
        sink_options={"table": "t"},
    )
    services.freeze_version(pipeline)
    references.clear_local()

    response = api.post(
        f"/api/v1/pipelines/{pipeline.pk}/preview/",
        {"records": [{"carrier": "UA"}, {"carrier": "ZZ"}]},
        format="json",
    )

    assert response.status_code == 200, response.json()
    body = response.json()
    assert [(o["carrier"], o["airline"]) for o in body["outputs"]] == [("UA", "United")]
    assert body["errors"][0]["error"] == (
        "carrier: 'ZZ' has no match in reference airlines"
    )
    key = references.cache_key(ref, ["carrier", "name"])
    client = redis.Redis.from_url(settings.REDIS_URL)
    assert client.exists(key) == 0
    assert references._local == {}
    # A run's read of the same reference does fill both (the key is the same).
    try:
        references.for_version(
            {"references": {"airlines": ref}}, {"airlines": ["carrier", "name"]}
        )
        assert client.exists(key) == 1
        assert list(references._local) == [key]
    finally:
        client.delete(key)
        references.clear_local()
