"""Filters of the integration API."""

from __future__ import annotations

from django_filters import rest_framework as filters

from integration.choices import (
    DeadLetterState,
    DriftPolicy,
    ProposalState,
    RunKind,
    RunState,
    RunTrigger,
    SchemaChangeKind,
)
from integration.models import (
    DeadLetter,
    Pipeline,
    Run,
    SchemaChange,
    SchemaChangeProposal,
)


class PipelineFilter(filters.FilterSet):
    name = filters.CharFilter(lookup_expr="icontains")
    source = filters.CharFilter(field_name="source__name")
    sink = filters.CharFilter(field_name="sink__name")

    class Meta:
        model = Pipeline
        fields = ["name", "mode", "is_paused", "source", "sink"]


class RunFilter(filters.FilterSet):
    pipeline = filters.CharFilter(field_name="pipeline__name")
    state = filters.MultipleChoiceFilter(choices=RunState.choices)
    kind = filters.ChoiceFilter(choices=RunKind.choices)
    trigger = filters.ChoiceFilter(choices=RunTrigger.choices)
    created_after = filters.IsoDateTimeFilter(
        field_name="created_at", lookup_expr="gte"
    )
    created_before = filters.IsoDateTimeFilter(
        field_name="created_at", lookup_expr="lt"
    )

    class Meta:
        model = Run
        fields = ["pipeline", "state", "kind", "trigger", "correlation_id"]


class DeadLetterFilter(filters.FilterSet):
    pipeline = filters.CharFilter(field_name="pipeline__name")
    state = filters.ChoiceFilter(choices=DeadLetterState.choices)
    created_after = filters.IsoDateTimeFilter(
        field_name="created_at", lookup_expr="gte"
    )
    created_before = filters.IsoDateTimeFilter(
        field_name="created_at", lookup_expr="lt"
    )

    class Meta:
        model = DeadLetter
        fields = ["pipeline", "run", "step", "error_class", "state", "chunk_seq"]


class SchemaChangeFilter(filters.FilterSet):
    pipeline = filters.CharFilter(field_name="pipeline__name")
    kind = filters.ChoiceFilter(choices=SchemaChangeKind.choices)
    policy = filters.ChoiceFilter(choices=DriftPolicy.choices)

    class Meta:
        model = SchemaChange
        fields = ["pipeline", "run", "kind", "policy", "column", "proposal"]


class SchemaChangeProposalFilter(filters.FilterSet):
    pipeline = filters.CharFilter(field_name="pipeline__name")
    state = filters.ChoiceFilter(choices=ProposalState.choices)

    class Meta:
        model = SchemaChangeProposal
        fields = ["pipeline", "state"]
