"""Encryption of credential secrets with MultiFernet (cryptography).

Keys come newest first from `DIS_ENCRYPTION_KEYS` (or `DIS_ENCRYPTION_KEYS_FILE`):
the first key encrypts, every key decrypts. Each ciphertext is stored with the id of
the key that made it, so rotation knows what is left to re-encrypt.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


class DecryptionError(Exception):
    """No configured key decrypts a ciphertext (the message holds no secret)."""


@dataclass(frozen=True)
class Keyring:
    """The configured keys: `fernet` decrypts with any, encrypts with the first."""

    fernet: MultiFernet
    key_ids: tuple[str, ...]

    @property
    def primary_id(self) -> str:
        return self.key_ids[0]

    def encrypt(self, plaintext: bytes) -> tuple[str, str]:
        """Encrypt with the newest key; returns (ciphertext, key id)."""
        return self.fernet.encrypt(plaintext).decode(), self.primary_id

    def decrypt(self, ciphertext: str) -> bytes:
        try:
            return self.fernet.decrypt(ciphertext.encode())
        except InvalidToken:
            raise DecryptionError(
                "cannot decrypt: no configured encryption key matches"
            ) from None

    def rotate(self, ciphertext: str) -> tuple[str, str]:
        """Re-encrypt under the newest key; returns (ciphertext, key id)."""
        try:
            token = self.fernet.rotate(ciphertext.encode())
        except InvalidToken:
            raise DecryptionError(
                "cannot decrypt: no configured encryption key matches"
            ) from None
        return token.decode(), self.primary_id


def key_id(key: str) -> str:
    """A short public id of a key (a hash prefix: reveals nothing of the key)."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _local_keys() -> str:
    path = settings.DIS_ENCRYPTION_KEYS_LOCAL_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Fernet.generate_key().decode() + "\n")
        path.chmod(0o600)
    return path.read_text().strip()


def parse_keys(raw: str) -> list[str]:
    return [k.strip() for k in raw.replace("\n", ",").split(",") if k.strip()]


@cache
def keyring() -> Keyring:
    """The process's keyring, built once from settings.

    Raises:
        ImproperlyConfigured: when no key is configured (outside local mode) or a key
            is not a valid Fernet key.
    """
    raw = settings.DIS_ENCRYPTION_KEYS
    if not raw and settings.DIS_ENCRYPTION_KEYS_GENERATE:
        raw = _local_keys()
    keys = parse_keys(raw or "")
    if not keys:
        raise ImproperlyConfigured(
            "DIS_ENCRYPTION_KEYS (or DIS_ENCRYPTION_KEYS_FILE) must be set"
        )
    try:
        fernets = [Fernet(k) for k in keys]
    except ValueError:
        raise ImproperlyConfigured(
            "DIS_ENCRYPTION_KEYS holds a value that is not a Fernet key"
        ) from None
    return Keyring(MultiFernet(fernets), tuple(key_id(k) for k in keys))
