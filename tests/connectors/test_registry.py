"""The registry: kinds import lazily; entry points join; duplicates are errors."""

from __future__ import annotations

import sys
from importlib.metadata import EntryPoint

import pytest

from connectors import registry
from connectors.exceptions import RegistryError


@pytest.fixture(autouse=True)
def _fresh_registry():
    registry.available_kinds.cache_clear()
    registry.get_plugin.cache_clear()
    yield
    registry.available_kinds.cache_clear()
    registry.get_plugin.cache_clear()


def test_builtin_kind_is_imported_on_first_use():
    sys.modules.pop("connectors.plugins.generator", None)
    assert "generator" in registry.available_kinds()
    assert "connectors.plugins.generator" not in sys.modules
    plugin = registry.get_plugin("generator")
    assert plugin.kind == "generator"
    assert "connectors.plugins.generator" in sys.modules


def test_unknown_kind():
    with pytest.raises(RegistryError, match="unknown connector kind 'nope'"):
        registry.get_plugin("nope")


def test_third_party_kind_joins_through_entry_point(monkeypatch):
    ep = EntryPoint(
        "synthetic", "connectors.plugins.generator:GeneratorPlugin", "dis.connectors"
    )
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep])
    assert registry.available_kinds()["synthetic"] == ep.value
    # The class declares kind "generator": registering it as another kind is refused.
    with pytest.raises(RegistryError, match="declares kind 'generator'"):
        registry.get_plugin("synthetic")


def test_duplicate_kind_is_an_error(monkeypatch):
    ep = EntryPoint("generator", "somewhere:Other", "dis.connectors")
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep])
    with pytest.raises(RegistryError, match="defined twice"):
        registry.available_kinds()


def test_path_that_is_not_a_plugin(monkeypatch):
    ep = EntryPoint("oddball", "connectors.registry:available_kinds", "dis.connectors")
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep])
    with pytest.raises(RegistryError, match="not a connector Plugin"):
        registry.get_plugin("oddball")


def test_secret_in_config_is_refused():
    import marshmallow
    from marshmallow import fields

    from connectors.base import Plugin
    from connectors.exceptions import ConfigError

    class Cfg(marshmallow.Schema):
        host = fields.String(required=True)
        password = fields.String(metadata={"secret": True})

    class P(Plugin):
        kind = "p"
        config_schema = Cfg

    with pytest.raises(ConfigError) as info:
        P.load_config({"host": "h", "password": "hunter2"})
    assert "hunter2" not in str(info.value)
    assert info.value.errors == {"password": ["Put this secret in a credential."]}
    assert P.load_config({"host": "h"}, {"password": "hunter2"}) == {
        "host": "h",
        "password": "hunter2",
    }
