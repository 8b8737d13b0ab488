"""Serializers of the connectors API. Secrets are write-only."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from connectors import registry, services
from connectors.exceptions import ConfigError, RegistryError
from connectors.models import Connector, Credential


class BreakerStateSerializer(serializers.Serializer):
    state = serializers.ChoiceField(choices=["closed", "open", "half-open", "unknown"])
    failures = serializers.IntegerField()
    opened_at = serializers.DateTimeField(allow_null=True)
    retry_after = serializers.FloatField()


class StreamFieldSerializer(serializers.Serializer):
    name = serializers.CharField()
    type = serializers.CharField()
    nullable = serializers.BooleanField()


class StreamSerializer(serializers.Serializer):
    name = serializers.CharField()
    fields = StreamFieldSerializer(many=True)


class CredentialSerializer(serializers.ModelSerializer):
    """A credential; `secrets` can be written, never read back."""

    secrets = serializers.DictField(
        child=serializers.CharField(allow_blank=True, trim_whitespace=False),
        write_only=True,
        help_text="Secret values by field name (write-only; never returned).",
    )

    class Meta:
        model = Credential
        fields = [
            "id",
            "name",
            "description",
            "secrets",
            "field_names",
            "key_id",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["field_names", "key_id", "created_at", "updated_at"]

    def validate_secrets(self, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise serializers.ValidationError("at least one secret field is required")
        return value

    def create(self, validated_data: dict[str, Any]) -> Credential:
        secrets = validated_data.pop("secrets")
        credential = Credential(**validated_data)
        credential.set_secrets(secrets)
        credential.save()
        return credential

    def update(
        self, instance: Credential, validated_data: dict[str, Any]
    ) -> Credential:
        secrets = validated_data.pop("secrets", None)
        for key, value in validated_data.items():
            setattr(instance, key, value)
        if secrets is not None:
            instance.set_secrets(secrets)
        instance.save()
        return instance


class ConnectorSerializer(serializers.ModelSerializer):
    """A connector; `config` is checked against the kind's schema."""

    kind = serializers.CharField(max_length=50)
    breaker = serializers.SerializerMethodField(
        help_text="The shared circuit breaker (null without Redis)."
    )
    credential = serializers.SlugRelatedField(
        slug_field="name",
        queryset=Credential.objects.all(),
        allow_null=True,
        required=False,
    )

    class Meta:
        model = Connector
        fields = [
            "id",
            "name",
            "kind",
            "description",
            "config",
            "credential",
            "last_check_status",
            "last_check_message",
            "last_check_at",
            "breaker",
            "created_at",
            "updated_at",
        ]
        read_only_fields = [
            "last_check_status",
            "last_check_message",
            "last_check_at",
            "created_at",
            "updated_at",
        ]

    @extend_schema_field(BreakerStateSerializer(allow_null=True))
    def get_breaker(self, connector: Connector) -> dict[str, Any] | None:
        return services.breaker_state(connector)

    def validate_kind(self, value: str) -> str:
        try:
            registry.get_plugin(value)
        except RegistryError:
            known = ", ".join(sorted(registry.available_kinds()))
            raise serializers.ValidationError(
                f"unknown kind {value!r}; known kinds: {known}"
            ) from None
        return value

    def validate_config(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise serializers.ValidationError("must be an object")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        kind = attrs.get("kind", getattr(self.instance, "kind", None))
        config = attrs.get("config", getattr(self.instance, "config", {}))
        credential = attrs.get("credential", getattr(self.instance, "credential", None))
        plugin = registry.get_plugin(kind)
        try:
            loaded = plugin.load_config(
                config, credential.get_secrets() if credential else {}
            )
        except ConfigError as exc:
            errors = getattr(exc, "errors", None) or {"config": [str(exc)]}
            raise serializers.ValidationError({"config": dict(errors)}) from None
        unsafe = services.unsafe_urls(plugin, config) or services.unsafe_hosts(
            plugin, loaded
        )
        if unsafe:
            raise serializers.ValidationError({"config": unsafe})
        return attrs


class CheckResultSerializer(serializers.Serializer):
    ok = serializers.BooleanField()
    message = serializers.CharField()
    latency_ms = serializers.FloatField()
