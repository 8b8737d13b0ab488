"""docker/Dockerfile, .dockerignore and docker/compose.yaml, read as files.

This machine has no container runtime, so the image is not built here; the
entrypoint it runs and its collectstatic step run for real in
test_entrypoint.py. These tests hold the files to what the service needs.
"""

from __future__ import annotations

import fnmatch
import json
import re

import pytest
import yaml
from compose_spec import PyCompose

from tests.deploy.common import (
    ROOT,
    dockerfile_collectstatic_env,
    dockerfile_instructions,
    entrypoint_roles,
    reads_env,
)

DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()
COMPOSE_TEXT = (ROOT / "docker" / "compose.yaml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)

#: What the running image needs from the build context.
NEEDED = [
    "manage.py",
    "gunicorn.conf.py",
    "config",
    "connectors",
    "integration",
    "lineage",
    "transforms",
    "requirements/base.txt",
    "docker/entrypoint.sh",
]


def test_image_runs_the_entrypoint_as_an_unprivileged_user():
    instructions = dockerfile_instructions()
    assert ("ENTRYPOINT", '["/app/docker/entrypoint.sh"]') in instructions
    assert ("CMD", '["api"]') in instructions
    [user] = [arg for op, arg in instructions if op == "USER"]
    assert int(user) >= 1000
    # The last stage's final USER comes after every RUN that needs root.
    ops = [op for op, _ in instructions]
    assert ops.index("USER") > max(i for i, op in enumerate(ops) if op == "RUN")


def test_image_is_the_projects_python_and_installs_the_pinned_requirements():
    assert "ARG PYTHON_IMAGE=python:3.11-slim-bookworm" in DOCKERFILE
    assert "-r /tmp/requirements.txt" in DOCKERFILE
    assert "COPY requirements/base.txt /tmp/requirements.txt" in DOCKERFILE
    assert "DJANGO_SETTINGS_MODULE=config.settings.production" in DOCKERFILE


def test_collectstatic_placeholders_are_not_left_in_the_image():
    placeholders = dockerfile_collectstatic_env()
    assert set(placeholders) >= {"DJANGO_SECRET_KEY", "DIS_ENCRYPTION_KEYS"}
    env_lines = [arg for op, arg in dockerfile_instructions() if op == "ENV"]
    for name in placeholders:
        assert not any(name in line for line in env_lines)


def _ignored(path: str, patterns: list[str]) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(
        fnmatch.fnmatch(prefix, p.removeprefix("**/")) or fnmatch.fnmatch(prefix, p)
        for p in patterns
        for prefix in prefixes
    )


def test_dockerignore_keeps_what_the_image_needs_and_drops_the_rest():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in NEEDED:
        assert (ROOT / path).exists(), path
        assert not _ignored(path, patterns), path
    for path in (".venv", ".git", "tests", "bench", "docker/.env", ".local"):
        assert _ignored(path, patterns), path


def test_compose_runs_each_role_of_the_entrypoint_from_the_one_image():
    roles = entrypoint_roles()
    services = COMPOSE["services"]
    for name in ("migrate", "api", "worker", "beat"):
        service = services[name]
        assert service["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
        assert service["command"][0] in roles
        assert service["read_only"] is True
        assert service["tmpfs"] == ["/tmp"]  # noqa: S108 - the one writable path
    assert services["beat"]["deploy"]["replicas"] == 1


def test_compose_starts_the_service_after_its_migrations():
    services = COMPOSE["services"]
    assert services["migrate"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"}
    }
    for name in ("api", "worker", "beat"):
        depends = services[name]["depends_on"]
        assert depends["migrate"] == {"condition": "service_completed_successfully"}
    for name in ("postgres", "redis"):
        assert "healthcheck" in services[name]


def test_compose_requires_the_secrets_instead_of_defaulting_them():
    env = COMPOSE["services"]["api"]["environment"]
    for name in ("DJANGO_SECRET_KEY", "DIS_ENCRYPTION_KEYS"):
        assert re.fullmatch(rf"\$\{{{name}:\?[^}}]+\}}", env[name]), env[name]
        assert f"{name}=" in (ROOT / "docker" / "env.example").read_text()
    assert env["DATABASE_URL"].endswith("@postgres:5432/dis")
    assert env["CELERY_BROKER_URL"].startswith("redis://redis:6379/")


def test_every_variable_compose_sets_is_one_the_service_reads():
    names = set()
    for name in ("migrate", "api", "worker", "beat"):
        names |= set(COMPOSE["services"][name]["environment"])
    unread = sorted(n for n in names if not reads_env(n))
    assert unread == []
    assert "docker/.env" in (ROOT / ".gitignore").read_text().split()


_VARIABLE = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?:(?P<op>:[-?])(?P<arg>[^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation: `${NAME}`, `${NAME:-default}` and
    `${NAME:?message}` (an error naming the message when unset or empty)."""

    def value(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        if env.get(name):
            return env[name]
        if op == ":?":
            raise LookupError(f"{name}: {arg}")
        return arg if op == ":-" else ""

    return _VARIABLE.sub(value, text)


def _example_env() -> dict[str, str]:
    """docker/env.example with its two secrets filled in, as docker/.env would be."""
    env = {}
    for line in (ROOT / "docker" / "env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name] = value
    assert set(env) == {"DJANGO_SECRET_KEY", "DIS_ENCRYPTION_KEYS"}
    return {**env, "DJANGO_SECRET_KEY": "k" * 50, "DIS_ENCRYPTION_KEYS": "f" * 44}


def test_compose_refuses_to_start_without_its_secrets():
    with pytest.raises(LookupError, match="DJANGO_SECRET_KEY: set DJANGO_SECRET_KEY"):
        interpolate(COMPOSE_TEXT, {})


def test_compose_file_follows_the_compose_specification():
    text = interpolate(COMPOSE_TEXT, _example_env())
    # PyYAML applies the `<<` merge keys as Compose does; the specification's
    # parser (the compose_spec crate) then validates every service and field.
    compose = PyCompose.from_json(json.dumps(yaml.safe_load(text)))
    assert sorted(compose.service_names()) == sorted(COMPOSE["services"])
    api = compose.to_dict()["services"]["api"]
    assert api["environment"]["DJANGO_SECRET_KEY"] == "k" * 50
    assert api["image"] == "dis:dev"
    assert api["ports"]
