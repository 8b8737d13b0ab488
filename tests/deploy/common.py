"""The deployment artefacts: docker/ (image, entrypoint, compose) and charts/dis."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "dis"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
HELM = Path(sys.executable).parent / "helm"

#: A value for each secret the chart takes, each one findable in rendered text.
SECRETS = {
    "DJANGO_SECRET_KEY": "sentinel-django-secret-key-4f1c",
    "DIS_ENCRYPTION_KEYS": "sentinel-encryption-keys-9b2e",
    "DATABASE_URL": "postgres://dis:sentinel-db-password-77a0@db:5432/dis",
    "CELERY_BROKER_URL": "redis://:sentinel-broker-password-31d5@redis:6379/0",
    "REDIS_URL": "redis://:sentinel-redis-password-c6e8@redis:6379/1",
}


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HELM), *args], capture_output=True, text=True, timeout=60, check=False
    )


def render(tmp_path: Path, values: dict[str, Any], **kw: str) -> list[dict[str, Any]]:
    """`helm template` of the chart with `values`; the manifests, parsed."""
    result = render_raw(tmp_path, values, **kw)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def render_raw(
    tmp_path: Path,
    values: dict[str, Any],
    *,
    release: str = "rel",
    namespace: str = "ns",
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / f"values-{len(list(tmp_path.glob('values-*')))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return helm("template", release, str(CHART), "-f", str(path), "-n", namespace)


#: The optional metrics token's value (with `metrics.token: true`).
METRICS_TOKEN = "sentinel-metrics-token-5e0b"


def with_secrets(**values: Any) -> dict[str, Any]:
    secret_values = dict(SECRETS)
    if values.get("metrics", {}).get("token"):
        secret_values["DIS_METRICS_TOKEN"] = METRICS_TOKEN
    return {"secrets": {"values": secret_values}, **values}


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (
        f"{kind}/{name} in {[(d['kind'], d['metadata']['name']) for d in docs]}"
    )
    return found[0]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def entrypoint_roles() -> set[str]:
    """The roles docker/entrypoint.sh's `case` names."""
    text = ENTRYPOINT.read_text()
    body = text[text.index('case "$role" in') : text.index("esac")]
    return set(re.findall(r"^  ([a-z-]+)\)$", body, re.MULTILINE))


def reads_env(name: str) -> bool:
    """Whether the service reads environment variable `name`: config/ (the
    settings, the Celery app, the worker's metrics), gunicorn.conf.py, the
    entrypoint or manage.py."""
    text = _service_sources()
    base = name.removesuffix("_FILE")
    if name.endswith("_FILE") and f'env_secret("{base}")' in text:
        return True
    return bool(re.search(rf'["{{$]{re.escape(name)}["}}:]', text))


@functools.cache
def _service_sources() -> str:
    sources = [*(ROOT / "config").rglob("*.py")]
    sources += [ROOT / "gunicorn.conf.py", ROOT / "docker" / "entrypoint.sh"]
    sources += [ROOT / "manage.py"]
    return "\n".join(p.read_text() for p in sources)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """docker/Dockerfile as (instruction, arguments), continued lines joined."""
    text = (ROOT / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (op, arg)
        for op, _, arg in (line.partition(" ") for line in lines)
        if op and not op.startswith("#") and arg
    ]


def dockerfile_collectstatic_env() -> dict[str, str]:
    """The placeholder environment of the Dockerfile's collectstatic step."""
    [step] = [
        arg
        for op, arg in dockerfile_instructions()
        if op == "RUN" and "manage.py collectstatic" in arg
    ]
    assignments = step.split("python manage.py collectstatic")[0]
    return dict(pair.split("=", 1) for pair in assignments.split())
