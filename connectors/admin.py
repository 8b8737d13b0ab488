"""Admin of connectors and credentials. Secret values are never shown."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from connectors import registry, services
from connectors.models import Connector, Credential


class CredentialForm(forms.ModelForm):
    """Secrets are typed as `name=value` lines and never rendered back."""

    secrets = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 4, "autocomplete": "off"}),
        required=False,
        help_text="One secret per line as name=value. Leave empty to keep the "
        "current secrets; the values are never shown again.",
    )

    class Meta:
        model = Credential
        fields = ["name", "description"]

    def clean_secrets(self) -> dict[str, str] | None:
        raw = self.cleaned_data.get("secrets") or ""
        if not raw.strip():
            if self.instance.pk is None:
                raise forms.ValidationError("at least one secret is required")
            return None
        result: dict[str, str] = {}
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            name, sep, value = line.partition("=")
            if not sep or not name.strip():
                raise forms.ValidationError(f"line {number}: expected name=value")
            result[name.strip()] = value
        return result

    def save(self, commit: bool = True) -> Credential:
        credential = super().save(commit=False)
        secrets = self.cleaned_data.get("secrets")
        if secrets is not None:
            credential.set_secrets(secrets)
        if commit:
            credential.save()
        return credential


@admin.register(Credential)
class CredentialAdmin(admin.ModelAdmin):
    form = CredentialForm
    list_display = ["name", "field_list", "key_id", "connector_count", "updated_at"]
    list_filter = ["key_id", "updated_at"]
    search_fields = ["name", "description"]
    readonly_fields = ["field_names", "key_id", "created_at", "updated_at"]

    @admin.display(description="secret fields")
    def field_list(self, obj: Credential) -> str:
        return ", ".join(obj.field_names)

    @admin.display(description="connectors")
    def connector_count(self, obj: Credential) -> int:
        return obj.connectors.count()


class ConnectorForm(forms.ModelForm):
    kind = forms.ChoiceField(choices=registry.kind_choices)

    class Meta:
        model = Connector
        fields = ["name", "kind", "description", "config", "credential"]


@admin.register(Connector)
class ConnectorAdmin(admin.ModelAdmin):
    form = ConnectorForm
    list_display = [
        "name",
        "kind",
        "credential",
        "last_check_status",
        "last_check_at",
        "breaker",
    ]
    list_filter = ["kind", "last_check_status"]
    search_fields = ["name", "description", "credential__name"]
    readonly_fields = [
        "last_check_status",
        "last_check_message",
        "last_check_at",
        "created_at",
        "updated_at",
    ]
    actions = ["test_connection", "reset_breaker"]

    @admin.display(description="breaker")
    def breaker(self, obj: Connector) -> str:
        state = services.breaker_state(obj)
        if state is None:
            return "-"
        return f"{state['state']} ({state['failures']} failures)"

    @admin.action(description="Reset circuit breaker")
    def reset_breaker(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        for connector in queryset:
            services.reset_breaker(connector)
        self.message_user(request, f"{queryset.count()} breaker(s) closed")

    @admin.action(description="Test connection")
    def test_connection(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        for connector in queryset:
            result = services.test_connection(connector.pk)
            level = messages.SUCCESS if result.ok else messages.ERROR
            self.message_user(request, f"{connector.name}: {result.message}", level)
