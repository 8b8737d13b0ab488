"""Connectors and the credentials they use."""

from __future__ import annotations

from typing import Any

import orjson
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models

from connectors import registry
from connectors.base import ConnectorContext
from connectors.choices import CheckStatus
from connectors.crypto import keyring
from connectors.exceptions import ConfigError, RegistryError


class Credential(models.Model):
    """A named bundle of secrets (passwords, tokens, keys), stored encrypted.

    The secret values are one JSON object encrypted with the newest Fernet key;
    `key_id` names that key. Values never leave the model except to a plugin.
    """

    name = models.SlugField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    ciphertext = models.TextField(editable=False)
    key_id = models.CharField(max_length=32, editable=False, db_index=True)
    #: Names of the secret fields (not their values), for display.
    field_names = models.JSONField(default=list, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<Credential {self.name} fields={self.field_names}>"

    def set_secrets(self, secrets: dict[str, str]) -> None:
        """Encrypt `secrets` (field name -> value) into this row (not saved)."""
        self.ciphertext, self.key_id = keyring().encrypt(orjson.dumps(secrets))
        self.field_names = sorted(secrets)

    def get_secrets(self) -> dict[str, str]:
        """Decrypt the secrets; for plugins only, never for responses or logs."""
        if not self.ciphertext:
            return {}
        return orjson.loads(keyring().decrypt(self.ciphertext))  # type: ignore[no-any-return]


class Connector(models.Model):
    """An instance of a connector plugin (`kind`) with its validated config."""

    name = models.SlugField(max_length=100, unique=True)
    kind = models.CharField(max_length=50, db_index=True)
    description = models.TextField(blank=True)
    config = models.JSONField(default=dict, blank=True)
    credential = models.ForeignKey(
        Credential,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="connectors",
    )
    last_check_status = models.CharField(
        max_length=10, choices=CheckStatus.choices, default=CheckStatus.UNKNOWN
    )
    last_check_message = models.TextField(blank=True)
    last_check_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.kind})"

    @property
    def plugin(self) -> Any:
        return registry.get_plugin(self.kind)

    def clean(self) -> None:
        try:
            plugin = self.plugin
        except RegistryError as exc:
            raise ValidationError({"kind": str(exc)}) from None
        try:
            loaded = plugin.load_config(
                self.config or {}, self._secrets_for_validation()
            )
        except ConfigError as exc:
            errors = getattr(exc, "errors", None) or {"config": [str(exc)]}
            raise ValidationError(
                {
                    "config": [
                        f"{k}: {', '.join(map(str, v))}" for k, v in errors.items()
                    ]
                }
            ) from None
        from connectors.services import unsafe_hosts, unsafe_urls

        unsafe = unsafe_urls(plugin, self.config or {}) or unsafe_hosts(plugin, loaded)
        if unsafe:
            raise ValidationError(
                {"config": [f"{k}: {', '.join(v)}" for k, v in unsafe.items()]}
            )

    def _secrets_for_validation(self) -> dict[str, str]:
        return self.credential.get_secrets() if self.credential_id else {}

    def loaded_config(self) -> dict[str, Any]:
        """The plugin config with the credential's secrets merged in (for plugins)."""
        return self.plugin.load_config(
            self.config or {}, self._secrets_for_validation()
        )

    def context(self, correlation_id: str | None = None) -> ConnectorContext:
        """What the plugin may use of the service: shared Redis, the allow-lists."""
        return ConnectorContext(
            name=self.name,
            redis_url=settings.REDIS_URL or None,
            allowed_networks=tuple(settings.DIS_ALLOWED_NETWORKS),
            correlation_id=correlation_id,
            data_allowed_networks=tuple(settings.DIS_DATA_ALLOWED_NETWORKS),
        )

    def open_source(self, correlation_id: str | None = None) -> Any:
        return self.plugin.source(self.loaded_config(), self.context(correlation_id))

    def open_sink(self, correlation_id: str | None = None) -> Any:
        return self.plugin.sink(self.loaded_config(), self.context(correlation_id))
