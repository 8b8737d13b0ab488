"""Key rotation: re-encrypt under the newest key, resumable, nothing lost."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet
from django.core.management import call_command
from django.db.models import Count

from connectors import crypto
from connectors.models import Credential
from tests.helpers import unique

pytestmark = pytest.mark.django_db

KEY_A = Fernet.generate_key().decode()
KEY_B = Fernet.generate_key().decode()


@pytest.fixture
def use_keys(settings):
    def apply(*keys: str) -> None:
        settings.DIS_ENCRYPTION_KEYS = ",".join(keys)
        crypto.keyring.cache_clear()

    yield apply
    crypto.keyring.cache_clear()


def test_rotation_reencrypts_and_resumes(use_keys, capsys):
    use_keys(KEY_A)
    rows = {}
    for i in range(5):
        cred = Credential(name=unique(f"rot{i}"))
        cred.set_secrets({"password": f"pw-{i}"})
        cred.save()
        rows[cred.pk] = f"pw-{i}"
    assert set(
        Credential.objects.filter(pk__in=rows).values_list("key_id", flat=True)
    ) == {crypto.key_id(KEY_A)}

    use_keys(KEY_B, KEY_A)
    # Interrupted half-way: only 2 of the 5 rows were done.
    call_command("rotate_encryption_keys", "--limit", "2")
    by_key = dict(
        Credential.objects.filter(pk__in=rows)
        .values_list("key_id")
        .annotate(n=Count("id"))
    )
    assert by_key == {crypto.key_id(KEY_B): 2, crypto.key_id(KEY_A): 3}

    call_command("rotate_encryption_keys")
    assert "0 left" in capsys.readouterr().out
    assert set(
        Credential.objects.filter(pk__in=rows).values_list("key_id", flat=True)
    ) == {crypto.key_id(KEY_B)}
    # Every secret decrypts with key B alone: A can now be retired.
    use_keys(KEY_B)
    for pk, password in rows.items():
        assert Credential.objects.get(pk=pk).get_secrets() == {"password": password}


def test_unknown_key_fails_without_leaking(use_keys):
    use_keys(KEY_A)
    cred = Credential(name=unique("lost"))
    cred.set_secrets({"password": "pw-lost"})
    cred.save()
    use_keys(KEY_B)
    with pytest.raises(crypto.DecryptionError) as info:
        Credential.objects.get(pk=cred.pk).get_secrets()
    assert "pw-lost" not in str(info.value)


def test_production_settings_refuse_start_without_key(monkeypatch):
    import importlib
    import sys

    from django.core.exceptions import ImproperlyConfigured

    monkeypatch.setenv("DJANGO_SECRET_KEY", "x" * 60)
    monkeypatch.delenv("DIS_ENCRYPTION_KEYS", raising=False)
    monkeypatch.delenv("DIS_ENCRYPTION_KEYS_FILE", raising=False)
    monkeypatch.setenv("DATABASE_URL", "postgres://postgres@127.0.0.1/x")
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")
    sys.modules.pop("config.settings.production", None)
    with pytest.raises(ImproperlyConfigured, match="DIS_ENCRYPTION_KEYS"):
        importlib.import_module("config.settings.production")


def test_keys_file_is_read(monkeypatch, tmp_path):
    from config.settings.base import env_secret

    path = tmp_path / "keys"
    path.write_text(f"{KEY_B}\n")
    monkeypatch.setenv("DIS_ENCRYPTION_KEYS_FILE", str(path))
    assert env_secret("DIS_ENCRYPTION_KEYS") == KEY_B
