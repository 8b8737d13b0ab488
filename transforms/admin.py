"""Admin of schema subjects, schema versions, mappings and mapping versions."""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.template import RequestContext, Template
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString

from transforms import services
from transforms.choices import PreviewValues
from transforms.exceptions import (
    IncompatibleSchemaError,
    MappingRulesError,
    PreviewError,
)
from transforms.models import Mapping, MappingVersion, SchemaSubject, SchemaVersion
from transforms.schemas import SchemaDefinitionError, arrow_schema_fields, parse_avro


def _pretty(value: Any) -> SafeString:
    return format_html("<pre>{}</pre>", json.dumps(value, indent=2, default=str))


class ReadOnlyAdmin(admin.ModelAdmin):
    """Immutable rows: visible, filterable, never edited here."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class ReadOnlyInline(admin.TabularInline):
    """Immutable child rows shown under their parent."""

    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


# --- Schema registry ------------------------------------------------------------


class SchemaVersionInline(ReadOnlyInline):
    model = SchemaVersion
    fields = ["number", "fingerprint", "created_at"]
    readonly_fields = fields
    ordering = ["-number"]


class SchemaSubjectForm(forms.ModelForm):
    """A subject; a definition in `new_version` is registered as its next version
    (checked against the latest one as the API does)."""

    new_version = forms.JSONField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 12, "cols": 80}),
        help_text="An Avro record schema to register as the next version.",
    )

    class Meta:
        model = SchemaSubject
        fields = ["name", "compatibility", "description"]

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        definition = data.get("new_version")
        if self.errors or definition in (None, "", {}):
            return data
        probe = self.instance if self.instance.pk else None
        try:
            if probe is not None:
                probe.compatibility = data.get("compatibility", probe.compatibility)
                problems = services.check_compatibility(probe, definition)
            else:
                parse_avro(definition)
                problems = []
        except SchemaDefinitionError as exc:
            self.add_error("new_version", str(exc))
            return data
        for problem in problems:
            self.add_error("new_version", problem)
        return data


@admin.register(SchemaSubject)
class SchemaSubjectAdmin(admin.ModelAdmin):
    form = SchemaSubjectForm
    list_display = ["name", "compatibility", "latest_number", "updated_at"]
    list_filter = ["compatibility"]
    search_fields = ["name", "description"]
    readonly_fields = ["created_at", "updated_at"]
    inlines = [SchemaVersionInline]

    @admin.display(description="latest version")
    def latest_number(self, obj: SchemaSubject) -> int | None:
        latest = obj.latest_version
        return latest.number if latest else None

    def save_model(
        self, request: HttpRequest, obj: SchemaSubject, form: Any, change: bool
    ) -> None:
        super().save_model(request, obj, form, change)
        definition = form.cleaned_data.get("new_version")
        if definition in (None, "", {}):
            return
        try:
            version, created = services.register_schema_version(obj.pk, definition)
        except (SchemaDefinitionError, IncompatibleSchemaError) as exc:
            # Checked in the form; only a concurrent registration gets here.
            self.message_user(request, str(exc), messages.ERROR)
            return
        self.message_user(
            request,
            f"version {version.number} "
            + ("registered" if created else "already had this definition"),
        )


@admin.register(SchemaVersion)
class SchemaVersionAdmin(ReadOnlyAdmin):
    list_display = ["subject", "number", "fingerprint", "created_at"]
    list_filter = ["subject"]
    search_fields = ["subject__name", "fingerprint", "content_hash"]
    fields = [
        "subject",
        "number",
        "fingerprint",
        "content_hash",
        "created_at",
        "definition_pretty",
        "arrow_pretty",
        "json_schema_pretty",
    ]
    readonly_fields = fields

    @admin.display(description="definition (Avro)")
    def definition_pretty(self, obj: SchemaVersion) -> SafeString:
        return _pretty(obj.definition)

    @admin.display(description="Arrow schema")
    def arrow_pretty(self, obj: SchemaVersion) -> SafeString:
        return _pretty(arrow_schema_fields(obj.arrow_schema()))

    @admin.display(description="JSON Schema")
    def json_schema_pretty(self, obj: SchemaVersion) -> SafeString:
        return _pretty(obj.json_schema())


# --- Mappings -------------------------------------------------------------------


class MappingForm(forms.ModelForm):
    """Checks the rules the way the API does (engine compile, target fields)."""

    class Meta:
        model = Mapping
        fields = ["name", "description", "source_subject", "target_subject", "rules"]
        widgets = {"rules": forms.Textarea(attrs={"rows": 20, "cols": 100})}

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if "rules" not in data:
            return data
        try:
            services.validate_rules(
                data["rules"],
                source=data.get("source_subject"),
                target=data.get("target_subject"),
            )
        except MappingRulesError as exc:
            self.add_error("rules", str(exc))
        return data


class MappingVersionInline(ReadOnlyInline):
    model = MappingVersion
    fields = ["number", "content_hash", "created_at"]
    readonly_fields = fields
    ordering = ["-number"]


class PreviewForm(forms.Form):
    """Sample records to run a mapping version on."""

    records = forms.JSONField(
        widget=forms.Textarea(attrs={"rows": 12, "cols": 100}),
        help_text='A JSON list of objects, e.g. [{"id": "1", "amount": "2.50"}].',
    )
    values = forms.ChoiceField(choices=PreviewValues.choices)
    version = forms.IntegerField(
        required=False, min_value=1, help_text="Empty: the current version."
    )

    def clean_records(self) -> list[Any]:
        records = self.cleaned_data["records"]
        if not isinstance(records, list):
            raise forms.ValidationError("must be a JSON list of objects")
        if len(records) > services.MAX_PREVIEW_RECORDS:
            raise forms.ValidationError(
                f"at most {services.MAX_PREVIEW_RECORDS} records"
            )
        return records


PREVIEW_TEMPLATE = Template(
    """{% extends "admin/base_site.html" %}
{% block content %}
<p><a href="{{ change_url }}">Back to {{ mapping }}</a></p>
<form method="post">{% csrf_token %}
<table>{{ form.as_table }}</table>
<input type="submit" value="Preview">
</form>
{% if result %}
<h2>Version {{ result.version }}: {{ result.outputs|length }} output(s),
{{ result.errors|length }} error(s) of {{ result.rows_in }} record(s)</h2>
<h3>Outputs</h3><pre>{{ outputs }}</pre>
{% if result.errors %}<h3>Errors</h3>
<table><tr><th>index</th><th>step</th><th>error</th></tr>
{% for e in result.errors %}
<tr><td>{{ e.index }}</td><td>{{ e.step }}</td><td>{{ e.error }}</td></tr>
{% endfor %}</table>{% endif %}
<h3>Column lineage</h3><pre>{{ lineage }}</pre>
{% endif %}
{% endblock %}"""
)


@admin.register(Mapping)
class MappingAdmin(admin.ModelAdmin):
    form = MappingForm
    list_display = [
        "name",
        "source_subject",
        "target_subject",
        "version_number",
        "updated_at",
    ]
    list_filter = ["source_subject", "target_subject"]
    search_fields = ["name", "description"]
    readonly_fields = ["current_version", "preview_link", "created_at", "updated_at"]
    inlines = [MappingVersionInline]

    @admin.display(description="version")
    def version_number(self, obj: Mapping) -> int | None:
        return obj.current_version.number if obj.current_version else None

    @admin.display(description="preview")
    def preview_link(self, obj: Mapping) -> str:
        if obj.pk is None:
            return "-"
        url = reverse("admin:transforms_mapping_preview", args=[obj.pk])
        return format_html('<a href="{}">Preview on sample records</a>', url)

    def save_model(
        self, request: HttpRequest, obj: Mapping, form: Any, change: bool
    ) -> None:
        super().save_model(request, obj, form, change)
        services.save_mapping(obj)

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "<int:object_id>/preview/",
                self.admin_site.admin_view(self.preview_view),
                name="transforms_mapping_preview",
            ),
            *super().get_urls(),
        ]

    def preview_view(self, request: HttpRequest, object_id: int) -> HttpResponse:
        """Run the mapping on posted sample records and show the result."""
        mapping = get_object_or_404(Mapping, pk=object_id)
        if not self.has_view_permission(request, mapping):
            raise PermissionDenied
        result = None
        if request.method == "POST":
            form = PreviewForm(request.POST)
            if form.is_valid():
                try:
                    result = services.preview_mapping(
                        mapping,
                        records=form.cleaned_data["records"],
                        version=form.cleaned_data["version"],
                        values=form.cleaned_data["values"],
                    )
                except PreviewError as exc:
                    field = exc.field if exc.field in form.fields else None
                    form.add_error(field, str(exc))
        elif request.method == "GET":
            form = PreviewForm(initial={"records": [], "values": PreviewValues.TEXT})
        else:
            raise Http404
        context = {
            **self.admin_site.each_context(request),
            "title": f"Preview of {mapping.name}",
            "opts": self.model._meta,
            "mapping": mapping,
            "change_url": reverse("admin:transforms_mapping_change", args=[mapping.pk]),
            "form": form,
            "result": result,
            "outputs": json.dumps(result.outputs, indent=2) if result else "",
            "lineage": json.dumps(result.column_lineage, indent=2) if result else "",
        }
        return HttpResponse(PREVIEW_TEMPLATE.render(RequestContext(request, context)))


@admin.register(MappingVersion)
class MappingVersionAdmin(ReadOnlyAdmin):
    list_display = ["mapping", "number", "content_hash", "created_at"]
    list_filter = ["mapping"]
    search_fields = ["mapping__name", "content_hash"]
    fields = ["mapping", "number", "content_hash", "created_at", "rules_pretty"]
    readonly_fields = fields

    @admin.display(description="rules")
    def rules_pretty(self, obj: MappingVersion) -> SafeString:
        return _pretty(obj.rules)
